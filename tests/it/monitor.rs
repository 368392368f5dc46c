//! The HTTP monitoring endpoint: `msgc-server` processes with `monitor`
//! set (or `--monitor`), and one in-process server for a stalled shard.
//! Addresses 127.0.0.71–76; every wait bounded.

use crate::cluster::{config_text, QUICK};
use crate::flowkit::{group, join, raw_client};
use crate::util::{
    free_port, http_get, http_raw, restartable_port, wait_for, HttpReply, NodeProc, TempDir,
    TestServer, WAIT,
};
use bytes::Bytes;
use msgc::protocol::Frame;
use prometheus_parse::{Scrape, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

/// A port on `ip` free now and other than `not`.
fn another_port(ip: &str, not: u16) -> u16 {
    for _ in 0..100 {
        let p = free_port(&[ip]);
        if p != not {
            return p;
        }
    }
    panic!("no second free port on {ip}");
}

fn get(mon: SocketAddr, path: &str) -> HttpReply {
    http_get(mon, path).unwrap_or_else(|| panic!("no HTTP answer to GET {path} from {mon}"))
}

/// Waits until the endpoint answers `/healthz` with 200.
fn wait_serving(mon: SocketAddr) {
    wait_for(&format!("{mon} to serve /healthz"), WAIT, || {
        http_get(mon, "/healthz").is_some_and(|r| r.status == 200)
    });
}

/// A one-node server on `ip` with its monitor on a second port there.
fn solo(dir: &TempDir, ip: &str, extra: &str) -> (NodeProc, SocketAddr) {
    let port = free_port(&[ip]);
    let mon = addr(ip, another_port(ip, port));
    let conf = dir.write(
        "solo.conf",
        &format!(
            "msgc_server {{\n shards = 2\n monitor = \"{mon}\"\n {extra}\n}}\n\
             msgcserver_listener {{ listen \"{ip}:{port}\" {{ }} }}\n"
        ),
    );
    let node = NodeProc::start(conf, "solo", addr(ip, port));
    wait_serving(mon);
    (node, mon)
}

fn scrape(mon: SocketAddr) -> Scrape {
    let r = get(mon, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    let lines = r.body.lines().map(|l| Ok(l.to_owned()));
    Scrape::parse(lines).expect("/metrics parses as Prometheus text")
}

fn value(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        other => panic!("not a single value: {other:?}"),
    }
}

/// The sum of `metric` over its samples whose labels include `labels`.
fn sum(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| value(&x.value))
        .sum()
}

fn has(s: &Scrape, metric: &str) -> bool {
    s.samples.iter().any(|x| x.metric == metric)
}

