//! The wire protocol, sans-IO: frame types, validated names and the codec.
//!
//! Nothing here touches a socket or a clock; the server, the cluster links
//! and the client all speak through [`decode`] and [`Frame::encode`].
//! PROTOCOL.md at the repository root is the byte-exact specification.

pub mod codec;
pub mod frame;
pub mod names;

pub use codec::{
    decode, decode_body, encode_group_message, encode_publish, peek_len, DecodeError,
    FRAME_OVERHEAD, LEN_PREFIX,
};
pub use frame::{
    snapshot_flags, ErrorCode, Frame, FrameType, Hello, Reason, Role, SnapshotEntry, Welcome,
    MAGIC, PROTOCOL_VERSION,
};
pub use names::{validate_name, GroupName, MemberId, NameError, NodeName, MAX_NAME_LEN};

/// The frame limit for a given `max_message_size`.
pub fn max_frame_for(max_message_size: usize) -> usize {
    max_message_size.saturating_add(FRAME_OVERHEAD)
}
