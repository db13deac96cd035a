//! `mailvault-admin bench`: an append load generator against a running cluster.
//!
//! Every client appends unique messages of a fixed size until the count or the
//! duration is reached (both bounded). It prints throughput, latency
//! percentiles, errors, and fsyncs per acknowledged append (from the nodes'
//! `/metrics`, summed over all nodes, so 3 replicas syncing once each count 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mailvault_proto::v1::append_message_request::Frame;
use mailvault_proto::v1::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::client::{admin, mailbox, status_err};
use crate::Output;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Total appends (the run also stops at --duration).
    #[arg(long, default_value_t = 5000)]
    count: u64,
    /// Longest run in seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Tenant to write to (created if missing).
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// Mailbox to write to (created if missing).
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

/// Sums `mailvault_fsyncs_total` over every member's ops endpoint.
async fn fsyncs(endpoint: &str) -> Option<f64> {
    let st = admin(endpoint)
        .await
        .ok()?
        .node_status(NodeStatusRequest {})
        .await
        .ok()?
        .into_inner();
    let mut total = 0.0;
    for m in st.members {
        total += scrape(&m.ops_addr, "mailvault_fsyncs_total").await?;
    }
    Some(total)
}

async fn scrape(addr: &str, metric: &str) -> Option<f64> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    body.lines()
        .find(|l| l.starts_with(metric) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .or(Some(0.0))
}

pub async fn run(endpoint: &str, output: Output, a: BenchArgs) -> anyhow::Result<()> {
    let mut adm = admin(endpoint).await?;
    if let Err(s) = adm
        .create_tenant(CreateTenantRequest {
            tenant: a.tenant.clone(),
        })
        .await
    {
        if s.code() != tonic::Code::AlreadyExists {
            return Err(status_err(s));
        }
    }
    let mut mb = mailbox(endpoint).await?;
    let req = CreateMailboxRequest {
        tenant: a.tenant.clone(),
        mailbox: a.mailbox.clone(),
    };
    if let Err(s) = mb.create_mailbox(req).await {
        if s.code() != tonic::Code::AlreadyExists {
            return Err(status_err(s));
        }
    }
    let before = fsyncs(endpoint).await;
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let run_id = crate::mail::random_key();
    let deadline = Instant::now() + Duration::from_secs(a.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.clients {
        let (hist, next, errors, a, run_id) = (
            hist.clone(),
            next.clone(),
            errors.clone(),
            a.clone(),
            run_id.clone(),
        );
        let mut c = mailbox(endpoint).await?;
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= a.count || Instant::now() >= deadline {
                    break;
                }
                let frames = vec![
                    AppendMessageRequest {
                        frame: Some(Frame::Header(AppendHeader {
                            tenant: a.tenant.clone(),
                            mailbox: a.mailbox.clone(),
                            idempotency_key: format!("{run_id}-{n}"),
                            ..Default::default()
                        })),
                    },
                    AppendMessageRequest {
                        frame: Some(Frame::Chunk(message(a.size, n))),
                    },
                ];
                let t = Instant::now();
                match c.append_message(tokio_stream::iter(frames)).await {
                    Ok(_) => {
                        let _ = local.record(t.elapsed().as_micros() as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            hist.lock().await.add(&local).expect("same bounds");
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = fsyncs(endpoint).await;
    let h = hist.lock().await;
    let ok = h.len();
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    let per_append = match (before, after) {
        (Some(b), Some(a)) if ok > 0 => Some((a - b) / ok as f64),
        _ => None,
    };
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let doc = json!({
        "clients": a.clients, "size": a.size, "appends": ok, "errors": errors,
        "seconds": elapsed, "appends_per_sec": ok as f64 / elapsed,
        "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1000.0,
        "fsyncs_per_append_all_nodes": per_append,
    });
    match output {
        Output::Json => println!("{doc}"),
        Output::Text => {
            println!(
                "{} clients, {} B: {} appends in {:.1}s = {:.0}/s; errors {}",
                a.clients,
                a.size,
                ok,
                elapsed,
                ok as f64 / elapsed,
                errors
            );
            println!(
                "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                h.max() as f64 / 1000.0
            );
            match per_append {
                Some(f) => println!("fsyncs per acknowledged append (sum over all nodes): {f:.3}"),
                None => println!("fsyncs per append: unavailable (ops endpoints unreachable)"),
            }
        }
    }
    Ok(())
}
