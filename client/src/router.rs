//! The client: connections, the group → leader cache, and the retry loop
//! every request goes through (per-attempt timeout, leader hints, bounded
//! exponential backoff with jitter, an overall deadline).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::{Empty, Error as PbError, ErrorCode, NodeStatusResponse};
use rand::Rng as _;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;
use crate::topology::Topology;

/// Timeouts and retry bounds.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// One RPC attempt.
    pub attempt_timeout: Duration,
    /// A whole operation, retries included (at most
    /// `raftblk_proto::RETRY_AGE_MAX_MS`, 90 s: a longer one is cut there).
    pub deadline: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Pieces of one volume operation in flight at once.
    pub pieces_in_flight_max: usize,
    /// Largest piece sent in one RPC (the node's `limits.io_bytes_max`).
    pub piece_bytes_max: u64,
    /// TLS with this side's certificate, or plaintext (see `tls_args`).
    pub security: raftblk_tls::ClientSecurity,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(1000),
            connect_timeout: Duration::from_secs(1),
            pieces_in_flight_max: 64,
            piece_bytes_max: 1 << 20,
            security: raftblk_tls::ClientSecurity::Plaintext,
        }
    }
}

/// Outcome of one attempt: the server's domain error (if any) and a value.
pub type Attempt<T> = Result<(Option<PbError>, T), tonic::Status>;

/// A connection to a raftblk cluster. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// Random per client instance: the first half of every request id.
    request_nonce: u64,
    request_seq: std::sync::atomic::AtomicU64,
    seeds: Vec<String>,
    opts: ClientOptions,
    topology: RwLock<Topology>,
    /// When the map was last fetched (refreshes are rate-limited).
    refreshed: Mutex<Option<Instant>>,
    channels: Mutex<HashMap<String, Channel>>,
    leaders: RwLock<HashMap<u64, u64>>,
    /// Attempts after an operation's first (another replica, or the same
    /// one after a backoff): what a daemon exports as its retries.
    retries: std::sync::atomic::AtomicU64,
}

