//! Lockout after repeated failures, per identity and per source address,
//! enforced by every node of the cluster.
//!
//! A node counts the denials it records itself at once, and the denials every
//! other node recorded as it applies them from the replicated audit log
//! ([`Lockout::observe`]). The node whose count reaches the threshold starts
//! the lockout and audits it as a `lockout` record naming the locked keys and
//! when the lockout ends; every node that applies that record enforces it.
//! On start, before it serves, a node replays the audit records of the last
//! period ([`Lockout::replay`]), so a restart does not lift a lockout; then it
//! follows the log ([`follow_audit_log`]).
//!
//! Times are wall-clock milliseconds, because failures recorded by other
//! nodes carry their recording time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::now_ms;
use crate::state::audit::AuditEvent;
use crate::store::{MailReader, ReadError};

/// The audit action of a record that starts a lockout.
pub const LOCKOUT_ACTION: &str = "lockout";
/// Result prefix of a denied attempt that counts towards lockout.
pub const DENIED: &str = "denied: ";
/// Result prefix of a refused attempt that does not count towards lockout.
pub const REFUSED: &str = "refused: ";
/// Result of an attempt refused because its caller is locked out (not counted again).
pub const REFUSED_LOCKED: &str = "refused: locked out";
/// Result prefix of a lockout record; the end time in milliseconds follows.
const LOCKED_UNTIL: &str = "locked out until ";
/// Past this many tracked keys, keys with nothing to remember are dropped.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Default)]
struct Entry {
    failures: Vec<i64>,
    locked_until: Option<i64>,
}

/// A lockout that a failure just started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The locked keys (`id:<identity>`, `ip:<address>`).
    pub keys: Vec<String>,
    /// When the lockout ends, in milliseconds since the Unix epoch.
    pub until_ms: i64,
}

impl Started {
    /// The audit record announcing this lockout to every node.
    pub fn event(&self, identity: &str, source: Option<IpAddr>) -> AuditEvent {
        AuditEvent::new(
            identity,
            source,
            LOCKOUT_ACTION,
            &self.keys.join(" "),
            &format!("{LOCKED_UNTIL}{}", self.until_ms),
        )
    }
}

/// Failure counters and lockouts.
#[derive(Clone)]
pub struct Lockout {
    node: u64,
    threshold: usize,
    period_ms: i64,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

fn ip_key(ip: IpAddr) -> String {
    format!("ip:{ip}")
}

fn id_key(identity: &str) -> String {
    format!("id:{identity}")
}

fn keys_of(identity: Option<&str>, ip: Option<IpAddr>) -> impl Iterator<Item = String> {
    identity
        .filter(|i| *i != "-")
        .map(id_key)
        .into_iter()
        .chain(ip.map(ip_key))
}

impl Lockout {
    /// On node `node`, `threshold` failures within `period` lock the caller out for `period`.
    pub fn new(node: u64, threshold: usize, period: Duration) -> Lockout {
        Lockout {
            node,
            threshold,
            period_ms: period.as_millis() as i64,
            entries: Arc::default(),
        }
    }

    /// Whether the identity or the address is locked out now.
    pub fn is_locked(&self, identity: Option<&str>, ip: Option<IpAddr>) -> bool {
        let now = now_ms();
        let map = self.entries.lock().expect("lockout lock");
        keys_of(identity, ip).any(|k| map.get(&k).and_then(|e| e.locked_until).is_some_and(|t| t > now))
    }

    /// Counts a failure seen by this node now; returns the lockout it started, if any.
    pub fn fail(&self, identity: Option<&str>, ip: Option<IpAddr>) -> Option<Started> {
        let now = now_ms();
        let mut map = self.entries.lock().expect("lockout lock");
        let mut keys = Vec::new();
        for key in keys_of(identity, ip) {
            let e = map.entry(key.clone()).or_default();
            if e.locked_until.is_some_and(|t| t > now) {
                continue;
            }
            e.failures.retain(|t| now - *t < self.period_ms);
            e.failures.push(now);
            if e.failures.len() >= self.threshold {
                e.locked_until = Some(now + self.period_ms);
                e.failures.clear();
                keys.push(key);
            }
        }
        self.tidy(&mut map, now);
        if keys.is_empty() {
            return None;
        }
        metrics::counter!("mailvault_lockouts_total").increment(1);
        Some(Started {
            keys,
            until_ms: now + self.period_ms,
        })
    }

