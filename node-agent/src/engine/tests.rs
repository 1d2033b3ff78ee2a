//! Helpers of the engine's tests, and tests of the engine as a whole.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

pub(super) use kube_fim_crds::{
    Attribute, AttributeProfile, DetectionSource, EntryDigest, FileIntegrityPolicySpec,
    MonitoredPath,
};

use kube_fim_crds::FileAttributes;

use super::{Approval, Approved, Engine, Outcome, PolicyInput};

pub(super) fn engine(root: &Path, state: &Path, paths: Vec<MonitoredPath>) -> Engine {
    let mut e = Engine::open(root, state, "n").unwrap();
    e.set_policies(BTreeMap::from([(
        "p".to_string(),
        PolicyInput {
            generation: Some(1),
            spec: FileIntegrityPolicySpec::with_paths(paths),
        },
    )]))
    .unwrap();
    e
}

/// A scan whose changes are taken as queued (protocol step 4).
pub(super) fn scan(e: &mut Engine, source: DetectionSource) -> Outcome {
    let o = e.scan(source);
    e.mark_reported(&o);
    o
}

pub(super) fn etc(recursive: bool) -> MonitoredPath {
    MonitoredPath {
        name: "etc".into(),
        path: "/etc".into(),
        recursive,
        ..MonitoredPath::default()
    }
}

pub(super) fn describe(o: &Outcome) -> Vec<String> {
    let mut v: Vec<String> = o
        .changes
        .iter()
        .map(|c| {
            format!(
                "{} {} {:?}",
                c.category.as_str(),
                c.path,
                c.changed_attributes
            )
        })
        .collect();
    v.sort();
    v
}

pub(super) fn usr_bin(attributes: Vec<Attribute>) -> MonitoredPath {
    MonitoredPath {
        name: "bin".into(),
        path: "/usr/bin".into(),
        attributes,
        ..MonitoredPath::default()
    }
}

pub(super) fn entry(name: &str, path: &str, recursive: bool) -> MonitoredPath {
    MonitoredPath {
        name: name.into(),
        path: path.into(),
        recursive,
        ..MonitoredPath::default()
    }
}

/// A state of an earlier version, written by `write_old` into the state
/// directory from an engine with one unapproved change (it returns the
/// digest that version published), is taken over with no report and no
/// alarm, and a later change is reported as usual.
fn upgraded_without_a_report(write_old: impl FnOnce(Engine, &Path) -> String) {
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc/ssh")).unwrap();
    std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
    std::fs::write(root.path().join("etc/ssh/sshd_config"), "b").unwrap();
    let mut old = engine(root.path(), state.path(), vec![etc(true)]);
    scan(&mut old, DetectionSource::Startup);
    // A change reported and not approved: it stays reported once.
    std::fs::write(root.path().join("etc/hosts"), "changed").unwrap();
    assert_eq!(scan(&mut old, DetectionSource::Scan).changes.len(), 1);
    old.save().unwrap();
    let digests = old.entry_digests();
    let epoch = old.baseline().epoch("/etc/hosts");
    let published = write_old(old, state.path());

    let mut new = engine(root.path(), state.path(), vec![etc(true)]);
    assert!(new.had_baseline());
    assert_eq!(new.loaded_digest(), Some(published.as_str()), "no alarm");
    assert_eq!(new.entry_digests(), digests);
    assert_eq!(new.baseline().epoch("/etc/hosts"), epoch);
    let o = scan(&mut new, DetectionSource::Startup);
    assert!(o.changes.is_empty(), "{:?}", describe(&o));
    let saved = new.save().unwrap();
    drop(new);

    std::fs::write(root.path().join("etc/ssh/sshd_config"), "evil").unwrap();
    let mut e = engine(root.path(), state.path(), vec![etc(true)]);
    assert_eq!(e.loaded_digest(), Some(saved.as_str()));
    let d = describe(&scan(&mut e, DetectionSource::Startup));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("Modified /etc/ssh/sshd_config"), "{d:?}");
    drop(e);
    assert!(!state.path().join(crate::baseline::LEGACY_FILE).exists());
}

/// The entry digests, by `policy/entry`.
pub(super) fn digests_of(e: &Engine) -> BTreeMap<String, EntryDigest> {
    e.entry_digests()
        .into_iter()
        .map(|d| (format!("{}/{}", d.policy, d.entry), d))
        .collect()
}

