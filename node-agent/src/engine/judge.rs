//! The judgement of one path against the baseline: its state now (settled
//! from what inspecting it gave), compared with the approved state for each
//! established entry that owns it, one change per policy; a difference is
//! reported once (its digest is remembered once the change is queued).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{Attribute, ChangeCategory, DetectionSource, FileAttributes, FileChangeSpec};
use tracing::debug;

use super::diff::{DIR_ATTRS, differing, is_dir, project, without_late_attributes};
use super::{Engine, Outcome, ScanError};
use crate::baseline::state_digest;
use crate::hostfs::Inspected;
use crate::paths::{host_path, rel_path};
use crate::plan::{Entry, Plan};

/// What a path's state is against the baseline ([`Engine::assess`]).
enum Verdict {
    /// Only new entries watch it: the state is their baseline.
    Establish,
    /// The approved state, with attributes measured for the first time.
    Adopt(Box<FileAttributes>),
    /// The approved state.
    Settled,
    /// A difference reported already.
    Reported,
    /// A difference: the changes to report (none when only what no entry
    /// compares differs), and the digest of the state.
    Changes {
        changes: Vec<FileChangeSpec>,
        digest: String,
    },
}

/// The longest reason a state gives for being unreadable (the CRD's
/// `maxLength` of `unreadable`).
const UNREADABLE_MAX: usize = 256;

impl Engine {
    /// Re-examines the given root-relative paths (real-time events): each path,
    /// what is below it now (a new directory), and what the baseline had below it.
    pub fn rescan(
        &mut self,
        paths: &BTreeSet<PathBuf>,
        source: DetectionSource,
    ) -> (Outcome, bool) {
        let mut out = Outcome::default();
        self.mounts = self.mount_source.read();
        let mut candidates: BTreeSet<PathBuf> = BTreeSet::new();
        let mut new_dirs = false;
        for p in paths {
            // Judged again below if still monitored.
            self.unreadable.remove(p);
            candidates.insert(p.clone());
            candidates.extend(
                self.baseline
                    .keys_under(&host_path(p))
                    .iter()
                    .map(|k| rel_path(k)),
            );
            // A directory that appeared under a recursive entry: walk it.
            let owners = self.plan.owners(p);
            if owners.iter().any(|o| o.recursive) {
                let mut stack = vec![p.clone()];
                while let Some(dir) = stack.pop() {
                    let Ok(children) = self.root.list_dir(&dir) else {
                        continue;
                    };
                    if self.dirs.insert(dir.clone()) {
                        new_dirs = true;
                    }
                    for c in children {
                        let child = dir.join(&c.name);
                        if self.plan.owners(&child).is_empty() {
                            continue;
                        }
                        candidates.insert(child.clone());
                        if c.is_dir {
                            stack.push(child);
                        }
                    }
                }
            }
        }
        let plan = Arc::clone(&self.plan);
        for path in &candidates {
            let owners = plan.owners(path);
            if owners.is_empty() {
                continue;
            }
            let current = self.inspect(path, &owners, &mut out);
            let key = host_path(path);
            self.judge(&key, path, current, &owners, source, &mut out);
        }
        // What was not judged (no longer monitored) is forgotten.
        for p in paths {
            self.transient.take(&host_path(p));
        }
        (out, new_dirs)
    }

    pub(super) fn inspect(
        &self,
        path: &Path,
        owners: &[&Entry],
        out: &mut Outcome,
    ) -> Option<FileAttributes> {
        self.progress.beat();
        let want = Plan::wanted(owners);
        let result = self.root.inspect(path, &want, &mut out.bytes);
        self.settle(path, &want, result, out)
    }

