//! The replicated state machine: applies committed entries into RocksDB and
//! builds, stores and installs snapshots.

use std::io::Seek;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::apply::Tx;
use super::db::{Db, CF_SM, INLINE_WRITE_BYTES};
use super::durability::Durability;
use super::io_err;
use super::snapshot::{dump_to, load_file, SnapshotError, SnapshotFiles};
use crate::crypto::Keyring;
use crate::state::codec::{decode, encode};
use crate::state::command::Command;
use crate::state::keys::{META_APPLIED, META_MEMBERSHIP};
use crate::state::types::{
    entry_bytes, BatchResult, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// The state machine. Cloning shares the database and the current snapshot.
#[derive(Clone)]
pub struct StateMachine {
    db: Db,
    /// Binds records to their keys and protects names (see `apply`).
    keys: Keyring,
    files: SnapshotFiles,
    /// The current snapshot's metadata, data file and its size in bytes.
    current: Arc<Mutex<Option<(SnapshotMeta, PathBuf, u64)>>>,
    /// The file a snapshot is being received into, if a transfer is under way.
    receiving: Arc<Mutex<Option<PathBuf>>>,
    applied_tx: Arc<watch::Sender<u64>>,
    /// Counts applies that added audit records (and installed snapshots).
    audit_tx: Arc<watch::Sender<u64>>,
    /// Bytes of client commands applied since the state machine was opened
    /// (about their size in the log; for the snapshot schedule).
    applied_bytes: Arc<AtomicU64>,
    /// `applied_bytes` when the current snapshot became current.
    bytes_at_snapshot: Arc<AtomicU64>,
    /// The log's unsynced leader appends: an entry is applied only once
    /// it is on disk here (`super::durability`, rule 1).
    durability: Option<Arc<Durability>>,
}

/// The current snapshot, and how far the state machine has moved past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotExtent {
    /// The current snapshot's last log index (0 without one).
    pub index: u64,
    /// The current snapshot's data size in bytes (0 without one).
    pub bytes: u64,
    /// Bytes of client commands applied since it became current (since
    /// the state machine was opened, if that was later).
    pub applied_bytes_since: u64,
}

