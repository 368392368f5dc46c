//! Who gets a publish: the shared group table.
//!
//! The table maps a group to a [`GroupEntry`]: two bit masks read on every
//! publish without a lock (which shards have local members, which peer
//! nodes have members) and, behind a per-group mutex touched only by joins,
//! leaves and queries, the group's cluster-wide member list. The member
//! *connections* live shard-local (see `server::shard`); this module owns no
//! sockets and no clocks.

pub mod mask;

pub use mask::NodeMask;

use crate::protocol::{GroupName, MemberId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most shards a server runs (one bit each in a group's shard mask).
pub const MAX_SHARDS: usize = 64;

/// One group's routing facts and members.
#[derive(Debug, Default)]
pub struct GroupEntry {
    /// Bit `i` set: shard `i` has at least one local member.
    shards: AtomicU64,
    /// Bit `j` set: peer node `j` has at least one member.
    nodes: NodeMask,
    /// The member list; `dead` once removed from the table.
    state: Mutex<GroupState>,
}

/// A group's cluster-wide membership, guarded by its entry's mutex.
#[derive(Debug, Default)]
pub struct GroupState {
    /// Set when the entry has been removed from the table: a joiner that
    /// finds a dead entry must look it up again.
    dead: bool,
    /// Local members and the shard each lives on.
    local: BTreeMap<MemberId, usize>,
    /// Count of local members per shard (index < MAX_SHARDS).
    per_shard: HashMap<usize, u32>,
    /// Members on each peer node, by peer index.
    remote: HashMap<usize, BTreeSet<MemberId>>,
}

impl GroupState {
    /// Cluster-wide member count.
    pub fn size(&self) -> u32 {
        let remote: usize = self.remote.values().map(BTreeSet::len).sum();
        u32::try_from(self.local.len() + remote).unwrap_or(u32::MAX)
    }

    /// Every member, local and remote, sorted.
    pub fn members(&self) -> Vec<MemberId> {
        let mut all: Vec<MemberId> = self.local.keys().cloned().collect();
        all.extend(self.remote.values().flatten().cloned());
        all.sort();
        all
    }

    /// Local members only, sorted.
    pub fn local_members(&self) -> impl Iterator<Item = &MemberId> {
        self.local.keys()
    }

    fn is_empty(&self) -> bool {
        self.local.is_empty() && self.remote.is_empty()
    }
}

impl GroupEntry {
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

    /// Locks the member list (joins, leaves and queries only).
    pub fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A panic while holding the lock cannot leave the state half-updated
        // in a way that matters more than losing the group; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
}

/// The shared group table: lock-free reads, per-group locking for changes.
#[derive(Debug)]
pub struct GroupTable {
    map: papaya::HashMap<GroupName, Arc<GroupEntry>>,
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
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
        }
    }

    /// The entry of `group`, if it has members anywhere. Lock-free.
    #[inline]
    pub fn get(&self, group: &GroupName) -> Option<Arc<GroupEntry>> {
        self.map.pin().get(group).cloned()
    }

    /// Calls `f` with the entry of `group` without cloning the `Arc`
    /// (the publish path). Lock-free.
    #[inline]
    pub fn with<R>(&self, group: &GroupName, f: impl FnOnce(Option<&GroupEntry>) -> R) -> R {
        let pinned = self.map.pin();
        f(pinned.get(group).map(|e| &**e))
    }

    /// Number of groups with at least one member.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no group has members.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every group with members, sorted (for snapshots and stats).
    pub fn groups(&self) -> Vec<GroupName> {
        let mut all: Vec<GroupName> = self.map.pin().keys().cloned().collect();
        all.sort();
        all
    }

    /// Runs `f` on the live, locked state of `group`, creating the entry if
    /// needed, then removes the entry if `f` left it empty.
    fn update<R>(
        &self,
        group: &GroupName,
        create: bool,
        f: impl Fn(&GroupEntry, &mut GroupState) -> R,
    ) -> Option<R> {
        // Bounded: a dead entry is only ever seen after it left the map, so a
        // second look-up finds a fresh one (or none).
        for _ in 0..16 {
            let entry = if create {
                self.map
                    .pin()
                    .get_or_insert_with(group.clone(), Default::default)
                    .clone()
            } else {
                self.map.pin().get(group)?.clone()
            };
            let mut state = entry.lock();
            if state.dead {
                continue;
            }
            let out = f(&entry, &mut state);
            if state.is_empty() {
                state.dead = true;
                self.map.pin().remove(group);
            }
            return Some(out);
        }
        None
    }

    /// Adds local `member` on `shard` to `group`.
    pub fn join_local(&self, group: &GroupName, member: &MemberId, shard: usize) -> Change {
        self.update(group, true, |entry, st| {
            let changed = st.local.insert(member.clone(), shard).is_none();
            if changed {
                *st.per_shard.entry(shard).or_insert(0) += 1;
                entry.shards.fetch_or(1 << shard, Ordering::AcqRel);
            }
            change(entry, st, changed)
        })
        .unwrap_or(Change {
            changed: false,
            size: 0,
            shards: 0,
        })
    }

    /// Removes local `member` from `group`.
    pub fn leave_local(&self, group: &GroupName, member: &MemberId) -> Change {
        self.update(group, false, |entry, st| {
            let Some(shard) = st.local.remove(member) else {
                return change(entry, st, false);
            };
            let left = st.per_shard.get_mut(&shard).map(|n| {
                *n -= 1;
                *n
            });
            if left == Some(0) {
                st.per_shard.remove(&shard);
                entry.shards.fetch_and(!(1 << shard), Ordering::AcqRel);
            }
            change(entry, st, true)
        })
        .unwrap_or(Change {
            changed: false,
            size: 0,
            shards: 0,
        })
    }

    /// Adds `member` living on peer node `peer` to `group`.
    pub fn join_remote(&self, group: &GroupName, member: &MemberId, peer: usize) -> Change {
        self.update(group, true, |entry, st| {
            let changed = st.remote.entry(peer).or_default().insert(member.clone());
            entry.nodes.set(peer);
            change(entry, st, changed)
        })
        .unwrap_or(Change {
            changed: false,
            size: 0,
            shards: 0,
        })
    }

    /// Removes `member` of peer node `peer` from `group`.
    pub fn leave_remote(&self, group: &GroupName, member: &MemberId, peer: usize) -> Change {
        self.update(group, false, |entry, st| {
            let set = st.remote.get_mut(&peer);
            let changed = set.is_some_and(|s| s.remove(member));
            if st.remote.get(&peer).is_some_and(BTreeSet::is_empty) {
                st.remote.remove(&peer);
                entry.nodes.clear(peer);
            }
            change(entry, st, changed)
        })
        .unwrap_or(Change {
            changed: false,
            size: 0,
            shards: 0,
        })
    }

    /// Removes every member of peer node `peer` from `group` (node lost).
    /// Returns the change and how many members went.
    pub fn drop_remote(&self, group: &GroupName, peer: usize) -> (Change, usize) {
        self.update(group, false, |entry, st| {
            let gone = st.remote.remove(&peer).map_or(0, |s| s.len());
            entry.nodes.clear(peer);
            (change(entry, st, gone > 0), gone)
        })
        .unwrap_or((
            Change {
                changed: false,
                size: 0,
                shards: 0,
            },
            0,
        ))
    }

    /// Groups in which peer `peer` has members, with those members.
    pub fn remote_groups(&self, peer: usize) -> Vec<(GroupName, Vec<MemberId>)> {
        let pinned = self.map.pin();
        let mut out = Vec::new();
        for (group, entry) in pinned.iter() {
            if entry.nodes.get(peer) {
                let st = entry.lock();
                if let Some(set) = st.remote.get(&peer) {
                    out.push((group.clone(), set.iter().cloned().collect()));
                }
            }
        }
        out
    }

    /// Every local (group, member) pair, for a membership snapshot.
    pub fn local_snapshot(&self) -> Vec<(GroupName, MemberId)> {
        let pinned = self.map.pin();
        let mut out = Vec::new();
        for (group, entry) in pinned.iter() {
            if entry.shard_mask() != 0 {
                let st = entry.lock();
                out.extend(st.local.keys().map(|m| (group.clone(), m.clone())));
            }
        }
        out
    }

    /// The cluster-wide members of `group`, sorted; empty when unknown.
    pub fn members(&self, group: &GroupName) -> Vec<MemberId> {
        self.get(group)
            .map(|e| e.lock().members())
            .unwrap_or_default()
    }
}