    /// The state of `path` to judge from what inspecting it for `want` gave.
    pub(super) fn settle(
        &self,
        path: &Path,
        want: &[Attribute],
        result: Inspected,
        out: &mut Outcome,
    ) -> Option<FileAttributes> {
        let mut state = match result {
            Ok(Some(a)) => a,
            Ok(None) => return None,
            // Not even its metadata could be read: a state that says so,
            // never the baseline's (a read error never means unchanged).
            Err(err) => FileAttributes {
                unreadable: Some(err.to_string()),
                ..FileAttributes::default()
            },
        };
        if let Some(reason) = &mut state.unreadable {
            // Within what a FileChange holds (the CRD's maxLength).
            if let Some((at, _)) = reason.char_indices().nth(UNREADABLE_MAX) {
                reason.truncate(at);
            }
            debug!(path = %host_path(path), %reason, "unreadable");
            out.errors.push(ScanError {
                path: host_path(path),
                reason: reason.clone(),
            });
        }
        if want.contains(&Attribute::Mount) {
            state.mount = self.mounts.as_ref().and_then(|t| t.covering(path)).cloned();
        }
        Some(state)
    }

    /// Compares one path with the baseline and collects the changes to report.
    pub(super) fn judge(
        &mut self,
        key: &str,
        path: &Path,
        current: Option<FileAttributes>,
        owners: &[&Entry],
        source: DetectionSource,
        out: &mut Outcome,
    ) {
        // Looked at again until it can be read (see `Engine::unreadable`).
        if current.as_ref().is_some_and(|c| c.unreadable.is_some()) {
            self.unreadable.insert(path.to_path_buf());
        } else {
            self.unreadable.remove(path);
        }
        let verdict = self.assess(key, path, current.as_ref(), owners, source);
        let transient = self.transient.take(key);
        match verdict {
            Verdict::Establish => self.baseline.establish_path(key, current),
            Verdict::Adopt(c) => self.baseline.adopt(key, *c),
            Verdict::Settled | Verdict::Reported => {
                if matches!(verdict, Verdict::Settled) {
                    self.baseline.settled(key);
                }
                // Back by the end of the window: the write still happened.
                if let Some(changes) = transient {
                    out.changes.extend(changes);
                    out.epochs.insert(key.to_string(), self.baseline.epoch(key));
                }
            }
            Verdict::Changes { changes, digest } => {
                // A state reported now supersedes a transient one of the same
                // content; one of other content (written, then put back but
                // for its mtime) is reported too, restored, before it.
                let other_content: Vec<FileChangeSpec> = transient
                    .into_iter()
                    .flatten()
                    .filter(|t| {
                        let written = t.after.as_ref().and_then(|a| a.hash.as_ref());
                        written.is_some()
                            && !changes
                                .iter()
                                .any(|c| c.after.as_ref().and_then(|a| a.hash.as_ref()) == written)
                    })
                    .collect();
                if !other_content.is_empty() {
                    out.changes.extend(other_content);
                    out.epochs.insert(key.to_string(), self.baseline.epoch(key));
                }
                if !changes.is_empty() {
                    out.changes.extend(changes);
                    out.epochs.insert(key.to_string(), self.baseline.epoch(key));
                }
                // Marked even when no entry found a difference worth a report
                // (a directory's mtime): judged once per state.
                out.marks.push((key.to_string(), digest));
            }
        }
    }

