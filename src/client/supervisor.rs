//! The supervisor: one task per client that owns the connection's life.
//!
//! It runs a connection's reader and writer, notices when either ends,
//! fails the requests that were waiting, settles the publishes the lost
//! connection left unconfirmed and emits [`Event::Disconnected`] with them,
//! re-dials the server list every `reconnect_interval`, re-joins the groups
//! the application had joined and emits [`Event::Reconnected`]. It stops
//! when the client is closed or every handle is dropped; its end drops the
//! last event sender, which ends the application's event stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::protocol::{max_frame_for, Events, Frame, GroupName, MemberId};

use super::connection::{connect_any, connect_one, read_loop, Conn, End, Hold, ReadCtx};
use super::error::ClientError;
use super::event::Event;
use super::gaps::Gaps;
use super::state::{ServerInfo, Shared};
use super::writer::{write_loop, Out, Writer};

/// What the supervisor holds: the shared state, the consuming end of the
/// outbound queue, and the producing end of the event channel.
pub(crate) struct Links {
    pub shared: Arc<Shared>,
    pub queue: flume::Receiver<Out>,
    /// The queue's producing end, for a move's handover (weak: the
    /// client's handles alone keep the queue open).
    pub queue_tx: flume::WeakSender<Out>,
    pub events: flume::Sender<Event>,
}

/// Longest wait, after `close` has flushed and shut down our side, for the
/// server to close its side (what it sends meanwhile is still delivered).
const MAX_LINGER: Duration = Duration::from_secs(2);

/// Join acknowledgements awaited after a reconnection.
type Rejoin = Vec<(GroupName, oneshot::Receiver<Result<(), ClientError>>)>;

/// Runs until the client is closed or dropped. `first` is the connection
/// [`Client::connect`](super::Client::connect) made; its facts are already
/// in the shared state.
pub(crate) async fn supervise(links: Links, first: Conn) {
    run_all(&links, first).await;
    drain(&links.queue);
    links.shared.finish();
}

/// The connection loop, until the client is closed or dropped.
async fn run_all(links: &Links, first: Conn) {
    let mut next = Some((first, None));
    while let Some((conn, rejoin)) = next.take() {
        let end = run(links, conn, rejoin).await;
        links.shared.on_disconnected(|| end.waiter_error());
        if let End::Closing { flushed } = end {
            tracing::debug!(flushed, "msgc client: closed");
            return;
        }
        if matches!(end, End::ClientGone) || links.shared.is_closing() {
            return;
        }
        let reason = end.reason();
        let lost = links.shared.ledger.settle();
        tracing::warn!(
            %reason,
            unconfirmed = lost.total,
            queued = lost.queued,
            "msgc client: connection lost"
        );
        let event = Event::Disconnected {
            reason,
            unconfirmed: lost.total,
            queued: lost.queued,
        };
        if links.events.send_async(event).await.is_err() {
            return;
        }
        next = redial(links).await.map(|conn| {
            let info = ServerInfo::new(&conn.server, &conn.welcome);
            let acks = links.shared.on_connected(info, conn.member.clone());
            (conn, Some(acks))
        });
    }
}

/// Empties the queue once no connection will carry it. What it held was
/// accepted and stays counted (`CloseReport::unsent`).
fn drain(queue: &flume::Receiver<Out>) {
    let (mut frames, mut messages) = (0usize, 0u64);
    for item in queue.drain().map(Out::taken) {
        if !matches!(item, Out::Close | Out::Handover { .. }) {
            frames += 1;
            messages += item.messages();
        }
    }
    if frames > 0 {
        tracing::warn!(
            frames,
            messages,
            "msgc client: stopped with frames still queued"
        );
    }
}

/// Re-dials every `reconnect_interval` until a server answers; `None` when
/// the client is closed meanwhile.
async fn redial(links: &Links) -> Option<Conn> {
    let shared = &links.shared;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.cfg.reconnect_interval) => {}
            _ = shared.stop.notified() => {}
        }
        if shared.is_closing() || links.queue.is_disconnected() {
            return None;
        }
        tokio::select! {
            result = connect_any(&shared.cfg) => match result {
                Ok(conn) => return Some(conn),
                Err(e) => tracing::info!(error = %e, "msgc client: reconnect failed"),
            },
            _ = shared.stop.notified() => return None,
        }
    }
}

