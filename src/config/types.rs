//! Small typed values of the configuration: peers, listen addresses, the
//! debug level and the I/O backend, each with its parsing and its Momentum
//! spelling (`Display` output parses back to the same value).
//!
//! They know nothing of files or spans: errors are plain strings that the
//! settings stage locates.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Shortest cluster key accepted, in bytes.
pub const MIN_CLUSTER_KEY: usize = 16;

/// The cluster secret (`cluster_key`, or the contents of
/// `cluster_key_file` without trailing white space): the HMAC key peers
/// prove they hold (`crate::cluster::auth`). Never printed: `Debug` shows
/// `<secret>`, and the rendered configuration `"<secret>"`.
///
/// Invariant: at least [`MIN_CLUSTER_KEY`] bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(std::sync::Arc<[u8]>);

impl ClusterKey {
    /// A key of `bytes` (trailing ASCII white space removed: a key file
    /// ends in a newline).
    ///
    /// # Errors
    /// A message when fewer than [`MIN_CLUSTER_KEY`] bytes remain.
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let key = &bytes[..end];
        if key.len() < MIN_CLUSTER_KEY {
            return Err(format!(
                "a cluster key needs at least {MIN_CLUSTER_KEY} bytes, found {} \
                 (make one with `openssl rand -hex 32`)",
                key.len()
            ));
        }
        Ok(Self(key.into()))
    }

    /// The key's bytes (for the MAC; never print them).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<secret>)")
    }
}

/// One cluster node from `msgc_server { peers = [ NAME = "HOST[:PORT]" ] }`.
///
/// Invariants: `name` and `host` are non-empty; `host` is an IP address or a
/// host name (letters, digits, `-`, `.`, `_`), never bracketed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The node's name, as written (case kept; compared exactly).
    pub name: String,
    /// An IP address or host name, without brackets.
    pub host: String,
    /// The port, when the entry gave one; otherwise the server's `port`.
    pub port: Option<u16>,
}

impl Peer {
    /// Parses a `peers` entry: `spec` is `host`, `host:port`, `[v6]`,
    /// `[v6]:port` or a bare IPv6 address.
    ///
    /// # Errors
    /// A message saying what is wrong with the name or the address.
    pub fn parse(name: &str, spec: &str) -> Result<Peer, String> {
        if name.is_empty() {
            return Err("peer name is empty".into());
        }
        let (host, port) = split_host_port(spec)?;
        Ok(Peer {
            name: name.to_string(),
            host,
            port,
        })
    }

    /// The peer's port, or `default` (the server's `port`) when none was given.
    pub fn port_or(&self, default: u16) -> u16 {
        self.port.unwrap_or(default)
    }

    /// `host:port` ready to dial (`[v6]:port` for IPv6 literals).
    pub fn addr_string(&self, default_port: u16) -> String {
        join_host_port(&self.host, self.port_or(default_port))
    }

    /// The entry as written in a config file (`host` or `host:port`).
    pub fn spec(&self) -> String {
        match self.port {
            Some(port) => join_host_port(&self.host, port),
            None if self.host.contains(':') => format!("[{}]", self.host),
            None => self.host.clone(),
        }
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address.
///
/// # Errors
/// Empty or malformed host, or a port outside 1..=65535.
pub fn split_host_port(spec: &str) -> Result<(String, Option<u16>), String> {
    if spec.is_empty() {
        return Err("address is empty".into());
    }
    if let Some(rest) = spec.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("missing `]` in `{spec}`"))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("`{host}` is not an IPv6 address"));
        }
        return match after {
            "" => Ok((host.to_string(), None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host.to_string(), Some(parse_port(port)?))),
                None => Err(format!("unexpected `{after}` after `]` in `{spec}`")),
            },
        };
    }
    if spec.parse::<Ipv6Addr>().is_ok() {
        return Ok((spec.to_string(), None));
    }
    let (host, port) = match spec.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (spec, None),
    };
    check_host(host, spec)?;
    Ok((host.to_string(), port))
}

