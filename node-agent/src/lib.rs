//! kube-fim node agent: resolves the policies' paths inside the host root,
//! hashes and records them in a crash-safe baseline, detects changes at start,
//! in real time and by periodic scans, and (in a cluster) reports them as
//! FileChange objects and Events through a durable queue.

pub mod attribution;
pub mod baseline;
pub mod budget;
pub mod cluster;
pub mod containers;
pub mod context;
pub mod engine;
#[cfg(test)]
mod fixtures;
pub mod hostfs;
pub mod monitor;
pub mod mounts;
pub mod packages;
pub mod paths;
pub mod plan;
pub mod report;
pub mod served;
pub(crate) mod sys;
pub mod telemetry;
