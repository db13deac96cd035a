//! Who takes the backups, and when: a pure function of what every node knows
//! (the membership, the leader, the newest backup in the replicated catalog),
//! so that every node names the same holder.
//!
//! The member of role `backup` (the lowest id if there are several) holds the
//! duty and takes a backup one interval after the newest one. When the
//! newest backup is two intervals old (the backup node is down, cut off, or
//! failing), the leader stands in: it takes one, and then one per interval,
//! until the backup node records one again — which it does as soon as it is
//! back, since the newest backup is then not its own. Without a backup member
//! the leader holds the duty.

use crate::state::NodeId;

/// What a node knows when it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DutyView {
    /// This node.
    pub me: NodeId,
    /// The current leader, if known.
    pub leader: Option<NodeId>,
    /// The member of role `backup`, if any.
    pub backup_node: Option<NodeId>,
    /// The newest backup in the catalog: who took it, and when (ms).
    pub newest: Option<(NodeId, i64)>,
    /// When this node's schedule started (ms): the reference before any
    /// backup exists.
    pub since_ms: i64,
    /// The interval (ms).
    pub interval_ms: i64,
    /// Now (ms).
    pub now_ms: i64,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duty {
    /// The node holding the duty (none while no leader is known and no backup
    /// member exists).
    pub holder: Option<NodeId>,
    /// Whether the holder is the leader standing in for the backup node.
    pub standing_in: bool,
    /// When this node takes its next backup; `None`: not its duty.
    pub next_due_ms: Option<i64>,
}

/// Decides the duty (see the module's documentation).
pub fn decide(v: &DutyView) -> Duty {
    let reference = v.newest.map_or(v.since_ms, |(_, at)| at);
    let newest_by = v.newest.map(|(node, _)| node);
    let Some(backup_node) = v.backup_node else {
        let mine = v.leader == Some(v.me);
        return Duty {
            holder: v.leader,
            standing_in: false,
            next_due_ms: mine.then_some(reference + v.interval_ms),
        };
    };
    if v.me == backup_node {
        // Back after a stand-in took one: take the duty back at once.
        let due = match newest_by {
            Some(n) if n != v.me => v.now_ms,
            _ => reference + v.interval_ms,
        };
        // It still tries when its own backups lapsed, but names the leader,
        // which stands in, as every other node does.
        let lapsed = v.now_ms >= reference + 2 * v.interval_ms;
        let standing_in =
            v.leader.is_some_and(|l| l != v.me) && (lapsed || newest_by.is_some_and(|n| n != v.me));
        return Duty {
            holder: if standing_in { v.leader } else { Some(v.me) },
            standing_in,
            next_due_ms: Some(due),
        };
    }
    let lapsed = v.now_ms >= reference + 2 * v.interval_ms;
    let stood_in = newest_by.is_some_and(|n| n != backup_node);
    let standing_in = v.leader.is_some_and(|l| l != backup_node) && (stood_in || lapsed);
    let due = if v.leader != Some(v.me) {
        None
    } else if stood_in {
        Some(reference + v.interval_ms)
    } else {
        Some(reference + 2 * v.interval_ms)
    };
    Duty {
        holder: if standing_in { v.leader } else { Some(backup_node) },
        standing_in,
        next_due_ms: due,
    }
}

