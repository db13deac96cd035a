//! The cluster master key (KEK), loaded from a file that only its owner can read.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The 256-bit master key. Never logged, never written to the log or RocksDB.
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// Why the master key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// Missing or unreadable.
    #[error("cannot read master key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Group or others may read or write it.
    #[error(
        "master key file {path} has mode {mode:o}; it must not be accessible to group or others (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Not 64 hex characters.
    #[error("master key file {path} must hold exactly 64 hex characters (256 bits)")]
    Format {
        /// The file.
        path: PathBuf,
    },
}

impl MasterKey {
    /// Loads the key, refusing a file readable by group or others.
    pub fn load(path: &Path) -> Result<MasterKey, MasterKeyError> {
        let read_err = |source| MasterKeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(MasterKeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read_err)?);
        Self::from_hex(text.trim()).ok_or_else(|| MasterKeyError::Format {
            path: path.to_path_buf(),
        })
    }

    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Option<MasterKey> {
        if text.len() != 64 {
            return None;
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).ok()?;
            bytes[i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(MasterKey { bytes })
    }

    /// The raw key, for building a cipher.
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_key(mode: u32, text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let f = write_key(0o644, &"ab".repeat(32));
        let err = MasterKey::load(f.path()).unwrap_err();
        assert!(
            matches!(err, MasterKeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_private_hex_key_loads() {
        let f = write_key(0o600, &format!("{}\n", "0f".repeat(32)));
        let k = MasterKey::load(f.path()).unwrap();
        assert_eq!(k.bytes()[0], 0x0f);
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn a_missing_or_short_key_is_refused() {
        assert!(MasterKey::load(Path::new("/nonexistent/mv.key")).is_err());
        let f = write_key(0o600, "abcd");
        assert!(matches!(
            MasterKey::load(f.path()),
            Err(MasterKeyError::Format { .. })
        ));
    }
}