/// Runs one connection to its end. With `rejoin`, first re-sends JOIN for
/// every group and emits [`Event::Reconnected`] once all are acknowledged.
async fn run(links: &Links, mut conn: Conn, rejoin: Option<Rejoin>) -> End {
    let cfg = &links.shared.cfg;
    if let Some(acks) = &rejoin {
        let groups = acks.iter().map(|(g, _)| g);
        let events = cfg.membership_events;
        if let Err(end) = send_joins(&mut conn, groups, events, cfg.idle_timeout).await {
            return end;
        }
    }
    let mut tasks = Tasks::spawn(links, conn, None, None);
    let end = drive(links, &mut tasks, rejoin).await;
    // The writer must have stopped before its counts are settled.
    tasks.stop().await;
    end
}

/// Runs the tasks of a connection to their end; see [`run`]. A `MOVE`
/// from the server moves the client to its next server meanwhile
/// ([`move_on`]); the tasks are then the new connection's.
async fn drive(links: &Links, tasks: &mut Tasks, rejoin: Option<Rejoin>) -> End {
    let cfg = &links.shared.cfg;
    if let Some(acks) = rejoin {
        // `Reconnected` promises that every group is joined again: a
        // re-join that fails or is not acknowledged drops this connection
        // and redials.
        tokio::select! {
            end = tasks.finished() => return end,
            res = await_rejoin(acks, cfg.request_timeout) => {
                if let Err(end) = res {
                    return end;
                }
            }
        }
        let (server, member) = (tasks.server.clone(), tasks.member.clone());
        tracing::info!(%server, %member, "msgc client: reconnected");
        if links
            .events
            .send_async(Event::Reconnected { server, member })
            .await
            .is_err()
        {
            return End::ClientGone;
        }
    }
    loop {
        tokio::select! {
            end = tasks.finished() => return end,
            _ = links.shared.move_asked.notified() => {
                if let Some(end) = move_on(links, tasks).await {
                    return end;
                }
            }
        }
    }
}

/// The server is leaving (`MOVE`): connects to the next configured server
/// (after this one, in order), re-joins every group there, and hands over:
/// the old connection leaves its groups behind everything queued before
/// (confirmed), and its reader delivers up to its last frame while the new
/// one holds its deliveries; then the new one delivers what the old did
/// not (see [`Hold`]). With no other server answering, the client stays
/// until the server closes the connection (then reconnects as usual).
/// `Some(end)` when the client is gone meanwhile.
async fn move_on(links: &Links, tasks: &mut Tasks) -> Option<End> {
    let shared = &links.shared;
    let cfg = &shared.cfg;
    let deadline = tokio::time::Instant::now() + shared.move_deadline();
    let from = tasks.server.clone();
    let Some(conn) = next_server(cfg, &from, deadline).await else {
        tracing::warn!(server = %from, "msgc client: the server is leaving and no other server answers; staying until it closes");
        return None;
    };
    let server = conn.server.clone();
    let info = ServerInfo::new(&conn.server, &conn.welcome);
    let (acks, before) = shared.on_moving(info, conn.member.clone());
    let groups: Vec<GroupName> = acks.iter().map(|(g, _)| g.clone()).collect();
    let mut conn = conn;
    if send_joins(
        &mut conn,
        groups.iter(),
        cfg.membership_events,
        cfg.idle_timeout,
    )
    .await
    .is_err()
    {
        shared.move_failed(before);
        return None;
    }
    let (release, hold) = oneshot::channel();
    let (start, gate) = oneshot::channel();
    let mut next = Tasks::spawn(links, conn, Some((hold, gate)), Some(tasks.gaps.clone()));
    let joined = tokio::select! {
        end = next.finished() => Err(end.reason()),
        res = await_rejoin(acks, cfg.request_timeout) => res.map_err(|end| end.reason()),
    };
    if let Err(why) = joined {
        tracing::warn!(%server, %why, "msgc client: move failed; staying until the server closes");
        shared.move_failed(before);
        return None;
    }
    // Everything queued before this goes on the old connection, which
    // then leaves the groups (confirmed) and shuts its side down.
    let item = Out::Handover {
        conn: tasks.id,
        groups,
    };
    if links.queue.is_disconnected() || shared_queue_send(links, item).await.is_err() {
        return Some(End::ClientGone);
    }
    let bound = cfg.request_timeout + cfg.idle_timeout;
    let flushed = match timeout(bound, &mut tasks.writer).await {
        Ok(Ok(End::Handover { flushed })) => flushed,
        _ => false,
    };
    tasks.writer.abort();
    let _ = start.send(());
    // The old reader runs to the end of its stream (the server closes
    // once it has read ours), delivering what was on its way.
    let _ = timeout(bound, &mut tasks.reader).await;
    tasks.reader.abort();
    let _ = release.send(());
    let member = next.member.clone();
    *tasks = next;
    tracing::info!(%from, %server, %member, flushed, "msgc client: moved (the server is leaving)");
    let event = Event::Moved {
        from,
        server,
        member,
    };
    if links.events.send_async(event).await.is_err() {
        return Some(End::ClientGone);
    }
    None
}

