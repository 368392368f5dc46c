//! Properties of the wire codec (`msgc::protocol`), and the check that every
//! hex example in PROTOCOL.md is exactly what the encoder produces.
//!
//! - Every frame round-trips through `to_bytes` and `decode`, whole, split
//!   at any point, and back to back.
//! - Arbitrary, forged and mutated input never panics; an accepted frame is
//!   within the limit and re-encodes to the very bytes it came from; an
//!   incomplete buffer is left untouched.
//! - Decoding never allocates more than the frame limit (plus a small
//!   constant) for garbage: a forged element count costs nothing, and a list
//!   grows only with the entries actually decoded. This binary's global
//!   allocator records the largest single allocation made while decoding.

use bytes::{BufMut, Bytes, BytesMut};
use msgc::protocol::{
    decode, features, max_frame_for, snapshot_flags, DecodeError, ErrorCode, Events, Frame,
    FrameType, GroupName, Hello, MemberId, MembershipChange, NodeName, Reason, Role, Welcome,
    AUTH_LEN, PROTOCOL_VERSION,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

// ------------------------------------------------------- allocation counting

/// The system allocator, recording the largest single allocation (or
/// reallocation) made by the current thread while [`largest_allocation`]
/// runs. Thread-local, so tests running in parallel do not disturb it.
struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator may be called while this thread's locals are
    // being torn down. Const-initialised `Cell`s never allocate themselves.
    let _ = MEASURING.try_with(|on| {
        if on.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds the `GlobalAlloc` contract; `note` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's obligations for `alloc` are passed on as they are.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from `System` through this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    MEASURING.with(|m| m.set(true));
    let out = f();
    MEASURING.with(|m| m.set(false));
    (out, LARGEST.with(Cell::get))
}

/// Allowance for the small bookkeeping allocations of a decode (the shared
/// header `BytesMut::split_to` creates, a list's first few slots).
const SLACK: usize = 1024;

/// The frame limit of a default server (max_message_size 1 MiB).
fn limit() -> usize {
    max_frame_for(1 << 20)
}

// ---------------------------------------------------------------- strategies

fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[!-~]{1,12}", 1 => "[!-~]{1,255}"]
}

fn group() -> impl Strategy<Value = GroupName> {
    name_text().prop_map(|s| GroupName::from_str_checked(&s).expect("strategy yields valid names"))
}

fn member() -> impl Strategy<Value = MemberId> {
    name_text().prop_map(|s| MemberId::from_str_checked(&s).expect("strategy yields valid names"))
}

fn node() -> impl Strategy<Value = NodeName> {
    name_text().prop_map(|s| NodeName::from_str_checked(&s).expect("strategy yields valid names"))
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![3 => vec(any::<u8>(), 0..64), 1 => vec(any::<u8>(), 0..4096)].prop_map(Bytes::from)
}

fn reason() -> impl Strategy<Value = Reason> {
    prop_oneof![
        Just(Reason::Join),
        Just(Reason::Leave),
        Just(Reason::Disconnect),
        Just(Reason::NodeDown),
        Just(Reason::NodeLeft),
    ]
}

fn hello() -> impl Strategy<Value = Frame> {
    let role = prop_oneof![Just(Role::Client), Just(Role::Peer)];
    (
        any::<u16>(),
        role,
        proptest::option::of(node()),
        vec(any::<u8>(), 0..64),
        prop_oneof![Just((0, 0)), (any::<u32>(), any::<u32>())],
    )
        .prop_map(|(version, role, name, credentials, (features, max))| {
            Frame::Hello(Hello {
                version,
                role,
                name,
                credentials: Bytes::from(credentials),
                features,
                max_message_size: max,
            })
        })
}

fn welcome() -> impl Strategy<Value = Frame> {
    (
        any::<u16>(),
        node(),
        proptest::option::of(member()),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(version, node, member, max_message_size, idle_timeout_ms, features)| {
                Frame::Welcome(Welcome {
                    version,
                    node,
                    member,
                    max_message_size,
                    idle_timeout_ms,
                    features,
                })
            },
        )
}

/// Frames sent by clients and by the server to clients.
fn client_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello(),
        welcome(),
        Just(Frame::Noop),
        (any::<u16>(), ".{0,100}").prop_map(|(c, message)| Frame::Error {
            code: ErrorCode(c),
            message
        }),
        any::<u64>().prop_map(|token| Frame::Ping { token }),
        any::<u64>().prop_map(|token| Frame::Pong { token }),
        (
            group(),
            prop_oneof![
                Just(Events::Each),
                Just(Events::Batched),
                Just(Events::None)
            ]
        )
            .prop_map(|(group, events)| Frame::Join { group, events }),
        group().prop_map(|group| Frame::Leave { group }),
        (group(), payload()).prop_map(|(group, payload)| Frame::Publish { group, payload }),
        (member(), payload()).prop_map(|(to, payload)| Frame::Send { to, payload }),
        (any::<u32>(), group()).prop_map(|(req, group)| Frame::MembersRequest { req, group }),
        any::<u32>().prop_map(|req| Frame::StatsRequest { req }),
    ]
}

