//! The state machine's own RocksDB (from data version 4 on), apart from the
//! Raft log's: one directory per **generation** under `data_dir/state`, and
//! `state/CURRENT` naming the live one.
//!
//! A snapshot is a checkpoint of the live generation (hard links, so taking
//! one costs nothing in the mail held); installing a received snapshot makes
//! its directory the next generation and swaps `CURRENT` over to it in one
//! rename, so a crash leaves the old state or the new, never a mix. Readers
//! take the live generation per read ([`StateDb::get`]); a retired
//! generation's directory is removed once its last reader has let go.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use super::db::{separate_large_values, Db, CF_SM};

/// The file naming the live generation.
const CURRENT: &str = "CURRENT";
/// Directories being written (a received snapshot, a migration) start so.
const INCOMING: &str = "incoming-";

/// The live state-machine database, swappable.
#[derive(Clone)]
pub struct StateDb {
    inner: Arc<Inner>,
}

struct Inner {
    /// `data_dir/state`, or `None` for a database opened elsewhere (tests,
    /// offline tools), which is never swapped.
    dir: Option<PathBuf>,
    live: RwLock<(u64, Db)>,
    /// Generations replaced by a newer one, removed once closed.
    retired: Mutex<Vec<(Weak<DB>, PathBuf)>>,
}

/// Options of a state-machine database.
fn options() -> (Options, Vec<ColumnFamilyDescriptor>) {
    // Applies bypass the WAL (the Raft log holds them until a snapshot has
    // flushed them); the few writes that use it are synced.
    let opts = super::db::base_options();
    let mut sm = Options::default();
    sm.set_compression_type(rocksdb::DBCompressionType::None);
    separate_large_values(&mut sm);
    (opts, vec![ColumnFamilyDescriptor::new(CF_SM, sm)])
}

/// Opens (or creates) a state-machine database in `dir`, which may hold
/// other column families too (a checkpoint of a data directory of data
/// version 3, being migrated): they are opened with default options.
pub fn open_state_at(dir: &Path) -> Result<Db, rocksdb::Error> {
    Ok(Arc::new(open_state_owned(dir)?))
}

/// [`open_state_at`], owned (to drop column families).
pub fn open_state_owned(dir: &Path) -> Result<DB, rocksdb::Error> {
    let (opts, mut cfs) = options();
    if let Ok(names) = DB::list_cf(&opts, dir) {
        for name in names {
            if name != CF_SM && name != "default" {
                let mut o = Options::default();
                o.set_compression_type(rocksdb::DBCompressionType::None);
                if name != super::db::CF_META {
                    separate_large_values(&mut o);
                }
                cfs.push(ColumnFamilyDescriptor::new(name, o));
            }
        }
    }
    DB::open_cf_descriptors(&opts, dir, cfs)
}

/// Opens a state-machine database read-only (offline tools).
pub fn open_state_read_only_at(dir: &Path) -> Result<Db, rocksdb::Error> {
    let (opts, _) = options();
    Ok(Arc::new(DB::open_cf_for_read_only(&opts, dir, [CF_SM], false)?))
}

fn generation_name(n: u64) -> String {
    format!("{n:08}")
}

/// Writes `name` into `dir/CURRENT` atomically and durably.
fn write_current(dir: &Path, n: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join("CURRENT.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(generation_name(n).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(CURRENT))?;
    sync_dir(dir)
}

/// Makes a directory's entries (renames, new files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The live generation named by `dir/CURRENT`, if there is one.
pub fn live_generation(dir: &Path) -> std::io::Result<Option<(u64, PathBuf)>> {
    match std::fs::read_to_string(dir.join(CURRENT)) {
        Ok(s) => {
            let n: u64 = s.trim().parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "state/CURRENT names no generation",
                )
            })?;
            Ok(Some((n, dir.join(generation_name(n)))))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A fresh directory name for something being written under `dir`.
pub fn incoming(dir: &Path, what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    dir.join(format!("{INCOMING}{what}-{nanos}"))
}

impl StateDb {
    /// Opens the live generation under `dir` (`data_dir/state`), which
    /// must exist (see `store::open`), removing every other directory there
    /// (retired generations, unfinished transfers).
    pub fn open(dir: &Path) -> std::io::Result<StateDb> {
        let (n, path) = live_generation(dir)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "state/CURRENT is missing"))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let p = entry.path();
            if entry.file_type()?.is_dir() && p != path {
                std::fs::remove_dir_all(&p)?;
            }
        }
        let db = open_state_at(&path).map_err(std::io::Error::other)?;
        Ok(StateDb {
            inner: Arc::new(Inner {
                dir: Some(dir.to_path_buf()),
                live: RwLock::new((n, db)),
                retired: Mutex::new(Vec::new()),
            }),
        })
    }

    /// A state database that is never swapped (tests, offline tools).
    pub fn fixed(db: Db) -> StateDb {
        StateDb {
            inner: Arc::new(Inner {
                dir: None,
                live: RwLock::new((0, db)),
                retired: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The live database. Hold it for one read (or apply): a swap in the
    /// meantime leaves it readable, as it was.
    pub fn get(&self) -> Db {
        self.inner.live.read().expect("state lock").1.clone()
    }

    /// Where generations live (`None` for a fixed database).
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// Makes the complete, synced state database in `staged` (a directory
    /// under [`Self::dir`]) the live one: renamed to the next generation,
    /// then `CURRENT` swapped over to it (the commit point). The old
    /// generation is removed once no reader holds it.
    pub fn swap_in(&self, staged: &Path) -> std::io::Result<Db> {
        let dir = self
            .inner
            .dir
            .as_ref()
            .ok_or_else(|| std::io::Error::other("this state database is not swappable"))?;
        let mut live = self.inner.live.write().expect("state lock");
        let next = live.0 + 1;
        let path = dir.join(generation_name(next));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::rename(staged, &path)?;
        sync_dir(dir)?;
        let db = open_state_at(&path).map_err(std::io::Error::other)?;
        write_current(dir, next)?;
        let old = std::mem::replace(&mut *live, (next, db.clone()));
        drop(live);
        self.retire(old);
        Ok(db)
    }

    fn retire(&self, (n, db): (u64, Db)) {
        let Some(dir) = &self.inner.dir else { return };
        let weak = Arc::downgrade(&db);
        drop(db);
        self.inner
            .retired
            .lock()
            .expect("state lock")
            .push((weak, dir.join(generation_name(n))));
        self.collect();
    }

    /// Removes the directories of retired generations nobody reads any more.
    pub fn collect(&self) {
        let mut retired = self.inner.retired.lock().expect("state lock");
        retired.retain(|(db, path)| {
            if db.strong_count() > 0 {
                return true;
            }
            if let Err(e) = std::fs::remove_dir_all(path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot remove a retired state generation");
            }
            false
        });
    }
}

/// Creates a new, empty state database as the first generation under `dir`.
pub fn create_first(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(generation_name(1));
    if path.exists() {
        std::fs::remove_dir_all(&path)?;
    }
    drop(open_state_at(&path).map_err(std::io::Error::other)?);
    sync_dir(dir)?;
    write_current(dir, 1)
}

/// Makes the complete state database in `staged` the first generation
/// under `dir` (a migrated data directory).
pub fn adopt_first(dir: &Path, staged: &Path) -> std::io::Result<()> {
    let path = dir.join(generation_name(1));
    if path.exists() {
        std::fs::remove_dir_all(&path)?;
    }
    std::fs::rename(staged, &path)?;
    sync_dir(dir)?;
    write_current(dir, 1)
}
