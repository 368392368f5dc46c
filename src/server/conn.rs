//! A connection on its shard: handshake, the reader loop, client frames.
//!
//! One reader loop per connection runs until end of stream (it is never
//! raced or timed out: see `io`); a writer task drains the outbound queue.
//! Timeouts and kills close the socket with `shutdown`, which ends both.
//! Peer links share this machinery; their frames go to `cluster`.

use super::auth::Grant;
use super::flow::{Budget, Gate};
use super::io::{AnyStream, ReadBuf, Stream};
use super::outbound::{write_loop, Outbound, Phase, Written};
use super::shard::{Kill, Shard};
use super::Live;
use crate::protocol::{
    decode, list_budget, max_frame_for, peek_publish, split_by_size, ErrorCode, Frame, GroupName,
    MemberId, Reason, Role, PROTOCOL_VERSION,
};
use crate::router::Group;
use crate::stats::ShardStats;
use bytes::{Buf, BytesMut};
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spare room of every read while the peer streams (a read filled its
/// buffer): a whole 64 KiB. Smaller reads open the receive window by less
/// than an MSS (64 KiB on loopback) and Linux withholds the window update,
/// so a sender that filled the window waited for its 200 ms persist timer
/// (measured: 200 ms stalls on every 3-node run; tuning.md).
const READ_BURST: usize = 64 * 1024;

/// Who is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRole {
    /// No HELLO yet.
    Pending,
    /// An application.
    Client,
    /// Another node of the cluster (index into the mesh's peers).
    Peer(usize),
}

/// A frame's handling failed: answer with this error and close.
pub type Reject = (ErrorCode, String);

/// One connection's state, shared by its reader, its writer and the shard.
pub struct Conn {
    /// Sequence number on its shard.
    pub seq: u64,
    /// Its member id (meaningful for clients).
    pub id: MemberId,
    /// The remote address.
    pub addr: SocketAddr,
    /// What waits to be written.
    pub out: Outbound,
    /// This connection as a producer: closed while a queue or inbox its
    /// input feeds is full; its socket is not read meanwhile.
    pub gate: Arc<Gate>,
    /// Set while the shard's stuck watch holds this connection (its queue
    /// has producers waiting).
    pub congested: Cell<bool>,
    /// Groups this client has joined (interned: no name is stored twice).
    pub groups: RefCell<HashSet<Group, crate::router::NameHasher>>,
    /// Client, peer, or not yet known.
    pub role: Cell<ConnRole>,
    /// Features granted to a client in the handshake
    /// (`protocol::features`): with `SEQ` it gets `DELIVER_SEQ`. (A peer
    /// link's are in the mesh's counters, read by the publish path.)
    pub features: Cell<u32>,
    /// A peer's `max_message_size` from its `HELLO` or `WELCOME` (0: not
    /// said; ours is assumed).
    pub peer_max: Cell<usize>,
    /// Join acknowledgements not sent yet: group → barrier id (see
    /// `Shard::join`).
    #[allow(clippy::mutable_key_type)] // a Group hashes by its name, which never changes
    pub pending_acks: RefCell<HashMap<Group, u64>>,
    /// This client's publish sequence numbers, per group.
    pub pub_seqs: super::seqs::PubSeqs,
    /// A peer handshake under way (cluster key): see `peers::auth`.
    pub peer_auth: RefCell<Option<crate::server::peers::auth::PeerAuth>>,
    /// What the client's user may do: set at login when users are
    /// configured, never otherwise (then everything is allowed).
    pub grant: OnceCell<Arc<Grant>>,
    /// A login whose password is being checked (see `auth`); the reader
    /// handles nothing more until it is answered.
    pub(super) login: RefCell<Option<super::login::PendingLogin>>,
    /// When the connection opened (for the handshake deadline).
    opened: Instant,
    /// Bytes read from the socket (for the monitoring endpoint; a plain
    /// cell added to once per read).
    pub bytes_in: Cell<u64>,
    /// Bytes written to the socket (once per write).
    pub bytes_out: Cell<u64>,
    /// When the last bytes arrived.
    pub last_rx: Cell<Instant>,
    /// Sweeps in a row that found the connection idle (see [`Conn::sweep`]).
    idle_strikes: Cell<u8>,
    /// Set while the reader waits with input of the peer's not yet handled.
    held_input: Cell<bool>,
    /// Past this instant a draining connection is closed regardless.
    close_deadline: Cell<Option<Instant>>,
    /// Why it is closing, to count what it could not flush.
    closing_as: Cell<Kill>,
    /// The socket (for unread-input checks); valid while the connection is
    /// in its shard's table.
    fd: RawFd,
    /// Wakes a reader waiting at its closed gate when the connection closes.
    closing: tokio::sync::Notify,
    shutdown: Box<dyn Fn()>,
    /// [`Stream::peer_certified`] of the socket.
    certified: Box<dyn Fn() -> bool>,
}

