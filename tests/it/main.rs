//! The integration suite: real servers on loopback, real clients.

mod access;
mod auth;
mod cli;
mod client;
mod cluster;
mod drops;
mod flow;
mod flowkit;
mod honest;
mod loadgen;
mod memory;
mod monitor;
mod ops;
mod peer_names;
mod reload;
mod roll;
mod server;
mod tls;
mod util;
