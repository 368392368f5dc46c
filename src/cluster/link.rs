//! A peer link on its shard: admission, link-up (snapshot), the peer
//! frames, and link-down (members behind it leave every view).

use super::{route_to_peer, ClusterMsg};
use crate::protocol::{
    snapshot_flags, ErrorCode, Frame, FrameType, GroupName, Hello, MemberId, Reason, Welcome,
    PROTOCOL_VERSION,
};
use crate::server::conn::{Conn, ConnRole, Reject};
use crate::server::shard::{Kill, Shard};
use crate::stats::ShardStats;
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

/// Entries per SNAPSHOT chunk.
const SNAPSHOT_CHUNK: usize = 1024;

/// A HELLO with role peer arrived on `conn`: admit it or refuse it.
pub fn accept_peer(shard: &Rc<Shard>, conn: &Rc<Conn>, hello: &Hello) -> Result<(), Reject> {
    let mesh = &shard.shared.cluster;
    let name = hello
        .name
        .as_ref()
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default();
    let Some(i) = mesh.index_of(&name) else {
        tracing::warn!(peer = %conn.addr, name, "refused a peer link: not in peers");
        return Err((
            ErrorCode::NOT_ALLOWED,
            format!("node {name:?} is not in this node's peers"),
        ));
    };
    if !address_matches(mesh.slot(i).map(|p| p.addr).as_deref(), conn.addr.ip()) {
        tracing::warn!(peer = %conn.addr, name, "refused a peer link: address does not match peers");
        return Err((
            ErrorCode::NOT_ALLOWED,
            format!("{} is not the address of node {name:?}", conn.addr.ip()),
        ));
    }
    match mesh.admit(i, shard.index, conn.seq) {
        super::mesh::Admit::Duplicate => {
            tracing::debug!(peer = %name, "refused a duplicate link");
            Err((
                ErrorCode::DUPLICATE_LINK,
                "a link to this node exists already".into(),
            ))
        }
        super::mesh::Admit::Accept { replace } => {
            if let Some((s, seq)) = replace {
                tracing::info!(peer = %name, "a new link from the peer replaces the old one");
                node_down(shard, i);
                shard.shared.send(
                    s,
                    crate::server::shared::ShardMsg::Cluster(ClusterMsg::Close { seq }),
                );
            }
            conn.role.set(ConnRole::Peer(i));
            let live = shard.live.get();
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                node: shard.shared.node.clone(),
                member: None,
                max_message_size: u32::try_from(live.max_message_size).unwrap_or(u32::MAX),
                idle_timeout_ms: u32::try_from(live.idle_timeout.as_millis()).unwrap_or(u32::MAX),
            };
            shard.push(conn, Frame::Welcome(welcome).to_bytes());
            link_up(shard, conn, i, &name);
            Ok(())
        }
    }
}

/// True when `ip` is among the addresses `spec` (host:port) resolves to.
fn address_matches(spec: Option<&str>, ip: std::net::IpAddr) -> bool {
    use std::net::ToSocketAddrs;
    let Some(spec) = spec else { return false };
    spec.to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.any(|a| a.ip() == ip))
}

/// The link to peer `i` is up on `conn`: register it and send our snapshot.
pub fn link_up(shard: &Shard, conn: &Rc<Conn>, i: usize, name: &str) {
    shard.links.insert(i, conn.clone());
    tracing::info!(peer = name, addr = %conn.addr, shard = shard.index, "peer link up");
    let entries = shard.shared.table.local_snapshot();
    let chunks = entries.len().div_ceil(SNAPSHOT_CHUNK).max(1);
    let mut rest = entries.as_slice();
    for c in 0..chunks {
        let (now, later) = rest.split_at(rest.len().min(SNAPSHOT_CHUNK));
        rest = later;
        let mut flags = 0;
        if c == 0 {
            flags |= snapshot_flags::FIRST;
        }
        if c + 1 == chunks {
            flags |= snapshot_flags::LAST;
        }
        let frame = Frame::Snapshot {
            flags,
            entries: now.to_vec(),
        }
        .to_bytes();
        push_link(shard, conn, i, frame);
    }
}

/// Queues `frame` on link `conn` of peer `i`, counting it.
pub fn push_link(shard: &Shard, conn: &Conn, i: usize, frame: Bytes) {
    let c = &shard.shared.cluster.counters[i];
    let len = frame.len() as u64;
    if shard.push(conn, frame) {
        c.msgs_out.fetch_add(1, Relaxed);
        c.bytes_out.fetch_add(len, Relaxed);
    } else {
        c.dropped.fetch_add(1, Relaxed);
    }
}

