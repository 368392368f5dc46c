//! The client against an in-test mock server speaking `msgc::protocol`:
//! handshake, join acknowledgement, publish → message, multi-part members
//! replies, stats, ping, server errors, flushing on close, keepalive, idle
//! detection and reconnection with re-join; sequenced deliveries and gap
//! detection; publishes left unconfirmed by a lost connection or a close.
//!
//! Every wait is bounded; no test sleeps where an event can be awaited.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use msgc::client::{Client, ClientConfig, ClientError, CloseReport, Event};
use msgc::protocol::{
    decode, features, max_frame_for, ErrorCode, Frame, GroupName, MemberId, NodeName, Reason,
    Welcome, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

/// How the mock behaves.
#[derive(Clone, Default)]
struct Behaviour {
    /// Answer HELLO with ERROR instead of WELCOME.
    reject_hello: bool,
    /// Advertised max_message_size (0 = 1 MiB).
    max_message_size: u32,
    /// Never send anything after WELCOME (to trigger the client's idle check).
    silent: bool,
    /// Answer everything but PING.
    no_pong: bool,
    /// Close the connection right after answering a PING.
    close_after_pong: bool,
    /// Answer the first PING only when the second arrives (just before
    /// answering that one).
    hold_first_pong: bool,
}

/// A mock server on 127.0.0.1, port 0. Each connection is numbered from 1;
/// its member id is `mock/0.N`. Frames received go to `log`; frames given
/// to `inject` are sent by the open connection. It grants `SEQ` when asked
/// and then numbers the publishes it echoes.
struct Mock {
    addr: String,
    log: flume::Receiver<(u64, Frame)>,
    kill: watch::Sender<u64>,
    inject: flume::Sender<Frame>,
}

impl Mock {
    async fn start(behaviour: Behaviour) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (log_tx, log) = flume::unbounded();
        let (kill, kill_rx) = watch::channel(0u64);
        let (inject, inject_rx) = flume::unbounded();
        let seq = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
                let conn = MockConn {
                    n,
                    log: log_tx.clone(),
                    b: behaviour.clone(),
                    sequenced: false,
                    seqs: HashMap::new(),
                    inject: inject_rx.clone(),
                    pings: 0,
                    held: None,
                };
                tokio::spawn(conn.run(stream, kill_rx.clone()));
            }
        });
        Mock {
            addr,
            log,
            kill,
            inject,
        }
    }

    /// Has the open connection send `DELIVER_SEQ` from `sender` to `group`
    /// numbered `seq`, with the number as payload.
    fn deliver(&self, group: &str, sender: &str, seq: u64) {
        self.send(Frame::Deliver {
            group: GroupName::from_str_checked(group).expect("group"),
            sender: MemberId::from_str_checked(sender).expect("sender"),
            seq: Some(seq),
            payload: Bytes::from(seq.to_string()),
        });
    }

    /// Has the open connection send `frame`.
    fn send(&self, frame: Frame) {
        self.inject.send(frame).expect("mock running");
    }

    /// Waits until `n` PUBLISH frames have been received.
    async fn expect_publishes(&self, n: usize) {
        for _ in 0..n {
            self.expect("PUBLISH", |f| matches!(f, Frame::Publish { .. }))
                .await;
        }
    }

    /// Closes every open connection.
    fn kill_all(&self) {
        self.kill.send_modify(|g| *g += 1);
    }

    /// Waits for a logged frame matching `pred`; returns its connection.
    async fn expect(&self, what: &str, pred: impl Fn(&Frame) -> bool) -> u64 {
        let found = timeout(WAIT, async {
            loop {
                match self.log.recv_async().await {
                    Ok((n, frame)) if pred(&frame) => return n,
                    Ok(_) => {}
                    Err(_) => panic!("mock log closed"),
                }
            }
        });
        found
            .await
            .unwrap_or_else(|_| panic!("mock never received {what}"))
    }

    fn config(&self) -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            reconnect_interval: Duration::from_millis(50),
            ..ClientConfig::with_servers([self.addr.clone()])
        }
    }
}

