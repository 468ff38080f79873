//! raft-rs's `Storage` for one group replica: the reads raft makes of
//! its log and state (entries from the cache or RocksDB, terms from
//! memory, snapshots named for the out-of-band transfer).

use protobuf::Message as _;
use raft::prelude::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::{decode_entry, storage_err, GroupStorage};
use crate::keys;

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        if let Some(out) = self.cache.get(low, high, max_size) {
            return Ok(out);
        }
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        let db = self.engine.db();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::entry(self.group, high));
        let start = keys::entry(self.group, low);
        let iter = db.iterator_cf_opt(
            self.engine.raft_cf(),
            ro,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let mut expect = low;
        for item in iter {
            let (k, v) = item.map_err(storage_err)?;
            let e = decode_entry(&k, &v).map_err(storage_err)?;
            if e.index != expect {
                return Err(storage_err(format!(
                    "group {}: log gap at {expect} (found {})",
                    self.group, e.index
                )));
            }
            expect += 1;
            size += e.compute_size() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e);
        }
        if out.is_empty() || (expect != high && (out.len() as u64) < high - low && size <= max_size)
        {
            return Err(storage_err(format!(
                "group {}: entries [{low}, {high}) missing from the log",
                self.group
            )));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated_index {
            return Ok(self.truncated_term);
        }
        if idx < self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.terms[(idx - self.truncated_index - 1) as usize].0)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if self.applied_index < request_index || self.applied_index == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = self.applied_index;
        meta.term = self.applied_term;
        meta.set_conf_state(self.conf_state.clone());
        // The data travels out of band (streamed from a DB snapshot); the
        // message itself only names the group.
        snap.data = self.group.to_be_bytes().to_vec().into();
        self.snapshot_requests
            .borrow_mut()
            .push((to, self.applied_index, self.applied_term));
        Ok(snap)
    }
}
