//! Rolling restarts (issue 12, item 2): a node that leaves on SIGTERM
//! tells its clients to move (`MOVE`) and its peers goodbye
//! (`NODE_LEAVING`); members elsewhere never hear node-down for it, and
//! nothing is lost. (A node killed with SIGKILL is still reported down:
//! `cluster::killed_node_is_reported_down_and_rejoins_after_restart`.)

use crate::cluster::{name, peer_of, stats, until, Cluster, QUICK};
use crate::util::{group, Polled, Raw};
use msgc::client::{Client, ClientConfig, Event};
use msgc::protocol::{features, ErrorCode, Frame, Reason};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A survivor's view of the peer that left: no drops counted as down or
/// as lost with its link.
fn assert_clean_leave(addr: SocketAddr, peer: &str) {
    let st = stats(addr);
    let p = peer_of(&st, peer).unwrap_or_else(|| panic!("{peer} in {st}"));
    assert_eq!(
        p["drops"]["down"], 0,
        "{addr} counts drops.down for {peer}: {p}"
    );
    assert_eq!(
        p["drops"]["link_lost"], 0,
        "{addr} counts link_lost for {peer}: {p}"
    );
}

/// The next frame that is not a NOOP, PONG, DELIVER or another member's
/// join.
fn next_control(r: &mut Raw) -> Option<Frame> {
    for _ in 0..1000 {
        match r.poll() {
            Polled::Frame(Frame::Noop | Frame::Pong { .. } | Frame::Deliver { .. }) => {}
            Polled::Frame(Frame::Membership {
                reason: Reason::Join,
                ..
            }) => {}
            Polled::Frame(f) => return Some(f),
            Polled::Quiet | Polled::Closed => return None,
        }
    }
    None
}

fn join(r: &mut Raw, g: &str) {
    r.send(&Frame::Join {
        group: group(g),
        events: Default::default(),
    });
}

/// Waits for our own join event (the acknowledgement).
fn joined(r: &mut Raw, me: &str) {
    for _ in 0..100 {
        match r.poll() {
            Polled::Frame(Frame::Membership {
                subject, reason, ..
            }) if reason == Reason::Join && subject.as_ref() == me.as_bytes() => return,
            Polled::Frame(_) => {}
            Polled::Quiet | Polled::Closed => break,
        }
    }
    panic!("{me}: no join acknowledgement");
}

