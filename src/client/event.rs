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
    /// The connection was lost; the client re-dials every
    /// `reconnect_interval`. Messages published to the client's groups
    /// until [`Event::Reconnected`] are not delivered to it.
    Disconnected {
        /// Why, in words (`connection closed by the server`, `idle for 30s`…).
        reason: String,
    },
    /// A new connection is up and every group the client had joined has
    /// been re-joined (acknowledged by the server).
    Reconnected {
        /// The server (as configured) now connected.
        server: String,
        /// The new member id the server assigned.
        member: MemberId,
    },
}
