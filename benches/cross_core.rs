//! The machine, not msgc: how long one cache line takes to go from the
//! first core to the second and back (two threads pinned to the first two
//! cores, passing a counter back and forth). A shard hands every message
//! for a member on another shard across cores, so this bounds what the
//! cross-shard path can do. On the 2-vCPU reference machine it switches
//! between ~50–130 ns and ~360–430 ns as the host moves the vCPUs, and
//! msgc's 1→1 rate halves at the slow level (tuning.md, "Why rows jump
//! between runs"): measure it before trusting a benchmark run.

use criterion::{criterion_group, criterion_main, Criterion};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One round trip per iteration: this thread writes an odd number, the
/// other answers with the next even one.
fn round_trips(n: u64, first: core_affinity::CoreId, second: core_affinity::CoreId) -> Duration {
    #[repr(align(64))]
    struct Line(AtomicU64);
    let line = Arc::new(Line(AtomicU64::new(0)));
    let other = line.clone();
    let answerer = std::thread::spawn(move || {
        core_affinity::set_for_current(second);
        for i in 0..n {
            while other.0.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            other.0.store(2 * i + 2, Ordering::Release);
        }
    });
    core_affinity::set_for_current(first);
    let start = Instant::now();
    for i in 0..n {
        line.0.store(2 * i + 1, Ordering::Release);
        while line.0.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
    }
    let elapsed = start.elapsed();
    let _ = answerer.join();
    elapsed
}

fn cross_core(c: &mut Criterion) {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let [first, second, ..] = cores[..] else {
        eprintln!("cross_core: skipped, fewer than two cores to pin to");
        return;
    };
    c.bench_function("cross_core/round_trip", |b| {
        b.iter_custom(|n| round_trips(n, first, second))
    });
}

criterion_group!(benches, cross_core);
criterion_main!(benches);
