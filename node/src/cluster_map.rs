//! The cluster map in the meta group's state machine: node records, the
//! replicas of every group as last reported by its leader, cluster flags,
//! the bootstrap parameters and an epoch that rises with every change.
//! Here: its keys' contents, the apply of its commands (deterministic on
//! every meta replica), the initial map written at bootstrap, and reading
//! it back.

use prost::Message as _;
use raftblk_proto::{
    ClusterFlags, ClusterMap, Error as PbError, ErrorCode, GroupRecord, NodeRecord, NodeState,
    SetFlagsCmd, SetFullNodesCmd, SetGroupsCmd, SetNodeCmd, META_GROUP_ID,
};
use rocksdb::WriteBatch;

use crate::apply::{Applier, ApplyOutput, ApplyResult};
use crate::config::NodeConfig;
use crate::engine::{Engine, EngineError};
use crate::keys;

/// Weight of a node that names none.
pub const WEIGHT_DEFAULT: u64 = 100;
/// Most nodes a cluster map holds.
pub const NODES_MAX: usize = 1024;

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> EngineError {
    EngineError::Corrupt {
        key: key.to_vec(),
        what: e.to_string(),
    }
}

/// Parameters fixed at bootstrap, stored with the map.
fn params_value(data_groups: u64, replicas: u64, chunk_size_bytes: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    for x in [data_groups, replicas, chunk_size_bytes] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn u64_at(v: &[u8], i: usize) -> Option<u64> {
    let b = v.get(i * 8..i * 8 + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

/// The map a new cluster starts with, as state-machine pairs of the meta
/// group: every bootstrap node up, every group on its bootstrap replicas at
/// configuration version 1. Identical on every bootstrap node (it depends
/// only on the `[cluster]` section, which they share).
pub fn initial_kvs(config: &NodeConfig) -> Vec<(Vec<u8>, Vec<u8>)> {
    let g = META_GROUP_ID;
    let c = &config.cluster;
    let mut kvs = Vec::new();
    let ids = config.node_ids();
    for n in &c.nodes {
        let rec = NodeRecord {
            id: n.id,
            addr: n.addr.clone(),
            state: NodeState::Up as i32,
            weight: n.weight.unwrap_or(WEIGHT_DEFAULT),
            failure_domain: n.failure_domain.clone().unwrap_or_default(),
            store_uuid: Default::default(),
            state_since_unix_ms: 0,
            out_by_admin: false,
        };
        kvs.push((keys::map_node(g, n.id), rec.encode_to_vec()));
    }
    for group in 0..=c.data_groups {
        let rec = GroupRecord {
            group_id: group,
            voters: raftblk_proto::placement::group_replicas(&ids, group, c.replicas),
            learners: Vec::new(),
            voters_outgoing: Vec::new(),
            conf_ver: 1,
        };
        kvs.push((keys::map_group(g, group), rec.encode_to_vec()));
    }
    kvs.push((
        keys::map_params(g),
        params_value(c.data_groups, c.replicas, c.chunk_size_bytes),
    ));
    kvs.push((keys::map_epoch(g), 1u64.to_be_bytes().to_vec()));
    let has = |f: &str| c.flags.iter().any(|x| x == f);
    let flags = ClusterFlags {
        noout: has("noout"),
        norecover: has("norecover"),
        norebalance: has("norebalance"),
    };
    kvs.push((keys::map_flags(g), flags.encode_to_vec()));
    kvs
}

impl Applier<'_> {
    fn bump_epoch(&mut self, wb: &mut WriteBatch, group: u64) -> Result<u64, EngineError> {
        let key = keys::map_epoch(group);
        let epoch = match self.get(&key)? {
            Some(v) => u64_at(&v, 0).ok_or_else(|| corrupt(&key, "epoch is not 8 bytes"))?,
            None => 0,
        } + 1;
        self.put(wb, key, epoch.to_be_bytes().to_vec());
        Ok(epoch)
    }

    pub(crate) fn set_node(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: SetNodeCmd,
    ) -> Result<ApplyResult, EngineError> {
        let Some(n) = c.node else {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                "no node record",
            )));
        };
        if group != META_GROUP_ID || n.id == 0 {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                "node records live in the meta group and have ids from 1",
            )));
        }
        let key = keys::map_node(group, n.id);
        if c.expect_state != NodeState::Unspecified as i32 {
            let stored = match self.get(&key)? {
                Some(v) => NodeRecord::decode(v.as_slice()).map_err(|e| corrupt(&key, e))?,
                None => NodeRecord::default(),
            };
            if stored.state != c.expect_state {
                return Ok(Err(PbError::new(
                    ErrorCode::Unavailable,
                    format!("node {}'s state changed meanwhile", n.id),
                )));
            }
        }
        if c.create && self.get(&key)?.is_some() {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!("node id {} is taken", n.id),
            )));
        }
        self.put(wb, key, n.encode_to_vec());
        Ok(Ok(ApplyOutput::MapEpoch(self.bump_epoch(wb, group)?)))
    }

    pub(crate) fn set_groups(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: SetGroupsCmd,
    ) -> Result<ApplyResult, EngineError> {
        if group != META_GROUP_ID {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                "group records live in the meta group",
            )));
        }
        let mut changed = false;
        for r in c.groups {
            let key = keys::map_group(group, r.group_id);
            let stored = match self.get(&key)? {
                Some(v) => GroupRecord::decode(v.as_slice()).map_err(|e| corrupt(&key, e))?,
                None => GroupRecord::default(),
            };
            // The group's own log orders its configurations; reports may
            // arrive out of order.
            if r.conf_ver > stored.conf_ver {
                self.put(wb, key, r.encode_to_vec());
                changed = true;
            }
        }
        if !changed {
            return Ok(Ok(ApplyOutput::Done));
        }
        Ok(Ok(ApplyOutput::MapEpoch(self.bump_epoch(wb, group)?)))
    }

    pub(crate) fn set_full_nodes(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: SetFullNodesCmd,
    ) -> Result<ApplyResult, EngineError> {
        if c.nodes.len() > NODES_MAX {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                "too many full nodes",
            )));
        }
        self.put_map_value(wb, group, keys::map_full_nodes(group), c.encode_to_vec())
    }

    pub(crate) fn set_flags(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: SetFlagsCmd,
    ) -> Result<ApplyResult, EngineError> {
        let flags = c.flags.unwrap_or_default();
        self.put_map_value(wb, group, keys::map_flags(group), flags.encode_to_vec())
    }

    /// Replaces one whole-map value (flags, full nodes) of the meta group
    /// and bumps the epoch.
    fn put_map_value(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<ApplyResult, EngineError> {
        if group != META_GROUP_ID {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                "the cluster map lives in the meta group",
            )));
        }
        self.put(wb, key, value);
        Ok(Ok(ApplyOutput::MapEpoch(self.bump_epoch(wb, group)?)))
    }
}

