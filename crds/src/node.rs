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

    /// The node's next transition number as durably saved: every number below
    /// it was given to a transition the agent reports (`spec.sequence` of a
    /// FileChange of this node). It never decreases (admission refuses it);
    /// the operator checks that each number below it is a stored FileChange
    /// or listed in `undelivered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub sequence: Option<u64>,

    /// Numbers below `sequence` still waiting in the node's delivery queue,
    /// as ranges (`"12-250"`, `"300"`), lowest first. Beyond 64 ranges the
    /// last one also covers the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        inner(length(max = 41), regex(pattern = r"^[0-9]+(-[0-9]+)?$"))
    )]
    pub undelivered: Option<Vec<String>>,

    /// The operator's verification of the node's chain of transition numbers
    /// (written by the operator only; admission refuses the agent's writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<ChainVerification>,

    /// Floods the operator counted (`ChangeFlood`): the node created
    /// FileChanges far faster than its policies allow, which its agent never
    /// does (its token used outside the agent, an agent replaced, or a long
    /// outage's backlog). Written by the operator only (admission refuses the
    /// agent's writes); the newest 16, kept as evidence sinks deliver.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub floods: Vec<ChangeFloodRecord>,

    /// Storms the operator found in the node's FileChanges (`ChangeStorm`):
    /// more changes of one policy entry detected within a minute than the
    /// policy's `maxChangesPerNodePerMinute`, which the agent paces (every
    /// change still has its FileChange). Written by the operator only
    /// (admission refuses the agent's writes); the newest 16, kept as
    /// evidence sinks deliver.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub storms: Vec<ChangeStormRecord>,
}

/// One storm of changes in one policy entry of a node, from the first
/// detection of its first minute past the cap to the last detection past it.
/// Found again (later minutes, late changes, an operator restarted), it is
/// extended, never recorded twice.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChangeStormRecord {
    /// The policy whose cap the entry went past.
    #[schemars(length(max = 253))]
    pub policy: String,
    /// The entry (the agent's pacing lane).
    #[schemars(length(max = 253))]
    pub entry: String,
    /// When the first change of the storm was detected, of those the
    /// operator held when it first recorded it: the alarm's id, never moved
    /// (changes of the storm detected earlier that arrive later raise
    /// `count`).
    pub since: Time,
    /// The last detection still past the cap.
    pub last: Time,
    /// The most changes of the entry detected within one minute.
    #[schemars(range(min = 0))]
    pub count: u64,
    /// The policy's cap: changes of one entry per node per minute.
    #[schemars(range(min = 0))]
    pub cap: u64,
}

/// One flood of FileChanges from a node, from its first counted minute to
/// its last.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChangeFloodRecord {
    /// When the node first went past its allowance.
    pub since: Time,
    /// The last time it was still past it.
    pub last: Time,
    /// The most FileChanges it created in one minute.
    #[schemars(range(min = 0))]
    pub count: u64,
    /// What its policies allowed in a minute (times the operator's factor).
    #[schemars(range(min = 0))]
    pub budget: u64,
}

/// What the operator verified of a node's transition numbers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChainVerification {
    /// Every number below this one is verified: stored as a FileChange of the
    /// node when the operator looked, or listed in `gaps`. Retention deletes
    /// only FileChanges numbered below it.
    #[schemars(range(min = 0))]
    pub verified_through: u64,
    /// Where verification started (the node's `sequence` when the operator
    /// first saw it).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub from: u64,
    /// When verification started.
    pub since: Time,
    /// Numbers the node took that are neither a stored FileChange nor in its
    /// queue (`EvidenceGap`), or that the node's counter went back over.
    /// They stay until they arrive or an admin clears them (annotation
    /// `fim.kube-fim.io/clear-evidence-gaps=<number>` clears the gaps below it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub gaps: Vec<EvidenceGap>,
    /// The entry digests verified (`status.entries`): each moved from the one
    /// verified before only through an approval the node answered on a
    /// FileChange (its `status.entryDigests`), a new generation of its
    /// policy, a baseline alarm, or the upgrade of the digest format.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub entries: Vec<VerifiedEntry>,
    /// Entry digests that moved with nothing in the cluster to explain them
    /// (`EvidenceGap`): a baseline changed on the node and its published
    /// digest moved to match. They stay until an admin clears them (annotation
    /// `fim.kube-fim.io/clear-digest-moves=<RFC 3339 time>` clears those
    /// found up to that time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub unexplained: Vec<UnexplainedMove>,
}

