//! Two-person operations: each [`OpChange`] moves one operation through its
//! lifecycle (see `state/ops.rs`), decided here against the state as it is
//! when the entry applies, and audited in the same entry — so a transition
//! and its audit record are never one without the other.
//!
//! The rules that make it two-person are here, not only in the handlers: an
//! approval is refused unless it comes from another identity with another
//! key, for the plan hash recorded, with a signature that verifies against
//! the approver's certificate, before the proposal expired and while the
//! fence still matches the state. A step is executed atomically with its
//! record, so a leader that dies mid-operation leaves each step whole or
//! absent, and the next leader goes on from the record.

use super::{Decided, Res, Tx};
use crate::state::audit::{AuditEvent, AuditSettings};
use crate::state::backup::BackupRecord;
use crate::state::command::{CommandResult, Refusal};
use crate::state::keys;
use crate::state::member::{MemberRecord, MemberStep, Removal, RepairRecord};
use crate::state::ops::{
    hex, rehearse, Actor, ExportApproval, LeadershipPin, MessageFacts, OpChange, OpRefusal, OpStatus,
    Operation, Step, StepResult, View,
};
use crate::state::policy::IdentityPolicy;
use crate::state::records::{MailboxRecord, TenantRecord};
use crate::state::types::StoredMembership;

impl View for Tx<'_> {
    type Error = rocksdb::Error;

    fn policy(&self, identity: &str) -> Res<Option<IdentityPolicy>> {
        self.get(&keys::identity(identity))
    }

    fn tenant(&self, tenant: &str) -> Res<Option<TenantRecord>> {
        self.get(&keys::tenant(tenant))
    }

    fn mailbox(&self, tenant: &str, mailbox: &str) -> Res<Option<MailboxRecord>> {
        self.get(&keys::mailbox(tenant, mailbox))
    }

    fn backup(&self, id: &str) -> Res<Option<BackupRecord>> {
        self.get(&keys::backup(id))
    }

    fn audit_settings(&self) -> Res<Option<AuditSettings>> {
        self.get(&keys::audit_settings())
    }

    fn leadership_pin(&self) -> Res<Option<LeadershipPin>> {
        self.get(&keys::leadership_pin())
    }

    fn membership(&self) -> Res<Option<StoredMembership>> {
        self.get(keys::META_MEMBERSHIP)
    }

    fn member_record(&self, id: u64) -> Res<Option<MemberRecord>> {
        self.get(&keys::member_record(id))
    }

    fn repair_record(&self) -> Res<Option<RepairRecord>> {
        self.get(&keys::repair())
    }

    fn message_facts(&self, tenant: &str, mailbox: &str) -> Res<Vec<Result<MessageFacts, u32>>> {
        let mut out = Vec::new();
        for (k, record) in self.message_records(tenant, mailbox)? {
            let uid = keys::uid_of_message_key(&k).unwrap_or_default();
            out.push(match record {
                Some(m) if m.uid == uid => Ok(MessageFacts::of(&m)),
                _ => Err(uid),
            });
        }
        Ok(out)
    }
}

fn refused(r: OpRefusal) -> Decided {
    Ok(Err(Refusal::Operation(r)))
}

/// The audit event of an operation's transition.
fn event(actor: &Actor, action: &str, op: &Operation, result: String) -> AuditEvent {
    AuditEvent {
        time_ms: actor.at_ms,
        identity: actor.identity.clone(),
        source: actor.source.clone(),
        action: action.to_string(),
        target: format!("{} {} {}", op.id, op.kind.name(), op.kind.target()),
        result,
        node: actor.node,
    }
}

