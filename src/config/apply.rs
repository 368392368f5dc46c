//! Syntax tree → typed settings: which options each stanza has, how each is
//! read, merging, and the checks that span several options.
//!
//! Rules (documented in `mod.rs`): option and scope names are
//! case-insensitive; scopes of the same name merge in file order, a later
//! value replacing an earlier one (a second `peers` replaces the whole
//! dictionary; `listen` scopes accumulate); an option set twice in *one*
//! scope keeps the last value and earns a warning. Unknown top-level scopes
//! and anything unknown inside `msgcserver_listener` are warnings; every
//! other problem is an error, and all are collected.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::settings::{
    ClientSettings, ListenerSettings, ServerSettings, MAX_BACKLOG, MAX_MESSAGES_PER_ITER,
    MAX_MESSAGE_SIZE, MAX_QUEUE_BYTES, MAX_SHARDS, MAX_TCPBUF, MIN_QUEUE_BYTES, MIN_TCPBUF,
};
use super::source::{Problem, Span};
use super::syntax::{Item, Scope, Spanned, Value};
use super::types::{split_host_port, ClusterKey, ListenAddr, Peer};
use super::values::{
    duration, integer, optional_ip, optional_socket_addr, parsed, scalar, size, string_list,
};

/// Stanza names as they appear in `explicit` keys and messages.
pub(crate) const SERVER: &str = "msgc_server";
pub(crate) const LISTENER: &str = "msgcserver_listener";
pub(crate) const CLIENT: &str = "msgc_client";

/// One or more located problems from reading an option.
pub(crate) struct Problems(Vec<Problem>);

impl From<Problem> for Problems {
    fn from(p: Problem) -> Self {
        Problems(vec![p])
    }
}

type SetResult = Result<(), Problems>;

/// An option of a stanza: its lower-case name and how to read it into `S`.
pub(crate) struct OptionDef<S> {
    pub(crate) name: &'static str,
    set: fn(&mut S, &Spanned<Value>) -> SetResult,
}

const fn opt<S>(name: &'static str, set: fn(&mut S, &Spanned<Value>) -> SetResult) -> OptionDef<S> {
    OptionDef { name, set }
}

fn set<T>(slot: &mut T, value: Result<T, Problem>) -> SetResult {
    *slot = value?;
    Ok(())
}

fn set_secs(slot: &mut Duration, v: &Spanned<Value>) -> SetResult {
    *slot = duration(v)?;
    Ok(())
}

fn set_size(slot: &mut usize, v: &Spanned<Value>, max: usize) -> SetResult {
    *slot = size(v, 1..=max as u64)?;
    Ok(())
}

fn set_bytes(slot: &mut usize, v: &Spanned<Value>) -> SetResult {
    *slot = size(v, MIN_QUEUE_BYTES as u64..=MAX_QUEUE_BYTES as u64)?;
    Ok(())
}

