//! A connection's outbound queue and the writer task that drains it.
//!
//! Producers (the fan-out on this shard, messages from other shards) push
//! refcounted frames, or copy a small frame into the queue's open chunk
//! ([`Outbound::push_copy`]): small frames then cost no allocation of
//! their own and go to the kernel as one buffer, not one iovec each. The queue's
//! budget and the slow/stuck rule live in [`super::flow`]: a push to a full
//! queue either makes its producer wait ([`Push::Slow`]) or reports
//! [`Push::Stuck`], and the caller closes the connection. The writer takes
//! everything due per turn, up to [`WRITE_BYTES`] and [`MAX_IOV`] frames,
//! and hands it to one `writev`, owning the partial-write loop (tokio-uring
//! has no `writev_all`); then it yields if more is due, so that one
//! connection's backlog delays the shard's others by one batch at most.
//! Every write that makes progress is reported to the backlog, which lets
//! waiting producers go once the queue has drained.

use super::flow::{Admit, Backlog, Budget, Gate};
use super::io::Stream;
use crate::protocol::LEN_PREFIX;
use bytes::{Buf, Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

/// Most frames in one `writev`: the kernel refuses more than `UIO_MAXIOV`
/// (1024) buffers with EINVAL. std's vectored writes (the epoll backend)
/// quietly write only the first 1024; tokio-uring passes the whole vector
/// on, so a batch of `messages_per_iter` > 1024 frames would fail the
/// write and close the connection.
pub const MAX_IOV: usize = 1024;

/// Bytes one write takes from the queue, at the most (a frame larger than
/// this goes alone): small frames are coalesced up to this, whatever
/// `messages_per_iter`, so that a turn's cost does not grow with the number
/// of frames.
pub const WRITE_BYTES: usize = 256 * 1024;

/// Slots of a queue kept once it is empty and idle (the sweep gives more
/// back), and of a write batch.
const KEEP_CAPACITY: usize = 64;
/// Slots of a queue given back as soon as it is empty: a burst's room
/// (up to 4,096 slots, 128 KiB, stays for the sweep to give back, so a
/// stream does not free and regrow its queue at every lull).
const DROP_CAPACITY: usize = 4096;

/// Frames up to this long may be copied into a queue's open chunk
/// ([`Outbound::push_copy`]) rather than shared: below this a copy costs
/// less than the frame's own allocation, its refcount and its iovec
/// (tuning.md, "Small frames copied into the writer's chunk").
pub const COPY_MAX: usize = 128;

/// The open chunk's first room, and its most: a chunk is closed (queued
/// for the writer) once it holds this much, and grows by doubling from
/// the first size while a connection's stream keeps it full, so an idle
/// member holds little and a busy one allocates once per 64 KiB.
const CHUNK_MIN: usize = 512;
const CHUNK_MAX: usize = 64 * 1024;

/// What a queued frame costs besides its bytes (its slot in the queue: 40
/// bytes, a buffer and its frame count), so that a budget in bytes bounds
/// the memory of many small frames too. A copied frame is charged the same,
/// though it shares its chunk's slot.
pub const SLOT_BYTES: usize = std::mem::size_of::<(Bytes, u32)>();
// PROTOCOL.md and tuning.md give the slot as 40 bytes.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(SLOT_BYTES == 40);

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// Queued past a full budget; the producer now waits (a slow reader).
    Slow,
    /// Queued past a full budget, nobody waiting: the reader looks stuck
    /// (the shard's watch decides).
    Suspect,
    /// Not queued: the queue holds twice its byte budget (the caller closes the
    /// connection as stuck).
    Stuck,
    /// The connection is closing or closed: the frame was not queued.
    Closed,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting frames.
    Open,
    /// Writing what is queued, then shutting down (no new frames).
    Draining,
    /// Shut down; the queue is empty.
    Closed,
}

