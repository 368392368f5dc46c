//! Honest delivery across a cluster of `msgc-server` processes on
//! 127.0.0.1–3: what the acknowledgements of a join and of a leave
//! promise, what a lost or stalled node costs (counted, told, and visible
//! to a `SEQ` receiver as gaps), member ids across restarts, peers with
//! different `max_message_size`, and `PEER_LEAVE` validation.
//!
//! The frame-level clients (`Raw`, and `Sub`, a `SEQ` client read by a
//! thread) see exactly what the server sends; the client library is used
//! only where its view or its events are what is tested. Every loop is
//! bounded in count and time; nothing asserts on timing.

use crate::cluster::{
    name, num, parse, payload, peer_of, peer_state, stats, until, Cluster, Member, QUICK,
};
use crate::util::{group, Polled, Raw, WAIT};
use bytes::Bytes;
use msgc::client::Event;
use msgc::protocol::{
    features, ErrorCode, Events, Frame, GroupName, Hello, MemberId, NodeName, Reason, Role,
    PROTOCOL_VERSION,
};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Frame-level helpers.

/// A plain client on `addr` and its member id.
fn plain(addr: SocketAddr) -> (Raw, String) {
    let (r, w) = Raw::client_with(addr, 0);
    (r, w.member.expect("a member id").to_string())
}

fn shard_of(id: &str) -> usize {
    MemberId::from_str_checked(id)
        .expect("member id")
        .parts()
        .expect("a server-assigned id")
        .1
}

/// Sends JOIN (no events about others) and reads up to its acknowledgement.
fn raw_join(r: &mut Raw, g: &GroupName, me: &str) {
    r.send(&Frame::Join {
        group: g.clone(),
        events: Events::None,
    });
    raw_own_event(r, g, me, Reason::Join);
}

/// Reads until `me`'s own `reason` event in `g`; only NOOPs may come first.
fn raw_own_event(r: &mut Raw, g: &GroupName, me: &str, reason: Reason) {
    loop {
        match r.recv() {
            Some(Frame::Membership {
                group,
                subject,
                reason: got,
                ..
            }) if &group == g && subject == me.as_bytes() && got == reason => return,
            Some(Frame::Noop) => {}
            other => panic!(
                "{me}: waiting for its {} in {g:?}, got {other:?}",
                reason.name()
            ),
        }
    }
}

/// Sends PING and reads up to its PONG; returns what came before it
/// (NOOPs left out).
fn raw_fence(r: &mut Raw, token: u64) -> Vec<Frame> {
    raw_batch_fence(r, &[], token)
}

/// Idle detection slow enough that a node stopped for a moment keeps its
/// links up.
const SLOW_IDLE: &str =
    "keepalive_interval = 0.2\n idle_timeout = 30\n reconnect_interval = 0.2\n connect_timeout = 2";

/// Writes `frames` and a PING in one write; returns what came before the
/// PONG (NOOPs left out).
fn raw_batch_fence(r: &mut Raw, frames: &[Frame], token: u64) -> Vec<Frame> {
    let mut bytes = Vec::new();
    for f in frames.iter().chain([&Frame::Ping { token }]) {
        bytes.extend_from_slice(&f.to_bytes());
    }
    r.send_bytes(&bytes);
    let mut before = Vec::new();
    loop {
        match r.recv() {
            Some(Frame::Pong { token: t }) if t == token => return before,
            Some(Frame::Noop) => {}
            Some(f) => before.push(f),
            None => panic!("no PONG {token}; before it: {before:?}"),
        }
    }
}

/// The groups of `me`'s own join events among `frames`.
fn acks_in(frames: &[Frame], me: &str) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Membership {
                group,
                subject,
                reason: Reason::Join,
                ..
            } if subject == me.as_bytes() => Some(group.to_string()),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Sub: a client granted SEQ, read by a thread that logs what it gets.

/// One group message as a `Sub` received it.
#[derive(Debug, Clone)]
struct Got {
    group: String,
    sender: String,
    /// `DELIVER_SEQ`'s number; `None` for a plain `DELIVER`.
    seq: Option<u64>,
    /// The number in the payload (`cluster::payload`): the publisher's count.
    n: u64,
}

#[derive(Default)]
struct Log {
    msgs: Vec<Got>,
    per_sender: HashMap<String, u64>,
    /// (group, reason, subject) of every MEMBERSHIP, in order.
    events: Vec<(String, Reason, String)>,
    /// Frames no test expects (errors and the like).
    other: Vec<String>,
    closed: bool,
}

impl Log {
    fn record(&mut self, f: Frame) {
        match f {
            Frame::Deliver {
                group,
                sender,
                seq,
                payload,
            } => {
                let (_, n) = parse(&payload);
                *self.per_sender.entry(sender.to_string()).or_default() += 1;
                self.msgs.push(Got {
                    group: group.to_string(),
                    sender: sender.to_string(),
                    seq,
                    n,
                });
            }
            Frame::Membership {
                group,
                subject,
                reason,
                ..
            } => self.events.push((
                group.to_string(),
                reason,
                String::from_utf8_lossy(&subject).into_owned(),
            )),
            Frame::Noop => {}
            f => self.other.push(format!("{f:?}")),
        }
    }
}