/// Frames sent by the server to clients (continued) and between peers.
fn server_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            group(),
            member(),
            proptest::option::of(any::<u64>()),
            payload()
        )
            .prop_map(|(group, sender, seq, payload)| Frame::Deliver {
                group,
                sender,
                seq,
                payload
            }),
        (member(), payload()).prop_map(|(sender, payload)| Frame::Direct { sender, payload }),
        (group(), name_text(), reason(), any::<u32>()).prop_map(|(group, s, reason, size)| {
            Frame::Membership {
                group,
                subject: Bytes::from(s),
                reason,
                size,
            }
        }),
        (group(), vec((reason(), any::<u32>(), name_text()), 1..30)).prop_map(
            |(group, changes)| Frame::MembershipBatch {
                group,
                changes: changes
                    .into_iter()
                    .map(|(reason, size, s)| MembershipChange {
                        reason,
                        size,
                        subject: Bytes::from(s),
                    })
                    .collect(),
            }
        ),
        (any::<u32>(), any::<bool>(), group(), vec(member(), 0..50)).prop_map(
            |(req, last, group, members)| Frame::MembersReply {
                req,
                last,
                group,
                members
            }
        ),
        (any::<u32>(), payload()).prop_map(|(req, json)| Frame::StatsReply { req, json }),
        (
            0..=snapshot_flags::FIRST | snapshot_flags::LAST,
            vec((group(), member()), 0..50)
        )
            .prop_map(|(flags, entries)| Frame::Snapshot { flags, entries }),
        (group(), member()).prop_map(|(group, member)| Frame::PeerJoin { group, member }),
        (
            group(),
            member(),
            prop_oneof![Just(Reason::Leave), Just(Reason::Disconnect)]
        )
            .prop_map(|(group, member, reason)| Frame::PeerLeave {
                group,
                member,
                reason
            }),
        (
            group(),
            member(),
            proptest::option::of(any::<u64>()),
            payload()
        )
            .prop_map(|(group, sender, seq, payload)| Frame::Forward {
                group,
                sender,
                seq,
                payload
            }),
        (member(), member(), payload()).prop_map(|(to, sender, payload)| Frame::ForwardDirect {
            to,
            sender,
            payload
        }),
        any::<u32>().prop_map(|deadline_ms| Frame::Move { deadline_ms }),
        Just(Frame::NodeLeaving),
        (any::<[u8; AUTH_LEN]>(), any::<[u8; AUTH_LEN]>())
            .prop_map(|(nonce, mac)| Frame::Challenge { nonce, mac }),
        any::<[u8; AUTH_LEN]>().prop_map(|mac| Frame::Proof { mac }),
    ]
}

/// Any frame, every variant with arbitrary valid field values.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![12 => client_frame(), 10 => server_frame()]
}

