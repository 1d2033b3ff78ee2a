//! What every task of the agent in a cluster shares, built once at startup
//! ([`crate::cluster::startup`]) and handed to each task's `run(ctx, ...)`.

use std::sync::Arc;

use kube::Client;
use tokio::sync::{Mutex, Notify, watch};

use crate::report::queue::Queue;
use crate::served::ServedPolicies;
use crate::telemetry::Telemetry;

/// How long the agent waits for the answer to one request (not a watch).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The agent's API clients: one for watches, one whose requests time out.
/// kube's client has no read timeout by default: a response that never
/// comes would stall the task waiting for it (the deliverer, the heartbeat)
/// for good.
pub fn clients(config: kube::Config) -> Result<(Client, Client), kube::Error> {
    let watches = Client::try_from(config.clone())?;
    let mut requests = config;
    requests.read_timeout = Some(REQUEST_TIMEOUT);
    requests.reset_reader_on_write = true;
    Ok((Client::try_from(requests)?, watches))
}

/// The agent's context in a cluster.
pub struct Context {
    /// This node's name.
    pub node: String,
    /// Requests (creates, patches, gets, lists): each answered within
    /// [`REQUEST_TIMEOUT`] or failed and retried, never waited on for good.
    pub client: Client,
    /// Watches: long-lived responses, guarded by the watcher's idle timeout.
    pub watches: Client,
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
    /// SHA-256 beside BLAKE3 for changed files, when a sink asked for it
    /// (`--fingerprints=sha256`).
    pub fingerprints: Option<crate::report::fingerprint::Fingerprints>,
}
