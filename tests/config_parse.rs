//! Black-box tests of `msgc::config`: the seed's sample files parse
//! unchanged with the seed's defaults, includes, merging, warnings, and a
//! table of bad files with their exact `line:col`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use msgc::config::{
    ClientSettings, Config, DebugLevel, Error, IoBackend, ListenerSettings, Peer, ServerSettings,
};

/// The seed's msgc_server sample, verbatim.
const SEED_SERVER: &str = r#"# NOTE: This file MUST live in the global portion of the repository, as it
# must be the same for all nodes in the cluster.

msgc_server {
   peers = [
     node1 = "192.168.0.10"
     node2 = "192.168.0.11"
     manager = "192.168.0.12"
   ]
}
"#;

/// The seed's msgcserver_listener sample, verbatim.
const SEED_LISTENER: &str = r#"msgcserver_listener {
   listen ":4809" { }
}
"#;

/// The seed's msgc_client sample, verbatim.
const SEED_CLIENT: &str = r#"msgc_client {
   server = ( "127.0.0.1:4809" )
}
"#;

fn parse(text: &str) -> Config {
    match Config::parse_str("test.conf", text) {
        Ok(cfg) => cfg,
        Err(e) => panic!("expected a valid config, got:\n{e}\n--- text ---\n{text}"),
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn peer(name: &str, host: &str, port: Option<u16>) -> Peer {
    Peer {
        name: name.into(),
        host: host.into(),
        port,
    }
}

fn seed_peers() -> Vec<Peer> {
    vec![
        peer("node1", "192.168.0.10", None),
        peer("node2", "192.168.0.11", None),
        peer("manager", "192.168.0.12", None),
    ]
}

/// Every server field except `peers` has the seed's (or our documented)
/// default.
fn assert_server_defaults(s: &ServerSettings) {
    assert_eq!(s.connect_timeout, secs(60));
    assert_eq!(s.debug_level, DebugLevel::Error);
    assert_eq!(s.idle_timeout, secs(30));
    assert_eq!(s.keepalive_interval, secs(5));
    assert_eq!(s.max_backlog, 5000);
    assert_eq!(s.max_backlog_bytes, 16 << 20);
    assert_eq!(s.stuck_timeout, Duration::from_millis(200));
    assert_eq!(s.handshake_timeout, secs(5));
    assert_eq!(
        (s.peer_max_backlog, s.peer_max_backlog_bytes),
        (50_000, 64 << 20)
    );
    assert_eq!(s.peer_stuck_timeout, secs(2));
    assert_eq!(s.shard_inbox_bytes, 4 << 20);
    assert_eq!(s.messages_per_iter, 20);
    assert_eq!(s.port, 4809);
    assert_eq!(s.reconnect_interval, secs(5));
    assert_eq!(s.tcpbuf_size, 131_072);
    assert_eq!(s.bind_address, None);
    assert_eq!(s.node, None);
    assert_eq!(s.shards, None);
    assert_eq!(s.io_backend, IoBackend::Auto);
    assert_eq!(s.max_message_size, 1_048_576);
}

fn assert_client_defaults(c: &ClientSettings) {
    assert_eq!(c.server, vec!["127.0.0.1:4809".to_string()]);
    assert_eq!(c.bind_address, None);
    assert_eq!(c.connect_timeout, secs(60));
    assert_eq!(c.debug_level, DebugLevel::Error);
    assert_eq!(c.idle_timeout, secs(30));
    assert_eq!(c.keepalive_interval, secs(5));
    assert_eq!(c.max_backlog, 5000);
    assert_eq!(c.messages_per_iter, 20);
    assert_eq!(c.reconnect_interval, secs(5));
    assert_eq!(c.tcpbuf_size, 131_072);
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

#[test]
fn defaults_are_the_seeds() {
    let cfg = Config::default();
    assert_server_defaults(&cfg.server);
    assert!(cfg.server.peers.is_empty());
    assert_client_defaults(&cfg.client);
    assert_eq!(cfg.listener, ListenerSettings::default());
    assert_eq!(
        cfg.listen_addrs(None),
        vec!["127.0.0.1:4809".parse::<SocketAddr>().expect("addr")]
    );
    assert_eq!(DebugLevel::default().as_tracing_filter(), "error");
    assert_eq!(parse(""), Config::default());
}

#[test]
fn seed_server_sample_alone() {
    let cfg = parse(SEED_SERVER);
    assert_eq!(cfg.server.peers, seed_peers());
    assert_server_defaults(&cfg.server);
    assert_client_defaults(&cfg.client);
    assert!(cfg.listener.listen.is_empty());
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    assert!(cfg.is_set("msgc_server", "peers"));
    assert!(!cfg.is_set("msgc_server", "port"));
    assert_eq!(
        cfg.server.peers[1].addr_string(cfg.server.port),
        "192.168.0.11:4809"
    );
}

#[test]
fn seed_listener_sample_alone() {
    let cfg = parse(SEED_LISTENER);
    assert_eq!(cfg.listener.listen.len(), 1);
    assert_eq!(cfg.listener.listen[0].socket_addr(), any(4809));
    assert_server_defaults(&cfg.server);
    assert_client_defaults(&cfg.client);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn seed_client_sample_alone() {
    let cfg = parse(SEED_CLIENT);
    assert_client_defaults(&cfg.client);
    assert!(cfg.is_set("msgc_client", "server"));
    assert_server_defaults(&cfg.server);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn seed_samples_together() {
    let text = format!("{SEED_SERVER}{SEED_LISTENER}{SEED_CLIENT}");
    let cfg = parse(&text);
    assert_eq!(cfg.server.peers, seed_peers());
    assert_server_defaults(&cfg.server);
    assert_eq!(cfg.listen_addrs(None), vec![any(4809)]);
    assert_client_defaults(&cfg.client);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    let rendered = cfg.render_effective();
    assert!(
        rendered.contains("  peers = [ node1 = \"192.168.0.10\""),
        "{rendered}"
    );
    assert!(
        rendered.contains("  connect_timeout = 60  # default\n"),
        "{rendered}"
    );
    assert!(rendered.contains("  listen \":4809\" { }\n"), "{rendered}");
}

#[test]
fn peers_with_ports_and_ipv6_and_node() {
    let cfg = parse(
        r#"msgc_server {
             port = 5000
             peers = [ a = "127.0.0.1" , b = "127.0.0.2:6000"; "c" = "[::1]:7000" d = "::2" ]
             node = b
           }"#,
    );
    let s = &cfg.server;
    assert_eq!(
        s.peers,
        vec![
            peer("a", "127.0.0.1", None),
            peer("b", "127.0.0.2", Some(6000)),
            peer("c", "::1", Some(7000)),
            peer("d", "::2", None),
        ]
    );
    let addrs: Vec<String> = s.peers.iter().map(|p| p.addr_string(s.port)).collect();
    assert_eq!(
        addrs,
        [
            "127.0.0.1:5000",
            "127.0.0.2:6000",
            "[::1]:7000",
            "[::2]:5000"
        ]
    );
    assert_eq!(s.local_peer().map(|p| p.name.as_str()), Some("b"));
    assert_eq!(s.peers[0].port_or(s.port), 5000);
}

#[test]
fn every_option_set_explicitly() {
    let cfg = parse(
        r#"msgc_server {
             bind_address = 10.0.0.5; connect_timeout = "2"; debug_level = warning
             idle_timeout = 0.5; io_backend = EPOLL; keepalive_interval = 1
             max_backlog = "100"; max_message_size = 4096; messages_per_iter = 7
             port = 4900; reconnect_interval = 0.25; shards = 3; tcpbuf_size = 0
             max_backlog_bytes = 65536; stuck_timeout = 0.05; handshake_timeout = 3
             peer_max_backlog = 7000; peer_max_backlog_bytes = "1048576"
             peer_stuck_timeout = 1.5; shard_inbox_bytes = 131072
             monitor = "127.0.0.1:8249"; lame_duck_duration = 4
             cluster_key = "0123456789abcdef-key"
             users = [ u = [ password = "$argon2id$v=19$m=64,t=1,p=1$G1vvEDzHRqtM9z1KVFKNSA$iW7w0V0rRLqMeu3KRxCvSCRnfscNv6kRjkmSorig0XM" join = "a.*" ] ]
           }
           msgc_client {
             server = "h:1"; bind_address = "::1"; connect_timeout = 3; debug_level = Debug
             idle_timeout = 4; keepalive_interval = 2; max_backlog = 9; messages_per_iter = 1
             reconnect_interval = 1.5; tcpbuf_size = 4096
           }"#,
    );
    let s = &cfg.server;
    assert_eq!(s.bind_address, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))));
    assert_eq!(
        (s.connect_timeout, s.idle_timeout),
        (secs(2), Duration::from_millis(500))
    );
    assert_eq!(
        (s.debug_level, s.io_backend),
        (DebugLevel::Warning, IoBackend::Epoll)
    );
    assert_eq!(
        (s.max_backlog, s.max_message_size, s.messages_per_iter),
        (100, 4096, 7)
    );
    assert_eq!((s.port, s.shards, s.tcpbuf_size), (4900, Some(3), 0));
    assert_eq!(s.reconnect_interval, Duration::from_millis(250));
    assert_eq!(
        (s.max_backlog_bytes, s.stuck_timeout, s.handshake_timeout),
        (65536, Duration::from_millis(50), secs(3))
    );
    assert_eq!(
        (
            s.peer_max_backlog,
            s.peer_max_backlog_bytes,
            s.peer_stuck_timeout
        ),
        (7000, 1 << 20, Duration::from_millis(1500))
    );
    assert_eq!(s.shard_inbox_bytes, 131072);
    assert_eq!(s.monitor, "127.0.0.1:8249".parse().ok());
    assert_eq!(s.lame_duck_duration, secs(4));
    let key = s.cluster_key.as_ref().map(|k| k.expose());
    assert_eq!(key, Some(&b"0123456789abcdef-key"[..]));
    assert!(!format!("{s:?}").contains("0123456789abcdef-key"));
    assert_eq!(s.users.len(), 1);
    assert!(s.users[0].permissions.join.matches(b"a.b"));
    let c = &cfg.client;
    assert_eq!(c.server, vec!["h:1".to_string()]);
    assert_eq!(c.bind_address, "::1".parse().ok());
    assert_eq!(
        (c.connect_timeout, c.idle_timeout, c.keepalive_interval),
        (secs(3), secs(4), secs(2))
    );
    assert_eq!(
        (c.debug_level, c.max_backlog, c.messages_per_iter),
        (DebugLevel::Debug, 9, 1)
    );
    assert_eq!(
        (c.reconnect_interval, c.tcpbuf_size),
        (Duration::from_millis(1500), 4096)
    );
    let rendered = cfg.render_effective();
    assert!(
        rendered.contains("  cluster_key = \"<secret>\"\n"),
        "{rendered}"
    );
    assert!(!rendered.contains("0123456789abcdef-key"), "{rendered}");
    let defaults: Vec<&str> = rendered
        .lines()
        .filter(|l| l.ends_with("# default"))
        .collect();
    assert_eq!(
        defaults,
        [
            "  cluster_key_file = \"\"  # default",
            "  node = \"\"  # default",
            "  peers = [ ]  # default",
            // The tls_* options name files: tests/it/tls.rs sets them.
            "  tls_ca = \"\"  # default",
            "  tls_certificate = \"\"  # default",
            "  tls_client_auth = false  # default",
            "  tls_key = \"\"  # default",
            "  listen \"127.0.0.1:4900\" { }  # default"
        ],
        "{rendered}"
    );
}

