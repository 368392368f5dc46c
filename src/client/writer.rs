//! The writer task of a connection, and what it drains: the outbound queue
//! of [`Out`] items.
//!
//! It takes everything queued into one buffer (PUBLISH frames encoded
//! straight into it) and writes each batch with a single `write_all`. It
//! counts the publishes and sends it takes and asks the server to confirm
//! them with PINGs ([`super::ledger`]): one after a batch when none is
//! outstanding, one before each user PING, one at `close` (whose answer it
//! awaits before shutting the socket down). Reconnecting is the
//! supervisor's business, not this file's.

use std::sync::Arc;
use std::time::Duration;

use super::connection::WriteHalf;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

use crate::protocol::{encode_publish, Frame, GroupName};

use super::connection::End;
use super::ledger::CONFIRM;
use super::state::Shared;

/// The writer stops coalescing once a batch holds this many bytes.
pub(crate) const WRITE_BATCH: usize = 256 * 1024;

/// An item of the outbound queue.
pub(crate) enum Out {
    /// A PUBLISH, encoded by the writer straight into its batch buffer.
    Publish { group: GroupName, payload: Bytes },
    /// Any other frame.
    Frame(Frame),
    /// `count` PUBLISH frames already encoded (`publish_batch`).
    Encoded { bytes: Bytes, count: u64 },
    /// An item whose caller had to wait for room (see [`Waited`]).
    Waited(Waited),
    /// `close`: flush everything before this, have it confirmed, then shut
    /// the socket down.
    Close,
    /// A move: connection `conn` leaves `groups` after everything before
    /// this, has it confirmed, and shuts its socket down; what follows
    /// goes on the next connection. Another connection's writer skips it.
    Handover { conn: u64, groups: Vec<GroupName> },
}

impl Out {
    /// Publishes and sends this item carries (what the ledger counts).
    pub(crate) fn messages(&self) -> u64 {
        match self {
            Out::Publish { .. } | Out::Frame(Frame::Send { .. }) => 1,
            Out::Encoded { count, .. } => *count,
            Out::Waited(w) => w.item.as_ref().map_or(0, |item| item.messages()),
            Out::Frame(_) | Out::Close | Out::Handover { .. } => 0,
        }
    }

    /// The item itself, out of its [`Waited`] wrapper if it has one: it
    /// has been taken, so its messages stay accepted.
    pub(crate) fn taken(self) -> Out {
        match self {
            // Never empty while queued (emptied only here).
            Out::Waited(mut w) => w.item.take().map_or(Out::Frame(Frame::Noop), |item| *item),
            other => other,
        }
    }
}

/// An item that waited for room in the queue. A caller that gives up (its
/// `request_timeout` passes) drops its send, and with it the item, unless
/// the writer took it just then; which one happened, only the item knows.
/// Dropped untaken, it takes its messages back out of `accepted`.
pub(crate) struct Waited {
    /// `None` once taken.
    item: Option<Box<Out>>,
    shared: Arc<Shared>,
}

impl Waited {
    /// Wraps `item`, whose messages are already counted as accepted.
    pub(crate) fn wrap(item: Out, shared: Arc<Shared>) -> Out {
        Out::Waited(Waited {
            item: Some(Box::new(item)),
            shared,
        })
    }
}

impl Drop for Waited {
    fn drop(&mut self) {
        if let Some(item) = &self.item {
            self.shared.ledger.unaccept(item.messages());
        }
    }
}

/// One connection's writer.
pub(crate) struct Writer {
    pub wr: WriteHalf,
    pub queue: flume::Receiver<Out>,
    pub shared: Arc<Shared>,
    /// NOOP after this long with nothing to send.
    pub keepalive: Duration,
    /// A write that makes no progress for this long ends the connection.
    pub stall: Duration,
    /// How long `close` waits for its PONG.
    pub close_wait: Duration,
    /// This connection, for [`Out::Handover`].
    pub conn: u64,
}

/// Why a batch ends the writer.
enum Stop {
    /// `close`.
    Close,
    /// A move's handover: leave these groups first.
    Handover(Vec<GroupName>),
}

