//! The replicated state machine: applies committed entries into its RocksDB
//! and builds, stores and installs snapshots (checkpoints, see
//! [`super::checkpoint`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::apply::Tx;
use super::checkpoint::{self, CheckpointError, CheckpointReceiver};
use super::db::{Db, CF_SM, INLINE_WRITE_BYTES};
use super::durability::Durability;
use super::io_err;
use super::snapshot::{load_file, SnapshotError, SnapshotFiles};
use super::state_db::{self, open_state_at, StateDb};
use crate::crypto::Keyring;
use crate::state::codec::{decode, encode};
use crate::state::command::Command;
use crate::state::keys::{META_APPLIED, META_MEMBERSHIP};
use crate::state::snapshot_data::{CheckpointFile, SnapshotData};
use crate::state::types::{
    entry_bytes, BatchResult, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// The current snapshot: what it is, its checkpoint directory and its size.
#[derive(Debug, Clone)]
struct Current {
    meta: SnapshotMeta,
    dir: PathBuf,
    bytes: u64,
}

/// The state machine. Cloning shares the database and the current snapshot.
#[derive(Clone)]
pub struct StateMachine {
    state: StateDb,
    /// Binds records to their keys and protects names (see `apply`).
    keys: Keyring,
    files: SnapshotFiles,
    current: Arc<Mutex<Option<Current>>>,
    /// The file a snapshot of the old format is being received into, if a
    /// transfer from a node of an older build is under way.
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
    /// The current snapshot's size in bytes (its files; 0 without one).
    pub bytes: u64,
    /// Bytes of client commands applied since it became current (since
    /// the state machine was opened, if that was later).
    pub applied_bytes_since: u64,
}

fn snap_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e)
}

impl StateMachine {
    /// Opens the state machine over `state`, with snapshots kept under
    /// `snapshot_dir`. A state that has applied entries but has no snapshot
    /// (a fresh migration, lost snapshot files) gets one at once: it costs
    /// nothing, and a follower that needs one must not wait for it.
    pub fn open(
        state: StateDb,
        keys: Keyring,
        snapshot_dir: &std::path::Path,
    ) -> Result<StateMachine, StorageError> {
        let read_err = |e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e);
        let files = SnapshotFiles::new(snapshot_dir).map_err(|e| read_err(SnapshotError::Io(e)))?;
        let current = files.read().map_err(read_err)?.map(|(meta, dir)| {
            let bytes = checkpoint::list_files(&dir)
                .map(|f| f.iter().map(|(_, l)| l).sum())
                .unwrap_or(0);
            Current { meta, dir, bytes }
        });
        let sm = StateMachine {
            state,
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
        let applied = sm.read_applied()?.0;
        if applied.is_some() && sm.current.lock().expect("snapshot lock").is_none() {
            sm.build_checkpoint_snapshot()?;
        }
        sm.applied_tx.send_replace(applied.map(|l| l.index).unwrap_or(0));
        Ok(sm)
    }

    /// Applies entries only once the log store reports them on disk here:
    /// required with `LogStore::with_leader_pipelining`.
    pub fn applying_synced(mut self, durability: Arc<Durability>) -> StateMachine {
        self.durability = Some(durability);
        self
    }

    /// The state database (for readers: they take its live generation per read).
    pub fn state(&self) -> &StateDb {
        &self.state
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
        read_applied(&self.state.get())
    }

    /// The current snapshot's last log index and size, and the bytes of
    /// commands applied since.
    pub fn snapshot_extent(&self) -> SnapshotExtent {
        let current = self.current.lock().expect("snapshot lock");
        let applied_bytes_since = self
            .applied_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(self.bytes_at_snapshot.load(Ordering::Relaxed));
        let (index, bytes) = current.as_ref().map_or((0, 0), |c| {
            (c.meta.last_log_id.map(|l| l.index).unwrap_or(0), c.bytes)
        });
        SnapshotExtent {
            index,
            bytes,
            applied_bytes_since,
        }
    }

