//! The planner's view of one pass ([`Ctx`]) and the choices it makes with
//! it: where a new replica goes, which voter gives its place up, who takes
//! over leadership. Failure domains are kept distinct at every choice:
//! a new replica goes to a domain the group does not use, and the voter
//! given up is, after one on an unfit or dead node, one whose domain
//! another voter shares.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use raftblk_proto::NodeState;

use super::{GroupInfo, Limits, NodeInfo};

impl NodeInfo {
    /// May hold replicas (voters stay, learners may be added).
    pub(super) fn fit(&self) -> bool {
        matches!(self.state, NodeState::Up | NodeState::Down)
    }

    /// May receive a new replica.
    pub(super) fn accepts(&self) -> bool {
        self.state == NodeState::Up && self.live && !self.nearfull && self.weight > 0
    }

    /// Gives its replicas away to nodes that can take them: weight 0, or a
    /// disk past the nearfull ratio.
    pub(super) fn sheds(&self) -> bool {
        self.state == NodeState::Up && (self.weight == 0 || self.nearfull)
    }
}

pub(super) struct Ctx<'a> {
    pub(super) nodes: BTreeMap<u64, &'a NodeInfo>,
    /// Replicas per node, counting moves planned in this pass.
    pub(super) load: BTreeMap<u64, usize>,
    /// Moves touching each node (as target or source), this pass included.
    pub(super) busy: BTreeMap<u64, usize>,
    pub(super) moves: usize,
    pub(super) limits: Limits,
    /// Some node has a failure domain: keep each group's in distinct ones.
    pub(super) labelled: bool,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(nodes: &'a [NodeInfo], limits: Limits) -> Self {
        Ctx {
            nodes: nodes.iter().map(|n| (n.id, n)).collect(),
            load: BTreeMap::new(),
            busy: BTreeMap::new(),
            moves: 0,
            limits,
            labelled: nodes.iter().any(|n| !n.domain.is_empty()),
        }
    }

    pub(super) fn fit(&self, n: u64) -> bool {
        self.nodes.get(&n).is_some_and(|x| x.fit())
    }

    pub(super) fn live(&self, n: u64) -> bool {
        self.nodes.get(&n).is_some_and(|x| x.live)
    }

    fn heard(&self, n: u64) -> bool {
        self.nodes.get(&n).is_some_and(|x| x.heard)
    }

    pub(super) fn sheds(&self, n: u64) -> bool {
        self.nodes.get(&n).is_some_and(|x| x.sheds())
    }

    fn domain(&self, n: u64) -> Option<&str> {
        self.nodes
            .get(&n)
            .map(|x| x.domain.as_str())
            .filter(|d| !d.is_empty())
    }

    /// `v`'s failure domain is also another of `set`'s.
    pub(super) fn domain_clash(&self, set: &[u64], v: u64) -> bool {
        self.labelled
            && self
                .domain(v)
                .is_some_and(|d| set.iter().any(|o| *o != v && self.domain(*o) == Some(d)))
    }

    /// Replicas per unit of weight (lower: emptier).
    pub(super) fn fullness(&self, n: u64) -> f64 {
        let w = self.nodes.get(&n).map_or(1, |x| x.weight.max(1)) as f64;
        *self.load.get(&n).unwrap_or(&0) as f64 / w
    }

    /// Which of two replica holders should give one up first: one that
    /// sheds, then the fuller (ties: the larger id).
    pub(super) fn excess_cmp(&self, a: u64, b: u64) -> Ordering {
        self.sheds(a)
            .cmp(&self.sheds(b))
            .then(self.fullness(a).total_cmp(&self.fullness(b)))
            .then(a.cmp(&b))
    }

    /// More than half of `voters` are on fit nodes heard from now (a
    /// voter silent for less than the down interval may be dead already).
    pub(super) fn live_majority(&self, voters: &[u64]) -> bool {
        let live = voters
            .iter()
            .filter(|v| self.fit(**v) && self.heard(**v))
            .count();
        live * 2 > voters.len()
    }

    pub(super) fn has_room(&self, n: u64) -> bool {
        self.busy.get(&n).copied().unwrap_or(0) < self.limits.moves_per_node_max
    }

    /// Counts a move of `g` touching `nodes` against each of them and
    /// against the group's leader, which sends the snapshot.
    pub(super) fn note_move(&mut self, g: &GroupInfo, nodes: &[u64]) {
        self.moves += 1;
        let sender = (g.leader != 0 && !nodes.contains(&g.leader)).then_some(g.leader);
        for n in nodes.iter().chain(sender.as_ref()) {
            *self.busy.entry(*n).or_insert(0) += 1;
        }
    }

    /// The best node for a new replica of `g` (replacing `leaving`): it
    /// accepts replicas, is not in a failure domain the group's other
    /// members use, and is the emptiest for its weight.
    pub(super) fn target(&self, g: &GroupInfo, leaving: Option<u64>) -> Option<u64> {
        let members: Vec<u64> = g
            .voters
            .iter()
            .chain(&g.learners)
            .chain(&g.voters_outgoing)
            .copied()
            .collect();
        let used: Vec<&str> = members
            .iter()
            .filter(|m| Some(**m) != leaving)
            .filter_map(|m| self.domain(*m))
            .collect();
        self.nodes
            .values()
            .filter(|n| n.accepts() && !members.contains(&n.id) && self.has_room(n.id))
            .filter(|n| !self.labelled || !used.contains(&n.domain.as_str()))
            .min_by(|a, b| {
                self.fullness(a.id)
                    .total_cmp(&self.fullness(b.id))
                    .then(a.id.cmp(&b.id))
            })
            .map(|n| n.id)
    }

    /// The voter among `among` to give up, for `joining` (a learner being
    /// promoted, if any) or one voter too many: one on an unfit node, else
    /// a dead one, else one whose failure domain another voter (or the
    /// joining one) shares, else the one on the node that sheds or is the
    /// fullest.
    pub(super) fn victim(&self, g: &GroupInfo, among: &[u64], joining: Option<u64>) -> Option<u64> {
        if let Some(v) = among.iter().copied().find(|v| !self.fit(*v)) {
            return Some(v);
        }
        if let Some(v) = among.iter().copied().find(|v| !self.live(*v)) {
            return Some(v);
        }
        let mut set = g.voters.clone();
        set.extend(joining);
        among.iter().copied().max_by(|a, b| {
            self.domain_clash(&set, *a)
                .cmp(&self.domain_clash(&set, *b))
                .then(self.excess_cmp(*a, *b))
        })
    }

    /// A live, fit voter of `g` other than `not` to hand leadership to.
    pub(super) fn transferee(&self, g: &GroupInfo, among: &[u64], not: u64) -> Option<u64> {
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
