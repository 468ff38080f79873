//! Durability of applied state: the raft log is the only log.
//!
//! Apply writes the `kv` family (block data, the catalog, each group's
//! apply and conf states) without RocksDB's WAL, so a payload is logged
//! once, as its raft entry, not a second time as block data. A crash loses
//! the applies still in the memtable, all of them or a prefix (RocksDB
//! flushes a memtable whole, and each group's data and apply state share
//! one batch and one family), and the restart re-applies them from the
//! log. For that the log must still hold them: a group's log is compacted
//! only up to its *durable* applied index, what a flush of the family has
//! made durable.
//!
//! The "kv-flush" thread does the flushes, off the store thread: the
//! store asks for one (at most one in flight, at most one per
//! [`FLUSH_INTERVAL_MIN`]) with the applied index of every group as it
//! stands — everything up to it is already written — and the thread
//! reports back once the flush is done; those indexes are then durable.
//! Each report names the replica incarnation it was taken from, so a
//! replica destroyed and created again meanwhile ignores it.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Store;
use crate::engine::{Engine, EngineError};
use crate::msg::StoreMsg;

/// Flushes of the `kv` family asked for by log compaction are at least
/// this far apart (RocksDB also flushes on its own when a memtable fills).
pub(super) const FLUSH_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// Applied indexes recorded before a flush: `(group, incarnation, index)`.
pub type FlushedApplies = Vec<(u64, u64, u64)>;

/// The store's end of the flush thread.
pub(super) struct Flusher {
    jobs: SyncSender<FlushedApplies>,
    in_flight: bool,
    last_started: Option<Instant>,
}

/// Starts the flush thread; like the install thread it holds only a weak
/// sender to the store's inbox and ends with the store.
pub(super) fn spawn(
    engine: Engine,
    inbox: mpsc::WeakSender<StoreMsg>,
) -> Result<Flusher, EngineError> {
    let (jobs, rx) = sync_channel::<FlushedApplies>(1);
    std::thread::Builder::new()
        .name("kv-flush".into())
        .spawn(move || {
            for applied in rx {
                let started = Instant::now();
                let result = engine.flush_kv();
                tracing::debug!(
                    ms = started.elapsed().as_millis() as u64,
                    groups = applied.len(),
                    "flushed the state machines"
                );
                let Some(inbox) = inbox.upgrade() else {
                    break;
                };
                if inbox
                    .blocking_send(StoreMsg::KvFlushed { applied, result })
                    .is_err()
                {
                    break;
                }
            }
        })?;
    Ok(Flusher {
        jobs,
        in_flight: false,
        last_started: None,
    })
}

impl Store {
    /// Asks for a flush of the state machines, unless one is under way or
    /// the last began less than [`FLUSH_INTERVAL_MIN`] ago.
    pub(super) fn request_flush(&mut self, now: Instant) {
        let f = &self.flusher;
        if f.in_flight
            || f.last_started
                .is_some_and(|t| now.duration_since(t) < FLUSH_INTERVAL_MIN)
        {
            return;
        }
        let applied: FlushedApplies = self
            .groups
            .values()
            .map(|g| {
                let st = g.node.store();
                (g.id, st.incarnation(), st.applied_index())
            })
            .collect();
        match self.flusher.jobs.try_send(applied) {
            Ok(()) => {
                self.flusher.in_flight = true;
                self.flusher.last_started = Some(now);
            }
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => {
                super::fatal("flush state machines", "the kv-flush thread is gone")
            }
        }
    }

    pub(super) fn on_kv_flushed(
        &mut self,
        applied: FlushedApplies,
        result: Result<(), EngineError>,
    ) {
        self.flusher.in_flight = false;
        if let Err(e) = result {
            super::fatal("flush state machines", e);
        }
        for (group, incarnation, index) in applied {
            if let Some(g) = self.groups.get_mut(&group) {
                g.node.mut_store().mark_durable(incarnation, index);
            }
        }
    }
}
