//! The integration suite: real servers on loopback, real clients.

mod cli;
mod client;
mod cluster;
mod server;
mod util;
mod loadgen;
