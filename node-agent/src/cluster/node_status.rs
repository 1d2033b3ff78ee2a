//! The agent's own `FileIntegrityNode`: created once with the Node as owner
//! (the garbage collector removes it with the Node), its status rewritten on
//! every heartbeat.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use kube_fim_crds::{
    FileIntegrityNode, FileIntegrityNodeSpec, FileIntegrityNodeStatus, NodeAttribution,
};

use crate::attribution::AttributionState;

use crate::report::deliver::FIELD_MANAGER;

/// Creates the node's FileIntegrityNode if it does not exist yet; returns it.
pub async fn ensure(
    api: &Api<FileIntegrityNode>,
    node: &Node,
) -> Result<FileIntegrityNode, kube::Error> {
    let name = node.name_any();
    if let Some(existing) = api.get_opt(&name).await? {
        return Ok(existing);
    }
    let mut object = FileIntegrityNode::new(&name, FileIntegrityNodeSpec { node: name.clone() });
    if let Some(uid) = node.uid() {
        object.metadata.owner_references = Some(vec![OwnerReference {
            api_version: Node::api_version(&()).into_owned(),
            kind: Node::kind(&()).into_owned(),
            name: name.clone(),
            uid,
            ..OwnerReference::default()
        }]);
    }
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&params, &object).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await,
        Err(e) => Err(e),
    }
}

/// Replaces the node status; returns the stored object.
pub async fn write(
    api: &Api<FileIntegrityNode>,
    node: &str,
    status: &FileIntegrityNodeStatus,
) -> Result<FileIntegrityNode, kube::Error> {
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Merge(&status_patch(status)),
    )
    .await
}

/// The merge patch that makes the stored status `status`. A JSON merge patch
/// replaces lists whole, so policies the agent no longer serves disappear
/// from it.
fn status_patch(status: &FileIntegrityNodeStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    // An empty list is left out by serde, and a merge patch would then keep the
    // stored one: say "no policies" explicitly.
    if let Some(map) = value.as_object_mut() {
        map.entry("policies")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        // Likewise attribution no longer asked for is removed, not kept.
        map.entry("attribution").or_insert(serde_json::Value::Null);
        // Entry digests exist only with a baseline digest: before the first
        // scan the agent knows none, and the stored ones stay (admission
        // refuses emptying them while the node serves a policy).
        if status.baseline_digest.is_some() {
            map.entry("entries")
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        }
        // A cleared alarm is removed (null), not left as it was.
        map.entry("baselineAlarm")
            .or_insert(serde_json::Value::Null);
    }
    serde_json::json!({ "status": value })
}

/// What the node status says about process attribution: nothing when no served
/// policy asks for it.
pub fn attribution(state: &AttributionState) -> Option<NodeAttribution> {
    if state.active {
        Some(NodeAttribution {
            mechanism: "fanotify".into(),
            reason: None,
            kernel_features: state.features.iter().map(|f| f.to_string()).collect(),
            file_systems: Some(state.fs_marks as i64),
            directories: Some(state.dirs as i64),
        })
    } else {
        state.reason.as_ref().map(|reason| NodeAttribution {
            mechanism: "inotify".into(),
            reason: Some(reason.clone()),
            ..NodeAttribution::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_the_first_scan_the_stored_entries_and_digest_are_kept() {
        let patch = status_patch(&FileIntegrityNodeStatus::default());
        let status = &patch["status"];
        assert!(status.get("entries").is_none(), "{patch}");
        assert!(status.get("baselineDigest").is_none(), "{patch}");
        assert_eq!(status["policies"], serde_json::json!([]));
        assert!(status["baselineAlarm"].is_null());
    }

    #[test]
    fn with_a_baseline_the_entries_are_replaced_even_when_none_are_left() {
        let patch = status_patch(&FileIntegrityNodeStatus {
            baseline_digest: Some("d".repeat(64)),
            ..FileIntegrityNodeStatus::default()
        });
        assert_eq!(patch["status"]["entries"], serde_json::json!([]));
        assert_eq!(patch["status"]["baselineDigest"], "d".repeat(64));
    }
}
