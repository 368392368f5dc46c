//! Membership on a shard: joins and leaves of its connections, and the
//! events every member is told, each the way it asked when it joined
//! ([`Events`]):
//!
//! - `Each` (protocol v1): one `MEMBERSHIP` frame per change, at once.
//! - `Batched`: the changes of a turn coalesced into `MEMBERSHIP_BATCH`
//!   frames, one encoding shared by every member that is owed the same
//!   changes. A large group is flushed at most every [`batch_interval`]
//!   (20 µs per member of the group, cluster-wide, at most 100 ms), so a
//!   storm of joins costs a frame per member per interval, not per change,
//!   on every node alike.
//! - `None`: nothing about others.
//!
//! Whatever the mode, a member's own join and leave are acknowledged with
//! one `MEMBERSHIP` each, at once. A member is told of exactly the changes
//! the group table made after its own join (the table numbers each group's
//! changes, and a member keeps its join's number), each once, before its
//! own leave: an event that reaches its shard late (from another shard or
//! node) is still told if it came after, and never if it came before.

use super::conn::Conn;
use super::shard::Shard;
use crate::protocol::{
    encode_membership, encode_membership_batch, list_budget, Events, FrameType, GroupName, Reason,
};
use crate::router::Group;
use crate::stats::ShardStats;
use bytes::{Buf, Bytes};
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A member of a group on this shard.
pub struct Local {
    /// Its connection.
    pub conn: Rc<Conn>,
    /// Which events it wants about others.
    pub events: Events,
    /// True when it gets `DELIVER_SEQ` (its connection asked for `SEQ`).
    pub seq: bool,
    /// Its own join's number among the group's changes: it is told of the
    /// changes numbered after it.
    joined_at: u64,
}

/// The local members of one group: most groups have one per shard.
pub type Members = SmallVec<[Local; 1]>;

/// Longest wait before a group's batched changes are flushed.
const MAX_BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Interval added per member of the group: flushing costs a frame per
/// member (here), and a group's members are spread over shards and nodes
/// that all flush.
const PER_MEMBER: Duration = Duration::from_micros(20);
/// A group idle this long after its last flush forgets its flush record.
const FORGET_AFTER: Duration = Duration::from_secs(1);
/// Bytes of changes a group may gather before it is flushed at once,
/// whatever its interval.
const PENDING_MAX_BYTES: usize = 256 * 1024;

/// How long after its last flush a group of `members` members may be
/// flushed again: nothing for a few members (the end of the turn), up to
/// 100 ms for thousands.
pub fn batch_interval(members: usize) -> Duration {
    (PER_MEMBER * u32::try_from(members).unwrap_or(u32::MAX)).min(MAX_BATCH_INTERVAL)
}

/// A change waiting to be flushed to batched members.
struct Change {
    /// Its number among the group's changes.
    seq: u64,
    reason: Reason,
    size: u32,
    subject: Bytes,
}

/// One group's unflushed changes on this shard.
struct Pending {
    changes: Vec<Change>,
    /// Bytes the changes hold (their subjects and bookkeeping).
    bytes: usize,
    last_flush: Option<Instant>,
    /// When a flush is scheduled (a key of `Batches::due`).
    due: Option<(Instant, u64)>,
}

/// The number of a member whose join is not acknowledged yet: it is told
/// of no change.
const NOT_YET: u64 = u64::MAX;

/// A join acknowledgement's barrier: (the joiner, the group, links still
/// to pass).
type Waiting = (Rc<Conn>, Group, u32);

/// Join acknowledgements waiting for their barriers (see [`Shard::join`]).
#[derive(Default)]
pub struct Acks {
    next_id: Cell<u64>,
    /// Barrier id → (the joiner, the group, links still to pass).
    waiting: RefCell<HashMap<u64, Waiting>>,
}

/// A shard's batched membership changes and their flush schedule.
#[derive(Default)]
pub struct Batches {
    /// Keys flush times apart.
    ticket: Cell<u64>,
    pending: RefCell<HashMap<Group, Pending>>,
    due: RefCell<BTreeMap<(Instant, u64), Group>>,
    wake: Notify,
}

