//! `/metrics`: a [`Snapshot`] in the Prometheus text format (0.0.4).
//!
//! Encoded with prometheus-client through a collector that is handed the
//! snapshot at scrape time: no metric object is updated on the publish
//! path. The shards' counters stay the plain per-shard atomics they
//! always were (see `stats`), read here with relaxed loads, so the
//! counters a shard keeps cost it nothing more for being exported.
//!
//! Names follow Prometheus' conventions: the `msgc_` prefix, `_total` on
//! counters, base units in the name (`_bytes`, `_seconds`), and labels
//! rather than names for the shard, the reason of a drop or a close, and
//! the peer.

use super::gather::{LinkState, ShardSnap, Snapshot};
use crate::stats::Counts;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::time::UNIX_EPOCH;

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

/// One metric family: its descriptor and samples.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

/// The families of one scrape, in the order first mentioned.
#[derive(Debug, Default)]
struct Families(Vec<Family>);

impl Families {
    fn add(
        &mut self,
        kind: MetricType,
        name: &'static str,
        unit: Option<Unit>,
        help: &'static str,
        labels: Labels,
        value: Value,
    ) {
        let i = match self.0.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.0.push(Family {
                    name,
                    help,
                    unit,
                    kind,
                    samples: Vec::new(),
                });
                self.0.len() - 1
            }
        };
        self.0[i].samples.push((labels, value));
    }

    fn counter(
        &mut self,
        name: &'static str,
        unit: Option<Unit>,
        help: &'static str,
        labels: Labels,
        v: u64,
    ) {
        self.add(MetricType::Counter, name, unit, help, labels, Value::Int(v));
    }

    fn gauge(
        &mut self,
        name: &'static str,
        unit: Option<Unit>,
        help: &'static str,
        labels: Labels,
        v: u64,
    ) {
        self.add(MetricType::Gauge, name, unit, help, labels, Value::Int(v));
    }

    fn gauge_f(
        &mut self,
        name: &'static str,
        unit: Option<Unit>,
        help: &'static str,
        labels: Labels,
        v: f64,
    ) {
        self.add(MetricType::Gauge, name, unit, help, labels, Value::Float(v));
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let mut m = encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), f.kind)?;
            for (labels, value) in &f.samples {
                let e = m.encode_family(labels)?;
                match (f.kind, *value) {
                    (MetricType::Counter, Value::Int(v)) => ConstCounter::new(v).encode(e)?,
                    (MetricType::Counter, Value::Float(v)) => ConstCounter::new(v).encode(e)?,
                    (_, Value::Int(v)) => ConstGauge::new(v).encode(e)?,
                    (_, Value::Float(v)) => ConstGauge::new(v).encode(e)?,
                }
            }
        }
        Ok(())
    }
}

fn shard(i: usize) -> Labels {
    vec![("shard", i.to_string())]
}

fn shard_reason(i: usize, reason: &str) -> Labels {
    vec![("shard", i.to_string()), ("reason", reason.to_owned())]
}

