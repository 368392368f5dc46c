//! State shared by every shard of one server: identity, the group table,
//! the shards' inboxes and counters, and the live settings. Nothing here is
//! locked on the publish path: the table is lock-free for readers and the
//! inboxes are flume channels.

use super::flow::Gate;
use super::inbox::Inbox;
use super::shard::{Framed, Shard};
use super::Live;
use crate::protocol::{GroupMessage, NodeName};
use crate::router::GroupTable;
use crate::stats::{Counts, ShardStats};
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Group messages one shard routed to another in one turn, oldest first,
/// with their publish numbers.
///
/// Small frames are packed back to back in one buffer, and the receiving
/// shard copies each out before queueing it: a small frame's memory is then
/// allocated and freed by the shard that writes it, and the producer's
/// buffer crosses threads once per batch. (Freeing on one thread what
/// another allocated, once per message, was a quarter of the server's CPU
/// in glibc's malloc on small fan-out; tuning.md, "Where the CPU goes".)
/// Copying rather than slicing the batch keeps a queued frame from pinning
/// the whole batch behind a slow reader, so byte budgets stay true. Larger
/// frames, where a copy costs more than an allocation, travel as the
/// producer's own frame, shared by reference.
#[derive(Debug, Default)]
pub struct FrameBatch {
    /// The packed frames, back to back.
    packed: Vec<u8>,
    /// Each frame, and its publish number.
    frames: Vec<(Entry, Option<u64>)>,
    /// Frames for peer links that live on the receiving shard: (peer,
    /// link's connection sequence number, frame), in order.
    to_peers: Vec<(usize, u64, Entry)>,
    /// How many of `to_peers` are messages (not membership news).
    peer_messages: usize,
    /// Bytes of every frame, packed or shared.
    bytes: usize,
    /// The shard that filled it (where it goes back, emptied, for reuse:
    /// see [`SparePool`]).
    origin: usize,
}

/// Where a batch's frame is.
#[derive(Debug)]
enum Entry {
    /// In `packed`, from here to there.
    Packed(u32, u32),
    /// Shared with the producer.
    Shared(Bytes),
}

impl FrameBatch {
    /// Frames up to this long are packed; longer ones shared.
    pub const PACK_MAX: usize = 512;
    /// Most frames gathered before they are sent (a producer's turn
    /// normally ends well before).
    pub const FRAMES: usize = 256;
    /// Most bytes gathered before they are sent: a shard's inbox passes its
    /// bound by at most this (plus one frame) per producer.
    pub const BYTES: usize = 64 * 1024;

    /// Appends `msg` (at most [`Self::PACK_MAX`] long), encoded in place.
    pub fn push_packed(&mut self, msg: &GroupMessage<'_>, seq: Option<u64>) {
        if self.frames.capacity() == 0 {
            self.frames.reserve(Self::per_batch(msg.len()));
        }
        let entry = self.pack(msg);
        self.frames.push((entry, seq));
    }

    /// Encodes `msg` at the end of `packed` (at the first, with room for a
    /// batch of frames like it).
    fn pack(&mut self, msg: &GroupMessage<'_>) -> Entry {
        let len = msg.len();
        if self.packed.capacity() == 0 {
            self.packed.reserve(Self::per_batch(len) * len);
        }
        // A batch is sent long before 4 GiB (BYTES).
        let start = u32::try_from(self.packed.len()).unwrap_or(u32::MAX);
        msg.put(&mut self.packed);
        let end = u32::try_from(self.packed.len()).unwrap_or(u32::MAX);
        self.bytes += len;
        Entry::Packed(start, end)
    }

    /// Appends `frame`, shared.
    pub fn push_shared(&mut self, frame: Bytes, seq: Option<u64>) {
        if self.frames.capacity() == 0 {
            self.frames.reserve(Self::per_batch(frame.len()));
        }
        self.bytes += frame.len();
        self.frames.push((Entry::Shared(frame), seq));
    }

    /// How many frames of `len` bytes fill a batch.
    fn per_batch(len: usize) -> usize {
        (Self::BYTES / len.max(1)).clamp(1, Self::FRAMES)
    }

    /// Appends `frame` for peer `peer`'s link `seq` on the receiving shard
    /// (see `ClusterMsg::ToPeer`).
    pub fn push_peer(&mut self, peer: usize, seq: u64, frame: Bytes) {
        self.bytes += frame.len();
        self.peer_messages += usize::from(crate::protocol::is_message_frame(&frame));
        self.to_peers.push((peer, seq, Entry::Shared(frame)));
    }

