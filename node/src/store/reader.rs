//! Read access to the state machine for the API. Callers establish a
//! linearizable read point first; the reader only looks at local data.

use rocksdb::{Direction, IteratorMode};

use super::db::{Db, CF_SM};
use super::state_db::StateDb;
use crate::crypto::RecordBinding;
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
    /// A stored record does not decode, or fails its binding to its key
    /// (moved, swapped or edited): the local store is damaged.
    #[error("stored record is corrupt")]
    Corrupt,
    /// A bound record was read by a reader without the master key's binding.
    #[error("this record is read only with the master key")]
    Unkeyed,
}

/// A message record as stored here: the record, or the UID of one that
/// fails its binding or does not decode (damaged on this node).
pub type StoredMessage = Result<MessageRecord, u32>;

/// Reads the state machine's records (each call from the live state
/// database as it is when the call starts).
#[derive(Clone)]
pub struct MailReader {
    state: StateDb,
    /// `None` for offline tools without the master key: they read only
    /// records that are not bound (the audit chain).
    binding: Option<std::sync::Arc<RecordBinding>>,
}

type R<T> = Result<T, ReadError>;

fn sm(db: &Db) -> &rocksdb::ColumnFamily {
    db.cf_handle(CF_SM).expect("sm column family")
}

impl MailReader {
    /// A reader over the database, checking bound records with `binding`.
    pub fn new(state: StateDb, binding: std::sync::Arc<RecordBinding>) -> MailReader {
        MailReader {
            state,
            binding: Some(binding),
        }
    }

    /// A reader for offline tools without the master key: the audit chain
    /// only (every bound record is refused with [`ReadError::Unkeyed`]).
    pub fn unkeyed(db: Db) -> MailReader {
        MailReader {
            state: StateDb::fixed(db),
            binding: None,
        }
    }

    fn db(&self) -> Db {
        self.state.get()
    }

    /// Decodes the record stored at `key`, checking its binding if it is bound.
    fn open<T: for<'de> serde::Deserialize<'de>>(&self, key: &[u8], stored: &[u8]) -> R<T> {
        let encoded = if keys::is_bound(key) {
            let binding = self.binding.as_ref().ok_or(ReadError::Unkeyed)?;
            binding.open(key, stored).ok_or(ReadError::Corrupt)?
        } else {
            stored
        };
        decode(encoded).map_err(|_| ReadError::Corrupt)
    }

    fn get<T: for<'de> serde::Deserialize<'de>>(&self, key: &[u8]) -> R<Option<T>> {
        let db = self.db();
        let found = match db.get_pinned_cf(sm(&db), key)? {
            None => Ok(None),
            Some(b) => self.open(key, &b).map(Some),
        };
        found
    }

    /// Visits records under `prefix` from `start` on, until `f` returns false.
    fn scan<T: for<'de> serde::Deserialize<'de>>(
        &self,
        prefix: &[u8],
        start: &[u8],
        mut f: impl FnMut(&[u8], T) -> bool,
    ) -> R<()> {
        self.scan_stored(prefix, start, |k, rec: R<T>| rec.map(|rec| f(k, rec)))
    }

    /// Like `scan`, handing `f` each record's decoding, which it may forgive.
    fn scan_stored<T: for<'de> serde::Deserialize<'de>>(
        &self,
        prefix: &[u8],
        start: &[u8],
        mut f: impl FnMut(&[u8], R<T>) -> R<bool>,
    ) -> R<()> {
        self.scan_raw(prefix, start, |k, v| f(k, self.open(k, v)))
    }

