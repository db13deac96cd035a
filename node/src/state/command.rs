//! Commands replicated through Raft and their results.
//!
//! A command holds only ciphertext where it carries mail: bodies and parsed
//! headers are encrypted by the leader before it proposes. Commands are
//! decided deterministically by the state machine; errors a command can meet
//! there (a lost claim race, a stale `unchanged_since`) are results, not
//! failures of the entry.
//!
//! Frozen format: entries are stored in the log with this encoding. Do not
//! reorder variants or fields without a data-version migration.

use serde::{Deserialize, Serialize};

pub use super::policy::{AccessChange, RoleGrant};
pub use super::records::{BlobId, WrappedKey};

/// A new message, or the destination half of a move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewMessage {
    /// Target mailbox.
    pub mailbox: String,
    /// Idempotency key; empty for moves.
    pub idempotency_key: String,
    /// Identity of the body chunks.
    pub blob: BlobId,
    /// Data key version the ciphertexts use.
    pub key_version: u32,
    /// Initial flags and keywords.
    pub flags: Vec<String>,
    /// Internal date, ms since the Unix epoch.
    pub internal_date_ms: i64,
    /// Plaintext size in bytes.
    pub size: u64,
    /// Number of chunks already stored by earlier `PutChunk` commands.
    pub staged_chunks: u32,
    /// The final chunks, stored with this command (indexes follow the staged ones).
    pub inline_chunks: Vec<serde_bytes::ByteBuf>,
    /// Encrypted parsed headers.
    #[serde(with = "serde_bytes")]
    pub headers: Vec<u8>,
}

/// A replicated command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Creates a tenant with its first wrapped data key.
    CreateTenant {
        /// Tenant name.
        tenant: String,
        /// The wrapped data key, version 1.
        key: WrappedKey,
    },
    /// Creates a mailbox.
    CreateMailbox {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// UIDVALIDITY chosen by the leader.
        uidvalidity: u32,
    },
    /// Stores one encrypted chunk of a message being uploaded.
    PutChunk {
        /// Tenant name.
        tenant: String,
        /// Body identity.
        blob: BlobId,
        /// Chunk index.
        index: u32,
        /// The chunk's envelope.
        ciphertext: serde_bytes::ByteBuf,
    },
    /// Removes the chunks of an upload that was abandoned.
    DropBlob {
        /// Tenant name.
        tenant: String,
        /// Body identity.
        blob: BlobId,
        /// Number of chunks to remove.
        chunks: u32,
    },
    /// Appends a message (or returns the earlier one for a reused idempotency key).
    Append {
        /// Tenant name.
        tenant: String,
        /// The message.
        message: NewMessage,
    },
    /// Adds and removes flags, optionally only if unchanged since a MODSEQ.
    UpdateFlags {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// Message UID.
        uid: u32,
        /// Flags to add.
        add: Vec<String>,
        /// Flags to remove.
        remove: Vec<String>,
        /// Conditional store.
        unchanged_since: Option<u64>,
    },
    /// Claims a message for an agent.
    Claim {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// Message UID.
        uid: u32,
        /// The claiming agent.
        agent: String,
    },
    /// Releases an agent's claim.
    Release {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// Message UID.
        uid: u32,
        /// The agent that holds the claim.
        agent: String,
    },
    /// Moves a message: appends the re-encrypted copy, then expunges the source.
    Move {
        /// Tenant name.
        tenant: String,
        /// Source mailbox.
        mailbox: String,
        /// Source UID.
        uid: u32,
        /// The re-encrypted message for the destination.
        message: NewMessage,
    },
    /// Replaces an identity's access policy.
    PutIdentity {
        /// The identity.
        identity: String,
        /// Its new policy.
        policy: super::policy::IdentityPolicy,
    },
    /// Revokes a certificate serial (hex, lowercase, no colons).
    RevokeSerial {
        /// The serial.
        serial: String,
    },
    /// Appends audit events to the hash chain.
    Audit {
        /// The events, in order.
        events: Vec<super::audit::AuditEvent>,
    },
    /// Expunges messages.
    Expunge {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// UIDs to expunge; missing ones are skipped.
        uids: Vec<u32>,
    },
    /// Changes one part of an identity's access policy (data version 2).
    Access(AccessChange),
    /// Changes the backup catalog (data version 5).
    Backups(super::backup::BackupChange),
    /// Moves a two-person operation through its lifecycle (data version 6).
    Ops(super::ops::OpChange),
    /// Changes the record of automatic repair (data version 11).
    Repair(super::member::RepairChange, super::member::RepairActor),
    /// Expires uploads staged but never committed (data version 12): every
    /// staging record not yet marked idle is marked idle since `now_ms`;
    /// one idle since `now_ms - expiry_ms` or earlier loses its chunks and
    /// its record. The leader's clock is in the command, so every replica
    /// expires the same uploads.
    ExpireStaged {
        /// The leader's wall clock, ms since the Unix epoch.
        now_ms: i64,
        /// `limits.staged_expiry_secs`, in ms.
        expiry_ms: i64,
        /// The leader that proposed it (the audit records' `node:N`).
        node: u64,
    },
}

