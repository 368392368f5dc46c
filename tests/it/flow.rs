//! Flow control under pressure: a slow reader slows its publishers and is
//! never killed, a stuck one is killed and slows nobody for long, queues
//! and inboxes stay within their byte bounds, and liveness judges what a
//! peer sent rather than what the server had time to read.
//!
//! Single-server tests run an in-process server with two shards and raw
//! sockets on threads (a reader per member, a closed-loop publisher);
//! cluster tests run `msgc-server` processes (helpers from `cluster`).

use crate::cluster::{
    num, payload, peer_of, range, sequences, stats, until, Cluster, Member, QUICK,
};
use crate::flowkit::{
    assert_healthy, client_on, flood, group, join, members_on_both_shards, numbered, raw_client,
    shard_of, start, totals, wait_all, Reader,
};
use crate::util::{wait_for, NodeProc, Raw, TempDir, WAIT};
use bytes::{Bytes, BytesMut};
use msgc::client::{ClientConfig, Event};
use msgc::protocol::{ErrorCode, Events, Frame, GroupName};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ------------------------------------------------ closed loop, slow readers

/// A publisher at full speed to 10 members on both shards for 5 s. Half of
/// the members read as fast as they can, half are slow but steady (a 20 ms
/// pause every 500 messages): their queues fill, they are slow, not stuck,
/// and the publisher is slowed instead of anyone being killed. Every
/// message reaches every member, in order.
///
/// `stuck_timeout` is raised from 0.2 s to 1 s only so that a reader thread
/// starved by the scheduler of a loaded two-core CI machine is not taken
/// for stuck; the rule under test is the same.
fn closed_loop_kills_nobody(backend: &str) {
    let Some(srv) = start(backend, "stuck_timeout = 1") else {
        return;
    };
    let g = group("closed-loop");
    let readers: Vec<Reader> = members_on_both_shards(srv.addr, &g, 10)
        .into_iter()
        .enumerate()
        .map(|(i, (r, id))| match i % 2 {
            0 => Reader::spawn(r, id.to_string()),
            _ => Reader::spawn_paced(r, id.to_string(), 500, Duration::from_millis(20)),
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = flood(srv.addr, g, 64, u64::MAX, stop.clone());
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let (sent, _publisher) = publisher.join().expect("publisher");
    wait_all(&readers, sent, 2 * WAIT);
    assert_healthy(&readers);
    let st = srv.stats();
    eprintln!(
        "{backend}: {sent} messages to {} members in 5 s; slow readers {}, publisher waits {}",
        readers.len(),
        st["totals"]["slow_readers"],
        st["totals"]["producer_waits"]
    );
    assert_eq!(totals(&srv, "stuck_kills"), 0);
    assert_eq!(st["dropped"], 0, "{st}");
    assert!(
        totals(&srv, "producer_waits") > 0,
        "the members never fell behind: the test did not test backpressure"
    );
}

#[test]
fn closed_loop_publisher_kills_no_healthy_member_uring() {
    closed_loop_kills_nobody("uring");
}

#[test]
fn closed_loop_publisher_kills_no_healthy_member_epoll() {
    closed_loop_kills_nobody("epoll");
}

// ------------------------------------------------- connection placement

/// Connections are spread over the shards in turn, whichever shard's
/// listener the kernel gave each to: ten connections made one after
/// another alternate between the two shards (the kernel's hash alone
/// would put them 5/5 one time in four), and each is served where its id
/// says (it joins, and a message published by another reaches it).
fn connections_alternate_between_shards(backend: &str) {
    let Some(srv) = start(backend, "") else {
        return;
    };
    let g = group("placement");
    let members: Vec<_> = (0..10)
        .map(|_| {
            let (mut r, id) = raw_client(srv.addr);
            join(&mut r, &g);
            (r, id)
        })
        .collect();
    let shards: Vec<usize> = members.iter().map(|(_, id)| shard_of(id)).collect();
    let first = shards[0];
    let want: Vec<usize> = (0..10).map(|i| (first + i) % 2).collect();
    assert_eq!(shards, want, "shards in the order of connection");
    let (mut publisher, _) = raw_client(srv.addr);
    publisher.send(&Frame::Publish {
        group: g.clone(),
        payload: Bytes::from_static(b"to every shard"),
    });
    for (mut r, id) in members {
        loop {
            match r.recv() {
                Some(Frame::Deliver { payload, .. }) => {
                    assert_eq!(&payload[..], b"to every shard", "{id}");
                    break;
                }
                Some(Frame::Noop) | Some(Frame::Membership { .. }) => {}
                other => panic!("{id}: expected the message, got {other:?}"),
            }
        }
    }
}

#[test]
fn connections_alternate_between_shards_uring() {
    connections_alternate_between_shards("uring");
}

#[test]
fn connections_alternate_between_shards_epoll() {
    connections_alternate_between_shards("epoll");
}

// ------------------------------------------------------- one stuck member

/// One member of ten stops reading: it is killed as stuck and what it held
/// is counted; the nine others get every message, in order.
fn one_stuck_member(backend: &str) {
    const N: u64 = 20_000;
    // 1 s: a healthy reader thread kept off a loaded 2-CPU machine for
    // a moment is not taken for stuck.
    let Some(srv) = start(backend, "stuck_timeout = 1\n keepalive_interval = 600") else {
        return;
    };
    let g = group("one-stuck");
    let mut members = members_on_both_shards(srv.addr, &g, 10);
    let (stuck, _) = members.pop().expect("ten members");
    socket2::SockRef::from(&stuck.s)
        .set_recv_buffer_size(4096)
        .expect("SO_RCVBUF");
    let readers: Vec<Reader> = members
        .into_iter()
        .map(|(r, id)| Reader::spawn(r, id.to_string()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, _publisher) = flood(srv.addr, g, 256, N, stop).join().expect("publisher");
    assert_eq!(sent, N);
    wait_all(&readers, N, 2 * WAIT);
    assert_healthy(&readers);
    wait_for("the stuck member to be killed", WAIT, || {
        totals(&srv, "stuck_kills") == 1
    });
    assert!(totals(&srv, "dropped_stuck") > 0);
    assert_eq!(totals(&srv, "stuck_kills"), 1, "only the stuck member");
    drop(stuck);
}

#[test]
fn one_stuck_member_is_killed_the_others_get_everything_uring() {
    one_stuck_member("uring");
}

#[test]
fn one_stuck_member_is_killed_the_others_get_everything_epoll() {
    one_stuck_member("epoll");
}

// ----------------------------------------------------- handshake deadline

/// A connection that never says HELLO is closed at `handshake_timeout`
/// (well before `idle_timeout`) with an ERROR, and counted.
#[test]
fn no_hello_means_closed_after_the_handshake_deadline() {
    let srv = start("epoll", "handshake_timeout = 0.3\n idle_timeout = 30").expect("epoll");
    let mut silent = Raw::connect(srv.addr);
    // A slowloris: half a HELLO, then nothing.
    let mut partial = Raw::connect(srv.addr);
    partial.send_bytes(&[0, 0, 0, 16, 1, b'M']);
    for r in [&mut silent, &mut partial] {
        match r.recv() {
            Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::HANDSHAKE_REQUIRED),
            other => panic!("expected ERROR HANDSHAKE_REQUIRED, got {other:?}"),
        }
        assert!(r.closed());
    }
    assert_eq!(totals(&srv, "handshake_timeouts"), 2);
    assert_eq!(totals(&srv, "idle_kills"), 0);
}

// -------------------------------------------------- a stopped server's clients

/// The server process is stopped (SIGSTOP) for longer than idle_timeout
/// while its clients keep sending keepalives; after SIGCONT none of them is
/// closed as idle: what they sent was waiting in the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_does_not_idle_kill_its_healthy_clients() {
    let dir = TempDir::new("sigstop");
    let node =
        tokio::task::block_in_place(|| NodeProc::solo(&dir, "127.0.0.14", "idle_timeout = 1"));
    let mut members = Vec::new();
    for _ in 0..8 {
        let mut cfg = ClientConfig::with_servers([node.addr.to_string()]);
        cfg.keepalive_interval = Duration::from_millis(100);
        cfg.reconnect_interval = Duration::from_millis(100);
        let m = Member::connect_with(cfg).await;
        m.join("paused").await;
        members.push(m);
    }
    node.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    node.signal(libc::SIGCONT);
    // Give the server several idle sweeps after waking (idle_timeout 1 s:
    // sweeps every 250 ms); asserting an absence takes a wait.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let st = stats(node.addr);
    assert_eq!(num(&st["totals"]["idle_kills"]), 0, "{st}");
    for m in &members {
        assert_eq!(m.disconnects(), 0, "{} was disconnected", m.id());
    }
    members[0].publish("paused", payload("after", 0, 16)).await;
    for m in &members {
        m.wait_messages("paused", 1).await;
    }
}

// ------------------------------------------------------------ cluster storms

/// 10,000 joins and then 10,000 leaves arrive in one burst on node1 of
/// three: every peer link stays up (no node-down, no reconnect) and the
/// other nodes' views converge to the joins, then to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_and_leave_storm_cuts_no_link() {
    const N: usize = 10_000;
    let c = Cluster::start("storm", 3, QUICK).await;
    let (mut raw, _) = tokio::task::block_in_place(|| raw_client(c.addr(0)));
    // The burst: all joins written at once, then all leaves; a thread reads
    // the acknowledgements meanwhile.
    let acks = Arc::new(AtomicU64::new(0));
    let reader = {
        let mut r = raw.clone_stream();
        let acks = acks.clone();
        std::thread::spawn(move || {
            while let Some(f) = r.recv() {
                if matches!(f, Frame::Membership { .. })
                    && acks.fetch_add(1, Ordering::Relaxed) + 1 == 2 * N as u64
                {
                    return;
                }
            }
        })
    };
    let groups: Vec<GroupName> = (0..N).map(|i| group(&format!("storm.{i}"))).collect();
    let mut burst = BytesMut::new();
    for g in &groups {
        Frame::Join {
            group: g.clone(),
            events: Events::Each,
        }
        .encode(&mut burst);
    }
    tokio::task::block_in_place(|| raw.s.write_all(&burst).expect("joins"));
    until("node2 and node3 to see the 10,000 groups", || {
        [1, 2]
            .iter()
            .all(|&i| num(&stats(c.addr(i))["groups"]) == N as u64)
    })
    .await;
    burst.clear();
    for g in &groups {
        Frame::Leave { group: g.clone() }.encode(&mut burst);
    }
    tokio::task::block_in_place(|| raw.s.write_all(&burst).expect("leaves"));
    until("every node to see no group", || {
        (0..3).all(|i| num(&stats(c.addr(i))["groups"]) == 0)
    })
    .await;
    tokio::task::block_in_place(|| reader.join().expect("ack reader"));
    for i in 0..3 {
        let st = stats(c.addr(i));
        assert_eq!(num(&st["totals"]["stuck_kills"]), 0, "node{}: {st}", i + 1);
        for p in st["peers"].as_array().expect("peers") {
            assert_eq!(p["state"], "up", "node{}: {p}", i + 1);
            assert_eq!(p["reconnects"], 0, "node{}: {p}", i + 1);
            assert!(
                p["queued_bytes"].is_u64(),
                "a link's queue depth is in the stats: {p}"
            );
        }
    }
}