/// One entry digest of a node as the operator last verified it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedEntry {
    /// Policy name.
    #[schemars(length(max = 63))]
    pub policy: String,
    /// Entry name within the policy.
    #[schemars(length(max = 63))]
    pub entry: String,
    /// The digest verified.
    #[schemars(length(max = 64))]
    pub digest: String,
    /// The policy generation the node had applied then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// An entry digest that moved with nothing in the cluster to explain it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UnexplainedMove {
    /// Policy name.
    #[schemars(length(max = 63))]
    pub policy: String,
    /// Entry name within the policy.
    #[schemars(length(max = 63))]
    pub entry: String,
    /// The digest verified before.
    #[schemars(length(max = 64))]
    pub from: String,
    /// The digest the node published instead.
    #[schemars(length(max = 64))]
    pub to: String,
    /// When the operator first saw the move.
    pub since: Time,
}

/// Annotation an admin sets on a FileIntegrityNode, an RFC 3339 time, to
/// clear the unexplained entry digest moves found up to then, once looked
/// into (the recorded act).
pub const CLEAR_DIGEST_MOVES: &str = "fim.kube-fim.io/clear-digest-moves";

/// Numbers of a node's chain with no evidence in the cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceGap {
    /// First missing number.
    #[schemars(range(min = 0))]
    pub first: u64,
    /// Last missing number (inclusive).
    #[schemars(range(min = 0))]
    pub last: u64,
    /// `Missing` (taken by the node, never stored, not queued) or `Rewound`
    /// (the node published a number below what was already verified).
    #[schemars(length(max = 16))]
    pub reason: String,
    /// When the operator first saw the numbers missing.
    pub since: Time,
}

/// Annotation an admin sets on a FileIntegrityNode to clear the evidence
/// gaps below a number, once looked into (the recorded act).
pub const CLEAR_EVIDENCE_GAPS: &str = "fim.kube-fim.io/clear-evidence-gaps";

/// An inclusive range of transition numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub first: u64,
    pub last: u64,
}

impl Span {
    /// One number.
    pub fn one(n: u64) -> Span {
        Span { first: n, last: n }
    }

    /// How many numbers it holds.
    pub fn len(&self) -> u64 {
        self.last.saturating_sub(self.first).saturating_add(1)
    }

    /// Never empty (first <= last by construction).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Parses `"12-250"` or `"300"`.
    pub fn parse(s: &str) -> Option<Span> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let (first, last) = (a.parse().ok()?, b.parse().ok()?);
        (first <= last).then_some(Span { first, last })
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Sorted, disjoint, non-adjacent spans covering exactly `numbers`.
pub fn spans(numbers: impl IntoIterator<Item = u64>) -> Vec<Span> {
    let mut sorted: Vec<u64> = numbers.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<Span> = Vec::new();
    for n in sorted {
        match out.last_mut() {
            Some(s) if s.last.checked_add(1) == Some(n) => s.last = n,
            _ => out.push(Span::one(n)),
        }
    }
    out
}

/// `spans` as at most `max` ranges: beyond, the last range also covers the
/// rest (it may then hold numbers that are not in `spans`: an over-statement
/// of what is undelivered, never an omission).
pub fn compact(mut spans: Vec<Span>, max: usize) -> Vec<Span> {
    if spans.len() > max && max > 0 {
        let last = spans[spans.len() - 1].last;
        spans.truncate(max);
        if let Some(s) = spans.last_mut() {
            s.last = last;
        }
    }
    spans
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
