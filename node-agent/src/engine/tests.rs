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
