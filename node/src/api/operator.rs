//! What the operator services (cluster, tenants, access, audit) share: every
//! call they serve is recorded in the audit log before it acts.

use tonic::Status;

use crate::access::Principal;
use crate::ctx::Ctx;
use crate::error::{ApiError, Reason};

/// Records an operator's or auditor's call (the access layer already checked
/// the role); a call that cannot be recorded is refused.
pub async fn record(ctx: &Ctx, p: Option<&Principal>, action: &str, target: String) -> Result<(), Status> {
    let p = p.ok_or_else(|| ApiError::new(Reason::NoIdentity, "no authenticated identity"))?;
    ctx.audit.record(p.event(action, target, "allowed")).await
}

pub use crate::state::ops::hex;
