//! Single-node server behaviour: a real server on loopback with two shards
//! (so cross-shard paths run), real clients and raw sockets.
//!
//! Delivery, large-message, order, stuck-member, idle and bad-input tests
//! run on both I/O backends (`..._uring` / `..._epoll`); the rest on one
//! each. Where io_uring is blocked (Docker's default seccomp profile,
//! `kernel.io_uring_disabled`) the `_uring` tests fail, unless
//! `MSGC_SKIP_URING` is set: then they say so and pass.

use crate::util::{group, wait_for, NodeProc, Raw, TempDir, TestServer, WAIT};
use bytes::{BufMut, Bytes, BytesMut};
use msgc::client::{Client, ClientConfig, Event};
use msgc::protocol::{
    ErrorCode, Events, Frame, FrameType, Hello, MemberId, NodeName, Reason, Role, FRAME_OVERHEAD,
    MAGIC, PROTOCOL_VERSION,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

/// Every server here runs two shards.
const SHARDS: usize = 2;

// ------------------------------------------------------------------ helpers

/// A two-shard server on `backend`, or `None` (with a note) when that
/// backend cannot run on this machine.
fn start(backend: &str, extra: &str) -> Option<TestServer> {
    if backend == "uring" && !crate::util::uring_here() {
        return None;
    }
    Some(TestServer::start(SHARDS, backend, extra))
}

/// A client config for `addr` with short waits: connect and re-dial fast,
/// never wait longer than [`WAIT`] for a reply.
fn client_config(addr: SocketAddr) -> ClientConfig {
    let mut cfg = ClientConfig::with_servers([addr.to_string()]);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.request_timeout = WAIT;
    cfg.reconnect_interval = Duration::from_millis(100);
    cfg
}

async fn connect(addr: SocketAddr) -> Client {
    Client::connect(client_config(addr))
        .await
        .expect("client connects")
}

/// The shard a member id says its connection lives on (`NODE/SHARD.SEQ`).
fn shard_of(id: &MemberId) -> usize {
    id.parts().expect("a server-assigned member id").1
}

/// Opens clients until there are at least `min` and both shards have one
/// (SO_REUSEPORT spreads connections by hash, so this is bounded, not fixed).
async fn clients_on_both_shards(addr: SocketAddr, min: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    let mut shards = HashSet::new();
    while clients.len() < min || shards.len() < SHARDS {
        assert!(
            clients.len() < 64,
            "64 connections all landed on shard(s) {shards:?}"
        );
        let c = connect(addr).await;
        shards.insert(shard_of(&c.member_id()));
        clients.push(c);
    }
    clients
}

fn stat(srv: &TestServer, field: &str) -> u64 {
    srv.stats()["totals"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("stats totals.{field} is a number"))
}

/// The next event `pick` accepts within `limit` (others are skipped); the
/// panic says what was awaited.
async fn event<T>(
    rx: &flume::Receiver<Event>,
    what: &str,
    limit: Duration,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            match rx.recv_async().await {
                Ok(ev) => {
                    if let Some(t) = pick(ev) {
                        return t;
                    }
                }
                Err(_) => panic!("event stream ended while waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// A membership event, flattened for comparison.
type Membership = (String, String, Reason, u32);

fn membership(g: &str, subject: &str, reason: Reason, size: u32) -> Membership {
    (g.to_owned(), subject.to_owned(), reason, size)
}

/// A client's event stream, read by a test: messages in order, membership
/// events kept aside, any disconnection a failure.
struct Inbox {
    rx: flume::Receiver<Event>,
    events: Vec<Membership>,
}

impl Inbox {
    fn new(c: &Client) -> Self {
        Self {
            rx: c.events(),
            events: Vec::new(),
        }
    }

    /// The next group message (sender, payload).
    async fn message(&mut self) -> (MemberId, Bytes) {
        let events = &mut self.events;
        event(&self.rx, "a message", WAIT, |e| match e {
            Event::Message {
                sender, payload, ..
            } => Some((sender, payload)),
            Event::Membership {
                group,
                subject,
                reason,
                size,
            } => {
                events.push((group.as_str().to_owned(), subject, reason, size));
                None
            }
            Event::Disconnected { reason, .. } => panic!("unexpected disconnection: {reason}"),
            Event::Reconnected { .. } => panic!("unexpected reconnection"),
            _ => None,
        })
        .await
    }

    /// The first membership event (kept-aside ones first) that `pick`
    /// accepts; others and messages are skipped.
    async fn find_membership(&mut self, pick: impl Fn(&Membership) -> bool) -> Membership {
        if let Some(i) = self.events.iter().position(&pick) {
            return self.events.remove(i);
        }
        self.events.clear();
        loop {
            let ev = self.membership().await;
            if pick(&ev) {
                return ev;
            }
        }
    }

    /// The next membership event (kept-aside ones first); messages skipped.
    async fn membership(&mut self) -> Membership {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        event(&self.rx, "a membership event", WAIT, |e| match e {
            Event::Membership {
                group,
                subject,
                reason,
                size,
            } => Some((group.as_str().to_owned(), subject, reason, size)),
            Event::Disconnected { reason, .. } => panic!("unexpected disconnection: {reason}"),
            _ => None,
        })
        .await
    }
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        name: None,
        credentials: Bytes::new(),
        features: 0,
        max_message_size: 0,
    })
}

/// A raw client that has completed the handshake, and its member id.
fn raw_member(addr: SocketAddr) -> (Raw, MemberId) {
    let mut r = Raw::connect(addr);
    r.send(&hello());
    match r.recv() {
        Some(Frame::Welcome(w)) => (r, w.member.expect("WELCOME carries a member id")),
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// The next frame other than NOOP (None at end of stream or timeout).
fn raw_next(r: &mut Raw) -> Option<Frame> {
    loop {
        match r.recv() {
            Some(Frame::Noop) => {}
            other => return other,
        }
    }
}

/// Reads the raw member's next membership event.
fn raw_membership(r: &mut Raw) -> Membership {
    match raw_next(r) {
        Some(Frame::Membership {
            group,
            subject,
            reason,
            size,
        }) => (
            group.as_str().to_owned(),
            String::from_utf8_lossy(&subject).into_owned(),
            reason,
            size,
        ),
        other => panic!("expected MEMBERSHIP, got {other:?}"),
    }
}

/// A frame of type `ty` with `body`, built by hand (so it can be wrong).
fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + body.len());
    b.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
    b.push(ty);
    b.extend_from_slice(body);
    b
}

/// A body field: one length byte, then the bytes.
fn str8(s: &[u8]) -> Vec<u8> {
    let mut b = vec![s.len() as u8];
    b.extend_from_slice(s);
    b
}

fn seq_payload(seq: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len.max(8));
    b.put_u64(seq);
    b.resize(len.max(8), b'x');
    b.freeze()
}

fn seq_of(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().expect("8-byte sequence number"))
}

