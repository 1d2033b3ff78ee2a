//! Rollouts: the same transition of one monitored file on many nodes.
//!
//! A node-image update, a package upgrade or a DaemonSet writing config
//! changes the same file the same way on every node it reaches. Each node
//! reports its own FileChange; a *transition* is what they have in common:
//! policy, entry, path, category and the file's state before and after, seen
//! through the attributes that mean the same on every node ([`Comparable`]:
//! not the inode, times or block device, which differ per node even for the
//! same content). The operator groups FileChanges by transition into
//! rollouts, and `kubectl fim rollouts approve <id>` approves the changes of
//! one: both compute the same [`Transition`] from each FileChange's spec
//! (immutable, and bound to its node by admission), so neither trusts the
//! other's bookkeeping.

use serde::{Deserialize, Serialize};

use crate::change::{ChangeCategory, FileAttributes, FileChangeSpec, FileType, Mount};

/// Of a file's state, the attributes that mean the same on every node.
/// Decoded leniently (unknown fields ignored), so a newer schema of the
/// states never stops whoever reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Comparable {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub file_type: Option<FileType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xattrs: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// The mount without its source device (`/dev/sda1` on one node is
    /// `/dev/nvme0n1p1` on another): mount point, type and bound directory
    /// still tell a bind mount over the file apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<ComparableMount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// A mount, without its source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ComparableMount {
    pub mount_point: String,
    pub fs_type: String,
    pub root: String,
}

impl Comparable {
    /// The comparable part of a recorded state.
    pub fn of(a: &FileAttributes) -> Comparable {
        Comparable {
            file_type: a.file_type,
            hash: a.hash.clone(),
            size: a.size,
            mode: a.mode.clone(),
            uid: a.uid,
            gid: a.gid,
            xattrs: a.xattrs.clone(),
            links: a.links,
            link_target: a.link_target.clone(),
            mount: a.mount.as_ref().map(|m: &Mount| ComparableMount {
                mount_point: m.mount_point.clone(),
                fs_type: m.fs_type.clone(),
                root: m.root.clone(),
            }),
            unreadable: a.unreadable.clone(),
        }
    }

    /// BLAKE3 of the state's canonical JSON (fields in declaration order),
    /// hex. `-` for no state (before an Added, after a Removed).
    pub fn digest(state: Option<&Comparable>) -> String {
        match state {
            None => "-".into(),
            // A struct of plain fields always serializes.
            Some(s) => blake3::hash(serde_json::to_string(s).unwrap_or_default().as_bytes())
                .to_hex()
                .to_string(),
        }
    }
}

/// What the FileChanges of one rollout have in common.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Transition {
    pub policy: String,
    pub entry: String,
    pub path: String,
    pub category: ChangeCategory,
    /// [`Comparable::digest`] of the state before and after.
    pub before: String,
    pub after: String,
}

/// Hex characters of a rollout id.
pub const ID_LEN: usize = 16;
/// Hex characters of a state digest where people read it.
pub const SHORT_DIGEST: usize = 12;

impl Transition {
    /// The transition of a change; none for a Summary, which stands for many.
    pub fn of(spec: &FileChangeSpec) -> Option<Transition> {
        if let Some(t) = spec.package.as_ref().and_then(|p| p.transaction.as_ref()) {
            let states: Vec<(&str, ChangeCategory, Option<Comparable>, Option<Comparable>)> = t
                .changes
                .iter()
                .map(|i| {
                    (
                        i.path.as_str(),
                        i.category,
                        i.before.as_ref().map(Comparable::of),
                        i.after.as_ref().map(Comparable::of),
                    )
                })
                .collect();
            return Transition::of_items(
                &spec.policy,
                &spec.entry,
                &spec.path,
                spec.category,
                states
                    .iter()
                    .map(|(p, c, b, a)| (*p, *c, b.as_ref(), a.as_ref())),
            );
        }
        Transition::from_parts(
            &spec.policy,
            &spec.entry,
            &spec.path,
            spec.category,
            spec.before.as_ref().map(Comparable::of).as_ref(),
            spec.after.as_ref().map(Comparable::of).as_ref(),
        )
    }

