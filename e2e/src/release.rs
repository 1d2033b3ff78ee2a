//! The chart as a release: the Kubernetes version the suite runs, which the
//! chart's minimum must be (Chart.yaml `kubeVersion`).

use crate::repo_root;

/// The Kubernetes version of the suite's control plane (`vMAJOR.MINOR.PATCH`),
/// as pinned by `e2e/controlplane/go.mod` (the API server every e2e test and the
/// real node run).
pub fn kubernetes_version() -> String {
    let path = repo_root().join("e2e/controlplane/go.mod");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("k8s.io/kubernetes v"))
        .map(|v| format!("v{}", v.split_whitespace().next().unwrap_or(v)))
        .unwrap_or_else(|| panic!("no k8s.io/kubernetes requirement in {}", path.display()))
}

/// `(major, minor)` of a version such as `v1.33.13` or `1.33.0-0`.
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim_start_matches('v').split(['.', '-', '+']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
