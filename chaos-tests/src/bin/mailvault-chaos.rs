//! `mailvault-chaos`: the chaos soak and the history checker.
//!
//! * `mailvault-chaos soak --duration 10m --seed 42 --nodes 5` runs the fault
//!   classes in turn (each scenario a fresh cluster) until the duration is
//!   spent, and prints a summary table; it exits non-zero on any violation.
//! * `mailvault-chaos check FILE.jsonl` runs the checker again on a recorded
//!   history.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mailvault_chaos::checker::check;
use mailvault_chaos::history::load;
use mailvault_chaos::scenario::{run, Fault, Scenario, Verdict};

#[derive(Parser, Debug)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs scenarios of every fault class in turn for a given time.
    Soak {
        /// Total time, e.g. `10m`, `2h`.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed of the first scenario; each next one uses seed + 1.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Nodes per cluster.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Workload time of one scenario.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        scenario: Duration,
        /// Only these fault classes (comma-separated names); all by default.
        #[arg(long, value_delimiter = ',')]
        faults: Vec<String>,
        /// Where histories are written.
        #[arg(long, default_value = "chaos-histories")]
        out: PathBuf,
    },
    /// Checks a recorded history again.
    Check {
        /// A history written by a scenario (JSON lines).
        history: PathBuf,
    },
}

#[allow(clippy::too_many_arguments)]
async fn soak(
    duration: Duration,
    seed: u64,
    nodes: usize,
    scenario: Duration,
    faults: Vec<String>,
    out: PathBuf,
) -> anyhow::Result<bool> {
    let classes: Vec<Fault> = if faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        faults
            .iter()
            .map(|f| Fault::parse(f).ok_or_else(|| anyhow::anyhow!("unknown fault class {f}")))
            .collect::<anyhow::Result<_>>()?
    };
    let until = Instant::now() + duration;
    let mut rows = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let fault = classes[n as usize % classes.len()];
        let mut s = Scenario::ci(fault, seed + n);
        s.nodes = nodes;
        s.duration = scenario;
        s.writers = 4 * nodes / 2;
        let v = run(&s, &out).await?;
        eprintln!(
            "{} seed {}: {}",
            fault.name(),
            v.seed,
            if v.report.ok() { "ok" } else { "VIOLATED" }
        );
        for line in v.report.violations.iter().take(5) {
            eprintln!("  {line}");
        }
        rows.push((fault, v));
        n += 1;
    }
    println!("{}", Verdict::TABLE_HEAD);
    for (fault, v) in &rows {
        println!("{}", v.row(*fault));
    }
    Ok(rows.iter().all(|(_, v)| v.report.ok()))
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ok = match Cli::parse().command {
        Cmd::Soak {
            duration,
            seed,
            nodes,
            scenario,
            faults,
            out,
        } => soak(duration, seed, nodes, scenario, faults, out).await?,
        Cmd::Check { history } => {
            let r = check(&load(&history)?);
            println!(
                "acked {} indeterminate {} (present {}) reads {}: {}",
                r.acked,
                r.indeterminate,
                r.indeterminate_present,
                r.reads,
                if r.ok() { "ok" } else { "VIOLATED" }
            );
            for v in &r.violations {
                println!("  {v}");
            }
            r.ok()
        }
    };
    Ok(match ok {
        true => std::process::ExitCode::SUCCESS,
        false => std::process::ExitCode::FAILURE,
    })
}
