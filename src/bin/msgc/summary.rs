//! One-screen views of the stats document: `msgc stats` (one node) and
//! `msgc cluster` (every node's view of the mesh). Whatever a document
//! lacks shows as `?`: an older or newer server never makes them fail.

use serde_json::Value;
use std::fmt::Write as _;

/// Names listed when some links are not up; the rest are counted.
const MAX_LISTED: usize = 8;

/// A node's stats in a few lines: identity, links, connections, groups,
/// traffic, drops; links that are not up by name.
pub fn node(stats: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node         {} (msgc {}, up {}, {} backend, {} shards, rss {})",
        text(&stats["node"]),
        text(&stats["version"]),
        duration(stats["uptime_secs"].as_f64()),
        text(&stats["io_backend"]),
        num(&stats["shards"]),
        bytes(stats["memory"]["rss_bytes"].as_u64()),
    );
    let links = Links::of(stats);
    let _ = writeln!(out, "links        {}", links.line());
    let t = &stats["totals"];
    let _ = writeln!(
        out,
        "connections  {} open ({} since start)",
        num(&t["connections"]),
        num(&t["connections_total"])
    );
    let _ = writeln!(out, "groups       {}", num(&stats["groups"]));
    let _ = writeln!(
        out,
        "traffic      {} publishes, {} deliveries",
        num(&t["publishes"]),
        num(&t["deliveries"])
    );
    let _ = writeln!(out, "drops        {}", drops(stats));
    if let Some(line) = refused(t) {
        let _ = writeln!(out, "refused      {line}");
    }
    out.push_str("(`msgc stats --full` for every counter, `--json` for the document)\n");
    out
}

/// What `msgc cluster` found at one address.
pub struct View {
    /// The address asked (the first server, then each peer's address).
    pub address: String,
    /// The stats document, or why there is none.
    pub stats: Result<Value, String>,
}

/// One line per node: its links as it sees them, connections, groups,
/// drops. Returns the table and whether every node answered and sees
/// every link up.
pub fn cluster(views: &[View]) -> (String, bool) {
    let mut rows = vec![[
        "node", "address", "links", "conns", "groups", "dropped", "not up",
    ]
    .map(String::from)
    .to_vec()];
    let mut healthy = true;
    for v in views {
        match &v.stats {
            Ok(s) => {
                let links = Links::of(s);
                healthy &= links.up == links.total;
                rows.push(vec![
                    text(&s["node"]),
                    v.address.clone(),
                    format!("{}/{}", links.up, links.total),
                    num(&s["totals"]["connections"]),
                    num(&s["groups"]),
                    num(&s["dropped"]),
                    links.not_up_names(),
                ]);
            }
            Err(e) => {
                healthy = false;
                rows.push(vec![
                    "?".into(),
                    v.address.clone(),
                    format!("unreachable: {e}"),
                ]);
            }
        }
    }
    (grid(&rows), healthy)
}

/// The peers of a stats document: how many, how many up, which not.
struct Links {
    up: usize,
    total: usize,
    /// Peers not up: (name, state, seconds in that state, reconnects).
    not_up: Vec<(String, String, Option<f64>, String)>,
}

impl Links {
    fn of(stats: &Value) -> Self {
        let peers = stats["peers"].as_array().map_or(&[][..], Vec::as_slice);
        let not_up: Vec<_> = peers
            .iter()
            .filter(|p| p["state"].as_str() != Some("up"))
            .map(|p| {
                let mut state = text(&p["state"]);
                if let Some(e) = p["address_error"].as_str() {
                    let _ = write!(state, " (address: {e})");
                }
                (
                    text(&p["name"]),
                    state,
                    p["since_secs"].as_f64(),
                    num(&p["reconnects"]),
                )
            })
            .collect();
        Self {
            up: peers.len() - not_up.len(),
            total: peers.len(),
            not_up,
        }
    }

    fn line(&self) -> String {
        if self.total == 0 {
            return "none (no peers)".into();
        }
        let mut line = format!("{}/{} up", self.up, self.total);
        if !self.not_up.is_empty() {
            let listed: Vec<String> = self
                .not_up
                .iter()
                .take(MAX_LISTED)
                .map(|(name, state, since, reconnects)| {
                    format!(
                        "{name} {state} for {}, {reconnects} reconnects",
                        duration(*since)
                    )
                })
                .collect();
            let _ = write!(line, "; not up: {}", listed.join("; "));
            self.more(&mut line);
        }
        line
    }

    fn not_up_names(&self) -> String {
        if self.not_up.is_empty() {
            return "-".into();
        }
        let mut names: String = self
            .not_up
            .iter()
            .take(MAX_LISTED)
            .map(|(name, state, ..)| format!("{name} ({state})"))
            .collect::<Vec<_>>()
            .join(", ");
        self.more(&mut names);
        names
    }

    fn more(&self, out: &mut String) {
        if self.not_up.len() > MAX_LISTED {
            let _ = write!(out, " and {} more", self.not_up.len() - MAX_LISTED);
        }
    }
}

