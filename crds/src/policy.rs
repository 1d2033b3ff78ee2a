//! `FileIntegrityPolicy`: what to watch, on which nodes, and how to report it.
//!
//! The policy is cluster-scoped: it reads host files of whole nodes, which is a
//! cluster-level capability. A namespaced policy would let anyone with edit
//! rights in one namespace make the privileged node agents hash arbitrary host
//! paths, so only cluster admins (or those they grant the cluster role) may
//! create one.
//!
//! Validation lives in the schema (OpenAPI constraints and CEL rules), so the API
//! server refuses a bad policy with a message naming the field. The same rules
//! exist in Rust in [`crate::validate`], for policy files read from disk; a
//! test runs one corpus through both and demands identical verdicts.
// kube's `printcolumn(...)` attributes repeat `type_ = ...` by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cel;
use crate::compliance::ComplianceRef;

/// Most path entries one policy may hold.
pub const MAX_PATHS: usize = 128;
/// Most exclude globs one path entry may hold.
pub const MAX_EXCLUDES: usize = 64;
/// Longest monitored path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest exclude glob, in bytes.
pub const MAX_EXCLUDE_LEN: usize = 256;

/// Declares which host files kube-fim monitors on which nodes, and how changes are
/// reported. Every node the policy selects runs one kube-fim agent, shared with
/// the other policies that select it; the agent hashes (BLAKE3) and watches the
/// listed paths and reports each change as a FileChange object, an Event and
/// metrics.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fim.kube-fim.io",
    version = "v1alpha1",
    kind = "FileIntegrityPolicy",
    plural = "fileintegritypolicies",
    shortname = "fip",
    category = "fim",
    status = "FileIntegrityPolicyStatus",
    doc = "FileIntegrityPolicy declares host paths that kube-fim monitors on the nodes it selects.",
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodesSelected", description = "Nodes the policy selects"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.nodesReady", description = "Nodes whose agent has a baseline and is reporting"),
    printcolumn(name = "Files", type_ = "integer", json_path = ".status.filesMonitored", description = "Files monitored, summed over nodes"),
    printcolumn(name = "Changes(24h)", type_ = "integer", json_path = ".status.changesLast24h", description = "Changes reported in the last 24 hours"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", description = "Reason of the Ready condition"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name must be at most 63 characters: policy names are used as label values"),
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = kube::core::Rule::new(cel::HAS_PATHS_OR_PRESET).message(cel::HAS_PATHS_OR_PRESET_MSG).field_path(".paths"))]
pub struct FileIntegrityPolicySpec {
    /// Monitored entries: files, directories and wildcards on the host. Each entry
    /// name must be unique within the policy; it is shown in every change found
    /// under that entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub paths: Vec<MonitoredPath>,

    /// Adds a predefined list of entries. `recommended` adds the system binaries,
    /// boot files, cron and init directories and /etc/*.conf (see the README for the
    /// full list). Entries listed in `paths` with the same name override the
    /// preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,

    /// Node labels that select the nodes this policy applies to (all must match).
    /// Empty or absent selects every node the tolerations allow.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations that let the agent run on tainted nodes (for example control
    /// plane nodes). Merged with the other policies' tolerations on the shared
    /// agent DaemonSet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// Period of the full rescan that backs up real-time watching, as a duration
    /// such as `30m` or `1h30m` (units h, m, s, ms). Between 1m and 168h.
    #[serde(default = "default_scan_interval")]
    #[x_kube(validation = kube::core::Rule::new(cel::SCAN_INTERVAL).message(cel::SCAN_INTERVAL_MSG))]
    #[schemars(length(max = 32))]
    pub scan_interval: String,

    /// Window within which bursts of events on one path are coalesced into one
    /// change (an editor's write-to-temp-and-rename is one Modified). A duration
    /// between 0s and 60s.
    #[serde(default = "default_debounce")]
    #[x_kube(validation = kube::core::Rule::new(cel::DEBOUNCE).message(cel::DEBOUNCE_MSG))]
    #[schemars(length(max = 32))]
    pub debounce: String,

    /// Most FileChange objects one node creates per minute for each entry of
    /// this policy. Past it, the entry's further changes wait on the node and are
    /// delivered at this rate, each as a FileChange of its own (none folded or
    /// dropped), and the node says so in a ChangeStorm Event.
    #[serde(default = "default_max_changes_per_minute")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_changes_per_node_per_minute: u32,

