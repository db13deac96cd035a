//! The one place a denied attempt is handled: it is audited with the key it
//! counts against (see [`super::lockout`]), which is how every node counts it.

use std::net::IpAddr;

use super::lockout::{id_key, ip_key, Lockout, DENIED, DENIED_UNAUTHENTICATED, REFUSED, REFUSED_LOCKED};
use crate::audit::AuditRecorder;
use crate::state::audit::AuditEvent;

/// What a denial counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// An authenticated caller: its identity.
    Identity,
    /// A failed authentication: the source address.
    Address,
}

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

    /// The lockouts in force.
    pub fn lockout(&self) -> &Lockout {
        &self.lockout
    }

    /// Until when the identity is locked out, if it is now.
    pub fn identity_locked_until(&self, identity: &str) -> Option<i64> {
        self.lockout.locked_until(&id_key(identity))
    }

    /// Until when the address is locked out (for failed authentications), if it is now.
    pub fn address_locked_until(&self, source: Option<IpAddr>) -> Option<i64> {
        source.and_then(|ip| self.lockout.locked_until(&ip_key(ip)))
    }

    /// Audits a denied attempt (`identity` is `-` when none was proven),
    /// counted against its identity or its address once the record is applied.
    pub async fn deny(
        &self,
        identity: &str,
        source: Option<IpAddr>,
        action: &str,
        target: &str,
        reason: &str,
        against: Against,
    ) {
        metrics::counter!("mailvault_denied_total").increment(1);
        let prefix = match against {
            Against::Identity => DENIED,
            Against::Address => DENIED_UNAUTHENTICATED,
        };
        let _ = self
            .audit
            .record(AuditEvent::new(
                identity,
                source,
                action,
                target,
                &format!("{prefix}{reason}"),
            ))
            .await;
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
