//! Two-person operations (data version 6): the replicated record of every
//! operation that can lose, expose or destroy mail or widen someone's
//! rights, and the rehearsal that plans one.
//!
//! An operation is proposed by one operator, rehearsed against the replicated
//! state ([`rehearse`]: the exact steps, their effect in plain words, the
//! preconditions checked and a *fence*, a hash of the state the plan depends
//! on), approved by a second operator — a different identity with a different
//! certificate key, signing the plan hash — and then executed step by step by
//! the leader, each step atomically with its record. [`OpChange`]s move an
//! [`Operation`] through its lifecycle; the state machine decides each one
//! (`store/apply/ops.rs`), so every node holds the same record and a leader
//! change loses nothing.
//!
//! Frozen format: `Operation`, `OpKind`, `Step` and `OpChange` are stored and
//! replicated (postcard, positional). Append variants and fields only with a
//! data-version step.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::audit::AuditSettings;
use super::backup::BackupRecord;
use super::codec::encode;
use super::member::{
    quorum, region_text, JoinerFacts, MemberFacts, MemberRecord, MemberStep, MembershipFacts, RepairRecord,
    Role, StoredMembership,
};
use super::policy::{AccessChange, IdentityPolicy, RoleGrant, ANY_TENANT};
use super::records::{MailboxRecord, MessageRecord, TenantRecord};

/// What an operation does, with its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    /// Grants one role (tenant or cluster) to an identity.
    Grant {
        /// The identity.
        identity: String,
        /// The role.
        role: RoleGrant,
    },
    /// Sets an allowlist that admits a source the current one does not
    /// (narrowing one is immediate: `Access.SetAllowlist`).
    Allowlist {
        /// The identity.
        identity: String,
        /// The new allowlist (empty: anywhere).
        networks: Vec<ipnet::IpNet>,
    },
    /// Deletes a mailbox with every message in it, after a verified backup.
    DeleteMailbox(MailboxName),
    /// Lets one identity export one mailbox (`ExportMailbox`) until a time.
    ApproveExport(Export),
    /// Restores one mailbox of a backup into a new live mailbox (data
    /// version 7).
    RestoreMailbox(MailboxFromBackup),
    /// Sets the cluster's audit settings (data version 7), replacing each
    /// node's `[audit]` config.
    AuditSettings {
        /// Whether accesses wait for their audit record (fail closed).
        fail_closed: bool,
    },
    /// Expunges the messages of one mailbox that a rule selects, after a
    /// verified backup (data version 8).
    Expunge(BulkExpunge),
    /// Moves leadership to one voter and keeps it there for a while (data
    /// version 9).
    TransferLeadership(LeadershipTransfer),
    /// Adds a node that waits to join (data version 10).
    AddNode {
        /// The node, as the leader's probe found it (filled in by the
        /// leader, never by the caller).
        node: JoinerFacts,
        /// The members as the leader saw them.
        seen: MembershipFacts,
    },
    /// Removes a member (data version 10).
    RemoveNode {
        /// The member.
        id: u64,
        /// The members as the leader saw them.
        seen: MembershipFacts,
    },
    /// Replaces a voter by a learner (data version 10).
    ReplaceNode {
        /// The voter removed.
        old: u64,
        /// The learner that takes its place.
        new: u64,
        /// The members as the leader saw them.
        seen: MembershipFacts,
    },
    /// Lets automatic repair go on after a freeze (data version 11).
    Unfreeze,
}

/// A leadership transfer: to which voter, for how long, and what the
/// leader saw of the voters when it rehearsed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadershipTransfer {
    /// The voter to lead.
    pub to: u64,
    /// How long it keeps leadership once it has it, ms.
    pub hold_ms: i64,
    /// The voters as the node that rehearsed it saw them (filled in by
    /// that node, never by the caller).
    pub seen: LeadershipFacts,
}

/// The leader's view of the voters, for a leadership transfer's rehearsal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadershipFacts {
    /// The leader, if one is known.
    pub leader: Option<u64>,
    /// Every voter, by id.
    pub voters: Vec<VoterFacts>,
}

/// One voter as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoterFacts {
    /// Its id.
    pub id: u64,
    /// Its role.
    pub role: super::member::Role,
    /// How many log entries it is behind the leader (none: not measured
    /// here, e.g. rehearsed on a follower).
    pub behind: Option<u64>,
}

/// Where leadership is held by a transfer, under `keys::leadership_pin`
/// (data version 9): until `until_ms`, leadership placement prefers `node`
/// to every other voter, whatever the roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadershipPin {
    /// The voter that keeps leadership.
    pub node: u64,
    /// Until when, ms since the Unix epoch.
    pub until_ms: i64,
    /// The operation that set it.
    pub operation: String,
}

/// A voter this many entries behind the leader is not handed leadership.
pub const MAX_BEHIND_FOR_TRANSFER: u64 = 1_000;

/// Which messages of a mailbox a bulk expunge removes: those matching every
/// rule given (at least one is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkExpunge {
    /// The mailbox.
    pub mailbox: MailboxName,
    /// Only messages with an internal date before this, ms since the Unix
    /// epoch.
    pub before_ms: Option<i64>,
    /// Only messages flagged `\Deleted`.
    pub deleted_only: bool,
}

impl BulkExpunge {
    /// Whether the rules select this message.
    pub fn selects(&self, m: &MessageFacts) -> bool {
        self.before_ms.is_none_or(|t| m.internal_date_ms < t) && (!self.deleted_only || m.deleted)
    }

    /// The rules in words.
    pub fn rules_text(&self) -> String {
        let mut rules = Vec::new();
        if let Some(t) = self.before_ms {
            rules.push(format!("received before {}", time_text(t)));
        }
        if self.deleted_only {
            rules.push("flagged \\Deleted".to_string());
        }
        match rules.is_empty() {
            true => "every message".to_string(),
            false => rules.join(" and "),
        }
    }
}

/// The most messages one bulk expunge removes (its plan lists every UID).
pub const MAX_BULK_EXPUNGE: usize = 50_000;

/// UIDs per expunge step (one replicated entry each).
pub const EXPUNGE_BATCH: usize = 1_000;

/// What a rehearsal reads of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFacts {
    /// Its UID.
    pub uid: u32,
    /// Its internal date, ms since the Unix epoch.
    pub internal_date_ms: i64,
    /// Its plaintext size.
    pub size: u64,
    /// Whether it is flagged `\Deleted`.
    pub deleted: bool,
}

impl MessageFacts {
    /// The facts of a message record.
    pub fn of(m: &MessageRecord) -> MessageFacts {
        MessageFacts {
            uid: m.uid,
            internal_date_ms: m.internal_date_ms,
            size: m.size,
            deleted: m.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Deleted")),
        }
    }
}

/// One mailbox of a backup, restored into a live mailbox that does not
/// exist yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxFromBackup {
    /// The backup (its catalog id).
    pub backup: String,
    /// The mailbox as the backup holds it.
    pub from: MailboxName,
    /// The live mailbox to create and fill (same tenant).
    pub into: String,
    /// What the node holding the backup found when it verified the backup
    /// for the rehearsal (filled in by the node that rehearses, never by the
    /// caller).
    pub found: BackupFinding,
}

impl MailboxFromBackup {
    /// The live mailbox it fills.
    pub fn into_name(&self) -> MailboxName {
        MailboxName {
            tenant: self.from.tenant.clone(),
            mailbox: self.into.clone(),
        }
    }
}

/// What the node holding a backup found in it for a rehearsal: the backup
/// verified (manifest and every file) and its keys unwrap, and the mailbox
/// holds this many readable messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFinding {
    /// The node that holds the backup and checked it.
    pub node: u64,
    /// The mailbox's messages in the backup.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A mailbox, by tenant and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxName {
    /// The tenant.
    pub tenant: String,
    /// The mailbox.
    pub mailbox: String,
}

impl std::fmt::Display for MailboxName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.mailbox)
    }
}

/// One identity's bulk export of one mailbox, until a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// The exporter identity (it also needs the exporter role).
    pub exporter: String,
    /// The mailbox.
    pub mailbox: MailboxName,
    /// Until when, ms since the Unix epoch.
    pub until_ms: i64,
}

impl OpKind {
    /// The kind's stable name (`grant`, `allowlist`).
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Grant { .. } => "grant",
            OpKind::Allowlist { .. } => "allowlist",
            OpKind::DeleteMailbox { .. } => "delete-mailbox",
            OpKind::ApproveExport { .. } => "export",
            OpKind::RestoreMailbox { .. } => "restore-mailbox",
            OpKind::AuditSettings { .. } => "audit-settings",
            OpKind::Expunge { .. } => "expunge",
            OpKind::TransferLeadership { .. } => "transfer-leadership",
            OpKind::AddNode { .. } => "add-node",
            OpKind::RemoveNode { .. } => "remove-node",
            OpKind::ReplaceNode { .. } => "replace-node",
            OpKind::Unfreeze => "unfreeze",
        }
    }

    /// What it is about, in a few words (ids only).
    pub fn target(&self) -> String {
        match self {
            OpKind::Grant { identity, role } => format!("{identity}: +{role}"),
            OpKind::Allowlist { identity, networks } => {
                format!("{identity}: allow from {}", allowlist_text(networks))
            }
            OpKind::DeleteMailbox(m) => m.to_string(),
            OpKind::ApproveExport(x) => format!("{}: export {}", x.exporter, x.mailbox),
            OpKind::RestoreMailbox(r) => format!("{} from {} as {}", r.from, r.backup, r.into_name()),
            OpKind::AuditSettings { fail_closed } => format!("audit fail_closed = {fail_closed}"),
            OpKind::Expunge(x) => format!("{}: {}", x.mailbox, x.rules_text()),
            OpKind::TransferLeadership(x) => format!("leadership to node {}", x.to),
            OpKind::AddNode { node, .. } => format!("add node {} ({})", node.id, node.member.role.as_str()),
            OpKind::RemoveNode { id, .. } => format!("remove node {id}"),
            OpKind::ReplaceNode { old, new, .. } => format!("replace node {old} by node {new}"),
            OpKind::Unfreeze => "automatic repair".to_string(),
        }
    }
}

/// An allowlist in words.
pub fn allowlist_text(networks: &[ipnet::IpNet]) -> String {
    match networks {
        [] => "anywhere".to_string(),
        n => n.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "),
    }
}

/// Whether `new` admits a source `old` does not (an empty list admits
/// every source).
pub fn widens(old: &[ipnet::IpNet], new: &[ipnet::IpNet]) -> bool {
    match (old.is_empty(), new.is_empty()) {
        (true, _) => false,
        (false, true) => true,
        (false, false) => new.iter().any(|n| !old.iter().any(|o| o.contains(n))),
    }
}

