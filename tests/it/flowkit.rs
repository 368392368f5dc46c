//! Raw-socket tools for flow-control tests: members reading on threads
//! that check every message's order, a closed-loop publisher, servers with
//! members on both shards. Shared by `flow` and the `stall` test binary.
#![allow(dead_code)]

use crate::util::{Raw, TestServer};
use bytes::{BufMut, Bytes, BytesMut};
use msgc::protocol::{Events, Frame, GroupName, Hello, MemberId, Reason, Role, PROTOCOL_VERSION};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SHARDS: usize = 2;

/// A two-shard in-process server, or `None` (said loudly) where io_uring
/// cannot run.
pub(crate) fn start(backend: &str, extra: &str) -> Option<TestServer> {
    if backend == "uring" && !crate::util::uring_here() {
        return None;
    }
    Some(TestServer::start(SHARDS, backend, extra))
}

pub(crate) fn totals(srv: &TestServer, field: &str) -> u64 {
    srv.stats()["totals"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("stats totals.{field} is a number"))
}

pub(crate) fn group(s: &str) -> GroupName {
    GroupName::from_str_checked(s).expect("valid group")
}

/// A raw client after the handshake, and its member id.
pub(crate) fn raw_client(addr: SocketAddr) -> (Raw, MemberId) {
    let mut r = Raw::connect(addr);
    r.send(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        name: None,
        credentials: Bytes::new(),
        features: 0,
        max_message_size: 0,
    }));
    match r.recv() {
        Some(Frame::Welcome(w)) => (r, w.member.expect("a member id")),
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// A raw client that the server placed on `shard` (a few tries:
/// connections are spread over the shards in turn).
pub(crate) fn client_on(addr: SocketAddr, shard: usize) -> (Raw, MemberId) {
    for _ in 0..64 {
        let (r, id) = raw_client(addr);
        if shard_of(&id) == shard {
            return (r, id);
        }
    }
    panic!("64 connections, none on shard {shard}");
}

pub(crate) fn shard_of(id: &MemberId) -> usize {
    id.parts().expect("a server-assigned id").1
}

/// Joins `g` and reads the acknowledgement.
pub(crate) fn join(r: &mut Raw, g: &GroupName) {
    r.send(&Frame::Join {
        group: g.clone(),
        events: Events::Each,
    });
    loop {
        match r.recv() {
            Some(Frame::Membership { group, reason, .. }) if &group == g => {
                assert_eq!(reason, Reason::Join);
                return;
            }
            Some(Frame::Noop) | Some(Frame::Membership { .. }) => {}
            other => panic!("expected the join event, got {other:?}"),
        }
    }
}

/// `n` raw members of `g`, with at least one on each shard.
pub(crate) fn members_on_both_shards(
    addr: SocketAddr,
    g: &GroupName,
    n: usize,
) -> Vec<(Raw, MemberId)> {
    let mut out = Vec::new();
    let mut shards = [0usize; SHARDS];
    while out.len() < n || shards.contains(&0) {
        assert!(out.len() < 64, "64 connections landed on shards {shards:?}");
        let (mut r, id) = raw_client(addr);
        join(&mut r, g);
        shards[shard_of(&id)] += 1;
        out.push((r, id));
    }
    out
}

/// A payload carrying sequence number `seq`, `len` bytes long.
pub(crate) fn numbered(seq: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len.max(8));
    b.put_u64(seq);
    b.resize(len.max(8), b'x');
    b.freeze()
}

/// A member's reader thread: counts the messages of its group, checks that
/// they arrive in order with none missing, and notes the end of its stream.
pub(crate) struct Reader {
    got: Arc<AtomicU64>,
    pub(crate) ended: Arc<AtomicBool>,
    pub(crate) faults: Arc<Mutex<Vec<String>>>,
    sock: std::net::TcpStream,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    pub(crate) fn spawn(raw: Raw, who: String) -> Reader {
        Self::spawn_paced(raw, who, u64::MAX, Duration::ZERO)
    }

    /// A slow but steady reader: it pauses `pause` after every `every`
    /// messages (it keeps reading, only slower than a fast publisher).
    pub(crate) fn spawn_paced(mut raw: Raw, who: String, every: u64, pause: Duration) -> Reader {
        let got = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicBool::new(false));
        let faults: Arc<Mutex<Vec<String>>> = Arc::default();
        let sock = raw.s.try_clone().expect("clone socket");
        let (g, e, f) = (got.clone(), ended.clone(), faults.clone());
        let thread = std::thread::spawn(move || {
            while let Some(frame) = raw.recv() {
                match frame {
                    Frame::Deliver { payload, .. } => {
                        let seq = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                        let want = g.load(Ordering::Relaxed);
                        if seq != want {
                            f.lock()
                                .unwrap()
                                .push(format!("{who}: got {seq}, wanted {want}"));
                        }
                        g.store(seq + 1, Ordering::Relaxed);
                        if (seq + 1) % every == 0 {
                            std::thread::sleep(pause);
                        }
                    }
                    Frame::Error { code, message } => {
                        f.lock()
                            .unwrap()
                            .push(format!("{who}: ERROR {code:?} {message}"));
                    }
                    _ => {}
                }
            }
            e.store(true, Ordering::Release);
        });
        Reader {
            got,
            ended,
            faults,
            sock,
            thread: Some(thread),
        }
    }

    pub(crate) fn got(&self) -> u64 {
        self.got.load(Ordering::Relaxed)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A closed-loop publisher on its own thread: numbered messages to `g`, as
/// fast as the server reads them, until `stop` is set or `limit` are sent.
/// Returns how many it sent, and its connection: keep that open until the
/// server has read everything (closing a socket with unread input, such as
/// a keepalive, resets it, and the server loses what it had not read yet).
pub(crate) fn flood(
    addr: SocketAddr,
    g: GroupName,
    size: usize,
    limit: u64,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(u64, Raw)> {
    let (mut raw, _) = raw_client(addr);
    std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut buf = BytesMut::new();
        while sent < limit && !stop.load(Ordering::Relaxed) {
            buf.clear();
            for _ in 0..64.min(limit - sent) {
                Frame::Publish {
                    group: g.clone(),
                    payload: numbered(sent, size),
                }
                .encode(&mut buf);
                sent += 1;
            }
            raw.s.write_all(&buf).expect("publisher write");
        }
        (sent, raw)
    })
}

/// Waits until every reader has `n` messages (bounded); panics with their
/// counts otherwise.
pub(crate) fn wait_all(readers: &[Reader], n: u64, limit: Duration) {
    let counts = || readers.iter().map(Reader::got).collect::<Vec<_>>();
    let end = Instant::now() + limit;
    while readers.iter().any(|r| r.got() < n) {
        assert!(
            Instant::now() < end,
            "readers stopped short of {n}: {:?}",
            counts()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn assert_healthy(readers: &[Reader]) {
    for r in readers {
        let faults = r.faults.lock().unwrap();
        assert!(faults.is_empty(), "{faults:?}");
        assert!(
            !r.ended.load(Ordering::Acquire),
            "a healthy member's stream ended"
        );
    }
}

/// A number in a stats document.
pub(crate) fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}
