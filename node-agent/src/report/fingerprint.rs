//! SHA-256 beside BLAKE3, for the sinks that ask for it
//! (`FileChangeSink.spec.fingerprints`; the operator passes
//! `--fingerprints=sha256` to the agents then).
//!
//! Only a change's new content is hashed again, by the reporter as it queues
//! the change (step 3 of [`super`]), right after detection: scans and the
//! baseline stay BLAKE3 only, and the state before has no SHA-256 (the agent
//! no longer has those bytes). The file is read once into both hashers and
//! the SHA-256 is kept only when the BLAKE3 of that read equals the
//! change's `after.hash`: a file rewritten between detection and this read
//! gets no SHA-256 (and says why) rather than a SHA-256 of other bytes than
//! its BLAKE3's. A file too large or unreadable says why too. The
//! FileChange's name does not depend on either field ([`super::object`]).

use kube_fim_crds::{FileAttributes, FileChangeSpec, FileType};

use crate::hostfs::{HostRoot, InspectError};
use crate::paths::rel_path;

/// Largest file hashed with SHA-256 too (1 GiB: a few seconds of one core
/// at worst, for a change of a file that large).
pub const SHA256_MAX_BYTES: u64 = 1 << 30;

/// Adds SHA-256 fingerprints to changes, reading the host's files.
#[derive(Clone, Debug)]
pub struct Fingerprints {
    root: HostRoot,
    max: u64,
}

impl Fingerprints {
    pub fn new(root: HostRoot) -> Self {
        Fingerprints {
            root,
            max: SHA256_MAX_BYTES,
        }
    }

    /// Files larger than `max` bytes get no SHA-256.
    pub fn with_max(mut self, max: u64) -> Self {
        self.max = max;
        self
    }

    /// Sets `after.sha256` (or `after.sha256Missing`) of a change and of each
    /// file of its package transaction. Blocks on the host's disk.
    pub fn add(&self, spec: &mut FileChangeSpec) {
        let container = spec.container.is_some();
        if let Some(after) = spec.after.as_mut() {
            self.one(&spec.path, container, after);
        }
        if let Some(t) = spec.package.as_mut().and_then(|p| p.transaction.as_mut()) {
            for item in &mut t.changes {
                if let Some(after) = item.after.as_mut() {
                    self.one(&item.path, container, after);
                }
            }
        }
    }

