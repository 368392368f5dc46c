//! The `storm` scenario: N raw client connections join ONE group as fast
//! as they can connect (at most `--parallel` opening at once, round-robin
//! over the servers), each asking for the chosen events about the others
//! (`JOIN.events`: each, batched, none; PROTOCOL.md §8.7, §10), and every
//! member keeps reading. What the membership storm cost the servers: wall
//! time, CPU seconds (spawned servers), MEMBERSHIP and MEMBERSHIP_BATCH
//! frames, stuck kills, peer links (STATS deltas); and whether each member
//! was told exactly the joins after its own (N − s, s the size in its
//! acknowledgement), as the server promises.
//!
//! With `--leave`, one witness per server then joins the group, and every
//! storm member closes its connection at once (a client host dying): the
//! same figures again, and whether each witness was told of every one of
//! the N departures exactly once.
//!
//! Owns the phases and their JSON; `storm_member` the connections and
//! their tallies; `report` prints the table.

use anyhow::{bail, Result};
use msgc::protocol::{Events, GroupName};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::Common;
use crate::clock::ns_of;
use crate::observe::Observer;
use crate::scenarios::{group_names, Report, Target};
use crate::spawn;
use crate::storm_member::{Crowd, Goal, Verdict};

/// Members are done or stuck: the wait ends when nothing has moved (no
/// frame read, no member done or failed) for this long…
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// …or after this long in all, whatever moves.
const PHASE_LIMIT: Duration = Duration::from_secs(30 * 60);
/// How often members' tallies are looked at.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How often servers are asked for their connection counts (leave phase).
const STATS_EVERY: Duration = Duration::from_millis(50);
/// After everyone is done, how long changes told twice have to show up.
const SETTLE: Duration = Duration::from_millis(500);
/// Progress lines on stderr this often (unless --json or --quiet).
const SAY_EVERY: Duration = Duration::from_secs(2);
/// How long member tasks may take to end once told to.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// Errors of members shown in the report.
const SHOW_ERRORS: usize = 3;

/// The options of a storm (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Member connections.
    pub clients: usize,
    /// What each member's JOIN asks to be told about the others.
    pub events: Events,
    /// Connections being opened at once.
    pub parallel: usize,
    /// Close every member at once afterwards, and measure that too.
    pub leave: bool,
}

/// The name of an events mode, as on the command line.
pub fn events_name(e: Events) -> &'static str {
    match e {
        Events::Each => "each",
        Events::Batched => "batched",
        Events::None => "none",
    }
}

/// Checks the scenario's options before anything is started.
///
/// # Errors
/// A one-line description of the first problem.
pub fn validate(c: &Common, o: &Options) -> Result<()> {
    if o.clients == 0 {
        bail!("--clients 0: nobody to storm with");
    }
    if u32::try_from(o.clients).is_err() {
        bail!("--clients {}: at most {}", o.clients, u32::MAX);
    }
    if o.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if c.hgrm.is_some() || c.plot.is_some() {
        bail!("--hgrm and --plot write latencies: the storm scenario measures none");
    }
    Ok(())
}

/// Runs the storm (and with `--leave` the leave phase) and reports them.
///
/// # Errors
/// When a server does not answer, or a member cannot connect and join.
pub async fn run(c: &Common, t: &Target, o: &Options) -> Result<Report> {
    let quiet = c.json || c.quiet;
    let say = |msg: &str| {
        if !quiet {
            eprintln!("storm: {msg}");
        }
    };
    let group = group_names(1).remove(0);
    let first = Reading::take(&t.obs).await?;
    say(&format!(
        "{} clients joining {group} over {} server(s), events {}, {} opening at once…",
        o.clients,
        t.servers.len(),
        events_name(o.events),
        o.parallel
    ));
    let (stop, stop_rx) = watch::channel(false);
    let crowd = Crowd::new(group.clone(), o.events, o.clients, o.parallel);
    let started = ns_of(Instant::now());
    let members = crowd.spawn(&t.servers, &stop_rx);
    let goal = Goal {
        final_size: o.clients as u32,
        departures: None,
        told: o.events != Events::None,
    };
    let result = join_phase(t, &crowd, &goal, &first, started, quiet).await;
    let join = match result {
        Ok(j) => j,
        Err(e) => {
            drop(stop);
            finish(members).await;
            return Err(e);
        }
    };
    let leave = if o.leave {
        say("every member closes at once…");
        leave_phase(t, o, &group, &crowd, stop, quiet).await?
    } else {
        let _ = stop.send(true);
        Value::Null
    };
    finish(members).await;
    let json = json!({
        "scenario": "storm",
        "parameters": params(c, t, o),
        "io_backend": first.stats[0]["io_backend"],
        "shards": first.stats[0]["shards"],
        "join": join,
        "leave": leave,
    });
    Ok(Report {
        json,
        hists: Vec::new(),
    })
}

