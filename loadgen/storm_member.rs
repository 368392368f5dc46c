//! The members of a membership storm: raw wire connections that each join
//! one group, asking for the chosen events about the others, then read
//! their socket until told to close (a member that stops reading is closed
//! by the server as stuck), counting what they are told about the group:
//! their own acknowledgement and the size in it, the joins of others, and
//! the departures of others. Frames are parsed in place: a storm of 10,000
//! `each` members is 50 million frames to read.
//!
//! Owns the connections and their tallies ([`Crowd`], one [`Slot`] per
//! member, read by the scenario while the members run) and what a tally
//! should be ([`Goal`]). What the storm means and what it reports is
//! `storm.rs`' business.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use msgc::protocol::{Events, Frame, FrameType, GroupName, Reason};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::clock::ns_of;
use crate::wire::{self, WireConn};

/// Bytes a member reads at a time (more when a frame is larger).
const READ_CHUNK: usize = 16 * 1024;
/// How long sending the JOIN may take.
const SEND_LIMIT: Duration = Duration::from_secs(30);
/// Error messages kept (the first ones).
const KEEP_ERRORS: usize = 10;

/// What one member has been told about the group so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// The group's size in our own join's acknowledgement (0: none yet;
    /// a size counts ourselves, so it is never 0).
    pub own_size: u32,
    /// Joins of other members told (one per `MEMBERSHIP`, one per entry
    /// of a `MEMBERSHIP_BATCH`).
    pub joins: u64,
    /// Leaves, disconnects and node losses of others told.
    pub departures: u64,
    /// Changes of others told before our own acknowledgement (the server
    /// promises none).
    pub before_ack: u64,
    /// Events about ourselves besides the first acknowledgement (none
    /// expected while we stay).
    pub own_extra: u64,
    /// When the acknowledgement was read, ns since the clock's epoch.
    pub acked_ns: u64,
    /// When the last change (ours or another's) was read, likewise.
    pub last_ns: u64,
}

impl Tally {
    /// Counts one change: `reason` (wire value) of `subject`, the group
    /// then having `size` members; `me` is our member id.
    fn change(&mut self, reason: u8, size: u32, subject: &[u8], me: &[u8], now_ns: u64) {
        self.last_ns = now_ns;
        if subject == me {
            if reason == Reason::Join as u8 && self.own_size == 0 {
                self.own_size = size.max(1);
                self.acked_ns = now_ns;
            } else {
                self.own_extra += 1;
            }
            return;
        }
        if self.own_size == 0 {
            self.before_ack += 1;
        }
        if reason == Reason::Join as u8 {
            self.joins += 1;
        } else {
            self.departures += 1;
        }
    }
}

/// What a member should be told.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    /// The group's size once every join is in: a member acknowledged at
    /// size s is owed the `final_size − s` joins after its own.
    pub final_size: u32,
    /// Departures of others it is owed (None: not checked).
    pub departures: Option<u64>,
    /// Whether the members asked to hear of the others at all (events
    /// `each` or `batched`); if not, they are owed nothing.
    pub told: bool,
}

/// How a member's tally compares with its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No acknowledgement of its own join.
    Unacknowledged,
    /// Told fewer changes than owed (so far).
    Under,
    /// Told more changes than owed.
    Over,
    /// Told exactly what it is owed.
    Exact,
}

impl Goal {
    /// Joins owed to a member acknowledged at size `own`.
    pub fn owed_joins(&self, own: u32) -> u64 {
        if self.told {
            u64::from(self.final_size.saturating_sub(own))
        } else {
            0
        }
    }

    /// Departures owed to every member (0 when not checked).
    pub fn owed_departures(&self) -> u64 {
        match self.departures {
            Some(d) if self.told => d,
            _ => 0,
        }
    }

    /// How `t` compares with what it is owed.
    pub fn verdict(&self, t: &Tally) -> Verdict {
        if t.own_size == 0 {
            return Verdict::Unacknowledged;
        }
        let joins = t.joins.cmp(&self.owed_joins(t.own_size));
        let departures = match self.departures {
            Some(_) => t.departures.cmp(&self.owed_departures()),
            None => std::cmp::Ordering::Equal,
        };
        use std::cmp::Ordering::{Greater, Less};
        match (joins, departures) {
            (Greater, _) | (_, Greater) => Verdict::Over,
            (Less, _) | (_, Less) => Verdict::Under,
            _ => Verdict::Exact,
        }
    }
}

