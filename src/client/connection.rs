//! One connection to a server: dialling (socket2 options), the HELLO →
//! WELCOME handshake, and the reader task (the writer is `writer.rs`).
//!
//! The reader decodes from a large `BytesMut`, hands frames to
//! [`Shared::on_frame`], and checks sequenced deliveries for gaps
//! ([`Gaps`]). Each task returns an [`End`] saying why it stopped;
//! reconnecting is the supervisor's business, not this file's.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

use crate::protocol::{
    decode, features, max_frame_for, DecodeError, ErrorCode, Frame, FrameType, Hello, Reason, Role,
    Welcome, PROTOCOL_VERSION,
};
use crate::protocol::{GroupName, MemberId, NodeName};

use super::config::ClientConfig;
use super::error::{describe_io, fmt_duration, ClientError};
use super::event::Event;
use super::gaps::Gaps;
use super::state::Shared;

/// Initial (and minimum refill) size of the read buffer.
pub(crate) const READ_BUF: usize = 64 * 1024;
/// Why a connection task stopped.
pub(crate) enum End {
    /// The server closed the connection.
    Eof,
    /// A read or write failed.
    Io(io::Error),
    /// Nothing was received for this long.
    Idle(Duration),
    /// A write made no progress for this long.
    WriteStall(Duration),
    /// The server sent an undecodable frame.
    Protocol(DecodeError),
    /// The server sent `ERROR`.
    Server { code: ErrorCode, message: String },
    /// The server sent a frame a server may not send.
    Unexpected(FrameType),
    /// `close`: the queue was flushed (or the flush failed) and the socket
    /// shut down.
    Closing {
        /// Whether everything queued before `Close` was written and
        /// confirmed by the server.
        flushed: bool,
    },
    /// A move handed the connection over to the next one (its groups
    /// left, the socket shut down).
    Handover {
        /// Whether everything written before was confirmed.
        flushed: bool,
    },
    /// Every handle of the client was dropped.
    ClientGone,
    /// A task panicked or was cancelled.
    TaskFailed(String),
    /// After a reconnect, a group could not be re-joined.
    Rejoin(String),
}

impl End {
    /// Why, in words, for [`Event::Disconnected`] and logs.
    pub(crate) fn reason(&self) -> String {
        match self {
            End::Eof => "connection closed by the server".into(),
            End::Io(e) => describe_io(e),
            End::Idle(d) => format!("nothing received for {}", fmt_duration(*d)),
            End::WriteStall(d) => format!("write made no progress for {}", fmt_duration(*d)),
            End::Protocol(e) => format!("protocol error from the server: {e}"),
            End::Server { code, message } => {
                format!("server error {} ({}): {message}", code.0, code.name())
            }
            End::Unexpected(t) => format!("unexpected frame type 0x{:02x} from the server", t.0),
            End::Closing { .. } => "closed by the client".into(),
            End::Handover { .. } => "moved to another server".into(),
            End::ClientGone => "client dropped".into(),
            End::TaskFailed(e) => format!("connection task failed: {e}"),
            End::Rejoin(e) => e.clone(),
        }
    }

    /// The error handed to requests that were waiting on this connection.
    pub(crate) fn waiter_error(&self) -> ClientError {
        match self {
            End::Server { code, message } => ClientError::Server {
                code: *code,
                message: message.clone(),
            },
            End::Protocol(e) => ClientError::Protocol(e.clone()),
            End::Closing { .. } | End::ClientGone => ClientError::Closed,
            _ => ClientError::Disconnected,
        }
    }
}

/// The receiving half of a connection, plain or TLS.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Sync + Unpin>;
/// The sending half of a connection, plain or TLS. A write is complete
/// only after `flush` (TLS may hold a record until then).
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// A connection that has completed the handshake.
pub(crate) struct Conn {
    /// The server as configured.
    pub server: String,
    /// The server's WELCOME.
    pub welcome: Welcome,
    /// Our member id (checked present in WELCOME).
    pub member: MemberId,
    pub rd: ReadHalf,
    pub wr: WriteHalf,
    /// Bytes read after WELCOME, not yet decoded.
    pub leftover: BytesMut,
}

