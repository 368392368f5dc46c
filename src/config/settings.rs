//! Typed settings of the three msgc stanzas, with the seed's defaults.
//!
//! Owns the fields, their defaults and their documented ranges. Reading them
//! from a syntax tree lives in `apply.rs`; printing them in `render.rs`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::types::{ClusterKey, DebugLevel, IoBackend, ListenAddr, Peer};
use super::users::User;

/// The seed's port for msgc traffic (`msgc_server.port`, `listen ":4809"`).
pub const DEFAULT_PORT: u16 = 4809;
/// What `tcpbuf_size` means on the receive side (see tuning.md): true
/// when a receive buffer of `tcpbuf_size` must be set because receive
/// autotuning, which grows a buffer up to `autotuned_max` bytes, cannot
/// reach it. (`autotuned_max` 0: unknown, set it.)
pub fn fixed_receive(tcpbuf_size: usize, autotuned_max: usize) -> bool {
    tcpbuf_size > 0 && tcpbuf_size > autotuned_max
}

/// The most receive autotuning gives a socket: `net.ipv4.tcp_rmem`'s third
/// field, read once; 0 when it cannot be read.
pub fn autotuned_receive_max() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
            .ok()
            .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(0)
    })
}

/// Smallest non-zero `tcpbuf_size`.
pub const MIN_TCPBUF: usize = 4096;
/// Largest `tcpbuf_size` (256 MiB).
pub const MAX_TCPBUF: usize = 256 * 1024 * 1024;
/// Largest `max_backlog`.
pub const MAX_BACKLOG: usize = 100_000_000;
/// Largest `messages_per_iter`.
pub const MAX_MESSAGES_PER_ITER: usize = 1_000_000;
/// Largest `max_message_size` (64 MiB).
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// Largest `shards`.
pub const MAX_SHARDS: usize = 64;
/// Most peer nodes besides this one (`peers` lists at most one more).
pub const MAX_PEERS: usize = 256;
/// Smallest byte budget of a queue or inbox (`max_backlog_bytes`,
/// `peer_max_backlog_bytes`, `shard_inbox_bytes`): 64 KiB.
pub const MIN_QUEUE_BYTES: usize = 64 * 1024;
/// Largest byte budget of a queue or inbox: 64 GiB.
pub const MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024 * 1024;

