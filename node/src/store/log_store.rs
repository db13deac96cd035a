//! The Raft log in RocksDB. An append is acknowledged to openraft only after
//! the WAL is synced to disk: acknowledged means fsynced.
//!
//! `append` writes the entries (to the memtable and the OS's copy of the
//! WAL) on a blocking thread and returns, so Raft can already send them to
//! the followers; one syncer thread per store then syncs the WAL and reports
//! the entries flushed. Appends that queue up while a sync runs share the
//! next one, so at high load one fsync covers many Raft entries.
//!
//! A leader's own appends can instead be reported flushed as soon as they
//! are written (`with_leader_pipelining`), with the sync still to come; see
//! `super::durability` for why, and for the rules that keep acknowledged
//! writes fsynced on a quorum.
//!
//! The newest entries are also kept in memory (`super::log_cache`), so that
//! reading them back to replicate and apply them does not go to RocksDB.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};

use super::db::{write_batch, Db, CF_LOG, CF_META};
use super::durability::Durability;
use super::io_err;
use super::log_cache::LogCache;
use crate::state::codec::{decode, encode};
use crate::state::types::{Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::workers::{Kind, Supervisor};

pub(super) const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// The RocksDB-backed Raft log. Cloning shares the database and the syncer.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
    /// False only in the `ack-before-fsync` canary (see `crate::test_modes`).
    sync_appends: bool,
    syncer: Arc<mpsc::Sender<Flush>>,
    cache: Arc<Mutex<LogCache>>,
    /// This node's id when its appends as leader are reported flushed before
    /// their sync (`None`: every append waits for its sync).
    pipelined_leader: Option<NodeId>,
    durability: Arc<Durability>,
    /// The vote last saved or read, and the log id of the last entry.
    vote: Arc<Mutex<Option<Vote<NodeId>>>>,
    last: Arc<Mutex<Option<LogId>>>,
}

/// What the syncer completes once a sync that began after it returns.
enum Flush {
    /// An append openraft waits for.
    Callback(LogFlushed<TypeConfig>),
    /// A leader's append already reported flushed (`Durability::push`).
    Pipelined,
}

/// Reads and decodes one Raft metadata value.
pub(super) fn read_meta<T: for<'a> serde::Deserialize<'a>>(
    db: &Db,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    let cf = db.cf_handle(CF_META).expect("meta column family");
    let v = db
        .get_cf(cf, key)
        .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
    v.map(|b| decode(&b))
        .transpose()
        .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))
}

/// The stored commit index (also for offline tools, without a `LogStore`).
pub(super) fn read_committed(db: &Db) -> Result<Option<LogId>, StorageError> {
    Ok(read_meta::<Option<LogId>>(db, KEY_COMMITTED)?.flatten())
}

/// Syncs the WAL for every batch of appends queued since the last sync, then
/// reports them flushed, in order. Ends when every store clone is dropped.
/// It holds the database only while it syncs, so that whoever drops the
/// last handle closes it — not this thread, which a process may be exiting
/// under (RocksDB aborted in a close racing the exit).
fn run_syncer(db: std::sync::Weak<rocksdb::DB>, rx: mpsc::Receiver<Flush>, durability: Arc<Durability>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        if waiting.iter().any(|f| matches!(f, Flush::Pipelined)) {
            std::thread::sleep(durability.sync_delay());
        }
        let started = std::time::Instant::now();
        // Kept as text: each callback takes its own `io::Error`.
        let res: Result<(), String> = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the database is closed".into()),
        };
        metrics::histogram!("mailvault_wal_sync_seconds").record(started.elapsed().as_secs_f64());
        if res.is_ok() {
            metrics::counter!("mailvault_fsyncs_total").increment(1);
        }
        metrics::histogram!("mailvault_appends_per_fsync").record(waiting.len() as f64);
        if res.is_err() {
            durability.sync_failed();
        }
        for flush in waiting {
            match flush {
                Flush::Callback(callback) => {
                    callback.log_io_completed(res.clone().map_err(std::io::Error::other))
                }
                Flush::Pipelined if res.is_ok() => durability.synced_one(),
                Flush::Pipelined => {}
            }
        }
        if res.is_err() {
            // Raft stops on the first failed sync (the callback's error, or
            // the state machine's wait for a pipelined append); nothing
            // later can be durable.
            break;
        }
    }
}

