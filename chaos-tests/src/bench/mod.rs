//! `mailvault-bench compare`: mailvault side by side with etcd and with the
//! physical floor, in one run on loopback, driven by one harness.
//!
//! * The floor: `fdatasync` of 4 KiB writes with one writer per node at
//!   once, and a gRPC round trip (a health check over mTLS).
//! * The matrix: a 3-node etcd and a 3-node mailvault (production Raft
//!   timing, mTLS, encryption on), the same [`load::drive`] for both, every
//!   value size × client count; throughput, latency, fsyncs per
//!   acknowledged write (summed over the nodes) and CPU seconds per 1,000
//!   writes (summed over the server processes).
//! * Encryption: mailvault with the `plaintext` test mode, alternating with
//!   encryption on, a fresh cluster each round.
//! * Failover: the longest gap between acknowledgements when the leader is
//!   killed with `kill -9` mid-load, for both.
//!
//! It prints a markdown table and writes it with a JSON file of ratios
//! (mailvault / etcd, mailvault / floor): absolute figures drift on a shared
//! machine, ratios from one run much less.

pub mod backups;
pub mod etcd;
pub mod load;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::{append, create_tenant_and_mailbox, Cluster, ClusterOptions, FRONTEND};
use etcd::Etcd;
use load::{drive, value, Load, Measured, Target};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Value sizes in bytes.
    pub sizes: Vec<usize>,
    /// Client counts.
    pub clients: Vec<usize>,
    /// Seconds per measured cell.
    pub seconds: u64,
    /// Failover rounds per system.
    pub failover_rounds: usize,
    /// Where the markdown table and the JSON file go.
    pub out: PathBuf,
}

/// The floor of this machine.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// Median `fdatasync` of a 4 KiB write, one writer per node at once.
    pub fsync_p50_ms: f64,
    /// `fdatasync`s per second of one of those writers.
    pub fsyncs_per_sec_per_writer: f64,
    /// Median gRPC round trip (health check, mTLS, established connection).
    pub rtt_p50_ms: f64,
}

/// Times `fdatasync` of 4 KiB appends by `writers` threads at once, each on
/// its own file in `dir`, for `duration`.
pub fn fsync_floor(dir: &Path, writers: usize, duration: Duration) -> anyhow::Result<(f64, f64)> {
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let path = dir.join(format!("floor-{w}"));
            std::thread::spawn(move || -> std::io::Result<(Histogram<u64>, u64)> {
                let f = std::fs::File::create(&path)?;
                let block = [0x5au8; 4096];
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                let end = Instant::now() + duration;
                let mut n = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    f.write_all_at(&block, n * 4096)?;
                    f.sync_data()?;
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                    n += 1;
                }
                std::fs::remove_file(&path)?;
                Ok((h, n))
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut total = 0;
    for h in handles {
        let (hist, n) = h.join().map_err(|_| anyhow::anyhow!("fsync writer panicked"))??;
        all.add(&hist)?;
        total += n;
    }
    let per_writer = total as f64 / duration.as_secs_f64() / writers as f64;
    Ok((all.value_at_quantile(0.5) as f64 / 1000.0, per_writer))
}

/// Median time of `n` health checks on one established mTLS connection.
async fn rtt_floor(channel: Channel, n: usize) -> anyhow::Result<f64> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut c = HealthClient::new(channel);
    c.check(HealthCheckRequest::default()).await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..n {
        let t = Instant::now();
        c.check(HealthCheckRequest::default()).await?;
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
    }
    Ok(h.value_at_quantile(0.5) as f64 / 1000.0)
}

/// CPU seconds (user + system) a process has used, from `/proc`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name; utime and stime are the 14th and 15th
    // of the line, in clock ticks of 1/100 s on Linux.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// The system under test, as the comparison needs it.
