//! The state machine's key layout in RocksDB.
//!
//! Every key starts with a subspace byte, then the tenant, so one tenant's
//! data of one kind is one contiguous key range. Names are separated by a 0
//! byte (names never contain one: see [`crate::names`]); numbers are
//! big-endian so keys sort numerically.
//!
//! Frozen format: do not change without a data-version migration.

use super::command::BlobId;

/// State-machine metadata (last applied log id, membership).
pub const META: u8 = 0x01;
/// Tenant records: `0x10 tenant`.
pub const TENANT: u8 = 0x10;
/// Mailbox records: `0x20 tenant 0 mailbox`.
pub const MAILBOX: u8 = 0x20;
/// Message records: `0x30 tenant 0 mailbox 0 uid(be32)`.
pub const MESSAGE: u8 = 0x30;
/// Body chunks: `0x40 tenant 0 blob(16) index(be32)`.
pub const CHUNK: u8 = 0x40;
/// Idempotency records: `0x50 tenant 0 mailbox 0 key`, the key hashed
/// (data version 3; see [`crate::crypto::TenantNames::idempotency_key`]).
pub const IDEMPOTENCY: u8 = 0x50;
/// Change records for watchers: `0x60 tenant 0 mailbox 0 modseq(be64)`.
pub const CHANGE: u8 = 0x60;

/// Access policy per identity: `0x70 identity`.
pub const IDENTITY: u8 = 0x70;
/// Revoked certificate serials: `0x71 serial`.
pub const REVOKED_SERIAL: u8 = 0x71;
/// Audit records: `0x81 seq(be64)`.
pub const AUDIT: u8 = 0x81;
/// The backup catalog: `0x90 backup id` (data version 5).
pub const BACKUP: u8 = 0x90;
/// Two-person operations: `0xA0 operation id` (data version 6).
pub const OPERATION: u8 = 0xA0;
/// Approved exports: `0xA1 exporter 0 tenant 0 mailbox` (data version 6).
pub const EXPORT_APPROVAL: u8 = 0xA1;
/// The replicated audit settings: the one key `0xA2` (data version 7).
pub const AUDIT_SETTINGS: u8 = 0xA2;
/// Where a leadership transfer holds leadership: the one key `0xA3` (data
/// version 9).
pub const LEADERSHIP_PIN: u8 = 0xA3;
/// What the state records of each member beyond Raft's membership:
/// `0xB0 node id(be64)` (data version 10).
pub const MEMBER: u8 = 0xB0;
/// The record of automatic repair: the one key `0xB1` (data version 11).
pub const REPAIR: u8 = 0xB1;
/// Uploads staged chunk by chunk and not committed (yet):
/// `0xB2 tenant 0 blob(16)` (data version 12).
pub const STAGED: u8 = 0xB2;
/// The audit chain head.
pub const AUDIT_HEAD: &[u8] = b"\x80head";

/// Key of the last applied log id.
pub const META_APPLIED: &[u8] = b"\x01applied";
/// Key of the last membership config.
pub const META_MEMBERSHIP: &[u8] = b"\x01membership";
/// Key of the data version (see [`super::version`]).
pub const META_DATA_VERSION: &[u8] = b"\x01data_version";

/// Whether the record at `key` is bound to its place (its value ends in a
/// tag: see [`crate::crypto::RecordBinding`]). Not bound: the state machine's
/// metadata (written by openraft's rules, checked by the data version),
/// chunks (AES-GCM ciphertexts whose associated data already names their
/// tenant, blob and index) and the audit chain (hash-chained, and verified
/// offline by tools that hold no master key).
pub fn is_bound(key: &[u8]) -> bool {
    matches!(
        key.first(),
        Some(
            &(TENANT
                | MAILBOX
                | MESSAGE
                | IDEMPOTENCY
                | CHANGE
                | IDENTITY
                | REVOKED_SERIAL
                | BACKUP
                | OPERATION
                | EXPORT_APPROVAL
                | AUDIT_SETTINGS
                | LEADERSHIP_PIN
                | MEMBER
                | REPAIR
                | STAGED)
        )
    )
}

