//! The fanotify listener: one notification group with an inode mark on each
//! monitored directory, events reported as directory handle + name, matched
//! against the handles of the monitored directories, and the writer's `/proc`
//! read at once.
//!
//! Why inode marks (`FAN_EVENT_ON_CHILD` on each monitored directory): the
//! kernel then delivers only the events of monitored directories, so writes
//! elsewhere on the same file system cost the agent nothing. A file system
//! mark (`FAN_MARK_FILESYSTEM`) would deliver every close-after-write of the
//! whole file system to user space to be dropped there (measured: 35 ms of
//! agent CPU per 1,000 unrelated writes). Mount marks cannot carry the
//! directory-entry events (create, delete, move: the kernel refuses them).
//! An inode mark follows its directory through every mount it is reached by
//! (bind mounts into containers too). The price is one mark per directory, as
//! inotify's watches; a file system whose directories refuse inode marks (the
//! group's mark limit) falls back to one file system mark, and one that
//! refuses that too to inotify.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::process::{ProcessSnapshot, snapshot};
use crate::sys;
use crate::telemetry::Telemetry;

/// What is asked of the kernel: close after write, attribute change, create,
/// delete, both halves of a move; for directories too.
pub const MASK: u64 = libc::FAN_CLOSE_WRITE
    | libc::FAN_ATTRIB
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ONDIR;

/// One directory as fanotify names it: file system id and file handle.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DirKey {
    fsid: [i32; 2],
    handle_type: i32,
    handle: Vec<u8>,
}

/// What the listener hands to the monitoring loop.
#[derive(Debug)]
pub enum Notice {
    /// A monitored path (relative to the root) changed; `writer` caused it.
    Changed {
        rel: PathBuf,
        mask: u64,
        writer: Box<ProcessSnapshot>,
    },
    /// The kernel queue overflowed: events were lost, a full scan must run.
    Overflow,
}

/// Why attribution is off on this node.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "fanotify refused: no CAP_SYS_ADMIN in the initial user namespace (the policy's processAttribution grants it)"
    )]
    Permission,
    #[error("fanotify with directory handles and names needs Linux 5.9 or newer")]
    Kernel,
    #[error("fanotify is not built into this kernel (CONFIG_FANOTIFY)")]
    NotBuilt,
    #[error("fanotify: {0}")]
    Other(io::Error),
}

impl Unavailable {
    /// Short label for the metric (`reason`).
    pub fn label(&self) -> &'static str {
        match self {
            Unavailable::Permission => "NoCapSysAdmin",
            Unavailable::Kernel => "KernelTooOld",
            Unavailable::NotBuilt => "NoFanotify",
            Unavailable::Other(_) => "Error",
        }
    }
}

/// Which kernel features the group got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `FAN_REPORT_PIDFD` (5.15+): the writer's pidfd tells whether it exited.
    pub pidfd: bool,
}

/// The running listener. Dropping it stops its thread.
pub struct Listener {
    group: Arc<OwnedFd>,
    dirs: Arc<RwLock<HashMap<DirKey, PathBuf>>>,
    /// Directories carrying an inode mark, by their path when marked.
    inode_marks: HashMap<PathBuf, DirKey>,
    /// File systems (by fsid) that carry a file system mark (their directories
    /// refused inode marks), and those that refused that too.
    fs_marks: BTreeSet<[i32; 2]>,
    refused: BTreeSet<[i32; 2]>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub features: Features,
}

fn init() -> Result<(OwnedFd, Features), Unavailable> {
    let base =
        libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK | libc::FAN_REPORT_DFID_NAME;
    let event_flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_LARGEFILE) as u32;
    let classify = |e: io::Error| match e.raw_os_error() {
        Some(libc::EPERM) => Unavailable::Permission,
        Some(libc::EINVAL) => Unavailable::Kernel,
        Some(libc::ENOSYS) => Unavailable::NotBuilt,
        _ => Unavailable::Other(e),
    };
    match sys::fanotify_init(base | libc::FAN_REPORT_PIDFD, event_flags) {
        Ok(fd) => Ok((fd, Features { pidfd: true })),
        // Before 5.15 the pidfd flag is unknown (EINVAL): try without it.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => sys::fanotify_init(base, event_flags)
            .map(|fd| (fd, Features { pidfd: false }))
            .map_err(classify),
        Err(e) => Err(classify(e)),
    }
}