impl Tx<'_> {
    fn operation(&self, id: &str) -> Res<Option<Operation>> {
        self.get(&keys::operation(id))
    }

    /// Stores the operation, audits the transition, and answers with it.
    fn transition(&mut self, op: Operation, event: AuditEvent) -> Decided {
        self.put(keys::operation(&op.id), &op);
        self.append_audit(vec![event])?.ok();
        Ok(Ok(CommandResult::Operation(Box::new(op))))
    }

    /// Rehearses the operation's kind again on the state as it is now: the
    /// fence changes since the plan, if any (a precondition that no longer
    /// holds is a change too).
    fn fence_moved(&self, op: &Operation) -> Res<Option<Vec<String>>> {
        Ok(match rehearse(self, &op.kind)? {
            Err(now) => Some(vec![now.to_string()]),
            Ok(plan) if plan.fence_hash() == op.plan.fence_hash() => None,
            Ok(plan) => Some(op.plan.fence_changes(&plan.fence)),
        })
    }

    pub(super) fn change_operation(&mut self, change: OpChange) -> Decided {
        if let OpChange::Propose { op, actor } = change {
            return self.propose_operation(*op, &actor);
        }
        let Some(mut op) = self.operation(change.id())? else {
            return refused(OpRefusal::NotFound);
        };
        let decided = |op: &Operation| refused(OpRefusal::Decided(op.status.as_str().into()));
        let pending = op.status == OpStatus::Proposed;
        match change {
            OpChange::Propose { .. } => unreachable!("handled above"),
            OpChange::Approve {
                plan_hash,
                approval,
                actor,
                ..
            } => {
                // Past its expiry it is refused as expired, whether or not
                // the leader marked it so yet.
                if op.status == OpStatus::Expired || (pending && actor.at_ms > op.expires_ms) {
                    return refused(OpRefusal::Expired);
                }
                if !pending {
                    return decided(&op);
                }
                if approval.by.identity == op.proposer.identity || actor.identity == op.proposer.identity {
                    return refused(OpRefusal::SelfApproval);
                }
                if approval.by.key == op.proposer.key {
                    return refused(OpRefusal::SameKey);
                }
                if plan_hash != op.plan_hash {
                    return refused(OpRefusal::PlanChanged);
                }
                if approval.by.identity != actor.identity {
                    return refused(OpRefusal::BadSignature("the approval is not the caller's".into()));
                }
                match mailvault_proto::approval::key_fingerprint(&approval.certificate) {
                    Ok(k) if k == approval.by.key => {}
                    _ => {
                        return refused(OpRefusal::BadSignature(
                            "the certificate is not the approver's".into(),
                        ))
                    }
                }
                let message = mailvault_proto::approval::message(&op.id, &hex(&op.plan_hash));
                if let Err(e) =
                    mailvault_proto::approval::verify(&approval.certificate, &message, &approval.signature)
                {
                    return refused(OpRefusal::BadSignature(e));
                }
                if let Some(changed) = self.fence_moved(&op)? {
                    return refused(OpRefusal::FenceChanged(changed));
                }
                op.status = OpStatus::Approved;
                op.approval = Some(approval);
                let e = event(&actor, "op-approve", &op, "approved".into());
                self.transition(op, e)
            }
            OpChange::Reject { reason, actor, .. } => {
                if !pending {
                    return decided(&op);
                }
                if actor.identity == op.proposer.identity {
                    return refused(OpRefusal::ProposerRejects);
                }
                op.status = OpStatus::Rejected;
                op.ended_ms = Some(actor.at_ms);
                op.outcome = format!("rejected by {}: {reason}", actor.identity);
                let e = event(&actor, "op-reject", &op, format!("rejected: {reason}"));
                self.transition(op, e)
            }
            OpChange::Cancel { actor, .. } => {
                if !pending {
                    return decided(&op);
                }
                if actor.identity != op.proposer.identity {
                    return refused(OpRefusal::NotProposer);
                }
                op.status = OpStatus::Cancelled;
                op.ended_ms = Some(actor.at_ms);
                op.outcome = format!("cancelled by {}", actor.identity);
                let e = event(&actor, "op-cancel", &op, "cancelled".into());
                self.transition(op, e)
            }
            OpChange::Expire { actor, .. } => {
                if !pending {
                    return decided(&op);
                }
                if actor.at_ms <= op.expires_ms {
                    return refused(OpRefusal::Precondition(
                        "the operation has not expired yet".into(),
                    ));
                }
                op.status = OpStatus::Expired;
                op.ended_ms = Some(actor.at_ms);
                op.outcome = "expired unapproved".into();
                let e = event(&actor, "op-expire", &op, "expired".into());
                self.transition(op, e)
            }
            OpChange::BackupTaken { backup, actor, .. } => {
                if op.status != OpStatus::Approved || !op.plan.backup_first || op.backup_id.is_some() {
                    return decided(&op);
                }
                op.backup_id = Some(backup.clone());
                op.status = OpStatus::Executing;
                let e = event(
                    &actor,
                    "op-backup",
                    &op,
                    format!("pre-operation backup {backup} verified"),
                );
                self.transition(op, e)
            }
            OpChange::Step { index, actor, .. } => self.execute_step(op, index, &actor),
            OpChange::Fail { reason, actor, .. } => {
                if !matches!(op.status, OpStatus::Approved | OpStatus::Executing) {
                    return decided(&op);
                }
                self.end_failed(op, &actor, reason)
            }
        }
    }

    fn propose_operation(&mut self, op: Operation, actor: &Actor) -> Decided {
        if self.operation(&op.id)?.is_some() {
            return refused(OpRefusal::IdTaken);
        }
        if op.status != OpStatus::Proposed
            || op.computed_plan_hash() != op.plan_hash
            || op.approval.is_some()
            || !op.steps.is_empty()
            || op.proposer.identity != actor.identity
        {
            return refused(OpRefusal::Precondition(
                "a proposal must be new and hash its own plan".into(),
            ));
        }
        // Planned on the state this entry applies to, or refused.
        match rehearse(self, &op.kind)? {
            Err(r) => return refused(r),
            Ok(plan) if plan != op.plan => {
                return refused(OpRefusal::FenceChanged(op.plan.fence_changes(&plan.fence)))
            }
            Ok(_) => {}
        }
        let e = event(actor, "op-propose", &op, format!("proposed: {}", op.reason));
        self.transition(op, e)
    }

    /// Step `index` of `op`, with its record; before the first, the fence
    /// again (the pre-operation backup and the approval came from this
    /// state). A step that cannot be made fails the operation, with nothing
    /// of it changed.
    fn execute_step(&mut self, mut op: Operation, index: u32, actor: &Actor) -> Decided {
        let ready = match op.status {
            OpStatus::Approved => !op.plan.backup_first,
            OpStatus::Executing => true,
            _ => false,
        };
        if !ready {
            return refused(OpRefusal::Decided(op.status.as_str().into()));
        }
        if index as usize != op.steps.len() || index as usize >= op.plan.steps.len() {
            return refused(OpRefusal::NotNextStep(index));
        }
        // A membership step's effect (a membership entry) comes before its
        // record and moves the membership the plan is fenced on: the
        // executor checks the fence before it makes the change, and the
        // record is accepted only once the membership shows it.
        let outside_membership = matches!(op.plan.steps[index as usize], Step::Membership(_));
        if index == 0 && !outside_membership {
            if let Some(changed) = self.fence_moved(&op)? {
                let why = format!(
                    "the state changed since the approval ({}); nothing was changed: propose it again",
                    changed.join("; ")
                );
                return self.end_failed(op, actor, why);
            }
        }
        let step = op.plan.steps[index as usize].clone();
        let done = match step.clone() {
            Step::Access(change) => match self.change_access(change)? {
                Ok(_) => Ok(format!("done: {}", step.describe())),
                Err(r) => Err(format!("{}: {r}", step.describe())),
            },
            Step::DeleteMailbox(m) => match self.delete_mailbox(&m.tenant, &m.mailbox)? {
                Ok(n) => Ok(format!("done: {} ({n} messages)", step.describe())),
                Err(r) => Err(format!("{}: {r}", step.describe())),
            },
            Step::ApproveExport(x) => {
                let approval = ExportApproval {
                    operation: op.id.clone(),
                    from_ms: actor.at_ms,
                    until_ms: x.until_ms,
                };
                let key = keys::export_approval(&x.exporter, &x.mailbox.tenant, &x.mailbox.mailbox);
                self.put(key, &approval);
                Ok(format!("done: {}", step.describe()))
            }
            Step::CreateMailbox(m) => {
                let uidvalidity = (actor.at_ms / 1000).clamp(1, i64::from(u32::MAX)) as u32;
                match self.create_mailbox(&m.tenant, &m.mailbox, uidvalidity)? {
                    Ok(_) => Ok(format!("done: {} (UIDVALIDITY {uidvalidity})", step.describe())),
                    Err(r) => Err(format!("{}: {r}", step.describe())),
                }
            }
            // Its effect came first (the executor ran it); the record says
            // what the mailbox holds now.
            Step::RestoreMailbox(r) => {
                let into = r.into_name();
                match self.get::<MailboxRecord>(&keys::mailbox(&into.tenant, &into.mailbox))? {
                    Some(m) => Ok(format!(
                        "done: {} ({into} holds {} messages, {} bytes)",
                        step.describe(),
                        m.messages,
                        m.total_bytes
                    )),
                    None => Err(format!("{}: mailbox {into} is gone", step.describe())),
                }
            }
            Step::AuditSettings { fail_closed } => {
                let settings = AuditSettings {
                    fail_closed,
                    operation: op.id.clone(),
                };
                self.put(keys::audit_settings(), &settings);
                Ok(format!("done: {}", step.describe()))
            }
            // Those still there; one an agent expunged meanwhile is gone
            // already.
            Step::Expunge { mailbox, uids } => {
                match self.expunge(&mailbox.tenant, &mailbox.mailbox, &uids)? {
                    Ok(CommandResult::Expunged { uids: removed, .. }) => Ok(format!(
                        "done: {} ({} expunged, {} gone already)",
                        step.describe(),
                        removed.len(),
                        uids.len() - removed.len()
                    )),
                    Ok(_) => Err(format!("{}: unexpected result", step.describe())),
                    Err(r) => Err(format!("{}: {r}", step.describe())),
                }
            }
            // Its effect came first (the election); only the node that
            // leads now records it, so the record says it took leadership.
            Step::Leadership { to, hold_ms } => {
                if actor.node != to {
                    return refused(OpRefusal::NotNextStep(index));
                }
                let pin = LeadershipPin {
                    node: to,
                    until_ms: actor.at_ms.saturating_add(hold_ms),
                    operation: op.id.clone(),
                };
                self.put(keys::leadership_pin(), &pin);
                Ok(format!(
                    "done: node {to} leads, and keeps leadership until {}",
                    crate::state::ops::time_text(pin.until_ms)
                ))
            }
            Step::Membership(change) => match self.record_membership(&change, &op.id, actor.at_ms)? {
                Ok(()) => Ok(format!("done: {}", change.describe())),
                Err(r) => return refused(r),
            },
            Step::Unfreeze => {
                let mut record = self.repair_record()?.unwrap_or_default();
                record.frozen = None;
                record.cleared_ms = actor.at_ms;
                self.put(keys::repair(), &record);
                Ok("done: automatic repair goes on".to_string())
            }
        };
        let at_ms = actor.at_ms;
        match done {
            Ok(result) => {
                op.steps.push(StepResult {
                    index,
                    at_ms,
                    ok: true,
                    result: result.clone(),
                });
                op.status = OpStatus::Executing;
                let mut audited = format!("step {index}: {result}");
                if op.steps.len() == op.plan.steps.len() {
                    op.status = OpStatus::Succeeded;
                    op.ended_ms = Some(at_ms);
                    op.outcome = format!("succeeded: {} steps done", op.steps.len());
                    audited.push_str("; succeeded");
                }
                let e = event(actor, "op-step", &op, audited);
                self.transition(op, e)
            }
            Err(why) => {
                op.steps.push(StepResult {
                    index,
                    at_ms,
                    ok: false,
                    result: why.clone(),
                });
                self.end_failed(op, actor, format!("step {index} failed: {why}"))
            }
        }
    }

    fn end_failed(&mut self, mut op: Operation, actor: &Actor, why: String) -> Decided {
        op.status = OpStatus::Failed;
        op.ended_ms = Some(actor.at_ms);
        op.outcome = format!("failed: {why}");
        let e = event(actor, "op-fail", &op, format!("failed: {why}"));
        self.transition(op, e)
    }
}

