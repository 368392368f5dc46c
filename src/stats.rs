//! Counters: per shard, written only by their shard (relaxed atomics, no
//! contention), summed on a stats query. Every dropped message is counted
//! here under the reason it was dropped.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$fdoc])* pub $field: AtomicU64,)* }

        impl $name {
            /// A plain copy of every counter.
            pub fn snapshot(&self) -> Counts {
                Counts { $($field: self.$field.load(Relaxed),)* }
            }
        }

        /// A point-in-time copy of [`ShardStats`], summable.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Counts { $($(#[$fdoc])* pub $field: u64,)* }

        impl std::ops::AddAssign for Counts {
            fn add_assign(&mut self, o: Counts) { $(self.$field += o.$field;)* }
        }
    };
}

counters!(
    /// The counters of one shard.
    ShardStats {
        /// Connections open now: clients, peer links, and sockets still
        /// in the handshake.
        connections,
        /// Connections accepted or dialled since start.
        connections_total,
        /// Frames received from clients.
        msgs_in,
        /// Frames written to clients and peers.
        msgs_out,
        /// Bytes received.
        bytes_in,
        /// Bytes written.
        bytes_out,
        /// Group publishes received (from local clients).
        publishes,
        /// Group messages queued to local members.
        deliveries,
        /// Publishes to a group with no member anywhere.
        unrouted,
        /// Connections killed as stuck: their queue was full and their
        /// socket accepted nothing for stuck_timeout.
        stuck_kills,
        /// Times a connection's full queue made its producers wait (a slow
        /// reader, not dropped).
        slow_readers,
        /// Times a producer's socket was not read because a queue or inbox
        /// it feeds was full (TCP backpressure).
        producer_waits,
        /// Connections closed for sending no HELLO within handshake_timeout.
        handshake_timeouts,
        /// MEMBERSHIP frames queued (acknowledgements and per-change events).
        membership_frames,
        /// MEMBERSHIP_BATCH frames queued (coalesced events).
        membership_batches,
        /// Gauge: frames pending in this shard's connection queues (as of
        /// the last sweep).
        queued_frames,
        /// Gauge: bytes pending in this shard's connection queues.
        queued_bytes,
        /// Gauge: bytes pending in this shard's fullest connection queue.
        max_queued_bytes,
        /// Connections closed by idle_timeout.
        idle_kills,
        /// Connections closed for bad input.
        protocol_errors,
        /// Client logins refused (users configured): no, malformed or
        /// unknown credentials, a wrong password, or rate-limited.
        auth_failures,
        /// Of `auth_failures`, those refused without checking the password:
        /// too many recent failures from the address, or too many logins
        /// waiting for a check.
        auth_rate_limited,
        /// Requests refused by a user's permissions (PERMISSION_DENIED;
        /// the connection stays open).
        permission_denials,
        /// Messages dropped: queued to a connection killed as stuck.
        dropped_stuck,
        /// Messages dropped: queued to a connection closed as idle.
        dropped_idle,
        /// Messages dropped: queued to a connection closed for bad input.
        dropped_protocol,
        /// Messages dropped: queued to a connection that closed (EOF, reset, shutdown).
        dropped_closed,
        /// Direct messages to a member that does not exist.
        dropped_unknown_member,
        /// Messages dropped for a peer node with no link up (or arriving on
        /// a link that was replaced). Frames lost when a link is killed are
        /// counted under the kill's reason instead.
        dropped_peer,
        /// Messages for a peer larger than the `max_message_size` it
        /// announced at link-up.
        dropped_peer_too_large,
        /// Messages that reached their group's shard or node after its
        /// members there had left.
        dropped_left,
        /// Messages still on their way between shards when the server
        /// shut down.
        dropped_shutdown,
        /// Peer handshakes refused for the cluster key: a peer that did not
        /// prove it (no key, another key, a replay), or that we dialled and
        /// that did not.
        peer_auth_failures,
    }
);

impl ShardStats {
    /// Adds `n` to a counter (relaxed; each shard writes only its own).
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Adds `n` to a counter that only the owning shard's thread writes:
    /// a plain load and store, no locked instruction (readers on other
    /// threads see each value whole, a moment late at most). For the
    /// counters every message touches (publishes, deliveries, messages and
    /// bytes in and out); three locked adds per publish were a third of
    /// the routing's own time in a 1→1 profile (tuning.md).
    #[inline]
    pub fn bump(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Subtracts `n` from a gauge.
    #[inline]
    pub fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Relaxed);
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(c: &AtomicU64, n: u64) {
        c.store(n, Relaxed);
    }
}

impl Counts {
    /// All messages dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_stuck
            + self.dropped_idle
            + self.dropped_protocol
            + self.dropped_closed
            + self.dropped_unknown_member
            + self.dropped_peer
            + self.dropped_peer_too_large
            + self.dropped_left
            + self.dropped_shutdown
    }

    /// Each drop reason's name in STATS (`drops.*`, and the `reason` label
    /// of `/metrics`) with its count.
    pub fn drops_by_reason(&self) -> [(&'static str, u64); 9] {
        [
            ("stuck", self.dropped_stuck),
            ("idle", self.dropped_idle),
            ("protocol_error", self.dropped_protocol),
            ("closed", self.dropped_closed),
            ("unknown_member", self.dropped_unknown_member),
            ("peer", self.dropped_peer),
            ("peer_too_large", self.dropped_peer_too_large),
            ("left", self.dropped_left),
            ("shutdown", self.dropped_shutdown),
        ]
    }

    /// The drops in a few words: `0`, or the total and its reasons (those
    /// not zero, with their STATS names), e.g. `12 (closed 10, shutdown 2)`.
    pub fn drops_summary(&self) -> String {
        let some: Vec<String> = self
            .drops_by_reason()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        if some.is_empty() {
            "0".into()
        } else {
            format!("{} ({})", self.dropped(), some.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn drops_summary_names_the_reasons_counted() {
        let mut c = Counts::default();
        assert_eq!(c.drops_summary(), "0");
        c.dropped_closed = 10;
        c.dropped_shutdown = 2;
        assert_eq!(c.drops_summary(), "12 (closed 10, shutdown 2)");
    }
}
