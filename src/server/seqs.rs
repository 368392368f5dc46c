//! Publish sequence numbers: each client numbers its publishes to each
//! group 1, 2, 3… (`DELIVER_SEQ`, `FORWARD_SEQ`), so a receiver can tell
//! from the numbers alone that it missed some (PROTOCOL.md section 14).
//!
//! The counters live with the publishing connection, keyed by the group
//! table's entry (its address: no hashing of the name, no reference count
//! touched on the hot path). An entry holds its group alive, so an address
//! is never reused while it is a key. A connection that publishes to more
//! than [`MAX_GROUPS`] groups starts over: its counters are forgotten and
//! every group's numbering restarts at 1, which a receiver reads as a new
//! run (not a gap). Memory is then at most [`MAX_GROUPS`] × 32 bytes per
//! publisher.

use crate::router::{Group, GroupEntry};
use std::cell::RefCell;
use std::collections::HashMap;

/// Groups a connection numbers publishes for before it starts over.
pub const MAX_GROUPS: usize = 16_384;

/// One connection's publish counters.
#[derive(Default)]
pub struct PubSeqs(RefCell<HashMap<usize, (Group, u64), AddrHash>>);

/// Hashes entry addresses (not chosen by clients: no seed needed).
pub type AddrHash = foldhash::fast::FixedState;

impl PubSeqs {
    /// The next sequence number of a publish to `entry`'s group (1 for
    /// the first). `group` makes the handle to keep when it is new.
    #[inline]
    pub fn next(&self, entry: &GroupEntry, group: impl FnOnce() -> Option<Group>) -> u64 {
        let key = entry as *const GroupEntry as usize;
        let mut map = self.0.borrow_mut();
        if let Some((_, n)) = map.get_mut(&key) {
            *n += 1;
            return *n;
        }
        let Some(g) = group() else { return 1 };
        if map.len() >= MAX_GROUPS {
            *map = HashMap::default();
        }
        map.insert(key, (g, 1));
        1
    }

    /// Forgets the groups that have gone from the table (no members and no
    /// lost node's ghost anywhere): their entries are freed, and a group of
    /// that name created later numbers from 1 again.
    pub fn prune(&self) {
        let mut map = self.0.borrow_mut();
        if map.is_empty() {
            return;
        }
        map.retain(|_, (g, _)| g.shard_mask() != 0 || g.node_mask().any() || g.ghost_mask().any());
        if map.is_empty() {
            *map = HashMap::default();
        }
    }

    /// Groups numbered now.
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    /// True when nothing has been numbered.
    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}