/// Every counter of STATS for shard `i` (the queue gauges are given by
/// [`shard_queues`], fresher when the shard answered).
fn shard_counts(f: &mut Families, i: usize, c: &Counts) {
    use MetricType::Counter;
    let per = |f: &mut Families, name, unit, help, v| {
        f.add(Counter, name, unit, help, shard(i), Value::Int(v))
    };
    per(
        f,
        "connections_opened",
        None,
        "Connections accepted or dialled.",
        c.connections_total,
    );
    per(f, "received_frames", None, "Frames received.", c.msgs_in);
    per(
        f,
        "sent_frames",
        None,
        "Frames written to clients and peers.",
        c.msgs_out,
    );
    per(
        f,
        "received",
        Some(Unit::Bytes),
        "Bytes received.",
        c.bytes_in,
    );
    per(f, "sent", Some(Unit::Bytes), "Bytes written.", c.bytes_out);
    per(
        f,
        "publishes",
        None,
        "Group publishes received from local clients.",
        c.publishes,
    );
    per(
        f,
        "deliveries",
        None,
        "Group messages queued to local members.",
        c.deliveries,
    );
    per(
        f,
        "unrouted_publishes",
        None,
        "Publishes to a group with no member anywhere.",
        c.unrouted,
    );
    per(
        f,
        "slow_reader_waits",
        None,
        "Times a connection's full queue made its producers wait (a slow reader, nothing dropped).",
        c.slow_readers,
    );
    per(
        f,
        "producer_waits",
        None,
        "Times a producer's socket was not read because a queue or inbox it feeds was full.",
        c.producer_waits,
    );
    per(
        f,
        "membership_frames",
        None,
        "MEMBERSHIP frames queued.",
        c.membership_frames,
    );
    per(
        f,
        "membership_batches",
        None,
        "MEMBERSHIP_BATCH frames queued.",
        c.membership_batches,
    );
    per(
        f,
        "peer_auth_failures",
        None,
        "Peer handshakes refused because the peer did not prove the cluster key.",
        c.peer_auth_failures,
    );
    per(
        f,
        "auth_failures",
        None,
        "Client logins refused (no, malformed or unknown credentials, a wrong password, or rate-limited).",
        c.auth_failures,
    );
    per(
        f,
        "auth_rate_limited",
        None,
        "Client logins refused without checking the password (too many failures from the address, or too many waiting).",
        c.auth_rate_limited,
    );
    per(
        f,
        "permission_denials",
        None,
        "Requests refused by the user's permissions (the connection stays open).",
        c.permission_denials,
    );
    let closed = "Connections the server closed, by reason.";
    for (reason, v) in [
        ("stuck", c.stuck_kills),
        ("idle", c.idle_kills),
        ("protocol_error", c.protocol_errors),
        ("handshake_timeout", c.handshake_timeouts),
    ] {
        f.counter(
            "connections_closed",
            None,
            closed,
            shard_reason(i, reason),
            v,
        );
    }
    let dropped = "Messages dropped, by reason (see README: every drop is counted once).";
    for (reason, v) in c.drops_by_reason() {
        f.counter(
            "dropped_messages",
            None,
            dropped,
            shard_reason(i, reason),
            v,
        );
    }
    f.gauge(
        "connections",
        None,
        "Connections open: clients, peer links and handshakes.",
        shard(i),
        c.connections,
    );
}

/// Outbound queue and inbox gauges of shard `i`: from its own answer when
/// it gave one, else the figures of its last sweep (no per-queue maximum
/// of frames then).
fn shard_queues(f: &mut Families, i: usize, s: &ShardSnap) {
    let (frames, bytes, max_bytes, max_frames) = match &s.summary {
        Some(a) => (
            a.queue.frames,
            a.queue.bytes,
            a.queue.max_bytes,
            Some(a.queue.max_frames),
        ),
        None => (
            s.counts.queued_frames,
            s.counts.queued_bytes,
            s.counts.max_queued_bytes,
            None,
        ),
    };
    f.gauge(
        "outbound_queue_frames",
        None,
        "Frames queued to the shard's connections, summed.",
        shard(i),
        frames,
    );
    f.gauge(
        "outbound_queue",
        Some(Unit::Bytes),
        "Bytes queued to the shard's connections, summed.",
        shard(i),
        bytes,
    );
    f.gauge(
        "outbound_queue_max",
        Some(Unit::Bytes),
        "Bytes queued to the shard's fullest connection.",
        shard(i),
        max_bytes,
    );
    if let Some(m) = max_frames {
        f.gauge(
            "outbound_queue_max_frames",
            None,
            "Frames queued to the shard's fullest connection.",
            shard(i),
            m,
        );
    }
    f.gauge(
        "inbox_messages",
        None,
        "Messages waiting in the shard's inbox (from other shards).",
        shard(i),
        s.inbox_msgs,
    );
    f.gauge(
        "inbox",
        Some(Unit::Bytes),
        "Bytes waiting in the shard's inbox.",
        shard(i),
        s.inbox_bytes,
    );
    if let Some(a) = &s.summary {
        f.gauge(
            "memberships",
            None,
            "Group memberships of the shard's clients.",
            shard(i),
            a.memberships,
        );
    }
    f.gauge(
        "shard_up",
        None,
        "1 when the shard answered the monitor within its timeout, else 0.",
        shard(i),
        u64::from(s.summary.is_some()),
    );
}

