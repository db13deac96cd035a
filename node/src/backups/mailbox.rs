//! Restoring one mailbox from a backup this node holds into the live
//! cluster, under a new name (the everyday case: a mailbox expunged or
//! deleted by mistake).
//!
//! The backup is verified first (manifest and every file); its data is
//! opened read-only, each message's body decrypted with the keyring
//! object's keys and sealed again for the new mailbox with the tenant's
//! current live key (the ciphertext is bound to its mailbox, so it cannot be
//! copied), and appended with its flags and keywords, internal date and
//! headers — in UID order, so the order is kept; UIDs and MODSEQs are the new
//! mailbox's own. No plaintext leaves the node: the commands carry
//! ciphertext, through this node's proposer when it leads, else the
//! leader's peer service (`ProposeRestored`). Each message's idempotency key
//! is derived from the backup, the mailbox and its UID there, so a restore
//! cut short and run again with `resume` adds only what is missing.

use std::sync::Arc;
use std::time::Instant;

use serde_bytes::ByteBuf;

use super::Backups;
use crate::crypto::{MessageCipher, TenantNames, HEADERS_CHUNK};
use crate::raft::{leader_peer, LeaderPeer};
use crate::state::backup::BackupKeyring;
use crate::state::codec::{decode, encode};
use crate::state::command::{BlobId, Command, CommandResult, NewMessage, Refusal};
use crate::state::records::{MessageRecord, WrappedKey};
use crate::store::backup::{self as disk, BackupError, DATA, KEYRING};
use crate::store::{MailReader, StateDb};

/// Which mailbox to restore, and as what.
#[derive(Debug, Clone)]
pub struct MailboxRestore {
    /// The backup (held by this node).
    pub backup: String,
    /// The tenant.
    pub tenant: String,
    /// The mailbox, as named in the backup.
    pub mailbox: String,
    /// The live mailbox to create and fill.
    pub new_mailbox: String,
    /// Go on into `new_mailbox` if it exists (a restore cut short).
    pub resume: bool,
}

/// What a mailbox restore did.
#[derive(Debug, Clone, Default)]
pub struct MailboxRestored {
    /// Messages appended now.
    pub messages: u32,
    /// Messages already restored by an earlier run (`resume`).
    pub skipped: u32,
    /// Their plaintext bytes (appended now).
    pub bytes: u64,
    /// The new mailbox's UIDVALIDITY.
    pub uidvalidity: u32,
    /// How long it took.
    pub took_ms: u64,
}

