//! One chaos scenario: a cluster of real nodes, a workload of concurrent
//! appends and reads recorded as a history, faults injected on a schedule
//! drawn from a printed seed, a heal, the recovery bounds, every replica's
//! final state, and the checker's verdict.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mailvault_proto::v1::mailbox_client::MailboxClient;
use mailvault_proto::v1::{
    ClaimMessageRequest, ListMessagesRequest, ReleaseClaimRequest, StateDigestRequest,
    TriggerSnapshotRequest, UpdateFlagsRequest,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::checker::{check, Report};
use crate::history::{digest, Change, Event, Outcome, Recorder, Seen, SharedOp, SharedOutcome};
use crate::net::Net;
use crate::operation_faults::{operations_whole, Launched};
use crate::{
    append, create_mailbox, create_tenant_and_mailbox, fetch, list_all, retry, snapshot_every_node,
    test_message, Cluster, ClusterOptions,
};

/// The tenant every scenario writes to.
pub const TENANT: &str = "chaos";

/// A class of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a random node, restarted after 0–5 s.
    KillRandom,
    /// `kill -9` of the leader, restarted after 0–5 s.
    KillLeader,
    /// SIGSTOP of the leader for longer than the election timeout, then SIGCONT.
    PauseLeader,
    /// The leader cut off from every other node (clients still reach it).
    IsolateLeader,
    /// A random minority cut off from the majority.
    MinoritySplit,
    /// The leader's outgoing packets to the others dropped; it still hears them.
    OneWay,
    /// A quarter of the packets between all nodes dropped.
    Lossy,
    /// The leader's links to the others, both ways, throttled to 16–128 KiB/s.
    SlowLinks,
    /// Power cut of a random node: unsynced writes are gone on restart.
    PowerLossOne,
    /// Power cut of a majority of the nodes at once, the leader among them.
    PowerLossMajority,
    /// Power cut of every node at once (a datacenter outage).
    PowerLossAll,
    /// One node's wall clock off by up to ±10 minutes and running 0.5–2× fast.
    ClockSkew,
    /// One node's data filesystem full; then space freed and the node restarted.
    DiskFull,
    /// `kill -9` of the backup node at a random moment of a backup it was
    /// asked to take (or of the ship and drill that follow it, every second),
    /// restarted after 0–5 s; afterwards every listed backup and off-site
    /// copy must verify, nothing half-taken may remain, and the next backup,
    /// ship and drill must succeed.
    KillBackup,
    /// A two-person operation (delete a mailbox or expunge one in bulk,
    /// both backup first, or grant a role) proposed and approved, then
    /// `kill -9` of the leader 0–1.5 s after the approval, restarted after
    /// 0–5 s; afterwards every such operation must have ended in a recorded
    /// state, its effect whole or absent on every node as its record says
    /// (see `operation_faults`).
    KillOperation,
}

impl Fault {
    /// Every fault class.
    pub const ALL: [Fault; 15] = [
        Fault::KillRandom,
        Fault::KillLeader,
        Fault::PauseLeader,
        Fault::IsolateLeader,
        Fault::MinoritySplit,
        Fault::OneWay,
        Fault::Lossy,
        Fault::SlowLinks,
        Fault::PowerLossOne,
        Fault::PowerLossMajority,
        Fault::PowerLossAll,
        Fault::ClockSkew,
        Fault::DiskFull,
        Fault::KillBackup,
        Fault::KillOperation,
    ];

    /// A short name, for tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillRandom => "kill-random",
            Fault::KillLeader => "kill-leader",
            Fault::PauseLeader => "pause-leader",
            Fault::IsolateLeader => "isolate-leader",
            Fault::MinoritySplit => "minority-split",
            Fault::OneWay => "one-way",
            Fault::Lossy => "lossy",
            Fault::SlowLinks => "slow-links",
            Fault::PowerLossOne => "power-loss-one",
            Fault::PowerLossMajority => "power-loss-majority",
            Fault::PowerLossAll => "power-loss-all",
            Fault::ClockSkew => "clock-skew",
            Fault::DiskFull => "disk-full",
            Fault::KillBackup => "kill-backup",
            Fault::KillOperation => "kill-operation",
        }
    }

    /// Parses [`Fault::name`].
    pub fn parse(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }

    fn needs_disk(self) -> bool {
        matches!(
            self,
            Fault::PowerLossOne | Fault::PowerLossMajority | Fault::PowerLossAll | Fault::DiskFull
        )
    }

    fn needs_network(self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader | Fault::MinoritySplit | Fault::OneWay | Fault::Lossy | Fault::SlowLinks
        )
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The fault class.
    pub fault: Fault,
    /// Seed of every random choice (printed, so a run can be replayed).
    pub seed: u64,
    /// Cluster size.
    pub nodes: usize,
    /// How long the workload and the faults run.
    pub duration: Duration,
    /// Concurrent appending clients.
    pub writers: usize,
    /// Concurrent reading clients.
    pub readers: usize,
    /// Mailboxes written to.
    pub mailboxes: usize,
    /// Concurrent agents claiming and releasing shared messages.
    pub claimers: usize,
    /// Unsafe test modes of the nodes (canaries), empty for none.
    pub test_modes: String,
}

