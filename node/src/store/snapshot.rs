//! Where a node keeps its snapshots ([`SnapshotFiles`]: checkpoint
//! directories, see `super::checkpoint`), and the snapshot format of data
//! version 3 and before, which a node still receives from a leader of an
//! older build during a rolling upgrade.
//!
//! That old format: `MVSNAP01`, then for each pair `len(key) be32, key,
//! len(value) be32, value`, in key order, then a 32-byte SHA-256 of
//! everything before it. Frozen. Loading one writes its pairs into an SST
//! file that also carries a range deletion of the whole column family, and
//! ingests it into a new state database.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rocksdb::{IngestExternalFileOptions, Options, SstFileWriter};
use sha2::{Digest, Sha256};

use super::data_version::DataVersionError;
use super::db::{Db, CF_SM};
use crate::state::codec::{decode, encode};
use crate::state::keys::META_DATA_VERSION;
use crate::state::types::SnapshotMeta;
use crate::state::version::{self, DATA_VERSION};

const MAGIC: &[u8; 8] = b"MVSNAP01";
/// Where versions before 2026-11-24 kept the current snapshot's data.
const LEGACY_DATA: &str = "current.data";
/// Where data version 3 and before kept the current snapshot's metadata.
const LEGACY_META: &str = "current.meta";
const SUM_LEN: u64 = 32;
/// Every key of the state machine sorts below this (keys are short and
/// never begin with 0xff bytes throughout).
const END_OF_KEYS: [u8; 64] = [0xff; 64];

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
    /// The snapshot's data is of a version this build cannot read.
    #[error("snapshot refused: {0}")]
    Version(#[from] DataVersionError),
}

/// A writer that hashes what passes through it.
#[cfg(test)]
struct Hashing<W> {
    inner: W,
    sum: Sha256,
}

#[cfg(test)]
impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Dumps the state machine (in the old format, as a node of data version 3
/// sent it) from a consistent RocksDB snapshot into a new
/// file at `path`, synced. Returns its length, and the values the keys in
/// `read` had in that same RocksDB snapshot (so the metadata describing the
/// dump — the applied log id — is exactly that of the dumped state, though
/// entries keep being applied meanwhile). Before it reads, the dumped state
/// is flushed to SST files: state-machine writes bypass the WAL, so this is
/// what makes it durable before the log entries it holds can be purged.
#[cfg(test)]
pub fn dump_to(db: &Db, path: &Path, read: &[&[u8]]) -> Result<(u64, Vec<Option<Vec<u8>>>), SnapshotError> {
    let cf = db.cf_handle(CF_SM).expect("sm column family");
    let snap = db.snapshot();
    // Everything written before the flush starts is on disk after it,
    // which includes everything this snapshot sees.
    db.flush_cf(cf)?;
    let values = read
        .iter()
        .map(|k| snap.get_cf(cf, k))
        .collect::<Result<Vec<_>, _>>()?;
    let file = File::create(path)?;
    let mut out = Hashing {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        sum: Sha256::new(),
    };
    out.write_all(MAGIC)?;
    for item in snap.iterator_cf(cf, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        out.write_all(&(k.len() as u32).to_be_bytes())?;
        out.write_all(&k)?;
        out.write_all(&(v.len() as u32).to_be_bytes())?;
        out.write_all(&v)?;
    }
    let sum = out.sum.finalize();
    let mut inner = out.inner;
    inner.write_all(&sum)?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((file.metadata()?.len(), values))
}

/// Checks a snapshot file's header and checksum, reading it once. Returns
/// the length of its pairs section.
pub fn verify_file(path: &Path) -> Result<u64, SnapshotError> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len < MAGIC.len() as u64 + SUM_LEN {
        return Err(SnapshotError::Corrupt("truncated"));
    }
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(SnapshotError::Corrupt("bad header"));
    }
    let mut sum = Sha256::new();
    sum.update(magic);
    let body = len - SUM_LEN - MAGIC.len() as u64;
    std::io::copy(&mut (&mut f).take(body), &mut HashSink(&mut sum))?;
    let mut stored = [0u8; 32];
    f.read_exact(&mut stored)?;
    if sum.finalize().as_slice() != stored {
        return Err(SnapshotError::Corrupt("checksum mismatch"));
    }
    Ok(body)
}

struct HashSink<'a>(&'a mut Sha256);

impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads one length-prefixed field, or `None` at a clean end.
fn read_field(r: &mut impl Read, buf: &mut Vec<u8>, first: bool) -> Result<Option<()>, SnapshotError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if first && e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(SnapshotError::Corrupt("truncated"))
        }
        Err(e) => return Err(e.into()),
    }
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::Corrupt("truncated"),
        _ => e.into(),
    })?;
    Ok(Some(()))
}

