//! A container's writable layer, read as the drift from its image.
//!
//! The root of a container is an overlay mount: its lower directories are the
//! image's layers, its upper directory holds exactly what the container wrote.
//! So the upper directory IS the drift: a regular file (or symlink, device...)
//! there is Added when no lower layer has the path and Modified when one has;
//! a whiteout (a character device 0/0) is a Removed image file. An opaque
//! directory (`trusted.overlay.opaque`) hides the lower directory's content:
//! its files are read like any others, but what it hides is not listed
//! (reading `trusted.*` attributes needs `CAP_SYS_ADMIN`).
//!
//! Where the layers are comes from the container's own mount table
//! (`/proc/<pid>/mountinfo`: the overlay mounted at `/`), so no runtime's
//! internals are assumed; its other mount points (volumes, `emptyDir`s,
//! `/etc/hosts`, the service account token) are not image content and are
//! left out with everything under them. Every path is read through the host
//! root ([`HostRoot`]): a symlink the container wrote is recorded as a symlink,
//! never followed.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kube_fim_crds::{Attribute, ChangeCategory, FileAttributes, FileType};

use crate::hostfs::{HostRoot, Layer};
use crate::paths::escape;

/// The layers of a container's root file system, as root-relative paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layers {
    /// The writable layer.
    pub upper: PathBuf,
    /// The image's layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// Mount points inside the container other than `/` (not image content).
    pub mounts: Vec<PathBuf>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unoctal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        match field.get(i + 1..i + 4) {
            Some(d) if field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// A host path as seen from the host root: `host_root` is where the agent's
/// root is on the host (`/` in a DaemonSet mounting the host's `/`). `None`
/// when the path is outside it (the agent cannot see it).
fn in_root(host_path: &[u8], host_root: &Path) -> Option<PathBuf> {
    let path = Path::new(OsStr::from_bytes(host_path));
    if !path.is_absolute() {
        return None;
    }
    let rel = path.strip_prefix(host_root).ok()?;
    // Overlay options name canonical paths; anything else is not trusted.
    rel.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
        .then(|| rel.to_path_buf())
}

/// The overlay at `/` of a container's `mountinfo`, and its other mount
/// points. `None` when its root is not an overlay whose layers the host root
/// holds.
pub fn layers_of(mountinfo: &[u8], host_root: &Path) -> Option<Layers> {
    let mut root: Option<(PathBuf, Vec<PathBuf>)> = None;
    let mut mounts = Vec::new();
    for line in mountinfo.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if dash < 6 || fields.len() < dash + 4 {
            continue;
        }
        let point = unoctal(fields[4]);
        if point != b"/" {
            let rel = Path::new(OsStr::from_bytes(&point))
                .strip_prefix("/")
                .map(Path::to_path_buf)
                .ok();
            mounts.extend(rel);
            continue;
        }
        if fields[dash + 1] != b"overlay" {
            // A later mount at `/` replaces the overlay: nothing known.
            root = None;
            continue;
        }
        let mut upper = None;
        let mut lowers = Vec::new();
        // Commas inside paths are escaped by the kernel (`\,`) only in newer
        // kernels; runtimes never put them there.
        for option in fields[dash + 3].split(|b| *b == b',') {
            let option = unoctal(option);
            if let Some(p) = option.strip_prefix(b"upperdir=") {
                upper = in_root(p, host_root);
            } else if let Some(p) = option.strip_prefix(b"lowerdir=") {
                // `::` separates data-only layers (overlay 6.7+): never looked up.
                let p = p.split(|b| *b == b':').collect::<Vec<_>>();
                lowers = p
                    .iter()
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| in_root(l, host_root))
                    .collect();
            }
        }
        root = upper.map(|u| (u, lowers));
    }
    root.map(|(upper, lowers)| Layers {
        upper,
        lowers,
        mounts,
    })
}

/// One file of the drift.
#[derive(Clone, Debug, PartialEq)]
pub struct Drifted {
    /// Added, Modified or Removed.
    pub category: ChangeCategory,
    /// The image's file (Modified, Removed), when a lower layer has it.
    pub before: Option<FileAttributes>,
    /// The container's file (Added, Modified).
    pub after: Option<FileAttributes>,
}

impl Drifted {
    /// What makes this state the same or another: reported again when it moves.
    pub fn key(&self) -> String {
        match &self.after {
            None => "removed".into(),
            Some(a) => format!(
                "{:?}:{}:{}:{}:{}:{}",
                a.file_type,
                a.hash.as_deref().unwrap_or("-"),
                a.size.unwrap_or(0),
                a.mode.as_deref().unwrap_or("-"),
                a.link_target.as_deref().unwrap_or("-"),
                a.unreadable.is_some(),
            ),
        }
    }