/// The writer's running state: the batch and the counts behind it.
struct Batch {
    buf: BytesMut,
    /// Messages taken off the queue, all connections counted (the ledger's
    /// `taken` once the batch is complete).
    taken: u64,
    /// `taken` when the last confirmation PING on this connection was
    /// written (or when the connection started: what came before is
    /// settled). Outstanding while the ledger's `confirmed` is below it.
    pinged: u64,
}

/// What woke an idle writer.
enum Wake {
    Item(Out),
    /// Every client handle is gone and the queue is empty.
    Gone,
    /// Nothing to send for `keepalive`.
    Idle,
    /// A confirmation arrived: maybe time for the next PING.
    Confirmed,
}

/// Drains the outbound queue in batches until the connection ends.
pub(crate) async fn write_loop(mut w: Writer) -> End {
    let taken = w.shared.ledger.taken();
    let mut b = Batch {
        buf: BytesMut::with_capacity(WRITE_BATCH),
        taken,
        pinged: taken,
    };
    loop {
        let mut stop = match w.next(&b).await {
            Wake::Item(item) => b.push(item, w.conn),
            Wake::Gone => return w.finish(&b.buf, End::ClientGone).await,
            Wake::Idle => {
                Frame::Noop.encode(&mut b.buf);
                None
            }
            Wake::Confirmed => None,
        };
        while stop.is_none() && b.buf.len() < WRITE_BATCH {
            match w.queue.try_recv() {
                Ok(item) => stop = b.push(item, w.conn),
                Err(_) => break,
            }
        }
        w.shared.ledger.set_taken(b.taken);
        match stop {
            Some(Stop::Close) => return w.close(b).await,
            Some(Stop::Handover(groups)) => {
                for group in groups {
                    Frame::Leave { group }.encode(&mut b.buf);
                }
                return match w.close(b).await {
                    End::Closing { flushed } => End::Handover { flushed },
                    other => other,
                };
            }
            None => {}
        }
        let confirmed = w.shared.ledger.confirmed();
        if confirmed >= b.pinged && b.taken > confirmed {
            b.ping();
        }
        if let Err(end) = write_batch(&mut w.wr, &b.buf, w.stall).await {
            return end;
        }
        b.buf.clear();
    }
}

impl Batch {
    /// Appends one queue item; returns whether it ends the writer.
    fn push(&mut self, item: Out, conn: u64) -> Option<Stop> {
        let item = item.taken();
        self.taken += item.messages();
        match item {
            Out::Publish { group, payload } => encode_publish(&mut self.buf, &group, &payload),
            Out::Frame(frame @ Frame::Ping { .. }) => {
                // A user PING confirms all that came before it too: when
                // its PONG arrives, so has the confirmation's.
                self.ping();
                frame.encode(&mut self.buf);
            }
            Out::Frame(frame) => frame.encode(&mut self.buf),
            Out::Encoded { bytes, .. } => self.buf.extend_from_slice(&bytes),
            Out::Waited(_) => {} // unwrapped above
            Out::Close => return Some(Stop::Close),
            Out::Handover { conn: c, groups } if c == conn => return Some(Stop::Handover(groups)),
            Out::Handover { .. } => {}
        }
        None
    }

    /// Appends a confirmation PING for everything taken so far, unless one
    /// already covers it.
    fn ping(&mut self) {
        if self.taken > self.pinged {
            Frame::Ping {
                token: CONFIRM | (self.taken & !CONFIRM),
            }
            .encode(&mut self.buf);
            self.pinged = self.taken;
        }
    }
}

impl Writer {
    /// The next item, or why the writer woke without one.
    async fn next(&self, b: &Batch) -> Wake {
        if let Ok(item) = self.queue.try_recv() {
            return Wake::Item(item);
        }
        // Something written after the outstanding PING: its PONG is the
        // moment to send the next one.
        let unpinged = b.taken > b.pinged;
        let wait = async {
            tokio::select! {
                item = self.queue.recv_async() => match item {
                    Ok(item) => Wake::Item(item),
                    Err(_) => Wake::Gone,
                },
                _ = self.shared.ledger.advanced(), if unpinged => Wake::Confirmed,
            }
        };
        timeout(self.keepalive, wait).await.unwrap_or(Wake::Idle)
    }

