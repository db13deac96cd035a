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
