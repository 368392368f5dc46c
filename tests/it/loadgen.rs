//! msgc-loadgen scenarios against spawned servers: each scenario runs for
//! a second (`--spawn 1`, `cluster` on `--spawn 3`) through the built
//! binary with `--json`, and its figures are checked for consistency. The
//! memory scenario runs small phases and its figures are checked for sanity;
//! the storm scenario runs 300 members on two nodes, each of which must be
//! told exactly the joins after its own.
//!
//! The runs take turns (one lock): they load the machine on purpose, and
//! the backlog run needs healthy subscribers to keep up.

use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::util::TempDir;

/// One load generator at a time.
static TURN: Mutex<()> = Mutex::new(());
/// A run that takes longer than this is killed (and fails the test).
const RUN_LIMIT: Duration = Duration::from_secs(45);
/// The memory scenario's limit: its waits for RSS to settle and come back
/// add up to more than a traffic run.
const MEMORY_RUN_LIMIT: Duration = Duration::from_secs(90);

/// Runs `msgc-loadgen ARGS --json --quiet` (1 s measured, 200 ms warm-up)
/// and returns its exit status, stdout and stderr.
fn loadgen(args: &[&str]) -> (bool, String, String) {
    loadgen_within(args, RUN_LIMIT)
}

/// [`loadgen`], killed after `limit`.
fn loadgen_within(args: &[&str], limit: Duration) -> (bool, String, String) {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_msgc-loadgen"))
        .args(args)
        .args(["--duration", "1s", "--warmup", "200ms", "--json", "--quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start msgc-loadgen");
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for msgc-loadgen") {
            break st;
        }
        if Instant::now() > end {
            // Its servers die with it (PR_SET_PDEATHSIG).
            let _ = child.kill();
            let _ = child.wait();
            panic!("msgc-loadgen {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out).expect("read stdout");
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).expect("read stderr");
    }
    (status.success(), out, err)
}

/// Runs a traffic scenario that must succeed; returns its JSON object.
fn run_json(args: &[&str]) -> Value {
    let j = run_ok(args, RUN_LIMIT);
    check_fields(&j);
    j
}

/// Runs a scenario that must succeed within `limit`; returns its JSON
/// object (the only line on stdout).
fn run_ok(args: &[&str], limit: Duration) -> Value {
    let (ok, out, err) = loadgen_within(args, limit);
    assert!(ok, "msgc-loadgen {args:?} failed: {err}");
    assert_eq!(out.lines().count(), 1, "one JSON line on stdout: {out}");
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("stdout of {args:?} is not JSON ({e}): {out}"))
}

