//! Validated names carried on the wire: group names and member ids.
//!
//! Both are 1..=255 bytes of printable ASCII without spaces (0x21..=0x7E),
//! stored as [`Bytes`] so that a decoded name shares the frame's buffer and
//! cloning one is a reference-count increment. Node names (in the
//! handshake) follow the same rules; validation of what a name *means*
//! (does the group exist, is the peer known) lives elsewhere.

use bytes::Bytes;
use std::fmt;

/// Longest group name, member id or node name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Why a byte string is not a valid name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Zero bytes long.
    #[error("name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    /// Holds a byte outside 0x21..=0x7E.
    #[error("name holds byte 0x{0:02x}; only printable ASCII without spaces is allowed")]
    BadByte(u8),
}

/// Checks the name rules shared by groups, members and nodes.
///
/// # Errors
/// [`NameError`] saying which rule the bytes break.
pub fn validate_name(bytes: &[u8]) -> Result<(), NameError> {
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    match bytes.iter().find(|b| !(0x21..=0x7e).contains(*b)) {
        Some(b) => Err(NameError::BadByte(*b)),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Bytes);

        impl $name {
            /// Validates and wraps `bytes` without copying.
            ///
            /// # Errors
            /// [`NameError`] when the bytes break the name rules.
            pub fn new(bytes: Bytes) -> Result<Self, NameError> {
                validate_name(&bytes)?;
                Ok(Self(bytes))
            }

            /// Validates and copies a string.
            ///
            /// # Errors
            /// [`NameError`] when the string breaks the name rules.
            pub fn from_str_checked(s: &str) -> Result<Self, NameError> {
                Self::new(Bytes::copy_from_slice(s.as_bytes()))
            }

            /// The name's bytes.
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            /// The name as text (always valid: names are ASCII).
            pub fn as_str(&self) -> &str {
                // Validated printable ASCII is valid UTF-8.
                std::str::from_utf8(&self.0).unwrap_or("")
            }

            /// The underlying shared buffer.
            pub fn bytes(&self) -> &Bytes {
                &self.0
            }

            /// An owned copy that shares no buffer with `self`. A decoded
            /// name is a slice of the read buffer it arrived in and keeps
            /// all of that buffer alive: whatever outlives the frame's
            /// handling stores a compact copy instead.
            pub fn compact(&self) -> Self {
                Self(Bytes::copy_from_slice(&self.0))
            }

            /// Wraps bytes already known to be a valid name.
            #[allow(dead_code)] // not every name type needs it
            pub(crate) fn from_validated(bytes: Bytes) -> Self {
                debug_assert!(validate_name(&bytes).is_ok());
                Self(bytes)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        impl std::borrow::Borrow<[u8]> for $name {
            fn borrow(&self) -> &[u8] {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::from_str_checked(s)
            }
        }
    };
}

name_type!(
    /// A group name: what clients join, leave and publish to.
    GroupName
);
name_type!(
    /// A member id: cluster-unique, assigned by the server a client is
    /// connected to, of the form `NODE/SHARD.SEQ`. Clients treat it as opaque.
    MemberId
);
name_type!(
    /// A node name: an entry of the `peers` dictionary.
    NodeName
);

impl MemberId {
    /// Builds the id of the `seq`th connection accepted by `shard` of
    /// `node` in its incarnation `inc` (one per start of the server):
    /// `NODE/SHARD.SEQ.INC`.
    pub fn assign(node: &NodeName, inc: &str, shard: usize, seq: u64) -> Self {
        Self(Bytes::from(format!(
            "{}/{}.{}.{}",
            node.as_str(),
            shard,
            seq,
            inc
        )))
    }

    /// Splits an id made by [`MemberId::assign`] into node, shard,
    /// sequence and incarnation (empty for an id without one). Returns
    /// `None` for ids of another shape (which no server assigned).
    pub fn parts(&self) -> Option<(&str, usize, u64, &str)> {
        member_parts(self.as_str())
    }
}

/// [`MemberId::parts`] of an id not wrapped (yet): read where it lies in
/// a frame.
pub fn member_parts(id: &str) -> Option<(&str, usize, u64, &str)> {
    let (node, rest) = id.rsplit_once('/')?;
    let (shard, rest) = rest.split_once('.')?;
    let (seq, inc) = rest.split_once('.').unwrap_or((rest, ""));
    Some((node, shard.parse().ok()?, seq.parse().ok()?, inc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        assert_eq!(validate_name(b""), Err(NameError::Empty));
        assert_eq!(validate_name(&[b'a'; 256]), Err(NameError::TooLong));
        assert!(validate_name(&[b'a'; 255]).is_ok());
        assert_eq!(validate_name(b"a b"), Err(NameError::BadByte(b' ')));
        assert_eq!(validate_name(b"a\xff"), Err(NameError::BadByte(0xff)));
        assert!(validate_name(b"orders.eu-west/1:#x").is_ok());
    }

    #[test]
    fn member_id_parts() {
        let node = NodeName::from_str_checked("node/1").unwrap();
        let id = MemberId::assign(&node, "k1", 3, 42);
        assert_eq!(id.as_str(), "node/1/3.42.k1");
        assert_eq!(id.parts(), Some(("node/1", 3, 42, "k1")));
        let old = MemberId::from_str_checked("n/0.7").unwrap();
        assert_eq!(old.parts(), Some(("n", 0, 7, "")));
        assert_eq!(MemberId::from_str_checked("x").unwrap().parts(), None);
    }
}
