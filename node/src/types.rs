//! The Raft type configuration: what a log entry carries and what applying it returns.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResult};
use crate::config::{MemberConfig, Role};

/// A node's identity in Raft.
pub type NodeId = u64;

/// What the cluster knows about a member: stored in the membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's role.
    pub role: Role,
    /// Client API address.
    pub client_addr: String,
    /// Raft peer address.
    pub raft_addr: String,
    /// Ops (HTTP) address.
    pub ops_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.role.as_str(), self.raft_addr)
    }
}

impl From<&MemberConfig> for Member {
    fn from(m: &MemberConfig) -> Self {
        Member {
            role: m.role,
            client_addr: m.client_addr.clone(),
            raft_addr: m.raft_addr.clone(),
            ops_addr: m.ops_addr.clone(),
        }
    }
}

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
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of this node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A storage error.
pub type StorageError = openraft::StorageError<NodeId>;
/// A stored membership config.
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
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
/// Raft metrics.
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;
