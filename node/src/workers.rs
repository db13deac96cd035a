//! The node's long-lived background work, under one supervisor: every worker
//! has a name and a state that `NodeStatus` and `/metrics` show
//! (`mailvault_worker_up{worker}`, `mailvault_worker_failures_total{worker}`),
//! and one shutdown path stops them all. A worker that ends before shutdown
//! — returns, fails or panics — is reported as failed (logged, counted,
//! shown), never silently gone; an *essential* worker (a listener, the Raft
//! watch) ending stops the node, which exits non-zero so its own supervisor
//! restarts it (crash-only).
//!
//! A new kind of background work (a health monitor, a backup scheduler, a
//! shipper) is one more [`Supervisor::spawn`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::clock::now_ms;

/// What happens when a worker ends before shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The node cannot serve without it: its end stops the node.
    Essential,
    /// Reported as failed; the node keeps serving what it can.
    Background,
}

/// A worker's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Running.
    Running,
    /// Ended because the node is shutting down.
    Stopped,
    /// Ended before shutdown: how.
    Failed(String),
}

impl State {
    /// `running`, `stopped` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Stopped => "stopped",
            State::Failed(_) => "failed",
        }
    }
}

/// One worker as `status` shows it.
#[derive(Debug, Clone)]
pub struct Status {
    /// Its name.
    pub name: &'static str,
    /// Its state.
    pub state: State,
    /// Since when (ms since the Unix epoch).
    pub since_ms: i64,
}

#[derive(Default)]
struct Registry {
    workers: Vec<Status>,
    stopping: bool,
}

/// Starts, watches and stops the node's workers.
#[derive(Clone)]
pub struct Supervisor {
    registry: Arc<Mutex<Registry>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    stop: Arc<watch::Sender<bool>>,
    /// Told when an essential worker ends before shutdown (with why).
    ended: mpsc::UnboundedSender<String>,
    ended_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    /// A supervisor with no workers.
    pub fn new() -> Supervisor {
        let (ended, ended_rx) = mpsc::unbounded_channel();
        Supervisor {
            registry: Arc::default(),
            tasks: Arc::default(),
            stop: Arc::new(watch::channel(false).0),
            ended,
            ended_rx: Arc::new(tokio::sync::Mutex::new(ended_rx)),
        }
    }

    /// Resolves once shutdown has begun (for workers that stop on their own).
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    fn register(&self, name: &'static str) -> usize {
        let mut r = self.registry.lock().expect("worker registry");
        r.workers.push(Status {
            name,
            state: State::Running,
            since_ms: now_ms(),
        });
        r.workers.len() - 1
    }

    /// Records how worker `slot` ended: during shutdown it stopped, however
    /// it ended (Raft stopping ends some with an error); before, it failed.
    fn ended(&self, slot: usize, kind: Kind, outcome: Result<(), String>) {
        let mut r = self.registry.lock().expect("worker registry");
        let stopping = r.stopping;
        let w = &mut r.workers[slot];
        let name = w.name;
        w.since_ms = now_ms();
        w.state = match (stopping, outcome) {
            (true, _) => State::Stopped,
            (false, Err(e)) => State::Failed(e),
            (false, Ok(())) => State::Failed("ended early".into()),
        };
        if let State::Failed(why) = &w.state {
            let why = why.clone();
            drop(r);
            metrics::counter!("mailvault_worker_failures_total", "worker" => name).increment(1);
            tracing::error!(worker = name, why = %why, "a worker ended");
            if kind == Kind::Essential {
                let _ = self.ended.send(format!("{name}: {why}"));
            }
        }
    }

    /// Runs `work` as the worker `name`; it is cancelled when shutdown begins.
    pub fn spawn<F>(&self, name: &'static str, kind: Kind, work: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stopping = self.stopping();
        self.spawn_graceful(name, kind, async move {
            tokio::select! {
                r = work => r,
                () = stopping => Ok(()),
            }
        });
    }

