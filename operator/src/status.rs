//! A policy's status, computed from the Nodes and the agents' per-node reports.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube_fim_crds::{
    FileIntegrityNode, FileIntegrityNodeStatus, FileIntegrityPolicy, FileIntegrityPolicyStatus,
    NodePolicyPhase, NodePolicyStatus,
};

/// Condition type: every selected node has a baseline and reports.
pub const READY: &str = "Ready";
/// Condition type: something needs an admin's attention.
pub const DEGRADED: &str = "Degraded";
/// Degraded reason: a node the policy monitored is no longer selected by it.
pub const NODE_LEFT: &str = "NodeLeftMonitoring";
/// Condition type, on policies that set `processAttribution`: the ready nodes
/// name the writer of each change.
pub const ATTRIBUTION: &str = "ProcessAttribution";

/// What the condition says about privileges: one DaemonSet serves every policy,
/// so attribution widens the agent's privileges wherever it runs.
pub const ATTRIBUTION_PRIVILEGES: &str = "while any policy sets processAttribution, the one agent DaemonSet runs with CAP_SYS_ADMIN, CAP_SYS_PTRACE and hostPID on every node it runs on, also the nodes of policies that do not ask for it";

/// Counts of the policy's FileChange objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub last_24h: i64,
    pub unacknowledged: i64,
}

use kube_fim_crds::selection::matches_labels;
pub use kube_fim_crds::selection::selects;

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
    previous: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // The transition time moves only when the status does.
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The ProcessAttribution condition from the ready nodes' reports.
fn attribution_condition(
    nodes: &[(String, Option<kube_fim_crds::NodeAttribution>)],
) -> (bool, &'static str, String) {
    let on = nodes
        .iter()
        .filter(|(_, a)| a.as_ref().is_some_and(|a| a.mechanism == "fanotify"))
        .count();
    let off: Vec<(String, String)> = nodes
        .iter()
        .filter(|(_, a)| a.as_ref().is_none_or(|a| a.mechanism != "fanotify"))
        .map(|(n, a)| {
            let why = a
                .as_ref()
                .and_then(|a| a.reason.clone())
                .unwrap_or_else(|| "not reported yet".into());
            (n.clone(), why)
        })
        .collect();
    let head = format!(
        "{on} of {} ready nodes name the writer of each change (fanotify)",
        nodes.len()
    );
    let (ok, reason, head) = if nodes.is_empty() {
        (false, "NoNodeReady", head)
    } else if off.is_empty() {
        (true, "WritersNamed", head)
    } else {
        (
            false,
            "AttributionOff",
            format!("{head}; off (inotify only) on {}", summarize(&off)),
        )
    };
    (
        ok,
        reason,
        format!("{head}. Privileges: {ATTRIBUTION_PRIVILEGES}"),
    )
}

/// Everything computed about one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Assessment {
    pub status: FileIntegrityPolicyStatus,
    /// Nodes whose agent failed this policy or stopped reporting, with why.
    pub troubled_nodes: Vec<(String, String)>,
    /// Nodes that left the policy's selection while it was unchanged.
    pub left_nodes: Vec<String>,
}

/// Whether an agent's last heartbeat is recent enough for it to count as reporting.
pub fn heartbeat_is_fresh(
    status: Option<&FileIntegrityNodeStatus>,
    now: Timestamp,
    heartbeat_timeout: Duration,
) -> bool {
    status
        .and_then(|s| s.heartbeat_time.as_ref())
        .is_some_and(|h| now.duration_since(h.0).unsigned_abs() <= heartbeat_timeout)
}

/// A digest of exactly the fields of a node's report that [`assess`] reads:
/// when it is unchanged (an agent's heartbeat), the policy's status is too.
pub fn report_digest(report: &NodePolicyStatus) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    report.phase.hash(&mut h);
    report.files_monitored.hash(&mut h);
    report
        .last_scan_time
        .as_ref()
        .map(|t| t.0.as_millisecond())
        .hash(&mut h);
    report.message.hash(&mut h);
    h.finish()
}

