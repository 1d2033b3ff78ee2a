//! Who wrote a container's drift.
//!
//! A process in a container writes through the overlay at its root; overlayfs
//! makes the change in the upper directory on the host's file system, in the
//! writer's own context, so the kernel's fsnotify events of the upper
//! directory carry the writer's pid (checked on Linux 6.18: `cp` into a
//! container gives a create and a close-after-write on the upper directory
//! naming `cp`'s pid; `chmod` an attribute change with its pid; `rm` of an
//! image file the move of a whiteout into place with its pid; the copy-up of
//! an image directory the move of the copied directory into place with the
//! pid of the process whose write caused it). A file system mark on the
//! overlay itself is refused (`EOPNOTSUPP`: no file handles) and a mount
//! mark carries no directory-entry events, so the drift task puts an inode
//! mark on each directory of the writable layers it walks, as the host's
//! attribution does on monitored directories ([`crate::attribution::fanotify`]),
//! within the same bounds as its inotify watches.
//!
//! The writer named is the process of the event, read from `/proc/<pid>` at
//! once (its cgroup names its own pod and container): never the container
//! whose layer changed. A process of container A writing into container B's
//! layer (a privileged pod, a host process) is named as what it is. A change
//! whose file no event named is `WriterUnknown`, except a file in a directory
//! made moments before (the copy-up of `/usr/bin` when a first file is written
//! there happens in the same system call): the directory's writer is named
//! with the limit `DirectoryWriter`. Writers noted before a read are let go
//! once the read is done: a writer is never carried over to a later change
//! it did not make.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kube_fim_crds::{AttributionLimit, ProcessInfo};

use super::events::MAX_NAMED;
use crate::attribution::process::ProcessSnapshot;

/// One writer noted for a path.
#[derive(Clone, Debug)]
struct Noted {
    writer: ProcessSnapshot,
    /// Another process wrote the path too since the last read.
    multiple: bool,
    /// The event was of a directory (made, moved in, copied up).
    dir: bool,
    /// The read epoch it was noted in.
    at: u64,
}

/// The writers noted for each container, by path inside it (`usr/bin/x`).
#[derive(Debug, Default)]
pub struct Writers {
    by: HashMap<String, BTreeMap<PathBuf, Noted>>,
    epoch: u64,
}

/// What is said of a change nobody was seen writing.
pub fn unknown() -> ProcessInfo {
    ProcessInfo {
        by: Some("unknown".into()),
        limits: vec![AttributionLimit::WriterUnknown],
        ..ProcessInfo::default()
    }
}

impl Writers {
    /// Notes the writer of `inside` in container `id` (`dir`: the event was
    /// of a directory). At most [`MAX_NAMED`] paths per container between
    /// two reads: past that, the later writers are unknown.
    pub fn note(&mut self, id: &str, inside: PathBuf, writer: ProcessSnapshot, dir: bool) {
        let paths = self.by.entry(id.to_string()).or_default();
        let at = self.epoch;
        let room = paths.len() < MAX_NAMED;
        match paths.get_mut(&inside) {
            Some(n) => {
                n.multiple |= n.writer.pid != writer.pid;
                n.writer = writer;
                n.dir |= dir;
                n.at = at;
            }
            None if room => {
                paths.insert(
                    inside,
                    Noted {
                        writer,
                        multiple: false,
                        dir,
                        at,
                    },
                );
            }
            None => {}
        }
    }

    /// The paths noted in container `id` (judged first by its next read).
    pub fn named(&self, id: &str) -> impl Iterator<Item = &PathBuf> {
        self.by.get(id).into_iter().flat_map(|p| p.keys())
    }

    /// A read of a container begins: what is noted from now on may be of
    /// writes the read does not see. Returns the epoch to end it with.
    pub fn begin(&mut self) -> u64 {
        let e = self.epoch;
        self.epoch += 1;
        e
    }

