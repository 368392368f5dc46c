//! A group's cluster-wide member set, sized for the common case.
//!
//! Most groups have a handful of members and many have one, so a set starts
//! as a short vector searched linearly (one 40-byte entry per member, no
//! hash table) and becomes a hash map past [`SMALL_MAX`] members, turning
//! back once it shrinks well below that. Sans-IO; owns no names of its own
//! beyond the ids handed to it (which must not point into a read buffer).

use crate::protocol::MemberId;
use std::collections::HashMap;

/// Largest set kept as a vector.
pub const SMALL_MAX: usize = 16;

/// Where a member lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loc {
    /// On this node, on shard `.0`.
    Local(u16),
    /// On peer node `.0` (index into the mesh's peers).
    Remote(u16),
}

/// A set of members with their locations.
#[derive(Debug)]
pub enum MemberSet {
    /// Up to [`SMALL_MAX`] members, unordered.
    Small(Vec<(MemberId, Loc)>),
    /// More.
    Large(HashMap<MemberId, Loc>),
}

impl Default for MemberSet {
    fn default() -> Self {
        MemberSet::Small(Vec::new())
    }
}

impl MemberSet {
    /// Number of members.
    pub fn len(&self) -> usize {
        match self {
            MemberSet::Small(v) => v.len(),
            MemberSet::Large(m) => m.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where `id` lives, if it is a member.
    pub fn get(&self, id: &[u8]) -> Option<Loc> {
        match self {
            MemberSet::Small(v) => v.iter().find(|(m, _)| m.as_bytes() == id).map(|e| e.1),
            MemberSet::Large(m) => m.get(id).copied(),
        }
    }

    /// Adds `id` at `loc`; false (and nothing changes) when already there.
    pub fn insert(&mut self, id: MemberId, loc: Loc) -> bool {
        match self {
            MemberSet::Small(v) => {
                if v.iter().any(|(m, _)| *m == id) {
                    return false;
                }
                if v.len() < SMALL_MAX {
                    if v.capacity() == 0 {
                        v.reserve_exact(1);
                    }
                    v.push((id, loc));
                    return true;
                }
                let mut map: HashMap<MemberId, Loc> = v.drain(..).collect();
                map.insert(id, loc);
                *self = MemberSet::Large(map);
                true
            }
            MemberSet::Large(m) => match m.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                    true
                }
            },
        }
    }

    /// Removes `id`; returns where it lived.
    pub fn remove(&mut self, id: &[u8]) -> Option<Loc> {
        let loc = match self {
            MemberSet::Small(v) => {
                let i = v.iter().position(|(m, _)| m.as_bytes() == id)?;
                let loc = v.swap_remove(i).1;
                if v.is_empty() {
                    *v = Vec::new();
                }
                return Some(loc);
            }
            MemberSet::Large(m) => m.remove(id)?,
        };
        self.maybe_shrink();
        Some(loc)
    }

    /// Keeps the members for which `keep` is true; returns how many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&MemberId, Loc) -> bool) -> usize {
        let before = self.len();
        match self {
            MemberSet::Small(v) => {
                v.retain(|(m, l)| keep(m, *l));
                if v.is_empty() {
                    *v = Vec::new();
                }
            }
            MemberSet::Large(m) => m.retain(|id, l| keep(id, *l)),
        }
        self.maybe_shrink();
        before - self.len()
    }

    /// Every member with its location, in no particular order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&MemberId, Loc)> + '_> {
        match self {
            MemberSet::Small(v) => Box::new(v.iter().map(|(m, l)| (m, *l))),
            MemberSet::Large(m) => Box::new(m.iter().map(|(m, l)| (m, *l))),
        }
    }

    /// A large set that fell to half of [`SMALL_MAX`] becomes small again.
    fn maybe_shrink(&mut self) {
        if let MemberSet::Large(m) = self {
            if m.len() <= SMALL_MAX / 2 {
                let v: Vec<(MemberId, Loc)> = m.drain().collect();
                *self = MemberSet::Small(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: usize) -> MemberId {
        MemberId::from_str_checked(&format!("n/0.{i}")).unwrap()
    }

    #[test]
    fn grows_and_shrinks_across_the_threshold() {
        let mut s = MemberSet::default();
        for i in 0..40 {
            assert!(s.insert(id(i), Loc::Local(0)));
            assert!(!s.insert(id(i), Loc::Local(1)), "an id is added once");
        }
        assert!(matches!(s, MemberSet::Large(_)));
        assert_eq!(s.len(), 40);
        assert_eq!(s.get(id(7).as_bytes()), Some(Loc::Local(0)));
        for i in 0..35 {
            assert_eq!(s.remove(id(i).as_bytes()), Some(Loc::Local(0)));
        }
        assert!(matches!(s, MemberSet::Small(_)));
        assert_eq!(s.len(), 5);
        assert_eq!(s.remove(id(0).as_bytes()), None);
        assert_eq!(s.retain(|m, _| m == &id(39)), 4);
        assert_eq!(s.iter().count(), 1);
    }
}
