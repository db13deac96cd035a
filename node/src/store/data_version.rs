//! Checking and upgrading the data version of a store (see
//! [`crate::state::version`]): a node refuses data of a newer version than it
//! knows, and upgrades older data one explicit step at a time before it
//! serves.

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};

use super::db::{Db, CF_LOG, CF_META, CF_SM};
use crate::state::keys::META_DATA_VERSION;
use crate::state::version::{self, DATA_VERSION, UNVERSIONED};

/// Why a store's data version was refused.
#[derive(Debug, thiserror::Error)]
pub enum DataVersionError {
    /// Written by a newer mailvault: this build cannot read it.
    #[error("the data is of data version {found}, newer than this mailvault-node supports ({supported}): run a newer mailvault-node, or restore a backup of a supported version")]
    Newer {
        /// The stored version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The stored version is not a version.
    #[error("the stored data version is unreadable: the store is damaged")]
    Unreadable,
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
}

/// One upgrade step: rewrites data of version `to - 1` into version `to`,
/// adding its changes to the batch that also stamps `to`.
struct Step {
    to: u32,
    run: fn(&Db, &mut WriteBatch) -> Result<(), rocksdb::Error>,
}

/// Every upgrade step, oldest first.
const STEPS: &[Step] = &[
    Step {
        to: 1,
        run: unversioned_to_1,
    },
    Step {
        to: 2,
        run: stamp_only,
    },
];

/// Data written before the version was stored has version 1's formats:
/// only the version is added.
fn unversioned_to_1(_db: &Db, _batch: &mut WriteBatch) -> Result<(), rocksdb::Error> {
    Ok(())
}

/// Version 2 adds a command family to the log and changes no stored record:
/// stamping it keeps a version-1 build from reading a log it cannot decode.
fn stamp_only(_db: &Db, _batch: &mut WriteBatch) -> Result<(), rocksdb::Error> {
    Ok(())
}

/// The stored version: `None` for a fresh store, [`UNVERSIONED`] for data
/// written before versions were stored.
pub fn read(db: &Db) -> Result<Option<u32>, DataVersionError> {
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    if let Some(v) = db.get_cf(sm, META_DATA_VERSION)? {
        return version::decode(&v).map(Some).ok_or(DataVersionError::Unreadable);
    }
    let empty = [CF_LOG, CF_META, CF_SM].iter().all(|name| {
        let cf = db.cf_handle(name).expect("column family");
        db.iterator_cf(cf, IteratorMode::Start).next().is_none()
    });
    Ok((!empty).then_some(UNVERSIONED))
}

/// Refuses a store this build cannot read (for offline tools, which must not
/// change it).
pub fn check(db: &Db) -> Result<(), DataVersionError> {
    supported(read(db)?).map(|_| ())
}

/// `found`, unless it is newer than this build supports.
fn supported(found: Option<u32>) -> Result<Option<u32>, DataVersionError> {
    match found {
        Some(found) if found > DATA_VERSION => Err(DataVersionError::Newer {
            found,
            supported: DATA_VERSION,
        }),
        other => Ok(other),
    }
}

/// Brings a store to [`DATA_VERSION`]: stamps a fresh one, upgrades an older
/// one step by step (each step and its stamp one synced write, so a crash
/// leaves a version that was completely written), refuses a newer one.
/// Returns the version found (`None` if fresh).
pub fn upgrade(db: &Db) -> Result<Option<u32>, DataVersionError> {
    let found = supported(read(db)?)?;
    let from = found.unwrap_or(DATA_VERSION);
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    if found.is_none() {
        let mut batch = WriteBatch::default();
        batch.put_cf(sm, META_DATA_VERSION, version::encode(DATA_VERSION));
        db.write_opt(batch, &wo)?;
    }
    for step in STEPS.iter().filter(|s| s.to > from) {
        let mut batch = WriteBatch::default();
        (step.run)(db, &mut batch)?;
        batch.put_cf(sm, META_DATA_VERSION, version::encode(step.to));
        db.write_opt(batch, &wo)?;
        tracing::info!(from = step.to - 1, to = step.to, "data version upgraded");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_db;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        (dir, db)
    }

    fn put(db: &Db, cf: &str, k: &[u8], v: &[u8]) {
        db.put_cf(db.cf_handle(cf).unwrap(), k, v).unwrap();
    }

    #[test]
    fn every_step_upgrades_to_the_next_version_and_the_last_is_current() {
        for (i, step) in STEPS.iter().enumerate() {
            assert_eq!(step.to, i as u32 + 1);
        }
        assert_eq!(STEPS.last().map(|s| s.to), Some(DATA_VERSION));
    }

    #[test]
    fn a_fresh_store_is_stamped_with_the_current_version() {
        let (_d, db) = db();
        assert_eq!(read(&db).unwrap(), None);
        assert_eq!(upgrade(&db).unwrap(), None);
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION));
        assert_eq!(
            upgrade(&db).unwrap(),
            Some(DATA_VERSION),
            "upgrading again changes nothing"
        );
    }

    #[test]
    fn data_written_before_versions_were_stored_is_upgraded_and_kept() {
        let (_d, db) = db();
        put(&db, CF_SM, b"\x10acme", b"tenant");
        put(&db, CF_LOG, &7u64.to_be_bytes(), b"entry");
        assert_eq!(read(&db).unwrap(), Some(UNVERSIONED));
        assert_eq!(upgrade(&db).unwrap(), Some(UNVERSIONED));
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION));
        let sm = db.cf_handle(CF_SM).unwrap();
        assert_eq!(
            db.get_cf(sm, b"\x10acme").unwrap().as_deref(),
            Some(&b"tenant"[..])
        );
    }

    #[test]
    fn a_version_1_store_is_upgraded_to_2_and_kept() {
        let (_d, db) = db();
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(1));
        put(&db, CF_SM, b"\x10acme", b"tenant");
        put(&db, CF_LOG, &7u64.to_be_bytes(), b"entry");
        assert_eq!(upgrade(&db).unwrap(), Some(1));
        assert_eq!(read(&db).unwrap(), Some(2));
        let (sm, log) = (db.cf_handle(CF_SM).unwrap(), db.cf_handle(CF_LOG).unwrap());
        assert_eq!(
            db.get_cf(sm, b"\x10acme").unwrap().as_deref(),
            Some(&b"tenant"[..])
        );
        assert_eq!(
            db.get_cf(log, 7u64.to_be_bytes()).unwrap().as_deref(),
            Some(&b"entry"[..])
        );
    }

    #[test]
    fn a_newer_version_is_refused_with_a_clear_error_and_left_alone() {
        let (_d, db) = db();
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(DATA_VERSION + 1));
        let e = upgrade(&db).unwrap_err();
        assert!(
            matches!(e, DataVersionError::Newer { found, supported } if found == DATA_VERSION + 1 && supported == DATA_VERSION)
        );
        assert!(
            e.to_string().contains("newer than this mailvault-node supports"),
            "{e}"
        );
        assert!(check(&db).is_err());
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION + 1));
        put(&db, CF_SM, META_DATA_VERSION, b"xy");
        assert!(matches!(upgrade(&db), Err(DataVersionError::Unreadable)));
    }
}