#[test]
fn one_policy_that_cannot_compile_never_blinds_the_others() {
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
    let mut e = Engine::open(root.path(), state.path(), "n").unwrap();
    let mut bad = etc(true);
    bad.exclude = vec!["*.{bak,swp".into()];
    let input = |p: MonitoredPath| PolicyInput {
        generation: Some(1),
        spec: FileIntegrityPolicySpec::with_paths(vec![p]),
    };
    let result = e.set_policies(BTreeMap::from([
        ("bad".to_string(), input(bad)),
        ("good".to_string(), input(etc(true))),
    ]));
    assert!(result.is_err());
    assert_eq!(e.failed().keys().collect::<Vec<_>>(), ["bad"]);
    assert_eq!(e.policies().keys().collect::<Vec<_>>(), ["good"]);
    scan(&mut e, DetectionSource::Startup);
    std::fs::write(root.path().join("etc/hosts"), "evil").unwrap();
    let d = describe(&scan(&mut e, DetectionSource::Scan));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("Modified /etc/hosts"), "{d:?}");
}

#[test]
fn the_baseline_survives_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
    std::fs::write(root.path().join("etc/passwd"), "p").unwrap();
    let mut e = engine(root.path(), state.path(), vec![etc(false)]);
    scan(&mut e, DetectionSource::Startup);
    e.save().unwrap();
    drop(e);
    std::fs::write(root.path().join("etc/hosts"), "changed").unwrap();
    let mut e = engine(root.path(), state.path(), vec![etc(false)]);
    assert!(e.had_baseline());
    let o = scan(&mut e, DetectionSource::Startup);
    assert_eq!(o.changes.len(), 1, "no false Added for untouched files");
    assert_eq!(o.changes[0].source, DetectionSource::Startup);
}

#[test]
fn a_baseline_of_an_earlier_version_is_migrated_without_a_report() {
    upgraded_without_a_report(|old, state| {
        // What an earlier version kept on disk instead, and published.
        let doc = old.baseline().to_legacy_document();
        drop(old);
        std::fs::remove_file(state.join(crate::baseline::FILE)).unwrap();
        std::fs::write(state.join(crate::baseline::LEGACY_FILE), &doc).unwrap();
        blake3::hash(&doc).to_hex().to_string()
    });
}

#[test]
fn a_store_of_version_2_is_upgraded_without_a_report() {
    upgraded_without_a_report(|old, state| {
        // What the version before kept on disk, and published.
        let v2 = state.join("v2.redb");
        let published = old.baseline().write_as_version_2(&v2);
        drop(old);
        std::fs::rename(&v2, state.join(crate::baseline::FILE)).unwrap();
        published
    });
}

/// The change of `path` in `o`, if any.
fn change_of<'a>(o: &'a Outcome, path: &str) -> &'a kube_fim_crds::FileChangeSpec {
    let c = o.changes.iter().find(|c| c.path == path);
    assert!(c.is_some(), "no change of {path}: {:?}", describe(o));
    c.unwrap()
}

fn blake3_hex(content: &str) -> String {
    blake3::hash(content.as_bytes()).to_hex().to_string()
}

/// A new file moved into a monitored directory while another process holds
/// a write lease on it (root cannot read it; mode 000 would not stop root):
/// its metadata is an Added change at once, its content marked unreadable
/// with the reason, and the scan does not wait for the lease. Once the lease
/// is gone, its content is read and reported.
#[test]
fn a_new_file_under_a_write_lease_is_added_unreadable_then_its_content_reported() {
    use kube_fim_testkit::lease::Lease;
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::create_dir_all(root.path().join("staging")).unwrap();
    std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
    let mut e = engine(root.path(), state.path(), vec![etc(true)]);
    scan(&mut e, DetectionSource::Startup);

    let staged = root.path().join("staging/evil");
    std::fs::write(&staged, "evil").unwrap();
    let lease = Lease::take(&staged);
    std::fs::rename(&staged, root.path().join("etc/evil")).unwrap();
    let started = std::time::Instant::now();
    let o = scan(&mut e, DetectionSource::Scan);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "a lease stalls the scan: {:?}",
        started.elapsed()
    );
    assert_eq!(describe(&o), ["Added /etc/evil []"]);
    let after = change_of(&o, "/etc/evil").after.clone().unwrap();
    assert_eq!(after.size, Some(4), "its metadata is read: {after:?}");
    assert!(after.mode.is_some() && after.inode.is_some(), "{after:?}");
    assert_eq!(after.hash, None, "no digest of content not read");
    let why = after.unreadable.unwrap_or_default();
    assert!(why.contains("EWOULDBLOCK"), "{why:?}");
    // Looked at again in real time while the lease is held: reported once.
    let paths = std::collections::BTreeSet::from([std::path::PathBuf::from("etc/evil")]);
    let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
    e.mark_reported(&o);
    assert_eq!(describe(&o), Vec::<String>::new());
    assert_eq!(e.unreadable(), [std::path::PathBuf::from("etc/evil")]);

    drop(lease);
    let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
    e.mark_reported(&o);
    assert_eq!(describe(&o), ["Added /etc/evil []"]);
    let after = change_of(&o, "/etc/evil").after.clone().unwrap();
    assert_eq!(after.hash, Some(blake3_hex("evil")));
    assert_eq!(after.unreadable, None);
    assert!(e.unreadable().is_empty());
}

