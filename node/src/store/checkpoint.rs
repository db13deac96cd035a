//! Checkpoints of the state machine: one mechanism for Raft snapshots and
//! backups. A checkpoint is a directory of hard links to the live state
//! database's immutable SST and blob files (plus a copy of its small
//! `MANIFEST`, `OPTIONS` and `CURRENT`), taken after the memtable is
//! flushed, so it costs the same whatever mail is held and rewrites nothing.
//! What it describes — applied log id, membership — is read from the
//! checkpoint itself, so it is exactly the state the files hold although
//! entries keep being applied meanwhile.
//!
//! A checkpoint is sent file by file ([`CheckpointReceiver`] on the other
//! side, checking each file's SHA-256), and a received one becomes the live
//! state database by a directory swap (`super::state_db`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rocksdb::checkpoint::Checkpoint;
use sha2::{Digest, Sha256};

use super::db::{Db, CF_SM};
use super::state_db::{open_state_read_only_at, sync_dir};
use crate::state::codec::decode;
use crate::state::keys::{META_APPLIED, META_MEMBERSHIP};
use crate::state::snapshot_data::{is_checkpoint_file_name, CheckpointFile};
use crate::state::types::{LogId, StoredMembership};

/// What a checkpoint holds.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    /// The last log id applied in it.
    pub applied: Option<LogId>,
    /// The membership in it.
    pub membership: StoredMembership,
    /// Its files: name and length.
    pub files: Vec<(String, u64)>,
}

impl CheckpointInfo {
    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, l)| l).sum()
    }
}

/// Why a checkpoint could not be taken, read or received.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
    /// A file operation failed.
    #[error("checkpoint file error: {0}")]
    Io(#[from] std::io::Error),
    /// Its metadata does not decode.
    #[error("the checkpoint's metadata does not decode")]
    Corrupt,
    /// A received checkpoint is not what was offered.
    #[error("refused checkpoint transfer: {0}")]
    Refused(String),
}

/// Files of a database directory that are not part of its data: the info
/// log RocksDB writes beside it and the lock of whoever opened it.
fn is_data_file(name: &str) -> bool {
    name != "LOCK" && name != "LOG" && !name.starts_with("LOG.old")
}

/// The data files of the checkpoint in `dir`, by name, with their lengths.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && is_data_file(&name) {
            files.push((name, entry.metadata()?.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// Takes a checkpoint of the state database `db` into `dir` (which must not
/// exist; its parent must, on the same file system), durably, and reads what
/// it holds from the checkpoint itself.
pub fn take(db: &Db, dir: &Path) -> Result<CheckpointInfo, CheckpointError> {
    // RocksDB flushes the memtable first (the state machine's writes bypass
    // the WAL): the state it holds is on disk before the log holding it can
    // be purged.
    Checkpoint::new(db)?.create_checkpoint(dir)?;
    for (name, _) in list_files(dir)? {
        File::open(dir.join(name))?.sync_all()?;
    }
    sync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    read_info(dir)
}

/// What the checkpoint in `dir` holds (opened read-only).
pub fn read_info(dir: &Path) -> Result<CheckpointInfo, CheckpointError> {
    let (applied, membership) = {
        let cp = open_state_read_only_at(dir)?;
        let sm = cp.cf_handle(CF_SM).expect("sm column family");
        let applied = match cp.get_cf(sm, META_APPLIED)? {
            Some(b) => decode(&b).map_err(|_| CheckpointError::Corrupt)?,
            None => None,
        };
        let membership = match cp.get_cf(sm, META_MEMBERSHIP)? {
            Some(b) => decode(&b).map_err(|_| CheckpointError::Corrupt)?,
            None => StoredMembership::default(),
        };
        (applied, membership)
    };
    Ok(CheckpointInfo {
        applied,
        membership,
        files: list_files(dir)?,
    })
}

/// Opens every data file of the checkpoint in `dir` for sending.
pub fn open_files(dir: &Path) -> std::io::Result<Vec<CheckpointFile>> {
    list_files(dir)?
        .into_iter()
        .map(|(name, len)| {
            let file = File::open(dir.join(&name))?;
            Ok(CheckpointFile { name, len, file })
        })
        .collect()
}

/// Receives a checkpoint's files into a directory, checking that they come
/// as offered and that each matches its SHA-256. The directory is removed
/// unless the transfer completes ([`Self::finish`]).
pub struct CheckpointReceiver {
    dir: PathBuf,
    files: Vec<(String, u64)>,
    /// The file being written: its index, the open file, bytes so far.
    current: Option<(usize, File, u64, Sha256)>,
    /// Files completed so far.
    done: usize,
    finished: bool,
}

impl CheckpointReceiver {
    /// A receiver of `files` into the new directory `dir`.
    pub fn new(dir: PathBuf, files: Vec<(String, u64)>) -> Result<CheckpointReceiver, CheckpointError> {
        let refused = |why: &str| Err(CheckpointError::Refused(why.into()));
        if files.is_empty() {
            return refused("no files offered");
        }
        let mut names = std::collections::HashSet::new();
        for (name, _) in &files {
            if !is_checkpoint_file_name(name) || !is_data_file(name) {
                return refused("a file name that is not a plain data file name");
            }
            if !names.insert(name.as_str()) {
                return refused("a file offered twice");
            }
        }
        if !files.iter().any(|(n, _)| n == "CURRENT") {
            return refused("no CURRENT file offered");
        }
        std::fs::create_dir(&dir)?;
        Ok(CheckpointReceiver {
            dir,
            files,
            current: None,
            done: 0,
            finished: false,
        })
    }

    /// Where the files go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a chunk of file `index` (files come in order, each whole
    /// before the next); `sha256` closes the file.
    pub fn chunk(&mut self, index: usize, data: &[u8], sha256: Option<&[u8]>) -> Result<(), CheckpointError> {
        let refused = |why: String| Err(CheckpointError::Refused(why));
        if index != self.done || index >= self.files.len() {
            return refused(format!("file {index} sent out of order"));
        }
        if self.current.is_none() {
            let f = File::create(self.dir.join(&self.files[index].0))?;
            self.current = Some((index, f, 0, Sha256::new()));
        }
        let (_, f, written, sum) = self.current.as_mut().expect("an open file");
        let expected = self.files[index].1;
        if *written + data.len() as u64 > expected {
            return refused(format!("file {index} is longer than offered"));
        }
        f.write_all(data)?;
        sum.update(data);
        *written += data.len() as u64;
        if let Some(claimed) = sha256 {
            let (_, f, written, sum) = self.current.take().expect("an open file");
            if written != expected {
                return refused(format!("file {index} is shorter than offered"));
            }
            if sum.finalize().as_slice() != claimed {
                return refused(format!("file {index} does not match its checksum"));
            }
            f.sync_all()?;
            self.done += 1;
        }
        Ok(())
    }

    /// Completes the transfer: every file received whole. Returns the
    /// directory, synced, which is the caller's from now on.
    pub fn finish(mut self) -> Result<PathBuf, CheckpointError> {
        if self.done != self.files.len() {
            return Err(CheckpointError::Refused(format!(
                "{} of {} files received",
                self.done,
                self.files.len()
            )));
        }
        sync_dir(&self.dir)?;
        self.finished = true;
        Ok(self.dir.clone())
    }
}

impl Drop for CheckpointReceiver {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
