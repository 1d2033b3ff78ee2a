//! Fleet comparison: nodes of one pool should hold the same image-owned
//! files, so the entry digests their agents publish (`status.entries` of each
//! FileIntegrityNode) should agree. A node whose digest of an entry differs
//! from a clear majority of its pool is an outlier, whenever its files came to
//! differ, before kube-fim was installed included.
//!
//! A pool is the nodes of one image — the OS image, kernel and architecture
//! the kubelet reports — and of the same values of the `--fleet-pool-label`
//! keys: nodes of different images differ by design (a node-image rollout
//! mixes two images in one node group for hours), nodes of one image should
//! not. Only entries whose digest means the same on every node are compared:
//! an entry comparing inode numbers, times or mounts (the `full` and
//! `permissions` profiles do) has a different digest on every node whatever
//! its files; list the attributes (`attributes: [hash, type, mode, uid, gid,
//! linkTarget]`) for an entry to compare across the fleet.
//!
//! Each node publishes only its own record (admission binds it to the node),
//! so one node is one vote: it can make itself an outlier, or tip a pool
//! that had no clear majority, never out-vote a clear one.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube_fim_crds::{
    Attribute, FileIntegrityNode, FileIntegrityPolicy, FleetOutlier, NodePolicyPhase,
};

/// Outliers listed in a policy's status at most.
pub const MAX_LISTED: usize = 50;

/// Attributes whose value is a node's own even for identical files.
const NODE_OWN: [Attribute; 4] = [
    Attribute::Inode,
    Attribute::Mtime,
    Attribute::Ctime,
    Attribute::Mount,
];

/// How pools and majorities are decided.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Node label keys whose values also split pools.
    pub pool_labels: Vec<String>,
    /// Nodes that must agree for a majority (and more than half the pool).
    pub min_agree: usize,
}

/// The outliers of one policy.
#[derive(Debug, Default, PartialEq)]
pub struct Comparison {
    /// Sorted by node and entry, at most [`MAX_LISTED`].
    pub listed: Vec<FleetOutlier>,
    /// Outliers found (node and entry), listed or not.
    pub total: usize,
}

/// A node's pool.
pub fn pool_of(node: &Node, pool_labels: &[String]) -> String {
    let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
    let mut pool = match info {
        Some(i) => format!("{}/{}/{}", i.os_image, i.kernel_version, i.architecture),
        None => "unknown image".to_string(),
    };
    for key in pool_labels {
        let value = node.labels().get(key).map(String::as_str).unwrap_or("");
        pool.push_str(&format!(",{key}={value}"));
    }
    pool
}

/// The entries of `policy` whose digests can be compared between nodes.
pub fn comparable_entries(policy: &FileIntegrityPolicy) -> Vec<String> {
    policy
        .spec
        .effective_paths()
        .iter()
        .filter(|e| e.enabled)
        .filter(|e| {
            !e.effective_attributes()
                .iter()
                .any(|a| NODE_OWN.contains(a))
        })
        .map(|e| e.name.clone())
        .collect()
}

