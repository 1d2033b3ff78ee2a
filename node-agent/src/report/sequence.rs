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
//!   number. A number is never given to two transitions.
//! - **AlreadyExists is checked.** A create answered AlreadyExists counts as
//!   delivered only if the stored object is this report (node, path,
//!   sequence, after-state); otherwise the name was squatted and the report is
//!   created under another name ([`super::object::squat_free_name`]), with a
//!   Warning Event.
//!
//! Left out: a change folded into a storm's Summary has a number but no
//! object of its own, and a baseline lost with its state directory starts
//! numbering again at 0 (both are for the cluster's verification of the
//! chain to flag).

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::queue::Queue;
use super::{Detected, object};
use crate::engine::Engine;

/// Numbers each change (not summaries) and writes the number into its spec.
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
