//! Every drop is counted by its reason (README "Honest"): a member whose
//! queue still holds frames when its connection ends is charged to the
//! reason it ended for.
//!
//! Each test fills the queue of a raw member that stops reading (a small
//! receive buffer, `max_backlog = 100`, and a `stuck_timeout` far too long
//! for it to be cut as stuck), ends its connection one way, reads what
//! reached its socket, and checks the stats: every frame queued to it
//! (its messages, `deliveries`, it being the group's only member, and the
//! `ERROR` the server queues behind them when it closes it) was received
//! whole or counted under that reason, and every publish was queued,
//! refused (`closed`), `unrouted` or `left`. Payloads of 4,000 bytes are
//! queued by reference, one frame per buffer. Every wait is bounded;
//! nothing asserts on timing.

use crate::flowkit::{client_on, join, num, numbered, raw_client};
use crate::util::{raw_stats, wait_for, NodeProc, Polled, Raw, TempDir, WAIT};
use msgc::config::Config;
use msgc::protocol::{ErrorCode, Frame, GroupName};
use msgc::server::Server;
use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::Duration;

/// What a test publishes: `n` numbered messages of `size` bytes.
#[derive(Debug, Clone, Copy)]
struct Load {
    n: u64,
    size: usize,
}

/// Far more than the member's queue and socket hold, in payloads too
/// large to be copied into a writer's chunk (`COPY_MAX`, `PACK_MAX`).
const LOAD: Load = Load { n: 600, size: 4000 };
/// A queue of 100 frames, small socket buffers, no keepalive NOOP queued
/// behind the messages, and no stuck verdict within any test's life.
const SETTINGS: &str = "max_backlog = 100\n tcpbuf_size = 4096\n stuck_timeout = 600\n \
                        keepalive_interval = 600\n idle_timeout = 1";

/// The most a server's send queue to a member holds here, in bytes (twice
/// what it was seen to hold).
const SEND_QUEUE: u64 = 64 * 1024;

fn group(s: &str) -> GroupName {
    GroupName::from_str_checked(s).expect("valid group")
}

fn total(st: &serde_json::Value, field: &str) -> u64 {
    num(&st["totals"][field])
}

fn dropped(st: &serde_json::Value, reason: &str) -> u64 {
    num(&st["drops"][reason])
}

/// Asserts that no message was dropped for any reason but `allowed`.
fn only_dropped_for(st: &serde_json::Value, allowed: &[&str]) {
    // Every reason the stats document has.
    let reasons = msgc::stats::Counts::default().drops_by_reason();
    for (reason, _) in reasons.iter().filter(|(r, _)| !allowed.contains(r)) {
        assert_eq!(dropped(st, reason), 0, "drops.{reason}: {}", st["drops"]);
    }
}

/// A raw member of `g` with a small receive buffer, which reads nothing
/// after its join acknowledgement.
fn silent_member(addr: SocketAddr, g: &GroupName) -> Raw {
    let (mut m, _) = raw_client(addr);
    socket2::SockRef::from(&m.s)
        .set_recv_buffer_size(4096)
        .expect("set SO_RCVBUF");
    join(&mut m, g);
    m
}

/// Publishes `load` to `g` from a raw client on a thread (blocked while
/// the server does not read it); the thread returns the connection, to
/// keep it open until the server has read everything.
fn publish_all(addr: SocketAddr, g: &GroupName, load: Load) -> JoinHandle<std::io::Result<Raw>> {
    let (mut p, _) = raw_client(addr);
    let g = g.clone();
    std::thread::spawn(move || {
        let mut buf = bytes::BytesMut::new();
        for i in 0..load.n {
            Frame::Publish {
                group: g.clone(),
                payload: numbered(i, load.size),
            }
            .encode(&mut buf);
        }
        p.s.write_all(&buf).map(|()| p)
    })
}

