//! Deterministic application of commands to the state machine.
//!
//! All commands of one `apply` call are written with one `WriteBatch`. Reads
//! within the call go through an overlay so a command sees the effects of the
//! commands before it.

use std::collections::{BTreeSet, HashMap};

use rocksdb::{ReadOptions, ReadTier, WriteBatch};

use crate::audit::{chain_hash, AuditHead, AuditRecord};
use crate::command::{Command, CommandResult, NewMessage, Refusal};
use crate::keys;
use crate::model::{
    decode, encode, ChangeKind, ChangeRecord, IdempotencyRecord, MailboxRecord, MessageRecord, TenantRecord,
};

use super::db::{Db, CF_SM};

/// A read-your-writes view over the database and a pending batch.
pub(super) struct Tx<'a> {
    db: &'a Db,
    pub(super) batch: WriteBatch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Reads only from the memtables and the block cache: a read that would
    /// go to disk fails with `ErrorKind::Incomplete` instead.
    memory_only: bool,
}

type Res<T> = Result<T, rocksdb::Error>;

impl<'a> Tx<'a> {
    pub(super) fn new(db: &'a Db) -> Tx<'a> {
        Tx {
            db,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
            memory_only: false,
        }
    }

    /// A transaction whose reads never wait for the disk (see `memory_only`).
    pub(super) fn in_memory(db: &'a Db) -> Tx<'a> {
        Tx {
            memory_only: true,
            ..Tx::new(db)
        }
    }

    fn cf(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_SM).expect("sm column family")
    }

    fn get_raw(&self, key: &[u8]) -> Res<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if self.memory_only {
            let mut ro = ReadOptions::default();
            ro.set_read_tier(ReadTier::BlockCache);
            return self.db.get_cf_opt(self.cf(), key, &ro);
        }
        self.db.get_cf(self.cf(), key)
    }

    /// Reads a record. A record that does not decode is a corrupt store, which
    /// must stop the node rather than be silently replaced.
    fn get<T: for<'de> serde::Deserialize<'de>>(&self, key: &[u8]) -> Res<Option<T>> {
        Ok(self
            .get_raw(key)?
            .map(|b| decode(&b).expect("corrupt state-machine record")))
    }