    fn one(&self, path: &str, container: bool, after: &mut FileAttributes) {
        if after.file_type != Some(FileType::File) {
            return;
        }
        let Some(expected) = after.hash.as_deref() else {
            after.sha256_missing = Some(match &after.unreadable {
                Some(why) => format!("content not read: {why}"),
                None => "content not hashed (its entry does not compare content, or the file is larger than the agent hashes)".into(),
            });
            return;
        };
        if container {
            // Its path is the container's, read through the container's
            // layers by the drift task, not here.
            after.sha256_missing = Some("a container's file: not read again".into());
            return;
        }
        after.sha256_missing = match self.root.blake3_and_sha256(&rel_path(path), self.max) {
            Ok((blake3, sha256)) if blake3 == expected => {
                after.sha256 = Some(sha256);
                None
            }
            Ok(_) => Some(
                "changed again before it was read for SHA-256 (its BLAKE3 differs from hash)"
                    .into(),
            ),
            Err(e @ InspectError::TooLarge(_)) => Some(e.to_string()),
            Err(e) => Some(format!("unreadable: {e}")),
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use kube_fim_crds::{
        ChangeCategory, DetectionSource, PackageCheck, PackageManager, PackageTransaction,
        PackageVerdict, TransactionItem,
    };
    use sha2::Digest;

    fn sha256(b: &[u8]) -> String {
        format!("{:x}", sha2::Sha256::digest(b))
    }

    fn after(content: &[u8]) -> FileAttributes {
        FileAttributes {
            file_type: Some(FileType::File),
            hash: Some(blake3::hash(content).to_hex().to_string()),
            size: Some(content.len() as u64),
            ..FileAttributes::default()
        }
    }

    fn spec(path: &str, after: FileAttributes) -> FileChangeSpec {
        let mut s = crate::fixtures::change(path);
        s.category = ChangeCategory::Modified;
        s.source = DetectionSource::Realtime;
        s.after = Some(after);
        s
    }

    fn fingerprints(dir: &std::path::Path) -> Fingerprints {
        Fingerprints::new(HostRoot::open(dir).unwrap())
    }

    #[test]
    fn the_sha256_is_of_the_bytes_the_blake3_was_taken_of() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), b"root:x:0:0\n").unwrap();
        let mut s = spec("/passwd", after(b"root:x:0:0\n"));
        fingerprints(dir.path()).add(&mut s);
        let a = s.after.unwrap();
        assert_eq!(a.sha256, Some(sha256(b"root:x:0:0\n")));
        assert_eq!(a.sha256_missing, None);
    }

    #[test]
    fn a_file_rewritten_since_detection_gets_no_sha256_and_says_why() {
        // The attacker rewrites the file between the agent's BLAKE3 read and
        // its SHA-256 read: a SHA-256 of the new bytes beside the BLAKE3 of
        // the old would let one of the two lie.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sudoers"), b"evil ALL\n").unwrap();
        let mut s = spec("/sudoers", after(b"root ALL\n"));
        fingerprints(dir.path()).add(&mut s);
        let a = s.after.unwrap();
        assert_eq!(
            a.sha256, None,
            "no SHA-256 of other bytes than the BLAKE3's"
        );
        assert!(
            a.sha256_missing
                .as_deref()
                .unwrap()
                .contains("changed again"),
            "{a:?}"
        );
    }

    #[test]
    fn too_large_unreadable_or_unhashed_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![b'x'; 4096]).unwrap();
        let mut s = spec("/big", after(&vec![b'x'; 4096]));
        fingerprints(dir.path()).with_max(1024).add(&mut s);
        assert_eq!(
            s.after.unwrap().sha256_missing.as_deref(),
            Some("larger than 1024 bytes")
        );

        let mut gone = spec("/gone", after(b"x"));
        fingerprints(dir.path()).add(&mut gone);
        let a = gone.after.unwrap();
        assert_eq!(a.sha256, None);
        assert!(a.sha256_missing.unwrap().starts_with("unreadable: "));

        let mut unread = spec(
            "/big",
            FileAttributes {
                file_type: Some(FileType::File),
                unreadable: Some("EACCES: permission denied".into()),
                ..FileAttributes::default()
            },
        );
        fingerprints(dir.path()).add(&mut unread);
        assert_eq!(
            unread.after.unwrap().sha256_missing.as_deref(),
            Some("content not read: EACCES: permission denied")
        );
    }

    #[test]
    fn no_sha256_is_made_up_for_what_has_no_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let mut s = spec(
            "/d",
            FileAttributes {
                file_type: Some(FileType::Directory),
                ..FileAttributes::default()
            },
        );
        s.before = None;
        fingerprints(dir.path()).add(&mut s);
        let a = s.after.unwrap();
        assert_eq!((a.sha256, a.sha256_missing), (None, None));
        // A symlink named by the change is not followed to its target.
        std::fs::write(dir.path().join("target"), b"t").unwrap();
        std::os::unix::fs::symlink("target", dir.path().join("link")).unwrap();
        let mut l = spec("/link", after(b"t"));
        fingerprints(dir.path()).add(&mut l);
        assert_eq!(l.after.unwrap().sha256, None);
    }

    #[test]
    fn each_file_of_a_package_transaction_gets_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ls"), b"ls v2").unwrap();
        let mut s = spec("/ls", after(b"ls v2"));
        s.package = Some(PackageCheck {
            manager: PackageManager::Dpkg,
            name: "coreutils".into(),
            version: "9.1-2".into(),
            version_before: None,
            verdict: PackageVerdict::Verified,
            transaction: Some(PackageTransaction {
                summary: "coreutils 9.1-2".into(),
                files: 1,
                changes: vec![TransactionItem {
                    path: "/ls".into(),
                    category: ChangeCategory::Modified,
                    changed_attributes: vec![],
                    before: None,
                    after: Some(after(b"ls v2")),
                    detected_time: s.detected_time.clone(),
                    source: DetectionSource::Scan,
                    process: None,
                    package: "coreutils".into(),
                    version: "9.1-2".into(),
                    version_before: None,
                }],
            }),
        });
        fingerprints(dir.path()).add(&mut s);
        let t = s.package.unwrap().transaction.unwrap();
        assert_eq!(
            t.changes[0].after.as_ref().unwrap().sha256,
            Some(sha256(b"ls v2"))
        );
    }
}
