//! What the monitoring endpoint knows, and how it learns it.
//!
//! Two sources, neither touching the publish path:
//!
//! - **Shared state, read from the monitor's thread**: the shards' counters
//!   (relaxed loads of the atomics each shard already writes), inbox
//!   depths, the group table (its length; a group's member set under the
//!   group's own mutex, which only joins, leaves and queries take), and the
//!   mesh's peer slots and counters.
//! - **Questions to the shards** ([`ask`]): what only a shard holds (its
//!   connections, their queues and groups) is read on the shard's own
//!   thread, the way a STATS-like request would be: a closure goes through
//!   the shard's inbox ([`ShardMsg::Inspect`]), runs between two inbox
//!   messages, and answers over a oneshot channel; the monitor waits at
//!   most [`ANSWER_TIMEOUT`]. A shard that does not answer in time is
//!   reported as such (and fails `/healthz`). Nothing is kept up to date
//!   for the monitor's sake: these figures cost the shard only when
//!   someone asks (a scrape walks each shard's connections once).

use crate::server::conn::{Conn, ConnRole};
use crate::server::shard::Shard;
use crate::server::shared::{Inspect, ShardMsg, Shared};
use crate::stats::Counts;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::{self, Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

/// How long the monitor waits for a shard's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Most group names listed per connection in `/connz` (the count is
/// always given).
pub const MAX_GROUPS_LISTED: usize = 1000;

/// A shard's answer, or why there is none.
#[derive(Debug)]
pub enum Answer<T> {
    /// It answered.
    Ok(T),
    /// It has exited (its inbox is closed).
    Exited,
    /// It did not answer within [`ANSWER_TIMEOUT`].
    Late,
}

impl<T> Answer<T> {
    /// The answer, if there is one.
    pub fn ok(&self) -> Option<&T> {
        match self {
            Answer::Ok(t) => Some(t),
            _ => None,
        }
    }
}

/// Questions a shard may have queued and unanswered; past it the shard
/// is reported late without being asked (a stuck shard's inbox does not
/// fill with the questions of every scrape).
pub const INSPECTIONS_QUEUED: usize = 4;

/// Runs `f` on every shard's thread; one answer per shard, in order.
pub async fn ask<T, F>(shared: &Shared, f: F) -> Vec<Answer<T>>
where
    T: Send + 'static,
    F: Fn(&Rc<Shard>) -> T + Clone + Send + 'static,
{
    let every = vec![true; shared.shards()];
    ask_only(shared, &every, f)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Runs `f` on the threads of the shards that `which` marks (by index); one
/// entry per shard, in order, `None` for a shard not asked. All answers
/// share one deadline, so the wait is at most [`ANSWER_TIMEOUT`].
pub async fn ask_only<T, F>(shared: &Shared, which: &[bool], f: F) -> Vec<Option<Answer<T>>>
where
    T: Send + 'static,
    F: Fn(&Rc<Shard>) -> T + Clone + Send + 'static,
{
    let pending: Vec<_> = (0..shared.shards())
        .map(|i| {
            if !which.get(i).copied().unwrap_or(false) {
                return Ok(None);
            }
            let queued = &shared.inspections[i];
            if queued.fetch_add(1, Ordering::AcqRel) >= INSPECTIONS_QUEUED {
                queued.fetch_sub(1, Ordering::AcqRel);
                return Err(());
            }
            let (tx, rx) = oneshot::channel();
            let f = f.clone();
            let done = Queued(shared.inspections.clone(), i);
            let job = Inspect(Box::new(move |shard: &Rc<Shard>| {
                let answer = f(shard);
                // Counted off before the answer is seen.
                drop(done);
                let _ = tx.send(answer);
            }));
            shared.send(i, ShardMsg::Inspect(job));
            Ok(Some(rx))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let mut out = Vec::with_capacity(pending.len());
    for rx in pending {
        out.push(match rx {
            Ok(None) => None,
            // Too many questions queued already: late without asking.
            Err(()) => Some(Answer::Late),
            Ok(Some(rx)) => Some(match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(t)) => Answer::Ok(t),
                Ok(Err(_)) => Answer::Exited,
                Err(_) => Answer::Late,
            }),
        });
    }
    out
}

/// A question queued on shard `.1`: counted off when it has run or was
/// dropped unrun.
struct Queued(Arc<[std::sync::atomic::AtomicUsize]>, usize);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Outbound queue depth over a shard's connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Frames queued, summed.
    pub frames: u64,
    /// Bytes queued, summed.
    pub bytes: u64,
    /// Frames in the fullest queue (by frames).
    pub max_frames: u64,
    /// Bytes in the fullest queue (by bytes).
    pub max_bytes: u64,
}

impl QueueDepth {
    fn add(&mut self, frames: usize, bytes: usize) {
        let (f, b) = (frames as u64, bytes as u64);
        self.frames += f;
        self.bytes += b;
        self.max_frames = self.max_frames.max(f);
        self.max_bytes = self.max_bytes.max(b);
    }
}

/// What a shard says of itself (answered on its thread).
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardSummary {
    /// Group memberships of its clients.
    pub memberships: u64,
    /// Its connections' outbound queues.
    pub queue: QueueDepth,
}

/// The summary of the shard it runs on.
pub fn summary(shard: &Rc<Shard>) -> ShardSummary {
    let mut s = ShardSummary::default();
    for c in shard.conns.borrow().values() {
        let (frames, bytes) = c.out.pending();
        s.queue.add(frames, bytes);
        if c.is_client() {
            s.memberships += c.groups.borrow().len() as u64;
        }
    }
    s
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No HELLO yet.
    Pending,
    /// An application.
    Client,
    /// Peer node (index into the mesh's peers).
    Peer(usize),
}

/// What `/connz` sorts and pages by, of one connection: numbers only,
/// cheap to gather for every connection of a node.
#[derive(Debug, Clone, Copy)]
pub struct ConnKey {
    /// Its shard.
    pub shard: usize,
    /// Its sequence number on the shard.
    pub seq: u64,
    /// Groups joined.
    pub group_count: usize,
    /// Frames queued to it.
    pub queue_frames: u64,
    /// Bytes queued to it.
    pub queue_bytes: u64,
    /// Bytes read from its socket.
    pub bytes_in: u64,
    /// Bytes written to its socket.
    pub bytes_out: u64,
    /// When it opened.
    pub since: SystemTime,
}

/// What `/connz` shows of one connection besides its [`ConnKey`] (read
/// only for the connections of the page asked for).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Its sequence number on its shard.
    pub seq: u64,
    /// Its member id.
    pub id: String,
    /// The remote address.
    pub addr: SocketAddr,
    /// Client, peer or pending.
    pub role: Role,
    /// Groups joined (at most [`MAX_GROUPS_LISTED`], sorted).
    pub groups: Vec<String>,
}

