//! A shard's inbox: what other shards hand it (deliveries, events, frames
//! for its peer links, control), bounded in bytes.
//!
//! The channel itself is a flume channel that a sender never waits on: a
//! shard must never block on another. The bound is kept by the producers
//! instead. Every message that carries a frame is counted at its size
//! ([`ShardMsg::cost`]); a send that leaves the inbox over its bound
//! (`shard_inbox_bytes`) tells the message's producer to wait ([`Gate`])
//! until the receiving shard has drained it to half. A paused or
//! overloaded shard therefore holds at most its bound plus one message per
//! producer, and the publishers feeding it are slowed by TCP, not queued in
//! memory. Control messages (reload, shutdown, link closes) cost nothing and
//! always go through.

use super::flow::Gate;
use super::shared::ShardMsg;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

/// Per-message bookkeeping counted on top of a message's frame: the
/// message itself in the channel and the frame's buffer header.
pub const MSG_OVERHEAD: usize = 64 + std::mem::size_of::<ShardMsg>();

/// One shard's inbox (the sending side and the accounting).
#[derive(Debug)]
pub struct Inbox {
    tx: flume::Sender<ShardMsg>,
    /// Bytes of messages sent and not yet taken.
    bytes: AtomicUsize,
    /// The bound (`shard_inbox_bytes`), changed by reloads.
    limit: AtomicUsize,
    /// Producers told to wait for this inbox to drain.
    waiters: Mutex<Vec<Arc<Gate>>>,
    /// True while `waiters` may be non-empty (read without the lock).
    has_waiters: AtomicBool,
}

impl Inbox {
    /// An inbox bounded at `limit` bytes, and its receiving end.
    pub fn new(limit: usize) -> (Self, flume::Receiver<ShardMsg>) {
        let (tx, rx) = flume::unbounded();
        let inbox = Self {
            tx,
            bytes: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            waiters: Mutex::new(Vec::new()),
            has_waiters: AtomicBool::new(false),
        };
        (inbox, rx)
    }

    /// Sends `msg`. When the inbox is then over its bound, the message's
    /// producer (if any) waits until it has drained to half. Returns false
    /// when the receiving shard has exited (the message is dropped).
    pub fn send(&self, msg: ShardMsg) -> bool {
        let cost = msg.cost();
        if cost == 0 {
            return self.tx.send(msg).is_ok();
        }
        let now = self.bytes.fetch_add(cost, SeqCst) + cost;
        let over = (now > self.limit.load(SeqCst))
            .then(|| msg.producer().cloned())
            .flatten();
        if self.tx.send(msg).is_err() {
            self.bytes.fetch_sub(cost, SeqCst);
            return false;
        }
        if let Some(p) = over {
            self.hold(&p);
        }
        true
    }

    /// The receiving shard took a message that cost `cost`.
    pub fn taken(&self, cost: usize) {
        if cost == 0 {
            return;
        }
        let left = self.bytes.fetch_sub(cost, SeqCst) - cost;
        if self.has_waiters.load(SeqCst) && left <= self.limit.load(SeqCst) / 2 {
            self.release_all();
        }
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes.load(SeqCst)
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }

    /// The bound in force, in bytes (`shard_inbox_bytes`).
    pub fn limit(&self) -> usize {
        self.limit.load(SeqCst)
    }

    /// Sets the bound (a reload); producers waiting go on if it now allows.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, SeqCst);
        if self.bytes() <= limit / 2 {
            self.release_all();
        }
    }

    fn hold(&self, p: &Arc<Gate>) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if w.iter().any(|g| Arc::ptr_eq(g, p)) {
            return;
        }
        p.hold();
        w.push(p.clone());
        self.has_waiters.store(true, SeqCst);
        // The receiver may have drained it before seeing `has_waiters`: look
        // again now that it is set (one of the two sees the other).
        if self.bytes.load(SeqCst) <= self.limit.load(SeqCst) / 2 {
            for g in w.drain(..) {
                g.release();
            }
            self.has_waiters.store(false, SeqCst);
        }
    }

    fn release_all(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for g in w.drain(..) {
            g.release();
        }
        self.has_waiters.store(false, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn deliver(len: usize, g: &Arc<Gate>) -> ShardMsg {
        let mut frames = crate::server::shared::FrameBatch::default();
        frames.push_shared(Bytes::from(vec![0u8; len]), None);
        ShardMsg::DeliverBatch {
            frames,
            producer: Some(g.clone()),
        }
    }

    #[test]
    fn over_the_bound_the_producer_waits_until_half_drained() {
        let per = 1000 + MSG_OVERHEAD;
        let (inbox, rx) = Inbox::new(4 * per);
        let g = Gate::new();
        for _ in 0..4 {
            assert!(inbox.send(deliver(1000, &g)));
            assert!(g.is_open(), "at or under the bound");
        }
        assert!(inbox.send(deliver(1000, &g)));
        assert!(!g.is_open(), "over the bound: wait");
        assert!(inbox.send(deliver(1000, &g)));
        assert_eq!(g.waits(), 1, "held once");
        assert!(inbox.send(ShardMsg::Shutdown), "control is free");
        assert_eq!(inbox.bytes(), 6 * per);
        for taken in 1..=4 {
            let m = rx.try_recv().expect("queued");
            inbox.taken(m.cost());
            let open = 6 - taken <= 2;
            assert_eq!(g.is_open(), open, "open at half: after {taken} taken");
        }
        assert_eq!(inbox.len(), 3);
        drop(rx);
        assert!(!inbox.send(deliver(10, &g)), "the shard is gone");
        assert_eq!(inbox.bytes(), 2 * per);
    }
}
