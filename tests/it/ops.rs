//! Operating a server: what start-up says and when it fails, restarts
//! right after a crash, the example deployment config, and the logs
//! (operator events at the default level, rate limits, JSON lines).
//! Every server here is a `msgc-server` process whose standard error the
//! test reads.

use crate::util::{free_port, restartable_port, Raw, TempDir, WAIT};
use msgc::client::{Client, ClientConfig, Event};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_msgc-server");

/// A `msgc-server` process whose standard error is read line by line;
/// killed on drop.
pub(crate) struct Logged {
    pub(crate) child: Child,
    lines: flume::Receiver<String>,
    /// Every line read so far.
    seen: Vec<String>,
}

impl Logged {
    /// Started with `args`, and without the caller's `RUST_LOG` (which
    /// would override `debug_level`).
    fn spawn(args: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env_remove("RUST_LOG");
        Self::spawn_cmd(cmd)
    }

    pub(crate) fn spawn_cmd(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn msgc-server");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = flume::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line for which `pick` holds (bounded by `WAIT`); panics
    /// with the log when the process ends or the time passes first.
    pub(crate) fn wait_line(&mut self, what: &str, pick: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + WAIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pick(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no {what} in the log:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits (bounded) for the process to exit and for the rest of its
    /// log; returns its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let end = Instant::now() + WAIT;
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            assert!(
                Instant::now() < end,
                "the server did not exit:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        while let Ok(line) = self
            .lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        status.code()
    }

    /// SIGTERM, then [`Logged::wait_exit`].
    pub(crate) fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit()
    }

    /// SIGKILL and reap, as a crash would end it.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn log(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

/// Lines of the start-up banner: from the first to the client stanza.
fn banner(server: &mut Logged) -> Vec<String> {
    server.wait_line("the banner's listening line", |l| {
        l.starts_with("msgc-server: node ")
    });
    server.wait_line("the banner's msgc_client stanza", |l| {
        l.trim() == "msgc_client {"
    });
    server.seen.clone()
}

fn line_of<'a>(lines: &'a [String], start: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{}", lines.join("\n")))
}

// ------------------------------------------------------------ start-up

/// The banner shows the command line's values as such, and the address
/// actually bound, not `# default` and not every address.
#[test]
fn startup_output_shows_command_line_overrides() {
    let port = free_port(&["127.0.0.1"]);
    let listen = format!("127.0.0.1:{port}");
    let mut server = Logged::spawn(&["--listen", &listen, "--node", "n2", "--shards", "1"]);
    let lines = banner(&mut server);
    let first = line_of(&lines, "msgc-server: node ");
    assert!(
        first.starts_with(&format!(
            "msgc-server: node n2 listening on {listen} (1 shards,"
        )),
        "{first}"
    );
    let node = line_of(&lines, "node = ");
    assert_eq!(node.trim(), "node = \"n2\"  # --node (command line)");
    let shards = line_of(&lines, "shards = ");
    assert_eq!(shards.trim(), "shards = 1  # --shards (command line)");
    let listening = line_of(&lines, "listen ");
    assert_eq!(
        listening.trim(),
        format!("listen \"{listen}\" {{ }}  # --listen (command line)")
    );
    for l in [node, shards, listening] {
        assert!(!l.contains("# default"), "{l}");
    }
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
}

/// Without a listen scope or peers, the banner says 127.0.0.1 (what is
/// bound), not `":4809"` (every address in our syntax); the shard count
/// and node name are the ones in force.
#[test]
fn startup_output_shows_the_defaults_in_force() {
    let dir = TempDir::new("ops-defaults");
    let port = free_port(&["127.0.0.1"]);
    let conf = dir.write("d.conf", &format!("msgc_server {{ port = {port} }}\n"));
    let conf = conf.display().to_string();
    let mut server = Logged::spawn(&["--config", &conf]);
    let lines = banner(&mut server);
    let listening = line_of(&lines, "listen ");
    assert_eq!(
        listening.trim(),
        format!("listen \"127.0.0.1:{port}\" {{ }}  # default: no peers, so 127.0.0.1 on port")
    );
    let shards = line_of(&lines, "shards = ");
    assert!(shards.ends_with("  # default: one per CPU"), "{shards}");
    assert!(!shards.contains("auto"), "{shards}");
    let node = line_of(&lines, "node = ");
    assert!(node.ends_with("  # default: the host name"), "{node}");
    assert!(!node.contains("\"\""), "{node}");
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
}

/// Runs `msgc-server ARGS` with at most `limit` open files; returns it
/// once it has exited.
fn run_with_fd_limit(args: &[&str], limit: u64) -> Logged {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = Logged::spawn_cmd(cmd);
    let code = server.wait_exit();
    assert_eq!(code, Some(1), "limit {limit}: {}", server.log());
    server
}

/// A shard whose runtime cannot start (here: out of file descriptors)
/// fails the start: exit status 1 and the reason, said once, nothing left
/// listening. The open-file limit is raised one by one from what the
/// listeners alone need, to below what every shard's runtime needs, so
/// that some run fails in a shard whatever else the process opens.
#[test]
fn a_shard_that_cannot_start_fails_the_start() {
    const SHARDS: u64 = 8;
    for backend in ["epoll", "uring"] {
        if backend == "uring" && !crate::util::uring_here() {
            continue;
        }
        let port = free_port(&["127.0.0.1"]);
        let listen = format!("127.0.0.1:{port}");
        let shards = SHARDS.to_string();
        let args = [
            "--listen",
            &listen,
            "--io-backend",
            backend,
            "--shards",
            &shards,
        ];
        let mut in_a_shard = 0;
        // Standard I/O and the listeners, then less than two descriptors
        // per shard more: never enough for every shard's runtime.
        for limit in 3 + SHARDS..3 + 3 * SHARDS {
            let server = run_with_fd_limit(&args, limit);
            let log = server.log();
            let last = server.seen.last().cloned().unwrap_or_default();
            assert!(
                last.starts_with("msgc-server: "),
                "{backend}, limit {limit}: {log}"
            );
            assert_eq!(last.matches("os error").count(), 1, "{log}");
            assert!(!log.contains("listening on"), "{backend}: {log}");
            if last.contains(" did not start: ") {
                assert!(last.starts_with("msgc-server: shard "), "{log}");
                assert!(last.contains("Too many open files"), "{log}");
                in_a_shard += 1;
            }
        }
        assert!(in_a_shard > 0, "{backend}: no start failed in a shard");
        assert!(TcpStream::connect(addr("127.0.0.1", port)).is_err());
    }
}

/// `msgc-server ARGS` with io_uring's three system calls refused by a
/// seccomp filter (EPERM), as Docker's and containerd's default profiles
/// do.
fn spawn_without_io_uring(args: &[&str]) -> Logged {
    use std::os::unix::process::CommandExt;
    const LD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS, offset 0: the number
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // io_uring_setup, _enter, _register: 425, 426, 427 on every
    // architecture this runs on.
    let filter = [
        op(LD_NR, 0, 0, 0),
        op(JEQ, 3, 0, 425),
        op(JEQ, 2, 0, 426),
        op(JEQ, 1, 0, 427),
        op(RET, 0, 0, ALLOW),
        op(RET, 0, 0, EPERM),
    ];
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // SAFETY: runs in the child between fork and exec: two prctl calls on
    // a filter built before the fork (nothing allocated here).
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Logged::spawn_cmd(cmd)
}

/// Where seccomp blocks io_uring, `io_backend = auto` (the default) runs on
/// epoll and says so at the default debug_level; `io_backend = uring`
/// fails to start, saying why.
#[test]
fn without_io_uring_auto_falls_back_to_epoll_and_uring_fails() {
    let port = free_port(&["127.0.0.1"]);
    let listen = format!("127.0.0.1:{port}");
    let mut server = spawn_without_io_uring(&["--listen", &listen, "--shards", "1"]);
    let lines = banner(&mut server);
    let first = line_of(&lines, "msgc-server: node ");
    assert!(first.contains("(1 shards, epoll backend)"), "{first}");
    let log = server.log();
    assert!(
        log.contains("io_uring is not available here") && log.contains("using epoll"),
        "{log}"
    );
    assert!(line_of(&lines, "io_backend = ").ends_with("# default; running: epoll"));
    let mut cfg = ClientConfig::with_servers([listen.clone()]);
    cfg.connect_timeout = Duration::from_secs(5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = Client::connect(cfg).await.expect("client connects");
        client.ping().await.expect("ping");
        let _ = client.close().await;
    });
    assert_eq!(server.terminate(), Some(0), "{}", server.log());

    let mut server = spawn_without_io_uring(&["--listen", &listen, "--io-backend", "uring"]);
    assert_eq!(server.wait_exit(), Some(1), "{}", server.log());
    let last = server.seen.last().cloned().unwrap_or_default();
    assert_eq!(
        last,
        "msgc-server: io_backend = uring, but io_uring is not available here: \
         Operation not permitted (os error 1) (use io_backend = auto or epoll)"
    );
}

/// An address that is in use fails the start after `--listen-wait`, the
/// wait said in the log; the error says its cause once.
#[test]
fn an_address_in_use_is_waited_for_then_refused_with_its_cause_once() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").to_string();
    let mut server = Logged::spawn(&["--listen", &taken, "--listen-wait", "0.3"]);
    assert_eq!(server.wait_exit(), Some(1), "{}", server.log());
    let log = server.log();
    assert!(log.contains("waiting for it"), "{log}");
    let last = server.seen.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with(&format!("msgc-server: cannot listen on {taken}: ")),
        "{log}"
    );
    assert_eq!(last.matches("in use").count(), 1, "{log}");
    // Without waiting: the kernel's words, once.
    let mut server = Logged::spawn(&["--listen", &taken, "--listen-wait", "0"]);
    assert_eq!(server.wait_exit(), Some(1), "{}", server.log());
    let last = server.seen.last().cloned().unwrap_or_default();
    assert_eq!(
        last,
        format!("msgc-server: cannot listen on {taken}: Address already in use (os error 98)")
    );
    // An address of no interface here.
    let mut server = Logged::spawn(&["--listen", "192.0.2.1:4999", "--listen-wait", "0"]);
    assert_eq!(server.wait_exit(), Some(1), "{}", server.log());
    let last = server.seen.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("msgc-server: cannot listen on 192.0.2.1:4999: "),
        "{last}"
    );
    assert_eq!(last.matches("os error").count(), 1, "{last}");
}

