//! Node configuration: the TOML file `raftblk-node --config FILE` reads,
//! validated at load with messages that name the offending key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use raftblk_tls::TlsConfig;

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole node config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id: one of `cluster.nodes` for a node that bootstraps a
    /// new cluster, any unused id for a node that joins one through
    /// `seeds`.
    pub node_id: u64,
    /// Address the gRPC server binds, e.g. `127.0.0.1:7101`; other nodes
    /// and clients reach this node there.
    pub listen_addr: String,
    /// Directory that holds the node's RocksDB and snapshot staging files.
    pub data_dir: PathBuf,
    /// Addresses of running members to join through (a node that is not
    /// in `cluster.nodes`); also used to find the cluster after a restart
    /// if no member it knew answers.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// This node's failure domain (host, rack, ...) when it joins.
    #[serde(default)]
    pub failure_domain: Option<String>,
    /// This node's weight when it joins (share of replicas; default 100).
    #[serde(default)]
    pub weight: Option<u64>,
    /// A new cluster's bootstrap parameters and first nodes; every
    /// bootstrap node carries the same section. Absent on joining nodes:
    /// they learn the cluster from `seeds`.
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub placement: PlacementConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g.
    /// `127.0.0.1:9101`; absent: no endpoint. Keep it on loopback or a
    /// management network: it needs no credentials.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Export `raftblk_group_*` series for every hosted group, not only
    /// for lagging or reconfiguring ones (a node may host thousands).
    #[serde(default)]
    pub metrics_per_group: bool,
    /// Mutual TLS (see `tls`); required, even if only to turn it off.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// Cluster-wide parameters, fixed at bootstrap: every bootstrap node must
/// carry the same values. On a joining node they are filled in at start
/// from the cluster map.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Number of data raft groups (like Ceph PGs); never changes.
    pub data_groups: u64,
    /// Replicas per data group.
    pub replicas: u64,
    /// Chunk size; a power of two, at least 64 KiB.
    pub chunk_size_bytes: u64,
    /// The nodes that bootstrap the cluster (later nodes join by `seeds`).
    pub nodes: Vec<NodeEntry>,
    /// Cluster flags the map starts with: `noout`, `norecover`,
    /// `norebalance` (see `raftblk cluster flag`).
    pub flags: Vec<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            data_groups: 0,
            replicas: default_replicas(),
            chunk_size_bytes: default_chunk_size_bytes(),
            nodes: Vec::new(),
            flags: Vec::new(),
        }
    }
}

/// One bootstrap node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub id: u64,
    /// Address other nodes and clients use to reach it.
    pub addr: String,
    #[serde(default)]
    pub failure_domain: Option<String>,
    #[serde(default)]
    pub weight: Option<u64>,
}

/// How the cluster watches its nodes and moves replicas (read by whichever
/// node leads the meta group).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// How often each node reports to the meta leader.
    pub heartbeat_interval_ms: u64,
    /// A node that has not reported for this long is marked down.
    pub node_down_after_ms: u64,
    /// A node down for this long is marked out and its replicas are
    /// re-created elsewhere (Ceph's `mon_osd_down_out_interval`).
    pub down_out_secs: u64,
    /// Replica moves under way at once, per node and in the cluster.
    pub moves_per_node_max: u64,
    pub moves_max: u64,
    /// Snapshot bytes per second each node sends (0: unlimited): the
    /// rebuild throttle that keeps guests' latency.
    pub snapshot_bytes_per_sec: u64,
    /// A snapshot transfer that moves no bytes for this long is abandoned
    /// (raft sends it again); there is no bound on its total time, so a
    /// group of any size rebuilds at any throttle.
    pub snapshot_stall_secs: u64,
    /// A learner whose matched log index has not moved for this long (its
    /// snapshot is not going through, or the log it needs is gone) is
    /// removed with a log line, and the move is planned afresh.
    pub learner_stall_secs: u64,
    /// No new replicas go to a node whose disk is fuller than this.
    pub nearfull_ratio: f64,
    /// Writes to groups with a replica on a node whose disk is fuller than
    /// this are refused (NO_SPACE) until space is freed; 1.0 turns it off
    /// (a node whose disk fills up then stops, fail-stop).
    pub full_ratio: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            heartbeat_interval_ms: 1000,
            node_down_after_ms: 10_000,
            down_out_secs: 600,
            moves_per_node_max: 2,
            moves_max: 16,
            snapshot_bytes_per_sec: 64 * 1024 * 1024,
            snapshot_stall_secs: 60,
            learner_stall_secs: 1800,
            nearfull_ratio: 0.85,
            full_ratio: 0.95,
        }
    }
}

