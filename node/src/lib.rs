//! mailvault-node: a Raft-replicated store for encrypted mailbox data.
//!
//! See `ARCHITECTURE.md` at the repository root for the bird's-eye view.

pub mod access;
pub mod api;
pub mod audit;
pub mod command;
pub mod config;
pub mod crypto;
pub mod ctx;
pub mod headers;
pub mod keys;
pub mod model;
pub mod names;
pub mod ops;
pub mod proposer;
pub mod raft;
pub mod server;
pub mod status;
pub mod store;
pub mod test_modes;
pub mod tls;
pub mod types;
