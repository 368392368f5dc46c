//! The `memory` scenario: what a server's memory costs, in bytes, as the
//! server itself reports it (`memory.rss_bytes` in its STATS reply, read
//! through the observer's control client, so spawned and given servers are
//! measured alike). Three phases against the first server, each skippable:
//!
//! 1. `memberships`: one raw client joins N groups, one JOIN per round trip
//!    (it waits for each acknowledgement); RSS before and after gives the
//!    bytes per membership. Then it leaves them all.
//! 2. `idle_connections`: K raw clients, each joined to a group of its own,
//!    idle; the bytes per idle connection. Then they all close.
//! 3. `burst`: K raw clients each send one large PUBLISH to a group nobody
//!    is in, then close: the peak, and whether RSS comes back to idle.
//!
//! Owns the phases and their JSON; `report` prints the table. Only the
//! first server is read: in a cluster, what peers spend is not counted.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use msgc::protocol::{encode_publish, GroupName};
use serde_json::{json, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::cli::Common;
use crate::observe::Observer;
use crate::scenarios::{group_names, Report, Target};
use crate::wire::{self, WireConn};

/// Groups joined (and left) before the first reading, so that what a
/// first join allocates once is not charged to the memberships measured.
const WARMUP_GROUPS: usize = 100;
/// RSS has settled when two readings this far apart…
const SETTLE_EVERY: Duration = Duration::from_millis(100);
/// …differ by at most this many percent…
const SETTLE_PERCENT: u64 = 1;
/// …or when this much time has passed (the last reading is taken).
const SETTLE_LIMIT: Duration = Duration::from_secs(3);
/// The server returns freed memory to the kernel about once a second:
/// after freeing, a reading waits this long first.
const TRIM_WAIT: Duration = Duration::from_millis(1200);
/// LEAVEs in flight at once (their events must be read as they come, or
/// the server's queue to us fills).
const LEAVE_WINDOW: usize = 1000;
/// Connections being opened at once.
const OPEN_PARALLEL: usize = 64;
/// How long one connection may take to send its burst message.
const SEND_LIMIT: Duration = Duration::from_secs(30);
/// Polling interval while waiting for a counter (and sampling the peak).
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How long the server may take to notice closed connections.
const CLOSE_LIMIT: Duration = Duration::from_secs(15);
/// How long RSS may take to come back after a burst.
const RETURN_LIMIT: Duration = Duration::from_secs(10);
/// RSS is back after a burst within this factor of the idle RSS.
const RETURN_FACTOR: f64 = 1.1;
/// Open files besides the K connections (runtime, observer, stdio…).
const FD_SLACK: libc::rlim_t = 128;
/// How long closing connections' keepalive tasks may take to finish.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// The sizes of a run (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Memberships of phase 1 (0: skipped).
    pub groups: usize,
    /// Connections of phases 2 and 3 (0: both skipped).
    pub conns: usize,
    /// Payload of a burst message (0: phase 3 skipped).
    pub burst_size: usize,
}

impl Sizes {
    /// The sizes from `--groups`, `--conns` and `--burst-size`.
    pub fn new(groups: usize, conns: usize, burst_size: usize) -> Self {
        Self {
            groups,
            conns,
            burst_size,
        }
    }
}