impl Shard {
    /// `conn` joins `group` (idempotent) wanting `events` about others:
    /// tables updated, others told, `conn` acknowledged.
    pub fn join(&self, conn: &Rc<Conn>, group: &GroupName, events: Events) {
        if conn.groups.borrow().contains(group.as_bytes()) {
            return;
        }
        let table = &self.shared.table;
        let Some((group, ch)) = table.join_local(group.as_bytes(), &conn.id, self.index) else {
            return;
        };
        conn.groups.borrow_mut().insert(group.clone());
        // Others first (the joiner is not in the list yet), then the
        // joiner's own acknowledgement; its batches start after this change.
        let name = group.name();
        let frame = encode_membership(name, Reason::Join, ch.size, conn.id.as_bytes());
        self.membership_event(name, &frame, ch.seq, ch.shards);
        let seq = conn.features.get() & crate::protocol::features::SEQ != 0;
        let member = Local {
            conn: conn.clone(),
            events,
            seq,
            joined_at: ch.seq,
        };
        if seq {
            group.set_seq_shard(self.index, true);
        }
        self.members
            .borrow_mut()
            .entry(group.clone())
            .or_default()
            .push(member);
        // The acknowledgement waits until every node whose link is up has
        // applied the join (a barrier behind the news on each link): then
        // a publish from anywhere reaches the joiner. Until then it is told
        // nothing about others (its number is past every change), and its
        // acknowledgement is made when it goes out.
        let id = self.acks.next_id.get() + 1;
        self.acks.next_id.set(id);
        match crate::server::peers::local_join(self, &group, &conn.id, id) {
            0 => self.push_event(conn, frame),
            waits => {
                self.set_joined_at(&group, conn, NOT_YET);
                conn.pending_acks.borrow_mut().insert(group.clone(), id);
                self.acks
                    .waiting
                    .borrow_mut()
                    .insert(id, (conn.clone(), group.clone(), waits));
            }
        }
    }

    fn set_joined_at(&self, group: &Group, conn: &Conn, at: u64) -> bool {
        let mut members = self.members.borrow_mut();
        let Some(m) = members
            .get_mut(group.name())
            .and_then(|l| l.iter_mut().find(|m| m.conn.seq == conn.seq))
        else {
            return false;
        };
        m.joined_at = at;
        true
    }

    /// Barrier `id` passed one more link: when it has passed them all, its
    /// joiner's acknowledgement goes out.
    pub fn barrier_done(&self, id: u64) {
        let (conn, group) = {
            let mut waiting = self.acks.waiting.borrow_mut();
            let Some((_, _, left)) = waiting.get_mut(&id) else {
                return;
            };
            *left -= 1;
            if *left > 0 {
                return;
            }
            match waiting.remove(&id) {
                Some((conn, group, _)) => (conn, group),
                None => return,
            }
        };
        if conn.pending_acks.borrow_mut().remove(&group).is_some() {
            self.send_ack(&conn, &group);
        }
    }

    /// Sends `conn`'s acknowledgement of its join to `group`, made now: the
    /// group's size now, and the member is told every change numbered
    /// after it.
    fn send_ack(&self, conn: &Conn, group: &Group) {
        // Numbered under the group's lock, as the group's changes are: the
        // size includes exactly the changes numbered before it.
        let (at, size) = {
            let st = group.lock();
            (self.shared.table.next_change(), st.size())
        };
        if self.set_joined_at(group, conn, at) {
            let frame = encode_membership(group.name(), Reason::Join, size, conn.id.as_bytes());
            self.push_event(conn, frame);
        }
    }

    /// `conn` leaves `group`: the acknowledgement of its join, if still
    /// waiting, goes out now, just before the leave's (the barriers of its
    /// other groups go on).
    #[allow(clippy::mutable_key_type)] // a Group hashes by its name, which never changes
    fn ack_before_leave(&self, conn: &Conn, group: &Group) {
        let id = conn.pending_acks.borrow_mut().remove(group);
        if let Some(id) = id {
            self.acks.waiting.borrow_mut().remove(&id);
            self.send_ack(conn, group);
        }
    }

