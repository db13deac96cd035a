//! `mailvault-admin access`: the replicated access policy. Each change is one
//! server-side command, decided against the policy as it is when it applies,
//! so two operators' changes do not overwrite each other; the CLI prints what
//! changed.

use clap::Subcommand;
use mailvault_proto::v1::operation_kind::Kind;
use mailvault_proto::v1::{
    unlock_request, Allowlist, AllowlistOperation, GetIdentityRequest, GrantOperation, GrantRequest,
    IdentityPolicy, ListLockoutsRequest, OperationKind, PolicyChange, RevokeCertificateRequest,
    RevokeIdentityRequest, SetAllowlistRequest, UnlockRequest,
};
use serde_json::json;

use crate::client::{access, reason_of, status_err};
use crate::op::RoleArgs;

/// How long a proposal made by `access grant` or `access allow` waits for approval.
const DEFAULT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(3600);
use crate::output::{policy_diff, policy_text, rfc3339, table, Output};

#[derive(Subcommand, Debug)]
pub enum AccessCmd {
    /// Shows an identity's roles, allowlist and revocation.
    Show {
        /// The identity.
        identity: String,
    },
    /// Proposes granting a tenant role (`--tenant T --role agent`) or a
    /// cluster role (`--cluster-role auditor`): a two-person operation, which
    /// changes nothing until a second operator approves it (`op approve`).
    Grant {
        /// The identity.
        identity: String,
        #[command(flatten)]
        role: RoleArgs,
        /// Why (e.g. a ticket number); required.
        #[arg(long)]
        reason: String,
    },
    /// Removes a tenant role or a cluster role.
    Ungrant {
        /// The identity.
        identity: String,
        #[command(flatten)]
        role: RoleArgs,
    },
    /// Sets the networks an identity may call from (no networks: anywhere).
    /// Narrowing takes effect at once; a change that admits new sources is
    /// proposed instead (a two-person operation; give --reason).
    Allow {
        /// The identity.
        identity: String,
        /// CIDR networks, e.g. 10.0.0.0/8.
        networks: Vec<String>,
        /// Only if the allowlist is still this one (comma-separated; `anywhere`
        /// for none): refused if another operator changed it meanwhile.
        #[arg(long)]
        expect: Option<String>,
        /// Why, should the change need a second operator (e.g. a ticket number).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revokes an identity: it can make no new call, on any node.
    RevokeIdentity {
        /// The identity.
        identity: String,
    },
    /// Revokes a certificate by serial number (hex).
    RevokeCert {
        /// The serial.
        serial: String,
    },
    /// Lists the identities and addresses locked out now, and until when.
    Lockouts,
    /// Lifts the lockout of an identity (or, with `--address`, of an address)
    /// on every node, and resets its count; audited.
    Unlock {
        /// The identity (or the IP address, with `--address`).
        who: String,
        /// `who` is an IP address locked out after failed authentications.
        #[arg(long)]
        address: bool,
    },
}

fn policy_json(p: &IdentityPolicy) -> serde_json::Value {
    let roles: serde_json::Map<String, serde_json::Value> = p
        .tenant_roles
        .iter()
        .map(|t| (t.tenant.clone(), json!(t.roles)))
        .collect();
    json!({"identity": p.identity, "tenant_roles": roles, "cluster_roles": p.cluster_roles,
           "allow_from": p.allow_from, "revoked": p.revoked})
}

/// Prints a change: the policy after it (JSON: before, after, changed), and
/// for people what changed.
fn print_change(output: Output, c: PolicyChange) {
    let (before, after) = (c.before.unwrap_or_default(), c.after.unwrap_or_default());
    let diff = policy_diff(&before, &after);
    output.emit(
        json!({"identity": after.identity, "changed": c.changed, "before": policy_json(&before),
               "after": policy_json(&after), "diff": diff}),
        || match diff.is_empty() {
            true => format!("no change: already so\n{}", policy_text(&after)),
            false => format!("{}\n{}", diff.join("\n"), policy_text(&after)),
        },
    );
}

fn networks(list: &str) -> Vec<String> {
    match list.trim() {
        "" | "anywhere" => vec![],
        l => l.split(',').map(|n| n.trim().to_string()).collect(),
    }
}

pub async fn run(endpoint: &str, output: Output, cmd: AccessCmd) -> anyhow::Result<()> {
    let mut c = access(endpoint).await?;
    let change = match cmd {
        AccessCmd::Show { identity } => {
            let p = c
                .get_identity(GetIdentityRequest { identity })
                .await
                .map_err(status_err)?
                .into_inner();
            output.emit(policy_json(&p), || policy_text(&p));
            return Ok(());
        }
        AccessCmd::RevokeCert { serial } => {
            c.revoke_certificate(RevokeCertificateRequest {
                serial: serial.clone(),
            })
            .await
            .map_err(status_err)?;
            output.emit(json!({"revoked_serial": serial}), || {
                format!("revoked certificate {serial}")
            });
            return Ok(());
        }
        AccessCmd::Lockouts => {
            let l = c
                .list_lockouts(ListLockoutsRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .lockouts;
            let who = |x: &mailvault_proto::v1::LockedOut| match x.identity.is_empty() {
                true => ("address", x.address.clone()),
                false => ("identity", x.identity.clone()),
            };
            let doc = l
                .iter()
                .map(|x| {
                    let (kind, name) = who(x);
                    json!({"kind": kind, "who": name, "until": rfc3339(x.until_ms), "until_ms": x.until_ms})
                })
                .collect();
            output.emit(doc, || match l.is_empty() {
                true => "no lockouts".to_string(),
                false => table(
                    ["kind", "who", "locked out until"],
                    l.iter().map(|x| {
                        let (kind, name) = who(x);
                        [kind.to_string(), name, rfc3339(x.until_ms)]
                    }),
                ),
            });
            return Ok(());
        }
        AccessCmd::Unlock { who, address } => {
            let who_req = match address {
                true => unlock_request::Who::Address(who.clone()),
                false => unlock_request::Who::Identity(who.clone()),
            };
            let r = c
                .unlock(UnlockRequest { who: Some(who_req) })
                .await
                .map_err(status_err)?
                .into_inner();
            output.emit(json!({"unlocked": who, "was_locked": r.was_locked}), || {
                match r.was_locked {
                    true => format!("unlocked {who}"),
                    false => format!("{who} was not locked out; its count is reset"),
                }
            });
            return Ok(());
        }
        AccessCmd::Grant {
            identity,
            role,
            reason,
        } => {
            let kind = Kind::Grant(GrantOperation {
                identity,
                role: role.into_role()?,
            });
            let kind = OperationKind { kind: Some(kind) };
            return crate::op::propose(endpoint, output, kind, reason, DEFAULT_EXPIRY).await;
        }
        AccessCmd::Ungrant { identity, role } => {
            let role = role.into_role()?;
            c.ungrant(GrantRequest { identity, role }).await
        }
        AccessCmd::Allow {
            identity,
            networks: list,
            expect,
            reason,
        } => {
            let set = c
                .set_allowlist(SetAllowlistRequest {
                    identity: identity.clone(),
                    allow_from: Some(Allowlist {
                        networks: list.clone(),
                    }),
                    expected: expect.map(|e| Allowlist {
                        networks: networks(&e),
                    }),
                })
                .await;
            match set {
                Err(s) if reason_of(&s).as_deref() == Some("TWO_PERSON_REQUIRED") => {
                    let Some(reason) = reason else {
                        anyhow::bail!(
                            "this change admits new sources: it needs a second operator. Give --reason \
                             to propose it ({})",
                            s.message()
                        );
                    };
                    let kind = Kind::Allowlist(AllowlistOperation {
                        identity,
                        allow_from: Some(Allowlist { networks: list }),
                    });
                    let kind = OperationKind { kind: Some(kind) };
                    return crate::op::propose(endpoint, output, kind, reason, DEFAULT_EXPIRY).await;
                }
                other => other,
            }
        }
        AccessCmd::RevokeIdentity { identity } => c.revoke_identity(RevokeIdentityRequest { identity }).await,
    };
    print_change(output, change.map_err(status_err)?.into_inner());
    Ok(())
}
