//! The one place a denied attempt is handled: it is audited, counted towards
//! lockout, and a lockout it starts is audited too (which is how every other
//! node learns of it).

use std::net::IpAddr;

use super::lockout::{Lockout, DENIED, REFUSED, REFUSED_LOCKED};
use crate::audit::AuditRecorder;
use crate::state::audit::AuditEvent;

/// Records denied attempts.
#[derive(Clone)]
pub struct Denials {
    lockout: Lockout,
    audit: AuditRecorder,
}

impl Denials {
    /// Denials recorded through `audit`, counted by `lockout`.
    pub fn new(lockout: Lockout, audit: AuditRecorder) -> Denials {
        Denials { lockout, audit }
    }

    /// Whether the identity or the address is locked out now.
    pub fn is_locked(&self, identity: Option<&str>, source: Option<IpAddr>) -> bool {
        self.lockout.is_locked(identity, source)
    }

    /// Audits a denied attempt (`identity` is `-` when none was proven) and
    /// counts it. Returns true when it started a lockout.
    pub async fn deny(
        &self,
        identity: &str,
        source: Option<IpAddr>,
        action: &str,
        target: &str,
        reason: &str,
    ) -> bool {
        metrics::counter!("mailvault_denied_total").increment(1);
        let started = self.lockout.fail(Some(identity), source);
        let mut result = format!("{DENIED}{reason}");
        if let Some(s) = &started {
            result.push_str("; now locked out");
            tracing::warn!(keys = %s.keys.join(" "), "lockout started after repeated failures");
            let _ = self.audit.record(s.event(identity, source)).await;
        }
        let _ = self
            .audit
            .record(AuditEvent::new(identity, source, action, target, &result))
            .await;
        started.is_some()
    }

    /// Audits an attempt refused because its caller is locked out; it does
    /// not count again (a lockout is not extended by knocking).
    pub async fn refuse_locked(&self, identity: &str, source: Option<IpAddr>, action: &str) {
        self.refuse(identity, source, action, REFUSED_LOCKED).await;
    }

    /// Audits a refused attempt that does not count towards lockout: the
    /// result is `refused: <reason>`.
    pub async fn refuse(&self, identity: &str, source: Option<IpAddr>, action: &str, result: &str) {
        metrics::counter!("mailvault_denied_total").increment(1);
        debug_assert!(result.starts_with(REFUSED));
        let _ = self
            .audit
            .record(AuditEvent::new(identity, source, action, "-", result))
            .await;
    }
}
