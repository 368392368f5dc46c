//! A clean leave of the cluster (SIGTERM, SIGINT, SIGUSR2 in
//! `msgc-server`): drives [`crate::cluster::leave::Departure`] over the
//! shards, each step run on every shard through its inbox.
//!
//! 1. New connections are refused (`ERROR SHUTTING_DOWN`); clients that
//!    asked for `LEAVING` get `MOVE` and reconnect elsewhere, re-join,
//!    and close their connection here.
//! 2. Once they are gone (or `lame_duck_duration` has passed), the other
//!    clients are closed, and their members' leaves are no longer
//!    announced one by one.
//! 3. After every shard has done so (so every message those clients
//!    published is queued on the links, shard inboxes being in order), each
//!    link gets `NODE_LEAVING` behind it: the peers deliver what came
//!    before, then drop this node's members with reason node-left.

use super::shard::Shard;
use super::shared::{Inspect, ShardMsg, Shared};
use crate::cluster::leave::{Departure, Phase, Step};
use crate::protocol::{features, Frame};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often the drain looks at the clients left.
const POLL: Duration = Duration::from_millis(20);

/// Longest wait for one shard to answer a step.
const ANSWER: Duration = Duration::from_secs(1);

/// What a leave did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Clients told to move.
    pub told: usize,
    /// Clients still connected when the wait ended, closed by the node.
    pub closed: usize,
    /// Peer links told goodbye (`NODE_LEAVING`, or closed where the peer
    /// does not speak it).
    pub links: usize,
    /// How long the clients took to move (or the bound).
    pub drained_in: Duration,
    /// Every drop counted over the server's life, read once its shards
    /// have stopped (so those at the stop are in: `closed`, `shutdown`).
    pub drops: crate::stats::Counts,
}

/// Runs the leave to its end (the shards are then stopped by the caller).
/// `interrupt` returning true cuts the wait for clients short.
pub fn run(shared: &Shared, mut interrupt: impl FnMut() -> bool) -> Report {
    let live = shared.live();
    let bound = live.lame_duck_duration;
    let has_peers = !shared.cluster.indices().is_empty();
    let mut departure = Departure::new(bound, has_peers);
    let start = Instant::now();
    let mut report = Report::default();
    loop {
        let movable = match departure.phase() {
            // A shard that does not answer may still hold movable clients.
            Phase::Draining => on_each(shared, ANSWER, movable_clients).at_least_if_late(1),
            _ => 0,
        };
        let elapsed = if interrupt() { bound } else { start.elapsed() };
        match departure.next(elapsed, movable) {
            Step::Move { deadline_ms } => {
                shared.cluster.set_departure(Phase::Draining);
                report.told = on_each(shared, ANSWER, move |s| tell_move(s, deadline_ms)).sum;
                tracing::info!(target: crate::logging::OPS, clients = report.told, ?bound,
                    "leaving the cluster: clients told to move");
            }
            Step::Wait => std::thread::sleep(POLL),
            Step::CloseClients => {
                report.drained_in = start.elapsed();
                shared.cluster.set_departure(Phase::Final);
                // Every shard must have closed its clients before any
                // link says goodbye, so that nothing they published can
                // follow NODE_LEAVING: wait for all (a stuck shard at most
                // the shutdown grace).
                let closed = on_each(shared, super::SHUTDOWN_GRACE, close_clients);
                if !closed.all {
                    tracing::warn!(target: crate::logging::OPS, "leaving: a shard did not confirm closing its clients within the shutdown grace");
                }
                report.closed = closed.sum;
            }
            Step::Goodbye => {
                shared.cluster.set_departure(Phase::Gone);
                report.links = on_each(shared, ANSWER, |s| {
                    let n = s.links.count();
                    super::peers::say_goodbye(s);
                    n
                })
                .sum;
                wait_links_down(shared, super::SHUTDOWN_GRACE);
                tracing::info!(target: crate::logging::OPS, closed = report.closed, links = report.links,
                    drained_in = ?report.drained_in, "left the cluster");
            }
            Step::Done => return report,
        }
    }
}

/// The answers of every shard to one question, added up.
struct Answers {
    sum: usize,
    /// Every shard answered in time.
    all: bool,
}

impl Answers {
    /// The sum, or at least `floor` when a shard did not answer.
    fn at_least_if_late(&self, floor: usize) -> usize {
        if self.all {
            self.sum
        } else {
            self.sum.max(floor)
        }
    }
}

/// Runs `f` on every shard (in its inbox's order) and adds up the answers
/// that come `within` (a late shard adds nothing, and `all` is false).
fn on_each(
    shared: &Shared,
    within: Duration,
    f: impl Fn(&Rc<Shard>) -> usize + Send + Clone + 'static,
) -> Answers {
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..shared.shards() {
        let (tx, f) = (tx.clone(), f.clone());
        let run = move |s: &Rc<Shard>| {
            let _ = tx.send(f(s));
        };
        shared.send(i, ShardMsg::Inspect(Inspect(Box::new(run))));
    }
    drop(tx);
    let deadline = Instant::now() + within;
    let mut answers = Answers { sum: 0, all: true };
    for _ in 0..shared.shards() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(n) => answers.sum += n,
            Err(_) => {
                answers.all = false;
                break;
            }
        }
    }
    answers
}

/// Open client connections here that were granted `LEAVING` (they move).
/// Counted in place (the drain asks every `POLL`): nothing is cloned.
fn movable_clients(shard: &Rc<Shard>) -> usize {
    shard
        .conns
        .borrow()
        .values()
        .filter(|c| open_client(c) && c.features.get() & features::LEAVING != 0)
        .count()
}

fn open_client(c: &super::conn::Conn) -> bool {
    c.is_client() && c.out.phase() == super::outbound::Phase::Open
}

/// The open clients here, taken out of the map first: what is done to
/// each may close it (and change the map).
fn clients(shard: &Rc<Shard>) -> impl Iterator<Item = Rc<super::conn::Conn>> {
    let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
    conns.into_iter().filter(|c| open_client(c))
}

/// Sends `MOVE` to the clients here that understand it; returns how many.
fn tell_move(shard: &Rc<Shard>, deadline_ms: u32) -> usize {
    let frame = Frame::Move { deadline_ms }.to_bytes();
    let _p = shard.producing(None);
    shard.tick();
    let mut n = 0;
    for c in clients(shard).filter(|c| c.features.get() & features::LEAVING != 0) {
        shard.push(&c, frame.clone());
        n += 1;
    }
    n
}

/// Closes every client here (`ERROR SHUTTING_DOWN`); from now on what
/// they send is not acted on. Returns how many.
fn close_clients(shard: &Rc<Shard>) -> usize {
    let mut n = 0;
    for c in clients(shard) {
        let msg = "server shutting down (left the cluster)";
        shard.close_with_error(&c, crate::protocol::ErrorCode::SHUTTING_DOWN, msg);
        n += 1;
    }
    n
}

/// Waits (at most `limit`) until no peer link is up.
fn wait_links_down(shared: &Shared, limit: Duration) {
    let end = Instant::now() + limit;
    let mesh = &shared.cluster;
    while Instant::now() < end && mesh.indices().iter().any(|&i| mesh.link_of(i).is_some()) {
        std::thread::sleep(Duration::from_millis(5));
    }
}
