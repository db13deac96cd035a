//! Canaries that prove the chaos suite bites: nodes built with deliberate
//! bugs (test modes, see `mailvault_node::test_modes`) must make their
//! scenario fail, with the violation the bug causes.

use std::path::PathBuf;

use mailvault_chaos::scenario::{run, seed_from_env, Fault, Scenario};

/// Runs `fault` on nodes in `test_modes`; the scenario must fail with at
/// least one violation naming one of `expected` (the bug's symptoms).
async fn must_fail(fault: Fault, test_modes: &str, expected: &[&str]) {
    let seed = seed_from_env();
    let mut s = Scenario::ci(fault, seed);
    s.test_modes = test_modes.into();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-canaries");
    let v = run(&s, &out).await.expect("scenario could not run");
    let found: Vec<&String> = v
        .report
        .violations
        .iter()
        .filter(|v| expected.iter().any(|e| v.contains(e)))
        .collect();
    eprintln!(
        "canary {test_modes} under {}: seed {} acked {} violations {} ({expected:?}: {}); first: {:?}",
        fault.name(),
        seed,
        v.report.acked,
        v.report.violations.len(),
        found.len(),
        v.report.violations.first()
    );
    assert!(
        !found.is_empty(),
        "the checker did not catch `{test_modes}` under {} as {expected:?} (seed {seed}): violations {:?}",
        fault.name(),
        v.report.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledging_before_fsync_is_caught_as_lost_mail() {
    // Acknowledged entries that were never synced vanish in the power cut:
    // the checker finds them lost; or, when the cut comes early, whole
    // mailboxes are gone (no final state, announced messages no replica
    // holds), or the cluster cannot even recover (a node's vote survives but
    // the log it promised does not).
    must_fail(
        Fault::PowerLossAll,
        "ack-before-fsync",
        &[
            "is lost",
            "no final state",
            "which no replica holds",
            "exited by itself",
            "no leader within",
            "did not reach the same applied index",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_without_the_leader_check_are_caught_as_stale() {
    must_fail(Fault::IsolateLeader, "stale-reads", &["stale read"]).await;
}
