//! The mesh (filled in by the cluster work): hooks the server calls.
#![allow(missing_docs, unused_variables)]

use crate::config::ServerSettings;
use crate::protocol::{Frame, GroupName, Hello, MemberId, NodeName, Reason, ErrorCode};
use crate::server::conn::{Conn, Reject};
use crate::server::shard::Shard;
use crate::server::shared::Shared;
use std::rc::Rc;
use std::time::Instant;

#[derive(Debug)]
pub enum ClusterMsg {}

#[derive(Debug, Default)]
pub struct Mesh {}
impl Mesh {
    pub fn new(node: &NodeName, s: &ServerSettings) -> Self {
        Self {}
    }
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!([])
    }
}
#[derive(Debug, Default)]
pub struct ShardLinks {}

pub fn forward(shard: &Shard, sender: &MemberId, group: &GroupName, payload: &[u8]) {}
pub fn forward_direct(shard: &Shard, node: &str, sender: &MemberId, to: &MemberId, payload: &[u8]) {
    crate::stats::ShardStats::add(&shard.stats().dropped_unknown_member, 1);
}
pub fn local_join(shard: &Shard, group: &GroupName, member: &MemberId) {}
pub fn local_leave(shard: &Shard, group: &GroupName, member: &MemberId, reason: Reason) {}
pub fn handle_shard_msg(shard: &Rc<Shard>, m: ClusterMsg) {}
pub fn shutdown_links(shard: &Shard) {}
pub fn sweep(shard: &Shard, now: Instant) {}
pub fn link_closed(shard: &Rc<Shard>, conn: &Rc<Conn>, p: usize) {}
pub fn peer_frame(shard: &Rc<Shard>, conn: &Rc<Conn>, p: usize, frame: Frame) -> Result<(), Reject> {
    Ok(())
}
pub fn accept_peer(shard: &Rc<Shard>, conn: &Rc<Conn>, hello: &Hello) -> Result<(), Reject> {
    Err((ErrorCode::NOT_ALLOWED, "this node has no peers".into()))
}
pub fn reconfigure(shared: &Shared, s: &ServerSettings) {}
pub fn start_shard(shard: &Rc<Shard>) {}
