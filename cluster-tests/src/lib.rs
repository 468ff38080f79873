//! Test harness: a raftblk cluster of real `raftblk-node` processes on
//! loopback, each with its own config and data directory in a temporary
//! directory, that tests can kill, stop, restart and inspect.
//!
//! Every wait here is bounded in time; dropping the cluster kills every
//! process it started (by PID) and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod guest;
pub mod history;
pub mod metrics;
pub mod nbd;
pub mod netns;
pub mod tls;
pub mod vm;
pub mod workload;

use anyhow::{bail, Context as _};
use raftblk_client::{Client, ClientOptions};
use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::{
    ChangePeersRequest, ChangePeersResponse, Empty, ErrorCode, GroupDigestRequest, GroupStatus,
    NodeStatusResponse, PeerChange, PeerChangeKind, TransferLeaderRequest,
};

/// Shape and tuning of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub data_groups: u64,
    pub replicas: u64,
    pub chunk_size_bytes: u64,
    pub tick_interval_ms: u64,
    pub election_ticks: usize,
    pub log_compact_threshold_entries: u64,
    pub log_retain_entries: u64,
    /// Background scrub: blocks per second and pause between passes.
    pub scrub_blocks_per_sec: u64,
    pub scrub_interval_secs: u64,
    /// Put this node's data directory on a tmpfs of this many MiB (needs
    /// root): a small disk that fills up.
    pub tmpfs_node: Option<(usize, u64)>,
    /// Put every node's data directory (joining nodes' too) on a tmpfs of
    /// this many MiB (needs root): disks whose fill the test controls.
    pub tmpfs_mib_all: Option<u64>,
    /// Failure domain of node `i` at index `i - 1` (missing or empty:
    /// none); set an entry before `add_joining_node` for a joining node.
    pub domains: Vec<String>,
    /// Run every node in its own network namespace (needs root).
    pub netns: bool,
    /// With `netns`: put a delay proxy in front of this node.
    pub delay_proxy_node: Option<usize>,
    /// Placement: heartbeats, down and out (short in tests).
    pub heartbeat_interval_ms: u64,
    pub node_down_after_ms: u64,
    pub down_out_secs: u64,
    /// Rebuild throttle (`placement.snapshot_bytes_per_sec`; None: the
    /// default).
    pub snapshot_bytes_per_sec: Option<u64>,
    /// `placement.snapshot_stall_secs` (None: the default).
    pub snapshot_stall_secs: Option<u64>,
    /// `placement.nearfull_ratio` and `full_ratio` (None: 0.99 and 1.0,
    /// out of the way of the host disk's fill).
    pub full_ratios: Option<(f64, f64)>,
    /// Balance replicas and leaderships (off by default in tests, so
    /// leadership stays where a test puts it: the `norebalance` flag).
    pub rebalance: bool,
    /// `limits.memory_budget_bytes` (None: the default).
    pub memory_budget_bytes: Option<u64>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 3,
            data_groups: 4,
            replicas: 3,
            chunk_size_bytes: 1 << 20,
            tick_interval_ms: 50,
            election_ticks: 10,
            log_compact_threshold_entries: 4096,
            log_retain_entries: 256,
            scrub_blocks_per_sec: 20_000,
            scrub_interval_secs: 2,
            tmpfs_node: None,
            tmpfs_mib_all: None,
            domains: Vec::new(),
            netns: false,
            delay_proxy_node: None,
            heartbeat_interval_ms: 200,
            node_down_after_ms: 2000,
            down_out_secs: 600,
            snapshot_bytes_per_sec: None,
            snapshot_stall_secs: None,
            full_ratios: None,
            rebalance: false,
            memory_budget_bytes: None,
        }
    }
}

/// Directory holding the workspace's binaries (next to the test binary,
/// or next to this binary when it is one, like the rebuild bench).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>
    if dir.file_name().is_some_and(|n| n == "deps") {
        return dir.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    dir
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (cargo test --workspace --release builds them)",
        p.display()
    );
    p
}

/// A free loopback port, never one handed out before in this process
/// (tests in one binary run clusters side by side: two of them must not
/// get the same port between its release here and a node's bind).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port != 0 && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    0
}

/// A running test cluster.
pub struct LocalCluster {
    pub spec: ClusterSpec,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    procs: Vec<Option<Child>>,
    /// Nodes added after the bootstrap (configured with seeds).
    joined: Vec<usize>,
    /// Extra environment for a node's next start.
    next_env: Vec<Vec<(String, String)>>,
    mounted: Vec<PathBuf>,
    /// The delay proxy, when `spec.delay_proxy_node` (dropped before `net`).
    pub delay: Option<netns::DelayProxy>,
    /// The namespaces, when `spec.netns`.
    pub net: Option<netns::Net>,
}

