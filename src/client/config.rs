//! [`ClientConfig`]: every `msgc_client` option of the seed, plus what this
//! client adds (a name for the handshake, a message-size limit, a bound on
//! request waits).
//!
//! Owns the defaults and the mapping from the config module's typed
//! [`ClientSettings`]; it does not parse files itself (that is
//! [`crate::config`]) nor touch sockets (that is `connection.rs`).

use crate::protocol::Events;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use crate::config::{ClientSettings, Config, DebugLevel};

use super::error::ClientError;

/// Default `max_message_size`: 1 MiB, the server's default.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// How a [`Client`](super::Client) connects and behaves.
///
/// `Default` is the seed's `msgc_client` defaults. Every duration must be
/// non-zero, `servers` non-empty and `max_backlog` at least 1
/// ([`Client::connect`](super::Client::connect) checks).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Servers as `host:port` (or `[v6]:port`), tried in order on every
    /// (re)connection; the first that completes the handshake wins.
    /// Default `["127.0.0.1:4809"]`.
    pub servers: Vec<String>,
    /// Local address the outbound connection binds to. Default: none (the
    /// kernel chooses). Ignored for servers of the other address family.
    pub bind_address: Option<IpAddr>,
    /// Bound on each dial, and on the HELLO → WELCOME exchange. Default 60 s.
    pub connect_timeout: Duration,
    /// Logging verbosity (`debug_level`). The library installs no logger;
    /// applications (the `msgc` CLI) use it for their `tracing` filter.
    /// Default `ERROR`.
    pub debug_level: DebugLevel,
    /// A connection that has received nothing for this long is considered
    /// dead and re-dialled; a write that makes no progress for this long
    /// likewise. Default 30 s.
    pub idle_timeout: Duration,
    /// A NOOP is sent after this long without sending anything (or half the
    /// server's idle timeout, if that is shorter). Default 5 s.
    pub keepalive_interval: Duration,
    /// Capacity, in frames, of the outbound queue, and, in events, of the
    /// event channel. A full queue makes `publish` wait (backpressure).
    /// Default 5000.
    pub max_backlog: usize,
    /// Frames dispatched by the reader before it yields to other tasks.
    /// Default 20.
    pub messages_per_iter: usize,
    /// Wait between rounds of re-dialling the server list after a lost
    /// connection. Default 5 s.
    pub reconnect_interval: Duration,
    /// SO_SNDBUF / SO_RCVBUF in bytes; 0 leaves the kernel's default (and
    /// its autotuning). Default 131072.
    pub tcpbuf_size: usize,
    /// Name sent in HELLO, for the server's logs. Must follow the name rules
    /// (printable ASCII, no spaces, 1..=255 bytes). Default: none.
    pub name: Option<String>,
    /// Largest payload this client sends or accepts; the limit for sending
    /// is the smaller of this and the server's (from WELCOME).
    /// Default 1 MiB.
    pub max_message_size: usize,
    /// Bound on every request (`join`, `leave`, `members`, `stats`, `ping`,
    /// `close`, and `publish` waiting for queue room). Default 60 s;
    /// [`ClientConfig::from_settings`] uses `connect_timeout`.
    pub request_timeout: Duration,
    /// Which events about other members every `join` asks for. Default
    /// [`Events::Batched`]: every change, coalesced by the server into few
    /// frames (the library hands them out one [`Event::Membership`]
    /// each); [`Events::None`] for only this client's own; [`Events::Each`]
    /// for protocol v1's one frame per change.
    ///
    /// [`Event::Membership`]: super::Event::Membership
    pub membership_events: Events,
    /// Ask the server for sequenced deliveries (the `SEQ` feature) and
    /// report lost messages as [`Event::Gap`]; a server that does not know
    /// the feature ignores the request. Costs 8 bytes per message received
    /// and one hash lookup. Default `true`.
    ///
    /// [`Event::Gap`]: super::Event::Gap
    pub sequenced: bool,
    /// User name sent in HELLO's credentials, for a server with `users`
    /// configured. Default: none (no credentials; a server without users
    /// ignores them anyway).
    pub user: Option<String>,
    /// The user's password (1..=1024 bytes; required with `user`).
    /// Default: none.
    pub password: Option<String>,
    /// TLS: a PEM file of the CA the server's certificate must be signed
    /// by. Setting it turns TLS on. Default: none (plain TCP).
    pub tls_ca: Option<String>,
    /// TLS: a PEM certificate chain to present (for a server with
    /// `tls_client_auth = true`); needs `tls_key` and `tls_ca`. Default: none.
    pub tls_certificate: Option<String>,
    /// TLS: the PEM private key of `tls_certificate`. Default: none.
    pub tls_key: Option<String>,
    /// TLS: the name the server's certificate must carry. Default: none
    /// (the host part of the server address: a DNS name or an IP address).
    pub tls_server_name: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    /// Every field, the password shown only as set or not.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("servers", &self.servers)
            .field("bind_address", &self.bind_address)
            .field("connect_timeout", &self.connect_timeout)
            .field("debug_level", &self.debug_level)
            .field("idle_timeout", &self.idle_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("max_backlog", &self.max_backlog)
            .field("messages_per_iter", &self.messages_per_iter)
            .field("reconnect_interval", &self.reconnect_interval)
            .field("tcpbuf_size", &self.tcpbuf_size)
            .field("name", &self.name)
            .field("max_message_size", &self.max_message_size)
            .field("request_timeout", &self.request_timeout)
            .field("membership_events", &self.membership_events)
            .field("sequenced", &self.sequenced)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_certificate", &self.tls_certificate)
            .field("tls_key", &self.tls_key)
            .field("tls_server_name", &self.tls_server_name)
            .finish()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig::from_settings(&ClientSettings::default())
    }
}