impl StateMachine {
    /// Opens the state machine over `db`, with snapshots kept under `snapshot_dir`.
    pub fn open(db: Db, keys: Keyring, snapshot_dir: &std::path::Path) -> Result<StateMachine, StorageError> {
        let files = SnapshotFiles::new(snapshot_dir)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        let read_err = |e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e);
        let current = match files.read().map_err(read_err)? {
            Some((meta, path)) => {
                let len = std::fs::metadata(&path).map_err(|e| read_err(e.into()))?.len();
                Some((meta, path, len))
            }
            None => None,
        };
        let sm = StateMachine {
            db,
            keys,
            files,
            current: Arc::new(Mutex::new(current)),
            receiving: Arc::new(Mutex::new(None)),
            applied_tx: Arc::new(watch::channel(0).0),
            audit_tx: Arc::new(watch::channel(0).0),
            applied_bytes: Arc::new(AtomicU64::new(0)),
            bytes_at_snapshot: Arc::new(AtomicU64::new(0)),
            durability: None,
        };
        let applied = sm.read_applied()?.0.map(|l| l.index).unwrap_or(0);
        sm.applied_tx.send_replace(applied);
        Ok(sm)
    }

    /// Applies entries only once the log store reports them on disk here:
    /// required with `LogStore::with_leader_pipelining`.
    pub fn applying_synced(mut self, durability: Arc<Durability>) -> StateMachine {
        self.durability = Some(durability);
        self
    }

    /// Watches the last applied log index (for readers waiting on a read index and watchers).
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Changes whenever applied entries added audit records or a snapshot
    /// was installed (for the lockout follower, which would otherwise look
    /// for new records after every apply).
    pub fn audit_changes(&self) -> watch::Receiver<u64> {
        self.audit_tx.subscribe()
    }

    fn audit_changed(&self) {
        self.audit_tx.send_modify(|n| *n += 1);
    }

    fn read_applied(&self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        read_applied(&self.db)
    }

    /// The current snapshot's last log index and size, and the bytes of
    /// commands applied since.
    pub fn snapshot_extent(&self) -> SnapshotExtent {
        let current = self.current.lock().expect("snapshot lock");
        let applied_bytes_since = self
            .applied_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(self.bytes_at_snapshot.load(Ordering::Relaxed));
        let (index, bytes) = current.as_ref().map_or((0, 0), |(meta, _, len)| {
            (meta.last_log_id.map(|l| l.index).unwrap_or(0), *len)
        });
        SnapshotExtent {
            index,
            bytes,
            applied_bytes_since,
        }
    }

    /// Applies `entries`; returns their results, the last index, and
    /// whether they added audit records. `in_memory`: reads and the write
    /// must not wait for the disk or a write stall, or the call fails with
    /// `ErrorKind::Incomplete` having changed nothing.
    fn apply_entries(
        &self,
        entries: Vec<Entry>,
        in_memory: bool,
    ) -> Result<(Vec<BatchResult>, Option<u64>, bool), rocksdb::Error> {
        let mut tx = if in_memory {
            Tx::in_memory(&self.db, &self.keys)
        } else {
            Tx::new(&self.db, &self.keys)
        };
        let mut results = Vec::with_capacity(entries.len());
        let mut last = None;
        let mut bytes = 0;
        let mut audited = false;
        for entry in entries {
            last = Some(entry.log_id);
            let mut out = BatchResult::default();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    for cmd in batch.commands {
                        bytes += cmd.approx_bytes() as u64;
                        audited |= matches!(cmd, Command::Audit { .. });
                        out.results.push(tx.apply(cmd)?);
                    }
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m);
                    tx.put_raw(META_MEMBERSHIP.to_vec(), encode(&stored));
                }
            }
            results.push(out);
        }
        if let Some(l) = last {
            tx.put_raw(META_APPLIED.to_vec(), encode(&Some(l)));
        }
        // Not in the WAL: the log already holds every applied entry (so a
        // message is not written to the WAL twice), and keeps it until a
        // snapshot has flushed the state that includes it. After a crash the
        // state machine is back at its last flush, applied index included,
        // and openraft applies the rest again from the log. A clean shutdown
        // flushes it.
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        wo.set_no_slowdown(in_memory);
        self.db.write_opt(tx.batch, &wo)?;
        self.applied_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok((results, last.map(|l| l.index), audited))
    }

    /// Applies `entries`: small ones on the calling thread when everything
    /// they read is in memory (handing an apply to the blocking pool and
    /// back cost more than a small apply — about 0.2 ms of the single-client
    /// p50), others on a blocking thread, off the async workers.
    async fn apply_inline_or_blocking(
        &self,
        entries: Vec<Entry>,
    ) -> Result<(Vec<BatchResult>, Option<u64>, bool), StorageError> {
        let sm_err = |e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e);
        if entries.iter().map(entry_bytes).sum::<usize>() <= INLINE_WRITE_BYTES {
            // Kept to retry with: a failed attempt consumes the entries.
            match self.apply_entries(entries.clone(), true) {
                Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {
                    metrics::counter!("mailvault_apply_from_disk_total").increment(1);
                }
                done => return done.map_err(sm_err),
            }
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.apply_entries(entries, false))
            .await
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?
            .map_err(sm_err)
    }
}

/// The stored applied log id and membership (also for offline tools,
/// without a `StateMachine`).
pub(super) fn read_applied(db: &Db) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let cf = db.cf_handle(CF_SM).expect("sm column family");
    let get = |k: &[u8]| {
        db.get_cf(cf, k)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))
    };
    decode_applied(get(META_APPLIED)?, get(META_MEMBERSHIP)?)
}