/// `msgc_server` options, sorted (the order of "valid options" lists).
pub(crate) const SERVER_OPTIONS: &[OptionDef<ServerSettings>] = &[
    opt("bind_address", |s, v| {
        set(&mut s.bind_address, optional_ip(v))
    }),
    opt("cluster_key", set_cluster_key),
    opt("cluster_key_file", set_cluster_key_file),
    opt("connect_timeout", |s, v| {
        set_secs(&mut s.connect_timeout, v)
    }),
    opt("debug_level", |s, v| {
        set(&mut s.debug_level, parsed(v, "a debug level"))
    }),
    opt("handshake_timeout", |s, v| {
        set_secs(&mut s.handshake_timeout, v)
    }),
    opt("idle_timeout", |s, v| set_secs(&mut s.idle_timeout, v)),
    opt("io_backend", |s, v| {
        set(&mut s.io_backend, parsed(v, "auto, uring or epoll"))
    }),
    opt("keepalive_interval", |s, v| {
        set_secs(&mut s.keepalive_interval, v)
    }),
    opt("lame_duck_duration", |s, v| {
        set_secs(&mut s.lame_duck_duration, v)
    }),
    opt("max_backlog", |s, v| {
        set_size(&mut s.max_backlog, v, MAX_BACKLOG)
    }),
    opt("max_backlog_bytes", |s, v| {
        set_bytes(&mut s.max_backlog_bytes, v)
    }),
    opt("max_message_size", |s, v| {
        set_size(&mut s.max_message_size, v, MAX_MESSAGE_SIZE)
    }),
    opt("messages_per_iter", |s, v| {
        set_size(&mut s.messages_per_iter, v, MAX_MESSAGES_PER_ITER)
    }),
    opt("monitor", |s, v| {
        set(&mut s.monitor, optional_socket_addr(v))
    }),
    opt("node", |s, v| set(&mut s.node, optional_string(v))),
    opt("peer_max_backlog", |s, v| {
        set_size(&mut s.peer_max_backlog, v, MAX_BACKLOG)
    }),
    opt("peer_max_backlog_bytes", |s, v| {
        set_bytes(&mut s.peer_max_backlog_bytes, v)
    }),
    opt("peer_stuck_timeout", |s, v| {
        set_secs(&mut s.peer_stuck_timeout, v)
    }),
    opt("peers", set_peers),
    opt("port", set_port),
    opt("reconnect_interval", |s, v| {
        set_secs(&mut s.reconnect_interval, v)
    }),
    opt("shard_inbox_bytes", |s, v| {
        set_bytes(&mut s.shard_inbox_bytes, v)
    }),
    opt("shards", set_shards),
    opt("stuck_timeout", |s, v| set_secs(&mut s.stuck_timeout, v)),
    opt("tcpbuf_size", |s, v| set(&mut s.tcpbuf_size, tcpbuf(v))),
    opt("tls_ca", |s, v| {
        set(
            &mut s.tls.ca,
            pem_file(v, |p| crate::tls::load_roots(p).map(drop)),
        )
    }),
    opt("tls_certificate", |s, v| {
        set(
            &mut s.tls.certificate,
            pem_file(v, |p| crate::tls::load_certs(p).map(drop)),
        )
    }),
    opt("tls_client_auth", |s, v| {
        set(&mut s.tls.client_auth, super::users::boolean(v))
    }),
    opt("tls_key", |s, v| {
        set(
            &mut s.tls.key,
            pem_file(v, |p| crate::tls::load_key(p).map(drop)),
        )
    }),
    opt("users", |s, v| {
        s.users = super::users::parse_users(v).map_err(Problems)?;
        Ok(())
    }),
];

/// `msgc_client` options, sorted.
pub(crate) const CLIENT_OPTIONS: &[OptionDef<ClientSettings>] = &[
    opt("bind_address", |s, v| {
        set(&mut s.bind_address, optional_ip(v))
    }),
    opt("connect_timeout", |s, v| {
        set_secs(&mut s.connect_timeout, v)
    }),
    opt("debug_level", |s, v| {
        set(&mut s.debug_level, parsed(v, "a debug level"))
    }),
    opt("idle_timeout", |s, v| set_secs(&mut s.idle_timeout, v)),
    opt("keepalive_interval", |s, v| {
        set_secs(&mut s.keepalive_interval, v)
    }),
    opt("max_backlog", |s, v| {
        set_size(&mut s.max_backlog, v, MAX_BACKLOG)
    }),
    opt("messages_per_iter", |s, v| {
        set_size(&mut s.messages_per_iter, v, MAX_MESSAGES_PER_ITER)
    }),
    opt("reconnect_interval", |s, v| {
        set_secs(&mut s.reconnect_interval, v)
    }),
    opt("server", set_server_list),
    opt("tcpbuf_size", |s, v| set(&mut s.tcpbuf_size, tcpbuf(v))),
];

fn optional_string(v: &Spanned<Value>) -> Result<Option<String>, Problem> {
    let text = scalar(v, "a name")?;
    Ok((!text.is_empty()).then(|| text.to_string()))
}

