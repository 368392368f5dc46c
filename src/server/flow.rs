//! Flow control, sans-IO: a queue's budget, and the rule that tells a slow
//! reader from a stuck one.
//!
//! Every connection's outbound queue has a [`Budget`]: frames (the seed's
//! `max_backlog`), bytes, and how long its socket may accept nothing while
//! it holds data before the reader counts as stuck. A frame that arrives at
//! a full queue is judged by [`Backlog::admit`]:
//!
//! - the socket accepted bytes within `stuck_after` (or the queue only just
//!   got data): the reader is **slow**. The frame is queued all the same and
//!   its producer — the connection whose input made it — is told to wait
//!   ([`Gate`]): that connection's socket is not read until the queue has
//!   drained to half its budget. TCP carries the backpressure to the
//!   publisher; nothing is dropped.
//! - the socket accepted nothing for `stuck_after`: the reader looks
//!   **stuck**. The frame is queued, nobody waits, and the shard's watch
//!   decides ([`Backlog::overdue`]): it first lets the shard's other work
//!   run — a busy shard may simply not have had the time to write, and the
//!   reader is not to blame for that — and closes the connection if it is
//!   still overdue, counting what it held.
//!
//! A queue with producers waiting that then makes no progress for
//! `stuck_after` is overdue too. So a stuck reader holds its publishers for
//! at most `stuck_after` (plus a watch tick) after its last progress, once,
//! and not at all when its queue fills more slowly than that. A queue at
//! twice its byte budget whose reader is silent, or at four times whatever
//! the reader does, is stuck at once ([`Admit::Stuck`]).
//!
//! A peer link is never made to wait for a member's queue (only for
//! inboxes): it carries every group between two nodes, and held for one
//! slow member it would stall them all until the other node cut it. A
//! member slower than what reaches it over links is cut at its cap.
//!
//! Nothing here touches a socket or a clock: callers pass `now`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The limits of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Frames pending (queued or being written) that make the queue full.
    pub frames: usize,
    /// Bytes pending that make the queue full.
    pub bytes: usize,
    /// How long a full queue's socket may accept nothing before its reader
    /// is stuck.
    pub stuck_after: Duration,
}

impl Budget {
    /// True when `frames` and `bytes` pending fill the budget.
    pub fn full(&self, frames: usize, bytes: usize) -> bool {
        frames >= self.frames || bytes >= self.bytes
    }

    /// True when `bytes` pending reach twice the byte budget: past that a
    /// reader that is not progressing is stuck at once. (Frames past
    /// `max_backlog` are fine: small frames that other shards had in
    /// flight can number tens of thousands in a few hundred kilobytes.)
    pub fn over_cap(&self, bytes: usize) -> bool {
        bytes >= self.bytes.saturating_mul(2)
    }

    /// True when `bytes` pending reach four times the byte budget: the hard
    /// bound on what a queue holds, whatever its reader is doing (many
    /// producers of large frames, each let through one frame, can carry a
    /// progressing reader past twice).
    pub fn over_hard_cap(&self, bytes: usize) -> bool {
        bytes >= self.bytes.saturating_mul(4)
    }

    /// True when the queue has drained enough for its producers to go on:
    /// half the budget, in frames and in bytes.
    pub fn drained(&self, frames: usize, bytes: usize) -> bool {
        frames <= self.frames / 2 && bytes <= self.bytes / 2
    }
}

/// What one producer (a connection whose input turns into frames for
/// others) waits on: the number of full queues and inboxes that told it to
/// wait. Shared across shards: a frame routed to another shard carries its
/// producer's gate, and that shard may close it.
#[derive(Debug, Default)]
pub struct Gate {
    waits: AtomicU32,
    notify: Notify,
    /// A peer link's gate: only inboxes hold it, never a member's queue. A
    /// link carries every group between two nodes; held for one slow
    /// member it would stall them all, and the other node would cut it.
    link: AtomicBool,
}

impl Gate {
    /// A new, open gate.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Marks this producer as a peer link (see the field's doc).
    pub fn set_link(&self) {
        self.link.store(true, Ordering::Release);
    }