enum System<'a> {
    Etcd(&'a mut Etcd),
    Mailvault(&'a mut Cluster),
}

impl System<'_> {
    fn name(&self) -> &'static str {
        match self {
            System::Etcd(_) => "etcd",
            System::Mailvault(_) => "mailvault",
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            System::Etcd(e) => e.pids(),
            System::Mailvault(c) => (0..c.len()).filter_map(|i| c.pid(i)).collect(),
        }
    }

    async fn fsyncs(&self) -> Option<f64> {
        match self {
            System::Etcd(e) => e.fsyncs().await,
            System::Mailvault(c) => {
                let mut total = 0.0;
                for i in 0..c.len() {
                    total += crate::scrape_metric(&c.ops_addr(i), "mailvault_fsyncs_total").await?;
                }
                Some(total)
            }
        }
    }

    async fn leader(&mut self) -> anyhow::Result<usize> {
        match self {
            System::Etcd(e) => e.wait_for_leader(Duration::from_secs(30)).await,
            System::Mailvault(c) => Ok(c.wait_for_leader(Duration::from_secs(30)).await),
        }
    }

    fn target(&self, clients: usize, size: usize, run: &str) -> Arc<dyn Target> {
        match self {
            System::Etcd(e) => e.target(clients, size, run),
            System::Mailvault(c) => mailvault_target(c, clients, size, run),
        }
    }

    async fn kill_and_restart(&mut self, i: usize, down: Duration) -> anyhow::Result<()> {
        match self {
            System::Etcd(e) => {
                e.kill(i);
                tokio::time::sleep(down).await;
                e.restart(i)
            }
            System::Mailvault(c) => {
                c.kill(i);
                tokio::time::sleep(down).await;
                c.start_node(i);
                Ok(())
            }
        }
    }
}

const TENANT: &str = "bench";
const MAILBOX: &str = "inbox";

struct MailvaultTarget {
    clients: Vec<Vec<MailboxClient<Channel>>>,
    size: usize,
    run: String,
    mailbox: String,
}

impl Target for MailvaultTarget {
    fn endpoints(&self) -> usize {
        self.clients.first().map(Vec::len).unwrap_or(0)
    }

    fn write(&self, client: usize, endpoint: usize, n: u64) -> BoxFuture<'static, Result<(), String>> {
        let mut c = self.clients[client][endpoint].clone();
        let key = format!("{}-{n}", self.run);
        let body = value(self.size, n);
        let mailbox = self.mailbox.clone();
        Box::pin(async move {
            append(&mut c, TENANT, &mailbox, &key, &body)
                .await
                .map(|_| ())
                .map_err(|s| s.code().to_string())
        })
    }
}

fn mailvault_target(c: &Cluster, clients: usize, size: usize, run: &str) -> Arc<dyn Target> {
    mailbox_target(c, clients, size, run, MAILBOX)
}

/// [`mailvault_target`] appending to `mailbox` of the bench tenant.
fn mailbox_target(c: &Cluster, clients: usize, size: usize, run: &str, mailbox: &str) -> Arc<dyn Target> {
    let per_client = (0..clients)
        .map(|_| {
            (0..c.len())
                .map(|i| {
                    MailboxClient::new(c.channel_as(i, FRONTEND, None))
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20)
                })
                .collect()
        })
        .collect();
    Arc::new(MailvaultTarget {
        clients: per_client,
        size,
        run: run.to_string(),
        mailbox: mailbox.to_string(),
    })
}

/// One measured cell.
#[derive(Debug, Clone)]
struct Cell {
    system: &'static str,
    variant: &'static str,
    size: usize,
    clients: usize,
    acked: u64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    fsyncs_per_write: Option<f64>,
    cpu_s_per_1000: f64,
}

impl Cell {
    fn json(&self) -> Value {
        json!({
            "system": self.system, "variant": self.variant, "size": self.size,
            "clients": self.clients, "acked": self.acked, "per_sec": self.per_sec,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "errors": self.errors,
            "fsyncs_per_write": self.fsyncs_per_write, "cpu_s_per_1000": self.cpu_s_per_1000,
        })
    }
}

