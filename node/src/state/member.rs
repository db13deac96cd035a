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

/// A stored membership config (openraft's, of our members).
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;

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

    /// The role a name of [`Role::as_str`] names.
    pub fn parse(name: &str) -> Option<Role> {
        [Role::Active, Role::Standby, Role::Backup, Role::Spare, Role::Dr]
            .into_iter()
            .find(|r| r.as_str() == name)
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

/// What the replicated state records of a member beyond Raft's membership
/// (data version 10), under `keys::member_record`: its region, how it came
/// in, and — once it is removed — that it was, so that the id is never a
/// member again (a node whose data was wiped rejoins under a fresh id) and
/// the node is refused if it comes back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The region label (e.g. the datacenter; empty: none given).
    pub region: String,
    /// How it became a member: the operation that added it, or
    /// `bootstrap` for the members of a fresh cluster's config.
    pub added_by: String,
    /// When, ms since the Unix epoch.
    pub added_ms: i64,
    /// Set once it is removed.
    pub removed: Option<Removal>,
}

/// How a member was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// The operation that removed it (or `repair:<n>` for an automatic
    /// replacement).
    pub by: String,
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
}

/// The members as the leader saw them when it rehearsed a membership change
/// (data version 10): part of the operation's kind, so the plan hash covers
/// what the plan was computed from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipFacts {
    /// The leader, if one is known.
    pub leader: Option<NodeId>,
    /// Every member, by id.
    pub members: Vec<MemberFacts>,
}

/// One member as the leader saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberFacts {
    /// Its id.
    pub id: NodeId,
    /// Its role and addresses.
    pub member: Member,
    /// Whether it votes.
    pub voter: bool,
    /// Whether the leader heard from it within `heal.down_after` (none:
    /// not measured, e.g. rehearsed on a follower).
    pub up: Option<bool>,
    /// How many log entries it is behind the leader (none: not measured).
    pub behind: Option<u64>,
}

impl MembershipFacts {
    /// The member with this id.
    pub fn get(&self, id: NodeId) -> Option<&MemberFacts> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The voters' ids.
    pub fn voters(&self) -> Vec<NodeId> {
        self.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
    }

    /// Of `voters`, those the leader saw up (a member not measured counts
    /// as up: the leader rehearses again before anything changes).
    pub fn healthy_of(&self, voters: &[NodeId]) -> usize {
        voters
            .iter()
            .filter(|v| self.get(**v).is_some_and(|m| m.up != Some(false)))
            .count()
    }
}

/// A node waiting to join, as the leader's probe found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinerFacts {
    /// The id its certificate names.
    pub id: NodeId,
    /// Its role and addresses, as its `[join]` config gives them.
    pub member: Member,
    /// Its region label.
    pub region: String,
    /// SHA-256 of its certificate's public key, hex.
    pub key: String,
    /// Its certificate's serial, hex.
    pub serial: String,
    /// Whether it holds Raft state already (a node that does is refused: it
    /// was a member, or of another cluster).
    pub initialized: bool,
    /// Free bytes on its data directory's file system.
    pub disk_free_bytes: u64,
}

/// One change of the membership, made through Raft by the executor of an
/// operation (or by automatic repair) and then recorded (data version 10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStep {
    /// Adds a node as a learner (it replicates and does not vote).
    AddLearner {
        /// Its id.
        id: NodeId,
        /// Its role and addresses.
        member: Member,
        /// Its region label.
        region: String,
    },
    /// Makes a caught-up learner a voter.
    Promote {
        /// The learner.
        id: NodeId,
        /// The role it votes in.
        role: Role,
    },
    /// Replaces a voter by a caught-up learner, which takes its role; the
    /// old node is removed (one joint-consensus change).
    Replace {
        /// The voter removed.
        old: NodeId,
        /// The learner that takes its place.
        new: NodeId,
        /// The role the new voter takes (the old one's).
        role: Role,
    },
    /// Removes a member (a voter through joint consensus).
    Remove {
        /// The member.
        id: NodeId,
    },
}

