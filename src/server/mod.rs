//! The server process: shards, sockets, connections, outbound queues.
//!
//! [`Server::start`] binds the listeners (every shard its own, on the same
//! address, SO_REUSEPORT), starts one thread per shard with its own
//! single-threaded runtime (tokio-uring, or tokio current-thread on the
//! epoll backend) pinned to a core where possible, and returns a handle
//! that reloads settings and shuts the server down.

pub mod auth;
pub mod conn;
pub mod flow;
pub mod inbox;
pub mod io;
pub mod leave;
mod login;
pub mod membership;
pub mod memory;
pub mod outbound;
pub mod peers;
pub mod seqs;
pub mod shard;
pub mod shared;
pub mod sockets;
pub mod tls;

use crate::config::{Config, IoBackend, ServerSettings};
use crate::protocol::NodeName;
use crate::router::{GroupTable, MAX_SHARDS};
use flow::Budget;
use inbox::Inbox;
use shard::Shard;
use shared::{ShardMsg, Shared};
use sockets::SocketOpts;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long shutdown waits for connections to flush before closing them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The settings every shard reads on every turn; replaced whole on reload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Live {
    /// Close a connection that received nothing for this long.
    pub idle_timeout: Duration,
    /// Close a connection that sent no HELLO within this long.
    pub handshake_timeout: Duration,
    /// Send NOOP after this long without sending.
    pub keepalive_interval: Duration,
    /// A client connection's queue budget (`max_backlog`,
    /// `max_backlog_bytes`, `stuck_timeout`).
    pub client_budget: Budget,
    /// A peer link's queue budget (`peer_max_backlog`,
    /// `peer_max_backlog_bytes`, `peer_stuck_timeout`).
    pub peer_budget: Budget,
    /// Bytes a shard's inbox may hold before its producers wait.
    pub shard_inbox_bytes: usize,
    /// Frames read or written per connection per turn.
    pub messages_per_iter: usize,
    /// `tcpbuf_size` for sockets made from now on (see `sockets`).
    pub tcpbuf_size: usize,
    /// Largest payload accepted.
    pub max_message_size: usize,
    /// Bound on a dial.
    pub connect_timeout: Duration,
    /// Wait between re-dials of a peer link.
    pub reconnect_interval: Duration,
    /// Local address for outbound peer links.
    pub bind_address: Option<IpAddr>,
    /// Longest wait for clients to move when the node leaves.
    pub lame_duck_duration: Duration,
}

impl Live {
    /// The settings in force, keyed by their `msgc_server` option names
    /// (durations in seconds): the `settings` of the stats document.
    pub fn to_json(&self) -> serde_json::Value {
        let secs = |d: Duration| d.as_secs_f64();
        serde_json::json!({
            "idle_timeout": secs(self.idle_timeout),
            "handshake_timeout": secs(self.handshake_timeout),
            "keepalive_interval": secs(self.keepalive_interval),
            "max_backlog": self.client_budget.frames,
            "max_backlog_bytes": self.client_budget.bytes,
            "stuck_timeout": secs(self.client_budget.stuck_after),
            "peer_max_backlog": self.peer_budget.frames,
            "peer_max_backlog_bytes": self.peer_budget.bytes,
            "peer_stuck_timeout": secs(self.peer_budget.stuck_after),
            "shard_inbox_bytes": self.shard_inbox_bytes,
            "messages_per_iter": self.messages_per_iter,
            "tcpbuf_size": self.tcpbuf_size,
            "max_message_size": self.max_message_size,
            "connect_timeout": secs(self.connect_timeout),
            "reconnect_interval": secs(self.reconnect_interval),
            "bind_address": self.bind_address.map(|a| a.to_string()),
            "lame_duck_duration": secs(self.lame_duck_duration),
        })
    }