    /// Appends a FORWARD (at most [`Self::PACK_MAX`] long) for peer
    /// `peer`'s link `seq`, encoded in place: the receiving shard copies it
    /// into the link's queue.
    pub fn push_peer_packed(&mut self, peer: usize, seq: u64, msg: &GroupMessage<'_>) {
        if self.to_peers.capacity() == 0 {
            self.to_peers.reserve(Self::per_batch(msg.len()));
        }
        let entry = self.pack(msg);
        self.peer_messages += 1;
        self.to_peers.push((peer, seq, entry));
    }

    /// How many messages for members or peers it carries (what is counted
    /// as dropped if it is never handled).
    pub fn messages(&self) -> usize {
        self.frames.len() + self.peer_messages
    }

    /// True when it should be sent now.
    pub fn full(&self) -> bool {
        self.len() >= Self::FRAMES || self.bytes >= Self::BYTES
    }

    /// How many frames it holds.
    pub fn len(&self) -> usize {
        self.frames.len() + self.to_peers.len()
    }

    /// True when it holds no frame.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.to_peers.is_empty()
    }

    /// The bytes of its frames.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Hands `f` each frame for a peer link, oldest first, with the peer
    /// and the link's sequence number (packed ones by reference); the
    /// frames for members stay.
    pub fn for_each_peer_frame(&mut self, mut f: impl FnMut(usize, u64, Framed<'_>)) {
        self.peer_messages = 0;
        for (peer, seq, e) in self.to_peers.drain(..) {
            match e {
                Entry::Packed(start, end) => {
                    let bytes = self.packed.get(start as usize..end as usize);
                    f(peer, seq, Framed::Slice(bytes.unwrap_or_default()));
                }
                Entry::Shared(b) => f(peer, seq, Framed::Shared(b)),
            }
        }
    }

    /// Hands `f` each frame for members, oldest first, with its publish
    /// number: packed ones by reference (the receiver copies them into its
    /// members' queues, or into one buffer of its own when large and for
    /// many), shared ones by value. The batch is left without frames (its
    /// memory kept, for [`SparePool::give_back`]).
    pub fn for_each_frame(&mut self, mut f: impl FnMut(Framed<'_>, Option<u64>)) {
        for (e, seq) in self.frames.drain(..) {
            match e {
                Entry::Packed(start, end) => {
                    let bytes = self.packed.get(start as usize..end as usize);
                    f(Framed::Slice(bytes.unwrap_or_default()), seq);
                }
                Entry::Shared(b) => f(Framed::Shared(b), seq),
            }
        }
    }

    /// True when it has no memory of its own (a slot not being filled).
    pub fn holds_no_memory(&self) -> bool {
        self.packed.capacity() == 0 && self.frames.capacity() == 0 && self.to_peers.capacity() == 0
    }

    /// Empties it, keeping its memory; false when that memory is more
    /// than a spare batch may keep.
    fn clear(&mut self) -> bool {
        self.packed.clear();
        self.frames.clear();
        self.to_peers.clear();
        self.peer_messages = 0;
        self.bytes = 0;
        self.packed.capacity() <= Self::BYTES + Self::PACK_MAX
            && self.frames.capacity() <= Self::FRAMES
            && self.to_peers.capacity() <= Self::FRAMES
    }

    /// The most memory a spare batch keeps (see [`FrameBatch::clear`]).
    pub const SPARE_MAX_BYTES: usize = Self::BYTES
        + Self::PACK_MAX
        + Self::FRAMES * std::mem::size_of::<(Entry, Option<u64>)>()
        + Self::FRAMES * std::mem::size_of::<(usize, u64, Entry)>();
}

/// Emptied batches kept per shard for its next ones (see [`SparePool`]):
/// at most this many, each at most [`FrameBatch::SPARE_MAX_BYTES`]
/// (88.5 KiB on x86-64), and dropped at every sweep.
pub const SPARE_BATCHES: usize = 4;
// What the docs promise of a spare.
const _: () = assert!(FrameBatch::SPARE_MAX_BYTES <= 96 * 1024);

/// Per shard, the batches it filled that their receivers have emptied,
/// waiting to be filled by it again: a batch's memory is then allocated
/// and freed by the shard that fills it, not once per batch on each side
/// (freeing on one thread what another allocated is glibc's slow path).
#[derive(Debug)]
pub struct SparePool(Vec<(flume::Sender<FrameBatch>, flume::Receiver<FrameBatch>)>);

impl SparePool {
    /// A pool for `shards` shards.
    pub fn new(shards: usize) -> Self {
        SparePool((0..shards).map(|_| flume::bounded(SPARE_BATCHES)).collect())
    }

    /// An empty batch for shard `origin` to fill: one of its spares, or a
    /// new one.
    pub fn take(&self, origin: usize) -> FrameBatch {
        let mut batch = self
            .0
            .get(origin)
            .and_then(|(_, rx)| rx.try_recv().ok())
            .unwrap_or_default();
        batch.origin = origin;
        batch
    }

    /// Takes back a batch its receiver has handled, for its origin shard
    /// to fill again (dropped when that shard has enough spares, or when
    /// it grew large).
    pub fn give_back(&self, mut batch: FrameBatch) {
        if batch.clear() {
            if let Some((tx, _)) = self.0.get(batch.origin) {
                let _ = tx.try_send(batch);
            }
        }
    }

    /// Frees shard `origin`'s spares (at its sweep: what a burst used is
    /// given back once the burst is over).
    pub fn drop_spares(&self, origin: usize) {
        if let Some((_, rx)) = self.0.get(origin) {
            rx.drain().for_each(drop);
        }
    }

    /// How many spares shard `origin` has.
    #[cfg(test)]
    pub fn spares(&self, origin: usize) -> usize {
        self.0.get(origin).map_or(0, |(_, rx)| rx.len())
    }
}

/// A message from one shard to another. Those carrying a frame carry its
/// producer's gate too: the receiving shard may make that producer wait
/// (a slow member there), and the inbox does when it is over its bound.
#[derive(Debug)]
pub enum ShardMsg {
    /// Group messages (DELIVER or DELIVER_SEQ frames, with their publish
    /// numbers) for the local members of their groups, and frames for the
    /// peer links the receiving shard holds: what one producer's turn
    /// routed to the receiving shard, in order, in one message.
    DeliverBatch {
        /// The frames and their publish numbers, oldest first.
        frames: FrameBatch,
        /// Who made them.
        producer: Option<Arc<Gate>>,
    },
    /// A membership event (MEMBERSHIP frame) for the local members of its group.
    Event {
        /// The encoded frame.
        frame: Bytes,
        /// The change's number in its group (see `router::Change::seq`).
        seq: u64,
        /// Who made it.
        producer: Option<Arc<Gate>>,
    },
    /// A DIRECT frame for connection `seq` of the receiving shard.
    Direct {
        /// The connection's sequence number.
        seq: u64,
        /// The encoded frame.
        frame: Bytes,
        /// Who made it.
        producer: Option<Arc<Gate>>,
    },
    /// Cluster traffic for a peer link or the mesh (see `cluster`).
    Cluster(crate::server::peers::ClusterMsg),
    /// New live settings.
    Reload(Live),
    /// Block the shard's thread this long (tests: a shard that stops).
    Stall(std::time::Duration),
    /// Run this on the shard's thread (the monitoring endpoint's questions
    /// about what only the shard holds: its connections, its queues).
    Inspect(Inspect),
    /// A connection another shard accepted, for this one to serve (see
    /// [`Shared::place`]).
    Adopt(std::net::TcpStream, std::net::SocketAddr),
    /// Stop: flush and close every connection, then exit.
    Shutdown,
}

impl ShardMsg {
    /// What the message counts against its inbox's bound: its frame and
    /// bookkeeping; control messages count nothing.
    pub fn cost(&self) -> usize {
        match self {
            ShardMsg::Event { frame, .. }
            | ShardMsg::Direct { frame, .. }
            | ShardMsg::Cluster(crate::server::peers::ClusterMsg::ToPeer { frame, .. }) => {
                frame.len() + super::inbox::MSG_OVERHEAD
            }
            ShardMsg::DeliverBatch { frames, .. } => {
                frames.bytes() + frames.len() * super::inbox::MSG_OVERHEAD
            }
            _ => 0,
        }
    }

    /// How many messages for members or a peer it carries (what is
    /// counted as dropped if it is never handled).
    pub fn messages(&self) -> u64 {
        match self {
            ShardMsg::DeliverBatch { frames, .. } => frames.messages() as u64,
            ShardMsg::Direct { .. } => 1,
            ShardMsg::Cluster(crate::server::peers::ClusterMsg::ToPeer { frame, .. }) => {
                u64::from(crate::protocol::is_message_frame(frame))
            }
            _ => 0,
        }
    }

    /// The producer of the message's frame, if any.
    pub fn producer(&self) -> Option<&Arc<Gate>> {
        match self {
            ShardMsg::DeliverBatch { producer, .. }
            | ShardMsg::Event { producer, .. }
            | ShardMsg::Direct { producer, .. }
            | ShardMsg::Cluster(crate::server::peers::ClusterMsg::ToPeer { producer, .. }) => {
                producer.as_ref()
            }
            _ => None,
        }
    }
}

/// A question for a shard, run on its thread between two inbox messages
/// (see [`ShardMsg::Inspect`]). It answers through whatever channel it
/// captured; one dropped unrun (the shard has exited) drops that channel.
pub struct Inspect(pub Box<InspectFn>);

/// What an [`Inspect`] runs.
pub type InspectFn = dyn FnOnce(&Rc<Shard>) + Send;

impl std::fmt::Debug for Inspect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inspect")
    }
}