/// Replaces the whole state machine with the content of the snapshot file
/// at `path`, atomically and durably. `work` is a scratch file path for the
/// SST that is built and ingested. Data of a newer data version is refused
/// before anything changes; the caller upgrades older data after the install.
pub fn load_file(db: &Db, path: &Path, work: &Path) -> Result<(), SnapshotError> {
    let body = verify_file(path)?;
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(MAGIC.len() as u64))?;
    let mut pairs = BufReader::with_capacity(1 << 20, f.take(body));
    let opts = Options::default();
    let mut sst = SstFileWriter::create(&opts);
    sst.open(work)?;
    // Covers every key older than the file itself; the pairs in the file
    // are not covered by its own range deletion.
    sst.delete_range([0u8].as_slice(), END_OF_KEYS.as_slice())?;
    let (mut k, mut v) = (Vec::new(), Vec::new());
    while read_field(&mut pairs, &mut k, true)?.is_some() {
        read_field(&mut pairs, &mut v, false)?;
        if k == META_DATA_VERSION {
            match version::decode(&v) {
                Some(found) if found > DATA_VERSION => {
                    return Err(DataVersionError::Newer {
                        found,
                        supported: DATA_VERSION,
                    }
                    .into())
                }
                Some(_) => {}
                None => return Err(DataVersionError::Unreadable.into()),
            }
        }
        sst.put(&k, &v)?;
    }
    sst.finish()?;
    let cf = db.cf_handle(CF_SM).expect("sm column family");
    let mut io = IngestExternalFileOptions::default();
    io.set_move_files(true);
    db.ingest_external_file_cf_opts(cf, &io, vec![work])?;
    Ok(())
}

/// Where the current snapshot's metadata is kept (naming its directory).
const CURRENT_META: &str = "current.checkpoint";

/// The snapshots of a node, under one directory: `current.checkpoint` names
/// the current snapshot, whose checkpoint is the directory `<id>/`;
/// checkpoints being built are `incoming-*` until published. (Data version 3
/// and before kept `current.meta` and a dump `<id>.snap`; they are removed.)
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