    /// Whether the file is an executable: an exec bit, or a removed one.
    pub fn is_executable(&self) -> bool {
        match &self.after {
            None => true,
            Some(a) => a
                .mode
                .as_deref()
                .and_then(|m| u32::from_str_radix(m, 8).ok())
                .is_some_and(|m| m & 0o111 != 0 && a.file_type == Some(FileType::File)),
        }
    }
}

/// What is compared of a file in a container.
const WANT: &[Attribute] = &[
    Attribute::Hash,
    Attribute::Size,
    Attribute::Type,
    Attribute::Mode,
    Attribute::Uid,
    Attribute::Gid,
    Attribute::Mtime,
    Attribute::LinkTarget,
];

/// Most entries read from one upper directory per pass: a container writing
/// millions of files costs the agent a bounded walk.
pub const MAX_ENTRIES: usize = 20_000;

/// What one read of a writable layer found.
#[derive(Debug, Default)]
pub struct Read {
    /// The drift by path inside the container (`/usr/bin/x`).
    pub drift: BTreeMap<String, Drifted>,
    /// The walk stopped at [`MAX_ENTRIES`]: what it did not reach is unknown.
    pub truncated: bool,
    /// Paths named ahead (`first`) that the writable layer does not hold:
    /// known gone, however far the walk got.
    pub absent: BTreeSet<String>,
}

/// The layers of one container, held open for one read.
struct Open<'a> {
    root: &'a HostRoot,
    upper: Layer,
    lowers: Vec<Layer>,
    hashed: u64,
}

impl Open<'_> {
    /// The image's file at `inside` (the topmost lower layer that has it).
    fn below(&mut self, parent: &Path, name: &OsStr) -> Option<FileAttributes> {
        for l in &self.lowers {
            let Ok(Some(dir)) = l.open_dir(parent) else {
                continue;
            };
            if let Ok(Some(a)) = self.root.inspect_in(&dir, name, WANT, &mut self.hashed) {
                return Some(a);
            }
        }
        None
    }

    /// The drift of entry `name` of the upper directory `dir` (at `parent`
    /// inside the container), `None` when it is no drift (absent, a whiteout
    /// hiding nothing).
    fn judge(&mut self, dir: &OwnedFd, parent: &Path, name: &OsStr) -> Option<Drifted> {
        let below = self.below(parent, name);
        if Layer::char_device(dir, name).ok().flatten() == Some((0, 0)) {
            // A whiteout hides an image file; without one below it hides nothing.
            return below.map(|b| Drifted {
                category: ChangeCategory::Removed,
                before: Some(b),
                after: None,
            });
        }
        let after = self
            .root
            .inspect_in(dir, name, WANT, &mut self.hashed)
            .ok()
            .flatten()?;
        let category = if below.is_some() {
            ChangeCategory::Modified
        } else {
            ChangeCategory::Added
        };
        Some(Drifted {
            category,
            before: below,
            after: Some(after),
        })
    }
}

