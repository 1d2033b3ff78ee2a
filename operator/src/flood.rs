//! A node whose FileChanges arrive far faster than its policies allow.
//!
//! An agent paces a storm at its policies' caps (`maxChangesPerNodePerMinute`
//! per entry) and never sends more. A node creating FileChanges at a multiple
//! of that is not its agent following the protocol: the node's token used by
//! hand, or the agent replaced. All agents share one API priority level (API
//! Priority and Fairness tells flows apart by user, and every agent is the same
//! ServiceAccount), so such a node also delays every other node's reports. The
//! operator counts each node's new FileChanges over the last minute and raises
//! a `ChangeFlood` Warning Event on the Node and `kube_fim_operator_change_floods_total`
//! (alert `KubeFimChangeFlood`) once per minute while it lasts. The flood is
//! also recorded on the node's FileIntegrityNode (`status.floods`, the
//! operator's field: [`record`]), where evidence sinks pick it up as an alarm.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::selection::matches_labels;
use kube_fim_crds::{ChangeFloodRecord, FileIntegrityPolicy};

/// The window counted.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How far above its policies' allowance a node's rate must be.
pub const FACTOR: u64 = 2;
/// A floor, so that a node with no policy (or a tiny cap) is not flagged for a
/// handful of changes.
pub const MIN_BUDGET: u64 = 120;

/// What a node's policies allow it to create per minute, times [`FACTOR`]:
/// each policy selecting it contributes its cap per entry.
pub fn budget<'a>(node: &Node, policies: impl IntoIterator<Item = &'a FileIntegrityPolicy>) -> u64 {
    let allowed: u64 = policies
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && matches_labels(p, node))
        .map(|p| {
            u64::from(p.spec.max_changes_per_node_per_minute)
                * p.spec.effective_paths().len().max(1) as u64
        })
        .sum();
    (allowed * FACTOR).max(MIN_BUDGET)
}

#[derive(Debug, Default)]
struct NodeWindow {
    created: VecDeque<Timestamp>,
    /// Until when the current flood was already said.
    said_until: Option<Timestamp>,
}

/// New FileChanges per node over the last [`WINDOW`].
#[derive(Debug, Default)]
pub struct Floods {
    nodes: Mutex<HashMap<String, NodeWindow>>,
}

/// A node found flooding: what to say.
#[derive(Debug, PartialEq)]
pub struct Flood {
    pub node: String,
    pub count: usize,
    pub budget: u64,
}

impl Floods {
    /// Counts a FileChange of `node` created at `created` (seen at `now`; one
    /// created before the window, e.g. delivered late after an outage, is not
    /// counted). Returns the flood when the node's count just went past
    /// `budget`, at most once per window.
    pub fn observe(
        &self,
        node: &str,
        created: Timestamp,
        now: Timestamp,
        budget: u64,
    ) -> Option<Flood> {
        let window = jiff_span(WINDOW);
        if created < now - window {
            return None;
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let w = nodes.entry(node.to_string()).or_default();
        w.created.push_back(created);
        while w.created.front().is_some_and(|t| *t < now - window) {
            w.created.pop_front();
        }
        if (w.created.len() as u64) <= budget || w.said_until.is_some_and(|t| now < t) {
            return None;
        }
        w.said_until = Some(now + window);
        Some(Flood {
            node: node.to_string(),
            count: w.created.len(),
            budget,
        })
    }
}

/// Floods a node's record keeps.
pub const RECORDED: usize = 16;

/// The node's flood records with `flood` (said at `now`) added ([`merge`]).
pub fn record(
    existing: &[ChangeFloodRecord],
    flood: &Flood,
    now: Timestamp,
) -> Vec<ChangeFloodRecord> {
    merge(existing, &flood.record(now))
}

impl Flood {
    /// Its record, said at `now`.
    pub fn record(&self, now: Timestamp) -> ChangeFloodRecord {
        ChangeFloodRecord {
            since: Time(now),
            last: Time(now),
            count: self.count as u64,
            budget: self.budget,
        }
    }
}

/// The node's flood records with `flood` added: a flood said within two
/// windows of a record (the same flood said again a minute later, or a
/// record written a moment ago) extends that record, its `since` (the
/// alarm's id) unchanged: one alarm per flood, however long; a new one
/// starts a record; the newest [`RECORDED`] are kept.
pub fn merge(existing: &[ChangeFloodRecord], flood: &ChangeFloodRecord) -> Vec<ChangeFloodRecord> {
    let mut out = existing.to_vec();
    out.sort_by_key(|r| r.since.0);
    let gap = jiff_span(WINDOW * 2);
    let same = out
        .iter_mut()
        .rev()
        .find(|r| flood.since.0 <= r.last.0 + gap && flood.last.0 + gap >= r.since.0);
    match same {
        Some(r) => {
            if flood.last.0 >= r.last.0 {
                r.last = flood.last.clone();
                r.budget = flood.budget;
            }
            r.count = r.count.max(flood.count);
        }
        None => {
            out.push(flood.clone());
            out.sort_by_key(|r| r.since.0);
        }
    }
    let excess = out.len().saturating_sub(RECORDED);
    out.drain(..excess);
    out
}

/// `existing` with every flood of `found` recorded ([`merge`]).
pub fn merged(
    existing: &[ChangeFloodRecord],
    found: &[ChangeFloodRecord],
) -> Vec<ChangeFloodRecord> {
    found
        .iter()
        .fold(existing.to_vec(), |acc, f| merge(&acc, f))
}

impl Floods {
    /// Forgets nodes with nothing in the window (bounded memory).
    pub fn trim(&self, now: Timestamp) {
        let window = jiff_span(WINDOW);
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|_, w| w.created.back().is_some_and(|t| *t >= now - window));
    }
}