// --------------------------------------------- 1. every member, every message

async fn every_member_gets_every_message(backend: &str) {
    const PER: u32 = 100;
    let Some(srv) = start(backend, "") else {
        return;
    };
    let clients = clients_on_both_shards(srv.addr, 4).await;
    let n = clients.len();
    let g = group("fan");
    for c in &clients {
        c.join(&g).await.expect("join");
    }
    let ids: HashSet<MemberId> = clients.iter().map(Client::member_id).collect();
    assert_eq!(ids.len(), n, "member ids are unique");

    let consumers: Vec<_> = clients
        .iter()
        .map(|c| {
            let mut inbox = Inbox::new(c);
            tokio::spawn(async move {
                // Every member publishes 0..PER then "end": reading until
                // every sender's "end" sees all of its messages (per-sender
                // order), and any duplicate or gap shows in the lists.
                let mut got: HashMap<MemberId, Vec<u32>> = HashMap::new();
                let mut ended = HashSet::new();
                while ended.len() < n {
                    let (sender, payload) = inbox.message().await;
                    assert!(
                        !ended.contains(&sender),
                        "a message from {sender} after its last"
                    );
                    if &payload[..] == b"end" {
                        ended.insert(sender);
                    } else {
                        let i: u32 = std::str::from_utf8(&payload)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .expect("numbered payload");
                        got.entry(sender).or_default().push(i);
                    }
                }
                got
            })
        })
        .collect();

    for c in &clients {
        for i in 0..PER {
            c.publish(&g, i.to_string()).await.expect("publish");
        }
        c.publish(&g, "end").await.expect("publish");
    }
    let want: Vec<u32> = (0..PER).collect();
    for (c, task) in clients.iter().zip(consumers) {
        let got = task.await.expect("consumer");
        assert_eq!(
            got.keys().cloned().collect::<HashSet<_>>(),
            ids,
            "{} heard from every member",
            c.member_id()
        );
        for (sender, list) in got {
            assert_eq!(
                list,
                want,
                "{} got {sender}'s messages once each, in order",
                c.member_id()
            );
        }
    }
    let publishes = n as u64 * u64::from(PER + 1);
    wait_for("publishes and deliveries counted", WAIT, || {
        stat(&srv, "publishes") == publishes && stat(&srv, "deliveries") == publishes * n as u64
    });
    assert_eq!(stat(&srv, "unrouted"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_member_gets_every_message_uring() {
    every_member_gets_every_message("uring").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_member_gets_every_message_epoll() {
    every_member_gets_every_message("epoll").await;
}

/// Payloads from empty to `max_message_size`, split over many reads and
/// writes, arrive byte for byte at members on both shards.
async fn large_messages_arrive_intact(backend: &str) {
    const MAX: usize = 1 << 20;
    let Some(srv) = start(backend, &format!("max_message_size = {MAX}")) else {
        return;
    };
    let clients = clients_on_both_shards(srv.addr, 2).await;
    for c in &clients {
        c.join("big").await.expect("join");
    }
    let sizes = [0, 1, 4093, 65_536 + 7, 300_001, MAX];
    let payloads: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (j * 31 + i * 7 + j / 251) as u8).collect())
        .collect();
    for p in &payloads {
        clients[0].publish("big", p.clone()).await.expect("publish");
    }
    for c in &clients {
        let mut inbox = Inbox::new(c);
        for (want, n) in payloads.iter().zip(sizes) {
            let (_, got) = inbox.message().await;
            assert_eq!(got.len(), n, "{}: size", c.member_id());
            assert!(got == want, "{}: {n}-byte payload intact", c.member_id());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_messages_arrive_intact_uring() {
    large_messages_arrive_intact("uring").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_messages_arrive_intact_epoll() {
    large_messages_arrive_intact("epoll").await;
}

// --------------------------------------------------------------- 2. ordering

/// `n` numbered messages from one publisher reach several members (on both
/// shards) in order, each once. `extra`: more server settings.
async fn one_publisher_order(backend: &str, n: u64, extra: &str) {
    const BATCH: u64 = 1000;
    // A backlog large enough that a consumer lagging behind the publisher is
    // not (legitimately) killed as stuck: this test is about order.
    let Some(srv) = start(backend, &format!("max_backlog = 200000\n{extra}")) else {
        return;
    };
    let members = clients_on_both_shards(srv.addr, 3).await;
    let publisher = connect(srv.addr).await;
    let pid = publisher.member_id();
    let g = group("order");
    for m in &members {
        m.join(&g).await.expect("join");
    }
    let consumers: Vec<_> = members
        .iter()
        .map(|m| {
            let mut inbox = Inbox::new(m);
            let (pid, me) = (pid.clone(), m.member_id());
            tokio::spawn(async move {
                // 0..N, then the sentinel N: nothing missing, repeated or
                // out of place.
                for want in 0..=n {
                    let (sender, payload) = inbox.message().await;
                    assert_eq!(sender, pid, "{me}: only the publisher publishes");
                    assert_eq!(seq_of(&payload), want, "{me}: message {want} in its place");
                }
            })
        })
        .collect();
    for start in (0..n).step_by(BATCH as usize) {
        let payloads = (start..start + BATCH).map(|i| i.to_be_bytes());
        publisher
            .publish_batch(&g, payloads)
            .await
            .expect("publish");
    }
    publisher
        .publish(&g, Bytes::copy_from_slice(&n.to_be_bytes()))
        .await
        .expect("publish sentinel");
    for task in consumers {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("consumer finished in time")
            .expect("consumer");
    }
    assert_eq!(stat(&srv, "stuck_kills"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_publisher_order_uring() {
    one_publisher_order("uring", 100_000, "").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_publisher_order_epoll() {
    one_publisher_order("epoll", 100_000, "").await;
}

/// With `messages_per_iter` above the kernel's 1024 buffers per `writev`,
/// a writer that falls behind still writes its batches (in parts).
#[tokio::test(flavor = "multi_thread")]
async fn write_batches_beyond_iov_max_uring() {
    one_publisher_order("uring", 30_000, "messages_per_iter = 100000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn write_batches_beyond_iov_max_epoll() {
    one_publisher_order("epoll", 30_000, "messages_per_iter = 100000").await;
}

// -------------------------------------------------------- 3. membership events

#[tokio::test(flavor = "multi_thread")]
async fn membership_events_on_join_leave_and_disconnect() {
    let Some(srv) = start("auto", "") else {
        return;
    };
    let g = "members";
    let a = connect(srv.addr).await;
    let (b, c) = (connect(srv.addr).await, connect(srv.addr).await);
    let (ai, bi, ci) = (
        a.member_id().to_string(),
        b.member_id().to_string(),
        c.member_id().to_string(),
    );
    let (mut ain, mut bin, mut cin) = (Inbox::new(&a), Inbox::new(&b), Inbox::new(&c));
    // Each step's events are awaited before the next step: events about
    // different members may reach a third member from different shards.
    a.join(g).await.expect("join");
    assert_eq!(ain.membership().await, membership(g, &ai, Reason::Join, 1));
    b.join(g).await.expect("join");
    let ev = membership(g, &bi, Reason::Join, 2);
    assert_eq!(ain.membership().await, ev);
    assert_eq!(bin.membership().await, ev, "the joiner's own event");
    c.join(g).await.expect("join");
    let ev = membership(g, &ci, Reason::Join, 3);
    for inbox in [&mut ain, &mut bin, &mut cin] {
        assert_eq!(inbox.membership().await, ev);
    }

    // A raw member: joining twice is one event; then a PING's PONG is the
    // next frame it gets.
    let (mut d, di) = tokio::task::block_in_place(|| raw_member(srv.addr));
    let di = di.to_string();
    let ev = membership(g, &di, Reason::Join, 4);
    tokio::task::block_in_place(|| {
        d.send(&Frame::Join {
            group: group(g),
            events: Events::Each,
        });
        assert_eq!(raw_membership(&mut d), ev);
        d.send(&Frame::Join {
            group: group(g),
            events: Events::Each,
        });
        d.send(&Frame::Leave {
            group: group("never-joined"),
        });
        d.send(&Frame::Ping { token: 7 });
        assert_eq!(raw_next(&mut d), Some(Frame::Pong { token: 7 }));
    });
    for inbox in [&mut ain, &mut bin, &mut cin] {
        assert_eq!(inbox.membership().await, ev);
    }

    // Leave: everyone, the leaver included, hears it.
    b.leave(g).await.expect("leave");
    let ev = membership(g, &bi, Reason::Leave, 3);
    for inbox in [&mut ain, &mut bin, &mut cin] {
        assert_eq!(inbox.membership().await, ev);
    }
    assert_eq!(tokio::task::block_in_place(|| raw_membership(&mut d)), ev);

    // A client dropped: the others hear a disconnect.
    drop(cin);
    drop(c);
    let ev = membership(g, &ci, Reason::Disconnect, 2);
    assert_eq!(ain.membership().await, ev);
    assert_eq!(tokio::task::block_in_place(|| raw_membership(&mut d)), ev);

    // A raw socket reset (SO_LINGER 0): likewise.
    socket2::SockRef::from(&d.s)
        .set_linger(Some(Duration::ZERO))
        .expect("set linger");
    drop(d);
    assert_eq!(
        ain.membership().await,
        membership(g, &di, Reason::Disconnect, 1)
    );
    assert_eq!(a.members(g).await.expect("members"), vec![a.member_id()]);
    // B is no longer a member: nothing about the group reached it since.
    assert!(bin.events.is_empty() && bin.rx.is_empty());
}

// ------------------------------------------------------------- 4. stuck member

async fn stuck_member_is_closed(backend: &str) {
    const TOTAL: u64 = 1000;
    const WINDOW: u64 = 40;
    const SIZE: usize = 4000;
    // No keepalive NOOPs during the test: every frame for the raw member
    // is a message, so what it got and what was dropped add up.
    let settings = "max_backlog = 100\n tcpbuf_size = 4096\n keepalive_interval = 600";
    let Some(srv) = start(backend, settings) else {
        return;
    };
    let g = group("stuck");
    let publisher = connect(srv.addr).await;
    let healthy = connect(srv.addr).await;
    publisher.join(&g).await.expect("join");
    healthy.join(&g).await.expect("join");
    let (mut pin, mut hin) = (Inbox::new(&publisher), Inbox::new(&healthy));

    // A raw member that joins and then never reads again, with a small
    // receive buffer so that the kernel holds little for it.
    let (mut raw, raw_id) = tokio::task::block_in_place(|| {
        let (mut raw, id) = raw_member(srv.addr);
        socket2::SockRef::from(&raw.s)
            .set_recv_buffer_size(4096)
            .expect("set SO_RCVBUF");
        raw.send(&Frame::Join {
            group: g.clone(),
            events: Events::Each,
        });
        let ev = raw_membership(&mut raw);
        assert_eq!((ev.1.as_str(), ev.2), (id.as_str(), Reason::Join));
        (raw, id)
    });

    // The publisher publishes in windows and waits until both healthy
    // members have every message of a window: their queues stay far below
    // max_backlog, while the raw member's grows until it is stuck.
    for start in (0..TOTAL).step_by(WINDOW as usize) {
        let window = (start..start + WINDOW).map(|i| seq_payload(i, SIZE));
        publisher.publish_batch(&g, window).await.expect("publish");
        for inbox in [&mut pin, &mut hin] {
            for want in start..start + WINDOW {
                let (_, payload) = inbox.message().await;
                assert_eq!(seq_of(&payload), want, "healthy member: in order, no gap");
                assert_eq!(payload.len(), SIZE);
            }
        }
    }
    // Nothing more: the next message is the sentinel.
    publisher
        .publish(&g, seq_payload(TOTAL, 8))
        .await
        .expect("publish");
    for inbox in [&mut pin, &mut hin] {
        assert_eq!(seq_of(&inbox.message().await.1), TOTAL);
    }

    wait_for("the stuck member to be counted", WAIT, || {
        stat(&srv, "stuck_kills") >= 1 && stat(&srv, "dropped_stuck") > 0
    });
    assert_eq!(
        stat(&srv, "stuck_kills"),
        1,
        "only the raw member was stuck"
    );
    // What reached the stuck member: a prefix of the messages, in order,
    // then the end of the stream.
    let (received, closed) = tokio::task::block_in_place(|| {
        let mut received = 0;
        while let Some(f) = raw_next(&mut raw) {
            match f {
                Frame::Deliver { payload, .. } => {
                    assert_eq!(seq_of(&payload), received, "stuck member: in order");
                    received += 1;
                }
                other => panic!("stuck member got {other:?}"),
            }
        }
        (received, raw.closed())
    });
    assert!(closed, "the stuck member's socket was closed");
    assert!(received < TOTAL);
    let gone = membership("stuck", raw_id.as_str(), Reason::Disconnect, 2);
    for inbox in [&mut pin, &mut hin] {
        let ev = inbox.find_membership(|e| e.1 == raw_id.as_str() && e.2 != Reason::Join);
        assert_eq!(ev.await, gone);
    }
    // Every message queued for it was delivered or counted as dropped as
    // stuck: what its queue held and what its writer was writing, plus the
    // one that found the queue full if it was judged stuck then (rather
    // than by the stuck watch, while its publisher waited). Messages routed
    // to it after the kill and before it left the group count as
    // `dropped_closed`, never queued.
    let healthy_deliveries = 2 * (TOTAL + 1);
    wait_for(
        "the stuck member's messages to be accounted for",
        WAIT,
        || {
            let queued_for_raw = stat(&srv, "deliveries") - healthy_deliveries;
            let accounted = received + stat(&srv, "dropped_stuck");
            accounted == queued_for_raw || accounted == queued_for_raw + 1
        },
    );
    assert_eq!(srv.stats()["drops"]["stuck"], stat(&srv, "dropped_stuck"));
}

#[tokio::test(flavor = "multi_thread")]
async fn stuck_member_is_closed_uring() {
    stuck_member_is_closed("uring").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stuck_member_is_closed_epoll() {
    stuck_member_is_closed("epoll").await;
}

// ------------------------------------------------------- 5. idle and keepalive

async fn idle_timeout_and_keepalive(backend: &str) {
    // 2 s: a keepalive every 100 ms leaves a margin that a loaded 2-CPU
    // machine stalling the client's runtime for a moment does not eat.
    let Some(srv) = start(backend, "idle_timeout = 2") else {
        return;
    };
    // A keepalive-sending client, idle otherwise.
    let mut cfg = client_config(srv.addr);
    cfg.keepalive_interval = Duration::from_millis(100);
    let client = Client::connect(cfg).await.expect("connect");
    let id = client.member_id();
    client.join("ka").await.expect("join");
    let mut inbox = Inbox::new(&client);

    // Two silent raw sockets: one never says HELLO, one says only HELLO.
    let (silent, quiet) = tokio::task::block_in_place(|| {
        (
            std::thread::spawn({
                let mut r = Raw::connect(srv.addr);
                move || r.closed()
            }),
            std::thread::spawn({
                let (mut r, _) = raw_member(srv.addr);
                move || (raw_next(&mut r), r.closed())
            }),
        )
    });
    let (silent, (last, quiet)) = tokio::task::block_in_place(|| {
        (
            silent.join().expect("reader"),
            quiet.join().expect("reader"),
        )
    });
    assert!(silent, "a socket that never sent HELLO is closed");
    match last {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::IDLE),
        other => panic!("expected ERROR IDLE, got {other:?}"),
    }
    assert!(quiet, "a handshaken but silent socket is closed");
    wait_for("idle kills counted", WAIT, || stat(&srv, "idle_kills") >= 2);

    // Nothing may happen to the client: this wait (past idle_timeout)
    // asserts an absence.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.publish("ka", "still here").await.expect("publish");
    let (sender, payload) = inbox.message().await; // panics on a disconnection
    assert_eq!((sender, &payload[..]), (id.clone(), &b"still here"[..]));
    assert_eq!(client.member_id(), id, "never reconnected");
    assert!(inbox
        .events
        .iter()
        .all(|e| e.1 != id.as_str() || e.2 == Reason::Join));
    assert_eq!(stat(&srv, "idle_kills"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_and_keepalive_uring() {
    idle_timeout_and_keepalive("uring").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_and_keepalive_epoll() {
    idle_timeout_and_keepalive("epoll").await;
}

// ---------------------------------------------------------------- 6. bad input

/// One kind of bad input: what is sent (after a handshake or not) and the
/// error code it must get.
pub(crate) struct Case {
    pub(crate) what: &'static str,
    pub(crate) handshake: bool,
    pub(crate) bytes: Vec<u8>,
    pub(crate) code: ErrorCode,
}

pub(crate) fn bad_inputs(max_message_size: usize) -> Vec<Case> {
    let max_frame = max_message_size + FRAME_OVERHEAD;
    let case = |what, handshake, bytes, code| Case {
        what,
        handshake,
        bytes,
        code,
    };
    let mut hello_v2 = BytesMut::new();
    Frame::Hello(Hello {
        version: 2,
        role: Role::Client,
        name: None,
        credentials: Bytes::new(),
        features: 0,
        max_message_size: 0,
    })
    .encode(&mut hello_v2);
    let mut bad_magic = b"MSGX".to_vec();
    bad_magic.extend_from_slice(&[0, 1, 1, 0, 0, 0]);
    let mut good_magic = MAGIC.to_vec();
    good_magic.extend_from_slice(&[0, 1, 9, 0, 0, 0]); // role 9
    let big = vec![b'x'; max_message_size + 1];
    let mut publish_big = str8(b"g");
    publish_big.extend_from_slice(&big);
    let mut send_big = str8(b"test/0.1");
    send_big.extend_from_slice(&big);
    let forward = Frame::Forward {
        seq: None,
        group: group("g"),
        sender: MemberId::from_str_checked("other/0.1").expect("id"),
        payload: Bytes::from_static(b"hi"),
    };
    let peer_join = Frame::PeerJoin {
        group: group("g"),
        member: MemberId::from_str_checked("other/0.1").expect("id"),
    };
    let mut deliver = str8(b"g");
    deliver.extend_from_slice(&str8(b"test/0.1"));
    vec![
        case(
            "garbage (an HTTP request)",
            false,
            b"GET / HTTP/1.1\r\nHost: msgc\r\n\r\n".to_vec(),
            ErrorCode::TOO_LARGE,
        ),
        case(
            "garbage after HELLO",
            true,
            vec![0xde, 0xad, 0xbe, 0xef, 0xfe, 0xed],
            ErrorCode::TOO_LARGE,
        ),
        case(
            "zero length prefix",
            true,
            vec![0, 0, 0, 0, 0x10],
            ErrorCode::MALFORMED,
        ),
        case(
            "truncated field",
            true,
            frame(FrameType::JOIN.0, &[200, b'a']),
            ErrorCode::MALFORMED,
        ),
        case(
            "trailing bytes",
            true,
            frame(FrameType::PING.0, &[0; 9]),
            ErrorCode::MALFORMED,
        ),
        case(
            "oversize length prefix",
            true,
            {
                let mut b = (max_frame as u32 + 1).to_be_bytes().to_vec();
                b.push(FrameType::PUBLISH.0);
                b
            },
            ErrorCode::TOO_LARGE,
        ),
        case(
            "length prefix of 4 GiB",
            false,
            vec![0xff, 0xff, 0xff, 0xff],
            ErrorCode::TOO_LARGE,
        ),
        case(
            "JOIN before HELLO",
            false,
            Frame::Join {
                group: group("g"),
                events: Events::Each,
            }
            .to_bytes()
            .to_vec(),
            ErrorCode::HANDSHAKE_REQUIRED,
        ),
        case(
            "PING before HELLO",
            false,
            Frame::Ping { token: 1 }.to_bytes().to_vec(),
            ErrorCode::HANDSHAKE_REQUIRED,
        ),
        case(
            "HELLO twice",
            true,
            hello().to_bytes().to_vec(),
            ErrorCode::HANDSHAKE_REQUIRED,
        ),
        case(
            "HELLO with bad magic",
            false,
            frame(FrameType::HELLO.0, &bad_magic),
            ErrorCode::UNSUPPORTED_VERSION,
        ),
        case(
            "HELLO of version 2",
            false,
            hello_v2.to_vec(),
            ErrorCode::UNSUPPORTED_VERSION,
        ),
        case(
            "HELLO with an unknown role",
            false,
            frame(FrameType::HELLO.0, &good_magic),
            ErrorCode::MALFORMED,
        ),
        case(
            "HELLO as a peer not in peers",
            false,
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                role: Role::Peer,
                name: Some(NodeName::from_str_checked("stranger").expect("name")),
                credentials: Bytes::new(),
                features: 0,
                max_message_size: 0,
            })
            .to_bytes()
            .to_vec(),
            ErrorCode::NOT_ALLOWED,
        ),
        case(
            "unknown frame type",
            true,
            frame(0x7f, b"??"),
            ErrorCode::UNKNOWN_TYPE,
        ),
        case(
            "unknown frame type before HELLO",
            false,
            frame(0xee, b""),
            ErrorCode::UNKNOWN_TYPE,
        ),
        case(
            "group name with a space",
            true,
            frame(FrameType::JOIN.0, &str8(b"a b")),
            ErrorCode::INVALID_NAME,
        ),
        case(
            "empty group name",
            true,
            frame(FrameType::PUBLISH.0, &str8(b"")),
            ErrorCode::INVALID_NAME,
        ),
        case(
            "group name with byte 0xff",
            true,
            frame(FrameType::LEAVE.0, &str8(b"caf\xff")),
            ErrorCode::INVALID_NAME,
        ),
        case(
            "member id with a control byte",
            true,
            frame(FrameType::SEND.0, &str8(b"test/0.1\n")),
            ErrorCode::INVALID_NAME,
        ),
        case(
            "FORWARD from a client",
            true,
            forward.to_bytes().to_vec(),
            ErrorCode::UNEXPECTED,
        ),
        case(
            "PEER_JOIN from a client",
            true,
            peer_join.to_bytes().to_vec(),
            ErrorCode::UNEXPECTED,
        ),
        case(
            "DELIVER from a client",
            true,
            frame(FrameType::DELIVER.0, &deliver),
            ErrorCode::UNEXPECTED,
        ),
        case(
            "PUBLISH over max_message_size",
            true,
            frame(FrameType::PUBLISH.0, &publish_big),
            ErrorCode::MESSAGE_TOO_LARGE,
        ),
        case(
            "SEND over max_message_size",
            true,
            frame(FrameType::SEND.0, &send_big),
            ErrorCode::MESSAGE_TOO_LARGE,
        ),
    ]
}

async fn bad_input_is_rejected(backend: &str) {
    const MAX: usize = 1000;
    let Some(srv) = start(backend, &format!("max_message_size = {MAX}")) else {
        return;
    };
    let healthy = connect(srv.addr).await;
    healthy.join("ok").await.expect("join");
    let mut inbox = Inbox::new(&healthy);
    let cases = bad_inputs(MAX);
    for (i, case) in cases.iter().enumerate() {
        let (reply, closed) = tokio::task::block_in_place(|| {
            let mut raw = if case.handshake {
                raw_member(srv.addr).0
            } else {
                Raw::connect(srv.addr)
            };
            raw.send_bytes(&case.bytes);
            let reply = raw_next(&mut raw);
            (reply, raw.closed())
        });
        match reply {
            Some(Frame::Error { code, .. }) => {
                assert_eq!(code, case.code, "{}: error code", case.what);
            }
            other => panic!("{}: expected ERROR, got {other:?}", case.what),
        }
        assert!(closed, "{}: the connection was closed", case.what);
        // The server goes on serving others.
        let text = format!("after case {i}");
        healthy.publish("ok", text.clone()).await.expect("publish");
        let (_, payload) = inbox.message().await;
        assert_eq!(&payload[..], text.as_bytes(), "after {}", case.what);
    }
    assert_eq!(stat(&srv, "protocol_errors"), cases.len() as u64);
    healthy.ping().await.expect("healthy client still served");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_uring() {
    bad_input_is_rejected("uring").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_epoll() {
    bad_input_is_rejected("epoll").await;
}

// ----------------------------------------------------------------- 7. restart

/// A config file for a one-node `msgc-server` on 127.0.0.1 and a free port
/// that can be restarted on (see [`crate::util::restartable_port`]).
fn node_config(dir: &TempDir) -> (std::path::PathBuf, SocketAddr) {
    let port = crate::util::restartable_port(&["127.0.0.1"]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let text = format!(
        "msgc_server {{\n  shards = {SHARDS}\n}}\n\
         msgcserver_listener {{\n  listen \"{addr}\" {{ }}\n}}\n"
    );
    (dir.write("solo.conf", &text), addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn client_reconnects_after_server_restart() {
    let dir = TempDir::new("restart");
    let (config, addr) = node_config(&dir);
    let mut node = tokio::task::block_in_place(|| NodeProc::start(config, "solo", addr));
    let client = connect(addr).await;
    client.join("r").await.expect("join");
    let rx = client.events();

    tokio::task::block_in_place(|| node.kill9());
    let reason = event(&rx, "Disconnected after the kill", WAIT, |e| match e {
        Event::Disconnected { reason, .. } => Some(reason),
        _ => None,
    })
    .await;
    assert!(!reason.is_empty());
    assert!(!client.is_connected());

    tokio::task::block_in_place(|| node.restart());
    // Reconnected comes once the re-join is acknowledged, or after
    // request_timeout (WAIT) without it: wait past that, so that a lost
    // re-join shows as such below rather than as a timeout here.
    let member = event(
        &rx,
        "Reconnected after the restart",
        2 * WAIT,
        |e| match e {
            Event::Reconnected { member, .. } => Some(member),
            Event::Disconnected { .. } => None, // a re-dial may find it starting
            _ => None,
        },
    )
    .await;
    assert_eq!(client.member_id(), member);
    // Re-joined: the server lists the new id, and a message arrives.
    assert_eq!(client.members("r").await.expect("members"), vec![member]);
    let other = connect(addr).await;
    other.publish("r", "welcome back").await.expect("publish");
    let payload = event(&rx, "the message after reconnecting", WAIT, |e| match e {
        Event::Message { payload, .. } => Some(payload),
        _ => None,
    })
    .await;
    assert_eq!(&payload[..], b"welcome back");
}

// ---------------------------------------------- 8. queries and direct messages

#[tokio::test(flavor = "multi_thread")]
async fn members_stats_ping_and_direct() {
    let Some(srv) = start("epoll", "") else {
        return;
    };
    let clients = clients_on_both_shards(srv.addr, 3).await;
    for c in &clients {
        c.join("q").await.expect("join");
    }
    let mut want: Vec<MemberId> = clients.iter().map(Client::member_id).collect();
    want.sort();
    for c in &clients {
        assert_eq!(c.members("q").await.expect("members"), want);
    }
    assert!(clients[0]
        .members("nobody-here")
        .await
        .expect("members")
        .is_empty());

    let stats = clients[0].stats().await.expect("stats");
    for key in [
        "node",
        "version",
        "uptime_secs",
        "io_backend",
        "shards",
        "groups",
        "totals",
        "dropped",
        "drops",
        "per_shard",
        "peers",
    ] {
        assert!(stats.get(key).is_some(), "stats has {key}: {stats}");
    }
    assert_eq!(stats["node"], "test");
    assert_eq!(stats["io_backend"], "epoll");
    assert_eq!(stats["shards"], SHARDS);
    assert_eq!(stats["groups"], 1);
    assert_eq!(stats["per_shard"].as_array().map(Vec::len), Some(SHARDS));
    for key in [
        "connections",
        "msgs_in",
        "msgs_out",
        "publishes",
        "deliveries",
        "unrouted",
        "stuck_kills",
        "idle_kills",
        "protocol_errors",
        "dropped_stuck",
        "dropped_unknown_member",
    ] {
        assert!(stats["totals"][key].is_u64(), "totals.{key}: {stats}");
    }
    for key in [
        "stuck",
        "idle",
        "protocol_error",
        "closed",
        "unknown_member",
        "peer",
    ] {
        assert!(stats["drops"][key].is_u64(), "drops.{key}: {stats}");
    }
    assert_eq!(
        stats["totals"]["connections"].as_u64(),
        Some(clients.len() as u64)
    );

    for c in &clients {
        c.ping().await.expect("ping");
    }

    // Direct messages to a member on each shard, from one on each shard.
    let inboxes: Vec<Inbox> = clients.iter().map(Inbox::new).collect();
    for (i, from) in clients.iter().enumerate() {
        for (j, to) in clients.iter().enumerate() {
            if i != j {
                let text = format!("{i}->{j}");
                from.send(to.member_id(), text.clone()).await.expect("send");
                let (sender, payload) =
                    event(&inboxes[j].rx, "a direct message", WAIT, |e| match e {
                        Event::Direct { sender, payload } => Some((sender, payload)),
                        _ => None,
                    })
                    .await;
                assert_eq!((sender, &payload[..]), (from.member_id(), text.as_bytes()));
            }
        }
    }
    // Unknown members: dropped and counted, not an error.
    let before = stat(&srv, "dropped_unknown_member");
    let unknown = [
        "test/0.999999",
        "test/1.999999",
        "test/9.1",
        "elsewhere/0.1",
        "plain",
    ];
    for to in unknown {
        clients[0].send(to, "lost").await.expect("send");
    }
    wait_for("unknown members counted", WAIT, || {
        stat(&srv, "dropped_unknown_member") == before + unknown.len() as u64
    });
    clients[0].ping().await.expect("still connected");
}

// ---------------------------------------------------------------- 9. SIGTERM

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_says_shutting_down_and_exits_0() {
    let dir = TempDir::new("sigterm");
    let (config, addr) = node_config(&dir);
    let mut node = tokio::task::block_in_place(|| NodeProc::start(config, "solo", addr));
    let mut cfg = client_config(addr);
    cfg.reconnect_interval = Duration::from_secs(60);
    let client = Client::connect(cfg).await.expect("connect");
    client.join("t").await.expect("join");
    let rx = client.events();
    let (mut raw, _) = tokio::task::block_in_place(|| raw_member(addr));

    let code = tokio::task::block_in_place(|| node.terminate());
    assert_eq!(code, Some(0), "msgc-server exits 0 on SIGTERM");
    let reason = event(&rx, "Disconnected at SIGTERM", WAIT, |e| match e {
        Event::Disconnected { reason, .. } => Some(reason),
        _ => None,
    })
    .await;
    assert!(
        reason.contains("shutting_down"),
        "the client was told why: {reason}"
    );
    tokio::task::block_in_place(|| {
        match raw_next(&mut raw) {
            Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::SHUTTING_DOWN),
            other => panic!("expected ERROR SHUTTING_DOWN, got {other:?}"),
        }
        assert!(raw.closed());
    });
}

// ------------------------------------------------------------ listen address

/// A second server on an address another one listens on must fail to
/// start: SO_REUSEPORT (one listener per shard) would otherwise let it
/// join the first one's listeners and take half of its connections.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_is_refused() {
    let Some(first) = start("epoll", "") else {
        return;
    };
    let text = format!(
        "msgc_server {{\n node = \"second\"\n shards = {SHARDS}\n io_backend = epoll\n}}\n\
         msgcserver_listener {{ listen \"{}\" {{ }} }}\n",
        first.addr
    );
    let config = msgc::config::Config::parse_str("second.conf", &text).expect("config parses");
    match msgc::server::Server::start(&config, None) {
        Err(e) => assert!(e.to_string().contains(&first.addr.to_string()), "{e}"),
        Ok(second) => {
            second.shutdown();
            panic!("a second server started on {}, in use", first.addr);
        }
    }
    // The first one still serves every connection.
    for c in clients_on_both_shards(first.addr, 4).await {
        assert!(c.member_id().as_str().starts_with("test/"));
    }
}
