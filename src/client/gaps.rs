//! [`Gaps`]: gap detection on sequenced deliveries (`DELIVER_SEQ`,
//! PROTOCOL.md §8.24). Each sender numbers its publishes to each group 1,
//! 2, 3…; the reader keeps the last number seen per (sender, group) and
//! reports the numbers skipped.
//!
//! - The first number seen from a (sender, group) is the baseline: no gap
//!   (this client may have joined after the sender started).
//! - A number at or below the last one is a new run (the sender's
//!   numbering started over): the baseline moves, no gap.
//! - A number `n` above `last + 1` means `n - last - 1` messages are
//!   missing.
//!
//! One table per connection (behind a lock its reader alone takes, but
//! for a move), so a new connection starts from new baselines; a move to
//! another server (`MOVE`) hands the table on, so that the new
//! connection's copies of what the old one delivered are recognised. Entries are forgotten when this
//! client leaves a group (all of the group's) and when a membership event
//! says a member left or disconnected (that member's in that group; ids are
//! never reused). A node-down forgets nothing: a sender behind a link that
//! was cut and re-formed goes on numbering, so what was lost in between
//! shows as a gap (a restarted node's senders have new ids). The table holds at
//! most [`MAX_SEQ_ENTRIES`]; inserting one more forgets everything first. A
//! forgotten entry only restarts its baseline: forgetting can hide a gap,
//! never invent one.
//!
//! Cost per message: one hash lookup (of the sender and group names as
//! they arrived, copied only when a new entry is made). No I/O.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::protocol::{GroupName, MemberId};

/// Most (sender, group) pairs a connection's gap detection remembers at
/// once: about 200 bytes each (names included), so some 13 MiB when full.
/// Inserting one more forgets them all (each then restarts its baseline:
/// a gap spanning that moment goes unreported).
pub const MAX_SEQ_ENTRIES: usize = 65_536;

/// A (sender, group) pair looked up by reference: the owned key and a
/// borrowed pair hash and compare the same way, so a lookup needs no copy.
trait Pair {
    fn sender(&self) -> &[u8];
    fn group(&self) -> &[u8];
}

/// The owned key (compact copies of the names: see
/// [`GroupName::compact`]).
struct Key {
    sender: MemberId,
    group: GroupName,
}

impl Pair for Key {
    fn sender(&self) -> &[u8] {
        self.sender.as_bytes()
    }
    fn group(&self) -> &[u8] {
        self.group.as_bytes()
    }
}

impl Pair for (&[u8], &[u8]) {
    fn sender(&self) -> &[u8] {
        self.0
    }
    fn group(&self) -> &[u8] {
        self.1
    }
}

impl Hash for dyn Pair + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // `[u8]`'s hash includes the length: ("ab", "c") ≠ ("a", "bc").
        self.sender().hash(state);
        self.group().hash(state);
    }
}

impl PartialEq for dyn Pair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.sender() == other.sender() && self.group() == other.group()
    }
}

impl Eq for dyn Pair + '_ {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn Pair).hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        (self as &dyn Pair) == (other as &dyn Pair)
    }
}

impl Eq for Key {}

impl<'a> Borrow<dyn Pair + 'a> for Key {
    fn borrow(&self) -> &(dyn Pair + 'a) {
        self
    }
}

/// The last sequence number seen per (sender, group) on one connection.
#[derive(Default)]
pub(crate) struct Gaps {
    /// Last number seen, by (sender, group). At most [`MAX_SEQ_ENTRIES`].
    last: HashMap<Key, u64>,
    /// Senders with an entry, by group, so that leaving a group does not
    /// scan every entry. Forgetting one sender does not update it (a stale
    /// name costs nothing but its room); `indexed` bounds it.
    by_group: HashMap<GroupName, Vec<MemberId>>,
    /// Names held in `by_group`; at most twice [`MAX_SEQ_ENTRIES`].
    indexed: usize,
}

impl Gaps {
    /// A delivery numbered `seq` from `sender` to `group`: returns how many
    /// messages are missing before it, if any.
    pub(crate) fn observe(
        &mut self,
        group: &GroupName,
        sender: &MemberId,
        seq: u64,
    ) -> Option<u64> {
        let pair = (sender.as_bytes(), group.as_bytes());
        if let Some(last) = self.last.get_mut(&pair as &dyn Pair) {
            let prev = std::mem::replace(last, seq);
            // seq ≤ prev: a new run. seq == prev + 1: in order.
            return (seq > prev.saturating_add(1)).then(|| seq - prev - 1);
        }
        self.insert(group, sender, seq);
        None
    }

    /// The last number seen from `sender` in `group`, if any.
    pub(crate) fn last(&self, group: &GroupName, sender: &MemberId) -> Option<u64> {
        let pair = (sender.as_bytes(), group.as_bytes());
        self.last.get(&pair as &dyn Pair).copied()
    }