fn with(space: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(space);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

/// `0x70 identity`.
pub fn identity(identity: &str) -> Vec<u8> {
    with(IDENTITY, &[identity.as_bytes()])
}

/// `0x71 serial`.
pub fn revoked_serial(serial: &str) -> Vec<u8> {
    with(REVOKED_SERIAL, &[serial.as_bytes()])
}

/// `0x90 backup id`.
pub fn backup(id: &str) -> Vec<u8> {
    with(BACKUP, &[id.as_bytes()])
}

/// `0xA0 operation id`.
pub fn operation(id: &str) -> Vec<u8> {
    with(OPERATION, &[id.as_bytes()])
}

/// `0xA2`: the audit settings.
pub fn audit_settings() -> Vec<u8> {
    vec![AUDIT_SETTINGS]
}

/// `0xA3`.
pub fn leadership_pin() -> Vec<u8> {
    vec![LEADERSHIP_PIN]
}

/// `0xB1`: the repair record.
pub fn repair() -> Vec<u8> {
    vec![REPAIR]
}

/// `0xB0 id(be64)`.
pub fn member_record(id: u64) -> Vec<u8> {
    let mut k = vec![MEMBER];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The node id of a `0xB0` key.
pub fn member_of(key: &[u8]) -> Option<u64> {
    match key {
        [MEMBER, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// `0xA1 exporter 0 tenant 0 mailbox`.
pub fn export_approval(exporter: &str, tenant: &str, mailbox: &str) -> Vec<u8> {
    with(
        EXPORT_APPROVAL,
        &[exporter.as_bytes(), tenant.as_bytes(), mailbox.as_bytes()],
    )
}

/// `0x81 seq`.
pub fn audit(seq: u64) -> Vec<u8> {
    let mut k = vec![AUDIT];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `0x10 tenant`.
pub fn tenant(tenant: &str) -> Vec<u8> {
    with(TENANT, &[tenant.as_bytes()])
}

/// `0x20 tenant 0 mailbox`.
pub fn mailbox(tenant: &str, mailbox: &str) -> Vec<u8> {
    with(MAILBOX, &[tenant.as_bytes(), mailbox.as_bytes()])
}

/// Prefix of every mailbox of a tenant.
pub fn mailbox_prefix(tenant: &str) -> Vec<u8> {
    with(MAILBOX, &[tenant.as_bytes(), b""])
}

/// Prefix of every message of a mailbox.
pub fn message_prefix(tenant: &str, mailbox: &str) -> Vec<u8> {
    with(MESSAGE, &[tenant.as_bytes(), mailbox.as_bytes(), b""])
}

/// `0x30 tenant 0 mailbox 0 uid`.
pub fn message(tenant: &str, mailbox: &str, uid: u32) -> Vec<u8> {
    let mut k = message_prefix(tenant, mailbox);
    k.extend_from_slice(&uid.to_be_bytes());
    k
}

/// The UID at the end of a message key.
pub fn uid_of_message_key(key: &[u8]) -> Option<u32> {
    let tail: [u8; 4] = key.get(key.len().checked_sub(4)?..)?.try_into().ok()?;
    Some(u32::from_be_bytes(tail))
}

/// `0x40 tenant 0 blob index`.
pub fn chunk(tenant: &str, blob: &BlobId, index: u32) -> Vec<u8> {
    let mut k = with(CHUNK, &[tenant.as_bytes(), blob]);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The tenant and blob of a chunk key, and the chunk's index.
pub fn chunk_of(key: &[u8]) -> Option<(&[u8], BlobId, u32)> {
    let rest = key.strip_prefix(&[CHUNK])?;
    let (blob_part, index) = rest.split_at(rest.len().checked_sub(4)?);
    let (tenant, blob) = tenant_and_blob(blob_part)?;
    Some((tenant, blob, u32::from_be_bytes(index.try_into().ok()?)))
}

/// `tenant 0 blob(16)`, the tail of chunk and staging keys.
fn tenant_and_blob(rest: &[u8]) -> Option<(&[u8], BlobId)> {
    let tenant_end = rest.len().checked_sub(16 + 1)?;
    if rest[tenant_end] != 0 {
        return None;
    }
    let blob: BlobId = rest[tenant_end + 1..].try_into().ok()?;
    Some((&rest[..tenant_end], blob))
}

/// Prefix of every chunk of one blob.
pub fn blob_prefix(tenant: &str, blob: &BlobId) -> Vec<u8> {
    with(CHUNK, &[tenant.as_bytes(), blob])
}

/// `0xB2 tenant 0 blob`: the staging record of an upload.
pub fn staged(tenant: &str, blob: &BlobId) -> Vec<u8> {
    staged_raw(tenant.as_bytes(), blob)
}

/// [`staged`] for a tenant name as stored in a key.
pub fn staged_raw(tenant: &[u8], blob: &BlobId) -> Vec<u8> {
    with(STAGED, &[tenant, blob])
}

/// The tenant and blob of a staging record's key.
pub fn staged_of(key: &[u8]) -> Option<(String, BlobId)> {
    let (tenant, blob) = tenant_and_blob(key.strip_prefix(&[STAGED])?)?;
    Some((String::from_utf8(tenant.to_vec()).ok()?, blob))
}

/// `0x50 tenant 0 mailbox 0 key`.
pub fn idempotency(tenant: &str, mailbox: &str, key: &str) -> Vec<u8> {
    with(
        IDEMPOTENCY,
        &[tenant.as_bytes(), mailbox.as_bytes(), key.as_bytes()],
    )
}

/// Prefix of every change record of a mailbox.
pub fn change_prefix(tenant: &str, mailbox: &str) -> Vec<u8> {
    with(CHANGE, &[tenant.as_bytes(), mailbox.as_bytes(), b""])
}

/// `0x60 tenant 0 mailbox 0 modseq`.
pub fn change(tenant: &str, mailbox: &str, modseq: u64) -> Vec<u8> {
    let mut k = change_prefix(tenant, mailbox);
    k.extend_from_slice(&modseq.to_be_bytes());
    k
}

/// The tenant a tenant-scoped key belongs to (every subspace from
/// [`TENANT`] to [`CHANGE`]).
pub fn tenant_of(key: &[u8]) -> Option<&str> {
    if !(TENANT..=CHANGE).contains(key.first()?) {
        return None;
    }
    let rest = &key[1..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()
}

/// The tenant, mailbox and stored key of an idempotency record's key.
pub fn split_idempotency(key: &[u8]) -> Option<(&str, &str, &str)> {
    let rest = key.strip_prefix(&[IDEMPOTENCY])?;
    let mut parts = rest.splitn(3, |&b| b == 0);
    let (t, m, k) = (parts.next()?, parts.next()?, parts.next()?);
    Some((
        std::str::from_utf8(t).ok()?,
        std::str::from_utf8(m).ok()?,
        std::str::from_utf8(k).ok()?,
    ))
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_and_staging_keys_give_back_their_tenant_blob_and_index() {
        let blob = [0u8; 16];
        assert_eq!(chunk_of(&chunk("acme", &blob, 7)), Some((&b"acme"[..], blob, 7)));
        assert_eq!(
            staged_of(&staged("acme", &blob)),
            Some(("acme".to_string(), blob))
        );
        assert_eq!(chunk_of(&staged("acme", &blob)), None, "another kind of key");
        assert_eq!(staged_of(&blob_prefix("acme", &blob)), None);
        assert_eq!(chunk_of(&[CHUNK, 1, 2]), None, "too short");
    }

    #[test]
    fn message_keys_sort_by_uid_and_stay_in_their_mailbox() {
        let a = message("t", "inbox", 2);
        let b = message("t", "inbox", 256);
        assert!(a < b);
        let p = message_prefix("t", "inbox");
        assert!(a.starts_with(&p) && b.starts_with(&p));
        assert!(!message("t", "inbox2", 1).starts_with(&p));
        assert_eq!(uid_of_message_key(&b), Some(256));
    }

    #[test]
    fn tenant_scoped_keys_name_their_tenant_and_idempotency_keys_split() {
        assert_eq!(tenant_of(&tenant("acme")), Some("acme"));
        assert_eq!(tenant_of(&message("acme", "inbox", 7)), Some("acme"));
        assert_eq!(tenant_of(&identity("acme")), None);
        let k = idempotency("acme", "in box", "k\u{0}ey");
        assert_eq!(split_idempotency(&k), Some(("acme", "in box", "k\u{0}ey")));
        assert_eq!(split_idempotency(&mailbox("acme", "inbox")), None);
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        let p = message_prefix("t", "m");
        let end = prefix_end(&p);
        assert!(message("t", "m", u32::MAX) < end);
        assert!(message("t", "n", 0) >= end || !message("t", "n", 0).starts_with(&p));
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
    }
}