    /// The live part of `msgc_server`'s settings.
    pub fn from_settings(s: &ServerSettings) -> Self {
        Self {
            idle_timeout: s.idle_timeout,
            handshake_timeout: s.handshake_timeout,
            keepalive_interval: s.keepalive_interval,
            client_budget: Budget {
                frames: s.max_backlog,
                bytes: s.max_backlog_bytes,
                stuck_after: s.stuck_timeout,
            },
            peer_budget: Budget {
                frames: s.peer_max_backlog,
                bytes: s.peer_max_backlog_bytes,
                stuck_after: s.peer_stuck_timeout,
            },
            shard_inbox_bytes: s.shard_inbox_bytes,
            messages_per_iter: s.messages_per_iter,
            tcpbuf_size: s.tcpbuf_size,
            max_message_size: s.max_message_size,
            connect_timeout: s.connect_timeout,
            reconnect_interval: s.reconnect_interval,
            bind_address: s.bind_address,
            lame_duck_duration: s.lame_duck_duration,
        }
    }
}

/// Why the server could not start or reload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node's identity could not be settled.
    #[error("{0}")]
    Node(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the kernel said (in the message, not a separate cause, so
        /// that it is said once).
        error: std::io::Error,
    },
    /// `io_backend = uring` was asked for but io_uring cannot be set up.
    #[error("io_backend = uring, but io_uring is not available here: {0} (use io_backend = auto or epoll)")]
    UringUnavailable(std::io::Error),
    /// A shard thread could not be started.
    #[error("cannot start shard thread: {0}")]
    Thread(std::io::Error),
    /// The thread that looks up the peers' host names could not be started.
    #[error("cannot start the resolver thread: {0}")]
    Resolver(std::io::Error),
    /// A shard's runtime or listener could not be set up.
    #[error("shard {shard} did not start: {reason}")]
    Shard {
        /// The shard.
        shard: usize,
        /// Why.
        reason: String,
    },
    /// The TLS files could not be loaded (they changed since the config
    /// was read).
    #[error("TLS: {0}")]
    Tls(crate::tls::Error),
    /// A reload asked for a change that needs a restart.
    #[error("{0} cannot change without a restart")]
    NeedsRestart(&'static str),
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<ShardThread>,
    /// Gives freed memory back to the kernel; stops when the server drops.
    _housekeeper: Option<memory::Housekeeper>,
    /// Looks up the peers' host names (off the shards); stops on drop.
    resolver: peers::resolve::Resolver,
    addrs: Vec<SocketAddr>,
    restart_only: RestartOnly,
}

/// Settings fixed at start; a reload that changes them is refused.
#[derive(Debug, Clone, PartialEq)]
struct RestartOnly {
    node: String,
    shards: usize,
    io_backend: IoBackend,
    listen: Vec<SocketAddr>,
    monitor: Option<SocketAddr>,
    tls: crate::config::TlsSettings,
}

impl Server {
    /// Starts a server from `config`; `node` (the `--node` flag) overrides
    /// `msgc_server.node`.
    ///
    /// # Errors
    /// [`Error`] when the node is ambiguous, an address cannot be bound (is
    /// in use), io_uring was required and is unavailable, or a shard cannot
    /// start.
    pub fn start(config: &Config, node: Option<&str>) -> Result<Server, Error> {
        Self::start_waiting(config, node, Duration::ZERO)
    }

    /// As [`Server::start`], but a listen address in use is waited for, up
    /// to `listen_wait` (see [`sockets::wait_until_free`]): what a restart
    /// right after a crash needs.
    ///
    /// # Errors
    /// As [`Server::start`].
    pub fn start_waiting(
        config: &Config,
        node: Option<&str>,
        listen_wait: Duration,
    ) -> Result<Server, Error> {
        let s = &config.server;
        let node = resolve_node(s, node)?;
        let listen = listen_addrs(config, &node);
        let uring = choose_backend(s.io_backend)?;
        let here = NodesHere::of(s, &node);
        let shards = s
            .shards
            .unwrap_or_else(|| here.default_shards())
            .clamp(1, MAX_SHARDS);
        let live = Live::from_settings(s);
        let (listeners, addrs) = bind_all(
            &listen,
            shards,
            SocketOpts {
                tcpbuf_size: s.tcpbuf_size,
            },
            listen_wait,
        )?;
        let (inboxes, rxs): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| Inbox::new(live.shard_inbox_bytes))
            .unzip();
        let shared = Arc::new(Shared {
            node: node.clone(),
            table: GroupTable::new(),
            inboxes,
            stats: (0..shards).map(|_| Default::default()).collect(),
            started: Instant::now(),
            incarnation: shared::incarnation(),
            backend: if uring { "uring" } else { "epoll" },
            stopping: AtomicBool::new(false),
            placed: Default::default(),
            inspections: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            live: Mutex::new(live),
            cluster: crate::cluster::Mesh::new(&node, s, peers::own_ip_of(s, &node)),
            auth: auth::Auth::new(&s.users),
            tls: s.tls.configs().map_err(Error::Tls)?,
            spares: shared::SparePool::new(shards),
        });
        let resolver = peers::resolve::Resolver::start(shared.clone()).map_err(Error::Resolver)?;
        // Nodes sharing this machine start their shards on different CPUs.
        let first_core = here.index * shards;
        let threads = spawn_shards(&shared, listeners, rxs, uring, first_core)?;
        let threads = wait_started(&shared, threads)?;
        let housekeeper = memory::Housekeeper::start()
            .map_err(|e| tracing::warn!(error = %e, "no housekeeping thread: freed memory stays with the process"))
            .ok();
        let tls = shared.tls.is_some();
        tracing::info!(node = %node, shards, nodes_here = here.count, backend = shared.backend, tls, listen = ?addrs, "msgc-server running");
        let restart_only = RestartOnly {
            node: node.to_string(),
            shards,
            io_backend: s.io_backend,
            listen,
            monitor: s.monitor,
            tls: s.tls.clone(),
        };
        Ok(Server {
            shared,
            threads,
            _housekeeper: housekeeper,
            resolver,
            addrs,
            restart_only,
        })
    }

    /// The addresses the server listens on (ports resolved when 0 was asked).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// This node's name.
    pub fn node(&self) -> &NodeName {
        &self.shared.node
    }

    /// The stats document (as answered to STATS_REQUEST).
    pub fn stats_json(&self) -> serde_json::Value {
        self.shared.stats_json()
    }

    /// The shared state (for the cluster and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies a re-read configuration without a restart: timeouts,
    /// keepalive, backlog, messages_per_iter, buffer size for new sockets,
    /// max_message_size, peers and users (for logins from now on). `debug_level` is the binary's to apply.
    ///
    /// # Errors
    /// [`Error::NeedsRestart`] when node, shards, io_backend, the listen
    /// addresses or the monitor address changed; nothing is applied then.
    pub fn reload(&self, config: &Config, node: Option<&str>) -> Result<(), Error> {
        let s = &config.server;
        let wanted = resolve_node(s, node)?;
        let new = RestartOnly {
            node: wanted.to_string(),
            // Unset, it stays what it is: the share of CPUs is worked out
            // at start (a reload of `peers` must not ask for a restart).
            shards: s
                .shards
                .map_or(self.restart_only.shards, |n| n.clamp(1, MAX_SHARDS)),
            io_backend: s.io_backend,
            listen: listen_addrs(config, &wanted),
            monitor: s.monitor,
            tls: s.tls.clone(),
        };
        let old = &self.restart_only;
        for (changed, what) in [
            (new.node != old.node, "node"),
            (new.shards != old.shards, "shards"),
            (new.io_backend != old.io_backend, "io_backend"),
            (new.listen != old.listen, "the listen address"),
            (new.monitor != old.monitor, "monitor"),
            (new.tls != old.tls, "TLS (tls_*)"),
        ] {
            if changed {
                return Err(Error::NeedsRestart(what));
            }
        }
        let live = Live::from_settings(s);
        // The inboxes' bound first: once the settings in force (STATS)
        // show the new one, every inbox has it.
        for inbox in self.shared.inboxes.iter() {
            inbox.set_limit(live.shard_inbox_bytes);
        }
        *self.shared.live.lock().unwrap_or_else(|p| p.into_inner()) = live;
        for i in 0..self.shared.inboxes.len() {
            self.shared.send(i, ShardMsg::Reload(live));
        }
        crate::server::peers::reconfigure(&self.shared, s);
        self.resolver.wake();
        self.shared.auth.set_users(&s.users);
        Ok(())
    }

    /// Blocks shard `i`'s thread for `d` once it reaches this request in
    /// its inbox: for tests of what a stopped shard costs the others.
    #[doc(hidden)]
    pub fn stall_shard(&self, i: usize, d: Duration) {
        self.shared.send(i, ShardMsg::Stall(d));
    }

    /// Leaves the cluster cleanly, then shuts down (see [`leave`]): clients
    /// are told to move and given at most `lame_duck_duration`, the rest
    /// are closed, peers are told goodbye after everything this node's
    /// clients published, and peers announce its members as node-left.
    /// `interrupt` cuts the wait for clients short when it returns true.
    pub fn leave(self, interrupt: impl FnMut() -> bool) -> leave::Report {
        let mut report = leave::run(&self.shared, interrupt);
        let shared = self.shared.clone();
        self.shutdown();
        report.drops = shared.totals();
        report
    }

    /// Stops accepting, flushes what is queued (bounded by
    /// [`SHUTDOWN_GRACE`]), closes every connection and joins the shards.
    pub fn shutdown(self) {
        stop_threads(&self.shared, self.threads);
        crate::logging::flush_suppressed();
    }
}

