//! `mailvault.v1.Cluster`: this node's status, its state digest, snapshots.

use std::sync::Arc;
use std::time::Duration;

use mailvault_proto::v1::cluster_server::Cluster;
use mailvault_proto::v1::*;
use openraft::ServerState;
use tonic::{Request, Response, Status};

use super::operator::{hex, record};
use crate::ctx::Ctx;
use crate::error::{self, ApiError, Reason};
use crate::forward::principal_of;
use crate::state::ops::OpStatus;

/// The cluster service.
#[derive(Clone)]
pub struct ClusterService {
    ctx: Arc<Ctx>,
}

impl ClusterService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> ClusterService {
        ClusterService { ctx }
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

fn raft_stopped() -> ApiError {
    ApiError::new(Reason::ShuttingDown, "raft stopped")
}

impl ClusterService {
    /// The bootstrap operators and the operations under way, as applied here.
    fn operations_status(&self) -> OperationsStatus {
        let operators = self.ctx.config.access.operators.clone();
        let ops = self.ctx.reader.operations().unwrap_or_default();
        let count = |f: fn(OpStatus) -> bool| ops.iter().filter(|o| f(o.status)).count() as u32;
        OperationsStatus {
            warning: match operators.len() {
                0 | 1 => format!(
                    "{} bootstrap operator(s) configured: two-person operations need two; no operation \
                     can be approved until a second operator exists",
                    operators.len()
                ),
                _ => String::new(),
            },
            bootstrap_operators: operators,
            pending: count(|s| s == OpStatus::Proposed),
            executing: count(|s| matches!(s, OpStatus::Approved | OpStatus::Executing)),
        }
    }

