//! Reading the host's files through its root directory, never outside it.
//!
//! Every path is opened with `openat2(2)` relative to a descriptor of the host
//! root with `RESOLVE_IN_ROOT`: the kernel resolves `..` and absolute or
//! relative symlinks as if the root were `/`, so a host symlink to
//! `/etc/shadow` means the host's file and nothing can lead outside the root.
//! The last component is never followed (`O_NOFOLLOW`): a symlink is recorded as
//! a symlink with its target. FIFOs, sockets and devices are only ever opened
//! with `O_PATH` (no read, no side effect); regular files are opened
//! non-blocking and hashed from the descriptor that was checked.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{Attribute, FileAttributes, FileType};
use rustix::fs::{Dir, FileType as RawType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use thiserror::Error;

/// Why a file could not be inspected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InspectError {
    #[error("permission denied")]
    PermissionDenied,
    #[error("symlink loop or too many levels of symlinks")]
    Loop,
    #[error("changed while being hashed ({0} attempts)")]
    Unstable(u32),
    #[error("{0}")]
    Io(String),
}

impl From<Errno> for InspectError {
    fn from(e: Errno) -> Self {
        match e {
            Errno::ACCESS | Errno::PERM => InspectError::PermissionDenied,
            Errno::LOOP => InspectError::Loop,
            other => InspectError::Io(std::io::Error::from(other).to_string()),
        }
    }
}

/// The host root, held open.
#[derive(Debug)]
pub struct HostRoot {
    fd: OwnedFd,
    path: PathBuf,
    /// Files larger than this are not hashed (their other attributes are).
    pub max_hash_size: u64,
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
    static READ_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
    static XATTR_BUF: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        std::cell::RefCell::new((vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]));
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

fn file_type(st: &Stat) -> FileType {
    match RawType::from_raw_mode(st.st_mode) {
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

/// Stable facts of a stat, to notice a file changing while it is hashed.
fn fingerprint(st: &Stat) -> (u64, i64, i64, i64, i64, u64) {
    (
        st.st_size as u64,
        st.st_mtime,
        st.st_mtime_nsec as i64,
        st.st_ctime,
        st.st_ctime_nsec as i64,
        st.st_ino,
    )
}

impl HostRoot {
    /// Opens the host root directory.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(HostRoot {
            fd,
            path: path.to_path_buf(),
            max_hash_size: 4 << 30,
        })
    }

    /// The directory standing for the host's `/`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` (relative to the root) inside the root, never following its
    /// last component.
    fn open_in(&self, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        rustix::fs::openat2(
            &self.fd,
            rel,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )
    }

    /// The entries of directory `rel`, or why it cannot be listed.
    pub fn list_dir(&self, rel: &Path) -> Result<Vec<Child>, InspectError> {
        let fd = self.open_in(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let dir = Dir::new(fd)?;
        let mut out = Vec::new();
        for entry in dir {
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

    /// The attributes of `rel` that `want` asks for, `Ok(None)` if it does not
    /// exist. `hashed` is increased by the bytes read for hashing.
    pub fn inspect(
        &self,
        rel: &Path,
        want: &[Attribute],
        hashed: &mut u64,
    ) -> Result<Option<FileAttributes>, InspectError> {
        let fd = match self.open_in(rel, OFlags::PATH) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(&fd)?;
        let kind = file_type(&st);
        let has = |a: Attribute| want.contains(&a);
        let mut attrs = FileAttributes {
            file_type: has(Attribute::Type).then_some(kind),
            size: (has(Attribute::Size) && kind != FileType::Directory)
                .then_some(st.st_size as u64),
            mode: has(Attribute::Mode).then(|| format!("{:04o}", st.st_mode & 0o7777)),
            uid: has(Attribute::Uid).then_some(st.st_uid),
            gid: has(Attribute::Gid).then_some(st.st_gid),
            mtime: if has(Attribute::Mtime) {
                micro_time(st.st_mtime as i64, st.st_mtime_nsec as i64)
            } else {
                None
            },
            ctime: if has(Attribute::Ctime) {
                micro_time(st.st_ctime as i64, st.st_ctime_nsec as i64)
            } else {
                None
            },
            inode: has(Attribute::Inode).then_some(st.st_ino as u64),
            ..FileAttributes::default()
        };
        match kind {
            FileType::Symlink if has(Attribute::LinkTarget) => {
                let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
                attrs.link_target =
                    Some(crate::paths::escape(OsStr::from_bytes(target.as_bytes())));
            }
            FileType::File if has(Attribute::Hash) || has(Attribute::Xattrs) => {
                if st.st_size as u64 > self.max_hash_size {
                    attrs.hash = None;
                } else {
                    self.read_file(rel, &st, &mut attrs, want, hashed)?;
                }
            }
            FileType::Directory if has(Attribute::Xattrs) => {
                if let Ok(dir) = self.open_in(rel, OFlags::RDONLY | OFlags::DIRECTORY) {
                    attrs.xattrs = xattrs_digest(&dir);
                }
            }
            _ => {}
        }
        Ok(Some(attrs))
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

    /// Hashes a regular file from a descriptor checked to be the same file,
    /// retrying when it changes underneath.
    fn read_file(
        &self,
        rel: &Path,
        st: &Stat,
        attrs: &mut FileAttributes,
        want: &[Attribute],
        hashed: &mut u64,
    ) -> Result<(), InspectError> {
        const ATTEMPTS: u32 = 3;
        for _ in 0..ATTEMPTS {
            let fd = match self.open_in(rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    return Err(InspectError::Io("vanished while being read".into()));
                }
                Err(e) => return Err(e.into()),
            };
            let before = rustix::fs::fstat(&fd)?;
            if RawType::from_raw_mode(before.st_mode) != RawType::RegularFile
                || before.st_ino != st.st_ino
            {
                // Replaced between the two opens: look again next time.
                continue;
            }
            if want.contains(&Attribute::Xattrs) {
                attrs.xattrs = xattrs_digest(&fd);
            }
            if want.contains(&Attribute::Hash) {
                let mut file = std::fs::File::from(fd);
                let mut hasher = blake3::Hasher::new();
                let mut n_total = 0u64;
                READ_BUF.with_borrow_mut(|buf| -> Result<(), InspectError> {
                    loop {
                        let n = match file.read(buf) {
                            Ok(0) => return Ok(()),
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(InspectError::Io(e.to_string())),
                        };
                        hasher.update(&buf[..n]);
                        n_total += n as u64;
                    }
                })?;
                *hashed += n_total;
                let after = rustix::fs::fstat(&file)?;
                if fingerprint(&after) != fingerprint(&before) {
                    continue;
                }
                attrs.hash = Some(hasher.finalize().to_hex().to_string());
                if let Some(size) = attrs.size.as_mut() {
                    *size = after.st_size as u64;
                }
            }
            return Ok(());
        }
        Err(InspectError::Unstable(ATTEMPTS))
    }
}

/// A digest over the sorted extended attribute names and values (POSIX ACLs
/// are xattrs too). Never stores the values themselves.
fn xattrs_digest(fd: &OwnedFd) -> Option<String> {
    XATTR_BUF.with_borrow_mut(|(names, value)| {
        let n = rustix::fs::flistxattr(fd, &mut names[..]).ok()?;
        if n == 0 {
            return None;
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
            let len = rustix::fs::fgetxattr(fd, cname.as_c_str(), &mut value[..]).unwrap_or(0);
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name);
            hasher.update(&(len as u64).to_le_bytes());
            hasher.update(&value[..len]);
        }
        Some(hasher.finalize().to_hex().to_string())
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
}