/// Tells every shard to stop and joins their threads.
fn stop_threads(shared: &Shared, threads: Vec<ShardThread>) {
    shared.stopping.store(true, Ordering::Release);
    for i in 0..shared.shards() {
        shared.send(i, ShardMsg::Shutdown);
    }
    for t in threads {
        let _ = t.handle.join();
    }
}

/// How long start-up waits for every shard to report.
const START_LIMIT: Duration = Duration::from_secs(30);

/// Waits until every shard has its runtime and listeners, or one failed:
/// then the others are stopped and the first failure is the error.
fn wait_started(shared: &Shared, threads: Vec<ShardThread>) -> Result<Vec<ShardThread>, Error> {
    let deadline = Instant::now() + START_LIMIT;
    let mut failure = None;
    for t in &threads {
        let left = deadline.saturating_duration_since(Instant::now());
        let report = match t.started.recv_timeout(left) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("not running after {START_LIMIT:?}"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err("its thread ended during start-up".to_owned())
            }
        };
        if let Err(reason) = report {
            failure = Some(Error::Shard {
                shard: t.index,
                reason,
            });
            break;
        }
    }
    match failure {
        None => Ok(threads),
        Some(e) => {
            stop_threads(shared, threads);
            Err(e)
        }
    }
}

/// The nodes of this cluster that run on this machine: the peer entries
/// whose host is an IP literal of this machine or `localhost`, and this
/// node's own entry (no name is looked up in DNS for this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodesHere {
    /// How many (at least 1: this node).
    count: usize,
    /// This node's place among them, in the order of `peers`.
    index: usize,
}

