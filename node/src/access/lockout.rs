//! Lockout after repeated failures, decided from the replicated audit log so
//! that every node decides the same, at exactly the threshold.
//!
//! A denial is counted against one key, chosen by the node that denied it and
//! written into the result of its audit record: an authenticated caller by its
//! identity ([`DENIED`]); a failed authentication — no certificate, a
//! certificate of another CA, expired, naming no identity, revoked — by its
//! source address ([`DENIED_UNAUTHENTICATED`]); a node certificate never. So a
//! caller that misbehaves locks out itself, not the other front ends, the
//! operators and the nodes behind the same address (a NAT, a load balancer,
//! the local cluster's 127.0.0.1).
//!
//! Every node folds the audit records in log order ([`Lockout::observe`]):
//! the record that brings a key to the threshold within the period, counted
//! by the records' own times, locks it for the period from that time;
//! denials while a key is locked do not count; an [`UNLOCK_ACTION`] record (an
//! operator's `access unlock`) lifts it. Nothing depends on which node saw
//! which denial, nor on the node's own clock but for when a lockout has
//! ended. The node that recorded the denial which started a lockout audits it
//! as a [`LOCKOUT_STARTED`] record, which changes nothing. On start, before it serves, a node replays
//! the records of the last three periods ([`Lockout::replay`]), so a restart
//! does not lift a lockout; then it follows the log ([`follow_audit_log`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::AuditRecorder;
use crate::clock::now_ms;
use crate::state::audit::AuditEvent;
use crate::store::{MailReader, ReadError};

/// The audit action of a record announcing a lockout the denials started
/// (informational: the fold of the denials decides).
pub const LOCKOUT_STARTED: &str = "lockout-started";
/// The audit action by which older versions announced a lockout they decided
/// alone; still enforced when replayed.
pub const LOCKOUT_ACTION: &str = "lockout";
/// The audit action of an operator lifting a lockout; the target is the key.
pub const UNLOCK_ACTION: &str = "unlock";
/// Result prefix of a denied attempt by an authenticated caller: it counts
/// towards the lockout of its identity.
pub const DENIED: &str = "denied: ";
/// Result prefix of a failed authentication: it counts towards the lockout of
/// its source address.
pub const DENIED_UNAUTHENTICATED: &str = "denied: unauthenticated: ";
/// Result prefix of a refused attempt that does not count towards lockout.
pub const REFUSED: &str = "refused: ";
/// Result of an attempt refused because its caller is locked out (not counted again).
pub const REFUSED_LOCKED: &str = "refused: locked out";
/// Result prefix of a lockout record; the end time in milliseconds follows.
const LOCKED_UNTIL: &str = "locked out until ";
/// Result of an unlock record.
pub const UNLOCKED: &str = "unlocked";
/// Past this many tracked keys, keys with nothing to remember are dropped.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Default)]
struct Entry {
    failures: Vec<i64>,
    locked_until: Option<i64>,
}

/// A lockout that a record started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The locked key (`id:<identity>` or `ip:<address>`).
    pub key: String,
    /// When the lockout ends, in milliseconds since the Unix epoch.
    pub until_ms: i64,
    /// The node that recorded the denial which started it.
    pub node: u64,
}

impl Started {
    /// The audit record announcing this lockout.
    pub fn event(&self) -> AuditEvent {
        AuditEvent::new(
            "-",
            None,
            LOCKOUT_STARTED,
            &self.key,
            &format!("{LOCKED_UNTIL}{}", self.until_ms),
        )
    }
}

/// A key locked out now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    /// `id:<identity>` or `ip:<address>`.
    pub key: String,
    /// When it ends, in milliseconds since the Unix epoch.
    pub until_ms: i64,
}

