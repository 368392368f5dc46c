//! Memory is a figure: what a membership, an idle connection and a burst
//! cost a server process, read from /proc (VmRSS) of a real `msgc-server`.
//! The sizes are smaller than the loadgen's memory scenario (100,000
//! groups, 10,000 connections); the per-unit bounds are the same.

use crate::util::{raise_fd_limit, raw_stats, wait_for, NodeProc, Raw, TempDir, WAIT};
use msgc::protocol::{Events, Frame, GroupName, Reason};
use std::time::Duration;

/// Bytes of server memory one membership may cost (issue target).
const PER_MEMBERSHIP: u64 = 512;
/// Bytes of server memory an idle client joined to one group may cost.
pub(crate) const PER_IDLE_CONNECTION: u64 = 20 * 1024;

fn group(prefix: &str, i: usize) -> GroupName {
    GroupName::from_str_checked(&format!("{prefix}.{i:06}")).expect("valid group")
}

/// Joins `raw` to `n` groups one JOIN per round trip: each JOIN arrives in a
/// read of its own, as from a client that waits for every acknowledgement.
fn join_one_by_one(raw: &mut Raw, prefix: &str, n: usize) {
    for i in 0..n {
        let g = group(prefix, i);
        raw.send(&Frame::Join {
            group: g.clone(),
            events: Events::Each,
        });
        loop {
            match raw.recv() {
                Some(Frame::Membership { group, reason, .. }) if group == g => {
                    assert_eq!(reason, Reason::Join);
                    break;
                }
                Some(Frame::Noop) => {}
                other => panic!("expected the join event of {g}, got {other:?}"),
            }
        }
    }
}

/// RSS once it has stopped moving (two readings 100 ms apart within 1%),
/// bounded in time; the last reading otherwise.
pub(crate) fn settled_rss(node: &NodeProc) -> u64 {
    let mut last = node.rss_bytes();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let now = node.rss_bytes();
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn a_membership_costs_at_most_512_bytes() {
    const N: usize = 20_000;
    let dir = TempDir::new("mem-join");
    let node = NodeProc::solo(&dir, "127.0.0.11", "");
    let mut raw = Raw::client(node.addr);
    join_one_by_one(&mut raw, "warm", 100);
    let before = settled_rss(&node);
    join_one_by_one(&mut raw, "g", N);
    let after = settled_rss(&node);
    let per = after.saturating_sub(before) / N as u64;
    eprintln!("memory: {N} memberships, RSS {before} -> {after} bytes: {per} bytes each");
    assert!(
        per <= PER_MEMBERSHIP,
        "a membership costs {per} bytes of server RSS (bound {PER_MEMBERSHIP})"
    );
    assert_eq!(raw_stats(node.addr)["groups"], (N + 100) as u64);
}

#[test]
fn an_idle_client_costs_under_20_kib() {
    const N: usize = 2_000;
    raise_fd_limit(2 * N as u64 + 200);
    let dir = TempDir::new("mem-idle");
    let node = NodeProc::solo(&dir, "127.0.0.12", "");
    let before = settled_rss(&node);
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let mut raw = Raw::client(node.addr);
        let g = group("own", i);
        raw.send(&Frame::Join {
            group: g.clone(),
            events: Events::Each,
        });
        match raw.recv() {
            Some(Frame::Membership { group, .. }) => assert_eq!(group, g),
            other => panic!("expected the join event, got {other:?}"),
        }
        clients.push(raw);
    }
    let after = settled_rss(&node);
    let per = after.saturating_sub(before) / N as u64;
    eprintln!("memory: {N} idle clients, RSS {before} -> {after} bytes: {per} bytes each");
    assert!(
        per < PER_IDLE_CONNECTION,
        "an idle client joined to one group costs {per} bytes (bound {PER_IDLE_CONNECTION})"
    );
    assert_eq!(raw_stats(node.addr)["groups"], N as u64);
}

#[test]
fn memory_of_a_burst_is_given_back() {
    const N: usize = 2_000;
    const SIZE: usize = 60_000;
    raise_fd_limit(2 * N as u64 + 200);
    let dir = TempDir::new("mem-burst");
    let node = NodeProc::solo(&dir, "127.0.0.13", "");
    let idle = settled_rss(&node);
    // Every client sends one 60 KB message, all connected at once.
    let payload = bytes::Bytes::from(vec![b'x'; SIZE]);
    let g = group("nobody", 0);
    let mut clients: Vec<Raw> = (0..N)
        .map(|_| {
            let mut raw = Raw::client(node.addr);
            raw.send(&Frame::Publish {
                group: g.clone(),
                payload: payload.clone(),
            });
            raw
        })
        .collect();
    wait_for("every 60 KB message to be read", WAIT, || {
        raw_stats(node.addr)["totals"]["unrouted"] == N as u64
    });
    let peak = node.rss_bytes();
    for c in clients.iter_mut() {
        let _ = c.s.shutdown(std::net::Shutdown::Both);
    }
    drop(clients);
    wait_for("the clients' connections to close", WAIT, || {
        raw_stats(node.addr)["totals"]["connections"] == 1
    });
    let mut now = node.rss_bytes();
    wait_for("RSS within 2x of the idle size", WAIT, || {
        now = node.rss_bytes();
        now <= 2 * idle
    });
    eprintln!("memory: idle {idle}, after {N} x {SIZE} B {peak}, after they left {now}");
}
