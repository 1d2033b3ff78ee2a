//! Reading the host's files through its root directory, never outside it.
//!
//! A directory is opened with `openat2(2)` relative to a descriptor of the
//! host root with `RESOLVE_IN_ROOT`: the kernel resolves `..` and absolute or
//! relative symlinks as if the root were `/`, so a host symlink to
//! `/etc/shadow` means the host's file and nothing can lead outside the root.
//! A file is then looked at by its bare name relative to that directory's
//! descriptor (no `/`, never `..`), never following it (`AT_SYMLINK_NOFOLLOW`,
//! `O_NOFOLLOW`): a symlink is recorded as a symlink with its target, and one
//! lookup in a directory inside the root stays inside the root. FIFOs, sockets
//! and devices are never opened; regular files are opened non-blocking and
//! hashed from the descriptor, checked to be the file that was looked at.
//!
//! Per regular file: `statx`, `openat`, `flistxattr` (skipped on file
//! systems without extended attributes), the reads, `statx` of the
//! descriptor (did it change while it was read?), `close`.
//!
//! A file whose content cannot be read (a security module denies the open, a
//! process holds a write lease on it, it changes faster than it can be
//! hashed) keeps what could be read, its `statx`, and says why the rest could
//! not be in [`FileAttributes::unreadable`]; its hash and extended attributes
//! are absent, never guessed. The open is non-blocking: a lease makes it fail
//! at once (`EWOULDBLOCK`) rather than wait for the holder.
//!
//! [`HostRoot::inspect_batch`] inspects many files at once on the scan's
//! thread pool (`--threads`, at low CPU and I/O priority, see
//! [`crate::budget`]); the results come back in the order asked.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{Attribute, FileAttributes, FileType};
use rayon::prelude::*;
use rustix::fs::{
    AtFlags, Dir, FileType as RawType, Mode, OFlags, ResolveFlags, Statx, StatxFlags,
};
use rustix::io::Errno;
use thiserror::Error;
use tracing::{debug, warn};

/// Why a file could not be inspected (or its content read).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InspectError {
    /// `EACCES` or `EPERM`: denied to root too, so by a security module's
    /// rule (or an immutable file system's).
    #[error("{0}: permission denied")]
    PermissionDenied(&'static str),
    /// Another process holds a lease on the file.
    #[error("EWOULDBLOCK: held under a lease by another process")]
    Leased,
    #[error("symlink loop or too many levels of symlinks")]
    Loop,
    #[error("changed while being hashed ({0} attempts)")]
    Unstable(u32),
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    #[error("{0}")]
    Io(String),
}

impl From<Errno> for InspectError {
    fn from(e: Errno) -> Self {
        match e {
            Errno::ACCESS => InspectError::PermissionDenied("EACCES"),
            Errno::PERM => InspectError::PermissionDenied("EPERM"),
            Errno::WOULDBLOCK => InspectError::Leased,
            Errno::LOOP => InspectError::Loop,
            other => InspectError::Io(std::io::Error::from(other).to_string()),
        }
    }
}

/// One file for [`HostRoot::inspect_batch`]: `name` in the directory `dir`
/// (root-relative), with the attributes wanted.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub dir: &'a Path,
    pub name: &'a OsStr,
    pub want: &'a [Attribute],
}

impl<'a> Item<'a> {
    /// The item of a root-relative path (the root itself is `.` in `""`).
    pub fn of(path: &'a Path, want: &'a [Attribute]) -> Self {
        match path.file_name() {
            Some(name) => Item {
                dir: path.parent().unwrap_or(Path::new("")),
                name,
                want,
            },
            None => Item {
                dir: path,
                name: OsStr::new("."),
                want,
            },
        }
    }
}

/// An [`Item`] that owns its names, for [`HostRoot::spawn_batch`].
#[derive(Clone, Debug)]
pub struct OwnedItem {
    pub dir: PathBuf,
    pub name: OsString,
    pub want: Arc<[Attribute]>,
}

impl OwnedItem {
    /// The item of a root-relative path.
    pub fn of(path: &Path, want: Arc<[Attribute]>) -> Self {
        let item = Item::of(path, &[]);
        OwnedItem {
            dir: item.dir.to_path_buf(),
            name: item.name.to_os_string(),
            want,
        }
    }

    fn item(&self) -> Item<'_> {
        Item {
            dir: &self.dir,
            name: &self.name,
            want: &self.want,
        }
    }
}

/// What inspecting one file gave.
pub type Inspected = Result<Option<FileAttributes>, InspectError>;

/// Work on the scan's threads ([`HostRoot::spawn`]).
#[derive(Debug)]
pub struct Job<T> {
    done: mpsc::Receiver<T>,
}

impl<T> Job<T> {
    /// Waits for the result (`None` if the job was lost with its thread).
    pub fn wait(self) -> Option<T> {
        self.done.recv().ok()
    }
}

/// A batch on the scan's threads ([`HostRoot::spawn_batch`]).
#[derive(Debug)]
pub struct Pending {
    items: usize,
    job: Job<(Vec<Inspected>, u64)>,
}

impl Pending {
    /// Waits for the results, in the order of the items; `hashed` is increased
    /// by the bytes read.
    pub fn wait(self, hashed: &mut u64) -> Vec<Inspected> {
        match self.job.wait() {
            Some((results, n)) => {
                *hashed += n;
                results
            }
            None => {
                let lost = InspectError::Io("the scan thread stopped".into());
                vec![Err(lost); self.items]
            }
        }
    }
}

