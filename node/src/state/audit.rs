//! Audit records and their hash chain.
//!
//! `hash = SHA-256("mailvault-audit-v1" || seq(be64) || prev_hash || postcard(event))`.
//! The first record's `prev_hash` is all zeros. The state machine also keeps
//! the chain head (last seq and hash), so a removed tail is detected too.
//!
//! Frozen format: do not change without a migration.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::codec::encode;

/// The replicated audit settings (data version 7, under
/// [`super::keys::audit_settings`]), changed only by a two-person
/// operation. While none is stored, each node's `[audit]` config decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSettings {
    /// Whether an access waits for its audit record and fails when it cannot
    /// be committed.
    pub fail_closed: bool,
    /// The operation that set them.
    pub operation: String,
}

/// What happened, as recorded by a node. Target ids only, never content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Milliseconds since the Unix epoch, on the recording node.
    pub time_ms: i64,
    /// Who (identity from the certificate, or `-` if none was proven).
    pub identity: String,
    /// From where (source address).
    pub source: String,
    /// What (the RPC or operation).
    pub action: String,
    /// On what (`tenant/mailbox/uid`, identity, serial…); ids only.
    pub target: String,
    /// The outcome: `allowed`, or `denied: <reason>`.
    pub result: String,
    /// The node that recorded it.
    pub node: u64,
}

impl AuditEvent {
    /// An event stamped now; the recorder fills in the node.
    pub fn new(
        identity: &str,
        source: Option<std::net::IpAddr>,
        action: &str,
        target: &str,
        result: &str,
    ) -> Self {
        AuditEvent {
            time_ms: crate::clock::now_ms(),
            identity: identity.to_string(),
            source: source.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            action: action.to_string(),
            target: target.to_string(),
            result: result.to_string(),
            node: 0,
        }
    }
}

/// A chained audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// The event.
    pub event: AuditEvent,
    /// The previous record's hash.
    pub prev_hash: [u8; 32],
    /// This record's hash.
    pub hash: [u8; 32],
}

/// The last record's sequence number and hash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// Last sequence number (0 when empty).
    pub seq: u64,
    /// Last hash (zeros when empty).
    pub hash: [u8; 32],
}

/// The hash of a record.
pub fn chain_hash(seq: u64, prev_hash: &[u8; 32], event: &AuditEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mailvault-audit-v1");
    h.update(seq.to_be_bytes());
    h.update(prev_hash);
    h.update(encode(event));
    h.finalize().into()
}

/// Why a chain failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A sequence number is missing or out of order (deleted or reordered record).
    #[error("sequence gap: expected record {expected}, found {found}")]
    Gap {
        /// Expected seq.
        expected: u64,
        /// Found seq.
        found: u64,
    },
    /// A record does not link to its predecessor (reordered or replaced).
    #[error("record {0} does not link to the record before it")]
    BrokenLink(u64),
    /// A record's content does not match its hash (edited).
    #[error("record {0} was altered: its hash does not match its content")]
    Altered(u64),
    /// The chain ends before or after the recorded head (tail removed or added).
    #[error("chain ends at record {found} but the head says {head}")]
    HeadMismatch {
        /// Last seq found.
        found: u64,
        /// Head seq.
        head: u64,
    },
    /// A stored record does not decode.
    #[error("record after {0} is unreadable")]
    Unreadable(u64),
}

/// Verifies records in order against the head. Returns the number of records.
pub fn verify_chain(
    records: impl IntoIterator<Item = Result<AuditRecord, ()>>,
    head: AuditHead,
) -> Result<u64, ChainError> {
    let mut prev = [0u8; 32];
    let mut last = 0u64;
    for r in records {
        let r = r.map_err(|_| ChainError::Unreadable(last))?;
        if r.seq != last + 1 {
            return Err(ChainError::Gap {
                expected: last + 1,
                found: r.seq,
            });
        }
        if r.prev_hash != prev {
            return Err(ChainError::BrokenLink(r.seq));
        }
        if chain_hash(r.seq, &r.prev_hash, &r.event) != r.hash {
            return Err(ChainError::Altered(r.seq));
        }
        prev = r.hash;
        last = r.seq;
    }
    if last != head.seq || prev != head.hash {
        return Err(ChainError::HeadMismatch {
            found: last,
            head: head.seq,
        });
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u64) -> AuditEvent {
        AuditEvent {
            time_ms: n as i64,
            identity: "alice".into(),
            source: "127.0.0.1".into(),
            action: "GetMessage".into(),
            target: format!("acme/inbox/{n}"),
            result: "allowed".into(),
            node: 1,
        }
    }

    fn chain(n: u64) -> (Vec<AuditRecord>, AuditHead) {
        let mut v = Vec::new();
        let mut prev = [0u8; 32];
        for seq in 1..=n {
            let hash = chain_hash(seq, &prev, &ev(seq));
            v.push(AuditRecord {
                seq,
                event: ev(seq),
                prev_hash: prev,
                hash,
            });
            prev = hash;
        }
        (v, AuditHead { seq: n, hash: prev })
    }

    #[test]
    fn an_intact_chain_verifies_and_every_tampering_is_detected() {
        let (v, head) = chain(5);
        assert_eq!(verify_chain(v.iter().cloned().map(Ok), head), Ok(5));

        let mut edited = v.clone();
        edited[2].event.identity = "mallory".into();
        assert_eq!(
            verify_chain(edited.into_iter().map(Ok), head),
            Err(ChainError::Altered(3))
        );

        let mut deleted = v.clone();
        deleted.remove(1);
        assert!(matches!(
            verify_chain(deleted.into_iter().map(Ok), head),
            Err(ChainError::Gap { .. })
        ));

        let mut reordered = v.clone();
        reordered.swap(1, 2);
        reordered[1].seq = 2;
        reordered[2].seq = 3;
        assert!(verify_chain(reordered.into_iter().map(Ok), head).is_err());

        let mut truncated = v.clone();
        truncated.pop();
        assert!(matches!(
            verify_chain(truncated.into_iter().map(Ok), head),
            Err(ChainError::HeadMismatch { .. })
        ));
    }
}
