//! The frames of the wire protocol: their types, fields and codes.
//!
//! One enum variant per frame kind; [`crate::protocol::codec`] owns the
//! byte layout. PROTOCOL.md is the normative description; keep the two in
//! step.

use super::names::{GroupName, MemberId, NodeName};
use bytes::Bytes;

/// Protocol version spoken by this implementation.
pub const PROTOCOL_VERSION: u16 = 1;

/// Bytes of a nonce and of a MAC in the peer authentication (`CHALLENGE`,
/// `PROOF`, a peer `HELLO`'s credentials).
pub const AUTH_LEN: usize = 32;

/// The four bytes that open every `HELLO` body.
pub const MAGIC: &[u8; 4] = b"MSGC";

/// A frame's type byte. A newtype so that unknown types stay representable
/// (they are rejected by the decoder with [`ErrorCode::UNKNOWN_TYPE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameType(pub u8);

impl FrameType {
    /// Handshake, first frame from a client or a dialling peer.
    pub const HELLO: Self = Self(0x01);
    /// Handshake answer from the server.
    pub const WELCOME: Self = Self(0x02);
    /// Keepalive; no body.
    pub const NOOP: Self = Self(0x03);
    /// An error; the sender closes the connection after it.
    pub const ERROR: Self = Self(0x04);
    /// Ping with a token; answered by `PONG`.
    pub const PING: Self = Self(0x05);
    /// Answer to `PING`.
    pub const PONG: Self = Self(0x06);
    /// Peer handshake, accepting side: its nonce and its proof of the
    /// cluster key (answers a `HELLO` that asked for authentication).
    pub const CHALLENGE: Self = Self(0x07);
    /// Peer handshake, dialling side: its proof of the cluster key.
    pub const PROOF: Self = Self(0x08);
    /// Client joins a group.
    pub const JOIN: Self = Self(0x10);
    /// Client leaves a group.
    pub const LEAVE: Self = Self(0x11);
    /// Client publishes to a group.
    pub const PUBLISH: Self = Self(0x12);
    /// Client sends to one member.
    pub const SEND: Self = Self(0x13);
    /// Client asks for a group's members.
    pub const MEMBERS_REQUEST: Self = Self(0x14);
    /// Client asks for the server's counters.
    pub const STATS_REQUEST: Self = Self(0x15);
    /// Server delivers a group message.
    pub const DELIVER: Self = Self(0x20);
    /// Server delivers a message sent to this member alone.
    pub const DIRECT: Self = Self(0x21);
    /// Server reports a membership change.
    pub const MEMBERSHIP: Self = Self(0x22);
    /// Server answers `MEMBERS_REQUEST` (possibly in several parts).
    pub const MEMBERS_REPLY: Self = Self(0x23);
    /// Server answers `STATS_REQUEST`.
    pub const STATS_REPLY: Self = Self(0x24);
    /// Server reports several membership changes of one group (to members
    /// that joined with [`Events::Batched`]).
    pub const MEMBERSHIP_BATCH: Self = Self(0x25);
    /// Server delivers a group message with its per-(sender, group)
    /// sequence number (to clients that asked with [`features::SEQ`]).
    pub const DELIVER_SEQ: Self = Self(0x26);
    /// Server tells a client it is leaving: move to another server (to
    /// clients that asked with [`features::LEAVING`]).
    pub const MOVE: Self = Self(0x27);
    /// Peer: one chunk of a membership snapshot.
    pub const SNAPSHOT: Self = Self(0x30);
    /// Peer: a member joined a group on the sending node.
    pub const PEER_JOIN: Self = Self(0x31);
    /// Peer: a member left a group on the sending node.
    pub const PEER_LEAVE: Self = Self(0x32);
    /// Peer: a group message published on the sending node.
    pub const FORWARD: Self = Self(0x33);
    /// Peer: a message for one member living on the receiving node.
    pub const FORWARD_DIRECT: Self = Self(0x34);
    /// Peer: a `FORWARD` with the publish's per-(sender, group) sequence
    /// number (to peers that announced [`features::SEQ`]).
    pub const FORWARD_SEQ: Self = Self(0x35);
    /// Peer: the sending node is leaving the cluster; everything it sent
    /// is before this frame, its members leave now (to peers that
    /// announced [`features::LEAVING`]).
    pub const NODE_LEAVING: Self = Self(0x36);
}