/// The host root, held open, with the scan's thread pool (a clone shares
/// both).
#[derive(Clone, Debug)]
pub struct HostRoot {
    fd: Arc<OwnedFd>,
    path: PathBuf,
    /// Files larger than this are not hashed (their other attributes are).
    pub max_hash_size: u64,
    threads: usize,
    /// Built at the first batch (`None`: threads could not be started; the
    /// batch runs on the caller's thread).
    pool: Arc<OnceLock<Option<rayon::ThreadPool>>>,
}

/// A directory entry.
#[derive(Debug, Clone)]
pub struct Child {
    pub name: OsString,
    pub is_dir: bool,
}

thread_local! {
    /// Read buffer reused across files (a fresh zeroed buffer per file costs
    /// more than hashing small files).
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 256 * 1024]);
    static XATTR_BUF: RefCell<(Vec<u8>, Vec<u8>)> =
        RefCell::new((vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]));
    /// Devices whose file system has no extended attributes (`ENOTSUP`): not
    /// asked again.
    static NO_XATTRS: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);
const LOOK: AtFlags = AtFlags::SYMLINK_NOFOLLOW.union(AtFlags::NO_AUTOMOUNT);
const STATX: StatxFlags = StatxFlags::BASIC_STATS;

fn raw_type(st: &Statx) -> RawType {
    RawType::from_raw_mode(st.stx_mode.into())
}

fn file_type(st: &Statx) -> FileType {
    match raw_type(st) {
        RawType::RegularFile => FileType::File,
        RawType::Directory => FileType::Directory,
        RawType::Symlink => FileType::Symlink,
        RawType::Fifo => FileType::Fifo,
        RawType::Socket => FileType::Socket,
        RawType::CharacterDevice => FileType::CharDevice,
        RawType::BlockDevice => FileType::BlockDevice,
        RawType::Unknown => FileType::File,
    }
}

fn micro_time(secs: i64, nsec: i64) -> Option<MicroTime> {
    Timestamp::new(secs, (nsec / 1000 * 1000) as i32)
        .ok()
        .map(MicroTime)
}

fn dev(st: &Statx) -> u64 {
    (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor)
}

/// Stable facts of a stat, to notice a file changing while it is hashed.
fn fingerprint(st: &Statx) -> (u64, i64, u32, i64, u32, u64, u64) {
    (
        st.stx_size,
        st.stx_mtime.tv_sec,
        st.stx_mtime.tv_nsec,
        st.stx_ctime.tv_sec,
        st.stx_ctime.tv_nsec,
        st.stx_ino,
        dev(st),
    )
}

/// A bare name, looked up in one directory: never `..` nor a path.
fn is_bare_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b".." && !b.contains(&b'/')
}

/// The directories a batch worker has open, most recent last (a sorted list
/// of paths comes back to a parent after each subdirectory).
#[derive(Default)]
struct DirCache {
    open: Vec<(PathBuf, Result<Option<OwnedFd>, InspectError>)>,
}

impl DirCache {
    const SIZE: usize = 8;

    fn get(&mut self, root: &HostRoot, dir: &Path) -> &Result<Option<OwnedFd>, InspectError> {
        let at = match self.open.iter().rposition(|(p, _)| p == dir) {
            Some(i) => i,
            None => {
                if self.open.len() == Self::SIZE {
                    drop(self.open.remove(0));
                }
                let fd = match root.open_dir(dir) {
                    Ok(fd) => Ok(Some(fd)),
                    Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
                    Err(e) => Err(e.into()),
                };
                self.open.push((dir.to_path_buf(), fd));
                self.open.len() - 1
            }
        };
        &self.open[at].1
    }
}

