//! Automatic repair, on the leader: a voter not heard from for
//! `heal.replace_after_secs` is replaced by a healthy, caught-up spare —
//! the spare (a learner, so already caught up) becomes a voter in the dead
//! node's role and the dead node is removed, in one joint-consensus change
//! (`members::make`), each step an audit record (`Command::Repair`).
//!
//! Chain-failure prevention comes first: every member that goes down (or is
//! quarantined) is recorded as a failure, and all automatic repair freezes
//! when more than `heal.max_failures` fail within `heal.window_secs`, or
//! when a replacement would leave fewer healthy voters than a quorum plus
//! one — a network blip that makes half the cluster look dead must not make
//! the cluster "repair" itself into a disaster. The freeze is replicated
//! and lasts until a two-person `unfreeze` operation. A leader that cannot
//! hear a quorum of voters repairs nothing either (it could not commit it);
//! it says so itself (`Health::local_freeze`).
//!
//! Everything the loop decides is in the replicated record, so a new leader
//! goes on where the old one stopped: a replacement under way is finished
//! (the change is idempotent) or cancelled, with nothing changed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::ctx::Ctx;
use crate::state::command::{Command, CommandResult};
use crate::state::member::{quorum, MemberStep, RepairActor, RepairChange, RepairRecord, Role};

/// How often the leader looks.
const TICK: Duration = Duration::from_secs(1);
/// A replacement that has not committed for this long is cancelled.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// Runs until the node stops.
pub async fn run(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: BTreeSet<u64> = BTreeSet::new();
    loop {
        tick.tick().await;
        let record = match ctx.reader.repair_record() {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the repair record; retried");
                continue;
            }
        };
        if !ctx.router.is_leader() {
            ctx.health.set_local_freeze(None);
            publish(&ctx, &record);
            continue;
        }
        if let Err(why) = look(&ctx, record, &mut reported).await {
            tracing::warn!(why, "automatic repair: retried");
        }
        if let Ok(r) = ctx.reader.repair_record() {
            publish(&ctx, &r.unwrap_or_default());
        }
    }
}

/// The repair state as `/metrics` shows it on every node.
fn publish(ctx: &Ctx, record: &RepairRecord) {
    let frozen = record.frozen.is_some() || ctx.health.local_freeze().is_some();
    metrics::gauge!("mailvault_repair_frozen").set(if frozen { 1.0 } else { 0.0 });
    metrics::gauge!("mailvault_repair_in_progress").set(if record.in_progress().is_some() {
        1.0
    } else {
        0.0
    });
}

/// Why repair is frozen, as `status` says it (none: it is not).
pub fn frozen_reason(ctx: &Ctx, record: &RepairRecord) -> Option<String> {
    record
        .frozen
        .as_ref()
        .map(|f| f.reason.clone())
        .or_else(|| ctx.health.local_freeze())
}

async fn propose(ctx: &Ctx, change: RepairChange) -> Result<RepairRecord, String> {
    let actor = RepairActor {
        node: ctx.id,
        at_ms: crate::clock::now_ms(),
    };
    match ctx.proposer.propose(Command::Repair(change, actor)).await {
        Ok(CommandResult::Repair(r)) => Ok(*r),
        Ok(CommandResult::Refused(r)) => Err(format!("refused: {r}")),
        Ok(other) => Err(format!("unexpected result {other:?}")),
        Err(e) => Err(format!("not committed: {e}")),
    }
}

