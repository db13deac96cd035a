//! The audit log: every access to mail, every write, export, policy change,
//! admin action and denied attempt becomes a record, replicated through Raft
//! and hash-chained by the state machine.

mod chain;
mod recorder;

pub use chain::{chain_hash, verify_chain, AuditEvent, AuditHead, AuditRecord, ChainError};
pub use recorder::AuditRecorder;
