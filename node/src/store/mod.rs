//! Durable storage: a RocksDB instance for the Raft log and its metadata
//! (`data_dir/db`), and one for the state machine (`data_dir/state`, see
//! [`StateDb`]), whose checkpoints are its snapshots and backups.

mod apply;
pub mod backup;
pub mod checkpoint;
pub mod data_version;
mod db;
pub mod drill;
mod durability;
mod layout;
mod log_cache;
mod log_store;
mod reader;
pub mod restore;
mod snapshot;
mod state_db;
mod state_machine;

pub use data_version::DataVersionError;
pub use db::{open_db, open_db_read_only, Db, CF_LOG, CF_META, CF_SM};
pub use durability::Durability;
pub use layout::{open, open_state_dir, open_state_dir_read_only, LayoutError, Stores};
pub use log_store::LogStore;
pub use reader::{MailReader, ReadError, StoredMessage};
pub use state_db::{open_state_read_only_at, StateDb};
pub use state_machine::{SnapshotExtent, StateMachine};

/// For offline tools on a stopped node's data directory: the log index its
/// state machine has applied, and the commit index its log knows of. A node
/// that was not stopped cleanly (killed, power cut) has its state machine at
/// its last flush; the committed entries after it are in its log, and the
/// node applies them when it starts.
pub fn applied_and_committed(log: &Db, state: &Db) -> Result<(u64, u64), crate::state::types::StorageError> {
    let index = |l: Option<crate::state::types::LogId>| l.map_or(0, |l| l.index);
    Ok((
        index(state_machine::read_applied(state)?.0),
        index(log_store::read_committed(log)?),
    ))
}

/// Flushes the state machine to SST files (its writes bypass the WAL), for a
/// clean stop.
pub fn flush_state(state: &StateDb) -> Result<(), rocksdb::Error> {
    let db = state.get();
    db.flush_cf(db.cf_handle(CF_SM).expect("sm column family"))
}

/// Converts any error into an openraft storage error of the given subject.
pub(crate) fn io_err<E: std::error::Error + 'static>(
    subject: openraft::ErrorSubject<crate::state::types::NodeId>,
    verb: openraft::ErrorVerb,
    e: E,
) -> crate::state::types::StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}