    /// How long and how many FileChange objects of this policy the operator keeps.
    #[serde(default)]
    pub retention: Retention,

    /// What happens to this policy's FileChanges when the policy is deleted.
    /// `Retain` (the default) keeps them as evidence; `Delete` has the operator
    /// delete them before the policy goes.
    #[serde(default)]
    pub evidence: Evidence,

    /// Attributes a change to the process that made it (pid, command, user) where
    /// the kernel can tell (fanotify). Needs an extra capability on the agent, so
    /// it is off by default; without it changes are still reported.
    #[serde(default)]
    pub process_attribution: bool,

    /// Whether a change the node's agent verified against its package database
    /// (new content exactly an installed package's, `spec.package.verdict:
    /// Verified`) waits for approval. `Record` (the default) keeps it as
    /// evidence without counting it unacknowledged (no alert);
    /// `RequireApproval` treats it like any other change. A Mismatch always
    /// waits for approval.
    #[serde(default, skip_serializing_if = "PackageVerifiedChanges::is_default")]
    pub package_verified_changes: PackageVerifiedChanges,
    /// Container drift: the files added, changed or deleted inside the running
    /// containers of the selected pods on the policy's nodes, against their
    /// images. Absent: containers are not looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<ContainerSelection>,

    /// Compliance controls every entry of this policy is evidence for (an
    /// entry's own `compliance` replaces a reference of the same framework;
    /// a preset's entries carry the preset's references, see the README).
    /// The operator labels each FileChange with its entry's references,
    /// `compliance.kube-fim.io/<framework>=<control>`, so `kubectl get fc -l
    /// compliance.kube-fim.io/pci-dss-4.0=11.5.2` lists the evidence of a
    /// control; `kubectl fim report` groups by them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["framework"]))]
    pub compliance: Vec<ComplianceRef>,
}

/// What a package-verified change needs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PackageVerifiedChanges {
    /// Recorded as evidence, not counted unacknowledged.
    #[default]
    Record,
    /// Approved one by one like any other change.
    RequireApproval,
}

impl PackageVerifiedChanges {
    fn is_default(&self) -> bool {
        *self == PackageVerifiedChanges::Record
    }
}

/// Which containers a policy watches for drift from their image, and what in them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerSelection {
    /// Namespaces whose pods are watched; empty: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,

    /// Pod labels that select the pods (all must match); empty: every pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub pod_selector: BTreeMap<String, String>,

    /// Pods expected to write into their own filesystem, left out: a name, or
    /// a name prefix ending in `*` (`build-*`), optionally as `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 317)))]
    pub exclude_pods: Vec<String>,

    /// Paths inside the container left out, with everything under them.
    /// Defaults to `/tmp`, `/var/tmp` and `/run`; the container's own mounts
    /// (volumes, `emptyDir`s, `/etc/hosts`...) are never image content and are
    /// always left out.
    #[serde(default = "default_container_excludes")]
    #[x_kube(validation = kube::core::Rule::new(cel::CONTAINER_EXCLUDES).message(cel::CONTAINER_EXCLUDES_MSG))]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024)))]
    pub exclude: Vec<String>,

    /// Reports only executables: regular files with an exec bit. Removals
    /// are always reported.
    #[serde(default)]
    pub executables_only: bool,
}

fn default_container_excludes() -> Vec<String> {
    ["/tmp", "/var/tmp", "/run"].map(String::from).to_vec()
}

