//! Peer authentication (issue 11): nodes holding the cluster key link up
//! and deliver; a peer that cannot prove the key, from a peer's own
//! address, is refused and counted and never disturbs the real link; a
//! replayed handshake is refused; nodes with different keys do not link;
//! the key can come from a file, and a missing file is a config error.

use crate::cluster::{
    config_text, ip, name, num, payload, peer_of, plain_peers, stats, until, Cluster, Member, QUICK,
};
use crate::util::Raw;
use bytes::Bytes;
use msgc::cluster::auth::{self, Side};
use msgc::config::ClusterKey;
use msgc::protocol::{ErrorCode, Frame, Hello, NodeName, Role, AUTH_LEN, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_msgc-server");
const KEY: &str = "4f0c2a9e61d7b3855e2c1f7a90d4b6e3";

fn with_key(key: &str) -> String {
    format!("{QUICK}\n cluster_key = \"{key}\"")
}

fn auth_failures(addr: SocketAddr) -> u64 {
    num(&stats(addr)["totals"]["peer_auth_failures"])
}

/// Peer `name`'s link as node `addr` sees it: (state, since, reconnects).
fn link(addr: SocketAddr, peer: &str) -> (String, f64, u64) {
    let st = stats(addr);
    let p = peer_of(&st, peer).expect("peer listed");
    let state = p["state"].as_str().unwrap_or("?").to_string();
    let since = p["since_unix"].as_f64().expect("since_unix");
    (state, since, num(&p["reconnects"]))
}

fn peer_hello(node: &str, credentials: Vec<u8>) -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Peer,
        name: Some(NodeName::from_str_checked(node).expect("name")),
        credentials: Bytes::from(credentials),
        features: 0,
        max_message_size: 0,
    })
}

fn expect_not_allowed(r: &mut Raw, what: &str) {
    match r.recv() {
        Some(Frame::Error { code, message }) => {
            assert_eq!(code, ErrorCode::NOT_ALLOWED, "{what}: {message}")
        }
        other => panic!("{what}: expected ERROR NOT_ALLOWED, got {other:?}"),
    }
    assert!(r.closed(), "{what}: connection not closed");
}

