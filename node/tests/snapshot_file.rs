//! Snapshot staging files: a written file installs into exactly its group's
//! range; truncated, oversized and hostile files are rejected with an error
//! and without touching the group's data; an install interrupted after its
//! marker was written is finished by `resume_interrupted_install`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, Snapshot};
use raft::Storage as _;
use raftblk_node::counters::Counters;
use raftblk_node::engine::Engine;
use raftblk_node::keys;
use raftblk_node::raft_storage::GroupStorage;
use raftblk_node::snapshot_file::{
    install, resume_interrupted_install, sweep_stale, SnapshotWriter, KEY_BYTES_MAX,
    VALUE_BYTES_MAX,
};
use rocksdb::WriteBatch;

// ---------------------------------------------------------------------------
// Largest single allocation made by the current thread: a hostile length
// field must not make the reader allocate what it claims.

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size);
        }
    });
}

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Well above any legitimate buffer of the reader (keys ≤ 4 KiB, values
/// ≤ 1 MiB), far below what a hostile length claims (4 GiB).
const ALLOCATION_LIMIT: usize = 16 << 20;

// ---------------------------------------------------------------------------

const G: u64 = 3;
const VOTERS: [u64; 3] = [1, 2, 3];
/// The snapshot every test installs.
const SNAP_INDEX: u64 = 50;
const SNAP_TERM: u64 = 3;

type Pairs = BTreeMap<Vec<u8>, Vec<u8>>;

struct Fixture {
    dir: tempfile::TempDir,
    engine: Engine,
    storage: GroupStorage,
}

impl Fixture {
    fn db_dir(&self) -> PathBuf {
        self.dir.path().join("node")
    }
    fn snap_dir(&self) -> PathBuf {
        self.dir.path().join("node").join("snap")
    }

    /// Simulates a crash and restart: drops every handle, reopens the DB.
    fn restart(self) -> (tempfile::TempDir, Engine) {
        let Fixture {
            dir,
            engine,
            storage,
        } = self;
        drop(storage);
        drop(engine);
        let engine = Engine::open(&dir.path().join("node")).expect("reopen engine");
        (dir, engine)
    }
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: vec![index as u8; 32].into(),
        ..Default::default()
    }
}

/// An engine with data in groups G-1, G and G+1 (state machine and raft
/// log), with G's log applied up to 5.
fn setup() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(&dir.path().join("node")).expect("open engine");
    let mut wb = WriteBatch::default();
    for g in [G - 1, G, G + 1] {
        for b in 0..8u64 {
            wb.put_cf(
                engine.kv_cf(),
                keys::block(g, 1, b),
                format!("old block {g}/{b}"),
            );
        }
        wb.put_cf(engine.kv_cf(), keys::volume(g, "old"), b"old volume");
        wb.put_cf(engine.kv_cf(), keys::next_volume_id(g), 2u64.to_be_bytes());
    }
    // Keys right at the edges of G's range.
    let (start, end) = keys::group_range(G);
    let mut below = keys::group_range(G - 1).0;
    below.extend_from_slice(&[0xff; 20]);
    wb.put_cf(engine.kv_cf(), &below, b"edge below");
    wb.put_cf(engine.kv_cf(), &end, b"edge above");
    wb.put_cf(engine.kv_cf(), &start, b"first key of G");
    engine.write(wb, true).expect("write fixture");

    let mut neighbour = GroupStorage::open(engine.clone(), G + 1, &VOTERS).expect("open G+1");
    let mut wb = WriteBatch::default();
    neighbour
        .stage_append(&mut wb, &(1..=3).map(|i| entry(i, 1)).collect::<Vec<_>>())
        .expect("append G+1");
    engine.write(wb, true).expect("write G+1 log");

    let mut storage = GroupStorage::open(engine.clone(), G, &VOTERS).expect("open G");
    let mut wb = WriteBatch::default();
    storage
        .stage_append(&mut wb, &(1..=6).map(|i| entry(i, 1)).collect::<Vec<_>>())
        .expect("append G");
    storage.stage_apply_state(&mut wb, 5, 1);
    engine.write(wb, true).expect("write G log");
    storage.set_applied(5, 1);
    Fixture {
        dir,
        engine,
        storage,
    }
}