    /// Runs `work` as the worker `name`, which stops by itself once
    /// [`Self::stopping`] resolves (a listener finishing its calls); it is
    /// cancelled only if it has not ended within the shutdown's grace.
    pub fn spawn_graceful<F>(&self, name: &'static str, kind: Kind, work: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let slot = self.register(name);
        let this = self.clone();
        let mut tasks = self.tasks.lock().expect("worker tasks");
        tasks.spawn(async move {
            let outcome = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err("panicked".to_string()),
            };
            this.ended(slot, kind, outcome);
        });
    }

    /// Runs `work` on a thread of its own as the worker `name` (for blocking
    /// work such as the WAL syncer).
    pub fn thread<F>(&self, name: &'static str, kind: Kind, work: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let slot = self.register(name);
        let this = self.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                    .map_err(|_| "panicked".to_string());
                this.ended(slot, kind, outcome);
            })
            .expect("spawn a worker thread");
    }

    /// Sets `mailvault_worker_up{worker}` (1 running, 0 not) for every worker;
    /// called before `/metrics` renders, so workers started before the
    /// metrics recorder was installed are shown too.
    pub fn publish_metrics(&self) {
        for w in self.statuses() {
            let up = f64::from(u8::from(w.state == State::Running));
            metrics::gauge!("mailvault_worker_up", "worker" => w.name).set(up);
        }
    }

    /// Every worker and its state, in the order they started.
    pub fn statuses(&self) -> Vec<Status> {
        self.registry.lock().expect("worker registry").workers.clone()
    }

    /// Waits until an essential worker ends before shutdown; says which and why.
    pub async fn essential_ended(&self) -> String {
        let mut rx = self.ended_rx.lock().await;
        rx.recv().await.unwrap_or_else(|| "supervisor gone".into())
    }

    /// The one shutdown path: tells every worker to stop, runs `then` (the
    /// node stops Raft there), gives the workers `grace` to end, then cancels
    /// the rest. (A thread ends by itself when what it serves is dropped.)
    pub async fn shutdown(&self, grace: Duration, then: impl Future<Output = ()>) {
        self.registry.lock().expect("worker registry").stopping = true;
        let _ = self.stop.send(true);
        then.await;
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("worker tasks"));
        let all_ended = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_ended).await.is_err() {
            let names: Vec<_> = self
                .statuses()
                .into_iter()
                .filter(|w| w.state == State::Running)
                .map(|w| w.name)
                .collect();
            tracing::info!(workers = ?names, "cancelling workers that did not stop in time");
            tasks.shutdown().await;
            let mut r = self.registry.lock().expect("worker registry");
            for w in r.workers.iter_mut().filter(|w| w.state == State::Running) {
                w.state = State::Stopped;
                w.since_ms = now_ms();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(s: &Supervisor, name: &str) -> State {
        s.statuses().into_iter().find(|w| w.name == name).unwrap().state
    }

    /// Waits (at most 10 s) until `name` has left the running state.
    async fn ended(s: &Supervisor, name: &str) -> State {
        for _ in 0..1000 {
            match state(s, name) {
                State::Running => tokio::time::sleep(Duration::from_millis(10)).await,
                other => return other,
            }
        }
        panic!("{name} still running");
    }

    #[tokio::test]
    async fn a_worker_that_fails_panics_or_ends_early_is_reported() {
        let s = Supervisor::new();
        let stop = s.stopping();
        s.spawn("waits", Kind::Background, async move {
            stop.await;
            Ok(())
        });
        s.spawn("fails", Kind::Background, async { anyhow::bail!("disk gone") });
        s.spawn("panics", Kind::Background, async { panic!("bug") });
        s.spawn("returns", Kind::Background, async { Ok(()) });
        s.thread("thread-panics", Kind::Background, || panic!("bug"));
        assert_eq!(ended(&s, "fails").await, State::Failed("disk gone".into()));
        assert_eq!(ended(&s, "panics").await, State::Failed("panicked".into()));
        assert_eq!(ended(&s, "returns").await, State::Failed("ended early".into()));
        assert_eq!(ended(&s, "thread-panics").await, State::Failed("panicked".into()));
        assert_eq!(state(&s, "waits"), State::Running);
        s.shutdown(Duration::from_secs(1), async {}).await;
        assert_eq!(state(&s, "waits"), State::Stopped);
        assert_eq!(state(&s, "fails").as_str(), "failed", "a failure stays reported");
    }

    #[tokio::test]
    async fn an_essential_worker_ending_is_told_and_shutdown_cancels_stragglers() {
        let s = Supervisor::new();
        s.spawn("stubborn", Kind::Background, std::future::pending());
        s.spawn("listener", Kind::Essential, async { anyhow::bail!("port gone") });
        let why = tokio::time::timeout(Duration::from_secs(5), s.essential_ended())
            .await
            .unwrap();
        assert_eq!(why, "listener: port gone");
        s.shutdown(Duration::from_millis(100), async {}).await;
        assert_eq!(state(&s, "stubborn"), State::Stopped);
    }
}
