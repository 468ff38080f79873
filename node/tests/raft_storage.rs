//! `GroupStorage` against the raft-rs `Storage` contract: `entries` bounds,
//! size limit and errors, `term` (including the truncated index), and
//! `first_index`/`last_index` across appends, conflicting appends,
//! compaction and snapshots, with everything surviving a reopen.

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage, StorageError};
use raftblk_node::engine::Engine;
use raftblk_node::keys;
use raftblk_node::raft_storage::GroupStorage;
use rocksdb::WriteBatch;

const GROUP: u64 = 7;
const VOTERS: [u64; 3] = [1, 2, 3];

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path()).expect("open engine");
    (dir, engine)
}

fn open(engine: &Engine, group: u64) -> GroupStorage {
    GroupStorage::open(engine.clone(), group, &VOTERS).expect("open group storage")
}

/// An entry whose payload size varies with its index, so size limits are
/// exercised with unequal entries.
fn ent(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: vec![index as u8; 40 + (index % 5) as usize * 30].into(),
        ..Default::default()
    }
}

fn ents(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| ent(i, term)).collect()
}

/// Stages `entries` and writes them, as the ready loop does.
fn append(engine: &Engine, st: &mut GroupStorage, entries: &[Entry]) {
    let mut wb = WriteBatch::default();
    st.stage_append(&mut wb, entries).expect("stage append");
    engine.write(wb, true).expect("write append");
}

/// Stages and writes (synced) a hard state, as the ready loop does.
fn write_hard_state(engine: &Engine, st: &mut GroupStorage, hs: &HardState) {
    let mut wb = WriteBatch::default();
    st.stage_hard_state(&mut wb, hs).expect("stage hard state");
    engine.write(wb, true).expect("write hard state");
}

/// Marks `index` applied and flushed, as the store's apply (unlogged)
/// and its kv-flush thread do, so it may be compacted.
fn apply_to(engine: &Engine, st: &mut GroupStorage, index: u64) {
    let term = st.term(index).expect("term of applied index");
    let mut wb = WriteBatch::default();
    st.stage_apply_state(&mut wb, index, term);
    engine.write_apply(wb).expect("write apply state");
    st.set_applied(index, term);
    engine.flush_kv().expect("flush");
    st.mark_durable(st.incarnation(), index);
}

fn compact(engine: &Engine, st: &mut GroupStorage, index: u64) {
    let mut wb = WriteBatch::default();
    st.stage_compact(&mut wb, index).expect("stage compact");
    engine.write(wb, true).expect("write compaction");
}

fn get(st: &GroupStorage, low: u64, high: u64, max: Option<u64>) -> raft::Result<Vec<Entry>> {
    st.entries(low, high, max, GetEntriesContext::empty(false))
}

fn is_compacted<T>(r: raft::Result<T>) -> bool {
    matches!(r, Err(raft::Error::Store(StorageError::Compacted)))
}

fn is_unavailable<T>(r: raft::Result<T>) -> bool {
    matches!(r, Err(raft::Error::Store(StorageError::Unavailable)))
}

fn indexes(v: &[Entry]) -> Vec<u64> {
    v.iter().map(|e| e.index).collect()
}

