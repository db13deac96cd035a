//! Finding the cipher for a tenant's data (its key record, through the keyring).

use tonic::Status;

use crate::crypto::MessageCipher;
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::state::command::{BlobId, Refusal};

/// The cipher of `tenant`'s key `version` (the current one if `None`) for
/// message `blob` in `mailbox`.
pub fn cipher_for(
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
    Ok(MessageCipher::new(
        cipher,
        tenant,
        mailbox,
        blob,
        version,
        ctx.test_modes.plaintext,
    ))
}

/// A fresh random blob id.
pub fn new_blob() -> Result<BlobId, Status> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|_| ApiError::new(Reason::InternalError, "random source unavailable"))?;
    Ok(b)
}
