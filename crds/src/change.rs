//! `FileChange`: one detected change of one host file, as evidence.
//!
//! Cluster-scoped like the policy it belongs to. The spec is immutable once
//! created (a CEL transition rule): nobody with update rights can rewrite what an
//! agent recorded. Approving a change is a recorded decision, `status.approval`
//! (who, when, why), written once through the status subresource like a
//! CertificateSigningRequest's approval: the schema forbids changing or removing
//! it, and the chart's ValidatingAdmissionPolicy requires the approver to be the
//! requesting user and to hold the `approve` verb on filechanges. The agent of
//! the node answers in `status.outcome`.
// kube's `printcolumn(...)` attributes repeat `type_ = ...` by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cel;
use crate::policy::Attribute;

/// A change of one file on one node, detected by the kube-fim agent and kept as
/// evidence: what changed, before and after values, when and how it was found.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fim.kube-fim.io",
    version = "v1alpha1",
    kind = "FileChange",
    plural = "filechanges",
    shortname = "fc",
    category = "fim",
    status = "FileChangeStatus",
    doc = "FileChange records one detected change of a monitored host file.",
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.node",
        description = "Node the file is on"
    ),
    printcolumn(
        name = "Category",
        type_ = "string",
        json_path = ".spec.category",
        description = "Added, Modified, Removed or Summary"
    ),
    printcolumn(
        name = "Path",
        type_ = "string",
        json_path = ".spec.path",
        description = "Host path of the file"
    ),
    printcolumn(
        name = "Policy",
        type_ = "string",
        json_path = ".spec.policy",
        description = "Policy that monitors the file"
    ),
    printcolumn(
        name = "Container",
        type_ = "string",
        json_path = ".spec.container.name",
        description = "Container the file is in (drift from its image)"
    ),
    printcolumn(
        name = "Unreadable",
        type_ = "string",
        json_path = ".spec.after.unreadable",
        description = "Why the file could not be read whole (its content is reported once readable)"
    ),
    printcolumn(
        name = "Package",
        type_ = "string",
        json_path = ".spec.package.verdict",
        description = "Verified: the content is the installed package's; Mismatch: a package's file with content no installed package has"
    ),
    printcolumn(
        name = "Transaction",
        type_ = "string",
        json_path = ".spec.package.transaction.summary",
        description = "A package transaction reported as one object: package, versions and its number of files"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.source",
        priority = 1,
        description = "How the change was found"
    ),
    printcolumn(
        name = "Attributes",
        type_ = "string",
        json_path = ".spec.changedAttributes",
        priority = 1,
        description = "Attributes that changed"
    ),
    printcolumn(
        name = "By",
        type_ = "string",
        json_path = ".spec.process.by",
        priority = 1,
        description = "Process or pod that made the change"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    selectable = ".spec.node",
    selectable = ".spec.policy",
    selectable = ".spec.category"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = kube::core::Rule::new(cel::SPEC_IMMUTABLE).message(cel::SPEC_IMMUTABLE_MSG))]
pub struct FileChangeSpec {
    /// Name of the node the file is on.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,

    /// Name of the FileIntegrityPolicy that monitors the file.
    #[schemars(length(min = 1, max = 63))]
    pub policy: String,

    /// This node's sequence number of the change: every transition the agent
    /// records gets the next number of its node, persisted with its baseline,
    /// never reused for another transition. Part of the object's name, so a
    /// change that recurs with the same before and after is a new object. Absent
    /// for a Summary and for changes of agents before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,

    /// Name of the policy entry the file falls under.
    #[schemars(length(min = 1, max = 63))]
    pub entry: String,

    /// Host path of the file. Bytes that are not UTF-8 are written as `\xNN`, and a
    /// backslash as `\\`. For a Summary, the entry's path.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,

    /// What happened to the file.
    pub category: ChangeCategory,

    /// Attributes that differ between before and after (empty for Added and Removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 13), extend("x-kubernetes-list-type" = "set"))]
    pub changed_attributes: Vec<Attribute>,

    /// The file as recorded in the baseline (absent for Added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<FileAttributes>,

    /// The file as found on the host (absent for Removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<FileAttributes>,

    /// When the agent detected the change.
    pub detected_time: MicroTime,

    /// How the change was found.
    pub source: DetectionSource,

    /// The process that made the change, when process attribution is on and the
    /// kernel could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessInfo>,

    /// For a change inside a container (drift from its image): the container,
    /// its pod and its image. `path` is then the path inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,

    /// For category Summary: the changes this object stands for (written by agents
    /// before change storms were paced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ChangeSummary>,

