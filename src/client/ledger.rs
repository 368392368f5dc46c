//! The [`Ledger`]: how many publishes (and sends) the client accepted, how
//! many its writers took off the queue, and how many the server has
//! confirmed. It answers "what may not have reached the server?" for
//! [`Event::Disconnected`](super::Event::Disconnected) and
//! [`Client::close`](super::Client::close).
//!
//! Counts are cumulative over the client's life, in messages (a
//! `publish_batch` of n payloads counts n), and only grow:
//!
//! ```text
//! confirmed ≤ taken ≤ accepted            (up to the races noted below)
//! └ PONGs ┘  └ written or being written ┘ └ still queued ┘
//! ```
//!
//! Confirmation is PING/PONG: a PONG answers only after the server has
//! handled every frame written before its PING, so a confirmation PING
//! (token [`CONFIRM`] | the writer's `taken` count when it was written)
//! confirms everything taken before it. The writer sends one after a batch
//! when something is unconfirmed and none is outstanding (one per round trip
//! at most), and one before every user PING and at `close`.
//!
//! When a connection is lost what it took and did not get confirmed is
//! *settled*: reported once, in that `Disconnected`, and not again. What
//! was still queued stays unconfirmed (it goes out on the next connection).
//!
//! No I/O here; the writer, the reader and the supervisor call in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The bit that marks a PING token as a confirmation (the rest is the
/// writer's `taken` count). User ping tokens are request ids below 2³².
pub(crate) const CONFIRM: u64 = 1 << 63;

/// A counter on its own cache line: `accepted` is bumped by every
/// publishing thread, `taken` by the writer; they must not share a line.
#[derive(Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// The counts; see the module docs.
#[derive(Default)]
pub(crate) struct Ledger {
    /// Messages `publish`/`send` accepted into the queue. Counted just
    /// before the queue is tried, and taken back if the item comes back.
    accepted: Padded,
    /// Messages the writers have taken off the queue (stored by the writer
    /// once per batch, before the batch is written).
    taken: Padded,
    /// Position up to which messages are confirmed by a PONG or settled by
    /// a lost connection; never above `taken`.
    confirmed: AtomicU64,
    /// Wakes the writer when `confirmed` advances.
    advanced: Notify,
}

/// What a lost connection leaves unconfirmed (see `Event::Disconnected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unconfirmed {
    /// Accepted and not confirmed, queued ones included.
    pub total: u64,
    /// Of `total`, those never taken off the queue.
    pub queued: u64,
}

/// What [`Client::close`](super::Client::close) could not have confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "close says whether every publish reached the server"]
pub struct CloseReport {
    /// Every publish and send accepted was confirmed by the server (or
    /// reported in an earlier [`Event::Disconnected`]): `unconfirmed == 0`.
    ///
    /// [`Event::Disconnected`]: super::Event::Disconnected
    pub flushed: bool,
    /// Publishes and sends accepted and not confirmed (as in
    /// [`Event::Disconnected`](super::Event::Disconnected)): those written
    /// and not confirmed within the bound may or may not have reached the
    /// server; `unsent` did not.
    pub unconfirmed: u64,
    /// Of `unconfirmed`, those never written (the queue could not be
    /// flushed: no connection, or not within the bound). Dropped.
    pub unsent: u64,
}

