//! The authenticated caller of one request, and the tenant-scoped check.

use std::net::IpAddr;

use tonic::Status;

use super::denials::Against;
use super::gate::Gate;
use crate::error::{ApiError, Reason};
use crate::state::audit::AuditEvent;
use crate::state::policy::{Action, IdentityPolicy};

/// Who is calling, as established by the access layer.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The identity (user name, or `node:<id>`).
    pub identity: String,
    /// Whether the caller is a cluster node acting for itself.
    pub is_node: bool,
    /// The certificate serial (hex).
    pub serial: String,
    /// The source address of the original caller.
    pub source: Option<IpAddr>,
    /// SHA-256 of the caller's certificate public key (SubjectPublicKeyInfo),
    /// hex: two certificates of one key share it (two-person operations
    /// need two keys).
    pub key: String,
    /// The identity's replicated policy.
    pub policy: IdentityPolicy,
}

impl Principal {
    /// The source address as text.
    pub fn source_text(&self) -> String {
        self.source.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
    }

    /// Whether this principal may see customer addresses of `tenant`.
    pub fn may_view_addresses(&self, tenant: &str) -> bool {
        self.policy.permits(tenant, Action::ViewAddresses)
    }

    /// An audit event for this principal.
    pub fn event(&self, action: &str, target: String, result: &str) -> AuditEvent {
        AuditEvent::new(&self.identity, self.source, action, &target, result)
    }
}

/// The one place tenant-scoped access is decided: `principal` may do `action`
/// on `tenant`, or the call is denied `PERMISSION_DENIED`. Either way an
/// audit record is written (`rpc`, `target` ids, result).
pub async fn authorize(
    gate: &Gate,
    principal: Option<&Principal>,
    rpc: &str,
    tenant: &str,
    target: String,
    action: Action,
) -> Result<Principal, Status> {
    let Some(p) = principal else {
        return Err(ApiError::new(Reason::NoIdentity, "no authenticated identity").into());
    };
    if p.policy.permits(tenant, action) {
        if !(action == Action::Read && gate.unaudited_reads) {
            gate.audit.record(p.event(rpc, target, "allowed")).await?;
        }
        return Ok(p.clone());
    }
    let reason = format!("no role on tenant {tenant} permits {action:?}");
    gate.denials
        .deny(&p.identity, p.source, rpc, &target, &reason, Against::Identity)
        .await;
    let message = format!("{} may not {:?} tenant {tenant}", p.identity, action);
    Err(ApiError::new(Reason::NoTenantRole, message).into())
}
