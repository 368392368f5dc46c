//! Peer links on the shards: the I/O side of the cluster. One link to
//! every other node in `peers`, membership carried across them, publishes
//! forwarded once per interested node. The rules (admission, the order of
//! a link's membership stream, barriers) are [`crate::cluster`]'s, sans-IO;
//! this module feeds them what arrives and does what they decide.
//!
//! - `link`: a link on its shard: snapshot on link-up, peer frames,
//!   node-down on link loss.
//! - `auth`: the cluster key's challenge–response in the handshake.
//! - `dial`: the per-peer dialler, re-dialling every reconnect_interval.
//! - `resolve`: the thread that looks up peers given by host name (no
//!   shard ever does: a `HELLO` or a dial reads what it found).
//!
//! A publish goes to this node's members and once to each node with
//! members (encoded once for all of them); the receiving node delivers
//! locally and never forwards again, so the full mesh has no loops.

pub mod auth;
pub mod dial;
pub mod link;
pub mod resolve;

pub use link::{accept_peer, link_closed, peer_frame, say_goodbye};

use crate::cluster::machine::{Barriers, LinkView};
use crate::cluster::mesh;

use crate::config::ServerSettings;
use crate::protocol::{features, Frame, FrameType, GroupMessage, MemberId, Reason};
use crate::router::{Group, GroupEntry};
use crate::server::conn::Conn;
use crate::server::flow::Gate;
use crate::server::outbound::COPY_MAX;
use crate::server::seqs::AddrHash;
use crate::server::shard::{Framed, Shard};
use crate::server::shared::{FrameBatch, ShardMsg, Shared};
use crate::stats::ShardStats;
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Cluster traffic between shards.
#[derive(Debug)]
pub enum ClusterMsg {
    /// Queue `frame` on peer `peer`'s link, connection `seq` of the
    /// receiving shard: the link up when the frame was routed. If that
    /// link is gone by now the frame is dropped, never sent on a newer link
    /// (whose snapshot it may predate: a stale join would then stick).
    ToPeer {
        /// The peer's index.
        peer: usize,
        /// The link's connection sequence number.
        seq: u64,
        /// The encoded frame.
        frame: Bytes,
        /// Who made it (it may be told to wait for the link).
        producer: Option<Arc<Gate>>,
    },
    /// Start dialling peer `peer` from the receiving shard.
    StartDialer {
        /// The peer's index.
        peer: usize,
    },
    /// Close connection `seq` of the receiving shard (a replaced or removed link).
    Close {
        /// The connection's sequence number.
        seq: u64,
    },
    /// Queue a `PING` on peer `peer`'s link (connection `seq` of the
    /// receiving shard) behind what is queued there, and report barrier
    /// `id` done to shard `from` when its `PONG` comes back (the peer has
    /// then applied everything sent before it) or the link goes.
    Barrier {
        /// The peer's index.
        peer: usize,
        /// The link's connection sequence number.
        seq: u64,
        /// The shard waiting.
        from: usize,
        /// The barrier's id on that shard.
        id: u64,
    },
    /// Barrier `id` of the receiving shard passed one link.
    BarrierDone {
        /// The barrier's id.
        id: u64,
    },
}

/// The peer links living on one shard, by peer index.
#[derive(Default)]
pub struct ShardLinks {
    pub(crate) links: RefCell<HashMap<usize, Rc<Conn>>>,
    /// Links here whose peer said goodbye (`NODE_LEAVING`): (peer, link
    /// sequence number), until the link has closed.
    goodbyes: RefCell<HashSet<(usize, u64)>>,
    /// (peer, group entry address) of the groups a link here forwarded
    /// publishes for: a cheap check before the mesh's own list (which
    /// holds the groups, so no address is reused while it is here).
    heard: RefCell<HashSet<(usize, usize), AddrHash>>,
    /// The barrier `PING`s in flight on the links here, each holding
    /// (waiting shard, barrier id).
    barriers: RefCell<Barriers<(usize, u64)>>,
    /// Per peer: its link's membership stream (link sequence number, view).
    views: RefCell<HashMap<usize, (u64, LinkView)>>,
}

