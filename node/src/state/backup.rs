//! A backup's manifest: what a backup is and holds, written last and
//! authenticated (a MAC under a key derived from the master key, see
//! `crypto::BackupSeal`), so that a backup without a valid manifest does not
//! exist. JSON, for people and tools to read; frozen like every format here
//! (change it with [`MANIFEST_FORMAT`]).
//!
//! A backup directory holds `data/` (a checkpoint of the state database, its
//! tenant records holding no wrapped key), `keyring.json` (the tenants'
//! wrapped data keys, an object of its own so that crypto-shredding can
//! rewrite every copy's keyring without touching the data) and
//! `manifest.json`. It never holds plaintext mail or the master key.
//!
//! Also the backup catalog (data version 5): [`BackupChange`], replicated as
//! `Command::Backups`, and [`BackupRecord`], stored under `keys::BACKUP`,
//! which every node reads to know which backups exist, where, and what
//! became of them.

use serde::{Deserialize, Serialize};

use super::records::WrappedKey;

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// One file of a backup: its path inside the backup, size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    /// Path relative to the backup's root (`data/000012.sst`, `keyring.json`).
    pub path: String,
    /// Length in bytes.
    pub bytes: u64,
    /// SHA-256 of its content, lower-case hex.
    pub sha256: String,
}

/// A member of the cluster when the backup was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMember {
    /// Node id.
    pub id: u64,
    /// Its role (`active`, `standby`, `backup`, `spare`, `dr`).
    pub role: String,
    /// Whether it was a voter.
    pub voter: bool,
}

/// A tenant in the backup and the versions of its data keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupTenant {
    /// Tenant name.
    pub name: String,
    /// Its key versions, oldest first.
    pub key_versions: Vec<u32>,
}

/// The head of the audit chain in the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupAuditHead {
    /// Last sequence number.
    pub seq: u64,
    /// Its hash, hex.
    pub hash: String,
}

/// What a backup is and holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The cluster's name.
    pub cluster: String,
    /// The backup's id (its UTC time and applied index).
    pub backup_id: String,
    /// The node that took it.
    pub taken_by: u64,
    /// When (milliseconds since the epoch, and RFC 3339 UTC).
    pub time_ms: i64,
    /// The same time, RFC 3339.
    pub time: String,
    /// The mailvault-node version that took it.
    pub mailvault_version: String,
    /// The data version of its state.
    pub data_version: u32,
    /// The last log index applied in it, and that entry's term.
    pub applied_index: u64,
    /// The term of that entry.
    pub applied_term: u64,
    /// The membership in it.
    pub members: Vec<BackupMember>,
    /// Every file but the manifest, in path order.
    pub files: Vec<BackupFile>,
    /// The state digest (SHA-256 over every key and value, hex) of the state
    /// as the live nodes hold it at `applied_index` — with the data keys in
    /// the tenant records, as a restore puts them back.
    pub state_digest: String,
    /// Records in the state.
    pub records: u64,
    /// The audit chain's head in it.
    pub audit_head: BackupAuditHead,
    /// The tenants and their key versions.
    pub tenants: Vec<BackupTenant>,
    /// The fingerprint of the master key that wraps the data keys (never the key).
    pub master_key_fingerprint: String,
}

/// The stored manifest: the manifest and its MAC (hex) over the manifest's
/// JSON encoding.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedManifest {
    /// The manifest.
    pub manifest: BackupManifest,
    /// HMAC-SHA256 of `serde_json::to_vec(&manifest)`, hex.
    pub mac: String,
}

/// A backup's keyring object: each tenant's wrapped data keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupKeyring {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// By tenant name, the tenant's keys as its record held them.
    pub tenants: std::collections::BTreeMap<String, Vec<WrappedKey>>,
}

/// A change to the cluster's backup catalog (data version 5): which backups
/// exist, where, and what became of them, replicated so that every node knows
/// when the last backup was taken (the duty's schedule and its stand-in rule)
/// and any node can list them. Appended as `Command::Backups`, a nested
/// family: do not reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupChange {
    /// A backup was taken and verified on `entry.node`.
    Taken(BackupEntry),
    /// The node holding a backup removed its local copy (retention, or an
    /// operator).
    LocalRemoved {
        /// The backup.
        id: String,
        /// When (ms since the Unix epoch).
        at_ms: i64,
    },
    /// A copy was shipped off-site, and every object read back and checked.
    Shipped {
        /// The backup.
        id: String,
        /// The copy.
        copy: ShippedCopy,
    },
    /// Retention deleted the off-site copy.
    OffsiteRemoved {
        /// The backup.
        id: String,
        /// When (ms since the Unix epoch).
        at_ms: i64,
    },
    /// A restore drill of the backup ran.
    Drilled {
        /// The backup.
        id: String,
        /// How it went.
        drill: DrillResult,
    },
}

impl BackupChange {
    /// The backup the change is about.
    pub fn id(&self) -> &str {
        match self {
            BackupChange::Taken(e) => &e.id,
            BackupChange::LocalRemoved { id, .. }
            | BackupChange::Shipped { id, .. }
            | BackupChange::OffsiteRemoved { id, .. }
            | BackupChange::Drilled { id, .. } => id,
        }
    }
}

/// A backup as the catalog records it when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    /// Its id ([`BackupManifest::backup_id`]).
    pub id: String,
    /// The node that took it and holds it.
    pub node: u64,
    /// When it was taken (ms since the Unix epoch).
    pub taken_at_ms: i64,
    /// The last log index applied in it.
    pub applied_index: u64,
    /// The term of that entry.
    pub applied_term: u64,
    /// Its files, the manifest included.
    pub files: u32,
    /// Their bytes.
    pub bytes: u64,
    /// How long taking and verifying it took, in milliseconds.
    pub took_ms: u64,
}

/// A copy in the off-site store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedCopy {
    /// The store and prefix it is under (a URL without credentials).
    pub target: String,
    /// When it was verified there (ms since the Unix epoch).
    pub at_ms: i64,
    /// Objects uploaded.
    pub objects: u32,
    /// Their bytes.
    pub bytes: u64,
    /// How long the upload and the read-back took, in milliseconds.
    pub took_ms: u64,
}

/// A restore drill's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillResult {
    /// The node that ran it.
    pub node: u64,
    /// When it ended (ms since the Unix epoch).
    pub at_ms: i64,
    /// Whether the copy restored and checked whole.
    pub passed: bool,
    /// Why not (names the object at fault, never content); empty if passed.
    pub problem: String,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
}

/// A backup in the catalog: as taken, and what became of it since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// As taken.
    pub entry: BackupEntry,
    /// When the local copy was removed, if it was.
    pub local_removed_at_ms: Option<i64>,
    /// The off-site copy, once one verified.
    pub shipped: Option<ShippedCopy>,
    /// When the off-site copy was deleted, if it was.
    pub offsite_removed_at_ms: Option<i64>,
    /// The last drill of it.
    pub drill: Option<DrillResult>,
}

impl BackupRecord {
    /// Whether the node that took it still holds it.
    pub fn is_local(&self) -> bool {
        self.local_removed_at_ms.is_none()
    }

    /// Whether a verified off-site copy exists.
    pub fn is_offsite(&self) -> bool {
        self.shipped.is_some() && self.offsite_removed_at_ms.is_none()
    }
}
