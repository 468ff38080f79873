//! What the placement driver should do next, as a pure function of the
//! nodes (state, liveness, disk, weight, domain) and the groups as their
//! leaders report them. Each group advances by at most one step per pass:
//!
//! - a joint configuration is left (after moving leadership to an incoming
//!   voter if need be);
//! - a learner on a node that is no longer fit is removed (the move rolls
//!   back), a learner that caught up is promoted, replacing a voter on an
//!   unfit node or, for a rebalancing move, the voter on the fullest node;
//! - a group short of healthy voters gets a learner on the best node: up
//!   and heard, not nearfull, not in a failure domain the group already
//!   uses, fewest replicas for its weight;
//! - a group with too many voters loses one.
//!
//! Most degraded groups go first; moves are bounded per node and in the
//! cluster. When nothing is degraded, one rebalancing move at a time evens
//! out replica counts (within one, by weight), then leaderships.

use std::collections::BTreeMap;

use raftblk_proto::NodeState;

use crate::membership::{PeerChange, PROMOTE_LAG_ENTRIES_MAX};

/// One node as the driver sees it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: u64,
    pub state: NodeState,
    pub weight: u64,
    pub domain: String,
    /// Reported within the down interval.
    pub live: bool,
    /// Disk fuller than the nearfull ratio.
    pub nearfull: bool,
}

impl NodeInfo {
    /// May hold replicas (voters stay, learners may be added).
    fn fit(&self) -> bool {
        matches!(self.state, NodeState::Up | NodeState::Down)
    }

    /// May receive a new replica.
    fn accepts(&self) -> bool {
        self.state == NodeState::Up && self.live && !self.nearfull && self.weight > 0
    }
}

/// One group as its leader reports it.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub id: u64,
    pub leader: u64,
    pub conf_ver: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    /// Other replicas' matched index and progress state, on the leader.
    pub progress: Vec<(u64, u64, String)>,
    pub commit: u64,
    /// Voters the group should have.
    pub want: usize,
}

/// Bounds on concurrent moves.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub moves_per_node_max: usize,
    pub moves_max: usize,
    /// Balance replica counts and leaderships when nothing is degraded.
    pub rebalance: bool,
}

/// A step for the driver to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ChangePeers {
        group: u64,
        leader: u64,
        conf_ver: u64,
        changes: Vec<PeerChange>,
        why: &'static str,
    },
    TransferLeader {
        group: u64,
        leader: u64,
        to: u64,
        why: &'static str,
    },
}

fn caught_up(g: &GroupInfo, node: u64) -> bool {
    g.progress.iter().any(|(n, matched, state)| {
        *n == node
            && state == "replicate"
            && *matched > 0
            && matched.saturating_add(PROMOTE_LAG_ENTRIES_MAX) >= g.commit
    })
}

struct Ctx<'a> {
    nodes: BTreeMap<u64, &'a NodeInfo>,
    /// Replicas per node, counting moves planned in this pass.
    load: BTreeMap<u64, usize>,
    /// Moves touching each node (as target or source), this pass included.
    busy: BTreeMap<u64, usize>,
    moves: usize,
    limits: Limits,
}

