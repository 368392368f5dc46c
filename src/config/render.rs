//! Printing the effective configuration in Momentum syntax.
//!
//! Every option of every stanza, one per line, values not set in the files
//! marked `# default` (or with the caller's note: a command-line flag, a
//! value the server detected). The output parses back to the same settings
//! (a unit test holds us to it), so `msgc-server --check-config x.conf >
//! y.conf` is a valid starting point. Unset optional values print as `""`.
//!
//! The listener is printed as the server would bind it: without `listen`
//! scopes and without peers that is 127.0.0.1 on `port`; with peers it is
//! each node's own address, which only the caller (knowing the node) can
//! print, so it is a comment here.

use std::fmt::Write as _;
use std::time::Duration;

use super::apply::{CLIENT, LISTENER, SERVER};
use super::settings::{ClientSettings, ServerSettings};
use super::types::Peer;
use super::{Config, Notes};

/// The whole effective configuration as Momentum text.
pub(crate) fn render(cfg: &Config, notes: &Notes) -> String {
    let mut out = String::from(
        "# Effective msgc configuration. `# default` marks values not set in the files.\n",
    );
    stanza(&mut out, cfg, notes, SERVER, &server_lines(&cfg.server));
    listener(&mut out, cfg, notes);
    stanza(&mut out, cfg, notes, CLIENT, &client_lines(&cfg.client));
    out
}

/// The comment after `stanza.key`'s line: the note, else `default` when
/// the files do not set it.
fn mark(cfg: &Config, notes: &Notes, stanza: &str, key: &str) -> String {
    let full = format!("{stanza}.{key}").to_ascii_lowercase();
    match notes.get(&full) {
        Some(note) => format!("  # {note}"),
        None if cfg.is_set(stanza, key) => String::new(),
        None => "  # default".to_string(),
    }
}

fn stanza(out: &mut String, cfg: &Config, notes: &Notes, name: &str, lines: &[(&str, String)]) {
    let _ = writeln!(out, "{name} {{");
    for (key, value) in lines {
        let mark = mark(cfg, notes, name, key);
        let _ = writeln!(out, "  {key} = {value}{mark}");
    }
    out.push_str("}\n");
}

fn listener(out: &mut String, cfg: &Config, notes: &Notes) {
    let _ = writeln!(out, "{LISTENER} {{");
    let mark = mark(cfg, notes, LISTENER, "listen");
    if cfg.listener.listen.is_empty() && !cfg.server.peers.is_empty() {
        let _ = writeln!(
            out,
            "  # listen: not set; each node listens on its own address in peers"
        );
    } else {
        for addr in cfg.listen_addrs(None) {
            let addr = super::ListenAddr(addr).to_string();
            let _ = writeln!(out, "  listen {} {{ }}{mark}", quote(&addr));
        }
    }
    out.push_str("}\n");
}