/// The drift of a container: its upper directory's files by their path
/// inside the container (`/usr/bin/x`), minus `exclude` (container paths,
/// with everything under them) and the container's mount points.
///
/// `first` (paths inside the container, relative: `usr/bin/x`) are judged
/// before the walk and outside its bound: the files the kernel named in
/// events, so that a flood of other entries cannot hide them from a read.
///
/// Every directory below the upper directory is opened beneath it without
/// following any link ([`Layer`]): a directory the container swaps for a
/// link to a host directory, even in the middle of the walk, is never
/// listed, watched or hashed through it. `on_dir` is called with each
/// directory walked (its path inside the host root, and its descriptor)
/// before it is listed, so a watch put on it there misses nothing written
/// after the listing.
pub fn drift(
    root: &HostRoot,
    layers: &Layers,
    exclude: &[PathBuf],
    first: &BTreeSet<PathBuf>,
    on_dir: &mut dyn FnMut(&Path, &OwnedFd),
) -> Read {
    let mut out = Read::default();
    let Ok(upper) = root.open_layer(&layers.upper) else {
        return out;
    };
    let lowers = layers
        .lowers
        .iter()
        .filter_map(|l| root.open_layer(l).ok())
        .collect();
    let mut open = Open {
        root,
        upper,
        lowers,
        hashed: 0,
    };
    let skipped = |inside: &Path| {
        exclude.iter().any(|e| inside.starts_with(e))
            || layers.mounts.iter().any(|m| inside.starts_with(m))
    };
    let name_of = |inside: &Path| format!("/{}", escape(inside.as_os_str()));
    // Named first: each looked up alone, beneath the layer.
    let mut todo = Vec::new();
    for inside in first {
        let (Some(parent), Some(name)) = (inside.parent(), inside.file_name()) else {
            continue;
        };
        if skipped(inside) {
            continue;
        }
        let dir = match open.upper.open_dir(parent) {
            Ok(Some(dir)) => dir,
            Ok(None) => {
                out.absent.insert(name_of(inside));
                continue;
            }
            Err(_) => continue,
        };
        if let Ok(Some(d)) = open.upper.open_dir(inside) {
            drop(d);
            // A directory named: walked first, within the bound.
            todo.push(inside.to_path_buf());
            continue;
        }
        match open.judge(&dir, parent, name) {
            Some(d) => {
                out.drift.insert(name_of(inside), d);
            }
            None => {
                out.absent.insert(name_of(inside));
            }
        }
    }
    let mut seen = 0usize;
    // The walk: the named directories first (popped last), then from the top.
    todo.insert(0, PathBuf::new());
    let mut walked = BTreeSet::new();
    while let Some(dir) = todo.pop() {
        if !walked.insert(dir.clone()) {
            continue;
        }
        let Ok(Some(fd)) = open.upper.open_dir(&dir) else {
            continue;
        };
        on_dir(&layers.upper.join(&dir), &fd);
        let Ok(children) = Layer::list(&fd) else {
            continue;
        };
        for child in children {
            seen += 1;
            if seen > MAX_ENTRIES {
                out.truncated = true;
                return out;
            }
            let inside = dir.join(&child.name);
            if skipped(&inside) {
                continue;
            }
            if child.is_dir {
                todo.push(inside);
                continue;
            }
            let name = name_of(&inside);
            if out.drift.contains_key(&name) || out.absent.contains(&name) {
                continue;
            }
            if let Some(d) = open.judge(&fd, &dir, &child.name) {
                out.drift.insert(name, d);
            }
        }
    }
    out
}

/// The attributes that differ between an image's file and the container's.
pub fn changed_attributes(before: &FileAttributes, after: &FileAttributes) -> Vec<Attribute> {
    let mut out = Vec::new();
    let mut differs = |a: Attribute, same: bool| {
        if !same {
            out.push(a);
        }
    };
    differs(Attribute::Hash, before.hash == after.hash);
    differs(Attribute::Size, before.size == after.size);
    differs(Attribute::Type, before.file_type == after.file_type);
    differs(Attribute::Mode, before.mode == after.mode);
    differs(Attribute::Uid, before.uid == after.uid);
    differs(Attribute::Gid, before.gid == after.gid);
    differs(Attribute::Mtime, before.mtime == after.mtime);
    differs(
        Attribute::LinkTarget,
        before.link_target == after.link_target,
    );
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const CONTAINER: &str = "\
1500 1400 0:99 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/var/lib/containerd/s/2/fs:/var/lib/containerd/s/1/fs,upperdir=/var/lib/containerd/s/3/fs,workdir=/var/lib/containerd/s/3/work
1501 1500 0:5 / /proc rw,nosuid - proc proc rw
1502 1500 8:1 /var/lib/kubelet/pods/u/etc-hosts /etc/hosts rw - ext4 /dev/sda1 rw
1503 1500 0:50 / /var/run/secrets/kubernetes.io/serviceaccount ro - tmpfs tmpfs rw
1504 1500 8:1 /data /srv/my\\040data rw - ext4 /dev/sda1 rw
";

    #[test]
    fn the_root_overlay_gives_the_layers_and_the_other_mounts_are_left_out() {
        let l = layers_of(CONTAINER.as_bytes(), Path::new("/")).unwrap();
        assert_eq!(l.upper, PathBuf::from("var/lib/containerd/s/3/fs"));
        assert_eq!(
            l.lowers,
            [
                PathBuf::from("var/lib/containerd/s/2/fs"),
                PathBuf::from("var/lib/containerd/s/1/fs")
            ]
        );
        assert_eq!(
            l.mounts,
            [
                PathBuf::from("proc"),
                PathBuf::from("etc/hosts"),
                PathBuf::from("var/run/secrets/kubernetes.io/serviceaccount"),
                PathBuf::from("srv/my data"),
            ]
        );
    }

    #[test]
    fn layers_are_found_from_where_the_host_root_is() {
        let l = layers_of(CONTAINER.as_bytes(), Path::new("/var/lib")).unwrap();
        assert_eq!(l.upper, PathBuf::from("containerd/s/3/fs"));
        // Outside the host root: the agent cannot read it.
        assert_eq!(layers_of(CONTAINER.as_bytes(), Path::new("/srv")), None);
    }

    #[test]
    fn a_root_that_is_no_overlay_or_climbs_out_has_no_layers() {
        let t = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n";
        assert_eq!(layers_of(t.as_bytes(), Path::new("/")), None);
        let t =
            "1 0 0:9 / / rw - overlay overlay rw,lowerdir=/a,upperdir=/x/../../etc,workdir=/w\n";
        assert_eq!(layers_of(t.as_bytes(), Path::new("/")), None);
        assert_eq!(layers_of(b"garbage\n-\n1 2 - x", Path::new("/")), None);
    }
}

