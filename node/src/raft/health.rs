//! How the members watch each other.
//!
//! Every node probes every other member every `heal.probe_every_ms` (peer
//! RPC `Probe`: its id, region, free disk space, failed WAL syncs, applied
//! index and clock), so it knows when it last heard from each; the leader's
//! view is the one that counts (status, metrics, the rehearsal of a
//! membership change), because it also knows from replication how far
//! behind each member is. A member not heard from for `heal.down_after_secs`
//! is down. Followers watch the leader through Raft itself (its heartbeats).
//!
//! The same loop keeps this node's own part in elections in line with the
//! replicated membership: it campaigns only while it is a voter whose role
//! may lead, and never once it learns it was removed (a member refused it
//! as `NOT_A_MEMBER`, or the replicated state records its removal) —
//! openraft 0.9 would leave a removed node campaigning with rising terms.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailvault_proto::raft::{ProbeRequest, ProbeResponse};

use super::PeerClients;
use crate::state::types::{Member, NodeId, Raft};

/// The message a probed node signs: a prefix and the prober's nonce.
pub fn probe_message(nonce: &[u8]) -> Vec<u8> {
    let mut m = b"mailvault probe v1\0".to_vec();
    m.extend_from_slice(nonce);
    m
}

/// What a node tells about itself when probed.
pub struct SelfInfo {
    /// The cluster's name, from its config.
    pub cluster_name: String,
    /// Its role and addresses, from its config (`members` or `join`).
    pub member: Member,
    /// Its region label.
    pub region: String,
    /// Its data directory (for the free space).
    pub data_dir: PathBuf,
    /// Its node certificate (DER) and private key (PEM), to sign nonces.
    pub cert_der: Vec<u8>,
    /// See `cert_der`.
    pub key_pem: Vec<u8>,
}

/// What this node last heard from a member.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// When it last answered a probe (this process's clock).
    pub last_contact: Option<Instant>,
    /// The same, ms since the Unix epoch.
    pub last_contact_ms: i64,
    /// Its region, as it reports it.
    pub region: String,
    /// Free bytes on its data directory's file system.
    pub disk_free_bytes: u64,
    /// Its failed WAL syncs since it started.
    pub fsync_errors: u64,
    /// Its applied index.
    pub applied_index: u64,
    /// Its clock minus this node's, ms (halfway through the probe).
    pub clock_offset_ms: i64,
}

/// A member as this node sees it now.
#[derive(Debug, Clone, Default)]
pub struct MemberView {
    /// Heard from within `down_after` (none: not heard from yet, and this
    /// node has not watched it that long).
    pub up: Option<bool>,
    /// Entries behind the leader's log (the leader only).
    pub behind: Option<u64>,
    /// The age of the oldest entry it lacks, seconds (the leader only).
    pub lag_secs: Option<f64>,
    /// How long this node has not heard from it (since this node first saw
    /// it among the members, if never).
    pub silent_for: Duration,
    /// What it last reported.
    pub seen: Seen,
}

/// This node's watch of the members, shared.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeId,
    info: SelfInfo,
    down_after: Duration,
    seen: Mutex<BTreeMap<NodeId, Seen>>,
    /// When this node first saw each member in its membership (a member
    /// never heard from is silent since then).
    first_seen: Mutex<BTreeMap<NodeId, Instant>>,
    /// (last log index, when this node first saw it), oldest first.
    appended: Mutex<VecDeque<(u64, Instant)>>,
    removed: AtomicBool,
    fsync_errors: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Why repair is frozen here and now, beyond the replicated record (the
    /// leader cannot hear a quorum, so it cannot record it either).
    local_freeze: Mutex<Option<String>>,
}

/// How long a probe may take (a first call also connects).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Samples of the log's growth kept for lag in seconds.
const APPENDED_SAMPLES: usize = 4096;

