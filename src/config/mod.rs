//! Momentum configuration files for msgc: `msgc_server`,
//! `msgcserver_listener` and `msgc_client`, read unchanged from a Momentum
//! installation.
//!
//! Staged, sans-IO apart from reading files:
//!
//! ```text
//! text ─lexer─▶ tokens ─syntax─▶ spanned tree (includes spliced) ─apply─▶ Config
//!                                                                 render ◀─┘
//! ```
//!
//! Owns syntax, defaults (the seed's, see each field), validation and
//! `file:line:col` diagnostics. It does not apply settings to sockets or
//! threads: the server and client do, and a reload builds a whole new
//! [`Config`].
//!
//! # Syntax
//! Scopes `name { … }` and `name "arg" { … }`; `key = value` with an optional
//! `;`; strings `"…"` (escapes `\" \\ \n \t \r`; a string ends on its line);
//! bare words and numbers; lists `( a b )` with optional commas;
//! dictionaries `[ k = v, k2 = v2 ]` with optional `,`/`;`; `#` comments;
//! `include "file"` anywhere a line may stand, relative to the including
//! file's directory (to the working directory for [`Config::parse_str`]),
//! at most 16 deep, a cycle being an error.
//!
//! # Semantics
//! - Option and scope names are case-insensitive; values such as peer
//!   names are not.
//! - Scopes of one name merge in file order; a later value replaces an
//!   earlier one (a second `peers` replaces the whole dictionary). `listen`
//!   scopes accumulate.
//! - An option set twice in one scope: the last value wins, with a warning.
//! - Quoted and bare values are equivalent; `""` means "not set" for
//!   `bind_address`, `monitor` and `node`; `shards = auto` means one per CPU,
//!   shared out among the nodes of `peers` that run on this machine.
//! - Unknown top-level scopes (other Momentum modules) and anything unknown
//!   inside `msgcserver_listener` are warnings ([`Config::warnings`]); a
//!   top-level `key = value` and an unknown option of `msgc_server` or
//!   `msgc_client` are errors.
//! - No `listen` scope: [`ListenerSettings::listen`] is empty and the server
//!   listens on its own address in `peers`, or, without peers, on
//!   127.0.0.1 and `msgc_server.port` ([`Config::listen_addrs`]); never on
//!   every address unless a scope says `":PORT"`.
//! - Errors are collected: every lexical error, the first syntax error of
//!   each file, and, when the syntax is sound, every settings error.

mod apply;
mod error;
mod lexer;
mod render;
mod settings;
mod source;
mod syntax;
mod types;
mod users;
mod values;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Notes for [`Config::render_annotated`]: `stanza.option` → the comment.
pub type Notes = BTreeMap<String, String>;

pub use error::{Diagnostic, Error};
pub use settings::{
    autotuned_receive_max, fixed_receive, ClientSettings, ListenerSettings, ServerSettings,
    TlsSettings, DEFAULT_PORT, MAX_BACKLOG, MAX_MESSAGES_PER_ITER, MAX_MESSAGE_SIZE, MAX_PEERS,
    MAX_QUEUE_BYTES, MAX_SHARDS, MAX_TCPBUF, MIN_QUEUE_BYTES, MIN_TCPBUF,
};
pub use types::{
    join_host_port, split_host_port, ClusterKey, DebugLevel, IoBackend, ListenAddr, Peer,
    MIN_CLUSTER_KEY,
};
pub use users::{Patterns, Permissions, User, MAX_PATTERNS};

use source::{FsLoader, Loader, NoIncludes, Problem, Sources};
use syntax::{parse_document, Document};

/// A whole msgc configuration: the three stanzas plus what reading them
/// noticed. `Default` is the seed's defaults everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// `msgc_server { … }`.
    pub server: ServerSettings,
    /// `msgcserver_listener { listen "…" { } }`.
    pub listener: ListenerSettings,
    /// `msgc_client { … }`.
    pub client: ClientSettings,
    /// Things ignored or suspicious but not wrong (unknown scopes, an option
    /// set twice, a listener on another port than `port`…).
    pub warnings: Vec<Diagnostic>,
    /// Files read: the top file for [`Config::load`], then each included
    /// file once, in the order first read.
    pub sources: Vec<PathBuf>,
    /// Options set in the files, as `stanza.option` in lower case
    /// (`msgc_server.port`, `msgcserver_listener.listen`).
    pub explicit: BTreeSet<String>,
}