impl ShardLinks {
    /// Registers `conn` as peer `i`'s link.
    pub fn insert(&self, i: usize, conn: Rc<Conn>) {
        self.links.borrow_mut().insert(i, conn);
    }

    /// Forgets peer `i`'s link if it is connection `seq`.
    pub fn remove(&self, i: usize, seq: u64) {
        let mut m = self.links.borrow_mut();
        if m.get(&i).is_some_and(|c| c.seq == seq) {
            m.remove(&i);
        }
    }

    /// Peer `i`'s link here if it is connection `seq`.
    pub fn get_if(&self, i: usize, seq: u64) -> Option<Rc<Conn>> {
        self.links
            .borrow()
            .get(&i)
            .filter(|c| c.seq == seq)
            .cloned()
    }

    /// True the first time peer `i`'s link forwards a publish to `group`.
    #[inline]
    pub fn heard_new(&self, i: usize, group: &crate::router::GroupEntry) -> bool {
        let key = (i, group as *const crate::router::GroupEntry as usize);
        let mut h = self.heard.borrow_mut();
        if h.contains(&key) {
            return false;
        }
        if h.len() < mesh::MAX_HEARD * 4 {
            h.insert(key);
        }
        true
    }

    /// Starts the membership view of peer `i`'s new link `seq` (node `name`).
    pub fn start_view(&self, i: usize, seq: u64, name: &str) {
        self.views
            .borrow_mut()
            .insert(i, (seq, LinkView::new(name)));
    }

    /// Runs `f` on the membership view of peer `i`'s link `seq`, if it has one.
    pub fn with_view<R>(
        &self,
        i: usize,
        seq: u64,
        f: impl FnOnce(&mut LinkView) -> R,
    ) -> Option<R> {
        let mut views = self.views.borrow_mut();
        views
            .get_mut(&i)
            .filter(|(s, _)| *s == seq)
            .map(|(_, v)| f(v))
    }

    /// Peer `i` said goodbye on its link `seq`.
    pub fn goodbye(&self, i: usize, seq: u64) {
        self.goodbyes.borrow_mut().insert((i, seq));
    }

    /// Whether peer `i` said goodbye on its link `seq` (forgotten now).
    pub fn take_goodbye(&self, i: usize, seq: u64) -> bool {
        self.goodbyes.borrow_mut().remove(&(i, seq))
    }

    /// Peer links living on this shard now.
    pub fn count(&self) -> usize {
        self.links.borrow().len()
    }

    /// Forgets what peer `i`'s links forwarded (its link went or came).
    pub fn forget_heard(&self, i: usize) {
        let mut h = self.heard.borrow_mut();
        if !h.is_empty() {
            h.retain(|(p, _)| *p != i);
        }
    }
}

/// Sends `frame` to peer `i` over its up link, wherever the link lives.
#[inline]
pub fn route_to_peer(shard: &Shard, i: usize, frame: Bytes) {
    match shard.shared.cluster.link_of(i) {
        Some((s, seq)) if s == shard.index => match shard.links.get_if(i, seq) {
            Some(conn) => link::push_link(shard, &conn, i, frame),
            None => lost_for_peer(shard, i, &frame),
        },
        Some((s, seq)) => {
            // In a producer's turn, with its other frames for shard `s`.
            if let Err(frame) = shard.queue_peer(s, i, seq, frame) {
                shard.send_to(
                    s,
                    ShardMsg::Cluster(ClusterMsg::ToPeer {
                        peer: i,
                        seq,
                        frame,
                        producer: shard.producer(),
                    }),
                );
            }
        }
        None => lost_for_peer(shard, i, &frame),
    }
}

