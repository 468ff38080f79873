//! The cluster's shape as a client needs it: members and their addresses,
//! the number of data groups, replicas per group and chunk size, and each
//! group's replicas from the cluster map (replicas move: the map follows
//! the groups, and a client refreshes it when a node says it no longer has
//! a replica).

use std::collections::BTreeMap;

use raftblk_proto::{placement, ClusterMap, NodeState, NodeStatusResponse};

#[derive(Debug, Clone)]
pub struct Topology {
    pub nodes: BTreeMap<u64, String>,
    pub data_groups: u64,
    pub replicas: u64,
    pub chunk_size_bytes: u64,
    /// Replicas of each group per the map (empty: not known yet).
    pub groups: BTreeMap<u64, Vec<u64>>,
    /// Epoch of the map taken (0: none).
    pub map_epoch: u64,
}

impl Topology {
    pub fn from_status(s: &NodeStatusResponse) -> Topology {
        Topology {
            nodes: s.nodes.iter().map(|n| (n.id, n.addr.clone())).collect(),
            data_groups: s.data_group_count,
            replicas: s.replicas,
            chunk_size_bytes: s.chunk_size_bytes,
            groups: BTreeMap::new(),
            map_epoch: 0,
        }
    }

    /// Takes a newer map's members and group replicas.
    pub fn apply_map(&mut self, map: &ClusterMap) {
        if map.epoch <= self.map_epoch {
            return;
        }
        self.map_epoch = map.epoch;
        self.nodes = map
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Removed as i32)
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        self.groups = map
            .groups
            .iter()
            .map(|g| {
                // Voters first: one of them leads.
                let mut r = g.voters.clone();
                for n in g.voters_outgoing.iter().chain(&g.learners) {
                    if !r.contains(n) {
                        r.push(*n);
                    }
                }
                (g.group_id, r)
            })
            .collect();
    }

    /// Replica node ids of `group`: from the map, else the bootstrap
    /// placement.
    pub fn replicas_of(&self, group: u64) -> Vec<u64> {
        match self.groups.get(&group) {
            Some(r) if !r.is_empty() => r.clone(),
            _ => {
                let ids: Vec<u64> = self.nodes.keys().copied().collect();
                placement::group_replicas(&ids, group, self.replicas)
            }
        }
    }
}
