//! Reloads (SIGHUP): a file that does not parse changes nothing, settings
//! that need a restart are refused, and live settings apply.
//!
//! Servers here listen on 127.0.0.111 to 127.0.0.118 and 127.0.0.131. Those whose log a
//! test reads are `msgc-server` processes with their standard error piped
//! (and `RUST_LOG` removed, so that `debug_level` decides what is logged).

use crate::flowkit::join;
use crate::ops::Logged;
use crate::util::{free_port, group, solo_text, wait_for, NodeProc, Raw, TempDir, WAIT};
use bytes::Bytes;
use msgc::config::Config;
use msgc::protocol::{ErrorCode, Frame, FrameType, GroupName, Welcome};
use msgc::server::{Error, Live, Server};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What the server logs when a SIGHUP leaves the running settings alone.
const NOT_RELOADED: &str = " not reloaded, the running settings stay: ";

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

/// A one-node `msgc-server` (the config of [`NodeProc::solo`], written to
/// `solo.conf` in `dir`) whose log is read; returns once it listens.
fn logged_solo(dir: &TempDir, ip: &str, extra: &str) -> (Logged, SocketAddr, PathBuf) {
    let at = addr(ip, free_port(&[ip]));
    let config = dir.write("solo.conf", &solo_text(at, extra));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_msgc-server"));
    cmd.arg("--config")
        .arg(&config)
        .args(["--node", "solo"])
        .env_remove("RUST_LOG");
    let mut server = Logged::spawn_cmd(cmd);
    server.wait_line("the start-up banner", |l| {
        l.starts_with("msgc-server: node solo listening on ")
    });
    (server, at, config)
}

/// Rewrites the config at `path` for a server on `at`, and sends SIGHUP.
fn reconfigure(server: &Logged, path: &Path, at: SocketAddr, extra: &str) {
    std::fs::write(path, solo_text(at, extra)).expect("rewrite config");
    hup(server);
}

fn hup(server: &Logged) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
}

/// The `WELCOME` a new client connection gets: the settings in force.
fn welcome(at: SocketAddr) -> Welcome {
    Raw::client_with(at, 0).1
}

fn publish(r: &mut Raw, g: &GroupName, len: usize) {
    r.send(&Frame::Publish {
        group: g.clone(),
        payload: Bytes::from(vec![b'p'; len]),
    });
}

/// The payload of the next message delivered to `r` (other frames skipped).
fn delivered(r: &mut Raw) -> Bytes {
    for _ in 0..1000 {
        match r.recv() {
            Some(Frame::Deliver { payload, .. }) => return payload,
            Some(_) => {}
            None => panic!("no message delivered: the connection closed or went quiet"),
        }
    }
    panic!("1000 frames without a message");
}

/// The code of the `ERROR` that `r` gets, after which the server must
/// close the connection.
fn error_then_closed(r: &mut Raw) -> ErrorCode {
    for _ in 0..1000 {
        match r.recv() {
            Some(Frame::Error { code, .. }) => {
                assert!(r.closed(), "the connection stays open after ERROR");
                return code;
            }
            Some(_) => {}
            None => panic!("the connection closed (or went quiet) without an ERROR"),
        }
    }
    panic!("1000 frames without an ERROR");
}

/// A connection that sends garbage (a 4 GiB length prefix) and is closed
/// for it: a "bad input" event, logged at INFO.
fn bad_input(at: SocketAddr) {
    let mut raw = Raw::connect(at);
    raw.send_bytes(&[0xff; 16]);
    assert!(raw.closed(), "a connection sending garbage is closed");
}

// ------------------------------------------------------------ a file that does not parse

