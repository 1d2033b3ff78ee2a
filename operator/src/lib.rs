//! kube-fim operator: turns `FileIntegrityPolicy` objects into one agent
//! DaemonSet covering the union of their nodes, aggregates the agents' per-node
//! reports into each policy's status, publishes Events, enforces FileChange
//! retention, ships the FileChanges to the sinks (`FileChangeSink`) and exports
//! Prometheus metrics.

pub mod chain;
pub mod changes;
pub mod config;
pub mod context;
pub mod controller;
pub mod daemonset;
pub mod evidence;
pub mod export;
#[cfg(test)]
mod fixtures;
pub mod fleet;
pub mod flood;
pub mod metrics;
pub mod noderecord;
pub mod retention;
pub mod rollouts;
pub mod seen;
pub mod selfcheck;
pub mod server;
pub mod status;
pub mod storm;
pub mod triggers;