/// The walk of a writable layer against what a container can do to it.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod walk {
    use super::*;

    fn layers() -> Layers {
        Layers {
            upper: "upper".into(),
            lowers: vec!["lower".into()],
            mounts: Vec::new(),
        }
    }

    #[test]
    fn a_file_named_by_an_event_is_judged_however_many_entries_hide_it() {
        let t = tempfile::tempdir().unwrap();
        let upper = t.path().join("upper");
        std::fs::create_dir_all(upper.join("zz/usr/bin")).unwrap();
        std::fs::create_dir_all(t.path().join("lower")).unwrap();
        // More entries at the top than one read lists: the walk never gets
        // down to zz/.
        for i in 0..=MAX_ENTRIES {
            std::fs::write(upper.join(format!("junk{i}")), "").unwrap();
        }
        std::fs::write(upper.join("zz/usr/bin/nc"), "evil").unwrap();
        std::fs::write(upper.join("zz/usr/bin/gone-again"), "").unwrap();
        let root = HostRoot::open(t.path()).unwrap();
        let unnamed = drift(&root, &layers(), &[], &BTreeSet::new(), &mut |_, _| {});
        assert!(unnamed.truncated);
        assert!(!unnamed.drift.contains_key("/zz/usr/bin/nc"));
        std::fs::remove_file(upper.join("zz/usr/bin/gone-again")).unwrap();
        let named = BTreeSet::from([
            PathBuf::from("zz/usr/bin/nc"),
            PathBuf::from("zz/usr/bin/gone-again"),
        ]);
        let read = drift(&root, &layers(), &[], &named, &mut |_, _| {});
        assert!(read.truncated);
        let nc = &read.drift["/zz/usr/bin/nc"];
        assert_eq!(nc.category, ChangeCategory::Added);
        assert_eq!(
            nc.after.as_ref().unwrap().hash.as_deref(),
            Some(blake3::hash(b"evil").to_hex().as_str())
        );
        // Named and not there: known gone, even from a read in part.
        assert!(read.absent.contains("/zz/usr/bin/gone-again"));
    }

    #[test]
    fn a_directory_swapped_for_a_link_during_the_walk_never_reports_a_host_file() {
        let t = tempfile::tempdir().unwrap();
        let upper = t.path().join("upper");
        std::fs::create_dir_all(upper.join("usr/bin")).unwrap();
        std::fs::create_dir_all(t.path().join("lower")).unwrap();
        std::fs::write(upper.join("usr/bin/tool"), "mine").unwrap();
        // The host's secret, in the agent's host root.
        std::fs::create_dir_all(t.path().join("etc/bin")).unwrap();
        std::fs::write(t.path().join("etc/bin/shadow"), "root:secret").unwrap();
        let root = HostRoot::open(t.path()).unwrap();
        let mut swapped = false;
        let read = drift(&root, &layers(), &[], &BTreeSet::new(), &mut |dir, _| {
            // Once /usr is listed and before /usr/bin is listed, the
            // container swaps /usr for a link to the host's /etc.
            if dir == Path::new("upper/usr/bin") && !swapped {
                swapped = true;
                std::fs::rename(upper.join("usr"), upper.join("usr.old")).unwrap();
                std::os::unix::fs::symlink("/etc", upper.join("usr")).unwrap();
            }
        });
        assert!(swapped);
        let paths: Vec<&String> = read.drift.keys().collect();
        assert!(
            !read.drift.contains_key("/usr/bin/shadow"),
            "a host file reported as the container's: {paths:?}"
        );
        for d in read.drift.values() {
            let hash = d.after.as_ref().and_then(|a| a.hash.clone());
            assert_ne!(
                hash.as_deref(),
                Some(blake3::hash(b"root:secret").to_hex().as_str())
            );
        }
        // A link named by an event is no way out either.
        let named = BTreeSet::from([PathBuf::from("usr/bin/shadow")]);
        let read = drift(&root, &layers(), &[], &named, &mut |_, _| {});
        assert!(
            !read.drift.contains_key("/usr/bin/shadow"),
            "{:?}",
            read.drift
        );
        // The link itself is the container's drift, recorded as a link.
        assert_eq!(
            read.drift["/usr"]
                .after
                .as_ref()
                .unwrap()
                .link_target
                .as_deref(),
            Some("/etc")
        );
    }
}