impl NodesHere {
    fn of(s: &ServerSettings, node: &NodeName) -> NodesHere {
        let here = |p: &crate::config::Peer| {
            p.name == node.as_str()
                || p.host.eq_ignore_ascii_case("localhost")
                || p.host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| !ip.is_unspecified() && sockets::is_local_ip(ip))
        };
        let names: Vec<&str> = s
            .peers
            .iter()
            .filter(|p| here(p))
            .map(|p| p.name.as_str())
            .collect();
        NodesHere {
            count: names.len().max(1),
            index: names.iter().position(|n| *n == node.as_str()).unwrap_or(0),
        }
    }

    /// One shard per CPU this process may use; when that is every CPU of
    /// the machine and other nodes of the cluster run here too, the CPUs
    /// are shared out among them (at least one shard each). A process
    /// limited to some CPUs (`taskset`, a cgroup quota) was placed by its
    /// user and keeps one shard per CPU it has.
    fn default_shards(self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: sysconf reads a number and has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let whole_machine = usize::try_from(online).is_ok_and(|n| cpus >= n);
        shares(cpus, self.count, whole_machine)
    }
}

/// `cpus` shared among `nodes` when the process has the whole machine.
fn shares(cpus: usize, nodes: usize, whole_machine: bool) -> usize {
    if whole_machine {
        (cpus / nodes.max(1)).max(1)
    } else {
        cpus
    }
}