fn tcpbuf(v: &Spanned<Value>) -> Result<usize, Problem> {
    let n = size(v, 0..=MAX_TCPBUF as u64)?;
    if n != 0 && n < MIN_TCPBUF {
        let msg =
            format!("must be 0 (kernel default) or from {MIN_TCPBUF} to {MAX_TCPBUF}, found {n}");
        return Err((v.span, msg));
    }
    Ok(n)
}

/// A PEM file option: `""` is "not set"; otherwise the file is read and
/// checked now, so a missing file or bad PEM is an error of this line.
fn pem_file(
    v: &Spanned<Value>,
    check: impl FnOnce(&str) -> Result<(), crate::tls::Error>,
) -> Result<Option<String>, Problem> {
    let path = scalar(v, "a file name")?;
    if path.is_empty() {
        return Ok(None);
    }
    check(path).map_err(|e| (v.span, e.to_string()))?;
    Ok(Some(path.to_string()))
}

const TLS_NO_KEY: &str = "tls_certificate is set without tls_key";
const TLS_NO_CERT: &str = "tls_key is set without tls_certificate";
const TLS_AUTH_NO_CA: &str =
    "tls_client_auth = true needs tls_ca (the CA client certificates are checked against)";
const TLS_PEERS_NO_CA: &str =
    "with peers, TLS needs tls_ca: peer links check each other's certificate against it";

const BOTH_KEYS: &str = "cluster_key and cluster_key_file are both set; give one";

fn set_cluster_key(s: &mut ServerSettings, v: &Spanned<Value>) -> SetResult {
    let text = scalar(v, "a string")?;
    if s.cluster_key_file.is_some() {
        if text.is_empty() {
            return Ok(()); // the rendered form of a key read from a file
        }
        return Err((v.span, BOTH_KEYS.to_string()).into());
    }
    s.cluster_key = if text.is_empty() {
        None
    } else {
        Some(ClusterKey::new(text.as_bytes()).map_err(|m| (v.span, m))?)
    };
    Ok(())
}

/// Reads the key file now (a missing or unreadable file is an error of
/// this line). A relative path is read from the working directory.
fn set_cluster_key_file(s: &mut ServerSettings, v: &Spanned<Value>) -> SetResult {
    let path = scalar(v, "a file name")?;
    if path.is_empty() {
        s.cluster_key_file = None;
        return Ok(());
    }
    if s.cluster_key.is_some() && s.cluster_key_file.is_none() {
        return Err((v.span, BOTH_KEYS.to_string()).into());
    }
    let bytes = std::fs::read(path).map_err(|e| (v.span, format!("cannot read {path:?}: {e}")))?;
    let key = ClusterKey::new(&bytes).map_err(|m| (v.span, format!("{path:?}: {m}")))?;
    s.cluster_key = Some(key);
    s.cluster_key_file = Some(path.to_string());
    Ok(())
}

fn set_port(s: &mut ServerSettings, v: &Spanned<Value>) -> SetResult {
    let port = integer(v, 1..=u64::from(u16::MAX))?;
    s.port = u16::try_from(port).map_err(|_| (v.span, "port out of range".to_string()))?;
    Ok(())
}

fn set_shards(s: &mut ServerSettings, v: &Spanned<Value>) -> SetResult {
    let text = scalar(v, "a number of shards or `auto`")?;
    s.shards = if text.eq_ignore_ascii_case("auto") {
        None
    } else {
        Some(size(v, 1..=MAX_SHARDS as u64)?)
    };
    Ok(())
}