impl Command {
    /// Approximate encoded size, for batching.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Command::PutChunk { ciphertext, .. } => ciphertext.len() + 64,
            Command::Append { message, .. } | Command::Move { message, .. } => {
                message.inline_chunks.iter().map(|c| c.len()).sum::<usize>() + message.headers.len() + 256
            }
            Command::Audit { events } => events.len() * 160,
            _ => 256,
        }
    }
}

/// Why the state machine refused a command. Carried in the entry's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The tenant does not exist.
    #[error("tenant not found")]
    NoTenant,
    /// The tenant already exists.
    #[error("tenant already exists")]
    TenantExists,
    /// The mailbox does not exist.
    #[error("mailbox not found")]
    NoMailbox,
    /// The mailbox already exists.
    #[error("mailbox already exists")]
    MailboxExists,
    /// The message does not exist.
    #[error("message not found")]
    NoMessage,
    /// Another agent holds the claim.
    #[error("message is claimed by {0}")]
    ClaimedBy(String),
    /// Release by an agent that does not hold the claim.
    #[error("message is not claimed by this agent")]
    NotClaimant,
    /// The message changed after `unchanged_since`.
    #[error("message was modified (modseq {0})")]
    Modified(u64),
    /// Staged chunks of an append are missing.
    #[error("message body is incomplete")]
    IncompleteBody,
    /// The mailbox ran out of UIDs.
    #[error("mailbox has no UIDs left")]
    UidsExhausted,
    /// A role cannot be granted to a revoked identity.
    #[error("identity is revoked")]
    IdentityRevoked,
    /// The allowlist is not the one the change expected.
    #[error("allowlist changed since it was read")]
    AllowlistChanged,
    /// The backup is not in the catalog.
    #[error("backup not found")]
    NoBackup,
    /// Another node's backup already has this id (taken in the same second
    /// at the same log index).
    #[error("another backup has this id")]
    BackupIdTaken,
    /// A two-person operation's change, refused (see [`super::ops::OpRefusal`]).
    #[error("{0}")]
    Operation(super::ops::OpRefusal),
    /// A change to the repair record, refused (in words).
    #[error("{0}")]
    Repair(String),
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Done; nothing to report.
    Done,
    /// The command was refused.
    Refused(Refusal),
    /// A mailbox was created.
    MailboxCreated {
        /// Its UIDVALIDITY.
        uidvalidity: u32,
    },
    /// A message was appended (or moved in).
    Appended {
        /// Its UID.
        uid: u32,
        /// Its MODSEQ.
        modseq: u64,
        /// The mailbox's UIDVALIDITY.
        uidvalidity: u32,
        /// True if the idempotency key was seen before.
        duplicate: bool,
    },
    /// A message changed.
    Changed {
        /// The message's new MODSEQ.
        modseq: u64,
        /// The message's flags after the change.
        flags: Vec<String>,
        /// The claim holder after the change.
        claimed_by: Option<String>,
    },
    /// Messages were expunged.
    Expunged {
        /// The UIDs removed.
        uids: Vec<u32>,
        /// The mailbox's MODSEQ after the change.
        modseq: u64,
    },
    /// An identity's policy before and after an access change.
    Policy {
        /// Before.
        before: super::policy::IdentityPolicy,
        /// After (equal to `before` when the change was already in place).
        after: super::policy::IdentityPolicy,
    },
    /// A two-person operation after a change.
    Operation(Box<super::ops::Operation>),
    /// The repair record after a change.
    Repair(Box<super::member::RepairRecord>),
    /// What an `ExpireStaged` did.
    Expired {
        /// Uploads whose chunks were removed.
        uploads: u32,
        /// Chunks removed.
        chunks: u64,
        /// Uploads marked idle by this command.
        marked: u32,
    },
}
