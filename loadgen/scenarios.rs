//! The scenarios: each turns its options into one or more [`Plan`]s
//! (who subscribes where to what, who publishes where), runs them and
//! adds its own figures to the report.

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use msgc::protocol::GroupName;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::churn::ChurnPlan;
use crate::cli::{Common, EventsArg, Scenario};
use crate::engine::{self, Outcome, Plan};
use crate::memory;
use crate::observe::Observer;
use crate::publish::Routes;
use crate::report::{lat_json, run_json};
use crate::storm;
use crate::sub::{Behaviour, SubSpec};
use crate::watch_events::Watcher;

/// Default max_backlog of the server (the seed's).
const DEFAULT_MAX_BACKLOG: u64 = 5000;
/// Default cap on subscriber connections of the groups scenario.
const DEFAULT_MAX_SUB_CONNS: usize = 1000;

/// What a scenario produced: its JSON object and latency histograms
/// (the first is the run's; others are for the plot).
pub struct Report {
    pub json: Value,
    pub hists: Vec<(String, Histogram<u64>)>,
}

/// Where the run goes.
pub struct Target {
    pub servers: Vec<String>,
    pub spawned: Option<usize>,
    pub obs: Observer,
}

/// Checks scenario options before anything is started.
///
/// # Errors
/// A one-line description of the first problem.
pub fn validate(s: &Scenario) -> Result<()> {
    let at_least = |name: &str, v: usize, min: usize| {
        if v < min {
            bail!("--{name} {v}: must be at least {min}");
        }
        Ok(())
    };
    match s {
        Scenario::Fanout {
            publishers,
            subscribers,
            ..
        }
        | Scenario::Cluster {
            publishers,
            subscribers,
            ..
        } => {
            at_least("publishers", *publishers, 1)?;
            at_least("subscribers", *subscribers, 1)?;
        }
        Scenario::Fanin { publishers, .. } => at_least("publishers", *publishers, 1)?,
        Scenario::Groups {
            groups,
            subs_per_group,
            sub_conns,
            publishers,
            ..
        } => {
            at_least("groups", *groups, 1)?;
            at_least("subs-per-group", *subs_per_group, 1)?;
            at_least("publishers", *publishers, 1)?;
            if let Some(c) = sub_conns {
                at_least("sub-conns", *c, 1)?;
                if subs_per_group > c {
                    bail!("--subs-per-group {subs_per_group} exceeds --sub-conns {c}: a connection joins a group once");
                }
            }
        }
        Scenario::Backlog {
            publishers,
            subscribers,
            stalled,
            ..
        } => {
            at_least("publishers", *publishers, 1)?;
            if stalled >= subscribers {
                bail!("--stalled {stalled}: must be less than --subscribers {subscribers} (someone must stay healthy)");
            }
        }
        Scenario::Churn {
            publishers,
            subscribers,
            members,
            join_rate,
            ..
        } => {
            at_least("publishers", *publishers, 1)?;
            at_least("subscribers", *subscribers, 1)?;
            at_least("members", *members, 1)?;
            if !(join_rate.is_finite() && *join_rate > 0.0) {
                bail!("--join-rate {join_rate}: must be a positive number of joins per second");
            }
        }
        Scenario::Memory {
            common,
            groups,
            conns,
            burst_size,
        } => memory::validate(common, &memory::Sizes::new(*groups, *conns, *burst_size))?,
        Scenario::Storm {
            common,
            clients,
            events,
            parallel,
            leave,
        } => storm::validate(common, &storm_options(*clients, *events, *parallel, *leave))?,
    }
    window(s.common(), 1)?;
    if let Scenario::Cluster { common, .. } = s {
        let n = common.spawn.unwrap_or(common.server.len());
        if n < 2 {
            bail!("cluster needs at least two servers: --spawn 3 or --server A,B,…");
        }
    }
    Ok(())
}

