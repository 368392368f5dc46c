//! TLS over any [`Stream`]: rustls's buffer-level API (`read_tls`,
//! `process_new_packets`, `reader`, `writer`, `write_tls`) driven by the
//! owned-buffer reads and writes of either backend, so io_uring and epoll
//! carry TLS with the same code.
//!
//! What it owns: the rustls connection state of one socket, its ciphertext
//! read buffer, and the order of ciphertext writes. What it doesn't: the
//! configurations (crate::tls) and framing (the connection logic above
//! sees plaintext exactly as from a plain [`Stream`]).
//!
//! One reader task and one writer task use a stream at once. rustls is
//! borrowed only between awaits (a `RefCell`, single-threaded shard).
//! Ciphertext goes out under an async lock: whoever holds it takes what
//! rustls has queued, in order, and writes all of it before letting go, so
//! records from the writer (data) and the reader (handshake, alerts) never
//! interleave. A batch the writer hands over becomes records in one buffer
//! written with one `writev`: coalesced writes stay coalesced.

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::os::fd::RawFd;

use bytes::{BufMut, Bytes, BytesMut};

use super::io::{ReadBuf, Stream};

/// Ciphertext read per call while the peer streams (the last read filled
/// its room; otherwise [`super::io::READ_SMALL`], as a plain connection's
/// read buffer); rustls's own records are at most ~16 KiB.
const READ_CHUNK: usize = 32 * 1024;
/// Plaintext copied into a caller's buffer that has no spare room.
const MIN_READ: usize = 8 * 1024;

/// A TLS session (server or client side) over a [`Stream`].
pub struct TlsStream<S> {
    io: S,
    tls: RefCell<rustls::Connection>,
    /// Ciphertext read but not yet taken by rustls (kept when rustls's
    /// plaintext buffer is full), sized as a connection's read buffer is
    /// ([`ReadBuf`], [`READ_CHUNK`] while streaming). Taken out while a
    /// read is in flight.
    rbuf: RefCell<ReadBuf>,
    /// Held while ciphertext is taken from rustls and written.
    wlock: tokio::sync::Mutex<()>,
    /// Ciphertext buffer, kept between writes: once a write is done its
    /// memory holds the next batch's records (no allocation per write).
    /// A buffer that grew past [`KEEP_CIPHERTEXT`] is not kept: large
    /// batches allocate once each (cheap beside encrypting them), and an
    /// idle connection holds at most that much.
    wbuf: RefCell<BytesMut>,
    /// The one-buffer list handed to the stream's `writev`, kept.
    wlist: RefCell<Vec<Bytes>>,
}