/// Frame by frame, with clients that speak `LEAVING` and clients that do
/// not: a leaving node sends `MOVE` only to the former, closes both with
/// `SHUTTING_DOWN` at `lame_duck_duration`, and its peer tells its own
/// members node-left (node-down to a client that knows no node-left),
/// counting no drop against the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_moves_its_clients_and_peers_say_node_left() {
    let extra = format!("{QUICK}\n lame_duck_duration = 1");
    let mut c = Cluster::start("leave", 2, &extra).await;
    let g = "leave";
    tokio::task::block_in_place(|| {
        let (mut stays, w) = Raw::client_with(c.addr(1), features::LEAVING);
        let (mut old, wo) = Raw::client_with(c.addr(1), 0);
        let (mut new_here, wn) = Raw::client_with(c.addr(0), features::LEAVING);
        let (mut old_here, wh) = Raw::client_with(c.addr(0), 0);
        let member = |w: &msgc::protocol::Welcome| w.member.clone().expect("member").to_string();
        for (r, w) in [
            (&mut stays, &w),
            (&mut old, &wo),
            (&mut new_here, &wn),
            (&mut old_here, &wh),
        ] {
            join(r, g);
            joined(r, &member(w));
        }
        // Everyone sees all four members before node2 leaves.
        until_members(c.addr(0), g, 4);

        c.nodes[1].signal(libc::SIGTERM);
        match next_control(&mut stays) {
            Some(Frame::Move { deadline_ms }) => {
                assert!(
                    deadline_ms <= 1000,
                    "within lame_duck_duration: {deadline_ms}"
                )
            }
            other => panic!("a LEAVING client gets MOVE first, got {other:?}"),
        }
        // Neither moves: both are closed at the bound. The two may sit on
        // different shards, so one can be told of the other's close
        // (a disconnect) before its own ERROR.
        let here = [member(&w), member(&wo)];
        for r in [&mut stays, &mut old] {
            let mut others = 0;
            loop {
                match next_control(r) {
                    Some(Frame::Error { code, .. }) => {
                        assert_eq!(code, ErrorCode::SHUTTING_DOWN);
                        break;
                    }
                    Some(Frame::Membership {
                        subject, reason, ..
                    }) if reason == Reason::Disconnect
                        && here.iter().any(|m| m.as_bytes() == subject.as_ref())
                        && others == 0 =>
                    {
                        others += 1
                    }
                    other => panic!("expected ERROR SHUTTING_DOWN, got {other:?}"),
                }
            }
        }
        let told = |r: &mut Raw| loop {
            match next_control(r) {
                Some(Frame::Membership {
                    subject,
                    reason,
                    size,
                    ..
                }) if subject.as_ref() == b"node2" => return (reason, size),
                Some(Frame::Membership { .. }) => {}
                other => panic!("expected node2's departure, got {other:?}"),
            }
        };
        assert_eq!(told(&mut new_here), (Reason::NodeLeft, 2));
        assert_eq!(
            told(&mut old_here),
            (Reason::NodeDown, 2),
            "an old client knows no node-left"
        );
    });
    let code = tokio::task::block_in_place(|| c.nodes[1].terminate());
    assert_eq!(code, Some(0), "node2 exits 0 after leaving");
    assert_clean_leave(c.addr(0), "node2");
    let st = stats(c.addr(0));
    assert_eq!(st["drops"]["peer"], 0, "{st}");
}

/// A second signal cuts the wait for clients short: with a
/// `lame_duck_duration` of five minutes and a client that never moves,
/// the node closes it and leaves as soon as the second signal comes.
/// Meanwhile a new connection is refused (`ERROR SHUTTING_DOWN` after
/// `HELLO`). SIGTERM, SIGINT and SIGUSR2 each make a node leave.
fn a_second_signal_cuts_the_wait(tag: &str, sig: i32) {
    let extra = format!("{QUICK}\n lame_duck_duration = 300");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = rt.block_on(Cluster::start(tag, 2, &extra));
    let (mut stays, _) = Raw::client_with(c.addr(1), features::LEAVING);
    c.nodes[1].signal(sig);
    match next_control(&mut stays) {
        Some(Frame::Move { .. }) => {}
        other => panic!("a LEAVING client gets MOVE first, got {other:?}"),
    }
    let mut late = Raw::connect(c.addr(1));
    late.send(&Frame::Hello(msgc::protocol::Hello {
        version: msgc::protocol::PROTOCOL_VERSION,
        role: msgc::protocol::Role::Client,
        name: None,
        credentials: bytes::Bytes::new(),
        features: 0,
        max_message_size: 0,
    }));
    match next_control(&mut late) {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::SHUTTING_DOWN),
        other => {
            panic!("a new connection to a leaving node: expected SHUTTING_DOWN, got {other:?}")
        }
    }
    c.nodes[1].signal(sig);
    // Within the client's read timeout, far below the five minutes.
    match next_control(&mut stays) {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::SHUTTING_DOWN),
        other => panic!("expected ERROR SHUTTING_DOWN, got {other:?}"),
    }
    let code = c.nodes[1].terminate();
    assert_eq!(code, Some(0), "node2 exits 0 after leaving");
    assert_clean_leave(c.addr(0), "node2");
}

#[test]
fn a_second_sigterm_cuts_the_wait_for_clients_short() {
    a_second_signal_cuts_the_wait("leave2", libc::SIGTERM);
}