/// This node's name: the flag, else `node`, else the one peer entry whose
/// host is an address of this machine, else (no peers) the host name.
fn resolve_node(s: &ServerSettings, flag: Option<&str>) -> Result<NodeName, Error> {
    let bad = |n: &str, e| Error::Node(format!("node name {n:?} is not valid: {e}"));
    if let Some(n) = flag.or(s.node.as_deref()) {
        if !s.peers.is_empty() && s.peer(n).is_none() {
            let names: Vec<&str> = s.peers.iter().map(|p| p.name.as_str()).collect();
            return Err(Error::Node(format!(
                "node {n:?} is not in peers ({})",
                names.join(", ")
            )));
        }
        return NodeName::from_str_checked(n).map_err(|e| bad(n, e));
    }
    if s.peers.is_empty() {
        let host = hostname();
        return NodeName::from_str_checked(&host).map_err(|e| bad(&host, e));
    }
    let local: Vec<&str> = s
        .peers
        .iter()
        .filter(|p| resolve(&p.addr_string(s.port)).is_some_and(|a| sockets::is_local_ip(a.ip())))
        .map(|p| p.name.as_str())
        .collect();
    match local.as_slice() {
        [one] => NodeName::from_str_checked(one).map_err(|e| bad(one, e)),
        [] => Err(Error::Node(
            "no entry of peers is an address of this machine; give --node NAME".into(),
        )),
        many => Err(Error::Node(format!(
            "several entries of peers ({}) are addresses of this machine; give --node NAME",
            many.join(", ")
        ))),
    }
}

/// Where to listen: the listener's `listen` scopes; else this node's own
/// peer address; else 127.0.0.1 on `port` (never every address by default).
fn listen_addrs(config: &Config, node: &NodeName) -> Vec<SocketAddr> {
    let s = &config.server;
    let own = s
        .peer(node.as_str())
        .and_then(|p| resolve(&p.addr_string(s.port)));
    config.listen_addrs(own)
}

/// The node name and listen addresses [`Server::start`] would use with
/// `config` and `node` (the `--node` flag), without binding anything.
///
/// # Errors
/// [`Error::Node`] as [`Server::start`].
pub fn plan(config: &Config, node: Option<&str>) -> Result<(NodeName, Vec<SocketAddr>), Error> {
    let node = resolve_node(&config.server, node)?;
    let listen = listen_addrs(config, &node);
    Ok((node, listen))
}

/// Resolves `host:port` to its first address. Blocks on DNS: used at
/// start-up and reload only (the node's own entry, the listen address),
/// never on a shard (the peers' names: `peers::resolve`).
pub fn resolve(spec: &str) -> Option<SocketAddr> {
    spec.to_socket_addrs().ok()?.next()
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).replace(|c: char| !c.is_ascii_graphic(), "");
    if rc != 0 || name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

fn choose_backend(want: IoBackend) -> Result<bool, Error> {
    match want {
        IoBackend::Epoll => Ok(false),
        IoBackend::Uring => io::uring_available()
            .map(|()| true)
            .map_err(Error::UringUnavailable),
        IoBackend::Auto => match io::uring_available() {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(target: crate::logging::OPS, error = %e, "io_uring is not available here (seccomp or kernel.io_uring_disabled?); using epoll");
                Ok(false)
            }
        },
    }
}

type ShardListeners = Vec<Vec<std::net::TcpListener>>;

/// Binds each address once per shard; a port of 0 is resolved by the first
/// bind and reused by the others so that all shards share one port. An
/// address something already listens on is waited for (up to `wait`), then
/// refused (see [`sockets::wait_until_free`]).
fn bind_all(
    listen: &[SocketAddr],
    shards: usize,
    opts: SocketOpts,
    wait: Duration,
) -> Result<(ShardListeners, Vec<SocketAddr>), Error> {
    let mut per_shard: ShardListeners = (0..shards).map(|_| Vec::new()).collect();
    let mut actual = Vec::new();
    for &addr in listen {
        sockets::wait_until_free(addr, wait).map_err(|error| Error::Listen { addr, error })?;
        let mut addr = addr;
        for slot in per_shard.iter_mut() {
            let l = sockets::listener(addr, opts).map_err(|error| Error::Listen { addr, error })?;
            addr = l
                .local_addr()
                .map_err(|error| Error::Listen { addr, error })?;
            slot.push(l);
        }
        actual.push(addr);
    }
    Ok((per_shard, actual))
}

