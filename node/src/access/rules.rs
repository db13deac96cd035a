//! Who may call what: one rule per method of every service on the client
//! listener, looked up by the access layer before any handler runs. A method
//! without a rule is not served (`UNIMPLEMENTED`, whatever the port's router
//! holds; the peer protocol has none here); a test checks that every method of
//! `mailvault.v1` has exactly one rule, so a new RPC cannot ship without one.
//!
//! Tenant-scoped calls (the mailbox service) are only admitted here: the
//! handler checks the caller's tenant role once it has read the request.
//! Whether a change needs a second person is not a column here: it depends
//! on the request (widening an allowlist does, narrowing it does not), so the
//! handlers refuse such changes (`TWO_PERSON_REQUIRED`) and the `Operations`
//! service proposes them.

use mailvault_proto::v1::{
    access_server, audit_server, backups_server, cluster_server, mailbox_server, operations_server,
    tenants_server,
};

use crate::state::policy::ClusterRole;

/// Which callers a method admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callers {
    /// Any authenticated caller (health, reflection).
    Anyone,
    /// Any user; the handler checks the tenant role.
    TenantUsers,
    /// Users holding one of these cluster roles.
    ClusterRoles(&'static [ClusterRole]),
}

/// The rule of one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Who may call it.
    pub callers: Callers,
    /// Whether a node certificate may call it directly (not on behalf of a
    /// user): health, reflection, and the status calls nodes make of each other.
    pub nodes: bool,
    /// Health and reflection, which tools call to explore: a refusal of them
    /// is audited but never counts towards a lockout.
    pub probe: bool,
}

/// The gRPC health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// gRPC server reflection, the current version.
pub const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
/// gRPC server reflection, the older version many tools still call first.
pub const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Every method of the service.
const ANY_METHOD: &str = "*";

const PROBE: Rule = Rule {
    callers: Callers::Anyone,
    nodes: true,
    probe: true,
};
const TENANT: Rule = Rule {
    callers: Callers::TenantUsers,
    nodes: false,
    probe: false,
};
const STATUS: Rule = Rule {
    callers: Callers::ClusterRoles(&[ClusterRole::Operator, ClusterRole::Auditor]),
    nodes: true,
    probe: false,
};
const OPERATOR: Rule = Rule {
    callers: Callers::ClusterRoles(&[ClusterRole::Operator]),
    nodes: false,
    probe: false,
};
const OPERATOR_OR_NODE: Rule = Rule {
    callers: Callers::ClusterRoles(&[ClusterRole::Operator]),
    nodes: true,
    probe: false,
};
const OPERATOR_OR_AUDITOR: Rule = Rule {
    callers: Callers::ClusterRoles(&[ClusterRole::Operator, ClusterRole::Auditor]),
    nodes: false,
    probe: false,
};
const AUDITOR: Rule = Rule {
    callers: Callers::ClusterRoles(&[ClusterRole::Auditor]),
    nodes: false,
    probe: false,
};

/// (service, method, rule); [`ANY_METHOD`] covers every method of a service.
const RULES: &[(&str, &str, Rule)] = &[
    (HEALTH_SERVICE, ANY_METHOD, PROBE),
    (REFLECTION_V1, ANY_METHOD, PROBE),
    (REFLECTION_V1ALPHA, ANY_METHOD, PROBE),
    (mailbox_server::SERVICE_NAME, ANY_METHOD, TENANT),
    (cluster_server::SERVICE_NAME, "NodeStatus", STATUS),
    (cluster_server::SERVICE_NAME, "StateDigest", STATUS),
    (cluster_server::SERVICE_NAME, "TriggerSnapshot", OPERATOR),
    (tenants_server::SERVICE_NAME, "CreateTenant", OPERATOR),
    (access_server::SERVICE_NAME, "GetIdentity", OPERATOR),
    (access_server::SERVICE_NAME, "Grant", OPERATOR),
    (access_server::SERVICE_NAME, "Ungrant", OPERATOR),
    (access_server::SERVICE_NAME, "SetAllowlist", OPERATOR),
    (access_server::SERVICE_NAME, "RevokeIdentity", OPERATOR),
    (access_server::SERVICE_NAME, "RevokeCertificate", OPERATOR),
    (access_server::SERVICE_NAME, "ListLockouts", OPERATOR),
    (access_server::SERVICE_NAME, "Unlock", OPERATOR),
    (audit_server::SERVICE_NAME, "ListAudit", AUDITOR),
    (audit_server::SERVICE_NAME, "VerifyAudit", AUDITOR),
    (backups_server::SERVICE_NAME, "ListBackups", OPERATOR_OR_AUDITOR),
    (backups_server::SERVICE_NAME, "ShowBackup", OPERATOR_OR_AUDITOR),
    // A leader asks the backup node for an operation's pre-operation backup.
    (backups_server::SERVICE_NAME, "TakeBackup", OPERATOR_OR_NODE),
    (backups_server::SERVICE_NAME, "VerifyBackup", OPERATOR),
    (backups_server::SERVICE_NAME, "ShipBackup", OPERATOR),
    (backups_server::SERVICE_NAME, "DrillBackup", OPERATOR),
    // An operator rehearses; the leader's executor restores, as a node,
    // for an executing operation (the handler checks which).
    (backups_server::SERVICE_NAME, "RestoreMailbox", OPERATOR_OR_NODE),
    (operations_server::SERVICE_NAME, "PlanOperation", OPERATOR),
    (operations_server::SERVICE_NAME, "ProposeOperation", OPERATOR),
    (
        operations_server::SERVICE_NAME,
        "ListOperations",
        OPERATOR_OR_AUDITOR,
    ),
    (
        operations_server::SERVICE_NAME,
        "GetOperation",
        OPERATOR_OR_AUDITOR,
    ),
    (
        operations_server::SERVICE_NAME,
        "WatchOperation",
        OPERATOR_OR_AUDITOR,
    ),
    (operations_server::SERVICE_NAME, "ApproveOperation", OPERATOR),
    (operations_server::SERVICE_NAME, "RejectOperation", OPERATOR),
    (operations_server::SERVICE_NAME, "CancelOperation", OPERATOR),
];

