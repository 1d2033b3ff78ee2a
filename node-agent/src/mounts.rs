//! The host's mount table: which mount each monitored path is read through,
//! so that a mount made over a monitored path (`mount --bind evil
//! /usr/bin/sudo`) is a change of that path.
//!
//! The table is the host's own: `/proc/1/mountinfo` of the host's procfs,
//! which the read-only host root mount already holds (`<root>/proc`), so
//! reading it needs neither `hostPID` nor mount propagation. The agent's
//! view of the file tree stays the read-only snapshot of its start; the table
//! tells it what the host sees on top of it. `poll(2)` on the file wakes on
//! every change of the table (`POLLPRI`).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kube_fim_crds::Mount;
use tracing::{debug, warn};

use crate::paths::escape;

/// Where the host's mount table is read, and where the host's `/` appears in
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSource {
    /// A `mountinfo` file (`<root>/proc/1/mountinfo`).
    pub table: PathBuf,
    /// The host's `/` as that table names it (`/`, unless the table is another
    /// namespace's view in which the host root is a directory).
    pub root: PathBuf,
}

impl MountSource {
    /// The host's table as seen through the host root.
    pub fn of_host(root: &Path) -> Self {
        MountSource {
            table: root.join("proc/1/mountinfo"),
            root: PathBuf::from("/"),
        }
    }

    /// The table now; `None` if it cannot be read (no procfs in the root).
    pub fn read(&self) -> Option<MountTable> {
        match std::fs::read(&self.table) {
            Ok(bytes) => Some(MountTable::parse(&bytes, &self.root)),
            Err(error) => {
                debug!(table = %self.table.display(), %error, "no host mount table");
                None
            }
        }
    }
}

