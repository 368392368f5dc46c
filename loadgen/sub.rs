//! Subscriber connections: one task each. Healthy ones read as fast as
//! they can (raw, parsed in place — or through the msgc client with
//! `--sub-client`), slow ones sleep per message, stalled ones never read.
//!
//! Each subscriber records, for messages stamped inside the measured
//! window, the latency from the stamp to the read that brought it, and
//! publishes its per-publisher receive counts for the publishers' window
//! and the drain.

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use msgc::client::{Client, ClientConfig, Event};
use msgc::protocol::GroupName;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::watch;

use crate::clock::{new_hist, ns_of};
use crate::watch_events::Watcher;
use crate::wire::{self, Item, SEQ_BITS};

/// Read buffer of a healthy raw subscriber.
const READ_BUF: usize = 256 * 1024;
/// Read buffer of a slow one (small, so it really reads slowly).
const SLOW_READ_BUF: usize = 4096;

/// How a subscriber behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Reads everything as fast as it can.
    Healthy,
    /// Joins, then never reads.
    Stalled,
    /// Reads, sleeping this long per message.
    Slow(Duration),
}

/// What one subscriber connection is.
#[derive(Clone)]
pub struct SubSpec {
    pub addr: String,
    pub groups: Vec<GroupName>,
    pub behaviour: Behaviour,
    /// SO_RCVBUF for its socket, if set.
    pub rcvbuf: Option<usize>,
    /// Sees membership events for the churn scenario.
    pub watcher: Option<Arc<Watcher>>,
    /// Use the msgc client library instead of the raw reader.
    pub client_lib: bool,
}

/// Receive counts of one subscriber connection, read by the publishers
/// (window) and the drain. Written only by its subscriber.
#[repr(align(64))]
pub struct Progress {
    /// Messages received from each publisher (whole run).
    pub per_pub: Box<[AtomicU64]>,
    /// Sum of `per_pub`.
    pub total: AtomicU64,
}

impl Progress {
    pub fn new(publishers: usize) -> Self {
        Self {
            per_pub: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
        }
    }
}

/// The measured window, in ns since the epoch; `u64::MAX` until set.
pub struct Window {
    pub m0: AtomicU64,
    pub m1: AtomicU64,
}

impl Window {
    pub fn unset() -> Self {
        Self {
            m0: AtomicU64::new(u64::MAX),
            m1: AtomicU64::new(u64::MAX),
        }
    }
}

/// What every subscriber shares.
#[derive(Clone)]
pub struct SubCtx {
    pub progress: Arc<Vec<Progress>>,
    pub window: Arc<Window>,
    pub stop: watch::Receiver<bool>,
}

/// What a subscriber measured.
pub struct SubResult {
    pub behaviour: Behaviour,
    /// Latency (ns) of messages stamped inside the window.
    pub hist: Histogram<u64>,
    /// Messages stamped inside the window that arrived.
    pub delivered: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Messages from one publisher that arrived with a sequence number not
    /// above the previous one (reordered or duplicated).
    pub out_of_order: u64,
    /// Why it ended early, if it did.
    pub error: Option<String>,
}

/// Per-message accounting shared by the raw and the client reader.
struct Tally {
    res: SubResult,
    per_pub: Vec<u64>,
    /// Last sequence number + 1 per publisher (0: none yet).
    last: Vec<u64>,
    total: u64,
    idx: usize,
}

impl Tally {
    fn new(idx: usize, behaviour: Behaviour, publishers: usize) -> Self {
        Self {
            res: SubResult {
                behaviour,
                hist: new_hist(),
                delivered: 0,
                bytes: 0,
                out_of_order: 0,
                error: None,
            },
            per_pub: vec![0; publishers],
            last: vec![0; publishers],
            total: 0,
            idx,
        }
    }

    #[inline]
    fn message(&mut self, payload: &[u8], now_ns: u64, m0: u64, m1: u64) {
        let Some((ts, seq)) = wire::read_header(payload) else {
            return;
        };
        let p = (seq >> SEQ_BITS) as usize;
        let n = seq & ((1 << SEQ_BITS) - 1);
        let Some(count) = self.per_pub.get_mut(p) else {
            return; // not ours
        };
        *count += 1;
        self.total += 1;
        if n < self.last[p] {
            self.res.out_of_order += 1;
        }
        self.last[p] = n + 1;
        if ts >= m0 && ts < m1 {
            self.res.delivered += 1;
            self.res.bytes += payload.len() as u64;
            self.res
                .hist
                .saturating_record(now_ns.saturating_sub(ts).max(1));
        }
    }

    fn publish(&self, progress: &[Progress]) {
        let mine = &progress[self.idx];
        for (slot, &v) in mine.per_pub.iter().zip(&self.per_pub) {
            slot.store(v, Relaxed);
        }
        mine.total.store(self.total, Relaxed);
    }
}

/// Connects, joins, reports readiness on `ready`, then reads until stop.
pub async fn run(
    idx: usize,
    spec: SubSpec,
    ctx: SubCtx,
    ready: tokio::sync::mpsc::Sender<Result<()>>,
) -> SubResult {
    let publishers = ctx.progress[idx].per_pub.len();
    let mut tally = Tally::new(idx, spec.behaviour, publishers);
    if spec.client_lib && spec.behaviour == Behaviour::Healthy {
        client_sub(&spec, &ctx, &mut tally, ready).await;
        return tally.res;
    }
    let setup = async {
        let mut c = wire::connect(&spec.addr, spec.rcvbuf).await?;
        c.join_all(&spec.groups).await?;
        anyhow::Ok(c)
    }
    .await;
    let conn = match setup {
        Ok(c) => c,
        Err(e) => {
            tally.res.error = Some(format!("{e:#}"));
            let _ = ready.send(Err(e)).await;
            return tally.res;
        }
    };
    let _ = ready.send(Ok(())).await;
    let ka = tokio::spawn(wire::keepalive(conn.wr, conn.idle, ctx.stop.clone()));
    let mut stop = ctx.stop.clone();
    match spec.behaviour {
        Behaviour::Stalled => {
            let _ = stop.wait_for(|s| *s).await;
        }
        Behaviour::Healthy | Behaviour::Slow(_) => {
            let slow = match spec.behaviour {
                Behaviour::Slow(d) => Some(d),
                _ => None,
            };
            let r = read_loop(conn.rd, &conn.pending, &ctx, &mut tally, slow, spec.watcher).await;
            if let Err(e) = r {
                tally.res.error = Some(e);
            }
        }
    }
    let _ = ka.await;
    tally.res
}

