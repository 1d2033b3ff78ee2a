//! Which FileChanges exist, in delivery order, and how far a sink has got:
//! plain data and pure decisions, tested without I/O.
//!
//! A node's changes are delivered in the order of their [`Key`], (detection
//! time, name): the agent creates a node's FileChanges one at a time from its
//! queue, in the order it detected them, so the order the API server stores
//! them in is this order. A sink's [`Progress`] keeps, per node, the key of the
//! last change the receiver acknowledged; everything at or before it is
//! delivered. A change that reaches the operator after a later one of its node
//! was already delivered (a clock stepped back on the node) is remembered as
//! *late* and delivered next.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::watcher;
use kube_fim_crds::{DeliveredPosition, FileChange, FileIntegrityNode};
use kube_fim_formats::{Alarm, alarms, approval_event_id};

/// Where a change stands in its node's order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub detected: Timestamp,
    pub name: String,
}

impl Key {
    pub fn of(change: &FileChange) -> Key {
        Key {
            detected: change.spec.detected_time.0,
            name: change.name_any(),
        }
    }

    /// Where an alarm stands in its node's order: when it began, under its id.
    pub fn of_alarm(alarm: &Alarm) -> Key {
        Key {
            detected: alarm.since,
            name: alarm.id.clone(),
        }
    }

    /// Where the approval of `change` stands in its node's order: at the
    /// approval's time, under the approval's event id.
    pub fn of_approval(change: &FileChange) -> Option<Key> {
        change.approval().map(|a| Key {
            detected: a.approved_at.0,
            name: approval_event_id(change),
        })
    }
}

/// What one delivery sends: a change, (once approved) its approval, or an
/// alarm of the node.
#[derive(Clone, Debug)]
pub enum Record {
    Change(Arc<FileChange>),
    Approval(Arc<FileChange>),
    Alarm(Arc<Alarm>),
}

impl Record {
    pub fn key(&self) -> Key {
        match self {
            Record::Change(c) => Key::of(c),
            Record::Approval(c) => Key::of_approval(c).unwrap_or_else(|| Key::of(c)),
            Record::Alarm(a) => Key::of_alarm(a),
        }
    }

    pub fn node(&self) -> &str {
        match self {
            Record::Change(c) | Record::Approval(c) => &c.spec.node,
            Record::Alarm(a) => &a.node,
        }
    }
}

/// The records of `change`: itself, and its approval once it has one.
fn records(change: FileChange) -> Vec<(Key, Record)> {
    let change = Arc::new(change);
    let mut out = vec![(Key::of(&change), Record::Change(change.clone()))];
    if let Some(key) = Key::of_approval(&change) {
        out.push((key, Record::Approval(change)));
    }
    out
}

/// Alarms of one node the index keeps, standing or cleared: a cleared one
/// stays so that a sink that was down still receives it; past this many the
/// oldest are forgotten (a node's record holds at most 65 standing ones).
pub const MAX_ALARMS_PER_NODE: usize = 256;

/// Per node, its records (changes and approvals) in delivery order.
type ByNode = BTreeMap<String, BTreeMap<Key, Record>>;

/// Every FileChange the exporter's watch knows, by node and in order.
#[derive(Debug, Default)]
pub struct Index {
    current: ByNode,
    /// Name to node and key, to find a change by name (retention's hold).
    names: HashMap<String, (String, Key)>,
    /// Per node, the keys of its alarms in `current`.
    alarms: BTreeMap<String, BTreeSet<Key>>,
    relist: Option<ByNode>,
    listed: bool,
}

/// What an event of the watch did to the index.
#[derive(Debug, PartialEq, Eq)]
pub enum Observed {
    Nothing,
    /// Records the index did not have (a new change, a new approval): their
    /// node and keys.
    New(String, Vec<Key>),
    /// The watch listed everything again.
    Relisted,
}