/// A dialler written from PROTOCOL.md: says HELLO as `me` to `acceptor`
/// (from `from`) holding `key`, answers the CHALLENGE, and returns the
/// connection, what the acceptor answered last, and every byte it sent.
fn fake_dial(
    to: SocketAddr,
    from: std::net::IpAddr,
    me: &str,
    acceptor: &str,
    key: &ClusterKey,
) -> (Raw, Option<Frame>, Vec<u8>) {
    let nonce_d = [0x5a; AUTH_LEN];
    let mut sent = Vec::new();
    let mut r = Raw::connect_from(to, from);
    let hello = peer_hello(me, auth::credentials(&nonce_d)).to_bytes();
    r.send_bytes(&hello);
    sent.extend_from_slice(&hello);
    let Some(Frame::Challenge { nonce, mac }) = r.recv() else {
        panic!("expected CHALLENGE")
    };
    let t = |side| {
        auth::transcript(
            side,
            1,
            me.as_bytes(),
            acceptor.as_bytes(),
            &nonce_d,
            &nonce,
        )
    };
    assert!(
        auth::verify(key, &t(Side::Acceptor), &mac),
        "the acceptor's proof checks out"
    );
    let proof = Frame::Proof {
        mac: auth::mac(key, &t(Side::Dialler)),
    }
    .to_bytes();
    r.send_bytes(&proof);
    sent.extend_from_slice(&proof);
    let answer = r.recv();
    (r, answer, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_key_link_up_and_deliver() {
    let c = Cluster::start("auth-mesh", 3, &with_key(KEY)).await;
    let m3 = Member::joined(c.addr(2), "orders").await;
    let m1 = Member::connect(c.addr(0)).await;
    for k in 0..20 {
        m1.publish("orders", payload("a", k, 16)).await;
    }
    m3.wait_messages("orders", 20).await;
    for i in 0..3 {
        assert_eq!(auth_failures(c.addr(i)), 0, "{}", name(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_peer_without_the_key_is_refused_and_the_real_link_untouched() {
    let c = Cluster::start("auth-fake", 2, &with_key(KEY)).await;
    let (node1, node2) = (c.addr(0), c.addr(1));
    let m2 = Member::joined(node2, "g").await;
    let m1 = Member::connect(node1).await;
    m1.publish("g", payload("a", 0, 8)).await;
    m2.wait_messages("g", 1).await;
    let before = link(node1, "node2");
    assert_eq!(before.0, "up");

    // From node2's own address, as node2: no credentials at all.
    let mut r = Raw::connect_from(node1, ip(1));
    r.send(&peer_hello("node2", Vec::new()));
    expect_not_allowed(&mut r, "no credentials");

    // With credentials but the wrong key: the challenge cannot be
    // answered, and a made-up proof is refused.
    let wrong = ClusterKey::new(b"not-the-cluster-key-at-all").expect("key");
    let mut r = Raw::connect_from(node1, ip(1));
    r.send(&peer_hello("node2", auth::credentials(&[7; AUTH_LEN])));
    let Some(Frame::Challenge { nonce, mac }) = r.recv() else {
        panic!("expected CHALLENGE")
    };
    let t = |side| auth::transcript(side, 1, b"node2", b"node1", &[7; AUTH_LEN], &nonce);
    assert!(!auth::verify(&wrong, &t(Side::Acceptor), &mac));
    r.send(&Frame::Proof {
        mac: auth::mac(&wrong, &t(Side::Dialler)),
    });
    expect_not_allowed(&mut r, "wrong key");

    // Credentials of an unknown form.
    let mut r = Raw::connect_from(node1, ip(1));
    r.send(&peer_hello("node2", vec![9; 5]));
    expect_not_allowed(&mut r, "unknown credentials");

    until("node1 to count 3 auth failures", || {
        auth_failures(node1) == 3
    })
    .await;
    // The real link never moved, and still carries messages.
    assert_eq!(link(node1, "node2"), before);
    m1.publish("g", payload("a", 1, 8)).await;
    m2.wait_messages("g", 2).await;
    assert_eq!(m2.disconnects(), 0);
    assert_eq!(link(node1, "node2"), before);
    assert_eq!(auth_failures(node2), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_is_refused() {
    // node1 alone; the test plays node2 (127.0.0.2) with the key.
    let mut c = Cluster::new("auth-replay");
    let conf = c.conf("cluster.conf", 2, &with_key(KEY));
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    let key = ClusterKey::new(KEY.as_bytes()).expect("key");

    let (mut good, answer, captured) = fake_dial(node1, ip(1), "node2", "node1", &key);
    assert!(
        matches!(answer, Some(Frame::Welcome(ref w)) if w.node.as_str() == "node1"),
        "an authenticated dialler is welcomed: {answer:?}"
    );
    until("node1 to see node2 up", || link(node1, "node2").0 == "up").await;
    let before = link(node1, "node2");

    // The same bytes again, on a new connection from the same address.
    let mut r = Raw::connect_from(node1, ip(1));
    r.send_bytes(&captured);
    match r.recv() {
        Some(Frame::Challenge { .. }) => {}
        other => panic!("expected a fresh CHALLENGE, got {other:?}"),
    }
    expect_not_allowed(&mut r, "replayed PROOF");
    until("node1 to count the replay", || auth_failures(node1) == 1).await;
    assert_eq!(link(node1, "node2"), before, "the real link is untouched");

    // The authenticated link still works: it answers a PING.
    good.send(&Frame::Ping { token: 7 });
    let mut ponged = false;
    for _ in 0..100 {
        match good.recv() {
            Some(Frame::Pong { token: 7 }) => {
                ponged = true;
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(ponged, "the link answers PING");
}

/// A peer that proves the key is still only trusted to speak for its own
/// members: a FORWARD whose sender is another node's member closes its
/// link as a protocol error, and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_peer_speaking_for_another_node_loses_its_link() {
    use msgc::protocol::snapshot_flags::{FIRST, LAST};
    use msgc::protocol::{GroupName, MemberId};
    let mut c = Cluster::new("auth-ids");
    let conf = c.conf("cluster.conf", 3, &with_key(KEY));
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    let key = ClusterKey::new(KEY.as_bytes()).expect("key");
    let errors = || num(&stats(node1)["totals"]["protocol_errors"]);
    let before = errors();

    let (mut fake, answer, _) = fake_dial(node1, ip(1), "node2", "node1", &key);
    assert!(
        matches!(answer, Some(Frame::Welcome(_))),
        "the key is proven: {answer:?}"
    );
    fake.send(&Frame::Snapshot {
        flags: FIRST | LAST,
        entries: Vec::new(),
    });
    until("node1 to see node2 up", || link(node1, "node2").0 == "up").await;
    fake.send(&Frame::Forward {
        group: GroupName::from_str_checked("g").expect("group"),
        sender: MemberId::from_str_checked("node3/0.1.x").expect("member id"),
        seq: None,
        payload: Bytes::from_static(b"spoofed"),
    });
    loop {
        match fake.recv() {
            Some(Frame::Error { code, message }) => {
                assert_eq!(code, ErrorCode::NOT_ALLOWED, "{message}");
                break;
            }
            // Membership news or pings that were on their way.
            Some(_) => {}
            None => panic!("closed without an ERROR"),
        }
    }
    assert!(fake.closed(), "the link is closed");
    until("node1 to count the protocol error", || {
        errors() == before + 1
    })
    .await;
    until("node1 to see node2 down", || link(node1, "node2").0 != "up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_keys_do_not_link() {
    let mut c = Cluster::new("auth-diff");
    let peers = plain_peers(2);
    let a = c.dir.write(
        "a.conf",
        &config_text(c.port, &peers, &with_key("key-of-node-one-0123456789")),
    );
    let b = c.dir.write(
        "b.conf",
        &config_text(c.port, &peers, &with_key("key-of-node-two-0123456789")),
    );
    c.spawn(0, a);
    c.spawn(1, b);
    c.ready();
    let (node1, node2) = (c.addr(0), c.addr(1));
    // Each refuses the other's proof when it dials (and re-dials).
    until("both nodes to refuse a proof", || {
        auth_failures(node1) >= 2 && auth_failures(node2) >= 2
    })
    .await;
    assert_ne!(link(node1, "node2").0, "up");
    assert_ne!(link(node2, "node1").0, "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_works_and_a_missing_one_is_a_config_error() {
    let mut c = Cluster::new("auth-file");
    let file = c.dir.write("cluster.key", &format!("{KEY}\n"));
    let extra = format!("{QUICK}\n cluster_key_file = \"{}\"", file.display());
    let conf = c.conf("cluster.conf", 2, &extra);
    // --check-config shows where the key comes from, never the key.
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(&conf)
        .args(["--node", "node1"])
        .output()
        .expect("run --check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(KEY), "{text}");
    assert!(text.contains("cluster_key_file = \""), "{text}");
    for i in 0..2 {
        c.spawn(i, conf.clone());
    }
    c.ready();
    c.wait_mesh(&[0, 1]).await;
    let m2 = Member::joined(c.addr(1), "f").await;
    let m1 = Member::connect(c.addr(0)).await;
    m1.publish("f", payload("a", 0, 8)).await;
    m2.wait_messages("f", 1).await;

    // An inline key is shown as "<secret>".
    let inline = c.dir.write(
        "inline.conf",
        &config_text(c.port, &plain_peers(2), &with_key(KEY)),
    );
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(&inline)
        .output()
        .expect("run --check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(KEY), "{text}");
    assert!(text.contains("cluster_key = \"<secret>\""), "{text}");

    let missing = c.dir.0.join("no-such.key");
    let bad = c.dir.write(
        "bad.conf",
        &config_text(
            c.port,
            &plain_peers(2),
            &format!("cluster_key_file = \"{}\"", missing.display()),
        ),
    );
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(&bad)
        .output()
        .expect("run --check-config");
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.conf:") && err.contains("cluster_key_file: cannot read"),
        "{err}"
    );
}

/// Starts `msgc-server --config CONF --node node1` and returns its
/// standard error up to the banner's `msgc_client {` line (bounded), then
/// stops it.
fn start_up_log(conf: &std::path::Path) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(conf)
        .args(["--node", "node1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn msgc-server");
    let err = child.stderr.take().expect("piped stderr");
    let (tx, rx) = flume::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let end = std::time::Instant::now() + crate::util::WAIT;
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
        let last = line.trim() == "msgc_client {";
        seen.push(line);
        if last {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.trim() == "msgc_client {"),
        "no banner:\n{}",
        seen.join("\n")
    );
    seen
}

#[test]
fn start_up_warns_without_a_key_and_never_prints_one() {
    let c = Cluster::new("auth-banner");
    let without = c.conf("none.conf", 2, QUICK);
    let log = start_up_log(&without);
    assert!(
        log.iter().any(|l| l.contains("NO CLUSTER KEY")),
        "{}",
        log.join("\n")
    );
    let with = c.conf("key.conf", 2, &with_key(KEY));
    let log = start_up_log(&with).join("\n");
    assert!(!log.contains("NO CLUSTER KEY"), "{log}");
    assert!(!log.contains(KEY), "{log}");
    assert!(log.contains("cluster_key = \"<secret>\""), "{log}");
}

/// Dials `to` as node2 from 127.0.0.2 holding `key`: true when welcomed,
/// false when the acceptor's proof does not match `key` or it refuses.
fn dial_as_node2(to: SocketAddr, key: &ClusterKey) -> bool {
    let nonce_d = [0x3c; AUTH_LEN];
    let mut r = Raw::connect_from(to, ip(1));
    r.send(&peer_hello("node2", auth::credentials(&nonce_d)));
    let Some(Frame::Challenge { nonce, mac }) = r.recv() else {
        return false;
    };
    let t = |side| auth::transcript(side, 1, b"node2", b"node1", &nonce_d, &nonce);
    if !auth::verify(key, &t(Side::Acceptor), &mac) {
        return false;
    }
    r.send(&Frame::Proof {
        mac: auth::mac(key, &t(Side::Dialler)),
    });
    matches!(r.recv(), Some(Frame::Welcome(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_key_for_the_next_handshakes() {
    let mut c = Cluster::new("auth-reload");
    let conf = c.conf("cluster.conf", 2, &with_key(KEY));
    c.spawn(0, conf);
    c.ready();
    let node1 = c.addr(0);
    let (old, new) = (
        ClusterKey::new(KEY.as_bytes()).expect("key"),
        ClusterKey::new(b"the-next-cluster-key-0123456789").expect("key"),
    );
    assert!(!dial_as_node2(node1, &new), "the new key before the reload");
    c.conf(
        "cluster.conf",
        2,
        &with_key("the-next-cluster-key-0123456789"),
    );
    c.nodes[0].signal(libc::SIGHUP);
    // Each try is a new connection; the first ones may precede the reload.
    until("the new key to be in force", || dial_as_node2(node1, &new)).await;
    assert!(!dial_as_node2(node1, &old), "the old key no longer works");
}