/// Waits until `member`'s queue is full and its publisher waits for it,
/// the member sending NOOPs meanwhile (it reads nothing, but is not idle).
fn wait_until_full(addr: SocketAddr, member: &mut Raw) {
    wait_for("the member's queue to fill", WAIT, || {
        member.send(&Frame::Noop);
        total(&raw_stats(addr), "slow_readers") >= 1
    });
}

/// What a member read once its connection was closed: the group messages
/// (checked to be the first ones published, in order) and the errors.
struct Rest {
    delivered: u64,
    errors: Vec<ErrorCode>,
}

fn read_rest(member: &mut Raw, load: Load) -> Rest {
    let mut rest = Rest {
        delivered: 0,
        errors: Vec::new(),
    };
    for _ in 0..=load.n + 16 {
        match member.poll() {
            Polled::Frame(Frame::Deliver { payload, .. }) => {
                let seq = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                assert_eq!(seq, rest.delivered, "the member's messages, in order");
                assert_eq!(payload.len(), load.size);
                rest.delivered += 1;
            }
            Polled::Frame(Frame::Error { code, .. }) => rest.errors.push(code),
            Polled::Frame(other) => panic!("the member got {other:?}"),
            Polled::Quiet => panic!("the member's socket was not closed"),
            Polled::Closed => return rest,
        }
    }
    panic!("more frames than were published");
}

/// Waits until the server has read every publish, closes the publisher,
/// and waits until the server serves only the stats connection (the
/// member's is gone, so its writer has counted what it was writing);
/// returns the stats then.
fn settled(
    addr: SocketAddr,
    publisher: JoinHandle<std::io::Result<Raw>>,
    load: Load,
) -> serde_json::Value {
    let publisher = publisher
        .join()
        .expect("publisher thread")
        .expect("publisher write");
    wait_for("the server to read every publish", WAIT, || {
        total(&raw_stats(addr), "publishes") == load.n
    });
    drop(publisher);
    wait_for("the other connections to be gone", WAIT, || {
        total(&raw_stats(addr), "connections") == 1
    });
    raw_stats(addr)
}

/// A member of a node on `ip` (`settings`) hangs up (FIN) with a full
/// queue of `load`; checks that what it received plus `drops.closed` is
/// what was queued to it.
fn hang_up_with_frames_queued(ip: &str, settings: &str, load: Load) {
    let dir = TempDir::new("drops-hangup");
    let node = NodeProc::solo(&dir, ip, settings);
    let g = group("hangup");
    let mut member = silent_member(node.addr, &g);
    let publisher = publish_all(node.addr, &g, load);
    wait_until_full(node.addr, &mut member);

    // It stops sending: the server sees the end of its stream, drains for
    // `idle_timeout` (the member still reads nothing), then closes it.
    member.send(&Frame::Noop);
    member.s.shutdown(Shutdown::Write).expect("shutdown write");
    wait_for("the member's drops to be counted", WAIT, || {
        dropped(&raw_stats(node.addr), "closed") > 0
    });
    let rest = read_rest(&mut member, load);
    let st = settled(node.addr, publisher, load);

    assert!(rest.errors.is_empty(), "errors: {:?}", rest.errors);
    let queued = total(&st, "deliveries");
    assert!(rest.delivered < queued, "{queued} queued, all received");
    assert_eq!(
        rest.delivered + dropped(&st, "closed"),
        queued,
        "received + drops.closed = queued to the member; drops {}",
        st["drops"]
    );
    assert_eq!(
        queued + total(&st, "unrouted") + dropped(&st, "left"),
        load.n,
        "every publish queued, unrouted or left"
    );
    only_dropped_for(&st, &["closed", "left"]);
}

/// A member that hangs up (FIN) with a full queue: what its queue held
/// when the server closed it is counted `closed`, and what it received
/// plus that count is exactly what was queued to it.
#[test]
fn a_member_hanging_up_with_frames_queued_is_counted_closed() {
    hang_up_with_frames_queued("127.0.0.101", SETTINGS, LOAD);
}