struct Sub {
    id: String,
    w: Arc<Mutex<TcpStream>>,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Sub {
    /// Connects to `addr` asking for SEQ (which must be granted).
    fn open(addr: SocketAddr) -> Sub {
        let (mut r, welcome) = Raw::client_with(addr, features::SEQ);
        assert_eq!(
            welcome.features & features::SEQ,
            features::SEQ,
            "SEQ granted by {addr}"
        );
        let id = welcome.member.expect("a member id").to_string();
        r.s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let w = Arc::new(Mutex::new(r.s.try_clone().expect("clone socket")));
        let log: Arc<Mutex<Log>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (w2, log2, stop2) = (w.clone(), log.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let noop = Frame::Noop.to_bytes();
            let mut last_noop = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                match r.poll() {
                    Polled::Frame(f) => log2.lock().unwrap().record(f),
                    Polled::Quiet => {}
                    Polled::Closed => {
                        log2.lock().unwrap().closed = true;
                        return;
                    }
                }
                // Never idle, whatever the test is waiting for.
                if last_noop.elapsed() > Duration::from_millis(500) {
                    let _ = w2.lock().unwrap().write_all(&noop);
                    last_noop = Instant::now();
                }
            }
        });
        Sub {
            id,
            w,
            log,
            stop,
            reader: Some(reader),
        }
    }

    fn send(&self, f: &Frame) {
        self.w
            .lock()
            .unwrap()
            .write_all(&f.to_bytes())
            .expect("write to the server");
    }

    fn with<R>(&self, f: impl FnOnce(&Log) -> R) -> R {
        f(&self.log.lock().unwrap())
    }

    /// Joins `g` (told each change) and waits for the acknowledgement.
    async fn join(&self, g: &str) {
        self.send(&Frame::Join {
            group: group(g),
            events: Events::Each,
        });
        let what = format!("{}: its join of {g} acknowledged", self.id);
        until(&what, || self.events(g, Reason::Join, &self.id) > 0).await;
    }

    fn events(&self, g: &str, reason: Reason, subject: &str) -> usize {
        self.with(|l| {
            l.events
                .iter()
                .filter(|(eg, r, s)| eg == g && *r == reason && s == subject)
                .count()
        })
    }

    fn count_from(&self, sender: &str) -> u64 {
        self.with(|l| l.per_sender.get(sender).copied().unwrap_or(0))
    }

    /// The messages from `sender` in `g`, in arrival order.
    fn from(&self, g: &str, sender: &str) -> Vec<Got> {
        self.with(|l| {
            l.msgs
                .iter()
                .filter(|m| m.group == g && m.sender == sender)
                .cloned()
                .collect()
        })
    }

    /// Fails on anything unexpected the server sent, or a closed connection.
    fn assert_clean(&self) {
        self.with(|l| {
            assert!(l.other.is_empty(), "{}: unexpected {:?}", self.id, l.other);
            assert!(!l.closed, "{}: connection closed", self.id);
            assert!(
                l.msgs.iter().all(|m| m.seq.is_some()),
                "{}: a plain DELIVER to a SEQ client",
                self.id
            );
        });
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(w) = self.w.lock() {
            let _ = w.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// The numbers of `msgs` (all from one sender to one group); checks that
/// every message carries one, that they strictly increase, and that each
/// is the publish count its payload says (number `n` is publish `n + 1`).
fn seqs(msgs: &[Got], who: &str) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::with_capacity(msgs.len());
    for m in msgs {
        let s = m.seq.unwrap_or_else(|| panic!("{who}: {m:?} has no seq"));
        assert_eq!(s, m.n + 1, "{who}: seq {s} on publish number {}", m.n);
        if let Some(&last) = out.last() {
            assert!(s > last, "{who}: seq {s} after {last}");
        }
        out.push(s);
    }
    out
}

/// The (from, to) ranges of numbers missing in `msgs` before its last.
fn gap_list(msgs: &[Got]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut last = 0;
    for s in msgs.iter().filter_map(|m| m.seq) {
        if s > last + 1 {
            out.push((last + 1, s - 1));
        }
        last = last.max(s);
    }
    out
}

/// Messages missed between the first and the last received: Σ(seq − last − 1).
fn gaps(seqs: &[u64]) -> u64 {
    seqs.windows(2).map(|w| w[1] - w[0] - 1).sum()
}

// ---------------------------------------------------------------------------
// A publisher thread: numbered messages in batches, at most `LEAD` ahead of
// what each of its pacing subscribers has received from it, so that no
// subscriber ever has more than a few `LEAD`s waiting for it (far below
// `max_backlog`): none is ever slow enough to be closed as stuck.

struct Publisher {
    id: String,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, Raw)>>,
}

impl Publisher {
    const LEAD: u64 = 300;
    const BATCH: u64 = 50;