impl Conn {
    fn new(
        seq: u64,
        id: MemberId,
        addr: SocketAddr,
        fd: RawFd,
        budget: Budget,
        shutdown: Box<dyn Fn()>,
        certified: Box<dyn Fn() -> bool>,
    ) -> Self {
        let now = Instant::now();
        Self {
            seq,
            id,
            addr,
            out: Outbound::new(now, budget),
            gate: Gate::new(),
            congested: Cell::new(false),
            groups: RefCell::new(HashSet::default()),
            role: Cell::new(ConnRole::Pending),
            features: Cell::new(0),
            peer_max: Cell::new(0),
            pub_seqs: Default::default(),
            peer_auth: RefCell::new(None),
            grant: OnceCell::new(),
            login: RefCell::new(None),
            pending_acks: Default::default(),
            opened: now,
            bytes_in: Cell::new(0),
            bytes_out: Cell::new(0),
            last_rx: Cell::new(now),
            idle_strikes: Cell::new(0),
            held_input: Cell::new(false),
            close_deadline: Cell::new(None),
            closing_as: Cell::new(Kill::Closed),
            fd,
            closing: tokio::sync::Notify::new(),
            shutdown,
            certified,
        }
    }

    /// Returns once the connection starts closing (wakes one waiter).
    pub(super) async fn closing(&self) {
        self.closing.notified().await;
    }

    /// True when the other side presented a certificate that verified
    /// against `tls_ca` (TLS only).
    pub fn peer_certified(&self) -> bool {
        (self.certified)()
    }

    /// When the connection opened.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// True once the handshake made this a client.
    pub fn is_client(&self) -> bool {
        self.role.get() == ConnRole::Client
    }

    /// Makes this connection peer `i`'s link (or dial): it gets a link's
    /// budget.
    pub fn become_peer(&self, i: usize, live: &Live) {
        self.role.set(ConnRole::Peer(i));
        self.gate.set_link();
        self.apply_budget(live);
    }

    /// Sets the queue budget for the connection's role from `live`.
    pub fn apply_budget(&self, live: &Live) {
        let budget = match self.role.get() {
            ConnRole::Peer(_) => live.peer_budget,
            ConnRole::Client | ConnRole::Pending => live.client_budget,
        };
        self.out.set_budget(budget);
    }

    /// Shuts the socket down (both directions); the reader sees end of stream.
    pub fn shutdown(&self) {
        (self.shutdown)();
        self.closing.notify_one();
    }

    /// Flushes what is queued (then `last`), then closes; forced after `grace`.
    pub fn close_gracefully(&self, last: Option<bytes::Bytes>, grace: Duration) {
        if self.out.drain_with(last) {
            self.close_deadline.set(Some(Instant::now() + grace));
            self.closing.notify_one();
        }
    }

    /// Records why the connection is closing (for counting leftovers).
    pub fn closing_as(&self, why: Kill) {
        self.closing_as.set(why);
    }