    /// Learns from a replicated audit record: a lockout another node started
    /// is enforced here too, and a denial another node recorded counts here.
    /// With `own`, this node's own denials count as well (replay after a
    /// restart, when the in-memory counts are gone). Every audited access
    /// passes through here, so records that matter to neither return before
    /// the lock is taken.
    pub fn observe(&self, event: &AuditEvent, own: bool) {
        let is_lockout = event.action == LOCKOUT_ACTION;
        let counts = event.result.starts_with(DENIED) && (own || event.node != self.node);
        if !is_lockout && !counts {
            return;
        }
        let now = now_ms();
        let mut map = self.entries.lock().expect("lockout lock");
        if is_lockout {
            let Some(until) = event
                .result
                .strip_prefix(LOCKED_UNTIL)
                .and_then(|t| t.parse::<i64>().ok())
            else {
                return;
            };
            if until <= now {
                return;
            }
            for key in event.target.split(' ').filter(|k| !k.is_empty()) {
                let e = map.entry(key.to_string()).or_default();
                e.locked_until = Some(e.locked_until.map_or(until, |t| t.max(until)));
                e.failures.clear();
            }
        } else {
            if now - event.time_ms >= self.period_ms {
                return;
            }
            let ip = event.source.parse::<IpAddr>().ok();
            for key in keys_of(Some(&event.identity), ip) {
                let e = map.entry(key).or_default();
                if e.locked_until.is_none_or(|t| t <= now) {
                    e.failures.push(event.time_ms);
                }
            }
        }
        self.tidy(&mut map, now);
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

    /// Replays the audit records of the last period, this node's own
    /// included, so a restart does not lift a lockout nor reset the counts.
    /// Returns the sequence number to follow the log from.
    pub fn replay(&self, reader: &MailReader) -> Result<u64, ReadError> {
        let mut next = reader.audit_first_seq_since(now_ms() - self.period_ms)?;
        loop {
            let (after, read) = self.observe_page(reader, next, true)?;
            next = after;
            if read < PAGE {
                return Ok(next);
            }
        }
    }

    /// Observes one page of audit records from sequence number `next`;
    /// returns the sequence number after the page and how many it held.
    fn observe_page(&self, reader: &MailReader, next: u64, own: bool) -> Result<(u64, usize), ReadError> {
        let page = reader.audit_records(next, PAGE)?;
        page.iter().for_each(|rec| self.observe(&rec.event, own));
        Ok((page.last().map_or(next, |rec| rec.seq + 1), page.len()))
    }
}

/// Records read from the audit log at a time.
const PAGE: usize = 1024;

/// Follows the replicated audit log from sequence number `next` for as long
/// as the node runs, observing every record as it is applied: it reads the
/// log when `audit_changes` says applied entries added records (not after
/// every apply: most carry mail, and each look is a RocksDB seek), and
/// refreshes the lockout gauge once a second meanwhile.
pub async fn follow_audit_log(
    lockout: Lockout,
    reader: MailReader,
    mut audit_changes: watch::Receiver<u64>,
    mut next: u64,
) {
    loop {
        let (l, r) = (lockout.clone(), reader.clone());
        let step = tokio::task::spawn_blocking(move || {
            let page = l.observe_page(&r, next, false);
            l.refresh_gauge();
            page
        });
        let failed = match step.await {
            Ok(Ok((after, read))) => {
                next = after;
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

    fn denial(node: u64, identity: &str, source: &str) -> AuditEvent {
        let mut e = AuditEvent::new(
            identity,
            source.parse().ok(),
            "GetMessage",
            "-",
            "denied: no role",
        );
        e.node = node;
        e
    }

    #[test]
    fn the_fifth_failure_locks_out_identity_and_address() {
        let l = Lockout::new(1, 5, Duration::from_secs(900));
        let ip: IpAddr = "127.0.0.3".parse().unwrap();
        for _ in 0..4 {
            assert_eq!(l.fail(Some("mallory"), Some(ip)), None);
        }
        assert!(!l.is_locked(Some("mallory"), None));
        let started = l.fail(Some("mallory"), Some(ip)).expect("fifth failure locks");
        assert_eq!(started.keys, vec!["id:mallory", "ip:127.0.0.3"]);
        assert!(l.is_locked(Some("mallory"), None));
        assert!(l.is_locked(None, Some(ip)));
        assert!(!l.is_locked(Some("alice"), Some("127.0.0.1".parse().unwrap())));
        assert_eq!(
            l.fail(Some("mallory"), Some(ip)),
            None,
            "a locked key does not lock again"
        );
    }

    #[test]
    fn denials_recorded_by_other_nodes_count_towards_the_threshold() {
        let l = Lockout::new(1, 5, Duration::from_secs(900));
        for node in [2, 3, 2, 3] {
            l.observe(&denial(node, "mallory", "127.0.0.9"), false);
        }
        // This node's own records are skipped while it runs: it counted them already.
        l.observe(&denial(1, "mallory", "127.0.0.9"), false);
        assert!(!l.is_locked(Some("mallory"), None));
        assert!(l.fail(Some("mallory"), None).is_some());
        assert!(l.is_locked(Some("mallory"), None));
    }

    #[test]
    fn a_lockout_started_elsewhere_is_enforced_here_and_old_ones_are_not() {
        let other = Lockout::new(2, 5, Duration::from_secs(900));
        let ip: IpAddr = "127.0.0.7".parse().unwrap();
        let started = (0..5).find_map(|_| other.fail(Some("eve"), Some(ip))).unwrap();
        let mut event = started.event("eve", Some(ip));
        event.node = 2;

        let here = Lockout::new(1, 5, Duration::from_secs(900));
        here.observe(&event, false);
        assert!(here.is_locked(Some("eve"), None));
        assert!(here.is_locked(None, Some(ip)));

        let mut expired = Started {
            keys: vec!["id:bob".into()],
            until_ms: now_ms() - 1,
        }
        .event("bob", None);
        expired.node = 2;
        here.observe(&expired, false);
        assert!(!here.is_locked(Some("bob"), None));
    }

    #[test]
    fn denials_older_than_the_period_and_refusals_while_locked_do_not_count() {
        let l = Lockout::new(1, 2, Duration::from_secs(60));
        let mut old = denial(2, "carol", "127.0.0.5");
        old.time_ms -= 61_000;
        l.observe(&old, false);
        let mut refused = denial(2, "carol", "127.0.0.5");
        refused.result = REFUSED_LOCKED.into();
        l.observe(&refused, false);
        assert_eq!(l.fail(Some("carol"), None), None);
    }
}
