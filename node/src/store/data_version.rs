//! Checking and upgrading the data version of a store (see
//! [`crate::state::version`]): a node refuses data of a newer version than it
//! knows, and upgrades older data one explicit step at a time before it
//! serves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};

use super::db::{Db, CF_SM};
use crate::crypto::{Keyring, NameKind, TenantNames};
use crate::state::codec::{decode, encode};
use crate::state::keys::{self, META_DATA_VERSION};
use crate::state::records::{BlobId, ChangeRecord, MessageRecord, StagedRecord, TenantRecord};
use crate::state::version::{self, DATA_VERSION, UNVERSIONED};

/// Why a store's data version was refused.
#[derive(Debug, thiserror::Error)]
pub enum DataVersionError {
    /// Written by a newer mailvault: this build cannot read it.
    #[error("the data is of data version {found}, newer than this mailvault-node supports ({supported}): run a newer mailvault-node, or restore a backup of a supported version")]
    Newer {
        /// The stored version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The stored version is not a version.
    #[error("the stored data version is unreadable: the store is damaged")]
    Unreadable,
    /// A record to upgrade does not decode, or its tenant's key does not
    /// unwrap under this node's master key.
    #[error("cannot upgrade the store to data version {to}: {what}")]
    Damaged {
        /// The version being upgraded to.
        to: u32,
        /// What failed (never a record's content).
        what: &'static str,
    },
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
}

/// One upgrade step: rewrites data of version `to - 1` into version `to`,
/// adding its changes to the batch that also stamps `to`.
struct Step {
    to: u32,
    run: fn(&Db, &Keyring, &mut WriteBatch) -> Result<(), DataVersionError>,
}

/// Every upgrade step, oldest first.
const STEPS: &[Step] = &[
    Step {
        to: 1,
        run: unversioned_to_1,
    },
    Step {
        to: 2,
        run: stamp_only,
    },
    Step {
        to: 3,
        run: bind_and_protect,
    },
    Step {
        to: 4,
        run: stamp_only,
    },
    Step {
        to: 5,
        run: stamp_only,
    },
    Step {
        to: 6,
        run: stamp_only,
    },
    Step {
        to: 7,
        run: stamp_only,
    },
    Step {
        to: 8,
        run: bind_export_approvals,
    },
    Step {
        to: 9,
        run: stamp_only,
    },
    Step {
        to: 10,
        run: stamp_only,
    },
    Step {
        to: 11,
        run: stamp_only,
    },
    Step {
        to: 12,
        run: stage_unreferenced_chunks,
    },
];

/// Data written before the version was stored has version 1's formats:
/// only the version is added.
fn unversioned_to_1(_db: &Db, _keys: &Keyring, _batch: &mut WriteBatch) -> Result<(), DataVersionError> {
    Ok(())
}

/// Version 2 adds a command family to the log and changes no stored record:
/// stamping it keeps a version-1 build from reading a log it cannot decode.
/// Version 4 moves the state machine into its own database and makes
/// snapshots checkpoints: the move is `super::layout`'s, before any step
/// runs, and no record changes. Version 5 adds the backup catalog's command
/// family, like version 2, version 6 the two-person operations', and version
/// 7 the mailbox restore among them (new operation and step variants),
/// version 9 the leadership transfer (new variants, and a new record that
/// no older store holds), version 10 the membership operations (likewise:
/// the member records are new), version 11 automatic repair (a new command
/// family and record).
fn stamp_only(_db: &Db, _keys: &Keyring, _batch: &mut WriteBatch) -> Result<(), DataVersionError> {
    Ok(())
}

/// Version 3 binds every bound record to its key (see
/// [`keys::is_bound`]), seals keywords and claim agents in message and
/// change records, and moves each idempotency record to its hashed key.
/// One batch, so a crash leaves version 2 or version 3, never a mixture
/// (its size is about that of the records, without the chunks).
fn bind_and_protect(db: &Db, keys: &Keyring, batch: &mut WriteBatch) -> Result<(), DataVersionError> {
    const TO: u32 = 3;
    let damaged = |what| DataVersionError::Damaged { to: TO, what };
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    let mut tenants: HashMap<String, Arc<TenantNames>> = HashMap::new();
    let mut names_of = |tenant: &str| -> Result<Arc<TenantNames>, DataVersionError> {
        if let Some(n) = tenants.get(tenant) {
            return Ok(n.clone());
        }
        let stored = db
            .get_cf(sm, keys::tenant(tenant))?
            .ok_or(damaged("a record's tenant has no tenant record"))?;
        let rec: TenantRecord = decode(&stored).map_err(|_| damaged("a tenant record does not decode"))?;
        let first = rec.keys.first().ok_or(damaged("a tenant record holds no key"))?;
        let n = keys
            .names(tenant, first)
            .map_err(|_| damaged("a tenant's data key does not unwrap under this master key"))?;
        tenants.insert(tenant.to_string(), n.clone());
        Ok(n)
    };
    for item in db.iterator_cf(sm, IteratorMode::Start) {
        let (key, value) = item?;
        if !keys::is_bound(&key) {
            continue;
        }
        let (key, encoded) = match key[0] {
            keys::MESSAGE => {
                let n = names_of(keys::tenant_of(&key).ok_or(damaged("a message key"))?)?;
                let mut m: MessageRecord = decode(&value).map_err(|_| damaged("a message record"))?;
                m.flags = sealed_flags(&n, &m.flags);
                m.claimed_by = m.claimed_by.map(|a| n.seal(NameKind::Agent, &a));
                (key.to_vec(), encode(&m))
            }
            keys::CHANGE => {
                let n = names_of(keys::tenant_of(&key).ok_or(damaged("a change key"))?)?;
                let mut c: ChangeRecord = decode(&value).map_err(|_| damaged("a change record"))?;
                c.flags = sealed_flags(&n, &c.flags);
                c.claimed_by = c.claimed_by.map(|a| n.seal(NameKind::Agent, &a));
                (key.to_vec(), encode(&c))
            }
            keys::IDEMPOTENCY => {
                let (t, m, k) = keys::split_idempotency(&key).ok_or(damaged("an idempotency key"))?;
                let hashed = keys::idempotency(t, m, &names_of(t)?.idempotency_key(k));
                batch.delete_cf(sm, &key);
                (hashed, value.to_vec())
            }
            _ => (key.to_vec(), value.to_vec()),
        };
        let bound = keys.binding().bind(&key, encoded);
        batch.put_cf(sm, &key, bound);
    }
    Ok(())
}

/// Version 8 binds the export approvals to their keys, as every record of
/// the state but the metadata, chunks and audit chain is (version 6 stored
/// them unbound); it also adds the bulk expunge's operation and step
/// variants.
fn bind_export_approvals(db: &Db, keys: &Keyring, batch: &mut WriteBatch) -> Result<(), DataVersionError> {
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    let start = [keys::EXPORT_APPROVAL];
    for item in db.iterator_cf(sm, IteratorMode::From(&start, rocksdb::Direction::Forward)) {
        let (key, value) = item?;
        if key.first() != Some(&keys::EXPORT_APPROVAL) {
            break;
        }
        batch.put_cf(sm, &key, keys.binding().bind(&key, value.to_vec()));
    }
    Ok(())
}

/// Version 12 keeps a staging record of every upload not committed (and
/// `Command::ExpireStaged` expires them). Before it, the chunks of an upload
/// whose leader died mid-upload were kept forever, named by no record: each
/// blob with chunks that no message record names gets a staging record, so
/// it is expired like an upload abandoned after the upgrade. A tenant with a
/// message record this node cannot open keeps its unnamed chunks unstaged
/// (the damaged record may name them), as before.
fn stage_unreferenced_chunks(
    db: &Db,
    keys: &Keyring,
    batch: &mut WriteBatch,
) -> Result<(), DataVersionError> {
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    let mut named: HashSet<(Vec<u8>, BlobId)> = HashSet::new();
    let mut unsure: HashSet<Vec<u8>> = HashSet::new();
    let start = [keys::MESSAGE];
    for item in db.iterator_cf(sm, IteratorMode::From(&start, rocksdb::Direction::Forward)) {
        let (key, value) = item?;
        if key.first() != Some(&keys::MESSAGE) {
            break;
        }
        let tenant = keys::tenant_of(&key).map(|t| t.as_bytes().to_vec());
        let record = keys
            .binding()
            .open(&key, &value)
            .and_then(|encoded| decode::<MessageRecord>(encoded).ok());
        match (tenant, record) {
            (Some(t), Some(m)) => {
                named.insert((t, m.blob));
            }
            (Some(t), None) => {
                unsure.insert(t);
            }
            (None, _) => {
                return Err(DataVersionError::Damaged {
                    to: 12,
                    what: "a message key",
                })
            }
        }
    }
    // The highest index stored of each blob no record names.
    let mut unnamed: BTreeMap<(Vec<u8>, BlobId), u32> = BTreeMap::new();
    let start = [keys::CHUNK];
    for item in db.iterator_cf(sm, IteratorMode::From(&start, rocksdb::Direction::Forward)) {
        let (key, _) = item?;
        if key.first() != Some(&keys::CHUNK) {
            break;
        }
        let (tenant, blob, index) = keys::chunk_of(&key).ok_or(DataVersionError::Damaged {
            to: 12,
            what: "a chunk key",
        })?;
        let id = (tenant.to_vec(), blob);
        if named.contains(&id) || unsure.contains(tenant) {
            continue;
        }
        let highest = unnamed.entry(id).or_insert(index);
        *highest = (*highest).max(index);
    }
    for ((tenant, blob), highest) in &unnamed {
        let key = keys::staged_raw(tenant, blob);
        let record = StagedRecord {
            chunks: highest.saturating_add(1),
            idle_since_ms: None,
        };
        batch.put_cf(sm, &key, keys.binding().bind(&key, encode(&record)));
    }
    if !unnamed.is_empty() || !unsure.is_empty() {
        tracing::info!(
            uploads = unnamed.len(),
            tenants_kept = unsure.len(),
            "chunks named by no message are staged, to expire"
        );
    }
    Ok(())
}

/// Flags as the state machine stores them: keywords sealed, sorted.
fn sealed_flags(names: &TenantNames, flags: &[String]) -> Vec<String> {
    let set: std::collections::BTreeSet<String> = flags.iter().map(|f| names.seal_flag(f)).collect();
    set.into_iter().collect()
}

/// The stored version of a state database: `None` for a fresh one,
/// [`UNVERSIONED`] for data written before versions were stored (the layout
/// move stamps that explicitly, see `super::layout`).
pub fn read(db: &Db) -> Result<Option<u32>, DataVersionError> {
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    if let Some(v) = db.get_cf(sm, META_DATA_VERSION)? {
        return version::decode(&v).map(Some).ok_or(DataVersionError::Unreadable);
    }
    let empty = db.iterator_cf(sm, IteratorMode::Start).next().is_none();
    Ok((!empty).then_some(UNVERSIONED))
}

/// Refuses a store this build cannot read (for offline tools, which must not
/// change it).
pub fn check(db: &Db) -> Result<(), DataVersionError> {
    supported(read(db)?).map(|_| ())
}

/// `found`, unless it is newer than this build supports.
fn supported(found: Option<u32>) -> Result<Option<u32>, DataVersionError> {
    match found {
        Some(found) if found > DATA_VERSION => Err(DataVersionError::Newer {
            found,
            supported: DATA_VERSION,
        }),
        other => Ok(other),
    }
}

/// Brings a store to [`DATA_VERSION`]: stamps a fresh one, upgrades an older
/// one step by step (each step and its stamp one synced write, so a crash
/// leaves a version that was completely written), refuses a newer one.
/// Returns the version found (`None` if fresh).
pub fn upgrade(db: &Db, keys: &Keyring) -> Result<Option<u32>, DataVersionError> {
    let found = supported(read(db)?)?;
    let from = found.unwrap_or(DATA_VERSION);
    let sm = db.cf_handle(CF_SM).expect("sm column family");
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    if found.is_none() {
        let mut batch = WriteBatch::default();
        batch.put_cf(sm, META_DATA_VERSION, version::encode(DATA_VERSION));
        db.write_opt(batch, &wo)?;
    }
    for step in STEPS.iter().filter(|s| s.to > from) {
        let mut batch = WriteBatch::default();
        (step.run)(db, keys, &mut batch)?;
        batch.put_cf(sm, META_DATA_VERSION, version::encode(step.to));
        db.write_opt(batch, &wo)?;
        tracing::info!(from = step.to - 1, to = step.to, "data version upgraded");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_keyring;
    use crate::store::{open_db, StateDb, CF_LOG};

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        (dir, db)
    }

    fn put(db: &Db, cf: &str, k: &[u8], v: &[u8]) {
        db.put_cf(db.cf_handle(cf).unwrap(), k, v).unwrap();
    }

    /// A chunk's key (chunks are not bound: kept byte for byte).
    const CHUNK_KEY: &[u8] = b"\x40acme\0blob-of-16-bytes\0\0\0\0";

    #[test]
    fn a_version_2_store_is_bound_its_idempotency_keys_hashed_and_its_names_sealed() {
        use crate::state::policy::IdentityPolicy;
        use crate::state::records::{ChangeKind, IdempotencyRecord, MailboxRecord};
        use crate::store::MailReader;
        const T: &str = "acme";
        const M: &str = "support";
        const KEY: &str = "<IDEM-MARKER-4711@shop.example>";
        let (_d, db) = db();
        let keys = test_keyring();
        // As version 2 wrote them: encodings without tags, names in clear.
        let tenant = TenantRecord {
            keys: vec![keys.generate(T, 1).unwrap()],
        };
        let mailbox = MailboxRecord {
            uidvalidity: 9,
            uidnext: 2,
            highest_modseq: 1,
            messages: 1,
            total_bytes: 3,
        };
        let flags = vec!["$KEYWORD-MARKER-88".to_string(), "\\Seen".to_string()];
        let agent = Some("AGENT-MARKER-ann".to_string());
        let message = MessageRecord {
            uid: 1,
            modseq: 1,
            flags: flags.clone(),
            internal_date_ms: 5,
            size: 3,
            blob: [3; 16],
            chunks: 1,
            key_version: 1,
            headers: vec![1, 2, 3],
            claimed_by: agent.clone(),
        };
        let change = ChangeRecord {
            uid: 1,
            kind: ChangeKind::Claimed,
            flags: flags.clone(),
            claimed_by: agent.clone(),
        };
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(2));
        put(&db, CF_SM, &keys::tenant(T), &encode(&tenant));
        put(&db, CF_SM, &keys::mailbox(T, M), &encode(&mailbox));
        put(&db, CF_SM, &keys::message(T, M, 1), &encode(&message));
        put(&db, CF_SM, &keys::change(T, M, 1), &encode(&change));
        put(
            &db,
            CF_SM,
            &keys::idempotency(T, M, KEY),
            &encode(&IdempotencyRecord { uid: 1, modseq: 1 }),
        );
        put(
            &db,
            CF_SM,
            &keys::identity("alice"),
            &encode(&IdentityPolicy::default()),
        );
        put(&db, CF_SM, &keys::revoked_serial("0a0b"), b"");
        put(&db, CF_SM, CHUNK_KEY, b"ciphertext");
        put(&db, CF_SM, &keys::audit(1), b"audit record");

        assert_eq!(upgrade(&db, keys).unwrap(), Some(2));
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION));
        let r = MailReader::new(StateDb::fixed(db.clone()), keys.binding().clone());
        let names = keys.names(T, &tenant.keys[0]).unwrap();
        assert_eq!(r.tenant(T).unwrap().unwrap().keys, tenant.keys);
        assert_eq!(r.mailbox(T, M).unwrap().unwrap().uidnext, 2);
        let m = r.message(T, M, 1).unwrap().unwrap().unwrap();
        assert_eq!((m.uid, m.headers.clone()), (1, vec![1, 2, 3]));
        assert_eq!(names.open_flags(&m.flags).unwrap(), flags);
        assert_eq!(
            names
                .open(NameKind::Agent, m.claimed_by.as_deref().unwrap())
                .unwrap(),
            "AGENT-MARKER-ann"
        );
        let changes = r.changes(T, M, 0, 10).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(names.open_flags(&changes[0].1.flags).unwrap(), flags);
        let hashed = names.idempotency_key(KEY);
        assert_eq!(r.idempotency(T, M, &hashed).unwrap().map(|i| i.uid), Some(1));
        assert!(r.idempotency(T, M, KEY).unwrap().is_none());
        assert!(r.identity_policy("alice").unwrap().is_some());
        assert!(r.serial_revoked("0a0b").unwrap());
        assert!(!r.serial_revoked("0c0d").unwrap());
        let sm = db.cf_handle(CF_SM).unwrap();
        assert_eq!(
            db.get_cf(sm, CHUNK_KEY).unwrap().as_deref(),
            Some(&b"ciphertext"[..])
        );
        assert_eq!(
            db.get_cf(sm, keys::audit(1)).unwrap().as_deref(),
            Some(&b"audit record"[..])
        );
        for item in db.iterator_cf(sm, IteratorMode::Start) {
            let (k, v) = item.unwrap();
            for marker in [&b"MARKER"[..], b"shop.example"] {
                assert!(
                    !k.windows(marker.len()).any(|w| w == marker),
                    "a clear name in a key"
                );
                assert!(
                    !v.windows(marker.len()).any(|w| w == marker),
                    "a clear name in a value"
                );
            }
        }
        // Upgraded once: starting again changes nothing.
        assert_eq!(upgrade(&db, keys).unwrap(), Some(DATA_VERSION));
        assert!(r.message(T, M, 1).unwrap().unwrap().is_ok());
    }

    #[test]
    fn a_damaged_version_2_record_stops_the_upgrade_and_changes_nothing() {
        let (_d, db) = db();
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(2));
        put(&db, CF_SM, &keys::message("acme", "m", 1), b"not a record");
        let e = upgrade(&db, test_keyring()).unwrap_err();
        assert!(matches!(e, DataVersionError::Damaged { to: 3, .. }), "{e}");
        assert_eq!(read(&db).unwrap(), Some(2));
    }

    #[test]
    fn every_step_upgrades_to_the_next_version_and_the_last_is_current() {
        for (i, step) in STEPS.iter().enumerate() {
            assert_eq!(step.to, i as u32 + 1);
        }
        assert_eq!(STEPS.last().map(|s| s.to), Some(DATA_VERSION));
    }

    #[test]
    fn a_fresh_store_is_stamped_with_the_current_version() {
        let (_d, db) = db();
        assert_eq!(read(&db).unwrap(), None);
        assert_eq!(upgrade(&db, test_keyring()).unwrap(), None);
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION));
        assert_eq!(
            upgrade(&db, test_keyring()).unwrap(),
            Some(DATA_VERSION),
            "upgrading again changes nothing"
        );
    }

    #[test]
    fn data_written_before_versions_were_stored_is_upgraded_and_kept() {
        let (_d, db) = db();
        put(&db, CF_SM, CHUNK_KEY, b"ciphertext");
        put(&db, CF_LOG, &7u64.to_be_bytes(), b"entry");
        assert_eq!(read(&db).unwrap(), Some(UNVERSIONED));
        assert_eq!(upgrade(&db, test_keyring()).unwrap(), Some(UNVERSIONED));
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION));
        let sm = db.cf_handle(CF_SM).unwrap();
        assert_eq!(
            db.get_cf(sm, CHUNK_KEY).unwrap().as_deref(),
            Some(&b"ciphertext"[..])
        );
    }

    #[test]
    fn a_version_1_store_is_upgraded_to_the_current_version_and_kept() {
        let (_d, db) = db();
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(1));
        put(&db, CF_SM, CHUNK_KEY, b"ciphertext");
        put(&db, CF_LOG, &7u64.to_be_bytes(), b"entry");
        assert_eq!(upgrade(&db, test_keyring()).unwrap(), Some(1));
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION));
        let (sm, log) = (db.cf_handle(CF_SM).unwrap(), db.cf_handle(CF_LOG).unwrap());
        assert_eq!(
            db.get_cf(sm, CHUNK_KEY).unwrap().as_deref(),
            Some(&b"ciphertext"[..])
        );
        assert_eq!(
            db.get_cf(log, 7u64.to_be_bytes()).unwrap().as_deref(),
            Some(&b"entry"[..])
        );
    }

    #[test]
    fn a_version_5_to_11_store_becomes_current_with_its_records_untouched() {
        for from in [5, 6, 7, 8, 9, 10, 11] {
            let (_d, db) = db();
            put(&db, CF_SM, META_DATA_VERSION, &version::encode(from));
            let catalog = keys::backup("20261201T020000Z-000000000042");
            put(&db, CF_SM, &catalog, b"a bound catalog record");
            let op = keys::operation("op-0000002a");
            put(&db, CF_SM, &op, b"a bound operation record");
            put(&db, CF_LOG, &9u64.to_be_bytes(), b"entry");
            assert_eq!(upgrade(&db, test_keyring()).unwrap(), Some(from));
            assert_eq!(read(&db).unwrap(), Some(DATA_VERSION), "from {from}");
            assert_eq!(DATA_VERSION, 12);
            let (sm, log) = (db.cf_handle(CF_SM).unwrap(), db.cf_handle(CF_LOG).unwrap());
            assert_eq!(
                db.get_cf(sm, &catalog).unwrap().as_deref(),
                Some(&b"a bound catalog record"[..])
            );
            assert_eq!(
                db.get_cf(sm, &op).unwrap().as_deref(),
                Some(&b"a bound operation record"[..])
            );
            assert_eq!(
                db.get_cf(log, 9u64.to_be_bytes()).unwrap().as_deref(),
                Some(&b"entry"[..])
            );
        }
    }

    #[test]
    fn a_version_11_stores_unnamed_chunks_are_staged_and_expire_and_named_ones_stay() {
        use crate::state::command::{Command, CommandResult};
        use crate::state::records::StagedRecord;
        let keyring = test_keyring();
        let (_d, db) = db();
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(11));
        let (kept, abandoned, other) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let message = |tenant: &str, uid: u32, blob| {
            let rec = MessageRecord {
                uid,
                modseq: 1,
                flags: Vec::new(),
                internal_date_ms: 0,
                size: 10,
                blob,
                chunks: 2,
                key_version: 1,
                headers: Vec::new(),
                claimed_by: None,
            };
            let key = keys::message(tenant, "support", uid);
            put(&db, CF_SM, &key, &keyring.binding().bind(&key, encode(&rec)));
        };
        message("acme", 1, kept);
        for i in 0..2 {
            put(&db, CF_SM, &keys::chunk("acme", &kept, i), b"named");
        }
        // An upload whose leader died after three chunks, and one in a
        // tenant with a damaged message record (which may name it).
        for i in [0, 2, 1] {
            put(&db, CF_SM, &keys::chunk("acme", &abandoned, i), b"unnamed");
        }
        let damaged = keys::message("globex", "support", 1);
        put(&db, CF_SM, &damaged, b"damaged");
        put(&db, CF_SM, &keys::chunk("globex", &other, 0), b"unsure");

        assert_eq!(upgrade(&db, keyring).unwrap(), Some(11));
        assert_eq!(read(&db).unwrap(), Some(12));
        let sm = db.cf_handle(CF_SM).unwrap();
        let staged = |tenant: &str, blob| {
            let key = keys::staged(tenant, blob);
            db.get_cf(sm, &key)
                .unwrap()
                .map(|v| decode::<StagedRecord>(keyring.binding().open(&key, &v).unwrap()).unwrap())
        };
        assert_eq!(
            staged("acme", &abandoned),
            Some(StagedRecord {
                chunks: 3,
                idle_since_ms: None
            })
        );
        assert_eq!(staged("acme", &kept), None, "a message names it");
        assert_eq!(staged("globex", &other), None, "a damaged record may name it");

        // Expired like an upload abandoned after the upgrade: marked idle
        // by the first sweep, removed by one an expiry later.
        let chunks = |tenant: &str, blob| {
            (0..4)
                .filter(|&i| db.get_cf(sm, keys::chunk(tenant, blob, i)).unwrap().is_some())
                .count()
        };
        for (now, expected) in [(1_000, (0, 0, 1)), (5_000, (0, 0, 0)), (61_000, (1, 3, 0))] {
            let mut tx = crate::store::apply::Tx::new(&db, keyring);
            let result = tx
                .apply(Command::ExpireStaged {
                    now_ms: now,
                    expiry_ms: 60_000,
                    node: 1,
                })
                .unwrap();
            db.write(tx.batch).unwrap();
            match result {
                CommandResult::Expired {
                    uploads,
                    chunks,
                    marked,
                } => assert_eq!((uploads, chunks, marked), expected, "at {now}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(chunks("acme", &abandoned), 0);
        assert_eq!(staged("acme", &abandoned), None);
        assert_eq!(chunks("acme", &kept), 2);
        assert_eq!(chunks("globex", &other), 1);
    }

    #[test]
    fn a_version_7_stores_export_approvals_become_bound_and_read_as_before() {
        use crate::state::ops::ExportApproval;
        let (_d, db) = db();
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(7));
        let approval = ExportApproval {
            operation: "op-0000002a".into(),
            from_ms: 1_764_000_000_000,
            until_ms: 1_764_086_400_000,
        };
        let key = keys::export_approval("exporter-1", "acme", "support");
        let other = keys::export_approval("exporter-2", "acme", "orders");
        put(&db, CF_SM, &key, &encode(&approval));
        put(&db, CF_SM, &other, &encode(&approval));
        // The record after them (audit settings, bound since version 7) is left as it is.
        put(&db, CF_SM, &keys::audit_settings(), b"a bound settings record");
        assert_eq!(upgrade(&db, test_keyring()).unwrap(), Some(7));
        let sm = db.cf_handle(CF_SM).unwrap();
        for k in [&key, &other] {
            let stored = db.get_cf(sm, k).unwrap().unwrap();
            let opened = test_keyring()
                .binding()
                .open(k, &stored)
                .expect("bound to its key");
            let back: ExportApproval = decode(opened).unwrap();
            assert_eq!(back, approval);
            // Bound to its own key, not to another's.
            assert!(test_keyring()
                .binding()
                .open(&other_of(k, &key, &other), &stored)
                .is_none());
        }
        assert_eq!(
            db.get_cf(sm, keys::audit_settings()).unwrap().as_deref(),
            Some(&b"a bound settings record"[..])
        );
        // Started again: the store is current, nothing is bound twice.
        assert_eq!(upgrade(&db, test_keyring()).unwrap(), Some(DATA_VERSION));
        let stored = db.get_cf(sm, &key).unwrap().unwrap();
        let opened = test_keyring().binding().open(&key, &stored).unwrap();
        assert_eq!(decode::<ExportApproval>(opened).unwrap(), approval);
    }

    fn other_of(k: &[u8], a: &[u8], b: &[u8]) -> Vec<u8> {
        if k == a {
            b.to_vec()
        } else {
            a.to_vec()
        }
    }

    #[test]
    fn a_newer_version_is_refused_with_a_clear_error_and_left_alone() {
        let (_d, db) = db();
        put(&db, CF_SM, META_DATA_VERSION, &version::encode(DATA_VERSION + 1));
        let e = upgrade(&db, test_keyring()).unwrap_err();
        assert!(
            matches!(e, DataVersionError::Newer { found, supported } if found == DATA_VERSION + 1 && supported == DATA_VERSION)
        );
        assert!(
            e.to_string().contains("newer than this mailvault-node supports"),
            "{e}"
        );
        assert!(check(&db).is_err());
        assert_eq!(read(&db).unwrap(), Some(DATA_VERSION + 1));
        put(&db, CF_SM, META_DATA_VERSION, b"xy");
        assert!(matches!(
            upgrade(&db, test_keyring()),
            Err(DataVersionError::Unreadable)
        ));
    }
}
