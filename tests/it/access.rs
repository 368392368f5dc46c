//! Client authentication and permissions: `msgc-server` processes with
//! `users` configured, raw frames and the client library.

use crate::util::{free_port, http_get, next_event, NodeProc, Raw, TempDir, WAIT};
use bytes::Bytes;
use msgc::client::{Client, ClientConfig, ClientError, Event};
use msgc::protocol::{Credentials, ErrorCode, Frame, Hello, Reason, Role, PROTOCOL_VERSION};
use msgc::server::auth::{hash_password, Cost};
use std::net::SocketAddr;
use std::time::Duration;

/// A cheap argon2 cost: the servers under test are debug builds.
const CHEAP: Cost = Cost {
    memory_kib: 64,
    passes: 1,
    lanes: 1,
};

fn hash(password: &str) -> String {
    hash_password(password.as_bytes(), CHEAP).expect("hash")
}

/// `users = [ … ]`: `admin` (password `root-pw`) may do everything,
/// `orders` (password `orders-pw`) may join and publish `orders.*` only.
fn users() -> String {
    format!(
        "users = [\n  admin = [ password = \"{}\" join = \"*\" publish = \"*\" members = true send = true stats = true ]\n  \
         orders = [ password = \"{}\" join = ( \"orders.*\" ) publish = ( \"orders.*\" ) ]\n]",
        hash("root-pw"),
        hash("orders-pw")
    )
}

/// A one-node server on `ip` with `extra` in `msgc_server`, and its
/// monitor (which needs no login) for the counters.
fn server(dir: &TempDir, ip: &str, extra: &str) -> (NodeProc, SocketAddr) {
    let port = free_port(&[ip]);
    let mon_port = (0..100)
        .map(|_| free_port(&[ip]))
        .find(|p| *p != port)
        .expect("a second free port");
    let mon: SocketAddr = format!("{ip}:{mon_port}").parse().expect("address");
    let extra = format!("monitor = \"{mon}\"\n  {extra}");
    let node = NodeProc::solo_on(dir, ip, port, &extra);
    crate::util::wait_for("the monitor to answer", WAIT, || {
        http_get(mon, "/healthz").is_some_and(|r| r.status == 200)
    });
    (node, mon)
}

fn totals(mon: SocketAddr, field: &str) -> u64 {
    let reply = http_get(mon, "/stats").expect("GET /stats");
    reply.json()["totals"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("totals.{field} is a number"))
}

fn hello(credentials: Bytes) -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        name: None,
        credentials,
        features: 0,
        max_message_size: 0,
    })
}

fn creds(user: &str, password: &str) -> Bytes {
    Credentials {
        user: user.into(),
        password: password.as_bytes().to_vec(),
    }
    .encode()
    .expect("valid credentials")
}

/// A raw connection that sent `credentials` in its HELLO, and the answer.
fn raw_hello(addr: SocketAddr, credentials: Bytes) -> (Raw, Option<Frame>) {
    let mut r = Raw::connect(addr);
    r.send(&hello(credentials));
    let answer = next(&mut r);
    (r, answer)
}

/// A raw client logged in as `user`.
fn raw_login(addr: SocketAddr, user: &str, password: &str) -> Raw {
    match raw_hello(addr, creds(user, password)) {
        (r, Some(Frame::Welcome(_))) => r,
        (_, other) => panic!("{user}: expected WELCOME, got {other:?}"),
    }
}

/// The next frame other than NOOP.
fn next(r: &mut Raw) -> Option<Frame> {
    loop {
        match r.recv() {
            Some(Frame::Noop) => {}
            other => return other,
        }
    }
}

/// Expects `ERROR code` (whose message must contain `text`) next.
fn expect_error(r: &mut Raw, code: ErrorCode, text: &str) {
    match next(r) {
        Some(Frame::Error { code: c, message }) => {
            assert_eq!(c, code, "code of `{message}`");
            assert!(message.contains(text), "`{message}` mentions `{text}`");
        }
        other => panic!("expected ERROR {}, got {other:?}", code.name()),
    }
}

