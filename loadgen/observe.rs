//! What the servers say about a run: one control client per server for
//! stats (drops, stuck kills, backend, peers) and member lists, plus /proc
//! for spawned servers (CPU time, peak memory).

use anyhow::{anyhow, bail, Context, Result};
use msgc::client::{Client, ClientConfig};
use msgc::protocol::GroupName;
use serde_json::Value;
use std::time::{Duration, Instant};

use crate::spawn;

/// Control connections to every server.
pub struct Observer {
    pub addrs: Vec<String>,
    clients: Vec<Client>,
    /// Pids of spawned servers (empty when not spawned).
    pub pids: Vec<u32>,
}

/// Counters of every server at one moment.
pub struct Snapshot {
    stats: Vec<Value>,
    cpu: Vec<Option<f64>>,
}

/// What changed on the servers between two snapshots.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    pub stuck_kills: u64,
    pub drops: u64,
    /// Drops by reason (stuck, idle, closed, …), summed over servers.
    pub drops_by_reason: serde_json::Map<String, Value>,
    pub publishes: u64,
    pub deliveries: u64,
    /// CPU seconds of the spawned servers, summed (None if not spawned).
    pub cpu_s: Option<f64>,
}

impl Observer {
    /// Connects a control client to every server.
    ///
    /// # Errors
    /// When a server cannot be reached.
    pub async fn connect(addrs: Vec<String>, pids: Vec<u32>) -> Result<Observer> {
        let mut clients = Vec::new();
        for a in &addrs {
            let c = Client::connect(ClientConfig::with_servers([a.clone()]))
                .await
                .map_err(|e| anyhow!("cannot reach server {a}: {e}"))?;
            clients.push(c);
        }
        Ok(Observer {
            addrs,
            clients,
            pids,
        })
    }

    /// The stats document of server `i`.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn stats(&self, i: usize) -> Result<Value> {
        self.clients[i]
            .stats()
            .await
            .map_err(|e| anyhow!("stats of {}: {e}", self.addrs[i]))
    }

    /// Waits until every server reports each of its peers `up`.
    ///
    /// # Errors
    /// When the mesh is not complete within `limit`.
    pub async fn wait_mesh(&self, limit: Duration) -> Result<()> {
        let end = Instant::now() + limit;
        loop {
            let mut missing = Vec::new();
            for i in 0..self.clients.len() {
                let s = self.stats(i).await?;
                let peers = s["peers"].as_array().cloned().unwrap_or_default();
                let up = peers.iter().filter(|p| p["state"] == "up").count();
                if up + 1 < self.clients.len() {
                    missing.push(format!(
                        "{}: {up}/{} peers up",
                        self.addrs[i],
                        self.clients.len() - 1
                    ));
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "the cluster mesh is not up after {limit:?} ({})",
                    missing.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until server `i` lists `want` members in `group` (interest
    /// from other nodes has arrived, so its publishes are forwarded).
    ///
    /// # Errors
    /// When it does not within `limit`.
    pub async fn wait_members(
        &self,
        i: usize,
        group: &GroupName,
        want: usize,
        limit: Duration,
    ) -> Result<()> {
        let end = Instant::now() + limit;
        loop {
            let n = self.clients[i]
                .members(group)
                .await
                .map_err(|e| anyhow!("members of {group} on {}: {e}", self.addrs[i]))?
                .len();
            if n >= want {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "{} sees {n}/{want} members of {group} after {limit:?}",
                    self.addrs[i]
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every server's counters now.
    ///
    /// # Errors
    /// When a server does not answer.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut stats = Vec::new();
        for i in 0..self.clients.len() {
            stats.push(self.stats(i).await.context("stats snapshot")?);
        }
        let cpu = self
            .pids
            .iter()
            .map(|p| spawn::cpu_secs(&p.to_string()))
            .collect();
        Ok(Snapshot { stats, cpu })
    }

    /// Peak resident memory: the largest VmHWM of the spawned servers, or
    /// an RSS figure from stats when the server reports one.
    pub fn peak_rss(&self, last: &Snapshot) -> Option<u64> {
        if !self.pids.is_empty() {
            return self.pids.iter().filter_map(|&p| spawn::peak_rss(p)).max();
        }
        last.stats
            .iter()
            .filter_map(|s| {
                ["peak_rss_bytes", "rss_bytes"]
                    .iter()
                    .find_map(|k| s[*k].as_u64().or_else(|| s["memory"][*k].as_u64()))
            })
            .max()
    }

    /// Per-node peak memory of spawned servers.
    pub fn peak_rss_per_node(&self) -> Vec<Option<u64>> {
        self.pids.iter().map(|&p| spawn::peak_rss(p)).collect()
    }

    /// The first server's `io_backend` and `shards`.
    pub fn backend(&self, snap: &Snapshot) -> (Value, Value) {
        let s = snap.stats.first().cloned().unwrap_or(Value::Null);
        (s["io_backend"].clone(), s["shards"].clone())
    }

    /// Closes the control connections.
    pub async fn close(&self) {
        for c in &self.clients {
            let _ = c.close().await;
        }
    }
}

/// `after - before`, summed over servers.
pub fn delta(before: &Snapshot, after: &Snapshot) -> Delta {
    let mut d = Delta::default();
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    for (b, a) in before.stats.iter().zip(&after.stats) {
        let diff = |path: &[&str]| {
            let get = |v: &Value| num(path.iter().fold(v, |v, k| &v[*k]));
            get(a).saturating_sub(get(b))
        };
        d.stuck_kills += diff(&["totals", "stuck_kills"]);
        d.drops += diff(&["dropped"]);
        d.publishes += diff(&["totals", "publishes"]);
        d.deliveries += diff(&["totals", "deliveries"]);
        if let Some(reasons) = a["drops"].as_object() {
            for k in reasons.keys() {
                let v = diff(&["drops", k]);
                let slot = d
                    .drops_by_reason
                    .entry(k.clone())
                    .or_insert(Value::from(0u64));
                *slot = Value::from(num(slot) + v);
            }
        }
    }
    let cpu: Vec<f64> = before
        .cpu
        .iter()
        .zip(&after.cpu)
        .filter_map(|(b, a)| Some((*a)? - (*b)?))
        .collect();
    d.cpu_s = (!cpu.is_empty()).then(|| cpu.iter().sum());
    d
}
