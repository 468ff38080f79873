//! The cluster's shape as a client needs it: members and their addresses,
//! the number of data groups, replicas per group and chunk size.

use std::collections::BTreeMap;

use raftblk_proto::{placement, NodeStatusResponse};

#[derive(Debug, Clone)]
pub struct Topology {
    pub nodes: BTreeMap<u64, String>,
    pub data_groups: u64,
    pub replicas: u64,
    pub chunk_size_bytes: u64,
}

impl Topology {
    pub fn from_status(s: &NodeStatusResponse) -> Topology {
        Topology {
            nodes: s.nodes.iter().map(|n| (n.id, n.addr.clone())).collect(),
            data_groups: s.data_group_count,
            replicas: s.replicas,
            chunk_size_bytes: s.chunk_size_bytes,
        }
    }

    /// Replica node ids of `group`.
    pub fn replicas_of(&self, group: u64) -> Vec<u64> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        placement::group_replicas(&ids, group, self.replicas)
    }
}