struct MockConn {
    n: u64,
    log: flume::Sender<(u64, Frame)>,
    b: Behaviour,
    /// The client asked for `SEQ` (and was granted it).
    sequenced: bool,
    /// Numbers of this client's publishes, by group.
    seqs: HashMap<GroupName, u64>,
    inject: flume::Receiver<Frame>,
    /// PINGs answered so far, and the token of a held one.
    pings: u64,
    held: Option<u64>,
}

impl MockConn {
    fn member(&self) -> MemberId {
        MemberId::from_str_checked(&format!("mock/0.{}", self.n)).expect("member id")
    }

    async fn run(mut self, mut stream: TcpStream, mut kill: watch::Receiver<u64>) {
        kill.mark_unchanged();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let max_frame = max_frame_for(2 * 1024 * 1024);
        let mut greeted = false;
        let inject = self.inject.clone();
        loop {
            while let Ok(Some(frame)) = decode(&mut buf, max_frame) {
                let _ = self.log.send((self.n, frame.clone()));
                let replies = if greeted {
                    self.answer(frame)
                } else {
                    self.greet(&frame)
                };
                greeted = true;
                if !self.send(&mut stream, &replies).await {
                    return;
                }
                let ponged = replies.iter().any(|f| matches!(f, Frame::Pong { .. }));
                if ponged && self.b.close_after_pong {
                    return;
                }
            }
            tokio::select! {
                read = stream.read_buf(&mut buf) => if !matches!(read, Ok(n) if n > 0) { return },
                frame = inject.recv_async(), if greeted => match frame {
                    Ok(frame) => if !self.send(&mut stream, &[frame]).await { return },
                    Err(_) => return,
                },
                _ = kill.changed() => return,
            }
        }
    }

    /// Writes `replies`; false when the connection should close (after an
    /// ERROR, or on a write failure).
    async fn send(&self, stream: &mut TcpStream, replies: &[Frame]) -> bool {
        let mut out = BytesMut::new();
        replies.iter().for_each(|f| f.encode(&mut out));
        if stream.write_all(&out).await.is_err() {
            return false;
        }
        !replies.iter().any(|f| matches!(f, Frame::Error { .. }))
    }

    fn greet(&mut self, hello: &Frame) -> Vec<Frame> {
        let asked = match hello {
            Frame::Hello(h) => h.features,
            _ => 0,
        };
        self.sequenced = asked & features::SEQ != 0;
        if self.b.reject_hello {
            return vec![Frame::Error {
                code: ErrorCode::UNSUPPORTED_VERSION,
                message: "go away".into(),
            }];
        }
        let max = if self.b.max_message_size == 0 {
            1024 * 1024
        } else {
            self.b.max_message_size
        };
        vec![Frame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            node: NodeName::from_str_checked("mock").expect("node"),
            member: Some(self.member()),
            max_message_size: max,
            idle_timeout_ms: 30_000,
            features: asked & features::SEQ,
        })]
    }

    fn answer(&mut self, frame: Frame) -> Vec<Frame> {
        if self.b.silent {
            return vec![];
        }
        let me = self.member();
        match frame {
            Frame::Join { group, .. } if group.as_str() == "forbidden" => {
                vec![Frame::Error {
                    code: ErrorCode::NOT_ALLOWED,
                    message: "not this one".into(),
                }]
            }
            Frame::Join { group, .. } => vec![membership(group, &me, Reason::Join)],
            Frame::Leave { group } => vec![membership(group, &me, Reason::Leave)],
            Frame::Publish { group, payload } => {
                let seq = self.seqs.entry(group.clone()).or_default();
                *seq += 1;
                vec![Frame::Deliver {
                    group,
                    sender: me,
                    seq: self.sequenced.then_some(*seq),
                    payload,
                }]
            }
            Frame::MembersRequest { req, group } => vec![
                Frame::MembersReply {
                    req,
                    last: false,
                    group: group.clone(),
                    members: ids(&["a/0.1", "a/0.2"]),
                },
                Frame::MembersReply {
                    req,
                    last: true,
                    group,
                    members: ids(&["b/1.7"]),
                },
            ],
            Frame::StatsRequest { req } => vec![Frame::StatsReply {
                req,
                json: Bytes::from_static(br#"{"node":"mock","totals":{"published":3}}"#),
            }],
            Frame::Ping { .. } if self.b.no_pong => vec![],
            Frame::Ping { token } => self.pong(token),
            _ => vec![],
        }
    }
}

