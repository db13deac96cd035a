//! Checks a recorded history (see [`crate::history`]) against mailvault's
//! promises about appends and reads:
//!
//! * every acknowledged append is present exactly once, with its UID and the
//!   exact bytes written, on every replica after the last heal;
//! * an indeterminate append is present at most once; a refused one is absent;
//! * nothing is present that no client wrote (no phantom, no corrupted bytes);
//! * all replicas hold the same mailbox;
//! * reads are linearizable for a grow-only mailbox: UIDs strictly increase and
//!   are never reused for another message, a read that starts after another
//!   ended sees at least what that one saw, and a read that starts after an
//!   append was acknowledged sees it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::history::{Event, Outcome, Seen};

/// The verdict on a history.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every violation found (empty: the history is correct).
    pub violations: Vec<String>,
    /// Acknowledged appends.
    pub acked: usize,
    /// Indeterminate appends, and how many of them turned out present.
    pub indeterminate: usize,
    /// Indeterminate appends present after healing.
    pub indeterminate_present: usize,
    /// Reads checked.
    pub reads: usize,
    /// Claims, releases, conditional flag updates and reads of shared
    /// messages checked for linearizability.
    pub claims: usize,
    /// Changes delivered by watches.
    pub watched: usize,
}

impl Report {
    /// Whether the history is free of violations.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

struct Written<'a> {
    digest: &'a str,
    outcome: &'a Outcome,
    end_ms: u64,
}

/// Checks a history.
pub fn check(events: &[Event]) -> Report {
    let mut r = Report::default();
    // (mailbox, key) → what was written.
    let mut written: HashMap<(&str, &str), Written> = HashMap::new();
    for e in events {
        if let Event::Append {
            mailbox,
            key,
            digest,
            end_ms,
            outcome,
            ..
        } = e
        {
            if written
                .insert(
                    (mailbox, key),
                    Written {
                        digest,
                        outcome,
                        end_ms: *end_ms,
                    },
                )
                .is_some()
            {
                r.violations
                    .push(format!("history reuses key {key} in {mailbox}"));
            }
            match outcome {
                Outcome::Ok { .. } => r.acked += 1,
                Outcome::Indeterminate => r.indeterminate += 1,
                Outcome::Failed => {}
            }
        }
    }
    check_finals(events, &written, &mut r);
    check_reads(events, &written, &mut r);
    check_claim_history(events, &mut r);
    check_watches(events, &mut r);
    r
}

/// A watch delivers changes in MODSEQ order, each once, and announces only
/// messages that exist (the final state has them) with the UID they keep.
fn check_watches(events: &[Event], r: &mut Report) {
    let mut final_uids: HashMap<&str, BTreeSet<u32>> = HashMap::new();
    for e in events {
        if let Event::Final {
            mailbox, messages, ..
        } = e
        {
            final_uids
                .entry(mailbox)
                .or_default()
                .extend(messages.iter().map(|m| m.uid));
        }
    }
    for e in events {
        let Event::Watch {
            node,
            mailbox,
            start_ms,
            changes,
            ..
        } = e
        else {
            continue;
        };
        r.watched += changes.len();
        let what = format!("watch of {mailbox} on node {node} at {start_ms}ms");
        if let Some(w) = changes.windows(2).find(|w| w[0].modseq >= w[1].modseq) {
            r.violations.push(format!(
                "{what}: MODSEQ {} delivered after {}",
                w[1].modseq, w[0].modseq
            ));
        }
        let appended: Vec<u32> = changes.iter().filter(|c| c.appended).map(|c| c.uid).collect();
        if let Some(w) = appended.windows(2).find(|w| w[0] >= w[1]) {
            r.violations.push(format!(
                "{what}: arrival of uid {} announced after uid {}",
                w[1], w[0]
            ));
        }
        let known = final_uids.get(mailbox.as_str());
        if let Some(uid) = appended.iter().find(|u| known.is_none_or(|k| !k.contains(u))) {
            r.violations
                .push(format!("{what}: announced uid {uid}, which no replica holds"));
        }
    }
}

/// Search steps per message before the shared-message check gives up (a failure).
const CLAIM_SEARCH_STEPS: u64 = 2_000_000;

