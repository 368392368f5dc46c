//! A fixed-size atomic bit set of peer nodes (up to 256), read on every
//! publish that may leave this node.

use std::sync::atomic::{AtomicU64, Ordering};

/// Most peer nodes a cluster can have (bits in a [`NodeMask`]): the
/// bound `peers` is checked against at load.
pub const MAX_PEERS: usize = crate::config::MAX_PEERS;

/// One bit per peer index; lock-free.
#[derive(Debug, Default)]
pub struct NodeMask([AtomicU64; MAX_PEERS / 64]);

impl NodeMask {
    /// Sets bit `i` (ignored when out of range).
    pub fn set(&self, i: usize) {
        if let Some(w) = self.0.get(i / 64) {
            w.fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }

    /// Clears bit `i`.
    pub fn clear(&self, i: usize) {
        if let Some(w) = self.0.get(i / 64) {
            w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    /// Reads bit `i`.
    pub fn get(&self, i: usize) -> bool {
        self.0
            .get(i / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// True when any bit is set.
    #[inline]
    pub fn any(&self) -> bool {
        self.0.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Calls `f` with each set bit's index.
    pub fn for_each(&self, mut f: impl FnMut(usize)) {
        for (wi, w) in self.0.iter().enumerate() {
            super::bits(w.load(Ordering::Acquire)).for_each(|b| f(wi * 64 + b));
        }
    }
}
