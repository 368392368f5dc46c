//! Cluster behaviour: `msgc-server` processes on 127.0.0.1, .2, .3 (and .4)
//! sharing one port, a full mesh between them, clients on each node.
//!
//! Every wait is bounded (`until`, `Member::wait`, `WAIT`); nothing asserts
//! on timing. A message published to a group is for the members known at
//! that moment, so tests wait for the cluster-wide view (members query)
//! before publishing across nodes.

use crate::util::{free_port, restartable_port, wait_for_async, NodeProc, Raw, TempDir, WAIT};
use bytes::Bytes;
use msgc::client::{Client, ClientConfig, Event};
use msgc::protocol::{ErrorCode, Frame, Hello, NodeName, Reason, Role, PROTOCOL_VERSION};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const IPS: [&str; 4] = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];

/// Quick keepalives and re-dials; an idle timeout long enough that a busy
/// debug build on two cores never trips it by accident (tests that need
/// idle detection set their own).
pub(crate) const QUICK: &str =
    "keepalive_interval = 0.2\n idle_timeout = 5\n reconnect_interval = 0.2\n connect_timeout = 2";

pub(crate) fn ip(i: usize) -> IpAddr {
    IPS[i].parse().expect("ip")
}

pub(crate) fn name(i: usize) -> String {
    format!("node{}", i + 1)
}

/// The `peers` entries of nodes `0..n` at their own addresses.
pub(crate) fn plain_peers(n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (name(i), IPS[i].to_string())).collect()
}

/// A `msgc_server` stanza for `peers` on `port`, two shards, plus `extra`.
pub(crate) fn config_text(port: u16, peers: &[(String, String)], extra: &str) -> String {
    let list: Vec<String> = peers
        .iter()
        .map(|(n, a)| format!("{n} = \"{a}\""))
        .collect();
    format!(
        "msgc_server {{\n peers = [ {} ]\n port = {port}\n shards = 2\n {extra}\n}}\n",
        list.join(" ")
    )
}

/// Nodes `node1..` on 127.0.0.1.. and one shared port; killed on drop.
pub(crate) struct Cluster {
    pub(crate) dir: TempDir,
    pub(crate) port: u16,
    pub(crate) nodes: Vec<NodeProc>,
}

impl Cluster {
    pub(crate) fn new(tag: &str) -> Self {
        Self {
            dir: TempDir::new(tag),
            port: restartable_port(&IPS),
            nodes: Vec::new(),
        }
    }

    /// `n` nodes sharing `cluster.conf` (peers node1..node`n` plus `extra`),
    /// started one after the other, with the mesh up.
    pub(crate) async fn start(tag: &str, n: usize, extra: &str) -> Self {
        let mut c = Self::new(tag);
        let conf = c.conf("cluster.conf", n, extra);
        for i in 0..n {
            c.spawn(i, conf.clone());
        }
        c.ready();
        c.wait_mesh(&(0..n).collect::<Vec<_>>()).await;
        c
    }

    pub(crate) fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(ip(i), self.port)
    }

    /// Writes config `file` for peers node1..node`n` with `extra`.
    pub(crate) fn conf(&self, file: &str, n: usize, extra: &str) -> PathBuf {
        self.dir
            .write(file, &config_text(self.port, &plain_peers(n), extra))
    }

    /// Spawns node `i` (the next one) with `conf`, without waiting.
    pub(crate) fn spawn(&mut self, i: usize, conf: PathBuf) {
        assert_eq!(i, self.nodes.len(), "nodes are spawned in order");
        self.nodes
            .push(NodeProc::spawn(conf, &name(i), self.addr(i)));
    }

    /// Waits (bounded) until every node listens.
    pub(crate) fn ready(&self) {
        for n in &self.nodes {
            n.wait_ready();
        }
    }

    /// Waits until each of `nodes` lists exactly the others as peers, all up.
    pub(crate) async fn wait_mesh(&self, nodes: &[usize]) {
        for &i in nodes {
            let others: Vec<String> = nodes
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| name(j))
                .collect();
            let addr = self.addr(i);
            until(&format!("{} to see {others:?} up", name(i)), || {
                mesh_up(addr, &others)
            })
            .await;
        }
    }
}

/// Polls `cond` (every 10 ms, at most `WAIT`).
pub(crate) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for_async(what, WAIT, || std::future::ready(cond())).await;
}