fn change(entry: &GroupEntry, st: &GroupState, changed: bool) -> Change {
    Change {
        changed,
        size: st.size(),
        shards: entry.shard_mask(),
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

    fn g(s: &str) -> GroupName {
        GroupName::from_str_checked(s).unwrap()
    }
    fn m(s: &str) -> MemberId {
        MemberId::from_str_checked(s).unwrap()
    }

    #[test]
    fn join_leave_masks_and_sizes() {
        let t = GroupTable::new();
        let c = t.join_local(&g("a"), &m("n/0.1"), 0);
        assert_eq!(
            c,
            Change {
                changed: true,
                size: 1,
                shards: 1
            }
        );
        assert!(!t.join_local(&g("a"), &m("n/0.1"), 0).changed);
        let c = t.join_local(&g("a"), &m("n/1.1"), 1);
        assert_eq!((c.size, c.shards), (2, 0b11));
        t.join_remote(&g("a"), &m("p/0.9"), 3);
        assert!(t.get(&g("a")).unwrap().node_mask().get(3));
        assert_eq!(t.members(&g("a")), vec![m("n/0.1"), m("n/1.1"), m("p/0.9")]);
        let c = t.leave_local(&g("a"), &m("n/0.1"));
        assert_eq!((c.changed, c.size, c.shards), (true, 2, 0b10));
        assert_eq!(t.drop_remote(&g("a"), 3).1, 1);
        assert!(!t.get(&g("a")).unwrap().node_mask().any());
        t.leave_local(&g("a"), &m("n/1.1"));
        assert!(t.get(&g("a")).is_none(), "an empty group leaves the table");
        assert!(!t.leave_local(&g("a"), &m("n/1.1")).changed);
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
                        t.join_local(&g("x"), &id, s);
                        t.leave_local(&g("x"), &id);
                    }
                    t.join_local(&g("x"), &m(&format!("n/{s}.last")), s);
                })
            })
            .collect();
        threads.into_iter().for_each(|h| h.join().unwrap());
        let e = t.get(&g("x")).unwrap();
        assert_eq!(e.lock().size(), 4);
        assert_eq!(e.shard_mask(), 0b1111);
    }
}
