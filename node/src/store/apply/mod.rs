//! Deterministic application of commands to the state machine.
//!
//! All commands of one `apply` call are written with one `WriteBatch`. Reads
//! within the call go through an overlay so a command sees the effects of the
//! commands before it. [`Tx::apply`] is the table from command to domain;
//! each domain's rules are in a file of their own, over the same [`Tx`]:
//! mail (`mail.rs`), access policies (`access.rs`), the audit chain
//! (`audit.rs`), the backup catalog (`backups.rs`) and two-person operations
//! (`ops.rs`). A new command family gets a file here and a line in the table.

mod access;
mod audit;
mod backups;
mod mail;
mod ops;
mod repair;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use rocksdb::{ReadOptions, ReadTier, WriteBatch};

use crate::crypto::Keyring;
use crate::state::codec::{decode, encode};
use crate::state::command::{Command, CommandResult, Refusal};
use crate::state::keys;

use super::db::{Db, CF_SM};

/// A read-your-writes view over the database and a pending batch.
pub(super) struct Tx<'a> {
    db: &'a Db,
    /// Binds records to their keys; protects names a command carries in clear.
    keys: &'a Keyring,
    pub(super) batch: WriteBatch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Reads only from the memtables and the block cache: a read that would
    /// go to disk fails with `ErrorKind::Incomplete` instead.
    memory_only: bool,
}

type Res<T> = Result<T, rocksdb::Error>;
/// What a command's rules decide: a result, or a refusal (a result too, of
/// the entry, not a failure of it).
type Decided = Res<Result<CommandResult, Refusal>>;

impl<'a> Tx<'a> {
    pub(super) fn new(db: &'a Db, keys: &'a Keyring) -> Tx<'a> {
        Tx {
            db,
            keys,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
            memory_only: false,
        }
    }

    /// A transaction whose reads never wait for the disk (see `memory_only`).
    pub(super) fn in_memory(db: &'a Db, keys: &'a Keyring) -> Tx<'a> {
        Tx {
            memory_only: true,
            ..Tx::new(db, keys)
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

    /// Reads a record. A record that fails its binding (moved, swapped or
    /// edited) or does not decode is a corrupt store, which must stop the
    /// node rather than be silently replaced or diverge from the replicas.
    fn get<T: for<'de> serde::Deserialize<'de>>(&self, key: &[u8]) -> Res<Option<T>> {
        Ok(self.get_raw(key)?.map(|stored| {
            let encoded = if keys::is_bound(key) {
                self.keys
                    .binding()
                    .open(key, &stored)
                    .expect("a state-machine record failed its binding to its key: the store is damaged")
            } else {
                &stored
            };
            decode(encoded).expect("corrupt state-machine record")
        }))
    }

    /// Every key under `prefix`, in order, as this transaction sees them:
    /// the database's, with the pending batch's puts and deletes.
    fn keys_under(&self, prefix: &[u8]) -> Res<Vec<Vec<u8>>> {
        let mut ro = ReadOptions::default();
        if self.memory_only {
            ro.set_read_tier(ReadTier::BlockCache);
        }
        ro.set_iterate_upper_bound(keys::prefix_end(prefix));
        let mut found = std::collections::BTreeSet::new();
        let mode = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf_opt(self.cf(), ro, mode) {
            let (k, _) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            found.insert(k.to_vec());
        }
        for (k, v) in self.overlay.iter().filter(|(k, _)| k.starts_with(prefix)) {
            match v {
                Some(_) => found.insert(k.clone()),
                None => found.remove(k),
            };
        }
        Ok(found.into_iter().collect())
    }

    /// Writes a value, bound to its key if its kind is bound.
    pub(super) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let value = if keys::is_bound(&key) {
            self.keys.binding().bind(&key, value)
        } else {
            value
        };
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

    /// The table from command to the domain rules that decide it.
    fn decide(&mut self, cmd: Command) -> Decided {
        match cmd {
            Command::CreateTenant { tenant, key } => self.create_tenant(&tenant, key),
            Command::CreateMailbox {
                tenant,
                mailbox,
                uidvalidity,
            } => self.create_mailbox(&tenant, &mailbox, uidvalidity),
            Command::PutChunk {
                tenant,
                blob,
                index,
                ciphertext,
            } => self.put_chunk(&tenant, &blob, index, ciphertext.into_vec()),
            Command::DropBlob { tenant, blob, chunks } => self.drop_blob(&tenant, &blob, chunks),
            Command::Append { tenant, message } => self.append(&tenant, message),
            Command::UpdateFlags {
                tenant,
                mailbox,
                uid,
                add,
                remove,
                unchanged_since,
            } => self.update_flags(&tenant, &mailbox, uid, add, remove, unchanged_since),
            Command::Claim {
                tenant,
                mailbox,
                uid,
                agent,
            } => self.claim(&tenant, &mailbox, uid, agent),
            Command::Release {
                tenant,
                mailbox,
                uid,
                agent,
            } => self.release(&tenant, &mailbox, uid, &agent),
            Command::Move {
                tenant,
                mailbox,
                uid,
                message,
            } => self.move_message(&tenant, &mailbox, uid, message),
            Command::Expunge {
                tenant,
                mailbox,
                uids,
            } => self.expunge(&tenant, &mailbox, &uids),
            Command::PutIdentity { identity, policy } => self.put_identity(&identity, &policy),
            Command::RevokeSerial { serial } => self.revoke_serial(&serial),
            Command::Audit { events } => self.append_audit(events),
            Command::Access(change) => self.change_access(change),
            Command::Backups(change) => self.change_backups(change),
            Command::Ops(change) => self.change_operation(change),
            Command::Repair(change, actor) => self.change_repair(change, &actor),
            Command::ExpireStaged {
                now_ms,
                expiry_ms,
                node,
            } => self.expire_staged(now_ms, expiry_ms, node),
        }
    }
}