impl Ledger {
    /// `n` messages are about to be queued.
    pub(crate) fn accept(&self, n: u64) {
        self.accepted.0.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` messages counted by [`Ledger::accept`] were not queued after all.
    pub(crate) fn unaccept(&self, n: u64) {
        self.accepted.0.fetch_sub(n, Ordering::AcqRel);
    }

    /// The writer's running count of messages taken off the queue.
    pub(crate) fn taken(&self) -> u64 {
        self.taken.0.load(Ordering::Acquire)
    }

    /// Records the writer's running count (before it writes the batch, so
    /// a PONG never confirms beyond it).
    pub(crate) fn set_taken(&self, taken: u64) {
        self.taken.0.store(taken, Ordering::Release);
    }

    /// Position confirmed (or settled) so far.
    pub(crate) fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    /// A confirmation PONG whose token carried `upto` arrived. The value
    /// comes from the server: it is capped at what was taken, so a bogus
    /// token cannot confirm what was never written.
    pub(crate) fn confirm(&self, upto: u64) {
        let upto = upto.min(self.taken());
        if self.confirmed.fetch_max(upto, Ordering::AcqRel) < upto {
            self.advanced.notify_one();
        }
    }

    /// Messages accepted and not confirmed, queued ones included.
    pub(crate) fn unconfirmed(&self) -> u64 {
        // Read `confirmed` first: it only grows, so the difference is never
        // understated by a confirmation landing between the two reads.
        let confirmed = self.confirmed();
        self.accepted().saturating_sub(confirmed)
    }

    /// Messages accepted and never taken off the queue.
    pub(crate) fn unsent(&self) -> u64 {
        let taken = self.taken();
        self.accepted().saturating_sub(taken)
    }

    fn accepted(&self) -> u64 {
        self.accepted.0.load(Ordering::Acquire)
    }

    /// What `close` reports, as of now.
    pub(crate) fn close_report(&self) -> CloseReport {
        let unconfirmed = self.unconfirmed();
        CloseReport {
            flushed: unconfirmed == 0,
            unconfirmed,
            unsent: self.unsent().min(unconfirmed),
        }
    }

    /// The connection is lost (its writer has stopped): reports what is
    /// unconfirmed, then settles what that connection took, so that it is
    /// reported this once.
    pub(crate) fn settle(&self) -> Unconfirmed {
        let taken = self.taken();
        let lost = Unconfirmed {
            total: self.unconfirmed(),
            queued: self.accepted().saturating_sub(taken),
        };
        self.confirmed.fetch_max(taken, Ordering::AcqRel);
        lost
    }

    /// Waits until everything up to `upto` is confirmed, at most `bound`;
    /// returns whether it was.
    pub(crate) async fn wait_confirmed(&self, upto: u64, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let advanced = self.advanced.notified();
            tokio::pin!(advanced);
            // Registered before the check: an advance in between still wakes.
            advanced.as_mut().enable();
            if self.confirmed() >= upto {
                return true;
            }
            if tokio::time::timeout_at(deadline, advanced).await.is_err() {
                return self.confirmed() >= upto;
            }
        }
    }

    /// Resolves when `confirmed` advances (or at once, if it advanced since
    /// the last call). Cancel-safe.
    pub(crate) async fn advanced(&self) {
        self.advanced.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_accept_to_confirm() {
        let l = Ledger::default();
        l.accept(5);
        assert_eq!((l.unconfirmed(), l.unsent()), (5, 5));
        l.set_taken(3);
        assert_eq!((l.unconfirmed(), l.unsent()), (5, 2));
        l.confirm(2);
        assert_eq!((l.unconfirmed(), l.unsent()), (3, 2));
        l.unaccept(1);
        assert_eq!((l.unconfirmed(), l.unsent()), (2, 1));
    }

    #[test]
    fn a_confirmation_beyond_what_was_taken_is_capped() {
        let l = Ledger::default();
        l.accept(4);
        l.set_taken(2);
        l.confirm(u64::MAX >> 1);
        assert_eq!(l.confirmed(), 2);
        assert_eq!(l.unconfirmed(), 2);
    }

    #[test]
    fn confirmations_never_go_back() {
        let l = Ledger::default();
        l.accept(4);
        l.set_taken(4);
        l.confirm(3);
        l.confirm(1);
        assert_eq!(l.confirmed(), 3);
    }

    #[test]
    fn settling_reports_once_and_keeps_the_queued() {
        let l = Ledger::default();
        l.accept(10);
        l.set_taken(7);
        l.confirm(4);
        // 3 taken and unconfirmed, 3 still queued.
        assert_eq!(
            l.settle(),
            Unconfirmed {
                total: 6,
                queued: 3
            }
        );
        // The 3 taken are settled; the 3 queued remain unconfirmed.
        assert_eq!(l.unconfirmed(), 3);
        assert_eq!(
            l.settle(),
            Unconfirmed {
                total: 3,
                queued: 3
            }
        );
        l.set_taken(10);
        l.confirm(10);
        assert_eq!(
            l.settle(),
            Unconfirmed {
                total: 0,
                queued: 0
            }
        );
    }

    #[tokio::test]
    async fn waiting_for_confirmation() {
        let l = std::sync::Arc::new(Ledger::default());
        l.accept(2);
        l.set_taken(2);
        assert!(!l.wait_confirmed(2, Duration::from_millis(1)).await);
        let l2 = l.clone();
        let confirmer = tokio::spawn(async move { l2.confirm(2) });
        assert!(l.wait_confirmed(2, Duration::from_secs(5)).await);
        confirmer.await.expect("task");
    }
}