/// One monitored entry of a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = kube::core::Rule::new(cel::WHOLE_HOST).message(cel::WHOLE_HOST_MSG).field_path(".path"))]
pub struct MonitoredPath {
    /// Short name of the entry, shown in every change found under it. Lowercase
    /// letters, digits and '-', at most 63 characters; unique within the policy.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Absolute host path: a file, a directory, or a wildcard in the last segment
    /// only (`*`, `?`, `[...]`, as in `/etc/*.conf`). No `.` or `..` segments, no
    /// empty segments, no trailing '/'. Resolved inside the node's root: symlinks
    /// on the host never lead the agent outside it.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(
        validation = kube::core::Rule::new(cel::PATH_ABSOLUTE).message(cel::PATH_ABSOLUTE_MSG),
        validation = kube::core::Rule::new(cel::PATH_NO_EMPTY_SEGMENT).message(cel::PATH_NO_EMPTY_SEGMENT_MSG),
        validation = kube::core::Rule::new(cel::PATH_NO_DOT_SEGMENT).message(cel::PATH_NO_DOT_SEGMENT_MSG),
        validation = kube::core::Rule::new(cel::PATH_WILDCARD_LAST).message(cel::PATH_WILDCARD_LAST_MSG),
        validation = kube::core::Rule::new(cel::PATH_BRACKETS_CLOSED).message(cel::PATH_BRACKETS_CLOSED_MSG),
        validation = kube::core::Rule::new(cel::NO_CONTROL_CHARS).message(cel::NO_CONTROL_CHARS_MSG),
    )]
    pub path: String,

    /// Also monitor everything below a directory (or below each directory a
    /// wildcard matches). Without it, a directory's direct entries are monitored.
    #[serde(default)]
    pub recursive: bool,

    /// Set to false to keep the entry in the policy without monitoring it.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Globs of paths not to monitor (and not to watch) under this entry. A glob
    /// with a '/' matches the absolute host path (`/var/log/**`, where `**` spans
    /// directories); one without matches the file name alone (`*.swp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(inner(length(min = 1, max = 256)))]
    #[x_kube(validation = kube::core::Rule::new(cel::EXCLUDES_VALID).message(cel::EXCLUDES_VALID_MSG))]
    #[x_kube(validation = kube::core::Rule::new(cel::EXCLUDES_BRACES).message(cel::EXCLUDES_BRACES_MSG))]
    pub exclude: Vec<String>,

    /// Which attributes count as a change. `full` (the default) compares content
    /// hash, size, type, mode, owner, ACLs/xattrs, mtime, inode, hard-link count,
    /// symlink target and the host mount the path is read through.
    /// `permissions` ignores content, size and mtime. `growOnly` is for
    /// append-only files such as logs: a longer file whose old content is an
    /// unchanged prefix is not a change.
    #[serde(default)]
    pub profile: AttributeProfile,

    /// Explicit list of attributes to compare, replacing the profile's list (for
    /// example `[mode, uid, gid]`). The growOnly profile keeps its prefix rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 13), extend("x-kubernetes-list-type" = "set"))]
    pub attributes: Vec<Attribute>,

    /// Allows a recursive entry on `/` or `/*`, which traverses the whole host and
    /// usually floods the cluster with noise. Refused unless set.
    #[serde(default)]
    pub allow_whole_host: bool,

    /// Compliance controls changes under this entry are evidence for, one
    /// per framework (`{framework: pci-dss-4.0, control: 11.5.2}`), added to
    /// the policy's and the preset's (replacing theirs of the same
    /// framework).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["framework"]))]
    pub compliance: Vec<ComplianceRef>,
}

/// A predefined list of entries.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Preset {
    /// System binaries, boot files, cron and init directories and /etc/*.conf.
    Recommended,
}

/// A named set of attributes compared between the baseline and the host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum AttributeProfile {
    /// Content hash, size, type, mode, owner, ACLs/xattrs, mtime, inode, hard-link
    /// count, link target, mount.
    #[default]
    Full,
    /// Type, mode, owner, ACLs/xattrs, inode, hard-link count, link target and
    /// mount; content is ignored.
    Permissions,
    /// As full, except that growth keeping the old content as a prefix is not a change.
    GrowOnly,
}

/// A file attribute that can change.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "camelCase")]
pub enum Attribute {
    /// BLAKE3 hash of the content.
    Hash,
    /// Size in bytes.
    Size,
    /// File type: regular file, directory, symlink, FIFO, socket, device.
    Type,
    /// Permission bits, including setuid, setgid and sticky.
    Mode,
    /// Owner user id.
    Uid,
    /// Owner group id.
    Gid,
    /// Digest of extended attributes, including POSIX ACLs and security labels.
    Xattrs,
    /// Modification time.
    Mtime,
    /// Inode change time (off in every profile: it moves with any other change).
    Ctime,
    /// Inode number (a replaced file gets a new one).
    Inode,
    /// Number of hard links: a new name for a file (a hard link to a setuid
    /// binary kept where no one looks) shows on the file itself. Not recorded for
    /// directories, whose count moves with their subdirectories (each reported
    /// as an entry of its own).
    Links,
    /// Target of a symbolic link.
    LinkTarget,
    /// The host mount the path is read through (the last mount made at it or
    /// above it): a mount made over a monitored path (`mount --bind evil
    /// /usr/bin/sudo`) changes it.
    Mount,
}