fn families(s: &Snapshot) -> Families {
    let mut f = Families::default();
    f.gauge(
        "build_info",
        None,
        "Always 1; labels say the version, node and I/O backend.",
        vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("node", s.node.clone()),
            ("io_backend", s.backend.to_owned()),
        ],
        1,
    );
    f.gauge_f(
        "uptime",
        Some(Unit::Seconds),
        "Seconds since the server started.",
        vec![],
        s.uptime_secs,
    );
    f.gauge(
        "shards",
        None,
        "Shard threads.",
        vec![],
        s.shards.len() as u64,
    );
    f.gauge(
        "groups",
        None,
        "Groups with members anywhere in the cluster.",
        vec![],
        s.groups,
    );
    if let Some(rss) = s.rss_bytes {
        f.gauge(
            "process_resident_memory",
            Some(Unit::Bytes),
            "Resident set size of the process.",
            vec![],
            rss,
        );
    }
    for (i, sh) in s.shards.iter().enumerate() {
        shard_counts(&mut f, i, &sh.counts);
    }
    for (i, sh) in s.shards.iter().enumerate() {
        shard_queues(&mut f, i, sh);
    }
    for p in &s.peers {
        let peer = || vec![("peer", p.name.clone())];
        let reason = |r: &str| vec![("peer", p.name.clone()), ("reason", r.to_owned())];
        f.gauge(
            "peer_up",
            None,
            "1 when the link to the peer is up, else 0.",
            peer(),
            u64::from(matches!(p.state, LinkState::Up { .. })),
        );
        let since = p
            .since
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        f.gauge_f(
            "peer_state_changed_timestamp",
            Some(Unit::Seconds),
            "When the peer's link last changed state (Unix time).",
            peer(),
            since,
        );
        f.counter(
            "peer_reconnects",
            None,
            "Times the link came up after the first time.",
            peer(),
            p.reconnects,
        );
        f.counter(
            "peer_received_frames",
            None,
            "Frames received from the peer.",
            peer(),
            p.msgs_in,
        );
        f.counter(
            "peer_sent_frames",
            None,
            "Frames queued to the peer.",
            peer(),
            p.msgs_out,
        );
        f.counter(
            "peer_received",
            Some(Unit::Bytes),
            "Bytes received from the peer.",
            peer(),
            p.bytes_in,
        );
        f.counter(
            "peer_sent",
            Some(Unit::Bytes),
            "Bytes queued to the peer.",
            peer(),
            p.bytes_out,
        );
        let other = p
            .dropped
            .saturating_sub(p.dropped_down + p.dropped_link_lost + p.dropped_too_large);
        let help = "Messages for the peer dropped, by reason (down: no link; link_lost: queued when the link died; too_large: over its max_message_size; other: on a replaced link or a closed queue).";
        for (r, v) in [
            ("down", p.dropped_down),
            ("link_lost", p.dropped_link_lost),
            ("too_large", p.dropped_too_large),
            ("other", other),
        ] {
            f.counter("peer_dropped_messages", None, help, reason(r), v);
        }
        f.gauge(
            "peer_outbound_queue_frames",
            None,
            "Frames pending on the link.",
            peer(),
            p.queued_frames,
        );
        f.gauge(
            "peer_outbound_queue",
            Some(Unit::Bytes),
            "Bytes pending on the link.",
            peer(),
            p.queued_bytes,
        );
    }
    f
}