/// `msgc_server { … }`: the router process and its peer mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Local IP for outbound peer connections. Default: none (the kernel
    /// chooses). Written `""` for "not set".
    pub bind_address: Option<IpAddr>,
    /// The cluster secret peers prove they hold in the handshake
    /// (`cluster_key`, or read from `cluster_key_file`). Default: none
    /// (peers are admitted by name and address only). Written `""` for
    /// "not set".
    pub cluster_key: Option<ClusterKey>,
    /// The file `cluster_key` was read from, if it was. Default: none.
    pub cluster_key_file: Option<String>,
    /// Longest wait for an outbound `connect`. Default 60 s; > 0.
    pub connect_timeout: Duration,
    /// Log verbosity of this module. Default `ERROR`.
    pub debug_level: DebugLevel,
    /// How long an idle connection is held open. Default 30 s; > 0.
    pub idle_timeout: Duration,
    /// Which I/O engine the shards run. Default `auto`.
    pub io_backend: IoBackend,
    /// Longest wait for a new connection's `HELLO`: one that sends none
    /// is closed. Default 5 s; > 0.
    pub handshake_timeout: Duration,
    /// Silence after which a no-op frame is sent. Default 5 s; > 0.
    pub keepalive_interval: Duration,
    /// Longest a leaving node (SIGTERM, SIGINT, SIGUSR2) waits for its
    /// clients to move to other servers before it closes the rest, says
    /// goodbye to its peers and exits. Default 10 s; > 0.
    pub lame_duck_duration: Duration,
    /// Frames a client's queue may hold: past it, a reader that is still
    /// accepting data slows its publishers, one that is not is stuck and
    /// closed. Default 5000; 1..=[`MAX_BACKLOG`].
    pub max_backlog: usize,
    /// Bytes a client's queue may hold (the same rule as `max_backlog`).
    /// Default 16 MiB; [`MIN_QUEUE_BYTES`]..=[`MAX_QUEUE_BYTES`].
    pub max_backlog_bytes: usize,
    /// Largest frame accepted, in bytes. Default 1 MiB (1048576);
    /// 1..=[`MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
    /// Frames read from (or written to) one connection before serving
    /// others. Default 20; 1..=[`MAX_MESSAGES_PER_ITER`].
    pub messages_per_iter: usize,
    /// Address of the HTTP monitoring endpoint (`/metrics`, `/healthz`,
    /// JSON views), served by `msgc-server` (`msgc::monitor::Monitor`).
    /// Default: none (off). Written `""` for "not set".
    pub monitor: Option<SocketAddr>,
    /// This node's name in `peers`. Default: none (found by matching a local
    /// address). When `peers` is non-empty it names one of them.
    pub node: Option<String>,
    /// `max_backlog` of a peer link. Default 50,000; 1..=[`MAX_BACKLOG`].
    pub peer_max_backlog: usize,
    /// `max_backlog_bytes` of a peer link. Default 64 MiB;
    /// [`MIN_QUEUE_BYTES`]..=[`MAX_QUEUE_BYTES`].
    pub peer_max_backlog_bytes: usize,
    /// `stuck_timeout` of a peer link. Default 2 s; > 0.
    pub peer_stuck_timeout: Duration,
    /// Cluster nodes in file order. Default: empty (a single node). Names
    /// are unique, and so are their `host:port` addresses.
    pub peers: Vec<Peer>,
    /// Port of peers without one, and of the default listener. Default 4809;
    /// 1..=65535.
    pub port: u16,
    /// Wait before re-dialling a failed connection. Default 5 s; > 0.
    pub reconnect_interval: Duration,
    /// Bytes a shard's inbox (messages from other shards) may hold before
    /// the producers feeding it wait. Default 4 MiB;
    /// [`MIN_QUEUE_BYTES`]..=[`MAX_QUEUE_BYTES`].
    pub shard_inbox_bytes: usize,
    /// Worker threads. Default `None` (written `auto`): one per CPU;
    /// otherwise 1..=[`MAX_SHARDS`].
    pub shards: Option<usize>,
    /// How long a full queue's socket may accept nothing before its reader
    /// counts as stuck (and is closed) rather than slow (and slows its
    /// publishers). Default 0.2 s; > 0.
    pub stuck_timeout: Duration,
    /// SO_SNDBUF in bytes, and a floor under receive autotuning
    /// ([`fixed_receive`]). Default 131072. 0 leaves both to the kernel
    /// (our extension); otherwise
    /// [`MIN_TCPBUF`]..=[`MAX_TCPBUF`].
    pub tcpbuf_size: usize,
    /// TLS for clients and peer links (`tls_certificate`, `tls_key`,
    /// `tls_ca`, `tls_client_auth`). Default: off (plain TCP).
    pub tls: TlsSettings,
    /// Client users (`users = [ name = [ password = "…" … ] ]`). Default:
    /// none, and then every client is served without credentials, as
    /// before. Names are unique. With users, a client must log in.
    pub users: Vec<User>,
}

/// The `tls_*` options of `msgc_server`: file names, checked at load.
///
/// Invariant after a successful load: `certificate` and `key` are both set
/// or both unset, they go together, `ca` is set when `client_auth` is, and
/// every file named held usable PEM when it was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain this node presents (`tls_certificate`).
    /// Default: none (TLS off).
    pub certificate: Option<String>,
    /// PEM private key of that certificate (`tls_key`). Default: none.
    pub key: Option<String>,
    /// PEM CA certificate(s) that client certificates (`tls_client_auth`)
    /// are checked against (`tls_ca`). Default: none.
    pub ca: Option<String>,
    /// Clients must present a certificate signed by `tls_ca`. Default false.
    pub client_auth: bool,
}

impl TlsSettings {
    /// True when TLS is configured (a certificate and its key).
    pub fn enabled(&self) -> bool {
        self.certificate.is_some() && self.key.is_some()
    }

