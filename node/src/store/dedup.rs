//! At-most-once requests. A client names every write and discard with a
//! 16-byte request id, the same on each retry; the id travels as the raft
//! entry's context. A retry whose first copy may have committed (the
//! attempt timed out, the leader changed) must not be applied a second
//! time: between the two copies another write to the same block could have
//! completed, and the second copy would silently undo it.
//!
//! So, before proposing a request with an id, the leader looks for it (1)
//! among the requests its group applied recently ([`AppliedRequests`], on
//! every replica, since any replica may lead next) and answers with that
//! result, and (2) among the entries in its log past the applied index
//! ([`InflightRequests`], filled as entries are proposed or appended, so a
//! lookup costs a hash probe, not a log scan), and then waits for that
//! entry instead of proposing again. Leader completeness makes this
//! enough: if the first copy committed, the current leader's log holds it.
//!
//! The window is bounded: ids are kept for [`KEEP`] (longer than any
//! client's retry deadline) and at most [`IDS_MAX`] per group; a node
//! rebuilds it at startup from the applied part of its raft log still on
//! disk. A snapshot install does not carry it (the rare case of a retry
//! that spans a snapshot install and a leader change is not covered).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::apply::ApplyResult;

/// How long an applied request id is remembered.
pub(crate) const KEEP: Duration = Duration::from_secs(120);
/// Request ids remembered per group at most.
pub(crate) const IDS_MAX: usize = 65_536;
/// Bytes of a request id.
pub(crate) const ID_BYTES: usize = 16;

pub(crate) type RequestId = [u8; ID_BYTES];

/// The request id carried by an entry context, if it holds one.
pub(crate) fn request_id(context: &[u8]) -> Option<RequestId> {
    context.try_into().ok()
}

/// Requests a group applied recently, with their results.
#[derive(Default)]
pub(crate) struct AppliedRequests {
    results: HashMap<RequestId, ApplyResult>,
    order: VecDeque<(Instant, RequestId)>,
}

impl AppliedRequests {
    pub(crate) fn record(&mut self, id: RequestId, result: ApplyResult, now: Instant) {
        while let Some((at, old)) = self.order.front() {
            if now.duration_since(*at) < KEEP && self.order.len() < IDS_MAX {
                break;
            }
            self.results.remove(old);
            self.order.pop_front();
        }
        if self.results.insert(id, result).is_none() {
            self.order.push_back((now, id));
        }
    }

    pub(crate) fn get(&self, id: &RequestId) -> Option<&ApplyResult> {
        self.results.get(id)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.results.len()
    }
}

/// Request ids of entries in this replica's log past its applied index:
/// `(index, term)` of the entry that carries each. Entries replaced by a
/// conflicting append are dropped when their index is reused or applied;
/// a lookup still checks the log's term at that index.
#[derive(Default)]
pub(crate) struct InflightRequests {
    by_id: HashMap<RequestId, (u64, u64)>,
    by_index: BTreeMap<u64, RequestId>,
}

impl InflightRequests {
    /// An entry carrying `id` was appended (or proposed) at `index`.
    pub(crate) fn appended(&mut self, index: u64, term: u64, id: RequestId) {
        if let Some(old) = self.by_index.insert(index, id) {
            if old != id {
                self.by_id.remove(&old);
            }
        }
        self.by_id.insert(id, (index, term));
    }

    /// Everything up to `index` is applied (or replaced by a snapshot).
    pub(crate) fn applied_up_to(&mut self, index: u64) {
        while let Some((&i, _)) = self.by_index.first_key_value() {
            if i > index {
                break;
            }
            if let Some((_, id)) = self.by_index.pop_first() {
                if self.by_id.get(&id).is_some_and(|(at, _)| *at == i) {
                    self.by_id.remove(&id);
                }
            }
        }
    }

    pub(crate) fn get(&self, id: &RequestId) -> Option<(u64, u64)> {
        self.by_id.get(id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::ApplyOutput;

    #[test]
    fn ids_are_remembered_within_bounds() {
        let mut a = AppliedRequests::default();
        let t0 = Instant::now();
        let id = |n: u8| [n; ID_BYTES];
        a.record(id(1), Ok(ApplyOutput::Done), t0);
        a.record(id(1), Ok(ApplyOutput::Done), t0);
        assert_eq!(a.len(), 1);
        assert!(a.get(&id(1)).is_some());
        assert!(a.get(&id(2)).is_none());
        // Past KEEP the old id goes when a new one arrives.
        a.record(
            id(2),
            Ok(ApplyOutput::Done),
            t0 + KEEP + Duration::from_secs(1),
        );
        assert!(a.get(&id(1)).is_none());
        assert!(a.get(&id(2)).is_some());
        assert_eq!(request_id(&[7u8; 16]), Some([7u8; 16]));
        assert_eq!(request_id(&[7u8; 8]), None);
        assert_eq!(request_id(&[]), None);
    }

    #[test]
    fn inflight_requests_follow_the_log() {
        let mut f = InflightRequests::default();
        let id = |n: u8| [n; ID_BYTES];
        f.appended(5, 2, id(1));
        f.appended(6, 2, id(2));
        assert_eq!(f.get(&id(1)), Some((5, 2)));
        // A conflicting append replaces index 6.
        f.appended(6, 3, id(3));
        assert_eq!(f.get(&id(2)), None);
        assert_eq!(f.get(&id(3)), Some((6, 3)));
        f.applied_up_to(5);
        assert_eq!(f.get(&id(1)), None);
        assert_eq!(f.get(&id(3)), Some((6, 3)));
        f.applied_up_to(100);
        assert_eq!(f.get(&id(3)), None);
        assert!(f.by_index.is_empty() && f.by_id.is_empty());
    }

    #[test]
    fn the_count_is_bounded() {
        let mut a = AppliedRequests::default();
        let t0 = Instant::now();
        for n in 0..(IDS_MAX as u64 + 10) {
            let mut id = [0u8; ID_BYTES];
            id[..8].copy_from_slice(&n.to_be_bytes());
            a.record(id, Ok(ApplyOutput::Done), t0);
        }
        assert!(a.len() <= IDS_MAX);
    }
}
