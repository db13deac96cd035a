//! The leader's executor of two-person operations: it expires proposals
//! nobody approved in time and executes approved ones, one replicated step at
//! a time (`OpChange::Step`, decided and recorded by the state machine with
//! the step's effect in one entry). It keeps no state of its own: every tick
//! it reads the operations as applied here, so a new leader simply goes on
//! where the record says the old one stopped; a step proposed twice (by an
//! old and a new leader) is refused the second time (`NotNextStep`). On every
//! node it also makes the audit recorder follow the replicated audit
//! settings.

use std::sync::Arc;
use std::time::Duration;

use crate::ctx::Ctx;
use crate::state::command::{Command, CommandResult};
use crate::state::member::MemberStep;
use crate::state::ops::{Actor, MailboxFromBackup, OpChange, OpKind, OpStatus, Operation, Step};

/// How often the leader looks for work.
const TICK: Duration = Duration::from_millis(250);
/// The most steps one tick executes of one operation.
const STEPS_PER_TICK: usize = 64;

/// Runs until the node stops.
pub async fn run_executor(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut asked = Asked::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Every node follows the replicated audit settings.
        match ctx.reader.audit_settings() {
            Ok(s) => ctx
                .audit
                .set_fail_closed(s.map_or(ctx.config.audit.fail_closed, |s| s.fail_closed)),
            Err(e) => tracing::warn!(error = %e, "cannot read the audit settings; retried"),
        }
        if !ctx.router.is_leader() {
            continue;
        }
        let ops = match ctx.reader.operations() {
            Ok(ops) => ops,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the operations; retried");
                continue;
            }
        };
        let paused = ctx.test_modes.pause_operation
            && ctx
                .config
                .data_dir
                .join(crate::test_modes::PAUSE_OPERATION_FILE)
                .exists();
        for op in ops.into_iter().filter(|o| !o.status.ended()) {
            if paused && op.status != OpStatus::Proposed {
                continue;
            }
            advance(&ctx, op, &mut asked).await;
        }
    }
}

fn actor(ctx: &Ctx) -> Actor {
    Actor {
        identity: format!("node:{}", ctx.id),
        source: "-".into(),
        node: ctx.id,
        at_ms: crate::clock::now_ms(),
    }
}

/// Takes `op` as far as it can go now.
async fn advance(ctx: &Ctx, mut op: Operation, asked: &mut Asked) {
    for _ in 0..STEPS_PER_TICK {
        let id = op.id.clone();
        let change = match op.status {
            OpStatus::Proposed if crate::clock::now_ms() > op.expires_ms => OpChange::Expire {
                id,
                actor: actor(ctx),
            },
            // A verified backup before the first step; nothing runs without it.
            OpStatus::Approved if op.plan.backup_first && op.backup_id.is_none() => {
                match pre_backup(ctx, &op).await {
                    Ok(backup) => OpChange::BackupTaken {
                        id,
                        backup,
                        actor: actor(ctx),
                    },
                    Err(Backup::Failed(why)) => OpChange::Fail {
                        id,
                        reason: format!("the pre-operation backup failed ({why}); nothing was changed"),
                        actor: actor(ctx),
                    },
                    Err(Backup::NotNow(why)) if approved_for(&op) > BACKUP_PATIENCE => OpChange::Fail {
                        id,
                        reason: format!(
                        "no pre-operation backup could be taken within {} min ({why}); nothing was changed",
                        BACKUP_PATIENCE.as_secs() / 60
                    ),
                        actor: actor(ctx),
                    },
                    Err(Backup::NotNow(why)) => {
                        tracing::warn!(operation = %op.id, why, "pre-operation backup not taken yet; retried");
                        return;
                    }
                }
            }
            OpStatus::Approved | OpStatus::Executing => {
                let index = op.steps.len();
                // A step whose effect runs outside one entry (a mailbox
                // restore) runs first, then is recorded.
                let outside = match op.plan.steps.get(index) {
                    Some(Step::RestoreMailbox(x)) => Some(restore(ctx, &op, x).await),
                    Some(Step::Leadership { to, .. }) => Some(lead(ctx, &op, *to, asked).await),
                    Some(Step::Membership(x)) => Some(change_members(ctx, &op, index, x).await),
                    _ => None,
                };
                if let Some(outcome) = outside {
                    match outcome {
                        Ok(()) => {}
                        Err(Outside::Failed(why)) => {
                            let change = OpChange::Fail {
                                id,
                                reason: format!("step {index} failed: {why}"),
                                actor: actor(ctx),
                            };
                            propose(ctx, &op, change).await;
                            return;
                        }
                        Err(Outside::NotNow(why)) if idle_for(&op) > patience(&op.plan.steps[index]) => {
                            let change = OpChange::Fail {
                                id,
                                reason: format!(
                                    "step {index} could not run within {} ({why}){}",
                                    humantime::format_duration(patience(&op.plan.steps[index])),
                                    match op.plan.steps[index] {
                                        Step::RestoreMailbox(_) => "; what it restored stays",
                                        Step::Membership(_) =>
                                            "; the membership is as the steps done left it",
                                        _ => "; nothing was changed",
                                    }
                                ),
                                actor: actor(ctx),
                            };
                            propose(ctx, &op, change).await;
                            return;
                        }
                        Err(Outside::NotNow(why)) => {
                            tracing::warn!(operation = %op.id, why, "a step could not run now; retried");
                            return;
                        }
                    }
                }
                OpChange::Step {
                    id,
                    index: index as u32,
                    actor: actor(ctx),
                }
            }
            _ => return,
        };
        match propose(ctx, &op, change).await {
            Some(next) if !next.status.ended() && next.status != OpStatus::Proposed => op = next,
            _ => return,
        }
    }
}

