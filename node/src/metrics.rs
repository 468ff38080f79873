//! The node's Prometheus series: counters and histograms the store, the
//! transport, the services and the scrubber bump as they work (statics in
//! the default registry, as TiKV does), and gauges set at scrape time from
//! the store's group views, the engine and the placement driver
//! (`Scrape::refresh`). Served on `metrics_addr` by `raftblk-metrics`.
//!
//! Label cardinality is bounded: per-node aggregates by default; `peer`
//! is a node id (at most the cluster's nodes); `volume` is a volume id for
//! the first `VOLUME_SERIES_MAX` volumes seen, `other` after; per-group
//! series (`raftblk_group_*`) exist only for groups lagging or in a joint
//! configuration, or for every group with `metrics_per_group = true`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Instant;

use raftblk_metrics::prometheus::{
    self, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts,
};

use crate::store::StoreHandle;

/// Where the endpoint listens (`metrics_addr` with the port the kernel
/// picked for port 0); the status RPC reports it for `raftblk top`.
pub static BOUND_ADDR: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();

/// Volumes with series of their own on one node; later ones count under
/// `volume="other"` (a deleted volume's slot is freed when its blocks are
/// purged here).
pub const VOLUME_SERIES_MAX: usize = 64;

/// A group whose applied index trails its commit index (or, on a leader,
/// a replica whose matched index trails the commit index) by more than
/// this many entries gets per-group series.
pub const LAG_ENTRIES_NOTABLE: u64 = 64;

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    if let Err(e) = prometheus::register(Box::new(c.clone())) {
        // Only a name registered twice fails: a bug, not worth a crash.
        tracing::warn!(error = %e, "metric not registered");
    }
    c
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::with_opts(Opts::new(name, help)).unwrap_or_else(|e| bad_metric(name, e)))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| bad_metric(name, e)),
    )
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::with_opts(Opts::new(name, help)).unwrap_or_else(|e| bad_metric(name, e)))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| bad_metric(name, e)),
    )
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .unwrap_or_else(|e| bad_metric(name, e)),
    )
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .unwrap_or_else(|e| bad_metric(name, e)),
    )
}

/// A metric definition rejected by the library: names and help texts are
/// constants here, so this is a bug caught by the first test run.
fn bad_metric(name: &str, e: prometheus::Error) -> ! {
    panic!("metric {name} is malformed: {e}")
}

/// 100 µs to about 0.2 s, doubling: enough for a p99 per volume at a
/// twelfth of the series of the full latency buckets.
fn volume_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_1, 2.0, 12).unwrap_or_default()
}

fn count_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 2.0, 14).unwrap_or_default()
}

/// Every series the node exports.
pub struct NodeMetrics {
    pub proposals: IntCounter,
    pub proposals_failed: IntCounter,
    pub proposal_seconds: Histogram,
    pub fsyncs: IntCounter,
    pub fsync_seconds: Histogram,
    /// Groups whose log appends share one synced write (group commit).
    pub write_batch_groups: Histogram,
    /// Committed entries of one group applied at once.
    pub apply_batch_entries: Histogram,
    /// Inbox messages handled in one round.
    pub inbox_batch_messages: Histogram,
    pub raft_sent: IntCounterVec,
    pub raft_sent_bytes: IntCounterVec,
    pub raft_received: IntCounterVec,
    pub raft_received_bytes: IntCounterVec,
    pub raft_dropped: IntCounterVec,
    pub snapshots_sent: IntCounter,
    pub snapshot_sent_bytes: IntCounter,
    pub snapshots_received: IntCounter,
    pub snapshot_received_bytes: IntCounter,
    pub snapshots_installed: IntCounter,
    pub scrub_blocks: IntCounter,
    pub scrub_passes: IntCounter,
    pub corrupt_found: IntCounter,
    pub repaired: IntCounter,
    pub block_requests: IntCounterVec,
    pub block_bytes: IntCounterVec,
    pub block_seconds: HistogramVec,
    pub volume_seconds: HistogramVec,
    pub block_errors: IntCounterVec,
    // Set at scrape time.
    pub info: IntGaugeVec,
    pub inbox_depth: IntGauge,
    pub groups: IntGaugeVec,
    pub groups_hibernating: IntGauge,
    pub apply_lag_max: IntGauge,
    pub replica_lag_max: IntGauge,
    pub stored_bytes: IntGauge,
    pub blob_reclaimable_bytes: IntGauge,
    pub disk_capacity_bytes: IntGauge,
    pub disk_available_bytes: IntGauge,
    pub suspects: IntGauge,
    pub group_role: IntGaugeVec,
    pub group_term: IntGaugeVec,
    pub group_commit: IntGaugeVec,
    pub group_applied: IntGaugeVec,
    pub group_apply_lag: IntGaugeVec,
    pub group_replica_lag: IntGaugeVec,
    pub group_voters: IntGaugeVec,
    pub group_joint: IntGaugeVec,
    pub cluster_driver_active: IntGauge,
    pub cluster_degraded: IntGauge,
    pub cluster_moving: IntGauge,
    pub cluster_moves_done: IntGauge,
    pub cluster_groups_reported: IntGauge,
    pub cluster_nodes: IntGaugeVec,
    volumes: RwLock<HashMap<u64, VolumeSeries>>,
}