/// Compares the entry digests of the nodes that serve `policy` (Ready).
pub fn compare(
    policy: &FileIntegrityPolicy,
    nodes: &[impl Borrow<Node>],
    records: &[impl Borrow<FileIntegrityNode>],
    s: &Settings,
) -> Comparison {
    let entries = comparable_entries(policy);
    if entries.is_empty() {
        return Comparison::default();
    }
    let name = policy.name_any();
    let pools: HashMap<String, String> = nodes
        .iter()
        .map(|n| n.borrow())
        .map(|n| (n.name_any(), pool_of(n, &s.pool_labels)))
        .collect();
    // (pool, entry) → digest → nodes.
    let mut votes: BTreeMap<(&str, &str), BTreeMap<&str, Vec<String>>> = BTreeMap::new();
    for record in records.iter().map(|r| r.borrow()) {
        let node = record.name_any();
        let Some(pool) = pools.get(&node) else {
            continue;
        };
        let Some(status) = record.status.as_ref() else {
            continue;
        };
        let ready = status
            .policies
            .iter()
            .any(|p| p.policy == name && p.phase == NodePolicyPhase::Ready);
        if !ready {
            continue;
        }
        for d in status.entries.iter().filter(|d| d.policy == name) {
            let Some(entry) = entries.iter().find(|e| **e == d.entry) else {
                continue;
            };
            votes
                .entry((pool.as_str(), entry.as_str()))
                .or_default()
                .entry(d.digest.as_str())
                .or_default()
                .push(node.clone());
        }
    }
    let mut found = Vec::new();
    for ((pool, entry), by_digest) in &votes {
        let pool_nodes: usize = by_digest.values().map(Vec::len).sum();
        let Some((majority, agree)) = by_digest.iter().max_by_key(|(_, n)| n.len()) else {
            continue;
        };
        if agree.len() < s.min_agree.max(1) || agree.len() * 2 <= pool_nodes {
            continue;
        }
        for (digest, nodes) in by_digest {
            if digest == majority {
                continue;
            }
            for node in nodes {
                found.push(FleetOutlier {
                    node: node.clone(),
                    entry: entry.to_string(),
                    pool: pool.to_string(),
                    majority: agree.len() as i32,
                    pool_nodes: pool_nodes as i32,
                });
            }
        }
    }
    found.sort_by(|a, b| (&a.node, &a.entry).cmp(&(&b.node, &b.entry)));
    let total = found.len();
    found.truncate(MAX_LISTED);
    Comparison {
        listed: found,
        total,
    }
}

