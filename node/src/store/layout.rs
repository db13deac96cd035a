//! The data directory's layout: `db/` (the Raft log and vote), `state/` (the
//! state machine's generations, see [`super::state_db`]) and `snapshots/`.
//!
//! Up to data version 3 the state machine was a column family (`sm`) of the
//! log's database. Opening such a directory moves it out, without copying
//! mail: a RocksDB checkpoint of the old database (hard links) becomes the
//! first state generation, its other column families dropped; then the old
//! `sm` column family is emptied to a single marker, its data version 4,
//! which makes an older mailvault-node refuse the directory instead of
//! starting with an empty state. Each step is redone if a crash interrupts
//! it: the old state is not touched before the new generation is complete
//! and named by `state/CURRENT`.

use std::path::Path;

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{IteratorMode, WriteBatch, WriteOptions};

use super::db::{open_db, Db, CF_LOG, CF_META, CF_SM};
use super::state_db::{self, StateDb};
use crate::state::keys::{META_APPLIED, META_DATA_VERSION};
use crate::state::version::{self, UNVERSIONED};

/// The data version from which on the state machine has its own database.
pub const SPLIT_VERSION: u32 = 4;

/// Both databases of a data directory.
pub struct Stores {
    /// The Raft log and metadata (`data_dir/db`).
    pub log: Db,
    /// The state machine (`data_dir/state`).
    pub state: StateDb,
}

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
    /// A file operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The stored version is not a version.
    #[error("the stored data version is unreadable: the store is damaged")]
    Unreadable,
    /// The state was moved to `state/`, which is gone.
    #[error("this data directory's state machine was moved to state/ (data version 4), which is missing or names no state database: the data directory is damaged; re-seed this node")]
    StateMissing,
}

fn is_empty(db: &Db, cf: &str) -> bool {
    let cf = db.cf_handle(cf).expect("column family");
    db.iterator_cf(cf, IteratorMode::Start).next().is_none()
}

/// The version stamped in the log database's `sm` column family.
fn marker(db: &Db) -> Result<Option<u32>, LayoutError> {
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    match db.get_cf(sm, META_DATA_VERSION)? {
        Some(v) => version::decode(&v).map(Some).ok_or(LayoutError::Unreadable),
        None => Ok(None),
    }
}

/// Opens the databases of `data_dir`, moving a state machine of data version
/// 3 or before into its own database first. The state's own data version is
/// checked and upgraded afterwards (`super::data_version`).
pub fn open(data_dir: &Path) -> Result<Stores, LayoutError> {
    let log = open_db(&data_dir.join("db"))?;
    let dir = data_dir.join("state");
    std::fs::create_dir_all(&dir)?;
    let live = state_db::live_generation(&dir)?;
    let moved = marker(&log)? >= Some(SPLIT_VERSION) && only_marker(&log);
    if !moved {
        let old_state = !is_empty(&log, CF_SM);
        match live {
            None if old_state => move_state_out(&log, &dir)?,
            None => state_db::create_first(&dir)?,
            // Moved, but the old column family not yet emptied (a crash):
            // the move stands, unless an older build has run on the old
            // state since and moved it on.
            Some((_, path)) => {
                if old_state && applied_at(&log)? != applied_at(&state_db::open_state_at(&path)?)? {
                    tracing::warn!(
                        "the state moved on since it was moved out (an older build ran): moving it again"
                    );
                    move_state_out(&log, &dir)?;
                }
            }
        }
        // One synced batch: the old state is gone and the marker is there,
        // or neither.
        let sm = log.cf_handle(CF_SM).expect("sm column family");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(sm, [0u8].as_slice(), [0xffu8; 64].as_slice());
        batch.put_cf(sm, META_DATA_VERSION, version::encode(SPLIT_VERSION));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        log.write_opt(batch, &wo)?;
        log.compact_range_cf(sm, None::<&[u8]>, None::<&[u8]>);
    } else if live.is_none() {
        return Err(LayoutError::StateMissing);
    }
    let state = StateDb::open(&dir)?;
    Ok(Stores { log, state })
}