impl Scenario {
    /// The CI shape: 3 nodes, 20 s, 6 writers, 2 readers, 3 claimers, 3 mailboxes.
    pub fn ci(fault: Fault, seed: u64) -> Scenario {
        Scenario {
            fault,
            seed,
            nodes: 3,
            duration: Duration::from_secs(20),
            writers: 6,
            readers: 2,
            mailboxes: 3,
            claimers: 3,
            test_modes: String::new(),
        }
    }
}

/// How long the cluster took to recover after the last heal.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Until every running node agreed on a leader.
    pub leader: Duration,
    /// Until a new append was acknowledged and a linearizable read saw it.
    pub write_and_read: Duration,
    /// Until every node had applied the same log index with the same state digest.
    pub converged: Duration,
}

/// What a scenario found.
#[derive(Debug)]
pub struct Verdict {
    /// The scenario's seed.
    pub seed: u64,
    /// The checker's report, plus any recovery bound missed.
    pub report: Report,
    /// Recovery times.
    pub recovery: Recovery,
    /// Faults injected.
    pub faults: usize,
    /// Where the history was written.
    pub history: PathBuf,
    /// Wall time of the whole scenario.
    pub elapsed: Duration,
    /// What the fault class checked besides the workload (e.g. the
    /// operations a `kill-operation` scenario launched and how they ended).
    pub notes: String,
}

impl Verdict {
    /// The verdict's figures as the cells of one markdown table row (see [`Verdict::TABLE_HEAD`]).
    pub fn row(&self, fault: Fault) -> String {
        let r = &self.report;
        format!(
            "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {:.2}s | {:.2}s | {:.2}s | {:.0}s | {} | {} | {} |",
            fault.name(),
            self.seed,
            self.faults,
            r.acked,
            r.indeterminate,
            r.indeterminate_present,
            r.reads,
            r.claims,
            r.watched,
            self.recovery.leader.as_secs_f64(),
            self.recovery.write_and_read.as_secs_f64(),
            self.recovery.converged.as_secs_f64(),
            self.elapsed.as_secs_f64(),
            if r.ok() {
                "ok".to_string()
            } else {
                format!("{} violations", r.violations.len())
            },
            self.notes,
            self.history.display()
        )
    }

    /// The header of the table [`Verdict::row`] fills.
    pub const TABLE_HEAD: &'static str = "| fault | seed | faults | acked | indeterminate (present) | reads | claims | watched changes | leader | write+read | converged | wall | result | also checked | history |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";
}

/// Recovery bounds after the last heal.
const LEADER_BOUND: Duration = Duration::from_secs(5);
const WRITE_READ_BOUND: Duration = Duration::from_secs(10);
const CONVERGE_BOUND: Duration = Duration::from_secs(30);
/// Longest a single client call may take before it counts as indeterminate.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the appends of one writer, whatever the duration.
const MAX_APPENDS_PER_WRITER: u64 = 2_000;

fn mailbox_name(i: usize) -> String {
    format!("mb{i}")
}

/// Whether an error says for certain that the request was refused and not applied.
fn definite(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
    )
}