/// Every frame type this version knows.
const KNOWN_TYPES: [FrameType; 29] = [
    FrameType::HELLO,
    FrameType::WELCOME,
    FrameType::NOOP,
    FrameType::ERROR,
    FrameType::PING,
    FrameType::PONG,
    FrameType::JOIN,
    FrameType::LEAVE,
    FrameType::PUBLISH,
    FrameType::SEND,
    FrameType::MEMBERS_REQUEST,
    FrameType::STATS_REQUEST,
    FrameType::DELIVER,
    FrameType::DELIVER_SEQ,
    FrameType::DIRECT,
    FrameType::MEMBERSHIP,
    FrameType::MEMBERSHIP_BATCH,
    FrameType::MEMBERS_REPLY,
    FrameType::STATS_REPLY,
    FrameType::SNAPSHOT,
    FrameType::PEER_JOIN,
    FrameType::PEER_LEAVE,
    FrameType::FORWARD,
    FrameType::FORWARD_DIRECT,
    FrameType::FORWARD_SEQ,
    FrameType::MOVE,
    FrameType::NODE_LEAVING,
    FrameType::CHALLENGE,
    FrameType::PROOF,
];

fn known_codes() -> BTreeSet<u8> {
    KNOWN_TYPES.iter().map(|t| t.0).collect()
}

/// A frame with a correct length prefix and a known (or any) type byte, but
/// an arbitrary body: gets past the prefix check into the body decoders.
fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop_oneof![4 => proptest::sample::select(known_codes().into_iter().collect::<Vec<_>>()), 1 => any::<u8>()];
    (ty, vec(any::<u8>(), 0..512)).prop_map(|(ty, body)| framed(ty, &body))
}

fn framed(ty: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 1).expect("test bodies are small");
    let mut out = len.to_be_bytes().to_vec();
    out.push(ty);
    out.extend_from_slice(body);
    out
}

/// A valid encoding with a few bytes overwritten, removed or inserted.
fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
    (frame(), vec((any::<Index>(), any::<u8>(), 0..3u8), 1..4)).prop_map(|(frame, edits)| {
        let mut bytes = frame.to_bytes().to_vec();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = byte,
                1 => {
                    bytes.remove(i);
                }
                _ => bytes.insert(i, byte),
            }
        }
        bytes
    })
}

// ------------------------------------------------------------------ checkers

/// Decodes `input` frame after frame until it runs out or fails, checking
/// what every decode promises.
fn decode_all(input: &[u8], limit: usize, bound_allocations: bool) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.clone();
        let (result, largest) = largest_allocation(|| decode(&mut buf, limit));
        if bound_allocations {
            prop_assert!(
                largest <= limit + SLACK,
                "allocated {largest} bytes, limit {limit}"
            );
        }
        match result {
            Ok(None) => {
                prop_assert_eq!(
                    &buf[..],
                    &before[..],
                    "Ok(None) must leave the buffer alone"
                );
                return Ok(());
            }
            Ok(Some(frame)) => {
                let used = before.len() - buf.len();
                prop_assert!(
                    used >= 5 && used - 4 <= limit,
                    "{used} bytes, limit {limit}"
                );
                // The encoding is canonical: an accepted frame re-encodes to its input.
                prop_assert_eq!(&frame.to_bytes()[..], &before[..used]);
            }
            Err(e) => {
                if matches!(e, DecodeError::TooLarge { .. } | DecodeError::ZeroLength) {
                    prop_assert_eq!(&buf[..], &before[..], "a bad prefix must leave the buffer");
                }
                return Ok(());
            }
        }
    }
}

/// The number of list entries a frame holds (for the allocation bound).
fn entries(frame: &Frame) -> usize {
    match frame {
        Frame::MembersReply { members, .. } => members.len(),
        Frame::Snapshot { entries, .. } => entries.len(),
        Frame::MembershipBatch { changes, .. } => changes.len(),
        _ => 0,
    }
}

// ---------------------------------------------------------------- properties