/// Outliers of `new` that `old` did not list: what `FleetDrift` Events say.
pub fn new_outliers<'a>(old: &[FleetOutlier], new: &'a [FleetOutlier]) -> Vec<&'a FleetOutlier> {
    new.iter()
        .filter(|n| !old.iter().any(|o| o.node == n.node && o.entry == n.entry))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeStatus, NodeSystemInfo};
    use kube_fim_crds::{
        EntryDigest, FileIntegrityNodeSpec, FileIntegrityNodeStatus, FileIntegrityPolicySpec,
        MonitoredPath, NodePolicyStatus,
    };

    fn policy() -> FileIntegrityPolicy {
        FileIntegrityPolicy::new(
            "p",
            FileIntegrityPolicySpec::with_paths(vec![
                MonitoredPath {
                    name: "bin".into(),
                    path: "/usr/bin".into(),
                    recursive: true,
                    attributes: vec![Attribute::Hash, Attribute::Mode, Attribute::Uid],
                    ..MonitoredPath::default()
                },
                // The default profile compares inodes: never compared.
                MonitoredPath {
                    name: "etc".into(),
                    path: "/etc".into(),
                    recursive: true,
                    ..MonitoredPath::default()
                },
            ]),
        )
    }

    fn node(name: &str, image: &str, pool: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some([("pool".to_string(), pool.to_string())].into());
        n.status = Some(NodeStatus {
            node_info: Some(NodeSystemInfo {
                os_image: image.into(),
                kernel_version: "6.1".into(),
                architecture: "amd64".into(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        });
        n
    }

    fn record(name: &str, bin: &str, etc: &str) -> FileIntegrityNode {
        let mut r = FileIntegrityNode::new(name, FileIntegrityNodeSpec { node: name.into() });
        r.status = Some(FileIntegrityNodeStatus {
            policies: vec![NodePolicyStatus {
                policy: "p".into(),
                phase: NodePolicyPhase::Ready,
                ..NodePolicyStatus::default()
            }],
            entries: [("bin", bin), ("etc", etc)]
                .into_iter()
                .map(|(entry, digest)| EntryDigest {
                    policy: "p".into(),
                    entry: entry.into(),
                    digest: digest.into(),
                    files: 3,
                    path: None,
                })
                .collect(),
            ..FileIntegrityNodeStatus::default()
        });
        r
    }

    fn settings() -> Settings {
        Settings {
            pool_labels: vec![],
            min_agree: 3,
        }
    }

    #[test]
    fn the_node_that_differs_from_a_clear_majority_of_its_pool_is_named() {
        let nodes = ["a", "b", "c", "d"].map(|n| node(n, "Debian 12", "web"));
        let records = [
            record("a", "x", "e1"),
            record("b", "x", "e2"),
            record("c", "x", "e3"),
            record("d", "TROJAN", "e4"),
        ];
        let found = compare(&policy(), &nodes, &records, &settings());
        assert_eq!(
            found.total, 1,
            "etc compares inodes: every node differs, none is named"
        );
        let o = &found.listed[0];
        assert_eq!((o.node.as_str(), o.entry.as_str()), ("d", "bin"));
        assert_eq!((o.majority, o.pool_nodes), (3, 4));
        assert_eq!(o.pool, "Debian 12/6.1/amd64");
    }

    #[test]
    fn one_node_cannot_out_vote_a_clear_majority_nor_make_a_small_pool_name_anyone() {
        // Two nodes agree, one differs: below three agreeing, nobody is named.
        let nodes = ["a", "b", "c"].map(|n| node(n, "Debian 12", "web"));
        let records = [
            record("a", "x", "-"),
            record("b", "x", "-"),
            record("c", "y", "-"),
        ];
        assert_eq!(compare(&policy(), &nodes, &records, &settings()).total, 0);
        // Two against two: no majority, nobody named, whoever publishes what.
        let nodes = ["a", "b", "c", "d"].map(|n| node(n, "Debian 12", "web"));
        let records = [
            record("a", "x", "-"),
            record("b", "x", "-"),
            record("c", "y", "-"),
            record("d", "y", "-"),
        ];
        assert_eq!(compare(&policy(), &nodes, &records, &settings()).total, 0);
        // An attacker node joining a clear majority's pool with its own digest
        // names only itself.
        let nodes = ["a", "b", "c", "evil"].map(|n| node(n, "Debian 12", "web"));
        let records = [
            record("a", "x", "-"),
            record("b", "x", "-"),
            record("c", "x", "-"),
            record("evil", "y", "-"),
        ];
        let found = compare(&policy(), &nodes, &records, &settings());
        assert_eq!(
            found
                .listed
                .iter()
                .map(|o| o.node.as_str())
                .collect::<Vec<_>>(),
            ["evil"]
        );
    }

    #[test]
    fn pools_are_split_by_image_and_by_the_configured_labels() {
        // Three nodes on the old image, three on the new: two pools, no outlier.
        let nodes = [
            node("a", "img-1", "web"),
            node("b", "img-1", "web"),
            node("c", "img-1", "db"),
            node("d", "img-2", "web"),
            node("e", "img-2", "web"),
            node("f", "img-2", "db"),
        ];
        let records = [
            record("a", "x", "-"),
            record("b", "x", "-"),
            record("c", "x", "-"),
            record("d", "y", "-"),
            record("e", "y", "-"),
            record("f", "y", "-"),
        ];
        assert_eq!(compare(&policy(), &nodes, &records, &settings()).total, 0);
        // Split by the pool label too: each pool is too small to name anyone.
        let by_label = Settings {
            pool_labels: vec!["pool".into()],
            min_agree: 2,
        };
        assert_eq!(compare(&policy(), &nodes, &records, &by_label).total, 0);
        assert_eq!(
            pool_of(&nodes[0], &by_label.pool_labels),
            "img-1/6.1/amd64,pool=web"
        );
    }

    #[test]
    fn a_node_not_ready_for_the_policy_does_not_vote() {
        let nodes = ["a", "b", "c", "d"].map(|n| node(n, "Debian 12", "web"));
        let mut late = record("d", "y", "-");
        late.status.as_mut().unwrap().policies[0].phase = NodePolicyPhase::Baselining;
        let records = [
            record("a", "x", "-"),
            record("b", "x", "-"),
            record("c", "x", "-"),
            late,
        ];
        assert_eq!(compare(&policy(), &nodes, &records, &settings()).total, 0);
    }
}
