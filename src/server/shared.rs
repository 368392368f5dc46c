//! State shared by every shard of one server: identity, the group table,
//! the shards' inboxes and counters, and the live settings. Nothing here is
//! locked on the publish path: the table is lock-free for readers and the
//! inboxes are flume channels.

use super::flow::Gate;
use super::inbox::Inbox;
use super::shard::Shard;
use super::Live;
use crate::protocol::NodeName;
use crate::router::GroupTable;
use crate::stats::{Counts, ShardStats};
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A message from one shard to another. Those carrying a frame carry its
/// producer's gate too: the receiving shard may make that producer wait
/// (a slow member there), and the inbox does when it is over its bound.
#[derive(Debug)]
pub enum ShardMsg {
    /// Group messages (DELIVER or DELIVER_SEQ frames, with their publish
    /// numbers) for the local members of their groups: what one producer's
    /// turn routed to the receiving shard, in order, in one message.
    DeliverBatch {
        /// The frames and their publish numbers, oldest first.
        frames: Vec<(Bytes, Option<u64>)>,
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
            ShardMsg::DeliverBatch { frames, .. } => frames
                .iter()
                .map(|(f, _)| f.len() + super::inbox::MSG_OVERHEAD)
                .sum(),
            _ => 0,
        }
    }

    /// How many messages for members or a peer it carries (what is
    /// counted as dropped if it is never handled).
    pub fn messages(&self) -> u64 {
        match self {
            ShardMsg::DeliverBatch { frames, .. } => frames.len() as u64,
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
    /// The live settings (changed by reload).
    pub live: Mutex<Live>,
    /// The cluster's shared state.
    pub cluster: crate::cluster::Mesh,
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
            "drops": {
                "stuck": totals.dropped_stuck,
                "idle": totals.dropped_idle,
                "protocol_error": totals.dropped_protocol,
                "closed": totals.dropped_closed,
                "unknown_member": totals.dropped_unknown_member,
                "peer": totals.dropped_peer,
                "peer_too_large": totals.dropped_peer_too_large,
                "left": totals.dropped_left,
                "shutdown": totals.dropped_shutdown,
            },
            "memory": {
                "rss_bytes": super::memory::rss_bytes(),
            },
            "per_shard": per_shard,
            "inboxes": self.inboxes.iter().map(|i| serde_json::json!({
                "bytes": i.bytes(),
                "msgs": i.len(),
            })).collect::<Vec<_>>(),
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