impl LocalCluster {
    /// Writes configs and starts every node.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<LocalCluster> {
        let dir = tempfile::Builder::new().prefix("raftblk-test-").tempdir()?;
        let ports: Vec<u16> = (0..spec.nodes).map(|_| free_port()).collect();
        let mut c = LocalCluster {
            next_env: vec![Vec::new(); spec.nodes],
            spec,
            dir,
            ports,
            procs: Vec::new(),
            joined: Vec::new(),
            mounted: Vec::new(),
            delay: None,
            net: None,
        };
        if c.spec.netns {
            static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let net = netns::Net::create(c.spec.nodes, seq)?;
            if let Some(n) = c.spec.delay_proxy_node {
                c.delay = Some(net.delay_proxy(n, 7100)?);
            }
            c.net = Some(net);
        }
        if let Some((node, mib)) = c.spec.tmpfs_node {
            c.mount_tmpfs(node, mib)?;
        }
        if let Some(mib) = c.spec.tmpfs_mib_all {
            for i in 1..=c.spec.nodes {
                c.mount_tmpfs(i, mib)?;
            }
        }
        for i in 1..=c.spec.nodes {
            std::fs::write(c.config_path(i), c.config_text(i))?;
            c.procs.push(None);
        }
        for i in 1..=c.spec.nodes {
            c.start_node(i)?;
        }
        Ok(c)
    }

    /// Adds node `spec.nodes + 1`, configured to join through node 1 (no
    /// `[cluster]` section: it learns the cluster from the map), and starts
    /// it. Loopback clusters only.
    pub fn add_joining_node(&mut self) -> anyhow::Result<usize> {
        anyhow::ensure!(self.net.is_none(), "joining nodes need a loopback cluster");
        let i = self.spec.nodes + 1;
        self.ports.push(free_port());
        self.procs.push(None);
        self.next_env.push(Vec::new());
        self.spec.nodes = i;
        self.joined.push(i);
        if let Some(mib) = self.spec.tmpfs_mib_all {
            self.mount_tmpfs(i, mib)?;
        }
        std::fs::write(self.config_path(i), self.config_text(i))?;
        self.start_node(i)?;
        Ok(i)
    }

    /// Mounts a tmpfs of `mib` MiB on node `i`'s data directory (root).
    fn mount_tmpfs(&mut self, i: usize, mib: u64) -> anyhow::Result<()> {
        let d = self.data_dir(i);
        std::fs::create_dir_all(&d)?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&d)
            .status()?;
        anyhow::ensure!(
            st.success(),
            "mount tmpfs on {} failed (needs root)",
            d.display()
        );
        self.mounted.push(d);
        Ok(())
    }

    /// Node `i`'s failure domain line for its config ("" if none).
    fn domain_text(&self, i: usize, key: &str) -> String {
        match self.spec.domains.get(i - 1).filter(|d| !d.is_empty()) {
            Some(d) => format!("{key} = \"{d}\"\n"),
            None => String::new(),
        }
    }

    /// Removes node `i`'s data directory (the node must be stopped).
    pub fn wipe(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(!self.is_running(i), "node {i} is running");
        let d = self.data_dir(i);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        Ok(())
    }

    fn config_text(&self, i: usize) -> String {
        let s = &self.spec;
        if self.joined.contains(&i) {
            return format!(
                "node_id = {i}\nlisten_addr = \"{}\"\ndata_dir = \"{}\"\nmetrics_addr = \"127.0.0.1:0\"\nseeds = [\"{}\"]\n{}\n[raft]\ntick_interval_ms = {}\nelection_ticks = {}\nheartbeat_ticks = 2\nlog_compact_threshold_entries = {}\nlog_retain_entries = {}\n",
                self.addr(i),
                self.data_dir(i).display(),
                self.addr(1),
                self.domain_text(i, "failure_domain"),
                s.tick_interval_ms,
                s.election_ticks,
                s.log_compact_threshold_entries,
                s.log_retain_entries,
            ) + &self.limits_text()
                + &self.placement_text()
                + &tls::node_section(i);
        }
        let mut t = format!(
            "node_id = {i}\nlisten_addr = \"{}\"\ndata_dir = \"{}\"\nmetrics_addr = \"127.0.0.1:0\"\n{}\n[cluster]\ndata_groups = {}\nreplicas = {}\nchunk_size_bytes = {}\n",
            self.addr(i),
            self.data_dir(i).display(),
            self.domain_text(i, "failure_domain"),
            s.data_groups,
            s.replicas,
            s.chunk_size_bytes
        );
        if !s.rebalance {
            t += "flags = [\"norebalance\"]\n";
        }
        for j in 1..=s.nodes {
            t += &format!(
                "\n[[cluster.nodes]]\nid = {j}\naddr = \"{}\"\n{}",
                self.addr(j),
                self.domain_text(j, "failure_domain")
            );
        }
        t += &format!(
            "\n[raft]\ntick_interval_ms = {}\nelection_ticks = {}\nheartbeat_ticks = 2\nlog_compact_threshold_entries = {}\nlog_retain_entries = {}\n",
            s.tick_interval_ms, s.election_ticks, s.log_compact_threshold_entries, s.log_retain_entries
        );
        t + &self.limits_text() + &self.placement_text() + &tls::node_section(i)
    }

    fn limits_text(&self) -> String {
        let s = &self.spec;
        let mut t = format!(
            "\n[limits]\nscrub_blocks_per_sec = {}\nscrub_interval_secs = {}\n",
            s.scrub_blocks_per_sec, s.scrub_interval_secs
        );
        if let Some(b) = s.memory_budget_bytes {
            t += &format!("memory_budget_bytes = {b}\n");
        }
        t
    }

    fn placement_text(&self) -> String {
        let p = &self.spec;
        let mut t = format!(
            "\n[placement]\nheartbeat_interval_ms = {}\nnode_down_after_ms = {}\ndown_out_secs = {}\n",
            p.heartbeat_interval_ms, p.node_down_after_ms, p.down_out_secs
        );
        if let Some(b) = p.snapshot_bytes_per_sec {
            t += &format!("snapshot_bytes_per_sec = {b}\n");
        }
        if let Some(s) = p.snapshot_stall_secs {
            t += &format!(
                "snapshot_stall_secs = {s}\nlearner_stall_secs = {}\n",
                2 * s
            );
        }
        // The test nodes share the host's file system, whose fill the test
        // does not control (statvfs counts reserved blocks as used: a CI
        // machine sat at 0.83): unless a test sets them, the ratios sit
        // where only a truly full disk reaches them.
        let (near, full) = p.full_ratios.unwrap_or((0.99, 1.0));
        t += &format!("nearfull_ratio = {near}\nfull_ratio = {full}\n");
        t
    }

    pub fn config_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}.toml"))
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}"))
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}.log"))
    }

    pub fn addr(&self, i: usize) -> String {
        match &self.net {
            Some(n) => format!("{}:7100", n.node_ip(i)),
            None => format!("127.0.0.1:{}", self.ports[i - 1]),
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        (1..=self.spec.nodes).map(|i| self.addr(i)).collect()
    }

    /// The `--cluster` argument for the CLI.
    pub fn cluster_arg(&self) -> String {
        self.addrs().join(",")
    }

    /// Starts node `i` (1-based) if it is not running; with `FAILPOINTS`
    /// among its next environment, as the test-only binary that reads them.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let exe = if self.next_env[i - 1].iter().any(|(k, _)| k == "FAILPOINTS") {
            bin("raftblk-node-failpoints")
        } else {
            bin("raftblk-node")
        };
        self.start_node_with(i, &exe)
    }

    /// Starts node `i` from the executable `exe` if it is not running.
    pub fn start_node_with(&mut self, i: usize, exe: &Path) -> anyhow::Result<()> {
        if self.procs[i - 1].is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let env = std::mem::take(&mut self.next_env[i - 1]);
        let mut cmd = match &self.net {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.node_ns(i)]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let child = cmd
            .arg("--config")
            .arg(self.config_path(i))
            .env("RUST_LOG", "info")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn raftblk-node")?;
        self.procs[i - 1] = Some(child);
        Ok(())
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs node `i` and waits (bounded) for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i - 1].take() {
            // SAFETY: kill(2) on the PID of a child we spawned and have not
            // reaped yet, so the PID cannot have been reused.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Environment variables for node `i`'s next start only.
    pub fn set_next_env(&mut self, i: usize, vars: &[(&str, &str)]) {
        self.next_env[i - 1] = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Waits (bounded) for node `i` to exit by itself; its exit code.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.procs[i - 1].as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.procs[i - 1] = None;
                    return Some(st.code().unwrap_or(-1));
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Grows the tmpfs under node `i`'s data directory ("space freed").
    pub fn grow_tmpfs(&self, i: usize, mib: u64) -> anyhow::Result<()> {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.data_dir(i))
            .status()?;
        anyhow::ensure!(st.success(), "remount failed");
        Ok(())
    }

    /// SIGSTOPs (`true`) or SIGCONTs (`false`) node `i`, if running.
    pub fn pause(&self, i: usize, stop: bool) {
        if let Some(pid) = self.pid(i) {
            let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on the PID of a child we spawned and have not
            // reaped (it is still in `procs`), so the PID is not reused.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// PID of node `i`'s process, if running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i - 1].as_ref().map(|c| c.id())
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.procs[i - 1].is_some()
    }

    /// Where node `i` serves its Prometheus metrics (every test node does,
    /// on a port the kernel picks; read from its log).
    pub fn metrics_addr(&self, i: usize) -> Option<std::net::SocketAddr> {
        metrics::logged_addr(&std::fs::read_to_string(self.log_path(i)).unwrap_or_default())
    }

    /// Node `i`'s log (for failure messages).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn cluster_client(
        &self,
        i: usize,
    ) -> anyhow::Result<ClusterClient<tonic::transport::Channel>> {
        Ok(ClusterClient::new(self.channel(i).await?))
    }

    /// A gRPC channel to node `i` with the `admin` certificate.
    pub async fn channel(&self, i: usize) -> anyhow::Result<tonic::transport::Channel> {
        let e = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr(i)))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5));
        Ok(tls::security(raftblk_tls::Role::Admin).connect(e).await?)
    }

    /// Environment for a raftblk program started against this cluster
    /// as `role` (its TLS certificate).
    pub fn tls_env(&self, role: raftblk_tls::Role) -> Vec<(String, String)> {
        tls::env(role)
    }

    /// Status of node `i`.
    pub async fn status(&self, i: usize) -> anyhow::Result<NodeStatusResponse> {
        Ok(self
            .cluster_client(i)
            .await?
            .status(Empty {})
            .await?
            .into_inner())
    }

    /// Node id that currently leads `group`, as reported by a running node
    /// that claims it.
    pub async fn leader_of(&self, group: u64) -> Option<usize> {
        for i in 1..=self.spec.nodes {
            if !self.is_running(i) {
                continue;
            }
            if let Ok(s) = self.status(i).await {
                if s.groups
                    .iter()
                    .any(|g| g.group_id == group && g.role == "leader")
                {
                    return Some(i);
                }
            }
        }
        None
    }

    /// The status of `group` as its current leader reports it (the leader
    /// with the highest term, if several claim it), with that node.
    pub async fn group_status(&self, group: u64) -> Option<(usize, GroupStatus)> {
        let mut best: Option<(usize, GroupStatus)> = None;
        for i in 1..=self.spec.nodes {
            if !self.is_running(i) {
                continue;
            }
            let Ok(s) = self.status(i).await else {
                continue;
            };
            if let Some(g) = s
                .groups
                .into_iter()
                .find(|g| g.group_id == group && g.role == "leader")
            {
                if best.as_ref().is_none_or(|(_, b)| g.term > b.term) {
                    best = Some((i, g));
                }
            }
        }
        best
    }

    /// Every node with a replica of `group` per its leader (voters,
    /// learners, outgoing voters); the bootstrap placement if no leader
    /// answers.
    pub async fn members_of(&self, group: u64) -> Vec<u64> {
        match self.group_status(group).await {
            Some((_, g)) => {
                let mut m = g.replicas.clone();
                m.extend_from_slice(&g.learners);
                m.extend_from_slice(&g.voters_outgoing);
                m.sort_unstable();
                m.dedup();
                m
            }
            None => {
                let ids: Vec<u64> = (1..=self.spec.nodes as u64).collect();
                raftblk_proto::placement::group_replicas(&ids, group, self.spec.replicas)
            }
        }
    }

    /// Asks the leader of `group` to make one membership change step,
    /// following leader changes (bounded); returns the leader's answer.
    pub async fn change_peers(
        &self,
        group: u64,
        changes: &[(PeerChangeKind, u64)],
        timeout: Duration,
    ) -> anyhow::Result<ChangePeersResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((l, st)) = self.group_status(group).await {
                let req = ChangePeersRequest {
                    group_id: group,
                    changes: changes
                        .iter()
                        .map(|(k, n)| PeerChange {
                            kind: *k as i32,
                            node_id: *n,
                        })
                        .collect(),
                    conf_ver: st.conf_ver,
                };
                let r = self
                    .cluster_client(l)
                    .await?
                    .change_peers(req)
                    .await?
                    .into_inner();
                match r.error.as_ref().map(|e| e.kind()) {
                    None => return Ok(r),
                    Some(
                        ErrorCode::NotLeader | ErrorCode::Unavailable | ErrorCode::ConfChanged,
                    ) => {}
                    Some(_) => return Ok(r),
                }
                if Instant::now() >= deadline {
                    bail!(
                        "change of group {group} not made within {timeout:?}: {:?}",
                        r.error
                    );
                }
            } else if Instant::now() >= deadline {
                bail!("group {group} has no leader");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Moves `group`'s replica from node `from` to node `to` step by step,
    /// each step bounded by `step`: add `to` as a learner, wait until it
    /// caught up, enter the joint configuration that promotes it and
    /// removes `from`, leave it.
    pub async fn move_replica(
        &self,
        group: u64,
        from: u64,
        to: u64,
        step: Duration,
    ) -> anyhow::Result<()> {
        use PeerChangeKind::{AddLearner, AddVoter, Remove};
        let r = self.change_peers(group, &[(AddLearner, to)], step).await?;
        anyhow::ensure!(r.error.is_none(), "add learner: {:?}", r.error);
        anyhow::ensure!(r.learners.contains(&to), "learner missing: {r:?}");
        self.wait_caught_up(group, to, step).await?;
        let r = self
            .change_peers(group, &[(AddVoter, to), (Remove, from)], step)
            .await?;
        anyhow::ensure!(r.error.is_none(), "enter joint: {:?}", r.error);
        anyhow::ensure!(
            r.voters.contains(&to) && r.voters_outgoing.contains(&from),
            "joint configuration expected: {r:?}"
        );
        let r = self.change_peers(group, &[], step).await?;
        anyhow::ensure!(r.error.is_none(), "leave joint: {:?}", r.error);
        anyhow::ensure!(
            r.voters_outgoing.is_empty() && r.voters.contains(&to) && !r.voters.contains(&from),
            "final configuration: {r:?}"
        );
        println!(
            "group {group}: moved from node {from} to node {to}, now {:?} at version {}",
            r.voters, r.conf_ver
        );
        Ok(())
    }

    /// Waits until the leader of `group` reports `node` caught up
    /// (replicating, matched within a few entries of the commit index).
    pub async fn wait_caught_up(
        &self,
        group: u64,
        node: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, st)) = self.group_status(group).await {
                if let Some(p) = st.progress.iter().find(|p| p.node_id == node) {
                    if p.state == "replicate" && p.matched + 32 >= st.commit_index {
                        return Ok(());
                    }
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {node} never caught up in group {group}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running replica of `group` has applied what its
    /// leader had committed when this was called (writes may go on: unlike
    /// `wait_replicas_identical`, this holds under a workload).
    pub async fn wait_applied(&self, group: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let commit = loop {
            if let Some((_, st)) = self.group_status(group).await {
                break st.commit_index;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "group {group} has no leader after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        loop {
            let mut behind = Vec::new();
            for r in self.members_of(group).await {
                let i = r as usize;
                if !self.is_running(i) {
                    continue;
                }
                let applied = self.status(i).await.ok().and_then(|s| {
                    s.groups
                        .into_iter()
                        .find(|g| g.group_id == group)
                        .map(|g| g.applied_index)
                });
                if applied.is_none_or(|a| a < commit) {
                    behind.push((r, applied));
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "replicas of group {group} did not apply index {commit} within {timeout:?}: (node, applied) {behind:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `i` no longer hosts `group` (its replica moved away).
    pub async fn wait_gone(&self, i: usize, group: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(st) = self.status(i).await {
                if !st.groups.iter().any(|g| g.group_id == group) {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {i} still hosts group {group} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every group hosted by a running node has a leader among
    /// the running nodes.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut led = std::collections::BTreeSet::new();
            let mut ok = true;
            for i in 1..=self.spec.nodes {
                if !self.is_running(i) {
                    continue;
                }
                match self.status(i).await {
                    Ok(s) => {
                        for g in s.groups {
                            if g.role == "leader" {
                                led.insert(g.group_id);
                            }
                        }
                    }
                    Err(_) => ok = false,
                }
            }
            if ok && led.len() as u64 == self.spec.data_groups + 1 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // What each node last said, for whoever reads the failure.
                let tails: String = (1..=self.spec.nodes)
                    .filter(|&i| self.is_running(i))
                    .map(|i| format!("\n--- node {i} (last lines) ---\n{}", self.log_tail(i, 12)))
                    .collect();
                bail!(
                    "cluster not healthy after {timeout:?}: groups with a leader {led:?} of {}{tails}",
                    self.spec.data_groups + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client connected through every node's address.
    pub async fn client(&self) -> anyhow::Result<Client> {
        self.client_with(ClientOptions::default()).await
    }

    /// A client with `opts` and the `admin` certificate.
    pub async fn client_with(&self, opts: ClientOptions) -> anyhow::Result<Client> {
        let opts = ClientOptions {
            security: tls::security(raftblk_tls::Role::Admin),
            ..opts
        };
        Ok(Client::connect(&self.addrs(), opts).await?)
    }

    /// `(applied index, stored blocks, digest)` of `group` on node `i`.
    pub async fn digest(&self, i: usize, group: u64) -> anyhow::Result<(u64, u64, u64)> {
        let r = self
            .cluster_client(i)
            .await?
            .group_digest(GroupDigestRequest { group_id: group })
            .await?
            .into_inner();
        if let Some(e) = r.error {
            bail!("digest of group {group} on node {i}: {e}");
        }
        Ok((r.applied_index, r.block_count, r.digest))
    }

    /// `(stored blocks, blocks kept for snapshots)` of `group` on node `i`.
    pub async fn stored_counts(&self, i: usize, group: u64) -> anyhow::Result<(u64, u64)> {
        let r = self
            .cluster_client(i)
            .await?
            .group_digest(GroupDigestRequest { group_id: group })
            .await?
            .into_inner();
        if let Some(e) = r.error {
            bail!("digest of group {group} on node {i}: {e}");
        }
        Ok((r.block_count, r.snapshot_block_count))
    }

    /// Waits until every running replica of `group` reports the same applied
    /// index and digest; returns the digest.
    pub async fn wait_replicas_identical(
        &self,
        group: u64,
        timeout: Duration,
    ) -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let replicas = self.members_of(group).await;
            let mut seen = Vec::new();
            for &r in &replicas {
                if self.is_running(r as usize) {
                    seen.push(self.digest(r as usize, group).await);
                }
            }
            let ok: Vec<(u64, u64, u64)> = seen
                .iter()
                .filter_map(|r| r.as_ref().ok().copied())
                .collect();
            if ok.len() == seen.len() && !ok.is_empty() && ok.iter().all(|d| *d == ok[0]) {
                return Ok((ok[0].1, ok[0].2));
            }
            if Instant::now() >= deadline {
                bail!("replicas of group {group} differ after {timeout:?}: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the current leader of `group` once to hand leadership to `to`.
    pub async fn request_transfer_leader(&self, group: u64, to: usize) {
        if let Some(l) = self.leader_of(group).await {
            if l != to {
                if let Ok(mut c) = self.cluster_client(l).await {
                    let _ = c
                        .transfer_leader(TransferLeaderRequest {
                            group_id: group,
                            to_node: to as u64,
                        })
                        .await;
                }
            }
        }
    }

    /// Asks the leader of `group` to hand leadership to node `to`, and
    /// waits (bounded) until it has.
    pub async fn transfer_leader(
        &self,
        group: u64,
        to: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.leader_of(group).await {
                Some(l) if l == to => return Ok(()),
                Some(l) => {
                    let _ = self
                        .cluster_client(l)
                        .await?
                        .transfer_leader(TransferLeaderRequest {
                            group_id: group,
                            to_node: to as u64,
                        })
                        .await;
                }
                None => {}
            }
            if Instant::now() >= deadline {
                bail!("leadership of group {group} did not move to node {to} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 1..=self.procs.len() {
            self.kill(i);
        }
        // RAFTBLK_KEEP_LOGS=DIR: copy the node logs there (debugging).
        if let Some(keep) = std::env::var_os("RAFTBLK_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            if std::fs::create_dir_all(&keep).is_ok() {
                for i in 1..=self.procs.len() {
                    let _ = std::fs::copy(self.log_path(i), keep.join(format!("node{i}.log")));
                }
            }
        }
        for m in &self.mounted {
            let _ = Command::new("umount").arg(m).status();
        }
        // `net` drops after this, deleting the namespaces.
    }
}

/// Deterministic, unique-looking payload for `(seed, offset, len)`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
