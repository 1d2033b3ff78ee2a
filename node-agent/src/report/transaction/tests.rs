use super::*;
use crate::fixtures;
use crate::report::object;
use kube_fim_crds::{AttributionLimit, PackageManager};

fn attrs(hash: u8, mode: &str) -> FileAttributes {
    FileAttributes {
        file_type: Some(FileType::File),
        hash: Some(format!("{hash:02x}").repeat(32)),
        size: Some(u64::from(hash)),
        mode: Some(mode.into()),
        ..FileAttributes::default()
    }
}

/// A package upgrade's change of `path`: new content, the package's.
fn upgraded(path: &str, package: &str) -> FileChangeSpec {
    let mut c = fixtures::change(path);
    c.entry = "bin".into();
    c.changed_attributes = vec![Attribute::Hash, Attribute::Size, Attribute::Mtime];
    c.before = Some(attrs(1, "0755"));
    c.after = Some(attrs(2, "0755"));
    c.package = Some(PackageCheck {
        manager: PackageManager::Dpkg,
        name: package.into(),
        version: "3.0.15-1".into(),
        version_before: Some("3.0.13-1".into()),
        verdict: PackageVerdict::Verified,
        transaction: None,
    });
    c
}

#[test]
fn an_upgrades_verified_content_is_grouped() {
    assert!(groupable(&upgraded("/usr/bin/openssl", "openssl")));
    let mut added = upgraded("/usr/lib/libssl.so.3", "openssl");
    added.category = ChangeCategory::Added;
    added.before = None;
    added.changed_attributes.clear();
    assert!(groupable(&added));
    let mut by_dpkg = upgraded("/usr/bin/openssl", "openssl");
    by_dpkg.process = Some(ProcessInfo {
        command: Some("dpkg".into()),
        pid: 42,
        ..ProcessInfo::default()
    });
    assert!(groupable(&by_dpkg), "written by dpkg");
    // A writer that exited before it was named: nobody can say who.
    by_dpkg.process = Some(ProcessInfo {
        pid: 43,
        limits: vec![AttributionLimit::WriterExited],
        ..ProcessInfo::default()
    });
    assert!(groupable(&by_dpkg));
}

#[test]
fn a_trojan_slipped_into_an_upgrade_stays_a_loud_change_of_its_own() {
    let mut trojan = upgraded("/usr/bin/sudo", "sudo");
    if let Some(p) = trojan.package.as_mut() {
        p.verdict = PackageVerdict::Mismatch;
    }
    assert!(!groupable(&trojan), "a Mismatch is never grouped");
    let mut unowned = upgraded("/usr/bin/mine", "x");
    unowned.package = None;
    assert!(!groupable(&unowned), "a file no package owns");
    let mut gone = upgraded("/usr/bin/old", "x");
    gone.category = ChangeCategory::Removed;
    gone.after = None;
    assert!(!groupable(&gone), "a removal");
}

#[test]
fn a_packaged_file_changed_by_another_process_during_an_upgrade_is_not_grouped() {
    let mut c = upgraded("/usr/bin/openssl", "openssl");
    c.process = Some(ProcessInfo {
        command: Some("cp".into()),
        pid: 77,
        ..ProcessInfo::default()
    });
    assert!(!groupable(&c), "written by cp, not a package manager");
}

#[test]
fn a_setuid_bit_or_a_chmod_of_a_packaged_file_is_not_hidden_in_an_upgrade() {
    let mut setuid = upgraded("/usr/bin/openssl", "openssl");
    setuid.after = Some(attrs(2, "4755"));
    setuid.changed_attributes.push(Attribute::Mode);
    assert!(!groupable(&setuid), "gains setuid with the new content");
    let mut setgid = upgraded("/usr/bin/openssl", "openssl");
    setgid.after = Some(attrs(2, "2755"));
    assert!(!groupable(&setgid), "gains setgid");
    // Kept setuid (sudo's own bit through its upgrade): grouped.
    let mut kept = upgraded("/usr/bin/sudo", "sudo");
    kept.before = Some(attrs(1, "4755"));
    kept.after = Some(attrs(2, "4755"));
    assert!(groupable(&kept));
    // Content unchanged, the package's: a chmod, not an upgrade.
    let mut chmod = upgraded("/usr/bin/openssl", "openssl");
    chmod.changed_attributes = vec![Attribute::Mode, Attribute::Ctime];
    chmod.before = Some(attrs(2, "0755"));
    chmod.after = Some(attrs(2, "0777"));
    assert!(!groupable(&chmod), "metadata only");
    let mut restored = upgraded("/usr/bin/openssl", "openssl");
    restored.restored = Some(true);
    assert!(!groupable(&restored), "a write undone within the window");
}

