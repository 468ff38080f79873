//! The placement driver. It runs on every node and acts only while the
//! node leads the meta group, once per heartbeat interval:
//!
//! 1. nodes: one not heard for `node_down_after_ms` is marked down; one
//!    down for `down_out_secs` is marked out (unless the cluster has the
//!    `noout` flag); a node that reports again is marked up by the
//!    heartbeat itself (see `service::map`);
//! 2. groups: `plan` picks the next step of each group from the map and
//!    the leaders' reports, and the driver asks the group's leader to make
//!    it (one `ChangePeers` or `TransferLeader` RPC, bounded in time). The
//!    group's own committed configuration stays the truth: a step that
//!    fails or races is simply planned again from the next report.
//!
//! The map's flags switch parts off: `noout` (never mark out),
//! `norecover` (no membership change at all), `norebalance` (repairs only).
//!
//! A learner that makes no catch-up progress for `learner_stall_secs` is
//! removed (see `learner_watch`).
//!
//! A new meta leader waits two heartbeat intervals before acting, so every
//! live node has reported; a node that never reports counts from then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::command::Cmd;
use raftblk_proto::{
    ChangePeersRequest, ClusterMap, Command, NodeState, PeerChange as PbPeerChange, PeerChangeKind,
    PlacementStatus, SetNodeCmd, TransferLeaderRequest, META_GROUP_ID,
};

use super::learner_watch::LearnerWatch;
use super::plan::{self, Action, GroupInfo, Limits, NodeInfo};
use super::reports::Reports;
use crate::membership::PeerChange;
use crate::store::StoreHandle;

/// The meta group's size: 5 voters once there are 5 nodes, else 3 (or as
/// many as there are), always odd where it can be.
pub fn meta_size(fit_nodes: usize) -> usize {
    if fit_nodes >= 5 {
        5
    } else {
        fit_nodes.min(3)
    }
}

/// The meta group's size for fit nodes in these failure domains: sized by
/// the domains when any is labelled (a node without a label counting as a
/// domain of its own), so its voters can sit in distinct domains and the
/// driver does not wait for a voter no free domain can hold.
pub fn meta_want<'a>(domains: impl Iterator<Item = &'a str>) -> usize {
    let mut labels = std::collections::BTreeSet::new();
    let (mut nodes, mut unlabelled) = (0, 0);
    for d in domains {
        nodes += 1;
        if d.is_empty() {
            unlabelled += 1;
        } else {
            labels.insert(d);
        }
    }
    meta_size(if labels.is_empty() {
        nodes
    } else {
        labels.len() + unlabelled
    })
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the driver last saw, for `Cluster.Status` (see `PlacementStatus`).
#[derive(Debug, Default)]
pub struct DriverStatus {
    inner: std::sync::Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    status: PlacementStatus,
    /// Groups moving at the last pass.
    moving: Vec<u64>,
    /// When recent moves finished (bounded).
    done_at: std::collections::VecDeque<Instant>,
}

const RATE_WINDOW: Duration = Duration::from_secs(300);

impl DriverStatus {
    pub fn get(&self) -> PlacementStatus {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).status
    }

    fn set_balanced(&self, balanced: bool) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .balanced = balanced;
    }

    fn inactive(&self) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = StatusInner::default();
    }

    fn update(&self, nodes: &[NodeInfo], groups: &[GroupInfo], since: Instant) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let fit = |n: u64| {
            nodes
                .iter()
                .any(|x| x.id == n && matches!(x.state, NodeState::Up | NodeState::Down))
        };
        let degraded = groups
            .iter()
            .filter(|g| {
                let fit_voters = g.voters.iter().filter(|v| fit(**v)).count();
                fit_voters < g.want || fit_voters < g.voters.len()
            })
            .count();
        let moving: Vec<u64> = groups
            .iter()
            .filter(|g| !g.learners.is_empty() || !g.voters_outgoing.is_empty())
            .map(|g| g.id)
            .collect();
        let now = Instant::now();
        let finished = s.moving.iter().filter(|g| !moving.contains(g)).count();
        for _ in 0..finished {
            if s.done_at.len() >= 4096 {
                s.done_at.pop_front();
            }
            s.done_at.push_back(now);
        }
        while s
            .done_at
            .front()
            .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
        {
            s.done_at.pop_front();
        }
        let window = now
            .duration_since(since)
            .min(RATE_WINDOW)
            .as_secs_f64()
            .max(1.0);
        let per_min = s.done_at.len() as f64 * 60.0 / window;
        let left = degraded.max(moving.len()) as f64;
        s.status = PlacementStatus {
            active: true,
            degraded_groups: degraded as u64,
            moves_in_progress: moving.len() as u64,
            moves_done: s.status.moves_done + finished as u64,
            moves_per_min: per_min,
            eta_secs: if left > 0.0 && per_min > 0.0 {
                (left * 60.0 / per_min).ceil() as u64
            } else {
                0
            },
            groups_reported: groups.len() as u64,
            balanced: s.status.balanced,
        };
        s.moving = moving;
    }
}

