//! Publishers: one OS thread each, driving an msgc [`Client`] (the
//! client's writer task, on the runtime, coalesces what we queue into one
//! write per batch).
//!
//! - Closed loop: batches as fast as the window allows: a publisher never
//!   has more than `window` messages in flight to any healthy subscriber
//!   connection (published, not yet read), so it cannot run unboundedly
//!   ahead and nobody is killed as stuck for our eagerness.
//! - Open loop: message `i` is due at `t0 + (i + phase) / rate` and carries
//!   that intended time as its stamp, so a late send counts against the
//!   latency (coordinated omission corrected). The thread sleeps with 1 ns
//!   timer slack instead of tokio's 1 ms timer.

use bytes::{BufMut, BytesMut};
use hdrhistogram::Histogram;
use msgc::client::{Client, ClientError};
use msgc::protocol::GroupName;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::{new_hist, ns_of, thread_cpu_secs};
use crate::sub::Progress;
use crate::wire::{write_header, SEQ_BITS};

/// Most messages in one batch, and most bytes.
const MAX_BATCH: usize = 64;
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// How often a closed-loop publisher waiting for its window looks again.
const WINDOW_POLL: Duration = Duration::from_micros(100);
/// How long past the window's end a closed-loop publisher may wait.
const WINDOW_GRACE: Duration = Duration::from_secs(5);

/// Routing facts every publisher shares.
#[derive(Clone)]
pub struct Routes {
    pub groups: Vec<GroupName>,
    /// Subscriber connections in each group (impaired ones included).
    pub conns: Vec<Vec<u32>>,
    /// Per connection: reads normally.
    pub healthy: Vec<bool>,
}

/// One publisher.
pub struct PubSpec {
    pub idx: usize,
    pub client: Client,
    pub routes: Arc<Routes>,
    pub progress: Arc<Vec<Progress>>,
    pub size: usize,
    /// Open loop: this publisher's messages per second.
    pub rate: Option<f64>,
    /// Offset of this publisher's schedule, in messages (0..1).
    pub phase: f64,
    /// Open loop: shortest sleep between batches.
    pub tick: Duration,
    /// Closed loop: in-flight messages per subscriber connection.
    pub window: u64,
    pub t0: Instant,
    /// The measured window (ns since the epoch) and its end as an instant.
    pub m0: u64,
    pub m1: u64,
    pub end: Instant,
    pub handle: tokio::runtime::Handle,
    /// Messages queued so far by every publisher (progress display).
    pub sent_counter: Arc<AtomicU64>,
}

/// What a publisher did.
#[derive(Default)]
pub struct PubResult {
    /// Messages stamped inside the window.
    pub sent: u64,
    /// Messages of the whole run (warm-up included).
    pub sent_total: u64,
    /// Deliveries the window's messages owe, all subscribers / healthy ones.
    pub expected: u64,
    pub healthy_expected: u64,
    /// Messages owed to each subscriber connection over the whole run.
    pub expected_conn: Vec<u64>,
    /// Times the closed loop waited for the window.
    pub window_waits: u64,
    /// The closed loop gave up waiting for the window.
    pub truncated: bool,
    /// Open loop: how late batches were sent (ns).
    pub lag: Option<Histogram<u64>>,
    pub cpu_s: f64,
    pub error: Option<String>,
}