/// One volume's block I/O counters on this node (pre-resolved labels: the
/// hot path takes a read lock and four atomic adds).
#[derive(Clone)]
struct VolumeSeries {
    reads: IntCounter,
    read_bytes: IntCounter,
    read_seconds: Histogram,
    writes: IntCounter,
    write_bytes: IntCounter,
    write_seconds: Histogram,
}

pub static METRICS: LazyLock<NodeMetrics> = LazyLock::new(NodeMetrics::new);

/// A block I/O operation, as the `op` label spells it.
#[derive(Debug, Clone, Copy)]
pub enum BlockOp {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
}

/// Per operation, its latency histogram and error counter, resolved once
/// (the request path does no label lookup). Touched by the first scrape,
/// so the series exist at 0 before any request: alerts on an increase
/// need them.
static BLOCK_OPS: LazyLock<[(Histogram, IntCounter); 4]> = LazyLock::new(|| {
    ["read", "write", "flush", "discard"].map(|op| {
        (
            METRICS.block_seconds.with_label_values(&[op]),
            METRICS.block_errors.with_label_values(&[op]),
        )
    })
});

impl NodeMetrics {
    fn new() -> NodeMetrics {
        let lat = raftblk_metrics::latency_buckets_seconds;
        NodeMetrics {
            proposals: counter("raftblk_node_proposals_total", "Raft proposals made on this node (writes, discards, catalog and membership changes)."),
            proposals_failed: counter("raftblk_node_proposals_failed_total", "Proposals answered with an error (not leader, timeout, refused)."),
            proposal_seconds: histogram("raftblk_node_proposal_duration_seconds", "Time from a proposal to its apply answer.", lat()),
            fsyncs: counter("raftblk_node_fsyncs_total", "Synced raft log writes (one per group commit)."),
            fsync_seconds: histogram("raftblk_node_fsync_duration_seconds", "Duration of one synced raft log write.", lat()),
            write_batch_groups: histogram("raftblk_node_write_batch_groups", "Groups whose appends share one synced write.", count_buckets()),
            apply_batch_entries: histogram("raftblk_node_apply_batch_entries", "Committed entries of one group applied at once.", count_buckets()),
            inbox_batch_messages: histogram("raftblk_node_inbox_batch_messages", "Store inbox messages handled in one round.", count_buckets()),
            raft_sent: counter_vec("raftblk_node_raft_messages_sent_total", "Raft messages sent, by peer node.", &["peer"]),
            raft_sent_bytes: counter_vec("raftblk_node_raft_message_sent_bytes_total", "Encoded raft message bytes sent, by peer node.", &["peer"]),
            raft_received: counter_vec("raftblk_node_raft_messages_received_total", "Raft messages received, by peer node.", &["peer"]),
            raft_received_bytes: counter_vec("raftblk_node_raft_message_received_bytes_total", "Encoded raft message bytes received, by peer node.", &["peer"]),
            raft_dropped: counter_vec("raftblk_node_raft_messages_dropped_total", "Raft messages dropped (peer queue full or peer unknown), by peer node.", &["peer"]),
            snapshots_sent: counter("raftblk_node_snapshots_sent_total", "Raft snapshots streamed to other replicas."),
            snapshot_sent_bytes: counter("raftblk_node_snapshot_sent_bytes_total", "Bytes of raft snapshots streamed out (rebuild traffic)."),
            snapshots_received: counter("raftblk_node_snapshots_received_total", "Raft snapshots received in full."),
            snapshot_received_bytes: counter("raftblk_node_snapshot_received_bytes_total", "Bytes of raft snapshots received."),
            snapshots_installed: counter("raftblk_node_snapshots_installed_total", "Raft snapshots installed."),
            scrub_blocks: counter("raftblk_node_scrub_blocks_total", "Blocks the scrubber verified."),
            scrub_passes: counter("raftblk_node_scrub_passes_total", "Full scrub passes finished."),
            corrupt_found: counter("raftblk_node_corrupt_blocks_total", "Blocks found with a bad checksum (scrub, reads, snapshots)."),
            repaired: counter("raftblk_node_repaired_blocks_total", "Corrupt blocks rewritten from a good replica."),
            block_requests: counter_vec("raftblk_node_block_requests_total", "Block I/O requests served, by operation and volume id.", &["op", "volume"]),
            block_bytes: counter_vec("raftblk_node_block_bytes_total", "Block I/O bytes served, by operation and volume id.", &["op", "volume"]),
            block_seconds: histogram_vec("raftblk_node_block_request_duration_seconds", "Time to serve one block I/O request, by operation.", &["op"], lat()),
            volume_seconds: histogram_vec("raftblk_node_volume_request_duration_seconds", "Time to serve one successful read or write, by volume id (coarse buckets; the first 64 volumes, then `other`).", &["op", "volume"], volume_buckets()),
            block_errors: counter_vec("raftblk_node_block_request_errors_total", "Block I/O requests answered with an error, by operation.", &["op"]),
            info: gauge_vec("raftblk_node_info", "Always 1: this node's id and version.", &["node_id", "version"]),
            inbox_depth: gauge("raftblk_node_inbox_depth", "Messages waiting in the raft store's inbox."),
            groups: gauge_vec("raftblk_node_groups", "Raft groups hosted here, by role.", &["role"]),
            groups_hibernating: gauge("raftblk_node_groups_hibernating", "Hosted groups idle (not ticking)."),
            apply_lag_max: gauge("raftblk_node_apply_lag_entries_max", "Largest commit index minus applied index over the hosted groups."),
            replica_lag_max: gauge("raftblk_node_replica_lag_entries_max", "On groups led here: largest commit index minus a replica's matched index."),
            stored_bytes: gauge("raftblk_node_stored_bytes", "Bytes RocksDB holds on disk (SST and blob files, both families)."),
            blob_reclaimable_bytes: gauge("raftblk_node_blob_reclaimable_bytes", "Blob file bytes that are garbage, freed by the next collection."),
            disk_capacity_bytes: gauge("raftblk_node_disk_capacity_bytes", "Size of the file system holding data_dir."),
            disk_available_bytes: gauge("raftblk_node_disk_available_bytes", "Space available on the file system holding data_dir."),
            suspects: gauge("raftblk_node_corrupt_blocks_pending", "Corrupt blocks waiting for a repair."),
            group_role: gauge_vec("raftblk_group_leader", "1 if this replica leads the group (notable groups only).", &["group"]),
            group_term: gauge_vec("raftblk_group_term", "The group's raft term (notable groups only).", &["group"]),
            group_commit: gauge_vec("raftblk_group_commit_index", "The group's commit index here (notable groups only).", &["group"]),
            group_applied: gauge_vec("raftblk_group_applied_index", "The group's applied index here (notable groups only).", &["group"]),
            group_apply_lag: gauge_vec("raftblk_group_apply_lag_entries", "Commit index minus applied index (notable groups only).", &["group"]),
            group_replica_lag: gauge_vec("raftblk_group_replica_lag_entries", "On the leader: commit index minus the slowest replica's matched index (notable groups only).", &["group"]),
            group_voters: gauge_vec("raftblk_group_voters", "Voters in the group's configuration (notable groups only).", &["group"]),
            group_joint: gauge_vec("raftblk_group_joint", "1 while the group is in a joint configuration or has a learner (notable groups only).", &["group"]),
            cluster_driver_active: gauge("raftblk_cluster_driver_active", "1 on the node whose placement driver acts (the meta leader): the raftblk_cluster_* series are its view."),
            cluster_degraded: gauge("raftblk_cluster_degraded_groups", "Groups short of fit voters (lost redundancy)."),
            cluster_moving: gauge("raftblk_cluster_moving_groups", "Groups with a learner or in a joint configuration (moves in progress)."),
            cluster_moves_done: gauge("raftblk_cluster_moves_done", "Replica moves finished since this driver began acting."),
            cluster_groups_reported: gauge("raftblk_cluster_groups_reported", "Groups whose leader reported to the driver."),
            cluster_nodes: gauge_vec("raftblk_cluster_nodes", "Nodes in the cluster map, by state.", &["state"]),
            volumes: RwLock::new(HashMap::new()),
        }
    }

