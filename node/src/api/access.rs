//! `mailvault.v1.Access`: the replicated access policy. Each change is one
//! `Command::Access` the state machine decides against the current policy
//! (see `store/apply/access.rs`), never a read-modify-write of the whole
//! policy by the client.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mailvault_proto::v1::access_client::AccessClient;
use mailvault_proto::v1::access_server::Access;
use mailvault_proto::v1::{role, IdentityPolicy as ProtoPolicy, *};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::operator::record;
use crate::access::Principal;
use crate::access::{id_key, ip_key, is_key, UNLOCKED, UNLOCK_ACTION};
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::forward::{principal_of, route_write};
use crate::names;
use crate::state::command::{AccessChange, Command, CommandResult, RoleGrant};
use crate::state::ops::{allowlist_text, widens};
use crate::state::policy::{ClusterRole, IdentityPolicy, TenantRole, ANY_TENANT};

/// Longest identity name accepted.
const IDENTITY_MAX_BYTES: usize = 256;

/// The access service.
#[derive(Clone)]
pub struct AccessService {
    ctx: Arc<Ctx>,
}

impl AccessService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> AccessService {
        AccessService { ctx }
    }

    /// A client of this service on the leader, to forward a write over `ch`.
    fn client(&self, ch: Channel) -> AccessClient<Channel> {
        AccessClient::new(ch)
    }

    /// Proposes one access change and returns the policy before and after.
    async fn change(&self, change: AccessChange) -> Result<Response<PolicyChange>, Status> {
        let identity = change.identity().to_string();
        match self
            .ctx
            .proposer
            .propose(Command::Access(change))
            .await
            .map_err(error::propose)?
        {
            CommandResult::Policy { before, after } => Ok(Response::new(PolicyChange {
                changed: before != after,
                before: Some(policy_to_proto(&identity, &before)),
                after: Some(policy_to_proto(&identity, &after)),
            })),
            CommandResult::Refused(r) => Err(error::refusal(r).into()),
            _ => Err(error::unexpected("access change").into()),
        }
    }
}

pub(super) fn check_identity(name: &str) -> Result<(), ApiError> {
    names::check("identity", name, IDENTITY_MAX_BYTES).map_err(error::name)
}

fn policy_to_proto(identity: &str, p: &IdentityPolicy) -> ProtoPolicy {
    ProtoPolicy {
        identity: identity.to_string(),
        tenant_roles: p
            .tenant_roles
            .iter()
            .map(|(t, roles)| TenantRoles {
                tenant: t.clone(),
                roles: roles.iter().map(|r| r.as_str().to_string()).collect(),
            })
            .collect(),
        cluster_roles: p.cluster_roles.iter().map(|r| r.as_str().to_string()).collect(),
        allow_from: p.allow_from.iter().map(|n| n.to_string()).collect(),
        revoked: p.revoked,
    }
}

/// The role a grant or ungrant names.
pub(super) fn role_of(r: Option<Role>) -> Result<RoleGrant, ApiError> {
    match r.and_then(|r| r.role) {
        Some(role::Role::Tenant(t)) => {
            if t.tenant != ANY_TENANT {
                names::tenant(&t.tenant).map_err(error::name)?;
            }
            let role = TenantRole::parse(&t.role)
                .ok_or_else(|| error::invalid(format!("unknown tenant role {:?}", t.role)))?;
            Ok(RoleGrant::Tenant {
                tenant: t.tenant,
                role,
            })
        }
        Some(role::Role::Cluster(c)) => ClusterRole::parse(&c)
            .map(RoleGrant::Cluster)
            .ok_or_else(|| error::invalid(format!("unknown cluster role {c:?}"))),
        None => Err(error::invalid("a tenant role or a cluster role is required")),
    }
}

pub(super) fn networks(list: &[String]) -> Result<Vec<IpNet>, ApiError> {
    list.iter()
        .map(|n| {
            n.parse()
                .map_err(|_| error::invalid(format!("not a CIDR network: {n:?}")))
        })
        .collect()
}

/// A role as the API names it.
pub(super) fn role_to_proto(r: &RoleGrant) -> Role {
    let role = match r {
        RoleGrant::Tenant { tenant, role } => role::Role::Tenant(mailvault_proto::v1::TenantRole {
            tenant: tenant.clone(),
            role: role.as_str().to_string(),
        }),
        RoleGrant::Cluster(c) => role::Role::Cluster(c.as_str().to_string()),
    };
    Role { role: Some(role) }
}

/// A change that needs a second operator, refused (and audited) here: it is
/// proposed through the Operations service instead.
pub(super) async fn two_person(
    ctx: &Ctx,
    p: Option<&Principal>,
    method: &str,
    target: String,
    what: &str,
) -> Status {
    let message = format!(
        "{what} needs a second operator: propose it (Operations.ProposeOperation, \
         `mailvault-admin op propose`) and have another operator approve it"
    );
    if let Some(p) = p {
        if let Err(e) = ctx
            .audit
            .record(p.event(method, target, "refused: two-person operation"))
            .await
        {
            return e;
        }
    }
    ApiError::new(Reason::TwoPersonRequired, message).into()
}

/// Normalises a certificate serial: lowercase hex without colons.
pub fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect::<String>().to_lowercase();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(hex)
}

#[tonic::async_trait]
impl Access for AccessService {
    async fn get_identity(&self, req: Request<GetIdentityRequest>) -> Result<Response<ProtoPolicy>, Status> {
        let p = principal_of(&req);
        let id = req.into_inner().identity;
        check_identity(&id)?;
        record(&self.ctx, p.as_ref(), "GetIdentity", id.clone()).await?;
        self.ctx.read_barrier().await?;
        let policy = self
            .ctx
            .reader
            .identity_policy(&id)
            .map_err(error::read)?
            .unwrap_or_default();
        Ok(Response::new(policy_to_proto(&id, &policy)))
    }

