//! The multi-raft store: one thread owns every group replica on this node
//! (one raft-rs `RawNode` each) and runs the ready loop.
//!
//! Each round: drain a bounded batch of inbox messages (proposals, reads,
//! raft messages), tick on time, then for every group with a ready:
//! send leader messages at once, install a snapshot if any, apply committed
//! entries and stage log appends and hard states — all groups into ONE
//! write batch written with one fsync (group commit). Only then are the
//! persisted messages sent and the ready advanced; the light ready's commit
//! and entries are applied in a second, unsynced batch. This is raft-rs's
//! documented ready ordering, batched across groups as TiKV's raftstore does.
//!
//! Reads use ReadIndex (raft-rs `ReadOnlyOption::Safe`), batched: all reads
//! of a group that arrive in one round share one read-index request. A
//! completed round also grants the leader a lease, TiKV style: the round was
//! acknowledged by a quorum after it was issued at time T, and with
//! check_quorum and pre-vote a follower that heard from its leader within
//! an election timeout refuses to vote, so no other leader can exist before
//! T + election timeout. Until T + 0.8 x the minimum election timeout the
//! leader serves reads locally (every acknowledged write is already applied
//! on it, since writes are acknowledged after the leader applies them). The
//! lease is measured on the leader's monotonic clock, which keeps running
//! while the process is paused (SIGSTOP), so a leader that wakes up after a
//! long pause finds its lease expired; raft-rs's own tick-based lease is not
//! used for exactly that reason. Leadership transfers drop the lease first
//! (the transferee campaigns without waiting for the election timeout).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use raft::prelude::{Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, ReadOnlyOption, StateRole};
use raftblk_proto::{placement, Command, META_GROUP_ID};
use rocksdb::WriteBatch;
use tokio::sync::{mpsc, oneshot};

use crate::apply::{self, Applier, ApplyOutput, ApplyResult};
use crate::config::NodeConfig;
use crate::engine::{Engine, EngineError, OwnedSnapshot};
use crate::keys;
use crate::raft_storage::GroupStorage;
use crate::snapshot_file;
use crate::transport::Transport;

/// Why the store could not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not the leader of group {group}")]
    NotLeader { group: u64, leader: Option<u64> },
    #[error("group {0} is not hosted on this node")]
    NoSuchGroup(u64),
    #[error("group {group} unavailable: {reason}")]
    Unavailable { group: u64, reason: String },
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
    #[error("the store has stopped")]
    Stopped,
}

type ProposeCb = oneshot::Sender<Result<ApplyResult, StoreError>>;
type ReadCb = oneshot::Sender<Result<(), StoreError>>;

/// Messages into the store thread.
pub enum StoreMsg {
    Propose {
        group: u64,
        data: Vec<u8>,
        cb: ProposeCb,
    },
    ReadIndex {
        group: u64,
        allow_follower: bool,
        cb: ReadCb,
    },
    Raft {
        msgs: Vec<(u64, Message)>,
    },
    SnapshotReceived {
        group: u64,
        msg: Box<Message>,
        path: PathBuf,
    },
    SnapshotStatus {
        group: u64,
        to: u64,
        ok: bool,
    },
    Unreachable {
        to: u64,
    },
    Digest {
        group: u64,
        cb: oneshot::Sender<Result<(OwnedSnapshot, u64), StoreError>>,
    },
    /// Extend the leader lease of a group with a background ReadIndex round.
    RenewLease {
        group: u64,
    },
    /// Hand leadership of a group to `to`, or (None) to its most
    /// up-to-date follower.
    TransferLeader {
        group: u64,
        to: Option<u64>,
    },
}

/// What the rest of the node may know about a group without asking the
/// store thread.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    pub group: u64,
    /// Shared with the store: cloning a view does not allocate.
    pub replicas: Arc<[u64]>,
    pub leader_id: u64,
    pub term: u64,
    pub role: &'static str,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// Leader lease as of the last update (see the module docs).
    pub lease_until: Option<Instant>,
    pub lease_index: u64,
    /// A leadership transfer is under way: no lease reads.
    pub transferring: bool,
}

/// Node-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub checksum_errors: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub snapshots_applied: AtomicU64,
    pub dropped_messages: AtomicU64,
    pub blocks_repaired: AtomicU64,
}

/// Cheap, cloneable access to the store from async code.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<StoreMsg>,
    views: Arc<RwLock<BTreeMap<u64, GroupView>>>,
    pub engine: Engine,
    pub config: Arc<NodeConfig>,
    pub counters: Arc<Counters>,
    /// Blocks found corrupt here, waiting for a repair from the leader:
    /// (group, volume, block).
    pub suspects: Arc<std::sync::Mutex<std::collections::BTreeSet<(u64, u64, u64)>>>,
}