impl HostRoot {
    /// Opens the host root directory; scans use the threads of the CPU
    /// budget ([`crate::budget::threads`]) unless [`HostRoot::set_threads`]
    /// says otherwise.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        // Absolute, without links: the real-time watcher's events name paths
        // under it (`--root .` or a link would match none of them).
        let path = &std::fs::canonicalize(path)?;
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(HostRoot {
            fd: Arc::new(fd),
            path: path.to_path_buf(),
            max_hash_size: 4 << 30,
            threads: crate::budget::threads(),
            pool: Arc::default(),
        })
    }

    /// The directory standing for the host's `/`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Threads of the scan's pool (at least 1).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Sets the threads of the scan's pool (at least 1).
    pub fn set_threads(&mut self, threads: usize) {
        let threads = threads.max(1);
        if threads != self.threads {
            self.threads = threads;
            self.pool = Arc::default();
        }
    }

    fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.pool
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(self.threads)
                    .thread_name(|i| format!("scan-{i}"))
                    .start_handler(|_| {
                        if let Err(e) = crate::budget::lower_this_thread() {
                            debug!(%e, "scan thread keeps its priority");
                        }
                    })
                    .build()
                    .map_err(|e| warn!(%e, "no scan threads: scanning on one thread"))
                    .ok()
            })
            .as_ref()
    }

    /// Runs `work` on the scan's threads, the caller waiting idle: the whole
    /// of a scan (walking, hashing, judging, writing) then shares the
    /// `--threads` budget, its parts stealing each other's work (`rayon::join`).
    /// `work` is told whether it runs on the pool; without one (its threads
    /// could not be started) it runs on the caller's thread.
    pub fn on_scan_threads<R: Send>(&self, work: impl FnOnce(bool) -> R + Send) -> R {
        match self.pool() {
            Some(pool) => pool.install(|| work(true)),
            None => work(false),
        }
    }

    /// Opens `rel` (relative to the root) inside the root, never following its
    /// last component.
    fn open_in(&self, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat2(&*self.fd, rel, flags, Mode::empty(), RESOLVE) {
            Err(Errno::NOSYS) => open_beneath(&self.fd, rel, flags),
            other => other,
        }
    }

    /// A descriptor (`O_PATH`) of directory `rel`, resolved inside the root,
    /// its last component never followed: what an inotify watch is put on
    /// (through `/proc/self/fd`), so a directory swapped for a link is refused.
    pub fn open_watchable(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        self.open_in(rel, OFlags::PATH | OFlags::DIRECTORY)
    }

    /// A descriptor (`O_PATH`) of directory `rel`, resolved inside the root,
    /// following a symlink as its last component too.
    fn open_dir(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match rustix::fs::openat2(&*self.fd, rel, flags, Mode::empty(), RESOLVE) {
            Err(Errno::NOSYS) => open_beneath(&self.fd, rel, flags | OFlags::NOFOLLOW),
            other => other,
        }
    }

    /// The entries of directory `rel`, or why it cannot be listed.
    pub fn list_dir(&self, rel: &Path) -> Result<Vec<Child>, InspectError> {
        let fd = self.open_in(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        Layer::list(&fd)
    }

    /// The attributes of `rel` that `want` asks for, `Ok(None)` if it does not
    /// exist. `hashed` is increased by the bytes read for hashing. Runs on the
    /// caller's thread, at its priority (real-time events).
    pub fn inspect(&self, rel: &Path, want: &[Attribute], hashed: &mut u64) -> Inspected {
        let item = Item::of(rel, want);
        match self.open_dir(item.dir) {
            Ok(dir) => self.inspect_at(&dir, item.name, want, hashed),
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The device number (major, minor) of `rel` when it is a character
    /// device, `Ok(None)` when it is anything else or absent: an overlay
    /// whiteout is a character device 0/0.
    pub fn char_device(&self, rel: &Path) -> Result<Option<(u32, u32)>, InspectError> {
        let item = Item::of(rel, &[]);
        let dir = match self.open_dir(item.dir) {
            Ok(dir) => dir,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match rustix::fs::statx(&dir, item.name, LOOK, STATX) {
            Ok(st) if raw_type(&st) == RawType::CharacterDevice => {
                Ok(Some((st.stx_rdev_major, st.stx_rdev_minor)))
            }
            Ok(_) | Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// [`HostRoot::inspect`] of every item, in parallel on the scan's pool;
    /// the results are in the order of `items`, one per item. Items of one
    /// directory next to each other share its descriptor.
    pub fn inspect_batch(&self, items: &[Item<'_>], hashed: &mut u64) -> Vec<Inspected> {
        let (results, n) = match self.pool() {
            Some(pool) => pool.install(|| self.run_batch(items, true)),
            None => self.run_batch(items, false),
        };
        *hashed += n;
        results
    }

    /// [`HostRoot::inspect_batch`] without waiting: the batch runs on the
    /// scan's threads while the caller goes on (judging the previous batch,
    /// listing the next directory); [`Pending::wait`] gives the results.
    pub fn spawn_batch(&self, items: Vec<OwnedItem>) -> Pending {
        let n = items.len();
        let job = self.spawn(move |root, parallel| {
            let borrowed: Vec<Item<'_>> = items.iter().map(OwnedItem::item).collect();
            root.run_batch(&borrowed, parallel)
        });
        Pending { items: n, job }
    }

    /// Runs `job` on one of the scan's threads (at their low priority) while
    /// the caller goes on; it is given this root and whether it runs on the
    /// pool (where rayon's parallel iterators use the scan's threads, see
    /// [`HostRoot::run_batch`]) or, without a pool, on the caller's thread.
    pub fn spawn<T: Send + 'static>(
        &self,
        job: impl FnOnce(&HostRoot, bool) -> T + Send + 'static,
    ) -> Job<T> {
        let (tx, done) = mpsc::sync_channel(1);
        let root = self.clone();
        let job = move |parallel| {
            let _ = tx.send(job(&root, parallel));
        };
        match self.pool() {
            Some(pool) => pool.spawn(move || job(true)),
            None => job(false),
        }
        Job { done }
    }

    /// Inspects `items` on the scan's pool (`parallel`, called from one of
    /// its threads) or on the calling thread; the results and the bytes read.
    pub fn run_batch(&self, items: &[Item<'_>], parallel: bool) -> (Vec<Inspected>, u64) {
        let one = |cache: &mut DirCache, item: &Item<'_>| -> (Inspected, u64) {
            let mut n = 0;
            let result = if !is_bare_name(item.name) {
                Err(InspectError::Io(format!(
                    "not a file name: {}",
                    item.name.to_string_lossy()
                )))
            } else {
                match cache.get(self, item.dir) {
                    Ok(Some(dir)) => self.inspect_at(dir, item.name, item.want, &mut n),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e.clone()),
                }
            };
            (result, n)
        };
        let done: Vec<(Inspected, u64)> = if parallel {
            items.par_iter().map_init(DirCache::default, one).collect()
        } else {
            let mut cache = DirCache::default();
            items.iter().map(|i| one(&mut cache, i)).collect()
        };
        let mut hashed = 0;
        let results = done
            .into_iter()
            .map(|(result, n)| {
                hashed += n;
                result
            })
            .collect();
        (results, hashed)
    }

    /// Inspects `name` (a bare name) in the directory `dir`.
    fn inspect_at(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        want: &[Attribute],
        hashed: &mut u64,
    ) -> Inspected {
        let mut st = match rustix::fs::statx(dir, name, LOOK, STATX) {
            Ok(st) => st,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let kind = file_type(&st);
        let has = |a: Attribute| want.contains(&a);
        let mut attrs = FileAttributes::default();
        match kind {
            FileType::Symlink if has(Attribute::LinkTarget) => {
                let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
                attrs.link_target =
                    Some(crate::paths::escape(OsStr::from_bytes(target.as_bytes())));
            }
            // Larger files keep their other attributes, unhashed.
            FileType::File
                if (has(Attribute::Hash) || has(Attribute::Xattrs))
                    && st.stx_size <= self.max_hash_size =>
            {
                match read_file(dir, name, &st, want, hashed) {
                    Ok(content) => {
                        // The attributes of the state that was hashed.
                        st = content.st;
                        attrs.hash = content.hash;
                        attrs.xattrs = content.xattrs;
                    }
                    Err(Unread::Gone) => return Ok(None),
                    // What could be read, and why the content could not.
                    Err(Unread::Content { st: last, why }) => {
                        st = *last;
                        attrs.unreadable = Some(why.to_string());
                    }
                }
            }
            FileType::Directory if has(Attribute::Xattrs) => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let read = rustix::fs::openat(dir, name, flags, Mode::empty())
                    .map_err(InspectError::from)
                    .and_then(|fd| xattrs_digest(&fd, dev(&st)));
                match read {
                    Ok(xattrs) => attrs.xattrs = xattrs,
                    Err(why) => attrs.unreadable = Some(why.to_string()),
                }
            }
            _ => {}
        }
        attrs.file_type = has(Attribute::Type).then_some(kind);
        attrs.size = (has(Attribute::Size) && kind != FileType::Directory).then_some(st.stx_size);
        attrs.mode = has(Attribute::Mode).then(|| format!("{:04o}", st.stx_mode & 0o7777));
        attrs.uid = has(Attribute::Uid).then_some(st.stx_uid);
        attrs.gid = has(Attribute::Gid).then_some(st.stx_gid);
        if has(Attribute::Mtime) {
            attrs.mtime = micro_time(st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec.into());
        }
        if has(Attribute::Ctime) {
            attrs.ctime = micro_time(st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec.into());
        }
        attrs.inode = has(Attribute::Inode).then_some(st.stx_ino);
        attrs.links =
            (has(Attribute::Links) && kind != FileType::Directory).then_some(st.stx_nlink.into());
        Ok(Some(attrs))
    }

    /// Opens the regular file `rel` for reading, resolved inside the root (its
    /// last component never followed), without waiting for a lease holder.
    /// `Ok(None)` when it does not exist.
    pub fn open_file(&self, rel: &Path) -> Result<Option<std::fs::File>, InspectError> {
        let fd = match self.open_in(rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(&fd)?;
        if RawType::from_raw_mode(st.st_mode) != RawType::RegularFile {
            return Err(InspectError::Io("not a regular file".into()));
        }
        Ok(Some(std::fs::File::from(fd)))
    }

    /// Inode, size and mtime (ns) of `rel` (a file or a directory, its last
    /// component not followed), `Ok(None)` when it does not exist: what says
    /// a database file was rewritten.
    pub fn stamp(&self, rel: &Path) -> Result<Option<(u64, u64, i128)>, InspectError> {
        let fd = match self.open_in(rel, OFlags::PATH) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(&fd)?;
        let mtime = i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
        Ok(Some((st.st_ino, st.st_size as u64, mtime)))
    }

    /// BLAKE3 of the first `len` bytes of a regular file (for growOnly entries:
    /// did the file only grow, keeping its old content as a prefix?).
    pub fn hash_prefix(&self, rel: &Path, len: u64) -> Result<String, InspectError> {
        let fd = self.open_in(rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)?;
        let st = rustix::fs::fstat(&fd)?;
        if RawType::from_raw_mode(st.st_mode) != RawType::RegularFile {
            return Err(InspectError::Io("not a regular file".into()));
        }
        let mut hasher = blake3::Hasher::new();
        let mut file = std::fs::File::from(fd).take(len);
        std::io::copy(&mut file, &mut hasher).map_err(|e| InspectError::Io(e.to_string()))?;
        Ok(hasher.finalize().to_hex().to_string())
    }
}

impl HostRoot {
    /// BLAKE3 and SHA-256 of the regular file `rel` (resolved inside the
    /// root, its last component never followed) from one read: every buffer
    /// read goes to both hashers, so the two digests are of the same bytes
    /// whatever happens to the file meanwhile. A file with more than `max`
    /// bytes is refused ([`InspectError::TooLarge`]), when its size says so
    /// or once `max` is passed while reading.
    pub fn blake3_and_sha256(
        &self,
        rel: &Path,
        max: u64,
    ) -> Result<(String, String), InspectError> {
        use sha2::Digest;
        let fd = self.open_in(rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)?;
        let st = rustix::fs::fstat(&fd)?;
        if RawType::from_raw_mode(st.st_mode) != RawType::RegularFile {
            return Err(InspectError::Io("not a regular file".into()));
        }
        if st.st_size as u64 > max {
            return Err(InspectError::TooLarge(max));
        }
        let mut file = std::fs::File::from(fd);
        let mut blake3 = blake3::Hasher::new();
        let mut sha256 = sha2::Sha256::new();
        let mut total = 0u64;
        READ_BUF.with_borrow_mut(|buf| -> Result<(), InspectError> {
            loop {
                let n = match file.read(buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(InspectError::Io(e.to_string())),
                };
                total += n as u64;
                if total > max {
                    return Err(InspectError::TooLarge(max));
                }
                blake3.update(&buf[..n]);
                sha256.update(&buf[..n]);
            }
        })?;
        Ok((
            blake3.finalize().to_hex().to_string(),
            format!("{:x}", sha256.finalize()),
        ))
    }
}

/// How paths below a container's writable layer are resolved: beneath it,
/// never through a symlink or a magic link, never onto another mount. The
/// container can swap any of its directories for a link at any moment; a
/// link met on the way fails the open (`ELOOP`, `EXDEV`) rather than lead
/// to a host file.
const LAYER: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// A directory held open (a container's writable layer, an image layer),
/// below which paths are resolved without following any link ([`LAYER`]).
#[derive(Debug)]
pub struct Layer {
    fd: OwnedFd,
}

impl HostRoot {
    /// Opens directory `rel` (inside the root, its last component never
    /// followed) as a [`Layer`].
    pub fn open_layer(&self, rel: &Path) -> Result<Layer, Errno> {
        Ok(Layer {
            fd: self.open_in(rel, OFlags::PATH | OFlags::DIRECTORY)?,
        })
    }

    /// [`HostRoot::inspect`] of `name` (a bare name) in the directory `dir`
    /// already opened (by [`Layer::open_dir`]).
    pub fn inspect_in(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        want: &[Attribute],
        hashed: &mut u64,
    ) -> Inspected {
        if !is_bare_name(name) {
            return Err(InspectError::Io(format!(
                "not a file name: {}",
                name.to_string_lossy()
            )));
        }
        self.inspect_at(dir, name, want, hashed)
    }
}

impl Layer {
    /// Directory `inside` (relative to the layer; empty for the layer
    /// itself) opened for listing; `Ok(None)` when it is absent or no
    /// directory (a file, or a link where a directory was).
    pub fn open_dir(&self, inside: &Path) -> Result<Option<OwnedFd>, Errno> {
        let inside = if inside.as_os_str().is_empty() {
            Path::new(".")
        } else {
            inside
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let opened = match rustix::fs::openat2(&self.fd, inside, flags, Mode::empty(), LAYER) {
            Err(Errno::NOSYS) => open_beneath(&self.fd, inside, flags),
            other => other,
        };
        match opened {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entries of a directory opened by [`Layer::open_dir`].
    pub fn list(dir: &OwnedFd) -> Result<Vec<Child>, InspectError> {
        let listing = Dir::read_from(dir)?;
        let mut out = Vec::new();
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            out.push(Child {
                name: OsStr::from_bytes(name).to_os_string(),
                is_dir: entry.file_type() == RawType::Directory,
            });
        }
        Ok(out)
    }

    /// The device number of `name` in `dir` when it is a character device
    /// (an overlay whiteout is 0/0), `Ok(None)` for anything else or absent.
    pub fn char_device(dir: &OwnedFd, name: &OsStr) -> Result<Option<(u32, u32)>, InspectError> {
        if !is_bare_name(name) {
            return Ok(None);
        }
        match rustix::fs::statx(dir, name, LOOK, STATX) {
            Ok(st) if raw_type(&st) == RawType::CharacterDevice => {
                Ok(Some((st.stx_rdev_major, st.stx_rdev_minor)))
            }
            Ok(_) | Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// `rel` opened below `root` one component at a time, for kernels (before
/// 5.6) and sandboxes (a seccomp profile, valgrind) without `openat2`: every
/// component is opened relative to the one before with `O_NOFOLLOW`, and
/// `..` is refused, so nothing leads outside the root. Stricter than
/// `RESOLVE_IN_ROOT`: a symlink on the way is refused (`ELOOP`), not
/// followed inside the root.
fn open_beneath(root: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    use std::path::Component;
    let parts: Vec<&OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(name) => Ok(Some(name)),
            Component::CurDir | Component::RootDir => Ok(None),
            Component::ParentDir | Component::Prefix(_) => Err(Errno::XDEV),
        })
        .filter_map(Result::transpose)
        .collect::<Result<_, _>>()?;
    let step = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let Some((last, dirs)) = parts.split_last() else {
        return rustix::fs::openat(root, ".", flags, Mode::empty());
    };
    let mut at: Option<OwnedFd> = None;
    for name in dirs {
        let next = rustix::fs::openat(at.as_ref().unwrap_or(root), *name, step, Mode::empty())?;
        at = Some(next);
    }
    rustix::fs::openat(at.as_ref().unwrap_or(root), *last, flags, Mode::empty())
}

/// What was read of a regular file, and the `statx` of the state read.
struct Content {
    st: Statx,
    hash: Option<String>,
    xattrs: Option<String>,
}

/// Why the content of a regular file was not read.
enum Unread {
    /// It is gone (removed since it was looked at).
    Gone,
    /// It could not be read: why, and the last `statx` of the file looked at
    /// (what could be read).
    Content { st: Box<Statx>, why: InspectError },
}

/// Hashes the regular file `name` in `dir` (looked at as `first`) from a
/// descriptor, retrying when it changes underneath: the descriptor's `statx`
/// after reading must match the one before opening (same inode, size,
/// mtime, ctime), or the file was replaced or written meanwhile. The open
/// never waits (`O_NONBLOCK`: a lease held by another process fails it).
fn read_file(
    dir: &OwnedFd,
    name: &OsStr,
    first: &Statx,
    want: &[Attribute],
    hashed: &mut u64,
) -> Result<Content, Unread> {
    const ATTEMPTS: u32 = 3;
    // The last statx of the file first looked at: what is reported when its
    // content cannot be read.
    let mut seen = *first;
    let unread = |st: &Statx, why: InspectError| Unread::Content {
        st: Box::new(*st),
        why,
    };
    let mut before = *first;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            before = match rustix::fs::statx(dir, name, LOOK, STATX) {
                Ok(st) => st,
                Err(Errno::NOENT) => return Err(Unread::Gone),
                Err(e) => return Err(unread(&seen, e.into())),
            };
            if raw_type(&before) != RawType::RegularFile || before.stx_ino != first.stx_ino {
                // Replaced since it was looked at: look again next time.
                continue;
            }
            seen = before;
        }
        let flags =
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(Unread::Gone),
            // Replaced by a symlink since it was looked at.
            Err(Errno::LOOP) => continue,
            Err(e) => return Err(unread(&seen, e.into())),
        };
        let xattrs = if want.contains(&Attribute::Xattrs) {
            xattrs_digest(&fd, dev(&before)).map_err(|why| unread(&seen, why))?
        } else {
            None
        };
        let mut file = std::fs::File::from(fd);
        let mut hash = None;
        if want.contains(&Attribute::Hash) {
            let mut hasher = blake3::Hasher::new();
            let mut n_total = 0u64;
            // Up to the size looked at (the check below notices growth), or to
            // the end when the size says nothing (0: /proc and the like).
            let expected = before.stx_size;
            let read = READ_BUF.with_borrow_mut(|buf| -> Result<(), InspectError> {
                while expected == 0 || n_total < expected {
                    let n = match file.read(buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(InspectError::Io(e.to_string())),
                    };
                    hasher.update(&buf[..n]);
                    n_total += n as u64;
                }
                Ok(())
            });
            *hashed += n_total;
            read.map_err(|why| unread(&seen, why))?;
            hash = Some(hasher.finalize().to_hex().to_string());
        }
        let after = rustix::fs::statx(&file, "", AtFlags::EMPTY_PATH, STATX)
            .map_err(|e| unread(&seen, e.into()))?;
        if fingerprint(&after) != fingerprint(&before) {
            seen = after;
            continue;
        }
        return Ok(Content {
            st: after,
            hash,
            xattrs,
        });
    }
    Err(unread(&seen, InspectError::Unstable(ATTEMPTS)))
}

/// A digest over the sorted extended attribute names and values (POSIX ACLs
/// are xattrs too), `None` when there are none. Never stores the values
/// themselves. A file system found without extended attributes (`ENOTSUP`)
/// is not asked again. One that cannot be read is an error, never a digest
/// of what could be.
fn xattrs_digest(fd: &OwnedFd, dev: u64) -> Result<Option<String>, InspectError> {
    if NO_XATTRS.with_borrow(|no| no.contains(&dev)) {
        return Ok(None);
    }
    XATTR_BUF.with_borrow_mut(|(names, value)| {
        let n = match rustix::fs::flistxattr(fd, &mut names[..]) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => {
                NO_XATTRS.with_borrow_mut(|no| no.push(dev));
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(None);
        }
        let mut list: Vec<&[u8]> = names[..n]
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .collect();
        list.sort_unstable();
        let mut hasher = blake3::Hasher::new();
        for name in list {
            let Ok(cname) = std::ffi::CString::new(name) else {
                continue;
            };
            let len = match rustix::fs::fgetxattr(fd, cname.as_c_str(), &mut value[..]) {
                Ok(len) => len,
                // Removed since it was listed.
                Err(Errno::NODATA) => continue,
                Err(e) => return Err(e.into()),
            };
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name);
            hasher.update(&(len as u64).to_le_bytes());
            hasher.update(&value[..len]);
        }
        Ok(Some(hasher.finalize().to_hex().to_string()))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn all() -> Vec<Attribute> {
        Attribute::ALL.to_vec()
    }

    #[test]
    fn symlinks_never_lead_outside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "outside").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/secret"), "inside").unwrap();
        // An absolute symlink in the host root: means the host's own path.
        symlink(outside.path().join("secret"), root.path().join("etc/abs")).unwrap();
        symlink("../../../../../../etc/secret", root.path().join("etc/rel")).unwrap();
        symlink("/etc", root.path().join("etcdir")).unwrap();
        let host = HostRoot::open(root.path()).unwrap();
        let mut n = 0;
        // The link itself is recorded, with its target, not followed.
        let abs = host
            .inspect(Path::new("etc/abs"), &all(), &mut n)
            .unwrap()
            .unwrap();
        assert_eq!(abs.file_type, Some(FileType::Symlink));
        assert!(abs.hash.is_none());
        // Through a directory symlink, resolution stays in the root.
        let via = host
            .inspect(Path::new("etcdir/secret"), &all(), &mut n)
            .unwrap()
            .unwrap();
        assert_eq!(via.hash, Some(blake3::hash(b"inside").to_hex().to_string()));
        let escaping = root.path().join("etc/abs-dir");
        symlink(outside.path(), &escaping).unwrap();
        let through = host
            .inspect(Path::new("etc/abs-dir/secret"), &all(), &mut n)
            .unwrap();
        assert!(
            through.is_none(),
            "an absolute link resolves inside the root, where nothing is"
        );
    }

    #[test]
    fn without_openat2_no_symlink_or_dot_dot_leads_outside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "outside").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/sub")).unwrap();
        std::fs::write(root.path().join("etc/sub/f"), "inside").unwrap();
        symlink(outside.path(), root.path().join("etc/out")).unwrap();
        symlink(outside.path().join("secret"), root.path().join("etc/abs")).unwrap();
        let host = HostRoot::open(root.path()).unwrap();
        let read = |rel: &str, flags: OFlags| -> Result<String, Errno> {
            let fd = open_beneath(&host.fd, Path::new(rel), flags | OFlags::CLOEXEC)?;
            Ok(std::io::read_to_string(std::fs::File::from(fd)).unwrap())
        };
        let file = OFlags::RDONLY | OFlags::NOFOLLOW;
        assert_eq!(read("etc/sub/f", file).unwrap(), "inside");
        assert_eq!(read("/etc/./sub/f", file).unwrap(), "inside");
        assert_eq!(read("etc/out/secret", file), Err(Errno::NOTDIR));
        assert_eq!(read("etc/abs", file), Err(Errno::LOOP));
        let up = format!("etc/{}/secret", "../".repeat(20));
        assert_eq!(read(&up, file), Err(Errno::XDEV));
        let dir = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW;
        assert!(open_beneath(&host.fd, Path::new(""), dir).is_ok());
        assert!(open_beneath(&host.fd, Path::new("etc/sub"), dir).is_ok());
        assert_eq!(
            open_beneath(&host.fd, Path::new("etc/out"), dir).err(),
            Some(Errno::NOTDIR)
        );
    }

    #[test]
    fn special_files_are_not_opened_and_loops_are_errors() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            RawType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        symlink("loop2", root.path().join("loop1")).unwrap();
        symlink("loop1", root.path().join("loop2")).unwrap();
        let host = HostRoot::open(root.path()).unwrap();
        let mut n = 0;
        let f = host
            .inspect(Path::new("fifo"), &all(), &mut n)
            .unwrap()
            .unwrap();
        assert_eq!(f.file_type, Some(FileType::Fifo));
        assert!(f.hash.is_none());
        // The loop itself is a symlink (not followed); going through it is an error.
        assert!(
            host.inspect(Path::new("loop1"), &all(), &mut n)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            host.inspect(Path::new("loop1/x"), &all(), &mut n),
            Err(InspectError::Loop)
        );
    }

    #[test]
    fn sparse_files_hash_and_missing_files_are_none() {
        let root = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(root.path().join("sparse")).unwrap();
        f.set_len(8 << 20).unwrap();
        let host = HostRoot::open(root.path()).unwrap();
        let mut n = 0;
        let a = host
            .inspect(Path::new("sparse"), &all(), &mut n)
            .unwrap()
            .unwrap();
        assert_eq!(a.size, Some(8 << 20));
        assert_eq!(
            a.hash,
            Some(blake3::hash(&vec![0u8; 8 << 20]).to_hex().to_string())
        );
        assert_eq!(n, 8 << 20);
        assert!(
            host.inspect(Path::new("nope/none"), &all(), &mut n)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_batch_answers_each_item_in_order_and_stays_in_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "outside").unwrap();
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(etc.join("sub")).unwrap();
        for i in 0..200 {
            std::fs::write(etc.join(format!("f{i:03}")), format!("content {i}")).unwrap();
        }
        std::fs::write(root.path().join("etc/secret"), "inside").unwrap();
        symlink(outside.path(), root.path().join("escape")).unwrap();
        symlink("/etc", root.path().join("etcdir")).unwrap();
        symlink("loop2", root.path().join("loop1")).unwrap();
        symlink("loop1", root.path().join("loop2")).unwrap();
        let mut host = HostRoot::open(root.path()).unwrap();
        host.set_threads(2);
        let want = all();
        let mut paths: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("etc/f{i:03}")))
            .collect();
        paths.extend(
            [
                "escape/secret",
                "etcdir/secret",
                "etc/missing",
                "loop1/x",
                "etc/sub",
                "",
            ]
            .map(PathBuf::from),
        );
        let mut items: Vec<Item> = paths.iter().map(|p| Item::of(p, &want)).collect();
        // A name that is not a bare name never resolves above its directory.
        items.push(Item {
            dir: Path::new("etc"),
            name: OsStr::new(".."),
            want: &want,
        });
        items.push(Item {
            dir: Path::new("etc"),
            name: OsStr::new("sub/../../escape"),
            want: &want,
        });
        let mut n = 0;
        let got = host.inspect_batch(&items, &mut n);
        assert_eq!(got.len(), items.len());
        for (i, r) in got[..200].iter().enumerate() {
            let content = format!("content {i}");
            let a = r.as_ref().unwrap().as_ref().unwrap();
            assert_eq!(
                a.hash,
                Some(blake3::hash(content.as_bytes()).to_hex().to_string())
            );
            assert_eq!(a.size, Some(content.len() as u64));
        }
        let tail = &got[200..];
        assert_eq!(
            tail[0],
            Ok(None),
            "an absolute link resolves inside the root"
        );
        let via = tail[1].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(via.hash, Some(blake3::hash(b"inside").to_hex().to_string()));
        assert_eq!(tail[2], Ok(None));
        assert_eq!(tail[3], Err(InspectError::Loop));
        assert_eq!(
            tail[4].as_ref().unwrap().as_ref().unwrap().file_type,
            Some(FileType::Directory)
        );
        assert_eq!(
            tail[5].as_ref().unwrap().as_ref().unwrap().file_type,
            Some(FileType::Directory),
            "the root itself"
        );
        assert!(matches!(tail[6], Err(InspectError::Io(_))), "{:?}", tail[6]);
        assert!(matches!(tail[7], Err(InspectError::Io(_))), "{:?}", tail[7]);
        // The same answers one at a time, on the caller's thread.
        let mut m = 0;
        for (p, batch) in paths.iter().zip(&got) {
            assert_eq!(&host.inspect(p, &want, &mut m), batch, "{}", p.display());
        }
        assert_eq!(n, m);
        // Handed over without waiting, two batches at once: the same answers.
        let owned: Vec<OwnedItem> = paths
            .iter()
            .map(|p| OwnedItem::of(p, want.clone().into()))
            .collect();
        let first = host.spawn_batch(owned[..100].to_vec());
        let second = host.spawn_batch(owned[100..].to_vec());
        let mut k = 0;
        let mut spawned = first.wait(&mut k);
        spawned.extend(second.wait(&mut k));
        assert_eq!(spawned, got[..paths.len()]);
        assert_eq!(k, n);
    }

    #[test]
    fn a_leased_file_keeps_its_metadata_and_says_why_its_content_is_not_read() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("leased");
        std::fs::write(&path, "secret").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        let host = HostRoot::open(root.path()).unwrap();
        let mut n = 0;
        let readable = host
            .inspect(Path::new("leased"), &all(), &mut n)
            .unwrap()
            .unwrap();
        let lease = kube_fim_testkit::lease::Lease::take(&path);
        let started = std::time::Instant::now();
        let leased = host
            .inspect(Path::new("leased"), &all(), &mut n)
            .unwrap()
            .unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "waited"
        );
        assert_eq!(
            leased.unreadable.as_deref(),
            Some("EWOULDBLOCK: held under a lease by another process")
        );
        // No hash, no extended attributes; everything else is the file's.
        let metadata = FileAttributes {
            hash: None,
            xattrs: None,
            unreadable: leased.unreadable.clone(),
            ..readable.clone()
        };
        assert_eq!(leased, metadata);
        drop(lease);
        let again = host
            .inspect(Path::new("leased"), &all(), &mut n)
            .unwrap()
            .unwrap();
        assert_eq!(again.hash, readable.hash);
        assert_eq!(again.unreadable, None);
    }

    #[test]
    fn a_file_changing_faster_than_it_is_hashed_is_unreadable_never_a_digest() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("churning");
        std::fs::write(&path, vec![b'a'; 32 << 20]).unwrap();
        let host = HostRoot::open(root.path()).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Its times change without end while it is read.
        let toucher = {
            let (stop, path) = (Arc::clone(&stop), path.clone());
            std::thread::spawn(move || {
                let file = std::fs::File::options().write(true).open(&path).unwrap();
                let mut t = std::time::SystemTime::UNIX_EPOCH;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    t += std::time::Duration::from_secs(1);
                    file.set_modified(t).unwrap();
                }
            })
        };
        let first = std::fs::metadata(&path).unwrap().modified().unwrap();
        while std::fs::metadata(&path).unwrap().modified().unwrap() == first {
            std::thread::yield_now();
        }
        let mut n = 0;
        let got = host.inspect(Path::new("churning"), &all(), &mut n);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        toucher.join().unwrap();
        let a = got.unwrap().unwrap();
        assert_eq!(a.hash, None);
        assert_eq!(
            a.unreadable.as_deref(),
            Some("changed while being hashed (3 attempts)")
        );
        assert_eq!(
            (a.size, a.file_type),
            (Some(32 << 20), Some(FileType::File))
        );
    }

    #[test]
    fn a_file_written_while_hashed_is_hashed_again() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("growing");
        std::fs::write(&path, vec![b'a'; 1 << 20]).unwrap();
        let host = HostRoot::open(root.path()).unwrap();
        let want = [Attribute::Hash, Attribute::Size];
        let dir = host.open_dir(Path::new("")).unwrap();
        // Looked at before a write: the read sees a newer file and retries.
        let stale = rustix::fs::statx(&dir, "growing", LOOK, STATX).unwrap();
        std::fs::write(&path, vec![b'b'; 1 << 19]).unwrap();
        let mut n = 0;
        let Ok(content) = read_file(&dir, OsStr::new("growing"), &stale, &want, &mut n) else {
            unreachable!("the file can be read")
        };
        assert_eq!(
            content.hash,
            Some(blake3::hash(&vec![b'b'; 1 << 19]).to_hex().to_string())
        );
        assert_eq!(content.st.stx_size, 1 << 19);
    }
}