fn refused(addr: SocketAddr, credentials: Bytes, text: &str) {
    let (mut r, answer) = raw_hello(addr, credentials);
    match answer {
        Some(Frame::Error { code, message }) => {
            assert_eq!(code, ErrorCode::AUTH_FAILED, "{message}");
            assert!(message.contains(text), "`{message}` mentions `{text}`");
        }
        other => panic!("expected ERROR AUTH_FAILED, got {other:?}"),
    }
    assert!(r.closed(), "a refused login is closed");
}

fn client_config(addr: SocketAddr, user: &str, password: &str) -> ClientConfig {
    let mut cfg = ClientConfig::with_servers([addr.to_string()]);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.request_timeout = WAIT;
    cfg.user = Some(user.into());
    cfg.password = Some(password.into());
    cfg
}

#[test]
fn logins_without_valid_credentials_are_refused_counted_and_limited() {
    let dir = TempDir::new("auth-login");
    let (node, mon) = server(&dir, "127.0.0.61", &users());
    let addr = node.addr;

    // The right password gets in, by raw frames and by the library.
    let mut ok = raw_login(addr, "orders", "orders-pw");
    ok.send(&Frame::Ping { token: 7 });
    assert!(matches!(next(&mut ok), Some(Frame::Pong { token: 7 })));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let good = Client::connect(client_config(addr, "orders", "orders-pw"))
            .await
            .expect("logs in");
        good.ping().await.expect("served");
        let _ = good.close().await;
    });

    // Then the failures, back to back: the limit regains a try every two
    // seconds, so the sixth attempt comes before any is regained.
    refused(addr, Bytes::new(), "requires a user and password");
    refused(addr, creds("orders", "wrong"), "wrong password");
    refused(addr, creds("nobody", "orders-pw"), "unknown user");
    refused(
        addr,
        Bytes::from_static(b"\x01\x09orders"),
        "bad credentials",
    );
    rt.block_on(async {
        let bad = Client::connect(client_config(addr, "orders", "nope")).await;
        let Err(err) = bad else {
            panic!("a wrong password must fail")
        };
        let err = err.to_string();
        assert!(err.contains("auth_failed"), "{err}");
    });
    assert_eq!(totals(mon, "auth_failures"), 5);
    assert_eq!(totals(mon, "auth_rate_limited"), 0);
    let metrics = http_get(mon, "/metrics").expect("GET /metrics").body;
    assert!(
        metrics.contains("msgc_auth_failures_total{shard="),
        "exported to Prometheus"
    );

    // Five failures from this address: the next login is refused without
    // a check, even with the right password, and counted as limited.
    refused(addr, creds("orders", "orders-pw"), "too many failed logins");
    assert_eq!(totals(mon, "auth_rate_limited"), 1);
    assert_eq!(totals(mon, "auth_failures"), 6);
    // A connection logged in before is untouched.
    ok.send(&Frame::Ping { token: 8 });
    assert!(matches!(next(&mut ok), Some(Frame::Pong { token: 8 })));
}

