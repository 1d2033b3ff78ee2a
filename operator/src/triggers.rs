//! What a watch event means for the reconcilers, and when they run.
//!
//! Each watch remembers, per object, only what the reconcilers depend on (a
//! Node's labels and taints, an agent's per-policy report and whether it is
//! fresh, a policy's spec generation and metadata). An event that changes none
//! of it wakes nothing: agents' heartbeats, kubelets' status updates and the
//! operator's own status writes cost a comparison, not a reconcile. An event
//! that does wakes only the policies it concerns. Wake-ups are collected for
//! one batch window and handed over together, so a policy waits at most one
//! window however many events arrive (a debounce that restarts on every event
//! would wait for a quiet moment that a large fleet never has).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube_fim_crds::{FileIntegrityNode, FileIntegrityPolicy};

use crate::changes::Item;
use crate::seen::Change;
use crate::status::{heartbeat_is_fresh, report_digest, selects};

/// What the reconcilers must look at again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// These policies' status may have changed.
    pub policies: BTreeSet<String>,
    /// Every policy's status may have changed (after a re-list).
    pub all_policies: bool,
    /// The agent DaemonSet or the records of deleted nodes may need work.
    pub fleet: bool,
}

impl Wake {
    fn everything() -> Wake {
        Wake {
            all_policies: true,
            fleet: true,
            ..Wake::default()
        }
    }
}

/// What of a Node decides which policies select it.
pub fn node_view(node: &Node) -> Node {
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name.clone(),
            labels: node.metadata.labels.clone(),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: node.spec.as_ref().and_then(|s| s.taints.clone()),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// A Node appeared, changed or went away: the policies whose selection of it
/// changed; a Node gone also leaves a record for the fleet to delete.
pub fn node_wake(change: Change<Node>, policies: &[Arc<FileIntegrityPolicy>]) -> Wake {
    match change {
        Change::Same => Wake::default(),
        Change::Relisted => Wake::everything(),
        Change::Changed { old, new } => {
            let selected = |node: &Option<Node>, p: &FileIntegrityPolicy| {
                node.as_ref().is_some_and(|n| selects(p, n))
            };
            Wake {
                policies: policies
                    .iter()
                    .filter(|p| selected(&old, p) != selected(&new, p))
                    .map(|p| p.name_any())
                    .collect(),
                all_policies: false,
                fleet: new.is_none(),
            }
        }
    }
}

/// What of an agent's record the policies' status depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordView {
    /// Whether the agent's heartbeat was fresh when the event arrived.
    pub fresh: bool,
    /// Per policy, a digest of the agent's report.
    pub reports: BTreeMap<String, u64>,
    /// The gaps in the node's chain (crate::chain), which degrade every
    /// policy the node reports on.
    pub gaps: Vec<(u64, u64)>,
}

/// Sees a record as the policies' status does, at `now`.
pub fn record_view(
    record: &FileIntegrityNode,
    now: Timestamp,
    heartbeat_timeout: Duration,
) -> RecordView {
    let status = record.status.as_ref();
    RecordView {
        fresh: heartbeat_is_fresh(status, now, heartbeat_timeout),
        reports: status
            .map(|s| {
                s.policies
                    .iter()
                    .map(|p| (p.policy.clone(), report_digest(p)))
                    .collect()
            })
            .unwrap_or_default(),
        gaps: status
            .and_then(|s| s.verification.as_ref())
            .map(|v| v.gaps.iter().map(|g| (g.first, g.last)).collect())
            .unwrap_or_default(),
    }
}

/// An agent's record changed: the policies whose report on that node changed,
/// or all the policies it reports on when the agent went silent or came back.
pub fn record_wake(change: Change<RecordView>) -> Wake {
    match change {
        Change::Same => Wake::default(),
        Change::Relisted => Wake {
            all_policies: true,
            ..Wake::default()
        },
        Change::Changed { old, new } => {
            let empty = RecordView {
                fresh: false,
                reports: BTreeMap::new(),
                gaps: Vec::new(),
            };
            let (old, new) = (old.unwrap_or(empty.clone()), new.unwrap_or(empty));
            let names = old.reports.keys().chain(new.reports.keys());
            let policies = if old.fresh != new.fresh || old.gaps != new.gaps {
                names.cloned().collect()
            } else {
                names
                    .filter(|name| old.reports.get(*name) != new.reports.get(*name))
                    .cloned()
                    .collect()
            };
            Wake {
                policies,
                ..Wake::default()
            }
        }
    }
}

