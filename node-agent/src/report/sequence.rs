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
//! Every numbered change has an object of its own: a storm is paced, never
//! folded ([`super::storm`]). Left out: a baseline lost with its state
//! directory starts numbering again at 0 (for the cluster's verification of
//! the chain to flag).

use std::collections::BTreeMap;

use kube::ResourceExt;

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
