//! The apply rules of each domain, on a real RocksDB in a temp directory.

use serde_bytes::ByteBuf;

use super::Tx;
use crate::state::audit::AuditEvent;
use crate::state::command::{AccessChange, Command, CommandResult, NewMessage, Refusal, RoleGrant};
use crate::state::policy::{ClusterRole, IdentityPolicy, TenantRole, ANY_TENANT};
use crate::store::{open_db, Db, MailReader};

const T: &str = "acme";
const M: &str = "support";

use crate::crypto::{test_keyring as keys, NameKind, TenantNames};

fn reader(db: &Db) -> MailReader {
    MailReader::new(crate::store::StateDb::fixed(db.clone()), keys().binding().clone())
}

/// The tenant's name keys in this store.
fn names(db: &Db) -> std::sync::Arc<TenantNames> {
    let rec = reader(db).tenant(T).unwrap().unwrap();
    keys().names(T, &rec.keys[0]).unwrap()
}

fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("db")).unwrap();
    (dir, db)
}

/// Applies `cmds` in one transaction, writes it, and returns the results.
fn apply(db: &Db, cmds: Vec<Command>) -> Vec<CommandResult> {
    let mut tx = Tx::new(db, keys());
    let results = cmds.into_iter().map(|c| tx.apply(c).unwrap()).collect();
    db.write(tx.batch).unwrap();
    results
}

fn tenant() -> Command {
    Command::CreateTenant {
        tenant: T.into(),
        key: keys().generate(T, 1).unwrap(),
    }
}

fn mailbox() -> Command {
    Command::CreateMailbox {
        tenant: T.into(),
        mailbox: M.into(),
        uidvalidity: 42,
    }
}

fn message(key: &str, blob: u8, staged: u32) -> NewMessage {
    NewMessage {
        mailbox: M.into(),
        idempotency_key: key.into(),
        blob: [blob; 16],
        key_version: 1,
        flags: vec!["\\Seen".into(), "\\Seen".into()],
        internal_date_ms: 1,
        size: 10,
        staged_chunks: staged,
        inline_chunks: vec![ByteBuf::from(vec![1, 2, 3])],
        headers: vec![9; 20],
    }
}

fn append(key: &str, blob: u8) -> Command {
    Command::Append {
        tenant: T.into(),
        message: message(key, blob, 0),
    }
}

fn claim(uid: u32, agent: &str) -> Command {
    Command::Claim {
        tenant: T.into(),
        mailbox: M.into(),
        uid,
        agent: agent.into(),
    }
}

#[test]
fn mail_commands_in_one_transaction_see_each_other() {
    let (_d, db) = db();
    let r = apply(
        &db,
        vec![tenant(), tenant(), mailbox(), append("k1", 1), append("k1", 2)],
    );
    assert_eq!(r[0], CommandResult::Done);
    assert_eq!(r[1], CommandResult::Refused(Refusal::TenantExists));
    assert_eq!(r[2], CommandResult::MailboxCreated { uidvalidity: 42 });
    assert_eq!(
        r[3],
        CommandResult::Appended {
            uid: 1,
            modseq: 1,
            uidvalidity: 42,
            duplicate: false
        }
    );
    // A reused idempotency key answers with the first UID and stores nothing.
    assert_eq!(
        r[4],
        CommandResult::Appended {
            uid: 1,
            modseq: 1,
            uidvalidity: 42,
            duplicate: true
        }
    );
    let reader = reader(&db);
    let mbox = reader.mailbox(T, M).unwrap().unwrap();
    assert_eq!((mbox.messages, mbox.uidnext), (1, 2));
    assert_eq!(
        reader.message(T, M, 1).unwrap().unwrap().unwrap().flags,
        vec!["\\Seen".to_string()]
    );
    assert!(
        reader.chunk(T, &[2; 16], 0).unwrap().is_none(),
        "the duplicate's chunk is not kept"
    );
}

