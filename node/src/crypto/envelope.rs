//! The envelope every ciphertext is stored in, and the associated data that
//! binds it to its place.
//!
//! Envelope: `format(1) || nonce(12) || AES-256-GCM ciphertext || tag(16)`.
//! AAD: `"mailvault" || format || key version(be32) || tenant || 0 || mailbox
//! || 0 || blob(16) || chunk(be32)`. A ciphertext copied to another tenant,
//! mailbox, message or chunk position, or read under another key version,
//! fails to authenticate.
//!
//! Frozen format: do not change without a data-version migration.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use crate::state::command::BlobId;

/// The envelope format version written today.
pub const FORMAT_VERSION: u8 = 1;
/// The chunk index used for a message's encrypted parsed headers.
pub const HEADERS_CHUNK: u32 = u32::MAX;

const NONCE_LEN: usize = 12;

/// Where a ciphertext belongs.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// Tenant name.
    pub tenant: &'a str,
    /// Mailbox name (empty for tenant keys).
    pub mailbox: &'a str,
    /// Body identity (zero for tenant keys).
    pub blob: &'a BlobId,
    /// Chunk index, or [`HEADERS_CHUNK`].
    pub chunk: u32,
    /// Key version.
    pub key_version: u32,
}

impl Aad<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.tenant.len() + self.mailbox.len());
        v.extend_from_slice(b"mailvault");
        v.push(FORMAT_VERSION);
        v.extend_from_slice(&self.key_version.to_be_bytes());
        v.extend_from_slice(self.tenant.as_bytes());
        v.push(0);
        v.extend_from_slice(self.mailbox.as_bytes());
        v.push(0);
        v.extend_from_slice(self.blob);
        v.extend_from_slice(&self.chunk.to_be_bytes());
        v
    }
}

/// A ciphertext did not authenticate, or randomness was unavailable.
/// Deliberately says nothing about the content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Wrong key, wrong place, or tampered.
    #[error("ciphertext failed to authenticate")]
    Authentication,
    /// Unknown envelope format.
    #[error("unknown envelope format {0}")]
    Format(u8),
    /// The system random source failed.
    #[error("random source unavailable")]
    Random,
}

/// Encrypts `plaintext` with a fresh random nonce.
pub fn seal(cipher: &Aes256Gcm, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| CryptoError::Random)?;
    let aad = aad.bytes();
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Authentication)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Decrypts and authenticates an envelope.
pub fn open(cipher: &Aes256Gcm, aad: &Aad<'_>, envelope: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let (&format, rest) = envelope.split_first().ok_or(CryptoError::Authentication)?;
    if format != FORMAT_VERSION {
        return Err(CryptoError::Format(format));
    }
    if rest.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Authentication);
    }
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Authentication)?;
    let aad = aad.bytes();
    cipher
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad: &aad })
        .map_err(|_| CryptoError::Authentication)
}

/// Builds a cipher from a 32-byte key.
pub(crate) fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(&(*key).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aad<'a>(tenant: &'a str, mailbox: &'a str, blob: &'a BlobId, chunk: u32) -> Aad<'a> {
        Aad {
            tenant,
            mailbox,
            blob,
            chunk,
            key_version: 1,
        }
    }

    #[test]
    fn a_sealed_chunk_opens_only_in_its_own_place() {
        let c = cipher(&[7; 32]);
        let blob = [1; 16];
        let env = seal(&c, &aad("acme", "inbox", &blob, 0), b"hello").unwrap();
        assert_eq!(open(&c, &aad("acme", "inbox", &blob, 0), &env).unwrap(), b"hello");
        for wrong in [
            aad("other", "inbox", &blob, 0),
            aad("acme", "sales", &blob, 0),
            aad("acme", "inbox", &[2; 16], 0),
            aad("acme", "inbox", &blob, 1),
        ] {
            assert_eq!(open(&c, &wrong, &env), Err(CryptoError::Authentication));
        }
        let mut v2 = aad("acme", "inbox", &blob, 0);
        v2.key_version = 2;
        assert_eq!(open(&c, &v2, &env), Err(CryptoError::Authentication));
    }

    #[test]
    fn nonces_are_fresh_and_tampering_is_detected() {
        let c = cipher(&[7; 32]);
        let blob = [1; 16];
        let a = aad("acme", "inbox", &blob, 0);
        let e1 = seal(&c, &a, b"same").unwrap();
        let e2 = seal(&c, &a, b"same").unwrap();
        assert_ne!(e1, e2);
        let mut bad = e1.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(open(&c, &a, &bad), Err(CryptoError::Authentication));
        assert!(!e1.windows(4).any(|w| w == b"same"));
        assert_eq!(open(&cipher(&[8; 32]), &a, &e1), Err(CryptoError::Authentication));
    }
}