/// Raft timing and log management.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub tick_interval_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact a group's log once it holds this many applied entries.
    pub log_compact_threshold_entries: u64,
    /// Applied entries kept after compaction, for followers slightly behind.
    pub log_retain_entries: u64,
    /// Compact a group's log once its entries hold this many bytes.
    pub log_compact_threshold_bytes: u64,
    /// Upper bound of one snapshot piece on the wire.
    pub snapshot_piece_bytes: u64,
    pub max_inflight_msgs: usize,
    pub max_size_per_msg_bytes: u64,
}

/// Bounds on queues, batches and waits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest read or write one block RPC may carry.
    pub io_bytes_max: u64,
    /// Capacity of the raft store's inbox.
    pub inbox_capacity: usize,
    /// Raft messages queued per peer before new ones are dropped.
    pub peer_queue_capacity: usize,
    /// Raft messages (and bytes) per transport batch.
    pub transport_batch_msgs_max: usize,
    pub transport_batch_bytes_max: usize,
    /// How long a proposal or read may wait inside the store.
    pub request_timeout_ms: u64,
    /// Volume size limit.
    pub volume_size_bytes_max: u64,
    /// Blocks the background scrubber verifies per second (0: no scrub).
    pub scrub_blocks_per_sec: u64,
    /// Pause between two full scrub passes.
    pub scrub_interval_secs: u64,
    /// How long a node may use a cached volume record (size, existence)
    /// for block I/O before re-reading it from the meta group: the bound
    /// on how long a deleted volume still accepts I/O.
    pub volume_cache_ttl_ms: u64,
    /// Threads that serve gRPC (client I/O, lease reads, the raft
    /// transport); 0: one per core. Nodes that share a host should split
    /// its cores between them: every extra thread costs context switches.
    pub worker_threads: usize,
    /// Memory the node's memtables, entry caches and block cache share
    /// (see `engine::MemoryShares`); requests in flight come on top.
    pub memory_budget_bytes: u64,
}

/// Bounds of `limits.memory_budget_bytes`.
pub const MEMORY_BUDGET_BYTES_MIN: u64 = 128 << 20;
pub const MEMORY_BUDGET_BYTES_MAX: u64 = 1 << 40;

/// Upper bound of `limits.worker_threads`.
pub const WORKER_THREADS_MAX: usize = 256;

/// Names of the cluster flags.
pub const FLAGS: [&str; 3] = ["noout", "norecover", "norebalance"];

fn default_replicas() -> u64 {
    3
}
fn default_chunk_size_bytes() -> u64 {
    4 * 1024 * 1024
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            tick_interval_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            log_compact_threshold_entries: 4096,
            log_retain_entries: 512,
            log_compact_threshold_bytes: 8 * 1024 * 1024,
            snapshot_piece_bytes: 1024 * 1024,
            max_inflight_msgs: 256,
            max_size_per_msg_bytes: 1024 * 1024,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            io_bytes_max: 1024 * 1024,
            inbox_capacity: 8192,
            peer_queue_capacity: 8192,
            transport_batch_msgs_max: 256,
            transport_batch_bytes_max: 8 * 1024 * 1024,
            request_timeout_ms: 5000,
            volume_size_bytes_max: 1 << 50,
            scrub_blocks_per_sec: 2048,
            scrub_interval_secs: 3600,
            volume_cache_ttl_ms: 2000,
            worker_threads: 0,
            memory_budget_bytes: crate::engine::MEMORY_BUDGET_BYTES_DEFAULT,
        }
    }
}