/// Two publishers fail over from node1 (killed) to node2 with full queues
/// of publishes (5,000 each, the client's default `max_backlog`), which
/// they replay in one burst. Members on node2 and node3 get all of them,
/// in order per publisher; no member and no peer link is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_replay_burst_kills_no_member_and_no_link() {
    const QUEUED: u64 = 5000;
    let c = Cluster::start("failover", 3, QUICK).await;
    let g = "replay";
    let mut subs = Vec::new();
    for node in [1, 1, 2, 2] {
        subs.push(Member::joined(c.addr(node), g).await);
    }
    let publishers: Vec<Member> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            let mut cfg =
                ClientConfig::with_servers([c.addr(0).to_string(), c.addr(1).to_string()]);
            cfg.reconnect_interval = Duration::from_millis(500);
            cfg.connect_timeout = Duration::from_secs(5);
            cfg.request_timeout = WAIT;
            v.push(Member::connect_with(cfg).await);
        }
        v
    };
    let mut c = c;
    tokio::task::block_in_place(|| c.nodes[0].kill9());
    for (i, p) in publishers.iter().enumerate() {
        p.wait("the publisher to notice node1 is gone", |e| {
            matches!(e, Event::Disconnected { .. })
        })
        .await;
        for seq in 0..QUEUED {
            p.publish(g, payload(&format!("p{i}"), seq, 100)).await;
        }
    }
    for p in &publishers {
        p.wait("the publisher to fail over", |e| {
            matches!(e, Event::Reconnected { .. })
        })
        .await;
    }
    for s in &subs {
        s.wait_messages(g, 2 * QUEUED as usize).await;
        let seqs = sequences(&s.messages(g), &s.id());
        assert_eq!(seqs["p0"], range(0..QUEUED));
        assert_eq!(seqs["p1"], range(0..QUEUED));
        assert_eq!(s.disconnects(), 0, "{} was cut", s.id());
    }
    for node in [1, 2] {
        let st = stats(c.addr(node));
        assert_eq!(
            num(&st["totals"]["stuck_kills"]),
            0,
            "node{}: {st}",
            node + 1
        );
        let other = format!("node{}", 3 - node + 1);
        let link = peer_of(&st, &other).expect("the link");
        assert_eq!(link["state"], "up");
        assert_eq!(link["reconnects"], 0, "{link}");
    }
}