// ------------------------------------------------------------ restarts

/// A client that joins `group` and one that publishes to it: the message
/// must arrive. Every step bounded.
async fn pub_sub_works(at: SocketAddr, round: usize) {
    let mut cfg = ClientConfig::with_servers([at.to_string()]);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.request_timeout = Duration::from_secs(10);
    let sub = Client::connect(cfg.clone())
        .await
        .expect("subscriber connects");
    let publisher = Client::connect(cfg).await.expect("publisher connects");
    publisher.ping().await.expect("ping");
    sub.join("restart").await.expect("join");
    let payload = format!("round {round}");
    publisher
        .publish("restart", payload.clone())
        .await
        .expect("publish");
    let got = crate::util::next_event(&sub.events(), WAIT, |e| match e {
        Event::Message { payload, .. } => Some(payload),
        _ => None,
    })
    .await;
    assert_eq!(got, payload.as_bytes());
    let _ = publisher.close().await;
    let _ = sub.close().await;
}

/// Killed (SIGKILL) and restarted at once, 20 times, with clients
/// connected at each kill: every restart serves. The io_uring backend
/// leaves the dead process's sockets behind for a while; the new server
/// waits for the port and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_right_after_sigkill_serves_every_time() {
    let port = restartable_port(&["127.0.0.1"]);
    let at = addr("127.0.0.1", port);
    let listen = at.to_string();
    let args = ["--listen", &listen, "--shards", "2", "--node", "restart"];
    let mut waited = 0;
    for round in 0..20 {
        let mut server = Logged::spawn(&args);
        let ready = tokio::task::block_in_place(|| {
            server.wait_line("the start-up banner", |l| {
                l.starts_with("msgc-server: node ") || l.starts_with("msgc-server: cannot")
            })
        });
        assert!(
            ready.starts_with("msgc-server: node restart listening on"),
            "round {round}: {}",
            server.log()
        );
        if server.log().contains("waiting for it") {
            assert!(
                server.log().contains("the port is free after"),
                "{}",
                server.log()
            );
            waited += 1;
        }
        tokio::time::timeout(WAIT * 2, pub_sub_works(at, round))
            .await
            .unwrap_or_else(|_| panic!("round {round}: pub/sub timed out:\n{}", server.log()));
        // Connections open at the kill linger with the dead process's
        // listeners.
        let held: Vec<Raw> = (0..4).map(|_| Raw::client(at)).collect();
        server.kill9();
        drop(held);
    }
    eprintln!("restarts that waited for the port: {waited} of 20");
}

