//! Peer authentication on the shards: sends and checks the handshake
//! frames that [`crate::cluster::auth`] decides on, and keeps each
//! connection's half-done handshake ([`PeerAuth`], in `Conn::peer_auth`).
//!
//! The accepting side admits a peer (`link::admit`: the step that can
//! replace its existing link) only after the dialler's `PROOF` checks out,
//! so a peer that cannot prove the key never touches the real link.

use super::link;
use crate::cluster::auth::{self, Acceptor, AuthError, Dialler, OnHello};
use crate::config::ClusterKey;
use crate::protocol::{ErrorCode, Frame, Hello, AUTH_LEN, PROTOCOL_VERSION};
use crate::server::conn::{Conn, Reject};
use crate::server::shard::Shard;
use crate::stats::ShardStats;
use std::rc::Rc;

/// A connection's peer handshake in progress.
#[derive(Debug)]
pub enum PeerAuth {
    /// We accepted: `CHALLENGE` sent, waiting for the dialler's `PROOF`.
    Accepting {
        /// The peer's index.
        i: usize,
        /// Its node name.
        name: String,
        /// Its `HELLO` (admitted once it has proved the key).
        hello: Box<Hello>,
        /// The key in force when it said `HELLO`.
        key: ClusterKey,
        /// What its `PROOF` is checked against.
        acceptor: Acceptor,
    },
    /// We dialled with a key: waiting for `CHALLENGE`, then `WELCOME`.
    Dialling {
        /// The key in force at the dial.
        key: ClusterKey,
        /// The dialler's state.
        dialler: Dialler,
    },
}

/// Counts and logs a refused handshake (rate-limited), and says why.
fn refuse(shard: &Shard, conn: &Conn, name: &str, e: &AuthError) -> Reject {
    ShardStats::add(&shard.stats().peer_auth_failures, 1);
    if crate::logging::PEER_REFUSED.allow() {
        tracing::warn!(peer = %conn.addr, name, "refused a peer link: {e}");
    }
    (ErrorCode::NOT_ALLOWED, e.to_string())
}

/// A fresh nonce, or the refusal to give when the system has none.
fn fresh_nonce() -> Result<[u8; AUTH_LEN], Reject> {
    auth::nonce().map_err(|e| {
        let msg = format!("no random nonce for the peer handshake: {e}");
        tracing::error!("{msg}");
        (ErrorCode::NOT_ALLOWED, msg)
    })
}

/// A peer `HELLO` passed its name and address checks (peer `i`, `name`):
/// true when a `CHALLENGE` went out and admission waits for the `PROOF`,
/// false when the link is admitted as before (no key here, none asked).
///
/// # Errors
/// `NOT_ALLOWED` when the peer cannot authenticate (counted).
pub fn on_hello(
    shard: &Shard,
    conn: &Conn,
    i: usize,
    name: &str,
    hello: &Hello,
) -> Result<bool, Reject> {
    let key = shard.shared.cluster.key();
    if key.is_none() && hello.credentials.is_empty() {
        return Ok(false);
    }
    let nonce_s = fresh_nonce()?;
    let me = shard.shared.node.as_str().as_bytes();
    let verdict = Acceptor::on_hello(
        key.as_ref(),
        PROTOCOL_VERSION,
        name.as_bytes(),
        me,
        &hello.credentials,
        nonce_s,
    );
    let (mac, acceptor) = match verdict {
        Ok(OnHello::Admit) => return Ok(false),
        Ok(OnHello::Challenge { mac, pending }) => (mac, pending),
        Err(e) => return Err(refuse(shard, conn, name, &e)),
    };
    let Some(key) = key else {
        // A challenge needs a key: were this ever reached, refuse rather
        // than admit an unproven peer.
        return Err(refuse(shard, conn, name, &AuthError::NoKeyHere));
    };
    let frame = Frame::Challenge {
        nonce: acceptor.nonce_s,
        mac,
    };
    *conn.peer_auth.borrow_mut() = Some(PeerAuth::Accepting {
        i,
        name: name.to_owned(),
        hello: Box::new(hello.clone()),
        key,
        acceptor,
    });
    shard.push(conn, frame.to_bytes());
    Ok(true)
}

/// True when `conn` (not yet a client or a peer) waits for a `PROOF`.
pub fn awaits_proof(conn: &Conn) -> bool {
    matches!(*conn.peer_auth.borrow(), Some(PeerAuth::Accepting { .. }))
}

