//! The one load driver both systems are measured with: N concurrent clients,
//! each writing one value after another, until a count or a deadline.
//!
//! A client starts at a given endpoint and moves to the next one after a
//! failure (a dead or leaderless node), after a 20 ms pause, as real clients
//! do. Every acknowledged write is timed; failover runs also keep the time
//! of every acknowledgement to find the longest gap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hdrhistogram::Histogram;

/// Something that acknowledges writes: a mailvault or an etcd cluster.
pub trait Target: Send + Sync + 'static {
    /// How many endpoints clients can write to.
    fn endpoints(&self) -> usize;
    /// Write number `n` by client `client` through `endpoint`; resolves when
    /// acknowledged (durable on a quorum) or failed.
    fn write(&self, client: usize, endpoint: usize, n: u64) -> BoxFuture<'static, Result<(), String>>;
}

/// How hard and how long to drive.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent clients.
    pub clients: usize,
    /// Longest run.
    pub duration: Duration,
    /// Most writes in all.
    pub max_writes: u64,
    /// The endpoint every client starts at (the leader, when known).
    pub first_endpoint: usize,
    /// Keep the time of every acknowledgement (for failover gaps).
    pub keep_ack_times: bool,
    /// Give up an attempt after this long and retry on the next endpoint
    /// (as a client with a request deadline does); `None`: wait for it.
    pub attempt_timeout: Option<Duration>,
}

/// What a run measured.
#[derive(Debug)]
pub struct Measured {
    /// Latency of every acknowledged write, in microseconds.
    pub hist: Histogram<u64>,
    /// Failed attempts (each retried on the next endpoint).
    pub errors: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// When each write was acknowledged, since the run began, sorted (only
    /// with [`Load::keep_ack_times`]).
    pub ack_times: Vec<Duration>,
}

impl Measured {
    /// Acknowledged writes.
    pub fn acked(&self) -> u64 {
        self.hist.len()
    }
    /// Acknowledged writes per second.
    pub fn per_sec(&self) -> f64 {
        self.acked() as f64 / self.seconds
    }
    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    /// The longest time between two acknowledgements (or from `from` to
    /// the first one after it) within `[from, to]` since the run began.
    pub fn longest_gap(&self, from: Duration, to: Duration) -> Duration {
        let mut last = from;
        let mut gap = Duration::ZERO;
        for &t in self.ack_times.iter().filter(|&&t| t > from && t <= to) {
            gap = gap.max(t - last);
            last = t;
        }
        gap.max(to.saturating_sub(last))
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// Drives `target` with `load`; returns what was measured.
pub async fn drive(target: Arc<dyn Target>, load: Load) -> Measured {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + load.duration;
    let endpoints = target.endpoints().max(1);
    let mut tasks = Vec::new();
    for client in 0..load.clients {
        let (next, errors, target) = (next.clone(), errors.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut acks = Vec::new();
            let mut endpoint = load.first_endpoint % endpoints;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= load.max_writes || Instant::now() >= deadline {
                    break;
                }
                // Until acknowledged or out of time: a write is never given up
                // early, so a failover shows as one long latency and a gap.
                loop {
                    let t = Instant::now();
                    let left = deadline.saturating_duration_since(t);
                    let wait = load.attempt_timeout.map_or(left, |a| a.min(left));
                    match tokio::time::timeout(wait, target.write(client, endpoint, n)).await {
                        Ok(Ok(())) => {
                            let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                            if load.keep_ack_times {
                                acks.push(started.elapsed());
                            }
                            break;
                        }
                        Ok(Err(_)) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            endpoint = (endpoint + 1) % endpoints;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) if wait < left => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            endpoint = (endpoint + 1) % endpoints;
                        }
                        Err(_) => break,
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                }
            }
            (hist, acks)
        }));
    }
    let mut hist = histogram();
    let mut ack_times = Vec::new();
    for t in tasks {
        if let Ok((h, a)) = t.await {
            let _ = hist.add(&h);
            ack_times.extend(a);
        }
    }
    ack_times.sort();
    Measured {
        hist,
        errors: errors.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        ack_times,
    }
}

/// A message of exactly `size` bytes (at least its headers): RFC 5322
/// headers naming `n`, then a body of letters from a fixed pseudo-random
/// sequence in lines of 76, so compression gains little, as with real (often
/// already compressed) mail. The body is made once per size and reused.
pub fn value(size: usize, n: u64) -> Vec<u8> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static BODIES: OnceLock<Mutex<HashMap<usize, Arc<Vec<u8>>>>> = OnceLock::new();
    let body = BODIES
        .get_or_init(Default::default)
        .lock()
        .expect("bodies lock")
        .entry(size)
        .or_insert_with(|| Arc::new(letters(size)))
        .clone();
    let head =
        format!("From: bench@example.invalid\r\nTo: load@example.invalid\r\nSubject: bench {n:020}\r\n\r\n");
    let mut v = Vec::with_capacity(size.max(head.len()));
    v.extend_from_slice(head.as_bytes());
    v.extend_from_slice(&body[head.len().min(body.len())..]);
    v
}

fn letters(size: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..size)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match i % 78 {
                76 => b'\r',
                77 => b'\n',
                _ => b'A' + (x % 58) as u8,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_asked_size_and_differ() {
        assert_eq!(value(4096, 1).len(), 4096);
        assert_ne!(value(4096, 1), value(4096, 2));
    }

    #[test]
    fn the_longest_gap_counts_the_edges() {
        let m = Measured {
            hist: histogram(),
            errors: 0,
            seconds: 10.0,
            ack_times: [1, 2, 3, 7, 8].iter().map(|&s| Duration::from_secs(s)).collect(),
        };
        assert_eq!(
            m.longest_gap(Duration::ZERO, Duration::from_secs(10)),
            Duration::from_secs(4)
        );
        // Nothing after 8 s: the gap runs to the end of the window.
        assert_eq!(
            m.longest_gap(Duration::from_secs(2), Duration::from_secs(14)),
            Duration::from_secs(6)
        );
    }
}
