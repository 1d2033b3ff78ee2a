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

/// Whether the policy selects the node: its labels match the node selector and
/// the policy tolerates the node's scheduling taints (so an agent can run there).
pub fn selects(policy: &FileIntegrityPolicy, node: &Node) -> bool {
    let labels = node.labels();
    if !policy
        .spec
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
    {
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
        .all(|t| policy.spec.tolerations.iter().any(|tol| tolerates(tol, t)))
}