impl ClientConfig {
    /// A config with the given servers and every other option at its default.
    pub fn with_servers<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    /// Maps the typed `msgc_client` stanza; `name` is unset and
    /// `max_message_size` is the default.
    pub fn from_settings(s: &ClientSettings) -> Self {
        ClientConfig {
            servers: s.server.clone(),
            bind_address: s.bind_address,
            connect_timeout: s.connect_timeout,
            debug_level: s.debug_level,
            idle_timeout: s.idle_timeout,
            keepalive_interval: s.keepalive_interval,
            max_backlog: s.max_backlog,
            messages_per_iter: s.messages_per_iter,
            reconnect_interval: s.reconnect_interval,
            tcpbuf_size: s.tcpbuf_size,
            name: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            request_timeout: s.connect_timeout,
            membership_events: Events::Batched,
            sequenced: true,
            user: None,
            password: None,
            tls_ca: None,
            tls_certificate: None,
            tls_key: None,
            tls_server_name: None,
        }
    }

    /// The rustls configuration of `tls_*`, read from the files now;
    /// `None` when TLS is off.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`]: a certificate without its key (or
    /// the other way round), either without `tls_ca`, or a file that
    /// cannot be read or used.
    pub fn tls_config(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ClientError> {
        let bad = |what: String| Err(ClientError::InvalidConfig(what));
        let pair = match (&self.tls_certificate, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.as_str(), k.as_str())),
            (None, None) => None,
            _ => return bad("tls_certificate and tls_key go together".into()),
        };
        let Some(ca) = &self.tls_ca else {
            if pair.is_some() || self.tls_server_name.is_some() {
                return bad("tls_certificate, tls_key and tls_server_name need tls_ca".into());
            }
            return Ok(None);
        };
        match crate::tls::client_config(ca, pair) {
            Ok(c) => Ok(Some(c)),
            Err(e) => bad(format!("TLS: {e}")),
        }
    }

    /// Reads the `msgc_client` stanza of a Momentum-syntax file (other
    /// stanzas are parsed and checked too, then ignored).
    ///
    /// # Errors
    /// [`ClientError::Config`] when the file cannot be read or is invalid.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let config = Config::load(path).map_err(ClientError::Config)?;
        Ok(ClientConfig::from_settings(&config.client))
    }

    /// Checks the invariants stated on the fields.
    ///
    /// # Errors
    /// [`ClientError::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: &str| Err(ClientError::InvalidConfig(what.to_string()));
        if self.servers.is_empty() {
            return bad("servers is empty");
        }
        if self.max_backlog == 0 {
            return bad("max_backlog must be at least 1");
        }
        if self.max_message_size == 0 {
            return bad("max_message_size must be at least 1");
        }
        let durations = [
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("reconnect_interval", self.reconnect_interval),
            ("request_timeout", self.request_timeout),
        ];
        if let Some((name, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return bad(&format!("{name} must be greater than zero"));
        }
        if let Some(user) = &self.user {
            let creds = crate::protocol::Credentials {
                user: user.clone(),
                password: self.password.clone().unwrap_or_default().into_bytes(),
            };
            creds
                .encode()
                .map_err(|e| ClientError::InvalidConfig(format!("user `{user}`: {e}")))?;
        }
        self.tls_config()?;
        if let Some(name) = &self.name {
            crate::protocol::validate_name(name.as_bytes())
                .map_err(|e| ClientError::InvalidConfig(format!("name `{name}`: {e}")))?;
        }
        Ok(())
    }

    /// The keepalive period given the server's idle timeout (0 = unknown):
    /// `keepalive_interval`, or half the server's idle timeout if shorter.
    pub(crate) fn effective_keepalive(&self, server_idle_ms: u32) -> Duration {
        let server_half = Duration::from_millis(u64::from(server_idle_ms) / 2);
        if server_half.is_zero() {
            self.keepalive_interval
        } else {
            self.keepalive_interval.min(server_half)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let c = ClientConfig::default();
        assert_eq!(c.servers, vec!["127.0.0.1:4809".to_string()]);
        assert_eq!(c.connect_timeout, Duration::from_secs(60));
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.keepalive_interval, Duration::from_secs(5));
        assert_eq!(c.max_backlog, 5000);
        assert_eq!(c.messages_per_iter, 20);
        assert_eq!(c.reconnect_interval, Duration::from_secs(5));
        assert_eq!(c.tcpbuf_size, 131_072);
        assert_eq!(c.bind_address, None);
        assert!(c.sequenced);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn credentials_are_checked_and_the_password_not_printed() {
        let c = ClientConfig {
            user: Some("alice".into()),
            password: Some("s3cret".into()),
            ..ClientConfig::default()
        };
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("s3cret"));
        let no_password = ClientConfig {
            password: None,
            ..c.clone()
        };
        assert!(no_password.validate().is_err());
        let bad_user = ClientConfig {
            user: Some("a b".into()),
            ..c
        };
        assert!(bad_user.validate().is_err());
    }

    #[test]
    fn keepalive_follows_the_server() {
        let c = ClientConfig::default();
        assert_eq!(c.effective_keepalive(0), Duration::from_secs(5));
        assert_eq!(c.effective_keepalive(4000), Duration::from_secs(2));
        assert_eq!(c.effective_keepalive(30_000), Duration::from_secs(5));
    }

    #[test]
    fn validation_names_the_field() {
        let c = ClientConfig {
            servers: vec![],
            ..ClientConfig::default()
        };
        assert!(c.validate().is_err());
        let c = ClientConfig {
            name: Some("a b".into()),
            ..ClientConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("name"));
    }
}
