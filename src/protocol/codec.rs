//! Byte layout of every frame: `encode` into a `BytesMut`, two-step
//! `decode` out of one.
//!
//! A frame is a 4-byte big-endian length `N`, then `N` bytes: one type byte
//! and the body. Decoding never allocates for a frame before it is whole and
//! its length is within the limit; payloads and names are slices of the read
//! buffer. Incomplete input is `Ok(None)`; anything malformed is a
//! [`DecodeError`] that maps to an [`ErrorCode`].

use super::frame::{
    snapshot_flags, ErrorCode, Events, Frame, FrameType, Hello, MembershipChange, Reason, Role,
    Welcome, AUTH_LEN, MAGIC,
};
use super::names::{GroupName, MemberId, NameError, NodeName};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of a frame that are not payload, at the most: length, type, two
/// names with their length bytes, and fixed fields. The frame limit is
/// `max_message_size + FRAME_OVERHEAD`.
pub const FRAME_OVERHEAD: usize = 1024;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix is larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The length prefix is zero (a frame needs at least its type byte).
    #[error("frame length is zero")]
    ZeroLength,
    /// The type byte is not known.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The body does not match the type's layout.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A name field breaks the name rules.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// `HELLO` without the magic bytes.
    #[error("bad magic in HELLO")]
    BadMagic,
}

impl DecodeError {
    /// The wire error code reported to the sender before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::TOO_LARGE,
            Self::ZeroLength | Self::Malformed(_) => ErrorCode::MALFORMED,
            Self::UnknownType(_) => ErrorCode::UNKNOWN_TYPE,
            Self::InvalidName(_) => ErrorCode::INVALID_NAME,
            Self::BadMagic => ErrorCode::UNSUPPORTED_VERSION,
        }
    }
}

/// Decodes one frame from the front of `buf`, removing its bytes.
///
/// `max_frame` bounds the length prefix (type byte and body).
///
/// # Errors
/// [`DecodeError`] when the bytes cannot be a valid frame; the connection
/// should be answered with `ERROR` and closed. A bad length prefix leaves
/// `buf` as it was; a bad body has already been removed from it.
pub fn decode(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, DecodeError> {
    let Some(len) = peek_len(buf, max_frame)? else {
        return Ok(None);
    };
    if buf.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    let mut body = buf.split_to(LEN_PREFIX + len).freeze();
    body.advance(LEN_PREFIX);
    let ty = body.get_u8();
    decode_body(FrameType(ty), body).map(Some)
}

/// A whole, valid `PUBLISH` at the front of `buf`, read where it lies:
/// (its length with the prefix, the group, the payload). `None` when the
/// front is anything else, incomplete, or invalid: [`decode`] then gives
/// the frame or its error as usual. The server's fast path for the most
/// common frame: no frame value, no reference counts.
#[inline]
pub fn peek_publish(buf: &[u8], max_frame: usize) -> Option<(usize, &[u8], &[u8])> {
    if buf.get(LEN_PREFIX) != Some(&FrameType::PUBLISH.0) {
        return None;
    }
    let n = u32::from_be_bytes(buf.get(..LEN_PREFIX)?.try_into().ok()?) as usize;
    if n > max_frame {
        return None;
    }
    let body = buf.get(LEN_PREFIX + 1..LEN_PREFIX + n)?;
    let (&glen, rest) = body.split_first()?;
    let group = rest.get(..usize::from(glen))?;
    super::names::validate_name(group).ok()?;
    Some((LEN_PREFIX + n, group, &rest[usize::from(glen)..]))
}

/// Reads and checks the length prefix, if four bytes are there.
///
/// # Errors
/// [`DecodeError::TooLarge`] or [`DecodeError::ZeroLength`].
pub fn peek_len(buf: &[u8], max_frame: usize) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 {
        return Err(DecodeError::ZeroLength);
    }
    if len > max_frame {
        return Err(DecodeError::TooLarge {
            len,
            max: max_frame,
        });
    }
    Ok(Some(len))
}

