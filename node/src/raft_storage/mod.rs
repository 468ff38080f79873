//! One group replica's raft log and raft state on RocksDB: implements
//! raft-rs's `Storage` for reads, and stages appends, hard states and
//! compactions into the ready loop's shared write batch.
//!
//! Log entries are stored as `term (8 bytes BE) ++ protobuf(Entry)` so the
//! term (and size) of every live entry can be kept in memory (`terms`)
//! without parsing, so compaction can also be triggered by log bytes.
//! The apply and conf states live in the `kv` family beside the data they
//! describe (apply skips the WAL, see `store::flush`), the log and hard
//! state in `raft`.
//!
//! The parts: `reads` (raft-rs's `Storage`: the reads raft makes),
//! `entry_cache` (the newest entries in memory, for those reads),
//! `lifecycle` (bootstrap, existence, removal and tombstones).

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::StorageError;
use rocksdb::WriteBatch;

use crate::engine::{Engine, EngineError};
use crate::keys;

mod entry_cache;
mod lifecycle;
mod reads;
pub use entry_cache::ENTRY_CACHE_BYTES_MAX;
pub use lifecycle::{
    bootstrap, is_initialized, own_peer, read_conf_ver, stage_destroy, stage_own_peer, tombstone,
    RAFT_INIT_INDEX, RAFT_INIT_TERM,
};

