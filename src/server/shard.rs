//! One shard: a thread with its own single-threaded runtime that owns the
//! connections it accepted (and the peer links assigned to it), the local
//! member lists of its groups, and an inbox for other shards' traffic.
//!
//! Fan-out happens here: a publish is encoded once, queued by reference to
//! each local member, and sent once to each other shard with members.
//! Whatever a frame's handling queues is charged to its *producer* (the
//! connection whose input it is, see [`Shard::producing`]): a full queue of
//! a slow reader makes that producer wait (`flow`), and the shard's watch
//! closes readers that stop accepting anything while producers wait.

use super::conn::Conn;
use super::flow::Gate;
use super::io::Listener;
use super::membership::{Batches, Members};
use super::outbound::{Push, COPY_MAX};
use super::shared::{FrameBatch, ShardMsg, Shared};
use super::Live;
use crate::protocol::{
    encode_group_message_raw, group_message_parts, group_of, ErrorCode, Frame, FrameType,
    GroupMessage, MemberId, LEN_PREFIX,
};
use crate::router::{bits, Group};
use crate::stats::ShardStats;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Why a connection is being closed, for counting what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// Its queue was full and its socket accepted nothing for stuck_timeout.
    Stuck,
    /// Nothing received for idle_timeout (or no HELLO in time).
    Idle,
    /// It sent bad input.
    Protocol,
    /// It closed, or the server is shutting down.
    Closed,
    /// A peer link whose node left the cluster (said `NODE_LEAVING`): what
    /// was queued to it was for members it no longer has.
    Left,
}

/// A shard's state. Lives in an `Rc` on its own thread.
pub struct Shard {
    /// This shard's index.
    pub index: usize,
    /// What all shards share.
    pub shared: Arc<Shared>,
    /// True on the io_uring backend.
    pub uring: bool,
    /// The live settings, replaced on reload.
    pub live: Cell<Live>,
    /// Connections accepted here, by sequence number.
    pub conns: RefCell<HashMap<u64, Rc<Conn>>>,
    /// Local members of each group (shard-local; the hot path's list),
    /// keyed by the interned group (looked up by name).
    pub(super) members: RefCell<HashMap<Group, Members, crate::router::NameHasher>>,
    /// Membership changes waiting for batched members.
    pub(super) batches: Batches,
    /// Group messages routed to other shards and not yet sent, by
    /// destination shard, each with the producer it is charged to (see
    /// [`Shard::flush_outgoing`]).
    outgoing: RefCell<Vec<Outgoing>>,
    /// Set while `outgoing` holds anything.
    outgoing_any: Cell<bool>,
    /// Join acknowledgements waiting for the cluster.
    pub(super) acks: super::membership::Acks,
    next_seq: Cell<u64>,
    /// Set when this shard's shutdown has begun.
    pub stopping: Cell<bool>,
    /// Connection writers still running: at shutdown the shard waits for
    /// them, so that each counts what it was writing when it was killed.
    pub writers: Cell<usize>,
    /// The cluster's per-shard state (peer links living on this shard).
    pub links: crate::server::peers::ShardLinks,
    /// A coarse clock for the hot path: set once per read and per inbox
    /// batch ([`Shard::tick`]), read per push.
    clock: Cell<Instant>,
    /// The producer of whatever is queued now (see [`Shard::producing`]).
    producer: RefCell<Option<Arc<Gate>>>,
    /// Producer turns open (see [`Shard::producing`]): while one is,
    /// frames for other shards wait in `outgoing` for its end.
    turns: Cell<u32>,
    /// Set while a connection's input is being routed: the writers it
    /// fills are woken at the end of its read (see [`Shard::wake_owed`]).
    deferring: Cell<bool>,
    /// Connections (by sequence number) whose writers are owed a wake.
    owed: RefCell<Vec<u64>>,
    /// Frames queued by reference (one iovec each) since the owed writers
    /// were last woken (see [`Shard::writes_are_small`]).
    shared_pushes: Cell<usize>,
    /// Where a small frame for local members is encoded before it is
    /// copied into their queues (kept: no allocation, no clearing of a
    /// stack buffer per message).
    scratch: Cell<Vec<u8>>,
    /// Connections whose queues have producers waiting (the stuck watch's).
    congested: RefCell<Vec<Rc<Conn>>>,
    /// Wakes the stuck watch.
    watch: Notify,
}

/// A batch for another shard being filled, and the producer whose turns
/// filled it: it leaves charged to that producer, before anything another
/// producer routes there.
#[derive(Default)]
struct Outgoing {
    batch: FrameBatch,
    producer: Option<Arc<Gate>>,
}

/// Whether `a` and `b` are the same producer.
fn same_producer(a: Option<&Arc<Gate>>, b: Option<&Arc<Gate>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Restores the previous producer when dropped (see [`Shard::producing`]).
pub struct Producing<'a> {
    shard: &'a Shard,
    prev: Option<Arc<Gate>>,
    /// Leave this producer's batches for other shards open (see
    /// [`Shard::producing_on`]).
    keep: bool,
}