fn safe_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl SnapshotFiles {
    /// Snapshots under `dir`, created if missing; leftovers of an interrupted
    /// build or transfer, and snapshots of the old format, are removed.
    pub fn new(dir: &Path) -> std::io::Result<SnapshotFiles> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("incoming-") || name.starts_with("build-") || name.starts_with("installed-") {
                remove_any(&path)?;
            } else if path
                .extension()
                .is_some_and(|e| e == "tmp" || e == "sst" || e == "snap")
                || name == LEGACY_META
                || name == LEGACY_DATA
            {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(SnapshotFiles {
            dir: dir.to_path_buf(),
        })
    }

    fn nanos() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    }

    /// A fresh directory path for a checkpoint being built (`what`: build, installed).
    pub fn scratch(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}-{}", Self::nanos()))
    }

    /// A fresh scratch file path with this prefix and extension.
    pub fn scratch_file(&self, prefix: &str, ext: &str) -> PathBuf {
        self.dir
            .join(format!("incoming-{prefix}-{}.{ext}", Self::nanos()))
    }

    /// Where the checkpoint of the snapshot with this id lives.
    pub fn dir_for(&self, meta: &SnapshotMeta) -> PathBuf {
        self.dir.join(safe_name(&meta.snapshot_id))
    }

    /// Makes the synced checkpoint in `staged` the current snapshot,
    /// described by `meta`: the directory first, then the metadata that
    /// names it, then older snapshots are removed (their hard links
    /// dropped; a transfer that opened their files keeps reading them).
    /// Returns its directory.
    pub fn commit(&self, meta: &SnapshotMeta, staged: &Path) -> std::io::Result<PathBuf> {
        let keep = self.dir_for(meta);
        if keep.exists() {
            std::fs::remove_dir_all(&keep)?;
        }
        std::fs::rename(staged, &keep)?;
        let tmp = self.scratch_file("meta", "tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&encode(meta))?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(CURRENT_META))?;
        File::open(&self.dir)?.sync_all()?;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let building =
                name.starts_with("incoming-") || name.starts_with("build-") || name.starts_with("installed-");
            if entry.file_type()?.is_dir() && path != keep && !building {
                std::fs::remove_dir_all(&path)?;
            }
        }
        Ok(keep)
    }

    /// The current snapshot's metadata and checkpoint directory, if any.
    pub fn read(&self) -> Result<Option<(SnapshotMeta, PathBuf)>, SnapshotError> {
        let meta = match std::fs::read(self.dir.join(CURRENT_META)) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let meta: SnapshotMeta = decode(&meta).map_err(|_| SnapshotError::Corrupt("bad metadata"))?;
        let dir = self.dir_for(&meta);
        if !dir.join("CURRENT").is_file() {
            // Named but gone: as if there were none (a new one is built).
            return Ok(None);
        }
        Ok(Some((meta, dir)))
    }
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_db;
    use rocksdb::IteratorMode;

    fn put(db: &Db, k: &[u8], v: &[u8]) {
        db.put_cf(db.cf_handle(CF_SM).unwrap(), k, v).unwrap();
    }

    fn all(db: &Db) -> Vec<(Vec<u8>, Vec<u8>)> {
        db.iterator_cf(db.cf_handle(CF_SM).unwrap(), IteratorMode::Start)
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    #[test]
    fn a_dump_loaded_elsewhere_replaces_everything_there() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_db(&dir.path().join("a")).unwrap();
        let b = open_db(&dir.path().join("b")).unwrap();
        for i in 0..1000u32 {
            put(&a, format!("m/{i:05}").as_bytes(), &vec![i as u8; 300]);
        }
        put(&b, b"m/00001", b"stale");
        put(&b, b"zzz", b"only on b");
        put(&b, b"\x01", b"low");
        let file = dir.path().join("snap");
        let (len, _) = dump_to(&a, &file, &[]).unwrap();
        assert_eq!(len, std::fs::metadata(&file).unwrap().len());
        load_file(&b, &file, &dir.path().join("work.sst")).unwrap();
        assert_eq!(all(&a), all(&b));
        // Later writes land on top, and a reopened database keeps it.
        put(&b, b"zzz", b"new");
        drop(b);
        let b = open_db(&dir.path().join("b")).unwrap();
        let got = all(&b);
        assert_eq!(got.len(), 1001);
        assert_eq!(got.last().unwrap(), &(b"zzz".to_vec(), b"new".to_vec()));
    }

    #[test]
    fn snapshots_of_the_old_format_and_leftovers_are_removed_and_none_is_current() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        put(&db, b"k", b"v");
        let snaps = dir.path().join("snapshots");
        std::fs::create_dir_all(snaps.join("build-1")).unwrap();
        dump_to(&db, &snaps.join("1-2-3-77.snap"), &[]).unwrap();
        dump_to(&db, &snaps.join(LEGACY_DATA), &[]).unwrap();
        let meta = SnapshotMeta {
            snapshot_id: "1-2-3-77".into(),
            ..Default::default()
        };
        std::fs::write(snaps.join(LEGACY_META), encode(&meta)).unwrap();
        std::fs::write(snaps.join("incoming-x.tmp"), b"half").unwrap();
        let files = SnapshotFiles::new(&snaps).unwrap();
        assert!(files.read().unwrap().is_none());
        assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
    }

    #[test]
    fn a_snapshot_of_a_newer_data_version_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_db(&dir.path().join("a")).unwrap();
        let b = open_db(&dir.path().join("b")).unwrap();
        put(&a, b"k", b"v");
        put(&b, b"keep", b"me");
        let file = dir.path().join("snap");
        let work = dir.path().join("work.sst");
        // A snapshot carries its data's version, as the state machine does.
        put(&a, META_DATA_VERSION, &version::encode(DATA_VERSION));
        dump_to(&a, &file, &[]).unwrap();
        load_file(&b, &file, &work).unwrap();
        assert_eq!(all(&a), all(&b));
        put(&b, b"keep", b"me");
        put(&a, META_DATA_VERSION, &version::encode(DATA_VERSION + 1));
        dump_to(&a, &file, &[]).unwrap();
        let e = load_file(&b, &file, &work).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Version(DataVersionError::Newer { found, .. }) if found == DATA_VERSION + 1),
            "{e}"
        );
        let sm = b.cf_handle(CF_SM).unwrap();
        assert_eq!(b.get_cf(sm, b"keep").unwrap().as_deref(), Some(&b"me"[..]));
    }

    #[test]
    fn an_empty_dump_empties_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_db(&dir.path().join("a")).unwrap();
        let b = open_db(&dir.path().join("b")).unwrap();
        put(&b, b"k", b"v");
        let file = dir.path().join("snap");
        dump_to(&a, &file, &[]).unwrap();
        load_file(&b, &file, &dir.path().join("work.sst")).unwrap();
        assert!(all(&b).is_empty());
    }

    #[test]
    fn corrupt_or_truncated_files_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_db(&dir.path().join("a")).unwrap();
        let b = open_db(&dir.path().join("b")).unwrap();
        put(&a, b"k1", b"v1");
        put(&a, b"k2", b"v2");
        put(&b, b"keep", b"me");
        let file = dir.path().join("snap");
        dump_to(&a, &file, &[]).unwrap();
        let good = std::fs::read(&file).unwrap();
        let work = dir.path().join("work.sst");
        for (i, bad) in [
            {
                let mut d = good.clone();
                d[12] ^= 1;
                d
            },
            good[..good.len() - 1].to_vec(),
            good[..20].to_vec(),
            b"NOTASNAP".repeat(6),
        ]
        .into_iter()
        .enumerate()
        {
            std::fs::write(&file, &bad).unwrap();
            assert!(
                matches!(load_file(&b, &file, &work), Err(SnapshotError::Corrupt(_))),
                "case {i}"
            );
            assert_eq!(all(&b), vec![(b"keep".to_vec(), b"me".to_vec())]);
        }
    }
}
