//! Snapshot staging files and crash-safe snapshot installation.
//!
//! A follower receives a snapshot as a stream of bounded pieces and writes
//! them to a staging file (`data_dir/snap/`), never holding it whole in
//! memory. Installing it: (1) a marker key naming the file is written with
//! fsync; (2) the group's state-machine range is cleared and refilled from
//! the file in bounded batches, without the WAL, and flushed; (3) one synced batch moves the raft state
//! (log, truncated and apply states) to the snapshot and deletes the marker.
//! A crash between (1) and (3) is finished at the next start from the file,
//! which is removed only after (3). The file is read whole once before (1),
//! so a bad one is rejected with nothing written. The store runs (1) and
//! (2) on its install thread and stages (3) into its ready loop's batch
//! (see `store::install`); [`install`] runs all three in a row.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{Snapshot, SnapshotMetadata};
use rocksdb::{WriteBatch, WriteOptions};

use crate::counters::Counters;
use crate::engine::{Engine, EngineError};
use crate::keys;
use crate::raft_storage::GroupStorage;

const MAGIC: &[u8; 8] = b"RBSNAP1\n";
/// Largest key and value a snapshot file may hold.
pub const KEY_BYTES_MAX: usize = 4096;
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Bytes written per batch while installing.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Longest wait for a memtable flush before writing the next batch anyway.
const FLUSH_WAIT_MAX: Duration = Duration::from_secs(10);

fn corrupt(path: &Path, what: impl Into<String>) -> EngineError {
    EngineError::Corrupt {
        key: path.to_string_lossy().as_bytes().to_vec(),
        what: what.into(),
    }
}

/// Writes a received snapshot to a staging file.
pub struct SnapshotWriter {
    tmp: PathBuf,
    out: BufWriter<File>,
    group: u64,
    count: u64,
}

impl SnapshotWriter {
    pub fn create(
        dir: &Path,
        group: u64,
        index: u64,
        term: u64,
        nonce: u64,
    ) -> Result<Self, EngineError> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("g{group}-i{index}-t{term}-{nonce}.tmp"));
        let mut out = BufWriter::new(File::create(&tmp)?);
        out.write_all(MAGIC)?;
        out.write_all(&group.to_be_bytes())?;
        Ok(SnapshotWriter {
            tmp,
            out,
            group,
            count: 0,
        })
    }

    /// Appends one pair; keys must lie in the group's state-machine range.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        let (start, end) = keys::group_range(self.group);
        if key < start.as_slice() || key >= end.as_slice() || key.len() > KEY_BYTES_MAX {
            return Err(corrupt(&self.tmp, "snapshot key outside the group's range"));
        }
        if value.len() > VALUE_BYTES_MAX {
            return Err(corrupt(&self.tmp, "snapshot value too large"));
        }
        self.out.write_all(&(key.len() as u32).to_le_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(&(value.len() as u32).to_le_bytes())?;
        self.out.write_all(value)?;
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Flushes, fsyncs and renames the file to its final name, and fsyncs
    /// the directory.
    /// (Blocking: fsyncs; call it off the async runtime.) On failure the
    /// staged file is removed.
    pub fn finish(mut self) -> Result<PathBuf, EngineError> {
        let tmp = self.tmp.clone();
        let r = (|| {
            self.out.flush()?;
            let file = self
                .out
                .into_inner()
                .map_err(|e| EngineError::Io(e.into_error()))?;
            file.sync_all()?;
            let done = self.tmp.with_extension("snap");
            std::fs::rename(&self.tmp, &done)?;
            // The rename is durable only once the directory is.
            if let Some(dir) = done.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(done)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(tmp.with_extension("snap"));
        }
        r
    }

    /// Removes the partial file (transfer failed).
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Calls `f` for each pair of a snapshot file of `group`.
fn read_pairs(
    path: &Path,
    group: u64,
    mut f: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), EngineError>,
) -> Result<u64, EngineError> {
    let mut r = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(corrupt(path, "not a snapshot file"));
    }
    let mut g = [0u8; 8];
    r.read_exact(&mut g)?;
    if u64::from_be_bytes(g) != group {
        return Err(corrupt(path, "snapshot file of another group"));
    }
    let (start, end) = keys::group_range(group);
    let mut n = 0u64;
    loop {
        let mut len = [0u8; 4];
        // The end of the file must fall on a record boundary: a file cut
        // inside a length field is truncated, not short.
        if r.fill_buf()?.is_empty() {
            break;
        }
        r.read_exact(&mut len)?;
        let klen = u32::from_le_bytes(len) as usize;
        if klen > KEY_BYTES_MAX {
            return Err(corrupt(path, "key too long"));
        }
        let mut key = vec![0u8; klen];
        r.read_exact(&mut key)?;
        r.read_exact(&mut len)?;
        let vlen = u32::from_le_bytes(len) as usize;
        if vlen > VALUE_BYTES_MAX {
            return Err(corrupt(path, "value too long"));
        }
        let mut value = vec![0u8; vlen];
        r.read_exact(&mut value)?;
        if key < start || key >= end {
            return Err(corrupt(path, "key outside the group's range"));
        }
        f(key, value)?;
        n += 1;
    }
    Ok(n)
}

fn marker_value(meta: &SnapshotMetadata, path: &Path) -> Result<Vec<u8>, EngineError> {
    let m = meta
        .write_to_bytes()
        .map_err(|e| corrupt(path, e.to_string()))?;
    let mut v = Vec::new();
    v.extend_from_slice(&(m.len() as u32).to_le_bytes());
    v.extend_from_slice(&m);
    v.extend_from_slice(path.to_string_lossy().as_bytes());
    Ok(v)
}