/// Failure counters and lockouts.
#[derive(Clone)]
pub struct Lockout {
    node: u64,
    threshold: usize,
    period_ms: i64,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// The lockout key of an address.
pub fn ip_key(ip: IpAddr) -> String {
    format!("ip:{ip}")
}

/// The lockout key of an identity.
pub fn id_key(identity: &str) -> String {
    format!("id:{identity}")
}

/// Whether `key` is a well-formed lockout key.
pub fn is_key(key: &str) -> bool {
    match key.split_once(':') {
        Some(("id", id)) => !id.is_empty() && !id.starts_with("node:"),
        Some(("ip", ip)) => ip.parse::<IpAddr>().is_ok(),
        _ => false,
    }
}

/// The key a denial record counts against, if any.
fn counted_key(event: &AuditEvent) -> Option<String> {
    if !event.result.starts_with(DENIED) {
        return None;
    }
    if event.result.starts_with(DENIED_UNAUTHENTICATED) || event.identity == "-" {
        return event.source.parse::<IpAddr>().ok().map(ip_key);
    }
    if event.identity.starts_with("node:") {
        return None;
    }
    Some(id_key(&event.identity))
}

impl Lockout {
    /// On node `node`, `threshold` failures within `period` lock the caller
    /// out for `period`. Every node of a cluster must use the same values.
    pub fn new(node: u64, threshold: usize, period: Duration) -> Lockout {
        Lockout {
            node,
            threshold,
            period_ms: period.as_millis() as i64,
            entries: Arc::default(),
        }
    }

    /// Until when `key` is locked out, if it is now.
    pub fn locked_until(&self, key: &str) -> Option<i64> {
        let now = now_ms();
        let map = self.entries.lock().expect("lockout lock");
        map.get(key).and_then(|e| e.locked_until).filter(|t| *t > now)
    }

