//! Snapshots: DB views taken for snapshots raft asks to send (paired with
//! the exact index their metadata names), snapshots received from a
//! leader (staged files waiting for raft to accept them), and their
//! installation.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use raft::prelude::{Message, Snapshot};

use super::{fatal, Store};
use crate::snapshot_file;

impl Store {
    pub(super) fn on_snapshot_received(&mut self, group: u64, msg: Message, path: PathBuf) {
        let Some(g) = self.groups.get_mut(&group) else {
            let _ = std::fs::remove_file(&path);
            return;
        };
        let meta = msg.get_snapshot().get_metadata();
        if let Some((_, _, old)) = g.incoming_snapshot.take() {
            if old != path {
                let _ = std::fs::remove_file(old);
            }
        }
        g.incoming_snapshot = Some((meta.index, meta.term, path));
        if let Err(e) = g.node.step(msg) {
            tracing::warn!(group, error = %e, "raft rejected a snapshot");
        }
    }

    pub(super) fn on_snapshot_status(&mut self, group: u64, to: u64, ok: bool) {
        if let Some(g) = self.groups.get_mut(&group) {
            let status = if ok {
                self.counters.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                raft::SnapshotStatus::Finish
            } else {
                raft::SnapshotStatus::Failure
            };
            g.node.report_snapshot(to, status);
        }
    }

    /// Takes a DB snapshot for every snapshot raft asked for since the last
    /// write, so the data matches the metadata's applied index.
    pub(super) fn collect_snapshot_requests(&mut self) {
        for g in self.groups.values() {
            let reqs = g.node.store().take_snapshot_requests();
            for (to, index, _term) in reqs {
                debug_assert_eq!(index, g.node.store().applied_index());
                // One pending snapshot per peer: a newer request replaces it.
                self.outgoing_snapshots
                    .retain(|(gid, peer, _), _| !(*gid == g.id && *peer == to));
                self.outgoing_snapshots
                    .insert((g.id, to, index), (self.engine.snapshot(), Instant::now()));
            }
        }
    }

    /// Installs a snapshot received from the leader: crash-safe through the
    /// marker key (see `snapshot_file`).
    pub(super) fn install_snapshot(&mut self, group: u64, snap: Snapshot) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let meta = snap.get_metadata();
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
        // Requests waiting for the old state are answered by the new one.
        self.install_gen.begin();
        let r = snapshot_file::install(&self.engine, g.node.mut_store(), &snap, &path);
        self.install_gen.end();
        if let Err(e) = r {
            fatal("install snapshot", e);
        }
        self.counters
            .snapshots_applied
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(group, index, term, "installed snapshot");
    }
}