/// Runs until the process ends.
pub async fn run(store: StoreHandle, reports: Arc<Reports>, status: Arc<DriverStatus>) {
    let cfg = store.config.placement.clone();
    let every = Duration::from_millis(cfg.heartbeat_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_since: Option<Instant> = None;
    // Groups asked to change recently: skipped until their report moves
    // past that configuration or a few intervals pass.
    let mut asked: HashMap<u64, (u64, Instant)> = HashMap::new();
    let mut learners = LearnerWatch::default();
    let learner_stall = Duration::from_secs(cfg.learner_stall_secs);
    loop {
        tick.tick().await;
        let leader = store
            .view(META_GROUP_ID)
            .is_some_and(|v| v.role == "leader");
        if !leader {
            if leading_since.take().is_some() {
                reports.clear();
                asked.clear();
                learners = LearnerWatch::default();
                status.inactive();
            }
            continue;
        }
        let since = *leading_since.get_or_insert_with(Instant::now);
        if since.elapsed() < 2 * every {
            continue;
        }
        let Some(map) = crate::map_sync::read_local(&store).await else {
            continue;
        };
        if let Err(e) = mark_full(&store, &reports, &map).await {
            tracing::warn!(error = %e, "placement: cannot update full nodes");
        }
        if let Err(e) = mark_nodes(&store, &reports, &map, since).await {
            tracing::warn!(error = %e, "placement: cannot update node states");
            continue;
        }
        let flags = map.flags.unwrap_or_default();
        let (nodes, mut groups) = views(&store, &reports, &map, since);
        learners.observe(&mut groups, learner_stall, Instant::now());
        status.update(&nodes, &groups, since);
        if flags.norecover {
            continue;
        }
        let limits = Limits {
            moves_per_node_max: cfg.moves_per_node_max as usize,
            moves_max: cfg.moves_max as usize,
            rebalance: !flags.norebalance,
        };
        let now = Instant::now();
        asked.retain(|g, (ver, at)| {
            groups.iter().any(|x| x.id == *g && x.conf_ver == *ver)
                && now.duration_since(*at) < 5 * every
        });
        let planned = plan::plan(&nodes, &groups, limits);
        status.set_balanced(planned.is_empty());
        let actions: Vec<Action> = planned
            .into_iter()
            .filter(|a| {
                let g = match a {
                    Action::ChangePeers { group, .. } | Action::TransferLeader { group, .. } => {
                        *group
                    }
                };
                !asked.contains_key(&g)
            })
            .collect();
        for a in &actions {
            let (group, ver) = match a {
                Action::ChangePeers {
                    group, conf_ver, ..
                } => (*group, *conf_ver),
                Action::TransferLeader { group, .. } => (
                    *group,
                    groups
                        .iter()
                        .find(|g| g.id == *group)
                        .map_or(0, |g| g.conf_ver),
                ),
            };
            asked.insert(group, (ver, now));
        }
        let calls = actions.into_iter().map(|a| execute(&store, a));
        futures::future::join_all(calls).await;
    }
}

/// Records in the map which live nodes' disks are past the full ratio
/// (writes to their groups are refused, see `service::block_io`).
async fn mark_full(store: &StoreHandle, reports: &Reports, map: &ClusterMap) -> Result<(), String> {
    let ratio = store.config.placement.full_ratio;
    let mut full: Vec<u64> = reports
        .nodes()
        .into_iter()
        .filter(|(_, r)| {
            r.capacity_bytes > 0
                && (r.capacity_bytes - r.available_bytes.min(r.capacity_bytes)) as f64
                    > ratio * r.capacity_bytes as f64
        })
        .map(|(id, _)| id)
        .collect();
    full.sort_unstable();
    let mut have = map.full_nodes.clone();
    have.sort_unstable();
    if full == have {
        return Ok(());
    }
    tracing::warn!(full = ?full, ratio, "placement: nodes past the full ratio (writes to their groups refused)");
    let cmd = Command {
        cmd: Some(Cmd::SetFullNodes(raftblk_proto::SetFullNodesCmd {
            nodes: full,
        })),
    };
    match store.propose(META_GROUP_ID, &cmd).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Marks silent nodes down and long-down nodes out.
async fn mark_nodes(
    store: &StoreHandle,
    reports: &Reports,
    map: &ClusterMap,
    since: Instant,
) -> Result<(), String> {
    let cfg = &store.config.placement;
    let down_after = Duration::from_millis(cfg.node_down_after_ms);
    let noout = map.flags.as_ref().is_some_and(|f| f.noout);
    let now_ms = now_unix_ms();
    for n in &map.nodes {
        let state = NodeState::try_from(n.state).unwrap_or(NodeState::Unspecified);
        let heard = reports.node(n.id).map_or(since, |r| r.at.max(since));
        let new_state = match state {
            NodeState::Up if heard.elapsed() > down_after => NodeState::Down,
            NodeState::Down
                if !noout
                    && now_ms.saturating_sub(n.state_since_unix_ms)
                        >= cfg.down_out_secs.saturating_mul(1000) =>
            {
                NodeState::Out
            }
            _ => continue,
        };
        tracing::warn!(
            node = n.id,
            from = state.as_str_name(),
            to = new_state.as_str_name(),
            silent_ms = heard.elapsed().as_millis() as u64,
            "placement: node state changes"
        );
        let mut rec = n.clone();
        rec.state = new_state as i32;
        rec.state_since_unix_ms = now_ms;
        let cmd = Command {
            cmd: Some(Cmd::SetNode(SetNodeCmd {
                node: Some(rec),
                create: false,
                expect_state: n.state,
            })),
        };
        match store.propose(META_GROUP_ID, &cmd).await {
            Ok(Ok(_)) => {}
            // Changed meanwhile (an admin, a heartbeat): next pass.
            Ok(Err(e)) if e.kind() == raftblk_proto::ErrorCode::Unavailable => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Heartbeat intervals within which a node's last report counts as heard
/// now.
const HEARD_INTERVALS: u64 = 3;

/// `(live, heard)` of a node last reported at `at` (None: not since this
/// driver started at `since`): live if reported within `down_after`, a
/// node not heard yet counting from `since` (a new meta leader has not
/// had every report yet: its nodes and their learners are not judged dead
/// for it); heard only if really reported within `heard_within`.
fn liveness(
    at: Option<Instant>,
    since: Instant,
    down_after: Duration,
    heard_within: Duration,
) -> (bool, bool) {
    let live = at.map_or(since, |a| a.max(since)).elapsed() <= down_after;
    let heard = at.is_some_and(|a| a.elapsed() <= heard_within);
    (live, heard)
}

/// The planner's inputs: nodes from the map and their reports, groups from
/// their leaders' recent reports.
fn views(
    store: &StoreHandle,
    reports: &Reports,
    map: &ClusterMap,
    since: Instant,
) -> (Vec<NodeInfo>, Vec<GroupInfo>) {
    let cfg = &store.config.placement;
    let down_after = Duration::from_millis(cfg.node_down_after_ms);
    let heard_within = Duration::from_millis(cfg.heartbeat_interval_ms * HEARD_INTERVALS);
    let node_reports = reports.nodes();
    let nodes: Vec<NodeInfo> = map
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Removed as i32)
        .map(|n| {
            let r = node_reports.get(&n.id);
            let (live, heard) = liveness(r.map(|r| r.at), since, down_after, heard_within);
            let nearfull = r.is_some_and(|r| {
                r.capacity_bytes > 0
                    && (r.capacity_bytes - r.available_bytes.min(r.capacity_bytes)) as f64
                        > cfg.nearfull_ratio * r.capacity_bytes as f64
            });
            NodeInfo {
                id: n.id,
                state: NodeState::try_from(n.state).unwrap_or(NodeState::Unspecified),
                weight: n.weight,
                domain: n.failure_domain.clone(),
                live,
                heard,
                nearfull,
            }
        })
        .collect();
    let fit_nodes = || {
        nodes
            .iter()
            .filter(|n| matches!(n.state, NodeState::Up | NodeState::Down))
    };
    let fit = fit_nodes().count();
    let meta_voters = meta_want(fit_nodes().map(|n| n.domain.as_str()));
    let norebalance = map.flags.as_ref().is_some_and(|f| f.norebalance);
    let fresh = 3 * Duration::from_millis(cfg.heartbeat_interval_ms);
    let groups = reports
        .groups()
        .into_values()
        .filter(|r| r.at.elapsed() <= fresh)
        .map(|r| {
            let s = r.status;
            let want = if s.group_id != META_GROUP_ID {
                (map.replicas as usize).min(fit.max(1))
            } else if !norebalance {
                meta_voters
            } else {
                // Repairs only: keep the meta group's size.
                s.replicas.len()
            };
            GroupInfo {
                id: s.group_id,
                leader: r.leader,
                conf_ver: s.conf_ver,
                voters: s.replicas,
                learners: s.learners,
                voters_outgoing: s.voters_outgoing,
                progress: s
                    .progress
                    .into_iter()
                    .map(|p| (p.node_id, p.matched, p.state))
                    .collect(),
                commit: s.commit_index,
                want,
                stalled: Vec::new(),
            }
        })
        .collect();
    (nodes, groups)
}

fn to_pb(c: &PeerChange) -> PbPeerChange {
    let (kind, node_id) = match *c {
        PeerChange::AddLearner(n) => (PeerChangeKind::AddLearner, n),
        PeerChange::AddVoter(n) => (PeerChangeKind::AddVoter, n),
        PeerChange::Remove(n) => (PeerChangeKind::Remove, n),
    };
    PbPeerChange {
        kind: kind as i32,
        node_id,
    }
}

/// Asks a group's leader to carry out one action (bounded in time).
async fn execute(store: &StoreHandle, action: Action) {
    let leader = match &action {
        Action::ChangePeers { leader, .. } | Action::TransferLeader { leader, .. } => *leader,
    };
    let Some(addr) = store.book.addr(leader) else {
        return;
    };
    let timeout = Duration::from_millis(store.config.limits.request_timeout_ms);
    let call = async {
        let ch = crate::transport::connect(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut client = ClusterClient::new(ch);
        match &action {
            Action::ChangePeers {
                group,
                conf_ver,
                changes,
                why,
                ..
            } => {
                tracing::info!(group, leader, ?changes, why, "placement: membership step");
                let r = client
                    .change_peers(ChangePeersRequest {
                        group_id: *group,
                        changes: changes.iter().map(to_pb).collect(),
                        conf_ver: *conf_ver,
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if let Some(e) = r.error {
                    return Err(e.to_string());
                }
                // Entered a joint configuration that this leader stays in:
                // leaving it is always the next step, so take it now
                // rather than a pass later.
                if !r.voters_outgoing.is_empty() && r.voters.contains(&leader) {
                    tracing::info!(group, leader, "placement: leave the joint configuration");
                    let r = client
                        .change_peers(ChangePeersRequest {
                            group_id: *group,
                            changes: Vec::new(),
                            conf_ver: r.conf_ver,
                        })
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    if let Some(e) = r.error {
                        return Err(e.to_string());
                    }
                }
                Ok(())
            }
            Action::TransferLeader { group, to, why, .. } => {
                tracing::info!(group, leader, to, why, "placement: leadership transfer");
                let r = client
                    .transfer_leader(TransferLeaderRequest {
                        group_id: *group,
                        to_node: *to,
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                match r.error {
                    None => Ok(()),
                    Some(e) => Err(e.to_string()),
                }
            }
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::info!(leader, error = %e, "placement: step not made (planned again)")
        }
        Err(_) => tracing::info!(leader, "placement: step timed out (planned again)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_driver_gives_unreported_nodes_time_but_counts_only_heard_ones() {
        let down_after = Duration::from_secs(10);
        let heard_within = Duration::from_millis(600);
        let now = Instant::now();
        let since = now - Duration::from_secs(1);
        // Not reported yet to a driver that started a second ago: live
        // (not judged dead yet), not heard.
        assert_eq!(
            liveness(None, since, down_after, heard_within),
            (true, false)
        );
        // Reported just now: both.
        assert_eq!(
            liveness(Some(now), since, down_after, heard_within),
            (true, true)
        );
        // Silent for 5 s of a 10 s down interval: not down yet, but not
        // to be counted on for a quorum after a removal.
        let quiet = now - Duration::from_secs(5);
        assert_eq!(
            liveness(
                Some(quiet),
                now - Duration::from_secs(60),
                down_after,
                heard_within
            ),
            (true, false)
        );
        // Never reported to a driver running for a minute: dead.
        let old = now - Duration::from_secs(60);
        assert_eq!(
            liveness(None, old, down_after, heard_within),
            (false, false)
        );
    }

    #[test]
    fn the_meta_group_is_sized_by_failure_domains_when_labelled() {
        assert_eq!(meta_want(["", "", "", "", ""].into_iter()), 5);
        assert_eq!(meta_want(["", "", "", ""].into_iter()), 3);
        // Five nodes in three racks: three voters, one per rack.
        assert_eq!(meta_want(["a", "b", "c", "a", "b"].into_iter()), 3);
        assert_eq!(meta_want(["a", "b", "c", "d", "e", "a"].into_iter()), 5);
        assert_eq!(meta_want(["a", "a", "a"].into_iter()), 1);
        // An unlabelled node is a domain of its own.
        assert_eq!(meta_want(["a", "b", "", "", "c"].into_iter()), 5);
    }
}