/// Claims, releases, conditional flag updates and reads of each shared
/// message must be linearizable (see [`crate::linearizable`]).
fn check_claim_history(events: &[Event], r: &mut Report) {
    use crate::history::{SharedOp, SharedOutcome};
    use crate::linearizable::{check_message, MsgOp, OpKind, OpOutcome, Verdict};
    let mut agents: HashMap<&str, u32> = HashMap::new();
    let mut per_message: BTreeMap<(&str, u32), Vec<MsgOp>> = BTreeMap::new();
    for e in events {
        let Event::Shared {
            mailbox,
            uid,
            agent,
            what,
            start_ms,
            end_ms,
            outcome,
            ..
        } = e
        else {
            continue;
        };
        fn id<'a>(agents: &mut HashMap<&'a str, u32>, name: &'a str) -> u32 {
            let next = agents.len() as u32;
            *agents.entry(name).or_insert(next)
        }
        let agent = id(&mut agents, agent);
        let outcome = match outcome {
            SharedOutcome::Ok { modseq, claimed_by } => OpOutcome::Ok {
                modseq: *modseq,
                claimant: claimed_by.as_deref().map(|c| id(&mut agents, c)),
            },
            SharedOutcome::Refused => OpOutcome::Refused,
            SharedOutcome::Indeterminate => OpOutcome::Indeterminate,
        };
        let kind = match what {
            SharedOp::Claim => OpKind::Claim,
            SharedOp::Release => OpKind::Release,
            SharedOp::SetFlagsIfUnchanged { since } => OpKind::SetFlagsIfUnchanged(*since),
            SharedOp::Read => OpKind::Read,
        };
        per_message.entry((mailbox, *uid)).or_default().push(MsgOp {
            agent,
            kind,
            start: *start_ms,
            end: *end_ms,
            outcome,
        });
        r.claims += 1;
    }
    for ((mailbox, uid), ops) in per_message {
        match check_message(&ops, 0, CLAIM_SEARCH_STEPS) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable => r.violations.push(format!(
                "{mailbox} uid {uid}: the {} claims, releases, conditional updates and reads are not linearizable",
                ops.len()
            )),
            Verdict::Timeout(steps) => r.violations.push(format!(
                "{mailbox} uid {uid}: shared-message check gave up after {steps} steps (counts as a failure)"
            )),
        }
    }
}

/// Violations within one listing: order, duplicates, unknown or altered messages.
fn check_listing(
    what: &str,
    mailbox: &str,
    messages: &[Seen],
    written: &HashMap<(&str, &str), Written>,
    v: &mut Vec<String>,
) {
    for w in messages.windows(2) {
        if w[0].uid >= w[1].uid {
            v.push(format!(
                "{what}: UIDs not strictly increasing ({} then {})",
                w[0].uid, w[1].uid
            ));
        }
    }
    let mut keys = BTreeSet::new();
    for m in messages {
        if !keys.insert(&m.key) {
            v.push(format!("{what}: {} present more than once", m.key));
        }
        match written.get(&(mailbox, m.key.as_str())) {
            None => v.push(format!(
                "{what}: uid {} ({}) was never written by a client",
                m.uid, m.key
            )),
            Some(w) => {
                if matches!(w.outcome, Outcome::Failed) {
                    v.push(format!("{what}: {} was refused but is present", m.key));
                }
                if let Outcome::Ok { uid } = w.outcome {
                    if *uid != m.uid {
                        v.push(format!(
                            "{what}: {} acknowledged as uid {uid} but found as uid {}",
                            m.key, m.uid
                        ));
                    }
                }
                if m.digest.as_deref().is_some_and(|d| d != w.digest) {
                    v.push(format!(
                        "{what}: uid {} ({}) does not hold the bytes written",
                        m.uid, m.key
                    ));
                }
            }
        }
    }
}

fn check_finals(events: &[Event], written: &HashMap<(&str, &str), Written>, r: &mut Report) {
    let mut finals: BTreeMap<&str, Vec<(usize, &Vec<Seen>)>> = BTreeMap::new();
    for e in events {
        if let Event::Final {
            node,
            mailbox,
            messages,
        } = e
        {
            finals.entry(mailbox).or_default().push((*node, messages));
            check_listing(
                &format!("node {node} {mailbox}"),
                mailbox,
                messages,
                written,
                &mut r.violations,
            );
        }
    }
    let mailboxes: BTreeSet<&str> = written.keys().map(|(m, _)| *m).collect();
    for mailbox in mailboxes {
        let Some(copies) = finals.get(mailbox) else {
            r.violations
                .push(format!("no final state recorded for {mailbox}"));
            continue;
        };
        let (first_node, first) = copies[0];
        for (node, messages) in &copies[1..] {
            if *messages != first {
                r.violations.push(format!(
                    "{mailbox}: node {node} and node {first_node} hold different messages ({} vs {})",
                    messages.len(),
                    first.len()
                ));
            }
        }
        for (node, messages) in copies {
            let present: HashMap<&str, u32> = messages.iter().map(|m| (m.key.as_str(), m.uid)).collect();
            for ((mb, key), w) in written.iter().filter(|((mb, _), _)| *mb == mailbox) {
                match (w.outcome, present.get(key)) {
                    (Outcome::Ok { .. }, None) => r
                        .violations
                        .push(format!("node {node} {mb}: acknowledged {key} is lost")),
                    (Outcome::Indeterminate, Some(_)) if *node == copies[0].0 => r.indeterminate_present += 1,
                    _ => {}
                }
            }
        }
    }
}