    /// `close`: writes the batch with a confirmation PING, waits (at most
    /// `close_wait`) until everything taken is confirmed, then shuts the
    /// socket down. `flushed` says whether it was confirmed.
    async fn close(mut self, mut b: Batch) -> End {
        b.ping();
        if write_batch(&mut self.wr, &b.buf, self.stall).await.is_err() {
            return End::Closing { flushed: false };
        }
        let ledger = &self.shared.ledger;
        let flushed = ledger.wait_confirmed(b.taken, self.close_wait).await;
        let _ = timeout(self.stall, self.wr.shutdown()).await;
        End::Closing { flushed }
    }

    /// Writes what is batched, shuts the write side down, and ends with
    /// `end` (or with the write's failure).
    async fn finish(mut self, buf: &[u8], end: End) -> End {
        if let Err(failed) = write_batch(&mut self.wr, buf, self.stall).await {
            return failed;
        }
        let _ = timeout(self.stall, self.wr.shutdown()).await;
        end
    }
}

async fn write_batch(wr: &mut WriteHalf, buf: &[u8], stall: Duration) -> Result<(), End> {
    if buf.is_empty() {
        return Ok(());
    }
    let write = async {
        wr.write_all(buf).await?;
        wr.flush().await
    };
    match timeout(stall, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Io(e)),
        Err(_) => Err(End::WriteStall(stall)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientConfig, ServerInfo};
    use crate::protocol::{MemberId, NodeName};

    fn shared() -> Arc<Shared> {
        let server = ServerInfo {
            address: "test".into(),
            node: NodeName::from_str_checked("n").expect("node"),
            max_message_size: 1024,
            idle_timeout: Duration::from_secs(1),
            sequenced: true,
        };
        let member = MemberId::from_str_checked("n/0.1").expect("member");
        Arc::new(Shared::new(ClientConfig::default(), server, member))
    }

    fn publish() -> Out {
        Out::Publish {
            group: GroupName::from_str_checked("g").expect("group"),
            payload: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn a_waited_item_dropped_untaken_is_not_accepted() {
        let shared = shared();
        shared.ledger.accept(1);
        drop(Waited::wrap(publish(), shared.clone()));
        assert_eq!(shared.ledger.unconfirmed(), 0);

        shared.ledger.accept(1);
        let taken = Waited::wrap(publish(), shared.clone()).taken();
        assert_eq!(taken.messages(), 1);
        drop(taken);
        assert_eq!(shared.ledger.unconfirmed(), 1, "taken: stays accepted");
    }

    #[test]
    fn batches_count_messages_and_ping_once_per_new_count() {
        let mut b = Batch {
            buf: BytesMut::new(),
            taken: 0,
            pinged: 0,
        };
        b.push(publish(), 1);
        b.push(
            Out::Encoded {
                bytes: Bytes::new(),
                count: 3,
            },
            1,
        );
        b.push(Out::Frame(Frame::Noop), 1);
        assert_eq!(b.taken, 4);
        b.ping();
        b.ping();
        assert_eq!(b.pinged, 4);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = crate::protocol::decode(&mut b.buf, 1 << 20) {
            frames.push(f);
        }
        let pings: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Ping { token } => Some(*token),
                _ => None,
            })
            .collect();
        assert_eq!(pings, [CONFIRM | 4], "one confirmation for all four");
        assert!(matches!(b.push(Out::Close, 1), Some(Stop::Close)));
        let other = Out::Handover {
            conn: 2,
            groups: Vec::new(),
        };
        assert!(b.push(other, 1).is_none(), "another connection's handover");
        let mine = Out::Handover {
            conn: 1,
            groups: Vec::new(),
        };
        assert!(matches!(b.push(mine, 1), Some(Stop::Handover(_))));
    }
}
