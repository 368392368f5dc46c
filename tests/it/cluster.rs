//! Cluster behaviour.