impl Attribute {
    /// The attribute's name as written in the API (`hash`, `linkTarget`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Attribute::Hash => "hash",
            Attribute::Size => "size",
            Attribute::Type => "type",
            Attribute::Mode => "mode",
            Attribute::Uid => "uid",
            Attribute::Gid => "gid",
            Attribute::Xattrs => "xattrs",
            Attribute::Mtime => "mtime",
            Attribute::Ctime => "ctime",
            Attribute::Inode => "inode",
            Attribute::Links => "links",
            Attribute::LinkTarget => "linkTarget",
            Attribute::Mount => "mount",
        }
    }

    /// Every attribute, in display order.
    pub const ALL: [Attribute; 13] = [
        Attribute::Hash,
        Attribute::Size,
        Attribute::Type,
        Attribute::Mode,
        Attribute::Uid,
        Attribute::Gid,
        Attribute::Xattrs,
        Attribute::Mtime,
        Attribute::Ctime,
        Attribute::Inode,
        Attribute::Links,
        Attribute::LinkTarget,
        Attribute::Mount,
    ];
}

impl AttributeProfile {
    /// Attributes this profile compares.
    pub fn attributes(self) -> &'static [Attribute] {
        use Attribute::*;
        match self {
            AttributeProfile::Full | AttributeProfile::GrowOnly => &[
                Hash, Size, Type, Mode, Uid, Gid, Xattrs, Mtime, Inode, Links, LinkTarget, Mount,
            ],
            AttributeProfile::Permissions => &[
                Type, Mode, Uid, Gid, Xattrs, Inode, Links, LinkTarget, Mount,
            ],
        }
    }
}

impl MonitoredPath {
    /// Attributes compared for this entry: the explicit list if given, else the profile's.
    pub fn effective_attributes(&self) -> Vec<Attribute> {
        if self.attributes.is_empty() {
            self.profile.attributes().to_vec()
        } else {
            let mut attrs = self.attributes.clone();
            attrs.sort();
            attrs.dedup();
            attrs
        }
    }
}

/// Limits on the FileChange objects of a policy, enforced by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    /// Delete changes older than this duration (units h, m, s). Between 1h and 8760h.
    #[serde(default = "default_retention_age")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new(cel::RETENTION_AGE).message(cel::RETENTION_AGE_MSG))]
    pub max_age: String,

    /// Keep at most this many changes per node; the oldest go first. Counted
    /// per node so that one node cannot push another node's records out.
    #[serde(default = "default_retention_count")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_count: u32,

    /// Also delete changes nobody approved once they are past `maxAge` or
    /// `maxCount`. Off by default: an unapproved change is evidence nobody has
    /// looked at, and retention keeps it however old or many.
    #[serde(default)]
    pub delete_unapproved: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: default_retention_age(),
            max_count: default_retention_count(),
            delete_unapproved: false,
        }
    }
}

/// What happens to a policy's FileChanges when the policy is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Evidence {
    /// Keep them: evidence outlives the policy that produced it.
    #[default]
    Retain,
    /// Delete them with the policy (the operator holds the policy with a
    /// finalizer until they are gone).
    Delete,
}

/// Observed state of a policy, aggregated by the operator from the agents' per-node reports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FileIntegrityPolicyStatus {
    /// The policy generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: every selected node has a baseline and reports. `Degraded`: a node
    /// fails to scan or report, or the policy could not be applied (see reason).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Nodes the policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_selected: Option<i32>,

    /// Selected nodes whose agent has a baseline and reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_ready: Option<i32>,

    /// Selected nodes whose agent is still building its first baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_baselining: Option<i32>,

    /// Nodes this policy monitored that are no longer selected while the policy
    /// is unchanged: their labels or taints changed (`NodeLeftMonitoring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_left: Option<i32>,

    /// Files monitored, summed over the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_monitored: Option<i64>,

    /// Completion time of the least recent full scan among the nodes: every node
    /// has scanned at least this recently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scan_time: Option<Time>,

    /// Changes reported in the last 24 hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes_last24h: Option<i64>,

    /// Reported changes nobody has approved yet. Stored here, not only in
    /// process memory, so that alerts on it survive restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unacknowledged_changes: Option<i64>,

    /// The same change of one file on several nodes within the operator's
    /// rollout window (`--rollout-window`): the largest rollouts first, at
    /// most 20. `kubectl fim rollouts` lists them; `kubectl fim rollouts
    /// approve <id>` approves each node's change of one in the approver's
    /// name (it recomputes the members from the FileChanges themselves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub rollouts: Vec<RolloutStatus>,

    /// Nodes whose digest of a policy entry differs from the clear majority of
    /// their pool (nodes of the same image and pool labels): drift against the
    /// fleet, even from before kube-fim was installed. At most 50 (each with a
    /// `FleetDrift` Event on its Node); `kube_fim_operator_fleet_outliers`
    /// counts all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub fleet_outliers: Vec<FleetOutlier>,
}

