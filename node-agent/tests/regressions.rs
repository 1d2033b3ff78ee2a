#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Regressions: check lists what watch already reported, a re-baseline killed
//! midway keeps the old baseline, files without xattrs carry no xattrs digest.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// `check` must list every difference from the approved baseline, including
/// those `watch` already reported (reported ≠ approved).
#[test]
fn check_lists_differences_already_reported_by_watch() {
    let h = Host::with(
        &Policy::named("test")
            .debounce("300ms")
            .path(Entry::new("etc", "/etc")),
    );
    h.write("/etc/hosts", "a\n");
    h.write("/etc/passwd", "p\n");
    h.baseline();
    std::fs::write(h.p("/etc/hosts"), "tampered\n").unwrap();
    let c = h.check_json();
    assert_eq!(c.code(), 1, "before watch: {c:?}");
    let w = h.watch();
    let got = w.collect(Duration::from_millis(700));
    assert_eq!(got.len(), 1, "{got:#?}");
    w.kill();
    let c = h.check_json();
    assert_eq!(
        c.code(),
        1,
        "after watch reported it, check says clean: {c:?}"
    );
    assert_eq!(
        summary(&c.changes()),
        BTreeSet::from([("Modified".to_string(), "/etc/hosts".to_string())])
    );
}

/// A kill -9 during a re-baseline must leave the old or the new baseline
/// (issue 3: "a kill -9 at any moment leaves either the old or the new
/// baseline"), never none.
#[test]
fn kill_9_during_a_rebaseline_keeps_the_old_baseline() {
    let h = Host::with(&Policy::named("test").path(Entry::new("data", "/data").recursive()));
    for d in 0..20 {
        for f in 0..500 {
            h.write(&format!("/data/d{d}/f{f}"), format!("{d}/{f}"));
        }
    }
    let t = std::time::Instant::now();
    h.baseline();
    let full = t.elapsed();
    assert_eq!(h.check_json().code(), 0);
    let mut child = std::process::Command::new(BIN)
        .args(h.args("baseline"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(full / 2);
    let _ = child.kill();
    child.wait().unwrap();
    let c = h.check_json();
    assert_eq!(c.code(), 0, "the old baseline is gone: {c:?}");
}

/// FileAttributes.xattrs is documented "absent when the file has none"
/// (crds/src/change.rs); the agent records the BLAKE3 of empty input instead.
#[test]
fn xattrs_are_absent_for_a_file_without_any() {
    let h = Host::with(&Policy::named("test").path(Entry::new("etc", "/etc")));
    h.write("/etc/hosts", "a\n");
    h.baseline();
    h.write("/etc/new", "n\n");
    let c = h.check_json();
    let ch = only(&c.changes(), "/etc/new").clone();
    assert!(ch["after"].get("xattrs").is_none(), "{ch:#}");
}
