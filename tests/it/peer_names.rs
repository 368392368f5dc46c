//! Peers given by host name (issue 11, item 4): names are looked up by the
//! resolver thread, never on a shard and never for a peer's `HELLO`. A
//! resolvable name links up like an address; one that does not resolve is
//! reported (a log line, `address_error` in the stats) and holds nothing
//! else up. Two `msgc-server` processes on 127.0.0.1 and 127.0.0.2; every
//! wait is bounded, nothing asserts on timing.

use crate::cluster::{config_text, peer_of, peer_state, stats, until, Member, QUICK};
use crate::util::{free_port, TempDir, WAIT};
use bytes::Bytes;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `msgc-server` whose log goes to a file; killed on drop.
struct Logged {
    child: Child,
    log: PathBuf,
}

impl Logged {
    fn start(dir: &Path, conf: &Path, node: &str, listen: SocketAddr) -> Self {
        let log = dir.join(format!("{node}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(env!("CARGO_BIN_EXE_msgc-server"))
            .arg("--config")
            .arg(conf)
            .args(["--node", node, "--listen", &listen.to_string()])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn msgc-server");
        let me = Self { child, log };
        crate::util::wait_for(&format!("{node} to listen on {listen}"), WAIT, || {
            TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok()
        });
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_by_host_name_links_up_and_an_unresolvable_one_blocks_nothing() {
    let dir = TempDir::new("names");
    let port = free_port(&["127.0.0.1", "127.0.0.2"]);
    let peers = [
        ("node1", "127.0.0.2"),
        ("node2", "localhost"),
        ("node3", "no-such-host.invalid"),
    ]
    .map(|(n, a)| (n.to_string(), a.to_string()));
    let conf = dir.write("names.conf", &config_text(port, &peers, QUICK));
    let a1: SocketAddr = format!("127.0.0.2:{port}").parse().expect("addr");
    // node2 is `localhost`: it listens on the address that name has
    // everywhere (an IPv6 ::1 first in the name's list is tried and fails).
    let a2: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let n1 = Logged::start(&dir.0, &conf, "node1", a1);
    let n2 = Logged::start(&dir.0, &conf, "node2", a2);

    until("node1 and node2 to link (node2 given as localhost)", || {
        peer_state(a1, "node2") == "up" && peer_state(a2, "node1") == "up"
    })
    .await;
    for (addr, node) in [(a1, &n1), (a2, &n2)] {
        until("node3's address to be reported as not resolving", || {
            let st = stats(addr);
            peer_of(&st, "node3").is_some_and(|p| p["address_error"].is_string())
        })
        .await;
        assert_ne!(peer_state(addr, "node3"), "up");
        until("the log to say why node3 is down", || {
            let log = node.log();
            log.contains("cannot resolve the peer's address") && log.contains("node3")
        })
        .await;
    }
    // The link made from a host name carries messages both ways.
    let m1 = Member::joined(a1, "names").await;
    let m2 = Member::joined(a2, "names").await;
    crate::cluster::wait_views(&[&m1, &m2], "names").await;
    m1.publish("names", Bytes::from_static(b"from node1")).await;
    m2.publish("names", Bytes::from_static(b"from node2")).await;
    m1.wait_messages("names", 2).await;
    m2.wait_messages("names", 2).await;
}
