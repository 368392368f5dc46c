//! The command line: scenarios as subcommands, options every scenario
//! shares, and the checks that turn bad input into one-line errors.
//!
//! Owns parsing and validation only; what a scenario does with its options
//! is `scenarios.rs`' business.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use msgc::protocol::Events;
use std::path::PathBuf;
use std::time::Duration;

/// Load generator for msgc: throughput and latency (HdrHistogram) under
/// fan-out, fan-in, many groups, cross-node traffic, backlog pressure and
/// membership churn; what a server's memory costs; and what a storm of
/// joins to one group costs.
#[derive(Parser, Debug)]
#[command(name = "msgc-loadgen", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// What to measure.
#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// P publishers → one group with S subscribers.
    Fanout {
        #[command(flatten)]
        common: Common,
        /// Publisher connections.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Subscriber connections (all in the one group).
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
    },
    /// P publishers → one group with one subscriber.
    Fanin {
        #[command(flatten)]
        common: Common,
        /// Publisher connections.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
    },
    /// G groups with N subscribers each, over C subscriber connections;
    /// publishers cycle over the groups.
    Groups {
        #[command(flatten)]
        common: Common,
        /// Number of groups.
        #[arg(long, default_value_t = 1000)]
        groups: usize,
        /// Subscribers per group.
        #[arg(long, default_value_t = 1)]
        subs_per_group: usize,
        /// Subscriber connections the subscriptions are spread over
        /// (default: one per subscription, at most 1000).
        #[arg(long)]
        sub_conns: Option<usize>,
        /// Publisher connections.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
    },
    /// Publishers on the first server, subscribers spread over the others
    /// (needs at least two servers: --spawn 3 or a --server list).
    Cluster {
        #[command(flatten)]
        common: Common,
        /// Publisher connections (all on the first server).
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Subscriber connections (round-robin over the other servers).
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
    },
    /// Fan-out where K of the S subscribers stall (never read) or read
    /// slowly; a baseline without them runs first.
    Backlog {
        #[command(flatten)]
        common: Common,
        /// Publisher connections.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Subscriber connections, impaired ones included.
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// How many of the subscribers are impaired.
        #[arg(long, default_value_t = 1)]
        stalled: usize,
        /// Impaired subscribers read, sleeping this many µs per message,
        /// instead of not reading at all.
        #[arg(long, value_name = "US")]
        slow_us: Option<u64>,
        /// SO_RCVBUF of the impaired subscribers' sockets (default: the
        /// kernel's).
        #[arg(long, value_name = "BYTES")]
        stalled_rcvbuf: Option<usize>,
        /// Skip the baseline run.
        #[arg(long)]
        no_baseline: bool,
    },
    /// Members joining and leaving one group at --join-rate while traffic
    /// flows to it; measures joins/s and membership-event latency.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Publisher connections.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Stable subscriber connections (the first also watches events).
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Churning member connections (msgc clients).
        #[arg(long, default_value_t = 20)]
        members: usize,
        /// Joins per second, over all churning members.
        #[arg(long, default_value_t = 500.0)]
        join_rate: f64,
        /// How long a member stays before leaving (e.g. 10ms; default 0).
        #[arg(long, value_parser = parse_duration, default_value = "0s")]
        hold: Duration,
    },
    /// What the first server's memory costs, in bytes, from its own
    /// STATS (RSS): per membership, per idle connection, and after a burst
    /// of large messages. Ignores the traffic options (--size, --duration…).
    Memory {
        #[command(flatten)]
        common: Common,
        /// Phase `memberships`: one client joins this many groups, one
        /// JOIN per round trip (0 skips the phase).
        #[arg(long, default_value_t = 100_000)]
        groups: usize,
        /// Phases `idle_connections` and `burst`: this many client
        /// connections (0 skips both).
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Phase `burst`: payload of the one PUBLISH each connection sends
        /// to a group nobody is in (0 skips the phase).
        #[arg(long, value_name = "BYTES", default_value_t = 60_000)]
        burst_size: usize,
    },
    /// N raw client connections join ONE group as fast as they connect and
    /// keep reading: what the membership storm costs the servers (CPU,
    /// frames, stuck kills, links), and whether every member is told
    /// exactly the joins after its own. Ignores the traffic options.
    Storm {
        #[command(flatten)]
        common: Common,
        /// Member connections (round-robin over the servers).
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// What each JOIN asks to be told about the other members: each
        /// (one MEMBERSHIP per change, protocol v1), batched
        /// (MEMBERSHIP_BATCH), none (only its own acknowledgement).
        #[arg(long, value_enum, default_value_t = EventsArg::Batched)]
        events: EventsArg,
        /// Connections being opened at once.
        #[arg(long, value_name = "P", default_value_t = 256)]
        parallel: usize,
        /// Afterwards, one witness per server joins and every member
        /// closes its connection at once (a client host dying): measured
        /// too.
        #[arg(long)]
        leave: bool,
    },
}

