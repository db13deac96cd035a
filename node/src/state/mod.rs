//! What is persisted or replicated: the replicated commands and their results,
//! the stored records, the RocksDB key layout, the Raft type config, the
//! membership record, identity policies, audit records, the backup catalog
//! and two-person operations.
//!
//! *Architecture invariant:* this module depends on nothing else in the crate
//! but the leaves [`crate::clock`] and [`crate::names`]; every other layer builds on it. Everything
//! here is a frozen format: change it only with a data-version migration.

pub mod audit;
pub mod backup;
pub mod codec;
pub mod command;
pub mod keys;
pub mod member;
pub mod ops;
pub mod policy;
pub mod records;
pub mod snapshot_data;
pub mod types;
pub mod version;

pub use member::{Member, NodeId, Role};
