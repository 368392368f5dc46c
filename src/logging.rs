//! What the server logs and how much: the target of the events an operator
//! must see at every `debug_level`, and a rate limit for per-connection
//! messages, which a misbehaving client population would otherwise turn
//! into a flood.
//!
//! Owns no subscriber: the binaries set one up (`msgc-server` shows
//! [`OPS`] events at `info` whatever `debug_level` says, unless `RUST_LOG`
//! is set).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Target of the events an operator must see whatever `debug_level` is: a
/// peer link up or down (node down), a peer link closed as stuck, a
/// listener waiting for its port.
pub const OPS: &str = "msgc::ops";

/// The filter directive that shows [`OPS`] events next to `level` (a
/// tracing level name such as `error`).
pub fn filter_directives(level: &str) -> String {
    format!("{level},{OPS}=info")
}

/// Messages of one kind logged per [`WINDOW`]; the rest are counted.
pub const BURST: u64 = 10;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Every limiter, so that [`flush_suppressed`] can report them all.
static ALL: [&RateLimit; 10] = [
    &IDLE_CLOSE,
    &HANDSHAKE_TIMEOUT,
    &BAD_INPUT,
    &CLIENT_ERROR,
    &STUCK_READER,
    &SOCKET_OPTIONS,
    &ACCEPT_FAILED,
    &PEER_REFUSED,
    &AUTH_FAILED,
    &PERMISSION_DENIED,
];

/// A client closed for sending nothing within `idle_timeout`.
pub static IDLE_CLOSE: RateLimit = RateLimit::new("idle connection closed", tracing::Level::INFO);
/// A connection closed for sending no HELLO within `handshake_timeout`.
pub static HANDSHAKE_TIMEOUT: RateLimit =
    RateLimit::new("no HELLO within handshake_timeout", tracing::Level::INFO);
/// A connection closed for a protocol error.
pub static BAD_INPUT: RateLimit = RateLimit::new("bad input", tracing::Level::INFO);
/// A client reported an error.
pub static CLIENT_ERROR: RateLimit =
    RateLimit::new("client reported an error", tracing::Level::INFO);
/// A client reader closed as stuck.
pub static STUCK_READER: RateLimit = RateLimit::new("reader stuck", tracing::Level::WARN);
/// Socket options refused on an accepted socket.
pub static SOCKET_OPTIONS: RateLimit =
    RateLimit::new("could not set socket options", tracing::Level::WARN);
/// `accept` failed (EMFILE and friends).
pub static ACCEPT_FAILED: RateLimit = RateLimit::new("accept failed", tracing::Level::WARN);
/// A peer link refused (not in peers, or from the wrong address).
pub static PEER_REFUSED: RateLimit = RateLimit::new("refused a peer link", tracing::Level::WARN);

/// A client login refused (users configured).
pub static AUTH_FAILED: RateLimit = RateLimit::new("client login refused", tracing::Level::WARN);
/// A client request refused by its user's permissions.
pub static PERMISSION_DENIED: RateLimit =
    RateLimit::new("request not permitted", tracing::Level::INFO);

/// Lets [`BURST`] messages of one kind through per [`WINDOW`] and counts
/// the others; the count is logged (at the kind's level) when the next
/// window starts with a message of that kind, or at [`flush_suppressed`].
/// Shared by every shard: a few relaxed atomics, taken only on events that
/// close a connection.
#[derive(Debug)]
pub struct RateLimit {
    what: &'static str,
    level: tracing::Level,
    /// Milliseconds since [`epoch`] at which the current window started.
    window_start: AtomicU64,
    /// Messages seen in the current window (let through or not).
    in_window: AtomicU64,
    /// Messages not logged since the last report.
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limiter for messages about `what`, logged at `level`.
    pub const fn new(what: &'static str, level: tracing::Level) -> Self {
        Self {
            what,
            level,
            window_start: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log this message now (else it is counted).
    pub fn allow(&self) -> bool {
        self.allow_at(now_ms())
    }

    /// [`RateLimit::allow`] at `now` milliseconds (tests).
    pub fn allow_at(&self, now: u64) -> bool {
        let start = self.window_start.load(Relaxed);
        let window = WINDOW.as_millis() as u64;
        if now.saturating_sub(start) >= window
            && self
                .window_start
                .compare_exchange(start, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Relaxed);
            self.report();
        }
        if self.in_window.fetch_add(1, Relaxed) < BURST {
            true
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            false
        }
    }

    /// Logs how many messages were suppressed since the last report, if any;
    /// returns that number.
    pub fn report(&self) -> u64 {
        let n = self.suppressed.swap(0, Relaxed);
        if n > 0 {
            let what = self.what;
            let window = WINDOW.as_secs();
            match self.level {
                tracing::Level::ERROR => tracing::error!(
                    suppressed = n,
                    "{what}: {n} more messages not logged (at most {BURST} per {window}s)"
                ),
                tracing::Level::WARN => tracing::warn!(
                    suppressed = n,
                    "{what}: {n} more messages not logged (at most {BURST} per {window}s)"
                ),
                _ => tracing::info!(
                    suppressed = n,
                    "{what}: {n} more messages not logged (at most {BURST} per {window}s)"
                ),
            }
        }
        n
    }
}

/// Reports every limiter's suppressed count (at shutdown, so that nothing
/// counted goes unsaid).
pub fn flush_suppressed() {
    for l in ALL {
        l.report();
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], plus one window so that the first message
/// of each kind starts a window.
fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + WINDOW.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_counted() {
        let l = RateLimit::new("test", tracing::Level::INFO);
        let w = WINDOW.as_millis() as u64;
        let let_through = (0..50).filter(|_| l.allow_at(w)).count() as u64;
        assert_eq!(let_through, BURST);
        assert_eq!(l.suppressed.load(Relaxed), 50 - BURST);
        // Still the same window: counted.
        assert!(!l.allow_at(2 * w - 1));
        // The next window reports and lets a burst through again.
        assert!(l.allow_at(2 * w));
        assert_eq!(l.suppressed.load(Relaxed), 0);
        assert_eq!(
            (0..BURST).filter(|_| l.allow_at(2 * w + 1)).count() as u64,
            BURST - 1
        );
        assert_eq!(l.report(), 1);
        assert_eq!(l.report(), 0);
    }

    #[test]
    fn directives_show_ops_events() {
        assert_eq!(filter_directives("error"), "error,msgc::ops=info");
    }
}