    /// The writer of the change at `inside` in container `id`, with the
    /// limits of that attribution: the file's own writer, else the writer of
    /// the nearest directory above it made since the last read
    /// (`DirectoryWriter`), else none.
    pub fn writer_of(
        &self,
        id: &str,
        inside: &Path,
    ) -> Option<(ProcessSnapshot, bool, Vec<AttributionLimit>)> {
        let paths = self.by.get(id)?;
        if let Some(n) = paths.get(inside) {
            return Some((n.writer.clone(), n.multiple, Vec::new()));
        }
        inside
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .find_map(|a| paths.get(a).filter(|n| n.dir))
            .map(|n| {
                (
                    n.writer.clone(),
                    n.multiple,
                    vec![AttributionLimit::DirectoryWriter],
                )
            })
    }

    /// A read of container `id` begun at `epoch` is done: the writers noted
    /// before it are let go (what they wrote was seen or was no drift); those
    /// noted during it stay for the next read.
    pub fn end(&mut self, id: &str, epoch: u64) {
        if let Some(paths) = self.by.get_mut(id) {
            paths.retain(|_, n| n.at > epoch);
            if paths.is_empty() {
                self.by.remove(id);
            }
        }
    }

    /// Events were lost: no writer noted can be trusted to be the last.
    pub fn lost(&mut self) {
        self.by.clear();
    }

    /// Container `id` is gone.
    pub fn forget(&mut self, id: &str) {
        self.by.remove(id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn proc(pid: i32, command: &str) -> ProcessSnapshot {
        ProcessSnapshot {
            pid,
            command: Some(command.into()),
            ..ProcessSnapshot::default()
        }
    }

    #[test]
    fn a_writer_is_named_for_its_own_container_and_path_only() {
        let mut w = Writers::default();
        w.note("a", "usr/bin/nc".into(), proc(10, "cp"), false);
        let (p, multiple, limits) = w.writer_of("a", Path::new("usr/bin/nc")).unwrap();
        assert_eq!((p.pid, multiple, limits), (10, false, vec![]));
        // The same path in container B: nobody was seen writing it there.
        assert!(w.writer_of("b", Path::new("usr/bin/nc")).is_none());
        // Another file of A: not cp's.
        assert!(w.writer_of("a", Path::new("usr/bin/curl")).is_none());
        // A file event is no directory: nothing below it takes its writer.
        assert!(w.writer_of("a", Path::new("usr/bin/nc/x")).is_none());
    }

    #[test]
    fn a_file_in_a_directory_just_made_takes_the_directory_writer_and_says_so() {
        let mut w = Writers::default();
        // The copy-up of /usr when cp writes /usr/bin/curl: the upper
        // directory's event names `usr`, moved into place by cp.
        w.note("a", "usr".into(), proc(10, "cp"), true);
        let (p, _, limits) = w.writer_of("a", Path::new("usr/bin/curl")).unwrap();
        assert_eq!(p.pid, 10);
        assert_eq!(limits, vec![AttributionLimit::DirectoryWriter]);
    }

    #[test]
    fn two_writers_of_one_file_name_the_last_and_say_there_were_more() {
        let mut w = Writers::default();
        w.note("a", "etc/passwd".into(), proc(10, "sh"), false);
        w.note("a", "etc/passwd".into(), proc(11, "vi"), false);
        let (p, multiple, _) = w.writer_of("a", Path::new("etc/passwd")).unwrap();
        assert_eq!((p.pid, multiple), (11, true));
    }

    #[test]
    fn a_writer_is_let_go_after_the_read_that_saw_its_write_never_carried_over() {
        let mut w = Writers::default();
        w.note("a", "etc/motd".into(), proc(10, "sh"), false);
        let e = w.begin();
        // Written again while the read runs: kept for the next read.
        w.note("a", "etc/hosts2".into(), proc(12, "sh"), false);
        w.end("a", e);
        assert!(w.writer_of("a", Path::new("etc/motd")).is_none());
        assert_eq!(w.writer_of("a", Path::new("etc/hosts2")).unwrap().0.pid, 12);
        // Lost events: nothing noted is trusted.
        w.lost();
        assert!(w.writer_of("a", Path::new("etc/hosts2")).is_none());
        assert_eq!(unknown().by.as_deref(), Some("unknown"));
    }

    #[test]
    fn the_paths_noted_per_container_are_bounded() {
        let mut w = Writers::default();
        for i in 0..MAX_NAMED + 10 {
            w.note("a", format!("f{i}").into(), proc(1, "sh"), false);
        }
        assert_eq!(w.named("a").count(), MAX_NAMED);
    }
}
