//! Finding the cipher for a tenant's data, and sealing/opening a message's parts.

use std::sync::Arc;

use aes_gcm::Aes256Gcm;
use tonic::Status;

use crate::crypto::{open, seal, Aad};
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::state::command::BlobId;
use crate::state::command::Refusal;

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

/// Envelope format of a part stored unencrypted by the `plaintext` test mode
/// (never written or accepted otherwise).
const PLAINTEXT_FORMAT: u8 = 0xfe;

impl MessageCipher {
    /// The cipher for `tenant`'s key `version` (the current one if `None`).
    pub fn for_message(
        ctx: &Ctx,
        tenant: &str,
        mailbox: &str,
        blob: BlobId,
        version: Option<u32>,
    ) -> Result<MessageCipher, Status> {
        let rec = ctx
            .reader
            .tenant(tenant)
            .map_err(error::read)?
            .ok_or_else(|| error::refusal(Refusal::NoTenant))?;
        let version = version.unwrap_or_else(|| rec.current_version());
        let key = rec
            .keys
            .iter()
            .find(|k| k.version == version)
            .ok_or_else(|| error::damaged("tenant key version missing"))?;
        let cipher = ctx.keyring.cipher(tenant, key).map_err(error::crypto)?;
        Ok(MessageCipher {
            cipher,
            tenant: tenant.to_string(),
            mailbox: mailbox.to_string(),
            blob,
            key_version: version,
            plaintext: ctx.test_modes.plaintext,
        })
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
    pub fn seal(&self, chunk: u32, plaintext: &[u8]) -> Result<Vec<u8>, Status> {
        if self.plaintext {
            let mut v = Vec::with_capacity(1 + plaintext.len());
            v.push(PLAINTEXT_FORMAT);
            v.extend_from_slice(plaintext);
            return Ok(v);
        }
        seal(&self.cipher, &self.aad(chunk), plaintext).map_err(|e| error::crypto(e).into())
    }

    /// Decrypts part `chunk` of the message.
    pub fn open(&self, chunk: u32, envelope: &[u8]) -> Result<Vec<u8>, Status> {
        if let (true, Some((&PLAINTEXT_FORMAT, rest))) = (self.plaintext, envelope.split_first()) {
            return Ok(rest.to_vec());
        }
        open(&self.cipher, &self.aad(chunk), envelope).map_err(|e| error::crypto(e).into())
    }
}

/// A fresh random blob id.
pub fn new_blob() -> Result<BlobId, Status> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|_| ApiError::new(Reason::InternalError, "random source unavailable"))?;
    Ok(b)
}
