//! Read access to the state machine for the API. Callers establish a
//! linearizable read point first; the reader only looks at local data.

use rocksdb::{Direction, IteratorMode};

use super::db::{Db, CF_SM};
use crate::state::audit::{verify_chain, AuditHead, AuditRecord, ChainError};
use crate::state::codec::decode;
use crate::state::command::BlobId;
use crate::state::keys;
use crate::state::records::{ChangeRecord, IdempotencyRecord, MailboxRecord, MessageRecord, TenantRecord};

/// A failed local read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// RocksDB failed.
    #[error("storage read failed: {0}")]
    Db(#[from] rocksdb::Error),
    /// A stored record does not decode: the local store is damaged.
    #[error("stored record is corrupt")]
    Corrupt,
}

/// Reads the state machine's records.
#[derive(Clone)]
pub struct MailReader {
    db: Db,
}

type R<T> = Result<T, ReadError>;

impl MailReader {
    /// A reader over the database.
    pub fn new(db: Db) -> MailReader {
        MailReader { db }
    }

    fn cf(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_SM).expect("sm column family")
    }

    fn get<T: for<'de> serde::Deserialize<'de>>(&self, key: &[u8]) -> R<Option<T>> {
        match self.db.get_pinned_cf(self.cf(), key)? {
            None => Ok(None),
            Some(b) => decode(&b).map(Some).map_err(|_| ReadError::Corrupt),
        }
    }

    /// Visits records under `prefix` from `start` on, until `f` returns false.
    fn scan<T: for<'de> serde::Deserialize<'de>>(
        &self,
        prefix: &[u8],
        start: &[u8],
        mut f: impl FnMut(&[u8], T) -> bool,
    ) -> R<()> {
        let it = self
            .db
            .iterator_cf(self.cf(), IteratorMode::From(start, Direction::Forward));
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            let rec = decode(&v).map_err(|_| ReadError::Corrupt)?;
            if !f(&k, rec) {
                break;
            }
        }
        Ok(())
    }

    /// An identity's access policy.
    pub fn identity_policy(&self, identity: &str) -> R<Option<crate::state::policy::IdentityPolicy>> {
        self.get(&keys::identity(identity))
    }

    /// Whether a certificate serial is revoked.
    pub fn serial_revoked(&self, serial: &str) -> R<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(), keys::revoked_serial(serial))?
            .is_some())
    }

    /// The audit chain head.
    pub fn audit_head(&self) -> R<AuditHead> {
        Ok(self.get(keys::AUDIT_HEAD)?.unwrap_or_default())
    }

    /// Audit records with seq ≥ `from`, at most `limit`.
    pub fn audit_records(&self, from: u64, limit: usize) -> R<Vec<AuditRecord>> {
        let mut out = Vec::new();
        self.scan(&[keys::AUDIT], &keys::audit(from), |_, r: AuditRecord| {
            out.push(r);
            out.len() < limit
        })?;
        Ok(out)
    }

    /// The sequence number from which on audit records are at most a minute
    /// older than `since_ms` (records come from several nodes, whose clocks
    /// differ a little). Scans backwards from the newest record.
    pub fn audit_first_seq_since(&self, since_ms: i64) -> R<u64> {
        const SKEW_MS: i64 = 60_000;
        let end = keys::audit(u64::MAX);
        let it = self
            .db
            .iterator_cf(self.cf(), IteratorMode::From(&end, Direction::Reverse));
        let mut first = self.audit_head()?.seq + 1;
        for item in it {
            let (k, v) = item?;
            if k.first() != Some(&keys::AUDIT) {
                break;
            }
            let rec: AuditRecord = decode(&v).map_err(|_| ReadError::Corrupt)?;
            if rec.event.time_ms < since_ms - SKEW_MS {
                break;
            }
            first = rec.seq;
        }
        Ok(first)
    }

    /// A digest of the whole replicated state, read from one consistent
    /// snapshot: (applied log index, SHA-256 over every key and value, record
    /// count). Replicas at the same applied index must agree.
    pub fn state_digest(&self) -> R<(u64, [u8; 32], u64)> {
        use sha2::{Digest, Sha256};
        let snap = self.db.snapshot();
        let mut h = Sha256::new();
        let mut records = 0u64;
        let mut applied = 0u64;
        for item in snap.iterator_cf(self.cf(), IteratorMode::Start) {
            let (k, v) = item?;
            if &*k == crate::state::keys::META_APPLIED {
                let id: Option<crate::state::types::LogId> = decode(&v).map_err(|_| ReadError::Corrupt)?;
                applied = id.map(|l| l.index).unwrap_or(0);
            }
            h.update((k.len() as u64).to_be_bytes());
            h.update(&k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(&v);
            records += 1;
        }
        Ok((applied, h.finalize().into(), records))
    }

    /// Verifies the whole audit chain in this node's store.
    pub fn verify_audit(&self) -> R<Result<u64, ChainError>> {
        let head = self.audit_head()?;
        let it = self
            .db
            .iterator_cf(self.cf(), IteratorMode::From(&keys::audit(0), Direction::Forward));
        let records = it
            .take_while(|item| {
                item.as_ref()
                    .map(|(k, _)| k.first() == Some(&keys::AUDIT))
                    .unwrap_or(true)
            })
            .map(|item| match item {
                Ok((_, v)) => decode::<AuditRecord>(&v).map_err(|_| ()),
                Err(_) => Err(()),
            });
        Ok(verify_chain(records, head))
    }

    /// A tenant's record.
    pub fn tenant(&self, tenant: &str) -> R<Option<TenantRecord>> {
        self.get(&keys::tenant(tenant))
    }

    /// A mailbox's record.
    pub fn mailbox(&self, tenant: &str, mailbox: &str) -> R<Option<MailboxRecord>> {
        self.get(&keys::mailbox(tenant, mailbox))
    }

    /// Every mailbox of a tenant, by name.
    pub fn mailboxes(&self, tenant: &str) -> R<Vec<(String, MailboxRecord)>> {
        let prefix = keys::mailbox_prefix(tenant);
        let mut out = Vec::new();
        self.scan(&prefix, &prefix, |k, rec: MailboxRecord| {
            out.push((String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), rec));
            true
        })?;
        Ok(out)
    }

    /// One message's record.
    pub fn message(&self, tenant: &str, mailbox: &str, uid: u32) -> R<Option<MessageRecord>> {
        self.get(&keys::message(tenant, mailbox, uid))
    }

    /// Messages with UID ≥ `from_uid`, in UID order, while `f` returns true.
    pub fn messages(
        &self,
        tenant: &str,
        mailbox: &str,
        from_uid: u32,
        f: impl FnMut(MessageRecord) -> bool,
    ) -> R<()> {
        let prefix = keys::message_prefix(tenant, mailbox);
        let mut f = f;
        self.scan(&prefix, &keys::message(tenant, mailbox, from_uid), |_, m| f(m))
    }

    /// One encrypted chunk.
    pub fn chunk(&self, tenant: &str, blob: &BlobId, index: u32) -> R<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(), keys::chunk(tenant, blob, index))?)
    }

    /// What an idempotency key was used for.
    pub fn idempotency(&self, tenant: &str, mailbox: &str, key: &str) -> R<Option<IdempotencyRecord>> {
        self.get(&keys::idempotency(tenant, mailbox, key))
    }

    /// Changes with MODSEQ > `since`, oldest first, at most `limit`.
    pub fn changes(
        &self,
        tenant: &str,
        mailbox: &str,
        since: u64,
        limit: usize,
    ) -> R<Vec<(u64, ChangeRecord)>> {
        let prefix = keys::change_prefix(tenant, mailbox);
        let mut out = Vec::new();
        let start = keys::change(tenant, mailbox, since.saturating_add(1));
        self.scan(&prefix, &start, |k, rec: ChangeRecord| {
            let modseq = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8-byte modseq"));
            out.push((modseq, rec));
            out.len() < limit
        })?;
        Ok(out)
    }
}