/// Queues `item` behind what the application queued.
async fn shared_queue_send(links: &Links, item: Out) -> Result<(), ()> {
    let tx = links.queue_tx.upgrade().ok_or(())?;
    tx.send_async(item).await.map_err(|_| ())
}

/// The first server after `current` in the configured order (wrapping
/// round, `current` itself excluded) to complete a handshake by `deadline`.
async fn next_server(
    cfg: &super::config::ClientConfig,
    current: &str,
    deadline: tokio::time::Instant,
) -> Option<Conn> {
    let n = cfg.servers.len();
    let at = cfg.servers.iter().position(|s| s == current).unwrap_or(n);
    for k in 1..=n {
        let server = &cfg.servers[(at + k) % n];
        if server == current {
            continue;
        }
        match tokio::time::timeout_at(deadline, connect_one(cfg, server)).await {
            Ok(Ok(conn)) => return Some(conn),
            Ok(Err(reason)) => tracing::info!(%server, %reason, "msgc client: cannot move there"),
            Err(_) => return None,
        }
    }
    None
}

/// Writes a JOIN per group, in one write, before the writer task starts, so
/// the re-joins go ahead of anything queued while disconnected.
async fn send_joins<'a>(
    conn: &mut Conn,
    groups: impl Iterator<Item = &'a GroupName>,
    events: Events,
    stall: Duration,
) -> Result<(), End> {
    let mut buf = BytesMut::new();
    for group in groups {
        Frame::Join {
            group: group.clone(),
            events,
        }
        .encode(&mut buf);
    }
    if buf.is_empty() {
        return Ok(());
    }
    let write = async {
        conn.wr.write_all(&buf).await?;
        conn.wr.flush().await
    };
    match timeout(stall, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Io(e)),
        Err(_) => Err(End::WriteStall(stall)),
    }
}

/// Waits for every re-join acknowledgement, at most `bound` in all. A group
/// not acknowledged in time is logged; it stays in the joined set.
async fn await_rejoin(acks: Rejoin, bound: Duration) -> Result<(), End> {
    let deadline = tokio::time::Instant::now() + bound;
    for (group, rx) in acks {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(End::Rejoin(format!("re-join of {group} failed: {e}"))),
            // The connection ended meanwhile: `finished` reports why.
            Ok(Err(_)) => {}
            Err(_) => {
                let why = format!("re-join of {group} not acknowledged within {bound:?}");
                return Err(End::Rejoin(why));
            }
        }
    }
    Ok(())
}

/// The reader and writer tasks of one connection.
struct Tasks {
    /// This connection among the client's (for [`Out::Handover`]).
    id: u64,
    /// The server as configured.
    server: String,
    /// Our member id on this connection.
    member: MemberId,
    reader: JoinHandle<End>,
    writer: JoinHandle<End>,
    /// The reader's sequence numbers (handed on by a move).
    gaps: Arc<std::sync::Mutex<Gaps>>,
    /// How long `close` waits for the server to close its side.
    linger: Duration,
    /// Tells whether a `close` is in progress.
    shared: Arc<Shared>,
}