fn check_host(host: &str, spec: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err(format!("missing host in `{spec}`"));
    }
    let ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        return Err(format!(
            "`{host}` is not a valid host (expected an IP address or a host name; \
             write IPv6 with a port as [addr]:port)"
        ));
    }
    Ok(())
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!(
            "bad port `{text}`: expected a number from 1 to 65535"
        )),
    }
}

/// Which I/O engine the server's shards run (`io_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// io_uring where the kernel allows it, else epoll with a warning.
    #[default]
    Auto,
    /// io_uring only; fail if it is unavailable.
    Uring,
    /// epoll (plain tokio) only.
    Epoll,
}

impl IoBackend {
    /// The spelling in config files.
    pub fn as_str(&self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::Uring => "uring",
            IoBackend::Epoll => "epoll",
        }
    }
}

impl FromStr for IoBackend {
    type Err = String;

    /// `auto`, `uring` (alias `io_uring`) or `epoll`, any case.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(IoBackend::Auto),
            "uring" | "io_uring" => Ok(IoBackend::Uring),
            "epoll" => Ok(IoBackend::Epoll),
            _ => Err(format!(
                "unknown io_backend `{s}`; expected one of: auto, uring, epoll"
            )),
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Momentum's debug levels, most verbose first (`debug_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum DebugLevel {
    /// `DEBUG`
    Debug,
    /// `INFO`
    Info,
    /// `NOTICE`
    Notice,
    /// `WARNING`
    Warning,
    /// `ERROR` (the seed's default)
    #[default]
    Error,
    /// `CRITICAL` (alias `CRIT`)
    Critical,
    /// `ALERT`
    Alert,
    /// `EMERG` (alias `EMERGENCY`)
    Emerg,
}

impl DebugLevel {
    /// Every level with its canonical name, most verbose first.
    pub const ALL: [(DebugLevel, &'static str); 8] = [
        (DebugLevel::Debug, "DEBUG"),
        (DebugLevel::Info, "INFO"),
        (DebugLevel::Notice, "NOTICE"),
        (DebugLevel::Warning, "WARNING"),
        (DebugLevel::Error, "ERROR"),
        (DebugLevel::Critical, "CRITICAL"),
        (DebugLevel::Alert, "ALERT"),
        (DebugLevel::Emerg, "EMERG"),
    ];

    /// The canonical Momentum name (`ERROR`, `CRITICAL`, …).
    pub fn as_str(&self) -> &'static str {
        match self {
            DebugLevel::Debug => "DEBUG",
            DebugLevel::Info => "INFO",
            DebugLevel::Notice => "NOTICE",
            DebugLevel::Warning => "WARNING",
            DebugLevel::Error => "ERROR",
            DebugLevel::Critical => "CRITICAL",
            DebugLevel::Alert => "ALERT",
            DebugLevel::Emerg => "EMERG",
        }
    }

    /// The `tracing` level directive for this level: NOTICE maps to `info`,
    /// CRITICAL/ALERT/EMERG (which tracing lacks) to `error`.
    pub fn as_tracing_filter(&self) -> &'static str {
        match self {
            DebugLevel::Debug => "debug",
            DebugLevel::Info | DebugLevel::Notice => "info",
            DebugLevel::Warning => "warn",
            DebugLevel::Error | DebugLevel::Critical | DebugLevel::Alert | DebugLevel::Emerg => {
                "error"
            }
        }
    }
}

impl FromStr for DebugLevel {
    type Err = String;

