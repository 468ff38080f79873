//! The ready loop of all groups: leader messages first, snapshots (handed
//! to the install thread, their ready held until filled), then committed
//! entries applied in one unsynced batch and answered at once, then the
//! log appends and hard states of every group staged into ONE write batch
//! with one fsync (group commit), then the persisted messages, `advance`,
//! and the light ready's commits applied in a second, unsynced batch —
//! raft-rs's documented ordering. Last, followers that no append of the
//! round told the new commit index get an empty append (`commit_notice`).
//!
//! Apply needs no fsync of its own: raft only hands out committed entries
//! this replica has persisted (`min(committed, persisted)`), so the log
//! holds every applied entry durably and a restart re-applies whatever an
//! unlogged apply lost (log compaction waits for the applied index a flush
//! made durable, see `flush`). So a write is answered one fsync after it
//! is proposed, not two: its apply does not wait for the group commit of
//! the entries proposed behind it.

use std::sync::atomic::Ordering;

use raft::prelude::{Entry, EntryType, Message, MessageType};
use raft::StateRole;
use rocksdb::WriteBatch;

use super::{dedup, fatal, read, role_name, Store};
use crate::apply::{Applier, ApplyResult};
use crate::msg::{ProposeCb, StoreError};

/// Results of one apply pass, delivered after the batch is written.
#[derive(Default)]
pub(super) struct Completions {
    proposals: Vec<(ProposeCb, Result<ApplyResult, StoreError>)>,
    /// Groups a membership change applied this round removed this node
    /// from: destroyed once the round is written.
    removed: Vec<u64>,
}