fn snap_msg(index: u64, term: u64) -> Snapshot {
    let mut snap = Snapshot::default();
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(ConfState {
        voters: vec![1, 2, 4],
        ..Default::default()
    });
    snap
}

fn dump_kv(engine: &Engine, start: &[u8], end: &[u8]) -> Pairs {
    let mut out = Pairs::new();
    engine
        .snapshot()
        .scan_kv(engine, start, end, |k, v| {
            out.insert(k.to_vec(), v.to_vec());
            true
        })
        .expect("scan kv");
    out
}

fn dump_all_kv(engine: &Engine) -> Pairs {
    dump_kv(engine, &[], &[0xff; 32])
}

fn dump_raft(engine: &Engine) -> Pairs {
    let mut out = Pairs::new();
    for item in engine
        .db()
        .iterator_cf(engine.raft_cf(), rocksdb::IteratorMode::Start)
    {
        let (k, v) = item.expect("iterate raft");
        out.insert(k.to_vec(), v.to_vec());
    }
    out
}

fn group_kv(engine: &Engine, group: u64) -> Pairs {
    let (s, e) = keys::group_range(group);
    dump_kv(engine, &s, &e)
}

/// Everything outside group `g`'s state-machine range.
/// The `kv` pairs of every other group: outside `g`'s range, and not
/// `g`'s apply and conf states (kept outside it, see `keys`).
fn outside_group(all: &Pairs, g: u64) -> Pairs {
    let (s, e) = keys::group_range(g);
    let own = [keys::apply_state(g), keys::conf_state(g)];
    all.iter()
        .filter(|(k, _)| k.as_slice() < s.as_slice() || k.as_slice() >= e.as_slice())
        .filter(|(k, _)| !own.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Describes how two dumps differ without printing megabytes.
fn diff(what: &str, before: &Pairs, after: &Pairs) -> Option<String> {
    if before == after {
        return None;
    }
    let removed = before.keys().filter(|k| !after.contains_key(*k)).count();
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let changed = before
        .iter()
        .filter(|(k, v)| after.get(*k).is_some_and(|w| w != *v))
        .count();
    Some(format!(
        "{what} changed: {} keys before, {} after ({removed} removed, {} added{}, {changed} changed)",
        before.len(),
        after.len(),
        added.len(),
        if added.iter().any(|k| **k == keys::snapshot_marker(G)) {
            ", incl. the snapshot marker"
        } else {
            ""
        }
    ))
}

/// The pairs of a snapshot of G: blocks of several sizes (more than one
/// install batch in total), the largest key and value allowed, an empty value.
fn new_pairs(big: bool) -> Pairs {
    let mut p = Pairs::new();
    let sizes: &[usize] = if big {
        &[
            0,
            1,
            4096,
            512 << 10,
            512 << 10,
            512 << 10,
            512 << 10,
            512 << 10,
        ]
    } else {
        &[0, 1, 100, 4096]
    };
    for (i, size) in sizes.iter().enumerate() {
        let mut v = vec![(i * 37) as u8; *size];
        if let Some(x) = v.first_mut() {
            *x = 0xa5;
        }
        p.insert(keys::block(G, 2, i as u64), v);
    }
    if big {
        for i in 0..8u64 {
            p.insert(keys::block(G, 3, i), vec![i as u8 ^ 0x5a; 512 << 10]);
        }
        p.insert(keys::block(G, 4, 0), vec![7u8; VALUE_BYTES_MAX]);
        let long_name = "n".repeat(KEY_BYTES_MAX - keys::volume(G, "").len());
        let long_key = keys::volume(G, &long_name);
        assert_eq!(long_key.len(), KEY_BYTES_MAX);
        p.insert(long_key, b"longest key".to_vec());
    }
    p.insert(keys::volume(G, "new"), b"new volume".to_vec());
    p.insert(keys::next_volume_id(G), 9u64.to_be_bytes().to_vec());
    p
}

fn write_file(dir: &Path, group: u64, pairs: &Pairs) -> PathBuf {
    let mut w = SnapshotWriter::create(dir, group, SNAP_INDEX, SNAP_TERM, 1).expect("create");
    for (k, v) in pairs {
        w.push(k, v).expect("push");
    }
    assert_eq!(w.count(), pairs.len() as u64);
    w.finish().expect("finish")
}

/// The file header (magic and group), taken from a file the writer made.
fn header(dir: &Path, group: u64) -> Vec<u8> {
    let w = SnapshotWriter::create(dir, group, 0, 0, 999).expect("create");
    let path = w.finish().expect("finish");
    let h = std::fs::read(&path).expect("read header file");
    std::fs::remove_file(&path).expect("remove header file");
    h
}

/// One record as the format lays it out.
fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&(key.len() as u32).to_le_bytes());
    r.extend_from_slice(key);
    r.extend_from_slice(&(value.len() as u32).to_le_bytes());
    r.extend_from_slice(value);
    r
}

