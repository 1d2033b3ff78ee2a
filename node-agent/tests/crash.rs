#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Crash safety: `kill -9` of `baseline` at random moments on a big tree never
//! leaves a corrupt baseline; the next `check` works and the next `baseline`
//! completes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const DIRS: usize = 50;
const PER_DIR: usize = 500;

fn big_host() -> Host {
    let h = Host::with(&Policy::named("test").path(Entry::new("data", "/data").recursive()));
    for d in 0..DIRS {
        let dir = h.p(&format!("/data/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..PER_DIR {
            std::fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}\n")).unwrap();
        }
    }
    h
}

/// Starts `baseline` and SIGKILLs it after `after`; true if it had finished.
fn kill_baseline_after(h: &Host, after: Duration) -> bool {
    let mut child = Command::new(BIN)
        .args(h.args("baseline"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    child.wait().unwrap();
    finished
}

/// After a crash: either no baseline (a clear exit 2) or a valid one (the tree
/// is unchanged, so exit 0 and nothing printed). Never a corrupt one.
fn assert_clean_after_crash(h: &Host, what: &str) -> bool {
    let c = h.check_json();
    assert!(
        !c.stderr.contains("corrupt"),
        "{what}: a kill -9 left a corrupt baseline: {c:?}"
    );
    match c.code() {
        0 => {
            assert_eq!(c.stdout, "", "{what}: {c:?}");
            true
        }
        2 => {
            assert!(
                c.stderr.contains("no baseline") && c.stderr.contains("kube-fim-agent baseline"),
                "{what}: {c:?}"
            );
            false
        }
        _ => panic!("{what}: {c:?}"),
    }
}

#[test]
fn kill_9_during_baseline_never_leaves_a_corrupt_one() {
    let h = big_host();
    // How long a whole baseline takes here, to aim the kills inside it.
    let t = Instant::now();
    let b = h.baseline();
    let full = t.elapsed();
    println!("full baseline: {full:?}: {}", b.stdout.trim());
    assert!(
        b.stdout
            .contains(&format!("{} files", DIRS * PER_DIR + DIRS + 1))
    );
    assert_eq!(h.check_json().code(), 0);

    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut valid, mut none) = (0, 0);
    for round in 0..4 {
        // Rounds 0-1 start from no baseline, 2-3 replace an existing one.
        if round < 2 {
            let _ = std::fs::remove_dir_all(&h.state);
        } else {
            h.baseline();
        }
        // Mostly inside the run, sometimes right at its end (the save).
        let frac = if round % 2 == 1 {
            0.85 + rng.f64() * 0.3
        } else {
            0.05 + rng.f64() * 0.8
        };
        let after = full.mul_f64(frac);
        let finished = kill_baseline_after(&h, after);
        let what = format!("round {round}, kill after {after:?} (finished: {finished})");
        if assert_clean_after_crash(&h, &what) {
            valid += 1;
        } else {
            none += 1;
        }
    }
    println!("after the kills: {valid} valid baselines, {none} without one");
    // The next baseline completes and is consistent.
    h.baseline();
    let c = h.check_json();
    assert_eq!((c.code(), c.stdout.as_str()), (0, ""), "{c:?}");
    std::fs::write(h.p("/data/d042/f042"), "changed\n").unwrap();
    let c = h.check_json();
    assert_eq!(c.code(), 1);
    assert_eq!(c.changes().len(), 1, "{c:?}");
}
