//! Change storms, as the cluster's evidence shows them.
//!
//! An agent paces a storm: past its policy's `maxChangesPerNodePerMinute` in
//! one entry, its reports wait and reach the API server one every
//! `60 / cap` seconds, each still a FileChange of its own (the agent's
//! `report/storm.rs`). The agent says so in an Event and a metric, which the
//! node could withhold or an Event's expiry erase. So the operator finds the
//! storm itself, in the FileChanges the node created: more changes of one
//! (policy, entry) *detected* within a minute than the policy's cap. It
//! records each storm on the node's FileIntegrityNode (`status.storms`, the
//! operator's field: the API server refuses the agent's writes of it), where
//! evidence sinks deliver it as a `ChangeStorm` alarm with a stable id
//! (`<node>/storm/<policy>/<entry>/<since>`).
//!
//! Detection times, not arrival: a paced storm arrives slowly, but its
//! changes were detected together, and the operator restarting finds the
//! same storm again in the same FileChanges (and extends the record it
//! wrote, never a second one).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube_fim_crds::ChangeStormRecord;

/// The time over which a policy's cap counts (the agent's).
pub const WINDOW: Duration = Duration::from_secs(60);
/// Storms a node's record keeps.
pub const RECORDED: usize = 16;
/// Lanes (node, policy, entry) followed at most: the quietest go first.
const MAX_LANES: usize = 100_000;

/// A pacing lane: one entry of one policy on one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    pub node: String,
    pub policy: String,
    pub entry: String,
}

#[derive(Debug, Default)]
struct LaneWindow {
    /// Changes of the lane by (detection time, name): a FileChange seen
    /// again (an update, a re-list) counts once.
    detected: BTreeSet<(Timestamp, String)>,
    /// Until when (in detection time) the current storm was already said.
    said_until: Option<Timestamp>,
}

/// A storm found: what to record.
#[derive(Debug, PartialEq)]
pub struct Storm {
    pub lane: Lane,
    /// The first detection of the minute that went past the cap.
    pub since: Timestamp,
    /// The detection that went past it.
    pub last: Timestamp,
    pub count: usize,
    pub cap: u32,
}

/// Changes per lane over the last [`WINDOW`] of detection time.
#[derive(Debug, Default)]
pub struct Storms {
    lanes: Mutex<HashMap<Lane, LaneWindow>>,
}

fn span(d: Duration) -> SignedDuration {
    SignedDuration::from_secs(d.as_secs() as i64)
}

impl Storms {
    /// Counts the FileChange `name` of `lane` detected at `detected` against
    /// the lane's `cap`. Returns the storm when the changes detected within a
    /// minute up to this one are more than `cap`, at most once per minute of
    /// detection time (a storm lasting longer is said again, and its record
    /// extended).
    pub fn observe(&self, lane: Lane, name: &str, detected: Timestamp, cap: u32) -> Option<Storm> {
        let window = span(WINDOW);
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.len() >= MAX_LANES && !lanes.contains_key(&lane) {
            let newest = |w: &LaneWindow| w.detected.last().map(|(t, _)| *t);
            if let Some(quietest) = lanes
                .iter()
                .min_by_key(|(_, w)| newest(w))
                .map(|(l, _)| l.clone())
            {
                lanes.remove(&quietest);
            }
        }
        let w = lanes.entry(lane.clone()).or_default();
        if !w.detected.insert((detected, name.to_string())) {
            return None;
        }
        // Keep a minute before the newest detection (a change detected
        // earlier than that but arriving late still counts in its minute).
        if let Some((newest, _)) = w.detected.last().cloned() {
            while w
                .detected
                .first()
                .is_some_and(|(t, _)| *t < newest - window - window)
            {
                w.detected.pop_first();
            }
        }
        let in_minute: Vec<Timestamp> = w
            .detected
            .range((detected - window, String::new())..)
            .map(|(t, _)| *t)
            .take_while(|t| *t <= detected)
            .collect();
        if in_minute.len() <= cap as usize || w.said_until.is_some_and(|t| detected < t) {
            return None;
        }
        let since = in_minute.first().copied().unwrap_or(detected);
        w.said_until = Some(detected + window);
        Some(Storm {
            lane,
            since,
            last: detected,
            count: in_minute.len(),
            cap,
        })
    }
}