// ------------------------------------------------------------ deployment

/// deploy/msgc.conf parses without warnings, and every node of it listens
/// on its own address.
#[test]
fn the_example_deployment_config_checks_for_every_node() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/msgc.conf");
    let cfg = msgc::config::Config::load(&conf).expect("deploy/msgc.conf parses");
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    assert_eq!(cfg.server.peers.len(), 3);
    for (node, ip) in [
        ("node1", "10.0.0.11"),
        ("node2", "10.0.0.12"),
        ("node3", "10.0.0.13"),
    ] {
        let out = Command::new(BIN)
            .arg("--check-config")
            .arg(&conf)
            .args(["--node", node])
            .output()
            .expect("run --check-config");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!(
                "  listen \"{ip}:4809\" {{ }}  # default: {node}'s address in peers\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("  node = \"{node}\"  # --node (command line)\n")),
            "{text}"
        );
    }
    // Without --node, on a machine that is none of them: still valid.
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(&conf)
        .output()
        .expect("run --check-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  # listen: not set; each node listens on its own address in peers\n"),
        "{text}"
    );
}

// ------------------------------------------------------------ logs

/// With `--log-format json` every line on standard error is one JSON
/// object, the banner included.
#[test]
fn json_log_lines() {
    let dir = TempDir::new("ops-json");
    let port = free_port(&["127.0.0.1"]);
    let conf = dir.write(
        "j.conf",
        &format!("msgc_server {{ debug_level = INFO }}\nmsgcserver_listener {{ listen \"127.0.0.1:{port}\" {{ }} }}\n"),
    );
    let conf = conf.display().to_string();
    let mut server = Logged::spawn(&["--config", &conf, "--log-format", "json"]);
    let started = server.wait_line("the start event", |l| l.contains("msgc-server started"));
    let v: serde_json::Value = serde_json::from_str(&started).expect("a JSON line");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["listen"], format!("127.0.0.1:{port}"));
    assert!(v["fields"]["settings"]
        .as_str()
        .is_some_and(|s| s.contains("debug_level = INFO")));
    // A bad connection: its INFO line is JSON too.
    let mut raw = Raw::connect(addr("127.0.0.1", port));
    raw.send_bytes(&[0xff; 16]);
    assert!(raw.closed());
    server.wait_line("the bad input event", |l| l.contains("bad input"));
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    assert!(server.seen.len() >= 3, "{}", server.log());
    for line in &server.seen {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    // A start that fails says why in JSON too.
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").to_string();
    let args = [
        "--listen",
        &taken,
        "--listen-wait",
        "0",
        "--log-format",
        "json",
    ];
    let mut failed = Logged::spawn(&args);
    assert_eq!(failed.wait_exit(), Some(1), "{}", failed.log());
    let last = failed.seen.last().cloned().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&last).expect("a JSON line");
    assert_eq!(v["level"], "ERROR");
    let message = v["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!("cannot listen on {taken}: ")),
        "{last}"
    );
}

