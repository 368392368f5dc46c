//! Socket options, applied in one place through socket2: listeners that
//! every shard binds on the same address (SO_REUSEPORT), `tcpbuf_size`,
//! TCP_NODELAY, and dialling from `bind_address` within `connect_timeout`.
//!
//! `tcpbuf_size` sets SO_SNDBUF: the kernel's share of what a slow reader
//! holds, in front of msgc's own counted and bounded queue (and the pace
//! at which a blocked write completes, which `stuck_timeout` is measured
//! against). On the receive side it is a floor under the kernel's
//! autotuning: SO_RCVBUF is set only when autotuning could not reach
//! `tcpbuf_size` (`net.ipv4.tcp_rmem`'s maximum is below it). Setting
//! SO_RCVBUF turns receive autotuning off, and a fixed receive buffer was
//! measured to make senders face zero windows and wait for TCP's 200 ms
//! persist timer (tuning.md, `tcpbuf_size`). Linux doubles the value
//! given, and caps it at `net.core.wmem_max`/`rmem_max`;
//! `tcpbuf_size = 0` leaves both sides to the kernel.

use crate::config::{autotuned_receive_max, fixed_receive};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

/// Options for sockets the server makes or accepts.
#[derive(Debug, Clone, Copy)]
pub struct SocketOpts {
    /// SO_SNDBUF in bytes, and the floor of SO_RCVBUF (see the module's
    /// doc); 0 leaves both to the kernel.
    pub tcpbuf_size: usize,
}

impl SocketOpts {
    /// Applies the options to a socket.
    ///
    /// # Errors
    /// When the kernel refuses an option.
    pub fn apply(&self, sock: &SockRef<'_>) -> io::Result<()> {
        if self.tcpbuf_size > 0 {
            sock.set_send_buffer_size(self.tcpbuf_size)?;
            if fixed_receive(self.tcpbuf_size, autotuned_receive_max()) {
                sock.set_recv_buffer_size(self.tcpbuf_size)?;
            }
        }
        sock.set_tcp_nodelay(true)
    }

    /// Applies the options to a descriptor owned by the caller.
    ///
    /// # Errors
    /// When the kernel refuses an option.
    pub fn apply_fd(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: the caller owns `fd` and keeps it open during this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.apply(&SockRef::from(&fd))
    }
}

/// Binds a listening socket that other shards may bind too (SO_REUSEPORT):
/// the kernel spreads incoming connections over them.
///
/// # Errors
/// When the address cannot be bound (in use, not local, no permission).
pub fn listener(addr: SocketAddr, opts: SocketOpts) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Accepted sockets inherit buffer sizes from the listener; setting them
    // before listen() also lets the window scale be chosen for them.
    opts.apply(&SockRef::from(&sock))?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Fails (EADDRINUSE) when a socket already listens on `addr`.
///
/// The shards' listeners share their port through SO_REUSEPORT, and the
/// kernel lets any later socket of the same user that sets it join the
/// group: a second server started on a port in use would start fine and
/// take part of the first one's connections. A probe bound with
/// SO_REUSEADDR but without SO_REUSEPORT conflicts with any listener on the
/// address (and not with the TIME_WAIT leftovers of a previous run).
///
/// # Errors
/// When the address is in use (or cannot be bound at all).
pub fn check_not_listening(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())
}

