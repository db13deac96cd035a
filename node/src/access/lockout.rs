//! Lockout after repeated failures, per identity and per source address.
//! Kept in each node's memory: a locked-out caller is locked out of the node
//! it failed against.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Entry {
    failures: Vec<Instant>,
    locked_until: Option<Instant>,
}

/// Failure counters and lockouts.
#[derive(Clone)]
pub struct Lockout {
    threshold: usize,
    period: Duration,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

fn ip_key(ip: IpAddr) -> String {
    format!("ip:{ip}")
}

fn id_key(identity: &str) -> String {
    format!("id:{identity}")
}

impl Lockout {
    /// `threshold` failures within `period` lock the caller out for `period`.
    pub fn new(threshold: usize, period: Duration) -> Lockout {
        Lockout {
            threshold,
            period,
            entries: Arc::default(),
        }
    }

    fn locked(&self, key: &str) -> bool {
        let map = self.entries.lock().expect("lockout lock");
        map.get(key)
            .and_then(|e| e.locked_until)
            .is_some_and(|t| t > Instant::now())
    }

    /// Whether the identity or the address is locked out.
    pub fn is_locked(&self, identity: Option<&str>, ip: Option<IpAddr>) -> bool {
        identity.is_some_and(|i| self.locked(&id_key(i))) || ip.is_some_and(|ip| self.locked(&ip_key(ip)))
    }

    /// Records a failure; returns true if it started a lockout.
    pub fn fail(&self, identity: Option<&str>, ip: Option<IpAddr>) -> bool {
        let now = Instant::now();
        let mut started = false;
        let mut map = self.entries.lock().expect("lockout lock");
        for key in identity.map(id_key).into_iter().chain(ip.map(ip_key)) {
            let e = map.entry(key).or_default();
            e.failures.retain(|t| now.duration_since(*t) < self.period);
            e.failures.push(now);
            if e.failures.len() >= self.threshold && e.locked_until.is_none_or(|t| t <= now) {
                e.locked_until = Some(now + self.period);
                e.failures.clear();
                started = true;
            }
        }
        if started {
            metrics::counter!("mailvault_lockouts_total").increment(1);
        }
        metrics::gauge!("mailvault_locked_out").set(
            map.values()
                .filter(|e| e.locked_until.is_some_and(|t| t > now))
                .count() as f64,
        );
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fifth_failure_locks_out_identity_and_address() {
        let l = Lockout::new(5, Duration::from_secs(900));
        let ip: IpAddr = "127.0.0.3".parse().unwrap();
        for _ in 0..4 {
            assert!(!l.fail(Some("mallory"), Some(ip)));
        }
        assert!(!l.is_locked(Some("mallory"), None));
        assert!(l.fail(Some("mallory"), Some(ip)));
        assert!(l.is_locked(Some("mallory"), None));
        assert!(l.is_locked(None, Some(ip)));
        assert!(!l.is_locked(Some("alice"), Some("127.0.0.1".parse().unwrap())));
    }
}
