//! The node's one RocksDB: opening it with its column families sized from
//! the node's memory budget, synced and unsynced writes, and snapshots
//! that outlive the borrow of the DB handle.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Default of `limits.memory_budget_bytes`.
pub const MEMORY_BUDGET_BYTES_DEFAULT: u64 = 2 << 30;

/// How a node's memory budget (`limits.memory_budget_bytes`) is shared.
/// Half goes to the memtables: each family may have two at once (one
/// filling, one being flushed), so the `raft` family's is a quarter of
/// that half and the `kv` family's an eighth (256 and 128 MiB at the
/// default budget; each at most [`MEMTABLE_BYTES_MAX`]:
/// a bigger one only makes the WAL and its replay longer), and a RocksDB
/// write buffer manager counts them together. A quarter goes to the
/// groups' entry caches together (each still at most
/// `ENTRY_CACHE_BYTES_MAX`), an eighth to the block cache (data blocks).
/// The last eighth is left for what has no budget: requests and raft
/// messages in flight, bounded by their own limits, and the SST files'
/// index and filter blocks (kept in memory while a file is open, about
/// 0.05% of the data stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryShares {
    pub memtables_bytes: u64,
    pub raft_memtable_bytes: u64,
    pub kv_memtable_bytes: u64,
    pub entry_caches_bytes: u64,
    pub block_cache_bytes: u64,
}

/// Largest memtable of one family, whatever the budget.
pub const MEMTABLE_BYTES_MAX: u64 = 1 << 30;

impl MemoryShares {
    pub fn of(budget_bytes: u64) -> MemoryShares {
        let memtables_bytes = budget_bytes / 2;
        MemoryShares {
            memtables_bytes,
            raft_memtable_bytes: (memtables_bytes / 4).min(MEMTABLE_BYTES_MAX),
            kv_memtable_bytes: (memtables_bytes / 8).min(MEMTABLE_BYTES_MAX),
            entry_caches_bytes: budget_bytes / 4,
            block_cache_bytes: budget_bytes / 8,
        }
    }
}

/// The bytes the groups' entry caches hold together, and their limit.
#[derive(Debug)]
pub struct CacheBudget {
    bytes_max: u64,
    bytes: AtomicU64,
}

impl CacheBudget {
    pub fn new(bytes_max: u64) -> CacheBudget {
        CacheBudget {
            bytes_max,
            bytes: AtomicU64::new(0),
        }
    }

    pub fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn sub(&self, bytes: u64) {
        let prev = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            })
            .unwrap_or(0);
        debug_assert!(prev >= bytes, "entry cache budget went below zero");
    }

    /// True while the caches together hold more than their share.
    pub fn over(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > self.bytes_max
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

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
    shares: MemoryShares,
    caches: Arc<CacheBudget>,
}

impl Engine {
    /// Opens (creating if needed) the DB under `dir` with the default
    /// memory budget.
    pub fn open(dir: &Path) -> Result<Engine, EngineError> {
        Engine::open_with_budget(dir, MEMORY_BUDGET_BYTES_DEFAULT)
    }

    /// Opens (creating if needed) the DB under `dir`, sized to
    /// `budget_bytes` (see [`MemoryShares`]).
    pub fn open_with_budget(dir: &Path, budget_bytes: u64) -> Result<Engine, EngineError> {
        let shares = MemoryShares::of(budget_bytes);
        std::fs::create_dir_all(dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        opts.set_keep_log_file_num(4);
        let wbm = rocksdb::WriteBufferManager::new_write_buffer_manager(
            shares.memtables_bytes as usize,
            false,
        );
        opts.set_write_buffer_manager(&wbm);
        let block_cache = rocksdb::Cache::new_lru_cache(shares.block_cache_bytes as usize);
        let table = |bloom: bool| {
            let mut t = rocksdb::BlockBasedOptions::default();
            t.set_block_cache(&block_cache);
            if bloom {
                t.set_bloom_filter(10.0, false);
            }
            t
        };
        // Raft entries are short-lived (compacted once applied and flushed,
        // see `store::flush`): a memtable big enough that most die there
        // instead of being flushed and compacted. No compression anywhere:
        // block payloads are mostly incompressible (or encrypted) guest
        // data, and LZ4 on every flush and compaction was CPU for nothing
        // (Ceph's BlueStore and Vitastor do not compress by default).
        let mut raft_opts = Options::default();
        raft_opts.set_write_buffer_size(shares.raft_memtable_bytes as usize);
        raft_opts.set_max_write_buffer_number(2);
        raft_opts.set_compression_type(rocksdb::DBCompressionType::None);
        raft_opts.set_block_based_table_factory(&table(false));
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
        kv_opts.set_write_buffer_size(shares.kv_memtable_bytes as usize);
        kv_opts.set_max_write_buffer_number(2);
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
        kv_opts.set_block_based_table_factory(&table(true));
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RAFT, raft_opts),
            ColumnFamilyDescriptor::new(CF_KV, kv_opts),
        ];
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs)?;
        Ok(Engine {
            db: Arc::new(db),
            shares,
            caches: Arc::new(CacheBudget::new(shares.entry_caches_bytes)),
        })
    }

    /// How this node's memory budget is shared.
    pub fn shares(&self) -> MemoryShares {
        self.shares
    }

    /// What the groups' entry caches hold together.
    pub fn cache_budget(&self) -> Arc<CacheBudget> {
        self.caches.clone()
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
    /// The value of `key` in the `kv` family as of this view.
    pub fn get_kv(&self, engine: &Engine, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.snap.get_cf(engine.kv_cf(), key)?)
    }

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
