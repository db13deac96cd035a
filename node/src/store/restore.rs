//! Restoring a whole cluster from a backup, offline: the data directories of
//! a new cluster, each node's written from one verified copy of the backup.
//!
//! The copy has been checked as a drill checks it (`super::drill`), which
//! also put the data keys back into the tenant records; [`prepare`] then
//! makes it the new cluster's state — the new membership (at the backup's
//! own applied log id, so the log goes on from there and MODSEQs keep
//! rising), the old cluster's backup catalog dropped (those backups are the
//! old cluster's files), and one audit record saying where the state came
//! from — and [`write_node`] gives each node its own copy of it, with an
//! empty Raft log and a vote in the backup's term (a log id of a lower term
//! after the backup's last entry would be refused by every voter). Each
//! node's directory is written beside its place and renamed into it when
//! whole: a crash leaves it absent, never half-written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::Membership;
use rocksdb::WriteOptions;

use super::apply::Tx;
use super::backup::{hex, BackupError};
use super::db::{CF_META, CF_SM};
use super::state_db::{self, open_state_at, sync_dir};
use crate::crypto::Keyring;
use crate::state::audit::AuditEvent;
use crate::state::codec::{decode, encode};
use crate::state::command::{Command, CommandResult};
use crate::state::keys;
use crate::state::types::{LogId, Member, NodeId, StoredMembership};

/// Why a restore was refused or failed. Names a directory or a tenant at
/// most, never content or key material.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The backup does not verify or does not restore.
    #[error("{0}")]
    Backup(#[from] BackupError),
    /// A target data directory already holds something.
    #[error(
        "node {node}: data directory {dir} is not empty: a restore writes only new data directories; refused"
    )]
    NotEmpty {
        /// The node.
        node: NodeId,
        /// Its data directory.
        dir: String,
    },
    /// The master key does not unwrap a data key of the backup.
    #[error("the master key given cannot unwrap the data keys of tenant {tenant}: refused")]
    CannotUnwrap {
        /// The tenant.
        tenant: String,
    },
    /// The new cluster's description is not one.
    #[error("{0}")]
    Cluster(String),
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
    /// A file operation failed.
    #[error("restore file error: {0}")]
    Io(#[from] std::io::Error),
}

/// The new cluster: its members and which of them vote.
#[derive(Debug, Clone)]
pub struct NewCluster {
    /// Every member, by id.
    pub members: BTreeMap<NodeId, Member>,
    /// The voters among them.
    pub voters: BTreeSet<NodeId>,
}

/// What [`prepare`] made of the copy.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The applied log id the new cluster starts from.
    pub applied: LogId,
    /// The state digest of the new cluster's state (differs from the
    /// manifest's by the new membership, the dropped catalog and the audit
    /// record of the restore).
    pub state_digest: String,
    /// Its records.
    pub records: u64,
    /// Catalog records of the old cluster's backups dropped.
    pub catalog_dropped: u64,
}