/// The marker value `install` writes before touching the state machine.
fn marker(snap: &Snapshot, path: &Path) -> Vec<u8> {
    let meta = snap.get_metadata().write_to_bytes().expect("encode meta");
    let mut v = Vec::new();
    v.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    v.extend_from_slice(&meta);
    v.extend_from_slice(path.to_str().expect("utf-8 path").as_bytes());
    v
}

/// Installs `bytes` as a staging file of G into a populated fixture and
/// returns what went wrong: acceptance, a huge allocation, any change to
/// the DB, to G's raft indexes, or a failing restart.
fn rejection_problems(bytes: &[u8]) -> Vec<String> {
    let mut f = setup();
    let mut problems = Vec::new();
    std::fs::create_dir_all(f.snap_dir()).expect("snap dir");
    let path = f
        .snap_dir()
        .join(format!("g{G}-i{SNAP_INDEX}-t{SNAP_TERM}-7.snap"));
    std::fs::write(&path, bytes).expect("write crafted file");
    let kv_before = dump_all_kv(&f.engine);
    let raft_before = dump_raft(&f.engine);
    let indexes = |s: &GroupStorage| {
        (
            s.first_index().expect("first"),
            s.last_index().expect("last"),
            s.applied_index(),
        )
    };
    let idx_before = indexes(&f.storage);

    LARGEST.with(|c| c.set(0));
    let r = install(
        &f.engine,
        &mut f.storage,
        &snap_msg(SNAP_INDEX, SNAP_TERM),
        &path,
    );
    let largest = LARGEST.with(|c| c.get());
    match r {
        Ok(()) => problems.push("install accepted the file".to_string()),
        Err(e) => eprintln!("rejected as expected: {e}"),
    }
    if largest > ALLOCATION_LIMIT {
        problems.push(format!("install allocated {largest} bytes at once"));
    }
    problems.extend(diff("kv family", &kv_before, &dump_all_kv(&f.engine)));
    problems.extend(diff("raft family", &raft_before, &dump_raft(&f.engine)));
    if indexes(&f.storage) != idx_before {
        problems.push(format!(
            "(first, last, applied) moved from {idx_before:?} to {:?}",
            indexes(&f.storage)
        ));
    }

    // The node restarts: it must come up with the old state.
    let (_dir, engine) = f.restart();
    let counters = Counters::default();
    if let Err(e) = resume_interrupted_install(&engine, G, &VOTERS, &counters) {
        problems.push(format!("restart fails: resume_interrupted_install: {e}"));
    }
    problems.extend(diff(
        "kv family after restart",
        &kv_before,
        &dump_all_kv(&engine),
    ));
    match GroupStorage::open(engine.clone(), G, &VOTERS) {
        Ok(s) if indexes(&s) == idx_before => {}
        Ok(s) => problems.push(format!(
            "after restart (first, last, applied) is {:?}, was {idx_before:?}",
            indexes(&s)
        )),
        Err(e) => problems.push(format!("after restart the group does not open: {e}")),
    }
    problems
}

fn assert_rejected(what: &str, bytes: &[u8]) {
    let problems = rejection_problems(bytes);
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

/// A small valid file of G (header and records) and its record boundaries.
fn small_valid_file(dir: &Path) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = header(dir, G);
    let mut boundaries = vec![bytes.len()];
    for (k, v) in new_pairs(false) {
        bytes.extend(record(&k, &v));
        boundaries.push(bytes.len());
    }
    (bytes, boundaries)
}

