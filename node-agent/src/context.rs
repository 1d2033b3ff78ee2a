//! What every task of the agent in a cluster shares, built once at startup
//! ([`crate::cluster::startup`]) and handed to each task's `run(ctx, ...)`.

use std::sync::Arc;

use kube::Client;
use tokio::sync::{Mutex, Notify, watch};

use crate::report::queue::Queue;
use crate::served::ServedPolicies;
use crate::telemetry::Telemetry;

/// The agent's context in a cluster.
pub struct Context {
    /// This node's name.
    pub node: String,
    pub client: Client,
    /// Metrics, and the Events on this node's FileIntegrityNode.
    pub telemetry: Telemetry,
    /// The durable queue of reports between the reporter and the deliverer.
    pub queue: Arc<Mutex<Queue>>,
    /// Wakes the deliverer when the reporter queued something.
    pub queued: Notify,
    /// The policies this node serves, as last decided (empty before the first decision).
    pub served: watch::Receiver<ServedPolicies>,
    /// The first transition number the baseline has not saved yet: reports
    /// numbered from it on wait (see [`crate::report::sequence`]).
    pub committed: watch::Receiver<u64>,
}
