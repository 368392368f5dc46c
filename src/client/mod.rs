//! An async msgc client (Momentum's `msgc_client`) for ordinary tokio
//! applications, single- or multi-threaded.
//!
//! A [`Client`] keeps one TCP connection to one server of its list, joins
//! and leaves groups, publishes to groups, sends to single members, and
//! hands everything the server tells it to the application as [`Event`]s.
//! When the connection is lost it re-dials, re-joins and says so.
//!
//! ```no_run
//! use msgc::client::{Client, ClientConfig, Event};
//!
//! # async fn demo() -> Result<(), msgc::client::ClientError> {
//! let client = Client::connect(ClientConfig::with_servers(["127.0.0.1:4809"])).await?;
//! let events = client.events();
//! client.join("orders").await?; // returns once the server has acknowledged
//! client.publish("orders", "hello").await?;
//! while let Ok(event) = events.recv_async().await {
//!     if let Event::Message { group, sender, payload } = event {
//!         println!("{group} from {sender}: {payload:?}");
//!         break;
//!     }
//! }
//! let report = client.close().await; // flushes what is queued, has it confirmed
//! assert!(report.flushed, "{} publishes may not have arrived", report.unconfirmed);
//! # Ok(()) }
//! ```
//!
//! # Inside
//! Calls put frames on a bounded queue (`max_backlog` frames). One writer
//! task per connection drains it into one buffer and writes each batch
//! with a single `write_all` (`writer.rs`); one reader task decodes and
//! dispatches (`connection.rs`). A supervisor task owns reconnecting
//! (`supervisor.rs`). The ledger (`ledger.rs`) counts publishes from
//! accepted to confirmed; the reader's gap table (`gaps.rs`) checks
//! sequence numbers.
//!
//! # What the client can tell about loss
//! - Received: with [`ClientConfig::sequenced`] (the default) the server
//!   numbers each sender's messages to each group, and a skipped number is
//!   reported as [`Event::Gap`] before the message that revealed it;
//!   [`Client::gaps`] is the running total.
//! - Sent: a publish is *confirmed* once the server has answered a PING
//!   written after it (the writer sends one per round trip at most while
//!   something is unconfirmed; [`Client::ping`] confirms all before it).
//!   [`Event::Disconnected`] says how many accepted publishes the lost
//!   connection left unconfirmed, [`Client::close`] whether everything was
//!   confirmed, and [`Client::unconfirmed`] how many are not yet.
//!
//! # Backpressure and disconnection
//! - `publish` and `send` wait while the queue is full (at most
//!   `request_timeout`, then [`ClientError::Timeout`]; a timed-out frame may
//!   still be sent). [`Client::try_publish`] never waits.
//! - While disconnected, `publish`/`send` still queue (the frames go out
//!   after reconnection) as long as there is room; with the queue full they
//!   fail at once with [`ClientError::Disconnected`]. Frames already taken
//!   by the writer of a connection that dies are lost (at most once).
//! - Requests (`join`, `members`, `stats`, `ping`) fail at once with
//!   [`ClientError::Disconnected`] while disconnected, and with it (or with
//!   [`ClientError::Server`] if the server said why) when the connection
//!   ends while they wait. `leave` succeeds while disconnected: the group is
//!   not re-joined.
//! - Events go through a channel of `max_backlog` events. A consumer that
//!   stops reading stops the reader, and so, honestly, the TCP flow: the
//!   server then sees this client as stuck. While the reader waits, replies
//!   to requests wait too, and so does reconnection (it emits events).
//!   Read [`Client::events`] if you join groups.

mod config;
mod connection;
mod error;
mod event;
mod gaps;
mod ledger;
mod names;
mod state;
mod supervisor;
mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;
use tokio::time::timeout;

use crate::protocol::{encode_publish, DecodeError, Frame, GroupName, MemberId};