fn set_peers(s: &mut ServerSettings, v: &Spanned<Value>) -> SetResult {
    let Value::Dict(entries) = &v.node else {
        let found = v.node.kind();
        let msg = format!("expected a dictionary [ name = \"host\" … ], found {found}");
        return Err((v.span, msg).into());
    };
    let mut peers: Vec<Peer> = Vec::new();
    let mut seen: HashMap<&str, Span> = HashMap::new();
    let mut problems = Vec::new();
    for (key, value) in entries {
        let peer = scalar(value, "a host or host:port")
            .and_then(|spec| Peer::parse(&key.node, spec).map_err(|m| (value.span, m)));
        let peer = match peer {
            Ok(peer) => peer,
            Err(mut p) => {
                if key.node.is_empty() {
                    p.0 = key.span;
                }
                problems.push(p);
                continue;
            }
        };
        if let Some(first) = seen.insert(&key.node, key.span) {
            let msg = format!(
                "duplicate peer `{}` (first defined at {})",
                key.node,
                at(first)
            );
            problems.push((key.span, msg));
            continue;
        }
        peers.push(peer);
    }
    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    // A node with peers is one of them (see `node`): the others fill at
    // most the mesh's slots.
    let most = super::settings::MAX_PEERS + 1;
    if peers.len() > most {
        let msg = format!(
            "{} nodes listed; at most {most} (this node and {} others)",
            peers.len(),
            most - 1
        );
        return Err((v.span, msg).into());
    }
    s.peers = peers;
    Ok(())
}

fn set_server_list(c: &mut ClientSettings, v: &Spanned<Value>) -> SetResult {
    let entries = string_list(v)?;
    if entries.is_empty() {
        let msg = "`server` is empty; give at least one \"host:port\"".to_string();
        return Err((v.span, msg).into());
    }
    let mut problems = Vec::new();
    for entry in &entries {
        match split_host_port(&entry.node) {
            Ok((_, Some(_))) => {}
            Ok((_, None)) => {
                let msg = format!("expected host:port, found `{}` (no port)", entry.node);
                problems.push((entry.span, msg));
            }
            Err(m) => problems.push((entry.span, m)),
        }
    }
    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    c.server = entries.into_iter().map(|e| e.node).collect();
    Ok(())
}

fn at(span: Span) -> String {
    format!("{}:{}", span.line, span.col)
}

/// Everything the settings stage produces.
#[derive(Debug, Default)]
pub(crate) struct Built {
    pub(crate) server: ServerSettings,
    pub(crate) listener: ListenerSettings,
    pub(crate) client: ClientSettings,
    pub(crate) report: Report,
}

/// Problems, warnings and what was set explicitly.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) errors: Vec<Problem>,
    pub(crate) warnings: Vec<Problem>,
    /// `stanza.option` keys set in the file.
    pub(crate) explicit: BTreeSet<String>,
    /// Span of the value that last set `stanza.option`.
    last: HashMap<String, Span>,
    /// Span of each `listen` address, in order.
    listen_spans: Vec<Span>,
}

impl Report {
    fn error(&mut self, span: Span, msg: String) {
        self.errors.push((span, msg));
    }

    fn warn(&mut self, span: Span, msg: String) {
        self.warnings.push((span, msg));
    }
}

/// Reads the typed settings out of a document's top-level items.
pub(crate) fn build(items: &[Item]) -> Built {
    let mut built = Built::default();
    for item in items {
        built.top_item(item);
    }
    built.validate();
    built
}

impl Built {
    fn top_item(&mut self, item: &Item) {
        let scope = match item {
            Item::Scope(scope) => scope,
            Item::Assign { key, .. } => {
                let msg = format!(
                    "option `{}` is outside any scope; msgc options belong inside \
                     msgc_server {{ … }} or msgc_client {{ … }}",
                    key.node
                );
                return self.report.error(key.span, msg);
            }
        };
        let name = scope.name.node.to_ascii_lowercase();
        match name.as_str() {
            SERVER => {
                self.no_argument(scope, SERVER);
                apply_options(
                    &mut self.server,
                    SERVER_OPTIONS,
                    scope,
                    SERVER,
                    &mut self.report,
                );
            }
            CLIENT => {
                self.no_argument(scope, CLIENT);
                apply_options(
                    &mut self.client,
                    CLIENT_OPTIONS,
                    scope,
                    CLIENT,
                    &mut self.report,
                );
            }
            LISTENER => {
                self.no_argument(scope, LISTENER);
                self.listener_scope(scope);
            }
            _ => {
                let msg = format!("ignoring scope `{}`: not a msgc module", scope.name.node);
                self.report.warn(scope.name.span, msg);
            }
        }
    }