/// Refuses a target that is not absent or an empty directory.
pub fn check_target(node: NodeId, dir: &Path) -> Result<(), RestoreError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(RestoreError::NotEmpty {
                node,
                dir: dir.display().to_string(),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unwraps every data key of the keyring object in memory (and drops it),
/// so a master key that cannot is refused before anything is written.
pub fn check_unwraps(
    ring: &crate::state::backup::BackupKeyring,
    keyring: &Keyring,
) -> Result<(), RestoreError> {
    for (tenant, keys) in &ring.tenants {
        for k in keys {
            keyring
                .cipher(tenant, k)
                .map_err(|_| RestoreError::CannotUnwrap {
                    tenant: tenant.clone(),
                })?;
        }
    }
    Ok(())
}

/// The checked copy's state in `data` (its keys put back), to read.
pub fn open_copy(data: &Path, keyring: &Keyring) -> Result<super::MailReader, RestoreError> {
    let db = open_state_at(data)?;
    Ok(super::MailReader::new(
        super::StateDb::fixed(db),
        keyring.binding().clone(),
    ))
}

/// Makes the checked state database in `data` (a scratch copy, keys put
/// back) the new cluster's state; see the module's documentation.
pub fn prepare(
    data: &Path,
    keyring: &Keyring,
    cluster: &NewCluster,
    event: AuditEvent,
) -> Result<Prepared, RestoreError> {
    if cluster.voters.is_empty() || !cluster.voters.iter().all(|v| cluster.members.contains_key(v)) {
        return Err(RestoreError::Cluster(
            "the new cluster needs at least one voter among its members".into(),
        ));
    }
    let db = open_state_at(data)?;
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    let applied: Option<LogId> = match db.get_cf(sm, keys::META_APPLIED)? {
        Some(b) => decode(&b).map_err(|_| BackupError::Corrupt("applied log id"))?,
        None => None,
    };
    let applied = applied.ok_or_else(|| {
        RestoreError::Cluster("the backup holds no applied log entry: nothing to restore".into())
    })?;
    let catalog_end = keys::prefix_end(&[keys::BACKUP]);
    let catalog_dropped = db
        .iterator_cf(
            sm,
            rocksdb::IteratorMode::From(&[keys::BACKUP], rocksdb::Direction::Forward),
        )
        .take_while(|i| {
            i.as_ref()
                .map(|(k, _)| k.first() == Some(&keys::BACKUP))
                .unwrap_or(false)
        })
        .count() as u64;
    let membership = Membership::new(vec![cluster.voters.clone()], cluster.members.clone());
    let stored = StoredMembership::new(Some(applied), membership);
    let mut tx = Tx::new(&db, keyring);
    if let CommandResult::Refused(_) = tx.apply(Command::Audit { events: vec![event] })? {
        return Err(BackupError::Corrupt("audit head").into());
    }
    tx.put_raw(keys::META_MEMBERSHIP.to_vec(), encode(&stored));
    let mut batch = tx.batch;
    batch.delete_range_cf(sm, [keys::BACKUP].as_slice(), catalog_end.as_slice());
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo)?;
    db.flush_cf(sm)?;
    db.compact_range_cf(sm, Some(&[keys::BACKUP][..]), Some(catalog_end.as_slice()));
    let (_, digest, records) = super::MailReader::unkeyed(db.clone())
        .state_digest()
        .map_err(|_| BackupError::Corrupt("state"))?;
    Ok(Prepared {
        applied,
        state_digest: hex(&digest),
        records,
        catalog_dropped,
    })
}

/// Where node data directories are written before they are whole.
fn staging_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".restoring");
    dir.with_file_name(name)
}

