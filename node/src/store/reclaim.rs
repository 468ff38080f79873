//! Giving back the space of deleted data: replicas destroyed here (moved
//! away, removed, replaced by a newer incarnation) and purged volumes.
//!
//! Deleting a key range writes a range tombstone; the space comes back
//! only when compaction drops the keys under it, and block payloads live
//! in blob files (see `engine`) shared by every group of the node, which
//! RocksDB removes only once nothing refers to any blob in them. So the
//! "kv-reclaim" thread, told of each deleted range after its write:
//! 1. compacts that range, which drops its keys and counts their blobs
//!    as garbage (a blob file holding only them is deleted at once);
//! 2. if that step added at least [`GARBAGE_BYTES_MIN`] of garbage and
//!    the family's blob files now hold more than [`GARBAGE_RATIO_MAX`]
//!    garbage, runs blob garbage collection over every file, not only the
//!    oldest quarter the options name, one group's key range at a time:
//!    the live blobs of partly dead files move to new files and the old
//!    ones go. That rewrites the live blocks once (the price of freeing
//!    the rest now, paid only when a deletion made garbage at least a
//!    quarter of the live bytes; garbage from overwrites alone is left to
//!    RocksDB's own collection).
//!
//! Writes go on meanwhile: the manual compactions are not exclusive, and
//! the wider cutoff is set back between two group ranges, so RocksDB's
//! own compactions run between slices and keep L0 from stalling writers.
//! When more deletions are queued than [`QUEUE_MAX`], the thread compacts
//! every group's range once instead. A stop between a deletion and its
//! reclamation leaves the space to RocksDB's own compactions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use rocksdb::{BottommostLevelCompaction, CompactOptions};

use crate::engine::{Engine, EngineError, BLOB_GC_AGE_CUTOFF};
use crate::keys;

/// Ranges waiting for the thread; past this the thread is behind and
/// compacts every group's range once instead.
const QUEUE_MAX: usize = 64;

/// Blob garbage, as a share of all blob bytes, that triggers step 2.
pub const GARBAGE_RATIO_MAX: f64 = 0.2;

/// Less garbage than this is left to RocksDB's own blob GC.
pub const GARBAGE_BYTES_MIN: u64 = 32 << 20;

enum Job {
    /// A deleted `kv` range `[start, end)`.
    Range(Vec<u8>, Vec<u8>),
}

/// The store's end of the reclaim thread.
pub(super) struct Reclaimer {
    jobs: SyncSender<Job>,
    /// A range was dropped because the queue was full: the thread's next
    /// pass covers every group.
    overflowed: Arc<AtomicBool>,
}

impl Reclaimer {
    /// Tells the thread a `kv` range was deleted (after its write).
    pub(super) fn deleted(&mut self, start: Vec<u8>, end: Vec<u8>) {
        match self.jobs.try_send(Job::Range(start, end)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        queued = QUEUE_MAX,
                        "space reclamation is behind; its next pass covers every group"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                // Space only: the node goes on without it.
                if !self.overflowed.swap(true, Ordering::Relaxed) {
                    tracing::error!("the kv-reclaim thread is gone; deleted data keeps its space");
                }
            }
        }
    }
}

/// Starts the reclaim thread; it ends when the store drops its end.
/// Starts the reclaim thread for a node whose groups are `0..=groups_max`;
/// it ends when the store drops its end.
pub(super) fn spawn(engine: Engine, groups_max: u64) -> Result<Reclaimer, EngineError> {
    let (jobs, rx) = sync_channel::<Job>(QUEUE_MAX);
    let overflowed = Arc::new(AtomicBool::new(false));
    let flag = overflowed.clone();
    std::thread::Builder::new()
        .name("kv-reclaim".into())
        .spawn(move || run(&engine, &rx, &flag, groups_max))?;
    Ok(Reclaimer { jobs, overflowed })
}

fn run(engine: &Engine, rx: &Receiver<Job>, overflowed: &AtomicBool, groups_max: u64) {
    while let Ok(Job::Range(s, e)) = rx.recv() {
        let mut ranges = vec![(s, e)];
        // Whatever else is queued goes in the same pass (bounded by the
        // queue's size).
        while let Ok(Job::Range(s, e)) = rx.try_recv() {
            ranges.push((s, e));
        }
        if overflowed.swap(false, Ordering::Relaxed) {
            ranges = (0..=groups_max).map(keys::group_range).collect();
        }
        if let Err(e) = reclaim(engine, &ranges, groups_max) {
            tracing::warn!(error = %e, "space reclamation failed; retried at the next deletion");
        }
    }
}

/// Blob bytes of the `kv` family and how many of them are garbage.
fn blob_bytes(engine: &Engine) -> Result<(u64, u64), EngineError> {
    let db = engine.db();
    let cf = engine.kv_cf();
    let total = db
        .property_int_value_cf(cf, "rocksdb.live-blob-file-size")?
        .unwrap_or(0);
    let garbage = db
        .property_int_value_cf(cf, "rocksdb.live-blob-file-garbage-size")?
        .unwrap_or(0);
    Ok((total, garbage))
}