/// Proposes one change to `op`: the operation after it, or `None` when it
/// was refused (someone else moved it meanwhile — an old leader, an
/// approval — and the next tick reads it again) or did not commit.
async fn propose(ctx: &Ctx, op: &Operation, change: OpChange) -> Option<Operation> {
    match ctx.proposer.propose(Command::Ops(change)).await {
        Ok(CommandResult::Operation(next)) => {
            log_transition(&next);
            Some(*next)
        }
        Ok(CommandResult::Refused(r)) => {
            tracing::debug!(operation = %op.id, refusal = %r, "operation change refused");
            None
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(operation = %op.id, error = %e, "operation change not committed; retried");
            None
        }
    }
}

/// Why a step that runs outside one entry did not run.
enum Outside {
    /// It cannot succeed: the operation fails.
    Failed(String),
    /// Not now (a node unreachable, a leader change): tried again.
    NotNow(String),
}

/// How long a step that runs outside one entry may keep not running
/// before the operation fails.
fn patience(step: &Step) -> Duration {
    match step {
        Step::Leadership { .. } => TRANSFER_PATIENCE,
        Step::Membership(_) => MEMBERSHIP_PATIENCE,
        _ => BACKUP_PATIENCE,
    }
}

/// How long a leadership transfer waits for its target to take over.
const TRANSFER_PATIENCE: Duration = Duration::from_secs(60);
/// A target is asked to campaign at most this often.
const ASK_EVERY: Duration = Duration::from_secs(5);

/// When this node last asked a voter to campaign for an operation.
#[derive(Default)]
struct Asked(std::collections::HashMap<String, std::time::Instant>);