#[test]
fn names_are_case_insensitive() {
    let cfg = parse(
        r#"MSGC_Server { Port = 5000; CONNECT_TIMEOUT = 2; Debug_Level = info }
           Msgcserver_Listener { LISTEN ":5000" { } }
           msgc_CLIENT { SERVER = ( "127.0.0.1:5000" ) }"#,
    );
    assert_eq!(
        (cfg.server.port, cfg.server.connect_timeout),
        (5000, secs(2))
    );
    assert_eq!(cfg.server.debug_level, DebugLevel::Info);
    assert_eq!(cfg.listen_addrs(None), vec![any(5000)]);
    assert_eq!(cfg.client.server, vec!["127.0.0.1:5000".to_string()]);
    assert!(cfg.is_set("msgc_server", "connect_timeout"));
}

#[test]
fn comments_everywhere_and_lists_with_or_without_commas() {
    let cfg = parse(
        "# leading comment\n\
         msgc_client { # after brace\n\
           server = ( \"a:1\" \"b:2\", \"c:3\",   # mid-list\n\
                      \"[::1]:4\" ) # after list\n\
           # port = 1\n\
         } # trailing\n",
    );
    assert_eq!(cfg.client.server, ["a:1", "b:2", "c:3", "[::1]:4"]);
}

