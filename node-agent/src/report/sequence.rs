//! The node's transition numbers: every change the agent reports gets the
//! next number of its node (`spec.sequence`, part of the object's name), so a
//! recurrence is an object of its own and the cluster can tell a missing
//! report from one that never existed.
//!
//! # How numbers fit the exactly-once protocol ([`super`])
//!
//! - **Numbered at hand-over (step 2).** The monitoring loop numbers each
//!   detected change ([`number`]) from the baseline's counter
//!   ([`crate::baseline::Baseline::take_sequence`]) before handing it over; the
//!   counter moves in memory only.
//! - **Saved with the mark (step 4).** The counter is written in the same
//!   baseline transaction that marks the numbered changes reported: a number
//!   is durably taken exactly when its transition is durably recorded.
//! - **Delivered once saved (step 5).** The deliverer creates a numbered
//!   report only once the baseline holding its number is saved
//!   ([`crate::engine::Engine::committed_sequence`]). So after a crash, every
//!   number the saved baseline does not hold is still in the queue, with the
//!   identity of its transition ([`super::object::identity`], in its name).
//! - **Resumed after a crash between 3 and 4.** At start those numbers are
//!   read back from the queue ([`resumed`]): the counter goes past them, and a
//!   transition detected again with the same identity gets its old number back
//!   (same name: AlreadyExists, compared, delivered once), while a different
//!   transition (the file changed again while the agent was down) gets a new
//!   number. Only until the first save (the scan at start): after it, the
//!   same states again are a recurrence. A number is never given to two
//!   transitions.
//! - **AlreadyExists is checked.** A create answered AlreadyExists counts as
//!   delivered only if the stored object is this report (node, path,
//!   sequence, after-state); otherwise the name was squatted and the report is
//!   created under another name ([`super::object::squat_free_name`]), with a
//!   Warning Event.
//!
//! # The chain the cluster verifies
//!
//! Numbers are only worth something if the cluster can check them, so the
//! node publishes its chain head and the operator verifies it:
//!
//! - **Published head.** The heartbeat writes the saved counter as
//!   `status.sequence` of the node's FileIntegrityNode (every number below it
//!   was given to a transition) and the numbers below it still waiting in the
//!   delivery queue as `status.undelivered` ranges ([`Undelivered`]). It reads
//!   the counter first and the queue second: a number saved by then was
//!   queued before (step 3 precedes step 4), so it is either still queued or
//!   already stored. Admission refuses any write that lowers or removes
//!   `status.sequence`.
//! - **Never a number twice.** At start the agent continues after the
//!   published head when its own counter is lower (state directory wiped or
//!   rolled back, [`crate::engine::Engine::continue_after`]); the baseline
//!   alarm tells of the lost state, and the verifier of the lost reports.
//! - **Verified by the operator** (`operator/src/chain.rs`). Each number from
//!   its checkpoint (`status.verification.verifiedThrough`) up to the
//!   published head must be a stored FileChange of the node or listed
//!   undelivered. A number that is neither for longer than a short grace is
//!   an `EvidenceGap` (Warning Event, metric, alert, the policies Degraded);
//!   so is a head below the checkpoint (`Rewound`). The checkpoint moves over
//!   what is verified, and retention deletes only below it: a FileChange
//!   deleted after verification is no gap, one deleted before is.
//!
//! What root on the node still can: replace the agent binary (a lying agent
//! reports nothing it does not want to; the chain proves completeness of
//! what the agent numbered, not honesty of the agent), or list numbers as
//! undelivered forever (bounded: `status.queueLength` and the agent's
//! `kube_fim_agent_reports_queued`, and retention holding every later
//! change of that node). What it no longer can: make a numbered change
//! vanish (delete its queue file, wipe or roll back the state directory, or
//! delete the FileChange before the operator saw it) without an
//! `EvidenceGap` naming its number.
//!
//! Every numbered change has an object of its own: a storm is paced, never
//! folded ([`super::storm`]), so the verifier can be on everywhere.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use kube_fim_crds::node::{Span, compact, spans};