/// Corrupt blocks remembered for repair at most.
pub const SUSPECTS_MAX: usize = 4096;

impl StoreHandle {
    /// Remembers a corrupt local block for repair (bounded).
    pub fn note_corrupt(&self, group: u64, volume: u64, block: u64) {
        let mut s = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < SUSPECTS_MAX {
            s.insert((group, volume, block));
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.request_timeout_ms)
    }

    /// The view of one group, if hosted here.
    pub fn view(&self, group: u64) -> Option<GroupView> {
        self.views.read().ok()?.get(&group).cloned()
    }

    /// Views of every hosted group.
    pub fn views(&self) -> Vec<GroupView> {
        match self.views.read() {
            Ok(v) => v.values().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Proposes `cmd` to `group`; resolves once it is committed and applied.
    pub async fn propose(&self, group: u64, cmd: &Command) -> Result<ApplyResult, StoreError> {
        match self.view(group) {
            None => return Err(StoreError::NoSuchGroup(group)),
            Some(v) if v.role != "leader" => {
                return Err(StoreError::NotLeader {
                    group,
                    leader: (v.leader_id != 0).then_some(v.leader_id),
                })
            }
            Some(_) => {}
        }
        let (cb, rx) = oneshot::channel();
        let msg = StoreMsg::Propose {
            group,
            data: cmd.encode_to_vec(),
            cb,
        };
        self.call(group, msg, rx).await?
    }

    /// Waits until this replica has applied everything committed before the
    /// call (ReadIndex). Followers may ask only when `allow_follower`.
    pub async fn read_index(&self, group: u64, allow_follower: bool) -> Result<(), StoreError> {
        // Fast path: a leader holding a valid lease serves the read without
        // a round trip through the store thread.
        if let Some(v) = self.view(group) {
            if let Some(until) = v.lease_until {
                let now = Instant::now();
                if v.role == "leader"
                    && !v.transferring
                    && now < until
                    && v.applied_index >= v.lease_index
                {
                    let lease = Duration::from_millis(store_lease_ms(
                        self.config.raft.tick_interval_ms,
                        self.config.raft.election_ticks,
                    ));
                    if until.saturating_duration_since(now) < lease / 2 {
                        let _ = self.tx.try_send(StoreMsg::RenewLease { group });
                    }
                    return Ok(());
                }
            }
        }
        let (cb, rx) = oneshot::channel();
        let msg = StoreMsg::ReadIndex {
            group,
            allow_follower,
            cb,
        };
        self.call(group, msg, rx).await?
    }

    /// A consistent view of `group`'s state machine and its applied index.
    pub async fn digest_snapshot(&self, group: u64) -> Result<(OwnedSnapshot, u64), StoreError> {
        let (cb, rx) = oneshot::channel();
        self.call(group, StoreMsg::Digest { group, cb }, rx).await?
    }

    async fn call<T>(
        &self,
        group: u64,
        msg: StoreMsg,
        rx: oneshot::Receiver<T>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout();
        tokio::time::timeout_at(deadline, self.tx.send(msg))
            .await
            .map_err(|_| StoreError::Unavailable {
                group,
                reason: "store inbox full".into(),
            })?
            .map_err(|_| StoreError::Stopped)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(StoreError::Stopped),
            Err(_) => Err(StoreError::Unavailable {
                group,
                reason: "timed out".into(),
            }),
        }
    }

    /// Asks the store to move leadership of `group` away from this node
    /// (best effort: dropped if the inbox is full).
    pub fn request_transfer_leader(&self, group: u64, to: Option<u64>) {
        let _ = self.tx.try_send(StoreMsg::TransferLeader { group, to });
    }

    /// Sender for the transport service.
    pub fn sender(&self) -> mpsc::Sender<StoreMsg> {
        self.tx.clone()
    }
}

struct PendingProposal {
    term: u64,
    cb: ProposeCb,
    deadline: Instant,
}

struct InflightRead {
    waiters: Vec<ReadCb>,
    issued: Instant,
    deadline: Instant,
}

struct Group {
    id: u64,
    node: RawNode<GroupStorage>,
    replicas: Arc<[u64]>,
    pending: BTreeMap<u64, PendingProposal>,
    reads_unsent: Vec<(ReadCb, Instant)>,
    reads_inflight: HashMap<u64, InflightRead>,
    reads_waiting_apply: Vec<(u64, Vec<ReadCb>)>,
    was_leader: bool,
    /// Leader lease: until this instant (the leader's monotonic clock),
    /// no other replica can have been elected, so reads may be served
    /// locally once `lease_index` is applied. Granted by a ReadIndex round.
    lease_until: Option<Instant>,
    lease_index: u64,
    /// Issue a read-index round with no waiters to extend the lease.
    renew_lease: bool,
    /// A received snapshot file waiting for raft to accept it.
    incoming_snapshot: Option<(u64, u64, PathBuf)>,
}

impl Group {
    fn leader_hint(&self) -> Option<u64> {
        let l = self.node.raft.leader_id;
        (l != 0).then_some(l)
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn fail_all(&mut self, why: impl Fn() -> StoreError) {
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.cb.send(Err(why()));
        }
        for (cb, _) in self.reads_unsent.drain(..) {
            let _ = cb.send(Err(why()));
        }
        for (_, r) in self.reads_inflight.drain() {
            for cb in r.waiters {
                let _ = cb.send(Err(why()));
            }
        }
        // Reads already confirmed by a quorum stay valid: they wait for the
        // local apply, which does not depend on leadership.
    }
}

/// Results of one apply pass, delivered after the batch is written.
#[derive(Default)]
struct Completions {
    proposals: Vec<(ProposeCb, Result<ApplyResult, StoreError>)>,
}

/// The store thread's state.
pub struct Store {
    node_id: u64,
    engine: Engine,
    config: Arc<NodeConfig>,
    groups: BTreeMap<u64, Group>,
    rx: mpsc::Receiver<StoreMsg>,
    transport: Transport,
    views: Arc<RwLock<BTreeMap<u64, GroupView>>>,
    counters: Arc<Counters>,
    next_read_ctx: u64,
    /// DB snapshots made for peers, keyed by (group, peer, applied index
    /// the snapshot's metadata names).
    outgoing_snapshots: HashMap<(u64, u64, u64), (OwnedSnapshot, Instant)>,
    last_gc: Instant,
    /// How long a completed read-index round lets the leader read locally.
    lease_duration: Duration,
}

/// Inbox messages handled per round before the ready pass.
const INBOX_BATCH_MAX: usize = 4096;
/// How often deleted volumes' blocks are looked for.
const GC_INTERVAL: Duration = Duration::from_secs(5);
/// Purges proposed per group per GC pass.
const GC_PURGES_MAX: usize = 16;

/// 80% of the minimum election timeout.
fn store_lease_ms(tick_ms: u64, election_ticks: usize) -> u64 {
    tick_ms * election_ticks as u64 * 4 / 5
}

fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    // A failed write to the raft log breaks raft's assumptions: stop the
    // node (fail-stop) so it restarts from what is durable.
    tracing::error!(error = %e, "fatal storage failure: {what}; stopping the node");
    eprintln!("raftblk-node: fatal storage failure: {what}: {e}");
    std::process::exit(70);
}