#[test]
fn scopes_merge_and_duplicates_warn() {
    let cfg = parse(
        "msgc_server { port = 5000 peers = [ a = \"10.0.0.1\" ] idle_timeout = 9 }\n\
         msgc_server { peers = [ b = \"10.0.0.2\" ] }\n\
         msgc_server { port = 6000\n port = 7000 }\n",
    );
    assert_eq!(
        cfg.server.port, 7000,
        "later scopes and later keys override"
    );
    assert_eq!(
        cfg.server.peers,
        vec![peer("b", "10.0.0.2", None)],
        "peers replaced"
    );
    assert_eq!(
        cfg.server.idle_timeout,
        secs(9),
        "untouched keys survive the merge"
    );
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    let w = cfg.warnings[0].to_string();
    assert!(
        w.starts_with("test.conf:4:2: `port` is set twice in this scope"),
        "{w}"
    );
}

#[test]
fn unknown_scopes_and_listener_options_are_warnings() {
    let cfg = parse(
        "ec_logger { anything = 1 }\n\
         msgcserver_listener {\n  concurrency = 4\n  listen \"127.0.0.1:4809\" { enable = true }\n}\n",
    );
    let warnings: Vec<String> = cfg.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].starts_with("test.conf:1:1: ignoring scope `ec_logger`"));
    assert!(warnings[1].starts_with("test.conf:3:3: ignoring option `concurrency`"));
    assert!(warnings[2].starts_with("test.conf:4:29: ignoring `enable`"));
    let listen: Vec<SocketAddr> = cfg
        .listener
        .listen
        .iter()
        .map(|a| a.socket_addr())
        .collect();
    assert_eq!(listen, vec!["127.0.0.1:4809".parse().expect("addr")]);
}