#[test]
fn mail_refusals_change_nothing() {
    let (_d, db) = db();
    assert_eq!(
        apply(&db, vec![mailbox()]),
        vec![CommandResult::Refused(Refusal::NoTenant)]
    );
    apply(&db, vec![tenant(), mailbox()]);
    let staged = Command::Append {
        tenant: T.into(),
        message: message("k", 3, 2),
    };
    assert_eq!(
        apply(&db, vec![staged]),
        vec![CommandResult::Refused(Refusal::IncompleteBody)]
    );
    let missing = Command::Move {
        tenant: T.into(),
        mailbox: M.into(),
        uid: 9,
        message: message("", 4, 0),
    };
    assert_eq!(
        apply(&db, vec![missing]),
        vec![CommandResult::Refused(Refusal::NoMessage)]
    );
    let reader = reader(&db);
    assert_eq!(reader.mailbox(T, M).unwrap().unwrap().messages, 0);
}

#[test]
fn claims_have_one_winner_and_conditional_flags_see_changes() {
    let (_d, db) = db();
    apply(&db, vec![tenant(), mailbox(), append("k", 1)]);
    let n = names(&db);
    let ann = n.seal(NameKind::Agent, "ann");
    // Agents arrive sealed from a leader, or in clear from an older one:
    // the state machine seals them the same way.
    let r = apply(&db, vec![claim(1, &ann), claim(1, "bob"), claim(1, "ann")]);
    assert!(matches!(r[0], CommandResult::Changed { modseq: 2, .. }));
    assert_eq!(r[1], CommandResult::Refused(Refusal::ClaimedBy(ann.clone())));
    assert!(
        matches!(r[2], CommandResult::Changed { modseq: 3, .. }),
        "a claim is idempotent for its holder"
    );
    let release = |agent: &str| Command::Release {
        tenant: T.into(),
        mailbox: M.into(),
        uid: 1,
        agent: agent.into(),
    };
    assert_eq!(
        apply(&db, vec![release("bob")]),
        vec![CommandResult::Refused(Refusal::NotClaimant)]
    );
    let flag = |since| Command::UpdateFlags {
        tenant: T.into(),
        mailbox: M.into(),
        uid: 1,
        add: vec!["answered".into()],
        remove: vec!["\\Seen".into()],
        unchanged_since: Some(since),
    };
    assert_eq!(
        apply(&db, vec![flag(2)]),
        vec![CommandResult::Refused(Refusal::Modified(3))]
    );
    let r = apply(&db, vec![flag(3), release("ann")]);
    assert_eq!(
        r[0],
        CommandResult::Changed {
            modseq: 4,
            flags: vec![n.seal(NameKind::Keyword, "answered")],
            claimed_by: Some(ann)
        }
    );
    assert!(matches!(&r[1], CommandResult::Changed { claimed_by: None, .. }));
}

#[test]
fn expunge_and_move_remove_the_source_and_its_chunks() {
    let (_d, db) = db();
    apply(&db, vec![tenant(), mailbox(), append("a", 1), append("b", 2)]);
    let mv = Command::Move {
        tenant: T.into(),
        mailbox: M.into(),
        uid: 1,
        message: message("", 3, 0),
    };
    let ex = Command::Expunge {
        tenant: T.into(),
        mailbox: M.into(),
        uids: vec![2, 77],
    };
    let r = apply(&db, vec![mv, ex]);
    assert!(matches!(r[0], CommandResult::Appended { uid: 3, .. }));
    assert!(matches!(&r[1], CommandResult::Expunged { uids, .. } if uids == &vec![2]));
    let reader = reader(&db);
    assert!(reader.message(T, M, 1).unwrap().is_none());
    assert!(reader.chunk(T, &[1; 16], 0).unwrap().is_none());
    assert!(reader.chunk(T, &[2; 16], 0).unwrap().is_none());
    assert!(reader.chunk(T, &[3; 16], 0).unwrap().is_some());
    assert_eq!(reader.mailbox(T, M).unwrap().unwrap().messages, 1);
}

fn put_chunk(blob: u8, index: u32) -> Command {
    Command::PutChunk {
        tenant: T.into(),
        blob: [blob; 16],
        index,
        ciphertext: ByteBuf::from(vec![7; 100]),
    }
}