/// Why a mailbox restore failed. Names the backup, the tenant, the mailbox
/// or a UID, never content.
#[derive(Debug, thiserror::Error)]
pub enum MailboxRestoreError {
    /// The backup does not verify.
    #[error("{0}")]
    Backup(#[from] BackupError),
    /// The backup holds no such mailbox (or tenant).
    #[error("backup {backup} holds no mailbox {tenant}/{mailbox}")]
    NotInBackup {
        /// The backup.
        backup: String,
        /// The tenant.
        tenant: String,
        /// The mailbox.
        mailbox: String,
    },
    /// The live cluster refused (no such tenant, the mailbox exists…).
    #[error("{0}")]
    Refused(Refusal),
    /// A message of the backup is damaged or does not decrypt.
    #[error("backup {backup}: message {uid} of {tenant}/{mailbox} cannot be read")]
    Damaged {
        /// The backup.
        backup: String,
        /// The tenant.
        tenant: String,
        /// The mailbox.
        mailbox: String,
        /// The UID in the backup.
        uid: u32,
    },
    /// A write did not commit (or its outcome is unknown): run it again with
    /// `resume`.
    #[error("a write of the restore failed after {done} messages ({0}); run it again with resume to go on", done = .1)]
    Write(String, u32),
    /// Reading the live state failed.
    #[error("reading the live state failed: {0}")]
    Live(String),
}

/// The idempotency key (before hashing) of a restored message.
fn restore_key(backup: &str, mailbox: &str, uidvalidity: u32, uid: u32) -> String {
    format!("restore:{backup}:{mailbox}:{uidvalidity}:{uid}")
}

/// A backup's mailbox, opened and read: every message record, and the keys
/// to open them.
struct Opened {
    backup: String,
    keys: Vec<WrappedKey>,
    names: Arc<TenantNames>,
    reader: MailReader,
    uidvalidity: u32,
    records: Vec<MessageRecord>,
}

impl Backups {
    /// Verifies backup `backup` (manifest and every file), opens it and
    /// reads every message record of `tenant`/`mailbox` in it.
    async fn open_mailbox(
        &self,
        backup: &str,
        tenant: &str,
        mailbox: &str,
    ) -> Result<Opened, MailboxRestoreError> {
        let p = &self.inner.p;
        let dir = self.root().join(backup);
        let keyring = p.keyring.clone();
        let d = dir.clone();
        let manifest = tokio::task::spawn_blocking(move || disk::verify(&d, &keyring))
            .await
            .map_err(|e| BackupError::Io(std::io::Error::other(e.to_string())))??;
        let ring: BackupKeyring = serde_json::from_slice(
            &std::fs::read(dir.join(KEYRING)).map_err(BackupError::Io)?,
        )
        .map_err(|_| BackupError::NotRestorable {
            backup: backup.to_string(),
            what: "the keyring object does not parse".into(),
        })?;
        let not_in_backup = || MailboxRestoreError::NotInBackup {
            backup: manifest.backup_id.clone(),
            tenant: tenant.to_string(),
            mailbox: mailbox.to_string(),
        };
        let keys = ring.tenants.get(tenant).ok_or_else(not_in_backup)?.clone();
        let db = crate::store::open_state_read_only_at(&dir.join(DATA)).map_err(BackupError::Db)?;
        let old = MailReader::new(StateDb::fixed(db), p.keyring.binding().clone());
        let live_err = |e: crate::store::ReadError| MailboxRestoreError::Live(e.to_string());
        let old_box = old
            .mailbox(tenant, mailbox)
            .map_err(live_err)?
            .ok_or_else(not_in_backup)?;
        let damaged = |uid| MailboxRestoreError::Damaged {
            backup: manifest.backup_id.clone(),
            tenant: tenant.to_string(),
            mailbox: mailbox.to_string(),
            uid,
        };
        let mut records: Vec<MessageRecord> = Vec::new();
        let mut bad = None;
        old.messages(tenant, mailbox, 1, |m| match m {
            Ok(m) => {
                records.push(m);
                true
            }
            Err(uid) => {
                bad = Some(uid);
                false
            }
        })
        .map_err(live_err)?;
        if let Some(uid) = bad {
            return Err(damaged(uid));
        }
        let first = keys.first().ok_or_else(not_in_backup)?;
        let names = p.keyring.names(tenant, first).map_err(|_| damaged(0))?;
        for m in &records {
            let version = keys
                .iter()
                .find(|k| k.version == m.key_version)
                .ok_or_else(|| damaged(m.uid))?;
            p.keyring.cipher(tenant, version).map_err(|_| damaged(m.uid))?;
        }
        Ok(Opened {
            backup: manifest.backup_id,
            keys,
            names,
            reader: old,
            uidvalidity: old_box.uidvalidity,
            records,
        })
    }

    /// Checks a mailbox restore without writing (the rehearsal of the
    /// operation): the backup verifies, its keys unwrap, every message
    /// record of the mailbox reads; and the live tenant exists. The
    /// mailbox's messages and their bytes.
    pub async fn check_mailbox(
        &self,
        backup: &str,
        tenant: &str,
        mailbox: &str,
    ) -> Result<(u64, u64), MailboxRestoreError> {
        let _one = self.inner.taking.lock().await;
        let opened = self.open_mailbox(backup, tenant, mailbox).await?;
        self.inner
            .p
            .reader
            .tenant(tenant)
            .map_err(|e| MailboxRestoreError::Live(e.to_string()))?
            .ok_or(MailboxRestoreError::Refused(Refusal::NoTenant))?;
        let bytes = opened.records.iter().map(|m| m.size).sum();
        Ok((opened.records.len() as u64, bytes))
    }

