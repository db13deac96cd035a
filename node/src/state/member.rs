//! A cluster member as the replicated membership records it: its role and
//! addresses.
//!
//! Frozen format: stored in every membership config of the Raft log and in
//! snapshots. Do not reorder fields or variants without a data-version
//! migration.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's identity in Raft.
pub type NodeId = u64;

/// The role a node plays in the cluster (see the design brief, "Node roles").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Voter, preferred leader, serves the front ends.
    #[default]
    Active,
    /// Voter that takes over when the active node fails.
    Standby,
    /// Voter that never campaigns; takes backups.
    Backup,
    /// Learner that can replace a dead voter.
    Spare,
    /// Learner in the disaster-recovery region.
    Dr,
}

impl Role {
    /// Whether a node of this role is a voting member when the cluster is bootstrapped.
    pub fn is_voter(self) -> bool {
        matches!(self, Role::Active | Role::Standby | Role::Backup)
    }

    /// Whether a node of this role may start an election.
    pub fn may_campaign(self) -> bool {
        matches!(self, Role::Active | Role::Standby)
    }

    /// The lowercase name used in config files and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Backup => "backup",
            Role::Spare => "spare",
            Role::Dr => "dr",
        }
    }
}

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
