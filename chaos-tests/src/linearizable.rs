//! A linearizability check for claims, in the manner of Porcupine and
//! Knossos (the Wing–Gong–Lowe search with memoisation).
//!
//! Each shared message is a register of its claimant. `claim(a)` succeeds if
//! the message is unclaimed or already claimed by `a`, and is refused if
//! another agent holds it; `release(a)` succeeds only for the claimant. Every
//! operation touches one message, so each message is checked on its own.
//! The search looks for an order of the operations that respects real time
//! (an operation that ended before another began comes first) and in which
//! every completed operation had the outcome the client saw. An
//! indeterminate operation may take effect anywhere after it began, or never.

use std::collections::HashSet;

use crate::history::ClaimOutcome;

/// One claim or release on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimOp {
    /// The agent.
    pub agent: u32,
    /// Release instead of claim.
    pub release: bool,
    /// Invocation time.
    pub start: u64,
    /// Response time (ignored for indeterminate operations).
    pub end: u64,
    /// What the client saw.
    pub outcome: ClaimOutcome,
}

/// The claimant after `op` applied to `state`, if `outcome` is possible there.
fn step(state: Option<u32>, op: &ClaimOp, outcome: ClaimOutcome) -> Option<Option<u32>> {
    let holds = state == Some(op.agent);
    match (op.release, outcome) {
        (false, ClaimOutcome::Ok) => (state.is_none() || holds).then_some(Some(op.agent)),
        (false, ClaimOutcome::Refused) => (state.is_some() && !holds).then_some(state),
        (true, ClaimOutcome::Ok) => holds.then_some(None),
        (true, ClaimOutcome::Refused) => (!holds).then_some(state),
        (_, ClaimOutcome::Indeterminate) => None,
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

/// Checks the operations on one message, starting unclaimed.
pub fn check_claims(ops: &[ClaimOp], max_steps: u64) -> Verdict {
    let n = ops.len();
    let done = |i: usize| ops[i].outcome != ClaimOutcome::Indeterminate;
    let words = n.div_ceil(64).max(1);
    let mut seen: HashSet<(Vec<u64>, Option<u32>)> = HashSet::new();
    // Depth-first search over (linearized set, state).
    let mut stack: Vec<(Vec<u64>, Option<u32>)> = vec![(vec![0; words], None)];
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
        for i in (0..n).filter(|&i| !is_set(&bits, i) && ops[i].start <= horizon) {
            // An indeterminate operation that took effect succeeded; one that
            // was refused changed nothing, the same as never happening.
            let outcome = match ops[i].outcome {
                ClaimOutcome::Indeterminate => ClaimOutcome::Ok,
                o => o,
            };
            if let Some(next) = step(state, &ops[i], outcome) {
                let mut b = bits.clone();
                b[i / 64] |= 1 << (i % 64);
                if seen.insert((b.clone(), next)) {
                    stack.push((b, next));
                }
            }
        }
    }
    Verdict::NotLinearizable
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClaimOutcome::*;

    fn op(agent: u32, release: bool, start: u64, end: u64, outcome: ClaimOutcome) -> ClaimOp {
        ClaimOp {
            agent,
            release,
            start,
            end,
            outcome,
        }
    }

    #[test]
    fn sequential_and_concurrent_claims_that_make_sense_pass() {
        let h = [
            op(1, false, 0, 10, Ok),
            op(2, false, 5, 15, Refused),
            op(1, true, 20, 30, Ok),
            op(2, false, 25, 40, Ok),
            op(1, false, 35, 45, Refused),
        ];
        assert_eq!(check_claims(&h, 100_000), Verdict::Linearizable);
    }

    #[test]
    fn two_agents_both_winning_the_same_message_is_caught() {
        let h = [op(1, false, 0, 10, Ok), op(2, false, 20, 30, Ok)];
        assert_eq!(check_claims(&h, 100_000), Verdict::NotLinearizable);
        // Even when they overlap: one of them must have been refused.
        let h = [op(1, false, 0, 10, Ok), op(2, false, 5, 15, Ok)];
        assert_eq!(check_claims(&h, 100_000), Verdict::NotLinearizable);
    }

    #[test]
    fn a_refusal_with_nobody_holding_the_claim_is_caught() {
        let h = [op(1, false, 0, 10, Refused)];
        assert_eq!(check_claims(&h, 100_000), Verdict::NotLinearizable);
        let h = [
            op(1, false, 0, 10, Ok),
            op(1, true, 20, 30, Ok),
            op(2, false, 40, 50, Refused),
        ];
        assert_eq!(check_claims(&h, 100_000), Verdict::NotLinearizable);
    }

    #[test]
    fn an_indeterminate_claim_may_or_may_not_have_happened() {
        // It happened: agent 2 is refused afterwards.
        let h = [op(1, false, 0, 0, Indeterminate), op(2, false, 20, 30, Refused)];
        assert_eq!(check_claims(&h, 100_000), Verdict::Linearizable);
        // It did not: agent 2 wins afterwards.
        let h = [op(1, false, 0, 0, Indeterminate), op(2, false, 20, 30, Ok)];
        assert_eq!(check_claims(&h, 100_000), Verdict::Linearizable);
        // But it cannot have happened before it began.
        let h = [op(2, false, 0, 10, Refused), op(1, false, 20, 0, Indeterminate)];
        assert_eq!(check_claims(&h, 100_000), Verdict::NotLinearizable);
    }

    #[test]
    fn a_search_that_runs_out_of_steps_is_a_failure() {
        // Not linearizable (agent 99 never holds the claim it releases), but
        // proving it means trying each of the 40 indeterminate claims first.
        let h: Vec<ClaimOp> = (0..40)
            .map(|i| op(i, false, 0, 0, Indeterminate))
            .chain([op(99, false, 1, 2, Refused), op(99, true, 3, 4, Ok)])
            .collect();
        assert_eq!(check_claims(&h, 1_000_000), Verdict::NotLinearizable);
        assert!(matches!(check_claims(&h, 10), Verdict::Timeout(_)));
    }
}