/// The node's storm records with `storm` added: a storm overlapping a
/// record of its lane (found again after a restart, or lasting another
/// minute) extends that record (one alarm per storm, its id unchanged); a
/// new one starts a record; the newest [`RECORDED`] are kept.
pub fn record(existing: &[ChangeStormRecord], storm: &Storm) -> Vec<ChangeStormRecord> {
    let mut out = existing.to_vec();
    let window = span(WINDOW);
    let same = out.iter_mut().find(|r| {
        r.policy == storm.lane.policy
            && r.entry == storm.lane.entry
            && storm.since <= r.last.0 + window
            && storm.last >= r.since.0 - window
    });
    match same {
        Some(r) => {
            r.since = Time(r.since.0.min(storm.since));
            r.last = Time(r.last.0.max(storm.last));
            r.count = r.count.max(storm.count as u64);
            r.cap = u64::from(storm.cap);
        }
        None => out.push(ChangeStormRecord {
            policy: storm.lane.policy.clone(),
            entry: storm.lane.entry.clone(),
            since: Time(storm.since),
            last: Time(storm.last),
            count: storm.count as u64,
            cap: u64::from(storm.cap),
        }),
    }
    out.sort_by_key(|r| r.since.0);
    let excess = out.len().saturating_sub(RECORDED);
    out.drain(..excess);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lane(entry: &str) -> Lane {
        Lane {
            node: "a".into(),
            policy: "p".into(),
            entry: entry.into(),
        }
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_second(1_000_000).unwrap() + SignedDuration::from_millis(ms)
    }

    #[test]
    fn more_changes_of_an_entry_detected_in_a_minute_than_its_cap_are_a_storm() {
        let storms = Storms::default();
        // 10 changes a second in entry "ssh" against a cap of 20: past it at
        // the 21st, however slowly they arrive.
        let mut said = Vec::new();
        for i in 0..100 {
            if let Some(s) = storms.observe(lane("ssh"), &format!("c{i}"), at(i * 100), 20) {
                said.push(s);
            }
            // Another entry at its cap is never a storm.
            if i % 5 == 0 {
                assert_eq!(
                    storms.observe(lane("sudoers"), &format!("s{i}"), at(i * 100), 20),
                    None
                );
            }
        }
        assert_eq!(said.len(), 1, "said once a minute: {said:?}");
        assert_eq!(said[0].since, at(0));
        assert_eq!(said[0].last, at(2000));
        assert_eq!(said[0].count, 21);
        // The same FileChange seen again (an update, a re-list) counts once.
        assert_eq!(storms.observe(lane("ssh"), "c50", at(5000), 20), None);
    }

    #[test]
    fn a_storm_found_again_extends_its_record_and_a_later_one_is_new() {
        let s = |since, last, count| Storm {
            lane: lane("ssh"),
            since: at(since),
            last: at(last),
            count,
            cap: 20,
        };
        let r = record(&[], &s(0, 2_000, 21));
        // A minute later, still storming; or found again by a restarted operator.
        let r = record(&r, &s(60_000, 62_000, 40));
        let r = record(&r, &s(100, 2_100, 21));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].since.0, r[0].last.0, r[0].count),
            (at(0), at(62_000), 40)
        );
        // Much later: a storm of its own.
        let r = record(&r, &s(3_600_000, 3_602_000, 30));
        assert_eq!(r.len(), 2);
        // Another entry: a record of its own.
        let mut other = s(0, 2_000, 25);
        other.lane = lane("sudoers");
        let r = record(&r, &other);
        assert_eq!(r.len(), 3);
        // Bounded, newest kept.
        let mut r = r;
        for i in 0..40 {
            let t = 10_000_000 + i * 1_000_000;
            r = record(&r, &s(t, t + 1000, 30));
        }
        assert_eq!(r.len(), RECORDED);
        assert!(r.windows(2).all(|w| w[0].since.0 <= w[1].since.0));
    }
}