    /// Why the connection is closing (`Closed` unless recorded otherwise).
    pub fn closing_reason(&self) -> Kill {
        self.closing_as.get()
    }

    /// True when the peer sent something not yet handled: bytes in the
    /// socket, or frames the reader holds while it waits.
    fn has_unread_input(&self) -> bool {
        self.held_input.get() || super::sockets::unread_bytes(self.fd) > 0
    }

    /// Upkeep from the shard's sweep: handshake deadline, idle timeout,
    /// keepalive, close deadlines.
    ///
    /// The idle rule judges what the peer sent, not what the server had
    /// time to read: input waiting in the socket (or held by a reader that
    /// waits for a slow member) counts as received, and a connection is
    /// closed as idle only when two sweeps in a row find it so, so that
    /// input that completed while the process was stopped (SIGSTOP) is
    /// handled before anyone is judged.
    pub fn sweep(&self, shard: &Shard, now: Instant, live: &Live) {
        self.pub_seqs.prune();
        match self.out.phase() {
            Phase::Closed => {}
            Phase::Draining => {
                if self.close_deadline.get().is_some_and(|d| now >= d) {
                    shard.kill(self, self.closing_reason());
                }
            }
            Phase::Open
                if self.role.get() == ConnRole::Pending
                    && now.saturating_duration_since(self.opened) > live.handshake_timeout
                    && !self.has_unread_input() =>
            {
                ShardStats::add(&shard.stats().handshake_timeouts, 1);
                if crate::logging::HANDSHAKE_TIMEOUT.allow() {
                    tracing::info!(peer = %self.addr, "no HELLO within handshake_timeout; closing");
                }
                self.closing_as(Kill::Idle);
                let msg = "handshake_timeout: no HELLO";
                shard.close_with_error_within(
                    self,
                    ErrorCode::HANDSHAKE_REQUIRED,
                    msg,
                    live.keepalive_interval,
                );
            }
            Phase::Open
                if now.saturating_duration_since(self.last_rx.get()) > live.idle_timeout =>
            {
                if self.has_unread_input() {
                    self.last_rx.set(now);
                    self.idle_strikes.set(0);
                } else if self.idle_strikes.replace(self.idle_strikes.get() + 1) >= 1 {
                    self.close_idle(shard, live);
                }
            }
            Phase::Open => {
                self.idle_strikes.set(0);
                let quiet =
                    now.saturating_duration_since(self.out.last_tx()) >= live.keepalive_interval;
                if quiet && self.role.get() != ConnRole::Pending && self.out.is_empty() {
                    let _p = shard.producing(None);
                    shard.push(self, Frame::Noop.to_bytes());
                }
            }
        }
    }

    fn close_idle(&self, shard: &Shard, live: &Live) {
        ShardStats::add(&shard.stats().idle_kills, 1);
        if crate::logging::IDLE_CLOSE.allow() {
            tracing::info!(conn = %self.id, peer = %self.addr, "nothing received for idle_timeout; closing");
        }
        self.closing_as(Kill::Idle);
        // A silent peer is probably gone: give it one keepalive interval to
        // take the ERROR, so node loss is noticed within idle_timeout +
        // keepalive_interval (+ one sweep).
        let grace = live.keepalive_interval.min(live.idle_timeout);
        let msg = "idle_timeout: nothing received";
        shard.close_with_error_within(self, ErrorCode::IDLE, msg, grace);
    }
}

