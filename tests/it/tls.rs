//! TLS (issue 11, item 3): clients over TLS on both backends, refusals
//! (a client trusting another CA, client certificates when
//! `tls_client_auth` is on), a plain client to a TLS listener, and the
//! config checks. Certificates are made here with rcgen.

use crate::cluster::{ip, name, Cluster, QUICK};
use crate::util::{
    free_port, next_event, uring_here, wait_for, wait_for_async, NodeProc, Raw, TempDir, WAIT,
};
use msgc::client::{Client, ClientConfig, Event};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A certificate authority that signs leaf certificates into a directory.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate's PEM file.
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &TempDir, name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        let pem = dir.write(&format!("{name}.pem"), &cert.pem());
        Ca { cert, key, pem }
    }

    /// A leaf certificate for `names` (IP addresses or DNS names), usable
    /// by servers and clients: (certificate file, key file).
    fn leaf(&self, dir: &TempDir, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed leaf");
        (
            dir.write(&format!("{file}.crt"), &cert.pem()),
            dir.write(&format!("{file}.key"), &key.serialize_pem()),
        )
    }
}

/// `msgc_server` lines for TLS with these files.
fn tls_lines(cert: &Path, key: &Path) -> String {
    format!(
        "tls_certificate = \"{}\"\n  tls_key = \"{}\"",
        cert.display(),
        key.display()
    )
}

/// A one-node TLS server on `ip` with its CA; `extra` inside `msgc_server`.
fn tls_server(dir: &TempDir, ip: &str, extra: &str) -> (NodeProc, Ca) {
    let ca = Ca::new(dir, "ca");
    let (cert, key) = ca.leaf(dir, "server", &[ip]);
    let port = free_port(&[ip]);
    let extra = format!("{}\n  {extra}", tls_lines(&cert, &key));
    (NodeProc::solo_on(dir, ip, port, &extra), ca)
}

fn tls_client_config(addr: SocketAddr, ca: &Ca) -> ClientConfig {
    ClientConfig {
        tls_ca: Some(ca.pem.display().to_string()),
        ..ClientConfig::with_servers([addr.to_string()])
    }
}

/// The error of a connection attempt that must fail.
async fn refused(cfg: ClientConfig) -> String {
    match Client::connect(cfg).await {
        Ok(_) => panic!("a client that should be refused got in"),
        Err(e) => e.to_string(),
    }
}

/// The next message's payload (membership events skipped).
async fn next_message(events: &flume::Receiver<Event>) -> Vec<u8> {
    next_event(events, WAIT, |e| match e {
        Event::Message { payload, .. } => Some(payload.to_vec()),
        Event::Disconnected { .. } => panic!("the TLS connection was dropped"),
        _ => None,
    })
    .await
}