/// One member's tally as its task last published it.
#[derive(Default)]
pub struct Slot {
    own_size: AtomicU32,
    joins: AtomicU64,
    departures: AtomicU64,
    before_ack: AtomicU64,
    own_extra: AtomicU64,
    acked_ns: AtomicU64,
    last_ns: AtomicU64,
    /// Its connection failed (or was closed by the server).
    failed: AtomicBool,
    /// It failed before its JOIN was sent.
    failed_to_open: AtomicBool,
}

impl Slot {
    fn store(&self, t: &Tally) {
        self.own_size.store(t.own_size, Relaxed);
        self.joins.store(t.joins, Relaxed);
        self.departures.store(t.departures, Relaxed);
        self.before_ack.store(t.before_ack, Relaxed);
        self.own_extra.store(t.own_extra, Relaxed);
        self.acked_ns.store(t.acked_ns, Relaxed);
        self.last_ns.store(t.last_ns, Relaxed);
    }

    /// The tally last published.
    pub fn load(&self) -> Tally {
        Tally {
            own_size: self.own_size.load(Relaxed),
            joins: self.joins.load(Relaxed),
            departures: self.departures.load(Relaxed),
            before_ack: self.before_ack.load(Relaxed),
            own_extra: self.own_extra.load(Relaxed),
            acked_ns: self.acked_ns.load(Relaxed),
            last_ns: self.last_ns.load(Relaxed),
        }
    }

    /// True when its connection failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Relaxed)
    }
}

/// The members of one storm (or the witnesses of one): the group, what
/// they ask for, their slots, and the gate that bounds how many are
/// opening at once.
pub struct Crowd {
    pub group: GroupName,
    pub events: Events,
    pub slots: Box<[Slot]>,
    /// Frames read by all members (for progress and stall detection).
    pub frames: AtomicU64,
    gate: Semaphore,
    errors: Mutex<Vec<String>>,
}

impl Crowd {
    /// `n` members of `group` asking for `events`, `parallel` of them
    /// opening at once.
    pub fn new(group: GroupName, events: Events, n: usize, parallel: usize) -> Arc<Self> {
        Arc::new(Self {
            group,
            events,
            slots: (0..n).map(|_| Slot::default()).collect(),
            frames: AtomicU64::new(0),
            gate: Semaphore::new(parallel.max(1)),
            errors: Mutex::new(Vec::new()),
        })
    }

    /// Starts every member, member `i` on `addrs[i % addrs.len()]`; each
    /// runs until `stop` turns true (or its sender is dropped).
    pub fn spawn(
        self: &Arc<Self>,
        addrs: &[String],
        stop: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        (0..self.slots.len())
            .map(|i| {
                let addr = addrs[i % addrs.len()].clone();
                tokio::spawn(run_member(self.clone(), i, addr, stop.clone()))
            })
            .collect()
    }

    /// The first errors members met.
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first error of a member that could not even send its JOIN.
    pub fn open_error(&self) -> Option<String> {
        let i = self
            .slots
            .iter()
            .position(|s| s.failed_to_open.load(Relaxed))?;
        let errors = self.errors();
        Some(
            errors
                .into_iter()
                .find(|e| e.starts_with(&format!("member {i} ")))
                .unwrap_or_else(|| format!("member {i} could not join")),
        )
    }