/// One step of a plan, executed as one replicated change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Changes one part of an identity's policy.
    Access(AccessChange),
    /// Deletes a mailbox: its record, every message, their chunks, its
    /// idempotency and change records.
    DeleteMailbox(MailboxName),
    /// Records an approved export ([`ExportApproval`]).
    ApproveExport(Export),
    /// Creates an empty mailbox (data version 7), the first step of a
    /// mailbox restore: fenced like every first step, so the restore never
    /// writes into a mailbox that existed.
    CreateMailbox(MailboxName),
    /// Records a mailbox restore the executor ran on the node holding the
    /// backup (data version 7): unlike the other steps, its effect (many
    /// appends, each its own entry, idempotent, resumed by the next leader)
    /// comes before its record.
    RestoreMailbox(MailboxFromBackup),
    /// Stores the audit settings (data version 7).
    AuditSettings {
        /// Whether accesses wait for their audit record.
        fail_closed: bool,
    },
    /// Expunges these messages of a mailbox, those still there (data
    /// version 8): one batch of a bulk expunge.
    Expunge {
        /// The mailbox.
        mailbox: MailboxName,
        /// The UIDs, ascending.
        uids: Vec<u32>,
    },
    /// Node `to` takes leadership and keeps it for `hold_ms` (data version
    /// 9). The executor runs its effect first (the leader asks `to` to
    /// campaign); `to`, leading, records it, which stores the
    /// [`LeadershipPin`].
    Leadership {
        /// The voter to lead.
        to: u64,
        /// How long it keeps leadership, ms from the step.
        hold_ms: i64,
    },
    /// A change of the membership (data version 10). The executor makes it
    /// through Raft first (a membership entry), then records it; the record
    /// is refused unless the membership shows the change.
    Membership(MemberStep),
    /// Lets automatic repair go on (data version 11): clears the freeze;
    /// failures until now no longer count towards the next one.
    Unfreeze,
}

/// An approved bulk export, stored under `keys::export_approval`: the
/// exporter may call `ExportMailbox` on that one mailbox from the approval
/// until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportApproval {
    /// The operation that approved it.
    pub operation: String,
    /// From when (the step's time).
    pub from_ms: i64,
    /// Until when.
    pub until_ms: i64,
}

impl Step {
    /// The step's stable action name.
    pub fn action(&self) -> &'static str {
        match self {
            Step::Access(AccessChange::Grant { .. }) => "grant",
            Step::Access(AccessChange::Ungrant { .. }) => "ungrant",
            Step::Access(AccessChange::SetAllowlist { .. }) => "set-allowlist",
            Step::Access(AccessChange::Revoke { .. }) => "revoke",
            Step::DeleteMailbox { .. } => "delete-mailbox",
            Step::ApproveExport { .. } => "approve-export",
            Step::CreateMailbox { .. } => "create-mailbox",
            Step::RestoreMailbox { .. } => "restore-mailbox",
            Step::AuditSettings { .. } => "audit-settings",
            Step::Expunge { .. } => "expunge",
            Step::Leadership { .. } => "transfer-leadership",
            Step::Membership(MemberStep::AddLearner { .. }) => "add-learner",
            Step::Membership(MemberStep::Promote { .. }) => "promote",
            Step::Membership(MemberStep::Replace { .. }) => "replace-voter",
            Step::Membership(MemberStep::Remove { .. }) => "remove-member",
            Step::Unfreeze => "unfreeze",
        }
    }

    /// The step in plain words.
    pub fn describe(&self) -> String {
        match self {
            Step::Access(AccessChange::Grant { identity, role }) => format!("grant {role} to {identity}"),
            Step::Access(AccessChange::Ungrant { identity, role }) => {
                format!("remove {role} from {identity}")
            }
            Step::Access(AccessChange::SetAllowlist {
                identity, networks, ..
            }) => format!("let {identity} call from {}", allowlist_text(networks)),
            Step::Access(AccessChange::Revoke { identity }) => format!("revoke {identity}"),
            Step::DeleteMailbox(m) => format!("delete mailbox {m} and every message in it"),
            Step::ApproveExport(x) => format!(
                "let {} export mailbox {} until {}",
                x.exporter,
                x.mailbox,
                time_text(x.until_ms)
            ),
            Step::CreateMailbox(m) => format!("create mailbox {m}, empty"),
            Step::RestoreMailbox(r) => format!(
                "restore the {} messages of {} in backup {} into {}, on node {}",
                thousands(r.found.messages),
                r.from,
                r.backup,
                r.into_name(),
                r.found.node
            ),
            Step::AuditSettings { fail_closed } => {
                format!("set the cluster's audit fail_closed to {fail_closed} on every node")
            }
            Step::Expunge { mailbox, uids } => format!(
                "expunge {} messages of {mailbox} (UIDs {})",
                thousands(uids.len() as u64),
                uids_text(uids)
            ),
            Step::Leadership { to, hold_ms } => format!(
                "node {to} takes leadership (the leader asks it to campaign: one election) \
                 and keeps it for {}",
                duration_text(*hold_ms)
            ),
            Step::Membership(m) => m.describe(),
            Step::Unfreeze => "let automatic repair go on; the failures until now no longer count \
                               towards a freeze"
                .to_string(),
        }
    }

    /// Whether the executor runs the step's effect before it records it
    /// (see [`Step::RestoreMailbox`]).
    pub fn runs_outside(&self) -> bool {
        matches!(
            self,
            Step::RestoreMailbox(_) | Step::Leadership { .. } | Step::Membership(_)
        )
    }
}

/// One piece of state a plan depends on: what it is, in words, and the hash
/// of its value when the plan was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencePart {
    /// E.g. `policy of identity bob`, `tenant acme`.
    pub what: String,
    /// SHA-256 of the value's encoding (or of nothing, for an absent record).
    pub hash: [u8; 32],
}

/// The rehearsed plan: exact steps, predicted effect, preconditions checked,
/// and the fence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The ordered steps.
    pub steps: Vec<Step>,
    /// The predicted effect, in plain words, one line each.
    pub effect: Vec<String>,
    /// The preconditions checked, in plain words.
    pub checks: Vec<String>,
    /// Whether a verified backup is taken before the first step.
    pub backup_first: bool,
    /// The state the plan depends on.
    pub fence: Vec<FencePart>,
}

impl Plan {
    /// The fence as one hash.
    pub fn fence_hash(&self) -> [u8; 32] {
        fence_hash(&self.fence)
    }

    /// What differs between this plan's fence and `now`'s, in words.
    pub fn fence_changes(&self, now: &[FencePart]) -> Vec<String> {
        let mut changed: Vec<String> = self
            .fence
            .iter()
            .filter(|p| !now.iter().any(|n| n == *p))
            .map(|p| p.what.clone())
            .collect();
        for n in now {
            if !self.fence.iter().any(|p| p.what == n.what) && !changed.contains(&n.what) {
                changed.push(n.what.clone());
            }
        }
        changed
    }
}

/// The fence parts as one hash.
pub fn fence_hash(parts: &[FencePart]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mailvault fence v1\0");
    h.update(encode(&parts));
    h.finalize().into()
}

/// An operator as an operation records them: identity and certificate key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// The identity.
    pub identity: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, lower-case hex.
    pub key: String,
}

/// A second operator's approval: who, with which certificate, and their
/// signature over the approval message (`mailvault_proto::approval::message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The approver.
    pub by: Person,
    /// Their certificate (DER): anyone can check the signature again.
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    /// The signature by the certificate's key over the approval message.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// When, ms since the Unix epoch (the leader's clock).
    pub at_ms: i64,
}

/// Where an operation is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpStatus {
    /// Waiting for a second operator.
    Proposed,
    /// Approved; not started (the pre-operation backup comes first).
    Approved,
    /// Steps are being executed.
    Executing,
    /// Every step done.
    Succeeded,
    /// Ended without completing (no step after the failure ran).
    Failed,
    /// Rejected by another operator.
    Rejected,
    /// Withdrawn by its proposer.
    Cancelled,
    /// Not approved in time.
    Expired,
}

impl OpStatus {
    /// The status's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            OpStatus::Proposed => "proposed",
            OpStatus::Approved => "approved",
            OpStatus::Executing => "executing",
            OpStatus::Succeeded => "succeeded",
            OpStatus::Failed => "failed",
            OpStatus::Rejected => "rejected",
            OpStatus::Cancelled => "cancelled",
            OpStatus::Expired => "expired",
        }
    }

    /// Whether the operation has ended.
    pub fn ended(self) -> bool {
        !matches!(
            self,
            OpStatus::Proposed | OpStatus::Approved | OpStatus::Executing
        )
    }
}

/// The result of one executed step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// Its index in the plan.
    pub index: u32,
    /// When it was applied.
    pub at_ms: i64,
    /// Whether it took effect.
    pub ok: bool,
    /// What it did, or why it did not, in words.
    pub result: String,
}

/// One operation, as the state machine keeps it under `keys::operation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// `op-` and 8 hex digits.
    pub id: String,
    /// What it does.
    pub kind: OpKind,
    /// Why (free text, e.g. a ticket number; required).
    pub reason: String,
    /// Who proposed it.
    pub proposer: Person,
    /// When it was proposed.
    pub created_ms: i64,
    /// When an unapproved proposal expires.
    pub expires_ms: i64,
    /// The rehearsed plan.
    pub plan: Plan,
    /// [`plan_hash`] of the above.
    pub plan_hash: [u8; 32],
    /// Where it is.
    pub status: OpStatus,
    /// The approval, once approved.
    pub approval: Option<Approval>,
    /// The pre-operation backup, once taken and verified.
    pub backup_id: Option<String>,
    /// Each executed step, in order.
    pub steps: Vec<StepResult>,
    /// When it ended.
    pub ended_ms: Option<i64>,
    /// How it ended, in words (who rejected it and why, which step failed…).
    pub outcome: String,
}

/// What the approver's signature and the plan hash cover.
#[derive(Serialize)]
struct Hashed<'a> {
    id: &'a str,
    kind: &'a OpKind,
    reason: &'a str,
    proposer: &'a Person,
    expires_ms: i64,
    plan: &'a Plan,
}

/// The plan hash: SHA-256 over the operation's id, kind, reason, proposer,
/// expiry and plan. The approver is shown it and signs it.
pub fn plan_hash(
    id: &str,
    kind: &OpKind,
    reason: &str,
    proposer: &Person,
    expires_ms: i64,
    plan: &Plan,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mailvault plan v1\0");
    h.update(encode(&Hashed {
        id,
        kind,
        reason,
        proposer,
        expires_ms,
        plan,
    }));
    h.finalize().into()
}

impl Operation {
    /// The hash of this operation's plan, recomputed.
    pub fn computed_plan_hash(&self) -> [u8; 32] {
        plan_hash(
            &self.id,
            &self.kind,
            &self.reason,
            &self.proposer,
            self.expires_ms,
            &self.plan,
        )
    }
}

/// Who makes a change to an operation, when and where: an operator through
/// a node, or a node executing (`node:<id>`). Carried in the change, so
/// every replica decides and audits alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The identity.
    pub identity: String,
    /// The source address (`-` for a node's own change).
    pub source: String,
    /// The node that proposed the change.
    pub node: u64,
    /// When, ms since the Unix epoch (that node's clock).
    pub at_ms: i64,
}

