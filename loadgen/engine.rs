//! One measured run: subscribers connect and join, publishers start
//! together at `t0`, warm up, then the measured window; after it, a
//! bounded drain until subscribers have everything (or nothing arrives for
//! a second); then the server counters are compared with the start.
//!
//! Counting: a message belongs to the window when its stamp (send time,
//! or intended send time in open loop) lies in it; `sent` and `delivered`
//! count the same messages, so `delivered <= expected` and equality means
//! nothing was lost.

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};
use msgc::client::{Client, ClientConfig};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::churn::ChurnPlan;
use crate::clock::{new_hist, ns_of};
use crate::observe::{self, Delta, Observer, Snapshot};
use crate::publish::{self, PubResult, PubSpec, Routes};
use crate::spawn;
use crate::sub::{self, Behaviour, Progress, SubCtx, SubResult, SubSpec, Window};

/// Most subscribers connecting and joining at once.
const SETUP_CONCURRENCY: usize = 64;
/// The drain ends when nothing arrived for this long…
const DRAIN_QUIET: Duration = Duration::from_secs(1);
/// …or after this long in any case.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Everything a run needs.
pub struct Plan {
    /// Shown on the progress bar.
    pub label: String,
    pub subs: Vec<SubSpec>,
    pub routes: Routes,
    /// Server address of each publisher.
    pub pub_addrs: Vec<String>,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Open loop: messages per second over all publishers.
    pub rate: Option<f64>,
    pub window: u64,
    /// Open loop: shortest sleep between a publisher's batches.
    pub tick: Duration,
    /// Before starting: (server index, group index, members it must list).
    pub route_checks: Vec<(usize, usize, usize)>,
    pub churn: Option<ChurnPlan>,
    pub progress: bool,
}

/// What a run measured.
pub struct Outcome {
    pub duration: Duration,
    pub sent: u64,
    pub sent_total: u64,
    pub expected: u64,
    pub delivered: u64,
    pub healthy_expected: u64,
    pub healthy_delivered: u64,
    pub impaired_delivered: u64,
    pub healthy_subs: usize,
    pub bytes: u64,
    /// Latency of healthy subscribers (ns).
    pub hist: Histogram<u64>,
    pub out_of_order: u64,
    pub sub_errors: Vec<String>,
    pub drain_complete: bool,
    pub drain_s: f64,
    pub window_waits: u64,
    pub truncated: bool,
    /// Open loop: how late the publishers sent (ns).
    pub lag: Option<Histogram<u64>>,
    pub publisher_cpu_s: f64,
    pub loadgen_cpu_s: Option<f64>,
    /// Busy CPU of the machine not ours nor the spawned servers'.
    pub foreign_cpu_s: Option<f64>,
    pub wall_s: f64,
    pub server: Delta,
    pub rss: Option<u64>,
    pub rss_per_node: Vec<Option<u64>>,
    pub io_backend: Value,
    pub shards: Value,
    pub churn: Option<Value>,
}

/// Runs `plan` against the servers `obs` watches.
///
/// # Errors
/// When subscribers cannot join, a publisher cannot connect or fails, or
/// a server stops answering.
pub async fn run(plan: Plan, obs: &Observer) -> Result<Outcome> {
    let npub = plan.pub_addrs.len();
    let progress: Arc<Vec<Progress>> =
        Arc::new(plan.subs.iter().map(|_| Progress::new(npub)).collect());
    let window = Arc::new(Window::unset());
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = SubCtx {
        progress: progress.clone(),
        window: window.clone(),
        stop: stop_rx,
    };
    let behaviours: Vec<Behaviour> = plan.subs.iter().map(|s| s.behaviour).collect();
    let handles = start_subscribers(&plan.subs, &ctx, &stop_tx).await?;
    for &(server, group, want) in &plan.route_checks {
        let g = &plan.routes.groups[group];
        obs.wait_members(server, g, want, Duration::from_secs(20))
            .await?;
    }
    let clients = connect_publishers(&plan.pub_addrs).await?;
    let churn = match &plan.churn {
        Some(c) => Some(c.prepare().await?),
        None => None,
    };
    let meter = Meter::start(obs).await?;

    let t0 = Instant::now() + Duration::from_millis(20);
    let m0_at = t0 + plan.warmup;
    let end = m0_at + plan.duration;
    window.m0.store(ns_of(m0_at), Relaxed);
    window.m1.store(ns_of(end), Relaxed);
    let sent_counter = Arc::new(AtomicU64::new(0));
    let clock = Clock { t0, m0_at, end };
    let threads = spawn_publishers(&plan, &clients, &progress, &sent_counter, &clock)?;
    let churn_run = churn.map(|c| c.start(t0, m0_at, end));
    let bar = plan
        .progress
        .then(|| progress_bar(&plan.label, t0, end, progress.clone(), sent_counter.clone()));
    let pubs = join_publishers(threads).await?;
    let churn_json = match churn_run {
        Some(c) => Some(c.finish().await),
        None => None,
    };
    if let Some(e) = pubs.iter().find_map(|p| p.error.clone()) {
        let _ = stop_tx.send(true);
        bail!("publisher failed: {e}");
    }
    let drain_t = Instant::now();
    let drain_complete = drain(&pubs, &progress, &behaviours).await;
    let drain_s = drain_t.elapsed().as_secs_f64();
    if let Some(b) = bar {
        b.abort();
        let _ = b.await;
    }
    // Measured before the subscribers leave: their disconnect events,
    // queued to members that are closing too, would count as drops.
    let metered = meter.finish(obs).await;
    let _ = stop_tx.send(true);
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await?);
    }
    for c in &clients {
        let _ = c.close().await;
    }
    let mut out = summarize(&pubs, &results, plan.duration);
    out.drain_complete = drain_complete;
    out.drain_s = drain_s;
    out.churn = churn_json;
    metered?.fill(obs, &mut out);
    Ok(out)
}

