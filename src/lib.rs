//! msgc: Message Systems Group Communication, re-implemented as an
//! io_uring, per-core-sharded multicast router.
#![warn(missing_docs)]

pub mod client;
pub mod cluster;
pub mod config;
pub mod protocol;
pub mod router;
pub mod server;
pub mod stats;