impl MockConn {
    fn pong(&mut self, token: u64) -> Vec<Frame> {
        self.pings += 1;
        if self.b.hold_first_pong && self.pings == 1 {
            self.held = Some(token);
            return vec![];
        }
        let held = self.held.take().map(|token| Frame::Pong { token });
        held.into_iter().chain([Frame::Pong { token }]).collect()
    }
}

fn membership(group: GroupName, who: &MemberId, reason: Reason) -> Frame {
    Frame::Membership {
        group,
        subject: who.bytes().clone(),
        reason,
        size: 1,
    }
}

fn ids(list: &[&str]) -> Vec<MemberId> {
    list.iter()
        .map(|s| MemberId::from_str_checked(s).expect("id"))
        .collect()
}

/// Next event, bounded.
async fn next_event(events: &flume::Receiver<Event>) -> Event {
    timeout(WAIT, events.recv_async())
        .await
        .expect("no event within the bound")
        .expect("event stream ended")
}

async fn connect(mock: &Mock) -> Client {
    Client::connect(mock.config()).await.expect("connect")
}

#[tokio::test]
async fn handshake_assigns_member_id() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    assert_eq!(client.member_id().as_str(), "mock/0.1");
    assert_eq!(client.server().node.as_str(), "mock");
    assert!(client.is_connected());
    mock.expect("HELLO", |f| matches!(f, Frame::Hello(_))).await;
}

