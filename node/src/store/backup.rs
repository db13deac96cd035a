//! Taking a backup and verifying one: a checkpoint of the state database (the
//! same mechanism as snapshots, so it rewrites no mail), its tenant records'
//! wrapped data keys moved into a keyring object of their own, every file
//! listed with its size and SHA-256 in an authenticated manifest written
//! last (`crate::state::backup`).
//!
//! Layout under a backup root: `<backup id>/{data/, keyring.json,
//! manifest.json}`; a backup is taken in `incoming-*` and renamed to its id
//! only once its manifest is written and synced, so a directory named by an
//! id without a valid manifest is damaged, never half-taken.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};
use sha2::{Digest, Sha256};

use super::checkpoint::{self, CheckpointError};
use super::db::CF_SM;
use super::state_db::{open_state_at, sync_dir, StateDb};
use crate::crypto::Keyring;
use crate::state::audit::AuditHead;
use crate::state::backup::{
    BackupAuditHead, BackupFile, BackupKeyring, BackupManifest, BackupMember, BackupTenant, SealedManifest,
    MANIFEST_FORMAT,
};
use crate::state::codec::{decode, encode};
use crate::state::keys;
use crate::state::records::TenantRecord;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The keyring object's file name.
pub const KEYRING: &str = "keyring.json";
/// The data directory's name.
pub const DATA: &str = "data";

/// Why a backup could not be taken, or does not verify. Names the object at
/// fault, never its content.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Taking the checkpoint failed.
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(#[from] rocksdb::Error),
    /// A file operation failed.
    #[error("backup file error: {0}")]
    Io(#[from] std::io::Error),
    /// The manifest is missing or does not parse.
    #[error("backup {backup}: the manifest is missing or unreadable: {why}")]
    NoManifest {
        /// The backup directory's name.
        backup: String,
        /// What is wrong with it.
        why: String,
    },
    /// The backup's data keys are wrapped by another master key.
    #[error("backup {backup} was taken under master key {theirs}, not this one ({ours}): refused")]
    WrongMasterKey {
        /// The backup's id.
        backup: String,
        /// Its master key's fingerprint.
        theirs: String,
        /// This key's fingerprint.
        ours: String,
    },
    /// The manifest's MAC does not match: edited, swapped or forged.
    #[error(
        "backup {backup}: the manifest fails its authentication (edited or not this cluster's): refused"
    )]
    ManifestForged {
        /// The backup directory's name.
        backup: String,
    },
    /// A file is missing, or its size or checksum differs from the manifest's.
    #[error("backup {backup}: {path} {why}")]
    Damaged {
        /// The backup's id.
        backup: String,
        /// The object at fault.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The restored state does not agree with the manifest (its digest,
    /// its audit chain), or its mail does not decrypt.
    #[error("backup {backup}: {what}")]
    NotRestorable {
        /// The backup's id.
        backup: String,
        /// What failed (names a tenant at most, never content).
        what: String,
    },
    /// A record of the state does not decode or fails its binding.
    #[error("cannot back up: a stored {0} record fails its check")]
    Corrupt(&'static str),
}

pub(crate) use crate::state::ops::hex;

/// SHA-256 and length of a file, read in pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let mut sum = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex(&sum.finalize())))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A backup id: its UTC time and applied index (sorts by time).
pub fn backup_id(time_ms: i64, applied: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms.max(0) as u64);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    let compact: String = s.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("{compact}-{applied:012}")
}