/// Everything the shards of one server share.
#[derive(Debug)]
pub struct Shared {
    /// This node's name.
    pub node: NodeName,
    /// Which groups have members where.
    pub table: GroupTable,
    /// One inbox per shard, by index.
    pub inboxes: Vec<Inbox>,
    /// One set of counters per shard, by index.
    pub stats: Vec<ShardStats>,
    /// When the server started.
    pub started: Instant,
    /// This start of the server, in every member id it assigns (so that no
    /// id is ever assigned twice, across restarts too): see [`incarnation`].
    pub incarnation: String,
    /// "uring" or "epoll".
    pub backend: &'static str,
    /// Set when shutdown has begun.
    pub stopping: AtomicBool,
    /// Questions of the monitoring endpoint queued on each shard and not
    /// yet answered (see `monitor::gather::ask`): a shard that stopped
    /// answering is asked nothing more until it has answered.
    pub inspections: Arc<[AtomicUsize]>,
    /// Connections accepted so far: the next goes to shard `placed %
    /// shards` (see [`Shared::place`]).
    pub placed: AtomicUsize,
    /// The live settings (changed by reload).
    pub live: Mutex<Live>,
    /// The cluster's shared state.
    pub cluster: crate::cluster::Mesh,
    /// Client users and logins (`users`; off when none are configured).
    pub auth: super::auth::Auth,
    /// TLS for accepted connections (`tls_certificate`…); `None`: plain.
    pub tls: Option<crate::tls::Configs>,
    /// Emptied batches, back with the shards that filled them.
    pub spares: SparePool,
}

