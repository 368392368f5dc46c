//! Who gets a publish: the shared group table.
//!
//! The table holds one [`GroupEntry`] per group with members anywhere: two
//! bit masks read on every publish without a lock (which shards have local
//! members, which peer nodes have members) and, behind a per-group mutex
//! touched only by joins, leaves and queries, the group's cluster-wide
//! member set. The member *connections* live shard-local (see
//! `server::shard`); this module owns no sockets and no clocks.
//!
//! # Memory
//! A group's name is stored once, in its entry, as an exact-size copy: the
//! table's key, every connection's set of joined groups and every shard's
//! member lists hold a [`Group`] (one pointer to the entry), never a slice
//! of the read buffer the name arrived in. Member ids handed to the table
//! must be owned copies too (see [`MemberId::compact`]). A group with one
//! member costs a few hundred bytes in all (measured in `tests/it/memory.rs`).

pub mod mask;
pub mod members;

pub use mask::NodeMask;
pub use members::{Loc, MemberSet};

use crate::protocol::{GroupName, MemberId};
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// How group names are hashed in every map keyed by them: foldhash,
/// seeded at random per map (flooding-resistant, not SipHash's cost).
pub type NameHasher = foldhash::fast::RandomState;

/// Most shards a server runs (one bit each in a group's shard mask).
pub const MAX_SHARDS: usize = 64;

/// Attempts of one membership change racing others on the same group.
const UPDATE_RETRIES: usize = 10_000;

/// One group's routing facts and members.
#[derive(Debug)]
pub struct GroupEntry {
    /// The name, an exact-size copy owned by the entry.
    name: Box<[u8]>,
    /// Bit `i` set: shard `i` has at least one local member. Each shard
    /// sets and clears only its own bit.
    shards: AtomicU64,
    /// Bit `j` set: peer node `j` has at least one member.
    nodes: NodeMask,
    /// Bit `i` set: shard `i` has a local member that asked for sequenced
    /// deliveries (`DELIVER_SEQ`). Each shard sets and clears its own bit.
    seq_shards: AtomicU64,
    /// Bit `j` set: peer node `j` had members here when its link went
    /// down, and has not sent a new view since. A publish then counts a
    /// drop for it (or, once its link is up again, is forwarded to it).
    /// An entry with ghosts stays in the table without members.
    ghosts: NodeMask,
    /// The member set; `dead` once removed from the table.
    state: Mutex<GroupState>,
}

/// A group's cluster-wide membership, guarded by its entry's mutex.
#[derive(Debug, Default)]
pub struct GroupState {
    /// Set when the entry has been removed from the table: a joiner that
    /// finds a dead entry must look it up again.
    dead: bool,
    /// Every member, local and remote, with where it lives.
    members: MemberSet,
    /// Members per peer node (index, count); no zero counts.
    per_peer: Vec<(u16, u32)>,
}

impl GroupState {
    /// Cluster-wide member count.
    pub fn size(&self) -> u32 {
        u32::try_from(self.members.len()).unwrap_or(u32::MAX)
    }

    /// Every member, local and remote, unordered (a reference count each:
    /// cheap to take under the group's lock; sort after letting go).
    pub fn member_ids(&self) -> Vec<MemberId> {
        self.members.iter().map(|(m, _)| m.clone()).collect()
    }

    /// Local members only, unordered.
    pub fn local_members(&self) -> impl Iterator<Item = &MemberId> {
        self.members
            .iter()
            .filter(|(_, l)| matches!(l, Loc::Local(_)))
            .map(|(m, _)| m)
    }

    fn peer_count(&mut self, peer: u16, delta: i64) -> u32 {
        let i = match self.per_peer.iter().position(|(p, _)| *p == peer) {
            Some(i) => i,
            None => {
                self.per_peer.push((peer, 0));
                self.per_peer.len() - 1
            }
        };
        let n = (i64::from(self.per_peer[i].1) + delta).max(0) as u32;
        if n == 0 {
            self.per_peer.swap_remove(i);
            if self.per_peer.is_empty() {
                self.per_peer = Vec::new();
            }
        } else {
            self.per_peer[i].1 = n;
        }
        n
    }
}