    /// The transition of a change given by its parts.
    pub fn from_parts(
        policy: &str,
        entry: &str,
        path: &str,
        category: ChangeCategory,
        before: Option<&Comparable>,
        after: Option<&Comparable>,
    ) -> Option<Transition> {
        (category != ChangeCategory::Summary).then(|| Transition {
            policy: policy.to_string(),
            entry: entry.to_string(),
            path: path.to_string(),
            category,
            before: Comparable::digest(before),
            after: Comparable::digest(after),
        })
    }

    /// The transition of a package transaction object (one object listing
    /// many changes, `spec.package.transaction`): before and after are
    /// digests of every listed change's path, category and state, so the
    /// same transaction on two nodes is one transition and a transaction
    /// that differs in any change is another.
    pub fn of_items<'a>(
        policy: &str,
        entry: &str,
        path: &str,
        category: ChangeCategory,
        items: impl IntoIterator<
            Item = (
                &'a str,
                ChangeCategory,
                Option<&'a Comparable>,
                Option<&'a Comparable>,
            ),
        >,
    ) -> Option<Transition> {
        let (mut before, mut after) = (blake3::Hasher::new(), blake3::Hasher::new());
        for (p, c, b, a) in items {
            for (h, state) in [(&mut before, b), (&mut after, a)] {
                for part in [p, c.as_str(), Comparable::digest(state).as_str()] {
                    h.update(&(part.len() as u64).to_le_bytes());
                    h.update(part.as_bytes());
                }
            }
        }
        (category != ChangeCategory::Summary).then(|| Transition {
            policy: policy.to_string(),
            entry: entry.to_string(),
            path: path.to_string(),
            category,
            before: format!("txn-{}", before.finalize().to_hex()),
            after: format!("txn-{}", after.finalize().to_hex()),
        })
    }

    /// The rollout's id: the first [`ID_LEN`] hex characters of a BLAKE3 of
    /// the whole transition, so every node's change of it has the same id,
    /// whoever computes it. Short for people: whoever acts on an id
    /// compares whole transitions (`kubectl fim rollouts approve` refuses an
    /// id that two different transitions share).
    pub fn id(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [
            self.policy.as_str(),
            self.entry.as_str(),
            self.path.as_str(),
            self.category.as_str(),
            self.before.as_str(),
            self.after.as_str(),
        ] {
            // Length-prefixed: no two different transitions hash the same bytes.
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().to_hex()[..ID_LEN].to_string()
    }

    /// Whether `other` is the same file of the same policy entry (a change of
    /// it that is not this transition makes its node an outlier).
    pub fn same_file(&self, other: &Transition) -> bool {
        self.policy == other.policy && self.entry == other.entry && self.path == other.path
    }
}