impl Config {
    /// Reads `path` and the files it includes.
    ///
    /// # Errors
    /// [`Error::Io`] when `path` cannot be read; [`Error::Invalid`] with
    /// every problem found otherwise (a missing include is one of them).
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut loader = FsLoader;
        let key = loader.key(path);
        let name = path.display().to_string();
        let mut doc = parse_document(&name, &text, dir, Some(key), &mut loader);
        doc.sources.read.insert(0, path.to_path_buf());
        finish(doc)
    }

    /// Parses `text`, named `name` in diagnostics. Includes are read from
    /// the filesystem, relative to the working directory.
    ///
    /// # Errors
    /// [`Error::Invalid`] with every problem found.
    pub fn parse_str(name: &str, text: &str) -> Result<Config, Error> {
        finish(parse_document(
            name,
            text,
            Path::new(""),
            None,
            &mut FsLoader,
        ))
    }

    /// Whether `stanza.option` was set in the files (names any case).
    pub fn is_set(&self, stanza: &str, option: &str) -> bool {
        let key = format!("{stanza}.{option}").to_ascii_lowercase();
        self.explicit.contains(&key)
    }

    /// Where the server listens: the `listen` scopes; else `own`, this
    /// node's address in `peers` (resolved by the caller); else 127.0.0.1
    /// on `msgc_server.port` (never every address by default).
    pub fn listen_addrs(&self, own: Option<SocketAddr>) -> Vec<SocketAddr> {
        if !self.listener.listen.is_empty() {
            return self
                .listener
                .listen
                .iter()
                .map(|a| a.socket_addr())
                .collect();
        }
        vec![own.unwrap_or(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            self.server.port,
        ))]
    }

    /// Every option of every stanza, one per line, in Momentum syntax;
    /// values not set in the files end in `# default`. Parses back to the
    /// same settings, except an inline `cluster_key`, shown as `"<secret>"`.
    pub fn render_effective(&self) -> String {
        render::render(self, &Notes::new())
    }

    /// As [`Config::render_effective`], with `notes` (keyed
    /// `stanza.option`, lower case) in place of `# default` or after an
    /// explicit value: where a value came from when not from the files
    /// (a command-line flag, what the server detected).
    pub fn render_annotated(&self, notes: &Notes) -> String {
        render::render(self, notes)
    }
}

/// Parses arbitrary text without touching the filesystem (every `include`
/// is an error). For fuzzing: must never panic.
///
/// # Errors
/// As [`Config::parse_str`].
pub fn parse_for_fuzz(text: &str) -> Result<Config, Error> {
    finish(parse_document(
        "<fuzz>",
        text,
        Path::new(""),
        None,
        &mut NoIncludes,
    ))
}

/// Syntax errors stop here; otherwise the settings stage runs.
fn finish(doc: Document) -> Result<Config, Error> {
    let Document {
        items,
        sources,
        mut errors,
    } = doc;
    if !errors.is_empty() {
        errors.sort_by_key(|(span, _)| (span.file, span.line, span.col));
        return Err(Error::Invalid(diagnostics(&sources, errors)));
    }
    let built = apply::build(&items);
    let report = built.report;
    if !report.errors.is_empty() {
        return Err(Error::Invalid(diagnostics(&sources, report.errors)));
    }
    Ok(Config {
        server: built.server,
        listener: built.listener,
        client: built.client,
        warnings: diagnostics(&sources, report.warnings),
        explicit: report.explicit,
        sources: sources.read,
    })
}

fn diagnostics(sources: &Sources, problems: Vec<Problem>) -> Vec<Diagnostic> {
    problems
        .into_iter()
        .map(|(span, msg)| sources.diag(span, msg))
        .collect()
}