/// Computes a policy's status. `invalid` is the reason the policy cannot be
/// served (it failed validation), if any. Linear in the number of nodes.
pub fn assess(
    policy: &FileIntegrityPolicy,
    invalid: Option<&str>,
    nodes: &[impl Borrow<Node>],
    records: &[impl Borrow<FileIntegrityNode>],
    counts: ChangeCounts,
    now: Timestamp,
    heartbeat_timeout: Duration,
) -> Assessment {
    let name = policy.name_any();
    let records: HashMap<&str, &FileIntegrityNode> = records
        .iter()
        .map(|r| r.borrow())
        .filter_map(|r| Some((r.metadata.name.as_deref()?, r)))
        .collect();
    let generation = policy.metadata.generation;
    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();

    let mut selected = 0i32;
    let mut ready = 0i32;
    let mut baselining = 0i32;
    let mut files = 0i64;
    let mut oldest_scan: Option<Timestamp> = None;
    let mut troubled = Vec::new();
    // Nodes whose chain of transition numbers has gaps (crate::chain).
    let mut gaps: Vec<(String, String)> = Vec::new();
    // Ready nodes and what each says about attribution (`None`: nothing yet).
    let mut attribution: Vec<(String, Option<kube_fim_crds::NodeAttribution>)> = Vec::new();

    if invalid.is_none() {
        for node in nodes
            .iter()
            .map(|n| n.borrow())
            .filter(|n| selects(policy, n))
        {
            selected += 1;
            let node_name = node.name_any();
            let status = records
                .get(node_name.as_str())
                .and_then(|r| r.status.as_ref());
            if let Some(v) = status.and_then(|s| s.verification.as_ref())
                && !v.gaps.is_empty()
            {
                gaps.push((
                    node_name.clone(),
                    format!(
                        "EvidenceGap: transition numbers {} have no FileChange and are not queued on the node",
                        crate::chain::describe(&v.gaps)
                    ),
                ));
            }
            if let Some(v) = status.and_then(|s| s.verification.as_ref())
                && !v.unexplained.is_empty()
            {
                gaps.push((
                    node_name.clone(),
                    format!(
                        "EvidenceGap: entry digests moved with nothing in the cluster to explain them: {}",
                        crate::chain::digests::describe(&v.unexplained)
                    ),
                ));
            }
            let entry = status.and_then(|s| s.policies.iter().find(|p| p.policy == name));
            let fresh = heartbeat_is_fresh(status, now, heartbeat_timeout);
            match (entry, fresh) {
                // An agent that reports but has not taken the policy up yet.
                (None, true) => baselining += 1,
                // No agent report at all: a new node or policy, or an agent
                // still starting (its image pulled) — until the node and the
                // policy are older than twice the heartbeat timeout, then it
                // never reported.
                (None, false) if !both_older_than(node, policy, now, 2 * heartbeat_timeout) => {
                    baselining += 1
                }
                (None, false) => troubled.push((
                    node_name,
                    format!(
                        "agent has not reported for more than {}s since the node was selected",
                        2 * heartbeat_timeout.as_secs()
                    ),
                )),
                (Some(_), false) => troubled.push((
                    node_name,
                    format!(
                        "agent has not reported for more than {}s",
                        heartbeat_timeout.as_secs()
                    ),
                )),
                (Some(e), true) => match e.phase {
                    NodePolicyPhase::Baselining => baselining += 1,
                    NodePolicyPhase::Ready => {
                        ready += 1;
                        if policy.spec.process_attribution {
                            attribution.push((
                                node_name.clone(),
                                status.and_then(|s| s.attribution.clone()),
                            ));
                        }
                        files += e.files_monitored.unwrap_or(0);
                        if let Some(t) = &e.last_scan_time {
                            oldest_scan = Some(oldest_scan.map_or(t.0, |o| o.min(t.0)));
                        }
                    }
                    NodePolicyPhase::Failed => troubled.push((
                        node_name,
                        e.message.clone().unwrap_or_else(|| "agent failed".into()),
                    )),
                    // Selected again: the agent takes it up at its next look.
                    NodePolicyPhase::Unselected => baselining += 1,
                },
            }
        }
    }
    troubled.sort();
    gaps.sort();
    let left = if invalid.is_none() {
        left_nodes(policy, nodes, &records, now, heartbeat_timeout)
    } else {
        Vec::new()
    };

    let (ready_ok, ready_reason, ready_message) = if let Some(why) = invalid {
        (false, "InvalidPolicy", why.to_string())
    } else if selected == 0 {
        (
            false,
            "NoNodesSelected",
            "no node matches the policy's nodeSelector and tolerations".to_string(),
        )
    } else if ready == selected {
        (
            true,
            "AllNodesReady",
            format!("{ready} of {selected} nodes report"),
        )
    } else if !troubled.is_empty() {
        (
            false,
            "NodesNotReady",
            format!(
                "{ready} of {selected} nodes report; {} failing",
                troubled.len()
            ),
        )
    } else {
        (
            false,
            "Baselining",
            format!("{ready} of {selected} nodes report; {baselining} building their baseline"),
        )
    };
    let (degraded, degraded_reason, degraded_message) = if let Some(why) = invalid {
        (true, "InvalidPolicy", why.to_string())
    } else if !gaps.is_empty() {
        (true, "EvidenceGap", summarize(&gaps))
    } else if !left.is_empty() {
        (true, NODE_LEFT, summarize(&left))
    } else if troubled
        .iter()
        .any(|(_, m)| m.starts_with("agent has not reported"))
    {
        (true, "AgentNotReporting", summarize(&troubled))
    } else if !troubled.is_empty() {
        (true, "AgentFailed", summarize(&troubled))
    } else {
        (false, "AsExpected", "no trouble reported".to_string())
    };

    let mut conditions = vec![
        condition(
            READY,
            ready_ok,
            ready_reason,
            ready_message,
            generation,
            now,
            previous,
        ),
        condition(
            DEGRADED,
            degraded,
            degraded_reason,
            degraded_message,
            generation,
            now,
            previous,
        ),
    ];
    if policy.spec.process_attribution && invalid.is_none() {
        let (ok, reason, message) = attribution_condition(&attribution);
        conditions.push(condition(
            ATTRIBUTION,
            ok,
            reason,
            message,
            generation,
            now,
            previous,
        ));
    }

    Assessment {
        status: FileIntegrityPolicyStatus {
            observed_generation: generation,
            conditions,
            nodes_selected: Some(selected),
            nodes_ready: Some(ready),
            nodes_baselining: Some(baselining),
            nodes_left: Some(left.len() as i32),
            files_monitored: Some(files),
            last_scan_time: oldest_scan.map(Time),
            changes_last24h: Some(counts.last_24h),
            unacknowledged_changes: Some(counts.unacknowledged),
            ..FileIntegrityPolicyStatus::default()
        },
        troubled_nodes: troubled,
        left_nodes: left.into_iter().map(|(n, _)| n).collect(),
    }
}

