#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A host root with what real hosts contain (FIFOs, sockets, devices, symlinks
//! leading outside the root, symlink loops, non-UTF-8 names, a sparse file, a
//! deep tree, a directory with many entries, an unreadable file), baselined and
//! checked by the real binary; then every kind of mutation, with the exact
//! changes `check --output json` must list.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SECRET: &[u8] = b"root:$6$outside-the-root-secret-hash:19000:0:99999:7:::\n";
const SPARSE_LEN: u64 = 256 << 20;
const DEPTH: usize = 300;
const MANY: usize = 20_000;

/// What the agent should record of a file, from lstat(2) and its content.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    kind: &'static str,
    hash: Option<String>,
    size: u64,
    mode: String,
    uid: u32,
    gid: u32,
    mtime_us: i64,
    inode: u64,
    links: u64,
    link: Option<String>,
}

fn seen(p: &Path) -> Seen {
    let m = std::fs::symlink_metadata(p).unwrap();
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "charDevice"
    } else if ft.is_block_device() {
        "blockDevice"
    } else {
        "file"
    };
    Seen {
        kind,
        hash: (kind == "file").then(|| blake3_hex(&std::fs::read(p).unwrap())),
        size: m.size(),
        mode: format!("{:04o}", m.mode() & 0o7777),
        uid: m.uid(),
        gid: m.gid(),
        mtime_us: m.mtime() * 1_000_000 + m.mtime_nsec() / 1000,
        inode: m.ino(),
        links: m.nlink(),
        link: ft
            .is_symlink()
            .then(|| std::fs::read_link(p).unwrap().to_str().unwrap().to_string()),
    }
}

/// The attributes the default (`full`) profile reports as changed, in the
/// API's order.
fn expected_attrs(a: &Seen, b: &Seen) -> Vec<String> {
    let mut v = Vec::new();
    let mut push = |cond: bool, name: &str| {
        if cond {
            v.push(name.to_string());
        }
    };
    push(a.hash != b.hash, "hash");
    push(a.size != b.size, "size");
    push(a.kind != b.kind, "type");
    push(a.mode != b.mode, "mode");
    push(a.uid != b.uid, "uid");
    push(a.gid != b.gid, "gid");
    push(a.mtime_us != b.mtime_us, "mtime");
    push(a.inode != b.inode, "inode");
    push(a.links != b.links, "links");
    push(a.link != b.link, "linkTarget");
    v
}

/// The recorded values of a `before`/`after` object match what lstat saw.
fn assert_values(v: &Value, s: &Seen, what: &str) {
    assert_eq!(v["type"], s.kind, "{what} type: {v}");
    assert_eq!(v["mode"], s.mode.as_str(), "{what} mode: {v}");
    assert_eq!(v["uid"], s.uid, "{what} uid: {v}");
    assert_eq!(v["gid"], s.gid, "{what} gid: {v}");
    assert_eq!(v["inode"], s.inode, "{what} inode: {v}");
    match &s.hash {
        Some(h) => assert_eq!(v["hash"], h.as_str(), "{what} hash: {v}"),
        None => assert!(v.get("hash").is_none(), "{what}: no hash for {v}"),
    }
    if s.kind != "directory" {
        assert_eq!(v["size"], s.size, "{what} size: {v}");
        assert_eq!(v["links"], s.links, "{what} links: {v}");
    } else {
        assert!(v.get("links").is_none(), "{what}: {v}");
    }
    match &s.link {
        Some(t) => assert_eq!(v["linkTarget"], t.as_str(), "{what} linkTarget: {v}"),
        None => assert!(v.get("linkTarget").is_none(), "{what}: {v}"),
    }
}

fn mkfifo(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

/// A character device standing for `/dev/zero` (reading it never ends): if
/// the agent ever read a device, the scan would hang. `None` if this
/// environment may not create device nodes.
fn mk_zero_device(p: &Path) -> Option<()> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 5),
    )
    .ok()
}