    /// `conn` closed: its acknowledgements will never be sent.
    #[allow(clippy::mutable_key_type)]
    fn drop_acks(&self, conn: &Conn) {
        let pending = std::mem::take(&mut *conn.pending_acks.borrow_mut());
        let mut waiting = self.acks.waiting.borrow_mut();
        for id in pending.values() {
            waiting.remove(id);
        }
    }

    /// `conn` leaves group `name` (a no-op when not a member).
    pub fn leave(&self, conn: &Conn, name: &[u8], reason: Reason) {
        let group = {
            let mut groups = conn.groups.borrow_mut();
            let Some(group) = groups.take(name) else {
                return;
            };
            if groups.capacity() > 1024 && groups.len() < groups.capacity() / 4 {
                groups.shrink_to_fit();
            }
            group
        };
        self.forget(conn, &group, reason);
    }

    /// Leaves every group `conn` belongs to (its connection closed).
    // A `Group` hashes and compares by its name, which never changes: the
    // interior mutability clippy sees is the member set, not the key.
    #[allow(clippy::mutable_key_type)]
    pub fn leave_all(&self, conn: &Conn) {
        let groups = std::mem::take(&mut *conn.groups.borrow_mut());
        for g in &groups {
            self.forget(conn, g, Reason::Disconnect);
        }
    }

    fn forget(&self, conn: &Conn, group: &Group, reason: Reason) {
        if !conn.pending_acks.borrow().is_empty() {
            if reason == Reason::Leave {
                self.ack_before_leave(conn, group);
            } else {
                self.drop_acks(conn);
            }
        }
        let (me, last) = {
            let mut members = self.members.borrow_mut();
            match members.get_mut(group.name()) {
                Some(list) => {
                    let i = list.iter().position(|m| m.conn.seq == conn.seq);
                    let me = i.map(|i| list.remove(i));
                    if me.as_ref().is_some_and(|m| m.seq) && !list.iter().any(|m| m.seq) {
                        group.set_seq_shard(self.index, false);
                    }
                    let empty = list.is_empty();
                    if empty {
                        members.remove(group.name());
                        shrink_after_mass_leave(&mut members);
                    }
                    (me, empty)
                }
                None => (None, true),
            }
        };
        let ch = self
            .shared
            .table
            .leave_local(group, &conn.id, last.then_some(self.index));
        let frame = encode_membership(group.name(), reason, ch.size, conn.id.as_bytes());
        if reason == Reason::Leave {
            // A batched leaver first gets the changes it is owed; its own
            // event, the acknowledgement, is the last about the group.
            if let Some(me) = me.filter(|m| m.events == Events::Batched) {
                self.flush_one(group, &me);
            }
            self.push_event(conn, frame.clone());
        }
        self.membership_event(group.name(), &frame, ch.seq, ch.shards);
        crate::server::peers::local_leave(self, group, &conn.id, reason);
    }

    /// Tells the members of group `name` on every shard in `mask` about
    /// change number `seq`, which `frame` (a `MEMBERSHIP`) reports.
    pub fn membership_event(&self, name: &[u8], frame: &Bytes, seq: u64, mask: u64) {
        for s in crate::router::bits(mask) {
            if s == self.index {
                self.membership_changed(name, frame, seq);
            } else {
                let msg = super::shared::ShardMsg::Event {
                    frame: frame.clone(),
                    seq,
                    producer: self.producer(),
                };
                self.send_to(s, msg);
            }
        }
    }