/// A change to the operations, decided by the state machine. Each names one
/// operation and its [`Actor`]; each transition is audited in the same entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpChange {
    /// Records a new proposal. Refused if the id is taken, or if the state
    /// no longer gives the same plan.
    Propose {
        /// The operation, as proposed.
        op: Box<Operation>,
        /// Its proposer.
        actor: Actor,
    },
    /// Records a second operator's approval. Refused if the operation is
    /// not pending, expired, the approver is the proposer (by identity or
    /// key), the plan hash differs, the signature does not verify, or the
    /// fence no longer matches.
    Approve {
        /// The operation.
        id: String,
        /// The plan hash the approver was shown.
        plan_hash: [u8; 32],
        /// The approval.
        approval: Approval,
        /// The approver.
        actor: Actor,
    },
    /// Rejects a pending operation (any operator but its proposer).
    Reject {
        /// The operation.
        id: String,
        /// Why.
        reason: String,
        /// Who.
        actor: Actor,
    },
    /// Withdraws a pending operation (its proposer only).
    Cancel {
        /// The operation.
        id: String,
        /// Who.
        actor: Actor,
    },
    /// Ends a proposal nobody approved in time.
    Expire {
        /// The operation.
        id: String,
        /// The node that noticed, after the expiry.
        actor: Actor,
    },
    /// Records the verified pre-operation backup.
    BackupTaken {
        /// The operation.
        id: String,
        /// The backup.
        backup: String,
        /// The executing node.
        actor: Actor,
    },
    /// Executes step `index` of an approved operation, atomically with its
    /// record. Before the first step the fence is checked again.
    Step {
        /// The operation.
        id: String,
        /// The step (the number of steps done so far).
        index: u32,
        /// The executing node.
        actor: Actor,
    },
    /// Ends an approved operation that cannot go on (its pre-operation
    /// backup failed), before any further step.
    Fail {
        /// The operation.
        id: String,
        /// Why.
        reason: String,
        /// The executing node.
        actor: Actor,
    },
}

impl OpChange {
    /// The operation it is about.
    pub fn id(&self) -> &str {
        match self {
            OpChange::Propose { op, .. } => &op.id,
            OpChange::Approve { id, .. }
            | OpChange::Reject { id, .. }
            | OpChange::Cancel { id, .. }
            | OpChange::Expire { id, .. }
            | OpChange::BackupTaken { id, .. }
            | OpChange::Step { id, .. }
            | OpChange::Fail { id, .. } => id,
        }
    }
}

/// Why a rehearsal, or a change to an operation, was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OpRefusal {
    /// No operation with this id.
    #[error("operation not found")]
    NotFound,
    /// The id is taken (propose again).
    #[error("operation id already used")]
    IdTaken,
    /// The proposal expired before it was approved.
    #[error("the operation expired unapproved")]
    Expired,
    /// It is no longer pending (its status is given).
    #[error("the operation is already {0}")]
    Decided(String),
    /// The approver is the proposer.
    #[error("the proposer cannot approve their own operation")]
    SelfApproval,
    /// The approver's certificate has the proposer's key.
    #[error("the approver's certificate has the proposer's key: a second person needs a key of their own")]
    SameKey,
    /// The plan hash presented is not the operation's.
    #[error("the plan hash presented is not this operation's (the plan shown was a different one)")]
    PlanChanged,
    /// The state the plan depends on changed (what changed is given).
    #[error("the state changed since the rehearsal ({}): propose it again", .0.join("; "))]
    FenceChanged(Vec<String>),
    /// The approval's signature does not verify.
    #[error("the approval signature does not verify: {0}")]
    BadSignature(String),
    /// Only the proposer may cancel.
    #[error("only the proposer may cancel an operation (others reject it)")]
    NotProposer,
    /// The proposer cannot reject their own operation.
    #[error("the proposer cancels, not rejects, their own operation")]
    ProposerRejects,
    /// A precondition of the operation does not hold (in words).
    #[error("{0}")]
    Precondition(String),
    /// The operation would change nothing.
    #[error("nothing to do: {0}")]
    NothingToDo(String),
    /// The step is not the next one (already done, or out of order).
    #[error("step {0} is not the next step")]
    NotNextStep(u32),
}

/// What a rehearsal reads: the replicated state, from the state machine's
/// apply (deterministic, within the entry) or from a node's copy.
pub trait View {
    /// A read error.
    type Error;
    /// An identity's policy (none: no record).
    fn policy(&self, identity: &str) -> Result<Option<IdentityPolicy>, Self::Error>;
    /// A tenant's record.
    fn tenant(&self, tenant: &str) -> Result<Option<TenantRecord>, Self::Error>;
    /// A mailbox's record.
    fn mailbox(&self, tenant: &str, mailbox: &str) -> Result<Option<MailboxRecord>, Self::Error>;
    /// A backup's catalog record.
    fn backup(&self, id: &str) -> Result<Option<BackupRecord>, Self::Error>;
    /// The replicated audit settings.
    fn audit_settings(&self) -> Result<Option<AuditSettings>, Self::Error>;
    /// What a bulk expunge reads of each message of a mailbox, in UID
    /// order; a message record that cannot be read is its UID.
    fn message_facts(
        &self,
        tenant: &str,
        mailbox: &str,
    ) -> Result<Vec<Result<MessageFacts, u32>>, Self::Error>;
    /// Where a leadership transfer holds leadership, if one does.
    fn leadership_pin(&self) -> Result<Option<LeadershipPin>, Self::Error>;
    /// The membership as applied (Raft's voters and learners, their roles
    /// and addresses).
    fn membership(&self) -> Result<Option<StoredMembership>, Self::Error>;
    /// What the state records of a node id beyond the membership.
    fn member_record(&self, id: u64) -> Result<Option<MemberRecord>, Self::Error>;
    /// The record of automatic repair.
    fn repair_record(&self) -> Result<Option<RepairRecord>, Self::Error>;
}

fn part<T: Serialize>(what: String, value: &Option<T>) -> FencePart {
    let mut h = Sha256::new();
    match value {
        None => h.update([0u8]),
        Some(v) => {
            h.update([1u8]);
            h.update(encode(v));
        }
    }
    FencePart {
        what,
        hash: h.finalize().into(),
    }
}

/// Rehearses `kind` against the state `view` reads: the plan, or the
/// precondition it violates. Pure and deterministic: the state machine runs
/// it again to check a fence, and gets the same answer from the same state.
pub fn rehearse<V: View>(view: &V, kind: &OpKind) -> Result<Result<Plan, OpRefusal>, V::Error> {
    match kind {
        OpKind::Grant { identity, role } => {
            let policy = view.policy(identity)?;
            let mut fence = vec![part(format!("policy of identity {identity}"), &policy)];
            let current = policy.clone().unwrap_or_default();
            let mut checks = Vec::new();
            if current.revoked {
                return Ok(Err(OpRefusal::Precondition(format!(
                    "identity {identity} is revoked"
                ))));
            }
            checks.push(format!("identity {identity} is not revoked"));
            let held = match role {
                RoleGrant::Tenant { tenant, role } => {
                    if tenant != ANY_TENANT {
                        let t = view.tenant(tenant)?;
                        if t.is_none() {
                            return Ok(Err(OpRefusal::Precondition(format!(
                                "tenant {tenant} does not exist"
                            ))));
                        }
                        checks.push(format!("tenant {tenant} exists"));
                        fence.push(part(format!("tenant {tenant}"), &t.map(|t| t.keys.len())));
                    }
                    current.tenant_roles.get(tenant).is_some_and(|r| r.contains(role))
                }
                RoleGrant::Cluster(r) => current.cluster_roles.contains(r),
            };
            if held {
                return Ok(Err(OpRefusal::NothingToDo(format!(
                    "{identity} already holds {role}"
                ))));
            }
            checks.push(format!("{identity} does not hold {role} yet"));
            let change = AccessChange::Grant {
                identity: identity.clone(),
                role: role.clone(),
            };
            let mut after = current.clone();
            match role {
                RoleGrant::Tenant { tenant, role } => {
                    after
                        .tenant_roles
                        .entry(tenant.clone())
                        .or_default()
                        .insert(*role);
                }
                RoleGrant::Cluster(r) => {
                    after.cluster_roles.insert(*r);
                }
            }
            let effect = vec![
                format!("identity {identity} gains {role}"),
                format!("its roles before: {}", roles_text(&current)),
                format!("its roles after: {}", roles_text(&after)),
            ];
            Ok(Ok(Plan {
                steps: vec![Step::Access(change)],
                effect,
                checks,
                backup_first: false,
                fence,
            }))
        }
        OpKind::Allowlist { identity, networks } => {
            let policy = view.policy(identity)?;
            let fence = vec![part(format!("policy of identity {identity}"), &policy)];
            let current = policy.unwrap_or_default();
            if current.revoked {
                return Ok(Err(OpRefusal::Precondition(format!(
                    "identity {identity} is revoked"
                ))));
            }
            if current.allow_from == *networks {
                return Ok(Err(OpRefusal::NothingToDo(format!(
                    "{identity} may already call from {}",
                    allowlist_text(networks)
                ))));
            }
            let checks = vec![
                format!("identity {identity} is not revoked"),
                format!(
                    "the allowlist is {} now (the change applies only if it still is)",
                    allowlist_text(&current.allow_from)
                ),
            ];
            let effect = vec![
                format!(
                    "identity {identity} may call from {} (was: {})",
                    allowlist_text(networks),
                    allowlist_text(&current.allow_from)
                ),
                match widens(&current.allow_from, networks) {
                    true => "this admits sources the current allowlist refuses".to_string(),
                    false => "this admits no source the current allowlist refuses".to_string(),
                },
            ];
            Ok(Ok(Plan {
                steps: vec![Step::Access(AccessChange::SetAllowlist {
                    identity: identity.clone(),
                    networks: networks.clone(),
                    expected: Some(current.allow_from.clone()),
                })],
                effect,
                checks,
                backup_first: false,
                fence,
            }))
        }
        OpKind::DeleteMailbox(m) => plan_delete_mailbox(view, m),
        OpKind::ApproveExport(x) => plan_export(view, x),
        OpKind::RestoreMailbox(r) => plan_restore_mailbox(view, r),
        OpKind::AuditSettings { fail_closed } => plan_audit_settings(view, *fail_closed),
        OpKind::Expunge(x) => plan_expunge(view, x),
        OpKind::TransferLeadership(x) => plan_transfer_leadership(view, x),
        OpKind::AddNode { node, seen } => plan_add_node(view, node, seen),
        OpKind::RemoveNode { id, seen } => plan_remove_node(view, *id, seen),
        OpKind::ReplaceNode { old, new, seen } => plan_replace_node(view, *old, *new, seen),
        OpKind::Unfreeze => plan_unfreeze(view),
    }
}

