//! Which policies this agent serves: every valid policy whose node selector
//! matches its node's labels, recomputed whenever a policy or the Node changes.
//! Taints and cordon never change it: they decide where agents run, and a
//! running agent keeps monitoring through them.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube_fim_crds::FileIntegrityPolicy;
use kube_fim_crds::selection::matches_labels;
use kube_fim_crds::validate::validate_policy;

use crate::served::ServedPolicies;

/// The policies among `policies` that `node` must serve. Invalid policies
/// (stored under an older schema) are skipped: the operator reports them.
pub fn served<'a>(
    node: &Node,
    policies: impl IntoIterator<Item = &'a Arc<FileIntegrityPolicy>>,
) -> ServedPolicies {
    let (selected, unselected): (Vec<_>, Vec<_>) = policies
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| validate_policy(p).is_ok())
        .partition(|p| matches_labels(p, node));
    ServedPolicies::new(selected.into_iter().cloned())
        .with_unselected(unselected.into_iter().map(|p| p.name_any()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube_fim_crds::{FileIntegrityPolicySpec, MonitoredPath};

    fn policy(name: &str, path: &str, selector: &[(&str, &str)]) -> Arc<FileIntegrityPolicy> {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
            name: "e".into(),
            path: path.into(),
            ..MonitoredPath::default()
        }]);
        spec.node_selector = selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Arc::new(FileIntegrityPolicy::new(name, spec))
    }

    #[test]
    fn serves_valid_policies_selecting_the_node() {
        let mut node = Node::default();
        node.metadata.name = Some("n".into());
        node.metadata.labels = Some([("role".to_string(), "web".to_string())].into());
        let ps = [
            policy("all", "/etc/passwd", &[]),
            policy("web", "/etc/passwd", &[("role", "web")]),
            policy("db", "/etc/passwd", &[("role", "db")]),
            policy("broken", "etc/passwd", &[]),
        ];
        let served = served(&node, &ps);
        let names: Vec<String> = served.names().map(String::from).collect();
        assert_eq!(names, ["all", "web"]);
        // Kept baselines of "db" are published as unselected; "broken" is
        // not served anywhere, and a deleted policy is nothing.
        assert!(served.is_unselected("db"));
        assert!(!served.is_unselected("broken") && !served.is_unselected("gone"));
    }

    #[test]
    fn cordon_taints_and_not_ready_never_change_what_is_served() {
        use k8s_openapi::api::core::v1::{NodeSpec, Taint};
        let mut node = Node::default();
        node.metadata.name = Some("n".into());
        let ps = [policy("all", "/etc/passwd", &[])];
        let before: Vec<String> = served(&node, &ps).names().map(String::from).collect();
        node.spec = Some(NodeSpec {
            unschedulable: Some(true),
            taints: Some(
                [
                    ("node.kubernetes.io/unschedulable", "NoSchedule"),
                    ("node.kubernetes.io/unreachable", "NoExecute"),
                    ("dedicated", "NoSchedule"),
                ]
                .into_iter()
                .map(|(key, effect)| Taint {
                    key: key.into(),
                    effect: effect.into(),
                    ..Taint::default()
                })
                .collect(),
            ),
            ..NodeSpec::default()
        });
        let after: Vec<String> = served(&node, &ps).names().map(String::from).collect();
        assert_eq!(before, after);
        assert_eq!(after, ["all"]);
    }
}
