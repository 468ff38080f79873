//! The multi-raft store: one thread owns every group replica on this node
//! (one raft-rs `RawNode` each) and runs the ready loop.
//!
//! Each round: drain a bounded batch of inbox messages (proposals, reads,
//! raft messages), tick on time, then for every group with a ready:
//! send leader messages at once, hand a snapshot to the install thread (the
//! group's ready is held until it is filled), apply committed entries (one
//! unsynced batch without the WAL, see `flush`, answered at once) and stage
//! log appends and hard states — all groups into ONE write batch written
//! with one fsync (group commit). Only then are the
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
//! (the transferee campaigns without waiting for the election timeout),
//! and a restarted node refuses votes for one election timeout (it may have
//! acknowledged a lease round just before it went down).
//!
//! The parts: `handle` (the async [`StoreHandle`] and published
//! [`GroupView`]s), `ready` (the ready loop: messages, apply, group commit),
//! `commit_notice` (followers told the commit index once per round, not
//! once per commit), `read` (ReadIndex batching and the leader lease),
//! `flush` (the raft log as the only log: unlogged applies, and log
//! compaction held to what a flush made durable), `snapshot` (snapshots
//! made for peers and snapshots received), `install` (snapshot installs on
//! their own thread, the held ready), `propose` (client requests and
//! repairs), `dedup` (at-most-once client requests), `conf` (membership
//! changes, replicas created and destroyed with them), `maintenance` (ticks,
//! proposal and read deadlines, log compaction).

mod commit_notice;
mod conf;
mod dedup;
mod flush;
mod handle;
mod hibernate;
mod install;
mod maintenance;
mod propose;
mod read;
mod ready;
mod reclaim;
mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use raft::{RawNode, StateRole};
use raftblk_proto::{placement, META_GROUP_ID};
use tokio::sync::mpsc;

pub use crate::counters::{Counters, InstallGen, PeerLiveness, Suspects};
pub use crate::msg::{StoreError, StoreMsg};
pub use flush::FlushedApplies;
pub use handle::{GroupView, StoreHandle};

use crate::config::NodeConfig;
use crate::engine::{Engine, EngineError, OwnedSnapshot};
use crate::membership::{self, Membership};
use crate::msg::{ProposeCb, ReadCb};
use crate::raft_storage::{self, GroupStorage};
use crate::snapshot_file;
use crate::transport::Transport;

struct PendingProposal {
    term: u64,
    cb: ProposeCb,
    deadline: Instant,
    /// A membership change: the entry at its index must be one.
    conf_change: bool,
}

struct InflightRead {
    waiters: Vec<ReadCb>,
    issued: Instant,
    deadline: Instant,
}

struct Group {
    id: u64,
    node: RawNode<GroupStorage>,
    /// The applied configuration (see `conf`).
    members: Arc<Membership>,
    pending: BTreeMap<u64, PendingProposal>,
    /// Retries of requests already in the log: (index, term, caller,
    /// deadline); answered when that entry applies (see `dedup`).
    dup_waiters: Vec<(u64, u64, ProposeCb, Instant)>,
    /// When its applied request records are due to be dropped (see
    /// `dedup`).
    evict_due: dedup::EvictDue,
    /// Client requests in its log past the applied index (see `dedup`).
    inflight_requests: dedup::InflightRequests,
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
    /// No lease may be granted while set: a leadership transfer was tried
    /// in this term (see `read`).
    transfer_fence: Option<read::TransferFence>,
    /// This replica has seen an entry of the current term committed: only
    /// then does raft-rs serve read-index requests (earlier ones it drops,
    /// so they are held, and re-issued when this turns true).
    reads_ready: bool,
    /// The received snapshot file raft took (its unstable snapshot), until
    /// the ready carrying it starts the install: one slot per group.
    incoming_snapshot: Option<(u64, u64, PathBuf)>,
    /// A snapshot install under way (see `install`): until it ends the
    /// group's raft is left alone.
    installing: Option<install::Installing>,
    /// Not ticking: idle (see `hibernate`).
    hibernating: bool,
    /// Consecutive ticks this leader's group has been idle.
    idle_ticks: u32,
    /// The commit index each follower has been told (see `commit_notice`).
    commit_sent: commit_notice::CommitSent,
}

