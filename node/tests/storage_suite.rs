//! openraft's storage test suite against mailvault's RocksDB log store and state machine.

use mailvault_node::store::{open_db, LogStore, StateMachine};
use mailvault_node::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_db(&dir.path().join("db")).expect("open db");
        let sm = StateMachine::open(db.clone(), &dir.path().join("snapshots"))?;
        Ok((dir, LogStore::new(db), sm))
    }
}

#[test]
fn rocksdb_stores_pass_the_openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)?;
    Ok(())
}
