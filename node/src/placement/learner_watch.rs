//! Catch-up deadlines for learners. A learner added by a move must make
//! progress: its matched log index grows, or a snapshot to it is under way
//! (a transfer is itself abandoned when it moves no bytes, see
//! `transport::send_snapshot`, so time spent in the snapshot state is
//! progress of a live transfer). A learner that does neither for
//! `placement.learner_stall_secs` — its node rejects what the leader
//! sends, its snapshot keeps failing before it starts, the log it needs
//! is gone — is marked stalled; the planner removes it with a log line and
//! plans the move afresh, so one stuck move does not hold a group, nor
//! the rebalancing that waits for every move to end, forever.
//!
//! The clock is the meta leader's: a new leader starts every learner's
//! count from zero.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::plan::GroupInfo;

/// What is known of one learner.
struct Watched {
    matched: u64,
    /// Time without progress so far.
    stalled_for: Duration,
    checked: Instant,
    /// The stall was logged (once per stall).
    warned: bool,
}

/// The learners of the groups reported, by `(group, node)`.
#[derive(Default)]
pub struct LearnerWatch {
    learners: HashMap<(u64, u64), Watched>,
}

impl LearnerWatch {
    /// Updates the count of every learner in `groups` at `now` and fills
    /// each group's `stalled` with those past `stall`. Learners no longer
    /// reported are forgotten.
    pub fn observe(&mut self, groups: &mut [GroupInfo], stall: Duration, now: Instant) {
        let mut seen = HashMap::with_capacity(self.learners.len());
        for g in groups.iter_mut() {
            g.stalled.clear();
            for &l in &g.learners {
                let (matched, state) = g
                    .progress
                    .iter()
                    .find(|p| p.0 == l)
                    .map_or((0, ""), |p| (p.1, p.2.as_str()));
                let mut w = self.learners.remove(&(g.id, l)).unwrap_or(Watched {
                    matched,
                    stalled_for: Duration::ZERO,
                    checked: now,
                    warned: false,
                });
                if matched != w.matched {
                    w.matched = matched;
                    w.stalled_for = Duration::ZERO;
                    w.warned = false;
                } else if state != "snapshot" {
                    w.stalled_for += now.saturating_duration_since(w.checked);
                }
                w.checked = now;
                if w.stalled_for >= stall {
                    if !std::mem::replace(&mut w.warned, true) {
                        tracing::warn!(
                            group = g.id,
                            node = l,
                            matched,
                            state,
                            stalled_secs = w.stalled_for.as_secs(),
                            "learner made no catch-up progress: its move is rolled back"
                        );
                    }
                    g.stalled.push(l);
                }
                seen.insert((g.id, l), w);
            }
        }
        self.learners = seen;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(learner_matched: u64, state: &str) -> GroupInfo {
        GroupInfo {
            id: 5,
            leader: 1,
            conf_ver: 4,
            voters: vec![1, 2, 3],
            learners: vec![4],
            voters_outgoing: vec![],
            progress: vec![(4, learner_matched, state.to_string())],
            commit: 100,
            want: 3,
            stalled: vec![],
        }
    }

    #[test]
    fn a_learner_is_stalled_only_after_the_deadline_without_progress() {
        let stall = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut w = LearnerWatch::default();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut gs = [group(10, "probe")];
        w.observe(&mut gs, stall, at(0));
        w.observe(&mut gs, stall, at(50));
        assert!(gs[0].stalled.is_empty());
        // Progress resets the count.
        let mut gs = [group(20, "replicate")];
        w.observe(&mut gs, stall, at(55));
        w.observe(&mut gs, stall, at(110));
        assert!(gs[0].stalled.is_empty());
        w.observe(&mut gs, stall, at(116));
        assert_eq!(gs[0].stalled, vec![4]);
    }

    #[test]
    fn time_in_a_live_snapshot_transfer_is_progress() {
        let stall = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = LearnerWatch::default();
        let mut gs = [group(0, "snapshot")];
        for s in (0..=3600).step_by(30) {
            w.observe(&mut gs, stall, at(s));
        }
        assert!(gs[0].stalled.is_empty(), "a long snapshot is not a stall");
        // The transfer failed and is not retried: the clock runs again.
        let mut gs = [group(0, "probe")];
        w.observe(&mut gs, stall, at(3630));
        assert!(gs[0].stalled.is_empty());
        w.observe(&mut gs, stall, at(3700));
        assert_eq!(gs[0].stalled, vec![4]);
        // A learner gone from the reports is forgotten.
        let mut none: [GroupInfo; 0] = [];
        w.observe(&mut none, stall, at(3701));
        let mut gs = [group(0, "probe")];
        w.observe(&mut gs, stall, at(3702));
        assert!(gs[0].stalled.is_empty());
    }
}