/// What the server refused, when it refused anything: client logins (some
/// without a password check: rate-limited), requests a user may not make,
/// peers that did not prove the cluster key.
fn refused(t: &Value) -> Option<String> {
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    let mut parts = Vec::new();
    if n("auth_failures") > 0 {
        let mut s = format!("{} logins", n("auth_failures"));
        if n("auth_rate_limited") > 0 {
            let _ = write!(s, " ({} rate-limited)", n("auth_rate_limited"));
        }
        parts.push(s);
    }
    if n("permission_denials") > 0 {
        parts.push(format!(
            "{} requests denied by permissions",
            n("permission_denials")
        ));
    }
    if n("peer_auth_failures") > 0 {
        parts.push(format!(
            "{} peer handshakes without the cluster key",
            n("peer_auth_failures")
        ));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// `N` or `N: reason n, reason m` for the reasons that are not zero.
fn drops(stats: &Value) -> String {
    let total = num(&stats["dropped"]);
    let reasons: Vec<String> = stats["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if reasons.is_empty() {
        total
    } else {
        format!("{total}: {}", reasons.join(", "))
    }
}

/// Columns padded to their widest cell; the last column is not padded.
fn grid(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter(|r| r.len() > i + 1)
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    }
}

fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".into(), |n| n.to_string())
}

/// `45s`, `12m 3s`, `5h 2m`, `3d 4h`.
fn duration(secs: Option<f64>) -> String {
    let Some(secs) = secs.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "?".into();
    };
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn bytes(n: Option<u64>) -> String {
    match n {
        None => "?".into(),
        Some(n) if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        Some(n) => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(node: &str, states: &[&str]) -> Value {
        let peers: Vec<Value> = states
            .iter()
            .enumerate()
            .map(|(i, s)| serde_json::json!({"name": format!("p{i}"), "state": s, "since_secs": 75.0, "reconnects": 2}))
            .collect();
        serde_json::json!({
            "node": node, "version": "0.1.0", "uptime_secs": 3725.0, "io_backend": "uring",
            "shards": 2, "groups": 7, "dropped": 3, "memory": {"rss_bytes": 10_485_760u64},
            "drops": {"stuck": 2, "idle": 1, "closed": 0},
            "totals": {"connections": 5, "connections_total": 9, "publishes": 11, "deliveries": 22},
            "peers": peers,
        })
    }

    #[test]
    fn one_node_on_a_few_lines() {
        let out = node(&doc("n1", &["up", "down", "up"]));
        assert!(
            out.contains("n1 (msgc 0.1.0, up 1h 2m, uring backend, 2 shards, rss 10.0 MiB)"),
            "{out}"
        );
        assert!(
            out.contains("links        2/3 up; not up: p1 down for 1m 15s, 2 reconnects\n"),
            "{out}"
        );
        assert!(
            out.contains("connections  5 open (9 since start)\n"),
            "{out}"
        );
        assert!(out.contains("drops        3: idle 1, stuck 2\n"), "{out}");
        assert!(out.lines().count() <= 8, "{out}");
        // Nothing the document lacks makes it fail.
        assert!(node(&serde_json::json!({})).contains("links        none (no peers)"));
    }

    #[test]
    fn refusals_and_unresolved_addresses_are_shown_when_there_are_any() {
        let mut d = doc("n", &["up", "down"]);
        assert!(!node(&d).contains("refused"), "nothing refused: no line");
        d["totals"]["auth_failures"] = 7.into();
        d["totals"]["auth_rate_limited"] = 2.into();
        d["totals"]["permission_denials"] = 3.into();
        d["totals"]["peer_auth_failures"] = 1.into();
        d["peers"][1]["address_error"] = "no such host".into();
        let out = node(&d);
        assert!(
            out.contains(
                "refused      7 logins (2 rate-limited), 3 requests denied by permissions, \
                 1 peer handshakes without the cluster key\n"
            ),
            "{out}"
        );
        assert!(out.contains("down (address: no such host)"), "{out}");
    }

    #[test]
    fn many_links_down_are_counted_past_a_few() {
        let states = vec!["down"; 20];
        let line = Links::of(&doc("n", &states)).not_up_names();
        assert!(line.ends_with(" and 12 more"), "{line}");
    }

    #[test]
    fn cluster_table_and_health() {
        let views = [
            View {
                address: "a:1".into(),
                stats: Ok(doc("n1", &["up", "up"])),
            },
            View {
                address: "b:1".into(),
                stats: Ok(doc("n2", &["up", "dialling"])),
            },
            View {
                address: "c:1".into(),
                stats: Err("connection refused".into()),
            },
        ];
        let (out, healthy) = cluster(&views);
        assert!(!healthy);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("node  address  links  conns"), "{out}");
        assert!(lines[1].starts_with("n1    a:1      2/2    5"), "{out}");
        assert!(lines[2].ends_with("p1 (dialling)"), "{out}");
        assert_eq!(
            lines[3], "?     c:1      unreachable: connection refused",
            "{out}"
        );
        let (_, healthy) = cluster(&views[..1]);
        assert!(healthy);
    }
}