/// Feature bits of `HELLO` and `WELCOME` (section 6 of PROTOCOL.md).
pub mod features {
    /// Sequenced deliveries: a client gets `DELIVER_SEQ` instead of
    /// `DELIVER`; a peer understands `FORWARD_SEQ`.
    pub const SEQ: u32 = 1;
    /// A node's clean leave: a client may get `MOVE` and membership
    /// reason node-left; a peer understands `NODE_LEAVING`.
    pub const LEAVING: u32 = 2;
    /// Every feature bit this implementation knows.
    pub const ALL: u32 = SEQ | LEAVING;
}

/// Which side of the bus a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An application (msgc_client).
    Client = 1,
    /// Another msgc server of the cluster.
    Peer = 2,
}

/// An error code carried by `ERROR`. A newtype so unknown codes survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The frame's body does not match its type's layout, or the length
    /// prefix is zero.
    pub const MALFORMED: Self = Self(1);
    /// The length prefix exceeds the frame limit.
    pub const TOO_LARGE: Self = Self(2);
    /// The type byte is not one this version knows.
    pub const UNKNOWN_TYPE: Self = Self(3);
    /// Something other than `HELLO` came first, or `HELLO` came twice.
    pub const HANDSHAKE_REQUIRED: Self = Self(4);
    /// Bad magic or a protocol version the server does not speak.
    pub const UNSUPPORTED_VERSION: Self = Self(5);
    /// A group, member or node name breaks the name rules.
    pub const INVALID_NAME: Self = Self(6);
    /// The peer is not in `peers`, or credentials were refused.
    pub const NOT_ALLOWED: Self = Self(7);
    /// The outbound queue passed `max_backlog`: the connection is stuck.
    pub const STUCK: Self = Self(8);
    /// Nothing was received for `idle_timeout`.
    pub const IDLE: Self = Self(9);
    /// The server is shutting down.
    pub const SHUTTING_DOWN: Self = Self(10);
    /// A second link to the same peer; the other one is kept.
    pub const DUPLICATE_LINK: Self = Self(11);
    /// A valid frame that this role may not send (e.g. a client `FORWARD`).
    pub const UNEXPECTED: Self = Self(12);
    /// A payload larger than `max_message_size`.
    pub const MESSAGE_TOO_LARGE: Self = Self(13);
    /// A request the client's user may not make (join, publish, send,
    /// members, stats). A policy answer: the connection stays open.
    pub const PERMISSION_DENIED: Self = Self(14);
    /// Users are configured and the `HELLO` carried no valid credentials
    /// (missing, malformed, unknown user, wrong password, or too many
    /// failures from the client's address).
    pub const AUTH_FAILED: Self = Self(15);

    /// A short lower-case name for logs and counters.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "malformed",
            2 => "too_large",
            3 => "unknown_type",
            4 => "handshake_required",
            5 => "unsupported_version",
            6 => "invalid_name",
            7 => "not_allowed",
            8 => "stuck",
            9 => "idle",
            10 => "shutting_down",
            11 => "duplicate_link",
            12 => "unexpected",
            13 => "message_too_large",
            14 => "permission_denied",
            15 => "auth_failed",
            _ => "unknown",
        }
    }
}

/// Why a membership changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The member joined.
    Join = 1,
    /// The member left of its own accord.
    Leave = 2,
    /// The member's connection closed.
    Disconnect = 3,
    /// The node the members lived on is unreachable; `subject` is the node.
    NodeDown = 4,
    /// The node the members lived on left the cluster cleanly (it said
    /// so); `subject` is the node. Only to clients granted
    /// [`features::LEAVING`].
    NodeLeft = 5,
}

impl Reason {
    /// Decodes the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Join,
            2 => Self::Leave,
            3 => Self::Disconnect,
            4 => Self::NodeDown,
            5 => Self::NodeLeft,
            _ => return None,
        })
    }

    /// A short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Disconnect => "disconnect",
            Self::NodeDown => "node-down",
            Self::NodeLeft => "node-left",
        }
    }
}

/// Which membership events a member wants about the *other* members of a
/// group (its own join and leave are always acknowledged, one `MEMBERSHIP`
/// each). Carried by `JOIN`; Spread's `group_membership` flag is the
/// precedent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Events {
    /// One `MEMBERSHIP` frame per change, as soon as it happens (protocol
    /// v1's behaviour, and a `JOIN` without the field).
    #[default]
    Each = 0,
    /// Every change, coalesced into `MEMBERSHIP_BATCH` frames.
    Batched = 1,
    /// None: only this member's own acknowledgements.
    None = 2,
}

impl Events {
    /// Decodes the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Each,
            1 => Self::Batched,
            2 => Self::None,
            _ => return None,
        })
    }
}

