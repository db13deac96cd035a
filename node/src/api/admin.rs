//! `mailvault.v1.Admin`: tenants, node status and snapshots.

use std::sync::Arc;
use std::time::Duration;

use mailvault_proto::v1::admin_server::Admin;
use mailvault_proto::v1::*;
use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::command::{Command, CommandResult};
use crate::ctx::{forwarded, Ctx, Route};
use crate::{names, status};

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
        if let Route::Forward(ch) = self.ctx.route(req.metadata())? {
            return self
                .ctx
                .admin_client(ch)
                .create_tenant(forwarded(req.into_inner()))
                .await;
        }
        let r = req.into_inner();
        names::tenant(&r.tenant).map_err(status::name)?;
        let key = self.ctx.keyring.generate(&r.tenant, 1).map_err(status::crypto)?;
        match self
            .ctx
            .proposer
            .propose(Command::CreateTenant {
                tenant: r.tenant,
                key,
            })
            .await
            .map_err(status::propose)?
        {
            CommandResult::Refused(refusal) => Err(status::refusal(refusal)),
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
        let purge = req.into_inner().purge_log;
        let raft = &self.ctx.raft;
        let applied = raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        raft.trigger()
            .snapshot()
            .await
            .map_err(|_| Status::unavailable("raft stopped"))?;
        let wait = raft.wait(Some(Duration::from_secs(30)));
        let m = wait
            .metrics(
                |m| m.snapshot.map(|l| l.index).unwrap_or(0) >= applied,
                "snapshot built",
            )
            .await
            .map_err(|e| Status::deadline_exceeded(format!("snapshot not built in time: {e}")))?;
        let snapshot_index = m.snapshot.map(|l| l.index).unwrap_or(0);
        let mut purged_index = m.purged.map(|l| l.index).unwrap_or(0);
        if purge && snapshot_index > 0 {
            raft.trigger()
                .purge_log(snapshot_index)
                .await
                .map_err(|_| Status::unavailable("raft stopped"))?;
            let m = raft
                .wait(Some(Duration::from_secs(30)))
                .metrics(
                    |m| m.purged.map(|l| l.index).unwrap_or(0) >= snapshot_index,
                    "log purged",
                )
                .await
                .map_err(|e| Status::deadline_exceeded(format!("log not purged in time: {e}")))?;
            purged_index = m.purged.map(|l| l.index).unwrap_or(0);
        }
        Ok(Response::new(TriggerSnapshotResponse {
            snapshot_index,
            purged_index,
        }))
    }
}
