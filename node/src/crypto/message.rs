//! Sealing and opening the parts of one message (its body chunks and its
//! parsed headers) with one tenant key version, bound to the message's place.

use std::sync::Arc;

use aes_gcm::Aes256Gcm;

use super::envelope::{open, seal, Aad, CryptoError};
use crate::state::records::BlobId;

/// Envelope format of a part stored unencrypted by the `plaintext` test mode
/// (never written or accepted otherwise).
const PLAINTEXT_FORMAT: u8 = 0xfe;

/// The cipher of one tenant key version, bound to one message's place.
pub struct MessageCipher {
    cipher: Arc<Aes256Gcm>,
    tenant: String,
    mailbox: String,
    blob: BlobId,
    /// The key version.
    pub key_version: u32,
    /// The `plaintext` test mode: parts are stored unencrypted.
    plaintext: bool,
}

impl MessageCipher {
    /// The cipher of key `key_version` (`cipher`) for the message `blob` in
    /// `tenant`'s `mailbox`; `plaintext` is the test mode of that name.
    pub fn new(
        cipher: Arc<Aes256Gcm>,
        tenant: &str,
        mailbox: &str,
        blob: BlobId,
        key_version: u32,
        plaintext: bool,
    ) -> MessageCipher {
        MessageCipher {
            cipher,
            tenant: tenant.to_string(),
            mailbox: mailbox.to_string(),
            blob,
            key_version,
            plaintext,
        }
    }

    fn aad(&self, chunk: u32) -> Aad<'_> {
        Aad {
            tenant: &self.tenant,
            mailbox: &self.mailbox,
            blob: &self.blob,
            chunk,
            key_version: self.key_version,
        }
    }

    /// Encrypts part `chunk` of the message.
    pub fn seal(&self, chunk: u32, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if self.plaintext {
            let mut v = Vec::with_capacity(1 + plaintext.len());
            v.push(PLAINTEXT_FORMAT);
            v.extend_from_slice(plaintext);
            return Ok(v);
        }
        seal(&self.cipher, &self.aad(chunk), plaintext)
    }

    /// Decrypts part `chunk` of the message.
    pub fn open(&self, chunk: u32, envelope: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if let (true, Some((&PLAINTEXT_FORMAT, rest))) = (self.plaintext, envelope.split_first()) {
            return Ok(rest.to_vec());
        }
        open(&self.cipher, &self.aad(chunk), envelope)
    }
}