use super::queue::Queue;
use super::{Detected, object};
use crate::engine::Engine;

/// Numbers each change and writes the number into its spec (a Summary, which
/// agents before paced storms wrote, has none).
pub fn number(reports: &mut [Detected], engine: &mut Engine) {
    for d in reports {
        if d.spec.summary.is_some() || d.spec.sequence.is_some() {
            continue;
        }
        let identity = object::identity(&d.spec, d.epoch);
        d.spec.sequence = Some(engine.number(&identity));
    }
}

/// Numbers from `saved` on found in the queue (handed out before a crash,
/// never saved), by the identity of their transition.
pub fn resumed(queue: &mut Queue, saved: u64) -> BTreeMap<String, u64> {
    queue
        .peek(usize::MAX)
        .into_iter()
        .filter_map(|(_, report)| {
            let seq = report.spec.sequence.filter(|s| *s >= saved)?;
            let name = report.name_any();
            Some((object::identity_of_name(&name)?.to_string(), seq))
        })
        .collect()
}

/// At most this many ranges are published as `status.undelivered`.
pub const MAX_UNDELIVERED_RANGES: usize = 64;

/// The transition numbers of the reports waiting in the delivery queue,
/// remembered per queue entry so that each report is read from disk once.
#[derive(Debug, Default)]
pub struct Undelivered {
    known: BTreeMap<u64, u64>,
}

impl Undelivered {
    /// The numbers below `below` waiting in `queue`, as at most
    /// [`MAX_UNDELIVERED_RANGES`] ranges.
    pub fn ranges(&mut self, queue: &Queue, below: u64) -> Vec<Span> {
        let waiting: BTreeSet<u64> = queue.waiting().collect();
        self.known.retain(|entry, _| waiting.contains(entry));
        for entry in waiting {
            if self.known.contains_key(&entry) {
                continue;
            }
            // A report that cannot be read now is tried again next time.
            if let Some(n) = queue.read(entry).and_then(|c| c.spec.sequence) {
                self.known.insert(entry, n);
            }
        }
        compact(
            spans(self.known.values().copied().filter(|n| *n < below)),
            MAX_UNDELIVERED_RANGES,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fixtures;
    use kube_fim_crds::FileAttributes;

    fn detected(path: &str, size: u64) -> Detected {
        let mut spec = fixtures::change(path);
        spec.after = Some(FileAttributes {
            size: Some(size),
            ..FileAttributes::default()
        });
        Detected { spec, epoch: 0 }
    }

    fn numbered(engine: &mut Engine, d: &Detected) -> Detected {
        let mut batch = [d.clone()];
        number(&mut batch, engine);
        let [d] = batch;
        d
    }

    /// The agent restarting on the state directory: its saved baseline and
    /// the numbers its queue holds.
    fn restart(root: &std::path::Path, state: &std::path::Path) -> (Engine, Queue) {
        let mut engine = Engine::open(root, state, "n1").unwrap();
        let mut queue = Queue::open(&state.join("queue"), 100).unwrap();
        let taken = resumed(&mut queue, engine.baseline().saved_sequence());
        engine.resume_numbers(taken);
        (engine, queue)
    }

    #[test]
    fn numbers_survive_a_restart_and_are_never_given_twice_after_a_crash() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (mut engine, mut queue) = restart(root.path(), state.path());
        engine.save().unwrap();
        let first = numbered(&mut engine, &detected("/etc/passwd", 1));
        assert_eq!(first.spec.sequence, Some(0));
        queue
            .push(&object::to_object(first.spec.clone(), 0))
            .unwrap();
        engine.save().unwrap();
        queue.ack(0).unwrap();

        // Step 3 done, then a crash before step 4 (the save).
        let second = numbered(&mut engine, &detected("/etc/shadow", 1));
        assert_eq!(second.spec.sequence, Some(1));
        let queued = object::to_object(second.spec.clone(), 0);
        queue.push(&queued).unwrap();
        drop((engine, queue));

        let (mut engine, _queue) = restart(root.path(), state.path());
        // The file changed again while the agent was down: another
        // transition, another number.
        let other = numbered(&mut engine, &detected("/etc/shadow", 2));
        assert_eq!(other.spec.sequence, Some(2));
        // The queued transition detected again: its own number and name back.
        let again = numbered(&mut engine, &detected("/etc/shadow", 1));
        assert_eq!(again.spec.sequence, Some(1));
        assert_eq!(
            object::to_object(again.spec, 0).metadata.name,
            queued.metadata.name
        );
        let next = numbered(&mut engine, &detected("/etc/group", 1));
        assert_eq!(next.spec.sequence, Some(3));
        engine.save().unwrap();
        // Once the scan at start is saved, the same states again recur.
        let recurs = numbered(&mut engine, &detected("/etc/shadow", 1));
        assert_eq!(recurs.spec.sequence, Some(4));
        engine.save().unwrap();
        drop(engine);

        let (mut engine, _queue) = restart(root.path(), state.path());
        let later = numbered(&mut engine, &detected("/etc/hosts", 1));
        assert_eq!(later.spec.sequence, Some(5), "saved across the restart");
    }

    #[test]
    fn a_number_not_detected_again_is_skipped_not_reused() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (mut engine, mut queue) = restart(root.path(), state.path());
        engine.save().unwrap();
        let lost = numbered(&mut engine, &detected("/etc/shadow", 1));
        queue.push(&object::to_object(lost.spec, 0)).unwrap();
        drop((engine, queue));
        // The file went back to its baseline while the agent was down: the
        // queued report is still delivered, and its number stays its own.
        let (mut engine, _queue) = restart(root.path(), state.path());
        let other = numbered(&mut engine, &detected("/etc/passwd", 1));
        assert_eq!(other.spec.sequence, Some(1));
    }