/// The queue, its accounting, its wake-up and the facts the sweep needs.
#[derive(Debug)]
pub struct Outbound {
    /// Closed buffers in order, each a frame or a chunk of copied frames,
    /// with how many frames it holds.
    queue: RefCell<VecDeque<(Bytes, u32)>>,
    /// Copied frames not yet queued (they follow everything in `queue`),
    /// and how many.
    open: RefCell<BytesMut>,
    open_frames: Cell<u32>,
    /// The room the open chunk gets when it needs more.
    chunk: Cell<usize>,
    /// Frames and bytes pending (queued or being written), the progress
    /// clock and the producers waiting.
    backlog: RefCell<Backlog>,
    budget: Cell<Budget>,
    notify: Notify,
    phase: Cell<Phase>,
    /// When the last write completed (or the connection opened).
    last_tx: Cell<Instant>,
}

impl Outbound {
    /// An empty, open queue with `budget`.
    pub fn new(now: Instant, budget: Budget) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            open: RefCell::new(BytesMut::new()),
            open_frames: Cell::new(0),
            chunk: Cell::new(CHUNK_MIN),
            backlog: RefCell::new(Backlog::new(now)),
            budget: Cell::new(budget),
            notify: Notify::new(),
            phase: Cell::new(Phase::Open),
            last_tx: Cell::new(now),
        }
    }

    /// The queue's budget.
    pub fn budget(&self) -> Budget {
        self.budget.get()
    }

    /// Sets the budget (the connection's role is known, or a reload).
    pub fn set_budget(&self, budget: Budget) {
        self.budget.set(budget);
    }

    /// Offers `frame`, made by `producer`, at time `now` (see [`Push`]),
    /// and wakes the writer if the queue was empty.
    #[inline]
    pub fn push(&self, frame: Bytes, now: Instant, producer: Option<&Arc<Gate>>) -> Push {
        let (verdict, wake) = self.push_quiet(frame, now, producer);
        if wake {
            self.wake();
        }
        verdict
    }

    /// Wakes the writer (see [`Outbound::push_quiet`]).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// As [`Outbound::push`], but leaves waking the writer to the caller:
    /// true when the queue was empty (the writer may be asleep). A
    /// producer that routes a whole read's worth of messages wakes the
    /// writers it filled once, at its end, so each writes all of it at
    /// once rather than a few frames per turn.
    #[inline]
    pub fn push_quiet(
        &self,
        frame: Bytes,
        now: Instant,
        producer: Option<&Arc<Gate>>,
    ) -> (Push, bool) {
        let verdict = match self.admit(frame.len(), now, producer) {
            Ok(v) => v,
            Err(refused) => return (refused, false),
        };
        if self.open_frames.get() > 0 {
            self.close_chunk();
            self.queue.borrow_mut().push_back((frame, 1));
            return (verdict, false);
        }
        let mut q = self.queue.borrow_mut();
        let was_empty = q.is_empty();
        q.push_back((frame, 1));
        (verdict, was_empty)
    }

    /// As [`Outbound::push_quiet`], but copies `frame` (at most a few
    /// hundred bytes; see [`COPY_MAX`]) into the open chunk: no
    /// allocation per frame, and the writer sends the chunk as one buffer.
    /// Charged to the budget exactly as a shared frame.
    #[inline]
    pub fn push_copy(
        &self,
        frame: &[u8],
        now: Instant,
        producer: Option<&Arc<Gate>>,
    ) -> (Push, bool) {
        let verdict = match self.admit(frame.len(), now, producer) {
            Ok(v) => v,
            Err(refused) => return (refused, false),
        };
        let was_empty = self.is_empty();
        let mut open = self.open.borrow_mut();
        if open.len() + frame.len() > CHUNK_MAX && !open.is_empty() {
            drop(open);
            self.close_chunk();
            open = self.open.borrow_mut();
        }
        if open.capacity() - open.len() < frame.len() {
            let room = self.chunk.get();
            open.reserve(room.max(frame.len()));
            self.chunk.set((room * 2).min(CHUNK_MAX));
        }
        open.extend_from_slice(frame);
        self.open_frames.set(self.open_frames.get() + 1);
        (verdict, was_empty)
    }

    /// The budget's verdict on a frame of `len` bytes (the caller queues
    /// it on `Ok`).
    #[inline]
    fn admit(&self, len: usize, now: Instant, producer: Option<&Arc<Gate>>) -> Result<Push, Push> {
        if self.phase.get() != Phase::Open {
            return Err(Push::Closed);
        }
        match self
            .backlog
            .borrow_mut()
            .admit(len + SLOT_BYTES, &self.budget.get(), now, producer)
        {
            Admit::Stuck => Err(Push::Stuck),
            Admit::Slow => Ok(Push::Slow),
            Admit::Suspect => Ok(Push::Suspect),
            _ => Ok(Push::Queued),
        }
    }

    /// Queues the open chunk's frames (they go before anything pushed
    /// after them). Its spare room stays open: once the writer is done
    /// with the closed part, the chunk's memory is used again.
    fn close_chunk(&self) {
        let frames = self.open_frames.replace(0);
        if frames > 0 {
            let bytes = self.open.borrow_mut().split().freeze();
            self.queue.borrow_mut().push_back((bytes, frames));
        }
    }

    /// Queues `last` (an error or last words, whatever the budget), then
    /// closes after flushing. Producers waiting for this queue go on: what
    /// it holds is flushed or dropped, never waited for. Returns false if
    /// already closing.
    pub fn drain_with(&self, last: Option<Bytes>) -> bool {
        if self.phase.get() != Phase::Open {
            return false;
        }
        self.close_chunk();
        let mut backlog = self.backlog.borrow_mut();
        if let Some(f) = last {
            backlog.force(f.len() + SLOT_BYTES);
            self.queue.borrow_mut().push_back((f, 1));
        }
        backlog.release_all();
        self.phase.set(Phase::Draining);
        self.notify.notify_one();
        true
    }

    /// Closes at once; returns how many queued frames were dropped (the
    /// writer counts what it was writing).
    pub fn close_now(&self) -> usize {
        let dropped = if self.phase.get() == Phase::Closed {
            0
        } else {
            let mut q = self.queue.borrow_mut();
            let n = q.iter().map(|(_, f)| *f as usize).sum::<usize>()
                + self.open_frames.replace(0) as usize;
            *q = VecDeque::new();
            *self.open.borrow_mut() = BytesMut::new();
            n
        };
        self.backlog.borrow_mut().clear();
        self.phase.set(Phase::Closed);
        self.notify.notify_one();
        dropped
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Frames waiting to be taken by the writer (a walk of the queue:
    /// for tests; the server reads the backlog's counts).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue
            .borrow()
            .iter()
            .map(|(_, f)| *f as usize)
            .sum::<usize>()
            + self.open_frames.get() as usize
    }

    /// True when nothing waits to be taken by the writer.
    pub fn is_empty(&self) -> bool {
        self.open_frames.get() == 0 && self.queue.borrow().is_empty()
    }

    /// Frames and bytes pending: queued or being written.
    pub fn pending(&self) -> (usize, usize) {
        let b = self.backlog.borrow();
        (b.frames(), b.bytes())
    }

    /// True when producers wait for this queue.
    pub fn has_waiters(&self) -> bool {
        self.backlog.borrow().has_waiters()
    }

    /// True when the queue is full or producers wait for it: what the
    /// shard's stuck watch keeps an eye on.
    pub fn pressed(&self) -> bool {
        let b = self.backlog.borrow();
        b.has_waiters() || self.budget.get().full(b.frames(), b.bytes())
    }

    /// True when the queue is full or producers wait for it, and the socket
    /// accepted nothing for the budget's `stuck_after` (see `flow`).
    pub fn overdue(&self, now: Instant) -> bool {
        self.backlog.borrow().overdue(&self.budget.get(), now)
    }

    /// Makes `producer` wait for this queue if it is full (membership
    /// changes flushed later in batches are charged to who made them).
    pub fn hold_if_full(&self, producer: &Arc<Gate>) -> bool {
        let mut b = self.backlog.borrow_mut();
        if self.phase.get() != Phase::Open || !self.budget.get().full(b.frames(), b.bytes()) {
            return false;
        }
        b.hold(producer);
        true
    }

    /// When the last write completed.
    pub fn last_tx(&self) -> Instant {
        self.last_tx.get()
    }

    /// Takes what is due, up to [`MAX_IOV`] buffers and about
    /// [`WRITE_BYTES`] (always one buffer at least), with each buffer's
    /// frame count in `frames`.
    fn take_batch(&self, batch: &mut Vec<Bytes>, frames: &mut Vec<u32>) {
        self.close_chunk();
        let mut q = self.queue.borrow_mut();
        let mut bytes = 0;
        let n = q
            .iter()
            .take(MAX_IOV)
            .take_while(|(f, _)| {
                let first = bytes == 0;
                bytes += f.len();
                first || bytes <= WRITE_BYTES
            })
            .count();
        batch.reserve(n);
        frames.reserve(n);
        for (b, f) in q.drain(..n) {
            batch.push(b);
            frames.push(f);
        }
        if q.is_empty() && q.capacity() > DROP_CAPACITY {
            // A big burst is over: do not keep its room.
            *q = VecDeque::new();
        }
    }

    /// Gives back an empty queue's room (the shard's sweep, so that idle
    /// members hold little).
    pub fn trim_idle(&self) {
        let mut q = self.queue.borrow_mut();
        if q.is_empty() && q.capacity() > KEEP_CAPACITY {
            *q = VecDeque::new();
        }
        if self.open_frames.get() == 0 {
            *self.open.borrow_mut() = BytesMut::new();
            self.chunk.set(CHUNK_MIN);
        }
    }

    /// The socket accepted `bytes`, completing `frames`.
    fn written(&self, frames: usize, bytes: usize) {
        let now = Instant::now();
        self.last_tx.set(now);
        let cost = bytes + frames * SLOT_BYTES;
        self.backlog
            .borrow_mut()
            .written(frames, cost, &self.budget.get(), now);
    }
}