/// What each staged upload holds: (blob, chunks in its record, idle since,
/// chunks stored).
fn staged(db: &Db) -> Vec<(u8, u32, Option<i64>, u64)> {
    let mut out: Vec<_> = reader(db)
        .staged_uploads()
        .unwrap()
        .into_iter()
        .map(|u| (u.blob[0], u.record.chunks, u.record.idle_since_ms, u.chunks))
        .collect();
    out.sort();
    out
}

#[test]
fn a_staged_upload_is_kept_while_active_committed_or_dropped_whole_and_expired_only_when_idle() {
    let (_d, db) = db();
    apply(&db, vec![tenant(), mailbox()]);
    // Three uploads: one committed, one dropped, one whose leader died.
    apply(
        &db,
        vec![
            put_chunk(1, 0),
            put_chunk(1, 1),
            put_chunk(2, 0),
            put_chunk(3, 0),
            put_chunk(3, 1),
        ],
    );
    assert_eq!(
        staged(&db),
        vec![(1, 2, None, 2), (2, 1, None, 1), (3, 2, None, 2)]
    );
    let commit = Command::Append {
        tenant: T.into(),
        message: message("k", 1, 2),
    };
    let drop = Command::DropBlob {
        tenant: T.into(),
        blob: [2; 16],
        chunks: 1,
    };
    let r = apply(&db, vec![commit, drop]);
    assert!(matches!(r[0], CommandResult::Appended { uid: 1, .. }), "{r:?}");
    assert_eq!(staged(&db), vec![(3, 2, None, 2)]);

    let sweep = |now_ms| match &apply(
        &db,
        vec![Command::ExpireStaged {
            now_ms,
            expiry_ms: 3_600_000,
            node: 2,
        }],
    )[0]
    {
        CommandResult::Expired {
            uploads,
            chunks,
            marked,
        } => (*uploads, *chunks, *marked),
        other => panic!("{other:?}"),
    };
    assert_eq!(sweep(1_000), (0, 0, 1));
    assert_eq!(staged(&db), vec![(3, 2, Some(1_000), 2)]);
    // A chunk staged meanwhile makes the upload active again: idle anew.
    apply(&db, vec![put_chunk(3, 2)]);
    assert_eq!(staged(&db), vec![(3, 3, None, 3)]);
    assert_eq!(sweep(2_000), (0, 0, 1));
    assert_eq!(
        sweep(3_601_999),
        (0, 0, 0),
        "idle a millisecond short of the expiry"
    );
    assert_eq!(sweep(3_602_000), (1, 3, 0));
    assert_eq!(staged(&db), vec![]);
    let reader = reader(&db);
    let audit = reader.audit_records(1, 10).unwrap();
    let expired: Vec<_> = audit
        .iter()
        .filter(|r| r.event.action == "staged-expired")
        .collect();
    assert_eq!(expired.len(), 1, "one record per expired upload: {audit:?}");
    let e = &expired[0].event;
    assert_eq!(
        (
            e.identity.as_str(),
            e.target.as_str(),
            e.result.as_str(),
            e.time_ms
        ),
        (
            "node:2",
            format!("{T}/{}", "03".repeat(16)).as_str(),
            "3 chunk(s) idle since 2000",
            3_602_000
        )
    );
    assert!(reader.chunk(T, &[3; 16], 0).unwrap().is_none());
    assert!(
        reader.chunk(T, &[1; 16], 0).unwrap().is_some(),
        "the committed message keeps its chunks"
    );
    assert!(reader.chunk(T, &[1; 16], 2).unwrap().is_some());

    // Its client, back after the expiry, cannot commit a part of a body.
    let late = Command::Append {
        tenant: T.into(),
        message: message("late", 3, 3),
    };
    assert!(matches!(
        apply(&db, vec![late])[0],
        CommandResult::Refused(Refusal::IncompleteBody)
    ));
    assert_eq!(staged(&db), vec![]);
}

