//! Snapshot staging files and crash-safe snapshot installation.
//!
//! A follower receives a snapshot as a stream of bounded pieces and writes
//! them to a staging file (`data_dir/snap/`), never holding it whole in
//! memory. Installing it: (1) a marker key naming the file is written with
//! fsync; (2) the group's state-machine range is cleared and refilled from
//! the file in bounded batches; (3) one synced batch moves the raft state
//! (log, truncated and apply states) to the snapshot and deletes the marker.
//! A crash between (1) and (3) is finished at the next start from the file,
//! which is removed only after (3).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use protobuf::Message as _;
use raft::prelude::{Snapshot, SnapshotMetadata};
use rocksdb::WriteBatch;

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

    /// Flushes, fsyncs and renames the file to its final name.
    pub fn finish(mut self) -> Result<PathBuf, EngineError> {
        self.out.flush()?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| EngineError::Io(e.into_error()))?;
        file.sync_all()?;
        let done = self.tmp.with_extension("snap");
        std::fs::rename(&self.tmp, &done)?;
        Ok(done)
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

/// Installs `snap` of `storage`'s group from the staging file at `path`.
pub fn install(
    engine: &Engine,
    storage: &mut GroupStorage,
    snap: &Snapshot,
    path: &Path,
) -> Result<(), EngineError> {
    let group = storage.group();
    // Read the whole file once first: a bad one is rejected before the marker and the range clear.
    read_pairs(path, group, |_, _| Ok(()))?;
    let mut wb = WriteBatch::default();
    wb.put_cf(
        engine.raft_cf(),
        keys::snapshot_marker(group),
        marker_value(snap.get_metadata(), path)?,
    );
    engine.write(wb, true)?;
    fill_from_file(engine, group, path)?;
    let mut wb = WriteBatch::default();
    storage.stage_snapshot(&mut wb, snap)?;
    wb.delete_cf(engine.raft_cf(), keys::snapshot_marker(group));
    engine.write(wb, true)?;
    let meta = snap.get_metadata();
    storage.set_applied(meta.index, meta.term);
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn fill_from_file(engine: &Engine, group: u64, path: &Path) -> Result<(), EngineError> {
    let (start, end) = keys::group_range(group);
    let mut wb = WriteBatch::default();
    wb.delete_range_cf(engine.kv_cf(), &start, &end);
    engine.write(wb, false)?;
    let mut wb = WriteBatch::default();
    read_pairs(path, group, |k, v| {
        wb.put_cf(engine.kv_cf(), &k, &v);
        if wb.size_in_bytes() >= INSTALL_BATCH_BYTES {
            engine.write(std::mem::take(&mut wb), false)?;
        }
        Ok(())
    })?;
    engine.write(wb, false)?;
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
    storage.stage_snapshot(&mut wb, &snap)?;
    wb.delete_cf(engine.raft_cf(), keys::snapshot_marker(group));
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