impl Group {
    /// The node of the leader this replica knows, if any.
    pub(super) fn leader_hint(&self) -> Option<u64> {
        let l = self.node.raft.leader_id;
        (l != 0).then_some(membership::node_of(l))
    }

    /// This replica's raft peer id (see `membership`).
    pub(super) fn peer_id(&self) -> u64 {
        self.node.raft.id
    }

    pub(super) fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    pub(super) fn fail_all(&mut self, why: impl Fn() -> StoreError) {
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.cb.send(Err(why()));
        }
        for (_, _, cb, _) in self.dup_waiters.drain(..) {
            let _ = cb.send(Err(why()));
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

/// The store thread's state.
pub struct Store {
    node_id: u64,
    engine: Engine,
    config: Arc<NodeConfig>,
    groups: BTreeMap<u64, Group>,
    rx: mpsc::Receiver<StoreMsg>,
    transport: Transport,
    views: Arc<RwLock<BTreeMap<u64, GroupView>>>,
    /// Per group: a `RenewLease` is queued in the inbox (coalescing).
    renewals: Arc<HashMap<u64, AtomicBool>>,
    counters: Arc<Counters>,
    /// The snapshot install thread (see `install`).
    installer: install::Installer,
    /// The state-machine flush thread (see `flush`).
    flusher: flush::Flusher,
    reclaimer: reclaim::Reclaimer,
    /// Read-index contexts issued by this node (see `read::ReadCtx`).
    read_ctx: read::ReadCtx,
    /// DB snapshots made for peers, keyed by (group, peer, applied index
    /// the snapshot's metadata names).
    outgoing_snapshots: HashMap<(u64, u64, u64), (OwnedSnapshot, Instant)>,
    /// How long a completed read-index round lets the leader read locally.
    lease_duration: Duration,
    /// When the store started, and how long after it votes are refused
    /// (the election timeout: see `handle`).
    started: Instant,
    vote_quiet: Duration,
    /// When each peer node was last heard (wakes hibernating followers
    /// whose leader died, see `hibernate`).
    liveness: Arc<PeerLiveness>,
}

/// Inbox messages handled per round before the ready pass.
const INBOX_BATCH_MAX: usize = 4096;

/// 80% of the minimum election timeout.
pub(crate) fn lease_ms(tick_ms: u64, election_ticks: usize) -> u64 {
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
    // SAFETY: _exit(2) ends the process at once, without atexit handlers or
    // C++ static destructors racing RocksDB's background threads; what is
    // on disk is consistent at any instant (fail-stop).
    unsafe { libc::_exit(70) }
}

/// Creates the store and returns its handle; `run` must then be called on a
/// dedicated thread.
pub fn create(
    config: Arc<NodeConfig>,
    ident: crate::identity::StoreIdent,
    book: Arc<crate::address_book::AddressBook>,
    engine: Engine,
    transport_factory: impl FnOnce(mpsc::Sender<StoreMsg>, Arc<Counters>, Arc<Suspects>) -> Transport,
) -> Result<(Store, StoreHandle), StoreError> {
    let (tx, rx) = mpsc::channel(config.limits.inbox_capacity);
    let counters = Arc::new(Counters::default());
    let suspects = Arc::new(Suspects::default());
    let transport = transport_factory(tx.clone(), counters.clone(), suspects.clone());
    let node_id = config.node_id;
    let mut groups = BTreeMap::new();
    let snap_dir = config.data_dir.join("snap");
    std::fs::create_dir_all(&snap_dir).map_err(EngineError::from)?;
    let fresh = ident.fresh;
    let node_ids = config.node_ids();
    let meta_kvs = crate::cluster_map::initial_kvs(&config);
    for g in 0..=config.cluster.data_groups {
        if fresh && config.bootstraps() {
            // A new cluster: this node starts the groups the bootstrap
            // placement gives it (later, replicas move by membership
            // change, never by config).
            let voters = placement::group_replicas(&node_ids, g, config.cluster.replicas);
            if voters.contains(&node_id) {
                let kvs: &[(Vec<u8>, Vec<u8>)] = if g == META_GROUP_ID { &meta_kvs } else { &[] };
                raft_storage::bootstrap(&engine, g, &voters, kvs)?;
            }
        }
        snapshot_file::resume_interrupted_install(&engine, g, &[], &counters)?;
        if !raft_storage::is_initialized(&engine, g)? {
            continue;
        }
        let peer = raft_storage::own_peer(&engine, g, node_id)?;
        groups.insert(g, conf::open_group(&config, &engine, g, peer)?);
    }
    if fresh {
        crate::identity::persist(&engine, &ident)?;
    }
    snapshot_file::sweep_stale(&snap_dir);
    // Every group id may come to be hosted here: per-group slots exist for
    // all of them (a few thousand at most).
    let all_groups = 0..=config.cluster.data_groups;
    let install_gen = Arc::new(InstallGen::new(all_groups.clone()));
    let installer = install::spawn(
        engine.clone(),
        install_gen.clone(),
        tx.downgrade(),
        groups.len(),
    )?;
    let flusher = flush::spawn(engine.clone(), tx.downgrade())?;
    let reclaimer = reclaim::spawn(engine.clone(), config.cluster.data_groups)?;
    let views = Arc::new(RwLock::new(BTreeMap::new()));
    let renewals: Arc<HashMap<u64, AtomicBool>> =
        Arc::new(all_groups.map(|g| (g, AtomicBool::new(false))).collect());
    let liveness = Arc::new(PeerLiveness::new(
        book.nodes().into_iter().map(|(id, _)| id),
    ));
    let handle = StoreHandle {
        tx,
        views: views.clone(),
        renewals: renewals.clone(),
        engine: engine.clone(),
        config: config.clone(),
        counters: counters.clone(),
        suspects,
        install_gen,
        liveness: liveness.clone(),
        book,
        store_uuid: ident.uuid,
    };
    let lease_ms = lease_ms(config.raft.tick_interval_ms, config.raft.election_ticks);
    let (config_tick_ms, config_election_ticks) =
        (config.raft.tick_interval_ms, config.raft.election_ticks);
    let mut store = Store {
        node_id,
        engine,
        config,
        groups,
        rx,
        transport,
        views,
        renewals,
        counters,
        read_ctx: read::ReadCtx::new(node_id),
        outgoing_snapshots: HashMap::new(),
        lease_duration: Duration::from_millis(lease_ms),
        started: Instant::now(),
        vote_quiet: Duration::from_millis(config_tick_ms * config_election_ticks as u64),
        installer,
        flusher,
        reclaimer,
        liveness,
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
                // Tests: `store_round=panic` kills the store thread.
                #[cfg(feature = "failpoints")]
                fail::fail_point!("store_round");
                let wait = next_tick.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, self.rx.recv()).await {
                    Ok(Some(msg)) => {
                        self.handle(msg);
                        let mut handled = 1u64;
                        for _ in 0..INBOX_BATCH_MAX {
                            match self.rx.try_recv() {
                                Ok(m) => self.handle(m),
                                Err(_) => break,
                            }
                            handled += 1;
                        }
                        crate::metrics::METRICS
                            .inbox_batch_messages
                            .observe(handled as f64);
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                let now = Instant::now();
                if now >= next_tick {
                    self.on_tick(now);
                    // From now, never catching up: a late tick followed at
                    // once by the next would let a follower count two ticks
                    // in one interval and grant votes before the
                    // (election_ticks - 1) ticks the lease relies on.
                    next_tick = now + tick;
                }
                self.issue_reads();
                self.handle_readies();
            }
            tracing::info!(node = self.node_id, "store stopped");
        });
    }

