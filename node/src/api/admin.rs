//! `mailvault.v1.Admin`: tenants, node status and snapshots.

use std::sync::Arc;
use std::time::Duration;

use mailvault_proto::v1::admin_server::Admin;
use mailvault_proto::v1::{AuditRecord as ProtoAudit, IdentityPolicy as ProtoPolicy, *};
use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::access::Principal;
use crate::ctx::{forwarded, Ctx, Route};
use crate::error::{self, ApiError, Reason};
use crate::names;
use crate::state::command::{Command, CommandResult};
use crate::state::policy::{ClusterRole, IdentityPolicy, TenantRole, ANY_TENANT};

/// The admin service.
#[derive(Clone)]
pub struct AdminService {
    ctx: Arc<Ctx>,
}

impl AdminService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> AdminService {
        AdminService { ctx }
    }

    /// Records an admin action (the access layer already checked the role).
    async fn record(&self, p: Option<&Principal>, action: &str, target: String) -> Result<(), Status> {
        let p = p.ok_or_else(|| ApiError::new(Reason::NoIdentity, "no authenticated identity"))?;
        self.ctx.audit.record(p.event(action, target, "allowed")).await
    }
}

fn principal_of<T>(req: &Request<T>) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

fn policy_from_proto(p: &ProtoPolicy) -> Result<IdentityPolicy, Status> {
    let bad = error::invalid;
    let mut out = IdentityPolicy {
        revoked: p.revoked,
        ..Default::default()
    };
    for tr in &p.tenant_roles {
        if tr.tenant != ANY_TENANT {
            names::tenant(&tr.tenant).map_err(error::name)?;
        }
        let set = out.tenant_roles.entry(tr.tenant.clone()).or_default();
        for r in &tr.roles {
            set.insert(TenantRole::parse(r).ok_or_else(|| bad(format!("unknown tenant role {r:?}")))?);
        }
    }
    for r in &p.cluster_roles {
        out.cluster_roles
            .insert(ClusterRole::parse(r).ok_or_else(|| bad(format!("unknown cluster role {r:?}")))?);
    }
    for n in &p.allow_from {
        out.allow_from
            .push(n.parse().map_err(|_| bad(format!("not a CIDR network: {n:?}")))?);
    }
    Ok(out)
}

