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
//! changes were detected together. The storms are judged from the set of
//! stored FileChanges, never from the order the watch delivers them in (two
//! agents' queues, a retry after an outage, a re-list in name order), nor
//! from whether their policy was known when they arrived: a lane whose policy
//! is not known yet waits for it. A storm is recorded once: found again (a
//! later minute of it, more of it arriving late, the same FileChanges
//! re-listed by a restarted operator) it extends its record, whose `since`
//! (the alarm's id) never moves.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
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
pub const MAX_LANES: usize = 100_000;
/// Detections a lane keeps at most: the newest.
pub const LANE_DETECTIONS: usize = 50_000;

/// A pacing lane: one entry of one policy on one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    pub node: String,
    pub policy: String,
    pub entry: String,
}

/// One stored FileChange of a lane: its detection time, and a hash of its
/// name (the same object seen again, an update or a re-list, counts once).
type Detection = (Timestamp, u64);

type Detections = HashMap<Lane, BTreeSet<Detection>>;

fn detection(name: &str, detected: Timestamp) -> Detection {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    (detected, h.finish())
}

#[derive(Debug, Default)]
struct State {
    lanes: Detections,
    /// Lanes with a change not yet judged (or whose policy is not known
    /// yet): judged again at the next [`Storms::due`].
    dirty: HashSet<Lane>,
    /// The lanes as a re-list fills them, replacing `lanes` once complete.
    relisting: Option<Detections>,
}

/// A storm found: what to record.
#[derive(Debug, PartialEq)]
pub struct Storm {
    pub lane: Lane,
    /// The first detection of the first minute past the cap.
    pub since: Timestamp,
    /// The last detection past it.
    pub last: Timestamp,
    /// The most changes detected within one minute.
    pub count: usize,
    pub cap: u32,
}

impl Storm {
    /// Its record on the node's FileIntegrityNode.
    pub fn record(&self) -> ChangeStormRecord {
        ChangeStormRecord {
            policy: self.lane.policy.clone(),
            entry: self.lane.entry.clone(),
            since: Time(self.since),
            last: Time(self.last),
            count: self.count as u64,
            cap: u64::from(self.cap),
        }
    }
}

/// The detection times of every stored FileChange, per lane: the same set
/// whatever order the watch delivers them in, so the storms judged from it
/// ([`storms_of`]) are too. Kept as the FileChanges are (added, deleted,
/// re-listed); at most [`LANE_DETECTIONS`] per lane and [`MAX_LANES`] lanes,
/// about 40 bytes a FileChange.
#[derive(Debug, Default)]
pub struct Storms {
    state: Mutex<State>,
}

fn span(d: Duration) -> SignedDuration {
    SignedDuration::from_secs(d.as_secs() as i64)
}

fn insert(lanes: &mut Detections, lane: &Lane, d: Detection) {
    if lanes.len() >= MAX_LANES && !lanes.contains_key(lane) {
        let newest = |w: &BTreeSet<Detection>| w.last().map(|(t, _)| *t);
        if let Some(quietest) = lanes
            .iter()
            .min_by_key(|(_, w)| newest(w))
            .map(|(l, _)| l.clone())
        {
            lanes.remove(&quietest);
        }
    }
    let set = lanes.entry(lane.clone()).or_default();
    set.insert(d);
    if set.len() > LANE_DETECTIONS {
        set.pop_first();
    }
}

impl Storms {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The FileChange `name` of `lane`, detected at `detected`, is stored.
    pub fn add(&self, lane: Lane, name: &str, detected: Timestamp) {
        let mut state = self.state();
        insert(&mut state.lanes, &lane, detection(name, detected));
        state.dirty.insert(lane);
    }

    /// The FileChange is deleted (a storm already recorded stays recorded).
    pub fn remove(&self, lane: &Lane, name: &str, detected: Timestamp) {
        let mut state = self.state();
        if let Some(set) = state.lanes.get_mut(lane) {
            set.remove(&detection(name, detected));
            if set.is_empty() {
                state.lanes.remove(lane);
            }
        }
    }

    /// The watch lists every FileChange again.
    pub fn relist_started(&self) {
        self.state().relisting = Some(Detections::default());
    }

    /// One FileChange of the re-list.
    pub fn relisted(&self, lane: Lane, name: &str, detected: Timestamp) {
        let mut state = self.state();
        if let Some(lanes) = state.relisting.as_mut() {
            insert(lanes, &lane, detection(name, detected));
        }
    }

    /// The re-list is complete: it replaces what was known, and every lane is
    /// judged again.
    pub fn relist_done(&self) {
        let mut state = self.state();
        if let Some(lanes) = state.relisting.take() {
            state.dirty = lanes.keys().cloned().collect();
            state.lanes = lanes;
        }
    }