/// Creates the store and returns its handle; `run` must then be called on a
/// dedicated thread.
pub fn create(
    config: Arc<NodeConfig>,
    engine: Engine,
    transport_factory: impl FnOnce(mpsc::Sender<StoreMsg>, Arc<Counters>) -> Transport,
) -> Result<(Store, StoreHandle), StoreError> {
    let (tx, rx) = mpsc::channel(config.limits.inbox_capacity);
    let counters = Arc::new(Counters::default());
    let transport = transport_factory(tx.clone(), counters.clone());
    let node_id = config.node_id;
    let node_ids = config.node_ids();
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut groups = BTreeMap::new();
    let snap_dir = config.data_dir.join("snap");
    std::fs::create_dir_all(&snap_dir).map_err(EngineError::from)?;
    for g in 0..=config.cluster.data_groups {
        let replicas = placement::group_replicas(&node_ids, g, config.cluster.replicas);
        if !replicas.contains(&node_id) {
            continue;
        }
        snapshot_file::resume_interrupted_install(&engine, g, &replicas, &counters)?;
        let storage = GroupStorage::open(engine.clone(), g, &replicas)?;
        let applied = storage.applied_index();
        let raft_cfg = raft::Config {
            id: node_id,
            election_tick: config.raft.election_ticks,
            heartbeat_tick: config.raft.heartbeat_ticks,
            applied,
            max_size_per_msg: config.raft.max_size_per_msg_bytes,
            max_inflight_msgs: config.raft.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            max_committed_size_per_ready: 16 << 20,
            ..Default::default()
        };
        raft_cfg.validate().map_err(|e| StoreError::Unavailable {
            group: g,
            reason: format!("raft config: {e}"),
        })?;
        let node =
            RawNode::new(&raft_cfg, storage, &logger).map_err(|e| StoreError::Unavailable {
                group: g,
                reason: format!("raft init: {e}"),
            })?;
        groups.insert(
            g,
            Group {
                id: g,
                node,
                replicas: replicas.into(),
                pending: BTreeMap::new(),
                reads_unsent: Vec::new(),
                reads_inflight: HashMap::new(),
                reads_waiting_apply: Vec::new(),
                was_leader: false,
                lease_until: None,
                lease_index: 0,
                renew_lease: false,
                incoming_snapshot: None,
            },
        );
    }
    snapshot_file::sweep_stale(&snap_dir);
    let views = Arc::new(RwLock::new(BTreeMap::new()));
    let handle = StoreHandle {
        tx,
        views: views.clone(),
        engine: engine.clone(),
        config: config.clone(),
        counters: counters.clone(),
        suspects: Default::default(),
    };
    let lease_ms = store_lease_ms(config.raft.tick_interval_ms, config.raft.election_ticks);
    let mut store = Store {
        node_id,
        engine,
        config,
        groups,
        rx,
        transport,
        views,
        counters,
        next_read_ctx: 1,
        outgoing_snapshots: HashMap::new(),
        last_gc: Instant::now(),
        lease_duration: Duration::from_millis(lease_ms),
    };
    let ids: Vec<u64> = store.groups.keys().copied().collect();
    for g in ids {
        store.update_view(g);
    }
    Ok((store, handle))
}