/// As above with small messages, which the server copies into shared
/// chunks, and a queue of thousands: what the member received and what
/// was counted `closed` add up to what was queued to it, no more.
#[test]
fn small_messages_a_member_received_are_not_also_counted_closed() {
    let settings = format!("{SETTINGS}\n max_backlog = 3000");
    let load = Load {
        n: 20_000,
        size: 100,
    };
    hang_up_with_frames_queued("127.0.0.106", &settings, load);
}

/// A member whose connection is reset (SO_LINGER 0) with a full queue:
/// its queue and what its writer was writing are counted `closed`; only
/// what its socket buffers had already taken is lost uncounted (PROTOCOL.md
/// §14, "One loss the sender cannot count").
#[test]
fn a_member_reset_with_frames_queued_is_counted_closed() {
    let dir = TempDir::new("drops-reset");
    let node = NodeProc::solo(&dir, "127.0.0.102", SETTINGS);
    let g = group("reset");
    let mut member = silent_member(node.addr, &g);
    let publisher = publish_all(node.addr, &g, LOAD);
    wait_until_full(node.addr, &mut member);

    // What the member's socket holds unread now (its window is full: the
    // server cannot add to it).
    let unread = msgc::server::sockets::unread_bytes(member.s.as_raw_fd());
    socket2::SockRef::from(&member.s)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER");
    drop(member);
    let st = settled(node.addr, publisher, LOAD);

    let closed = dropped(&st, "closed");
    let queued = total(&st, "deliveries");
    assert!(closed > 0, "drops {}", st["drops"]);
    // Every publish was queued, refused (`closed` too), unrouted or left;
    // of those queued, all but the ones the socket buffers took were
    // counted. Those are in the member's unread bytes or in the server's
    // send queue: `tcpbuf_size` (4 KiB, doubled by the kernel), which
    // loopback lets one 32 KiB write overrun.
    let counted = closed + total(&st, "unrouted") + dropped(&st, "left");
    assert!(
        counted <= LOAD.n,
        "{counted} counted of {} published",
        LOAD.n
    );
    let lost = LOAD.n - counted;
    assert!(lost <= queued, "{lost} uncounted, {queued} queued");
    assert!(
        lost * LOAD.size as u64 <= unread as u64 + SEND_QUEUE,
        "{lost} frames uncounted, more than the {unread} unread bytes and a send queue hold"
    );
    only_dropped_for(&st, &["closed", "left"]);
}

/// A member that goes silent with a full queue is closed by `idle_timeout`,
/// and what its queue held then is counted `idle`: the messages queued to
/// it and the `ERROR IDLE` queued behind them were each received or
/// counted. Publishes that reach it while it closes are refused and
/// counted `closed`.
#[test]
fn a_member_closed_as_idle_with_frames_queued_is_counted_idle() {
    let dir = TempDir::new("drops-idle");
    let node = NodeProc::solo(&dir, "127.0.0.103", SETTINGS);
    let g = group("idle");
    let mut member = silent_member(node.addr, &g);
    let publisher = publish_all(node.addr, &g, LOAD);
    wait_until_full(node.addr, &mut member);

    // From now on the member sends nothing (its publisher, waiting with
    // unread input, is not idle).
    wait_for("the member to be closed as idle", WAIT, || {
        let st = raw_stats(node.addr);
        total(&st, "idle_kills") >= 1 && dropped(&st, "idle") > 0
    });
    let rest = read_rest(&mut member, LOAD);
    let st = settled(node.addr, publisher, LOAD);

    let queued = total(&st, "deliveries");
    assert!(rest.delivered < queued, "{queued} queued, all received");
    assert!(
        rest.errors.iter().all(|c| *c == ErrorCode::IDLE),
        "errors: {:?}",
        rest.errors
    );
    assert_eq!(
        rest.delivered + rest.errors.len() as u64 + dropped(&st, "idle"),
        queued + 1,
        "received + drops.idle = queued to the member (its messages and the ERROR); drops {}",
        st["drops"]
    );
    assert_eq!(
        queued + dropped(&st, "closed") + total(&st, "unrouted") + dropped(&st, "left"),
        LOAD.n,
        "every publish queued, refused, unrouted or left"
    );
    only_dropped_for(&st, &["idle", "closed", "left"]);
}