    /// The storms of the lanes that changed since the last call, each judged
    /// against its policy's cap, `cap_of(policy)`. A lane whose policy is not
    /// known (not listed yet at start, created after its changes) waits for it
    /// and is judged once it is.
    pub fn due(&self, cap_of: impl Fn(&str) -> Option<u32>) -> Vec<Storm> {
        let mut state = self.state();
        let dirty = std::mem::take(&mut state.dirty);
        let mut found = Vec::new();
        for lane in dirty {
            let Some(set) = state.lanes.get(&lane) else {
                continue;
            };
            match cap_of(&lane.policy) {
                Some(cap) => found.extend(storms_of(&lane, set, cap)),
                None => {
                    state.dirty.insert(lane);
                }
            }
        }
        found
    }
}

/// The storms of a lane's detections: every minute (`[t - 60 s, t]` for a
/// detection `t`) holding more than `cap` detections is past the cap; such
/// minutes starting at most a minute after the previous one's last detection
/// are one storm. A function of the set alone, not of the order it was
/// learnt in.
fn storms_of(lane: &Lane, set: &BTreeSet<Detection>, cap: u32) -> Vec<Storm> {
    let window = span(WINDOW);
    let times: Vec<Timestamp> = set.iter().map(|(t, _)| *t).collect();
    let mut out: Vec<Storm> = Vec::new();
    let mut first = 0;
    for (j, t) in times.iter().enumerate() {
        while times[first] < *t - window {
            first += 1;
        }
        let count = j - first + 1;
        if count <= cap as usize {
            continue;
        }
        let since = times[first];
        match out.last_mut() {
            Some(s) if since <= s.last + window => {
                s.last = *t;
                s.count = s.count.max(count);
            }
            _ => out.push(Storm {
                lane: lane.clone(),
                since,
                last: *t,
                count,
                cap,
            }),
        }
    }
    out
}

/// The node's storm records with `storm` added: a storm overlapping a
/// record of its lane (found again after a restart, lasting another minute,
/// or more of it arriving late) extends that record, its `since` (the
/// alarm's id) unchanged; a new one starts a record; the newest [`RECORDED`]
/// are kept.
pub fn record(existing: &[ChangeStormRecord], storm: &ChangeStormRecord) -> Vec<ChangeStormRecord> {
    let mut out = existing.to_vec();
    let window = span(WINDOW);
    let same = out.iter_mut().find(|r| {
        r.policy == storm.policy
            && r.entry == storm.entry
            && storm.since.0 <= r.last.0 + window
            && storm.last.0 >= r.since.0 - window
    });
    match same {
        Some(r) => {
            r.last = Time(r.last.0.max(storm.last.0));
            r.count = r.count.max(storm.count);
            r.cap = storm.cap;
        }
        None => out.push(storm.clone()),
    }
    out.sort_by_key(|r| r.since.0);
    let excess = out.len().saturating_sub(RECORDED);
    out.drain(..excess);
    out
}

