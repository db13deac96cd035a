//! A linearizability check for operations on shared messages, in the manner
//! of Porcupine and Knossos (the Wing–Gong–Lowe search with memoisation).
//!
//! Each shared message is a register of its claimant and its MODSEQ:
//!
//! * `claim(a)` succeeds if the message is unclaimed or already claimed by
//!   `a`, and is refused if another agent holds it;
//! * `release(a)` succeeds only for the claimant;
//! * a conditional flag update with `unchanged_since = s` succeeds only if the
//!   message's MODSEQ is at most `s`, and is refused otherwise;
//! * every change that succeeds gives the message a MODSEQ greater than any it
//!   had (the value itself comes from the mailbox counter, which other
//!   messages also advance, so only the order is checked);
//! * a read returns the claimant and MODSEQ exactly as they are.
//!
//! Every operation touches one message, so each message is checked on its own.
//! The search looks for an order of the operations that respects real time
//! (an operation that ended before another began comes first) and in which
//! every completed operation had the outcome the client saw. An
//! indeterminate operation may take effect anywhere after it began, or never;
//! when it does, the MODSEQ it gave is unknown, and the model keeps only a
//! lower bound until a later operation reveals it.

use std::collections::HashMap;

/// What was done to a shared message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Claim it for the agent.
    Claim,
    /// Release the agent's claim.
    Release,
    /// Change its flags if its MODSEQ is at most this.
    SetFlagsIfUnchanged(u64),
    /// Read its claimant and MODSEQ.
    Read,
}

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpOutcome {
    /// It took effect (or, for a read, returned) with this MODSEQ; a read
    /// also saw this claimant.
    Ok {
        /// The message's MODSEQ after the operation.
        modseq: u64,
        /// For a read: the claimant it saw.
        claimant: Option<u32>,
    },
    /// Refused for certain: changed nothing.
    Refused,
    /// Timed out or the connection broke: it may or may not have taken effect.
    Indeterminate,
}

/// One operation on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgOp {
    /// The agent.
    pub agent: u32,
    /// What it did.
    pub kind: OpKind,
    /// Invocation time.
    pub start: u64,
    /// Response time (ignored for indeterminate operations).
    pub end: u64,
    /// What the client saw.
    pub outcome: OpOutcome,
}

/// What the model knows of a message's MODSEQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Modseq {
    /// Exactly this.
    Is(u64),
    /// Greater than this; the exact value is unknown.
    Above(u64),
}