impl Ctx<'_> {
    fn fit(&self, n: u64) -> bool {
        self.nodes.get(&n).is_some_and(|x| x.fit())
    }

    fn live(&self, n: u64) -> bool {
        self.nodes.get(&n).is_some_and(|x| x.live)
    }

    /// Replicas per unit of weight (lower: emptier).
    fn fullness(&self, n: u64) -> f64 {
        let w = self.nodes.get(&n).map_or(1, |x| x.weight.max(1)) as f64;
        *self.load.get(&n).unwrap_or(&0) as f64 / w
    }

    /// More than half of `voters` are on live, fit nodes.
    fn live_majority(&self, voters: &[u64]) -> bool {
        let live = voters
            .iter()
            .filter(|v| self.fit(**v) && self.live(**v))
            .count();
        live * 2 > voters.len()
    }

    fn has_room(&self, n: u64) -> bool {
        self.busy.get(&n).copied().unwrap_or(0) < self.limits.moves_per_node_max
    }

    fn note_move(&mut self, nodes: &[u64]) {
        self.moves += 1;
        for n in nodes {
            *self.busy.entry(*n).or_insert(0) += 1;
        }
    }

    /// The best node for a new replica of `g` (replacing `leaving`).
    fn target(&self, g: &GroupInfo, leaving: Option<u64>) -> Option<u64> {
        let members: Vec<u64> = g
            .voters
            .iter()
            .chain(&g.learners)
            .chain(&g.voters_outgoing)
            .copied()
            .collect();
        let labelled = self.nodes.values().any(|n| !n.domain.is_empty());
        let used: Vec<&str> = members
            .iter()
            .filter(|m| Some(**m) != leaving)
            .filter_map(|m| self.nodes.get(m))
            .map(|n| n.domain.as_str())
            .collect();
        self.nodes
            .values()
            .filter(|n| n.accepts() && !members.contains(&n.id) && self.has_room(n.id))
            .filter(|n| !labelled || !used.contains(&n.domain.as_str()))
            .min_by(|a, b| {
                self.fullness(a.id)
                    .total_cmp(&self.fullness(b.id))
                    .then(a.id.cmp(&b.id))
            })
            .map(|n| n.id)
    }

    /// A live, fit voter of `g` other than `not` to hand leadership to.
    fn transferee(&self, g: &GroupInfo, among: &[u64], not: u64) -> Option<u64> {
        among
            .iter()
            .copied()
            .filter(|v| *v != not && self.fit(*v) && self.live(*v))
            .max_by_key(|v| {
                g.progress
                    .iter()
                    .find(|(n, _, _)| n == v)
                    .map_or(0, |(_, m, _)| *m)
            })
    }
}

/// Health of a group for ordering: fewer fit voters first.
fn degraded_rank(g: &GroupInfo, ctx: &Ctx<'_>) -> (usize, u64) {
    let fit = g.voters.iter().filter(|v| ctx.fit(**v)).count();
    (fit.min(g.want), g.id)
}

/// The actions of one pass.
pub fn plan(nodes: &[NodeInfo], groups: &[GroupInfo], limits: Limits) -> Vec<Action> {
    let mut ctx = Ctx {
        nodes: nodes.iter().map(|n| (n.id, n)).collect(),
        load: BTreeMap::new(),
        busy: BTreeMap::new(),
        moves: 0,
        limits,
    };
    for g in groups {
        for m in g.voters.iter().chain(&g.learners) {
            *ctx.load.entry(*m).or_insert(0) += 1;
        }
        // Moves under way: a learner or a joint configuration.
        if !g.learners.is_empty() || !g.voters_outgoing.is_empty() {
            let mut touched = g.learners.clone();
            touched.extend(g.voters_outgoing.iter().filter(|v| !g.voters.contains(v)));
            ctx.note_move(&touched);
        }
    }
    let mut order: Vec<&GroupInfo> = groups.iter().collect();
    order.sort_by_key(|g| degraded_rank(g, &ctx));
    let mut actions = Vec::new();
    for g in &order {
        if let Some(a) = step(g, &mut ctx) {
            actions.push(a);
        }
    }
    if actions.is_empty() && ctx.moves == 0 && limits.rebalance {
        if let Some(a) = rebalance(&order, &mut ctx) {
            actions.push(a);
        } else if let Some(a) = balance_leaders(&order, &ctx) {
            actions.push(a);
        }
    }
    actions
}

fn change(g: &GroupInfo, changes: Vec<PeerChange>, why: &'static str) -> Action {
    Action::ChangePeers {
        group: g.id,
        leader: g.leader,
        conf_ver: g.conf_ver,
        changes,
        why,
    }
}