// ------------------------------------------- io_uring under a busy shard

/// Shards 0 and 2 flood a group whose 30 members are all on shard 1: more
/// work for shard 1's inbox than it can do, so it never goes idle. Its
/// members (fast readers) must be written to all along. The io_uring
/// runtime submits queued operations when its thread parks: a shard that
/// never parks must submit on its own, or its members hear nothing until
/// the flood pauses, and, with their queues full and their sockets silent,
/// are taken for stuck.
#[test]
fn a_busy_shard_keeps_writing_on_io_uring() {
    const MEMBERS: usize = 30;
    if !crate::util::uring_here() {
        return;
    }
    // Deep member queues: the flood is held back by shard 1's inbox, not
    // by its members, so shard 1 always has inbox work.
    let extra = "max_backlog = 1000000\n max_backlog_bytes = 1073741824";
    let srv = crate::util::TestServer::start(3, "uring", extra);
    let on_shard = |want: usize| loop {
        let (r, id) = raw_client(srv.addr);
        if crate::flowkit::shard_of(&id) == want {
            break r;
        }
    };
    let g = group("busy");
    // Members count the bytes they receive, as fast as they can (they are
    // never what holds the flood back).
    let counts: Vec<Arc<AtomicU64>> = (0..MEMBERS).map(|_| Arc::default()).collect();
    let readers: Vec<_> = counts
        .iter()
        .map(|c| {
            let mut m = on_shard(1);
            crate::flowkit::join(&mut m, &g);
            let c = c.clone();
            std::thread::spawn(move || {
                let mut s = m.s;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let floods: Vec<_> = [0, 2]
        .into_iter()
        .map(|shard| {
            let (mut raw, stop, g) = (on_shard(shard), stop.clone(), g.clone());
            std::thread::spawn(move || {
                let mut buf = BytesMut::new();
                for _ in 0..64 {
                    Frame::Publish {
                        group: g.clone(),
                        payload: Bytes::from_static(b"flood"),
                    }
                    .encode(&mut buf);
                }
                while !stop.load(Ordering::Relaxed) && raw.s.write_all(&buf).is_ok() {}
                raw
            })
        })
        .collect();
    let least = || {
        counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let mut seen = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        seen.push(least());
    }
    let inbox = srv.stats()["inboxes"][1].clone();
    stop.store(true, Ordering::Relaxed);
    let _floods: Vec<Raw> = floods
        .into_iter()
        .map(|t| t.join().expect("flood"))
        .collect();
    eprintln!("busy shard: bytes of the least served member every 100 ms: {seen:?}; shard 1's inbox: {inbox}");
    let st = srv.stats();
    assert_eq!(totals(&srv, "stuck_kills"), 0, "{st}");
    // A shard that never submits writes none (0 of 19); half leaves room
    // for reader threads that 30 others keep off the two CPUs a while.
    let moves = seen.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        moves >= 10,
        "members were written to in only {moves} of 19 intervals: {seen:?}"
    );
    drop(srv);
    for r in readers {
        let _ = r.join();
    }
}

// ------------------------------------------------------ membership storms

/// What one storm member saw: the size its own join was acknowledged
/// with, and how many joins of others it was told of afterwards.
struct Seen {
    own_size: u32,
    others: u64,
}

/// `n` clients, half on each of two nodes, join one group as fast as they
/// connect, asking for `events`; each counts what it is told. Returns what
/// each saw once the group has `n` members everywhere, and the nodes'
/// stats.
async fn join_storm(
    tag: &str,
    n: usize,
    events: msgc::protocol::Events,
) -> (Vec<Seen>, Vec<serde_json::Value>) {
    let c = Cluster::start(tag, 2, QUICK).await;
    let g: GroupName = group("storm");
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut cfg = ClientConfig::with_servers([c.addr(i % 2).to_string()]);
        cfg.membership_events = events;
        cfg.request_timeout = WAIT;
        let g = g.clone();
        let me = tokio::spawn(async move {
            let client = msgc::client::Client::connect(cfg).await.expect("connect");
            let rx = client.events();
            client.join(&g).await.expect("join");
            let id = client.member_id().to_string();
            let mut seen = Seen {
                own_size: 0,
                others: 0,
            };
            let end = tokio::time::Instant::now() + 3 * WAIT;
            // Until this member has heard of every other join (batched,
            // each), or has its own acknowledgement (none).
            loop {
                let ev = tokio::time::timeout_at(end, rx.recv_async()).await;
                let Ok(Ok(Event::Membership {
                    subject,
                    reason,
                    size,
                    ..
                })) = ev
                else {
                    break;
                };
                assert_eq!(
                    reason,
                    msgc::protocol::Reason::Join,
                    "{id}: only joins in this storm"
                );
                if subject == id {
                    seen.own_size = size;
                } else {
                    assert!(
                        seen.own_size > 0,
                        "{id}: told of {subject} before its own join"
                    );
                    seen.others += 1;
                }
                // Until it has heard of every join after its own: changes
                // through other shards and nodes may come a little out of
                // order, so the size reaching n is not the end.
                let done = match events {
                    msgc::protocol::Events::None => seen.own_size > 0,
                    _ => seen.own_size > 0 && seen.others >= n as u64 - u64::from(seen.own_size),
                };
                if done {
                    break;
                }
            }
            (seen, client)
        });
        tasks.push(me);
    }
    let mut out = Vec::new();
    let mut clients = Vec::new();
    for t in tasks {
        let (seen, client) = t.await.expect("storm member");
        out.push(seen);
        clients.push(client);
    }
    // Anything more would be a change told twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st: Vec<serde_json::Value> = (0..2).map(|i| stats(c.addr(i))).collect();
    drop(clients);
    (out, st)
}

/// 1,000 clients join one group on two nodes at once, asking for batched
/// events (the client library's default). Every member is told of exactly
/// the joins after its own, each once, in a number of frames far below the
/// one-per-change-per-member of protocol v1 (n²/2 = 500,000 here); no link
/// and no member is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_with_batched_events_costs_few_frames() {
    const N: usize = 1000;
    let (seen, st) = join_storm("storm-batched", N, msgc::protocol::Events::Batched).await;
    for s in &seen {
        assert!(s.own_size >= 1);
        assert_eq!(
            s.others,
            (N as u32 - s.own_size) as u64,
            "a member acknowledged at size {} must hear of the {} joins after it",
            s.own_size,
            N as u32 - s.own_size
        );
    }
    let frames: u64 = st
        .iter()
        .map(|s| num(&s["totals"]["membership_frames"]) + num(&s["totals"]["membership_batches"]))
        .sum();
    eprintln!(
        "batched storm: {N} joins, {frames} membership frames in all ({} batches)",
        st.iter()
            .map(|s| num(&s["totals"]["membership_batches"]))
            .sum::<u64>()
    );
    assert!(
        frames < (N * N / 20) as u64,
        "{frames} frames: not coalesced"
    );
    for (i, s) in st.iter().enumerate() {
        assert_eq!(num(&s["totals"]["stuck_kills"]), 0, "node{}: {s}", i + 1);
        let link = &s["peers"][0];
        assert_eq!(
            (link["state"].as_str(), link["reconnects"].as_u64()),
            (Some("up"), Some(0))
        );
    }
}

/// The same storm with members that decline events about others: one frame
/// per join (its acknowledgement), nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_without_member_events_costs_one_frame_per_join() {
    const N: usize = 1000;
    let (seen, st) = join_storm("storm-quiet", N, msgc::protocol::Events::None).await;
    assert!(seen.iter().all(|s| s.own_size >= 1 && s.others == 0));
    let acks: u64 = st
        .iter()
        .map(|s| num(&s["totals"]["membership_frames"]))
        .sum();
    let batches: u64 = st
        .iter()
        .map(|s| num(&s["totals"]["membership_batches"]))
        .sum();
    assert_eq!((acks, batches), (N as u64, 0));
}