struct Nasty {
    host: Host,
    /// Outside the root: a file whose hash must never appear.
    outside: tempfile::TempDir,
    deep_leaf: String,
    device: bool,
    _socket: std::os::unix::net::UnixListener,
}

fn nasty_host() -> Nasty {
    let outside = tempfile::tempdir().unwrap();
    let outside_dir = outside.path().canonicalize().unwrap();
    std::fs::write(outside_dir.join("shadow"), SECRET).unwrap();
    std::fs::write(outside_dir.join("secret"), SECRET).unwrap();

    let host = Host::with(
        &Policy::named("test")
            .path(Entry::new("etc", "/etc").recursive().exclude("*.tmp"))
            .path(Entry::new("many", "/data/many"))
            .path(Entry::new("deep", "/deep").recursive())
            .path(Entry::new("sparse", "/var/sparse.img"))
            .path(Entry::new("escape", "/escape/secret"))
            .path(Entry::new("loop", "/loop/a/x")),
    );
    let w = |p: &str, c: &[u8]| {
        let path = host.write(p, c);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        age(&path);
    };
    for (p, c) in [
        ("/etc/content", &b"v1\n"[..]),
        ("/etc/mode", b"mode\n"),
        ("/etc/owner", b"owner\n"),
        ("/etc/renamed", b"old content\n"),
        ("/etc/gone", b"to be deleted\n"),
        ("/etc/recreated", b"first life\n"),
        ("/etc/hardlinked", b"one name\n"),
        ("/etc/untouched", b"untouched\n"),
        ("/etc/locked", b"mode 000\n"),
        ("/etc/sub/dir/nested", b"nested\n"),
    ] {
        w(p, c);
    }
    std::fs::set_permissions(
        host.p("/etc/locked"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    // A name that is not UTF-8: /etc/caf\xe9.
    let raw = host.p("/etc").join(OsStr::from_bytes(b"caf\xe9"));
    std::fs::write(&raw, b"latin-1 name\n").unwrap();
    age(&raw);
    // Special files.
    mkfifo(&host.p("/etc/fifo"));
    let socket = std::os::unix::net::UnixListener::bind(host.p("/etc/socket")).unwrap();
    let device = mk_zero_device(&host.p("/etc/zero")).is_some();
    if !device {
        println!("SKIP device node: this environment may not create device nodes (mknod)");
    }
    // Symlinks: an absolute one leading outside the root, a relative one, a loop.
    symlink(outside_dir.join("shadow"), host.p("/etc/shadow-link")).unwrap();
    symlink("target-a", host.p("/etc/link")).unwrap();
    symlink("loop2", host.p("/etc/loop1")).unwrap();
    symlink("loop1", host.p("/etc/loop2")).unwrap();
    // An entry reached through an absolute directory symlink: resolved inside
    // the root, where a mirror of the outside path holds different content.
    symlink(&outside_dir, host.p("/escape")).unwrap();
    let mirror = format!("{}/secret", outside_dir.display());
    host.write(&mirror, b"inside the root\n");
    // An entry whose path goes through a symlink loop.
    std::fs::create_dir_all(host.p("/loop")).unwrap();
    symlink("b", host.p("/loop/a")).unwrap();
    symlink("a", host.p("/loop/b")).unwrap();
    // A sparse file.
    std::fs::create_dir_all(host.p("/var")).unwrap();
    let f = std::fs::File::create(host.p("/var/sparse.img")).unwrap();
    f.set_len(SPARSE_LEN).unwrap();
    drop(f);
    age(&host.p("/var/sparse.img"));
    // A deep tree.
    let mut deep = String::from("/deep");
    for _ in 0..DEPTH {
        deep.push_str("/d");
    }
    let deep_leaf = format!("{deep}/leaf");
    w(&deep_leaf, b"deep leaf\n");
    // A directory with many entries.
    std::fs::create_dir_all(host.p("/data/many")).unwrap();
    for i in 0..MANY {
        std::fs::write(host.p(&format!("/data/many/f{i:05}")), format!("{i}\n")).unwrap();
    }
    age(&host.p("/data/many/f12345"));
    Nasty {
        host,
        outside,
        deep_leaf,
        device,
        _socket: socket,
    }
}

#[test]
fn nasty_host_root_baseline_check_and_exact_changes() {
    let started = Instant::now();
    let n = nasty_host();
    let h = &n.host;
    let secret_hash = blake3_hex(SECRET);
    let t = Instant::now();
    let b = h.baseline();
    println!(
        "baseline of the nasty root: {:?}: {}",
        t.elapsed(),
        b.stdout.trim()
    );
    // Nothing stopped the scan; what could not be read is said, with a reason.
    assert!(
        b.stderr.contains("skipped /loop/a/x: symlink loop"),
        "the loop is reported: {}",
        b.stderr
    );
    let bytes: u64 = b
        .stdout
        .split(", ")
        .find_map(|s| s.strip_suffix(" bytes hashed"))
        .and_then(|s| s.parse().ok())
        .expect("bytes in the summary");
    assert!(
        bytes >= SPARSE_LEN,
        "the sparse file is hashed: {}",
        b.stdout
    );
    // The store keeps digests as their 32 bytes.
    let state = std::fs::read(h.state.join("baseline.redb")).unwrap();
    let secret_raw = blake3::hash(SECRET);
    assert!(
        !state
            .windows(32)
            .any(|w| w == secret_raw.as_bytes().as_slice()),
        "the hash of a file outside the root is in the baseline"
    );

    let c = h.check_json();
    assert_eq!(
        (c.code(), c.stdout.as_str()),
        (0, ""),
        "nothing changed: {c:?}"
    );

    // Mutations.
    let before = |p: &str| seen(&h.p(p));
    let tracked = [
        "/etc/content",
        "/etc/mode",
        "/etc/owner",
        "/etc/renamed",
        "/etc/recreated",
        "/etc/link",
        "/etc/hardlinked",
        "/data/many/f12345",
        "/var/sparse.img",
    ];
    let mut old: Vec<(String, Seen)> = tracked.iter().map(|p| (p.to_string(), before(p))).collect();
    old.push((n.deep_leaf.clone(), before(&n.deep_leaf)));
    let raw = h.p("/etc").join(OsStr::from_bytes(b"caf\xe9"));
    let raw_before = seen(&raw);
    // (host path, where it is in the root): /escape/secret is reached through
    // the absolute link /escape, resolved inside the root, so it is the mirror.
    let mirror = h.p(&format!(
        "{}/secret",
        n.outside.path().canonicalize().unwrap().display()
    ));
    let removed: Vec<(&str, PathBuf, Seen)> = [
        ("/etc/gone", h.p("/etc/gone")),
        ("/etc/fifo", h.p("/etc/fifo")),
        ("/etc/socket", h.p("/etc/socket")),
        ("/etc/shadow-link", h.p("/etc/shadow-link")),
        ("/escape/secret", mirror),
    ]
    .into_iter()
    .map(|(p, real)| {
        let s = seen(&real);
        (p, real, s)
    })
    .collect();

    std::fs::write(h.p("/etc/content"), b"version 2\n").unwrap();
    std::fs::set_permissions(h.p("/etc/mode"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(h.p("/etc/owner"), Some(4242), Some(4343)).unwrap();
    // An editor's save: a temporary file renamed over the target.
    let tmp = h.write("/etc/.renamed.swp", b"new content, longer\n");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, h.p("/etc/renamed")).unwrap();
    std::fs::remove_file(h.p("/etc/recreated")).unwrap();
    std::fs::write(h.p("/etc/recreated"), b"second life, other size\n").unwrap();
    std::fs::set_permissions(
        h.p("/etc/recreated"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::remove_file(h.p("/etc/link")).unwrap();
    symlink("target-b", h.p("/etc/link")).unwrap();
    // A second name where no entry looks.
    std::fs::hard_link(h.p("/etc/hardlinked"), h.p("/var/second-name")).unwrap();
    std::fs::write(raw.clone(), b"latin-1 name, edited\n").unwrap();
    std::fs::write(h.p(&n.deep_leaf), b"deep leaf, edited\n").unwrap();
    std::fs::write(h.p("/data/many/f12345"), b"edited\n").unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(h.p("/var/sparse.img"))
            .unwrap();
        f.seek(SeekFrom::Start(SPARSE_LEN / 2)).unwrap();
        f.write_all(b"x").unwrap();
    }
    for (_, real, _) in &removed {
        std::fs::remove_file(real).unwrap();
    }
    h.write("/etc/new", b"a new file\n");
    h.write("/etc/scratch.tmp", b"excluded by name\n");

    let c = h.check_json();
    assert_eq!(c.code(), 1, "changes → exit 1: {c:?}");
    let changes = c.changes();
    let mut expected: BTreeSet<(String, String)> = BTreeSet::new();
    for (p, _) in &old {
        expected.insert(("Modified".into(), p.clone()));
    }
    expected.insert(("Modified".into(), "/etc/caf\\xe9".into()));
    for (p, _, _) in &removed {
        expected.insert(("Removed".into(), p.to_string()));
    }
    expected.insert(("Added".into(), "/etc/new".into()));
    assert_eq!(summary(&changes), expected, "{changes:#?}");
    assert_eq!(
        changes.len(),
        expected.len(),
        "one change each: {changes:#?}"
    );

    for (p, was) in &old {
        let now = seen(&h.p(p));
        let ch = only(&changes, p);
        assert_eq!(attrs(ch), expected_attrs(was, &now), "{p}: {ch:#}");
        assert_values(&ch["before"], was, &format!("{p} before"));
        assert_values(&ch["after"], &now, &format!("{p} after"));
        assert_eq!(ch["source"], "Scan");
        assert_eq!(ch["policy"], "test");
    }
    // Hand-written expectations where they are certain, beside the computed ones.
    let a = |p: &str| attrs(only(&changes, p));
    assert_eq!(a("/etc/content"), ["hash", "size", "mtime"]);
    assert_eq!(a("/etc/mode"), ["mode"]);
    assert_eq!(a("/etc/owner"), ["uid", "gid"]);
    assert_eq!(a("/etc/renamed"), ["hash", "size", "mtime", "inode"]);
    assert!(a("/etc/link").contains(&"linkTarget".to_string()));
    assert_eq!(a("/var/sparse.img"), ["hash", "mtime"]);
    assert_eq!(a("/etc/hardlinked"), ["links"]);
    assert_eq!(only(&changes, "/etc/hardlinked")["after"]["links"], 2);
    assert_eq!(
        only(&changes, "/etc/link")["after"]["linkTarget"],
        "target-b"
    );
    assert_eq!(only(&changes, "/etc/mode")["after"]["mode"], "0600");
    assert_eq!(only(&changes, "/etc/owner")["after"]["uid"], 4242);
    let latin = only(&changes, "/etc/caf\\xe9");
    assert_eq!(attrs(latin), expected_attrs(&raw_before, &seen(&raw)));
    assert_eq!(
        only(&changes, "/etc/new")["after"]["hash"],
        blake3_hex(b"a new file\n").as_str()
    );
    assert!(only(&changes, "/etc/new").get("before").is_none());
    for (p, _, was) in &removed {
        let ch = only(&changes, p);
        assert!(ch.get("changedAttributes").is_none(), "{ch:#}");
        assert!(ch.get("after").is_none(), "{ch:#}");
        assert_values(&ch["before"], was, &format!("{p} before"));
    }
    // The link to a file outside the root is a symlink with its target; the
    // entry reached through an absolute directory link read the root's mirror.
    let shadow = only(&changes, "/etc/shadow-link");
    assert_eq!(shadow["before"]["type"], "symlink");
    assert_eq!(
        shadow["before"]["linkTarget"],
        format!(
            "{}/shadow",
            n.outside.path().canonicalize().unwrap().display()
        )
    );
    assert_eq!(
        only(&changes, "/escape/secret")["before"]["hash"],
        blake3_hex(b"inside the root\n").as_str()
    );
    assert!(
        !c.stdout.contains(&secret_hash),
        "the hash of a file outside the root was reported"
    );

    // A check does not approve: the same changes again.
    let again = h.check_json();
    assert_eq!(again.code(), 1);
    assert_eq!(summary(&again.changes()), expected);

    // Text output: one line per change, exit 1.
    let text = agent(&h.args("check"), Duration::from_secs(60));
    assert_eq!(text.code(), 1);
    assert_eq!(
        text.stdout.lines().count(),
        expected.len(),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("Modified") && l.contains("/etc/mode [mode]")),
        "{}",
        text.stdout
    );

    if n.device {
        // Never opened: still there, unchanged, not hashed.
        let state = String::from_utf8_lossy(&std::fs::read(h.state.join("baseline.redb")).unwrap())
            .into_owned();
        assert!(state.contains("/etc/zero"), "the device is recorded");
    }
    println!("whole test: {:?}", started.elapsed());
}

#[test]
fn permission_denied_is_skipped_with_a_reason() {
    let host = Host::with(&Policy::named("test").path(Entry::new("etc", "/etc").recursive()));
    host.write("/etc/readable", b"ok\n");
    let locked = host.write("/etc/locked", b"secret\n");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let euid = std::fs::metadata("/proc/self").unwrap().uid();

    // Root reads a mode-000 file anyway (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH).
    // Drop every capability for the agent with setpriv(1) when possible.
    let wrap: Vec<String> = if euid == 0 {
        let probe = Command::new("setpriv")
            .args(["--inh-caps=-all", "--bounding-set=-all", "cat"])
            .arg(&locked)
            .output();
        match probe {
            Ok(o)
                if !o.status.success()
                    && String::from_utf8_lossy(&o.stderr).contains("Permission denied") =>
            {
                vec![
                    "setpriv".into(),
                    "--inh-caps=-all".into(),
                    "--bounding-set=-all".into(),
                ]
            }
            Ok(o) => {
                println!(
                    "SKIP permission denied: running as root, and setpriv could not drop \
                     CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (status {}, {}), so a mode-000 \
                     file stays readable",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return;
            }
            Err(e) => {
                println!(
                    "SKIP permission denied: running as root (reads mode-000 files) and \
                     setpriv is not available to drop capabilities: {e}"
                );
                return;
            }
        }
    } else {
        Vec::new()
    };
    let run = |cmd: &str, json: bool| {
        let mut args = host.args(cmd);
        if json {
            args.extend(["--output", "json"]);
        }
        let mut c = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        c.args(&args);
        run_with_timeout(c, Duration::from_secs(30))
    };
    let b = run("baseline", false);
    assert_eq!(b.code(), 0, "{b:?}");
    assert!(
        b.stderr
            .contains("skipped /etc/locked: EACCES: permission denied"),
        "{b:?}"
    );
    assert!(b.stdout.contains("1 skipped"), "{b:?}");
    let c = run("check", true);
    assert_eq!((c.code(), c.stdout.as_str()), (0, ""), "{c:?}");
    assert!(
        c.stderr
            .contains("skipped /etc/locked: EACCES: permission denied")
    );
    std::fs::write(host.p("/etc/readable"), b"changed\n").unwrap();
    let c = run("check", true);
    assert_eq!(c.code(), 1, "{c:?}");
    assert_eq!(
        summary(&c.changes()),
        BTreeSet::from([("Modified".to_string(), "/etc/readable".to_string())]),
        "the unreadable file is neither Added nor Removed"
    );
}