/// A tiny valid file of G (every cut of it is tried): a value, an 8-byte
/// value and an empty value.
fn tiny_valid_file(dir: &Path) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = header(dir, G);
    let mut boundaries = vec![bytes.len()];
    for (k, v) in [
        (keys::block(G, 2, 0), b"hello".to_vec()),
        (keys::next_volume_id(G), 8u64.to_be_bytes().to_vec()),
        (keys::volume(G, "e"), Vec::new()),
    ] {
        bytes.extend(record(&k, &v));
        boundaries.push(bytes.len());
    }
    (bytes, boundaries)
}

// ---------------------------------------------------------------------------

#[test]
fn writer_produces_the_documented_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pairs = new_pairs(false);
    let path = write_file(dir.path(), G, &pairs);
    assert_eq!(path.extension().and_then(|e| e.to_str()), Some("snap"));
    let (crafted, _) = small_valid_file(dir.path());
    assert_eq!(
        std::fs::read(&path).expect("read"),
        crafted,
        "the crafted files of the other tests follow the writer's layout"
    );
    let h = header(dir.path(), G);
    assert_eq!(h.len(), 16);
    assert_eq!(&h[8..], &G.to_be_bytes());
}

#[test]
fn writer_rejects_keys_outside_the_group_and_oversized_pairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = SnapshotWriter::create(dir.path(), G, 1, 1, 5).expect("create");
    let (start, end) = keys::group_range(G);
    assert!(w.push(&keys::block(G + 1, 0, 0), b"x").is_err());
    assert!(w.push(&keys::block(G - 1, 0, 0), b"x").is_err());
    assert!(w.push(&end, b"x").is_err());
    assert!(w.push(b"", b"x").is_err());
    assert!(w.push(&start[..7], b"x").is_err());
    let mut long = start.clone();
    long.resize(KEY_BYTES_MAX + 1, b'k');
    assert!(w.push(&long, b"x").is_err());
    assert!(w
        .push(&keys::block(G, 0, 0), &vec![0; VALUE_BYTES_MAX + 1])
        .is_err());
    assert_eq!(w.count(), 0);
    w.push(&start, b"first").expect("the range's first key");
    assert_eq!(w.count(), 1);
    w.abandon();
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("read dir").count(),
        0,
        "abandon removes the partial file"
    );
}

#[test]
fn install_round_trips_and_touches_only_its_group() {
    let mut f = setup();
    let pairs = new_pairs(true);
    let path = write_file(&f.snap_dir(), G, &pairs);
    let all_before = dump_all_kv(&f.engine);
    let neighbour_raft_before: Pairs = dump_raft(&f.engine)
        .into_iter()
        .filter(|(k, _)| !k.starts_with(&G.to_be_bytes()))
        .collect();

    let snap = snap_msg(SNAP_INDEX, SNAP_TERM);
    install(&f.engine, &mut f.storage, &snap, &path).expect("install");

    let got = group_kv(&f.engine, G);
    assert_eq!(got.len(), pairs.len(), "G's range holds exactly the file");
    assert!(got == pairs, "G's range equals the file's pairs");
    let all_after = dump_all_kv(&f.engine);
    assert!(
        outside_group(&all_after, G) == outside_group(&all_before, G),
        "{:?}",
        diff(
            "keys outside G",
            &outside_group(&all_before, G),
            &outside_group(&all_after, G)
        )
    );
    let neighbour_raft_after: Pairs = dump_raft(&f.engine)
        .into_iter()
        .filter(|(k, _)| !k.starts_with(&G.to_be_bytes()))
        .collect();
    assert!(
        neighbour_raft_after == neighbour_raft_before,
        "other groups' raft state"
    );

    let check = |s: &GroupStorage| {
        assert_eq!(s.first_index().expect("first"), SNAP_INDEX + 1);
        assert_eq!(s.last_index().expect("last"), SNAP_INDEX);
        assert_eq!(s.term(SNAP_INDEX).expect("term"), SNAP_TERM);
        assert_eq!(
            (s.applied_index(), s.applied_term()),
            (SNAP_INDEX, SNAP_TERM)
        );
        let rs = s.initial_state().expect("state");
        assert_eq!(rs.conf_state.voters, vec![1, 2, 4]);
        assert!(rs.hard_state.commit >= SNAP_INDEX);
    };
    check(&f.storage);
    assert!(f
        .engine
        .get_raft(&keys::snapshot_marker(G))
        .expect("read")
        .is_none());
    assert!(!path.exists(), "the staging file is removed after install");

    let (_dir, engine) = f.restart();
    let counters = Counters::default();
    resume_interrupted_install(&engine, G, &VOTERS, &counters).expect("nothing to resume");
    assert_eq!(
        counters
            .snapshots_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    check(&GroupStorage::open(engine.clone(), G, &VOTERS).expect("reopen"));
    assert!(group_kv(&engine, G) == pairs);
}

#[test]
fn empty_file_is_rejected() {
    assert_rejected("empty file", b"");
}

#[test]
fn file_cut_in_its_header_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = header(dir.path(), G);
    for cut in [1, 7, 8, 12, 15] {
        assert_rejected(&format!("header cut at {cut}"), &h[..cut]);
    }
}