impl Store {
    pub(super) fn send_messages(&mut self, group: u64, msgs: Vec<Message>) {
        // What each follower has been told of the commit index (see
        // `commit_notice`), kept aside for the batch: only what the
        // transport queued counts.
        let (conf_ver, mut told) = match self.groups.get_mut(&group) {
            Some(g) => (g.members.conf_ver, std::mem::take(&mut g.commit_sent)),
            None => (0, Default::default()),
        };
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // The data must be the DB view taken for exactly this
                // snapshot's index; anything else would install the wrong
                // state under the right name.
                let index = m.get_snapshot().get_metadata().index;
                match self.outgoing_snapshots.remove(&(group, m.to, index)) {
                    Some((snap, _)) => self.transport.send_snapshot(group, m, snap),
                    None => {
                        tracing::warn!(group, to = m.to, "no prepared snapshot for a MsgSnapshot");
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.node.report_snapshot(m.to, raft::SnapshotStatus::Failure);
                        }
                    }
                }
            } else {
                let carries_commit = matches!(
                    m.get_msg_type(),
                    MessageType::MsgAppend | MessageType::MsgHeartbeat
                );
                let (to, term, commit) = (m.to, m.term, m.commit);
                if self.transport.send(group, conf_ver, m) && carries_commit {
                    told.note((to, term, commit));
                }
            }
        }
        if let Some(g) = self.groups.get_mut(&group) {
            g.commit_sent = told;
        }
    }

    fn apply_entries(
        &mut self,
        group: u64,
        entries: Vec<Entry>,
        wb: &mut WriteBatch,
        applier: &mut Applier<'_>,
        done: &mut Completions,
    ) -> Option<(u64, u64)> {
        let last = entries.last().map(|e| (e.index, e.term))?;
        self.groups.get(&group)?;
        crate::metrics::METRICS
            .apply_batch_entries
            .observe(entries.len() as f64);
        let gen = dedup::current_gen();
        for e in entries {
            let is_conf = e.get_entry_type() != EntryType::EntryNormal;
            let result = if is_conf {
                let (r, removed) = self.apply_conf_change(group, &e, wb);
                if removed {
                    done.removed.push(group);
                }
                r
            } else {
                match applier.apply(wb, group, &e.data) {
                    Ok(r) => r,
                    Err(err) => fatal("apply", err),
                }
            };
            let Some(g) = self.groups.get_mut(&group) else {
                break;
            };
            if let Some(id) = dedup::request_id(&e.context).filter(|_| !is_conf) {
                // In the same batch as the data it changed.
                dedup::record(applier, wb, group, gen, &id, &result);
                g.evict_due.recorded(gen);
            }
            g.inflight_requests.applied_up_to(e.index);
            if !g.dup_waiters.is_empty() {
                let mut i = 0;
                while i < g.dup_waiters.len() {
                    if g.dup_waiters[i].0 > e.index {
                        i += 1;
                        continue;
                    }
                    let (idx, term, cb, _) = g.dup_waiters.swap_remove(i);
                    if idx == e.index && term == e.term {
                        done.proposals.push((cb, Ok(result.clone())));
                    } else {
                        done.proposals
                            .push((cb, Err(StoreError::EntryReplaced { group })));
                    }
                }
            }
            // Resolve proposals up to this index.
            while let Some((&idx, _)) = g.pending.first_key_value() {
                if idx > e.index {
                    break;
                }
                let Some((_, p)) = g.pending.pop_first() else {
                    break;
                };
                if idx == e.index && p.term == e.term && p.conf_change == is_conf {
                    done.proposals.push((p.cb, Ok(result.clone())));
                } else if idx == e.index && p.term == e.term {
                    // raft-rs turns a membership change it refuses into an
                    // empty entry.
                    done.proposals.push((
                        p.cb,
                        Err(StoreError::ProposalDropped {
                            group,
                            reason: "raft refused the membership change".into(),
                        }),
                    ));
                } else {
                    done.proposals
                        .push((p.cb, Err(StoreError::EntryReplaced { group })));
                }
            }
        }
        let g = self.groups.get_mut(&group)?;
        g.node.store().stage_apply_state(wb, last.0, last.1);
        Some(last)
    }

    pub(super) fn handle_readies(&mut self) {
        // A group installing a snapshot is left out until the install
        // thread has filled its range; then its held ready resumes.
        let ids: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| match &g.installing {
                Some(i) => i.filled,
                None => g.node.has_ready(),
            })
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return;
        }
        // Snapshots raft asked for while handling the inbox: take their DB
        // views now, before this round sends their messages or writes.
        self.collect_snapshot_requests();
        let engine = self.engine.clone();
        let mut wb = WriteBatch::default();
        let mut wb_apply = WriteBatch::default();
        let mut applier = Applier::new(&engine);
        let mut done = Completions::default();
        let mut need_sync = false;
        let mut readies = Vec::with_capacity(ids.len());
        let mut applied: Vec<(u64, u64, u64)> = Vec::new();
        let mut installed = Vec::new();
        for &id in &ids {
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            // A held ready whose soft state and leader messages were handled
            // when it was fresh.
            let (mut rd, held) = match g.installing.take() {
                Some(i) => (i.ready, Some(i.file)),
                None => (g.node.ready(), None),
            };
            if let Some(ss) = rd.ss().filter(|_| held.is_none()) {
                g.lease_until = None;
                // Readers check the view without the store thread: drop the
                // lease there at once, not at the end of the round.
                if let Ok(mut views) = self.views.write() {
                    if let Some(v) = views.get_mut(&id) {
                        v.lease_until = None;
                        v.role = role_name(ss.raft_state);
                        v.leader_id = crate::membership::node_of(ss.leader_id);
                    }
                }
                let leader_now = ss.raft_state == StateRole::Leader;
                if g.was_leader && !leader_now {
                    let leader =
                        (ss.leader_id != 0).then(|| crate::membership::node_of(ss.leader_id));
                    g.fail_all(|| StoreError::NotLeader { group: id, leader });
                }
                g.was_leader = leader_now;
                tracing::info!(
                    group = id,
                    node = self.node_id,
                    leader = ss.leader_id,
                    role = role_name(ss.raft_state),
                    "group role changed"
                );
            }
            let msgs = rd.take_messages();
            if !msgs.is_empty() {
                self.send_messages(id, msgs);
            }
            if !rd.snapshot().is_empty() {
                let Some(file) = held else {
                    // Filled on the install thread; the ready waits.
                    self.start_install(id, rd);
                    continue;
                };
                self.stage_installed(id, rd.snapshot(), &mut wb);
                installed.push((id, file));
                need_sync = true;
            }
            let committed = rd.take_committed_entries();
            // raft-rs hands out no committed entry past a snapshot that is
            // not yet persisted: the apply batch never jumps ahead of an
            // install in the synced batch.
            debug_assert!(rd.snapshot().is_empty() || committed.is_empty());
            if let Some((i, t)) =
                self.apply_entries(id, committed, &mut wb_apply, &mut applier, &mut done)
            {
                applied.push((id, i, t));
            }
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            if !rd.entries().is_empty() {
                for e in rd.entries() {
                    if let Some(id) = dedup::request_id(&e.context) {
                        g.inflight_requests.appended(e.index, e.term, id);
                    }
                }
                if let Err(e) = g.node.mut_store().stage_append(&mut wb, rd.entries()) {
                    fatal("stage append", e);
                }
                need_sync = true;
            }
            if let Some(hs) = rd.hs() {
                if let Err(e) = g.node.mut_store().stage_hard_state(&mut wb, hs) {
                    fatal("stage hard state", e);
                }
            }
            // raft-rs: no fsync is needed when only the commit index moved
            // (it is recovered from the quorum); term, vote and entries must
            // be durable before the messages that depend on them go out.
            need_sync |= rd.must_sync();
            for rs in rd.take_read_states() {
                let Some(seq) = self.read_ctx.own_seq(&rs.request_ctx) else {
                    continue;
                };
                if let Some(r) = g.reads_inflight.remove(&seq) {
                    if read::may_grant_lease(g) {
                        let until = r.issued + self.lease_duration;
                        if g.lease_until.is_none_or(|u| u < until) {
                            g.lease_until = Some(until);
                            g.lease_index = g.lease_index.max(rs.index);
                        }
                    }
                    g.reads_waiting_apply.push((rs.index, r.waiters));
                }
            }
            readies.push((id, rd));
        }
        self.counters
            .checksum_errors
            .fetch_add(applier.checksum_errors, Ordering::Relaxed);
        self.counters
            .blocks_repaired
            .fetch_add(applier.repaired, Ordering::Relaxed);
        let purged = applier.take_deleted_ranges();
        drop(applier);
        self.collect_snapshot_requests();
        // The committed entries first, unsynced, and their proposers are
        // answered before this round's fsync (see the module header).
        if !wb_apply.is_empty() {
            if let Err(e) = engine.write_apply(wb_apply) {
                fatal("apply write", e);
            }
        }
        for (start, end) in purged {
            self.reclaimer.deleted(start, end);
        }
        for (id, i, t) in applied.drain(..) {
            if let Some(g) = self.groups.get_mut(&id) {
                g.node.mut_store().set_applied(i, t);
            }
        }
        for (cb, r) in done.proposals.drain(..) {
            let _ = cb.send(r);
        }
        if !wb.is_empty() || need_sync {
            let started = std::time::Instant::now();
            if let Err(e) = engine.write(wb, need_sync) {
                fatal("raft log write", e);
            }
            if need_sync {
                let m = &*crate::metrics::METRICS;
                m.fsyncs.inc();
                m.fsync_seconds.observe(started.elapsed().as_secs_f64());
                m.write_batch_groups.observe(readies.len() as f64);
            }
        }
        for (id, file) in installed {
            self.finish_install(id, file);
        }

        // Phase 2: everything of phase 1 is durable.
        let mut wb2 = WriteBatch::default();
        let mut wb2_raft = WriteBatch::default();
        let mut applier2 = Applier::new(&engine);
        for (id, mut rd) in readies {
            let persisted = rd.take_persisted_messages();
            if !persisted.is_empty() {
                self.send_messages(id, persisted);
            }
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            let mut light = g.node.advance(rd);
            if let Some(commit) = light.commit_index() {
                if let Err(e) = g.node.mut_store().stage_commit(&mut wb2_raft, commit) {
                    fatal("stage commit", e);
                }
            }
            let msgs = light.take_messages();
            // `advance` may have asked for a snapshot (for a lagging peer):
            // take its DB view before the message goes out.
            self.collect_snapshot_requests();
            if !msgs.is_empty() {
                self.send_messages(id, msgs);
            }
            let committed = light.take_committed_entries();
            if let Some((i, t)) =
                self.apply_entries(id, committed, &mut wb2, &mut applier2, &mut done)
            {
                applied.push((id, i, t));
            }
            if let Some(g) = self.groups.get_mut(&id) {
                g.node.advance_apply();
            }
        }
        self.counters
            .checksum_errors
            .fetch_add(applier2.checksum_errors, Ordering::Relaxed);
        self.counters
            .blocks_repaired
            .fetch_add(applier2.repaired, Ordering::Relaxed);
        let purged = applier2.take_deleted_ranges();
        drop(applier2);
        self.collect_snapshot_requests();
        if !wb2.is_empty() {
            if let Err(e) = engine.write_apply(wb2) {
                fatal("apply write", e);
            }
        }
        for (start, end) in purged {
            self.reclaimer.deleted(start, end);
        }
        // The commit index needs no fsync (raft-rs recovers it from the
        // quorum), but the raft family always goes through the WAL.
        if !wb2_raft.is_empty() {
            if let Err(e) = engine.write(wb2_raft, false) {
                fatal("commit index write", e);
            }
        }
        for (id, i, t) in applied {
            if let Some(g) = self.groups.get_mut(&id) {
                g.node.mut_store().set_applied(i, t);
            }
        }
        for (cb, r) in done.proposals {
            let _ = cb.send(r);
        }
        self.send_commit_notices(&ids);
        for &id in &ids {
            if let Some(g) = self.groups.get_mut(&id) {
                let applied_index = g.node.store().applied_index();
                let mut still = Vec::new();
                for (index, waiters) in g.reads_waiting_apply.drain(..) {
                    if index <= applied_index {
                        for cb in waiters {
                            let _ = cb.send(Ok(()));
                        }
                    } else {
                        still.push((index, waiters));
                    }
                }
                g.reads_waiting_apply = still;
            }
            self.update_view(id);
        }
        for id in done.removed {
            let conf_ver = self.groups.get(&id).map_or(0, |g| g.members.conf_ver);
            self.destroy(id, conf_ver);
        }
    }
}
