//! Real time for container drift: inotify on the directories of the
//! containers' writable layers (host paths), one inotify instance for all.
//!
//! An event is a trigger: it marks its container dirty, and the drift task
//! reads that container's writable layer again ([`super::overlay`]). The
//! name an event carries is kept too ([`Named`]): the files named are judged
//! first in that read, outside the bound of its walk, so a container that
//! writes more entries than one read lists cannot hide a later file behind
//! them. A name is only where to look: what is reported is what the read
//! finds there, so a watch that lands on the wrong directory costs a needless
//! look, never a wrong report.
//!
//! Bounded: at most [`MAX_PER_CONTAINER`] watches for one container and
//! [`MAX_WATCHES`] for all. A container past its share (or when the kernel
//! refuses more watches) is *partial*: the drift task reads it every second,
//! as it would without inotify. An overflowed event queue marks every
//! container dirty. A container writing millions of files produces events
//! that set a flag again and keep at most [`MAX_NAMED`] names per read (the
//! first half and the last half of what it wrote: a flood before or after a
//! file does not push it out), and the passes a container's events cause are
//! spaced by the drift task.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::sync::Notify;

use crate::hostfs::HostRoot;

/// Most watches on one container's writable layer.
pub const MAX_PER_CONTAINER: usize = 1_024;
/// Most watches on all containers' writable layers together (the kernel's
/// `max_user_watches` is shared with the host's watches and other programs).
pub const MAX_WATCHES: usize = 16_384;
/// Most file names kept for one container between two reads.
pub const MAX_NAMED: usize = 4_096;

/// The files events named in one container since its last read (paths
/// inside the container), bounded: the first [`MAX_NAMED`]/2 and the last
/// [`MAX_NAMED`]/2 distinct names.
#[derive(Debug, Default)]
pub struct Named {
    head: Vec<PathBuf>,
    tail: VecDeque<PathBuf>,
    members: HashSet<PathBuf>,
    /// Names were let go between head and tail.
    pub dropped: bool,
}

impl Named {
    pub fn add(&mut self, path: PathBuf) {
        if self.members.contains(&path) {
            return;
        }
        self.members.insert(path.clone());
        if self.head.len() < MAX_NAMED / 2 {
            self.head.push(path);
            return;
        }
        self.tail.push_back(path);
        if self.tail.len() > MAX_NAMED / 2
            && let Some(out) = self.tail.pop_front()
        {
            self.members.remove(&out);
            self.dropped = true;
        }
    }

    pub fn paths(&self) -> BTreeSet<PathBuf> {
        self.members.iter().cloned().collect()
    }
}

const MASK: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::EXCL_UNLINK);

#[derive(Default)]
struct State {
    /// Watch descriptor → container id, and the directory (inside the
    /// container) it watches.
    owner: HashMap<i32, (String, PathBuf)>,
    /// Container id → the files its events named since it was last read.
    named: HashMap<String, Named>,
    /// Container id → its watch descriptors.
    watches: HashMap<String, HashSet<i32>>,
    /// Containers whose writable layer moved since they were last taken.
    dirty: HashSet<String>,
    /// The kernel dropped events: every container is to be read again.
    overflowed: bool,
}

/// What moved since it was last asked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Every container (the event queue overflowed).
    pub all: bool,
    pub ids: HashSet<String>,
}