impl Listener {
    /// Opens the notification group and starts the reader thread; `proc` is
    /// the host's `/proc` (the agent runs with the host's pid namespace);
    /// `telemetry` counts the events the kernel delivers.
    pub fn start(
        proc: &Path,
        out: mpsc::UnboundedSender<Notice>,
        telemetry: Telemetry,
    ) -> Result<Self, Unavailable> {
        let (group, features) = init()?;
        let group = Arc::new(group);
        let dirs: Arc<RwLock<HashMap<DirKey, PathBuf>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = Reader {
            group: group.clone(),
            dirs: dirs.clone(),
            proc: proc.to_path_buf(),
            out,
            telemetry,
        };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || reader.run(&stop2))
            .map_err(Unavailable::Other)?;
        Ok(Listener {
            group,
            dirs,
            inode_marks: HashMap::new(),
            fs_marks: BTreeSet::new(),
            refused: BTreeSet::new(),
            stop,
            thread: Some(thread),
            features,
        })
    }

    /// Follows exactly these directories (absolute paths under `root`).
    /// Returns those fanotify cannot follow (their file system refused a mark
    /// or has no file handles): the caller watches them with inotify.
    pub fn sync(&mut self, root: &Path, dirs: &[PathBuf]) -> Vec<PathBuf> {
        let mut map = HashMap::with_capacity(dirs.len());
        let mut marked = HashMap::with_capacity(dirs.len());
        let mut uncovered = Vec::new();
        for abs in dirs {
            let Ok(rel) = abs.strip_prefix(root) else {
                continue;
            };
            let Ok(fd) = rustix::fs::open(
                abs,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            let (Ok(fsid), Ok((handle_type, handle))) =
                (sys::fsid(fd.as_fd()), sys::dir_handle(fd.as_fd()))
            else {
                uncovered.push(abs.clone());
                continue;
            };
            let key = DirKey {
                fsid,
                handle_type,
                handle,
            };
            if !self.follow(abs, &fd, &key) {
                uncovered.push(abs.clone());
                continue;
            }
            if !self.fs_marks.contains(&fsid) {
                marked.insert(abs.clone(), key.clone());
            }
            map.insert(key, rel.to_path_buf());
        }
        for (gone, key) in self.inode_marks.drain() {
            if marked.get(&gone) != Some(&key) {
                unmark(&self.group, &gone, &key);
            }
        }
        self.inode_marks = marked;
        if let Ok(mut dirs) = self.dirs.write() {
            *dirs = map;
        }
        uncovered
    }

    /// Makes sure the kernel reports the events of the directory `fd` (at
    /// `abs`, with handle `key`): its inode mark, or its file system's mark.
    /// False when neither can be had.
    fn follow(&mut self, abs: &Path, fd: &OwnedFd, key: &DirKey) -> bool {
        if self.fs_marks.contains(&key.fsid) {
            return true;
        }
        if self.refused.contains(&key.fsid) {
            return false;
        }
        if self.inode_marks.get(abs) == Some(key) {
            return true;
        }
        // Marked through the descriptor that was opened and identified, not by
        // the path again: a directory swapped for a link in between is never
        // the one marked.
        let by_fd = fd_path(fd);
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_ONLYDIR;
        match sys::fanotify_mark(
            self.group.as_fd(),
            flags,
            MASK | libc::FAN_EVENT_ON_CHILD,
            &by_fd,
        ) {
            Ok(()) => return true,
            Err(error) => {
                debug!(dir = %abs.display(), %error, "no inode mark; trying a file system mark");
            }
        }
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM;
        match sys::fanotify_mark(self.group.as_fd(), flags, MASK, &by_fd) {
            Ok(()) => {
                warn!(dir = %abs.display(), fsid = ?key.fsid, "inode marks refused: this file system's events are filtered by the agent");
                self.fs_marks.insert(key.fsid);
                true
            }
            Err(error) => {
                warn!(dir = %abs.display(), %error, "fanotify cannot mark this file system; inotify covers it");
                self.refused.insert(key.fsid);
                false
            }
        }
    }

    /// Follows one more directory, keeping the others: `dir` opened by the
    /// caller (beneath a container's writable layer, never through a link),
    /// its events named by `rel`. False when fanotify cannot follow it.
    pub fn add(&mut self, dir: &OwnedFd, rel: &Path) -> bool {
        let (Ok(fsid), Ok((handle_type, handle))) =
            (sys::fsid(dir.as_fd()), sys::dir_handle(dir.as_fd()))
        else {
            return false;
        };
        let key = DirKey {
            fsid,
            handle_type,
            handle,
        };
        if !self.follow(rel, dir, &key) {
            return false;
        }
        if !self.fs_marks.contains(&fsid) {
            self.inode_marks.insert(rel.to_path_buf(), key.clone());
        }
        if let Ok(mut dirs) = self.dirs.write() {
            dirs.insert(key, rel.to_path_buf());
        }
        true
    }

    /// Stops following the directories `rel` is, or is above (a container
    /// gone): their marks go where `root.join(rel)` still names them.
    pub fn remove_below(&mut self, root: &Path, rel: &Path) {
        self.retain_below(root, rel, &HashSet::new());
    }

    /// Stops following the directories below `rel` but those of `keep` (the
    /// directories a whole read of a writable layer found): what a container
    /// removed is let go, so churning directories cannot grow the agent.
    pub fn retain_below(&mut self, root: &Path, rel: &Path, keep: &HashSet<PathBuf>) {
        let gone: Vec<PathBuf> = self
            .inode_marks
            .keys()
            .filter(|p| p.starts_with(rel) && !keep.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(key) = self.inode_marks.remove(&p) {
                unmark(&self.group, &root.join(&p), &key);
            }
        }
        if let Ok(mut dirs) = self.dirs.write() {
            dirs.retain(|_, p| !p.starts_with(rel) || keep.contains(p));
        }
    }

    /// Directories followed through fanotify.
    pub fn followed(&self) -> usize {
        self.dirs.read().map(|d| d.len()).unwrap_or(0)
    }

    /// Directories carrying an inode mark: the kernel filters their events.
    pub fn inode_marks(&self) -> usize {
        self.inode_marks.len()
    }

    /// File systems marked whole (their directories refused inode marks):
    /// every write on them reaches the agent, which drops the unmonitored.
    pub fn fs_marks(&self) -> usize {
        self.fs_marks.len()
    }
}