    /// True for a peer link's gate.
    pub fn is_link(&self) -> bool {
        self.link.load(Ordering::Acquire)
    }

    /// True when nothing asks this producer to wait.
    #[inline]
    pub fn is_open(&self) -> bool {
        self.waits.load(Ordering::Acquire) == 0
    }

    /// Queues (and inboxes) this producer waits for.
    pub fn waits(&self) -> u32 {
        self.waits.load(Ordering::Acquire)
    }

    /// Waits until the gate is open.
    pub async fn opened(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: an opening in between wakes us.
            notified.as_mut().enable();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }

    /// One more queue asks this producer to wait.
    pub fn hold(&self) {
        self.waits.fetch_add(1, Ordering::AcqRel);
    }

    /// One queue lets this producer go.
    pub fn release(&self) {
        let before = self.waits.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "a gate released more often than held");
        if before == 1 {
            self.notify.notify_waiters();
        }
    }
}

/// The verdict on a frame offered to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Queued.
    Queued,
    /// Queued past a full budget: the reader is slow, and the producer (if
    /// any) now waits for it.
    Slow,
    /// Queued past a full budget, nobody waiting: the reader accepted
    /// nothing for `stuck_after` and looks stuck (the watch decides).
    Suspect,
    /// Not queued: the queue holds twice its byte budget (close it now).
    Stuck,
}

/// The accounting of one outbound queue: what is pending (queued or being
/// written), when its socket last made progress, and who waits for it.
#[derive(Debug)]
pub struct Backlog {
    frames: usize,
    bytes: usize,
    /// Last time the socket accepted bytes, or the queue got data after
    /// having none pending (the clock of "accepted nothing for ...").
    progress: Instant,
    /// Producers told to wait for this queue (each held once).
    waiters: Vec<Arc<Gate>>,
}

impl Backlog {
    /// An empty backlog.
    pub fn new(now: Instant) -> Self {
        Self {
            frames: 0,
            bytes: 0,
            progress: now,
            waiters: Vec::new(),
        }
    }

    /// Frames pending.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Bytes pending.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when producers wait for this queue.
    pub fn has_waiters(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// Judges a frame of `len` bytes from `producer` (see the module docs)
    /// and, unless stuck, counts it as pending.
    pub fn admit(
        &mut self,
        len: usize,
        budget: &Budget,
        now: Instant,
        producer: Option<&Arc<Gate>>,
    ) -> Admit {
        if self.frames == 0 {
            // Nothing was pending: the socket owes nothing yet.
            self.progress = now;
        }
        let verdict = if budget.full(self.frames, self.bytes) {
            let silent = now.saturating_duration_since(self.progress) >= budget.stuck_after;
            if budget.over_hard_cap(self.bytes) || (silent && budget.over_cap(self.bytes)) {
                return Admit::Stuck;
            }
            if silent {
                self.frames += 1;
                self.bytes += len;
                return Admit::Suspect;
            }
            if let Some(p) = producer {
                self.hold(p);
            }
            Admit::Slow
        } else {
            Admit::Queued
        };
        self.frames += 1;
        self.bytes += len;
        verdict
    }

    /// Makes `producer` wait for this queue (once; never a peer link).
    pub fn hold(&mut self, producer: &Arc<Gate>) {
        if producer.is_link() || self.waiters.iter().any(|w| Arc::ptr_eq(w, producer)) {
            return;
        }
        producer.hold();
        self.waiters.push(producer.clone());
    }

    /// Counts a frame queued without judgement (an error before closing).
    pub fn force(&mut self, len: usize) {
        self.frames += 1;
        self.bytes += len;
    }

    /// The socket accepted `bytes`, completing `frames`; producers go on
    /// once the queue has drained. Returns how many were let go.
    pub fn written(&mut self, frames: usize, bytes: usize, budget: &Budget, now: Instant) -> usize {
        self.frames = self.frames.saturating_sub(frames);
        self.bytes = self.bytes.saturating_sub(bytes);
        if bytes > 0 {
            self.progress = now;
        }
        if budget.drained(self.frames, self.bytes) {
            self.release_all()
        } else {
            0
        }
    }

    /// True when the queue is full or producers wait for it, and its
    /// socket has accepted nothing for `stuck_after`: the reader is stuck
    /// (if the shard has given its writer the chance to write).
    pub fn overdue(&self, budget: &Budget, now: Instant) -> bool {
        (self.has_waiters() || budget.full(self.frames, self.bytes))
            && now.saturating_duration_since(self.progress) >= budget.stuck_after
    }

    /// Lets every waiting producer go (the queue drained or is closing).
    pub fn release_all(&mut self) -> usize {
        let n = self.waiters.len();
        for w in self.waiters.drain(..) {
            w.release();
        }
        if self.waiters.capacity() > 8 {
            self.waiters = Vec::new();
        }
        n
    }

    /// Forgets everything pending (the queue was dropped); returns the
    /// frames and bytes that were pending.
    pub fn clear(&mut self) -> (usize, usize) {
        self.release_all();
        (
            std::mem::take(&mut self.frames),
            std::mem::take(&mut self.bytes),
        )
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        self.release_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            frames: 4,
            bytes: 1000,
            stuck_after: Duration::from_millis(100),
        }
    }