/// A shard's thread and how it reports its start (runtime and listeners
/// ready: `Ok`; else why not).
struct ShardThread {
    index: usize,
    handle: JoinHandle<()>,
    started: std::sync::mpsc::Receiver<Result<(), String>>,
}

/// Where a shard says whether it started.
type Started = std::sync::mpsc::SyncSender<Result<(), String>>;

/// Starts shard *i* on a thread pinned to the `first_core + i`-th CPU
/// this process may use (wrapping around).
fn spawn_shards(
    shared: &Arc<Shared>,
    listeners: ShardListeners,
    rxs: Vec<flume::Receiver<ShardMsg>>,
    uring: bool,
    first_core: usize,
) -> Result<Vec<ShardThread>, Error> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut threads = Vec::new();
    for (i, (ls, rx)) in listeners.into_iter().zip(rxs).enumerate() {
        let shared2 = shared.clone();
        let core = (!cores.is_empty()).then(|| cores[(first_core + i) % cores.len()]);
        let (tx, started) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name(format!("msgc-shard-{i}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                run_shard(i, shared2, ls, rx, uring, tx);
            });
        match spawned {
            Ok(handle) => threads.push(ShardThread {
                index: i,
                handle,
                started,
            }),
            Err(e) => {
                stop_threads(shared, threads);
                return Err(Error::Thread(e));
            }
        }
    }
    Ok(threads)
}

fn run_shard(
    i: usize,
    shared: Arc<Shared>,
    ls: Vec<std::net::TcpListener>,
    rx: flume::Receiver<ShardMsg>,
    uring: bool,
    started: Started,
) {
    if uring {
        match tokio_uring::Runtime::new(tokio_uring::builder().entries(1024)) {
            Ok(rt) => rt.block_on(shard_main(i, shared, ls, rx, uring, started)),
            Err(e) => {
                let _ = started.send(Err(format!("cannot start its io_uring runtime: {e}")));
            }
        }
    } else {
        // No signal driver: shards take no signals, and its set-up panics
        // (rather than fails) when file descriptors run out.
        match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(rt) => tokio::task::LocalSet::new()
                .block_on(&rt, shard_main(i, shared, ls, rx, uring, started)),
            Err(e) => {
                let _ = started.send(Err(format!("cannot start its runtime: {e}")));
            }
        }
    }
}