/// Every `Storage` read agrees with the expected log `[first, last]`
/// (terms from `term_of`) and with the truncated state `(first - 1,
/// truncated_term)`.
fn check_log(
    st: &GroupStorage,
    first: u64,
    last: u64,
    truncated_term: u64,
    term_of: &dyn Fn(u64) -> u64,
) {
    assert_eq!(st.first_index().expect("first_index"), first, "first_index");
    assert_eq!(st.last_index().expect("last_index"), last, "last_index");
    assert_eq!(st.truncated_index(), first - 1);
    assert_eq!(
        st.term(first - 1).expect("term of the truncated index"),
        truncated_term,
        "term({})",
        first - 1
    );
    for i in first..=last {
        assert_eq!(st.term(i).expect("term"), term_of(i), "term({i})");
    }
    if first >= 2 {
        assert!(
            is_compacted(st.term(first - 2)),
            "term({}) must be Compacted",
            first - 2
        );
        assert!(is_compacted(st.term(0)), "term(0) must be Compacted");
    }
    assert!(
        is_unavailable(st.term(last + 1)),
        "term({}) must be Unavailable",
        last + 1
    );
    assert!(is_unavailable(st.term(last + 100)));

    // Every non-empty range inside the log, unlimited.
    for lo in first..=last {
        for hi in lo + 1..=last + 1 {
            let got = get(st, lo, hi, None).expect("entries in range");
            assert_eq!(
                indexes(&got),
                (lo..hi).collect::<Vec<_>>(),
                "entries({lo}, {hi})"
            );
            for e in &got {
                assert_eq!(e.term, term_of(e.index), "entry {} term", e.index);
                assert_eq!(e.data, ent(e.index, e.term).data, "entry {} data", e.index);
            }
        }
    }
    // Out of range below: Compacted; above: Unavailable.
    assert!(is_compacted(get(st, first - 1, last + 1, None)));
    assert!(is_compacted(get(st, first - 1, first, None)));
    assert!(is_unavailable(get(st, first, last + 2, None)));
    assert!(is_unavailable(get(st, last + 1, last + 2, None)));
}

#[test]
fn fresh_storage_is_empty_with_bootstrap_conf_state() {
    let (_dir, engine) = engine();
    let st = open(&engine, GROUP);
    assert_eq!(st.group(), GROUP);
    assert_eq!(st.first_index().expect("first"), 1);
    assert_eq!(st.last_index().expect("last"), 0);
    assert_eq!(st.term(0).expect("term(0)"), 0);
    assert!(is_unavailable(st.term(1)));
    assert!(is_unavailable(get(&st, 1, 2, None)));
    let rs = st.initial_state().expect("initial_state");
    assert_eq!(rs.hard_state, HardState::default());
    assert_eq!(rs.conf_state.voters, VOTERS.to_vec());
    assert_eq!(st.applied_index(), 0);
    assert_eq!(st.log_bytes(), 0);
    // Nothing applied yet: no snapshot can be made.
    assert!(matches!(
        st.snapshot(0, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));

    // The bootstrap configuration is persisted: a reopen with other
    // voters keeps the first one.
    drop(st);
    let st = GroupStorage::open(engine.clone(), GROUP, &[9]).expect("reopen");
    assert_eq!(
        st.initial_state().expect("initial_state").conf_state.voters,
        VOTERS.to_vec()
    );
}

#[test]
fn entries_and_terms_after_append() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=3, 1));
    append(&engine, &mut st, &ents(4..=10, 2));
    let term_of = |i: u64| if i <= 3 { 1 } else { 2 };
    check_log(&st, 1, 10, 0, &term_of);

    // Same after a reopen from the engine.
    drop(st);
    let st = open(&engine, GROUP);
    check_log(&st, 1, 10, 0, &term_of);
}

#[test]
fn entries_respects_max_size_like_raft_limit_size() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=20, 3));
    let all = get(&st, 1, 21, None).expect("all entries");
    assert_eq!(all.len(), 20);
    let sizes: Vec<u64> = all.iter().map(|e| u64::from(e.compute_size())).collect();
    let total: u64 = sizes.iter().sum();

    for lo in [1u64, 2, 7, 20] {
        let hi = 21;
        let mut limits = vec![0, 1, sizes[(lo - 1) as usize], total, u64::MAX];
        // Limits at and around each prefix sum.
        let mut sum = 0;
        for s in &sizes[(lo - 1) as usize..] {
            sum += s;
            limits.extend([sum - 1, sum, sum + 1]);
        }
        for max in limits {
            let got = get(&st, lo, hi, Some(max)).expect("entries with a size limit");
            let mut want = all[(lo - 1) as usize..].to_vec();
            raft::util::limit_size(&mut want, Some(max));
            assert!(
                !got.is_empty(),
                "at least one entry even when max_size={max}"
            );
            assert_eq!(
                indexes(&got),
                indexes(&want),
                "entries({lo}, {hi}, max_size={max})"
            );
            let got_bytes: u64 = got.iter().map(|e| u64::from(e.compute_size())).sum();
            assert!(
                got.len() == 1 || got_bytes <= max,
                "entries({lo}, {hi}, {max}) returned {got_bytes} bytes"
            );
        }
    }
    // A zero limit still returns exactly one entry.
    assert_eq!(indexes(&get(&st, 5, 10, Some(0)).expect("max 0")), vec![5]);
}