/// Totals of one writer turn, for the counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// Frames written.
    pub frames: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Drains `out` into `stream` until the connection closes: each turn one
/// batch, everything due up to [`WRITE_BYTES`] and [`MAX_IOV`] frames, in
/// one `writev` (more only when the socket takes part of it); then, if
/// more is due, it yields, so that every writer of the shard gets its turn
/// (a connection with a huge backlog delays one with a single frame by one
/// batch at most). `on_write` is told what each turn wrote. Shuts the
/// stream down on the way out and returns how many frames a failed write
/// left unsent: those of the batch being written that did not go out
/// whole, and what was still queued.
pub async fn write_loop<S: Stream>(
    out: &Outbound,
    stream: &S,
    on_write: impl Fn(Written),
) -> usize {
    let mut dropped = 0;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut counts: Vec<u32> = Vec::new();
    loop {
        out.take_batch(&mut batch, &mut counts);
        if batch.is_empty() {
            match out.phase() {
                Phase::Open => {
                    out.notify.notified().await;
                    continue;
                }
                Phase::Draining | Phase::Closed => break,
            }
        }
        if out.phase() == Phase::Closed {
            dropped = counts.iter().map(|f| *f as usize).sum();
            break;
        }
        let frames = counts.iter().map(|f| u64::from(*f)).sum();
        match write_all(stream, batch, &mut counts, |f, b| out.written(f, b)).await {
            Ok((bytes, mut b)) => {
                if b.capacity() > KEEP_CAPACITY {
                    b = Vec::new();
                    counts = Vec::new();
                }
                batch = b;
                on_write(Written { frames, bytes });
                if !out.is_empty() {
                    // One batch per turn: the shard's other writers (and
                    // readers) go before this one's next.
                    tokio::task::yield_now().await;
                }
            }
            Err(Failed {
                unsent,
                frames,
                bytes,
            }) => {
                // What earlier writes of the batch took went out.
                if bytes > 0 {
                    on_write(Written { frames, bytes });
                }
                // The batch was taken off the queue: what of it did not go
                // out whole is dropped too, not only what is still queued.
                dropped = unsent + out.close_now();
                break;
            }
        }
    }
    out.phase.set(Phase::Closed);
    stream.shutdown();
    dropped
}

