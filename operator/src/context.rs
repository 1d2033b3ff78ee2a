//! What the operator's reconcilers and its retention share: one [`Context`],
//! one [`Error`] type, and [`publish`] for the Events they write on a policy.
//! Everything else imports this module; it imports none of theirs but the
//! caches it holds.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Event, Recorder};
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::WriterDropped;
use kube::{Client, Resource, ResourceExt};
use kube_fim_crds::{FileIntegrityNode, FileIntegrityPolicy, Fingerprint};
use thiserror::Error;
use tokio::sync::watch;
use tracing::warn;

use crate::changes::Changes;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::triggers::Pending;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "kube-fim-operator";

/// What can go wrong while reconciling.
#[derive(Debug, Error)]
pub enum Error {
    #[error("listing FileChanges of policy {policy}: {source}")]
    ListChanges { policy: String, source: kube::Error },
    #[error("writing status of policy {policy}: {source}")]
    WriteStatus { policy: String, source: kube::Error },
    #[error("serializing status: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("updating the agent DaemonSet: {0}")]
    DaemonSet(#[source] kube::Error),
    #[error("deleting the FileIntegrityNode of deleted node {node}: {source}")]
    DeleteRecord { node: String, source: kube::Error },
    #[error("the {0} watch stopped")]
    WatchStopped(&'static str),
    #[error("updating the evidence finalizer of policy {policy}: {source}")]
    Finalizer { policy: String, source: kube::Error },
}

impl Error {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Error::ListChanges { .. } => "list_changes",
            Error::WriteStatus { .. } => "write_status",
            Error::Serialize(_) => "serialize",
            Error::DaemonSet(_) => "daemonset",
            Error::DeleteRecord { .. } => "delete_record",
            Error::WatchStopped(_) => "watch",
            Error::Finalizer { .. } => "finalizer",
        }
    }
}

/// Everything the reconcilers share.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub policies: Store<FileIntegrityPolicy>,
    pub nodes: Store<Node>,
    pub records: Store<FileIntegrityNode>,
    /// What the policies' status and retention need of each FileChange.
    pub changes: Changes,
    /// What the watches woke during the current batch window.
    pending: Mutex<Pending>,
    /// Policies the fleet saw last, to drop the metrics of deleted ones.
    pub(crate) known_policies: Mutex<HashSet<String>>,
    /// The fingerprints the sinks ask the agents for, `None` until the sinks
    /// are listed ([`crate::export::fingerprints`]).
    pub fingerprints: watch::Receiver<Option<Vec<Fingerprint>>>,
}

impl Context {
    /// A context over the given caches, with no change known and nothing pending.
    pub fn new(
        client: Client,
        config: Config,
        metrics: Metrics,
        recorder: Recorder,
        policies: Store<FileIntegrityPolicy>,
        nodes: Store<Node>,
        records: Store<FileIntegrityNode>,
    ) -> Context {
        Context {
            client,
            config,
            metrics,
            recorder,
            policies,
            nodes,
            records,
            changes: Changes::default(),
            pending: Mutex::default(),
            known_policies: Mutex::default(),
            fingerprints: watch::channel(Some(Vec::new())).1,
        }
    }

    /// The same, the agents' fingerprints following `fingerprints`.
    pub fn with_fingerprints(
        mut self,
        fingerprints: watch::Receiver<Option<Vec<Fingerprint>>>,
    ) -> Context {
        self.fingerprints = fingerprints;
        self
    }

    pub(crate) fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Publishes one Event on `policy`.
pub async fn publish(policy: &FileIntegrityPolicy, ctx: &Context, event: Event) {
    if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(policy = %policy.name_any(), reason = %event.reason, %error, "could not publish event");
    }
}

/// Waits until `store` holds its first list (`Err` if its watch is gone).
///
/// kube-runtime's `Store::wait_until_ready` keeps one waker: of several tasks
/// waiting on the same store at once (the chain verifier, retention, the
/// fleet and policy reconcilers), only the last to poll is woken when the
/// list arrives, and the others would wait for good. So each task asks again
/// every second instead of trusting the wake-up.
pub async fn store_ready<K>(store: &Store<K>) -> Result<(), WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(ready) =
            tokio::time::timeout(std::time::Duration::from_secs(1), store.wait_until_ready()).await
        {
            return ready;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};
    use std::time::Duration;

    /// Three tasks wait for one store at once (as the chain verifier, the
    /// fleet reconciler and retention do at start): every one of them goes on
    /// once the store is listed. With kube-runtime's `wait_until_ready` alone,
    /// only the last to wait is woken.
    #[tokio::test]
    async fn every_task_waiting_for_a_store_goes_on_once_it_is_listed() {
        let (store, mut writer) = reflector::store::<Node>();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store_ready(&store).await.is_ok() })
            })
            .collect();
        // Every waiter polled (and registered its waker) before the list.
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        for w in waiters {
            let done = tokio::time::timeout(Duration::from_secs(5), w).await;
            assert!(
                matches!(done, Ok(Ok(true))),
                "a task waiting for the store was never woken"
            );
        }
    }
}