/// Decodes a frame body of type `ty` (the bytes after the type byte).
///
/// # Errors
/// [`DecodeError`] when the body does not match the type's layout.
pub fn decode_body(ty: FrameType, mut b: Bytes) -> Result<Frame, DecodeError> {
    let frame = match ty {
        FrameType::HELLO => Frame::Hello(decode_hello(&mut b)?),
        FrameType::WELCOME => Frame::Welcome(decode_welcome(&mut b)?),
        FrameType::NOOP => Frame::Noop,
        FrameType::CHALLENGE => Frame::Challenge {
            nonce: fixed(&mut b)?,
            mac: fixed(&mut b)?,
        },
        FrameType::PROOF => Frame::Proof {
            mac: fixed(&mut b)?,
        },
        FrameType::ERROR => decode_error(&mut b)?,
        FrameType::PING => Frame::Ping {
            token: u64_(&mut b)?,
        },
        FrameType::PONG => Frame::Pong {
            token: u64_(&mut b)?,
        },
        FrameType::JOIN => decode_join(&mut b)?,
        FrameType::LEAVE => Frame::Leave {
            group: group(&mut b)?,
        },
        FrameType::PUBLISH => Frame::Publish {
            group: group(&mut b)?,
            payload: rest(&mut b),
        },
        FrameType::SEND => Frame::Send {
            to: member(&mut b)?,
            payload: rest(&mut b),
        },
        FrameType::MEMBERS_REQUEST => Frame::MembersRequest {
            req: u32_(&mut b)?,
            group: group(&mut b)?,
        },
        FrameType::STATS_REQUEST => Frame::StatsRequest { req: u32_(&mut b)? },
        FrameType::DELIVER => Frame::Deliver {
            group: group(&mut b)?,
            sender: member(&mut b)?,
            seq: None,
            payload: rest(&mut b),
        },
        FrameType::DELIVER_SEQ => Frame::Deliver {
            group: group(&mut b)?,
            sender: member(&mut b)?,
            seq: Some(u64_(&mut b)?),
            payload: rest(&mut b),
        },
        FrameType::DIRECT => Frame::Direct {
            sender: member(&mut b)?,
            payload: rest(&mut b),
        },
        FrameType::MEMBERSHIP => decode_membership(&mut b)?,
        FrameType::MEMBERSHIP_BATCH => decode_membership_batch(&mut b)?,
        FrameType::MEMBERS_REPLY => decode_members_reply(&mut b)?,
        FrameType::STATS_REPLY => Frame::StatsReply {
            req: u32_(&mut b)?,
            json: rest(&mut b),
        },
        FrameType::SNAPSHOT => decode_snapshot(&mut b)?,
        FrameType::PEER_JOIN => Frame::PeerJoin {
            group: group(&mut b)?,
            member: member(&mut b)?,
        },
        FrameType::PEER_LEAVE => Frame::PeerLeave {
            group: group(&mut b)?,
            member: member(&mut b)?,
            reason: match reason(&mut b)? {
                r @ (Reason::Leave | Reason::Disconnect) => r,
                _ => {
                    return Err(DecodeError::Malformed(
                        "peer leave reason must be 2 (leave) or 3 (disconnect)",
                    ))
                }
            },
        },
        FrameType::FORWARD => Frame::Forward {
            group: group(&mut b)?,
            sender: member(&mut b)?,
            seq: None,
            payload: rest(&mut b),
        },
        FrameType::FORWARD_SEQ => Frame::Forward {
            group: group(&mut b)?,
            sender: member(&mut b)?,
            seq: Some(u64_(&mut b)?),
            payload: rest(&mut b),
        },
        FrameType::FORWARD_DIRECT => Frame::ForwardDirect {
            to: member(&mut b)?,
            sender: member(&mut b)?,
            payload: rest(&mut b),
        },
        FrameType::MOVE => Frame::Move {
            deadline_ms: u32_(&mut b)?,
        },
        FrameType::NODE_LEAVING => Frame::NodeLeaving,
        FrameType(other) => return Err(DecodeError::UnknownType(other)),
    };
    if b.has_remaining() {
        return Err(DecodeError::Malformed(
            "trailing bytes after the last field",
        ));
    }
    Ok(frame)
}

fn decode_hello(b: &mut Bytes) -> Result<Hello, DecodeError> {
    if b.remaining() < MAGIC.len() || &b[..MAGIC.len()] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    b.advance(MAGIC.len());
    let version = u16_(b)?;
    let role = match u8_(b)? {
        1 => Role::Client,
        2 => Role::Peer,
        _ => {
            return Err(DecodeError::Malformed(
                "role must be 1 (client) or 2 (peer)",
            ))
        }
    };
    let name = opt_name(b)?.map(NodeName::new).transpose()?;
    let len = u16_(b)? as usize;
    let credentials = take(b, len)?;
    // Optional tail (both fields or neither): features, max_message_size.
    let (features, max_message_size) = if b.has_remaining() {
        (u32_(b)?, u32_(b)?)
    } else {
        (0, 0)
    };
    Ok(Hello {
        version,
        role,
        name,
        credentials,
        features,
        max_message_size,
    })
}