/// `existing` with every storm of `found` recorded.
pub fn merged(
    existing: &[ChangeStormRecord],
    found: &[ChangeStormRecord],
) -> Vec<ChangeStormRecord> {
    found
        .iter()
        .fold(existing.to_vec(), |acc, s| record(&acc, s))
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

    fn cap20(_: &str) -> Option<u32> {
        Some(20)
    }

    /// (since, last, count) of each storm found.
    fn found(storms: &Storms) -> Vec<(Timestamp, Timestamp, usize)> {
        let mut f: Vec<_> = storms
            .due(cap20)
            .into_iter()
            .map(|s| (s.since, s.last, s.count))
            .collect();
        f.sort();
        f
    }

    #[test]
    fn more_changes_of_an_entry_detected_in_a_minute_than_its_cap_are_a_storm() {
        let storms = Storms::default();
        // 10 changes a second in entry "ssh" against a cap of 20; another
        // entry at its cap is never a storm.
        for i in 0..100 {
            storms.add(lane("ssh"), &format!("c{i}"), at(i * 100));
            if i % 5 == 0 {
                storms.add(lane("sudoers"), &format!("s{i}"), at(i * 100));
            }
        }
        assert_eq!(found(&storms), vec![(at(0), at(9_900), 100)]);
        // Judged once: nothing new, nothing said.
        assert_eq!(found(&storms), vec![]);
        // The same FileChange seen again (an update, a re-list) counts once.
        storms.add(lane("ssh"), "c50", at(5_000));
        assert_eq!(found(&storms), vec![(at(0), at(9_900), 100)]);
    }

    #[test]
    fn a_storm_arriving_in_reverse_detection_order_is_found() {
        // A re-list in name order, or an agent's retry: the 21 changes of a
        // storm (cap 20) arrive newest first.
        let storms = Storms::default();
        for i in (0..21).rev() {
            storms.add(lane("ssh"), &format!("c{i}"), at(i * 100));
        }
        assert_eq!(found(&storms), vec![(at(0), at(2_000), 21)]);
    }

    #[test]
    fn a_storm_is_the_same_whatever_order_and_batches_its_changes_arrive_in() {
        // Two storms (30 changes in 3 s; 25 in 5 s, two minutes later) and a
        // quiet trickle, delivered in 50 different orders and cut into
        // batches judged one after another.
        let mut times: Vec<i64> = (0..30).map(|i| i * 100).collect();
        times.extend((0..25).map(|i| 120_000 + i * 200));
        times.extend((0..40).map(|i| 300_000 + i * 10_000));
        let mut seed = 7u64;
        for round in 0..50 {
            let mut order = times.clone();
            for i in (1..order.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (seed >> 33) as usize % (i + 1));
            }
            let storms = Storms::default();
            let mut records: Vec<ChangeStormRecord> = Vec::new();
            for (i, t) in order.iter().enumerate() {
                storms.add(lane("ssh"), &format!("c{t}"), at(*t));
                if i % (round % 7 + 1) == 0 {
                    for s in storms.due(cap20) {
                        records = record(&records, &s.record());
                    }
                }
            }
            for s in storms.due(cap20) {
                records = record(&records, &s.record());
            }
            let got: Vec<(u64, Timestamp)> = records.iter().map(|r| (r.count, r.last.0)).collect();
            assert_eq!(got, vec![(30, at(2_900)), (25, at(124_800))], "{order:?}");
            // A restarted operator, which sees them all at once, extends
            // these records: no new id.
            let again = Storms::default();
            again.relist_started();
            for t in &times {
                again.relisted(lane("ssh"), &format!("c{t}"), at(*t));
            }
            again.relist_done();
            let found: Vec<ChangeStormRecord> =
                again.due(cap20).iter().map(Storm::record).collect();
            assert_eq!(merged(&records, &found), records);
        }
    }

    #[test]
    fn changes_whose_policy_is_not_known_yet_are_judged_once_it_is() {
        let storms = Storms::default();
        for i in 0..21 {
            storms.add(lane("ssh"), &format!("c{i}"), at(i * 100));
        }
        // Listed before the policies at start, or created before their policy.
        assert_eq!(storms.due(|_| None), vec![]);
        assert_eq!(found(&storms), vec![(at(0), at(2_000), 21)]);
    }

    #[test]
    fn a_relist_replaces_what_was_known_and_a_deleted_change_no_longer_counts() {
        let storms = Storms::default();
        for i in 0..21 {
            storms.add(lane("ssh"), &format!("c{i}"), at(i * 100));
        }
        storms.remove(&lane("ssh"), "c0", at(0));
        storms.add(lane("ssh"), "c0", at(0));
        storms.remove(&lane("ssh"), "c0", at(0));
        assert_eq!(found(&storms), vec![]);
        // A re-list (the watch expired): while it runs, what was known stays.
        storms.relist_started();
        for i in 0..21 {
            storms.relisted(lane("ssh"), &format!("c{i}"), at(i * 100));
        }
        assert_eq!(found(&storms), vec![]);
        storms.relist_done();
        assert_eq!(found(&storms), vec![(at(0), at(2_000), 21)]);
    }

    #[test]
    fn a_lane_keeps_its_newest_detections_only() {
        let storms = Storms::default();
        for i in 0..(LANE_DETECTIONS as i64 + 10) {
            storms.add(lane("ssh"), &format!("c{i}"), at(i * 10_000));
        }
        let state = storms.state();
        let kept = &state.lanes[&lane("ssh")];
        assert_eq!(kept.len(), LANE_DETECTIONS);
        assert_eq!(kept.first().map(|d| d.0), Some(at(10 * 10_000)));
    }

    #[test]
    fn a_storm_found_again_extends_its_record_and_a_later_one_is_new() {
        let s = |since, last, count| {
            Storm {
                lane: lane("ssh"),
                since: at(since),
                last: at(last),
                count,
                cap: 20,
            }
            .record()
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
        other.entry = "sudoers".into();
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

    #[test]
    fn a_recorded_storm_keeps_its_id_when_earlier_changes_of_it_arrive_late() {
        let s = |since, last, count| {
            Storm {
                lane: lane("ssh"),
                since: at(since),
                last: at(last),
                count,
                cap: 20,
            }
            .record()
        };
        let r = record(&[], &s(10_000, 12_000, 21));
        let r = record(&r, &s(0, 12_000, 30));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].since.0, at(10_000), "the alarm's id moved: {r:?}");
        assert_eq!(r[0].count, 30);
    }
}