    fn fail(&self, i: usize, opening: bool, msg: String) {
        let slot = &self.slots[i];
        slot.failed.store(true, Relaxed);
        slot.failed_to_open.store(opening, Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < KEEP_ERRORS || opening {
            errors.push(msg);
        }
    }
}

/// One member, from connecting to being told to stop; failures are
/// recorded in its slot and the crowd's errors.
async fn run_member(crowd: Arc<Crowd>, i: usize, addr: String, stop: watch::Receiver<bool>) {
    let conn = match open(&crowd, &addr).await {
        Ok(c) => c,
        Err(e) => return crowd.fail(i, true, format!("member {i} on {addr}: {e:#}")),
    };
    let keepalive = tokio::spawn(wire::keepalive(conn.wr, conn.idle, stop.clone()));
    let me = conn.member.as_bytes().to_vec();
    let max_frame = conn.max_message.saturating_add(1024);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    buf.extend_from_slice(&conn.pending);
    let reader = Reader {
        crowd: &crowd,
        slot: &crowd.slots[i],
        me: &me,
        max_frame,
    };
    let r = reader.run(conn.rd, buf, stop).await;
    keepalive.abort();
    if let Err(e) = r {
        crowd.fail(i, false, format!("member {i} on {addr}: {e:#}"));
    }
}

/// Connects (one of the crowd's `parallel` at a time) and sends the JOIN;
/// its acknowledgement is read by the reader.
async fn open(crowd: &Crowd, addr: &str) -> Result<WireConn> {
    let _opening = crowd
        .gate
        .acquire()
        .await
        .map_err(|_| anyhow!("the storm was called off"))?;
    let mut conn = wire::connect(addr, None).await?;
    let join = Frame::Join {
        group: crowd.group.clone(),
        events: crowd.events,
    }
    .to_bytes();
    tokio::time::timeout(SEND_LIMIT, conn.wr.write_all(&join))
        .await
        .map_err(|_| anyhow!("JOIN not sent within {SEND_LIMIT:?}"))?
        .context("send JOIN")?;
    Ok(conn)
}

/// A member's reading side.
struct Reader<'a> {
    crowd: &'a Crowd,
    slot: &'a Slot,
    /// Our member id.
    me: &'a [u8],
    /// Largest frame we accept (the server's largest message + 1024).
    max_frame: usize,
}

impl Reader<'_> {
    /// Reads and counts until `stop` (Ok) or until the connection fails.
    async fn run(
        &self,
        mut rd: OwnedReadHalf,
        mut buf: BytesMut,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut tally = Tally::default();
        loop {
            let now_ns = ns_of(std::time::Instant::now());
            let (frames, used) = count_frames(&buf, self.me, now_ns, &mut tally)?;
            if frames > 0 {
                buf.advance(used);
                self.slot.store(&tally);
                self.crowd.frames.fetch_add(frames, Relaxed);
            }
            buf.reserve(room_needed(&buf, self.max_frame)?);
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Ok(()),
                r = rd.read_buf(&mut buf) => {
                    if r.context("read")? == 0 {
                        bail!("connection closed by the server");
                    }
                }
            }
        }
    }
}

/// Free capacity to make before the next read: a chunk, or what the frame
/// at the front still needs.
fn room_needed(buf: &[u8], max_frame: usize) -> Result<usize> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(READ_CHUNK);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 || len > max_frame {
        bail!("bad frame length {len}");
    }
    Ok(READ_CHUNK.max((4 + len).saturating_sub(buf.len())))
}

/// Counts the whole frames at the front of `buf` into `t`: the frames and
/// the bytes they took.
///
/// # Errors
/// On an `ERROR` from the server, or bytes that are not a server's frame.
pub fn count_frames(buf: &[u8], me: &[u8], now_ns: u64, t: &mut Tally) -> Result<(u64, usize)> {
    let (mut frames, mut at) = (0, 0);
    while let Some(prefix) = buf.get(at..at + 4) {
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len == 0 {
            bail!("bad frame length 0");
        }
        let Some(frame) = buf.get(at + 4..at + 4 + len) else {
            break;
        };
        count_frame(FrameType(frame[0]), &frame[1..], me, now_ns, t)?;
        frames += 1;
        at += 4 + len;
    }
    Ok((frames, at))
}