/// A FileChange was reported, approved or deleted: its policy's counts
/// changed (the agent's answer to an approval changes none of them). After a
/// re-list, changes may have gone unseen: every policy.
pub fn change_wake(change: Change<Item>, policies: &[Arc<FileIntegrityPolicy>]) -> Wake {
    match change {
        Change::Same => Wake::default(),
        Change::Relisted => Wake {
            all_policies: true,
            ..Wake::default()
        },
        Change::Changed { old, new } => {
            let touched: BTreeSet<String> = old.into_iter().chain(new).map(|i| i.policy).collect();
            Wake {
                policies: policies
                    .iter()
                    .map(|p| p.name_any())
                    .filter(|name| touched.contains(name))
                    .collect(),
                ..Wake::default()
            }
        }
    }
}

/// What of a policy the reconcilers act on; a status write changes none of it.
pub fn policy_view(policy: &FileIntegrityPolicy) -> u64 {
    let meta = &policy.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.labels.hash(&mut h);
    meta.annotations.hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    h.finish()
}

/// A policy was created, edited or deleted: its status and the DaemonSet (the
/// union of all policies) follow.
pub fn policy_wake(change: Change<u64>, name: Option<String>) -> Wake {
    match change {
        Change::Same => Wake::default(),
        Change::Relisted => Wake::everything(),
        Change::Changed { new, .. } => Wake {
            policies: name.filter(|_| new.is_some()).into_iter().collect(),
            all_policies: false,
            fleet: true,
        },
    }
}

/// Wake-ups collected during the current batch window, and the time the oldest
/// change behind each arrived (to measure how long a status lags its inputs).
#[derive(Debug, Default)]
pub struct Pending {
    waiting: HashMap<String, Instant>,
    all_since: Option<Instant>,
    fleet: bool,
    handed_over: HashMap<String, Instant>,
}

fn keep_oldest(map: &mut HashMap<String, Instant>, name: String, since: Instant) {
    let e = map.entry(name).or_insert(since);
    *e = (*e).min(since);
}

impl Pending {
    /// Adds what an event woke, at `now`.
    pub fn add(&mut self, wake: Wake, now: Instant) {
        for name in wake.policies {
            keep_oldest(&mut self.waiting, name, now);
        }
        if wake.all_policies {
            self.all_since.get_or_insert(now);
        }
        self.fleet |= wake.fleet;
    }

    /// At the end of a window: the policies to reconcile now. `all` lists every
    /// policy; it is only called when a re-list woke them all.
    pub fn take_policies(&mut self, all: impl FnOnce() -> Vec<String>) -> Vec<String> {
        if let Some(since) = self.all_since.take() {
            for name in all() {
                keep_oldest(&mut self.waiting, name, since);
            }
        }
        let mut names = Vec::with_capacity(self.waiting.len());
        for (name, since) in self.waiting.drain() {
            names.push(name.clone());
            keep_oldest(&mut self.handed_over, name, since);
        }
        names.sort();
        names
    }

    /// At the end of a window: whether the fleet needs a pass.
    pub fn take_fleet(&mut self) -> bool {
        std::mem::take(&mut self.fleet)
    }

    /// A reconcile of `policy` starts: when the oldest change it covers arrived.
    pub fn started(&mut self, policy: &str) -> Option<Instant> {
        self.handed_over.remove(policy)
    }

    /// A reconcile failed: the changes it covered still wait (for the next try).
    pub fn failed(&mut self, policy: &str, since: Instant) {
        keep_oldest(&mut self.handed_over, policy.to_string(), since);
    }

    /// Drops what is kept for policies that no longer exist.
    pub fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        self.waiting.retain(|name, _| exists(name));
        self.handed_over.retain(|name, _| exists(name));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::seen::Seen;
    use k8s_openapi::api::core::v1::Taint;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::runtime::watcher;
    use kube_fim_crds::{
        FileIntegrityNodeSpec, FileIntegrityNodeStatus, FileIntegrityPolicySpec, MonitoredPath,
        NodePolicyPhase, NodePolicyStatus,
    };

