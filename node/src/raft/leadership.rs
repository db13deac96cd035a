//! Leadership placement: which node leads, and how leadership gets there.
//!
//! * **Handing over.** The leader asks a better-placed voter to take over once
//!   that voter's log matches its own and the leader has led for 10 s: the
//!   active node from anyone, a standby from a backup, by a [`Handover`]:
//!   writes wait until the voter has the whole log, and with more than three
//!   voters the leader goes silent for a lease first, so that the followers
//!   grant the vote; then the voter campaigns (peer RPC `Campaign`). A
//!   leader that leads again after handing over counts the handover as
//!   failed and waits twice as long before the next (5 s doubling to about
//!   10 min).
//! * **Held by a transfer.** While a two-person leadership transfer holds
//!   leadership on a voter (`Hold`, read from the replicated state), that
//!   voter is the best placed, whatever the roles: the leader keeps it if it
//!   is that voter, and hands it to that voter otherwise (one that failed
//!   and returned). When the hold ends, the roles decide again.
//! * **Last resort.** A backup voter never campaigns on its own. But when it
//!   cannot reach a leader that confirms its leadership for several election
//!   timeouts, it campaigns: its log may be the only complete one (a write
//!   committed by the old leader and the backup alone, before the standby had
//!   it), and then no standby can win a vote. Without this the cluster would
//!   stay leaderless until the old leader came back. Once the standby has
//!   caught up, the backup hands leadership over again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::raft::PeerClients;
use crate::state::types::{NodeId, Raft};
use crate::state::Role;

/// Leadership is handed over at most this often, so a flapping node causes no election storm.
const HANDOVER_EVERY: Duration = Duration::from_secs(5);
/// A new leader keeps leadership at least this long before handing it over,
/// so a failover or a healed partition is not followed at once by another
/// election.
const SETTLE: Duration = Duration::from_secs(10);

/// Lower is better placed to lead.
fn rank(role: Role) -> u8 {
    match role {
        Role::Active => 0,
        Role::Standby => 1,
        Role::Backup => 2,
        Role::Spare | Role::Dr => 3,
    }
}

/// Where a leadership transfer holds leadership now, if it does: the voter
/// (read from the replicated state, the hold's end already checked).
pub type Hold = Arc<dyn Fn() -> Option<NodeId> + Send + Sync>;

/// This node's role now, as the replicated membership gives it: none when
/// it is not a voter or no longer a member (then it places nothing and
/// never campaigns, not even as a last resort).
pub type RoleNow = Arc<dyn Fn() -> Option<Role> + Send + Sync>;

/// Holds new writes back for at most the duration given, or (none) ends
/// the hold: the proposer's, given by `server.rs`.
pub type HoldWrites = Arc<dyn Fn(Option<Duration>) + Send + Sync>;

/// How the leader hands leadership to another voter: the placement loop's
/// handover and the two-person leadership transfer's step.
///
/// openraft 0.9 has no leader transfer; the target campaigns (peer RPC
/// `Campaign`) and wins if a majority grants its vote. Two things stand in
/// the way, and a handover removes both:
/// * its log must be as up to date as each voter's: new writes wait (the
///   proposer's hold) until the target has the leader's whole log;
/// * a follower that heard the leader within the leader lease (openraft's:
///   the maximum election timeout) refuses every vote. The leader's own
///   vote is enough in a cluster of three (the leader's lease is as old as
///   its leadership), not in one of five. So with more than three voters
///   the leader goes silent — no heartbeats, writes and reads held — for a
///   lease and half a minimum election timeout, and then asks the target
///   to campaign. The followers' leases have expired then, and none of
///   them campaigns on its own yet: a follower whose leader has gone
///   silent waits the lease plus a random election timeout. One election,
///   by the target.
#[derive(Clone)]
pub struct Handover {
    raft: Raft,
    peers: PeerClients,
    reads: super::ReadFence,
    writes: HoldWrites,
    lease: Duration,
    election_min: Duration,
}

/// How long a handover waits for the target to catch up.
const CATCH_UP: Duration = Duration::from_secs(1);

impl Handover {
    /// A handover on this node's `raft`, with its raft timing.
    pub fn new(
        raft: Raft,
        peers: PeerClients,
        reads: super::ReadFence,
        writes: HoldWrites,
        election_min: Duration,
        election_max: Duration,
    ) -> Handover {
        Handover {
            raft,
            peers,
            reads,
            writes,
            lease: election_max,
            election_min,
        }
    }

    /// Hands leadership to voter `to` (at `addr`): the new leader, once
    /// this node no longer leads (it is `to` when the handover worked), or
    /// why it did not try.
    pub async fn to(&self, to: NodeId, addr: &str) -> Result<Option<NodeId>, String> {
        let voters = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count();
        let silent = voters > 3;
        let quiet_for = self.lease + self.election_min / 2;
        // Longer than it takes; released at the end in every case.
        let hold = CATCH_UP + quiet_for + self.lease * 2 + Duration::from_secs(1);
        (self.writes)(Some(hold));
        self.reads.hold_for(hold);
        let outcome = self.hand_over_held(to, addr, silent, quiet_for).await;
        self.raft.runtime_config().heartbeat(true);
        (self.writes)(None);
        self.reads.release();
        outcome
    }