    /// Publishes to `g` on `addr`, paced by the first `pacers` of `pace`.
    fn start(
        addr: SocketAddr,
        g: &str,
        len: usize,
        pace: &[Sub],
        pacers: &Arc<AtomicUsize>,
    ) -> Publisher {
        let (r, id) = plain(addr);
        let (sent, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let logs: Vec<Arc<Mutex<Log>>> = pace.iter().map(|s| s.log.clone()).collect();
        let (sent2, stop2, pacers, g) = (sent.clone(), stop.clone(), pacers.clone(), group(g));
        let me = id.clone();
        let thread = std::thread::spawn(move || {
            let mut s = r.s.try_clone().expect("clone socket");
            let end = Instant::now() + 3 * WAIT;
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < end {
                let got = logs[..pacers.load(Ordering::Relaxed)]
                    .iter()
                    .map(|l| l.lock().unwrap().per_sender.get(&me).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(n);
                if n - got >= Self::LEAD {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let mut batch = Vec::new();
                for k in n..n + Self::BATCH {
                    let p = payload("p", k, len);
                    batch.extend_from_slice(
                        &Frame::Publish {
                            group: g.clone(),
                            payload: p,
                        }
                        .to_bytes(),
                    );
                }
                if s.write_all(&batch).is_err() {
                    break; // its node is gone
                }
                n += Self::BATCH;
                sent2.store(n, Ordering::Relaxed);
            }
            (n, r)
        });
        Publisher {
            id,
            sent,
            stop,
            thread: Some(thread),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops it, and waits until its server has read every publish (a
    /// PING's PONG: closing a socket with NOOPs unread would reset it, and
    /// the server would lose what it had not read yet). Returns how many
    /// it published.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (n, mut r) = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("publisher thread");
        let before = raw_fence(&mut r, u64::MAX);
        assert!(before.is_empty(), "{}: got {before:?}", self.id);
        n
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `cond` (every 10 ms, at most `WAIT`); true if it came to hold.
/// For waits whose failure the caller explains itself.
async fn waited(mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn peer_drops(addr: SocketAddr, peer: &str) -> serde_json::Value {
    let st = stats(addr);
    peer_of(&st, peer)
        .unwrap_or_else(|| panic!("{addr} lists no peer {peer}: {st}"))
        .clone()
}

// ---------------------------------------------------------------------------
// 1. The join acknowledgement is a cluster-wide promise; so is the leave's.

/// Tries per (joiner node, publisher node) pair.
const TRIES: usize = 1_000;
/// Joiner connections per pair, and groups each has in flight.
const JOINERS: usize = 3;
const IN_FLIGHT: usize = 25;
/// A message not received this long after its publish counts as missed.
const MISS_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Tries {
    received: usize,
    missed: Vec<String>,
    /// Deliveries for groups not waiting for one (late or duplicated).
    strays: Vec<String>,
}

/// One joiner connection on `addr`: `tries` times, joins a fresh group,
/// and as soon as its acknowledgement is read has `publisher` publish to
/// it, then waits for the message. `IN_FLIGHT` at a time.
fn joiner(addr: SocketAddr, publisher: &Mutex<TcpStream>, tag: &str, tries: usize) -> Tries {
    let (mut r, me) = plain(addr);
    r.s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut out = Tries::default();
    // Group → when its message was published (None: not acknowledged yet).
    let mut waiting: HashMap<GroupName, Option<Instant>> = HashMap::new();
    let mut started = 0;
    let mut last_sent = Instant::now();
    let end = Instant::now() + 6 * WAIT;
    while out.received + out.missed.len() < tries {
        assert!(Instant::now() < end, "{tag}: out of time: {out:?}");
        while waiting.len() < IN_FLIGHT && started < tries {
            let g = group(&format!("{tag}.{started}"));
            r.send(&Frame::Join {
                group: g.clone(),
                events: Events::None,
            });
            waiting.insert(g, None);
            started += 1;
            last_sent = Instant::now();
        }
        match r.poll() {
            Polled::Frame(Frame::Membership {
                group: g,
                subject,
                reason: Reason::Join,
                ..
            }) if subject == me.as_bytes() => {
                let slot = waiting.get_mut(&g).expect("an ack for a group in flight");
                let frame = Frame::Publish {
                    group: g,
                    payload: Bytes::from_static(b"after the ack"),
                };
                publisher
                    .lock()
                    .unwrap()
                    .write_all(&frame.to_bytes())
                    .expect("publish");
                *slot = Some(Instant::now());
            }
            // (The joiner does not leave the groups it is done with: a
            // LEAVE while other joins wait for their barriers is the case
            // of `a_leave_does_not_release_the_ack_of_a_join_in_flight`.)
            Polled::Frame(Frame::Deliver { group: g, .. }) => match waiting.remove(&g) {
                Some(Some(_)) => out.received += 1,
                Some(None) => panic!("{tag}: {g:?} delivered before its ack was read"),
                None => out.strays.push(g.to_string()),
            },
            Polled::Frame(Frame::Noop) | Polled::Quiet => {}
            Polled::Frame(f) => panic!("{tag}: unexpected {f:?}"),
            Polled::Closed => panic!("{tag}: connection closed; so far {out:?}"),
        }
        let now = Instant::now();
        let late: Vec<GroupName> = waiting
            .iter()
            .filter(|(_, t)| t.is_some_and(|t| now - t > MISS_AFTER))
            .map(|(g, _)| g.clone())
            .collect();
        for g in late {
            waiting.remove(&g);
            out.missed.push(g.to_string());
        }
        if last_sent.elapsed() > Duration::from_secs(1) {
            r.send(&Frame::Noop);
            last_sent = Instant::now();
        }
    }
    out
}

/// `TRIES` joins on node `a`, each followed at once by a publish on node
/// `b` (one publisher connection shared by `JOINERS` joiner connections).
fn join_then_publish(c: &Cluster, a: usize, b: usize) -> Tries {
    let (p, _) = plain(c.addr(b));
    let publisher = Mutex::new(p.s);
    let addr = c.addr(a);
    let parts: Vec<Tries> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..JOINERS)
            .map(|k| {
                let n = TRIES / JOINERS + usize::from(k < TRIES % JOINERS);
                let tag = format!("j{}p{}.{k}", a + 1, b + 1);
                let publisher = &publisher;
                s.spawn(move || joiner(addr, publisher, &tag, n))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("joiner thread"))
            .collect()
    });
    let mut all = Tries::default();
    for t in parts {
        all.received += t.received;
        all.missed.extend(t.missed);
        all.strays.extend(t.strays);
    }
    all
}

/// `rounds` times on node `a`: a leaver and a witness (on the leaver's
/// shard) join a fresh group; the leaver leaves; as soon as its ack is
/// read, a publisher on every node publishes. The witness gets all three;
/// the leaver gets none before the PONG of a PING sent after the witness
/// had them (a PONG follows everything queued to it before).
fn leave_then_publish(c: &Cluster, a: usize, rounds: u64) {
    let mut pubs: Vec<Raw> = (0..3).map(|k| plain(c.addr(k)).0).collect();
    let (mut l, l_id) = plain(c.addr(a));
    let mut witness = None;
    for _ in 0..64 {
        let (w, w_id) = plain(c.addr(a));
        if shard_of(&w_id) == shard_of(&l_id) {
            witness = Some((w, w_id));
            break;
        }
    }
    let (mut w, w_id) = witness.expect("a connection on the leaver's shard in 64 tries");
    for t in 0..rounds {
        let g = group(&format!("leave{}.{t}", a + 1));
        raw_join(&mut l, &g, &l_id);
        raw_join(&mut w, &g, &w_id);
        l.send(&Frame::Leave { group: g.clone() });
        raw_own_event(&mut l, &g, &l_id, Reason::Leave);
        for (k, p) in pubs.iter_mut().enumerate() {
            p.send(&Frame::Publish {
                group: g.clone(),
                payload: Bytes::from(format!("from node{}", k + 1)),
            });
        }
        let mut got = HashSet::new();
        while got.len() < 3 {
            match w.recv() {
                Some(Frame::Deliver { group, payload, .. }) if group == g => {
                    assert!(got.insert(payload.clone()), "{w_id}: {payload:?} twice");
                }
                Some(Frame::Noop) => {}
                other => panic!("{w_id}: waiting for the 3 publishes in {g:?}, got {other:?}"),
            }
        }
        let before = raw_fence(&mut l, t);
        assert!(
            before.is_empty(),
            "after its leave ack in {g:?} (node{}), {l_id} got {before:?}",
            a + 1
        );
        w.send(&Frame::Leave { group: g.clone() });
        raw_own_event(&mut w, &g, &w_id, Reason::Leave);
    }
}

/// For every ordered pair of nodes (joiner's, publisher's): a publish made
/// as soon as the join's acknowledgement is read reaches the joiner, every
/// time. And after a leave's acknowledgement, nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_the_join_ack_reaches_the_joiner_from_every_node() {
    let c = Cluster::start("honest-ack", 3, QUICK).await;
    let pairs: Vec<(usize, usize)> = (0..3)
        .flat_map(|a| (0..3).filter(move |&b| b != a).map(move |b| (a, b)))
        .collect();
    let started = Instant::now();
    let results: Vec<((usize, usize), Tries)> = std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|&(a, b)| {
                let c = &c;
                s.spawn(move || ((a, b), join_then_publish(c, a, b)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("pair thread"))
            .collect()
    });
    eprintln!(
        "{} joins, each followed at once by a publish from another node, in {:?}",
        pairs.len() * TRIES,
        started.elapsed()
    );
    let mut failures = Vec::new();
    for ((a, b), t) in &results {
        if t.received != TRIES || !t.missed.is_empty() || !t.strays.is_empty() {
            failures.push(format!(
                "joiner on node{}, publisher on node{}: {} of {TRIES} received, missed {:?}, \
                 late or duplicated {:?}",
                a + 1,
                b + 1,
                t.received,
                t.missed,
                t.strays
            ));
        }
    }
    if !failures.is_empty() {
        let unrouted: Vec<u64> = (0..3)
            .map(|i| num(&stats(c.addr(i))["totals"]["unrouted"]))
            .collect();
        panic!("{failures:#?}\nunrouted publishes per node: {unrouted:?}");
    }

    for a in 0..3 {
        leave_then_publish(&c, a, 50);
    }
}

/// Two nodes; a client of node1, member of group `left`, writes JOIN of
/// `held` (and, with `leave_first`, LEAVE of `left`) and a PING while
/// node2 is stopped (its link stays up). Returns the client's id and what
/// it got before the PONG, that is before node2 could apply the join;
/// checks that after node2 resumes the ack comes, and that a publish on
/// node2 right after it reaches the client.
async fn join_while_node2_stopped(tag: &str, leave_first: bool) -> (String, Vec<Frame>) {
    let c = Cluster::start(tag, 2, SLOW_IDLE).await;
    let (mut j, me) = plain(c.addr(0));
    let (mut p, _) = plain(c.addr(1));
    let (g, h) = (group("held"), group("left"));
    raw_join(&mut j, &h, &me);
    c.nodes[1].signal(libc::SIGSTOP);
    let mut frames = vec![Frame::Join {
        group: g.clone(),
        events: Events::None,
    }];
    if leave_first {
        frames.push(Frame::Leave { group: h.clone() });
    }
    let before = raw_batch_fence(&mut j, &frames, 1);
    let link = peer_state(c.addr(0), "node2");
    c.nodes[1].signal(libc::SIGCONT);
    assert_eq!(
        link, "up",
        "node1's link to stopped node2 went: inconclusive"
    );
    if !acks_in(&before, &me).contains(&g.to_string()) {
        loop {
            match j.recv() {
                Some(Frame::Membership {
                    group,
                    subject,
                    reason: Reason::Join,
                    ..
                }) if group == g && subject == me.as_bytes() => break,
                Some(Frame::Noop | Frame::Membership { .. }) => {}
                other => panic!("{me}: waiting for the ack of {g:?}, got {other:?}"),
            }
        }
    }
    p.send(&Frame::Publish {
        group: g.clone(),
        payload: Bytes::from_static(b"after the ack"),
    });
    raw_fence(&mut p, 2);
    let unrouted = num(&stats(c.addr(1))["totals"]["unrouted"]);
    assert_eq!(
        unrouted, 0,
        "node2 found no route to {me} in {g:?} after its ack"
    );
    loop {
        match j.recv() {
            Some(Frame::Deliver { group, .. }) if group == g => break,
            Some(Frame::Noop | Frame::Membership { .. }) => {}
            other => panic!("{me}: waiting for the publish in {g:?}, got {other:?}"),
        }
    }
    (me, before)
}

/// The barrier itself, deterministically: node2 is stopped (its link stays
/// up), so it cannot apply a join made on node1, and node1 holds the
/// acknowledgement until node2 resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_is_not_acknowledged_while_a_linked_node_cannot_apply_it() {
    let (me, before) = join_while_node2_stopped("honest-held", false).await;
    assert!(
        acks_in(&before, &me).is_empty(),
        "{me} acknowledged while node2 was stopped: {before:?}"
    );
}

/// A LEAVE read while a JOIN of the same connection waits for its barrier
/// must not release that JOIN's acknowledgement early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_does_not_release_the_ack_of_a_join_in_flight() {
    let (me, before) = join_while_node2_stopped("honest-leave-ack", true).await;
    assert!(
        !acks_in(&before, &me).contains(&"held".to_string()),
        "{me}: its JOIN of held, written with a LEAVE of another group while node2 (linked) \
         was stopped, was acknowledged before node2 could apply it: {before:?}"
    );
}

// ---------------------------------------------------------------------------
// 2. A node killed mid-stream.

/// SEQ subscribers on all three nodes, a publisher on each under load;
/// node3 is killed: node1 and node2 count what node3's members lost, their
/// own subscribers lose nothing from node1 and node2, and get a gap-free
/// prefix of node3's publisher, with node-down told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_counted_losses_and_told_receivers() {
    let mut c = Cluster::start("honest-kill", 3, QUICK).await;
    let g = "hkill";
    let subs: Vec<Sub> = (0..3).map(|i| Sub::open(c.addr(i))).collect();
    for s in &subs {
        s.join(g).await;
    }
    let pacers = Arc::new(AtomicUsize::new(3));
    let pubs: Vec<Publisher> = (0..3)
        .map(|i| Publisher::start(c.addr(i), g, 64, &subs, &pacers))
        .collect();
    let p3 = pubs[2].id.clone();
    let flowing = waited(|| subs[0].count_from(&p3) >= 2_000).await;
    assert!(
        flowing,
        "node1's subscriber has {} of node3's publishes; node3's publisher sent {}; per \
         subscriber from each publisher {:?}; unexpected {:?}\nnode1 {}\nnode3 {}",
        subs[0].count_from(&p3),
        pubs[2].sent(),
        subs.iter()
            .map(|s| pubs.iter().map(|p| s.count_from(&p.id)).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        subs.iter()
            .map(|s| s.with(|l| l.other.clone()))
            .collect::<Vec<_>>(),
        stats(c.addr(0)),
        stats(c.addr(2)),
    );

    c.nodes[2].kill9();
    // node3's subscriber is gone: node1's and node2's pace the publishers.
    pacers.store(2, Ordering::Relaxed);
    for (k, s) in subs[..2].iter().enumerate() {
        let told = waited(|| s.events(g, Reason::NodeDown, "node3") > 0).await;
        assert!(
            told,
            "{} not told node3 is down; closed: {}, events {:?}, other {:?}; {} peers {}, drops {}",
            s.id,
            s.with(|l| l.closed),
            s.with(|l| l.events.clone()),
            s.with(|l| l.other.clone()),
            name(k),
            stats(c.addr(k))["peers"],
            stats(c.addr(k))["drops"],
        );
    }
    // Publishes from here on find node3 known down on their own node.
    let at_down: Vec<u64> = pubs[..2].iter().map(Publisher::sent).collect();
    let peers_at_down: Vec<serde_json::Value> =
        (0..2).map(|k| peer_drops(c.addr(k), "node3")).collect();
    until(
        "node1's and node2's publishers to go on for 1,000 more",
        || {
            pubs[..2]
                .iter()
                .zip(&at_down)
                .all(|(p, &n)| p.sent() >= n + 1_000)
        },
    )
    .await;
    let mut pubs = pubs.into_iter();
    let (pub1, pub2) = (pubs.next().expect("p1"), pubs.next().expect("p2"));
    let ids = [pub1.id.clone(), pub2.id.clone()];
    let sent = [pub1.finish(), pub2.finish()];
    drop(pubs);

    for s in &subs[..2] {
        let all = waited(|| ids.iter().zip(sent).all(|(p, n)| s.count_from(p) >= n)).await;
        let got: Vec<u64> = ids.iter().map(|p| s.count_from(p)).collect();
        let holes: Vec<Vec<(u64, u64)>> = ids.iter().map(|p| gap_list(&s.from(g, p))).collect();
        assert!(
            all,
            "{}: of node1's and node2's {sent:?} publishes got {got:?}; missing ranges \
             {holes:?}; node1 {}, node2 {}",
            s.id,
            stats(c.addr(0))["drops"],
            stats(c.addr(1))["drops"]
        );
    }
    for (k, s) in subs[..2].iter().enumerate() {
        s.assert_clean();
        for (p, &n) in ids.iter().zip(&sent) {
            let got = seqs(&s.from(g, p), &s.id);
            assert_eq!(got.len() as u64, n, "{}: from {p}", s.id);
            assert_eq!(got.last().copied(), Some(n), "{}: from {p}", s.id);
        }
        let got = seqs(&s.from(g, &p3), &s.id);
        assert!(
            got.iter().copied().eq(1..=got.len() as u64),
            "{}: node3's publishes are not a prefix (gaps {})",
            s.id,
            gaps(&got)
        );
        assert_eq!(s.events(g, Reason::NodeDown, "node3"), 1, "{}", s.id);
        let addr = c.addr(k);
        let p = peer_drops(addr, "node3");
        let (down, lost) = (num(&p["drops"]["down"]), num(&p["drops"]["link_lost"]));
        eprintln!(
            "{}: {} of node3's publishes before the kill; for node3: down {down}, \
             link_lost {lost}, dropped {}",
            name(k),
            got.len(),
            p["dropped"]
        );
        assert!(
            down + lost > 0,
            "{}: nothing counted for node3: {p}; at node-down {}",
            name(k),
            peers_at_down[k]
        );
        assert!(
            down >= sent[k] - at_down[k],
            "{}: {} publishes after node3 was known down, {down} counted: {p}; at node-down {}",
            name(k),
            sent[k] - at_down[k],
            peers_at_down[k]
        );
    }
}

// ---------------------------------------------------------------------------
// 3. A node with only publishers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_only_publishers_dying_is_told_to_subscribers() {
    let mut c = Cluster::start("honest-pubonly", 3, QUICK).await;
    let g = "pubonly";
    let a = Member::joined(c.addr(0), g).await;
    let b = Member::joined(c.addr(1), g).await;
    let p = Member::connect(c.addr(2)).await;
    p.publish(g, payload("p", 0, 16)).await;
    a.wait_messages(g, 1).await;
    b.wait_messages(g, 1).await;
    c.nodes[2].kill9();
    assert_eq!(a.wait_membership(g, "node3", Reason::NodeDown).await, 2);
    assert_eq!(b.wait_membership(g, "node3", Reason::NodeDown).await, 2);
    for m in [&a, &b] {
        assert_eq!(m.memberships(g, "node3", Reason::NodeDown).len(), 1);
        assert_eq!(m.disconnects(), 0);
    }
}

/// The same when the group was emptied and created again on node1 between
/// node3's publishes (a new group entry of the same name): the members of
/// the group as it is now are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_node_dying_is_told_to_a_recreated_group() {
    let mut c = Cluster::start("honest-recreated", 3, QUICK).await;
    let g = "recreated";
    let p = Member::connect(c.addr(2)).await;
    let first = Member::joined(c.addr(0), g).await;
    p.wait_view(g, &[first.id()]).await;
    p.publish(g, payload("p", 0, 16)).await;
    first.wait_messages(g, 1).await;
    // The group empties everywhere (node1 forgets it), then comes back.
    first.client.leave(g).await.expect("leave");
    until("node1 to forget the group", || {
        stats(c.addr(0))["groups"] == 0
    })
    .await;
    let again = Member::joined(c.addr(0), g).await;
    p.wait_view(g, &[again.id()]).await;
    p.publish(g, payload("p", 1, 16)).await;
    again.wait_messages(g, 1).await;
    c.nodes[2].kill9();
    again.wait_membership(g, "node3", Reason::NodeDown).await;
    assert_eq!(again.memberships(g, "node3", Reason::NodeDown).len(), 1);
}

// ---------------------------------------------------------------------------
// 4. Gaps.

/// node3 is stopped while node1 publishes 4 KiB messages: node1's link to
/// it is killed as stuck, publishes meanwhile are counted lost for node3;
/// node3 resumes, the link re-forms, delivery resumes. node3's SEQ
/// subscriber stays connected throughout, and what it missed is exactly
/// what its numbers say it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_count_exactly_the_messages_missed() {
    let extra = "keepalive_interval = 0.2\n idle_timeout = 3\n reconnect_interval = 0.2\n \
                 connect_timeout = 2\n peer_max_backlog = 200\n peer_stuck_timeout = 0.5\n \
                 tcpbuf_size = 4096";
    let c = Cluster::start("honest-gaps", 3, extra).await;
    let g = "gaps";
    let s2 = Sub::open(c.addr(1));
    let s3 = Sub::open(c.addr(2));
    s2.join(g).await;
    s3.join(g).await;
    // And one through the client library, which turns the numbers into
    // `Event::Gap`s (its idle limit outlasts node3's pause).
    let mut cfg = crate::cluster::client_config(c.addr(2));
    cfg.idle_timeout = Duration::from_secs(30);
    let lib3 = Member::connect_with(cfg).await;
    lib3.join(g).await;
    let p = Member::connect(c.addr(0)).await;
    let pid = p.id();
    let node1 = c.addr(0);
    let publish = |from: u64, n: u64| {
        let p = &p;
        async move {
            for k in from..from + n {
                p.publish(g, payload("p", k, 4096)).await;
            }
        }
    };
    // A first few through node3's link (it then knows node1 publishes to
    // the group, and tells its member when node1 is lost).
    publish(0, 10).await;
    let mut sent = 10u64;
    until("node3's subscriber to get the first publishes", || {
        s3.count_from(&pid) >= sent
    })
    .await;