    fn no_argument(&mut self, scope: &Scope, stanza: &str) {
        if let Some(arg) = &scope.arg {
            let msg = format!("{stanza} takes no argument, found \"{}\"", arg.node);
            self.report.error(arg.span, msg);
        }
    }

    fn listener_scope(&mut self, scope: &Scope) {
        for item in &scope.items {
            match item {
                Item::Scope(inner) if inner.name.node.eq_ignore_ascii_case("listen") => {
                    self.listen_scope(inner);
                }
                Item::Scope(inner) => {
                    let msg = format!("ignoring scope `{}` in {LISTENER}", inner.name.node);
                    self.report.warn(inner.name.span, msg);
                }
                Item::Assign { key, .. } => {
                    let msg = format!(
                        "ignoring option `{}` in {LISTENER}: msgc does not use it",
                        key.node
                    );
                    self.report.warn(key.span, msg);
                }
            }
        }
    }

    fn listen_scope(&mut self, scope: &Scope) {
        self.report.explicit.insert(format!("{LISTENER}.listen"));
        for item in &scope.items {
            let (name, span) = match item {
                Item::Assign { key, .. } => (&key.node, key.span),
                Item::Scope(inner) => (&inner.name.node, inner.name.span),
            };
            let msg = format!("ignoring `{name}` in a listen scope: msgc does not use it");
            self.report.warn(span, msg);
        }
        let Some(arg) = &scope.arg else {
            let msg = "`listen` needs an address, as in listen \":4809\" { }".to_string();
            return self.report.error(scope.name.span, msg);
        };
        match arg.node.parse::<ListenAddr>() {
            Ok(addr) if self.listener.listen.contains(&addr) => {
                let msg = format!("duplicate listen address \"{}\"", arg.node);
                self.report.error(arg.span, msg);
            }
            Ok(addr) => {
                self.listener.listen.push(addr);
                self.report.listen_spans.push(arg.span);
            }
            Err(msg) => self.report.error(arg.span, msg),
        }
    }

    /// Checks that involve several options, once everything is read.
    fn validate(&mut self) {
        self.validate_node();
        self.validate_peer_addresses();
        self.validate_listen_port();
        self.validate_tls();
    }

    /// The `tls_*` options together: certificate and key come as a pair
    /// and go together, client auth needs a CA, and so do peers (their
    /// links check each other's certificates against it). Runs only when
    /// every `tls_*` line read well, so one bad file earns one error.
    fn validate_tls(&mut self) {
        let span = |b: &Self, o: &str| b.report.last.get(&format!("{SERVER}.{o}")).copied();
        let (cert, key) = (span(self, "tls_certificate"), span(self, "tls_key"));
        let (ca, auth) = (span(self, "tls_ca"), span(self, "tls_client_auth"));
        let t = &self.server.tls;
        if (cert.is_some() && t.certificate.is_none())
            || (key.is_some() && t.key.is_none())
            || (ca.is_some() && t.ca.is_none())
        {
            return; // already reported at its line
        }
        let mut problems: Vec<(Span, &str)> = Vec::new();
        match (&t.certificate, &t.key, cert, key) {
            (Some(_), None, Some(at), _) => problems.push((at, TLS_NO_KEY)),
            (None, Some(_), _, Some(at)) => problems.push((at, TLS_NO_CERT)),
            _ => {}
        }
        if let (true, None, Some(at)) = (t.client_auth, &t.ca, auth) {
            problems.push((at, TLS_AUTH_NO_CA));
        }
        let peers = self.server.peers.len() > 1;
        if let (true, true, None, Some(at)) = (t.enabled(), peers, &t.ca, cert) {
            problems.push((at, TLS_PEERS_NO_CA));
        }
        let mut problems: Vec<Problem> = problems
            .into_iter()
            .map(|(at, m)| (at, m.to_string()))
            .collect();
        if problems.is_empty() {
            if let (Err(e), Some(at)) = (t.configs(), key) {
                problems.push((at, e.to_string()));
            }
        }
        for (at, msg) in problems {
            self.report.error(at, msg);
        }
    }