/// The applied log id as stored (raw) in a database's `sm` column family.
fn applied_at(db: &Db) -> Result<Option<Vec<u8>>, rocksdb::Error> {
    db.get_cf(db.cf_handle(CF_SM).expect("sm column family"), META_APPLIED)
}

/// Whether the old `sm` column family holds only the version marker.
fn only_marker(log: &Db) -> bool {
    let sm = log.cf_handle(CF_SM).expect("sm column family");
    let mut it = log.iterator_cf(sm, IteratorMode::Start);
    matches!(it.next(), Some(Ok((k, _))) if &*k == META_DATA_VERSION) && it.next().is_none()
}

/// Makes a checkpoint of the old database the first state generation.
fn move_state_out(log: &Db, dir: &Path) -> Result<(), LayoutError> {
    let staged = state_db::incoming(dir, "migration");
    // Flushes every column family first: the checkpoint holds what was applied.
    Checkpoint::new(log)?.create_checkpoint(&staged)?;
    {
        let mut db = state_db::open_state_owned(&staged)?;
        for name in [CF_LOG, CF_META] {
            if db.cf_handle(name).is_some() {
                db.drop_cf(name)?;
            }
        }
        let sm = db.cf_handle(CF_SM).expect("sm column family");
        // A store of before data versions were stored says so explicitly
        // here (its log no longer travels with its state).
        if db.get_cf(sm, META_DATA_VERSION)?.is_none() {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(sm, META_DATA_VERSION, version::encode(UNVERSIONED), &wo)?;
        }
        db.flush_cf(sm)?;
    }
    state_db::sync_dir(&staged)?;
    state_db::adopt_first(dir, &staged)?;
    tracing::info!("the state machine moved to its own database (data version 4 layout)");
    Ok(())
}

/// The live state generation's directory of a stopped node's data directory.
fn live_state_path(data_dir: &Path) -> Result<std::path::PathBuf, LayoutError> {
    let (_, path) = state_db::live_generation(&data_dir.join("state"))?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no state/CURRENT: not a data directory of data version 4 or later (start the node with this build once to upgrade it)",
        )
    })?;
    Ok(path)
}

/// Opens the state database of a stopped node's data directory, for offline
/// tools and tests (read-write: tests damage it on purpose).
pub fn open_state_dir(data_dir: &Path) -> Result<Db, LayoutError> {
    Ok(state_db::open_state_at(&live_state_path(data_dir)?)?)
}

