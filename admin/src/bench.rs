//! `mailvault-admin bench`: a load generator against a running cluster.
//!
//! Workloads: `append` (every client appends unique messages of a fixed size)
//! and `read` (the run first appends `--read-set` messages, then every client
//! fetches random ones of them, metadata and body). Both stop at `--count` or
//! `--duration`, whichever comes first. It prints throughput, latency
//! percentiles, errors and, for appends, fsyncs per acknowledged append (from
//! the `/metrics` of the ops endpoints given with `--ops`, summed over them,
//! so 3 replicas syncing once each count 3).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::*;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::client::{cluster, mailbox, status_err, tenants};
use crate::Output;

/// What the clients do.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Workload {
    /// Append unique messages.
    Append,
    /// Fetch random messages of a set appended first (metadata and body).
    Read,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What the clients do.
    #[arg(long, value_enum, default_value = "append")]
    workload: Workload,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Total operations (the run also stops at --duration).
    #[arg(long, default_value_t = 5000)]
    count: u64,
    /// Longest run in seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// For `read`: how many messages are appended first and then read at random.
    #[arg(long, default_value_t = 100)]
    read_set: u64,
    /// Ops endpoints (`host:port`, comma-separated) whose `/metrics` give the
    /// fsyncs per append, or `auto` to list them from the cluster status,
    /// which needs the operator or auditor cluster role (a denied call counts
    /// towards this identity's lockout). Without it fsyncs are not measured.
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
    /// Tenant to use (created if missing and this identity may create it).
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// Mailbox to use (created if missing).
    #[arg(long, default_value = "inbox")]
    mailbox: String,
}

fn message(size: usize, n: u64) -> Vec<u8> {
    let head =
        format!("From: bench@example.invalid\r\nTo: load@example.invalid\r\nSubject: bench {n}\r\n\r\n");
    let mut v = head.into_bytes();
    v.resize(size.max(v.len()), b'x');
    v
}

/// The ops endpoints to read fsyncs from (`--ops`), or why there are none.
async fn ops_endpoints(endpoint: &str, ops: &[String]) -> Result<Vec<String>, String> {
    match ops {
        [] => Err(
            "not measured: give --ops with the nodes' ops endpoints, or --ops auto \
                   with an operator or auditor identity"
                .into(),
        ),
        [auto] if auto == "auto" => {
            let mut client = cluster(endpoint)
                .await
                .map_err(|e| format!("cluster status: {e}"))?;
            match client.node_status(NodeStatusRequest {}).await {
                Ok(r) => Ok(r.into_inner().members.into_iter().map(|m| m.ops_addr).collect()),
                Err(s) if s.code() == tonic::Code::PermissionDenied => Err(
                    "--ops auto needs the operator or auditor cluster role, which this identity lacks".into(),
                ),
                Err(s) => Err(format!("cluster status: {}", status_err(s))),
            }
        }
        list => Ok(list.to_vec()),
    }
}

/// Sums `mailvault_fsyncs_total` over the ops endpoints.
async fn fsyncs(ops: &[String]) -> Result<f64, String> {
    let mut total = 0.0;
    for addr in ops {
        total += scrape(addr, "mailvault_fsyncs_total")
            .await
            .ok_or_else(|| format!("ops endpoint {addr} unreachable"))?;
    }
    Ok(total)
}

async fn scrape(addr: &str, metric: &str) -> Option<f64> {
    let page = mailvault_proto::client::scrape_metrics(addr, Duration::from_secs(2)).await?;
    Some(mailvault_proto::client::metric_value(&page, metric))
}

/// What one driven load measured.
struct Measured {
    hist: Histogram<u64>,
    errors: u64,
    seconds: f64,
}

