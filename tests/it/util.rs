//! Test harness: servers on loopback (in-process on an ephemeral port, or
//! `msgc-server` processes for kill/stop/HUP tests), raw-socket frames, and
//! bounded waits. Every wait is bounded in count and time; every process
//! started is killed on drop.
#![allow(dead_code)]

use bytes::BytesMut;
use msgc::client::{Client, ClientConfig, Event};
use msgc::config::Config;
use msgc::protocol::{decode, Frame, GroupName, Hello, Role, PROTOCOL_VERSION};
use msgc::server::Server;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// True when io_uring can run here. Where it cannot, a `_uring` test
/// fails, so that a green run never hides a backend that did not run,
/// unless `MSGC_SKIP_URING` is set: then it is skipped, said loudly.
pub fn uring_here() -> bool {
    match msgc::server::io::uring_available() {
        Ok(()) => true,
        Err(e) if std::env::var_os("MSGC_SKIP_URING").is_some() => {
            eprintln!("SKIPPED (MSGC_SKIP_URING is set): io_uring is not available here ({e})");
            false
        }
        Err(e) => panic!(
            "io_uring is not available here ({e}); set MSGC_SKIP_URING=1 to skip the io_uring tests"
        ),
    }
}

/// Polls `cond` until it holds or `limit` passes; panics with `what` then.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Async flavour of [`wait_for`].
pub async fn wait_for_async<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("msgc-it-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-process server on 127.0.0.1 and an ephemeral port; stopped on drop.
pub struct TestServer {
    server: Option<Server>,
    pub addr: SocketAddr,
}

impl TestServer {
    /// Starts with `extra` lines inside `msgc_server { }` (e.g. "max_backlog = 10").
    pub fn start(shards: usize, backend: &str, extra: &str) -> Self {
        let text = format!(
            "msgc_server {{\n node = \"test\"\n shards = {shards}\n io_backend = {backend}\n {extra}\n}}\n\
             msgcserver_listener {{ listen \"127.0.0.1:0\" {{ }} }}\n"
        );
        let config = Config::parse_str("test.conf", &text).expect("test config parses");
        let server = Server::start(&config, None).expect("server starts");
        let addr = server.local_addrs()[0];
        Self {
            server: Some(server),
            addr,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    pub fn stats(&self) -> serde_json::Value {
        self.server().stats_json()
    }

    /// A client config pointing at this server.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::with_servers([self.addr.to_string()])
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.client_config())
            .await
            .expect("client connects")
    }

    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// A port free on every one of `ips` right now (bind-and-release; the
/// kernel hands out ephemeral ports in a way that makes reuse unlikely).
pub fn free_port(ips: &[&str]) -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind((ips[0], 0)).expect("bind ephemeral");
        let port = l.local_addr().expect("local addr").port();
        let others: Vec<_> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if others.iter().all(Result::is_ok) {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// A `msgc-server` process; killed on drop.
pub struct NodeProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub name: String,
    args: Vec<String>,
}

impl NodeProc {
    /// Starts `msgc-server --config CONFIG --node NAME` and waits until `addr` accepts.
    pub fn start(config: PathBuf, name: &str, addr: SocketAddr) -> Self {
        let node = Self::spawn(config, name, addr);
        node.wait_listening();
        node
    }

    fn wait_listening(&self) {
        wait_for(
            &format!("{} to listen on {}", self.name, self.addr),
            WAIT,
            || TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok(),
        );
    }

    /// Restarts a stopped or killed node with the same arguments.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_server(&self.args);
        self.wait_listening();
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns its status code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::with_servers([self.addr.to_string()])
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(args: &[String]) -> Child {
    let log = if std::env::var_os("MSGC_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    Command::new(env!("CARGO_BIN_EXE_msgc-server"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn msgc-server")
}

/// A raw protocol connection with blocking reads bounded by a timeout.
pub struct Raw {
    pub s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("raw connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        Self {
            s,
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes the client handshake.
    pub fn client(addr: SocketAddr) -> Self {
        Self::client_with(addr, 0).0
    }

    /// A second reader of the same socket (e.g. on another thread).
    pub fn clone_stream(&self) -> Self {
        Self {
            s: self.s.try_clone().expect("clone socket"),
            buf: BytesMut::new(),
        }
    }

    pub fn send(&mut self, f: &Frame) {
        self.send_bytes(&f.to_bytes());
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("raw write");
    }

    /// The next frame, or None at end of stream / timeout.
    pub fn recv(&mut self) -> Option<Frame> {
        loop {
            match decode(&mut self.buf, 64 << 20) {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("server sent a bad frame: {e}"),
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until end of stream; true if the server closed within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        for _ in 0..10_000 {
            match self.s.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

pub fn group(s: &str) -> GroupName {
    GroupName::from_str_checked(s).expect("valid group")
}

/// The next event matching `pick` within `limit` (others are skipped).
pub async fn next_event<T>(
    rx: &flume::Receiver<Event>,
    limit: Duration,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, rx.recv_async()).await {
            Ok(Ok(ev)) => {
                if let Some(t) = pick(ev) {
                    return t;
                }
            }
            Ok(Err(_)) => panic!("event stream ended"),
            Err(_) => panic!("timed out after {limit:?} waiting for an event"),
        }
    }
}

// ---- Helpers for the cluster tests (appended). ----

impl NodeProc {
    /// Starts `msgc-server --config CONFIG --node NAME` without waiting for
    /// its listener (several nodes can then start at once); see [`NodeProc::wait_ready`].
    pub fn spawn(config: PathBuf, name: &str, addr: SocketAddr) -> Self {
        let args = vec![
            "--config".into(),
            config.display().to_string(),
            "--node".into(),
            name.into(),
        ];
        let child = spawn_server(&args);
        Self {
            child,
            addr,
            config,
            name: name.into(),
            args,
        }
    }

    /// Waits (bounded) until the node accepts connections.
    pub fn wait_ready(&self) {
        self.wait_listening();
    }
}

impl Raw {
    /// Connects to `addr` from the local address `from` (port chosen by the kernel).
    pub fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> Self {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::new(from, 0).into())
            .expect("bind source address");
        sock.connect_timeout(&addr.into(), Duration::from_secs(5))
            .expect("raw connect");
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        Self {
            s,
            buf: BytesMut::new(),
        }
    }
}

/// A port free on every one of `ips` right now and *below* the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`), for a server that a
/// test kills and restarts on the same port. A port from [`free_port`] is an
/// ephemeral one: while its server is down the kernel may hand it out as
/// the source port of any outgoing connection (another test's, or a
/// client's own re-dial to it: TCP self-connect), and the restart then
/// fails with EADDRINUSE. Ports below the range are never handed out so.
pub fn restartable_port(ips: &[&str]) -> u16 {
    const FLOOR: u16 = 10_000;
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low < FLOOR + 1000 {
        return free_port(ips);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503));
    for _ in 0..500 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let port = FLOOR + ((seed >> 8) % u32::from(low - FLOOR)) as u16;
        if port == 4809 {
            continue;
        }
        let held: Vec<_> = ips
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if held.iter().all(Result::is_ok) {
            return port;
        }
    }
    panic!("no port below {low} free on all of {ips:?}");
}

// ---- Memory: what a server process holds (tests/it/memory.rs). ----

impl NodeProc {
    /// The process's resident set size in bytes (`VmRSS` in /proc).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status of the server");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    /// Starts a one-node server on `ip` and a free port with `extra` lines
    /// inside `msgc_server { }`.
    pub fn solo(dir: &TempDir, ip: &str, extra: &str) -> Self {
        let port = free_port(&[ip]);
        let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
        let config = dir.write("solo.conf", &solo_text(addr, extra));
        Self::start(config, "solo", addr)
    }

    /// [`NodeProc::solo`] on a port the caller chose.
    pub fn solo_on(dir: &TempDir, ip: &str, port: u16, extra: &str) -> Self {
        let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
        let config = dir.write("solo.conf", &solo_text(addr, extra));
        Self::start(config, "solo", addr)
    }

    /// Rewrites a [`NodeProc::solo`] node's config with `extra` and tells
    /// it to re-read it (SIGHUP).
    pub fn reconfigure_solo(&self, extra: &str) {
        std::fs::write(&self.config, solo_text(self.addr, extra)).expect("rewrite config");
        self.signal(libc::SIGHUP);
    }
}

/// The config of a one-node server on `addr` with two shards (unless
/// `extra`, inside `msgc_server { }`, says otherwise: a later value wins).
pub(crate) fn solo_text(addr: SocketAddr, extra: &str) -> String {
    format!(
        "msgc_server {{\n  shards = 2\n  {extra}\n}}\n\
         msgcserver_listener {{\n  listen \"{addr}\" {{ }}\n}}\n"
    )
}

/// Raises this process's open-file limit to its hard limit (children, such
/// as a spawned server, inherit it): tests that hold thousands of sockets.
pub fn raise_fd_limit(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    assert!(
        lim.rlim_cur >= need,
        "this test needs {need} open files; the limit is {} (ulimit -n)",
        lim.rlim_cur
    );
}

/// The server's STATS document, over a fresh raw client connection.
pub fn raw_stats(addr: SocketAddr) -> serde_json::Value {
    let mut r = Raw::client(addr);
    r.send(&Frame::StatsRequest { req: 1 });
    loop {
        match r.recv() {
            Some(Frame::StatsReply { json, .. }) => {
                return serde_json::from_slice(&json).expect("STATS_REPLY is JSON")
            }
            Some(_) => {}
            None => panic!("no STATS_REPLY from {addr}"),
        }
    }
}

// ---- Honest delivery (tests/it/honest.rs). ----

/// What [`Raw::poll`] found.
#[derive(Debug)]
pub enum Polled {
    /// A whole frame.
    Frame(Frame),
    /// Nothing whole within the socket's read timeout (what came is kept).
    Quiet,
    /// End of stream, or the connection was reset.
    Closed,
}

impl Raw {
    /// Connects and completes the client handshake asking for `features`;
    /// returns the connection and the `WELCOME`.
    pub fn client_with(addr: SocketAddr, features: u32) -> (Self, msgc::protocol::Welcome) {
        let mut r = Self::connect(addr);
        r.send(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Client,
            name: None,
            credentials: bytes::Bytes::new(),
            features,
            max_message_size: 0,
        }));
        match r.recv() {
            Some(Frame::Welcome(w)) => (r, w),
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Like [`Raw::recv`], but tells a quiet socket (nothing within the
    /// read timeout) from a closed one.
    pub fn poll(&mut self) -> Polled {
        loop {
            match decode(&mut self.buf, 64 << 20) {
                Ok(Some(f)) => return Polled::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("server sent a bad frame: {e}"),
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) => return Polled::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Polled::Quiet
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Polled::Closed,
            }
        }
    }
}

// ---- Monitoring endpoint (tests/it/monitor.rs). ----

impl NodeProc {
    /// Starts `msgc-server --config CONFIG --node NAME` with `extra` command
    /// line arguments, and waits until `addr` accepts.
    pub fn start_with(config: PathBuf, name: &str, addr: SocketAddr, extra: &[&str]) -> Self {
        let mut args = vec![
            "--config".into(),
            config.display().to_string(),
            "--node".into(),
            name.into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let node = Self {
            child: spawn_server(&args),
            addr,
            config,
            name: name.into(),
            args,
        };
        node.wait_listening();
        node
    }
}

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `request` as is to `addr` and reads the response until the server
/// closes (bounded by read timeouts); `None` when nothing could be read.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> Option<HttpReply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(request).ok()?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    for _ in 0..100_000 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(HttpReply {
        status,
        body: body.to_owned(),
    })
}

/// `GET path` on `addr` (one request per connection).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<HttpReply> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_raw(addr, req.as_bytes())
}
