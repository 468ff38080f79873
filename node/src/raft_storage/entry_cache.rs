//! A group's most recent log entries in memory (TiKV's `EntryCache`): raft
//! reads entries back to apply them and to send them to followers, and
//! serving those reads from here spares a RocksDB iterator and a decode
//! per read. The cache is contiguous and ends at the log's last index; it
//! holds at most [`ENTRY_CACHE_BYTES_MAX`] (but always the newest entry).
//! Entries share their payload (`Bytes`) with what raft holds.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::prelude::Entry;

/// Bytes of entries a group keeps cached.
pub const ENTRY_CACHE_BYTES_MAX: u64 = 512 << 10;

#[derive(Default)]
pub(super) struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: u64,
}

impl EntryCache {
    /// Records entries just appended to the log (replacing any cached
    /// suffix from `entries[0].index` on).
    pub(super) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        while self.entries.back().is_some_and(|e| e.index >= first.index) {
            self.pop_back();
        }
        if self
            .entries
            .back()
            .is_some_and(|e| e.index + 1 != first.index)
        {
            self.clear();
        }
        for e in entries {
            self.bytes += u64::from(e.compute_size());
            self.entries.push_back(e.clone());
        }
        while self.bytes > ENTRY_CACHE_BYTES_MAX && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    /// Drops the entries up to and including `index` (compacted).
    pub(super) fn compact_to(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            self.pop_front();
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries `[low, high)`, limited to `max_size` bytes (at least one) as
    /// raft-rs's `limit_size` does; None unless the cache holds all of
    /// them (`high` must not pass the log's end).
    pub(super) fn get(&self, low: u64, high: u64, max_size: u64) -> Option<Vec<Entry>> {
        let first = self.entries.front()?.index;
        let last = self.entries.back()?.index;
        if low < first || high > last + 1 || low >= high {
            return None;
        }
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for e in self
            .entries
            .range((low - first) as usize..(high - first) as usize)
        {
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= u64::from(e.compute_size());
        }
    }

    fn pop_back(&mut self) {
        if let Some(e) = self.entries.pop_back() {
            self.bytes -= u64::from(e.compute_size());
        }
    }
}