#[test]
fn listener_on_another_port_than_port_warns() {
    let cfg = parse("msgcserver_listener { listen \"[::1]:5000\" { } listen \":5001\" { } }");
    assert_eq!(cfg.listener.listen.len(), 2);
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0]
        .message
        .contains("no listen address uses msgc_server port 4809"));
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("msgc-config-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        // Include-cycle messages name canonical paths (/tmp may be a link).
        TempDir(std::fs::canonicalize(&dir).unwrap_or(dir))
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(&path, text).expect("write fixture");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn include_is_relative_to_the_including_file() {
    let tmp = TempDir::new("include");
    let main = tmp.write(
        "etc/main.conf",
        "include \"conf.d/server.conf\"\ninclude listener.conf\n",
    );
    tmp.write(
        "etc/conf.d/server.conf",
        "msgc_server {\n include \"peers.conf\"\n port = 5000\n}\n",
    );
    tmp.write(
        "etc/conf.d/peers.conf",
        "peers = [ a = \"10.0.0.1\" ]\nnode = a\n",
    );
    tmp.write(
        "etc/listener.conf",
        "msgcserver_listener { listen \":5000\" { } }\n",
    );
    tmp.write("elsewhere/listener.conf", "this file must not be read {");
    let cfg = Config::load(&main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.server.peers, vec![peer("a", "10.0.0.1", None)]);
    assert_eq!(
        (cfg.server.port, cfg.server.node.as_deref()),
        (5000, Some("a"))
    );
    assert_eq!(cfg.listen_addrs(None), vec![any(5000)]);
    let names: Vec<String> = cfg
        .sources
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(
        names,
        ["main.conf", "server.conf", "peers.conf", "listener.conf"]
    );
}

#[test]
fn parse_str_includes_resolve_against_the_working_directory() {
    // Cargo runs integration tests in the package root.
    let cfg = parse("include \"tests/data/config/cluster.conf\"");
    assert_eq!(
        cfg.server.peers[1],
        peer("node2", "192.168.0.11", Some(4900))
    );
    assert_eq!(
        cfg.server.local_peer().map(|p| p.name.as_str()),
        Some("node2")
    );
    assert_client_defaults(&cfg.client);
    assert_eq!(
        cfg.warnings.len(),
        1,
        "only `cluster` is foreign: {:?}",
        cfg.warnings
    );
    assert!(cfg.warnings[0].file.ends_with("cluster.conf"));
    assert_eq!(cfg.sources.len(), 2);
}

#[test]
fn load_reports_an_unreadable_top_file_as_io() {
    let err = Config::load(Path::new("/nonexistent/msgc.conf")).expect_err("missing file");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("/nonexistent/msgc.conf: "),
        "{err}"
    );
}

