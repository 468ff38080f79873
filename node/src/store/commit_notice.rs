//! Telling followers the commit index without a message per commit.
//!
//! raft-rs broadcasts an (often empty) append to every follower each time
//! a leader's commit index moves, unless `skip_bcast_commit` is set; then
//! followers learn it only from the next append or heartbeat. Under load
//! the next append comes within the same store round (it carries the new
//! commit index for free), but a group that goes quiet would leave its
//! followers one write behind until the next heartbeat: their applied
//! state lags and a hibernation notice (which needs the follower's commit
//! to match the leader's) would not be taken.
//!
//! So raftblk sets `skip_bcast_commit` and, at the end of each store
//! round, sends an empty append only to those followers that no append or
//! heartbeat of this term has told the current commit index yet: the
//! commit rides on the round's new appends when there are any, and costs
//! one message per follower per round (not per commit) when there are
//! none. raft-rs itself still broadcasts every commit while a membership
//! change is pending.

use raft::ProgressState;

use super::{Group, Store};

/// The highest commit index each follower has been sent in this term.
#[derive(Default)]
pub(super) struct CommitSent {
    term: u64,
    /// (peer, commit index sent); a handful of peers per group.
    by_peer: Vec<(u64, u64)>,
}

impl CommitSent {
    fn sent(&self, term: u64, peer: u64) -> u64 {
        if term != self.term {
            return 0;
        }
        self.by_peer
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(0, |(_, c)| *c)
    }

    /// Records what a queued append or heartbeat `(to, term, commit)`
    /// told its follower.
    pub(super) fn note(&mut self, (to, term, commit): (u64, u64, u64)) {
        if term != self.term {
            if term < self.term {
                return;
            }
            self.term = term;
            self.by_peer.clear();
        }
        match self.by_peer.iter_mut().find(|(p, _)| *p == to) {
            Some((_, c)) => *c = (*c).max(commit),
            None => self.by_peer.push((to, commit)),
        }
    }
}

impl Group {
    /// Followers that hold every entry but have not been sent the current
    /// commit index; for them an empty append carries it.
    fn followers_behind_commit(&self) -> Vec<u64> {
        let raft = &self.node.raft;
        let committed = raft.raft_log.committed;
        let next = raft.raft_log.last_index() + 1;
        raft.prs()
            .iter()
            .filter(|(id, p)| {
                **id != raft.id
                    // Anything else (probing, a snapshot, a full window)
                    // is raft-rs's own business: its next append or
                    // heartbeat carries the commit index.
                    && p.state == ProgressState::Replicate
                    && p.next_idx == next
                    && p.pending_request_snapshot == raft::INVALID_INDEX
                    && !p.is_paused()
                    && self.commit_sent.sent(raft.term, **id) < committed
            })
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Store {
    /// End of a store round: for each group of `ids` led here, tell its
    /// followers any commit index no message of this round carried.
    pub(super) fn send_commit_notices(&mut self, ids: &[u64]) {
        for &id in ids {
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            if !g.is_leader() || g.installing.is_some() {
                continue;
            }
            let behind = g.followers_behind_commit();
            if behind.is_empty() {
                continue;
            }
            for to in behind {
                g.node.raft.send_append(to);
            }
            // Leader messages raft-rs queued after this round's ready was
            // taken go out with the notices: those of a membership change
            // applied in the round's second phase (appends to a new peer, a
            // snapshot whose DB view the round already took). Leader
            // messages need nothing persisted first.
            let msgs = std::mem::take(&mut g.node.raft.msgs);
            self.send_messages(id, msgs);
        }
    }
}