impl GroupEntry {
    fn new(name: &[u8]) -> Self {
        Self {
            name: name.into(),
            shards: AtomicU64::new(0),
            nodes: NodeMask::default(),
            seq_shards: AtomicU64::new(0),
            ghosts: NodeMask::default(),
            state: Mutex::new(GroupState::default()),
        }
    }

    /// The group's name.
    #[inline]
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The group's name as a [`GroupName`] (a fresh copy, for encoding).
    pub fn group_name(&self) -> GroupName {
        GroupName::from_validated(bytes::Bytes::copy_from_slice(&self.name))
    }

    /// Shards with local members (a bit mask).
    #[inline]
    pub fn shard_mask(&self) -> u64 {
        self.shards.load(Ordering::Acquire)
    }

    /// Peer nodes with members.
    #[inline]
    pub fn node_mask(&self) -> &NodeMask {
        &self.nodes
    }

    /// Shards with a local member that wants sequenced deliveries.
    #[inline]
    pub fn seq_mask(&self) -> u64 {
        self.seq_shards.load(Ordering::Acquire)
    }

    /// Sets or clears `shard`'s bit in [`GroupEntry::seq_mask`] (only
    /// that shard does).
    pub fn set_seq_shard(&self, shard: usize, on: bool) {
        if on {
            self.seq_shards.fetch_or(1 << shard, Ordering::AcqRel);
        } else {
            self.seq_shards.fetch_and(!(1 << shard), Ordering::AcqRel);
        }
    }

    /// Peer nodes that had members here when their link went down.
    #[inline]
    pub fn ghost_mask(&self) -> &NodeMask {
        &self.ghosts
    }

    /// Locks the member set (joins, leaves and queries only).
    pub fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A panic while holding the lock cannot leave the state half-updated
        // in a way that matters more than losing the group; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An interned group: a shared handle to its table entry. Hashes, compares
/// and borrows as its name's bytes, so maps keyed by it are looked up with
/// the name alone, and a map entry costs one pointer.
#[derive(Debug, Clone)]
pub struct Group(Arc<GroupEntry>);

impl Group {
    /// True when both handles are the same entry (not just the same name).
    pub fn same(&self, other: &Group) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Group {
    type Target = GroupEntry;
    fn deref(&self) -> &GroupEntry {
        &self.0
    }
}

impl Hash for Group {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash exactly as `[u8]` does, for `Borrow<[u8]>`.
        self.0.name.hash(state);
    }
}

impl PartialEq for Group {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Group {}

impl Borrow<[u8]> for Group {
    fn borrow(&self) -> &[u8] {
        &self.0.name
    }
}

/// The outcome of a membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// False when nothing changed (joined twice, left a group not joined).
    pub changed: bool,
    /// Cluster-wide size after the change.
    pub size: u32,
    /// Shards with local members after the change (to send events to).
    pub shards: u64,
    /// The change's number: drawn from one counter for the whole table,
    /// under the group's lock, so a group's changes are numbered in the
    /// order the table made them and no number is ever used twice (not
    /// even by a group that emptied and came back); 0 when nothing
    /// changed. A member is told of the changes numbered after its own
    /// join, however late their events reach it.
    pub seq: u64,
}

const UNCHANGED: Change = Change {
    changed: false,
    size: 0,
    shards: 0,
    seq: 0,
};

/// The shared group table: lock-free reads, per-group locking for changes.
#[derive(Debug)]
pub struct GroupTable {
    /// Keyed by the group's name with a randomly seeded foldhash: clients
    /// choose the names, so the hash must resist flooding, at a fraction
    /// of SipHash's cost (benches/router.rs).
    map: papaya::HashMap<Group, (), NameHasher>,
    /// Numbers every change (see [`Change::seq`]).
    changes: AtomicU64,
}

impl Default for GroupTable {
    fn default() -> Self {
        Self::new()
    }
}

impl GroupTable {
    /// An empty table.
    ///
    /// Resizes are blocking (done by the writer that triggers them): with
    /// papaya's default incremental mode a burst of joins leaves a resize
    /// half done and every publish then searches two tables until more
    /// writes come (measured: 344 ns against 23 ns a lookup; benches/router.rs).
    pub fn new() -> Self {
        Self {
            map: papaya::HashMap::builder()
                .hasher(NameHasher::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            changes: AtomicU64::new(0),
        }
    }

    /// The entry of group `name`, if it has members anywhere. Lock-free.
    #[inline]
    pub fn get(&self, name: &[u8]) -> Option<Group> {
        self.map.pin().get_key_value(name).map(|(k, _)| k.clone())
    }

    /// Calls `f` with the entry of group `name` without cloning the handle
    /// (the publish path). Lock-free.
    #[inline]
    pub fn with<R>(&self, name: &[u8], f: impl FnOnce(Option<&GroupEntry>) -> R) -> R {
        let pinned = self.map.pin();
        f(pinned.get_key_value(name).map(|(k, _)| &*k.0))
    }

    /// Marks this thread as reading the table until the guard is dropped:
    /// lookups made meanwhile (each pins the table again) cost a counter
    /// increment instead of two atomic operations. Held for a turn of
    /// routing, not across an `.await` (it holds back the reclamation of
    /// entries removed meanwhile).
    pub fn hold(&self) -> papaya::LocalGuard<'_> {
        self.map.guard()
    }