#[test]
fn metrics_parse_and_count_traffic() {
    const N: usize = 200;
    let dir = TempDir::new("mon-metrics");
    let (node, mon) = solo(&dir, "127.0.0.71", "");
    let before = scrape(mon);
    for x in &before.samples {
        assert!(x.metric.starts_with("msgc_"), "{}", x.metric);
        assert!(
            !matches!(x.value, Value::Untyped(_)),
            "{} has no TYPE line of its own",
            x.metric
        );
        if matches!(x.value, Value::Counter(_)) {
            assert!(x.metric.ends_with("_total"), "{}", x.metric);
        }
    }
    let g = group("mon.metrics");
    let (mut sub, _) = raw_client(node.addr);
    join(&mut sub, &g);
    let (mut publisher, _) = raw_client(node.addr);
    for i in 0..N {
        publisher.send(&Frame::Publish {
            group: g.clone(),
            payload: Bytes::from(format!("message {i}")),
        });
    }
    let mut got = 0;
    for _ in 0..N * 4 {
        match sub.recv() {
            Some(Frame::Deliver { .. }) => {
                got += 1;
                if got == N {
                    break;
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(got, N, "every message delivered");
    let after = scrape(mon);
    let grew = |m: &str| sum(&after, m, &[]) - sum(&before, m, &[]);
    assert_eq!(grew("msgc_publishes_total"), N as f64);
    assert_eq!(grew("msgc_deliveries_total"), N as f64);
    assert!(grew("msgc_received_bytes_total") > 0.0);
    assert!(grew("msgc_sent_frames_total") >= N as f64);
    assert!(grew("msgc_connections_opened_total") >= 2.0);
    assert_eq!(sum(&after, "msgc_dropped_messages_total", &[]), 0.0);
    assert!(sum(&after, "msgc_connections", &[]) >= 2.0);
    assert!(sum(&after, "msgc_groups", &[]) >= 1.0);
    assert!(sum(&after, "msgc_memberships", &[]) >= 1.0);
    assert!(sum(&after, "msgc_process_resident_memory_bytes", &[]) > 0.0);
    // A shard answers within a second; on a loaded machine maybe not at
    // the first scrape.
    wait_for("both shards to answer a scrape", WAIT, || {
        sum(&scrape(mon), "msgc_shard_up", &[]) == 2.0
    });
    for m in [
        "msgc_outbound_queue_frames",
        "msgc_outbound_queue_bytes",
        "msgc_outbound_queue_max_frames",
        "msgc_outbound_queue_max_bytes",
        "msgc_inbox_messages",
        "msgc_inbox_bytes",
        "msgc_build_info",
        "msgc_uptime_seconds",
    ] {
        assert!(has(&after, m), "{m} missing");
    }
    let shards: HashSet<&str> = after
        .samples
        .iter()
        .filter(|x| x.metric == "msgc_deliveries_total")
        .filter_map(|x| x.labels.get("shard"))
        .collect();
    assert_eq!(shards, HashSet::from(["0", "1"]));
}

/// Two nodes, n1 and n2, on `ips` (one port, restartable), each with its
/// monitor on a second port of its address and `extra[i]` in its
/// settings; started and ready. Returns the nodes and their monitors.
fn pair_with_monitors(
    dir: &TempDir,
    ips: [&str; 2],
    extra: [&str; 2],
) -> (Vec<NodeProc>, Vec<SocketAddr>) {
    let port = restartable_port(&ips);
    let mons: Vec<SocketAddr> = ips
        .iter()
        .map(|ip| {
            let mut p = restartable_port(&[ip]);
            for _ in 0..100 {
                if p != port {
                    break;
                }
                p = restartable_port(&[ip]);
            }
            addr(ip, p)
        })
        .collect();
    let peers: Vec<(String, String)> =
        vec![("n1".into(), ips[0].into()), ("n2".into(), ips[1].into())];
    let nodes: Vec<NodeProc> = (0..2)
        .map(|i| {
            let text = config_text(
                port,
                &peers,
                &format!("{QUICK}\n monitor = \"{}\"\n {}", mons[i], extra[i]),
            );
            let conf = dir.write(&format!("n{}.conf", i + 1), &text);
            NodeProc::spawn(conf, &format!("n{}", i + 1), addr(ips[i], port))
        })
        .collect();
    for n in &nodes {
        n.wait_ready();
    }
    (nodes, mons)
}

#[test]
fn healthz_follows_peer_links() {
    let dir = TempDir::new("mon-health");
    let (mut nodes, mons) = pair_with_monitors(&dir, ["127.0.0.72", "127.0.0.73"], ["", ""]);
    let health = |peers: bool| {
        let path = if peers {
            "/healthz?peers=1"
        } else {
            "/healthz"
        };
        http_get(mons[0], path)
    };
    wait_for(
        "n1's link to n2 to be up (/healthz?peers=1 is 200)",
        WAIT,
        || health(true).is_some_and(|r| r.status == 200),
    );
    let peerz = get(mons[0], "/peerz").json();
    assert_eq!(peerz["up"], 1, "{peerz}");
    assert_eq!(peerz["peers"][0]["name"], "n2", "{peerz}");
    assert_eq!(peerz["peers"][0]["state"], "up", "{peerz}");
    assert_eq!(
        sum(&scrape(mons[0]), "msgc_peer_up", &[("peer", "n2")]),
        1.0
    );

    assert_eq!(nodes[1].terminate(), Some(0), "n2 stops cleanly");
    wait_for(
        "n1 to report n2 down (/healthz?peers=1 is 503)",
        WAIT,
        || health(true).is_some_and(|r| r.status == 503),
    );
    let down = health(true).expect("an answer");
    assert!(down.body.contains("peer n2"), "{}", down.body);
    let mut plain = None;
    wait_for("/healthz without ?peers=1 to be 200", WAIT, || {
        plain = health(false);
        plain.as_ref().is_some_and(|r| r.status == 200)
    });
    let plain = plain.expect("an answer");
    assert!(
        !plain.body.contains("peer n2"),
        "without ?peers=1 only the shards count: {}",
        plain.body
    );
    assert_eq!(
        sum(&scrape(mons[0]), "msgc_peer_up", &[("peer", "n2")]),
        0.0
    );
    assert_ne!(get(mons[0], "/peerz").json()["peers"][0]["state"], "up");

    nodes[1].restart();
    wait_for(
        "n1 to report n2 up again (/healthz?peers=1 is 200)",
        WAIT,
        || health(true).is_some_and(|r| r.status == 200),
    );
    wait_serving(mons[1]);
    let back = get(mons[0], "/peerz").json();
    assert_eq!(back["peers"][0]["state"], "up", "{back}");
}

#[test]
fn connz_shows_a_connection_with_groups_and_queue() {
    let dir = TempDir::new("mon-connz");
    // A reader that reads nothing keeps a queue: never stuck (under its
    // byte budget) and never idle within the test.
    let (node, mon) = solo(
        &dir,
        "127.0.0.74",
        "stuck_timeout = 60\n idle_timeout = 120\n tcpbuf_size = 4096",
    );
    let (a, b) = (group("mon.a"), group("mon.b"));
    let (mut sub, sub_id) = raw_client(node.addr);
    join(&mut sub, &a);
    join(&mut sub, &b);
    let (mut publisher, publisher_id) = raw_client(node.addr);
    let payload = Bytes::from(vec![b'x'; 64 * 1024]);
    for _ in 0..100 {
        publisher.send(&Frame::Publish {
            group: a.clone(),
            payload: payload.clone(),
        });
    }
    let mut entry = serde_json::Value::Null;
    wait_for("the reader's queue in /connz", WAIT, || {
        let doc = get(mon, "/connz?sort=queue_bytes&limit=1").json();
        entry = doc["connections"][0].clone();
        entry["id"] == sub_id.as_str() && entry["queue_bytes"].as_u64() > Some(0)
    });
    assert_eq!(entry["role"], "client", "{entry}");
    assert_eq!(
        entry["groups"],
        serde_json::json!(["mon.a", "mon.b"]),
        "{entry}"
    );
    assert!(entry["queue_frames"].as_u64() > Some(0), "{entry}");
    assert!(entry["bytes_in"].as_u64() > Some(0), "{entry}");
    assert!(entry["since_unix"].as_f64() > Some(0.0), "{entry}");

    let all = get(mon, "/connz").json();
    assert_eq!(all["total"], 2, "{all}");
    let ids: HashSet<String> = all["connections"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| c["id"].as_str().expect("an id").to_owned())
        .collect();
    assert!(ids.contains(sub_id.as_str()), "{all}");
    let second = get(mon, "/connz?offset=1&limit=1").json();
    assert_eq!(second["connections"].as_array().map(Vec::len), Some(1));
    assert_eq!(second["connections"][0]["id"], all["connections"][1]["id"]);
    assert_eq!(get(mon, "/connz?sort=nonsense").status, 400);
    assert_eq!(all["limit"], 100, "the default page: {all}");
    assert_eq!(get(mon, "/connz?limit=10000").status, 200);
    assert_eq!(get(mon, "/connz?limit=10001").status, 400);
    // Every documented order: the reader connected first, has the most
    // queued, groups and bytes out; the publisher sent the most bytes.
    let reader = entry["id"].clone();
    for (sort, first) in [
        ("id", all["connections"][0]["id"].clone()),
        ("queue_bytes", reader.clone()),
        ("queue_frames", reader.clone()),
        ("groups", reader.clone()),
        ("bytes_out", reader.clone()),
        ("since", reader.clone()),
        ("bytes_in", serde_json::json!(publisher_id.as_str())),
    ] {
        let doc = get(mon, &format!("/connz?sort={sort}&limit=1")).json();
        assert_eq!(doc["connections"][0]["id"], first, "sort={sort}: {doc}");
    }

    let metrics = scrape(mon);
    assert!(sum(&metrics, "msgc_outbound_queue_bytes", &[]) > 0.0);
    assert!(sum(&metrics, "msgc_outbound_queue_max_frames", &[]) > 0.0);
    drop(sub);
}

#[test]
fn groupz_lists_members() {
    let dir = TempDir::new("mon-groupz");
    let (node, mon) = solo(&dir, "127.0.0.75", "");
    let g = group("mon/g#1");
    let mut ids = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let (mut r, id) = raw_client(node.addr);
        join(&mut r, &g);
        ids.push(id.as_str().to_owned());
        conns.push(r);
    }
    let (mut other, _) = raw_client(node.addr);
    join(&mut other, &group("mon.small"));

    let one = get(mon, "/groupz?group=mon%2Fg%231");
    assert_eq!(one.status, 200, "{}", one.body);
    let doc = one.json();
    assert_eq!(doc["group"], "mon/g#1");
    assert_eq!(doc["size"], 3);
    let listed: HashSet<String> = doc["members"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| {
            assert_eq!(m["local"], true, "{m}");
            m["id"].as_str().expect("an id").to_owned()
        })
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect::<HashSet<_>>());
    // Paged like the list of groups: the pages together are the group.
    let mut paged = Vec::new();
    for offset in 0..3 {
        let page = get(
            mon,
            &format!("/groupz?group=mon%2Fg%231&offset={offset}&limit=1"),
        )
        .json();
        assert_eq!(page["size"], 3, "{page}");
        let members = page["members"].as_array().expect("a list");
        assert_eq!(members.len(), 1, "{page}");
        paged.push(members[0]["id"].as_str().expect("an id").to_owned());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(paged, sorted, "pages in id order, none twice");
    assert_eq!(get(mon, "/groupz?group=mon%2Fg%231&limit=0x").status, 400);
    assert_eq!(
        get(mon, "/groupz?group=mon%2Fg%231&limit=10001").status,
        400
    );
    let default = get(mon, "/groupz?group=mon%2Fg%231").json();
    assert_eq!(default["limit"], 100, "{default}");

    let list = get(mon, "/groupz").json();
    assert_eq!(
        list["groups"][0]["name"], "mon/g#1",
        "biggest first: {list}"
    );
    assert_eq!(list["groups"][0]["members"], 3);
    assert_eq!(list["groups"][1]["name"], "mon.small");
    assert_eq!(
        get(mon, "/groupz?limit=1").json()["groups"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(get(mon, "/groupz?group=nobody").status, 404);
}

#[test]
fn bad_requests_are_answered_not_fatal() {
    let dir = TempDir::new("mon-bad");
    let port = free_port(&["127.0.0.76"]);
    let mon = addr("127.0.0.76", another_port("127.0.0.76", port));
    let conf = dir.write(
        "bad.conf",
        &format!("msgc_server {{ shards = 2 }}\nmsgcserver_listener {{ listen \"127.0.0.76:{port}\" {{ }} }}\n"),
    );
    // The option on the command line this time.
    let _node = NodeProc::start_with(
        conf,
        "bad",
        addr("127.0.0.76", port),
        &["--monitor", &mon.to_string()],
    );
    wait_serving(mon);
    let status = |req: &[u8]| http_raw(mon, req).map(|r| r.status);
    assert_eq!(status(b"BLAH\r\n\r\n"), Some(400));
    assert_eq!(status(b"GET /metrics HTTP/1.1\r\nHost\r\n\r\n"), Some(400));
    assert_eq!(status(b"\x00\x01\x02\xff\r\n\r\n"), Some(400));
    assert_eq!(get(mon, "/nope").status, 404);
    assert_eq!(get(mon, "/connz?limit=abc").status, 400);
    assert_eq!(get(mon, "/connz?offset=-1").status, 400);
    assert_eq!(
        status(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        Some(405)
    );
    // HEAD: the status and headers of GET, no body.
    let head = http_raw(
        mon,
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer to HEAD");
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    // A client that connects and says nothing holds nothing up.
    let idle = std::net::TcpStream::connect(mon).expect("connect");
    let stats = get(mon, "/stats").json();
    assert_eq!(stats["node"], "bad");
    assert_eq!(stats["shards"], 2);
    let peerz = get(mon, "/peerz").json();
    assert_eq!(peerz["configured"], 0, "{peerz}");
    assert_eq!(
        get(mon, "/healthz?peers=1").status,
        200,
        "no peers: healthy"
    );
    assert_eq!(get(mon, "/").status, 200);
    drop(idle);
}

#[test]
fn healthz_fails_while_a_shard_is_stalled() {
    let srv = TestServer::start(2, "epoll", "");
    let monitor =
        msgc::monitor::Monitor::start(addr("127.0.0.76", 0), srv.server().shared().clone())
            .expect("monitor starts");
    let mon = monitor.local_addr();
    wait_serving(mon);
    srv.server().stall_shard(1, Duration::from_secs(12));
    // Each look waits up to a second for the shard: both are seen while it
    // is stalled, whatever the machine's pace, or the wait times out.
    wait_for("/healthz and /metrics to see shard 1 stalled", WAIT, || {
        let health = http_get(mon, "/healthz");
        let failing = health.is_some_and(|r| r.status == 503 && r.body.contains("shard 1"));
        failing && sum(&scrape(mon), "msgc_shard_up", &[("shard", "1")]) == 0.0
    });
    // More looks do not pile questions up in the stalled shard's inbox.
    let queued = || srv.server().shared().inspections[1].load(std::sync::atomic::Ordering::Acquire);
    for _ in 0..6 {
        let health = http_get(mon, "/healthz").expect("answered");
        assert_eq!(health.status, 503);
        assert!(
            queued() <= 4, // gather::INSPECTIONS_QUEUED
            "{} questions queued",
            queued()
        );
    }
    wait_serving(mon);
    assert_eq!(queued(), 0, "every question was answered or counted off");
    assert_eq!(sum(&scrape(mon), "msgc_shard_up", &[]), 2.0);
    drop(monitor);
    srv.stop();
}

#[test]
fn a_reload_that_moves_the_monitor_is_refused() {
    let text = |monitor: &str| {
        format!(
            "msgc_server {{\n node = \"test\"\n shards = 1\n io_backend = epoll\n monitor = \"{monitor}\"\n}}\n\
             msgcserver_listener {{ listen \"127.0.0.76:0\" {{ }} }}\n"
        )
    };
    let parse = |t: &str| msgc::config::Config::parse_str("m.conf", t).expect("parses");
    let server = msgc::server::Server::start(&parse(&text("127.0.0.76:1")), None).expect("starts");
    let moved = server.reload(&parse(&text("127.0.0.76:2")), None);
    assert!(
        matches!(moved, Err(msgc::server::Error::NeedsRestart("monitor"))),
        "{moved:?}"
    );
    assert!(server.reload(&parse(&text("127.0.0.76:1")), None).is_ok());
    server.shutdown();
}

#[test]
fn a_taken_monitor_address_stops_the_start() {
    let ip = "127.0.0.76";
    let taken = std::net::TcpListener::bind((ip, 0)).expect("bind");
    let mon = taken.local_addr().expect("addr");
    let port = another_port(ip, mon.port());
    /// Killed on drop, whatever the test's outcome.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_msgc-server"))
        .args(["--listen", &format!("{ip}:{port}"), "--shards", "1"])
        .args(["--monitor", &mon.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn msgc-server");
    let mut child = Reap(child);
    let mut status = None;
    wait_for("msgc-server to exit", WAIT, || {
        status = child.0.try_wait().ok().flatten();
        status.is_some()
    });
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains(&format!("monitor: cannot listen on {mon}")),
        "{err}"
    );
    assert!(
        std::net::TcpStream::connect(addr(ip, port)).is_err(),
        "nothing listens"
    );
}

/// While a node leaves (lame duck, clients told to move), `/healthz`
/// answers 503 and says so: a load balancer stops sending clients to it.
/// (Two nodes: a node with no peers has nowhere to move clients to and
/// closes them at once.)
#[test]
fn healthz_fails_while_the_node_leaves() {
    let dir = TempDir::new("mon-leaving");
    let (mut nodes, mons) = pair_with_monitors(
        &dir,
        ["127.0.0.77", "127.0.0.78"],
        ["", "lame_duck_duration = 300"],
    );
    let mon = mons[1];
    wait_serving(mon);
    // A client that can move but never does keeps the node leaving.
    let (_stays, _) =
        crate::util::Raw::client_with(nodes[1].addr, msgc::protocol::features::LEAVING);
    nodes[1].signal(libc::SIGTERM);
    let mut said = String::new();
    wait_for(
        "/healthz to say the node is leaving",
        WAIT,
        || match http_get(mon, "/healthz") {
            Some(r) if r.status == 503 => {
                said = r.body;
                said.contains("leaving the cluster")
            }
            _ => false,
        },
    );
    assert!(!said.contains("shutting down"), "{said}");
    // Still leaving a moment later: the node waits for its client.
    let again = get(mon, "/healthz");
    assert_eq!(again.status, 503, "{}", again.body);
    assert!(again.body.contains("leaving the cluster"), "{}", again.body);
    // The second signal ends the wait for clients; the node exits.
    nodes[1].signal(libc::SIGTERM);
    assert_eq!(nodes[1].terminate(), Some(0), "exits 0 after leaving");
}