/// Starts serving an accepted connection on `shard`.
pub fn spawn(shard: Rc<Shard>, stream: AnyStream, addr: SocketAddr) {
    let opts = super::sockets::SocketOpts {
        tcpbuf_size: shard.live.get().tcpbuf_size,
    };
    if let Err(e) = opts.apply_fd(stream.raw_fd()) {
        if crate::logging::SOCKET_OPTIONS.allow() {
            tracing::warn!(error = %e, peer = %addr, "could not set socket options");
        }
    }
    let tls = match &shard.shared.tls {
        Some(t) => match rustls::ServerConnection::new(t.accept.clone()) {
            Ok(c) => Some(c.into()),
            Err(e) => {
                tracing::error!(error = %e, peer = %addr, "cannot start a TLS session; closing");
                return;
            }
        },
        None => None,
    };
    spawn_with(shard, stream, addr, tls, |_, _| {});
}

/// Starts serving `stream`, through TLS when `tls` is given (its handshake
/// runs on the first reads and writes, under the handshake timeout);
/// `setup` runs once the connection is registered (a dialled peer link
/// sends its HELLO there).
pub fn spawn_with(
    shard: Rc<Shard>,
    stream: AnyStream,
    addr: SocketAddr,
    tls: Option<rustls::Connection>,
    setup: impl FnOnce(&Rc<Shard>, &Rc<Conn>) + 'static,
) {
    use super::tls::TlsStream;
    match (stream, tls) {
        (AnyStream::Uring(s), None) => {
            tokio::task::spawn_local(serve(shard, Rc::new(s), addr, setup));
        }
        (AnyStream::Uring(s), Some(tls)) => {
            let s = Rc::new(TlsStream::new(s, tls));
            tokio::task::spawn_local(serve(shard, s, addr, setup));
        }
        (AnyStream::Epoll(s), None) => {
            tokio::task::spawn_local(serve(shard, Rc::new(s), addr, setup));
        }
        (AnyStream::Epoll(s), Some(tls)) => {
            let s = Rc::new(TlsStream::new(s, tls));
            tokio::task::spawn_local(serve(shard, s, addr, setup));
        }
    }
}

async fn serve<S: Stream>(
    shard: Rc<Shard>,
    stream: Rc<S>,
    addr: SocketAddr,
    setup: impl FnOnce(&Rc<Shard>, &Rc<Conn>),
) {
    let seq = shard.next_seq();
    let id = MemberId::assign(
        &shard.shared.node,
        &shard.shared.incarnation,
        shard.index,
        seq,
    );
    let (closer, asker) = (stream.clone(), stream.clone());
    let conn = Rc::new(Conn::new(
        seq,
        id,
        addr,
        stream.raw_fd(),
        shard.live.get().client_budget,
        Box::new(move || closer.shutdown()),
        Box::new(move || asker.peer_certified()),
    ));
    shard.conns.borrow_mut().insert(seq, conn.clone());
    ShardStats::add(&shard.stats().connections, 1);
    ShardStats::add(&shard.stats().connections_total, 1);
    tracing::debug!(conn = %conn.id, peer = %addr, shard = shard.index, "connection opened");
    setup(&shard, &conn);

    let writer = tokio::task::spawn_local(writer(shard.clone(), conn.clone(), stream.clone()));
    read_loop(&shard, &conn, &*stream).await;

    // The reader saw end of stream (or an error): the member is gone.
    match conn.role.get() {
        ConnRole::Client => shard.leave_all(&conn),
        ConnRole::Peer(p) => crate::server::peers::link_closed(&shard, &conn, p),
        ConnRole::Pending => {}
    }
    conn.close_gracefully(None, shard.live.get().idle_timeout);
    let _ = writer.await;
    shard.conns.borrow_mut().remove(&seq);
    ShardStats::sub(&shard.stats().connections, 1);
    tracing::debug!(conn = %conn.id, peer = %addr, "connection closed");
}

