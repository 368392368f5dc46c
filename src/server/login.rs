//! A client's login and permissions on its shard: the `HELLO` of a
//! client when users are configured (the password check runs in `auth`,
//! off the shard, and this side awaits its answer), and the check of each
//! request against the user's grant.
//!
//! Without users a client is welcomed at once and `permitted` is one
//! branch on an empty cell. Does not own the user table or the password
//! check (`auth`) nor the reader loop (`conn`).

use super::auth::{Grant, Login};
use super::conn::{Conn, ConnRole, Reject};
use super::outbound::Phase;
use super::shard::Shard;
use crate::protocol::{ErrorCode, Frame, Hello, Welcome, PROTOCOL_VERSION};
use crate::stats::ShardStats;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Whether the client's user may make the request `frame`; when not, it
/// has been answered `PERMISSION_DENIED` (the connection stays open).
/// Always true without users (no grant).
#[inline]
pub(super) fn permitted(shard: &Shard, conn: &Conn, frame: &Frame) -> bool {
    let Some(grant) = conn.grant.get() else {
        return true;
    };
    match denied(grant, frame) {
        Some(what) => {
            deny(shard, conn, grant, &what);
            false
        }
        None => true,
    }
}

/// A login waiting for its password check.
pub(super) struct PendingLogin {
    answer: tokio::sync::oneshot::Receiver<bool>,
    grant: Arc<Grant>,
    /// The features the `HELLO` asked for.
    features: u32,
}

/// A client's `HELLO`: welcomed at once without users; otherwise refused
/// at once, or its password check started (the reader then waits in
/// [`finish_login`]).
pub(super) fn welcome_client(shard: &Shard, conn: &Conn, hello: &Hello) -> Result<(), Reject> {
    let features = hello.features & crate::protocol::features::ALL;
    if !shard.shared.auth.enabled() {
        send_welcome(shard, conn, features);
        return Ok(());
    }
    match shard
        .shared
        .auth
        .begin(conn.addr.ip(), &hello.credentials, Instant::now())
    {
        Login::Open => send_welcome(shard, conn, features),
        Login::Refused { why, rate_limited } => refuse_login(shard, conn, &why, rate_limited),
        Login::Pending { answer, grant } => {
            *conn.login.borrow_mut() = Some(PendingLogin {
                answer,
                grant,
                features,
            });
        }
    }
    Ok(())
}

/// Makes `conn` a client and sends its `WELCOME`.
fn send_welcome(shard: &Shard, conn: &Conn, features: u32) {
    conn.role.set(ConnRole::Client);
    let live = shard.live.get();
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        node: shard.shared.node.clone(),
        member: Some(conn.id.clone()),
        max_message_size: u32::try_from(live.max_message_size).unwrap_or(u32::MAX),
        idle_timeout_ms: u32::try_from(live.idle_timeout.as_millis()).unwrap_or(u32::MAX),
        features,
    };
    conn.features.set(features);
    tracing::debug!(conn = %conn.id, peer = %conn.addr, "client joined the bus");
    shard.push(conn, Frame::Welcome(welcome).to_bytes());
}

/// Refuses a login: counted, logged (rate-limited), `ERROR AUTH_FAILED`
/// and closed. A refusal by the limiter itself does not count against
/// the address again.
fn refuse_login(shard: &Shard, conn: &Conn, why: &str, rate_limited: bool) {
    let st = shard.stats();
    ShardStats::add(&st.auth_failures, 1);
    if rate_limited {
        ShardStats::add(&st.auth_rate_limited, 1);
    } else {
        shard.shared.auth.failed(conn.addr.ip(), Instant::now());
    }
    if crate::logging::AUTH_FAILED.allow() {
        tracing::warn!(peer = %conn.addr, "client login refused: {why}");
    }
    shard.close_with_error(
        conn,
        ErrorCode::AUTH_FAILED,
        &format!("login refused: {why}"),
    );
}

/// Waits for the pending login's password check, then welcomes or
/// refuses the client. The reader handles nothing else meanwhile.
pub(super) async fn finish_login(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    let Some(pending) = conn.login.borrow_mut().take() else {
        return;
    };
    let ok = tokio::select! {
        r = pending.answer => r.unwrap_or(false),
        () = conn.closing() => return,
    };
    shard.tick();
    if conn.out.phase() != Phase::Open {
        return;
    }
    let _producing = shard.producing(Some(conn.gate.clone()));
    if ok {
        let user = pending.grant.user.clone();
        let _ = conn.grant.set(pending.grant);
        tracing::debug!(conn = %conn.id, user, "client logged in");
        send_welcome(shard, conn, pending.features);
    } else {
        refuse_login(shard, conn, "unknown user or wrong password", false);
    }
    shard.wake_owed();
    super::io::submit_pending(shard.uring);
}

/// What of `frame` the grant does not allow, as the start of the
/// `PERMISSION_DENIED` message (PROTOCOL.md section 9); `None` when it is
/// allowed (or not a request the permissions cover). Sizes are checked
/// after: a denied frame is not looked at further.
fn denied(grant: &Grant, frame: &Frame) -> Option<String> {
    let p = &grant.perms;
    match frame {
        Frame::Publish { group, .. } if !p.publish.matches(group.as_bytes()) => {
            Some(format!("PUBLISH {group}"))
        }
        Frame::Join { group, .. } if !p.join.matches(group.as_bytes()) => {
            Some(format!("JOIN {group}"))
        }
        Frame::Send { to, .. } if !p.send => Some(format!("SEND {to}")),
        Frame::MembersRequest { req, group } if !p.members => {
            Some(format!("MEMBERS_REQUEST {req} {group}"))
        }
        Frame::StatsRequest { req } if !p.stats => Some(format!("STATS_REQUEST {req}")),
        _ => None,
    }
}

/// Answers a request the user may not make: `ERROR PERMISSION_DENIED`,
/// counted; the connection stays open.
fn deny(shard: &Shard, conn: &Conn, grant: &Grant, what: &str) {
    ShardStats::add(&shard.stats().permission_denials, 1);
    if crate::logging::PERMISSION_DENIED.allow() {
        tracing::info!(conn = %conn.id, user = grant.user, "not permitted: {what}");
    }
    let message = format!("{what}: not permitted for user {}", grant.user);
    let frame = Frame::Error {
        code: ErrorCode::PERMISSION_DENIED,
        message,
    };
    shard.push(conn, frame.to_bytes());
}