/// The rule for a gRPC path (`/package.Service/Method`), if it has one.
pub fn rule_for(path: &str) -> Option<Rule> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    RULES
        .iter()
        .find(|(s, m, _)| *s == service && (*m == method || *m == ANY_METHOD))
        .map(|(_, _, rule)| *rule)
}

impl Rule {
    /// Whether a user with `roles` (cluster roles) passes this rule.
    pub fn admits(&self, has: impl Fn(ClusterRole) -> bool) -> bool {
        match self.callers {
            Callers::Anyone | Callers::TenantUsers => true,
            Callers::ClusterRoles(roles) => roles.iter().any(|r| has(*r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// Every method of the client API (`mailvault.v1`), as `/package.Service/Method`.
    fn served_methods() -> Vec<String> {
        let fds = FileDescriptorSet::decode(mailvault_proto::CLIENT_API_DESCRIPTOR_SET).unwrap();
        let mut out = Vec::new();
        for file in fds.file.into_iter().filter(|f| f.package() == "mailvault.v1") {
            let package = file.package().to_string();
            for service in &file.service {
                for method in &service.method {
                    out.push(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
        out
    }

    #[test]
    fn every_served_method_has_exactly_one_rule_and_every_rule_a_method() {
        let methods = served_methods();
        assert!(methods.len() > 20, "{methods:?}");
        for m in &methods {
            let (service, method) = m[1..].split_once('/').unwrap();
            let matching = RULES
                .iter()
                .filter(|(s, r, _)| *s == service && (*r == method || *r == ANY_METHOD))
                .count();
            assert_eq!(matching, 1, "{m} must have exactly one rule");
        }
        for (service, method, _) in RULES {
            if service.starts_with("grpc.") {
                continue;
            }
            let known = methods.iter().any(|m| {
                m[1..]
                    .split_once('/')
                    .is_some_and(|(s, r)| s == *service && (*method == ANY_METHOD || r == *method))
            });
            assert!(known, "rule for {service}/{method} names no served method");
        }
    }

    #[test]
    fn roles_are_decided_per_method() {
        let roles = |held: &'static [ClusterRole]| move |r| held.contains(&r);
        let operator = roles(&[ClusterRole::Operator]);
        let auditor = roles(&[ClusterRole::Auditor]);
        let none = roles(&[]);
        let rule = |p| rule_for(p).unwrap();
        assert!(rule("/mailvault.v1.Cluster/NodeStatus").admits(auditor));
        assert!(rule("/mailvault.v1.Cluster/NodeStatus").nodes);
        assert!(!rule("/mailvault.v1.Cluster/TriggerSnapshot").admits(auditor));
        assert!(rule("/mailvault.v1.Access/Grant").admits(operator));
        assert!(!rule("/mailvault.v1.Access/Grant").nodes);
        assert!(!rule("/mailvault.v1.Audit/ListAudit").admits(operator));
        assert!(rule("/mailvault.v1.Backups/ListBackups").admits(auditor));
        assert!(!rule("/mailvault.v1.Backups/ListBackups").nodes);
        assert!(!rule("/mailvault.v1.Backups/TakeBackup").admits(auditor));
        assert!(rule("/mailvault.v1.Backups/TakeBackup").nodes);
        assert!(rule("/mailvault.v1.Backups/VerifyBackup").admits(operator));
        assert!(rule("/mailvault.v1.Mailbox/GetMessage").admits(none));
        assert!(rule("/mailvault.v1.Operations/ListOperations").admits(auditor));
        assert!(!rule("/mailvault.v1.Operations/ApproveOperation").admits(auditor));
        assert!(!rule("/mailvault.v1.Operations/ProposeOperation").admits(auditor));
        assert!(!rule("/mailvault.v1.Operations/ApproveOperation").nodes);
        assert!(
            rule_for("/mailvault.v1.Admin/NodeStatus").is_none(),
            "the old service is gone"
        );
        assert!(rule_for("/mailvault.v1.Cluster/Nope").is_none());
        assert!(rule_for("garbage").is_none());
        assert!(rule_for("/mailvault.raft.v1.RaftPeer/ReadIndex").is_none());
    }

    #[test]
    fn health_and_both_reflection_versions_are_probes_anyone_may_make() {
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let rule = rule_for(path).unwrap();
            assert!(rule.probe && rule.nodes && rule.admits(|_| false), "{path}");
        }
        assert!(!rule_for("/mailvault.v1.Mailbox/GetMessage").unwrap().probe);
        assert!(!rule_for("/mailvault.v1.Access/Grant").unwrap().probe);
    }
}