/// Runs scenario `s` against `t`.
///
/// # Errors
/// Whatever stops a run (see [`engine::run`]).
pub async fn run(s: &Scenario, t: &Target) -> Result<Report> {
    let c = s.common();
    match s {
        Scenario::Fanout {
            publishers,
            subscribers,
            ..
        } => {
            let plan = fanout_plan(c, t, "fanout", *publishers, *subscribers, &[]);
            single(
                s,
                c,
                t,
                plan,
                json!({"publishers": publishers, "subscribers": subscribers}),
            )
            .await
        }
        Scenario::Fanin { publishers, .. } => {
            let plan = fanout_plan(c, t, "fanin", *publishers, 1, &[]);
            single(
                s,
                c,
                t,
                plan,
                json!({"publishers": publishers, "subscribers": 1}),
            )
            .await
        }
        Scenario::Groups {
            groups,
            subs_per_group,
            sub_conns,
            publishers,
            ..
        } => {
            let conns = sub_conns.unwrap_or((groups * subs_per_group).min(DEFAULT_MAX_SUB_CONNS));
            let plan = groups_plan(
                c,
                t,
                *publishers,
                *groups,
                *subs_per_group,
                conns.max(*subs_per_group),
            );
            let extra = json!({"publishers": publishers, "groups": groups,
                "subs_per_group": subs_per_group, "subscribers": subs_per_group, "sub_conns": conns});
            single(s, c, t, plan, extra).await
        }
        Scenario::Cluster {
            publishers,
            subscribers,
            ..
        } => {
            let mut plan = fanout_plan(c, t, "cluster", *publishers, *subscribers, &[]);
            let others = &t.servers[1..];
            for (i, sub) in plan.subs.iter_mut().enumerate() {
                sub.addr = others[i % others.len()].clone();
            }
            plan.route_checks = vec![(0, 0, *subscribers)];
            single(
                s,
                c,
                t,
                plan,
                json!({"publishers": publishers, "subscribers": subscribers}),
            )
            .await
        }
        Scenario::Backlog { .. } => backlog(s, c, t).await,
        Scenario::Memory {
            groups,
            conns,
            burst_size,
            ..
        } => memory::run(c, t, &memory::Sizes::new(*groups, *conns, *burst_size)).await,
        Scenario::Storm {
            clients,
            events,
            parallel,
            leave,
            ..
        } => storm::run(c, t, &storm_options(*clients, *events, *parallel, *leave)).await,
        Scenario::Churn {
            publishers,
            subscribers,
            members,
            join_rate,
            hold,
            ..
        } => {
            let mut plan = fanout_plan(c, t, "churn", *publishers, *subscribers, &[]);
            let watcher = Arc::new(Watcher::default());
            plan.subs[0].watcher = Some(watcher.clone());
            plan.churn = Some(ChurnPlan {
                addrs: t.servers.clone(),
                members: *members,
                group: plan.routes.groups[0].clone(),
                join_rate: *join_rate,
                hold: *hold,
                watcher,
            });
            single(
                s,
                c,
                t,
                plan,
                json!({"publishers": publishers, "subscribers": subscribers}),
            )
            .await
        }
    }
}

/// The storm's options from its arguments.
fn storm_options(
    clients: usize,
    events: EventsArg,
    parallel: usize,
    leave: bool,
) -> storm::Options {
    storm::Options {
        clients,
        events: events.events(),
        parallel,
        leave,
    }
}

/// Runs one plan and reports it.
async fn single(s: &Scenario, c: &Common, t: &Target, plan: Plan, extra: Value) -> Result<Report> {
    let o = engine::run(plan, &t.obs).await?;
    let mut j = run_json(s.name(), params(c, t, &extra), &o);
    if let Some(Value::Object(ch)) = &o.churn {
        j.extend(ch.clone());
    }
    Ok(Report {
        json: Value::Object(j),
        hists: vec![(s.name().to_string(), o.hist)],
    })
}

/// A unique prefix for this run's group names, so that runs (and other
/// load generators on the same server) never see each other's traffic.
pub fn group_names(n: usize) -> Vec<GroupName> {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    (0..n)
        .map(|i| {
            GroupName::from_str_checked(&format!("lg{pid}.{run}.g{i}"))
                .expect("generated group names are valid")
        })
        .collect()
}