/// Per-connection messages are rate-limited: a flood of bad connections
/// logs a few lines, and the rest is counted, said at the latest at
/// shutdown: logged + not logged = every one.
#[test]
fn per_connection_messages_are_rate_limited_and_counted() {
    const BAD: usize = 100;
    let dir = TempDir::new("ops-rate");
    let port = free_port(&["127.0.0.1"]);
    let conf = dir.write(
        "r.conf",
        &format!("msgc_server {{ debug_level = INFO }}\nmsgcserver_listener {{ listen \"127.0.0.1:{port}\" {{ }} }}\n"),
    );
    let conf = conf.display().to_string();
    let mut server = Logged::spawn(&["--config", &conf, "--shards", "2"]);
    banner(&mut server);
    for _ in 0..BAD {
        let mut raw = Raw::connect(addr("127.0.0.1", port));
        raw.send_bytes(&[0xff; 16]);
        assert!(raw.closed());
    }
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    const SUMMARY: &str = " more messages not logged";
    let logged = server
        .seen
        .iter()
        .filter(|l| l.contains("bad input: ") && !l.contains(SUMMARY))
        .count();
    let suppressed: usize = server
        .seen
        .iter()
        .filter(|l| l.contains(SUMMARY))
        .filter_map(|l| {
            l.split("bad input: ")
                .nth(1)?
                .split(SUMMARY)
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(logged + suppressed, BAD, "{}", server.log());
    assert!(suppressed > 0, "{}", server.log());
    assert!(logged < BAD / 2, "{}", server.log());
}

/// At the default debug_level (ERROR) a peer link coming up and a node
/// going down are logged.
#[test]
fn link_up_and_node_down_are_logged_at_the_default_level() {
    let dir = TempDir::new("ops-links");
    let port = restartable_port(&["127.0.0.1", "127.0.0.2"]);
    let conf = dir.write(
        "c.conf",
        &format!(
            "msgc_server {{\n peers = [ one = \"127.0.0.1:{port}\" two = \"127.0.0.2:{port}\" ]\n shards = 1\n}}\n"
        ),
    );
    let conf = conf.display().to_string();
    let mut one = Logged::spawn(&["--config", &conf, "--node", "one"]);
    banner(&mut one);
    let mut two = Logged::spawn(&["--config", &conf, "--node", "two"]);
    one.wait_line("peer link up", |l| {
        l.contains("peer link up") && l.contains("two")
    });
    two.kill9();
    let down = one.wait_line("peer link down", |l| l.contains("peer link down"));
    assert!(down.contains("two"), "{down}");
    assert_eq!(one.terminate(), Some(0), "{}", one.log());
}

/// `RUST_LOG` overrides `debug_level`: with the default level (ERROR) bad
/// input is not logged, with `RUST_LOG=info` it is.
#[test]
fn rust_log_overrides_debug_level() {
    let dir = TempDir::new("ops-rust-log");
    let port = free_port(&["127.0.0.1"]);
    let conf = dir.write(
        "l.conf",
        &format!("msgcserver_listener {{ listen \"127.0.0.1:{port}\" {{ }} }}\n"),
    );
    let bad_input = |rust_log: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&conf).env_remove("RUST_LOG");
        if let Some(v) = rust_log {
            cmd.env("RUST_LOG", v);
        }
        let mut server = Logged::spawn_cmd(cmd);
        banner(&mut server);
        let mut raw = Raw::connect(addr("127.0.0.1", port));
        raw.send_bytes(&[0xff; 16]);
        assert!(raw.closed());
        assert_eq!(server.terminate(), Some(0), "{}", server.log());
        server.seen.iter().any(|l| l.contains("bad input: "))
    };
    assert!(!bad_input(None), "not logged at the default level");
    assert!(bad_input(Some("info")), "logged with RUST_LOG=info");
}