/// Waits until `addr` accepts TCP connections.
async fn listening(addr: SocketAddr) {
    wait_for_async(&format!("{addr} to listen"), WAIT, || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

// ---------------------------------------------------------------------------
// Stats.

/// The stats document of the node at `addr` (a raw client connection).
pub(crate) fn stats(addr: SocketAddr) -> Value {
    crate::util::raw_stats(addr)
}

pub(crate) fn peer_of<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["peers"].as_array()?.iter().find(|p| p["name"] == name)
}

pub(crate) fn peer_state(addr: SocketAddr, peer: &str) -> String {
    let st = stats(addr);
    peer_of(&st, peer)
        .and_then(|p| p["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

pub(crate) fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// True when `addr` lists exactly `names` as its peers and all are up.
pub(crate) fn mesh_up(addr: SocketAddr, names: &[String]) -> bool {
    let st = stats(addr);
    let peers = st["peers"].as_array().expect("peers array");
    peers.len() == names.len()
        && names
            .iter()
            .all(|n| peer_of(&st, n).is_some_and(|p| p["state"] == "up"))
}

// ---------------------------------------------------------------------------
// Members: a client whose events are logged by a task.

pub(crate) fn client_config(addr: SocketAddr) -> ClientConfig {
    let mut cfg = ClientConfig::with_servers([addr.to_string()]);
    cfg.reconnect_interval = Duration::from_millis(200);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.request_timeout = Duration::from_secs(10);
    cfg
}

pub(crate) struct Member {
    pub(crate) client: Client,
    log: Arc<Mutex<Vec<Event>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Member {
    pub(crate) async fn connect(addr: SocketAddr) -> Member {
        Self::connect_with(client_config(addr)).await
    }

    /// Connects with `cfg` (its first server must be up).
    pub(crate) async fn connect_with(cfg: ClientConfig) -> Member {
        let first = cfg.servers.first().cloned().unwrap_or_default();
        let client = Client::connect(cfg)
            .await
            .unwrap_or_else(|e| panic!("client connects to {first}: {e}"));
        let rx = client.events();
        let log: Arc<Mutex<Vec<Event>>> = Arc::default();
        let sink = log.clone();
        let task = tokio::spawn(async move {
            while let Ok(ev) = rx.recv_async().await {
                sink.lock().unwrap().push(ev);
            }
        });
        Member { client, log, task }
    }

    /// Connects to `addr` and joins `group`.
    pub(crate) async fn joined(addr: SocketAddr, group: &str) -> Member {
        let m = Member::connect(addr).await;
        m.join(group).await;
        m
    }

    pub(crate) fn id(&self) -> String {
        self.client.member_id().to_string()
    }

    pub(crate) async fn join(&self, group: &str) {
        self.client.join(group).await.expect("join");
    }

    pub(crate) async fn publish(&self, group: &str, payload: Bytes) {
        self.client.publish(group, payload).await.expect("publish");
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&[Event]) -> R) -> R {
        f(&self.log.lock().unwrap())
    }

    /// How many logged events satisfy `f`.
    pub(crate) fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.with(|evs| evs.iter().filter(|e| f(e)).count())
    }

    /// (sender, payload) of the messages received in `group`, in order.
    pub(crate) fn messages(&self, group: &str) -> Vec<(String, Bytes)> {
        self.with(|evs| {
            evs.iter()
                .filter_map(|e| match e {
                    Event::Message {
                        group: g,
                        sender,
                        payload,
                    } if g.as_str() == group => Some((sender.to_string(), payload.clone())),
                    _ => None,
                })
                .collect()
        })
    }

    pub(crate) fn message_count(&self, group: &str) -> usize {
        self.count(|e| matches!(e, Event::Message { group: g, .. } if g.as_str() == group))
    }

    pub(crate) fn disconnects(&self) -> usize {
        self.count(|e| matches!(e, Event::Disconnected { .. }))
    }

    /// Membership events in `group` about `subject` for `reason`.
    pub(crate) fn memberships(&self, group: &str, subject: &str, reason: Reason) -> Vec<u32> {
        self.with(|evs| {
            evs.iter()
                .filter_map(|e| match e {
                    Event::Membership {
                        group: g,
                        subject: s,
                        reason: r,
                        size,
                    } if g.as_str() == group && s == subject && *r == reason => Some(*size),
                    _ => None,
                })
                .collect()
        })
    }

    /// Waits until some logged event satisfies `f`.
    pub(crate) async fn wait(&self, what: &str, f: impl Fn(&Event) -> bool) {
        until(what, || self.count(&f) > 0).await;
    }

    /// Waits for a membership event; returns the size it reported.
    pub(crate) async fn wait_membership(&self, group: &str, subject: &str, reason: Reason) -> u32 {
        let what = format!("{}: {} {subject} in {group}", self.id(), reason.name());
        until(&what, || {
            !self.memberships(group, subject, reason).is_empty()
        })
        .await;
        self.memberships(group, subject, reason)[0]
    }

    /// Waits until at least `n` messages arrived in `group`.
    pub(crate) async fn wait_messages(&self, group: &str, n: usize) {
        let end = tokio::time::Instant::now() + WAIT;
        while self.message_count(group) < n {
            assert!(
                tokio::time::Instant::now() < end,
                "{}: waited for {n} messages in {group}, got {}",
                self.id(),
                self.message_count(group)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls the members query until it returns exactly `want` (sorted).
    /// The members query's answer, as strings.
    pub(crate) async fn view(&self, group: &str) -> Vec<String> {
        self.client
            .members(group)
            .await
            .expect("members query")
            .iter()
            .map(|m| m.to_string())
            .collect()
    }

    pub(crate) async fn wait_view(&self, group: &str, want: &[String]) {
        let mut want = want.to_vec();
        want.sort();
        let end = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.view(group).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "{}: view of {group} is {got:?}, waited for {want:?}",
                self.id()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits until each of `members` sees exactly `members` in `group`.
pub(crate) async fn wait_views(members: &[&Member], group: &str) {
    let ids: Vec<String> = members.iter().map(|m| m.id()).collect();
    for m in members {
        m.wait_view(group, &ids).await;
    }
}

// ---------------------------------------------------------------------------
// Numbered payloads: "TAG:SEQ:" then filler derived from SEQ (checked).

pub(crate) fn payload(tag: &str, seq: u64, len: usize) -> Bytes {
    let mut v = format!("{tag}:{seq}:").into_bytes();
    let fill = b'a' + (seq % 26) as u8;
    v.resize(len.max(v.len()), fill);
    v.into()
}

pub(crate) fn parse(p: &[u8]) -> (String, u64) {
    let s = std::str::from_utf8(p).expect("payload is text");
    let mut it = s.splitn(3, ':');
    let tag = it.next().expect("tag").to_string();
    let seq: u64 = it.next().and_then(|n| n.parse().ok()).expect("sequence");
    let fill = b'a' + (seq % 26) as u8;
    assert!(
        it.next().expect("filler").bytes().all(|b| b == fill),
        "payload {tag}:{seq} corrupted"
    );
    (tag, seq)
}

/// Per tag, the sequence numbers received in order; panics on a duplicate
/// or a reordering (each tag must strictly increase).
pub(crate) fn sequences(msgs: &[(String, Bytes)], who: &str) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for (_, p) in msgs {
        let (tag, seq) = parse(p);
        let v = out.entry(tag.clone()).or_default();
        if let Some(&last) = v.last() {
            assert!(
                seq > last,
                "{who}: from {tag}, message {seq} after {last} (duplicate or reordered)"
            );
        }
        v.push(seq);
    }
    out
}

pub(crate) fn range(r: std::ops::Range<u64>) -> Vec<u64> {
    r.collect()
}

// ---------------------------------------------------------------------------
// 1. Fan-out across three nodes.

/// Members on three nodes each get every message published on any node,
/// once, in order per sender, uncorrupted. node2 runs the epoll backend,
/// the others io_uring where available: the backends interoperate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_gets_every_message_once_in_order_per_sender() {
    let mut c = Cluster::new("fanout");
    let conf = c.conf("cluster.conf", 3, QUICK);
    let epoll = c.conf("node2.conf", 3, &format!("{QUICK}\n io_backend = epoll"));
    c.spawn(0, conf.clone());
    c.spawn(1, epoll);
    c.spawn(2, conf);
    c.ready();
    c.wait_mesh(&[0, 1, 2]).await;

    let g = "fanout";
    let mut members = Vec::new();
    for i in 0..3 {
        members.push(Member::joined(c.addr(i), g).await);
    }
    wait_views(&members.iter().collect::<Vec<_>>(), g).await;

    const N: u64 = 300;
    let publishers: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let client = m.client.clone();
            tokio::spawn(async move {
                for s in 0..=N {
                    let p = payload(&format!("p{i}"), s, 16 + (s as usize * 37) % 700);
                    client.publish("fanout", p).await.expect("publish");
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    let total = 3 * (N as usize + 1);
    for m in &members {
        m.wait_messages(g, total).await;
    }
    // A second fence from each sender: anything duplicated meanwhile shows.
    for (i, m) in members.iter().enumerate() {
        m.publish(g, payload(&format!("p{i}"), N + 1, 8)).await;
    }
    for m in &members {
        m.wait_messages(g, total + 3).await;
    }
    for m in &members {
        let seqs = sequences(&m.messages(g), &m.id());
        assert_eq!(seqs.len(), 3, "{}: senders {:?}", m.id(), seqs.keys());
        for (tag, got) in &seqs {
            assert_eq!(got, &range(0..N + 2), "{}: from {tag}", m.id());
        }
        assert_eq!(m.message_count(g), total + 3, "{}: extra messages", m.id());
        // Each sender is one member id; senders are all three members.
        let senders: std::collections::BTreeSet<String> =
            m.messages(g).into_iter().map(|(s, _)| s).collect();
        let ids: std::collections::BTreeSet<String> = members.iter().map(Member::id).collect();
        assert_eq!(senders, ids);
    }
    for i in 0..3 {
        let st = stats(c.addr(i));
        assert_eq!(num(&st["drops"]["peer"]), 0, "{}: {st}", name(i));
        assert_eq!(num(&st["drops"]["stuck"]), 0, "{}: {st}", name(i));
    }
}

// ---------------------------------------------------------------------------
// 2. Membership across nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_are_seen_cluster_wide() {
    let c = Cluster::start("members", 3, QUICK).await;
    let g = "members";
    let a = Member::joined(c.addr(0), g).await;
    let b = Member::joined(c.addr(1), g).await;
    wait_views(&[&a, &b], g).await;

    // A join on node3 is acknowledged there and learnt by the others.
    let cm = Member::joined(c.addr(2), g).await;
    assert_eq!(cm.wait_membership(g, &cm.id(), Reason::Join).await, 3);
    assert_eq!(a.wait_membership(g, &cm.id(), Reason::Join).await, 3);
    assert_eq!(b.wait_membership(g, &cm.id(), Reason::Join).await, 3);
    // The members query on node1 lists the members of all three nodes.
    let mut all = vec![a.id(), b.id(), cm.id()];
    all.sort();
    assert_eq!(a.view(g).await, all);
    // node3 learnt a and b from the snapshots sent when its links came up.
    cm.wait_view(g, &all).await;

    // A leave on node3, then a disconnect on node2.
    cm.client.leave(g).await.expect("leave");
    assert_eq!(a.wait_membership(g, &cm.id(), Reason::Leave).await, 2);
    assert_eq!(b.wait_membership(g, &cm.id(), Reason::Leave).await, 2);
    let b_id = b.id();
    // Dropping the client closes its connection. (Not `close()`: it can
    // report `Disconnected` spuriously when the server's end of stream is
    // seen before the client's writer reports its flush.)
    drop(b);
    assert_eq!(a.wait_membership(g, &b_id, Reason::Disconnect).await, 1);
    a.wait_view(g, &[a.id()]).await;
    cm.wait_view(g, &[a.id()]).await;
    // Each change was reported once.
    assert_eq!(a.memberships(g, &cm.id(), Reason::Join).len(), 1);
    assert_eq!(a.memberships(g, &cm.id(), Reason::Leave).len(), 1);
    assert_eq!(a.memberships(g, &b_id, Reason::Disconnect).len(), 1);
}

// ---------------------------------------------------------------------------
// 3. A node killed and restarted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_reported_down_and_rejoins_after_restart() {
    let mut c = Cluster::start("kill", 3, QUICK).await;
    let g = "kill";
    let a = Member::joined(c.addr(0), g).await;
    let b = Member::joined(c.addr(1), g).await;
    let cm = Member::joined(c.addr(2), g).await;
    wait_views(&[&a, &b, &cm], g).await;

    c.nodes[2].kill9();
    a.wait_membership(g, "node3", Reason::NodeDown).await;
    b.wait_membership(g, "node3", Reason::NodeDown).await;
    for i in [0, 1] {
        let addr = c.addr(i);
        until(&format!("{} to see node3 not up", name(i)), || {
            peer_state(addr, "node3") != "up"
        })
        .await;
    }
    a.wait_view(g, &[a.id(), b.id()]).await;
    b.wait_view(g, &[a.id(), b.id()]).await;

    // Routing no longer sends to node3, and counts what its members lost:
    // nothing queued, every publish to the group a drop for node3.
    let before = stats(c.addr(0));
    let p3 = peer_of(&before, "node3").expect("node3").clone();
    for s in 0..20 {
        a.publish(g, payload("a", s, 100)).await;
    }
    b.wait_messages(g, 20).await;
    a.wait_messages(g, 20).await;
    let after = stats(c.addr(0));
    let q3 = peer_of(&after, "node3").expect("node3");
    assert_eq!(q3["msgs_out"], p3["msgs_out"], "sent to a dead node: {q3}");
    let (d0, d1) = (
        p3["drops"]["down"].as_u64().expect("drops.down"),
        q3["drops"]["down"].as_u64().expect("drops.down"),
    );
    assert_eq!(
        d1 - d0,
        20,
        "publishes its members lost, counted for node3: {q3}"
    );
    assert_eq!(
        q3["dropped"].as_u64().expect("dropped") - p3["dropped"].as_u64().expect("dropped"),
        20,
        "{q3}"
    );

    // Restart: the mesh re-forms, node3's members re-appear.
    c.nodes[2].restart();
    c.wait_mesh(&[0, 1, 2]).await;
    cm.wait("node3's old client to reconnect and re-join", |e| {
        matches!(e, Event::Reconnected { .. })
    })
    .await;
    let d = Member::joined(c.addr(2), g).await;
    for m in [&a, &b] {
        m.wait_membership(g, &cm.id(), Reason::Join).await;
        m.wait_membership(g, &d.id(), Reason::Join).await;
    }
    wait_views(&[&a, &b, &cm, &d], g).await;

    // Delivery resumes both ways.
    for s in 20..40 {
        a.publish(g, payload("a", s, 100)).await;
    }
    for s in 0..20 {
        d.publish(g, payload("d", s, 100)).await;
    }
    for m in [&a, &b] {
        m.wait_messages(g, 60).await;
        let seqs = sequences(&m.messages(g), &m.id());
        assert_eq!(seqs["a"], range(0..40));
        assert_eq!(seqs["d"], range(0..20));
    }
    for m in [&cm, &d] {
        until("node3's members to get the publishes", || {
            let s = sequences(&m.messages(g), &m.id());
            s.get("a").is_some_and(|v| v.ends_with(&range(20..40)))
                && s.get("d").is_some_and(|v| v.len() == 20)
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// 4. A link cut (and a partition) while both nodes stay up.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Forward both ways.
    Pass = 0,
    /// Close every connection; close new ones at once.
    Cut = 1,
    /// Keep connections open but forward nothing (a partition).
    Blackhole = 2,
}

/// A TCP proxy on the test's side: accepts on `listen`, dials `upstream`
/// from `from` (so the acceptor's peer-address check passes).
struct Proxy {
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(listen: SocketAddr, upstream: SocketAddr, from: IpAddr) -> Proxy {
        let l = TcpListener::bind(listen).expect("proxy binds");
        l.set_nonblocking(true).expect("nonblocking");
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let stop = Arc::new(AtomicBool::new(false));
        let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, st, ss) = (mode.clone(), stop.clone(), socks.clone());
        let accept = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let down = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if m.load(Ordering::Relaxed) == Mode::Cut as u8 {
                    continue; // dropped: closed at once
                }
                let _ = down.set_nonblocking(false);
                let Ok(up) = dial_from(upstream, from) else {
                    continue;
                };
                for s in [&down, &up] {
                    let _ = s.set_nodelay(true);
                    if let Ok(c) = s.try_clone() {
                        ss.lock().unwrap().push(c);
                    }
                }
                for (a, b) in [(&down, &up), (&up, &down)] {
                    let (Ok(a), Ok(b)) = (a.try_clone(), b.try_clone()) else {
                        continue;
                    };
                    let (m, st) = (m.clone(), st.clone());
                    std::thread::spawn(move || pump(a, b, &m, &st));
                }
            }
        });
        Proxy {
            mode,
            stop,
            socks,
            accept: Some(accept),
        }
    }

    /// Switches mode. Cutting closes every connection; healing a partition
    /// closes the connections whose bytes it swallowed.
    fn set(&self, mode: Mode) {
        let old = self.mode.swap(mode as u8, Ordering::SeqCst);
        if mode == Mode::Cut || (mode == Mode::Pass && old == Mode::Blackhole as u8) {
            self.close_all();
        }
    }

    fn close_all(&self) {
        for s in self.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.close_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn dial_from(to: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

/// Copies `from` to `to` while passing; swallows while blackholed.
fn pump(mut from: TcpStream, mut to: TcpStream, mode: &AtomicU8, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => match mode.load(Ordering::Relaxed) {
                m if m == Mode::Pass as u8 => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                m if m == Mode::Blackhole as u8 => {}
                _ => break,
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    // In a partition nothing gets through, not even the end of stream.
    if mode.load(Ordering::Relaxed) != Mode::Blackhole as u8 {
        let _ = to.shutdown(Shutdown::Write);
    }
}

/// Three nodes, node1 ⇄ node2 through two proxies (see
/// `cut_link_is_node_loss_and_heals`); returns the cluster (mesh up), the
/// proxy towards node1, the one towards node2, and the proxies' port.
async fn proxied_cluster(tag: &str, extra: &str) -> (Cluster, Proxy, Proxy, u16) {
    let mut c = Cluster::new(tag);
    let q = free_port(&IPS[..2]);
    let mut peers = plain_peers(3);
    peers[1].1 = format!("127.0.0.2:{q}");
    let conf1 = c
        .dir
        .write("node1.conf", &config_text(c.port, &peers, extra));
    let mut peers = plain_peers(3);
    peers[0].1 = format!("127.0.0.1:{q}");
    let conf2 = c
        .dir
        .write("node2.conf", &config_text(c.port, &peers, extra));
    let conf3 = c.conf("node3.conf", 3, extra);
    let to2 = Proxy::start(SocketAddr::new(ip(1), q), c.addr(1), ip(0));
    let to1 = Proxy::start(SocketAddr::new(ip(0), q), c.addr(0), ip(1));
    c.spawn(0, conf1);
    c.spawn(1, conf2);
    c.spawn(2, conf3);
    c.ready();
    c.wait_mesh(&[0, 1, 2]).await;
    (c, to1, to2, q)
}

/// node1 ⇄ node2 goes through proxies both ways (node1's config names node2
/// at 127.0.0.2:Q, a proxy that dials node2 from 127.0.0.1; node2's names
/// node1 at 127.0.0.1:Q likewise), so cutting them cuts that link only.
/// A cut is seen as node loss on both sides and heals; so is a partition
/// (nothing gets through, detected by idle_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_link_is_node_loss_and_heals() {
    // idle_timeout 3 s: a partition is seen within it, and a member or a
    // link stalled for a moment on a loaded machine is not cut meanwhile.
    let extra = "keepalive_interval = 0.2\n idle_timeout = 3\n reconnect_interval = 0.2\n connect_timeout = 2";
    let (c, to1, to2, q) = proxied_cluster("cut", extra).await;
    let st = stats(c.addr(0));
    assert_eq!(
        peer_of(&st, "node2").expect("node2")["address"],
        format!("127.0.0.2:{q}")
    );

    let g = "cut";
    let a = Member::joined(c.addr(0), g).await;
    let b = Member::joined(c.addr(1), g).await;
    let cm = Member::joined(c.addr(2), g).await;
    wait_views(&[&a, &b, &cm], g).await;
    let mut seq = 0;

    for (round, mode) in [Mode::Cut, Mode::Blackhole].into_iter().enumerate() {
        to1.set(mode);
        to2.set(mode);
        until(
            &format!("round {round}: node1 to report node2 down"),
            || a.memberships(g, "node2", Reason::NodeDown).len() > round,
        )
        .await;
        until(
            &format!("round {round}: node2 to report node1 down"),
            || b.memberships(g, "node1", Reason::NodeDown).len() > round,
        )
        .await;
        until("node1 to see node2 not up", || {
            peer_state(c.addr(0), "node2") != "up"
        })
        .await;
        if round == 0 {
            // Every node answers, one link is down: `msgc cluster` says
            // so and exits 1. (Asked of node3, which lists node2 at its
            // own address, not at the cut proxy.)
            let third = c.addr(2);
            let out = tokio::task::spawn_blocking(move || crate::cli::msgc(third, &["cluster"]))
                .await
                .expect("msgc cluster");
            let table = String::from_utf8_lossy(&out.stdout).into_owned();
            assert_eq!(out.status.code(), Some(1), "{table}");
            assert!(!table.contains("unreachable"), "{table}");
            assert!(
                table.contains(&format!("node3  {}  2/2 ", c.addr(2))),
                "{table}"
            );
            assert!(
                table.contains(&format!("node1  {}  1/2 ", c.addr(0))),
                "{table}"
            );
        }
        // node3 still reaches both; node1's publishes still reach node3.
        a.wait_view(g, &[a.id(), cm.id()]).await;
        for _ in 0..10 {
            a.publish(g, payload("a", seq, 64)).await;
            seq += 1;
        }
        until("node3's member to get node1's publishes", || {
            sequences(&cm.messages(g), "node3")
                .get("a")
                .is_some_and(|v| v.len() as u64 == seq)
        })
        .await;

        to1.set(Mode::Pass);
        to2.set(Mode::Pass);
        c.wait_mesh(&[0, 1, 2]).await;
        until(
            &format!("round {round}: node1 to re-learn node2's member"),
            || a.memberships(g, &b.id(), Reason::Join).len() > round,
        )
        .await;
        until(
            &format!("round {round}: node2 to re-learn node1's member"),
            || b.memberships(g, &a.id(), Reason::Join).len() > round,
        )
        .await;
        wait_views(&[&a, &b, &cm], g).await;
        // Delivery across the healed link, both ways.
        let before = b.message_count(g);
        a.publish(g, payload("a", seq, 64)).await;
        seq += 1;
        b.publish(g, payload("b", round as u64, 64)).await;
        b.wait_messages(g, before + 2).await;
        until("node1's member to get node2's publish", || {
            sequences(&a.messages(g), "node1")
                .get("b")
                .is_some_and(|v| v.len() == round + 1)
        })
        .await;
    }
    // node3 never lost anything from node1; nobody saw duplicates.
    cm.wait_messages(g, seq as usize + 2).await;
    assert_eq!(sequences(&cm.messages(g), "node3")["a"], range(0..seq));
    for m in [&a, &b] {
        sequences(&m.messages(g), &m.id());
        assert_eq!(m.disconnects(), 0);
    }
    let st = stats(c.addr(2));
    assert!(
        st["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .all(|p| num(&p["reconnects"]) == 0),
        "node3's links were not disturbed: {}",
        st["peers"]
    );
}

/// Joins and leaves on every node while the node1 ⇄ node2 link is cut and
/// healed again and again: once the mesh is back, every node's view of
/// every group is exactly the set of members (nothing lost, nothing
/// stale), and a publish reaches exactly them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_converge_after_churn_during_link_cuts() {
    let (c, to1, to2, _) = proxied_cluster("churn", QUICK).await;
    const GROUPS: [&str; 3] = ["churn0", "churn1", "churn2"];
    let mut members = Vec::new();
    for i in 0..3 {
        for _ in 0..4 {
            members.push(Arc::new(Member::connect(c.addr(i)).await));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let (m, stop) = (m.clone(), stop.clone());
            tokio::spawn(async move {
                let mut joined = [false; 3];
                let mut n = k as u64 + 1;
                while !stop.load(Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let g = (n >> 33) as usize % 3;
                    if joined[g] {
                        m.client.leave(GROUPS[g]).await.expect("leave");
                    } else {
                        m.client.join(GROUPS[g]).await.expect("join");
                    }
                    joined[g] = !joined[g];
                    tokio::task::yield_now().await;
                }
                joined
            })
        })
        .collect();

    for round in 0..4 {
        to1.set(Mode::Cut);
        to2.set(Mode::Cut);
        until(&format!("round {round}: node1 to see node2 not up"), || {
            peer_state(c.addr(0), "node2") != "up"
        })
        .await;
        until(&format!("round {round}: node2 to see node1 not up"), || {
            peer_state(c.addr(1), "node1") != "up"
        })
        .await;
        to1.set(Mode::Pass);
        to2.set(Mode::Pass);
        c.wait_mesh(&[0, 1, 2]).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut want: Vec<Vec<String>> = vec![Vec::new(); 3];
    for (m, h) in members.iter().zip(churners) {
        let joined = h.await.expect("churner");
        for g in 0..3 {
            if joined[g] {
                want[g].push(m.id());
            }
        }
    }
    c.wait_mesh(&[0, 1, 2]).await;
    // One member per node asks for every group's view.
    for i in [0, 4, 8] {
        for (g, w) in GROUPS.iter().zip(&want) {
            members[i].wait_view(g, w).await;
        }
    }
    // Routing agrees with the views: a publish reaches exactly the members.
    let p = Member::connect(c.addr(0)).await;
    for g in GROUPS {
        p.publish(g, payload("final", 0, 16)).await;
    }
    for (g, w) in GROUPS.iter().zip(&want) {
        for m in members.iter().filter(|m| w.contains(&m.id())) {
            until(
                &format!("{} to get the final message in {g}", m.id()),
                || m.messages(g).iter().any(|(_, p)| p.starts_with(b"final:")),
            )
            .await;
        }
    }
    for m in &members {
        assert_eq!(m.disconnects(), 0);
    }
}

// ---------------------------------------------------------------------------
// 5. Simultaneous dialling.

/// True when every node's view of each pair agrees on one link: one side
/// dialled out, the other took it in, and each node holds exactly its
/// clients, its links and this stats connection.
fn one_link_per_pair(c: &Cluster, n: usize, clients: u64) -> bool {
    let st: Vec<Value> = (0..n).map(|i| stats(c.addr(i))).collect();
    for i in 0..n {
        if num(&st[i]["totals"]["connections"]) != clients + n as u64 - 1 + 1 {
            return false;
        }
        for j in 0..n {
            if i == j {
                continue;
            }
            let (Some(pij), Some(pji)) = (peer_of(&st[i], &name(j)), peer_of(&st[j], &name(i)))
            else {
                return false;
            };
            let ok = pij["state"] == "up"
                && pji["state"] == "up"
                && ((pij["direction"] == "out" && pji["direction"] == "in")
                    || (pij["direction"] == "in" && pji["direction"] == "out"));
            if !ok {
                return false;
            }
        }
    }
    true
}

/// All nodes start at once and dial each other at once; a burst is
/// published while the mesh forms. The mesh settles on one link per pair,
/// nobody sees a duplicate or a reordering, and once the mesh is up a
/// second burst reaches everyone. Several rounds, to meet the race often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_settle_on_one_link_without_duplicates() {
    const ROUNDS: usize = 6;
    for round in 0..ROUNDS {
        let mut c = Cluster::new("race");
        let conf = c.conf("cluster.conf", 3, QUICK);
        for i in 0..3 {
            c.spawn(i, conf.clone());
        }
        let g = "race";
        const N: u64 = 300;
        let start = |i: usize| {
            let addr = c.addr(i);
            async move {
                listening(addr).await;
                let m = Member::joined(addr, "race").await;
                if i == 0 {
                    for s in 0..N {
                        m.publish("race", payload("p", s, 100)).await;
                    }
                }
                m
            }
        };
        let (m1, m2, m3) = tokio::join!(start(0), start(1), start(2));
        let members = [&m1, &m2, &m3];
        c.wait_mesh(&[0, 1, 2]).await;
        until(&format!("round {round}: one link per pair"), || {
            one_link_per_pair(&c, 3, 1)
        })
        .await;
        wait_views(&members, g).await;
        m1.wait_messages(g, N as usize).await;
        for s in N..2 * N {
            m1.publish(g, payload("p", s, 100)).await;
        }
        for m in members {
            until(
                &format!("round {round}: {} to get the second burst", m.id()),
                || {
                    sequences(&m.messages(g), &m.id())
                        .get("p")
                        .is_some_and(|v| v.ends_with(&range(N..2 * N)))
                },
            )
            .await;
            // Ordered and without duplicates (checked by `sequences`);
            // the publisher's own node lost nothing at all.
            let seqs = sequences(&m.messages(g), &m.id());
            if std::ptr::eq(m, &m1) {
                assert_eq!(seqs["p"], range(0..2 * N));
            }
            assert_eq!(m.disconnects(), 0);
        }
        for i in 0..3 {
            let st = stats(c.addr(i));
            let links: Vec<String> = st["peers"]
                .as_array()
                .expect("peers")
                .iter()
                .map(|p| format!("{}:{}:{}", p["name"], p["direction"], p["reconnects"]))
                .collect();
            eprintln!("round {round}: {}: {links:?}", name(i));
        }
    }
}

// ---------------------------------------------------------------------------
// 6. A stuck peer link.

/// node2 is stopped (SIGSTOP) while node1 publishes big messages: node1's
/// link to node2 passes max_backlog and is killed as stuck (counted), node3
/// keeps getting everything, and after SIGCONT the link is re-dialled and
/// delivery to node2 resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_peer_link_is_killed_and_redialled() {
    // idle_timeout 10 s: the stopped node's link is cut as stuck, long
    // before it could be cut as idle.
    let extra = "keepalive_interval = 0.2\n idle_timeout = 10\n reconnect_interval = 0.2\n \
                 connect_timeout = 2\n peer_max_backlog = 200\n peer_stuck_timeout = 0.5\n \
                 tcpbuf_size = 4096";
    let c = Cluster::start("stuck", 3, extra).await;
    let g = "stuck";
    let b = Member::joined(c.addr(1), g).await;
    let cm = Member::joined(c.addr(2), g).await;
    let p = Member::connect(c.addr(0)).await;
    let want = {
        let mut v = vec![b.id(), cm.id()];
        v.sort();
        v
    };
    p.wait_view(g, &want).await;

    c.nodes[1].signal(libc::SIGSTOP);
    let node1 = c.addr(0);
    let mut sent = 0u64;
    // Chunks paced by node3's member, so that only the link to the stopped
    // node backs up.
    let st = loop {
        for _ in 0..50 {
            p.publish(g, payload("p", sent, 4096)).await;
            sent += 1;
        }
        cm.wait_messages(g, sent as usize).await;
        let st = stats(node1);
        // The kill counts the link's drops first, then itself.
        if num(&st["totals"]["stuck_kills"]) >= 1 {
            break st;
        }
        assert!(
            sent < 5000,
            "node1's link to stopped node2 never backed up: {st}"
        );
    };
    assert!(
        num(&st["totals"]["stuck_kills"]) >= 1,
        "killed as stuck (not idle): {st}"
    );
    assert!(num(&peer_of(&st, "node2").expect("node2")["dropped"]) > 0);
    until("node1 to see node2 not up", || {
        peer_state(node1, "node2") != "up"
    })
    .await;
    // node3 unaffected while node2 is stuck.
    for _ in 0..50 {
        p.publish(g, payload("p", sent, 4096)).await;
        sent += 1;
    }
    cm.wait_messages(g, sent as usize).await;
    assert_eq!(sequences(&cm.messages(g), "node3")["p"], range(0..sent));

    c.nodes[1].signal(libc::SIGCONT);
    c.wait_mesh(&[0, 1, 2]).await;
    let b2 = Member::joined(c.addr(1), g).await;
    let b2_id = b2.id();
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let view = p.client.members(g).await.expect("members");
        if view.iter().any(|m| m.as_str() == b2_id) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "node1 never learnt {b2_id}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = sent;
    for _ in 0..20 {
        p.publish(g, payload("p", sent, 4096)).await;
        sent += 1;
    }
    b2.wait_messages(g, 20).await;
    assert_eq!(sequences(&b2.messages(g), "b2")["p"], range(first..sent));
    cm.wait_messages(g, sent as usize).await;
    assert_eq!(sequences(&cm.messages(g), "node3")["p"], range(0..sent));
    assert_eq!(cm.disconnects(), 0);
}

// ---------------------------------------------------------------------------
// 7. Adding and removing a node by SIGHUP.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_a_node_without_dropping_healthy_links() {
    let mut c = Cluster::start("hup", 3, QUICK).await;
    let g = "hup";
    let a = Member::joined(c.addr(0), g).await;
    let b = Member::joined(c.addr(1), g).await;
    let cm = Member::joined(c.addr(2), g).await;
    wait_views(&[&a, &b, &cm], g).await;

    // node1's member publishes steadily throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (client, stop) = (a.client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut s = 0u64;
            while !stop.load(Ordering::Relaxed) {
                client
                    .publish("hup", payload("a", s, 64))
                    .await
                    .expect("publish");
                s += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
                .publish("hup", payload("a", s, 64))
                .await
                .expect("publish");
            s + 1
        })
    };

    for pass in 0..2 {
        // Add node4: write it into the shared file, start it, HUP the others.
        let conf = c.conf("cluster.conf", 4, QUICK);
        if pass == 0 {
            c.spawn(3, conf);
            c.nodes[3].wait_ready();
        }
        for n in &c.nodes[..3] {
            n.signal(libc::SIGHUP);
        }
        c.wait_mesh(&[0, 1, 2, 3]).await;
        let d = Member::joined(c.addr(3), g).await;
        for m in [&a, &b, &cm] {
            m.wait_membership(g, &d.id(), Reason::Join).await;
        }
        wait_views(&[&a, &b, &cm, &d], g).await;
        d.publish(g, payload("d", pass, 64)).await;
        for m in [&a, &b, &cm] {
            until("node4's publish to arrive", || {
                sequences(&m.messages(g), &m.id())
                    .get("d")
                    .is_some_and(|v| v.len() as u64 == pass + 1)
            })
            .await;
        }
        d.wait(
            "node1's publishes to reach node4",
            |e| matches!(e, Event::Message { payload, .. } if payload.starts_with(b"a:")),
        )
        .await;

        // Remove it again.
        c.conf("cluster.conf", 3, QUICK);
        for n in &c.nodes[..3] {
            n.signal(libc::SIGHUP);
        }
        for m in [&a, &b, &cm] {
            until("node4 to be reported down", || {
                m.memberships(g, "node4", Reason::NodeDown).len() as u64 > pass
            })
            .await;
        }
        c.wait_mesh(&[0, 1, 2]).await;
        wait_views(&[&a, &b, &cm], g).await;
    }

    stop.store(true, Ordering::Relaxed);
    let total = publisher.await.expect("publisher");
    for m in [&a, &b, &cm] {
        until(
            &format!("{} to get all of node1's publishes", m.id()),
            || {
                sequences(&m.messages(g), &m.id())
                    .get("a")
                    .is_some_and(|v| v.len() as u64 == total)
            },
        )
        .await;
        assert_eq!(
            sequences(&m.messages(g), &m.id())["a"],
            range(0..total),
            "{}",
            m.id()
        );
        assert_eq!(
            m.disconnects(),
            0,
            "{}: a healthy connection dropped",
            m.id()
        );
        for node in ["node1", "node2", "node3"] {
            assert!(
                m.memberships(g, node, Reason::NodeDown).is_empty(),
                "{}: {node} reported down",
                m.id()
            );
        }
    }
    for i in 0..3 {
        let st = stats(c.addr(i));
        assert!(
            st["peers"]
                .as_array()
                .expect("peers")
                .iter()
                .all(|p| num(&p["reconnects"]) == 0),
            "{}: links among node1..3 were never re-made: {}",
            name(i),
            st["peers"]
        );
    }
}

/// A peer that moved is dialled at its new address after a reload: node2
/// restarts on 127.0.0.4 (a HELLO from there is not node2's until node1
/// knows it); node1, told by SIGHUP, links to it there, and a message
/// crosses the new link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_redials_a_peer_at_its_new_address() {
    let mut c = Cluster::start("moved", 2, QUICK).await;
    let code = tokio::task::block_in_place(|| c.nodes[1].terminate());
    assert_eq!(code, Some(0), "node2 leaves");
    let mut peers = plain_peers(2);
    peers[1].1 = IPS[3].to_string();
    let conf = c
        .dir
        .write("cluster.conf", &config_text(c.port, &peers, QUICK));
    let moved = SocketAddr::new(ip(3), c.port);
    let _node2 = NodeProc::spawn(conf, "node2", moved);
    tokio::task::block_in_place(|| _node2.wait_ready());
    c.nodes[0].signal(libc::SIGHUP);
    let node1 = c.addr(0);
    until("node1 to link to node2 at its new address", || {
        let st = stats(node1);
        peer_of(&st, "node2")
            .is_some_and(|p| p["state"] == "up" && p["address"] == moved.to_string().as_str())
    })
    .await;
    let g = "moved";
    let a = Member::joined(node1, g).await;
    let b = Member::joined(moved, g).await;
    wait_views(&[&a, &b], g).await;
    a.publish(g, payload("a", 0, 16)).await;
    b.wait_messages(g, 1).await;
}

/// A peer removed by SIGHUP while our dial of it is still connecting must
/// not become a link when the connection completes. node4 is played by the
/// test: a listener whose accept queue is full, so node1's SYN is dropped
/// and retransmitted; node4 is removed meanwhile, then the queue is freed
/// and the retransmitted SYN connects. node1 must close it, not say HELLO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_removed_while_dialling_is_not_linked() {
    let mut c = Cluster::new("removed-dial");
    let extra = "keepalive_interval = 0.2\n idle_timeout = 5\n reconnect_interval = 0.2\n connect_timeout = 5";
    let node4 = SocketAddr::new(ip(3), c.port);
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&node4.into()).expect("bind node4's address");
    sock.listen(0).expect("listen");
    let listener: TcpListener = sock.into();
    // Fills the accept queue (backlog 0 holds one connection).
    let filler = TcpStream::connect(node4).expect("filler connects");
    let peers = vec![(name(0), IPS[0].to_string()), (name(3), IPS[3].to_string())];
    let conf = c
        .dir
        .write("cluster.conf", &config_text(c.port, &peers, extra));
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    let a = Member::joined(node1, "rd").await;
    until("node1 to be dialling node4", || {
        peer_state(node1, "node4") == "dialling"
    })
    .await;
    c.dir
        .write("cluster.conf", &config_text(c.port, &peers[..1], extra));
    c.nodes[0].signal(libc::SIGHUP);
    until("node1 to drop node4 from its peers", || {
        stats(node1)["peers"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    // Free the queue: the retransmitted SYN now completes node1's connect.
    let (queued, _) = listener.accept().expect("accept the filler");
    drop((queued, filler));
    listener.set_nonblocking(true).expect("nonblocking");
    let end = std::time::Instant::now() + Duration::from_secs(8);
    let conn = loop {
        match listener.accept() {
            Ok((s, _)) => break Some(s),
            Err(_) if std::time::Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(_) => break None,
        }
    };
    // The retransmitted SYN connects well within connect_timeout.
    let mut s = conn.expect("node1's dial to connect once the queue had room");
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    // Read until end of stream (or the timeout): no HELLO may come.
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if let Ok(Some(f @ Frame::Hello(_))) = msgc::protocol::decode(&mut buf, 1 << 20) {
        panic!("node1 said HELLO to node4, removed from its peers: {f:?}");
    }
    // No member of node4 appeared, and node1 stays healthy.
    a.wait_view("rd", &[a.id()]).await;
    assert!(stats(node1)["peers"].as_array().is_some_and(Vec::is_empty));
}

// ---------------------------------------------------------------------------
// 8. Intruders.

fn peer_hello(name: &str) -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Peer,
        name: Some(NodeName::from_str_checked(name).expect("name")),
        credentials: Bytes::new(),
        features: 0,
        max_message_size: 0,
    })
}

fn expect_refused(mut r: Raw, what: &str) {
    match r.recv() {
        Some(Frame::Error { code, .. }) => {
            assert_eq!(code, ErrorCode::NOT_ALLOWED, "{what}")
        }
        other => panic!("{what}: expected ERROR NOT_ALLOWED, got {other:?}"),
    }
    assert!(r.closed(), "{what}: connection not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_not_in_the_list_or_from_the_wrong_address_are_refused() {
    let mut c = Cluster::new("intruder");
    let conf = c.conf("cluster.conf", 3, QUICK);
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);

    let mut r = Raw::connect(node1);
    r.send(&peer_hello("intruder"));
    expect_refused(r, "a name not in peers");

    let mut r = Raw::connect(node1); // from 127.0.0.1, node2 is 127.0.0.2
    r.send(&peer_hello("node2"));
    expect_refused(r, "node2 from node1's address");

    let mut r = Raw::connect_from(node1, ip(2)); // node3's address
    r.send(&peer_hello("node2"));
    expect_refused(r, "node2 from node3's address");

    let mut r = Raw::connect(node1);
    r.send(&peer_hello("node1"));
    expect_refused(r, "the node's own name");

    let mut r = Raw::connect(node1);
    r.send(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Peer,
        name: None,
        credentials: Bytes::new(),
        features: 0,
        max_message_size: 0,
    }));
    expect_refused(r, "no name");

    // Nothing was admitted and the node still serves.
    let st = stats(node1);
    for p in st["peers"].as_array().expect("peers") {
        assert_ne!(p["state"], "up", "{p}");
        assert_eq!(num(&p["msgs_in"]), 0, "{p}");
    }
    let m = Member::joined(node1, "x").await;
    m.publish("x", payload("m", 0, 10)).await;
    m.wait_messages("x", 1).await;
}

