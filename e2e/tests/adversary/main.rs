//! Attacks on the agent, each against the real agent binary and the real API
//! server, each asserting what a security team sees: a FileChange, an Event, a
//! condition, a metric. The threat model is in the README ("Security model").
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

mod approvals;
mod chain;
mod hiding;
mod rights;
mod selection;
mod storm;
mod tamper;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube_fim_crds::labels::CLEAR_BASELINE_ALARM;
use kube_fim_crds::{
    ChangeCategory, DetectionSource, FileChange, FileChangeSpec, FileIntegrityNode,
    FileIntegrityPolicy, NodePolicyPhase,
};
use kube_fim_e2e::fleet::{Fleet, describe, entry};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::{
    assert_refused, client, create_node, delete_node, eventually, http_get, kubectl, metric,
    unique_name,
};

const READY: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(20);
/// What an operator started by the test says: its first pass waits for its
/// caches, which under the whole suite's load on two cores took up to 40 s.
const OPERATOR: Duration = Duration::from_secs(90);

/// Waits for a FileChange `Category path` on `node`; returns it.
async fn wait_change(fleet: &Fleet, node: &str, want: &str) -> FileChange {
    eventually(&format!("{want} on {node}"), SEEN, || async {
        let changes = fleet.changes(node).await;
        changes
            .iter()
            .find(|c| describe(c) == want)
            .cloned()
            .ok_or_else(|| format!("{:?}", changes.iter().map(describe).collect::<Vec<_>>()))
    })
    .await
}

/// Warning Events with `reason` whose note mentions `node`.
async fn warnings(client: &kube::Client, reason: &str, node: &str) -> Vec<Event> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.note.as_deref().unwrap_or("").contains(node)
        })
        .collect()
}

async fn wait_warning(client: &kube::Client, reason: &str, node: &str) -> Event {
    eventually(&format!("a {reason} warning for {node}"), SEEN, || async {
        warnings(client, reason, node)
            .await
            .into_iter()
            .next()
            .ok_or_else(|| "none yet".to_string())
    })
    .await
}

async fn record(client: &kube::Client, node: &str) -> FileIntegrityNode {
    Api::<FileIntegrityNode>::all(client.clone())
        .get(node)
        .await
        .unwrap()
}

async fn phase(client: &kube::Client, node: &str, policy: &str) -> Option<NodePolicyPhase> {
    record(client, node)
        .await
        .status
        .and_then(|s| s.policies.into_iter().find(|p| p.policy == policy))
        .map(|p| p.phase)
}

/// A Warning Event of `reason` about the policy `policy`.
async fn wait_policy_warning(client: &kube::Client, reason: &str, policy: &str) -> Event {
    eventually(
        &format!("a {reason} Warning about {policy}"),
        OPERATOR,
        || async {
            Api::<Event>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy)
                })
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await
}

/// A ClusterRole with only `verbs` on FileChanges (and their status), bound
/// to ServiceAccount `kube-fim/<sa>`; a client logged in as it.
async fn limited_user(sa: &str, verbs: &str) -> kube::Client {
    let role = format!("kube-fim-e2e-{sa}");
    let run = kubectl([
        "create".to_string(),
        "clusterrole".to_string(),
        role.clone(),
        format!("--verb={verbs}"),
        "--resource=filechanges.fim.kube-fim.io,filechanges.fim.kube-fim.io/status".to_string(),
    ]);
    assert!(
        run.success || run.stderr.contains("AlreadyExists"),
        "{}",
        run.stderr
    );
    kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(sa, &role)).await
}

async fn wait_warning_within(
    client: &kube::Client,
    reason: &str,
    node: &str,
    within: Duration,
) -> Event {
    eventually(
        &format!("a {reason} warning for {node}"),
        within,
        || async {
            warnings(client, reason, node)
                .await
                .into_iter()
                .next()
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await
}

/// The node's published digest of `policy`/`entry`.
async fn published_digest(client: &kube::Client, node: &str, policy: &str, entry: &str) -> String {
    record(client, node)
        .await
        .status
        .unwrap_or_default()
        .entries
        .into_iter()
        .find(|e| e.policy == policy && e.entry == entry)
        .map(|e| e.digest)
        .unwrap_or_default()
}