/// A leadership transfer: the target a voter that may lead (not a backup
/// voter, which never campaigns by choice), not the leader already, caught
/// up as the leader saw it. One step, run by the executor (the leader asks
/// the target to campaign) and recorded by the target once it leads, which
/// stores where leadership is held and until when. Fenced on that record
/// (another transfer meanwhile). Nothing stored changes but that record.
fn plan_transfer_leadership<V: View>(
    view: &V,
    x: &LeadershipTransfer,
) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let pin = view.leadership_pin()?;
    let to = x.to;
    let voters = x
        .seen
        .voters
        .iter()
        .map(|v| v.id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let Some(target) = x.seen.voters.iter().find(|v| v.id == to) else {
        return Ok(Err(OpRefusal::Precondition(format!(
            "node {to} is not a voter (the voters: {voters})"
        ))));
    };
    if !target.role.may_campaign() {
        return Ok(Err(OpRefusal::Precondition(format!(
            "node {to} is a {} voter, which never leads by choice",
            target.role.as_str()
        ))));
    }
    if x.seen.leader == Some(to) {
        return Ok(Err(OpRefusal::NothingToDo(format!("node {to} leads already"))));
    }
    let mut checks = vec![
        format!("node {to} is a voter (the voters: {voters})"),
        format!("node {to} is a {} node, which may lead", target.role.as_str()),
    ];
    match target.behind {
        Some(b) if b > MAX_BEHIND_FOR_TRANSFER => {
            return Ok(Err(OpRefusal::Precondition(format!(
                "node {to} is {} log entries behind the leader (at most {} for a transfer)",
                thousands(b),
                thousands(MAX_BEHIND_FOR_TRANSFER)
            ))));
        }
        Some(b) => checks.push(format!(
            "node {to} is {} log entries behind the leader",
            thousands(b)
        )),
        None => checks.push(format!(
            "how far node {to} is behind is measured on the leader (this node is not): \
             the proposal rehearses it there"
        )),
    }
    let from = match x
        .seen
        .leader
        .and_then(|l| x.seen.voters.iter().find(|v| v.id == l))
    {
        Some(l) => format!("node {} ({})", l.id, l.role.as_str()),
        None => "no leader known".to_string(),
    };
    let active = x
        .seen
        .voters
        .iter()
        .find(|v| v.role == super::member::Role::Active)
        .map_or("the active node".to_string(), |v| {
            format!("node {} (active)", v.id)
        });
    let effect = vec![
        format!(
            "leadership moves from {from} to node {to} ({})",
            target.role.as_str()
        ),
        format!(
            "one election: new writes wait (at most 2 s) while node {to} catches up and takes \
             over; a few then get a retryable UNAVAILABLE; nothing acknowledged is lost"
        ),
        format!(
            "node {to} keeps leadership for {} from the transfer: until then leadership placement \
             does not hand it back to {active}; if node {to} fails meanwhile another voter leads \
             and hands leadership back to node {to} once it has caught up",
            duration_text(x.hold_ms)
        ),
        match &pin {
            Some(p) => format!(
                "this replaces the hold of {} on node {} (until {})",
                p.operation,
                p.node,
                time_text(p.until_ms)
            ),
            None => "no mail, policy or membership changes".to_string(),
        },
    ];
    Ok(Ok(Plan {
        steps: vec![Step::Leadership {
            to,
            hold_ms: x.hold_ms,
        }],
        effect,
        checks,
        backup_first: false,
        fence: vec![part("where leadership is held".to_string(), &pin)],
    }))
}

/// A member as a membership plan sees it: id, role, whether it votes.
#[derive(Clone, Copy)]
struct Seat {
    id: u64,
    role: Role,
    voter: bool,
}

fn seats(m: &Option<StoredMembership>) -> Vec<Seat> {
    let Some(m) = m else { return Vec::new() };
    let m = m.membership();
    let voters: Vec<u64> = m.voter_ids().collect();
    m.nodes()
        .map(|(id, n)| Seat {
            id: *id,
            role: n.role,
            voter: voters.contains(id),
        })
        .collect()
}

fn seats_text(seats: &[Seat]) -> String {
    let list = |voter: bool| {
        let l: Vec<String> = seats
            .iter()
            .filter(|s| s.voter == voter)
            .map(|s| format!("{} ({})", s.id, s.role.as_str()))
            .collect();
        match l.is_empty() {
            true => "none".to_string(),
            false => l.join(", "),
        }
    };
    format!("voters {}; learners {}", list(true), list(false))
}

fn voter_ids(seats: &[Seat]) -> Vec<u64> {
    seats.iter().filter(|s| s.voter).map(|s| s.id).collect()
}

/// The quorum rule of a change from `before` to `after` voters: a joint
/// change commits only with a quorum of healthy voters of both.
fn quorum_check(
    seen: &MembershipFacts,
    before: &[u64],
    after: &[u64],
    what: &str,
) -> Result<Vec<String>, OpRefusal> {
    let (hb, ha) = (seen.healthy_of(before), seen.healthy_of(after));
    let (qb, qa) = (quorum(before.len()), quorum(after.len()));
    if hb < qb {
        return Err(OpRefusal::Precondition(format!(
            "only {hb} of the {} voters are healthy (a quorum is {qb}): no membership change can commit",
            before.len()
        )));
    }
    if after.is_empty() {
        return Err(OpRefusal::Precondition(format!("{what} would leave no voter")));
    }
    if ha < qa {
        return Err(OpRefusal::Precondition(format!(
            "{what} would leave {ha} healthy voter{} of {} (a quorum is {qa}): refused",
            plural(ha),
            after.len()
        )));
    }
    let mut checks = vec![format!(
        "{hb} of the {} voters are healthy now (a quorum is {qb})",
        before.len()
    )];
    if before != after {
        checks.push(format!(
            "after the change {ha} of {} voters are healthy (a quorum is {qa}): a quorum at every step",
            after.len()
        ));
    }
    if seen.members.iter().any(|m| m.up.is_none()) {
        checks.push(
            "health is measured on the leader (this node is not): the proposal rehearses it there".into(),
        );
    }
    Ok(checks)
}

fn plural(n: usize) -> &'static str {
    match n {
        1 => "",
        _ => "s",
    }
}

fn membership_fence<V: View>(
    view: &V,
    ids: &[u64],
) -> Result<(Option<StoredMembership>, Vec<FencePart>), V::Error> {
    let m = view.membership()?;
    let mut fence = vec![part("the membership".to_string(), &m)];
    for id in ids {
        fence.push(part(
            format!("the record of node {id}"),
            &view.member_record(*id)?,
        ));
    }
    Ok((m, fence))
}

fn refuse_removed<V: View>(view: &V, id: u64) -> Result<Option<OpRefusal>, V::Error> {
    Ok(view.member_record(id)?.and_then(|r| r.removed).map(|r| {
        OpRefusal::Precondition(format!(
            "node {id} was removed ({}, {}): a node rejoins under a fresh id",
            r.by,
            time_text(r.at_ms)
        ))
    }))
}

/// Adding a node that waits to join: it proved its id, holds no Raft state,
/// was never a member; a spare or dr node becomes a learner, a voter role
/// a learner and then a voter once caught up.
fn plan_add_node<V: View>(
    view: &V,
    node: &JoinerFacts,
    seen: &MembershipFacts,
) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let id = node.id;
    let (m, fence) = membership_fence(view, &[id])?;
    let before = seats(&m);
    if before.iter().any(|s| s.id == id) {
        return Ok(Err(OpRefusal::NothingToDo(format!(
            "node {id} is a member already"
        ))));
    }
    if let Some(r) = refuse_removed(view, id)? {
        return Ok(Err(r));
    }
    if node.initialized {
        return Ok(Err(OpRefusal::Precondition(format!(
            "node {id} holds Raft state already (it was a member, or of another cluster): only an \
             empty node waiting with a [join] setting is added"
        ))));
    }
    if let Some(other) = m.as_ref().and_then(|m| {
        m.membership()
            .nodes()
            .find(|(_, n)| n.raft_addr == node.member.raft_addr)
            .map(|(i, _)| *i)
    }) {
        return Ok(Err(OpRefusal::Precondition(format!(
            "node {other} has the raft address {} already",
            node.member.raft_addr
        ))));
    }
    let role = node.member.role;
    let mut checks = vec![
        format!(
            "node {id} proved its identity: its certificate (serial {}, key {}) names node:{id} and \
             is issued by the cluster CA",
            node.serial,
            short_key(&node.key)
        ),
        format!("node {id} holds no Raft state (it waits with a [join] setting)"),
        format!("no member has id {id}, and node {id} was never removed"),
        format!(
            "node {id} has {} free on its data directory's file system",
            size_text(node.disk_free_bytes)
        ),
    ];
    let mut after = before.clone();
    after.push(Seat {
        id,
        role,
        voter: false,
    });
    let mut steps = vec![Step::Membership(MemberStep::AddLearner {
        id,
        member: node.member.clone(),
        region: node.region.clone(),
    })];
    if role.is_voter() {
        if role == Role::Active {
            if let Some(a) = before.iter().find(|s| s.voter && s.role == Role::Active) {
                return Ok(Err(OpRefusal::Precondition(format!(
                    "node {} is the active node already (add node {id} as a standby, or replace node {})",
                    a.id, a.id
                ))));
            }
        }
        let (v, mut va) = (voter_ids(&before), voter_ids(&before));
        va.push(id);
        // The learner counts as healthy once it has caught up, which the
        // step waits for.
        let mut assumed = seen.clone();
        assumed.members.push(MemberFacts {
            id,
            member: node.member.clone(),
            voter: true,
            up: Some(true),
            behind: Some(0),
        });
        match quorum_check(&assumed, &v, &va, &format!("adding node {id} as a voter")) {
            Ok(c) => checks.extend(c),
            Err(r) => return Ok(Err(r)),
        }
        after.last_mut().expect("pushed").voter = true;
        steps.push(Step::Membership(MemberStep::Promote { id, role }));
    }
    let effect = vec![
        format!(
            "node {id} ({}, region {}) receives a snapshot of the whole cluster state — every \
             tenant's encrypted mail and wrapped data keys — and replicates from then on: this \
             machine holds the cluster's data",
            role.as_str(),
            region_text(&node.region)
        ),
        format!("membership before: {}", seats_text(&before)),
        format!("membership after: {}", seats_text(&after)),
        match role {
            Role::Spare => format!(
                "node {id} does not vote: it stands by to replace a voter that fails (automatic repair)"
            ),
            Role::Dr => format!(
                "node {id} does not vote: it keeps a continuous copy, promoted only by a two-person \
                 promote-dr operation"
            ),
            r => {
                let n = voter_ids(&after).len();
                format!(
                    "node {id} votes as a {} node once caught up: {n} voters, a quorum is {}",
                    r.as_str(),
                    quorum(n)
                )
            }
        },
    ];
    Ok(Ok(Plan {
        steps,
        effect,
        checks,
        backup_first: false,
        fence,
    }))
}

fn short_key(key: &str) -> &str {
    &key[..key.len().min(16)]
}

fn leads<V>(seen: &MembershipFacts, id: u64) -> Option<Result<Result<Plan, OpRefusal>, V>> {
    (seen.leader == Some(id)).then(|| {
        Ok(Err(OpRefusal::Precondition(format!(
            "node {id} leads: move leadership first (op propose transfer-leadership)"
        ))))
    })
}

/// Removing a member: quorum kept (of healthy voters, before and after),
/// a voter that may lead left, not the leader.
fn plan_remove_node<V: View>(
    view: &V,
    id: u64,
    seen: &MembershipFacts,
) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let (m, fence) = membership_fence(view, &[id])?;
    let before = seats(&m);
    let Some(seat) = before.iter().find(|s| s.id == id).copied() else {
        return Ok(Err(match view.member_record(id)?.and_then(|r| r.removed) {
            Some(_) => OpRefusal::NothingToDo(format!("node {id} was removed already")),
            None => OpRefusal::Precondition(format!("node {id} is not a member")),
        }));
    };
    if let Some(r) = leads(seen, id) {
        return r;
    }
    let after: Vec<Seat> = before.iter().filter(|s| s.id != id).copied().collect();
    let mut checks = vec![format!("node {id} is a member ({})", seat.role.as_str())];
    if seat.voter {
        if !after.iter().any(|s| s.voter && s.role.may_campaign()) {
            return Ok(Err(OpRefusal::Precondition(format!(
                "removing node {id} would leave no voter that may lead (active or standby)"
            ))));
        }
        match quorum_check(
            seen,
            &voter_ids(&before),
            &voter_ids(&after),
            &format!("removing node {id}"),
        ) {
            Ok(c) => checks.extend(c),
            Err(r) => return Ok(Err(r)),
        }
    } else {
        checks.push(format!(
            "node {id} is a learner: the voters and the quorum do not change"
        ));
        // The change is an entry of its own, which needs a quorum to commit.
        let voters = voter_ids(&before);
        match quorum_check(seen, &voters, &voters, &format!("removing node {id}")) {
            Ok(c) => checks.extend(c),
            Err(r) => return Ok(Err(r)),
        }
    }
    let effect = vec![
        format!(
            "node {id} ({}) is removed: the members refuse it from then on; it serves nothing and \
             takes no part in elections; its data directory stays on its machine, not deleted",
            seat.role.as_str()
        ),
        format!("membership before: {}", seats_text(&before)),
        format!("membership after: {}", seats_text(&after)),
        format!("node id {id} is never a member again (a node rejoins under a fresh id)"),
    ];
    Ok(Ok(Plan {
        steps: vec![Step::Membership(MemberStep::Remove { id })],
        effect,
        checks,
        backup_first: false,
        fence,
    }))
}

