//! Snapshot data: a dump of the state-machine column family, and its files on disk.
//!
//! Data format: `MVSNAP01`, then for each pair `len(key) be32, key, len(value) be32, value`,
//! then a 32-byte SHA-256 of everything before it. Frozen format: do not change
//! without a version bump.

use std::io::Write;
use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};
use sha2::{Digest, Sha256};

use super::db::{Db, CF_SM};
use crate::model::{decode, encode};
use crate::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"MVSNAP01";

/// Why snapshot data was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Bad magic, truncated, or checksum mismatch.
    #[error("snapshot data is corrupt: {0}")]
    Corrupt(&'static str),
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
    /// File I/O failed.
    #[error("snapshot file error: {0}")]
    Io(#[from] std::io::Error),
}

/// Dumps the state machine from a consistent RocksDB snapshot.
pub fn dump(db: &Db) -> Result<Vec<u8>, SnapshotError> {
    let cf = db.cf_handle(CF_SM).expect("sm column family");
    let snap = db.snapshot();
    let mut out = MAGIC.to_vec();
    for item in snap.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = item?;
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(&k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(&v);
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], SnapshotError> {
    if data.len() < n {
        return Err(SnapshotError::Corrupt("truncated"));
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Ok(head)
}

fn take_len(data: &mut &[u8]) -> Result<usize, SnapshotError> {
    let b: [u8; 4] = take(data, 4)?.try_into().expect("4 bytes");
    Ok(u32::from_be_bytes(b) as usize)
}

/// Verifies snapshot data and returns its key/value pairs section.
fn verify(data: &[u8]) -> Result<&[u8], SnapshotError> {
    if data.len() < MAGIC.len() + 32 || &data[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::Corrupt("bad header"));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(SnapshotError::Corrupt("checksum mismatch"));
    }
    Ok(&body[MAGIC.len()..])
}

/// Replaces the whole state machine with the snapshot's content, durably.
pub fn load(db: &Db, data: &[u8]) -> Result<(), SnapshotError> {
    let mut pairs = verify(data)?;
    let cf = db.cf_handle(CF_SM).expect("sm column family");
    let mut wb = WriteBatch::default();
    wb.delete_range_cf(cf, [0u8].as_slice(), [0xffu8; 64].as_slice());
    while !pairs.is_empty() {
        let kl = take_len(&mut pairs)?;
        let k = take(&mut pairs, kl)?;
        let vl = take_len(&mut pairs)?;
        let v = take(&mut pairs, vl)?;
        wb.put_cf(cf, k, v);
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(wb, &wo)?;
    Ok(())
}

/// The snapshot files of a node: `<dir>/current.meta` and `<dir>/current.data`.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    /// Files under `dir`, created if missing.
    pub fn new(dir: &Path) -> std::io::Result<SnapshotFiles> {
        std::fs::create_dir_all(dir)?;
        Ok(SnapshotFiles {
            dir: dir.to_path_buf(),
        })
    }

    fn write_synced(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        Ok(())
    }

    /// Stores a snapshot durably, data first, then its metadata.
    pub fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> std::io::Result<()> {
        self.write_synced("current.data", data)?;
        self.write_synced("current.meta", &encode(meta))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The stored snapshot, if any and intact.
    pub fn read(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, SnapshotError> {
        let meta = match std::fs::read(self.dir.join("current.meta")) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let meta: SnapshotMeta = decode(&meta).map_err(|_| SnapshotError::Corrupt("bad metadata"))?;
        let data = std::fs::read(self.dir.join("current.data"))?;
        verify(&data)?;
        Ok(Some((meta, data)))
    }
}
