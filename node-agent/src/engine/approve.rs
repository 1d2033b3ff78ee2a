//! Approvals: the reviewed state of a path (a FileChange's `after`, for its
//! policy entry) becomes its baseline, if the file is exactly in it. The
//! answer says how the approval moved the published entry digests, so the
//! cluster can follow a node's digests through the approvals it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube_fim_crds::{DetectionSource, EntryDigestMove, FileAttributes};
use tracing::warn;

use super::diff::{DIR_ATTRS, is_dir, project};
use super::{Engine, Outcome};
use crate::paths::rel_path;
use crate::plan::Entry;

/// An approver's decision: `after` is the state of `key` that the change
/// of `policy`/`entry` reported (that entry's compared attributes only; `None`
/// for a removal).
#[derive(Clone, Debug)]
pub struct Approval<'a> {
    pub policy: &'a str,
    pub entry: &'a str,
    pub key: &'a str,
    pub after: Option<&'a FileAttributes>,
}

/// What became of an approval.
#[derive(Debug)]
pub enum Approved {
    /// The file was exactly in the approved state, which is the baseline now
    /// (in memory: see [`Engine::revert_approval`] until it is saved).
    Applied(Box<Applied>),
    /// The file has moved on: nothing approved; these changes report it.
    Superseded(Outcome),
    /// The change's policy entry, served here, does not cover the path:
    /// nothing approved, the baseline is unchanged.
    NotMonitored,
}

/// An approval applied to the baseline in memory.
#[derive(Debug)]
pub struct Applied {
    /// How the entry digests moved (the change's own entry first).
    pub moved: Vec<EntryDigestMove>,
    key: String,
    previous: Option<FileAttributes>,
}

/// What became of the approvals of [`Engine::approve_all`].
#[derive(Debug, Default)]
pub struct ApprovedAll {
    /// Applied in memory, in order, with the states they replaced.
    applied: Vec<(String, Option<FileAttributes>)>,
    /// The paths whose approved state is the baseline now (in memory).
    pub applied_paths: Vec<String>,
    /// How the entry digests moved, all approvals together.
    pub moved: Vec<EntryDigestMove>,
    /// Paths that moved on, with the changes that report them.
    pub superseded: Vec<(String, Outcome)>,
    /// Paths the change's entry does not cover here.
    pub not_monitored: Vec<String>,
}

/// The attributes an entry compares (a directory's only, for a directory),
/// as the judge does.
fn compared(entry: &Entry, dir: bool) -> Vec<kube_fim_crds::Attribute> {
    let mut attrs = entry.attributes.clone();
    if dir {
        attrs.retain(|x| DIR_ATTRS.contains(x));
    }
    attrs
}

/// `previous` with the attributes `attrs` taken from `after`: the reviewed
/// attributes only, so an approval never takes in what another entry of the
/// same path compares and nobody reviewed.
fn reviewed(
    previous: Option<&FileAttributes>,
    after: &FileAttributes,
    attrs: &[kube_fim_crds::Attribute],
) -> FileAttributes {
    use kube_fim_crds::Attribute as A;
    let mut out = previous.cloned().unwrap_or_default();
    for a in attrs {
        match a {
            A::Hash => out.hash.clone_from(&after.hash),
            A::Size => out.size = after.size,
            A::Type => out.file_type = after.file_type,
            A::Mode => out.mode.clone_from(&after.mode),
            A::Uid => out.uid = after.uid,
            A::Gid => out.gid = after.gid,
            A::Xattrs => out.xattrs.clone_from(&after.xattrs),
            A::Mtime => out.mtime.clone_from(&after.mtime),
            A::Ctime => out.ctime.clone_from(&after.ctime),
            A::Inode => out.inode = after.inode,
            A::Links => out.links = after.links,
            A::LinkTarget => out.link_target.clone_from(&after.link_target),
            A::Mount => out.mount.clone_from(&after.mount),
        }
    }
    out
}