/// Queues `frame` on peer `peer`'s link `seq` of this shard, routed here
/// by another shard; dropped (and counted if a message) when that link is
/// gone (see [`ClusterMsg::ToPeer`]).
pub fn to_link(shard: &Shard, peer: usize, seq: u64, frame: Framed<'_>) {
    match (shard.links.get_if(peer, seq), frame) {
        (Some(conn), Framed::Slice(f)) if f.len() <= COPY_MAX => {
            link::copy_link(shard, &conn, peer, f)
        }
        (Some(conn), Framed::Slice(f)) => {
            link::push_link(shard, &conn, peer, Bytes::copy_from_slice(f))
        }
        (Some(conn), Framed::Shared(f)) => link::push_link(shard, &conn, peer, f),
        (Some(conn), Framed::Message(m)) => link::push_link(shard, &conn, peer, m.encode()),
        (None, Framed::Slice(f)) => lost_for_peer(shard, peer, f),
        (None, Framed::Shared(f)) => lost_for_peer(shard, peer, &f),
        (None, Framed::Message(_)) => drop_for_peer(shard, peer),
    }
}

/// `frame` for peer `i` could not be queued (no link up, or the link it
/// was routed to is gone): counted if it is a message (membership news is
/// not: the peer's next snapshot holds it).
fn lost_for_peer(shard: &Shard, i: usize, frame: &[u8]) {
    if crate::protocol::is_message_frame(frame) {
        drop_for_peer(shard, i);
    }
}

/// Counts a message for peer `i` dropped because its link is down (or
/// was replaced while the message was on its way).
pub(crate) fn drop_for_peer(shard: &Shard, i: usize) {
    let c = &shard.shared.cluster.counters[i];
    c.dropped.fetch_add(1, Relaxed);
    c.dropped_down.fetch_add(1, Relaxed);
    ShardStats::add(&shard.stats().dropped_peer, 1);
}

/// Forwards publish number `seq` of `sender` to `group` once to every node
/// with members in the group: as `FORWARD_SEQ` to peers that speak it,
/// `FORWARD` to others (each form encoded at most once). A node whose
/// link went down while it had members in the group (a ghost) is counted
/// a drop, or, once its link is back but its new view is not, sent the
/// message anyway; a message larger than a peer's `max_message_size` is
/// counted for that peer and not sent. `entry` is the group's table entry,
/// which the publish has just looked up.
pub fn forward(
    shard: &Shard,
    entry: &GroupEntry,
    sender: &MemberId,
    group: &[u8],
    seq: u64,
    payload: &[u8],
) {
    let mesh = &shard.shared.cluster;
    let (mut plain, mut numbered): (Option<Bytes>, Option<Bytes>) = (None, None);
    let mut send = |j: usize| {
        let c = &mesh.counters[j];
        let max = c.max_message_size.load(Relaxed);
        if max != 0 && payload.len() as u64 > max {
            c.dropped.fetch_add(1, Relaxed);
            c.dropped_too_large.fetch_add(1, Relaxed);
            ShardStats::add(&shard.stats().dropped_peer_too_large, 1);
            return;
        }
        let numbers = c.features.load(Relaxed) & u64::from(features::SEQ) != 0;
        let msg = GroupMessage {
            ty: if numbers {
                FrameType::FORWARD_SEQ
            } else {
                FrameType::FORWARD
            },
            group,
            sender: sender.as_bytes(),
            seq: numbers.then_some(seq),
            payload,
        };
        // A small frame for a link of this shard is built on the stack and
        // copied into the link's queue; for a link of another shard, packed
        // into this turn's batch for it: no allocation either way.
        let len = msg.len();
        match mesh.link_of(j) {
            Some((s, link)) if s == shard.index && len <= COPY_MAX => {
                match shard.links.get_if(j, link) {
                    Some(conn) => {
                        let mut stack = [0u8; COPY_MAX];
                        let mut dst = &mut stack[..];
                        msg.put(&mut dst);
                        link::copy_link(shard, &conn, j, &stack[..len]);
                    }
                    None => drop_for_peer(shard, j),
                }
                return;
            }
            Some((s, link))
                if s != shard.index
                    && len <= FrameBatch::PACK_MAX
                    && shard.queue_peer_packed(s, j, link, &msg) =>
            {
                return;
            }
            _ => {}
        }
        // Otherwise each form is encoded once and shared by the links.
        let frame = if numbers { &mut numbered } else { &mut plain };
        let frame = frame.get_or_insert_with(|| msg.encode());
        route_to_peer(shard, j, frame.clone());
    };
    let e = entry;
    e.node_mask().for_each(&mut send);
    e.ghost_mask().for_each(|j| {
        if e.node_mask().get(j) {
            return;
        }
        if mesh.link_of(j).is_some() {
            send(j);
        } else {
            drop_for_peer(shard, j);
        }
    });
}