/// `msgc_server` options in table order (sorted).
pub(crate) fn server_lines(s: &ServerSettings) -> Vec<(&'static str, String)> {
    vec![
        (
            "bind_address",
            opt_quote(s.bind_address.map(|ip| ip.to_string())),
        ),
        (
            "cluster_key",
            // Never the key itself; a key read from a file shows as unset
            // here (its file is the next line).
            quote(match (&s.cluster_key, &s.cluster_key_file) {
                (Some(_), None) => "<secret>",
                _ => "",
            }),
        ),
        ("cluster_key_file", opt_quote(s.cluster_key_file.clone())),
        ("connect_timeout", secs(s.connect_timeout)),
        ("debug_level", s.debug_level.to_string()),
        ("handshake_timeout", secs(s.handshake_timeout)),
        ("idle_timeout", secs(s.idle_timeout)),
        ("io_backend", s.io_backend.to_string()),
        ("keepalive_interval", secs(s.keepalive_interval)),
        ("lame_duck_duration", secs(s.lame_duck_duration)),
        ("max_backlog", s.max_backlog.to_string()),
        ("max_backlog_bytes", s.max_backlog_bytes.to_string()),
        ("max_message_size", s.max_message_size.to_string()),
        ("messages_per_iter", s.messages_per_iter.to_string()),
        ("monitor", opt_quote(s.monitor.map(|a| a.to_string()))),
        ("node", opt_quote(s.node.clone())),
        ("peer_max_backlog", s.peer_max_backlog.to_string()),
        (
            "peer_max_backlog_bytes",
            s.peer_max_backlog_bytes.to_string(),
        ),
        ("peer_stuck_timeout", secs(s.peer_stuck_timeout)),
        ("peers", peers(&s.peers)),
        ("port", s.port.to_string()),
        ("reconnect_interval", secs(s.reconnect_interval)),
        ("shard_inbox_bytes", s.shard_inbox_bytes.to_string()),
        (
            "shards",
            s.shards
                .map_or_else(|| "auto".to_string(), |n| n.to_string()),
        ),
        ("stuck_timeout", secs(s.stuck_timeout)),
        ("tcpbuf_size", s.tcpbuf_size.to_string()),
        ("tls_ca", opt_quote(s.tls.ca.clone())),
        ("tls_certificate", opt_quote(s.tls.certificate.clone())),
        ("tls_client_auth", s.tls.client_auth.to_string()),
        ("tls_key", opt_quote(s.tls.key.clone())),
        ("users", users(&s.users)),
    ]
}

/// `users = [ … ]`, each user's fields on the same line.
fn users(users: &[super::User]) -> String {
    if users.is_empty() {
        return "[ ]".to_string();
    }
    let list = |p: &super::Patterns| {
        let q: Vec<String> = p.written().iter().map(|s| quote(s)).collect();
        format!("( {} )", q.join(" "))
    };
    let entries: Vec<String> = users
        .iter()
        .map(|u| {
            let p = &u.permissions;
            format!(
                "{} = [ password = {} join = {} publish = {} members = {} send = {} stats = {} ]",
                key(&u.name),
                quote(&u.password),
                list(&p.join),
                list(&p.publish),
                p.members,
                p.send,
                p.stats
            )
        })
        .collect();
    format!("[ {} ]", entries.join(" "))
}

/// `msgc_client` options in table order (sorted).
pub(crate) fn client_lines(c: &ClientSettings) -> Vec<(&'static str, String)> {
    let servers: Vec<String> = c.server.iter().map(|s| quote(s)).collect();
    vec![
        (
            "bind_address",
            opt_quote(c.bind_address.map(|ip| ip.to_string())),
        ),
        ("connect_timeout", secs(c.connect_timeout)),
        ("debug_level", c.debug_level.to_string()),
        ("idle_timeout", secs(c.idle_timeout)),
        ("keepalive_interval", secs(c.keepalive_interval)),
        ("max_backlog", c.max_backlog.to_string()),
        ("messages_per_iter", c.messages_per_iter.to_string()),
        ("reconnect_interval", secs(c.reconnect_interval)),
        ("server", format!("( {} )", servers.join(" "))),
        ("tcpbuf_size", c.tcpbuf_size.to_string()),
    ]
}

/// Seconds, with a decimal part only when needed (`60`, `0.5`).
fn secs(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        return d.as_secs().to_string();
    }
    let frac = format!("{nanos:09}");
    format!("{}.{}", d.as_secs(), frac.trim_end_matches('0'))
}

fn peers(peers: &[Peer]) -> String {
    if peers.is_empty() {
        return "[ ]".to_string();
    }
    let entries: Vec<String> = peers
        .iter()
        .map(|p| format!("{} = {}", key(&p.name), quote(&p.spec())))
        .collect();
    format!("[ {} ]", entries.join(" "))
}

/// A dictionary key: bare when the lexer would read it back as one word.
fn key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if bare {
        name.to_string()
    } else {
        quote(name)
    }
}