    /// The installed package that owns the file, when one does, and whether
    /// the new content is that package's (checked by the agent against the
    /// node's package database, dpkg or rpm). The node's claim: the cluster
    /// cannot re-read the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<PackageCheck>,

    /// The file was in `after` at a close after a write, and back in its
    /// baseline (or its state already reported) by the end of the debounce
    /// window: a write undone within it. Approving it adopts nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<bool>,
}

/// A changed file checked against the node's package database.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageCheck {
    /// The package database that owns the file.
    pub manager: PackageManager,
    /// Name of the owning package (for a Mismatch, the first owner found).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its installed version (rpm: `[epoch:]version-release`).
    #[schemars(length(max = 253))]
    pub version: String,
    /// The version the agent knew before the package database last changed,
    /// when it knew one and it differs (an upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub version_before: Option<String>,
    /// The content compared with the package's recorded digest.
    pub verdict: PackageVerdict,
    /// For one object standing for a package transaction on the node: the
    /// package-verified changes it lists (every one, each with its own
    /// before and after). `path` and the other fields of the spec then name
    /// the first of them; `name` and the versions are the transaction's
    /// main package.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<PackageTransaction>,
}

/// Most changes one transaction object lists (a larger transaction is a few
/// objects, each far under the API server's object size limit).
pub const TRANSACTION_ITEMS_MAX: usize = 500;

/// The package-verified changes of one package transaction on one node,
/// reported as one object with one transition number.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageTransaction {
    /// One line for `kubectl get fc`: `openssl 3.0.13→3.0.15, 48 files`.
    #[schemars(length(max = 512))]
    pub summary: String,
    /// Number of changes listed.
    pub files: u64,
    /// Every change of the transaction, in path order.
    #[schemars(length(max = 500))]
    pub changes: Vec<TransactionItem>,
}

/// One change of a package transaction: what a FileChange of its own would say.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransactionItem {
    /// Host path of the file (escaped like `spec.path`).
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// What happened to the file.
    pub category: ChangeCategory,
    /// Attributes that differ between before and after.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 13), extend("x-kubernetes-list-type" = "set"))]
    pub changed_attributes: Vec<Attribute>,
    /// The file as recorded in the baseline (absent for Added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<FileAttributes>,
    /// The file as found on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<FileAttributes>,
    /// When the agent detected the change.
    pub detected_time: MicroTime,
    /// How the change was found.
    pub source: DetectionSource,
    /// The writer, when process attribution named one (a package manager).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessInfo>,
    /// The package whose recorded digest the content has.
    #[schemars(length(min = 1, max = 253))]
    pub package: String,
    /// Its installed version.
    #[schemars(length(max = 253))]
    pub version: String,
    /// The version before, for an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub version_before: Option<String>,
}

/// A package database on the node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PackageManager {
    /// Debian and Ubuntu: `/var/lib/dpkg` (MD5 of each file).
    Dpkg,
    /// RHEL, Fedora, SUSE: `/var/lib/rpm/rpmdb.sqlite` (the headers' file digests).
    Rpm,
}

impl PackageManager {
    /// The name used in labels, Events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PackageManager::Dpkg => "dpkg",
            PackageManager::Rpm => "rpm",
        }
    }
}

/// What a package-owned file's new content is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PackageVerdict {
    /// The content is exactly what an installed package recorded for the path
    /// (an upgrade or reinstall wrote it).
    Verified,
    /// The path belongs to an installed package but its content matches no
    /// installed package's recorded digest (a replaced binary): loud.
    Mismatch,
}

impl PackageVerdict {
    /// The name used in labels and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            PackageVerdict::Verified => "Verified",
            PackageVerdict::Mismatch => "Mismatch",
        }
    }
}

/// What happened to a file.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum ChangeCategory {
    /// A file appeared that the baseline did not have.
    Added,
    /// A file's monitored attributes differ from the baseline.
    Modified,
    /// A file of the baseline is gone.
    Removed,
    /// Many changes at once, summarised in one object (written by agents before
    /// change storms were paced; current agents report every change on its own).
    Summary,
}

impl ChangeCategory {
    /// The name used in labels, Events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeCategory::Added => "Added",
            ChangeCategory::Modified => "Modified",
            ChangeCategory::Removed => "Removed",
            ChangeCategory::Summary => "Summary",
        }
    }
}

/// How a change was found.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DetectionSource {
    /// A real-time file system event (inotify).
    Realtime,
    /// The periodic full rescan.
    Scan,
    /// The agent's start, against the baseline it kept on the node: the file
    /// changed while the agent was not running.
    Startup,
}