/// Tries every server in order; the first to complete the handshake wins.
///
/// # Errors
/// [`ClientError::Connect`] listing every attempt's failure.
pub(crate) async fn connect_any(cfg: &ClientConfig) -> Result<Conn, ClientError> {
    let mut attempts = Vec::new();
    for server in &cfg.servers {
        match connect_one(cfg, server).await {
            Ok(conn) => return Ok(conn),
            Err(reason) => {
                tracing::debug!(server, %reason, "msgc client: connect failed");
                attempts.push((server.clone(), reason));
            }
        }
    }
    Err(ClientError::Connect { attempts })
}

/// Dials one configured server (every address it resolves to, in order),
/// then greets it. The error is a short reason for [`ClientError::Connect`].
pub(crate) async fn connect_one(cfg: &ClientConfig, server: &str) -> Result<Conn, String> {
    let addrs = match timeout(cfg.connect_timeout, tokio::net::lookup_host(server)).await {
        Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
        Ok(Err(e)) => return Err(format!("cannot resolve address: {}", describe_io(&e))),
        Err(_) => {
            return Err(format!(
                "name resolution timed out after {}",
                fmt_duration(cfg.connect_timeout)
            ))
        }
    };
    let tls = cfg.tls_config().map_err(|e| e.to_string())?;
    let mut last = String::from("address resolved to nothing");
    for addr in addrs {
        let stream = match timeout(cfg.connect_timeout, dial(cfg, addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                last = describe_io(&e);
                continue;
            }
            Err(_) => {
                last = format!(
                    "connect timed out after {}",
                    fmt_duration(cfg.connect_timeout)
                );
                continue;
            }
        };
        let greet = async {
            match &tls {
                None => {
                    let (rd, wr) = stream.into_split();
                    handshake(cfg, server, Box::new(rd), Box::new(wr)).await
                }
                Some(tls) => {
                    let stream = tls_connect(cfg, server, tls.clone(), stream).await?;
                    let (rd, wr) = tokio::io::split(stream);
                    handshake(cfg, server, Box::new(rd), Box::new(wr)).await
                }
            }
        };
        return match timeout(cfg.connect_timeout, greet).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no WELCOME within {}",
                fmt_duration(cfg.connect_timeout)
            )),
        };
    }
    Err(last)
}

/// Opens a TCP connection with the configured socket options.
async fn dial(cfg: &ClientConfig, addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if cfg.tcpbuf_size > 0 {
        sock.set_send_buffer_size(cfg.tcpbuf_size)?;
        // The receive side is left to autotuning where it reaches
        // tcpbuf_size (a fixed one makes the server face zero windows).
        if crate::config::fixed_receive(cfg.tcpbuf_size, crate::config::autotuned_receive_max()) {
            sock.set_recv_buffer_size(cfg.tcpbuf_size)?;
        }
    }
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = cfg.bind_address {
        if ip.is_ipv4() == addr.is_ipv4() {
            sock.bind(&SocketAddr::new(ip, 0).into())?;
        }
    }
    sock.set_nonblocking(true)?;
    TcpSocket::from_std_stream(sock.into()).connect(addr).await
}

/// The TLS handshake, checking the server's certificate against
/// `tls_ca` and `tls_server_name` (or the host part of `server`).
async fn tls_connect(
    cfg: &ClientConfig,
    server: &str,
    tls: Arc<rustls::ClientConfig>,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    let host = match &cfg.tls_server_name {
        Some(name) => name.clone(),
        None => host_of(server).to_string(),
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
        ClientError::InvalidConfig(format!("TLS: {host:?} is not a server name: {e}"))
    })?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    connector.connect(name, stream).await.map_err(|e| {
        let what = match e.get_ref() {
            Some(inner) => inner.to_string(),
            None => e.to_string(),
        };
        io::Error::new(e.kind(), format!("the TLS handshake failed: {what}")).into()
    })
}

/// The host part of `host:port` or `[v6]:port` (the whole string when it
/// has no port).
fn host_of(server: &str) -> &str {
    if let Some(rest) = server.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match server.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => server,
    }
}

