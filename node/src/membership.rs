//! A group's membership as this node knows it (voters, learners, the
//! outgoing voters of a joint configuration, and the configuration version
//! that rises with every applied change), and the rules a membership change
//! must follow before its leader proposes it (see `design/elastic.md`):
//! learners are added before they vote, a learner is promoted only once it
//! has caught up, a leader never removes itself, a joint configuration is
//! left before anything else changes.
//!
//! Replica incarnations (TiKV's peer ids): a replica's raft id is its node
//! id plus, in the high 32 bits, the configuration version that added it
//! (0 for the replicas a group was bootstrapped with, so theirs equal their
//! node ids). A replica removed from a node and added back is a new raft
//! peer: raft-rs keeps no progress, vote or acknowledgement of the old one
//! for it, and the old one, should it come back, is a stranger to the group
//! (see `store::conf`). Everything outside the raft layer (the cluster map,
//! the placement driver, the RPCs) speaks node ids; [`Membership`] keeps
//! node ids and the peer id of each.

use std::collections::BTreeMap;

use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
};

/// A learner may be promoted once its log matches the leader's up to at
/// most this many entries short of the commit index.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 64;

/// Node ids fit in 32 bits (the rest of a peer id is the incarnation).
pub const NODE_ID_MAX: u64 = u32::MAX as u64;

/// The node a raft peer id lives on.
pub fn node_of(peer: u64) -> u64 {
    peer & NODE_ID_MAX
}

/// The incarnation of a raft peer id: the configuration version that added
/// it (0: a bootstrap replica).
pub fn incarnation_of(peer: u64) -> u64 {
    peer >> 32
}

/// The raft peer id of `node`'s replica added at configuration version
/// `incarnation`.
pub fn peer_id(node: u64, incarnation: u64) -> u64 {
    debug_assert!(node <= NODE_ID_MAX && incarnation <= NODE_ID_MAX);
    (incarnation << 32) | (node & NODE_ID_MAX)
}

/// The members of one group at one configuration version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Voters (in a joint configuration: the incoming ones), sorted.
    pub voters: Vec<u64>,
    /// Learners, including those a joint configuration will add, sorted.
    pub learners: Vec<u64>,
    /// In a joint configuration: the outgoing voters (else empty), sorted.
    pub voters_outgoing: Vec<u64>,
    /// Rises by one with every applied membership change; 0 while the
    /// replica is uninitialized (waiting for its first snapshot).
    pub conf_ver: u64,
    /// The raft peer id of each member node's replica.
    pub peers: BTreeMap<u64, u64>,
}

fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

impl Membership {
    pub fn new(cs: &ConfState, conf_ver: u64) -> Membership {
        let mut learners = cs.learners.clone();
        learners.extend_from_slice(&cs.learners_next);
        let nodes = |peers: &[u64]| sorted(&peers.iter().map(|p| node_of(*p)).collect::<Vec<_>>());
        let peers = cs
            .voters
            .iter()
            .chain(&learners)
            .chain(&cs.voters_outgoing)
            .map(|p| (node_of(*p), *p))
            .collect::<BTreeMap<u64, u64>>();
        // A node holds one incarnation at a time: `plan` never adds a node
        // that is still in the configuration.
        debug_assert!(
            cs.voters
                .iter()
                .chain(&learners)
                .chain(&cs.voters_outgoing)
                .all(|p| peers.get(&node_of(*p)) == Some(p)),
            "two incarnations of one node in {cs:?}"
        );
        Membership {
            voters: nodes(&cs.voters),
            learners: nodes(&learners),
            voters_outgoing: nodes(&cs.voters_outgoing),
            conf_ver,
            peers,
        }
    }

    /// The raft peer id of `node`'s replica, if it has one.
    pub fn peer_of(&self, node: u64) -> Option<u64> {
        self.peers.get(&node).copied()
    }

