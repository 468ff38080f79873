//! Housekeeping on the store thread's clock: raft ticks, deadlines of
//! proposals and reads, log compaction, and dropping old applied request
//! records (`dedup`). (Purging deleted volumes runs
//! off this thread, in `gc`.)

use std::time::{Duration, Instant};

use rocksdb::WriteBatch;

use super::{dedup, fatal, Store};
use crate::msg::StoreError;

impl Store {
    pub(super) fn on_tick(&mut self, now: Instant) {
        // Nodes joined, left or moved (see `address_book`).
        self.transport.refresh();
        // Before ticking: a leader that goes to sleep now sends no
        // heartbeat after its notice (see `hibernate`).
        self.hibernate_pass();
        let reissue_after = Duration::from_millis(
            self.config.raft.tick_interval_ms * self.config.raft.heartbeat_ticks as u64 * 3,
        );
        for g in self.groups.values_mut() {
            // Not while a snapshot installs: its held ready forbids it
            // (see `install`); not while idle (see `hibernate`).
            if g.installing.is_none() && !g.hibernating {
                g.node.tick();
            }
            // Proposals past their deadline: the caller has given up; the
            // entry may still commit (a retry finds it, see `dedup`).
            let expired: Vec<u64> = g
                .pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(i, _)| *i)
                .collect();
            for i in expired {
                if let Some(p) = g.pending.remove(&i) {
                    let _ = p.cb.send(Err(StoreError::TimedOut {
                        group: g.id,
                        what: "proposal",
                    }));
                }
            }
            let mut i = 0;
            while i < g.dup_waiters.len() {
                if g.dup_waiters[i].3 <= now {
                    let (_, _, cb, _) = g.dup_waiters.swap_remove(i);
                    let _ = cb.send(Err(StoreError::TimedOut {
                        group: g.id,
                        what: "retried request",
                    }));
                } else {
                    i += 1;
                }
            }
            // Reads whose read-index round got lost (e.g. a new leader that
            // has not yet committed in its term drops them): re-issue until
            // their deadline.
            let stale: Vec<u64> = g
                .reads_inflight
                .iter()
                .filter(|(_, r)| now.duration_since(r.issued) >= reissue_after)
                .map(|(c, _)| *c)
                .collect();
            for ctx in stale {
                if let Some(r) = g.reads_inflight.remove(&ctx) {
                    if r.deadline <= now {
                        for cb in r.waiters {
                            let _ = cb.send(Err(StoreError::TimedOut {
                                group: g.id,
                                what: "read index",
                            }));
                        }
                    } else {
                        let issued = r.deadline
                            - Duration::from_millis(self.config.limits.request_timeout_ms);
                        g.reads_unsent
                            .extend(r.waiters.into_iter().map(|cb| (cb, issued)));
                    }
                }
            }
            // Reads held back (an install, no commit in the term yet) wait
            // no longer than any other.
            let timeout = Duration::from_millis(self.config.limits.request_timeout_ms);
            if g.reads_unsent
                .iter()
                .any(|(_, t)| now.duration_since(*t) >= timeout)
            {
                let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut g.reads_unsent)
                    .into_iter()
                    .partition(|(_, t)| now.duration_since(*t) >= timeout);
                g.reads_unsent = kept;
                for (cb, _) in expired {
                    let _ = cb.send(Err(StoreError::TimedOut {
                        group: g.id,
                        what: "read index",
                    }));
                }
            }
        }
        self.outgoing_snapshots
            .retain(|_, (_, made)| now.duration_since(*made) < Duration::from_secs(600));
        self.maybe_compact();
        self.evict_request_records();
        // Hibernating groups do not change: their views stay as published.
        let ids: Vec<u64> = self
            .groups
            .values()
            .filter(|g| !g.hibernating)
            .map(|g| g.id)
            .collect();
        for id in ids {
            self.publish_view(id, true);
        }
    }

    /// Drops applied request records older than what is kept (see
    /// `dedup`): one range delete per group and generation, unlogged like
    /// the apply that wrote them (a crash brings them back until the next
    /// pass).
    fn evict_request_records(&mut self) {
        let now = dedup::current_gen();
        let mut wb = WriteBatch::default();
        for g in self.groups.values_mut() {
            if g.installing.is_some() || !g.evict_due.due(now) {
                continue;
            }
            dedup::stage_evict(&self.engine, &mut wb, g.id, now);
            g.evict_due.evicted(now);
        }
        if !wb.is_empty() {
            if let Err(e) = self.engine.write_apply(wb) {
                fatal("drop old request records", e);
            }
        }
    }

    pub(super) fn maybe_compact(&mut self) {
        let threshold = self.config.raft.log_compact_threshold_entries;
        let retain = self.config.raft.log_retain_entries;
        let bytes_threshold = self.config.raft.log_compact_threshold_bytes;
        let mut wb = WriteBatch::default();
        // A kv flush lets compaction go on; it is asked for when a log is
        // well past its threshold, or when the raft memtable is half full
        // (entries compacted before it flushes never reach an SST file).
        // Flushing on every tick instead would cut many small SST and blob
        // files (and measured no cheaper: 250 ms flushes halved the raft
        // entries reaching SST files but saved no CPU, see BENCHMARKS.md).
        let raft_memtable_bytes = self.engine.raft_memtable_bytes();
        let mut blocked = false;
        let mut want_flush = false;
        for g in self.groups.values_mut() {
            if g.installing.is_some() {
                continue;
            }
            let st = g.node.store();
            let applied = st.applied_index();
            let truncated = st.truncated_index();
            if applied.saturating_sub(truncated) < threshold && st.log_bytes() < bytes_threshold {
                continue;
            }
            // Keep a tail for followers slightly behind, bounded in entries
            // and in bytes (a quarter of the byte threshold).
            let wanted = st.compact_point(retain, bytes_threshold / 4);
            // Never past what a flush made durable (see `flush`).
            let to = wanted.min(st.durable_applied());
            if to < wanted {
                blocked = true;
                want_flush |= applied.saturating_sub(truncated) >= threshold.saturating_mul(2)
                    || st.log_bytes() >= bytes_threshold;
            }
            if to <= truncated {
                continue;
            }
            if let Err(e) = g.node.mut_store().stage_compact(&mut wb, to) {
                tracing::warn!(group = g.id, error = %e, "log compaction skipped");
            } else {
                tracing::debug!(group = g.id, to, "compacted raft log");
            }
        }
        if !wb.is_empty() {
            if let Err(e) = self.engine.write(wb, false) {
                fatal("log compaction", e);
            }
        }
        if want_flush
            || (blocked && raft_memtable_bytes >= self.engine.shares().raft_memtable_bytes / 2)
        {
            self.request_flush(Instant::now());
        }
    }
}