    // Waits until node2's subscriber has every publish so far.
    let kept_up = |sent: u64| {
        let (s2, c, pid) = (&s2, &c, &pid);
        async move {
            let ok = waited(|| s2.count_from(pid) >= sent).await;
            assert!(
                ok,
                "node2's subscriber has {} of {sent}; closed {}, unexpected {:?}\nnode1 {}\nnode2 {}",
                s2.count_from(pid),
                s2.with(|l| l.closed),
                s2.with(|l| l.other.clone()),
                stats(c.addr(0)),
                stats(c.addr(1))
            );
        }
    };

    c.nodes[2].signal(libc::SIGSTOP);
    // Chunks paced by node2's subscriber: only the link to node3 backs up.
    loop {
        publish(sent, 50).await;
        sent += 50;
        kept_up(sent).await;
        let st = stats(node1);
        let dropped = num(&peer_of(&st, "node3").expect("node3")["dropped"]);
        if num(&st["totals"]["stuck_kills"]) >= 1 || dropped > 0 {
            break;
        }
        assert!(
            sent < 5_000,
            "node1's link to stopped node3 never backed up: {st}"
        );
    }
    until("node1 to see node3 not up", || {
        peer_state(node1, "node3") != "up"
    })
    .await;
    // Lost for node3's member, counted as such.
    publish(sent, 50).await;
    sent += 50;
    kept_up(sent).await;

