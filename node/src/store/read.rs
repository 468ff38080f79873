//! Reads: ReadIndex rounds batched per group (every read that arrives in
//! one round shares one raft read-index request), and the leader lease
//! those rounds grant (see the store's module docs for why it is safe).
//! Leadership transfers live here too, since a transfer must drop the
//! lease before the transferee can campaign.
//!
//! Three rules keep the lease sound beyond the basic argument:
//! - Contexts are unique cluster-wide ([`ReadCtx`]: node id + a sequence
//!   that starts at the wall clock at startup), so a follower's forwarded
//!   read never merges with the leader's own round in raft-rs's read-only
//!   queue (which would count acks of older heartbeats for it).
//! - After a transfer attempt, no lease is granted until the transferee has
//!   acknowledged, in the same term, a heartbeat sent after the attempt was
//!   aborted ([`TransferFence`]): the MsgTimeoutNow already sent travels
//!   ahead of that heartbeat on the same ordered stream, so an ack in the
//!   same term proves it can no longer make the transferee win.
//! - raft-rs drops read-index requests until the leader has committed an
//!   entry of its term; reads are held until this replica sees such a
//!   commit, and those in flight are re-issued at that moment rather than
//!   after the periodic re-issue timeout.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raft::prelude::{Message, MessageType};

use super::{Group, InflightRead, Store};
use crate::membership;
use crate::msg::{ReadCb, StoreError};

/// Issues read-index contexts: 16 bytes, this node's id then a sequence
/// number, so no two nodes (nor two incarnations of one node, the
/// sequence starting at the wall clock in nanoseconds) share one.
pub(crate) struct ReadCtx {
    node_id: u64,
    next: u64,
}

impl ReadCtx {
    pub(crate) fn new(node_id: u64) -> ReadCtx {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        ReadCtx {
            node_id,
            next: start.max(1),
        }
    }

    /// A fresh context and its sequence number.
    pub(crate) fn issue(&mut self) -> (Vec<u8>, u64) {
        let seq = self.next;
        self.next += 1;
        (encode_ctx(self.node_id, seq), seq)
    }

    /// The sequence number that the next `issue` returns.
    pub(crate) fn peek(&self) -> u64 {
        self.next
    }

    /// The sequence number of a context this node issued; None for any
    /// other node's (or a malformed) context.
    pub(crate) fn own_seq(&self, ctx: &[u8]) -> Option<u64> {
        let (node, seq) = decode_ctx(ctx)?;
        (node == self.node_id).then_some(seq)
    }
}

