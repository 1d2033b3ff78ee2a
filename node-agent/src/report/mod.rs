//! The reporting path: from a detected difference to a stored FileChange and
//! its Event, exactly once per transition. Everything that decides whether a
//! change reaches the API server lives here.
//!
//! # The exactly-once protocol
//!
//! 1. **Detect.** The engine compares a path's state with the approved
//!    baseline. A difference whose state digest the baseline has not marked
//!    reported becomes a [`FileChangeSpec`] (nothing is marked yet).
//! 2. **Hand over.** The monitoring loop passes the batch to the reporter with
//!    [`hand_over`] and waits for its answer.
//! 3. **Queue.** The reporter caps storms ([`storm`]), builds each object
//!    with a deterministic name ([`object`]) and writes it to the durable queue
//!    on the node ([`queue`], fsync + rename). Only then does it answer. A
//!    write that fails (a full disk) is retried until it succeeds, with
//!    `kube_fim_agent_queue_write_failing` at 1 meanwhile: detection waits,
//!    nothing is dropped.
//! 4. **Mark.** Only after the answer does the loop mark the differences
//!    reported in the baseline and save it; the digest of every baseline
//!    written is journaled before it replaces the old one
//!    ([`crate::baseline`]), so a restart tells its own unpublished states
//!    from an edit made by someone else.
//! 5. **Deliver.** The deliverer ([`deliver`]) creates the FileChange, counts
//!    it in an Event series ([`series`]), and removes the report from the queue only once the API server
//!    stored it (created, or AlreadyExists). A report the API server refuses
//!    as invalid is shortened ([`object::shorten`]) and sent again, never
//!    dropped.
//!
//! A crash between any two steps is safe: before 3, the difference is not
//! marked and is detected again at restart (source `Startup`); between 3 and
//! 4 or 5 and its acknowledgement, the same transition yields the same object
//! name, and AlreadyExists makes the second create a no-op. A name covers the
//! node, policy, entry, path, category, before/after states and the path's
//! epoch (bumped each time the path returns to or is approved into its
//! baseline), so a retry is deduplicated while a recurrence after an approval
//! is a FileChange of its own.

pub mod deliver;
pub mod object;
pub mod queue;
pub mod series;
pub mod storm;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use kube_fim_crds::{FileChangeSpec, FileIntegrityPolicy};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tracing::warn;

use crate::engine::Outcome;
use crate::metrics::AgentMetrics;
use queue::Queue;
use storm::{StormGuard, Verdict};

/// A detected change and the epoch of its path (part of its object's name).
#[derive(Clone, Debug, PartialEq)]
pub struct Detected {
    pub spec: FileChangeSpec,
    pub epoch: u64,
}

/// Changes to report; the monitoring loop marks them reported in the baseline
/// only after the receiver answers on the oneshot (step 3: queued on disk).
pub type Batch = (Vec<Detected>, oneshot::Sender<()>);

/// The changes of a scan outcome, each with its path's epoch.
pub fn detected(outcome: &mut Outcome) -> Vec<Detected> {
    let epochs = std::mem::take(&mut outcome.epochs);
    std::mem::take(&mut outcome.changes)
        .into_iter()
        .map(|spec| Detected {
            epoch: epochs.get(&spec.path).copied().unwrap_or(0),
            spec,
        })
        .collect()
}

/// Step 2: hands changes over and waits until the receiver has them safe.
/// `false` when the receiver is gone (shutting down): mark nothing then.
pub async fn hand_over(out: &mpsc::Sender<Batch>, changes: Vec<Detected>) -> bool {
    if changes.is_empty() {
        return true;
    }
    let (tx, rx) = oneshot::channel();
    if out.send((changes, tx)).await.is_err() {
        return false;
    }
    rx.await.is_ok()
}

/// Step 3: caps storms and queues every change durably, then answers.
pub async fn reporter(
    mut batches: mpsc::Receiver<Batch>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    policies: Store<FileIntegrityPolicy>,
    metrics: AgentMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut storms = StormGuard::default();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let summaries = |specs: Vec<FileChangeSpec>| {
            specs
                .into_iter()
                .map(|spec| Detected { spec, epoch: 0 })
                .collect::<Vec<_>>()
        };
        let (changes, done): (Vec<Detected>, Option<oneshot::Sender<()>>) = tokio::select! {
            () = &mut shutdown => (summaries(storms.drain(Timestamp::now())), None),
            b = batches.recv() => match b {
                Some((c, d)) => (c, Some(d)),
                None => (summaries(storms.drain(Timestamp::now())), None),
            },
            _ = tick.tick() => (summaries(storms.due(Timestamp::now())), None),
        };
        let finishing = done.is_none() && batches.is_closed();
        let now = Timestamp::now();
        // One look at the policy cache per batch, not per change (storms).
        let served: BTreeMap<String, Arc<FileIntegrityPolicy>> = if changes.is_empty() {
            BTreeMap::new()
        } else {
            policies
                .state()
                .into_iter()
                .map(|p| (p.name_any(), p))
                .collect()
        };
        for Detected {
            spec: change,
            epoch,
        } in changes
        {
            let policy = served.get(&change.policy);
            let cap = policy
                .as_ref()
                .map(|p| p.spec.max_changes_per_node_per_minute)
                .unwrap_or(100);
            let room = queue.lock().await.has_room();
            let verdict = if change.summary.is_some() {
                Verdict::Report
            } else if !room {
                // Never drop: a full queue folds into the summary.
                storms.admit(&change, 0, now)
            } else {
                storms.admit(&change, cap, now)
            };
            match verdict {
                Verdict::Folded { first_in_window } => {
                    if first_in_window {
                        metrics
                            .cluster
                            .change_storms
                            .with_label_values(&[change.policy.as_str()])
                            .inc();
                        warn!(policy = %change.policy, cap, "change storm: summarising this minute's further changes");
                    }
                }
                Verdict::Report => {
                    // No owner reference: evidence is not garbage-collected
                    // with its policy (see the policy's `evidence` field).
                    let object = object::to_object(change, epoch);
                    push_durably(&queue, &object, &metrics).await;
                }
            }
        }
        metrics
            .cluster
            .reports_queued
            .set(queue.lock().await.len() as i64);
        wake.notify_one();
        if let Some(done) = done {
            let _ = done.send(());
        }
        if finishing {
            return;
        }
    }
}

/// Writes one report to the queue, retrying until the disk takes it.
async fn push_durably(
    queue: &Mutex<Queue>,
    object: &kube_fim_crds::FileChange,
    metrics: &AgentMetrics,
) {
    let mut failures = 0u32;
    loop {
        let result = queue.lock().await.push(object);
        match result {
            Ok(_) => {
                metrics.cluster.queue_write_failing.set(0);
                return;
            }
            Err(error) => {
                failures += 1;
                metrics.cluster.queue_write_failing.set(1);
                let wait = deliver::backoff(failures.min(4));
                if failures == 1 || failures.is_multiple_of(20) {
                    warn!(%error, failures, "cannot write a change to the delivery queue; detection waits until it can");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}