/// The host's mounts, in the table's order (later ones on top).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountTable {
    /// (host mount point, root-relative; the mount as reported).
    mounts: Vec<(PathBuf, Mount)>,
    /// The last mount at each mount point (a node running pods has thousands
    /// of mounts: a path's few ancestors are looked up instead).
    last_at: HashMap<PathBuf, usize>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unoctal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let digits = field.get(i + 1..i + 4);
        match digits {
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

impl MountTable {
    /// Parses a `mountinfo` file. `root` is where the host's `/` is in it:
    /// mounts outside it are not the host's; one above it covers all of it.
    pub fn parse(bytes: &[u8], root: &Path) -> Self {
        let mut mounts = Vec::new();
        for line in bytes.split(|b| *b == b'\n') {
            let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
            // id parent major:minor root mount-point options [optional...] - type source super
            let Some(dash) = fields.iter().position(|f| *f == b"-") else {
                continue;
            };
            if dash < 6 || fields.len() < dash + 3 {
                continue;
            }
            let point = PathBuf::from(OsStr::from_bytes(&unoctal(fields[4])));
            let rel = if let Ok(rel) = point.strip_prefix(root) {
                rel.to_path_buf()
            } else if root.starts_with(&point) {
                PathBuf::new()
            } else {
                continue;
            };
            let text = |f: &[u8]| escape(OsStr::from_bytes(&unoctal(f)));
            let mount = Mount {
                mount_point: crate::paths::host_path(&rel),
                fs_type: text(fields[dash + 1]),
                source: text(fields[dash + 2]),
                root: text(fields[3]),
            };
            mounts.push((rel, mount));
        }
        let last_at = mounts
            .iter()
            .enumerate()
            .map(|(i, (point, _))| (point.clone(), i))
            .collect();
        MountTable { mounts, last_at }
    }

    /// The mount the host reads `rel` (root-relative) through: the last one
    /// made at it or at one of its ancestors.
    pub fn covering(&self, rel: &Path) -> Option<&Mount> {
        rel.ancestors()
            .filter_map(|a| self.last_at.get(a))
            .max()
            .and_then(|i| self.mounts.get(*i))
            .map(|(_, m)| m)
    }

    /// Root-relative mount points that differ between the two tables (a mount
    /// made, removed or replaced there).
    pub fn changed_points(&self, other: &MountTable) -> BTreeSet<PathBuf> {
        let mine: BTreeSet<&(PathBuf, Mount)> = self.mounts.iter().collect();
        let theirs: BTreeSet<&(PathBuf, Mount)> = other.mounts.iter().collect();
        mine.symmetric_difference(&theirs)
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// Blocks until the table changes (`POLLPRI`: the kernel marks each change
/// of the mount namespace, from the file's open on); `false` if it cannot be
/// watched (the caller relies on its scans).
fn wait_for_change(file: &std::fs::File) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut fds = [PollFd::new(file, PollFlags::PRI)];
    loop {
        match poll(&mut fds, None) {
            Ok(_) => return fds[0].revents().intersects(PollFlags::PRI | PollFlags::ERR),
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => {
                warn!(%error, "cannot watch the host mount table; scans only");
                return false;
            }
        }
    }
}

/// Follows the table on a thread of its own: calls `changed` after each
/// change, until it returns `false`. Without a readable table, does nothing
/// (scans still read the table when there is one).
pub fn follow(source: &MountSource, mut changed: impl FnMut() -> bool + Send + 'static) {
    let Ok(file) = std::fs::File::open(&source.table) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("mounts".into())
        .spawn(move || while wait_for_change(&file) && changed() {});
    if let Err(error) = spawned {
        warn!(%error, "cannot start the mount table watcher; scans only");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 27 0:21 / /proc rw,relatime shared:5 - proc proc rw
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 27 0:40 / /srv/host\\040root rw shared:9 - tmpfs tmpfs rw
41 27 8:1 /tmp/evil /usr/bin/sudo rw,relatime shared:1 - ext4 /dev/sda1 rw
";

    #[test]
    fn the_last_mount_at_a_path_or_above_it_covers_it() {
        let t = MountTable::parse(TABLE.as_bytes(), Path::new("/"));
        let sudo = t.covering(Path::new("usr/bin/sudo")).unwrap();
        assert_eq!(sudo.mount_point, "/usr/bin/sudo");
        assert_eq!(sudo.root, "/tmp/evil");
        assert_eq!(sudo.fs_type, "ext4");
        assert_eq!(sudo.source, "/dev/sda1");
        let su = t.covering(Path::new("usr/bin/su")).unwrap();
        assert_eq!((su.mount_point.as_str(), su.root.as_str()), ("/", "/"));
        let spaced = t.covering(Path::new("srv/host root/x")).unwrap();
        assert_eq!(spaced.mount_point, "/srv/host root");
    }

    #[test]
    fn a_mount_made_later_above_a_path_hides_the_one_at_it() {
        let table = format!("{TABLE}50 27 0:51 / /usr rw - tmpfs tmpfs rw\n");
        let t = MountTable::parse(table.as_bytes(), Path::new("/"));
        let sudo = t.covering(Path::new("usr/bin/sudo")).unwrap();
        assert_eq!(
            (sudo.mount_point.as_str(), sudo.fs_type.as_str()),
            ("/usr", "tmpfs")
        );
    }

    #[test]
    fn thousands_of_mounts_are_looked_up_by_ancestor() {
        let mut table = String::from(TABLE);
        for i in 0..5000 {
            table.push_str(&format!(
                "{} 27 0:{i} / /var/lib/kubelet/pods/{i}/volumes rw - tmpfs tmpfs rw\n",
                100 + i
            ));
        }
        let t = MountTable::parse(table.as_bytes(), Path::new("/"));
        let started = std::time::Instant::now();
        for _ in 0..100_000 {
            assert_eq!(
                t.covering(Path::new("usr/bin/su")).unwrap().mount_point,
                "/"
            );
        }
        // A full scan of 100k files must not pay per mount of the node.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_table_of_another_namespace_is_read_from_where_the_host_root_is() {
        let t = MountTable::parse(TABLE.as_bytes(), Path::new("/srv/host root"));
        // The tmpfs at the host root covers all of it; /proc and /usr are not the host's.
        let f = t.covering(Path::new("usr/bin/sudo")).unwrap();
        assert_eq!((f.mount_point.as_str(), f.fs_type.as_str()), ("/", "tmpfs"));
        let t = MountTable::parse(TABLE.as_bytes(), Path::new("/usr"));
        assert_eq!(
            t.covering(Path::new("bin/sudo")).unwrap().mount_point,
            "/bin/sudo"
        );
    }

    #[test]
    fn changed_points_name_mounts_made_and_removed() {
        let before = MountTable::parse(TABLE.as_bytes(), Path::new("/"));
        let after = MountTable::parse(
            TABLE
                .replace(
                    "41 27 8:1 /tmp/evil /usr/bin/sudo",
                    "42 27 8:1 /tmp/evil /usr/bin/su",
                )
                .as_bytes(),
            Path::new("/"),
        );
        assert_eq!(
            before.changed_points(&after),
            BTreeSet::from([PathBuf::from("usr/bin/su"), PathBuf::from("usr/bin/sudo")])
        );
        assert!(before.changed_points(&before.clone()).is_empty());
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let t = MountTable::parse(b"\n-\nnot a table\n1 2 3 - x\n", Path::new("/"));
        assert_eq!(t, MountTable::default());
    }
}