// ---------------------------------------------------------------------------
// 9. Direct messages across nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_send_reaches_a_member_on_another_node() {
    let c = Cluster::start("direct", 2, QUICK).await;
    let a = Member::connect(c.addr(0)).await;
    let b = Member::connect(c.addr(1)).await;
    const N: u64 = 100;
    for s in 0..N {
        a.client
            .send(b.id(), payload("a", s, 50))
            .await
            .expect("send");
    }
    b.client.send(a.id(), "pong").await.expect("send");
    let directs = |m: &Member| -> Vec<(String, Bytes)> {
        m.with(|evs| {
            evs.iter()
                .filter_map(|e| match e {
                    Event::Direct { sender, payload } => {
                        Some((sender.to_string(), payload.clone()))
                    }
                    _ => None,
                })
                .collect()
        })
    };
    until("node2's member to get the direct messages", || {
        directs(&b).len() as u64 == N
    })
    .await;
    let got = directs(&b);
    assert!(got.iter().all(|(s, _)| *s == a.id()));
    assert_eq!(sequences(&got, "b")["a"], range(0..N));
    until("node1's member to get the reply", || {
        !directs(&a).is_empty()
    })
    .await;
    assert_eq!(directs(&a), vec![(b.id(), Bytes::from_static(b"pong"))]);

    // To a member that does not exist on node2: dropped there and counted.
    let before = num(&stats(c.addr(1))["drops"]["unknown_member"]);
    a.client.send("node2/0.999999", "lost").await.expect("send");
    until("node2 to count the unknown member", || {
        num(&stats(c.addr(1))["drops"]["unknown_member"]) > before
    })
    .await;
}