fn params(c: &Common, t: &Target, o: &Options) -> Value {
    json!({
        "clients": o.clients,
        "events": events_name(o.events),
        "parallel": o.parallel,
        "leave": o.leave,
        "servers": t.servers,
        "spawned": t.spawned,
        "set": c.set,
        "stall_limit_s": STALL_LIMIT.as_secs_f64(),
        "settle_s": SETTLE.as_secs_f64(),
    })
}

/// Waits (bounded) for member tasks that were told to end.
async fn finish(tasks: Vec<JoinHandle<()>>) {
    let _ = tokio::time::timeout(STOP_LIMIT, async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
}

/// The join storm, from the first connect to the last member told of
/// every join it is owed; then its figures.
async fn join_phase(
    t: &Target,
    crowd: &Crowd,
    goal: &Goal,
    before: &Reading,
    started: u64,
    quiet: bool,
) -> Result<Value> {
    let census = wait_crowd(crowd, goal, quiet, None).await?;
    let after = Reading::take(&t.obs).await?;
    tokio::time::sleep(SETTLE).await;
    let settled = Census::take(crowd, goal);
    let mut j = settled.json(goal, started);
    j.insert("complete".into(), json!(census.done == census.members));
    j.insert("server".into(), server_json(before, &after));
    j.insert("loadgen_cpu_s".into(), json!(after.loadgen_cpu(before)));
    Ok(Value::Object(j))
}

/// The leave phase: one witness per server joins; then every storm member
/// closes at once. Done when the witnesses have been told of every
/// departure and the servers have closed every member connection.
async fn leave_phase(
    t: &Target,
    o: &Options,
    group: &GroupName,
    crowd: &Crowd,
    stop: watch::Sender<bool>,
    quiet: bool,
) -> Result<Value> {
    let k = t.servers.len();
    let alive = crowd.alive();
    let (wstop, wstop_rx) = watch::channel(false);
    let witnesses = Crowd::new(group.clone(), o.events, k, k);
    let wtasks = witnesses.spawn(&t.servers, &wstop_rx);
    let mut goal = Goal {
        final_size: u32::try_from(alive + k).unwrap_or(u32::MAX),
        departures: Some(0),
        told: o.events != Events::None,
    };
    let joined = wait_crowd(&witnesses, &goal, true, None).await;
    let value = match joined {
        Ok(_) => {
            goal.departures = Some(alive as u64);
            close_members(t, crowd, &witnesses, &goal, stop, quiet).await
        }
        Err(e) => Err(e),
    };
    drop(wstop);
    finish(wtasks).await;
    value
}

/// Closes every storm member at once and waits until the witnesses have
/// heard and the servers have let go; the figures.
async fn close_members(
    t: &Target,
    crowd: &Crowd,
    witnesses: &Arc<Crowd>,
    goal: &Goal,
    stop: watch::Sender<bool>,
    quiet: bool,
) -> Result<Value> {
    let before = Reading::take(&t.obs).await?;
    let targets = connection_targets(&before, crowd, t.servers.len());
    let mut closing = Closing {
        obs: &t.obs,
        targets,
        closed_ns: None,
    };
    let started = ns_of(Instant::now());
    let _ = stop.send(true);
    let census = wait_crowd(witnesses, goal, quiet, Some(&mut closing)).await?;
    let closed_ns = closing.closed_ns;
    let after = Reading::take(&t.obs).await?;
    tokio::time::sleep(SETTLE).await;
    let settled = Census::take(witnesses, goal);
    let mut j = settled.json(goal, started);
    let secs = |ns: u64| round2(ns.saturating_sub(started) as f64 / 1e9);
    let told_s = j.remove("wall_s").unwrap_or(Value::Null);
    // The witnesses joined before this phase: their acknowledgements are
    // not its figures.
    j.remove("acked_s");
    j.remove("joins_per_sec");
    j.insert("mode".into(), json!("close"));
    j.insert("members_closed".into(), json!(goal.departures));
    j.insert("witnesses".into(), json!(witnesses.slots.len()));
    j.insert("told_s".into(), told_s);
    j.insert("closed_s".into(), json!(closed_ns.map(secs)));
    let wall = closed_ns.map(|c| c.max(census.last_ns));
    j.insert("wall_s".into(), json!(wall.map(secs)));
    j.insert(
        "complete".into(),
        json!(census.done == census.members && closed_ns.is_some()),
    );
    j.insert("server".into(), server_json(&before, &after));
    j.insert("loadgen_cpu_s".into(), json!(after.loadgen_cpu(&before)));
    Ok(Value::Object(j))
}

/// Each server's open connections once the storm members on it are gone.
fn connection_targets(r: &Reading, crowd: &Crowd, k: usize) -> Vec<u64> {
    let mut alive = vec![0u64; k];
    for (i, s) in crowd.slots.iter().enumerate() {
        if !s.failed() {
            alive[i % k] += 1;
        }
    }
    r.stats
        .iter()
        .zip(alive)
        .map(|(s, a)| num(&s["totals"]["connections"]).saturating_sub(a))
        .collect()
}

/// The servers letting go of closed members: done when every server
/// counts at most its target of open connections.
struct Closing<'a> {
    obs: &'a Observer,
    /// Per server, in order.
    targets: Vec<u64>,
    /// When they all got there, ns since the epoch.
    closed_ns: Option<u64>,
}