proptest! {
    #[test]
    fn round_trip(frame in frame()) {
        let bytes = frame.to_bytes();
        let mut buf = BytesMut::from(&bytes[..]);
        let (decoded, largest) = largest_allocation(|| decode(&mut buf, limit()));
        prop_assert_eq!(decoded, Ok(Some(frame.clone())));
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
        // A list needs 32 or 64 bytes of memory per entry; nothing else grows.
        let bound = bytes.len().max(2 * 64 * entries(&frame)) + SLACK;
        prop_assert!(largest <= bound, "allocated {largest}, bound {bound}");
    }

    #[test]
    fn round_trip_at_exactly_the_limit(frame in frame()) {
        let bytes = frame.to_bytes();
        let len = bytes.len() - 4;
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(decode(&mut buf, len), Ok(Some(frame)));
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(decode(&mut buf, len - 1), Err(DecodeError::TooLarge { len, max: len - 1 }));
        prop_assert_eq!(buf.len(), bytes.len());
    }

    #[test]
    fn round_trip_split_anywhere(frame in frame(), cut in any::<Index>()) {
        let bytes = frame.to_bytes();
        let cut = cut.index(bytes.len());
        let mut buf = BytesMut::from(&bytes[..cut]);
        prop_assert_eq!(decode(&mut buf, limit()), Ok(None));
        prop_assert_eq!(&buf[..], &bytes[..cut]);
        buf.put_slice(&bytes[cut..]);
        prop_assert_eq!(decode(&mut buf, limit()), Ok(Some(frame)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn round_trip_back_to_back(frames in vec(frame(), 1..6), tail in frame(), cut in any::<Index>()) {
        let mut buf = BytesMut::new();
        frames.iter().for_each(|f| f.encode(&mut buf));
        // Followed by the first part of one more frame.
        let tail = tail.to_bytes();
        let partial = &tail[..cut.index(tail.len())];
        buf.put_slice(partial);
        for frame in &frames {
            prop_assert_eq!(decode(&mut buf, limit()), Ok(Some(frame.clone())));
        }
        prop_assert_eq!(decode(&mut buf, limit()), Ok(None));
        prop_assert_eq!(&buf[..], partial);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096), limit in 0..8192usize) {
        decode_all(&bytes, limit, true)?;
    }

    #[test]
    fn framed_garbage_never_panics(frames in vec(framed_garbage(), 1..4), limit in 0..2048usize) {
        decode_all(&frames.concat(), limit, true)?;
    }

    #[test]
    fn mutated_frames_never_panic(bytes in mutated_frame(), limit in 0..16_384usize) {
        // Mutating a valid list can leave it valid, and a valid list may
        // legitimately use more memory than its encoding: no allocation bound.
        decode_all(&bytes, limit, false)?;
    }

    #[test]
    fn forged_length_prefix(len in any::<u32>(), rest in vec(any::<u8>(), 0..64), limit in 0..200_000usize) {
        let mut input = len.to_be_bytes().to_vec();
        input.extend_from_slice(&rest);
        let mut buf = BytesMut::from(&input[..]);
        let (result, largest) = largest_allocation(|| decode(&mut buf, limit));
        let len = len as usize;
        if len == 0 {
            prop_assert_eq!(result, Err(DecodeError::ZeroLength));
        } else if len > limit {
            prop_assert_eq!(result, Err(DecodeError::TooLarge { len, max: limit }));
        } else if rest.len() < len {
            prop_assert_eq!(result, Ok(None));
        }
        if buf.len() == input.len() {
            // Nothing was taken: then nothing may have been allocated either.
            prop_assert_eq!(largest, 0);
        }
        decode_all(&input, limit, true)?;
    }

    #[test]
    fn forged_element_counts(
        members in any::<bool>(),
        count in prop_oneof![Just(u32::MAX), any::<u32>(), 0..64u32],
        valid in vec((group(), member()), 0..20),
        garbage in vec(any::<u8>(), 0..2048),
    ) {
        let input = list_frame(members, count, &valid, &garbage);
        let mut buf = BytesMut::from(&input[..]);
        let (result, largest) = largest_allocation(|| decode(&mut buf, limit()));
        // Reserving only what the frame's own size covers, and growing only
        // with the entries actually decoded.
        let bound = input.len().max(2 * 64 * valid.len()) + SLACK;
        prop_assert!(largest <= bound, "allocated {largest}, bound {bound}, result {result:?}");
    }
}

/// A `MEMBERS_REPLY` (or a `SNAPSHOT`) claiming `count` entries, holding
/// `valid` ones and then `garbage`.
fn list_frame(
    members: bool,
    count: u32,
    valid: &[(GroupName, MemberId)],
    garbage: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    if members {
        body.extend_from_slice(&[0, 0, 0, 1, 1, 1, b'g']); // req 1, last, group "g"
    } else {
        body.push(snapshot_flags::FIRST | snapshot_flags::LAST);
    }
    body.extend_from_slice(&count.to_be_bytes());
    for (g, m) in valid {
        if !members {
            body.push(u8::try_from(g.as_bytes().len()).expect("names are short"));
            body.extend_from_slice(g.as_bytes());
        }
        body.push(u8::try_from(m.as_bytes().len()).expect("names are short"));
        body.extend_from_slice(m.as_bytes());
    }
    body.extend_from_slice(garbage);
    framed(if members { 0x23 } else { 0x30 }, &body)
}

// ------------------------------------------------------------ regressions

#[test]
fn element_count_of_u32_max_is_rejected_at_once() {
    for members in [true, false] {
        let input = list_frame(members, u32::MAX, &[], &[1, b'x', 1, b'y']);
        let mut buf = BytesMut::from(&input[..]);
        let started = Instant::now();
        let (result, largest) = largest_allocation(|| decode(&mut buf, limit()));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            result,
            Err(DecodeError::Malformed("element count exceeds the frame"))
        );
        assert_eq!(result.map_err(|e| e.code()), Err(ErrorCode::MALFORMED));
        assert!(largest <= SLACK, "allocated {largest} bytes");
    }
}

/// A count that passes the "fits in the frame" check but is followed by
/// garbage used to reserve 16 times the frame's size before failing.
#[test]
fn plausible_count_with_garbage_entries_reserves_no_more_than_the_frame() {
    for members in [true, false] {
        let garbage = vec![0u8; 512 * 1024]; // zero-length names: invalid
        let count = u32::try_from(garbage.len() / 4).expect("small");
        let input = list_frame(members, count, &[], &garbage);
        let mut buf = BytesMut::from(&input[..]);
        let (result, largest) = largest_allocation(|| decode(&mut buf, limit()));
        assert!(
            matches!(result, Err(DecodeError::InvalidName(_))),
            "{result:?}"
        );
        assert!(
            largest <= input.len() + SLACK,
            "allocated {largest} for {} bytes",
            input.len()
        );
    }
}

/// An `ERROR` message longer than a str16 is cut on a character boundary,
/// so the frame still decodes.
#[test]
fn long_error_message_is_cut_on_a_char_boundary() {
    let message = format!("{}é and more", "a".repeat(65_534));
    let frame = Frame::Error {
        code: ErrorCode::MALFORMED,
        message,
    };
    let mut buf = BytesMut::from(&frame.to_bytes()[..]);
    let decoded = decode(&mut buf, limit());
    let expected = Frame::Error {
        code: ErrorCode::MALFORMED,
        message: "a".repeat(65_534),
    };
    assert_eq!(decoded, Ok(Some(expected)));
}

#[test]
fn strategy_generates_every_frame_type() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = frame();
    let mut seen = BTreeSet::new();
    for _ in 0..4000 {
        let tree = strategy
            .new_tree(&mut runner)
            .expect("strategy never rejects");
        seen.insert(tree.current().frame_type().0);
    }
    assert_eq!(seen, known_codes());
}