/// The recorded attributes of one file. Never its content: only a hash of it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileAttributes {
    /// File type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "type")]
    pub file_type: Option<FileType>,

    /// BLAKE3 hash of the content, hex (regular files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub hash: Option<String>,

    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,

    /// Permission bits in octal, with setuid/setgid/sticky (`0644`, `4755`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-7]{4}$"))]
    pub mode: Option<String>,

    /// Owner user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,

    /// Owner group id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,

    /// BLAKE3 digest over the extended attributes (names and values, including
    /// POSIX ACLs and security labels), hex; absent when the file has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub xattrs: Option<String>,

    /// Modification time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<MicroTime>,

    /// Inode change time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime: Option<MicroTime>,

    /// Inode number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,

    /// Number of hard links (not recorded for directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<u64>,

    /// Target of a symbolic link, as stored in the link (escaped like paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub link_target: Option<String>,

    /// The host mount the path is read through, from the host's mount table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<Mount>,

    /// Why the file could not be read whole, when it could not: `EACCES:
    /// permission denied` (a security module's rule), `EWOULDBLOCK: held
    /// under a lease by another process`, `changed while being read (3
    /// attempts)`. What could not be measured is absent: the hash and the
    /// extended attributes when the content could not be read (the other
    /// attributes are the file's), every attribute when not even its metadata
    /// could. Such a state is never taken for the baseline's: the agent looks
    /// again, and reports the content once it can read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub unreadable: Option<String>,

    /// SHA-256 of the content, hex, when a FileChangeSink asks for it
    /// (`spec.fingerprints`): of the same bytes as `hash` (both digests from
    /// one read, kept only when its BLAKE3 equals `hash`). Only in `after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,

    /// Why `sha256` is absent although a sink asked for it: the file is too
    /// large, could not be read, or changed again before it was read (never
    /// a digest of other bytes than `hash`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub sha256_missing: Option<String>,
}

/// A mount of the host, as its mount table (`/proc/1/mountinfo`) lists it.
/// Texts are escaped like paths.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    /// Where it is mounted on the host.
    #[schemars(length(max = 4096))]
    pub mount_point: String,
    /// File system type (`ext4`, `tmpfs`, `overlay`...).
    #[schemars(length(max = 256))]
    pub fs_type: String,
    /// What is mounted: a device, or a name such as `tmpfs`.
    #[schemars(length(max = 4096))]
    pub source: String,
    /// The directory of the source's file system mounted there: `/` for a
    /// whole file system, the bound path for a bind mount.
    #[schemars(length(max = 4096))]
    pub root: String,
}

/// Type of a file system entry.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum FileType {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Symbolic link (never followed; its target is recorded).
    Symlink,
    /// Named pipe (never opened).
    Fifo,
    /// Unix socket (never opened).
    Socket,
    /// Block device (never opened).
    BlockDevice,
    /// Character device (never opened).
    CharDevice,
}

/// The process that made a change, read by the agent from the node's `/proc`
/// when the kernel (fanotify) reported the change.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessInfo {
    /// Who, in one line: `sshd (pid 812, uid 0)` or `pod kube-system/evil-7d9
    /// (container shell)`; what the BY column of `kubectl get fc -o wide` shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub by: Option<String>,
    /// Process id on the node (0 when the writer is outside the agent's pid namespace).
    pub pid: i32,
    /// Command name (`comm`) of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub command: Option<String>,
    /// Executable path, as the node sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub exe: Option<String>,
    /// Parent process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<i32>,
    /// Real user id of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// User name of that uid on the node, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub user: Option<String>,
    /// Audit login uid (the user who logged in, kept across `sudo`), when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_uid: Option<u32>,
    /// The process's cgroup path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cgroup: Option<String>,
    /// A host process's systemd unit or login session (`sshd.service`, `session-3.scope`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub unit: Option<String>,
    /// Container id in the form of `containerStatuses[].containerID`
    /// (`containerd://…`, `cri-o://…`), for a process in a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub container_id: Option<String>,
    /// The pod the process runs in, for a process in a pod of this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// Why the attribution may be incomplete or stand for more than one writer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub limits: Vec<AttributionLimit>,
}

/// A running container of a pod on the node, and its image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerRef {
    /// Namespace of the pod.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// Name of the pod.
    #[schemars(length(max = 253))]
    pub pod: String,
    /// `metadata.uid` of the pod.
    #[schemars(length(max = 36))]
    pub pod_uid: String,
    /// Name of the container.
    #[schemars(length(max = 63))]
    pub name: String,
    /// `containerStatuses[].containerID` (`containerd://…`): a restarted
    /// container is a new one.
    #[schemars(length(max = 256))]
    pub id: String,
    /// The image reference the container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub image: Option<String>,
    /// The image's digest (`containerStatuses[].imageID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub image_digest: Option<String>,
}

