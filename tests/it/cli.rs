//! The `msgc` CLI against a running `msgc-server` process.

use crate::util::{free_port, wait_for, NodeProc, TempDir, WAIT};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};

pub(crate) fn msgc(server: SocketAddr, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msgc"))
        .arg("--server")
        .arg(server.to_string())
        .args(args)
        .output()
        .expect("run msgc")
}

fn start_server(dir: &TempDir) -> NodeProc {
    let port = free_port(&["127.0.0.1"]);
    let conf = dir.write(
        "server.conf",
        &format!("msgc_server {{ shards = 2 }}\nmsgcserver_listener {{ listen \"127.0.0.1:{port}\" {{ }} }}\n"),
    );
    NodeProc::start(
        conf,
        "cli",
        format!("127.0.0.1:{port}").parse().expect("addr"),
    )
}

#[test]
fn pub_lines_reach_sub() {
    let dir = TempDir::new("cli");
    let node = start_server(&dir);
    let sub = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args([
            "--server",
            &node.addr.to_string(),
            "sub",
            "news",
            "--count",
            "3",
            "--timeout",
            "30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn msgc sub");
    // The subscriber is in the group once `members` lists it.
    wait_for("msgc sub to join", WAIT, || {
        let out = msgc(node.addr, &["members", "news"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).lines().count() == 1
    });
    let mut publisher = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(["--server", &node.addr.to_string(), "pub", "news"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn msgc pub");
    publisher
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"first line\nsecond\nthird one\n")
        .expect("write stdin");
    assert!(publisher.wait().expect("pub exits").success());
    let out = sub.wait_with_output().expect("sub exits");
    assert!(
        out.status.success(),
        "sub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "first line\nsecond\nthird one\n"
    );
}

#[test]
fn pub_argument_ping_stats_and_members() {
    let dir = TempDir::new("cli2");
    let node = start_server(&dir);
    let ping = msgc(node.addr, &["ping"]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    let sub = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args([
            "--server",
            &node.addr.to_string(),
            "sub",
            "a",
            "b",
            "--count",
            "2",
            "--timeout",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn msgc sub");
    wait_for("msgc sub to join both groups", WAIT, || {
        ["a", "b"].iter().all(|g| {
            String::from_utf8_lossy(&msgc(node.addr, &["members", g]).stdout)
                .lines()
                .count()
                == 1
        })
    });
    assert!(msgc(node.addr, &["pub", "a", "to a"]).status.success());
    assert!(msgc(node.addr, &["pub", "b", "to b"]).status.success());
    let out = sub.wait_with_output().expect("sub exits");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to a\nto b\n");
    let stats = msgc(node.addr, &["stats", "--json"]);
    assert!(stats.status.success());
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats --json is JSON");
    assert!(v["totals"]["publishes"].as_u64().expect("publishes") >= 2);
    let human = msgc(node.addr, &["stats"]);
    assert!(human.status.success() && !human.stdout.is_empty());
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let port = free_port(&["127.0.0.1"]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let out = msgc(addr, &["ping"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("msgc: "), "{err:?}");
    let bad = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(["pub", "bad group name", "x"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

/// `msgc stats` fits on a screen: links up of total and which are not,
/// connections, groups, drops; `--full` has every counter. `msgc cluster`
/// shows every node's view of the mesh from one command, and exits 1
/// while a node is unreachable or a link down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_summary_and_cluster_view() {
    use crate::cluster::{until, Cluster, QUICK};
    let mut c = Cluster::start("cli-cluster", 3, QUICK).await;
    let first = c.addr(0);
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();

    let out = tokio::task::spawn_blocking(move || msgc(first, &["stats"]))
        .await
        .expect("msgc stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text(&out);
    assert!(summary.lines().count() <= 10, "{summary}");
    assert!(summary.starts_with("node         node1 ("), "{summary}");
    assert!(summary.contains("\nlinks        2/2 up\n"), "{summary}");
    assert!(summary.contains("\ndrops        0\n"), "{summary}");
    let full = tokio::task::spawn_blocking(move || msgc(first, &["stats", "--full"]))
        .await
        .expect("msgc stats --full");
    assert!(text(&full).contains("per_shard"), "{}", text(&full));

    let out = tokio::task::spawn_blocking(move || msgc(first, &["cluster"]))
        .await
        .expect("msgc cluster");
    assert!(out.status.success(), "{}", text(&out));
    let table = text(&out);
    for i in 0..3 {
        let row = format!("node{}  {}  2/2 ", i + 1, c.addr(i));
        assert!(table.contains(&row), "{row:?} in:\n{table}");
    }

    c.nodes[2].kill9();
    until("node1 to see node3 down", || {
        let out = msgc(first, &["stats"]);
        text(&out).contains("links        1/2 up; not up: node3 down")
    })
    .await;
    let out = tokio::task::spawn_blocking(move || msgc(first, &["cluster"]))
        .await
        .expect("msgc cluster");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let table = text(&out);
    assert!(
        table.contains(&format!("?      {}  unreachable: ", c.addr(2))),
        "{table}"
    );
    assert!(
        table.contains(&format!("node1  {}  1/2 ", first)),
        "{table}"
    );
}

/// `msgc sub` into a pipe writes payloads as they are (scripts get the
/// bytes published); with `--escape` (what a terminal gets by default)
/// an escape sequence comes out as text, never as the control bytes a
/// terminal would act on (issue 11, item 5).
#[test]
fn sub_escapes_control_characters_on_request_and_not_into_a_pipe() {
    let dir = TempDir::new("cli-esc");
    let node = start_server(&dir);
    let spawn_sub = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_msgc"))
            .args(["--server", &node.addr.to_string(), "sub", "tty"])
            .args(["--count", "2", "--timeout", "30"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn msgc sub")
    };
    let piped = spawn_sub(&[]);
    let forced_raw = spawn_sub(&["--raw"]);
    let escaped = spawn_sub(&["--escape"]);
    wait_for("the three subscribers to join", WAIT, || {
        let out = msgc(node.addr, &["members", "tty"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).lines().count() == 3
    });
    let mut publisher = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(["--server", &node.addr.to_string(), "pub", "tty"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn msgc pub");
    let published: &[u8] = b"\x1b[2J\x1b]0;owned\x07red\x1b[0m\nplain \xff\\ text\n";
    publisher
        .stdin
        .take()
        .expect("stdin")
        .write_all(published)
        .expect("write stdin");
    assert!(publisher.wait().expect("pub exits").success());
    for (sub, want) in [
        (piped, published.to_vec()),
        (forced_raw, published.to_vec()),
        (
            escaped,
            b"\\x1b[2J\\x1b]0;owned\\x07red\\x1b[0m\nplain \\xff\\\\ text\n".to_vec(),
        ),
    ] {
        let out = sub.wait_with_output().expect("sub exits");
        assert!(
            out.status.success(),
            "sub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(out.stdout, want);
    }
    let both = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(["sub", "tty", "--raw", "--escape"])
        .output()
        .expect("run msgc");
    assert_eq!(both.status.code(), Some(2), "--raw and --escape conflict");
}