    c.nodes[2].signal(libc::SIGCONT);
    c.wait_mesh(&[0, 1, 2]).await;
    let mut want = vec![s2.id.clone(), s3.id.clone(), lib3.id()];
    want.sort();
    p.wait_view(g, &want).await;
    publish(sent, 100).await;
    sent += 100;
    until("node3's subscriber to get the last publish", || {
        s3.from(g, &pid).last().and_then(|m| m.seq) == Some(sent)
    })
    .await;
    until("node2's subscriber to get every publish", || {
        s2.count_from(&pid) >= sent
    })
    .await;
    until(
        "the library's subscriber on node3 to get the last publish",
        || {
            lib3.with(|evs| {
                evs.iter().any(|e| {
                    matches!(e, Event::Message { sender, payload, .. }
                    if sender.as_str() == pid && payload_number(payload) == Some(sent - 1))
                })
            })
        },
    )
    .await;

    s2.assert_clean();
    s3.assert_clean();
    assert_eq!(
        seqs(&s2.from(g, &pid), &s2.id),
        (1..=sent).collect::<Vec<_>>()
    );
    let got = seqs(&s3.from(g, &pid), &s3.id);
    let first = got[0];
    let missed = gaps(&got);
    let peer = peer_drops(node1, "node3");
    let st = stats(node1);
    eprintln!(
        "node3's subscriber: {} received of {sent} (first {first}), gaps add up to {missed}; \
         node1 for node3: dropped {}, drops {}; stuck_kills {}",
        got.len(),
        peer["dropped"],
        peer["drops"],
        st["totals"]["stuck_kills"]
    );
    assert_eq!(
        got.len() as u64 + missed,
        sent - first + 1,
        "received + gaps = what was published from the first received on"
    );
    assert!(missed > 0, "node3's subscriber missed nothing");
    assert!(
        num(&peer["dropped"]) > 0,
        "node1 counted no drop for node3: {peer}"
    );
    let down = num(&peer["drops"]["down"]);
    assert!(
        down >= 50,
        "the 50 publishes while node3 was known down: {peer}"
    );
    assert!(
        missed >= down,
        "node1 counted {down} publishes lost for node3 while down, its subscriber missed {missed}"
    );
    assert_eq!(
        s3.events(g, Reason::NodeDown, "node1"),
        1,
        "told of node1's loss"
    );