    /// Counts one served block request of `bytes` on `volume`, which
    /// took `took`.
    pub fn block_io(&self, write: bool, volume: u64, bytes: u64, took: std::time::Duration) {
        let series = self.volume_series(volume);
        if write {
            series.writes.inc();
            series.write_bytes.inc_by(bytes);
            series.write_seconds.observe(took.as_secs_f64());
        } else {
            series.reads.inc();
            series.read_bytes.inc_by(bytes);
            series.read_seconds.observe(took.as_secs_f64());
        }
    }

    fn volume_series(&self, volume: u64) -> VolumeSeries {
        {
            let all = self.volumes.read().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = all.get(&volume) {
                return s.clone();
            }
            if own_series(&all) >= VOLUME_SERIES_MAX {
                if let Some(s) = all.get(&u64::MAX) {
                    return s.clone();
                }
            }
        }
        let mut all = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        // Past the cap, every further volume shares one cached `other`
        // entry (key u64::MAX, never a volume id), found by the read path
        // below on its next request.
        let full = own_series(&all) >= VOLUME_SERIES_MAX;
        if full {
            if let Some(s) = all.get(&u64::MAX) {
                return s.clone();
            }
        }
        let label = if full {
            "other".to_owned()
        } else {
            volume.to_string()
        };
        let make = |op: &str| {
            (
                self.block_requests.with_label_values(&[op, &label]),
                self.block_bytes.with_label_values(&[op, &label]),
                self.volume_seconds.with_label_values(&[op, &label]),
            )
        };
        let ((reads, read_bytes, read_seconds), (writes, write_bytes, write_seconds)) =
            (make("read"), make("write"));
        let s = VolumeSeries {
            reads,
            read_bytes,
            read_seconds,
            writes,
            write_bytes,
            write_seconds,
        };
        all.insert(if full { u64::MAX } else { volume }, s.clone());
        s
    }
}

