//! The supervisor: one task per client that owns the connection's life.
//!
//! It runs a connection's reader and writer, notices when either ends,
//! fails the requests that were waiting, emits [`Event::Disconnected`],
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

use crate::protocol::{max_frame_for, Events, Frame, GroupName};

use super::connection::{connect_any, read_loop, write_loop, Conn, End, Out, ReadCtx};
use super::error::ClientError;
use super::event::Event;
use super::gaps::Gaps;
use super::state::{ServerInfo, Shared};

/// What the supervisor holds: the shared state, the consuming end of the
/// outbound queue, and the producing end of the event channel.
pub(crate) struct Links {
    pub shared: Arc<Shared>,
    pub queue: flume::Receiver<Out>,
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
    let flushed = run_all(&links, first).await;
    let lost = drain(&links.queue);
    links.shared.finish(flushed && lost == 0);
}

/// The connection loop; returns whether everything queued up to a `close`
/// was written (`true` when no `close` was asked).
async fn run_all(links: &Links, first: Conn) -> bool {
    let mut next = Some((first, None));
    while let Some((conn, rejoin)) = next.take() {
        let end = run(links, conn, rejoin).await;
        links.shared.on_disconnected(|| end.waiter_error());
        match end {
            End::Closing { flushed } => return flushed,
            End::ClientGone => return true,
            _ if links.shared.is_closing() => return false,
            _ => {}
        }
        let reason = end.reason();
        tracing::warn!(%reason, "msgc client: connection lost");
        if links
            .events
            .send_async(Event::Disconnected { reason })
            .await
            .is_err()
        {
            return true;
        }
        next = redial(links).await.map(|conn| {
            let info = ServerInfo::new(&conn.server, &conn.welcome);
            let acks = links.shared.on_connected(info, conn.member.clone());
            (conn, Some(acks))
        });
    }
    true
}

/// Empties the queue once no connection will carry it; returns how many
/// frames were dropped.
fn drain(queue: &flume::Receiver<Out>) -> usize {
    let lost = queue
        .drain()
        .filter(|item| !matches!(item, Out::Close))
        .count();
    if lost > 0 {
        tracing::warn!(lost, "msgc client: stopped with frames still queued");
    }
    lost
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
    let (server, member) = (conn.server.clone(), conn.member.clone());
    let mut tasks = Tasks::spawn(links, conn);
    let Some(acks) = rejoin else {
        return tasks.finished().await;
    };
    // `Reconnected` promises that every group is joined again: a re-join
    // that fails or is not acknowledged drops this connection and redials.
    tokio::select! {
        end = tasks.finished() => return end,
        res = await_rejoin(acks, cfg.request_timeout) => {
            if let Err(end) = res {
                return end;
            }
        }
    }
    tracing::info!(%server, %member, "msgc client: reconnected");
    if links
        .events
        .send_async(Event::Reconnected { server, member })
        .await
        .is_err()
    {
        return End::ClientGone;
    }
    tasks.finished().await
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
    match timeout(stall, conn.wr.write_all(&buf)).await {
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
    reader: JoinHandle<End>,
    writer: JoinHandle<End>,
    /// How long `close` waits for the server to close its side.
    linger: Duration,
    /// Tells whether a `close` is in progress.
    shared: Arc<Shared>,
}

impl Tasks {
    fn spawn(links: &Links, conn: Conn) -> Tasks {
        let cfg = &links.shared.cfg;
        let server_max = conn.welcome.max_message_size as usize;
        let ctx = ReadCtx {
            shared: links.shared.clone(),
            events: links.events.clone(),
            max_frame: max_frame_for(cfg.max_message_size.max(server_max)),
            idle: cfg.idle_timeout,
            per_iter: cfg.messages_per_iter.max(1),
            member: conn.member.clone(),
            gaps: Gaps::default(),
        };
        let keepalive = cfg.effective_keepalive(conn.welcome.idle_timeout_ms);
        let reader = tokio::spawn(read_loop(conn.rd, conn.leftover, ctx));
        let writer = tokio::spawn(write_loop(
            conn.wr,
            links.queue.clone(),
            keepalive,
            cfg.idle_timeout,
        ));
        let linger = (cfg.request_timeout / 2).min(MAX_LINGER);
        Tasks {
            reader,
            writer,
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
