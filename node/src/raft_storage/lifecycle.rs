//! A group replica's life on this node outside the log: bootstrapping the
//! first replicas of a group, telling whether a replica exists here, and
//! removing one (its raft state, log and state machine, leaving a
//! tombstone with the configuration version it left at and the raft peer
//! id it had), and the replica's own raft peer id (see
//! `membership`: a replica's incarnation).

use protobuf::Message as _;
use raft::prelude::{ConfState, HardState};
use rocksdb::WriteBatch;

use super::encode_conf_state;
use crate::engine::{Engine, EngineError};
use crate::keys;

/// Index and term at which a bootstrapped group starts (TiKV's
/// `RAFT_INIT_LOG_INDEX`): its log is "compacted" up to here, so a replica
/// added later, which starts empty at index 0, can only be caught up by a
/// snapshot, and a snapshot carries the configuration the log does not.
pub const RAFT_INIT_INDEX: u64 = 5;
pub const RAFT_INIT_TERM: u64 = 5;

/// Reads a group's configuration version from its state machine.
pub fn read_conf_ver(engine: &Engine, group: u64) -> Result<u64, EngineError> {
    match engine.get_kv(&keys::conf_ver(group))? {
        None => Ok(0),
        Some(v) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            Ok(u64::from_be_bytes(b))
        }
        Some(_) => Err(EngineError::Corrupt {
            key: keys::conf_ver(group),
            what: "configuration version is not 8 bytes".into(),
        }),
    }
}

/// True if this node holds an initialized replica of `group` (one with a
/// configuration: bootstrapped, or filled by a snapshot).
pub fn is_initialized(engine: &Engine, group: u64) -> Result<bool, EngineError> {
    Ok(engine.get_kv(&keys::conf_state(group))?.is_some())
}

/// Creates a group's first replica state on a node of its initial
/// configuration: configuration `voters` at version 1, log compacted up to
/// `RAFT_INIT_INDEX`, applied and committed there, its state machine
/// holding `kvs` (the same on every initial replica). Does nothing if the
/// group already has a configuration here. One synced write.
pub fn bootstrap(
    engine: &Engine,
    group: u64,
    voters: &[u64],
    kvs: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), EngineError> {
    assert!(!voters.is_empty(), "a group starts with at least one voter");
    if is_initialized(engine, group)? {
        return Ok(());
    }
    let cs = ConfState {
        voters: voters.to_vec(),
        ..Default::default()
    };
    let hs = HardState {
        term: RAFT_INIT_TERM,
        commit: RAFT_INIT_INDEX,
        ..Default::default()
    };
    let cf = engine.raft_cf();
    let mut wb = WriteBatch::default();
    wb.put_cf(
        engine.kv_cf(),
        keys::conf_state(group),
        encode_conf_state(group, &cs)?,
    );
    let init = keys::u64_pair(RAFT_INIT_INDEX, RAFT_INIT_TERM);
    wb.put_cf(cf, keys::truncated_state(group), &init);
    wb.put_cf(engine.kv_cf(), keys::apply_state(group), &init);
    wb.put_cf(
        cf,
        keys::hard_state(group),
        hs.write_to_bytes().map_err(|e| EngineError::Corrupt {
            key: keys::hard_state(group),
            what: e.to_string(),
        })?,
    );
    wb.put_cf(engine.kv_cf(), keys::conf_ver(group), 1u64.to_be_bytes());
    let (start, end) = keys::group_range(group);
    for (k, v) in kvs {
        assert!(
            k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice(),
            "bootstrap pair outside group {group}"
        );
        wb.put_cf(engine.kv_cf(), k, v);
    }
    engine.write(wb, true)
}

/// Stages the removal of this node's replica of `group`: its raft state,
/// log and state machine are deleted, and a tombstone records the
/// configuration version `conf_ver` at which it left and its raft peer id
/// (see `keys`): that incarnation never comes back here.
pub fn stage_destroy(engine: &Engine, wb: &mut WriteBatch, group: u64, conf_ver: u64, peer: u64) {
    let (start, end) = keys::group_range(group);
    wb.delete_range_cf(engine.raft_cf(), &start, &end);
    wb.delete_range_cf(engine.kv_cf(), &start, &end);
    wb.delete_cf(engine.kv_cf(), keys::apply_state(group));
    wb.delete_cf(engine.kv_cf(), keys::conf_state(group));
    wb.put_cf(
        engine.raft_cf(),
        keys::tombstone(group),
        keys::u64_pair(conf_ver, peer),
    );
}

/// What the tombstone of this node's replica of `group` records, if it
/// was removed: the configuration version it left at and its raft peer id
/// (tombstones written before incarnations hold only the version: their
/// replica's peer id was the node id, `node`).
pub fn tombstone(
    engine: &Engine,
    group: u64,
    node: u64,
) -> Result<Option<(u64, u64)>, EngineError> {
    match engine.get_raft(&keys::tombstone(group))? {
        None => Ok(None),
        Some(v) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            Ok(Some((u64::from_be_bytes(b), node)))
        }
        Some(v) => keys::parse_u64_pair(&v)
            .map(Some)
            .ok_or_else(|| EngineError::Corrupt {
                key: keys::tombstone(group),
                what: format!("tombstone is {} bytes, not 8 or 16", v.len()),
            }),
    }
}

/// Stages the raft peer id of this node's replica of `group`, for a
/// replica created for a leader's message (bootstrap replicas have none
/// stored: theirs is the node id).
pub fn stage_own_peer(engine: &Engine, wb: &mut WriteBatch, group: u64, peer: u64) {
    wb.put_cf(engine.raft_cf(), keys::own_peer(group), peer.to_be_bytes());
}

/// The raft peer id of this node's replica of `group` (node `node`).
pub fn own_peer(engine: &Engine, group: u64, node: u64) -> Result<u64, EngineError> {
    match engine.get_raft(&keys::own_peer(group))? {
        None => Ok(node),
        Some(v) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            Ok(u64::from_be_bytes(b))
        }
        Some(v) => Err(EngineError::Corrupt {
            key: keys::own_peer(group),
            what: format!("own peer id is {} bytes, not 8", v.len()),
        }),
    }
}