// ---------------------------------------------------------------------------
// Nodes sharing one machine.

/// CPUs in a kernel list such as `0-3,6`.
fn cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().expect("cpu"), b.parse().expect("cpu"));
        cpus.extend(a..=b);
    }
    cpus
}

/// `Cpus_allowed_list` of `/proc/.../status`.
fn allowed_cpus(status: &str) -> Vec<usize> {
    let text = std::fs::read_to_string(status).unwrap_or_else(|e| panic!("{status}: {e}"));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {status}"));
    cpu_list(line)
}

/// The CPUs each `msgc-shard-N` thread of process `pid` may run on, by N.
fn shard_cpus(pid: u32) -> Vec<(usize, Vec<usize>)> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = task.expect("task entry").path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if let Some(n) = comm.trim().strip_prefix("msgc-shard-") {
            let status = path.join("status");
            out.push((
                n.parse().expect("shard number"),
                allowed_cpus(&status.to_string_lossy()),
            ));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_machine_share_its_cpus() {
    let mine = allowed_cpus("/proc/self/status");
    // SAFETY: sysconf reads a number.
    let online =
        usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).expect("online CPUs");
    let whole_machine = mine.len() >= online;
    // Three entries on this machine, no `shards`: each node takes a third
    // of the CPUs (at least one), unless this process was given fewer CPUs
    // than the machine has (then it keeps one per CPU it has).
    let want = if whole_machine {
        (mine.len() / 3).max(1)
    } else {
        mine.len()
    };
    let mut c = Cluster::new("cpushare");
    let peers: Vec<String> = plain_peers(3)
        .iter()
        .map(|(n, a)| format!("{n} = \"{a}\""))
        .collect();
    let text = format!(
        "msgc_server {{\n peers = [ {} ]\n port = {}\n {QUICK}\n}}\n",
        peers.join(" "),
        c.port
    );
    let conf = c.dir.write("share.conf", &text);
    c.spawn(0, conf.clone());
    c.spawn(1, conf);
    c.ready();
    for i in 0..2 {
        let st = stats(c.addr(i));
        assert_eq!(
            num(&st["shards"]),
            want as u64,
            "{} of 3 nodes here on {} CPUs: {st}",
            name(i),
            mine.len()
        );
        // Node i's shard j is pinned to the (i × shards + j)-th CPU this
        // process may use: the nodes start on different CPUs.
        let pinned = shard_cpus(c.nodes[i].child.id());
        assert_eq!(pinned.len(), want, "{}: shard threads {pinned:?}", name(i));
        for (j, cpus) in pinned {
            assert_eq!(
                cpus,
                vec![mine[(i * want + j) % mine.len()]],
                "{} shard {j}",
                name(i)
            );
        }
    }
}