impl Index {
    /// Records one event of the FileChange watch.
    pub fn observe(&mut self, event: watcher::Event<FileChange>) -> Observed {
        match event {
            watcher::Event::Apply(change) => self.insert(change),
            watcher::Event::Delete(change) => {
                let key = Key::of(&change);
                if let Some(changes) = self.current.get_mut(&change.spec.node) {
                    changes.remove(&key);
                    if let Some(approval) = Key::of_approval(&change) {
                        changes.remove(&approval);
                    }
                    if changes.is_empty() {
                        self.current.remove(&change.spec.node);
                    }
                }
                self.names.remove(&key.name);
                Observed::Nothing
            }
            watcher::Event::Init => {
                self.relist = Some(ByNode::new());
                Observed::Nothing
            }
            watcher::Event::InitApply(change) => {
                let relist = self.relist.get_or_insert_with(ByNode::new);
                relist
                    .entry(change.spec.node.clone())
                    .or_default()
                    .extend(records(change));
                Observed::Nothing
            }
            watcher::Event::InitDone => {
                let mut relisted = self.relist.take().unwrap_or_default();
                // Alarms come from the other watch: a relist of the changes
                // keeps them.
                for (node, keys) in &self.alarms {
                    for key in keys {
                        if let Some(r) = self.get(node, key) {
                            let r = r.clone();
                            relisted
                                .entry(node.clone())
                                .or_default()
                                .insert(key.clone(), r);
                        }
                    }
                }
                self.current = relisted;
                self.names = self
                    .current
                    .iter()
                    .flat_map(|(node, changes)| {
                        changes
                            .iter()
                            .filter(|(_, r)| matches!(r, Record::Change(_)))
                            .map(|(k, _)| (k.name.clone(), (node.clone(), k.clone())))
                    })
                    .collect();
                self.listed = true;
                Observed::Relisted
            }
        }
    }

    fn insert(&mut self, change: FileChange) -> Observed {
        let node = change.spec.node.clone();
        self.names
            .insert(change.name_any(), (node.clone(), Key::of(&change)));
        let of_node = self.current.entry(node.clone()).or_default();
        let new: Vec<Key> = records(change)
            .into_iter()
            .filter_map(|(key, record)| {
                of_node.insert(key.clone(), record).is_none().then_some(key)
            })
            .collect();
        match new.is_empty() {
            true => Observed::Nothing,
            false => Observed::New(node, new),
        }
    }

    /// Records one event of the FileIntegrityNode watch: the alarms of the
    /// node's record the index did not have. A node deleted, or an alarm
    /// cleared, removes nothing: what stood is delivered all the same.
    pub fn observe_node(&mut self, event: watcher::Event<FileIntegrityNode>) -> Observed {
        let node = match event {
            watcher::Event::Apply(node) | watcher::Event::InitApply(node) => node,
            _ => return Observed::Nothing,
        };
        let name = node.name_any();
        let mut new = Vec::new();
        for alarm in alarms(&node) {
            let key = Key::of_alarm(&alarm);
            let known = self.alarms.entry(name.clone()).or_default();
            if !known.insert(key.clone()) {
                continue;
            }
            self.current
                .entry(name.clone())
                .or_default()
                .insert(key.clone(), Record::Alarm(Arc::new(alarm)));
            new.push(key);
        }
        if let Some(known) = self.alarms.get_mut(&name) {
            while known.len() > MAX_ALARMS_PER_NODE {
                let Some(oldest) = known.pop_first() else {
                    break;
                };
                new.retain(|k| *k != oldest);
                if let Some(records) = self.current.get_mut(&name) {
                    records.remove(&oldest);
                }
            }
        }
        match new.is_empty() {
            true => Observed::Nothing,
            false => Observed::New(name, new),
        }
    }

    /// Whether the watch has listed every FileChange once.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// The node and key of a change, by name.
    pub fn find(&self, name: &str) -> Option<&(String, Key)> {
        self.names.get(name)
    }

    /// Changes known.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn get(&self, node: &str, key: &Key) -> Option<&Record> {
        self.current.get(node).and_then(|c| c.get(key))
    }
}

/// How far one sink has delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Per node, the last change acknowledged.
    pub positions: BTreeMap<String, Key>,
    /// Changes that arrived after their node's position had passed them.
    pub late: BTreeSet<(String, Key)>,
}