/// A refused login and a refused peer link are logged (at WARNING, each
/// kind rate-limited), saying why.
#[test]
fn refused_logins_and_peer_links_are_logged() {
    use msgc::protocol::{Credentials, Frame, Hello, NodeName, Role, PROTOCOL_VERSION};
    let cheap = msgc::server::auth::Cost {
        memory_kib: 64,
        passes: 1,
        lanes: 1,
    };
    let hash = msgc::server::auth::hash_password(b"right", cheap).expect("hash");
    let dir = TempDir::new("ops-refused");
    let port = free_port(&["127.0.0.1"]);
    let conf = dir.write(
        "r.conf",
        &format!(
            "msgc_server {{\n debug_level = WARNING\n users = [ alice = [ password = \"{hash}\" ] ]\n}}\n\
             msgcserver_listener {{ listen \"127.0.0.1:{port}\" {{ }} }}\n"
        ),
    );
    let conf = conf.display().to_string();
    let mut server = Logged::spawn(&["--config", &conf]);
    banner(&mut server);
    let hello = |role, name: Option<&str>, credentials| {
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            role,
            name: name.map(|n| NodeName::from_str_checked(n).expect("name")),
            credentials,
            features: 0,
            max_message_size: 0,
        })
    };
    let wrong = Credentials {
        user: "alice".into(),
        password: b"wrong".to_vec(),
    }
    .encode()
    .expect("credentials");
    let mut login = Raw::connect(addr("127.0.0.1", port));
    login.send(&hello(Role::Client, None, wrong));
    assert!(login.closed());
    let line = server.wait_line("the refused login", |l| {
        l.contains("client login refused: ")
    });
    assert!(
        line.contains("WARN") && line.contains("wrong password"),
        "{line}"
    );
    let mut peer = Raw::connect(addr("127.0.0.1", port));
    peer.send(&hello(Role::Peer, Some("ghost"), bytes::Bytes::new()));
    assert!(peer.closed());
    let line = server.wait_line("the refused peer link", |l| {
        l.contains("refused a peer link: ")
    });
    assert!(line.contains("ghost"), "{line}");
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
}