/// Counts one frame (type `ty`, `body` after the type byte).
fn count_frame(ty: FrameType, body: &[u8], me: &[u8], now_ns: u64, t: &mut Tally) -> Result<()> {
    match ty {
        FrameType::MEMBERSHIP => {
            let rest = skip_str8(body).ok_or_else(|| anyhow!("short MEMBERSHIP"))?;
            let (reason, size, subject, _) =
                change(rest).ok_or_else(|| anyhow!("short MEMBERSHIP"))?;
            t.change(reason, size, subject, me, now_ns);
        }
        FrameType::MEMBERSHIP_BATCH => {
            let short = || anyhow!("short MEMBERSHIP_BATCH");
            let rest = skip_str8(body).ok_or_else(short)?;
            let count = rest.get(..4).ok_or_else(short)?;
            let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]);
            let mut rest = &rest[4..];
            for _ in 0..count {
                let (reason, size, subject, next) = change(rest).ok_or_else(short)?;
                t.change(reason, size, subject, me, now_ns);
                rest = next;
            }
        }
        FrameType::ERROR => {
            let code = body
                .get(..2)
                .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
            let text = String::from_utf8_lossy(body.get(4..).unwrap_or(&[])).into_owned();
            bail!("server error {code}: {text}");
        }
        _ => {}
    }
    Ok(())
}

/// One change (reason u8, size u32, subject str8) at the front of `b`,
/// and what follows it.
fn change(b: &[u8]) -> Option<(u8, u32, &[u8], &[u8])> {
    let (&reason, rest) = b.split_first()?;
    let size = rest.get(..4)?;
    let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]);
    let (&n, rest) = rest[4..].split_first()?;
    let subject = rest.get(..n as usize)?;
    Some((reason, size, subject, &rest[n as usize..]))
}

fn skip_str8(b: &[u8]) -> Option<&[u8]> {
    let (&n, rest) = b.split_first()?;
    rest.get(n as usize..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use msgc::protocol::{encode_membership_batch, ErrorCode};

    fn membership(reason: Reason, size: u32, subject: &'static [u8]) -> Bytes {
        Frame::Membership {
            group: GroupName::from_str_checked("g").unwrap(),
            subject: Bytes::from_static(subject),
            reason,
            size,
        }
        .to_bytes()
    }

    #[test]
    fn counts_own_ack_others_and_batches_in_place() {
        let mut buf = membership(Reason::Join, 2, b"n/0.2").to_vec();
        let batch = [
            (Reason::Join, 3, &b"n/0.3"[..]),
            (Reason::Join, 4, &b"n/0.4"[..]),
            (Reason::Disconnect, 3, &b"n/0.1"[..]),
        ];
        buf.extend_from_slice(&encode_membership_batch(b"g", batch.into_iter()));
        buf.extend_from_slice(&membership(Reason::Join, 4, b"n/0.5"));
        buf.extend_from_slice(&Frame::Noop.to_bytes());
        let whole = buf.len();
        buf.extend_from_slice(&membership(Reason::Join, 5, b"n/0.6")[..7]);
        let mut t = Tally::default();
        let (frames, used) = count_frames(&buf, b"n/0.2", 7, &mut t).unwrap();
        assert_eq!((frames, used), (4, whole));
        assert_eq!((t.own_size, t.joins, t.departures), (2, 3, 1));
        assert_eq!((t.before_ack, t.own_extra, t.acked_ns), (0, 0, 7));
        let goal = Goal {
            final_size: 5,
            departures: None,
            told: true,
        };
        assert_eq!(goal.verdict(&t), Verdict::Exact);
        let goal = Goal {
            final_size: 6,
            ..goal
        };
        assert_eq!(goal.verdict(&t), Verdict::Under);
        let quiet = Goal {
            told: false,
            ..goal
        };
        assert_eq!(quiet.verdict(&t), Verdict::Over);
    }

    #[test]
    fn an_error_frame_ends_the_member() {
        let buf = Frame::Error {
            code: ErrorCode::STUCK,
            message: "stuck".into(),
        }
        .to_bytes();
        let err = count_frames(&buf, b"me", 0, &mut Tally::default()).unwrap_err();
        assert!(err.to_string().contains("server error 8"), "{err}");
        assert!(room_needed(&[0, 0, 0, 0], 100).is_err());
        // A 64 KiB frame whose 4-byte prefix is in: the rest of it.
        assert_eq!(room_needed(&[0, 1, 0, 0], 1 << 20).unwrap(), 65536);
        assert_eq!(room_needed(&[], 1 << 20).unwrap(), READ_CHUNK);
    }
}