#[test]
fn errors_are_collected_and_printed_one_per_line() {
    let text = "msgc_server {\n  prot = 1\n  port = x\n}\nmsgc_client { idle_timeout = 0 }\n";
    let err = Config::parse_str("multi.conf", text).expect_err("invalid");
    let printed = err.to_string();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 3, "{printed}");
    assert!(lines[0].starts_with("multi.conf:2:3: unknown option `prot` in msgc_server; valid options: bind_address, cluster_key, cluster_key_file, connect_timeout, debug_level, handshake_timeout, idle_timeout, io_backend,"), "{printed}");
    assert_eq!(
        lines[1],
        "multi.conf:3:10: port: expected an integer, found `x`"
    );
    assert_eq!(
        lines[2],
        "multi.conf:5:30: idle_timeout: must be greater than 0 seconds, found 0"
    );
    assert_eq!(err.diagnostics().len(), 3);
}

/// A bad file: its text, where the first error is, and part of its message.
struct Bad {
    text: String,
    line: u32,
    col: u32,
    needle: String,
}

/// The cases of `tests/data/config/bad_cases.txt` (format described there).
fn bad_configs(tmp: &TempDir) -> Vec<Bad> {
    tmp.write("cycle/a.conf", "include \"b.conf\"\n");
    tmp.write("cycle/b.conf", "# b\ninclude \"a.conf\"\n");
    let dir = tmp.0.display().to_string();
    let table = include_str!("data/config/bad_cases.txt").replace("{TMP}", &dir);
    let mut cases: Vec<Bad> = Vec::new();
    for line in table.lines() {
        if let Some(header) = line.strip_prefix("=== ") {
            let (pos, needle) = header.split_once(" | ").expect("`=== L:C | text`");
            let (l, c) = pos.split_once(':').expect("L:C");
            cases.push(Bad {
                text: String::new(),
                line: l.parse().expect("line"),
                col: c.parse().expect("col"),
                needle: needle.to_string(),
            });
        } else if let Some(case) = cases.last_mut() {
            case.text.push_str(line);
            case.text.push('\n');
        }
    }
    cases
}