/// Replacing a voter by a caught-up learner, which takes its role: one
/// joint-consensus change with a quorum of healthy voters of both configs.
fn plan_replace_node<V: View>(
    view: &V,
    old: u64,
    new: u64,
    seen: &MembershipFacts,
) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let (m, fence) = membership_fence(view, &[old, new])?;
    let before = seats(&m);
    let Some(o) = before.iter().find(|s| s.id == old && s.voter).copied() else {
        return Ok(Err(OpRefusal::Precondition(format!("node {old} is not a voter"))));
    };
    let Some(n) = before.iter().find(|s| s.id == new && !s.voter).copied() else {
        return Ok(Err(OpRefusal::Precondition(format!(
            "node {new} is not a learner (add it first: op propose add-node)"
        ))));
    };
    if n.role == Role::Dr {
        return Ok(Err(OpRefusal::Precondition(format!(
            "node {new} is the DR copy: it is promoted only by promote-dr"
        ))));
    }
    if let Some(r) = leads(seen, old) {
        return r;
    }
    let mut checks = vec![
        format!("node {old} is a voter ({})", o.role.as_str()),
        format!("node {new} is a learner ({})", n.role.as_str()),
    ];
    match seen.get(new).and_then(|f| f.behind) {
        Some(b) if b > MAX_BEHIND_FOR_TRANSFER => {
            return Ok(Err(OpRefusal::Precondition(format!(
                "node {new} is {} log entries behind the leader (at most {} to become a voter)",
                thousands(b),
                thousands(MAX_BEHIND_FOR_TRANSFER)
            ))));
        }
        Some(b) => checks.push(format!(
            "node {new} is {} log entries behind the leader",
            thousands(b)
        )),
        None => {}
    }
    if seen.get(new).and_then(|f| f.up) == Some(false) {
        return Ok(Err(OpRefusal::Precondition(format!("node {new} is down"))));
    }
    let after: Vec<Seat> = before
        .iter()
        .filter(|s| s.id != old)
        .map(|s| match s.id == new {
            true => Seat {
                id: new,
                role: o.role,
                voter: true,
            },
            false => *s,
        })
        .collect();
    match quorum_check(
        seen,
        &voter_ids(&before),
        &voter_ids(&after),
        &format!("replacing node {old}"),
    ) {
        Ok(c) => checks.extend(c),
        Err(r) => return Ok(Err(r)),
    }
    let effect = vec![
        format!(
            "node {new} votes in node {old}'s role ({}); node {old} is removed: the members refuse \
             it from then on; its data directory stays on its machine, not deleted",
            o.role.as_str()
        ),
        format!("membership before: {}", seats_text(&before)),
        format!("membership after: {}", seats_text(&after)),
        format!(
            "one joint-consensus change: entries commit with a quorum of both the old and the new \
             voters until it is done; nothing acknowledged is lost; node id {old} is never a member \
             again"
        ),
    ];
    Ok(Ok(Plan {
        steps: vec![Step::Membership(MemberStep::Replace {
            old,
            new,
            role: o.role,
        })],
        effect,
        checks,
        backup_first: false,
        fence,
    }))
}

/// Unfreezing automatic repair: only while it is frozen; fenced on the
/// repair record (a replacement or another freeze meanwhile).
fn plan_unfreeze<V: View>(view: &V) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let record = view.repair_record()?;
    let fence = vec![part("the repair record".to_string(), &record)];
    let record = record.unwrap_or_default();
    let Some(frozen) = &record.frozen else {
        return Ok(Err(OpRefusal::NothingToDo(
            "automatic repair is not frozen".into(),
        )));
    };
    let counted: Vec<String> = record
        .failures
        .iter()
        .filter(|f| f.at_ms > record.cleared_ms)
        .map(|f| format!("node {} ({}, {})", f.node, f.what, time_text(f.at_ms)))
        .collect();
    let effect = vec![
        format!(
            "automatic repair goes on: frozen since {} ({})",
            time_text(frozen.at_ms),
            frozen.reason
        ),
        match counted.is_empty() {
            true => "no failures count towards the next freeze".to_string(),
            false => format!(
                "these failures no longer count towards the next freeze: {}",
                counted.join("; ")
            ),
        },
        "a voter still down past heal.replace_after is replaced by a healthy spare, if one exists \
         and the quorum-plus-one rule allows it"
            .to_string(),
    ];
    Ok(Ok(Plan {
        steps: vec![Step::Unfreeze],
        effect,
        checks: vec![format!("automatic repair is frozen: {}", frozen.reason)],
        backup_first: false,
        fence,
    }))
}

/// "1 h 30 min", "45 s".
pub fn duration_text(ms: i64) -> String {
    let secs = (ms.max(0) / 1000) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// A bulk expunge: the messages the rules select now, listed by UID in the
/// plan (in batches, one step each), after a verified backup. The fence is
/// that set: a message selected or unselected since (mail arriving that
/// matches, a flag changed) refuses the approval or fails the operation
/// before its first batch. Messages that arrive afterwards are not in the
/// plan and stay.
fn plan_expunge<V: View>(view: &V, x: &BulkExpunge) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let (tenant, mailbox) = (x.mailbox.tenant.as_str(), x.mailbox.mailbox.as_str());
    if x.before_ms.is_none() && !x.deleted_only {
        return Ok(Err(OpRefusal::Precondition(
            "a bulk expunge needs a rule (before a date, flagged \\Deleted, or both); \
             delete-mailbox removes a whole mailbox"
                .into(),
        )));
    }
    let t = view.tenant(tenant)?;
    if t.is_none() {
        return Ok(Err(OpRefusal::Precondition(format!(
            "tenant {tenant} does not exist"
        ))));
    }
    let Some(rec) = view.mailbox(tenant, mailbox)? else {
        return Ok(Err(OpRefusal::Precondition(format!(
            "mailbox {tenant}/{mailbox} does not exist"
        ))));
    };
    let facts = view.message_facts(tenant, mailbox)?;
    let unreadable: Vec<u32> = facts.iter().filter_map(|f| f.as_ref().err().copied()).collect();
    let selected: Vec<&MessageFacts> = facts
        .iter()
        .filter_map(|f| f.as_ref().ok())
        .filter(|f| x.selects(f))
        .collect();
    if selected.is_empty() {
        return Ok(Err(OpRefusal::NothingToDo(format!(
            "no message of {} matches ({})",
            x.mailbox,
            x.rules_text()
        ))));
    }
    if selected.len() > MAX_BULK_EXPUNGE {
        return Ok(Err(OpRefusal::Precondition(format!(
            "{} messages match, more than the {} one operation expunges: narrow it (an earlier date)",
            thousands(selected.len() as u64),
            thousands(MAX_BULK_EXPUNGE as u64)
        ))));
    }
    let uids: Vec<u32> = selected.iter().map(|f| f.uid).collect();
    let bytes: u64 = selected.iter().map(|f| f.size).sum();
    let steps = uids
        .chunks(EXPUNGE_BATCH)
        .map(|c| Step::Expunge {
            mailbox: x.mailbox.clone(),
            uids: c.to_vec(),
        })
        .collect();
    let set: Vec<(u32, u64)> = selected.iter().map(|f| (f.uid, f.size)).collect();
    let fence = vec![
        part(format!("tenant {tenant}"), &t.map(|t| t.keys.len())),
        part(format!("mailbox {}", x.mailbox), &Some(rec.uidvalidity)),
        part(format!("the messages of {} it selects", x.mailbox), &Some(set)),
    ];
    let mut effect = vec![
        format!(
            "mailbox {}: {} of its {} messages ({}), {}, expunged (UIDs {})",
            x.mailbox,
            thousands(uids.len() as u64),
            thousands(rec.messages),
            size_text(bytes),
            x.rules_text(),
            uids_text(&uids)
        ),
        format!(
            "the other {} messages stay, and so does mail arriving after the rehearsal",
            thousands(rec.messages.saturating_sub(uids.len() as u64))
        ),
        "a verified backup is taken first: the messages can be restored from it \
         (`mailvault-admin backup restore-mailbox`, into a new mailbox)"
            .to_string(),
        "front ends watching the mailbox see each one EXPUNGED".to_string(),
    ];
    if !unreadable.is_empty() {
        effect.push(format!(
            "{} message records cannot be read on this node (UIDs {}) and are left alone",
            unreadable.len(),
            uids_text(&unreadable)
        ));
    }
    let checks = vec![
        format!("tenant {tenant} exists"),
        format!("mailbox {} exists", x.mailbox),
        format!(
            "the same {} messages match when the approval is recorded and before the first batch \
             (a message matching or no longer matching refuses the approval or fails the operation, \
             nothing expunged)",
            thousands(uids.len() as u64)
        ),
    ];
    Ok(Ok(Plan {
        steps,
        effect,
        checks,
        backup_first: true,
        fence,
    }))
}

/// Ascending UIDs in words: `1–4, 7, 9–12`, the first few runs.
fn uids_text(uids: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &u in uids {
        match runs.last_mut() {
            Some((_, end)) if u == end.saturating_add(1) => *end = u,
            _ => runs.push((u, u)),
        }
    }
    const SHOWN: usize = 8;
    let mut text: Vec<String> = runs
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| match a == b {
            true => a.to_string(),
            false => format!("{a}\u{2013}{b}"),
        })
        .collect();
    if runs.len() > SHOWN {
        text.push(format!("and {} more runs", runs.len() - SHOWN));
    }
    text.join(", ")
}

/// The audit settings: stored for every node, replacing their configs.
/// Turning fail_closed off is the change that can lose records; on or off,
/// it is a change of what the audit log guarantees, so two people make it.
fn plan_audit_settings<V: View>(view: &V, fail_closed: bool) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let current = view.audit_settings()?;
    if current.as_ref().is_some_and(|c| c.fail_closed == fail_closed) {
        return Ok(Err(OpRefusal::NothingToDo(format!(
            "the cluster's audit fail_closed is {fail_closed} already"
        ))));
    }
    let was = match &current {
        Some(c) => format!(
            "the cluster's setting, {} (set by {})",
            c.fail_closed, c.operation
        ),
        None => "each node's [audit] fail_closed config".to_string(),
    };
    let effect = match fail_closed {
        true => "every access waits until its audit record is committed, and fails (AUDIT_UNAVAILABLE) \
                 when it cannot be: no access without its record"
            .to_string(),
        false => "accesses no longer wait for their audit record: a record still queued on a node that \
                  crashes is lost (and counted in mailvault_audit_dropped_total when the queue is full)"
            .to_string(),
    };
    Ok(Ok(Plan {
        steps: vec![Step::AuditSettings { fail_closed }],
        effect: vec![
            format!("audit fail_closed becomes {fail_closed} on every node (was: {was})"),
            effect,
            "each node applies it within a second of the step; its config no longer decides".to_string(),
        ],
        checks: vec![format!("the cluster's setting is not {fail_closed} already")],
        backup_first: false,
        fence: vec![part("the audit settings".to_string(), &current)],
    }))
}

