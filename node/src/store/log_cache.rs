//! The newest Raft log entries, kept in memory as they were appended.
//!
//! openraft reads every entry back from the log store after appending it:
//! the leader once per follower to replicate it and once more to apply it,
//! and a follower once to apply it. Each read from RocksDB builds an
//! iterator over every level of the log column family and decodes the
//! entry again; on a node holding much mail that was a large share of its
//! CPU per append. The cache answers those reads for the newest entries
//! (a contiguous run, bounded in bytes); older ones (a follower far behind,
//! a node just restarted) are read from RocksDB as before.
//!
//! The cache never holds what the log does not: the log store inserts
//! entries only once they are written, and drops them before it truncates
//! or purges them.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::state::types::Entry;

/// A contiguous run of the newest log entries with their encoded sizes.
#[derive(Debug)]
pub struct LogCache {
    /// The entries, consecutive indexes, oldest first.
    entries: VecDeque<(Arc<Entry>, usize)>,
    /// Sum of the sizes in `entries`.
    bytes: usize,
    /// Bytes held at most; the oldest entries go first (but the newest
    /// entry stays, however large). 0 keeps nothing.
    capacity: usize,
}

impl LogCache {
    /// An empty cache holding about `capacity` bytes of encoded entries.
    pub fn new(capacity: usize) -> LogCache {
        LogCache {
            entries: VecDeque::new(),
            bytes: 0,
            capacity,
        }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn next_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index + 1)
    }

    /// Adds entries just written to the log (consecutive, in order), each
    /// with its encoded size. Entries that do not follow the cached run
    /// replace the part of it they overwrite, or all of it after a gap.
    pub fn extend(&mut self, appended: impl IntoIterator<Item = (Entry, usize)>) {
        if self.capacity == 0 {
            return;
        }
        for (entry, size) in appended {
            let index = entry.log_id.index;
            match (self.first_index(), self.next_index()) {
                (_, Some(next)) if index == next => {}
                (Some(first), Some(next)) if index > first && index < next => self.remove_from(index),
                _ => self.clear(),
            }
            self.entries.push_back((Arc::new(entry), size));
            self.bytes += size;
        }
        while self.bytes > self.capacity && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops the entries at `index` and after (the log is truncated there).
    pub fn remove_from(&mut self, index: u64) {
        while self.next_index().is_some_and(|next| next > index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops the entries up to and including `index` (the log is purged).
    pub fn remove_through(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    /// The entries `start..end` if the cache holds all of them (`end`
    /// exclusive; `None` for "to the last"). Only the shared handles are
    /// taken here, so the caller copies the entries without the lock.
    pub fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Arc<Entry>>> {
        let (first, next) = (self.first_index()?, self.next_index()?);
        let end = end.unwrap_or(next).min(next);
        if start < first || start > end {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).map(|(e, _)| e.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    fn entry(term: u64, index: u64) -> (Entry, usize) {
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        };
        (e, 10)
    }

    fn ids(got: Option<Vec<Arc<Entry>>>) -> Option<Vec<(u64, u64)>> {
        got.map(|v| {
            v.iter()
                .map(|e| (e.log_id.leader_id.term, e.log_id.index))
                .collect()
        })
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let mut c = LogCache::new(1000);
        assert_eq!(ids(c.get(1, None)), None);
        c.extend((5..=8).map(|i| entry(1, i)));
        assert_eq!(ids(c.get(5, Some(7))), Some(vec![(1, 5), (1, 6)]));
        assert_eq!(ids(c.get(7, None)), Some(vec![(1, 7), (1, 8)]));
        // Past the end: what there is (openraft asks for ranges it knows exist).
        assert_eq!(ids(c.get(8, Some(20))), Some(vec![(1, 8)]));
        assert_eq!(ids(c.get(9, Some(9))), Some(vec![]));
        // Before the run: the log must answer.
        assert_eq!(ids(c.get(4, Some(6))), None);
        assert_eq!(ids(c.get(10, Some(12))), None);
    }

    #[test]
    fn keeps_the_newest_entries_within_its_capacity() {
        let mut c = LogCache::new(35);
        c.extend((1..=10).map(|i| entry(1, i)));
        assert_eq!(ids(c.get(7, None)).map(|v| v.len()), None);
        assert_eq!(ids(c.get(8, None)), Some(vec![(1, 8), (1, 9), (1, 10)]));
        assert_eq!(c.bytes, 30);
        // A single entry larger than the capacity is still kept.
        c.extend([(entry(1, 11).0, 100)]);
        assert_eq!(ids(c.get(11, None)), Some(vec![(1, 11)]));
        assert_eq!(c.bytes, 100);
        // No capacity, no cache.
        let mut off = LogCache::new(0);
        off.extend((1..=3).map(|i| entry(1, i)));
        assert_eq!(ids(off.get(1, None)), None);
    }

    #[test]
    fn follows_truncation_purge_overwrite_and_gaps() {
        let mut c = LogCache::new(1000);
        c.extend((1..=6).map(|i| entry(1, i)));
        // A new leader's entries overwrite 5 and 6.
        c.remove_from(5);
        assert_eq!(ids(c.get(1, None)).unwrap().len(), 4);
        c.extend([entry(2, 5)]);
        assert_eq!(ids(c.get(4, None)), Some(vec![(1, 4), (2, 5)]));
        // Overwriting without a truncation first drops the old tail too.
        c.extend([entry(3, 3)]);
        assert_eq!(ids(c.get(1, None)), Some(vec![(1, 1), (1, 2), (3, 3)]));
        c.remove_through(2);
        assert_eq!(ids(c.get(1, None)), None);
        assert_eq!(ids(c.get(3, None)), Some(vec![(3, 3)]));
        // After a gap (a snapshot installed), only the new run is kept.
        c.extend([entry(3, 40), entry(3, 41)]);
        assert_eq!(ids(c.get(3, None)), None);
        assert_eq!(ids(c.get(40, None)), Some(vec![(3, 40), (3, 41)]));
        // Appending at the start of the run replaces all of it.
        c.extend([entry(4, 40)]);
        assert_eq!(ids(c.get(40, None)), Some(vec![(4, 40)]));
        assert_eq!(c.bytes, 10);
    }
}