async fn writer(
    clients: Vec<MailboxClient<Channel>>,
    rec: Recorder,
    w: usize,
    seed: u64,
    mailboxes: usize,
    until: Instant,
) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (0x5eed_0000 + w as u64));
    let mut n = 0;
    while Instant::now() < until && n < MAX_APPENDS_PER_WRITER {
        let mailbox = mailbox_name(rng.random_range(0..mailboxes));
        let key = format!("w{w}-{n}");
        n += 1;
        let body = test_message(&key, "customer@example.org", &key, rng.random_range(300..8000));
        let start_ms = rec.now_ms();
        let mut outcome = Outcome::Indeterminate;
        // Retries of one message use the same idempotency key, on other nodes.
        for attempt in 0..3 {
            let mut c = clients[rng.random_range(0..clients.len())].clone();
            match tokio::time::timeout(CALL_TIMEOUT, append(&mut c, TENANT, &mailbox, &key, &body)).await {
                Ok(Ok(r)) => {
                    outcome = Outcome::Ok { uid: r.uid };
                    break;
                }
                Ok(Err(s)) if definite(&s) && attempt == 0 => {
                    outcome = Outcome::Failed;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        rec.push(Event::Append {
            client: w as u32,
            mailbox,
            key,
            digest: digest(&body),
            start_ms,
            end_ms: rec.now_ms(),
            outcome,
        });
    }
}

async fn reader(
    clients: Vec<MailboxClient<Channel>>,
    rec: Recorder,
    r: usize,
    seed: u64,
    mailboxes: usize,
    until: Instant,
) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (0x4ead_0000 + r as u64));
    while Instant::now() < until {
        let mailbox = mailbox_name(rng.random_range(0..mailboxes));
        let node = rng.random_range(0..clients.len());
        let mut c = clients[node].clone();
        let start_ms = rec.now_ms();
        if let Ok(Ok(list)) = tokio::time::timeout(CALL_TIMEOUT, list_all(&mut c, TENANT, &mailbox)).await {
            rec.push(Event::Read {
                client: 1000 + r as u32,
                node,
                mailbox,
                start_ms,
                end_ms: rec.now_ms(),
                messages: list
                    .into_iter()
                    .map(|m| Seen {
                        uid: m.uid,
                        key: m.subject,
                        digest: None,
                    })
                    .collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
    }
}

/// Watches mailboxes from MODSEQ 0 for a few seconds at a time.
async fn watcher(
    clients: Vec<MailboxClient<Channel>>,
    rec: Recorder,
    w: usize,
    seed: u64,
    mailboxes: usize,
    until: Instant,
) {
    use mailvault_proto::v1::{ChangeKind, WatchMailboxRequest};
    use tokio_stream::StreamExt;
    let mut rng = SmallRng::seed_from_u64(seed ^ (0x3a7c_0000 + w as u64));
    while Instant::now() < until {
        let mailbox = mailbox_name(rng.random_range(0..mailboxes));
        let node = rng.random_range(0..clients.len());
        let mut c = clients[node].clone();
        let start_ms = rec.now_ms();
        let watch_for = Duration::from_millis(rng.random_range(1000..4000));
        let req = WatchMailboxRequest {
            tenant: TENANT.into(),
            mailbox: mailbox.clone(),
            since_modseq: 0,
        };
        let Ok(Ok(stream)) = tokio::time::timeout(CALL_TIMEOUT, c.watch_mailbox(req)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let mut changes = Vec::new();
        let stop = tokio::time::Instant::now() + watch_for;
        while let Ok(Some(Ok(ch))) = tokio::time::timeout_at(stop, stream.next()).await {
            changes.push(Change {
                modseq: ch.modseq,
                uid: ch.uid,
                appended: ch.kind == ChangeKind::Appended as i32,
            });
        }
        rec.push(Event::Watch {
            client: 3000 + w as u32,
            node,
            mailbox,
            start_ms,
            end_ms: rec.now_ms(),
            changes,
        });
    }
}

/// Messages appended at setup that the claimers compete for.
const SHARED: u32 = 4;

/// One operation on a shared message: what the client saw, or why not.
async fn shared_op(
    c: &mut MailboxClient<Channel>,
    uid: u32,
    agent: &str,
    op: SharedOp,
    flag_on: bool,
) -> Result<(u64, Option<String>), Status> {
    let (tenant, mailbox) = (TENANT.to_string(), mailbox_name(0));
    let agent = agent.to_string();
    Ok(match op {
        SharedOp::Claim => {
            let r = c
                .claim_message(ClaimMessageRequest {
                    tenant,
                    mailbox,
                    uid,
                    agent,
                })
                .await?;
            (r.into_inner().modseq, None)
        }
        SharedOp::Release => {
            let r = c
                .release_claim(ReleaseClaimRequest {
                    tenant,
                    mailbox,
                    uid,
                    agent,
                })
                .await?;
            (r.into_inner().modseq, None)
        }
        SharedOp::SetFlagsIfUnchanged { since } => {
            let flag = vec!["$Handled".to_string()];
            let (add, remove) = if flag_on { (flag, vec![]) } else { (vec![], flag) };
            let req = UpdateFlagsRequest {
                tenant,
                mailbox,
                uid,
                add,
                remove,
                unchanged_since: Some(since),
            };
            (c.update_flags(req).await?.into_inner().modseq, None)
        }
        SharedOp::Read => {
            let req = ListMessagesRequest {
                tenant,
                mailbox,
                uid_min: uid,
                uid_max: uid,
                page_size: 1,
                ..Default::default()
            };
            let list = c.list_messages(req).await?.into_inner();
            let m = list
                .messages
                .into_iter()
                .next()
                .ok_or_else(|| Status::not_found("shared message missing"))?;
            let holder = (!m.claimed_by.is_empty()).then_some(m.claimed_by);
            (m.modseq, holder)
        }
    })
}

/// An agent claiming, releasing, conditionally flagging and reading the
/// shared messages. A conditional update names the MODSEQ this agent last
/// saw for the message, so some succeed and some are refused.
async fn claimer(
    clients: Vec<MailboxClient<Channel>>,
    rec: Recorder,
    c: usize,
    seed: u64,
    shared: Vec<u32>,
    until: Instant,
) {
    let mut rng = SmallRng::seed_from_u64(seed ^ (0xc1a1_0000 + c as u64));
    let agent = format!("agent-{c}");
    let mut last_seen: std::collections::HashMap<u32, u64> = Default::default();
    while Instant::now() < until {
        let uid = shared[rng.random_range(0..shared.len())];
        let op = match (rng.random_range(0..100), last_seen.get(&uid)) {
            (0..30, _) => SharedOp::Claim,
            (30..55, _) => SharedOp::Release,
            (55..80, Some(&since)) => SharedOp::SetFlagsIfUnchanged { since },
            _ => SharedOp::Read,
        };
        let mut cl = clients[rng.random_range(0..clients.len())].clone();
        let start_ms = rec.now_ms();
        let call = shared_op(&mut cl, uid, &agent, op, rng.random_bool(0.5));
        let outcome = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok((modseq, claimed_by))) => {
                last_seen.insert(uid, modseq);
                SharedOutcome::Ok { modseq, claimed_by }
            }
            Ok(Err(s)) if s.code() == Code::FailedPrecondition => SharedOutcome::Refused,
            _ => SharedOutcome::Indeterminate,
        };
        rec.push(Event::Shared {
            client: 2000 + c as u32,
            mailbox: mailbox_name(0),
            uid,
            agent: agent.clone(),
            what: op,
            start_ms,
            end_ms: rec.now_ms(),
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
    }
}

/// Appends the messages the claimers compete for; returns their UIDs.
async fn append_shared(cluster: &Cluster, rec: &Recorder) -> anyhow::Result<Vec<u32>> {
    let c = cluster.mailbox(0).await;
    let mut uids = Vec::new();
    for i in 0..SHARED {
        let key = format!("shared-{i}");
        let body = test_message(&key, "customer@example.org", &key, 1000);
        let start_ms = rec.now_ms();
        let r = retry(Duration::from_secs(20), || {
            let mut c = c.clone();
            let (key, body) = (key.clone(), body.clone());
            async move { append(&mut c, TENANT, &mailbox_name(0), &key, &body).await }
        })
        .await?;
        rec.push(Event::Append {
            client: 9998,
            mailbox: mailbox_name(0),
            key,
            digest: digest(&body),
            start_ms,
            end_ms: rec.now_ms(),
            outcome: Outcome::Ok { uid: r.uid },
        });
        uids.push(r.uid);
    }
    Ok(uids)
}

/// The node most running nodes name as leader right now (calls time out after 1 s).
async fn leader_guess(cluster: &mut Cluster) -> Option<usize> {
    let mut votes = vec![0usize; cluster.len()];
    for i in 0..cluster.len() {
        if !cluster.is_running(i) {
            continue;
        }
        let mut a = cluster.admin(i).await;
        let mut req = tonic::Request::new(mailvault_proto::v1::NodeStatusRequest {});
        req.set_timeout(Duration::from_secs(1));
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), a.cluster.node_status(req)).await {
            let s = s.into_inner();
            if s.has_leader && s.leader_id >= 1 && (s.leader_id as usize) <= cluster.len() {
                votes[s.leader_id as usize - 1] += 1;
            }
        }
    }
    let (best, n) = votes.iter().enumerate().max_by_key(|(_, n)| **n)?;
    (*n > 0).then_some(best)
}

/// Injects fault number `k`, waits while it lasts, and heals it. A
/// `kill-operation` fault adds the operation it launched to `launched`.
async fn inject(
    cluster: &mut Cluster,
    net: Option<&Net>,
    (fault, k): (Fault, usize),
    rng: &mut SmallRng,
    rec: &Recorder,
    launched: &mut Vec<Launched>,
) {
    let n = cluster.len();
    let leader = leader_guess(cluster).await.unwrap_or(0);
    let lasting = Duration::from_millis(rng.random_range(1500..4000));
    let ips: Vec<_> = (0..n).map(|i| cluster.ip(i)).collect();
    match fault {
        Fault::KillRandom | Fault::KillLeader => {
            let victim = match fault {
                Fault::KillLeader => leader,
                _ => rng.random_range(0..n),
            };
            rec.fault(format!("kill -9 node {}", victim + 1));
            cluster.kill(victim);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5000))).await;
            rec.fault(format!("restart node {}", victim + 1));
            cluster.start_node(victim);
        }
        Fault::KillBackup => {
            // Node 3 is the backup node (the last node of a smaller cluster).
            let victim = 2.min(n - 1);
            let mut b = cluster.admin(0).await.backups;
            let asked = tokio::spawn(async move {
                let mut req = tonic::Request::new(mailvault_proto::v1::TakeBackupRequest {});
                req.set_timeout(Duration::from_secs(30));
                b.take_backup(req).await.map(|_| ())
            });
            // From before the backup starts to after it, during the ship and drill.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..3000))).await;
            rec.fault(format!(
                "kill -9 node {} (backup node, a backup asked for)",
                victim + 1
            ));
            cluster.kill(victim);
            let outcome = match tokio::time::timeout(Duration::from_secs(35), asked).await {
                Ok(Ok(Ok(()))) => "taken before the kill".to_string(),
                Ok(Ok(Err(s))) => format!("{:?}", s.code()),
                _ => "no answer".to_string(),
            };
            rec.fault(format!("the backup: {outcome}"));
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5000))).await;
            rec.fault(format!("restart node {}", victim + 1));
            cluster.start_node(victim);
        }
        Fault::KillOperation => {
            let id = match crate::operation_faults::launch(cluster, (TENANT, &mailbox_name(0)), k, rng, rec)
                .await
            {
                Ok(l) => {
                    let id = l.id().to_string();
                    launched.push(l);
                    Some(id)
                }
                Err(e) => {
                    rec.fault(format!("no operation launched: {e}"));
                    None
                }
            };
            // Before the pre-operation backup, during it, during the step, or after.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
            let stage = match &id {
                Some(id) => crate::operation_faults::stage_of(cluster, id).await,
                None => "none launched".into(),
            };
            let victim = leader_guess(cluster).await.unwrap_or(leader);
            rec.fault(format!(
                "kill -9 node {} (leader; the operation: {stage})",
                victim + 1
            ));
            cluster.kill(victim);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5000))).await;
            rec.fault(format!("restart node {}", victim + 1));
            cluster.start_node(victim);
        }
        Fault::PowerLossOne | Fault::PowerLossMajority | Fault::PowerLossAll => {
            let victims: Vec<usize> = match fault {
                Fault::PowerLossAll => (0..n).collect(),
                Fault::PowerLossMajority => {
                    let mut others: Vec<usize> = (0..n).filter(|&i| i != leader).collect();
                    for i in (1..others.len()).rev() {
                        others.swap(i, rng.random_range(0..=i));
                    }
                    let mut v = vec![leader];
                    v.extend(others.into_iter().take(n / 2));
                    v.sort();
                    v
                }
                _ => vec![rng.random_range(0..n)],
            };
            rec.fault(format!("power cut of nodes {victims:?} (0-based)"));
            tokio::task::block_in_place(|| victims.iter().for_each(|&v| cluster.power_cut(v)));
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..3000))).await;
            rec.fault("power back");
            victims.iter().for_each(|&v| cluster.start_node(v));
        }
        Fault::ClockSkew => {
            let victim = rng.random_range(0..n);
            let offset = rng.random_range(30..600) * if rng.random_bool(0.5) { 1 } else { -1 };
            let rate = [0.5, 0.8, 1.5, 2.0][rng.random_range(0..4)];
            let spec = format!("{offset:+}s x{rate}");
            rec.fault(format!("clock of node {} set to {spec}", victim + 1));
            cluster.set_clock(victim, &spec);
            tokio::time::sleep(lasting + Duration::from_millis(2000)).await;
            rec.fault(format!("clock of node {} back to real time", victim + 1));
            cluster.set_clock(victim, "+0");
        }
        Fault::DiskFull => {
            let victim = rng.random_range(0..n);
            rec.fault(format!("filesystem of node {} full", victim + 1));
            if let Some(Err(e)) = cluster.data_fs(victim).map(|fs| fs.fill(0)) {
                rec.fault(format!("could not fill the filesystem: {e}"));
            }
            // The write-ahead log has space preallocated; a snapshot (memtable
            // flush, snapshot file) is sure to need new space.
            let mut a = cluster.admin(victim).await;
            let mut req = tonic::Request::new(TriggerSnapshotRequest { purge_log: false });
            req.set_timeout(Duration::from_secs(5));
            let snap = a.cluster.trigger_snapshot(req).await;
            rec.fault(format!(
                "snapshot on the full node: {}",
                match &snap {
                    Ok(_) => "succeeded".to_string(),
                    Err(s) => format!("failed {:?}", s.code()),
                }
            ));
            tokio::time::sleep(lasting).await;
            // A node whose storage write failed stops Raft and exits non-zero
            // (crash-only); its supervisor, here the harness, restarts it.
            let state = match cluster.exited(victim) {
                Some(status) => format!("had exited ({status})"),
                None => "still running".to_string(),
            };
            rec.fault(format!("node {} {state} with its disk full", victim + 1));
            if let Some(fs) = cluster.data_fs(victim) {
                fs.unfill();
            }
            rec.fault(format!("space freed; node {} restarted", victim + 1));
            cluster.kill(victim);
            cluster.start_node(victim);
        }
        Fault::PauseLeader => {
            rec.fault(format!("SIGSTOP node {} (leader)", leader + 1));
            cluster.pause(leader);
            // Longer than the election timeout (at most 1.6 s in test clusters).
            tokio::time::sleep(lasting + Duration::from_millis(1000)).await;
            rec.fault(format!("SIGCONT node {}", leader + 1));
            cluster.resume(leader);
        }
        Fault::IsolateLeader | Fault::MinoritySplit | Fault::OneWay | Fault::Lossy | Fault::SlowLinks => {
            let net = net.expect("network faults need nftables");
            let others: Vec<_> = (0..n).filter(|&i| i != leader).map(|i| ips[i]).collect();
            let what = match fault {
                Fault::IsolateLeader => {
                    let _ = net.partition(&[ips[leader]], &others);
                    format!("isolate node {} (leader)", leader + 1)
                }
                Fault::MinoritySplit => {
                    let mut order: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() {
                        order.swap(i, rng.random_range(0..=i));
                    }
                    let (minority, majority) = order.split_at((n - 1) / 2);
                    let side = |v: &[usize]| v.iter().map(|&i| ips[i]).collect::<Vec<_>>();
                    let _ = net.partition(&side(minority), &side(majority));
                    format!("split nodes {minority:?} from {majority:?} (0-based)")
                }
                Fault::OneWay => {
                    for &o in &others {
                        let _ = net.cut(ips[leader], o);
                    }
                    format!("drop node {} (leader) -> others", leader + 1)
                }
                Fault::SlowLinks => {
                    let rate = [16, 32, 64, 128][rng.random_range(0..4)];
                    for &o in &others {
                        let _ = net.slow(ips[leader], o, rate);
                        let _ = net.slow(o, ips[leader], rate);
                    }
                    format!("links of node {} (leader) slowed to {rate} KiB/s", leader + 1)
                }
                _ => {
                    for &a in &ips {
                        for &b in ips.iter().filter(|&&b| b != a) {
                            let _ = net.lossy(a, b, 25);
                        }
                    }
                    "drop 25% between all nodes".to_string()
                }
            };
            rec.fault(what);
            tokio::time::sleep(lasting).await;
            rec.fault("heal network");
            let _ = net.heal();
        }
    }
}

