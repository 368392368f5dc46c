//! The in-process fan-out path: one publish → S recipients (S = 1, 10,
//! 100) through a real server (`Server::start` on 127.0.0.1:0, 1 and 2
//! shards, the default I/O backend) over loopback, with raw-socket clients
//! so that the clients cost as little as possible.
//!
//! Each measurement publishes `iters` messages in batches, never more
//! than `WINDOW` ahead of the slowest subscriber, and stops the clock when
//! every subscriber has all of them. Throughput is in deliveries.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use msgc::config::Config;
use msgc::protocol::{
    decode, encode_publish, Events, Frame, FrameType, GroupName, Hello, Reason, Role,
    PROTOCOL_VERSION,
};
use msgc::server::Server;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PAYLOAD: usize = 256;
/// Publishes per write.
const BATCH: usize = 64;
/// Most messages published and not yet read by the slowest subscriber
/// (well under the default max_backlog of 5000).
const WINDOW: u64 = 1024;

/// A handshaken raw connection.
fn connect(addr: SocketAddr, features: u32) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        name: None,
        credentials: Bytes::new(),
        features,
        max_message_size: 0,
    });
    s.write_all(&hello.to_bytes()).expect("hello");
    let mut buf = BytesMut::new();
    let member = loop {
        match decode(&mut buf, 1 << 24).expect("decodable") {
            Some(Frame::Welcome(w)) => break w.member.expect("member id"),
            Some(_) => panic!("expected WELCOME"),
            None => read_more(&mut s, &mut buf),
        }
    };
    (s, member.as_bytes().to_vec())
}

fn read_more(s: &mut TcpStream, buf: &mut BytesMut) {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).expect("read");
    assert!(n > 0, "server closed the connection");
    buf.extend_from_slice(&chunk[..n]);
}

/// Joins `group` and waits for the acknowledgement.
fn join(s: &mut TcpStream, me: &[u8], group: &GroupName) {
    s.write_all(
        &Frame::Join {
            group: group.clone(),
            events: Events::Each,
        }
        .to_bytes(),
    )
    .expect("join");
    let mut buf = BytesMut::new();
    loop {
        match decode(&mut buf, 1 << 24).expect("decodable") {
            Some(Frame::Membership {
                subject, reason, ..
            }) if reason == Reason::Join && subject.as_ref() == me => return,
            Some(_) => {}
            None => read_more(s, &mut buf),
        }
    }
}

/// Counts DELIVER frames until the connection closes.
fn count_deliveries(mut s: TcpStream, count: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let mut n = 0u64;
    loop {
        while end - start >= 4 {
            let len =
                u32::from_be_bytes(buf[start..start + 4].try_into().expect("4 bytes")) as usize;
            if end - start < 4 + len {
                break;
            }
            let ty = buf[start + 4];
            if ty == FrameType::DELIVER.0 || ty == FrameType::DELIVER_SEQ.0 {
                n += 1;
            }
            start += 4 + len;
        }
        count.store(n, Ordering::Release);
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        match s.read(&mut buf[end..]) {
            Ok(0) | Err(_) => return,
            Ok(k) => end += k,
        }
    }
}

/// A server with one publisher and `subs` subscribers in one group.
struct Setup {
    server: Option<Server>,
    publisher: TcpStream,
    batch: Vec<u8>,
    counts: Vec<Arc<AtomicU64>>,
    readers: Vec<JoinHandle<()>>,
    published: u64,
}

impl Setup {
    fn new(shards: usize, subs: usize, features: u32) -> Self {
        let text = format!(
            "msgc_server {{ node = \"bench\"\n shards = {shards}\n }}\n\
             msgcserver_listener {{ listen \"127.0.0.1:0\" {{ }} }}\n"
        );
        let config = Config::parse_str("bench.conf", &text).expect("bench config");
        let server = Server::start(&config, None).expect("server starts");
        let addr = server.local_addrs()[0];
        let group = GroupName::from_str_checked("bench").expect("valid group");
        let mut counts = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..subs {
            let (mut s, me) = connect(addr, features);
            join(&mut s, &me, &group);
            let c = Arc::new(AtomicU64::new(0));
            counts.push(c.clone());
            readers.push(std::thread::spawn(move || count_deliveries(s, c)));
        }
        let (publisher, _) = connect(addr, 0);
        let mut batch = BytesMut::new();
        for _ in 0..BATCH {
            encode_publish(&mut batch, &group, &[0x5a; PAYLOAD]);
        }
        Self {
            server: Some(server),
            publisher,
            batch: batch.to_vec(),
            counts,
            readers,
            published: 0,
        }
    }

    fn slowest(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// Publishes `n` messages (whole batches) and waits until every
    /// subscriber has them.
    fn run(&mut self, n: u64) -> Duration {
        let batches = n.div_ceil(BATCH as u64).max(1);
        let start = Instant::now();
        for _ in 0..batches {
            while self.published + BATCH as u64 > self.slowest() + WINDOW {
                // Not a spin: server and readers need the cores.
                std::thread::yield_now();
            }
            self.publisher.write_all(&self.batch).expect("publish");
            self.published += BATCH as u64;
        }
        while self.slowest() < self.published {
            std::thread::yield_now();
        }
        // Scale to the `n` criterion asked for.
        start
            .elapsed()
            .mul_f64(n as f64 / (batches * BATCH as u64) as f64)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.publisher.shutdown(Shutdown::Both);
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout/256B");
    // `_seq`: subscribers asked for numbered deliveries (DELIVER_SEQ),
    // as the client library does; the others get plain DELIVER.
    for (suffix, features) in [("", 0), ("_seq", msgc::protocol::features::SEQ)] {
        for shards in [1usize, 2] {
            for subs in [1usize, 10, 100] {
                g.throughput(Throughput::Elements(subs as u64));
                let id =
                    BenchmarkId::new(format!("{shards}_shard{suffix}"), format!("{subs}_subs"));
                let mut setup = Setup::new(shards, subs, features);
                g.bench_function(id, |b| b.iter_custom(|iters| setup.run(iters)));
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = fanout
}
criterion_main!(benches);
