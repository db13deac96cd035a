//! mailvault-node: a Raft-replicated store for encrypted mailbox data.
//!
//! See `ARCHITECTURE.md` at the repository root for the bird's-eye view.

pub mod access;
pub mod api;
pub mod audit;
pub mod backups;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod ctx;
pub mod damage;
pub mod error;
pub mod forward;
pub mod headers;
pub mod housekeeping;
pub mod members;
pub mod names;
pub mod operations;
pub mod ops;
pub mod proposer;
pub mod raft;
pub mod repair;
pub mod server;
pub mod state;
pub mod store;
pub mod test_modes;
pub mod tls;
pub mod workers;
