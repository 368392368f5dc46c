//! The mesh: one link to every other node in `peers`, membership carried
//! across them, publishes forwarded once per interested node.
//!
//! - `mesh`: the shared peer list, link states and the admission rule that
//!   keeps one link per pair.
//! - `link`: a link on its shard: snapshot on link-up, peer frames,
//!   node-down on link loss.
//! - `dial`: the per-peer dialler, re-dialling every reconnect_interval.
//!
//! A publish goes to this node's members and once to each node with
//! members (encoded once for all of them); the receiving node delivers
//! locally and never forwards again, so the full mesh has no loops.

pub mod dial;
pub mod link;
pub mod mesh;

pub use link::{accept_peer, link_closed, peer_frame};
pub use mesh::Mesh;

use crate::config::ServerSettings;
use crate::protocol::{encode_group_message, Frame, FrameType, GroupName, MemberId, Reason};
use crate::router::Group;
use crate::server::conn::Conn;
use crate::server::flow::Gate;
use crate::server::shard::Shard;
use crate::server::shared::{ShardMsg, Shared};
use crate::stats::ShardStats;
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::HashMap;
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
}

/// The peer links living on one shard, by peer index.
#[derive(Default)]
pub struct ShardLinks(RefCell<HashMap<usize, Rc<Conn>>>);

impl ShardLinks {
    /// Registers `conn` as peer `i`'s link.
    pub fn insert(&self, i: usize, conn: Rc<Conn>) {
        self.0.borrow_mut().insert(i, conn);
    }

    /// Forgets peer `i`'s link if it is connection `seq`.
    pub fn remove(&self, i: usize, seq: u64) {
        let mut m = self.0.borrow_mut();
        if m.get(&i).is_some_and(|c| c.seq == seq) {
            m.remove(&i);
        }
    }

    /// Peer `i`'s link here if it is connection `seq`.
    pub fn get_if(&self, i: usize, seq: u64) -> Option<Rc<Conn>> {
        self.0.borrow().get(&i).filter(|c| c.seq == seq).cloned()
    }
}

/// Sends `frame` to peer `i` over its up link, wherever the link lives.
#[inline]
pub fn route_to_peer(shard: &Shard, i: usize, frame: Bytes) {
    match shard.shared.cluster.link_of(i) {
        Some((s, seq)) if s == shard.index => match shard.links.get_if(i, seq) {
            Some(conn) => link::push_link(shard, &conn, i, frame),
            None => drop_for_peer(shard, i),
        },
        Some((s, seq)) => shard.shared.send(
            s,
            ShardMsg::Cluster(ClusterMsg::ToPeer {
                peer: i,
                seq,
                frame,
                producer: shard.producer(),
            }),
        ),
        None => drop_for_peer(shard, i),
    }
}

fn drop_for_peer(shard: &Shard, i: usize) {
    shard.shared.cluster.counters[i]
        .dropped
        .fetch_add(1, Relaxed);
    ShardStats::add(&shard.stats().dropped_peer, 1);
}

/// Forwards a local publish once to every node with members in `group`.
pub fn forward(shard: &Shard, sender: &MemberId, group: &GroupName, payload: &[u8]) {
    let frame = encode_group_message(FrameType::FORWARD, group, sender, payload);
    shard.shared.table.with(group.as_bytes(), |e| {
        if let Some(e) = e {
            e.node_mask()
                .for_each(|j| route_to_peer(shard, j, frame.clone()));
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

/// A local member joined: tell every peer.
pub fn local_join(shard: &Shard, group: &Group, member: &MemberId) {
    // The join is in the table; read the link states only after it (see
    // `link::link_up`, which does the converse before its snapshot).
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if shard.shared.cluster.high_water() > 0 {
        let frame = Frame::PeerJoin {
            group: group.group_name(),
            member: member.clone(),
        };
        link::broadcast(shard, &frame.to_bytes());
    }
}

/// A local member left: tell every peer.
pub fn local_leave(shard: &Shard, group: &Group, member: &MemberId, reason: Reason) {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
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
            match shard.links.get_if(peer, seq) {
                Some(conn) => link::push_link(shard, &conn, peer, frame),
                None => drop_for_peer(shard, peer),
            }
        }
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
    let (added, removed, moved) = mesh.apply_peers(s);
    for i in removed.iter().chain(&moved) {
        let name = mesh.slot(*i).map(|p| p.name).unwrap_or_default();
        tracing::info!(peer = name, "peers changed: closing its link");
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
            peer = mesh.slot(i).map(|p| p.name).unwrap_or_default(),
            "peers changed: new peer"
        );
        shared.send(
            i % shared.shards(),
            ShardMsg::Cluster(ClusterMsg::StartDialer { peer: i }),
        );
    }
}