fn decode_welcome(b: &mut Bytes) -> Result<Welcome, DecodeError> {
    Ok(Welcome {
        version: u16_(b)?,
        node: NodeName::new(str8(b)?)?,
        member: opt_name(b)?.map(MemberId::new).transpose()?,
        max_message_size: u32_(b)?,
        idle_timeout_ms: u32_(b)?,
        // Optional tail.
        features: if b.has_remaining() { u32_(b)? } else { 0 },
    })
}

fn decode_error(b: &mut Bytes) -> Result<Frame, DecodeError> {
    let code = ErrorCode(u16_(b)?);
    let len = u16_(b)? as usize;
    let text = take(b, len)?;
    let message = String::from_utf8(text.to_vec())
        .map_err(|_| DecodeError::Malformed("error message is not UTF-8"))?;
    Ok(Frame::Error { code, message })
}

fn decode_join(b: &mut Bytes) -> Result<Frame, DecodeError> {
    let group = group(b)?;
    // Optional: a v1 `JOIN` ends after the group.
    let events = if b.has_remaining() {
        Events::from_u8(u8_(b)?).ok_or(DecodeError::Malformed(
            "join events must be 0 (each), 1 (batched) or 2 (none)",
        ))?
    } else {
        Events::Each
    };
    Ok(Frame::Join { group, events })
}

fn decode_membership_batch(b: &mut Bytes) -> Result<Frame, DecodeError> {
    let group = group(b)?;
    let count = count(b, 7)?;
    if count == 0 {
        return Err(DecodeError::Malformed("a membership batch holds no change"));
    }
    let mut changes = Vec::with_capacity(prealloc::<MembershipChange>(count, b));
    for _ in 0..count {
        let reason = reason(b)?;
        let size = u32_(b)?;
        let subject = str8(b)?;
        super::names::validate_name(&subject)?;
        changes.push(MembershipChange {
            reason,
            size,
            subject,
        });
    }
    Ok(Frame::MembershipBatch { group, changes })
}

fn decode_membership(b: &mut Bytes) -> Result<Frame, DecodeError> {
    let group = group(b)?;
    let reason = reason(b)?;
    let size = u32_(b)?;
    let subject = str8(b)?;
    super::names::validate_name(&subject)?;
    Ok(Frame::Membership {
        group,
        subject,
        reason,
        size,
    })
}

fn decode_members_reply(b: &mut Bytes) -> Result<Frame, DecodeError> {
    let req = u32_(b)?;
    let last = match u8_(b)? {
        0 => false,
        1 => true,
        _ => return Err(DecodeError::Malformed("members reply flags must be 0 or 1")),
    };
    let group = group(b)?;
    let count = count(b, 2)?;
    let mut members = Vec::with_capacity(prealloc::<MemberId>(count, b));
    for _ in 0..count {
        members.push(member(b)?);
    }
    Ok(Frame::MembersReply {
        req,
        last,
        group,
        members,
    })
}

fn decode_snapshot(b: &mut Bytes) -> Result<Frame, DecodeError> {
    let flags = u8_(b)?;
    if flags & !(snapshot_flags::FIRST | snapshot_flags::LAST) != 0 {
        return Err(DecodeError::Malformed("unknown snapshot flags"));
    }
    let count = count(b, 4)?;
    let mut entries = Vec::with_capacity(prealloc::<(GroupName, MemberId)>(count, b));
    for _ in 0..count {
        entries.push((group(b)?, member(b)?));
    }
    Ok(Frame::Snapshot { flags, entries })
}

/// Reads a u32 element count and checks that `count * min_entry` bytes remain,
/// so a forged count cannot make us allocate.
fn count(b: &mut Bytes, min_entry: usize) -> Result<usize, DecodeError> {
    let n = u32_(b)? as usize;
    if n.saturating_mul(min_entry) > b.remaining() {
        return Err(DecodeError::Malformed("element count exceeds the frame"));
    }
    Ok(n)
}

/// How many of `count` list elements of type `T` to reserve up front: no
/// more than the rest of the frame's own size in memory. An element in
/// memory (32 or 64 bytes) is larger than its smallest encoding (2 or 4
/// bytes), so reserving `count` outright would let a frame whose count
/// passes [`count`] but whose entries are garbage cost 16 times its size;
/// past this the list grows only with entries actually decoded.
fn prealloc<T>(count: usize, b: &Bytes) -> usize {
    count.min(b.remaining() / std::mem::size_of::<T>().max(1))
}