/// Sends a direct message to member `to` living on node `node`.
pub fn forward_direct(shard: &Shard, node: &str, sender: &MemberId, to: &MemberId, payload: &[u8]) {
    let Some(i) = shard.shared.cluster.index_of(node) else {
        ShardStats::add(&shard.stats().dropped_unknown_member, 1);
        return;
    };
    let frame = Frame::ForwardDirect {
        to: to.clone(),
        sender: sender.clone(),
        payload: Bytes::copy_from_slice(payload),
    };
    route_to_peer(shard, i, frame.to_bytes());
}

/// A local member joined: tell every peer, and put a barrier behind the
/// news on every link up: barrier `id` of this shard is reported done
/// once per link when that peer has applied the join (or the link went).
/// Returns how many links it waits for.
pub fn local_join(shard: &Shard, group: &Group, member: &MemberId, id: u64) -> u32 {
    // The join is in the table; read the link states only after it (see
    // `link::link_up`, which does the converse before its snapshot).
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let mesh = &shard.shared.cluster;
    if mesh.high_water() == 0 {
        return 0;
    }
    let frame = Frame::PeerJoin {
        group: group.group_name(),
        member: member.clone(),
    }
    .to_bytes();
    let mut waits = 0;
    for i in 0..mesh.high_water() {
        let Some((s, seq)) = mesh.link_of(i) else {
            continue;
        };
        route_to_peer(shard, i, frame.clone());
        waits += 1;
        if s == shard.index {
            barrier_on_link(shard, i, seq, shard.index, id);
        } else {
            let from = shard.index;
            let msg = ClusterMsg::Barrier {
                peer: i,
                seq,
                from,
                id,
            };
            shard.send_to(s, ShardMsg::Cluster(msg));
        }
    }
    waits
}

/// Queues a barrier `PING` on peer `i`'s link `seq` here for barrier `id`
/// of shard `from`; reports it done at once if that link is gone.
fn barrier_on_link(shard: &Shard, i: usize, seq: u64, from: usize, id: u64) {
    let Some(conn) = shard.links.get_if(i, seq) else {
        return barrier_passed(shard, from, id);
    };
    let token = shard.links.barriers.borrow_mut().ping((i, seq), (from, id));
    link::push_link(shard, &conn, i, Frame::Ping { token }.to_bytes());
}

/// Reports barrier `id` of shard `from` passed one link.
fn barrier_passed(shard: &Shard, from: usize, id: u64) {
    if from == shard.index {
        shard.barrier_done(id);
    } else {
        let msg = ClusterMsg::BarrierDone { id };
        shard.send_to(from, ShardMsg::Cluster(msg));
    }
}

/// Peer `i`'s link `seq` answered `PING token`: the barriers behind it
/// passed.
pub(crate) fn pong(shard: &Shard, i: usize, seq: u64, token: u64) {
    let passed = shard.links.barriers.borrow_mut().pong((i, seq), token);
    for (from, id) in passed {
        barrier_passed(shard, from, id);
    }
}

