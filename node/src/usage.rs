//! What each volume stores in the groups this node leads, for `raftblk
//! volume list` and `volume info` (like `rbd du`): its blocks, counted per
//! volume from the keys of each group's block range, and the blocks kept
//! for its snapshots.
//!
//! Block payloads live in blob files, and RocksDB's ordinary iterator
//! reads every value it steps over, so a count through it would read every
//! byte a volume stores. [`KeyScan`] sets `allow_unprepared_value` through
//! the C API (the Rust binding has no setter): stepping over a block then
//! reads its key from the SST files and never its blob. Kept snapshot
//! blocks are counted with their values, because an empty value there
//! marks a block that was absent at the snapshot and holds no data; they
//! are the old contents of blocks overwritten since a snapshot, few next
//! to the live ones.
//!
//! Bounded: the service runs one count at a time per node and gives it a
//! time budget; a group not finished within it is left out of the answer
//! (the client then says the figure is incomplete).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::time::Instant;

use librocksdb_sys as ffi;
use rocksdb::{AsColumnFamilyRef, AsRawPtr};

use crate::engine::{Engine, EngineError};
use crate::keys;

/// Keys a scan steps over between two looks at its deadline (kept
/// snapshot blocks are read whole: a few dozen reads at most between
/// looks).
const DEADLINE_CHECK_KEYS: u64 = 64;

/// Blocks stored and blocks kept for snapshots, per volume id.
pub type VolumeCounts = BTreeMap<u64, (u64, u64)>;

/// A forward iterator over the `kv` family that leaves blob values
/// unread; it borrows the engine whose DB it reads.
struct KeyScan<'a> {
    // Destroyed in this order (see `drop`): the iterator keeps a pointer
    // to the upper bound slice stored inside the read options, and that
    // slice points into `_upper_bound`.
    iter: *mut ffi::rocksdb_iterator_t,
    opts: *mut ffi::rocksdb_readoptions_t,
    _upper_bound: Vec<u8>,
    _engine: PhantomData<&'a Engine>,
}

impl<'a> KeyScan<'a> {
    /// Positions at the first key of `[start, end)`.
    fn new(engine: &'a Engine, start: &[u8], end: &[u8]) -> KeyScan<'a> {
        let upper_bound = end.to_vec();
        // SAFETY: the read options are created here and destroyed in
        // `drop`, after the iterator. `rocksdb_create_iterator_cf` copies
        // the options' fields, but the copied `iterate_upper_bound` still
        // points at the slice inside `opts`, which points into
        // `upper_bound`'s heap buffer: that buffer does not move when the
        // Vec moves into the struct, and both outlive the iterator. The DB
        // and column family pointers come from `engine`, which the scan
        // borrows for its whole life ('a). `start` is only read by the
        // seek, during this call.
        unsafe {
            let opts = ffi::rocksdb_readoptions_create();
            ffi::rocksdb_readoptions_set_allow_unprepared_value(opts, 1);
            // A full scan must not evict the blocks reads keep cached.
            ffi::rocksdb_readoptions_set_fill_cache(opts, 0);
            ffi::rocksdb_readoptions_set_iterate_upper_bound(
                opts,
                upper_bound.as_ptr().cast(),
                upper_bound.len(),
            );
            let db: *mut ffi::rocksdb_t = engine.db().as_raw_ptr();
            let iter = ffi::rocksdb_create_iterator_cf(db, opts, engine.kv_cf().inner());
            ffi::rocksdb_iter_seek(iter, start.as_ptr().cast(), start.len());
            KeyScan {
                iter,
                opts,
                _upper_bound: upper_bound,
                _engine: PhantomData,
            }
        }
    }

    /// The key under the iterator, or `None` past the end (or on an error:
    /// see [`KeyScan::status`]).
    fn key(&self) -> Option<&[u8]> {
        // SAFETY: `iter` is a live iterator; the key slice it returns is
        // valid until the next move, which needs `&mut self` while the
        // returned borrow holds `&self`.
        unsafe {
            if ffi::rocksdb_iter_valid(self.iter) == 0 {
                return None;
            }
            let mut len: usize = 0;
            let ptr = ffi::rocksdb_iter_key(self.iter, &mut len);
            if ptr.is_null() {
                return None;
            }
            Some(std::slice::from_raw_parts(ptr.cast::<u8>(), len))
        }
    }

    fn next(&mut self) {
        // SAFETY: `iter` is live and valid (callers step only after `key`
        // returned a key).
        unsafe { ffi::rocksdb_iter_next(self.iter) }
    }

    /// The error that ended the scan early, if one did.
    fn status(&self) -> Result<(), EngineError> {
        let mut err: *mut libc::c_char = std::ptr::null_mut();
        // SAFETY: `iter` is live; RocksDB stores a malloc'd C string in
        // `err` on error, which is read and then freed with `rocksdb_free`.
        unsafe {
            ffi::rocksdb_iter_get_error(self.iter, &mut err);
            if err.is_null() {
                return Ok(());
            }
            let msg = CStr::from_ptr(err).to_string_lossy().into_owned();
            ffi::rocksdb_free(err.cast());
            Err(EngineError::Io(std::io::Error::other(format!(
                "rocksdb key scan: {msg}"
            ))))
        }
    }
}

impl Drop for KeyScan<'_> {
    fn drop(&mut self) {
        // SAFETY: both were created in `new` and are destroyed once, the
        // iterator (which refers to the options) first.
        unsafe {
            ffi::rocksdb_iter_destroy(self.iter);
            ffi::rocksdb_readoptions_destroy(self.opts);
        }
    }
}

