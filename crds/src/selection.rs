//! Which nodes a policy selects: the same answer for the operator (status) and
//! the agent (which policies to serve).

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use kube::ResourceExt;

use crate::FileIntegrityPolicy;

/// Whether `toleration` tolerates `taint` (the scheduler's rule).
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref()
        && !effect.is_empty()
        && effect != taint.effect
    {
        return false;
    }
    let exists = toleration.operator.as_deref() == Some("Exists");
    match toleration.key.as_deref() {
        None | Some("") => exists,
        Some(key) if key != taint.key => false,
        Some(_) => {
            exists
                || toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

/// Taints the kubelet and the node lifecycle controller put on a node in
/// trouble (and `kubectl cordon`). The agent DaemonSet tolerates them all: a
/// node in trouble is when an attacker acts, so they never stop monitoring.
pub const NODE_CONDITION_TAINTS: &[&str] = &[
    "node.kubernetes.io/unschedulable",
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
    "node.kubernetes.io/network-unavailable",
];

/// Whether the policy's node selector matches the node's labels. This alone
/// decides what a running agent serves: taints decide where agents run, never
/// whether a running agent keeps monitoring.
pub fn matches_labels(policy: &FileIntegrityPolicy, node: &Node) -> bool {
    let labels = node.labels();
    policy
        .spec
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether the policy selects the node: its labels match the node selector and
/// the policy tolerates the node's scheduling taints (so an agent can run
/// there). Node-condition taints and cordon are always tolerated.
pub fn selects(policy: &FileIntegrityPolicy, node: &Node) -> bool {
    if !matches_labels(policy, node) {
        return false;
    }
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .filter(|t| !NODE_CONDITION_TAINTS.contains(&t.key.as_str()))
        .all(|t| policy.spec.tolerations.iter().any(|tol| tolerates(tol, t)))
}
