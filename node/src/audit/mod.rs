//! The audit log: every access to mail, every write, export, policy change,
//! admin action and denied attempt becomes a record, replicated through Raft
//! and hash-chained by the state machine. The record and its chain are a
//! stored format and live in [`crate::state::audit`]; this module records.

mod recorder;

pub use recorder::AuditRecorder;
