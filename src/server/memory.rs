//! The process's memory as the kernel sees it, and giving freed memory back.
//!
//! glibc's allocator keeps what the program frees for reuse and returns it
//! to the kernel only from the top of each arena: after a burst (10,000
//! connections that each sent a 60 KB message, then closed) the resident
//! size stayed at its peak. A housekeeping thread (never a shard) checks
//! once a second how much freed memory the allocator holds and, when
//! [`TRIM_FREE_BYTES`] more has been freed since it last looked, asks it to
//! return whole free pages (`malloc_trim`). (The allocator's free count
//! includes pages already returned, so it is the growth that matters.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Free heap memory that makes the housekeeping thread trim.
pub const TRIM_FREE_BYTES: usize = 4 * 1024 * 1024;
/// How often the housekeeping thread looks.
pub const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Resident set size of this process in bytes (`/proc/self/statm`).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Freed memory the allocator holds on to, in bytes (0 where unknown).
pub fn free_heap_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own statistics.
        let mi = unsafe { libc::mallinfo2() };
        mi.fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// Returns free heap pages to the kernel.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it takes the arenas' locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Decides when to trim: when the allocator's free memory has grown by
/// [`TRIM_FREE_BYTES`] since the lowest it was seen since the last trim.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    baseline: Option<usize>,
}

impl TrimPolicy {
    /// Given the allocator's free bytes now, whether to trim.
    pub fn should_trim(&mut self, free: usize) -> bool {
        let base = self.baseline.map_or(0, |b| b.min(free));
        self.baseline = Some(base);
        if free.saturating_sub(base) >= TRIM_FREE_BYTES {
            self.baseline = Some(free);
            return true;
        }
        false
    }
}

/// The housekeeping thread: trims until `stop` is set.
pub struct Housekeeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Housekeeper {
    /// Starts the thread.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start() -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("msgc-housekeeping".into())
            .spawn(move || {
                let mut policy = TrimPolicy::default();
                while !flag.load(Ordering::Acquire) {
                    std::thread::park_timeout(TRIM_EVERY);
                    let free = free_heap_bytes();
                    if policy.should_trim(free) {
                        trim();
                        tracing::debug!(free, "returned free heap memory to the kernel");
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Housekeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read() {
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_freed_burst_is_given_back() {
        // Many mid-sized blocks, interleaved with small ones that stay, so
        // the freed memory is not at the top of the heap.
        let mut keep = Vec::new();
        let mut burst = Vec::new();
        for i in 0..2000 {
            burst.push(vec![i as u8; 30_000]);
            keep.push(vec![1u8; 64]);
        }
        let mut policy = TrimPolicy::default();
        policy.should_trim(free_heap_bytes());
        drop(burst);
        assert!(policy.should_trim(free_heap_bytes()), "60 MB were freed");
        trim();
        assert!(
            !policy.should_trim(free_heap_bytes()),
            "nothing freed since"
        );
        assert!(keep.iter().all(|k| k[0] == 1));
    }

    #[test]
    fn trims_on_growth_not_on_level() {
        let mut p = TrimPolicy::default();
        assert!(p.should_trim(TRIM_FREE_BYTES), "from nothing");
        assert!(!p.should_trim(TRIM_FREE_BYTES + 1), "the level stays high");
        assert!(!p.should_trim(1000), "reused: the baseline falls");
        assert!(p.should_trim(1000 + TRIM_FREE_BYTES));
    }
}
