//! A group's membership as this node knows it (voters, learners, the
//! outgoing voters of a joint configuration, and the configuration version
//! that rises with every applied change), and the rules a membership change
//! must follow before its leader proposes it (see `design/elastic.md`):
//! learners are added before they vote, a learner is promoted only once it
//! has caught up, a leader never removes itself, a joint configuration is
//! left before anything else changes.

use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
};

/// A learner may be promoted once its log matches the leader's up to at
/// most this many entries short of the commit index.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 64;

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
        Membership {
            voters: sorted(&cs.voters),
            learners: sorted(&learners),
            voters_outgoing: sorted(&cs.voters_outgoing),
            conf_ver,
        }
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
/// raft change to propose. `leader` is the proposing leader; `matched`
/// gives a replica's matched log index on the leader (None: unknown) and
/// `commit` the leader's commit index. An empty `changes` leaves a joint
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
                let lag_ok = matched(n)
                    .is_some_and(|i| i > 0 && i.saturating_add(PROMOTE_LAG_ENTRIES_MAX) >= commit);
                if !lag_ok {
                    return Err(format!(
                        "learner {n} has not caught up (matched {:?}, commit {commit})",
                        matched(n)
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
        let mut s = ConfChangeSingle::default();
        s.set_change_type(single);
        s.node_id = n;
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
        }
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