impl NodeConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.node_id == 0 || self.node_id > crate::membership::NODE_ID_MAX {
            return Err(bad(
                "node_id",
                format!(
                    "{} is not in 1..={} (a replica's raft id is its node id and incarnation)",
                    self.node_id,
                    crate::membership::NODE_ID_MAX
                ),
            ));
        }
        self.listen_addr
            .parse::<SocketAddr>()
            .map_err(|e| bad("listen_addr", format!("`{}`: {e}", self.listen_addr)))?;
        match &self.tls {
            None => {
                return Err(bad(
                    "tls",
                    "missing: add a [tls] section with ca_file, cert_file and key_file (`raftblk certs init DIR` makes them), or insecure_plaintext = true to run without TLS".into(),
                ))
            }
            Some(t) => t.validate().map_err(|(k, m)| bad(&k, m))?,
        }
        if let Some(a) = &self.metrics_addr {
            a.parse::<SocketAddr>()
                .map_err(|e| bad("metrics_addr", format!("`{a}`: {e}")))?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty".into()));
        }
        for (i, seed) in self.seeds.iter().enumerate() {
            seed.parse::<SocketAddr>()
                .map_err(|e| bad(&format!("seeds[{i}]"), format!("`{seed}`: {e}")))?;
        }
        if self.weight.is_some_and(|w| w > 1_000_000) {
            return Err(bad("weight", "must be at most 1000000".into()));
        }
        self.validate_placement(path)?;
        let c = &self.cluster;
        if c.nodes.is_empty() {
            // A node joining an existing cluster.
            if self.seeds.is_empty() {
                return Err(bad(
                    "seeds",
                    "a node that does not bootstrap a new cluster (no cluster.nodes) must name seeds to join through".into(),
                ));
            }
            if c.data_groups != 0 {
                return Err(bad(
                    "cluster.data_groups",
                    "set only with cluster.nodes, when bootstrapping a new cluster; a joining node learns it from the cluster".into(),
                ));
            }
            return self.validate_raft_and_limits(path);
        }
        for (i, f) in c.flags.iter().enumerate() {
            if !FLAGS.contains(&f.as_str()) {
                return Err(bad(
                    &format!("cluster.flags[{i}]"),
                    format!("unknown flag `{f}` (known: {})", FLAGS.join(", ")),
                ));
            }
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, n) in c.nodes.iter().enumerate() {
            if n.id == 0 || n.id > crate::membership::NODE_ID_MAX {
                return Err(bad(
                    &format!("cluster.nodes[{i}].id"),
                    format!("{} is not in 1..={}", n.id, crate::membership::NODE_ID_MAX),
                ));
            }
            if !ids.insert(n.id) {
                return Err(bad(
                    &format!("cluster.nodes[{i}].id"),
                    format!("duplicate node id {}", n.id),
                ));
            }
            n.addr.parse::<SocketAddr>().map_err(|e| {
                bad(
                    &format!("cluster.nodes[{i}].addr"),
                    format!("`{}`: {e}", n.addr),
                )
            })?;
            if !addrs.insert(n.addr.clone()) {
                return Err(bad(
                    &format!("cluster.nodes[{i}].addr"),
                    format!("duplicate address {}", n.addr),
                ));
            }
        }
        if !ids.contains(&self.node_id) {
            return Err(bad(
                "node_id",
                format!(
                    "{} is not listed in cluster.nodes (a node joining an existing cluster names seeds and no [cluster] section)",
                    self.node_id
                ),
            ));
        }
        if c.data_groups == 0 || c.data_groups > 4096 {
            return Err(bad(
                "cluster.data_groups",
                format!("{} is not in 1..=4096", c.data_groups),
            ));
        }
        if c.replicas == 0 || c.replicas > c.nodes.len() as u64 {
            return Err(bad(
                "cluster.replicas",
                format!(
                    "{} is not in 1..={} (the number of nodes)",
                    c.replicas,
                    c.nodes.len()
                ),
            ));
        }
        if !c.chunk_size_bytes.is_power_of_two()
            || c.chunk_size_bytes < 64 * 1024
            || c.chunk_size_bytes > 1 << 30
        {
            return Err(bad(
                "cluster.chunk_size_bytes",
                format!(
                    "{} must be a power of two between 64 KiB and 1 GiB",
                    c.chunk_size_bytes
                ),
            ));
        }
        self.validate_raft_and_limits(path)
    }

    fn validate_placement(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let p = &self.placement;
        if p.heartbeat_interval_ms < 50 || p.heartbeat_interval_ms > 60_000 {
            return Err(bad(
                "placement.heartbeat_interval_ms",
                format!("{} is not in 50..=60000", p.heartbeat_interval_ms),
            ));
        }
        if p.node_down_after_ms < 2 * p.heartbeat_interval_ms {
            return Err(bad(
                "placement.node_down_after_ms",
                format!(
                    "{} must be at least twice placement.heartbeat_interval_ms ({})",
                    p.node_down_after_ms, p.heartbeat_interval_ms
                ),
            ));
        }
        if !(1..=3600).contains(&p.snapshot_stall_secs) {
            return Err(bad(
                "placement.snapshot_stall_secs",
                format!("{} is not in 1..=3600", p.snapshot_stall_secs),
            ));
        }
        if p.learner_stall_secs < 2 * p.snapshot_stall_secs || p.learner_stall_secs > 86_400 {
            return Err(bad(
                "placement.learner_stall_secs",
                format!(
                    "{} must be in 2 x placement.snapshot_stall_secs ({})..=86400",
                    p.learner_stall_secs, p.snapshot_stall_secs
                ),
            ));
        }
        if p.moves_per_node_max == 0 || p.moves_max == 0 {
            return Err(bad(
                "placement.moves_per_node_max",
                "moves_per_node_max and moves_max must be at least 1".into(),
            ));
        }
        if !(p.nearfull_ratio > 0.0 && p.nearfull_ratio <= p.full_ratio && p.full_ratio <= 1.0) {
            return Err(bad(
                "placement.nearfull_ratio",
                format!(
                    "need 0 < nearfull_ratio ({}) <= full_ratio ({}) <= 1",
                    p.nearfull_ratio, p.full_ratio
                ),
            ));
        }
        Ok(())
    }

    fn validate_raft_and_limits(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let r = &self.raft;
        if r.tick_interval_ms == 0 || r.tick_interval_ms > 10_000 {
            return Err(bad(
                "raft.tick_interval_ms",
                format!("{} is not in 1..=10000", r.tick_interval_ms),
            ));
        }
        if r.heartbeat_ticks == 0 || r.election_ticks <= r.heartbeat_ticks {
            return Err(bad(
                "raft.election_ticks",
                format!(
                    "{} must exceed raft.heartbeat_ticks ({})",
                    r.election_ticks, r.heartbeat_ticks
                ),
            ));
        }
        // Leader leases last 0.8 x the election timeout from the moment a
        // read round is issued; with check_quorum a follower refuses votes
        // only for (election_ticks - 1) ticks of real time after it last
        // heard from the leader (its first tick may come at once). Keep a
        // quarter tick to spare for timer jitter.
        let lease_ms = r.tick_interval_ms * r.election_ticks as u64 * 4 / 5;
        let guaranteed_ms = r.tick_interval_ms * (r.election_ticks as u64).saturating_sub(1);
        if lease_ms + r.tick_interval_ms / 4 > guaranteed_ms {
            return Err(bad(
                "raft.election_ticks",
                format!(
                    "{} is too small for leader leases: a lease lasts 0.8 x election_ticks x tick_interval_ms = {lease_ms} ms, which must stay a quarter tick below the {guaranteed_ms} ms ((election_ticks - 1) x tick_interval_ms) that check_quorum guarantees; use at least 7",
                    r.election_ticks
                ),
            ));
        }
        if r.log_compact_threshold_entries == 0
            || r.log_retain_entries >= r.log_compact_threshold_entries
        {
            return Err(bad(
                "raft.log_retain_entries",
                format!(
                    "{} must be below raft.log_compact_threshold_entries ({})",
                    r.log_retain_entries, r.log_compact_threshold_entries
                ),
            ));
        }
        if r.log_compact_threshold_bytes < 1024 * 1024 {
            return Err(bad(
                "raft.log_compact_threshold_bytes",
                format!("{} is below 1 MiB", r.log_compact_threshold_bytes),
            ));
        }
        if r.snapshot_piece_bytes < 4096 || r.snapshot_piece_bytes > 8 * 1024 * 1024 {
            return Err(bad(
                "raft.snapshot_piece_bytes",
                format!("{} is not in 4096..=8388608", r.snapshot_piece_bytes),
            ));
        }
        if r.max_inflight_msgs == 0 {
            return Err(bad("raft.max_inflight_msgs", "must be at least 1".into()));
        }
        let l = &self.limits;
        if l.io_bytes_max < 4096
            || !l.io_bytes_max.is_multiple_of(4096)
            || l.io_bytes_max > 4 * 1024 * 1024
        {
            return Err(bad(
                "limits.io_bytes_max",
                format!(
                    "{} must be a multiple of 4096 in 4096..=4194304",
                    l.io_bytes_max
                ),
            ));
        }
        for (key, v) in [
            ("limits.inbox_capacity", l.inbox_capacity),
            ("limits.peer_queue_capacity", l.peer_queue_capacity),
            (
                "limits.transport_batch_msgs_max",
                l.transport_batch_msgs_max,
            ),
            (
                "limits.transport_batch_bytes_max",
                l.transport_batch_bytes_max,
            ),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if l.request_timeout_ms < 100 {
            return Err(bad(
                "limits.request_timeout_ms",
                format!("{} is below 100", l.request_timeout_ms),
            ));
        }
        if l.volume_cache_ttl_ms < 10 || l.volume_cache_ttl_ms > 600_000 {
            return Err(bad(
                "limits.volume_cache_ttl_ms",
                format!("{} is not in 10..=600000", l.volume_cache_ttl_ms),
            ));
        }
        if l.worker_threads > WORKER_THREADS_MAX {
            return Err(bad(
                "limits.worker_threads",
                format!("{} is not in 0..={WORKER_THREADS_MAX}", l.worker_threads),
            ));
        }
        if !(MEMORY_BUDGET_BYTES_MIN..=MEMORY_BUDGET_BYTES_MAX).contains(&l.memory_budget_bytes) {
            return Err(bad(
                "limits.memory_budget_bytes",
                format!(
                    "{} is not in {MEMORY_BUDGET_BYTES_MIN}..={MEMORY_BUDGET_BYTES_MAX} (128 MiB to 1 TiB)",
                    l.memory_budget_bytes
                ),
            ));
        }
        if l.scrub_interval_secs == 0 {
            return Err(bad(
                "limits.scrub_interval_secs",
                "must be at least 1".into(),
            ));
        }
        if l.volume_size_bytes_max == 0 || !l.volume_size_bytes_max.is_multiple_of(512) {
            return Err(bad(
                "limits.volume_size_bytes_max",
                "must be a positive multiple of 512".into(),
            ));
        }
        Ok(())
    }

    /// True if this node bootstraps a new cluster (else it joins one).
    pub fn bootstraps(&self) -> bool {
        self.cluster.nodes.iter().any(|n| n.id == self.node_id)
    }

    /// Address of bootstrap node `id`.
    pub fn node_addr(&self, id: u64) -> Option<&str> {
        self.cluster
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.addr.as_str())
    }

    /// Ids of the bootstrap nodes.
    pub fn node_ids(&self) -> Vec<u64> {
        self.cluster.nodes.iter().map(|n| n.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 1
listen_addr = "127.0.0.1:7101"
data_dir = "/tmp/x"
tls = { insecure_plaintext = true }
[cluster]
data_groups = 8
[[cluster.nodes]]
id = 1
addr = "127.0.0.1:7101"
[[cluster.nodes]]
id = 2
addr = "127.0.0.1:7102"
[[cluster.nodes]]
id = 3
addr = "127.0.0.1:7103"
"#;

    fn err(text: &str) -> String {
        match NodeConfig::parse(text, Path::new("t.toml")) {
            Ok(_) => panic!("accepted bad config"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = NodeConfig::parse(GOOD, Path::new("t.toml")).expect("valid");
        assert_eq!(c.cluster.replicas, 3);
        assert_eq!(c.cluster.chunk_size_bytes, 4 << 20);
        assert_eq!(c.raft.election_ticks, 10);
        assert_eq!(c.node_addr(2), Some("127.0.0.1:7102"));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&GOOD.replace("node_id = 1", "node_id = 9")).contains("`node_id`"));
        assert!(err(&GOOD.replace("data_groups = 8", "data_groups = 0"))
            .contains("cluster.data_groups"));
        assert!(
            err(&GOOD.replace("\"127.0.0.1:7102\"", "\"nope\"")).contains("cluster.nodes[1].addr")
        );
        assert!(
            err(&GOOD.replace("data_groups = 8", "data_groups = 8\nreplicas = 4"))
                .contains("cluster.replicas")
        );
        assert!(err(&GOOD.replace(
            "data_groups = 8",
            "data_groups = 8\nchunk_size_bytes = 1000"
        ))
        .contains("cluster.chunk_size_bytes"));
        let unknown = err(&GOOD.replace("node_id = 1", "node_id = 1\nbogus = 3"));
        assert!(unknown.contains("bogus"), "{unknown}");
        let short = err(&format!(
            "{GOOD}\n[raft]\nelection_ticks = 3\nheartbeat_ticks = 1\n"
        ));
        assert!(
            short.contains("`raft.election_ticks`") && short.contains("leader leases"),
            "{short}"
        );
        let six = err(&format!(
            "{GOOD}\n[raft]\nelection_ticks = 6\nheartbeat_ticks = 1\n"
        ));
        assert!(six.contains("use at least 7"), "{six}");
        let seven = format!("{GOOD}\n[raft]\nelection_ticks = 7\nheartbeat_ticks = 1\n");
        assert!(NodeConfig::parse(&seven, Path::new("t.toml")).is_ok());
        let typed = err(&GOOD.replace("data_groups = 8", "data_groups = \"eight\""));
        assert!(typed.contains("data_groups"), "{typed}");
        let m = err(&format!("{GOOD}\n[limits]\nmemory_budget_bytes = 1000\n"));
        assert!(m.contains("limits.memory_budget_bytes"), "{m}");
        let p = err(&format!("{GOOD}\n[placement]\nnearfull_ratio = 1.5\n"));
        assert!(p.contains("placement.nearfull_ratio"), "{p}");
    }

    #[test]
    fn a_joining_node_names_seeds() {
        let join = "node_id = 4\nlisten_addr = \"127.0.0.1:7104\"\ndata_dir = \"/tmp/x\"\ntls = { insecure_plaintext = true }\nseeds = [\"127.0.0.1:7101\"]\n";
        let c = NodeConfig::parse(join, Path::new("t.toml")).expect("valid");
        assert!(!c.bootstraps());
        assert_eq!(c.seeds.len(), 1);
        let none = err("node_id = 4\nlisten_addr = \"127.0.0.1:7104\"\ndata_dir = \"/tmp/x\"\ntls = { insecure_plaintext = true }\n");
        assert!(none.contains("`seeds`"), "{none}");
        let badseed = err(&join.replace("127.0.0.1:7101", "nowhere"));
        assert!(badseed.contains("seeds[0]"), "{badseed}");
        let both = err(&format!("{join}[cluster]\ndata_groups = 4\n"));
        assert!(both.contains("cluster.data_groups"), "{both}");
    }
}