    fn policy(name: &str, role: &str) -> Arc<FileIntegrityPolicy> {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
            name: "passwd".into(),
            path: "/etc/passwd".into(),
            ..MonitoredPath::default()
        }]);
        spec.node_selector = BTreeMap::from([("role".to_string(), role.to_string())]);
        let mut p = FileIntegrityPolicy::new(name, spec);
        p.metadata.generation = Some(1);
        Arc::new(p)
    }

    #[test]
    fn a_file_change_wakes_its_policy_and_a_relist_every_policy() {
        let policies = [policy("a", "x"), policy("b", "x")];
        let item = |policy: &str, approved: bool| Item {
            name: "c1".into(),
            policy: policy.into(),
            node: "n1".into(),
            created: Timestamp::now(),
            approved,
            sequence: None,
            moves: Vec::new(),
            transition: None,
            parts: None,
            package_verified: false,
            entry: "etc".into(),
            host_path: None,
            compliance_labels: Default::default(),
        };
        let woke = |change: Change<Item>| change_wake(change, &policies);
        let b = BTreeSet::from(["b".to_string()]);
        let reported = Change::Changed {
            old: None,
            new: Some(item("b", false)),
        };
        assert_eq!(woke(reported).policies, b);
        let approved = Change::Changed {
            old: Some(item("b", false)),
            new: Some(item("b", true)),
        };
        assert_eq!(woke(approved).policies, b);
        let deleted = Change::Changed {
            old: Some(item("b", true)),
            new: None,
        };
        assert_eq!(woke(deleted).policies, b);
        let elsewhere = Change::Changed {
            old: None,
            new: Some(item("served-by-another-operator", false)),
        };
        assert_eq!(woke(elsewhere), Wake::default());
        assert_eq!(woke(Change::Same), Wake::default());
        assert!(woke(Change::Relisted).all_policies);
    }

    fn node(role: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.metadata.labels = Some(BTreeMap::from([("role".to_string(), role.to_string())]));
        n
    }

    fn record(heartbeat: Timestamp, files: i64) -> FileIntegrityNode {
        let mut r = FileIntegrityNode::new("n1", FileIntegrityNodeSpec { node: "n1".into() });
        r.status = Some(FileIntegrityNodeStatus {
            heartbeat_time: Some(Time(heartbeat)),
            queue_length: Some(files),
            policies: vec![NodePolicyStatus {
                policy: "web".into(),
                phase: NodePolicyPhase::Ready,
                files_monitored: Some(files),
                ..NodePolicyStatus::default()
            }],
            ..FileIntegrityNodeStatus::default()
        });
        r
    }

    const TIMEOUT: Duration = Duration::from_secs(180);

    #[test]
    fn a_heartbeat_wakes_nothing_a_new_report_wakes_its_policy() {
        let mut seen = Seen::default();
        let t0 = Timestamp::now();
        let view = |r: &FileIntegrityNode| record_view(r, t0, TIMEOUT);
        let first = record_wake(seen.observe(&watcher::Event::Apply(record(t0, 5)), view));
        assert_eq!(first.policies, BTreeSet::from(["web".to_string()]));

        // A heartbeat: same reports, still fresh.
        let later = t0 + Duration::from_secs(30);
        let beat = record_wake(seen.observe(&watcher::Event::Apply(record(later, 5)), |r| {
            record_view(r, later, TIMEOUT)
        }));
        assert_eq!(beat, Wake::default());

        let changed = record_wake(seen.observe(&watcher::Event::Apply(record(later, 6)), |r| {
            record_view(r, later, TIMEOUT)
        }));
        assert_eq!(changed.policies, BTreeSet::from(["web".to_string()]));
        assert!(!changed.fleet);
    }

    #[test]
    fn an_agent_coming_back_wakes_its_policies() {
        let mut seen = Seen::default();
        let t0 = Timestamp::now();
        let late = t0 + Duration::from_secs(600);
        // Seen last with a heartbeat long past (silent agent) ...
        seen.observe(&watcher::Event::Apply(record(t0, 5)), |r| {
            record_view(r, late, TIMEOUT)
        });
        // ... and now beating again with the same report.
        let back = record_wake(seen.observe(&watcher::Event::Apply(record(late, 5)), |r| {
            record_view(r, late, TIMEOUT)
        }));
        assert_eq!(back.policies, BTreeSet::from(["web".to_string()]));
    }

    #[test]
    fn node_changes_wake_the_policies_whose_selection_changed() {
        let policies = [policy("web", "web"), policy("db", "db")];
        let mut seen = Seen::default();
        let added = node_wake(
            seen.observe(&watcher::Event::Apply(node("web")), node_view),
            &policies,
        );
        assert_eq!(added.policies, BTreeSet::from(["web".to_string()]));
        assert!(!added.fleet);

        // A kubelet status update: labels and taints unchanged.
        let mut beat = node("web");
        beat.status = Some(Default::default());
        let same = node_wake(
            seen.observe(&watcher::Event::Apply(beat), node_view),
            &policies,
        );
        assert_eq!(same, Wake::default());

        let relabelled = node_wake(
            seen.observe(&watcher::Event::Apply(node("db")), node_view),
            &policies,
        );
        assert_eq!(
            relabelled.policies,
            BTreeSet::from(["web".to_string(), "db".to_string()])
        );

        let mut tainted = node("db");
        tainted.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "dedicated".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        let t = node_wake(
            seen.observe(&watcher::Event::Apply(tainted.clone()), node_view),
            &policies,
        );
        assert_eq!(t.policies, BTreeSet::from(["db".to_string()]));

        let gone = node_wake(
            seen.observe(&watcher::Event::Delete(tainted), node_view),
            &policies,
        );
        assert!(gone.fleet);
    }

    #[test]
    fn a_status_write_is_not_a_policy_change() {
        let mut seen = Seen::default();
        let p = policy("web", "web");
        let w = policy_wake(
            seen.observe(&watcher::Event::Apply((*p).clone()), policy_view),
            Some("web".into()),
        );
        assert!(w.fleet && w.policies.contains("web"));
        let mut with_status = (*p).clone();
        with_status.status = Some(Default::default());
        let w = policy_wake(
            seen.observe(&watcher::Event::Apply(with_status.clone()), policy_view),
            Some("web".into()),
        );
        assert_eq!(w, Wake::default());
        let w = policy_wake(
            seen.observe(&watcher::Event::Delete(with_status), policy_view),
            Some("web".into()),
        );
        assert!(w.fleet && w.policies.is_empty());
    }

    #[test]
    fn a_relist_replaces_what_was_seen_and_wakes_everything() {
        let mut seen = Seen::default();
        seen.observe(&watcher::Event::Apply(node("web")), node_view);
        assert_eq!(
            seen.observe(&watcher::Event::<Node>::Init, node_view),
            Change::Same
        );
        assert_eq!(
            seen.observe(&watcher::Event::<Node>::InitDone, node_view),
            Change::Relisted
        );
        // The node vanished during the re-list: seen again, it is new.
        assert!(matches!(
            seen.observe(&watcher::Event::Apply(node("web")), node_view),
            Change::Changed { old: None, .. }
        ));
    }

    #[test]
    fn pending_keeps_the_oldest_change_per_policy_until_its_reconcile() {
        let mut pending = Pending::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(300);
        let wake = |names: &[&str]| Wake {
            policies: names.iter().map(|s| s.to_string()).collect(),
            ..Wake::default()
        };
        pending.add(wake(&["a"]), t0);
        pending.add(wake(&["a", "b"]), t1);
        assert_eq!(pending.take_policies(Vec::new), ["a", "b"]);
        assert!(pending.take_policies(Vec::new).is_empty());
        assert!(!pending.take_fleet());
        assert_eq!(pending.started("a"), Some(t0));
        assert_eq!(pending.started("a"), None);
        pending.failed("b", t0);
        assert_eq!(pending.started("b"), Some(t0));

        pending.add(Wake::everything(), t1);
        assert_eq!(pending.take_policies(|| vec!["c".to_string()]), ["c"]);
        assert!(pending.take_fleet());
    }
}
