//! At-most-once requests. A client names every write and discard with a
//! 16-byte request id, the same on each retry; the id travels as the raft
//! entry's context. A retry whose first copy may have committed (the
//! attempt timed out, the leader changed) must not be applied a second
//! time: between the two copies another write to the same block could have
//! completed, and the second copy would silently undo it.
//!
//! Applying an entry that carries an id records the id and its result in
//! the group's own state-machine range (`keys::applied_request`), in the
//! same write batch as the data it changed. So the record is exactly as
//! durable as the write (an apply a crash lost is replayed from the log,
//! and records itself again), it survives restarts and log compaction, and
//! it travels in snapshots with the data.
//!
//! Before proposing a request, the leader looks for its id (1) among the entries in its log past the applied index
//! ([`InflightRequests`], filled as entries are proposed or appended, and
//! rebuilt at startup from the unapplied log), and waits for that entry
//! instead of proposing again; then (2) among the recorded ids, and answers
//! with the first copy's result. Leader completeness makes this enough: if
//! the first copy committed, the current leader's log or state machine
//! holds it. Both checks run on the store thread, so an apply cannot slip
//! between them. First attempts are looked up as well (a few bloom-filtered
//! point reads): an older client does not mark its retries, and an
//! attempt held up in a queue may arrive after its own retry applied.
//!
//! Records are kept by age, not count: they are filed under the minute
//! (a generation, `GEN_SECS`) the replica applied them in, by its wall
//! clock, and whole generations older than [`KEEP_SECS`] are dropped with
//! one range delete. A retry sent more than `RETRY_AGE_MAX_MS` after its
//! first attempt, whose id is not found, gets `REQUEST_EXPIRED` and is not
//! applied: it may have been applied and forgotten. `KEEP_SECS` exceeds
//! that age by minutes, which covers clock differences between the replica
//! that applied a request (or sent the snapshot that carried it) and the
//! one that leads when the retry comes. The records are bookkeeping, not
//! volume data: replicas may drop them at different times, so group
//! digests leave them out.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;
use raftblk_proto::{Error as PbError, ErrorCode, RETRY_AGE_MAX_MS};
use rocksdb::WriteBatch;

use crate::apply::{Applier, ApplyOutput, ApplyResult};
use crate::engine::{Engine, EngineError};
use crate::keys;

/// How long an applied request id is kept (by the applying replica's
/// clock): the oldest retry checked, plus minutes of clock difference.
pub(crate) const KEEP_SECS: u64 = RETRY_AGE_MAX_MS / 1000 + 150;
/// Length of one generation of records: they are dropped a whole
/// generation at a time.
const GEN_SECS: u64 = 60;
/// Generations ahead of the local clock a lookup also checks (records
/// made by a replica whose clock runs ahead).
const GENS_AHEAD: u64 = 2;
/// Bytes of a request id.
pub(crate) const ID_BYTES: usize = 16;

const _: () = assert!(KEEP_SECS * 1000 >= RETRY_AGE_MAX_MS + 120_000);

pub(crate) type RequestId = [u8; ID_BYTES];

/// The request id carried by an entry context, if it holds one.
pub(crate) fn request_id(context: &[u8]) -> Option<RequestId> {
    context.try_into().ok()
}

/// The generation records made now are filed under.
pub(crate) fn current_gen() -> u64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    secs / GEN_SECS
}

/// Generations still kept when `now` is current: records filed under an
/// older one may be dropped.
fn oldest_kept_gen(now: u64) -> u64 {
    now.saturating_sub(KEEP_SECS.div_ceil(GEN_SECS))
}

/// Records that applying `id` (in generation `gen`) gave `result`, in the
/// round's apply batch.
pub(crate) fn record(
    applier: &mut Applier<'_>,
    wb: &mut WriteBatch,
    group: u64,
    gen: u64,
    id: &RequestId,
    result: &ApplyResult,
) {
    // Writes and discards apply as `Done` or a domain error: an empty
    // record reads back as `Done`, so no other output may be recorded.
    debug_assert!(
        matches!(result, Ok(ApplyOutput::Done) | Err(_)),
        "only Done or an error is recorded for a request id, not {result:?}"
    );
    let value = match result {
        Ok(_) => Vec::new(),
        Err(e) => e.encode_to_vec(),
    };
    applier.put(wb, keys::applied_request(group, gen, id), value);
}

/// The recorded result of applying `id` in `group`, if it is kept.
pub(crate) fn lookup(
    engine: &Engine,
    group: u64,
    id: &RequestId,
) -> Result<Option<ApplyResult>, EngineError> {
    let now = current_gen();
    let keys: Vec<Vec<u8>> = (oldest_kept_gen(now)..=now + GENS_AHEAD)
        .rev()
        .map(|gen| keys::applied_request(group, gen, id))
        .collect();
    for (key, got) in keys.iter().zip(engine.multi_get_kv(&keys)) {
        let Some(v) = got? else { continue };
        if v.is_empty() {
            return Ok(Some(Ok(ApplyOutput::Done)));
        }
        let e = PbError::decode(v.as_slice()).map_err(|e| EngineError::Corrupt {
            key: key.clone(),
            what: format!("applied request record: {e}"),
        })?;
        return Ok(Some(Err(e)));
    }
    Ok(None)
}

/// The answer to a retry `retry_age_ms` old whose id is neither in the log
/// nor recorded: `None` to propose it, or the refusal of one too old to
/// tell whether it was applied.
pub(crate) fn expired(id: &RequestId, retry_age_ms: u64) -> Option<PbError> {
    (retry_age_ms > RETRY_AGE_MAX_MS).then(|| {
        PbError::new(
            ErrorCode::RequestExpired,
            format!(
                "retry of request {} sent {retry_age_ms} ms after its first attempt: the group \
                 checks retries for {RETRY_AGE_MAX_MS} ms, so this one may have been applied \
                 already and is not applied again; issue it as a new request",
                hex(id)
            ),
        )
    })
}