/// Volumes with series of their own (the shared `other` entry, key
/// u64::MAX, is not one).
fn own_series(all: &HashMap<u64, VolumeSeries>) -> usize {
    all.len() - usize::from(all.contains_key(&u64::MAX))
}

impl NodeMetrics {
    /// Drops `volume`'s own series (its blocks were purged: it was
    /// deleted), freeing its slot under the cap for another volume.
    pub fn forget_volume(&self, volume: u64) {
        let mut all = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        if all.remove(&volume).is_none() {
            return;
        }
        let label = volume.to_string();
        for op in ["read", "write"] {
            let _ = self.block_requests.remove_label_values(&[op, &label]);
            let _ = self.block_bytes.remove_label_values(&[op, &label]);
            let _ = self.volume_seconds.remove_label_values(&[op, &label]);
        }
    }
}

/// Times one block request: counts it and its duration (by `op`), and an
/// error when `ok` is false.
pub fn observe_block(op: BlockOp, started: Instant, ok: bool) {
    let (seconds, errors) = &BLOCK_OPS[op as usize];
    seconds.observe(started.elapsed().as_secs_f64());
    if !ok {
        errors.inc();
    }
}

/// What the scrape-time refresh reads.
pub struct Scrape {
    pub store: StoreHandle,
    pub placement: Arc<crate::placement::driver::DriverStatus>,
    pub per_group: bool,
}