/// A mailbox restore: the backup still held by the node that verified it
/// for the rehearsal, the tenant there, the new mailbox not. Two steps: the
/// empty mailbox (fenced: it must still be absent), then the messages. No
/// backup first: nothing live is overwritten or removed.
fn plan_restore_mailbox<V: View>(
    view: &V,
    r: &MailboxFromBackup,
) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let tenant = r.from.tenant.as_str();
    let into = r.into_name();
    let t = view.tenant(tenant)?;
    if t.is_none() {
        return Ok(Err(OpRefusal::Precondition(format!(
            "tenant {tenant} does not exist"
        ))));
    }
    let b = view.backup(&r.backup)?;
    let Some(rec) = b.as_ref() else {
        return Ok(Err(OpRefusal::Precondition(format!(
            "backup {} is not in the catalog",
            r.backup
        ))));
    };
    if !rec.is_local() {
        return Ok(Err(OpRefusal::Precondition(format!(
            "backup {}'s local copy was removed (retention): no node holds it to restore from",
            r.backup
        ))));
    }
    if rec.entry.node != r.found.node {
        return Ok(Err(OpRefusal::Precondition(format!(
            "backup {} is held by node {}, not by node {} which checked it",
            r.backup, rec.entry.node, r.found.node
        ))));
    }
    let m = view.mailbox(tenant, &r.into)?;
    if m.is_some() {
        return Ok(Err(OpRefusal::Precondition(format!(
            "mailbox {into} exists: restore into a new name"
        ))));
    }
    let fence = vec![
        part(format!("tenant {tenant}"), &t.map(|t| t.keys.len())),
        part(
            format!("backup {} (held)", r.backup),
            &Some((rec.entry.node, rec.is_local())),
        ),
        part(format!("mailbox {into}"), &m.map(|m| m.uidvalidity)),
    ];
    Ok(Ok(Plan {
        steps: vec![Step::CreateMailbox(into.clone()), Step::RestoreMailbox(r.clone())],
        effect: vec![
            format!(
                "mailbox {into} is created and filled with the {} messages ({}) that {} held in backup {} \
                 (taken {}): flags, keywords and internal dates as there, new UIDs",
                thousands(r.found.messages),
                size_text(r.found.bytes),
                r.from,
                r.backup,
                time_text(rec.entry.taken_at_ms)
            ),
            "no live mailbox is changed or removed: no backup is needed first".to_string(),
            format!(
                "node {} decrypts and seals the messages again for {into}; no plaintext leaves it",
                r.found.node
            ),
        ],
        checks: vec![
            format!(
                "backup {} verified on node {} (manifest, every file's checksum, its keys) and holds {} \
                 readable messages of {}",
                r.backup,
                r.found.node,
                thousands(r.found.messages),
                r.from
            ),
            format!("tenant {tenant} exists"),
            format!("mailbox {into} does not exist (when approved and when created)"),
            format!(
                "backup {} is still held by node {} (verified again before the first message)",
                r.backup, r.found.node
            ),
        ],
        backup_first: false,
        fence,
    }))
}

/// An export approval: the exporter must hold the exporter role on the
/// tenant already (the approval adds to the role, it does not replace it),
/// and the mailbox must exist. The plan depends on the exporter's policy and
/// on the mailbox being the same one (its UIDVALIDITY), not on its mail.
fn plan_export<V: View>(view: &V, x: &Export) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let (exporter, tenant, mailbox, until_ms) =
        (&x.exporter, &x.mailbox.tenant, &x.mailbox.mailbox, x.until_ms);
    let policy = view.policy(exporter)?;
    let current = policy.clone().unwrap_or_default();
    if current.revoked {
        return Ok(Err(OpRefusal::Precondition(format!(
            "identity {exporter} is revoked"
        ))));
    }
    if !current.permits(tenant, super::policy::Action::Export) {
        return Ok(Err(OpRefusal::Precondition(format!(
            "{exporter} holds no exporter role on tenant {tenant}: grant it first"
        ))));
    }
    let m = view.mailbox(tenant, mailbox)?;
    let Some(rec) = m else {
        return Ok(Err(OpRefusal::Precondition(format!(
            "mailbox {tenant}/{mailbox} does not exist"
        ))));
    };
    let fence = vec![
        part(format!("policy of identity {exporter}"), &policy),
        part(
            format!("mailbox {tenant}/{mailbox} (UIDVALIDITY)"),
            &Some(rec.uidvalidity),
        ),
    ];
    Ok(Ok(Plan {
        steps: vec![Step::ApproveExport(x.clone())],
        effect: vec![
            format!(
                "{exporter} may export mailbox {tenant}/{mailbox} ({} messages, {} now, addresses unmasked) \
                 from the approval until {}",
                thousands(rec.messages),
                size_text(rec.total_bytes),
                time_text(until_ms)
            ),
            "no other identity, mailbox or time: ExportMailbox is refused (EXPORT_NOT_APPROVED) outside it"
                .to_string(),
        ],
        checks: vec![
            format!("identity {exporter} is not revoked and holds the exporter role on {tenant}"),
            format!("mailbox {tenant}/{mailbox} exists"),
        ],
        backup_first: false,
        fence,
    }))
}

/// A mailbox's deletion: after a verified backup, the mailbox as rehearsed
/// (any change to it since refuses the approval or fails the operation,
/// with nothing deleted).
fn plan_delete_mailbox<V: View>(view: &V, name: &MailboxName) -> Result<Result<Plan, OpRefusal>, V::Error> {
    let (tenant, mailbox) = (name.tenant.as_str(), name.mailbox.as_str());
    let t = view.tenant(tenant)?;
    if t.is_none() {
        return Ok(Err(OpRefusal::Precondition(format!(
            "tenant {tenant} does not exist"
        ))));
    }
    let m = view.mailbox(tenant, mailbox)?;
    let Some(rec) = m.clone() else {
        return Ok(Err(OpRefusal::Precondition(format!(
            "mailbox {tenant}/{mailbox} does not exist"
        ))));
    };
    let fence = vec![
        part(format!("tenant {tenant}"), &t.map(|t| t.keys.len())),
        part(format!("mailbox {tenant}/{mailbox}"), &m),
    ];
    let effect = vec![
        format!(
            "mailbox {tenant}/{mailbox}: {} messages, {}, deleted (UIDVALIDITY {}, highest MODSEQ {})",
            thousands(rec.messages),
            size_text(rec.total_bytes),
            rec.uidvalidity,
            rec.highest_modseq
        ),
        "a verified backup is taken first: the mailbox can be restored from it \
         (`mailvault-admin backup restore-mailbox`)"
            .to_string(),
        "front ends get MAILBOX_NOT_FOUND for it afterwards".to_string(),
    ];
    let checks = vec![
        format!("tenant {tenant} exists"),
        format!("mailbox {tenant}/{mailbox} exists"),
        "the mailbox is as rehearsed when the approval is recorded and when it is deleted \
         (mail arriving meanwhile refuses the approval or fails the operation, nothing deleted)"
            .to_string(),
    ];
    Ok(Ok(Plan {
        steps: vec![Step::DeleteMailbox(name.clone())],
        effect,
        checks,
        backup_first: true,
        fence,
    }))
}

/// An RFC 3339 UTC time (to the second).
pub fn time_text(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
                .to_string()
        }
        Err(_) => format!("{ms} ms"),
    }
}

/// 1,204
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in words (`512 bytes`, `88.0 MiB`).
pub fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} bytes"),
        u => format!("{v:.1} {}", UNITS[u]),
    }
}

