//! `msgc-server`: msgc_server and msgcserver_listener in one process.

use anyhow::Context;
use clap::Parser;
use msgc::config::{Config, IoBackend, ListenAddr, Notes};
use msgc::server::Server;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::{reload, EnvFilter};

/// Cluster message bus server (Momentum msgc_server + msgcserver_listener).
#[derive(Parser, Debug)]
#[command(name = "msgc-server", version, about)]
struct Args {
    /// Momentum-syntax configuration file (default: the embedded default,
    /// a single node on 127.0.0.1:4809).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's name in `peers` (overrides msgc_server.node).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Parse FILE, print the effective settings (with the other flags
    /// applied) and exit (0 valid, 2 invalid).
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Listen on ADDR instead of the configured listen scopes (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Number of shards (overrides msgc_server.shards).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// I/O backend: auto, uring or epoll (overrides msgc_server.io_backend).
    #[arg(long, value_name = "BACKEND")]
    io_backend: Option<String>,
    /// Seconds to wait for a listen address that is in use (the lingering
    /// sockets of a process that just exited) before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    listen_wait: f64,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Serve the HTTP monitoring endpoint on ADDR (overrides msgc_server.monitor).
    #[arg(long, value_name = "IP:PORT")]
    monitor: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return check_config(path, &args);
    }
    let json = args.log_format == "json";
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            let line = serde_json::json!({
                "level": "ERROR",
                "target": "msgc-server",
                "fields": { "message": format!("{e:#}") },
            });
            eprintln!("{line}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("msgc-server: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `--check-config FILE`: the settings the server would run with, as far
/// as they can be known without starting it.
fn check_config(path: &Path, args: &Args) -> ExitCode {
    let (config, notes) = match load(Some(path), args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    let (config, notes) = match msgc::server::plan(&config, args.node.as_deref()) {
        Ok((node, listen)) => annotate(&config, notes, node.as_str(), &listen, None),
        // Without --node, a config shared by several machines may name none
        // of this one's addresses: what every node shares is still shown.
        Err(_) if args.node.is_none() => {
            let mut notes = notes;
            notes.insert(
                "msgc_server.node".into(),
                "default: the entry of peers that is an address of the machine it runs on".into(),
            );
            (config, notes)
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    print!("{}", config.render_annotated(&notes));
    ExitCode::SUCCESS
}

/// Loads `path` (or the embedded default) and applies the command line;
/// the notes name the flag behind each value it set.
fn load(path: Option<&Path>, args: &Args) -> anyhow::Result<(Config, Notes)> {
    let mut config = match path {
        Some(p) => Config::load(p).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Config::default(),
    };
    let mut notes = Notes::new();
    let mut note = |key: &str, flag: &str| {
        notes.insert(key.to_owned(), format!("{flag} (command line)"));
    };
    if !args.listen.is_empty() {
        config.listener.listen = args
            .listen
            .iter()
            .map(|a| {
                a.parse()
                    .map(ListenAddr)
                    .with_context(|| format!("--listen {a:?}: expected IP:PORT"))
            })
            .collect::<anyhow::Result<_>>()?;
        note("msgcserver_listener.listen", "--listen");
    }
    if let Some(n) = &args.node {
        config.server.node = Some(n.clone());
        note("msgc_server.node", "--node");
    }
    if let Some(n) = args.shards {
        anyhow::ensure!((1..=64).contains(&n), "--shards {n}: expected 1 to 64");
        config.server.shards = Some(n);
        note("msgc_server.shards", "--shards");
    }
    if let Some(b) = &args.io_backend {
        config.server.io_backend = match b.as_str() {
            "auto" => IoBackend::Auto,
            "uring" => IoBackend::Uring,
            "epoll" => IoBackend::Epoll,
            other => anyhow::bail!("--io-backend {other:?}: expected auto, uring or epoll"),
        };
        note("msgc_server.io_backend", "--io-backend");
    }
    if let Some(m) = &args.monitor {
        let addr = m
            .parse()
            .with_context(|| format!("--monitor {m:?}: expected IP:PORT"))?;
        config.server.monitor = Some(addr);
        note("msgc_server.monitor", "--monitor");
    }
    Ok((config, notes))
}

/// The configuration as it is in force: the node's name, the listen
/// addresses (as bound) and the shard count filled in, with a note saying
/// where each came from when not from the files.
fn annotate(
    config: &Config,
    mut notes: Notes,
    node: &str,
    listen: &[SocketAddr],
    shards: Option<usize>,
) -> (Config, Notes) {
    let mut c = config.clone();
    let mut default = |key: &str, why: String| {
        notes.entry(key.to_owned()).or_insert(why);
    };
    if c.server.node.is_none() {
        c.server.node = Some(node.to_owned());
        let why = if c.server.peers.is_empty() {
            "default: the host name"
        } else {
            "detected: the entry of peers that is an address of this machine"
        };
        default("msgc_server.node", why.to_owned());
    }
    if let (None, Some(n)) = (c.server.shards, shards) {
        c.server.shards = Some(n);
        default("msgc_server.shards", "default: one per CPU".to_owned());
    }
    let listed: Vec<SocketAddr> = c.listener.listen.iter().map(|a| a.0).collect();
    if listed.is_empty() {
        let why = if c.server.peers.is_empty() {
            "default: no peers, so 127.0.0.1 on port".to_owned()
        } else {
            format!("default: {node}'s address in peers")
        };
        default("msgcserver_listener.listen", why);
    } else if listed != listen {
        let asked: Vec<String> = listed.iter().map(|a| ListenAddr(*a).to_string()).collect();
        default(
            "msgcserver_listener.listen",
            format!("as bound ({} asked)", asked.join(", ")),
        );
    }
    c.listener.listen = listen.iter().copied().map(ListenAddr).collect();
    (c, notes)
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

fn init_logging(config: &Config, json: bool) -> FilterHandle {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(config);
    let (layer, handle) = reload::Layer::new(filter);
    type Filtered = tracing_subscriber::layer::Layered<
        reload::Layer<EnvFilter, tracing_subscriber::Registry>,
        tracing_subscriber::Registry,
    >;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let lines: Box<dyn tracing_subscriber::Layer<Filtered> + Send + Sync> = if json {
        Box::new(fmt.json())
    } else {
        Box::new(fmt)
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(lines)
        .init();
    handle
}

/// `RUST_LOG` when set, else `debug_level` mapped onto tracing's levels;
/// the events an operator must see ([`msgc::logging::OPS`]) always.
fn log_filter(config: &Config) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(msgc::logging::filter_directives(
            config.server.debug_level.as_tracing_filter(),
        ))
    })
}

fn run(args: Args) -> anyhow::Result<()> {
    let (config, notes) = load(args.config.as_deref(), &args)?;
    let log = init_logging(&config, args.log_format == "json");
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if config.server.peers.len() > 1 && config.server.cluster_key.is_none() {
        tracing::warn!(
            target: msgc::logging::OPS,
            "NO CLUSTER KEY: peers are set but neither cluster_key nor cluster_key_file is: \
             any process that can connect from a peer's address can join the cluster as \
             that peer (set the same cluster_key on every node; README: Securing a cluster)"
        );
    }
    anyhow::ensure!(
        args.listen_wait.is_finite() && (0.0..=3600.0).contains(&args.listen_wait),
        "--listen-wait {}: expected 0 to 3600 seconds",
        args.listen_wait
    );
    let wait = Duration::from_secs_f64(args.listen_wait);
    let signals = Signals::catch()?;
    let monitor = match config.server.monitor {
        Some(addr) => Some(
            msgc::monitor::Monitor::bind(addr)
                .with_context(|| format!("monitor: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let server = Server::start_waiting(&config, args.node.as_deref(), wait)?;
    let monitor = match monitor {
        Some(m) => Some(m.serve(server.shared().clone()).context("monitor")?),
        None => None,
    };
    let json = args.log_format == "json";
    banner(&server, &config, notes, &args, json);
    let signals = wait_for_signals(signals, &server, &args, &log)?;
    let bound = config.server.lame_duck_duration;
    let leaving = format!("msgc-server: leaving the cluster (clients get at most {bound:?} to move; a second signal stops at once)");
    if json {
        tracing::info!(target: msgc::logging::OPS, "{leaving}");
    } else {
        eprintln!("{leaving}");
    }
    let again = signals.watch();
    let report = server.leave(|| again.load(std::sync::atomic::Ordering::Relaxed));
    let done = format!(
        "msgc-server: left the cluster: {} clients told to move, {} closed, {} peer links told; stopped; messages dropped over its life: {}",
        report.told,
        report.closed,
        report.links,
        report.drops.drops_summary()
    );
    if json {
        tracing::info!(target: msgc::logging::OPS, "{done}");
    } else {
        eprintln!("{done}");
    }
    drop(monitor);
    Ok(())
}

/// What runs, where, and with which settings (each marked with where it
/// came from when not from the files): lines of text, or one log event
/// with `--log-format json`.
fn banner(server: &Server, config: &Config, notes: Notes, args: &Args, json: bool) {
    let source = args
        .config
        .as_ref()
        .map_or("the embedded default config".into(), |p| {
            p.display().to_string()
        });
    let stats = server.stats_json();
    let shards = stats["shards"].as_u64().unwrap_or(0);
    let backend = stats["io_backend"].as_str().unwrap_or("?");
    let addrs = server.local_addrs();
    let listening = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let (shown, mut notes) = annotate(
        config,
        notes,
        server.node().as_str(),
        addrs,
        usize::try_from(shards).ok(),
    );
    if config.server.io_backend == IoBackend::Auto {
        notes
            .entry("msgc_server.io_backend".into())
            .or_insert_with(|| format!("default; running: {backend}"));
    }
    let settings = shown.render_annotated(&notes);
    let node = server.node();
    if json {
        tracing::info!(target: msgc::logging::OPS, %node, listen = listening, shards, backend,
            source, settings, "msgc-server started");
        return;
    }
    eprintln!(
        "msgc-server: node {node} listening on {listening} ({shards} shards, {backend} backend), settings from {source}:"
    );
    for line in settings.lines() {
        eprintln!("  {line}");
    }
}

/// The signals the server acts on, caught from before it starts (a
/// SIGTERM right after the banner stops it cleanly).
struct Signals {
    rt: tokio::runtime::Runtime,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let _in_rt = rt.enter();
        let int = signal(SignalKind::interrupt())?;
        let term = signal(SignalKind::terminate())?;
        let hup = signal(SignalKind::hangup())?;
        let usr2 = signal(SignalKind::user_defined2())?;
        drop(_in_rt);
        Ok(Self {
            rt,
            int,
            term,
            hup,
            usr2,
        })
    }

    /// Watches for one more SIGINT, SIGTERM or SIGUSR2 on a thread of its
    /// own: the flag is set when it comes (stop at once).
    fn watch(self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let set = flag.clone();
        let Self {
            rt,
            mut int,
            mut term,
            mut usr2,
            ..
        } = self;
        let spawned = std::thread::Builder::new()
            .name("msgc-signals".into())
            .spawn(move || {
                rt.block_on(async {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                        _ = usr2.recv() => {}
                    }
                });
                set.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot watch for a second signal: {e}");
        }
        flag
    }
}

/// Blocks until SIGINT, SIGTERM or SIGUSR2 (each: leave the cluster,
/// then stop); SIGHUP re-reads the configuration. Gives the signals back.
fn wait_for_signals(
    mut signals: Signals,
    server: &Server,
    args: &Args,
    log: &FilterHandle,
) -> anyhow::Result<Signals> {
    let Signals {
        rt,
        int,
        term,
        hup,
        usr2,
    } = &mut signals;
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = int.recv() => return,
                _ = term.recv() => return,
                _ = usr2.recv() => return,
                _ = hup.recv() => reload_config(server, args, log),
            }
        }
    });
    Ok(signals)
}

fn reload_config(server: &Server, args: &Args, log: &FilterHandle) {
    let Some(path) = &args.config else {
        tracing::warn!("SIGHUP: running on the embedded default config; nothing to re-read");
        return;
    };
    let config = match load(Some(path), args) {
        Ok((c, _)) => c,
        Err(e) => {
            tracing::error!(
                "SIGHUP: {} not reloaded, the running settings stay: {e:#}",
                path.display()
            );
            return;
        }
    };
    if let Err(e) = server.reload(&config, args.node.as_deref()) {
        tracing::error!(
            "SIGHUP: {} not reloaded, the running settings stay: {e}",
            path.display()
        );
        return;
    }
    if let Err(e) = log.reload(log_filter(&config)) {
        tracing::warn!("SIGHUP: debug_level not applied: {e}");
    }
    tracing::info!("SIGHUP: reloaded {}", path.display());
}