#[test]
fn wrong_magic_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut bytes, _) = small_valid_file(dir.path());
    bytes[0] ^= 0x20;
    assert_rejected("wrong magic", &bytes);
    let (mut bytes, _) = small_valid_file(dir.path());
    bytes[7] = b'2';
    assert_rejected("other format version", &bytes);
}

#[test]
fn file_of_another_group_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A well-formed file of G+1 (its own keys) offered to G.
    let mut pairs = Pairs::new();
    pairs.insert(keys::block(G + 1, 1, 1), b"theirs".to_vec());
    let path = write_file(dir.path(), G + 1, &pairs);
    let bytes = std::fs::read(&path).expect("read");
    assert_rejected("file of group G+1", &bytes);
    // G's records under G+1's header.
    let (mut bytes, _) = small_valid_file(dir.path());
    bytes[8..16].copy_from_slice(&(G + 1).to_be_bytes());
    assert_rejected("G's records under another group's header", &bytes);
}

#[test]
fn key_outside_the_group_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (valid, _) = small_valid_file(dir.path());
    let (_, end) = keys::group_range(G);
    let mut below = keys::group_range(G - 1).0;
    below.push(0xff);
    for (what, key) in [
        ("key of G+1", keys::block(G + 1, 1, 1)),
        ("key of G-1", keys::block(G - 1, 1, 1)),
        ("first key after G's range", end),
        ("key just below G's range", below),
        ("empty key", Vec::new()),
        (
            "key shorter than the group prefix",
            G.to_be_bytes()[..4].to_vec(),
        ),
    ] {
        // After valid records (a partial install must not stay behind).
        let mut bytes = valid.clone();
        bytes.extend(record(&key, b"intruder"));
        assert_rejected(what, &bytes);
    }
}

#[test]
fn allocation_tracker_sees_large_allocations() {
    LARGEST.with(|c| c.set(0));
    let v = std::hint::black_box(vec![1u8; 2 * ALLOCATION_LIMIT]);
    assert!(LARGEST.with(|c| c.get()) >= v.len());
}

#[test]
fn oversized_and_hostile_lengths_are_rejected_without_allocating_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (valid, _) = small_valid_file(dir.path());
    let key = keys::block(G, 9, 9);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "key length 0xFFFF_FFFF",
            0xFFFF_FFFFu32.to_le_bytes().to_vec(),
        ),
        (
            "key length 0x8000_0000",
            0x8000_0000u32.to_le_bytes().to_vec(),
        ),
        (
            "key length KEY_BYTES_MAX + 1 with the bytes present",
            record(&vec![G as u8; KEY_BYTES_MAX + 1], b"v"),
        ),
        ("value length 0xFFFF_FFFF", {
            let mut r = (key.len() as u32).to_le_bytes().to_vec();
            r.extend_from_slice(&key);
            r.extend_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
            r.extend_from_slice(b"short");
            r
        }),
        (
            "value length VALUE_BYTES_MAX + 1 with the bytes present",
            record(&key, &vec![1u8; VALUE_BYTES_MAX + 1]),
        ),
    ];
    for (what, tail) in cases {
        let mut bytes = valid.clone();
        bytes.extend(tail);
        assert_rejected(what, &bytes);
    }
}