/// The raft-side state of one group replica.
pub struct GroupStorage {
    group: u64,
    engine: Engine,
    hard_state: HardState,
    conf_state: ConfState,
    truncated_index: u64,
    truncated_term: u64,
    last_index: u64,
    /// Terms of entries `truncated_index + 1 ..= last_index`.
    terms: VecDeque<(u64, u32)>,
    /// Sum of the stored sizes of the live entries.
    log_bytes: u64,
    /// Apply state as persisted (what the `kv` family reflects).
    applied_index: u64,
    applied_term: u64,
    /// Configuration version as of `applied_index` (0: uninitialized).
    conf_ver: u64,
    /// A membership change staged with the current round's apply state:
    /// takes effect in `set_applied`, so a snapshot made meanwhile still
    /// names the configuration of the applied index.
    staged_conf: Option<(ConfState, u64)>,
    /// Applied index a flush of the `kv` family has made durable: the log
    /// is never compacted past it (see `store::flush`).
    durable_applied: u64,
    /// Tells this replica's flush reports from those of an earlier
    /// replica of the same group on this node.
    incarnation: u64,
    /// The newest entries, for raft's reads (see `entry_cache`).
    cache: entry_cache::EntryCache,
    /// Set by `snapshot()`: the peer and index a snapshot was made for; the
    /// store hands the DB view to the transport when the message goes out.
    snapshot_requests: std::cell::RefCell<Vec<(u64, u64, u64)>>,
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, EngineError> {
    if value.len() < 8 {
        return Err(EngineError::Corrupt {
            key: key.to_vec(),
            what: "log entry shorter than its term".into(),
        });
    }
    Entry::parse_from_bytes(&value[8..]).map_err(|e| EngineError::Corrupt {
        key: key.to_vec(),
        what: format!("log entry: {e}"),
    })
}

fn encode_entry(e: &Entry) -> Result<Vec<u8>, EngineError> {
    let body = e.write_to_bytes().map_err(|err| EngineError::Corrupt {
        key: Vec::new(),
        what: format!("cannot encode entry: {err}"),
    })?;
    let mut v = Vec::with_capacity(8 + body.len());
    v.extend_from_slice(&e.term.to_be_bytes());
    v.extend_from_slice(&body);
    Ok(v)
}

/// Source of `GroupStorage::incarnation`.
static NEXT_INCARNATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(crate) fn encode_conf_state(group: u64, cs: &ConfState) -> Result<Vec<u8>, EngineError> {
    cs.write_to_bytes().map_err(|e| EngineError::Corrupt {
        key: keys::conf_state(group),
        what: e.to_string(),
    })
}

impl GroupStorage {
    /// Loads a group's raft state. A group with no configuration here
    /// starts with `voters` as its configuration at index 0 (tests), or,
    /// with no voters, as an uninitialized replica (nothing written) that
    /// a snapshot from its leader will fill.
    pub fn open(engine: Engine, group: u64, voters: &[u64]) -> Result<GroupStorage, EngineError> {
        let mut hard_state = match engine.get_raft(&keys::hard_state(group))? {
            Some(v) => HardState::parse_from_bytes(&v).map_err(|e| EngineError::Corrupt {
                key: keys::hard_state(group),
                what: e.to_string(),
            })?,
            None => HardState::default(),
        };
        let conf_state = match engine.get_kv(&keys::conf_state(group))? {
            Some(v) => ConfState::parse_from_bytes(&v).map_err(|e| EngineError::Corrupt {
                key: keys::conf_state(group),
                what: e.to_string(),
            })?,
            None if voters.is_empty() => ConfState::default(),
            None => {
                let cs = ConfState {
                    voters: voters.to_vec(),
                    ..Default::default()
                };
                let mut wb = WriteBatch::default();
                wb.put_cf(
                    engine.kv_cf(),
                    keys::conf_state(group),
                    encode_conf_state(group, &cs)?,
                );
                engine.write(wb, true)?;
                cs
            }
        };
        let conf_ver = read_conf_ver(&engine, group)?;
        let pair = |key: Vec<u8>, kv: bool| -> Result<(u64, u64), EngineError> {
            let v = if kv {
                engine.get_kv(&key)?
            } else {
                engine.get_raft(&key)?
            };
            match v {
                Some(v) => keys::parse_u64_pair(&v).ok_or(EngineError::Corrupt {
                    key,
                    what: "expected 16 bytes".into(),
                }),
                None => Ok((0, 0)),
            }
        };
        let (truncated_index, truncated_term) = pair(keys::truncated_state(group), false)?;
        let (applied_index, applied_term) = pair(keys::apply_state(group), true)?;
        // Apply skips the WAL and log compaction waits for a flush of what
        // it wrote: a crash loses applied entries, never the log holding
        // them (see `store::flush`).
        if applied_index < truncated_index {
            return Err(EngineError::Corrupt {
                key: keys::apply_state(group),
                what: format!(
                    "group {group}: applied index {applied_index} is below the log's start {truncated_index}: entries were compacted before their apply was durable"
                ),
            });
        }
        let mut terms = VecDeque::new();
        let mut log_bytes = 0u64;
        let mut last_index = truncated_index;
        {
            let db = engine.db();
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_iterate_upper_bound(keys::entry(group, u64::MAX));
            let start = keys::entry(group, truncated_index + 1);
            let iter = db.iterator_cf_opt(
                engine.raft_cf(),
                ro,
                rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
            );
            for item in iter {
                let (k, v) = item?;
                let Some(index) = keys::entry_index(group, &k) else {
                    break;
                };
                if index != last_index + 1 || v.len() < 8 {
                    return Err(EngineError::Corrupt {
                        key: k.to_vec(),
                        what: format!("log gap: expected index {}, found {index}", last_index + 1),
                    });
                }
                let mut t = [0u8; 8];
                t.copy_from_slice(&v[..8]);
                terms.push_back((u64::from_be_bytes(t), v.len() as u32));
                log_bytes += v.len() as u64;
                last_index = index;
            }
        }
        // The apply batch is written before the round's raft batch, which
        // carries the commit index that allowed it, and without the WAL:
        // a flush can make the apply state durable while a crash loses
        // that commit index. Applied entries are committed (and in this
        // log), so the commit index is at least the applied one — TiKV
        // repairs its hard state the same way. raft-rs refuses to start a
        // node whose applied index is past its commit index.
        if applied_index > hard_state.commit {
            if applied_index > last_index {
                return Err(EngineError::Corrupt {
                    key: keys::apply_state(group),
                    what: format!(
                        "group {group}: applied index {applied_index} is past the log's end {last_index}"
                    ),
                });
            }
            hard_state.commit = applied_index;
        }
        let cache = entry_cache::EntryCache::new(engine.cache_budget());
        Ok(GroupStorage {
            group,
            engine,
            hard_state,
            conf_state,
            truncated_index,
            truncated_term,
            last_index,
            terms,
            log_bytes,
            applied_index,
            applied_term,
            conf_ver,
            // What a restart reads back is durable.
            durable_applied: applied_index,
            incarnation: NEXT_INCARNATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            staged_conf: None,
            cache,
            snapshot_requests: std::cell::RefCell::new(Vec::new()),
        })
    }

