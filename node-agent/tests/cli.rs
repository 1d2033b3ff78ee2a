#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The command line: help, exit statuses, and clear errors for bad flags, bad
//! policy files and a missing or damaged baseline.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn etc_policy() -> Policy {
    Policy::named("test").path(Entry::new("etc", "/etc"))
}

#[test]
fn help_explains_each_command() {
    for cmd in [
        vec!["--help"],
        vec!["baseline", "--help"],
        vec!["check", "--help"],
        vec!["watch", "--help"],
        vec!["run", "--help"],
    ] {
        let r = agent(&cmd, T);
        assert_eq!(r.code(), 0, "{cmd:?}: {r:?}");
        assert!(r.stdout.contains("Usage:"), "{cmd:?}: {}", r.stdout);
    }
    let r = agent(&["check", "--help"], T);
    for flag in ["--policy", "--root", "--state", "--output"] {
        assert!(r.stdout.contains(flag), "check --help names {flag}");
    }
    assert!(
        agent(&["watch", "--help"], T)
            .stdout
            .contains("--metrics-addr")
    );
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let h = Host::with(&etc_policy());
    h.write("/etc/hosts", "h");
    let mut a = h.args("check");
    a.push("--bogus");
    let r = agent(&a, T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--bogus"), "{}", r.stderr);

    let mut a = h.args("check");
    a.extend(["--output", "xml"]);
    let r = agent(&a, T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(
        r.stderr.contains("xml") && r.stderr.contains("--output"),
        "{}",
        r.stderr
    );

    let r = agent(&["check", "--root", "/", "--state", "/tmp"], T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(
        r.stderr.contains("--policy"),
        "missing flag named: {}",
        r.stderr
    );

    let r = agent(&["frobnicate"], T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("frobnicate"), "{}", r.stderr);

    let mut a = h.args("watch");
    a.extend(["--metrics-addr", "not-an-address"]);
    let r = agent(&a, T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--metrics-addr"), "{}", r.stderr);

    // A root that is not a directory.
    let mut a = h.args("baseline");
    let missing = h.dir.path().join("no-such-root");
    let missing = missing.to_str().unwrap();
    a[4] = missing;
    let r = agent(&a, T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--root"), "{}", r.stderr);
}

#[test]
fn bad_policy_files_exit_2_naming_the_field() {
    let p = || Policy::named("test");
    let cases = [
        (
            p().path(Entry::new("etc", "etc/passwd")),
            "spec.paths[0].path",
        ),
        (
            p().path(Entry::new("ok", "/etc/hosts"))
                .path(Entry::new("mid", "/etc/*/passwd")),
            "spec.paths[1].path",
        ),
        (
            p().path(Entry::new("dots", "/etc/../shadow")),
            "spec.paths[0].path",
        ),
        (
            p().path(Entry::new("everything", "/").recursive()),
            "spec.paths[0].path",
        ),
        (
            p().path(Entry::new("Bad_Name", "/etc")),
            "spec.paths[0].name",
        ),
    ];
    for (policy, field) in cases {
        let h = Host::with(&policy);
        let paths = policy.build().spec.paths;
        for cmd in ["baseline", "check", "watch"] {
            let r = agent(&h.args(cmd), T);
            assert_eq!(r.code(), 2, "{cmd} with {paths:?}: {r:?}");
            assert!(
                r.stderr.contains(field),
                "{cmd}: the error names {field}: {}",
                r.stderr
            );
            assert!(
                r.stderr.contains(h.policy.to_str().unwrap()),
                "{cmd}: the error names the file: {}",
                r.stderr
            );
        }
    }

    // Not a policy at all, an unknown field, unreadable YAML, no file.
    let h = Host::new("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n");
    let r = agent(&h.args("check"), T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("ConfigMap"), "{}", r.stderr);

    // A field the API types lack cannot be built typed: it is added to the
    // policy as written.
    let mut doc: serde_json::Value = serde_saphyr::from_str(&etc_policy().yaml()).unwrap();
    doc["spec"]["scanIntervall"] = "1h".into();
    let h = Host::new(&serde_saphyr::to_string(&doc).unwrap());
    let r = agent(&h.args("baseline"), T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("scanIntervall"), "{}", r.stderr);

    let h = Host::new("spec: [unclosed\n");
    let r = agent(&h.args("baseline"), T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("policy"), "{}", r.stderr);

    let h = Host::with(&etc_policy());
    std::fs::remove_file(&h.policy).unwrap();
    let r = agent(&h.args("check"), T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(
        r.stderr.contains("reading policy file"),
        "names the missing file: {}",
        r.stderr
    );
}

#[test]
fn check_without_or_with_a_damaged_baseline_exits_2() {
    let h = Host::with(&etc_policy());
    h.write("/etc/hosts", "h");
    let r = h.check_json();
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("no baseline"), "{}", r.stderr);
    assert!(r.stdout.is_empty());

    h.baseline();
    assert_eq!(h.check_json().code(), 0);
    let file = h.state.join("baseline.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&file, bytes).unwrap();
    let r = h.check_json();
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("corrupt"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    // A new baseline repairs it.
    h.baseline();
    assert_eq!(h.check_json().code(), 0);
}

#[test]
fn an_empty_policy_list_is_refused() {
    let h = Host::with(&Policy::named("t"));
    let r = agent(&h.args("baseline"), T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("spec"), "{}", r.stderr);
}

/// The names of the agent's threads seen while it runs `args`, sampled from
/// `/proc/PID/task` until it exits; and its exit status.
fn threads_while(args: &[&str]) -> (std::collections::BTreeSet<String>, i32) {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tasks = format!("/proc/{}/task", child.id());
    let mut names = std::collections::BTreeSet::new();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (names, status.code().unwrap_or(-1));
        }
        for t in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            if let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) {
                names.insert(comm.trim().to_string());
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn threads_is_the_whole_budget_of_a_scan() {
    // Enough files for the baseline being built to be written in several
    // batches while the scan goes on.
    let h = Host::with(&Policy::named("test").path(Entry::new("data", "/data").recursive()));
    for d in 0..30 {
        for f in 0..500 {
            h.write(&format!("/data/d{d:02}/f{f:03}"), format!("{d} {f}"));
        }
    }
    for threads in ["1", "2"] {
        let _ = std::fs::remove_dir_all(&h.state);
        let mut args = vec!["--threads", threads];
        args.extend(h.args("baseline"));
        let (names, code) = threads_while(&args);
        assert_eq!(code, 0, "--threads {threads}: {names:?}");
        let scan: Vec<&String> = names.iter().filter(|n| n.starts_with("scan-")).collect();
        assert_eq!(
            scan.len(),
            threads.parse::<usize>().unwrap(),
            "--threads {threads}: {names:?}"
        );
        // No thread beside the scan's: no store writer of its own.
        assert!(
            !names.iter().any(|n| n.starts_with("baseline-write")),
            "--threads {threads}: {names:?}"
        );
    }
}