/// Runs `op(client, n)` for n = 0, 1, … on `clients` concurrent clients until
/// `count` operations were started or `duration` passed.
async fn drive<F, Fut>(
    endpoint: &str,
    clients: usize,
    count: u64,
    duration: Duration,
    op: F,
) -> anyhow::Result<Measured>
where
    F: Fn(MailboxClient<Channel>, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, errors, op) = (next.clone(), errors.clone(), op.clone());
        let c = mailbox(endpoint).await?;
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                match op(c.clone(), n).await {
                    Ok(()) => {
                        let _ = local.record(t.elapsed().as_micros() as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            local
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        hist.add(&t.await?)?;
    }
    Ok(Measured {
        hist,
        errors: errors.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn append_one(
    mut c: MailboxClient<Channel>,
    tenant: String,
    mailbox: String,
    key: String,
    body: Vec<u8>,
) -> Result<(), tonic::Status> {
    let header = AppendHeader {
        tenant,
        mailbox,
        idempotency_key: key,
        ..Default::default()
    };
    let frames = mailvault_proto::client::append_frames(header, &body);
    c.append_message(tokio_stream::iter(frames)).await.map(|_| ())
}

async fn read_one(
    mut c: MailboxClient<Channel>,
    tenant: String,
    mailbox: String,
    uid: u32,
) -> Result<(), tonic::Status> {
    let mut s = c
        .get_message(GetMessageRequest { tenant, mailbox, uid })
        .await?
        .into_inner();
    let mut frames = 0;
    while let Some(frame) = s.next().await {
        frame?;
        frames += 1;
    }
    match frames {
        0 => Err(tonic::Status::data_loss("empty message stream")),
        _ => Ok(()),
    }
}

/// Creates the bench mailbox, and the tenant if it is missing. Makes no call
/// the identity is not known to be allowed: a denied call counts towards its
/// lockout (and its address's), so a tenant is created only once the
/// mailbox call said it does not exist.
async fn prepare(endpoint: &str, a: &BenchArgs) -> anyhow::Result<()> {
    let create_mailbox = || async {
        let req = CreateMailboxRequest {
            tenant: a.tenant.clone(),
            mailbox: a.mailbox.clone(),
        };
        match mailbox(endpoint).await?.create_mailbox(req).await {
            Ok(_) => Ok(Ok(())),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(Ok(())),
            Err(s) if s.code() == tonic::Code::PermissionDenied => Err(anyhow::anyhow!(
                "{}\nhint: the bench identity needs a role on the tenant, e.g. \
                 `mailvault-admin access grant <identity> --tenant {} --role tenant-admin --reason R`, \
                 approved by a second operator (`mailvault-admin op approve`)",
                status_err(s),
                a.tenant
            )),
            Err(s) => Ok(Err(s)),
        }
    };
    match create_mailbox().await? {
        Ok(()) => return Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(status_err(s)),
    }
    // The tenant does not exist: only an operator may create it.
    let req = CreateTenantRequest {
        tenant: a.tenant.clone(),
    };
    match tenants(endpoint).await?.create_tenant(req).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) if s.code() == tonic::Code::PermissionDenied => anyhow::bail!(
            "tenant {} does not exist, and this identity may not create it \
             (an operator may: `mailvault-admin tenant create {}`)",
            a.tenant,
            a.tenant
        ),
        Err(s) => return Err(status_err(s)),
    }
    create_mailbox().await?.map_err(status_err)
}

pub async fn run(endpoint: &str, output: Output, a: BenchArgs) -> anyhow::Result<()> {
    prepare(endpoint, &a).await?;
    let run_id = crate::mail::random_key();
    let (tenant, mbox, size) = (a.tenant.clone(), a.mailbox.clone(), a.size);
    let append = move |c, n: u64, run: String| {
        append_one(
            c,
            tenant.clone(),
            mbox.clone(),
            format!("{run}-{n}"),
            message(size, n),
        )
    };
    let duration = Duration::from_secs(a.duration);
    let mut fsyncs_per_append = Err("not an append workload".to_string());
    let measured = match a.workload {
        Workload::Append => {
            // The ops endpoints and their fsyncs so far, or why there are none.
            let before = match ops_endpoints(endpoint, &a.ops).await {
                Ok(ops) => fsyncs(&ops).await.map(|n| (ops, n)),
                Err(e) => Err(e),
            };
            let run = run_id.clone();
            let op = move |c, n| append(c, n, run.clone());
            let m = drive(endpoint, a.clients, a.count, duration, op).await?;
            fsyncs_per_append = match before {
                Ok(_) if m.hist.is_empty() => Err("no append was acknowledged".into()),
                Ok((ops, b)) => fsyncs(&ops).await.map(|after| (after - b) / m.hist.len() as f64),
                Err(e) => Err(e),
            };
            m
        }
        Workload::Read => {
            let run = format!("{run_id}-set");
            let seed = move |c, n| append(c, n, run.clone());
            let set = a.read_set.max(1);
            let seeded = drive(endpoint, a.clients.min(8), set, duration, seed).await?;
            anyhow::ensure!(
                seeded.errors == 0,
                "{} of {set} messages for the read set failed to append",
                seeded.errors
            );
            let status = mailbox(endpoint)
                .await?
                .get_mailbox_status(GetMailboxStatusRequest {
                    tenant: a.tenant.clone(),
                    mailbox: a.mailbox.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let top = status.uidnext.saturating_sub(1);
            let low = top.saturating_sub(set as u32 - 1).max(1);
            let (tenant, mbox) = (a.tenant.clone(), a.mailbox.clone());
            // A fixed stride through the set: no random source needed, every message read.
            let op = move |c, n: u64| {
                let uid = low + (n.wrapping_mul(7919) % u64::from(top - low + 1)) as u32;
                read_one(c, tenant.clone(), mbox.clone(), uid)
            };
            drive(endpoint, a.clients, a.count, duration, op).await?
        }
    };
    report(output, &a, &measured, fsyncs_per_append);
    Ok(())
}

fn report(output: Output, a: &BenchArgs, m: &Measured, fsyncs_per_append: Result<f64, String>) {
    let h = &m.hist;
    let ops = h.len();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let workload = match a.workload {
        Workload::Append => "append",
        Workload::Read => "read",
    };
    let json = json!({
        "workload": workload, "clients": a.clients, "size": a.size, "ops": ops,
        "errors": m.errors, "seconds": m.seconds, "ops_per_sec": ops as f64 / m.seconds,
        "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1000.0,
        "fsyncs_per_append_all_nodes": fsyncs_per_append.as_ref().ok(),
        "fsyncs_unavailable": fsyncs_per_append.as_ref().err(),
    });
    output.emit(json, || {
        let mut lines = vec![
            format!(
                "{workload}: {} clients, {} B: {ops} ops in {:.1}s = {:.0}/s; errors {}",
                a.clients,
                a.size,
                m.seconds,
                ops as f64 / m.seconds,
                m.errors
            ),
            format!(
                "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                h.max() as f64 / 1000.0
            ),
        ];
        match (a.workload, &fsyncs_per_append) {
            (Workload::Append, Ok(f)) => lines.push(format!(
                "fsyncs per acknowledged append (sum over all nodes): {f:.3}"
            )),
            (Workload::Append, Err(why)) => lines.push(format!("fsyncs per append: unavailable ({why})")),
            (Workload::Read, _) => {}
        }
        lines.join("\n")
    });
}