    // The client library: messages and `Event::Gap`s from the publisher
    // add up to what was published from its first message on, and no gap
    // ever lands in the message stream.
    let (lib_got, lib_missed, lib_first) = lib3.with(|evs| {
        let (mut got, mut missed, mut first) = (0u64, 0u64, None);
        for e in evs {
            match e {
                Event::Message {
                    sender, payload, ..
                } if sender.as_str() == pid => {
                    got += 1;
                    first = first.or(payload_number(payload));
                }
                Event::Gap {
                    sender, missing, ..
                } if sender.as_str() == pid => missed += missing,
                _ => {}
            }
        }
        (got, missed, first.expect("a first message"))
    });
    eprintln!("the library's subscriber: {lib_got} messages, gaps {lib_missed}, first {lib_first}");
    assert_eq!(
        lib_got + lib_missed,
        sent - lib_first,
        "library: messages + gaps = what was published from its first message on"
    );
    assert!(lib_missed > 0, "the library reported no gap");
    assert_eq!(
        lib3.client.gaps(),
        lib_missed,
        "Client::gaps() is the total"
    );
}

/// The publish number in a test payload (`payload("p", k, _)`: `p:k:…`).
fn payload_number(payload: &Bytes) -> Option<u64> {
    let text = std::str::from_utf8(payload.get(..payload.len().min(40))?).ok()?;
    text.strip_prefix("p:")?.split(':').next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// 5. Member ids across a restart.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_never_reissues_ids_and_drops_sends_to_departed_members() {
    const N: usize = 8;
    let mut c = Cluster::start("honest-ids", 2, QUICK).await;
    let node2 = c.addr(1);
    let before_kill: Vec<(Raw, String)> = (0..N).map(|_| plain(node2)).collect();
    let old: Vec<String> = before_kill.iter().map(|(_, id)| id.clone()).collect();
    c.nodes[1].kill9();
    drop(before_kill);
    // An io_uring process's sockets can outlive it a little (the ring is
    // torn down after exit): restart once its listener is gone.
    until("node2's old listener to close", || {
        TcpStream::connect_timeout(&node2, Duration::from_millis(200)).is_err()
    })
    .await;
    c.nodes[1].restart();
    c.wait_mesh(&[0, 1]).await;

    let mut new: Vec<(Raw, String)> = (0..N).map(|_| plain(node2)).collect();
    let inc = |id: &str| {
        let m = MemberId::from_str_checked(id).expect("member id");
        let (node, shard, seq, inc) = m.parts().expect("server-assigned");
        (format!("{node}/{shard}.{seq}"), inc.to_string())
    };
    for (_, id) in &new {
        assert!(
            !old.contains(id),
            "{id} issued again after the restart: {old:?}"
        );
        assert_ne!(
            inc(id).1,
            inc(&old[0]).1,
            "{id}: same incarnation as {}",
            old[0]
        );
    }
    let reused: Vec<String> = new
        .iter()
        .map(|(_, id)| inc(id).0)
        .filter(|p| old.iter().any(|o| inc(o).0 == *p))
        .collect();
    eprintln!("node/shard.seq parts the restart gave out again: {reused:?}");

    let (mut from1, from1_id) = plain(c.addr(0));
    let unknown = |addr| num(&stats(addr)["drops"]["unknown_member"]);
    let (before1, before2) = (unknown(c.addr(0)), unknown(node2));
    for id in &old {
        let to = MemberId::from_str_checked(id).expect("member id");
        from1.send(&Frame::Send {
            to: to.clone(),
            payload: Bytes::from_static(b"from node1"),
        });
        new[0].0.send(&Frame::Send {
            to,
            payload: Bytes::from_static(b"from node2"),
        });
    }
    until("node2 to count every send to a departed member", || {
        unknown(node2) >= before2 + 2 * N as u64
    })
    .await;
    assert_eq!(unknown(node2), before2 + 2 * N as u64);
    assert_eq!(unknown(c.addr(0)), before1, "node1 forwards; node2 counts");
    // Nobody got any of them.
    for (t, (r, id)) in new.iter_mut().enumerate() {
        let before = raw_fence(r, t as u64);
        assert!(before.is_empty(), "{id} got {before:?}");
    }
    let before = raw_fence(&mut from1, 99);
    assert!(before.is_empty(), "{from1_id} got {before:?}");
    // The path itself works: a send to a current id arrives.
    let (r, id) = &mut new[1];
    from1.send(&Frame::Send {
        to: MemberId::from_str_checked(id).expect("member id"),
        payload: Bytes::from_static(b"to the living"),
    });
    // Keepalives (NOOP) may come first.
    let next = (0..100).find_map(|_| match r.recv() {
        Some(Frame::Noop) => None,
        other => Some(other),
    });
    match next.flatten() {
        Some(Frame::Direct { sender, payload }) => {
            assert_eq!(sender.as_str(), from1_id);
            assert_eq!(&payload[..], b"to the living");
        }
        other => panic!("{id}: expected the DIRECT, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 6. Different max_message_size on the two ends of a link.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_max_message_size_keep_their_link() {
    let mut c = Cluster::new("honest-mms");
    let conf1 = c.conf("node1.conf", 2, QUICK);
    let conf2 = c.conf(
        "node2.conf",
        2,
        &format!("{QUICK}\n max_message_size = 4096"),
    );
    c.spawn(0, conf1);
    c.spawn(1, conf2);
    c.ready();
    c.wait_mesh(&[0, 1]).await;
    let (node1, node2) = (c.addr(0), c.addr(1));
    assert_eq!(num(&peer_drops(node1, "node2")["max_message_size"]), 4096);
    assert_eq!(
        num(&peer_drops(node2, "node1")["max_message_size"]),
        1 << 20
    );

    let g = "mms";
    let a = Member::joined(node1, g).await;
    let b = Member::joined(node2, g).await;
    crate::cluster::wait_views(&[&a, &b], g).await;
    a.publish(g, payload("big", 0, 100_000)).await;
    a.wait_messages(g, 1).await;
    until("node1 to count the big publish for node2", || {
        num(&peer_drops(node1, "node2")["drops"]["too_large"]) >= 1
    })
    .await;
    a.publish(g, payload("small", 1, 100)).await;
    b.publish(g, payload("small2", 0, 100)).await;
    a.wait_messages(g, 3).await;
    b.wait_messages(g, 2).await;
    // Sorted: no order between senders.
    let tags = |m: &Member| -> Vec<String> {
        let mut v: Vec<String> = m.messages(g).iter().map(|(_, p)| parse(p).0).collect();
        v.sort();
        v
    };
    assert_eq!(tags(&a), ["big", "small", "small2"]);
    assert_eq!(tags(&b), ["small", "small2"], "the big one reached node2");

    let st1 = stats(node1);
    let p2 = peer_of(&st1, "node2").expect("node2");
    assert_eq!(num(&p2["drops"]["too_large"]), 1, "{p2}");
    assert_eq!(num(&p2["dropped"]), 1, "{p2}");
    assert_eq!(num(&st1["drops"]["peer_too_large"]), 1, "{}", st1["drops"]);
    for (addr, peer) in [(node1, "node2"), (node2, "node1")] {
        let p = peer_drops(addr, peer);
        assert_eq!(p["state"], "up", "{p}");
        assert_eq!(num(&p["reconnects"]), 0, "{p}");
    }
    for m in [&a, &b] {
        for node in ["node1", "node2"] {
            assert!(
                m.memberships(g, node, Reason::NodeDown).is_empty(),
                "{}",
                m.id()
            );
        }
        assert_eq!(m.disconnects(), 0);
    }
}

// ---------------------------------------------------------------------------
// 7. PEER_LEAVE reasons.

fn expect_error(r: &mut Raw, code: ErrorCode, what: &str) {
    loop {
        match r.recv() {
            Some(Frame::Error { code: got, message }) => {
                assert_eq!(got, code, "{what}: {message}");
                break;
            }
            Some(Frame::Noop | Frame::Snapshot { .. } | Frame::Ping { .. }) => {}
            other => panic!("{what}: expected ERROR {}, got {other:?}", code.name()),
        }
    }
    assert!(r.closed(), "{what}: connection not closed");
}

fn peer_leave(reason: Reason) -> Frame {
    Frame::PeerLeave {
        group: group("pl"),
        member: MemberId::from_str_checked("node2/0.1.x").expect("member id"),
        reason,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_leave_reasons_are_validated() {
    let mut c = Cluster::new("honest-pl");
    let conf = c.conf("cluster.conf", 3, QUICK);
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    let errors = || num(&stats(node1)["totals"]["protocol_errors"]);
    let errors_before = errors();

    // node2, played by the test from node2's address.
    let mut fake = fake_node2(&c).await;
    // A peer's membership stream starts with its snapshot.
    fake.send(&Frame::Snapshot {
        flags: msgc::protocol::snapshot_flags::FIRST | msgc::protocol::snapshot_flags::LAST,
        entries: Vec::new(),
    });
    // Valid reasons are accepted from a peer (the member is unknown: no-op).
    fake.send(&peer_leave(Reason::Leave));
    fake.send(&peer_leave(Reason::Disconnect));
    let before: Vec<Frame> = raw_fence(&mut fake, 1)
        .into_iter()
        .filter(|f| !matches!(f, Frame::Snapshot { .. } | Frame::Ping { .. }))
        .collect();
    assert!(before.is_empty(), "fake node2 got {before:?}");
    fake.send(&peer_leave(Reason::NodeDown));
    expect_error(
        &mut fake,
        ErrorCode::MALFORMED,
        "PEER_LEAVE reason 4 from a peer",
    );

    let mut cases: Vec<(Vec<u8>, ErrorCode, String)> = Vec::new();
    for (reason, code) in [
        (Reason::Join, ErrorCode::MALFORMED),
        (Reason::NodeDown, ErrorCode::MALFORMED),
        (Reason::Leave, ErrorCode::UNEXPECTED),
        (Reason::Disconnect, ErrorCode::UNEXPECTED),
    ] {
        let what = format!("PEER_LEAVE reason {} from a client", reason as u8);
        cases.push((peer_leave(reason).to_bytes().to_vec(), code, what));
    }
    for bad in [0u8, 5, 255] {
        let mut b = peer_leave(Reason::Leave).to_bytes().to_vec();
        *b.last_mut().expect("reason byte") = bad;
        let what = format!("PEER_LEAVE reason {bad} from a client");
        cases.push((b, ErrorCode::MALFORMED, what));
    }
    for (bytes, code, what) in &cases {
        let mut r = Raw::client(node1);
        r.send_bytes(bytes);
        expect_error(&mut r, *code, what);
    }
    until("node1 to count every bad frame", || {
        errors() >= errors_before + 1 + cases.len() as u64
    })
    .await;
    assert_eq!(errors(), errors_before + 1 + cases.len() as u64);
    // node1 still serves.
    let m = Member::connect(node1).await;
    m.join("after").await;
    m.publish("after", payload("m", 0, 10)).await;
    m.wait_messages("after", 1).await;
}

/// A fake node2 (from node2's address), handshaken with node1, its link up.
async fn fake_node2(c: &Cluster) -> Raw {
    let node1 = c.addr(0);
    let mut fake = Raw::connect_from(node1, crate::cluster::ip(1));
    fake.send(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Peer,
        name: Some(NodeName::from_str_checked("node2").expect("name")),
        credentials: Bytes::new(),
        features: features::SEQ,
        max_message_size: 1 << 20,
    }));
    match fake.recv() {
        Some(Frame::Welcome(w)) => assert_eq!(w.node.as_str(), "node1"),
        other => panic!("fake node2: expected WELCOME, got {other:?}"),
    }
    until("node1 to see the fake node2 up", || {
        peer_state(node1, "node2") == "up"
    })
    .await;
    fake
}

/// A peer's membership stream is checked (PROTOCOL.md section 13): its
/// snapshot comes first, and every member id it reports is one of its own
/// node's. Anything else closes the link as a protocol error, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_membership_stream_out_of_order_or_with_foreign_ids_is_refused() {
    let mut c = Cluster::new("honest-order");
    let conf = c.conf("cluster.conf", 3, QUICK);
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    let errors = || num(&stats(node1)["totals"]["protocol_errors"]);
    let before = errors();
    let join = |member: &str| Frame::PeerJoin {
        group: group("order"),
        member: MemberId::from_str_checked(member).expect("member id"),
    };
    let snapshot = |flags| Frame::Snapshot {
        flags,
        entries: Vec::new(),
    };
    use msgc::protocol::snapshot_flags::{FIRST, LAST};

    let mut fake = fake_node2(&c).await;
    fake.send(&join("node2/0.1.x"));
    expect_error(
        &mut fake,
        ErrorCode::UNEXPECTED,
        "PEER_JOIN before the snapshot",
    );

    let mut fake = fake_node2(&c).await;
    fake.send(&snapshot(LAST));
    expect_error(
        &mut fake,
        ErrorCode::UNEXPECTED,
        "a snapshot chunk without FIRST",
    );

    let mut fake = fake_node2(&c).await;
    fake.send(&snapshot(FIRST | LAST));
    fake.send(&join("node3/0.1.x"));
    expect_error(
        &mut fake,
        ErrorCode::NOT_ALLOWED,
        "a member id of node3 from node2",
    );

    let mut fake = fake_node2(&c).await;
    fake.send(&Frame::Snapshot {
        flags: FIRST | LAST,
        entries: vec![(
            group("order"),
            MemberId::from_str_checked("elsewhere/0.1").expect("member id"),
        )],
    });
    expect_error(
        &mut fake,
        ErrorCode::NOT_ALLOWED,
        "a snapshot entry of another node",
    );
    until("the four refusals to be counted", || errors() >= before + 4).await;
    // None of the refused members reached the view.
    assert_eq!(stats(node1)["groups"], 0, "{}", stats(node1));
}

/// Every id a peer sends carries its node name (PROTOCOL.md section 13),
/// message senders included: a `FORWARD`, `FORWARD_SEQ` or
/// `FORWARD_DIRECT` from node2's link in the name of node3's member is a
/// protocol error that closes that link alone, counted, and nothing of it
/// is delivered; the same frames with node2's own senders are delivered,
/// and the local client never notices (issue 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_for_another_nodes_member_loses_its_link() {
    use msgc::protocol::snapshot_flags::{FIRST, LAST};
    let mut c = Cluster::new("honest-sender");
    // The test's raw member and fake peer send nothing for a while.
    let conf = c.conf("cluster.conf", 3, SLOW_IDLE);
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    let errors = || num(&stats(node1)["totals"]["protocol_errors"]);
    let before = errors();
    let fw = group("fw");
    // The member joins before any link is up (no barrier to answer).
    let (mut r, me) = plain(node1);
    raw_join(&mut r, &fw, &me);
    let id = |s: &str| MemberId::from_str_checked(s).expect("member id");
    let forward = |sender: &str, seq: Option<u64>, text: &'static str| Frame::Forward {
        group: fw.clone(),
        sender: id(sender),
        seq,
        payload: Bytes::from_static(text.as_bytes()),
    };
    let direct = |sender: &str, text: &'static str| Frame::ForwardDirect {
        to: id(&me),
        sender: id(sender),
        payload: Bytes::from_static(text.as_bytes()),
    };
    let linked = || async {
        let mut fake = fake_node2(&c).await;
        fake.send(&Frame::Snapshot {
            flags: FIRST | LAST,
            entries: Vec::new(),
        });
        fake
    };
    // The member's next message (group message or direct): (sender, payload).
    let next_message = |r: &mut Raw| loop {
        match r.recv() {
            Some(Frame::Deliver {
                sender, payload, ..
            })
            | Some(Frame::Direct { sender, payload }) => {
                break (
                    sender.to_string(),
                    String::from_utf8_lossy(&payload).into_owned(),
                )
            }
            Some(Frame::Noop | Frame::Membership { .. }) => {}
            other => panic!("{me}: expected a message, got {other:?}"),
        }
    };

    let bad: [(Frame, &str); 3] = [
        (forward("node3/0.1.x", None, "spoofed"), "FORWARD"),
        (forward("node3/1.2", Some(1), "spoofed"), "FORWARD_SEQ"),
        (direct("node1/0.9", "spoofed"), "FORWARD_DIRECT"),
    ];
    for (k, (frame, what)) in bad.into_iter().enumerate() {
        let mut fake = linked().await;
        // node2's own members' messages go through…
        let good = [
            forward("node2/0.1.x", None, "plain"),
            forward("node2/1.1", Some(1), "numbered"),
            direct("node2/0.3", "direct"),
        ];
        for (f, text) in good.iter().zip(["plain", "numbered", "direct"]) {
            fake.send(f);
            assert_eq!(next_message(&mut r).1, text, "{what}: {f:?}");
        }
        // …one in another node's name ends the link.
        fake.send(&frame);
        expect_error(
            &mut fake,
            ErrorCode::NOT_ALLOWED,
            &format!("a {what} with another node's sender"),
        );
        until("the refusal to be counted", || errors() > before + k as u64).await;
        until("node1 to see the fake node2 down", || {
            peer_state(node1, "node2") != "up"
        })
        .await;
    }
    assert_eq!(errors(), before + 3);
    // Nothing spoofed reached the member; it is still served.
    let after = raw_fence(&mut r, 7);
    assert!(
        after
            .iter()
            .all(|f| !matches!(f, Frame::Deliver { .. } | Frame::Direct { .. })),
        "{after:?}"
    );
    r.send(&Frame::Publish {
        group: fw.clone(),
        payload: Bytes::from_static(b"mine"),
    });
    assert_eq!(next_message(&mut r), (me.clone(), "mine".to_string()));
}