    fn handle(&mut self, msg: StoreMsg) {
        // Requests for a group wake it (see `hibernate`).
        match &msg {
            StoreMsg::Propose { group, .. }
            | StoreMsg::ReadIndex { group, .. }
            | StoreMsg::Repair { group, .. }
            | StoreMsg::RenewLease { group }
            | StoreMsg::TransferLeader { group, .. }
            | StoreMsg::ChangePeers { group, .. } => self.wake(*group),
            _ => {}
        }
        match msg {
            StoreMsg::Propose {
                group,
                data,
                request_id,
                retry_age_ms,
                cb,
            } => self.propose(group, data, request_id, retry_age_ms, cb),
            StoreMsg::ReadIndex {
                group,
                allow_follower,
                cb,
            } => self.on_read_index(group, allow_follower, cb),
            StoreMsg::Raft { msgs } => {
                for (group, conf_ver, m) in msgs {
                    self.on_raft_message(group, conf_ver, m);
                }
            }
            StoreMsg::RaftGc {
                from,
                group,
                conf_ver,
                peer,
            } => self.on_gc_notice(from, group, conf_ver, peer),
            StoreMsg::Hibernate {
                from,
                group,
                term,
                commit,
            } => self.on_hibernate_notice(from, group, term, commit),
            StoreMsg::ChangePeers {
                group,
                changes,
                conf_ver,
                cb,
            } => self.on_change_peers(group, changes, conf_ver, cb),
            StoreMsg::SnapshotReceived { group, msg, path } => {
                self.on_snapshot_received(group, *msg, path)
            }
            StoreMsg::SnapshotStatus { group, to, ok } => self.on_snapshot_status(group, to, ok),
            StoreMsg::SnapshotFilled { group, result } => self.on_snapshot_filled(group, result),
            StoreMsg::KvFlushed { applied, result } => self.on_kv_flushed(applied, result),
            StoreMsg::Unreachable { to } => {
                for g in self.groups.values_mut() {
                    if !g.is_leader() {
                        continue;
                    }
                    if let Some(peer) = g.members.peer_of(to) {
                        g.node.report_unreachable(peer);
                    }
                }
            }
            StoreMsg::Repair {
                group,
                volume,
                block,
                cb,
            } => self.on_repair(group, volume, block, cb),
            StoreMsg::RenewLease { group } => self.on_renew_lease(group),
            StoreMsg::TransferLeader { group, to } => self.on_transfer_leader(group, to),
            StoreMsg::Digest { group, cb } => {
                let r = match self.groups.get(&group) {
                    // Half rewritten while an install runs.
                    Some(g) if g.installing.is_some() => Err(StoreError::Busy {
                        group,
                        what: "snapshot install",
                    }),
                    Some(g) => Ok((self.engine.snapshot(), g.node.store().applied_index())),
                    None => Err(StoreError::NoSuchGroup(group)),
                };
                let _ = cb.send(r);
            }
        }
    }