fn step(g: &GroupInfo, ctx: &mut Ctx<'_>) -> Option<Action> {
    if !g.voters_outgoing.is_empty() {
        if g.voters.contains(&g.leader) {
            return Some(change(g, Vec::new(), "leave the joint configuration"));
        }
        let to = ctx.transferee(g, &g.voters, g.leader)?;
        return Some(Action::TransferLeader {
            group: g.id,
            leader: g.leader,
            to,
            why: "the leader leaves with the joint configuration",
        });
    }
    if let Some(l) = g
        .learners
        .iter()
        .copied()
        .find(|l| !ctx.fit(*l) || !ctx.live(*l))
    {
        return Some(change(
            g,
            vec![PeerChange::Remove(l)],
            "learner on an unfit node",
        ));
    }
    if let Some(l) = g.learners.iter().copied().find(|l| caught_up(g, *l)) {
        // The voter to replace: one on an unfit node, else a dead one, else
        // (a rebalancing move) the one on the fullest node.
        let unfit = g.voters.iter().copied().find(|v| !ctx.fit(*v));
        let dead = g.voters.iter().copied().find(|v| !ctx.live(*v));
        let victim = match unfit.or(dead) {
            Some(v) => Some(v),
            None if g.voters.len() >= g.want => g
                .voters
                .iter()
                .copied()
                .max_by(|a, b| ctx.fullness(*a).total_cmp(&ctx.fullness(*b)).then(a.cmp(b))),
            None => None,
        };
        let mut after: Vec<u64> = g
            .voters
            .iter()
            .copied()
            .filter(|v| Some(*v) != victim)
            .collect();
        after.push(l);
        if !ctx.live_majority(&after) {
            return None;
        }
        if victim == Some(g.leader) {
            let to = ctx.transferee(g, &g.voters, g.leader)?;
            return Some(Action::TransferLeader {
                group: g.id,
                leader: g.leader,
                to,
                why: "the leader's replica is being replaced",
            });
        }
        let mut changes = vec![PeerChange::AddVoter(l)];
        if let Some(v) = victim {
            changes.push(PeerChange::Remove(v));
            if let Some(x) = ctx.load.get_mut(&v) {
                *x = x.saturating_sub(1);
            }
        }
        return Some(change(g, changes, "promote a caught-up learner"));
    }
    if !g.learners.is_empty() {
        return None; // catching up
    }
    let unfit = g
        .voters
        .iter()
        .copied()
        .find(|v| !ctx.fit(*v) && *v != g.leader);
    if g.voters.len() > g.want {
        // Too many voters (the meta group shrinking to an odd size): drop
        // an unfit one, else a dead one, else the one on the fullest node;
        // only if the voters left still have a live majority.
        let dead = g
            .voters
            .iter()
            .copied()
            .find(|v| !ctx.live(*v) && *v != g.leader);
        let v = unfit.or(dead).or_else(|| {
            g.voters
                .iter()
                .copied()
                .filter(|v| *v != g.leader)
                .max_by(|a, b| ctx.fullness(*a).total_cmp(&ctx.fullness(*b)).then(a.cmp(b)))
        })?;
        let after: Vec<u64> = g.voters.iter().copied().filter(|x| *x != v).collect();
        if !ctx.live_majority(&after) {
            return None;
        }
        return Some(change(g, vec![PeerChange::Remove(v)], "one voter too many"));
    }
    let unfit_any = g.voters.iter().copied().find(|v| !ctx.fit(*v));
    if unfit_any.is_some() || g.voters.len() < g.want {
        if ctx.moves >= ctx.limits.moves_max {
            return None;
        }
        if let Some(v) = unfit_any {
            if !ctx.has_room(v) && ctx.live(v) {
                // A draining node sends a snapshot per move; a dead one
                // sends nothing and is not bounded.
                return None;
            }
        }
        let t = ctx.target(g, unfit_any)?;
        *ctx.load.entry(t).or_insert(0) += 1;
        let mut touched = vec![t];
        touched.extend(unfit_any);
        ctx.note_move(&touched);
        return Some(change(
            g,
            vec![PeerChange::AddLearner(t)],
            if unfit_any.is_some() {
                "replace a replica on an unfit node"
            } else {
                "add a missing replica"
            },
        ));
    }
    None
}