#[test]
fn access_commands_store_policies_and_revocations() {
    let (_d, db) = db();
    let mut policy = IdentityPolicy::default();
    policy.cluster_roles.insert(ClusterRole::Auditor);
    let r = apply(
        &db,
        vec![
            Command::PutIdentity {
                identity: "carol".into(),
                policy: policy.clone(),
            },
            Command::RevokeSerial {
                serial: "0abc".into(),
            },
        ],
    );
    assert_eq!(r, vec![CommandResult::Done, CommandResult::Done]);
    let reader = reader(&db);
    assert_eq!(reader.identity_policy("carol").unwrap(), Some(policy));
    assert_eq!(reader.identity_policy("dave").unwrap(), None);
    assert!(reader.serial_revoked("0abc").unwrap());
    assert!(!reader.serial_revoked("0abd").unwrap());
}

fn change(c: AccessChange) -> Command {
    Command::Access(c)
}

fn grant(identity: &str, role: RoleGrant) -> Command {
    change(AccessChange::Grant {
        identity: identity.into(),
        role,
    })
}

fn agent_on(tenant: &str) -> RoleGrant {
    RoleGrant::Tenant {
        tenant: tenant.into(),
        role: TenantRole::Agent,
    }
}

/// The policy after a change that was made.
fn after(r: &CommandResult) -> &IdentityPolicy {
    match r {
        CommandResult::Policy { after, .. } => after,
        other => panic!("not a policy change: {other:?}"),
    }
}

#[test]
fn concurrent_access_changes_compose_instead_of_overwriting() {
    let (_d, db) = db();
    apply(&db, vec![tenant()]);
    // Two operators' changes to one identity, in one transaction and in two.
    let r = apply(
        &db,
        vec![
            grant("erin", agent_on(T)),
            grant("erin", RoleGrant::Cluster(ClusterRole::Auditor)),
        ],
    );
    let net: ipnet::IpNet = "10.0.0.0/8".parse().unwrap();
    apply(
        &db,
        vec![change(AccessChange::SetAllowlist {
            identity: "erin".into(),
            networks: vec![net],
            expected: Some(vec![]),
        })],
    );
    let p = reader(&db).identity_policy("erin").unwrap().unwrap();
    assert_eq!(&p.tenant_roles[T], &[TenantRole::Agent].into());
    assert!(p.cluster_roles.contains(&ClusterRole::Auditor));
    assert_eq!(p.allow_from, vec![net]);
    assert!(
        after(&r[1]).tenant_roles.contains_key(T),
        "the second grant saw the first"
    );

    // A change already in place is done and reported unchanged.
    let again = apply(&db, vec![grant("erin", agent_on(T))]);
    assert!(matches!(&again[0], CommandResult::Policy { before, after } if before == after));

    // Ungrant removes only its role, and an empty tenant entry goes with it.
    let r = apply(
        &db,
        vec![change(AccessChange::Ungrant {
            identity: "erin".into(),
            role: agent_on(T),
        })],
    );
    assert!(after(&r[0]).tenant_roles.is_empty());
    assert!(after(&r[0]).cluster_roles.contains(&ClusterRole::Auditor));
}

#[test]
fn access_changes_are_refused_when_their_precondition_fails_and_change_nothing() {
    let (_d, db) = db();
    apply(&db, vec![tenant()]);
    let reader = reader(&db);
    // A tenant that does not exist (a typo) is refused; "*" is every tenant.
    let r = apply(
        &db,
        vec![
            grant("frank", agent_on("acne")),
            grant("frank", agent_on(ANY_TENANT)),
        ],
    );
    assert_eq!(r[0], CommandResult::Refused(Refusal::NoTenant));
    assert!(after(&r[1]).tenant_roles.contains_key(ANY_TENANT));
    // An allowlist that changed since it was read.
    let r = apply(
        &db,
        vec![change(AccessChange::SetAllowlist {
            identity: "frank".into(),
            networks: vec!["10.0.0.0/8".parse().unwrap()],
            expected: Some(vec!["192.168.0.0/16".parse().unwrap()]),
        })],
    );
    assert_eq!(r[0], CommandResult::Refused(Refusal::AllowlistChanged));
    assert!(reader
        .identity_policy("frank")
        .unwrap()
        .unwrap()
        .allow_from
        .is_empty());
    // No role for a revoked identity; revoking twice is done once.
    let r = apply(
        &db,
        vec![
            change(AccessChange::Revoke {
                identity: "frank".into(),
            }),
            change(AccessChange::Revoke {
                identity: "frank".into(),
            }),
            grant("frank", RoleGrant::Cluster(ClusterRole::Operator)),
        ],
    );
    assert!(after(&r[0]).revoked);
    assert!(matches!(&r[1], CommandResult::Policy { before, after } if before == after));
    assert_eq!(r[2], CommandResult::Refused(Refusal::IdentityRevoked));
    let p = reader.identity_policy("frank").unwrap().unwrap();
    assert!(p.revoked && p.cluster_roles.is_empty());
}