/// The snapshot as Prometheus text.
pub fn render(s: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("msgc");
    registry.register_collector(Box::new(families(s)));
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would be ours.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::gather::{PeerSnap, QueueDepth, ShardSummary};
    use std::collections::HashSet;
    use std::time::SystemTime;

    /// Counts with every field a different number (10_001, 10_002, …),
    /// and the field name of each number.
    fn distinct_counts() -> (Counts, Vec<(String, u64)>) {
        let keys = serde_json::to_value(Counts::default()).expect("counts serialize");
        let keys: Vec<String> = keys
            .as_object()
            .expect("an object")
            .keys()
            .cloned()
            .collect();
        let fields: Vec<(String, u64)> = keys.into_iter().zip(10_001..).collect();
        let map: serde_json::Map<_, _> = fields
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        let counts =
            serde_json::from_value(serde_json::Value::Object(map)).expect("counts deserialize");
        (counts, fields)
    }

    fn snapshot(summary: Option<ShardSummary>) -> Snapshot {
        let (counts, _) = distinct_counts();
        Snapshot {
            node: "n1".into(),
            backend: "epoll",
            uptime_secs: 1.5,
            groups: 3,
            rss_bytes: Some(4096),
            shards: vec![ShardSnap {
                counts,
                inbox_msgs: 2,
                inbox_bytes: 300,
                summary,
            }],
            peers: vec![PeerSnap {
                name: "n2".into(),
                address: "127.0.0.2:4809".into(),
                state: LinkState::Up { dialled: true },
                since: SystemTime::now(),
                reconnects: 1,
                link_error: None,
                msgs_in: 5,
                msgs_out: 6,
                bytes_in: 7,
                bytes_out: 8,
                dropped: 10,
                dropped_down: 1,
                dropped_link_lost: 2,
                dropped_too_large: 3,
                queued_frames: 0,
                queued_bytes: 0,
            }],
        }
    }

    #[test]
    fn every_stats_counter_is_exported() {
        let (_, fields) = distinct_counts();
        let text = render(&snapshot(None));
        let values: HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next())
            .collect();
        for (field, v) in fields {
            assert!(
                values.contains(v.to_string().as_str()),
                "STATS field {field} ({v}) not in\n{text}"
            );
        }
    }

    #[test]
    fn names_follow_the_conventions() {
        let summary = ShardSummary {
            memberships: 4,
            queue: QueueDepth {
                frames: 1,
                bytes: 2,
                max_frames: 3,
                max_bytes: 4,
            },
        };
        let text = render(&snapshot(Some(summary)));
        for line in text.lines() {
            let name = line
                .strip_prefix("# TYPE ")
                .or_else(|| line.strip_prefix("# HELP "))
                .unwrap_or(line)
                .split(['{', ' '])
                .next()
                .unwrap_or("");
            assert!(name.starts_with("msgc_"), "{line}");
            if line.starts_with("# TYPE ") && line.ends_with(" counter") {
                assert!(name.ends_with("_total"), "{line}");
            }
        }
        for want in [
            "msgc_deliveries_total{shard=\"0\"} ",
            "msgc_dropped_messages_total{shard=\"0\",reason=\"left\"} ",
            "msgc_received_bytes_total{shard=\"0\"} ",
            "msgc_peer_auth_failures_total{shard=\"0\"} ",
            "msgc_outbound_queue_max_frames{shard=\"0\"} 3\n",
            "msgc_memberships{shard=\"0\"} 4\n",
            "msgc_shard_up{shard=\"0\"} 1\n",
            "msgc_peer_up{peer=\"n2\"} 1\n",
            "msgc_peer_dropped_messages_total{peer=\"n2\",reason=\"other\"} 4\n",
            "msgc_process_resident_memory_bytes 4096\n",
            "msgc_uptime_seconds 1.5\n",
            "msgc_groups 3\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }

    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let summary = ShardSummary::default();
        let text = render(&snapshot(Some(summary)));
        let exported: HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let dashboard = include_str!("../../deploy/grafana-msgc.json");
        let mut used = 0;
        for (at, _) in dashboard.match_indices("msgc_") {
            let name: String = dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(name.as_str()),
                "the dashboard uses {name}, which /metrics lacks"
            );
            used += 1;
        }
        assert!(used > 10, "the dashboard's queries were found");
    }
}