/// Whether the node and the policy both exist for longer than `age` (a missing
/// creation time counts as just created).
fn both_older_than(
    node: &Node,
    policy: &FileIntegrityPolicy,
    now: Timestamp,
    age: Duration,
) -> bool {
    let old = |t: Option<&Time>| t.is_some_and(|t| now.duration_since(t.0).unsigned_abs() > age);
    old(node.metadata.creation_timestamp.as_ref())
        && old(policy.metadata.creation_timestamp.as_ref())
}

/// Nodes that served this policy and are no longer selected by it while the
/// policy is unchanged since (the generation the agent last served is the
/// current one): their labels or taints moved them out. A node that no longer
/// exists has not left monitoring, it left the cluster; a policy edited since
/// is an admin's recorded act.
///
/// Taints alone (a `NoSchedule` the policy does not tolerate) keep a running
/// agent serving the policy: such a node has left only once its agent stops
/// reporting (evicted by a `NoExecute` taint) or says it no longer serves it.
fn left_nodes(
    policy: &FileIntegrityPolicy,
    nodes: &[impl Borrow<Node>],
    records: &HashMap<&str, &FileIntegrityNode>,
    now: Timestamp,
    heartbeat_timeout: Duration,
) -> Vec<(String, String)> {
    let name = policy.name_any();
    let mut left: Vec<(String, String)> = nodes
        .iter()
        .map(|n| n.borrow())
        .filter(|n| !selects(policy, n))
        .filter_map(|n| {
            let node_name = n.name_any();
            let status = records.get(node_name.as_str())?.status.as_ref()?;
            let entry = status.policies.iter().find(|p| p.policy == name)?;
            let served = entry.observed_generation?;
            let stopped = !matches_labels(policy, n)
                || entry.phase == NodePolicyPhase::Unselected
                || !heartbeat_is_fresh(Some(status), now, heartbeat_timeout);
            (stopped && Some(served) == policy.metadata.generation).then(|| {
                (
                    node_name,
                    format!(
                        "left monitoring: the node's labels or taints no longer match the policy (generation {served}); its agent compares nothing for it"
                    ),
                )
            })
        })
        .collect();
    left.sort();
    left
}

