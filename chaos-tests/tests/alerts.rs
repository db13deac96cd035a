//! The Prometheus alert rules shipped in `deploy/prometheus/`: valid for
//! Prometheus' own checker, passing their unit tests (which fire each alert
//! from synthetic series and keep a follower's view from paging), and naming
//! only metrics that real nodes export.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mailvault_chaos::*;

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(rules_dir())
        .output()
        .expect("promtool (the prometheus package; deploy/local/common.sh installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `mailvault_…` metric names an expression mentions.
fn metric_names(rules: &str) -> Vec<String> {
    let mut names: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("mailvault_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "mailvault-alerts.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "mailvault-alerts.test.yml"]);
    assert!(ok, "{out}");
    // Every rule has a unit test that fires it.
    let tests = std::fs::read_to_string(rules_dir().join("mailvault-alerts.test.yml")).unwrap();
    let rules = std::fs::read_to_string(rules_dir().join("mailvault-alerts.yml")).unwrap();
    let untested: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .filter(|a| !tests.contains(&format!("alertname: {a}\n        exp_alerts:\n          -")))
        .collect();
    assert!(
        untested.is_empty(),
        "rules without a unit test that fires them: {untested:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alert_rules_name_is_exported_by_the_nodes() {
    let rules = std::fs::read_to_string(rules_dir().join("mailvault-alerts.yml")).unwrap();
    let names = metric_names(&rules);
    assert!(names.len() >= 6, "{names:?}");
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut scraped = String::new();
        for i in 0..cluster.len() {
            scraped.push_str(&scrape_metrics(&cluster.ops_addr(i)).await.unwrap_or_default());
        }
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| {
                !scraped
                    .lines()
                    .any(|l| l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} ")))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "not exported by any node: {missing:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
