#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `watch` as a process: real-time detection, an editor's save coalesced into
//! one Modified, restart semantics (changes made while stopped are found at
//! start as `Startup`, untouched files raise nothing), metrics, and a clean
//! stop on SIGTERM.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

/// Debounce of the test policies: short, so the suite stays fast.
const DEBOUNCE_MS: u64 = 300;

fn host() -> Host {
    let h = Host::with(
        &Policy::named("test")
            .debounce(&format!("{DEBOUNCE_MS}ms"))
            .path(Entry::new("etc", "/etc").recursive())
            .path(Entry::new("conf", "/opt/*.conf")),
    );
    for (p, c) in [
        ("/etc/hosts", "127.0.0.1 localhost\n"),
        ("/etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ("/etc/ssh/sshd_config", "PermitRootLogin no\n"),
        ("/opt/app.conf", "a=1\n"),
        ("/opt/other.txt", "not monitored\n"),
    ] {
        h.write(p, c);
    }
    for i in 0..50 {
        h.write(&format!("/etc/many/f{i}"), format!("{i}"));
    }
    h
}

#[test]
fn realtime_changes_and_an_editor_save_is_one_modified() {
    let h = host();
    h.baseline();
    let w = h.watch();
    assert!(
        w.collect(Duration::from_millis(500)).is_empty(),
        "nothing changed since the baseline"
    );

    // A plain write: one Realtime Modified, within ~2 s.
    let t = Instant::now();
    std::fs::write(h.p("/etc/hosts"), "10.0.0.1 evil\n").unwrap();
    let (at, c) = w.next(Duration::from_secs(5)).expect("a change line");
    let latency = at - t;
    println!("write → line: {latency:?}");
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    assert_eq!(c["category"], "Modified");
    assert_eq!(c["path"], "/etc/hosts");
    assert_eq!(c["source"], "Realtime");
    assert_eq!(c["entry"], "etc");
    assert_eq!(attrs(&c), ["hash", "size", "mtime"]);

    // An editor's save: write a temporary file, rename it over the target.
    let tmp = h.write("/etc/ssh/.sshd_config.swp", "PermitRootLogin yes\n");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, h.p("/etc/ssh/sshd_config")).unwrap();
    let (_, c) = w.next(Duration::from_secs(5)).expect("a change line");
    let rest = w.collect(Duration::from_millis(3 * DEBOUNCE_MS + 700));
    assert!(rest.is_empty(), "one change only, got also {rest:#?}");
    assert_eq!(c["category"], "Modified", "{c:#}");
    assert_eq!(c["path"], "/etc/ssh/sshd_config");
    assert!(attrs(&c).contains(&"inode".to_string()), "{c:#}");

    // A new file, a removed file, a file matched by a wildcard, and one that
    // is not monitored.
    h.write("/etc/new", "n");
    std::fs::remove_file(h.p("/etc/passwd")).unwrap();
    std::fs::write(h.p("/opt/app.conf"), "a=2\n").unwrap();
    std::fs::write(h.p("/opt/other.txt"), "still not monitored\n").unwrap();
    let got = w.collect(Duration::from_millis(3 * DEBOUNCE_MS + 1500));
    assert_eq!(
        summary(&got),
        BTreeSet::from([
            ("Added".to_string(), "/etc/new".to_string()),
            ("Removed".to_string(), "/etc/passwd".to_string()),
            ("Modified".to_string(), "/opt/app.conf".to_string()),
        ]),
        "{got:#?}"
    );
    assert_eq!(got.len(), 3, "{got:#?}");
    assert!(got.iter().all(|c| c["source"] == "Realtime"), "{got:#?}");

    // A file in a directory created after the start is watched too, and the
    // new directories are reported as entries of their own.
    std::fs::create_dir_all(h.p("/etc/newdir/sub")).unwrap();
    h.write("/etc/newdir/sub/f", "1");
    let got = w.collect(Duration::from_millis(3 * DEBOUNCE_MS + 1000));
    assert_eq!(
        summary(&got),
        BTreeSet::from([
            ("Added".to_string(), "/etc/newdir".to_string()),
            ("Added".to_string(), "/etc/newdir/sub".to_string()),
            ("Added".to_string(), "/etc/newdir/sub/f".to_string()),
        ]),
        "{got:#?}"
    );
    assert_eq!(got.len(), 3, "{got:#?}");
    std::fs::write(h.p("/etc/newdir/sub/f"), "2").unwrap();
    let (_, c) = w
        .next(Duration::from_secs(5))
        .expect("a change in the new directory");
    assert_eq!(c["path"], "/etc/newdir/sub/f");
    assert_eq!(c["category"], "Added", "still not approved: {c:#}");

    let status = w.terminate(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM stops watch cleanly: {status}");
}

#[test]
fn a_relative_or_linked_root_sees_realtime_changes_too() {
    let h = host();
    h.baseline();
    let link = h.dir.path().join("link-to-root");
    std::os::unix::fs::symlink(&h.root, &link).unwrap();
    let parent = h.root.parent().unwrap().to_path_buf();
    for (i, (cwd, root)) in [
        (parent.clone(), "root".to_string()),
        (parent.clone(), "./root/".to_string()),
        (
            std::path::PathBuf::from("/"),
            link.to_str().unwrap().to_string(),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let w = h.watch_from(&cwd, &root);
        std::fs::write(h.p("/etc/hosts"), format!("10.0.0.{i} evil\n")).unwrap();
        let (_, c) = w
            .next(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no real-time change with --root {root} in {cwd:?}"));
        assert_eq!(c["path"], "/etc/hosts", "--root {root}: {c:#}");
        assert_eq!(c["source"], "Realtime", "--root {root}: {c:#}");
        w.terminate(Duration::from_secs(10));
    }
}

#[test]
fn restart_finds_what_changed_while_stopped_and_nothing_else() {
    let h = host();
    h.baseline();
    let w = h.watch();
    assert!(w.collect(Duration::from_millis(300)).is_empty());
    w.kill(); // as a crash: SIGKILL

    std::fs::write(h.p("/etc/hosts"), "changed while stopped\n").unwrap();
    h.write("/etc/added-while-stopped", "x");
    std::fs::remove_file(h.p("/etc/many/f7")).unwrap();

    let w = h.watch();
    // Ready means the startup scan is done and its changes were printed.
    let got = w.collect(Duration::from_millis(700));
    assert_eq!(
        summary(&got),
        BTreeSet::from([
            ("Modified".to_string(), "/etc/hosts".to_string()),
            ("Added".to_string(), "/etc/added-while-stopped".to_string()),
            ("Removed".to_string(), "/etc/many/f7".to_string()),
        ]),
        "no false Added for untouched files: {got:#?}"
    );
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|c| c["source"] == "Startup"), "{got:#?}");
    drop(w);

    // Reported once: a second start does not repeat them (they wait for an
    // acknowledgement).
    let w = h.watch();
    let again = w.collect(Duration::from_millis(700));
    assert!(again.is_empty(), "reported again at restart: {again:#?}");
}

#[test]
fn watch_without_a_baseline_builds_one_silently() {
    let h = host();
    let w = h.watch();
    assert!(
        w.collect(Duration::from_millis(500)).is_empty(),
        "the first start is the baseline"
    );
    std::fs::write(h.p("/etc/hosts"), "x").unwrap();
    let (_, c) = w.next(Duration::from_secs(5)).expect("a change line");
    assert_eq!(c["source"], "Realtime");
    assert_eq!(c["path"], "/etc/hosts");
    w.kill();
    assert!(h.state.join("baseline.redb").exists());
}

#[test]
fn metrics_are_served() {
    let h = host();
    h.baseline();
    let w = h.watch();
    let m = w.metrics();
    // etc: /etc itself, 3 files, the ssh and many directories, 50 files;
    // conf: /opt/app.conf (not /opt/other.txt).
    let files = metric_where(&m, "kube_fim_agent_files_monitored", &[("policy", "test")]);
    assert_eq!(files, Some(57.0), "{m}");
    let content: u64 = walk_sizes(&h);
    let hashed = metric_where(&m, "kube_fim_agent_bytes_hashed_total", &[]).unwrap();
    assert_eq!(hashed as u64, content, "bytes hashed at startup: {m}");
    assert!(m.contains("node=\"local\""), "{m}");
    assert!(!m.contains("/etc/hosts"), "never a label per path");

    std::fs::write(h.p("/etc/hosts"), "changed\n").unwrap();
    w.next(Duration::from_secs(5)).expect("a change line");
    let m = wait_for("the change counted", Duration::from_secs(5), || {
        let m = w.metrics();
        metric_where(
            &m,
            "kube_fim_agent_changes_total",
            &[("category", "Modified"), ("policy", "test")],
        )
        .filter(|v| *v == 1.0)
        .map(|_| m)
    });
    assert!(
        metric_where(&m, "kube_fim_agent_bytes_hashed_total", &[]).unwrap() as u64 > content,
        "{m}"
    );
    assert!(
        http_get(w.port, "/healthz").is_some(),
        "/healthz answers 200"
    );
}

/// Bytes of the monitored regular files of [`host`].
fn walk_sizes(h: &Host) -> u64 {
    let mut total = 0;
    let mut stack = vec![h.p("/etc")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata().unwrap().len();
            }
        }
    }
    total + std::fs::metadata(h.p("/opt/app.conf")).unwrap().len()
}

