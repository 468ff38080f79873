//! A group's most recent log entries in memory (TiKV's `EntryCache`): raft
//! reads entries back to apply them and to send them to followers, and
//! serving those reads from here spares a RocksDB iterator and a decode
//! per read. The cache is contiguous and ends at the log's last index; it
//! holds at most [`ENTRY_CACHE_BYTES_MAX`] (but always the newest entry),
//! and all groups' caches together at most the node's share for them
//! ([`CacheBudget`], from `limits.memory_budget_bytes`): a group that
//! appends while they are over it drops its own oldest entries. Entries
//! share their payload (`Bytes`) with what raft holds.

use std::collections::VecDeque;
use std::sync::Arc;

use protobuf::Message as _;
use raft::prelude::Entry;

use crate::engine::CacheBudget;

/// Bytes of entries a group keeps cached.
pub const ENTRY_CACHE_BYTES_MAX: u64 = 512 << 10;

pub(super) struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: u64,
    budget: Arc<CacheBudget>,
}

impl Drop for EntryCache {
    fn drop(&mut self) {
        self.budget.sub(self.bytes);
    }
}

impl EntryCache {
    pub(super) fn new(budget: Arc<CacheBudget>) -> EntryCache {
        EntryCache {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

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
            let size = u64::from(e.compute_size());
            self.bytes += size;
            self.budget.add(size);
            self.entries.push_back(e.clone());
        }
        while (self.bytes > ENTRY_CACHE_BYTES_MAX || self.budget.over()) && self.entries.len() > 1 {
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
        self.budget.sub(self.bytes);
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
            self.forget(&e);
        }
    }

    fn pop_back(&mut self) {
        if let Some(e) = self.entries.pop_back() {
            self.forget(&e);
        }
    }

    fn forget(&mut self, e: &Entry) {
        let size = u64::from(e.compute_size());
        self.bytes -= size;
        self.budget.sub(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, bytes: usize) -> Entry {
        Entry {
            index,
            term: 1,
            data: vec![0u8; bytes].into(),
            ..Default::default()
        }
    }

    #[test]
    fn caches_together_stay_within_their_budget() {
        let budget = Arc::new(CacheBudget::new(256 << 10));
        let mut a = EntryCache::new(budget.clone());
        let mut b = EntryCache::new(budget.clone());
        for i in 1..=8 {
            a.append(&[entry(i, 32 << 10)]);
        }
        assert!(
            budget.bytes() <= (256 << 10) + (33 << 10),
            "{}",
            budget.bytes()
        );
        // b appends while a holds the whole budget: b keeps its newest
        // entry only, and the total stays bounded by one entry over.
        for i in 1..=8 {
            b.append(&[entry(i, 32 << 10)]);
        }
        assert_eq!(b.get(8, 9, u64::MAX).map(|v| v.len()), Some(1));
        assert!(b.get(7, 9, u64::MAX).is_none());
        assert!(
            budget.bytes() <= (256 << 10) + (33 << 10),
            "{}",
            budget.bytes()
        );
        // a's entries return to the budget when a goes.
        drop(a);
        for i in 9..=12 {
            b.append(&[entry(i, 32 << 10)]);
        }
        assert!(b.get(9, 13, u64::MAX).is_some());
        b.clear();
        assert_eq!(budget.bytes(), 0);
    }

    #[test]
    fn one_group_is_held_to_its_own_bound() {
        let budget = Arc::new(CacheBudget::new(1 << 30));
        let mut a = EntryCache::new(budget.clone());
        for i in 1..=64 {
            a.append(&[entry(i, 32 << 10)]);
        }
        assert!(a.bytes <= ENTRY_CACHE_BYTES_MAX);
        assert_eq!(budget.bytes(), a.bytes);
    }
}