/// Whether `garbage` of `total` blob bytes, `added` of it by the
/// deletions just compacted, calls for a collection over every file.
pub fn worth_collecting(total: u64, garbage: u64, added: u64) -> bool {
    added >= GARBAGE_BYTES_MIN && (garbage as f64) >= GARBAGE_RATIO_MAX * (total as f64)
}

fn compact_options() -> CompactOptions {
    let mut o = CompactOptions::default();
    o.set_exclusive_manual_compaction(false);
    o.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
    o
}

/// Sets the blob GC age cutoff of the `kv` family.
fn set_cutoff(engine: &Engine, cutoff: f64) -> Result<(), EngineError> {
    let v = cutoff.to_string();
    engine.db().set_options_cf(
        engine.kv_cf(),
        &[("blob_garbage_collection_age_cutoff", &v)],
    )?;
    Ok(())
}

fn reclaim(
    engine: &Engine,
    ranges: &[(Vec<u8>, Vec<u8>)],
    groups_max: u64,
) -> Result<(), EngineError> {
    let db = engine.db();
    let cf = engine.kv_cf();
    let t0 = Instant::now();
    let (_, garbage_before) = blob_bytes(engine)?;
    for (start, end) in ranges {
        db.compact_range_cf_opt(cf, Some(start), Some(end), &compact_options());
    }
    let (total, garbage) = blob_bytes(engine)?;
    tracing::debug!(
        ranges = ranges.len(),
        ms = t0.elapsed().as_millis() as u64,
        blob_bytes = total,
        garbage_bytes = garbage,
        "deleted ranges compacted"
    );
    if !worth_collecting(total, garbage, garbage.saturating_sub(garbage_before)) {
        return Ok(());
    }
    // One group's range at a time, the usual cutoff back in between, so
    // RocksDB's own compactions are not held up (and do not relocate
    // every blob they touch meanwhile).
    let t1 = Instant::now();
    let mut result = Ok(());
    for g in 0..=groups_max {
        let (start, end) = keys::group_range(g);
        if let Err(e) = set_cutoff(engine, 1.0) {
            result = Err(e);
            break;
        }
        db.compact_range_cf_opt(cf, Some(&start), Some(&end), &compact_options());
        if let Err(e) = set_cutoff(engine, BLOB_GC_AGE_CUTOFF) {
            // Left at 1.0, every compaction would move every blob.
            tracing::error!(error = %e, "cannot set the blob GC cutoff back; retrying");
            std::thread::sleep(std::time::Duration::from_millis(100));
            set_cutoff(engine, BLOB_GC_AGE_CUTOFF)?;
        }
    }
    let (total_after, garbage_after) = blob_bytes(engine)?;
    tracing::info!(
        freed_bytes = total.saturating_sub(total_after),
        blob_bytes = total_after,
        garbage_bytes = garbage_after,
        ms = t1.elapsed().as_millis() as u64,
        "blob space of deleted data reclaimed"
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_or_sparse_garbage_is_left_to_rocksdb() {
        assert!(!worth_collecting(
            1 << 30,
            GARBAGE_BYTES_MIN - 1,
            GARBAGE_BYTES_MIN - 1
        ));
        assert!(!worth_collecting(1 << 40, 1 << 30, 1 << 30));
        assert!(worth_collecting(1 << 30, 256 << 20, 256 << 20));
        assert!(worth_collecting(
            GARBAGE_BYTES_MIN,
            GARBAGE_BYTES_MIN,
            GARBAGE_BYTES_MIN
        ));
        // Garbage overwrites left is not a deletion's to collect.
        assert!(!worth_collecting(1 << 30, 512 << 20, 1 << 20));
    }

    #[test]
    fn a_deleted_range_frees_its_blob_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(dir.path()).expect("open");
        let kv = engine.kv_cf();
        let key = |group: u64, i: u32| {
            let mut k = keys::group_range(group).0;
            k.extend_from_slice(&i.to_be_bytes());
            k
        };
        // Two groups interleaved in every flush, 48 MiB and 16 MiB.
        let value = vec![7u8; 64 << 10];
        for i in 0..1024u32 {
            let mut wb = rocksdb::WriteBatch::default();
            let group = if i % 4 == 3 { 2 } else { 1 };
            wb.put_cf(kv, key(group, i), &value);
            engine.write(wb, false).expect("write");
            if i % 256 == 255 {
                engine.flush_kv().expect("flush");
            }
        }
        let (total, _) = blob_bytes(&engine).expect("props");
        assert!(total >= 60 << 20, "blob bytes {total}");
        let (start, end) = keys::group_range(1);
        let mut wb = rocksdb::WriteBatch::default();
        wb.delete_range_cf(kv, &start, &end);
        engine.write(wb, true).expect("delete");
        reclaim(&engine, &[(start, end)], 2).expect("reclaim");
        let (after, garbage) = blob_bytes(&engine).expect("props");
        assert!(
            after <= 17 << 20 && garbage < GARBAGE_BYTES_MIN,
            "blob bytes {after} (garbage {garbage}) after deleting 48 of 64 MiB"
        );
        assert_eq!(engine.get_kv(&key(2, 3)).expect("get"), Some(value));
    }
}