/// A join's barrier waits on the link that was up when it was sent: when
/// that link is replaced by a new one on the same shard, the old link's
/// barriers pass (the new link starts with a snapshot that holds the join)
/// and the joiner is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_waiting_on_a_replaced_link_is_acknowledged() {
    let mut c = Cluster::new("honest-repl");
    // One shard: the replacing link lands where the old one was.
    let conf = c.conf("cluster.conf", 3, &format!("{QUICK}\n shards = 1"));
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    use msgc::protocol::snapshot_flags::{FIRST, LAST};
    let empty = || Frame::Snapshot {
        flags: FIRST | LAST,
        entries: Vec::new(),
    };
    let mut fake = fake_node2(&c).await;
    fake.send(&empty());
    let (mut r, me) = plain(node1);
    r.send(&Frame::Join {
        group: group("repl"),
        events: Events::None,
    });
    // node1 asks the fake node2 to confirm the join; it does not answer.
    loop {
        match fake.recv() {
            Some(Frame::Ping { .. }) => break,
            Some(_) => {}
            None => panic!("the fake node2's link closed before the barrier"),
        }
    }
    // node2 comes back on a new link, which replaces the old one.
    let mut fake2 = fake_node2(&c).await;
    fake2.send(&empty());
    let fake2_sock = fake2.s.try_clone().expect("clone socket");
    let answering = std::thread::spawn(move || {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            match fake2.recv() {
                Some(Frame::Ping { token }) => fake2.send(&Frame::Pong { token }),
                Some(_) => {}
                None => break,
            }
        }
    });
    assert!(fake.closed(), "the replaced link was not closed");
    let acked = loop {
        match r.recv() {
            Some(Frame::Membership {
                subject,
                reason: Reason::Join,
                ..
            }) if subject.as_ref() == me.as_bytes() => break true,
            Some(_) => {}
            None => break false,
        }
    };
    drop(r);
    let _ = fake2_sock.shutdown(Shutdown::Both);
    let _ = answering.join();
    assert!(
        acked,
        "the join was never acknowledged after its link was replaced"
    );
}