/// A reload of a file that does not parse changes nothing, and the server
/// logs why (the file, line and column, and what is wrong): the
/// max_message_size and debug_level that the broken file would have set
/// are not in force, and connections opened before it and after it are
/// served.
#[test]
fn a_file_that_does_not_parse_changes_nothing_and_the_log_says_why() {
    let dir = TempDir::new("reload-broken");
    let before = "shards = 1\n  max_message_size = 4096";
    let (mut server, at, config) = logged_solo(&dir, "127.0.0.111", before);
    let g = group("reload.broken");
    let mut sub = Raw::client(at);
    join(&mut sub, &g);
    let mut publisher = Raw::client(at);

    // Line 6, column 3 of the file: `= broken`.
    let broken = "shards = 1\n  max_message_size = 1000\n  debug_level = INFO\n  = broken";
    reconfigure(&server, &config, at, broken);
    let why = server.wait_line("the reload's refusal", |l| l.contains(NOT_RELOADED));
    assert!(
        why.contains(&format!(
            "{}{NOT_RELOADED}{}:6:3: expected an option name",
            config.display(),
            config.display()
        )),
        "{why}"
    );

    // max_message_size is still 4096: announced to new clients, and a
    // 2,000-byte message (over the broken file's 1000) passes on a
    // connection opened before the reload.
    assert_eq!(welcome(at).max_message_size, 4096);
    publish(&mut publisher, &g, 2000);
    assert_eq!(delivered(&mut sub).len(), 2000);
    // A client that connects now joins, publishes and receives.
    let mut late = Raw::client(at);
    join(&mut late, &g);
    publish(&mut late, &g, 10);
    assert_eq!(delivered(&mut late).len(), 10);
    assert_eq!(delivered(&mut sub).len(), 10);

    // debug_level is still ERROR: a bad connection (INFO) is not logged
    // before the next refusal (ERROR) is.
    bad_input(at);
    hup(&server);
    server.wait_line("the second refusal", |l| l.contains(NOT_RELOADED));
    assert!(!server.log().contains("bad input"), "{}", server.log());
}

// ------------------------------------------------------------ settings that need a restart

/// A server started in this process, shut down on drop.
struct InProcess(Option<Server>);

impl InProcess {
    fn start(config: &Config) -> Self {
        Self(Some(Server::start(config, None).expect("server starts")))
    }

    fn server(&self) -> &Server {
        self.0.as_ref().expect("running")
    }

    fn addr(&self) -> SocketAddr {
        self.server().local_addrs()[0]
    }

    fn live(&self) -> Live {
        *self
            .server()
            .shared()
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.shutdown();
        }
    }
}