    /// One step of a table-driven case.
    enum Step {
        /// At `t` ms, offer a frame of `len` bytes from producer `p` (an
        /// index into the case's gates, or none); expect the verdict.
        Offer(u64, usize, Option<usize>, Admit),
        /// At `t` ms, the socket accepted `frames` frames of `bytes` bytes;
        /// expect that many producers let go.
        Wrote(u64, usize, usize, usize),
        /// At `t` ms, is the queue overdue (stuck with waiters)?
        Overdue(u64, bool),
        /// Producer `p`'s gate is open?
        Open(usize, bool),
    }
    use Admit::*;
    use Step::*;

    fn run(name: &str, steps: &[Step]) {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let gates: Vec<Arc<Gate>> = (0..3).map(|_| Gate::new()).collect();
        let b = budget();
        let mut q = Backlog::new(t0);
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Offer(t, len, p, want) => {
                    let got = q.admit(len, &b, at(t), p.map(|p| &gates[p]));
                    assert_eq!(got, want, "{name}: step {i}");
                }
                Wrote(t, frames, bytes, want) => {
                    let got = q.written(frames, bytes, &b, at(t));
                    assert_eq!(got, want, "{name}: step {i}");
                }
                Overdue(t, want) => assert_eq!(q.overdue(&b, at(t)), want, "{name}: step {i}"),
                Open(p, want) => assert_eq!(gates[p].is_open(), want, "{name}: step {i}"),
            }
        }
    }

    #[test]
    fn slow_and_stuck_readers() {
        let cases: &[(&str, &[Step])] = &[
            (
                "under budget: queued, nobody waits",
                &[
                    Offer(0, 10, Some(0), Queued),
                    Offer(500, 10, Some(0), Queued),
                    Open(0, true),
                ],
            ),
            (
                "full and progressing: slow, the producer waits until half drained",
                &[
                    Offer(0, 10, Some(0), Queued),
                    Offer(0, 10, Some(0), Queued),
                    Offer(0, 10, Some(0), Queued),
                    Offer(0, 10, Some(0), Queued),
                    Wrote(50, 1, 10, 0),
                    Offer(60, 10, Some(0), Queued),
                    Offer(61, 10, Some(0), Slow),
                    Open(0, false),
                    Offer(62, 10, Some(0), Slow),
                    Offer(63, 10, Some(1), Slow),
                    Open(1, false),
                    Wrote(70, 1, 10, 0),
                    Wrote(80, 4, 40, 2),
                    Open(0, true),
                    Open(1, true),
                ],
            ),
            (
                "full and silent for stuck_after: suspect, nobody waits, overdue",
                &[
                    Offer(0, 10, Some(0), Queued),
                    Offer(1, 10, Some(0), Queued),
                    Offer(2, 10, Some(0), Queued),
                    Offer(3, 10, Some(0), Queued),
                    Overdue(99, false),
                    Offer(100, 10, Some(0), Suspect),
                    Open(0, true),
                    Overdue(100, true),
                ],
            ),
            (
                "twice the byte budget and silent: stuck at once",
                &[
                    Offer(0, 600, None, Queued),
                    Offer(0, 600, None, Queued),
                    Offer(1, 600, None, Slow),
                    Offer(1, 600, None, Slow),
                    Offer(99, 10, Some(1), Slow),
                    Offer(100, 10, Some(1), Stuck),
                ],
            ),
            (
                "twice the byte budget but progressing: slow; four times: stuck",
                &[
                    Offer(0, 600, None, Queued),
                    Offer(0, 600, None, Queued),
                    Offer(1, 900, Some(0), Slow),
                    Offer(1, 900, Some(1), Slow),
                    Open(1, false),
                    Offer(2, 1000, Some(2), Slow),
                    Offer(3, 10, Some(2), Stuck),
                ],
            ),
            (
                "frames past twice max_backlog are not a cap (in-flight small frames)",
                &[
                    Offer(0, 1, None, Queued),
                    Offer(0, 1, None, Queued),
                    Offer(0, 1, None, Queued),
                    Offer(0, 1, None, Queued),
                    Offer(1, 1, Some(2), Slow),
                    Offer(1, 1, None, Slow),
                    Offer(1, 1, None, Slow),
                    Offer(1, 1, None, Slow),
                    Offer(1, 1, None, Slow),
                    Open(2, false),
                ],
            ),
            (
                "the clock starts when data becomes pending, not at the last write",
                &[
                    Offer(0, 10, None, Queued),
                    Wrote(1, 1, 10, 0),
                    Offer(500, 10, None, Queued),
                    Offer(500, 10, None, Queued),
                    Offer(500, 10, None, Queued),
                    Offer(500, 10, None, Queued),
                    Offer(550, 10, Some(0), Slow),
                    Offer(600, 10, Some(1), Suspect),
                    Open(1, true),
                ],
            ),
            (
                "bytes fill the budget too",
                &[
                    Offer(0, 999, None, Queued),
                    Offer(0, 1, Some(2), Queued),
                    Offer(10, 1, Some(2), Slow),
                    Open(2, false),
                    Wrote(20, 1, 999, 1),
                    Open(2, true),
                ],
            ),
            (
                "waiting on a reader that stops: overdue after stuck_after",
                &[
                    Offer(0, 10, None, Queued),
                    Offer(0, 10, None, Queued),
                    Offer(0, 10, None, Queued),
                    Offer(0, 10, None, Queued),
                    Wrote(40, 1, 5, 0),
                    Offer(45, 10, None, Queued),
                    Offer(50, 10, Some(0), Slow),
                    Overdue(139, false),
                    Overdue(140, true),
                ],
            ),
            (
                "neither full nor waited for: never overdue",
                &[Offer(0, 10, None, Queued), Overdue(10_000, false)],
            ),
        ];
        for (name, steps) in cases {
            run(name, steps);
        }
    }

    #[test]
    fn a_peer_link_is_never_held_by_a_member_queue() {
        let t0 = Instant::now();
        let b = budget();
        let link = Gate::new();
        link.set_link();
        let mut q = Backlog::new(t0);
        for _ in 0..4 {
            q.admit(10, &b, t0, Some(&link));
        }
        assert_eq!(q.admit(10, &b, t0, Some(&link)), Admit::Slow);
        assert!(link.is_open(), "the link reads on");
        assert!(!q.has_waiters());
    }

    #[test]
    fn clearing_or_dropping_lets_producers_go() {
        let t0 = Instant::now();
        let b = budget();
        let g = Gate::new();
        let mut q = Backlog::new(t0);
        for _ in 0..5 {
            q.admit(1, &b, t0, Some(&g));
        }
        assert_eq!(g.waits(), 1, "held once per queue, however many frames");
        assert_eq!(q.clear(), (5, 5));
        assert!(g.is_open());
        for _ in 0..5 {
            q.admit(1, &b, t0, Some(&g));
        }
        drop(q);
        assert!(g.is_open());
    }

    #[tokio::test]
    async fn a_waiting_producer_wakes_when_released() {
        let g = Gate::new();
        g.hold();
        g.hold();
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.opened().await }
        });
        tokio::task::yield_now().await;
        g.release();
        assert!(!waiter.is_finished());
        g.release();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