#[test]
fn audit_events_are_chained_across_transactions() {
    let (_d, db) = db();
    let event = |n: &str| AuditEvent::new(n, None, "Test", "-", "allowed");
    apply(
        &db,
        vec![Command::Audit {
            events: vec![event("a"), event("b")],
        }],
    );
    apply(
        &db,
        vec![Command::Audit {
            events: vec![event("c")],
        }],
    );
    let reader = reader(&db);
    assert_eq!(reader.audit_head().unwrap().seq, 3);
    let records = reader.audit_records(1, 10).unwrap();
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(records[2].prev_hash, records[1].hash);
    assert_eq!(reader.verify_audit().unwrap(), Ok(3));
}

/// Copies the stored value at `from` over `to` (as someone with a copy of
/// the data directory could).
fn copy_stored(db: &Db, from: &[u8], to: &[u8]) {
    let cf = db.cf_handle(crate::store::CF_SM).unwrap();
    let value = db.get_cf(cf, from).unwrap().expect("stored");
    db.put_cf(cf, to, value).unwrap();
}

#[test]
fn a_record_of_any_kind_copied_to_another_place_is_refused_where_it_lands() {
    use crate::state::keys;
    use crate::store::ReadError;
    let (_d, db) = db();
    let other_tenant = Command::CreateTenant {
        tenant: "globex".into(),
        key: keys().generate("globex", 1).unwrap(),
    };
    let other_mailbox = Command::CreateMailbox {
        tenant: T.into(),
        mailbox: "other".into(),
        uidvalidity: 7,
    };
    let identity = |name: &str| Command::PutIdentity {
        identity: name.into(),
        policy: IdentityPolicy {
            cluster_roles: [ClusterRole::Operator].into(),
            ..Default::default()
        },
    };
    let revoke = |serial: &str| Command::RevokeSerial {
        serial: serial.into(),
    };
    apply(
        &db,
        vec![
            tenant(),
            other_tenant,
            mailbox(),
            other_mailbox,
            append("k1", 1),
            append("k2", 2),
            identity("root"),
            Command::PutIdentity {
                identity: "intern".into(),
                policy: IdentityPolicy::default(),
            },
            revoke("aa"),
            revoke("bb"),
        ],
    );
    let n = names(&db);
    let r = reader(&db);
    // Every record reads back whole before anything is moved.
    assert!(r.message(T, M, 2).unwrap().unwrap().is_ok());
    assert_eq!(
        r.idempotency(T, M, &n.idempotency_key("k2"))
            .unwrap()
            .map(|i| i.uid),
        Some(2)
    );
    let corrupt = |res: Result<bool, ReadError>| matches!(res, Err(ReadError::Corrupt));

    copy_stored(&db, &keys::message(T, M, 1), &keys::message(T, M, 2));
    assert_eq!(r.message(T, M, 2).unwrap().unwrap().map(|m| m.uid), Err(2));
    let mut listed = Vec::new();
    r.messages(T, M, 0, |m| {
        listed.push(m.map(|m| m.uid));
        true
    })
    .unwrap();
    assert_eq!(listed, vec![Ok(1), Err(2)], "UID 1 is not listed twice");

    copy_stored(&db, &keys::mailbox(T, M), &keys::mailbox(T, "other"));
    assert!(corrupt(r.mailbox(T, "other").map(|m| m.is_some())));
    assert!(corrupt(r.mailboxes(T).map(|m| m.is_empty())));

    copy_stored(&db, &keys::change(T, M, 1), &keys::change(T, M, 2));
    assert!(corrupt(r.changes(T, M, 0, 10).map(|c| c.is_empty())));

    let (h1, h2) = (n.idempotency_key("k1"), n.idempotency_key("k2"));
    copy_stored(&db, &keys::idempotency(T, M, &h1), &keys::idempotency(T, M, &h2));
    assert!(corrupt(r.idempotency(T, M, &h2).map(|i| i.is_some())));

    copy_stored(&db, &keys::tenant(T), &keys::tenant("globex"));
    assert!(corrupt(r.tenant("globex").map(|t| t.is_some())));

    // The operator's policy copied onto another identity grants nothing.
    copy_stored(&db, &keys::identity("root"), &keys::identity("intern"));
    assert!(corrupt(r.identity_policy("intern").map(|p| p.is_some())));

    // A revocation copied to another serial is refused (callers take a
    // failed read as revoked: it fails closed).
    copy_stored(&db, &keys::revoked_serial("aa"), &keys::revoked_serial("bb"));
    assert!(corrupt(r.serial_revoked("bb")));
    assert!(r.serial_revoked("aa").unwrap());

    // The state machine stops rather than apply over a moved record.
    let db2 = db.clone();
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        apply(&db2, vec![append("k2", 3)])
    }));
    assert!(
        applied.is_err(),
        "an apply over a moved record must stop the node"
    );
}