fn check_bad(case: &Bad) -> Result<(), String> {
    let diags = match Config::parse_str("bad.conf", &case.text) {
        Ok(_) => return Err(format!("{:?}: parsed, expected an error", case.text)),
        Err(e) => e.diagnostics().to_vec(),
    };
    let first = diags
        .first()
        .ok_or_else(|| format!("{:?}: no diagnostics", case.text))?;
    if (first.line, first.col) == (case.line, case.col) && first.message.contains(&case.needle) {
        return Ok(());
    }
    Err(format!(
        "{:?}\n   expected {}:{} containing {:?}\n   got      {first}",
        case.text, case.line, case.col, case.needle
    ))
}

#[test]
fn bad_configs_report_line_col_and_reason() {
    let tmp = TempDir::new("bad");
    let cases = bad_configs(&tmp);
    assert!(cases.len() >= 15, "only {} cases", cases.len());
    let failures: Vec<String> = cases.iter().filter_map(|c| check_bad(c).err()).collect();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn error_file_names_point_into_includes() {
    let tmp = TempDir::new("errfile");
    let main = tmp.write("main.conf", "include \"sub/x.conf\"\n");
    tmp.write("sub/x.conf", "msgc_client {\n  idle_timeout = never\n}\n");
    let err = Config::load(&main).expect_err("invalid");
    let first = &err.diagnostics()[0];
    assert!(first.file.ends_with("x.conf"), "{first}");
    assert_eq!((first.line, first.col), (2, 18));
}

#[test]
fn fuzz_entry_point_never_touches_files_and_never_panics() {
    let err =
        msgc::config::parse_for_fuzz("include \"/etc/passwd\"").expect_err("includes refused");
    assert!(err.to_string().contains("includes are disabled"), "{err}");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let alphabet: Vec<char> = "{}()[]=;,\"#\\\n ab1.:-".chars().collect();
    for _ in 0..2000 {
        let text: String = (0..64)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                alphabet[(seed % alphabet.len() as u64) as usize]
            })
            .collect();
        let _ = msgc::config::parse_for_fuzz(&text);
    }
}

#[test]
fn monitor_is_an_address_or_off() {
    let cfg = Config::parse_str("m.conf", "msgc_server { monitor = \"127.0.0.1:8249\" }\n")
        .expect("valid");
    let want: SocketAddr = "127.0.0.1:8249".parse().expect("addr");
    assert_eq!(cfg.server.monitor, Some(want));
    let text = cfg.render_effective();
    assert!(text.contains("  monitor = \"127.0.0.1:8249\"\n"), "{text}");
    let off = Config::default().render_effective();
    assert!(off.contains("  monitor = \"\"  # default\n"), "{off}");
    let v6 = Config::parse_str("m.conf", "msgc_server { monitor = \"[::1]:9\" }\n").expect("v6");
    assert_eq!(v6.server.monitor, "[::1]:9".parse().ok());
    let err = Config::parse_str("m.conf", "msgc_server {\n  monitor = 8249\n}\n")
        .expect_err("a port alone is not an address")
        .to_string();
    assert!(
        err.starts_with("m.conf:2:13: monitor: expected IP:PORT"),
        "{err}"
    );
}

/// A node meshes with at most 256 others: a `peers` of 258 nodes is refused
/// at load with its line, 257 (this node and 256 others) is accepted.
#[test]
fn peers_beyond_the_mesh_are_refused_at_load() {
    let text = |n: usize| {
        let peers: String = (0..n)
            .map(|i| format!(" n{i} = \"10.1.{}.{}\"\n", i / 250, i % 250 + 1))
            .collect();
        format!("msgc_server {{\n  node = n0\n  peers = [\n{peers} ]\n}}\n")
    };
    assert_eq!(parse(&text(257)).server.peers.len(), 257);
    let err = Config::parse_str("many.conf", &text(258)).expect_err("258 peers");
    let printed = err.to_string();
    assert!(
        printed.starts_with(
            "many.conf:3:11: peers: 258 nodes listed; at most 257 (this node and 256 others)"
        ),
        "{printed}"
    );
}