/// Runs a leadership transfer's effect: done once `to` leads (it is this
/// node, which then records the step); until then, the leader asks `to`
/// to campaign once it has caught up, every few seconds at most.
async fn lead(ctx: &Ctx, op: &Operation, to: u64, asked: &mut Asked) -> Result<(), Outside> {
    if to == ctx.id {
        asked.0.remove(&op.id);
        return Ok(());
    }
    let m = ctx.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    if !membership.voter_ids().any(|v| v == to) {
        return Err(Outside::Failed(format!("node {to} is no longer a voter")));
    }
    let addr = membership
        .get_node(&to)
        .map(|n| n.raft_addr.clone())
        .ok_or_else(|| Outside::Failed(format!("node {to} is no longer a member")))?;
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&to).cloned().flatten())
        .map(|l| l.index);
    let behind = m.last_log_index.unwrap_or(0).saturating_sub(matched.unwrap_or(0));
    if matched.is_none() || behind > crate::state::ops::MAX_BEHIND_FOR_TRANSFER {
        return Err(Outside::NotNow(format!(
            "node {to} is {behind} entries behind the leader"
        )));
    }
    if asked.0.get(&op.id).is_some_and(|t| t.elapsed() < ASK_EVERY) {
        return Err(Outside::NotNow(format!("node {to} was asked to campaign")));
    }
    asked.0.insert(op.id.clone(), std::time::Instant::now());
    tracing::info!(operation = %op.id, target = to, "asking a voter to take leadership for an operation");
    match ctx.handover.to(to, &addr).await {
        // The target, leading, records the step.
        Ok(Some(l)) if l == to => Err(Outside::NotNow(format!("node {to} leads; it records the step"))),
        Ok(_) => Err(Outside::NotNow(format!(
            "node {to} was asked to campaign and has not won yet"
        ))),
        Err(why) => Err(Outside::NotNow(why)),
    }
}

/// How long since the operation last moved (its last step, or its approval).
fn idle_for(op: &Operation) -> Duration {
    let at = op
        .steps
        .last()
        .map(|s| s.at_ms)
        .unwrap_or_else(|| op.approval.as_ref().map_or(op.created_ms, |a| a.at_ms));
    Duration::from_millis(crate::clock::now_ms().saturating_sub(at).max(0) as u64)
}

/// Runs a mailbox restore step on the node holding the backup (this one
/// too goes through its client port, as a node, so the holder checks the
/// operation and audits it alike). Always resuming: a run cut short by a
/// leader change adds only what is missing.
async fn restore(ctx: &Ctx, op: &Operation, x: &MailboxFromBackup) -> Result<(), Outside> {
    let node = x.found.node;
    let ch = ctx
        .router
        .member_channel(node)
        .ok_or_else(|| Outside::NotNow(format!("node {node} is not reachable")))?;
    tracing::info!(operation = %op.id, node, "restoring a mailbox for an operation");
    let mut req = tonic::Request::new(mailvault_proto::v1::RestoreMailboxRequest {
        backup_id: x.backup.clone(),
        tenant: x.from.tenant.clone(),
        mailbox: x.from.mailbox.clone(),
        new_mailbox: x.into.clone(),
        resume: true,
        operation: op.id.clone(),
        rehearse: false,
    });
    req.set_timeout(Duration::from_secs(3600));
    match mailvault_proto::v1::backups_client::BackupsClient::new(ch)
        .restore_mailbox(req)
        .await
    {
        Ok(_) => Ok(()),
        Err(s) => {
            let why = format!("node {node}: {}", s.message());
            match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
                | tonic::Code::Unknown => Err(Outside::NotNow(why)),
                _ if reason_of(&s).as_deref() == Some("WRITE_OUTCOME_UNKNOWN") => Err(Outside::NotNow(why)),
                _ => Err(Outside::Failed(why)),
            }
        }
    }
}

/// The stable reason of a mailvault error status, if it has one.
fn reason_of(s: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    s.get_details_error_info().map(|i| i.reason)
}

/// How long an approved operation waits for a node to take its backup
/// (the backup node unreachable, no duty holder) before it fails.
const BACKUP_PATIENCE: Duration = Duration::from_secs(600);

/// Why no pre-operation backup was taken.
enum Backup {
    /// Taking it failed: the operation fails.
    Failed(String),
    /// No node can take it right now: tried again.
    NotNow(String),
}

fn approved_for(op: &Operation) -> Duration {
    let at = op.approval.as_ref().map_or(op.created_ms, |a| a.at_ms);
    Duration::from_millis(crate::clock::now_ms().saturating_sub(at).max(0) as u64)
}

