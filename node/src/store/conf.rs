//! Membership changes on the store thread: a leader proposes one step of a
//! change (checked by `crate::membership::plan`); every replica applies
//! committed steps in log order, persisting the new configuration and its
//! version with the apply state; a replica the change removes destroys
//! itself (a tombstone records the version it left at).
//!
//! Replicas come and go with the configuration, never with a config file.
//! Each replica is one incarnation with its own raft peer id (see
//! `membership`): a node removed from a group and added back gets a new
//! peer, which starts empty.
//! - a node that receives a leader's message for a replica it does not
//!   host creates an empty (uninitialized) one under the message's peer
//!   id, unless its tombstone for the group names that incarnation or a
//!   newer one; the leader then catches it up with a snapshot, which
//!   carries the configuration;
//! - a message for a newer incarnation than the replica here means this
//!   one was removed meanwhile (a node is never added twice): it is
//!   destroyed and the new one created; messages for older incarnations
//!   are dropped;
//! - a message from a peer outside the configuration (a node that left, or
//!   an older incarnation), sent under an older version, is dropped and
//!   answered with a GC notice naming that peer; a replica that receives a
//!   notice for itself at a newer version than its own was removed while
//!   it was away, and destroys itself. So a node that returns after its
//!   replicas moved never serves them, and deletes their data; and an old
//!   incarnation never passes for the new one (its acknowledgements,
//!   votes and progress are another peer's).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeV2, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, ReadOnlyOption};
use rocksdb::WriteBatch;

use super::{fatal, propose, read, Group, PendingProposal, Store};
use crate::apply::{ApplyOutput, ApplyResult};
use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::membership::{self, Membership, PeerChange};
use crate::msg::{ProposeCb, StoreError};
use crate::raft_storage::{self, GroupStorage};

/// Opens this node's replica of `group`, raft peer `peer`, from what is on
/// disk (nothing, for a new uninitialized replica).
pub(super) fn open_group(
    config: &NodeConfig,
    engine: &Engine,
    group: u64,
    peer: u64,
) -> Result<Group, StoreError> {
    let storage = GroupStorage::open(engine.clone(), group, &[])?;
    let applied = storage.applied_index();
    // Entries past the applied index are applied again from the log (the
    // state machine is written without a WAL: after a crash or power cut
    // it may lag the log by what its last flush had not made durable).
    tracing::info!(
        group,
        node = config.node_id,
        peer,
        applied,
        last_index = storage.last_index_now(),
        "replica opened"
    );
    let members = Arc::new(Membership::new(storage.conf_state(), storage.conf_ver()));
    let inflight_requests = propose::unapplied_requests(&storage);
    let raft_cfg = raft::Config {
        id: peer,
        election_tick: config.raft.election_ticks,
        heartbeat_tick: config.raft.heartbeat_ticks,
        applied,
        max_size_per_msg: config.raft.max_size_per_msg_bytes,
        max_inflight_msgs: config.raft.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        read_only_option: ReadOnlyOption::Safe,
        max_committed_size_per_ready: 16 << 20,
        // Commits ride on the next append; a round that sends none tells
        // the followers once at its end (see `commit_notice`).
        skip_bcast_commit: true,
        // Appends queued for one peer in one ready go as one message.
        batch_append: true,
        ..Default::default()
    };
    raft_cfg.validate().map_err(|e| StoreError::RaftSetup {
        group,
        reason: format!("raft config: {e}"),
    })?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let node = RawNode::new(&raft_cfg, storage, &logger).map_err(|e| StoreError::RaftSetup {
        group,
        reason: format!("raft init: {e}"),
    })?;
    Ok(Group {
        id: group,
        node,
        members,
        pending: BTreeMap::new(),
        dup_waiters: Vec::new(),
        evict_due: Default::default(),
        inflight_requests,
        reads_unsent: Vec::new(),
        reads_inflight: HashMap::new(),
        reads_waiting_apply: Vec::new(),
        was_leader: false,
        lease_until: None,
        lease_index: 0,
        renew_lease: false,
        transfer_fence: None,
        reads_ready: false,
        incoming_snapshot: None,
        installing: None,
        hibernating: false,
        idle_ticks: 0,
        commit_sent: Default::default(),
    })
}

