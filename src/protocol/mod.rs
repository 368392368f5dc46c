//! The wire protocol, sans-IO: frame types, validated names and the codec.
//!
//! Nothing here touches a socket or a clock; the server, the cluster links
//! and the client all speak through [`decode`] and [`Frame::encode`].
//! PROTOCOL.md at the repository root is the byte-exact specification.

pub mod codec;
pub mod credentials;
pub mod frame;
pub mod names;

pub use codec::{
    decode, decode_body, encode_group_message, encode_group_message_raw, encode_membership,
    encode_membership_batch, encode_publish, group_message_parts, group_of, is_message_frame,
    peek_len, peek_publish, DecodeError, GroupMessage, FRAME_OVERHEAD, LEN_PREFIX,
};
pub use credentials::{Credentials, CredentialsError};
pub use frame::{
    features, snapshot_flags, ErrorCode, Events, Frame, FrameType, Hello, MembershipChange, Reason,
    Role, SnapshotEntry, Welcome, AUTH_LEN, MAGIC, PROTOCOL_VERSION,
};
pub use names::{
    member_parts, validate_name, GroupName, MemberId, NameError, NodeName, MAX_NAME_LEN,
};

/// The frame limit for a given `max_message_size`.
pub fn max_frame_for(max_message_size: usize) -> usize {
    max_message_size.saturating_add(FRAME_OVERHEAD)
}

/// Largest list frame (members reply, snapshot chunk) a sender builds: well
/// under any peer's frame limit, so lists are split into several parts.
pub const LIST_PART_BYTES: usize = 60 * 1024;

/// The byte budget for one part of a list frame under `max_message_size`:
/// [`LIST_PART_BYTES`], or less when the frame limit is smaller (one entry,
/// at most 512 bytes, always fits the smallest limit).
pub fn list_budget(max_message_size: usize) -> usize {
    LIST_PART_BYTES.min(max_frame_for(max_message_size).saturating_sub(600))
}

/// Splits `items` into consecutive parts whose encoded entries (`size` of
/// each) add up to at most `budget` bytes; every part holds at least one
/// item, and an empty list gives one empty part (a list reply always has a
/// last part).
pub fn split_by_size<T>(items: &[T], budget: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut parts = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && used + n > budget {
            parts.push(&items[start..i]);
            (start, used) = (i, 0);
        }
        used += n;
    }
    if start < items.len() || parts.is_empty() {
        parts.push(&items[start..]);
    }
    parts
}

#[cfg(test)]
mod split_tests {
    use super::split_by_size;

    #[test]
    fn parts_respect_the_budget_and_keep_order() {
        let items: Vec<usize> = vec![3, 3, 3, 9, 1, 1];
        let parts = split_by_size(&items, 6, |n| *n);
        let expected: Vec<&[usize]> = vec![&[3, 3], &[3], &[9], &[1, 1]];
        assert_eq!(parts, expected);
        let empty: &[usize] = &[];
        assert_eq!(split_by_size(empty, 6, |n| *n), vec![empty]);
    }
}
