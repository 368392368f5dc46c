//! A writer's queue and its `writev`s: what a frame costs from the push to
//! the kernel, for a frame shared by reference (its own allocation, one
//! iovec each) and for one copied into the queue's open chunk
//! (`Outbound::push_copy`: no allocation, the chunk one iovec). The
//! socket is a real Unix stream drained by another thread, so the kernel's
//! cost per iovec is in the figure.
//!
//! - `shared/N`: each frame allocated and shared, as a frame for many
//!   members is;
//! - `copied/N`: each frame copied into the open chunk.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use msgc::protocol::{FrameType, GroupMessage};
use msgc::server::flow::Budget;
use msgc::server::io::Stream;
use msgc::server::outbound::{write_loop, Outbound};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A blocking Unix stream as a writer's socket: one `writev` per call.
struct Sock(UnixStream);

impl Stream for Sock {
    async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        (Ok(0), buf)
    }
    async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let r = (&self.0).write_vectored(&slices);
        drop(slices);
        (r, bufs)
    }
    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Queues `n` frames like `frame` (copied or shared), then lets the writer
/// send them all; returns the time from the first push to the last byte
/// taken by the kernel.
fn run(n: u64, frame: &[u8], copy: bool) -> Duration {
    let (a, mut b) = UnixStream::pair().expect("socket pair");
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while matches!(b.read(&mut buf), Ok(k) if k > 0) {}
    });
    let budget = Budget {
        frames: usize::MAX,
        bytes: usize::MAX,
        stuck_after: Duration::from_secs(60),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let sock = Sock(a);
    let now = Instant::now();
    let out = Outbound::new(now, budget);
    let start = Instant::now();
    rt.block_on(async {
        // Bursts of a read's worth of frames, the writer woken after each
        // (as a reader wakes the writers it filled at the end of its read).
        let produce = async {
            let mut left = n;
            while left > 0 {
                let burst = left.min(1024);
                for _ in 0..burst {
                    if copy {
                        out.push_copy(frame, now, None);
                    } else {
                        out.push_quiet(Bytes::copy_from_slice(frame), now, None);
                    }
                }
                left -= burst;
                out.wake();
                tokio::task::yield_now().await;
            }
            out.drain_with(None);
        };
        tokio::join!(write_loop(&out, &sock, |_| {}), produce);
    });
    let elapsed = start.elapsed();
    drop(sock);
    let _ = drain.join();
    elapsed
}

fn write_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_path");
    g.throughput(Throughput::Elements(1));
    for size in [16usize, 256] {
        let payload = vec![0x5au8; size];
        let frame = GroupMessage {
            ty: FrameType::DELIVER_SEQ,
            group: b"orders.eu-west",
            sender: b"node1/0.42.kz3d",
            seq: Some(1),
            payload: &payload,
        }
        .encode();
        for (name, copy) in [("shared", false), ("copied", true)] {
            let f = frame.clone();
            g.bench_function(format!("{name}/{size}"), move |b| {
                b.iter_custom(|n| run(n, &f, copy))
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
    targets = write_path
}
criterion_main!(benches);