/// True if a GC notice (`notice_conf_ver`, about raft peer `notice_peer`,
/// 0 from nodes that do not name it) removes the replica here (peer
/// `own_peer`, at configuration version `own_conf_ver`). The notice must be
/// newer than the replica's configuration and about this very incarnation:
/// one created after the notice was sent (a newer incarnation, or one not
/// initialized yet, version 0) is not the replica the notice saw.
fn gc_notice_applies(
    own_conf_ver: u64,
    own_peer: u64,
    notice_conf_ver: u64,
    notice_peer: u64,
) -> bool {
    if own_conf_ver >= notice_conf_ver {
        return false;
    }
    if notice_peer == 0 {
        return own_conf_ver > 0;
    }
    notice_peer == own_peer
}

/// Decodes a committed membership change (either raft encoding).
fn decode_change(e: &Entry) -> Result<ConfChangeV2, String> {
    if e.get_entry_type() == EntryType::EntryConfChange {
        // Never proposed by raftblk; decoded for completeness.
        let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| err.to_string())?;
        let mut single = ConfChangeSingle::default();
        single.set_change_type(cc.get_change_type());
        single.node_id = cc.node_id;
        let mut v2 = ConfChangeV2::default();
        v2.mut_changes().push(single);
        return Ok(v2);
    }
    ConfChangeV2::parse_from_bytes(&e.data).map_err(|err| err.to_string())
}

