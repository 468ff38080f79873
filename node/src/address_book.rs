//! Where every member node can be reached, and the last cluster map this
//! node saw: seeded from the bootstrap nodes of the config and from the
//! map persisted at the last run, then kept up to date from the meta group
//! (see `map_sync`). The transport, leader hints and meta lookups read it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use raftblk_proto::{ClusterMap, NodeState};

/// Node id → address, and the states the map gives them.
#[derive(Debug, Default)]
pub struct AddressBook {
    inner: RwLock<Book>,
}

#[derive(Debug, Default, Clone)]
struct Book {
    addrs: BTreeMap<u64, String>,
    /// Removed nodes: never talked to.
    removed: Vec<u64>,
    epoch: u64,
    map: Option<Arc<ClusterMap>>,
}

impl AddressBook {
    pub fn new(nodes: impl IntoIterator<Item = (u64, String)>) -> AddressBook {
        AddressBook {
            inner: RwLock::new(Book {
                addrs: nodes.into_iter().collect(),
                removed: Vec::new(),
                epoch: 0,
                map: None,
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Book> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Address of node `id`, if known (and not removed).
    pub fn addr(&self, id: u64) -> Option<String> {
        self.read().addrs.get(&id).cloned()
    }

    /// Every known node, in id order.
    pub fn nodes(&self) -> Vec<(u64, String)> {
        self.read()
            .addrs
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// True if `id` was removed from the cluster.
    pub fn is_removed(&self, id: u64) -> bool {
        self.read().removed.contains(&id)
    }

    /// The epoch of the map the book was last updated from.
    pub fn epoch(&self) -> u64 {
        self.read().epoch
    }

    /// Takes the members of `map` if it is newer than what the book has.
    /// Returns true if anything changed.
    pub fn update(&self, map: &ClusterMap) -> bool {
        let mut b = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if map.epoch <= b.epoch {
            return false;
        }
        let mut addrs = BTreeMap::new();
        let mut removed = Vec::new();
        for n in &map.nodes {
            if n.state == NodeState::Removed as i32 {
                removed.push(n.id);
            } else {
                addrs.insert(n.id, n.addr.clone());
            }
        }
        let changed = addrs != b.addrs || removed != b.removed;
        *b = Book {
            addrs,
            removed,
            epoch: map.epoch,
            map: Some(Arc::new(map.clone())),
        };
        changed
    }

    /// The last map taken, if any.
    pub fn map(&self) -> Option<Arc<ClusterMap>> {
        self.read().map.clone()
    }

    /// Voters of the meta group per the last map (empty if none yet).
    pub fn meta_voters(&self) -> Vec<u64> {
        self.read()
            .map
            .as_ref()
            .and_then(|m| {
                m.groups
                    .iter()
                    .find(|g| g.group_id == raftblk_proto::META_GROUP_ID)
                    .map(|g| {
                        let mut v = g.voters.clone();
                        v.extend_from_slice(&g.voters_outgoing);
                        v.sort_unstable();
                        v.dedup();
                        v
                    })
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftblk_proto::NodeRecord;

    #[test]
    fn newer_maps_replace_the_book() {
        let book = AddressBook::new([(1, "a:1".to_string())]);
        let rec = |id, addr: &str, state: NodeState| NodeRecord {
            id,
            addr: addr.into(),
            state: state as i32,
            ..Default::default()
        };
        let map = ClusterMap {
            epoch: 3,
            nodes: vec![
                rec(1, "a:1", NodeState::Up),
                rec(2, "b:2", NodeState::Down),
                rec(3, "c:3", NodeState::Removed),
            ],
            ..Default::default()
        };
        assert!(book.update(&map));
        assert_eq!(book.addr(2).as_deref(), Some("b:2"));
        assert_eq!(book.addr(3), None);
        assert!(book.is_removed(3));
        let older = ClusterMap {
            epoch: 2,
            ..Default::default()
        };
        assert!(!book.update(&older), "an older map changes nothing");
        assert_eq!(book.nodes().len(), 2);
    }
}