/// Peer `i`'s link `seq` here went: its barriers pass, its view ends.
pub(crate) fn link_gone(shard: &Shard, i: usize, seq: u64) {
    let passed = shard.links.barriers.borrow_mut().link_gone((i, seq));
    for (from, id) in passed {
        barrier_passed(shard, from, id);
    }
    let mut views = shard.links.views.borrow_mut();
    if views.get(&i).is_some_and(|(s, _)| *s == seq) {
        views.remove(&i);
    }
}

/// A local member left: tell every peer (unless this node is in the last
/// phase of leaving: its goodbye tells them all members left).
pub fn local_leave(shard: &Shard, group: &Group, member: &MemberId, reason: Reason) {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if shard.shared.cluster.departure() >= crate::cluster::leave::Phase::Final {
        return;
    }
    if shard.shared.cluster.high_water() > 0 {
        let frame = Frame::PeerLeave {
            group: group.group_name(),
            member: member.clone(),
            reason,
        };
        link::broadcast(shard, &frame.to_bytes());
    }
}

/// Handles cluster traffic from another shard.
pub fn handle_shard_msg(shard: &Rc<Shard>, m: ClusterMsg) {
    match m {
        ClusterMsg::ToPeer {
            peer,
            seq,
            frame,
            producer,
        } => {
            let _p = shard.producing(producer);
            to_link(shard, peer, seq, Framed::Shared(frame));
        }
        ClusterMsg::Barrier {
            peer,
            seq,
            from,
            id,
        } => barrier_on_link(shard, peer, seq, from, id),
        ClusterMsg::BarrierDone { id } => shard.barrier_done(id),
        ClusterMsg::StartDialer { peer } => dial::spawn(shard, peer),
        ClusterMsg::Close { seq } => link::close_conn(shard, seq),
    }
}

/// Starts the diallers of the peers assigned to `shard` (index mod shards).
pub fn start_shard(shard: &Rc<Shard>) {
    let n = shard.shared.shards();
    for i in shard.shared.cluster.indices() {
        if i % n == shard.index {
            dial::spawn(shard, i);
        }
    }
}

/// Applies a reloaded peer list: dial new peers, close links to removed or
/// re-addressed ones (the latter are re-dialled at their new address).
pub fn reconfigure(shared: &Shared, s: &ServerSettings) {
    let mesh = &shared.cluster;
    let (added, removed, moved) = mesh.apply_peers(s, own_ip_of(s, &mesh.me));
    for &i in &removed {
        // No longer part of the cluster: publishes are no longer counted
        // as lost for its members (what was on its link when it closed is).
        for g in mesh.take_ghosts(i) {
            shared.table.clear_ghost(&g, i);
        }
    }
    for i in removed.iter().chain(&moved) {
        let name = mesh.slot(*i).map(|p| p.name).unwrap_or_default();
        tracing::info!(target: crate::logging::OPS, peer = name, "peers changed: closing its link");
        if let Some(p) = mesh.slot(*i) {
            if let mesh::LinkState::Up { shard, seq, .. }
            | mesh::LinkState::Dialling { shard, seq } = p.state
            {
                shared.send(shard, ShardMsg::Cluster(ClusterMsg::Close { seq }));
            }
        }
    }
    for i in added {
        tracing::info!(
            target: crate::logging::OPS,
            peer = mesh.slot(i).map(|p| p.name).unwrap_or_default(),
            "peers changed: new peer"
        );
        shared.send(
            i % shared.shards(),
            ShardMsg::Cluster(ClusterMsg::StartDialer { peer: i }),
        );
    }
}

/// This node's own address to dial from when `bind_address` is unset: its
/// own peer entry's host, when that is an address of this machine.
pub fn own_ip_of(s: &ServerSettings, me: &crate::protocol::NodeName) -> Option<std::net::IpAddr> {
    let p = s.peer(me.as_str())?;
    let ip = crate::server::resolve(&p.addr_string(s.port))?.ip();
    crate::server::sockets::is_local_ip(ip).then_some(ip)
}