/// Handles a frame from peer `i` on `conn`.
pub fn peer_frame(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    i: usize,
    frame: Frame,
) -> Result<(), Reject> {
    let c = &shard.shared.cluster.counters[i];
    c.msgs_in.fetch_add(1, Relaxed);
    if !shard.links.is(i, conn.seq) {
        return dialled_reply(shard, conn, i, frame);
    }
    match frame {
        Frame::Forward {
            group,
            sender,
            payload,
        } => {
            c.bytes_in.fetch_add(payload.len() as u64, Relaxed);
            deliver_forward(shard, &group, &sender, &payload);
        }
        Frame::ForwardDirect {
            to,
            sender,
            payload,
        } => {
            c.bytes_in.fetch_add(payload.len() as u64, Relaxed);
            match to.parts() {
                Some((node, _, _)) if node == shard.shared.node.as_str() => {
                    shard.send_direct(&sender, &to, &payload);
                }
                _ => ShardStats::add(&shard.stats().dropped_unknown_member, 1),
            }
        }
        Frame::PeerJoin { group, member } => remote_join(shard, i, &group, &member),
        Frame::PeerLeave {
            group,
            member,
            reason,
        } => remote_leave(shard, i, &group, &member, reason),
        Frame::Snapshot { entries, .. } => {
            for (group, member) in &entries {
                remote_join(shard, i, group, member);
            }
        }
        Frame::Noop => {}
        Frame::Ping { token } => {
            shard.push(conn, Frame::Pong { token }.to_bytes());
        }
        Frame::Pong { .. } => {}
        Frame::Error { code, message } => {
            tracing::warn!(
                peer = i,
                code = code.name(),
                "peer reported an error: {message}"
            );
            conn.close_gracefully(None, shard.live.get().idle_timeout);
        }
        other => {
            let ty = other.frame_type().0;
            return Err((
                ErrorCode::UNEXPECTED,
                format!("frame type 0x{ty:02x} is not one a peer sends"),
            ));
        }
    }
    Ok(())
}

/// Frames on our dialled connection before it is the link: WELCOME or ERROR.
fn dialled_reply(shard: &Rc<Shard>, conn: &Rc<Conn>, i: usize, frame: Frame) -> Result<(), Reject> {
    let mesh = &shard.shared.cluster;
    match frame {
        Frame::Welcome(w) => {
            let name = mesh.slot(i).map(|p| p.name).unwrap_or_default();
            if w.node.as_str() != name {
                let msg = format!("dialled node {name:?} but {:?} answered", w.node.as_str());
                return Err((ErrorCode::NOT_ALLOWED, msg));
            }
            if mesh.dial_welcomed(i, shard.index, conn.seq) {
                link_up(shard, conn, i, &name);
            } else {
                // A link from the peer was admitted meanwhile: this one goes.
                conn.close_gracefully(None, shard.live.get().idle_timeout);
            }
            Ok(())
        }
        Frame::Error { code, message } => {
            let level_debug = code == ErrorCode::DUPLICATE_LINK;
            if level_debug {
                tracing::debug!(peer = i, "dial refused: {message}");
            } else {
                tracing::warn!(peer = i, code = code.name(), "dial refused: {message}");
            }
            conn.close_gracefully(None, shard.live.get().idle_timeout);
            Ok(())
        }
        Frame::Noop => Ok(()),
        _ => Err((ErrorCode::HANDSHAKE_REQUIRED, "expected WELCOME".into())),
    }
}

/// Delivers a forwarded group message to this node's members (only).
fn deliver_forward(shard: &Shard, group: &GroupName, sender: &MemberId, payload: &[u8]) {
    let mask = shard
        .shared
        .table
        .with(group, |e| e.map_or(0, |e| e.shard_mask()));
    if mask == 0 {
        ShardStats::add(&shard.stats().unrouted, 1);
        return;
    }
    let frame = crate::protocol::encode_group_message(FrameType::DELIVER, group, sender, payload);
    let n = shard.to_shards(group, &frame, mask, false);
    ShardStats::add(&shard.stats().deliveries, n);
}

fn remote_join(shard: &Shard, i: usize, group: &GroupName, member: &MemberId) {
    let ch = shard.shared.table.join_remote(group, member, i);
    if ch.changed {
        shard.membership_event(group, member.bytes(), Reason::Join, ch.size, ch.shards);
    }
}

fn remote_leave(shard: &Shard, i: usize, group: &GroupName, member: &MemberId, reason: Reason) {
    let ch = shard.shared.table.leave_remote(group, member, i);
    if ch.changed {
        let reason = if reason == Reason::Leave {
            Reason::Leave
        } else {
            Reason::Disconnect
        };
        shard.membership_event(group, member.bytes(), reason, ch.size, ch.shards);
    }
}

/// Every member of peer `i` leaves every view; local members of those
/// groups get one node-down event per group.
pub fn node_down(shard: &Shard, i: usize) {
    let name = shard
        .shared
        .cluster
        .slot(i)
        .map(|p| p.name)
        .unwrap_or_default();
    let subject = Bytes::from(name.clone());
    let groups = shard.shared.table.remote_groups(i);
    for (group, _) in &groups {
        let (ch, gone) = shard.shared.table.drop_remote(group, i);
        if gone > 0 && crate::protocol::validate_name(&subject).is_ok() {
            shard.membership_event(group, &subject, Reason::NodeDown, ch.size, ch.shards);
        }
    }
    tracing::warn!(
        peer = name,
        groups = groups.len(),
        "peer link down: its members left every group"
    );
}

/// `conn`, a link (or dial) of peer `i`, closed.
pub fn link_closed(shard: &Rc<Shard>, conn: &Rc<Conn>, i: usize) {
    shard.links.remove(i, conn.seq);
    if shard.shared.cluster.down(i, shard.index, conn.seq) {
        node_down(shard, i);
    }
}

/// Closes connection `seq` on this shard (a link replaced or removed).
pub fn close_conn(shard: &Shard, seq: u64) {
    let conn = shard.conns.borrow().get(&seq).cloned();
    if let Some(c) = conn {
        c.closing_as(Kill::Closed);
        shard.kill(&c, Kill::Closed);
    }
}

/// Sends `frame` to every peer with an up link.
pub fn broadcast(shard: &Shard, frame: &Bytes) {
    let mesh = &shard.shared.cluster;
    for i in 0..mesh.high_water() {
        if mesh.link_shard(i).is_some() {
            route_to_peer(shard, i, frame.clone());
        }
    }
}
