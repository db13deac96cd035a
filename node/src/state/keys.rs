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
/// Idempotency records: `0x50 tenant 0 mailbox 0 key`.
pub const IDEMPOTENCY: u8 = 0x50;
/// Change records for watchers: `0x60 tenant 0 mailbox 0 modseq(be64)`.
pub const CHANGE: u8 = 0x60;

/// Access policy per identity: `0x70 identity`.
pub const IDENTITY: u8 = 0x70;
/// Revoked certificate serials: `0x71 serial`.
pub const REVOKED_SERIAL: u8 = 0x71;
/// Audit records: `0x81 seq(be64)`.
pub const AUDIT: u8 = 0x81;
/// The audit chain head.
pub const AUDIT_HEAD: &[u8] = b"\x80head";

/// Key of the last applied log id.
pub const META_APPLIED: &[u8] = b"\x01applied";
/// Key of the last membership config.
pub const META_MEMBERSHIP: &[u8] = b"\x01membership";
/// Key of the data version (see [`super::version`]).
pub const META_DATA_VERSION: &[u8] = b"\x01data_version";

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
    fn prefix_end_bounds_the_prefix() {
        let p = message_prefix("t", "m");
        let end = prefix_end(&p);
        assert!(message("t", "m", u32::MAX) < end);
        assert!(message("t", "n", 0) >= end || !message("t", "n", 0).starts_with(&p));
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
    }
}
