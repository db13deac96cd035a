//! The replicated access policy of one identity, and what each role permits.
//!
//! Frozen format: `IdentityPolicy` and the role enums are stored in the state
//! machine and carried by `PutIdentity` commands (postcard, positional). Do not
//! reorder fields or variants without a data-version migration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Tenant name that grants a role on every tenant (for platform services only).
pub const ANY_TENANT: &str = "*";

/// Roles within one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TenantRole {
    /// Reads mail; sees customer addresses masked.
    Reader,
    /// Reads and handles mail (append, flags, claims, moves, expunges).
    Agent,
    /// Bulk export.
    Exporter,
    /// Everything of an agent, plus creating mailboxes.
    TenantAdmin,
}

/// Cluster-wide roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ClusterRole {
    /// Runs admin operations.
    Operator,
    /// Reads and verifies the audit log.
    Auditor,
}

/// Something done to a tenant's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read mail or metadata.
    Read,
    /// Change mail or handling state.
    Write,
    /// Create mailboxes.
    ManageMailboxes,
    /// Bulk export.
    Export,
    /// See customer addresses unmasked.
    ViewAddresses,
}

impl TenantRole {
    /// Whether this role permits `action`.
    pub fn permits(self, action: Action) -> bool {
        use Action::*;
        match self {
            TenantRole::Reader => matches!(action, Read),
            TenantRole::Agent => matches!(action, Read | Write | ViewAddresses),
            TenantRole::Exporter => matches!(action, Read | Export | ViewAddresses),
            TenantRole::TenantAdmin => matches!(action, Read | Write | ManageMailboxes | ViewAddresses),
        }
    }

    /// Parses `reader`, `agent`, `exporter`, `tenant-admin`.
    pub fn parse(s: &str) -> Option<TenantRole> {
        Some(match s {
            "reader" => TenantRole::Reader,
            "agent" => TenantRole::Agent,
            "exporter" => TenantRole::Exporter,
            "tenant-admin" => TenantRole::TenantAdmin,
            _ => return None,
        })
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            TenantRole::Reader => "reader",
            TenantRole::Agent => "agent",
            TenantRole::Exporter => "exporter",
            TenantRole::TenantAdmin => "tenant-admin",
        }
    }
}

impl ClusterRole {
    /// Parses `operator`, `auditor`.
    pub fn parse(s: &str) -> Option<ClusterRole> {
        match s {
            "operator" => Some(ClusterRole::Operator),
            "auditor" => Some(ClusterRole::Auditor),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterRole::Operator => "operator",
            ClusterRole::Auditor => "auditor",
        }
    }
}

/// Everything the cluster knows about one identity. Replicated through Raft.
/// An identity with no record has no roles (least privilege).
///
/// Frozen format: do not reorder fields without a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityPolicy {
    /// Roles per tenant ([`ANY_TENANT`] for all tenants).
    pub tenant_roles: BTreeMap<String, BTreeSet<TenantRole>>,
    /// Cluster-wide roles.
    pub cluster_roles: BTreeSet<ClusterRole>,
    /// Source networks calls may come from; empty means anywhere.
    pub allow_from: Vec<IpNet>,
    /// A revoked identity can make no call.
    pub revoked: bool,
}

impl IdentityPolicy {
    /// Whether some role of this identity on `tenant` permits `action`.
    pub fn permits(&self, tenant: &str, action: Action) -> bool {
        [tenant, ANY_TENANT]
            .iter()
            .filter_map(|t| self.tenant_roles.get(*t))
            .flatten()
            .any(|r| r.permits(action))
    }

    /// Whether calls from `ip` are allowed.
    pub fn allows_source(&self, ip: Option<IpAddr>) -> bool {
        if self.allow_from.is_empty() {
            return true;
        }
        ip.is_some_and(|ip| self.allow_from.iter().any(|net| net.contains(&ip)))
    }
}

/// A change to one identity's access policy, decided against the policy as
/// it is when the command applies (so concurrent changes compose instead of
/// overwriting each other). Appended as a nested family: do not reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessChange {
    /// Grants one role. Refused for a revoked identity or a missing tenant.
    Grant {
        /// The identity.
        identity: String,
        /// The role.
        role: RoleGrant,
    },
    /// Removes one role.
    Ungrant {
        /// The identity.
        identity: String,
        /// The role.
        role: RoleGrant,
    },
    /// Sets the networks the identity may call from.
    SetAllowlist {
        /// The identity.
        identity: String,
        /// The new allowlist (empty: anywhere).
        networks: Vec<ipnet::IpNet>,
        /// Made only if the current allowlist equals this one.
        expected: Option<Vec<ipnet::IpNet>>,
    },
    /// Revokes the identity.
    Revoke {
        /// The identity.
        identity: String,
    },
}

impl AccessChange {
    /// The identity the change is about.
    pub fn identity(&self) -> &str {
        match self {
            AccessChange::Grant { identity, .. }
            | AccessChange::Ungrant { identity, .. }
            | AccessChange::SetAllowlist { identity, .. }
            | AccessChange::Revoke { identity } => identity,
        }
    }
}

/// One role of an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoleGrant {
    /// A role on one tenant ([`ANY_TENANT`] for every tenant).
    Tenant {
        /// The tenant.
        tenant: String,
        /// The role.
        role: TenantRole,
    },
    /// A cluster role.
    Cluster(ClusterRole),
}

impl std::fmt::Display for RoleGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoleGrant::Tenant { tenant, role } => write!(f, "{} on tenant {tenant}", role.as_str()),
            RoleGrant::Cluster(role) => write!(f, "cluster role {}", role.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_least_privilege() {
        let mut p = IdentityPolicy::default();
        assert!(!p.permits("acme", Action::Read));
        p.tenant_roles
            .entry("acme".into())
            .or_default()
            .insert(TenantRole::Reader);
        assert!(p.permits("acme", Action::Read));
        assert!(!p.permits("acme", Action::Write));
        assert!(!p.permits("acme", Action::ViewAddresses));
        assert!(
            !p.permits("globex", Action::Read),
            "a role on one tenant never reaches another"
        );
        p.tenant_roles
            .entry(ANY_TENANT.into())
            .or_default()
            .insert(TenantRole::Agent);
        assert!(p.permits("globex", Action::Write));
        assert!(!p.permits("globex", Action::Export));
    }

    #[test]
    fn allowlists() {
        let mut p = IdentityPolicy::default();
        assert!(p.allows_source(Some("10.1.2.3".parse().unwrap())));
        p.allow_from = vec!["127.0.0.1/32".parse().unwrap()];
        assert!(p.allows_source(Some("127.0.0.1".parse().unwrap())));
        assert!(!p.allows_source(Some("127.0.0.2".parse().unwrap())));
        assert!(!p.allows_source(None));
    }
}