/// The applied log id and membership from their stored encodings.
fn decode_applied(
    applied: Option<Vec<u8>>,
    membership: Option<Vec<u8>>,
) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let err = |e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e);
    let applied = match applied {
        Some(b) => decode(&b).map_err(err)?,
        None => None,
    };
    let membership = match membership {
        Some(b) => decode(&b).map_err(err)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

impl StateMachine {
    /// The synced file holding the snapshot data `file` was given for: the
    /// file it was received into, or, when the caller handed over another
    /// file (the data of a snapshot built here, say), a copy of it.
    fn received_file(&self, mut file: std::fs::File, received: Option<PathBuf>) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let given = file.metadata()?;
        if let Some(path) = received {
            match std::fs::metadata(&path) {
                Ok(m) if m.dev() == given.dev() && m.ino() == given.ino() => {
                    file.sync_all()?;
                    return Ok(path);
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let path = self.files.scratch("incoming", "tmp");
        let mut copy = std::fs::File::create(&path)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        std::io::copy(&mut file, &mut copy)?;
        copy.sync_all()?;
        Ok(path)
    }
}

impl StateMachine {
    /// Makes the synced file `data` the current snapshot, described by `meta`,
    /// and opens it for reading. Publishing, and opening the current file,
    /// happen under one lock, so that a snapshot being sent is never removed
    /// before it is opened. With `keep_newer`, a snapshot that would replace a
    /// newer one (installed while this one was being built) is dropped and
    /// the newer one returned instead.
    fn publish(
        &self,
        meta: SnapshotMeta,
        data: &std::path::Path,
        keep_newer: bool,
    ) -> std::io::Result<(SnapshotMeta, std::fs::File)> {
        let mut current = self.current.lock().expect("snapshot lock");
        if let Some((cur, path, _)) = current.as_ref() {
            if keep_newer && cur.last_log_id > meta.last_log_id {
                std::fs::remove_file(data)?;
                return Ok((cur.clone(), std::fs::File::open(path)?));
            }
        }
        self.files.commit(&meta, data)?;
        let path = self.files.data_path(&meta);
        let file = std::fs::File::open(&path)?;
        *current = Some((meta.clone(), path, file.metadata()?.len()));
        // What was applied while this snapshot was being built counts as
        // part of it: a slight undercount of what the next one adds.
        self.bytes_at_snapshot
            .store(self.applied_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok((meta, file))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        let (meta, file) = tokio::task::spawn_blocking(move || {
            let snap_err = |e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e);
            let tmp = this.files.scratch("build", "tmp");
            // The metadata is read from the same RocksDB snapshot as the
            // data: entries are applied concurrently with the build. The
            // dump flushes that state to disk before the log it came from
            // can be purged.
            let (len, mut meta_values) =
                dump_to(&this.db, &tmp, &[META_APPLIED, META_MEMBERSHIP]).map_err(snap_err)?;
            let membership = meta_values.pop().flatten();
            let (applied, membership) = decode_applied(meta_values.pop().flatten(), membership)?;
            let snapshot_id = match applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, len),
                None => format!("empty-{len}"),
            };
            let meta = SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            };
            let published = this.publish(meta, &tmp, true).map_err(snap_err_io)?;
            metrics::counter!("mailvault_snapshots_built_total").increment(1);
            Ok::<_, StorageError>(published)
        })
        .await
        .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

fn snap_err_io(e: std::io::Error) -> StorageError {
    io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let (Some(durability), Some(last)) = (&self.durability, entries.last()) {
            let waited = std::time::Instant::now();
            durability
                .wait_synced_through(last.log_id.index)
                .await
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
            metrics::histogram!("mailvault_apply_sync_wait_seconds").record(waited.elapsed().as_secs_f64());
        }
        let started = std::time::Instant::now();
        let (results, last, audited) = self.apply_inline_or_blocking(entries).await?;
        metrics::histogram!("mailvault_apply_seconds").record(started.elapsed().as_secs_f64());
        if let Some(i) = last {
            self.applied_tx.send_replace(i);
            metrics::gauge!("mailvault_applied_index").set(i as f64);
        }
        if audited {
            self.audit_changed();
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.files.scratch("incoming", "tmp");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(snap_err_io)?;
        // A newer transfer supersedes an unfinished one.
        if let Some(old) = self.receiving.lock().expect("snapshot lock").replace(path) {
            let _ = std::fs::remove_file(old);
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let received = self.receiving.lock().expect("snapshot lock").take();
        let mut snapshot = snapshot;
        snapshot
            .flush()
            .await
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let file = snapshot.into_std().await;
        let this = self.clone();
        let meta2 = meta.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let err = |e| {
                io_err(
                    ErrorSubject::Snapshot(Some(meta2.signature())),
                    ErrorVerb::Write,
                    e,
                )
            };
            let received = this
                .received_file(file, received)
                .map_err(|e| err(SnapshotError::Io(e)))?;
            let work = this.files.scratch("install", "sst");
            load_file(&this.db, &received, &work).map_err(err)?;
            // The metadata in the snapshot's own pairs is replaced by the meta we were given.
            let cf = this.db.cf_handle(CF_SM).expect("sm column family");
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            let mut wb = rocksdb::WriteBatch::default();
            wb.put_cf(cf, META_APPLIED, encode(&meta2.last_log_id));
            wb.put_cf(cf, META_MEMBERSHIP, encode(&meta2.last_membership));
            this.db
                .write_opt(wb, &wo)
                .map_err(|e| err(SnapshotError::Db(e)))?;
            // A snapshot of an older data version (or of one written before
            // versions were stored) is upgraded like a data directory.
            super::data_version::upgrade(&this.db, &this.keys).map_err(|e| err(SnapshotError::Version(e)))?;
            this.publish(meta2.clone(), &received, false)
                .map_err(|e| err(SnapshotError::Io(e)))?;
            Ok(())
        })
        .await
        .map_err(|e| io_err(subject, ErrorVerb::Write, e))??;
        let applied = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.applied_tx.send_replace(applied);
        self.audit_changed();
        metrics::counter!("mailvault_snapshots_installed_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // Opened under the lock, so a snapshot published meanwhile cannot
        // remove the file first.
        let cur = self.current.lock().expect("snapshot lock");
        let Some((meta, path, _)) = cur.as_ref() else {
            return Ok(None);
        };
        let file = std::fs::File::open(path)
            .map_err(|e| io_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_keyring;
    use crate::store::open_db;

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                index,
            )),
            snapshot_id: format!("1-1-{index}-0"),
            ..Default::default()
        }
    }

    fn data(sm: &StateMachine, tag: &[u8]) -> PathBuf {
        let p = sm.files.scratch("build", "tmp");
        std::fs::write(&p, tag).unwrap();
        p
    }

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    /// What a power cut leaves: the files as they are on disk now, with the
    /// database still open (so nothing is flushed on close).
    fn crash_copy(from: &std::path::Path, to: &std::path::Path) -> Db {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        open_db(to).unwrap()
    }

    fn applied_in(db: Db, dir: &std::path::Path) -> Option<u64> {
        let sm = StateMachine::open(db, test_keyring().clone(), &dir.join("snaps-copy")).unwrap();
        sm.read_applied().unwrap().0.map(|l| l.index)
    }

    #[tokio::test]
    async fn a_crash_leaves_the_state_of_the_last_snapshot_with_its_own_applied_index() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("db");
        let mut sm = StateMachine::open(
            open_db(&db_dir).unwrap(),
            test_keyring().clone(),
            &dir.path().join("snaps"),
        )
        .unwrap();
        sm.apply((1..=3).map(blank).collect::<Vec<_>>()).await.unwrap();
        // Applied writes bypass the WAL: before any snapshot, a crash loses
        // them all, applied index included (the log applies them again).
        let copy = crash_copy(&db_dir, &dir.path().join("c1"));
        assert_eq!(applied_in(copy, &dir.path().join("c1x")), None);
        // A snapshot makes exactly the state it describes durable.
        let snap = sm.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(3));
        sm.apply((4..=6).map(blank).collect::<Vec<_>>()).await.unwrap();
        let copy = crash_copy(&db_dir, &dir.path().join("c2"));
        assert_eq!(applied_in(copy, &dir.path().join("c2x")), Some(3));
        // A clean shutdown keeps everything.
        drop(sm);
        assert_eq!(applied_in(open_db(&db_dir).unwrap(), dir.path()), Some(6));
    }

    #[test]
    fn a_build_never_replaces_a_newer_snapshot_and_the_current_one_stays_readable() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(
            open_db(&dir.path().join("db")).unwrap(),
            test_keyring().clone(),
            &dir.path().join("snaps"),
        )
        .unwrap();
        // A snapshot at index 10 is installed while one at index 5 is being built.
        let (m, _) = sm.publish(meta(10), &data(&sm, b"ten"), false).unwrap();
        assert_eq!(m, meta(10));
        let late = data(&sm, b"five");
        let (m, mut f) = sm.publish(meta(5), &late, true).unwrap();
        assert_eq!(m, meta(10), "the newer snapshot stays current");
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ten");
        assert!(!late.exists(), "the stale build is removed");
        // A file opened for sending stays readable after a newer one replaces it.
        let (_, mut sending) = sm.publish(meta(11), &data(&sm, b"eleven"), true).unwrap();
        sm.publish(meta(12), &data(&sm, b"twelve"), true).unwrap();
        let mut got = Vec::new();
        sending.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"eleven");
        let current = sm.current.lock().unwrap().clone().unwrap();
        assert_eq!(current.0, meta(12));
        assert_eq!(std::fs::read(current.1).unwrap(), b"twelve");
        let snaps: Vec<_> = std::fs::read_dir(dir.path().join("snaps"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".snap"))
            .collect();
        assert_eq!(snaps.len(), 1, "older data files are removed: {snaps:?}");
    }
}