#[test]
fn conflicting_append_truncates_the_tail() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=10, 1));
    let bytes_before = st.log_bytes();

    // A new leader overwrites 6.. with a shorter log of term 2.
    append(&engine, &mut st, &ents(6..=7, 2));
    let term_of = |i: u64| if i <= 5 { 1 } else { 2 };
    check_log(&st, 1, 7, 0, &term_of);
    assert!(st.log_bytes() < bytes_before);

    // Overwriting in the middle with a longer log extends it again.
    append(&engine, &mut st, &ents(3..=12, 4));
    let term_of = |i: u64| if i <= 2 { 1 } else { 4 };
    check_log(&st, 1, 12, 0, &term_of);

    // Replacing exactly the last entry.
    append(&engine, &mut st, &ents(12..=12, 5));
    let term_of = |i: u64| match i {
        ..=2 => 1,
        12 => 5,
        _ => 4,
    };
    check_log(&st, 1, 12, 0, &term_of);
    let bytes = st.log_bytes();

    // The truncated tail is gone on disk too: a reopen sees the same log,
    // not stale entries past the conflict.
    drop(st);
    let st = open(&engine, GROUP);
    check_log(&st, 1, 12, 0, &term_of);
    assert_eq!(st.log_bytes(), bytes);

    // A conflict that shortens the log is also durable.
    let mut st = st;
    append(&engine, &mut st, &ents(4..=4, 6));
    drop(st);
    let st = open(&engine, GROUP);
    let term_of = |i: u64| {
        if i <= 2 {
            1
        } else if i == 3 {
            4
        } else {
            6
        }
    };
    check_log(&st, 1, 4, 0, &term_of);
    assert!(engine
        .get_raft(&keys::entry(GROUP, 5))
        .expect("read")
        .is_none());
}

/// Apply skips the WAL, so the log is the only copy of an entry until a
/// flush made its apply durable: compaction stops at the durable index,
/// and only flush reports of this very replica move it.
#[test]
fn compaction_never_passes_the_durable_apply() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=10, 1));
    apply_to(&engine, &mut st, 4);
    // Applied to 8 but not flushed.
    let mut wb = WriteBatch::default();
    st.stage_apply_state(&mut wb, 8, 1);
    engine.write_apply(wb).expect("write apply state");
    st.set_applied(8, 1);
    assert_eq!(st.durable_applied(), 4);
    compact(&engine, &mut st, 4);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut wb = WriteBatch::default();
        let _ = st.stage_compact(&mut wb, 6);
    }));
    assert!(r.is_err(), "compaction past the durable apply was staged");
    // A report from another incarnation of the group is ignored; one
    // naming an index past the applied one counts only up to it.
    let st2 = open(&engine, GROUP + 1);
    st.mark_durable(st2.incarnation(), 8);
    assert_eq!(st.durable_applied(), 4);
    st.mark_durable(st.incarnation(), 20);
    assert_eq!(st.durable_applied(), 8);
}