impl Health {
    /// The watch of node `me`, calling a member down after `down_after`;
    /// `fsync_errors` counts this node's failed WAL syncs.
    pub fn new(
        me: NodeId,
        info: SelfInfo,
        down_after: Duration,
        fsync_errors: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Health {
        metrics::gauge!("mailvault_member_removed").set(0.0);
        Health {
            inner: Arc::new(Inner {
                me,
                info,
                down_after,
                seen: Mutex::default(),
                first_seen: Mutex::default(),
                appended: Mutex::default(),
                removed: AtomicBool::new(false),
                fsync_errors,
                local_freeze: Mutex::default(),
            }),
        }
    }

    /// This node's region label.
    pub fn region(&self) -> &str {
        &self.inner.info.region
    }

    /// Why repair is frozen on this leader beyond the replicated record
    /// (none: it is not).
    pub fn local_freeze(&self) -> Option<String> {
        self.inner.local_freeze.lock().expect("health lock").clone()
    }

    /// Sets or clears [`Health::local_freeze`].
    pub fn set_local_freeze(&self, why: Option<String>) {
        let mut f = self.inner.local_freeze.lock().expect("health lock");
        if *f != why {
            match &why {
                Some(w) => tracing::warn!("repair frozen: {w}"),
                None if f.is_some() => {
                    tracing::info!("repair no longer frozen here: the leader hears a quorum")
                }
                None => {}
            }
            *f = why;
        }
    }

    /// Whether this node learned it is no longer a member.
    pub fn removed(&self) -> bool {
        self.inner.removed.load(Ordering::Relaxed)
    }

    /// Notes that this node is no longer a member (it then takes no part in
    /// elections: see [`run`]).
    pub fn mark_removed(&self, why: &str) {
        if !self.inner.removed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                why,
                "this node is no longer a member of the cluster: it serves nothing and does not campaign"
            );
            metrics::gauge!("mailvault_member_removed").set(1.0);
        }
    }

    /// The answer to a probe: this node's facts, the nonce signed.
    pub fn answer(&self, raft: &Raft, nonce: &[u8], initialized: bool) -> ProbeResponse {
        let i = &self.inner.info;
        let m = raft.metrics().borrow().clone();
        let signature = mailvault_proto::approval::sign(&i.key_pem, &i.cert_der, &probe_message(nonce))
            .unwrap_or_default();
        ProbeResponse {
            node_id: self.inner.me,
            cluster_name: i.cluster_name.clone(),
            role: i.member.role.as_str().to_string(),
            region: i.region.clone(),
            client_addr: i.member.client_addr.clone(),
            raft_addr: i.member.raft_addr.clone(),
            ops_addr: i.member.ops_addr.clone(),
            initialized,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            disk_free_bytes: disk_free(&i.data_dir),
            fsync_errors: (self.inner.fsync_errors)(),
            clock_ms: crate::clock::now_ms(),
            certificate: i.cert_der.clone(),
            signature,
            data_version: crate::state::version::DATA_VERSION,
            removed: self.removed(),
        }
    }

    /// Every member's view, as this node sees it now (the leader adds lag).
    pub fn views(&self, raft: &Raft) -> BTreeMap<NodeId, MemberView> {
        let m = raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let seen = self.inner.seen.lock().expect("health lock").clone();
        let appended = self.inner.appended.lock().expect("health lock").clone();
        let now = Instant::now();
        let first_seen = {
            let mut f = self.inner.first_seen.lock().expect("health lock");
            for (id, _) in m.membership_config.membership().nodes() {
                f.entry(*id).or_insert(now);
            }
            f.clone()
        };
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| {
                let s = seen.get(id).cloned().unwrap_or_default();
                let silent_for = match (*id == self.inner.me, s.last_contact) {
                    (true, _) => Duration::ZERO,
                    (false, Some(t)) => now.duration_since(t),
                    (false, None) => first_seen
                        .get(id)
                        .map_or(Duration::ZERO, |t| now.duration_since(*t)),
                };
                let up = match (*id == self.inner.me, s.last_contact.is_some()) {
                    (true, _) => Some(true),
                    _ if silent_for >= self.inner.down_after => Some(false),
                    (false, true) => Some(true),
                    // Not heard from yet, and not for long: not known.
                    (false, false) => None,
                };
                let matched = match &m.replication {
                    Some(_) if *id == self.inner.me => Some(last),
                    Some(r) => r.get(id).map(|l| l.as_ref().map_or(0, |l| l.index)),
                    None => None,
                };
                let behind = matched.map(|x| last.saturating_sub(x));
                let lag_secs = matched.map(|x| match appended.iter().find(|(i, _)| *i > x) {
                    Some((_, t)) if x < last => now.duration_since(*t).as_secs_f64(),
                    _ => 0.0,
                });
                (
                    *id,
                    MemberView {
                        up,
                        behind,
                        lag_secs,
                        silent_for,
                        seen: s,
                    },
                )
            })
            .collect()
    }

    fn note_appended(&self, last: u64) {
        let mut a = self.inner.appended.lock().expect("health lock");
        if a.back().is_none_or(|(i, _)| *i < last) {
            a.push_back((last, Instant::now()));
            while a.len() > APPENDED_SAMPLES {
                a.pop_front();
            }
        }
    }

    fn note_seen(&self, id: NodeId, r: &ProbeResponse, sent_ms: i64) {
        let now_ms = crate::clock::now_ms();
        let seen = Seen {
            last_contact: Some(Instant::now()),
            last_contact_ms: now_ms,
            region: r.region.clone(),
            disk_free_bytes: r.disk_free_bytes,
            fsync_errors: r.fsync_errors,
            applied_index: r.applied_index,
            clock_offset_ms: r.clock_ms - (sent_ms + now_ms) / 2,
        };
        self.inner.seen.lock().expect("health lock").insert(id, seen);
    }
}

