//! Hibernation of idle groups, so a node with thousands of quiet groups
//! does not spend its CPU on their heartbeats (TiKV's hibernate regions).
//!
//! - A leader whose group has been idle for two election timeouts (nothing
//!   pending, every voter's log matching its own and every voter having
//!   reported the commit index, everything committed and applied, no
//!   membership change or transfer under way) drops its lease,
//!   tells each follower, and stops ticking: no heartbeats. A hibernating
//!   leader holds no read lease; a read wakes it and goes through a
//!   ReadIndex round.
//! - A follower that is told by its current leader, in the current term,
//!   with its log at the leader's commit index, stops ticking too.
//! - Anything for the group wakes it: a raft message, a proposal, a read, a
//!   transfer or membership request. A leader that wakes resets its quorum
//!   check (its followers were silent on purpose).
//! - The leader's death is seen at the node level (peers' raft streams
//!   carry a keepalive every heartbeat interval, see `PeerLiveness`): a
//!   hibernating follower whose leader's node has been silent for an
//!   election timeout wakes with its election timer expired, so it may
//!   grant votes and campaigns after its randomized timeout, as if it had
//!   ticked all along. A hibernating follower asked for a vote wakes too,
//!   and counts its leader's lease as expired once that node has been
//!   silent for half an election timeout: safe, since a hibernating leader
//!   holds no lease.

use std::time::Duration;

use raft::prelude::{Message, MessageType};

use super::{Group, Store};

impl Group {
    /// Nothing for this leader's group to do: it may hibernate.
    fn idle_leader(&self) -> bool {
        let raft = &self.node.raft;
        if !self.is_leader()
            || self.installing.is_some()
            || self.incoming_snapshot.is_some()
            || !self.pending.is_empty()
            || !self.dup_waiters.is_empty()
            || !self.reads_unsent.is_empty()
            || !self.reads_inflight.is_empty()
            || !self.reads_waiting_apply.is_empty()
            || self.renew_lease
            || raft.lead_transferee.is_some()
            || raft.has_pending_conf()
            || !self.members.learners.is_empty()
            || self.members.is_joint()
        {
            return false;
        }
        let last = raft.raft_log.last_index();
        raft.raft_log.committed == last
            && self.node.store().applied_index() == last
            // Every follower has said it knows the commit index: else a
            // follower would refuse the hibernation notice and, with no
            // heartbeats coming, campaign (see `commit_notice`).
            && raft
                .prs()
                .iter()
                .all(|(_, p)| p.matched == last && p.committed_index == last)
    }
}

impl Store {
    fn election_timeout(&self) -> Duration {
        Duration::from_millis(
            self.config.raft.tick_interval_ms * self.config.raft.election_ticks as u64,
        )
    }

    /// Wakes `group` if it hibernates (anything but a raft message for it).
    pub(super) fn wake(&mut self, group: u64) {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.hibernating {
                wake_group(g);
            }
        }
    }

    /// A raft message for a hibernating group: false if it only confirms
    /// the sleep (the leader's plain heartbeat with nothing new, or its
    /// answer, which the leader still steps), else the group wakes; a vote
    /// request also expires the leader's lease if the leader's node has
    /// gone quiet.
    pub(super) fn wake_for_message(&mut self, group: u64, m: &Message, vote: bool) -> bool {
        let half = self.election_timeout() / 2;
        let Some(g) = self.groups.get_mut(&group) else {
            return true;
        };
        if !g.hibernating {
            return true;
        }
        let raft = &g.node.raft;
        let same_term = m.term == raft.term && m.context.is_empty();
        match m.get_msg_type() {
            MessageType::MsgHeartbeat
                if same_term
                    && !g.is_leader()
                    && m.from == raft.leader_id
                    && m.commit <= raft.raft_log.committed =>
            {
                return false;
            }
            MessageType::MsgHeartbeatResponse if same_term && g.is_leader() && g.idle_leader() => {
                return false;
            }
            _ => {}
        }
        let leader = g.node.raft.leader_id;
        // Its leader asking for a vote restarted (it lost its leadership
        // with its process): its lease is gone as well.
        let quiet = leader != 0
            && leader != g.peer_id()
            && (m.from == leader
                || self
                    .liveness
                    .silent_for(crate::membership::node_of(leader))
                    .is_none_or(|d| d >= half));
        wake_group(g);
        if vote && quiet {
            let et = g.node.raft.election_timeout();
            g.node.raft.election_elapsed = g.node.raft.election_elapsed.max(et);
        }
        true
    }

    /// The leader of `group` says it hibernates (term, commit index).
    pub(super) fn on_hibernate_notice(&mut self, from: u64, group: u64, term: u64, commit: u64) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let raft = &g.node.raft;
        if g.is_leader()
            || g.installing.is_some()
            || crate::membership::node_of(raft.leader_id) != from
            || raft.term != term
            || raft.raft_log.committed != commit
            || raft.raft_log.last_index() != commit
        {
            return;
        }
        g.hibernating = true;
        // An idle group keeps no entries cached.
        g.node.mut_store().clear_cache();
        self.update_view(group);
    }

    /// Once a tick, after the groups ticked: idle leaders go to sleep,
    /// sleeping followers whose leader's node went silent wake up.
    pub(super) fn hibernate_pass(&mut self) {
        let et = self.election_timeout();
        let idle_ticks_min = 2 * self.config.raft.election_ticks as u32;
        let mut notices = Vec::new();
        let mut changed = Vec::new();
        for g in self.groups.values_mut() {
            if g.hibernating {
                if g.is_leader() {
                    continue;
                }
                let leader = g.leader_hint().unwrap_or(0);
                let dead = leader == 0 || self.liveness.silent_for(leader).is_none_or(|d| d >= et);
                if dead {
                    tracing::info!(group = g.id, leader, "leader's node silent: waking up");
                    wake_group(g);
                    let timeout = g.node.raft.election_timeout();
                    g.node.raft.election_elapsed = g.node.raft.election_elapsed.max(timeout);
                    changed.push(g.id);
                }
                continue;
            }
            if !g.idle_leader() {
                g.idle_ticks = 0;
                continue;
            }
            g.idle_ticks += 1;
            if g.idle_ticks < idle_ticks_min {
                continue;
            }
            g.hibernating = true;
            g.node.mut_store().clear_cache();
            g.lease_until = None;
            let term = g.node.raft.term;
            let commit = g.node.raft.raft_log.committed;
            let me = g.peer_id();
            for (id, _) in g.node.raft.prs().iter() {
                if *id != me {
                    notices.push((crate::membership::node_of(*id), g.id, term, commit));
                }
            }
            changed.push(g.id);
        }
        for (to, group, term, commit) in notices {
            self.transport.send_hibernate(to, group, term, commit);
        }
        for id in changed {
            self.update_view(id);
        }
    }
}

fn wake_group(g: &mut Group) {
    g.hibernating = false;
    g.idle_ticks = 0;
    if g.is_leader() {
        // Its followers were silent on purpose: do not let the quorum
        // check that the next tick may run count that against them.
        g.node.raft.election_elapsed = 0;
        for (_, p) in g.node.raft.mut_prs().iter_mut() {
            p.recent_active = true;
        }
    }
}