// ------------------------------------------------ requests without reading

/// A client pipelines 5,000 MEMBERS_REQUESTs for a 300-member group and
/// reads none of the replies: its own queue fills (its budget here 64 KiB,
/// ~20 replies), the server stops reading its requests, and, as it reads
/// nothing, it is closed as stuck. The server never handles more than a
/// budget's worth of its requests: what one client can make the server
/// hold is its queue budget, not 5,000 replies.
#[test]
fn pipelined_requests_are_bounded_by_the_queue_budget() {
    const MEMBERS: usize = 300;
    const REQUESTS: u32 = 5000;
    let srv = start("epoll", "max_backlog_bytes = 65536\n stuck_timeout = 0.3").expect("epoll");
    let g = group("big");
    let _members: Vec<Raw> = (0..MEMBERS)
        .map(|_| {
            let (mut r, _) = raw_client(srv.addr);
            crate::flowkit::join(&mut r, &g);
            r
        })
        .collect();
    let before = totals(&srv, "msgs_in");
    let (mut greedy, _) = raw_client(srv.addr);
    socket2::SockRef::from(&greedy.s)
        .set_recv_buffer_size(4096)
        .expect("SO_RCVBUF");
    send_members_requests(&mut greedy, &g, REQUESTS);
    wait_for("the greedy client to be closed as stuck", WAIT, || {
        totals(&srv, "stuck_kills") == 1
    });
    let handled = totals(&srv, "msgs_in") - before;
    eprintln!("pipelined requests: {handled} of {REQUESTS} read before the client was cut");
    assert!(
        handled < 200,
        "{handled} requests read: replies were not bounded by the queue"
    );
}

