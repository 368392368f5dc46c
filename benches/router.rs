//! The routing index on the publish path: `GroupTable::with` (papaya,
//! lock-free reads) over 10,000 groups, idle and while another thread
//! joins and leaves as fast as it can; next to it the obvious alternative,
//! `std::sync::RwLock<HashMap>`, under the same writer, so the choice is
//! measured rather than assumed. Also papaya's resize mode: a resize
//! left half-done by the last insert slows every later read.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use msgc::protocol::{GroupName, MemberId};
use msgc::router::{GroupEntry, GroupTable};

/// What the baselines store per group: just the shard mask the publish
/// path reads.
type Mask = Arc<AtomicU64>;

fn mask(m: &Mask) -> u64 {
    m.load(Ordering::Acquire)
}
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

const GROUPS: usize = 10_000;
/// Look-ups per iteration (one pass over a shuffled slice of the groups).
const LOOKUPS: usize = 1000;

fn group(i: usize) -> GroupName {
    GroupName::from_str_checked(&format!("group.{i}")).expect("valid group")
}

fn member(i: usize) -> MemberId {
    MemberId::from_str_checked(&format!("node1/0.{i}")).expect("valid member")
}

/// Group names to look up, in a scattered (not sequential) order.
fn probes() -> Vec<GroupName> {
    (0..LOOKUPS).map(|i| group((i * 7919) % GROUPS)).collect()
}

/// The baseline: one lock around a std map.
type LockedMap = RwLock<HashMap<GroupName, Mask>>;

/// A thread that churns memberships until stopped; counts its changes.
struct Churn {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Churn {
    fn start(mut op: impl FnMut(usize) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ops.clone());
        let handle = std::thread::spawn(move || {
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                op(i);
                i = i.wrapping_add(1);
                o.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            stop,
            ops,
            handle: Some(handle),
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        eprintln!(
            "  (writer thread made {} membership changes)",
            self.ops.load(Ordering::Relaxed)
        );
    }
}

fn papaya_table() -> Arc<GroupTable> {
    let t = Arc::new(GroupTable::new());
    for i in 0..GROUPS {
        t.join_local(group(i).as_bytes(), &member(i), i % 2);
    }
    t
}

fn locked_map() -> Arc<LockedMap> {
    let m: HashMap<GroupName, Mask> = (0..GROUPS).map(|i| (group(i), Mask::default())).collect();
    Arc::new(RwLock::new(m))
}

fn lookups(c: &mut Criterion) {
    let probes = probes();
    let mut g = c.benchmark_group("router/lookup_10k_groups");
    g.throughput(Throughput::Elements(LOOKUPS as u64));

    let table = papaya_table();
    let papaya = |b: &mut criterion::Bencher<'_>, t: &GroupTable| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in &probes {
                acc ^= t.with(p.as_bytes(), |e| e.map_or(0, GroupEntry::shard_mask));
            }
            black_box(acc)
        })
    };
    g.bench_function("papaya/idle", |b| papaya(b, &table));
    {
        // Joins and leaves on the same 10k groups (a second member comes and
        // goes), plus groups created and removed outright.
        let t = table.clone();
        let _churn = Churn::start(move |i| {
            let (gr, m) = (group(i % GROUPS), member(GROUPS + i % GROUPS));
            if let Some((g, _)) = t.join_local(gr.as_bytes(), &m, 1) {
                t.leave_local(&g, &m, Some(1));
            }
            let fresh = group(GROUPS + i % 64);
            if let Some((g, _)) = t.join_local(fresh.as_bytes(), &m, 0) {
                t.leave_local(&g, &m, Some(0));
            }
        });
        g.bench_function("papaya/with_writer", |b| papaya(b, &table));
    }
    // The same table once the writer's inserts have finished the resize
    // that the initial 10k joins left in progress (papaya's default
    // incremental resize: readers search both tables until writers finish
    // moving entries).
    g.bench_function("papaya/idle_after_writes", |b| papaya(b, &table));

    // A plain papaya map with blocking resizes: what GroupTable would get
    // with `ResizeMode::Blocking` (keys change rarely next to reads).
    let blocking: papaya::HashMap<GroupName, Mask> = papaya::HashMap::builder()
        .resize_mode(papaya::ResizeMode::Blocking)
        .build();
    for i in 0..GROUPS {
        blocking.pin().insert(group(i), Mask::default());
    }
    g.bench_function("papaya_blocking_resize/idle", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in &probes {
                acc ^= blocking.pin().get(p).map_or(0, mask);
            }
            black_box(acc)
        })
    });

    let map = locked_map();
    let locked = |b: &mut criterion::Bencher<'_>, m: &LockedMap| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in &probes {
                let guard = m.read().unwrap_or_else(|e| e.into_inner());
                acc ^= guard.get(p).map_or(0, mask);
            }
            black_box(acc)
        })
    };
    g.bench_function("rwlock_hashmap/idle", |b| locked(b, &map));
    {
        // The same writes, each under the write lock: a member of an
        // existing group comes and goes (the member list lives under the
        // map's lock), and a fresh group is created and removed.
        let m = map.clone();
        let _churn = Churn::start(move |i| {
            let existing = group(i % GROUPS);
            for _ in 0..2 {
                let w = m.write().unwrap_or_else(|e| e.into_inner());
                black_box(w.get(&existing).map(mask));
            }
            let fresh = group(GROUPS + i % 64);
            m.write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(fresh.clone(), Mask::default());
            m.write().unwrap_or_else(|e| e.into_inner()).remove(&fresh);
        });
        g.bench_function("rwlock_hashmap/with_writer", |b| locked(b, &map));
    }
    g.finish();
}

/// What numbering publishes adds to each: the route lookup alone, and the
/// route lookup with the publisher's counter for the group (the same probe
/// groups, one publisher numbering all of them).
fn numbering(c: &mut Criterion) {
    let probes = probes();
    let table = papaya_table();
    let seqs = msgc::server::seqs::PubSeqs::default();
    let mut g = c.benchmark_group("router/publish_route_10k_groups");
    g.throughput(Throughput::Elements(LOOKUPS as u64));
    g.bench_function("route", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in &probes {
                acc ^= table.with_group(p.as_bytes(), |e| e.map_or(0, |e| e.shard_mask()));
            }
            black_box(acc)
        })
    });
    g.bench_function("route_and_number", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in &probes {
                acc ^= table.with_group(p.as_bytes(), |e| {
                    e.map_or(0, |e| e.shard_mask() ^ seqs.next(e, || Some(e.clone())))
                });
            }
            black_box(acc)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = lookups, numbering
}
criterion_main!(benches);