/// A state digest as people read it: its first [`SHORT_DIGEST`] characters.
pub fn short(digest: &str) -> &str {
    digest.get(..SHORT_DIGEST).unwrap_or(digest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;

    fn state(hash: char, inode: u64, source: &str) -> FileAttributes {
        FileAttributes {
            file_type: Some(FileType::File),
            hash: Some(hash.to_string().repeat(64)),
            size: Some(10),
            mode: Some("0644".into()),
            uid: Some(0),
            gid: Some(0),
            inode: Some(inode),
            mtime: Some(MicroTime(Timestamp::now())),
            links: Some(1),
            mount: Some(Mount {
                mount_point: "/".into(),
                fs_type: "ext4".into(),
                source: source.into(),
                root: "/".into(),
            }),
            ..FileAttributes::default()
        }
    }

    fn spec(node: &str, before: FileAttributes, after: FileAttributes) -> FileChangeSpec {
        FileChangeSpec {
            node: node.into(),
            policy: "p".into(),
            sequence: Some(1),
            container: None,
            package: None,
            restored: None,
            entry: "etc".into(),
            path: "/etc/app.conf".into(),
            category: ChangeCategory::Modified,
            changed_attributes: vec![],
            before: Some(before),
            after: Some(after),
            detected_time: MicroTime(Timestamp::now()),
            source: crate::DetectionSource::Realtime,
            process: None,
            summary: None,
        }
    }

    #[test]
    fn the_same_content_change_on_two_nodes_is_one_transition() {
        let a = Transition::of(&spec(
            "a",
            state('1', 10, "/dev/sda1"),
            state('2', 11, "/dev/sda1"),
        ));
        let b = Transition::of(&spec(
            "b",
            state('1', 77, "/dev/nvme0n1p1"),
            state('2', 78, "/dev/nvme0n1p1"),
        ));
        assert_eq!(a, b, "inode, times and device are the node's own");
        assert_eq!(a.as_ref().unwrap().id().len(), ID_LEN);
        let c = Transition::of(&spec(
            "c",
            state('1', 10, "/dev/sda1"),
            state('3', 11, "/dev/sda1"),
        ));
        assert_ne!(a.as_ref().unwrap().id(), c.as_ref().unwrap().id());
        assert!(a.unwrap().same_file(&c.unwrap()));
    }

    #[test]
    fn a_bind_mount_over_the_file_is_not_the_rollout_of_a_content_change() {
        // Root on one node binds another file over the path while the fleet's
        // content change rolls out: its change must not join the rollout.
        let fleet = Transition::of(&spec(
            "a",
            state('1', 10, "/dev/sda1"),
            state('2', 11, "/dev/sda1"),
        ));
        let mut mounted = state('2', 11, "/dev/sda1");
        mounted.mount = Some(Mount {
            mount_point: "/etc/app.conf".into(),
            fs_type: "ext4".into(),
            source: "/dev/sda1".into(),
            root: "/tmp/evil".into(),
        });
        let evil = Transition::of(&spec("b", state('1', 10, "/dev/sda1"), mounted));
        assert_ne!(fleet, evil);
    }

    #[test]
    fn the_decoded_view_of_a_state_digests_like_the_typed_one() {
        let a = state('4', 3, "/dev/sda1");
        let mut json = serde_json::to_value(&a).unwrap();
        // A field a later version adds does not stop the lenient view.
        json["packageVerified"] = serde_json::json!({"package": "openssl"});
        let view: Comparable = serde_json::from_value(json).unwrap();
        assert_eq!(
            Comparable::digest(Some(&view)),
            Comparable::digest(Some(&Comparable::of(&a)))
        );
        assert_eq!(Comparable::digest(None), "-");
        assert_eq!(short("-"), "-");
    }

    #[test]
    fn the_same_package_transaction_on_two_nodes_is_one_transition_and_another_is_not() {
        use crate::{
            PackageCheck, PackageManager, PackageTransaction, PackageVerdict, TransactionItem,
        };
        let txn = |node: &str, inode: u64, second: char| {
            let item = |path: &str, after: char| TransactionItem {
                path: path.into(),
                category: ChangeCategory::Modified,
                changed_attributes: vec![],
                before: Some(state('1', inode, node)),
                after: Some(state(after, inode + 1, node)),
                detected_time: MicroTime(Timestamp::now()),
                source: crate::DetectionSource::Realtime,
                process: None,
                package: "openssl".into(),
                version: "3.0.15".into(),
                version_before: None,
            };
            let mut s = spec(node, state('1', 1, node), state('2', 2, node));
            s.path = "/usr/bin/a".into();
            s.before = None;
            s.after = None;
            s.package = Some(PackageCheck {
                manager: PackageManager::Dpkg,
                name: "openssl".into(),
                version: "3.0.15".into(),
                version_before: None,
                verdict: PackageVerdict::Verified,
                transaction: Some(PackageTransaction {
                    summary: "openssl 3.0.15, 2 files".into(),
                    files: 2,
                    changes: vec![item("/usr/bin/a", '2'), item("/usr/bin/b", second)],
                }),
            });
            Transition::of(&s).unwrap()
        };
        let a = txn("/dev/sda1", 10, '2');
        let b = txn("/dev/nvme0n1p1", 70, '2');
        assert_eq!(
            a, b,
            "the same transaction, whatever the node's inodes and devices"
        );
        let c = txn("/dev/sda1", 10, '3');
        assert_ne!(a.id(), c.id(), "one change differs: another transition");
        assert!(a.same_file(&c), "an outlier of the rollout");
        let mut single = spec("a", state('1', 1, "/dev/sda1"), state('2', 2, "/dev/sda1"));
        single.path = "/usr/bin/a".into();
        assert_ne!(Transition::of(&single).unwrap(), a);
    }

    #[test]
    fn a_summary_is_no_transition() {
        let mut s = spec("a", state('1', 1, "x"), state('2', 1, "x"));
        s.category = ChangeCategory::Summary;
        assert_eq!(Transition::of(&s), None);
    }
}