async fn writer<S: Stream>(shard: Rc<Shard>, conn: Rc<Conn>, stream: Rc<S>) {
    /// Counts a running writer in `Shard::writers` (done or dropped).
    struct Running<'a>(&'a Cell<usize>);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }
    shard.writers.set(shard.writers.get() + 1);
    let _running = Running(&shard.writers);
    let st = shard.stats();
    let unsent = write_loop(&conn.out, &*stream, |w: Written| {
        ShardStats::bump(&st.msgs_out, w.frames);
        ShardStats::bump(&st.bytes_out, w.bytes);
        conn.bytes_out.set(conn.bytes_out.get() + w.bytes);
    })
    .await;
    // Counted under the reason the connection closed: a stuck member's
    // batch in flight when it was killed is dropped as stuck.
    shard.count_dropped(&conn, conn.closing_reason(), unsent as u64);
}

async fn read_loop<S: Stream>(shard: &Rc<Shard>, conn: &Rc<Conn>, stream: &S) {
    // Small while the peer says little, a whole READ_BURST of spare room
    // while it streams, as large as a frame that does not fit, and small
    // again once a burst is over. Nothing decoded from it is kept past a
    // frame's handling (names are copied), so a buffer given up is freed.
    let mut rb = ReadBuf::new(READ_BURST);
    // Bytes read since the writers this connection fills were last woken.
    let mut held = 0;
    // Bytes routed since this connection last yielded (see `decode_all`).
    let mut routed = 0;
    loop {
        let max_frame = max_frame_for(shard.live.get().max_message_size);
        let buf = rb.prepare(|b| missing(b, max_frame));
        let spare = buf.capacity() - buf.len();
        let (res, b) = stream.read(buf).await;
        let n = match res {
            Ok(0) | Err(_) => {
                if let (Err(e), ConnRole::Peer(i)) = (&res, conn.role.get()) {
                    super::peers::dial::read_failed(shard, i, conn, e);
                }
                // Writers held behind this reader's backlog go now.
                shard.wake_owed();
                return;
            }
            Ok(n) => n,
        };
        let buf = rb.done(b, n, spare);
        conn.last_rx.set(shard.tick());
        ShardStats::bump(&shard.stats().bytes_in, n as u64);
        conn.bytes_in.set(conn.bytes_in.get() + n as u64);
        if conn.out.phase() != Phase::Open {
            // Closing: input is no longer acted on; read on until the end.
            buf.clear();
            if held > 0 {
                held = 0;
                shard.wake_owed();
            }
            continue;
        }
        // A read that filled its room with at least another read's worth
        // waiting in the socket is one of a backlog: the writers it fills
        // are woken after the next read (up to HOLD_BYTES), so each writes
        // several reads' worth at once rather than a few frames each time;
        // what it holds back would wait behind the backlog anyway. Whatever
        // ends the backlog (a short read, less than a read waiting, the
        // bound) wakes them: input that merely streams is not held.
        let hold = n >= spare
            && held + n < HOLD_BYTES
            && super::sockets::unread_bytes(conn.fd) >= READ_BURST;
        held = if hold { held + n } else { 0 };
        decode_all(shard, conn, buf, hold, &mut routed).await;
    }
}

/// Most bytes a streaming reader routes before the writers it filled are
/// woken (see `read_loop`): sixteen full reads.
const HOLD_BYTES: usize = 16 * READ_BURST;

/// Room a partial frame at the start of `buf` still needs (0 without
/// one): a connection's read makes room for the rest of a frame.
fn missing(buf: &BytesMut, max_frame: usize) -> usize {
    match crate::protocol::peek_len(buf, max_frame) {
        Ok(Some(len)) => (crate::protocol::LEN_PREFIX + len).saturating_sub(buf.len()),
        _ => 0,
    }
}