/// Writes node `node`'s data directory `dir` from the prepared state in
/// `data` (closed): a copy of its files as the first state generation, an
/// empty Raft log, the vote of `prepared`'s term. Returns the bytes copied.
pub fn write_node(data: &Path, prepared: &Prepared, node: NodeId, dir: &Path) -> Result<u64, RestoreError> {
    check_target(node, dir)?;
    let staging = staging_of(dir);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let state = staging.join("state");
    let generation = state_db::incoming(&state, "restored");
    std::fs::create_dir_all(&generation)?;
    let mut bytes = 0;
    for e in std::fs::read_dir(data)? {
        let e = e?;
        if e.file_type()?.is_file() {
            bytes += std::fs::copy(e.path(), generation.join(e.file_name()))?;
            std::fs::File::open(generation.join(e.file_name()))?.sync_all()?;
        }
    }
    sync_dir(&generation)?;
    state_db::adopt_first(&state, &generation)?;
    {
        let stores = super::open(&staging).map_err(|e| RestoreError::Io(std::io::Error::other(e)))?;
        drop(stores.state);
        write_vote(&stores.log, prepared.applied.leader_id.term, node)?;
    }
    if dir.exists() {
        std::fs::remove_dir(dir)?;
    }
    std::fs::rename(&staging, dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(bytes)
}

/// The vote a restored node starts with: for itself, uncommitted, in the
/// backup's last term — so the first election is of a later term.
fn write_vote(log: &super::Db, term: u64, node: NodeId) -> Result<(), RestoreError> {
    let vote = openraft::Vote::new(term, node);
    let cf = log.cf_handle(CF_META).expect("meta column family");
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    log.put_cf_opt(cf, super::log_store::KEY_VOTE, encode(&vote), &wo)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_keyring;
    use crate::state::member::Role;

    fn member(role: Role, n: u64) -> Member {
        Member {
            role,
            client_addr: format!("10.0.0.{n}:7101"),
            raft_addr: format!("10.0.0.{n}:7201"),
            ops_addr: format!("10.0.0.{n}:7301"),
        }
    }

    #[test]
    fn a_checked_copy_becomes_each_new_node_s_state_with_the_new_membership_and_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let live = super::super::backup::tests::state(&dir.path().join("old"));
        let (m, bdir) = super::super::backup::take(
            &live,
            test_keyring(),
            &dir.path().join("backups"),
            super::super::backup::tests::by(),
        )
        .unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        for e in walk(&bdir) {
            let to = scratch.join(e.strip_prefix(&bdir).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&e, to).unwrap();
        }
        let report = super::super::drill::check_restorable(&scratch, test_keyring()).unwrap();
        assert_eq!(report.manifest, m);
        let cluster = NewCluster {
            members: [
                (7, member(Role::Active, 7)),
                (8, member(Role::Standby, 8)),
                (9, member(Role::Spare, 9)),
            ]
            .into_iter()
            .collect(),
            voters: [7, 8].into_iter().collect(),
        };
        let event = AuditEvent::new("op", None, "backup-restore", &m.backup_id, "restored");
        let data = scratch.join(super::super::backup::DATA);
        let prepared = prepare(&data, test_keyring(), &cluster, event).unwrap();
        assert_eq!((prepared.applied.index, prepared.applied.leader_id.term), (41, 2));
        assert_ne!(prepared.state_digest, m.state_digest, "the membership changed");
        let target = dir.path().join("new").join("node7");
        // Not into a directory that holds something.
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        assert!(matches!(
            write_node(&data, &prepared, 7, &target),
            Err(RestoreError::NotEmpty { .. })
        ));
        std::fs::remove_file(target.join("x")).unwrap();
        write_node(&data, &prepared, 7, &target).unwrap();
        assert!(!staging_of(&target).exists());
        let stores = super::super::open(&target).unwrap();
        let (applied, membership) = super::super::state_machine::read_applied(&stores.state.get()).unwrap();
        assert_eq!(applied, Some(prepared.applied));
        assert_eq!(membership.log_id(), &Some(prepared.applied));
        let voters: Vec<_> = membership.membership().voter_ids().collect();
        assert_eq!(voters, [7, 8]);
        assert_eq!(membership.membership().nodes().count(), 3);
        let reader = super::super::MailReader::new(stores.state.clone(), test_keyring().binding().clone());
        assert!(
            reader.tenant("acme").unwrap().unwrap().keys.len() == 1,
            "keys put back"
        );
        assert_eq!(reader.audit_head().unwrap().seq, m.audit_head.seq + 1);
        let vote: Option<openraft::Vote<NodeId>> =
            super::super::log_store::read_meta(&stores.log, super::super::log_store::KEY_VOTE).unwrap();
        assert_eq!(vote, Some(openraft::Vote::new(2, 7)));
        assert_eq!(
            super::super::log_store::read_committed(&stores.log).unwrap(),
            None
        );
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            match p.is_dir() {
                true => out.extend(walk(&p)),
                false => out.push(p),
            }
        }
        out
    }
}
