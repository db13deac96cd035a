//! `mailvault-bench`: measurements that need clusters of their own, started
//! by the harness on loopback, driven by `mailvault-admin bench`.
//!
//! `mailvault-bench compare` runs mailvault side by side with a 3-node etcd
//! and the machine's floor (see `mailvault_chaos::bench`).
//!
//! `mailvault-bench backups` measures backups, ships, drills and restores
//! at growing message counts (`mailvault_chaos::bench::backups`).
//!
//! `mailvault-bench audit-cost` measures what auditing reads costs: one
//! cluster, alternating rounds with the audit of successful reads on and off
//! (the `unaudited-reads` test mode), the same read load each round.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailvault_chaos::bench::median;
use mailvault_chaos::{create_tenant_and_mailbox, Cluster, ClusterOptions, FRONTEND};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// mailvault against etcd and the floor: throughput, latency, fsyncs and
    /// CPU per write, encryption cost and failover gap; a markdown table and
    /// a JSON file of ratios.
    Compare {
        /// Value sizes in bytes.
        #[arg(long, value_delimiter = ',', default_value = "4096,65536,1048576")]
        sizes: Vec<usize>,
        /// Client counts.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        clients: Vec<usize>,
        /// Seconds per measured cell.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Failover rounds per system.
        #[arg(long, default_value_t = 2)]
        failover_rounds: usize,
        /// Directory for compare.md and compare.json.
        #[arg(long, default_value = "bench-results")]
        out: std::path::PathBuf,
    },
    /// One measured cell on a fresh 3-node system; prints the server PIDs
    /// first, so a profiler can attach.
    Cell {
        /// `mailvault` or `etcd`.
        #[arg(long, default_value = "mailvault")]
        system: String,
        /// Test modes for mailvault's nodes (e.g. `plaintext`).
        #[arg(long, default_value = "")]
        test_modes: String,
        /// Extra `[raft]` settings for mailvault's nodes, TOML, `;`-separated
        /// (e.g. `max_batches_in_flight = 1`).
        #[arg(long, default_value = "")]
        raft: String,
        /// `raft.snapshot_every` for mailvault's nodes (default: the test clusters').
        #[arg(long)]
        snapshot_every: Option<u64>,
        /// Write this many values (of `--size`, 64 clients) before the cell,
        /// to measure a system that holds data.
        #[arg(long, default_value_t = 0)]
        preload: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Seconds measured.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// What backups cost as the mail held grows: snapshot build, backup,
    /// ship and read-back (MB/s), drill, whole-cluster restore and a mailbox
    /// restore, per message count (one fresh cluster each).
    Backups {
        /// Message counts.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        messages: Vec<u64>,
        /// Message size in bytes.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Also ship to an S3 server (`moto_server`, which must be installed).
        #[arg(long)]
        s3: bool,
        /// Messages of the mailbox restored into the live cluster.
        #[arg(long, default_value_t = 1000)]
        mailbox_messages: u64,
    },
    /// Reads/s with and without the audit of reads, same cluster, same run.
    AuditCost {
        /// Concurrent reading clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Seconds per measured round.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds per mode (alternating, to even out drift on a shared machine).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `mailvault-admin bench` as the front end against `endpoint`.
fn admin_bench(cluster: &Cluster, endpoint: &str, args: &[String]) -> anyhow::Result<Value> {
    let out = cluster
        .admin_command(endpoint, FRONTEND)
        .args(["--output", "json", "bench"])
        .args(args)
        .output()
        .context("cannot run mailvault-admin")?;
    anyhow::ensure!(
        out.status.success(),
        "mailvault-admin bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("bench printed no JSON")
}

async fn audit_cost(
    clients: usize,
    seconds: u64,
    rounds: usize,
    size: usize,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    create_tenant_and_mailbox(&cluster, 0, "bench", "inbox").await;
    let modes = [("audited", ""), ("unaudited", "unaudited-reads")];
    let mut rows = Vec::new();
    for round in 1..=rounds {
        for (name, mode) in modes {
            cluster.set_test_modes(mode);
            cluster.restart_all().await;
            let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
            let endpoint = cluster.client_addr(leader);
            let args: Vec<String> = [
                "--workload",
                "read",
                "--clients",
                &clients.to_string(),
                "--size",
                &size.to_string(),
                "--count",
                "100000000",
                "--duration",
                &seconds.to_string(),
                "--read-set",
                "200",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let r = admin_bench(&cluster, &endpoint, &args)?;
            eprintln!("round {round} {name}: {r}");
            rows.push((name, round, r));
        }
    }
    let rate = |name: &str| {
        median(
            rows.iter()
                .filter(|(n, _, _)| *n == name)
                .filter_map(|(_, _, r)| r["ops_per_sec"].as_f64())
                .collect(),
        )
    };
    let (with, without) = (rate("audited"), rate("unaudited"));
    if as_json {
        let doc = json!({
            "clients": clients, "seconds": seconds, "size": size,
            "reads_per_sec_audited": with, "reads_per_sec_unaudited": without,
            "ratio_audited_over_unaudited": with / without,
            "rounds": rows.iter().map(|(n, r, v)| json!({"mode": n, "round": r, "result": v})).collect::<Vec<_>>(),
        });
        println!("{doc}");
    } else {
        println!("| mode | round | reads/s | p50 ms | p99 ms | errors |");
        println!("|---|---|---|---|---|---|");
        for (name, round, r) in &rows {
            println!(
                "| {name} | {round} | {:.0} | {:.2} | {:.2} | {} |",
                r["ops_per_sec"].as_f64().unwrap_or(f64::NAN),
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["errors"]
            );
        }
        println!(
            "\nmedian reads/s: audited {with:.0}, unaudited {without:.0}; audited/unaudited = {:.3}",
            with / without
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Cli::parse().command {
        Cmd::Compare {
            sizes,
            clients,
            seconds,
            failover_rounds,
            out,
        } => {
            anyhow::ensure!(
                !sizes.is_empty() && !clients.is_empty(),
                "no sizes or no client counts"
            );
            let plan = mailvault_chaos::bench::Plan {
                sizes,
                clients,
                seconds,
                failover_rounds,
                out,
            };
            mailvault_chaos::bench::compare(plan).await
        }
        Cmd::Cell {
            system,
            test_modes,
            raft,
            snapshot_every,
            preload,
            size,
            clients,
            seconds,
        } => {
            mailvault_chaos::bench::one_cell(mailvault_chaos::bench::CellPlan {
                system,
                test_modes,
                raft: raft.replace(';', "\n"),
                snapshot_every,
                preload,
                size,
                clients,
                seconds,
            })
            .await
        }
        Cmd::Backups {
            messages,
            size,
            s3,
            mailbox_messages,
        } => {
            mailvault_chaos::bench::backups::backups(mailvault_chaos::bench::backups::BackupPlan {
                messages,
                size,
                s3,
                mailbox_messages,
            })
            .await
        }
        Cmd::AuditCost {
            clients,
            seconds,
            rounds,
            size,
            json,
        } => audit_cost(clients, seconds, rounds, size, json).await,
    }
}
