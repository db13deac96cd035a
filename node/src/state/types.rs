//! The Raft type configuration: what a log entry carries and what applying it returns.

use serde::{Deserialize, Serialize};

use super::command::{Command, CommandResult};
pub use super::member::{Member, NodeId};

/// The application data of one Raft entry: a batch of client commands packed
/// together by the proposer (group commit).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Batch {
    /// The commands, applied in order.
    pub commands: Vec<Command>,
}

/// The result of applying one entry: one result per command of its batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchResult {
    /// One result per command, in order.
    pub results: Vec<CommandResult>,
}

openraft::declare_raft_types!(
    /// mailvault's Raft type configuration.
    pub TypeConfig:
        D = Batch,
        R = BatchResult,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = super::snapshot_data::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of this node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A storage error.
pub type StorageError = openraft::StorageError<NodeId>;
pub use super::member::StoredMembership;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;

/// Approximate bytes of an entry's commands.
pub fn entry_bytes(e: &Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(b) => b.commands.iter().map(|c| c.approx_bytes()).sum::<usize>() + 64,
        _ => 256,
    }
}
/// What a leader offers before it sends a checkpoint's files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointOffer {
    /// The leader's vote (openraft refuses a snapshot of a stale leader).
    pub vote: openraft::Vote<NodeId>,
    /// What the snapshot is.
    pub meta: SnapshotMeta,
    /// Every file, in the order they are sent: name and length.
    pub files: Vec<(String, u64)>,
}

/// Raft metrics.
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;