/// An identity's roles, in words.
fn roles_text(p: &IdentityPolicy) -> String {
    let mut parts: Vec<String> = p.cluster_roles.iter().map(|r| r.as_str().to_string()).collect();
    for (tenant, roles) in &p.tenant_roles {
        for r in roles {
            parts.push(format!("{} on {tenant}", r.as_str()));
        }
    }
    match parts.is_empty() {
        true => "none".to_string(),
        false => parts.join(", "),
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::policy::{ClusterRole, TenantRole};
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake {
        policies: HashMap<String, IdentityPolicy>,
        tenants: HashMap<String, TenantRecord>,
        mailboxes: HashMap<(String, String), MailboxRecord>,
        backups: HashMap<String, BackupRecord>,
        audit: Option<AuditSettings>,
        messages: HashMap<(String, String), Vec<Result<MessageFacts, u32>>>,
        pin: Option<LeadershipPin>,
        membership: Option<StoredMembership>,
        members: HashMap<u64, MemberRecord>,
    }

    impl View for Fake {
        type Error = ();
        fn policy(&self, identity: &str) -> Result<Option<IdentityPolicy>, ()> {
            Ok(self.policies.get(identity).cloned())
        }
        fn tenant(&self, tenant: &str) -> Result<Option<TenantRecord>, ()> {
            Ok(self.tenants.get(tenant).cloned())
        }
        fn mailbox(&self, tenant: &str, mailbox: &str) -> Result<Option<MailboxRecord>, ()> {
            Ok(self
                .mailboxes
                .get(&(tenant.to_string(), mailbox.to_string()))
                .cloned())
        }
        fn backup(&self, id: &str) -> Result<Option<BackupRecord>, ()> {
            Ok(self.backups.get(id).cloned())
        }
        fn audit_settings(&self) -> Result<Option<AuditSettings>, ()> {
            Ok(self.audit.clone())
        }
        fn message_facts(&self, tenant: &str, mailbox: &str) -> Result<Vec<Result<MessageFacts, u32>>, ()> {
            Ok(self
                .messages
                .get(&(tenant.to_string(), mailbox.to_string()))
                .cloned()
                .unwrap_or_default())
        }
        fn leadership_pin(&self) -> Result<Option<LeadershipPin>, ()> {
            Ok(self.pin.clone())
        }
        fn membership(&self) -> Result<Option<StoredMembership>, ()> {
            Ok(self.membership.clone())
        }
        fn member_record(&self, id: u64) -> Result<Option<MemberRecord>, ()> {
            Ok(self.members.get(&id).cloned())
        }
        fn repair_record(&self) -> Result<Option<RepairRecord>, ()> {
            Ok(None)
        }
    }

    fn member(role: Role) -> crate::state::member::Member {
        crate::state::member::Member {
            role,
            raft_addr: format!("10.0.0.{}:7201", role as u8 + 1),
            ..Default::default()
        }
    }

    /// Voters 1 active, 2 standby, 3 backup; learner 4 spare.
    fn three_and_a_spare() -> Fake {
        let nodes = [
            (1, member(Role::Active)),
            (2, member(Role::Standby)),
            (3, member(Role::Backup)),
            (4, member(Role::Spare)),
        ];
        let m = openraft::Membership::new(
            vec![[1, 2, 3].into()],
            nodes.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        );
        Fake {
            membership: Some(StoredMembership::new(None, m)),
            ..Fake::default()
        }
    }

    /// The leader's view: node 1 leads; `down` are down.
    fn seen(view: &Fake, down: &[u64]) -> MembershipFacts {
        let m = view.membership.as_ref().unwrap().membership();
        let voters: Vec<u64> = m.voter_ids().collect();
        MembershipFacts {
            leader: Some(1),
            members: m
                .nodes()
                .map(|(id, n)| MemberFacts {
                    id: *id,
                    member: n.clone(),
                    voter: voters.contains(id),
                    up: Some(!down.contains(id)),
                    behind: Some(0),
                })
                .collect(),
        }
    }

    fn refusal(r: Result<Result<Plan, OpRefusal>, ()>) -> String {
        r.unwrap().unwrap_err().to_string()
    }

    #[test]
    fn a_membership_change_keeps_a_healthy_quorum_at_every_step_and_is_fenced_on_the_membership() {
        let view = three_and_a_spare();
        // Removing a healthy voter of three, the others up: fine.
        let kind = OpKind::RemoveNode {
            id: 2,
            seen: seen(&view, &[]),
        };
        let plan = rehearse(&view, &kind).unwrap().unwrap();
        assert_eq!(
            plan.effect[2],
            "membership after: voters 1 (active), 3 (backup); learners 4 (spare)"
        );
        assert_eq!(plan.steps, vec![Step::Membership(MemberStep::Remove { id: 2 })]);
        // With node 3 down, removing node 2 leaves 1 healthy voter of 2.
        let kind = OpKind::RemoveNode {
            id: 2,
            seen: seen(&view, &[3]),
        };
        assert_eq!(
            refusal(rehearse(&view, &kind)),
            "removing node 2 would leave 1 healthy voter of 2 (a quorum is 2): refused"
        );
        // With two of three down nothing can commit.
        let kind = OpKind::RemoveNode {
            id: 4,
            seen: seen(&view, &[2, 3]),
        };
        assert!(refusal(rehearse(&view, &kind)).starts_with("only 1 of the 3 voters are healthy"));
        // The leader is not removed; the last voter that may lead neither.
        let kind = OpKind::RemoveNode {
            id: 1,
            seen: seen(&view, &[]),
        };
        assert!(refusal(rehearse(&view, &kind)).contains("node 1 leads: move leadership first"));
        // Replacing dead node 3 by spare 4: the joint change has 1, 2 of
        // {1,2,3} and 1, 2, 4 of {1,2,4}.
        let kind = OpKind::ReplaceNode {
            old: 3,
            new: 4,
            seen: seen(&view, &[3]),
        };
        let plan = rehearse(&view, &kind).unwrap().unwrap();
        assert_eq!(
            plan.effect[2],
            "membership after: voters 1 (active), 2 (standby), 4 (backup); learners none"
        );
        assert_eq!(
            plan.steps,
            vec![Step::Membership(MemberStep::Replace {
                old: 3,
                new: 4,
                role: Role::Backup
            })]
        );
        // …but not with node 2 down too, nor by a spare that is down.
        let kind = OpKind::ReplaceNode {
            old: 3,
            new: 4,
            seen: seen(&view, &[2, 3]),
        };
        assert!(refusal(rehearse(&view, &kind)).starts_with("only 1 of the 3 voters are healthy"));
        let kind = OpKind::ReplaceNode {
            old: 3,
            new: 4,
            seen: seen(&view, &[4]),
        };
        assert_eq!(refusal(rehearse(&view, &kind)), "node 4 is down");
        // A removed id never joins again; a member is not added twice; a
        // node holding Raft state is not added.
        let mut removed = three_and_a_spare();
        removed.members.insert(
            9,
            MemberRecord {
                removed: Some(crate::state::member::Removal {
                    by: "op-00000009".into(),
                    at_ms: 0,
                }),
                ..MemberRecord::default()
            },
        );
        let joiner = |id: u64, initialized: bool| OpKind::AddNode {
            node: JoinerFacts {
                id,
                member: crate::state::member::Member {
                    role: Role::Spare,
                    raft_addr: format!("10.0.1.{id}:7201"),
                    ..Default::default()
                },
                initialized,
                ..JoinerFacts::default()
            },
            seen: seen(&removed, &[]),
        };
        assert!(refusal(rehearse(&removed, &joiner(9, false))).starts_with("node 9 was removed (op-00000009"));
        assert_eq!(
            refusal(rehearse(&removed, &joiner(4, false))),
            "nothing to do: node 4 is a member already"
        );
        assert!(refusal(rehearse(&removed, &joiner(5, true))).contains("holds Raft state already"));
        let plan = rehearse(&removed, &joiner(5, false)).unwrap().unwrap();
        assert_eq!(
            plan.effect[2],
            "membership after: voters 1 (active), 2 (standby), 3 (backup); learners 4 (spare), 5 (spare)"
        );
        // Fenced on the membership: another change since refuses it.
        let before = rehearse(
            &view,
            &OpKind::RemoveNode {
                id: 4,
                seen: seen(&view, &[]),
            },
        )
        .unwrap()
        .unwrap();
        let mut moved = three_and_a_spare();
        let m = moved.membership.as_ref().unwrap().membership().clone();
        moved.membership = Some(StoredMembership::new(
            Some(openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 7)),
            m,
        ));
        let after = rehearse(
            &moved,
            &OpKind::RemoveNode {
                id: 4,
                seen: seen(&moved, &[]),
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            before.fence_changes(&after.fence),
            vec!["the membership".to_string()]
        );
    }

    fn transfer(to: u64, leader: u64, behind: Option<u64>) -> OpKind {
        use crate::state::member::Role;
        let voters = [(1, Role::Active), (2, Role::Standby), (3, Role::Backup)]
            .into_iter()
            .map(|(id, role)| VoterFacts {
                id,
                role,
                behind: (id != leader).then_some(behind).flatten(),
            })
            .collect();
        OpKind::TransferLeadership(LeadershipTransfer {
            to,
            hold_ms: 3_600_000,
            seen: LeadershipFacts {
                leader: Some(leader),
                voters,
            },
        })
    }

    #[test]
    fn a_leadership_transfer_goes_only_to_a_caught_up_voter_that_may_lead_and_is_fenced_on_the_hold() {
        let mut v = Fake::default();
        let plan = rehearse(&v, &transfer(2, 1, Some(3))).unwrap().unwrap();
        assert_eq!(
            plan.steps,
            vec![Step::Leadership {
                to: 2,
                hold_ms: 3_600_000
            }]
        );
        assert!(!plan.backup_first);
        assert_eq!(
            plan.effect[0],
            "leadership moves from node 1 (active) to node 2 (standby)"
        );
        assert!(plan.effect[2].contains("for 1h"), "{:?}", plan.effect);
        assert!(plan
            .checks
            .iter()
            .any(|c| c == "node 2 is 3 log entries behind the leader"));
        assert!(plan.steps[0].runs_outside());

        let refused = |k: OpKind| rehearse(&v, &k).unwrap().unwrap_err().to_string();
        assert_eq!(
            refused(transfer(7, 1, Some(0))),
            "node 7 is not a voter (the voters: 1, 2, 3)"
        );
        assert_eq!(
            refused(transfer(3, 1, Some(0))),
            "node 3 is a backup voter, which never leads by choice"
        );
        assert_eq!(
            refused(transfer(1, 1, Some(0))),
            "nothing to do: node 1 leads already"
        );
        assert_eq!(
            refused(transfer(2, 1, Some(5_000))),
            "node 2 is 5,000 log entries behind the leader (at most 1,000 for a transfer)"
        );
        // Rehearsed on a follower: said so, and rehearsed again on the leader.
        let there = rehearse(&v, &transfer(2, 1, None)).unwrap().unwrap();
        assert!(
            there.checks[2].contains("measured on the leader"),
            "{:?}",
            there.checks
        );

        v.pin = Some(LeadershipPin {
            node: 1,
            until_ms: 1,
            operation: "op-00000009".into(),
        });
        let again = rehearse(&v, &transfer(2, 1, Some(3))).unwrap().unwrap();
        assert_ne!(again.fence_hash(), plan.fence_hash(), "fenced on the hold");
        assert!(
            again.effect[3].contains("replaces the hold of op-00000009"),
            "{:?}",
            again.effect
        );
    }

    #[test]
    fn the_audit_settings_replace_the_configs_and_a_change_to_the_same_is_nothing_to_do() {
        let mut v = Fake::default();
        let on = OpKind::AuditSettings { fail_closed: true };
        let plan = rehearse(&v, &on).unwrap().unwrap();
        assert_eq!(plan.steps, vec![Step::AuditSettings { fail_closed: true }]);
        assert!(
            plan.effect[0].contains("was: each node's [audit] fail_closed config"),
            "{:?}",
            plan.effect
        );
        v.audit = Some(AuditSettings {
            fail_closed: true,
            operation: "op-00000001".into(),
        });
        let e = rehearse(&v, &on).unwrap().unwrap_err();
        assert!(matches!(e, OpRefusal::NothingToDo(_)), "{e:?}");
        let off = rehearse(&v, &OpKind::AuditSettings { fail_closed: false })
            .unwrap()
            .unwrap();
        assert!(off.effect[1].contains("lost"), "{:?}", off.effect);
        assert_ne!(off.fence_hash(), plan.fence_hash(), "fenced on the settings");
    }

    const BACKUP: &str = "20261207T020000Z-000000000042";

    fn restore(into: &str) -> OpKind {
        OpKind::RestoreMailbox(MailboxFromBackup {
            backup: BACKUP.into(),
            from: MailboxName {
                tenant: "acme".into(),
                mailbox: "support".into(),
            },
            into: into.into(),
            found: BackupFinding {
                node: 3,
                messages: 21,
                bytes: 4096,
            },
        })
    }

    #[test]
    fn a_mailbox_restore_creates_a_new_mailbox_then_fills_it_and_needs_the_backup_held() {
        use crate::state::backup::BackupEntry;
        let mut v = Fake::default();
        v.tenants.insert("acme".into(), TenantRecord { keys: vec![] });
        let kind = restore("support-restored");
        let e = rehearse(&v, &kind).unwrap().unwrap_err();
        assert_eq!(
            e,
            OpRefusal::Precondition(format!("backup {BACKUP} is not in the catalog"))
        );
        let mut rec = BackupRecord {
            entry: BackupEntry {
                id: BACKUP.into(),
                node: 3,
                taken_at_ms: 0,
                applied_index: 42,
                applied_term: 2,
                files: 9,
                bytes: 1 << 20,
                took_ms: 80,
            },
            local_removed_at_ms: None,
            shipped: None,
            offsite_removed_at_ms: None,
            drill: None,
        };
        v.backups.insert(BACKUP.into(), rec.clone());
        let plan = rehearse(&v, &kind).unwrap().unwrap();
        assert!(!plan.backup_first, "nothing live is changed");
        let actions: Vec<_> = plan.steps.iter().map(Step::action).collect();
        assert_eq!(actions, ["create-mailbox", "restore-mailbox"]);
        assert!(plan.steps[1].runs_outside() && !plan.steps[0].runs_outside());
        assert_eq!(
            plan.steps[1].describe(),
            format!("restore the 21 messages of acme/support in backup {BACKUP} into acme/support-restored, on node 3")
        );
        assert!(
            plan.effect[0].contains("21 messages (4.0 KiB)"),
            "{:?}",
            plan.effect
        );
        // The new mailbox exists: refused; the same name as a live mailbox too.
        let empty = MailboxRecord {
            uidvalidity: 9,
            uidnext: 1,
            highest_modseq: 0,
            messages: 0,
            total_bytes: 0,
        };
        v.mailboxes.insert(("acme".into(), "support".into()), empty);
        let e = rehearse(&v, &restore("support")).unwrap().unwrap_err();
        assert_eq!(
            e,
            OpRefusal::Precondition("mailbox acme/support exists: restore into a new name".into())
        );
        // Checked by another node than the one holding it, or removed: refused.
        rec.entry.node = 2;
        v.backups.insert(BACKUP.into(), rec.clone());
        assert!(matches!(
            rehearse(&v, &kind).unwrap(),
            Err(OpRefusal::Precondition(_))
        ));
        rec.entry.node = 3;
        rec.local_removed_at_ms = Some(5);
        v.backups.insert(BACKUP.into(), rec);
        let e = rehearse(&v, &kind).unwrap().unwrap_err();
        assert!(e.to_string().contains("local copy was removed"), "{e}");
    }

    #[test]
    fn a_mailbox_deletion_backs_up_first_says_what_goes_and_is_fenced_on_the_mailbox() {
        let mut v = Fake::default();
        let kind = OpKind::DeleteMailbox(MailboxName {
            tenant: "acme".into(),
            mailbox: "support".into(),
        });
        let e = rehearse(&v, &kind).unwrap().unwrap_err();
        assert_eq!(e, OpRefusal::Precondition("tenant acme does not exist".into()));
        v.tenants.insert("acme".into(), TenantRecord { keys: vec![] });
        let e = rehearse(&v, &kind).unwrap().unwrap_err();
        assert_eq!(
            e,
            OpRefusal::Precondition("mailbox acme/support does not exist".into())
        );
        let mut rec = MailboxRecord {
            uidvalidity: 7,
            uidnext: 1205,
            highest_modseq: 1300,
            messages: 1204,
            total_bytes: 88 * 1024 * 1024,
        };
        v.mailboxes.insert(("acme".into(), "support".into()), rec.clone());
        let plan = rehearse(&v, &kind).unwrap().unwrap();
        assert!(plan.backup_first);
        assert_eq!(
            plan.effect[0],
            "mailbox acme/support: 1,204 messages, 88.0 MiB, deleted (UIDVALIDITY 7, highest MODSEQ 1300)"
        );
        assert_eq!(
            plan.steps[0].describe(),
            "delete mailbox acme/support and every message in it"
        );
        // Mail arriving moves the fence, naming the mailbox.
        rec.messages += 1;
        rec.highest_modseq += 1;
        v.mailboxes.insert(("acme".into(), "support".into()), rec);
        let again = rehearse(&v, &kind).unwrap().unwrap();
        assert_eq!(
            plan.fence_changes(&again.fence),
            vec!["mailbox acme/support".to_string()]
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(size_text(512), "512 bytes");
    }

    #[test]
    fn a_bulk_expunge_lists_the_uids_it_selects_in_batches_and_is_fenced_on_that_set() {
        const CUT: i64 = 1_767_225_600_000; // 2026-01-01
        let name = MailboxName {
            tenant: "acme".into(),
            mailbox: "support".into(),
        };
        let kind = |before_ms, deleted_only| {
            OpKind::Expunge(BulkExpunge {
                mailbox: name.clone(),
                before_ms,
                deleted_only,
            })
        };
        let mut v = Fake::default();
        v.tenants.insert("acme".into(), TenantRecord { keys: vec![] });
        v.mailboxes.insert(
            ("acme".into(), "support".into()),
            MailboxRecord {
                uidvalidity: 7,
                uidnext: 2602,
                highest_modseq: 3000,
                messages: 2601,
                total_bytes: 2601 * 1000,
            },
        );
        // UIDs 1–2500 of 2025 (every tenth \Deleted), 2501–2600 of 2026,
        // and UID 2601 unreadable here.
        let mut facts: Vec<Result<MessageFacts, u32>> = (1..=2600u32)
            .map(|uid| {
                Ok(MessageFacts {
                    uid,
                    internal_date_ms: if uid <= 2500 { CUT - 1 } else { CUT },
                    size: 1000,
                    deleted: uid % 10 == 0,
                })
            })
            .collect();
        facts.push(Err(2601));
        v.messages
            .insert(("acme".into(), "support".into()), facts.clone());

        let e = rehearse(&v, &kind(None, false)).unwrap().unwrap_err();
        assert!(
            matches!(e, OpRefusal::Precondition(ref w) if w.contains("needs a rule")),
            "{e:?}"
        );

        let plan = rehearse(&v, &kind(Some(CUT), false)).unwrap().unwrap();
        assert!(plan.backup_first);
        assert_eq!(plan.steps.len(), 3, "1,000 UIDs a step");
        let listed: Vec<u32> = plan
            .steps
            .iter()
            .flat_map(|s| match s {
                Step::Expunge { uids, .. } => uids.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(listed, (1..=2500).collect::<Vec<_>>());
        assert_eq!(
            plan.effect[0],
            "mailbox acme/support: 2,500 of its 2,601 messages (2.4 MiB), received before \
             2026-01-01T00:00:00Z, expunged (UIDs 1\u{2013}2500)"
        );
        assert!(
            plan.effect
                .iter()
                .any(|e| e.contains("(UIDs 2601) and are left alone")),
            "{:?}",
            plan.effect
        );
        assert_eq!(
            plan.steps[2].describe(),
            "expunge 500 messages of acme/support (UIDs 2001\u{2013}2500)"
        );

        // Both rules: only the old \Deleted ones.
        let both = rehearse(&v, &kind(Some(CUT), true)).unwrap().unwrap();
        assert_eq!(
            both.steps,
            vec![Step::Expunge {
                mailbox: name.clone(),
                uids: (1..=250).map(|i| i * 10).collect()
            }]
        );
        assert!(both.effect[0].contains("(UIDs 10, 20, 30, 40, 50, 60, 70, 80, and 242 more runs)"));

        // A message unselected since (its date is what it is, but a flag
        // changed) moves the fence; mail arriving that does not match does not.
        let mut changed = facts.clone();
        if let Ok(m) = &mut changed[9] {
            m.deleted = false;
        }
        v.messages.insert(("acme".into(), "support".into()), changed);
        let again = rehearse(&v, &kind(Some(CUT), true)).unwrap().unwrap();
        assert_eq!(
            both.fence_changes(&again.fence),
            vec!["the messages of acme/support it selects".to_string()]
        );
        let mut arrived = facts.clone();
        arrived.push(Ok(MessageFacts {
            uid: 2602,
            internal_date_ms: CUT + 5,
            size: 10,
            deleted: true,
        }));
        v.messages.insert(("acme".into(), "support".into()), arrived);
        let same = rehearse(&v, &kind(Some(CUT), true)).unwrap().unwrap();
        assert_eq!(same.fence_hash(), both.fence_hash());

        // Nothing selected; too many selected.
        let e = rehearse(&v, &kind(Some(CUT - 10 * 86_400_000), false))
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, OpRefusal::NothingToDo(_)), "{e:?}");
        let many: Vec<_> = (1..=(MAX_BULK_EXPUNGE as u32 + 1))
            .map(|uid| {
                Ok(MessageFacts {
                    uid,
                    internal_date_ms: 0,
                    size: 1,
                    deleted: true,
                })
            })
            .collect();
        v.messages.insert(("acme".into(), "support".into()), many);
        let e = rehearse(&v, &kind(None, true)).unwrap().unwrap_err();
        assert!(
            matches!(e, OpRefusal::Precondition(ref w) if w.contains("more than the 50,000")),
            "{e:?}"
        );
    }

    fn grant(identity: &str, tenant: &str, role: TenantRole) -> OpKind {
        OpKind::Grant {
            identity: identity.into(),
            role: RoleGrant::Tenant {
                tenant: tenant.into(),
                role,
            },
        }
    }

    #[test]
    fn a_grant_is_planned_and_its_fence_follows_the_policy() {
        let mut v = Fake::default();
        v.tenants.insert("acme".into(), TenantRecord { keys: vec![] });
        let k = grant("bob", "acme", TenantRole::Reader);
        let plan = rehearse(&v, &k).unwrap().unwrap();
        assert_eq!(plan.steps.len(), 1);
        assert_eq!(plan.steps[0].describe(), "grant reader on tenant acme to bob");
        assert!(
            plan.effect[0].contains("bob gains reader on tenant acme"),
            "{:?}",
            plan.effect
        );
        assert!(!plan.backup_first);
        // The same state: the same fence. A policy change: another one, and
        // it is named.
        assert_eq!(rehearse(&v, &k).unwrap().unwrap().fence_hash(), plan.fence_hash());
        let mut p = IdentityPolicy::default();
        p.cluster_roles.insert(ClusterRole::Auditor);
        v.policies.insert("bob".into(), p);
        let again = rehearse(&v, &k).unwrap().unwrap();
        assert_ne!(again.fence_hash(), plan.fence_hash());
        assert_eq!(
            plan.fence_changes(&again.fence),
            vec!["policy of identity bob".to_string()]
        );
    }

    #[test]
    fn a_grant_on_a_missing_tenant_a_revoked_identity_or_a_held_role_is_refused() {
        let mut v = Fake::default();
        let e = rehearse(&v, &grant("bob", "acne", TenantRole::Reader))
            .unwrap()
            .unwrap_err();
        assert_eq!(e, OpRefusal::Precondition("tenant acne does not exist".into()));
        v.tenants.insert("acme".into(), TenantRecord { keys: vec![] });
        let mut p = IdentityPolicy::default();
        p.tenant_roles
            .entry("acme".into())
            .or_default()
            .insert(TenantRole::Reader);
        v.policies.insert("bob".into(), p.clone());
        let e = rehearse(&v, &grant("bob", "acme", TenantRole::Reader))
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, OpRefusal::NothingToDo(_)), "{e:?}");
        p.revoked = true;
        v.policies.insert("bob".into(), p);
        let e = rehearse(&v, &grant("bob", "acme", TenantRole::Agent))
            .unwrap()
            .unwrap_err();
        assert_eq!(e, OpRefusal::Precondition("identity bob is revoked".into()));
    }

    #[test]
    fn widening_an_allowlist_is_told_from_narrowing_it() {
        let n = |s: &str| -> Vec<ipnet::IpNet> { s.split(' ').map(|n| n.parse().unwrap()).collect() };
        assert!(!widens(&[], &n("10.0.0.0/8")), "anywhere → a network narrows");
        assert!(widens(&n("10.0.0.0/8"), &[]), "a network → anywhere widens");
        assert!(!widens(&n("10.0.0.0/8"), &n("10.1.0.0/16")));
        assert!(widens(&n("10.1.0.0/16"), &n("10.0.0.0/8")));
        assert!(widens(&n("10.0.0.0/8"), &n("10.0.0.0/8 192.168.0.0/16")));
        assert!(!widens(&n("10.0.0.0/8 192.168.0.0/16"), &n("192.168.1.0/24")));
    }

    #[test]
    fn the_plan_hash_covers_the_id_the_plan_and_the_expiry() {
        let mut v = Fake::default();
        v.tenants.insert("acme".into(), TenantRecord { keys: vec![] });
        let kind = grant("bob", "acme", TenantRole::Reader);
        let plan = rehearse(&v, &kind).unwrap().unwrap();
        let alice = Person {
            identity: "alice".into(),
            key: "00".into(),
        };
        let h = plan_hash("op-00000001", &kind, "T-1", &alice, 10, &plan);
        assert_eq!(h, plan_hash("op-00000001", &kind, "T-1", &alice, 10, &plan));
        assert_ne!(h, plan_hash("op-00000002", &kind, "T-1", &alice, 10, &plan));
        assert_ne!(h, plan_hash("op-00000001", &kind, "T-1", &alice, 11, &plan));
        assert_ne!(h, plan_hash("op-00000001", &kind, "T-2", &alice, 10, &plan));
    }
}