/// Root appends a line to a monitored file and puts the file back (content
/// and mtime) before the debounce ends: the rescan alone finds the baseline,
/// yet the write happened. One Modified, marked restored, with the state the
/// file was in at the close after the write.
#[test]
fn a_write_undone_within_the_debounce_window_is_reported_restored() {
    let h = Host::with(
        &Policy::named("test")
            .debounce("2s")
            .path(Entry::new("etc", "/etc").recursive()),
    );
    let original = b"root ALL=(ALL:ALL) ALL\n".to_vec();
    let sudoers = h.write("/etc/sudoers", &original);
    age(&sudoers);
    let mtime = std::fs::metadata(&sudoers).unwrap().modified().unwrap();
    h.baseline();
    let w = h.watch();

    let mut evil = original.clone();
    evil.extend_from_slice(b"mallory ALL=(ALL) NOPASSWD: ALL\n");
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&sudoers)
            .unwrap();
        f.write_all(b"mallory ALL=(ALL) NOPASSWD: ALL\n").unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    // Put back: the content by a write, then the mtime.
    std::fs::write(&sudoers, &original).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&sudoers)
        .unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);

    let got = w.collect(Duration::from_secs(5));
    assert_eq!(got.len(), 1, "one change: {got:#?}");
    let c = &got[0];
    assert_eq!(c["path"], "/etc/sudoers", "{c:#}");
    assert_eq!(c["category"], "Modified", "{c:#}");
    assert_eq!(c["source"], "Realtime", "{c:#}");
    assert_eq!(c["restored"], true, "{c:#}");
    assert_eq!(c["after"]["hash"], blake3_hex(&evil), "the transient state");
    assert_eq!(c["before"]["hash"], blake3_hex(&original), "{c:#}");
    assert!(attrs(c).contains(&"hash".to_string()), "{c:#}");
    assert!(c["sequence"].is_u64(), "numbered in the chain: {c:#}");

    // The file is in its baseline: nothing more, and an ordinary write after
    // the window is an ordinary change.
    assert!(w.collect(Duration::from_secs(3)).is_empty());
    std::fs::write(&sudoers, &evil).unwrap();
    let (_, c) = w.next(Duration::from_secs(6)).expect("a change line");
    assert_eq!(c["after"]["hash"], blake3_hex(&evil), "{c:#}");
    assert!(c.get("restored").is_none(), "{c:#}");
}
