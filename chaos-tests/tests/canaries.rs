//! Canaries that prove the chaos suite bites: nodes built with deliberate
//! bugs (test modes, see `mailvault_node::test_modes`) must make their
//! scenario fail, with the violation the bug causes.

use std::path::PathBuf;

use mailvault_chaos::scenario::{run, seed_from_env, Fault, Scenario};

async fn must_fail(fault: Fault, test_modes: &str, expected: &str) {
    let seed = seed_from_env();
    let mut s = Scenario::ci(fault, seed);
    s.test_modes = test_modes.into();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-canaries");
    let v = run(&s, &out).await.expect("scenario could not run");
    let found: Vec<&String> = v
        .report
        .violations
        .iter()
        .filter(|v| v.contains(expected))
        .collect();
    eprintln!(
        "canary {test_modes} under {}: seed {} acked {} violations {} (\"{expected}\": {}); first: {:?}",
        fault.name(),
        seed,
        v.report.acked,
        v.report.violations.len(),
        found.len(),
        v.report.violations.first()
    );
    assert!(
        !found.is_empty(),
        "the checker did not catch `{test_modes}` under {} (seed {seed}): violations {:?}",
        fault.name(),
        v.report.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledging_before_fsync_is_caught_as_lost_mail() {
    must_fail(Fault::PowerLossAll, "ack-before-fsync", "is lost").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_without_the_leader_check_are_caught_as_stale() {
    must_fail(Fault::IsolateLeader, "stale-reads", "stale read").await;
}
