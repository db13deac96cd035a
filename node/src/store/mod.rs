//! Durable storage: one RocksDB instance with column families for the Raft
//! log, Raft metadata and the state machine, so they share one WAL.

mod apply;
mod db;
mod log_store;
mod reader;
mod snapshot;
mod state_machine;

pub use db::{open_db, open_db_read_only, Db, CF_LOG, CF_META, CF_SM};
pub use log_store::LogStore;
pub use reader::{MailReader, ReadError};
pub use state_machine::StateMachine;

/// Converts any error into an openraft storage error of the given subject.
pub(crate) fn io_err<E: std::error::Error + 'static>(
    subject: openraft::ErrorSubject<crate::types::NodeId>,
    verb: openraft::ErrorVerb,
    e: E,
) -> crate::types::StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}
