//! The Raft log in RocksDB. An append is acknowledged to openraft only after
//! the WAL is synced to disk: acknowledged means fsynced.
//!
//! `append` writes the entries (to the memtable and the OS's copy of the
//! WAL) on a blocking thread and returns, so Raft can already send them to
//! the followers; one syncer thread per store then syncs the WAL and reports
//! the entries flushed. Appends that queue up while a sync runs share the
//! next one, so at high load one fsync covers many Raft entries.
//!
//! The newest entries are also kept in memory (`super::log_cache`), so that
//! reading them back to replicate and apply them does not go to RocksDB.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};

use super::db::{Db, CF_LOG, CF_META};
use super::io_err;
use super::log_cache::LogCache;
use crate::model::{decode, encode};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// The RocksDB-backed Raft log. Cloning shares the database and the syncer.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
    /// False only in the `ack-before-fsync` canary (see `crate::test_modes`).
    sync_appends: bool,
    syncer: Arc<mpsc::Sender<LogFlushed<TypeConfig>>>,
    cache: Arc<Mutex<LogCache>>,
}

/// Reads and decodes one Raft metadata value.
fn read_meta<T: for<'a> serde::Deserialize<'a>>(db: &Db, key: &[u8]) -> Result<Option<T>, StorageError> {
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
fn run_syncer(db: std::sync::Weak<rocksdb::DB>, rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
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
        for callback in waiting {
            callback.log_io_completed(res.clone().map_err(std::io::Error::other));
        }
        if res.is_err() {
            // Raft stops on the first failed sync; nothing later can be durable.
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
    pub fn new(db: Db, cache_bytes: usize) -> LogStore {
        let (tx, rx) = mpsc::channel();
        let sync_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || run_syncer(sync_db, rx))
            .expect("spawn the WAL sync thread");
        LogStore {
            db,
            sync_appends: true,
            syncer: Arc::new(tx),
            cache: Arc::new(Mutex::new(LogCache::new(cache_bytes))),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LogCache> {
        self.cache.lock().expect("log cache lock")
    }

    /// The `ack-before-fsync` canary: appends are reported flushed without
    /// syncing the WAL. A data-loss bug on purpose, so the chaos tests can
    /// show they catch it; only reachable through `crate::test_modes`.
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
        self.put_meta_synced(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(KEY_VOTE)
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
        let mut written = Vec::new();
        for e in entries {
            let bytes = encode(&e);
            wb.put_cf(cf, idx(e.log_id.index), &bytes);
            written.push((e, bytes.len()));
        }
        let db = self.db.clone();
        let started = std::time::Instant::now();
        // Write (no sync), off the async workers; the syncer makes it durable.
        tokio::task::spawn_blocking(move || db.write(wb))
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        self.cache().extend(written);
        metrics::histogram!("mailvault_log_write_seconds").record(started.elapsed().as_secs_f64());
        if !self.sync_appends {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        self.syncer.send(callback).map_err(|_| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other("the WAL sync thread stopped after a failed sync"),
            )
        })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().remove_from(log_id.index);
        self.delete_range(log_id.index, u64::MAX, ErrorVerb::Delete)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().remove_through(log_id.index);
        self.put_meta_synced(KEY_PURGED, &log_id)?;
        self.delete_range(0, log_id.index + 1, ErrorVerb::Delete)
    }
}
