//! Codec throughput by payload size: encoding a PUBLISH (what a client
//! writes), a DELIVER (what the server builds once per publish) and
//! decoding a DELIVER (what a client reads). Sans-IO: no sockets.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use msgc::protocol::{
    decode, encode_group_message, encode_publish, max_frame_for, FrameType, GroupName, MemberId,
};
use std::time::Duration;

const SIZES: [usize; 4] = [16, 256, 4096, 65536];

fn names() -> (GroupName, MemberId) {
    (
        GroupName::from_str_checked("orders.eu-west").expect("valid group"),
        MemberId::from_str_checked("node1/0.42").expect("valid member"),
    )
}

fn encode(c: &mut Criterion) {
    let (group, member) = names();
    let mut g = c.benchmark_group("codec/encode");
    for size in SIZES {
        let payload = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("publish/{size}"), |b| {
            let mut buf = BytesMut::with_capacity(size + 64);
            b.iter(|| {
                buf.clear();
                encode_publish(&mut buf, &group, black_box(&payload));
                black_box(buf.len())
            })
        });
        g.bench_function(format!("deliver/{size}"), |b| {
            b.iter(|| {
                encode_group_message(FrameType::DELIVER, &group, &member, black_box(&payload))
            })
        });
    }
    g.finish();
}

fn decode_deliver(c: &mut Criterion) {
    let (group, member) = names();
    let mut g = c.benchmark_group("codec/decode");
    for size in SIZES {
        let frame: Bytes =
            encode_group_message(FrameType::DELIVER, &group, &member, &vec![0x5au8; size]);
        let max = max_frame_for(1 << 20);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("deliver/{size}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&frame[..]),
                |buf| decode(buf, max).expect("valid frame"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = encode, decode_deliver
}
criterion_main!(benches);
