//! What the client's tasks share: the config, the current connection's
//! facts, the groups joined, and the waiters of outstanding requests.
//!
//! Owns matching server frames to waiters (join/leave acknowledgements by
//! group, replies by request id, confirmation PONGs to the [`Ledger`]) and
//! failing them when a connection ends. It does no I/O: the reader calls
//! [`Shared::on_frame`], the supervisor [`Shared::on_connected`] and
//! [`Shared::on_disconnected`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch, Notify};

use crate::protocol::{features, Frame, GroupName, MemberId, NodeName, Reason, Welcome};

use super::config::ClientConfig;
use super::error::ClientError;
use super::event::Event;
use super::ledger::{Ledger, CONFIRM};

/// Completes a join or leave (or a `close`).
pub(crate) type Ack = oneshot::Sender<Result<(), ClientError>>;

/// A join's acknowledgement, awaited.
pub(crate) type JoinAck = oneshot::Receiver<Result<(), ClientError>>;

/// Facts about the server the client is connected to (or was, last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The server as configured (`host:port`).
    pub address: String,
    /// The server's node name (from WELCOME).
    pub node: NodeName,
    /// Largest payload the server accepts, in bytes.
    pub max_message_size: u32,
    /// The server's idle timeout: it closes connections silent for longer.
    pub idle_timeout: Duration,
    /// Whether the server granted sequenced deliveries (asked for when
    /// [`ClientConfig::sequenced`] is set): only then are gaps detected
    /// ([`Event::Gap`]).
    pub sequenced: bool,
}

impl ServerInfo {
    pub(crate) fn new(address: &str, w: &Welcome) -> Self {
        ServerInfo {
            address: address.to_string(),
            node: w.node.clone(),
            max_message_size: w.max_message_size,
            idle_timeout: Duration::from_millis(u64::from(w.idle_timeout_ms)),
            sequenced: w.features & features::SEQ != 0,
        }
    }
}

/// A request waiting for its reply, keyed by request id (or ping token).
pub(crate) enum Waiter {
    /// `members`: parts collected so far.
    Members {
        parts: Vec<MemberId>,
        tx: oneshot::Sender<Result<Vec<MemberId>, ClientError>>,
    },
    /// `stats`: the JSON text.
    Stats(oneshot::Sender<Result<Bytes, ClientError>>),
    /// `ping`.
    Pong(Ack),
}

impl Waiter {
    fn fail(self, err: ClientError) {
        // A waiter whose caller gave up is simply dropped.
        match self {
            Waiter::Members { tx, .. } => drop(tx.send(Err(err))),
            Waiter::Stats(tx) => drop(tx.send(Err(err))),
            Waiter::Pong(tx) => drop(tx.send(Err(err))),
        }
    }
}

/// Mutable state, behind [`Shared::state`]. Never held across an await.
pub(crate) struct State {
    /// A connection is up (requests may be sent).
    pub connected: bool,
    /// Our member id on the current (or last) connection.
    pub member: MemberId,
    /// Our member id on the connection a move left (its leave events are
    /// the move's own business, not the application's).
    pub previous: Option<MemberId>,
    /// The current (or last) server.
    pub server: ServerInfo,
    /// Groups the server has acknowledged us in; re-joined on reconnect.
    /// `leave` removes at once, so a left group is never re-joined.
    pub joined: HashSet<GroupName>,
    /// Join waiters by group; completed by our own join event.
    pub joins: HashMap<GroupName, Vec<Ack>>,
    /// Leave waiters by group; completed by our own leave event.
    pub leaves: HashMap<GroupName, Vec<Ack>>,
    /// Other requests by id.
    pub requests: HashMap<u64, Waiter>,
}

/// Everything the client handle and its tasks share.
pub(crate) struct Shared {
    /// The configuration, fixed for the client's life.
    pub cfg: ClientConfig,
    /// See [`State`].
    state: Mutex<State>,
    /// Largest payload we send: min(ours, server's).
    send_limit: AtomicUsize,
    /// Source of request ids and ping tokens.
    next_req: AtomicU32,
    /// `close` was called or the handle dropped: no new work, no reconnect.
    closing: AtomicBool,
    /// Wakes the supervisor out of its re-dial wait when closing.
    pub stop: Notify,
    /// Set once the supervisor has stopped.
    finished: watch::Sender<bool>,
    /// Publishes and sends accepted, written, confirmed.
    pub ledger: Ledger,
    /// Messages reported missing by [`Event::Gap`], all connections.
    gaps: AtomicU64,
    /// The server asked us to move (`MOVE`).
    pub move_asked: Notify,
    /// The `MOVE`'s deadline, in ms from when it came.
    move_deadline_ms: AtomicU64,
}