/// Whether `s` has the form of a backup id (so that it is safe as a
/// directory name: digits, `T`, `Z` and one `-`).
pub fn is_backup_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 29
        && b.iter().enumerate().all(|(i, c)| match i {
            8 => *c == b'T',
            15 => *c == b'Z',
            16 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// What lies under a backup root: the backups (by id, sorted) and the
/// leftovers of backups cut short (`incoming-*`), which are never backups.
#[derive(Debug, Default)]
pub struct RootListing {
    /// Directories named by a backup id.
    pub backups: Vec<String>,
    /// Directories of backups that were being taken.
    pub incomplete: Vec<PathBuf>,
}

/// Lists a backup root (empty if it does not exist).
pub fn list_root(root: &Path) -> std::io::Result<RootListing> {
    let mut out = RootListing::default();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_backup_id(&name) {
            out.backups.push(name);
        } else if name.starts_with("incoming-") {
            out.incomplete.push(e.path());
        }
    }
    out.backups.sort();
    Ok(out)
}

/// Removes one backup directory (its hard links to live files go with it).
pub fn remove(root: &Path, id: &str) -> std::io::Result<()> {
    match std::fs::remove_dir_all(root.join(id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => sync_dir(root),
    }
}

/// Who takes a backup, for its manifest.
#[derive(Debug, Clone)]
pub struct Taker<'a> {
    /// The cluster's name.
    pub cluster: &'a str,
    /// This node's id.
    pub node: u64,
    /// While this file exists, wait before the manifest is written (the
    /// `pause-backup` test mode; `None` in production).
    pub pause_while: Option<&'a Path>,
}

/// Takes a backup of the live state into a new directory under `root`;
/// returns its manifest and directory.
pub fn take(
    state: &StateDb,
    keyring: &Keyring,
    root: &Path,
    by: Taker<'_>,
) -> Result<(BackupManifest, PathBuf), BackupError> {
    std::fs::create_dir_all(root)?;
    let time_ms = crate::clock::now_ms();
    let staged = root.join(format!("incoming-{}", time_ms));
    if staged.exists() {
        std::fs::remove_dir_all(&staged)?;
    }
    std::fs::create_dir(&staged)?;
    let result = take_into(state, keyring, &staged, by, time_ms);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e);
        }
    };
    let dir = root.join(&manifest.backup_id);
    std::fs::rename(&staged, &dir)?;
    sync_dir(root)?;
    Ok((manifest, dir))
}

fn take_into(
    state: &StateDb,
    keyring: &Keyring,
    staged: &Path,
    by: Taker<'_>,
    time_ms: i64,
) -> Result<BackupManifest, BackupError> {
    let data = staged.join(DATA);
    let info = checkpoint::take(&state.get(), &data)?;
    let applied = info
        .applied
        .map(|l| (l.index, l.leader_id.term))
        .unwrap_or((0, 0));
    let mut members: Vec<BackupMember> = info
        .membership
        .membership()
        .nodes()
        .map(|(id, m)| BackupMember {
            id: *id,
            role: m.role.as_str().to_string(),
            voter: info.membership.membership().voter_ids().any(|v| v == *id),
        })
        .collect();
    members.sort_by_key(|m| m.id);
    let (digest, records, audit, tenants, ring, data_version) = {
        let db = open_state_at(&data)?;
        let (_, digest, records) = super::MailReader::unkeyed(db.clone())
            .state_digest()
            .map_err(|_| BackupError::Corrupt("state"))?;
        let sm = db.cf_handle(CF_SM).expect("sm column family");
        let audit: AuditHead = match db.get_cf(sm, keys::AUDIT_HEAD)? {
            Some(b) => decode(&b).map_err(|_| BackupError::Corrupt("audit head"))?,
            None => AuditHead::default(),
        };
        let data_version = super::data_version::read(&db)
            .map_err(|_| BackupError::Corrupt("data version"))?
            .unwrap_or(crate::state::version::DATA_VERSION);
        // The data keys leave the data: each tenant record is rewritten
        // without them (bound again), and the range compacted so no older
        // version of it stays in an SST file.
        let mut ring = BackupKeyring {
            format: MANIFEST_FORMAT,
            tenants: Default::default(),
        };
        let mut tenants = Vec::new();
        let mut batch = WriteBatch::default();
        let start = [keys::TENANT];
        for item in db.iterator_cf(sm, IteratorMode::From(&start, rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            if k.first() != Some(&keys::TENANT) {
                break;
            }
            let encoded = keyring
                .binding()
                .open(&k, &v)
                .ok_or(BackupError::Corrupt("tenant"))?;
            let rec: TenantRecord = decode(encoded).map_err(|_| BackupError::Corrupt("tenant"))?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            tenants.push(BackupTenant {
                name: name.clone(),
                key_versions: rec.keys.iter().map(|k| k.version).collect(),
            });
            ring.tenants.insert(name, rec.keys);
            let stripped = keyring
                .binding()
                .bind(&k, encode(&TenantRecord { keys: Vec::new() }));
            batch.put_cf(sm, &k, stripped);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo)?;
        db.flush_cf(sm)?;
        db.compact_range_cf(sm, Some(&[keys::TENANT][..]), Some(&[keys::TENANT + 1][..]));
        (digest, records, audit, tenants, ring, data_version)
    };
    write_synced(
        &staged.join(KEYRING),
        &serde_json::to_vec_pretty(&ring).expect("a keyring encodes"),
    )?;
    let mut files = Vec::new();
    for (name, _) in checkpoint::list_files(&data)? {
        let (bytes, sha256) = sha256_file(&data.join(&name))?;
        files.push(BackupFile {
            path: format!("{DATA}/{name}"),
            bytes,
            sha256,
        });
    }
    let (bytes, sha256) = sha256_file(&staged.join(KEYRING))?;
    files.push(BackupFile {
        path: KEYRING.into(),
        bytes,
        sha256,
    });
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms.max(0) as u64);
    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        cluster: by.cluster.to_string(),
        backup_id: backup_id(time_ms, applied.0),
        taken_by: by.node,
        time_ms,
        time: humantime::format_rfc3339_millis(time).to_string(),
        mailvault_version: env!("CARGO_PKG_VERSION").to_string(),
        data_version,
        applied_index: applied.0,
        applied_term: applied.1,
        members,
        files,
        state_digest: hex(&digest),
        records,
        audit_head: BackupAuditHead {
            seq: audit.seq,
            hash: hex(&audit.hash),
        },
        tenants,
        master_key_fingerprint: keyring.backups().fingerprint().to_string(),
    };
    let sealed = SealedManifest {
        mac: hex(&keyring
            .backups()
            .mac(&serde_json::to_vec(&manifest).expect("a manifest encodes"))),
        manifest: manifest.clone(),
    };
    for (name, _) in checkpoint::list_files(&data)? {
        if !name.ends_with(".sst") && !name.ends_with(".blob") {
            File::open(data.join(name))?.sync_all()?;
        }
    }
    sync_dir(&data)?;
    while by.pause_while.is_some_and(|f| f.exists()) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Last: without it there is no backup.
    let tmp = staged.join("manifest.json.tmp");
    write_synced(
        &tmp,
        &serde_json::to_vec_pretty(&sealed).expect("a manifest encodes"),
    )?;
    std::fs::rename(&tmp, staged.join(MANIFEST))?;
    sync_dir(staged)?;
    Ok(manifest)
}