/// A baseline file whose content cannot be read any more is a change (its
/// content is not known to be the baseline's); readable again and unchanged,
/// nothing more is reported.
#[test]
fn a_baseline_file_that_cannot_be_read_is_a_change() {
    use kube_fim_testkit::lease::Lease;
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/shadow"), "root:x").unwrap();
    let mut e = engine(root.path(), state.path(), vec![etc(true)]);
    scan(&mut e, DetectionSource::Startup);

    let lease = Lease::take(&root.path().join("etc/shadow"));
    let o = scan(&mut e, DetectionSource::Scan);
    assert_eq!(describe(&o), ["Modified /etc/shadow [Hash]"]);
    let c = change_of(&o, "/etc/shadow");
    assert_eq!(
        c.before.as_ref().and_then(|b| b.hash.clone()),
        Some(blake3_hex("root:x"))
    );
    let after = c.after.clone().unwrap();
    assert!(
        after.unreadable.is_some() && after.hash.is_none(),
        "{after:?}"
    );
    assert_eq!(o.errors.len(), 1, "still counted: {:?}", o.errors);
    drop(lease);
    let o = scan(&mut e, DetectionSource::Scan);
    assert_eq!(describe(&o), Vec::<String>::new(), "back to its baseline");
}

/// A first baseline that cannot read a file records it as unreadable, never
/// as a digest; its content, once read, is a change to review.
#[test]
fn a_baseline_taken_under_a_lease_records_the_file_unreadable() {
    use kube_fim_testkit::lease::Lease;
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/sudoers"), "evil ALL=(ALL) ALL").unwrap();
    let mut e = engine(root.path(), state.path(), vec![etc(true)]);
    let lease = Lease::take(&root.path().join("etc/sudoers"));
    assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
    let stored = e.baseline().approved("/etc/sudoers").unwrap();
    assert!(
        stored.unreadable.is_some() && stored.hash.is_none(),
        "{stored:?}"
    );
    e.save().unwrap();
    drop(e);
    // Kept across a restart (the store's record has it).
    let mut e = engine(root.path(), state.path(), vec![etc(true)]);
    assert_eq!(e.baseline().approved("/etc/sudoers"), Some(stored));
    drop(lease);
    let o = scan(&mut e, DetectionSource::Startup);
    assert_eq!(describe(&o), ["Modified /etc/sudoers [Hash]"]);
    let c = change_of(&o, "/etc/sudoers");
    assert!(c.before.as_ref().unwrap().unreadable.is_some());
    assert_eq!(
        c.after.as_ref().unwrap().hash,
        Some(blake3_hex("evil ALL=(ALL) ALL"))
    );
}

/// Approving a report of unreadable content approves no content: once the
/// file can be read, the approval is superseded and the content reported.
#[test]
fn an_approval_of_unreadable_content_never_approves_the_content() {
    use kube_fim_testkit::lease::Lease;
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let mut e = engine(root.path(), state.path(), vec![etc(true)]);
    scan(&mut e, DetectionSource::Startup);
    std::fs::write(root.path().join("etc/payload"), "evil").unwrap();
    let lease = Lease::take(&root.path().join("etc/payload"));
    let o = scan(&mut e, DetectionSource::Scan);
    let after = change_of(&o, "/etc/payload").after.clone().unwrap();
    assert!(after.unreadable.is_some(), "{after:?}");
    drop(lease);
    match approve(&mut e, "/etc/payload", Some(&after)) {
        super::Approved::Superseded(o) => {
            let now = change_of(&o, "/etc/payload").after.clone().unwrap();
            assert_eq!(now.hash, Some(blake3_hex("evil")));
        }
        other => unreachable!("approved content nobody saw: {other:?}"),
    }
    assert_eq!(e.baseline().approved("/etc/payload"), None);
}

/// Approves `after` as the state of `key` as a change of the first entry
/// that covers it would.
pub(super) fn approve(e: &mut Engine, key: &str, after: Option<&FileAttributes>) -> Approved {
    let plan = e.plan.clone();
    let owners = plan.owners(&crate::paths::rel_path(key));
    let (policy, entry) = owners
        .first()
        .map(|o| (o.owner.policy.clone(), o.owner.entry.clone()))
        .unwrap_or_default();
    e.approve(&Approval {
        policy: &policy,
        entry: &entry,
        key,
        after,
    })
}