/// Decodes and handles every whole frame in `buf`, yielding to other
/// connections every `messages_per_iter` frames, and waiting — without
/// reading more — while a queue or inbox this connection's input feeds is
/// full (its gate is closed): TCP then slows the peer down.
///
/// With `hold`, the writers this read filled are not woken when it is
/// routed (the caller reads on at once; see `read_loop`).
///
/// `routed` counts the bytes routed since this connection last yielded:
/// past [`READ_BURST`] it yields at its next turn whoever waits, so it
/// holds the shard for at most that much input at a time, whatever its
/// reads' sizes (a read that ends a large frame, a TLS stream's buffered
/// plaintext).
async fn decode_all(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    buf: &mut BytesMut,
    hold: bool,
    routed: &mut usize,
) {
    // Settings are read once per read: a reload applies from the next one.
    let live = shard.live.get();
    let max_frame = max_frame_for(live.max_message_size);
    loop {
        let before = buf.len();
        let decoded = shard.deferring_wakes(|| decode_some(shard, conn, buf, &live, max_frame));
        *routed += before.saturating_sub(buf.len());
        let held = matches!(decoded, Decoded::Done) && hold && shard.writes_are_small();
        if !matches!(decoded, Decoded::Yield) {
            // The read is routed (or waits): what it routed to other
            // shards leaves now (see `Shard::producing_on`).
            shard.flush_outgoing();
        }
        if !matches!(decoded, Decoded::Yield) && !held {
            // The read is routed (or must wait for a queue to drain): the
            // writers it filled write all of it now.
            shard.wake_owed();
        }
        if !matches!(decoded, Decoded::Done) {
            // What this turn queued is written while others have theirs.
            super::io::submit_pending(shard.uring);
        }
        match decoded {
            Decoded::Done => {
                if turn_over(routed, || false) {
                    tokio::task::yield_now().await;
                }
                return;
            }
            Decoded::Yield => {
                let inbox = &shard.shared.inboxes[shard.index];
                if turn_over(routed, || super::io::others_waiting(shard.uring, inbox)) {
                    tokio::task::yield_now().await;
                }
            }
            Decoded::Login => super::login::finish_login(shard, conn).await,
            Decoded::Wait => {
                ShardStats::add(&shard.stats().producer_waits, 1);
                conn.held_input.set(!buf.is_empty());
                // Until the gate opens, or the connection closes meanwhile
                // (then what it sent is no longer acted on).
                tokio::select! {
                    () = conn.gate.opened() => {}
                    () = conn.closing.notified() => {}
                }
                conn.held_input.set(false);
                shard.tick();
            }
        }
    }
}

/// Whether a connection that has `routed` bytes since it last yielded
/// yields now: when others wait (see `io::others_waiting`, asked only
/// below the bound), and at least every [`READ_BURST`] whoever waits.
/// Starts the count again when it does.
fn turn_over(routed: &mut usize, others_waiting: impl FnOnce() -> bool) -> bool {
    let yields = *routed >= READ_BURST || others_waiting();
    if yields {
        *routed = 0;
    }
    yields
}

/// Why [`decode_some`] stopped.
enum Decoded {
    /// The buffer holds no whole frame (or the connection is closing).
    Done,
    /// `messages_per_iter` frames handled: others' turn.
    Yield,
    /// The connection's gate closed: wait before handling more.
    Wait,
    /// A login is being checked: wait for its answer.
    Login,
}