/// Normalises a certificate serial: lowercase hex without colons or leading zeros.
pub fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect::<String>().to_lowercase();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(hex)
}

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_tenant(
        &self,
        req: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        let p = principal_of(&req);
        if let Route::Forward(ch) = self.ctx.route(req.metadata())? {
            return self
                .ctx
                .admin_client(ch)
                .create_tenant(forwarded(req.into_inner(), p.as_ref()))
                .await;
        }
        let r = req.into_inner();
        names::tenant(&r.tenant).map_err(error::name)?;
        self.record(p.as_ref(), "CreateTenant", r.tenant.clone()).await?;
        let key = self.ctx.keyring.generate(&r.tenant, 1).map_err(error::crypto)?;
        match self
            .ctx
            .proposer
            .propose(Command::CreateTenant {
                tenant: r.tenant,
                key,
            })
            .await
            .map_err(error::propose)?
        {
            CommandResult::Refused(refusal) => Err(error::refusal(refusal).into()),
            _ => Ok(Response::new(CreateTenantResponse { key_version: 1 })),
        }
    }

    async fn node_status(
        &self,
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let m = self.ctx.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                role: n.role.as_str().to_string(),
                client_addr: n.client_addr.clone(),
                raft_addr: n.raft_addr.clone(),
                ops_addr: n.ops_addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        Ok(Response::new(NodeStatusResponse {
            id: self.ctx.id,
            role: self.ctx.config.me().role.as_str().to_string(),
            state: state_name(m.state).to_string(),
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            has_leader: m.current_leader.is_some(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn trigger_snapshot(
        &self,
        req: Request<TriggerSnapshotRequest>,
    ) -> Result<Response<TriggerSnapshotResponse>, Status> {
        let p = principal_of(&req);
        let purge = req.into_inner().purge_log;
        self.record(p.as_ref(), "TriggerSnapshot", format!("purge_log={purge}"))
            .await?;
        let raft = &self.ctx.raft;
        let applied = raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        raft.trigger()
            .snapshot()
            .await
            .map_err(|_| ApiError::new(Reason::ShuttingDown, "raft stopped"))?;
        let wait = raft.wait(Some(Duration::from_secs(30)));
        let m = wait
            .metrics(
                |m| m.snapshot.map(|l| l.index).unwrap_or(0) >= applied,
                "snapshot built",
            )
            .await
            .map_err(|e| ApiError::new(Reason::TimedOut, format!("snapshot not built in time: {e}")))?;
        let snapshot_index = m.snapshot.map(|l| l.index).unwrap_or(0);
        let mut purged_index = m.purged.map(|l| l.index).unwrap_or(0);
        if purge && snapshot_index > 0 {
            raft.trigger()
                .purge_log(snapshot_index)
                .await
                .map_err(|_| ApiError::new(Reason::ShuttingDown, "raft stopped"))?;
            let m = raft
                .wait(Some(Duration::from_secs(30)))
                .metrics(
                    |m| m.purged.map(|l| l.index).unwrap_or(0) >= snapshot_index,
                    "log purged",
                )
                .await
                .map_err(|e| ApiError::new(Reason::TimedOut, format!("log not purged in time: {e}")))?;
            purged_index = m.purged.map(|l| l.index).unwrap_or(0);
        }
        Ok(Response::new(TriggerSnapshotResponse {
            snapshot_index,
            purged_index,
        }))
    }

    async fn get_identity(&self, req: Request<GetIdentityRequest>) -> Result<Response<ProtoPolicy>, Status> {
        let p = principal_of(&req);
        let id = req.into_inner().identity;
        self.record(p.as_ref(), "GetIdentity", id.clone()).await?;
        self.ctx.read_barrier().await?;
        let policy = self
            .ctx
            .reader
            .identity_policy(&id)
            .map_err(error::read)?
            .unwrap_or_default();
        Ok(Response::new(policy_to_proto(&id, &policy)))
    }

    async fn put_identity(&self, req: Request<PutIdentityRequest>) -> Result<Response<ProtoPolicy>, Status> {
        let p = principal_of(&req);
        if let Route::Forward(ch) = self.ctx.route(req.metadata())? {
            return self
                .ctx
                .admin_client(ch)
                .put_identity(forwarded(req.into_inner(), p.as_ref()))
                .await;
        }
        let proto = req
            .into_inner()
            .policy
            .ok_or_else(|| error::invalid("policy is required"))?;
        names::check("identity", &proto.identity, 256).map_err(error::name)?;
        let policy = policy_from_proto(&proto)?;
        let summary = format!(
            "{} -> {:?}",
            proto.identity,
            policy_to_proto(&proto.identity, &policy)
        );
        self.record(p.as_ref(), "PutIdentity", summary).await?;
        self.ctx
            .proposer
            .propose(Command::PutIdentity {
                identity: proto.identity.clone(),
                policy: policy.clone(),
            })
            .await
            .map_err(error::propose)?;
        Ok(Response::new(policy_to_proto(&proto.identity, &policy)))
    }

    async fn revoke_certificate(
        &self,
        req: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokeCertificateResponse>, Status> {
        let p = principal_of(&req);
        if let Route::Forward(ch) = self.ctx.route(req.metadata())? {
            return self
                .ctx
                .admin_client(ch)
                .revoke_certificate(forwarded(req.into_inner(), p.as_ref()))
                .await;
        }
        let serial =
            normalize_serial(&req.into_inner().serial).ok_or_else(|| error::invalid("serial must be hex"))?;
        self.record(p.as_ref(), "RevokeCertificate", serial.clone())
            .await?;
        self.ctx
            .proposer
            .propose(Command::RevokeSerial { serial })
            .await
            .map_err(error::propose)?;
        Ok(Response::new(RevokeCertificateResponse {}))
    }

    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let p = principal_of(&req);
        let r = req.into_inner();
        self.record(p.as_ref(), "ListAudit", format!("from {}", r.from_seq))
            .await?;
        self.ctx.read_barrier().await?;
        let limit = match r.limit {
            0 => 1000,
            n => n.min(10_000),
        } as usize;
        let records = self
            .ctx
            .reader
            .audit_records(r.from_seq.max(1), limit)
            .map_err(error::read)?
            .into_iter()
            .map(|r| ProtoAudit {
                seq: r.seq,
                time_ms: r.event.time_ms,
                identity: r.event.identity,
                source: r.event.source,
                action: r.event.action,
                target: r.event.target,
                result: r.event.result,
                node: r.event.node,
                prev_hash: hex(&r.prev_hash),
                hash: hex(&r.hash),
            })
            .collect();
        let head_seq = self.ctx.reader.audit_head().map_err(error::read)?.seq;
        Ok(Response::new(ListAuditResponse { records, head_seq }))
    }

    async fn state_digest(
        &self,
        _req: Request<StateDigestRequest>,
    ) -> Result<Response<StateDigestResponse>, Status> {
        let reader = self.ctx.reader.clone();
        let (applied, hash, records) = tokio::task::spawn_blocking(move || reader.state_digest())
            .await
            .map_err(|_| ApiError::new(Reason::InternalError, "digest task failed"))?
            .map_err(error::read)?;
        Ok(Response::new(StateDigestResponse {
            applied_index: applied,
            sha256: hex(&hash),
            records,
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        let p = principal_of(&req);
        self.record(p.as_ref(), "VerifyAudit", "-".into()).await?;
        let head = self.ctx.reader.audit_head().map_err(error::read)?;
        let result = self.ctx.reader.verify_audit().map_err(error::read)?;
        Ok(Response::new(match result {
            Ok(n) => VerifyAuditResponse {
                ok: true,
                records: n,
                error: String::new(),
                head_hash: hex(&head.hash),
            },
            Err(e) => VerifyAuditResponse {
                ok: false,
                records: head.seq,
                error: e.to_string(),
                head_hash: hex(&head.hash),
            },
        }))
    }
}