#[test]
fn truncated_files_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (valid, boundaries) = tiny_valid_file(dir.path());
    // Every cut inside a record (in a length field, key or value). A cut
    // exactly at a record boundary is indistinguishable from a shorter
    // file in this format and is not covered here.
    let field = |cut: usize| -> String {
        let (n, start) = boundaries
            .iter()
            .enumerate()
            .rev()
            .find(|(_, b)| **b < cut)
            .map(|(n, b)| (n + 1, *b))
            .expect("cut after the header");
        let mut l = [0u8; 4];
        l.copy_from_slice(&valid[start..start + 4]);
        let klen = u32::from_le_bytes(l) as usize;
        let name = match cut - start {
            0..=3 => "key length",
            o if o < 4 + klen => "key",
            o if o < 8 + klen => "value length",
            _ => "value",
        };
        format!("record {n}, cut in its {name}")
    };
    // (where, first problem) -> cut positions.
    let mut failures: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    let mut tried = 0;
    for cut in boundaries[0] + 1..valid.len() {
        if boundaries.contains(&cut) {
            continue;
        }
        tried += 1;
        let p = rejection_problems(&valid[..cut]);
        if let Some(first) = p.first() {
            let first = first.split(':').next().unwrap_or(first).to_string();
            failures.entry((field(cut), first)).or_default().push(cut);
        }
    }
    let report: Vec<String> = failures
        .iter()
        .map(|((at, what), cuts)| format!("{at} (file cut at bytes {cuts:?}): {what}"))
        .collect();
    assert!(
        report.is_empty(),
        "{} of {tried} truncations not cleanly rejected (file of {} bytes, records at {:?}):\n  {}",
        failures.values().map(Vec::len).sum::<usize>(),
        valid.len(),
        &boundaries[..boundaries.len() - 1],
        report.join("\n  ")
    );
}

