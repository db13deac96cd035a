//! The Raft log in RocksDB. An append is acknowledged to openraft only after
//! the WAL is synced to disk: acknowledged means fsynced.
//!
//! `append` writes the entries (to the memtable and the OS's copy of the
//! WAL) on a blocking thread and returns, so Raft can already send them to
//! the followers; one syncer thread per store then syncs the WAL and reports
//! the entries flushed. Appends that queue up while a sync runs share the
//! next one, so at high load one fsync covers many Raft entries.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};

use super::db::{Db, CF_LOG, CF_META};
use super::io_err;
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
fn run_syncer(db: Db, rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let started = std::time::Instant::now();
        let res = db.flush_wal(true);
        metrics::histogram!("mailvault_wal_sync_seconds").record(started.elapsed().as_secs_f64());
        if res.is_ok() {
            metrics::counter!("mailvault_fsyncs_total").increment(1);
        }
        metrics::histogram!("mailvault_appends_per_fsync").record(waiting.len() as f64);
        for callback in waiting {
            callback.log_io_completed(res.clone().map_err(|e| std::io::Error::other(e.to_string())));
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
    /// A log store over an open database.
    pub fn new(db: Db) -> LogStore {
        let (tx, rx) = mpsc::channel();
        let sync_db = db.clone();
        std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || run_syncer(sync_db, rx))
            .expect("spawn the WAL sync thread");
        LogStore {
            db,
            sync_appends: true,
            syncer: Arc::new(tx),
        }
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
        let mut out = Vec::new();
        let it = self
            .db
            .iterator_cf(self.cf_log(), IteratorMode::From(&idx(start), Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let i = u64::from_be_bytes(k.as_ref().try_into().expect("8-byte log key"));
            if !range.contains(&i) {
                break;
            }
            out.push(decode(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?);
        }
        Ok(out)
    }
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
        for e in entries {
            wb.put_cf(cf, idx(e.log_id.index), encode(&e));
        }
        let db = self.db.clone();
        let started = std::time::Instant::now();
        // Write (no sync), off the async workers; the syncer makes it durable.
        tokio::task::spawn_blocking(move || db.write(wb))
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
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
        self.delete_range(log_id.index, u64::MAX, ErrorVerb::Delete)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.put_meta_synced(KEY_PURGED, &log_id)?;
        self.delete_range(0, log_id.index + 1, ErrorVerb::Delete)
    }
}
