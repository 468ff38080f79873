//! The node's one RocksDB: opening it with its column families, synced and
//! unsynced writes, and snapshots that outlive the borrow of the DB handle.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::keys::{CF_KV, CF_RAFT};

/// Storage-layer failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record under key {key:02x?}: {what}")]
    Corrupt { key: Vec<u8>, what: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Size of the `raft` family's memtable.
pub const RAFT_MEMTABLE_BYTES: u64 = 256 << 20;

/// Values of the `kv` family at least this big (block payloads) are kept
/// in blob files; smaller ones (catalog, map, apply states) in the tree.
const BLOB_SIZE_MIN_BYTES: u64 = 1024;

/// Share of the oldest blob files whose live blobs compaction moves (blob
/// garbage collection); `store::reclaim` raises it to all of them for one
/// pass when deleted data left much garbage.
pub const BLOB_GC_AGE_CUTOFF: f64 = 0.25;

/// Shared handle to the node's RocksDB.
#[derive(Clone)]
pub struct Engine {
    db: Arc<DB>,
}

impl Engine {
    /// Opens (creating if needed) the DB under `dir`.
    pub fn open(dir: &Path) -> Result<Engine, EngineError> {
        std::fs::create_dir_all(dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        opts.set_keep_log_file_num(4);
        // Raft entries are short-lived (compacted once applied and flushed,
        // see `store::flush`): a memtable big enough that most die there
        // instead of being flushed and compacted. No compression anywhere:
        // block payloads are mostly incompressible (or encrypted) guest
        // data, and LZ4 on every flush and compaction was CPU for nothing
        // (Ceph's BlueStore and Vitastor do not compress by default).
        let mut raft_opts = Options::default();
        raft_opts.set_write_buffer_size(RAFT_MEMTABLE_BYTES as usize);
        raft_opts.set_compression_type(rocksdb::DBCompressionType::None);
        // Block writes land all over the key space (every group's range),
        // so each L0 file overlaps the whole level below and a compaction
        // of random overwrites rewrote every block stored (a 4 KiB write
        // cost its 700 MiB share of rewrites after a 1 GiB fill). So block
        // payloads live in blob files (RocksDB's BlobDB, written once, at
        // flush, like a memtable's SST): the LSM tree holds only keys and
        // blob references and compacts cheaply; blob garbage collection
        // moves the live blocks of the oldest quarter of blob files when
        // compaction passes them, and forces that once half of them is
        // dead. Fewer, bigger memtable flushes and a larger L0 before
        // compaction keep the remaining rewrite down (the bloom filters
        // below keep the extra L0 files off the read path).
        let mut kv_opts = Options::default();
        kv_opts.set_write_buffer_size(128 << 20);
        kv_opts.set_level_zero_file_num_compaction_trigger(8);
        kv_opts.set_max_bytes_for_level_base(1 << 30);
        kv_opts.set_target_file_size_base(64 << 20);
        kv_opts.set_compression_type(rocksdb::DBCompressionType::None);
        kv_opts.set_enable_blob_files(true);
        kv_opts.set_min_blob_size(BLOB_SIZE_MIN_BYTES);
        kv_opts.set_blob_file_size(256 << 20);
        kv_opts.set_blob_compression_type(rocksdb::DBCompressionType::None);
        kv_opts.set_enable_blob_gc(true);
        kv_opts.set_blob_gc_age_cutoff(BLOB_GC_AGE_CUTOFF);
        kv_opts.set_blob_gc_force_threshold(0.5);
        // Reads are point lookups (multi-get of blocks): a bloom filter per
        // file lets a lookup skip the files that do not hold the block.
        let mut kv_table = rocksdb::BlockBasedOptions::default();
        kv_table.set_bloom_filter(10.0, false);
        kv_opts.set_block_based_table_factory(&kv_table);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RAFT, raft_opts),
            ColumnFamilyDescriptor::new(CF_KV, kv_opts),
        ];
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs)?;
        Ok(Engine { db: Arc::new(db) })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    /// Column family handle; both families are created at open.
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} is created at open"))
    }

    pub fn raft_cf(&self) -> &ColumnFamily {
        self.cf(CF_RAFT)
    }

    pub fn kv_cf(&self) -> &ColumnFamily {
        self.cf(CF_KV)
    }

    /// Writes a batch; `sync` fsyncs the WAL before returning.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        #[cfg(feature = "failpoints")]
        if sync {
            fail::fail_point!("engine_sync_write", |_| Err(EngineError::Io(
                std::io::Error::other("injected fsync failure (failpoint engine_sync_write)")
            )));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Writes an apply batch (state-machine changes and apply states, the
    /// `kv` family only) without the WAL: the raft log already holds what
    /// it derives from durably, and log compaction waits until a flush of
    /// the family made it durable (see `store::flush`).
    pub fn write_apply(&self, batch: WriteBatch) -> Result<(), EngineError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Flushes the `kv` family's memtables to SST files and waits: every
    /// apply written before the call is durable after it.
    pub fn flush_kv(&self) -> Result<(), EngineError> {
        self.db.flush_cf(self.kv_cf())?;
        Ok(())
    }

    /// Bytes in the `raft` family's active memtable (0 if unknown).
    pub fn raft_memtable_bytes(&self) -> u64 {
        self.db
            .property_int_value_cf(
                self.raft_cf(),
                rocksdb::properties::CUR_SIZE_ACTIVE_MEM_TABLE,
            )
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    pub fn get_raft(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.db.get_cf(self.raft_cf(), key)?)
    }

    pub fn get_kv(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.db.get_cf(self.kv_cf(), key)?)
    }

    /// Several `kv` keys in one call, in order.
    pub fn multi_get_kv(&self, keys: &[Vec<u8>]) -> Vec<Result<Option<Vec<u8>>, EngineError>> {
        let cf = self.kv_cf();
        self.db
            .multi_get_cf(keys.iter().map(|k| (cf, k.as_slice())))
            .into_iter()
            .map(|r| r.map_err(EngineError::from))
            .collect()
    }

    /// A point-in-time view of the whole DB that can be sent to another
    /// thread and kept as long as needed.
    pub fn snapshot(&self) -> OwnedSnapshot {
        let snap = self.db.snapshot();
        // SAFETY: `snap` borrows the DB behind `self.db`. The returned value
        // owns a clone of that `Arc`, so the DB lives (and, being on the
        // heap, stays put) for as long as the snapshot; field order makes
        // `snap` drop before `_db`.
        let snap: rocksdb::SnapshotWithThreadMode<'static, DB> =
            unsafe { std::mem::transmute(snap) };
        OwnedSnapshot {
            snap,
            _db: self.db.clone(),
        }
    }
}

/// A RocksDB snapshot bundled with the DB it reads from.
pub struct OwnedSnapshot {
    // Declared first: dropped before `_db`.
    snap: rocksdb::SnapshotWithThreadMode<'static, DB>,
    _db: Arc<DB>,
}

impl OwnedSnapshot {
    /// Calls `f` with every `(key, value)` of the `kv` family in
    /// `[start, end)`, in key order; stops early when `f` returns false.
    pub fn scan_kv(
        &self,
        engine: &Engine,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let iter = self.snap.iterator_cf_opt(
            engine.kv_cf(),
            ro,
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }
}
