//! Finding the cipher for a tenant's data (its key record, through the keyring).

use std::sync::Arc;

use tonic::Status;

use crate::crypto::{MessageCipher, TenantNames};
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

/// `tenant`'s name keys: idempotency keys are hashed and keywords and agents
/// sealed with them before they are proposed, and opened for the client.
pub fn names_for(ctx: &Ctx, tenant: &str) -> Result<Arc<TenantNames>, Status> {
    let rec = ctx
        .reader
        .tenant(tenant)
        .map_err(error::read)?
        .ok_or_else(|| error::refusal(Refusal::NoTenant))?;
    let first = rec
        .keys
        .first()
        .ok_or_else(|| error::damaged("tenant key missing"))?;
    Ok(ctx.keyring.names(tenant, first).map_err(error::crypto)?)
}

/// [`names_for`] on the leader before it proposes: a tenant not found
/// locally is looked up again after a read barrier (it may have been
/// created just before a change of leader).
pub async fn names_to_propose(ctx: &Ctx, tenant: &str) -> Result<Arc<TenantNames>, Status> {
    if ctx.reader.tenant(tenant).map_err(error::read)?.is_none() {
        ctx.read_barrier().await?;
    }
    names_for(ctx, tenant)
}

/// A fresh random blob id.
pub fn new_blob() -> Result<BlobId, Status> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|_| ApiError::new(Reason::InternalError, "random source unavailable"))?;
    Ok(b)
}