    /// Tells this shard's members of group `name` who joined before change
    /// number `seq` about it (`frame`, a `MEMBERSHIP`), each the way it
    /// asked.
    pub fn membership_changed(&self, name: &[u8], frame: &Bytes, seq: u64) {
        let members = self.members.borrow();
        let Some((group, list)) = members.get_key_value(name) else {
            return;
        };
        let mut batched = false;
        let producer = self.producer();
        for m in list.iter().filter(|m| m.joined_at < seq) {
            match m.events {
                Events::Each => self.push_event(&m.conn, frame.clone()),
                Events::Batched => {
                    batched = true;
                    // What the batch will bring is charged now to whoever
                    // made the change: a slow member slows the churn.
                    if let Some(p) = &producer {
                        if m.conn.out.hold_if_full(p) {
                            self.mark_congested(&m.conn);
                        }
                    }
                }
                Events::None => {}
            }
        }
        if batched {
            if let Some(change) = parse_change(frame) {
                self.add_pending(group, seq, change);
            }
        }
    }

    fn push_event(&self, conn: &Conn, frame: Bytes) {
        let frame = for_client(conn, frame);
        if self.push(conn, frame) {
            ShardStats::add(&self.stats().membership_frames, 1);
        }
    }

    fn add_pending(&self, group: &Group, seq: u64, (reason, size, subject): (Reason, u32, Bytes)) {
        let b = &self.batches;
        let mut pending = b.pending.borrow_mut();
        let p = pending.entry(group.clone()).or_insert_with(|| Pending {
            changes: Vec::new(),
            bytes: 0,
            last_flush: None,
            due: None,
        });
        p.bytes += subject.len() + std::mem::size_of::<Change>();
        p.changes.push(Change {
            seq,
            reason,
            size,
            subject,
        });
        if p.bytes > PENDING_MAX_BYTES {
            // Too much to hold for the interval: flush at the end of this turn.
            if let Some(key) = p.due.take() {
                b.due.borrow_mut().remove(&key);
            }
            let ticket = b.ticket.get() + 1;
            b.ticket.set(ticket);
            let key = (Instant::now(), ticket);
            p.due = Some(key);
            b.due.borrow_mut().insert(key, group.clone());
            b.wake.notify_one();
        }
        if p.due.is_none() {
            let now = Instant::now();
            let interval = batch_interval(size as usize);
            let at = p.last_flush.map_or(now, |t| (t + interval).max(now));
            let ticket = b.ticket.get() + 1;
            b.ticket.set(ticket);
            p.due = Some((at, ticket));
            b.due.borrow_mut().insert((at, ticket), group.clone());
            b.wake.notify_one();
        }
    }

    /// Sends a leaving `member` the pending changes of `group` it is owed.
    fn flush_one(&self, group: &Group, member: &Local) {
        let pending = self.batches.pending.borrow();
        let Some(p) = pending.get(group.name()) else {
            return;
        };
        for frame in self.batch_frames(group.name(), &p.changes, member.joined_at) {
            self.push_batch(&member.conn, frame);
        }
    }

    /// Flushes `group`'s pending changes to its batched members here: one
    /// encoding shared by every member that joined before all of them, one
    /// per join point for those who joined meanwhile.
    fn flush_group(&self, group: &Group) {
        let changes = {
            let mut pending = self.batches.pending.borrow_mut();
            let Some(p) = pending.get_mut(group.name()) else {
                return;
            };
            p.due = None;
            p.bytes = 0;
            p.last_flush = Some(Instant::now());
            std::mem::take(&mut p.changes)
        };
        let Some(oldest) = changes.iter().map(|c| c.seq).min() else {
            return;
        };
        let members = self.members.borrow();
        let Some(list) = members.get(group.name()) else {
            return;
        };
        let mut encoded: Vec<(u64, Vec<Bytes>)> = Vec::new();
        for m in list.iter().filter(|m| m.events == Events::Batched) {
            // Everyone who joined before the oldest change shares one encoding.
            let after = m.joined_at.max(oldest - 1);
            let frames = match encoded.iter().find(|(a, _)| *a == after) {
                Some((_, frames)) => frames.clone(),
                None => {
                    let frames = self.batch_frames(group.name(), &changes, after);
                    encoded.push((after, frames.clone()));
                    frames
                }
            };
            for f in frames {
                self.push_batch(&m.conn, f);
            }
        }
    }