    /// What `current` is against the baseline, deciding nothing: the one
    /// judgement both [`Engine::judge`] and [`Engine::peek`] make.
    fn assess(
        &self,
        key: &str,
        path: &Path,
        current: Option<&FileAttributes>,
        owners: &[&Entry],
        source: DetectionSource,
    ) -> Verdict {
        let mut established: Vec<&Entry> = Vec::new();
        for o in owners.iter().filter(|o| {
            self.baseline
                .is_established(&o.owner.policy, &o.owner.entry)
        }) {
            // One report per policy: its most specific entry (deepest base).
            match established
                .iter_mut()
                .find(|e| e.owner.policy == o.owner.policy)
            {
                Some(e) if o.base.components().count() > e.base.components().count() => *e = o,
                Some(_) => {}
                None => established.push(o),
            }
        }
        if established.is_empty() {
            // Only new entries watch it: what exists now is their baseline, silently.
            return Verdict::Establish;
        }
        let approved = self.baseline.approved(key);
        if approved.as_ref() == current {
            return Verdict::Settled;
        }
        if let (Some(a), Some(c)) = (&approved, current)
            && let Some(unmeasured) = without_late_attributes(a, c)
        {
            if unmeasured == *a {
                // A state approved before these attributes were measured,
                // unchanged since: their values now are its baseline, as for a
                // new entry.
                return Verdict::Adopt(Box::new(c.clone()));
            }
            if !self.list_reported
                && self.baseline.reported(key).as_deref()
                    == Some(state_digest(Some(&unmeasured)).as_str())
            {
                return Verdict::Reported; // reported before these attributes were measured
            }
        }
        let digest = state_digest(current);
        if !self.list_reported && self.baseline.reported(key).as_deref() == Some(digest.as_str()) {
            return Verdict::Reported;
        }
        let category = match (&approved, current) {
            (None, Some(_)) => ChangeCategory::Added,
            (Some(_), None) => ChangeCategory::Removed,
            _ => ChangeCategory::Modified,
        };
        // A directory's own entry changes (mtime of /etc at each file change)
        // are noise: only its mode, owner and type count. A directory that
        // appears or goes is reported like a file (a hidden directory is how
        // payloads hide).
        let now = Timestamp::now();
        let mut changes = Vec::new();
        for o in established {
            let mut attrs = o.attributes.clone();
            if is_dir(current) || is_dir(approved.as_ref()) {
                attrs.retain(|a| DIR_ATTRS.contains(a));
            }
            let changed = match (&approved, current) {
                (Some(a), Some(c)) => {
                    let mut d = differing(a, c, &attrs);
                    if o.grow_only && self.grew_keeping_prefix(path, a, c) {
                        d.retain(|x| {
                            !matches!(
                                x,
                                Attribute::Hash
                                    | Attribute::Size
                                    | Attribute::Mtime
                                    | Attribute::Ctime
                            )
                        });
                    }
                    if d.is_empty() {
                        continue;
                    }
                    d
                }
                _ => Vec::new(),
            };
            let source = if self.resumed.contains(&o.owner.policy) {
                DetectionSource::Startup
            } else {
                source
            };
            changes.push(FileChangeSpec {
                node: self.node.clone(),
                policy: o.owner.policy.clone(),
                entry: o.owner.entry.clone(),
                path: key.to_string(),
                category,
                changed_attributes: changed,
                before: approved.as_ref().map(|a| project(a, &o.attributes)),
                after: current.map(|c| project(c, &o.attributes)),
                detected_time: MicroTime(now),
                source,
                process: None,
                summary: None,
                sequence: None,
                package: None,
                container: None,
                restored: None,
            });
        }
        Verdict::Changes { changes, digest }
    }

    /// Whether the present state of `path` (root-relative) would be reported
    /// as a modification, without recording anything: the changes it would
    /// be, marked restored (they are reported only if the file is back by the
    /// time its debounce ends, see [`Engine::closed`]). Reads the file.
    pub fn peek(&self, path: &Path) -> Vec<FileChangeSpec> {
        let plan = Arc::clone(&self.plan);
        let owners = plan.owners(path);
        if owners.is_empty() {
            return Vec::new();
        }
        let mut scratch = Outcome::default();
        let current = self.inspect(path, &owners, &mut scratch);
        // A state that could not be read whole is left to the rescan.
        if current.as_ref().is_none_or(|c| c.unreadable.is_some()) {
            return Vec::new();
        }
        let key = host_path(path);
        match self.assess(
            &key,
            path,
            current.as_ref(),
            &owners,
            DetectionSource::Realtime,
        ) {
            Verdict::Changes { mut changes, .. } => {
                // Only a file of the baseline modified in place: a new file
                // gone by the end of the window was mostly renamed (an
                // editor's temporary file), and the rename is reported.
                changes.retain(|c| c.category == ChangeCategory::Modified);
                for c in &mut changes {
                    c.restored = Some(true);
                }
                changes
            }
            Verdict::Establish | Verdict::Adopt(_) | Verdict::Settled | Verdict::Reported => {
                Vec::new()
            }
        }
    }

    /// A close after a write of `path` (root-relative): if its state now is
    /// a modification, it is remembered until the path's rescan, which
    /// reports it if the file is back by then. `false` when that could not be
    /// remembered (too many paths in the window): the rescan alone judges it.
    pub fn closed(&mut self, path: &Path) -> bool {
        let changes = self.peek(path);
        self.transient.record(host_path(path), changes)
    }