    fn insert(&mut self, group: &GroupName, sender: &MemberId, seq: u64) {
        if self.last.len() >= MAX_SEQ_ENTRIES || self.indexed >= 2 * MAX_SEQ_ENTRIES {
            *self = Gaps::default();
        }
        let (sender, group) = (sender.compact(), group.compact());
        self.by_group
            .entry(group.clone())
            .or_default()
            .push(sender.clone());
        self.indexed += 1;
        self.last.insert(Key { sender, group }, seq);
    }

    /// This client left `group`: forgets every sender's entry for it.
    pub(crate) fn forget_group(&mut self, group: &GroupName) {
        let Some(senders) = self.by_group.remove(group) else {
            return;
        };
        self.indexed -= senders.len();
        for sender in &senders {
            self.last
                .remove(&(sender.as_bytes(), group.as_bytes()) as &dyn Pair);
        }
    }

    /// `member` left `group` (or disconnected): forgets its entry there.
    pub(crate) fn forget_member(&mut self, group: &GroupName, member: &[u8]) {
        self.last.remove(&(member, group.as_bytes()) as &dyn Pair);
    }

    /// Pairs remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(name: &str) -> GroupName {
        GroupName::from_str_checked(name).expect("group")
    }

    fn m(name: &str) -> MemberId {
        MemberId::from_str_checked(name).expect("member")
    }

    #[test]
    fn first_sets_the_baseline_then_skips_are_counted() {
        let mut gaps = Gaps::default();
        let (grp, a) = (g("g"), m("n/0.1"));
        let seen: Vec<Option<u64>> = [3, 4, 7, 8, 8, 1, 2, 10]
            .into_iter()
            .map(|seq| gaps.observe(&grp, &a, seq))
            .collect();
        // 3: baseline; 7: 5 and 6 missing; 8 again and 1: new runs; 10: 3..=9.
        assert_eq!(seen, [None, None, Some(2), None, None, None, None, Some(7)]);
    }

    #[test]
    fn senders_and_groups_are_independent() {
        let mut gaps = Gaps::default();
        let (g1, g2, a, b) = (g("g1"), g("g2"), m("n/0.1"), m("n/0.2"));
        assert_eq!(gaps.observe(&g1, &a, 1), None);
        assert_eq!(gaps.observe(&g1, &b, 5), None);
        assert_eq!(gaps.observe(&g2, &a, 9), None);
        assert_eq!(gaps.observe(&g1, &a, 2), None);
        assert_eq!(gaps.observe(&g1, &b, 7), Some(1));
        assert_eq!(gaps.observe(&g2, &a, 10), None);
        // Names that concatenate alike stay apart.
        assert_eq!(gaps.observe(&g("ab"), &m("x/0"), 1), None);
        assert_eq!(gaps.observe(&g("b"), &m("x/0a"), 5), None);
        assert_eq!(gaps.len(), 5);
    }

    #[test]
    fn forgetting_restarts_baselines() {
        let mut gaps = Gaps::default();
        let (g1, g2) = (g("g1"), g("g2"));
        let (a, b, c) = (m("n1/0.1"), m("n1/0.2"), m("n2/0.1"));
        for (grp, who) in [(&g1, &a), (&g1, &b), (&g1, &c), (&g2, &a)] {
            gaps.observe(grp, who, 1);
        }
        gaps.forget_member(&g1, b.as_bytes());
        assert_eq!(gaps.observe(&g1, &b, 9), None, "b's baseline restarted");
        assert_eq!(gaps.observe(&g1, &a, 9), Some(7), "a's run goes on");
        assert_eq!(gaps.observe(&g1, &c, 3), Some(1), "c's kept");
        assert_eq!(gaps.observe(&g2, &a, 3), Some(1), "other groups kept");
        gaps.forget_group(&g1);
        assert_eq!(gaps.observe(&g1, &c, 9), None);
        assert_eq!(gaps.observe(&g2, &a, 5), Some(1));
        gaps.forget_group(&g("never"));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut gaps = Gaps::default();
        let grp = g("g");
        for i in 0..MAX_SEQ_ENTRIES {
            gaps.observe(&grp, &m(&format!("n/0.{i}")), 1);
        }
        assert_eq!(gaps.len(), MAX_SEQ_ENTRIES);
        gaps.observe(&grp, &m("n/1.0"), 1);
        assert_eq!(gaps.len(), 1, "full: everything forgotten first");
        assert_eq!(gaps.observe(&grp, &m("n/0.0"), 5), None, "a new baseline");
    }

    #[test]
    fn churn_does_not_grow_the_index_without_bound() {
        let mut gaps = Gaps::default();
        let grp = g("g");
        for i in 0..3 * MAX_SEQ_ENTRIES {
            let who = m(&format!("n/0.{i}"));
            gaps.observe(&grp, &who, 1);
            gaps.forget_member(&grp, who.as_bytes());
        }
        assert!(gaps.indexed <= 2 * MAX_SEQ_ENTRIES);
    }
}