/// A write that failed partway through a batch.
struct Failed {
    /// Frames of the batch that did not go out whole.
    unsent: usize,
    /// Frames that earlier writes of the batch completed.
    frames: u64,
    /// Bytes that earlier writes of the batch took.
    bytes: u64,
}

/// Writes every byte of `bufs` (buffer `i` holding `frames[i]` whole
/// frames), looping over partial writes, and tells `progress` after each
/// write how many frames it completed and how many bytes it took. Returns
/// the byte count and the emptied vector (for reuse; `frames` is emptied
/// too); on a failed write, what of the batch went out and what did not
/// go out whole ([`Failed`]). A
/// buffer of copied frames that a write took part of has the frames it
/// took whole counted done then (its frames' length prefixes say where
/// they end), so a failure later counts only the rest.
async fn write_all<S: Stream>(
    stream: &S,
    mut bufs: Vec<Bytes>,
    frames: &mut Vec<u32>,
    progress: impl Fn(usize, usize),
) -> Result<(u64, Vec<Bytes>), Failed> {
    let (mut total, mut total_frames) = (0u64, 0u64);
    // Bytes of `bufs[0]`'s first frame still to go (a write ended inside
    // it); 0 when it starts at a frame's start.
    let mut head = 0;
    while !bufs.is_empty() {
        let (res, mut b) = stream.writev(bufs).await;
        let n = match res {
            Ok(n) if n > 0 => n,
            // An error, or no progress (WriteZero): the connection is gone.
            _ => {
                let unsent = frames.iter().map(|f| *f as usize).sum();
                frames.clear();
                return Err(Failed {
                    unsent,
                    frames: total_frames,
                    bytes: total,
                });
            }
        };
        total += n as u64;
        let (mut left, mut done, mut done_frames) = (n, 0, 0);
        for (buf, f) in b.iter_mut().zip(frames.iter_mut()) {
            if left >= buf.len() {
                left -= buf.len();
                done += 1;
                done_frames += *f as usize;
                head = 0;
            } else {
                let (whole, rest) = frames_taken(buf, head, left);
                let whole = whole.min(*f as usize);
                *f -= whole as u32;
                done_frames += whole;
                head = rest;
                buf.advance(left);
                break;
            }
        }
        b.drain(..done);
        frames.drain(..done);
        total_frames += done_frames as u64;
        progress(done_frames, n);
        bufs = b;
    }
    Ok((total, bufs))
}

