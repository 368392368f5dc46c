//! A peer link on its shard: admission, link-up (snapshot), the peer
//! frames, and link-down (members behind it leave every view).

use super::{route_to_peer, ClusterMsg};
use crate::cluster::leave::{link_end, LinkEnd};
use crate::cluster::machine::ViewAction;
use crate::cluster::mesh::LinkParams;
use crate::protocol::{
    encode_membership, list_budget, snapshot_flags, split_by_size, ErrorCode, Frame, FrameType,
    GroupMessage, GroupName, Hello, MemberId, Reason, Welcome, PROTOCOL_VERSION,
};
use crate::server::conn::{Conn, Reject};
use crate::server::shard::{Kill, Shard};
use crate::stats::ShardStats;
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

/// A HELLO with role peer arrived on `conn`: admit it or refuse it.
pub fn accept_peer(shard: &Rc<Shard>, conn: &Rc<Conn>, hello: &Hello) -> Result<(), Reject> {
    let mesh = &shard.shared.cluster;
    let name = hello
        .name
        .as_ref()
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default();
    let Some(i) = mesh.index_of(&name) else {
        if crate::logging::PEER_REFUSED.allow() {
            tracing::warn!(peer = %conn.addr, name, "refused a peer link: not in peers");
        }
        return Err((
            ErrorCode::NOT_ALLOWED,
            format!("node {name:?} is not in this node's peers"),
        ));
    };
    // The addresses were looked up off the shards (`resolve`): a HELLO
    // never waits for DNS.
    if !mesh.addrs.admits(i, conn.addr.ip()) {
        let unknown = mesh.addrs.addrs(i).is_empty();
        if crate::logging::PEER_REFUSED.allow() {
            let why = if unknown {
                "its address in peers does not resolve (yet)"
            } else {
                "address does not match peers"
            };
            tracing::warn!(peer = %conn.addr, name, "refused a peer link: {why}");
        }
        let msg = if unknown {
            format!("the address of node {name:?} in peers does not resolve (yet)")
        } else {
            format!("{} is not the address of node {name:?}", conn.addr.ip())
        };
        return Err((ErrorCode::NOT_ALLOWED, msg));
    }
    // Over TLS a peer proves itself with a certificate from tls_ca too.
    if shard.shared.tls.is_some() && !conn.peer_certified() {
        if crate::logging::PEER_REFUSED.allow() {
            tracing::warn!(peer = %conn.addr, name, "refused a peer link: no certificate from tls_ca");
        }
        let msg = "a peer link over TLS needs a certificate signed by tls_ca";
        return Err((ErrorCode::NOT_ALLOWED, msg.into()));
    }
    // With a cluster key, admission waits for the peer's PROOF.
    if super::auth::on_hello(shard, conn, i, &name, hello)? {
        return Ok(());
    }
    admit(shard, conn, i, &name, hello)
}

/// Admits peer `i` (`name`), whose `HELLO` (and `PROOF`, with a cluster
/// key) passed, on `conn`: it may replace the peer's existing link.
pub(super) fn admit(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    i: usize,
    name: &str,
    hello: &Hello,
) -> Result<(), Reject> {
    let mesh = &shard.shared.cluster;
    let features = hello.features & crate::protocol::features::ALL;
    let params = LinkParams {
        max_message_size: u64::from(hello.max_message_size),
        features: u64::from(features),
    };
    match mesh.admit(i, shard.index, conn.seq, params, || {
        node_down(shard, i, name, link_end(false, false))
    }) {
        crate::cluster::mesh::Admit::Duplicate => {
            // Part of normal mesh formation (both nodes dialled at once),
            // not bad input: refused, but not counted as a protocol error.
            tracing::debug!(peer = %name, "refused a duplicate link");
            let msg = "a link to this node exists already";
            shard.close_with_error(conn, ErrorCode::DUPLICATE_LINK, msg);
            Ok(())
        }
        crate::cluster::mesh::Admit::Accept { replace } => {
            if let Some((s, seq)) = replace {
                tracing::info!(target: crate::logging::OPS, peer = %name, "a new link from the peer replaced the old one");
                shard.send_to(
                    s,
                    crate::server::shared::ShardMsg::Cluster(ClusterMsg::Close { seq }),
                );
            }
            let live = shard.live.get();
            conn.become_peer(i, &live);
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                node: shard.shared.node.clone(),
                member: None,
                max_message_size: u32::try_from(live.max_message_size).unwrap_or(u32::MAX),
                idle_timeout_ms: u32::try_from(live.idle_timeout.as_millis()).unwrap_or(u32::MAX),
                features,
            };
            conn.peer_max.set(hello.max_message_size as usize);
            shard.push(conn, Frame::Welcome(welcome).to_bytes());
            link_up(shard, conn, i, name);
            Ok(())
        }
    }
}

