//! The meta leader's in-memory table of node heartbeats: when each node
//! last reported, its disk space, the groups it hosts, and the state of
//! the groups it leads. Rebuilt from scratch by a new meta leader within a
//! heartbeat interval; bounded by the number of nodes and groups.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use raftblk_proto::{GroupStatus, NodeHeartbeat};

/// One node's last heartbeat.
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub at: Instant,
    pub addr: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub hosted: Vec<u64>,
}

/// A group as its leader last reported it.
#[derive(Debug, Clone)]
pub struct GroupReport {
    pub at: Instant,
    pub leader: u64,
    pub status: GroupStatus,
}

#[derive(Debug, Default)]
pub struct Reports {
    nodes: Mutex<HashMap<u64, NodeReport>>,
    groups: Mutex<HashMap<u64, GroupReport>>,
}

impl Reports {
    /// Records a heartbeat (the caller checked the node is a member);
    /// reports of groups past `data_groups` are ignored.
    pub fn record(&self, hb: &NodeHeartbeat, now: Instant, data_groups: u64) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if nodes.len() < crate::cluster_map::NODES_MAX || nodes.contains_key(&hb.node_id) {
            nodes.insert(
                hb.node_id,
                NodeReport {
                    at: now,
                    addr: hb.addr.clone(),
                    capacity_bytes: hb.capacity_bytes,
                    available_bytes: hb.available_bytes,
                    hosted: hb.hosted.clone(),
                },
            );
        }
        drop(nodes);
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        for g in hb.led.iter().filter(|g| g.group_id <= data_groups) {
            // A newer term, or the same term's newer view, wins.
            let newer = groups
                .get(&g.group_id)
                .is_none_or(|old| (g.term, g.conf_ver) >= (old.status.term, old.status.conf_ver));
            if newer {
                groups.insert(
                    g.group_id,
                    GroupReport {
                        at: now,
                        leader: hb.node_id,
                        status: g.clone(),
                    },
                );
            }
        }
    }

    pub fn node(&self, id: u64) -> Option<NodeReport> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn nodes(&self) -> HashMap<u64, NodeReport> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn groups(&self) -> HashMap<u64, GroupReport> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets everything (this node stopped leading the meta group).
    pub fn clear(&self) {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