impl Scrape {
    /// Sets every scrape-time gauge.
    pub fn refresh(&self) {
        let m = &*METRICS;
        LazyLock::force(&BLOCK_OPS);
        let cfg = &self.store.config;
        m.info
            .with_label_values(&[&cfg.node_id.to_string(), env!("CARGO_PKG_VERSION")])
            .set(1);
        m.inbox_depth.set(self.store.inbox_depth() as i64);
        // Counters the node already keeps as atomics (the status RPC
        // reports them too), caught up to their current values.
        let c = &self.store.counters;
        for (counter, now) in [
            (&m.corrupt_found, &c.checksum_errors),
            (&m.repaired, &c.blocks_repaired),
            (&m.snapshots_sent, &c.snapshots_sent),
            (&m.snapshots_installed, &c.snapshots_applied),
        ] {
            let now = now.load(std::sync::atomic::Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(counter.get()));
        }
        m.suspects.set(self.store.suspects.len() as i64);
        self.refresh_groups(m);
        self.refresh_space(m);
        self.refresh_cluster(m);
    }

    fn refresh_groups(&self, m: &NodeMetrics) {
        let views = self.store.views();
        let mut roles: HashMap<&'static str, i64> = HashMap::new();
        for r in ["leader", "follower", "candidate", "pre-candidate"] {
            roles.insert(r, 0);
        }
        let (mut hibernating, mut apply_max, mut replica_max) = (0i64, 0u64, 0u64);
        for vec in [
            &m.group_role,
            &m.group_term,
            &m.group_commit,
            &m.group_applied,
            &m.group_apply_lag,
            &m.group_replica_lag,
            &m.group_voters,
            &m.group_joint,
        ] {
            vec.reset();
        }
        for v in &views {
            *roles.entry(v.role).or_insert(0) += 1;
            hibernating += i64::from(v.hibernating);
            let apply_lag = v.commit_index.saturating_sub(v.applied_index);
            let replica_lag = if v.role == "leader" {
                v.progress
                    .iter()
                    .map(|&(_, matched, _)| v.progress_commit.saturating_sub(matched))
                    .max()
                    .unwrap_or(0)
            } else {
                0
            };
            apply_max = apply_max.max(apply_lag);
            replica_max = replica_max.max(replica_lag);
            let joint = !v.members.learners.is_empty() || !v.members.voters_outgoing.is_empty();
            let notable = self.per_group
                || joint
                || apply_lag > LAG_ENTRIES_NOTABLE
                || replica_lag > LAG_ENTRIES_NOTABLE;
            if !notable {
                continue;
            }
            let g = v.group.to_string();
            let l = [g.as_str()];
            m.group_role
                .with_label_values(&l)
                .set(i64::from(v.role == "leader"));
            m.group_term.with_label_values(&l).set(v.term as i64);
            m.group_commit
                .with_label_values(&l)
                .set(v.commit_index as i64);
            m.group_applied
                .with_label_values(&l)
                .set(v.applied_index as i64);
            m.group_apply_lag
                .with_label_values(&l)
                .set(apply_lag as i64);
            m.group_replica_lag
                .with_label_values(&l)
                .set(replica_lag as i64);
            m.group_voters
                .with_label_values(&l)
                .set(v.members.voters.len() as i64);
            m.group_joint.with_label_values(&l).set(i64::from(joint));
        }
        for (role, n) in roles {
            m.groups.with_label_values(&[role]).set(n);
        }
        m.groups_hibernating.set(hibernating);
        m.apply_lag_max.set(apply_max as i64);
        m.replica_lag_max.set(replica_max as i64);
    }

