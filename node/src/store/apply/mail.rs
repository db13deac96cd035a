//! The mail domain: tenants, mailboxes, message bodies, appends (with their
//! idempotency keys), flags, claims, moves and expunges.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Decided, Res, Tx};
use crate::crypto::{NameKind, TenantNames};
use crate::state::audit::AuditEvent;
use crate::state::command::{CommandResult, NewMessage, Refusal};
use crate::state::keys;
use crate::state::records::{
    BlobId, ChangeKind, ChangeRecord, IdempotencyRecord, MailboxRecord, MessageRecord, StagedRecord,
    TenantRecord, WrappedKey,
};

impl Tx<'_> {
    /// The tenant's name keys; `None` for a tenant that does not exist (its
    /// commands are refused). Leaders protect names before they propose;
    /// these keys protect what an older leader, or a log entry written before
    /// data version 3, carries in clear (sealing is deterministic, so every
    /// replica stores the same).
    fn tenant_names(&self, tenant: &str) -> Res<Option<Arc<TenantNames>>> {
        let Some(rec) = self.get::<TenantRecord>(&keys::tenant(tenant))? else {
            return Ok(None);
        };
        let first = rec.keys.first().expect("a tenant record holds a key");
        let names = self
            .keys
            .names(tenant, first)
            .expect("a tenant's data key does not unwrap under this node's master key");
        Ok(Some(names))
    }

    fn protect_flags(&self, tenant: &str, flags: Vec<String>) -> Res<Vec<String>> {
        Ok(match self.tenant_names(tenant)? {
            Some(n) => flags.iter().map(|f| n.seal_flag(f)).collect(),
            None => flags,
        })
    }

    fn protect_agent(&self, tenant: &str, agent: String) -> Res<String> {
        Ok(match self.tenant_names(tenant)? {
            Some(n) => n.seal(NameKind::Agent, &agent),
            None => agent,
        })
    }

    pub(super) fn create_tenant(&mut self, tenant: &str, key: WrappedKey) -> Decided {
        let k = keys::tenant(tenant);
        if self.get_raw(&k)?.is_some() {
            return Ok(Err(Refusal::TenantExists));
        }
        self.put(k, &TenantRecord { keys: vec![key] });
        Ok(Ok(CommandResult::Done))
    }

    pub(super) fn create_mailbox(&mut self, tenant: &str, mailbox: &str, uidvalidity: u32) -> Decided {
        if self.get_raw(&keys::tenant(tenant))?.is_none() {
            return Ok(Err(Refusal::NoTenant));
        }
        let k = keys::mailbox(tenant, mailbox);
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

    pub(super) fn put_chunk(
        &mut self,
        tenant: &str,
        blob: &BlobId,
        index: u32,
        ciphertext: Vec<u8>,
    ) -> Decided {
        self.put_raw(keys::chunk(tenant, blob, index), ciphertext);
        // The upload is active again: its idle time starts over.
        let sk = keys::staged(tenant, blob);
        let chunks = self
            .get::<StagedRecord>(&sk)?
            .map_or(0, |r| r.chunks)
            .max(index.saturating_add(1));
        self.put(
            sk,
            &StagedRecord {
                chunks,
                idle_since_ms: None,
            },
        );
        Ok(Ok(CommandResult::Done))
    }

    pub(super) fn drop_blob(&mut self, tenant: &str, blob: &BlobId, chunks: u32) -> Decided {
        for i in 0..chunks {
            self.delete(keys::chunk(tenant, blob, i));
        }
        self.unstage(tenant, blob);
        Ok(Ok(CommandResult::Done))
    }

    /// Removes an upload's staging record (its chunks are committed or gone).
    fn unstage(&mut self, tenant: &str, blob: &BlobId) {
        self.delete(keys::staged(tenant, blob));
    }

    /// Expires uploads idle since `now_ms - expiry_ms` or earlier and marks
    /// the others idle since `now_ms` (see `Command::ExpireStaged`); each
    /// expired upload is audited (`staged-expired`, by `node:N`, its tenant
    /// and blob id, how many chunks).
    pub(super) fn expire_staged(&mut self, now_ms: i64, expiry_ms: i64, node: u64) -> Decided {
        let (mut uploads, mut chunks, mut marked) = (0, 0, 0);
        let mut events = Vec::new();
        for k in self.keys_under(&[keys::STAGED])? {
            let Some((tenant, blob)) = keys::staged_of(&k) else {
                continue;
            };
            let Some(mut record) = self.get::<StagedRecord>(&k)? else {
                continue;
            };
            match record.idle_since_ms {
                Some(since) if since <= now_ms.saturating_sub(expiry_ms) => {
                    // Every chunk under the blob, not only `0..chunks`: an
                    // index beyond the record cannot exist, but a scan costs
                    // no more and leaves nothing behind.
                    let mut removed = 0u64;
                    for ck in self.keys_under(&keys::blob_prefix(&tenant, &blob))? {
                        self.delete(ck);
                        removed += 1;
                    }
                    self.delete(k);
                    events.push(AuditEvent {
                        time_ms: now_ms,
                        identity: format!("node:{node}"),
                        source: "-".into(),
                        action: "staged-expired".into(),
                        target: format!("{tenant}/{}", crate::state::ops::hex(&blob)),
                        result: format!("{removed} chunk(s) idle since {since}"),
                        node,
                    });
                    chunks += removed;
                    uploads += 1;
                }
                Some(_) => {}
                None => {
                    record.idle_since_ms = Some(now_ms);
                    self.put(k, &record);
                    marked += 1;
                }
            }
        }
        if !events.is_empty() {
            self.append_audit(events)?.ok();
        }
        Ok(Ok(CommandResult::Expired {
            uploads,
            chunks,
            marked,
        }))
    }

    pub(super) fn update_flags(
        &mut self,
        tenant: &str,
        mailbox: &str,
        uid: u32,
        add: Vec<String>,
        remove: Vec<String>,
        unchanged_since: Option<u64>,
    ) -> Decided {
        let add = self.protect_flags(tenant, add)?;
        let remove = self.protect_flags(tenant, remove)?;
        self.change(tenant, mailbox, uid, |m| {
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
        })
    }

    pub(super) fn claim(&mut self, tenant: &str, mailbox: &str, uid: u32, agent: String) -> Decided {
        let agent = self.protect_agent(tenant, agent)?;
        self.change(tenant, mailbox, uid, |m| match &m.claimed_by {
            Some(owner) if *owner != agent => Err(Refusal::ClaimedBy(owner.clone())),
            _ => {
                m.claimed_by = Some(agent);
                Ok(ChangeKind::Claimed)
            }
        })
    }

    pub(super) fn release(&mut self, tenant: &str, mailbox: &str, uid: u32, agent: &str) -> Decided {
        let agent = self.protect_agent(tenant, agent.to_string())?;
        self.change(tenant, mailbox, uid, |m| match &m.claimed_by {
            Some(owner) if *owner == agent => {
                m.claimed_by = None;
                Ok(ChangeKind::Released)
            }
            _ => Err(Refusal::NotClaimant),
        })
    }

    pub(super) fn move_message(
        &mut self,
        tenant: &str,
        mailbox: &str,
        uid: u32,
        message: NewMessage,
    ) -> Decided {
        if self
            .get::<MessageRecord>(&keys::message(tenant, mailbox, uid))?
            .is_none()
        {
            self.drop_staged(tenant, &message);
            return Ok(Err(Refusal::NoMessage));
        }
        let appended = self.append(tenant, message)?;
        if appended.is_ok() {
            // Cannot be refused: the source mailbox and message were checked above.
            let _ = self.expunge(tenant, mailbox, &[uid])?;
        }
        Ok(appended)
    }

    fn drop_staged(&mut self, tenant: &str, m: &NewMessage) {
        for i in 0..m.staged_chunks {
            self.delete(keys::chunk(tenant, &m.blob, i));
        }
        if m.staged_chunks > 0 {
            self.unstage(tenant, &m.blob);
        }
    }

    pub(super) fn append(&mut self, tenant: &str, mut m: NewMessage) -> Decided {
        if let Some(names) = self.tenant_names(tenant)? {
            m.idempotency_key = names.idempotency_key(&m.idempotency_key);
            m.flags = m.flags.iter().map(|f| names.seal_flag(f)).collect();
        }
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
        if chunks > 0 {
            self.unstage(tenant, &m.blob);
        }
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
    ) -> Decided {
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

    pub(super) fn expunge(&mut self, tenant: &str, mailbox: &str, uids: &[u32]) -> Decided {
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

    /// Deletes a mailbox and everything in it — its record, every message
    /// record and its chunks, its idempotency and change records — in this
    /// entry (a two-person operation's step, after a verified backup):
    /// the number of messages deleted. A message record this node finds
    /// damaged is deleted too; its chunks, which only its record names, stay.
    pub(super) fn delete_mailbox(&mut self, tenant: &str, mailbox: &str) -> Res<Result<u64, Refusal>> {
        let mk = keys::mailbox(tenant, mailbox);
        if self.get_raw(&mk)?.is_none() {
            return Ok(Err(Refusal::NoMailbox));
        }
        let mut deleted = 0;
        for (k, record) in self.message_records(tenant, mailbox)? {
            match record {
                Some(msg) => {
                    for i in 0..msg.chunks {
                        self.delete(keys::chunk(tenant, &msg.blob, i));
                    }
                }
                None => tracing::warn!(
                    tenant,
                    uid = keys::uid_of_message_key(&k),
                    "a damaged message record of a deleted mailbox: its chunks stay on this node"
                ),
            }
            self.delete(k);
            deleted += 1;
        }
        for prefix in [
            keys::idempotency(tenant, mailbox, ""),
            keys::change_prefix(tenant, mailbox),
        ] {
            for k in self.keys_under(&prefix)? {
                self.delete(k);
            }
        }
        self.delete(mk);
        Ok(Ok(deleted))
    }

    /// Every message record of a mailbox with its key, in UID order; one
    /// this node cannot open or decode is `None`.
    pub(super) fn message_records(
        &self,
        tenant: &str,
        mailbox: &str,
    ) -> Res<Vec<(Vec<u8>, Option<MessageRecord>)>> {
        let mut out = Vec::new();
        for k in self.keys_under(&keys::message_prefix(tenant, mailbox))? {
            let stored = self.get_raw(&k)?;
            let record = stored.as_deref().and_then(|v| {
                let encoded = self.keys.binding().open(&k, v)?;
                crate::state::codec::decode::<MessageRecord>(encoded).ok()
            });
            out.push((k, record));
        }
        Ok(out)
    }
}