fn jiff_span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(d.as_secs() as i64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube_fim_crds::{FileIntegrityPolicySpec, MonitoredPath};

    fn policy(cap: u32, entries: usize, selector: &[(&str, &str)]) -> FileIntegrityPolicy {
        let mut spec = FileIntegrityPolicySpec::with_paths(
            (0..entries)
                .map(|i| MonitoredPath {
                    name: format!("e{i}"),
                    path: format!("/etc/e{i}"),
                    ..MonitoredPath::default()
                })
                .collect(),
        );
        spec.max_changes_per_node_per_minute = cap;
        spec.node_selector = selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        FileIntegrityPolicy::new("p", spec)
    }

    fn node(labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("a".into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n
    }

    #[test]
    fn the_budget_is_twice_what_the_selecting_policies_allow() {
        let web = node(&[("role", "web")]);
        let ps = [
            policy(50, 3, &[("role", "web")]),
            policy(100, 1, &[]),
            policy(1000, 5, &[("role", "db")]),
        ];
        assert_eq!(budget(&web, &ps), 2 * (50 * 3 + 100));
        assert_eq!(budget(&web, &[]), MIN_BUDGET);
        assert_eq!(budget(&web, &[policy(1, 1, &[])]), MIN_BUDGET);
    }

    #[test]
    fn a_flood_said_each_minute_is_one_record_and_a_new_one_another() {
        let flood = |count| Flood {
            node: "a".into(),
            count,
            budget: 120,
        };
        let t0 = Timestamp::from_second(1_000).unwrap();
        let r = record(&[], &flood(121), t0);
        assert_eq!(r.len(), 1);
        // Said again a minute later, and again: the same flood, its peak kept.
        let r = record(&r, &flood(300), t0 + jiff_span(WINDOW));
        let r = record(&r, &flood(200), t0 + jiff_span(WINDOW * 2));
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].since.0, r[0].count), (t0, 300));
        assert_eq!(r[0].last.0, t0 + jiff_span(WINDOW * 2));
        // Quiet for longer than two windows: a new flood, a new record.
        let later = t0 + jiff_span(WINDOW * 10);
        let r = record(&r, &flood(150), later);
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].since.0, r[1].count), (later, 150));
        // Bounded: the oldest go.
        let mut r = r;
        for i in 0..40 {
            r = record(&r, &flood(130), later + jiff_span(WINDOW * (5 * i + 5)));
        }
        assert_eq!(r.len(), RECORDED);
        assert!(r.windows(2).all(|w| w[0].since.0 < w[1].since.0));
    }

    #[test]
    fn a_flood_written_late_joins_its_record_and_keeps_its_id() {
        let flood = |count| Flood {
            node: "a".into(),
            count,
            budget: 120,
        };
        let t0 = Timestamp::from_second(1_000).unwrap();
        let stored = record(&[], &flood(121), t0);
        let stored = record(&stored, &flood(300), t0 + jiff_span(WINDOW));
        // Said a minute before the newest write, its own write refused and
        // tried again: the same flood, its id, end and peak kept.
        let again = merged(&stored, &[flood(200).record(t0 + jiff_span(WINDOW / 2))]);
        assert_eq!(again, stored);
        // An earlier flood, retried after a later one was written: a record
        // of its own, beside it, in order.
        let early = flood(500).record(t0 - jiff_span(WINDOW * 10));
        let both = merged(&stored, std::slice::from_ref(&early));
        assert_eq!(both.len(), 2);
        assert_eq!(both[0], early);
        assert_eq!(both[1], stored[0]);
    }

    #[test]
    fn a_flood_is_said_once_a_window_and_old_changes_do_not_count() {
        let floods = Floods::default();
        let t0 = Timestamp::now();
        let at = |s: i64| t0 + k8s_openapi::jiff::SignedDuration::from_secs(s);
        // 10 a second against a budget of 120 a minute: past it after 12 s.
        let mut said = Vec::new();
        for i in 0..300 {
            let now = at(i / 10);
            if let Some(f) = floods.observe("a", now, now, 120) {
                said.push((i / 10, f.count));
            }
            // Another node at its allowance is never flagged.
            if i % 3 == 0 {
                assert_eq!(floods.observe("b", now, now, 120), None);
            }
        }
        assert_eq!(said, [(12, 121)]);
        // A minute later, still flooding: said again.
        let mut later = None;
        for i in 0..200 {
            let now = at(61 + i / 10);
            later = later.or(floods.observe("a", now, now, 120));
        }
        assert!(later.is_some());
        // Reports created long ago and delivered now (after an outage) are not a flood.
        let quiet = Floods::default();
        let now = at(1000);
        for _ in 0..1000 {
            assert_eq!(quiet.observe("c", at(0), now, 120), None);
        }
        floods.trim(at(10_000));
        assert!(floods.nodes.lock().unwrap().is_empty());
    }
}
