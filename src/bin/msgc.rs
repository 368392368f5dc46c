//! `msgc`: the msgc bus from a terminal.
//!
//! `msgc sub GROUP…`, `msgc pub GROUP [MESSAGE]`, `msgc members GROUP`,
//! `msgc stats [--full|--json]`, `msgc cluster`, `msgc ping`. Output meant for pipes goes to
//! stdout (payloads, member ids, stats); everything else to stderr. Errors
//! are one line, `msgc: …`, with exit status 1; usage errors exit 2.
//! Payloads reach a terminal escaped (`escape`), a pipe as they are.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{ArgAction, Parser, Subcommand};
use msgc::client::{Client, ClientConfig, Event};
use msgc::protocol::GroupName;
use serde_json::{Map, Value};
use tokio::time::Instant;

#[path = "msgc/escape.rs"]
mod escape;
#[path = "msgc/summary.rs"]
mod summary;

/// Talk to an msgc server: subscribe, publish, list members, read stats.
#[derive(Parser)]
#[command(name = "msgc", version)]
struct Cli {
    /// Server to connect to as HOST:PORT; repeat or comma-separate to give
    /// failover servers, tried in order [default: 127.0.0.1:4809]
    #[arg(
        long = "server",
        short = 's',
        value_name = "HOST:PORT",
        value_delimiter = ',',
        global = true
    )]
    servers: Vec<String>,
    /// Momentum-syntax config file whose msgc_client stanza to use
    /// (--server overrides its `server`)
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// -v: membership events and direct messages on stderr (sub);
    /// -vv: also info logs; -vvv: debug logs
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// User to log in as, for a server with `users` configured
    /// [env: MSGC_USER]
    #[arg(long, short = 'u', value_name = "NAME", global = true)]
    user: Option<String>,
    /// The user's password; prefer the MSGC_PASSWORD environment variable
    /// (a command line is visible to other local users) [env: MSGC_PASSWORD]
    #[arg(long, value_name = "PASSWORD", global = true)]
    password: Option<String>,
    /// Connect over TLS, trusting servers whose certificate this CA (PEM
    /// file) signed
    #[arg(long, value_name = "FILE", global = true)]
    tls_ca: Option<String>,
    /// Client certificate (PEM) to present over TLS, for a server with
    /// tls_client_auth = true; needs --tls-key and --tls-ca
    #[arg(long, value_name = "FILE", global = true)]
    tls_cert: Option<String>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, value_name = "FILE", global = true)]
    tls_key: Option<String>,
    /// Name the server's certificate must carry [default: the host of
    /// --server]
    #[arg(long, value_name = "NAME", global = true)]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join GROUPs and print each message's payload on its own line
    /// (control characters escaped when stdout is a terminal)
    Sub {
        /// Groups to join
        #[arg(required = true, value_name = "GROUP")]
        groups: Vec<String>,
        /// Exit (status 0) after N messages
        #[arg(long, short = 'n', value_name = "N")]
        count: Option<u64>,
        /// Give up after SECS: status 0 without --count, else 1 if fewer
        /// than N messages arrived
        #[arg(long, short = 't', value_name = "SECS", value_parser = parse_secs)]
        timeout: Option<Duration>,
        /// Write payloads as they are, even to a terminal (the default
        /// when stdout is a pipe or a file)
        #[arg(long, conflicts_with = "escape")]
        raw: bool,
        /// Show control characters and bytes that are not UTF-8 as escapes
        /// (`\x1b`, `\n`), even into a pipe (the default on a terminal)
        #[arg(long)]
        escape: bool,
    },
    /// Publish MESSAGE to GROUP, or each line of standard input as one message
    Pub {
        /// Group to publish to
        group: String,
        /// The message; without it, standard input is read line by line
        message: Option<String>,
    },
    /// Print GROUP's members, one member id per line
    Members {
        /// The group
        group: String,
    },
    /// Print a summary of the server's state (links up, connections,
    /// groups, drops); --full for every counter
    Stats {
        /// Print every counter (per shard, per peer…) as tables
        #[arg(long, conflicts_with = "json")]
        full: bool,
        /// Print the JSON document as the server sent it (pretty-printed)
        #[arg(long)]
        json: bool,
    },
    /// Ask the server and each of its peers for their view of the mesh, one
    /// line per node; exit status 1 unless every node answers and sees
    /// every link up
    Cluster,
    /// Check that the server answers and print the round-trip time
    Ping,
    /// Read a password (the first line of standard input) and print its
    /// argon2id hash, for a user's `password` in msgc_server's `users`
    HashPassword {
        /// Argon2 memory cost in KiB [default: 19456]
        #[arg(long, value_name = "KIB")]
        memory_kib: Option<u32>,
        /// Argon2 passes [default: 2]
        #[arg(long, value_name = "N")]
        passes: Option<u32>,
    },
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err(format!("`{text}` is not a positive number of seconds")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(code) => code,
        Err(e) => {
            for line in format!("{e:#}").lines() {
                eprintln!("msgc: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::HashPassword { memory_kib, passes } = cli.command {
        return hash_password(memory_kib, passes);
    }
    let cfg = client_config(&cli)?;
    init_logging(&cfg, cli.verbose);
    match cli.command {
        Command::Sub {
            groups,
            count,
            timeout,
            raw,
            escape,
        } => {
            let out = Output {
                escape: !raw && (escape || std::io::stdout().is_terminal()),
                verbose: cli.verbose > 0,
            };
            sub(cfg, &groups, count, timeout, out).await
        }
        Command::Pub { group, message } => publish(cfg, &group, message).await,
        Command::Members { group } => members(cfg, &group).await,
        Command::Stats { full, json } => stats(cfg, full, json).await,
        Command::Cluster => cluster(cfg).await,
        Command::Ping => ping(cfg).await,
        Command::HashPassword { .. } => unreachable!("handled above"),
    }
}

/// `msgc hash-password`: the first line of standard input (without its
/// line end), hashed with argon2id and a random salt, on stdout.
fn hash_password(memory_kib: Option<u32>, passes: Option<u32>) -> Result<ExitCode> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("msgc: type the password and press Enter (it is echoed)");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("the password is empty");
    }
    let mut cost = msgc::server::auth::Cost::default();
    cost.memory_kib = memory_kib.unwrap_or(cost.memory_kib);
    cost.passes = passes.unwrap_or(cost.passes);
    let hash =
        msgc::server::auth::hash_password(password.as_bytes(), cost).map_err(|e| anyhow!(e))?;
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}