impl Closing<'_> {
    /// True once every server has got there (asks at most every
    /// [`STATS_EVERY`]).
    async fn done(&mut self) -> Result<bool> {
        if self.closed_ns.is_some() {
            return Ok(true);
        }
        for (i, &want) in self.targets.iter().enumerate() {
            if num(&self.obs.stats(i).await?["totals"]["connections"]) > want {
                tokio::time::sleep(STATS_EVERY).await;
                return Ok(false);
            }
        }
        self.closed_ns = Some(ns_of(Instant::now()));
        Ok(true)
    }
}

/// Waits until every member of `crowd` is done (its goal reached) or has
/// failed, and the servers have let go of closed members (`closing`, if
/// given); or until nothing moves for [`STALL_LIMIT`], or [`PHASE_LIMIT`]
/// in all. The census then.
///
/// # Errors
/// When a member could not even join, or a server does not answer.
async fn wait_crowd(
    crowd: &Crowd,
    goal: &Goal,
    quiet: bool,
    mut closing: Option<&mut Closing<'_>>,
) -> Result<Census> {
    let begin = Instant::now();
    let (mut mark, mut moved) = (None, Instant::now());
    let mut next_say = begin + SAY_EVERY;
    loop {
        if let Some(e) = crowd.open_error() {
            bail!("{e}");
        }
        let c = Census::take(crowd, goal);
        let closed = match closing.as_deref_mut() {
            Some(cl) => cl.done().await?,
            None => true,
        };
        if (c.finished >= c.members && closed)
            || moved.elapsed() > STALL_LIMIT
            || begin.elapsed() > PHASE_LIMIT
        {
            return Ok(c);
        }
        let now_mark = (c.frames, c.done, c.failed, c.acked, closed);
        if mark != Some(now_mark) {
            (mark, moved) = (Some(now_mark), Instant::now());
        }
        if !quiet && Instant::now() >= next_say {
            next_say += SAY_EVERY;
            eprintln!(
                "storm: {:.0} s: {}/{} acknowledged, {} done, {} failed, {} frames read",
                begin.elapsed().as_secs_f64(),
                c.acked,
                c.members,
                c.done,
                c.failed,
                c.frames
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

impl Crowd {
    /// Members whose connection has not failed.
    fn alive(&self) -> usize {
        self.slots.iter().filter(|s| !s.failed()).count()
    }
}

/// What the members of a crowd have been told, summed.
#[derive(Debug, Default)]
struct Census {
    members: usize,
    acked: usize,
    /// Members whose goal is reached (told at least what they are owed).
    done: usize,
    failed: usize,
    /// Members done or failed.
    finished: usize,
    frames: u64,
    over: usize,
    under: usize,
    unacked: usize,
    joins: u64,
    owed_joins: u64,
    departures: u64,
    before_ack: u64,
    own_extra: u64,
    /// Latest acknowledgement and latest change read, ns since the epoch.
    last_ack_ns: u64,
    last_ns: u64,
    errors: Vec<String>,
}

impl Census {
    fn take(crowd: &Crowd, goal: &Goal) -> Census {
        let mut c = Census {
            members: crowd.slots.len(),
            frames: crowd.frames.load(std::sync::atomic::Ordering::Relaxed),
            ..Census::default()
        };
        for s in crowd.slots.iter() {
            let t = s.load();
            c.failed += usize::from(s.failed());
            c.joins += t.joins;
            c.departures += t.departures;
            c.before_ack += t.before_ack;
            c.own_extra += t.own_extra;
            c.last_ns = c.last_ns.max(t.last_ns);
            c.last_ack_ns = c.last_ack_ns.max(t.acked_ns);
            match goal.verdict(&t) {
                Verdict::Unacknowledged => c.unacked += 1,
                Verdict::Under => c.under += 1,
                Verdict::Over => c.over += 1,
                Verdict::Exact => {}
            }
            if t.own_size > 0 {
                c.acked += 1;
                c.owed_joins += goal.owed_joins(t.own_size);
                let done = t.joins >= goal.owed_joins(t.own_size)
                    && t.departures >= goal.owed_departures();
                c.done += usize::from(done);
                c.finished += usize::from(done || s.failed());
            } else {
                c.finished += usize::from(s.failed());
            }
        }
        if c.failed > 0 {
            c.errors = crowd.errors();
        }
        c
    }

    /// Members told the wrong number of changes (or never acknowledged).
    fn mismatches(&self) -> usize {
        self.over + self.under + self.unacked
    }

    /// The members' side of a phase that began at `started` (ns).
    fn json(&self, goal: &Goal, started: u64) -> Map<String, Value> {
        let secs = |ns: u64| round2(ns.saturating_sub(started) as f64 / 1e9);
        let acked_s = secs(self.last_ack_ns);
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("members", json!(self.members));
        put("wall_s", json!(secs(self.last_ns)));
        put("acked_s", json!(acked_s));
        put(
            "joins_per_sec",
            json!(round2(self.acked as f64 / acked_s.max(1e-3))),
        );
        put("acknowledged", json!(self.acked));
        put("done", json!(self.done));
        put("failed", json!(self.failed));
        put("mismatches", json!(self.mismatches()));
        put("over", json!(self.over));
        put("under", json!(self.under));
        put("unacknowledged", json!(self.unacked));
        put("joins_told", json!(self.joins));
        put("joins_owed", json!(self.owed_joins));
        put("departures_told", json!(self.departures));
        put(
            "departures_owed_each",
            json!(goal.departures.map(|_| goal.owed_departures())),
        );
        put("told_before_ack", json!(self.before_ack));
        put("own_extra_events", json!(self.own_extra));
        put("frames_read", json!(self.frames));
        let shown: Vec<&String> = self.errors.iter().take(SHOW_ERRORS).collect();
        put("errors", json!(shown));
        m
    }
}

/// Every server's STATS and CPU time at one moment, and ours.
struct Reading {
    stats: Vec<Value>,
    /// CPU seconds of each spawned server (empty when not spawned).
    cpu: Vec<Option<f64>>,
    loadgen_cpu: Option<f64>,
}

impl Reading {
    async fn take(obs: &Observer) -> Result<Reading> {
        let mut stats = Vec::with_capacity(obs.addrs.len());
        for i in 0..obs.addrs.len() {
            stats.push(obs.stats(i).await?);
        }
        let cpu = obs
            .pids
            .iter()
            .map(|p| spawn::cpu_secs(&p.to_string()))
            .collect();
        Ok(Reading {
            stats,
            cpu,
            loadgen_cpu: spawn::cpu_secs("self"),
        })
    }

    /// This process's CPU seconds since `before`.
    fn loadgen_cpu(&self, before: &Reading) -> Option<f64> {
        Some(round2(self.loadgen_cpu? - before.loadgen_cpu?))
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What one server did between two readings.
fn node_json(b: &Value, a: &Value, cpu: Option<f64>) -> Value {
    let diff = |path: &[&str]| {
        let get = |v: &Value| num(path.iter().fold(v, |v, k| &v[*k]));
        get(a).saturating_sub(get(b))
    };
    let peers = a["peers"].as_array().cloned().unwrap_or_default();
    let before_peers = b["peers"].as_array().cloned().unwrap_or_default();
    let reconnects: u64 = peers
        .iter()
        .map(|p| {
            let was = before_peers
                .iter()
                .find(|q| q["name"] == p["name"])
                .map_or(0, |q| num(&q["reconnects"]));
            num(&p["reconnects"]).saturating_sub(was)
        })
        .sum();
    json!({
        "node": a["node"],
        "cpu_s": cpu.map(round2),
        "membership_frames": diff(&["totals", "membership_frames"]),
        "membership_batches": diff(&["totals", "membership_batches"]),
        "stuck_kills": diff(&["totals", "stuck_kills"]),
        "drops": diff(&["dropped"]),
        "slow_readers": diff(&["totals", "slow_readers"]),
        "producer_waits": diff(&["totals", "producer_waits"]),
        "links": peers.len(),
        "links_up": peers.iter().filter(|p| p["state"] == "up").count(),
        "reconnects": reconnects,
    })
}

/// What the servers did between two readings: per node and summed. CPU
/// seconds only for spawned servers (null otherwise).
fn server_json(before: &Reading, after: &Reading) -> Value {
    let nodes: Vec<Value> = before
        .stats
        .iter()
        .zip(&after.stats)
        .enumerate()
        .map(|(i, (b, a))| {
            let cpu = match (before.cpu.get(i), after.cpu.get(i)) {
                (Some(Some(b)), Some(Some(a))) => Some(a - b),
                _ => None,
            };
            node_json(b, a, cpu)
        })
        .collect();
    let sum = |k: &str| nodes.iter().map(|n| num(&n[k])).sum::<u64>();
    let cpu: Option<f64> = nodes.iter().map(|n| n["cpu_s"].as_f64()).sum();
    let (frames, batches) = (sum("membership_frames"), sum("membership_batches"));
    json!({
        "cpu_s": cpu.map(round2),
        "membership_frames": frames,
        "membership_batches": batches,
        "frames": frames + batches,
        "stuck_kills": sum("stuck_kills"),
        "drops": sum("drops"),
        "slow_readers": sum("slow_readers"),
        "producer_waits": sum("producer_waits"),
        "links": sum("links"),
        "links_up": sum("links_up"),
        "reconnects": sum("reconnects"),
        "per_node": nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_deltas_per_node_and_summed() {
        let b = json!({"node": "node1", "dropped": 1,
            "totals": {"membership_frames": 10, "membership_batches": 5, "stuck_kills": 0},
            "peers": [{"name": "node2", "state": "up", "reconnects": 2}]});
        let a = json!({"node": "node1", "dropped": 1,
            "totals": {"membership_frames": 110, "membership_batches": 25, "stuck_kills": 0},
            "peers": [{"name": "node2", "state": "up", "reconnects": 2}]});
        let r = |s: &Value, cpu| Reading {
            stats: vec![s.clone()],
            cpu: vec![Some(cpu)],
            loadgen_cpu: None,
        };
        let j = server_json(&r(&b, 1.0), &r(&a, 3.5));
        assert_eq!(j["frames"], 120);
        assert_eq!(j["membership_batches"], 20);
        assert_eq!(
            (j["links"].as_u64(), j["links_up"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(j["reconnects"], 0);
        assert_eq!(j["cpu_s"], 2.5);
        let given = Reading {
            cpu: Vec::new(),
            ..r(&a, 0.0)
        };
        assert!(server_json(&given, &given)["cpu_s"].is_null());
    }
}
