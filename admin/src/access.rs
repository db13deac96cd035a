//! `mailvault-admin access`: the replicated access policy.

use clap::Subcommand;
use mailvault_proto::v1::{
    GetIdentityRequest, IdentityPolicy, PutIdentityRequest, RevokeCertificateRequest, TenantRoles,
};
use serde_json::json;

use crate::client::{admin, status_err};
use crate::Output;

#[derive(Subcommand, Debug)]
pub enum AccessCmd {
    /// Shows an identity's roles, allowlist and revocation.
    Show {
        /// The identity.
        identity: String,
    },
    /// Grants a tenant role (`--tenant T --role agent`) or a cluster role (`--cluster-role auditor`).
    Grant {
        /// The identity.
        identity: String,
        /// Tenant (`*` for every tenant).
        #[arg(long, requires = "role")]
        tenant: Option<String>,
        /// reader, agent, exporter or tenant-admin.
        #[arg(long)]
        role: Option<String>,
        /// operator or auditor.
        #[arg(long)]
        cluster_role: Option<String>,
    },
    /// Removes a tenant role or a cluster role.
    Ungrant {
        /// The identity.
        identity: String,
        /// Tenant.
        #[arg(long, requires = "role")]
        tenant: Option<String>,
        /// Tenant role.
        #[arg(long)]
        role: Option<String>,
        /// Cluster role.
        #[arg(long)]
        cluster_role: Option<String>,
    },
    /// Sets the networks an identity may call from (no networks: anywhere).
    Allow {
        /// The identity.
        identity: String,
        /// CIDR networks, e.g. 10.0.0.0/8.
        networks: Vec<String>,
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
}

fn print(output: Output, p: &IdentityPolicy) {
    match output {
        Output::Json => {
            let roles: serde_json::Map<String, serde_json::Value> = p
                .tenant_roles
                .iter()
                .map(|t| (t.tenant.clone(), json!(t.roles)))
                .collect();
            println!(
                "{}",
                json!({"identity": p.identity, "tenant_roles": roles, "cluster_roles": p.cluster_roles,
                       "allow_from": p.allow_from, "revoked": p.revoked})
            );
        }
        Output::Text => {
            println!("identity:      {}", p.identity);
            for t in &p.tenant_roles {
                println!("tenant {:<8} {}", t.tenant, t.roles.join(", "));
            }
            println!("cluster roles: {}", p.cluster_roles.join(", "));
            let allow = if p.allow_from.is_empty() {
                "anywhere".to_string()
            } else {
                p.allow_from.join(", ")
            };
            println!("allowed from:  {allow}");
            println!("revoked:       {}", p.revoked);
        }
    }
}

fn edit_roles(
    p: &mut IdentityPolicy,
    tenant: Option<String>,
    role: Option<String>,
    cluster: Option<String>,
    add: bool,
) {
    if let (Some(t), Some(r)) = (tenant, role) {
        let idx = match p.tenant_roles.iter().position(|x| x.tenant == t) {
            Some(i) => i,
            None => {
                p.tenant_roles.push(TenantRoles {
                    tenant: t,
                    roles: vec![],
                });
                p.tenant_roles.len() - 1
            }
        };
        let roles = &mut p.tenant_roles[idx].roles;
        roles.retain(|x| *x != r);
        if add {
            roles.push(r);
        }
        p.tenant_roles.retain(|x| !x.roles.is_empty());
    }
    if let Some(c) = cluster {
        p.cluster_roles.retain(|x| *x != c);
        if add {
            p.cluster_roles.push(c);
        }
    }
}

pub async fn run(endpoint: &str, output: Output, cmd: AccessCmd) -> anyhow::Result<()> {
    let mut c = admin(endpoint).await?;
    let get = |id: String| GetIdentityRequest { identity: id };
    let (identity, change): (String, Box<dyn FnOnce(&mut IdentityPolicy)>) = match cmd {
        AccessCmd::Show { identity } => {
            let p = c
                .get_identity(get(identity))
                .await
                .map_err(status_err)?
                .into_inner();
            print(output, &p);
            return Ok(());
        }
        AccessCmd::RevokeCert { serial } => {
            c.revoke_certificate(RevokeCertificateRequest {
                serial: serial.clone(),
            })
            .await
            .map_err(status_err)?;
            match output {
                Output::Json => println!("{}", json!({"revoked_serial": serial})),
                Output::Text => println!("revoked certificate {serial}"),
            }
            return Ok(());
        }
        AccessCmd::Grant {
            identity,
            tenant,
            role,
            cluster_role,
        } => (
            identity,
            Box::new(move |p| edit_roles(p, tenant, role, cluster_role, true)),
        ),
        AccessCmd::Ungrant {
            identity,
            tenant,
            role,
            cluster_role,
        } => (
            identity,
            Box::new(move |p| edit_roles(p, tenant, role, cluster_role, false)),
        ),
        AccessCmd::Allow { identity, networks } => (identity, Box::new(move |p| p.allow_from = networks)),
        AccessCmd::RevokeIdentity { identity } => (identity, Box::new(|p| p.revoked = true)),
    };
    let mut p = c
        .get_identity(get(identity))
        .await
        .map_err(status_err)?
        .into_inner();
    change(&mut p);
    let p = c
        .put_identity(PutIdentityRequest { policy: Some(p) })
        .await
        .map_err(status_err)?
        .into_inner();
    print(output, &p);
    Ok(())
}