fn conn_key(shard: usize, c: &Conn, now: SystemTime) -> ConnKey {
    let (frames, bytes) = c.out.pending();
    ConnKey {
        shard,
        seq: c.seq,
        group_count: c.groups.borrow().len(),
        queue_frames: frames as u64,
        queue_bytes: bytes as u64,
        bytes_in: c.bytes_in.get(),
        bytes_out: c.bytes_out.get(),
        since: now - c.opened().elapsed(),
    }
}

fn conn_info(c: &Conn) -> ConnInfo {
    let role = match c.role.get() {
        ConnRole::Pending => Role::Pending,
        ConnRole::Client => Role::Client,
        ConnRole::Peer(i) => Role::Peer(i),
    };
    let mut groups: Vec<String> = c
        .groups
        .borrow()
        .iter()
        .map(|g| String::from_utf8_lossy(g.name()).into_owned())
        .collect();
    groups.sort_unstable();
    groups.truncate(MAX_GROUPS_LISTED);
    ConnInfo {
        seq: c.seq,
        id: c.id.as_str().to_owned(),
        addr: c.addr,
        role,
        groups,
    }
}

/// The figures of every connection of the shard it runs on.
pub fn connection_keys(shard: &Rc<Shard>) -> Vec<ConnKey> {
    let now = SystemTime::now();
    shard
        .conns
        .borrow()
        .values()
        .map(|c| conn_key(shard.index, c, now))
        .collect()
}

/// The rest of the view of the connections `seqs` of the shard it runs
/// on (those still open).
pub fn connections_of(shard: &Rc<Shard>, seqs: &[u64]) -> Vec<ConnInfo> {
    let conns = shard.conns.borrow();
    seqs.iter()
        .filter_map(|seq| conns.get(seq))
        .map(|c| conn_info(c))
        .collect()
}

/// One shard's figures.
#[derive(Debug, Clone)]
pub struct ShardSnap {
    /// Its counters (those in STATS).
    pub counts: Counts,
    /// Messages waiting in its inbox.
    pub inbox_msgs: u64,
    /// Bytes waiting in its inbox.
    pub inbox_bytes: u64,
    /// Its own summary, when it answered in time.
    pub summary: Option<ShardSummary>,
}

/// Where a peer's link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No link.
    Down,
    /// We are dialling it.
    Dialling,
    /// Up; `dialled`: this node dialled it.
    Up {
        /// True when this node dialled the link.
        dialled: bool,
    },
}

impl LinkState {
    /// "down", "dialling" or "up".
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Dialling => "dialling",
            LinkState::Up { .. } => "up",
        }
    }
}

