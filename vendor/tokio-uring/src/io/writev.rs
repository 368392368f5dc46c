use crate::runtime::driver::op::{Completable, CqeResult, Op};
use crate::runtime::CONTEXT;
use crate::{buf::BoundedBuf, io::SharedFd, BufResult};
use libc::iovec;
use std::cell::RefCell;
use std::io;

// msgc patch (PATCHES.md): the `iovec` lists of finished writes are kept
// for the next ones on the same thread, so a write allocates nothing once
// the runtime is warm. Lists of up to `POOL_IOVECS` entries (msgc writes
// at most 1,024 buffers at once) are kept while the pool's entries add up
// to at most `POOL_ENTRIES` (16 bytes each): 256 KiB per thread.
const POOL_IOVECS: usize = 1024;
const POOL_ENTRIES: usize = 16 * 1024;

/// Kept lists, and the entries they have room for.
struct Pool {
    lists: Vec<Vec<iovec>>,
    entries: usize,
}

thread_local! {
    static IOVS: RefCell<Pool> = const { RefCell::new(Pool { lists: Vec::new(), entries: 0 }) };
}

/// The lists kept on this thread and the entries they have room for
/// (see `crate::iovec_pool`).
pub(crate) fn iovec_pool() -> (usize, usize) {
    IOVS.try_with(|pool| {
        let pool = pool.borrow();
        (pool.lists.len(), pool.entries)
    })
    .unwrap_or((0, 0))
}

fn take_iovs() -> Vec<iovec> {
    IOVS.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.lists.pop()?;
        pool.entries -= list.capacity();
        Some(list)
    })
    .ok()
    .flatten()
    .unwrap_or_default()
}

fn give_back_iovs(mut iovs: Vec<iovec>) {
    if iovs.capacity() == 0 || iovs.capacity() > POOL_IOVECS {
        return;
    }
    iovs.clear();
    // During the thread's teardown the pool may be gone: the list is
    // then simply freed.
    let _ = IOVS.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.entries + iovs.capacity() <= POOL_ENTRIES {
            pool.entries += iovs.capacity();
            pool.lists.push(iovs);
        }
    });
}

pub(crate) struct Writev<T> {
    /// Holds a strong ref to the FD, preventing the file from being closed
    /// while the operation is in-flight.
    #[allow(dead_code)]
    fd: SharedFd,

    pub(crate) bufs: Vec<T>,

    /// Parameter for `io_uring::op::readv`, referring `bufs`.
    iovs: Vec<iovec>,
}

impl<T: BoundedBuf> Op<Writev<T>> {
    pub(crate) fn writev_at(
        fd: &SharedFd,
        mut bufs: Vec<T>,
        offset: u64,
    ) -> io::Result<Op<Writev<T>>> {
        use io_uring::{opcode, types};

        // Build `iovec` objects referring the provided `bufs` for `io_uring::opcode::Readv`.
        let mut iovs = take_iovs();
        iovs.extend(bufs.iter_mut().map(|b| iovec {
            iov_base: b.stable_ptr() as *mut libc::c_void,
            iov_len: b.bytes_init(),
        }));

        CONTEXT.with(|x| {
            x.handle().expect("Not in a runtime context").submit_op(
                Writev {
                    fd: fd.clone(),
                    bufs,
                    iovs,
                },
                |write| {
                    opcode::Writev::new(
                        types::Fd(fd.raw_fd()),
                        write.iovs.as_ptr(),
                        write.iovs.len() as u32,
                    )
                    .offset(offset as _)
                    .build()
                },
            )
        })
    }
}

impl<T> Completable for Writev<T>
where
    T: BoundedBuf,
{
    type Output = BufResult<usize, Vec<T>>;

    fn complete(self, cqe: CqeResult) -> Self::Output {
        // Convert the operation result to `usize`
        let res = cqe.result.map(|v| v as usize);
        // Recover the buffer
        let buf = self.bufs;
        give_back_iovs(self.iovs);

        (res, buf)
    }
}