/// A one-shard config: `node`, `io_backend` and the listen address as
/// given, `extra` inside `msgc_server { }`.
fn config(node: &str, backend: &str, listen: &str, extra: &str) -> Config {
    let text = format!(
        "msgc_server {{\n  node = \"{node}\"\n  shards = 1\n  io_backend = {backend}\n  {extra}\n}}\n\
         msgcserver_listener {{\n  listen \"{listen}\" {{ }}\n}}\n"
    );
    Config::parse_str("reload.conf", &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Reloads `config`, which must be refused for `what`; the live settings
/// and what new clients are told stay as they were.
fn assert_refused(srv: &InProcess, config: &Config, what: &str) {
    let before = srv.live();
    match srv.server().reload(config, None) {
        Err(e @ Error::NeedsRestart(w)) => {
            assert_eq!(w, what);
            assert_eq!(
                e.to_string(),
                format!("{what} cannot change without a restart")
            );
        }
        other => panic!("a reload changing {what}: expected NeedsRestart, got {other:?}"),
    }
    assert_eq!(
        srv.live(),
        before,
        "a refused reload of {what} changed a setting"
    );
    assert_eq!(welcome(srv.addr()).max_message_size, 4096, "{what}");
}

/// A reload that changes `node`, `io_backend` or the listen address is
/// refused with what needs a restart, and changes nothing: the live
/// setting changed in the same file (max_message_size) stays as it was.
/// The same change alone is then accepted and seen by new clients.
#[test]
fn a_reload_of_node_io_backend_or_listen_is_refused_and_changes_nothing() {
    const LISTEN: &str = "127.0.0.112:0";
    let srv = InProcess::start(&config("fixed", "epoll", LISTEN, "max_message_size = 4096"));
    let smaller = "max_message_size = 1000";
    assert_refused(&srv, &config("other", "epoll", LISTEN, smaller), "node");
    assert_refused(
        &srv,
        &config("fixed", "uring", LISTEN, smaller),
        "io_backend",
    );
    assert_refused(
        &srv,
        &config("fixed", "epoll", "127.0.0.113:0", smaller),
        "the listen address",
    );
    assert_refused(
        &srv,
        &config("fixed", "epoll", "127.0.0.112:1", smaller),
        "the listen address",
    );
    // Unchanged otherwise, the smaller limit applies.
    srv.server()
        .reload(&config("fixed", "epoll", LISTEN, smaller), None)
        .expect("a reload of max_message_size alone is applied");
    wait_for("new clients to be told the new limit", WAIT, || {
        welcome(srv.addr()).max_message_size == 1000
    });
}

/// `tls_certificate` and `tls_key` for a certificate of `ip` made here,
/// written to `NAME.crt` and `NAME.key` in `dir`.
fn tls_lines(dir: &TempDir, name: &str, ip: &str) -> (String, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec![ip.to_owned()]).expect("certificate");
    let cert = dir.write(&format!("{name}.crt"), &made.cert.pem());
    let key = dir.write(&format!("{name}.key"), &made.key_pair.serialize_pem());
    let lines = format!(
        "tls_certificate = \"{}\"\n  tls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    (lines, cert)
}

/// A reload that changes a `tls_*` option is refused (TLS turned on or
/// off, another certificate, a CA added, client certificates required)
/// and changes nothing; the same TLS options reload.
#[test]
fn a_reload_that_changes_a_tls_option_is_refused() {
    const IP: &str = "127.0.0.114";
    let listen = format!("{IP}:0");
    let dir = TempDir::new("reload-tls");
    let (tls, cert) = tls_lines(&dir, "server", IP);
    let (other, _) = tls_lines(&dir, "other", IP);
    let ca = format!("tls_ca = \"{}\"", cert.display());
    let what = "TLS (tls_*)";
    let conf = |extra: &str| config("fixed", "epoll", &listen, extra);

    // A plain server: turning TLS on needs a restart.
    let plain = InProcess::start(&conf("max_message_size = 4096"));
    assert_refused(
        &plain,
        &conf(&format!("max_message_size = 1000\n  {tls}")),
        what,
    );
    drop(plain);

    let with_tls = |extra: &str| conf(&format!("max_message_size = 4096\n  {extra}"));
    let srv = InProcess::start(&with_tls(&tls));
    let before = srv.live();
    for (change, file) in [
        ("off", conf("max_message_size = 1000")),
        ("another certificate", with_tls(&other)),
        ("a CA", with_tls(&format!("{tls}\n  {ca}"))),
        (
            "client certificates",
            with_tls(&format!("{tls}\n  {ca}\n  tls_client_auth = true")),
        ),
    ] {
        let got = srv.server().reload(&file, None);
        assert!(
            matches!(got, Err(Error::NeedsRestart(w)) if w == what),
            "TLS {change}: {got:?}"
        );
        assert_eq!(srv.live(), before, "TLS {change}: a setting changed");
    }
    srv.server()
        .reload(&with_tls(&tls), None)
        .expect("the same TLS options reload");
}

/// A SIGHUP whose file moves the listen address is refused: the log says
/// so, the old address still serves (with the max_message_size of before,
/// not the file's), and nothing listens on the new one.
#[test]
fn a_sighup_that_moves_the_listen_address_is_refused_and_logged() {
    let dir = TempDir::new("reload-listen");
    let before = "shards = 1\n  max_message_size = 4096";
    let (mut server, at, config) = logged_solo(&dir, "127.0.0.115", before);
    let g = group("reload.listen");
    let mut sub = Raw::client(at);
    join(&mut sub, &g);

    let moved = addr("127.0.0.116", free_port(&["127.0.0.116"]));
    reconfigure(
        &server,
        &config,
        moved,
        "shards = 1\n  max_message_size = 1000",
    );
    let why = server.wait_line("the reload's refusal", |l| l.contains(NOT_RELOADED));
    assert!(
        why.ends_with(&format!(
            "{}{NOT_RELOADED}the listen address cannot change without a restart",
            config.display()
        )),
        "{why}"
    );
    assert_eq!(welcome(at).max_message_size, 4096);
    let mut publisher = Raw::client(at);
    publish(&mut publisher, &g, 2000);
    assert_eq!(delivered(&mut sub).len(), 2000);
    assert!(
        TcpStream::connect_timeout(&moved, Duration::from_secs(2)).is_err(),
        "something listens on {moved}"
    );
    assert!(
        !server.log().contains("SIGHUP: reloaded"),
        "{}",
        server.log()
    );
}

// ------------------------------------------------------------ live settings

/// A lower max_message_size applies live, to connections opened before
/// the reload: a payload at the new limit is delivered; one byte more is
/// `MESSAGE_TOO_LARGE` and closes that connection (PROTOCOL.md section 9);
/// a frame over the new frame limit (limit + 1024) is `TOO_LARGE`. Before
/// the reload a payload four times the new limit passed; other
/// connections are not affected.
#[test]
fn max_message_size_applies_live_to_open_connections() {
    let dir = TempDir::new("reload-size");
    let node = NodeProc::solo(&dir, "127.0.0.117", "shards = 1");
    let g = group("reload.size");
    let mut sub = Raw::client(node.addr);
    join(&mut sub, &g);
    let mut publisher = Raw::client(node.addr);
    let mut framer = Raw::client(node.addr);
    publish(&mut publisher, &g, 4000);
    assert_eq!(delivered(&mut sub).len(), 4000);

    node.reconfigure_solo("shards = 1\n  max_message_size = 1000");
    // One shard: once new clients are told the limit, it is the one in force.
    wait_for("new clients to be told the new limit", WAIT, || {
        welcome(node.addr).max_message_size == 1000
    });
    publish(&mut publisher, &g, 1000);
    assert_eq!(delivered(&mut sub).len(), 1000);
    publish(&mut publisher, &g, 1001);
    assert_eq!(
        error_then_closed(&mut publisher),
        ErrorCode::MESSAGE_TOO_LARGE
    );
    // A length prefix over 1000 + 1024 (the body is not read).
    let mut header = 2025u32.to_be_bytes().to_vec();
    header.push(FrameType::PUBLISH.0);
    framer.send_bytes(&header);
    assert_eq!(error_then_closed(&mut framer), ErrorCode::TOO_LARGE);
    // The member is still served.
    let mut other = Raw::client(node.addr);
    publish(&mut other, &g, 999);
    assert_eq!(delivered(&mut sub).len(), 999);
}

/// debug_level applies live, both ways: at ERROR (the default) a bad
/// connection (an INFO event) is not logged; reloaded to INFO it is (and
/// the reload itself is logged, at INFO); at DEBUG a connection opening is
/// logged, which it was not at INFO; back at ERROR, bad connections are
/// not logged again. A refused reload (ERROR) marks each point in the log.
#[test]
fn debug_level_applies_live() {
    let dir = TempDir::new("reload-level");
    let (mut server, at, config) = logged_solo(&dir, "127.0.0.118", "shards = 1");
    let broken = "shards = 1\n  = broken";
    let refused = |server: &mut Logged| {
        server.wait_line("a refused reload", |l| l.contains(NOT_RELOADED));
    };

    bad_input(at);
    reconfigure(&server, &config, at, broken);
    refused(&mut server);
    assert!(!server.log().contains("bad input"), "{}", server.log());

    reconfigure(&server, &config, at, "shards = 1\n  debug_level = INFO");
    server.wait_line("the reload, logged at INFO", |l| {
        l.contains(&format!("SIGHUP: reloaded {}", config.display()))
    });
    bad_input(at);
    let line = server.wait_line("the bad connection at INFO", |l| l.contains("bad input"));
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        !server.log().contains("connection opened"),
        "{}",
        server.log()
    );

    reconfigure(&server, &config, at, "shards = 1\n  debug_level = DEBUG");
    server.wait_line("the reload to DEBUG", |l| l.contains("SIGHUP: reloaded"));
    drop(Raw::client(at));
    let line = server.wait_line("a connection opened, at DEBUG", |l| {
        l.contains("connection opened")
    });
    assert!(line.contains(" DEBUG "), "{line}");

    // Back to ERROR: once new clients see the file's max_message_size it
    // has been read, and the next (refused) reload comes after it.
    reconfigure(
        &server,
        &config,
        at,
        "shards = 1\n  debug_level = ERROR\n  max_message_size = 5000",
    );
    wait_for("the reload back to ERROR", WAIT, || {
        welcome(at).max_message_size == 5000
    });
    reconfigure(&server, &config, at, broken);
    refused(&mut server);
    let logged = server.log().matches("bad input").count();
    bad_input(at);
    hup(&server);
    refused(&mut server);
    assert_eq!(
        server.log().matches("bad input").count(),
        logged,
        "{}",
        server.log()
    );
}

/// The settings a server runs with are README's defaults (its option
/// table, read here), and a reload that changes the live ones shows in
/// the stats document's `settings` at once, the inboxes' bound included.
#[test]
fn the_settings_in_force_are_readmes_defaults_and_a_reload_changes_them() {
    let readme = include_str!("../../README.md");
    let defaults: std::collections::HashMap<&str, &str> = readme
        .lines()
        .filter_map(|l| {
            let mut cells = l.strip_prefix("| `")?.split(" | ");
            let name = cells.next()?.strip_suffix('`')?;
            Some((name, cells.next()?))
        })
        .collect();
    let dir = TempDir::new("reload-settings");
    let node = NodeProc::solo(&dir, "127.0.0.131", "");
    let st = crate::util::raw_stats(node.addr);
    let settings = st["settings"].as_object().expect("settings").clone();
    assert!(settings.len() >= 17, "{st}");
    for (name, value) in &settings {
        let doc = defaults
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{name} is not in README's option table"));
        let want: serde_json::Value = match *doc {
            "none" => serde_json::Value::Null,
            d => serde_json::from_str(d).unwrap_or_else(|_| panic!("{name}: default {d:?}")),
        };
        let same = match (value.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => *value == want,
        };
        assert!(same, "{name}: running {value}, README says {doc}");
    }

    node.reconfigure_solo(
        "messages_per_iter = 7\n shard_inbox_bytes = 1048576\n stuck_timeout = 1.5\n \
         max_backlog = 1234\n idle_timeout = 44",
    );
    let mut now = serde_json::Value::Null;
    wait_for("the reload to show in the settings", WAIT, || {
        now = crate::util::raw_stats(node.addr);
        now["settings"]["messages_per_iter"] == 7
    });
    let set = &now["settings"];
    assert_eq!(set["shard_inbox_bytes"], 1_048_576, "{set}");
    assert_eq!(set["stuck_timeout"], 1.5, "{set}");
    assert_eq!(set["max_backlog"], 1234, "{set}");
    assert_eq!(set["idle_timeout"], 44.0, "{set}");
    for inbox in now["inboxes"].as_array().expect("inboxes") {
        assert_eq!(inbox["limit_bytes"], 1_048_576, "{inbox}");
    }
}