#[test]
fn sigint_leaves_too() {
    a_second_signal_cuts_the_wait("leave-int", libc::SIGINT);
}

#[test]
fn sigusr2_leaves_too() {
    a_second_signal_cuts_the_wait("leave-usr2", libc::SIGUSR2);
}

/// Waits until the node at `addr` counts `n` members in group `g`.
fn until_members(addr: SocketAddr, g: &str, n: usize) {
    let mut r = Raw::client(addr);
    crate::util::wait_for(
        &format!("{n} members of {g} at {addr}"),
        crate::util::WAIT,
        || {
            r.send(&Frame::MembersRequest {
                req: 1,
                group: group(g),
            });
            loop {
                match r.recv() {
                    Some(Frame::MembersReply { members, .. }) => return members.len() == n,
                    Some(_) => {}
                    None => return false,
                }
            }
        },
    );
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Per publisher: the counters received.
    got: HashMap<u32, BTreeSet<u32>>,
    /// Copies received of a counter already received.
    duplicates: u64,
    node_down: Vec<String>,
    node_left: Vec<String>,
    moved: u32,
    disconnected: Vec<String>,
    markers: BTreeSet<u32>,
}

struct Roller {
    client: Client,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Roller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const MARKER: u32 = u32::MAX;

impl Roller {
    async fn start(servers: Vec<String>, g: &str) -> Roller {
        let mut cfg = ClientConfig::with_servers(servers);
        cfg.reconnect_interval = Duration::from_millis(200);
        cfg.connect_timeout = Duration::from_secs(5);
        cfg.request_timeout = Duration::from_secs(10);
        let client = Client::connect(cfg).await.expect("connect");
        let rx = client.events();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok(ev) = rx.recv_async().await {
                let mut s = sink.lock().expect("seen");
                match ev {
                    Event::Message { payload, .. } if payload.len() == 8 => {
                        let p = u32::from_be_bytes(payload[..4].try_into().expect("4"));
                        let n = u32::from_be_bytes(payload[4..].try_into().expect("4"));
                        if n == MARKER {
                            s.markers.insert(p);
                        } else if !s.got.entry(p).or_default().insert(n) {
                            s.duplicates += 1;
                        }
                    }
                    Event::Membership {
                        subject, reason, ..
                    } => match reason {
                        Reason::NodeDown => s.node_down.push(subject),
                        Reason::NodeLeft => s.node_left.push(subject),
                        _ => {}
                    },
                    Event::Moved { .. } => s.moved += 1,
                    Event::Disconnected { reason, .. } => s.disconnected.push(reason),
                    _ => {}
                }
            }
        });
        client.join(g).await.expect("join");
        Roller { client, seen, task }
    }

    /// Holes: counters missing between the first and the last received
    /// from each publisher.
    fn holes(&self) -> u64 {
        let s = self.seen.lock().expect("seen");
        s.got
            .values()
            .map(|set| match (set.first(), set.last()) {
                (Some(a), Some(b)) => u64::from(b - a + 1) - set.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

/// The rolling restart: three nodes, two clients on each (each with all
/// three servers, its own first), every client publishing to one group
/// all are members of; each node in turn gets SIGTERM, exits, starts
/// again and re-forms the mesh.
///
/// Asserted: no client sees node-down; every client moved (no
/// disconnection); each survivor counts no drop against the node that
/// left; and the loss is zero: every client received every counter of
/// every publisher between the first and the last it got from it (no
/// hole), once (no duplicate), and every client's final marker reached
/// every client. The bound is zero because a moving client's old
/// connection delivers everything published before its new joins were
/// acknowledged (it leaves its groups there only afterwards, and reads
/// the old connection to its end), the new one everything after, and the
/// client drops the copies both delivered by their sequence numbers; a
/// moving publisher's old publishes are confirmed before its new ones
/// start, and a leaving node says goodbye on each link only behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_without_node_down_or_loss() {
    let extra = format!("{QUICK}\n lame_duck_duration = 10");
    let mut c = Cluster::start("roll", 3, &extra).await;
    let g = "roll";
    let addrs: Vec<String> = (0..3).map(|i| c.addr(i).to_string()).collect();
    let mut rollers = Vec::new();
    for k in 0..3 {
        for _ in 0..2 {
            let servers = (0..3).map(|j| addrs[(k + j) % 3].clone()).collect();
            rollers.push(Roller::start(servers, g).await);
        }
    }
    let n = rollers.len();
    // Publishers: a counter each, paced, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pubs = Vec::new();
    for (p, r) in rollers.iter().enumerate() {
        let (client, stop) = (r.client.clone(), stop.clone());
        pubs.push(tokio::spawn(async move {
            let mut failed = 0u32;
            for i in 0..200_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return (i, failed);
                }
                let mut payload = (p as u32).to_be_bytes().to_vec();
                payload.extend_from_slice(&i.to_be_bytes());
                if client.publish(g, payload).await.is_err() {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (200_000, failed)
        }));
    }
    let got_some = |rs: &[Roller], at_least: usize| {
        rs.iter().all(|r| {
            let s = r.seen.lock().expect("seen");
            s.got.len() == n && s.got.values().all(|v| v.len() >= at_least)
        })
    };
    until("every client to receive from every publisher", || {
        got_some(&rollers, 20)
    })
    .await;

    for k in 0..3 {
        let code = tokio::task::block_in_place(|| c.nodes[k].terminate());
        assert_eq!(code, Some(0), "{} exits 0 after leaving", name(k));
        for j in (0..3).filter(|&j| j != k) {
            tokio::task::block_in_place(|| assert_clean_leave(c.addr(j), &name(k)));
        }
        tokio::task::block_in_place(|| c.nodes[k].restart());
        c.wait_mesh(&[0, 1, 2]).await;
        let before: Vec<usize> = rollers.iter().map(received).collect();
        until(
            &format!("traffic to flow after {} restarted", name(k)),
            || {
                rollers
                    .iter()
                    .zip(&before)
                    .all(|(r, b)| received(r) >= b + 20)
            },
        )
        .await;
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pubs {
        let (_sent, failed) = p.await.expect("publisher");
        assert_eq!(failed, 0, "publishes failed");
    }
    for (p, r) in rollers.iter().enumerate() {
        let mut payload = (p as u32).to_be_bytes().to_vec();
        payload.extend_from_slice(&MARKER.to_be_bytes());
        r.client.publish(g, payload).await.expect("marker");
    }
    until("every client to receive every marker", || {
        rollers
            .iter()
            .all(|r| r.seen.lock().expect("seen").markers.len() == n)
    })
    .await;

    let mut moved = 0;
    for (i, r) in rollers.iter().enumerate() {
        let holes = r.holes();
        let s = r.seen.lock().expect("seen");
        assert!(
            s.node_down.is_empty(),
            "client {i} saw node-down: {:?}",
            s.node_down
        );
        assert!(
            s.disconnected.is_empty(),
            "client {i} was disconnected: {:?}",
            s.disconnected
        );
        assert_eq!(s.duplicates, 0, "client {i} got duplicates");
        assert_eq!(holes, 0, "client {i} lost messages");
        assert_eq!(r.client.gaps(), 0, "client {i} reported gaps");
        moved += s.moved;
        eprintln!(
            "client {i}: moved {} times, node-left {:?}, received {}",
            s.moved,
            s.node_left,
            s.got.values().map(|v| v.len()).sum::<usize>()
        );
    }
    // Each node had two clients when it left (the ones that moved onto it
    // included): at least six moves.
    assert!(moved >= 6, "moves: {moved}");
}

fn received(r: &Roller) -> usize {
    r.seen
        .lock()
        .expect("seen")
        .got
        .values()
        .map(|v| v.len())
        .sum()
}
