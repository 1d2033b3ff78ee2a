#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Process attribution on the real kernel with real processes: `watch` with a
//! policy that sets `processAttribution`, files changed by child processes of
//! known command name, another uid, and a process in its own pid namespace
//! inside a cgroup named as the kubelet names a container's; delete and rename;
//! a fanotify queue overflow; and the inotify fallback without CAP_SYS_ADMIN.
//!
//! Needs root (fanotify marks, cgroups, setpriv), as the agent does.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The overflow test lowers the machine's fanotify queue size for the groups
/// made meanwhile: the tests of this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

const POD_UID: &str = "3f6c2a9e-7b1d-4e8a-9c2f-0a1b2c3d4e5f";
const CONTAINER: &str = "5d1e0c9b8a7f6e5d4c3b2a1908f7e6d5c4b3a2918f7e6d5c4b3a29180f7e6d5c";

fn host(process_attribution: bool) -> Host {
    let h = Host::with(
        &Policy::named("test")
            .debounce("300ms")
            .process_attribution(process_attribution)
            .path(Entry::new("etc", "/etc").recursive()),
    );
    h.write("/etc/hosts", "127.0.0.1 localhost\n");
    h.write(
        "/etc/passwd",
        "root:x:0:0::/root:/bin/sh\ntester:x:1000:1000::/:/bin/sh\n",
    );
    h.write("/etc/shared.conf", "a=1\n");
    h.write("/etc/gone.conf", "x\n");
    h.write("/etc/old.conf", "y\n");
    // Another uid must reach and write /etc/shared.conf.
    for p in [h.dir.path(), &h.root, &h.p("/etc")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::set_permissions(
        h.p("/etc/shared.conf"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    h
}

/// A command named `fim-writer` (a symlink: the kernel takes `comm` from the
/// name executed) that runs Python code and then stays alive a moment, so its
/// /proc entries are there when the agent reads the event.
fn writer(dir: &Path) -> PathBuf {
    let link = dir.join("fim-writer");
    if !link.exists() {
        std::os::unix::fs::symlink("/usr/bin/python3", &link).unwrap();
    }
    link
}

fn py(code: &str) -> String {
    format!("import os, time\n{code}\ntime.sleep(1.5)\n")
}

fn python_exe() -> String {
    std::fs::canonicalize("/usr/bin/python3")
        .unwrap()
        .display()
        .to_string()
}

fn process(c: &Value) -> &Value {
    assert!(c["process"].is_object(), "attributed: {c:#}");
    &c["process"]
}

fn wait_change<'a>(w: &Watch, seen: &'a mut Vec<Value>, path: &str, category: &str) -> &'a Value {
    let found = |s: &Vec<Value>| {
        s.iter()
            .position(|c| c["path"] == path && c["category"] == category)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while found(seen).is_none() && std::time::Instant::now() < deadline {
        if let Some((_, c)) = w.next(Duration::from_millis(200)) {
            seen.push(c);
        }
    }
    let i = found(seen).unwrap_or_else(|| panic!("{category} {path} in {seen:#?}"));
    &seen[i]
}

#[test]
fn names_the_command_the_uid_and_who_deleted_and_renamed() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(true);
    h.baseline();
    let w = h.watch();
    let m = w.metrics();
    assert_eq!(
        metric_where(&m, "kube_fim_agent_attribution_active", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_where(&m, "kube_fim_agent_watched_directories", &[]),
        Some(0.0),
        "fanotify, no inotify watch: {m}"
    );
    let fim_writer = writer(h.dir.path());
    let mut seen = Vec::new();

    // A child of known command name, as root.
    let hosts = h.p("/etc/hosts");
    let mut child = Command::new(&fim_writer)
        .arg("-c")
        .arg(py(&format!(
            "open({:?}, 'a').write('10.0.0.1 evil\\n')",
            hosts.display().to_string()
        )))
        .spawn()
        .unwrap();
    let c = wait_change(&w, &mut seen, "/etc/hosts", "Modified").clone();
    let p = process(&c);
    assert_eq!(p["command"], "fim-writer");
    assert_eq!(p["pid"], child.id());
    assert_eq!(p["ppid"], std::process::id());
    assert_eq!(p["uid"], 0);
    assert_eq!(p["user"], "root");
    assert_eq!(p["exe"], python_exe());
    assert_eq!(p["by"], format!("fim-writer (pid {}, uid 0)", child.id()));
    assert!(p.get("limits").is_none(), "{p:#}");
    child.wait().unwrap();

    // Another uid, through setpriv (which execs: same pid).
    let shared = h.p("/etc/shared.conf");
    let mut child = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "--"])
        .arg(&fim_writer)
        .arg("-c")
        .arg(py(&format!(
            "open({:?}, 'a').write('b=2\\n')",
            shared.display().to_string()
        )))
        .spawn()
        .unwrap();
    let c = wait_change(&w, &mut seen, "/etc/shared.conf", "Modified").clone();
    let p = process(&c);
    assert_eq!(p["command"], "fim-writer");
    assert_eq!(p["pid"], child.id());
    assert_eq!(p["uid"], 1000);
    assert_eq!(p["user"], "tester", "the node's /etc/passwd names the uid");
    assert_eq!(c["after"]["uid"], 0, "the file's owner is not the writer");
    child.wait().unwrap();

    // Delete and rename.
    let (gone, old, new) = (
        h.p("/etc/gone.conf"),
        h.p("/etc/old.conf"),
        h.p("/etc/new.conf"),
    );
    let mut child = Command::new(&fim_writer)
        .arg("-c")
        .arg(py(&format!(
            "os.unlink({:?}); os.rename({:?}, {:?})",
            gone.display().to_string(),
            old.display().to_string(),
            new.display().to_string()
        )))
        .spawn()
        .unwrap();
    let pid = child.id();
    for (path, category) in [
        ("/etc/gone.conf", "Removed"),
        ("/etc/old.conf", "Removed"),
        ("/etc/new.conf", "Added"),
    ] {
        let c = wait_change(&w, &mut seen, path, category).clone();
        let p = process(&c);
        assert_eq!(p["command"], "fim-writer", "{path}");
        assert_eq!(p["pid"], pid, "{path}");
    }
    child.wait().unwrap();
    let m = w.metrics();
    assert_eq!(
        metric_where(
            &m,
            "kube_fim_agent_attributed_changes_total",
            &[("command", "fim-writer")]
        ),
        Some(5.0),
        "{m}"
    );
    w.kill();
}

