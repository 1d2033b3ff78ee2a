//! `FileIntegrityNode`: what one node's agent reports about itself, per policy.
//!
//! A pod can be Running while its agent cannot scan, so the operator does not
//! derive policy status from pods: each agent owns one `FileIntegrityNode`, named
//! after its node, and writes its `status`. The operator aggregates these into
//! each policy's status and deletes the records of nodes that no longer exist
//! (agents also set the Node as owner, so the garbage collector removes them).
// kube's `printcolumn(...)` attributes repeat `type_ = ...` by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The agent on one node. The object's name is the node's name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "fim.kube-fim.io",
    version = "v1alpha1",
    kind = "FileIntegrityNode",
    plural = "fileintegritynodes",
    shortname = "fin",
    category = "fim",
    status = "FileIntegrityNodeStatus",
    doc = "FileIntegrityNode is the report of the kube-fim agent on one node (named after the node).",
    printcolumn(
        name = "Policies",
        type_ = "integer",
        json_path = ".status.policyCount",
        description = "Policies the agent serves on this node"
    ),
    printcolumn(
        name = "Files",
        type_ = "integer",
        json_path = ".status.filesMonitored",
        description = "Distinct files monitored on this node"
    ),
    printcolumn(
        name = "Queued",
        type_ = "integer",
        json_path = ".status.queueLength",
        description = "Changes waiting to be delivered to the API server"
    ),
    printcolumn(
        name = "Attribution",
        type_ = "string",
        json_path = ".status.attribution.mechanism",
        priority = 1,
        description = "fanotify when changes name their writer; inotify when it fell back"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.heartbeatTime",
        description = "Last time the agent reported"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FileIntegrityNodeSpec {
    /// Name of the node (equal to the object's name).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("spec.node cannot be changed"))]
    pub node: String,
}

/// What the agent on the node reports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FileIntegrityNodeStatus {
    /// Version of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub agent_version: Option<String>,

    /// Last time the agent wrote this status. The operator counts a node whose
    /// heartbeat is older than three minutes as not reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,

    /// Number of policies the agent serves on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_count: Option<i32>,

    /// Distinct files monitored on the node (a file two policies watch counts once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_monitored: Option<i64>,

    /// Changes recorded on the node and not yet stored by the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_length: Option<i64>,

    /// BLAKE3 digest of the agent's on-node baseline as last written. At start the
    /// agent compares its baseline on disk with this value; a mismatch means the
    /// baseline was edited on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub baseline_digest: Option<String>,

    /// One entry per policy the agent serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["policy"]))]
    pub policies: Vec<NodePolicyStatus>,
    /// Process attribution on this node, when a served policy asks for it:
    /// whether the writers of changes are named, and if not, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<NodeAttribution>,

    /// A digest per policy entry of the baseline (a Merkle summary): after the
    /// state directory is lost or replaced, the agent compares a fresh
    /// baseline with these and names the entries that differ.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["policy", "entry"]))]
    pub entries: Vec<EntryDigest>,

    /// Set when the baseline on the node is missing, unreadable or not the one
    /// the cluster knows. It stays (the node's policies Failed) until an admin
    /// clears it by annotating this object with
    /// `fim.kube-fim.io/clear-baseline-alarm=<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_alarm: Option<BaselineAlarm>,
}

/// The digest of one policy entry's part of the baseline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EntryDigest {
    /// Policy name.
    #[schemars(length(max = 63))]
    pub policy: String,
    /// Entry name within the policy.
    #[schemars(length(max = 63))]
    pub entry: String,
    /// Multiset hash of the entry's paths and approved states (`v2-...`; earlier
    /// versions: BLAKE3 over them in path order).
    #[schemars(length(max = 64))]
    pub digest: String,
    /// Paths the entry covers in the baseline.
    pub files: i64,
    /// For an entry that covers exactly one path: that path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub path: Option<String>,
}

/// An alarm about the baseline on the node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BaselineAlarm {
    /// Identifies this alarm: the value of the annotation that clears it.
    #[schemars(length(max = 64))]
    pub id: String,
    /// `BaselineMissing`, `BaselineUnreadable` or `BaselineTampered`.
    #[schemars(length(max = 64))]
    pub reason: String,
    /// When the agent raised it.
    pub since: Time,
    /// What was found, and the entries that differ from what the cluster last saw.
    #[schemars(length(max = 4096))]
    pub message: String,
}

/// Process attribution on one node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeAttribution {
    /// `fanotify` when the writers of changes are named; `inotify` when the
    /// agent fell back to it and changes carry no writer.
    #[schemars(length(max = 16))]
    pub mechanism: String,
    /// Why attribution is off (no CAP_SYS_ADMIN, kernel too old, no fanotify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// Kernel features in use (`FAN_REPORT_DFID_NAME`, `FAN_REPORT_PIDFD`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    pub kernel_features: Vec<String>,
    /// File systems carrying a fanotify mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_systems: Option<i64>,
    /// Monitored directories followed through those marks (no inotify watch each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directories: Option<i64>,
}

/// Phase of one policy on one node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NodePolicyPhase {
    /// The first baseline is being built; no changes are reported yet.
    #[default]
    Baselining,
    /// The baseline exists and changes are reported.
    Ready,
    /// The agent cannot serve the policy (see message).
    Failed,
    /// The node's labels (or taints) no longer select it: the agent keeps the
    /// policy's baseline but compares nothing. `observedGeneration` is the
    /// generation last served; the operator raises `NodeLeftMonitoring` while
    /// the policy is unchanged since.
    Unselected,
}

/// One policy on one node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicyStatus {
    /// Name of the policy.
    #[schemars(length(min = 1, max = 63))]
    pub policy: String,

    /// The policy generation the agent applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the agent is with this policy.
    pub phase: NodePolicyPhase,

    /// Files of this policy monitored on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_monitored: Option<i64>,

    /// Completion time of the last full scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scan_time: Option<Time>,

    /// When the baseline was first completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_time: Option<Time>,

    /// Files that could not be read in the last scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<i64>,

    /// Human-readable detail, e.g. why the phase is Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}
