//! msgc-loadgen scenarios against spawned servers.
