//! [`Event`]: what the server (or the connection) tells the application,
//! delivered through [`Client::events`](super::Client::events).

use bytes::Bytes;

use crate::protocol::{GroupName, MemberId, Reason};

/// Something that happened on the bus or to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message published to a group this client has joined (including
    /// the client's own publishes to it).
    Message {
        /// The group it was published to.
        group: GroupName,
        /// Who published it.
        sender: MemberId,
        /// The message.
        payload: Bytes,
    },
    /// A message sent to this client alone.
    Direct {
        /// Who sent it.
        sender: MemberId,
        /// The message.
        payload: Bytes,
    },
    /// A membership change in a group this client belongs to (its own join
    /// and leave included).
    Membership {
        /// The group.
        group: GroupName,
        /// The member that changed; for [`Reason::NodeDown`] the node lost.
        subject: String,
        /// Why.
        reason: Reason,
        /// The group's cluster-wide size after the change.
        size: u32,
    },
    /// Messages from `sender` to `group` were lost: the next
    /// [`Event::Message`] from that sender to that group, which follows
    /// this event, is numbered `missing + 1` past the last one delivered.
    ///
    /// Only on a connection whose server granted sequenced deliveries
    /// ([`ServerInfo::sequenced`](super::ServerInfo::sequenced), asked for
    /// by [`ClientConfig::sequenced`](super::ClientConfig::sequenced)).
    /// The first message from a sender to a group on a connection sets the
    /// baseline, and a number at or below the last one starts a new run
    /// (the sender's numbering started over): neither is a gap. Not
    /// reported: losses not followed by a later message from the same
    /// sender, losses spanning a reconnection (see
    /// [`Event::Disconnected`]), a membership change of the sender or of
    /// this client in the group, or the table's bound
    /// ([`MAX_SEQ_ENTRIES`](super::MAX_SEQ_ENTRIES)). A gap is reported
    /// once, and only when messages were lost.
    Gap {
        /// The group the messages were published to.
        group: GroupName,
        /// Who published them.
        sender: MemberId,
        /// How many are missing (at least 1).
        missing: u64,
    },
    /// The connection was lost; the client re-dials every
    /// `reconnect_interval`. Messages published to the client's groups
    /// until [`Event::Reconnected`] are not delivered to it.
    ///
    /// A publish (or send) is *confirmed* once the server has answered a
    /// PING written after it: by then the server has handled it. The
    /// client confirms by itself (a PING per round trip at most, while
    /// there is something to confirm) and [`Client::ping`] confirms every
    /// publish accepted before it.
    ///
    /// [`Client::ping`]: super::Client::ping
    Disconnected {
        /// Why, in words (`connection closed by the server`, `idle for 30s`…).
        reason: String,
        /// Publishes and sends that `publish`, `try_publish`,
        /// `publish_batch` (each payload) and `send` accepted and that are
        /// not confirmed: those written to the lost connection after its
        /// last confirmation, which may or may not have reached the server
        /// (they are counted in this event only), plus `queued`.
        unconfirmed: u64,
        /// Of `unconfirmed`, those never written: still queued, they go out
        /// on the next connection (unless the client is closed first), and
        /// a later `Disconnected` counts them again if they are still
        /// unconfirmed then.
        queued: u64,
    },
    /// The server said it is leaving (`MOVE`): the client connected to
    /// its next configured server, re-joined every group there (the joins
    /// acknowledged), then left them on the old connection and closed it.
    /// Nothing was lost in between unless an [`Event::Gap`] says so: the
    /// old connection delivered everything published before the new joins
    /// held, the new one what came after, each message once.
    Moved {
        /// The server (as configured) the client left.
        from: String,
        /// The server (as configured) now connected.
        server: String,
        /// The new member id the server assigned.
        member: MemberId,
    },
    /// A new connection is up and every group the client had joined has
    /// been re-joined (acknowledged by the server).
    Reconnected {
        /// The server (as configured) now connected.
        server: String,
        /// The new member id the server assigned.
        member: MemberId,
    },
    /// The server refused a request by the user's permissions (`ERROR
    /// PERMISSION_DENIED`): a publish or send is dropped, a join, members
    /// or stats request fails with [`ClientError::PermissionDenied`]
    /// besides. The connection stays up.
    ///
    /// [`ClientError::PermissionDenied`]: super::ClientError::PermissionDenied
    Denied {
        /// The server's message: the request (`PUBLISH billing`), then why.
        message: String,
    },
}
