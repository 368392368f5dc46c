//! `msgc-loadgen`: drives msgc servers with publishers and subscribers and
//! reports throughput and latency (HdrHistogram), as a table, JSON, an
//! `.hgrm` distribution and an SVG plot.
//!
//! Layout: `cli` (options) → `scenarios` (plans) → `engine` (one run:
//! `sub` subscribers, `publish` publishers, `churn` members) → `report`.
//! `memory` measures what a server's memory costs, phase by phase;
//! `storm` what a storm of joins to one group costs (`storm_member`: its
//! members).
//! `spawn` starts throw-away servers; `observe` reads their counters;
//! `wire` is the raw protocol reader; `clock` the shared time base.

mod churn;
mod cli;
mod clock;
mod engine;
mod memory;
mod observe;
mod publish;
mod report;
mod scenarios;
mod spawn;
mod storm;
mod storm_member;
mod sub;
mod watch_events;
mod wire;

use anyhow::{Context, Result};
use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

use cli::{parse_sets, Cli};
use spawn::{Cluster, SpawnSpec};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line: clap's first, without the usage and help hints.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("msgc-loadgen: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msgc-loadgen: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let common = cli.scenario.common();
    common.validate()?;
    scenarios::validate(&cli.scenario)?;
    clock::epoch();
    let sets = parse_sets(&common.set)?;
    // Before --spawn: a spawned server inherits the raised limit.
    match &cli.scenario {
        cli::Scenario::Memory { conns, .. } if *conns > 0 => {
            memory::raise_fd_limit("conns", *conns, 0)?;
        }
        cli::Scenario::Storm { clients, .. } => {
            // The members, and with --leave one witness per server.
            let servers = common.spawn.unwrap_or(common.server.len().max(1));
            memory::raise_fd_limit("clients", *clients, servers)?;
        }
        _ => {}
    }
    // Spawned from the main thread, which lives as long as the process
    // (the children's PR_SET_PDEATHSIG follows the spawning thread).
    let mut cluster = match common.spawn {
        Some(n) => Some(Cluster::start(&SpawnSpec {
            nodes: n,
            bin: common.server_bin.as_deref(),
            shards: common.shards,
            sets: &sets,
        })?),
        None => None,
    };
    let servers = match &cluster {
        Some(c) => c.addrs(),
        None if common.server.is_empty() => vec!["127.0.0.1:4809".to_string()],
        None => common.server.clone(),
    };
    let pids = cluster.as_ref().map(Cluster::pids).unwrap_or_default();
    let threads = common
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let result = rt.block_on(async {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                spawn::kill_registered();
                eprintln!("msgc-loadgen: interrupted");
                std::process::exit(130);
            }
        });
        let obs = observe::Observer::connect(servers.clone(), pids).await?;
        // A mesh matters to the cluster scenario and to spawned clusters;
        // a --server list for another scenario may be unrelated servers.
        let cluster_run = matches!(cli.scenario, cli::Scenario::Cluster { .. });
        if servers.len() > 1 && (cluster_run || common.spawn.is_some()) {
            obs.wait_mesh(Duration::from_secs(30)).await?;
        }
        let target = scenarios::Target {
            servers,
            spawned: common.spawn,
            obs,
        };
        let report = scenarios::run(&cli.scenario, &target).await;
        target.obs.close().await;
        report
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let logs = cluster.as_mut().map(|c| c.describe_failure());
            return Err(match logs {
                Some(l) => e.context(format!("server logs: {l}")),
                None => e,
            });
        }
    };
    if let Some(c) = cluster.as_mut() {
        c.stop();
    }
    output(common, &report)
}

fn output(common: &cli::Common, report: &scenarios::Report) -> Result<()> {
    if common.json {
        println!("{}", serde_json::to_string(&report.json)?);
    } else {
        report::print_table(&report.json);
    }
    if let (Some(path), Some((_, h))) = (&common.hgrm, report.hists.first()) {
        report::write_hgrm(path, h)?;
    }
    if let Some(path) = &common.plot {
        let title = format!(
            "msgc-loadgen {}: latency by percentile",
            report.json["scenario"].as_str().unwrap_or("")
        );
        let series: Vec<(String, &hdrhistogram::Histogram<u64>)> =
            report.hists.iter().map(|(n, h)| (n.clone(), h)).collect();
        report::write_plot(path, &title, &series)?;
    }
    Ok(())
}