/// `--events` of the storm scenario: `JOIN.events` (PROTOCOL.md §8.7).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsArg {
    /// One MEMBERSHIP frame per change (protocol v1).
    Each,
    /// Changes coalesced into MEMBERSHIP_BATCH frames.
    Batched,
    /// Nothing about others: only the member's own acknowledgement.
    #[value(name = "none")]
    Nothing,
}

impl EventsArg {
    /// The protocol's value.
    pub fn events(self) -> Events {
        match self {
            EventsArg::Each => Events::Each,
            EventsArg::Batched => Events::Batched,
            EventsArg::Nothing => Events::None,
        }
    }
}

impl Scenario {
    /// The scenario's name, as in JSON output.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout { .. } => "fanout",
            Scenario::Fanin { .. } => "fanin",
            Scenario::Groups { .. } => "groups",
            Scenario::Cluster { .. } => "cluster",
            Scenario::Backlog { .. } => "backlog",
            Scenario::Churn { .. } => "churn",
            Scenario::Memory { .. } => "memory",
            Scenario::Storm { .. } => "storm",
        }
    }

    /// The options every scenario shares.
    pub fn common(&self) -> &Common {
        match self {
            Scenario::Fanout { common, .. }
            | Scenario::Fanin { common, .. }
            | Scenario::Groups { common, .. }
            | Scenario::Cluster { common, .. }
            | Scenario::Backlog { common, .. }
            | Scenario::Churn { common, .. }
            | Scenario::Memory { common, .. }
            | Scenario::Storm { common, .. } => common,
        }
    }
}

/// Options of every scenario.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Servers to load, HOST:PORT, comma-separated (default 127.0.0.1:4809).
    #[arg(
        long,
        value_name = "HOST:PORT[,…]",
        value_delimiter = ',',
        conflicts_with = "spawn"
    )]
    pub server: Vec<String>,
    /// Start an N-node cluster of msgc-server processes on 127.0.0.1…N
    /// for the run, and stop it afterwards.
    #[arg(long, value_name = "N")]
    pub spawn: Option<usize>,
    /// The msgc-server binary for --spawn (default: next to this one).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Extra msgc_server option for spawned servers, KEY=VALUE
    /// (repeatable), e.g. --set max_backlog=100 --set io_backend=epoll.
    #[arg(long = "set", visible_alias = "server-arg", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Shards of spawned servers (default: theirs, one per CPU).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Payload size in bytes (at least 16: timestamp and sequence number).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Measured time (e.g. 5s, 500ms, 1m).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Traffic before the measured window (not counted).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Open loop: messages per second over all publishers, each stamped
    /// with its intended send time (coordinated omission corrected).
    /// Without it: closed loop, as fast as the window allows.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub rate: Option<f64>,
    /// Open loop: shortest sleep between a publisher's batches (each
    /// batch sends every message due; stamps stay the intended times).
    #[arg(long, value_parser = parse_duration, default_value = "50us")]
    pub tick: Duration,
    /// Closed loop: messages a publisher may have in flight to one
    /// subscriber connection (default: 40% of max_backlog over publishers).
    #[arg(long, value_name = "MSGS")]
    pub window: Option<u64>,
    /// Runtime worker threads for subscribers and clients (default: CPUs).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Subscribers use the msgc client library (events()) instead of the
    /// raw wire reader, to measure the client's own cost.
    #[arg(long)]
    pub sub_client: bool,
    /// One JSON object per invocation on stdout, nothing else there.
    #[arg(long)]
    pub json: bool,
    /// Write the latency distribution (HdrHistogram .hgrm text) to FILE.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,
    /// Write a latency percentile plot (SVG) to FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses `5s`, `500ms`, `250us`, `1m`, `1.5s`; a bare number is seconds.