fn text(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// One look, as leader: note failures, freeze if the rules say so, go on
/// with a replacement under way, or start one.
async fn look(ctx: &Ctx, mut record: RepairRecord, reported: &mut BTreeSet<u64>) -> Result<(), String> {
    let heal = &ctx.config.heal;
    let views = ctx.health.views(&ctx.raft);
    let m = ctx.raft.metrics().borrow().membership_config.clone();
    let membership = m.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let now = crate::clock::now_ms();
    let window_ms = (heal.window_secs * 1000) as i64;
    let up = |id: u64| views.get(&id).and_then(|v| v.up) == Some(true);
    let down = |id: u64| views.get(&id).and_then(|v| v.up) == Some(false);

    // A leader that hears fewer than a quorum of voters changes nothing.
    let healthy = voters.iter().filter(|v| up(**v)).count();
    if healthy < quorum(voters.len()) {
        ctx.health.set_local_freeze(Some(format!(
            "the leader hears only {healthy} of {} voters (a quorum is {})",
            voters.len(),
            quorum(voters.len())
        )));
        return Ok(());
    }
    ctx.health.set_local_freeze(None);

    // Every member that went down is a failure, once per window.
    for (id, _) in membership.nodes() {
        let noted = record
            .failures
            .iter()
            .any(|f| f.node == *id && f.at_ms > now - window_ms);
        if down(*id) && !noted {
            let silent = views.get(id).map(|v| v.silent_for).unwrap_or_default();
            let what = format!("down: not heard from for {}", text(silent));
            tracing::warn!(node = id, what, "a member failed");
            record = propose(ctx, RepairChange::Failed { node: *id, what }).await?;
        }
    }

    // Too many failures within the window: freeze.
    if record.frozen.is_none() {
        let counted: BTreeSet<u64> = record
            .failures
            .iter()
            .filter(|f| f.at_ms > now - window_ms && f.at_ms > record.cleared_ms)
            .map(|f| f.node)
            .collect();
        if counted.len() > heal.max_failures as usize {
            let nodes: Vec<String> = counted.iter().map(|n| n.to_string()).collect();
            let reason = format!(
                "{} members failed within {} (at most {} allowed): nodes {}",
                counted.len(),
                text(Duration::from_secs(heal.window_secs)),
                heal.max_failures,
                nodes.join(", ")
            );
            tracing::warn!("repair frozen: {reason}");
            propose(ctx, RepairChange::Freeze { reason }).await?;
            return Ok(());
        }
    }
    if record.frozen.is_some() {
        return Ok(());
    }

    // A replacement under way: finish it, or cancel it.
    if let Some(r) = record.in_progress().cloned() {
        let step = MemberStep::Replace {
            old: r.old,
            new: r.new,
            role: r.role,
        };
        if !crate::members::shows(&ctx.raft, &step) {
            let why = if up(r.old) {
                Some(format!("node {} is back", r.old))
            } else if !up(r.new) {
                Some(format!("spare {} is down", r.new))
            } else if now - r.started_ms > GIVE_UP_AFTER.as_millis() as i64 {
                Some(format!(
                    "the change did not commit within {}",
                    text(GIVE_UP_AFTER)
                ))
            } else {
                None
            };
            if let Some(why) = why {
                tracing::warn!(old = r.old, new = r.new, why, "replacement cancelled");
                metrics::counter!("mailvault_repairs_total", "outcome" => "cancelled").increment(1);
                propose(ctx, RepairChange::Cancel { old: r.old, why }).await?;
                return Ok(());
            }
            tracing::info!(old = r.old, new = r.new, "replacing a dead voter by a spare");
            if let Err(e) = crate::members::make(ctx, &step).await {
                return Err(match e {
                    crate::members::Change::NotNow(w) | crate::members::Change::Failed(w) => w,
                });
            }
        }
        propose(
            ctx,
            RepairChange::Done {
                old: r.old,
                new: r.new,
            },
        )
        .await?;
        tracing::warn!(old = r.old, new = r.new, "dead voter replaced by a spare");
        metrics::counter!("mailvault_repairs_total", "outcome" => "done").increment(1);
        return Ok(());
    }
    if heal.replace_after_secs == 0 {
        return Ok(());
    }

    // A voter silent for replace_after, and a healthy caught-up spare.
    let replace_after = Duration::from_secs(heal.replace_after_secs);
    let dead = voters
        .iter()
        .copied()
        .filter(|v| down(*v) && views.get(v).is_some_and(|x| x.silent_for >= replace_after))
        .min();
    let Some(old) = dead else {
        reported.clear();
        return Ok(());
    };
    let spare = membership
        .nodes()
        .filter(|(id, n)| !voters.contains(id) && n.role == Role::Spare && up(**id))
        .map(|(id, _)| *id)
        .find(|id| crate::members::caught_up(&ctx.raft, *id).is_ok());
    let Some(new) = spare else {
        if reported.insert(old) {
            tracing::warn!(
                node = old,
                "a voter is down and no healthy, caught-up spare can replace it"
            );
        }
        return Ok(());
    };
    let mut after: Vec<u64> = voters.iter().copied().filter(|v| *v != old).collect();
    after.push(new);
    let healthy_after = after.iter().filter(|v| up(**v)).count();
    if healthy_after < quorum(after.len()) + 1 {
        let reason = format!(
            "replacing node {old} would leave {healthy_after} healthy voters of {} (a quorum plus one is {})",
            after.len(),
            quorum(after.len()) + 1
        );
        tracing::warn!("repair frozen: {reason}");
        propose(ctx, RepairChange::Freeze { reason }).await?;
        return Ok(());
    }
    let role = membership.get_node(&old).map_or(Role::Standby, |n| n.role);
    tracing::warn!(
        old,
        new,
        role = role.as_str(),
        "starting the replacement of a dead voter"
    );
    propose(ctx, RepairChange::Start { old, new, role }).await?;
    // Made at once; a failure leaves it under way for the next look.
    let step = MemberStep::Replace { old, new, role };
    if crate::members::make(ctx, &step).await.is_ok() {
        propose(ctx, RepairChange::Done { old, new }).await?;
        tracing::warn!(old, new, "dead voter replaced by a spare");
        metrics::counter!("mailvault_repairs_total", "outcome" => "done").increment(1);
    }
    Ok(())
}