fn summarize(troubled: &[(String, String)]) -> String {
    let mut out = troubled
        .iter()
        .take(5)
        .map(|(n, m)| format!("{n}: {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    if troubled.len() > 5 {
        out.push_str(&format!(" (and {} more nodes)", troubled.len() - 5));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint, Toleration};
    use kube_fim_crds::{
        FileIntegrityNodeSpec, FileIntegrityNodeStatus, FileIntegrityPolicySpec, MonitoredPath,
        NodePolicyStatus,
    };
    use std::collections::BTreeMap;

    fn policy(selector: &[(&str, &str)]) -> FileIntegrityPolicy {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
            name: "passwd".into(),
            path: "/etc/passwd".into(),
            ..MonitoredPath::default()
        }]);
        spec.node_selector = selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut p = FileIntegrityPolicy::new("p", spec);
        p.metadata.generation = Some(3);
        p
    }

    fn node(name: &str, labels: &[(&str, &str)], taints: Vec<Taint>) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        n.spec = Some(NodeSpec {
            taints: Some(taints),
            ..NodeSpec::default()
        });
        n
    }

    fn record(
        node: &str,
        phase: NodePolicyPhase,
        heartbeat: Timestamp,
        files: i64,
    ) -> FileIntegrityNode {
        let mut r = FileIntegrityNode::new(node, FileIntegrityNodeSpec { node: node.into() });
        r.status = Some(FileIntegrityNodeStatus {
            heartbeat_time: Some(Time(heartbeat)),
            policies: vec![NodePolicyStatus {
                policy: "p".into(),
                phase,
                files_monitored: Some(files),
                last_scan_time: Some(Time(heartbeat)),
                message: (phase == NodePolicyPhase::Failed)
                    .then(|| "cannot open /host: ENOENT".into()),
                ..NodePolicyStatus::default()
            }],
            ..FileIntegrityNodeStatus::default()
        });
        r
    }

    fn cond<'a>(s: &'a FileIntegrityPolicyStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(180);
    const NO_RECORDS: &[FileIntegrityNode] = &[];

    #[test]
    fn attribution_says_which_nodes_name_writers_and_what_it_costs() {
        let now = Timestamp::now();
        let nodes = [node("a", &[], vec![]), node("b", &[], vec![])];
        let mut records = [
            record("a", NodePolicyPhase::Ready, now, 1),
            record("b", NodePolicyPhase::Ready, now, 1),
        ];
        let with = |mechanism: &str, reason: Option<&str>| kube_fim_crds::NodeAttribution {
            mechanism: mechanism.into(),
            reason: reason.map(String::from),
            ..Default::default()
        };
        records[0].status.as_mut().unwrap().attribution = Some(with("fanotify", None));
        records[1].status.as_mut().unwrap().attribution =
            Some(with("inotify", Some("fanotify refused: no CAP_SYS_ADMIN")));
        let mut p = policy(&[]);
        let assess_with = |p: &FileIntegrityPolicy, records: &[FileIntegrityNode]| {
            assess(
                p,
                None,
                &nodes,
                records,
                ChangeCounts::default(),
                now,
                TIMEOUT,
            )
        };
        // Not asked: no condition.
        let a = assess_with(&p, &records);
        assert!(a.status.conditions.iter().all(|c| c.type_ != ATTRIBUTION));
        p.spec.process_attribution = true;
        let a = assess_with(&p, &records);
        let c = cond(&a.status, ATTRIBUTION);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "AttributionOff")
        );
        assert!(
            c.message.starts_with("1 of 2 ready nodes name the writer"),
            "{}",
            c.message
        );
        assert!(
            c.message.contains("b: fanotify refused: no CAP_SYS_ADMIN"),
            "{}",
            c.message
        );
        assert!(
            c.message
                .contains("CAP_SYS_ADMIN, CAP_SYS_PTRACE and hostPID on every node")
        );
        records[1].status.as_mut().unwrap().attribution = Some(with("fanotify", None));
        let a = assess_with(&p, &records);
        let c = cond(&a.status, ATTRIBUTION);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "WritersNamed")
        );
    }

    #[test]
    fn a_new_node_is_baselining_not_failed() {
        let now = Timestamp::now();
        let nodes = [
            node("a", &[("role", "web")], vec![]),
            node("b", &[("role", "web")], vec![]),
        ];
        let records = [record("a", NodePolicyPhase::Ready, now, 10)];
        let a = assess(
            &policy(&[("role", "web")]),
            None,
            &nodes,
            &records,
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        assert_eq!(a.status.nodes_selected, Some(2));
        assert_eq!(a.status.nodes_ready, Some(1));
        assert_eq!(a.status.nodes_baselining, Some(1));
        assert_eq!(a.status.files_monitored, Some(10));
        assert_eq!(cond(&a.status, READY).reason, "Baselining");
        assert_eq!(cond(&a.status, DEGRADED).status, "False");
        assert_eq!(a.status.observed_generation, Some(3));
    }

    #[test]
    fn all_ready_and_files_summed() {
        let now = Timestamp::now();
        let nodes = [node("a", &[], vec![]), node("b", &[], vec![])];
        let records = [
            record("a", NodePolicyPhase::Ready, now, 10),
            record("b", NodePolicyPhase::Ready, now, 5),
        ];
        let a = assess(
            &policy(&[]),
            None,
            &nodes,
            &records,
            ChangeCounts {
                last_24h: 4,
                unacknowledged: 2,
            },
            now,
            TIMEOUT,
        );
        assert_eq!(cond(&a.status, READY).status, "True");
        assert_eq!(a.status.files_monitored, Some(15));
        assert_eq!(a.status.changes_last24h, Some(4));
        assert_eq!(a.status.unacknowledged_changes, Some(2));
    }

    #[test]
    fn a_silent_agent_degrades_the_policy() {
        let now = Timestamp::now();
        let old = now - std::time::Duration::from_secs(600);
        let nodes = [node("a", &[], vec![])];
        let records = [record("a", NodePolicyPhase::Ready, old, 10)];
        let a = assess(
            &policy(&[]),
            None,
            &nodes,
            &records,
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        let d = cond(&a.status, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "AgentNotReporting")
        );
        assert!(
            d.message.contains("a: agent has not reported"),
            "{}",
            d.message
        );
        assert_eq!(cond(&a.status, READY).reason, "NodesNotReady");
    }

    #[test]
    fn a_gap_in_a_nodes_chain_degrades_its_policies() {
        let now = Timestamp::now();
        let nodes = [node("a", &[], vec![])];
        let mut records = [record("a", NodePolicyPhase::Ready, now, 1)];
        records[0].status.as_mut().unwrap().verification = Some(kube_fim_crds::ChainVerification {
            verified_through: 9,
            from: 0,
            since: Time(now),
            entries: Vec::new(),
            unexplained: Vec::new(),
            gaps: vec![kube_fim_crds::EvidenceGap {
                first: 3,
                last: 5,
                reason: "Missing".into(),
                since: Time(now),
            }],
        });
        let a = assess(
            &policy(&[]),
            None,
            &nodes,
            &records,
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        let d = cond(&a.status, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "EvidenceGap")
        );
        assert!(
            d.message.contains("a: EvidenceGap: transition numbers 3-5"),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_failed_agent_degrades_with_its_message() {
        let now = Timestamp::now();
        let nodes = [node("a", &[], vec![])];
        let records = [record("a", NodePolicyPhase::Failed, now, 0)];
        let a = assess(
            &policy(&[]),
            None,
            &nodes,
            &records,
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        let d = cond(&a.status, DEGRADED);
        assert_eq!(d.reason, "AgentFailed");
        assert!(d.message.contains("ENOENT"));
    }

    #[test]
    fn invalid_policy_is_degraded_and_selects_nothing() {
        let now = Timestamp::now();
        let nodes = [node("a", &[], vec![])];
        let a = assess(
            &policy(&[]),
            Some("spec.paths[0].path: must be absolute"),
            &nodes,
            NO_RECORDS,
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        assert_eq!(cond(&a.status, DEGRADED).reason, "InvalidPolicy");
        assert_eq!(cond(&a.status, READY).reason, "InvalidPolicy");
        assert_eq!(a.status.nodes_selected, Some(0));
    }

    #[test]
    fn untolerated_taints_deselect_a_node() {
        let now = Timestamp::now();
        let taint = Taint {
            key: "node-role.kubernetes.io/control-plane".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        let nodes = [node("cp", &[], vec![taint.clone()]), node("w", &[], vec![])];
        let mut p = policy(&[]);
        let a = assess(
            &p,
            None,
            &nodes,
            NO_RECORDS,
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        assert_eq!(a.status.nodes_selected, Some(1));
        p.spec.tolerations = vec![Toleration {
            key: Some(taint.key.clone()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }];
        let a = assess(
            &p,
            None,
            &nodes,
            NO_RECORDS,
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        assert_eq!(a.status.nodes_selected, Some(2));
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let t0 = Timestamp::now();
        let nodes = [node("a", &[], vec![])];
        let records = [record("a", NodePolicyPhase::Ready, t0, 1)];
        let mut p = policy(&[]);
        let first = assess(
            &p,
            None,
            &nodes,
            &records,
            ChangeCounts::default(),
            t0,
            TIMEOUT,
        );
        p.status = Some(first.status.clone());
        let later = t0 + std::time::Duration::from_secs(30);
        let second = assess(
            &p,
            None,
            &nodes,
            &records,
            ChangeCounts::default(),
            later,
            TIMEOUT,
        );
        assert_eq!(
            cond(&second.status, READY).last_transition_time,
            cond(&first.status, READY).last_transition_time
        );
    }

    fn aged(mut n: Node, created: Timestamp) -> Node {
        n.metadata.creation_timestamp = Some(Time(created));
        n
    }

    #[test]
    fn a_node_whose_agent_never_reports_is_not_baselining_forever() {
        let now = Timestamp::now();
        let long_ago = now - std::time::Duration::from_secs(3600);
        let mut p = policy(&[]);
        p.metadata.creation_timestamp = Some(Time(long_ago));
        let assess_nodes = |nodes: &[Node]| {
            assess(
                &p,
                None,
                nodes,
                NO_RECORDS,
                ChangeCounts::default(),
                now,
                TIMEOUT,
            )
        };
        // Just created: its agent is starting.
        let a = assess_nodes(&[aged(node("new", &[], vec![]), now)]);
        assert_eq!(a.status.nodes_baselining, Some(1));
        assert_eq!(cond(&a.status, DEGRADED).status, "False");
        // An hour old and never a word from an agent.
        let a = assess_nodes(&[aged(node("old", &[], vec![]), long_ago)]);
        assert_eq!(a.status.nodes_baselining, Some(0));
        let d = cond(&a.status, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "AgentNotReporting"),
            "{}",
            d.message
        );
        assert!(
            d.message.contains("old: agent has not reported"),
            "{}",
            d.message
        );
    }

    fn served(
        mut r: FileIntegrityNode,
        generation: i64,
        phase: NodePolicyPhase,
    ) -> FileIntegrityNode {
        let e = &mut r.status.as_mut().unwrap().policies[0];
        e.observed_generation = Some(generation);
        e.phase = phase;
        r
    }

    #[test]
    fn a_node_relabelled_out_of_an_unchanged_policy_has_left_monitoring() {
        let now = Timestamp::now();
        let p = policy(&[("role", "web")]); // generation 3
        let assess_with = |nodes: &[Node], records: &[FileIntegrityNode]| {
            assess(
                &p,
                None,
                nodes,
                records,
                ChangeCounts::default(),
                now,
                TIMEOUT,
            )
        };
        let web = node("a", &[("role", "web")], vec![]);
        let moved = node("a", &[("role", "elsewhere")], vec![]);
        let ready = served(
            record("a", NodePolicyPhase::Ready, now, 3),
            3,
            NodePolicyPhase::Ready,
        );
        let unselected = served(ready.clone(), 3, NodePolicyPhase::Unselected);

        let a = assess_with(std::slice::from_ref(&web), std::slice::from_ref(&ready));
        assert_eq!(a.status.nodes_left, Some(0));
        assert_eq!(cond(&a.status, DEGRADED).status, "False");

        // The label changed; the agent says it no longer serves the policy.
        let a = assess_with(
            std::slice::from_ref(&moved),
            std::slice::from_ref(&unselected),
        );
        assert_eq!(a.status.nodes_left, Some(1));
        assert_eq!(a.left_nodes, ["a"]);
        let d = cond(&a.status, DEGRADED);
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", NODE_LEFT));
        assert!(d.message.starts_with("a: left monitoring"), "{}", d.message);
        // Before the agent said so, its last word was Ready: the label alone tells.
        let a = assess_with(std::slice::from_ref(&moved), std::slice::from_ref(&ready));
        assert_eq!(a.status.nodes_left, Some(1));

        // The policy was edited since (an admin's act): not a departure.
        let mut edited = p.clone();
        edited.metadata.generation = Some(4);
        let a = assess(
            &edited,
            None,
            std::slice::from_ref(&moved),
            std::slice::from_ref(&unselected),
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        assert_eq!(a.status.nodes_left, Some(0));
        // The node left the cluster: not a departure from monitoring.
        let a = assess_with(&[], std::slice::from_ref(&unselected));
        assert_eq!(a.status.nodes_left, Some(0));
        // Selected again: back to baselining, nothing left.
        let a = assess_with(
            std::slice::from_ref(&web),
            std::slice::from_ref(&unselected),
        );
        assert_eq!(a.status.nodes_left, Some(0));
        assert_eq!(a.status.nodes_baselining, Some(1));
    }

    #[test]
    fn an_untolerated_taint_is_a_departure_only_once_the_agent_is_gone() {
        let now = Timestamp::now();
        let p = policy(&[]);
        let taint = Taint {
            key: "dedicated".into(),
            effect: "NoExecute".into(),
            ..Taint::default()
        };
        let tainted = node("a", &[], vec![taint]);
        let fresh = served(
            record("a", NodePolicyPhase::Ready, now, 3),
            3,
            NodePolicyPhase::Ready,
        );
        let a = assess(
            &p,
            None,
            std::slice::from_ref(&tainted),
            std::slice::from_ref(&fresh),
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        assert_eq!(a.status.nodes_left, Some(0));
        let gone = served(
            record(
                "a",
                NodePolicyPhase::Ready,
                now - std::time::Duration::from_secs(600),
                3,
            ),
            3,
            NodePolicyPhase::Ready,
        );
        let a = assess(
            &p,
            None,
            &[tainted],
            &[gone],
            ChangeCounts::default(),
            now,
            TIMEOUT,
        );
        assert_eq!(a.status.nodes_left, Some(1));
    }
}