/// A member that sends a malformed frame with a full queue is closed for
/// it, and what its queue held then is counted `protocol_error`: the
/// messages queued to it and the `ERROR` queued behind them were each
/// received or counted.
#[test]
fn a_member_closed_for_bad_input_with_frames_queued_is_counted_protocol_error() {
    let dir = TempDir::new("drops-protocol");
    let node = NodeProc::solo(&dir, "127.0.0.104", SETTINGS);
    let g = group("bad");
    let mut member = silent_member(node.addr, &g);
    let publisher = publish_all(node.addr, &g, LOAD);
    wait_until_full(node.addr, &mut member);

    let bad = crate::server::bad_inputs(1 << 20)
        .into_iter()
        .find(|c| c.what == "unknown frame type")
        .expect("the unknown-frame-type case");
    member.send_bytes(&bad.bytes);
    wait_for("the member's drops to be counted", WAIT, || {
        let st = raw_stats(node.addr);
        total(&st, "protocol_errors") >= 1 && dropped(&st, "protocol_error") > 0
    });
    let rest = read_rest(&mut member, LOAD);
    let st = settled(node.addr, publisher, LOAD);

    assert_eq!(total(&st, "protocol_errors"), 1);
    let queued = total(&st, "deliveries");
    assert!(rest.delivered < queued, "{queued} queued, all received");
    assert!(
        rest.errors.iter().all(|c| *c == bad.code),
        "errors: {:?}",
        rest.errors
    );
    assert_eq!(
        rest.delivered + rest.errors.len() as u64 + dropped(&st, "protocol_error"),
        queued + 1,
        "received + drops.protocol_error = queued to the member (its messages and the ERROR); drops {}",
        st["drops"]
    );
    assert_eq!(
        queued + dropped(&st, "closed") + total(&st, "unrouted") + dropped(&st, "left"),
        LOAD.n,
        "every publish queued, refused, unrouted or left"
    );
    only_dropped_for(&st, &["protocol_error", "closed", "left"]);
}

/// An in-process two-shard server on `ip`, whose stats stay readable
/// (through [`Server::shared`]) after it stops; stopped on drop.
struct InProcess(Option<Server>);

impl InProcess {
    fn start(ip: &str, extra: &str) -> Self {
        let text = format!(
            "msgc_server {{\n node = \"drops\"\n shards = 2\n io_backend = epoll\n {extra}\n}}\n\
             msgcserver_listener {{ listen \"{ip}:0\" {{ }} }}\n"
        );
        let config = Config::parse_str("drops.conf", &text).expect("config parses");
        Self(Some(Server::start(&config, None).expect("server starts")))
    }

    fn server(&self) -> &Server {
        self.0.as_ref().expect("running")
    }

    fn addr(&self) -> SocketAddr {
        self.server().local_addrs()[0]
    }

    fn stop(mut self) {
        if let Some(s) = self.0.take() {
            s.shutdown();
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.shutdown();
        }
    }
}