/// Opens the state database of a stopped node's data directory read-only.
pub fn open_state_dir_read_only(data_dir: &Path) -> Result<Db, LayoutError> {
    Ok(state_db::open_state_read_only_at(&live_state_path(data_dir)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn pairs(db: &Db, cf: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        db.iterator_cf(db.cf_handle(cf).unwrap(), IteratorMode::Start)
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// A data directory as data version 3 wrote it: the state machine in the
    /// log's database (a big value, so a blob file), a log entry, a vote.
    fn version_3_dir(data: &Path) -> (Vec<(Vec<u8>, Vec<u8>)>, Vec<u64>) {
        let db = open_db(&data.join("db")).unwrap();
        let (sm, log, meta) = (
            db.cf_handle(CF_SM).unwrap(),
            db.cf_handle(CF_LOG).unwrap(),
            db.cf_handle(CF_META).unwrap(),
        );
        db.put_cf(sm, META_DATA_VERSION, version::encode(3)).unwrap();
        db.put_cf(sm, META_APPLIED, b"applied-7").unwrap();
        db.put_cf(sm, b"\x40chunk", vec![7u8; 64 << 10]).unwrap();
        db.put_cf(sm, b"\x10tenant", b"record").unwrap();
        db.put_cf(log, 7u64.to_be_bytes(), b"entry 7").unwrap();
        db.put_cf(meta, b"vote", b"mine").unwrap();
        db.flush_cf(sm).unwrap();
        let blobs = std::fs::read_dir(data.join("db"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "blob"))
            .map(|p| std::fs::metadata(p).unwrap().ino())
            .collect();
        (pairs(&db, CF_SM), blobs)
    }

    #[test]
    fn a_version_3_directory_moves_its_state_out_without_copying_mail_and_an_older_build_would_refuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let (state, blobs) = version_3_dir(data);
        assert!(!blobs.is_empty(), "the test needs a blob file");
        let stores = open(data).unwrap();
        assert_eq!(pairs(&stores.state.get(), CF_SM), state);
        // The mail's blob file is the same file, linked, not copied.
        let (_, gen) = state_db::live_generation(&data.join("state")).unwrap().unwrap();
        let moved: Vec<u64> = std::fs::read_dir(&gen)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "blob"))
            .map(|p| std::fs::metadata(p).unwrap().ino())
            .collect();
        assert!(blobs.iter().any(|b| moved.contains(b)), "{blobs:?} {moved:?}");
        // The log and vote stay; the old column family holds only the marker
        // that makes a data version 3 build refuse the directory.
        assert_eq!(
            pairs(&stores.log, CF_LOG),
            vec![(7u64.to_be_bytes().to_vec(), b"entry 7".to_vec())]
        );
        assert_eq!(pairs(&stores.log, CF_META).len(), 1);
        assert_eq!(
            pairs(&stores.log, CF_SM),
            vec![(
                META_DATA_VERSION.to_vec(),
                version::encode(SPLIT_VERSION).to_vec()
            )]
        );
        assert!(crate::store::data_version::read(&stores.log).unwrap() > Some(3));
        // The state database has no log of its own.
        assert!(stores.state.get().cf_handle(CF_LOG).is_none());
        // Opening again changes nothing.
        drop(stores);
        let stores = open(data).unwrap();
        assert_eq!(pairs(&stores.state.get(), CF_SM), state);
    }

    #[test]
    fn a_move_cut_short_at_any_step_is_finished_or_done_again_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        // Cut after the checkpoint was staged: the staged copy is dropped, the move redone.
        let data = dir.path().join("a");
        let (state, _) = version_3_dir(&data);
        std::fs::create_dir_all(data.join("state/incoming-migration-1")).unwrap();
        std::fs::write(data.join("state/incoming-migration-1/CURRENT"), b"half").unwrap();
        let stores = open(&data).unwrap();
        assert_eq!(pairs(&stores.state.get(), CF_SM), state);
        assert!(!data.join("state/incoming-migration-1").exists());
        drop(stores);
        // Cut after `state/CURRENT`, before the old state was emptied: finished.
        let data = dir.path().join("b");
        let (state, _) = version_3_dir(&data);
        let log = open_db(&data.join("db")).unwrap();
        std::fs::create_dir_all(data.join("state")).unwrap();
        move_state_out(&log, &data.join("state")).unwrap();
        drop(log);
        let stores = open(&data).unwrap();
        assert_eq!(pairs(&stores.state.get(), CF_SM), state);
        assert!(only_marker(&stores.log));
        drop(stores);
        // The same, but an older build ran on the old state meanwhile: moved again, with what it applied.
        let data = dir.path().join("c");
        version_3_dir(&data);
        let log = open_db(&data.join("db")).unwrap();
        std::fs::create_dir_all(data.join("state")).unwrap();
        move_state_out(&log, &data.join("state")).unwrap();
        let sm = log.cf_handle(CF_SM).unwrap();
        log.put_cf(sm, META_APPLIED, b"applied-9").unwrap();
        let newer = pairs(&log, CF_SM);
        drop(log);
        let stores = open(&data).unwrap();
        assert_eq!(pairs(&stores.state.get(), CF_SM), newer);
    }

    #[test]
    fn a_fresh_directory_gets_an_empty_state_and_a_moved_state_that_went_missing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stores = open(dir.path()).unwrap();
        assert!(pairs(&stores.state.get(), CF_SM).is_empty());
        assert!(only_marker(&stores.log));
        drop(stores);
        std::fs::remove_dir_all(dir.path().join("state")).unwrap();
        let e = open(dir.path()).err().expect("refused");
        assert!(matches!(e, LayoutError::StateMissing), "{e}");
    }
}