/// Checks the scenario's options before anything is started.
///
/// # Errors
/// A one-line description of the first problem.
pub fn validate(c: &Common, s: &Sizes) -> Result<()> {
    if s.groups == 0 && s.conns == 0 {
        bail!("--groups 0 and --conns 0: nothing to measure");
    }
    if s.burst_size > 64 << 20 {
        bail!("--burst-size {}: at most 64 MiB", s.burst_size);
    }
    if c.hgrm.is_some() || c.plot.is_some() {
        bail!("--hgrm and --plot write latencies: the memory scenario measures none");
    }
    Ok(())
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit
/// (before `--spawn`, so that the spawned server inherits it) and checks
/// that `conns` connections fit, and `extra` more; `option` names the
/// option that asked for them (`conns` for `--conns`), for the error.
///
/// # Errors
/// When the limit stays too low.
pub fn raise_fd_limit(option: &str, conns: usize, extra: usize) -> Result<()> {
    let need = libc::rlim_t::try_from(conns.saturating_add(extra))
        .unwrap_or(libc::rlim_t::MAX)
        .saturating_add(FD_SLACK);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes to a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads a valid pointer to a local struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    if lim.rlim_cur < need {
        bail!(
            "--{option} {conns} needs about {need} open files, and the limit is {} (hard limit {}): \
             raise it (ulimit -Hn, limits.conf) or use fewer --{option}",
            lim.rlim_cur,
            lim.rlim_max
        );
    }
    Ok(())
}

/// Runs the phases against the first server and reports them.
///
/// # Errors
/// When the server does not report its RSS, or a phase cannot complete.
pub async fn run(c: &Common, t: &Target, s: &Sizes) -> Result<Report> {
    let first = t.obs.stats(0).await?;
    read(&first, &t.obs.addrs[0])?;
    if s.conns > 0 && s.burst_size > 0 {
        check_burst_size(&t.servers[0], s.burst_size).await?;
    }
    let say = |msg: &str| {
        if !(c.json || c.quiet) {
            eprintln!("memory: {msg}");
        }
    };
    let memberships = match s.groups {
        0 => Value::Null,
        n => {
            say(&format!("joining {n} groups, one JOIN per round trip…"));
            memberships(t, n).await.context("phase memberships")?
        }
    };
    let idle = match s.conns {
        0 => Value::Null,
        k => {
            say(&format!("opening {k} idle connections…"));
            idle_connections(t, k)
                .await
                .context("phase idle_connections")?
        }
    };
    let burst = match (s.conns, s.burst_size) {
        (0, _) | (_, 0) => Value::Null,
        (k, size) => {
            say(&format!("burst: {k} connections × {size} B…"));
            burst(t, k, size).await.context("phase burst")?
        }
    };
    let json = json!({
        "scenario": "memory",
        "parameters": params(c, t, s),
        "io_backend": first["io_backend"],
        "shards": first["shards"],
        "memberships": memberships,
        "idle_connections": idle,
        "burst": burst,
    });
    Ok(Report {
        json,
        hists: Vec::new(),
    })
}

fn params(c: &Common, t: &Target, s: &Sizes) -> Value {
    json!({
        "groups": s.groups,
        "conns": s.conns,
        "burst_size": s.burst_size,
        "warmup_groups": WARMUP_GROUPS,
        "measured_server": t.servers[0],
        "servers": t.servers,
        "spawned": t.spawned,
        "set": c.set,
    })
}

/// The figures of one STATS reply that this scenario reads.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// `memory.rss_bytes`.
    rss: u64,
    /// `totals.connections`: open now.
    connections: u64,
    /// `totals.unrouted`: publishes to groups without members.
    unrouted: u64,
    /// `groups`: groups with members now.
    groups: u64,
}

fn read(stats: &Value, addr: &str) -> Result<Reading> {
    let rss = stats["memory"]["rss_bytes"].as_u64().ok_or_else(|| {
        anyhow!(
            "{addr} reports no memory.rss_bytes in its stats (a server without memory figures?)"
        )
    })?;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    Ok(Reading {
        rss,
        connections: n(&stats["totals"]["connections"]),
        unrouted: n(&stats["totals"]["unrouted"]),
        groups: n(&stats["groups"]),
    })
}

/// The first server's figures now.
async fn reading(obs: &Observer) -> Result<Reading> {
    read(&obs.stats(0).await?, &obs.addrs[0])
}

