//! Approvals: the approved state of a path becomes its baseline, if the file
//! is still in it.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube_fim_crds::{DetectionSource, FileAttributes};
use tracing::warn;

use super::diff::{present, project};
use super::{Engine, Outcome};
use crate::paths::rel_path;

/// What became of an approval.
#[derive(Debug)]
pub enum Approved {
    /// The file was in the approved state, which is the baseline now.
    Applied,
    /// The file has moved on: nothing approved; these changes report it.
    Superseded(Outcome),
    /// No served policy covers the path: nothing approved, the baseline is
    /// unchanged.
    NotMonitored,
}

impl Engine {
    /// Makes the approved state of `key` its baseline, if the file is still in
    /// it. `after` is the state the approver saw: a FileChange's `after` (the
    /// entry's compared attributes only), `None` for a removal. When the file
    /// has moved on, nothing is approved and the outcome holds the changes
    /// that report its present state (none if that was reported already).
    /// A path no served policy covers approves nothing either.
    pub fn approve(&mut self, key: &str, after: Option<&FileAttributes>) -> Approved {
        let path = rel_path(key);
        let plan = Arc::clone(&self.plan);
        let owners = plan.owners(&path);
        if owners.is_empty() {
            warn!(path = %key, "not monitored here: nothing to approve");
            return Approved::NotMonitored;
        }
        let mut scratch = Outcome::default();
        let current = self.inspect(&path, &owners, &mut scratch);
        if !scratch.errors.is_empty() {
            warn!(path = %key, "approved path could not be read");
        }
        let still = match (after, &current) {
            (None, None) => true,
            (Some(a), Some(c)) => project(c, &present(a)) == *a,
            _ => false,
        };
        if !still {
            let (outcome, _) = self.rescan(&BTreeSet::from([path]), DetectionSource::Scan);
            return Approved::Superseded(outcome);
        }
        self.baseline.approve(key, current);
        Approved::Applied
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::tests::*;
    #[test]
    fn an_approval_of_a_state_the_file_has_left_approves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        e.scan(DetectionSource::Startup);
        std::fs::write(root.path().join("etc/hosts"), "approved").unwrap();
        let seen = e.scan(DetectionSource::Scan).changes[0].after.clone();
        // Changed again before the approval arrives: the new state is reported.
        std::fs::write(root.path().join("etc/hosts"), "sneaked in").unwrap();
        let o = match e.approve("/etc/hosts", seen.as_ref()) {
            Approved::Superseded(o) => o,
            Approved::Applied | Approved::NotMonitored => Outcome::default(),
        };
        let d = describe(&o);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("Modified /etc/hosts"), "{d:?}");
        assert_ne!(o.changes[0].after, seen);
        // The baseline is still the original: the next change is measured from it.
        std::fs::write(root.path().join("etc/hosts"), "third").unwrap();
        let next = e.scan(DetectionSource::Scan).changes;
        let before = next[0].before.as_ref().and_then(|b| b.hash.clone());
        assert_eq!(before, Some(blake3::hash(b"a").to_hex().to_string()));
    }

    #[test]
    fn an_approval_of_a_path_no_policy_covers_approves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        for dir in ["etc", "etcx", "opt"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        std::fs::write(root.path().join("etcx/hosts"), "x").unwrap();
        std::fs::write(root.path().join("opt/tool"), "t").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        scan(&mut e, DetectionSource::Startup);
        let digest = e.save().unwrap();
        let entries = digests_of(&e);

        // Even an approval of a file's present state (/opt/tool's) approves
        // nothing where no served entry covers the path: beside the entry, a
        // name it prefixes, below a non-recursive entry.
        let tool = FileAttributes {
            hash: Some(blake3::hash(b"t").to_hex().to_string()),
            ..FileAttributes::default()
        };
        for key in ["/opt/tool", "/etcx/hosts", "/etc/sub/deep"] {
            let answer = e.approve(key, Some(&tool));
            assert!(
                matches!(answer, Approved::NotMonitored),
                "{key}: {answer:?}"
            );
            assert!(e.baseline().approved(key).is_none(), "{key}");
        }
        assert!(!e.baseline().is_dirty(), "nothing written");
        assert_eq!(
            e.save().unwrap(),
            digest,
            "the baseline digest is unchanged"
        );
        assert_eq!(digests_of(&e), entries);
        assert!(scan(&mut e, DetectionSource::Scan).changes.is_empty());
    }
}
