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
//! 2. if the family's blob files then hold more than
//!    [`GARBAGE_RATIO_MAX`] garbage (and at least [`GARBAGE_BYTES_MIN`]),
//!    compacts the whole family with blob garbage collection of every
//!    file, not only the oldest quarter the options name: the live blobs
//!    of partly dead files move to new files and the old ones go. That
//!    rewrites the live blocks once (the price of freeing the rest now,
//!    paid only when garbage is at least a quarter of the live bytes).
//!
//! It also checks once at startup (a stop between a destroy and its
//! reclamation). Writes go on meanwhile: the manual compaction is not
//! exclusive, so RocksDB's own compactions keep L0 from stalling writers.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use rocksdb::{BottommostLevelCompaction, CompactOptions};

use crate::engine::{Engine, EngineError, BLOB_GC_AGE_CUTOFF};

/// Ranges waiting for the thread; past this the thread is behind and one
/// compaction of the whole family (step 2 alone) covers what was dropped.
const QUEUE_MAX: usize = 64;

/// Blob garbage, as a share of all blob bytes, that triggers step 2.
pub const GARBAGE_RATIO_MAX: f64 = 0.2;

/// Less garbage than this is left to RocksDB's own blob GC.
pub const GARBAGE_BYTES_MIN: u64 = 32 << 20;

/// Delay of the startup check (the store opens its groups meanwhile).
const STARTUP_CHECK_AFTER: Duration = Duration::from_secs(10);

enum Job {
    /// A deleted `kv` range `[start, end)`.
    Range(Vec<u8>, Vec<u8>),
}

/// The store's end of the reclaim thread.
pub(super) struct Reclaimer {
    jobs: SyncSender<Job>,
    /// A range was dropped because the queue was full.
    overflowed: bool,
}

impl Reclaimer {
    /// Tells the thread a `kv` range was deleted (after its write).
    pub(super) fn deleted(&mut self, start: Vec<u8>, end: Vec<u8>) {
        match self.jobs.try_send(Job::Range(start, end)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if !self.overflowed {
                    tracing::warn!(
                        queued = QUEUE_MAX,
                        "space reclamation is behind; the next whole-family pass covers the rest"
                    );
                }
                self.overflowed = true;
            }
            Err(TrySendError::Disconnected(_)) => {
                super::fatal("reclaim space", "the kv-reclaim thread is gone")
            }
        }
    }
}

/// Starts the reclaim thread; it ends when the store drops its end.
pub(super) fn spawn(engine: Engine) -> Result<Reclaimer, EngineError> {
    let (jobs, rx) = sync_channel::<Job>(QUEUE_MAX);
    std::thread::Builder::new()
        .name("kv-reclaim".into())
        .spawn(move || run(&engine, &rx))?;
    Ok(Reclaimer {
        jobs,
        overflowed: false,
    })
}

fn run(engine: &Engine, rx: &Receiver<Job>) {
    let started = Instant::now();
    let mut checked_at_start = false;
    loop {
        let wait = if checked_at_start {
            Duration::from_secs(3600)
        } else {
            STARTUP_CHECK_AFTER.saturating_sub(started.elapsed())
        };
        let mut ranges = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(Job::Range(s, e)) => ranges.push((s, e)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Whatever else is queued goes in the same pass (bounded by the
        // queue's size).
        while let Ok(Job::Range(s, e)) = rx.try_recv() {
            ranges.push((s, e));
        }
        if !ranges.is_empty() || !checked_at_start {
            checked_at_start = true;
            if let Err(e) = reclaim(engine, &ranges) {
                tracing::warn!(error = %e, "space reclamation failed; retried at the next deletion");
            }
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

/// Whether `garbage` of `total` blob bytes calls for a whole-family pass.
pub fn worth_collecting(total: u64, garbage: u64) -> bool {
    garbage >= GARBAGE_BYTES_MIN && (garbage as f64) >= GARBAGE_RATIO_MAX * (total as f64)
}

fn compact_options() -> CompactOptions {
    let mut o = CompactOptions::default();
    o.set_exclusive_manual_compaction(false);
    o.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
    o
}

fn reclaim(engine: &Engine, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<(), EngineError> {
    let db = engine.db();
    let cf = engine.kv_cf();
    let t0 = Instant::now();
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
    if !worth_collecting(total, garbage) {
        return Ok(());
    }
    let t1 = Instant::now();
    let cutoff_all = "1.0".to_string();
    db.set_options_cf(cf, &[("blob_garbage_collection_age_cutoff", &cutoff_all)])?;
    db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &compact_options());
    let restored = BLOB_GC_AGE_CUTOFF.to_string();
    db.set_options_cf(cf, &[("blob_garbage_collection_age_cutoff", &restored)])?;
    let (total_after, garbage_after) = blob_bytes(engine)?;
    tracing::info!(
        freed_bytes = total.saturating_sub(total_after),
        blob_bytes = total_after,
        garbage_bytes = garbage_after,
        ms = t1.elapsed().as_millis() as u64,
        "blob space of deleted data reclaimed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_or_sparse_garbage_is_left_to_rocksdb() {
        assert!(!worth_collecting(1 << 30, GARBAGE_BYTES_MIN - 1));
        assert!(!worth_collecting(1 << 40, 1 << 30));
        assert!(worth_collecting(1 << 30, 256 << 20));
        assert!(worth_collecting(GARBAGE_BYTES_MIN, GARBAGE_BYTES_MIN));
    }

    #[test]
    fn a_deleted_range_frees_its_blob_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(dir.path()).expect("open");
        let kv = engine.kv_cf();
        // Two "groups" interleaved in every flush, 48 MiB and 16 MiB.
        let value = vec![7u8; 64 << 10];
        for i in 0..1024u32 {
            let mut wb = rocksdb::WriteBatch::default();
            let prefix = if i % 4 == 3 { b'b' } else { b'a' };
            let mut key = vec![prefix];
            key.extend_from_slice(&i.to_be_bytes());
            wb.put_cf(kv, &key, &value);
            engine.write(wb, false).expect("write");
            if i % 256 == 255 {
                engine.flush_kv().expect("flush");
            }
        }
        let (total, _) = blob_bytes(&engine).expect("props");
        assert!(total >= 60 << 20, "blob bytes {total}");
        let mut wb = rocksdb::WriteBatch::default();
        wb.delete_range_cf(kv, b"a".as_slice(), b"b".as_slice());
        engine.write(wb, true).expect("delete");
        reclaim(&engine, &[(b"a".to_vec(), b"b".to_vec())]).expect("reclaim");
        let (after, garbage) = blob_bytes(&engine).expect("props");
        assert!(
            after <= 17 << 20 && garbage < GARBAGE_BYTES_MIN,
            "blob bytes {after} (garbage {garbage}) after deleting 48 of 64 MiB"
        );
        let mut key = vec![b'b'];
        key.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(engine.get_kv(&key).expect("get"), Some(value));
    }
}