/// Waits for the recovery bounds; returns the times and any bound missed.
/// Measures, from the last heal on (the workload still running), until a
/// leader is agreed and until an acknowledged write is seen by a read.
async fn recover(cluster: &mut Cluster, rec: &Recorder, healed: Instant) -> (Recovery, Vec<String>) {
    let mut missed = Vec::new();
    let mut r = Recovery::default();
    let leader = loop {
        if let Some(l) = leader_guess(cluster).await {
            if cluster.is_running(l) {
                break Some(l);
            }
        }
        if healed.elapsed() > CONVERGE_BOUND {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    r.leader = healed.elapsed();
    if leader.is_none() || r.leader > LEADER_BOUND {
        missed.push(format!(
            "no leader within {LEADER_BOUND:?} of the heal (took {:?})",
            r.leader
        ));
    }
    if leader.is_none() {
        return (r, missed);
    }
    // A fresh append, acknowledged, then seen by a linearizable read on another node.
    let key = "probe-after-heal".to_string();
    let body = test_message(&key, "customer@example.org", &key, 500);
    let start_ms = rec.now_ms();
    let mut c = cluster.mailbox(0).await;
    let acked = retry(WRITE_READ_BOUND, || {
        let mut c = c.clone();
        let (key, body) = (key.clone(), body.clone());
        async move { append(&mut c, TENANT, &mailbox_name(0), &key, &body).await }
    })
    .await;
    rec.push(Event::Append {
        client: 9999,
        mailbox: mailbox_name(0),
        key: key.clone(),
        digest: digest(&body),
        start_ms,
        end_ms: rec.now_ms(),
        outcome: match &acked {
            Ok(a) => Outcome::Ok { uid: a.uid },
            Err(_) => Outcome::Indeterminate,
        },
    });
    let mut seen = false;
    let reader_node = cluster.len() - 1;
    let mut rc = cluster.mailbox(reader_node).await;
    while acked.is_ok() && healed.elapsed() < WRITE_READ_BOUND * 2 {
        if let Ok(l) = list_all(&mut rc, TENANT, &mailbox_name(0)).await {
            seen = l.iter().any(|m| m.subject == key);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.write_and_read = healed.elapsed();
    if !seen || r.write_and_read > WRITE_READ_BOUND {
        missed.push(format!(
            "no acknowledged write seen by a read within {WRITE_READ_BOUND:?} (took {:?}; acked {}, seen {seen})",
            r.write_and_read,
            acked.is_ok()
        ));
    }
    let _ = &mut c;
    (r, missed)
}

/// Waits, once the workload has stopped, until every node has applied the
/// same log index; records the time since the last heal.
async fn converge(cluster: &Cluster, healed: Instant, r: &mut Recovery, missed: &mut Vec<String>) {
    let mut last = Vec::new();
    loop {
        last.clear();
        for i in 0..cluster.len() {
            let mut a = cluster.admin(i).await;
            let d = a.cluster.state_digest(StateDigestRequest {}).await.ok().map(|d| {
                let d = d.into_inner();
                (d.applied_index, d.sha256)
            });
            last.push(d);
        }
        if last[0].is_some() && last.iter().all(|d| *d == last[0]) {
            break;
        }
        if healed.elapsed() > CONVERGE_BOUND {
            let shown: Vec<String> = last
                .iter()
                .map(|d| match d {
                    Some((i, h)) => format!("{i}:{}", &h[..12]),
                    None => "unreachable".into(),
                })
                .collect();
            missed.push(format!(
                "replicas did not reach the same applied index and state digest within {CONVERGE_BOUND:?}: {shown:?}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    r.converged = healed.elapsed();
}

/// After `kill-backup`: nothing half-taken is left under the backup node's
/// root, every backup the catalog lists as held verifies, and a backup taken
/// now is whole and ships, reads back and drills. Returns what failed.
async fn backups_whole(cluster: &Cluster, rec: &Recorder) -> Vec<String> {
    use mailvault_proto::v1::{
        ListBackupsRequest, ShipBackupRequest, TakeBackupRequest, VerifyBackupRequest,
    };
    let mut problems = Vec::new();
    let node = 2.min(cluster.len() - 1);
    let root = cluster.data_dir(node).join("backups");
    let deadline = Instant::now() + Duration::from_secs(60);
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("incoming-") || n == "drills")
                    .collect()
            })
            .unwrap_or_default()
    };
    while !leftovers().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if !leftovers().is_empty() {
        problems.push(format!(
            "half-taken backups left on node {}: {:?}",
            node + 1,
            leftovers()
        ));
    }
    let b = cluster.admin(0).await.backups;
    let listed = retry(Duration::from_secs(30), || {
        let mut b = b.clone();
        async move { b.list_backups(ListBackupsRequest {}).await }
    })
    .await;
    let listed = match listed {
        Ok(l) => l.into_inner().backups,
        Err(e) => return vec![format!("the backup catalog cannot be listed: {:?}", e.code())],
    };
    for backup in listed.iter().filter(|b| b.local) {
        let v = retry(Duration::from_secs(30), || {
            let (mut b, id) = (b.clone(), backup.id.clone());
            async move { b.verify_backup(VerifyBackupRequest { id }).await }
        })
        .await;
        match v.map(|v| v.into_inner()) {
            Ok(v) if v.ok => {}
            Ok(v) => problems.push(format!(
                "listed backup {} does not verify: {}",
                backup.id, v.problem
            )),
            Err(e) => problems.push(format!(
                "listed backup {} cannot be verified: {:?}",
                backup.id,
                e.code()
            )),
        }
    }
    let taken = retry(Duration::from_secs(60), || {
        let mut b = b.clone();
        async move { b.take_backup(TakeBackupRequest {}).await }
    })
    .await;
    let id = match taken.map(|t| t.into_inner().backup.unwrap_or_default().id) {
        Ok(id) => id,
        Err(e) => {
            problems.push(format!("no backup could be taken after the heal: {:?}", e.code()));
            return problems;
        }
    };
    let shipped = retry(Duration::from_secs(60), || {
        let (mut b, id) = (b.clone(), id.clone());
        async move { b.ship_backup(ShipBackupRequest { id }).await }
    })
    .await;
    match shipped.map(|s| s.into_inner().backup.unwrap_or_default()) {
        Ok(b) if b.drill.as_ref().is_some_and(|d| d.passed) => {}
        Ok(b) => problems.push(format!(
            "backup {id} shipped but its drill did not pass: {:?}",
            b.drill
        )),
        Err(e) => problems.push(format!(
            "backup {id} could not be shipped after the heal: {:?}",
            e.code()
        )),
    }
    rec.fault(format!(
        "backups after the heal: {} listed, {} held, one more taken, shipped and drilled",
        listed.len(),
        listed.iter().filter(|b| b.local).count()
    ));
    problems
}

/// Every node's copy of every mailbox, bodies fetched and digested.
async fn finals(cluster: &Cluster, mailboxes: usize, rec: &Recorder) -> Vec<String> {
    let mut problems = Vec::new();
    for node in 0..cluster.len() {
        let c = cluster.mailbox(node).await;
        for m in 0..mailboxes {
            let mailbox = mailbox_name(m);
            let listed = retry(Duration::from_secs(20), || {
                let mut c = c.clone();
                let mailbox = mailbox.clone();
                async move { list_all(&mut c, TENANT, &mailbox).await }
            })
            .await;
            let listed = match listed {
                Ok(l) => l,
                Err(s) => {
                    // A node that cannot list one mailbox is down; don't wait on the others.
                    problems.push(format!("node {node} cannot list {mailbox}: {:?}", s.code()));
                    break;
                }
            };
            let mut messages = Vec::new();
            for s in listed {
                let fetched = retry(Duration::from_secs(20), || {
                    let mut c = c.clone();
                    let mailbox = mailbox.clone();
                    async move { fetch(&mut c, TENANT, &mailbox, s.uid).await }
                })
                .await;
                let digest = match fetched {
                    Ok((_, bytes)) => Some(digest(&bytes)),
                    Err(e) => {
                        problems.push(format!(
                            "node {node} cannot read {mailbox} uid {}: {:?}",
                            s.uid,
                            e.code()
                        ));
                        None
                    }
                };
                messages.push(Seen {
                    uid: s.uid,
                    key: s.subject,
                    digest,
                });
            }
            rec.push(Event::Final {
                node,
                mailbox,
                messages,
            });
        }
    }
    problems
}

/// Runs a scenario and writes its history to `out_dir`.
pub async fn run(s: &Scenario, out_dir: &Path) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    eprintln!(
        "chaos scenario {} seed {} ({} nodes, {:?})",
        s.fault.name(),
        s.seed,
        s.nodes,
        s.duration
    );
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: s.nodes,
        test_modes: s.test_modes.clone(),
        loop_fs_mb: if s.fault.needs_disk() { 256 } else { 0 },
        fake_clock: s.fault == Fault::ClockSkew,
        // Every new backup shipped and drilled at once (to the node's own
        // off-site directory), so the kills also land in ships.
        backup: match s.fault {
            Fault::KillBackup => "ship_interval_secs = 1\n".into(),
            _ => String::new(),
        },
        ..Default::default()
    })
    .await;
    let net = match s.fault.needs_network() {
        true => Some(Net::new(&cluster.tag())?),
        false => None,
    };
    create_tenant_and_mailbox(&cluster, 0, TENANT, &mailbox_name(0)).await;
    for m in 1..s.mailboxes {
        create_mailbox(&cluster, 0, TENANT, &mailbox_name(m)).await?;
    }
    // A snapshot on every node makes the setup (tenant, grants, mailboxes)
    // durable by itself, so a canary that skips fsync loses workload mail,
    // not the policy that lets the checker read it back.
    snapshot_every_node(&cluster).await?;
    let rec = Recorder::new();
    let shared = append_shared(&cluster, &rec).await?;
    let until = Instant::now() + s.duration;
    let mut clients = Vec::new();
    for i in 0..cluster.len() {
        clients.push(cluster.mailbox(i).await);
    }
    let mut tasks = Vec::new();
    for w in 0..s.writers {
        tasks.push(tokio::spawn(writer(
            clients.clone(),
            rec.clone(),
            w,
            s.seed,
            s.mailboxes,
            until,
        )));
    }
    for r in 0..s.readers {
        tasks.push(tokio::spawn(reader(
            clients.clone(),
            rec.clone(),
            r,
            s.seed,
            s.mailboxes,
            until,
        )));
    }
    let watchers = s.readers.min(2);
    for w in 0..watchers {
        let (clients, rec) = (clients.clone(), rec.clone());
        tasks.push(tokio::spawn(watcher(clients, rec, w, s.seed, s.mailboxes, until)));
    }
    for c in 0..s.claimers {
        let (clients, rec, shared) = (clients.clone(), rec.clone(), shared.clone());
        tasks.push(tokio::spawn(claimer(clients, rec, c, s.seed, shared, until)));
    }
    let mut rng = SmallRng::seed_from_u64(s.seed);
    let mut faults = 0;
    let mut launched = Vec::new();
    // Faults while at least 5 s of workload remain, so the last one heals inside it.
    while Instant::now() + Duration::from_secs(5) < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        inject(
            &mut cluster,
            net.as_ref(),
            (s.fault, faults),
            &mut rng,
            &rec,
            &mut launched,
        )
        .await;
        faults += 1;
    }
    // Every fault is healed here; the recovery bounds run from now.
    let healed = Instant::now();
    let mut crashed = Vec::new();
    for i in 0..cluster.len() {
        if let Some(status) = cluster.exited(i) {
            crashed.push(format!("node {i} exited by itself ({status})"));
        }
        if !cluster.is_running(i) {
            cluster.start_node(i);
        }
    }
    let (mut recovery, mut missed) = recover(&mut cluster, &rec, healed).await;
    for t in tasks {
        let _ = t.await;
    }
    converge(&cluster, healed, &mut recovery, &mut missed).await;
    let unreadable = finals(&cluster, s.mailboxes, &rec).await;
    if s.fault == Fault::KillBackup {
        missed.extend(backups_whole(&cluster, &rec).await);
    }
    let mut notes = String::new();
    if s.fault == Fault::KillOperation {
        let (problems, summary) = operations_whole(&cluster, &launched, &rec).await;
        if launched.is_empty() {
            missed.push("no operation was launched".into());
        }
        missed.extend(problems);
        notes = summary;
    }
    std::fs::create_dir_all(out_dir)?;
    let history = out_dir.join(format!("{}-{}.jsonl", s.fault.name(), s.seed));
    rec.save(&history)?;
    let mut report = check(&rec.events());
    report.violations.extend(missed);
    report.violations.extend(unreadable);
    report.violations.extend(crashed);
    if !report.ok() {
        cluster.dump_logs();
    }
    Ok(Verdict {
        seed: s.seed,
        report,
        recovery,
        faults,
        history,
        elapsed: started.elapsed(),
        notes,
    })
}

/// A seed from the environment (`MAILVAULT_CHAOS_SEED`) or the clock.
pub fn seed_from_env() -> u64 {
    std::env::var("MAILVAULT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}
