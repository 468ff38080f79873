//! Snapshots: DB views taken for snapshots raft asks to send (paired with
//! the exact index their metadata names), snapshots received from a
//! leader (one staged file per group, kept while raft holds it). Their
//! installation runs on the install thread (see `install`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use raft::prelude::Message;

use super::Store;

impl Store {
    /// A snapshot file received for `group`: stepped into raft, and kept
    /// (one slot per group) only if raft took it; a file raft refused, one
    /// that arrives while the group installs another, and one replaced by a
    /// newer snapshot are deleted.
    pub(super) fn on_snapshot_received(&mut self, group: u64, msg: Message, path: PathBuf) {
        // A snapshot for a newer incarnation than the replica here (the
        // messages that would have replaced it were lost) replaces it, as
        // any message does; one for a replica not here creates it.
        let ours = crate::membership::node_of(msg.to) == self.node_id
            && self.replace_older_incarnation(group, &msg)
            && (self.groups.contains_key(&group) || self.maybe_create(group, 0, &msg));
        let Some(g) = self.groups.get_mut(&group).filter(|_| ours) else {
            let _ = std::fs::remove_file(&path);
            return;
        };
        if g.installing.is_some() {
            // Its raft is left alone until the install ends (see `install`);
            // the leader sends a snapshot again if still needed.
            tracing::info!(group, "snapshot refused: one is being installed");
            let _ = std::fs::remove_file(&path);
            return;
        }
        let (index, term) = {
            let meta = msg.get_snapshot().get_metadata();
            (meta.index, meta.term)
        };
        let snap_members = crate::membership::Membership::new(
            msg.get_snapshot().get_metadata().get_conf_state(),
            0,
        );
        if msg.to != g.peer_id() || !snap_members.has_peer(msg.to) {
            // For another incarnation, or its configuration does not
            // include this replica: installing it would make a replica of
            // a group it is not in.
            tracing::warn!(
                group,
                index,
                "snapshot refused: its configuration excludes this node"
            );
            let _ = std::fs::remove_file(&path);
            return;
        }
        if let Err(e) = g.node.step(msg) {
            tracing::warn!(group, error = %e, "raft rejected a snapshot");
        }
        let taken = g
            .node
            .raft
            .raft_log
            .unstable_snapshot()
            .as_ref()
            .is_some_and(|s| s.get_metadata().index == index && s.get_metadata().term == term);
        if !taken {
            tracing::info!(group, index, term, "raft did not take the snapshot");
            let _ = std::fs::remove_file(&path);
            return;
        }
        if let Some((_, _, old)) = g.incoming_snapshot.replace((index, term, path.clone())) {
            if old != path {
                let _ = std::fs::remove_file(old);
            }
        }
    }

    pub(super) fn on_snapshot_status(&mut self, group: u64, to: u64, ok: bool) {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.installing.is_some() {
                // Not a leader; its raft is left alone (see `install`).
                return;
            }
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
}