impl Shared {
    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// Sum of every shard's counters.
    pub fn totals(&self) -> Counts {
        let mut t = Counts::default();
        for s in &self.stats {
            t += s.snapshot();
        }
        t
    }

    /// Sends to shard `i`'s inbox. A shard never waits on another: when the
    /// inbox is over its bound, the message's producer waits instead.
    #[inline]
    pub fn send(&self, i: usize, msg: ShardMsg) {
        if let Some(inbox) = self.inboxes.get(i) {
            // Fails only when that shard has exited (shutdown): what the
            // message carried is counted as dropped.
            let carried = msg.messages();
            if !inbox.send(msg) && carried > 0 {
                ShardStats::add(&self.stats[i].dropped_shutdown, carried);
            }
        }
    }

    /// The shard that serves the next accepted connection: round-robin,
    /// whichever shard's listener the kernel handed it to, so that
    /// connections are spread evenly (the kernel's SO_REUSEPORT hash puts
    /// two connections on one shard half the time, leaving the other
    /// core idle; tuning.md, `shards`).
    pub fn place(&self) -> usize {
        self.placed.fetch_add(1, Ordering::Relaxed) % self.shards().max(1)
    }

    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The live settings now.
    pub fn live(&self) -> Live {
        *self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stats document answered to STATS_REQUEST.
    pub fn stats_json(&self) -> serde_json::Value {
        let per_shard: Vec<Counts> = self.stats.iter().map(ShardStats::snapshot).collect();
        let totals = self.totals();
        serde_json::json!({
            "node": self.node.as_str(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "io_backend": self.backend,
            "shards": self.shards(),
            "groups": self.table.len(),
            "totals": totals,
            "dropped": totals.dropped(),
            "drops": totals
                .drops_by_reason()
                .iter()
                .map(|(reason, n)| ((*reason).to_owned(), serde_json::Value::from(*n)))
                .collect::<serde_json::Map<_, _>>(),
            "memory": {
                "rss_bytes": super::memory::rss_bytes(),
                "heap_free_bytes": super::memory::free_heap_bytes(),
            },
            "per_shard": per_shard,
            "inboxes": self.inboxes.iter().map(|i| serde_json::json!({
                "bytes": i.bytes(),
                "msgs": i.len(),
                "limit_bytes": i.limit(),
            })).collect::<Vec<_>>(),
            "settings": self.live().to_json(),
            "peers": self.cluster.stats_json(),
        })
    }
}

/// A name for this start of the server: the start time in milliseconds
/// since 1970, in base 36 (8 characters until the year 2059). Two starts of
/// one node would need the same millisecond to share it, and the first must
/// have stopped listening for the second to start.
pub fn incarnation() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut n = ms;
    let mut out = Vec::new();
    loop {
        let d = (n % 36) as u8;
        out.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{group_message_parts, FrameType};

    fn msg(payload: &[u8]) -> GroupMessage<'_> {
        GroupMessage {
            ty: FrameType::DELIVER_SEQ,
            group: b"g",
            sender: b"n/0.1.x",
            seq: Some(7),
            payload,
        }
    }

    #[test]
    fn packed_and_shared_frames_come_out_in_order_and_whole() {
        let big = vec![b'b'; FrameBatch::PACK_MAX];
        let mut batch = FrameBatch::default();
        batch.push_packed(&msg(b"one"), Some(1));
        batch.push_shared(msg(&big).encode(), Some(2));
        batch.push_packed(&msg(b"three"), None);
        assert_eq!(batch.len(), 3);
        let want = msg(b"one").len() + msg(&big).len() + msg(b"three").len();
        assert_eq!(batch.bytes(), want, "every frame's bytes are counted");
        let mut out: Vec<(Bytes, Option<u64>)> = Vec::new();
        batch.for_each_frame(|f, s| match f {
            Framed::Slice(f) => out.push((Bytes::copy_from_slice(f), s)),
            Framed::Shared(f) => out.push((f, s)),
            Framed::Message(_) => unreachable!("a batch holds encoded frames"),
        });
        let payloads: Vec<&[u8]> = out
            .iter()
            .map(|(f, _)| group_message_parts(f).map(|p| p.3).unwrap_or_default())
            .collect();
        assert_eq!(payloads, [&b"one"[..], &big[..], &b"three"[..]]);
        assert_eq!(out[0].0, msg(b"one").encode(), "byte for byte the frame");
        let seqs: Vec<_> = out.iter().map(|(_, s)| *s).collect();
        assert_eq!(seqs, [Some(1), Some(2), None]);
    }

    #[test]
    fn frames_for_peer_links_are_counted_and_kept_apart() {
        let mut batch = FrameBatch::default();
        batch.push_packed(&msg(b"member"), Some(1));
        let forward = GroupMessage {
            ty: FrameType::FORWARD,
            seq: None,
            ..msg(b"peer")
        }
        .encode();
        batch.push_peer(2, 9, forward.clone());
        batch.push_peer(2, 9, Bytes::from_static(b"\0\0\0\x01\x31")); // not a message
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.messages(), 2, "a delivery and a forward");
        assert_eq!(batch.bytes(), msg(b"member").len() + forward.len() + 5);
        let mut peers = Vec::new();
        batch.for_each_peer_frame(|p, s, f| match f {
            Framed::Shared(f) => peers.push((p, s, f)),
            other => panic!("a shared frame comes out shared: {other:?}"),
        });
        assert_eq!(peers.len(), 2);
        assert_eq!((peers[0].0, peers[0].1), (2, 9));
        assert_eq!(peers[0].2, forward);
        assert_eq!(batch.messages(), 1);
        let mut n = 0;
        batch.for_each_frame(|_, _| n += 1);
        assert_eq!(n, 1);
    }