fn check_reads(events: &[Event], written: &HashMap<(&str, &str), Written>, r: &mut Report) {
    struct Read<'a> {
        node: usize,
        start: u64,
        end: u64,
        keys: BTreeSet<&'a str>,
    }
    let mut reads: BTreeMap<&str, Vec<Read>> = BTreeMap::new();
    // uid → key, across every read and final of a mailbox: a UID is never reused.
    let mut uid_owner: HashMap<(&str, u32), &str> = HashMap::new();
    for e in events {
        let (mailbox, messages) = match e {
            Event::Read {
                mailbox, messages, ..
            }
            | Event::Final {
                mailbox, messages, ..
            } => (mailbox, messages),
            _ => continue,
        };
        for m in messages {
            let owner = uid_owner.entry((mailbox, m.uid)).or_insert(&m.key);
            if *owner != m.key {
                r.violations.push(format!(
                    "{mailbox}: uid {} reused ({} and {})",
                    m.uid, owner, m.key
                ));
            }
        }
        if let Event::Read {
            node,
            start_ms,
            end_ms,
            client,
            ..
        } = e
        {
            let what = format!("read by client {client} from node {node} at {start_ms}ms");
            check_listing(&what, mailbox, messages, written, &mut r.violations);
            reads.entry(mailbox).or_default().push(Read {
                node: *node,
                start: *start_ms,
                end: *end_ms,
                keys: messages.iter().map(|m| m.key.as_str()).collect(),
            });
            r.reads += 1;
        }
    }
    for (mailbox, list) in &reads {
        for b in list {
            for a in list.iter().filter(|a| a.end < b.start) {
                if let Some(missing) = a.keys.difference(&b.keys).next() {
                    r.violations.push(format!(
                        "{mailbox}: stale read: node {} at {}ms lacks {missing}, which a read ending at {}ms saw",
                        b.node, b.start, a.end
                    ));
                }
            }
            for ((_, key), w) in written.iter().filter(|((mb, _), _)| mb == mailbox) {
                if matches!(w.outcome, Outcome::Ok { .. }) && w.end_ms < b.start && !b.keys.contains(key) {
                    r.violations.push(format!(
                        "{mailbox}: stale read: node {} at {}ms lacks {key}, acknowledged at {}ms",
                        b.node, b.start, w.end_ms
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(key: &str, outcome: Outcome, start: u64, end: u64) -> Event {
        Event::Append {
            client: 0,
            mailbox: "mb".into(),
            key: key.into(),
            digest: format!("d-{key}"),
            start_ms: start,
            end_ms: end,
            outcome,
        }
    }

    fn seen(uid: u32, key: &str) -> Seen {
        Seen {
            uid,
            key: key.into(),
            digest: Some(format!("d-{key}")),
        }
    }

    fn fin(node: usize, messages: Vec<Seen>) -> Event {
        Event::Final {
            node,
            mailbox: "mb".into(),
            messages,
        }
    }

    fn read(start: u64, end: u64, messages: Vec<Seen>) -> Event {
        Event::Read {
            client: 1,
            node: 0,
            mailbox: "mb".into(),
            start_ms: start,
            end_ms: end,
            messages: messages
                .into_iter()
                .map(|mut m| {
                    m.digest = None;
                    m
                })
                .collect(),
        }
    }

    fn good() -> Vec<Event> {
        vec![
            append("a", Outcome::Ok { uid: 1 }, 0, 10),
            append("b", Outcome::Indeterminate, 5, 30),
            append("c", Outcome::Ok { uid: 3 }, 20, 40),
            read(12, 15, vec![seen(1, "a")]),
            read(45, 50, vec![seen(1, "a"), seen(2, "b"), seen(3, "c")]),
            fin(0, vec![seen(1, "a"), seen(2, "b"), seen(3, "c")]),
            fin(1, vec![seen(1, "a"), seen(2, "b"), seen(3, "c")]),
        ]
    }

    fn violations(events: Vec<Event>) -> Vec<String> {
        check(&events).violations
    }

    #[test]
    fn a_correct_history_passes() {
        let r = check(&good());
        assert!(r.ok(), "{:?}", r.violations);
        assert_eq!(
            (r.acked, r.indeterminate, r.indeterminate_present, r.reads),
            (2, 1, 1, 2)
        );
    }

    #[test]
    fn a_lost_acknowledged_append_is_caught() {
        let mut h = good();
        h[6] = fin(1, vec![seen(1, "a"), seen(2, "b")]);
        let v = violations(h);
        assert!(v.iter().any(|v| v.contains("acknowledged c is lost")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("hold different messages")), "{v:?}");
    }

    #[test]
    fn a_duplicate_a_phantom_and_altered_bytes_are_caught() {
        let mut h = good();
        let mut altered = seen(3, "c");
        altered.digest = Some("other".into());
        h[5] = fin(
            0,
            vec![seen(1, "a"), seen(2, "b"), altered, seen(4, "b"), seen(5, "zzz")],
        );
        h.pop();
        let v = violations(h);
        assert!(v.iter().any(|v| v.contains("b present more than once")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("never written")), "{v:?}");
        assert!(
            v.iter().any(|v| v.contains("does not hold the bytes written")),
            "{v:?}"
        );
    }

    #[test]
    fn a_moved_uid_and_a_reused_uid_are_caught() {
        let mut h = good();
        h[4] = read(45, 50, vec![seen(1, "a"), seen(2, "c")]);
        let v = violations(h);
        assert!(
            v.iter()
                .any(|v| v.contains("acknowledged as uid 3 but found as uid 2")),
            "{v:?}"
        );
        assert!(v.iter().any(|v| v.contains("uid 2 reused")), "{v:?}");
    }

    #[test]
    fn stale_reads_are_caught() {
        // A read after another read ended lacks what the first saw.
        let mut h = good();
        h.push(read(60, 70, vec![seen(1, "a"), seen(3, "c")]));
        let v = violations(h);
        assert!(
            v.iter()
                .any(|v| v.contains("lacks b, which a read ending at 50ms saw")),
            "{v:?}"
        );
        // A read after an acknowledgement lacks the acknowledged message.
        let mut h = good();
        h.push(read(41, 42, vec![seen(1, "a")]));
        let v = violations(h);
        assert!(
            v.iter().any(|v| v.contains("lacks c, acknowledged at 40ms")),
            "{v:?}"
        );
    }

    #[test]
    fn out_of_order_duplicate_and_phantom_watch_changes_are_caught() {
        let change = |modseq, uid| crate::history::Change {
            modseq,
            uid,
            appended: true,
        };
        let watch = |changes| Event::Watch {
            client: 7,
            node: 1,
            mailbox: "mb".into(),
            start_ms: 0,
            end_ms: 50,
            changes,
        };
        let mut h = good();
        h.push(watch(vec![change(1, 1), change(2, 2), change(3, 3)]));
        let r = check(&h);
        assert!(r.ok(), "{:?}", r.violations);
        assert_eq!(r.watched, 3);
        let mut h = good();
        h.push(watch(vec![change(2, 2), change(1, 1)]));
        assert!(violations(h)
            .iter()
            .any(|v| v.contains("MODSEQ 1 delivered after 2")));
        let mut h = good();
        h.push(watch(vec![change(1, 1), change(2, 9)]));
        assert!(violations(h)
            .iter()
            .any(|v| v.contains("uid 9, which no replica holds")));
        let mut h = good();
        h.push(watch(vec![change(1, 2), change(2, 2)]));
        assert!(violations(h)
            .iter()
            .any(|v| v.contains("arrival of uid 2 announced after uid 2")));
    }

    #[test]
    fn a_refused_append_that_is_present_and_a_missing_final_are_caught() {
        let h = vec![append("x", Outcome::Failed, 0, 1), fin(0, vec![seen(1, "x")])];
        assert!(violations(h).iter().any(|v| v.contains("refused but is present")));
        let h = vec![append("x", Outcome::Ok { uid: 1 }, 0, 1)];
        assert!(violations(h).iter().any(|v| v.contains("no final state")));
    }
}