/// One move from the fullest node to the emptiest, if their replica counts
/// (per weight) differ by more than one replica.
fn rebalance(order: &[&GroupInfo], ctx: &mut Ctx<'_>) -> Option<Action> {
    let accepting: Vec<u64> = ctx
        .nodes
        .values()
        .filter(|n| n.accepts())
        .map(|n| n.id)
        .collect();
    let fullest = accepting
        .iter()
        .copied()
        .max_by(|a, b| ctx.fullness(*a).total_cmp(&ctx.fullness(*b)).then(b.cmp(a)))?;
    let emptiest = accepting
        .iter()
        .copied()
        .min_by(|a, b| ctx.fullness(*a).total_cmp(&ctx.fullness(*b)).then(a.cmp(b)))?;
    let w = |n: u64| ctx.nodes.get(&n).map_or(1, |x| x.weight.max(1)) as f64;
    // Moving one replica must leave the emptiest no fuller than the fullest.
    let after_full = ctx.fullness(fullest) - 1.0 / w(fullest);
    let after_empty = ctx.fullness(emptiest) + 1.0 / w(emptiest);
    if fullest == emptiest || after_empty > after_full + 1e-9 {
        return None;
    }
    for g in order {
        // (A source that leads the group hands leadership over at the
        // promotion step.)
        if g.voters.contains(&fullest) && !g.voters.contains(&emptiest) {
            if ctx.target(g, Some(fullest)) != Some(emptiest) {
                continue;
            }
            ctx.note_move(&[fullest, emptiest]);
            return Some(change(
                g,
                vec![PeerChange::AddLearner(emptiest)],
                "rebalance replica counts",
            ));
        }
    }
    None
}

