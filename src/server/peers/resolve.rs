//! The resolver: a thread of its own that looks up the peers given by
//! host name, so that no shard ever blocks on DNS. The shards read what
//! it found ([`crate::cluster::addrs`]) to dial and to admit links.
//!
//! A name is looked up as soon as the peer is configured (start-up or a
//! reload), then again every `reconnect_interval` while its link is not
//! up (a peer that moved is found at its new address). A name that does
//! not resolve is logged once per new error, at every `debug_level`;
//! its link stays down, neither dialled nor admitted, and other links are
//! not held up by it. Lookups run one after the other on this thread: a
//! slow DNS server delays the other names, never a shard.

use crate::server::shared::Shared;
use std::net::ToSocketAddrs;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the server tells its resolver thread.
#[derive(Debug, Default)]
struct Signal {
    /// Look up now (the peers changed).
    poke: bool,
    /// The server is stopping.
    stop: bool,
}

/// The resolver thread's handle: [`Resolver::wake`] after the peers
/// changed; dropping it stops the thread (not waited for: a lookup in
/// progress may take the resolver library's timeout).
#[derive(Debug)]
pub struct Resolver {
    signal: Arc<(Mutex<Signal>, Condvar)>,
}

impl Resolver {
    /// Starts the thread, which looks up every host name at once.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(shared: Arc<Shared>) -> std::io::Result<Self> {
        let signal = Arc::new((Mutex::new(Signal::default()), Condvar::new()));
        let theirs = signal.clone();
        std::thread::Builder::new()
            .name("msgc-resolve".into())
            .spawn(move || run(&shared, &theirs))?;
        Ok(Self { signal })
    }

    /// Looks up the names due now (call after the peers changed).
    pub fn wake(&self) {
        self.tell(|s| s.poke = true);
    }

    fn tell(&self, f: impl FnOnce(&mut Signal)) {
        let (m, cv) = &*self.signal;
        f(&mut m.lock().unwrap_or_else(|p| p.into_inner()));
        cv.notify_one();
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.tell(|s| s.stop = true);
    }
}

fn run(shared: &Shared, signal: &(Mutex<Signal>, Condvar)) {
    loop {
        for (i, name, spec) in shared.cluster.address_lookups() {
            if stopping(signal) {
                return;
            }
            let result = lookup(&spec);
            if let Some(news) = shared.cluster.addrs.record(i, &spec, result) {
                report(&name, &spec, news);
            }
        }
        let interval = shared
            .live
            .lock()
            .map_or(Duration::from_secs(5), |l| l.reconnect_interval);
        if !wait(signal, interval) {
            return;
        }
    }
}

/// Waits up to `interval` or until woken; false when the server stops.
fn wait(signal: &(Mutex<Signal>, Condvar), interval: Duration) -> bool {
    let (m, cv) = signal;
    let guard = m.lock().unwrap_or_else(|p| p.into_inner());
    let (mut s, _) = cv
        .wait_timeout_while(guard, interval, |s| !s.poke && !s.stop)
        .unwrap_or_else(|p| p.into_inner());
    s.poke = false;
    !s.stop
}

fn stopping(signal: &(Mutex<Signal>, Condvar)) -> bool {
    signal.0.lock().map_or(true, |s| s.stop)
}

/// Looks up `spec` (`host:port`): its addresses, or why not.
fn lookup(spec: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    spec.to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| e.to_string())
}

fn report(name: &str, spec: &str, news: crate::cluster::addrs::Lookup) {
    use crate::cluster::addrs::Lookup;
    match news {
        Lookup::Failed { error, kept: false } => tracing::warn!(
            target: crate::logging::OPS,
            peer = name,
            addr = spec,
            %error,
            "cannot resolve the peer's address: its link stays down (looked up again every reconnect_interval)"
        ),
        Lookup::Failed { error, kept: true } => tracing::warn!(
            target: crate::logging::OPS,
            peer = name,
            addr = spec,
            %error,
            "cannot resolve the peer's address again: the addresses it had stay in force"
        ),
        Lookup::Resolved { addrs, recovered } => {
            if recovered {
                tracing::info!(target: crate::logging::OPS, peer = name, addr = spec, resolved = ?addrs, "peer address resolves again");
            } else {
                tracing::info!(peer = name, addr = spec, resolved = ?addrs, "peer address resolved");
            }
        }
    }
}