/// The magic link naming the object behind `fd`.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Removes the inode mark of a directory no longer followed, if `path` still
/// names that directory. One that was removed or moved away keeps its mark
/// until the kernel frees the inode; its events match no followed handle and
/// are dropped.
fn unmark(group: &OwnedFd, path: &Path, key: &DirKey) {
    let Ok(fd) = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let same = sys::dir_handle(fd.as_fd())
        .is_ok_and(|(t, h)| t == key.handle_type && h == key.handle)
        && sys::fsid(fd.as_fd()).is_ok_and(|f| f == key.fsid);
    if same {
        let flags = libc::FAN_MARK_REMOVE | libc::FAN_MARK_ONLYDIR;
        if let Err(error) = sys::fanotify_mark(
            group.as_fd(),
            flags,
            MASK | libc::FAN_EVENT_ON_CHILD,
            &fd_path(&fd),
        ) {
            debug!(dir = %path.display(), %error, "inode mark not removed");
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Reader {
    group: Arc<OwnedFd>,
    dirs: Arc<RwLock<HashMap<DirKey, PathBuf>>>,
    proc: PathBuf,
    out: mpsc::UnboundedSender<Notice>,
    telemetry: Telemetry,
}

impl Reader {
    fn run(self, stop: &AtomicBool) {
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [rustix::event::PollFd::new(
                &*self.group,
                rustix::event::PollFlags::IN,
            )];
            let timeout = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(error) => {
                    warn!(%error, "fanotify poll");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
            let n = match rustix::io::read(&*self.group, &mut buf) {
                Ok(n) => n,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
                Err(error) => {
                    warn!(%error, "fanotify read");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            let events = parse(&buf[..n]);
            self.telemetry.fanotify_events(events.len());
            for ev in events {
                if self.handle(ev).is_err() {
                    return;
                }
            }
        }
    }

    /// Resolves, snapshots and forwards one event; Err when the loop is gone.
    fn handle(&self, ev: RawEvent) -> Result<(), ()> {
        if ev.mask & libc::FAN_Q_OVERFLOW != 0 {
            return self.out.send(Notice::Overflow).map_err(|_| ());
        }
        let rels: Vec<PathBuf> = {
            let Ok(dirs) = self.dirs.read() else {
                return Ok(());
            };
            ev.names
                .iter()
                .filter_map(|(key, name)| {
                    let dir = dirs.get(key)?;
                    Some(if name.is_empty() || name == b"." {
                        dir.clone()
                    } else {
                        dir.join(
                            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name),
                        )
                    })
                })
                .collect()
        };
        if rels.is_empty() {
            return Ok(());
        }
        let mut writer = if ev.pid > 0 {
            snapshot(&self.proc, ev.pid)
        } else {
            ProcessSnapshot {
                pid: ev.pid,
                exited: true,
                ..ProcessSnapshot::default()
            }
        };
        // With a pidfd the kernel says whether the writer was already gone when
        // the event was read: then /proc would name whatever reused the pid.
        if matches!(ev.pidfd, PidFd::Gone) {
            writer = ProcessSnapshot {
                pid: ev.pid,
                exited: true,
                ..ProcessSnapshot::default()
            };
        }
        for rel in rels {
            let writer = Box::new(writer.clone());
            self.out
                .send(Notice::Changed {
                    rel,
                    mask: ev.mask,
                    writer,
                })
                .map_err(|_| ())?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum PidFd {
    NotAsked,
    Gone,
    /// The writer's pidfd: it was alive when the event was read (owned so that
    /// it is closed).
    Fd(#[allow(dead_code)] OwnedFd),
}

#[derive(Debug)]
struct RawEvent {
    mask: u64,
    pid: i32,
    /// (directory, entry name) pairs: one for most events.
    names: Vec<(DirKey, Vec<u8>)>,
    pidfd: PidFd,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(i..i + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
}
fn i32_at(b: &[u8], i: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// Parses a read buffer (struct fanotify_event_metadata followed by info
/// records, see fanotify(7)) without unsafe code. Descriptors it contains
/// (pidfds) are owned by the result so that they are closed.
fn parse(buf: &[u8]) -> Vec<RawEvent> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(event_len), Some(meta_len), Some(mask), Some(fd), Some(pid)) = (
        u32_at(buf, at),
        u16_at(buf, at + 6),
        u64_at(buf, at + 8),
        i32_at(buf, at + 16),
        i32_at(buf, at + 20),
    ) {
        let event_len = event_len as usize;
        if event_len < 24 || at + event_len > buf.len() {
            break;
        }
        // Notification groups with FID reporting get no file descriptors.
        let _ = sys::own_fd(fd);
        let ev = &buf[at..at + event_len];
        let mut names = Vec::new();
        let mut pidfd = PidFd::NotAsked;
        let mut i = meta_len as usize;
        while let (Some(&info_type), Some(len)) = (ev.get(i), u16_at(ev, i + 2)) {
            let len = len as usize;
            if len < 4 || i + len > ev.len() {
                break;
            }
            let rec = &ev[i..i + len];
            match info_type {
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_DFID
                | libc::FAN_EVENT_INFO_TYPE_FID
                | libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => {
                    if let Some(pair) = parse_fid(rec) {
                        names.push(pair);
                    }
                }
                libc::FAN_EVENT_INFO_TYPE_PIDFD => {
                    pidfd = match i32_at(rec, 4) {
                        Some(raw) => sys::own_fd(raw).map_or(PidFd::Gone, PidFd::Fd),
                        None => PidFd::Gone,
                    };
                }
                _ => {}
            }
            i += len;
        }
        out.push(RawEvent {
            mask,
            pid,
            names,
            pidfd,
        });
        at += event_len;
    }
    out
}

/// A FID record: header (4), fsid (8), file_handle (4 + 4 + n), then for
/// the DFID_NAME types the NUL-terminated entry name.
fn parse_fid(rec: &[u8]) -> Option<(DirKey, Vec<u8>)> {
    let fsid = [i32_at(rec, 4)?, i32_at(rec, 8)?];
    let n = u32_at(rec, 12)? as usize;
    let handle_type = i32_at(rec, 16)?;
    let handle = rec.get(20..20 + n)?.to_vec();
    let tail = rec.get(20 + n..).unwrap_or_default();
    let name = tail.split(|b| *b == 0).next().unwrap_or_default().to_vec();
    Some((
        DirKey {
            fsid,
            handle_type,
            handle,
        },
        name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(info_type: u8, fsid: [i32; 2], handle: &[u8], name: &[u8]) -> Vec<u8> {
        let mut r = vec![info_type, 0, 0, 0];
        r.extend(fsid[0].to_ne_bytes());
        r.extend(fsid[1].to_ne_bytes());
        r.extend((handle.len() as u32).to_ne_bytes());
        r.extend(1i32.to_ne_bytes());
        r.extend(handle);
        r.extend(name);
        r.push(0);
        while r.len() % 4 != 0 {
            r.push(0);
        }
        let len = r.len() as u16;
        r[2..4].copy_from_slice(&len.to_ne_bytes());
        r
    }

    fn event(mask: u64, pid: i32, records: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = records.concat();
        let mut e = Vec::new();
        e.extend(((24 + body.len()) as u32).to_ne_bytes());
        e.extend([3u8, 0]);
        e.extend(24u16.to_ne_bytes());
        e.extend(mask.to_ne_bytes());
        e.extend((-1i32).to_ne_bytes());
        e.extend(pid.to_ne_bytes());
        e.extend(body);
        e
    }

    #[test]
    fn parses_events_with_dir_handle_and_name() {
        let mut buf = event(
            libc::FAN_CLOSE_WRITE,
            812,
            &[record(
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
                [7, 9],
                b"\x01\x02\x03\x04\x05\x06\x07\x08",
                b"sudoers",
            )],
        );
        buf.extend(event(libc::FAN_Q_OVERFLOW, 0, &[]));
        let evs = parse(&buf);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].pid, 812);
        assert_eq!(evs[0].mask, libc::FAN_CLOSE_WRITE);
        let (key, name) = &evs[0].names[0];
        assert_eq!(key.fsid, [7, 9]);
        assert_eq!(key.handle, b"\x01\x02\x03\x04\x05\x06\x07\x08");
        assert_eq!(name, b"sudoers");
        assert!(evs[1].mask & libc::FAN_Q_OVERFLOW != 0);
    }

    #[test]
    fn truncated_buffers_stop_cleanly() {
        let buf = event(
            libc::FAN_CREATE,
            1,
            &[record(
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
                [1, 1],
                b"abcd",
                b"x",
            )],
        );
        for cut in 0..buf.len() {
            let evs = parse(&buf[..cut]);
            assert!(evs.is_empty(), "cut at {cut}");
        }
    }
}
