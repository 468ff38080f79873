//! Proposals: client requests (applied at most once, see `dedup`) and
//! block repairs (tied to a log position, see `crate::repair`), both
//! checked and appended on the store thread.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{dedup, Group, PendingProposal, Store};
use crate::msg::{ProposeCb, StoreError};
use crate::raft_storage::GroupStorage;

impl Store {
    pub(super) fn propose(
        &mut self,
        group: u64,
        data: Vec<u8>,
        request_id: Vec<u8>,
        retry_age_ms: u64,
        cb: ProposeCb,
    ) {
        let g = match leader_group(&mut self.groups, group) {
            Ok(g) => g,
            Err(e) => {
                let _ = cb.send(Err(e));
                return;
            }
        };
        let deadline =
            Instant::now() + Duration::from_millis(self.config.limits.request_timeout_ms);
        let id = dedup::request_id(&request_id);
        if let Some(id) = id {
            // A copy in the log, not applied yet: wait for it.
            if let Some((index, term)) = g.inflight_requests.get(&id) {
                if g.node.raft.raft_log.term(index).is_ok_and(|t| t == term) {
                    g.dup_waiters.push((index, term, cb, deadline));
                    return;
                }
            }
            // An applied copy: answer with its result. First attempts are
            // looked up too: a client that does not say it retries (an
            // older one), or an attempt delayed past its own retry, must
            // not be applied a second time either.
            match dedup::lookup(&self.engine, group, &id) {
                Ok(Some(r)) => {
                    let _ = cb.send(Ok(r));
                    return;
                }
                Ok(None) => {
                    if let Some(e) = dedup::expired(&id, retry_age_ms) {
                        let _ = cb.send(Ok(Err(e)));
                        return;
                    }
                }
                Err(e) => {
                    let _ = cb.send(Err(StoreError::Engine(e)));
                    return;
                }
            }
        } else if !request_id.is_empty() {
            let _ = cb.send(Ok(Err(raftblk_proto::Error::new(
                raftblk_proto::ErrorCode::InvalidArgument,
                format!(
                    "request id must be {} bytes, not {}",
                    dedup::ID_BYTES,
                    request_id.len()
                ),
            ))));
            return;
        }
        let before = g.node.raft.raft_log.last_index();
        if let Err(e) = g.node.propose(request_id, data) {
            let _ = cb.send(Err(StoreError::ProposalDropped {
                group,
                reason: e.to_string(),
            }));
            return;
        }
        let index = g.node.raft.raft_log.last_index();
        assert_eq!(index, before + 1, "one proposal appends one entry");
        if let Some(id) = id {
            g.inflight_requests.appended(index, g.node.raft.term, id);
        }
        g.pending.insert(
            index,
            PendingProposal {
                term: g.node.raft.term,
                cb,
                deadline,
                conf_change: false,
            },
        );
    }

    pub(super) fn on_repair(&mut self, group: u64, volume: u64, block: u64, cb: ProposeCb) {
        let g = match leader_group(&mut self.groups, group) {
            Ok(g) => g,
            Err(e) => {
                let _ = cb.send(Err(e));
                return;
            }
        };
        let applied = g.node.store().applied_index();
        let last = g.node.raft.raft_log.last_index();
        let unapplied = match g.node.raft.raft_log.entries(
            applied + 1,
            REPAIR_SCAN_BYTES_MAX,
            raft::GetEntriesContext::empty(false),
        ) {
            // Too much unapplied to look through now: retry later.
            Ok(e) if last > applied && e.last().map(|e| e.index) != Some(last) => {
                let _ = cb.send(Err(StoreError::Busy {
                    group,
                    what: "block repair",
                }));
                return;
            }
            Ok(e) => e,
            Err(e) => {
                let _ = cb.send(Err(StoreError::ProposalDropped {
                    group,
                    reason: format!("cannot read the unapplied log: {e}"),
                }));
                return;
            }
        };
        let plan = crate::repair::plan(
            &self.engine,
            group,
            volume,
            block,
            unapplied.iter().map(|e| e.data.as_ref()),
        );
        let cmd = match plan {
            Ok(cmd) => cmd,
            Err(crate::repair::RepairRefusal::Busy) => {
                let _ = cb.send(Err(StoreError::Busy {
                    group,
                    what: "block repair",
                }));
                return;
            }
            Err(crate::repair::RepairRefusal::LeaderCorrupt(e)) => {
                let _ = cb.send(Ok(Err(raftblk_proto::Error::new(
                    raftblk_proto::ErrorCode::Corrupted,
                    format!("the leader's copy is corrupt too: {e}"),
                ))));
                return;
            }
            Err(crate::repair::RepairRefusal::Engine(e)) => {
                let _ = cb.send(Err(StoreError::Engine(e)));
                return;
            }
        };
        let data = raftblk_proto::Command {
            cmd: Some(raftblk_proto::command::Cmd::RepairBlock(cmd)),
        };
        self.propose(
            group,
            prost::Message::encode_to_vec(&data),
            Vec::new(),
            0,
            cb,
        );
    }
}

/// Group `group`, if this node hosts and leads it.
pub(super) fn leader_group(
    groups: &mut BTreeMap<u64, Group>,
    group: u64,
) -> Result<&mut Group, StoreError> {
    let g = groups
        .get_mut(&group)
        .ok_or(StoreError::NoSuchGroup(group))?;
    if !g.is_leader() {
        let leader = g.leader_hint();
        return Err(StoreError::NotLeader { group, leader });
    }
    Ok(g)
}

/// Bytes of unapplied log a repair looks through at most.
const REPAIR_SCAN_BYTES_MAX: u64 = 64 << 20;
/// Request ids in the log past the applied index: after a restart a retry
/// still finds its first copy if it is not applied yet (applied ones are
/// recorded in the state machine, see `dedup`).
pub(super) fn unapplied_requests(storage: &GroupStorage) -> dedup::InflightRequests {
    use raft::Storage as _;
    let mut inflight = dedup::InflightRequests::default();
    let last = storage.last_index_now();
    let lo = (storage.truncated_index() + 1).max(storage.applied_index() + 1);
    if lo > last {
        return inflight;
    }
    // A table missing an unapplied entry would let its retry be proposed
    // again: a log that cannot be read stops the node.
    let entries = storage
        .entries(lo, last + 1, None, raft::GetEntriesContext::empty(false))
        .unwrap_or_else(|e| super::fatal("read the unapplied log", e));
    for e in entries {
        if let Some(id) = dedup::request_id(&e.context) {
            inflight.appended(e.index, e.term, id);
        }
    }
    inflight
}