    /// FORWARDs packed for peer links, interleaved with packed frames for
    /// members, come out byte for byte and in order on both sides, and
    /// count as messages.
    #[test]
    fn packed_peer_frames_interleave_with_member_frames() {
        let fwd = |p: &'static [u8]| GroupMessage {
            ty: FrameType::FORWARD_SEQ,
            ..msg(p)
        };
        let mut batch = FrameBatch::default();
        batch.push_packed(&msg(b"m1"), Some(1));
        batch.push_peer_packed(1, 5, &fwd(b"p1"));
        batch.push_packed(&msg(b"m2"), Some(2));
        batch.push_peer(1, 5, fwd(b"p2").encode());
        batch.push_peer_packed(2, 6, &fwd(b"p3"));
        assert_eq!(batch.messages(), 5);
        let want = [&msg(b"m1"), &msg(b"m2")]
            .map(|m| m.len())
            .iter()
            .sum::<usize>()
            + [fwd(b"p1"), fwd(b"p2"), fwd(b"p3")]
                .iter()
                .map(|m| m.len())
                .sum::<usize>();
        assert_eq!(batch.bytes(), want);
        let mut peers = Vec::new();
        batch.for_each_peer_frame(|p, s, f| match f {
            Framed::Slice(f) => peers.push((p, s, Bytes::copy_from_slice(f))),
            Framed::Shared(f) => peers.push((p, s, f)),
            Framed::Message(_) => unreachable!("a batch holds encoded frames"),
        });
        let want = [(1, 5, fwd(b"p1")), (1, 5, fwd(b"p2")), (2, 6, fwd(b"p3"))]
            .map(|(p, s, m)| (p, s, m.encode()));
        assert_eq!(peers, want);
        let mut members = Vec::new();
        batch.for_each_frame(|f, s| match f {
            Framed::Slice(f) => members.push((Bytes::copy_from_slice(f), s)),
            other => panic!("packed frames come out by reference: {other:?}"),
        });
        assert_eq!(
            members,
            [
                (msg(b"m1").encode(), Some(1)),
                (msg(b"m2").encode(), Some(2))
            ]
        );
    }

    #[test]
    fn emptied_batches_go_back_to_the_shard_that_filled_them() {
        let pool = SparePool::new(2);
        let mut b = pool.take(1);
        assert!(b.holds_no_memory(), "none spare yet: a new one");
        b.push_packed(&msg(b"one"), Some(1));
        assert!(!b.holds_no_memory());
        b.push_peer(0, 3, msg(b"p").encode());
        let cap = b.packed.capacity();
        let mut n = 0;
        b.for_each_peer_frame(|_, _, _| n += 1);
        b.for_each_frame(|_, _| n += 1);
        assert_eq!(n, 2);
        pool.give_back(b);
        assert_eq!(
            (pool.spares(0), pool.spares(1)),
            (0, 1),
            "back with its filler"
        );
        let mut again = pool.take(1);
        assert_eq!(pool.spares(1), 0);
        assert!(again.is_empty());
        assert_eq!((again.bytes(), again.messages()), (0, 0));
        assert_eq!(again.packed.capacity(), cap, "its memory is used again");
        again.push_packed(&msg(b"two"), None);
        let mut out = Vec::new();
        again.for_each_frame(|f, s| match f {
            Framed::Slice(f) => out.push((Bytes::copy_from_slice(f), s)),
            other => panic!("packed frames come out by reference: {other:?}"),
        });
        assert_eq!(
            out,
            [(msg(b"two").encode(), None)],
            "nothing of its last use"
        );

        for _ in 0..3 * SPARE_BATCHES {
            pool.give_back(pool.take(1));
            pool.give_back(FrameBatch {
                origin: 1,
                ..Default::default()
            });
        }
        assert_eq!(pool.spares(1), SPARE_BATCHES, "bounded in count");
        let mut big = pool.take(0);
        big.packed.reserve(2 * FrameBatch::BYTES);
        pool.give_back(big);
        assert_eq!(pool.spares(0), 0, "a batch that grew large is freed");
        pool.drop_spares(1);
        assert_eq!(pool.spares(1), 0, "the sweep frees them");
    }

    #[test]
    fn a_batch_is_full_at_its_frame_or_byte_bound() {
        let mut batch = FrameBatch::default();
        for _ in 0..FrameBatch::FRAMES - 1 {
            batch.push_packed(&msg(b"x"), None);
        }
        assert!(!batch.full());
        batch.push_packed(&msg(b"x"), None);
        assert!(batch.full(), "frame bound");
        let mut batch = FrameBatch::default();
        batch.push_shared(Bytes::from(vec![0u8; FrameBatch::BYTES]), None);
        assert!(batch.full(), "byte bound");
    }
}
