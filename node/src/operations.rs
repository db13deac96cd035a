//! The leader's executor of two-person operations: it expires proposals
//! nobody approved in time and executes approved ones, one replicated step at
//! a time (`OpChange::Step`, decided and recorded by the state machine with
//! the step's effect in one entry). It keeps no state of its own: every tick
//! it reads the operations as applied here, so a new leader simply goes on
//! where the record says the old one stopped; a step proposed twice (by an
//! old and a new leader) is refused the second time (`NotNextStep`).

use std::sync::Arc;
use std::time::Duration;

use crate::ctx::Ctx;
use crate::state::command::{Command, CommandResult};
use crate::state::ops::{Actor, OpChange, OpStatus, Operation};

/// How often the leader looks for work.
const TICK: Duration = Duration::from_millis(250);
/// The most steps one tick executes of one operation.
const STEPS_PER_TICK: usize = 64;

/// Runs until the node stops.
pub async fn run_executor(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
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
            advance(&ctx, op).await;
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
async fn advance(ctx: &Ctx, mut op: Operation) {
    for _ in 0..STEPS_PER_TICK {
        let id = op.id.clone();
        let change = match op.status {
            OpStatus::Proposed if crate::clock::now_ms() > op.expires_ms => OpChange::Expire {
                id,
                actor: actor(ctx),
            },
            // Fail closed: no kind of this build plans a pre-operation
            // backup, so one that asks for it (written by a newer build)
            // never runs without it.
            OpStatus::Approved if op.plan.backup_first && op.backup_id.is_none() => OpChange::Fail {
                id,
                reason: "this node cannot take the pre-operation backup the plan needs".into(),
                actor: actor(ctx),
            },
            OpStatus::Approved | OpStatus::Executing => OpChange::Step {
                id,
                index: op.steps.len() as u32,
                actor: actor(ctx),
            },
            _ => return,
        };
        match ctx.proposer.propose(Command::Ops(change)).await {
            Ok(CommandResult::Operation(next)) => {
                log_transition(&next);
                if next.status.ended() || next.status == OpStatus::Proposed {
                    return;
                }
                op = *next;
            }
            Ok(CommandResult::Refused(r)) => {
                // Someone else moved it meanwhile (an old leader, an
                // approval): the next tick reads it again.
                tracing::debug!(operation = %op.id, refusal = %r, "operation change refused");
                return;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(operation = %op.id, error = %e, "operation change not committed; retried");
                return;
            }
        }
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