/// Adds `group`'s stored and kept blocks of `volumes` (every volume when
/// empty) to `out`. Blocks of the volumes in `whiteouts` (sorted) are
/// counted with their values read, leaving whiteouts (empty values) out;
/// the others from their keys alone. Returns false, leaving `out` partly
/// filled, when `deadline` passed first.
pub fn count_group(
    engine: &Engine,
    group: u64,
    volumes: &[u64],
    whiteouts: &[u64],
    deadline: Instant,
    out: &mut VolumeCounts,
) -> Result<bool, EngineError> {
    let key_ranges: Vec<(Vec<u8>, Vec<u8>)> = if volumes.is_empty() {
        vec![(keys::block(group, 0, 0), keys::blocks_end(group))]
    } else {
        volumes
            .iter()
            .filter(|v| whiteouts.binary_search(v).is_err())
            .map(|&v| {
                (
                    keys::volume_blocks_start(group, v),
                    keys::volume_blocks_end(group, v),
                )
            })
            .collect()
    };
    let mut seen = 0u64;
    let mut tick = || {
        seen += 1;
        seen.is_multiple_of(DEADLINE_CHECK_KEYS) && Instant::now() >= deadline
    };
    for (start, end) in &key_ranges {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        let mut scan = KeyScan::new(engine, start, end);
        while let Some(k) = scan.key() {
            if let Some((volume, _)) = keys::parse_block(group, k) {
                if whiteouts.binary_search(&volume).is_err() {
                    out.entry(volume).or_default().0 += 1;
                }
            }
            if tick() {
                return Ok(false);
            }
            scan.next();
        }
        scan.status()?;
    }
    // Values read: the blocks of volumes that may hold whiteouts, and the
    // kept snapshot blocks (an empty kept value marks a block absent at
    // the snapshot, a kept whiteout one that read as zeros: neither holds
    // data).
    let mut value_ranges: Vec<(Vec<u8>, Vec<u8>)> = whiteouts
        .iter()
        .filter(|v| volumes.is_empty() || volumes.binary_search(v).is_ok())
        .map(|&v| {
            (
                keys::volume_blocks_start(group, v),
                keys::volume_blocks_end(group, v),
            )
        })
        .collect();
    if volumes.is_empty() {
        value_ranges.push((
            keys::snap_block(group, 0, 0, 0),
            keys::snap_volume_end(group, u64::MAX),
        ));
    } else {
        value_ranges.extend(volumes.iter().map(|&v| {
            (
                keys::snap_block(group, v, 0, 0),
                keys::snap_volume_end(group, v),
            )
        }));
    }
    for (start, end) in value_ranges {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        ro.set_iterate_upper_bound(end);
        let iter = engine.db().iterator_cf_opt(
            engine.kv_cf(),
            ro,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if let Some((volume, _)) = keys::parse_block(group, &k) {
                if !v.is_empty() {
                    out.entry(volume).or_default().0 += 1;
                }
            } else if let Some((volume, _, _)) = keys::parse_snap_block(group, &k) {
                if !v.is_empty() && &*v != crate::cow::KEPT_WHITEOUT {
                    out.entry(volume).or_default().1 += 1;
                }
            }
            if tick() {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block;
    use raftblk_proto::BLOCK_BYTES;
    use rocksdb::WriteBatch;
    use std::time::Duration;

    fn engine(dir: &std::path::Path) -> Engine {
        Engine::open(dir).expect("open engine")
    }

    #[test]
    fn counts_blocks_and_kept_blocks_per_volume_in_memtable_and_blob_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(dir.path());
        let data = block::encode(&[7u8; BLOCK_BYTES as usize]);
        let mut wb = WriteBatch::default();
        for b in 0..10 {
            wb.put_cf(e.kv_cf(), keys::block(3, 1, b), &data);
        }
        for b in 0..4 {
            wb.put_cf(e.kv_cf(), keys::block(3, 2, b), &data);
        }
        // Another group's blocks and catalog keys are not counted.
        wb.put_cf(e.kv_cf(), keys::block(4, 1, 0), &data);
        wb.put_cf(e.kv_cf(), keys::volume(3, "v"), b"x");
        // Two kept blocks of volume 1 and one absent-at-snapshot marker.
        wb.put_cf(e.kv_cf(), keys::snap_block(3, 1, 0, 1), &data);
        wb.put_cf(e.kv_cf(), keys::snap_block(3, 1, 1, 1), &data);
        wb.put_cf(e.kv_cf(), keys::snap_block(3, 1, 2, 1), b"");
        e.write(wb, true).expect("write");
        let far = Instant::now() + Duration::from_secs(60);
        for flushed in [false, true] {
            if flushed {
                // Into SST and blob files: the key scan must not need the
                // values there either.
                e.db().flush_cf(e.kv_cf()).expect("flush");
            }
            let mut all = VolumeCounts::new();
            assert!(count_group(&e, 3, &[], &[], far, &mut all).expect("count"));
            assert_eq!(all.get(&1), Some(&(10, 2)), "flushed={flushed}");
            assert_eq!(all.get(&2), Some(&(4, 0)), "flushed={flushed}");
            assert_eq!(all.len(), 2);
            let mut one = VolumeCounts::new();
            assert!(count_group(&e, 3, &[2], &[], far, &mut one).expect("count"));
            assert_eq!(one.into_iter().collect::<Vec<_>>(), vec![(2, (4, 0))]);
        }
        let mut none = VolumeCounts::new();
        assert!(count_group(&e, 5, &[], &[], far, &mut none).expect("count"));
        assert!(none.is_empty());
    }

    #[test]
    fn the_block_count_reads_no_blob() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(dir.path());
        let data = block::encode(&[1u8; BLOCK_BYTES as usize]);
        let mut wb = WriteBatch::default();
        for b in 0..64 {
            wb.put_cf(e.kv_cf(), keys::block(2, 5, b), &data);
        }
        e.write(wb, true).expect("write");
        e.db().flush_cf(e.kv_cf()).expect("flush");
        // Take the blob files away: a read of any block's value now fails,
        // the count must not.
        let mut removed = 0;
        for f in std::fs::read_dir(dir.path().join("db")).expect("db dir") {
            let path = f.expect("entry").path();
            if path.extension().is_some_and(|x| x == "blob") {
                std::fs::remove_file(&path).expect("remove blob file");
                removed += 1;
            }
        }
        assert!(removed > 0, "the blocks went to blob files");
        assert!(e.db().get_cf(e.kv_cf(), keys::block(2, 5, 0)).is_err());
        let mut out = VolumeCounts::new();
        let far = Instant::now() + Duration::from_secs(60);
        assert!(count_group(&e, 2, &[], &[], far, &mut out).expect("count"));
        assert_eq!(out.get(&5), Some(&(64, 0)));
    }

    #[test]
    fn whiteouts_and_kept_whiteouts_hold_no_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(dir.path());
        let data = block::encode(&[3u8; BLOCK_BYTES as usize]);
        let mut wb = WriteBatch::default();
        // Volume 6 (a clone): two blocks and one whiteout; a kept block
        // and a kept whiteout.
        wb.put_cf(e.kv_cf(), keys::block(1, 6, 0), &data);
        wb.put_cf(e.kv_cf(), keys::block(1, 6, 1), &data);
        wb.put_cf(e.kv_cf(), keys::block(1, 6, 2), block::WHITEOUT);
        wb.put_cf(e.kv_cf(), keys::snap_block(1, 6, 0, 1), &data);
        wb.put_cf(
            e.kv_cf(),
            keys::snap_block(1, 6, 2, 1),
            crate::cow::KEPT_WHITEOUT,
        );
        // Volume 7: not a clone.
        wb.put_cf(e.kv_cf(), keys::block(1, 7, 0), &data);
        e.write(wb, true).expect("write");
        e.db().flush_cf(e.kv_cf()).expect("flush");
        let far = Instant::now() + Duration::from_secs(60);
        for volumes in [&[][..], &[6, 7][..]] {
            let mut out = VolumeCounts::new();
            assert!(count_group(&e, 1, volumes, &[6], far, &mut out).expect("count"));
            assert_eq!(out.get(&6), Some(&(2, 1)), "volumes {volumes:?}");
            assert_eq!(out.get(&7), Some(&(1, 0)), "volumes {volumes:?}");
        }
    }

    #[test]
    fn a_deadline_stops_a_count_part_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(dir.path());
        let total = 400_000u64;
        for part in 0..4 {
            let mut wb = WriteBatch::default();
            for b in part * total / 4..(part + 1) * total / 4 {
                wb.put_cf(e.kv_cf(), keys::block(1, 9, b), b"small");
            }
            e.write(wb, true).expect("write");
        }
        // Past before the first range: nothing counted.
        let mut out = VolumeCounts::new();
        assert!(!count_group(&e, 1, &[], &[], Instant::now(), &mut out).expect("count"));
        assert!(out.is_empty());
        // Passing during the scan: stopped part way, by the checks
        // between keys.
        let mut out = VolumeCounts::new();
        let soon = Instant::now() + Duration::from_millis(3);
        let finished = count_group(&e, 1, &[], &[], soon, &mut out).expect("count");
        let counted = out.get(&9).map_or(0, |c| c.0);
        assert!(!finished, "{total} keys counted within 3 ms");
        assert!(counted < total, "{counted}");
    }
}