    pub(super) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let cf = self.db.cf_handle(CF_SM).expect("sm column family");
        self.batch.put_cf(cf, &key, &value);
        self.overlay.insert(key, Some(value));
    }

    fn put<T: serde::Serialize>(&mut self, key: Vec<u8>, value: &T) {
        self.put_raw(key, encode(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        let cf = self.db.cf_handle(CF_SM).expect("sm column family");
        self.batch.delete_cf(cf, &key);
        self.overlay.insert(key, None);
    }

    /// Applies one command.
    pub(super) fn apply(&mut self, cmd: Command) -> Res<CommandResult> {
        Ok(match self.decide(cmd)? {
            Ok(r) => r,
            Err(refusal) => CommandResult::Refused(refusal),
        })
    }

    fn decide(&mut self, cmd: Command) -> Res<Result<CommandResult, Refusal>> {
        match cmd {
            Command::CreateTenant { tenant, key } => {
                let k = keys::tenant(&tenant);
                if self.get_raw(&k)?.is_some() {
                    return Ok(Err(Refusal::TenantExists));
                }
                self.put(k, &TenantRecord { keys: vec![key] });
                Ok(Ok(CommandResult::Done))
            }
            Command::CreateMailbox {
                tenant,
                mailbox,
                uidvalidity,
            } => {
                if self.get_raw(&keys::tenant(&tenant))?.is_none() {
                    return Ok(Err(Refusal::NoTenant));
                }
                let k = keys::mailbox(&tenant, &mailbox);
                if self.get_raw(&k)?.is_some() {
                    return Ok(Err(Refusal::MailboxExists));
                }
                let rec = MailboxRecord {
                    uidvalidity,
                    uidnext: 1,
                    highest_modseq: 0,
                    messages: 0,
                    total_bytes: 0,
                };
                self.put(k, &rec);
                Ok(Ok(CommandResult::MailboxCreated { uidvalidity }))
            }
            Command::PutChunk {
                tenant,
                blob,
                index,
                ciphertext,
            } => {
                self.put_raw(keys::chunk(&tenant, &blob, index), ciphertext.into_vec());
                Ok(Ok(CommandResult::Done))
            }
            Command::DropBlob { tenant, blob, chunks } => {
                for i in 0..chunks {
                    self.delete(keys::chunk(&tenant, &blob, i));
                }
                Ok(Ok(CommandResult::Done))
            }
            Command::Append { tenant, message } => self.append(&tenant, message),
            Command::UpdateFlags {
                tenant,
                mailbox,
                uid,
                add,
                remove,
                unchanged_since,
            } => self.change(&tenant, &mailbox, uid, |m| {
                if let Some(since) = unchanged_since {
                    if m.modseq > since {
                        return Err(Refusal::Modified(m.modseq));
                    }
                }
                let mut set: BTreeSet<String> = m.flags.drain(..).collect();
                set.extend(add);
                for f in &remove {
                    set.remove(f);
                }
                m.flags = set.into_iter().collect();
                Ok(ChangeKind::Flags)
            }),
            Command::Claim {
                tenant,
                mailbox,
                uid,
                agent,
            } => self.change(&tenant, &mailbox, uid, |m| match &m.claimed_by {
                Some(owner) if *owner != agent => Err(Refusal::ClaimedBy(owner.clone())),
                _ => {
                    m.claimed_by = Some(agent);
                    Ok(ChangeKind::Claimed)
                }
            }),
            Command::Release {
                tenant,
                mailbox,
                uid,
                agent,
            } => self.change(&tenant, &mailbox, uid, |m| match &m.claimed_by {
                Some(owner) if *owner == agent => {
                    m.claimed_by = None;
                    Ok(ChangeKind::Released)
                }
                _ => Err(Refusal::NotClaimant),
            }),
            Command::Move {
                tenant,
                mailbox,
                uid,
                message,
            } => {
                if self
                    .get::<MessageRecord>(&keys::message(&tenant, &mailbox, uid))?
                    .is_none()
                {
                    self.drop_staged(&tenant, &message);
                    return Ok(Err(Refusal::NoMessage));
                }
                let appended = self.append(&tenant, message)?;
                if appended.is_ok() {
                    // Cannot be refused: the source mailbox and message were checked above.
                    let _ = self.expunge(&tenant, &mailbox, &[uid])?;
                }
                Ok(appended)
            }
            Command::Expunge {
                tenant,
                mailbox,
                uids,
            } => self.expunge(&tenant, &mailbox, &uids),
            Command::PutIdentity { identity, policy } => {
                self.put(keys::identity(&identity), &policy);
                Ok(Ok(CommandResult::Done))
            }
            Command::RevokeSerial { serial } => {
                self.put_raw(keys::revoked_serial(&serial), Vec::new());
                Ok(Ok(CommandResult::Done))
            }
            Command::Audit { events } => {
                let mut head: AuditHead = self.get(keys::AUDIT_HEAD)?.unwrap_or_default();
                for event in events {
                    let seq = head.seq + 1;
                    let hash = chain_hash(seq, &head.hash, &event);
                    let rec = AuditRecord {
                        seq,
                        event,
                        prev_hash: head.hash,
                        hash,
                    };
                    self.put(keys::audit(seq), &rec);
                    head = AuditHead { seq, hash };
                }
                self.put(keys::AUDIT_HEAD.to_vec(), &head);
                Ok(Ok(CommandResult::Done))
            }
        }
    }

    fn drop_staged(&mut self, tenant: &str, m: &NewMessage) {
        for i in 0..m.staged_chunks {
            self.delete(keys::chunk(tenant, &m.blob, i));
        }
    }

    fn append(&mut self, tenant: &str, m: NewMessage) -> Res<Result<CommandResult, Refusal>> {
        let mk = keys::mailbox(tenant, &m.mailbox);
        let Some(mut mbox) = self.get::<MailboxRecord>(&mk)? else {
            self.drop_staged(tenant, &m);
            return Ok(Err(Refusal::NoMailbox));
        };
        let ik = keys::idempotency(tenant, &m.mailbox, &m.idempotency_key);
        if !m.idempotency_key.is_empty() {
            if let Some(prev) = self.get::<IdempotencyRecord>(&ik)? {
                self.drop_staged(tenant, &m);
                return Ok(Ok(CommandResult::Appended {
                    uid: prev.uid,
                    modseq: prev.modseq,
                    uidvalidity: mbox.uidvalidity,
                    duplicate: true,
                }));
            }
        }
        for i in 0..m.staged_chunks {
            if self.get_raw(&keys::chunk(tenant, &m.blob, i))?.is_none() {
                self.drop_staged(tenant, &m);
                return Ok(Err(Refusal::IncompleteBody));
            }
        }
        let uid = mbox.uidnext;
        let Some(next) = uid.checked_add(1) else {
            self.drop_staged(tenant, &m);
            return Ok(Err(Refusal::UidsExhausted));
        };
        mbox.uidnext = next;
        mbox.highest_modseq += 1;
        mbox.messages += 1;
        mbox.total_bytes += m.size;
        let modseq = mbox.highest_modseq;
        let mut chunks = m.staged_chunks;
        for c in m.inline_chunks {
            self.put_raw(keys::chunk(tenant, &m.blob, chunks), c.into_vec());
            chunks += 1;
        }
        let flags: BTreeSet<String> = m.flags.into_iter().collect();
        let rec = MessageRecord {
            uid,
            modseq,
            flags: flags.into_iter().collect(),
            internal_date_ms: m.internal_date_ms,
            size: m.size,
            blob: m.blob,
            chunks,
            key_version: m.key_version,
            headers: m.headers,
            claimed_by: None,
        };
        self.record_change(tenant, &m.mailbox, modseq, &rec, ChangeKind::Appended);
        self.put(keys::message(tenant, &m.mailbox, uid), &rec);
        if !m.idempotency_key.is_empty() {
            self.put(ik, &IdempotencyRecord { uid, modseq });
        }
        let uidvalidity = mbox.uidvalidity;
        self.put(mk, &mbox);
        Ok(Ok(CommandResult::Appended {
            uid,
            modseq,
            uidvalidity,
            duplicate: false,
        }))
    }

    fn record_change(
        &mut self,
        tenant: &str,
        mailbox: &str,
        modseq: u64,
        m: &MessageRecord,
        kind: ChangeKind,
    ) {
        let change = ChangeRecord {
            uid: m.uid,
            kind,
            flags: m.flags.clone(),
            claimed_by: m.claimed_by.clone(),
        };
        self.put(keys::change(tenant, mailbox, modseq), &change);
    }

    /// Changes one message with `f`, bumping its MODSEQ.
    fn change(
        &mut self,
        tenant: &str,
        mailbox: &str,
        uid: u32,
        f: impl FnOnce(&mut MessageRecord) -> Result<ChangeKind, Refusal>,
    ) -> Res<Result<CommandResult, Refusal>> {
        let mk = keys::mailbox(tenant, mailbox);
        let Some(mut mbox) = self.get::<MailboxRecord>(&mk)? else {
            return Ok(Err(Refusal::NoMailbox));
        };
        let k = keys::message(tenant, mailbox, uid);
        let Some(mut msg) = self.get::<MessageRecord>(&k)? else {
            return Ok(Err(Refusal::NoMessage));
        };
        let kind = match f(&mut msg) {
            Ok(kind) => kind,
            Err(r) => return Ok(Err(r)),
        };
        mbox.highest_modseq += 1;
        msg.modseq = mbox.highest_modseq;
        self.record_change(tenant, mailbox, msg.modseq, &msg, kind);
        let result = CommandResult::Changed {
            modseq: msg.modseq,
            flags: msg.flags.clone(),
            claimed_by: msg.claimed_by.clone(),
        };
        self.put(k, &msg);
        self.put(mk, &mbox);
        Ok(Ok(result))
    }

    fn expunge(&mut self, tenant: &str, mailbox: &str, uids: &[u32]) -> Res<Result<CommandResult, Refusal>> {
        let mk = keys::mailbox(tenant, mailbox);
        let Some(mut mbox) = self.get::<MailboxRecord>(&mk)? else {
            return Ok(Err(Refusal::NoMailbox));
        };
        let mut removed = Vec::new();
        for &uid in uids {
            let k = keys::message(tenant, mailbox, uid);
            let Some(msg) = self.get::<MessageRecord>(&k)? else {
                continue;
            };
            for i in 0..msg.chunks {
                self.delete(keys::chunk(tenant, &msg.blob, i));
            }
            self.delete(k);
            mbox.highest_modseq += 1;
            mbox.messages -= 1;
            mbox.total_bytes -= msg.size;
            self.record_change(tenant, mailbox, mbox.highest_modseq, &msg, ChangeKind::Expunged);
            removed.push(uid);
        }
        let modseq = mbox.highest_modseq;
        self.put(mk, &mbox);
        Ok(Ok(CommandResult::Expunged {
            uids: removed,
            modseq,
        }))
    }
}