    /// Where a checkpoint sent by the leader is received: a new directory
    /// beside the live state database (so that installing it is a rename).
    pub fn checkpoint_receiver(
        &self,
        files: Vec<(String, u64)>,
    ) -> Result<CheckpointReceiver, CheckpointError> {
        let dir = self
            .state
            .dir()
            .ok_or_else(|| CheckpointError::Refused("this state machine receives no checkpoints".into()))?;
        CheckpointReceiver::new(state_db::incoming(dir, "transfer"), files)
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
        let db = self.state.get();
        let mut tx = if in_memory {
            Tx::in_memory(&db, &self.keys)
        } else {
            Tx::new(&db, &self.keys)
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
                        audited |= matches!(cmd, Command::Audit { .. } | Command::Ops(_));
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
        db.write_opt(tx.batch, &wo)?;
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
    /// Makes the checkpoint in `staged` (a directory under the snapshot
    /// directory) the current snapshot, described by `meta`, and opens its
    /// files for sending. Publishing, and opening the current snapshot's
    /// files, happen under one lock, so that a snapshot being sent is never
    /// removed before it is opened. With `keep_newer`, a snapshot that would
    /// replace a newer one (installed while this one was being built) is
    /// dropped and the newer one returned instead.
    fn publish(
        &self,
        meta: SnapshotMeta,
        staged: &std::path::Path,
        bytes: u64,
        keep_newer: bool,
    ) -> std::io::Result<(SnapshotMeta, Vec<CheckpointFile>)> {
        let mut current = self.current.lock().expect("snapshot lock");
        if let Some(cur) = current.as_ref() {
            if keep_newer && cur.meta.last_log_id > meta.last_log_id {
                std::fs::remove_dir_all(staged)?;
                return Ok((cur.meta.clone(), checkpoint::open_files(&cur.dir)?));
            }
        }
        let dir = self.files.commit(&meta, staged)?;
        let files = checkpoint::open_files(&dir)?;
        *current = Some(Current {
            meta: meta.clone(),
            dir,
            bytes,
        });
        // What was applied while this snapshot was being built counts as
        // part of it: a slight undercount of what the next one adds.
        self.bytes_at_snapshot
            .store(self.applied_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok((meta, files))
    }

    /// Takes a checkpoint of the live state and makes it the current
    /// snapshot (unless a newer one was installed meanwhile). Blocking.
    fn build_checkpoint_snapshot(&self) -> Result<(SnapshotMeta, Vec<CheckpointFile>), StorageError> {
        let started = std::time::Instant::now();
        let staged = self.files.scratch("build");
        let info = checkpoint::take(&self.state.get(), &staged).map_err(snap_err)?;
        let bytes = info.bytes();
        let snapshot_id = match info.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, bytes),
            None => format!("empty-{bytes}"),
        };
        let meta = SnapshotMeta {
            last_log_id: info.applied,
            last_membership: info.membership,
            snapshot_id,
        };
        let published = self.publish(meta, &staged, bytes, true).map_err(snap_err)?;
        metrics::counter!("mailvault_snapshots_built_total").increment(1);
        metrics::histogram!("mailvault_snapshot_build_seconds").record(started.elapsed().as_secs_f64());
        Ok(published)
    }

    /// Prepares a received snapshot in `staged` (a state database directory
    /// beside the live one) and swaps it in: its data version checked (a
    /// newer one refused before anything changes) and an older one upgraded,
    /// its applied log id and membership set from `meta`, flushed; then the
    /// directory swap, then a checkpoint of it as the current snapshot.
    fn swap_in_snapshot(&self, meta: &SnapshotMeta, staged: &std::path::Path) -> Result<(), SnapshotError> {
        {
            let db = open_state_at(staged)?;
            super::data_version::upgrade(&db, &self.keys)?;
            let cf = db.cf_handle(CF_SM).expect("sm column family");
            let mut wb = rocksdb::WriteBatch::default();
            wb.put_cf(cf, META_APPLIED, encode(&meta.last_log_id));
            wb.put_cf(cf, META_MEMBERSHIP, encode(&meta.last_membership));
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(wb, &wo)?;
            db.flush_cf(cf)?;
        }
        let db = self.state.swap_in(staged)?;
        let cp = self.files.scratch("installed");
        let info = checkpoint::take(&db, &cp).map_err(|e| SnapshotError::Io(std::io::Error::other(e)))?;
        self.publish(meta.clone(), &cp, info.bytes(), false)?;
        Ok(())
    }

    /// A snapshot of the old format (a key/value dump, received from a node
    /// of data version 3 or before) loaded into a new state database
    /// directory beside the live one.
    fn stage_legacy(&self, file: std::fs::File, received: Option<PathBuf>) -> Result<PathBuf, SnapshotError> {
        let path = self.received_file(file, received)?;
        let dir = self
            .state
            .dir()
            .ok_or(SnapshotError::Corrupt("no state directory"))?;
        let staged = state_db::incoming(dir, "legacy");
        let result = (|| {
            let db = open_state_at(&staged)?;
            load_file(&db, &path, &self.files.scratch_file("install", "sst"))?;
            db.flush_cf(db.cf_handle(CF_SM).expect("sm column family"))?;
            Ok(())
        })();
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(()) => Ok(staged),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staged);
                Err(e)
            }
        }
    }

    /// Copies the open files of a checkpoint beside the live state, checked
    /// like a transfer.
    fn stage_files(&self, files: Vec<CheckpointFile>) -> Result<PathBuf, CheckpointError> {
        use sha2::Digest;
        use std::io::Read;
        let mut rx = self.checkpoint_receiver(files.iter().map(|f| (f.name.clone(), f.len)).collect())?;
        let mut buf = vec![0u8; 1 << 20];
        for (i, mut f) in files.into_iter().enumerate() {
            let mut sum = sha2::Sha256::new();
            let mut left = f.len;
            loop {
                let n = left.min(buf.len() as u64) as usize;
                f.file.read_exact(&mut buf[..n])?;
                sum.update(&buf[..n]);
                left -= n as u64;
                if left == 0 {
                    rx.chunk(i, &buf[..n], Some(sum.finalize().as_slice()))?;
                    break;
                }
                rx.chunk(i, &buf[..n], None)?;
            }
        }
        rx.finish()
    }

    /// The synced file holding the snapshot data `file` was given for: the
    /// file it was received into, or, when the caller handed over another
    /// file, a copy of it.
    fn received_file(&self, mut file: std::fs::File, received: Option<PathBuf>) -> std::io::Result<PathBuf> {
        use std::io::Seek;
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
        let path = self.files.scratch_file("incoming", "tmp");
        let mut copy = std::fs::File::create(&path)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        std::io::copy(&mut file, &mut copy)?;
        copy.sync_all()?;
        Ok(path)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        let (meta, files) = tokio::task::spawn_blocking(move || this.build_checkpoint_snapshot())
            .await
            .map_err(snap_err)??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::Checkpoint(files)),
        })
    }
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

    /// Only for a snapshot of the old format, which a leader of an older
    /// build sends in openraft's chunks; this build's leaders send a
    /// checkpoint file by file (`raft::network`).
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let path = self.files.scratch_file("incoming", "tmp");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(snap_err)?;
        // A newer transfer supersedes an unfinished one.
        if let Some(old) = self.receiving.lock().expect("snapshot lock").replace(path) {
            let _ = std::fs::remove_file(old);
        }
        Ok(Box::new(SnapshotData::Legacy(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let err = |e: SnapshotError| io_err(subject.clone(), ErrorVerb::Write, e);
        let this = self.clone();
        let received = self.receiving.lock().expect("snapshot lock").take();
        let staged = match *snapshot {
            SnapshotData::Legacy(mut file) => {
                file.flush().await.map_err(|e| err(e.into()))?;
                let file = file.into_std().await;
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.stage_legacy(file, received))
                    .await
                    .map_err(snap_err)?
                    .map_err(err)?
            }
            other => {
                if let Some(unused) = received {
                    let _ = std::fs::remove_file(unused);
                }
                match other {
                    SnapshotData::Received(dir) => dir,
                    // Handed over in this process (openraft's storage suite):
                    // copied beside the live state as a transfer would.
                    SnapshotData::Checkpoint(files) => {
                        let this = self.clone();
                        tokio::task::spawn_blocking(move || this.stage_files(files))
                            .await
                            .map_err(snap_err)?
                            .map_err(|e| err(SnapshotError::Io(std::io::Error::other(e))))?
                    }
                    SnapshotData::Legacy(_) => unreachable!("handled above"),
                }
            }
        };
        let meta2 = meta.clone();
        let done = tokio::task::spawn_blocking(move || {
            let done = this.swap_in_snapshot(&meta2, &staged);
            if done.is_err() {
                let _ = std::fs::remove_dir_all(&staged);
            }
            done
        })
        .await
        .map_err(snap_err)?;
        done.map_err(err)?;
        let applied = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.applied_tx.send_replace(applied);
        self.audit_changed();
        metrics::counter!("mailvault_snapshots_installed_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // Opened under the lock, so a snapshot published meanwhile cannot
        // remove the files first.
        let cur = self.current.lock().expect("snapshot lock");
        let Some(c) = cur.as_ref() else {
            return Ok(None);
        };
        let files = checkpoint::open_files(&c.dir).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(c.meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        Ok(Some(Snapshot {
            meta: c.meta.clone(),
            snapshot: Box::new(SnapshotData::Checkpoint(files)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_keyring;
    use crate::state::snapshot_data::CheckpointFile;
    use std::io::Read;

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

    /// A checkpoint-like directory holding one file with `tag`.
    fn staged(sm: &StateMachine, tag: &[u8]) -> PathBuf {
        let p = sm.files.scratch("build");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("CURRENT"), tag).unwrap();
        p
    }

    fn read_all(files: &mut [CheckpointFile]) -> Vec<u8> {
        let mut got = Vec::new();
        for f in files {
            f.file.read_to_end(&mut got).unwrap();
        }
        got
    }

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn open_sm(data_dir: &std::path::Path) -> StateMachine {
        let stores = crate::store::open(data_dir).unwrap();
        super::super::data_version::upgrade(&stores.state.get(), test_keyring()).unwrap();
        StateMachine::open(stores.state, test_keyring().clone(), &data_dir.join("snapshots")).unwrap()
    }

    fn pairs(db: &Db) -> Vec<(Vec<u8>, Vec<u8>)> {
        db.iterator_cf(db.cf_handle(CF_SM).unwrap(), rocksdb::IteratorMode::Start)
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// What a power cut leaves of the live state database: its files as they
    /// are on disk now, with the database still open (nothing flushed on close).
    fn crash_copy(sm: &StateMachine, to: &std::path::Path) -> Option<u64> {
        let (_, from) = state_db::live_generation(sm.state.dir().unwrap())
            .unwrap()
            .unwrap();
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "LOCK" {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
        let db = open_state_at(to).unwrap();
        read_applied(&db).unwrap().0.map(|l| l.index)
    }

    #[tokio::test]
    async fn a_crash_leaves_the_state_of_the_last_snapshot_with_its_own_applied_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_sm(&dir.path().join("data"));
        sm.apply((1..=3).map(blank).collect::<Vec<_>>()).await.unwrap();
        // Applied writes bypass the WAL: before any snapshot, a crash loses
        // them all, applied index included (the log applies them again).
        assert_eq!(crash_copy(&sm, &dir.path().join("c1")), None);
        // A snapshot makes exactly the state it describes durable.
        let snap = sm.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(3));
        sm.apply((4..=6).map(blank).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(crash_copy(&sm, &dir.path().join("c2")), Some(3));
        // A clean shutdown keeps everything.
        crate::store::flush_state(&sm.state).unwrap();
        drop(snap);
        drop(sm);
        let sm = open_sm(&dir.path().join("data"));
        assert_eq!(sm.read_applied().unwrap().0.map(|l| l.index), Some(6));
    }

    #[test]
    fn a_build_never_replaces_a_newer_snapshot_and_the_current_one_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_sm(&dir.path().join("data"));
        // A snapshot at index 10 is installed while one at index 5 is being built.
        let (m, _) = sm.publish(meta(10), &staged(&sm, b"ten"), 3, false).unwrap();
        assert_eq!(m, meta(10));
        let late = staged(&sm, b"five");
        let (m, mut f) = sm.publish(meta(5), &late, 4, true).unwrap();
        assert_eq!(m, meta(10), "the newer snapshot stays current");
        assert_eq!(read_all(&mut f), b"ten");
        assert!(!late.exists(), "the stale build is removed");
        // Files opened for sending stay readable after a newer snapshot replaces them.
        let (_, mut sending) = sm.publish(meta(11), &staged(&sm, b"eleven"), 6, true).unwrap();
        sm.publish(meta(12), &staged(&sm, b"twelve"), 6, true).unwrap();
        assert_eq!(read_all(&mut sending), b"eleven");
        let current = sm.current.lock().unwrap().clone().unwrap();
        assert_eq!(current.meta, meta(12));
        assert_eq!(std::fs::read(current.dir.join("CURRENT")).unwrap(), b"twelve");
        let snaps: Vec<_> = std::fs::read_dir(dir.path().join("data/snapshots"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_dir())
            .collect();
        assert_eq!(snaps.len(), 1, "older checkpoints are removed");
    }

    /// Sends `files` to `to` the way the peer transfer does, in chunks of
    /// `chunk` bytes, each file closed by its SHA-256 (`damage` flips a byte
    /// of the first chunk of that file, after its checksum was taken).
    fn transfer(
        files: &mut [CheckpointFile],
        to: &StateMachine,
        chunk: usize,
        damage: Option<usize>,
    ) -> Result<PathBuf, CheckpointError> {
        use sha2::Digest;
        let mut rx = to.checkpoint_receiver(files.iter().map(|f| (f.name.clone(), f.len)).collect())?;
        for (i, f) in files.iter_mut().enumerate() {
            let mut data = Vec::new();
            f.file.read_to_end(&mut data).unwrap();
            let sum = sha2::Sha256::digest(&data);
            if damage == Some(i) && !data.is_empty() {
                data[0] ^= 1;
            }
            let parts: Vec<&[u8]> = if data.is_empty() {
                vec![&[]]
            } else {
                data.chunks(chunk).collect()
            };
            for (j, part) in parts.iter().enumerate() {
                let last = j + 1 == parts.len();
                rx.chunk(i, part, last.then_some(sum.as_slice()))?;
            }
        }
        rx.finish()
    }

    #[tokio::test]
    async fn a_snapshot_is_a_checkpoint_that_shares_the_live_files_and_installing_one_swaps_the_state_whole()
    {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut a = open_sm(&dir.path().join("a"));
        let mut b = open_sm(&dir.path().join("b"));
        a.apply((1..=2).map(blank).collect::<Vec<_>>()).await.unwrap();
        let members = std::collections::BTreeMap::from([(1, crate::state::types::Member::default())]);
        a.apply([Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 3),
            payload: EntryPayload::Membership(openraft::Membership::new(vec![[1].into()], members)),
        }])
        .await
        .unwrap();
        // Large values live in blob files; the checkpoint links them.
        let db = a.state.get();
        let sm_cf = db.cf_handle(CF_SM).unwrap();
        for i in 0..20u32 {
            db.put_cf(sm_cf, format!("big/{i:03}"), vec![i as u8; 64 << 10])
                .unwrap();
        }
        drop(db);
        b.apply((1..=2).map(blank).collect::<Vec<_>>()).await.unwrap();
        let only_on_b = b.state.get();
        only_on_b
            .put_cf(only_on_b.cf_handle(CF_SM).unwrap(), b"only on b", b"x")
            .unwrap();
        drop(only_on_b);
        let snap = a.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(3));
        let cur = a.current.lock().unwrap().clone().unwrap();
        let (_, live) = state_db::live_generation(a.state.dir().unwrap())
            .unwrap()
            .unwrap();
        let linked: Vec<_> = checkpoint::list_files(&cur.dir)
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n.ends_with(".blob") || n.ends_with(".sst"))
            .collect();
        assert!(linked.iter().any(|(n, _)| n.ends_with(".blob")), "{linked:?}");
        for (name, _) in &linked {
            let (s, l) = (cur.dir.join(name), live.join(name));
            assert_eq!(
                std::fs::metadata(&s).unwrap().ino(),
                std::fs::metadata(&l).unwrap().ino(),
                "{name} is a hard link, not a copy"
            );
        }
        let SnapshotData::Checkpoint(mut files) = *snap.snapshot else {
            panic!("a checkpoint")
        };
        // A damaged file is refused, and nothing is left behind.
        let last = files.len() - 1;
        let e = transfer(&mut files, &b, 1000, Some(last)).unwrap_err();
        assert!(e.to_string().contains("does not match its checksum"), "{e}");
        let leftovers = std::fs::read_dir(b.state.dir().unwrap()).unwrap().count();
        assert_eq!(leftovers, 2, "only CURRENT and the live generation");
        let Some(Snapshot { meta: m, snapshot }) = a.get_current_snapshot().await.unwrap() else {
            panic!("a current snapshot")
        };
        let SnapshotData::Checkpoint(mut files) = *snapshot else {
            panic!("a checkpoint")
        };
        let received = transfer(&mut files, &b, 7777, None).unwrap();
        b.install_snapshot(&m, Box::new(SnapshotData::Received(received)))
            .await
            .unwrap();
        assert!(
            pairs(&a.state.get()) == pairs(&b.state.get()),
            "b holds exactly a's state"
        );
        assert_eq!(*b.applied_index().borrow(), 3);
        assert_eq!(
            b.snapshot_extent().index,
            3,
            "the installed snapshot is b's current one"
        );
        // b's old generation is gone once nobody reads it; b reopens on the new one.
        b.state.collect();
        let gens = std::fs::read_dir(b.state.dir().unwrap()).unwrap().count();
        assert_eq!(gens, 2, "CURRENT and the new generation");
        let want = pairs(&a.state.get());
        drop(b);
        let b = open_sm(&dir.path().join("b"));
        assert!(pairs(&b.state.get()) == want, "b reopened holds a's state");
    }
}