pub(crate) fn encode_ctx(node_id: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&node_id.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

pub(crate) fn decode_ctx(ctx: &[u8]) -> Option<(u64, u64)> {
    if ctx.len() != 16 {
        return None;
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&ctx[..8]);
    b.copy_from_slice(&ctx[8..]);
    Some((u64::from_be_bytes(a), u64::from_be_bytes(b)))
}

/// Leadership transfers were attempted in `term`: no lease until every
/// one of `transferees` (a MsgTimeoutNow may be on its way to each) acks a
/// heartbeat whose context is at least `min_seq` (issued after the last
/// attempt ended).
#[derive(Debug, Clone)]
pub(crate) struct TransferFence {
    pub transferees: Vec<u64>,
    pub term: u64,
    pub min_seq: Option<u64>,
}

/// Fences a transfer to `to` in the current term (joining any fence the
/// term already has) and drops the lease.
pub(super) fn fence_transfer(g: &mut Group, to: u64) {
    g.lease_until = None;
    let term = g.node.raft.term;
    match &mut g.transfer_fence {
        Some(f) if f.term == term => {
            if !f.transferees.contains(&to) {
                f.transferees.push(to);
            }
            f.min_seq = None;
        }
        _ => {
            g.transfer_fence = Some(TransferFence {
                transferees: vec![to],
                term,
                min_seq: None,
            })
        }
    }
}

/// Looks at a raft message before it is stepped: a heartbeat response of
/// the fenced transferee, in the fence's term, to a round issued after the
/// transfer ended, lifts the fence.
pub(super) fn observe_for_fence(g: &mut Group, ctxs: &ReadCtx, m: &Message) {
    let Some(f) = &mut g.transfer_fence else {
        return;
    };
    let Some(min_seq) = f.min_seq else { return };
    if m.get_msg_type() == MessageType::MsgHeartbeatResponse
        && m.term == f.term
        && ctxs.own_seq(&m.context).is_some_and(|seq| seq >= min_seq)
    {
        f.transferees.retain(|t| *t != m.from);
        if f.transferees.is_empty() {
            tracing::debug!(group = g.id, "transfer fence lifted");
            g.transfer_fence = None;
        }
    }
}

/// True when this replica has seen an entry of its current term committed.
fn committed_in_term(g: &Group) -> bool {
    let log = &g.node.raft.raft_log;
    log.term(log.committed).is_ok_and(|t| t == g.node.raft.term)
}

/// May a completed read round grant `g` a lease right now?
pub(super) fn may_grant_lease(g: &Group) -> bool {
    g.is_leader() && g.node.raft.lead_transferee.is_none() && g.transfer_fence.is_none()
}

impl Store {
    pub(super) fn on_read_index(&mut self, group: u64, allow_follower: bool, cb: ReadCb) {
        let Some(g) = self.groups.get_mut(&group) else {
            let _ = cb.send(Err(StoreError::NoSuchGroup(group)));
            return;
        };
        let leader = g.leader_hint();
        if !g.is_leader() && (!allow_follower || leader.is_none()) {
            let _ = cb.send(Err(StoreError::NotLeader { group, leader }));
            return;
        }
        let now = Instant::now();
        if let Some(until) = g.lease_until {
            if g.is_leader()
                && now < until
                && g.node.raft.lead_transferee.is_none()
                && g.node.store().applied_index() >= g.lease_index
            {
                let _ = cb.send(Ok(()));
                // Renew in the background once half the lease is gone.
                if until.saturating_duration_since(now) < self.lease_duration / 2
                    && g.reads_unsent.is_empty()
                {
                    g.renew_lease = true;
                }
                return;
            }
        }
        g.reads_unsent.push((cb, now));
    }

    pub(super) fn on_renew_lease(&mut self, group: u64) {
        if let Some(flag) = self.renewals.get(&group) {
            flag.store(false, Ordering::Release);
        }
        if let Some(g) = self.groups.get_mut(&group) {
            if g.is_leader() {
                g.renew_lease = true;
            }
        }
    }

    /// Hands leadership of `group` to node `to` (a voter), or to the voter
    /// with the most of the log.
    pub(super) fn on_transfer_leader(&mut self, group: u64, to: Option<u64>) {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.is_leader() {
                let me = g.peer_id();
                let voter = |peer: u64| {
                    peer != me
                        && g.members.has_peer(peer)
                        && g.members.voters.contains(&membership::node_of(peer))
                };
                let best = to
                    .and_then(|t| g.members.peer_of(t))
                    .filter(|p| voter(*p))
                    .or_else(|| {
                        g.node
                            .raft
                            .prs()
                            .iter()
                            .filter(|(id, _)| voter(**id))
                            .max_by_key(|(_, p)| p.matched)
                            .map(|(id, _)| *id)
                    });
                if let Some(to) = best {
                    fence_transfer(g, to);
                    tracing::warn!(
                        group,
                        to = membership::node_of(to),
                        "transferring leadership"
                    );
                    g.node.transfer_leader(to);
                }
                // Publish the dropped lease before anything else runs.
                self.update_view(group);
            }
        }
    }

    pub(super) fn issue_reads(&mut self) {
        let timeout = Duration::from_millis(self.config.limits.request_timeout_ms);
        for g in self.groups.values_mut() {
            if g.installing.is_some() {
                // Its raft is left alone until the install ends (see
                // `install`); its reads wait.
                continue;
            }
            // Hold reads until raft-rs will serve them; re-issue the ones
            // it dropped the moment it will.
            let ready = committed_in_term(g);
            if !ready {
                g.reads_ready = false;
                continue;
            }
            if !g.reads_ready {
                g.reads_ready = true;
                for (_, r) in g.reads_inflight.drain() {
                    let arrived = r.deadline - timeout;
                    g.reads_unsent
                        .extend(r.waiters.into_iter().map(|cb| (cb, arrived)));
                }
            }
            // A transfer attempt that ended (raft aborted it, we still
            // lead): the next round's heartbeat is the one the transferee
            // must ack before any lease.
            let term = g.node.raft.term;
            let leading = g.is_leader();
            let transferring = g.node.raft.lead_transferee;
            if let (Some(to), true) = (transferring, leading) {
                // A transfer raft started by itself (a peer's
                // MsgTransferLeader) is fenced like our own.
                let fenced = g
                    .transfer_fence
                    .as_ref()
                    .is_some_and(|f| f.term == term && f.transferees.contains(&to));
                if !fenced {
                    fence_transfer(g, to);
                }
            }
            let transferring = transferring.is_some();
            if let Some(f) = &mut g.transfer_fence {
                if f.term != term || !leading {
                    g.transfer_fence = None;
                } else if f.min_seq.is_none() && !transferring {
                    f.min_seq = Some(self.read_ctx.peek());
                    g.renew_lease = true;
                }
            }
            if g.reads_unsent.is_empty() && !(g.renew_lease && g.reads_inflight.is_empty()) {
                continue;
            }
            g.renew_lease = false;
            let (ctx, seq) = self.read_ctx.issue();
            let first = g
                .reads_unsent
                .iter()
                .map(|(_, t)| *t)
                .min()
                .unwrap_or_else(Instant::now);
            let waiters: Vec<ReadCb> = g.reads_unsent.drain(..).map(|(cb, _)| cb).collect();
            g.node.read_index(ctx);
            g.reads_inflight.insert(
                seq,
                InflightRead {
                    waiters,
                    issued: Instant::now(),
                    deadline: first + timeout,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_contexts_are_unique_across_nodes_and_restarts() {
        let mut a = ReadCtx::new(1);
        let mut b = ReadCtx::new(2);
        // Both counters start at the same value: the node id tells them
        // apart, and each node recognises only its own.
        b.next = a.next;
        let (ca, sa) = a.issue();
        let (cb, sb) = b.issue();
        assert_eq!(sa, sb);
        assert_ne!(ca, cb);
        assert_eq!(a.own_seq(&ca), Some(sa));
        assert_eq!(a.own_seq(&cb), None);
        assert_eq!(b.own_seq(&ca), None);
        assert_eq!(
            a.own_seq(&[0u8; 8]),
            None,
            "old 8-byte contexts are foreign"
        );
        // A restarted node starts past every context it issued before.
        let mut again = ReadCtx::new(1);
        let (_, s2) = again.issue();
        assert!(s2 > sa, "restart reused a sequence: {s2} <= {sa}");
        let many: std::collections::HashSet<Vec<u8>> = (0..1000).map(|_| a.issue().0).collect();
        assert_eq!(many.len(), 1000);
    }
}