/// What a sink has not delivered yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: usize,
    /// Detection time of the oldest undelivered change.
    pub oldest: Option<Timestamp>,
}

impl Progress {
    /// The progress a sink's status records, moved back by `replay`: after a
    /// restart, the changes detected within `replay` before a node's position
    /// are sent again (with their ids), so a change that reached the API
    /// server late and out of order before the restart is not skipped.
    pub fn from_status(positions: &[DeliveredPosition], replay: Duration) -> Progress {
        Progress {
            positions: positions
                .iter()
                .map(|p| {
                    let detected = p.detected_time.0 - replay;
                    let name = if replay.is_zero() {
                        p.name.clone()
                    } else {
                        String::new()
                    };
                    (p.node.clone(), Key { detected, name })
                })
                .collect(),
            late: BTreeSet::new(),
        }
    }

    /// The positions as the sink's status records them.
    pub fn to_status(&self) -> Vec<DeliveredPosition> {
        self.positions
            .iter()
            .filter(|(_, key)| !key.name.is_empty())
            .map(|(node, key)| DeliveredPosition {
                node: node.clone(),
                detected_time: MicroTime(key.detected),
                name: key.name.clone(),
            })
            .collect()
    }

    /// Whether the receiver has acknowledged this change.
    pub fn delivered(&self, node: &str, key: &Key) -> bool {
        self.positions.get(node).is_some_and(|p| key <= p)
            && !self.late.contains(&(node.to_string(), key.clone()))
    }

    /// Every alarm of the index at or before its node's position is sent
    /// again: what a sink's status records is a position, not which alarms
    /// it got, so a sink this process did not deliver to yet (a restart)
    /// sends the standing ones once more, with their ids, rather than
    /// losing one that arrived while no operator led.
    pub fn resend_alarms(&mut self, index: &Index) {
        for (node, keys) in &index.alarms {
            for key in keys {
                if self.positions.get(node).is_some_and(|p| key <= p) {
                    self.late.insert((node.clone(), key.clone()));
                }
            }
        }
    }

    /// A new change of the index: late if its node's position is past it.
    pub fn observe_new(&mut self, node: &str, key: &Key) {
        if self.positions.get(node).is_some_and(|p| key <= p) {
            self.late.insert((node.to_string(), key.clone()));
        }
    }

    /// The next changes to send, at most `max`: the late ones first, then,
    /// across nodes, the oldest undelivered by detection time (so one busy
    /// node cannot starve the others), each node's in its order.
    pub fn next_batch(&mut self, index: &Index, max: usize) -> Vec<Record> {
        let mut out = Vec::new();
        // A late change deleted meanwhile has nothing left to send.
        self.late
            .retain(|(node, key)| index.get(node, key).is_some());
        for (node, key) in &self.late {
            if out.len() >= max {
                return out;
            }
            if let Some(c) = index.get(node, key) {
                out.push(c.clone());
            }
        }
        let mut candidates: Vec<(&Key, &Record)> = Vec::new();
        for (node, changes) in &index.current {
            let after = self.positions.get(node);
            let pending = changes
                .iter()
                .filter(|(k, _)| after.is_none_or(|p| *k > p))
                .take(max - out.len());
            candidates.extend(pending);
        }
        candidates.sort_by(|a, b| a.0.cmp(b.0));
        out.extend(
            candidates
                .into_iter()
                .take(max - out.len())
                .map(|(_, c)| c.clone()),
        );
        out
    }

    /// The receiver acknowledged `batch`.
    pub fn ack(&mut self, batch: &[Record]) {
        for record in batch {
            let node = record.node().to_string();
            let key = record.key();
            if self.late.remove(&(node.clone(), key.clone())) {
                continue;
            }
            let position = self.positions.entry(node).or_insert_with(|| key.clone());
            if key > *position {
                *position = key;
            }
        }
    }

    /// What is left to deliver.
    pub fn backlog(&self, index: &Index) -> Backlog {
        let mut out = Backlog::default();
        for (node, changes) in &index.current {
            for key in changes.keys() {
                if !self.delivered(node, key) {
                    out.pending += 1;
                    out.oldest = Some(out.oldest.map_or(key.detected, |o| o.min(key.detected)));
                }
            }
        }
        out
    }
}