#[test]
fn compaction_moves_first_index_and_keeps_the_truncated_term() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=4, 1));
    append(&engine, &mut st, &ents(5..=12, 2));
    let term_of = |i: u64| if i <= 4 { 1 } else { 2 };
    apply_to(&engine, &mut st, 9);
    let bytes_all = st.log_bytes();

    compact(&engine, &mut st, 4);
    check_log(&st, 5, 12, 1, &term_of);
    assert!(st.log_bytes() < bytes_all);

    // Compacting at or below the truncated index is a no-op.
    compact(&engine, &mut st, 2);
    compact(&engine, &mut st, 4);
    check_log(&st, 5, 12, 1, &term_of);

    compact(&engine, &mut st, 9);
    check_log(&st, 10, 12, 2, &term_of);
    assert!(is_compacted(get(&st, 9, 11, None)));
    assert!(is_compacted(get(&st, 1, 13, None)));
    let bytes = st.log_bytes();

    // Persistence: truncated state, remaining entries and apply state.
    drop(st);
    let mut st = open(&engine, GROUP);
    check_log(&st, 10, 12, 2, &term_of);
    assert_eq!(st.log_bytes(), bytes);
    assert_eq!((st.applied_index(), st.applied_term()), (9, 2));
    for i in 1..=9 {
        assert!(
            engine
                .get_raft(&keys::entry(GROUP, i))
                .expect("read")
                .is_none(),
            "compacted entry {i} still stored"
        );
    }

    // Appending after compaction continues the log; a conflicting append
    // right after the truncated index is allowed.
    append(&engine, &mut st, &ents(13..=14, 2));
    check_log(&st, 10, 14, 2, &term_of);
    append(&engine, &mut st, &ents(10..=11, 3));
    let term_of2 = |i: u64| if i <= 9 { 2 } else { 3 };
    check_log(&st, 10, 11, 2, &term_of2);

    // Compacting the whole log: first = last + 1, term(last) still known.
    apply_to(&engine, &mut st, 11);
    compact(&engine, &mut st, 11);
    assert_eq!(st.first_index().expect("first"), 12);
    assert_eq!(st.last_index().expect("last"), 11);
    assert_eq!(st.term(11).expect("term(11)"), 3);
    assert_eq!(st.log_bytes(), 0);
    assert!(is_compacted(get(&st, 11, 12, None)));
    assert!(is_unavailable(get(&st, 12, 13, None)));
    drop(st);
    let st = open(&engine, GROUP);
    assert_eq!(st.first_index().expect("first"), 12);
    assert_eq!(st.last_index().expect("last"), 11);
    assert_eq!(st.term(11).expect("term(11)"), 3);
}