/// A cgroup as the kubelet makes it for a container: the cgroupfs layout on a
/// v1 hierarchy (`pids`), the systemd layout on the unified one.
struct PodCgroup {
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn create() -> PodCgroup {
        let fs = Command::new("stat")
            .args(["-fc", "%T", "/sys/fs/cgroup"])
            .output()
            .unwrap();
        let v2 = String::from_utf8_lossy(&fs.stdout).trim() == "cgroup2fs";
        let rel: Vec<String> = if v2 {
            let uid = POD_UID.replace('-', "_");
            vec![
                "kubepods.slice".into(),
                "kubepods-besteffort.slice".into(),
                format!("kubepods-besteffort-pod{uid}.slice"),
                format!("cri-containerd-{CONTAINER}.scope"),
            ]
        } else {
            vec![
                "pids/kubepods".into(),
                "besteffort".into(),
                format!("pod{POD_UID}"),
                CONTAINER.into(),
            ]
        };
        let mut dirs = Vec::new();
        let mut p = PathBuf::from("/sys/fs/cgroup");
        for r in rel {
            p = p.join(r);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap();
                dirs.push(p.clone());
            }
        }
        PodCgroup { dirs }
    }

    fn procs(&self) -> PathBuf {
        self.dirs.last().unwrap().join("cgroup.procs")
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
fn a_process_in_a_pod_cgroup_and_its_own_pid_namespace_is_named_by_pod_and_container() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(true);
    h.baseline();
    let w = h.watch();
    let cg = PodCgroup::create();
    let fim_writer = writer(h.dir.path());
    let hosts = h.p("/etc/hosts");
    // Join the cgroup, then a new pid namespace in which the writer is pid 1.
    let script = format!(
        "echo $$ > {} && exec unshare --pid --fork {} -c \"$0\"",
        cg.procs().display(),
        fim_writer.display()
    );
    let code = py(&format!(
        "assert os.getpid() == 1\nopen({:?}, 'a').write('from a pod\\n')",
        hosts.display().to_string()
    ));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg(&code)
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let c = wait_change(&w, &mut seen, "/etc/hosts", "Modified").clone();
    assert!(
        child.wait().unwrap().success(),
        "the writer ran as pid 1 of its namespace"
    );
    let p = process(&c);
    assert_eq!(p["command"], "fim-writer");
    let pid = p["pid"].as_i64().unwrap();
    assert!(
        pid > 1,
        "the node's pid, not the one inside the namespace: {p:#}"
    );
    assert_eq!(p["containerId"], format!("containerd://{CONTAINER}"));
    assert_eq!(p["pod"]["uid"], POD_UID);
    assert!(p["cgroup"].as_str().unwrap().contains(CONTAINER), "{p:#}");
    // Standalone the agent knows no pods: it says so rather than guessing.
    assert_eq!(p["limits"], serde_json::json!(["PodUnknown"]));
    assert_eq!(
        p["by"],
        format!("pod uid {POD_UID} (container {})", &CONTAINER[..12])
    );
    w.kill();
}