    async fn grant(&self, req: Request<GrantRequest>) -> Result<Response<PolicyChange>, Status> {
        // Every grant widens someone's rights: two-person, never here.
        let p = principal_of(&req);
        let r = req.into_inner();
        check_identity(&r.identity)?;
        let role = role_of(r.role)?;
        let target = format!("{}: +{role}", r.identity);
        Err(two_person(&self.ctx, p.as_ref(), "Grant", target, "granting a role").await)
    }

    async fn ungrant(&self, req: Request<GrantRequest>) -> Result<Response<PolicyChange>, Status> {
        route_write!(self, req, p, ungrant);
        let r = req.into_inner();
        check_identity(&r.identity)?;
        let role = role_of(r.role)?;
        record(
            &self.ctx,
            p.as_ref(),
            "Ungrant",
            format!("{}: -{role}", r.identity),
        )
        .await?;
        self.change(AccessChange::Ungrant {
            identity: r.identity,
            role,
        })
        .await
    }

    async fn set_allowlist(
        &self,
        req: Request<SetAllowlistRequest>,
    ) -> Result<Response<PolicyChange>, Status> {
        route_write!(self, req, p, set_allowlist);
        let r = req.into_inner();
        check_identity(&r.identity)?;
        let list = networks(&r.allow_from.map(|a| a.networks).unwrap_or_default())?;
        let expected = r.expected.map(|e| networks(&e.networks)).transpose()?;
        let target = format!("{}: allow from {}", r.identity, allowlist_text(&list));
        // Narrowing is immediate; widening is a two-person operation. The
        // change is decided against the allowlist read here, so it applies
        // only if that is still the allowlist (else ALLOWLIST_CHANGED).
        self.ctx.read_barrier().await?;
        let current = self
            .ctx
            .reader
            .identity_policy(&r.identity)
            .map_err(error::read)?
            .unwrap_or_default()
            .allow_from;
        if expected.as_ref().is_some_and(|e| *e != current) {
            return Err(error::refusal(crate::state::command::Refusal::AllowlistChanged).into());
        }
        if widens(&current, &list) {
            let what = "an allowlist change that admits new sources";
            return Err(two_person(&self.ctx, p.as_ref(), "SetAllowlist", target, what).await);
        }
        record(&self.ctx, p.as_ref(), "SetAllowlist", target).await?;
        self.change(AccessChange::SetAllowlist {
            identity: r.identity,
            networks: list,
            expected: Some(current),
        })
        .await
    }

    async fn revoke_identity(
        &self,
        req: Request<RevokeIdentityRequest>,
    ) -> Result<Response<PolicyChange>, Status> {
        route_write!(self, req, p, revoke_identity);
        let id = req.into_inner().identity;
        check_identity(&id)?;
        record(&self.ctx, p.as_ref(), "RevokeIdentity", id.clone()).await?;
        self.change(AccessChange::Revoke { identity: id }).await
    }

    async fn revoke_certificate(
        &self,
        req: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokeCertificateResponse>, Status> {
        route_write!(self, req, p, revoke_certificate);
        let serial =
            normalize_serial(&req.into_inner().serial).ok_or_else(|| error::invalid("serial must be hex"))?;
        record(&self.ctx, p.as_ref(), "RevokeCertificate", serial.clone()).await?;
        self.ctx
            .proposer
            .propose(Command::RevokeSerial { serial })
            .await
            .map_err(error::propose)?;
        Ok(Response::new(RevokeCertificateResponse {}))
    }

    async fn list_lockouts(
        &self,
        req: Request<ListLockoutsRequest>,
    ) -> Result<Response<ListLockoutsResponse>, Status> {
        let p = principal_of(&req);
        record(&self.ctx, p.as_ref(), "ListLockouts", "-".into()).await?;
        let lockouts = self
            .ctx
            .gate
            .denials
            .lockout()
            .locked()
            .into_iter()
            .filter_map(|l| {
                let (kind, who) = l.key.split_once(':')?;
                Some(LockedOut {
                    identity: if kind == "id" {
                        who.to_string()
                    } else {
                        String::new()
                    },
                    address: if kind == "ip" {
                        who.to_string()
                    } else {
                        String::new()
                    },
                    until_ms: l.until_ms,
                })
            })
            .collect();
        Ok(Response::new(ListLockoutsResponse { lockouts }))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let p = principal_of(&req);
        let key = match req.into_inner().who {
            Some(unlock_request::Who::Identity(id)) => {
                check_identity(&id)?;
                id_key(&id)
            }
            Some(unlock_request::Who::Address(a)) => {
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| error::invalid("address must be an IP address"))?;
                ip_key(ip)
            }
            None => return Err(error::invalid("name an identity or an address").into()),
        };
        if !is_key(&key) {
            return Err(error::invalid("node identities are never locked out").into());
        }
        let p = p.ok_or_else(|| ApiError::new(Reason::NoIdentity, "no authenticated identity"))?;
        let lockout = self.ctx.gate.denials.lockout();
        let was_locked = lockout.locked_until(&key).is_some();
        // The unlock is an audit record, committed before this returns; every
        // node lifts the lockout when it folds it (see access/lockout.rs).
        self.ctx
            .audit
            .record_committed(p.event(UNLOCK_ACTION, key.clone(), UNLOCKED))
            .await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lockout.locked_until(&key).is_some() {
            if std::time::Instant::now() > deadline {
                return Err(ApiError::new(
                    Reason::ReplicaBehind,
                    "unlock committed; this node has not applied it yet",
                )
                .into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(Response::new(UnlockResponse { was_locked }))
    }
}
