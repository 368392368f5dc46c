//! [`ClientError`]: everything a client operation can fail with.
//!
//! Messages are one line, lower case, and carry their detail inline (no
//! `source()` chain to repeat it), so `msgc: {err}` is a complete report.

use std::fmt;
use std::time::Duration;

use crate::protocol::{DecodeError, ErrorCode, NameError};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No server of the list could be reached and greeted. One entry per
    /// attempt: the server as configured and why it failed.
    #[error("cannot connect to {}", Attempts(.attempts))]
    Connect {
        /// `(server, reason)` in the order tried.
        attempts: Vec<(String, String)>,
    },
    /// An I/O error outside of dialling.
    #[error("i/o error: {}", describe_io(.0))]
    Io(std::io::Error),
    /// A wait passed its bound.
    #[error("timed out after {} waiting for {what}", fmt_duration(*.after))]
    Timeout {
        /// What was awaited (`join acknowledgement`, `members reply`…).
        what: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// The server sent bytes that are not a valid frame, or a frame a
    /// server may not send.
    #[error("protocol error from the server: {0}")]
    Protocol(DecodeError),
    /// The server answered with an `ERROR` frame (and closed the connection).
    #[error("server error {} ({}): {message}", .code.0, .code.name())]
    Server {
        /// The wire error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The connection to the server is down (the client is re-dialling), or
    /// went down before the operation completed.
    #[error("disconnected from the server")]
    Disconnected,
    /// A group name or member id breaks the name rules.
    #[error("invalid name `{name}`: {error}")]
    InvalidName {
        /// The name as given (lossily decoded).
        name: String,
        /// Which rule it breaks.
        error: NameError,
    },
    /// A payload larger than the limit in force.
    #[error("message of {size} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// The payload's size.
        size: usize,
        /// The smaller of the client's and the server's `max_message_size`.
        max: usize,
    },
    /// The server refused a request by the user's permissions
    /// (`ERROR PERMISSION_DENIED`); the connection stays up.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// The server's message: the request, then why.
        message: String,
    },
    /// `try_publish` found the outbound queue full.
    #[error("outbound queue is full ({0} frames)")]
    QueueFull(usize),
    /// The client was closed (or is closing).
    #[error("client is closed")]
    Closed,
    /// A [`ClientConfig`](super::ClientConfig) field is out of range.
    #[error("invalid client configuration: {0}")]
    InvalidConfig(String),
    /// The configuration file could not be read or is invalid.
    #[error("{0}")]
    Config(crate::config::Error),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Protocol(e)
    }
}

/// An I/O error as a short lower-case phrase: `connection refused` rather
/// than `Connection refused (os error 111)`.
pub(crate) fn describe_io(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// `1.5s`, `250ms`, `60s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

struct Attempts<'a>(&'a [(String, String)]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("any server: no server configured");
        }
        for (i, (server, reason)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{server}: {reason}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_error_reads_as_one_line() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let e = ClientError::Connect {
            attempts: vec![("127.0.0.1:4809".into(), describe_io(&refused))],
        };
        assert_eq!(
            e.to_string(),
            "cannot connect to 127.0.0.1:4809: connection refused"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_secs(60)), "60s");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.500s");
    }
}