#[test]
fn a_large_upgrade_is_a_few_bounded_objects_listing_every_change() {
    let t = Timestamp::now();
    let changes: Vec<FileChangeSpec> = (0..1_200)
        .map(|i| upgraded(&format!("/usr/lib/f{i:04}"), "openssl"))
        .collect();
    let objects = group(changes, t);
    assert_eq!(objects.len(), 3);
    let mut listed = BTreeSet::new();
    for o in &objects {
        let items = items(o).unwrap();
        assert!(items.len() <= TRANSACTION_ITEMS_MAX);
        assert_eq!(o.path, items[0].path);
        let p = o.package.as_ref().unwrap();
        assert_eq!(p.verdict, PackageVerdict::Verified);
        let t = p.transaction.as_ref().unwrap();
        assert_eq!(t.files, items.len() as u64);
        assert_eq!(
            t.summary,
            format!("openssl 3.0.13-1→3.0.15-1, {} files", items.len())
        );
        // Far under the API server's 1.5 MB per object.
        let bytes = serde_json::to_vec(&object::to_object(o.clone(), 0))
            .unwrap()
            .len();
        assert!(bytes < 1_000_000, "{bytes}");
        for i in items {
            assert!(listed.insert(i.path.clone()), "{} twice", i.path);
            assert_eq!(i.before, Some(attrs(1, "0755")));
            assert_eq!(i.after, Some(attrs(2, "0755")));
        }
    }
    assert_eq!(listed.len(), 1_200, "every change listed once");
}

#[test]
fn entries_and_packages_of_one_upgrade() {
    let t = Timestamp::now();
    let mut other_entry = upgraded("/etc/ssl/x", "openssl");
    other_entry.entry = "etc".into();
    let objects = group(
        vec![
            upgraded("/usr/bin/a", "openssl"),
            upgraded("/usr/bin/b", "openssl"),
            upgraded("/usr/bin/c", "libssl3"),
            other_entry,
        ],
        t,
    );
    assert_eq!(objects.len(), 2, "one per entry");
    let bin = objects.iter().find(|o| o.entry == "bin").unwrap();
    let p = bin.package.as_ref().unwrap();
    assert_eq!(p.name, "openssl", "the package most files are of");
    assert_eq!(
        p.transaction.as_ref().unwrap().summary,
        "openssl 3.0.13-1→3.0.15-1 and 1 more package, 3 files"
    );
}

#[test]
fn a_transactions_name_is_its_changes_not_when_it_closed() {
    let t = Timestamp::now();
    let later = t + std::time::Duration::from_secs(60);
    let changes = || vec![upgraded("/usr/bin/a", "x"), upgraded("/usr/bin/b", "x")];
    let mut a = group(changes(), t).remove(0);
    let mut b = group(changes(), later).remove(0);
    a.sequence = Some(7);
    b.sequence = Some(7);
    assert_eq!(object::object_name(&a, 0), object::object_name(&b, 0));
    let mut other = changes();
    other[1].after = Some(attrs(3, "0755"));
    let mut c = group(other, t).remove(0);
    c.sequence = Some(7);
    assert_ne!(object::object_name(&a, 0), object::object_name(&c, 0));
}

#[test]
fn the_window_closes_after_a_quiet_moment_or_its_longest_delay() {
    let start = Instant::now();
    let mut held = Held::default();
    assert_eq!(held.due(), None);
    held.hold(
        Detected {
            spec: upgraded("/usr/bin/a", "x"),
            epoch: 0,
        },
        start,
    );
    assert_eq!(held.due(), Some(start + QUIET));
    // dpkg writes on: each write pushes the close, never past the longest delay.
    for s in 1..=70 {
        held.hold(
            Detected {
                spec: upgraded(&format!("/usr/bin/f{s}"), "x"),
                epoch: 0,
            },
            start + Duration::from_secs(s),
        );
    }
    assert_eq!(held.due(), Some(start + MAX_DELAY));
    assert_eq!(held.paths().len(), 71);
    // A newer state of a path replaces the older one.
    held.hold(
        Detected {
            spec: upgraded("/usr/bin/a", "x"),
            epoch: 0,
        },
        start,
    );
    assert_eq!(held.len(), 71);
    assert_eq!(held.take().len(), 71);
    assert!(held.is_empty());
    assert_eq!(held.due(), None);
}

#[test]
fn a_held_state_and_a_later_one_of_the_same_path_are_both_listed() {
    let held = vec![Detected {
        spec: upgraded("/usr/bin/a", "x"),
        epoch: 0,
    }];
    let same = upgraded("/usr/bin/a", "x");
    assert_eq!(merge(held, vec![same]).len(), 1);
    let held = vec![Detected {
        spec: upgraded("/usr/bin/a", "x"),
        epoch: 0,
    }];
    let mut again = upgraded("/usr/bin/a", "x");
    again.after = Some(attrs(9, "0755"));
    assert_eq!(merge(held, vec![again]).len(), 2);
}