impl MemberStep {
    /// The step in plain words.
    pub fn describe(&self) -> String {
        match self {
            MemberStep::AddLearner { id, member, region } => format!(
                "add node {id} ({}, region {}, raft {}) as a learner: it receives a snapshot and \
                 replicates, without a vote",
                member.role.as_str(),
                region_text(region),
                member.raft_addr
            ),
            MemberStep::Promote { id, role } => format!(
                "once node {id} has caught up, make it a voter ({})",
                role.as_str()
            ),
            MemberStep::Replace { old, new, role } => format!(
                "make learner {new} a voter in node {old}'s role ({}) and remove node {old}, in one \
                 joint-consensus change",
                role.as_str()
            ),
            MemberStep::Remove { id } => format!("remove node {id} from the membership"),
        }
    }
}

/// A region label for people ("none" for an empty one).
pub fn region_text(region: &str) -> &str {
    match region {
        "" => "none",
        r => r,
    }
}

/// The votes a change of `voters` voters needs.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// What the state records of automatic repair (data version 11), under
/// `keys::repair`: the members that failed lately, whether repair is
/// frozen and why, and each replacement. The leader decides (its config
/// gives the window and the limits); the record makes every decision
/// survive a leader change and shows on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairRecord {
    /// Members that failed, oldest first (at most [`RepairRecord::KEEP`]).
    pub failures: Vec<Failure>,
    /// Set while automatic repair is frozen, until a two-person unfreeze.
    pub frozen: Option<Frozen>,
    /// Failures at or before this time were acknowledged by an unfreeze and
    /// no longer count towards a freeze, ms since the Unix epoch.
    pub cleared_ms: i64,
    /// Replacements, oldest first (at most [`RepairRecord::KEEP`]).
    pub repairs: Vec<Repair>,
}

impl RepairRecord {
    /// How many failures and replacements the record keeps.
    pub const KEEP: usize = 32;

    /// The replacement under way, if one is.
    pub fn in_progress(&self) -> Option<&Repair> {
        self.repairs.last().filter(|r| r.ended_ms.is_none())
    }
}

/// A member that failed: down, or quarantined for damage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The member.
    pub node: NodeId,
    /// What happened, in words.
    pub what: String,
    /// When, ms since the Unix epoch (the leader's clock).
    pub at_ms: i64,
}

/// Why automatic repair is frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    /// In words.
    pub reason: String,
    /// Since when, ms since the Unix epoch.
    pub at_ms: i64,
}

/// One automatic replacement of a dead voter by a spare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repair {
    /// The dead voter.
    pub old: NodeId,
    /// The spare that takes its place.
    pub new: NodeId,
    /// The role it takes (the old one's).
    pub role: Role,
    /// When the leader started it.
    pub started_ms: i64,
    /// When it ended (done or cancelled).
    pub ended_ms: Option<i64>,
    /// How it ended, in words (empty while under way).
    pub outcome: String,
}

/// A change to the repair record, decided by the state machine and audited
/// in the same entry (data version 11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepairChange {
    /// A member failed.
    Failed {
        /// The member.
        node: NodeId,
        /// What happened.
        what: String,
    },
    /// Automatic repair freezes (refused if it is frozen already).
    Freeze {
        /// Why.
        reason: String,
    },
    /// A replacement starts (refused while frozen or while another is
    /// under way).
    Start {
        /// The dead voter.
        old: NodeId,
        /// The spare.
        new: NodeId,
        /// The role it takes.
        role: Role,
    },
    /// The replacement under way is done: refused unless the membership
    /// shows it; records the old node's removal.
    Done {
        /// The dead voter.
        old: NodeId,
        /// The spare.
        new: NodeId,
    },
    /// The replacement under way is given up, with nothing changed.
    Cancel {
        /// The dead voter.
        old: NodeId,
        /// Why.
        why: String,
    },
}

/// Who made a repair change and when: the leader, by its clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairActor {
    /// The leader.
    pub node: NodeId,
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
}