/// Against a real overlay mount (root only: mounting needs CAP_SYS_ADMIN).
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod real_overlay {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    fn write(path: &Path, content: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_upper_directory_of_a_real_overlay_is_the_drift() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: mounting an overlay needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let host = t.path();
        write(&host.join("lower/usr/bin/ls"), "ls", 0o755);
        write(&host.join("lower/etc/group"), "root:x:0:\n", 0o644);
        write(&host.join("lower/etc/motd"), "hello\n", 0o644);
        write(&host.join("lower/opt/app/old.conf"), "a\n", 0o644);
        std::fs::create_dir_all(host.join("lower/tmp")).unwrap();
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(host.join(d)).unwrap();
        }
        let merged = host.join("merged");
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            host.join("lower").display(),
            host.join("upper").display(),
            host.join("work").display()
        );
        let ok = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t overlay");
        let mounted = Mounted(merged.clone());
        // What a process in the container does.
        write(&merged.join("usr/bin/evil"), "#!/bin/sh\n", 0o755);
        std::fs::write(merged.join("etc/group"), "root:x:0:evil\n").unwrap();
        std::fs::remove_file(merged.join("etc/motd")).unwrap();
        write(&merged.join("tmp/scratch"), "x", 0o644);
        std::fs::remove_dir_all(merged.join("opt/app")).unwrap();
        write(&merged.join("opt/app/new.conf"), "b\n", 0o644);
        std::os::unix::fs::symlink("/etc/shadow", merged.join("usr/bin/link")).unwrap();
        // A mount target the runtime made (`/etc/hosts`): not image content.
        write(&merged.join("etc/hosts"), "127.0.0.1 localhost\n", 0o644);

        let root = HostRoot::open(host).unwrap();
        let layers = Layers {
            upper: "upper".into(),
            lowers: vec!["lower".into()],
            mounts: vec![PathBuf::from("etc/hosts")],
        };
        let mut dirs = Vec::new();
        let read = drift(
            &root,
            &layers,
            &[PathBuf::from("tmp")],
            &BTreeSet::new(),
            &mut |d, _| dirs.push(d.to_path_buf()),
        );
        drop(mounted);
        assert!(!read.truncated);
        let found = read.drift;
        let summary: Vec<(&str, ChangeCategory)> = found
            .iter()
            .map(|(p, d)| (p.as_str(), d.category))
            .collect();
        assert_eq!(
            summary,
            [
                ("/etc/group", ChangeCategory::Modified),
                ("/etc/motd", ChangeCategory::Removed),
                ("/opt/app/new.conf", ChangeCategory::Added),
                ("/usr/bin/evil", ChangeCategory::Added),
                ("/usr/bin/link", ChangeCategory::Added),
            ]
        );
        let evil = &found["/usr/bin/evil"];
        assert!(evil.is_executable());
        assert_eq!(evil.after.as_ref().unwrap().mode.as_deref(), Some("0755"));
        let group = &found["/etc/group"];
        assert_ne!(
            group.before.as_ref().unwrap().hash,
            group.after.as_ref().unwrap().hash
        );
        assert!(!group.is_executable());
        // The symlink is recorded as one, never followed out of the layer.
        let link = found["/usr/bin/link"].after.clone().unwrap();
        assert_eq!(link.file_type, Some(FileType::Symlink));
        assert_eq!(link.link_target.as_deref(), Some("/etc/shadow"));
        assert_eq!(found["/etc/motd"].after, None);
        // Every directory walked is offered for a watch; excluded ones are not.
        assert!(dirs.contains(&PathBuf::from("upper/usr/bin")), "{dirs:?}");
        assert!(!dirs.contains(&PathBuf::from("upper/tmp")), "{dirs:?}");
    }
}
