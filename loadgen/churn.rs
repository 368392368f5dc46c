//! The churn scenario's members: msgc clients that join and leave one
//! group at a scheduled rate while the run's traffic flows to it.
//!
//! Join `k` is due at `t0 + k / join_rate` (over all members); a free
//! member takes the next due ticket, registers the call with the
//! [`Watcher`], calls `join()`, holds, calls `leave()`. The watcher (the
//! first stable subscriber) reads the events; the gap is the
//! membership-event latency.

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use msgc::client::{Client, ClientConfig};
use msgc::protocol::{GroupName, Reason};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::new_hist;
use crate::report::lat_json;
use crate::watch_events::Watcher;

/// How long to wait for the watcher to see the last events.
const EVENT_GRACE: Duration = Duration::from_secs(2);

/// What the churn needs.
#[derive(Clone)]
pub struct ChurnPlan {
    /// Member `i` connects to `addrs[i % addrs.len()]`.
    pub addrs: Vec<String>,
    pub members: usize,
    pub group: GroupName,
    pub join_rate: f64,
    pub hold: Duration,
    pub watcher: Arc<Watcher>,
}

/// Members connected, not yet churning.
pub struct Prepared {
    plan: ChurnPlan,
    clients: Vec<Client>,
}

/// Members churning.
pub struct Running {
    plan: ChurnPlan,
    clients: Vec<Client>,
    sched: tokio::task::JoinHandle<()>,
    members: Vec<tokio::task::JoinHandle<MemberStats>>,
    window: Duration,
}

struct MemberStats {
    joins: u64,
    leaves: u64,
    errors: u64,
    call: Histogram<u64>,
    sched_lag: Histogram<u64>,
    last_error: Option<String>,
}

impl ChurnPlan {
    /// Connects every member and starts draining its events (members
    /// receive the group's traffic while joined).
    ///
    /// # Errors
    /// When a member cannot connect.
    pub async fn prepare(&self) -> Result<Prepared> {
        let mut clients = Vec::new();
        for i in 0..self.members {
            let addr = &self.addrs[i % self.addrs.len()];
            let c = Client::connect(ClientConfig::with_servers([addr.clone()]))
                .await
                .map_err(|e| anyhow!("churn member cannot connect to {addr}: {e}"))?;
            let events = c.events();
            tokio::spawn(async move { while events.recv_async().await.is_ok() {} });
            clients.push(c);
        }
        Ok(Prepared {
            plan: self.clone(),
            clients,
        })
    }
}

impl Prepared {
    /// Starts the schedule at `t0`; calls from `m0` to `end` are counted.
    pub fn start(self, t0: Instant, m0: Instant, end: Instant) -> Running {
        let (tx, rx) = flume::unbounded::<Instant>();
        let rate = self.plan.join_rate;
        let sched = tokio::spawn(async move {
            for k in 0u64.. {
                let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                if tx.send(due).is_err() {
                    break;
                }
            }
        });
        let members = self
            .clients
            .iter()
            .map(|c| {
                let (c, rx, plan) = (c.clone(), rx.clone(), self.plan.clone());
                tokio::spawn(member(c, rx, plan, m0, end))
            })
            .collect();
        Running {
            plan: self.plan,
            clients: self.clients,
            sched,
            members,
            window: end.saturating_duration_since(m0),
        }
    }
}

async fn member(
    c: Client,
    tickets: flume::Receiver<Instant>,
    plan: ChurnPlan,
    m0: Instant,
    end: Instant,
) -> MemberStats {
    let mut st = MemberStats {
        joins: 0,
        leaves: 0,
        errors: 0,
        call: new_hist(),
        sched_lag: new_hist(),
        last_error: None,
    };
    while let Ok(due) = tickets.recv_async().await {
        let t_call = Instant::now();
        if t_call >= end {
            break;
        }
        let counted = t_call >= m0;
        let id = c.member_id();
        plan.watcher
            .expect(Reason::Join, id.as_bytes(), t_call, counted);
        if let Err(e) = c.join(&plan.group).await {
            st.errors += 1;
            st.last_error = Some(e.to_string());
            continue;
        }
        if counted {
            st.joins += 1;
            st.call.saturating_record(nanos(t_call.elapsed()));
            st.sched_lag
                .saturating_record(nanos(t_call.saturating_duration_since(due)));
        }
        if !plan.hold.is_zero() {
            tokio::time::sleep(plan.hold).await;
        }
        let t_leave = Instant::now();
        plan.watcher
            .expect(Reason::Leave, id.as_bytes(), t_leave, counted);
        match c.leave(&plan.group).await {
            Ok(()) => st.leaves += u64::from(counted),
            Err(e) => {
                st.errors += 1;
                st.last_error = Some(e.to_string());
            }
        }
    }
    st
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl Running {
    /// Waits for the schedule and the members, then for the last events,
    /// and reports.
    pub async fn finish(self) -> Value {
        let _ = self.sched.await;
        let mut all = Vec::new();
        for m in self.members {
            if let Ok(s) = m.await {
                all.push(s);
            }
        }
        let grace = Instant::now() + EVENT_GRACE;
        while self.plan.watcher.seen().missing > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for c in &self.clients {
            let _ = c.close().await;
        }
        let seen = self.plan.watcher.seen();
        let mut call = new_hist();
        let mut lag = new_hist();
        for s in &all {
            let _ = call.add(&s.call);
            let _ = lag.add(&s.sched_lag);
        }
        let joins: u64 = all.iter().map(|s| s.joins).sum();
        let secs = self.window.as_secs_f64().max(1e-9);
        json!({
            "members": self.plan.members,
            "join_rate_requested": self.plan.join_rate,
            "hold_ms": self.plan.hold.as_secs_f64() * 1e3,
            "joins": joins,
            "joins_per_sec": joins as f64 / secs,
            "leaves": all.iter().map(|s| s.leaves).sum::<u64>(),
            "churn_errors": all.iter().map(|s| s.errors).sum::<u64>(),
            "churn_last_error": all.iter().find_map(|s| s.last_error.clone()),
            "join_event_latency_us": lat_json(&seen.join),
            "leave_event_latency_us": lat_json(&seen.leave),
            "join_call_latency_us": lat_json(&call),
            "join_schedule_lag_us": lat_json(&lag),
            "events_missing": seen.missing,
        })
    }
}