fn taken(id: &str) -> crate::state::backup::BackupEntry {
    crate::state::backup::BackupEntry {
        id: id.into(),
        node: 3,
        taken_at_ms: 1_000,
        applied_index: 7,
        applied_term: 1,
        files: 5,
        bytes: 4096,
        took_ms: 12,
    }
}

#[test]
fn the_backup_catalog_records_each_backup_once_and_refuses_changes_to_unknown_ones() {
    use crate::state::backup::{BackupChange, BackupEntry, DrillResult, ShippedCopy};
    let (_d, db) = db();
    let copy = ShippedCopy {
        target: "file:///offsite".into(),
        at_ms: 2_000,
        objects: 5,
        bytes: 4096,
        took_ms: 40,
    };
    let drill = DrillResult {
        node: 3,
        at_ms: 2_500,
        passed: true,
        problem: String::new(),
        took_ms: 90,
    };
    let mut retried = taken("b1");
    retried.took_ms = 99;
    let r = apply(
        &db,
        vec![
            Command::Backups(BackupChange::Taken(taken("b1"))),
            Command::Backups(BackupChange::Taken(retried)),
            Command::Backups(BackupChange::Shipped {
                id: "b1".into(),
                copy: copy.clone(),
            }),
            Command::Backups(BackupChange::Drilled {
                id: "b1".into(),
                drill: drill.clone(),
            }),
            Command::Backups(BackupChange::LocalRemoved {
                id: "b1".into(),
                at_ms: 3_000,
            }),
            Command::Backups(BackupChange::LocalRemoved {
                id: "b1".into(),
                at_ms: 4_000,
            }),
            Command::Backups(BackupChange::Shipped {
                id: "nope".into(),
                copy: copy.clone(),
            }),
            Command::Backups(BackupChange::Taken(taken("b2"))),
            Command::Backups(BackupChange::Taken(BackupEntry {
                node: 9,
                ..taken("b2")
            })),
        ],
    );
    assert_eq!(r[..6], vec![CommandResult::Done; 6][..]);
    assert_eq!(r[6], CommandResult::Refused(Refusal::NoBackup));
    assert_eq!(r[7], CommandResult::Done);
    assert_eq!(
        r[8],
        CommandResult::Refused(Refusal::BackupIdTaken),
        "another node's backup under a held id"
    );
    let all = reader(&db).backups().unwrap();
    assert_eq!(
        all.iter().map(|b| b.entry.id.as_str()).collect::<Vec<_>>(),
        ["b1", "b2"]
    );
    let b1 = &all[0];
    assert_eq!(b1.entry, taken("b1"), "a retried Taken keeps the first record");
    assert_eq!(b1.shipped.as_ref(), Some(&copy));
    assert_eq!(b1.drill.as_ref(), Some(&drill));
    assert_eq!(
        b1.local_removed_at_ms,
        Some(3_000),
        "the first removal's time stays"
    );
    assert!(!b1.is_local() && b1.is_offsite());
    assert!(all[1].is_local() && !all[1].is_offsite());
    assert!(reader(&db).backup("nope").unwrap().is_none());
    assert_eq!(
        reader(&db).newest_backup().unwrap().map(|b| b.entry),
        Some(taken("b2"))
    );
}