#[test]
fn resume_without_marker_does_nothing() {
    let f = setup();
    let kv_before = dump_all_kv(&f.engine);
    let raft_before = dump_raft(&f.engine);
    let counters = Counters::default();
    resume_interrupted_install(&f.engine, G, &VOTERS, &counters).expect("resume");
    assert!(dump_all_kv(&f.engine) == kv_before);
    assert!(dump_raft(&f.engine) == raft_before);
    assert_eq!(
        counters
            .snapshots_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// The state `install` leaves when the node dies after its first step
/// (marker synced) and part of the second (range cleared, some pairs in).
fn interrupted_install(f: &Fixture, pairs: &Pairs) -> (Snapshot, PathBuf) {
    let path = write_file(&f.snap_dir(), G, pairs);
    let snap = snap_msg(SNAP_INDEX, SNAP_TERM);
    let mut wb = WriteBatch::default();
    wb.put_cf(
        f.engine.raft_cf(),
        keys::snapshot_marker(G),
        marker(&snap, &path),
    );
    f.engine.write(wb, true).expect("write marker");
    let (start, end) = keys::group_range(G);
    let mut wb = WriteBatch::default();
    wb.delete_range_cf(f.engine.kv_cf(), &start, &end);
    for (k, v) in pairs.iter().take(pairs.len() / 2) {
        wb.put_cf(f.engine.kv_cf(), k, v);
    }
    // A key from the old state written back by nothing: must not survive.
    wb.put_cf(f.engine.kv_cf(), keys::volume(G, "stale"), b"stale");
    f.engine.write(wb, true).expect("partial fill");
    (snap, path)
}

#[test]
fn interrupted_install_is_finished_at_restart() {
    let f = setup();
    let pairs = new_pairs(true);
    let outside_before = outside_group(&dump_all_kv(&f.engine), G);
    let (_snap, path) = interrupted_install(&f, &pairs);
    assert!(path.exists());
    let db_dir = f.db_dir();
    let (_dir, engine) = f.restart();
    assert!(db_dir.exists());

    let counters = Counters::default();
    resume_interrupted_install(&engine, G, &VOTERS, &counters).expect("resume");

    assert!(group_kv(&engine, G) == pairs, "G's range equals the file");
    assert!(
        outside_group(&dump_all_kv(&engine), G) == outside_before,
        "other groups untouched"
    );
    assert!(
        engine
            .get_raft(&keys::snapshot_marker(G))
            .expect("read")
            .is_none(),
        "marker removed"
    );
    assert!(!path.exists(), "staging file removed");
    assert_eq!(
        counters
            .snapshots_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let s = GroupStorage::open(engine.clone(), G, &VOTERS).expect("open after resume");
    assert_eq!(s.first_index().expect("first"), SNAP_INDEX + 1);
    assert_eq!(s.last_index().expect("last"), SNAP_INDEX);
    assert_eq!(s.term(SNAP_INDEX).expect("term"), SNAP_TERM);
    assert_eq!(
        (s.applied_index(), s.applied_term()),
        (SNAP_INDEX, SNAP_TERM)
    );
    let rs = s.initial_state().expect("state");
    assert_eq!(rs.conf_state.voters, vec![1, 2, 4]);
    assert!(rs.hard_state.commit >= SNAP_INDEX);
    assert!(rs.hard_state.term >= SNAP_TERM);
    for i in 1..=6 {
        assert!(
            engine.get_raft(&keys::entry(G, i)).expect("read").is_none(),
            "old log entry {i} removed"
        );
    }

    // A second start finds nothing left to do.
    resume_interrupted_install(&engine, G, &VOTERS, &counters).expect("second resume");
    assert_eq!(
        counters
            .snapshots_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(group_kv(&engine, G) == pairs);
}

#[test]
fn marker_and_file_survive_restarts_until_resumed() {
    // Until a resume completes, every start finds the marker and the file
    // (a resume cut short leaves the same kind of partial state).
    let f = setup();
    let pairs = new_pairs(false);
    let (_snap, path) = interrupted_install(&f, &pairs);
    let (dir, engine) = f.restart();
    drop(engine);
    let engine = Engine::open(&dir.path().join("node")).expect("second restart");
    assert!(engine
        .get_raft(&keys::snapshot_marker(G))
        .expect("read")
        .is_some());
    assert!(path.exists());
    let counters = Counters::default();
    resume_interrupted_install(&engine, G, &VOTERS, &counters).expect("resume");
    assert!(group_kv(&engine, G) == pairs);
    let s = GroupStorage::open(engine.clone(), G, &VOTERS).expect("open");
    assert_eq!(s.last_index().expect("last"), SNAP_INDEX);
}

#[test]
fn resume_with_a_damaged_file_fails_and_keeps_the_marker() {
    let f = setup();
    let pairs = new_pairs(false);
    let (_snap, path) = interrupted_install(&f, &pairs);
    // The staging file lost its tail (cut inside the last value).
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("truncate");
    let (_dir, engine) = f.restart();
    let counters = Counters::default();
    assert!(
        resume_interrupted_install(&engine, G, &VOTERS, &counters).is_err(),
        "a damaged staging file must not be installed"
    );
    assert!(
        engine
            .get_raft(&keys::snapshot_marker(G))
            .expect("read")
            .is_some(),
        "the marker stays so the group is not started on half a state machine"
    );
    assert_eq!(
        counters
            .snapshots_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let s = GroupStorage::open(engine.clone(), G, &VOTERS).expect("open");
    assert_eq!(
        s.applied_index(),
        5,
        "the raft state did not move to the snapshot"
    );
}

#[test]
fn resume_with_a_malformed_marker_fails() {
    let f = setup();
    for bad in [
        vec![],
        vec![1, 0],
        // Claims a 1000-byte metadata that is not there.
        1000u32.to_le_bytes().to_vec(),
        // Metadata that does not parse.
        {
            let mut v = 3u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xff, 0xff, 0xff]);
            v
        },
    ] {
        let mut wb = WriteBatch::default();
        wb.put_cf(f.engine.raft_cf(), keys::snapshot_marker(G), &bad);
        f.engine.write(wb, true).expect("write marker");
        let counters = Counters::default();
        assert!(
            resume_interrupted_install(&f.engine, G, &VOTERS, &counters).is_err(),
            "malformed marker {bad:?} accepted"
        );
    }
}

#[test]
fn sweep_removes_only_staging_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let partial = SnapshotWriter::create(dir.path(), G, 1, 1, 1).expect("create");
    drop(partial);
    let done = write_file(dir.path(), G, &new_pairs(false));
    let other = dir.path().join("keep.txt");
    std::fs::write(&other, b"x").expect("write");
    sweep_stale(dir.path());
    assert!(!done.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("keep.txt")]);
    sweep_stale(&dir.path().join("missing"));
}