/// Handles frames from `buf` until one of [`Decoded`] happens; all that
/// they queue is charged to `conn` as producer.
fn decode_some(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    buf: &mut BytesMut,
    live: &Live,
    max_frame: usize,
) -> Decoded {
    // Its batches for other shards stay open across the read's turns:
    // `decode_all` sends them when the read is routed.
    let _producing = shard.producing_on(Some(conn.gate.clone()));
    // One pin of the group table for the whole turn (see `hold`).
    let _table = shard.shared.table.hold();
    for _ in 0..live.messages_per_iter {
        if conn.out.phase() != Phase::Open {
            return Decoded::Done;
        }
        if !conn.gate.is_open() {
            return Decoded::Wait;
        }
        // The common case, a client's PUBLISH, is handled where it lies in
        // the buffer: no frame value, no reference counts. Anything else,
        // or anything wrong with it, takes the general path below.
        if let Some(len) = publish_in_place(shard, conn, buf, max_frame, live.max_message_size) {
            ShardStats::bump(&shard.stats().msgs_in, 1);
            buf.advance(len);
            continue;
        }
        // Likewise a peer's FORWARD.
        if let ConnRole::Peer(i) = conn.role.get() {
            if let Some(len) =
                crate::server::peers::link::forward_in_place(shard, conn, i, buf, max_frame)
            {
                ShardStats::bump(&shard.stats().msgs_in, 1);
                buf.advance(len);
                continue;
            }
        }
        match decode(buf, max_frame) {
            Ok(Some(frame)) => {
                ShardStats::bump(&shard.stats().msgs_in, 1);
                if let Err((code, msg)) = dispatch(shard, conn, frame) {
                    protocol_error(shard, conn, code, &msg);
                    buf.clear();
                    return Decoded::Done;
                }
                if conn.login.borrow().is_some() {
                    return Decoded::Login;
                }
            }
            Ok(None) => return Decoded::Done,
            Err(e) => {
                protocol_error(shard, conn, e.code(), &e.to_string());
                buf.clear();
                return Decoded::Done;
            }
        }
    }
    if conn.gate.is_open() {
        Decoded::Yield
    } else {
        Decoded::Wait
    }
}

/// If `buf` starts with a whole, valid `PUBLISH` from a client within the
/// limits, routes it from the buffer and returns its length; otherwise
/// `None` (incomplete, another frame, or invalid: the decoder then answers
/// it as usual).
#[inline]
fn publish_in_place(
    shard: &Shard,
    conn: &Conn,
    buf: &[u8],
    max_frame: usize,
    max_payload: usize,
) -> Option<usize> {
    if !conn.is_client() {
        return None;
    }
    let (len, group, payload) = peek_publish(buf, max_frame)?;
    if payload.len() > max_payload {
        return None;
    }
    if let Some(g) = conn.grant.get() {
        if !g.perms.publish.matches(group) {
            return None; // the general path answers PERMISSION_DENIED
        }
    }
    shard.publish(conn, group, payload);
    Some(len)
}

fn protocol_error(shard: &Shard, conn: &Conn, code: ErrorCode, msg: &str) {
    ShardStats::add(&shard.stats().protocol_errors, 1);
    if crate::logging::BAD_INPUT.allow() {
        tracing::info!(conn = %conn.id, peer = %conn.addr, code = code.name(), "bad input: {msg}; closing");
    }
    conn.closing_as(Kill::Protocol);
    shard.close_with_error(conn, code, msg);
}

fn dispatch(shard: &Rc<Shard>, conn: &Rc<Conn>, frame: Frame) -> Result<(), Reject> {
    match conn.role.get() {
        ConnRole::Pending => handshake(shard, conn, frame),
        ConnRole::Client => client_frame(shard, conn, frame),
        ConnRole::Peer(p) => crate::server::peers::peer_frame(shard, conn, p, frame),
    }
}

fn handshake(shard: &Rc<Shard>, conn: &Rc<Conn>, frame: Frame) -> Result<(), Reject> {
    if crate::server::peers::auth::awaits_proof(conn) {
        return crate::server::peers::auth::on_proof(shard, conn, frame);
    }
    let Frame::Hello(hello) = frame else {
        return Err((
            ErrorCode::HANDSHAKE_REQUIRED,
            "the first frame must be HELLO".into(),
        ));
    };
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version {} not supported (this server speaks {PROTOCOL_VERSION})",
            hello.version
        );
        return Err((ErrorCode::UNSUPPORTED_VERSION, msg));
    }
    if shard.shared.cluster.departure() != crate::cluster::leave::Phase::Serving {
        // Leaving: a client should go elsewhere, a peer's link would go
        // at once. Not bad input.
        let msg = "this node is leaving the cluster";
        shard.close_with_error(conn, ErrorCode::SHUTTING_DOWN, msg);
        return Ok(());
    }
    match hello.role {
        Role::Client => super::login::welcome_client(shard, conn, &hello),
        Role::Peer => crate::server::peers::accept_peer(shard, conn, &hello),
    }
}

