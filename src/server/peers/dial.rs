//! The dialler: one task per peer, on the shard the peer is assigned to,
//! that dials while the link is down, every reconnect_interval, from
//! bind_address (or this node's own peer address), within connect_timeout,
//! to the addresses the resolver found (it never looks anything up).

use crate::protocol::{Frame, Hello, Role, PROTOCOL_VERSION};
use crate::server::conn::{spawn_with, Conn};
use crate::server::io::AnyStream;
use crate::server::shard::Shard;
use crate::server::sockets::{dial, SocketOpts};
use std::rc::Rc;

/// Starts the dialler of peer `i` on `shard`.
pub fn spawn(shard: &Rc<Shard>, i: usize) {
    let Some(generation) = shard.shared.cluster.slot(i).map(|p| p.generation) else {
        return;
    };
    tokio::task::spawn_local(dial_loop(shard.clone(), i, generation));
}

async fn dial_loop(shard: Rc<Shard>, i: usize, generation: u64) {
    loop {
        if shard.stopping.get()
            || shard.shared.cluster.departure() >= crate::cluster::leave::Phase::Final
        {
            return;
        }
        let Some(slot) = shard.shared.cluster.slot(i) else {
            return;
        };
        if slot.removed || slot.generation != generation {
            return;
        }
        if slot.state == crate::cluster::mesh::LinkState::Down {
            dial_once(&shard, i, &slot.name, &slot.addr).await;
        }
        tokio::time::sleep(shard.live.get().reconnect_interval).await;
    }
}

async fn dial_once(shard: &Rc<Shard>, i: usize, name: &str, spec: &str) {
    let mesh = &shard.shared.cluster;
    // Looked up by the resolver thread, never here: a shard does not wait
    // for DNS. A name that does not resolve is not dialled (the resolver
    // logs it).
    let addrs = mesh.addrs.addrs(i);
    if addrs.is_empty() {
        tracing::debug!(
            peer = name,
            addr = spec,
            "peer address not resolved: not dialled"
        );
        return;
    }
    if !mesh.begin_dial(i, shard.index, 0) {
        return;
    }
    let live = shard.live.get();
    let opts = SocketOpts {
        tcpbuf_size: live.tcpbuf_size,
    };
    // Every address the name has, in order, until one answers.
    let mut connected = None;
    for addr in addrs {
        // This node's own peer address is the source only for its family.
        let own = mesh.own_ip().filter(|ip| ip.is_ipv4() == addr.is_ipv4());
        let from = live.bind_address.or(own);
        match dial(addr, from, opts, live.connect_timeout).await {
            Ok(s) => {
                connected = Some((s, addr));
                break;
            }
            Err(e) => {
                tracing::debug!(peer = name, %addr, error = %e, "dial failed; retrying after reconnect_interval");
            }
        }
    }
    let Some((std, addr)) = connected else {
        mesh.dial_failed(i, shard.index);
        return;
    };
    let stream = match AnyStream::from_std(std, shard.uring) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = name, error = %e, "cannot register dialled socket");
            mesh.dial_failed(i, shard.index);
            return;
        }
    };
    let tls = match tls_session(shard, name, spec) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::warn!(peer = name, error = %e, "cannot start a TLS session");
            mesh.dial_failed(i, shard.index);
            return;
        }
    };
    let peer = name.to_owned();
    spawn_with(shard.clone(), stream, addr, tls, move |shard, conn| {
        conn.become_peer(i, &shard.live.get());
        if !shard
            .shared
            .cluster
            .dial_connected(i, shard.index, conn.seq)
        {
            conn.close_gracefully(None, shard.live.get().idle_timeout);
            return;
        }
        let hello = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Peer,
            name: Some(shard.shared.node.clone()),
            credentials: super::auth::dial_credentials(shard, conn, &peer),
            features: crate::protocol::features::ALL,
            max_message_size: u32::try_from(shard.live.get().max_message_size).unwrap_or(u32::MAX),
        };
        shard.push(conn, Frame::Hello(hello).to_bytes());
    });
}

/// A TLS session for a link to the peer at `spec` (`host` or `host:port`),
/// when TLS is on: its certificate must carry that host (a name or an IP
/// address) and be signed by `tls_ca`.
fn tls_session(
    shard: &Shard,
    name: &str,
    spec: &str,
) -> Result<Option<rustls::Connection>, String> {
    let Some(dial) = shard.shared.tls.as_ref().and_then(|t| t.dial.clone()) else {
        return Ok(None);
    };
    let (host, _) = crate::config::split_host_port(spec)?;
    let server = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| format!("peer {name}: {spec:?} is not a TLS server name: {e}"))?;
    let session = rustls::ClientConnection::new(dial, server).map_err(|e| e.to_string())?;
    Ok(Some(session.into()))
}

/// Peer `i`'s connection `conn` ended with read error `e`. A dial of ours
/// that fails in its TLS handshake (a certificate refused, by us or by the
/// peer) would leave the link down with nothing said: the reason becomes
/// the peer's `link_error` (STATS, `/peerz`), and is logged for operators
/// when it is news.
pub fn read_failed(shard: &Shard, i: usize, conn: &Conn, e: &std::io::Error) {
    if e.kind() != std::io::ErrorKind::InvalidData {
        return;
    }
    let mesh = &shard.shared.cluster;
    if mesh.dial_refused(i, shard.index, conn.seq, error_kind(e), format!("TLS: {e}")) {
        let name = mesh.slot(i).map(|p| p.name).unwrap_or_default();
        tracing::warn!(
            target: crate::logging::OPS,
            peer = name,
            addr = %conn.addr,
            error = %e,
            "peer link not up: its TLS handshake failed (dialled again every reconnect_interval)"
        );
    }
}

/// What kind of error `e` is, without what changes from one occurrence
/// to the next (a certificate's expiry is told with the time it was
/// checked at): the variant of the TLS error inside, as rustls names it
/// (`InvalidCertificate(Expired…`), or the error's text otherwise.
fn error_kind(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    let full = format!("{tls:?}");
    // The variants' names, up to their first field of data.
    let end = full.find([' ', '{', '"']).unwrap_or(full.len());
    full[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::error_kind;

    /// Two expiries checked at different times are one kind of error; a
    /// name mismatch is another.
    #[test]
    fn tls_errors_are_told_apart_by_kind_not_by_figures() {
        use rustls::pki_types::UnixTime;
        use rustls::{CertificateError, Error};
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let expired = |secs| {
            io(Error::InvalidCertificate(
                CertificateError::ExpiredContext {
                    time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
                    not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(10)),
                },
            ))
        };
        assert_ne!(expired(100).to_string(), expired(105).to_string());
        assert_eq!(error_kind(&expired(100)), error_kind(&expired(105)));
        assert_eq!(
            error_kind(&expired(100)),
            "InvalidCertificate(ExpiredContext"
        );
        let name = io(Error::InvalidCertificate(CertificateError::NotValidForName));
        assert_ne!(error_kind(&name), error_kind(&expired(100)));
        let plain = std::io::Error::other("reset");
        assert_eq!(error_kind(&plain), "reset");
    }
}