static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Measures one cell: `clients` writing `size`-byte values for `seconds`.
async fn cell(
    sys: &mut System<'_>,
    variant: &'static str,
    size: usize,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Cell> {
    let leader = sys.leader().await?;
    let run = format!("r{}", RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let target = sys.target(clients, size, &run);
    // Warm the connections (TLS handshakes) outside the measurement.
    let warm = Load {
        clients,
        duration: Duration::from_secs(2),
        max_writes: clients as u64,
        first_endpoint: leader,
        keep_ack_times: false,
        attempt_timeout: None,
    };
    drive(target.clone(), warm).await;
    let pids = sys.pids();
    let cpu0: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let fs0 = sys.fsyncs().await;
    let m = drive(
        target,
        Load {
            clients,
            duration: Duration::from_secs(seconds),
            max_writes: u64::MAX,
            first_endpoint: leader,
            keep_ack_times: false,
            attempt_timeout: None,
        },
    )
    .await;
    let cpu1: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let fs1 = sys.fsyncs().await;
    let acked = m.acked().max(1) as f64;
    let c = Cell {
        system: sys.name(),
        variant,
        size,
        clients,
        acked: m.acked(),
        per_sec: m.per_sec(),
        p50_ms: m.ms(0.5),
        p99_ms: m.ms(0.99),
        errors: m.errors,
        fsyncs_per_write: fs0.zip(fs1).map(|(a, b)| (b - a) / acked),
        cpu_s_per_1000: (cpu1 - cpu0) / acked * 1000.0,
    };
    eprintln!(
        "  {} {} {} B x {}: {:.0}/s p50 {:.2} ms p99 {:.2} ms errors {} fsyncs/write {:.3} cpu-s/1000 {:.2}",
        c.system,
        c.variant,
        c.size,
        c.clients,
        c.per_sec,
        c.p50_ms,
        c.p99_ms,
        c.errors,
        c.fsyncs_per_write.unwrap_or(f64::NAN),
        c.cpu_s_per_1000
    );
    Ok(c)
}

/// The longest write gap when the leader is killed 4 s into a 14 s load of
/// 16 clients writing 4 KiB values (1 s deadline per attempt, then the next
/// endpoint); the killed member restarts after 2 s.
async fn failover(sys: &mut System<'_>) -> anyhow::Result<Duration> {
    let leader = sys.leader().await?;
    let run = format!("f{}", RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let target = sys.target(16, 4096, &run);
    let load = Load {
        clients: 16,
        duration: Duration::from_secs(14),
        max_writes: u64::MAX,
        first_endpoint: leader,
        keep_ack_times: true,
        // Both systems get the same client: a 1 s deadline per attempt, then
        // the next endpoint.
        attempt_timeout: Some(Duration::from_secs(1)),
    };
    let started = Instant::now();
    let running = tokio::spawn(drive(target, load));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let killed_at = started.elapsed();
    sys.kill_and_restart(leader, Duration::from_secs(2)).await?;
    let m: Measured = running.await?;
    let gap = m.longest_gap(killed_at, Duration::from_secs(14));
    eprintln!(
        "  {} failover: killed the leader at {:.1}s; longest gap {:.0} ms; {} acked, {} errors",
        sys.name(),
        killed_at.as_secs_f64(),
        gap.as_secs_f64() * 1000.0,
        m.acked(),
        m.errors
    );
    sys.leader().await?;
    Ok(gap)
}

/// The median (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A fresh 3-node mailvault with production Raft timing and the bench
/// mailbox, in the given test modes.
async fn mailvault_cluster(test_modes: &str) -> Cluster {
    tuned_cluster(test_modes, "", None).await
}

/// [`mailvault_cluster`] with extra `[raft]` settings (one per line) and,
/// when given, another `raft.snapshot_every`.
async fn tuned_cluster(test_modes: &str, raft: &str, snapshot_every: Option<u64>) -> Cluster {
    let defaults = ClusterOptions::default();
    let c = Cluster::start(ClusterOptions {
        snapshot_every: snapshot_every.unwrap_or(defaults.snapshot_every),
        production_timing: true,
        test_modes: test_modes.to_string(),
        extra_raft: if raft.is_empty() {
            String::new()
        } else {
            format!("{raft}\n")
        },
        ..defaults
    })
    .await;
    create_tenant_and_mailbox(&c, 0, TENANT, MAILBOX).await;
    c
}

/// Runs the whole comparison; prints and writes the results.
pub async fn compare(plan: Plan) -> anyhow::Result<()> {
    let mut mv = mailvault_cluster("").await;
    let mut et = Etcd::start(3).await?;

    eprintln!("floor: fdatasync with 3 writers, gRPC round trip");
    let (fsync_p50_ms, fsyncs_per_sec_per_writer) =
        tokio::task::block_in_place(|| fsync_floor(mv.dir(), 3, Duration::from_secs(5)))?;
    let rtt_p50_ms = rtt_floor(mv.channel_as(0, FRONTEND, None), 2000).await?;
    let floor = Floor {
        fsync_p50_ms,
        fsyncs_per_sec_per_writer,
        rtt_p50_ms,
    };
    eprintln!("  {floor:?}");

    // Failover first, on clusters still small; both restart their killed member.
    let mut gaps: Vec<(&str, f64)> = Vec::new();
    for _ in 0..plan.failover_rounds {
        let g = failover(&mut System::Etcd(&mut et)).await?;
        gaps.push(("etcd", g.as_secs_f64() * 1000.0));
        let g = failover(&mut System::Mailvault(&mut mv)).await?;
        gaps.push(("mailvault", g.as_secs_f64() * 1000.0));
    }

    // Encryption on and off: a fresh cluster per round, alternating, so
    // neither mode inherits the other's data, compactions or snapshots.
    let enc_size = plan.sizes[0];
    let mut enc = Vec::new();
    for &clients in plan.clients.iter().filter(|&&c| c > 1) {
        for mode in ["plaintext", "", "plaintext", "", "plaintext", ""] {
            let mut fresh = mailvault_cluster(mode).await;
            let variant = if mode.is_empty() { "encrypted" } else { "plaintext" };
            let c = cell(
                &mut System::Mailvault(&mut fresh),
                variant,
                enc_size,
                clients,
                plan.seconds,
            )
            .await?;
            enc.push(c);
        }
    }

    let mut cells = Vec::new();
    for &size in &plan.sizes {
        for &clients in &plan.clients {
            cells.push(cell(&mut System::Etcd(&mut et), "durable", size, clients, plan.seconds).await?);
            cells.push(
                cell(
                    &mut System::Mailvault(&mut mv),
                    "encrypted",
                    size,
                    clients,
                    plan.seconds,
                )
                .await?,
            );
        }
    }

    let doc = report(&plan, &floor, &cells, &enc, &gaps);
    std::fs::create_dir_all(&plan.out)?;
    let md = doc.0;
    print!("{md}");
    std::fs::File::create(plan.out.join("compare.md"))?.write_all(md.as_bytes())?;
    std::fs::write(
        plan.out.join("compare.json"),
        serde_json::to_string_pretty(&doc.1)?,
    )?;
    eprintln!("written: {}/compare.md and compare.json", plan.out.display());
    Ok(())
}

/// What [`one_cell`] measures, and on what.
#[derive(Debug, Clone)]
pub struct CellPlan {
    /// `mailvault` or `etcd`.
    pub system: String,
    /// Test modes for mailvault's nodes.
    pub test_modes: String,
    /// Extra `[raft]` lines for mailvault's nodes.
    pub raft: String,
    /// `raft.snapshot_every` for mailvault's nodes, if not the default.
    pub snapshot_every: Option<u64>,
    /// Values of this size written (by 64 clients) before the cell, so that
    /// it measures a system holding data rather than a fresh one.
    pub preload: u64,
    /// Value size in bytes.
    pub size: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds measured.
    pub seconds: u64,
}

/// One cell on a fresh (or preloaded) 3-node system, for profiling and
/// quick checks: the server PIDs are printed first (to attach `perf`), then
/// the cell's line.
pub async fn one_cell(plan: CellPlan) -> anyhow::Result<()> {
    let (size, preload) = (plan.size, plan.preload);
    let (mut mv, mut et);
    let mut sys = match plan.system.as_str() {
        "etcd" => {
            et = Etcd::start(3).await?;
            System::Etcd(&mut et)
        }
        "mailvault" => {
            mv = tuned_cluster(&plan.test_modes, &plan.raft, plan.snapshot_every).await;
            System::Mailvault(&mut mv)
        }
        other => anyhow::bail!("unknown system {other:?} (etcd or mailvault)"),
    };
    let leader = sys.leader().await?;
    if preload > 0 {
        let load = Load {
            clients: 64,
            duration: Duration::from_secs(1800),
            max_writes: preload,
            first_endpoint: leader,
            keep_ack_times: false,
            attempt_timeout: None,
        };
        let m = drive(sys.target(64, size, "preload"), load).await;
        eprintln!(
            "preloaded {} values of {size} B in {:.0} s ({} errors)",
            m.acked(),
            m.seconds,
            m.errors
        );
    }
    let pids: Vec<String> = sys.pids().iter().map(u32::to_string).collect();
    eprintln!("pids: {}", pids.join(","));
    let variant = if plan.test_modes.is_empty() {
        "default"
    } else {
        "test-modes"
    };
    cell(&mut sys, variant, size, plan.clients, plan.seconds).await?;
    if let System::Mailvault(c) = &sys {
        // The node's own stage timings (medians and 99th percentiles) and snapshot count.
        for i in 0..c.len() {
            let Some(page) = crate::scrape_metrics(&c.ops_addr(i)).await else {
                continue;
            };
            for line in page.lines().filter(|l| {
                (l.contains("quantile=\"0.5\"")
                    || l.contains("quantile=\"0.99\"")
                    || l.contains("from=")
                    || !l.contains('{'))
                    && STAGES.iter().any(|s| l.starts_with(s))
            }) {
                eprintln!("  node {i}: {line}");
            }
        }
    }
    Ok(())
}

/// The node metrics [`one_cell`] prints.
const STAGES: [&str; 14] = [
    "mailvault_snapshots_built_total",
    "mailvault_log_reads_total",
    "mailvault_pipelined_appends_total",
    "mailvault_apply_sync_wait_seconds",
    "mailvault_apply_from_disk_total",
    "mailvault_write_stalls_total",
    "mailvault_commit_seconds",
    "mailvault_commands_per_entry",
    "mailvault_appends_per_fsync",
    "mailvault_wal_sync_seconds",
    "mailvault_log_write_seconds",
    "mailvault_apply_seconds",
    "mailvault_peer_append_seconds",
    "mailvault_append_seconds",
];

/// The markdown table and the JSON document of ratios.
fn report(plan: &Plan, floor: &Floor, cells: &[Cell], enc: &[Cell], gaps: &[(&str, f64)]) -> (String, Value) {
    let find = |system: &str, size: usize, clients: usize| {
        cells
            .iter()
            .find(|c| c.system == system && c.size == size && c.clients == clients)
    };
    let mut md = String::new();
    md.push_str(&format!(
        "floor: fdatasync p50 {:.2} ms ({:.0}/s per writer, 3 writers); gRPC round trip p50 {:.3} ms\n\n",
        floor.fsync_p50_ms, floor.fsyncs_per_sec_per_writer, floor.rtt_p50_ms
    ));
    md.push_str("| size | clients | etcd writes/s | mailvault writes/s | ratio | etcd p50 ms | mailvault p50 ms | ratio | etcd p99 ms | mailvault p99 ms | etcd fsyncs/write | mailvault fsyncs/write | etcd cpu-s/1000 | mailvault cpu-s/1000 |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut matrix = Vec::new();
    for &size in &plan.sizes {
        for &clients in &plan.clients {
            let (Some(e), Some(m)) = (find("etcd", size, clients), find("mailvault", size, clients)) else {
                continue;
            };
            let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
            md.push_str(&format!(
                "| {} | {clients} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} | {:.2} |\n",
                human(size),
                e.per_sec,
                m.per_sec,
                m.per_sec / e.per_sec,
                e.p50_ms,
                m.p50_ms,
                m.p50_ms / e.p50_ms,
                e.p99_ms,
                m.p99_ms,
                f(e.fsyncs_per_write),
                f(m.fsyncs_per_write),
                e.cpu_s_per_1000,
                m.cpu_s_per_1000,
            ));
            matrix.push(json!({
                "size": size, "clients": clients,
                "throughput_mailvault_over_etcd": m.per_sec / e.per_sec,
                "p50_mailvault_over_etcd": m.p50_ms / e.p50_ms,
                "p99_mailvault_over_etcd": m.p99_ms / e.p99_ms,
                "cpu_per_write_mailvault_over_etcd": m.cpu_s_per_1000 / e.cpu_s_per_1000,
                "etcd": e.json(), "mailvault": m.json(),
            }));
        }
    }
    let floor_latency = floor.fsync_p50_ms + floor.rtt_p50_ms;
    let single = plan.sizes.first().and_then(|&s| {
        let e = find("etcd", s, 1)?;
        let m = find("mailvault", s, 1)?;
        Some((m.p50_ms / e.p50_ms, m.p50_ms / floor_latency))
    });
    let enc_ratio: Vec<Value> = plan
        .clients
        .iter()
        .filter(|&&c| c > 1)
        .map(|&clients| {
            let rate = |variant: &str| {
                median(
                    enc.iter()
                        .filter(|c| c.clients == clients && c.variant == variant)
                        .map(|c| c.per_sec)
                        .collect(),
                )
            };
            json!({"clients": clients, "encrypted_per_sec": rate("encrypted"), "plaintext_per_sec": rate("plaintext"),
                   "encrypted_over_plaintext": rate("encrypted") / rate("plaintext")})
        })
        .collect();
    md.push_str(&format!(
        "\nencryption ({} values, medians of 3 alternating rounds each):\n",
        human(plan.sizes[0])
    ));
    for r in &enc_ratio {
        md.push_str(&format!(
            "- {} clients: encrypted {:.0}/s, plaintext {:.0}/s, encrypted / plaintext = {:.3}\n",
            r["clients"],
            r["encrypted_per_sec"].as_f64().unwrap_or(f64::NAN),
            r["plaintext_per_sec"].as_f64().unwrap_or(f64::NAN),
            r["encrypted_over_plaintext"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    let gap = |s: &str| median(gaps.iter().filter(|(n, _)| *n == s).map(|(_, g)| *g).collect());
    let (ge, gm) = (gap("etcd"), gap("mailvault"));
    md.push_str(&format!(
        "\nfailover (kill -9 of the leader under 16 clients, longest write gap, median of {} rounds): etcd {ge:.0} ms, mailvault {gm:.0} ms; rounds: {gaps:?}\n",
        plan.failover_rounds
    ));
    let size0 = plan.sizes[0];
    let thr = |clients: usize| {
        find("etcd", size0, clients)
            .zip(find("mailvault", size0, clients))
            .map(|(e, m)| m.per_sec / e.per_sec)
    };
    let fsyncs16 = find("mailvault", size0, 16).and_then(|m| m.fsyncs_per_write);
    let enc_min = enc_ratio
        .iter()
        .filter_map(|r| r["encrypted_over_plaintext"].as_f64())
        .fold(f64::INFINITY, f64::min);
    let targets = json!([
        {"target": "throughput 16 clients 4 KiB >= 3x etcd", "value": thr(16), "met": thr(16).map(|v| v >= 3.0)},
        {"target": "throughput 64 clients 4 KiB >= 3x etcd", "value": thr(64), "met": thr(64).map(|v| v >= 3.0)},
        {"target": "single-client p50 <= 1.2x etcd", "value": single.map(|s| s.0), "met": single.map(|s| s.0 <= 1.2)},
        {"target": "single-client p50 <= 2x floor (fsync + round trip)", "value": single.map(|s| s.1), "met": single.map(|s| s.1 <= 2.0)},
        {"target": "encrypted / plaintext >= 0.95", "value": enc_min, "met": enc_min >= 0.95},
        {"target": "fsyncs per append at 16 clients <= 0.2 (per node)", "value": fsyncs16.map(|f| f / 3.0), "met": fsyncs16.map(|f| f / 3.0 <= 0.2)},
        {"target": "failover gap <= etcd", "value": gm / ge, "met": gm <= ge},
    ]);
    md.push_str("\n| target | value | met |\n|---|---|---|\n");
    for t in targets.as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            t["target"].as_str().unwrap_or(""),
            t["value"]
                .as_f64()
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            match t["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            }
        ));
    }
    let doc = json!({
        "floor": {"fsync_p50_ms": floor.fsync_p50_ms, "fsyncs_per_sec_per_writer": floor.fsyncs_per_sec_per_writer, "rtt_p50_ms": floor.rtt_p50_ms},
        "seconds_per_cell": plan.seconds,
        "matrix": matrix,
        "single_client_p50": single.map(|s| json!({"mailvault_over_etcd": s.0, "mailvault_over_floor": s.1})),
        "encryption": enc_ratio,
        "failover_gap_ms": {"etcd": ge, "mailvault": gm, "mailvault_over_etcd": gm / ge, "rounds": gaps.iter().map(|(n, g)| json!({"system": n, "gap_ms": g})).collect::<Vec<_>>()},
        "targets": targets,
        "encryption_cells": enc.iter().map(Cell::json).collect::<Vec<_>>(),
    });
    (md, doc)
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}
