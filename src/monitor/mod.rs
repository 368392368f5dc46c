//! The HTTP monitoring endpoint (`msgc_server.monitor`, `--monitor`):
//! Prometheus `/metrics`, `/healthz`, and JSON views of the stats,
//! connections, groups and peer links.
//!
//! It runs on a thread of its own with a small current-thread tokio
//! runtime and hyper, never on a shard: a scrape costs a shard only the
//! questions put to it through its inbox ([`gather`]), and nothing on the
//! publish path knows the monitor exists (no lock, no atomic, no metric
//! object updated per message: the shards' existing counters are read).
//!
//! | path | answers |
//! | --- | --- |
//! | `/metrics` | every STATS counter and the gauges, Prometheus text format |
//! | `/healthz` | 200 when every shard answers (`?peers=1`: and every peer link is up), else 503 with the reasons |
//! | `/stats` | the STATS document |
//! | `/connz` | connections (`?offset=&limit=&sort=`) |
//! | `/groupz` | groups by member count, or `?group=NAME`'s members; paged (`?offset=&limit=`) |
//! | `/peerz` | peer links |
//!
//! Only `GET` and `HEAD` are served (405 otherwise); an unknown path is
//! 404, a bad query 400, a malformed request 400 (hyper's).

pub mod gather;
pub mod metrics;
pub mod views;

use crate::server::shared::Shared;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use views::{Query, Reply};

/// HTTP connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one HTTP connection (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// A running monitoring endpoint; stopped (and its thread joined) on drop.
pub struct Monitor {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Listens on `addr` and serves `shared`'s figures from a thread of
    /// its own ([`Monitor::bind`] then [`Bound::serve`]).
    ///
    /// # Errors
    /// When `addr` cannot be bound, or the thread or its runtime cannot be
    /// started.
    pub fn start(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<Monitor> {
        Self::bind(addr)?.serve(shared)
    }

    /// Binds `addr` (so that a server can refuse to start when its monitor
    /// address is taken, before it starts anything else).
    ///
    /// # Errors
    /// When `addr` cannot be bound.
    pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Bound(listener))
    }

    /// The address it listens on (the port resolved when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A monitoring endpoint's bound listener, not serving yet.
pub struct Bound(std::net::TcpListener);

impl Bound {
    /// Serves `shared`'s figures from a thread of its own.
    ///
    /// # Errors
    /// When the thread or its runtime cannot be started.
    pub fn serve(self, shared: Arc<Shared>) -> std::io::Result<Monitor> {
        let listener = self.0;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("msgc-monitor".into())
            .spawn(move || rt.block_on(serve(listener, shared, stopped)))?;
        tracing::info!(%addr, "monitoring endpoint listening");
        Ok(Monitor {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "monitoring endpoint: cannot register its listener");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = &mut stopped => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = &mut stopped => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "monitoring endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(error = %e, "monitoring endpoint: connection ended");
            }
        });
    }
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(Reply::error(405, "only GET and HEAD are served"));
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let q = Query::parse(req.uri().query());
    respond(route(shared, req.uri().path(), &q).await)
}

/// The answer to `GET path?q`.
pub async fn route(shared: &Shared, path: &str, q: &Query) -> Reply {
    match path {
        "/" => Reply::text(
            200,
            "msgc monitoring: /metrics /healthz[?peers=1] /stats /connz /groupz[?group=NAME] /peerz\n",
        ),
        "/metrics" => {
            let snap = gather::snapshot(shared).await;
            Reply {
                status: 200,
                content_type: metrics::CONTENT_TYPE,
                body: metrics::render(&snap).into_bytes(),
            }
        }
        "/healthz" => views::healthz(shared, q).await,
        "/stats" => views::stats(shared),
        "/connz" => views::connz(shared, q).await,
        "/groupz" => views::groupz(shared, q),
        "/peerz" => views::peerz(shared),
        _ => Reply::error(404, format!("no such path: {path}")),
    }
}

fn respond(r: Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    resp
}