/// Runs publisher `spec` on a thread of its own.
pub fn spawn(spec: PubSpec) -> std::io::Result<std::thread::JoinHandle<PubResult>> {
    std::thread::Builder::new()
        .name(format!("publisher-{}", spec.idx))
        .spawn(move || {
            // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
            let mut p = Publisher::new(&spec);
            let cpu0 = thread_cpu_secs();
            sleep_until(spec.t0);
            if let Err(e) = p.run(&spec) {
                p.res.error = Some(e.to_string());
            }
            p.res.cpu_s = thread_cpu_secs() - cpu0;
            p.res
        })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

struct Publisher {
    res: PubResult,
    /// Healthy connections this publisher reaches (the window's concern).
    watched: Vec<u32>,
    fan_all: Vec<u64>,
    fan_healthy: Vec<u64>,
    template: Vec<u8>,
    buf: BytesMut,
    next: u64,
}

impl Publisher {
    fn new(spec: &PubSpec) -> Self {
        let r = &spec.routes;
        let mut watched: Vec<u32> = r
            .conns
            .iter()
            .flatten()
            .copied()
            .filter(|&c| r.healthy[c as usize])
            .collect();
        watched.sort_unstable();
        watched.dedup();
        let template: Vec<u8> = (0..spec.size).map(|i| b'a' + (i % 26) as u8).collect();
        Self {
            res: PubResult {
                expected_conn: vec![0; r.healthy.len()],
                lag: spec.rate.map(|_| new_hist()),
                ..PubResult::default()
            },
            watched,
            fan_all: r.conns.iter().map(|c| c.len() as u64).collect(),
            fan_healthy: r
                .conns
                .iter()
                .map(|c| c.iter().filter(|&&i| r.healthy[i as usize]).count() as u64)
                .collect(),
            template,
            buf: BytesMut::new(),
            next: 0,
        }
    }

    fn batch_cap(spec: &PubSpec) -> usize {
        let by_window = usize::try_from(spec.window / 4)
            .unwrap_or(usize::MAX)
            .max(1);
        MAX_BATCH
            .min(by_window)
            .min((MAX_BATCH_BYTES / spec.size).max(1))
    }

    fn run(&mut self, spec: &PubSpec) -> Result<(), ClientError> {
        match spec.rate {
            Some(rate) => self.open_loop(spec, rate),
            None => self.closed_loop(spec),
        }
    }

    fn closed_loop(&mut self, spec: &PubSpec) -> Result<(), ClientError> {
        let cap = Self::batch_cap(spec);
        let hard_end = spec.end + WINDOW_GRACE;
        let mut stamps = Vec::with_capacity(cap);
        loop {
            let mut now = Instant::now();
            if now >= spec.end {
                return Ok(());
            }
            if self.max_lag(spec) + cap as u64 > spec.window {
                // Full: wait until half the window is free, so that waits
                // (each a sleep and a wake-up) stay rare.
                self.res.window_waits += 1;
                let resume = (spec.window / 2).max(cap as u64);
                while self.max_lag(spec) + cap as u64 > resume {
                    std::thread::sleep(WINDOW_POLL);
                    now = Instant::now();
                    if now >= hard_end {
                        self.res.truncated = true;
                        return Ok(());
                    }
                }
            }
            let ts = ns_of(now);
            stamps.clear();
            stamps.resize(cap, ts);
            self.send(spec, &stamps)?;
        }
    }

    /// Most messages in flight to one watched connection.
    fn max_lag(&self, spec: &PubSpec) -> u64 {
        self.watched
            .iter()
            .map(|&c| {
                let got = spec.progress[c as usize].per_pub[spec.idx].load(Relaxed);
                self.res.expected_conn[c as usize].saturating_sub(got)
            })
            .max()
            .unwrap_or(0)
    }

    fn open_loop(&mut self, spec: &PubSpec, rate: f64) -> Result<(), ClientError> {
        let cap = (MAX_BATCH_BYTES / spec.size).clamp(1, 4 * MAX_BATCH);
        let due = |i: u64| spec.t0 + Duration::from_secs_f64((i as f64 + spec.phase) / rate);
        let mut stamps = Vec::with_capacity(cap);
        loop {
            let first = due(self.next);
            if first >= spec.end {
                return Ok(());
            }
            let now = Instant::now();
            if first > now {
                std::thread::sleep((first - now).max(spec.tick));
                continue;
            }
            stamps.clear();
            let mut i = self.next;
            while stamps.len() < cap {
                let d = due(i);
                if d > now || d >= spec.end {
                    break;
                }
                stamps.push(ns_of(d));
                i += 1;
            }
            if let Some(h) = self.res.lag.as_mut() {
                h.saturating_record(ns_of(now).saturating_sub(stamps[0]).max(1));
            }
            self.send(spec, &stamps)?;
        }
    }

    /// Publishes one message per stamp, cycling over the groups.
    fn send(&mut self, spec: &PubSpec, stamps: &[u64]) -> Result<(), ClientError> {
        let r = &spec.routes;
        let ng = r.groups.len() as u64;
        self.buf.clear();
        self.buf.reserve(stamps.len() * spec.size);
        for &ts in stamps {
            let i = self.next;
            self.next += 1;
            let g = ((spec.idx as u64 + i) % ng) as usize;
            let at = self.buf.len();
            self.buf.put_slice(&self.template);
            write_header(&mut self.buf[at..], ts, ((spec.idx as u64) << SEQ_BITS) | i);
            for &c in &r.conns[g] {
                self.res.expected_conn[c as usize] += 1;
            }
            self.res.sent_total += 1;
            if ts >= spec.m0 && ts < spec.m1 {
                self.res.sent += 1;
                self.res.expected += self.fan_all[g];
                self.res.healthy_expected += self.fan_healthy[g];
            }
        }
        spec.sent_counter.fetch_add(stamps.len() as u64, Relaxed);
        let bytes = self.buf.split().freeze();
        if ng == 1 {
            return spec.handle.block_on(
                spec.client
                    .publish_batch(&r.groups[0], bytes.chunks(spec.size)),
            );
        }
        let first = self.next - stamps.len() as u64;
        for (k, i) in (first..self.next).enumerate() {
            let g = &r.groups[((spec.idx as u64 + i) % ng) as usize];
            let payload = bytes.slice(k * spec.size..(k + 1) * spec.size);
            match spec.client.try_publish(g, payload.clone()) {
                Ok(()) => {}
                Err(ClientError::QueueFull(_)) => {
                    spec.handle.block_on(spec.client.publish(g, payload))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