/// Takes the pre-operation backup on the node holding the backup duty (this
/// one, or over its client port, as a node): the backup id, once it is
/// verified and in the catalog. Everything committed before is in it.
async fn pre_backup(ctx: &Ctx, op: &Operation) -> Result<String, Backup> {
    let holder = ctx
        .backups
        .local_status()
        .duty
        .and_then(|d| d.holder)
        .ok_or_else(|| Backup::NotNow("no node holds the backup duty".into()))?;
    tracing::info!(operation = %op.id, node = holder, "taking the pre-operation backup");
    if holder == ctx.id {
        ctx.read_barrier()
            .await
            .map_err(|s| Backup::NotNow(s.message().to_string()))?;
        return ctx
            .backups
            .take(&format!("pre-operation backup of {}", op.id))
            .await
            .map(|e| e.id)
            .map_err(|e| Backup::Failed(e.to_string()));
    }
    let ch = ctx
        .router
        .member_channel(holder)
        .ok_or_else(|| Backup::NotNow(format!("node {holder} is not reachable")))?;
    let mut req = tonic::Request::new(mailvault_proto::v1::TakeBackupRequest {});
    req.set_timeout(Duration::from_secs(300));
    match mailvault_proto::v1::backups_client::BackupsClient::new(ch)
        .take_backup(req)
        .await
    {
        Ok(r) => r
            .into_inner()
            .backup
            .map(|b| b.id)
            .ok_or_else(|| Backup::Failed("the backup node answered without a backup".into())),
        Err(s) if s.code() == tonic::Code::Internal => Err(Backup::Failed(s.message().to_string())),
        Err(s) => Err(Backup::NotNow(format!("node {holder}: {}", s.message()))),
    }
}

fn log_transition(op: &Operation) {
    tracing::info!(
        operation = %op.id,
        kind = op.kind.name(),
        status = op.status.as_str(),
        steps_done = op.steps.len(),
        steps = op.plan.steps.len(),
        "operation advanced"
    );
    metrics::counter!("mailvault_operation_transitions_total", "status" => op.status.as_str()).increment(1);
}

/// How long a membership step may wait (a learner catching up, a leader
/// change) before the operation fails.
const MEMBERSHIP_PATIENCE: Duration = Duration::from_secs(1800);

/// Runs a membership step's effect through Raft (`crate::members`): done
/// once the membership shows it (a step whose change an earlier leader made
/// is only recorded). Before the first change the leader checks the fence
/// and rehearses the operation again with its members' health now: a
/// quorum lost since the approval fails the operation, with nothing changed.
async fn change_members(ctx: &Ctx, op: &Operation, index: usize, step: &MemberStep) -> Result<(), Outside> {
    if crate::members::shows(&ctx.raft, step) {
        return Ok(());
    }
    if index == 0 {
        let live = with_live_facts(&op.kind, ctx.membership_facts());
        match crate::state::ops::rehearse(&ctx.reader, &live) {
            Err(e) => return Err(Outside::NotNow(format!("cannot read the state: {e}"))),
            Ok(Err(r)) => return Err(Outside::Failed(format!("rehearsed again before the change: {r}"))),
            Ok(Ok(plan)) => {
                let changed = op.plan.fence_changes(&plan.fence);
                if !changed.is_empty() {
                    return Err(Outside::Failed(format!(
                        "the state changed since the approval ({})",
                        changed.join("; ")
                    )));
                }
            }
        }
    }
    tracing::info!(operation = %op.id, step = %step.describe(), "changing the membership for an operation");
    crate::members::make(ctx, step).await.map_err(|e| match e {
        crate::members::Change::NotNow(why) => Outside::NotNow(why),
        crate::members::Change::Failed(why) => Outside::Failed(why),
    })
}

/// The operation's kind with the members' health as the leader sees it now.
fn with_live_facts(kind: &OpKind, now: crate::state::member::MembershipFacts) -> OpKind {
    let mut kind = kind.clone();
    match &mut kind {
        OpKind::AddNode { seen, .. } | OpKind::RemoveNode { seen, .. } | OpKind::ReplaceNode { seen, .. } => {
            *seen = now
        }
        _ => {}
    }
    kind
}