    async fn hand_over_held(
        &self,
        to: NodeId,
        addr: &str,
        silent: bool,
        quiet_for: Duration,
    ) -> Result<Option<NodeId>, String> {
        let caught_up = self
            .raft
            .wait(Some(CATCH_UP))
            .metrics(
                |m| {
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&to).cloned().flatten())
                        .map(|l| l.index);
                    matched.is_some() && matched == m.last_log_index
                },
                "the handover's target has the whole log",
            )
            .await;
        if caught_up.is_err() {
            return Err(format!("node {to} did not catch up while writes waited"));
        }
        if silent {
            self.raft.runtime_config().heartbeat(false);
            tokio::time::sleep(quiet_for).await;
        }
        if let Err(e) = self.peers.campaign(addr, Duration::from_secs(1)).await {
            return Err(format!("node {to}: {}", e.message()));
        }
        // Until this node no longer leads (its held writes then go to the
        // new leader), or the election had its time.
        let me = self.raft.metrics().borrow().id;
        let _ = self
            .raft
            .wait(Some(self.lease * 2))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "another node leads after the handover",
            )
            .await;
        let leader = self.raft.metrics().borrow().current_leader;
        Ok(leader.filter(|l| *l != me))
    }
}

/// Runs the placement loop of node `id` until Raft stops.
pub async fn run(
    id: NodeId,
    role_now: RoleNow,
    raft: Raft,
    peers: PeerClients,
    handover: Handover,
    election_timeout_max: Duration,
    hold: Hold,
) {
    let tick = Duration::from_millis(500);
    let last_resort_after = election_timeout_max * 3;
    let mut last_handover: Option<Instant> = None;
    let mut leaderless_since: Option<Instant> = None;
    let mut leading_since: Option<(u64, Instant)> = None;
    let mut handed_to: Option<NodeId> = None;
    let mut failed_handovers = 0u32;
    loop {
        tokio::time::sleep(tick).await;
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() {
            return;
        }
        let Some(role) = role_now() else {
            leaderless_since = None;
            continue;
        };
        if m.current_leader == Some(id) {
            leaderless_since = None;
            let since = match leading_since {
                Some((term, t)) if term == m.current_term => t,
                _ => leading_since.insert((m.current_term, Instant::now())).1,
            };
            let settled = since.elapsed() >= SETTLE;
            // Leading again after handing over: the handover failed (the
            // target lost its election, e.g. timing on a loaded machine).
            // Each failure may cost an election; back off exponentially.
            let backoff = HANDOVER_EVERY * 2u32.pow(failed_handovers.min(7));
            let due = last_handover.is_none_or(|t| t.elapsed() >= backoff);
            let held = hold();
            if held == Some(id) {
                continue;
            }
            if settled && due {
                if let Some(target) = hand_over(id, role, held, &m, &handover).await {
                    if handed_to.replace(target).is_some() {
                        failed_handovers += 1;
                    }
                    last_handover = Some(Instant::now());
                }
            }
            continue;
        }
        if m.current_leader.is_some() && m.current_leader == handed_to {
            // The handover worked.
            handed_to = None;
            failed_handovers = 0;
        }
        leading_since = None;
        if role != Role::Backup {
            continue;
        }
        let confirmed = match m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
        {
            Some(leader) => peers.read_index(&leader.raft_addr, tick).await.is_ok(),
            None => false,
        };
        if confirmed {
            leaderless_since = None;
            continue;
        }
        let since = *leaderless_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= last_resort_after {
            tracing::warn!(
                after = ?since.elapsed(),
                "no leader confirmed; this backup campaigns as a last resort"
            );
            metrics::counter!("mailvault_backup_campaigns_total").increment(1);
            let _ = raft.trigger().elect().await;
            leaderless_since = None;
        }
    }
}

/// As leader, asks the best-placed caught-up voter to take over (the one
/// leadership is `held` on, if it is a voter). Returns the voter it asked,
/// if any.
async fn hand_over(
    id: NodeId,
    role: Role,
    held: Option<NodeId>,
    m: &crate::state::types::RaftMetrics,
    handover: &Handover,
) -> Option<NodeId> {
    let replication = m.replication.as_ref()?;
    let last = m.last_log_index.unwrap_or(0);
    let membership = m.membership_config.membership();
    let best = membership
        .voter_ids()
        .filter(|v| *v != id)
        .filter_map(|v| {
            let node = membership.get_node(&v)?;
            let matched = replication.get(&v)?.as_ref()?.index;
            let better = match held {
                Some(h) => v == h,
                None => rank(node.role) < rank(role),
            };
            (better && matched == last).then(|| (rank(node.role), v, node.raft_addr.clone()))
        })
        .min();
    let (_, target, addr) = best?;
    tracing::info!(target, "handing leadership to a better-placed voter");
    match handover.to(target, &addr).await {
        Ok(Some(l)) if l == target => tracing::info!(target, "leadership handed over"),
        Ok(now) => tracing::warn!(target, leader = ?now, "handover: the target did not win"),
        Err(why) => tracing::warn!(target, why, "handover not tried"),
    }
    metrics::counter!("mailvault_leader_handovers_total").increment(1);
    Some(target)
}
