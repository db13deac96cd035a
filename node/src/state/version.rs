//! The data version: which generation of the stored and replicated formats
//! (key layout, records, commands, envelope, snapshot data) a data directory
//! holds.
//!
//! It is stored in the state machine itself (key [`super::keys::META_DATA_VERSION`],
//! a big-endian u32), so every snapshot carries the version of its data and a
//! node that installs one learns it. `store::data_version` refuses a newer
//! version and runs the upgrade steps of an older one.
//!
//! Bump [`DATA_VERSION`] with every change of a frozen format, and add the
//! step that upgrades data of the version before it.

/// The version this build reads and writes.
///
/// 1. The formats as they were first frozen.
/// 2. The log may hold `Command::Access` entries (server-side policy
///    changes), which a version-1 build cannot decode; no stored record
///    changed.
/// 3. Every record but the metadata, chunks and the audit chain is bound to
///    its key (a tag after its encoding); idempotency records are keyed by
///    hashed keys; keywords and claim agents are sealed (see
///    `crypto::TenantNames`).
/// 4. The state machine has its own RocksDB (`data_dir/state`, one directory
///    per generation), apart from the Raft log's; a snapshot is a checkpoint
///    of it, sent file by file (`snapshot_data`), no longer a key/value dump.
///    The log's database keeps only this version in its old `sm` column
///    family, so that an older build refuses the directory.
/// 5. The log may hold `Command::Backups` entries (the backup catalog, its
///    records under [`super::keys::BACKUP`]), which a version-4 build cannot
///    decode; no stored record changed.
/// 6. The log may hold `Command::Ops` entries (two-person operations, their
///    records under [`super::keys::OPERATION`]), which a version-5 build
///    cannot decode; no stored record changed.
/// 7. An operation may restore a mailbox from a backup or set the audit
///    settings (`OpKind` and `Step` variants a version-6 build cannot
///    decode; the settings' record under [`super::keys::AUDIT_SETTINGS`]);
///    no stored record changed.
/// 8. An operation may expunge in bulk (`OpKind::Expunge`, `Step::Expunge`);
///    export approvals (under [`super::keys::EXPORT_APPROVAL`]) are bound
///    to their keys like the other records.
/// 9. An operation may transfer leadership (`OpKind::TransferLeadership`,
///    `Step::Leadership`), which stores where leadership is held under
///    [`super::keys::LEADERSHIP_PIN`]; no stored record changed.
/// 10. Operations may add, remove and replace members (`OpKind::AddNode`,
///     `RemoveNode`, `ReplaceNode`, `Step::Membership`); what the state
///     records of each member beyond Raft's membership (its region, how it
///     came in, its removal) is under [`super::keys::MEMBER`]; no stored
///     record changed.
/// 11. The log may hold `Command::Repair` entries (automatic repair: the
///     failures, the freeze, the replacements, recorded under
///     [`super::keys::REPAIR`]), and an operation may unfreeze repair
///     (`OpKind::Unfreeze`, `Step::Unfreeze`); no stored record changed.
/// 12. An upload staged chunk by chunk and not committed has a staging
///     record under [`super::keys::STAGED`], and the log may hold
///     `Command::ExpireStaged`, which expires idle ones; the upgrade gives
///     every blob whose chunks no message names such a record.
pub const DATA_VERSION: u32 = 12;

/// The version of data directories written before the version was stored
/// (their formats are version 1's).
pub const UNVERSIONED: u32 = 0;

/// The stored form of a version.
pub fn encode(version: u32) -> [u8; 4] {
    version.to_be_bytes()
}

/// A stored version, if it is one.
pub fn decode(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}