fn u8_(b: &mut Bytes) -> Result<u8, DecodeError> {
    b.try_get_u8()
        .map_err(|_| DecodeError::Malformed("truncated field"))
}

fn u16_(b: &mut Bytes) -> Result<u16, DecodeError> {
    b.try_get_u16()
        .map_err(|_| DecodeError::Malformed("truncated field"))
}

fn u32_(b: &mut Bytes) -> Result<u32, DecodeError> {
    b.try_get_u32()
        .map_err(|_| DecodeError::Malformed("truncated field"))
}

fn u64_(b: &mut Bytes) -> Result<u64, DecodeError> {
    b.try_get_u64()
        .map_err(|_| DecodeError::Malformed("truncated field"))
}

fn take(b: &mut Bytes, len: usize) -> Result<Bytes, DecodeError> {
    if b.remaining() < len {
        return Err(DecodeError::Malformed(
            "field runs past the end of the frame",
        ));
    }
    Ok(b.split_to(len))
}

/// A fixed-size field of the peer authentication.
fn fixed(b: &mut Bytes) -> Result<[u8; AUTH_LEN], DecodeError> {
    let mut out = [0; AUTH_LEN];
    if b.remaining() < AUTH_LEN {
        return Err(DecodeError::Malformed(
            "field runs past the end of the frame",
        ));
    }
    b.copy_to_slice(&mut out);
    Ok(out)
}

fn str8(b: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = u8_(b)? as usize;
    take(b, len)
}

fn opt_name(b: &mut Bytes) -> Result<Option<Bytes>, DecodeError> {
    let s = str8(b)?;
    Ok((!s.is_empty()).then_some(s))
}

fn group(b: &mut Bytes) -> Result<GroupName, DecodeError> {
    Ok(GroupName::new(str8(b)?)?)
}

fn member(b: &mut Bytes) -> Result<MemberId, DecodeError> {
    Ok(MemberId::new(str8(b)?)?)
}

fn reason(b: &mut Bytes) -> Result<Reason, DecodeError> {
    Reason::from_u8(u8_(b)?).ok_or(DecodeError::Malformed("unknown membership reason"))
}

fn rest(b: &mut Bytes) -> Bytes {
    b.split_off(0)
}

// ---------------------------------------------------------------- encoding

/// Writes the length prefix and type byte for a body of `body_len` bytes.
fn header(dst: &mut BytesMut, ty: FrameType, body_len: usize) {
    dst.reserve(LEN_PREFIX + 1 + body_len);
    // Frames are bounded by the frame limit (far below 4 GiB) before encoding.
    dst.put_u32((body_len + 1) as u32);
    dst.put_u8(ty.0);
}

fn put_str8(dst: &mut BytesMut, s: &[u8]) {
    // Names are validated to at most 255 bytes; longer input is cut, never wrapped.
    let s = &s[..s.len().min(255)];
    dst.put_u8(s.len() as u8);
    dst.put_slice(s);
}

fn put_str16(dst: &mut BytesMut, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    dst.put_u16(s.len() as u16);
    dst.put_slice(s);
}

/// Encodes a `DELIVER` (or, with `ty = FORWARD`, a `FORWARD`) frame into a
/// fresh shared buffer: the one copy of a publish's payload that every
/// recipient then shares.
pub fn encode_group_message(
    ty: FrameType,
    group: &GroupName,
    sender: &MemberId,
    payload: &[u8],
) -> Bytes {
    encode_group_message_raw(ty, group.as_bytes(), sender.as_bytes(), None, payload)
}

/// As [`encode_group_message`] from raw (already valid) names, with the
/// sequence number of `DELIVER_SEQ` / `FORWARD_SEQ` when `seq` is set (the
/// caller picks the matching `ty`).
pub fn encode_group_message_raw(
    ty: FrameType,
    group: &[u8],
    sender: &[u8],
    seq: Option<u64>,
    payload: &[u8],
) -> Bytes {
    GroupMessage {
        ty,
        group,
        sender,
        seq,
        payload,
    }
    .encode()
}

/// A group message to encode (`DELIVER`, `DELIVER_SEQ`, `FORWARD` or
/// `FORWARD_SEQ`; `seq` set for the numbered forms) from raw, already
/// valid names.
#[derive(Debug, Clone, Copy)]
pub struct GroupMessage<'a> {
    /// The frame type.
    pub ty: FrameType,
    /// The group's name.
    pub group: &'a [u8],
    /// The sender's member id.
    pub sender: &'a [u8],
    /// The publish number, for the numbered forms.
    pub seq: Option<u64>,
    /// The payload.
    pub payload: &'a [u8],
}