#[test]
fn snapshot_resets_the_log_to_its_index() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=8, 1));
    let mut wb = WriteBatch::default();
    st.stage_hard_state(
        &mut wb,
        &HardState {
            term: 1,
            vote: 2,
            commit: 6,
            ..Default::default()
        },
    )
    .expect("stage hard state");
    engine.write(wb, true).expect("write hard state");

    // A snapshot beyond the log (the usual case for a lagging follower)
    // with a new configuration.
    let conf = ConfState {
        voters: vec![1, 2, 4],
        learners: vec![5],
        ..Default::default()
    };
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 20;
    snap.mut_metadata().term = 4;
    snap.mut_metadata().set_conf_state(conf.clone());
    let mut wb = WriteBatch::default();
    st.stage_snapshot(&mut wb, &snap).expect("stage snapshot");
    engine.write(wb, true).expect("write snapshot");
    st.set_applied(20, 4);

    let check = |st: &GroupStorage| {
        assert_eq!(st.first_index().expect("first"), 21);
        assert_eq!(st.last_index().expect("last"), 20);
        assert_eq!(st.term(20).expect("term(snapshot index)"), 4);
        assert!(is_compacted(st.term(8)));
        assert!(is_compacted(st.term(19)));
        assert!(is_unavailable(st.term(21)));
        assert!(is_compacted(get(st, 20, 21, None)));
        assert!(is_compacted(get(st, 1, 9, None)));
        assert!(is_unavailable(get(st, 21, 22, None)));
        assert_eq!(st.log_bytes(), 0);
        let rs = st.initial_state().expect("initial_state");
        assert_eq!(rs.conf_state, conf);
        assert_eq!(rs.hard_state.commit, 20, "commit moves up to the snapshot");
        assert_eq!(rs.hard_state.term, 4, "term moves up to the snapshot's");
        assert_eq!(rs.hard_state.vote, 2, "vote is kept");
        assert_eq!((st.applied_index(), st.applied_term()), (20, 4));
        for i in 1..=8 {
            assert!(
                st.term(i).is_err(),
                "old entry {i} must not be visible after the snapshot"
            );
        }
    };
    check(&st);

    // Persistence: the reopened storage reports the same, and the old
    // log is gone from the DB.
    drop(st);
    let mut st = open(&engine, GROUP);
    check(&st);
    for i in 1..=8 {
        assert!(engine
            .get_raft(&keys::entry(GROUP, i))
            .expect("read")
            .is_none());
    }

    // The log continues after the snapshot.
    append(&engine, &mut st, &ents(21..=23, 4));
    let term_of = |_| 4;
    check_log(&st, 21, 23, 4, &term_of);

    // A snapshot that is behind a longer log still drops the whole log
    // (raft-rs only sends snapshots past the commit index; whatever was
    // appended after it is not trusted).
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 22;
    snap.mut_metadata().term = 4;
    snap.mut_metadata().set_conf_state(conf.clone());
    let mut wb = WriteBatch::default();
    st.stage_snapshot(&mut wb, &snap).expect("stage snapshot");
    engine.write(wb, true).expect("write snapshot");
    assert_eq!(st.first_index().expect("first"), 23);
    assert_eq!(st.last_index().expect("last"), 22);
    assert_eq!(st.term(22).expect("term"), 4);
    drop(st);
    let st = open(&engine, GROUP);
    assert_eq!(st.first_index().expect("first"), 23);
    assert_eq!(st.last_index().expect("last"), 22);
    assert!(engine
        .get_raft(&keys::entry(GROUP, 23))
        .expect("read")
        .is_none());
}

#[test]
fn initial_state_returns_the_staged_hard_state_and_survives_reopen() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=5, 3));
    let hs = HardState {
        term: 3,
        vote: 1,
        commit: 4,
        ..Default::default()
    };
    write_hard_state(&engine, &mut st, &hs);
    assert_eq!(st.initial_state().expect("state").hard_state, hs);
    assert_eq!(st.hard_state(), &hs);

    let mut wb = WriteBatch::default();
    st.stage_commit(&mut wb, 5).expect("stage commit");
    engine.write(wb, true).expect("write");
    let hs5 = HardState { commit: 5, ..hs };
    assert_eq!(st.initial_state().expect("state").hard_state, hs5);

    drop(st);
    let st = open(&engine, GROUP);
    let rs = st.initial_state().expect("state");
    assert_eq!(rs.hard_state, hs5);
    assert_eq!(rs.conf_state.voters, VOTERS.to_vec());
    assert_eq!(st.last_index().expect("last"), 5);
}

#[test]
fn snapshot_request_reports_the_applied_state() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=6, 2));
    apply_to(&engine, &mut st, 5);
    assert!(matches!(
        st.snapshot(6, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));
    let snap = st.snapshot(4, 2).expect("snapshot");
    assert_eq!(snap.get_metadata().index, 5);
    assert_eq!(snap.get_metadata().term, 2);
    assert_eq!(snap.get_metadata().get_conf_state().voters, VOTERS.to_vec());
    assert_eq!(st.take_snapshot_requests(), vec![(2, 5, 2)]);
    assert!(st.take_snapshot_requests().is_empty());
}

