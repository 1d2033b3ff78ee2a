//! The reporting path: from a detected difference to a stored FileChange and
//! its Event, exactly once per transition. Everything that decides whether a
//! change reaches the API server lives here.
//!
//! # The exactly-once protocol
//!
//! 1. **Detect.** The engine compares a path's state with the approved
//!    baseline. A difference whose state digest the baseline has not marked
//!    reported becomes a [`FileChangeSpec`] (nothing is marked yet).
//! 2. **Hand over.** The monitoring loop numbers each change with the node's
//!    next transition number ([`sequence`]) and passes the batch to the
//!    reporter with [`hand_over`] and waits for its answer.
//! 3. **Queue.** The reporter ([`reporter`]) builds each object with a
//!    deterministic name ([`object`]) and writes every one to the durable
//!    queue on the node ([`queue`], fsync + rename); nothing is folded or
//!    dropped, however many. Only then does it answer. A
//!    write that fails (a full disk) is retried until it succeeds, with
//!    `kube_fim_agent_queue_write_failing` at 1 meanwhile: detection waits,
//!    nothing is dropped.
//! 4. **Mark.** Only after the answer does the loop mark the differences
//!    reported in the baseline and save it; the same transaction saves the
//!    transition counter ([`crate::baseline`]). Whether a baseline found at
//!    start is this agent's own is not taken from the node: its entry
//!    digests are checked against what the cluster holds
//!    ([`crate::cluster::startup`]).
//! 5. **Deliver.** The deliverer ([`deliver`]) picks the oldest report whose
//!    lane (policy entry) is within its policy's per-minute cap ([`storm`]:
//!    a storm's excess is deferred in the queue and paced, and the reports
//!    of other lanes pass it), waits until the baseline
//!    holding a report's number is saved, creates the FileChange, counts it
//!    in an Event series ([`series`]), and removes the report from the queue
//!    only once the API server stored it (created, or AlreadyExists with the
//!    stored object equal to the report; another object under its name is a
//!    squatted name, and the report is created under a fresh one). A report
//!    the API server refuses
//!    as invalid is shortened ([`object::shorten`]) and sent again, never
//!    dropped.
//!
//! So every detected change is one report with its own number, and every
//! number below the baseline's saved counter is either stored in the
//! cluster or still in the queue ([`queue::Queue::numbers`]).
//!
//! A crash between any two steps is safe: before 3, the difference is not
//! marked and is detected again at restart (source `Startup`); between 3 and
//! 4, its number is found in the queue at restart and given back to the same
//! transition detected again ([`sequence`]), so the same object name comes
//! back; a deferred report is in the queue like any other, and its pacing
//! resumes at restart; between 5 and its acknowledgement, the same report meets
//! AlreadyExists and the stored object equal to it. A name is the node, the
//! transition's number and a digest of the policy, entry, path, category,
//! before/after states and the path's epoch ([`object::object_name`]), so a
//! retry is deduplicated while a recurrence, even of the very same states,
//! is a FileChange of its own.

pub mod deliver;
pub mod fingerprint;
pub mod object;
pub mod queue;
pub mod reporter;
pub mod sequence;
pub mod series;
pub mod storm;
pub mod transaction;

use kube_fim_crds::FileChangeSpec;
use tokio::sync::{mpsc, oneshot};

use crate::engine::Outcome;

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