    /// Configuration version as of the applied index.
    pub fn conf_ver(&self) -> u64 {
        self.conf_ver
    }

    /// Re-reads the configuration version from the state machine (after a
    /// snapshot replaced it).
    pub fn reload_conf_ver(&mut self) -> Result<(), EngineError> {
        self.conf_ver = read_conf_ver(&self.engine, self.group)?;
        Ok(())
    }

    /// Stages a membership change applied at the round's apply index: the
    /// new configuration and version, written with the apply state and in
    /// force from `set_applied`.
    pub fn stage_conf_change(
        &mut self,
        wb: &mut WriteBatch,
        cs: ConfState,
        conf_ver: u64,
    ) -> Result<(), EngineError> {
        wb.put_cf(
            self.engine.kv_cf(),
            keys::conf_state(self.group),
            encode_conf_state(self.group, &cs)?,
        );
        wb.put_cf(
            self.engine.kv_cf(),
            keys::conf_ver(self.group),
            conf_ver.to_be_bytes(),
        );
        self.staged_conf = Some((cs, conf_ver));
        Ok(())
    }

    /// The configuration version including a change staged this round.
    pub fn conf_ver_staged(&self) -> u64 {
        self.staged_conf.as_ref().map_or(self.conf_ver, |(_, v)| *v)
    }