#[test]
fn a_queue_overflow_triggers_a_full_rescan() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(true);
    h.baseline();
    // A tiny kernel queue for the group the agent makes at start.
    const KNOB: &str = "/proc/sys/fs/fanotify/max_queued_events";
    let saved = std::fs::read_to_string(KNOB).unwrap();
    std::fs::write(KNOB, "16").unwrap();
    let w = std::panic::catch_unwind(|| h.watch());
    std::fs::write(KNOB, saved.trim()).unwrap();
    let w = w.unwrap();
    // The agent is descheduled (stopped) while the files are written, so
    // its reader cannot drain the queue as fast as they come: it overflows
    // whatever the machine's speed.
    let signal = |sig: &str| {
        let pid = w.child.id().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    // Written into a followed directory: the kernel queues only the events
    // of followed directories.
    signal("-STOP");
    for i in 0..500 {
        std::fs::write(h.p(&format!("/etc/many-{i}")), "x").unwrap();
    }
    signal("-CONT");
    let overflowed = wait_for("an overflow", Duration::from_secs(10), || {
        let m = w.metrics();
        metric_where(&m, "kube_fim_agent_fanotify_overflows_total", &[]).filter(|v| *v >= 1.0)
    });
    assert!(overflowed >= 1.0);
    // Nothing lost: the rescan reports every file.
    let mut added = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while added.len() < 500 && std::time::Instant::now() < deadline {
        if let Some((_, c)) = w.next(Duration::from_millis(500))
            && c["category"] == "Added"
        {
            added.insert(c["path"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        added.len(),
        500,
        "every new file reported after the overflow"
    );
    w.kill();
}

#[test]
fn without_cap_sys_admin_the_agent_falls_back_to_inotify_and_says_why() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(true);
    h.baseline();
    let mut w = h.watch_via(&[
        "setpriv",
        "--inh-caps=-sys_admin",
        "--bounding-set=-sys_admin",
        "--",
    ]);
    let m = w.metrics();
    assert_eq!(
        metric_where(&m, "kube_fim_agent_attribution_active", &[]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric_where(
            &m,
            "kube_fim_agent_attribution_unavailable",
            &[("reason", "NoCapSysAdmin")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric_where(&m, "kube_fim_agent_watched_directories", &[]).unwrap() >= 1.0,
        "inotify watches: {m}"
    );
    std::fs::write(h.p("/etc/hosts"), "changed\n").unwrap();
    let mut seen = Vec::new();
    let c = wait_change(&w, &mut seen, "/etc/hosts", "Modified").clone();
    assert_eq!(c["source"], "Realtime");
    assert!(
        c.get("process").is_none(),
        "no attribution without fanotify: {c:#}"
    );
    let pid = w.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = w.child.wait();
    let err = w.take_stderr();
    assert!(err.contains("process attribution off"), "{err}");
}

#[test]
fn no_attribution_asked_no_fanotify() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(false);
    h.baseline();
    let w = h.watch();
    let m = w.metrics();
    assert_eq!(
        metric_where(&m, "kube_fim_agent_attribution_active", &[]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric_where(&m, "kube_fim_agent_fanotify_directories", &[]),
        Some(0.0),
        "{m}"
    );
    assert!(
        !m.contains("kube_fim_agent_attribution_unavailable{"),
        "not asked, not missing: {m}"
    );
    std::fs::write(h.p("/etc/hosts"), "changed\n").unwrap();
    let mut seen = Vec::new();
    let c = wait_change(&w, &mut seen, "/etc/hosts", "Modified").clone();
    assert!(c.get("process").is_none(), "{c:#}");
    w.kill();
}

/// The marks the agent's fanotify group holds, as the kernel lists them in
/// the agent's `/proc/PID/fdinfo`: (inode marks, file system or mount marks).
fn fanotify_marks(pid: u32) -> (usize, usize) {
    let (mut inode, mut whole) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(fd.unwrap().path()) else {
            continue;
        };
        for line in info.lines().filter(|l| l.starts_with("fanotify ")) {
            if line.contains(" ino:") {
                inode += 1;
            } else if line.contains("mflags:") {
                whole += 1;
            }
        }
    }
    (inode, whole)
}

#[test]
fn only_monitored_directories_are_marked_and_new_ones_are_followed() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(true);
    std::fs::create_dir(h.p("/etc/ssh")).unwrap();
    h.write("/etc/ssh/sshd_config", "PermitRootLogin no\n");
    // Unmonitored directories on the same file system.
    std::fs::create_dir_all(h.p("/var/log")).unwrap();
    h.baseline();
    let w = h.watch();
    let followed = |m: &str| metric_where(m, "kube_fim_agent_fanotify_directories", &[]);
    let before = followed(&w.metrics()).unwrap();
    assert!(before >= 2.0, "/etc and /etc/ssh followed");
    // The kernel reports only what is monitored: no mark on the whole file
    // system (which would send every write of it to the agent), one inode
    // mark per followed directory.
    let (inode, whole) = fanotify_marks(w.child.id());
    assert_eq!(whole, 0, "no file system or mount mark");
    assert_eq!(
        inode as f64, before,
        "one inode mark per followed directory"
    );

    // A directory made while the agent runs is followed too, and the writer
    // of a file in it is named.
    std::fs::create_dir(h.p("/etc/cron.d")).unwrap();
    wait_for(
        "the new directory followed",
        Duration::from_secs(10),
        || followed(&w.metrics()).filter(|n| *n > before),
    );
    assert_eq!(fanotify_marks(w.child.id()), (before as usize + 1, 0));
    let fim_writer = writer(h.dir.path());
    let job = h.p("/etc/cron.d/job");
    let mut child = Command::new(&fim_writer)
        .arg("-c")
        .arg(py(&format!(
            "open({:?}, 'w').write('* * * * * root sh\\n')",
            job.display().to_string()
        )))
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let c = wait_change(&w, &mut seen, "/etc/cron.d/job", "Added").clone();
    assert_eq!(process(&c)["command"], "fim-writer", "{c:#}");
    child.wait().unwrap();

    // Writes beside the monitored tree reach nobody.
    for i in 0..200 {
        std::fs::write(h.p(&format!("/var/log/l{i}")), "x").unwrap();
    }
    let quiet = w.collect(Duration::from_millis(800));
    assert!(
        quiet
            .iter()
            .all(|c| !c["path"].as_str().unwrap_or("").starts_with("/var")),
        "{quiet:#?}"
    );
    w.kill();
}

#[test]
fn writes_nobody_monitors_never_reach_the_agent() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(true);
    // Container logs and image layers on the same file system as /etc.
    std::fs::create_dir_all(h.p("/var/log/pods")).unwrap();
    h.baseline();
    let w = h.watch();
    let m = w.metrics();
    let marks = |kind: &str| metric_where(&m, "kube_fim_agent_fanotify_marks", &[("kind", kind)]);
    assert!(marks("inode").unwrap() >= 1.0, "{m}");
    assert_eq!(marks("filesystem"), Some(0.0), "{m}");
    let events = |m: &str| metric_where(m, "kube_fim_agent_attribution_events_total", &[]).unwrap();
    // The kernel delivers the events of monitored directories: counted.
    let before = events(&m);
    std::fs::write(h.p("/etc/hosts"), "10.0.0.1 db\n").unwrap();
    let mut seen = Vec::new();
    wait_change(&w, &mut seen, "/etc/hosts", "Modified");
    let after_monitored = events(&w.metrics());
    assert!(after_monitored > before, "a monitored write is an event");

    // 1,000 writes beside the monitored tree: the kernel keeps them from the
    // agent (a file system mark would deliver each, to be dropped here).
    for i in 0..1000 {
        std::fs::write(h.p(&format!("/var/log/pods/l{}", i % 100)), "x").unwrap();
    }
    let quiet = w.collect(Duration::from_millis(800));
    let delivered = events(&w.metrics()) - after_monitored;
    assert!(
        delivered <= 5.0,
        "{delivered} fanotify events reached the agent for 1,000 unrelated writes"
    );
    assert!(quiet.is_empty(), "{quiet:#?}");
    w.kill();
}

#[test]
fn a_directory_moved_into_the_tree_is_followed_and_its_writers_named() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = host(true);
    // Prepared outside the monitored tree, then moved in whole: its
    // directories were never created inside the tree.
    std::fs::create_dir_all(h.p("/var/stage/sudoers.d/inner")).unwrap();
    h.write("/var/stage/sudoers.d/inner/old", "x\n");
    h.baseline();
    let w = h.watch();
    let followed = |m: &str| metric_where(m, "kube_fim_agent_fanotify_directories", &[]);
    let before = followed(&w.metrics()).unwrap();
    std::fs::rename(h.p("/var/stage/sudoers.d"), h.p("/etc/sudoers.d")).unwrap();
    let mut seen = Vec::new();
    wait_change(&w, &mut seen, "/etc/sudoers.d/inner/old", "Added");
    wait_for(
        "the moved directories followed",
        Duration::from_secs(10),
        || followed(&w.metrics()).filter(|n| *n >= before + 2.0),
    );
    // A write in the moved tree's deepest directory names its writer.
    let fim_writer = writer(h.dir.path());
    let evil = h.p("/etc/sudoers.d/inner/evil");
    let mut child = Command::new(&fim_writer)
        .arg("-c")
        .arg(py(&format!(
            "open({:?}, 'w').write('ALL ALL=(ALL) NOPASSWD: ALL\\n')",
            evil.display().to_string()
        )))
        .spawn()
        .unwrap();
    let c = wait_change(&w, &mut seen, "/etc/sudoers.d/inner/evil", "Added").clone();
    assert_eq!(process(&c)["command"], "fim-writer", "{c:#}");
    child.wait().unwrap();
    w.kill();
}