/// The frame after our `CHALLENGE`: a valid `PROOF` admits the peer.
///
/// # Errors
/// `HANDSHAKE_REQUIRED` for any other frame, `NOT_ALLOWED` for a proof
/// that does not check out (counted).
pub fn on_proof(shard: &Rc<Shard>, conn: &Rc<Conn>, frame: Frame) -> Result<(), Reject> {
    let Some(PeerAuth::Accepting {
        i,
        name,
        hello,
        key,
        acceptor,
    }) = conn.peer_auth.borrow_mut().take()
    else {
        return Err((ErrorCode::HANDSHAKE_REQUIRED, "expected PROOF".into()));
    };
    if let Frame::Error { code, message } = &frame {
        // The dialler refused our proof (another key, or none there).
        if crate::logging::PEER_REFUSED.allow() {
            tracing::warn!(peer = %conn.addr, name, code = code.name(), "peer refused our challenge: {message}");
        }
        conn.close_gracefully(None, shard.live.get().idle_timeout);
        return Ok(());
    }
    let Frame::Proof { mac } = frame else {
        let msg = "expected PROOF after CHALLENGE".to_string();
        return Err((ErrorCode::HANDSHAKE_REQUIRED, msg));
    };
    if let Err(e) = acceptor.on_proof(&key, &mac) {
        return Err(refuse(shard, conn, &name, &e));
    }
    if shard.shared.cluster.departure() != crate::cluster::leave::Phase::Serving {
        let msg = "this node is leaving the cluster";
        shard.close_with_error(conn, ErrorCode::SHUTTING_DOWN, msg);
        return Ok(());
    }
    link::admit(shard, conn, i, &name, &hello)
}

/// The credentials of our `HELLO` to peer `name` on `conn`: empty without
/// a key; with one, a fresh nonce, remembered for the `CHALLENGE`.
pub fn dial_credentials(shard: &Shard, conn: &Conn, name: &str) -> bytes::Bytes {
    let Some(key) = shard.shared.cluster.key() else {
        return bytes::Bytes::new();
    };
    let nonce_d = match fresh_nonce() {
        Ok(n) => n,
        // Nothing to prove with: the peer will refuse the empty HELLO.
        Err(_) => return bytes::Bytes::new(),
    };
    let me = shard.shared.node.as_str().as_bytes();
    let dialler = Dialler::new(PROTOCOL_VERSION, me, name.as_bytes(), nonce_d);
    *conn.peer_auth.borrow_mut() = Some(PeerAuth::Dialling { key, dialler });
    auth::credentials(&nonce_d).into()
}

/// The `CHALLENGE` answering our dial of peer `name`: answer with `PROOF`
/// when the peer proved the key.
///
/// # Errors
/// `NOT_ALLOWED` (counted) when it did not, or was not asked to.
pub fn on_challenge(
    shard: &Shard,
    conn: &Conn,
    name: &str,
    nonce: &[u8; AUTH_LEN],
    mac: &[u8; AUTH_LEN],
) -> Result<(), Reject> {
    let proof = match &mut *conn.peer_auth.borrow_mut() {
        Some(PeerAuth::Dialling { key, dialler }) => dialler.on_challenge(key, nonce, mac),
        _ if shard.shared.cluster.key().is_none() => Err(AuthError::NoKeyHere),
        _ => Err(AuthError::UnexpectedChallenge),
    };
    match proof {
        Ok(mac) => {
            shard.push(conn, Frame::Proof { mac }.to_bytes());
            Ok(())
        }
        Err(e) => Err(refuse(shard, conn, name, &e)),
    }
}

/// `WELCOME` answering our dial of peer `name`: fine without a key, or
/// once the peer proved it.
///
/// # Errors
/// `NOT_ALLOWED` (counted) when we hold a key and the peer proved nothing.
pub fn on_welcome(shard: &Shard, conn: &Conn, name: &str) -> Result<(), Reject> {
    let verdict = match conn.peer_auth.borrow_mut().take() {
        Some(PeerAuth::Dialling { dialler, .. }) => dialler.on_welcome(),
        // A key set since the dial (a reload): this link proved nothing.
        _ if shard.shared.cluster.key().is_some() => Err(AuthError::Unproven),
        _ => Ok(()),
    };
    verdict.map_err(|e| refuse(shard, conn, name, &e))
}