/// Publishes `n` messages of varied sizes (some larger than a TLS record)
/// from one TLS client to another and checks they arrive whole, in order.
async fn publishes_and_receives_in_order(ip: &str, backend: &str) {
    let dir = TempDir::new("tls-order");
    let extra = format!("io_backend = {backend}");
    let (node, ca) = tokio::task::block_in_place(|| tls_server(&dir, ip, &extra));
    let sub = Client::connect(tls_client_config(node.addr, &ca))
        .await
        .expect("subscriber connects over TLS");
    sub.join("tls.order").await.expect("join");
    let events = sub.events();
    let publisher = Client::connect(tls_client_config(node.addr, &ca))
        .await
        .expect("publisher connects over TLS");
    let payload = |i: usize| {
        let len = if i % 50 == 0 { 40_000 } else { 10 + i % 300 };
        let mut p = format!("{i}:").into_bytes();
        p.resize(len, b'a' + (i % 26) as u8);
        p
    };
    const N: usize = 2_000;
    for i in 0..N {
        publisher
            .publish("tls.order", payload(i))
            .await
            .expect("publish");
    }
    for i in 0..N {
        assert_eq!(next_message(&events).await, payload(i), "message {i}");
    }
    let report = publisher.close().await;
    assert!(report.flushed, "{report:?}");
    let _ = sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_tls_publishes_and_receives_in_order_on_epoll() {
    publishes_and_receives_in_order("127.0.0.81", "epoll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_tls_publishes_and_receives_in_order_on_io_uring() {
    if !uring_here() {
        return;
    }
    publishes_and_receives_in_order("127.0.0.82", "uring").await;
}

/// A plain client gets a clear error; a raw plain HELLO is closed; a TLS
/// subscriber already there keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_to_a_tls_listener_fails_clearly_and_nothing_else_is_affected() {
    let dir = TempDir::new("tls-plain");
    let (node, ca) = tokio::task::block_in_place(|| tls_server(&dir, "127.0.0.83", ""));
    let sub = Client::connect(tls_client_config(node.addr, &ca))
        .await
        .expect("TLS subscriber");
    sub.join("tls.plain").await.expect("join");
    let events = sub.events();

    let err = refused(ClientConfig::with_servers([node.addr.to_string()])).await;
    assert!(err.contains("speaks TLS"), "{err}");
    tokio::task::block_in_place(|| {
        let mut raw = Raw::connect(node.addr);
        raw.send_bytes(&[0, 0, 0, 1, 3]); // a plain NOOP frame
        assert!(raw.closed(), "plain frames to a TLS listener are closed");
    });

    let publisher = Client::connect(tls_client_config(node.addr, &ca))
        .await
        .expect("TLS publisher");
    publisher
        .publish("tls.plain", "still here")
        .await
        .expect("publish");
    assert_eq!(next_message(&events).await, b"still here");
    let _ = publisher.close().await;
    let _ = sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_another_ca_is_refused() {
    let dir = TempDir::new("tls-other-ca");
    let (node, _ca) = tokio::task::block_in_place(|| tls_server(&dir, "127.0.0.84", ""));
    let other = Ca::new(&dir, "other-ca");
    let err = refused(tls_client_config(node.addr, &other)).await;
    assert!(err.contains("TLS handshake failed"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

/// With `tls_client_auth = true`: no certificate, or one from another CA,
/// is refused; one from `tls_ca` gets in and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_auth_only_certificates_from_the_ca_get_in() {
    let dir = TempDir::new("tls-mutual");
    let ip = "127.0.0.85";
    let ca = Ca::new(&dir, "ca");
    let (cert, key) = ca.leaf(&dir, "server", &[ip]);
    let extra = format!(
        "{}\n  tls_ca = \"{}\"\n  tls_client_auth = true",
        tls_lines(&cert, &key),
        ca.pem.display()
    );
    let node =
        tokio::task::block_in_place(|| NodeProc::solo_on(&dir, ip, free_port(&[ip]), &extra));
    let with_cert = |files: (PathBuf, PathBuf)| ClientConfig {
        tls_certificate: Some(files.0.display().to_string()),
        tls_key: Some(files.1.display().to_string()),
        ..tls_client_config(node.addr, &ca)
    };

    let err = refused(tls_client_config(node.addr, &ca)).await;
    assert!(err.contains("CertificateRequired"), "{err}");
    let other = Ca::new(&dir, "other-ca");
    let untrusted = with_cert(other.leaf(&dir, "mallory", &["mallory"]));
    let refused = Client::connect(untrusted).await;
    assert!(
        refused.is_err(),
        "a client certificate from another CA got in"
    );

    let trusted = with_cert(ca.leaf(&dir, "alice", &["alice"]));
    let alice = Client::connect(trusted).await.expect("alice gets in");
    alice.join("tls.mutual").await.expect("join");
    let events = alice.events();
    alice.publish("tls.mutual", "hi").await.expect("publish");
    assert_eq!(next_message(&events).await, b"hi");
    let _ = alice.close().await;
}

/// True when the node `c` is connected to lists `others` as peers, all up
/// (its stats, asked over TLS).
async fn mesh_up(c: &Client, others: &[String]) -> bool {
    let Ok(st) = c.stats().await else {
        return false;
    };
    let Some(peers) = st["peers"].as_array() else {
        return false;
    };
    peers.len() == others.len()
        && others.iter().all(|n| {
            peers
                .iter()
                .any(|p| p["name"] == n.as_str() && p["state"] == "up")
        })
}

/// Three nodes whose links and clients are all TLS (each node with its own
/// certificate, one CA): the mesh comes up, and messages from node1 reach
/// members on node2 and node3 whole and in order.
async fn a_cluster_over_tls_delivers_in_order(tag: &str, backend: &str) {
    let mut c = Cluster::new(tag);
    let ca = Ca::new(&c.dir, "ca");
    for i in 0..3 {
        let (cert, key) = ca.leaf(&c.dir, &name(i), &[&ip(i).to_string()]);
        let extra = format!(
            "{QUICK}\n io_backend = {backend}\n {}\n tls_ca = \"{}\"",
            tls_lines(&cert, &key),
            ca.pem.display()
        );
        let conf = c.conf(&format!("{}.conf", name(i)), 3, &extra);
        c.spawn(i, conf);
    }
    tokio::task::block_in_place(|| c.ready());
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = Client::connect(tls_client_config(c.addr(i), &ca))
            .await
            .expect("TLS client connects");
        clients.push(client);
    }
    for (i, client) in clients.iter().enumerate() {
        let others: Vec<String> = (0..3).filter(|&j| j != i).map(name).collect();
        let what = format!("{}: TLS links up", name(i));
        wait_for_async(&what, WAIT, || mesh_up(client, &others)).await;
    }
    let streams: Vec<_> = clients.iter().map(Client::events).collect();
    for client in &clients[1..] {
        client.join("tls.mesh").await.expect("join");
    }
    const N: usize = 1_000;
    let payload = |i: usize| {
        let mut p = format!("{i}:").into_bytes();
        p.resize(if i % 100 == 0 { 30_000 } else { 20 + i % 200 }, b'x');
        p
    };
    for i in 0..N {
        clients[0]
            .publish("tls.mesh", payload(i))
            .await
            .expect("publish");
    }
    for events in &streams[1..] {
        for i in 0..N {
            assert_eq!(next_message(events).await, payload(i), "message {i}");
        }
    }
    for client in &clients {
        let _ = client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_over_tls_delivers_in_order_on_epoll() {
    a_cluster_over_tls_delivers_in_order("tls-mesh-epoll", "epoll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_over_tls_delivers_in_order_on_io_uring() {
    if !uring_here() {
        return;
    }
    a_cluster_over_tls_delivers_in_order("tls-mesh-uring", "uring").await;
}

/// A peer HELLO over TLS from a connection that presented no certificate
/// is refused with NOT_ALLOWED, even from a peer's own address; the real
/// links stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_tls_without_a_certificate_is_refused() {
    use msgc::protocol::{decode, ErrorCode, Frame, Hello, NodeName, Role, PROTOCOL_VERSION};
    use std::io::{Read, Write};
    let mut c = Cluster::new("tls-peer-nocert");
    let ca = Ca::new(&c.dir, "ca");
    for i in 0..2 {
        let (cert, key) = ca.leaf(&c.dir, &name(i), &[&ip(i).to_string()]);
        let extra = format!(
            "{QUICK}\n {}\n tls_ca = \"{}\"",
            tls_lines(&cert, &key),
            ca.pem.display()
        );
        let conf = c.conf(&format!("{}.conf", name(i)), 2, &extra);
        c.spawn(i, conf);
    }
    tokio::task::block_in_place(|| c.ready());
    let node1 = Client::connect(tls_client_config(c.addr(0), &ca))
        .await
        .expect("client");
    let others = [name(1)];
    wait_for_async("the TLS link up", WAIT, || mesh_up(&node1, &others)).await;

    let addr = c.addr(0);
    let config = msgc::tls::client_config(&ca.pem.display().to_string(), None).expect("config");
    let answer = tokio::task::block_in_place(|| {
        let server = rustls::pki_types::ServerName::try_from(ip(0).to_string()).expect("name");
        let tls = rustls::ClientConnection::new(config, server).expect("session");
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::new(ip(1), 0).into())
            .expect("bind node2's address");
        sock.connect_timeout(&addr.into(), WAIT).expect("connect");
        let tcp: std::net::TcpStream = sock.into();
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut s = rustls::StreamOwned::new(tls, tcp);
        let hello = Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Peer,
            name: Some(NodeName::from_str_checked(&name(1)).expect("name")),
            credentials: Default::default(),
            features: 0,
            max_message_size: 0,
        });
        s.write_all(&hello.to_bytes()).expect("HELLO over TLS");
        let mut buf = bytes::BytesMut::new();
        for _ in 0..100 {
            if let Ok(Some(frame)) = decode(&mut buf, 1 << 20) {
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        None
    });
    match answer {
        Some(Frame::Error { code, message }) => {
            assert_eq!(code, ErrorCode::NOT_ALLOWED, "{message}");
            assert!(message.contains("certificate"), "{message}");
        }
        other => panic!("expected ERROR NOT_ALLOWED, got {other:?}"),
    }
    assert!(
        mesh_up(&node1, &others).await,
        "the real link was disturbed"
    );
    let _ = node1.close().await;
}

/// A child process killed on drop (a failing test leaves none behind).
struct Killed(Option<std::process::Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `msgc --tls-ca --tls-cert --tls-key` subscribes and publishes through a
/// server with client auth; without the flags it fails in one clear line.
#[test]
fn the_cli_speaks_tls_with_a_client_certificate() {
    use std::process::{Command, Stdio};
    let dir = TempDir::new("tls-cli");
    let ip = "127.0.0.86";
    let ca = Ca::new(&dir, "ca");
    let (cert, key) = ca.leaf(&dir, "server", &[ip]);
    let extra = format!(
        "{}\n  tls_ca = \"{}\"\n  tls_client_auth = true",
        tls_lines(&cert, &key),
        ca.pem.display()
    );
    let node = NodeProc::solo_on(&dir, ip, free_port(&[ip]), &extra);
    let (ccert, ckey) = ca.leaf(&dir, "cli", &["cli"]);
    let server = node.addr.to_string();
    let tls_args: Vec<String> = vec![
        "--server".into(),
        server.clone(),
        "--tls-ca".into(),
        ca.pem.display().to_string(),
        "--tls-cert".into(),
        ccert.display().to_string(),
        "--tls-key".into(),
        ckey.display().to_string(),
    ];
    let msgc = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_msgc"))
            .args(&tls_args)
            .args(args)
            .output()
            .expect("run msgc")
    };
    let sub = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(&tls_args)
        .args(["sub", "news", "--count", "2", "--timeout", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn msgc sub");
    let mut sub = Killed(Some(sub));
    wait_for("msgc sub to join over TLS", WAIT, || {
        let out = msgc(&["members", "news"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).lines().count() == 1
    });
    for m in ["one", "two"] {
        let out = msgc(&["pub", "news", m]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = sub
        .0
        .take()
        .expect("sub")
        .wait_with_output()
        .expect("sub exits");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");

    let plain = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(["--server", &server, "ping"])
        .output()
        .expect("run msgc");
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success(), "a plain ping succeeded");
    assert!(
        err.contains("speaks TLS") && err.trim().lines().count() == 1,
        "{err}"
    );
}

/// Bad TLS settings are errors at the line that names them.
#[test]
fn tls_options_are_checked_at_load_with_their_line() {
    let dir = TempDir::new("tls-config");
    let ca = Ca::new(&dir, "ca");
    let (cert, key) = ca.leaf(&dir, "server", &["127.0.0.1"]);
    let (_, other_key) = ca.leaf(&dir, "other", &["127.0.0.1"]);
    let not_pem = dir.write("not.pem", "hello\n");
    let missing = dir.0.join("missing.pem");
    let parse = |lines: &str| {
        let text = format!("msgc_server {{\n{lines}\n}}\n");
        msgc::config::Config::parse_str("tls.conf", &text)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let line = |opt: &str, p: &PathBuf| format!("  {opt} = \"{}\"", p.display());

    let ok = format!(
        "{}\n{}",
        line("tls_certificate", &cert),
        line("tls_key", &key)
    );
    assert_eq!(parse(&ok), Ok(()));
    let cases = [
        (
            format!(
                "{}\n{}",
                line("tls_certificate", &missing),
                line("tls_key", &key)
            ),
            "tls.conf:2:",
            "cannot read",
        ),
        (
            format!(
                "{}\n{}",
                line("tls_certificate", &not_pem),
                line("tls_key", &key)
            ),
            "tls.conf:2:",
            "no CERTIFICATE",
        ),
        (
            format!(
                "{}\n{}",
                line("tls_certificate", &cert),
                line("tls_key", &not_pem)
            ),
            "tls.conf:3:",
            "PRIVATE KEY",
        ),
        (
            format!(
                "{}\n{}",
                line("tls_certificate", &cert),
                line("tls_key", &other_key)
            ),
            "tls.conf:3:",
            "does not go with",
        ),
        (
            line("tls_certificate", &cert),
            "tls.conf:2:",
            "without tls_key",
        ),
        (
            format!("{ok}\n  tls_client_auth = true"),
            "tls.conf:4:",
            "needs tls_ca",
        ),
        (
            format!("{ok}\n  tls_client_auth = maybe"),
            "tls.conf:4:",
            "true or false",
        ),
        (
            format!("{ok}\n  peers = [ a = \"127.0.0.1\" b = \"127.0.0.2\" ]"),
            "tls.conf:2:",
            "needs tls_ca",
        ),
    ];
    for (lines, at, what) in cases {
        let err = parse(&lines).expect_err(&lines);
        assert!(err.contains(at) && err.contains(what), "{lines}\n=> {err}");
    }
}

/// An idle TLS client costs the server less than [`PER_IDLE_TLS`], even
/// after it sent and received messages larger than a TLS record: what a
/// read or a write used while it was busy is not kept once it is quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_client_costs_under_32_kib() {
    const N: usize = 500;
    crate::util::raise_fd_limit(2 * N as u64 + 200);
    let dir = TempDir::new("tls-idle");
    let (node, ca) = tokio::task::block_in_place(|| tls_server(&dir, "127.0.0.87", ""));
    // Connects, joins its own group, and gets its own messages of 40 and
    // 70 KB back: several TLS records each, the second filling rustls's
    // plaintext buffer while its records are read.
    let busy_then_idle = |i: usize| {
        let cfg = tls_client_config(node.addr, &ca);
        async move {
            let c = Client::connect(cfg).await.expect("TLS client");
            let g = format!("tls.idle.{i:04}");
            c.join(&g).await.expect("join");
            let events = c.events();
            for len in [40_000, 70_000] {
                c.publish(&g, vec![b'x'; len]).await.expect("publish");
                assert_eq!(next_message(&events).await.len(), len);
            }
            c
        }
    };
    // One client first: what the first handshake sets up once is not
    // counted per client.
    let first = busy_then_idle(N).await;
    let before = tokio::task::block_in_place(|| crate::memory::settled_rss(&node));
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        clients.push(busy_then_idle(i).await);
    }
    let after = tokio::task::block_in_place(|| crate::memory::settled_rss(&node));
    let per = after.saturating_sub(before) / N as u64;
    eprintln!("memory: {N} idle TLS clients, RSS {before} -> {after} bytes: {per} bytes each");
    assert!(
        per < PER_IDLE_TLS,
        "an idle TLS client joined to one group costs {per} bytes (bound {PER_IDLE_TLS})"
    );
    for c in clients {
        let _ = c.close().await;
    }
    let _ = first.close().await;
}

/// Bytes of server memory an idle TLS client joined to one group may cost.
const PER_IDLE_TLS: u64 = 32 * 1024;

/// A dialling node checks that its peer's certificate carries the host
/// written in `peers`, not only that `tls_ca` signed it, and says why the
/// link is not up. node1 lists node2 at 127.0.0.122 and node3 at
/// 127.0.0.123; both certificates come from the cluster's CA, but node2's
/// names `node2` and 127.0.0.129, not 127.0.0.122. node2 and node3 list
/// node1 at a port where nothing listens, so every connection between
/// node1 and them is node1's dial (an accepting node checks a peer
/// certificate's CA, not its names). node1's dial of node3 links up; its
/// dials of node2 never do, and node2's `link_error` in node1's stats
/// says the certificate is not valid for 127.0.0.122, while node2 serves
/// its own clients; said once in node1's log, and forgotten when node2 is
/// gone (a dial that does not connect has no TLS reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialling_node_refuses_a_peer_certificate_for_another_host() {
    use crate::cluster::{config_text, peer_of};
    let dir = TempDir::new("tls-peer-host");
    let ips = ["127.0.0.121", "127.0.0.122", "127.0.0.123"];
    let port = free_port(&ips);
    let nowhere = (0..10)
        .map(|_| free_port(&ips[..1]))
        .find(|&p| p != port)
        .expect("a second free port");
    let node1_unreachable = format!("{}:{nowhere}", ips[0]);
    let ca = Ca::new(&dir, "ca");
    let certs = [
        ca.leaf(&dir, "node1", &[ips[0]]),
        ca.leaf(&dir, "node2", &["node2", "127.0.0.129"]),
        ca.leaf(&dir, "node3", &[ips[2]]),
    ];
    let peers: [Vec<(&str, &str)>; 3] = [
        vec![("node1", ips[0]), ("node2", ips[1]), ("node3", ips[2])],
        vec![("node1", &node1_unreachable), ("node2", ips[1])],
        vec![("node1", &node1_unreachable), ("node3", ips[2])],
    ];
    // node1's log is read (its refusals are operator events); the others
    // run as usual.
    let mut node1 = None;
    let mut nodes = Vec::new();
    for (i, list) in peers.iter().enumerate() {
        let list: Vec<(String, String)> = list
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect();
        let (cert, key) = &certs[i];
        // A short lame duck: node1 is stopped with its client still on.
        let extra = format!(
            "{QUICK}\n lame_duck_duration = 0.1\n {}\n tls_ca = \"{}\"",
            tls_lines(cert, key),
            ca.pem.display()
        );
        let node = format!("node{}", i + 1);
        let conf = dir.write(&format!("{node}.conf"), &config_text(port, &list, &extra));
        let addr = SocketAddr::new(ips[i].parse().expect("ip"), port);
        if i == 0 {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_msgc-server"));
            cmd.arg("--config").arg(&conf).args(["--node", &node]);
            node1 = Some((crate::ops::Logged::spawn_cmd(cmd), addr));
        } else {
            nodes.push(NodeProc::spawn(conf, &node, addr));
        }
    }
    let (mut log1, addr1) = node1.expect("node1");
    tokio::task::block_in_place(|| {
        log1.wait_line("node1's banner", |l| l.starts_with("msgc-server: node "));
        nodes.iter().for_each(NodeProc::wait_ready)
    });
    let c1 = Client::connect(tls_client_config(addr1, &ca))
        .await
        .expect("a TLS client of node1");
    let c2 = Client::connect(ClientConfig {
        tls_server_name: Some("node2".into()),
        ..tls_client_config(nodes[0].addr, &ca)
    })
    .await
    .expect("a TLS client of node2, checking the name its certificate carries");
    let (c1, c2) = (&c1, &c2);

    // The control: node1 dials node3, whose certificate carries its host.
    wait_for_async("node1's dial of node3 to link up", WAIT, || async move {
        let st = c1.stats().await.expect("node1's stats");
        peer_of(&st, "node3").is_some_and(|p| p["state"] == "up" && p["direction"] == "out")
    })
    .await;

    // node1 dials node2 every reconnect_interval; each dial ends in its
    // TLS handshake, and says why.
    wait_for_async("node1 to say why node2 is not up", WAIT, || async move {
        let st = c1.stats().await.expect("node1's stats");
        let link = peer_of(&st, "node2").cloned().unwrap_or_default();
        assert_ne!(
            link["state"], "up",
            "node1 linked to node2, whose certificate is for another host: {link}"
        );
        link["link_error"].is_string()
    })
    .await;
    let st1 = c1.stats().await.expect("node1's stats");
    let link = peer_of(&st1, "node2").expect("node1 lists node2");
    assert_ne!(link["state"], "up", "{link}");
    let why = link["link_error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("TLS: ") && why.contains("not valid for name") && why.contains(ips[1]),
        "{why}"
    );
    let control = peer_of(&st1, "node3").expect("node1 lists node3");
    assert_eq!(control["state"], "up", "{control}");
    assert!(control["link_error"].is_null(), "{control}");
    let st2 = c2.stats().await.expect("node2's stats");
    let back = peer_of(&st2, "node1").expect("node2 lists node1");
    assert_ne!(back["state"], "up", "{back}");

    // Said at every debug_level, once for as long as the reason stays the
    // same: two more dials later (node2 accepts nothing else), one line.
    let dials = |st: &serde_json::Value| crate::cluster::num(&st["totals"]["connections_total"]);
    let before = dials(&st2);
    wait_for_async("two more of node1's dials of node2", WAIT, || async move {
        dials(&c2.stats().await.expect("node2's stats")) >= before + 2
    })
    .await;

    // node2 was up and serving all along.
    c2.join("tls.host").await.expect("join on node2");
    let events = c2.events();
    c2.publish("tls.host", "served")
        .await
        .expect("publish on node2");
    assert_eq!(next_message(&events).await, b"served");

    // Once node2 is gone, a dial does not connect at all: the TLS reason
    // no longer stands.
    tokio::task::block_in_place(|| nodes[0].kill9());
    wait_for_async("node1 to forget the TLS reason", WAIT, || async move {
        let st = c1.stats().await.expect("node1's stats");
        peer_of(&st, "node2").is_some_and(|p| p["link_error"].is_null())
    })
    .await;

    assert_eq!(
        tokio::task::block_in_place(|| log1.terminate()),
        Some(0),
        "node1 exits 0"
    );
    let said: Vec<String> = log1
        .log()
        .lines()
        .filter(|l| l.contains("peer link not up: its TLS handshake failed"))
        .map(str::to_owned)
        .collect();
    assert_eq!(said.len(), 1, "{}", log1.log());
    assert!(
        said[0].contains("node2") && said[0].contains("not valid for name"),
        "{said:?}"
    );
}

/// A certificate replaced under the same file names is used after a
/// restart (README): before it, clients trusting the old CA get in and
/// the new CA's are refused; after it, the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_in_its_files_is_used_after_a_restart() {
    let ip = "127.0.0.88";
    let dir = TempDir::new("tls-swap");
    let old_ca = Ca::new(&dir, "old-ca");
    let new_ca = Ca::new(&dir, "new-ca");
    let (cert, key) = old_ca.leaf(&dir, "server", &[ip]);
    let port = crate::util::restartable_port(&[ip]);
    let mut node =
        tokio::task::block_in_place(|| NodeProc::solo_on(&dir, ip, port, &tls_lines(&cert, &key)));
    let gets_in = |ca: &Ca| Client::connect(tls_client_config(node.addr, ca));
    let c = gets_in(&old_ca).await.expect("the old CA's client");
    let _ = c.close().await;
    assert!(
        gets_in(&new_ca).await.is_err(),
        "the new CA's client before"
    );
    // New files under the old names.
    let (new_cert, new_key) = new_ca.leaf(&dir, "swap", &[ip]);
    std::fs::rename(&new_cert, &cert).expect("replace the certificate");
    std::fs::rename(&new_key, &key).expect("replace the key");
    tokio::task::block_in_place(|| node.restart());
    let gets_in = |ca: &Ca| Client::connect(tls_client_config(node.addr, ca));
    // The killed io_uring process's listener may linger a moment (see
    // `ops::restarted_right_after_sigkill_serves_every_time`): connections
    // to it are reset, then refused, until the new server has the port.
    let new_ca = &new_ca;
    wait_for_async("the new CA's client to get in", WAIT, || async move {
        match gets_in(new_ca).await {
            Ok(c) => {
                let _ = c.close().await;
                true
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(gets_in(&old_ca).await.is_err(), "the old CA's client after");
}