/// The link to peer `i` is up on `conn`: register it and send our snapshot.
pub fn link_up(shard: &Shard, conn: &Rc<Conn>, i: usize, name: &str) {
    shard.links.insert(i, conn.clone());
    shard.links.start_view(i, conn.seq, name);
    shard.links.forget_heard(i);
    tracing::info!(target: crate::logging::OPS, peer = name, addr = %conn.addr, shard = shard.index, "peer link up");
    // The link is published (mesh state) before the snapshot reads the
    // table; a join elsewhere writes the table before reading the link
    // state (`local_join`). The fences make sure at least one of the two
    // sees the other, so no join falls between snapshot and broadcast.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let entries = shard.shared.table.local_snapshot();
    // Chunks fit the smaller of the two nodes' limits.
    let ours = shard.live.get().max_message_size;
    let limit = match conn.peer_max.get() {
        0 => ours,
        theirs => ours.min(theirs),
    };
    let parts = split_by_size(&entries, list_budget(limit), |(g, m)| {
        2 + g.as_bytes().len() + m.as_bytes().len()
    });
    let n = parts.len();
    for (c, part) in parts.into_iter().enumerate() {
        let mut flags = 0;
        if c == 0 {
            flags |= snapshot_flags::FIRST;
        }
        if c + 1 == n {
            flags |= snapshot_flags::LAST;
        }
        let frame = Frame::Snapshot {
            flags,
            entries: part.to_vec(),
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

/// As [`push_link`], copying a small `frame` (at most `COPY_MAX`) into the
/// link's queue (see `Outbound::push_copy`).
pub fn copy_link(shard: &Shard, conn: &Conn, i: usize, frame: &[u8]) {
    let c = &shard.shared.cluster.counters[i];
    if shard.push_copy(conn, frame) {
        c.msgs_out.fetch_add(1, Relaxed);
        c.bytes_out.fetch_add(frame.len() as u64, Relaxed);
    } else {
        c.dropped.fetch_add(1, Relaxed);
    }
}

/// Handles a FORWARD or FORWARD_SEQ from peer `i` where it lies in `buf`
/// (no frame value, no reference counts), as [`peer_frame`] would;
/// returns its length. `None` for anything else, or anything [`peer_frame`]
/// should judge (a name that breaks the rules, a sender of another node, a
/// link that is not the peer's current one), which then takes the general
/// path.
pub fn forward_in_place(
    shard: &Shard,
    conn: &Conn,
    i: usize,
    buf: &[u8],
    max_frame: usize,
) -> Option<usize> {
    let ty = FrameType(*buf.get(crate::protocol::LEN_PREFIX)?);
    if ty != FrameType::FORWARD && ty != FrameType::FORWARD_SEQ {
        return None;
    }
    let len = crate::protocol::peek_len(buf, max_frame).ok()??;
    let frame = buf.get(..crate::protocol::LEN_PREFIX + len)?;
    let (group, sender, seq, payload) = crate::protocol::group_message_parts(frame)?;
    crate::protocol::validate_name(group).ok()?;
    crate::protocol::validate_name(sender).ok()?;
    // Valid names are printable ASCII.
    let sender_str = std::str::from_utf8(sender).ok()?;
    let mesh = &shard.shared.cluster;
    if !mesh.is_current(i, shard.index, conn.seq)
        || !shard
            .links
            .with_view(i, conn.seq, |v| v.sender_ok(sender_str))
            .unwrap_or(true)
    {
        return None;
    }
    let c = &mesh.counters[i];
    c.msgs_in.fetch_add(1, Relaxed);
    c.bytes_in.fetch_add(payload.len() as u64, Relaxed);
    deliver_forward(shard, i, group, sender, seq, payload);
    Some(frame.len())
}

/// Handles a frame from peer `i` on `conn`.
///
/// Only the peer's up link is listened to. Our dial awaiting WELCOME gets
/// its reply; any other connection of the peer (a link replaced by a newer
/// one, our dial overtaken by the peer's) is closed, and what it still
/// carries is dropped, so that its membership frames cannot undo what the
/// newer link reported, nor its messages overtake the newer link's.
pub fn peer_frame(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    i: usize,
    frame: Frame,
) -> Result<(), Reject> {
    let mesh = &shard.shared.cluster;
    let c = &mesh.counters[i];
    c.msgs_in.fetch_add(1, Relaxed);
    if !mesh.is_current(i, shard.index, conn.seq) {
        if mesh.is_dialling(i, shard.index, conn.seq) {
            return dialled_reply(shard, conn, i, frame);
        }
        // A replaced link, or our dial overtaken by the peer's: it goes.
        if let Frame::Forward { .. } | Frame::ForwardDirect { .. } = frame {
            c.dropped.fetch_add(1, Relaxed);
            ShardStats::add(&shard.stats().dropped_peer, 1);
        }
        conn.close_gracefully(None, shard.live.get().idle_timeout);
        return Ok(());
    }
    match frame {
        Frame::Forward {
            group,
            sender,
            seq,
            payload,
        } => {
            c.bytes_in.fetch_add(payload.len() as u64, Relaxed);
            check_sender(shard, conn, i, &sender)?;
            deliver_forward(shard, i, group.as_bytes(), sender.as_bytes(), seq, &payload);
        }
        Frame::ForwardDirect {
            to,
            sender,
            payload,
        } => {
            c.bytes_in.fetch_add(payload.len() as u64, Relaxed);
            check_sender(shard, conn, i, &sender)?;
            match to.parts() {
                Some((node, _, _, _)) if node == shard.shared.node.as_str() => {
                    shard.send_direct(&sender, &to, &payload);
                }
                _ => ShardStats::add(&shard.stats().dropped_unknown_member, 1),
            }
        }
        // Membership is applied (and announced) with the link state locked,
        // so a replacement of this link cannot come in between: what it
        // drops stays dropped, and its node-down events follow ours.
        // The link's view (sans-IO, `cluster::machine`) decides; the
        // decision is applied with the link state locked, so a replacement
        // of this link cannot come in between: what it drops stays
        // dropped, and its node-down events follow ours.
        frame @ (Frame::PeerJoin { .. }
        | Frame::PeerLeave { .. }
        | Frame::Snapshot { .. }
        | Frame::NodeLeaving) => {
            let actions = shard
                .links
                .with_view(i, conn.seq, |v| v.on_frame(&frame))
                .unwrap_or_else(|| Ok(Vec::new()))?;
            let leaving = actions.contains(&ViewAction::Leaving);
            mesh.while_link(i, shard.index, conn.seq, || apply_view(shard, i, actions));
            if leaving {
                said_goodbye(shard, conn, i);
            }
        }
        Frame::Noop => {}
        Frame::Ping { token } => {
            shard.push(conn, Frame::Pong { token }.to_bytes());
        }
        Frame::Pong { token } => super::pong(shard, i, conn.seq, token),
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

/// A message's sender must be a member of peer `i`'s own node (its link's
/// view knows the name): a node cannot speak for another's members.
fn check_sender(shard: &Shard, conn: &Conn, i: usize, sender: &MemberId) -> Result<(), Reject> {
    shard
        .links
        .with_view(i, conn.seq, |v| v.check_sender(sender))
        .unwrap_or(Ok(()))
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
            super::auth::on_welcome(shard, conn, &name)?;
            let features = w.features & crate::protocol::features::ALL;
            conn.peer_max.set(w.max_message_size as usize);
            let params = LinkParams {
                max_message_size: u64::from(w.max_message_size),
                features: u64::from(features),
            };
            if mesh.dial_welcomed(i, shard.index, conn.seq, params) {
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
            } else if crate::logging::PEER_REFUSED.allow() {
                // Re-dialled every reconnect_interval: rate-limited.
                tracing::warn!(peer = i, code = code.name(), "dial refused: {message}");
            }
            conn.close_gracefully(None, shard.live.get().idle_timeout);
            Ok(())
        }
        Frame::Challenge { nonce, mac } => {
            let name = mesh.slot(i).map(|p| p.name).unwrap_or_default();
            super::auth::on_challenge(shard, conn, &name, &nonce, &mac)
        }
        Frame::Noop => Ok(()),
        _ => Err((ErrorCode::HANDSHAKE_REQUIRED, "expected WELCOME".into())),
    }
}

/// Delivers a forwarded group message to this node's members (only).
///
/// The group is remembered as one peer `i` publishes to (its members are
/// told node-down if the link goes). A message for a group with no
/// members here any more (they left while it was on its way) is counted
/// as `left`.
fn deliver_forward(
    shard: &Shard,
    i: usize,
    group: &[u8],
    sender: &[u8],
    seq: Option<u64>,
    payload: &[u8],
) {
    let (mask, seq_mask) = shard.shared.table.with_group(group, |e| {
        e.map_or((0, 0), |e| {
            if shard.links.heard_new(i, e) {
                shard.shared.cluster.heard(i, e);
            }
            (e.shard_mask(), e.seq_mask())
        })
    });
    if mask == 0 {
        ShardStats::add(&shard.stats().dropped_left, 1);
        return;
    }
    let numbered = seq.filter(|_| seq_mask & mask != 0);
    let msg = GroupMessage {
        ty: if numbered.is_some() {
            FrameType::DELIVER_SEQ
        } else {
            FrameType::DELIVER
        },
        group,
        sender,
        seq: numbered,
        payload,
    };
    let n = shard.to_shards(&msg, mask, seq);
    ShardStats::bump(&shard.stats().deliveries, n);
}

/// Applies what peer `i`'s link view decided. Runs with the link state
/// locked.
fn apply_view(shard: &Shard, i: usize, actions: Vec<ViewAction>) {
    // A member of many groups comes in consecutive snapshot entries:
    // store one compact copy of its id for all of them.
    let mut last: Option<MemberId> = None;
    for a in actions {
        match a {
            ViewAction::Join { group, member } => {
                let owned = match &last {
                    Some(m) if *m == member => m.clone(),
                    _ => member.compact(),
                };
                remote_join(shard, i, &group, &owned);
                last = Some(owned);
            }
            ViewAction::Leave {
                group,
                member,
                reason,
            } => remote_leave(shard, i, &group, &member, reason),
            // Acted on by the caller, outside the lock.
            ViewAction::Leaving => {}
            ViewAction::ViewComplete => {
                // The node's view is whole again: what it lost while down
                // is no longer counted against it.
                for g in shard.shared.cluster.take_ghosts(i) {
                    shard.shared.table.clear_ghost(&g, i);
                }
            }
        }
    }
}

/// A member of peer `i` joined `group`; `member` is an owned copy (it is
/// stored). Runs with the link state locked.
fn remote_join(shard: &Shard, i: usize, group: &GroupName, member: &MemberId) {
    let ch = shard.shared.table.join_remote(group.as_bytes(), member, i);
    if ch.changed {
        let g = group.as_bytes();
        let frame = encode_membership(g, Reason::Join, ch.size, member.as_bytes());
        shard.membership_event(g, &frame, ch.seq, ch.shards);
    }
}

/// A member of peer `i` left `group`. Runs with the link state locked.
fn remote_leave(shard: &Shard, i: usize, group: &GroupName, member: &MemberId, reason: Reason) {
    let ch = shard
        .shared
        .table
        .leave_remote(group.as_bytes(), member.as_bytes(), i);
    if ch.changed {
        let reason = if reason == Reason::Leave {
            Reason::Leave
        } else {
            Reason::Disconnect
        };
        let g = group.as_bytes();
        let frame = encode_membership(g, reason, ch.size, member.as_bytes());
        shard.membership_event(g, &frame, ch.seq, ch.shards);
    }
}

/// Peer `i`'s link `conn` said `NODE_LEAVING`: everything the node sent
/// came before it (delivered by now), and it has no members left but the
/// ones that leave with it. The link closes at once; what was still queued
/// to it is counted `left`, and its members leave as it closes
/// ([`link_closed`]) with reason node-left.
fn said_goodbye(shard: &Shard, conn: &Conn, i: usize) {
    shard.links.goodbye(i, conn.seq);
    let name = shard.shared.cluster.slot(i).map(|p| p.name);
    tracing::info!(target: crate::logging::OPS, peer = ?name, "peer leaving the cluster: closing its link");
    shard.kill(conn, Kill::Left);
}

/// Every member of peer `i` (node `name`) leaves every view; local members
/// of those groups get one event per group with `end.reason` (node-down,
/// or node-left when the node said goodbye), and when `end` says so, so
/// do the members of every group the node published to over the link.
/// Groups where it had members remember it when `end.remember` (ghosts:
/// publishes to them count as lost for it until its next view). See
/// [`crate::cluster::leave::link_end`].
/// Runs with the link state locked (by [`Mesh::down`](super::Mesh::down)
/// or [`Mesh::admit`](super::Mesh::admit)): it must not call into the
/// mesh's link state (its ghost and heard lists have their own locks).
#[allow(clippy::mutable_key_type)] // a Group hashes by its name, which never changes
fn node_down(shard: &Shard, i: usize, name: &str, end: LinkEnd) {
    let subject = name.as_bytes();
    let valid = crate::protocol::validate_name(subject).is_ok();
    let table = &shard.shared.table;
    let mesh = &shard.shared.cluster;
    let groups = table.remote_groups(i);
    let mut lost = Vec::with_capacity(groups.len());
    let mut changes = Vec::with_capacity(groups.len());
    for group in &groups {
        let (ch, gone) = table.drop_remote(group, i, end.remember);
        lost.push((group.clone(), gone));
        changes.push(ch);
    }
    let mut heard = mesh.take_heard(i);
    if !end.tell_publishers {
        heard.clear();
    }
    let heard_count = heard.len();
    let plan = crate::cluster::machine::node_down(
        &lost,
        heard,
        |g: &crate::router::Group| g.shard_mask() != 0,
        !end.remember,
    );
    mesh.add_ghosts(i, plan.ghosts);
    if valid {
        let at: std::collections::HashMap<*const crate::router::GroupEntry, usize> = lost
            .iter()
            .enumerate()
            .filter(|(_, (_, gone))| *gone > 0)
            .map(|(k, (g, _))| (&**g as *const crate::router::GroupEntry, k))
            .collect();
        for group in &plan.tell {
            // A group that lost members has its change; one the node only
            // published to gets a fresh number (it changes nothing).
            let change = at
                .get(&(&**group as *const crate::router::GroupEntry))
                .map(|&k| (changes[k].seq, changes[k].size, changes[k].shards));
            let (seq, size, shards) = change.unwrap_or_else(|| {
                let st = group.lock();
                (table.next_change(), st.size(), group.shard_mask())
            });
            let g = group.name();
            let frame = encode_membership(g, end.reason, size, subject);
            shard.membership_event(g, &frame, seq, shards);
        }
    }
    shard.links.forget_heard(i);
    if end.reason == Reason::NodeLeft {
        tracing::info!(
            target: crate::logging::OPS,
            peer = name,
            groups = groups.len(),
            "peer left the cluster: its members left every group"
        );
    } else if mesh.departure() != crate::cluster::leave::Phase::Serving {
        tracing::info!(target: crate::logging::OPS, peer = name, "leaving the cluster: link closed");
    } else {
        tracing::warn!(
            target: crate::logging::OPS,
            peer = name,
            groups = groups.len(),
            published_to = heard_count,
            "peer link down: its members left every group"
        );
    }
}

/// `conn`, a link (or dial) of peer `i`, closed.
pub fn link_closed(shard: &Rc<Shard>, conn: &Rc<Conn>, i: usize) {
    if shard.links.get_if(i, conn.seq).is_some() {
        let c = &shard.shared.cluster.counters[i];
        c.queued_frames.store(0, Relaxed);
        c.queued_bytes.store(0, Relaxed);
    }
    // Barriers waiting on this link pass (a new link starts with a
    // snapshot that holds every join); its view ends. Keyed by the
    // connection: a newer link of the peer on this shard keeps its own.
    super::link_gone(shard, i, conn.seq);
    shard.links.remove(i, conn.seq);
    shard.links.forget_heard(i);
    let mesh = &shard.shared.cluster;
    let name = mesh.slot(i).map(|p| p.name).unwrap_or_default();
    // Whether a reload removed the peer is read under the mesh's lock.
    let goodbye = shard.links.take_goodbye(i, conn.seq);
    mesh.down(i, shard.index, conn.seq, |removed| {
        node_down(shard, i, &name, link_end(goodbye, removed))
    });
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

/// This node is leaving: says goodbye on every link here (`NODE_LEAVING`,
/// then close once flushed, where the peer speaks it; a plain close where
/// it does not). Everything queued on a link before goes out first.
pub fn say_goodbye(shard: &Shard) {
    let links: Vec<(usize, Rc<Conn>)> = shard
        .links
        .links
        .borrow()
        .iter()
        .map(|(i, c)| (*i, c.clone()))
        .collect();
    let grace = crate::server::SHUTDOWN_GRACE;
    for (i, conn) in links {
        let features = shard.shared.cluster.counters[i].features.load(Relaxed);
        let speaks = features & u64::from(crate::protocol::features::LEAVING) != 0;
        let last = speaks.then(|| Frame::NodeLeaving.to_bytes());
        conn.close_gracefully(last, grace);
    }
}