/// What retention may delete, by what the sinks have delivered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HoldDecision {
    /// Names retention may delete.
    pub allowed: Vec<String>,
    /// Per sink, the changes kept because it has not delivered them.
    pub held: BTreeMap<String, i64>,
    /// Per sink, the undelivered changes let go because they were detected
    /// longer ago than its `holdMax`.
    pub expired: BTreeMap<String, Vec<String>>,
}

/// Of `doomed`, what retention may delete: a change every sink has
/// delivered; one a sink has not delivered is kept while it is younger than
/// that sink's `holdMax` (the third member of each sink), and let go, named in
/// `expired`, once older. A name the index does not know yet is kept (its
/// watch event is on the way).
pub fn decide_hold(
    doomed: Vec<String>,
    index: &Index,
    sinks: &[(String, Progress, Duration)],
    now: Timestamp,
) -> HoldDecision {
    let mut out = HoldDecision::default();
    for name in doomed {
        let Some((node, key)) = index.find(&name) else {
            continue;
        };
        // Its approval is evidence too: held like the change.
        let approval = index.get(node, key).and_then(|r| match r {
            Record::Change(c) => Key::of_approval(c),
            _ => None,
        });
        let mut keep = false;
        let mut expired_for = Vec::new();
        for (sink, progress, hold_max) in sinks {
            if progress.delivered(node, key)
                && approval
                    .as_ref()
                    .is_none_or(|a| progress.delivered(node, a))
            {
                continue;
            }
            if now.duration_since(key.detected).unsigned_abs() <= *hold_max {
                keep = true;
                *out.held.entry(sink.clone()).or_default() += 1;
            } else {
                expired_for.push(sink.clone());
            }
        }
        if keep {
            continue;
        }
        for sink in expired_for {
            out.expired.entry(sink).or_default().push(name.clone());
        }
        out.allowed.push(name);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use kube_fim_crds::{ChangeCategory, DetectionSource, FileChangeSpec};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn change(name: &str, node: &str, secs: i64) -> FileChange {
        FileChange::new(
            name,
            FileChangeSpec {
                node: node.into(),
                policy: "p".into(),
                entry: "etc".into(),
                path: format!("/etc/{name}"),
                category: ChangeCategory::Added,
                changed_attributes: vec![],
                before: None,
                after: None,
                detected_time: MicroTime(at(secs)),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                package: None,
                restored: None,
                container: None,
            },
        )
    }

    fn listed(changes: Vec<FileChange>) -> Index {
        let mut index = Index::default();
        index.observe(watcher::Event::Init);
        for c in changes {
            index.observe(watcher::Event::InitApply(c));
        }
        assert_eq!(index.observe(watcher::Event::InitDone), Observed::Relisted);
        index
    }

    fn names(batch: &[Record]) -> Vec<String> {
        batch.iter().map(|r| r.key().name).collect()
    }

    #[test]
    fn batches_follow_each_nodes_order_and_interleave_nodes_by_time() {
        let index = listed(vec![
            change("a3", "a", 30),
            change("a1", "a", 10),
            change("b1", "b", 15),
            change("a2", "a", 20),
        ]);
        let mut p = Progress::default();
        let batch = p.next_batch(&index, 3);
        assert_eq!(names(&batch), ["a1", "b1", "a2"]);
        // Nothing acknowledged: the same batch again.
        assert_eq!(names(&p.next_batch(&index, 3)), ["a1", "b1", "a2"]);
        p.ack(&batch);
        assert_eq!(names(&p.next_batch(&index, 3)), ["a3"]);
        assert_eq!(
            p.backlog(&index),
            Backlog {
                pending: 1,
                oldest: Some(at(30))
            }
        );
        p.ack(&p.clone().next_batch(&index, 3));
        assert!(p.next_batch(&index, 3).is_empty());
        assert_eq!(p.backlog(&index), Backlog::default());
    }

    #[test]
    fn a_restart_resumes_after_the_recorded_position() {
        let index = listed(vec![
            change("a1", "a", 10),
            change("a2", "a", 20),
            change("a3", "a", 30),
        ]);
        let mut p = Progress::default();
        p.ack(&p.clone().next_batch(&index, 2));
        let status = p.to_status();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].name, "a2");

        let mut resumed = Progress::from_status(&status, Duration::ZERO);
        assert_eq!(names(&resumed.next_batch(&index, 10)), ["a3"]);
        // With a replay window, what was detected within it is sent again.
        let mut replaying = Progress::from_status(&status, Duration::from_secs(5));
        assert_eq!(names(&replaying.next_batch(&index, 10)), ["a2", "a3"]);
        assert!(
            replaying.to_status().is_empty(),
            "no position recorded until one is delivered"
        );
    }

    #[test]
    fn a_change_arriving_after_its_node_moved_on_is_delivered_next() {
        let mut index = listed(vec![change("a1", "a", 10), change("a3", "a", 30)]);
        let mut p = Progress::default();
        p.ack(&p.clone().next_batch(&index, 10));
        let late = change("a2", "a", 20);
        let Observed::New(node, keys) = index.observe(watcher::Event::Apply(late)) else {
            panic!("a new change");
        };
        let key = keys[0].clone();
        p.observe_new(&node, &key);
        assert!(!p.delivered("a", &key));
        assert_eq!(p.backlog(&index).pending, 1);
        let batch = p.next_batch(&index, 10);
        assert_eq!(names(&batch), ["a2"]);
        p.ack(&batch);
        assert!(p.delivered("a", &key));
        assert_eq!(p.positions["a"].name, "a3", "the position never moves back");
        // A status update of a known change is nothing new.
        assert_eq!(
            index.observe(watcher::Event::Apply(change("a2", "a", 20))),
            Observed::Nothing
        );
    }

    fn approved(mut c: FileChange, secs: i64) -> FileChange {
        c.status = Some(kube_fim_crds::FileChangeStatus {
            approval: Some(kube_fim_crds::Approval {
                approved_by: "alice".into(),
                approved_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(secs)),
                reason: None,
                paths: Vec::new(),
            }),
            ..Default::default()
        });
        c
    }

    #[test]
    fn an_approval_is_delivered_once_in_its_nodes_order_after_its_change() {
        let mut index = listed(vec![change("a1", "a", 10), change("a3", "a", 30)]);
        let mut p = Progress::default();
        let batch = p.next_batch(&index, 10);
        p.ack(&batch);
        // a1 approved at 20: between a1 and a3, which was delivered already.
        let Observed::New(node, keys) =
            index.observe(watcher::Event::Apply(approved(change("a1", "a", 10), 20)))
        else {
            panic!("the approval is new");
        };
        assert_eq!(keys.len(), 1, "the change itself is known: {keys:?}");
        assert_eq!(keys[0].name, "a1/approval");
        p.observe_new(&node, &keys[0]);
        let batch = p.next_batch(&index, 10);
        assert_eq!(names(&batch), ["a1/approval"]);
        assert!(matches!(batch[0], Record::Approval(_)));
        p.ack(&batch);
        assert!(p.next_batch(&index, 10).is_empty(), "delivered once");
        // Approved later than everything: delivered in order after a3.
        index.observe(watcher::Event::Apply(approved(change("a3", "a", 30), 40)));
        index.observe(watcher::Event::Apply(change("a4", "a", 35)));
        assert_eq!(names(&p.next_batch(&index, 10)), ["a4", "a3/approval"]);
        // A relist keeps both records; a deleted change takes its approval along.
        let relisted = listed(vec![approved(change("a1", "a", 10), 20)]);
        assert_eq!(relisted.len(), 1, "one change");
        assert_eq!(
            names(&Progress::default().next_batch(&relisted, 10)),
            ["a1", "a1/approval"]
        );
        // Retention waits for the approval as for the change.
        let sinks = [("s".to_string(), p.clone(), Duration::from_secs(3600))];
        let hold = decide_hold(vec!["a3".into(), "a1".into()], &index, &sinks, at(50));
        assert_eq!(hold.allowed, ["a1"]);
        assert_eq!(hold.held["s"], 1);
        index.observe(watcher::Event::Delete(approved(change("a3", "a", 30), 40)));
        assert_eq!(names(&p.next_batch(&index, 10)), ["a4"]);
    }

    /// Node `name`'s record with a baseline alarm since `alarm` (if any) and
    /// an evidence gap of numbers 5 to 7 since `gap` (if any).
    fn node(name: &str, alarm: Option<i64>, gap: Option<i64>) -> FileIntegrityNode {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use kube_fim_crds::{
            BaselineAlarm, ChainVerification, EvidenceGap, FileIntegrityNodeSpec,
            FileIntegrityNodeStatus,
        };
        let mut n = FileIntegrityNode::new(name, FileIntegrityNodeSpec { node: name.into() });
        n.status = Some(FileIntegrityNodeStatus {
            baseline_alarm: alarm.map(|secs| BaselineAlarm {
                id: "b7".into(),
                reason: "BaselineTampered".into(),
                since: Time(at(secs)),
                message: "the baseline is not the one the cluster knows".into(),
            }),
            verification: gap.map(|secs| ChainVerification {
                verified_through: 10,
                from: 0,
                since: Time(at(0)),
                gaps: vec![EvidenceGap {
                    first: 5,
                    last: 7,
                    reason: "Missing".into(),
                    since: Time(at(secs)),
                }],
                entries: vec![],
                unexplained: vec![],
            }),
            ..Default::default()
        });
        n
    }

    #[test]
    fn a_nodes_alarms_are_delivered_once_each_in_its_order_and_hold_nothing() {
        let mut index = listed(vec![change("a1", "a", 10), change("a3", "a", 30)]);
        let mut p = Progress::default();
        p.ack(&p.clone().next_batch(&index, 10));
        // Tampering found at 20, between a1 and a3 (delivered already): late,
        // so delivered next.
        let Observed::New(n, keys) =
            index.observe_node(watcher::Event::Apply(node("a", Some(20), None)))
        else {
            panic!("the alarm is new");
        };
        assert_eq!(n, "a");
        assert_eq!(keys.len(), 1);
        p.observe_new(&n, &keys[0]);
        let batch = p.next_batch(&index, 10);
        assert_eq!(names(&batch), ["a/baseline/b7"]);
        assert!(matches!(&batch[0], Record::Alarm(a) if a.reason == "BaselineTampered"));
        p.ack(&batch);
        assert!(p.next_batch(&index, 10).is_empty(), "delivered once");
        // Seen again (any status write of the node): the same id, nothing new.
        assert_eq!(
            index.observe_node(watcher::Event::Apply(node("a", Some(20), None))),
            Observed::Nothing
        );
        // A gap after a3: in the node's order after it, with a later change.
        index.observe(watcher::Event::Apply(change("a5", "a", 50)));
        let Observed::New(_, keys) =
            index.observe_node(watcher::Event::Apply(node("a", Some(20), Some(40))))
        else {
            panic!("the gap is new");
        };
        assert_eq!(keys.len(), 1, "only the gap is new: {keys:?}");
        // The alarm cleared before the sink got to it: delivered all the same.
        index.observe_node(watcher::Event::Apply(node("a", None, None)));
        assert_eq!(
            names(&p.next_batch(&index, 10)),
            ["a/gap/5-7/Missing", "a5"]
        );
        // A relist of the changes keeps the alarms; they are no change.
        index.observe(watcher::Event::Init);
        for c in [
            change("a1", "a", 10),
            change("a3", "a", 30),
            change("a5", "a", 50),
        ] {
            index.observe(watcher::Event::InitApply(c));
        }
        index.observe(watcher::Event::InitDone);
        assert_eq!(index.len(), 3, "changes only");
        assert_eq!(
            names(&p.next_batch(&index, 10)),
            ["a/gap/5-7/Missing", "a5"]
        );
        // Retention of a delivered change waits for no alarm.
        let sinks = [("s".to_string(), p.clone(), Duration::from_secs(3600))];
        let hold = decide_hold(vec!["a1".into(), "a3".into()], &index, &sinks, at(60));
        assert_eq!(hold.allowed, ["a1", "a3"]);
        assert!(hold.held.is_empty());
        // A restart (a progress from the sink's status) sends the alarms its
        // position passed once more, with their ids.
        let mut restarted = Progress::from_status(&p.to_status(), Duration::ZERO);
        restarted.ack(&restarted.clone().next_batch(&index, 10));
        restarted.resend_alarms(&index);
        let again = restarted.next_batch(&index, 10);
        assert_eq!(names(&again), ["a/baseline/b7", "a/gap/5-7/Missing"]);
        restarted.ack(&again);
        assert!(restarted.next_batch(&index, 10).is_empty());
    }

    #[test]
    fn a_node_rewriting_its_alarm_cannot_grow_the_index_without_bound() {
        let mut index = listed(vec![]);
        for i in 0..(MAX_ALARMS_PER_NODE as i64 + 50) {
            index.observe_node(watcher::Event::Apply(node("a", None, Some(i))));
        }
        let pending = Progress::default().backlog(&index).pending;
        assert_eq!(pending, MAX_ALARMS_PER_NODE);
    }

    #[test]
    fn deleted_changes_leave_the_index_and_the_backlog() {
        let mut index = listed(vec![change("a1", "a", 10), change("b1", "b", 11)]);
        assert_eq!(index.find("b1").map(|(n, _)| n.as_str()), Some("b"));
        index.observe(watcher::Event::Delete(change("b1", "b", 11)));
        assert!(index.find("b1").is_none());
        assert_eq!(index.len(), 1);
        let mut p = Progress::default();
        assert_eq!(names(&p.next_batch(&index, 10)), ["a1"]);
    }

    #[test]
    fn one_busy_node_does_not_starve_the_others() {
        let mut changes: Vec<FileChange> = (0..50)
            .map(|i| change(&format!("a{i:02}"), "a", 100 + i))
            .collect();
        changes.push(change("b0", "b", 120));
        let index = listed(changes);
        let mut p = Progress::default();
        let mut order = Vec::new();
        loop {
            let batch = p.next_batch(&index, 7);
            if batch.is_empty() {
                break;
            }
            order.extend(names(&batch));
            p.ack(&batch);
        }
        assert_eq!(order.len(), 51);
        let b = order.iter().position(|n| n == "b0").unwrap();
        assert_eq!(order[b - 1], "a20");
        assert_eq!(order[b + 1], "a21");
    }

    #[test]
    fn retention_waits_for_every_sink_up_to_its_hold_max() {
        let now = at(10_000);
        let index = listed(vec![
            change("old", "a", 10),
            change("mid", "a", 9_000),
            change("new", "a", 9_990),
        ]);
        let hour = Duration::from_secs(3600);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let doomed = names(&["old", "mid", "new", "unknown"]);

        // Nobody has delivered anything: only what is past holdMax goes.
        let fast = (String::from("fast"), Progress::default(), hour);
        let d = decide_hold(doomed.clone(), &index, std::slice::from_ref(&fast), now);
        assert_eq!(d.allowed, ["old"]);
        assert_eq!(d.held["fast"], 2);
        assert_eq!(d.expired["fast"], ["old"]);

        // A sink that delivered up to "mid" holds only "new".
        let mut up_to_mid = Progress::default();
        let batch: Vec<_> = up_to_mid.clone().next_batch(&index, 2);
        up_to_mid.ack(&batch);
        let caught_up = (String::from("caught-up"), up_to_mid, hour);
        let d = decide_hold(
            doomed.clone(),
            &index,
            std::slice::from_ref(&caught_up),
            now,
        );
        assert_eq!(d.allowed, ["old", "mid"]);
        assert!(d.expired.is_empty(), "delivered, so nothing lost");
        assert_eq!(d.held["caught-up"], 1);

        // With both sinks, every sink must have it or be past its holdMax.
        let d = decide_hold(doomed, &index, &[fast, caught_up], now);
        assert_eq!(d.allowed, ["old"]);
        assert_eq!(d.expired["fast"], ["old"]);
        assert!(!d.expired.contains_key("caught-up"));
    }
}