/// One rollout: the same transition of one file (policy entry, path,
/// category, state before and after, in the attributes that mean the same on
/// every node) reported by several nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Hash of the transition: the same on every node, and for `kubectl fim
    /// rollouts approve`.
    #[schemars(length(max = 16))]
    pub id: String,
    /// Policy entry.
    #[schemars(length(max = 63))]
    pub entry: String,
    /// Host path of the file.
    #[schemars(length(max = 4096))]
    pub path: String,
    /// `Added`, `Modified` or `Removed`.
    #[schemars(length(max = 16))]
    pub category: String,
    /// Digest of the state before (short; `-` for none).
    #[schemars(length(max = 16))]
    pub before: String,
    /// Digest of the state after (short; `-` for none).
    #[schemars(length(max = 16))]
    pub after: String,
    /// Nodes that reported this transition.
    pub nodes: i32,
    /// Of those, nodes whose changes of it are all approved.
    pub approved: i32,
    /// The first and the latest report of it.
    pub first_seen: Time,
    pub last_seen: Time,
    /// Nodes where the same file of the same entry changed differently within
    /// the window (at most 10 named; `outlierCount` counts all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(max = 253)))]
    pub outliers: Vec<String>,
    /// How many nodes are outliers.
    #[serde(default)]
    pub outlier_count: i32,
}

/// A node whose entry digest differs from its pool's clear majority.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FleetOutlier {
    /// The node.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The policy entry.
    #[schemars(length(max = 63))]
    pub entry: String,
    /// The pool: the node's image (OS image, kernel, architecture) and the
    /// values of the operator's `--fleet-pool-label` keys.
    #[schemars(length(max = 1024))]
    pub pool: String,
    /// Nodes of the pool that agree on the majority digest.
    pub majority: i32,
    /// Nodes of the pool that published a digest of the entry.
    pub pool_nodes: i32,
}

fn default_true() -> bool {
    true
}
fn default_scan_interval() -> String {
    "1h".into()
}
fn default_debounce() -> String {
    "2s".into()
}
fn default_max_changes_per_minute() -> u32 {
    100
}
fn default_retention_age() -> String {
    "720h".into()
}
fn default_retention_count() -> u32 {
    10000
}

impl Default for MonitoredPath {
    fn default() -> Self {
        MonitoredPath {
            name: String::new(),
            path: String::new(),
            recursive: false,
            enabled: true,
            exclude: Vec::new(),
            profile: AttributeProfile::default(),
            attributes: Vec::new(),
            allow_whole_host: false,
            compliance: Vec::new(),
        }
    }
}

impl FileIntegrityPolicySpec {
    /// A spec with the given entries and every other field at the API server's defaults.
    pub fn with_paths(paths: Vec<MonitoredPath>) -> Self {
        FileIntegrityPolicySpec {
            paths,
            preset: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            scan_interval: default_scan_interval(),
            debounce: default_debounce(),
            max_changes_per_node_per_minute: default_max_changes_per_minute(),
            retention: Retention::default(),
            evidence: Evidence::default(),
            process_attribution: false,
            package_verified_changes: PackageVerifiedChanges::Record,
            containers: None,
            compliance: Vec::new(),
        }
    }
}

impl Default for FileIntegrityPolicySpec {
    fn default() -> Self {
        FileIntegrityPolicySpec::with_paths(Vec::new())
    }
}

#[cfg(test)]
mod attribute_tests {
    use super::Attribute;

    #[test]
    fn as_str_is_the_serialized_name() {
        for a in Attribute::ALL {
            let json = serde_json::to_string(&a).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", a.as_str()));
        }
    }
}