impl Shared {
    pub(crate) fn new(cfg: ClientConfig, server: ServerInfo, member: MemberId) -> Self {
        let limit = cfg.max_message_size.min(server.max_message_size as usize);
        Shared {
            cfg,
            state: Mutex::new(State {
                connected: true,
                member,
                previous: None,
                server,
                joined: HashSet::new(),
                joins: HashMap::new(),
                leaves: HashMap::new(),
                requests: HashMap::new(),
            }),
            send_limit: AtomicUsize::new(limit),
            next_req: AtomicU32::new(1),
            closing: AtomicBool::new(false),
            stop: Notify::new(),
            finished: watch::Sender::new(false),
            ledger: Ledger::default(),
            gaps: AtomicU64::new(0),
            move_asked: Notify::new(),
            move_deadline_ms: AtomicU64::new(0),
        }
    }

    /// The server said `MOVE`: it closes the connection within `deadline_ms`.
    pub(crate) fn ask_move(&self, deadline_ms: u32) {
        self.move_deadline_ms
            .store(u64::from(deadline_ms), Ordering::Relaxed);
        self.move_asked.notify_one();
    }

    /// How long the last `MOVE` gave us.
    pub(crate) fn move_deadline(&self) -> Duration {
        Duration::from_millis(self.move_deadline_ms.load(Ordering::Relaxed))
    }

    /// A move's new connection is up (not yet joined): from now on
    /// `member` is ours and the old one's events are not the
    /// application's. Registers a join waiter for every group to re-join
    /// there; returns them, with what to restore if the move fails.
    pub(crate) fn on_moving(
        &self,
        server: ServerInfo,
        member: MemberId,
    ) -> (Vec<(GroupName, JoinAck)>, (ServerInfo, MemberId)) {
        let before = {
            let mut st = self.lock();
            let old = std::mem::replace(&mut st.member, member.clone());
            st.previous = Some(old.clone());
            (st.server.clone(), old)
        };
        let acks = self.on_connected(server, member);
        (acks, before)
    }

    /// A move failed before the handover: the old connection is ours again.
    pub(crate) fn move_failed(&self, (server, member): (ServerInfo, MemberId)) {
        let mut st = self.adopt(server, member);
        st.previous = None;
        st.joins.clear();
    }

