//! Snapshot installs off the store thread, so reading a big file, rewriting
//! a range and their fsyncs never stall the other groups (their heartbeats,
//! I/O and group commit go on).
//!
//! When a fresh ready of a group carries a snapshot, the store checks that
//! it is the one received for the group, keeps that `Ready` in the group
//! un-advanced, and hands the file to the install thread ("snap-install").
//! The thread reads the file whole once (a bad file is rejected before
//! anything is written), then writes the marker (synced) and clears and
//! refills the group's range — steps 1 and 2 of `snapshot_file` — inside
//! that group's install generation, so reads of the group are refused
//! meanwhile and reads of the other groups never are. It reports with
//! `StoreMsg::SnapshotFilled`; the next ready pass resumes the held ready
//! as a fresh one whose snapshot is already filled: step 3 (the raft state
//! moves to the snapshot, the marker goes) is staged into that round's
//! synced batch together with the ready's entries and hard state, and only
//! after that write is the apply state recorded, the file removed, the
//! ready's persisted messages sent and the ready advanced — raft-rs's
//! ordering. A failure stops the node (fail-stop); the marker makes the
//! restart finish or forget the install.
//!
//! raft-rs 0.7 forbids stepping a `RawNode` between `ready` and `advance`
//! (`advance` panics on a follower that queued messages meanwhile, e.g. a
//! heartbeat's response, and on a hard state changed meanwhile, e.g. by an
//! election a tick started), so while a group installs its raft is left
//! alone: messages to it are dropped (its leader
//! resends), it is not ticked, no read-index round is issued for it, other
//! snapshots for it are refused, and its digest is not taken. It is a
//! follower throughout (the snapshot came from its leader and nothing can
//! change its role), so proposals and leader-only requests are refused as
//! for any follower.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use raft::prelude::{Snapshot, SnapshotMetadata};
use raft::Ready;
use rocksdb::WriteBatch;
use tokio::sync::mpsc;

use super::{fatal, Store};
use crate::counters::InstallGen;
use crate::engine::{Engine, EngineError};
use crate::msg::StoreMsg;
use crate::snapshot_file;

/// A snapshot install under way: the ready that carries it, held.
pub(super) struct Installing {
    pub(super) ready: Ready,
    pub(super) file: StagedSnapshot,
    /// The install thread has refilled the range: resume the ready.
    pub(super) filled: bool,
}

/// The received snapshot being installed.
pub(super) struct StagedSnapshot {
    pub(super) index: u64,
    pub(super) term: u64,
    pub(super) path: PathBuf,
    started: Instant,
}

struct Job {
    group: u64,
    meta: SnapshotMetadata,
    path: PathBuf,
}

/// The store's end of the install thread.
pub(super) struct Installer {
    jobs: SyncSender<Job>,
}

/// Starts the install thread. It holds only a weak sender to the store's
/// inbox (the store stops once every handle is gone) and ends with the
/// store. `groups` bounds the queue: a group has one install at a time.
pub(super) fn spawn(
    engine: Engine,
    gens: Arc<InstallGen>,
    inbox: mpsc::WeakSender<StoreMsg>,
    groups: usize,
) -> Result<Installer, EngineError> {
    let (jobs, rx) = sync_channel::<Job>(groups.max(1));
    std::thread::Builder::new()
        .name("snap-install".into())
        .spawn(move || {
            for job in rx {
                let result = fill(&engine, &gens, &job);
                let Some(inbox) = inbox.upgrade() else {
                    break;
                };
                let msg = StoreMsg::SnapshotFilled {
                    group: job.group,
                    result,
                };
                if inbox.blocking_send(msg).is_err() {
                    break;
                }
            }
        })?;
    Ok(Installer { jobs })
}

/// Steps 1 and 2 of an install, after reading the file whole once.
fn fill(engine: &Engine, gens: &InstallGen, job: &Job) -> Result<(), EngineError> {
    // Tests: `snapshot_install_start=sleep(ms)` holds the install back
    // (the store thread goes on meanwhile).
    #[cfg(feature = "failpoints")]
    fail::fail_point!("snapshot_install_start");
    let started = Instant::now();
    let pairs = snapshot_file::validate(&job.path, job.group)?;
    let validated = started.elapsed();
    gens.begin(job.group);
    let r = snapshot_file::write_marker(engine, job.group, &job.meta, &job.path)
        .and_then(|()| snapshot_file::fill_from_file(engine, job.group, &job.path));
    gens.end(job.group);
    r?;
    tracing::info!(
        group = job.group,
        index = job.meta.index,
        pairs,
        validate_ms = validated.as_millis() as u64,
        fill_ms = (started.elapsed() - validated).as_millis() as u64,
        "snapshot range refilled"
    );
    Ok(())
}

impl Store {
    /// Hands the snapshot of a fresh ready to the install thread and holds
    /// the ready in the group until it is filled.
    pub(super) fn start_install(&mut self, group: u64, rd: Ready) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let meta = rd.snapshot().get_metadata().clone();
        let Some((index, term, path)) = g.incoming_snapshot.take() else {
            fatal(
                "install snapshot",
                format!("group {group}: raft produced a snapshot we never received"),
            );
        };
        if index != meta.index || term != meta.term {
            fatal(
                "install snapshot",
                format!(
                    "group {group}: received ({index},{term}) but raft installs ({},{})",
                    meta.index, meta.term
                ),
            );
        }
        let job = Job {
            group,
            meta,
            path: path.clone(),
        };
        if let Err(e) = self.installer.jobs.try_send(job) {
            fatal(
                "install snapshot",
                format!("group {group}: the install thread takes no job: {e}"),
            );
        }
        tracing::info!(group, index, term, "installing a snapshot");
        g.installing = Some(Installing {
            ready: rd,
            file: StagedSnapshot {
                index,
                term,
                path,
                started: Instant::now(),
            },
            filled: false,
        });
    }

    pub(super) fn on_snapshot_filled(&mut self, group: u64, result: Result<(), EngineError>) {
        if let Err(e) = result {
            fatal("install snapshot", format!("group {group}: {e}"));
        }
        match self
            .groups
            .get_mut(&group)
            .and_then(|g| g.installing.as_mut())
        {
            Some(i) => i.filled = true,
            None => tracing::error!(
                group,
                "a snapshot was filled for a group not installing one"
            ),
        }
    }

    /// Step 3 of a filled install, into the round's batch (synced).
    pub(super) fn stage_installed(&mut self, group: u64, snap: &Snapshot, wb: &mut WriteBatch) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        if let Err(e) = snapshot_file::stage_finish(&self.engine, g.node.mut_store(), wb, snap) {
            fatal("install snapshot", e);
        }
    }

    /// After the round's synced write: the install is durable.
    pub(super) fn finish_install(&mut self, group: u64, file: StagedSnapshot) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.node.mut_store().set_applied(file.index, file.term);
            // The configuration came with the snapshot.
            if let Err(e) = g.node.mut_store().reload_conf_ver() {
                fatal("install snapshot", e);
            }
            let st = g.node.store();
            g.members = std::sync::Arc::new(crate::membership::Membership::new(
                st.conf_state(),
                st.conf_ver(),
            ));
            // Its request records came with the snapshot.
            g.evict_due.forget();
        }
        let _ = std::fs::remove_file(&file.path);
        self.counters
            .snapshots_applied
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            group,
            index = file.index,
            term = file.term,
            ms = file.started.elapsed().as_millis() as u64,
            "installed snapshot"
        );
    }
}