    /// Step 4 of the reporting protocol: the changes of `outcome` are safely
    /// queued, so their states are marked reported.
    pub fn mark_reported(&mut self, outcome: &Outcome) {
        for (key, digest) in &outcome.marks {
            self.baseline.mark_reported(key, digest.clone());
        }
    }

    pub(super) fn grew_keeping_prefix(
        &self,
        path: &Path,
        old: &FileAttributes,
        new: &FileAttributes,
    ) -> bool {
        match (old.size, new.size, &old.hash) {
            (Some(o), Some(n), Some(h)) if n >= o => {
                self.root.hash_prefix(path, o).is_ok_and(|p| &p == h)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::engine::Approved;
    use crate::engine::tests::*;
    #[test]
    fn baseline_then_changes_reported_once_until_approved() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        std::fs::write(root.path().join("etc/old"), "o").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        assert!(
            scan(&mut e, DetectionSource::Startup).changes.is_empty(),
            "first scan is the baseline"
        );

        std::fs::write(root.path().join("etc/hosts"), "bb").unwrap();
        std::fs::write(root.path().join("etc/new"), "n").unwrap();
        std::fs::remove_file(root.path().join("etc/old")).unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        let d = describe(&o);
        let hosts = o
            .changes
            .iter()
            .find(|c| c.path == "/etc/hosts")
            .and_then(|c| c.after.clone());
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("Added /etc/new"), "{d:?}");
        assert!(d[1].starts_with("Modified /etc/hosts"), "{d:?}");
        assert!(d[1].contains("Hash") && d[1].contains("Size"), "{d:?}");
        assert!(d[2].starts_with("Removed /etc/old"), "{d:?}");
        assert!(
            scan(&mut e, DetectionSource::Scan).changes.is_empty(),
            "reported once"
        );

        assert!(matches!(
            approve(&mut e, "/etc/hosts", hosts.as_ref()),
            Approved::Applied(_)
        ));
        std::fs::set_permissions(
            root.path().join("etc/hosts"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let d = describe(&scan(&mut e, DetectionSource::Scan));
        assert_eq!(d, ["Modified /etc/hosts [Mode]"]);
    }

    #[test]
    fn an_editor_rename_over_is_one_modified() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        scan(&mut e, DetectionSource::Startup);
        std::fs::write(root.path().join("etc/.hosts.swp"), "new").unwrap();
        std::fs::rename(
            root.path().join("etc/.hosts.swp"),
            root.path().join("etc/hosts"),
        )
        .unwrap();
        let paths = BTreeSet::from([PathBuf::from("etc/.hosts.swp"), PathBuf::from("etc/hosts")]);
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        e.mark_reported(&o);
        let d = describe(&o);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("Modified /etc/hosts"));
    }

    #[test]
    fn new_entries_baseline_silently_and_unreadable_files_are_reported_and_skipped() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/deep/er")).unwrap();
        std::fs::write(root.path().join("etc/deep/er/f"), "x").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut e, DetectionSource::Startup);
        // A loop below a monitored directory does not stop the scan.
        std::os::unix::fs::symlink("l2", root.path().join("etc/l1")).unwrap();
        std::os::unix::fs::symlink("l1", root.path().join("etc/l2")).unwrap();
        std::fs::write(root.path().join("etc/deep/er/g"), "y").unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        let d = describe(&o);
        assert!(
            d.iter().any(|c| c.starts_with("Added /etc/deep/er/g")),
            "{d:?}"
        );
        assert!(d.iter().any(|c| c.starts_with("Added /etc/l1")), "{d:?}");
    }

    #[test]
    fn a_new_hard_link_shows_on_the_file_itself() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(root.path().join("var/tmp")).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        std::fs::set_permissions(bin.join("sudo"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        let mut e = engine(
            root.path(),
            state.path(),
            vec![usr_bin(Vec::new()), etc(true)],
        );
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        scan(&mut e, DetectionSource::Startup);

        // A second name, where no entry looks: the binary itself changed.
        std::fs::hard_link(bin.join("sudo"), root.path().join("var/tmp/.s")).unwrap();
        // A new subdirectory moves its parent's link count: only the
        // subdirectory is reported.
        std::fs::create_dir(root.path().join("etc/sub")).unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        assert_eq!(
            describe(&o),
            ["Added /etc/sub []", "Modified /usr/bin/sudo [Links]"]
        );
        let sudo = o
            .changes
            .iter()
            .find(|c| c.path == "/usr/bin/sudo")
            .unwrap();
        assert_eq!(sudo.before.as_ref().and_then(|b| b.links), Some(1));
        assert_eq!(sudo.after.as_ref().and_then(|a| a.links), Some(2));
        let sub = o.changes.iter().find(|c| c.path == "/etc/sub").unwrap();
        assert_eq!(sub.after.as_ref().and_then(|a| a.links), None);
    }

    #[test]
    fn a_baseline_from_before_link_counts_upgrades_without_a_report() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        std::fs::write(bin.join("su"), "su").unwrap();
        // What an agent that did not measure link counts compared by default.
        let before: Vec<Attribute> = AttributeProfile::Full
            .attributes()
            .iter()
            .copied()
            .filter(|a| *a != Attribute::Links)
            .collect();
        let mut old = engine(root.path(), state.path(), vec![usr_bin(before)]);
        scan(&mut old, DetectionSource::Startup);
        // A change reported (and not yet approved) by the old agent.
        std::fs::write(bin.join("su"), "evil su").unwrap();
        assert_eq!(scan(&mut old, DetectionSource::Scan).changes.len(), 1);
        let on_disk = old.save().unwrap();
        let digests = old.entry_digests();
        drop(old);

        let mut new = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        // Nothing for the cluster to tell from what it last saw.
        assert_eq!(new.entry_digests(), digests);
        assert_eq!(new.loaded_digest(), Some(on_disk.as_str()));
        let o = scan(&mut new, DetectionSource::Startup);
        assert_eq!(describe(&o), Vec::<String>::new(), "no flood on upgrade");
        new.save().unwrap();
        // The unchanged binary's count is its baseline now.
        std::fs::hard_link(bin.join("sudo"), root.path().join("usr/.s")).unwrap();
        let o = scan(&mut new, DetectionSource::Scan);
        assert_eq!(describe(&o), ["Modified /usr/bin/sudo [Links]"]);
        // The changed one is compared on its count once approved again.
        let su = o.changes.iter().find(|c| c.path == "/usr/bin/su");
        assert!(su.is_none());
    }

    /// Puts `content` back in `path` with the mtime it had (what an attacker
    /// undoing a write does).
    fn put_back(path: &Path, content: &str) {
        let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
        std::fs::write(path, content).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_modified(mtime).unwrap();
    }

    fn hash_of(c: &FileChangeSpec) -> Option<String> {
        c.after.as_ref().and_then(|a| a.hash.clone())
    }

    #[test]
    fn a_state_seen_at_a_close_is_reported_restored_once_the_file_is_back() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        let sudoers = root.path().join("etc/sudoers");
        std::fs::write(&sudoers, "root ALL\n").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        let rel = PathBuf::from("etc/sudoers");
        let ready = BTreeSet::from([rel.clone()]);

        let original = std::fs::metadata(&sudoers).unwrap().modified().unwrap();
        std::fs::write(&sudoers, "root ALL\nevil ALL\n").unwrap();
        let peeked = e.peek(&rel);
        assert_eq!(
            describe_specs(&peeked),
            ["Modified /etc/sudoers [Hash, Size, Mtime]"]
        );
        assert!(!e.baseline().is_dirty(), "a peek records nothing");
        assert!(e.closed(&rel));
        // Put back, content and mtime.
        std::fs::write(&sudoers, "root ALL\n").unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&sudoers)
            .unwrap();
        f.set_modified(original).unwrap();
        drop(f);
        // The restore is a close too: its state (the baseline's) is nothing to keep.
        assert!(e.closed(&rel));
        let (o, _) = e.rescan(&ready, DetectionSource::Realtime);
        e.mark_reported(&o);
        assert_eq!(describe(&o), ["Modified /etc/sudoers [Hash, Size, Mtime]"]);
        assert_eq!(o.changes[0].restored, Some(true));
        assert_eq!(
            hash_of(&o.changes[0]),
            Some(blake3::hash(b"root ALL\nevil ALL\n").to_hex().to_string())
        );
        assert!(o.epochs.contains_key("/etc/sudoers"));
        let (again, _) = e.rescan(&ready, DetectionSource::Realtime);
        assert!(
            again.changes.is_empty(),
            "reported once: {:?}",
            describe(&again)
        );

        // A state that lasts supersedes the transient one: reported as today.
        std::fs::write(&sudoers, "root ALL\nevil ALL\n").unwrap();
        assert!(e.closed(&rel));
        put_back(&sudoers, "root ALL\nother\n");
        assert!(e.closed(&rel));
        let (o, _) = e.rescan(&ready, DetectionSource::Realtime);
        e.mark_reported(&o);
        assert_eq!(o.changes.len(), 1, "{:?}", describe(&o));
        assert_eq!(o.changes[0].restored, None);
        assert_eq!(
            hash_of(&o.changes[0]),
            Some(blake3::hash(b"root ALL\nother\n").to_hex().to_string())
        );

        // Already reported (not approved), written and put back into that
        // reported state: the state in between is reported restored.
        put_back(&sudoers, "root ALL\nworse\n");
        assert!(e.closed(&rel));
        put_back(&sudoers, "root ALL\nother\n");
        let (o, _) = e.rescan(&ready, DetectionSource::Realtime);
        assert_eq!(o.changes.len(), 1, "{:?}", describe(&o));
        assert_eq!(o.changes[0].restored, Some(true));
        assert_eq!(
            hash_of(&o.changes[0]),
            Some(blake3::hash(b"root ALL\nworse\n").to_hex().to_string())
        );
    }

    /// Written, then put back with the content but not the mtime: what is
    /// left is an mtime change, and the content in between is reported too.
    #[test]
    fn content_put_back_with_another_mtime_still_reports_the_content_in_between() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        let sudoers = root.path().join("etc/sudoers");
        std::fs::write(&sudoers, "root ALL\n").unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&sudoers)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        let rel = PathBuf::from("etc/sudoers");
        std::fs::write(&sudoers, "root ALL\nevil ALL\n").unwrap();
        assert!(e.closed(&rel));
        std::fs::write(&sudoers, "root ALL\n").unwrap();
        assert!(e.closed(&rel));
        let (o, _) = e.rescan(&BTreeSet::from([rel]), DetectionSource::Realtime);
        assert_eq!(o.changes.len(), 2, "{:?}", describe(&o));
        assert_eq!(o.changes[0].restored, Some(true));
        assert_eq!(
            hash_of(&o.changes[0]),
            Some(blake3::hash(b"root ALL\nevil ALL\n").to_hex().to_string())
        );
        assert_eq!(o.changes[1].restored, None);
        assert_eq!(describe(&o)[1], "Modified /etc/sudoers [Mtime]");
    }

    #[test]
    fn a_new_file_gone_by_the_end_of_the_window_is_not_kept() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut e, DetectionSource::Startup);
        // An editor's temporary file, renamed over the target.
        std::fs::write(root.path().join("etc/.hosts.swp"), "b").unwrap();
        assert!(e.peek(Path::new("etc/.hosts.swp")).is_empty());
        assert!(e.closed(Path::new("etc/.hosts.swp")));
        std::fs::rename(
            root.path().join("etc/.hosts.swp"),
            root.path().join("etc/hosts"),
        )
        .unwrap();
        let paths = BTreeSet::from([PathBuf::from("etc/.hosts.swp"), PathBuf::from("etc/hosts")]);
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        let d = describe(&o);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("Modified /etc/hosts"), "{d:?}");
        // Not monitored: nothing to peek at.
        assert!(e.peek(Path::new("opt/tool")).is_empty());
    }

    fn describe_specs(changes: &[FileChangeSpec]) -> Vec<String> {
        describe(&Outcome {
            changes: changes.to_vec(),
            ..Outcome::default()
        })
    }
}