/// One change in a `MEMBERSHIP_BATCH`: what a `MEMBERSHIP` frame carries,
/// less the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    /// Why.
    pub reason: Reason,
    /// The group's cluster-wide size after the change.
    pub size: u32,
    /// The member that changed, or for [`Reason::NodeDown`] the node lost.
    pub subject: Bytes,
}

/// `HELLO`: the first frame on every connection, from the dialling side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the sender speaks.
    pub version: u16,
    /// Client or peer.
    pub role: Role,
    /// Peer: its node name (required). Client: a name for logs (may be absent).
    pub name: Option<NodeName>,
    /// Credentials, empty when none: a client's user and password
    /// ([`Credentials`](super::Credentials)), checked when the server has
    /// users.
    pub credentials: Bytes,
    /// Optional tail: the [`features`] the sender asks for or speaks (0
    /// when the tail is absent).
    pub features: u32,
    /// Optional tail: the largest payload the sender accepts (a peer's
    /// `max_message_size`); 0 when absent or not said.
    pub max_message_size: u32,
}

/// `WELCOME`: the server's answer to a `HELLO` it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version the server speaks.
    pub version: u16,
    /// The server's node name.
    pub node: NodeName,
    /// The id assigned to this client; absent on peer links.
    pub member: Option<MemberId>,
    /// Largest payload the server accepts, in bytes.
    pub max_message_size: u32,
    /// The server's `idle_timeout`, in milliseconds: send something more often.
    pub idle_timeout_ms: u32,
    /// Optional tail: the [`features`] granted (0 when the tail is absent).
    pub features: u32,
}

/// One entry of a membership snapshot.
pub type SnapshotEntry = (GroupName, MemberId);

/// Flags of a `SNAPSHOT` chunk.
pub mod snapshot_flags {
    /// The first chunk: the receiver starts a new view of the sender's members.
    pub const FIRST: u8 = 1;
    /// The last chunk: the receiver applies the view.
    pub const LAST: u8 = 2;
}