/// One configured peer and its link.
#[derive(Debug, Clone)]
pub struct PeerSnap {
    /// Its name in `peers`.
    pub name: String,
    /// `host:port` dialled.
    pub address: String,
    /// The link's state.
    pub state: LinkState,
    /// When the state last changed.
    pub since: SystemTime,
    /// Times the link came up after the first time.
    pub reconnects: u64,
    /// Why our last dial connected but did not link up (see
    /// [`crate::cluster::mesh::PeerSlot::link_error`]).
    pub link_error: Option<String>,
    /// Frames received on the link.
    pub msgs_in: u64,
    /// Frames queued to the link.
    pub msgs_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes queued.
    pub bytes_out: u64,
    /// Messages for it dropped, all reasons.
    pub dropped: u64,
    /// ... while its link was down.
    pub dropped_down: u64,
    /// ... queued on its link when the link died.
    pub dropped_link_lost: u64,
    /// ... larger than its `max_message_size`.
    pub dropped_too_large: u64,
    /// Frames pending on the link (as of its shard's last sweep).
    pub queued_frames: u64,
    /// Bytes pending on the link.
    pub queued_bytes: u64,
}

/// Every configured peer, in index order.
pub fn peers(shared: &Shared) -> Vec<PeerSnap> {
    let mesh = &shared.cluster;
    mesh.indices()
        .into_iter()
        .filter_map(|i| {
            let slot = mesh.slot(i)?;
            let c = mesh.counters.get(i)?;
            let state = match slot.state {
                crate::cluster::mesh::LinkState::Down => LinkState::Down,
                crate::cluster::mesh::LinkState::Dialling { .. } => LinkState::Dialling,
                crate::cluster::mesh::LinkState::Up { dialled, .. } => LinkState::Up { dialled },
            };
            Some(PeerSnap {
                name: slot.name,
                address: slot.addr,
                state,
                since: slot.since,
                reconnects: slot.reconnects,
                link_error: slot.link_error,
                msgs_in: c.msgs_in.load(Relaxed),
                msgs_out: c.msgs_out.load(Relaxed),
                bytes_in: c.bytes_in.load(Relaxed),
                bytes_out: c.bytes_out.load(Relaxed),
                dropped: c.dropped.load(Relaxed),
                dropped_down: c.dropped_down.load(Relaxed),
                dropped_link_lost: c.dropped_link_lost.load(Relaxed),
                dropped_too_large: c.dropped_too_large.load(Relaxed),
                queued_frames: c.queued_frames.load(Relaxed),
                queued_bytes: c.queued_bytes.load(Relaxed),
            })
        })
        .collect()
}

/// Everything `/metrics` reports.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node's name.
    pub node: String,
    /// "uring" or "epoll".
    pub backend: &'static str,
    /// Seconds since the server started.
    pub uptime_secs: f64,
    /// Groups with members (or remembered for a lost node).
    pub groups: u64,
    /// Resident set size of the process.
    pub rss_bytes: Option<u64>,
    /// Per shard, by index.
    pub shards: Vec<ShardSnap>,
    /// Per configured peer.
    pub peers: Vec<PeerSnap>,
}

/// Gathers a [`Snapshot`]: counters read here, summaries asked of the shards.
pub async fn snapshot(shared: &Shared) -> Snapshot {
    let answers = ask(shared, |s: &Rc<Shard>| summary(s)).await;
    let shards = shared
        .stats
        .iter()
        .zip(&shared.inboxes)
        .zip(answers)
        .map(|((st, inbox), a)| ShardSnap {
            counts: st.snapshot(),
            inbox_msgs: inbox.len() as u64,
            inbox_bytes: inbox.bytes() as u64,
            summary: a.ok().copied(),
        })
        .collect();
    Snapshot {
        node: shared.node.as_str().to_owned(),
        backend: shared.backend,
        uptime_secs: shared.started.elapsed().as_secs_f64(),
        groups: shared.table.len() as u64,
        rss_bytes: crate::server::memory::rss_bytes(),
        shards,
        peers: peers(shared),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::server::Server;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn only_the_shards_marked_are_asked() {
        let text = "msgc_server {\n node = \"t\"\n shards = 2\n io_backend = epoll\n}\n\
                    msgcserver_listener { listen \"127.0.0.1:0\" { } }\n";
        let config = Config::parse_str("t.conf", text).expect("config parses");
        let server = Server::start(&config, None).expect("server starts");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let runs = Arc::new(AtomicUsize::new(0));
        let count = runs.clone();
        let asked = rt.block_on(ask_only(
            server.shared(),
            &[false, true],
            move |s: &Rc<Shard>| {
                count.fetch_add(1, Relaxed);
                s.index
            },
        ));
        assert!(
            matches!(asked.as_slice(), [None, Some(Answer::Ok(1))]),
            "{:?}",
            asked
                .iter()
                .map(|a| a.as_ref().map(|a| a.ok().copied()))
                .collect::<Vec<_>>()
        );
        assert_eq!(runs.load(Relaxed), 1, "shard 0 ran the question");
        let all = rt.block_on(ask(server.shared(), |s: &Rc<Shard>| s.index));
        assert_eq!(
            all.iter().map(|a| a.ok().copied()).collect::<Vec<_>>(),
            [Some(0), Some(1)]
        );
        server.shutdown();
    }
}
