//! Changes of the membership through Raft, shared by the two-person
//! membership operations (`crate::operations`) and automatic repair
//! (`crate::repair`). Each change is idempotent: [`shows`] tells whether the
//! membership already has it, and [`make`] makes only what is missing (a
//! role first, then the voters), so a leader that takes over half-way
//! simply makes it again.

use std::collections::BTreeSet;

use openraft::ChangeMembers;

use crate::ctx::Ctx;
use crate::state::member::MemberStep;
use crate::state::types::{Member, Raft};

/// Why a change was not made.
pub enum Change {
    /// Not now (a learner catching up, a change in progress, no quorum):
    /// tried again.
    NotNow(String),
    /// It cannot be made (a member gone).
    Failed(String),
}

/// Whether the membership, as this node knows it, shows `step` done.
pub fn shows(raft: &Raft, step: &MemberStep) -> bool {
    let m = raft.metrics().borrow().membership_config.clone();
    let m = m.membership();
    let voter = |id: u64| m.voter_ids().any(|v| v == id);
    let role = |id: u64| m.get_node(&id).map(|n| n.role);
    match step {
        MemberStep::AddLearner { id, .. } => role(*id).is_some(),
        MemberStep::Promote { id, role: r } => voter(*id) && role(*id) == Some(*r),
        MemberStep::Replace { old, new, role: r } => {
            voter(*new) && role(*new) == Some(*r) && role(*old).is_none()
        }
        MemberStep::Remove { id } => role(*id).is_none(),
    }
}

/// Whether learner `id` is caught up enough to vote (as the leader sees it).
pub fn caught_up(raft: &Raft, id: u64) -> Result<(), String> {
    let m = raft.metrics().borrow().clone();
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned().flatten())
        .map(|l| l.index);
    let behind = m.last_log_index.unwrap_or(0).saturating_sub(matched.unwrap_or(0));
    match matched.is_some() && behind <= crate::state::ops::MAX_BEHIND_FOR_TRANSFER {
        true => Ok(()),
        false => Err(format!(
            "node {id} is {behind} entries behind; it catches up first"
        )),
    }
}

/// Makes `step` through Raft, as the leader: only what the membership does
/// not show yet. Returns once the change is committed and applied.
pub async fn make(ctx: &Ctx, step: &MemberStep) -> Result<(), Change> {
    let m = ctx.raft.metrics().borrow().membership_config.clone();
    let membership = m.membership().clone();
    if membership.get_joint_config().len() > 1 {
        return Err(Change::NotNow("a membership change is in progress".into()));
    }
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let role_of = |id: u64| membership.get_node(&id).map(|n| n.role);
    let with_role = |id: u64, role| -> Result<Member, Change> {
        let mut n = membership
            .get_node(&id)
            .cloned()
            .ok_or_else(|| Change::Failed(format!("node {id} is not a member any more")))?;
        n.role = role;
        Ok(n)
    };
    let committed = |r: Result<_, openraft::error::RaftError<u64, _>>| {
        r.map(|_| ())
            .map_err(|e| Change::NotNow(format!("the membership change did not commit: {e}")))
    };
    match step {
        MemberStep::AddLearner { id, member, .. } => {
            committed(ctx.raft.add_learner(*id, member.clone(), false).await)
        }
        MemberStep::Promote { id, role } => {
            caught_up(&ctx.raft, *id).map_err(Change::NotNow)?;
            if role_of(*id) != Some(*role) {
                set_node(&ctx.raft, *id, with_role(*id, *role)?).await?;
            }
            committed(
                ctx.raft
                    .change_membership(ChangeMembers::AddVoterIds([*id].into()), true)
                    .await,
            )
        }
        MemberStep::Replace { old, new, role } => {
            caught_up(&ctx.raft, *new).map_err(Change::NotNow)?;
            if role_of(*new) != Some(*role) {
                set_node(&ctx.raft, *new, with_role(*new, *role)?).await?;
            }
            let mut next = voters.clone();
            next.remove(old);
            next.insert(*new);
            committed(
                ctx.raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(next), false)
                    .await,
            )
        }
        MemberStep::Remove { id } => {
            let change = match voters.contains(id) {
                true => ChangeMembers::RemoveVoters([*id].into()),
                false => ChangeMembers::RemoveNodes([*id].into()),
            };
            committed(ctx.raft.change_membership(change, false).await)
        }
    }
}

/// Updates one member's role in the membership (its addresses unchanged).
async fn set_node(raft: &Raft, id: u64, node: Member) -> Result<(), Change> {
    raft.change_membership(ChangeMembers::SetNodes([(id, node)].into()), true)
        .await
        .map(|_| ())
        .map_err(|e| Change::NotNow(format!("the role change did not commit: {e}")))
}