impl Client {
    /// Connects through any of `seeds` (host:port) and learns the topology.
    /// Attempts made after an operation's first, since the client began.
    pub fn retries(&self) -> u64 {
        self.inner
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn connect(seeds: &[String], opts: ClientOptions) -> Result<Client, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no cluster address given".into(),
            ));
        }
        let mut reasons = Vec::new();
        for seed in seeds {
            let ch = match channel_for(seed, &opts) {
                Ok(c) => c,
                Err(e) => {
                    reasons.push(format!("{seed}: {e}"));
                    continue;
                }
            };
            let mut c = ClusterClient::new(ch.clone());
            match tokio::time::timeout(opts.attempt_timeout, c.status(Empty {})).await {
                Ok(Ok(resp)) => {
                    let status = resp.into_inner();
                    let mut topology = Topology::from_status(&status);
                    // The map, if this node has one (older nodes, or a
                    // node still starting, may not).
                    if let Ok(Ok(r)) =
                        tokio::time::timeout(opts.attempt_timeout, c.get_map(Empty {})).await
                    {
                        if let Some(m) = r.into_inner().map {
                            topology.apply_map(&m);
                        }
                    }
                    let mut channels = HashMap::new();
                    channels.insert(seed.clone(), ch);
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            request_nonce: rand::thread_rng().gen(),
                            request_seq: std::sync::atomic::AtomicU64::new(1),
                            seeds: seeds.to_vec(),
                            opts,
                            topology: RwLock::new(topology),
                            refreshed: Mutex::new(Some(Instant::now())),
                            channels: Mutex::new(channels),
                            leaders: RwLock::new(HashMap::new()),
                            retries: std::sync::atomic::AtomicU64::new(0),
                        }),
                    });
                }
                Ok(Err(e)) => reasons.push(format!("{seed}: {}", status_text(&e))),
                Err(_) => reasons.push(format!("{seed}: timed out")),
            }
        }
        Err(ClientError::Unreachable {
            addrs: seeds.join(","),
            reason: reasons.join("; "),
        })
    }

    /// A new request id (16 bytes, unique to this client instance), sent
    /// unchanged with every retry of one write or discard so the cluster
    /// applies it at most once.
    pub fn next_request_id(&self) -> bytes::Bytes {
        let seq = self
            .inner
            .request_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut id = Vec::with_capacity(16);
        id.extend_from_slice(&self.inner.request_nonce.to_be_bytes());
        id.extend_from_slice(&seq.to_be_bytes());
        id.into()
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    pub fn seeds(&self) -> &[String] {
        &self.inner.seeds
    }

    /// The topology learned at connect time.
    pub fn topology(&self) -> Topology {
        match self.inner.topology.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Adds node `id` at `addr` if this client does not know it (a leader
    /// hint naming a node that joined after the client connected).
    fn learn_node(&self, id: u64, addr: &str) {
        let mut t = self
            .inner
            .topology
            .write()
            .unwrap_or_else(|p| p.into_inner());
        t.nodes.entry(id).or_insert_with(|| addr.to_owned());
    }

    /// Fetches the cluster map from any member (at most every 250 ms) and
    /// takes it if newer: replicas moved, nodes joined or left.
    pub async fn refresh_topology(&self) {
        {
            let mut last = self
                .inner
                .refreshed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_millis(250)) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.refresh_topology_now().await;
    }

    /// Fetches the cluster map now, whatever the rate limit.
    async fn refresh_topology_now(&self) {
        if let Ok(mut last) = self.inner.refreshed.lock() {
            *last = Some(Instant::now());
        }
        let topo = self.topology();
        let mut addrs: Vec<String> = topo.nodes.values().cloned().collect();
        for s in &self.inner.seeds {
            if !addrs.contains(s) {
                addrs.push(s.clone());
            }
        }
        for addr in addrs.into_iter().take(16) {
            let Ok(ch) = self.channel(&addr) else {
                continue;
            };
            let mut c = ClusterClient::new(ch);
            let call = c.get_map(Empty {});
            if let Ok(Ok(r)) = tokio::time::timeout(self.inner.opts.attempt_timeout, call).await {
                if let Some(m) = r.into_inner().map {
                    let mut t = self
                        .inner
                        .topology
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    t.apply_map(&m);
                    return;
                }
            }
        }
    }

    /// A (lazily connected) channel to `addr`.
    pub fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut map = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = channel_for(addr, &self.inner.opts)
            .map_err(|e| ClientError::InvalidArgument(format!("address {addr}: {e}")))?;
        map.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Status of every member that answers: `(node id, address, result)`.
    pub async fn node_statuses(&self) -> Vec<(u64, String, Result<NodeStatusResponse, String>)> {
        let topo = self.topology();
        let mut out = Vec::new();
        for (id, addr) in topo.nodes {
            let r = match self.channel(&addr) {
                Ok(ch) => {
                    let mut c = ClusterClient::new(ch);
                    match tokio::time::timeout(self.inner.opts.attempt_timeout, c.status(Empty {}))
                        .await
                    {
                        Ok(Ok(r)) => Ok(r.into_inner()),
                        Ok(Err(e)) => Err(status_text(&e)),
                        Err(_) => Err("timed out".to_owned()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            out.push((id, addr, r));
        }
        out
    }

    fn cached_leader(&self, group: u64) -> Option<u64> {
        self.inner.leaders.read().ok()?.get(&group).copied()
    }

    fn remember_leader(&self, group: u64, node: u64) {
        if let Ok(mut l) = self.inner.leaders.write() {
            l.insert(group, node);
        }
    }

    /// Runs `op` against the leader of `group`, retrying under the deadline.
    pub async fn call_group<T, F, Fut>(
        &self,
        group: u64,
        what: &str,
        op: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let opts = &self.inner.opts;
        // Retries of a write stop within the window in which the group
        // still recognises them (`RETRY_AGE_MAX_MS`): past it, a retry
        // would only get REQUEST_EXPIRED.
        let deadline = Instant::now()
            + opts
                .deadline
                .min(Duration::from_millis(raftblk_proto::RETRY_AGE_MAX_MS));
        // Replicas move between nodes: try the group's replicas per the
        // map first, then every other member, and follow leader hints to
        // any member; refresh the map when a node says it has no replica.
        let route = |topo: &Topology| {
            let mut replicas = topo.replicas_of(group);
            let initial = replicas.len();
            for id in topo.nodes.keys() {
                if !replicas.contains(id) {
                    replicas.push(*id);
                }
            }
            (replicas, initial)
        };
        let mut topo = self.topology();
        let (mut replicas, mut initial) = route(&topo);
        if replicas.is_empty() {
            return Err(ClientError::InvalidArgument(format!(
                "group {group} has no replicas"
            )));
        }
        let mut refreshed = false;
        let mut candidate = self
            .cached_leader(group)
            .filter(|l| replicas.contains(l))
            .unwrap_or(replicas[0]);
        let mut backoff = opts.backoff_min;
        let mut hops = 0usize;
        let mut last: String;
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                self.inner
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let next_replica = |replicas: &[u64], c: u64| {
                let i = replicas.iter().position(|r| *r == c).unwrap_or(0);
                replicas[(i + 1) % replicas.len()]
            };
            let mut sleep = true;
            let addr = topo.nodes.get(&candidate).cloned().unwrap_or_default();
            let attempt = match self.channel(&addr) {
                Ok(ch) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::timeout(opts.attempt_timeout.min(left), op(ch)).await
                }
                Err(e) => return Err(e),
            };
            match attempt {
                Ok(Ok((None, v))) => {
                    self.remember_leader(group, candidate);
                    return Ok(v);
                }
                Ok(Ok((Some(e), _))) => {
                    last = format!("node {candidate}: {e}");
                    match e.kind() {
                        ErrorCode::NotLeader => {
                            if e.leader_id != 0
                                && e.leader_id != candidate
                                && !replicas.contains(&e.leader_id)
                            {
                                // A node this client does not know yet (it
                                // joined after the client connected): the
                                // hint carries its address; the map the
                                // rest.
                                if !e.leader_addr.is_empty() {
                                    self.learn_node(e.leader_id, &e.leader_addr);
                                } else {
                                    self.refresh_topology().await;
                                }
                                topo = self.topology();
                                (replicas, initial) = route(&topo);
                            }
                            if e.leader_id != 0
                                && e.leader_id != candidate
                                && replicas.contains(&e.leader_id)
                            {
                                candidate = e.leader_id;
                                hops += 1;
                                sleep = hops > 2 * initial;
                            } else {
                                candidate = next_replica(&replicas, candidate);
                            }
                        }
                        ErrorCode::WrongGroup => {
                            // No replica there (any more): nodes answer
                            // that at once, so go on without a pause, a
                            // bounded number of times, with a fresh map.
                            if !refreshed {
                                refreshed = true;
                                self.refresh_topology_now().await;
                                topo = self.topology();
                                (replicas, initial) = route(&topo);
                                if replicas.is_empty() {
                                    return Err(ClientError::InvalidArgument(format!(
                                        "group {group} has no replicas"
                                    )));
                                }
                                candidate = replicas[0];
                            } else {
                                candidate = next_replica(&replicas, candidate);
                            }
                            hops += 1;
                            sleep = hops > 2 * replicas.len();
                        }
                        ErrorCode::Unavailable | ErrorCode::Corrupted | ErrorCode::Storage => {
                            candidate = next_replica(&replicas, candidate);
                        }
                        _ => return Err(ClientError::Server(e)),
                    }
                }
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(ClientError::PermissionDenied(format!(
                        "node {candidate}: {}",
                        status.message()
                    )));
                }
                Ok(Err(status)) => {
                    last = format!("node {candidate}: {}: {}", status.code(), status.message());
                    candidate = next_replica(&replicas, candidate);
                }
                Err(_) => {
                    last = format!("node {candidate}: attempt timed out");
                    candidate = next_replica(&replicas, candidate);
                }
            }
            if sleep {
                let jitter = rand::thread_rng().gen_range(0..=backoff.as_micros() as u64 / 2);
                let pause = backoff + Duration::from_micros(jitter);
                if Instant::now() + pause >= deadline {
                    return Err(ClientError::Timeout {
                        what: format!("{what} (group {group})"),
                        last,
                    });
                }
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(opts.backoff_max);
                hops = 0;
            } else if Instant::now() >= deadline {
                return Err(ClientError::Timeout {
                    what: format!("{what} (group {group})"),
                    last,
                });
            }
        }
    }
}

/// A status's message with the chain of causes a transport error hides
/// ("transport error: ... certificate expired").
pub(crate) fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_owned();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut depth = 0;
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text = format!("{text}: {t}");
        }
        cause = c.source();
        depth += 1;
        if depth > 8 {
            break;
        }
    }
    text
}

fn channel_for(addr: &str, opts: &ClientOptions) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    Ok(opts.security.connect_lazy(endpoint))
}