impl Engine {
    /// Makes the reviewed state its path's baseline if the file is exactly in
    /// it: every attribute the change's entry compares equal to `after`, none
    /// more, none less. Only those attributes are taken in. When the file has
    /// moved on, nothing is approved and the outcome holds the changes that
    /// report its present state (none if that was reported already). An
    /// entry not served here, or not covering the path, approves nothing.
    /// Applied only in memory: the caller records the answer in the cluster,
    /// then saves (or reverts).
    pub fn approve(&mut self, approval: &Approval<'_>) -> Approved {
        let before = self.digests_by_entry();
        let previous = match self.adopt(approval) {
            Ok(previous) => previous,
            Err(not) => return not,
        };
        let key = approval.key;
        let own = (approval.policy.to_string(), approval.entry.to_string());
        let moved = self.moves(&before, &own);
        Approved::Applied(Box::new(Applied {
            moved,
            key: key.to_string(),
            previous,
        }))
    }

    /// Approves many changes at once (the changes of a package transaction),
    /// each exactly as [`Engine::approve`] would; the entry digests' moves
    /// are those of all of them together (the first change's entry first).
    pub fn approve_all(&mut self, approvals: &[Approval<'_>]) -> ApprovedAll {
        let before = self.digests_by_entry();
        let mut all = ApprovedAll::default();
        for a in approvals {
            match self.adopt(a) {
                Ok(previous) => {
                    all.applied.push((a.key.to_string(), previous));
                    all.applied_paths.push(a.key.to_string());
                }
                Err(Approved::Superseded(outcome)) => {
                    all.superseded.push((a.key.to_string(), outcome));
                }
                Err(Approved::NotMonitored | Approved::Applied(_)) => {
                    all.not_monitored.push(a.key.to_string());
                }
            }
        }
        if let Some(first) = approvals.first().filter(|_| !all.applied.is_empty()) {
            let own = (first.policy.to_string(), first.entry.to_string());
            all.moved = self.moves(&before, &own);
        }
        all
    }

    /// Undoes the applied approvals of [`Engine::approve_all`], last first.
    pub fn revert_all(&mut self, all: ApprovedAll) {
        for (key, previous) in all.applied.into_iter().rev() {
            self.baseline.approve(&key, previous);
        }
    }

    fn moves(
        &self,
        before: &BTreeMap<(String, String), String>,
        own: &(String, String),
    ) -> Vec<EntryDigestMove> {
        let after = self.digests_by_entry();
        let mut moved: Vec<EntryDigestMove> = after
            .iter()
            .filter_map(|(k, a)| {
                let b = before.get(k)?;
                (b != a || k == own).then(|| EntryDigestMove {
                    policy: k.0.clone(),
                    entry: k.1.clone(),
                    before: b.clone(),
                    after: a.clone(),
                })
            })
            .collect();
        moved.sort_by_key(|m| m.policy != own.0 || m.entry != own.1);
        moved
    }

    /// The reviewed state taken in as the path's baseline (in memory), with
    /// the state it replaces; or why not.
    fn adopt(&mut self, approval: &Approval<'_>) -> Result<Option<FileAttributes>, Approved> {
        let key = approval.key;
        let path = rel_path(key);
        let plan = Arc::clone(&self.plan);
        let owners = plan.owners(&path);
        let Some(entry) = owners
            .iter()
            .find(|o| o.owner.policy == approval.policy && o.owner.entry == approval.entry)
        else {
            warn!(path = %key, policy = approval.policy, entry = approval.entry, "not monitored here by that entry: nothing to approve");
            return Err(Approved::NotMonitored);
        };
        let mut scratch = Outcome::default();
        let current = self.inspect(&path, &owners, &mut scratch);
        if !scratch.errors.is_empty() {
            warn!(path = %key, "approved path could not be read");
        }
        let previous = self.baseline.approved(key);
        let adopted = match (approval.after, &current) {
            (None, None) if scratch.errors.is_empty() => Some(None),
            (Some(a), Some(c)) => {
                let attrs = compared(entry, is_dir(Some(c)) || is_dir(previous.as_ref()));
                // What the entry compares, equal; and nothing the entry does
                // not report (a state named only in part is not reviewed).
                let exact =
                    project(c, &attrs) == project(a, &attrs) && project(a, &entry.attributes) == *a;
                exact.then(|| Some(reviewed(previous.as_ref(), a, &attrs)))
            }
            _ => None,
        };
        let Some(state) = adopted else {
            let (outcome, _) = self.rescan(&BTreeSet::from([path]), DetectionSource::Scan);
            return Err(Approved::Superseded(outcome));
        };
        self.baseline.approve(key, state);
        Ok(previous)
    }

    /// Undoes an applied approval whose answer the cluster does not hold:
    /// the path's approved state is what it was (its state is then reported
    /// again, as not approved).
    pub fn revert_approval(&mut self, applied: Box<Applied>) {
        let Applied { key, previous, .. } = *applied;
        self.baseline.approve(&key, previous);
    }

    fn digests_by_entry(&self) -> BTreeMap<(String, String), String> {
        self.entry_digests()
            .into_iter()
            .map(|d| ((d.policy, d.entry), d.digest))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::engine::tests::*;
    /// A package transaction's approval: every listed change approved as
    /// one would be, the entry digest moved once from where it was to where
    /// all of them take it (what the operator's digest verification
    /// follows), a change that moved on left out; undone whole when the
    /// answer is not recorded.
    #[test]
    fn approving_a_transaction_moves_its_entry_digest_once_through_every_change() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        for f in ["a", "b", "c"] {
            std::fs::write(root.path().join("etc").join(f), "v1").unwrap();
        }
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        scan(&mut e, DetectionSource::Startup);
        let first = digests_of(&e)["p/etc"].digest.clone();
        for f in ["a", "b", "c"] {
            std::fs::write(root.path().join("etc").join(f), "v2").unwrap();
        }
        let o = scan(&mut e, DetectionSource::Scan);
        assert_eq!(o.changes.len(), 3);
        // One of them moved on before the approval arrives.
        std::fs::write(root.path().join("etc/c"), "v3").unwrap();
        let approvals: Vec<Approval<'_>> = o
            .changes
            .iter()
            .map(|c| Approval {
                policy: "p",
                entry: "etc",
                key: &c.path,
                after: c.after.as_ref(),
            })
            .collect();
        let all = e.approve_all(&approvals);
        let mut applied = all.applied_paths.clone();
        applied.sort();
        assert_eq!(applied, ["/etc/a", "/etc/b"]);
        assert_eq!(
            all.superseded
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>(),
            ["/etc/c"]
        );
        let now = digests_of(&e)["p/etc"].digest.clone();
        assert_eq!(all.moved.len(), 1, "{:?}", all.moved);
        assert_eq!(
            (all.moved[0].before.as_str(), all.moved[0].after.as_str()),
            (first.as_str(), now.as_str())
        );
        assert_ne!(first, now);
        // The same two approved one by one reach the same digest.
        e.revert_all(all);
        assert_eq!(digests_of(&e)["p/etc"].digest, first, "undone whole");
        for a in approvals.iter().filter(|a| a.key != "/etc/c") {
            assert!(matches!(e.approve(a), Approved::Applied(_)));
        }
        assert_eq!(digests_of(&e)["p/etc"].digest, now);
    }

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
        let o = match approve(&mut e, "/etc/hosts", seen.as_ref()) {
            Approved::Superseded(o) => o,
            Approved::Applied(_) | Approved::NotMonitored => Outcome::default(),
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
    fn an_approval_takes_in_only_what_its_entry_reviewed() {
        use crate::engine::PolicyInput;
        use kube_fim_crds::{Attribute, FileIntegrityPolicySpec};
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let tool = root.path().join("usr/bin/tool");
        std::fs::create_dir_all(tool.parent().unwrap()).unwrap();
        std::fs::write(&tool, "v1").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let policy = |attribute| {
            let mut p = entry("tool", "/usr/bin/tool", false);
            p.attributes = vec![attribute];
            PolicyInput {
                generation: Some(1),
                spec: FileIntegrityPolicySpec::with_paths(vec![p]),
            }
        };
        let mut e = Engine::open(root.path(), state.path(), "n").unwrap();
        e.set_policies(BTreeMap::from([
            ("content".to_string(), policy(Attribute::Hash)),
            ("perm".to_string(), policy(Attribute::Mode)),
        ]))
        .unwrap();
        scan(&mut e, DetectionSource::Startup);
        let first = digests_of(&e);

        std::fs::write(&tool, "v2").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        let content = o.changes.iter().find(|c| c.policy == "content").unwrap();
        let mut approval = Approval {
            policy: "content",
            entry: "tool",
            key: "/usr/bin/tool",
            after: content.after.as_ref(),
        };
        // A state named only in part (no hash) is not what the entry reviews.
        let partial = FileAttributes::default();
        approval.after = Some(&partial);
        assert!(matches!(e.approve(&approval), Approved::Superseded(_)));
        // Named by another policy's entry: that entry does not cover it here.
        approval.after = content.after.as_ref();
        approval.policy = "other";
        assert!(matches!(e.approve(&approval), Approved::NotMonitored));
        approval.policy = "content";
        let Approved::Applied(applied) = e.approve(&approval) else {
            panic!("not applied");
        };
        let now = digests_of(&e);
        assert_eq!(applied.moved.len(), 1, "{:?}", applied.moved);
        assert_eq!(applied.moved[0].policy, "content");
        assert_eq!(applied.moved[0].before, first["content/tool"].digest);
        assert_eq!(applied.moved[0].after, now["content/tool"].digest);
        assert_eq!(
            now["perm/tool"], first["perm/tool"],
            "the setuid bit is not approved"
        );
        // Not recorded in the cluster: undone.
        e.revert_approval(applied);
        assert_eq!(digests_of(&e), first);
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
            let answer = approve(&mut e, key, Some(&tool));
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

    #[test]
    fn approving_a_restored_state_adopts_nothing() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        let sudoers = root.path().join("etc/sudoers");
        std::fs::write(&sudoers, "root ALL\n").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        scan(&mut e, DetectionSource::Startup);
        let digest = e.save().unwrap();
        let entries = digests_of(&e);
        let rel = std::path::PathBuf::from("etc/sudoers");
        let original = std::fs::metadata(&sudoers).unwrap().modified().unwrap();
        std::fs::write(&sudoers, "root ALL\nevil ALL\n").unwrap();
        assert!(e.closed(&rel));
        std::fs::write(&sudoers, "root ALL\n").unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&sudoers)
            .unwrap();
        f.set_modified(original).unwrap();
        drop(f);
        let (o, _) = e.rescan(&BTreeSet::from([rel]), DetectionSource::Realtime);
        e.mark_reported(&o);
        let restored = &o.changes[0];
        assert_eq!(restored.restored, Some(true));

        // The file is back: the state it was in is not there to adopt, and
        // nothing new is reported.
        let answer = approve(&mut e, "/etc/sudoers", restored.after.as_ref());
        let Approved::Superseded(again) = answer else {
            panic!("not superseded: {answer:?}");
        };
        assert!(again.changes.is_empty(), "{:?}", describe(&again));
        assert_eq!(
            e.baseline().approved("/etc/sudoers").and_then(|a| a.hash),
            Some(blake3::hash(b"root ALL\n").to_hex().to_string())
        );
        assert_eq!(digests_of(&e), entries, "the entry digests did not move");
        assert_eq!(e.save().unwrap(), digest, "the baseline is unchanged");
    }
}
