//! The cluster's rules, sans-IO: which peers there are and how their links
//! stand (admission: one link per pair), and the bookkeeping of membership
//! across links (snapshots, barriers, what a lost node leaves behind).
//! Events in, decisions and actions out: no sockets, no clocks, no shards.
//! The server's `peers` module drives it over real links.
//!
//! - [`auth`]: peer authentication, the challenge–response over the
//!   cluster key.
//! - [`mesh`]: the peer list, link states, admission, per-peer counters.
//! - [`addrs`]: what the peers' addresses resolve to (looked up off the
//!   shards; reading it never looks anything up).
//! - [`machine`]: per-link membership bookkeeping: the snapshot's phases,
//!   join barriers waiting for `PONG`s, ghosts and heard groups of lost
//!   nodes.
//! - [`leave`]: a node's clean leave: the leaving node's steps, and what
//!   a link's end means (node left or node down).

pub mod addrs;
pub mod auth;
pub mod leave;
pub mod machine;
pub mod mesh;

pub use machine::{Barriers, LinkView, ViewAction};
pub use mesh::Mesh;