pub use config::{ClientConfig, DEFAULT_MAX_MESSAGE_SIZE};
pub use error::ClientError;
pub use event::Event;
pub use gaps::MAX_SEQ_ENTRIES;
pub use ledger::CloseReport;
pub use names::IntoName;
pub use state::ServerInfo;

use connection::connect_any;
use state::{Shared, Waiter};
use supervisor::{supervise, Links};
use writer::{Out, Waited};

/// A connected msgc client. Cheap to clone; every clone is the same
/// client. `Send + Sync`.
///
/// Dropping the last clone flushes what is queued (best effort, without
/// waiting) and closes the connection; [`Client::close`] does so and waits.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// The handle's own part: dropping it is how the tasks learn the
/// application is gone.
struct Inner {
    shared: Arc<Shared>,
    queue: flume::Sender<Out>,
    events: flume::Receiver<Event>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.set_closing();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.shared.lock();
        f.debug_struct("Client")
            .field("member", &st.member)
            .field("server", &st.server.address)
            .field("connected", &st.connected)
            .finish()
    }
}

impl Client {
    /// Dials the servers in order and completes the handshake with the
    /// first that answers. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] for a bad `cfg`;
    /// [`ClientError::Connect`] when no server could be reached and greeted.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        cfg.validate()?;
        let conn = connect_any(&cfg).await?;
        let server = ServerInfo::new(&conn.server, &conn.welcome);
        let (queue_tx, queue_rx) = flume::bounded(cfg.max_backlog);
        let (events_tx, events_rx) = flume::bounded(cfg.max_backlog);
        let shared = Arc::new(Shared::new(cfg, server, conn.member.clone()));
        let links = Links {
            shared: shared.clone(),
            queue: queue_rx,
            queue_tx: queue_tx.downgrade(),
            events: events_tx,
        };
        tokio::spawn(supervise(links, conn));
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                queue: queue_tx,
                events: events_rx,
            }),
        })
    }

    /// Our member id on the current connection (a new one after each
    /// reconnection; the last one while disconnected).
    pub fn member_id(&self) -> MemberId {
        self.inner.shared.lock().member.clone()
    }

    /// The server connected to (or last connected to).
    pub fn server(&self) -> ServerInfo {
        self.inner.shared.lock().server.clone()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().connected
    }

    /// The event stream. Every call returns a handle on the same channel:
    /// each event goes to one of them. The stream ends after `close` (or
    /// once every `Client` clone is dropped).
    pub fn events(&self) -> flume::Receiver<Event> {
        self.inner.events.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.shared.cfg
    }

    /// Messages reported missing by [`Event::Gap`] so far (the sum of their
    /// `missing`), all connections.
    pub fn gaps(&self) -> u64 {
        self.inner.shared.gaps()
    }

    /// Publishes and sends accepted that the server has not confirmed yet,
    /// queued ones included (those settled by an [`Event::Disconnected`]
    /// excluded). After [`Client::ping`] returns `Ok`, everything accepted
    /// before the call is confirmed.
    pub fn unconfirmed(&self) -> u64 {
        self.inner.shared.ledger.unconfirmed()
    }

    /// Joins `group` and waits for the server's acknowledgement (our own
    /// join event); from then on every message published to it is
    /// delivered. Returns at once if the group is already joined. Joined
    /// groups are re-joined after a reconnection.
    ///
    /// # Errors
    /// [`ClientError::InvalidName`], [`ClientError::Closed`],
    /// [`ClientError::Disconnected`], [`ClientError::Server`],
    /// [`ClientError::Timeout`] (the join may still take effect).
    pub async fn join(&self, group: impl IntoName<GroupName>) -> Result<(), ClientError> {
        let group = group.into_name()?;
        self.check_open()?;
        let (rx, first) = {
            let mut st = self.inner.shared.lock();
            if st.joined.contains(&group) {
                return Ok(());
            }
            if !st.connected {
                return Err(ClientError::Disconnected);
            }
            register(&mut st.joins, &group)
        };
        let events = self.inner.shared.cfg.membership_events;
        let frame = first.then(|| Frame::Join { group, events });
        self.await_ack("join acknowledgement", frame, rx).await
    }

    /// Leaves `group` and waits for the server's acknowledgement (our own
    /// leave event). Returns at once if the group is not joined, and while
    /// disconnected (the group will not be re-joined).
    ///
    /// # Errors
    /// [`ClientError::InvalidName`], [`ClientError::Closed`],
    /// [`ClientError::Server`], [`ClientError::Timeout`].
    pub async fn leave(&self, group: impl IntoName<GroupName>) -> Result<(), ClientError> {
        let group = group.into_name()?;
        self.check_open()?;
        let (rx, first) = {
            let mut st = self.inner.shared.lock();
            let was_joined = st.joined.remove(&group);
            let pending = st.joins.contains_key(&group) || st.leaves.contains_key(&group);
            if !st.connected || !(was_joined || pending) {
                return Ok(());
            }
            register(&mut st.leaves, &group)
        };
        let frame = first.then(|| Frame::Leave { group });
        self.await_ack("leave acknowledgement", frame, rx).await
    }

    /// Publishes `payload` to every member of `group` (this client included
    /// if it has joined). Waits while the outbound queue is full.
    ///
    /// # Errors
    /// [`ClientError::InvalidName`], [`ClientError::MessageTooLarge`],
    /// [`ClientError::Closed`], [`ClientError::Disconnected`] (queue full
    /// while disconnected), [`ClientError::Timeout`] (queue full too long).
    pub async fn publish(
        &self,
        group: impl IntoName<GroupName>,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        self.enqueue(self.publish_item(group, payload)?).await
    }

    /// Validates a publish and makes its queue entry.
    fn publish_item(
        &self,
        group: impl IntoName<GroupName>,
        payload: impl Into<Bytes>,
    ) -> Result<Out, ClientError> {
        let group = group.into_name()?;
        let payload = payload.into();
        self.check_size(payload.len())?;
        Ok(Out::Publish { group, payload })
    }

    /// Like [`Client::publish`] but never waits.
    ///
    /// # Errors
    /// As `publish`, with [`ClientError::QueueFull`] instead of waiting.
    pub fn try_publish(
        &self,
        group: impl IntoName<GroupName>,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        self.try_enqueue(self.publish_item(group, payload)?)
    }

    /// Publishes every payload to `group`, in order, as one queue entry
    /// encoded by the caller: the cheapest way to publish many messages.
    /// Nothing is sent if any payload is too large. An empty batch is a
    /// no-op.
    ///
    /// # Errors
    /// As [`Client::publish`].
    pub async fn publish_batch<I>(
        &self,
        group: impl IntoName<GroupName>,
        payloads: I,
    ) -> Result<(), ClientError>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let group = group.into_name()?;
        let mut buf = BytesMut::new();
        let mut count = 0u64;
        for payload in payloads {
            let payload = payload.as_ref();
            self.check_size(payload.len())?;
            encode_publish(&mut buf, &group, payload);
            count += 1;
        }
        if buf.is_empty() {
            return Ok(());
        }
        let bytes = buf.freeze();
        self.enqueue(Out::Encoded { bytes, count }).await
    }

    /// Sends `payload` to one member (delivered as [`Event::Direct`]). An
    /// unknown member is not an error: the server drops and counts it.
    ///
    /// # Errors
    /// As [`Client::publish`].
    pub async fn send(
        &self,
        member: impl IntoName<MemberId>,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        let to = member.into_name()?;
        let payload = payload.into();
        self.check_size(payload.len())?;
        self.enqueue(Out::Frame(Frame::Send { to, payload })).await
    }

    /// The group's members, cluster-wide, sorted (empty for an unknown
    /// group).
    ///
    /// # Errors
    /// [`ClientError::InvalidName`], [`ClientError::Closed`],
    /// [`ClientError::Disconnected`], [`ClientError::Server`],
    /// [`ClientError::Timeout`].
    pub async fn members(
        &self,
        group: impl IntoName<GroupName>,
    ) -> Result<Vec<MemberId>, ClientError> {
        let group = group.into_name()?;
        self.request("members reply", |id, tx| {
            let waiter = Waiter::Members {
                parts: Vec::new(),
                tx,
            };
            (
                waiter,
                Frame::MembersRequest {
                    req: id as u32,
                    group,
                },
            )
        })
        .await
    }

    /// The server's counters, as the JSON object it sends (fields vary by
    /// server version: read them generically).
    ///
    /// # Errors
    /// As [`Client::members`], and [`ClientError::Protocol`] when the reply
    /// is not JSON.
    pub async fn stats(&self) -> Result<serde_json::Value, ClientError> {
        let json = self
            .request("stats reply", |id, tx| {
                (Waiter::Stats(tx), Frame::StatsRequest { req: id as u32 })
            })
            .await?;
        serde_json::from_slice(&json)
            .map_err(|_| ClientError::Protocol(DecodeError::Malformed("stats reply is not JSON")))
    }

    /// Round-trip time of a PING through the queue, the server and back.
    /// When it returns `Ok`, every publish and send accepted before the
    /// call is confirmed (see [`Client::unconfirmed`]).
    ///
    /// # Errors
    /// As [`Client::members`].
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        self.request("pong", |id, tx| {
            (Waiter::Pong(tx), Frame::Ping { token: id })
        })
        .await?;
        Ok(start.elapsed())
    }

    /// Flushes what is queued, has the server confirm it (a PING, whose
    /// PONG it awaits), closes the connection (after the server has closed
    /// its side, so nothing sent is lost to a reset) and stops
    /// reconnecting. Later calls on any clone fail with
    /// [`ClientError::Closed`]; calling `close` again waits for the first
    /// to finish and reports the same. The event stream ends.
    ///
    /// Waits at most `request_timeout` in all; the report says what was
    /// not confirmed by then. The PONG is read like any frame: an
    /// application that stopped reading [`Client::events`] while the
    /// channel is full gets `flushed: false` after the bound.
    pub async fn close(&self) -> CloseReport {
        let shared = &self.inner.shared;
        let mut finished = shared.finished();
        let bound = shared.cfg.request_timeout;
        if shared.set_closing() {
            let _ = timeout(bound, finished.wait_for(|done| *done)).await;
            return shared.ledger.close_report();
        }
        let wait = async {
            // The supervisor may stop (if disconnected) before `Close` finds
            // room in the queue: stop waiting for room then.
            tokio::select! {
                _ = self.inner.queue.send_async(Out::Close) => {}
                _ = finished.wait_for(|done| *done) => {}
            }
            let _ = finished.wait_for(|done| *done).await;
        };
        let _ = timeout(bound, wait).await;
        shared.ledger.close_report()
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if self.inner.shared.is_closing() {
            Err(ClientError::Closed)
        } else {
            Ok(())
        }
    }

    fn check_size(&self, size: usize) -> Result<(), ClientError> {
        self.check_open()?;
        let max = self.inner.shared.send_limit();
        if size > max {
            return Err(ClientError::MessageTooLarge { size, max });
        }
        Ok(())
    }

    /// Queues a frame, waiting (bounded) for room while connected. Its
    /// messages count as accepted from just before the first try; if it
    /// is not queued after all they are taken back.
    async fn enqueue(&self, out: Out) -> Result<(), ClientError> {
        let shared = &self.inner.shared;
        let n = out.messages();
        shared.ledger.accept(n);
        let out = match self.inner.queue.try_send(out) {
            Ok(()) => return Ok(()),
            Err(flume::TrySendError::Disconnected(_)) => {
                shared.ledger.unaccept(n);
                return Err(ClientError::Closed);
            }
            Err(flume::TrySendError::Full(out)) => out,
        };
        if !self.is_connected() {
            shared.ledger.unaccept(n);
            return Err(ClientError::Disconnected);
        }
        // From here the item may be taken even if this call gives up: the
        // wrapper takes its messages back only if it is dropped untaken.
        let out = Waited::wrap(out, shared.clone());
        let bound = shared.cfg.request_timeout;
        match timeout(bound, self.inner.queue.send_async(out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout {
                what: "room in the outbound queue",
                after: bound,
            }),
        }
    }

    fn try_enqueue(&self, out: Out) -> Result<(), ClientError> {
        let ledger = &self.inner.shared.ledger;
        let n = out.messages();
        ledger.accept(n);
        let result = match self.inner.queue.try_send(out) {
            Ok(()) => return Ok(()),
            Err(flume::TrySendError::Disconnected(_)) => Err(ClientError::Closed),
            Err(flume::TrySendError::Full(_)) if !self.is_connected() => {
                Err(ClientError::Disconnected)
            }
            Err(flume::TrySendError::Full(_)) => {
                Err(ClientError::QueueFull(self.inner.shared.cfg.max_backlog))
            }
        };
        ledger.unaccept(n);
        result
    }

    /// Sends `frame` (if any) and waits for `rx`, all within `request_timeout`.
    async fn await_ack(
        &self,
        what: &'static str,
        frame: Option<Frame>,
        rx: oneshot::Receiver<Result<(), ClientError>>,
    ) -> Result<(), ClientError> {
        let bound = self.inner.shared.cfg.request_timeout;
        let wait = async {
            if let Some(frame) = frame {
                self.inner
                    .queue
                    .send_async(Out::Frame(frame))
                    .await
                    .map_err(|_| ClientError::Closed)?;
            }
            rx.await.unwrap_or(Err(ClientError::Disconnected))
        };
        timeout(bound, wait)
            .await
            .map_err(|_| ClientError::Timeout { what, after: bound })?
    }

    /// Registers a waiter under a fresh id, sends the frame `make` builds,
    /// and waits for the reply, all within `request_timeout`.
    async fn request<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(u64, oneshot::Sender<Result<T, ClientError>>) -> (Waiter, Frame),
    ) -> Result<T, ClientError> {
        self.check_open()?;
        let id = u64::from(self.inner.shared.next_id());
        let (tx, rx) = oneshot::channel();
        let (waiter, frame) = make(id, tx);
        {
            let mut st = self.inner.shared.lock();
            if !st.connected {
                return Err(ClientError::Disconnected);
            }
            st.requests.insert(id, waiter);
        }
        let bound = self.inner.shared.cfg.request_timeout;
        let wait = async {
            self.inner
                .queue
                .send_async(Out::Frame(frame))
                .await
                .map_err(|_| ClientError::Closed)?;
            rx.await.unwrap_or(Err(ClientError::Disconnected))
        };
        let result = timeout(bound, wait).await;
        if result.is_err() {
            self.inner.shared.take_waiter(id);
        }
        result.map_err(|_| ClientError::Timeout { what, after: bound })?
    }
}

/// Adds a waiter for `group`; also says whether it is the first (which
/// must send the frame; later ones ride on its acknowledgement).
fn register(
    waiters: &mut std::collections::HashMap<GroupName, Vec<state::Ack>>,
    group: &GroupName,
) -> (oneshot::Receiver<Result<(), ClientError>>, bool) {
    let (tx, rx) = oneshot::channel();
    let list = waiters.entry(group.clone()).or_default();
    // Waiters whose callers gave up (timeout, dropped future) do not count:
    // the first may have been dropped before its frame was queued.
    list.retain(|w| !w.is_closed());
    list.push(tx);
    (rx, list.len() == 1)
}