    /// Makes `server` (as member `member`) the connection in use: its
    /// payload limit applies from now on. Returns the locked state.
    fn adopt(&self, server: ServerInfo, member: MemberId) -> MutexGuard<'_, State> {
        let limit = self
            .cfg
            .max_message_size
            .min(server.max_message_size as usize);
        self.send_limit.store(limit, Ordering::Relaxed);
        let mut st = self.lock();
        st.member = member;
        st.server = server;
        st
    }

    /// Locks the state. A panic while it was held cannot leave it
    /// inconsistent in a way that matters more than stopping, so poisoning
    /// is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The largest payload that may be sent now.
    pub(crate) fn send_limit(&self) -> usize {
        self.send_limit.load(Ordering::Relaxed)
    }

    /// A fresh request id.
    pub(crate) fn next_id(&self) -> u32 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `close` was called (or the handle dropped).
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Marks the client closing; returns whether it already was.
    pub(crate) fn set_closing(&self) -> bool {
        let was = self.closing.swap(true, Ordering::AcqRel);
        self.stop.notify_one();
        was
    }

    /// The supervisor has stopped.
    pub(crate) fn finish(&self) {
        self.finished.send_replace(true);
    }

    /// Watches for the supervisor's end (see [`Shared::finish`]).
    pub(crate) fn finished(&self) -> watch::Receiver<bool> {
        self.finished.subscribe()
    }

    /// Counts messages reported missing.
    pub(crate) fn add_gaps(&self, missing: u64) {
        self.gaps.fetch_add(missing, Ordering::Relaxed);
    }

    /// Messages reported missing so far.
    pub(crate) fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }

    /// A new connection is up: records its facts and registers a join
    /// waiter for every group to re-join. Returns the groups and waiters.
    pub(crate) fn on_connected(
        &self,
        server: ServerInfo,
        member: MemberId,
    ) -> Vec<(GroupName, oneshot::Receiver<Result<(), ClientError>>)> {
        let mut st = self.adopt(server, member);
        st.connected = true;
        let groups: Vec<GroupName> = st.joined.iter().cloned().collect();
        groups
            .into_iter()
            .map(|g| {
                let (tx, rx) = oneshot::channel();
                st.joins.entry(g.clone()).or_default().push(tx);
                (g, rx)
            })
            .collect()
    }

    /// The connection ended: fails every waiter with `err()` (leave waiters
    /// succeed: a lost connection leaves every group, and a left group is
    /// not re-joined).
    pub(crate) fn on_disconnected(&self, err: impl Fn() -> ClientError) {
        let (joins, leaves, requests) = {
            let mut st = self.lock();
            st.connected = false;
            (
                std::mem::take(&mut st.joins),
                std::mem::take(&mut st.leaves),
                std::mem::take(&mut st.requests),
            )
        };
        for tx in joins.into_values().flatten() {
            let _ = tx.send(Err(err()));
        }
        for tx in leaves.into_values().flatten() {
            let _ = tx.send(Ok(()));
        }
        for waiter in requests.into_values() {
            waiter.fail(err());
        }
    }

    /// Handles one frame from the server other than a delivery (which the
    /// reader turns into events itself, checking its sequence number).
    /// Returns the event to hand to the application, if any, or
    /// `Err(frame)` for a frame the reader must treat as the end of the
    /// connection (`ERROR`, or one a server may not send).
    pub(crate) fn on_frame(&self, frame: Frame) -> Result<Option<Event>, Frame> {
        Ok(match frame {
            Frame::Direct { sender, payload } => Some(Event::Direct { sender, payload }),
            Frame::Membership {
                group,
                subject,
                reason,
                size,
            } => self.on_membership(group, subject, reason, size),
            Frame::MembersReply {
                req, last, members, ..
            } => {
                self.on_members(req, last, members);
                None
            }
            Frame::StatsReply { req, json } => {
                if let Some(Waiter::Stats(tx)) = self.take_waiter(u64::from(req)) {
                    let _ = tx.send(Ok(json));
                }
                None
            }
            Frame::Pong { token } if token & CONFIRM != 0 => {
                self.ledger.confirm(token & !CONFIRM);
                None
            }
            Frame::Pong { token } => {
                if let Some(Waiter::Pong(tx)) = self.take_waiter(token) {
                    let _ = tx.send(Ok(()));
                }
                None
            }
            Frame::Noop => None,
            other => return Err(other),
        })
    }

    fn on_membership(
        &self,
        group: GroupName,
        subject: Bytes,
        reason: Reason,
        size: u32,
    ) -> Option<Event> {
        let mut st = self.lock();
        if st
            .previous
            .as_ref()
            .is_some_and(|p| p.as_bytes() == subject.as_ref())
        {
            // The old connection's own events during a move.
            return None;
        }
        if subject.as_ref() == st.member.as_bytes() {
            let acks = match reason {
                Reason::Join => {
                    st.joined.insert(group.clone());
                    st.joins.remove(&group)
                }
                Reason::Leave | Reason::Disconnect => {
                    st.joined.remove(&group);
                    st.leaves.remove(&group)
                }
                Reason::NodeDown | Reason::NodeLeft => None,
            };
            for tx in acks.into_iter().flatten() {
                let _ = tx.send(Ok(()));
            }
        }
        drop(st);
        let subject = String::from_utf8_lossy(&subject).into_owned();
        Some(Event::Membership {
            group,
            subject,
            reason,
            size,
        })
    }

    fn on_members(&self, req: u32, last: bool, members: Vec<MemberId>) {
        let mut st = self.lock();
        let key = u64::from(req);
        if let Some(Waiter::Members { parts, .. }) = st.requests.get_mut(&key) {
            parts.extend(members);
            if last {
                if let Some(Waiter::Members { parts, tx }) = st.requests.remove(&key) {
                    let _ = tx.send(Ok(parts));
                }
            }
        }
    }

    /// A `PERMISSION_DENIED` from the server: fails the join, members or
    /// stats request it names (its message starts with the request,
    /// PROTOCOL.md section 9) and returns the event for the application.
    pub(crate) fn on_denied(&self, message: String) -> Event {
        let err = || ClientError::PermissionDenied {
            message: message.clone(),
        };
        let head = message.split(':').next().unwrap_or("");
        let mut words = head.split(' ');
        match (words.next(), words.next()) {
            (Some("JOIN"), Some(group)) => {
                let acks = GroupName::from_str_checked(group)
                    .ok()
                    .and_then(|g| self.lock().joins.remove(&g));
                for tx in acks.into_iter().flatten() {
                    let _ = tx.send(Err(err()));
                }
            }
            (Some("MEMBERS_REQUEST" | "STATS_REQUEST"), Some(req)) => {
                match req.parse::<u64>().ok().and_then(|r| self.take_waiter(r)) {
                    Some(Waiter::Members { tx, .. }) => {
                        let _ = tx.send(Err(err()));
                    }
                    Some(Waiter::Stats(tx)) => {
                        let _ = tx.send(Err(err()));
                    }
                    Some(Waiter::Pong(tx)) => {
                        let _ = tx.send(Err(err()));
                    }
                    None => {}
                }
            }
            _ => {}
        }
        Event::Denied { message }
    }

    /// Removes and returns the waiter of request `id`.
    pub(crate) fn take_waiter(&self, id: u64) -> Option<Waiter> {
        self.lock().requests.remove(&id)
    }
}