    /// As [`GroupTable::with`], with the group's handle (clone it to keep
    /// the group).
    pub fn with_group<R>(&self, name: &[u8], f: impl FnOnce(Option<&Group>) -> R) -> R {
        let pinned = self.map.pin();
        f(pinned.get_key_value(name).map(|(k, _)| k))
    }

    /// A fresh number among the table's changes, for an event that changes
    /// nothing (a node-down told to a group the lost node published to):
    /// every member that joined before it is told.
    pub fn next_change(&self) -> u64 {
        self.changes.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Number of groups with at least one member.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no group has members.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every group with members, sorted by name.
    pub fn groups(&self) -> Vec<Group> {
        let mut all: Vec<Group> = self.map.pin().keys().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// The live entry of `name`, created when `create` and absent.
    fn entry(&self, name: &[u8], create: bool) -> Option<Group> {
        let map = self.map.pin();
        if let Some((k, _)) = map.get_key_value(name) {
            return Some(k.clone());
        }
        if !create {
            return None;
        }
        let fresh = Group(Arc::new(GroupEntry::new(name)));
        match map.try_insert(fresh.clone(), ()) {
            Ok(_) => Some(fresh),
            // Created meanwhile by another shard: use that one (or, if it
            // went again already, let the caller retry).
            Err(_) => map.get_key_value(name).map(|(k, _)| k.clone()),
        }
    }

    /// Removes `group`'s entry (and only that entry) from the map.
    fn remove(&self, group: &Group) {
        let _ = self.map.pin().remove_if(group.name(), |k, _| k.same(group));
    }

    /// Runs `f` on the live, locked state of group `name`, creating the
    /// entry if asked, then removes the entry if `f` left it empty.
    fn update<R>(
        &self,
        name: &[u8],
        create: bool,
        f: impl Fn(&GroupEntry, &mut GroupState) -> R,
    ) -> Option<(Group, R)> {
        // A dead entry is removed by whoever finds it, and a creation that
        // loses a race to another shard's finds that one: each retry means
        // another thread got through, so the bound is only a safeguard.
        for _ in 0..UPDATE_RETRIES {
            let Some(group) = self.entry(name, create) else {
                if create {
                    continue;
                }
                return None;
            };
            let out = self.update_entry(&group, &f);
            if let Some(out) = out {
                return Some((group, out));
            }
            self.remove(&group);
        }
        tracing::error!(group = %String::from_utf8_lossy(name), "group table: membership change gave up after {UPDATE_RETRIES} races");
        None
    }

    /// Runs `f` on `group`'s locked state unless it is dead (None then).
    fn update_entry<R>(
        &self,
        group: &Group,
        f: impl FnOnce(&GroupEntry, &mut GroupState) -> R,
    ) -> Option<R> {
        let mut state = group.lock();
        if state.dead {
            return None;
        }
        let out = f(group, &mut state);
        if state.members.is_empty() && !group.ghosts.any() {
            state.dead = true;
            drop(state);
            self.remove(group);
        }
        Some(out)
    }

    /// Adds local `member` (an owned id) on `shard` to group `name`.
    /// Returns the group's handle (for the caller's own lists) and the change.
    pub fn join_local(
        &self,
        name: &[u8],
        member: &MemberId,
        shard: usize,
    ) -> Option<(Group, Change)> {
        self.update(name, true, |entry, st| {
            let changed = st.members.insert(member.clone(), Loc::Local(shard as u16));
            if changed {
                entry.shards.fetch_or(1 << shard, Ordering::AcqRel);
            }
            self.change(entry, st, changed)
        })
    }

    /// Removes local `member` from `group`; `last_on` names the member's
    /// shard when it was that shard's last member of the group (its bit in
    /// the shard mask is then cleared).
    pub fn leave_local(&self, group: &Group, member: &MemberId, last_on: Option<usize>) -> Change {
        self.update_entry(group, |entry, st| {
            let changed = st.members.remove(member.as_bytes()).is_some();
            if let Some(shard) = last_on {
                entry.shards.fetch_and(!(1 << shard), Ordering::AcqRel);
            }
            self.change(entry, st, changed)
        })
        .unwrap_or(UNCHANGED)
    }

    /// Adds `member` (an owned id) living on peer node `peer` to group `name`.
    pub fn join_remote(&self, name: &[u8], member: &MemberId, peer: usize) -> Change {
        self.update(name, true, |entry, st| {
            let changed = st.members.insert(member.clone(), Loc::Remote(peer as u16));
            if changed {
                st.peer_count(peer as u16, 1);
                entry.nodes.set(peer);
            }
            self.change(entry, st, changed)
        })
        .map_or(UNCHANGED, |(_, c)| c)
    }

    /// Removes `member` of peer node `peer` from group `name` (a member
    /// that does not live there is left alone).
    pub fn leave_remote(&self, name: &[u8], member: &[u8], peer: usize) -> Change {
        self.update(name, false, |entry, st| {
            let here = st.members.get(member) == Some(Loc::Remote(peer as u16));
            if here {
                st.members.remove(member);
                if st.peer_count(peer as u16, -1) == 0 {
                    entry.nodes.clear(peer);
                }
            }
            self.change(entry, st, here)
        })
        .map_or(UNCHANGED, |(_, c)| c)
    }

    /// Removes every member of peer node `peer` from `group` (node lost).
    /// Returns the change and how many members went. With `ghost`, the
    /// group remembers that the node had members (see
    /// [`GroupEntry::ghost_mask`]) until [`GroupTable::clear_ghost`].
    pub fn drop_remote(&self, group: &Group, peer: usize, ghost: bool) -> (Change, usize) {
        self.update_entry(group, |entry, st| {
            let at = Loc::Remote(peer as u16);
            let gone = st.members.retain(|_, l| l != at);
            st.per_peer.retain(|(p, _)| usize::from(*p) != peer);
            entry.nodes.clear(peer);
            if ghost && gone > 0 {
                entry.ghosts.set(peer);
            }
            (self.change(entry, st, gone > 0), gone)
        })
        .unwrap_or((UNCHANGED, 0))
    }

    /// Forgets that peer node `peer` had members in `group` (its new view
    /// arrived, or it was removed from `peers`); the group goes when
    /// nothing else keeps it.
    pub fn clear_ghost(&self, group: &Group, peer: usize) {
        let _ = self.update_entry(group, |entry, _| entry.ghosts.clear(peer));
    }

    /// Groups in which peer `peer` has members.
    pub fn remote_groups(&self, peer: usize) -> Vec<Group> {
        let pinned = self.map.pin();
        pinned
            .keys()
            .filter(|g| g.nodes.get(peer))
            .cloned()
            .collect()
    }

    /// Every local (group, member) pair, for a membership snapshot.
    pub fn local_snapshot(&self) -> Vec<(GroupName, MemberId)> {
        let pinned = self.map.pin();
        let mut out = Vec::new();
        for group in pinned.keys() {
            if group.shard_mask() != 0 {
                let name = group.group_name();
                let st = group.lock();
                out.extend(st.local_members().map(|m| (name.clone(), m.clone())));
            }
        }
        out
    }

    /// The cluster-wide members of group `name`, sorted; empty when unknown.
    pub fn members(&self, name: &[u8]) -> Vec<MemberId> {
        self.get(name)
            .map(|g| {
                let mut all = g.lock().member_ids();
                all.sort();
                all
            })
            .unwrap_or_default()
    }
}

impl GroupTable {
    /// The outcome of a change to `entry` (its lock held): numbered if
    /// anything changed.
    fn change(&self, entry: &GroupEntry, st: &GroupState, changed: bool) -> Change {
        Change {
            changed,
            size: st.size(),
            shards: entry.shard_mask(),
            seq: if changed {
                self.changes.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                0
            },
        }
    }
}

/// Iterates the set bits of a shard mask, lowest first.
pub fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MemberId {
        MemberId::from_str_checked(s).unwrap()
    }

    #[test]
    fn join_leave_masks_and_sizes() {
        let t = GroupTable::new();
        let (a, c) = t.join_local(b"a", &m("n/0.1"), 0).unwrap();
        assert_eq!(
            c,
            Change {
                changed: true,
                size: 1,
                shards: 1,
                seq: 1,
            }
        );
        assert!(!t.join_local(b"a", &m("n/0.1"), 0).unwrap().1.changed);
        let (_, c) = t.join_local(b"a", &m("n/1.1"), 1).unwrap();
        assert_eq!((c.size, c.shards), (2, 0b11));
        t.join_remote(b"a", &m("p/0.9"), 3);
        assert!(t.get(b"a").unwrap().node_mask().get(3));
        assert_eq!(t.members(b"a"), vec![m("n/0.1"), m("n/1.1"), m("p/0.9")]);
        assert!(
            !t.leave_remote(b"a", b"n/0.1", 3).changed,
            "not that peer's"
        );
        let c = t.leave_local(&a, &m("n/0.1"), Some(0));
        assert_eq!((c.changed, c.size, c.shards), (true, 2, 0b10));
        assert_eq!(t.drop_remote(&a, 3, false).1, 1);
        assert!(!t.get(b"a").unwrap().node_mask().any());
        t.leave_local(&a, &m("n/1.1"), Some(1));
        assert!(t.get(b"a").is_none(), "an empty group leaves the table");
        assert!(!t.leave_local(&a, &m("n/1.1"), None).changed);
        let (again, c) = t.join_local(b"a", &m("n/0.2"), 0).unwrap();
        assert!(
            !again.same(&a),
            "a group that emptied comes back as a new entry"
        );
        assert!(
            c.seq > 6,
            "change numbers are never used twice, not even by a new entry: {}",
            c.seq
        );
    }

    #[test]
    fn remote_members_counted_per_peer() {
        let t = GroupTable::new();
        t.join_remote(b"g", &m("p/0.1"), 2);
        t.join_remote(b"g", &m("p/0.2"), 2);
        t.join_remote(b"g", &m("q/0.1"), 5);
        let g = t.get(b"g").unwrap();
        assert!(t.leave_remote(b"g", b"p/0.1", 2).changed);
        assert!(g.node_mask().get(2), "p still has a member");
        assert!(t.leave_remote(b"g", b"p/0.2", 2).changed);
        assert!(!g.node_mask().get(2));
        assert_eq!(t.remote_groups(5).len(), 1);
        assert_eq!(t.drop_remote(&g, 5, false).1, 1);
        assert!(t.get(b"g").is_none());
    }

    #[test]
    fn bits_iterates_set_bits() {
        assert_eq!(bits(0b1010_0001).collect::<Vec<_>>(), vec![0, 5, 7]);
        assert_eq!(bits(0).count(), 0);
    }

    #[test]
    fn concurrent_join_leave_keeps_counts() {
        let t = Arc::new(GroupTable::new());
        let threads: Vec<_> = (0..4)
            .map(|s| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let id = m(&format!("n/{s}.{i}"));
                        let (g, _) = t.join_local(b"x", &id, s).unwrap();
                        t.leave_local(&g, &id, Some(s));
                    }
                    t.join_local(b"x", &m(&format!("n/{s}.last")), s).unwrap();
                })
            })
            .collect();
        threads.into_iter().for_each(|h| h.join().unwrap());
        let e = t.get(b"x").unwrap();
        assert_eq!(e.lock().size(), 4);
        assert_eq!(e.shard_mask(), 0b1111);
    }
}