fn idx(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

impl LogStore {
    /// A log store over an open database, keeping about `cache_bytes` of
    /// the newest entries in memory as well.
    pub fn new(db: Db, cache_bytes: usize) -> Result<LogStore, StorageError> {
        let (store, rx) = LogStore::without_syncer(db, cache_bytes)?;
        let (sync_db, durability) = (Arc::downgrade(&store.db), store.durability.clone());
        std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || run_syncer(sync_db, rx, durability))
            .expect("spawn the WAL sync thread");
        Ok(store)
    }

    /// [`Self::new`], its WAL syncer thread the essential worker `wal-sync`
    /// of `workers`.
    pub fn supervised(db: Db, cache_bytes: usize, workers: &Supervisor) -> Result<LogStore, StorageError> {
        let (store, rx) = LogStore::without_syncer(db, cache_bytes)?;
        let (sync_db, durability) = (Arc::downgrade(&store.db), store.durability.clone());
        workers.thread("wal-sync", Kind::Essential, move || {
            run_syncer(sync_db, rx, durability)
        });
        Ok(store)
    }

    /// The store, and the queue its syncer thread is to serve.
    fn without_syncer(db: Db, cache_bytes: usize) -> Result<(LogStore, mpsc::Receiver<Flush>), StorageError> {
        let (tx, rx) = mpsc::channel();
        let store = LogStore {
            db,
            sync_appends: true,
            syncer: Arc::new(tx),
            cache: Arc::new(Mutex::new(LogCache::new(cache_bytes))),
            pipelined_leader: None,
            durability: Arc::default(),
            vote: Arc::default(),
            last: Arc::default(),
        };
        *store.last.lock().expect("last log id lock") = store.stored_last_log_id()?;
        *store.vote.lock().expect("vote lock") = store.get_meta(KEY_VOTE)?;
        Ok((store, rx))
    }

    /// Appends this node (`id`) makes as leader are reported flushed once
    /// written, and synced while they are replicated (`super::durability`).
    /// The state machine must then wait on [`Self::durability`] before it
    /// applies, and the peer network limit the commit index it sends.
    pub fn with_leader_pipelining(mut self, id: NodeId) -> LogStore {
        self.pipelined_leader = Some(id);
        self
    }

    /// The `slow-leader-sync` test mode: while the file `while_exists`
    /// exists, each sync of pipelined leader appends waits `delay` first.
    /// Only reachable through `crate::test_modes`, and compiled only into
    /// the harness's binary.
    #[cfg(feature = "test-modes")]
    pub fn with_leader_sync_delay(
        self,
        delay: std::time::Duration,
        while_exists: std::path::PathBuf,
    ) -> LogStore {
        self.durability.set_sync_delay(delay, while_exists);
        self
    }

    /// Which of this node's leader appends are not yet on disk.
    pub fn durability(&self) -> Arc<Durability> {
        self.durability.clone()
    }

    /// Whether an append now is this node's own, as an established leader:
    /// its stored vote is its own and committed. (A node accepts another
    /// leader's entries only after saving that leader's vote.)
    fn appending_as_leader(&self) -> bool {
        let Some(id) = self.pipelined_leader else {
            return false;
        };
        let vote = self.vote.lock().expect("vote lock");
        vote.as_ref()
            .is_some_and(|v| v.is_committed() && v.leader_id().voted_for() == Some(id))
    }

    /// The last log id in RocksDB (the last purged one if the log is empty).
    fn stored_last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        Ok(self.last_entry_log_id()?.or(self.get_meta(KEY_PURGED)?))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LogCache> {
        self.cache.lock().expect("log cache lock")
    }

    /// The `ack-before-fsync` canary: appends are reported flushed without
    /// syncing the WAL. A data-loss bug on purpose, so the chaos tests can
    /// show they catch it; only reachable through `crate::test_modes`, and
    /// compiled only into the harness's binary.
    #[cfg(feature = "test-modes")]
    pub fn without_append_sync(mut self) -> LogStore {
        self.sync_appends = false;
        self
    }

    fn cf_log(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_LOG).expect("log column family")
    }

    fn cf_meta(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_META).expect("meta column family")
    }

    fn get_meta<T: for<'a> serde::Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        read_meta(&self.db, key)
    }

    fn put_meta_synced<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.cf_meta(), key, encode(value), &wo)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        metrics::counter!("mailvault_fsyncs_total").increment(1);
        Ok(())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut it = self.db.iterator_cf(self.cf_log(), IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(Err(e)) => Err(io_err(ErrorSubject::Logs, ErrorVerb::Read, e)),
            Some(Ok((_, v))) => {
                let e: Entry = decode(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Ok(Some(e.log_id))
            }
        }
    }

    fn delete_range(&self, from: u64, to_exclusive: u64, verb: ErrorVerb) -> Result<(), StorageError> {
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(self.cf_log(), idx(from), idx(to_exclusive));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(wb, &wo)
            .map_err(|e| io_err(ErrorSubject::Logs, verb, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Some(e + 1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        let cached = self.cache().get(start, end);
        if let Some(entries) = cached {
            metrics::counter!("mailvault_log_reads_total", "from" => "cache").increment(1);
            return Ok(entries.iter().map(|e| Entry::clone(e)).collect());
        }
        metrics::counter!("mailvault_log_reads_total", "from" => "disk").increment(1);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read_range(&db, start, end))
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?
    }
}

/// Reads the entries `start..end` (`None`: to the last) from RocksDB.
fn read_range(db: &Db, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StorageError> {
    let cf = db.cf_handle(CF_LOG).expect("log column family");
    let mut out = Vec::new();
    for item in db.iterator_cf(cf, IteratorMode::From(&idx(start), Direction::Forward)) {
        let (k, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let i = u64::from_be_bytes(k.as_ref().try_into().expect("8-byte log key"));
        if end.is_some_and(|end| i >= end) {
            break;
        }
        out.push(decode(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?);
    }
    Ok(out)
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta_synced(KEY_VOTE, vote)?;
        *self.vote.lock().expect("vote lock") = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let vote = self.get_meta(KEY_VOTE)?;
        *self.vote.lock().expect("vote lock") = vote;
        Ok(vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only means re-learning the commit index from the leader.
        self.db
            .put_cf(self.cf_meta(), KEY_COMMITTED, encode(&committed))
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        read_committed(&self.db)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut wb = WriteBatch::default();
        let cf = self.cf_log();
        let mut written: Vec<(Entry, usize)> = Vec::new();
        for e in entries {
            let bytes = encode(&e);
            wb.put_cf(cf, idx(e.log_id.index), &bytes);
            written.push((e, bytes.len()));
        }
        let started = std::time::Instant::now();
        // Write (no sync); the syncer makes it durable.
        write_batch(&self.db, wb)
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let span = written
            .first()
            .zip(written.last())
            .map(|(f, l)| (f.0.log_id.index, l.0.log_id));
        self.cache().extend(written);
        metrics::histogram!("mailvault_log_write_seconds").record(started.elapsed().as_secs_f64());
        let before = match span {
            Some((_, last)) => self.last.lock().expect("last log id lock").replace(last),
            None => None,
        };
        if !self.sync_appends {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let stopped = |_| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other("the WAL sync thread stopped after a failed sync"),
            )
        };
        match span {
            Some((first, _)) if self.appending_as_leader() => {
                // Recorded before openraft hears of it, so that nothing can
                // apply or tell a follower it is committed before its sync.
                self.durability.push(first, before);
                self.syncer.send(Flush::Pipelined).map_err(stopped)?;
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            _ => self.syncer.send(Flush::Callback(callback)).map_err(stopped),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().remove_from(log_id.index);
        self.delete_range(log_id.index, u64::MAX, ErrorVerb::Delete)?;
        *self.last.lock().expect("last log id lock") = self.stored_last_log_id()?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().remove_through(log_id.index);
        self.put_meta_synced(KEY_PURGED, &log_id)?;
        self.delete_range(0, log_id.index + 1, ErrorVerb::Delete)?;
        // Installing a snapshot purges past the last entry.
        let mut last = self.last.lock().expect("last log id lock");
        if last.is_none_or(|l| l.index < log_id.index) {
            *last = Some(log_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn blank(term: u64, leader: NodeId, index: u64) -> Entry {
        Entry {
            log_id: openraft::LogId::new(CommittedLeaderId::new(term, leader), index),
            payload: EntryPayload::Blank,
        }
    }

    /// A store for node 1 whose syncer runs only when the test starts it.
    fn store(dir: &tempfile::TempDir, pipelined: bool) -> (LogStore, mpsc::Receiver<Flush>) {
        let db = super::super::open_db(&dir.path().join("db")).unwrap();
        let (log, rx) = LogStore::without_syncer(db, 1 << 20).unwrap();
        (
            if pipelined {
                log.with_leader_pipelining(1)
            } else {
                log
            },
            rx,
        )
    }

    fn start_syncer(log: &LogStore, rx: mpsc::Receiver<Flush>) -> std::thread::JoinHandle<()> {
        let (db, durability) = (Arc::downgrade(&log.db), log.durability());
        std::thread::spawn(move || run_syncer(db, rx, durability))
    }

    #[tokio::test]
    async fn an_established_leaders_own_appends_are_reported_before_their_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, rx) = store(&dir, true);
        let durability = log.durability();
        log.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
        // As a follower of node 2, an append is not reported until synced…
        let unsynced =
            tokio::time::timeout(Duration::from_millis(200), log.blocking_append([blank(1, 2, 1)]));
        assert!(unsynced.await.is_err(), "reported flushed with no syncer running");
        // …and is once the syncer runs.
        let syncer = start_syncer(&log, rx);
        log.blocking_append([blank(1, 2, 2)]).await.unwrap();
        assert_eq!(durability.pipelined_appends(), 0);
        drop(log);
        syncer.join().unwrap();

        // Reopened with no syncer running: node 1, now leader, appends 3.
        // It is reported flushed although nothing synced it…
        let (mut log, rx) = store(&dir, true);
        let durability = log.durability();
        log.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        log.blocking_append([blank(2, 1, 3), blank(2, 1, 4)])
            .await
            .unwrap();
        assert_eq!(durability.pipelined_appends(), 1);
        // …and recorded as pending after entry 2, read back from RocksDB.
        assert!(durability.synced_through(2).unwrap());
        assert!(!durability.synced_through(3).unwrap());
        let four = Some(blank(2, 1, 4).log_id);
        assert_eq!(durability.commit_limit(four), Some(blank(1, 2, 2).log_id));

        // The syncer's next sync clears it.
        let _syncer = start_syncer(&log, rx);
        durability.wait_synced_through(4).await.unwrap();
        assert_eq!(durability.commit_limit(four), four);
    }

    #[tokio::test]
    async fn other_appends_wait_for_their_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, rx) = store(&dir, true);
        let _syncer = start_syncer(&log, rx);
        // A follower of node 2, then a candidate (its own vote, not yet
        // granted by a quorum), then a follower of a newer leader.
        log.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
        log.blocking_append([blank(1, 2, 1)]).await.unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        log.blocking_append([blank(1, 2, 2)]).await.unwrap();
        log.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
        log.blocking_append([blank(3, 2, 3)]).await.unwrap();
        assert_eq!(log.durability().pipelined_appends(), 0);

        // Without pipelining, even the leader's own appends wait.
        let dir = tempfile::tempdir().unwrap();
        let (mut log, rx) = store(&dir, false);
        let _syncer = start_syncer(&log, rx);
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        log.blocking_append([blank(1, 1, 1)]).await.unwrap();
        assert_eq!(log.durability().pipelined_appends(), 0);
    }
}