/// When the server stops, publishes still between shards are counted
/// `shutdown`, and the frames still queued to a member `closed` (its
/// messages and the `ERROR SHUTTING_DOWN` behind them): every publish was
/// received or counted.
#[test]
fn stopping_counts_messages_between_shards_and_frames_queued() {
    // `idle_timeout` is left at its default: nobody is closed as idle
    // while the shards are stopped.
    let srv = InProcess::start(
        "127.0.0.105",
        "max_backlog = 100\n tcpbuf_size = 4096\n stuck_timeout = 600\n keepalive_interval = 600",
    );
    let shared = srv.server().shared().clone();
    let g = group("stop");
    // The member on shard 1 with a full queue; the late publisher on
    // shard 0.
    let (mut member, _) = client_on(srv.addr(), 1);
    socket2::SockRef::from(&member.s)
        .set_recv_buffer_size(4096)
        .expect("set SO_RCVBUF");
    join(&mut member, &g);
    let (mut late, _) = client_on(srv.addr(), 0);
    let filler = publish_all(srv.addr(), &g, LOAD);
    wait_until_full(srv.addr(), &mut member);

    // Shard 1 stops; then shard 0, with more than a turn of inbox messages
    // (`messages_per_iter`) behind its stall, so that its connections get
    // turns after it wakes and before it reaches the shutdown. Shard 0
    // wakes first: what the late publisher sent meanwhile goes to shard 1's
    // inbox behind the shutdown.
    let inbox = |i: usize| num(&shared.stats_json()["inboxes"][i]["msgs"]);
    srv.server().stall_shard(1, Duration::from_secs(5));
    wait_for("shard 1 to stop", WAIT, || inbox(1) == 0);
    const TURNS: usize = 60;
    srv.server().stall_shard(0, Duration::from_secs(2));
    for _ in 0..TURNS {
        srv.server().stall_shard(0, Duration::ZERO);
    }
    wait_for("shard 0 to stop", WAIT, || inbox(0) == TURNS as u64);
    let mut buf = bytes::BytesMut::new();
    for i in 0..50 {
        Frame::Publish {
            group: g.clone(),
            payload: numbered(LOAD.n + i, LOAD.size),
        }
        .encode(&mut buf);
    }
    late.send_bytes(&buf);
    srv.stop();

    let st = shared.stats_json();
    let rest = read_rest(&mut member, LOAD);
    // Its connection was closed with the server: its write ends.
    let _ = filler.join().expect("filler thread");
    let queued = total(&st, "deliveries");
    let between = dropped(&st, "shutdown");
    assert!(between > 0, "drops {}", st["drops"]);
    assert_eq!(
        total(&st, "publishes"),
        queued + between + total(&st, "unrouted") + dropped(&st, "left"),
        "every publish read was queued or counted; drops {}",
        st["drops"]
    );
    assert!(rest.delivered < queued, "{queued} queued, all received");
    assert!(
        rest.errors.iter().all(|c| *c == ErrorCode::SHUTTING_DOWN),
        "errors: {:?}",
        rest.errors
    );
    assert_eq!(
        rest.delivered + rest.errors.len() as u64 + dropped(&st, "closed"),
        queued + 1,
        "received + drops.closed = queued to the member (its messages and the ERROR); drops {}",
        st["drops"]
    );
    only_dropped_for(&st, &["shutdown", "closed", "left"]);
}

/// What is dropped when a server stops is told: its last line says how
/// many messages it dropped over its life, by reason. Here a member's
/// full queue (more than 90 frames) is dropped as `closed` at the stop.
#[test]
fn a_stopping_server_says_what_it_dropped() {
    let ip = "127.0.0.107";
    let dir = TempDir::new("drops-stop");
    let at: SocketAddr = format!("{ip}:{}", crate::util::free_port(&[ip]))
        .parse()
        .expect("address");
    let config = dir.write(
        "solo.conf",
        &crate::util::solo_text(at, &format!("{SETTINGS}\n lame_duck_duration = 0.1")),
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_msgc-server"));
    cmd.arg("--config").arg(&config).env_remove("RUST_LOG");
    let mut server = crate::ops::Logged::spawn_cmd(cmd);
    server.wait_line("the banner", |l| l.starts_with("msgc-server: node "));
    let g = group("stop");
    let mut member = silent_member(at, &g);
    let publisher = publish_all(at, &g, LOAD);
    wait_until_full(at, &mut member);
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    let line = server
        .log()
        .lines()
        .find(|l| l.contains("messages dropped over its life: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no drops in the last line:\n{}", server.log()));
    let said = line
        .split("messages dropped over its life: ")
        .nth(1)
        .expect("the count");
    let total: u64 = said
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count in {line:?}"));
    assert!(total > 90, "{line}");
    assert!(said.contains("closed "), "{line}");
    drop(publisher);
}
