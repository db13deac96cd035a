//! Whether a backup restores: the offline checks of a restore drill, on a
//! backup directory (a local one, or an off-site copy downloaded into
//! scratch). The manifest must be authentic and every file whole
//! ([`super::backup::verify`]); the data must open, its state digest equal
//! the manifest's, its audit chain verify up to the manifest's head; and the
//! keyring object must unwrap the data keys that decrypt a sample of every
//! tenant's messages, headers and every chunk.

use std::path::Path;

use super::backup::{hex, verify, BackupError, DATA, KEYRING};
use super::state_db::{open_state_at, StateDb};
use super::MailReader;
use crate::crypto::{Keyring, MessageCipher, HEADERS_CHUNK};
use crate::state::backup::{BackupKeyring, BackupManifest};

/// Messages decrypted per tenant.
pub const SAMPLE_PER_TENANT: usize = 3;

/// What a drill checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillReport {
    /// The manifest, as verified.
    pub manifest: BackupManifest,
    /// Files checked against the manifest.
    pub files: usize,
    /// Audit records verified.
    pub audit_records: u64,
    /// Messages decrypted whole.
    pub messages_decrypted: usize,
    /// The state digest recomputed from the restored data (equal to the
    /// manifest's, or the check failed).
    pub state_digest: String,
}

/// Runs the checks on the backup in `dir` (opened read-write: use a scratch
/// copy, never a backup that is kept, since opening it writes RocksDB's own
/// files).
pub fn check_restorable(dir: &Path, keyring: &Keyring) -> Result<DrillReport, BackupError> {
    let manifest = verify(dir, keyring)?;
    let fail = |what: String| BackupError::NotRestorable {
        backup: manifest.backup_id.clone(),
        what,
    };
    let db = open_state_at(&dir.join(DATA)).map_err(|e| fail(format!("the data does not open: {e}")))?;
    let ring: BackupKeyring = serde_json::from_slice(&std::fs::read(dir.join(KEYRING))?)
        .map_err(|_| fail("the keyring object does not parse".into()))?;
    // As a restore does: the data keys go back into the tenant records, so
    // that the state is the one the manifest's digest was taken of.
    rejoin_keys(&db, &ring, keyring)
        .map_err(|e| fail(format!("the keyring object does not fit the data: {e}")))?;
    let unkeyed = MailReader::unkeyed(db.clone());
    let (applied, digest, records) = unkeyed
        .state_digest()
        .map_err(|_| fail("the state digest cannot be computed".into()))?;
    if applied != manifest.applied_index {
        return Err(fail(format!(
            "the data is at log index {applied}, the manifest says {}",
            manifest.applied_index
        )));
    }
    if hex(&digest) != manifest.state_digest || records != manifest.records {
        return Err(fail("the state digest differs from the manifest's".into()));
    }
    let audit_records = match unkeyed.verify_audit() {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(fail(format!("the audit chain does not verify: {e}"))),
        Err(_) => return Err(fail("the audit chain cannot be read".into())),
    };
    let head = unkeyed
        .audit_head()
        .map_err(|_| fail("the audit head cannot be read".into()))?;
    if head.seq != manifest.audit_head.seq || hex(&head.hash) != manifest.audit_head.hash {
        return Err(fail("the audit head differs from the manifest's".into()));
    }
    let reader = MailReader::new(StateDb::fixed(db), keyring.binding().clone());
    let mut messages_decrypted = 0;
    for t in &manifest.tenants {
        let keys = ring
            .tenants
            .get(&t.name)
            .ok_or_else(|| fail(format!("tenant {}: no keys in the keyring object", t.name)))?;
        let mailboxes = reader
            .mailboxes(&t.name)
            .map_err(|_| fail(format!("tenant {}: its mailboxes cannot be read", t.name)))?;
        let mut sampled = 0;
        'mailboxes: for (mailbox, _) in mailboxes {
            let mut sample = Vec::new();
            reader
                .messages(&t.name, &mailbox, 1, |m| {
                    sample.push(m);
                    sample.len() < SAMPLE_PER_TENANT - sampled
                })
                .map_err(|_| fail(format!("tenant {}: its messages cannot be read", t.name)))?;
            for m in sample {
                let m = m.map_err(|uid| fail(format!("tenant {}: message {uid} is damaged", t.name)))?;
                let undecryptable = || fail(format!("tenant {}: a message does not decrypt", t.name));
                let key = keys
                    .iter()
                    .find(|k| k.version == m.key_version)
                    .ok_or_else(undecryptable)?;
                let cipher = keyring.cipher(&t.name, key).map_err(|_| undecryptable())?;
                let cipher = MessageCipher::new(cipher, &t.name, &mailbox, m.blob, m.key_version, false);
                cipher
                    .open(HEADERS_CHUNK, &m.headers)
                    .map_err(|_| undecryptable())?;
                let mut size = 0u64;
                for i in 0..m.chunks {
                    let chunk = reader
                        .chunk(&t.name, &m.blob, i)
                        .ok()
                        .flatten()
                        .ok_or_else(|| fail(format!("tenant {}: a message chunk is missing", t.name)))?;
                    size += cipher.open(i, &chunk).map_err(|_| undecryptable())?.len() as u64;
                }
                if size != m.size {
                    return Err(fail(format!("tenant {}: a message is not whole", t.name)));
                }
                messages_decrypted += 1;
                sampled += 1;
                if sampled >= SAMPLE_PER_TENANT {
                    break 'mailboxes;
                }
            }
        }
    }
    Ok(DrillReport {
        files: manifest.files.len(),
        manifest,
        audit_records,
        messages_decrypted,
        state_digest: hex(&digest),
    })
}

/// Writes each tenant's keys from the keyring object back into its tenant
/// record (bound to its key again); a tenant of the data without keys in the
/// object, or one the object names that the data lacks, is an error.
pub fn rejoin_keys(db: &super::Db, ring: &BackupKeyring, keyring: &Keyring) -> Result<(), String> {
    use crate::state::codec::encode;
    use crate::state::keys;
    use crate::state::records::TenantRecord;
    let sm = db.cf_handle(super::CF_SM).expect("sm column family");
    let mut batch = rocksdb::WriteBatch::default();
    let mut seen = 0;
    let start = [keys::TENANT];
    for item in db.iterator_cf(
        sm,
        rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
    ) {
        let (k, _) = item.map_err(|e| e.to_string())?;
        if k.first() != Some(&keys::TENANT) {
            break;
        }
        let name = String::from_utf8_lossy(&k[1..]).into_owned();
        let keys = ring
            .tenants
            .get(&name)
            .ok_or_else(|| format!("tenant {name} has no keys in it"))?;
        let rec = TenantRecord { keys: keys.clone() };
        batch.put_cf(sm, &k, keyring.binding().bind(&k, encode(&rec)));
        seen += 1;
    }
    if seen != ring.tenants.len() {
        return Err("it names tenants the data does not hold".into());
    }
    db.write(batch).map_err(|e| e.to_string())
}