fn opt_quote(value: Option<String>) -> String {
    quote(value.as_deref().unwrap_or(""))
}

/// A Momentum string literal.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::apply::{CLIENT_OPTIONS, SERVER_OPTIONS};

    #[test]
    fn every_option_is_rendered() {
        let server: Vec<&str> = server_lines(&ServerSettings::default())
            .iter()
            .map(|l| l.0)
            .collect();
        let table: Vec<&str> = SERVER_OPTIONS.iter().map(|d| d.name).collect();
        assert_eq!(server, table);
        let client: Vec<&str> = client_lines(&ClientSettings::default())
            .iter()
            .map(|l| l.0)
            .collect();
        let table: Vec<&str> = CLIENT_OPTIONS.iter().map(|d| d.name).collect();
        assert_eq!(client, table);
    }

    #[test]
    fn seconds_and_quotes() {
        assert_eq!(secs(Duration::from_secs(60)), "60");
        assert_eq!(secs(Duration::from_millis(500)), "0.5");
        assert_eq!(secs(Duration::new(1, 1)), "1.000000001");
        assert_eq!(quote("a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(key("node-1"), "node-1");
        assert_eq!(key("a b"), "\"a b\"");
    }

    #[test]
    fn defaults_render_marked_and_parse_back() {
        let cfg = Config::default();
        let text = cfg.render_effective();
        assert!(text.contains("  port = 4809  # default\n"), "{text}");
        assert!(
            text.contains("  listen \"127.0.0.1:4809\" { }  # default\n"),
            "{text}"
        );
        assert!(
            text.contains("  server = ( \"127.0.0.1:4809\" )  # default\n"),
            "{text}"
        );
        let back = Config::parse_str("rendered", &text).expect("rendered text parses");
        assert_eq!((back.server, back.client), (cfg.server, cfg.client));
    }

    #[test]
    fn explicit_values_round_trip_unmarked() {
        let text = r#"
            msgc_server {
              peers = [ a = "10.0.0.1" "b c" = "[::1]:7" ]
              node = a
              keepalive_interval = 0.25
              shards = 4
              bind_address = 10.0.0.1
            }
            msgcserver_listener { listen "127.0.0.1:5000" { } }
            msgc_client { server = ( "h:1", "[::1]:2" ) debug_level = crit }
        "#;
        let cfg = Config::parse_str("t", text).expect("valid");
        let out = cfg.render_effective();
        assert!(out.contains("  keepalive_interval = 0.25\n"), "{out}");
        assert!(
            out.contains("  peers = [ a = \"10.0.0.1\" \"b c\" = \"[::1]:7\" ]\n"),
            "{out}"
        );
        assert!(out.contains("  debug_level = CRITICAL\n"), "{out}");
        let back = Config::parse_str("rendered", &out).expect("rendered text parses");
        assert_eq!(back.server, cfg.server);
        assert_eq!(back.listener, cfg.listener);
        assert_eq!(back.client, cfg.client);
    }

    #[test]
    fn peers_without_listen_say_so_and_notes_replace_default() {
        let cfg =
            Config::parse_str("t", "msgc_server { peers = [ a = \"10.0.0.1\" ] }").expect("valid");
        let out = cfg.render_effective();
        assert!(
            out.contains("  # listen: not set; each node listens on its own address in peers\n"),
            "{out}"
        );
        assert!(!out.contains("listen \""), "{out}");
        let back = Config::parse_str("rendered", &out).expect("rendered text parses");
        assert_eq!(back.listener, cfg.listener);
        let mut notes = Notes::new();
        notes.insert(
            "msgc_server.shards".into(),
            "--shards (command line)".into(),
        );
        notes.insert("msgc_server.peers".into(), "from t".into());
        let out = cfg.render_annotated(&notes);
        assert!(
            out.contains("  shards = auto  # --shards (command line)\n"),
            "{out}"
        );
        assert!(out.contains("\" ]  # from t\n"), "{out}");
    }
}