fn u(j: &Value, k: &str) -> u64 {
    j[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a count in {j}"))
}

/// Every run reports these.
fn check_fields(j: &Value) {
    for k in [
        "scenario",
        "parameters",
        "sent",
        "delivered",
        "delivered_per_sec",
        "bytes_per_sec",
        "latency_us",
        "drops",
        "stuck_kills",
        "server_rss_bytes",
    ] {
        assert!(j.get(k).is_some(), "{k} missing from {j}");
    }
    for k in ["p50", "p90", "p99", "p99_9", "p99_99", "max"] {
        assert!(
            j["latency_us"][k].is_number(),
            "latency_us.{k} missing from {j}"
        );
    }
    assert!(
        j["server_rss_bytes"].as_u64().is_some_and(|b| b > 0),
        "spawned servers' peak memory is known: {j}"
    );
}

/// delivered ≤ sent × recipients per message, equal when nothing dropped.
fn check_counts(j: &Value) {
    let (sent, delivered) = (u(j, "sent"), u(j, "delivered"));
    let per_message = j["parameters"]["subscribers"]
        .as_u64()
        .expect("subscribers");
    assert!(sent > 0 && delivered > 0, "no traffic: {j}");
    assert!(
        delivered <= sent * per_message,
        "more delivered than sent: {j}"
    );
    if u(j, "drops") == 0 {
        assert_eq!(
            delivered,
            sent * per_message,
            "nothing dropped, nothing lost: {j}"
        );
        assert_eq!(u(j, "out_of_order"), 0, "order per sender: {j}");
    }
}

#[test]
fn fanout_counts_every_delivery_and_writes_hgrm_and_plot() {
    let dir = TempDir::new("loadgen");
    let hgrm = dir.0.join("lat.hgrm");
    let svg = dir.0.join("lat.svg");
    let j = run_json(&[
        "fanout",
        "--spawn",
        "1",
        "--subscribers",
        "5",
        "--hgrm",
        hgrm.to_str().expect("utf-8 path"),
        "--plot",
        svg.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(j["scenario"], "fanout");
    check_counts(&j);
    let text = std::fs::read_to_string(&hgrm).expect("hgrm written");
    assert!(
        text.contains("Value     Percentile TotalCount 1/(1-Percentile)"),
        "{text}"
    );
    assert!(text.contains("#[Max     ="), "{text}");
    let plot = std::fs::read_to_string(&svg).expect("plot written");
    assert!(plot.contains("<svg"), "not an SVG");
}

#[test]
fn fanin_open_loop() {
    let j = run_json(&[
        "fanin",
        "--spawn",
        "1",
        "--publishers",
        "3",
        "--rate",
        "6000",
    ]);
    assert_eq!(j["parameters"]["publishers"], 3);
    check_counts(&j);
    assert!(
        j["send_lag_us"].is_object(),
        "open loop reports send lag: {j}"
    );
}

#[test]
fn groups_over_shared_connections() {
    let j = run_json(&[
        "groups",
        "--spawn",
        "1",
        "--groups",
        "200",
        "--sub-conns",
        "10",
    ]);
    assert_eq!(j["parameters"]["sub_conns"], 10);
    check_counts(&j);
}

#[test]
fn cluster_delivers_across_nodes() {
    let j = run_json(&["cluster", "--spawn", "3", "--subscribers", "4"]);
    assert_eq!(j["parameters"]["servers"].as_array().map(Vec::len), Some(3));
    check_counts(&j);
}

#[test]
fn backlog_kills_the_stalled_subscriber_and_spares_the_healthy() {
    let j = run_json(&[
        "backlog",
        "--spawn",
        "1",
        "--shards",
        "1",
        "--set",
        "max_backlog=50",
        // A healthy subscriber kept off a loaded machine's CPUs a moment
        // is not taken for stuck (the default is 0.2 s).
        "--set",
        "stuck_timeout=1",
        "--set",
        "tcpbuf_size=4096",
        "--size",
        "1024",
        "--subscribers",
        "4",
        "--stalled",
        "1",
        "--stalled-rcvbuf",
        "4096",
        "--rate",
        "500",
    ]);
    assert!(
        u(&j, "stuck_kills") >= 1,
        "the stalled subscriber is killed: {j}"
    );
    assert!(u(&j, "drops") >= 1, "what it held is counted: {j}");
    assert_eq!(
        j["healthy_complete"], true,
        "healthy subscribers lose nothing: {j}"
    );
    assert_eq!(u(&j, "healthy_delivered"), u(&j, "sent") * 3, "{j}");
    assert!(
        j["baseline"]["latency_us"]["p99"].is_number(),
        "baseline ran: {j}"
    );
}

#[test]
fn churn_reports_joins_and_event_latency() {
    let j = run_json(&[
        "churn",
        "--spawn",
        "1",
        "--subscribers",
        "3",
        "--members",
        "5",
        "--join-rate",
        "200",
        "--rate",
        "5000",
    ]);
    check_counts(&j);
    assert!(j["joins_per_sec"].as_f64().is_some_and(|r| r > 50.0), "{j}");
    assert!(j["join_event_latency_us"]["p99"].is_number(), "{j}");
}

#[test]
fn memory_reports_what_memberships_connections_and_a_burst_cost() {
    let j = run_ok(
        &[
            "memory",
            "--spawn",
            "1",
            "--groups",
            "2000",
            "--conns",
            "200",
            "--burst-size",
            "60000",
        ],
        MEMORY_RUN_LIMIT,
    );
    assert_eq!(j["scenario"], "memory");
    let bytes = |phase: &str, k: &str| {
        j[phase][k]
            .as_i64()
            .unwrap_or_else(|| panic!("{phase}.{k} is not a number of bytes in {j}"))
    };
    let per_membership = bytes("memberships", "bytes_per_membership");
    assert!(
        (1..4096).contains(&per_membership),
        "bytes per membership: {j}"
    );
    assert_eq!(j["memberships"]["server_groups"][1], 2000 + 100, "{j}");
    let per_connection = bytes("idle_connections", "bytes_per_idle_connection");
    assert!(
        (1..65536).contains(&per_connection),
        "bytes per idle connection: {j}"
    );
    let idle = bytes("burst", "rss_idle_bytes");
    assert!(idle > 0, "{j}");
    assert!(bytes("burst", "rss_peak_bytes") >= idle, "{j}");
    assert!(bytes("burst", "rss_after_bytes") > 0, "{j}");
    assert!(j["burst"]["after_over_idle"].as_f64().is_some(), "{j}");
}

/// A storm's phase (`join` or `leave`): every member told exactly what it
/// is owed, no member or link cut; its server figures.
fn check_storm_phase<'a>(j: &'a Value, phase: &str) -> &'a Value {
    let p = &j[phase];
    assert_eq!(p["complete"], true, "{phase} complete: {j}");
    assert_eq!(
        u(p, "mismatches"),
        0,
        "{phase}: told the wrong changes: {j}"
    );
    assert_eq!(u(p, "failed"), 0, "{phase}: {j}");
    let s = &p["server"];
    assert_eq!(u(s, "stuck_kills"), 0, "{phase}: nobody is stuck: {j}");
    assert_eq!(u(s, "reconnects"), 0, "{phase}: no link re-dialled: {j}");
    assert_eq!(
        (u(s, "links"), u(s, "links_up")),
        (2, 2),
        "{phase}: both ends of the link up: {j}"
    );
    assert!(
        s["cpu_s"].as_f64().is_some(),
        "spawned servers' CPU time is known: {j}"
    );
    s
}

#[test]
fn storm_members_are_told_exactly_the_joins_after_their_own() {
    let j = run_ok(
        &["storm", "--spawn", "2", "--clients", "300", "--leave"],
        RUN_LIMIT,
    );
    assert_eq!(j["scenario"], "storm");
    assert_eq!(j["parameters"]["events"], "batched");
    let s = check_storm_phase(&j, "join");
    assert_eq!(u(&j["join"], "joins_told"), u(&j["join"], "joins_owed"));
    assert!(u(&j["join"], "joins_told") > 0, "{j}");
    assert_eq!(u(s, "membership_frames"), 300, "acknowledgements: {j}");
    let batches = u(s, "membership_batches");
    assert!(
        batches > 0 && batches < 300 * 299 / 2,
        "changes to others come coalesced: {j}"
    );
    assert_eq!(u(s, "frames"), 300 + batches, "{j}");
    let s = check_storm_phase(&j, "leave");
    assert_eq!(
        u(&j["leave"], "departures_told"),
        2 * 300,
        "each witness told of every departure: {j}"
    );
    assert!(u(s, "membership_batches") > 0, "{j}");
}

#[test]
fn a_quiet_storm_costs_one_frame_per_join() {
    let j = run_ok(
        &[
            "storm",
            "--spawn",
            "2",
            "--clients",
            "300",
            "--events",
            "none",
        ],
        RUN_LIMIT,
    );
    assert_eq!(j["parameters"]["events"], "none");
    let s = check_storm_phase(&j, "join");
    assert_eq!(u(&j["join"], "joins_told"), 0, "{j}");
    assert_eq!(
        (u(s, "membership_frames"), u(s, "membership_batches")),
        (300, 0),
        "one acknowledgement per join, nothing else: {j}"
    );
    assert!(j["leave"].is_null(), "no --leave: {j}");
}

#[test]
fn bad_options_are_one_line_errors() {
    for args in [
        &["fanout", "--spawn", "1", "--size", "8"][..],
        &["cluster", "--spawn", "1"],
        &["fanout", "--spawn", "1", "--set", "max_backlog"],
        &["fanout", "--spawn", "1", "--duration", "soon"],
        &["memory", "--spawn", "1", "--groups", "0", "--conns", "0"],
        &["storm", "--spawn", "1", "--clients", "0"],
        &["storm", "--spawn", "1", "--events", "sometimes"],
    ] {
        let (ok, out, err) = loadgen(args);
        assert!(!ok, "{args:?} must fail");
        assert!(out.is_empty(), "nothing on stdout: {out}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
