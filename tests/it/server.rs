//! Single-node server behaviour.
