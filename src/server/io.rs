//! Two I/O backends behind one small owned-buffer interface.
//!
//! [`Stream`] is what connection logic sees: `read` into an owned
//! `BytesMut` that comes back with the result, `writev` of owned `Bytes`
//! likewise, and `shutdown`. Buffers move to the kernel and back, which is
//! what io_uring needs and costs epoll nothing. Timers, tasks and channels
//! are tokio in both backends (tokio-uring runs on a tokio current-thread
//! runtime with a `LocalSet`).
//!
//! Hazard (tokio-uring): dropping an in-flight read future does not cancel
//! the kernel operation, and bytes it reads are lost. Callers therefore
//! never race a read in `select!` nor wrap it in a timeout; they stop a
//! reader by shutting the socket down, which completes the read with 0.

use bytes::{Bytes, BytesMut};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};
use tokio_uring::buf::BoundedBuf;

/// Spare room a read is given when the caller left none.
const MIN_READ: usize = 8 * 1024;

/// A connected TCP stream, owned-buffer style.
#[allow(async_fn_in_trait)] // single-threaded runtimes: futures need not be Send
pub trait Stream: 'static {
    /// Reads into the spare capacity of `buf` (after its current length),
    /// returning how many bytes arrived (0 at end of stream) and the buffer.
    async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut);
    /// Writes as much of `bufs` as the kernel takes in one call.
    async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>);
    /// The socket's descriptor (for socket options and shutdown).
    fn raw_fd(&self) -> RawFd;
    /// True when the other side presented a certificate that verified
    /// (TLS with a CA; never on a plain stream). Known once the handshake
    /// is done, which is before the first frame is read.
    fn peer_certified(&self) -> bool {
        false
    }
    /// Shuts both directions down: a pending read completes with 0, a
    /// pending write fails. Safe to call more than once.
    fn shutdown(&self) {
        // SAFETY: the descriptor is owned by `self`, which outlives this call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.raw_fd()) };
        let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
    }
}

/// How long a busy shard may hold queued io_uring operations before it
/// submits them itself. Submitting at every yield (every
/// `messages_per_iter` frames) cost 7–10% of fan-out throughput in system
/// calls (tuning.md); 200 µs keeps batches large and no socket waits long.
pub const SUBMIT_EVERY: Duration = Duration::from_micros(200);