#[tokio::test]
async fn join_waits_for_own_membership_event() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let events = client.events();
    timeout(WAIT, client.join("orders"))
        .await
        .expect("bounded")
        .expect("join");
    match next_event(&events).await {
        Event::Membership {
            group,
            subject,
            reason,
            ..
        } => {
            assert_eq!(group.as_str(), "orders");
            assert_eq!(subject, "mock/0.1");
            assert_eq!(reason, Reason::Join);
        }
        other => panic!("unexpected {other:?}"),
    }
    // A second join returns at once and sends nothing.
    client.join("orders").await.expect("second join");
    client.join("other").await.expect("join other");
    let joins: Vec<String> = mock
        .log
        .drain()
        .filter_map(|(_, f)| match f {
            Frame::Join { group, .. } => Some(group.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(joins, ["orders", "other"]);
    client.leave("orders").await.expect("leave");
    client
        .leave("never-joined")
        .await
        .expect("leave of a group not joined returns at once");
}

#[tokio::test]
async fn publish_comes_back_as_message() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let events = client.events();
    client
        .publish("g", Bytes::from_static(b"hello"))
        .await
        .expect("publish");
    match next_event(&events).await {
        Event::Message {
            group,
            sender,
            payload,
        } => {
            assert_eq!(group.as_str(), "g");
            assert_eq!(sender, client.member_id());
            assert_eq!(&payload[..], b"hello");
        }
        other => panic!("unexpected {other:?}"),
    }
    client
        .publish_batch("g", ["a", "b", "c"])
        .await
        .expect("batch");
    client.try_publish("g", "d").expect("try_publish");
    for want in ["a", "b", "c", "d"] {
        match next_event(&events).await {
            Event::Message { payload, .. } => assert_eq!(&payload[..], want.as_bytes()),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn members_reply_is_assembled_from_parts() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let members = client.members("g").await.expect("members");
    let names: Vec<&str> = members.iter().map(|m| m.as_str()).collect();
    assert_eq!(names, ["a/0.1", "a/0.2", "b/1.7"]);
}

#[tokio::test]
async fn stats_and_ping() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats["totals"]["published"], 3);
    let rtt = client.ping().await.expect("ping");
    assert!(rtt < WAIT);
}

#[tokio::test]
async fn server_error_surfaces_as_server_error() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    match client.join("forbidden").await {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::NOT_ALLOWED);
            assert_eq!(message, "not this one");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_rejoins_and_announces() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let events = client.events();
    client.join("g").await.expect("join");
    assert!(matches!(
        next_event(&events).await,
        Event::Membership { .. }
    ));
    mock.log.drain().for_each(drop); // forget the first connection's frames

    mock.kill_all();
    match next_event(&events).await {
        Event::Disconnected { reason, .. } => assert!(reason.contains("closed"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    let mut rejoined = false;
    loop {
        match next_event(&events).await {
            Event::Membership {
                subject,
                reason: Reason::Join,
                ..
            } if subject == "mock/0.2" => rejoined = true,
            Event::Reconnected { server, member } => {
                assert_eq!(server, mock.addr);
                assert_eq!(member.as_str(), "mock/0.2");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(rejoined, "the re-join was acknowledged before Reconnected");
    assert_eq!(client.member_id().as_str(), "mock/0.2");
    let conn = mock
        .expect(
            "re-JOIN",
            |f| matches!(f, Frame::Join { group, .. } if group.as_str() == "g"),
        )
        .await;
    assert_eq!(conn, 2);
    client.publish("g", "after").await.expect("publish");
    assert!(matches!(next_event(&events).await, Event::Message { .. }));
}

#[tokio::test]
async fn close_flushes_everything_queued() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    for i in 0..2000u32 {
        client.publish("g", i.to_string()).await.expect("publish");
    }
    let all_confirmed = CloseReport {
        flushed: true,
        unconfirmed: 0,
        unsent: 0,
    };
    assert_eq!(client.close().await, all_confirmed);
    let mut count = 0u32;
    while count < 2000 {
        let (_, frame) = timeout(WAIT, mock.log.recv_async())
            .await
            .expect("bounded")
            .expect("log");
        if let Frame::Publish { payload, .. } = frame {
            assert_eq!(&payload[..], count.to_string().as_bytes(), "in order");
            count += 1;
        }
    }
    assert!(matches!(
        client.publish("g", "late").await,
        Err(ClientError::Closed)
    ));
    assert_eq!(
        client.close().await,
        all_confirmed,
        "a second close reports the same"
    );
    // The event stream ends once the client is closed.
    let ended = timeout(WAIT, async {
        while client.events().recv_async().await.is_ok() {}
    })
    .await;
    assert!(ended.is_ok());
}

#[tokio::test]
async fn limits_and_names_are_checked_locally() {
    let mock = Mock::start(Behaviour {
        max_message_size: 1024,
        ..Behaviour::default()
    })
    .await;
    let client = connect(&mock).await;
    match client.publish("g", vec![0u8; 2000]).await {
        Err(ClientError::MessageTooLarge {
            size: 2000,
            max: 1024,
        }) => {}
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert!(matches!(
        client.join("bad name").await,
        Err(ClientError::InvalidName { .. })
    ));
    assert!(matches!(
        client.send("", "x").await,
        Err(ClientError::InvalidName { .. })
    ));
}

#[tokio::test]
async fn refused_and_rejected_connections_say_why() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let err = Client::connect(ClientConfig::with_servers([addr.clone()]))
        .await
        .expect_err("refused");
    assert_eq!(
        err.to_string(),
        format!("cannot connect to {addr}: connection refused")
    );

    let mock = Mock::start(Behaviour {
        reject_hello: true,
        ..Behaviour::default()
    })
    .await;
    let cfg = ClientConfig {
        servers: vec![addr.clone(), mock.addr.clone()],
        ..mock.config()
    };
    let err = Client::connect(cfg).await.expect_err("rejected");
    let text = err.to_string();
    assert!(
        text.contains("connection refused") && text.contains("go away"),
        "{text}"
    );
}

#[tokio::test]
async fn failover_to_the_next_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let mock = Mock::start(Behaviour::default()).await;
    let cfg = ClientConfig {
        servers: vec![dead, mock.addr.clone()],
        ..mock.config()
    };
    let client = Client::connect(cfg).await.expect("connect");
    assert_eq!(client.server().address, mock.addr);
}

#[tokio::test]
async fn keepalive_and_idle_timeout() {
    let mock = Mock::start(Behaviour {
        silent: true,
        ..Behaviour::default()
    })
    .await;
    let cfg = ClientConfig {
        keepalive_interval: Duration::from_millis(50),
        idle_timeout: Duration::from_millis(300),
        reconnect_interval: Duration::from_secs(60),
        max_backlog: 4,
        ..mock.config()
    };
    let client = Client::connect(cfg).await.expect("connect");
    let events = client.events();
    mock.expect("NOOP", |f| matches!(f, Frame::Noop)).await;
    match next_event(&events).await {
        Event::Disconnected { reason, .. } => {
            assert!(reason.contains("nothing received"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!client.is_connected());
    assert!(matches!(
        client.ping().await,
        Err(ClientError::Disconnected)
    ));
    // While disconnected, publishes queue until the queue is full, then fail.
    for i in 0..4 {
        client
            .publish("g", format!("{i}"))
            .await
            .expect("queued while disconnected");
    }
    assert!(matches!(
        client.publish("g", "x").await,
        Err(ClientError::Disconnected)
    ));
    assert!(matches!(
        client.try_publish("g", "x"),
        Err(ClientError::Disconnected)
    ));
    // Closing cannot flush them: close says so.
    let report = client.close().await;
    assert_eq!(
        report,
        CloseReport {
            flushed: false,
            unconfirmed: 4,
            unsent: 4
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usable_from_spawned_tasks() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Client>();
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let events = client.events();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client.join(format!("g{i}")).await?;
                client.publish(format!("g{i}"), "x").await?;
                client.members(format!("g{i}")).await.map(drop)
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("requests");
    }
    let mut messages = 0;
    while messages < 4 {
        if let Event::Message { .. } = next_event(&events).await {
            messages += 1;
        }
    }
}

/// The next `n` events that are messages or gaps, as text (`group sender
/// payload`, `gap group sender missing`); membership events are skipped
/// (at most 50 of them).
async fn deliveries(events: &flume::Receiver<Event>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n + 50 {
        if out.len() == n {
            break;
        }
        match next_event(events).await {
            Event::Message {
                group,
                sender,
                payload,
            } => out.push(format!(
                "{group} {sender} {}",
                String::from_utf8_lossy(&payload)
            )),
            Event::Gap {
                group,
                sender,
                missing,
            } => out.push(format!("gap {group} {sender} {missing}")),
            Event::Membership { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn gaps_are_reported_before_the_message_that_reveals_them() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    assert!(client.server().sequenced, "SEQ asked for and granted");
    let events = client.events();
    // 3 and 4 lost; 1 after 7 is a new run; then 3 lost.
    for seq in [1, 2, 5, 6, 7, 1, 2, 4] {
        mock.deliver("g", "x/0.1", seq);
    }
    let got = deliveries(&events, 10).await;
    let want = [
        "g x/0.1 1",
        "g x/0.1 2",
        "gap g x/0.1 2",
        "g x/0.1 5",
        "g x/0.1 6",
        "g x/0.1 7",
        "g x/0.1 1",
        "g x/0.1 2",
        "gap g x/0.1 1",
        "g x/0.1 4",
    ];
    assert_eq!(got, want);
    assert_eq!(client.gaps(), 3);
}

#[tokio::test]
async fn senders_and_groups_are_numbered_apart() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let events = client.events();
    let script = [
        ("g", "a/0.1", 1),
        ("g", "b/0.1", 4),  // b's baseline in g
        ("h", "a/0.1", 10), // a's baseline in h
        ("g", "a/0.1", 2),
        ("g", "b/0.1", 6), // 5 lost
        ("h", "a/0.1", 11),
        ("h", "b/0.1", 1),
        ("g", "a/0.1", 4), // 3 lost
    ];
    for (group, sender, seq) in script {
        mock.deliver(group, sender, seq);
    }
    let got = deliveries(&events, 10).await;
    let want = [
        "g a/0.1 1",
        "g b/0.1 4",
        "h a/0.1 10",
        "g a/0.1 2",
        "gap g b/0.1 1",
        "g b/0.1 6",
        "h a/0.1 11",
        "h b/0.1 1",
        "gap g a/0.1 1",
        "g a/0.1 4",
    ];
    assert_eq!(got, want);
    assert_eq!(client.gaps(), 2);
}

#[tokio::test]
async fn leaving_and_membership_changes_restart_baselines() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let events = client.events();
    let group = || GroupName::from_str_checked("g").expect("group");
    let change = |subject: &'static str, reason| Frame::Membership {
        group: group(),
        subject: Bytes::from_static(subject.as_bytes()),
        reason,
        size: 1,
    };
    client.join("g").await.expect("join");
    mock.deliver("g", "a/0.1", 1);
    mock.deliver("g", "a/0.1", 2);
    assert_eq!(deliveries(&events, 2).await, ["g a/0.1 1", "g a/0.1 2"]);
    // Our own leave forgets the group: 9 is a new baseline.
    client.leave("g").await.expect("leave");
    mock.deliver("g", "a/0.1", 9);
    // Another member's leave or disconnect forgets it; its node's loss
    // does not (a link re-formed: the loss shows as a gap).
    mock.deliver("g", "b/0.1", 1);
    mock.send(change("b/0.1", Reason::Leave));
    mock.deliver("g", "b/0.1", 5);
    mock.deliver("g", "c/0.1", 1);
    mock.send(change("c/0.1", Reason::Disconnect));
    mock.deliver("g", "c/0.1", 5);
    mock.deliver("g", "n2/0.1", 1);
    mock.send(change("n2", Reason::NodeDown));
    mock.deliver("g", "n2/0.1", 5);
    // a was kept: 10 lost.
    mock.deliver("g", "a/0.1", 11);
    let got = deliveries(&events, 10).await;
    let want = [
        "g a/0.1 9",
        "g b/0.1 1",
        "g b/0.1 5",
        "g c/0.1 1",
        "g c/0.1 5",
        "g n2/0.1 1",
        "gap g n2/0.1 3",
        "g n2/0.1 5",
        "gap g a/0.1 1",
        "g a/0.1 11",
    ];
    assert_eq!(got, want);
    assert_eq!(client.gaps(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_starts_new_baselines() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let events = client.events();
    mock.deliver("g", "a/0.1", 1);
    assert_eq!(deliveries(&events, 1).await, ["g a/0.1 1"]);
    mock.kill_all();
    assert!(matches!(
        next_event(&events).await,
        Event::Disconnected { .. }
    ));
    assert!(matches!(
        next_event(&events).await,
        Event::Reconnected { .. }
    ));
    mock.deliver("g", "a/0.1", 7);
    mock.deliver("g", "a/0.1", 9);
    let got = deliveries(&events, 3).await;
    assert_eq!(got, ["g a/0.1 7", "gap g a/0.1 1", "g a/0.1 9"]);
}

#[tokio::test]
async fn seq_is_asked_for_unless_disabled() {
    let mock = Mock::start(Behaviour::default()).await;
    let client = connect(&mock).await;
    let asked =
        |f: &Frame| matches!(f, Frame::Hello(h) if h.features == features::SEQ | features::LEAVING);
    mock.expect("HELLO asking for SEQ", asked).await;
    // Our own publishes come back numbered: no gap among them.
    let events = client.events();
    for i in 0..3 {
        client.publish("g", format!("m{i}")).await.expect("publish");
    }
    let me = client.member_id();
    let want: Vec<String> = (0..3).map(|i| format!("g {me} m{i}")).collect();
    assert_eq!(deliveries(&events, 3).await, want);
    assert_eq!(client.gaps(), 0);

    let cfg = ClientConfig {
        sequenced: false,
        ..mock.config()
    };
    let plain = Client::connect(cfg).await.expect("connect");
    let not_asked = |f: &Frame| matches!(f, Frame::Hello(h) if h.features == 0);
    mock.expect("HELLO without features", not_asked).await;
    assert!(!plain.server().sequenced);
}

#[tokio::test]
async fn disconnected_counts_what_was_not_confirmed() {
    let mock = Mock::start(Behaviour {
        no_pong: true,
        ..Behaviour::default()
    })
    .await;
    let cfg = ClientConfig {
        reconnect_interval: Duration::from_secs(60),
        ..mock.config()
    };
    let client = Client::connect(cfg).await.expect("connect");
    let events = client.events();
    for i in 0..10 {
        client.publish("g", format!("{i}")).await.expect("publish");
    }
    mock.expect_publishes(10).await;
    assert_eq!(client.unconfirmed(), 10);
    mock.kill_all();
    let lost = loop {
        match next_event(&events).await {
            Event::Disconnected {
                unconfirmed,
                queued,
                ..
            } => break (unconfirmed, queued),
            Event::Message { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(lost, (10, 0), "written, never confirmed");
    assert_eq!(client.unconfirmed(), 0, "reported once");
    // Queued while disconnected: never written, reported by close.
    for i in 0..3 {
        client
            .publish("g", format!("late {i}"))
            .await
            .expect("queued");
    }
    client.send("mock/0.1", "direct").await.expect("queued");
    assert_eq!(client.unconfirmed(), 4);
    let report = client.close().await;
    let want = CloseReport {
        flushed: false,
        unconfirmed: 4,
        unsent: 4,
    };
    assert_eq!(report, want);
}

#[tokio::test]
async fn a_ping_confirms_what_came_before_it() {
    let mock = Mock::start(Behaviour {
        hold_first_pong: true,
        ..Behaviour::default()
    })
    .await;
    let client = connect(&mock).await;
    let events = client.events();
    // The first publish's confirmation stays outstanding (held) while the
    // others are written: only the user PING can have them confirmed.
    client.publish("g", "0").await.expect("publish");
    mock.expect("a confirmation PING", |f| matches!(f, Frame::Ping { .. }))
        .await;
    for i in 1..10 {
        client.publish("g", format!("{i}")).await.expect("publish");
    }
    client.ping().await.expect("ping");
    assert_eq!(client.unconfirmed(), 0);
    mock.kill_all();
    let lost = loop {
        match next_event(&events).await {
            Event::Disconnected {
                unconfirmed,
                queued,
                ..
            } => break (unconfirmed, queued),
            Event::Message { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(lost, (0, 0));
}

#[tokio::test]
async fn the_writer_asks_for_confirmation_by_itself() {
    let mock = Mock::start(Behaviour {
        close_after_pong: true,
        ..Behaviour::default()
    })
    .await;
    let client = connect(&mock).await;
    let events = client.events();
    // One queue item, so one batch, followed by one confirmation PING: the
    // mock answers it and hangs up.
    client
        .publish_batch("g", (0..10).map(|i| i.to_string()))
        .await
        .expect("publish");
    let lost = loop {
        match next_event(&events).await {
            Event::Disconnected {
                unconfirmed,
                queued,
                ..
            } => break (unconfirmed, queued),
            Event::Message { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(lost, (0, 0));
    mock.expect("a confirmation PING", |f| matches!(f, Frame::Ping { .. }))
        .await;
}

#[tokio::test]
async fn close_against_a_server_that_never_confirms() {
    let mock = Mock::start(Behaviour {
        no_pong: true,
        ..Behaviour::default()
    })
    .await;
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(300),
        ..mock.config()
    };
    let client = Client::connect(cfg).await.expect("connect");
    for i in 0..5 {
        client.publish("g", format!("{i}")).await.expect("publish");
    }
    mock.expect_publishes(5).await;
    let report = client.close().await;
    let want = CloseReport {
        flushed: false,
        unconfirmed: 5,
        unsent: 0,
    };
    assert_eq!(report, want);
    mock.expect("the close PING", |f| matches!(f, Frame::Ping { .. }))
        .await;
}
