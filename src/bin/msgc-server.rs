//! `msgc-server`: msgc_server and msgcserver_listener in one process.

use anyhow::Context;
use clap::Parser;
use msgc::config::{Config, IoBackend, ListenAddr};
use msgc::server::Server;
use std::path::PathBuf;
use std::process::ExitCode;
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
    /// Parse FILE, print the effective settings and exit (0 valid, 2 invalid).
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
    /// Serve the HTTP monitoring endpoint on ADDR (overrides msgc_server.monitor).
    #[arg(long, value_name = "IP:PORT")]
    monitor: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return check_config(path, args.node.as_deref());
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msgc-server: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn check_config(path: &std::path::Path, node: Option<&str>) -> ExitCode {
    let mut config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = node {
        if !config.server.peers.is_empty() && config.server.peer(n).is_none() {
            eprintln!(
                "{}: --node {n:?} is not an entry of msgc_server.peers",
                path.display()
            );
            return ExitCode::from(2);
        }
        config.server.node = Some(n.to_owned());
    }
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", config.render_effective());
    ExitCode::SUCCESS
}

/// Loads the file (or the embedded default) and applies the command line.
fn load(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(p) => Config::load(p).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Config::default(),
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
    }
    if let Some(n) = args.shards {
        anyhow::ensure!((1..=64).contains(&n), "--shards {n}: expected 1 to 64");
        config.server.shards = Some(n);
    }
    if let Some(b) = &args.io_backend {
        config.server.io_backend = match b.as_str() {
            "auto" => IoBackend::Auto,
            "uring" => IoBackend::Uring,
            "epoll" => IoBackend::Epoll,
            other => anyhow::bail!("--io-backend {other:?}: expected auto, uring or epoll"),
        };
    }
    if let Some(m) = &args.monitor {
        let addr = m
            .parse()
            .with_context(|| format!("--monitor {m:?}: expected IP:PORT"))?;
        config.server.monitor = Some(addr);
    }
    Ok(config)
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

fn init_logging(config: &Config) -> FilterHandle {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(config);
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    handle
}

/// `RUST_LOG` when set, else `debug_level` mapped onto tracing's levels.
fn log_filter(config: &Config) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.server.debug_level.as_tracing_filter()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = load(&args)?;
    let log = init_logging(&config);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let monitor = match config.server.monitor {
        Some(addr) => Some(
            msgc::monitor::Monitor::bind(addr)
                .with_context(|| format!("monitor: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let server = Server::start(&config, args.node.as_deref())?;
    let monitor = match monitor {
        Some(m) => Some(m.serve(server.shared().clone()).context("monitor")?),
        None => None,
    };
    let source = args
        .config
        .as_ref()
        .map_or("the embedded default config".into(), |p| {
            p.display().to_string()
        });
    eprintln!(
        "msgc-server: node {} listening on {} ({} shards, {} backend), settings from {source}:",
        server.node(),
        server
            .local_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        server.stats_json()["shards"],
        server.stats_json()["io_backend"].as_str().unwrap_or("?"),
    );
    for line in config.render_effective().lines() {
        eprintln!("  {line}");
    }
    wait_for_signals(&server, &args, &log)?;
    eprintln!("msgc-server: shutting down");
    server.shutdown();
    drop(monitor);
    Ok(())
}

/// Blocks until SIGINT or SIGTERM; SIGHUP re-reads the configuration.
fn wait_for_signals(server: &Server, args: &Args, log: &FilterHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = int.recv() => return Ok(()),
                _ = term.recv() => return Ok(()),
                _ = hup.recv() => reload_config(server, args, log),
            }
        }
    })
}

fn reload_config(server: &Server, args: &Args, log: &FilterHandle) {
    let Some(path) = &args.config else {
        tracing::warn!("SIGHUP: running on the embedded default config; nothing to re-read");
        return;
    };
    let config = match load(args) {
        Ok(c) => c,
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