impl Store {
    /// One raft message from a peer, under the sender's configuration
    /// version of the group.
    pub(super) fn on_raft_message(&mut self, group: u64, conf_ver: u64, m: Message) {
        if membership::node_of(m.to) != self.node_id || !self.replace_older_incarnation(group, &m) {
            self.counters
                .dropped_messages
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !self.groups.contains_key(&group) && !self.maybe_create(group, conf_ver, &m) {
            self.counters
                .dropped_messages
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        if !g.members.has_peer(m.from) && g.members.conf_ver > 0 {
            if conf_ver < g.members.conf_ver {
                // A replica removed while it was away: tell it.
                self.transport.send_gc(
                    membership::node_of(m.from),
                    group,
                    g.members.conf_ver,
                    m.from,
                );
            }
            if conf_ver <= g.members.conf_ver {
                self.counters
                    .dropped_messages
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if g.installing.is_some() {
            // Its raft is left alone until the install ends (see
            // `install`); the leader resends.
            return;
        }
        let vote = matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        if g.hibernating && !self.wake_for_message(group, &m, vote) {
            // A heartbeat exchange that only confirms the sleep.
            if let Some(g) = self.groups.get_mut(&group) {
                if g.is_leader() {
                    let _ = g.node.step(m);
                }
            }
            return;
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        if self.started.elapsed() < self.vote_quiet
            && matches!(
                m.get_msg_type(),
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
            )
        {
            // Just (re)started: this node may have acked a leader's lease
            // round moments before it went down, and raft-rs would grant
            // votes at once (it knows no leader yet). Stay silent for one
            // election timeout, as if that leader were still heard.
            return;
        }
        read::observe_for_fence(g, &self.read_ctx, &m);
        if let Err(e) = g.node.step(m) {
            tracing::debug!(group, error = %e, "raft step rejected a message");
        }
    }

    /// For a message to raft peer `m.to` of this node: false if it is for
    /// an older incarnation than the replica of `group` here (drop it);
    /// if for a newer one, the replica here was removed from the group
    /// before that one was added, and is destroyed (the message then
    /// creates the new one).
    pub(super) fn replace_older_incarnation(&mut self, group: u64, m: &Message) -> bool {
        let Some(g) = self.groups.get(&group) else {
            return true;
        };
        let own = g.peer_id();
        if m.to == own {
            return true;
        }
        if membership::incarnation_of(m.to) < membership::incarnation_of(own)
            || g.installing.is_some()
        {
            return false;
        }
        let conf_ver = g.members.conf_ver;
        tracing::info!(
            group,
            node = self.node_id,
            old_peer = own,
            new_peer = m.to,
            conf_ver,
            "replica added again as a new incarnation: the old one goes"
        );
        self.destroy(group, conf_ver);
        true
    }

    /// Creates an empty replica (raft peer `m.to`) of `group` for a
    /// leader's message, if this node may host one: the group exists, and
    /// no tombstone here names that incarnation or a newer one.
    pub(super) fn maybe_create(&mut self, group: u64, conf_ver: u64, m: &Message) -> bool {
        if group > self.config.cluster.data_groups || m.term == 0 {
            return false;
        }
        if !matches!(
            m.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        ) {
            return false;
        }
        match raft_storage::tombstone(&self.engine, group, self.node_id) {
            Ok(Some((_, gone)))
                if membership::incarnation_of(m.to) <= membership::incarnation_of(gone) =>
            {
                return false
            }
            Ok(_) => {}
            Err(e) => fatal("read tombstone", e),
        }
        let g = match open_group(&self.config, &self.engine, group, m.to) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(group, error = %e, "cannot create a replica");
                return false;
            }
        };
        // Its peer id, for restarts (an install syncs after this write).
        let mut wb = WriteBatch::default();
        raft_storage::stage_own_peer(&self.engine, &mut wb, group, m.to);
        if let Err(e) = self.engine.write(wb, false) {
            fatal("create replica", e);
        }
        tracing::info!(
            group,
            node = self.node_id,
            leader = membership::node_of(m.from),
            peer = m.to,
            conf_ver,
            "new replica, waiting for a snapshot"
        );
        self.groups.insert(group, g);
        self.update_view(group);
        true
    }

    /// A peer says this node's replica `peer` (0: any) is not in `group`
    /// at `conf_ver`.
    pub(super) fn on_gc_notice(&mut self, from: u64, group: u64, conf_ver: u64, peer: u64) {
        let Some(g) = self.groups.get(&group) else {
            return;
        };
        if g.installing.is_some()
            || !gc_notice_applies(g.members.conf_ver, g.peer_id(), conf_ver, peer)
        {
            return;
        }
        tracing::info!(
            group,
            node = self.node_id,
            from,
            conf_ver,
            local_conf_ver = g.members.conf_ver,
            "replica removed while away"
        );
        self.destroy(group, conf_ver);
    }

    /// Removes this node's replica of `group`: pending requests fail, its
    /// raft state and data are deleted and a tombstone written (synced).
    pub(super) fn destroy(&mut self, group: u64, conf_ver: u64) {
        let Some(mut g) = self.groups.remove(&group) else {
            return;
        };
        g.fail_all(|| StoreError::NoSuchGroup(group));
        for (_, waiters) in g.reads_waiting_apply.drain(..) {
            for cb in waiters {
                let _ = cb.send(Err(StoreError::NoSuchGroup(group)));
            }
        }
        if let Some((_, _, path)) = g.incoming_snapshot.take() {
            let _ = std::fs::remove_file(path);
        }
        let mut wb = WriteBatch::default();
        raft_storage::stage_destroy(&self.engine, &mut wb, group, conf_ver, g.peer_id());
        if let Err(e) = self.engine.write(wb, true) {
            fatal("destroy replica", e);
        }
        let (start, end) = crate::keys::group_range(group);
        self.reclaimer.deleted(start, end);
        self.outgoing_snapshots
            .retain(|(gid, _, _), _| *gid != group);
        if let Ok(mut views) = self.views.write() {
            views.remove(&group);
        }
        tracing::info!(
            group,
            node = self.node_id,
            peer = g.peer_id(),
            conf_ver,
            "replica removed; its data is deleted"
        );
    }

    /// Proposes one membership change step (leader only).
    pub(super) fn on_change_peers(
        &mut self,
        group: u64,
        changes: Vec<PeerChange>,
        conf_ver: u64,
        cb: ProposeCb,
    ) {
        let r = self.propose_change(group, &changes, conf_ver);
        match r {
            Ok((index, term)) => {
                let deadline =
                    Instant::now() + Duration::from_millis(self.config.limits.request_timeout_ms);
                if let Some(g) = self.groups.get_mut(&group) {
                    g.pending.insert(
                        index,
                        PendingProposal {
                            term,
                            cb,
                            deadline,
                            conf_change: true,
                        },
                    );
                }
            }
            Err(e) => {
                let _ = cb.send(Err(e));
            }
        }
    }

    fn propose_change(
        &mut self,
        group: u64,
        changes: &[PeerChange],
        conf_ver: u64,
    ) -> Result<(u64, u64), StoreError> {
        let me = self.node_id;
        let g = propose::leader_group(&mut self.groups, group)?;
        let actual = g.members.conf_ver;
        if conf_ver != 0 && conf_ver != actual {
            return Err(StoreError::ConfChanged {
                group,
                expected: conf_ver,
                actual,
            });
        }
        if g.node.raft.has_pending_conf() {
            return Err(StoreError::Busy {
                group,
                what: "an earlier membership change (not applied yet)",
            });
        }
        let commit = g.node.raft.raft_log.committed;
        let progress = g.node.raft.prs();
        let cc = membership::plan(
            &g.members,
            me,
            changes,
            |n| progress.get(n).map(|p| p.matched),
            commit,
        )
        .map_err(|reason| StoreError::BadConfChange { group, reason })?;
        let before = g.node.raft.raft_log.last_index();
        g.node
            .propose_conf_change(Vec::new(), cc)
            .map_err(|e| StoreError::ProposalDropped {
                group,
                reason: e.to_string(),
            })?;
        let index = g.node.raft.raft_log.last_index();
        if index != before + 1 {
            return Err(StoreError::ProposalDropped {
                group,
                reason: "raft did not append the change".into(),
            });
        }
        tracing::info!(
            group,
            node = me,
            ?changes,
            conf_ver = actual,
            index,
            "membership change proposed"
        );
        Ok((index, g.node.raft.term))
    }

    /// Applies a committed membership change entry of `group` into `wb`.
    /// Returns its result, and whether this node left the group with it.
    pub(super) fn apply_conf_change(
        &mut self,
        group: u64,
        e: &Entry,
        wb: &mut WriteBatch,
    ) -> (ApplyResult, bool) {
        let me = self.node_id;
        let Some(g) = self.groups.get_mut(&group) else {
            return (Ok(ApplyOutput::Done), false);
        };
        let cc = match decode_change(e) {
            Ok(cc) => cc,
            Err(err) => fatal(
                "apply membership change",
                format!("group {group}: undecodable change at {}: {err}", e.index),
            ),
        };
        let cs = match g.node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(err) => {
                // The same on every replica (a committed entry raft itself
                // finds invalid): the configuration stays as it was.
                tracing::error!(group, index = e.index, error = %err, "membership change not applied");
                return (
                    Err(raftblk_proto::Error::new(
                        raftblk_proto::ErrorCode::InvalidArgument,
                        format!("membership change not applied: {err}"),
                    )),
                    false,
                );
            }
        };
        let conf_ver = g.node.store().conf_ver_staged() + 1;
        if let Err(err) = g
            .node
            .mut_store()
            .stage_conf_change(wb, cs.clone(), conf_ver)
        {
            fatal("apply membership change", err);
        }
        let members = Arc::new(Membership::new(&cs, conf_ver));
        tracing::info!(
            group,
            node = me,
            conf_ver,
            voters = ?members.voters,
            learners = ?members.learners,
            outgoing = ?members.voters_outgoing,
            "membership changed"
        );
        g.members = members.clone();
        // This very incarnation: the node may be in the new configuration
        // as another one (removed and added back in one batch).
        let removed = !members.has_peer(g.peer_id());
        (Ok(ApplyOutput::Membership(members)), removed)
    }
}

#[cfg(test)]
mod tests {
    use super::gc_notice_applies;
    use crate::membership::peer_id;

    #[test]
    fn a_gc_notice_removes_only_the_incarnation_it_names() {
        let old = peer_id(3, 0);
        let new = peer_id(3, 7);
        // The replica the notice saw, behind the notice's version.
        assert!(gc_notice_applies(2, old, 6, old));
        // Not behind it: the notice is stale.
        assert!(!gc_notice_applies(6, old, 6, old));
        assert!(!gc_notice_applies(9, old, 6, old));
        // A newer incarnation created after the notice was sent (still
        // uninitialized, or already caught up) is not the one it saw.
        assert!(!gc_notice_applies(0, new, 6, old));
        assert!(!gc_notice_applies(5, new, 6, old));
        // Notices that name no peer (older nodes) never remove a replica
        // that has not received its first snapshot yet.
        assert!(!gc_notice_applies(0, new, 6, 0));
        assert!(gc_notice_applies(2, old, 6, 0));
    }
}