impl GroupMessage<'_> {
    /// Names are validated to at most 255 bytes; longer input is cut,
    /// never wrapped.
    fn name(s: &[u8]) -> &[u8] {
        &s[..s.len().min(255)]
    }

    /// The length of the encoded frame.
    pub fn len(&self) -> usize {
        LEN_PREFIX + 1 + self.body_len()
    }

    /// Never empty: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn body_len(&self) -> usize {
        2 + Self::name(self.group).len()
            + Self::name(self.sender).len()
            + self.seq.map_or(0, |_| 8)
            + self.payload.len()
    }

    /// Appends the frame to `dst` (frames for another shard are packed
    /// back to back in one buffer).
    pub fn put<B: BufMut>(&self, dst: &mut B) {
        let (group, sender) = (Self::name(self.group), Self::name(self.sender));
        // Frames are bounded by the frame limit (far below 4 GiB) before encoding.
        dst.put_u32((self.body_len() + 1) as u32);
        dst.put_u8(self.ty.0);
        dst.put_u8(group.len() as u8);
        dst.put_slice(group);
        dst.put_u8(sender.len() as u8);
        dst.put_slice(sender);
        if let Some(seq) = self.seq {
            dst.put_u64(seq);
        }
        dst.put_slice(self.payload);
    }

    /// The frame, in a buffer of its own.
    pub fn encode(&self) -> Bytes {
        let mut dst = BytesMut::with_capacity(self.len());
        self.put(&mut dst);
        dst.freeze()
    }
}

/// (group, sender, seq, payload) of an encoded group message.
pub type GroupMessageParts<'a> = (&'a [u8], &'a [u8], Option<u64>, &'a [u8]);

/// True when an encoded frame carries a message for members (a group
/// message or a `FORWARD_DIRECT`), as opposed to control or membership
/// news: what counts as a lost message when it cannot be delivered.
pub fn is_message_frame(frame: &[u8]) -> bool {
    group_message_parts(frame).is_some()
        || frame.get(LEN_PREFIX) == Some(&FrameType::FORWARD_DIRECT.0)
}

/// The parts of an encoded `DELIVER`, `DELIVER_SEQ`, `FORWARD` or
/// `FORWARD_SEQ` frame built by this module: (group, sender, seq, payload).
/// `None` when the frame is not one of those or is cut short.
pub fn group_message_parts(frame: &[u8]) -> Option<GroupMessageParts<'_>> {
    let ty = FrameType(*frame.get(LEN_PREFIX)?);
    let mut at = LEN_PREFIX + 1;
    let name = |at: &mut usize| -> Option<&[u8]> {
        let len = usize::from(*frame.get(*at)?);
        let s = frame.get(*at + 1..*at + 1 + len)?;
        *at += 1 + len;
        Some(s)
    };
    let group = name(&mut at)?;
    let sender = name(&mut at)?;
    let seq = match ty {
        FrameType::DELIVER_SEQ | FrameType::FORWARD_SEQ => {
            let b = frame.get(at..at + 8)?;
            at += 8;
            Some(u64::from_be_bytes(b.try_into().ok()?))
        }
        FrameType::DELIVER | FrameType::FORWARD => None,
        _ => return None,
    };
    Some((group, sender, seq, frame.get(at..)?))
}

/// Encodes a `MEMBERSHIP` frame from a group's raw name (already valid):
/// the server's events, built once per change and shared by every member
/// told of it.
pub fn encode_membership(group: &[u8], reason: Reason, size: u32, subject: &[u8]) -> Bytes {
    let body = 1 + group.len() + 1 + 4 + 1 + subject.len();
    let mut dst = BytesMut::with_capacity(LEN_PREFIX + 1 + body);
    header(&mut dst, FrameType::MEMBERSHIP, body);
    put_str8(&mut dst, group);
    dst.put_u8(reason as u8);
    dst.put_u32(size);
    put_str8(&mut dst, subject);
    dst.freeze()
}

/// The group name of an encoded frame whose first field is the group
/// (`DELIVER`, `MEMBERSHIP`): what a shard handed such a frame by another
/// shard looks its members up by. `None` for anything shorter than that.
pub fn group_of(frame: &[u8]) -> Option<&[u8]> {
    let len = usize::from(*frame.get(LEN_PREFIX + 1)?);
    frame.get(LEN_PREFIX + 2..LEN_PREFIX + 2 + len)
}