#[test]
fn a_user_limited_to_orders_is_denied_the_rest_and_keeps_its_connection() {
    let dir = TempDir::new("auth-perms");
    let (node, mon) = server(&dir, "127.0.0.62", &users());
    let addr = node.addr;
    let mut o = raw_login(addr, "orders", "orders-pw");
    let g = crate::util::group;

    o.send(&Frame::Join {
        group: g("orders.eu"),
        events: Default::default(),
    });
    let me = match next(&mut o) {
        Some(Frame::Membership {
            group,
            reason: Reason::Join,
            subject,
            ..
        }) if group.as_str() == "orders.eu" => subject,
        other => panic!("expected the join acknowledgement, got {other:?}"),
    };
    let me = String::from_utf8(me.to_vec()).expect("member id");

    o.send(&Frame::Join {
        group: g("billing"),
        events: Default::default(),
    });
    expect_error(&mut o, ErrorCode::PERMISSION_DENIED, "JOIN billing");
    o.send(&Frame::Publish {
        group: g("billing"),
        payload: Bytes::from_static(b"no"),
    });
    expect_error(&mut o, ErrorCode::PERMISSION_DENIED, "PUBLISH billing");
    o.send(&Frame::MembersRequest {
        req: 3,
        group: g("orders.eu"),
    });
    expect_error(&mut o, ErrorCode::PERMISSION_DENIED, "MEMBERS_REQUEST 3");
    o.send(&Frame::StatsRequest { req: 4 });
    expect_error(&mut o, ErrorCode::PERMISSION_DENIED, "STATS_REQUEST 4");
    let to = msgc::protocol::MemberId::from_str_checked(&me).expect("id");
    o.send(&Frame::Send {
        to: to.clone(),
        payload: Bytes::from_static(b"self"),
    });
    expect_error(&mut o, ErrorCode::PERMISSION_DENIED, "SEND");

    // Still open: an allowed publish is delivered.
    o.send(&Frame::Publish {
        group: g("orders.eu"),
        payload: Bytes::from_static(b"placed"),
    });
    match next(&mut o) {
        Some(Frame::Deliver { group, payload, .. }) => {
            assert_eq!(
                (group.as_str(), &payload[..]),
                ("orders.eu", &b"placed"[..])
            );
        }
        other => panic!("expected DELIVER, got {other:?}"),
    }
    assert_eq!(totals(mon, "permission_denials"), 5);
    assert_eq!(
        totals(mon, "protocol_errors"),
        0,
        "a denial is not bad input"
    );

    // The admin may list, read stats and send.
    let mut a = raw_login(addr, "admin", "root-pw");
    a.send(&Frame::MembersRequest {
        req: 5,
        group: g("orders.eu"),
    });
    match next(&mut a) {
        Some(Frame::MembersReply {
            req: 5, members, ..
        }) => {
            assert_eq!(members.len(), 1);
            assert_eq!(members[0].as_str(), me);
        }
        other => panic!("expected MEMBERS_REPLY, got {other:?}"),
    }
    a.send(&Frame::StatsRequest { req: 6 });
    assert!(matches!(
        next(&mut a),
        Some(Frame::StatsReply { req: 6, .. })
    ));
    a.send(&Frame::Send {
        to,
        payload: Bytes::from_static(b"hi"),
    });
    match next(&mut o) {
        Some(Frame::Direct { payload, .. }) => assert_eq!(&payload[..], b"hi"),
        other => panic!("expected DIRECT, got {other:?}"),
    }
    // LEAVE is always allowed: of a group the user may not join (a no-op,
    // no denial before the PONG), and of its own.
    o.send(&Frame::Leave {
        group: g("billing"),
    });
    o.send(&Frame::Ping { token: 9 });
    match next(&mut o) {
        Some(Frame::Pong { token: 9 }) => {}
        other => panic!("a LEAVE of billing is not denied: expected PONG, got {other:?}"),
    }
    o.send(&Frame::Leave {
        group: g("orders.eu"),
    });
    match next(&mut o) {
        Some(Frame::Membership {
            group,
            reason: Reason::Leave,
            subject,
            ..
        }) if group.as_str() == "orders.eu" => assert_eq!(&subject[..], me.as_bytes()),
        other => panic!("expected the leave acknowledgement, got {other:?}"),
    }
    assert_eq!(totals(mon, "permission_denials"), 5, "no LEAVE denied");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_library_reports_denials_and_goes_on() {
    let dir = TempDir::new("auth-lib");
    let (node, _mon) = tokio::task::block_in_place(|| server(&dir, "127.0.0.63", &users()));
    let c = Client::connect(client_config(node.addr, "orders", "orders-pw"))
        .await
        .expect("logs in");
    let events = c.events();
    c.join("orders.eu").await.expect("join orders.eu");
    match c.join("billing").await {
        Err(ClientError::PermissionDenied { message }) => {
            assert!(message.starts_with("JOIN billing"), "{message}")
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    assert!(matches!(
        c.members("orders.eu").await,
        Err(ClientError::PermissionDenied { .. })
    ));
    assert!(matches!(
        c.stats().await,
        Err(ClientError::PermissionDenied { .. })
    ));
    c.publish("billing", "no").await.expect("queued");
    let denied = next_event(&events, WAIT, |e| match e {
        Event::Denied { message } if message.starts_with("PUBLISH") => Some(message),
        _ => None,
    })
    .await;
    assert!(denied.starts_with("PUBLISH billing"), "{denied}");
    c.publish("orders.eu", "placed").await.expect("publish");
    let got = next_event(&events, WAIT, |e| match e {
        Event::Message { payload, .. } => Some(payload),
        Event::Disconnected { .. } => panic!("the connection was dropped"),
        _ => None,
    })
    .await;
    assert_eq!(&got[..], b"placed");
    let _ = c.close().await;
}

#[test]
fn the_bad_input_catalogue_passes_with_auth_on() {
    const MAX: usize = 1000;
    let dir = TempDir::new("auth-bad");
    let extra = format!("max_message_size = {MAX}\n  {}", users());
    let (node, mon) = server(&dir, "127.0.0.64", &extra);
    let addr = node.addr;
    let mut healthy = raw_login(addr, "admin", "root-pw");
    healthy.send(&Frame::Join {
        group: crate::util::group("ok"),
        events: Default::default(),
    });
    assert!(matches!(next(&mut healthy), Some(Frame::Membership { .. })));
    let cases = crate::server::bad_inputs(MAX);
    for (i, case) in cases.iter().enumerate() {
        let mut raw = if case.handshake {
            raw_login(addr, "admin", "root-pw")
        } else {
            Raw::connect(addr)
        };
        raw.send_bytes(&case.bytes);
        match next(&mut raw) {
            Some(Frame::Error { code, .. }) => assert_eq!(code, case.code, "{}", case.what),
            other => panic!("{}: expected ERROR, got {other:?}", case.what),
        }
        assert!(raw.closed(), "{}: closed", case.what);
        let text = format!("after case {i}");
        healthy.send(&Frame::Publish {
            group: crate::util::group("ok"),
            payload: Bytes::from(text.clone()),
        });
        match next(&mut healthy) {
            Some(Frame::Deliver { payload, .. }) => {
                assert_eq!(&payload[..], text.as_bytes(), "after {}", case.what)
            }
            other => panic!("after {}: expected DELIVER, got {other:?}", case.what),
        }
    }
    assert_eq!(totals(mon, "protocol_errors"), cases.len() as u64);
    assert_eq!(totals(mon, "auth_failures"), 0);
}

#[test]
fn users_apply_to_new_logins_on_reload_and_none_means_as_before() {
    let dir = TempDir::new("auth-reload");
    let (node, mon) = server(&dir, "127.0.0.65", "");
    let addr = node.addr;
    // No users: credentials are not needed, and ignored when sent.
    let mut before = Raw::client(addr);
    let mut with = raw_login(addr, "whoever", "whatever");
    before.send(&Frame::StatsRequest { req: 1 });
    assert!(matches!(next(&mut before), Some(Frame::StatsReply { .. })));

    let mon_line = format!("monitor = \"{mon}\"");
    node.reconfigure_solo(&format!("{mon_line}\n  {}", users()));
    crate::util::wait_for("the reload to require logins", WAIT, || {
        matches!(raw_hello(addr, Bytes::new()).1, Some(Frame::Error { .. }))
    });
    refused(addr, Bytes::new(), "requires a user and password");
    let mut o = raw_login(addr, "orders", "orders-pw");
    o.send(&Frame::StatsRequest { req: 2 });
    expect_error(&mut o, ErrorCode::PERMISSION_DENIED, "STATS_REQUEST 2");
    // Connections from before the reload keep what they had.
    with.send(&Frame::StatsRequest { req: 3 });
    assert!(matches!(next(&mut with), Some(Frame::StatsReply { .. })));
}

#[test]
fn the_cli_hashes_a_password_and_logs_in_with_it() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut hasher = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(["hash-password", "--memory-kib", "64", "--passes", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run msgc hash-password");
    hasher
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"cli-pw\n")
        .expect("write the password");
    let out = hasher.wait_with_output().expect("msgc hash-password ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout).expect("UTF-8");
    let hash = hash.trim();
    assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");

    let dir = TempDir::new("auth-cli");
    let users = format!("users = [ cli = [ password = \"{hash}\" stats = true ] ]");
    let (node, _mon) = server(&dir, "127.0.0.66", &users);
    let msgc = |user: Option<&str>, password: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_msgc"));
        cmd.args(["--server", &node.addr.to_string()])
            .env_remove("MSGC_USER")
            .env("MSGC_PASSWORD", password);
        if let Some(user) = user {
            cmd.args(["--user", user]);
        }
        cmd.arg("stats").output().expect("run msgc stats")
    };
    let ok = msgc(Some("cli"), "cli-pw");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = msgc(Some("cli"), "nope");
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("auth_failed"));
    let none = msgc(None, "");
    assert!(!none.status.success());
    let publish = Command::new(env!("CARGO_BIN_EXE_msgc"))
        .args(["--server", &node.addr.to_string(), "--user", "cli"])
        .args(["pub", "billing", "no"])
        .env("MSGC_PASSWORD", "cli-pw")
        .output()
        .expect("run msgc pub");
    assert!(!publish.status.success(), "a refused publish fails");
    let err = String::from_utf8_lossy(&publish.stderr);
    assert!(err.contains("permission denied: PUBLISH billing"), "{err}");
}

#[test]
fn logins_and_denials_work_on_the_epoll_backend_too() {
    let dir = TempDir::new("auth-epoll");
    let extra = format!("io_backend = epoll\n  {}", users());
    let (node, mon) = server(&dir, "127.0.0.67", &extra);
    refused(node.addr, creds("orders", "wrong"), "wrong password");
    let mut o = raw_login(node.addr, "orders", "orders-pw");
    o.send(&Frame::Publish {
        group: crate::util::group("billing"),
        payload: Bytes::from_static(b"no"),
    });
    expect_error(&mut o, ErrorCode::PERMISSION_DENIED, "PUBLISH billing");
    o.send(&Frame::Ping { token: 9 });
    assert!(matches!(next(&mut o), Some(Frame::Pong { token: 9 })));
    let stats = http_get(mon, "/stats").expect("GET /stats").json();
    assert_eq!(stats["io_backend"], "epoll");
    assert_eq!(stats["totals"]["auth_failures"], 1);
    assert_eq!(stats["totals"]["permission_denials"], 1);
}

/// Password checks run off the shards (on helper threads): with one shard,
/// 16 logins whose checks are slow are all in flight at once (a 17th from
/// the same address is refused at once, as the per-address cap says),
/// and meanwhile a client already logged in on that shard is served: its
/// PING is answered while checks are still owed.
#[test]
fn slow_password_checks_do_not_hold_the_shard() {
    const PENDING: usize = msgc::server::auth::VERIFY_PER_ADDR as usize;
    // Slow enough to be still running when the PING is answered (8 MiB,
    // two passes: milliseconds each in a release build, far more in the
    // debug builds under test), cheap enough for a test.
    let slow = Cost {
        memory_kib: 8 * 1024,
        passes: 2,
        lanes: 1,
    };
    let users = format!(
        "shards = 1\n  users = [\n  admin = [ password = \"{}\" ]\n  slow = [ password = \"{}\" ]\n]",
        hash("root-pw"),
        hash_password(b"slow-pw", slow).expect("hash")
    );
    let dir = TempDir::new("auth-offshard");
    let (node, mon) = server(&dir, "127.0.0.68", &users);
    let addr = node.addr;
    let mut ok = raw_login(addr, "admin", "root-pw");
    let mut pending: Vec<Raw> = (0..PENDING)
        .map(|_| {
            let mut r = Raw::connect(addr);
            r.send(&hello(creds("slow", "slow-pw")));
            r
        })
        .collect();
    // Every one of them has been read and its check is in flight: another
    // login from the address is refused at once. (A finished check gives
    // its place back before its answer goes out: the admin's is free.)
    refused(addr, creds("slow", "slow-pw"), "too many");
    assert_eq!(totals(mon, "auth_rate_limited"), 1);
    ok.send(&Frame::Ping { token: 1 });
    assert!(matches!(next(&mut ok), Some(Frame::Pong { token: 1 })));
    let unanswered = pending
        .iter()
        .filter(|r| {
            r.s.set_nonblocking(true).expect("nonblocking");
            let mut b = [0u8; 1];
            let quiet =
                matches!(r.s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            r.s.set_nonblocking(false).expect("blocking");
            quiet
        })
        .count();
    assert!(
        unanswered > 0,
        "every slow check was answered before the PING: they held the shard"
    );
    // And each is answered in the end: logged in.
    for r in pending.iter_mut() {
        assert!(matches!(r.recv(), Some(Frame::Welcome(_))));
    }
}
