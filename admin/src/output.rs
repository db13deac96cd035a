//! How the CLI prints: one JSON document (`--output json`) or text for
//! people (tables, RFC 3339 times, policy changes as diffs). Data goes to
//! stdout; diagnostics go to stderr.

use std::time::{Duration, UNIX_EPOCH};

use clap::ValueEnum;
use comfy_table::Table;
use mailvault_proto::v1::IdentityPolicy;

/// Output format.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Human-readable tables.
    Text,
    /// One JSON document.
    Json,
}

impl Output {
    /// Prints `json` as one JSON document, or `text` for people.
    pub fn emit(self, json: serde_json::Value, text: impl FnOnce() -> String) {
        match self {
            Output::Json => println!("{json}"),
            Output::Text => println!("{}", text()),
        }
    }
}

/// A table with a header row.
pub fn table<const N: usize>(header: [&str; N], rows: impl IntoIterator<Item = [String; N]>) -> String {
    let mut t = Table::new();
    t.set_header(header);
    for row in rows {
        t.add_row(row);
    }
    t.to_string()
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time
/// (`2026-12-02T10:00:00.123Z`).
pub fn rfc3339(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
        Err(_) => format!("{ms} ms before 1970"),
    }
}

fn or_anywhere(allow: &[String]) -> String {
    match allow {
        [] => "anywhere".to_string(),
        a => a.join(", "),
    }
}

/// An identity's policy, one line per part.
pub fn policy_text(p: &IdentityPolicy) -> String {
    let mut lines = vec![format!("identity:      {}", p.identity)];
    for t in &p.tenant_roles {
        lines.push(format!("tenant {:<8} {}", t.tenant, t.roles.join(", ")));
    }
    lines.push(format!("cluster roles: {}", p.cluster_roles.join(", ")));
    lines.push(format!("allowed from:  {}", or_anywhere(&p.allow_from)));
    lines.push(format!("revoked:       {}", p.revoked));
    lines.join("\n")
}

/// The roles of a policy as `tenant acme: agent` and `cluster: auditor`.
fn roles(p: &IdentityPolicy) -> Vec<String> {
    let tenant = p
        .tenant_roles
        .iter()
        .flat_map(|t| t.roles.iter().map(move |r| format!("tenant {}: {r}", t.tenant)));
    let cluster = p.cluster_roles.iter().map(|r| format!("cluster: {r}"));
    tenant.chain(cluster).collect()
}

/// What changed between two policies of one identity, as `+`/`-` lines
/// (empty when nothing did).
pub fn policy_diff(before: &IdentityPolicy, after: &IdentityPolicy) -> Vec<String> {
    let (was, now) = (roles(before), roles(after));
    let mut out: Vec<String> = was
        .iter()
        .filter(|r| !now.contains(r))
        .map(|r| format!("- {r}"))
        .collect();
    out.extend(now.iter().filter(|r| !was.contains(r)).map(|r| format!("+ {r}")));
    if before.allow_from != after.allow_from {
        out.push(format!("- allowed from: {}", or_anywhere(&before.allow_from)));
        out.push(format!("+ allowed from: {}", or_anywhere(&after.allow_from)));
    }
    if before.revoked != after.revoked {
        out.push(format!("- revoked: {}", before.revoked));
        out.push(format!("+ revoked: {}", after.revoked));
    }
    out
}

/// A byte count for people (`1.5 MiB`).
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use mailvault_proto::v1::TenantRoles;

    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_169_600_123), "2026-12-02T00:00:00.123Z");
    }

    #[test]
    fn a_policy_change_reads_as_a_diff() {
        let before = IdentityPolicy {
            identity: "erin".into(),
            tenant_roles: vec![TenantRoles {
                tenant: "acme".into(),
                roles: vec!["reader".into()],
            }],
            ..Default::default()
        };
        let mut after = before.clone();
        after.tenant_roles[0].roles = vec!["agent".into()];
        after.cluster_roles = vec!["auditor".into()];
        after.allow_from = vec!["10.0.0.0/8".into()];
        assert_eq!(
            policy_diff(&before, &after),
            [
                "- tenant acme: reader",
                "+ tenant acme: agent",
                "+ cluster: auditor",
                "- allowed from: anywhere",
                "+ allowed from: 10.0.0.0/8"
            ]
        );
        assert!(policy_diff(&after, &after).is_empty());
    }
}
