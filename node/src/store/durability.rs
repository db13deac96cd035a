//! The leader's appends that are written but not yet fsynced.
//!
//! openraft 0.9.25's core waits for the leader's own log flush before it
//! sends an entry to the followers (`RaftCore::append_to_log` awaits the
//! `LogFlushed` callback), so with the flush reported after the fsync every
//! commit costs two fsyncs in a row: the leader's, then a follower's. The log
//! store therefore reports an append it makes *as leader* flushed as soon as
//! it is written, and syncs it while the entry travels to the followers
//! (`LogStore::with_leader_pipelining`, with `raft.pipeline_leader_fsync`,
//! the default). openraft then counts the leader's
//! copy towards the commit before it is on disk, so its commit index on the
//! leader can run ahead of what a quorum holds on disk. Three rules keep
//! "visible or acknowledged ⇒ fsynced on a quorum":
//!
//! 1. The state machine applies an entry only after the leader's own copy of
//!    it is synced ([`Durability::wait_synced_through`]). Clients are answered
//!    and reads served from applied state, so no write is acknowledged or
//!    seen before the leader's fsync plus the quorum-minus-one follower
//!    fsyncs openraft waited for.
//! 2. AppendEntries never tells a follower a commit index beyond the
//!    leader's synced log ([`Durability::commit_limit`]), so a follower
//!    applies — and reports as committed — only entries a quorum has on disk.
//!    An index held back this way is sent again by a heartbeat once it is
//!    synced ([`Durability::held_back`]).
//! 3. A follower's appends are reported flushed only after their fsync, as
//!    before: its acknowledgement is what openraft counts.
//!
//! If the leader loses power before its fsync, the entry may be lost with it,
//! but then no node applied it, no node learned that it was committed, and
//! no client was answered: a new leader may keep or drop it, as for any
//! entry that was never committed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::state::types::LogId;

/// Shared by the log store (which records and clears pending appends), the
/// state machine (rule 1) and the peer network (rule 2).
#[derive(Debug)]
pub struct Durability {
    inner: Mutex<Inner>,
    /// Bumped whenever a pending append is synced or a sync fails.
    changed: watch::Sender<u64>,
    /// The highest commit index held back from a follower so far.
    held_back: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Appends reported flushed before their fsync, oldest first (the WAL
    /// syncer completes them in this order).
    pending: VecDeque<Pending>,
    /// A sync failed: nothing pending will ever be durable.
    failed: bool,
    /// Appends recorded so far.
    pushed: u64,
    /// How long the syncer waits before syncing pipelined appends, while
    /// a file exists (only in the `slow-leader-sync` test mode).
    sync_delay: Option<(Duration, std::path::PathBuf)>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Index of the append's first entry.
    first: u64,
    /// The log id of the entry before it (`None`: the log was empty).
    before: Option<LogId>,
}

impl Inner {
    /// The pending append with the lowest first index (after a truncation
    /// a later append can start lower than an earlier one).
    fn lowest(&self) -> Option<Pending> {
        self.pending.iter().copied().min_by_key(|p| p.first)
    }
}

impl Default for Durability {
    fn default() -> Self {
        Durability {
            inner: Mutex::default(),
            changed: watch::Sender::new(0),
            held_back: watch::Sender::new(0),
        }
    }
}

/// The leader's log could not be synced; the entries it held back will never
/// be durable.
fn sync_failed() -> std::io::Error {
    std::io::Error::other("a WAL sync failed: the leader's newest entries are not durable")
}

impl Durability {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("durability lock")
    }

    /// Records an append that is reported flushed before its fsync: entries
    /// from `first` on, following the entry `before`. Call before reporting it.
    pub(crate) fn push(&self, first: u64, before: Option<LogId>) {
        let mut inner = self.lock();
        inner.pending.push_back(Pending { first, before });
        inner.pushed += 1;
        metrics::counter!("mailvault_pipelined_appends_total").increment(1);
    }

    #[cfg(feature = "test-modes")]
    pub(super) fn set_sync_delay(&self, delay: Duration, while_exists: std::path::PathBuf) {
        self.lock().sync_delay = Some((delay, while_exists));
    }

    /// How long the next sync of pipelined appends is to wait first.
    pub(super) fn sync_delay(&self) -> Duration {
        match &self.lock().sync_delay {
            Some((delay, path)) if path.exists() => *delay,
            _ => Duration::ZERO,
        }
    }

    /// How many appends were reported flushed before their sync so far.
    pub fn pipelined_appends(&self) -> u64 {
        self.lock().pushed
    }

    /// The oldest pending append is now on disk.
    pub(crate) fn synced_one(&self) {
        self.lock().pending.pop_front();
        self.changed.send_modify(|v| *v += 1);
    }

    /// Failed WAL syncs since the node started (0 or 1: the syncer stops at
    /// the first, and Raft with it).
    pub fn sync_failures(&self) -> u64 {
        u64::from(self.lock().failed)
    }

    /// A sync failed: pending appends stay pending for good.
    pub(super) fn sync_failed(&self) {
        self.lock().failed = true;
        self.changed.send_modify(|v| *v += 1);
    }

