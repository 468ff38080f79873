//! What the placement driver should do next, as a pure function of the
//! nodes (state, liveness, disk, weight, domain) and the groups as their
//! leaders report them. Each group advances by at most one step per pass:
//!
//! - a joint configuration is left (after moving leadership to an incoming
//!   voter if need be);
//! - a learner on a node that is no longer fit, or past its catch-up
//!   deadline, is removed (the move rolls back), a learner that caught up is promoted, replacing a voter on an
//!   unfit or dead node, else one whose failure domain another shares,
//!   else the one on the node that sheds replicas or is the fullest;
//! - a group short of healthy voters gets a learner on the best node: up
//!   and heard, not nearfull, not in a failure domain the group already
//!   uses, fewest replicas for its weight;
//! - a group with too many voters loses one;
//! - a group whose voters share a failure domain while a node of an unused
//!   domain could take one gets a learner there (bootstrap placement
//!   ignores domains, and labels may change).
//!
//! Most degraded groups go first; moves are bounded per node (counting the
//! group's leader, which sends the snapshot) and in the cluster. When nothing is degraded, one rebalancing move at a time gives
//! away the replicas of nodes that shed them (weight 0, nearfull disk) or
//! evens out replica counts (within one, by weight), then leaderships.
//!
//! The choices themselves (targets, the voter given up, transferees) are
//! in `choose`.

mod choose;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use raftblk_proto::NodeState;

use crate::membership::{PeerChange, PROMOTE_LAG_ENTRIES_MAX};
use choose::Ctx;

/// One node as the driver sees it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: u64,
    pub state: NodeState,
    pub weight: u64,
    pub domain: String,
    /// Reported within the down interval (a node a new driver has not
    /// heard from yet gets the interval from the driver's start).
    pub live: bool,
    /// Reported within the last few heartbeat intervals: a removal is
    /// planned only if the voters left have a majority heard now, not
    /// merely not yet marked down.
    pub heard: bool,
    /// Disk fuller than the nearfull ratio.
    pub nearfull: bool,
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
    /// Learners past their catch-up deadline (see `learner_watch`).
    pub stalled: Vec<u64>,
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

/// Health of a group for ordering: fewer fit voters first.
fn degraded_rank(g: &GroupInfo, ctx: &Ctx<'_>) -> (usize, u64) {
    let fit = g.voters.iter().filter(|v| ctx.fit(**v)).count();
    (fit.min(g.want), g.id)
}

/// The actions of one pass.
pub fn plan(nodes: &[NodeInfo], groups: &[GroupInfo], limits: Limits) -> Vec<Action> {
    let mut ctx = Ctx::new(nodes, limits);
    for g in groups {
        for m in g.voters.iter().chain(&g.learners) {
            *ctx.load.entry(*m).or_insert(0) += 1;
        }
        // Moves under way: a learner or a joint configuration.
        if !g.learners.is_empty() || !g.voters_outgoing.is_empty() {
            let mut touched = g.learners.clone();
            touched.extend(g.voters_outgoing.iter().filter(|v| !g.voters.contains(v)));
            ctx.note_move(g, &touched);
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
    if let Some(&l) = g.stalled.iter().find(|l| g.learners.contains(l)) {
        return Some(change(
            g,
            vec![PeerChange::Remove(l)],
            "learner made no catch-up progress",
        ));
    }
    if let Some(l) = g.learners.iter().copied().find(|l| caught_up(g, *l)) {
        // The voter it replaces (see `Ctx::victim`); none when it fills a
        // missing place.
        let replaces =
            g.voters.len() >= g.want || g.voters.iter().any(|v| !ctx.fit(*v) || !ctx.live(*v));
        let victim = if replaces {
            ctx.victim(g, &g.voters, Some(l))
        } else {
            None
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
    if g.voters.len() > g.want {
        // Too many voters (the meta group shrinking to an odd size): drop
        // one other than the leader (see `Ctx::victim`), only if the
        // voters left still have a live majority.
        let others: Vec<u64> = g
            .voters
            .iter()
            .copied()
            .filter(|v| *v != g.leader)
            .collect();
        let v = ctx.victim(g, &others, None)?;
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
        if !ctx.has_room(g.leader) {
            return None; // its leader sends enough snapshots already
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
        ctx.note_move(g, &touched);
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
    // Voters sharing a failure domain: one moves to a domain the group
    // does not use, if a node there can take it (the learner's promotion
    // then gives up a voter of the shared domain).
    let clashing = g
        .voters
        .iter()
        .copied()
        .filter(|v| ctx.domain_clash(&g.voters, *v))
        .max_by(|a, b| ctx.excess_cmp(*a, *b))?;
    if ctx.moves >= ctx.limits.moves_max || !ctx.has_room(clashing) || !ctx.has_room(g.leader) {
        return None;
    }
    let t = ctx.target(g, Some(clashing))?;
    *ctx.load.entry(t).or_insert(0) += 1;
    ctx.note_move(g, &[t, clashing]);
    Some(change(
        g,
        vec![PeerChange::AddLearner(t)],
        "voters share a failure domain",
    ))
}

/// One move off a node that sheds replicas (weight 0, nearfull disk) to
/// the best node for the group, else from one of the fullest nodes to the
/// emptiest if their replica counts (per weight) differ by more than one
/// replica. Sources are tried from the most in excess down, so that a
/// group's failure domains allow the move (a new node's only possible
/// source is the voter in its own domain).
fn rebalance(order: &[&GroupInfo], ctx: &mut Ctx<'_>) -> Option<Action> {
    let mut sources: Vec<u64> = ctx
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Up && ctx.load.get(&n.id).is_some_and(|l| *l > 0))
        .map(|n| n.id)
        .collect();
    sources.sort_by(|a, b| ctx.excess_cmp(*b, *a));
    let emptiest = ctx
        .nodes
        .values()
        .filter(|n| n.accepts())
        .map(|n| n.id)
        .min_by(|a, b| ctx.fullness(*a).total_cmp(&ctx.fullness(*b)).then(a.cmp(b)));
    let w = |n: u64| ctx.nodes.get(&n).map_or(1, |x| x.weight.max(1)) as f64;
    for source in sources {
        // (A source that leads a group hands leadership over at the
        // promotion step.)
        let (to, why) = if ctx.sheds(source) {
            (None, "move a replica off a node that sheds them")
        } else {
            let e = emptiest?;
            // Moving one replica must leave the emptiest no fuller than
            // the source.
            let after_full = ctx.fullness(source) - 1.0 / w(source);
            let after_empty = ctx.fullness(e) + 1.0 / w(e);
            if source == e || after_empty > after_full + 1e-9 {
                return None;
            }
            (Some(e), "rebalance replica counts")
        };
        for g in order {
            if !g.voters.contains(&source) || !ctx.has_room(g.leader) {
                continue;
            }
            let Some(t) = ctx.target(g, Some(source)) else {
                continue;
            };
            if to.is_some_and(|e| e != t) {
                continue;
            }
            ctx.note_move(g, &[source, t]);
            return Some(change(g, vec![PeerChange::AddLearner(t)], why));
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
