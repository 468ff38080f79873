//! The identity of a node's data directory: the node id it belongs to and
//! a random 16-byte uuid made when it was first used. The cluster map
//! records the uuid of each node, so a wiped node that comes back under
//! its old id (with no data, and a new uuid) is never taken for the node
//! that held its replicas.

use std::io::Read as _;

use rocksdb::WriteBatch;

use crate::engine::{Engine, EngineError};
use crate::keys;

/// Who this data directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreIdent {
    pub node_id: u64,
    pub uuid: [u8; 16],
    /// Never used before this start: nothing in it yet.
    pub fresh: bool,
}

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentError {
    #[error("this data directory belongs to node {owner}, not to node {node}")]
    WrongNode { owner: u64, node: u64 },
    #[error("cannot make a store uuid: {0}")]
    Random(std::io::Error),
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
}

fn random_uuid() -> Result<[u8; 16], IdentError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(IdentError::Random)?;
    Ok(b)
}

/// Reads the identity, or makes a new one (not yet written: see `persist`)
/// for a data directory never used.
pub fn load(engine: &Engine, node_id: u64) -> Result<StoreIdent, IdentError> {
    let Some(v) = engine.get_raft(&keys::store_ident())? else {
        return Ok(StoreIdent {
            node_id,
            uuid: random_uuid()?,
            fresh: true,
        });
    };
    if v.len() != 8 && v.len() != 24 {
        return Err(EngineError::Corrupt {
            key: keys::store_ident(),
            what: "store identity is neither 8 nor 24 bytes".into(),
        }
        .into());
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[..8]);
    let owner = u64::from_be_bytes(b);
    if owner != node_id {
        return Err(IdentError::WrongNode {
            owner,
            node: node_id,
        });
    }
    let mut uuid = [0u8; 16];
    if v.len() == 24 {
        uuid.copy_from_slice(&v[8..]);
    } else {
        // Written before stores had uuids.
        uuid = random_uuid()?;
        persist(
            engine,
            &StoreIdent {
                node_id,
                uuid,
                fresh: false,
            },
        )?;
    }
    Ok(StoreIdent {
        node_id,
        uuid,
        fresh: false,
    })
}

/// Writes the identity (synced).
pub fn persist(engine: &Engine, ident: &StoreIdent) -> Result<(), EngineError> {
    let mut v = ident.node_id.to_be_bytes().to_vec();
    v.extend_from_slice(&ident.uuid);
    let mut wb = WriteBatch::default();
    wb.put_cf(engine.raft_cf(), keys::store_ident(), v);
    engine.write(wb, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_keeps_its_owner_and_uuid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(dir.path()).expect("engine");
        let first = load(&engine, 3).expect("load");
        assert!(first.fresh);
        persist(&engine, &first).expect("persist");
        let again = load(&engine, 3).expect("load");
        assert_eq!((again.uuid, again.fresh), (first.uuid, false));
        assert!(matches!(
            load(&engine, 4),
            Err(IdentError::WrongNode { owner: 3, node: 4 })
        ));
        let other = tempfile::tempdir().expect("tempdir");
        let e2 = Engine::open(other.path()).expect("engine");
        assert_ne!(load(&e2, 3).expect("load").uuid, first.uuid);
    }
}
