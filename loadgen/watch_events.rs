//! The churn scenario's watcher: churning members register when they call
//! `join()` / `leave()`; the watching subscriber reports each membership
//! event it reads; the difference is the membership-event latency.

use hdrhistogram::Histogram;
use msgc::protocol::Reason;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::clock::new_hist;

/// Pending calls and the latencies seen so far.
pub struct Watcher {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Calls not yet seen, per member, oldest first (a member's events
    /// reach the watcher in the order of its calls).
    joins: HashMap<Vec<u8>, VecDeque<(Instant, bool)>>,
    leaves: HashMap<Vec<u8>, VecDeque<(Instant, bool)>>,
    join_hist: Histogram<u64>,
    leave_hist: Histogram<u64>,
}

/// What the watcher saw, for counted (in-window) calls.
pub struct Seen {
    pub join: Histogram<u64>,
    pub leave: Histogram<u64>,
    /// Counted calls whose event never arrived.
    pub missing: u64,
}

impl Default for Watcher {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                joins: HashMap::new(),
                leaves: HashMap::new(),
                join_hist: new_hist(),
                leave_hist: new_hist(),
            }),
        }
    }
}

impl Watcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `member` is about to call join (or leave) at `at`; `counted` when
    /// the call falls in the measured window.
    pub fn expect(&self, reason: Reason, member: &[u8], at: Instant, counted: bool) {
        let mut g = self.lock();
        let map = match reason {
            Reason::Join => &mut g.joins,
            _ => &mut g.leaves,
        };
        map.entry(member.to_vec())
            .or_default()
            .push_back((at, counted));
    }

    /// A MEMBERSHIP event (wire reason code) read at `now`.
    pub fn on_event(&self, reason: u8, subject: &[u8], now: Instant) {
        let mut g = self.lock();
        let inner = &mut *g;
        let (map, hist) = if reason == Reason::Join as u8 {
            (&mut inner.joins, &mut inner.join_hist)
        } else if reason == Reason::Leave as u8 {
            (&mut inner.leaves, &mut inner.leave_hist)
        } else {
            return;
        };
        let Some(queue) = map.get_mut(subject) else {
            return;
        };
        if let Some((at, counted)) = queue.pop_front() {
            if counted {
                let ns =
                    u64::try_from(now.saturating_duration_since(at).as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.max(1));
            }
        }
    }

    /// The latencies, and how many counted events never came.
    pub fn seen(&self) -> Seen {
        let g = self.lock();
        let missing = g
            .joins
            .values()
            .chain(g.leaves.values())
            .flatten()
            .filter(|(_, counted)| *counted)
            .count() as u64;
        Seen {
            join: g.join_hist.clone(),
            leave: g.leave_hist.clone(),
            missing,
        }
    }
}