async fn shard_main(
    i: usize,
    shared: Arc<Shared>,
    ls: Vec<std::net::TcpListener>,
    rx: flume::Receiver<ShardMsg>,
    uring: bool,
    started: Started,
) {
    let mut listeners = Vec::new();
    for l in ls {
        match io::Listener::from_std(l, uring) {
            Ok(l) => listeners.push(Rc::new(l)),
            Err(e) => {
                let _ = started.send(Err(format!("cannot register its listener: {e}")));
                return;
            }
        }
    }
    let _ = started.send(Ok(()));
    let shard = Shard::new(i, shared, uring);
    for l in &listeners {
        tokio::task::spawn_local(shard.clone().accept_loop(l.clone()));
    }
    tokio::task::spawn_local(shard.clone().sweep_loop());
    tokio::task::spawn_local(shard.clone().stuck_watch());
    tokio::task::spawn_local(shard.clone().batch_flusher());
    crate::server::peers::start_shard(&shard);
    shard.clone().inbox_loop(rx).await;
    for l in &listeners {
        l.shutdown();
    }
    // Connections are flushing; each is force-closed at its deadline.
    let deadline = Instant::now() + SHUTDOWN_GRACE + Duration::from_millis(500);
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // What is left is killed: its sockets shut, each writer's write in
    // flight ends now and the writer counts what of it did not go out.
    // Waited for (bounded), killing any connection that came meanwhile (a
    // peer dial that was connecting).
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left: Vec<_> = shard
            .conns
            .borrow()
            .values()
            .filter(|c| c.out.phase() != outbound::Phase::Closed)
            .cloned()
            .collect();
        for c in left {
            shard.kill(&c, shard::Kill::Closed);
        }
        if shard.writers.get() == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(peers: &str) -> ServerSettings {
        let text = format!("msgc_server {{\n peers = [ {peers} ]\n}}\n");
        Config::parse_str("t.conf", &text)
            .expect("config parses")
            .server
    }

    fn node(name: &str) -> NodeName {
        NodeName::from_str_checked(name).expect("node name")
    }

    /// With `shards` unset, a reload that changes which peers run here
    /// (and so the share of CPUs a start would take) applies its peers and
    /// keeps the running shards: no restart asked.
    #[test]
    fn a_reload_of_peers_keeps_the_shards_it_started_with() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = |peers: &str| {
            let text = format!(
                "msgc_server {{\n node = \"a\"\n port = {port}\n io_backend = epoll\n peers = [ {peers} ]\n}}\n\
                 msgcserver_listener {{ listen \"127.0.0.1:0\" {{ }} }}\n"
            );
            Config::parse_str("t.conf", &text).expect("config parses")
        };
        let server =
            Server::start(&conf("a = \"127.0.0.1\" b = \"203.0.113.9\""), None).expect("starts");
        let shards = server.shared().shards();
        let moved = conf("a = \"127.0.0.1\" b = \"127.0.0.2\"");
        assert!(
            NodesHere::of(&moved.server, &node("a")).count == 2,
            "b now runs here"
        );
        server
            .reload(&moved, None)
            .expect("a reload of peers needs no restart");
        assert_eq!(server.shared().shards(), shards);
        // Set explicitly to another count, it still needs a restart.
        let mut explicit = moved.clone();
        explicit.server.shards = Some(shards + 1);
        assert!(matches!(
            server.reload(&explicit, None),
            Err(Error::NeedsRestart(_))
        ));
        server.shutdown();
    }

    #[test]
    fn the_cpus_are_shared_among_the_nodes_of_this_machine() {
        // (CPUs, nodes here, the process has the whole machine, shards)
        let table = [
            (2, 3, true, 1),
            (2, 2, true, 1),
            (2, 1, true, 2),
            (8, 3, true, 2),
            (64, 2, true, 32),
            (1, 0, true, 1),
            (2, 3, false, 2), // placed by its user: one per CPU it has
            (16, 4, false, 16),
        ];
        for (cpus, nodes, whole, want) in table {
            assert_eq!(
                shares(cpus, nodes, whole),
                want,
                "{cpus} CPUs, {nodes} nodes, whole {whole}"
            );
        }
    }

    #[test]
    fn nodes_here_are_local_literals_localhost_and_this_node() {
        for ip in ["203.0.113.7", "203.0.113.8"] {
            let ip = ip.parse().expect("ip");
            assert!(
                !sockets::is_local_ip(ip),
                "this test needs {ip} not to be an address of this machine"
            );
        }
        let s = settings(
            "node1 = \"127.0.0.1\" node2 = \"127.0.0.2\" node3 = \"203.0.113.7\" \
             node4 = \"localhost\" node5 = \"msgc.invalid\" node6 = \"0.0.0.0\"",
        );
        assert_eq!(
            NodesHere::of(&s, &node("node2")),
            NodesHere { count: 3, index: 1 },
            "node1, node2 and node4 run here"
        );
        // This node runs here whatever its entry says (names are not looked up).
        assert_eq!(
            NodesHere::of(&s, &node("node5")),
            NodesHere { count: 4, index: 3 }
        );
        assert_eq!(
            NodesHere::of(&settings(""), &node("solo")),
            NodesHere { count: 1, index: 0 }
        );
        let remote = settings("a = \"203.0.113.7\" b = \"203.0.113.8\"");
        assert_eq!(
            NodesHere::of(&remote, &node("a")),
            NodesHere { count: 1, index: 0 },
            "a dedicated server keeps every CPU"
        );
    }
}