/// The run's instants: publishers start at `t0`, measure from `m0_at`,
/// stop at `end`.
struct Clock {
    t0: Instant,
    m0_at: Instant,
    end: Instant,
}

async fn connect_publishers(addrs: &[String]) -> Result<Vec<Client>> {
    let mut clients = Vec::new();
    for a in addrs {
        let c = Client::connect(ClientConfig::with_servers([a.clone()]))
            .await
            .map_err(|e| anyhow::anyhow!("publisher cannot connect to {a}: {e}"))?;
        clients.push(c);
    }
    Ok(clients)
}

fn spawn_publishers(
    plan: &Plan,
    clients: &[Client],
    progress: &Arc<Vec<Progress>>,
    sent_counter: &Arc<AtomicU64>,
    clock: &Clock,
) -> Result<Vec<std::thread::JoinHandle<PubResult>>> {
    let npub = clients.len();
    let routes = Arc::new(plan.routes.clone());
    let mut threads = Vec::new();
    for (idx, client) in clients.iter().enumerate() {
        let spec = PubSpec {
            idx,
            client: client.clone(),
            routes: routes.clone(),
            progress: progress.clone(),
            size: plan.size,
            rate: plan.rate.map(|r| r / npub as f64),
            phase: idx as f64 / npub as f64,
            tick: plan.tick,
            window: plan.window,
            t0: clock.t0,
            m0: ns_of(clock.m0_at),
            m1: ns_of(clock.end),
            end: clock.end,
            handle: tokio::runtime::Handle::current(),
            sent_counter: sent_counter.clone(),
        };
        threads.push(publish::spawn(spec)?);
    }
    Ok(threads)
}

async fn join_publishers(
    threads: Vec<std::thread::JoinHandle<PubResult>>,
) -> Result<Vec<PubResult>> {
    let pubs = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| PubResult {
                    error: Some("publisher thread panicked".into()),
                    ..PubResult::default()
                })
            })
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(pubs)
}

/// Server counters and CPU time at the start of a run.
struct Meter {
    before: Snapshot,
    cpu0: Option<f64>,
    busy0: Option<f64>,
    wall0: Instant,
}

/// …and what changed by its end.
struct Metered {
    before: Snapshot,
    after: Snapshot,
    loadgen_cpu_s: Option<f64>,
    busy_s: Option<f64>,
    wall_s: f64,
}

impl Meter {
    async fn start(obs: &Observer) -> Result<Meter> {
        Ok(Meter {
            before: obs.snapshot().await?,
            cpu0: spawn::cpu_secs("self"),
            busy0: spawn::machine_busy_secs(),
            wall0: Instant::now(),
        })
    }

    async fn finish(self, obs: &Observer) -> Result<Metered> {
        let after = obs.snapshot().await?;
        let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        Ok(Metered {
            before: self.before,
            after,
            loadgen_cpu_s: diff(self.cpu0, spawn::cpu_secs("self")),
            busy_s: diff(self.busy0, spawn::machine_busy_secs()),
            wall_s: self.wall0.elapsed().as_secs_f64(),
        })
    }
}

impl Metered {
    fn fill(self, obs: &Observer, out: &mut Outcome) {
        out.server = observe::delta(&self.before, &self.after);
        out.loadgen_cpu_s = self.loadgen_cpu_s;
        out.wall_s = self.wall_s;
        // CPU used on this machine by anything else meanwhile: noise to know of.
        out.foreign_cpu_s = match (self.busy_s, self.loadgen_cpu_s) {
            (Some(busy), Some(l)) => Some((busy - l - out.server.cpu_s.unwrap_or(0.0)).max(0.0)),
            _ => None,
        };
        out.rss = obs.peak_rss(&self.after);
        out.rss_per_node = obs.peak_rss_per_node();
        (out.io_backend, out.shards) = obs.backend(&self.after);
    }
}

type SubHandle = tokio::task::JoinHandle<SubResult>;

