//! Node-wide state shared by the store, the transport, the services and
//! the scrubber: counters (plain atomics: readers tolerate relaxed
//! ordering), the blocks suspected corrupt, and the per-group
//! snapshot-install generations readers use to never see a range half
//! rewritten.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Node-wide counters, reported by the Cluster service.
#[derive(Debug, Default)]
pub struct Counters {
    pub checksum_errors: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub snapshots_applied: AtomicU64,
    pub dropped_messages: AtomicU64,
    pub blocks_repaired: AtomicU64,
}

/// Corrupt blocks remembered for repair at most.
pub const SUSPECTS_MAX: usize = 4096;

/// Blocks found corrupt on this node, waiting for a repair from their
/// group's leader: `(group, volume, block)`, bounded.
#[derive(Debug, Default)]
pub struct Suspects(Mutex<BTreeSet<(u64, u64, u64)>>);

impl Suspects {
    /// Remembers a corrupt block (dropped when the set is full: the
    /// scrubber finds it again on its next pass).
    pub fn note(&self, group: u64, volume: u64, block: u64) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < SUSPECTS_MAX {
            s.insert((group, volume, block));
        }
    }

    /// Takes up to `max` suspects out of the set.
    pub fn take(&self, max: usize) -> Vec<(u64, u64, u64)> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let picked: Vec<_> = s.iter().take(max).copied().collect();
        for p in &picked {
            s.remove(p);
        }
        picked
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per hosted group, a seqlock-style generation around snapshot installs
/// (which rewrite the group's range in several batches): odd while one is
/// under way. A read of one group checks only that group's generation, so
/// an install never refuses reads of the other groups. Groups not hosted
/// here have no generation and are always stable.
#[derive(Debug, Default)]
pub struct InstallGen(HashMap<u64, AtomicU64>);

impl InstallGen {
    /// Generations for `groups`, all stable.
    pub fn new(groups: impl IntoIterator<Item = u64>) -> InstallGen {
        InstallGen(groups.into_iter().map(|g| (g, AtomicU64::new(0))).collect())
    }

    /// An install of `group` begins (the install thread only).
    pub fn begin(&self, group: u64) {
        if let Some(a) = self.0.get(&group) {
            let g = a.fetch_add(1, Ordering::AcqRel);
            debug_assert!(g.is_multiple_of(2), "nested snapshot installs");
        }
    }

    /// The install of `group` ended.
    pub fn end(&self, group: u64) {
        if let Some(a) = self.0.get(&group) {
            let g = a.fetch_add(1, Ordering::AcqRel);
            debug_assert!(!g.is_multiple_of(2), "install end without a begin");
        }
    }

    /// The current generation of `group`; `None` while an install of it
    /// is under way.
    pub fn stable(&self, group: u64) -> Option<u64> {
        let g = self.0.get(&group).map_or(0, |a| a.load(Ordering::Acquire));
        g.is_multiple_of(2).then_some(g)
    }

    /// True if no install of `group` began since `stable(group)` returned
    /// `g`.
    pub fn unchanged(&self, group: u64, g: u64) -> bool {
        self.0.get(&group).map_or(0, |a| a.load(Ordering::Acquire)) == g
    }
}

/// When each peer node was last heard from on its raft stream (any batch,
/// including the empty keepalive a link sends every heartbeat interval
/// when it has nothing else to send): node-level liveness, whatever the
/// groups do. One atomic per member (milliseconds since this node
/// started, 0 = never), so recording costs no lock on the receive path.
#[derive(Debug)]
pub struct PeerLiveness {
    epoch: Instant,
    /// Members are added as they are first heard (nodes join); the write
    /// lock is taken only then.
    last_ms: std::sync::RwLock<HashMap<u64, AtomicU64>>,
}

impl PeerLiveness {
    /// Liveness of the members `nodes`, none heard yet.
    pub fn new(nodes: impl IntoIterator<Item = u64>) -> PeerLiveness {
        PeerLiveness {
            epoch: Instant::now(),
            last_ms: std::sync::RwLock::new(
                nodes.into_iter().map(|n| (n, AtomicU64::new(0))).collect(),
            ),
        }
    }

    pub fn heard(&self, node: u64) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        {
            let map = self.last_ms.read().unwrap_or_else(|p| p.into_inner());
            if let Some(a) = map.get(&node) {
                a.store(ms, Ordering::Relaxed);
                return;
            }
        }
        let mut map = self.last_ms.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= crate::cluster_map::NODES_MAX {
            return;
        }
        map.entry(node)
            .or_insert_with(|| AtomicU64::new(0))
            .store(ms, Ordering::Relaxed);
    }

    /// How long `node` has been silent; None if never heard since start.
    pub fn silent_for(&self, node: u64) -> Option<Duration> {
        let ms = self
            .last_ms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)?
            .load(Ordering::Relaxed);
        (ms != 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(ms - 1))
        })
    }
}
