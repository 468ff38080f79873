//! The async side of the store: [`StoreHandle`], the cheap cloneable handle
//! services use to propose, read and inspect groups, and [`GroupView`], the
//! per-group facts (role, leader, indexes, lease) the store thread publishes
//! so readers need not ask it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use raftblk_proto::Command;
use tokio::sync::{mpsc, oneshot};

use super::lease_ms;
use crate::apply::ApplyResult;
use crate::config::NodeConfig;
use crate::counters::{Counters, InstallGen, PeerLiveness, Suspects};
use crate::engine::{Engine, OwnedSnapshot};
use crate::msg::{StoreError, StoreMsg};

/// What the rest of the node may know about a group without asking the
/// store thread.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    pub group: u64,
    /// This replica's raft peer id (its incarnation, see `membership`).
    pub peer: u64,
    /// The applied configuration; shared with the store: cloning a view
    /// does not allocate.
    pub members: Arc<crate::membership::Membership>,
    /// On the leader, refreshed every tick: each other replica's matched
    /// log index and progress state.
    pub progress: Arc<[(u64, u64, &'static str)]>,
    /// The leader's commit index when `progress` was taken (compare
    /// matched indexes with this, not with the newer `commit_index`).
    pub progress_commit: u64,
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
    /// Idle, not ticking (see `hibernate`).
    pub hibernating: bool,
}

/// Cheap, cloneable access to the store from async code.
#[derive(Clone)]
pub struct StoreHandle {
    pub(super) tx: mpsc::Sender<StoreMsg>,
    pub(super) views: Arc<RwLock<BTreeMap<u64, GroupView>>>,
    /// Per group: a `RenewLease` is already queued (at most one in the
    /// inbox per group, however many reads see a lease half gone).
    pub(super) renewals: Arc<std::collections::HashMap<u64, AtomicBool>>,
    pub engine: Engine,
    pub config: Arc<NodeConfig>,
    pub counters: Arc<Counters>,
    /// Blocks found corrupt here, waiting for a repair from the leader.
    pub suspects: Arc<Suspects>,
    /// Snapshot installs under way (reads check it, see `InstallGen`).
    pub install_gen: Arc<InstallGen>,
    /// When each peer node was last heard from (see `PeerLiveness`).
    pub liveness: Arc<PeerLiveness>,
    /// Where the other nodes are (see `address_book`).
    pub book: Arc<crate::address_book::AddressBook>,
    /// This data directory's identity (see `identity`).
    pub store_uuid: [u8; 16],
}

impl StoreHandle {
    /// Remembers a corrupt local block for repair (bounded).
    pub fn note_corrupt(&self, group: u64, volume: u64, block: u64) {
        self.suspects.note(group, volume, block);
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
        self.propose_request(group, cmd, &[], 0).await
    }

    /// Like `propose`, for a client request named by `request_id` (16
    /// bytes, or empty): applied at most once however often it is retried
    /// (`retry_age_ms`: 0 on the first attempt, see `dedup`).
    pub async fn propose_request(
        &self,
        group: u64,
        cmd: &Command,
        request_id: &[u8],
        retry_age_ms: u64,
    ) -> Result<ApplyResult, StoreError> {
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
            request_id: request_id.to_vec(),
            retry_age_ms,
            cb,
        };
        let m = &*crate::metrics::METRICS;
        let started = Instant::now();
        m.proposals.inc();
        let r = self.call(group, msg, rx).await.and_then(|r| r);
        m.proposal_seconds.observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            m.proposals_failed.inc();
        }
        r
    }

    /// Messages waiting in the store's inbox.
    pub fn inbox_depth(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
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
                    let lease = Duration::from_millis(lease_ms(
                        self.config.raft.tick_interval_ms,
                        self.config.raft.election_ticks,
                    ));
                    if until.saturating_duration_since(now) < lease / 2 {
                        self.request_renewal(group);
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

    /// Asks this node, as the leader of `group`, to repair a block from its
    /// own copy (see `repair`); resolves once the repair is applied.
    pub async fn repair(
        &self,
        group: u64,
        volume: u64,
        block: u64,
    ) -> Result<ApplyResult, StoreError> {
        let (cb, rx) = oneshot::channel();
        let msg = StoreMsg::Repair {
            group,
            volume,
            block,
            cb,
        };
        self.call(group, msg, rx).await?
    }

    /// Asks this node, as the leader of `group`, to propose one membership
    /// change step; resolves once it is applied here.
    pub async fn change_peers(
        &self,
        group: u64,
        changes: Vec<crate::membership::PeerChange>,
        conf_ver: u64,
    ) -> Result<ApplyResult, StoreError> {
        let (cb, rx) = oneshot::channel();
        let msg = StoreMsg::ChangePeers {
            group,
            changes,
            conf_ver,
            cb,
        };
        self.call(group, msg, rx).await?
    }

    /// Queues one `RenewLease` for `group` unless one is already queued.
    fn request_renewal(&self, group: u64) {
        let Some(flag) = self.renewals.get(&group) else {
            return;
        };
        if !flag.swap(true, Ordering::AcqRel)
            && self.tx.try_send(StoreMsg::RenewLease { group }).is_err()
        {
            flag.store(false, Ordering::Release);
        }
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
            .map_err(|_| StoreError::InboxFull { group })?
            .map_err(|_| StoreError::Stopped)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(StoreError::Stopped),
            Err(_) => Err(StoreError::TimedOut {
                group,
                what: "request",
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

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
node_id = 1
listen_addr = "127.0.0.1:7101"
data_dir = "/tmp/unused"
tls = { insecure_plaintext = true }
[cluster]
data_groups = 2
replicas = 1
[[cluster.nodes]]
id = 1
addr = "127.0.0.1:7101"
"#;

    /// However many reads find the lease half gone, the inbox holds one
    /// renewal per group until the store takes it.
    #[tokio::test]
    async fn lease_renewals_are_coalesced_per_group() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let config = NodeConfig::parse(CONFIG, std::path::Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let lease = Duration::from_millis(lease_ms(
            config.raft.tick_interval_ms,
            config.raft.election_ticks,
        ));
        let (tx, mut rx) = mpsc::channel(1024);
        let mut views = BTreeMap::new();
        for group in [1u64, 2] {
            views.insert(
                group,
                GroupView {
                    group,
                    role: "leader",
                    // A lease with less than half of it left.
                    lease_until: Some(Instant::now() + lease / 4),
                    ..Default::default()
                },
            );
        }
        let handle = StoreHandle {
            tx,
            views: Arc::new(RwLock::new(views)),
            renewals: Arc::new(
                [1u64, 2]
                    .into_iter()
                    .map(|g| (g, AtomicBool::new(false)))
                    .collect(),
            ),
            engine,
            config: Arc::new(config),
            counters: Default::default(),
            suspects: Default::default(),
            install_gen: Default::default(),
            liveness: Arc::new(PeerLiveness::new([1u64])),
            book: Default::default(),
            store_uuid: [0; 16],
        };
        for _ in 0..500 {
            for group in [1u64, 2] {
                handle
                    .read_index(group, false)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let mut renewals = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                StoreMsg::RenewLease { group } => renewals.push(group),
                _ => panic!("unexpected message"),
            }
        }
        renewals.sort_unstable();
        assert_eq!(renewals, vec![1, 2], "one renewal per group");
        // Once the store has taken it (clearing the flag), the next read
        // may queue another.
        handle.renewals[&1].store(false, Ordering::Release);
        handle
            .read_index(1, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            rx.try_recv(),
            Ok(StoreMsg::RenewLease { group: 1 })
        ));
        assert!(rx.try_recv().is_err());
    }
}