/// The raw reader: frames parsed in place from one large buffer.
async fn read_loop(
    mut rd: OwnedReadHalf,
    leftover: &[u8],
    ctx: &SubCtx,
    tally: &mut Tally,
    slow: Option<Duration>,
    watcher: Option<Arc<Watcher>>,
) -> Result<(), String> {
    let size = if slow.is_some() {
        SLOW_READ_BUF
    } else {
        READ_BUF
    };
    let mut buf = vec![0u8; size.max(leftover.len() * 2)];
    buf[..leftover.len()].copy_from_slice(leftover);
    let (mut start, mut end) = (0usize, leftover.len());
    let mut stop = ctx.stop.clone();
    loop {
        let now = Instant::now();
        let now_ns = ns_of(now);
        let m0 = ctx.window.m0.load(Relaxed);
        let m1 = ctx.window.m1.load(Relaxed);
        let mut parsed = 0u32;
        while let Some((n, item)) = wire::next_frame(&buf[start..end])? {
            match item {
                Item::Deliver(p) => {
                    tally.message(p, now_ns, m0, m1);
                    parsed += 1;
                }
                Item::Membership(reason, subject) => {
                    if let Some(w) = &watcher {
                        w.on_event(reason, subject, now);
                    }
                }
                Item::Error(code, msg) => {
                    tally.publish(&ctx.progress);
                    return Err(format!(
                        "server error {code}: {}",
                        String::from_utf8_lossy(msg)
                    ));
                }
                Item::Other => {}
            }
            start += n;
        }
        if parsed > 0 {
            tally.publish(&ctx.progress);
            if let Some(d) = slow {
                tokio::time::sleep(d * parsed).await;
            }
        }
        compact(&mut buf, &mut start, &mut end, size);
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Ok(()),
            r = rd.read(&mut buf[end..]) => match r {
                Ok(0) => return Err("connection closed by the server".into()),
                Ok(n) => end += n,
                Err(e) => return Err(format!("read failed: {e}")),
            },
        }
    }
}

/// Moves the undecoded tail to the front; grows the buffer when a frame
/// does not fit.
fn compact(buf: &mut Vec<u8>, start: &mut usize, end: &mut usize, min_room: usize) {
    if *start == *end {
        (*start, *end) = (0, 0);
        return;
    }
    if buf.len() - *end < min_room.min(16 * 1024) {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
        if *end == buf.len() {
            let grown = buf.len() * 2;
            buf.resize(grown, 0);
        }
    }
}

/// A subscriber through the msgc client library: `join`, then `events()`.
async fn client_sub(
    spec: &SubSpec,
    ctx: &SubCtx,
    tally: &mut Tally,
    ready: tokio::sync::mpsc::Sender<Result<()>>,
) {
    let setup = async {
        let c = Client::connect(ClientConfig::with_servers([spec.addr.clone()]))
            .await
            .map_err(|e| anyhow!("{}: {e}", spec.addr))?;
        for g in &spec.groups {
            c.join(g).await.map_err(|e| anyhow!("join {g}: {e}"))?;
        }
        anyhow::Ok(c)
    }
    .await;
    let client = match setup {
        Ok(c) => c,
        Err(e) => {
            tally.res.error = Some(format!("{e:#}"));
            let _ = ready.send(Err(e)).await;
            return;
        }
    };
    let _ = ready.send(Ok(())).await;
    let events = client.events();
    let mut stop = ctx.stop.clone();
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            ev = events.recv_async() => ev,
        };
        let Ok(first) = first else {
            tally.res.error = Some("event stream ended".into());
            break;
        };
        // Everything already queued is taken without awaiting, stamped
        // with one clock read (as the raw reader does per read).
        let now = Instant::now();
        let m0 = ctx.window.m0.load(Relaxed);
        let m1 = ctx.window.m1.load(Relaxed);
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(ev) = next.take() {
            if let Err(e) = client_event(ev, now, m0, m1, tally, spec) {
                tally.res.error = Some(e);
                tally.publish(&ctx.progress);
                let _ = client.close().await;
                return;
            }
            taken += 1;
            if taken < 1024 {
                next = events.try_recv().ok();
            }
        }
        tally.publish(&ctx.progress);
    }
    tally.publish(&ctx.progress);
    let _ = client.close().await;
}

/// One event for a `--sub-client` subscriber; `Err` ends it.
fn client_event(
    ev: Event,
    now: Instant,
    m0: u64,
    m1: u64,
    tally: &mut Tally,
    spec: &SubSpec,
) -> Result<(), String> {
    match ev {
        Event::Message { payload, .. } => tally.message(&payload, ns_of(now), m0, m1),
        Event::Membership {
            subject, reason, ..
        } => {
            if let Some(w) = &spec.watcher {
                w.on_event(reason as u8, subject.as_bytes(), now);
            }
        }
        Event::Disconnected { reason, .. } => return Err(format!("disconnected: {reason}")),
        _ => {}
    }
    Ok(())
}