/// Starts every subscriber and waits until each has joined.
async fn start_subscribers(
    subs: &[SubSpec],
    ctx: &SubCtx,
    stop: &watch::Sender<bool>,
) -> Result<Vec<SubHandle>> {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(subs.len().max(1));
    let sem = Arc::new(tokio::sync::Semaphore::new(SETUP_CONCURRENCY));
    let mut handles = Vec::new();
    for (i, spec) in subs.iter().enumerate() {
        let (spec, ctx, ready, sem) = (spec.clone(), ctx.clone(), ready_tx.clone(), sem.clone());
        handles.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let fwd = async {
                let r = rx.recv().await;
                drop(permit);
                if let Some(r) = r {
                    let _ = ready.send(r).await;
                }
            };
            let (res, ()) = tokio::join!(sub::run(i, spec, ctx, tx), fwd);
            res
        }));
    }
    drop(ready_tx);
    for _ in 0..subs.len() {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                let _ = stop.send(true);
                bail!("subscriber setup failed: {e:#}");
            }
            None => {
                let _ = stop.send(true);
                bail!("a subscriber ended during setup");
            }
        }
    }
    Ok(handles)
}

/// Waits until healthy subscribers hold everything published to them, or
/// nothing arrives for [`DRAIN_QUIET`]. Returns whether they got it all.
async fn drain(pubs: &[PubResult], progress: &[Progress], behaviours: &[Behaviour]) -> bool {
    let healthy: Vec<usize> = (0..behaviours.len())
        .filter(|&c| behaviours[c] == Behaviour::Healthy)
        .collect();
    let want: u64 = healthy
        .iter()
        .map(|&c| {
            pubs.iter()
                .map(|p| p.expected_conn.get(c).copied().unwrap_or(0))
                .sum::<u64>()
        })
        .sum();
    let start = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    loop {
        let got: u64 = healthy
            .iter()
            .map(|&c| progress[c].total.load(Relaxed))
            .sum();
        if got >= want {
            return true;
        }
        if got != last.0 {
            last = (got, Instant::now());
        }
        if last.1.elapsed() >= DRAIN_QUIET || start.elapsed() >= DRAIN_LIMIT {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Adds up publishers and subscribers.
fn summarize(pubs: &[PubResult], subs: &[SubResult], duration: Duration) -> Outcome {
    let mut o = Outcome {
        duration,
        sent: pubs.iter().map(|p| p.sent).sum(),
        sent_total: pubs.iter().map(|p| p.sent_total).sum(),
        expected: pubs.iter().map(|p| p.expected).sum(),
        delivered: 0,
        healthy_expected: pubs.iter().map(|p| p.healthy_expected).sum(),
        healthy_delivered: 0,
        impaired_delivered: 0,
        healthy_subs: 0,
        bytes: 0,
        hist: new_hist(),
        out_of_order: 0,
        sub_errors: Vec::new(),
        drain_complete: false,
        drain_s: 0.0,
        window_waits: pubs.iter().map(|p| p.window_waits).sum(),
        truncated: pubs.iter().any(|p| p.truncated),
        lag: None,
        publisher_cpu_s: pubs.iter().map(|p| p.cpu_s).sum(),
        loadgen_cpu_s: None,
        foreign_cpu_s: None,
        wall_s: 0.0,
        server: Delta::default(),
        rss: None,
        rss_per_node: Vec::new(),
        io_backend: Value::Null,
        shards: Value::Null,
        churn: None,
    };
    for p in pubs {
        if let Some(h) = &p.lag {
            let lag = o.lag.get_or_insert_with(new_hist);
            let _ = lag.add(h);
        }
    }
    for s in subs {
        o.delivered += s.delivered;
        o.out_of_order += s.out_of_order;
        if s.behaviour == Behaviour::Healthy {
            o.healthy_subs += 1;
            o.healthy_delivered += s.delivered;
            o.bytes += s.bytes;
            let _ = o.hist.add(&s.hist);
            if let Some(e) = &s.error {
                o.sub_errors.push(e.clone());
            }
        } else {
            o.impaired_delivered += s.delivered;
        }
    }
    o
}

/// A progress bar over the run (stderr), updated every 200 ms.
fn progress_bar(
    label: &str,
    t0: Instant,
    end: Instant,
    progress: Arc<Vec<Progress>>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let total_ms = end.saturating_duration_since(t0).as_millis() as u64;
    let pb = ProgressBar::with_draw_target(Some(total_ms), ProgressDrawTarget::stderr())
        .with_finish(ProgressFinish::AndClear);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>3} / {len}ms  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    tokio::spawn(async move {
        let mut last = (0u64, 0u64, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = Instant::now();
            let got: u64 = progress.iter().map(|p| p.total.load(Relaxed)).sum();
            let s = sent.load(Relaxed);
            let dt = now.duration_since(last.2).as_secs_f64().max(1e-3);
            pb.set_position(
                now.saturating_duration_since(t0)
                    .as_millis()
                    .min(total_ms as u128) as u64,
            );
            pb.set_message(format!(
                "sent {:.0}/s  delivered {:.0}/s",
                (s - last.0) as f64 / dt,
                (got - last.1) as f64 / dt
            ));
            last = (s, got, now);
            if now >= end {
                pb.finish_and_clear();
                return;
            }
        }
    })
}
