//! [`IntoName`]: what the client's calls accept as a group name or member
//! id, so that `&str`, `String` and validated names all work.

use crate::protocol::{GroupName, MemberId};

use super::error::ClientError;

/// A value usable as a group name or member id: a `&str`/`String`
/// (validated on use) or an already validated name (cloned cheaply).
pub trait IntoName<T> {
    /// Validates (if needed) and converts.
    ///
    /// # Errors
    /// [`ClientError::InvalidName`] when the text breaks the name rules.
    fn into_name(self) -> Result<T, ClientError>;
}

macro_rules! into_name {
    ($t:ty) => {
        impl IntoName<$t> for $t {
            fn into_name(self) -> Result<$t, ClientError> {
                Ok(self)
            }
        }
        impl IntoName<$t> for &$t {
            fn into_name(self) -> Result<$t, ClientError> {
                Ok(self.clone())
            }
        }
        impl IntoName<$t> for &str {
            fn into_name(self) -> Result<$t, ClientError> {
                <$t>::from_str_checked(self).map_err(|error| ClientError::InvalidName {
                    name: self.to_string(),
                    error,
                })
            }
        }
        impl IntoName<$t> for String {
            fn into_name(self) -> Result<$t, ClientError> {
                self.as_str().into_name()
            }
        }
        impl IntoName<$t> for &String {
            fn into_name(self) -> Result<$t, ClientError> {
                self.as_str().into_name()
            }
        }
    };
}
into_name!(GroupName);
into_name!(MemberId);