// ------------------------------------------------------- PROTOCOL.md examples

fn g(s: &str) -> GroupName {
    GroupName::from_str_checked(s).expect("example names are valid")
}

fn m(s: &str) -> MemberId {
    MemberId::from_str_checked(s).expect("example names are valid")
}

fn n(s: &str) -> NodeName {
    NodeName::from_str_checked(s).expect("example names are valid")
}

fn text(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

/// The frame behind every `<!-- example: NAME -->` block of PROTOCOL.md.
/// The peer authentication's worked example (PROTOCOL.md section 13.1):
/// node2 dials node1, both holding [`AUTH_KEY`].
const AUTH_KEY: &str = "an example cluster key, 32 bytes";
const AUTH_NONCE_D: [u8; AUTH_LEN] = {
    let mut n = [0; AUTH_LEN];
    let mut i = 0;
    while i < AUTH_LEN {
        n[i] = i as u8;
        i += 1;
    }
    n
};
const AUTH_NONCE_S: [u8; AUTH_LEN] = {
    let mut n = [0; AUTH_LEN];
    let mut i = 0;
    while i < AUTH_LEN {
        n[i] = 0x80 + i as u8;
        i += 1;
    }
    n
};

/// The documented transcript of `side` (1 acceptor, 2 dialler), built
/// here byte by byte from PROTOCOL.md's table, not by the library.
fn auth_transcript(side: u8) -> Vec<u8> {
    let mut t = b"msgc-peer-auth".to_vec();
    t.push(side);
    t.extend_from_slice(&[0, 1]);
    for name in ["node2", "node1"] {
        t.push(name.len() as u8);
        t.extend_from_slice(name.as_bytes());
    }
    t.extend_from_slice(&AUTH_NONCE_D);
    t.extend_from_slice(&AUTH_NONCE_S);
    t
}

/// HMAC-SHA256 of [`auth_transcript`] under [`AUTH_KEY`] (the `hmac`
/// crate directly).
fn auth_mac(side: u8) -> [u8; AUTH_LEN] {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(AUTH_KEY.as_bytes()).expect("key");
    m.update(&auth_transcript(side));
    m.finalize().into_bytes().into()
}

/// The library computes the documented transcripts and MACs.
#[test]
fn documented_auth_transcripts_match_the_library() {
    use msgc::cluster::auth::{mac, transcript, Side};
    let key = msgc::config::ClusterKey::new(AUTH_KEY.as_bytes()).expect("key");
    assert_eq!(AUTH_KEY.len(), 32);
    for (side, byte) in [(Side::Acceptor, 1), (Side::Dialler, 2)] {
        let t = transcript(side, 1, b"node2", b"node1", &AUTH_NONCE_D, &AUTH_NONCE_S);
        assert_eq!(hex(&t), hex(&auth_transcript(byte)), "{side:?}");
        assert_eq!(mac(&key, &t), auth_mac(byte), "{side:?}");
    }
    let doc = protocol_md();
    let blocks = marked_blocks(&doc, "auth-transcript");
    assert_eq!(
        blocks.len(),
        1,
        "PROTOCOL.md shows the acceptor's transcript"
    );
    for (name, block) in blocks {
        assert_eq!(name, "acceptor");
        assert_eq!(hex(&parse_hex(name, block)), hex(&auth_transcript(1)));
    }
}

fn examples() -> Vec<(&'static str, Frame)> {
    let (a, b) = (|| m("node1/0.1"), || m("node2/1.7"));
    let welcome = |member| Welcome {
        version: PROTOCOL_VERSION,
        node: n("node1"),
        member,
        max_message_size: 1 << 20,
        idle_timeout_ms: 30_000,
        features: 0,
    };
    let hello = |role, name| Hello {
        version: PROTOCOL_VERSION,
        role,
        name,
        credentials: Bytes::new(),
        features: 0,
        max_message_size: 0,
    };
    vec![
        (
            "hello-client",
            Frame::Hello(hello(Role::Client, Some(n("app-7")))),
        ),
        (
            "hello-client-auth",
            Frame::Hello(Hello {
                credentials: msgc::protocol::Credentials {
                    user: "alice".into(),
                    password: b"s3cret".to_vec(),
                }
                .encode()
                .expect("valid credentials"),
                ..hello(Role::Client, Some(n("app-7")))
            }),
        ),
        (
            "hello-client-seq",
            Frame::Hello(Hello {
                features: features::SEQ,
                ..hello(Role::Client, Some(n("app-7")))
            }),
        ),
        (
            "hello-peer",
            Frame::Hello(Hello {
                features: features::SEQ,
                max_message_size: 1 << 20,
                ..hello(Role::Peer, Some(n("node2")))
            }),
        ),
        ("welcome-client", Frame::Welcome(welcome(Some(a())))),
        (
            "welcome-peer",
            Frame::Welcome(Welcome {
                features: features::SEQ,
                ..welcome(None)
            }),
        ),
        (
            "deliver-seq",
            Frame::Deliver {
                seq: Some(1),
                group: g("orders"),
                sender: a(),
                payload: text("hello"),
            },
        ),
        (
            "forward-seq",
            Frame::Forward {
                seq: Some(42),
                group: g("orders"),
                sender: b(),
                payload: text("hello"),
            },
        ),
        ("noop", Frame::Noop),
        (
            "error",
            Frame::Error {
                code: ErrorCode::INVALID_NAME,
                message: "bad group name".into(),
            },
        ),
        ("ping", Frame::Ping { token: 42 }),
        ("pong", Frame::Pong { token: 42 }),
        (
            "join",
            Frame::Join {
                group: g("orders"),
                events: Events::Each,
            },
        ),
        (
            "join-batched",
            Frame::Join {
                group: g("orders"),
                events: Events::Batched,
            },
        ),
        ("leave", Frame::Leave { group: g("orders") }),
        (
            "publish",
            Frame::Publish {
                group: g("orders"),
                payload: text("hello"),
            },
        ),
        (
            "send",
            Frame::Send {
                to: b(),
                payload: text("hi"),
            },
        ),
        (
            "members-request",
            Frame::MembersRequest {
                req: 7,
                group: g("orders"),
            },
        ),
        ("stats-request", Frame::StatsRequest { req: 8 }),
        (
            "deliver",
            Frame::Deliver {
                seq: None,
                group: g("orders"),
                sender: a(),
                payload: text("hello"),
            },
        ),
        (
            "direct",
            Frame::Direct {
                sender: b(),
                payload: text("hi"),
            },
        ),
        (
            "membership-join",
            Frame::Membership {
                group: g("orders"),
                subject: text("node1/0.1"),
                reason: Reason::Join,
                size: 1,
            },
        ),
        (
            "membership-node-down",
            Frame::Membership {
                group: g("orders"),
                subject: text("node2"),
                reason: Reason::NodeDown,
                size: 1,
            },
        ),
        (
            "membership-node-left",
            Frame::Membership {
                group: g("orders"),
                subject: text("node2"),
                reason: Reason::NodeLeft,
                size: 1,
            },
        ),
        ("move", Frame::Move { deadline_ms: 9500 }),
        ("node-leaving", Frame::NodeLeaving),
        (
            "hello-peer-auth",
            Frame::Hello(Hello {
                features: features::SEQ,
                max_message_size: 1 << 20,
                credentials: Bytes::from(msgc::cluster::auth::credentials(&AUTH_NONCE_D)),
                ..hello(Role::Peer, Some(n("node2")))
            }),
        ),
        (
            "challenge",
            Frame::Challenge {
                nonce: AUTH_NONCE_S,
                mac: auth_mac(1),
            },
        ),
        ("proof", Frame::Proof { mac: auth_mac(2) }),
        (
            "membership-batch",
            Frame::MembershipBatch {
                group: g("orders"),
                changes: vec![
                    MembershipChange {
                        reason: Reason::Join,
                        size: 2,
                        subject: text("node1/0.2"),
                    },
                    MembershipChange {
                        reason: Reason::Leave,
                        size: 1,
                        subject: text("node1/0.1"),
                    },
                ],
            },
        ),
        (
            "members-reply",
            Frame::MembersReply {
                req: 7,
                last: true,
                group: g("orders"),
                members: vec![a(), b()],
            },
        ),
        (
            "stats-reply",
            Frame::StatsReply {
                req: 8,
                json: text(r#"{"node":"node1"}"#),
            },
        ),
        (
            "snapshot",
            Frame::Snapshot {
                flags: snapshot_flags::FIRST | snapshot_flags::LAST,
                entries: vec![(g("orders"), b()), (g("prices"), b())],
            },
        ),
        (
            "peer-join",
            Frame::PeerJoin {
                group: g("orders"),
                member: b(),
            },
        ),
        (
            "peer-leave",
            Frame::PeerLeave {
                group: g("orders"),
                member: b(),
                reason: Reason::Disconnect,
            },
        ),
        (
            "forward",
            Frame::Forward {
                seq: None,
                group: g("orders"),
                sender: b(),
                payload: text("hello"),
            },
        ),
        (
            "forward-direct",
            Frame::ForwardDirect {
                to: a(),
                sender: b(),
                payload: text("hi"),
            },
        ),
    ]
}

fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md");
    std::fs::read_to_string(path).expect("PROTOCOL.md at the crate root")
}

/// Every `<!-- KIND: ARGS -->` of `doc` with the ```` ```text ```` block
/// that follows it.
fn marked_blocks<'d>(doc: &'d str, kind: &str) -> Vec<(&'d str, &'d str)> {
    let marker = format!("<!-- {kind}: ");
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(at) = rest.find(&marker) {
        let (args, after) = rest[at + marker.len()..]
            .split_once(" -->")
            .expect("closed marker");
        let block = after.trim_start().strip_prefix("```text\n");
        let block = block.unwrap_or_else(|| panic!("{kind} {args}: no ```text block follows"));
        let (block, after) = block.split_once("```").expect("closed block");
        out.push((args, block));
        rest = after;
    }
    out
}

