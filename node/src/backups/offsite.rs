//! The off-site store, through `object_store`: a directory (`file://`) or
//! S3-compatible storage (`s3://bucket/prefix`). A copy of backup `<id>` is
//! the objects `<prefix>/<id>/<path>` for every file of its manifest, and
//! `<prefix>/<id>/manifest.json`, uploaded last. Large files go up in parts
//! (bounded memory: [`PART`] bytes, at most two parts in flight); the HTTP
//! client retries with backoff. An object already there with the right size
//! and checksum is not uploaded again, so a ship cut short resumes.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{BackupConfig, S3Config};
use crate::crypto::Keyring;
use crate::state::backup::BackupManifest;
use crate::store::backup::{hex, is_inner_path, parse_manifest, BackupError, MANIFEST};

/// Part size of multipart uploads, and the read buffer of uploads.
pub const PART: usize = 8 << 20;

/// Why an off-site operation failed. Names the object, never content or
/// credentials.
#[derive(Debug, thiserror::Error)]
pub enum OffsiteError {
    /// The configuration does not describe a store.
    #[error("off-site store: {0}")]
    Config(String),
    /// The store failed (after its retries).
    #[error("off-site store failed on {object}: {why}")]
    Store {
        /// The object.
        object: String,
        /// What the store said.
        why: String,
    },
    /// A local file operation failed.
    #[error("off-site copy: local file error: {0}")]
    Io(#[from] std::io::Error),
    /// An object differs from the manifest (or is missing).
    #[error("off-site copy of {backup}: {object} {why}")]
    Damaged {
        /// The backup.
        backup: String,
        /// The object at fault.
        object: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The copy's manifest is missing, not authentic, or not this backup's.
    #[error("off-site copy: {0}")]
    Manifest(#[from] BackupError),
}

/// Told how far a long transfer or restore step has come (the CLI draws
/// it as a progress bar; the node tells nobody).
pub trait Progress: Send + Sync {
    /// A step of `total` bytes begins.
    fn begin(&self, _step: &str, _total: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The step ended.
    fn end(&self) {}
}

/// Progress nobody watches.
pub struct Quiet;

impl Progress for Quiet {}

/// An opened off-site store.
#[derive(Clone)]
pub struct Offsite {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The store's URL without credentials, for the catalog and logs.
    url: String,
}

impl std::fmt::Debug for Offsite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Offsite({})", self.url)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
}

impl Offsite {
    /// Opens the store named by `url` (`file:///…` or `s3://…`).
    pub fn open(url: &str, config: &BackupConfig) -> Result<Offsite, OffsiteError> {
        let bad = |m: String| OffsiteError::Config(m);
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create {dir}: {e}")))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| bad(e.to_string()))?
                .with_fsync(true)
                .with_automatic_cleanup(true);
            return Ok(Offsite {
                store: Arc::new(store),
                prefix: Path::default(),
                url: url.to_string(),
            });
        }
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad(format!("{url:?} is neither file:///path nor s3://bucket/prefix")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("an s3:// URL names no bucket".into()));
        }
        let store = s3(bucket, &config.s3)?;
        Ok(Offsite {
            store: Arc::new(store),
            prefix: Path::from(prefix.trim_matches('/')),
            url: url.to_string(),
        })
    }

    /// The store's URL (no credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, id: &str, path: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in id.split('/').chain(path.split('/')).filter(|p| !p.is_empty()) {
            p = p.join(part);
        }
        p
    }

    fn store_error(&self, object: &Path, e: object_store::Error) -> OffsiteError {
        OffsiteError::Store {
            object: object.to_string(),
            why: match e {
                object_store::Error::NotFound { .. } => "not found".to_string(),
                e => e.to_string(),
            },
        }
    }

    /// Uploads the backup in `dir` (already verified there): every file of
    /// its manifest that is not already there whole, then its manifest.
    /// Returns the objects and bytes uploaded now.
    pub async fn upload(&self, dir: &FsPath, manifest: &BackupManifest) -> Result<(u32, u64), OffsiteError> {
        let id = &manifest.backup_id;
        let (mut objects, mut bytes) = (0u32, 0u64);
        for f in &manifest.files {
            if !is_inner_path(&f.path) {
                return Err(OffsiteError::Damaged {
                    backup: id.clone(),
                    object: f.path.clone(),
                    why: "is not a path inside the backup",
                });
            }
            let key = self.key(id, &f.path);
            if self.check(id, &key, f.bytes, &f.sha256).await.is_ok() {
                continue;
            }
            self.put_file(&key, &dir.join(&f.path), f.bytes).await?;
            objects += 1;
            bytes += f.bytes;
        }
        let local = dir.join(MANIFEST);
        let len = tokio::fs::metadata(&local).await?.len();
        self.put_file(&self.key(id, MANIFEST), &local, len).await?;
        Ok((objects + 1, bytes + len))
    }

    async fn put_file(&self, key: &Path, file: &FsPath, len: u64) -> Result<(), OffsiteError> {
        let err = |e| self.store_error(key, e);
        if len <= PART as u64 {
            let data = tokio::fs::read(file).await?;
            self.store.put(key, PutPayload::from(data)).await.map_err(err)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(key).await.map_err(err)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut f = tokio::fs::File::open(file).await?;
        let mut buf = vec![0u8; PART];
        loop {
            if let Err(e) = w.wait_for_capacity(2).await {
                let _ = w.abort().await;
                return Err(err(e));
            }
            let n = read_full(&mut f, &mut buf).await?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n]);
        }
        w.finish().await.map_err(err)?;
        Ok(())
    }

    /// Reads one object back and checks its size and SHA-256.
    async fn check(&self, backup: &str, key: &Path, bytes: u64, sha256: &str) -> Result<(), OffsiteError> {
        let damaged = |why| OffsiteError::Damaged {
            backup: backup.to_string(),
            object: key.to_string(),
            why,
        };
        let got = match self.store.get(key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(damaged("is missing")),
            Err(e) => return Err(self.store_error(key, e)),
        };
        if got.meta.size != bytes {
            return Err(damaged("has the wrong size"));
        }
        let mut stream = got.into_stream();
        let (mut sum, mut len) = (Sha256::new(), 0u64);
        while let Some(part) = stream.next().await {
            let part = part.map_err(|e| self.store_error(key, e))?;
            len += part.len() as u64;
            sum.update(&part);
        }
        if len != bytes {
            return Err(damaged("has the wrong size"));
        }
        if hex(&sum.finalize()) != sha256 {
            return Err(damaged("does not match its checksum"));
        }
        Ok(())
    }

    /// Reads the copy's manifest and authenticates it.
    pub async fn manifest(&self, id: &str, keyring: &Keyring) -> Result<BackupManifest, OffsiteError> {
        let key = self.key(id, MANIFEST);
        let bytes = match self.store.get(&key).await {
            Ok(g) => g.bytes().await.map_err(|e| self.store_error(&key, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(OffsiteError::Damaged {
                    backup: id.to_string(),
                    object: key.to_string(),
                    why: "is missing",
                })
            }
            Err(e) => return Err(self.store_error(&key, e)),
        };
        Ok(parse_manifest(id, &bytes, keyring)?)
    }

    /// Reads every object of the copy back and checks it against the
    /// copy's (authenticated) manifest; the first object at fault is named.
    pub async fn verify(&self, id: &str, keyring: &Keyring) -> Result<BackupManifest, OffsiteError> {
        let manifest = self.manifest(id, keyring).await?;
        for f in &manifest.files {
            if !is_inner_path(&f.path) {
                return Err(OffsiteError::Damaged {
                    backup: id.to_string(),
                    object: f.path.clone(),
                    why: "is not a path inside the backup",
                });
            }
            self.check(id, &self.key(id, &f.path), f.bytes, &f.sha256).await?;
        }
        Ok(manifest)
    }

    /// Downloads the copy into `into` (a directory named by its id), each
    /// object streamed to its file; checks nothing (the drill does).
    pub async fn download(&self, id: &str, keyring: &Keyring, into: &FsPath) -> Result<(), OffsiteError> {
        self.download_with(id, keyring, into, &Quiet).await.map(|_| ())
    }

    /// [`Self::download`], telling `progress` the bytes as they arrive;
    /// returns the copy's manifest (authenticated, files not yet checked).
    pub async fn download_with(
        &self,
        id: &str,
        keyring: &Keyring,
        into: &FsPath,
        progress: &dyn Progress,
    ) -> Result<BackupManifest, OffsiteError> {
        let manifest = self.manifest(id, keyring).await?;
        progress.begin("download", manifest.files.iter().map(|f| f.bytes).sum());
        tokio::fs::create_dir_all(into).await?;
        for path in manifest
            .files
            .iter()
            .map(|f| f.path.as_str())
            .filter(|p| is_inner_path(p))
            .chain([MANIFEST])
        {
            let key = self.key(id, path);
            let target = into.join(path);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            let got = match self.store.get(&key).await {
                Ok(g) => g,
                // Missing: left for the drill's check to name.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(self.store_error(&key, e)),
            };
            let mut out = tokio::fs::File::create(&target).await?;
            let mut stream = got.into_stream();
            while let Some(part) = stream.next().await {
                let part = part.map_err(|e| self.store_error(&key, e))?;
                out.write_all(&part).await?;
                progress.advance(part.len() as u64);
            }
            out.flush().await?;
        }
        progress.end();
        Ok(manifest)
    }

    /// Deletes every object of a copy.
    pub async fn delete(&self, id: &str) -> Result<(), OffsiteError> {
        let prefix = self.key(id, "");
        let mut listed = self.store.list(Some(&prefix));
        let mut keys = Vec::new();
        while let Some(meta) = listed.next().await {
            keys.push(meta.map_err(|e| self.store_error(&prefix, e))?.location);
        }
        // The manifest first: a copy cut short is then never whole-looking.
        keys.sort_by_key(|k| !k.as_ref().ends_with(MANIFEST));
        for k in keys {
            match self.store.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.store_error(&k, e)),
            }
        }
        Ok(())
    }

    /// The backup ids with objects in the store.
    pub async fn ids(&self) -> Result<Vec<String>, OffsiteError> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listed = self
            .store
            .list_with_delimiter(prefix)
            .await
            .map_err(|e| self.store_error(&self.prefix, e))?;
        let mut ids: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| crate::store::backup::is_backup_id(n))
            .collect();
        ids.sort();
        Ok(ids)
    }
}