fn window(c: &Common, publishers: usize) -> Result<u64> {
    if let Some(w) = c.window {
        return Ok(w);
    }
    let backlog = c.set_number("max_backlog")?.unwrap_or(DEFAULT_MAX_BACKLOG);
    Ok((backlog * 2 / 5 / publishers as u64).max(1))
}

fn base_plan(
    c: &Common,
    t: &Target,
    label: &str,
    publishers: usize,
    routes: Routes,
    subs: Vec<SubSpec>,
) -> Plan {
    Plan {
        label: label.to_string(),
        subs,
        routes,
        pub_addrs: vec![t.servers[0].clone(); publishers],
        size: c.size,
        warmup: c.warmup,
        duration: c.duration,
        rate: c.rate,
        window: window(c, publishers).unwrap_or(DEFAULT_MAX_BACKLOG * 2 / 5),
        tick: c.tick,
        route_checks: Vec::new(),
        churn: None,
        progress: !(c.json || c.quiet) && c.warmup + c.duration > Duration::from_secs(2),
    }
}

fn sub_spec(c: &Common, addr: &str, groups: Vec<GroupName>, behaviour: Behaviour) -> SubSpec {
    SubSpec {
        addr: addr.to_string(),
        groups,
        behaviour,
        rcvbuf: None,
        watcher: None,
        client_lib: c.sub_client,
    }
}

/// One group, `subscribers` connections in it; `impaired` overrides the
/// behaviour of the first few.
fn fanout_plan(
    c: &Common,
    t: &Target,
    label: &str,
    publishers: usize,
    subscribers: usize,
    impaired: &[Behaviour],
) -> Plan {
    let groups = group_names(1);
    let subs: Vec<SubSpec> = (0..subscribers)
        .map(|i| {
            let b = impaired.get(i).copied().unwrap_or(Behaviour::Healthy);
            sub_spec(c, &t.servers[0], groups.clone(), b)
        })
        .collect();
    let routes = Routes {
        conns: vec![(0..subscribers as u32).collect()],
        healthy: subs
            .iter()
            .map(|s| s.behaviour == Behaviour::Healthy)
            .collect(),
        groups,
    };
    base_plan(c, t, label, publishers, routes, subs)
}

/// `groups` groups, `per_group` subscribers each, over `conns` connections
/// (group g's j-th subscriber is connection (g·per_group + j) mod conns).
fn groups_plan(
    c: &Common,
    t: &Target,
    publishers: usize,
    ngroups: usize,
    per_group: usize,
    conns: usize,
) -> Plan {
    let groups = group_names(ngroups);
    let mut joined: Vec<Vec<GroupName>> = vec![Vec::new(); conns];
    let mut members: Vec<Vec<u32>> = Vec::with_capacity(ngroups);
    for (g, name) in groups.iter().enumerate() {
        let list: Vec<u32> = (0..per_group)
            .map(|j| ((g * per_group + j) % conns) as u32)
            .collect();
        for &cn in &list {
            joined[cn as usize].push(name.clone());
        }
        members.push(list);
    }
    let subs: Vec<SubSpec> = joined
        .into_iter()
        .map(|gs| sub_spec(c, &t.servers[0], gs, Behaviour::Healthy))
        .collect();
    let routes = Routes {
        healthy: vec![true; subs.len()],
        conns: members,
        groups,
    };
    base_plan(c, t, "groups", publishers, routes, subs)
}