    fn validate_node(&mut self) {
        let Some(node) = &self.server.node else {
            return;
        };
        let span = self.report.last.get(&format!("{SERVER}.node")).copied();
        let Some(span) = span else { return };
        if self.server.peers.is_empty() {
            let msg = format!("node `{node}` is set but peers is empty, so it names nothing");
            return self.report.warn(span, msg);
        }
        if self.server.peer(node).is_none() {
            let names: Vec<&str> = self.server.peers.iter().map(|p| p.name.as_str()).collect();
            let msg = format!(
                "node `{node}` is not in peers (peers: {})",
                names.join(", ")
            );
            self.report.error(span, msg);
        }
    }

    fn validate_peer_addresses(&mut self) {
        let Some(span) = self.report.last.get(&format!("{SERVER}.peers")).copied() else {
            return;
        };
        let port = self.server.port;
        let mut seen: HashMap<String, &str> = HashMap::new();
        let mut problems = Vec::new();
        for peer in &self.server.peers {
            let addr = peer.addr_string(port).to_ascii_lowercase();
            if let Some(first) = seen.insert(addr.clone(), &peer.name) {
                let msg = format!(
                    "peers `{first}` and `{}` have the same address {addr}",
                    peer.name
                );
                problems.push((span, msg));
            }
        }
        self.report.errors.extend(problems);
    }

    fn validate_listen_port(&mut self) {
        let port = self.server.port;
        let Some(&span) = self.report.listen_spans.first() else {
            return;
        };
        if !self.listener.listen.iter().any(|a| a.0.port() == port) {
            let msg = format!(
                "no listen address uses msgc_server port {port}; peers that omit a port \
                 dial {port}, so they will not reach this listener"
            );
            self.report.warn(span, msg);
        }
    }
}

/// Applies `key = value` items of one scope through `table`.
fn apply_options<S>(
    target: &mut S,
    table: &[OptionDef<S>],
    scope: &Scope,
    stanza: &str,
    report: &mut Report,
) {
    let mut seen: HashMap<&'static str, Span> = HashMap::new();
    for item in &scope.items {
        let (key, value) = match item {
            Item::Assign { key, value } => (key, value),
            Item::Scope(inner) => {
                let msg = format!(
                    "unexpected scope `{}` inside {stanza}: it takes only `option = value` lines",
                    inner.name.node
                );
                report.error(inner.name.span, msg);
                continue;
            }
        };
        let lower = key.node.to_ascii_lowercase();
        let Some(def) = table.iter().find(|d| d.name == lower) else {
            report.error(key.span, unknown_option(&key.node, stanza, table));
            continue;
        };
        if let Some(first) = seen.insert(def.name, key.span) {
            let msg = format!(
                "`{}` is set twice in this scope (first at {}); the last value wins",
                def.name,
                at(first)
            );
            report.warn(key.span, msg);
        }
        let full = format!("{stanza}.{}", def.name);
        report.explicit.insert(full.clone());
        report.last.insert(full, value.span);
        if let Err(Problems(problems)) = (def.set)(target, value) {
            let named = problems
                .into_iter()
                .map(|(span, msg)| (span, format!("{}: {msg}", def.name)));
            report.errors.extend(named);
        }
    }
}

fn unknown_option<S>(name: &str, stanza: &str, table: &[OptionDef<S>]) -> String {
    let valid: Vec<&str> = table.iter().map(|d| d.name).collect();
    format!(
        "unknown option `{name}` in {stanza}; valid options: {}",
        valid.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_tables_are_sorted_and_unique() {
        let server: Vec<&str> = SERVER_OPTIONS.iter().map(|d| d.name).collect();
        let client: Vec<&str> = CLIENT_OPTIONS.iter().map(|d| d.name).collect();
        for names in [server, client] {
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(names, sorted);
        }
    }
}
