//! Raw protocol connections for subscribers: the handshake and joins go
//! through `msgc::protocol` (decode/encode), then frames are parsed in
//! place, without allocating, so reading never costs more than the server
//! spends writing. Also the raw stalled subscriber, which joins and then
//! never reads.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use msgc::protocol::{
    decode, Events, Frame, FrameType, GroupName, Hello, MemberId, Reason, Role, PROTOCOL_VERSION,
};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// Largest frame a subscriber accepts (the server's largest message).
const MAX_FRAME: usize = (64 << 20) + 1024;
/// How long a handshake or a round of joins may take.
const SETUP_LIMIT: Duration = Duration::from_secs(30);

/// A connection that completed HELLO → WELCOME.
pub struct WireConn {
    pub rd: OwnedReadHalf,
    pub wr: OwnedWriteHalf,
    /// Bytes read and not yet decoded.
    pub pending: BytesMut,
    /// Our member id.
    pub member: MemberId,
    /// The server's idle timeout: keepalives go out well within it.
    pub idle: Duration,
    /// The server's `max_message_size` (largest payload it accepts).
    pub max_message: usize,
}

/// Dials `addr` (SO_RCVBUF `rcvbuf` if given) and completes the handshake.
///
/// # Errors
/// When the server cannot be reached or does not welcome us.
pub async fn connect(addr: &str, rcvbuf: Option<usize>) -> Result<WireConn> {
    let target = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to nothing"))?;
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(u32::try_from(n).unwrap_or(u32::MAX))?;
    }
    let stream = tokio::time::timeout(SETUP_LIMIT, sock.connect(target))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    tokio::time::timeout(SETUP_LIMIT, handshake(stream))
        .await
        .map_err(|_| anyhow!("{addr}: no WELCOME within {SETUP_LIMIT:?}"))?
        .with_context(|| format!("handshake with {addr}"))
}

async fn handshake(mut stream: TcpStream) -> Result<WireConn> {
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        name: None,
        credentials: Bytes::new(),
        features: 0,
        max_message_size: 0,
    });
    stream.write_all(&hello.to_bytes()).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let welcome = loop {
        match decode(&mut buf, MAX_FRAME)? {
            Some(Frame::Welcome(w)) => break w,
            Some(Frame::Error { code, message }) => {
                bail!("server refused: {} ({message})", code.name())
            }
            Some(_) => bail!("expected WELCOME"),
            None => {}
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("connection closed during the handshake");
        }
    };
    let member = welcome
        .member
        .ok_or_else(|| anyhow!("WELCOME without a member id"))?;
    let idle = Duration::from_millis(u64::from(welcome.idle_timeout_ms.max(3000)));
    let max_message = usize::try_from(welcome.max_message_size).unwrap_or(usize::MAX);
    let (rd, wr) = stream.into_split();
    Ok(WireConn {
        rd,
        wr,
        pending: buf,
        member,
        idle,
        max_message,
    })
}

impl WireConn {
    /// Joins every group (JOINs pipelined) and waits for our own join event
    /// in each: from then on, every message published there reaches us.
    ///
    /// # Errors
    /// When the server closes, refuses, or does not acknowledge in time.
    pub async fn join_all(&mut self, groups: &[GroupName]) -> Result<()> {
        let mut out = BytesMut::new();
        for g in groups {
            Frame::Join {
                group: g.clone(),
                events: Events::Each,
            }
            .encode(&mut out);
        }
        self.pipeline(&out, groups.len(), Reason::Join).await
    }

    /// Leaves every group (LEAVEs pipelined) and waits for our own leave
    /// event in each.
    ///
    /// # Errors
    /// When the server closes, refuses, or does not acknowledge in time.
    pub async fn leave_all(&mut self, groups: &[GroupName]) -> Result<()> {
        let mut out = BytesMut::new();
        for g in groups {
            Frame::Leave { group: g.clone() }.encode(&mut out);
        }
        self.pipeline(&out, groups.len(), Reason::Leave).await
    }

    /// Sends `frames` at once, then waits for `want` of our own `ack`
    /// events.
    async fn pipeline(&mut self, frames: &[u8], want: usize, ack: Reason) -> Result<()> {
        self.wr.write_all(frames).await?;
        tokio::time::timeout(SETUP_LIMIT, self.await_acks(want, ack))
            .await
            .map_err(|_| anyhow!("{} not acknowledged within {SETUP_LIMIT:?}", ack.name()))?
    }