/// Installs `snap` of `storage`'s group from the staging file at `path`,
/// all three steps at once (the store runs them apart: steps 1 and 2 on
/// its install thread, step 3 in its ready loop).
pub fn install(
    engine: &Engine,
    storage: &mut GroupStorage,
    snap: &Snapshot,
    path: &Path,
) -> Result<(), EngineError> {
    let group = storage.group();
    validate(path, group)?;
    write_marker(engine, group, snap.get_metadata(), path)?;
    fill_from_file(engine, group, path)?;
    let mut wb = WriteBatch::default();
    stage_finish(engine, storage, &mut wb, snap)?;
    engine.write(wb, true)?;
    let meta = snap.get_metadata();
    storage.set_applied(meta.index, meta.term);
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Reads the whole staged file of `group` once; its pair count. A bad file
/// is rejected by this, before the marker and the range clear.
pub fn validate(path: &Path, group: u64) -> Result<u64, EngineError> {
    read_pairs(path, group, |_, _| Ok(()))
}

/// Step 1: the marker naming the file and the snapshot, written with fsync.
pub fn write_marker(
    engine: &Engine,
    group: u64,
    meta: &SnapshotMetadata,
    path: &Path,
) -> Result<(), EngineError> {
    let mut wb = WriteBatch::default();
    wb.put_cf(
        engine.raft_cf(),
        keys::snapshot_marker(group),
        marker_value(meta, path)?,
    );
    engine.write(wb, true)
}

/// Step 2: clears `group`'s state-machine range and refills it from the
/// file in bounded batches, then flushes the range to its SST files. The
/// batches skip the WAL: the marker makes a crash before the flush refill
/// the range, and the synced writes of the ready loop do not have to sync
/// the whole snapshot (they share the WAL). A batch waits while a full
/// memtable is being flushed, so the refill never fills the next one and
/// stops every writer of the DB (RocksDB's memtable write stall).
pub fn fill_from_file(engine: &Engine, group: u64, path: &Path) -> Result<(), EngineError> {
    let (start, end) = keys::group_range(group);
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    let write = |wb: WriteBatch| engine.db().write_opt(wb, &wo);
    let mut wb = WriteBatch::default();
    wb.delete_range_cf(engine.kv_cf(), &start, &end);
    write(wb)?;
    let mut wb = WriteBatch::default();
    read_pairs(path, group, |k, v| {
        wb.put_cf(engine.kv_cf(), &k, &v);
        if wb.size_in_bytes() >= INSTALL_BATCH_BYTES {
            wait_for_flush(engine);
            write(std::mem::take(&mut wb))?;
        }
        Ok(())
    })?;
    write(wb)?;
    engine.db().flush_cf(engine.kv_cf())?;
    Ok(())
}

/// Waits (bounded) until the `kv` family has no memtable waiting for flush.
fn wait_for_flush(engine: &Engine) {
    let deadline = Instant::now() + FLUSH_WAIT_MAX;
    while Instant::now() < deadline {
        let pending = engine
            .db()
            .property_int_value_cf(engine.kv_cf(), rocksdb::properties::NUM_IMMUTABLE_MEM_TABLE)
            .ok()
            .flatten()
            .unwrap_or(0);
        if pending == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Step 3, staged into `wb` (to be written with fsync): the raft state
/// (log, truncated and apply states) moves to the snapshot and the marker
/// goes. The caller records the apply state (`set_applied`) once written
/// and removes the file.
pub fn stage_finish(
    engine: &Engine,
    storage: &mut GroupStorage,
    wb: &mut WriteBatch,
    snap: &Snapshot,
) -> Result<(), EngineError> {
    storage.stage_snapshot(wb, snap)?;
    wb.delete_cf(engine.raft_cf(), keys::snapshot_marker(storage.group()));
    Ok(())
}

/// Finishes a snapshot install that a crash interrupted, if any.
pub fn resume_interrupted_install(
    engine: &Engine,
    group: u64,
    voters: &[u64],
    counters: &Counters,
) -> Result<(), EngineError> {
    let Some(v) = engine.get_raft(&keys::snapshot_marker(group))? else {
        return Ok(());
    };
    let bad = || EngineError::Corrupt {
        key: keys::snapshot_marker(group),
        what: "malformed snapshot marker".into(),
    };
    if v.len() < 4 {
        return Err(bad());
    }
    let mut l = [0u8; 4];
    l.copy_from_slice(&v[..4]);
    let mlen = u32::from_le_bytes(l) as usize;
    if v.len() < 4 + mlen {
        return Err(bad());
    }
    let meta = SnapshotMetadata::parse_from_bytes(&v[4..4 + mlen]).map_err(|_| bad())?;
    let path = PathBuf::from(String::from_utf8_lossy(&v[4 + mlen..]).into_owned());
    tracing::warn!(group, index = meta.index, path = %path.display(), "finishing an interrupted snapshot install");
    let mut storage = GroupStorage::open(engine.clone(), group, voters)?;
    let mut snap = Snapshot::default();
    snap.set_metadata(meta);
    fill_from_file(engine, group, &path)?;
    let mut wb = WriteBatch::default();
    stage_finish(engine, &mut storage, &mut wb, &snap)?;
    engine.write(wb, true)?;
    let _ = std::fs::remove_file(&path);
    counters.snapshots_applied.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Removes staging files left behind by transfers that never completed.
pub fn sweep_stale(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            // Finished installs removed their files; anything left is from
            // a transfer or install that will never complete.
            if e.path()
                .extension()
                .is_some_and(|x| x == "tmp" || x == "snap")
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