    /// A Momentum level name, any case; `CRIT` and `EMERGENCY` are aliases.
    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.to_ascii_uppercase();
        let alias = match upper.as_str() {
            "CRIT" => "CRITICAL",
            "EMERGENCY" => "EMERG",
            other => other,
        };
        DebugLevel::ALL
            .iter()
            .find(|(_, name)| *name == alias)
            .map(|(level, _)| *level)
            .ok_or_else(|| {
                let names: Vec<&str> = DebugLevel::ALL.iter().map(|(_, n)| *n).collect();
                format!(
                    "unknown debug level `{s}`; expected one of: {}",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for DebugLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address from `listen "ADDR" { }`: an IP and port to bind.
///
/// `":PORT"` and `"*:PORT"` mean every IPv4 address (`0.0.0.0:PORT`);
/// `"IP:PORT"` and `"[IPv6]:PORT"` bind that address. Host names are not
/// accepted (a listener binds an address). Port 0 asks the kernel for a free
/// port (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl ListenAddr {
    /// Every IPv4 address on `port` (what `":PORT"` means).
    pub fn any(port: u16) -> ListenAddr {
        ListenAddr(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
    }

    /// The socket address to bind.
    pub fn socket_addr(&self) -> SocketAddr {
        self.0
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let any_port = s.strip_prefix(':').or_else(|| s.strip_prefix("*:"));
        if let Some(port) = any_port {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(ListenAddr::any(port));
            }
        } else if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr(addr));
        }
        Err(format!(
            "bad listen address `{s}`; expected \":PORT\", \"IP:PORT\" or \"[IPv6]:PORT\""
        ))
    }
}

impl fmt::Display for ListenAddr {
    /// `:PORT` for every IPv4 address, else `IP:PORT` / `[IPv6]:PORT`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
            write!(f, ":{}", self.0.port())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        let ok = |s: &str| split_host_port(s).expect(s);
        assert_eq!(ok("10.0.0.1"), ("10.0.0.1".into(), None));
        assert_eq!(
            ok("node-1.example.com:5000"),
            ("node-1.example.com".into(), Some(5000))
        );
        assert_eq!(ok("[::1]:4809"), ("::1".into(), Some(4809)));
        assert_eq!(ok("[fe80::1]"), ("fe80::1".into(), None));
        assert_eq!(ok("fe80::1"), ("fe80::1".into(), None));
        for bad in [
            "", ":80", "h:0", "h:70000", "h:x", "[::1", "[zz]:1", "[::1]x", "a b", "a:b:c",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn peer_addr_string_uses_default_port_and_brackets() {
        let p = Peer::parse("n", "::1").expect("v6");
        assert_eq!(p.addr_string(4809), "[::1]:4809");
        assert_eq!(p.spec(), "[::1]");
        let q = Peer::parse("n", "h:1").expect("h");
        assert_eq!(
            (q.port_or(9), q.addr_string(9), q.spec()),
            (1, "h:1".into(), "h:1".into())
        );
        assert!(Peer::parse("", "h").is_err());
    }

    #[test]
    fn debug_levels_parse_any_case_with_aliases() {
        assert_eq!("error".parse(), Ok(DebugLevel::Error));
        assert_eq!("Crit".parse(), Ok(DebugLevel::Critical));
        assert_eq!("EMERGENCY".parse(), Ok(DebugLevel::Emerg));
        assert!("LOUD".parse::<DebugLevel>().is_err());
        for (level, name) in DebugLevel::ALL {
            assert_eq!(name.parse(), Ok(level));
        }
        assert_eq!(DebugLevel::Notice.as_tracing_filter(), "info");
        assert_eq!(DebugLevel::Warning.as_tracing_filter(), "warn");
        assert_eq!(DebugLevel::Alert.as_tracing_filter(), "error");
    }

    #[test]
    fn io_backend_parses() {
        assert_eq!("EPOLL".parse(), Ok(IoBackend::Epoll));
        assert_eq!("io_uring".parse(), Ok(IoBackend::Uring));
        assert!("kqueue".parse::<IoBackend>().is_err());
    }

    #[test]
    fn listen_addresses() {
        let p = |s: &str| s.parse::<ListenAddr>().map(|a| a.0.to_string());
        assert_eq!(p(":4809"), Ok("0.0.0.0:4809".into()));
        assert_eq!(p("*:1"), Ok("0.0.0.0:1".into()));
        assert_eq!(p("127.0.0.1:5000"), Ok("127.0.0.1:5000".into()));
        assert_eq!(p("[::1]:5000"), Ok("[::1]:5000".into()));
        for bad in ["4809", ":", ":x", "localhost:1", "1.2.3.4", ":99999"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ListenAddr::any(7).to_string(), ":7");
    }
}
