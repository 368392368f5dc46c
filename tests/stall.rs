//! A stopped shard's cost: its own test binary (one test, one process), so
//! that the resident size it reads is the in-process server's alone and no
//! other test's allocations blur it.

#[path = "it/flowkit.rs"]
mod flowkit;
#[path = "it/util.rs"]
mod util;

use bytes::BytesMut;
use flowkit::{assert_healthy, client_on, join, num, numbered, start, totals, wait_all, Reader};
use msgc::protocol::{Frame, GroupName};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::WAIT;

fn group(s: &str) -> GroupName {
    GroupName::from_str_checked(s).expect("valid group")
}

/// RSS of this (the test) process, which runs the in-process server.
fn own_rss() -> u64 {
    msgc::server::memory::rss_bytes().expect("RSS of the test process")
}

/// Shard 1 stops for 2.5 s while a publisher on shard 0 floods a group
/// whose member is on shard 1: the inbox of shard 1 stays within its bound
/// (visible in stats), the publisher is slowed, memory does not grow past
/// the bound and a fixed margin, and nothing is lost.
#[test]
fn a_stopped_shard_costs_at_most_its_inbox_bound() {
    const BOUND: u64 = 1 << 20;
    const MARGIN: u64 = 16 << 20;
    let srv = start("epoll", &format!("shard_inbox_bytes = {BOUND}")).expect("epoll runs");
    let g = group("stall");
    // The member on shard 1, the publisher on shard 0.
    let (mut member, _) = client_on(srv.addr, 1);
    join(&mut member, &g);
    let reader = Reader::spawn(member, "member".into());
    let (publisher, _) = client_on(srv.addr, 0);
    let before = own_rss();
    srv.server().stall_shard(1, Duration::from_millis(2500));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = {
        let (g, stop) = (g.clone(), stop.clone());
        let mut raw = publisher;
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let mut buf = BytesMut::new();
            while !stop.load(Ordering::Relaxed) {
                buf.clear();
                for _ in 0..16 {
                    Frame::Publish {
                        group: g.clone(),
                        payload: numbered(sent, 1024),
                    }
                    .encode(&mut buf);
                    sent += 1;
                }
                if raw.s.write_all(&buf).is_err() {
                    break;
                }
            }
            // Kept open until the server has read it all (see `flood`).
            (sent, raw)
        })
    };
    let mut peak_inbox = 0;
    let mut peak_rss = 0;
    let end = Instant::now() + Duration::from_millis(2000);
    while Instant::now() < end {
        let st = srv.stats();
        peak_inbox = peak_inbox.max(num(&st["inboxes"][1]["bytes"]));
        peak_rss = peak_rss.max(own_rss());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, _publisher) = sent.join().expect("publisher");
    wait_all(std::slice::from_ref(&reader), sent, 2 * WAIT);
    assert_healthy(std::slice::from_ref(&reader));
    eprintln!(
        "stalled shard: inbox peak {peak_inbox} B (bound {BOUND}), RSS {before} -> peak {peak_rss}, {sent} messages"
    );
    assert!(peak_inbox > 0, "the inbox depth shows in stats");
    // Past the bound by one batch at most: what the publisher's read
    // routed to shard 1 goes in batches of at most FrameBatch::BYTES (and
    // one frame past it), each one inbox message, and the publisher waits
    // once one has passed the bound.
    use msgc::server::shared::FrameBatch;
    let frame = 1024 + 64;
    let batch = (FrameBatch::BYTES + frame) as u64
        + (FrameBatch::FRAMES * msgc::server::inbox::MSG_OVERHEAD) as u64;
    assert!(
        peak_inbox <= BOUND + batch,
        "inbox {peak_inbox} B over its bound {BOUND} by more than one batch ({batch} B)"
    );
    assert!(
        peak_rss <= before + BOUND + MARGIN,
        "RSS grew by {} B while shard 1 was stopped",
        peak_rss - before
    );
    assert!(totals(&srv, "producer_waits") > 0);
    assert_eq!(srv.stats()["dropped"], 0);
}