impl Tx<'_> {
    /// Records a membership change the executor made through Raft, once the
    /// applied membership shows it (refused otherwise: the executor makes
    /// it again, idempotently, and records it then). The member records
    /// keep each member's region and each removal, so a removed id is
    /// never a member again.
    pub(super) fn record_membership(
        &mut self,
        change: &MemberStep,
        by: &str,
        at_ms: i64,
    ) -> Res<Result<(), OpRefusal>> {
        let m = self.membership()?;
        let m = m.as_ref().map(|m| m.membership());
        let voter = |id: u64| m.is_some_and(|m| m.voter_ids().any(|v| v == id));
        let role = |id: u64| m.and_then(|m| m.get_node(&id)).map(|n| n.role);
        let not_yet = || {
            Ok(Err(OpRefusal::Precondition(
                "the membership does not show the change yet".into(),
            )))
        };
        match change {
            MemberStep::AddLearner { id, region, .. } => {
                if role(*id).is_none() {
                    return not_yet();
                }
                let record = MemberRecord {
                    region: region.clone(),
                    added_by: by.to_string(),
                    added_ms: at_ms,
                    removed: None,
                };
                self.put(keys::member_record(*id), &record);
            }
            MemberStep::Promote { id, role: r } => {
                if !voter(*id) || role(*id) != Some(*r) {
                    return not_yet();
                }
            }
            MemberStep::Replace { old, new, role: r } => {
                if !voter(*new) || role(*new) != Some(*r) || role(*old).is_some() {
                    return not_yet();
                }
                self.record_removal(*old, by, at_ms)?;
            }
            MemberStep::Remove { id } => {
                if role(*id).is_some() {
                    return not_yet();
                }
                self.record_removal(*id, by, at_ms)?;
            }
        }
        Ok(Ok(()))
    }

    pub(super) fn record_removal(&mut self, id: u64, by: &str, at_ms: i64) -> Res<()> {
        let mut record: MemberRecord = self.get(&keys::member_record(id))?.unwrap_or_default();
        record.removed = Some(Removal {
            by: by.to_string(),
            at_ms,
        });
        self.put(keys::member_record(id), &record);
        Ok(())
    }
}
