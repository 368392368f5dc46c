//! The integration suite: real servers on loopback, real clients.

mod access;
mod cli;
mod client;
mod cluster;
mod flow;
mod flowkit;
mod honest;
mod loadgen;
mod memory;
mod monitor;
mod ops;
mod roll;
mod server;
mod util;