    fn push_batch(&self, conn: &Conn, frame: Bytes) {
        let _nobody = self.producing(None);
        let frame = for_client(conn, frame);
        if self.push(conn, frame) {
            ShardStats::add(&self.stats().membership_batches, 1);
        }
    }

    /// The `changes` numbered after `after`, in the order they reached this
    /// shard, as `MEMBERSHIP_BATCH` frames each within the frame limit.
    fn batch_frames(&self, group: &[u8], changes: &[Change], after: u64) -> Vec<Bytes> {
        let owed: Vec<&Change> = changes.iter().filter(|c| c.seq > after).collect();
        if owed.is_empty() {
            return Vec::new();
        }
        let budget = list_budget(self.live.get().max_message_size);
        crate::protocol::split_by_size(&owed, budget, |c| 6 + c.subject.len())
            .into_iter()
            .map(|part| {
                let it = part.iter().map(|c| (c.reason, c.size, &c.subject[..]));
                encode_membership_batch(group, it)
            })
            .collect()
    }

    /// Flushes batched membership changes when they are due: at the end of
    /// the turn that made them, or for a large group once its interval
    /// since the last flush has passed.
    pub async fn batch_flusher(self: Rc<Self>) {
        let b = &self.batches;
        loop {
            let next = b.due.borrow().keys().next().map(|k| k.0);
            match next {
                None => {
                    b.wake.notified().await;
                    // Let the rest of this turn add its changes first.
                    tokio::task::yield_now().await;
                }
                Some(at) if at > Instant::now() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = b.wake.notified() => {}
                    }
                }
                Some(_) => {
                    let now = Instant::now();
                    let due: Vec<Group> = {
                        let mut d = b.due.borrow_mut();
                        let later = d.split_off(&(now, u64::MAX));
                        std::mem::replace(&mut *d, later).into_values().collect()
                    };
                    for g in &due {
                        self.flush_group(g);
                    }
                    self.forget_idle_batches(now);
                    super::io::submit_pending(self.uring);
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// Drops the flush records of groups quiet for a while.
    fn forget_idle_batches(&self, now: Instant) {
        let mut pending = self.batches.pending.borrow_mut();
        if pending.len() < 64 {
            return;
        }
        pending.retain(|_, p| {
            p.due.is_some()
                || p.last_flush
                    .is_some_and(|t| now.duration_since(t) < FORGET_AFTER)
        });
    }
}

/// Gives back a map's room once it holds a quarter of what it once did
/// (after a client with 100,000 groups left them, say).
pub(super) fn shrink_after_mass_leave<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

/// The (reason, size, subject) a `MEMBERSHIP` frame reports.
fn parse_change(frame: &Bytes) -> Option<(Reason, u32, Bytes)> {
    let mut b = frame.clone();
    if b.remaining() < 6 || b[4] != FrameType::MEMBERSHIP.0 {
        return None;
    }
    b.advance(5);
    let glen = usize::from(b.get_u8());
    if b.remaining() < glen + 6 {
        return None;
    }
    b.advance(glen);
    let reason = Reason::from_u8(b.get_u8())?;
    let size = b.get_u32();
    let slen = usize::from(b.get_u8());
    // An owned copy: it outlives this frame in the pending batch.
    let subject = Bytes::copy_from_slice(b.get(..slen)?);
    Some((reason, size, subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_grow_with_the_group_and_stop_at_100_ms() {
        assert_eq!(batch_interval(1), Duration::from_micros(20));
        assert_eq!(batch_interval(1000), Duration::from_millis(20));
        assert_eq!(batch_interval(1_000_000), MAX_BATCH_INTERVAL);
    }

    #[test]
    fn a_change_is_read_back_from_its_frame() {
        let f = encode_membership(b"g", Reason::Disconnect, 9, b"n/1.2");
        let (reason, size, subject) = parse_change(&f).expect("parsed");
        assert_eq!(
            (reason, size, &subject[..]),
            (Reason::Disconnect, 9, &b"n/1.2"[..])
        );
        assert!(parse_change(&Bytes::from_static(b"\0\0\0\x01\x03")).is_none());
    }
}

/// `frame` (a `MEMBERSHIP` or `MEMBERSHIP_BATCH` this server built) as
/// `conn` can read it: a client not granted `LEAVING` knows no reason
/// node-left, and gets node-down instead (what it got before there was a
/// clean leave). Any other frame, or a client that knows, gets it as is.
fn for_client(conn: &Conn, frame: Bytes) -> Bytes {
    if conn.features.get() & crate::protocol::features::LEAVING != 0 {
        return frame;
    }
    match without_node_left(&frame) {
        Some(f) => f,
        None => frame,
    }
}

/// `frame` with every reason node-left made node-down, or `None` when it
/// has none (or is not a membership frame).
fn without_node_left(frame: &[u8]) -> Option<Bytes> {
    use crate::protocol::LEN_PREFIX;
    let ty = FrameType(*frame.get(LEN_PREFIX)?);
    let glen = usize::from(*frame.get(LEN_PREFIX + 1)?);
    let after_group = LEN_PREFIX + 2 + glen;
    // Offsets of the reason bytes.
    let mut at = Vec::new();
    if ty == FrameType::MEMBERSHIP {
        at.push(after_group);
    } else if ty == FrameType::MEMBERSHIP_BATCH {
        let count = u32::from_be_bytes(frame.get(after_group..after_group + 4)?.try_into().ok()?);
        let mut pos = after_group + 4;
        for _ in 0..count {
            at.push(pos);
            let slen = usize::from(*frame.get(pos + 5)?);
            pos += 6 + slen;
        }
    } else {
        return None;
    }
    let node_left = Reason::NodeLeft as u8;
    if !at.iter().any(|&p| frame.get(p) == Some(&node_left)) {
        return None;
    }
    let mut out = frame.to_vec();
    for p in at {
        if out.get(p) == Some(&node_left) {
            out[p] = Reason::NodeDown as u8;
        }
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod node_left_tests {
    use super::*;
    use crate::protocol::{decode, encode_membership, Frame, MembershipChange};

    fn reasons(b: &Bytes) -> Vec<Reason> {
        let mut buf = bytes::BytesMut::from(&b[..]);
        match decode(&mut buf, 1 << 20) {
            Ok(Some(Frame::Membership { reason, .. })) => vec![reason],
            Ok(Some(Frame::MembershipBatch { changes, .. })) => {
                changes.iter().map(|c| c.reason).collect()
            }
            other => panic!("not a membership frame: {other:?}"),
        }
    }

    /// Old clients get node-down wherever new ones get node-left; nothing
    /// else changes.
    #[test]
    fn node_left_becomes_node_down_for_old_clients() {
        let one = encode_membership(b"orders", Reason::NodeLeft, 3, b"node2");
        let down = without_node_left(&one).expect("rewritten");
        assert_eq!(reasons(&down), [Reason::NodeDown]);
        assert_eq!(down.len(), one.len());
        let join = encode_membership(b"orders", Reason::Join, 3, b"node2/0.1");
        assert!(without_node_left(&join).is_none());
        let change = |reason, subject: &'static [u8]| MembershipChange {
            reason,
            size: 1,
            subject: Bytes::from_static(subject),
        };
        let batch = Frame::MembershipBatch {
            group: crate::protocol::GroupName::from_str_checked("g").expect("name"),
            changes: vec![
                change(Reason::Join, b"n1/0.1"),
                change(Reason::NodeLeft, b"n2"),
                change(Reason::Leave, b"n1/0.1"),
                change(Reason::NodeLeft, b"n3"),
            ],
        }
        .to_bytes();
        let fixed = without_node_left(&batch).expect("rewritten");
        assert_eq!(
            reasons(&fixed),
            [
                Reason::Join,
                Reason::NodeDown,
                Reason::Leave,
                Reason::NodeDown
            ]
        );
        assert!(without_node_left(&Frame::Noop.to_bytes()).is_none());
        assert!(
            without_node_left(&fixed).is_none(),
            "nothing left to change"
        );
    }
}
