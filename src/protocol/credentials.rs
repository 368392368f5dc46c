//! The `credentials` field of a client's `HELLO` (PROTOCOL.md section 6):
//! encoding and decoding, sans-IO.
//!
//! Empty means none. Otherwise: a `u8` scheme, `1` = user and password,
//! then the user name as a `name` (`str8`, the rules of section 4), then
//! the password: every byte left, 1 to [`MAX_PASSWORD`] of them. Owns the
//! layout only; checking a password is the server's.

use bytes::{BufMut, Bytes, BytesMut};

/// Scheme byte of user-and-password credentials.
pub const SCHEME_PASSWORD: u8 = 1;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD: usize = 1024;

/// A user name and its password, as a client sends them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name (a valid name).
    pub user: String,
    /// The password (1..=[`MAX_PASSWORD`] bytes; UTF-8 is usual but not
    /// required).
    pub password: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    /// The password is not printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Why credentials could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// The scheme byte is not one this version knows.
    #[error("unknown credentials scheme {0}")]
    UnknownScheme(u8),
    /// The layout is wrong (truncated user name, no password).
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    /// The user name breaks the name rules.
    #[error("the user name is not a valid name")]
    BadUser,
    /// The password is longer than [`MAX_PASSWORD`].
    #[error("the password is longer than {MAX_PASSWORD} bytes")]
    TooLong,
}

impl Credentials {
    /// The field's bytes.
    ///
    /// # Errors
    /// [`CredentialsError::BadUser`] or [`CredentialsError::Malformed`] /
    /// [`CredentialsError::TooLong`] for a password empty or too long.
    pub fn encode(&self) -> Result<Bytes, CredentialsError> {
        check_user(self.user.as_bytes())?;
        check_password(&self.password)?;
        let mut b = BytesMut::with_capacity(2 + self.user.len() + self.password.len());
        b.put_u8(SCHEME_PASSWORD);
        b.put_u8(self.user.len() as u8); // checked: 1..=255
        b.put_slice(self.user.as_bytes());
        b.put_slice(&self.password);
        Ok(b.freeze())
    }

    /// Reads the field: `Ok(None)` when it is empty.
    ///
    /// # Errors
    /// [`CredentialsError`] saying what is wrong.
    pub fn decode(field: &[u8]) -> Result<Option<Credentials>, CredentialsError> {
        let Some((&scheme, rest)) = field.split_first() else {
            return Ok(None);
        };
        if scheme != SCHEME_PASSWORD {
            return Err(CredentialsError::UnknownScheme(scheme));
        }
        let Some((&len, rest)) = rest.split_first() else {
            return Err(CredentialsError::Malformed("no user name"));
        };
        let len = usize::from(len);
        if rest.len() < len {
            return Err(CredentialsError::Malformed("user name runs past the end"));
        }
        let (user, password) = rest.split_at(len);
        check_user(user)?;
        check_password(password)?;
        Ok(Some(Credentials {
            // check_user allows ASCII only.
            user: String::from_utf8_lossy(user).into_owned(),
            password: password.to_vec(),
        }))
    }
}

fn check_user(user: &[u8]) -> Result<(), CredentialsError> {
    super::validate_name(user).map_err(|_| CredentialsError::BadUser)
}

fn check_password(password: &[u8]) -> Result<(), CredentialsError> {
    if password.is_empty() {
        return Err(CredentialsError::Malformed("empty password"));
    }
    if password.len() > MAX_PASSWORD {
        return Err(CredentialsError::TooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let c = Credentials {
            user: "alice".into(),
            password: b"s3cret".to_vec(),
        };
        let bytes = c.encode().expect("valid");
        assert_eq!(&bytes[..], b"\x01\x05alices3cret");
        assert_eq!(Credentials::decode(&bytes), Ok(Some(c)));
        assert_eq!(Credentials::decode(b""), Ok(None));
        assert_eq!(
            Credentials::decode(b"\x02\x01a1"),
            Err(CredentialsError::UnknownScheme(2))
        );
        for bad in [
            &b"\x01"[..],
            b"\x01\x05ali",
            b"\x01\x05alice",
            b"\x01\x00pw",
        ] {
            assert!(Credentials::decode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Credentials::decode(b"\x01\x02a pw"),
            Err(CredentialsError::BadUser)
        );
        let mut long = b"\x01\x01a".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_PASSWORD + 1));
        assert_eq!(Credentials::decode(&long), Err(CredentialsError::TooLong));
    }
}