    /// Calls `f` with every key from `start` on that is under `prefix` and
    /// its value as stored, until `f` returns false.
    fn scan_raw(&self, prefix: &[u8], start: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> R<bool>) -> R<()> {
        let db = self.db();
        let it = db.iterator_cf(sm(&db), IteratorMode::From(start, Direction::Forward));
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// An identity's access policy.
    pub fn identity_policy(&self, identity: &str) -> R<Option<crate::state::policy::IdentityPolicy>> {
        self.get(&keys::identity(identity))
    }

    /// Every identity with a policy record, by name.
    pub fn identity_policies(&self) -> R<Vec<(String, crate::state::policy::IdentityPolicy)>> {
        let prefix = [keys::IDENTITY];
        let mut out = Vec::new();
        self.scan(
            &prefix,
            &prefix,
            |k, rec: crate::state::policy::IdentityPolicy| {
                out.push((String::from_utf8_lossy(&k[1..]).into_owned(), rec));
                true
            },
        )?;
        Ok(out)
    }

    /// Whether a certificate serial is revoked (a revocation record that
    /// fails its binding is an error, which callers take as revoked).
    pub fn serial_revoked(&self, serial: &str) -> R<bool> {
        Ok(self.get::<()>(&keys::revoked_serial(serial))?.is_some())
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
        let db = self.db();
        let it = db.iterator_cf(sm(&db), IteratorMode::From(&end, Direction::Reverse));
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
        let db = self.db();
        let snap = db.snapshot();
        let mut h = Sha256::new();
        let mut records = 0u64;
        let mut applied = 0u64;
        for item in snap.iterator_cf(sm(&db), IteratorMode::Start) {
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
        let db = self.db();
        let it = db.iterator_cf(sm(&db), IteratorMode::From(&keys::audit(0), Direction::Forward));
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

    /// One backup in the catalog.
    pub fn backup(&self, id: &str) -> R<Option<crate::state::backup::BackupRecord>> {
        self.get(&keys::backup(id))
    }

    /// The newest backup in the catalog (the last key under the prefix).
    pub fn newest_backup(&self) -> R<Option<crate::state::backup::BackupRecord>> {
        let db = self.db();
        let end = [keys::BACKUP + 1];
        let mut it = db.iterator_cf(sm(&db), IteratorMode::From(&end, Direction::Reverse));
        match it.next() {
            Some(item) => {
                let (k, v) = item?;
                if k.first() == Some(&keys::BACKUP) {
                    self.open(&k, &v).map(Some)
                } else {
                    Ok(None)
                }
            }
            None => Ok(None),
        }
    }

    /// The backup catalog, oldest first (ids sort by time).
    pub fn backups(&self) -> R<Vec<crate::state::backup::BackupRecord>> {
        let prefix = [keys::BACKUP];
        let mut out = Vec::new();
        self.scan(&prefix, &prefix, |_, rec| {
            out.push(rec);
            true
        })?;
        Ok(out)
    }

    /// One two-person operation.
    pub fn operation(&self, id: &str) -> R<Option<crate::state::ops::Operation>> {
        self.get(&keys::operation(id))
    }

    /// The replicated audit settings, if an operation set them.
    pub fn audit_settings(&self) -> R<Option<crate::state::audit::AuditSettings>> {
        self.get(&keys::audit_settings())
    }

    /// What the state records of node `id` beyond the membership.
    pub fn member_record(&self, id: u64) -> R<Option<crate::state::member::MemberRecord>> {
        self.get(&keys::member_record(id))
    }

    /// The record of automatic repair.
    pub fn repair_record(&self) -> R<Option<crate::state::member::RepairRecord>> {
        self.get(&keys::repair())
    }

    /// Every member record, by node id.
    pub fn member_records(&self) -> R<Vec<(u64, crate::state::member::MemberRecord)>> {
        let mut out = Vec::new();
        let prefix = [keys::MEMBER];
        self.scan(&prefix, &prefix, |k, r| {
            if let Some(id) = keys::member_of(k) {
                out.push((id, r));
            }
            true
        })?;
        Ok(out)
    }

    /// Where a leadership transfer holds leadership, if one does.
    pub fn leadership_pin(&self) -> R<Option<crate::state::ops::LeadershipPin>> {
        self.get(&keys::leadership_pin())
    }

    /// The approved export of `mailbox` by `exporter`, if any.
    pub fn export_approval(
        &self,
        exporter: &str,
        tenant: &str,
        mailbox: &str,
    ) -> R<Option<crate::state::ops::ExportApproval>> {
        self.get(&keys::export_approval(exporter, tenant, mailbox))
    }

    /// Every two-person operation, by id.
    pub fn operations(&self) -> R<Vec<crate::state::ops::Operation>> {
        let prefix = [keys::OPERATION];
        let mut out = Vec::new();
        self.scan(&prefix, &prefix, |_, op| {
            out.push(op);
            true
        })?;
        Ok(out)
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

    /// One message's record (`Err(uid)` if it is damaged here).
    pub fn message(&self, tenant: &str, mailbox: &str, uid: u32) -> R<Option<StoredMessage>> {
        let key = keys::message(tenant, mailbox, uid);
        let db = self.db();
        let found = match db.get_pinned_cf(sm(&db), &key)? {
            None => None,
            Some(b) => Some(Self::message_at(uid, self.open(&key, &b))?),
        };
        Ok(found)
    }

    /// A message record read at `uid`'s key: damaged if it fails its binding
    /// or names another UID.
    fn message_at(uid: u32, rec: R<MessageRecord>) -> R<StoredMessage> {
        match rec {
            Ok(m) if m.uid == uid => Ok(Ok(m)),
            Ok(_) | Err(ReadError::Corrupt) => Ok(Err(uid)),
            Err(e) => Err(e),
        }
    }

    /// Messages with UID ≥ `from_uid`, in UID order, while `f` returns
    /// true. A message damaged here is handed over as its UID.
    pub fn messages(
        &self,
        tenant: &str,
        mailbox: &str,
        from_uid: u32,
        f: impl FnMut(StoredMessage) -> bool,
    ) -> R<()> {
        let prefix = keys::message_prefix(tenant, mailbox);
        let mut f = f;
        self.scan_stored(&prefix, &keys::message(tenant, mailbox, from_uid), |k, rec| {
            let uid = keys::uid_of_message_key(k).ok_or(ReadError::Corrupt)?;
            Ok(f(Self::message_at(uid, rec)?))
        })
    }

    /// One encrypted chunk.
    pub fn chunk(&self, tenant: &str, blob: &BlobId, index: u32) -> R<Option<Vec<u8>>> {
        let db = self.db();
        Ok(db.get_cf(sm(&db), keys::chunk(tenant, blob, index))?)
    }

    /// Every upload staged and not committed, with what it holds on this
    /// node: its record, and the chunks and bytes stored under its blob.
    pub fn staged_uploads(&self) -> R<Vec<StagedUpload>> {
        let prefix = [keys::STAGED];
        let mut found = Vec::new();
        self.scan(
            &prefix,
            &prefix,
            |k, record: crate::state::records::StagedRecord| {
                if let Some((tenant, blob)) = keys::staged_of(k) {
                    found.push((tenant, blob, record));
                }
                true
            },
        )?;
        let mut out = Vec::with_capacity(found.len());
        for (tenant, blob, record) in found {
            let prefix = keys::blob_prefix(&tenant, &blob);
            let (mut chunks, mut bytes) = (0u64, 0u64);
            self.scan_raw(&prefix, &prefix, |_, v| {
                chunks += 1;
                bytes += v.len() as u64;
                Ok(true)
            })?;
            out.push(StagedUpload {
                tenant,
                blob,
                record,
                chunks,
                bytes,
            });
        }
        Ok(out)
    }

    /// What an idempotency key was used for (`key` as stored: hashed, see
    /// [`crate::crypto::TenantNames::idempotency_key`]).
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

/// Rehearsals of two-person operations read this node's copy.
/// An upload staged and not committed, as one node holds it.
#[derive(Debug, Clone)]
pub struct StagedUpload {
    /// Its tenant.
    pub tenant: String,
    /// Its blob.
    pub blob: BlobId,
    /// Its staging record.
    pub record: crate::state::records::StagedRecord,
    /// Chunks stored under its blob.
    pub chunks: u64,
    /// Their bytes (ciphertext).
    pub bytes: u64,
}

impl crate::state::ops::View for MailReader {
    type Error = ReadError;

    fn policy(&self, identity: &str) -> R<Option<crate::state::policy::IdentityPolicy>> {
        self.identity_policy(identity)
    }

    fn tenant(&self, tenant: &str) -> R<Option<TenantRecord>> {
        MailReader::tenant(self, tenant)
    }

    fn mailbox(&self, tenant: &str, mailbox: &str) -> R<Option<MailboxRecord>> {
        MailReader::mailbox(self, tenant, mailbox)
    }

    fn backup(&self, id: &str) -> R<Option<crate::state::backup::BackupRecord>> {
        MailReader::backup(self, id)
    }

    fn message_facts(
        &self,
        tenant: &str,
        mailbox: &str,
    ) -> R<Vec<Result<crate::state::ops::MessageFacts, u32>>> {
        let mut out = Vec::new();
        self.messages(tenant, mailbox, 1, |m| {
            out.push(m.map(|m| crate::state::ops::MessageFacts::of(&m)));
            true
        })?;
        Ok(out)
    }

    fn audit_settings(&self) -> R<Option<crate::state::audit::AuditSettings>> {
        MailReader::audit_settings(self)
    }

    fn leadership_pin(&self) -> R<Option<crate::state::ops::LeadershipPin>> {
        MailReader::leadership_pin(self)
    }

    fn membership(&self) -> R<Option<crate::state::types::StoredMembership>> {
        self.get(keys::META_MEMBERSHIP)
    }

    fn member_record(&self, id: u64) -> R<Option<crate::state::member::MemberRecord>> {
        MailReader::member_record(self, id)
    }

    fn repair_record(&self) -> R<Option<crate::state::member::RepairRecord>> {
        MailReader::repair_record(self)
    }
}