///
/// # Errors
/// A one-line description of what is wrong.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 5s, 500ms, 1m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use us, ms, s, m)"
            ))
        }
    };
    let secs = v * scale;
    if !secs.is_finite() || secs > 1e7 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One `--set KEY=VALUE`, checked.
#[derive(Debug, Clone)]
pub struct SetOpt {
    pub key: String,
    pub value: String,
}

/// Splits and checks every `--set`.
///
/// # Errors
/// When an entry is not `KEY=VALUE` with a plain option name.
pub fn parse_sets(sets: &[String]) -> Result<Vec<SetOpt>> {
    sets.iter()
        .map(|s| {
            let Some((k, v)) = s.split_once('=') else {
                bail!("--set {s:?}: expected KEY=VALUE, e.g. max_backlog=100");
            };
            let key = k.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("--set {s:?}: {key:?} is not an option name");
            }
            Ok(SetOpt {
                key: key.to_ascii_lowercase(),
                value: v.trim().to_string(),
            })
        })
        .collect()
}

impl Common {
    /// Checks what clap cannot: ranges and combinations.
    ///
    /// # Errors
    /// A one-line description of the first problem.
    pub fn validate(&self) -> Result<()> {
        if self.size < 16 {
            bail!(
                "--size {}: must be at least 16 (timestamp and sequence number)",
                self.size
            );
        }
        if self.size > 64 << 20 {
            bail!("--size {}: at most 64 MiB", self.size);
        }
        if self.duration.is_zero() {
            bail!("--duration must be greater than zero");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                bail!("--rate {r}: must be a positive number of messages per second");
            }
        }
        if let Some(n) = self.spawn {
            if !(1..=64).contains(&n) {
                bail!("--spawn {n}: expected 1 to 64 nodes");
            }
        }
        if let Some(n) = self.shards {
            if !(1..=64).contains(&n) {
                bail!("--shards {n}: expected 1 to 64");
            }
            if self.spawn.is_none() {
                bail!("--shards configures spawned servers: use it with --spawn N");
            }
        }
        if !self.set.is_empty() && self.spawn.is_none() {
            bail!("--set configures spawned servers: use it with --spawn N");
        }
        parse_sets(&self.set)?;
        if self.window == Some(0) {
            bail!("--window must be at least 1");
        }
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        for s in &self.server {
            if !s.contains(':') {
                bail!("--server {s:?}: expected HOST:PORT");
            }
        }
        Ok(())
    }

    /// The value given by `--set KEY=…`, if any.
    pub fn set_value(&self, key: &str) -> Option<String> {
        parse_sets(&self.set)
            .ok()?
            .into_iter()
            .rev()
            .find(|s| s.key == key)
            .map(|s| s.value)
    }

    /// `--set KEY=N` as a number, if given and numeric.
    pub fn set_number(&self, key: &str) -> Result<Option<u64>> {
        self.set_value(key)
            .map(|v| {
                v.parse::<u64>()
                    .with_context(|| format!("--set {key}={v}: expected a number"))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn sets() {
        let s = parse_sets(&["max_backlog=100".into()]).unwrap();
        assert_eq!(
            (s[0].key.as_str(), s[0].value.as_str()),
            ("max_backlog", "100")
        );
        assert!(parse_sets(&["max_backlog".into()]).is_err());
        assert!(parse_sets(&["a b=1".into()]).is_err());
    }
}