impl Drop for Producing<'_> {
    fn drop(&mut self) {
        // What this producer routed to other shards goes now, charged to
        // it, unless its caller sends it later.
        if !self.keep {
            self.shard.flush_outgoing();
        }
        self.shard.turns.set(self.shard.turns.get() - 1);
        *self.shard.producer.borrow_mut() = self.prev.take();
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // Frames a read left in the batches when the runtime stopped: sent,
        // or counted as dropped at shutdown if their shard has exited.
        self.flush_outgoing();
    }
}

impl Shard {
    /// A new shard with no connections.
    pub fn new(index: usize, shared: Arc<Shared>, uring: bool) -> Rc<Self> {
        let live = shared.live();
        Rc::new(Self {
            index,
            shared,
            uring,
            live: Cell::new(live),
            conns: RefCell::new(HashMap::new()),
            members: RefCell::new(HashMap::default()),
            batches: Batches::default(),
            outgoing: RefCell::new(Vec::new()),
            outgoing_any: Cell::new(false),
            turns: Cell::new(0),
            deferring: Cell::new(false),
            owed: RefCell::new(Vec::new()),
            shared_pushes: Cell::new(0),
            scratch: Cell::new(Vec::with_capacity(FrameBatch::PACK_MAX)),
            acks: Default::default(),
            next_seq: Cell::new(1),
            stopping: Cell::new(false),
            writers: Cell::new(0),
            links: Default::default(),
            clock: Cell::new(Instant::now()),
            producer: RefCell::new(None),
            congested: RefCell::new(Vec::new()),
            watch: Notify::new(),
        })
    }

