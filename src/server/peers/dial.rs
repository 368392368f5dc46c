//! The dialler: one task per peer, on the shard the peer is assigned to,
//! that dials while the link is down, every reconnect_interval, from
//! bind_address (or this node's own peer address), within connect_timeout,
//! to the addresses the resolver found (it never looks anything up).

use crate::protocol::{Frame, Hello, Role, PROTOCOL_VERSION};
use crate::server::conn::spawn_with;
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
