//! Records stored by the state machine. Encoded with postcard.
//!
//! Frozen format: do not reorder fields without a data-version migration.

use serde::{Deserialize, Serialize};

/// 128-bit random identity of a stored message body (its chunks).
pub type BlobId = [u8; 16];

/// A data key wrapped by the master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Key version, starting at 1.
    pub version: u32,
    /// Envelope (format byte, nonce, ciphertext and tag) of the 32-byte key.
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
}

/// A tenant and its data keys (wrapped by the master key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Every key version, oldest first.
    pub keys: Vec<WrappedKey>,
}

impl TenantRecord {
    /// The version new writes use.
    pub fn current_version(&self) -> u32 {
        self.keys.last().map(|k| k.version).unwrap_or(0)
    }
}

/// A mailbox's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxRecord {
    /// UIDVALIDITY, fixed at creation.
    pub uidvalidity: u32,
    /// The next UID to assign.
    pub uidnext: u32,
    /// The highest MODSEQ of any change.
    pub highest_modseq: u64,
    /// Number of messages.
    pub messages: u64,
    /// Sum of message sizes.
    pub total_bytes: u64,
}

/// A message's metadata. Parsed headers are ciphertext.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageRecord {
    /// UID.
    pub uid: u32,
    /// MODSEQ of the last change.
    pub modseq: u64,
    /// Flags and keywords, sorted.
    pub flags: Vec<String>,
    /// Internal date, ms since the Unix epoch.
    pub internal_date_ms: i64,
    /// Plaintext size.
    pub size: u64,
    /// Body identity.
    pub blob: BlobId,
    /// Number of chunks.
    pub chunks: u32,
    /// Data key version.
    pub key_version: u32,
    /// Encrypted parsed headers.
    #[serde(with = "serde_bytes")]
    pub headers: Vec<u8>,
    /// Agent holding the claim.
    pub claimed_by: Option<String>,
}

/// What an idempotency key was used for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The UID the first append got.
    pub uid: u32,
    /// The MODSEQ of that append.
    pub modseq: u64,
}

/// An upload staged chunk by chunk whose message is not committed (yet)
/// (data version 12). The `Append` that commits it, or the `DropBlob` of an
/// abandoned one, removes the record; an upload whose leader died before
/// either is expired by `Command::ExpireStaged` once it has been idle for
/// `limits.staged_expiry_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedRecord {
    /// Chunks `0..chunks` may be stored (one past the highest index staged).
    pub chunks: u32,
    /// When an `ExpireStaged` first found the upload idle (ms since the Unix
    /// epoch, the leader's clock carried in that command); `None` until
    /// then, and again after every chunk staged.
    pub idle_since_ms: Option<i64>,
}

/// Kind of a change record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// A message was appended or moved in.
    Appended,
    /// Flags changed.
    Flags,
    /// A claim was taken.
    Claimed,
    /// A claim was released.
    Released,
    /// A message was expunged or moved out.
    Expunged,
}

/// One change, kept so watchers can resume from any MODSEQ.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// The UID concerned.
    pub uid: u32,
    /// What happened.
    pub kind: ChangeKind,
    /// Flags after the change.
    pub flags: Vec<String>,
    /// Claim holder after the change.
    pub claimed_by: Option<String>,
}

/// Parsed headers, encrypted before they are proposed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeaderSummary {
    /// Subject.
    pub subject: String,
    /// First From address.
    pub from: String,
    /// To addresses.
    pub to: Vec<String>,
    /// Date header, RFC 3339.
    pub date: String,
}