    /// This shard's counters.
    #[inline]
    pub fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.index]
    }

    /// A fresh connection sequence number.
    pub fn next_seq(&self) -> u64 {
        let s = self.next_seq.get();
        self.next_seq.set(s + 1);
        s
    }

    /// Reads the clock and keeps it for the pushes that follow.
    pub fn tick(&self) -> Instant {
        let now = Instant::now();
        self.clock.set(now);
        now
    }

    /// Charges what is queued until the guard drops to `producer` (None:
    /// nobody, e.g. events of a lost node). Must not be held across an
    /// `.await`: other tasks of the shard queue for their own producers.
    pub fn producing(&self, producer: Option<Arc<Gate>>) -> Producing<'_> {
        self.producing_as(producer, false)
    }

    /// As [`Shard::producing`], for one of several turns of the same
    /// producer (a connection's read, `messages_per_iter` frames at a
    /// time): what it routes to other shards stays in this shard's batches
    /// across the turns, and leaves when they are full, when another
    /// producer routes there or starts a turn, when the shard ends its
    /// inbox turn, or when the caller calls [`Shard::flush_outgoing`] (at
    /// the end of the read). A shard with members of a busy group then
    /// gets its frames a read at a time, not `messages_per_iter` at a
    /// time, and writes them in fewer, larger writes.
    pub fn producing_on(&self, producer: Option<Arc<Gate>>) -> Producing<'_> {
        self.producing_as(producer, true)
    }

    fn producing_as(&self, producer: Option<Arc<Gate>>, keep: bool) -> Producing<'_> {
        // Another producer's frames leave before anything of this one.
        self.flush_outgoing_but(Some(producer.as_ref()));
        self.turns.set(self.turns.get() + 1);
        let prev = self.producer.replace(producer);
        Producing {
            shard: self,
            prev,
            keep,
        }
    }

    /// Queues a group message for shard `s`'s members: it leaves with the
    /// others this producer routes there in its turn (a connection's whole
    /// read), in one inbox message (see [`Shard::flush_outgoing`]).
    fn queue_deliver(
        &self,
        s: usize,
        msg: &GroupMessage<'_>,
        shared: Option<&Bytes>,
        seq: Option<u64>,
    ) {
        self.in_batch_for(s, |batch| match shared {
            Some(frame) => batch.push_shared(frame.clone(), seq),
            None => batch.push_packed(msg, seq),
        });
    }

    /// Queues `frame` for peer `peer`'s link `seq`, which lives on shard
    /// `s`: it leaves with this producer's other frames for `s` at the end
    /// of its turn, in one inbox message. Outside a producer's turn it
    /// leaves at once. Returns false when it was not queued (the caller
    /// sends it alone).
    pub fn queue_peer(&self, s: usize, peer: usize, seq: u64, frame: Bytes) -> Result<(), Bytes> {
        if self.turns.get() == 0 {
            return Err(frame);
        }
        self.in_batch_for(s, |batch| batch.push_peer(peer, seq, frame));
        Ok(())
    }

    /// As [`Shard::queue_peer`], a small FORWARD encoded straight into the
    /// batch (see [`FrameBatch::push_peer_packed`]); false outside a
    /// producer's turn (nothing queued).
    pub fn queue_peer_packed(
        &self,
        s: usize,
        peer: usize,
        seq: u64,
        msg: &GroupMessage<'_>,
    ) -> bool {
        if self.turns.get() == 0 {
            return false;
        }
        self.in_batch_for(s, |batch| batch.push_peer_packed(peer, seq, msg));
        true
    }

    /// Adds to the current producer's batch for shard `s` with `f`; sends
    /// the batch when full.
    fn in_batch_for(&self, s: usize, f: impl FnOnce(&mut FrameBatch)) {
        let holds = {
            let producer = self.producer.borrow();
            let mut out = self.outgoing.borrow_mut();
            if out.len() <= s {
                out.resize_with(self.shared.shards(), Outgoing::default);
            }
            let slot = &mut out[s];
            if !slot.batch.is_empty() && !same_producer(slot.producer.as_ref(), producer.as_ref()) {
                // Another producer's frames go first, charged to it.
                self.send_slot(s, slot);
            }
            if slot.batch.holds_no_memory() {
                // A slot holds memory only while it is being filled: an
                // idle shard keeps none here (its spares are freed at the
                // sweep).
                slot.batch = self.shared.spares.take(self.index);
            }
            if slot.batch.is_empty() {
                slot.producer.clone_from(&producer);
            }
            f(&mut slot.batch);
            if slot.batch.full() {
                self.send_slot(s, slot);
                false
            } else {
                true
            }
        };
        if holds {
            self.outgoing_any.set(true);
        }
    }

    /// Sends slot `s`'s batch (not empty) to shard `s`, charged to the
    /// producer that filled it.
    fn send_slot(&self, s: usize, slot: &mut Outgoing) {
        let frames = std::mem::take(&mut slot.batch);
        let producer = slot.producer.take();
        self.shared
            .send(s, ShardMsg::DeliverBatch { frames, producer });
    }

    /// Sends what this shard routed to other shards since the last flush:
    /// one inbox message per shard, charged to the producer that filled
    /// it. Runs when a producer's turn ends (a connection's read: when the
    /// read is routed, see [`Shard::producing_on`]), when the shard ends an
    /// inbox turn, and before any other message leaves for another shard
    /// (so nothing overtakes a delivery routed before it).
    pub fn flush_outgoing(&self) {
        self.flush_outgoing_but(None);
    }

    /// As [`Shard::flush_outgoing`], keeping the batches of `kept` (a
    /// producer) open.
    fn flush_outgoing_but(&self, kept: Option<Option<&Arc<Gate>>>) {
        if !self.outgoing_any.get() {
            return;
        }
        let mut out = self.outgoing.borrow_mut();
        let mut left = false;
        for (s, slot) in out.iter_mut().enumerate() {
            if slot.batch.is_empty() {
                continue;
            }
            if kept.is_some_and(|p| same_producer(slot.producer.as_ref(), p)) {
                left = true;
            } else {
                self.send_slot(s, slot);
            }
        }
        self.outgoing_any.set(left);
    }

    /// Sends `msg` to shard `s`, after the deliveries routed before it.
    pub fn send_to(&self, s: usize, msg: ShardMsg) {
        self.flush_outgoing();
        self.shared.send(s, msg);
    }

    /// The current producer's gate (for a message to another shard).
    pub fn producer(&self) -> Option<Arc<Gate>> {
        self.producer.borrow().clone()
    }

    /// Queues `frame` to `conn` for the current producer; closes `conn` if
    /// it is stuck. Returns whether the frame was queued.
    #[inline]
    pub fn push(&self, conn: &Conn, frame: Bytes) -> bool {
        let producer = self.producer.borrow();
        self.push_from(conn, frame, self.clock.get(), producer.as_ref())
    }

    /// As [`Shard::push`], copying a small `frame` into `conn`'s queue
    /// (see [`Outbound::push_copy`]).
    #[inline]
    pub fn push_copy(&self, conn: &Conn, frame: &[u8]) -> bool {
        let producer = self.producer.borrow();
        self.copy_from(conn, frame, self.clock.get(), producer.as_ref())
    }

    #[inline]
    fn push_from(
        &self,
        conn: &Conn,
        frame: Bytes,
        now: Instant,
        producer: Option<&Arc<Gate>>,
    ) -> bool {
        let (verdict, wake) = conn.out.push_quiet(frame, now, producer);
        self.shared_pushes.set(self.shared_pushes.get() + 1);
        self.settle(conn, verdict, wake)
    }

    /// As [`Shard::push_from`], copying a small `frame` into `conn`'s
    /// queue (see [`Outbound::push_copy`]).
    #[inline]
    fn copy_from(
        &self,
        conn: &Conn,
        frame: &[u8],
        now: Instant,
        producer: Option<&Arc<Gate>>,
    ) -> bool {
        let (verdict, wake) = conn.out.push_copy(frame, now, producer);
        self.settle(conn, verdict, wake)
    }

    /// Wakes `conn`'s writer (now, or when the read is routed) if the push
    /// found its queue empty, and acts on the push's verdict.
    #[inline]
    fn settle(&self, conn: &Conn, verdict: Push, wake: bool) -> bool {
        if wake {
            if self.deferring.get() {
                self.owed.borrow_mut().push(conn.seq);
            } else {
                conn.out.wake();
            }
        }
        match verdict {
            Push::Queued => true,
            Push::Slow | Push::Suspect => {
                self.mark_congested(conn);
                true
            }
            Push::Closed => {
                ShardStats::add(&self.stats().dropped_closed, 1);
                false
            }
            Push::Stuck => {
                ShardStats::add(&self.stats().dropped_stuck, 1);
                self.kill(conn, Kill::Stuck);
                false
            }
        }
    }

    /// Routes what `f` queues with the writers' wakes held back until
    /// [`Shard::wake_owed`]: a reader routes a whole read this way (in
    /// turns of `messages_per_iter` frames, yielding between them to the
    /// shard's other readers), and each writer it filled then writes
    /// everything at once instead of a few frames per turn.
    pub fn deferring_wakes<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.deferring.replace(true);
        let r = f();
        self.deferring.set(was);
        r
    }

    /// Wakes every writer owed a wake (see [`Shard::deferring_wakes`]):
    /// when a reader has routed its read, before it waits for a full
    /// queue, at every inbox turn and sweep (so none waits longer).
    pub fn wake_owed(&self) {
        self.shared_pushes.set(0);
        let owed = std::mem::take(&mut *self.owed.borrow_mut());
        if owed.is_empty() {
            return;
        }
        let conns = self.conns.borrow();
        for seq in &owed {
            if let Some(c) = conns.get(seq) {
                c.out.wake();
            }
        }
        drop(conns);
        let mut o = self.owed.borrow_mut();
        if o.is_empty() && o.capacity() < 4096 {
            // Keep the room for the next read.
            *o = owed;
            o.clear();
        }
    }

    /// True when the writers owed a wake would each write few buffers:
    /// copied chunks, or a few frames each (many connections, a frame or
    /// two for each). Waking them later, with more, saves system calls;
    /// writers with many frames by reference each already make a large
    /// `writev`, and holding them back only adds latency (tuning.md,
    /// "A reader behind a backlog wakes its writers every few reads").
    pub fn writes_are_small(&self) -> bool {
        const FEW: usize = 64;
        self.shared_pushes.get() <= FEW * self.owed.borrow().len().max(1)
    }

    /// `conn`'s queue makes producers wait: watch it until it drains.
    pub(super) fn mark_congested(&self, conn: &Conn) {
        if conn.congested.replace(true) {
            return;
        }
        ShardStats::add(&self.stats().slow_readers, 1);
        if let Some(c) = self.conns.borrow().get(&conn.seq) {
            self.congested.borrow_mut().push(c.clone());
            self.watch.notify_one();
        }
    }

    /// Counts `n` messages `conn` could not deliver, under `why`.
    pub fn count_dropped(&self, conn: &Conn, why: Kill, n: u64) {
        if n == 0 {
            return;
        }
        let st = self.stats();
        let counter = match why {
            Kill::Stuck => &st.dropped_stuck,
            Kill::Idle => &st.dropped_idle,
            Kill::Protocol => &st.dropped_protocol,
            Kill::Closed => &st.dropped_closed,
            Kill::Left => &st.dropped_left,
        };
        ShardStats::add(counter, n);
        if let (super::conn::ConnRole::Peer(i), false) = (conn.role.get(), why == Kill::Left) {
            let peer = &self.shared.cluster.counters[i];
            // Counted once in the totals (under `why`); the peer's own
            // counter shows which link lost them.
            peer.dropped
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            peer.dropped_link_lost
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Closes `conn` now, dropping and counting what it had queued (the
    /// writer counts what it was writing, under the same reason).
    pub fn kill(&self, conn: &Conn, why: Kill) {
        let phase = conn.out.phase();
        let was_open = phase != super::outbound::Phase::Closed;
        if phase == super::outbound::Phase::Open {
            // A draining connection keeps the reason it is closing for.
            conn.closing_as(why);
        }
        let (pending, _) = conn.out.pending();
        let dropped = conn.out.close_now() as u64;
        self.count_dropped(conn, conn.closing_reason(), dropped);
        if was_open && why == Kill::Stuck {
            ShardStats::add(&self.stats().stuck_kills, 1);
            let budget = conn.out.budget();
            let after = budget.stuck_after;
            match conn.role.get() {
                super::conn::ConnRole::Peer(i) => {
                    let peer = self.shared.cluster.slot(i).map(|p| p.name);
                    tracing::error!(target: crate::logging::OPS, peer = ?peer, addr = %conn.addr, pending, dropped, ?after,
                        "peer link stuck: its queue is full and the peer accepted nothing for peer_stuck_timeout; closed (re-dialled after reconnect_interval)");
                }
                _ if crate::logging::STUCK_READER.allow() => {
                    tracing::warn!(conn = %conn.id, peer = %conn.addr, pending, dropped, ?after,
                    "reader stuck: its queue is full and it accepted nothing for stuck_timeout; closed")
                }
                _ => {}
            }
        }
        conn.shutdown();
    }

    /// Sends ERROR then closes `conn` once it is flushed.
    pub fn close_with_error(&self, conn: &Conn, code: ErrorCode, message: &str) {
        self.close_with_error_within(conn, code, message, self.live.get().idle_timeout);
    }

    /// As [`Shard::close_with_error`], forcing the close after `grace`.
    pub fn close_with_error_within(
        &self,
        conn: &Conn,
        code: ErrorCode,
        message: &str,
        grace: Duration,
    ) {
        let frame = Frame::Error {
            code,
            message: message.to_owned(),
        }
        .to_bytes();
        conn.close_gracefully(Some(frame), grace);
    }

    /// Queues `frame` (a DELIVER or DELIVER_SEQ of publish number `seq`)
    /// to every local member of group `name`, each in the form it asked
    /// for; returns how many took it, or `None` when the group has no
    /// member here (they left while the message was on its way: counted
    /// `left` by the caller; a push that failed was counted by
    /// [`Shard::push`]'s reasons). The other form is built at most once.
    #[inline]
    pub fn to_local_members(
        &self,
        name: &[u8],
        frame: Framed<'_>,
        seq: Option<u64>,
    ) -> Option<u64> {
        let list = std::cell::Ref::filter_map(self.members.borrow(), |m| m.get(name)).ok()?;
        Some(self.to_list(&list, frame, seq))
    }

    /// Queues `frame` to every member in `list`; returns how many took it.
    /// A small frame, or one for a single member, is copied into each
    /// member's queue (no allocation, see [`Outbound::push_copy`]); a
    /// larger one for many members is shared by reference.
    fn to_list(&self, list: &Members, frame: Framed<'_>, seq: Option<u64>) -> u64 {
        let now = self.clock.get();
        let producer = self.producer.borrow();
        let producer = producer.as_ref();
        let copy = |len: usize| len <= COPY_MAX || list.len() == 1;
        // Taken only for a message encoded here (a re-entrant call would
        // find it empty and grow its own).
        let mut scratch = Vec::new();
        let mut frame = match frame {
            Framed::Slice(f) if copy(f.len()) => Encoded::Slice(f),
            Framed::Slice(f) => Encoded::Shared(Bytes::copy_from_slice(f)),
            Framed::Shared(f) => Encoded::Shared(f),
            Framed::Message(msg) => {
                let len = msg.len();
                if copy(len) && len <= FrameBatch::PACK_MAX {
                    scratch = self.scratch.take();
                    scratch.clear();
                    msg.put(&mut scratch);
                    Encoded::Slice(&scratch)
                } else {
                    Encoded::Shared(msg.encode())
                }
            }
        };
        let framed_seq = is_seq_frame(frame.as_ref());
        let mut other: Option<Bytes> = None;
        let mut n = 0;
        let last = list.len().saturating_sub(1);
        for (i, m) in list.iter().enumerate() {
            // A member that asked for numbers gets the plain form only when
            // the message has none (from a peer that numbers nothing).
            let took = if m.seq == framed_seq || (m.seq && seq.is_none()) {
                match &mut frame {
                    Encoded::Slice(f) => self.copy_from(&m.conn, f, now, producer),
                    // The last member takes the frame itself: a frame for
                    // one member is never shared (sharing costs an
                    // allocation).
                    Encoded::Shared(f) if i == last => {
                        self.push_from(&m.conn, std::mem::take(f), now, producer)
                    }
                    Encoded::Shared(f) => self.push_from(&m.conn, f.clone(), now, producer),
                }
            } else {
                let f = other.get_or_insert_with(|| recode(frame.as_ref(), seq.filter(|_| m.seq)));
                self.push_from(&m.conn, f.clone(), now, producer)
            };
            n += u64::from(took);
        }
        if scratch.capacity() > 0 {
            self.scratch.set(scratch);
        }
        n
    }

    /// Delivers the group messages of a batch from another shard, looking
    /// each group up once for a run of messages to it; a message whose
    /// group has no member here any more (they left while it was on its
    /// way) is counted `left`.
    fn deliver_batch(&self, frames: &mut FrameBatch) -> u64 {
        use std::borrow::Borrow;
        let members = self.members.borrow();
        let mut last: Option<(&Group, &Members)> = None;
        let mut delivered = 0;
        frames.for_each_frame(|frame, seq| {
            let group = match &frame {
                Framed::Slice(f) => group_of(f),
                Framed::Shared(f) => group_of(f),
                Framed::Message(m) => Some(m.group),
            };
            let list = match (group, last) {
                (Some(g), Some((k, list))) if <Group as Borrow<[u8]>>::borrow(k) == g => Some(list),
                (Some(g), _) => {
                    last = members.get_key_value(g);
                    last.map(|(_, list)| list)
                }
                (None, _) => None,
            };
            match list {
                Some(list) => delivered += self.to_list(list, frame, seq),
                None => ShardStats::add(&self.stats().dropped_left, 1),
            }
        });
        delivered
    }

    /// Routes `msg` (a DELIVER or DELIVER_SEQ with publish number `seq`)
    /// to its group's members on every shard in `mask`, encoded once for
    /// the members here (into a scratch buffer when small: see `to_list`) and, when
    /// small, straight into each other shard's batch (see `FrameBatch`).
    /// Returns the local deliveries.
    pub fn to_shards(&self, msg: &GroupMessage<'_>, mask: u64, seq: Option<u64>) -> u64 {
        let here = mask & (1 << self.index) != 0;
        let others = mask & !(1 << self.index);
        let len = msg.len();
        // Small frames are packed into each other shard's batch; a large
        // one is encoded once and shared (see `FrameBatch`).
        let shared = (others != 0 && len > FrameBatch::PACK_MAX).then(|| msg.encode());
        for s in bits(others) {
            self.queue_deliver(s, msg, shared.as_ref(), seq);
        }
        if !here {
            return 0;
        }
        let frame = match shared {
            Some(f) => Framed::Shared(f),
            None => Framed::Message(msg),
        };
        self.to_local_members(msg.group, frame, seq)
            .unwrap_or_else(|| {
                // Its last member here left since the route was read.
                ShardStats::add(&self.stats().dropped_left, 1);
                0
            })
    }

    /// Routes a publish by `conn` to `group`: numbered, forwarded once per
    /// peer (from the one lookup of the group), encoded once for this
    /// shard and once into each other shard's batch (shared by reference
    /// among the members there).
    pub fn publish(&self, conn: &Conn, group: &[u8], payload: &[u8]) {
        let st = self.stats();
        ShardStats::bump(&st.publishes, 1);
        let route = self.shared.table.with_group(group, |e| {
            let e = e?;
            let seq = conn.pub_seqs.next(e, || Some(e.clone()));
            let remote = e.node_mask().any() || e.ghost_mask().any();
            if remote {
                // With the entry in hand: no second lookup of the group.
                crate::server::peers::forward(self, e, &conn.id, group, seq, payload);
            }
            Some((e.shard_mask(), e.seq_mask(), remote, seq))
        });
        let Some((shards, seq_shards, _, seq)) = route.filter(|r| r.0 != 0 || r.2) else {
            ShardStats::add(&st.unrouted, 1);
            return;
        };
        if shards != 0 {
            let numbered = seq_shards & shards != 0;
            let msg = GroupMessage {
                ty: if numbered {
                    FrameType::DELIVER_SEQ
                } else {
                    FrameType::DELIVER
                },
                group,
                sender: conn.id.as_bytes(),
                seq: numbered.then_some(seq),
                payload,
            };
            let n = self.to_shards(&msg, shards, Some(seq));
            ShardStats::bump(&st.deliveries, n);
        }
    }

    /// Sends `payload` from `sender` to member `to`, wherever it lives.
    pub fn send_direct(&self, sender: &MemberId, to: &MemberId, payload: &[u8]) {
        let parts = to.parts();
        match parts {
            // An id of an earlier start of this node: that member is gone.
            Some((node, _, _, inc))
                if node == self.shared.node.as_str() && inc != self.shared.incarnation =>
            {
                ShardStats::add(&self.stats().dropped_unknown_member, 1);
            }
            Some((node, shard, seq, _)) if node == self.shared.node.as_str() => {
                let frame = Frame::Direct {
                    sender: sender.clone(),
                    payload: Bytes::copy_from_slice(payload),
                }
                .to_bytes();
                if shard == self.index {
                    self.direct_local(seq, frame);
                } else if shard < self.shared.shards() {
                    let producer = self.producer();
                    let msg = ShardMsg::Direct {
                        seq,
                        frame,
                        producer,
                    };
                    self.send_to(shard, msg);
                } else {
                    ShardStats::add(&self.stats().dropped_unknown_member, 1);
                }
            }
            Some((node, _, _, _)) => {
                crate::server::peers::forward_direct(self, node, sender, to, payload)
            }
            None => ShardStats::add(&self.stats().dropped_unknown_member, 1),
        }
    }

    /// Queues a DIRECT frame to local connection `seq`.
    pub fn direct_local(&self, seq: u64, frame: Bytes) {
        let conn = self.conns.borrow().get(&seq).cloned();
        match conn.filter(|c| c.is_client()) {
            Some(c) => {
                self.push(&c, frame);
            }
            None => ShardStats::add(&self.stats().dropped_unknown_member, 1),
        }
    }

    /// Handles one message from another shard; false after `Shutdown`.
    pub fn handle_msg(self: &Rc<Self>, msg: ShardMsg) -> bool {
        let cost = msg.cost();
        match msg {
            ShardMsg::DeliverBatch {
                mut frames,
                producer,
            } => {
                let _p = self.producing(producer);
                frames.for_each_peer_frame(|peer, seq, frame| {
                    crate::server::peers::to_link(self, peer, seq, frame)
                });
                let delivered = self.deliver_batch(&mut frames);
                ShardStats::bump(&self.stats().deliveries, delivered);
                self.shared.spares.give_back(frames);
            }
            ShardMsg::Event {
                frame,
                seq,
                producer,
            } => {
                let _p = self.producing(producer);
                if let Some(g) = group_of(&frame) {
                    self.membership_changed(g, &frame, seq);
                }
            }
            ShardMsg::Direct {
                seq,
                frame,
                producer,
            } => {
                let _p = self.producing(producer);
                self.direct_local(seq, frame);
            }
            ShardMsg::Cluster(m) => crate::server::peers::handle_shard_msg(self, m),
            ShardMsg::Reload(live) => self.reload(live),
            ShardMsg::Stall(d) => std::thread::sleep(d),
            ShardMsg::Inspect(f) => (f.0)(self),
            ShardMsg::Adopt(stream, addr) => self.adopt(stream, addr),
            ShardMsg::Shutdown => {
                self.begin_shutdown();
                return false;
            }
        }
        self.shared.inboxes[self.index].taken(cost);
        true
    }

    /// New live settings: every connection's budget follows.
    fn reload(&self, live: Live) {
        self.live.set(live);
        for c in self.conns.borrow().values() {
            c.apply_budget(&live);
        }
    }

    /// Stops accepting, tells every connection the server is going away and
    /// closes each once flushed (bounded by the sweep's deadline).
    pub fn begin_shutdown(&self) {
        if self.stopping.replace(true) {
            return;
        }
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        for c in conns {
            self.close_with_error(&c, ErrorCode::SHUTTING_DOWN, "server shutting down");
        }
    }

    /// Handles the inbox until `Shutdown` (or every sender is gone).
    pub async fn inbox_loop(self: Rc<Self>, rx: flume::Receiver<ShardMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            self.tick();
            if !self.handle_msg(msg) {
                return self.count_leftovers(&rx);
            }
            // Take what else is waiting without going back to the runtime,
            // up to messages_per_iter in all, then yield so connections (and
            // their writers) get their turn.
            for _ in 1..self.live.get().messages_per_iter {
                let Ok(m) = rx.try_recv() else { break };
                if !self.handle_msg(m) {
                    return self.count_leftovers(&rx);
                }
            }
            // The writes this batch woke go to the kernel now, not when
            // the shard next has nothing to do.
            self.flush_outgoing();
            self.wake_owed();
            super::io::submit_pending(self.uring);
            tokio::task::yield_now().await;
        }
    }

    /// After `Shutdown`: counts the messages still in the inbox, which
    /// will never be handled (and those that come later are counted by
    /// their sender, see [`Shared::send`]).
    fn count_leftovers(&self, rx: &flume::Receiver<ShardMsg>) {
        let mut n = 0;
        while let Ok(m) = rx.try_recv() {
            n += m.messages();
            self.shared.inboxes[self.index].taken(m.cost());
        }
        ShardStats::add(&self.stats().dropped_shutdown, n);
        if n > 0 {
            tracing::warn!(
                shard = self.index,
                messages = n,
                "shutdown: messages still between shards dropped"
            );
        }
    }

    /// Accepts connections on `listener` until shutdown.
    pub async fn accept_loop(self: Rc<Self>, listener: Rc<Listener>) {
        while !self.stopping.get() {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    if self.stopping.get() {
                        break;
                    }
                    self.place(stream, addr);
                }
                Err(e) if self.stopping.get() => {
                    tracing::debug!(error = %e, "accept ended at shutdown");
                    break;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    if crate::logging::ACCEPT_FAILED.allow() {
                        tracing::warn!(error = %e, shard = self.index, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves an accepted connection here, or hands it to the shard whose
    /// turn it is (see [`Shared::place`]).
    fn place(self: &Rc<Self>, stream: super::io::AnyStream, addr: std::net::SocketAddr) {
        let to = self.shared.place();
        if to == self.index {
            return super::conn::spawn(self.clone(), stream, addr);
        }
        // The runtime's socket object stays here: the other shard gets
        // the socket itself, as a second descriptor.
        // SAFETY: the descriptor is owned by `stream`, alive for this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.raw_fd()) };
        match fd.try_clone_to_owned() {
            Ok(fd) => {
                drop(stream);
                self.send_to(to, ShardMsg::Adopt(fd.into(), addr));
            }
            // Out of descriptors: serve it here rather than lose it.
            Err(_) => super::conn::spawn(self.clone(), stream, addr),
        }
    }

    /// Serves a connection another shard accepted (see [`Shard::place`]).
    fn adopt(self: &Rc<Self>, stream: std::net::TcpStream, addr: std::net::SocketAddr) {
        if self.stopping.get() {
            return;
        }
        match super::io::AnyStream::from_std(stream, self.uring) {
            Ok(s) => super::conn::spawn(self.clone(), s, addr),
            Err(e) => {
                if crate::logging::ACCEPT_FAILED.allow() {
                    tracing::warn!(error = %e, shard = self.index, "cannot serve a handed-over connection");
                }
            }
        }
    }

    /// Periodic upkeep: keepalives, idle timeouts, handshake deadlines,
    /// close deadlines, and the queue gauges.
    pub async fn sweep_loop(self: Rc<Self>) {
        loop {
            let live = self.live.get();
            let tick = (live.keepalive_interval.min(live.idle_timeout) / 4)
                .min(live.handshake_timeout / 4)
                .clamp(Duration::from_millis(10), Duration::from_millis(500));
            tokio::time::sleep(tick).await;
            let now = self.tick();
            let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
            let (mut frames, mut bytes, mut max_bytes) = (0, 0, 0);
            // A backstop: a reader's task ended before it woke what it
            // filled.
            self.wake_owed();
            self.shared.spares.drop_spares(self.index);
            for c in conns {
                c.sweep(&self, now, &live);
                c.out.trim_idle();
                let (f, b) = c.out.pending();
                frames += f;
                bytes += b;
                max_bytes = max_bytes.max(b);
                if let super::conn::ConnRole::Peer(i) = c.role.get() {
                    if self.links.get_if(i, c.seq).is_some() {
                        let pc = &self.shared.cluster.counters[i];
                        ShardStats::set(&pc.queued_frames, f as u64);
                        ShardStats::set(&pc.queued_bytes, b as u64);
                    }
                }
            }
            let st = self.stats();
            ShardStats::set(&st.queued_frames, frames as u64);
            ShardStats::set(&st.queued_bytes, bytes as u64);
            ShardStats::set(&st.max_queued_bytes, max_bytes as u64);
        }
    }

    /// Closes readers whose queue is full (or keeps producers waiting) and
    /// whose socket accepted nothing for their budget's `stuck_after`;
    /// forgets queues that have drained.
    ///
    /// Before closing anyone it lets the shard's other work run (twice
    /// round the task queue: the completions of writes that did go out are
    /// dispatched, then their writers run), and closes only those still
    /// overdue: a shard too busy to write must not blame its readers.
    pub async fn stuck_watch(self: Rc<Self>) {
        loop {
            if self.congested.borrow().is_empty() {
                self.watch.notified().await;
                continue;
            }
            let live = self.live.get();
            let least = live
                .client_budget
                .stuck_after
                .min(live.peer_budget.stuck_after);
            let tick = (least / 8).clamp(Duration::from_millis(5), Duration::from_millis(50));
            tokio::time::sleep(tick).await;
            let now = self.tick();
            let list = std::mem::take(&mut *self.congested.borrow_mut());
            let (mut overdue, mut keep) = (Vec::new(), Vec::with_capacity(list.len()));
            for c in list {
                if c.out.phase() != super::outbound::Phase::Open || !c.out.pressed() {
                    c.congested.set(false);
                } else if c.out.overdue(now) {
                    overdue.push(c);
                } else {
                    keep.push(c);
                }
            }
            if !overdue.is_empty() {
                super::io::submit_pending(self.uring);
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                let now = self.tick();
                for c in overdue {
                    if c.out.overdue(now) {
                        c.congested.set(false);
                        self.kill(&c, Kill::Stuck);
                    } else {
                        keep.push(c);
                    }
                }
            }
            self.congested.borrow_mut().extend(keep);
        }
    }
}

/// True when `frame` is a DELIVER_SEQ.
#[inline]
fn is_seq_frame(frame: &[u8]) -> bool {
    frame.get(LEN_PREFIX) == Some(&FrameType::DELIVER_SEQ.0)
}

/// `frame` (a DELIVER or DELIVER_SEQ built by this server) in the other
/// form: DELIVER_SEQ with `seq` when set, else DELIVER. One copy of the
/// payload, made only for a shard whose members asked for both forms.
fn recode(frame: &[u8], seq: Option<u64>) -> Bytes {
    match group_message_parts(frame) {
        Some((group, sender, _, payload)) => {
            let ty = if seq.is_some() {
                FrameType::DELIVER_SEQ
            } else {
                FrameType::DELIVER
            };
            encode_group_message_raw(ty, group, sender, seq, payload)
        }
        None => Bytes::copy_from_slice(frame),
    }
}

/// A group message on its way to local members: encoded in another shard's
/// batch (copied into each member's queue, or into one shared buffer when
/// large and for many), already shared, or not encoded yet.
#[derive(Debug)]
pub enum Framed<'a> {
    /// Encoded frame bytes owned by someone else.
    Slice(&'a [u8]),
    /// A frame shared by reference.
    Shared(Bytes),
    /// Not encoded yet: encoded once, into the shard's scratch buffer when
    /// it is copied.
    Message(&'a GroupMessage<'a>),
}

/// A frame ready for members: copied into each one's queue, or shared.
enum Encoded<'a> {
    Slice(&'a [u8]),
    Shared(Bytes),
}

impl AsRef<[u8]> for Encoded<'_> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Encoded::Slice(f) => f,
            Encoded::Shared(f) => f,
        }
    }
}