    /// Every key locked out now, in key order.
    pub fn locked(&self) -> Vec<Locked> {
        let now = now_ms();
        let map = self.entries.lock().expect("lockout lock");
        let mut out: Vec<Locked> = map
            .iter()
            .filter_map(|(k, e)| {
                e.locked_until.filter(|t| *t > now).map(|until_ms| Locked {
                    key: k.clone(),
                    until_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Folds one replicated audit record into the counts (see the module
    /// docs); returns the lockout it started, if any. Every audited access
    /// passes through here, so records that matter to none of it return
    /// before the lock is taken.
    pub fn observe(&self, event: &AuditEvent) -> Option<Started> {
        let counted = counted_key(event);
        let unlock = event.action == UNLOCK_ACTION && event.result == UNLOCKED;
        let lockout = event.action == LOCKOUT_ACTION;
        if counted.is_none() && !unlock && !lockout {
            return None;
        }
        let t = event.time_ms;
        let mut map = self.entries.lock().expect("lockout lock");
        let mut started = None;
        if unlock {
            map.remove(&event.target);
        } else if lockout {
            // Announces what the denials already decided (older versions
            // decided on one node and told the others this way).
            if let Some(until) = event
                .result
                .strip_prefix(LOCKED_UNTIL)
                .and_then(|t| t.parse::<i64>().ok())
            {
                for key in event.target.split(' ').filter(|k| !k.is_empty()) {
                    let e = map.entry(key.to_string()).or_default();
                    e.locked_until = Some(e.locked_until.map_or(until, |u| u.max(until)));
                    e.failures.clear();
                }
            }
        } else if let Some(key) = counted {
            let e = map.entry(key.clone()).or_default();
            if e.locked_until.is_some_and(|u| u > t) {
                return None;
            }
            e.failures.retain(|f| t - *f < self.period_ms);
            e.failures.push(t);
            if e.failures.len() >= self.threshold {
                e.locked_until = Some(t + self.period_ms);
                e.failures.clear();
                metrics::counter!("mailvault_lockouts_total").increment(1);
                started = Some(Started {
                    key,
                    until_ms: t + self.period_ms,
                    node: event.node,
                });
            }
        }
        self.tidy(&mut map, now_ms());
        started
    }

    fn tidy(&self, map: &mut HashMap<String, Entry>, now: i64) {
        if map.len() > PRUNE_ABOVE {
            map.retain(|_, e| {
                e.failures.retain(|t| now - *t < self.period_ms);
                !e.failures.is_empty() || e.locked_until.is_some_and(|t| t > now)
            });
        }
        Self::set_gauge(map, now);
    }

    /// Brings `mailvault_locked_out` up to date (lockouts also end by themselves).
    fn refresh_gauge(&self) {
        Self::set_gauge(&self.entries.lock().expect("lockout lock"), now_ms());
    }

    fn set_gauge(map: &HashMap<String, Entry>, now: i64) {
        metrics::gauge!("mailvault_locked_out").set(
            map.values()
                .filter(|e| e.locked_until.is_some_and(|t| t > now))
                .count() as f64,
        );
    }

    /// Replays the audit records of the last three periods (a lockout in
    /// force now started within the last period, from failures within the
    /// one before), so a restart does not lift a lockout nor reset the
    /// counts. Returns the sequence number to follow the log from.
    pub fn replay(&self, reader: &MailReader) -> Result<u64, ReadError> {
        let mut next = reader.audit_first_seq_since(now_ms() - 3 * self.period_ms)?;
        loop {
            let (after, read, _) = self.observe_page(reader, next)?;
            next = after;
            if read < PAGE {
                return Ok(next);
            }
        }
    }

    /// Observes one page of audit records from sequence number `next`;
    /// returns the sequence number after the page, how many it held, and the
    /// lockouts this node's own denials started.
    fn observe_page(&self, reader: &MailReader, next: u64) -> Result<(u64, usize, Vec<Started>), ReadError> {
        let page = reader.audit_records(next, PAGE)?;
        let started = page
            .iter()
            .filter_map(|rec| self.observe(&rec.event))
            .filter(|s| s.node == self.node)
            .collect();
        Ok((page.last().map_or(next, |rec| rec.seq + 1), page.len(), started))
    }
}

/// Records read from the audit log at a time.
const PAGE: usize = 1024;

/// Follows the replicated audit log from sequence number `next` for as long
/// as the node runs, folding every record as it is applied: it reads the log
/// when `audit_changes` says applied entries added records (not after every
/// apply: most carry mail, and each look is a RocksDB seek), and refreshes
/// the lockout gauge once a second meanwhile. A lockout that a denial this
/// node recorded started is audited through `audit`.
pub async fn follow_audit_log(
    lockout: Lockout,
    reader: MailReader,
    audit: AuditRecorder,
    mut audit_changes: watch::Receiver<u64>,
    mut next: u64,
) {
    loop {
        let (l, r) = (lockout.clone(), reader.clone());
        let step = tokio::task::spawn_blocking(move || {
            let page = l.observe_page(&r, next);
            l.refresh_gauge();
            page
        });
        let failed = match step.await {
            Ok(Ok((after, read, started))) => {
                next = after;
                for s in started {
                    tracing::warn!(key = %s.key, until_ms = s.until_ms, "lockout started after repeated failures");
                    let _ = audit.record(s.event()).await;
                }
                if read == PAGE {
                    continue;
                }
                false
            }
            _ => {
                tracing::warn!("cannot read the audit log for lockouts; retrying");
                true
            }
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(1), audit_changes.changed()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) if failed => break,
                // Lockouts also end by themselves.
                Err(_) => lockout.refresh_gauge(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(node: u64, identity: &str, source: &str, result: &str, time_ms: i64) -> AuditEvent {
        let mut e = AuditEvent::new(identity, source.parse().ok(), "GetMessage", "-", result);
        e.node = node;
        e.time_ms = time_ms;
        e
    }

    fn denial(node: u64, identity: &str, source: &str) -> AuditEvent {
        event(node, identity, source, "denied: no role", now_ms())
    }

    #[test]
    fn the_fifth_denial_in_log_order_locks_the_identity_whichever_nodes_saw_them() {
        let l = Lockout::new(1, 5, Duration::from_secs(900));
        for node in [1, 2, 3, 2] {
            assert_eq!(l.observe(&denial(node, "mallory", "127.0.0.9")), None);
        }
        assert_eq!(l.locked_until("id:mallory"), None);
        let started = l
            .observe(&denial(3, "mallory", "127.0.0.9"))
            .expect("the fifth locks");
        assert_eq!((started.key.as_str(), started.node), ("id:mallory", 3));
        assert!(l.locked_until("id:mallory").is_some());
        // Not the address: the neighbours behind it are not locked out.
        assert_eq!(l.locked_until("ip:127.0.0.9"), None);
        assert_eq!(
            l.observe(&denial(1, "mallory", "127.0.0.9")),
            None,
            "no second start"
        );
        assert_eq!(l.locked().len(), 1);
    }

    #[test]
    fn failed_authentications_lock_the_address_and_nodes_are_never_locked() {
        let l = Lockout::new(1, 3, Duration::from_secs(900));
        let unauth = |id| event(2, id, "127.0.0.4", "denied: unauthenticated: revoked", now_ms());
        l.observe(&unauth("-"));
        l.observe(&unauth("eve"));
        assert!(l.observe(&unauth("-")).is_some());
        assert!(l.locked_until("ip:127.0.0.4").is_some());
        assert_eq!(l.locked_until("id:eve"), None);
        for _ in 0..10 {
            assert_eq!(l.observe(&denial(1, "node:2", "127.0.0.4")), None);
        }
        assert!(l.locked().iter().all(|k| !k.key.contains("node")));
    }

    #[test]
    fn the_decision_depends_on_the_records_times_not_on_when_they_are_folded() {
        let l = Lockout::new(1, 2, Duration::from_secs(60));
        let old = event(2, "carol", "127.0.0.5", "denied: no role", now_ms() - 61_000);
        let new = event(2, "carol", "127.0.0.5", "denied: no role", now_ms());
        l.observe(&old);
        assert_eq!(l.observe(&new), None, "61 s apart: not within one period");
        let refused = event(2, "carol", "127.0.0.5", REFUSED_LOCKED, now_ms());
        assert_eq!(l.observe(&refused), None, "refusals never count");
        assert!(l.observe(&new).is_some());
        // A lockout long over, replayed, is not in force.
        let gone = Lockout::new(1, 1, Duration::from_secs(60));
        gone.observe(&old);
        assert_eq!(gone.locked_until("id:carol"), None);
    }

    #[test]
    fn an_unlock_record_lifts_a_lockout_and_resets_the_count() {
        let l = Lockout::new(1, 2, Duration::from_secs(900));
        l.observe(&denial(1, "dave", "127.0.0.6"));
        l.observe(&denial(1, "dave", "127.0.0.6"));
        assert!(l.locked_until("id:dave").is_some());
        let mut unlock = AuditEvent::new("admin", None, UNLOCK_ACTION, "id:dave", UNLOCKED);
        unlock.node = 2;
        l.observe(&unlock);
        assert_eq!(l.locked_until("id:dave"), None);
        assert_eq!(
            l.observe(&denial(1, "dave", "127.0.0.6")),
            None,
            "counting starts again"
        );
        // The announcement of a lockout changes nothing (an unlock may
        // precede it in the log); the lockout record of an older version,
        // which decided alone, is enforced.
        let started = Started {
            key: "id:frank".into(),
            until_ms: now_ms() + 60_000,
            node: 2,
        };
        l.observe(&started.event());
        assert_eq!(l.locked_until("id:frank"), None);
        let mut old = started.event();
        old.action = LOCKOUT_ACTION.into();
        l.observe(&old);
        assert!(l.locked_until("id:frank").is_some());
        assert!(is_key("id:frank") && is_key("ip:10.0.0.1"));
        assert!(!is_key("id:node:1") && !is_key("ip:nowhere") && !is_key("frank"));
    }
}