/// The config file's `msgc_client` stanza (or the defaults), with
/// `--server` applied.
fn client_config(cli: &Cli) -> Result<ClientConfig> {
    let mut cfg = match &cli.config {
        Some(path) => ClientConfig::load(path)?,
        None => ClientConfig::default(),
    };
    let servers: Vec<String> = cli
        .servers
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if !servers.is_empty() {
        cfg.servers = servers;
    }
    cfg.name = Some("msgc-cli".to_string());
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    cfg.user = cli.user.clone().or_else(|| env("MSGC_USER")).or(cfg.user);
    cfg.password = cli
        .password
        .clone()
        .or_else(|| env("MSGC_PASSWORD"))
        .or(cfg.password);
    if cfg.user.is_some() && cfg.password.is_none() {
        bail!("--user needs a password: set MSGC_PASSWORD (or --password)");
    }
    cfg.tls_ca = cli.tls_ca.clone().or(cfg.tls_ca);
    cfg.tls_certificate = cli.tls_cert.clone().or(cfg.tls_certificate);
    cfg.tls_key = cli.tls_key.clone().or(cfg.tls_key);
    cfg.tls_server_name = cli.tls_server_name.clone().or(cfg.tls_server_name);
    Ok(cfg)
}

/// Logs to stderr: `RUST_LOG` if set, else the config's `debug_level`,
/// raised to `info` by -vv and `debug` by -vvv.
fn init_logging(cfg: &ClientConfig, verbose: u8) {
    let level = match verbose {
        0 | 1 => cfg.debug_level.as_tracing_filter(),
        2 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn group_name(text: &str) -> Result<GroupName> {
    GroupName::from_str_checked(text).map_err(|e| anyhow!("invalid group name `{text}`: {e}"))
}

/// How `msgc sub` writes what it receives.
#[derive(Clone, Copy)]
struct Output {
    /// Payloads escaped for a terminal (see `escape`), else raw.
    escape: bool,
    /// Membership events and direct messages on stderr.
    verbose: bool,
}

async fn sub(
    cfg: ClientConfig,
    groups: &[String],
    count: Option<u64>,
    limit: Option<Duration>,
    how: Output,
) -> Result<ExitCode> {
    let groups = groups
        .iter()
        .map(|g| group_name(g))
        .collect::<Result<Vec<_>>>()?;
    let deadline = limit.map(|d| Instant::now() + d);
    let setup = async {
        let client = Client::connect(cfg).await?;
        for group in &groups {
            client
                .join(group)
                .await
                .with_context(|| format!("cannot join {group}"))?;
        }
        anyhow::Ok(client)
    };
    let client = match deadline {
        Some(at) => tokio::time::timeout_at(at, setup)
            .await
            .map_err(|_| anyhow!("timed out before joining every group"))??,
        None => setup.await?,
    };
    let got = receive(&client, count, deadline, how).await;
    let _ = client.close().await;
    let got = got?;
    match count {
        Some(want) if got < want => {
            let secs = limit.map_or(0.0, |d| d.as_secs_f64());
            Err(anyhow!(
                "timed out after {secs}s: received {got} of {want} messages"
            ))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Prints messages until `count` is reached, the deadline passes or stdout
/// is closed; returns how many were printed. Every line is flushed before
/// waiting for the next event; lines already waiting are written together.
async fn receive(
    client: &Client,
    count: Option<u64>,
    deadline: Option<Instant>,
    how: Output,
) -> Result<u64> {
    let events = client.events();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut got = 0u64;
    while count.is_none_or(|want| got < want) {
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at, events.recv_async()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => events.recv_async().await,
        };
        let event = next.map_err(|_| anyhow!("the client stopped"))?;
        let Event::Message { payload, .. } = event else {
            report(event, how.verbose);
            continue;
        };
        got += 1;
        let last = events.is_empty() || count == Some(got);
        match write_line(&mut out, &payload, how.escape, last) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
    Ok(got)
}

/// Writes `payload` (escaped for a terminal when `escape`) and a newline;
/// flushes when `flush`.
fn write_line(
    out: &mut impl Write,
    payload: &[u8],
    escape: bool,
    flush: bool,
) -> std::io::Result<()> {
    if escape {
        escape::write_escaped(out, payload)?;
    } else {
        out.write_all(payload)?;
    }
    out.write_all(b"\n")?;
    if flush {
        out.flush()?;
    }
    Ok(())
}

/// Events other than group messages, on stderr.
fn report(event: Event, verbose: bool) {
    match event {
        Event::Disconnected {
            reason,
            unconfirmed,
            ..
        } => {
            eprintln!(
                "msgc: connection lost: {reason} ({unconfirmed} publishes unconfirmed); reconnecting"
            )
        }
        Event::Gap {
            group,
            sender,
            missing,
        } => {
            eprintln!("msgc: {missing} messages from {sender} to {group} lost");
        }
        Event::Reconnected { server, member } => {
            eprintln!("msgc: reconnected to {server} as {member}")
        }
        Event::Denied { message } => eprintln!("msgc: permission denied: {message}"),
        Event::Membership {
            group,
            subject,
            reason,
            size,
        } if verbose => {
            eprintln!("{group}: {subject} {} (size {size})", reason.name());
        }
        Event::Direct { sender, payload } if verbose => {
            // Logged for a person: always escaped.
            let mut text = Vec::with_capacity(payload.len());
            let _ = escape::write_escaped(&mut text, &payload);
            eprintln!("direct from {sender}: {}", String::from_utf8_lossy(&text));
        }
        _ => {}
    }
}

async fn publish(cfg: ClientConfig, group: &str, message: Option<String>) -> Result<ExitCode> {
    let group = group_name(group)?;
    let client = Client::connect(cfg).await?;
    match message {
        Some(message) => client.publish(&group, message).await?,
        None => publish_stdin(&client, &group).await?,
    }
    let report = client.close().await;
    if !report.flushed {
        bail!(
            "not every message was sent: {} not confirmed by the server ({} never written)",
            report.unconfirmed,
            report.unsent
        );
    }
    // A refusal comes before the confirmation of what follows it.
    let denied: Vec<String> = client
        .events()
        .try_iter()
        .filter_map(|e| match e {
            Event::Denied { message } => Some(message),
            _ => None,
        })
        .collect();
    if let Some(first) = denied.first() {
        bail!(
            "permission denied: {first} ({} messages refused)",
            denied.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Publishes each line of stdin (without its `\n` or `\r\n`), batching
/// lines that are already available.
async fn publish_stdin(client: &Client, group: &GroupName) -> Result<()> {
    let lines = stdin_lines();
    let mut batch: Vec<Vec<u8>> = Vec::new();
    while let Ok(first) = lines.recv_async().await {
        batch.clear();
        batch.push(first.context("cannot read standard input")?);
        while batch.len() < 256 {
            match lines.try_recv() {
                Ok(line) => batch.push(line.context("cannot read standard input")?),
                Err(_) => break,
            }
        }
        client.publish_batch(group, &batch).await?;
    }
    Ok(())
}

/// Reads stdin on a thread (tokio's stdin needs a feature we do not use),
/// one line per item; the channel closes at end of input.
fn stdin_lines() -> flume::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = flume::bounded(4096);
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    if tx.send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

async fn members(cfg: ClientConfig, group: &str) -> Result<ExitCode> {
    let group = group_name(group)?;
    let client = Client::connect(cfg).await?;
    let members = client.members(&group).await?;
    let _ = client.close().await;
    let mut out = std::io::stdout().lock();
    for member in members {
        writeln!(out, "{member}").context("cannot write to stdout")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn ping(cfg: ClientConfig) -> Result<ExitCode> {
    let client = Client::connect(cfg).await?;
    let rtt = client.ping().await?;
    let server = client.server();
    let _ = client.close().await;
    println!(
        "pong from {} (node {}) in {:.3} ms",
        server.address,
        server.node,
        rtt.as_secs_f64() * 1000.0
    );
    Ok(ExitCode::SUCCESS)
}

async fn stats(cfg: ClientConfig, full: bool, json: bool) -> Result<ExitCode> {
    let client = Client::connect(cfg).await?;
    let stats = client.stats().await?;
    let _ = client.close().await;
    let text = if json {
        serde_json::to_string_pretty(&stats).context("cannot format the stats")?
    } else if full {
        render(&stats)
    } else {
        summary::node(&stats)
    };
    println!("{}", text.trim_end());
    Ok(ExitCode::SUCCESS)
}

/// Longest wait for one node in `msgc cluster` (connect, then STATS).
const CLUSTER_WAIT: Duration = Duration::from_secs(5);

/// The first server's stats, then every peer's it lists, asked at once.
async fn cluster(cfg: ClientConfig) -> Result<ExitCode> {
    let first = ask_stats(cfg.clone()).await?;
    let peers: Vec<String> = first["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["address"].as_str().map(str::to_owned))
        .collect();
    let asks: Vec<_> = peers
        .iter()
        .map(|address| {
            let mut one = cfg.clone();
            one.servers = vec![address.clone()];
            tokio::spawn(ask_stats(one))
        })
        .collect();
    let mut views = vec![summary::View {
        address: cfg.servers.first().cloned().unwrap_or_default(),
        stats: Ok(first),
    }];
    for (address, ask) in peers.into_iter().zip(asks) {
        let stats = match ask.await {
            Ok(r) => r.map_err(|e| format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        };
        views.push(summary::View { address, stats });
    }
    let (table, healthy) = summary::cluster(&views);
    print!("{table}");
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One node's stats document, within [`CLUSTER_WAIT`].
async fn ask_stats(mut cfg: ClientConfig) -> Result<Value> {
    cfg.connect_timeout = cfg.connect_timeout.min(CLUSTER_WAIT);
    cfg.request_timeout = cfg.request_timeout.min(CLUSTER_WAIT);
    let server = cfg.servers.first().cloned().unwrap_or_default();
    let asked = async {
        let client = Client::connect(cfg).await?;
        let stats = client.stats().await?;
        let _ = client.close().await;
        anyhow::Ok(stats)
    };
    tokio::time::timeout(CLUSTER_WAIT * 2, asked)
        .await
        .map_err(|_| anyhow!("{server}: no answer within {CLUSTER_WAIT:?}"))?
}

// ------------------------------------------------------------ stats table

/// The stats document as indented `key  value` lines; arrays of flat
/// objects (per shard, per peer…) as tables. Generic: whatever keys the
/// server sends are shown.
fn render(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) => render_object(map, 0, &mut out),
        other => out.push_str(&scalar(other)),
    }
    out
}

fn render_object(map: &Map<String, Value>, indent: usize, out: &mut String) {
    let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
    let pad = " ".repeat(indent);
    for (key, value) in map {
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                out.push_str(&format!("{pad}{key}\n"));
                render_object(inner, indent + 2, out);
            }
            Value::Array(items) if is_table(items) => {
                out.push_str(&format!("{pad}{key}\n"));
                render_table(items, indent + 2, out);
            }
            Value::Array(items) if items.iter().any(|v| v.is_object() || v.is_array()) => {
                out.push_str(&format!("{pad}{key}\n"));
                for (i, item) in items.iter().enumerate() {
                    let mut one = Map::new();
                    one.insert(format!("[{i}]"), item.clone());
                    render_object(&one, indent + 2, out);
                }
            }
            other => out.push_str(&format!("{pad}{key:width$}  {}\n", scalar(other))),
        }
    }
}

/// A non-empty array of objects whose values are all scalars.
fn is_table(items: &[Value]) -> bool {
    !items.is_empty()
        && items.iter().all(|item| {
            item.as_object()
                .is_some_and(|m| m.values().all(|v| !v.is_object() && !v.is_array()))
        })
}

/// One cell: its text and whether it is a number (right-aligned).
type Cell = (String, bool);

/// Keys that name an entry (a shard, a peer): shown first, or as labels.
fn is_id(key: &str) -> bool {
    matches!(key, "id" | "shard" | "name" | "node" | "peer")
}

/// Prints flat objects as rows, or, when they have many more fields than
/// there are objects (per-shard counters), as columns.
fn render_table(items: &[Value], indent: usize, out: &mut String) {
    let maps: Vec<&Map<String, Value>> = items.iter().filter_map(Value::as_object).collect();
    let mut columns: Vec<&str> = Vec::new();
    for key in maps.iter().flat_map(|m| m.keys()) {
        if !columns.contains(&key.as_str()) {
            columns.push(key);
        }
    }
    columns.sort_by_key(|c| !is_id(c)); // JSON objects come with sorted keys
    let cell = |m: &Map<String, Value>, c: &str| -> Cell {
        m.get(c)
            .map_or(("-".into(), false), |v| (scalar(v), v.is_number()))
    };
    let grid: Vec<Vec<Cell>> = if columns.len() > 8 && columns.len() > 2 * maps.len() {
        let label = columns.first().copied().filter(|c| is_id(c));
        let mut header = vec![(String::new(), false)];
        header.extend(maps.iter().enumerate().map(|(i, m)| match label {
            Some(c) => (scalar(&m[c]), true),
            None => (format!("[{i}]"), true),
        }));
        let rows = columns.iter().filter(|c| Some(**c) != label).map(|c| {
            let mut row = vec![(c.to_string(), false)];
            row.extend(maps.iter().map(|m| cell(m, c)));
            row
        });
        std::iter::once(header).chain(rows).collect()
    } else {
        let header = columns.iter().map(|c| (c.to_string(), false)).collect();
        let rows = maps
            .iter()
            .map(|m| columns.iter().map(|c| cell(m, c)).collect());
        std::iter::once(header).chain(rows).collect()
    };
    print_grid(&grid, indent, out);
}

fn print_grid(grid: &[Vec<Cell>], indent: usize, out: &mut String) {
    let columns = grid.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            grid.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.0.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let pad = " ".repeat(indent);
    for row in grid {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|((text, numeric), w)| {
                if *numeric {
                    format!("{text:>w$}")
                } else {
                    format!("{text:<w$}")
                }
            })
            .collect();
        out.push_str(&format!("{pad}{}\n", cells.join("  ").trim_end()));
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".to_string(),
        Value::Array(items) => items.iter().map(scalar).collect::<Vec<_>>().join(", "),
        Value::Object(map) if map.is_empty() => "-".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_render_generically() {
        let v: Value = serde_json::json!({
            "node": "n1",
            "totals": {"published": 10, "delivered": 20},
            "drops": {},
            "shards": [{"id": 0, "connections": 3}, {"id": 1, "connections": 12}],
            "peers": ["a", "b"],
        });
        let text = render(&v);
        assert!(text.contains("node    n1"), "{text}");
        assert!(
            text.contains("totals\n  delivered  20\n  published  10"),
            "{text}"
        );
        assert!(text.contains("drops   -"), "{text}");
        assert!(
            text.contains("shards\n  id  connections\n   0            3\n   1           12"),
            "{text}"
        );
        assert!(text.contains("peers   a, b"), "{text}");
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("nan").is_err());
    }
}