/// How often [`wait_until_free`] probes a port in use.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// Waits (at most `limit`) until nothing listens on `addr`, probing with
/// [`check_not_listening`]; says once in the log that it waits and once
/// how long it took.
///
/// Why: a process killed with SIGKILL leaves its listeners behind for a
/// while when io_uring owns them (the kernel tears the ring down, and
/// closes what it holds, after the process is gone). A supervisor that
/// restarts the server at once finds the port in use. Binding with
/// SO_REUSEPORT right away would succeed (same user) and share the port
/// with the dead process's listeners, whose backlog nobody accepts from:
/// some clients' connections would be reset. So the probe, without
/// SO_REUSEPORT, must pass first; a dead process's listeners never come
/// back once gone, so the binds that follow share the port only with our
/// own shards.
///
/// # Errors
/// The probe's error (EADDRINUSE still after `limit`, or anything else at
/// once: not a local address, no permission).
pub fn wait_until_free(addr: SocketAddr, limit: Duration) -> io::Result<()> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match check_not_listening(addr) {
            Ok(()) => {
                if said {
                    tracing::warn!(target: crate::logging::OPS, %addr,
                        "the port is free after {:.3}s; listening", start.elapsed().as_secs_f64());
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && start.elapsed() < limit => {
                if !said {
                    tracing::warn!(target: crate::logging::OPS, %addr, ?limit,
                        "address in use (by the lingering sockets of a process that just exited, or by another server); waiting for it");
                    said = true;
                }
                std::thread::sleep(PROBE_EVERY.min(limit.saturating_sub(start.elapsed())));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && said => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                    "address still in use after waiting {limit:?} (another server running there?)"
                ),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Dials `addr` from `bind` (when given), bounded by `timeout`, and returns
/// a connected blocking-mode std stream with the options applied.
///
/// # Errors
/// Connection refused, unreachable, timed out, or a bad bind address.
pub async fn dial(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    opts: SocketOpts,
    timeout: Duration,
) -> io::Result<std::net::TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    opts.apply(&SockRef::from(&sock))?;
    if let Some(ip) = bind {
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    sock.set_nonblocking(true)?;
    let std: std::net::TcpStream = sock.into();
    let tokio_sock = tokio::net::TcpSocket::from_std_stream(std);
    let stream = tokio::time::timeout(timeout, tokio_sock.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect_timeout passed"))??;
    let std = stream.into_std()?;
    std.set_nonblocking(false)?;
    Ok(std)
}

/// Bytes received on socket `fd` and not yet read (FIONREAD); 0 on error.
pub fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a valid pointer; a bad or
    // closed descriptor makes ioctl fail, which reads as 0.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// True when `ip` is an address of this machine: a loopback address, or
/// one of its interfaces' addresses. (Not "a socket can bind to it": with
/// `net.ipv4.ip_nonlocal_bind` every address can be bound.)
pub fn is_local_ip(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || (!ip.is_unspecified() && interface_addrs().contains(&ip))
}

/// The addresses of this machine's interfaces (`getifaddrs`); empty when
/// they cannot be read.
fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points at a socket address whose family
            // tells its type (sockaddr_in for AF_INET, sockaddr_in6 for
            // AF_INET6).
            unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sa.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{autotuned_receive_max, fixed_receive};

    #[test]
    fn local_addresses_are_loopback_and_the_interfaces_own() {
        for ip in ["127.0.0.1", "127.0.0.3", "::1", "::ffff:127.0.0.2"] {
            assert!(is_local_ip(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["0.0.0.0", "::", "203.0.113.77"] {
            assert!(!is_local_ip(ip.parse().expect("ip")), "{ip}");
        }
        // Every interface address counts, and only those (read back from
        // the kernel's own list).
        let own = interface_addrs();
        assert!(!own.is_empty(), "getifaddrs lists at least loopback");
        for ip in own {
            assert!(is_local_ip(ip), "{ip}");
        }
    }

    #[test]
    fn the_receive_buffer_is_set_only_above_what_autotuning_reaches() {
        // (tcpbuf_size, autotuning's maximum, set SO_RCVBUF?)
        let table = [
            (131_072, 6_291_456, false), // the default under Linux's defaults
            (131_072, 33_554_432, false),
            (8 << 20, 6_291_456, true), // more than autotuning would give
            (131_072, 0, true),         // unknown maximum: as asked
            (0, 0, false),              // 0: the kernel's, always
            (0, 6_291_456, false),
        ];
        for (size, max, want) in table {
            assert_eq!(
                fixed_receive(size, max),
                want,
                "tcpbuf_size {size}, max {max}"
            );
        }
    }

    fn buffers(sock: &Socket) -> (usize, usize) {
        (
            sock.send_buffer_size().expect("SO_SNDBUF"),
            sock.recv_buffer_size().expect("SO_RCVBUF"),
        )
    }

    #[test]
    fn tcpbuf_size_sets_the_send_buffer_and_leaves_receive_autotuning() {
        let max = autotuned_receive_max();
        assert!(max > 0, "net.ipv4.tcp_rmem is readable on Linux");
        let size = 65_536;
        assert!(size < max, "this kernel's autotuning reaches {size}");
        let fresh = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let (_, kernel_rcv) = buffers(&fresh);
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        SocketOpts { tcpbuf_size: size }
            .apply(&SockRef::from(&sock))
            .expect("options");
        let (snd, rcv) = buffers(&sock);
        assert_eq!(snd, 2 * size, "SO_SNDBUF set (Linux doubles it)");
        assert_eq!(rcv, kernel_rcv, "SO_RCVBUF left to autotuning");
    }
}