/// Source of [`Tasks::id`].
static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A move's new connection: its reader holds deliveries until the first
/// fires, its writer starts when the second does.
type Held = (oneshot::Receiver<()>, oneshot::Receiver<()>);

impl Tasks {
    fn spawn(
        links: &Links,
        conn: Conn,
        held: Option<Held>,
        gaps: Option<Arc<std::sync::Mutex<Gaps>>>,
    ) -> Tasks {
        let cfg = &links.shared.cfg;
        let server_max = conn.welcome.max_message_size as usize;
        let id = NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let gaps = gaps.unwrap_or_default();
        let (hold, gate) = match held {
            Some((release, gate)) => (
                Some(Hold {
                    release,
                    held: Vec::new(),
                    bytes: 0,
                }),
                Some(gate),
            ),
            None => (None, None),
        };
        let ctx = ReadCtx {
            shared: links.shared.clone(),
            events: links.events.clone(),
            max_frame: max_frame_for(cfg.max_message_size.max(server_max)),
            idle: cfg.idle_timeout,
            per_iter: cfg.messages_per_iter.max(1),
            member: conn.member.clone(),
            gaps: gaps.clone(),
            hold,
            dedup_until: None,
            dedup_for: cfg.request_timeout,
        };
        let writer = Writer {
            wr: conn.wr,
            queue: links.queue.clone(),
            shared: links.shared.clone(),
            keepalive: cfg.effective_keepalive(conn.welcome.idle_timeout_ms),
            stall: cfg.idle_timeout,
            close_wait: cfg.request_timeout,
            conn: id,
        };
        let reader = tokio::spawn(read_loop(conn.rd, conn.leftover, ctx));
        let writer = tokio::spawn(async move {
            if let Some(gate) = gate {
                // A failed move drops the sender: then this never runs.
                if gate.await.is_err() {
                    return End::ClientGone;
                }
            }
            write_loop(writer).await
        });
        let linger = (cfg.request_timeout / 2).min(MAX_LINGER);
        Tasks {
            id,
            server: conn.server,
            member: conn.member,
            reader,
            writer,
            gaps,
            linger,
            shared: links.shared.clone(),
        }
    }

    /// Waits until either task ends, then stops the other. After a `close`
    /// the reader runs on (delivering what is in flight) until the server
    /// closes its side, at most `linger`. Cancel-safe until it returns.
    async fn finished(&mut self) -> End {
        let end = tokio::select! {
            r = &mut self.reader => {
                let end = joined(r);
                // After a `close` the server ends the stream as soon as it
                // has read our end of stream, which can reach the reader
                // before the writer has reported its flush: the writer's
                // verdict is the one that says whether everything went out.
                if matches!(end, End::Eof) && self.shared.is_closing() {
                    match timeout(self.linger, &mut self.writer).await {
                        Ok(w) => match joined(w) {
                            closing @ End::Closing { .. } => closing,
                            _ => end,
                        },
                        Err(_) => end,
                    }
                } else {
                    end
                }
            }
            w = &mut self.writer => {
                let end = joined(w);
                if matches!(end, End::Closing { .. }) {
                    let _ = timeout(self.linger, &mut self.reader).await;
                }
                end
            }
        };
        self.reader.abort();
        self.writer.abort();
        end
    }

    /// Stops both tasks and waits until they have (an aborted task stops
    /// at its next await, maybe on another thread).
    async fn stop(mut self) {
        self.reader.abort();
        self.writer.abort();
        // A finished handle may have been polled to its end already (and
        // must not be polled again); an unfinished one was not.
        if !self.reader.is_finished() {
            let _ = (&mut self.reader).await;
        }
        if !self.writer.is_finished() {
            let _ = (&mut self.writer).await;
        }
    }
}

impl Drop for Tasks {
    /// A connection given up on (a failed re-join) must not keep reading
    /// or writing: dropping a `JoinHandle` alone would detach its task.
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

fn joined(result: Result<End, tokio::task::JoinError>) -> End {
    result.unwrap_or_else(|e| End::TaskFailed(e.to_string()))
}