    /// Restores one mailbox; see the module's documentation.
    pub async fn restore_mailbox(&self, r: &MailboxRestore) -> Result<MailboxRestored, MailboxRestoreError> {
        let started = Instant::now();
        // Not removed by retention meanwhile.
        let _one = self.inner.taking.lock().await;
        let p = &self.inner.p;
        let Opened {
            backup,
            keys: old_keys,
            names: old_names,
            reader: old,
            uidvalidity: old_uidvalidity,
            records,
        } = self.open_mailbox(&r.backup, &r.tenant, &r.mailbox).await?;
        let live_err = |e: crate::store::ReadError| MailboxRestoreError::Live(e.to_string());
        let damaged = |uid| MailboxRestoreError::Damaged {
            backup: backup.clone(),
            tenant: r.tenant.clone(),
            mailbox: r.mailbox.clone(),
            uid,
        };
        // The live side: the tenant's current key and its names.
        let live = p
            .reader
            .tenant(&r.tenant)
            .map_err(live_err)?
            .ok_or(MailboxRestoreError::Refused(Refusal::NoTenant))?;
        let live_key = live
            .keys
            .last()
            .ok_or(MailboxRestoreError::Live("the tenant has no data key".into()))?;
        let live_first = live.keys.first().unwrap_or(live_key);
        let names = p
            .keyring
            .names(&r.tenant, live_first)
            .map_err(|e| MailboxRestoreError::Live(e.to_string()))?;
        let live_cipher = p
            .keyring
            .cipher(&r.tenant, live_key)
            .map_err(|e| MailboxRestoreError::Live(e.to_string()))?;
        let mut out = MailboxRestored::default();
        let uidvalidity = (crate::clock::now_ms() / 1000) as u32;
        match self
            .propose_restored(Command::CreateMailbox {
                tenant: r.tenant.clone(),
                mailbox: r.new_mailbox.clone(),
                uidvalidity,
            })
            .await
        {
            Ok(_) => {}
            Err(Proposed::Refused(Refusal::MailboxExists)) if r.resume => {}
            Err(Proposed::Refused(refusal)) => return Err(MailboxRestoreError::Refused(refusal)),
            Err(Proposed::Failed(e)) => return Err(MailboxRestoreError::Write(e, 0)),
        }
        for m in &records {
            let key = names.idempotency_key(&restore_key(&backup, &r.mailbox, old_uidvalidity, m.uid));
            if p.reader
                .idempotency(&r.tenant, &r.new_mailbox, &key)
                .map_err(live_err)?
                .is_some()
            {
                out.skipped += 1;
                continue;
            }
            let old_version = old_keys
                .iter()
                .find(|k| k.version == m.key_version)
                .ok_or_else(|| damaged(m.uid))?;
            let old_cipher = p
                .keyring
                .cipher(&r.tenant, old_version)
                .map_err(|_| damaged(m.uid))?;
            let opened = MessageCipher::new(old_cipher, &r.tenant, &r.mailbox, m.blob, m.key_version, false);
            let blob = new_blob().map_err(|e| MailboxRestoreError::Write(e, out.messages))?;
            let sealed = MessageCipher::new(
                live_cipher.clone(),
                &r.tenant,
                &r.new_mailbox,
                blob,
                live_key.version,
                false,
            );
            let reseal = |i: u32, ct: &[u8]| -> Result<Vec<u8>, MailboxRestoreError> {
                let plain = opened.open(i, ct).map_err(|_| damaged(m.uid))?;
                sealed
                    .seal(i, &plain)
                    .map_err(|e| MailboxRestoreError::Live(e.to_string()))
            };
            let chunk = |i: u32| -> Result<Vec<u8>, MailboxRestoreError> {
                let ct = old
                    .chunk(&r.tenant, &m.blob, i)
                    .ok()
                    .flatten()
                    .ok_or_else(|| damaged(m.uid))?;
                reseal(i, &ct)
            };
            if m.chunks == 0 {
                return Err(damaged(m.uid));
            }
            for i in 0..m.chunks - 1 {
                let ciphertext = ByteBuf::from(chunk(i)?);
                let staged = self
                    .propose_restored(Command::PutChunk {
                        tenant: r.tenant.clone(),
                        blob,
                        index: i,
                        ciphertext,
                    })
                    .await;
                if let Err(e) = staged {
                    self.drop_blob(&r.tenant, blob, i + 1).await;
                    return Err(MailboxRestoreError::Write(e.to_string(), out.messages));
                }
            }
            let last = ByteBuf::from(chunk(m.chunks - 1)?);
            let flags = old_names.open_flags(&m.flags).map_err(|_| damaged(m.uid))?;
            let message = NewMessage {
                mailbox: r.new_mailbox.clone(),
                idempotency_key: key,
                blob,
                key_version: live_key.version,
                flags: flags.iter().map(|f| names.seal_flag(f)).collect(),
                internal_date_ms: m.internal_date_ms,
                size: m.size,
                staged_chunks: m.chunks - 1,
                inline_chunks: vec![last],
                headers: reseal(HEADERS_CHUNK, &m.headers)?,
            };
            match self
                .propose_restored(Command::Append {
                    tenant: r.tenant.clone(),
                    message,
                })
                .await
            {
                Ok(_) => {}
                Err(Proposed::Refused(refusal)) => {
                    self.drop_blob(&r.tenant, blob, m.chunks - 1).await;
                    return Err(MailboxRestoreError::Refused(refusal));
                }
                Err(Proposed::Failed(e)) => return Err(MailboxRestoreError::Write(e, out.messages)),
            }
            out.messages += 1;
            out.bytes += m.size;
            if let Some(pause) = &p.pause_restore {
                while pause.exists() {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        out.uidvalidity = p
            .reader
            .mailbox(&r.tenant, &r.new_mailbox)
            .map_err(live_err)?
            .map(|b| b.uidvalidity)
            .unwrap_or(uidvalidity);
        out.took_ms = started.elapsed().as_millis() as u64;
        metrics::counter!("mailvault_backup_mailbox_restores_total").increment(1);
        metrics::counter!("mailvault_backup_restored_messages_total").increment(u64::from(out.messages));
        metrics::counter!("mailvault_backup_restored_bytes_total").increment(out.bytes);
        metrics::histogram!("mailvault_backup_mailbox_restore_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Drops the staged chunks of a message that will not be appended (best effort).
    async fn drop_blob(&self, tenant: &str, blob: BlobId, chunks: u32) {
        if chunks == 0 {
            return;
        }
        let dropped = self
            .propose_restored(Command::DropBlob {
                tenant: tenant.to_string(),
                blob,
                chunks,
            })
            .await;
        if let Err(e) = dropped {
            tracing::warn!(error = %e, chunks, "could not drop the staged chunks of a restored message");
        }
    }

    /// Proposes one mail command of a restore: here when this node leads,
    /// else through the leader's peer service.
    async fn propose_restored(&self, command: Command) -> Result<CommandResult, Proposed> {
        let p = &self.inner.p;
        let result = match leader_peer(&p.raft, &p.peers).map_err(Proposed::Failed)? {
            LeaderPeer::Here => p
                .proposer
                .propose(command)
                .await
                .map_err(|e| Proposed::Failed(e.to_string()))?,
            LeaderPeer::There(mut c) => {
                let reply = c
                    .propose_restored(tonic::Request::new(mailvault_proto::raft::RaftPayload {
                        data: encode(&command),
                    }))
                    .await
                    .map_err(|s| Proposed::Failed(s.message().to_string()))?;
                decode::<CommandResult>(&reply.into_inner().data)
                    .map_err(|_| Proposed::Failed("the leader's answer does not decode".into()))?
            }
        };
        match result {
            CommandResult::Refused(r) => Err(Proposed::Refused(r)),
            r => Ok(r),
        }
    }
}

/// Why a proposal of a restore did not apply.
#[derive(Debug)]
enum Proposed {
    Refused(Refusal),
    Failed(String),
}

impl std::fmt::Display for Proposed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proposed::Refused(r) => write!(f, "refused: {r}"),
            Proposed::Failed(e) => write!(f, "{e}"),
        }
    }
}

fn new_blob() -> Result<BlobId, String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|_| "random source unavailable".to_string())?;
    Ok(b)
}