async fn read_full(f: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn s3(bucket: &str, c: &S3Config) -> Result<object_store::aws::AmazonS3, OffsiteError> {
    let mut b = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(&c.region)
        .with_allow_http(c.allow_http)
        .with_retry(object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            // A request is retried for seconds; a ship that fails is tried
            // again by the schedule.
            max_retries: 4,
            retry_timeout: Duration::from_secs(30),
        });
    if !c.endpoint.is_empty() {
        b = b
            .with_endpoint(&c.endpoint)
            .with_virtual_hosted_style_request(false);
    }
    if !c.credentials_file.as_os_str().is_empty() {
        let text = std::fs::read_to_string(&c.credentials_file).map_err(|e| {
            OffsiteError::Config(format!(
                "cannot read the credentials file {}: {e}",
                c.credentials_file.display()
            ))
        })?;
        let creds: Credentials = toml::from_str(&text).map_err(|_| {
            OffsiteError::Config(format!(
                "the credentials file {} is not access_key_id / secret_access_key TOML",
                c.credentials_file.display()
            ))
        })?;
        b = b
            .with_access_key_id(creds.access_key_id)
            .with_secret_access_key(creds.secret_access_key);
        if let Some(t) = creds.session_token {
            b = b.with_token(t);
        }
    }
    b.build().map_err(|e| OffsiteError::Config(e.to_string()))
}