/// Reads the whole map from the local meta replica, from one pinned view.
pub fn read(engine: &Engine) -> Result<ClusterMap, EngineError> {
    let g = META_GROUP_ID;
    let snap = engine.snapshot();
    let mut map = ClusterMap::default();
    let get = |key: Vec<u8>| -> Result<Option<Vec<u8>>, EngineError> {
        let mut out = None;
        let mut end = key.clone();
        end.push(0);
        snap.scan_kv(engine, &key, &end, |_, v| {
            out = Some(v.to_vec());
            false
        })?;
        Ok(out)
    };
    let key = keys::map_params(g);
    if let Some(v) = get(key.clone())? {
        map.data_groups = u64_at(&v, 0).ok_or_else(|| corrupt(&key, "short parameters"))?;
        map.replicas = u64_at(&v, 1).ok_or_else(|| corrupt(&key, "short parameters"))?;
        map.chunk_size_bytes = u64_at(&v, 2).ok_or_else(|| corrupt(&key, "short parameters"))?;
    }
    let key = keys::map_epoch(g);
    if let Some(v) = get(key.clone())? {
        map.epoch = u64_at(&v, 0).ok_or_else(|| corrupt(&key, "epoch is not 8 bytes"))?;
    }
    let key = keys::map_flags(g);
    if let Some(v) = get(key.clone())? {
        map.flags = Some(ClusterFlags::decode(v.as_slice()).map_err(|e| corrupt(&key, e))?);
    }
    let key = keys::map_full_nodes(g);
    if let Some(v) = get(key.clone())? {
        map.full_nodes = SetFullNodesCmd::decode(v.as_slice())
            .map_err(|e| corrupt(&key, e))?
            .nodes;
    }
    let mut bad = None;
    let (start, end) = keys::map_nodes_range(g);
    snap.scan_kv(engine, &start, &end, |k, v| match NodeRecord::decode(v) {
        Ok(n) => {
            map.nodes.push(n);
            map.nodes.len() < NODES_MAX
        }
        Err(e) => {
            bad = Some(corrupt(k, e));
            false
        }
    })?;
    let (start, end) = keys::map_groups_range(g);
    snap.scan_kv(engine, &start, &end, |k, v| match GroupRecord::decode(v) {
        Ok(r) => {
            map.groups.push(r);
            true
        }
        Err(e) => {
            bad = Some(corrupt(k, e));
            false
        }
    })?;
    match bad {
        Some(e) => Err(e),
        None => Ok(map),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_commands_apply_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(dir.path()).expect("engine");
        let text = r#"
node_id = 1
listen_addr = "127.0.0.1:7101"
data_dir = "/tmp/x"
tls = { insecure_plaintext = true }
[cluster]
data_groups = 3
replicas = 2
[[cluster.nodes]]
id = 1
addr = "127.0.0.1:7101"
[[cluster.nodes]]
id = 2
addr = "127.0.0.1:7102"
failure_domain = "rack-b"
"#;
        let cfg = NodeConfig::parse(text, std::path::Path::new("t.toml")).expect("config");
        let mut wb = WriteBatch::default();
        for (k, v) in initial_kvs(&cfg) {
            wb.put_cf(engine.kv_cf(), k, v);
        }
        engine.write(wb, false).expect("write");
        let m = read(&engine).expect("read");
        assert_eq!((m.epoch, m.data_groups, m.replicas), (1, 3, 2));
        assert_eq!(m.nodes.len(), 2);
        assert_eq!(m.nodes[1].failure_domain, "rack-b");
        assert_eq!(m.groups.len(), 4);
        assert_eq!(m.groups[2].voters, vec![2, 1]);

        let mut a = Applier::new(&engine);
        let mut wb = WriteBatch::default();
        let older = GroupRecord {
            group_id: 2,
            voters: vec![9],
            conf_ver: 1,
            ..Default::default()
        };
        let r = a
            .set_groups(
                &mut wb,
                META_GROUP_ID,
                SetGroupsCmd {
                    groups: vec![older],
                },
            )
            .expect("apply");
        assert_eq!(r, Ok(ApplyOutput::Done), "an old report changes nothing");
        let newer = GroupRecord {
            group_id: 2,
            voters: vec![1, 3],
            conf_ver: 4,
            ..Default::default()
        };
        let r = a
            .set_groups(
                &mut wb,
                META_GROUP_ID,
                SetGroupsCmd {
                    groups: vec![newer],
                },
            )
            .expect("apply");
        assert_eq!(r, Ok(ApplyOutput::MapEpoch(2)));
        let node = NodeRecord {
            id: 3,
            addr: "127.0.0.1:7103".into(),
            state: NodeState::Up as i32,
            weight: 100,
            ..Default::default()
        };
        let r = a
            .set_node(
                &mut wb,
                META_GROUP_ID,
                SetNodeCmd {
                    node: Some(node.clone()),
                    create: true,
                    expect_state: 0,
                },
            )
            .expect("apply");
        assert_eq!(r, Ok(ApplyOutput::MapEpoch(3)));
        // A state change that expected another state is refused.
        let mut down = node.clone();
        down.state = NodeState::Down as i32;
        let r = a
            .set_node(
                &mut wb,
                META_GROUP_ID,
                SetNodeCmd {
                    node: Some(down),
                    create: false,
                    expect_state: NodeState::Draining as i32,
                },
            )
            .expect("apply");
        assert!(r.is_err(), "{r:?}");
        assert!(a
            .set_node(
                &mut wb,
                5,
                SetNodeCmd {
                    node: Some(NodeRecord::default()),
                    create: false,
                    expect_state: 0,
                }
            )
            .expect("apply")
            .is_err());
        engine.write(wb, false).expect("write");
        let m = read(&engine).expect("read");
        assert_eq!(m.epoch, 3);
        assert_eq!(m.nodes.len(), 3);
        assert_eq!(m.groups[2].voters, vec![1, 3]);
        assert_eq!(m.groups[2].conf_ver, 4);
    }
}