    /// Whether every entry up to `index` is on disk here (as far as this
    /// node's own leader appends go; others are synced before openraft
    /// learns of them). `Err` once a sync has failed with entries pending.
    pub(crate) fn synced_through(&self, index: u64) -> Result<bool, std::io::Error> {
        let inner = self.lock();
        match inner.lowest() {
            None => Ok(true),
            Some(p) if p.first > index => Ok(true),
            Some(_) if inner.failed => Err(sync_failed()),
            Some(_) => Ok(false),
        }
    }

    /// Waits until every entry up to `index` is on disk here (rule 1).
    pub async fn wait_synced_through(&self, index: u64) -> Result<(), std::io::Error> {
        // Nearly always already so (and always, with pipelining off).
        if self.synced_through(index)? {
            return Ok(());
        }
        let mut rx = self.changed.subscribe();
        while !self.synced_through(index)? {
            // The sender lives as long as `self`.
            let _ = rx.changed().await;
        }
        Ok(())
    }

    /// Like [`Self::wait_synced_through`], for at most `limit`; whether it is.
    pub async fn wait_synced_through_for(&self, index: u64, limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, self.wait_synced_through(index)).await,
            Ok(Ok(()))
        )
    }

    /// The commit index that may be told to a follower: `commit`, or the
    /// newest log id before the leader's first unsynced entry if that is
    /// lower (rule 2). Both are log ids of this leader's log.
    pub fn commit_limit(&self, commit: Option<LogId>) -> Option<LogId> {
        let inner = self.lock();
        match (commit, inner.lowest()) {
            (Some(c), Some(p)) if c.index >= p.first => p.before,
            _ => commit,
        }
    }

    /// Records that a commit index up to `index` was held back from a
    /// follower, so it is sent again once synced.
    pub fn note_held_back(&self, index: u64) {
        self.held_back.send_if_modified(|v| {
            let newer = index > *v;
            *v = (*v).max(index);
            newer
        });
    }

    /// Changes whenever a higher commit index is held back from a follower.
    pub fn held_back(&self) -> watch::Receiver<u64> {
        self.held_back.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(term: u64, index: u64) -> LogId {
        openraft::LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    #[tokio::test]
    async fn nothing_pending_holds_nothing_back() {
        let d = Durability::default();
        assert!(d.synced_through(100).unwrap());
        assert_eq!(d.commit_limit(Some(id(1, 9))), Some(id(1, 9)));
        assert_eq!(d.commit_limit(None), None);
        d.wait_synced_through(100).await.unwrap();
    }

    #[tokio::test]
    async fn a_pending_append_holds_back_applies_and_commits_from_its_first_entry() {
        let d = Durability::default();
        d.push(5, Some(id(1, 4)));
        d.push(6, Some(id(1, 5)));
        // Entries before the first unsynced one are not held back.
        assert!(d.synced_through(4).unwrap());
        assert!(!d.synced_through(5).unwrap());
        assert_eq!(d.commit_limit(Some(id(1, 4))), Some(id(1, 4)));
        assert_eq!(d.commit_limit(Some(id(1, 6))), Some(id(1, 4)));
        assert!(!d.wait_synced_through_for(5, Duration::from_millis(20)).await);

        // The syncer completes appends oldest first.
        d.synced_one();
        assert!(d.synced_through(5).unwrap());
        assert!(!d.synced_through(6).unwrap());
        assert_eq!(d.commit_limit(Some(id(1, 6))), Some(id(1, 5)));
        d.synced_one();
        assert!(d.synced_through(6).unwrap());
        assert_eq!(d.commit_limit(Some(id(1, 6))), Some(id(1, 6)));
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_its_entry_is_synced() {
        let d = std::sync::Arc::new(Durability::default());
        d.push(1, None);
        assert_eq!(d.commit_limit(Some(id(1, 1))), None);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait_synced_through(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        d.synced_one();
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_waiters_and_keeps_holding_back() {
        let d = std::sync::Arc::new(Durability::default());
        d.push(3, Some(id(1, 2)));
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait_synced_through(3).await }
        });
        d.sync_failed();
        assert!(waiter.await.unwrap().is_err());
        assert_eq!(d.commit_limit(Some(id(1, 3))), Some(id(1, 2)));
        // Entries before it were durable before the failure.
        assert!(d.synced_through(2).unwrap());
    }

    #[tokio::test]
    async fn after_a_truncation_the_lowest_pending_append_counts() {
        let d = Durability::default();
        d.push(10, Some(id(1, 9)));
        // Stepped down, truncated from 8, then leader again: appends at 8.
        d.push(8, Some(id(1, 7)));
        assert!(!d.synced_through(8).unwrap());
        assert_eq!(d.commit_limit(Some(id(2, 8))), Some(id(1, 7)));
        d.synced_one();
        assert!(!d.synced_through(8).unwrap());
        d.synced_one();
        assert!(d.synced_through(10).unwrap());
    }

    #[test]
    fn held_back_indexes_only_move_up() {
        let d = Durability::default();
        let mut rx = d.held_back();
        d.note_held_back(5);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 5);
        d.note_held_back(3);
        assert!(!rx.has_changed().unwrap());
        d.note_held_back(7);
        assert_eq!(*rx.borrow_and_update(), 7);
    }
}