/// True when `buf` starts like a TLS record (an alert or a handshake):
/// what a TLS server answers a plain HELLO with.
fn tls_record_start(buf: &[u8]) -> bool {
    matches!(buf, [0x15 | 0x16, 0x03, ..])
}

/// The HELLO credentials of `cfg`: empty without a user.
fn credentials(cfg: &ClientConfig) -> Result<Bytes, ClientError> {
    let Some(user) = &cfg.user else {
        return Ok(Bytes::new());
    };
    let creds = crate::protocol::Credentials {
        user: user.clone(),
        password: cfg.password.clone().unwrap_or_default().into_bytes(),
    };
    creds
        .encode()
        .map_err(|e| ClientError::InvalidConfig(format!("user `{user}`: {e}")))
}

/// Sends HELLO and waits for WELCOME.
async fn handshake(
    cfg: &ClientConfig,
    server: &str,
    mut rd: ReadHalf,
    mut wr: WriteHalf,
) -> Result<Conn, ClientError> {
    let name = match &cfg.name {
        Some(n) => {
            Some(
                NodeName::from_str_checked(n).map_err(|error| ClientError::InvalidName {
                    name: n.clone(),
                    error,
                })?,
            )
        }
        None => None,
    };
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        name,
        credentials: credentials(cfg)?,
        // A move is offered only with numbered deliveries: they are what
        // tells the two connections' copies of a message apart.
        features: if cfg.sequenced {
            features::SEQ | features::LEAVING
        } else {
            0
        },
        max_message_size: 0,
    });
    wr.write_all(&hello.to_bytes()).await?;
    wr.flush().await?;
    let max_frame = max_frame_for(cfg.max_message_size);
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let welcome = loop {
        if tls_record_start(&buf) {
            // No msgc frame is that long (0x15/0x16 03 …: over 350 MB).
            let msg = "the server speaks TLS: connect with TLS (tls_ca, --tls-ca)";
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg).into());
        }
        match decode(&mut buf, max_frame)? {
            Some(Frame::Welcome(w)) => break w,
            Some(Frame::Error { code, message }) => {
                return Err(ClientError::Server { code, message })
            }
            Some(_) => return Err(DecodeError::Malformed("expected WELCOME").into()),
            None => {}
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed during the handshake",
            )
            .into());
        }
    };
    if welcome.version != PROTOCOL_VERSION {
        return Err(DecodeError::Malformed("server speaks another protocol version").into());
    }
    let Some(member) = welcome.member.clone() else {
        return Err(DecodeError::Malformed("WELCOME without a member id").into());
    };
    Ok(Conn {
        server: server.to_string(),
        welcome,
        member,
        rd,
        wr,
        leftover: buf,
    })
}

/// What the reader needs besides its socket.
pub(crate) struct ReadCtx {
    pub shared: Arc<Shared>,
    pub events: flume::Sender<Event>,
    pub max_frame: usize,
    pub idle: Duration,
    pub per_iter: usize,
    /// Our member id on this connection (to tell our own leave).
    pub member: MemberId,
    /// Last sequence numbers seen on this connection (and, after a move,
    /// on the one it replaced).
    pub gaps: Arc<Mutex<Gaps>>,
    /// Set on a move's new connection until the old one is done: its
    /// deliveries wait here (see [`Hold`]).
    pub hold: Option<Hold>,
    /// After a move, until then: a delivery numbered at or below the last
    /// one seen from its sender in its group is the old connection's
    /// message again, and dropped.
    pub dedup_until: Option<Instant>,
    /// How long the de-duplication lasts after a hold is released.
    pub dedup_for: Duration,
}

/// Most deliveries, and most payload bytes, a move's new connection holds
/// before it stops reading until the old connection is done (TCP then
/// holds the rest, in the server's queue for this connection).
pub(crate) const HOLD_MAX: usize = 65_536;
pub(crate) const HOLD_BYTES: usize = 16 * 1024 * 1024;