    pub(super) fn update_view(&mut self, id: u64) {
        self.publish_view(id, false);
    }

    /// Publishes a group's view; with `progress`, the leader's per-replica
    /// progress too (once a tick: it is not needed per round).
    pub(super) fn publish_view(&mut self, id: u64, progress: bool) {
        let Some(g) = self.groups.get(&id) else {
            return;
        };
        let st = g.node.store();
        let progress = if !progress {
            None
        } else if g.is_leader() {
            let me = g.peer_id();
            let mut p: Vec<(u64, u64, &'static str)> = g
                .node
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, pr)| {
                    let state = match pr.state {
                        raft::ProgressState::Probe => "probe",
                        raft::ProgressState::Replicate => "replicate",
                        raft::ProgressState::Snapshot => "snapshot",
                    };
                    (membership::node_of(*id), pr.matched, state)
                })
                .collect();
            p.sort_unstable();
            Some(p.into())
        } else {
            Some(Arc::from(Vec::new()))
        };
        let mut views = match self.views.write() {
            Ok(v) => v,
            Err(_) => return,
        };
        let (progress, progress_commit) = match progress {
            Some(p) => (p, g.node.raft.raft_log.committed),
            None => views
                .get(&id)
                .map(|v| (v.progress.clone(), v.progress_commit))
                .unwrap_or_else(|| (Arc::from(Vec::new()), 0)),
        };
        let v = GroupView {
            group: id,
            peer: g.peer_id(),
            members: g.members.clone(),
            progress,
            progress_commit,
            leader_id: g.leader_hint().unwrap_or(0),
            term: g.node.raft.term,
            role: role_name(g.node.raft.state),
            commit_index: g.node.raft.raft_log.committed,
            applied_index: st.applied_index(),
            first_index: st.truncated_index() + 1,
            last_index: g.node.raft.raft_log.last_index(),
            lease_until: g.lease_until,
            lease_index: g.lease_index,
            transferring: g.node.raft.lead_transferee.is_some(),
            hibernating: g.hibernating,
        };
        views.insert(id, v);
    }
}