mod operations {
    use super::*;
    use crate::state::ops::{
        hex, plan_hash, rehearse, Actor, Approval, OpChange, OpKind, OpRefusal, OpStatus, Operation, Person,
    };

    fn actor(identity: &str, at_ms: i64) -> Actor {
        Actor {
            identity: identity.into(),
            source: "127.0.0.1".into(),
            node: 1,
            at_ms,
        }
    }

    /// A certificate and its key, as an operator's client certificate.
    fn operator(name: &str) -> (Vec<u8>, String) {
        let ca = crate::tls::devcerts::DevCa::new("test ca").unwrap();
        let pems = ca.client(name).unwrap();
        let der = mailvault_proto::approval::certificate_der(pems.cert.as_bytes()).unwrap();
        (der, pems.key)
    }

    fn person(name: &str, cert: &[u8]) -> Person {
        Person {
            identity: name.into(),
            key: mailvault_proto::approval::key_fingerprint(cert).unwrap(),
        }
    }

    fn proposal(db: &Db, id: &str, proposer: &Person) -> Operation {
        let kind = OpKind::Grant {
            identity: "bob".into(),
            role: agent_on(T),
        };
        let plan = rehearse(&reader(db), &kind).unwrap().unwrap();
        let expires_ms = 10_000;
        Operation {
            id: id.into(),
            plan_hash: plan_hash(id, &kind, "T-1", proposer, expires_ms, &plan),
            kind,
            reason: "T-1".into(),
            proposer: proposer.clone(),
            created_ms: 1_000,
            expires_ms,
            plan,
            status: OpStatus::Proposed,
            approval: None,
            backup_id: None,
            steps: vec![],
            ended_ms: None,
            outcome: String::new(),
        }
    }

    fn approve(op: &Operation, who: &str, cert: &[u8], key: &str, at_ms: i64) -> Command {
        let message = mailvault_proto::approval::message(&op.id, &hex(&op.plan_hash));
        let signature = mailvault_proto::approval::sign(key.as_bytes(), cert, &message).unwrap();
        Command::Ops(OpChange::Approve {
            id: op.id.clone(),
            plan_hash: op.plan_hash,
            approval: Approval {
                by: person(who, cert),
                certificate: cert.to_vec(),
                signature,
                at_ms,
            },
            actor: actor(who, at_ms),
        })
    }

    fn refusal(r: &CommandResult) -> OpRefusal {
        match r {
            CommandResult::Refused(Refusal::Operation(r)) => r.clone(),
            other => panic!("not refused: {other:?}"),
        }
    }

    fn op_of(r: &CommandResult) -> Operation {
        match r {
            CommandResult::Operation(op) => (**op).clone(),
            other => panic!("not an operation: {other:?}"),
        }
    }

