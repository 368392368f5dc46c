//! The hand-off of group messages from one shard's thread to another's:
//! what a publish costs when its members are on the other shard. Two
//! threads, a flume channel (as between shard inboxes), batches of up to
//! `FrameBatch::FRAMES` frames. The consumer owns each frame until it has
//! been "written" (dropped after being queued), as a writer does.
//!
//! - `per_frame`: each frame its own allocation, shared by reference (the
//!   code before `FrameBatch`): allocated on the producer, freed on the
//!   consumer.
//! - `packed`: `FrameBatch` (small frames packed, copied on arrival into
//!   the writer's open chunk, as `Outbound::push_copy` does; larger ones
//!   shared), a new batch each time (freed by the consumer).
//! - `recycled`: the same, with each emptied batch given back to the
//!   producer for its next (`SparePool`, as the shards do).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use msgc::protocol::{FrameType, GroupMessage};
use msgc::server::shard::Framed;
use msgc::server::shared::{FrameBatch, SparePool};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZES: [usize; 3] = [16, 256, 4096];

fn message(payload: &[u8]) -> GroupMessage<'_> {
    GroupMessage {
        ty: FrameType::DELIVER_SEQ,
        group: b"orders.eu-west",
        sender: b"node1/0.42.kz3d",
        seq: Some(1),
        payload,
    }
}

/// Hands `n` frames of `payload` from this thread to another, in batches
/// built by `pack` and taken apart by `unpack`; returns the elapsed time.
fn run<B: Send + 'static>(
    n: u64,
    payload: &[u8],
    mut pack: impl FnMut(&mut Option<B>, &GroupMessage<'_>) -> bool,
    unpack: impl Fn(B, &mut VecDeque<Bytes>) + Send + 'static,
) -> Duration {
    let (tx, rx) = flume::bounded::<B>(64);
    let consumer = std::thread::spawn(move || {
        let mut queue = VecDeque::with_capacity(FrameBatch::FRAMES);
        for batch in rx.iter() {
            unpack(batch, &mut queue);
            // The writer: everything queued goes out, then is freed.
            queue.clear();
        }
    });
    let msg = message(payload);
    let start = Instant::now();
    let mut batch = None;
    for _ in 0..n {
        if pack(&mut batch, &msg) {
            if let Some(b) = batch.take() {
                let _ = tx.send(b);
            }
        }
    }
    if let Some(b) = batch.take() {
        let _ = tx.send(b);
    }
    drop(tx);
    let _ = consumer.join();
    start.elapsed()
}

fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff");
    g.throughput(Throughput::Elements(1));
    for size in SIZES {
        let payload = vec![0x5au8; size];
        let p = payload.clone();
        g.bench_function(format!("per_frame/{size}"), move |b| {
            b.iter_custom(|n| {
                run(
                    n,
                    &p,
                    |batch: &mut Option<Vec<(Bytes, Option<u64>)>>, msg| {
                        let v = batch.get_or_insert_with(Vec::new);
                        v.push((msg.encode(), Some(1)));
                        // The same bounds as a FrameBatch.
                        v.len() >= FrameBatch::FRAMES || v.len() * msg.len() >= FrameBatch::BYTES
                    },
                    |v, queue| queue.extend(v.into_iter().map(|(f, _)| f)),
                )
            })
        });
        for recycle in [false, true] {
            let name = if recycle { "recycled" } else { "packed" };
            let payload = payload.clone();
            g.bench_function(format!("{name}/{size}"), move |b| {
                b.iter_custom(|n| {
                    let pool = Arc::new(SparePool::new(1));
                    let back = pool.clone();
                    run(
                        n,
                        &payload,
                        |batch: &mut Option<FrameBatch>, msg| {
                            let fb = batch.get_or_insert_with(|| {
                                if recycle {
                                    pool.take(0)
                                } else {
                                    FrameBatch::default()
                                }
                            });
                            if msg.len() > FrameBatch::PACK_MAX {
                                fb.push_shared(msg.encode(), Some(1));
                            } else {
                                fb.push_packed(msg, Some(1));
                            }
                            fb.full()
                        },
                        move |mut fb, queue| {
                            let mut open = BytesMut::new();
                            fb.for_each_frame(|f, _| match f {
                                Framed::Shared(b) => {
                                    if !open.is_empty() {
                                        queue.push_back(open.split().freeze());
                                    }
                                    queue.push_back(b);
                                }
                                Framed::Slice(s) => open.extend_from_slice(s),
                                Framed::Message(m) => queue.push_back(m.encode()),
                            });
                            if !open.is_empty() {
                                queue.push_back(open.freeze());
                            }
                            if recycle {
                                back.give_back(fb);
                            }
                        },
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = handoff
}
criterion_main!(benches);