    /// True if raft peer `peer` (this very incarnation) is a member.
    pub fn has_peer(&self, peer: u64) -> bool {
        self.peer_of(node_of(peer)) == Some(peer)
    }

    /// True if `node` has any part in the configuration.
    pub fn contains(&self, node: u64) -> bool {
        self.voters.contains(&node)
            || self.learners.contains(&node)
            || self.voters_outgoing.contains(&node)
    }

    /// True if `node` votes (in either half of a joint configuration).
    pub fn is_voter(&self, node: u64) -> bool {
        self.voters.contains(&node) || self.voters_outgoing.contains(&node)
    }

    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Every node with a replica, sorted.
    pub fn all(&self) -> Vec<u64> {
        let mut v = self.voters.clone();
        v.extend_from_slice(&self.learners);
        v.extend_from_slice(&self.voters_outgoing);
        sorted(&v)
    }
}

/// One requested step of a membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    AddLearner(u64),
    /// Adds a voter, or promotes a learner.
    AddVoter(u64),
    Remove(u64),
}

impl PeerChange {
    pub fn node(self) -> u64 {
        match self {
            PeerChange::AddLearner(n) | PeerChange::AddVoter(n) | PeerChange::Remove(n) => n,
        }
    }
}

/// Checks `changes` against the group's membership and turns them into the
/// raft change to propose. `leader` is the proposing leader's node;
/// `matched` gives a raft peer's matched log index on the leader (None:
/// unknown) and `commit` the leader's commit index. A learner added now is
/// a new incarnation: its peer id carries the version this change makes. An empty `changes` leaves a joint
/// configuration. One change is a simple change; several enter a joint
/// configuration that a later empty change leaves.
pub fn plan(
    m: &Membership,
    leader: u64,
    changes: &[PeerChange],
    matched: impl Fn(u64) -> Option<u64>,
    commit: u64,
) -> Result<ConfChangeV2, String> {
    let mut cc = ConfChangeV2::default();
    if changes.is_empty() {
        if !m.is_joint() {
            return Err("the group is not in a joint configuration: nothing to leave".into());
        }
        if !m.voters.contains(&leader) {
            return Err(format!(
                "leader {leader} leaves with the joint configuration: transfer leadership to an incoming voter first"
            ));
        }
        return Ok(cc);
    }
    if m.is_joint() {
        return Err("the group is in a joint configuration: leave it first".into());
    }
    let mut seen = Vec::new();
    let mut voters_after = m.voters.clone();
    for c in changes {
        let n = c.node();
        if n == 0 {
            return Err("node id 0 is not a node".into());
        }
        if seen.contains(&n) {
            return Err(format!("node {n} named twice"));
        }
        seen.push(n);
        let single = match *c {
            PeerChange::AddLearner(_) => {
                if m.voters.contains(&n) {
                    return Err(format!("node {n} is already a voter"));
                }
                if m.learners.contains(&n) {
                    return Err(format!("node {n} is already a learner"));
                }
                ConfChangeType::AddLearnerNode
            }
            PeerChange::AddVoter(_) => {
                if m.voters.contains(&n) {
                    return Err(format!("node {n} is already a voter"));
                }
                if !m.learners.contains(&n) {
                    return Err(format!(
                        "node {n} is not a learner: add it as a learner and let it catch up first"
                    ));
                }
                let got = m.peer_of(n).and_then(&matched);
                let lag_ok = got
                    .is_some_and(|i| i > 0 && i.saturating_add(PROMOTE_LAG_ENTRIES_MAX) >= commit);
                if !lag_ok {
                    return Err(format!(
                        "learner {n} has not caught up (matched {got:?}, commit {commit})"
                    ));
                }
                voters_after.push(n);
                ConfChangeType::AddNode
            }
            PeerChange::Remove(_) => {
                if !m.contains(n) {
                    return Err(format!("node {n} is not a member"));
                }
                if n == leader {
                    return Err(format!(
                        "node {n} leads the group: transfer leadership before removing it"
                    ));
                }
                voters_after.retain(|v| *v != n);
                ConfChangeType::RemoveNode
            }
        };
        let peer = match *c {
            PeerChange::AddLearner(_) => {
                if n > NODE_ID_MAX || m.conf_ver >= NODE_ID_MAX {
                    return Err(format!(
                        "node {n} at configuration version {} does not fit a peer id",
                        m.conf_ver
                    ));
                }
                peer_id(n, m.conf_ver + 1)
            }
            _ => m.peer_of(n).unwrap_or(n),
        };
        let mut s = ConfChangeSingle::default();
        s.set_change_type(single);
        s.node_id = peer;
        cc.mut_changes().push(s);
    }
    if voters_after.is_empty() {
        return Err("a group keeps at least one voter".into());
    }
    let adds_learner = changes
        .iter()
        .any(|c| matches!(c, PeerChange::AddLearner(_)));
    let removes_voter = changes
        .iter()
        .any(|c| matches!(c, PeerChange::Remove(n) if m.voters.contains(n)));
    if adds_learner && removes_voter {
        return Err(
            "add the new replica first: a voter is removed only when its replacement votes".into(),
        );
    }
    // A single change is applied at once; several go through a joint
    // configuration left by an explicit empty change (raft-rs 0.7 does not
    // leave by itself when the leader changes meanwhile).
    cc.set_transition(if changes.len() > 1 {
        ConfChangeTransition::Explicit
    } else {
        ConfChangeTransition::Auto
    });
    Ok(cc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(voters: &[u64], learners: &[u64], outgoing: &[u64]) -> Membership {
        Membership {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            voters_outgoing: outgoing.to_vec(),
            conf_ver: 3,
            peers: voters
                .iter()
                .chain(learners)
                .chain(outgoing)
                .map(|n| (*n, *n))
                .collect(),
        }
    }

    #[test]
    fn a_learner_added_again_is_a_new_peer() {
        let caught_up = |_| Some(100);
        // Node 4's replica added at version 4 (this change makes 3 + 1).
        let cc = plan(
            &m(&[1, 2, 3], &[], &[]),
            1,
            &[PeerChange::AddLearner(4)],
            caught_up,
            100,
        )
        .expect("add learner");
        let p4 = cc.changes[0].node_id;
        assert_eq!((node_of(p4), incarnation_of(p4)), (4, 4));
        assert_ne!(p4, 4, "not the bootstrap peer id");
        let cs = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![p4],
            ..Default::default()
        };
        let mm = Membership::new(&cs, 4);
        assert_eq!(mm.learners, vec![4]);
        assert!(mm.contains(4) && mm.has_peer(p4) && !mm.has_peer(4));
        assert_eq!(mm.peer_of(4), Some(p4));
        // Promotion and removal name the existing peer; promotion asks for
        // that peer's progress.
        let cc = plan(
            &mm,
            1,
            &[PeerChange::AddVoter(4), PeerChange::Remove(3)],
            |p| (p == p4).then_some(100),
            100,
        )
        .expect("promote");
        assert_eq!(cc.changes[0].node_id, p4);
        assert_eq!(cc.changes[1].node_id, 3);
        let cc = plan(&mm, 1, &[PeerChange::Remove(4)], caught_up, 100).expect("remove");
        assert_eq!(cc.changes[0].node_id, p4);
        // Added back later: another peer again.
        let back = plan(
            &Membership::new(
                &ConfState {
                    voters: vec![1, 2, 3],
                    ..Default::default()
                },
                9,
            ),
            1,
            &[PeerChange::AddLearner(4)],
            caught_up,
            100,
        )
        .expect("add back");
        assert_eq!(incarnation_of(back.changes[0].node_id), 10);
    }

    #[test]
    fn a_move_is_learner_then_joint_then_leave() {
        let caught_up = |_| Some(100);
        let cc = plan(
            &m(&[1, 2, 3], &[], &[]),
            1,
            &[PeerChange::AddLearner(4)],
            caught_up,
            100,
        )
        .expect("add learner");
        assert_eq!(cc.changes.len(), 1);
        assert_eq!(cc.get_transition(), ConfChangeTransition::Auto);
        let cc = plan(
            &m(&[1, 2, 3], &[4], &[]),
            1,
            &[PeerChange::AddVoter(4), PeerChange::Remove(3)],
            caught_up,
            100,
        )
        .expect("replace");
        assert_eq!(cc.changes.len(), 2);
        assert_eq!(cc.get_transition(), ConfChangeTransition::Explicit);
        let cc = plan(&m(&[1, 2, 4], &[], &[1, 2, 3]), 1, &[], caught_up, 100).expect("leave");
        assert!(cc.changes.is_empty());
    }

    #[test]
    fn unsafe_steps_are_refused() {
        let members = m(&[1, 2, 3], &[4], &[]);
        let at = |i: u64| move |_| Some(i);
        // Promotion before catching up.
        let e = plan(&members, 1, &[PeerChange::AddVoter(4)], at(10), 100).unwrap_err();
        assert!(e.contains("not caught up"), "{e}");
        assert!(plan(&members, 1, &[PeerChange::AddVoter(4)], |_| None, 100).is_err());
        assert!(plan(&members, 1, &[PeerChange::AddVoter(4)], at(40), 100).is_ok());
        // A voter straight from nowhere, the leader removing itself.
        assert!(plan(&members, 1, &[PeerChange::AddVoter(5)], at(100), 100).is_err());
        let e = plan(&members, 1, &[PeerChange::Remove(1)], at(100), 100).unwrap_err();
        assert!(e.contains("transfer leadership"), "{e}");
        // Duplicates, strangers, doubles.
        assert!(plan(&members, 1, &[PeerChange::Remove(9)], at(100), 100).is_err());
        assert!(plan(&members, 1, &[PeerChange::AddLearner(4)], at(100), 100).is_err());
        assert!(plan(&members, 1, &[PeerChange::AddLearner(2)], at(100), 100).is_err());
        assert!(plan(
            &members,
            1,
            &[PeerChange::Remove(2), PeerChange::Remove(2)],
            at(100),
            100
        )
        .is_err());
        // Nothing to leave; nothing else while joint; the last voter stays.
        assert!(plan(&members, 1, &[], at(100), 100).is_err());
        let joint = m(&[1, 2, 4], &[], &[1, 2, 3]);
        assert!(plan(&joint, 1, &[PeerChange::AddLearner(5)], at(100), 100).is_err());
        let e = plan(&m(&[2, 4], &[], &[1, 2]), 1, &[], at(100), 100).unwrap_err();
        assert!(e.contains("transfer leadership"), "{e}");
        assert!(plan(&m(&[1], &[2], &[]), 1, &[PeerChange::Remove(2)], at(1), 1).is_ok());
        assert!(plan(
            &m(&[1, 2], &[], &[]),
            1,
            &[PeerChange::Remove(2), PeerChange::AddLearner(3)],
            at(1),
            1
        )
        .is_err());
    }

    #[test]
    fn membership_reads_a_joint_conf_state() {
        let cs = ConfState {
            voters: vec![4, 1, 2],
            voters_outgoing: vec![3, 1, 2],
            learners: vec![],
            learners_next: vec![3],
            ..Default::default()
        };
        let mm = Membership::new(&cs, 7);
        assert_eq!(mm.voters, vec![1, 2, 4]);
        assert_eq!(mm.voters_outgoing, vec![1, 2, 3]);
        assert_eq!(mm.learners, vec![3]);
        assert!(mm.is_joint() && mm.contains(3) && mm.is_voter(3) && !mm.contains(5));
        assert_eq!(mm.all(), vec![1, 2, 3, 4]);
    }
}