    fn refresh_space(&self, m: &NodeMetrics) {
        let engine = &self.store.engine;
        let db = engine.db();
        let mut stored = 0u64;
        let mut garbage = 0u64;
        for cf in [engine.raft_cf(), engine.kv_cf()] {
            for prop in [
                "rocksdb.total-sst-files-size",
                "rocksdb.live-blob-file-size",
            ] {
                stored += db
                    .property_int_value_cf(cf, prop)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
            garbage += db
                .property_int_value_cf(cf, "rocksdb.live-blob-file-garbage-size")
                .ok()
                .flatten()
                .unwrap_or(0);
        }
        m.stored_bytes.set(stored as i64);
        m.blob_reclaimable_bytes.set(garbage as i64);
        if let Some((total, avail)) = crate::map_sync::disk_space(&self.store.config.data_dir) {
            m.disk_capacity_bytes.set(total as i64);
            m.disk_available_bytes.set(avail as i64);
        }
    }

    fn refresh_cluster(&self, m: &NodeMetrics) {
        let p = self.placement.get();
        m.cluster_driver_active.set(i64::from(p.active));
        for g in [
            &m.cluster_degraded,
            &m.cluster_moving,
            &m.cluster_moves_done,
            &m.cluster_groups_reported,
        ] {
            g.set(0);
        }
        if p.active {
            m.cluster_degraded.set(p.degraded_groups as i64);
            m.cluster_moving.set(p.moves_in_progress as i64);
            m.cluster_moves_done.set(p.moves_done as i64);
            m.cluster_groups_reported.set(p.groups_reported as i64);
        }
        m.cluster_nodes.reset();
        let map = self.store.book.map().filter(|_| p.active);
        if let Some(map) = map {
            let mut by_state: HashMap<&'static str, i64> = HashMap::new();
            for n in &map.nodes {
                let state = match raftblk_proto::NodeState::try_from(n.state) {
                    Ok(raftblk_proto::NodeState::Up) => "up",
                    Ok(raftblk_proto::NodeState::Down) => "down",
                    Ok(raftblk_proto::NodeState::Out) => "out",
                    Ok(raftblk_proto::NodeState::Draining) => "draining",
                    Ok(raftblk_proto::NodeState::Removed) => "removed",
                    _ => "unknown",
                };
                *by_state.entry(state).or_insert(0) += 1;
            }
            for (state, n) in by_state {
                m.cluster_nodes.with_label_values(&[state]).set(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftblk_metrics::prometheus::core::Collector as _;

    fn labels(m: &NodeMetrics) -> Vec<String> {
        let mut out: Vec<String> = m
            .block_requests
            .collect()
            .iter()
            .flat_map(|f| f.get_metric().iter())
            .filter_map(|s| {
                s.get_label()
                    .iter()
                    .find(|l| l.name() == "volume")
                    .map(|l| l.value().to_owned())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn a_deleted_volume_frees_its_series_slot() {
        let m = NodeMetrics::new();
        let took = std::time::Duration::from_micros(100);
        for v in 1..=VOLUME_SERIES_MAX as u64 + 2 {
            m.block_io(true, v, 4096, took);
        }
        let seen = labels(&m);
        assert!(seen.contains(&"other".to_owned()));
        assert!(!seen.contains(&(VOLUME_SERIES_MAX as u64 + 1).to_string()));
        m.forget_volume(1);
        assert!(!labels(&m).contains(&"1".to_owned()));
        // The freed slot goes to the next new volume.
        m.block_io(false, 1000, 4096, took);
        assert!(labels(&m).contains(&"1000".to_owned()));
        m.block_io(false, 1001, 4096, took);
        assert!(!labels(&m).contains(&"1001".to_owned()));
    }
}