/// A pod of the node, and the container in it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodRef {
    /// Namespace of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// Name of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    /// `metadata.uid` of the pod.
    #[schemars(length(max = 36))]
    pub uid: String,
    /// Name of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub container: Option<String>,
}

/// Why an attribution is not the whole story.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttributionLimit {
    /// The writer exited before its event was read: only its pid is known.
    WriterExited,
    /// The writer is outside the agent's pid namespace (the agent runs without
    /// `hostPID`): the kernel gives no pid.
    NotInPidNamespace,
    /// Several processes changed the file within the debounce window; the last
    /// one is named.
    MultipleWriters,
    /// The cgroup names a pod that is not (or no longer) known on this node.
    PodUnknown,
    /// No event named the file itself: it was written in a directory made
    /// moments before (a container's copy-up or `mkdir`) that was not
    /// followed yet, and the process that made the directory is named.
    DirectoryWriter,
    /// No event named the writer (the change was found by a read, at start
    /// or by the safety net, or its events were lost): the writer is
    /// unknown, and nothing else is named.
    WriterUnknown,
}

/// Many changes summarised in one object.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeSummary {
    /// Changes this summary stands for.
    pub count: u64,
    /// Of which Added.
    #[serde(default)]
    pub added: u64,
    /// Of which Modified.
    #[serde(default)]
    pub modified: u64,
    /// Of which Removed.
    #[serde(default)]
    pub removed: u64,
    /// A sample of the paths that changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(max = 4096)))]
    pub sample_paths: Vec<String>,
    /// Start of the summarised period.
    pub window_start: MicroTime,
    /// End of the summarised period.
    pub window_end: MicroTime,
}

/// State of a change after it was recorded.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(cel::APPROVAL_KEPT).message(cel::APPROVAL_KEPT_MSG))]
pub struct FileChangeStatus {
    /// The decision that this change was expected. Set once, by an approver
    /// (`kubectl fim approve`); never changed or removed afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new(cel::APPROVAL_IMMUTABLE).message(cel::APPROVAL_IMMUTABLE_MSG))]
    pub approval: Option<Approval>,

    /// What the node's agent did with the approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ApprovalOutcome>,

    /// When the agent took the approved state as its new baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_updated_time: Option<Time>,

    /// The agent's account of the outcome, e.g. that the file changed again
    /// since and which new FileChange reports its present state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,

    /// With outcome `Applied`: each policy entry whose published digest the
    /// approval moved (the change's own entry first), before and after, in the
    /// encoding of the FileIntegrityNode's `status.entries[].digest`. Written
    /// by the agent before its baseline takes the approved state, so the
    /// digests a node publishes are reachable from the ones it published
    /// before through the approvals the cluster holds; a move nothing here
    /// explains is a `BaselineTampered` alarm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub entry_digests: Vec<EntryDigestMove>,
}

/// How an applied approval moved one entry's digest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EntryDigestMove {
    /// Policy name.
    #[schemars(length(max = 63))]
    pub policy: String,
    /// Entry name within the policy.
    #[schemars(length(max = 63))]
    pub entry: String,
    /// The entry's digest before the approval.
    #[schemars(length(max = 64))]
    pub before: String,
    /// The entry's digest with the approved state.
    #[schemars(length(max = 64))]
    pub after: String,
}

/// Who decided that a change was expected, when and why.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Approval {
    /// User name of the approver, as the API server authenticated them. The
    /// admission policy refuses any other value than the requesting user's.
    #[schemars(length(min = 1, max = 512))]
    pub approved_by: String,

    /// When the approval was given.
    pub approved_at: Time,

    /// Why the change is expected (a ticket, a maintenance window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,

    /// For a package transaction (`spec.package.transaction`): the paths of
    /// the changes approved; empty approves every change it lists. The node
    /// reports the changes left out again, as a new object to approve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500), inner(length(max = 4096)))]
    pub paths: Vec<String>,
}

/// What the agent did with an approval.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApprovalOutcome {
    /// The file still matched the approved state (`spec.after`): that state is
    /// the node's baseline now.
    Applied,
    /// The file no longer matched the approved state: nothing was approved, and
    /// its present state is reported as a new change (see `message`).
    Superseded,
    /// No path of the policies served to this node covers the file: nothing was
    /// approved, and the node's baseline is unchanged (see `message`).
    NotMonitored,
}

impl FileChange {
    /// The recorded approval, if any.
    pub fn approval(&self) -> Option<&Approval> {
        self.status.as_ref().and_then(|s| s.approval.as_ref())
    }
}
