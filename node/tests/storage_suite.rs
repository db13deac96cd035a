//! openraft's storage test suite against mailvault's RocksDB log store and state machine.

use mailvault_node::crypto::{Keyring, MasterKey};
use mailvault_node::state::types::{StorageError, TypeConfig};
use mailvault_node::store::{LogStore, StateMachine};
use openraft::testing::{StoreBuilder, Suite};

/// Builds stores whose log keeps this many bytes of entries in memory.
struct RocksBuilder(usize);

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let stores = mailvault_node::store::open(dir.path()).expect("open the stores");
        // Set up as a node is. (The suite saves only votes that are not
        // committed, so its appends all wait for their sync; the pipelined
        // path is tested in `store::log_store` and by the cluster tests.)
        let log = LogStore::new(stores.log.clone(), self.0)?.with_leader_pipelining(0);
        let keys = Keyring::new(&MasterKey::from_hex(&"5a".repeat(32)).expect("a test master key"));
        let sm = StateMachine::open(stores.state, keys, &dir.path().join("snapshots"))?
            .applying_synced(log.durability());
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_stores_pass_the_openraft_storage_suite() -> Result<(), StorageError> {
    // With the in-memory log cache off, holding only the newest entry (so
    // reads mix it and RocksDB), and holding all of the log.
    for cache_bytes in [0, 1, 64 << 20] {
        Suite::test_all(RocksBuilder(cache_bytes))?;
    }
    Ok(())
}