/// Free bytes on the file system holding `dir` (0 if it cannot be read).
pub fn disk_free(dir: &std::path::Path) -> u64 {
    rustix::fs::statvfs(dir).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// A fresh 32-byte nonce.
pub fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; 32];
    getrandom::fill(&mut n).expect("the system's random numbers");
    n
}

/// Probes the node at `addr`: its answer, its signature over our nonce
/// checked against the certificate it sent (whether that certificate is the
/// cluster's and names the node is the caller's to check).
pub async fn probe(peers: &PeerClients, addr: &str, timeout: Duration) -> Result<ProbeResponse, String> {
    let mut c = peers.client(addr).map_err(|e| e.to_string())?;
    let nonce = nonce();
    let mut req = tonic::Request::new(ProbeRequest { nonce: nonce.clone() });
    req.set_timeout(timeout);
    let r = c
        .probe(req)
        .await
        .map_err(|s| {
            peers.note_refusal(&s);
            s.message().to_string()
        })?
        .into_inner();
    mailvault_proto::approval::verify(&r.certificate, &probe_message(&nonce), &r.signature)
        .map_err(|e| format!("its answer is not signed by the certificate it sent: {e}"))?;
    Ok(r)
}

/// Probes every member each `every`, records what they answer, exports
/// the per-member metrics, and keeps this node's part in elections in line
/// with the membership. `removed` reads whether the replicated state records
/// this node's removal. Runs until Raft stops.
pub async fn run(
    health: Health,
    raft: Raft,
    peers: PeerClients,
    every: Duration,
    removed: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    let me = health.inner.me;
    let mut elect: Option<bool> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() {
            return;
        }
        health.note_appended(m.last_log_index.unwrap_or(0));
        if peers.told_removed() {
            health.mark_removed("a member refused this node as no longer a member");
        }
        if removed() {
            health.mark_removed("the replicated state records this node's removal");
        }
        let membership = m.membership_config.membership().clone();
        let voter = membership.voter_ids().any(|v| v == me);
        let role = membership.get_node(&me).map(|n| n.role);
        let may = !health.removed() && voter && role.is_some_and(|r| r.may_campaign());
        if elect != Some(may) {
            raft.runtime_config().elect(may);
            if elect.is_some() {
                tracing::info!(campaigns = may, role = ?role, voter, "this node's part in elections changed");
            }
            elect = Some(may);
        }
        let probes = membership
            .nodes()
            .filter(|(id, _)| **id != me)
            .map(|(id, n)| {
                let (id, addr, peers) = (*id, n.raft_addr.clone(), peers.clone());
                async move {
                    let sent = crate::clock::now_ms();
                    (id, sent, probe(&peers, &addr, PROBE_TIMEOUT).await)
                }
            })
            .collect::<Vec<_>>();
        for (id, sent, answer) in futures::future::join_all(probes).await {
            match answer {
                Ok(r) if r.node_id == id => health.note_seen(id, &r, sent),
                Ok(r) => tracing::warn!(
                    member = id,
                    answered = r.node_id,
                    "a member's address answers as another node"
                ),
                Err(e) => tracing::debug!(member = id, error = %e, "probe failed"),
            }
        }
        if peers.told_removed() {
            health.mark_removed("a member refused this node as no longer a member");
        }
        let leading = m.current_leader == Some(me);
        for (id, v) in health.views(&raft) {
            let node = id.to_string();
            let up = match v.up {
                Some(true) => 1.0,
                _ => 0.0,
            };
            metrics::gauge!("mailvault_member_up", "node" => node.clone()).set(up);
            if let Some(t) = v.seen.last_contact {
                metrics::gauge!("mailvault_member_last_contact_seconds", "node" => node.clone())
                    .set(t.elapsed().as_secs_f64());
            }
            if leading {
                metrics::gauge!("mailvault_member_lag_entries", "node" => node.clone())
                    .set(v.behind.unwrap_or(0) as f64);
                metrics::gauge!("mailvault_member_lag_seconds", "node" => node)
                    .set(v.lag_secs.unwrap_or(0.0));
            }
        }
        metrics::gauge!("mailvault_is_leader").set(if leading { 1.0 } else { 0.0 });
    }
}