#[test]
fn groups_do_not_see_each_other() {
    let (_dir, engine) = engine();
    let mut a = open(&engine, GROUP);
    let mut b = open(&engine, GROUP + 1);
    let mut c = open(&engine, GROUP - 1);
    append(&engine, &mut a, &ents(1..=5, 1));
    append(&engine, &mut b, &ents(1..=3, 2));
    append(&engine, &mut c, &ents(1..=2, 3));
    // A snapshot of group A clears only A's log.
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 10;
    snap.mut_metadata().term = 2;
    snap.mut_metadata().set_conf_state(ConfState {
        voters: VOTERS.to_vec(),
        ..Default::default()
    });
    let mut wb = WriteBatch::default();
    a.stage_snapshot(&mut wb, &snap).expect("stage snapshot");
    engine.write(wb, true).expect("write");
    drop(a);
    drop(b);
    drop(c);
    let a = open(&engine, GROUP);
    let b = open(&engine, GROUP + 1);
    let c = open(&engine, GROUP - 1);
    assert_eq!(a.first_index().expect("first"), 11);
    check_log(&b, 1, 3, 0, &|_| 2);
    check_log(&c, 1, 2, 0, &|_| 3);
}

/// The entry cache answers exactly as the log on disk does: every range
/// and size limit, read through a storage whose cache holds the newest
/// entries, equals the read through a reopened one (cache empty), across
/// a cache overflow, a conflicting append and a compaction.
#[test]
fn entry_cache_reads_equal_log_reads() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    let big = |index: u64, term: u64| Entry {
        index,
        term,
        data: vec![index as u8; 1000 + (index % 7) as usize * 20_000].into(),
        ..Default::default()
    };
    let batch = |r: std::ops::RangeInclusive<u64>, term: u64| -> Vec<Entry> {
        r.map(|i| big(i, term)).collect()
    };
    append(&engine, &mut st, &batch(1..=30, 1));
    // Past the cache's byte bound: older entries come from RocksDB.
    append(&engine, &mut st, &batch(31..=60, 2));
    // A conflicting append replaces a cached suffix.
    append(&engine, &mut st, &batch(55..=70, 3));
    apply_to(&engine, &mut st, 20);
    compact(&engine, &mut st, 10);
    let compare = |st: &GroupStorage| {
        let disk = open(&engine, GROUP);
        assert_eq!(st.last_index().ok(), disk.last_index().ok());
        for low in 11..=70u64 {
            for high in [low + 1, low + 3, low + 9, 71] {
                if high > 71 {
                    continue;
                }
                for max in [None, Some(0), Some(30_000), Some(200_000)] {
                    let a = get(st, low, high, max).map(|v| indexes(&v));
                    let b = get(&disk, low, high, max).map(|v| indexes(&v));
                    assert_eq!(
                        format!("{a:?}"),
                        format!("{b:?}"),
                        "entries({low}, {high}, {max:?})"
                    );
                    if let (Ok(x), Ok(y)) = (get(st, low, high, max), get(&disk, low, high, max)) {
                        assert!(x == y, "entries({low}, {high}, {max:?}) differ in content");
                    }
                }
            }
        }
    };
    compare(&st);
    st.clear_cache();
    compare(&st);
}

/// A crash can keep an apply state (flushed without the WAL) whose commit
/// index was lost with the round's raft batch: the storage reopens with
/// the commit index raised to the applied one, and raft-rs starts a node
/// on it (it panics when the applied index is past the commit index).
#[test]
fn apply_state_ahead_of_the_commit_index_raises_it_at_open() {
    let (_dir, engine) = engine();
    let mut st = open(&engine, GROUP);
    append(&engine, &mut st, &ents(1..=10, 2));
    let hs = HardState {
        term: 2,
        vote: 1,
        commit: 3,
        ..Default::default()
    };
    write_hard_state(&engine, &mut st, &hs);
    let mut wb = WriteBatch::default();
    st.stage_apply_state(&mut wb, 8, 2);
    engine.write_apply(wb).expect("write apply state");
    engine.flush_kv().expect("flush");
    drop(st);

    let st = open(&engine, GROUP);
    assert_eq!(st.applied_index(), 8);
    assert_eq!(st.hard_state().commit, 8);
    assert_eq!(st.initial_state().expect("state").hard_state.commit, 8);
    let cfg = raft::Config {
        id: 1,
        applied: st.applied_index(),
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let node = raft::RawNode::new(&cfg, st, &logger).expect("raft starts");
    assert_eq!(node.raft.raft_log.committed, 8);
}