/// One leadership transfer from a node leading more groups to a voter of
/// the group leading at least two fewer.
fn balance_leaders(order: &[&GroupInfo], ctx: &Ctx<'_>) -> Option<Action> {
    let mut led: BTreeMap<u64, usize> = ctx
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Up && n.live)
        .map(|n| (n.id, 0))
        .collect();
    for g in order {
        if let Some(c) = led.get_mut(&g.leader) {
            *c += 1;
        }
    }
    let mut by_load: Vec<&&GroupInfo> = order
        .iter()
        .filter(|g| led.contains_key(&g.leader))
        .collect();
    by_load.sort_by_key(|g| {
        (
            std::cmp::Reverse(led.get(&g.leader).copied().unwrap_or(0)),
            g.id,
        )
    });
    for g in by_load {
        let hi = led.get(&g.leader).copied().unwrap_or(0);
        let to = g
            .voters
            .iter()
            .copied()
            .filter(|v| *v != g.leader && led.get(v).is_some_and(|c| c + 1 < hi))
            .min_by_key(|v| (led.get(v).copied().unwrap_or(0), *v));
        if let Some(to) = to {
            return Some(Action::TransferLeader {
                group: g.id,
                leader: g.leader,
                to,
                why: "spread leaderships",
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, state: NodeState) -> NodeInfo {
        NodeInfo {
            id,
            state,
            weight: 100,
            domain: String::new(),
            live: state != NodeState::Down && state != NodeState::Out,
            nearfull: false,
        }
    }

    fn group(id: u64, voters: &[u64], leader: u64) -> GroupInfo {
        GroupInfo {
            id,
            leader,
            conf_ver: 1,
            voters: voters.to_vec(),
            learners: vec![],
            voters_outgoing: vec![],
            progress: voters
                .iter()
                .filter(|v| **v != leader)
                .map(|v| (*v, 100, "replicate".to_string()))
                .collect(),
            commit: 100,
            want: 3,
        }
    }

    const LIMITS: Limits = Limits {
        moves_per_node_max: 2,
        moves_max: 16,
        rebalance: true,
    };

    #[test]
    fn an_out_node_is_replaced_learner_first_then_joint_then_leave() {
        let nodes = [
            node(1, NodeState::Up),
            node(2, NodeState::Up),
            node(3, NodeState::Out),
            node(4, NodeState::Up),
        ];
        let g = group(7, &[1, 2, 3], 1);
        let a = plan(&nodes, std::slice::from_ref(&g), LIMITS);
        assert_eq!(
            a,
            vec![Action::ChangePeers {
                group: 7,
                leader: 1,
                conf_ver: 1,
                changes: vec![PeerChange::AddLearner(4)],
                why: "replace a replica on an unfit node"
            }]
        );
        // Catching up: nothing to do.
        let mut g2 = g.clone();
        g2.learners = vec![4];
        g2.progress.push((4, 10, "snapshot".into()));
        assert!(plan(&nodes, std::slice::from_ref(&g2), LIMITS).is_empty());
        // Caught up: promote it and drop the out node in one joint step.
        g2.progress.retain(|p| p.0 != 4);
        g2.progress.push((4, 99, "replicate".into()));
        let a = plan(&nodes, std::slice::from_ref(&g2), LIMITS);
        assert!(matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::AddVoter(4), PeerChange::Remove(3)]));
        // Joint: leave.
        let mut g3 = g.clone();
        g3.voters = vec![1, 2, 4];
        g3.voters_outgoing = vec![1, 2, 3];
        let a = plan(&nodes, std::slice::from_ref(&g3), LIMITS);
        assert!(matches!(&a[0], Action::ChangePeers { changes, .. } if changes.is_empty()));
    }

    #[test]
    fn the_meta_group_sheds_a_dead_voter_when_nowhere_can_take_it() {
        let nodes: Vec<NodeInfo> = [
            NodeState::Up,
            NodeState::Up,
            NodeState::Up,
            NodeState::Up,
            NodeState::Out,
        ]
        .iter()
        .enumerate()
        .map(|(i, s)| node(i as u64 + 1, *s))
        .collect();
        let mut meta = group(0, &[1, 2, 3, 4, 5], 1);
        meta.want = 3;
        let a = plan(&nodes, std::slice::from_ref(&meta), LIMITS);
        assert!(
            matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::Remove(5)]),
            "{a:?}"
        );
        // With a spare node, a dead meta voter is replaced instead.
        let mut nodes6 = nodes.clone();
        nodes6.push(node(6, NodeState::Up));
        meta.want = 5;
        let a = plan(&nodes6, &[meta], LIMITS);
        assert!(
            matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::AddLearner(6)]),
            "{a:?}"
        );
    }

    #[test]
    fn no_removal_leaves_a_group_without_a_live_majority() {
        // Node 2 is down (rebooting), node 3 drains, three nodes in all:
        // dropping node 3 would leave {1, 2} with one live voter.
        let nodes = [
            node(1, NodeState::Up),
            node(2, NodeState::Down),
            node(3, NodeState::Draining),
        ];
        let mut g = group(1, &[1, 2, 3], 1);
        g.want = 2;
        assert!(plan(&nodes, std::slice::from_ref(&g), LIMITS).is_empty());
        // A caught-up learner replaces the dead voter rather than a live one.
        let nodes = [
            node(1, NodeState::Up),
            node(2, NodeState::Down),
            node(3, NodeState::Up),
            node(4, NodeState::Up),
        ];
        let mut g = group(1, &[1, 2, 3], 1);
        g.learners = vec![4];
        g.progress.push((4, 100, "replicate".into()));
        let a = plan(&nodes, &[g], LIMITS);
        assert!(
            matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::AddVoter(4), PeerChange::Remove(2)]),
            "{a:?}"
        );
    }

    #[test]
    fn a_down_node_is_not_replaced_but_its_learner_rolls_back() {
        let nodes = [
            node(1, NodeState::Up),
            node(2, NodeState::Up),
            node(3, NodeState::Down),
            node(4, NodeState::Down),
        ];
        assert!(plan(&nodes, &[group(1, &[1, 2, 3], 1)], LIMITS).is_empty());
        let mut g = group(1, &[1, 2, 3], 1);
        g.learners = vec![4];
        let a = plan(&nodes, &[g], LIMITS);
        assert!(matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::Remove(4)]));
    }

    #[test]
    fn the_leader_is_moved_before_its_replica_is_replaced() {
        let nodes = [
            node(1, NodeState::Draining),
            node(2, NodeState::Up),
            node(3, NodeState::Up),
            node(4, NodeState::Up),
        ];
        let mut g = group(1, &[1, 2, 3], 1);
        g.learners = vec![4];
        g.progress.push((4, 100, "replicate".into()));
        let a = plan(&nodes, &[g], LIMITS);
        assert!(matches!(&a[0], Action::TransferLeader { to, .. } if *to == 2 || *to == 3));
        // In a joint configuration led by an outgoing voter too.
        let mut j = group(1, &[2, 3, 4], 1);
        j.voters_outgoing = vec![1, 2, 3];
        let a = plan(&nodes, &[j], LIMITS);
        assert!(matches!(&a[0], Action::TransferLeader { .. }));
    }

    #[test]
    fn targets_respect_domains_fullness_and_limits() {
        let mut nodes: Vec<NodeInfo> = (1..=6).map(|i| node(i, NodeState::Up)).collect();
        for (n, d) in nodes.iter_mut().zip(["a", "a", "b", "c", "c", "d"]) {
            n.domain = d.to_string();
        }
        nodes[2].state = NodeState::Out; // node 3, domain b
        nodes[5].nearfull = true; // node 6, the only other new domain
                                  // Group on 1 (a), 3 (b), 4 (c): the replacement cannot go to a or c
                                  // (used), nor to nearfull 6: nowhere.
        let g = group(1, &[1, 3, 4], 1);
        assert!(plan(&nodes, std::slice::from_ref(&g), LIMITS).is_empty());
        nodes[5].nearfull = false;
        let a = plan(&nodes, std::slice::from_ref(&g), LIMITS);
        assert!(matches!(&a[0], Action::ChangePeers { changes, .. }
            if changes == &vec![PeerChange::AddLearner(6)]));
        // Moves per node: three groups to re-home onto one possible node.
        let groups: Vec<GroupInfo> = (1..=3).map(|i| group(i, &[1, 3, 4], 1)).collect();
        let a = plan(&nodes, &groups, LIMITS);
        assert_eq!(a.len(), 2, "{a:?}");
    }

    #[test]
    fn a_new_node_gets_replicas_one_move_at_a_time_and_leaders_spread() {
        let mut nodes: Vec<NodeInfo> = (1..=3).map(|i| node(i, NodeState::Up)).collect();
        let groups: Vec<GroupInfo> = (1..=6).map(|i| group(i, &[1, 2, 3], 1)).collect();
        // Balanced counts, all led by node 1: spread leadership.
        let a = plan(&nodes, &groups, LIMITS);
        assert!(
            matches!(&a[0], Action::TransferLeader { leader: 1, .. }),
            "{a:?}"
        );
        // A fourth node: replicas move to it.
        nodes.push(node(4, NodeState::Up));
        let a = plan(&nodes, &groups, LIMITS);
        assert_eq!(a.len(), 1);
        assert!(
            matches!(&a[0], Action::ChangePeers { changes, why: "rebalance replica counts", .. }
            if changes == &vec![PeerChange::AddLearner(4)])
        );
        // Balanced within one: nothing.
        let spread = [
            [1, 2, 3],
            [1, 2, 4],
            [1, 3, 4],
            [2, 3, 4],
            [1, 2, 3],
            [2, 3, 4],
        ];
        let leaders = [1, 2, 3, 4, 3, 2];
        let groups: Vec<GroupInfo> = spread
            .iter()
            .zip(leaders)
            .enumerate()
            .map(|(i, (v, l))| group(i as u64 + 1, v, l))
            .collect();
        assert!(
            plan(&nodes, &groups, LIMITS).is_empty(),
            "{:?}",
            plan(&nodes, &groups, LIMITS)
        );
    }
}