    /// The rustls configurations these files make; `None` when TLS is
    /// off.
    ///
    /// # Errors
    /// A file cannot be read or parsed, or the key does not go with the
    /// certificate.
    pub fn configs(&self) -> Result<Option<crate::tls::Configs>, crate::tls::Error> {
        use crate::tls::ClientCerts;
        let (Some(cert), Some(key)) = (&self.certificate, &self.key) else {
            return Ok(None);
        };
        let certs = match (&self.ca, self.client_auth) {
            (Some(ca), true) => ClientCerts::Required(ca),
            (Some(ca), false) => ClientCerts::Optional(ca),
            (None, _) => ClientCerts::None,
        };
        let accept = crate::tls::server_config(cert, key, certs)?;
        let dial = match &self.ca {
            Some(ca) => Some(crate::tls::client_config(ca, Some((cert, key)))?),
            None => None,
        };
        Ok(Some(crate::tls::Configs { accept, dial }))
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            bind_address: None,
            cluster_key: None,
            cluster_key_file: None,
            connect_timeout: Duration::from_secs(60),
            debug_level: DebugLevel::Error,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            io_backend: IoBackend::Auto,
            keepalive_interval: Duration::from_secs(5),
            lame_duck_duration: Duration::from_secs(10),
            max_backlog: 5000,
            max_backlog_bytes: 16 * 1024 * 1024,
            max_message_size: 1024 * 1024,
            messages_per_iter: 20,
            monitor: None,
            node: None,
            peer_max_backlog: 50_000,
            peer_max_backlog_bytes: 64 * 1024 * 1024,
            peer_stuck_timeout: Duration::from_secs(2),
            peers: Vec::new(),
            port: DEFAULT_PORT,
            reconnect_interval: Duration::from_secs(5),
            shard_inbox_bytes: 4 * 1024 * 1024,
            shards: None,
            stuck_timeout: Duration::from_millis(200),
            tcpbuf_size: 131_072,
            tls: TlsSettings::default(),
            users: Vec::new(),
        }
    }
}

impl ServerSettings {
    /// The peer named by `node`, if any.
    pub fn local_peer(&self) -> Option<&Peer> {
        let node = self.node.as_deref()?;
        self.peers.iter().find(|p| p.name == node)
    }

    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// `msgcserver_listener { listen "ADDR" { } … }`: where the server accepts
/// clients and peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListenerSettings {
    /// Addresses from the `listen` scopes, in file order, no duplicates.
    /// Default: empty, meaning "not configured": the server listens on its
    /// own address in `peers`, or on 127.0.0.1 and `msgc_server.port`
    /// without peers (see [`Config::listen_addrs`](super::Config::listen_addrs)).
    pub listen: Vec<ListenAddr>,
}

/// `msgc_client { … }`: a client's connection to its msgc_server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// Local IP for the outbound connection. Default: none.
    pub bind_address: Option<IpAddr>,
    /// Longest wait for `connect`. Default 60 s; > 0.
    pub connect_timeout: Duration,
    /// Log verbosity of this module. Default `ERROR`.
    pub debug_level: DebugLevel,
    /// How long an idle connection is held open. Default 30 s; > 0.
    pub idle_timeout: Duration,
    /// Silence after which a no-op frame is sent. Default 5 s; > 0.
    pub keepalive_interval: Duration,
    /// Queued messages before the connection is declared stuck.
    /// Default 5000; 1..=[`MAX_BACKLOG`].
    pub max_backlog: usize,
    /// Frames handled per connection turn. Default 20;
    /// 1..=[`MAX_MESSAGES_PER_ITER`].
    pub messages_per_iter: usize,
    /// Wait before reconnecting. Default 5 s; > 0.
    pub reconnect_interval: Duration,
    /// Servers as `host:port` (or `[v6]:port`), tried in order; never empty.
    /// Default `["127.0.0.1:4809"]`.
    pub server: Vec<String>,
    /// SO_SNDBUF in bytes, and a floor under receive autotuning
    /// ([`fixed_receive`]). Default 131072; 0 = the kernel's, else
    /// [`MIN_TCPBUF`]..=[`MAX_TCPBUF`].
    pub tcpbuf_size: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            bind_address: None,
            connect_timeout: Duration::from_secs(60),
            debug_level: DebugLevel::Error,
            idle_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(5),
            max_backlog: 5000,
            messages_per_iter: 20,
            reconnect_interval: Duration::from_secs(5),
            server: vec![format!("127.0.0.1:{DEFAULT_PORT}")],
            tcpbuf_size: 131_072,
        }
    }
}