    /// The backup duty and this node's backups, from the catalog as applied
    /// here (status never waits on the cluster).
    fn backup_status(&self) -> BackupStatus {
        let local = self.ctx.backups.local_status();
        let newest = self.ctx.reader.newest_backup().ok().flatten();
        let duty = local.duty;
        let o = &local.offsite;
        BackupStatus {
            duty_node: duty.and_then(|d| d.holder).unwrap_or(0),
            standing_in: duty.is_some_and(|d| d.standing_in),
            newest_id: newest.as_ref().map(|r| r.entry.id.clone()).unwrap_or_default(),
            newest_at_ms: newest.as_ref().map_or(0, |r| r.entry.taken_at_ms),
            newest_node: newest.as_ref().map_or(0, |r| r.entry.node),
            local_backups: self.ctx.backups.local_backups().len() as u32,
            next_due_ms: local.next_due_ms.unwrap_or(0),
            last_failure_ms: local.last_failure.as_ref().map_or(0, |f| f.0),
            last_failure: local.last_failure.map(|f| f.1).unwrap_or_default(),
            shipped_id: o.last_shipped.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
            shipped_at_ms: o.last_shipped.as_ref().map_or(0, |s| s.1),
            restorable_id: o.restorable.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
            restorable_at_ms: o.restorable.as_ref().map_or(0, |s| s.1),
            drill_id: o.last_drill.as_ref().map(|d| d.0.clone()).unwrap_or_default(),
            drill_at_ms: o.last_drill.as_ref().map_or(0, |d| d.1.at_ms),
            drill_passed: o.last_drill.as_ref().is_some_and(|d| d.1.passed),
            drill_problem: o
                .last_drill
                .as_ref()
                .map(|d| d.1.problem.clone())
                .unwrap_or_default(),
            offsite_stale: o.stale,
            next_ship_ms: local.next_ship_ms.unwrap_or(0),
            offsite: self.ctx.backups.offsite().url().to_string(),
        }
    }
}

impl ClusterService {
    /// Automatic repair as this node sees it (the replicated record, and a
    /// leader's own freeze when it hears no quorum).
    fn repair_status(&self) -> mailvault_proto::v1::RepairStatus {
        let record = self.ctx.reader.repair_record().ok().flatten().unwrap_or_default();
        let reason = crate::repair::frozen_reason(&self.ctx, &record);
        let last = record.repairs.iter().rev().find(|r| r.ended_ms.is_some());
        mailvault_proto::v1::RepairStatus {
            frozen: reason.is_some(),
            reason: reason.unwrap_or_default(),
            frozen_ms: record.frozen.as_ref().map_or(0, |f| f.at_ms),
            under_way: record
                .in_progress()
                .map(|r| {
                    format!(
                        "replacing node {} by spare {} ({})",
                        r.old,
                        r.new,
                        r.role.as_str()
                    )
                })
                .unwrap_or_default(),
            last: last
                .map(|r| format!("node {} by spare {}: {}", r.old, r.new, r.outcome))
                .unwrap_or_default(),
            last_ms: last.and_then(|r| r.ended_ms).unwrap_or(0),
            failures: record
                .failures
                .iter()
                .filter(|f| f.at_ms > record.cleared_ms)
                .filter(|f| {
                    f.at_ms > crate::clock::now_ms() - (self.ctx.config.heal.window_secs * 1000) as i64
                })
                .map(|f| {
                    format!(
                        "node {}: {} ({})",
                        f.node,
                        f.what,
                        crate::state::ops::time_text(f.at_ms)
                    )
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn node_status(
        &self,
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let m = self.ctx.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let views = self.ctx.health.views(&self.ctx.raft);
        let records: std::collections::BTreeMap<u64, _> = self
            .ctx
            .reader
            .member_records()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let members = membership
            .nodes()
            .map(|(id, n)| {
                let v = views.get(id).cloned().unwrap_or_default();
                let region = match records.get(id) {
                    Some(r) if !r.region.is_empty() => r.region.clone(),
                    _ if *id == self.ctx.id => self.ctx.health.region().to_string(),
                    _ => v.seen.region.clone(),
                };
                Member {
                    id: *id,
                    role: n.role.as_str().to_string(),
                    client_addr: n.client_addr.clone(),
                    raft_addr: n.raft_addr.clone(),
                    ops_addr: n.ops_addr.clone(),
                    voter: voters.contains(id),
                    region,
                    health: match v.up {
                        Some(true) => "up",
                        Some(false) => "down",
                        None => "unknown",
                    }
                    .to_string(),
                    lag_entries: v.behind.map_or(-1, |b| b as i64),
                    lag_secs: v.lag_secs.unwrap_or(-1.0),
                    last_contact_ms: match *id == self.ctx.id {
                        true => crate::clock::now_ms(),
                        false => v.seen.last_contact_ms,
                    },
                }
            })
            .collect();
        let role = membership
            .get_node(&self.ctx.id)
            .map_or(self.ctx.config.me().role, |n| n.role);
        Ok(Response::new(NodeStatusResponse {
            id: self.ctx.id,
            role: role.as_str().to_string(),
            membership: self.ctx.router.membership().to_string(),
            region: self.ctx.health.region().to_string(),
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
            workers: self
                .ctx
                .workers
                .statuses()
                .into_iter()
                .map(|w| Worker {
                    name: w.name.to_string(),
                    state: w.state.as_str().to_string(),
                    detail: match w.state {
                        crate::workers::State::Failed(why) => why,
                        _ => String::new(),
                    },
                    since_ms: w.since_ms,
                })
                .collect(),
            damaged: self
                .ctx
                .damage
                .list()
                .into_iter()
                .map(|d| DamagedMessage {
                    tenant: d.tenant,
                    mailbox: d.mailbox,
                    uid: d.uid,
                    part: d.part.as_str().to_string(),
                    found_ms: d.found_ms,
                })
                .collect(),
            backup: Some(self.backup_status()),
            operations: Some(self.operations_status()),
            repair: Some(self.repair_status()),
            audit_fail_closed: self.ctx.audit.fail_closed(),
            leadership_held: self
                .ctx
                .reader
                .leadership_pin()
                .ok()
                .flatten()
                .filter(|p| p.until_ms > crate::clock::now_ms())
                .map(|p| mailvault_proto::v1::LeadershipHold {
                    node_id: p.node,
                    until_ms: p.until_ms,
                    operation: p.operation,
                }),
        }))
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

    async fn trigger_snapshot(
        &self,
        req: Request<TriggerSnapshotRequest>,
    ) -> Result<Response<TriggerSnapshotResponse>, Status> {
        let p = principal_of(&req);
        let purge = req.into_inner().purge_log;
        record(
            &self.ctx,
            p.as_ref(),
            "TriggerSnapshot",
            format!("purge_log={purge}"),
        )
        .await?;
        let raft = &self.ctx.raft;
        let applied = raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        raft.trigger().snapshot().await.map_err(|_| raft_stopped())?;
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
                .map_err(|_| raft_stopped())?;
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
}
