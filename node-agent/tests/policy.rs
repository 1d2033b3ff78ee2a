#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Policy entries resolve as `crds/src/policy.rs` documents them: exact files,
//! directories (direct entries, or everything below with `recursive`), a
//! wildcard last segment, excludes (with a '/': the absolute host path; without:
//! the file name, and everything below what it removes), `enabled: false`, and
//! the `recommended` preset (entries in `paths` override the preset's by name).
//!
//! What is monitored is observed through the binary only: baseline, remove the
//! whole tree, and `check` lists a Removed change for each monitored file.

mod common;

use std::collections::BTreeSet;

use common::*;
use kube_fim_crds::Preset;

/// The host paths the policy monitors, among `files` written into a fresh root.
fn monitored(policy: &Policy, files: &[&str]) -> BTreeSet<String> {
    let h = Host::with(policy);
    for f in files {
        h.write(f, f.as_bytes());
    }
    h.baseline();
    let c = h.check_json();
    assert_eq!((c.code(), c.stdout.as_str()), (0, ""), "{c:?}");
    for entry in std::fs::read_dir(&h.root).unwrap() {
        std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
    }
    let c = h.check_json();
    let changes = c.changes();
    assert!(
        changes.iter().all(|c| c["category"] == "Removed"),
        "{changes:#?}"
    );
    // Directories are reported too; this helper lists the files.
    let changes: Vec<_> = changes
        .into_iter()
        .filter(|c| c["before"]["type"] != "directory")
        .collect();
    let paths: BTreeSet<String> = summary(&changes).into_iter().map(|(_, p)| p).collect();
    // One change per (path, entry): a path two entries cover is reported under each.
    let per_entry: BTreeSet<(String, String)> = changes
        .iter()
        .map(|c| (c["path"].to_string(), c["entry"].to_string()))
        .collect();
    assert_eq!(
        per_entry.len(),
        changes.len(),
        "one change per path and entry"
    );
    assert_eq!(c.code(), if paths.is_empty() { 0 } else { 1 });
    paths
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn wildcards_excludes_recursion_and_disabled_entries() {
    let policy = Policy::named("test")
        .path(Entry::new("etc-conf", "/etc/*.conf").exclude("resolv.conf"))
        .path(
            Entry::new("app", "/var/lib/app")
                .recursive()
                .exclude("*.swp")
                .exclude("logs")
                .exclude("/var/lib/app/cache/**")
                .exclude("/var/lib/app/sub/skip.txt"),
        )
        .path(Entry::new("data", "/opt/data"))
        .path(Entry::new("cron", "/etc/cron.[dw]*").recursive())
        .path(Entry::new("off", "/srv/off").recursive().disabled())
        .path(Entry::new("exact", "/etc/hosts"));
    let files = [
        "/etc/a.conf",
        "/etc/b.conf",
        "/etc/resolv.conf",
        "/etc/hosts",
        "/etc/hostname",
        "/etc/dir.conf/inner",
        "/etc/cron.daily/job",
        "/etc/cron.weekly/sub/job",
        "/etc/cron.hourly/job",
        "/var/lib/app/x",
        "/var/lib/app/sub/y",
        "/var/lib/app/sub/skip.txt",
        "/var/lib/app/sub/deeper/keep.txt",
        "/var/lib/app/.x.swp",
        "/var/lib/app/sub/z.swp",
        "/var/lib/app/cache/k",
        "/var/lib/app/cache/deep/k",
        "/var/lib/app/logs/a.log",
        "/var/lib/app/sub/logs/b.log",
        "/var/lib/other/x",
        "/opt/data/f",
        "/opt/data/sub/g",
        "/srv/off/file",
    ];
    assert_eq!(
        monitored(&policy, &files),
        set(&[
            "/etc/a.conf",
            "/etc/b.conf",
            "/etc/hosts",
            "/etc/cron.daily/job",
            "/etc/cron.weekly/sub/job",
            "/var/lib/app/x",
            "/var/lib/app/sub/y",
            "/var/lib/app/sub/deeper/keep.txt",
            "/opt/data/f",
        ])
    );
}

const PRESET_FILES: &[&str] = &[
    "/bin/login",
    "/bin/passwd",
    "/bin/ls",
    "/bin/sub/nested",
    "/sbin/init",
    "/usr/bin/env",
    "/usr/bin/sub/nested",
    "/usr/sbin/sshd",
    "/usr/local/bin/tool",
    "/usr/local/sbin/tool",
    "/usr/lib/libc.so",
    "/opt/bin/tool",
    "/opt/sbin/tool",
    "/opt/other/tool",
    "/boot/vmlinuz",
    "/boot/grub/grub.cfg",
    "/etc/ld.so.conf",
    "/etc/sub/x.conf",
    "/etc/passwd",
    "/etc/crontab",
    "/etc/init.d/ssh",
    "/etc/cron.hourly/a",
    "/etc/cron.daily/b",
    "/etc/cron.weekly/c",
    "/etc/cron.monthly/d",
    "/etc/cron.d/e",
    "/var/log/syslog",
];

#[test]
fn the_recommended_preset() {
    let policy = Policy::named("rec").preset(Preset::Recommended);
    // /bin/login is both the `bin-login` entry and a direct entry of `bin`: one
    // change for the policy, under its most specific entry.
    let h = Host::with(&policy);
    h.write("/bin/login", "l");
    h.baseline();
    std::fs::write(h.p("/bin/login"), "changed").unwrap();
    let c = h.check_json();
    let entries: BTreeSet<String> = c
        .changes()
        .iter()
        .map(|c| c["entry"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(entries, set(&["bin-login"]), "{}", c.stdout);
    assert_eq!(c.changes().len(), 1, "{}", c.stdout);
    assert_eq!(
        monitored(&policy, PRESET_FILES),
        set(&[
            "/bin/login",
            "/bin/passwd",
            "/bin/ls",
            "/sbin/init",
            "/usr/bin/env",
            "/usr/sbin/sshd",
            "/usr/local/bin/tool",
            "/usr/local/sbin/tool",
            "/opt/bin/tool",
            "/opt/sbin/tool",
            "/boot/vmlinuz",
            "/boot/grub/grub.cfg",
            "/etc/ld.so.conf",
            "/etc/crontab",
            "/etc/init.d/ssh",
            "/etc/cron.hourly/a",
            "/etc/cron.daily/b",
            "/etc/cron.weekly/c",
            "/etc/cron.monthly/d",
        ])
    );
}

#[test]
fn paths_override_preset_entries_by_name() {
    let policy = Policy::named("test")
        .preset(Preset::Recommended)
        .path(Entry::new("boot", "/boot").disabled())
        .path(Entry::new("usr-bin", "/usr/bin").recursive())
        .path(Entry::new("logs", "/var/log"));
    let got = monitored(&policy, PRESET_FILES);
    assert!(!got.iter().any(|p| p.starts_with("/boot/")), "{got:?}");
    assert!(got.contains("/usr/bin/sub/nested"), "{got:?}");
    assert!(got.contains("/var/log/syslog"), "{got:?}");
    assert!(got.contains("/etc/crontab"), "{got:?}");
}