/// The watches on the containers' writable layers.
pub struct Watcher {
    fd: Arc<OwnedFd>,
    state: Arc<Mutex<State>>,
    /// Woken when a container becomes dirty.
    pub moved: Arc<Notify>,
    stop: Arc<AtomicBool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watcher {
    /// An inotify instance and its reader thread.
    pub fn new() -> std::io::Result<Self> {
        let fd = Arc::new(inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?);
        let state = Arc::new(Mutex::new(State::default()));
        let moved = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let reader = Reader {
            fd: fd.clone(),
            state: state.clone(),
            moved: moved.clone(),
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("drift-inotify".into())
            .spawn(move || reader.run())?;
        Ok(Watcher {
            fd,
            state,
            moved,
            stop,
        })
    }

    /// Watches directory `rel` (inside the host root) for container `id`.
    /// `false` when it is not watched: the container's or the agent's share
    /// is used up, or the kernel refused (the container is then partial).
    /// A directory gone or swapped for a link meanwhile is no failure.
    pub fn watch(&self, root: &HostRoot, id: &str, rel: &Path) -> bool {
        let dir = match root.open_watchable(rel) {
            Ok(dir) => dir,
            Err(_) => return true,
        };
        self.watch_fd(id, &dir, rel)
    }

    /// Watches the directory `dir` (opened by the caller, at `inside` in the
    /// container) for container `id`; as [`Watcher::watch`].
    pub fn watch_fd(&self, id: &str, dir: &OwnedFd, inside: &Path) -> bool {
        {
            let s = lock(&self.state);
            let mine = s.watches.get(id).map_or(0, HashSet::len);
            if mine >= MAX_PER_CONTAINER || s.owner.len() >= MAX_WATCHES {
                // Watching it again (same inode, same descriptor) is free;
                // a new one is refused past the share.
                return false;
            }
        }
        // The descriptor names the very directory opened inside the root.
        let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
        match inotify::add_watch(&*self.fd, path.as_str(), MASK) {
            Ok(wd) => {
                let mut s = lock(&self.state);
                s.owner.insert(wd, (id.to_string(), inside.to_path_buf()));
                s.watches.entry(id.to_string()).or_default().insert(wd);
                true
            }
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => true,
            Err(_) => false,
        }
    }

    /// Stops watching container `id` (gone, restarted, no longer selected).
    pub fn forget(&self, id: &str) {
        let wds = lock(&self.state).watches.remove(id).unwrap_or_default();
        for wd in wds {
            let _ = inotify::remove_watch(&*self.fd, wd);
            let mut s = lock(&self.state);
            if s.owner.get(&wd).is_some_and(|(o, _)| o == id) {
                s.owner.remove(&wd);
            }
        }
        let mut s = lock(&self.state);
        s.dirty.remove(id);
        s.named.remove(id);
    }

    /// The files events named in container `id` since the last call.
    pub fn take_named(&self, id: &str) -> Named {
        lock(&self.state).named.remove(id).unwrap_or_default()
    }

    /// What moved since the last call, and forgotten.
    pub fn take(&self) -> Dirty {
        let mut s = lock(&self.state);
        Dirty {
            all: std::mem::take(&mut s.overflowed),
            ids: std::mem::take(&mut s.dirty),
        }
    }

    /// Watches held, for all containers.
    pub fn count(&self) -> usize {
        lock(&self.state).owner.len()
    }

    /// Watches held for container `id`.
    pub fn count_of(&self, id: &str) -> usize {
        lock(&self.state).watches.get(id).map_or(0, HashSet::len)
    }
}

struct Reader {
    fd: Arc<OwnedFd>,
    state: Arc<Mutex<State>>,
    moved: Arc<Notify>,
    stop: Arc<AtomicBool>,
}

impl Reader {
    fn run(self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 64 * 1024];
        let mut reader = inotify::Reader::new(&*self.fd, &mut buf);
        while !self.stop.load(Ordering::Relaxed) {
            let mut fds = [rustix::event::PollFd::new(
                &*self.fd,
                rustix::event::PollFlags::IN,
            )];
            let timeout = rustix::time::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let mut woke = false;
            loop {
                let event = match reader.next() {
                    Ok(event) => event,
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => break,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                };
                let flags = event.events();
                let wd = event.wd();
                let mut s = lock(&self.state);
                if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                    s.overflowed = true;
                    woke = true;
                    continue;
                }
                let Some((id, dir)) = s.owner.get(&wd).cloned() else {
                    continue;
                };
                let name = event.file_name().map(|n| n.to_bytes()).unwrap_or_default();
                if !name.is_empty() {
                    let inside = dir
                        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name));
                    s.named.entry(id.clone()).or_default().add(inside);
                }
                if flags.contains(ReadFlags::IGNORED) {
                    // The directory is gone (or unwatched): its descriptor may be reused.
                    s.owner.remove(&wd);
                    if let Some(w) = s.watches.get_mut(&id) {
                        w.remove(&wd);
                    }
                }
                if !s.dirty.contains(&id) {
                    s.dirty.insert(id);
                }
                woke = true;
            }
            if woke {
                self.moved.notify_one();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Instant;

    async fn dirty_within(w: &Watcher, id: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut seen = false;
        while Instant::now() < deadline {
            let d = w.take();
            if d.ids.contains(id) {
                seen = true;
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), w.moved.notified()).await;
        }
        seen
    }

    #[tokio::test]
    async fn a_write_in_a_watched_directory_marks_its_container_and_no_other() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/usr/bin")).unwrap();
        std::fs::create_dir_all(t.path().join("b")).unwrap();
        let root = HostRoot::open(t.path()).unwrap();
        let w = Watcher::new().unwrap();
        assert!(w.watch(&root, "A", Path::new("a")));
        assert!(w.watch(&root, "A", Path::new("a/usr/bin")));
        assert!(w.watch(&root, "B", Path::new("b")));
        assert_eq!(w.count(), 3);
        std::fs::write(t.path().join("a/usr/bin/curl"), "x").unwrap();
        assert!(dirty_within(&w, "A", Duration::from_secs(5)).await);
        assert!(!w.take().ids.contains("B"));
        // Forgotten: its watches go, its events with them.
        w.forget("A");
        assert_eq!(w.count_of("A"), 0);
        std::fs::write(t.path().join("a/usr/bin/wget"), "x").unwrap();
        assert!(!dirty_within(&w, "A", Duration::from_millis(300)).await);
        std::fs::remove_dir_all(t.path().join("b")).unwrap();
        assert!(dirty_within(&w, "B", Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_directory_swapped_for_a_link_is_not_followed_out_of_the_layer() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("upper")).unwrap();
        std::fs::create_dir_all(t.path().join("host/etc")).unwrap();
        std::os::unix::fs::symlink("/host/etc", t.path().join("upper/etc")).unwrap();
        let root = HostRoot::open(t.path()).unwrap();
        let w = Watcher::new().unwrap();
        // Not watched, no failure: the walk never sees a link as a directory.
        assert!(w.watch(&root, "A", Path::new("upper/etc")));
        assert_eq!(w.count(), 0);
        std::fs::write(t.path().join("host/etc/shadow"), "x").unwrap();
        assert!(!dirty_within(&w, "A", Duration::from_millis(300)).await);
    }

    #[tokio::test]
    async fn a_container_with_too_many_directories_is_partial_not_unbounded() {
        let t = tempfile::tempdir().unwrap();
        let root = HostRoot::open(t.path()).unwrap();
        let w = Watcher::new().unwrap();
        let mut refused = 0;
        for i in 0..MAX_PER_CONTAINER + 10 {
            let d = format!("u/{i}");
            std::fs::create_dir_all(t.path().join(&d)).unwrap();
            if !w.watch(&root, "A", Path::new(&d)) {
                refused += 1;
            }
        }
        assert_eq!(refused, 10);
        assert_eq!(w.count_of("A"), MAX_PER_CONTAINER);
        // Another container still gets its share.
        std::fs::create_dir_all(t.path().join("v")).unwrap();
        assert!(w.watch(&root, "B", Path::new("v")));
        w.forget("A");
        assert_eq!(w.count(), 1);
    }
}
