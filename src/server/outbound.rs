//! A connection's outbound queue and the writer task that drains it.
//!
//! Producers (the fan-out on this shard, messages from other shards) push
//! refcounted frames; nobody copies a frame per recipient. The queue is
//! bounded by `max_backlog` frames: a push that would pass it reports
//! [`Push::Full`] and the caller kills the connection as stuck. The writer
//! takes up to `messages_per_iter` frames per turn (at most [`MAX_IOV`]) and
//! hands them to one `writev`, owning the partial-write loop (tokio-uring
//! has no `writev_all`).

use super::io::Stream;
use bytes::{Buf, Bytes};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Instant;
use tokio::sync::Notify;

/// Most frames in one `writev`: the kernel refuses more than `UIO_MAXIOV`
/// (1024) buffers with EINVAL. std's vectored writes (the epoll backend)
/// quietly write only the first 1024; tokio-uring passes the whole vector
/// on, so a batch of `messages_per_iter` > 1024 frames would fail the
/// write and close the connection.
pub const MAX_IOV: usize = 1024;

/// Slots of a queue (or a write batch) kept once it is empty again; more
/// is given back.
const KEEP_CAPACITY: usize = 64;

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued for the writer.
    Queued,
    /// The queue is at `max_backlog`: the frame was not queued.
    Full,
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

/// The queue, its wake-up and the facts the sweep needs.
#[derive(Debug)]
pub struct Outbound {
    queue: RefCell<VecDeque<Bytes>>,
    notify: Notify,
    phase: Cell<Phase>,
    /// When the last write completed (or the connection opened).
    last_tx: Cell<Instant>,
}

impl Outbound {
    /// An empty, open queue.
    pub fn new(now: Instant) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            notify: Notify::new(),
            phase: Cell::new(Phase::Open),
            last_tx: Cell::new(now),
        }
    }

    /// Queues `frame` unless the queue holds `max_backlog` frames already.
    #[inline]
    pub fn push(&self, frame: Bytes, max_backlog: usize) -> Push {
        if self.phase.get() != Phase::Open {
            return Push::Closed;
        }
        let mut q = self.queue.borrow_mut();
        if q.len() >= max_backlog {
            return Push::Full;
        }
        let was_empty = q.is_empty();
        q.push_back(frame);
        if was_empty {
            self.notify.notify_one();
        }
        Push::Queued
    }

    /// Queues `frame` (an error or the last words) and then closes after
    /// flushing; ignores the backlog bound. Returns false if already closing.
    pub fn drain_with(&self, last: Option<Bytes>) -> bool {
        if self.phase.get() != Phase::Open {
            return false;
        }
        if let Some(f) = last {
            self.queue.borrow_mut().push_back(f);
        }
        self.phase.set(Phase::Draining);
        self.notify.notify_one();
        true
    }

    /// Closes at once; returns how many queued frames were dropped.
    pub fn close_now(&self) -> usize {
        let dropped = if self.phase.get() == Phase::Closed {
            0
        } else {
            let mut q = self.queue.borrow_mut();
            let n = q.len();
            q.clear();
            n
        };
        self.phase.set(Phase::Closed);
        self.notify.notify_one();
        dropped
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.queue.borrow().len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    /// When the last write completed.
    pub fn last_tx(&self) -> Instant {
        self.last_tx.get()
    }

    fn take_batch(&self, batch: &mut Vec<Bytes>, max: usize) {
        let mut q = self.queue.borrow_mut();
        let n = q.len().min(max.clamp(1, MAX_IOV));
        batch.extend(q.drain(..n));
        if q.is_empty() && q.capacity() > KEEP_CAPACITY {
            // A burst is over: do not keep its room for every idle member.
            *q = VecDeque::new();
        }
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

/// Drains `out` into `stream` until the connection closes. `on_write` is
/// told what each turn wrote; `batch_max` gives messages_per_iter (read
/// each turn so a reload applies). Shuts the stream down on the way out and
/// returns how many frames a failed write left unsent: those of the batch
/// being written that did not go out whole, and what was still queued.
pub async fn write_loop<S: Stream>(
    out: &Outbound,
    stream: &S,
    batch_max: impl Fn() -> usize,
    on_write: impl Fn(Written),
) -> usize {
    let mut dropped = 0;
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        out.take_batch(&mut batch, batch_max());
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
            dropped = batch.len();
            break;
        }
        let frames = batch.len() as u64;
        match write_all(stream, batch).await {
            Ok((bytes, b)) => {
                batch = b;
                if batch.capacity() > KEEP_CAPACITY {
                    batch = Vec::new();
                }
                out.last_tx.set(Instant::now());
                on_write(Written { frames, bytes });
            }
            Err(unsent) => {
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

/// Writes every byte of `bufs`, looping over partial writes. Returns the
/// byte count and the emptied vector (for reuse); on a failed write, how
/// many frames did not go out whole.
async fn write_all<S: Stream>(
    stream: &S,
    mut bufs: Vec<Bytes>,
) -> Result<(u64, Vec<Bytes>), usize> {
    let mut total = 0u64;
    while !bufs.is_empty() {
        let (res, mut b) = stream.writev(bufs).await;
        let mut n = match res {
            Ok(n) if n > 0 => n,
            // An error, or no progress (WriteZero): the connection is gone.
            _ => return Err(b.len()),
        };
        total += n as u64;
        let mut done = 0;
        for buf in b.iter_mut() {
            if n >= buf.len() {
                n -= buf.len();
                done += 1;
            } else {
                buf.advance(n);
                break;
            }
        }
        b.drain(..done);
        bufs = b;
    }
    Ok((total, bufs))
}