/// The parameters object of a run.
fn params(c: &Common, t: &Target, extra: &Value) -> Value {
    let publishers = extra["publishers"].as_u64().unwrap_or(1);
    let mut p = Map::new();
    if let Value::Object(e) = extra {
        p.extend(e.clone());
    }
    let shape = match (extra["groups"].as_u64(), extra["subscribers"].as_u64()) {
        (Some(g), _) => format!(
            "{publishers} publishers → {g} groups × {} over {} connections",
            extra["subs_per_group"], extra["sub_conns"]
        ),
        (None, Some(s)) => format!("{publishers} → {s}"),
        _ => String::new(),
    };
    p.insert("shape".into(), json!(shape));
    p.insert("size".into(), json!(c.size));
    p.insert("duration_s".into(), json!(c.duration.as_secs_f64()));
    p.insert("warmup_s".into(), json!(c.warmup.as_secs_f64()));
    p.insert("rate".into(), json!(c.rate));
    p.insert(
        "mode".into(),
        json!(match c.rate {
            Some(r) => format!("open loop {r} msgs/s"),
            None => "closed loop".into(),
        }),
    );
    p.insert("window".into(), json!(window(c, publishers as usize).ok()));
    p.insert("tick_us".into(), json!(c.tick.as_micros() as u64));
    p.insert("servers".into(), json!(t.servers));
    p.insert("spawned".into(), json!(t.spawned));
    p.insert("set".into(), json!(c.set));
    p.insert(
        "subscriber_reader".into(),
        json!(if c.sub_client { "client" } else { "raw" }),
    );
    Value::Object(p)
}

/// Baseline fan-out, then the same with K impaired subscribers.
async fn backlog(s: &Scenario, c: &Common, t: &Target) -> Result<Report> {
    let Scenario::Backlog {
        publishers,
        subscribers,
        stalled,
        slow_us,
        stalled_rcvbuf,
        no_baseline,
        ..
    } = s
    else {
        bail!("not the backlog scenario");
    };
    let baseline = if *no_baseline {
        None
    } else {
        let plan = fanout_plan(c, t, "baseline", *publishers, *subscribers, &[]);
        Some(engine::run(plan, &t.obs).await?)
    };
    let behaviour = match slow_us {
        Some(us) => Behaviour::Slow(Duration::from_micros(*us)),
        None => Behaviour::Stalled,
    };
    let impaired = vec![behaviour; *stalled];
    let mut plan = fanout_plan(c, t, "impaired", *publishers, *subscribers, &impaired);
    for sub in plan.subs.iter_mut().take(*stalled) {
        sub.rcvbuf = *stalled_rcvbuf;
    }
    let o = engine::run(plan, &t.obs).await?;
    let extra = json!({"publishers": publishers, "subscribers": subscribers,
        "stalled": stalled, "slow_us": slow_us, "stalled_rcvbuf": stalled_rcvbuf});
    let mut j = run_json("backlog", params(c, t, &extra), &o);
    add_backlog_fields(&mut j, &o, baseline.as_ref());
    let mut hists = vec![(
        format!("{stalled} of {subscribers} impaired (healthy subscribers)"),
        o.hist,
    )];
    if let Some(b) = baseline {
        hists.push(("baseline".to_string(), b.hist));
    }
    Ok(Report {
        json: Value::Object(j),
        hists,
    })
}

fn add_backlog_fields(j: &mut Map<String, Value>, o: &Outcome, baseline: Option<&Outcome>) {
    j.insert("healthy_subscribers".into(), json!(o.healthy_subs));
    j.insert("healthy_expected".into(), json!(o.healthy_expected));
    j.insert("healthy_delivered".into(), json!(o.healthy_delivered));
    j.insert(
        "healthy_complete".into(),
        json!(o.healthy_delivered == o.healthy_expected && o.sub_errors.is_empty()),
    );
    j.insert("impaired_delivered".into(), json!(o.impaired_delivered));
    let b = baseline.map_or(Value::Null, |b| {
        let secs = b.duration.as_secs_f64();
        json!({
            "sent": b.sent,
            "delivered": b.delivered,
            "expected": b.expected,
            "delivered_per_sec": b.delivered as f64 / secs,
            "latency_us": lat_json(&b.hist),
            "drops": b.server.drops,
            "stuck_kills": b.server.stuck_kills,
        })
    });
    let ratio = |q: f64| {
        let base = baseline?.hist.value_at_quantile(q);
        (base > 0 && !o.hist.is_empty())
            .then(|| ((o.hist.value_at_quantile(q) as f64 / base as f64) * 100.0).round() / 100.0)
    };
    j.insert("baseline".into(), b);
    j.insert(
        "latency_ratio_vs_baseline".into(),
        json!({"p50": ratio(0.5), "p99": ratio(0.99)}),
    );
}
