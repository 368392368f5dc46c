//! msgc: Message Systems Group Communication (Momentum's `msgc_server`,
//! `msgcserver_listener` and `msgc_client`), re-implemented as an io_uring,
//! per-core-sharded multicast router.
//!
//! # Layout
//!
//! Dependencies point one way: [`protocol`] and [`config`] (sans-IO: bytes
//! and values in, values out) → [`router`] → [`cluster`] (sans-IO: the
//! mesh's rules) → [`server`] (sockets, shards, and the peer links that
//! drive the cluster's rules) → [`monitor`] (the HTTP endpoint, reading
//! the server's state from a thread of its own) → the binaries. No module
//! imports one to its right. The [`client`] uses only [`protocol`] and [`config`].
//! [`tls`] (PEM files → rustls configurations) names no other module; the
//! config checks its files with it, the server and the client use it.
//!
//! | module | owns |
//! | --- | --- |
//! | [`protocol`] | frames, validated names, the codec (PROTOCOL.md is its spec) |
//! | [`config`] | Momentum syntax: lexer, parser with spans and includes, typed settings |
//! | [`router`] | the shared group table: lock-free reads, per-group locking for changes |
//! | [`cluster`] | the mesh's rules, sans-IO: admission, link states, the order of a link's membership stream, join barriers, what a lost node leaves behind |
//! | [`server`] | shards, sockets, I/O backends (and TLS over either: `server::tls`), connections, outbound queues; `server::peers`: links, dialling, snapshots, forwarding; `server::auth`: client logins (checked off the shards) and permissions |
//! | [`monitor`] | the HTTP monitoring endpoint: Prometheus metrics, health, JSON views |
//! | [`client`] | the async client library |
//! | [`stats`] | per-shard counters and drops by reason |
//! | [`tls`] | PEM files → rustls configurations (`server::tls` runs rustls over either I/O backend) |
//!
//! # Data flow of a publish
//!
//! ```text
//! socket ─read─▶ Connection (on its shard) ─decode─▶ Shard::publish
//!                                              │
//!        group table (papaya, lock-free): group ─▶ {shards with members, nodes with members}
//!                                              │
//!             ┌────────────────────────────────┼──────────────────────────────┐
//!    members on this shard          one inbox message per read per  one FORWARD per
//!    (shard-local member list)      other shard with members        node with members
//!             └──────────────▶ each member's outbound queue ◀────────────────┘
//!                                              │
//!     writer: everything due (≤ 256 KiB, ≤ 1,024 frames) per writev, one batch a turn
//! ```
//!
//! The publish is numbered (per sender and group, `server::seqs`), and the
//! DELIVER frame is encoded once per publish (DELIVER_SEQ when members
//! asked for numbers; a shard whose members want both forms builds the
//! other once), the FORWARD_SEQ frame once for all peers, into refcounted
//! buffers; every recipient's queue holds a reference.
//!
//! # Flow control
//!
//! Everything queued is charged to its *producer*, the connection whose
//! input made it (`server::shard::Shard::producing`). A queue or shard
//! inbox that is full closes its producers' gates (`server::flow::Gate`):
//! their sockets are not read until it has drained to half, and TCP slows
//! the publishers. A reader whose socket accepts nothing for
//! `stuck_timeout` while its queue is full is stuck and closed, which lets
//! its producers go. `server::flow` holds the rule, sans-IO.
#![warn(missing_docs)]

pub mod client;
pub mod cluster;
pub mod config;
pub mod logging;
pub mod monitor;
pub mod protocol;
pub mod router;
pub mod server;
pub mod stats;
pub mod tls;