    #[test]
    fn the_undelivered_numbers_are_the_queued_ones_below_the_saved_head() {
        let state = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(&state.path().join("queue"), 100).unwrap();
        let mut undelivered = Undelivered::default();
        let mut entries = Vec::new();
        for n in [3, 4, 5, 9, 12] {
            let mut spec = fixtures::change(&format!("/etc/f{n}"));
            spec.sequence = Some(n);
            entries.push(queue.push(&object::to_object(spec, 0)).unwrap());
        }
        let shown = |u: &mut Undelivered, q: &Queue, below| {
            u.ranges(q, below)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(shown(&mut undelivered, &queue, 10), ["3-5", "9"]);
        queue.ack(entries[1]).unwrap();
        assert_eq!(shown(&mut undelivered, &queue, 13), ["3", "5", "9", "12"]);
    }

    #[test]
    fn a_published_head_above_the_local_counter_is_continued_after() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (mut engine, _queue) = restart(root.path(), state.path());
        engine.continue_after(40);
        let next = numbered(&mut engine, &detected("/etc/passwd", 1));
        assert_eq!(next.spec.sequence, Some(40), "names never repeat");
        engine.continue_after(7);
        let later = numbered(&mut engine, &detected("/etc/passwd", 2));
        assert_eq!(later.spec.sequence, Some(41), "never lowered");
    }

    #[test]
    fn summaries_have_no_number() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut engine = Engine::open(root.path(), state.path(), "n1").unwrap();
        let mut d = detected("/etc", 1);
        d.spec.summary = Some(kube_fim_crds::ChangeSummary {
            count: 1,
            added: 1,
            modified: 0,
            removed: 0,
            sample_paths: vec![],
            window_start: d.spec.detected_time.clone(),
            window_end: d.spec.detected_time.clone(),
        });
        assert_eq!(numbered(&mut engine, &d).spec.sequence, None);
        assert_eq!(engine.baseline().sequence(), 0);
    }
}