/// A reading once RSS has stopped moving (two readings [`SETTLE_EVERY`]
/// apart within [`SETTLE_PERCENT`]), or the last one after
/// [`SETTLE_LIMIT`].
async fn settled(obs: &Observer) -> Result<Reading> {
    let end = Instant::now() + SETTLE_LIMIT;
    let mut last = reading(obs).await?;
    loop {
        tokio::time::sleep(SETTLE_EVERY).await;
        let now = reading(obs).await?;
        if now.rss.abs_diff(last.rss) * 100 <= last.rss * SETTLE_PERCENT || Instant::now() >= end {
            return Ok(now);
        }
        last = now;
    }
}

/// [`settled`], after giving the server a turn to return what was freed.
async fn settled_after_free(obs: &Observer) -> Result<Reading> {
    tokio::time::sleep(TRIM_WAIT).await;
    settled(obs).await
}

/// `(after - before) / n`, signed: memory that went down says so.
fn per_unit(before: u64, after: u64, n: usize) -> i64 {
    let diff = i128::from(after) - i128::from(before);
    i64::try_from(diff / n.max(1) as i128).unwrap_or(i64::MAX)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Phase 1: N memberships of one client, joined one by one, then left.
async fn memberships(t: &Target, n: usize) -> Result<Value> {
    let mut conn = wire::connect(&t.servers[0], None).await?;
    let warm = group_names(WARMUP_GROUPS);
    join_one_by_one(&mut conn, &warm).await?;
    let groups = group_names(n);
    let before = settled(&t.obs).await?;
    let start = Instant::now();
    join_one_by_one(&mut conn, &groups).await?;
    let join_s = start.elapsed().as_secs_f64();
    let after = settled(&t.obs).await?;
    for window in warm.chunks(LEAVE_WINDOW).chain(groups.chunks(LEAVE_WINDOW)) {
        conn.leave_all(window).await?;
    }
    let left = settled_after_free(&t.obs).await?;
    drop(conn);
    Ok(json!({
        "groups": n,
        "rss_before_bytes": before.rss,
        "rss_after_bytes": after.rss,
        "bytes_per_membership": per_unit(before.rss, after.rss, n),
        "rss_after_leave_bytes": left.rss,
        "server_groups": [before.groups, after.groups, left.groups],
        "join_s": round2(join_s),
        "joins_per_sec": round2(n as f64 / join_s.max(1e-9)),
    }))
}

/// One JOIN per round trip: each waits for its acknowledgement (bounded).
async fn join_one_by_one(conn: &mut WireConn, groups: &[GroupName]) -> Result<()> {
    for g in groups {
        conn.join_all(std::slice::from_ref(g))
            .await
            .with_context(|| format!("join {g}"))?;
    }
    Ok(())
}

/// Runs `open(i)` for every `i < n`, [`OPEN_PARALLEL`] at a time, and
/// collects what they return (in completion order). Each `open` bounds its
/// own waits.
async fn open_many<T, F, Fut>(n: usize, open: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    let mut next = 0;
    while out.len() < n {
        while next < n && set.len() < OPEN_PARALLEL {
            set.spawn(open(next));
            next += 1;
        }
        let Some(done) = set.join_next().await else {
            bail!("connections ended early");
        };
        out.push(done.context("a connection task failed")??);
    }
    Ok(out)
}

/// Open idle connections: their read halves, and the keepalive tasks that
/// own their write halves (they end when `stop` is dropped).
struct Idle {
    reads: Vec<OwnedReadHalf>,
    writers: Vec<JoinHandle<OwnedWriteHalf>>,
    stop: watch::Sender<bool>,
}

impl Idle {
    /// Closes every connection; waits (bounded) for the keepalive tasks.
    async fn close(self) {
        drop(self.stop);
        drop(self.reads);
        let writers = self.writers;
        let _ = tokio::time::timeout(STOP_LIMIT, async {
            for w in writers {
                let _ = w.await;
            }
        })
        .await;
    }
}

/// Connects, joins `group` (acknowledged) and keeps the connection alive
/// (NOOPs well within the server's idle timeout) until `stop` changes.
async fn open_idle(
    addr: String,
    group: GroupName,
    stop: watch::Receiver<bool>,
) -> Result<(OwnedReadHalf, JoinHandle<OwnedWriteHalf>)> {
    let mut conn = wire::connect(&addr, None).await?;
    conn.join_all(std::slice::from_ref(&group)).await?;
    let keep = tokio::spawn(wire::keepalive(conn.wr, conn.idle, stop));
    Ok((conn.rd, keep))
}

/// Phase 2: K idle connections, each joined to a group of its own.
async fn idle_connections(t: &Target, k: usize) -> Result<Value> {
    let before = settled_after_free(&t.obs).await?;
    let groups = group_names(k);
    let (stop, stop_rx) = watch::channel(false);
    let addr = &t.servers[0];
    let start = Instant::now();
    let opened = open_many(k, |i| {
        open_idle(addr.clone(), groups[i].clone(), stop_rx.clone())
    })
    .await?;
    let open_s = start.elapsed().as_secs_f64();
    let (reads, writers) = opened.into_iter().unzip();
    let idle = Idle {
        reads,
        writers,
        stop,
    };
    let after = settled(&t.obs).await?;
    idle.close().await;
    let back = wait_connections(&t.obs, before.connections).await?;
    let closed = settled_after_free(&t.obs).await?;
    Ok(json!({
        "connections": k,
        "rss_before_bytes": before.rss,
        "rss_after_bytes": after.rss,
        "bytes_per_idle_connection": per_unit(before.rss, after.rss, k),
        "rss_after_close_bytes": closed.rss,
        "server_connections": [before.connections, after.connections, closed.connections],
        "connections_closed": back.is_some(),
        "open_s": round2(open_s),
    }))
}

/// Waits (at most [`CLOSE_LIMIT`]) until the server counts at most `want`
/// open connections; the time it took, or None if it did not.
async fn wait_connections(obs: &Observer, want: u64) -> Result<Option<Duration>> {
    let start = Instant::now();
    loop {
        if reading(obs).await?.connections <= want {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() > CLOSE_LIMIT {
            return Ok(None);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The highest RSS seen.
#[derive(Default)]
struct Peak(AtomicU64);

impl Peak {
    fn see(&self, r: &Reading) {
        self.0.fetch_max(r.rss, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Samples RSS into `peak` every [`POLL_EVERY`] until `done` is set.
async fn sample_peak(obs: &Observer, peak: &Peak, done: &AtomicBool) -> Result<()> {
    while !done.load(Ordering::Acquire) {
        peak.see(&reading(obs).await?);
        tokio::time::sleep(POLL_EVERY).await;
    }
    Ok(())
}

/// Fails (before any phase runs) when the server would refuse a burst
/// message: its WELCOME announces the largest payload it takes.
async fn check_burst_size(addr: &str, size: usize) -> Result<()> {
    let conn = wire::connect(addr, None).await?;
    if size > conn.max_message {
        bail!(
            "--burst-size {size} exceeds {addr}'s max_message_size {} (--set max_message_size=…)",
            conn.max_message
        );
    }
    Ok(())
}

/// Connects and sends `frame`, one PUBLISH of `size` payload bytes.
async fn open_burst(addr: String, frame: Bytes, size: usize) -> Result<WireConn> {
    let mut conn = wire::connect(&addr, None).await?;
    tokio::time::timeout(SEND_LIMIT, conn.wr.write_all(&frame))
        .await
        .map_err(|_| anyhow!("{addr} did not take a {size} B message within {SEND_LIMIT:?}"))??;
    conn.pending = BytesMut::new();
    Ok(conn)
}

/// Phase 3: K connections each send one `size`-byte PUBLISH to a group
/// nobody is in, then close; the peak and what RSS comes back to.
async fn burst(t: &Target, k: usize, size: usize) -> Result<Value> {
    let idle = settled_after_free(&t.obs).await?;
    let mut frame = BytesMut::with_capacity(size + 300);
    encode_publish(&mut frame, &group_names(1)[0], &vec![b'x'; size]);
    let frame = frame.freeze();
    let peak = Peak::default();
    peak.see(&idle);
    let done = AtomicBool::new(false);
    let addr = &t.servers[0];
    let start = Instant::now();
    let (conns, sampled) = tokio::join!(
        async {
            let r = open_many(k, |_| open_burst(addr.clone(), frame.clone(), size)).await;
            done.store(true, Ordering::Release);
            r
        },
        sample_peak(&t.obs, &peak, &done)
    );
    let conns = conns?;
    sampled?;
    let read_all = wait_unrouted(&t.obs, idle.unrouted, k, &peak).await?;
    let read_s = start.elapsed().as_secs_f64();
    drop(conns);
    let closed = wait_connections(&t.obs, idle.connections).await?;
    let (after, back) = wait_return(&t.obs, idle.rss).await?;
    Ok(json!({
        "connections": k,
        "size": size,
        "rss_idle_bytes": idle.rss,
        "rss_peak_bytes": peak.get(),
        "rss_all_read_bytes": read_all.rss,
        "rss_after_bytes": after.rss,
        "after_over_idle": round2(after.rss as f64 / idle.rss.max(1) as f64),
        "peak_over_idle": round2(peak.get() as f64 / idle.rss.max(1) as f64),
        "read_s": round2(read_s),
        "connections_closed": closed.is_some(),
        "close_s": closed.map(|d| round2(d.as_secs_f64())),
        "return_factor": RETURN_FACTOR,
        "return_limit_s": RETURN_LIMIT.as_secs_f64(),
        "returned": back.is_some(),
        "return_s": back.map(|d| round2(d.as_secs_f64())),
        "server_connections": [idle.connections, read_all.connections, after.connections],
    }))
}

/// Waits until the server's unrouted count has grown from `base` by `k`
/// (every burst message read), sampling the peak; bounded by a time that
/// grows with the burst.
async fn wait_unrouted(obs: &Observer, base: u64, k: usize, peak: &Peak) -> Result<Reading> {
    let limit = Duration::from_secs(30) + Duration::from_millis(k as u64);
    let end = Instant::now() + limit;
    loop {
        let r = reading(obs).await?;
        peak.see(&r);
        let counted = r.unrouted.saturating_sub(base);
        if counted >= k as u64 {
            return Ok(r);
        }
        if Instant::now() > end {
            bail!(
                "the server counted {counted} of {k} burst messages as unrouted after \
                 {limit:?} ({} connections open)",
                r.connections
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Waits (at most [`RETURN_LIMIT`]) until RSS is within [`RETURN_FACTOR`]
/// of `idle`; the last reading, and how long it took if it got there.
async fn wait_return(obs: &Observer, idle: u64) -> Result<(Reading, Option<Duration>)> {
    let start = Instant::now();
    loop {
        let r = reading(obs).await?;
        if r.rss as f64 <= idle as f64 * RETURN_FACTOR {
            return Ok((r, Some(start.elapsed())));
        }
        if start.elapsed() > RETURN_LIMIT {
            return Ok((r, None));
        }
        tokio::time::sleep(SETTLE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_unit_is_signed() {
        assert_eq!(per_unit(1000, 5000, 10), 400);
        assert_eq!(per_unit(5000, 1000, 10), -400);
        assert_eq!(per_unit(1000, 5000, 0), 4000);
    }

    #[test]
    fn reading_needs_rss() {
        let s = json!({"groups": 3, "totals": {"connections": 2, "unrouted": 5},
            "memory": {"rss_bytes": 4096}});
        let r = read(&s, "a:1").unwrap();
        assert_eq!(
            (r.rss, r.connections, r.unrouted, r.groups),
            (4096, 2, 5, 3)
        );
        let err = read(&json!({"groups": 3}), "a:1").unwrap_err().to_string();
        assert!(err.contains("memory.rss_bytes"), "{err}");
    }
}
