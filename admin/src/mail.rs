//! `tenant`, `mailbox` and `mail` subcommands.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use mailvault_proto::v1::*;
use serde_json::json;

use crate::client::{mailbox as mailbox_client, status_err, tenants};
use crate::output::{table, Output};

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Creates a tenant and its data key.
    Create {
        /// Tenant name.
        tenant: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum MailboxCmd {
    /// Creates a mailbox.
    Create {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
    },
    /// Lists a tenant's mailboxes.
    List {
        /// Tenant name.
        tenant: String,
    },
    /// Proposes deleting a mailbox and every message in it (operator): a
    /// two-person operation, after a verified backup (`op approve`).
    Delete {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// Why (e.g. a ticket number); required.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum MailCmd {
    /// Appends a raw RFC 5322 file.
    Append {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// The message file.
        file: PathBuf,
        /// Flags to set, e.g. --flag '\Seen'.
        #[arg(long = "flag")]
        flags: Vec<String>,
        /// Idempotency key (default: random). Reuse it to retry safely.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Lists messages.
    List {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// Only messages changed after this MODSEQ.
        #[arg(long, default_value_t = 0)]
        changed_since: u64,
    },
    /// Fetches a message's raw bytes.
    Get {
        /// Tenant name.
        tenant: String,
        /// Mailbox name.
        mailbox: String,
        /// Message UID.
        uid: u32,
        /// Write the bytes here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A random idempotency key.
pub fn random_key() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("system random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub async fn tenant(endpoint: &str, output: Output, cmd: TenantCmd) -> anyhow::Result<()> {
    let TenantCmd::Create { tenant } = cmd;
    let r = tenants(endpoint)
        .await?
        .create_tenant(CreateTenantRequest {
            tenant: tenant.clone(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    output.emit(json!({"tenant": tenant, "key_version": r.key_version}), || {
        format!("created tenant {tenant} (data key version {})", r.key_version)
    });
    Ok(())
}

fn mailbox_json(m: &MailboxStatus) -> serde_json::Value {
    json!({
        "tenant": m.tenant, "mailbox": m.mailbox, "uidvalidity": m.uidvalidity, "uidnext": m.uidnext,
        "highest_modseq": m.highest_modseq, "messages": m.messages, "unseen": m.unseen,
        "claimed": m.claimed, "total_bytes": m.total_bytes,
    })
}

pub async fn mailbox(endpoint: &str, output: Output, cmd: MailboxCmd) -> anyhow::Result<()> {
    use mailvault_proto::v1::{operation_kind::Kind, DeleteMailboxOperation, OperationKind};
    if let MailboxCmd::Delete {
        tenant,
        mailbox,
        reason,
    } = cmd
    {
        let kind = OperationKind {
            kind: Some(Kind::DeleteMailbox(DeleteMailboxOperation { tenant, mailbox })),
        };
        let expiry = std::time::Duration::from_secs(3600);
        return crate::op::propose(endpoint, output, kind, reason, expiry).await;
    }
    let mut c = mailbox_client(endpoint).await?;
    let list = match cmd {
        MailboxCmd::Create { tenant, mailbox } => vec![c
            .create_mailbox(CreateMailboxRequest { tenant, mailbox })
            .await
            .map_err(status_err)?
            .into_inner()],
        MailboxCmd::List { tenant } => {
            c.list_mailboxes(ListMailboxesRequest { tenant })
                .await
                .map_err(status_err)?
                .into_inner()
                .mailboxes
        }
        MailboxCmd::Delete { .. } => unreachable!("proposed above"),
    };
    let json = serde_json::Value::from(list.iter().map(mailbox_json).collect::<Vec<_>>());
    output.emit(json, || {
        let header = [
            "mailbox",
            "messages",
            "unseen",
            "claimed",
            "uidnext",
            "uidvalidity",
            "modseq",
            "bytes",
        ];
        let rows = list.iter().map(|m| {
            [
                m.mailbox.clone(),
                m.messages.to_string(),
                m.unseen.to_string(),
                m.claimed.to_string(),
                m.uidnext.to_string(),
                m.uidvalidity.to_string(),
                m.highest_modseq.to_string(),
                m.total_bytes.to_string(),
            ]
        });
        table(header, rows)
    });
    Ok(())
}

pub async fn mail(endpoint: &str, output: Output, cmd: MailCmd) -> anyhow::Result<()> {
    let mut c = mailbox_client(endpoint).await?;
    match cmd {
        MailCmd::Append {
            tenant,
            mailbox,
            file,
            flags,
            idempotency_key,
        } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let header = AppendHeader {
                tenant,
                mailbox,
                idempotency_key: idempotency_key.unwrap_or_else(random_key),
                flags,
                internal_date_ms: 0,
                size: bytes.len() as u64,
            };
            let frames = mailvault_proto::client::append_frames(header, &bytes);
            let r = c
                .append_message(tokio_stream::iter(frames))
                .await
                .map_err(status_err)?
                .into_inner();
            let json = json!({"uid": r.uid, "modseq": r.modseq, "uidvalidity": r.uidvalidity, "duplicate": r.duplicate});
            output.emit(json, || {
                let dup = match r.duplicate {
                    true => " — duplicate idempotency key, nothing new stored",
                    false => "",
                };
                format!(
                    "appended uid {} (modseq {}, uidvalidity {}){dup}",
                    r.uid, r.modseq, r.uidvalidity
                )
            });
        }
        MailCmd::List {
            tenant,
            mailbox,
            changed_since,
        } => {
            let request = ListMessagesRequest {
                tenant,
                mailbox,
                changed_since,
                ..Default::default()
            };
            let all = mailvault_proto::client::list_all(&mut c, request)
                .await
                .map_err(status_err)?;
            print_messages(output, &all);
        }
        MailCmd::Get {
            tenant,
            mailbox,
            uid,
            out,
        } => {
            let (_, body) =
                mailvault_proto::client::read_message(&mut c, GetMessageRequest { tenant, mailbox, uid })
                    .await
                    .map_err(status_err)?;
            match out {
                Some(p) => {
                    std::fs::write(&p, &body).with_context(|| format!("cannot write {}", p.display()))?
                }
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&body)?;
                }
            }
        }
    }
    Ok(())
}

fn print_messages(output: Output, all: &[MessageSummary]) {
    let json: Vec<_> = all
        .iter()
        .map(|m| {
            json!({
                "uid": m.uid, "modseq": m.modseq, "flags": m.flags, "size": m.size,
                "internal_date_ms": m.internal_date_ms, "subject": m.subject, "from": m.from,
                "to": m.to, "date": m.date, "claimed_by": m.claimed_by, "damaged": m.damaged,
            })
        })
        .collect();
    output.emit(json.into(), || {
        let header = ["uid", "modseq", "flags", "size", "from", "subject", "claimed by"];
        let rows = all.iter().map(|m| {
            [
                m.uid.to_string(),
                m.modseq.to_string(),
                m.flags.join(" "),
                m.size.to_string(),
                m.from.clone(),
                match m.damaged {
                    // Its copy on the answering node failed authentication.
                    true => "(damaged on this node; `mail get` reads a healthy replica)".to_string(),
                    false => m.subject.clone(),
                },
                m.claimed_by.clone(),
            ]
        });
        table(header, rows)
    });
}