/// Reads a backup's manifest and checks it is this master key's and
/// authentic; does not look at the files.
pub fn read_manifest(dir: &Path, keyring: &Keyring) -> Result<BackupManifest, BackupError> {
    let backup = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = std::fs::read(dir.join(MANIFEST)).map_err(|e| BackupError::NoManifest {
        backup: backup.clone(),
        why: e.to_string(),
    })?;
    parse_manifest(&backup, &bytes, keyring)
}

/// Parses a manifest's bytes (of backup `backup`, as named where it was
/// found) and checks it is this master key's and authentic.
pub fn parse_manifest(backup: &str, bytes: &[u8], keyring: &Keyring) -> Result<BackupManifest, BackupError> {
    let backup = backup.to_string();
    let sealed: SealedManifest = serde_json::from_slice(bytes).map_err(|e| BackupError::NoManifest {
        backup: backup.clone(),
        why: e.to_string(),
    })?;
    let ours = keyring.backups().fingerprint();
    if sealed.manifest.master_key_fingerprint != ours {
        return Err(BackupError::WrongMasterKey {
            backup: sealed.manifest.backup_id,
            theirs: sealed.manifest.master_key_fingerprint,
            ours: ours.to_string(),
        });
    }
    let mac = (0..sealed.mac.len())
        .step_by(2)
        .map(|i| {
            sealed
                .mac
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>();
    let canonical = serde_json::to_vec(&sealed.manifest).expect("a manifest encodes");
    if !mac.is_some_and(|m| keyring.backups().verify(&canonical, &m)) {
        return Err(BackupError::ManifestForged { backup });
    }
    if sealed.manifest.format != MANIFEST_FORMAT {
        return Err(BackupError::NoManifest {
            backup,
            why: format!(
                "manifest format {} is not {MANIFEST_FORMAT}",
                sealed.manifest.format
            ),
        });
    }
    if sealed.manifest.backup_id != backup && is_backup_id(&backup) {
        // A manifest moved under another backup's name.
        return Err(BackupError::ManifestForged { backup });
    }
    Ok(sealed.manifest)
}

/// Whether a manifest's file path stays inside the backup.
pub fn is_inner_path(path: &str) -> bool {
    !path.split('/').any(|p| p.is_empty() || p == "." || p == "..")
}

/// Verifies a backup: its manifest (see [`read_manifest`]), then every file
/// it lists — present, of its size, of its SHA-256. The first file at fault
/// is named.
pub fn verify(dir: &Path, keyring: &Keyring) -> Result<BackupManifest, BackupError> {
    let manifest = read_manifest(dir, keyring)?;
    for f in &manifest.files {
        let damaged = |why| BackupError::Damaged {
            backup: manifest.backup_id.clone(),
            path: f.path.clone(),
            why,
        };
        if !is_inner_path(&f.path) {
            return Err(damaged("is not a path inside the backup"));
        }
        let (bytes, sha256) = match sha256_file(&dir.join(&f.path)) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(damaged("is missing")),
            Err(e) => return Err(e.into()),
        };
        if bytes != f.bytes {
            return Err(damaged("has the wrong size"));
        }
        if sha256 != f.sha256 {
            return Err(damaged("does not match its checksum"));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::crypto::{test_keyring, MasterKey};
    use crate::state::command::Command;

    const T: &str = "acme";
    const SECRET_BODY: &[u8] = b"SECRET-BODY-MARKER-in-a-chunk-of-mail";

    /// A state with a tenant, a mailbox and a large chunk, applied for real.
    pub(in crate::store) fn state(dir: &Path) -> StateDb {
        let stores = crate::store::open(dir).unwrap();
        super::super::data_version::upgrade(&stores.state.get(), test_keyring()).unwrap();
        let db = stores.state.get();
        let mut tx = super::super::apply::Tx::new(&db, test_keyring());
        let key = test_keyring().generate(T, 1).unwrap();
        tx.apply(Command::CreateTenant {
            tenant: T.into(),
            key,
        })
        .unwrap();
        tx.apply(Command::CreateMailbox {
            tenant: T.into(),
            mailbox: "support".into(),
            uidvalidity: 7,
        })
        .unwrap();
        let mut chunk = SECRET_BODY.to_vec();
        chunk.resize(64 << 10, b'x');
        tx.apply(Command::PutChunk {
            tenant: T.into(),
            blob: [9; 16],
            index: 0,
            ciphertext: serde_bytes::ByteBuf::from(chunk),
        })
        .unwrap();
        tx.put_raw(
            crate::state::keys::META_APPLIED.to_vec(),
            encode(&Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(2, 1),
                41,
            ))),
        );
        // As an apply writes: without the WAL.
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        db.write_opt(tx.batch, &wo).unwrap();
        stores.state
    }

    pub(in crate::store) fn by() -> Taker<'static> {
        Taker {
            cluster: "test-cluster",
            node: 3,
            pause_while: None,
        }
    }

    fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files_under(&p, out);
            } else {
                out.push(p);
            }
        }
    }

    #[test]
    fn backup_ids_are_recognised_and_nothing_else_is() {
        let id = backup_id(1_764_700_000_123, 12_345);
        assert_eq!(id, "20251202T182640Z-000000012345");
        assert!(is_backup_id(&id));
        for bad in [
            "",
            "../etc",
            "20251202T182640Z-00000001234",
            "20251202T182640Z/000000012345",
            "incoming-1",
        ] {
            assert!(!is_backup_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_backup_lists_every_file_keeps_its_keys_apart_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&dir.path().join("node"));
        let (_, live_digest, live_records) = super::super::MailReader::unkeyed(state.get())
            .state_digest()
            .unwrap();
        let wrapped = {
            let r = super::super::MailReader::new(state.clone(), test_keyring().binding().clone());
            r.tenant(T).unwrap().unwrap().keys[0].wrapped.clone()
        };
        let root = dir.path().join("backups");
        std::fs::create_dir_all(root.join("incoming-1")).unwrap();
        let (m, bdir) = take(&state, test_keyring(), &root, by()).unwrap();
        assert_eq!(bdir.file_name().unwrap().to_string_lossy(), m.backup_id);
        assert!(is_backup_id(&m.backup_id), "{}", m.backup_id);
        let listing = list_root(&root).unwrap();
        assert_eq!(listing.backups, std::slice::from_ref(&m.backup_id));
        assert_eq!(
            listing.incomplete,
            [root.join("incoming-1")],
            "a cut-short take is no backup"
        );
        assert!(m.backup_id.ends_with("-000000000041"), "{}", m.backup_id);
        assert_eq!((m.applied_index, m.applied_term), (41, 2));
        assert_eq!(m.state_digest, hex(&live_digest), "the digest of the live state");
        assert_eq!(m.records, live_records);
        assert_eq!(
            m.tenants,
            vec![BackupTenant {
                name: T.into(),
                key_versions: vec![1]
            }]
        );
        assert_eq!(m.master_key_fingerprint, test_keyring().backups().fingerprint());
        assert!(m.files.iter().any(|f| f.path == KEYRING));
        assert!(
            m.files.iter().any(|f| f.path.ends_with(".blob")),
            "the chunk's blob file"
        );
        assert_eq!(verify(&bdir, test_keyring()).unwrap(), m);
        // The wrapped key is in the keyring object and nowhere in the data;
        // the chunk (ciphertext in real life) is in the data; the master key nowhere.
        let ring: BackupKeyring =
            serde_json::from_slice(&std::fs::read(bdir.join(KEYRING)).unwrap()).unwrap();
        assert_eq!(ring.tenants[T][0].wrapped, wrapped);
        let mut all = Vec::new();
        files_under(&bdir.join(DATA), &mut all);
        let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        let mut saw_chunk = false;
        for p in &all {
            let bytes = std::fs::read(p).unwrap();
            assert!(!has(&bytes, &wrapped), "a wrapped data key in {}", p.display());
            saw_chunk |= has(&bytes, SECRET_BODY);
        }
        assert!(saw_chunk, "positive control: the data is really there");
        // No half-taken backup of its own is left beside it (only the
        // older leftover the test put there).
        let mut names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [m.backup_id.clone(), "incoming-1".to_string()]);
    }

    #[test]
    fn an_edited_manifest_a_damaged_or_missing_file_and_another_master_key_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&dir.path().join("node"));
        let (m, bdir) = take(&state, test_keyring(), &dir.path().join("backups"), by()).unwrap();
        // One field edited.
        let path = bdir.join(MANIFEST);
        let good = std::fs::read_to_string(&path).unwrap();
        let edited = good.replace("\"applied_index\": 41", "\"applied_index\": 40");
        assert_ne!(edited, good);
        std::fs::write(&path, &edited).unwrap();
        let e = verify(&bdir, test_keyring()).unwrap_err();
        assert!(matches!(e, BackupError::ManifestForged { .. }), "{e}");
        std::fs::write(&path, &good).unwrap();
        // Another master key.
        let other = Keyring::new(&MasterKey::from_hex(&"77".repeat(32)).unwrap());
        let e = verify(&bdir, &other).unwrap_err();
        assert!(matches!(e, BackupError::WrongMasterKey { .. }), "{e}");
        assert!(
            !e.to_string().contains(&"77".repeat(8)),
            "no key material in the error"
        );
        // One byte of one file flipped: named.
        let victim = m.files.iter().find(|f| f.path.ends_with(".blob")).unwrap();
        let mut bytes = std::fs::read(bdir.join(&victim.path)).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(bdir.join(&victim.path), &bytes).unwrap();
        let restore_victim = || {
            let mut b = bytes.clone();
            b[mid] ^= 1;
            std::fs::write(bdir.join(&victim.path), b).unwrap();
        };
        let e = verify(&bdir, test_keyring()).unwrap_err();
        assert!(
            matches!(&e, BackupError::Damaged { path, why: "does not match its checksum", .. } if *path == victim.path),
            "{e}"
        );
        restore_victim();
        assert!(verify(&bdir, test_keyring()).is_ok());
        // One file deleted: named.
        std::fs::remove_file(bdir.join(KEYRING)).unwrap();
        let e = verify(&bdir, test_keyring()).unwrap_err();
        assert!(
            e.to_string().contains(KEYRING) && e.to_string().contains("missing"),
            "{e}"
        );
        // No manifest: no backup.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            verify(&bdir, test_keyring()),
            Err(BackupError::NoManifest { .. })
        ));
    }
}