    async fn await_acks(&mut self, want: usize, ack: Reason) -> Result<()> {
        let mut acked = 0;
        while acked < want {
            match decode(&mut self.pending, MAX_FRAME)? {
                Some(Frame::Membership {
                    subject, reason, ..
                }) => {
                    if reason == ack && subject.as_ref() == self.member.as_bytes() {
                        acked += 1;
                    }
                }
                Some(Frame::Error { code, message }) => {
                    bail!("server error {} ({message})", code.name())
                }
                Some(_) => {}
                None => {
                    self.pending.reserve(64 * 1024);
                    if self.rd.read_buf(&mut self.pending).await? == 0 {
                        bail!("connection closed while waiting for {} events", ack.name());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sends NOOP every third of the server's idle timeout until `stop`, so
/// that a subscriber (or a stalled one) is never closed as idle.
pub async fn keepalive(
    mut wr: OwnedWriteHalf,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> OwnedWriteHalf {
    let noop = Frame::Noop.to_bytes();
    let every = (idle / 3).max(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.changed() => return wr,
            _ = tokio::time::sleep(every) => {
                if wr.write_all(&noop).await.is_err() {
                    let _ = stop.changed().await;
                    return wr;
                }
            }
        }
    }
}

/// One frame seen by the fast reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A DELIVER's payload.
    Deliver(&'a [u8]),
    /// A MEMBERSHIP event: reason (wire value) and subject.
    Membership(u8, &'a [u8]),
    /// An ERROR: the server is closing us.
    Error(u16, &'a [u8]),
    /// Anything else (NOOP, PONG…): ignored.
    Other,
}

/// Parses the frame at the front of `buf` in place: `Ok(None)` until it is
/// whole, else the bytes it took and what it is.
///
/// # Errors
/// When the bytes cannot be a frame from a server.
pub fn next_frame(buf: &[u8]) -> Result<Option<(usize, Item<'_>)>, &'static str> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err("bad frame length");
    }
    let Some(frame) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let body = &frame[1..];
    let item = match FrameType(frame[0]) {
        FrameType::DELIVER => {
            let rest = skip_str8(body).and_then(skip_str8).ok_or("short DELIVER")?;
            Item::Deliver(rest)
        }
        FrameType::MEMBERSHIP => {
            let rest = skip_str8(body).ok_or("short MEMBERSHIP")?;
            let (&reason, rest) = rest.split_first().ok_or("short MEMBERSHIP")?;
            let rest = rest.get(4..).ok_or("short MEMBERSHIP")?;
            let (&n, rest) = rest.split_first().ok_or("short MEMBERSHIP")?;
            Item::Membership(reason, rest.get(..n as usize).ok_or("short MEMBERSHIP")?)
        }
        FrameType::ERROR => {
            let code = body.get(..2).ok_or("short ERROR")?;
            Item::Error(
                u16::from_be_bytes([code[0], code[1]]),
                body.get(4..).unwrap_or(&[]),
            )
        }
        _ => Item::Other,
    };
    Ok(Some((4 + len, item)))
}

fn skip_str8(b: &[u8]) -> Option<&[u8]> {
    let (&n, rest) = b.split_first()?;
    rest.get(n as usize..)
}

/// The payload header: bytes 0..8 the send timestamp (ns since the
/// process epoch), 8..16 the sequence number (publisher index in the top
/// 16 bits, its message counter below).
#[inline]
pub fn read_header(payload: &[u8]) -> Option<(u64, u64)> {
    let ts = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((ts, seq))
}

/// Writes the payload header.
#[inline]
pub fn write_header(payload: &mut [u8], ts: u64, seq: u64) {
    payload[..8].copy_from_slice(&ts.to_le_bytes());
    payload[8..16].copy_from_slice(&seq.to_le_bytes());
}

/// Bits of the sequence number that count messages; above them, the
/// publisher's index.
pub const SEQ_BITS: u32 = 48;

#[cfg(test)]
mod tests {
    use super::*;
    use msgc::protocol::encode_group_message;

    #[test]
    fn parses_deliver_and_membership_in_place() {
        let g = GroupName::from_str_checked("g").unwrap();
        let m = MemberId::from_str_checked("n/0.1").unwrap();
        let mut p = [0u8; 20];
        write_header(&mut p, 7, 9);
        let mut buf = encode_group_message(FrameType::DELIVER, &g, &m, &p).to_vec();
        let ev = Frame::Membership {
            group: g.clone(),
            subject: Bytes::from_static(b"n/0.1"),
            reason: Reason::Join,
            size: 3,
        };
        buf.extend_from_slice(&ev.to_bytes());
        let (n, item) = next_frame(&buf).unwrap().unwrap();
        assert_eq!(item, Item::Deliver(&p[..]));
        assert_eq!(read_header(&p), Some((7, 9)));
        let (k, item) = next_frame(&buf[n..]).unwrap().unwrap();
        assert_eq!(item, Item::Membership(Reason::Join as u8, b"n/0.1"));
        assert_eq!(n + k, buf.len());
        assert_eq!(next_frame(&buf[..n - 1]).unwrap(), None);
    }
}