fn check_size(shard: &Shard, len: usize) -> Result<(), Reject> {
    let max = shard.live.get().max_message_size;
    if len > max {
        return Err((
            ErrorCode::MESSAGE_TOO_LARGE,
            format!("payload of {len} bytes exceeds max_message_size {max}"),
        ));
    }
    Ok(())
}

fn client_frame(shard: &Rc<Shard>, conn: &Rc<Conn>, frame: Frame) -> Result<(), Reject> {
    if !super::login::permitted(shard, conn, &frame) {
        return Ok(());
    }
    match frame {
        Frame::Publish { group, payload } => {
            check_size(shard, payload.len())?;
            shard.publish(conn, group.as_bytes(), &payload);
        }
        Frame::Send { to, payload } => {
            check_size(shard, payload.len())?;
            shard.send_direct(&conn.id, &to, &payload);
        }
        Frame::Join { group, events } => shard.join(conn, &group, events),
        Frame::Leave { group } => shard.leave(conn, group.as_bytes(), Reason::Leave),
        Frame::Noop | Frame::Pong { .. } => {}
        Frame::Ping { token } => {
            shard.push(conn, Frame::Pong { token }.to_bytes());
        }
        Frame::MembersRequest { req, group } => members_reply(shard, conn, req, group),
        Frame::StatsRequest { req } => {
            let json = shard.shared.stats_json().to_string();
            shard.push(
                conn,
                Frame::StatsReply {
                    req,
                    json: json.into(),
                }
                .to_bytes(),
            );
        }
        Frame::Error { code, message } => {
            if crate::logging::CLIENT_ERROR.allow() {
                tracing::info!(conn = %conn.id, code = code.name(), "client reported an error: {message}");
            }
            conn.close_gracefully(None, shard.live.get().idle_timeout);
        }
        Frame::Hello(_) => return Err((ErrorCode::HANDSHAKE_REQUIRED, "HELLO sent twice".into())),
        other => {
            let ty = other.frame_type().0;
            return Err((
                ErrorCode::UNEXPECTED,
                format!("frame type 0x{ty:02x} is not one a client sends"),
            ));
        }
    }
    Ok(())
}

fn members_reply(shard: &Shard, conn: &Conn, req: u32, group: GroupName) {
    let all = shard.shared.table.members(group.as_bytes());
    let parts = split_by_size(&all, list_budget(shard.live.get().max_message_size), |m| {
        1 + m.as_bytes().len()
    });
    let n = parts.len();
    for (i, part) in parts.into_iter().enumerate() {
        let frame = Frame::MembersReply {
            req,
            last: i + 1 == n,
            group: group.clone(),
            members: part.to_vec(),
        };
        shard.push(conn, frame.to_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::{turn_over, READ_BURST};

    /// A connection yields at least every 64 KiB it routes, whoever
    /// waits, and below that only when others wait; the count starts
    /// again at each yield.
    #[test]
    fn a_connection_yields_at_least_every_64_kib_it_routes() {
        assert_eq!(READ_BURST, 64 * 1024, "the bound README states");
        let mut routed = 0;
        let mut yields = 0;
        // 1 MiB of 1 KiB turns, nobody else ready: one yield per 64 KiB.
        for _ in 0..1024 {
            routed += 1024;
            if turn_over(&mut routed, || false) {
                yields += 1;
                assert_eq!(routed, 0);
            }
            assert!(routed < READ_BURST);
        }
        assert_eq!(yields, 16);
        // Others waiting: a yield at once, and the count starts again.
        routed = 100;
        assert!(turn_over(&mut routed, || true));
        assert_eq!(routed, 0);
        // Past the bound, nobody is asked.
        routed = READ_BURST;
        assert!(turn_over(&mut routed, || panic!(
            "not asked past the bound"
        )));
    }
}