/// A move's new connection, while the old one still delivers: its
/// deliveries are held, in order, until `release` fires (the old
/// connection is done, and its last numbers are in the shared table).
pub(crate) struct Hold {
    pub release: oneshot::Receiver<()>,
    pub held: Vec<Frame>,
    /// Payload bytes in `held`.
    pub bytes: usize,
}

/// Reads, decodes and dispatches until the connection ends.
pub(crate) async fn read_loop(mut rd: ReadHalf, mut buf: BytesMut, mut ctx: ReadCtx) -> End {
    let mut since_yield = 0usize;
    let idle = ctx.idle;
    loop {
        loop {
            let frame = match decode(&mut buf, ctx.max_frame) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return End::Protocol(e),
            };
            if let (Some(h), Frame::Deliver { payload, .. }) = (&mut ctx.hold, &frame) {
                if h.held.len() < HOLD_MAX && h.bytes < HOLD_BYTES {
                    h.bytes += payload.len();
                    h.held.push(frame);
                    continue;
                }
                // Full: nothing more is read until the old connection is done.
                let _ = (&mut h.release).await;
                if let Err(end) = release(&mut ctx).await {
                    return end;
                }
            }
            if let Err(end) = dispatch(&mut ctx, frame).await {
                return end;
            }
            since_yield += 1;
            if since_yield >= ctx.per_iter {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        // Always read with a whole READ_BUF free: small reads open the TCP
        // window by less than an MSS (64 KiB on loopback), and Linux then
        // withholds the window update, leaving the sender to its 200 ms
        // persist timer (see tuning.md).
        if buf.capacity() - buf.len() < READ_BUF {
            buf.reserve(READ_BUF);
        }
        let read = match ctx.hold.as_mut() {
            Some(h) => tokio::select! {
                r = timeout(idle, rd.read_buf(&mut buf)) => Some(r),
                _ = &mut h.release => None,
            },
            None => Some(timeout(idle, rd.read_buf(&mut buf)).await),
        };
        match read {
            None => {
                if let Err(end) = release(&mut ctx).await {
                    return end;
                }
            }
            Some(Ok(Ok(0))) => return End::Eof,
            Some(Ok(Ok(_))) => {}
            Some(Ok(Err(e))) => return End::Io(e),
            Some(Err(_)) => return End::Idle(idle),
        }
    }
}

/// The old connection of a move is done: the held deliveries go out, each
/// checked against what it delivered.
async fn release(ctx: &mut ReadCtx) -> Result<(), End> {
    let Some(hold) = ctx.hold.take() else {
        return Ok(());
    };
    ctx.dedup_until = Some(Instant::now() + ctx.dedup_for);
    for frame in hold.held {
        dispatch(ctx, frame).await?;
    }
    Ok(())
}

/// True when a delivery numbered `seq` was delivered already by the
/// connection a move replaced.
fn duplicate(
    ctx: &mut ReadCtx,
    gaps: &Gaps,
    group: &GroupName,
    sender: &MemberId,
    seq: u64,
) -> bool {
    deduplicating(ctx) && gaps.last(group, sender).is_some_and(|last| seq <= last)
}

/// True while the de-duplication after a move lasts; ends it once its
/// time is up.
fn deduplicating(ctx: &mut ReadCtx) -> bool {
    if ctx.dedup_until.is_some_and(|until| Instant::now() >= until) {
        ctx.dedup_until = None;
    }
    ctx.dedup_until.is_some()
}

async fn dispatch(ctx: &mut ReadCtx, frame: Frame) -> Result<(), End> {
    match frame {
        Frame::Deliver {
            group,
            sender,
            seq,
            payload,
        } => {
            let missing = match seq {
                Some(seq) => {
                    let gaps = ctx.gaps.clone();
                    let mut gaps = gaps.lock().unwrap_or_else(|p| p.into_inner());
                    if duplicate(ctx, &gaps, &group, &sender, seq) {
                        return Ok(());
                    }
                    gaps.observe(&group, &sender, seq)
                }
                None => None,
            };
            if let Some(missing) = missing {
                ctx.shared.add_gaps(missing);
                let gap = Event::Gap {
                    group: group.clone(),
                    sender: sender.clone(),
                    missing,
                };
                emit(ctx, gap).await?;
            }
            let message = Event::Message {
                group,
                sender,
                payload,
            };
            emit(ctx, message).await
        }
        // A batch of membership changes is handed out one event per change,
        // exactly as if each had come in its own MEMBERSHIP frame.
        Frame::MembershipBatch { group, changes } => {
            for c in changes {
                let one = Frame::Membership {
                    group: group.clone(),
                    subject: c.subject,
                    reason: c.reason,
                    size: c.size,
                };
                dispatch_one(ctx, one).await?;
            }
            Ok(())
        }
        Frame::Move { deadline_ms } => {
            ctx.shared.ask_move(deadline_ms);
            Ok(())
        }
        frame => dispatch_one(ctx, frame).await,
    }
}

async fn dispatch_one(ctx: &mut ReadCtx, frame: Frame) -> Result<(), End> {
    if let Frame::Membership {
        group,
        subject,
        reason,
        ..
    } = &frame
    {
        forget(ctx, group, subject, *reason);
    }
    if let Frame::Error { code, message } = frame {
        if code == ErrorCode::PERMISSION_DENIED {
            let event = ctx.shared.on_denied(message);
            return emit(ctx, event).await;
        }
        return Err(End::Server { code, message });
    }
    match ctx.shared.on_frame(frame) {
        Ok(Some(event)) => emit(ctx, event).await,
        Ok(None) => Ok(()),
        Err(Frame::Error { code, message }) => Err(End::Server { code, message }),
        Err(other) => Err(End::Unexpected(other.frame_type())),
    }
}

/// A membership change ends the runs it concerns: the group's, when we
/// leave it; a member's in that group, when it leaves or disconnects (ids
/// are never reused). A node-down ends nothing: a sender behind a link
/// that was cut and re-formed goes on numbering, and what was lost in
/// between shows as a gap; the senders of a node that restarted have new
/// ids.
///
/// During a move nothing is forgotten, on either connection: the table is
/// what tells the new connection's copies of the old one's deliveries
/// (among them those of a member whose leave came meanwhile). A stale
/// entry costs its room only: ids are never reused.
fn forget(ctx: &mut ReadCtx, group: &GroupName, subject: &[u8], reason: Reason) {
    let moving = ctx.hold.is_some()
        || deduplicating(ctx)
        || ctx.shared.lock().previous.as_ref() == Some(&ctx.member);
    if moving {
        return;
    }
    let mut gaps = ctx.gaps.lock().unwrap_or_else(|p| p.into_inner());
    match reason {
        Reason::Leave | Reason::Disconnect if subject == ctx.member.as_bytes() => {
            gaps.forget_group(group);
        }
        Reason::Leave | Reason::Disconnect => gaps.forget_member(group, subject),
        Reason::NodeDown | Reason::NodeLeft | Reason::Join => {}
    }
}

/// Hands an event to the application.
async fn emit(ctx: &ReadCtx, event: Event) -> Result<(), End> {
    match ctx.events.try_send(event) {
        Ok(()) => Ok(()),
        // Full: wait for the application; this is the backpressure.
        Err(flume::TrySendError::Full(event)) => ctx
            .events
            .send_async(event)
            .await
            .map_err(|_| End::ClientGone),
        Err(flume::TrySendError::Disconnected(_)) => Err(End::ClientGone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_server_name_is_the_host_of_the_address() {
        assert_eq!(host_of("127.0.0.1:4809"), "127.0.0.1");
        assert_eq!(host_of("msgc.example:4809"), "msgc.example");
        assert_eq!(host_of("[::1]:4809"), "::1");
        assert_eq!(host_of("msgc.example"), "msgc.example");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn a_tls_answer_is_told_from_a_frame() {
        assert!(tls_record_start(&[0x15, 0x03, 0x03, 0x00, 0x02]));
        assert!(tls_record_start(&[0x16, 0x03, 0x01]));
        assert!(!tls_record_start(&[0x15]));
        assert!(!tls_record_start(&[0x00, 0x00, 0x00, 0x01, 0x03]));
    }
}