/// Every `<!-- example: NAME -->` of PROTOCOL.md with the bytes of its block
/// (hex pairs; `#` starts a comment).
fn documented_examples() -> Vec<(String, Vec<u8>)> {
    let doc = protocol_md();
    let blocks = marked_blocks(&doc, "example");
    blocks
        .into_iter()
        .map(|(name, block)| (name.to_owned(), parse_hex(name, block)))
        .collect()
}

fn parse_hex(name: &str, block: &str) -> Vec<u8> {
    let tokens = block
        .lines()
        .flat_map(|l| l.split('#').next().unwrap_or("").split_whitespace());
    tokens
        .map(|t| {
            assert_eq!(t.len(), 2, "example {name}: {t:?} is not a hex byte");
            u8::from_str_radix(t, 16).unwrap_or_else(|_| panic!("example {name}: bad hex {t:?}"))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn documented_examples_match_the_encoder() {
    let examples = examples();
    let documented = documented_examples();
    for (name, bytes) in &documented {
        let (_, frame) = examples
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("PROTOCOL.md shows example {name:?} that this test lacks"));
        assert_eq!(hex(bytes), hex(&frame.to_bytes()), "example {name}");
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, limit()),
            Ok(Some(frame.clone())),
            "example {name}"
        );
    }
    for (name, _) in &examples {
        assert!(
            documented.iter().any(|(n, _)| n == name),
            "PROTOCOL.md lacks example {name:?}"
        );
    }
}