/// Encodes a `MEMBERSHIP_BATCH` frame from a group's raw name (already
/// valid) and `(reason, size, subject)` changes (at least one): built once
/// and shared by every member it goes to.
pub fn encode_membership_batch<'a>(
    group: &[u8],
    changes: impl ExactSizeIterator<Item = (Reason, u32, &'a [u8])> + Clone,
) -> Bytes {
    let body = 1 + group.len() + 4 + changes.clone().map(|c| 6 + c.2.len()).sum::<usize>();
    let mut dst = BytesMut::with_capacity(LEN_PREFIX + 1 + body);
    header(&mut dst, FrameType::MEMBERSHIP_BATCH, body);
    put_str8(&mut dst, group);
    put_changes(&mut dst, changes);
    dst.freeze()
}

fn put_changes<'a>(
    b: &mut BytesMut,
    changes: impl ExactSizeIterator<Item = (Reason, u32, &'a [u8])>,
) {
    // Batches are bounded far below 4 G entries by the frame limit.
    b.put_u32(changes.len() as u32);
    for (reason, size, subject) in changes {
        b.put_u8(reason as u8);
        b.put_u32(size);
        put_str8(b, subject);
    }
}

/// Encodes a `PUBLISH` frame (what clients send).
pub fn encode_publish(dst: &mut BytesMut, group: &GroupName, payload: &[u8]) {
    header(
        dst,
        FrameType::PUBLISH,
        1 + group.as_bytes().len() + payload.len(),
    );
    put_str8(dst, group.as_bytes());
    dst.put_slice(payload);
}

impl Frame {
    /// Appends this frame's bytes to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        // Write the body in place, then patch the length prefix: no
        // intermediate buffer.
        let start = dst.len();
        dst.put_u32(0);
        dst.put_u8(self.frame_type().0);
        self.encode_body(dst);
        // Frames are bounded by the frame limit (far below 4 GiB).
        let len = (dst.len() - start - LEN_PREFIX) as u32;
        dst[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
    }