/// Of `buf` (whole frames behind their length prefixes, except that its
/// first `head` bytes end a frame begun before it), how many frames its
/// first `n` bytes complete, and how many bytes of the frame they end in
/// are still to go (0 when they end at a frame's end).
fn frames_taken(buf: &[u8], head: usize, n: usize) -> (usize, usize) {
    if n < head {
        return (0, head - n);
    }
    let (mut done, mut pos) = (usize::from(head > 0), head);
    while pos < n {
        // Our own frames: their prefixes are whole and valid.
        let Ok(Some(len)) = crate::protocol::peek_len(&buf[pos..], usize::MAX) else {
            break;
        };
        let end = (pos + LEN_PREFIX + len).min(buf.len());
        if end > n {
            return (done, end - n);
        }
        done += 1;
        pos = end;
    }
    (done, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::os::fd::{AsRawFd, RawFd};
    use std::rc::Rc;
    use std::time::Duration;

    /// A socket that takes every byte at once and logs each write as
    /// (which connection, frames, bytes).
    struct Sink {
        name: char,
        log: Rc<RefCell<Vec<(char, usize, usize)>>>,
        fd: std::os::unix::net::UnixStream,
    }

    impl Stream for Sink {
        async fn read(&self, buf: bytes::BytesMut) -> (io::Result<usize>, bytes::BytesMut) {
            (Ok(0), buf)
        }
        async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
            let n: usize = bufs.iter().map(Bytes::len).sum();
            self.log.borrow_mut().push((self.name, bufs.len(), n));
            (Ok(n), bufs)
        }
        fn raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    fn queue(frames: usize, len: usize) -> Outbound {
        let budget = Budget {
            frames: usize::MAX,
            bytes: usize::MAX,
            stuck_after: Duration::from_secs(1),
        };
        let out = Outbound::new(Instant::now(), budget);
        // Frames out of a static buffer: these tests allocate (almost)
        // nothing, so they do not disturb the heap figures other tests of
        // this binary read meanwhile.
        static BIG: [u8; 1 << 20] = [7; 1 << 20];
        for _ in 0..frames {
            out.push(Bytes::from_static(&BIG[..len]), Instant::now(), None);
        }
        out.drain_with(None);
        out
    }

    /// Connection A has 5,000 small frames due, B one: B's frame goes
    /// out in the first turn, right after A's first batch, and A's frames
    /// are coalesced into few large writes (not `messages_per_iter` each).
    #[test]
    fn a_huge_backlog_delays_another_connection_by_one_batch_at_most() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let log = Rc::new(RefCell::new(Vec::new()));
        let (a, b) = (queue(5_000, 16), queue(1, 16));
        let (fa, fb) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let sink = |name, fd| Sink {
            name,
            log: log.clone(),
            fd,
        };
        let (sa, sb) = (sink('a', fa), sink('b', fb));
        tokio::task::LocalSet::new().block_on(&rt, async {
            let wa = write_loop(&a, &sa, |_| {});
            let wb = write_loop(&b, &sb, |_| {});
            let (da, db) = tokio::join!(wa, wb);
            assert_eq!((da, db), (0, 0), "nothing dropped");
        });
        let log = log.borrow();
        let b_at = log.iter().position(|(n, _, _)| *n == 'b').expect("b wrote");
        assert!(b_at <= 1, "b waited for {b_at} writes of a");
        let a_writes: Vec<_> = log.iter().filter(|(n, _, _)| *n == 'a').collect();
        let frames: usize = a_writes.iter().map(|(_, f, _)| f).sum();
        assert_eq!(frames, 5_000);
        assert!(
            a_writes.len() <= 5_000 / MAX_IOV + 1,
            "a's frames in {} writes",
            a_writes.len()
        );
        assert!(a_writes
            .iter()
            .all(|(_, f, b)| *f <= MAX_IOV && *b <= WRITE_BYTES));
    }

    /// Large frames are bounded by bytes, and a frame over the bound still
    /// goes (alone).
    #[test]
    fn batches_are_bounded_in_bytes() {
        let out = queue(10, 100 * 1024);
        let (mut batch, mut counts) = (Vec::new(), Vec::new());
        out.take_batch(&mut batch, &mut counts);
        assert_eq!(batch.len(), 2, "two 100 KiB frames fit in 256 KiB");
        assert_eq!(counts, [1, 1]);
        let big = queue(1, 1 << 20);
        batch.clear();
        big.take_batch(&mut batch, &mut counts);
        assert_eq!(batch.len(), 1, "a frame larger than the bound goes alone");
    }

    /// A socket that takes at most `per_write` bytes a call and keeps
    /// everything written.
    struct Trickle {
        per_write: usize,
        got: RefCell<Vec<u8>>,
        writes: Cell<usize>,
        fd: std::os::unix::net::UnixStream,
    }

    impl Stream for Trickle {
        async fn read(&self, buf: bytes::BytesMut) -> (io::Result<usize>, bytes::BytesMut) {
            (Ok(0), buf)
        }
        async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
            let mut left = self.per_write;
            let mut got = self.got.borrow_mut();
            for b in &bufs {
                let k = b.len().min(left);
                got.extend_from_slice(&b[..k]);
                left -= k;
            }
            self.writes.set(self.writes.get() + 1);
            (Ok(self.per_write - left), bufs)
        }
        fn raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    fn open_queue() -> Outbound {
        let budget = Budget {
            frames: usize::MAX,
            bytes: usize::MAX,
            stuck_after: Duration::from_secs(1),
        };
        Outbound::new(Instant::now(), budget)
    }

    /// Runs `out`'s writer into a socket taking `per_write` bytes a call
    /// until the queue is drained; returns (bytes, frames reported, writes).
    fn drain(out: &Outbound, per_write: usize) -> (Vec<u8>, u64, usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (fd, _other) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let sock = Trickle {
            per_write,
            got: RefCell::new(Vec::new()),
            writes: Cell::new(0),
            fd,
        };
        let frames = Cell::new(0u64);
        out.drain_with(None);
        let dropped = rt.block_on(write_loop(out, &sock, |w| {
            frames.set(frames.get() + w.frames)
        }));
        assert_eq!(dropped, 0);
        (sock.got.into_inner(), frames.get(), sock.writes.get())
    }

    /// Copied and shared frames go out in the order they were pushed,
    /// whole, however the socket splits the writes; every frame is
    /// reported written once, and nothing stays pending.
    #[test]
    fn copied_and_shared_frames_keep_their_order_through_partial_writes() {
        for per_write in [1, 7, 100, 1 << 20] {
            let out = open_queue();
            let now = Instant::now();
            let mut want = Vec::new();
            for i in 0..50u8 {
                let frame = vec![i; 1 + usize::from(i % 13)];
                if i % 5 == 0 {
                    out.push(Bytes::from(frame.clone()), now, None);
                } else {
                    out.push_copy(&frame, now, None);
                }
                want.extend_from_slice(&frame);
            }
            assert_eq!(out.len(), 50);
            let (got, frames, _) = drain(&out, per_write);
            assert_eq!(got, want, "{per_write} bytes a write");
            assert_eq!(frames, 50, "{per_write} bytes a write");
            assert_eq!(out.pending(), (0, 0), "{per_write} bytes a write");
        }
    }

    /// A copied frame is charged to the budget exactly as a shared one.
    #[test]
    fn a_copied_frame_costs_the_budget_what_a_shared_one_does() {
        let (a, b) = (open_queue(), open_queue());
        let now = Instant::now();
        for len in [1usize, 16, 100, 128] {
            a.push_copy(&vec![1; len], now, None);
            b.push(Bytes::from(vec![1; len]), now, None);
            assert_eq!(a.pending(), b.pending());
        }
    }

    /// Many small frames go out as few large buffers: a chunk is closed at
    /// its bound, and the writer sends chunks, not one iovec per frame.
    #[test]
    fn copied_frames_are_written_in_chunks() {
        let out = open_queue();
        let now = Instant::now();
        let frame = [3u8; 40];
        let n = 4000; // 160,000 bytes: three chunks
        for _ in 0..n {
            out.push_copy(&frame, now, None);
        }
        out.close_chunk();
        let chunks = out.queue.borrow().len();
        assert!((3..=4).contains(&chunks), "{chunks} chunks");
        assert!(out.queue.borrow().iter().all(|(b, _)| b.len() <= CHUNK_MAX));
        let (got, frames, writes) = drain(&out, usize::MAX);
        assert_eq!((got.len(), frames), (n * 40, n as u64));
        assert_eq!(writes, 1, "one writev for every chunk");
    }

    /// Closing drops and counts copied frames too, and an idle queue gives
    /// its open chunk back.
    #[test]
    fn closing_counts_copied_frames_and_idle_queues_give_their_chunk_back() {
        let out = open_queue();
        let now = Instant::now();
        out.push_copy(b"abc", now, None);
        out.push(Bytes::from_static(b"defg"), now, None);
        out.push_copy(b"hi", now, None);
        assert_eq!(out.close_now(), 3);
        assert_eq!(out.push_copy(b"x", now, None).0, Push::Closed);

        let idle = open_queue();
        idle.push_copy(b"abc", now, None);
        let _ = drain(&idle, usize::MAX);
        assert!(idle.open.borrow().capacity() > 0, "room kept while busy");
        idle.trim_idle();
        assert_eq!(idle.open.borrow().capacity(), 0, "given back when idle");
    }

    /// A socket that takes `first` bytes in its first write and fails the
    /// next, as a peer that hangs up mid-write.
    struct HangsUp {
        first: usize,
        writes: Cell<usize>,
        fd: std::os::unix::net::UnixStream,
    }

    impl Stream for HangsUp {
        async fn read(&self, buf: bytes::BytesMut) -> (io::Result<usize>, bytes::BytesMut) {
            (Ok(0), buf)
        }
        async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
            let n = self.writes.replace(self.writes.get() + 1);
            if n == 0 {
                let all: usize = bufs.iter().map(Bytes::len).sum();
                (Ok(self.first.min(all)), bufs)
            } else {
                (Err(io::ErrorKind::BrokenPipe.into()), bufs)
            }
        }
        fn raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    /// A frame of `len` bytes after its length prefix.
    fn framed(len: usize) -> Vec<u8> {
        let mut f = (len as u32).to_be_bytes().to_vec();
        f.resize(LEN_PREFIX + len, 9);
        f
    }

    /// When the connection fails after a write that took part of a chunk
    /// of copied frames, the frames it took whole went out: they are
    /// reported written, and only the rest are counted dropped.
    #[test]
    fn frames_a_failed_connection_took_whole_are_not_counted_dropped() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        // Ten copied frames of 104 bytes (one chunk), then a shared one.
        // The first write ends 10 bytes into the fourth frame.
        for (first, sent) in [(3 * 104 + 10, 3), (0, 0), (3, 0), (104, 1), (10 * 104, 10)] {
            let out = open_queue();
            let now = Instant::now();
            for _ in 0..10 {
                out.push_copy(&framed(100), now, None);
            }
            out.push(Bytes::from(framed(100)), now, None);
            let (fd, _other) = std::os::unix::net::UnixStream::pair().expect("socket pair");
            let sock = HangsUp {
                first,
                writes: Cell::new(0),
                fd,
            };
            let written = Cell::new(0u64);
            let dropped = rt.block_on(write_loop(&out, &sock, |w| {
                written.set(written.get() + w.frames)
            }));
            assert_eq!(dropped, 11 - sent, "{first} bytes taken: dropped");
            assert_eq!(written.get(), sent as u64, "{first} bytes taken: written");
            assert_eq!(
                out.pending().0,
                0,
                "{first} bytes taken: nothing left pending"
            );
        }
        assert_eq!(frames_taken(&framed(5), 0, 9), (1, 0));
        // Across writes: a frame begun in one ends in the next.
        let buf: Vec<u8> = [framed(6), framed(2), framed(1)].concat();
        assert_eq!(frames_taken(&buf, 0, 4), (0, 6));
        assert_eq!(frames_taken(&buf[4..], 6, 6), (1, 0));
        assert_eq!(frames_taken(&buf[10..], 0, 7), (1, 4));
        assert_eq!(frames_taken(&buf[17..], 4, 4), (1, 0));
    }
}