/// The worked session: `<!-- transcript: NAME… -->` then the named
/// examples' bytes in order, each starting on a line that says its direction.
#[test]
fn documented_transcript_matches_the_encoder() {
    let doc = protocol_md();
    let transcripts = marked_blocks(&doc, "transcript");
    assert!(!transcripts.is_empty(), "PROTOCOL.md has no transcript");
    let examples = examples();
    for (names, block) in transcripts {
        let names: Vec<&str> = names.split_whitespace().collect();
        let mut expected = Vec::new();
        for name in &names {
            let (_, frame) = examples
                .iter()
                .find(|(n, _)| n == name)
                .expect("a known example");
            expected.extend_from_slice(&frame.to_bytes());
        }
        let lines: Vec<&str> = block.lines().collect();
        let starts = lines
            .iter()
            .filter(|l| l.starts_with("C→S") || l.starts_with("S→C"));
        assert_eq!(starts.count(), names.len(), "one direction per frame");
        let bytes: String = lines
            .iter()
            .map(|l| l.trim_start_matches("C→S").trim_start_matches("S→C"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(hex(&parse_hex("transcript", &bytes)), hex(&expected));
    }
}

#[test]
fn examples_cover_every_frame_type() {
    let types: BTreeSet<u8> = examples().iter().map(|(_, f)| f.frame_type().0).collect();
    assert_eq!(types, known_codes());
}

/// Prints every example as hex, for writing PROTOCOL.md:
/// `cargo test --test protocol_props -- --ignored --nocapture print_examples`.
#[test]
#[ignore = "a generator, not a check"]
fn print_examples() {
    for (name, frame) in examples() {
        println!("{name}: {}", hex(&frame.to_bytes()));
    }
}