    /// This frame as a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut dst = BytesMut::with_capacity(64);
        self.encode(&mut dst);
        dst.freeze()
    }

    fn encode_body(&self, b: &mut BytesMut) {
        match self {
            Frame::Hello(h) => encode_hello(b, h),
            Frame::Welcome(w) => encode_welcome(b, w),
            Frame::Noop => {}
            Frame::Challenge { nonce, mac } => {
                b.put_slice(nonce);
                b.put_slice(mac);
            }
            Frame::Proof { mac } => b.put_slice(mac),
            Frame::Error { code, message } => {
                b.put_u16(code.0);
                put_str16(b, utf8_prefix(message, u16::MAX as usize).as_bytes());
            }
            Frame::Ping { token } | Frame::Pong { token } => b.put_u64(*token),
            Frame::Move { deadline_ms } => b.put_u32(*deadline_ms),
            Frame::NodeLeaving => {}
            Frame::Join { group, events } => {
                put_str8(b, group.as_bytes());
                if *events != Events::Each {
                    b.put_u8(*events as u8);
                }
            }
            Frame::Leave { group } => put_str8(b, group.as_bytes()),
            Frame::MembershipBatch { group, changes } => {
                put_str8(b, group.as_bytes());
                put_changes(
                    b,
                    changes.iter().map(|c| (c.reason, c.size, &c.subject[..])),
                );
            }
            Frame::Publish { group, payload } => put_name_payload(b, group.as_bytes(), payload),
            Frame::Send { to, payload } => put_name_payload(b, to.as_bytes(), payload),
            Frame::MembersRequest { req, group } => {
                b.put_u32(*req);
                put_str8(b, group.as_bytes());
            }
            Frame::StatsRequest { req } => b.put_u32(*req),
            Frame::Deliver {
                group,
                sender,
                seq,
                payload,
            }
            | Frame::Forward {
                group,
                sender,
                seq,
                payload,
            } => {
                put_str8(b, group.as_bytes());
                put_str8(b, sender.as_bytes());
                if let Some(seq) = seq {
                    b.put_u64(*seq);
                }
                b.put_slice(payload);
            }
            Frame::Direct { sender, payload } => put_name_payload(b, sender.as_bytes(), payload),
            Frame::Membership {
                group,
                subject,
                reason,
                size,
            } => {
                put_str8(b, group.as_bytes());
                b.put_u8(*reason as u8);
                b.put_u32(*size);
                put_str8(b, subject);
            }
            Frame::MembersReply {
                req,
                last,
                group,
                members,
            } => {
                b.put_u32(*req);
                b.put_u8(u8::from(*last));
                put_str8(b, group.as_bytes());
                b.put_u32(members.len() as u32);
                members.iter().for_each(|m| put_str8(b, m.as_bytes()));
            }
            Frame::StatsReply { req, json } => {
                b.put_u32(*req);
                b.put_slice(json);
            }
            Frame::Snapshot { flags, entries } => {
                b.put_u8(*flags);
                b.put_u32(entries.len() as u32);
                for (g, m) in entries {
                    put_str8(b, g.as_bytes());
                    put_str8(b, m.as_bytes());
                }
            }
            Frame::PeerJoin { group, member } => {
                put_str8(b, group.as_bytes());
                put_str8(b, member.as_bytes());
            }
            Frame::PeerLeave {
                group,
                member,
                reason,
            } => {
                put_str8(b, group.as_bytes());
                put_str8(b, member.as_bytes());
                b.put_u8(*reason as u8);
            }
            Frame::ForwardDirect {
                to,
                sender,
                payload,
            } => {
                put_str8(b, to.as_bytes());
                put_name_payload(b, sender.as_bytes(), payload);
            }
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary, so that a cut `ERROR` message is still valid UTF-8.
fn utf8_prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_name_payload(b: &mut BytesMut, name: &[u8], payload: &[u8]) {
    put_str8(b, name);
    b.put_slice(payload);
}

fn encode_hello(b: &mut BytesMut, h: &Hello) {
    b.put_slice(MAGIC);
    b.put_u16(h.version);
    b.put_u8(h.role as u8);
    put_str8(b, h.name.as_ref().map_or(&[][..], |n| n.as_bytes()));
    put_str16(b, &h.credentials);
    // The optional tail only when it says something: a v1 HELLO stays
    // byte for byte the same.
    if h.features != 0 || h.max_message_size != 0 {
        b.put_u32(h.features);
        b.put_u32(h.max_message_size);
    }
}

fn encode_welcome(b: &mut BytesMut, w: &Welcome) {
    b.put_u16(w.version);
    put_str8(b, w.node.as_bytes());
    put_str8(b, w.member.as_ref().map_or(&[][..], |m| m.as_bytes()));
    b.put_u32(w.max_message_size);
    b.put_u32(w.idle_timeout_ms);
    if w.features != 0 {
        b.put_u32(w.features);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> GroupName {
        GroupName::from_str_checked(s).unwrap()
    }

    #[test]
    fn sequenced_group_messages_match_generic_encoding_and_split_back() {
        let m = MemberId::from_str_checked("n/0.1").unwrap();
        for (ty, seq) in [
            (FrameType::DELIVER, None),
            (FrameType::DELIVER_SEQ, Some(7)),
            (FrameType::FORWARD, None),
            (FrameType::FORWARD_SEQ, Some(u64::MAX)),
        ] {
            let fast = encode_group_message_raw(ty, b"g", m.as_bytes(), seq, b"hi");
            let generic = match ty {
                FrameType::DELIVER | FrameType::DELIVER_SEQ => Frame::Deliver {
                    group: g("g"),
                    sender: m.clone(),
                    seq,
                    payload: Bytes::from_static(b"hi"),
                },
                _ => Frame::Forward {
                    group: g("g"),
                    sender: m.clone(),
                    seq,
                    payload: Bytes::from_static(b"hi"),
                },
            };
            assert_eq!(fast, generic.to_bytes());
            assert_eq!(
                group_message_parts(&fast),
                Some((&b"g"[..], m.as_bytes(), seq, &b"hi"[..]))
            );
        }
        assert_eq!(group_message_parts(&Frame::Noop.to_bytes()), None);
    }

    /// The fast path reads exactly what the decoder reads, and leaves
    /// everything else (other types, incomplete, invalid) to it.
    #[test]
    fn peek_publish_agrees_with_decode() {
        let mut ok = BytesMut::new();
        encode_publish(&mut ok, &g("orders"), b"hello");
        let len = ok.len();
        assert_eq!(
            peek_publish(&ok, 1024),
            Some((len, &b"orders"[..], &b"hello"[..]))
        );
        let mut copy = ok.clone();
        assert!(matches!(
            decode(&mut copy, 1024),
            Ok(Some(Frame::Publish { .. }))
        ));
        assert_eq!(peek_publish(&ok[..len - 1], 1024), None, "incomplete");
        assert_eq!(peek_publish(&ok, len - 5), None, "over the frame limit");
        let mut bad = ok.to_vec();
        bad[6] = b' ';
        assert_eq!(peek_publish(&bad, 1024), None, "invalid name");
        assert_eq!(peek_publish(&[0, 0, 0, 0, 0x12], 1024), None, "N = 0");
        assert_eq!(peek_publish(&[0, 0, 0, 1, 0x12], 1024), None, "no group");
        assert_eq!(
            peek_publish(&Frame::Noop.to_bytes(), 1024),
            None,
            "another type"
        );
    }

    #[test]
    fn partial_input_is_not_an_error() {
        let join = Frame::Join {
            group: g("orders"),
            events: Events::Each,
        };
        let bytes = join.to_bytes();
        let mut buf = BytesMut::new();
        for (i, byte) in bytes.iter().enumerate() {
            assert_eq!(decode(&mut buf, 64).unwrap(), None, "after {i} bytes");
            buf.put_u8(*byte);
        }
        assert_eq!(decode(&mut buf, 64).unwrap(), Some(join));
        assert!(buf.is_empty());
    }

    #[test]
    fn limits_and_unknown_types() {
        let mut buf = BytesMut::from(&[0, 0, 1, 0, 0x12][..]);
        assert_eq!(
            decode(&mut buf, 255),
            Err(DecodeError::TooLarge { len: 256, max: 255 })
        );
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decode(&mut buf, 255), Err(DecodeError::ZeroLength));
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0x7f][..]);
        assert_eq!(decode(&mut buf, 255), Err(DecodeError::UnknownType(0x7f)));
        let mut buf = BytesMut::from(&[0, 0, 0, 2, 0x10, 0][..]);
        assert_eq!(
            decode(&mut buf, 255),
            Err(DecodeError::InvalidName(NameError::Empty))
        );
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0x10][..]);
        assert_eq!(
            decode(&mut buf, 255),
            Err(DecodeError::Malformed("truncated field"))
        );
    }

    #[test]
    fn group_message_matches_generic_encoding() {
        let m = MemberId::from_str_checked("n/0.1").unwrap();
        let fast = encode_group_message(FrameType::DELIVER, &g("a"), &m, b"hi");
        let slow = Frame::Deliver {
            seq: None,
            group: g("a"),
            sender: m,
            payload: Bytes::from_static(b"hi"),
        };
        assert_eq!(fast, slow.to_bytes());
        assert_eq!(group_of(&fast), Some(&b"a"[..]));
    }

    /// `GroupMessage::put` (frames built on the stack and copied) writes
    /// byte for byte what `encode_group_message_raw` allocates, every type.
    #[test]
    fn group_message_put_matches_the_raw_encoding() {
        let m = MemberId::from_str_checked("n/0.1").unwrap();
        for (ty, seq) in [
            (FrameType::DELIVER, None),
            (FrameType::DELIVER_SEQ, Some(9)),
            (FrameType::FORWARD, None),
            (FrameType::FORWARD_SEQ, Some(u64::MAX)),
        ] {
            let msg = GroupMessage {
                ty,
                group: b"orders",
                sender: m.as_bytes(),
                seq,
                payload: b"payload",
            };
            let mut stack = [0u8; 128];
            let mut dst = &mut stack[..];
            msg.put(&mut dst);
            let raw = encode_group_message_raw(ty, b"orders", m.as_bytes(), seq, b"payload");
            assert_eq!(&stack[..msg.len()], &raw[..], "{ty:?}");
            assert_eq!(msg.len(), raw.len());
            // And the generic decoder reads back what was put.
            let mut buf = BytesMut::from(&stack[..msg.len()]);
            let (group, sender, got_seq, payload) = match decode(&mut buf, 1 << 20) {
                Ok(Some(
                    Frame::Deliver {
                        group,
                        sender,
                        seq,
                        payload,
                    }
                    | Frame::Forward {
                        group,
                        sender,
                        seq,
                        payload,
                    },
                )) => (group, sender, seq, payload),
                other => panic!("{ty:?}: {other:?}"),
            };
            assert_eq!(group.as_bytes(), b"orders");
            assert_eq!(sender, m);
            assert_eq!(got_seq, seq);
            assert_eq!(&payload[..], b"payload");
            assert!(buf.is_empty(), "{ty:?}: the whole frame, nothing more");
        }
    }

    #[test]
    fn membership_from_raw_names_matches_generic_encoding() {
        let fast = encode_membership(b"orders", Reason::Leave, 7, b"n/0.1");
        let slow = Frame::Membership {
            group: g("orders"),
            subject: Bytes::from_static(b"n/0.1"),
            reason: Reason::Leave,
            size: 7,
        };
        assert_eq!(fast, slow.to_bytes());
        assert_eq!(group_of(&fast), Some(&b"orders"[..]));
        assert_eq!(group_of(&fast[..5]), None, "too short to hold a group");
    }
}