    pub fn group(&self) -> u64 {
        self.group
    }
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }
    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }
    pub fn truncated_index(&self) -> u64 {
        self.truncated_index
    }
    pub fn last_index_now(&self) -> u64 {
        self.last_index
    }
    /// Bytes of log entries currently stored.
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Applied index a flush has made durable.
    pub fn durable_applied(&self) -> u64 {
        self.durable_applied
    }

    /// Records a flush report taken from this incarnation at `applied`.
    pub fn mark_durable(&mut self, incarnation: u64, applied: u64) {
        if incarnation == self.incarnation {
            self.durable_applied = self.durable_applied.max(applied.min(self.applied_index));
        }
    }

    /// The highest index `i ≤ applied` such that the entries after `i` up
    /// to `applied` hold at most `bytes_max` bytes and number at most
    /// `entries_max`: how far to compact while keeping a bounded tail.
    /// (The caller also holds compaction to `durable_applied`.)
    pub fn compact_point(&self, entries_max: u64, bytes_max: u64) -> u64 {
        let applied = self.applied_index.min(self.last_index);
        let mut index = applied;
        let mut bytes = 0u64;
        while index > self.truncated_index && applied - index < entries_max {
            let size = u64::from(self.terms[(index - self.truncated_index - 1) as usize].1);
            if bytes + size > bytes_max {
                break;
            }
            bytes += size;
            index -= 1;
        }
        index
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Snapshot requests recorded since the last call: `(to, index, term)`.
    pub fn take_snapshot_requests(&self) -> Vec<(u64, u64, u64)> {
        std::mem::take(&mut *self.snapshot_requests.borrow_mut())
    }

    /// Stages new log entries (overwriting any conflicting suffix).
    pub fn stage_append(
        &mut self,
        wb: &mut WriteBatch,
        entries: &[Entry],
    ) -> Result<(), EngineError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        assert!(
            first.index > self.truncated_index && first.index <= self.last_index + 1,
            "group {}: append at {} outside ({}, {}]",
            self.group,
            first.index,
            self.truncated_index,
            self.last_index + 1
        );
        let cf = self.engine.raft_cf();
        let mut encoded = Vec::with_capacity(entries.len());
        for e in entries {
            let v = encode_entry(e)?;
            encoded.push((e.term, v.len() as u32));
            wb.put_cf(cf, keys::entry(self.group, e.index), v);
        }
        let new_last = entries[entries.len() - 1].index;
        if new_last < self.last_index {
            wb.delete_range_cf(
                cf,
                keys::entry(self.group, new_last + 1),
                keys::entry(self.group, self.last_index + 1),
            );
        }
        self.cache.append(entries);
        let keep = (first.index - self.truncated_index - 1) as usize;
        for (_, size) in self.terms.drain(keep.min(self.terms.len())..) {
            self.log_bytes -= u64::from(size);
        }
        for (term, size) in encoded {
            self.log_bytes += u64::from(size);
            self.terms.push_back((term, size));
        }
        self.last_index = new_last;
        debug_assert_eq!(
            self.terms.len() as u64,
            self.last_index - self.truncated_index
        );
        Ok(())
    }

    /// Empties the entry cache (e.g. when the group goes idle).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Stages a new hard state.
    pub fn stage_hard_state(
        &mut self,
        wb: &mut WriteBatch,
        hs: &HardState,
    ) -> Result<(), EngineError> {
        let bytes = hs.write_to_bytes().map_err(|e| EngineError::Corrupt {
            key: keys::hard_state(self.group),
            what: e.to_string(),
        })?;
        wb.put_cf(self.engine.raft_cf(), keys::hard_state(self.group), bytes);
        self.hard_state = hs.clone();
        Ok(())
    }

    /// Stages a commit index update (from a light ready).
    pub fn stage_commit(&mut self, wb: &mut WriteBatch, commit: u64) -> Result<(), EngineError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.stage_hard_state(wb, &hs)
    }

    /// Stages the apply state into the apply batch (the `kv` family, with
    /// the data it describes); `set_applied` must follow once written.
    pub fn stage_apply_state(&self, wb: &mut WriteBatch, index: u64, term: u64) {
        wb.put_cf(
            self.engine.kv_cf(),
            keys::apply_state(self.group),
            keys::u64_pair(index, term),
        );
    }

    /// Records that the apply state staged earlier is now written.
    pub fn set_applied(&mut self, index: u64, term: u64) {
        debug_assert!(index >= self.applied_index);
        self.applied_index = index;
        self.applied_term = term;
        if let Some((cs, ver)) = self.staged_conf.take() {
            self.conf_state = cs;
            self.conf_ver = ver;
        }
    }

    /// Stages log compaction up to and including `index` (≤ applied).
    pub fn stage_compact(&mut self, wb: &mut WriteBatch, index: u64) -> Result<(), raft::Error> {
        if index <= self.truncated_index {
            return Ok(());
        }
        assert!(index <= self.applied_index, "compacting unapplied entries");
        assert!(
            index <= self.durable_applied,
            "group {}: compacting to {index} past the durable apply {}",
            self.group,
            self.durable_applied
        );
        assert!(index <= self.last_index, "compacting past the log");
        let term = raft::Storage::term(self, index)?;
        let cf = self.engine.raft_cf();
        wb.delete_range_cf(
            cf,
            keys::entry(self.group, self.truncated_index + 1),
            keys::entry(self.group, index + 1),
        );
        wb.put_cf(
            cf,
            keys::truncated_state(self.group),
            keys::u64_pair(index, term),
        );
        let drop = (index - self.truncated_index) as usize;
        for (_, size) in self.terms.drain(..drop) {
            self.log_bytes -= u64::from(size);
        }
        self.cache.compact_to(index);
        self.truncated_index = index;
        self.truncated_term = term;
        Ok(())
    }

    /// Stages the raft side of installing a snapshot at `(index, term)`:
    /// the whole log goes, the truncated and apply states move to it.
    pub fn stage_snapshot(
        &mut self,
        wb: &mut WriteBatch,
        snap: &Snapshot,
    ) -> Result<(), EngineError> {
        let meta = snap.get_metadata();
        let cf = self.engine.raft_cf();
        wb.delete_range_cf(
            cf,
            keys::entry(self.group, 0),
            keys::entry(self.group, u64::MAX),
        );
        wb.put_cf(
            cf,
            keys::truncated_state(self.group),
            keys::u64_pair(meta.index, meta.term),
        );
        wb.put_cf(
            self.engine.kv_cf(),
            keys::apply_state(self.group),
            keys::u64_pair(meta.index, meta.term),
        );
        let cs = meta.get_conf_state().clone();
        wb.put_cf(
            self.engine.kv_cf(),
            keys::conf_state(self.group),
            encode_conf_state(self.group, &cs)?,
        );
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.stage_hard_state(wb, &hs)?;
        self.conf_state = cs;
        self.truncated_index = meta.index;
        self.truncated_term = meta.term;
        // Synced with this batch, after the data was flushed.
        self.durable_applied = meta.index;
        self.last_index = meta.index;
        self.terms.clear();
        self.log_bytes = 0;
        self.clear_cache();
        Ok(())
    }
}
