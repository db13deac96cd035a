//! Automatic repair (data version 11): each [`RepairChange`] updates the
//! repair record and is audited in the same entry. The leader decides when
//! a member failed, when repair freezes and which spare replaces which dead
//! voter (`crate::repair`); the rules here keep the record whole: no
//! replacement starts while repair is frozen or another one is under way,
//! and one is done only once the membership shows it (then the old node's
//! removal is recorded, so the members refuse it).

use super::{Decided, Tx};
use crate::state::audit::AuditEvent;
use crate::state::command::{CommandResult, Refusal};
use crate::state::keys;
use crate::state::member::{Failure, Frozen, MemberStep, Repair, RepairActor, RepairChange, RepairRecord};
use crate::state::ops::View;

fn refused(why: impl Into<String>) -> Decided {
    Ok(Err(Refusal::Repair(why.into())))
}

fn keep_last<T>(v: &mut Vec<T>) {
    let over = v.len().saturating_sub(RepairRecord::KEEP);
    v.drain(..over);
}

impl Tx<'_> {
    pub(super) fn change_repair(&mut self, change: RepairChange, actor: &RepairActor) -> Decided {
        let mut record = self.repair_record()?.unwrap_or_default();
        let (action, target, result) = match change {
            RepairChange::Failed { node, what } => {
                let result = format!("node {node} failed: {what}");
                record.failures.push(Failure {
                    node,
                    what,
                    at_ms: actor.at_ms,
                });
                keep_last(&mut record.failures);
                ("repair-failure", format!("node {node}"), result)
            }
            RepairChange::Freeze { reason } => {
                if let Some(f) = &record.frozen {
                    return refused(format!("repair is frozen already: {}", f.reason));
                }
                record.frozen = Some(Frozen {
                    reason: reason.clone(),
                    at_ms: actor.at_ms,
                });
                (
                    "repair-frozen",
                    "automatic repair".to_string(),
                    format!("repair frozen: {reason}"),
                )
            }
            RepairChange::Start { old, new, role } => {
                if let Some(f) = &record.frozen {
                    return refused(format!("repair frozen: {}", f.reason));
                }
                if let Some(r) = record.in_progress() {
                    return refused(format!("the replacement of node {} is under way", r.old));
                }
                record.repairs.push(Repair {
                    old,
                    new,
                    role,
                    started_ms: actor.at_ms,
                    ended_ms: None,
                    outcome: String::new(),
                });
                keep_last(&mut record.repairs);
                (
                    "repair-start",
                    format!("node {old}"),
                    format!("replacing dead voter {old} ({}) by spare {new}", role.as_str()),
                )
            }
            RepairChange::Done { old, new } => {
                let Some(r) = record
                    .in_progress()
                    .cloned()
                    .filter(|r| r.old == old && r.new == new)
                else {
                    return refused(format!("no replacement of node {old} by node {new} is under way"));
                };
                let step = MemberStep::Replace {
                    old,
                    new,
                    role: r.role,
                };
                let by = format!("repair:{}", r.started_ms);
                if let Err(why) = self.record_membership(&step, &by, actor.at_ms)? {
                    return refused(why.to_string());
                }
                let outcome = format!(
                    "done: spare {new} is a voter ({}), node {old} is removed",
                    r.role.as_str()
                );
                let last = record.repairs.last_mut().expect("in progress");
                last.ended_ms = Some(actor.at_ms);
                last.outcome = outcome.clone();
                ("repair-done", format!("node {old}"), outcome)
            }
            RepairChange::Cancel { old, why } => {
                let Some(last) = record
                    .repairs
                    .last_mut()
                    .filter(|r| r.ended_ms.is_none() && r.old == old)
                else {
                    return refused(format!("no replacement of node {old} is under way"));
                };
                last.ended_ms = Some(actor.at_ms);
                last.outcome = format!("cancelled, nothing changed: {why}");
                (
                    "repair-cancelled",
                    format!("node {old}"),
                    format!("replacement of node {old} cancelled, nothing changed: {why}"),
                )
            }
        };
        self.put(keys::repair(), &record);
        let event = AuditEvent {
            time_ms: actor.at_ms,
            identity: format!("node:{}", actor.node),
            source: "-".into(),
            action: action.to_string(),
            target,
            result,
            node: actor.node,
        };
        self.append_audit(vec![event])?.ok();
        Ok(Ok(CommandResult::Repair(Box::new(record))))
    }
}