impl Modseq {
    /// The greatest value it is known to be at least.
    fn floor(self) -> u64 {
        match self {
            Modseq::Is(v) => v,
            Modseq::Above(v) => v + 1,
        }
    }
    /// Whether it can be at most `s`.
    fn may_be_at_most(self, s: u64) -> bool {
        self.floor() <= s
    }
    /// Whether it can be greater than `s`.
    fn may_exceed(self, s: u64) -> bool {
        match self {
            Modseq::Is(v) => v > s,
            Modseq::Above(_) => true,
        }
    }
    /// Whether it can be exactly `r`.
    fn may_be(self, r: u64) -> bool {
        match self {
            Modseq::Is(v) => v == r,
            Modseq::Above(v) => r > v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct State {
    claimant: Option<u32>,
    modseq: Modseq,
}

/// The state after `op` applied to `s` with the outcome `outcome` (where an
/// indeterminate operation is taken to have succeeded), if that outcome is
/// possible there.
fn step(s: State, op: &MsgOp) -> Option<State> {
    let holds = s.claimant == Some(op.agent);
    // A change that took effect: allowed when `ok`, giving `claimant`.
    let changed = |ok: bool, claimant: Option<u32>| -> Option<State> {
        if !ok {
            return None;
        }
        match op.outcome {
            OpOutcome::Ok { modseq, .. } => (modseq > s.modseq.floor()).then_some(State {
                claimant,
                modseq: Modseq::Is(modseq),
            }),
            // Unknown, but above what was known: Is(v) becomes Above(v), and
            // Above(v) stays Above(v) (weaker than it could be, never wrong;
            // it keeps the number of states small).
            _ => Some(State {
                claimant,
                modseq: match s.modseq {
                    Modseq::Is(v) | Modseq::Above(v) => Modseq::Above(v),
                },
            }),
        }
    };
    let refused = op.outcome == OpOutcome::Refused;
    match op.kind {
        OpKind::Read => match op.outcome {
            OpOutcome::Ok { modseq, claimant } => (claimant == s.claimant && s.modseq.may_be(modseq))
                .then_some(State {
                    claimant,
                    modseq: Modseq::Is(modseq),
                }),
            // Reads are never refused; an unanswered read says nothing.
            _ => None,
        },
        OpKind::Claim if refused => (s.claimant.is_some() && !holds).then_some(s),
        OpKind::Claim => changed(s.claimant.is_none() || holds, Some(op.agent)),
        OpKind::Release if refused => (!holds).then_some(s),
        OpKind::Release => changed(holds, None),
        OpKind::SetFlagsIfUnchanged(since) if refused => s.modseq.may_exceed(since).then_some(s),
        OpKind::SetFlagsIfUnchanged(since) => changed(s.modseq.may_be_at_most(since), s.claimant),
    }
}

/// Why a history could not be shown linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An order exists.
    Linearizable,
    /// No order exists.
    NotLinearizable,
    /// The search gave up after this many steps (counts as a failure).
    Timeout(u64),
}

/// Checks the operations on one message, starting unclaimed with a MODSEQ
/// greater than `created_after`. Unanswered reads are dropped first: they
/// change nothing and constrain nothing.
pub fn check_message(ops: &[MsgOp], created_after: u64, max_steps: u64) -> Verdict {
    let mut ops: Vec<&MsgOp> = ops
        .iter()
        .filter(|o| !(o.kind == OpKind::Read && o.outcome == OpOutcome::Indeterminate))
        .collect();
    ops.sort_by_key(|o| o.start);
    let n = ops.len();
    let done = |i: usize| ops[i].outcome != OpOutcome::Indeterminate;
    // Indeterminate claims and releases of the same agent have the same
    // effect, and the one that began first can go wherever a later one can:
    // only the first of them not yet linearized is tried (symmetry reduction;
    // without it the search tries every subset of them).
    let earlier_twin: Vec<Option<usize>> = (0..n)
        .map(|i| {
            (!done(i) && matches!(ops[i].kind, OpKind::Claim | OpKind::Release))
                .then(|| {
                    (0..i)
                        .rev()
                        .find(|&j| !done(j) && ops[j].agent == ops[i].agent && ops[j].kind == ops[i].kind)
                })
                .flatten()
        })
        .collect();
    let unanswered_update = |i: usize| !done(i) && matches!(ops[i].kind, OpKind::SetFlagsIfUnchanged(_));
    let words = n.div_ceil(64).max(1);
    let start = State {
        claimant: None,
        modseq: Modseq::Above(created_after),
    };
    // Bits of the answered operations; the rest are the unanswered ones.
    let mut answered = vec![0u64; words];
    for i in (0..n).filter(|&i| done(i)) {
        answered[i / 64] |= 1 << (i % 64);
    }
    // Memo with dominance: for each set of answered operations linearized and
    // state, the sets of unanswered operations used on the paths tried. A
    // path that reaches the same point having used a superset of one of
    // them has fewer operations left and can do nothing the other could not
    // (unanswered operations of one chain are used in the order they began,
    // and an earlier one can go wherever a later one can), so it is pruned.
    let mut seen: HashMap<(Vec<u64>, State), Vec<Vec<u64>>> = HashMap::new();
    // Depth-first search over (linearized set, state).
    let mut stack: Vec<(Vec<u64>, State)> = vec![(vec![0; words], start)];
    let mut steps = 0u64;
    let is_set = |bits: &[u64], i: usize| bits[i / 64] & (1 << (i % 64)) != 0;
    while let Some((bits, state)) = stack.pop() {
        steps += 1;
        if steps > max_steps {
            return Verdict::Timeout(steps);
        }
        if (0..n).all(|i| !done(i) || is_set(&bits, i)) {
            return Verdict::Linearizable;
        }
        // An operation can go next if no other pending completed operation
        // ended before it began.
        let horizon = (0..n)
            .filter(|&i| done(i) && !is_set(&bits, i))
            .map(|i| ops[i].end)
            .min()
            .unwrap_or(u64::MAX);
        let ready = |i: usize| {
            !is_set(&bits, i) && ops[i].start <= horizon && earlier_twin[i].is_none_or(|j| is_set(&bits, j))
        };
        // Unanswered conditional updates all have the same effect when they
        // take effect (the claimant stays, the MODSEQ rises to an unknown
        // value), whoever sent them and whatever MODSEQ they were conditional
        // on; they differ only in when they may go (after they began) and
        // where (while the MODSEQ is at most their condition). Taking one
        // while the MODSEQ is already unknown changes nothing, so it is never
        // tried. Otherwise, with the MODSEQ exactly `v`, only the one with the
        // smallest condition of at least `v` is tried: along any path the
        // horizon and the MODSEQ only grow, so every update ready now stays
        // ready, later uses need conditions at least as large, and keeping
        // the larger conditions for later loses nothing (the exchange
        // argument of interval scheduling). Without this, the search tries
        // every subset of them.
        let chosen_update = match state.modseq {
            Modseq::Is(v) => (0..n)
                .filter(|&i| ready(i) && unanswered_update(i))
                .filter_map(|i| match ops[i].kind {
                    OpKind::SetFlagsIfUnchanged(since) if since >= v => Some((since, i)),
                    _ => None,
                })
                .min()
                .map(|(_, i)| i),
            Modseq::Above(_) => None,
        };
        for i in (0..n).filter(|&i| ready(i) && (!unanswered_update(i) || chosen_update == Some(i))) {
            // An indeterminate operation that took effect succeeded; one that
            // was refused changed nothing, the same as never happening.
            let Some(next) = step(state, ops[i]) else {
                continue;
            };
            if !done(i) && next == state {
                // Taking effect here would change nothing: only use it up.
                continue;
            }
            let mut b = bits.clone();
            b[i / 64] |= 1 << (i % 64);
            let key: Vec<u64> = b.iter().zip(&answered).map(|(x, a)| x & a).collect();
            let used: Vec<u64> = b.iter().zip(&answered).map(|(x, a)| x & !a).collect();
            let tried = seen.entry((key, next)).or_default();
            let dominated = tried
                .iter()
                .any(|t| t.iter().zip(&used).all(|(t, u)| t & !u == 0));
            if !dominated {
                tried.retain(|t| !t.iter().zip(&used).all(|(t, u)| u & !t == 0));
                tried.push(used);
                stack.push((b, next));
            }
        }
    }
    Verdict::NotLinearizable
}

#[cfg(test)]
mod tests {
    use super::*;
    use OpKind::*;
    use OpOutcome::{Indeterminate, Refused};

    fn ok(modseq: u64) -> OpOutcome {
        OpOutcome::Ok {
            modseq,
            claimant: None,
        }
    }

    fn seen(modseq: u64, claimant: Option<u32>) -> OpOutcome {
        OpOutcome::Ok { modseq, claimant }
    }

    fn op(agent: u32, kind: OpKind, start: u64, end: u64, outcome: OpOutcome) -> MsgOp {
        MsgOp {
            agent,
            kind,
            start,
            end,
            outcome,
        }
    }

    fn check(h: &[MsgOp]) -> Verdict {
        check_message(h, 0, 100_000)
    }

    #[test]
    fn sequential_and_concurrent_claims_that_make_sense_pass() {
        let h = [
            op(1, Claim, 0, 10, ok(5)),
            op(2, Claim, 5, 15, Refused),
            op(1, Release, 20, 30, ok(7)),
            op(2, Claim, 25, 40, ok(9)),
            op(1, Claim, 35, 45, Refused),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn two_agents_both_winning_the_same_message_is_caught() {
        let h = [op(1, Claim, 0, 10, ok(2)), op(2, Claim, 20, 30, ok(3))];
        assert_eq!(check(&h), Verdict::NotLinearizable);
        // Even when they overlap: one of them must have been refused.
        let h = [op(1, Claim, 0, 10, ok(2)), op(2, Claim, 5, 15, ok(3))];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn a_refusal_with_nobody_holding_the_claim_is_caught() {
        let h = [op(1, Claim, 0, 10, Refused)];
        assert_eq!(check(&h), Verdict::NotLinearizable);
        let h = [
            op(1, Claim, 0, 10, ok(2)),
            op(1, Release, 20, 30, ok(3)),
            op(2, Claim, 40, 50, Refused),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn an_indeterminate_claim_may_or_may_not_have_happened() {
        // It happened: agent 2 is refused afterwards.
        let h = [op(1, Claim, 0, 0, Indeterminate), op(2, Claim, 20, 30, Refused)];
        assert_eq!(check(&h), Verdict::Linearizable);
        // It did not: agent 2 wins afterwards.
        let h = [op(1, Claim, 0, 0, Indeterminate), op(2, Claim, 20, 30, ok(4))];
        assert_eq!(check(&h), Verdict::Linearizable);
        // But it cannot have happened before it began.
        let h = [op(2, Claim, 0, 10, Refused), op(1, Claim, 20, 0, Indeterminate)];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn conditional_updates_succeed_only_on_an_unchanged_message() {
        let h = [
            op(1, Read, 0, 5, seen(3, None)),
            op(1, SetFlagsIfUnchanged(3), 10, 20, ok(8)),
            op(2, SetFlagsIfUnchanged(3), 30, 40, Refused),
            op(2, Read, 50, 60, seen(8, None)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // Two updates conditional on the same MODSEQ cannot both succeed.
        let h = [
            op(1, Read, 0, 5, seen(3, None)),
            op(1, SetFlagsIfUnchanged(3), 10, 20, ok(8)),
            op(2, SetFlagsIfUnchanged(3), 30, 40, ok(9)),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
        // Nor can one be refused when nothing changed the message.
        let h = [
            op(1, Read, 0, 5, seen(3, None)),
            op(2, SetFlagsIfUnchanged(3), 30, 40, Refused),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn modseq_goes_only_up_and_reads_see_the_latest() {
        // A change that gave a lower MODSEQ than the message already had.
        let h = [op(1, Claim, 0, 10, ok(9)), op(1, Release, 20, 30, ok(4))];
        assert_eq!(check(&h), Verdict::NotLinearizable);
        // A read after a change that returns the old state (a stale read).
        let h = [
            op(1, Read, 0, 5, seen(3, None)),
            op(1, Claim, 10, 20, ok(6)),
            op(2, Read, 30, 40, seen(3, None)),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
        // The same read overlapping the claim may see either.
        let h = [
            op(1, Read, 0, 5, seen(3, None)),
            op(1, Claim, 10, 20, ok(6)),
            op(2, Read, 15, 40, seen(3, None)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // A read that sees the wrong claimant.
        let h = [op(1, Claim, 10, 20, ok(6)), op(2, Read, 30, 40, seen(6, Some(2)))];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn an_indeterminate_change_leaves_the_modseq_unknown_but_higher() {
        // The indeterminate claim took effect with some MODSEQ above 3; a
        // read reveals 5, and the update conditional on 3 is then refused.
        let h = [
            op(1, Read, 0, 5, seen(3, None)),
            op(1, Claim, 10, 0, Indeterminate),
            op(2, Read, 30, 40, seen(5, Some(1))),
            op(2, SetFlagsIfUnchanged(3), 50, 60, Refused),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // But the read cannot reveal the MODSEQ it had before.
        let h = [
            op(1, Read, 0, 5, seen(3, None)),
            op(1, Claim, 10, 0, Indeterminate),
            op(2, Read, 30, 40, seen(3, Some(1))),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn many_unanswered_operations_stay_within_the_search_budget() {
        // 3 agents, 60 unanswered operations of each kind among answered
        // reads: the symmetry reduction keeps the search small.
        let mut h = Vec::new();
        let mut t = 0;
        for round in 0..60u64 {
            for agent in 0..3 {
                let kind =
                    [Claim, Release, SetFlagsIfUnchanged(round)][(round as usize + agent as usize) % 3];
                h.push(op(agent, kind, t, 0, Indeterminate));
                t += 1;
            }
        }
        h.push(op(0, Read, t + 1, t + 2, seen(1000, Some(2))));
        h.push(op(1, Claim, t + 3, t + 4, Refused));
        assert_eq!(check_message(&h, 0, 2_000_000), Verdict::Linearizable);
    }

    #[test]
    fn many_unanswered_conditional_updates_stay_within_the_search_budget() {
        // Agents read the message and send updates conditional on what they
        // read; every update goes unanswered (a leader was killed), so the
        // conditions all differ. Reads in between reveal the MODSEQ rising.
        let mut h = Vec::new();
        let mut t = 0;
        let mut modseq = 10;
        for round in 0..150u64 {
            let agent = (round % 5) as u32;
            h.push(op(agent, Read, t, t + 1, seen(modseq, None)));
            h.push(op(agent, SetFlagsIfUnchanged(modseq), t + 2, 0, Indeterminate));
            t += 3;
            if round % 3 == 2 {
                // One of the updates took effect: the MODSEQ is higher.
                modseq += 7;
            }
        }
        h.push(op(0, Read, t + 1, t + 2, seen(modseq, None)));
        assert_eq!(check_message(&h, 0, 2_000_000), Verdict::Linearizable);
        // Each rise needs an update that began before it and was conditional
        // on the MODSEQ just before it: a rise that nothing explains is caught.
        let mut bad = h.clone();
        bad.push(op(1, Read, t + 3, t + 4, seen(modseq + 1, None)));
        assert_eq!(check_message(&bad, 0, 2_000_000), Verdict::NotLinearizable);
    }

    #[test]
    fn long_outages_of_unanswered_claims_and_releases_stay_within_the_search_budget() {
        // The shape of a leader kill seen in the soak: while no leader
        // answers, three agents keep claiming, releasing and updating, and
        // nothing is answered; afterwards answered operations resume.
        let mut h = vec![op(1, Claim, 0, 5, ok(10))];
        let mut t = 10;
        for round in 0..25u64 {
            for agent in 0..3u32 {
                let kind = [Claim, Release, SetFlagsIfUnchanged(10)][(round as usize + agent as usize) % 3];
                h.push(op(agent, kind, t, 0, Indeterminate));
                t += 1;
            }
        }
        let after = h.clone();
        h.push(op(0, Read, t, t + 1, seen(40, Some(2))));
        h.push(op(1, Claim, t + 2, t + 3, Refused));
        h.push(op(2, Release, t + 4, t + 5, ok(44)));
        h.push(op(0, Claim, t + 6, t + 7, ok(45)));
        assert_eq!(check_message(&h, 0, 200_000), Verdict::Linearizable);
        // The checker still bites: once agent 0 holds the claim at MODSEQ
        // 45, agent 2 cannot release it at 46 (that would need two unanswered
        // changes in between: agent 0's release and agent 2's claim).
        let mut bad = after;
        bad.push(op(0, Read, t, t + 1, seen(40, Some(2))));
        bad.push(op(2, Release, t + 4, t + 5, ok(44)));
        bad.push(op(0, Claim, t + 6, t + 7, ok(45)));
        bad.push(op(2, Release, t + 8, t + 9, ok(46)));
        assert_eq!(check_message(&bad, 0, 200_000), Verdict::NotLinearizable);
    }

    #[test]
    fn an_unanswered_update_is_used_at_most_once() {
        // One unanswered update conditional on 3 can explain one rise, not two.
        let h = [
            op(1, Read, 0, 1, seen(3, None)),
            op(1, SetFlagsIfUnchanged(3), 2, 0, Indeterminate),
            op(2, Read, 10, 11, seen(5, None)),
            op(2, SetFlagsIfUnchanged(5), 12, 0, Indeterminate),
            op(3, Read, 20, 21, seen(6, None)),
            op(3, Read, 30, 31, seen(8, None)),
        ];
        assert_eq!(check(&h), Verdict::NotLinearizable);
        // With a second update conditional on 6 it passes.
        let mut ok_h = h.to_vec();
        ok_h.push(op(3, SetFlagsIfUnchanged(6), 22, 0, Indeterminate));
        assert_eq!(check(&ok_h), Verdict::Linearizable);
        // The smallest fitting condition is used first: the update
        // conditional on 9 must be kept for the rise from 8.
        let h = [
            op(1, Read, 0, 1, seen(3, None)),
            op(1, SetFlagsIfUnchanged(9), 2, 0, Indeterminate),
            op(2, SetFlagsIfUnchanged(3), 3, 0, Indeterminate),
            op(3, Read, 10, 11, seen(8, None)),
            op(3, Read, 20, 21, seen(12, None)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn a_search_that_runs_out_of_steps_is_a_failure() {
        // Not linearizable (agent 99 never holds the claim it releases), but
        // proving it means trying each of the 40 indeterminate claims first.
        let h: Vec<MsgOp> = (0..40)
            .map(|i| op(i, Claim, 0, 0, Indeterminate))
            .chain([op(99, Claim, 1, 2, Refused), op(99, Release, 3, 4, ok(50))])
            .collect();
        assert_eq!(check_message(&h, 0, 1_000_000), Verdict::NotLinearizable);
        assert!(matches!(check_message(&h, 0, 10), Verdict::Timeout(_)));
    }
}