fn hex(id: &RequestId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stages the removal of `group`'s records older than what is kept when
/// `now` is the current generation.
pub(crate) fn stage_evict(engine: &Engine, wb: &mut WriteBatch, group: u64, now: u64) {
    let (start, end) = keys::applied_requests_before(group, oldest_kept_gen(now));
    wb.delete_range_cf(engine.kv_cf(), start, end);
}

/// When a group's old records are due to go: the span of generations it
/// may hold records of (unknown after a restart or a snapshot install:
/// then at once).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EvictDue {
    span: Option<(u64, u64)>,
    known: bool,
}

impl EvictDue {
    /// A record was filed under `gen`.
    pub(crate) fn recorded(&mut self, gen: u64) {
        self.span = Some(
            self.span
                .map_or((gen, gen), |(lo, hi)| (lo.min(gen), hi.max(gen))),
        );
    }

    /// Whether records older than what `now` keeps may exist.
    pub(crate) fn due(&self, now: u64) -> bool {
        !self.known || self.span.is_some_and(|(lo, _)| lo < oldest_kept_gen(now))
    }

    /// Old records were removed as of `now`.
    pub(crate) fn evicted(&mut self, now: u64) {
        let keep = oldest_kept_gen(now);
        self.known = true;
        self.span = self
            .span
            .and_then(|(lo, hi)| (hi >= keep).then_some((lo.max(keep), hi)));
    }

    /// The group's state was replaced (snapshot install): what it holds is
    /// unknown again.
    pub(crate) fn forget(&mut self) {
        *self = EvictDue::default();
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

    fn id(n: u8) -> RequestId {
        [n; ID_BYTES]
    }

    fn record_at(engine: &Engine, group: u64, gen: u64, id: &RequestId, result: ApplyResult) {
        let mut wb = WriteBatch::default();
        let mut a = Applier::new(engine);
        record(&mut a, &mut wb, group, gen, id, &result);
        engine
            .write_apply(wb)
            .unwrap_or_else(|e| panic!("write: {e}"));
    }

    #[test]
    fn records_are_found_within_the_window_and_dropped_after_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let now = current_gen();
        let refusal = PbError::new(ErrorCode::InvalidArgument, "unaligned");
        record_at(&engine, 3, now, &id(1), Ok(ApplyOutput::Done));
        record_at(&engine, 3, now + 1, &id(2), Err(refusal.clone()));
        record_at(
            &engine,
            3,
            oldest_kept_gen(now),
            &id(3),
            Ok(ApplyOutput::Done),
        );
        record_at(
            &engine,
            3,
            oldest_kept_gen(now) - 1,
            &id(4),
            Ok(ApplyOutput::Done),
        );
        let get = |group, n| lookup(&engine, group, &id(n)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(get(3, 1), Some(Ok(ApplyOutput::Done)));
        // A record made by a replica whose clock runs ahead, with its error.
        assert_eq!(get(3, 2), Some(Err(refusal)));
        assert_eq!(get(3, 3), Some(Ok(ApplyOutput::Done)));
        // Older than the window: not trusted, and dropped.
        assert_eq!(get(3, 4), None);
        // Another group's records are its own.
        assert_eq!(get(4, 1), None);
        let mut wb = WriteBatch::default();
        stage_evict(&engine, &mut wb, 3, now);
        engine.write_apply(wb).unwrap_or_else(|e| panic!("{e}"));
        let key = keys::applied_request(3, oldest_kept_gen(now) - 1, &id(4));
        assert_eq!(engine.get_kv(&key).unwrap_or_else(|e| panic!("{e}")), None);
        assert_eq!(get(3, 3), Some(Ok(ApplyOutput::Done)));
        assert_eq!(get(3, 1), Some(Ok(ApplyOutput::Done)));
    }

    #[test]
    fn retries_older_than_checked_are_refused() {
        assert!(expired(&id(1), 0).is_none());
        assert!(expired(&id(1), RETRY_AGE_MAX_MS).is_none());
        let e = expired(&id(1), RETRY_AGE_MAX_MS + 1);
        assert_eq!(e.map(|e| e.kind()), Some(ErrorCode::RequestExpired));
        assert_eq!(request_id(&[7u8; 16]), Some([7u8; 16]));
        assert_eq!(request_id(&[7u8; 8]), None);
        assert_eq!(request_id(&[]), None);
    }

    #[test]
    fn eviction_is_due_only_for_old_records() {
        let now = 1000;
        let mut d = EvictDue::default();
        assert!(d.due(now), "unknown after a start: evict once");
        d.evicted(now);
        assert!(!d.due(now));
        let span = KEEP_SECS.div_ceil(GEN_SECS);
        d.recorded(now);
        d.recorded(now + 3);
        assert!(!d.due(now));
        assert!(!d.due(now + span));
        // The first record is old, the second not yet.
        assert!(d.due(now + span + 1));
        d.evicted(now + span + 1);
        assert!(!d.due(now + span + 1));
        assert!(d.due(now + span + 4), "the second record ages too");
        d.evicted(now + span + 4);
        assert!(!d.due(now + 10_000), "nothing left");
        d.forget();
        assert!(d.due(now));
    }

    #[test]
    fn inflight_requests_follow_the_log() {
        let mut f = InflightRequests::default();
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
}