// ------------------------------------------ a slow member never holds a link

/// A member on node1 reads slowly while a publisher on node2 floods its
/// group with 64 KiB messages for longer than `peer_stuck_timeout`. The
/// link is never made to wait for node1's member (it carries every group
/// between the two nodes): it stays up on both sides; the member, slower
/// than what reaches it over the link, is cut at its cap on node1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_never_gets_a_link_cut() {
    // The flood lasts three times peer_stuck_timeout: long enough to cut
    // a link made to wait for the member, with a margin for a node kept
    // off a loaded machine's CPUs a moment.
    let extra = format!("{QUICK}\n peer_stuck_timeout = 1\n max_backlog_bytes = 1048576");
    let c = Cluster::start("slow-link", 2, &extra).await;
    let g = group("slow-link");
    // The slow member: reads one frame every 10 ms.
    let (mut slow, slow_id) = tokio::task::block_in_place(|| raw_client(c.addr(0)));
    tokio::task::block_in_place(|| crate::flowkit::join(&mut slow, &g));
    let reader = std::thread::spawn(move || {
        while slow.recv().is_some() {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let watcher = Member::connect(c.addr(1)).await;
    watcher.wait_view("slow-link", &[slow_id.to_string()]).await;
    let (mut publisher, _) = tokio::task::block_in_place(|| raw_client(c.addr(1)));
    tokio::task::block_in_place(|| {
        let payload = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut frame = BytesMut::new();
        Frame::Publish {
            group: g.clone(),
            payload,
        }
        .encode(&mut frame);
        let end = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < end {
            if publisher.s.write_all(&frame).is_err() {
                break;
            }
        }
    });
    until("node1 to cut the slow member at its cap", || {
        num(&stats(c.addr(0))["totals"]["stuck_kills"]) >= 1
    })
    .await;
    for i in 0..2 {
        let st = stats(c.addr(i));
        let link = &st["peers"][0];
        assert_eq!(link["state"], "up", "node{}: {link}", i + 1);
        assert_eq!(link["reconnects"], 0, "node{}: {link}", i + 1);
    }
    assert_eq!(
        num(&stats(c.addr(1))["totals"]["stuck_kills"]),
        0,
        "node2 cut nothing"
    );
    drop(publisher);
    let _ = reader.join();
}

/// Writes `n` pipelined `MEMBERS_REQUEST`s for `g` in one burst.
fn send_members_requests(raw: &mut Raw, g: &GroupName, n: u32) {
    let mut burst = BytesMut::new();
    for req in 0..n {
        Frame::MembersRequest {
            req,
            group: g.clone(),
        }
        .encode(&mut burst);
    }
    raw.s.write_all(&burst).expect("requests");
}

/// The queue budgets and the handshake deadline apply live (SIGHUP), to
/// connections already open: a client that connected while its budget was
/// 64 MiB, and pipelines 5,000 MEMBERS_REQUESTs after it became 64 KiB,
/// has fewer than 200 of them read before it is cut as stuck (with
/// 64 MiB, all 5,000 replies would have fitted).
#[test]
fn budgets_apply_live_to_open_connections() {
    const REQUESTS: u32 = 5000;
    let dir = TempDir::new("live-budget");
    let before = "shards = 1\n max_backlog_bytes = 67108864\n stuck_timeout = 0.3";
    let node = NodeProc::solo(&dir, "127.0.0.15", before);
    let g = group("big");
    let _members: Vec<Raw> = (0..300)
        .map(|_| {
            let (mut r, _) = raw_client(node.addr);
            crate::flowkit::join(&mut r, &g);
            r
        })
        .collect();
    let (mut greedy, _) = raw_client(node.addr);
    socket2::SockRef::from(&greedy.s)
        .set_recv_buffer_size(4096)
        .expect("SO_RCVBUF");
    node.reconfigure_solo(&format!(
        "{before}\n max_backlog_bytes = 65536\n handshake_timeout = 0.3"
    ));
    // Applied once a silent connection meets the new handshake deadline
    // (one shard: the greedy client's).
    let mut silent = Raw::connect(node.addr);
    match silent.recv() {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::HANDSHAKE_REQUIRED),
        other => panic!("expected the reloaded handshake deadline, got {other:?}"),
    }
    let read = |st: &serde_json::Value| num(&st["totals"]["msgs_in"]);
    let start = read(&stats(node.addr));
    send_members_requests(&mut greedy, &g, REQUESTS);
    let mut polls = 0;
    wait_for("the greedy client to be cut as stuck", WAIT, || {
        polls += 1;
        num(&stats(node.addr)["totals"]["stuck_kills"]) == 1
    });
    // Less the frames of the readings since `start` (each a HELLO and a
    // STATS_REQUEST on a connection of its own).
    let handled = read(&stats(node.addr)) - start - 2 * (polls + 1);
    assert!(
        handled < 200,
        "{handled} requests read: the new budget did not apply"
    );
}

/// A publish handed to another shard whose member there left while it was
/// on its way is counted `left` (PROTOCOL.md section 14): shard 1 (the
/// member's) sleeps with the member's LEAVE unread in its socket while
/// shard 0 routes publishes to it; when it wakes, what it handles before
/// the LEAVE is delivered, what after is counted. Every publish is then
/// delivered, counted `left`, or (routed after the leave) `unrouted`.
#[test]
fn a_delivery_that_finds_its_member_gone_is_counted_left() {
    // More than shard 1 takes from its inbox in one turn (messages_per_iter
    // = 20 batches of up to 256 frames: 5,120), so that it reads the LEAVE
    // between two turns and some publishes come after it.
    const N: u64 = 20_000;
    let srv = start("epoll", "").expect("epoll runs");
    let publisher = loop {
        let (r, id) = raw_client(srv.addr);
        if shard_of(&id) == 0 {
            break r;
        }
    };
    let mut publisher = publisher;
    // Whether the LEAVE lands before or after the stall begins is the
    // scheduler's: a few attempts, each with the identity checked.
    for attempt in 0..5 {
        let g = group(&format!("left.{attempt}"));
        let (mut member, _) = loop {
            let (r, id) = raw_client(srv.addr);
            if shard_of(&id) == 1 {
                break (r, id);
            }
        };
        join(&mut member, &g);
        let mut leaver = member.clone_stream();
        let reader = Reader::spawn(member, format!("member {attempt}"));
        let (left0, unrouted0) = (totals(&srv, "dropped_left"), totals(&srv, "unrouted"));
        srv.server().stall_shard(1, Duration::from_millis(300));
        leaver.send(&Frame::Leave { group: g.clone() });
        let mut buf = BytesMut::new();
        for k in 0..N {
            Frame::Publish {
                group: g.clone(),
                payload: numbered(k, 16),
            }
            .encode(&mut buf);
        }
        publisher.s.write_all(&buf).expect("publishes written");
        let accounted = || {
            reader.got() + totals(&srv, "dropped_left") - left0 + totals(&srv, "unrouted")
                - unrouted0
        };
        wait_for("every publish delivered or counted", WAIT, || {
            accounted() >= N
        });
        assert_eq!(accounted(), N, "delivered + left + unrouted = published");
        assert_healthy(std::slice::from_ref(&reader));
        if totals(&srv, "dropped_left") > left0 {
            return;
        }
    }
    panic!("in 5 attempts no publish reached shard 1 after its member left");
}

/// What one read of a publisher routes to another shard goes there as one
/// inbox message (batches of up to 256 frames or 64 KiB), not one per
/// `messages_per_iter` frames: that shard's members get the read at once
/// and write it in few, large writes. Shard 1 is stopped so that what shard
/// 0 hands it stays in its inbox, where it is counted.
#[test]
fn a_read_goes_to_another_shard_as_one_batch() {
    const N: u64 = 100; // five turns of messages_per_iter = 20
    let srv = start("epoll", "").expect("epoll runs");
    let g = group("onebatch");
    let (mut member, _) = client_on(srv.addr, 1);
    join(&mut member, &g);
    let reader = Reader::spawn(member, "member".into());
    let (mut publisher, _) = client_on(srv.addr, 0);
    let mut buf = BytesMut::new();
    for i in 0..N {
        Frame::Publish {
            group: g.clone(),
            payload: numbered(i, 16),
        }
        .encode(&mut buf);
    }
    let inbox = |srv: &crate::util::TestServer| num(&srv.stats()["inboxes"][1]["msgs"]);
    let routed = |srv: &crate::util::TestServer| num(&srv.stats()["per_shard"][0]["msgs_in"]);
    srv.server().stall_shard(1, Duration::from_secs(3));
    wait_for("shard 1 to stop", WAIT, || inbox(&srv) == 0);
    let before = routed(&srv);
    publisher.s.write_all(&buf).expect("publish");
    // Frames count as read while they are decoded; the batch leaves once
    // the whole read is routed.
    wait_for("shard 0 to route the publishes", WAIT, || {
        routed(&srv) >= before + N && inbox(&srv) >= 1
    });
    let handed = inbox(&srv);
    assert!(
        (1..=2).contains(&handed),
        "{N} frames of one read reached shard 1 as {handed} inbox messages (one per turn would be 5; 0: shard 1 woke too early)"
    );
    wait_all(std::slice::from_ref(&reader), N, 2 * WAIT);
    assert_healthy(std::slice::from_ref(&reader));
    drop(publisher);
}