/// A decoded frame. Payloads and names share the read buffer ([`Bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// Keepalive.
    Noop,
    /// The accepting node's half of the peer authentication
    /// (`crate::cluster::auth`).
    Challenge {
        /// Its random nonce.
        nonce: [u8; AUTH_LEN],
        /// HMAC-SHA256 proving it holds the cluster key.
        mac: [u8; AUTH_LEN],
    },
    /// The dialling node's half of the peer authentication.
    Proof {
        /// HMAC-SHA256 proving it holds the cluster key.
        mac: [u8; AUTH_LEN],
    },
    /// An error; the connection closes after it.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail (UTF-8, at most 65,535 bytes).
        message: String,
    },
    /// Liveness probe.
    Ping {
        /// Echoed in the `PONG`.
        token: u64,
    },
    /// Answer to `PING`.
    Pong {
        /// The `PING`'s token.
        token: u64,
    },
    /// Join `group`.
    Join {
        /// The group.
        group: GroupName,
        /// Which events about other members to send (encoded only when not
        /// [`Events::Each`], so a v1 `JOIN` is byte for byte the same).
        events: Events,
    },
    /// Leave `group`.
    Leave {
        /// The group.
        group: GroupName,
    },
    /// Publish `payload` to every member of `group`.
    Publish {
        /// The group.
        group: GroupName,
        /// The message.
        payload: Bytes,
    },
    /// Send `payload` to member `to` alone.
    Send {
        /// The recipient.
        to: MemberId,
        /// The message.
        payload: Bytes,
    },
    /// Ask for `group`'s members.
    MembersRequest {
        /// Echoed in the reply.
        req: u32,
        /// The group.
        group: GroupName,
    },
    /// Ask for the server's counters.
    StatsRequest {
        /// Echoed in the reply.
        req: u32,
    },
    /// A group message for this member (`DELIVER`, or `DELIVER_SEQ` when
    /// `seq` is set).
    Deliver {
        /// The group it was published to.
        group: GroupName,
        /// Who published it.
        sender: MemberId,
        /// Its number among `sender`'s publishes to `group` (`DELIVER_SEQ`).
        seq: Option<u64>,
        /// The message.
        payload: Bytes,
    },
    /// A message sent to this member alone.
    Direct {
        /// Who sent it.
        sender: MemberId,
        /// The message.
        payload: Bytes,
    },
    /// A membership change in a group this member belongs to.
    Membership {
        /// The group.
        group: GroupName,
        /// The member that changed, or for [`Reason::NodeDown`] the node lost.
        subject: Bytes,
        /// Why.
        reason: Reason,
        /// The group's cluster-wide size after the change.
        size: u32,
    },
    /// Several membership changes in a group this member belongs to, in
    /// the order they happened.
    MembershipBatch {
        /// The group.
        group: GroupName,
        /// The changes, oldest first (at least one).
        changes: Vec<MembershipChange>,
    },
    /// (Part of) the answer to `MEMBERS_REQUEST`.
    MembersReply {
        /// The request's id.
        req: u32,
        /// True on the last part.
        last: bool,
        /// The group.
        group: GroupName,
        /// Members in this part.
        members: Vec<MemberId>,
    },
    /// The answer to `STATS_REQUEST`: a UTF-8 JSON document.
    StatsReply {
        /// The request's id.
        req: u32,
        /// JSON text.
        json: Bytes,
    },
    /// Peer: a chunk of the sender's local memberships.
    Snapshot {
        /// [`snapshot_flags`].
        flags: u8,
        /// Entries in this chunk.
        entries: Vec<SnapshotEntry>,
    },
    /// Peer: a member on the sending node joined `group`.
    PeerJoin {
        /// The group.
        group: GroupName,
        /// The member.
        member: MemberId,
    },
    /// Peer: a member on the sending node left `group`.
    PeerLeave {
        /// The group.
        group: GroupName,
        /// The member.
        member: MemberId,
        /// `Leave` or `Disconnect`.
        reason: Reason,
    },
    /// Peer: a group message to deliver to the receiver's local members
    /// (`FORWARD`, or `FORWARD_SEQ` when `seq` is set).
    Forward {
        /// The group.
        group: GroupName,
        /// Who published it.
        sender: MemberId,
        /// Its number among `sender`'s publishes to `group` (`FORWARD_SEQ`).
        seq: Option<u64>,
        /// The message.
        payload: Bytes,
    },
    /// The server is leaving: connect to another server, re-join, and
    /// close this connection; the server closes it within `deadline_ms`.
    Move {
        /// Milliseconds until the server closes the connection at the latest.
        deadline_ms: u32,
    },
    /// Peer: the sending node leaves the cluster; nothing follows.
    NodeLeaving,
    /// Peer: a message for one member on the receiving node.
    ForwardDirect {
        /// The recipient.
        to: MemberId,
        /// Who sent it.
        sender: MemberId,
        /// The message.
        payload: Bytes,
    },
}

impl Frame {
    /// The type byte this frame encodes with.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::HELLO,
            Self::Welcome(_) => FrameType::WELCOME,
            Self::Noop => FrameType::NOOP,
            Self::Challenge { .. } => FrameType::CHALLENGE,
            Self::Proof { .. } => FrameType::PROOF,
            Self::Error { .. } => FrameType::ERROR,
            Self::Ping { .. } => FrameType::PING,
            Self::Pong { .. } => FrameType::PONG,
            Self::Join { .. } => FrameType::JOIN,
            Self::Leave { .. } => FrameType::LEAVE,
            Self::Publish { .. } => FrameType::PUBLISH,
            Self::Send { .. } => FrameType::SEND,
            Self::MembersRequest { .. } => FrameType::MEMBERS_REQUEST,
            Self::StatsRequest { .. } => FrameType::STATS_REQUEST,
            Self::Deliver { seq: None, .. } => FrameType::DELIVER,
            Self::Deliver { seq: Some(_), .. } => FrameType::DELIVER_SEQ,
            Self::Direct { .. } => FrameType::DIRECT,
            Self::Membership { .. } => FrameType::MEMBERSHIP,
            Self::MembershipBatch { .. } => FrameType::MEMBERSHIP_BATCH,
            Self::MembersReply { .. } => FrameType::MEMBERS_REPLY,
            Self::StatsReply { .. } => FrameType::STATS_REPLY,
            Self::Snapshot { .. } => FrameType::SNAPSHOT,
            Self::PeerJoin { .. } => FrameType::PEER_JOIN,
            Self::PeerLeave { .. } => FrameType::PEER_LEAVE,
            Self::Forward { seq: None, .. } => FrameType::FORWARD,
            Self::Forward { seq: Some(_), .. } => FrameType::FORWARD_SEQ,
            Self::ForwardDirect { .. } => FrameType::FORWARD_DIRECT,
            Self::Move { .. } => FrameType::MOVE,
            Self::NodeLeaving => FrameType::NODE_LEAVING,
        }
    }
}