/// When the next ship is due after the last verified one (ms): `interval_ms`
/// after it when positive, else the first `ship_at_min` (minutes after
/// midnight, UTC) after it; at once when nothing was shipped yet.
pub fn next_ship_ms(last_shipped_ms: Option<i64>, ship_at_min: u32, interval_ms: i64) -> i64 {
    const DAY: i64 = 86_400_000;
    let Some(last) = last_shipped_ms else {
        return i64::MIN;
    };
    if interval_ms > 0 {
        return last + interval_ms;
    }
    let at = last - last.rem_euclid(DAY) + ship_at_min as i64 * 60_000;
    if at > last {
        at
    } else {
        at + DAY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn view(me: NodeId, newest: Option<(NodeId, i64)>, now: i64) -> DutyView {
        DutyView {
            me,
            leader: Some(1),
            backup_node: Some(3),
            newest,
            since_ms: 0,
            interval_ms: H,
            now_ms: now,
        }
    }

    #[test]
    fn the_backup_node_takes_one_per_interval_and_the_others_none() {
        let d = decide(&view(3, Some((3, 10 * H)), 10 * H + 5));
        assert_eq!(d.holder, Some(3));
        assert!(!d.standing_in);
        assert_eq!(d.next_due_ms, Some(11 * H));
        // The leader would stand in only after two intervals; a follower never.
        assert_eq!(
            decide(&view(1, Some((3, 10 * H)), 10 * H)).next_due_ms,
            Some(12 * H)
        );
        assert_eq!(decide(&view(2, Some((3, 10 * H)), 10 * H)).next_due_ms, None);
        // Before any backup: one interval after the schedule started.
        assert_eq!(decide(&view(3, None, 0)).next_due_ms, Some(H));
    }

    #[test]
    fn the_leader_stands_in_after_two_intervals_and_every_node_names_it() {
        let now = 12 * H + 1;
        for me in [1, 2, 3] {
            let d = decide(&view(me, Some((3, 10 * H)), now));
            assert_eq!(d.holder, Some(1), "node {me}");
            assert!(d.standing_in, "node {me}");
        }
        // Once the leader took one it keeps the interval...
        let d = decide(&view(1, Some((1, now)), now + 5));
        assert_eq!(
            (d.holder, d.standing_in, d.next_due_ms),
            (Some(1), true, Some(now + H))
        );
        // ...and a new leader continues it.
        let mut v = view(2, Some((1, now)), now + 5);
        v.leader = Some(2);
        assert_eq!(decide(&v).next_due_ms, Some(now + H));
    }

    #[test]
    fn the_backup_node_takes_the_duty_back_at_once_when_it_returns() {
        let now = 14 * H;
        let back = decide(&view(3, Some((1, 13 * H)), now));
        assert_eq!(back.next_due_ms, Some(now), "due at once");
        // After it recorded one, it holds the duty again everywhere.
        for me in [1, 2, 3] {
            let d = decide(&view(me, Some((3, now)), now + 1));
            assert_eq!((d.holder, d.standing_in), (Some(3), false), "node {me}");
        }
        assert_eq!(
            decide(&view(1, Some((3, now)), now + 1)).next_due_ms,
            Some(now + 2 * H)
        );
    }

    #[test]
    fn without_a_backup_member_the_leader_holds_the_duty() {
        let mut v = view(1, Some((1, 5 * H)), 5 * H);
        v.backup_node = None;
        assert_eq!(
            decide(&v),
            Duty {
                holder: Some(1),
                standing_in: false,
                next_due_ms: Some(6 * H)
            }
        );
        v.me = 2;
        assert_eq!(decide(&v).next_due_ms, None);
    }

    #[test]
    fn ships_are_due_daily_at_ship_at_or_every_interval() {
        const DAY: i64 = 86_400_000;
        let two = 2 * 60;
        // Shipped at 02:00:05 on day 10: next at 02:00 on day 11.
        let last = 10 * DAY + 2 * H + 5_000;
        assert_eq!(next_ship_ms(Some(last), two, 0), 11 * DAY + 2 * H);
        // Shipped at 01:00 (by hand): still 02:00 the same day.
        assert_eq!(next_ship_ms(Some(10 * DAY + H), two, 0), 10 * DAY + 2 * H);
        assert_eq!(next_ship_ms(Some(last), two, 30_000), last + 30_000);
        assert_eq!(
            next_ship_ms(None, two, 0),
            i64::MIN,
            "nothing shipped yet: at once"
        );
    }

    #[test]
    fn a_backup_node_that_leads_holds_its_own_duty() {
        let mut v = view(3, Some((3, 5 * H)), 8 * H);
        v.leader = Some(3);
        let d = decide(&v);
        assert_eq!(
            (d.holder, d.standing_in, d.next_due_ms),
            (Some(3), false, Some(6 * H))
        );
    }
}