    #[test]
    fn an_operation_runs_only_after_a_second_persons_valid_approval_and_audits_each_transition() {
        let (_d, db) = db();
        apply(&db, vec![tenant()]);
        let (alice_cert, alice_key) = operator("alice");
        let (bob_cert, bob_key) = operator("bob2");
        let alice = person("alice", &alice_cert);
        let op = proposal(&db, "op-00000001", &alice);
        let r = apply(
            &db,
            vec![Command::Ops(OpChange::Propose {
                op: Box::new(op.clone()),
                actor: actor("alice", 1_000),
            })],
        );
        assert_eq!(op_of(&r[0]).status, OpStatus::Proposed);
        // A step before approval, the proposer's approval, a signature by
        // the proposer's key under another name: refused, nothing changes.
        let step = |at_ms| {
            Command::Ops(OpChange::Step {
                id: "op-00000001".into(),
                index: 0,
                actor: actor("node:1", at_ms),
            })
        };
        let r = apply(
            &db,
            vec![
                step(1_500),
                approve(&op, "alice", &alice_cert, &alice_key, 2_000),
                approve(&op, "carol", &alice_cert, &alice_key, 2_000),
            ],
        );
        assert_eq!(refusal(&r[0]), OpRefusal::Decided("proposed".into()));
        assert_eq!(refusal(&r[1]), OpRefusal::SelfApproval);
        assert_eq!(refusal(&r[2]), OpRefusal::SameKey);
        // A signature that is not over this operation.
        let mut other = op.clone();
        other.id = "op-00000002".into();
        let mut forged = approve(&other, "bob2", &bob_cert, &bob_key, 2_000);
        if let Command::Ops(OpChange::Approve { id, plan_hash, .. }) = &mut forged {
            *id = op.id.clone();
            *plan_hash = op.plan_hash;
        }
        let r = apply(&db, vec![forged]);
        assert!(matches!(refusal(&r[0]), OpRefusal::BadSignature(_)));
        assert!(
            reader(&db).identity_policy("bob").unwrap().is_none(),
            "nothing granted"
        );
        // After the expiry: refused as expired.
        let r = apply(&db, vec![approve(&op, "bob2", &bob_cert, &bob_key, 10_001)]);
        assert_eq!(refusal(&r[0]), OpRefusal::Expired);
        // The second person, in time: approved; the step runs, once.
        let r = apply(
            &db,
            vec![
                approve(&op, "bob2", &bob_cert, &bob_key, 2_000),
                step(2_100),
                step(2_200),
            ],
        );
        assert_eq!(op_of(&r[0]).status, OpStatus::Approved);
        let done = op_of(&r[1]);
        assert_eq!(done.status, OpStatus::Succeeded);
        assert_eq!(done.steps.len(), 1);
        assert!(done.steps[0].ok);
        assert_eq!(refusal(&r[2]), OpRefusal::Decided("succeeded".into()));
        let p = reader(&db).identity_policy("bob").unwrap().unwrap();
        assert!(p.tenant_roles[T].contains(&TenantRole::Agent));
        let stored = reader(&db).operation("op-00000001").unwrap().unwrap();
        assert_eq!(stored, done);
        // Each transition audited, in order, and nothing for the refusals.
        let actions: Vec<String> = reader(&db)
            .audit_records(1, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.event.action)
            .collect();
        assert_eq!(actions, ["op-propose", "op-approve", "op-step"]);
    }

    #[test]
    fn the_fence_refuses_an_approval_after_the_state_changed_and_a_first_step_fails_whole() {
        let (_d, db) = db();
        apply(&db, vec![tenant()]);
        let (alice_cert, _) = operator("alice");
        let (bob_cert, bob_key) = operator("bob2");
        let alice = person("alice", &alice_cert);
        let op = proposal(&db, "op-00000003", &alice);
        apply(
            &db,
            vec![Command::Ops(OpChange::Propose {
                op: Box::new(op.clone()),
                actor: actor("alice", 1_000),
            })],
        );
        // The identity's policy changes: the approval is refused, naming it.
        apply(&db, vec![grant("bob", RoleGrant::Cluster(ClusterRole::Auditor))]);
        let r = apply(&db, vec![approve(&op, "bob2", &bob_cert, &bob_key, 2_000)]);
        assert_eq!(
            refusal(&r[0]),
            OpRefusal::FenceChanged(vec!["policy of identity bob".into()])
        );
        // A proposal whose plan is not the state's: refused.
        let r = apply(
            &db,
            vec![Command::Ops(OpChange::Propose {
                op: Box::new(proposal_with_id(op.clone(), "op-00000004")),
                actor: actor("alice", 1_000),
            })],
        );
        assert!(matches!(refusal(&r[0]), OpRefusal::FenceChanged(_)), "{r:?}");
    }

    /// `op` under another id (its plan, rehearsed earlier, kept).
    fn proposal_with_id(mut op: Operation, id: &str) -> Operation {
        op.id = id.into();
        op.plan_hash = op.computed_plan_hash();
        op
    }
}
