//! The CI chaos suite: one scenario per fault class, each a 3-node cluster of
//! real processes under concurrent appends and reads for 20 s while the fault
//! repeats, then healed and checked (see `mailvault_chaos::checker`).
//!
//! Seeds are printed; `MAILVAULT_CHAOS_SEED=N` replays one. Histories are kept
//! under the cargo target's tmp dir (`chaos-histories/`).

use std::path::PathBuf;

use mailvault_chaos::scenario::{run, seed_from_env, Fault, Scenario, Verdict};

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-histories")
}

async fn scenario(fault: Fault) {
    let seed = seed_from_env();
    let v = run(&Scenario::ci(fault, seed), &out_dir())
        .await
        .expect("scenario could not run");
    let r = &v.report;
    eprintln!("{}\n{}", Verdict::TABLE_HEAD, v.row(fault));
    assert!(
        r.ok(),
        "{} (seed {}) violated:\n  {}\nhistory: {}",
        fault.name(),
        v.seed,
        r.violations.join("\n  "),
        v.history.display()
    );
    assert!(v.faults >= 1, "no fault was injected");
    assert!(
        r.acked >= 50,
        "the workload made too little progress ({} acked)",
        r.acked
    );
    assert!(r.reads >= 10, "too few successful reads ({})", r.reads);
    assert!(
        r.claims >= 50,
        "too few operations on shared messages ({})",
        r.claims
    );
    assert!(r.watched >= 50, "too few changes watched ({})", r.watched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_random_node_loses_nothing_acknowledged() {
    scenario(Fault::KillRandom).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_loses_nothing_acknowledged() {
    scenario(Fault::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_serves_no_stale_read_and_loses_nothing() {
    scenario(Fault::PauseLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_serves_no_stale_read_and_loses_nothing() {
    scenario(Fault::IsolateLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_split_loses_nothing_acknowledged() {
    scenario(Fault::MinoritySplit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_partition_loses_nothing_acknowledged() {
    scenario(Fault::OneWay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_links_lose_nothing_acknowledged() {
    scenario(Fault::Lossy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_links_to_the_leader_lose_nothing_acknowledged() {
    scenario(Fault::SlowLinks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_of_one_node_loses_nothing_acknowledged() {
    scenario(Fault::PowerLossOne).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_of_a_majority_loses_nothing_acknowledged() {
    scenario(Fault::PowerLossMajority).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_of_every_node_loses_nothing_acknowledged() {
    scenario(Fault::PowerLossAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_on_one_node_loses_nothing_acknowledged() {
    scenario(Fault::ClockSkew).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_one_node_loses_nothing_acknowledged() {
    scenario(Fault::DiskFull).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_node_killed_mid_backup_or_ship_loses_nothing_and_leaves_nothing_half_done() {
    scenario(Fault::KillBackup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_operation_leaves_every_operation_whole_or_absent_and_recorded() {
    scenario(Fault::KillOperation).await;
}