impl Store {
    /// Runs the ready loop until every handle is dropped.
    pub fn run(mut self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => fatal("cannot build the store runtime", e),
        };
        let tick = Duration::from_millis(self.config.raft.tick_interval_ms);
        rt.block_on(async move {
            let mut next_tick = Instant::now() + tick;
            loop {
                let wait = next_tick.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, self.rx.recv()).await {
                    Ok(Some(msg)) => {
                        self.handle(msg);
                        for _ in 0..INBOX_BATCH_MAX {
                            match self.rx.try_recv() {
                                Ok(m) => self.handle(m),
                                Err(_) => break,
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                let now = Instant::now();
                if now >= next_tick {
                    self.on_tick(now);
                    next_tick += tick;
                    if next_tick < now {
                        next_tick = now + tick;
                    }
                }
                self.issue_reads();
                self.handle_readies();
            }
            tracing::info!(node = self.node_id, "store stopped");
        });
    }

    fn handle(&mut self, msg: StoreMsg) {
        match msg {
            StoreMsg::Propose { group, data, cb } => self.propose(group, data, cb),
            StoreMsg::ReadIndex {
                group,
                allow_follower,
                cb,
            } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    let _ = cb.send(Err(StoreError::NoSuchGroup(group)));
                    return;
                };
                let leader = g.leader_hint();
                if !g.is_leader() && (!allow_follower || leader.is_none()) {
                    let _ = cb.send(Err(StoreError::NotLeader { group, leader }));
                    return;
                }
                let now = Instant::now();
                if let Some(until) = g.lease_until {
                    if g.is_leader()
                        && now < until
                        && g.node.raft.lead_transferee.is_none()
                        && g.node.store().applied_index() >= g.lease_index
                    {
                        let _ = cb.send(Ok(()));
                        // Renew in the background once half the lease is gone.
                        if until.saturating_duration_since(now) < self.lease_duration / 2
                            && g.reads_unsent.is_empty()
                        {
                            g.renew_lease = true;
                        }
                        return;
                    }
                }
                g.reads_unsent.push((cb, now));
            }
            StoreMsg::Raft { msgs } => {
                for (group, m) in msgs {
                    let Some(g) = self.groups.get_mut(&group) else {
                        self.counters
                            .dropped_messages
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if m.to != self.node_id || !g.replicas.contains(&m.from) {
                        self.counters
                            .dropped_messages
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Err(e) = g.node.step(m) {
                        tracing::debug!(group, error = %e, "raft step rejected a message");
                    }
                }
            }
            StoreMsg::SnapshotReceived { group, msg, path } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    let _ = std::fs::remove_file(&path);
                    return;
                };
                let meta = msg.get_snapshot().get_metadata();
                if let Some((_, _, old)) = g.incoming_snapshot.take() {
                    if old != path {
                        let _ = std::fs::remove_file(old);
                    }
                }
                g.incoming_snapshot = Some((meta.index, meta.term, path));
                if let Err(e) = g.node.step(*msg) {
                    tracing::warn!(group, error = %e, "raft rejected a snapshot");
                }
            }
            StoreMsg::SnapshotStatus { group, to, ok } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    let status = if ok {
                        self.counters.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                        raft::SnapshotStatus::Finish
                    } else {
                        raft::SnapshotStatus::Failure
                    };
                    g.node.report_snapshot(to, status);
                }
            }
            StoreMsg::Unreachable { to } => {
                for g in self.groups.values_mut() {
                    if g.is_leader() && g.replicas.contains(&to) {
                        g.node.report_unreachable(to);
                    }
                }
            }
            StoreMsg::RenewLease { group } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    if g.is_leader() {
                        g.renew_lease = true;
                    }
                }
            }
            StoreMsg::TransferLeader { group, to } => {
                let me = self.node_id;
                if let Some(g) = self.groups.get_mut(&group) {
                    if g.is_leader() {
                        let best =
                            to.filter(|t| *t != me && g.replicas.contains(t))
                                .or_else(|| {
                                    g.node
                                        .raft
                                        .prs()
                                        .iter()
                                        .filter(|(id, _)| **id != me)
                                        .max_by_key(|(_, p)| p.matched)
                                        .map(|(id, _)| *id)
                                });
                        if let Some(to) = best {
                            g.lease_until = None;
                            tracing::warn!(group, to, "transferring leadership");
                            g.node.transfer_leader(to);
                        }
                        // Publish the dropped lease before anything else runs.
                        self.update_view(group);
                    }
                }
            }
            StoreMsg::Digest { group, cb } => {
                let r = match self.groups.get(&group) {
                    Some(g) => Ok((self.engine.snapshot(), g.node.store().applied_index())),
                    None => Err(StoreError::NoSuchGroup(group)),
                };
                let _ = cb.send(r);
            }
        }
    }

    fn propose(&mut self, group: u64, data: Vec<u8>, cb: ProposeCb) {
        let Some(g) = self.groups.get_mut(&group) else {
            let _ = cb.send(Err(StoreError::NoSuchGroup(group)));
            return;
        };
        if !g.is_leader() {
            let leader = g.leader_hint();
            let _ = cb.send(Err(StoreError::NotLeader { group, leader }));
            return;
        }
        let before = g.node.raft.raft_log.last_index();
        if let Err(e) = g.node.propose(Vec::new(), data) {
            let _ = cb.send(Err(StoreError::Unavailable {
                group,
                reason: format!("proposal dropped: {e}"),
            }));
            return;
        }
        let index = g.node.raft.raft_log.last_index();
        assert_eq!(index, before + 1, "one proposal appends one entry");
        let deadline =
            Instant::now() + Duration::from_millis(self.config.limits.request_timeout_ms);
        g.pending.insert(
            index,
            PendingProposal {
                term: g.node.raft.term,
                cb,
                deadline,
            },
        );
    }

    fn on_tick(&mut self, now: Instant) {
        let reissue_after = Duration::from_millis(
            self.config.raft.tick_interval_ms * self.config.raft.heartbeat_ticks as u64 * 3,
        );
        for g in self.groups.values_mut() {
            g.node.tick();
            // Proposals past their deadline: the caller has given up; the
            // entry may still commit (writes are idempotent to retry).
            let expired: Vec<u64> = g
                .pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(i, _)| *i)
                .collect();
            for i in expired {
                if let Some(p) = g.pending.remove(&i) {
                    let _ = p.cb.send(Err(StoreError::Unavailable {
                        group: g.id,
                        reason: "proposal timed out".into(),
                    }));
                }
            }
            // Reads whose read-index round got lost (e.g. a new leader that
            // has not yet committed in its term drops them): re-issue until
            // their deadline.
            let stale: Vec<u64> = g
                .reads_inflight
                .iter()
                .filter(|(_, r)| now.duration_since(r.issued) >= reissue_after)
                .map(|(c, _)| *c)
                .collect();
            for ctx in stale {
                if let Some(r) = g.reads_inflight.remove(&ctx) {
                    if r.deadline <= now {
                        for cb in r.waiters {
                            let _ = cb.send(Err(StoreError::Unavailable {
                                group: g.id,
                                reason: "read index timed out".into(),
                            }));
                        }
                    } else {
                        let issued = r.deadline
                            - Duration::from_millis(self.config.limits.request_timeout_ms);
                        g.reads_unsent
                            .extend(r.waiters.into_iter().map(|cb| (cb, issued)));
                    }
                }
            }
        }
        self.outgoing_snapshots
            .retain(|_, (_, made)| now.duration_since(*made) < Duration::from_secs(600));
        self.maybe_compact();
        if now.duration_since(self.last_gc) >= GC_INTERVAL {
            self.last_gc = now;
            self.collect_garbage();
        }
        let ids: Vec<u64> = self.groups.keys().copied().collect();
        for id in ids {
            self.update_view(id);
        }
    }

    fn issue_reads(&mut self) {
        let timeout = Duration::from_millis(self.config.limits.request_timeout_ms);
        for g in self.groups.values_mut() {
            if g.reads_unsent.is_empty() && !(g.renew_lease && g.reads_inflight.is_empty()) {
                continue;
            }
            g.renew_lease = false;
            let ctx = self.next_read_ctx;
            self.next_read_ctx += 1;
            let first = g
                .reads_unsent
                .iter()
                .map(|(_, t)| *t)
                .min()
                .unwrap_or_else(Instant::now);
            let waiters: Vec<ReadCb> = g.reads_unsent.drain(..).map(|(cb, _)| cb).collect();
            g.node.read_index(ctx.to_be_bytes().to_vec());
            g.reads_inflight.insert(
                ctx,
                InflightRead {
                    waiters,
                    issued: Instant::now(),
                    deadline: first + timeout,
                },
            );
        }
    }

    /// Takes a DB snapshot for every snapshot raft asked for since the last
    /// write, so the data matches the metadata's applied index.
    fn collect_snapshot_requests(&mut self) {
        for g in self.groups.values() {
            let reqs = g.node.store().take_snapshot_requests();
            for (to, index, _term) in reqs {
                debug_assert_eq!(index, g.node.store().applied_index());
                // One pending snapshot per peer: a newer request replaces it.
                self.outgoing_snapshots
                    .retain(|(gid, peer, _), _| !(*gid == g.id && *peer == to));
                self.outgoing_snapshots
                    .insert((g.id, to, index), (self.engine.snapshot(), Instant::now()));
            }
        }
    }

    fn send_messages(&mut self, group: u64, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // The data must be the DB view taken for exactly this
                // snapshot's index; anything else would install the wrong
                // state under the right name.
                let index = m.get_snapshot().get_metadata().index;
                match self.outgoing_snapshots.remove(&(group, m.to, index)) {
                    Some((snap, _)) => self.transport.send_snapshot(group, m, snap),
                    None => {
                        tracing::warn!(group, to = m.to, "no prepared snapshot for a MsgSnapshot");
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.node.report_snapshot(m.to, raft::SnapshotStatus::Failure);
                        }
                    }
                }
            } else {
                self.transport.send(group, m);
            }
        }
    }

    fn apply_entries(
        &mut self,
        group: u64,
        entries: Vec<Entry>,
        wb: &mut WriteBatch,
        applier: &mut Applier<'_>,
        done: &mut Completions,
    ) -> Option<(u64, u64)> {
        let last = entries.last().map(|e| (e.index, e.term))?;
        let g = self.groups.get_mut(&group)?;
        for e in entries {
            let result = if e.get_entry_type() == EntryType::EntryNormal {
                match applier.apply(wb, group, &e.data) {
                    Ok(r) => r,
                    Err(err) => fatal("apply", err),
                }
            } else {
                // Membership is static in this version: conf changes are
                // never proposed.
                Ok(ApplyOutput::Done)
            };
            // Resolve proposals up to this index.
            while let Some((&idx, _)) = g.pending.first_key_value() {
                if idx > e.index {
                    break;
                }
                let Some((_, p)) = g.pending.pop_first() else {
                    break;
                };
                if idx == e.index && p.term == e.term {
                    done.proposals.push((p.cb, Ok(result.clone())));
                } else {
                    done.proposals.push((
                        p.cb,
                        Err(StoreError::Unavailable {
                            group,
                            reason: "entry replaced after a leader change".into(),
                        }),
                    ));
                }
            }
        }
        g.node.store().stage_apply_state(wb, last.0, last.1);
        Some(last)
    }

    fn handle_readies(&mut self) {
        let ids: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| g.node.has_ready())
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return;
        }
        // Snapshots raft asked for while handling the inbox: take their DB
        // views now, before this round sends their messages or writes.
        self.collect_snapshot_requests();
        let engine = self.engine.clone();
        let mut wb = WriteBatch::default();
        let mut applier = Applier::new(&engine);
        let mut done = Completions::default();
        let mut need_sync = false;
        let mut readies = Vec::with_capacity(ids.len());
        let mut applied: Vec<(u64, u64, u64)> = Vec::new();
        for &id in &ids {
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            let mut rd = g.node.ready();
            if let Some(ss) = rd.ss() {
                g.lease_until = None;
                // Readers check the view without the store thread: drop the
                // lease there at once, not at the end of the round.
                if let Ok(mut views) = self.views.write() {
                    if let Some(v) = views.get_mut(&id) {
                        v.lease_until = None;
                        v.role = role_name(ss.raft_state);
                        v.leader_id = ss.leader_id;
                    }
                }
                let leader_now = ss.raft_state == StateRole::Leader;
                if g.was_leader && !leader_now {
                    let leader = (ss.leader_id != 0).then_some(ss.leader_id);
                    g.fail_all(|| StoreError::NotLeader { group: id, leader });
                }
                g.was_leader = leader_now;
                tracing::info!(
                    group = id,
                    node = self.node_id,
                    leader = ss.leader_id,
                    role = role_name(ss.raft_state),
                    "group role changed"
                );
            }
            let msgs = rd.take_messages();
            if !msgs.is_empty() {
                self.send_messages(id, msgs);
            }
            if !rd.snapshot().is_empty() {
                self.install_snapshot(id, rd.snapshot().clone());
                need_sync = true;
            }
            let committed = rd.take_committed_entries();
            if let Some((i, t)) =
                self.apply_entries(id, committed, &mut wb, &mut applier, &mut done)
            {
                applied.push((id, i, t));
            }
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            if !rd.entries().is_empty() {
                if let Err(e) = g.node.mut_store().stage_append(&mut wb, rd.entries()) {
                    fatal("stage append", e);
                }
                need_sync = true;
            }
            if let Some(hs) = rd.hs() {
                if let Err(e) = g.node.mut_store().stage_hard_state(&mut wb, hs) {
                    fatal("stage hard state", e);
                }
            }
            // raft-rs: no fsync is needed when only the commit index moved
            // (it is recovered from the quorum); term, vote and entries must
            // be durable before the messages that depend on them go out.
            need_sync |= rd.must_sync();
            for rs in rd.take_read_states() {
                let mut ctx = [0u8; 8];
                if rs.request_ctx.len() == 8 {
                    ctx.copy_from_slice(&rs.request_ctx);
                }
                if let Some(r) = g.reads_inflight.remove(&u64::from_be_bytes(ctx)) {
                    if g.node.raft.state == StateRole::Leader
                        && g.node.raft.lead_transferee.is_none()
                    {
                        let until = r.issued + self.lease_duration;
                        if g.lease_until.is_none_or(|u| u < until) {
                            g.lease_until = Some(until);
                            g.lease_index = g.lease_index.max(rs.index);
                        }
                    }
                    g.reads_waiting_apply.push((rs.index, r.waiters));
                }
            }
            readies.push((id, rd));
        }
        self.counters
            .checksum_errors
            .fetch_add(applier.checksum_errors, Ordering::Relaxed);
        self.counters
            .blocks_repaired
            .fetch_add(applier.repaired, Ordering::Relaxed);
        drop(applier);
        self.collect_snapshot_requests();
        if !wb.is_empty() || need_sync {
            if let Err(e) = engine.write(wb, need_sync) {
                fatal("raft log write", e);
            }
        }
        for (id, i, t) in applied.drain(..) {
            if let Some(g) = self.groups.get_mut(&id) {
                g.node.mut_store().set_applied(i, t);
            }
        }

        // Phase 2: everything of phase 1 is durable.
        let mut wb2 = WriteBatch::default();
        let mut applier2 = Applier::new(&engine);
        for (id, mut rd) in readies {
            let persisted = rd.take_persisted_messages();
            if !persisted.is_empty() {
                self.send_messages(id, persisted);
            }
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            let mut light = g.node.advance(rd);
            if let Some(commit) = light.commit_index() {
                if let Err(e) = g.node.mut_store().stage_commit(&mut wb2, commit) {
                    fatal("stage commit", e);
                }
            }
            let msgs = light.take_messages();
            // `advance` may have asked for a snapshot (for a lagging peer):
            // take its DB view before the message goes out.
            self.collect_snapshot_requests();
            if !msgs.is_empty() {
                self.send_messages(id, msgs);
            }
            let committed = light.take_committed_entries();
            if let Some((i, t)) =
                self.apply_entries(id, committed, &mut wb2, &mut applier2, &mut done)
            {
                applied.push((id, i, t));
            }
            if let Some(g) = self.groups.get_mut(&id) {
                g.node.advance_apply();
            }
        }
        self.counters
            .checksum_errors
            .fetch_add(applier2.checksum_errors, Ordering::Relaxed);
        self.counters
            .blocks_repaired
            .fetch_add(applier2.repaired, Ordering::Relaxed);
        drop(applier2);
        self.collect_snapshot_requests();
        if !wb2.is_empty() {
            if let Err(e) = engine.write(wb2, false) {
                fatal("apply write", e);
            }
        }
        for (id, i, t) in applied {
            if let Some(g) = self.groups.get_mut(&id) {
                g.node.mut_store().set_applied(i, t);
            }
        }
        for (cb, r) in done.proposals {
            let _ = cb.send(r);
        }
        for &id in &ids {
            if let Some(g) = self.groups.get_mut(&id) {
                let applied_index = g.node.store().applied_index();
                let mut still = Vec::new();
                for (index, waiters) in g.reads_waiting_apply.drain(..) {
                    if index <= applied_index {
                        for cb in waiters {
                            let _ = cb.send(Ok(()));
                        }
                    } else {
                        still.push((index, waiters));
                    }
                }
                g.reads_waiting_apply = still;
            }
            self.update_view(id);
        }
    }

    /// Installs a snapshot received from the leader: crash-safe through the
    /// marker key (see `snapshot_file`).
    fn install_snapshot(&mut self, group: u64, snap: Snapshot) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let meta = snap.get_metadata();
        let Some((index, term, path)) = g.incoming_snapshot.take() else {
            fatal(
                "install snapshot",
                format!("group {group}: raft produced a snapshot we never received"),
            );
        };
        if index != meta.index || term != meta.term {
            fatal(
                "install snapshot",
                format!(
                    "group {group}: received ({index},{term}) but raft installs ({},{})",
                    meta.index, meta.term
                ),
            );
        }
        // Requests waiting for the old state are answered by the new one.
        if let Err(e) = snapshot_file::install(&self.engine, g.node.mut_store(), &snap, &path) {
            fatal("install snapshot", e);
        }
        self.counters
            .snapshots_applied
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(group, index, term, "installed snapshot");
    }

    fn maybe_compact(&mut self) {
        let threshold = self.config.raft.log_compact_threshold_entries;
        let retain = self.config.raft.log_retain_entries;
        let bytes_threshold = self.config.raft.log_compact_threshold_bytes;
        let mut wb = WriteBatch::default();
        for g in self.groups.values_mut() {
            let st = g.node.store();
            let applied = st.applied_index();
            let truncated = st.truncated_index();
            if applied.saturating_sub(truncated) < threshold && st.log_bytes() < bytes_threshold {
                continue;
            }
            // Keep a tail for followers slightly behind, bounded in entries
            // and in bytes (a quarter of the byte threshold).
            let to = st.compact_point(retain, bytes_threshold / 4);
            if to <= truncated {
                continue;
            }
            if let Err(e) = g.node.mut_store().stage_compact(&mut wb, to) {
                tracing::warn!(group = g.id, error = %e, "log compaction skipped");
            } else {
                tracing::debug!(group = g.id, to, "compacted raft log");
            }
        }
        if !wb.is_empty() {
            if let Err(e) = self.engine.write(wb, false) {
                fatal("log compaction", e);
            }
        }
    }

    /// Proposes purges of blocks that belong to deleted volumes, on groups
    /// this node leads.
    fn collect_garbage(&mut self) {
        let next_id = match apply::next_volume_id(&self.engine) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "gc: cannot read the catalog");
                return;
            }
        };
        let mut purges = Vec::new();
        for g in self.groups.values() {
            if g.id == META_GROUP_ID || !g.is_leader() {
                continue;
            }
            let mut vol = 0u64;
            for _ in 0..GC_PURGES_MAX * 4 {
                let Some(found) = next_volume_in_group(&self.engine, g.id, vol) else {
                    break;
                };
                if found >= next_id {
                    break;
                }
                match apply::lookup_volume_by_id(&self.engine, found) {
                    Ok(None) => purges.push((g.id, found)),
                    Ok(Some(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "gc: catalog lookup failed"),
                }
                if purges.len() >= GC_PURGES_MAX {
                    break;
                }
                let Some(n) = found.checked_add(1) else { break };
                vol = n;
            }
        }
        for (group, volume) in purges {
            tracing::info!(group, volume, "purging blocks of a deleted volume");
            let cmd = Command {
                cmd: Some(raftblk_proto::command::Cmd::PurgeVolume(
                    raftblk_proto::PurgeVolumeCmd { volume_id: volume },
                )),
            };
            let (cb, _rx) = oneshot::channel();
            self.propose(group, cmd.encode_to_vec(), cb);
        }
    }

    fn update_view(&mut self, id: u64) {
        let Some(g) = self.groups.get(&id) else {
            return;
        };
        let st = g.node.store();
        let v = GroupView {
            group: id,
            replicas: g.replicas.clone(),
            leader_id: g.node.raft.leader_id,
            term: g.node.raft.term,
            role: role_name(g.node.raft.state),
            commit_index: g.node.raft.raft_log.committed,
            applied_index: st.applied_index(),
            first_index: st.truncated_index() + 1,
            last_index: g.node.raft.raft_log.last_index(),
            lease_until: g.lease_until,
            lease_index: g.lease_index,
            transferring: g.node.raft.lead_transferee.is_some(),
        };
        if let Ok(mut views) = self.views.write() {
            views.insert(id, v);
        }
    }
}

/// The smallest volume id ≥ `from` with blocks in `group`, if any.
fn next_volume_in_group(engine: &Engine, group: u64, from: u64) -> Option<u64> {
    let start = keys::volume_blocks_start(group, from);
    let (_, end) = keys::group_range(group);
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(end);
    let mut iter = engine.db().iterator_cf_opt(
        engine.kv_cf(),
        ro,
        rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
    );
    match iter.next() {
        Some(Ok((k, _))) => keys::parse_block(group, &k).map(|(v, _)| v),
        _ => None,
    }
}