thread_local! {
    static LAST_SUBMIT: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Hands the io_uring runtime's queued reads and writes to the kernel if
/// [`SUBMIT_EVERY`] has passed since this thread last did (nothing on
/// epoll, and no system call when nothing is queued).
///
/// tokio-uring submits only when its thread parks or its submission queue
/// is full: a shard that always has more to do (an inbox that others keep
/// filling) would never submit, and its sockets would wait. Shards call
/// this before they yield and before a connection waits (see
/// vendor/tokio-uring/PATCHES.md).
#[inline]
pub fn submit_pending(uring: bool) {
    if !uring {
        return;
    }
    let now = Instant::now();
    let due = LAST_SUBMIT.with(|last| {
        let due = last
            .get()
            .is_none_or(|t| now.duration_since(t) >= SUBMIT_EVERY);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        if let Err(e) = tokio_uring::submit_pending() {
            tracing::error!(error = %e, "io_uring submission failed");
        }
    }
}

/// What a read buffer holds between bursts: what a connection that says
/// little costs (an idle client's floor).
pub const READ_SMALL: usize = 4 * 1024;

/// A stream's read buffer: [`READ_SMALL`] of room while the peer says
/// little, `burst` while it streams (the last read filled its room), more
/// when the caller asks for it (the rest of a frame), and given back once
/// a read no longer fills its room and the buffer is empty. A
/// connection's buffer (64 KiB bursts) and a TLS stream's ciphertext
/// buffer (32 KiB) follow this one rule.
pub struct ReadBuf {
    buf: BytesMut,
    /// Room a streaming read gets.
    burst: usize,
    /// Room the next read gets.
    want: usize,
    /// The buffer's size after the last read (what is consumed of a
    /// buffer no longer shows in its capacity, though the allocation is
    /// still all there; and a TLS stream may have grown a connection's
    /// buffer to hand over a record's plaintext).
    had: usize,
}

impl ReadBuf {
    /// An empty buffer whose streaming reads get `burst` bytes of room.
    pub fn new(burst: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            burst,
            want: READ_SMALL,
            had: 0,
        }
    }

    /// True when the next read is a small one: the last did not fill its
    /// room (the peer has gone quiet, for now).
    pub fn quiet(&self) -> bool {
        self.want == READ_SMALL
    }

    /// The buffer (for the caller to take from between reads).
    pub fn get_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The buffer, with room for the next read: at least what `missing`
    /// says its contents still need.
    pub fn prepare(&mut self, missing: impl FnOnce(&BytesMut) -> usize) -> BytesMut {
        let mut buf = std::mem::take(&mut self.buf);
        let want = self.want.max(missing(&buf));
        if buf.is_empty() && want == READ_SMALL && self.had > 2 * READ_SMALL {
            // The burst is over: give the big buffer back.
            buf = BytesMut::new();
        }
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        buf
    }

    /// Takes the buffer back after a read of `n` bytes into `spare` bytes
    /// of room, and sizes the next read.
    pub fn done(&mut self, buf: BytesMut, n: usize, spare: usize) -> &mut BytesMut {
        // A read that filled its room left more behind: stream on with
        // big reads. One that did not drained the socket: whatever comes
        // next starts small (and grows at once if it fills that).
        self.want = if n >= spare { self.burst } else { READ_SMALL };
        self.had = buf.capacity();
        self.buf = buf;
        &mut self.buf
    }
}

/// Whether a connection that has had its `messages_per_iter` turn within
/// a read should yield to the shard's other work. On io_uring, only when
/// there is some: a completion the runtime has not dispatched (another
/// connection's read or write finished), or a message in the shard's
/// inbox. Both are read from memory, while a yield costs a runtime turn
/// and a system call (`epoll_wait`) even when nobody else is ready. On
/// epoll, readiness is known only by asking the kernel: always yield.
pub fn others_waiting(uring: bool, inbox: &super::inbox::Inbox) -> bool {
    !uring || !inbox.is_empty() || tokio_uring::completions_pending()
}

/// A tokio-uring stream.
pub struct UringStream(pub tokio_uring::net::TcpStream);

impl Stream for UringStream {
    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        // tokio-uring reads into the *start* of an `IoBufMut` (its pointer
        // is `as_mut_ptr()`, its length the whole capacity), over whatever
        // the buffer already holds: an unfinished frame kept from the last
        // read would be overwritten. Read into a slice of the spare capacity.
        let start = buf.len();
        if buf.capacity() == start {
            buf.reserve(MIN_READ);
        }
        let (res, slice) = self.0.read(buf.slice(start..)).await;
        (res, slice.into_inner())
    }

    async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
        self.0.writev(bufs).await
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A plain tokio (epoll) stream.
pub struct EpollStream(pub tokio::net::TcpStream);

impl Stream for EpollStream {
    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        loop {
            if let Err(e) = self.0.readable().await {
                return (Err(e), buf);
            }
            match self.0.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return (res, buf),
            }
        }
    }

    async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
        loop {
            if let Err(e) = self.0.writable().await {
                return (Err(e), bufs);
            }
            let res = {
                let slices: smallvec_slices::Slices<'_> = smallvec_slices::Slices::new(&bufs);
                self.0.try_write_vectored(slices.as_slice())
            };
            match res {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return (res, bufs),
            }
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// IoSlices for a batch without a heap allocation for batches up to 64
/// frames (larger batches, up to 1,024 frames, allocate the slice list once
/// per `writev`).
pub(super) mod smallvec_slices {
    use super::*;

    const INLINE: usize = 64;

    // A short-lived local on the writer's stack, never moved: keeping the
    // inline array unboxed is the point.
    #[allow(clippy::large_enum_variant)]
    pub(in crate::server) enum Slices<'a> {
        Inline([IoSlice<'a>; INLINE], usize),
        Heap(Vec<IoSlice<'a>>),
    }

    impl<'a> Slices<'a> {
        pub(in crate::server) fn new(bufs: &'a [Bytes]) -> Self {
            if bufs.len() <= INLINE {
                let mut arr = [IoSlice::new(&[]); INLINE];
                for (slot, b) in arr.iter_mut().zip(bufs) {
                    *slot = IoSlice::new(b);
                }
                Slices::Inline(arr, bufs.len())
            } else {
                Slices::Heap(bufs.iter().map(|b| IoSlice::new(b)).collect())
            }
        }

        pub(in crate::server) fn as_slice(&self) -> &[IoSlice<'a>] {
            match self {
                Slices::Inline(arr, n) => &arr[..*n],
                Slices::Heap(v) => v,
            }
        }
    }
}

/// A listening socket of either backend.
pub enum Listener {
    /// tokio-uring.
    Uring(tokio_uring::net::TcpListener),
    /// tokio (epoll).
    Epoll(tokio::net::TcpListener),
}

/// An accepted or dialled stream of either backend.
pub enum AnyStream {
    /// tokio-uring.
    Uring(UringStream),
    /// tokio (epoll).
    Epoll(EpollStream),
}

impl Listener {
    /// Wraps a bound, listening std socket for the given backend.
    ///
    /// # Errors
    /// When the socket cannot be registered with the runtime.
    pub fn from_std(std: std::net::TcpListener, uring: bool) -> io::Result<Self> {
        if uring {
            Ok(Self::Uring(tokio_uring::net::TcpListener::from_std(std)))
        } else {
            std.set_nonblocking(true)?;
            Ok(Self::Epoll(tokio::net::TcpListener::from_std(std)?))
        }
    }

    /// Accepts one connection.
    ///
    /// # Errors
    /// What accept(2) reports (EMFILE and the like): callers back off and retry.
    pub async fn accept(&self) -> io::Result<(AnyStream, SocketAddr)> {
        match self {
            Self::Uring(l) => {
                let (s, a) = l.accept().await?;
                Ok((AnyStream::Uring(UringStream(s)), a))
            }
            Self::Epoll(l) => {
                let (s, a) = l.accept().await?;
                Ok((AnyStream::Epoll(EpollStream(s)), a))
            }
        }
    }
}

impl Listener {
    /// Shuts the listening socket down so a pending accept returns.
    pub fn shutdown(&self) {
        let fd = match self {
            Self::Uring(l) => l.as_raw_fd(),
            Self::Epoll(l) => l.as_raw_fd(),
        };
        // SAFETY: the descriptor is owned by `self`, which outlives this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
    }
}

impl AnyStream {
    /// Converts a connected std stream (e.g. a dialled one) for the backend.
    ///
    /// # Errors
    /// When the socket cannot be registered with the runtime.
    pub fn from_std(std: std::net::TcpStream, uring: bool) -> io::Result<Self> {
        if uring {
            Ok(Self::Uring(UringStream(
                tokio_uring::net::TcpStream::from_std(std),
            )))
        } else {
            std.set_nonblocking(true)?;
            Ok(Self::Epoll(EpollStream(tokio::net::TcpStream::from_std(
                std,
            )?)))
        }
    }

    /// The descriptor, for socket options.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Self::Uring(s) => s.raw_fd(),
            Self::Epoll(s) => s.raw_fd(),
        }
    }
}

/// True when this process can set up an io_uring instance (it cannot under
/// Docker's default seccomp profile or with `kernel.io_uring_disabled`).
///
/// The probe builds (and drops) a tokio-uring runtime on a thread of its
/// own: that runtime holds a tokio runtime, and dropping one inside an
/// async context panics, so probing on the caller's thread would make
/// [`Server::start`](super::Server::start) panic when called from a tokio
/// application (or test).
pub fn uring_available() -> Result<(), io::Error> {
    std::thread::scope(|s| {
        s.spawn(|| tokio_uring::Runtime::new(&tokio_uring::builder()).map(drop))
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the io_uring probe panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, BufMut};

    const BURST: usize = 64 * 1024;

    /// A burst's big buffer is given back once a read no longer fills its
    /// room, also when that read took most of it (what was consumed no
    /// longer shows in the buffer's capacity).
    #[test]
    fn a_read_buffer_shrinks_back_after_a_burst() {
        for last in [100, 30_000, BURST - 1] {
            let mut rb = ReadBuf::new(BURST);
            // A read that fills its 4 KiB: the next gets 64 KiB.
            let mut buf = rb.prepare(|_| 0);
            let room = buf.capacity() - buf.len();
            buf.put_bytes(0, room);
            rb.done(buf, room, room).clear();
            let mut buf = rb.prepare(|_| 0);
            let room = buf.capacity() - buf.len();
            assert!(room >= BURST, "{room}");
            // The burst's last read: `last` bytes, all consumed.
            buf.put_bytes(0, last);
            rb.done(buf, last, room).advance(last);
            let buf = rb.prepare(|_| 0);
            assert!(
                buf.capacity() <= 2 * READ_SMALL,
                "after a last read of {last}: {} bytes kept",
                buf.capacity()
            );
        }
    }

    /// True when io_uring runs here. Where it does not, the test fails
    /// (a green run never hides a backend that did not run) unless
    /// `MSGC_SKIP_URING` is set: then it is skipped, said loudly.
    fn uring_here() -> bool {
        match uring_available() {
            Ok(()) => true,
            Err(e) if std::env::var_os("MSGC_SKIP_URING").is_some() => {
                eprintln!("SKIPPED (MSGC_SKIP_URING is set): io_uring is not available here ({e})");
                false
            }
            Err(e) => panic!("io_uring is not available here ({e}); set MSGC_SKIP_URING=1 to skip"),
        }
    }

    /// The `iovec` lists finished writes leave for the next ones add up
    /// to at most 16,384 entries, 256 KiB per thread (tuning.md, PATCHES.md
    /// second change), however many writes were in flight, and are reused.
    #[test]
    fn the_iovec_pool_keeps_at_most_256_kib() {
        if !uring_here() {
            return;
        }
        const BOUND: usize = 256 * 1024;
        let entry = std::mem::size_of::<libc::iovec>();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let drain = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut sink = Vec::new();
            std::io::Read::read_to_end(&mut theirs, &mut sink).map(|_| sink.len())
        });
        let written = tokio_uring::start(async move {
            let ours = std::rc::Rc::new(tokio_uring::net::UnixStream::from_std(ours));
            assert_eq!(tokio_uring::iovec_pool(), (0, 0), "a new thread keeps none");
            let mut written = 0;
            // Rounds of 40 writes at once, of 1,024 buffers (the most a
            // `writev` takes), 3, and 700 (lists kept small grow): the pool
            // never passes its bound.
            for (writes, buffers) in [(40, 1024), (40, 3), (40, 700), (40, 1024)] {
                let tasks: Vec<_> = (0..writes)
                    .map(|_| {
                        let ours = ours.clone();
                        tokio_uring::spawn(async move {
                            let bufs = vec![Bytes::from_static(b"x"); buffers];
                            let (res, _) = ours.writev(bufs).await;
                            res.expect("writev")
                        })
                    })
                    .collect();
                for t in tasks {
                    written += t.await.expect("task");
                }
                let (lists, entries) = tokio_uring::iovec_pool();
                assert!(
                    entries * entry <= BOUND,
                    "{lists} lists of {entries} entries kept ({} bytes, bound {BOUND})",
                    entries * entry
                );
                assert!(lists > 0, "finished writes leave their lists for reuse");
            }
            written
        });
        let read = drain.join().expect("drain").expect("read");
        assert_eq!(read, written, "every byte written arrived");
    }

    /// A connection's long read yields to others only when the ring shows
    /// a completion not yet dispatched (or the inbox holds a message): the
    /// ring check must see a finished operation before the runtime has
    /// dispatched it, and not after.
    #[test]
    fn a_finished_operation_shows_before_it_is_dispatched() {
        if !uring_here() {
            return;
        }
        let (inbox, rx) = crate::server::inbox::Inbox::new(1 << 20);
        assert!(others_waiting(false, &inbox), "epoll always yields");
        tokio_uring::start(async {
            assert!(!tokio_uring::completions_pending(), "a new ring has none");
            assert!(!others_waiting(true, &inbox));
            assert!(inbox.send(crate::server::shared::ShardMsg::Stall(
                std::time::Duration::ZERO
            )));
            assert!(others_waiting(true, &inbox), "a message in the inbox");
            assert!(rx.try_recv().is_ok());
            assert!(!others_waiting(true, &inbox));
            let op = tokio_uring::spawn(tokio_uring::no_op());
            // The task queues its operation when it first runs.
            tokio::task::yield_now().await;
            tokio_uring::submit_pending().expect("submit");
            let mut seen = false;
            for _ in 0..1000 {
                seen = tokio_uring::completions_pending();
                if seen {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(seen, "the no-op's completion shows in the ring");
            assert!(others_waiting(true, &inbox));
            op.await.expect("task").expect("no-op");
            assert!(!tokio_uring::completions_pending(), "dispatched: none left");
        });
        assert!(
            !tokio_uring::completions_pending(),
            "outside a runtime: false"
        );
    }
}