/// Most ciphertext buffer a connection keeps between writes.
const KEEP_CIPHERTEXT: usize = 8 * 1024;

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: Stream> TlsStream<S> {
    /// Wraps `io`; the handshake runs on the first reads and writes.
    pub fn new(io: S, tls: impl Into<rustls::Connection>) -> Self {
        let mut tls = tls.into();
        // Plaintext a batch hands over is encrypted whole (the writer's
        // queue is what bounds it), so no write is ever half taken.
        tls.set_buffer_limit(None);
        TlsStream {
            io,
            tls: RefCell::new(tls),
            rbuf: RefCell::new(ReadBuf::new(READ_CHUNK)),
            wlock: tokio::sync::Mutex::new(()),
            wbuf: RefCell::new(BytesMut::new()),
            wlist: RefCell::new(Vec::with_capacity(1)),
        }
    }

    /// Writes everything rustls has queued (handshake, records, alerts).
    async fn flush_tls(&self) -> io::Result<()> {
        let _held = self.wlock.lock().await;
        loop {
            let mut out = self.wbuf.take();
            {
                let mut tls = self.tls.borrow_mut();
                let mut w = (&mut out).writer();
                while tls.wants_write() {
                    if let Err(e) = tls.write_tls(&mut w) {
                        self.keep_wbuf(out);
                        return Err(e);
                    }
                }
            }
            if out.is_empty() {
                self.keep_wbuf(out);
                return Ok(());
            }
            self.write_all(out).await?;
        }
    }

    /// Writes `out`'s ciphertext, then keeps the buffer for the next
    /// records (its memory is reused once the write no longer holds it).
    async fn write_all(&self, mut out: BytesMut) -> io::Result<()> {
        // Judged before the split: after it, `out` sees only the spare room
        // of an allocation that the records still hold.
        let keep = out.capacity() <= KEEP_CIPHERTEXT;
        let mut data = out.split().freeze();
        if keep {
            *self.wbuf.borrow_mut() = out;
        }
        while !data.is_empty() {
            let mut list = self.wlist.take();
            list.push(data);
            let (res, mut list) = self.io.writev(list).await;
            data = list.pop().unwrap_or_default();
            list.clear();
            *self.wlist.borrow_mut() = list;
            match res? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => {
                    let _ = data.split_to(n.min(data.len()));
                }
            }
        }
        Ok(())
    }

    /// Keeps `out` (not written from) as the next ciphertext buffer
    /// unless it grew large.
    fn keep_wbuf(&self, mut out: BytesMut) {
        out.clear();
        if out.capacity() <= KEEP_CIPHERTEXT {
            *self.wbuf.borrow_mut() = out;
        }
    }

    /// Moves decrypted bytes into `buf`: `Some(n)` when there were some (or
    /// `Some(0)` at a clean close), `None` when rustls needs more input.
    fn take_plaintext(&self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let mut tls = self.tls.borrow_mut();
        let mut reader = tls.reader();
        match reader.fill_buf() {
            Ok(data) => {
                let room = (buf.capacity() - buf.len()).max(MIN_READ);
                let n = data.len().min(room);
                buf.extend_from_slice(&data[..n]);
                reader.consume(n);
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The input has gone quiet (the last read did not fill its room) and
    /// rustls holds no plaintext (all of it was taken): lets rustls give
    /// back the record buffer a burst grew (its `Vec` grows by doubling,
    /// to 32 KiB and more; kept otherwise until the next input). rustls
    /// resizes it before each read from its source, to 4 KiB when it holds
    /// no partial record; a source that has nothing yet (`WouldBlock`)
    /// makes that all the read does. (While rustls's plaintext buffer is
    /// full it reads nothing, and does not resize: hence here, before
    /// waiting for input, not right after feeding it.)
    fn settle(&self) {
        struct Nothing;
        impl io::Read for Nothing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let _ = self.tls.borrow_mut().read_tls(&mut Nothing);
    }

    /// Hands `rbuf`'s ciphertext to rustls and processes it.
    fn feed(&self, rbuf: &mut BytesMut) -> io::Result<()> {
        let mut tls = self.tls.borrow_mut();
        let mut progress = false;
        while !rbuf.is_empty() {
            let mut slice: &[u8] = rbuf;
            match tls.read_tls(&mut slice) {
                Ok(0) => break,
                Ok(n) => {
                    progress = true;
                    let _ = rbuf.split_to(n);
                }
                // rustls's plaintext buffer is full: keep the rest until
                // the reader has taken some (it is taken first next turn).
                Err(_) if progress => break,
                Err(e) => return Err(e),
            }
            tls.process_new_packets().map_err(tls_error)?;
        }
        tls.process_new_packets().map_err(tls_error)?;
        Ok(())
    }
}

impl<S: Stream> Stream for TlsStream<S> {
    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        loop {
            match self.take_plaintext(&mut buf) {
                Ok(Some(n)) => return (Ok(n), buf),
                Ok(None) => {}
                Err(e) => return (Err(e), buf),
            }
            if self.tls.borrow().wants_write() {
                if let Err(e) = self.flush_tls().await {
                    return (Err(e), buf);
                }
            }
            let mut rb = self.rbuf.replace(ReadBuf::new(READ_CHUNK));
            if rb.get_mut().is_empty() {
                if rb.quiet() {
                    // Quiet, and everything read is taken: rustls may
                    // give its record buffer back too.
                    self.settle();
                }
                let rbuf = rb.prepare(|_| 0);
                let spare = rbuf.capacity() - rbuf.len();
                let (res, back) = self.io.read(rbuf).await;
                match res {
                    Ok(0) => return (Ok(0), buf), // end of stream
                    Ok(n) => rb.done(back, n, spare),
                    Err(e) => return (Err(e), buf),
                };
            }
            let fed = self.feed(rb.get_mut());
            *self.rbuf.borrow_mut() = rb;
            if let Err(e) = fed {
                // Tell the other side why (an alert), best effort.
                let _ = self.flush_tls().await;
                return (Err(e), buf);
            }
        }
    }

    async fn writev(&self, bufs: Vec<Bytes>) -> (io::Result<usize>, Vec<Bytes>) {
        let _held = self.wlock.lock().await;
        // Room for the whole batch as records (≤ 16 KiB of plaintext each,
        // plus header and tag), so the buffer is allocated once.
        let plain: usize = bufs.iter().map(Bytes::len).sum();
        let mut out = self.wbuf.take();
        out.reserve(plain + (plain / 16_384 + 1) * 64);
        let res = {
            let mut tls = self.tls.borrow_mut();
            let slices = super::io::smallvec_slices::Slices::new(&bufs);
            let res = tls.writer().write_vectored(slices.as_slice());
            let mut w = (&mut out).writer();
            while tls.wants_write() && res.is_ok() {
                if let Err(e) = tls.write_tls(&mut w) {
                    drop(tls);
                    self.keep_wbuf(out);
                    return (Err(e), bufs);
                }
            }
            res
        };
        if out.is_empty() {
            self.keep_wbuf(out);
        } else if let Err(e) = self.write_all(out).await {
            return (Err(e), bufs);
        }
        (res, bufs)
    }

    fn raw_fd(&self) -> RawFd {
        self.io.raw_fd()
    }

    fn peer_certified(&self) -> bool {
        // rustls keeps the chain only once its verifier accepted it.
        self.tls.borrow().peer_certificates().is_some()
    }
}
