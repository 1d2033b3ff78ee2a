//! Package verification: is a changed file's new content what an installed
//! package recorded for its path?
//!
//! The node's package databases are read through the host root
//! ([`crate::hostfs`]), never written or locked: dpkg's `/var/lib/dpkg`
//! ([`dpkg`]) and rpm's SQLite `rpmdb.sqlite` ([`rpm`]). Each is indexed on
//! the first change that needs it (path → owning package and its recorded
//! digest) and kept until the database's files change (inode, size, mtime),
//! so an upgrade refreshes it and the versions known before the refresh say
//! what was upgraded from. A database that cannot be read is reported once
//! and leaves its changes unverified (ordinary changes) until it changes.
//!
//! A changed regular file whose path an installed package owns gets
//! `spec.package`: `Verified` when its content has the digest a package
//! recorded (read once more, in the package's digest kind, together with a
//! BLAKE3 that must equal the change's `after.hash`, so the content verified
//! is the content reported), `Mismatch` when it has none of them. A package's
//! configuration file (dpkg conffile, rpm `%config`) is the admin's to edit:
//! it is `Verified` when unchanged from the package, and otherwise an
//! ordinary change, never a Mismatch.

pub mod dpkg;
pub mod rpm;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kube_fim_crds::{
    ChangeCategory, FileChangeSpec, FileType, PackageCheck, PackageManager, PackageVerdict,
};
use md5::Digest as _;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::hostfs::{HostRoot, InspectError};
use crate::paths;
use crate::telemetry::Telemetry;

/// Why a package database could not be indexed.
#[derive(Debug, Error)]
pub enum DbError {
    #[error("{path}: {why}")]
    Read { path: String, why: InspectError },
    #[error("{path}: {why}")]
    Io { path: String, why: std::io::Error },
    #[error("{0}: larger than the agent indexes")]
    TooLarge(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// A digest a package recorded for a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Md5([u8; 16]),
    Sha256([u8; 32]),
    Sha512(Box<[u8; 64]>),
}

/// Which digest a [`Recorded`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Md5,
    Sha256,
    Sha512,
}

impl Recorded {
    fn kind(&self) -> Kind {
        match self {
            Recorded::Md5(_) => Kind::Md5,
            Recorded::Sha256(_) => Kind::Sha256,
            Recorded::Sha512(_) => Kind::Sha512,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Recorded::Md5(d) => d,
            Recorded::Sha256(d) => d,
            Recorded::Sha512(d) => &d[..],
        }
    }

    /// From hex text, in the kind its length says (MD5, SHA-256, SHA-512).
    pub fn from_hex(hex: &str) -> Option<Recorded> {
        fn decode<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
            let mut out = [0u8; N];
            for (i, pair) in hex.chunks_exact(2).enumerate() {
                let hi = (pair[0] as char).to_digit(16)?;
                let lo = (pair[1] as char).to_digit(16)?;
                *out.get_mut(i)? = (hi * 16 + lo) as u8;
            }
            Some(out)
        }
        let b = hex.as_bytes();
        match b.len() {
            32 => decode::<16>(b).map(Recorded::Md5),
            64 => decode::<32>(b).map(Recorded::Sha256),
            128 => decode::<64>(b).map(|d| Recorded::Sha512(Box::new(d))),
            _ => None,
        }
    }
}

/// One installed package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// A package's record of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Index into [`Index::packages`].
    pub package: u32,
    pub digest: Recorded,
    /// A configuration file: the admin's to edit (never a Mismatch).
    pub config: bool,
}

/// The host paths an index keeps: those at or below a monitored entry (all
/// when empty). A node's whole dpkg database is ~100,000 paths; the
/// recommended entries hold a few thousand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope(Vec<Vec<u8>>);

impl Scope {
    /// The scope of absolute `bases`.
    pub fn new(bases: impl IntoIterator<Item = Vec<u8>>) -> Self {
        let mut v: Vec<Vec<u8>> = bases.into_iter().collect();
        v.sort();
        v.dedup();
        Scope(v)
    }

    fn keeps_exactly(&self, path: &[u8]) -> bool {
        self.0.iter().any(|b| {
            b.as_slice() == b"/"
                || path
                    .strip_prefix(b.as_slice())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
        })
    }

    /// Whether `path`, or its merged-/usr alias, is in scope.
    pub fn keeps(&self, path: &[u8]) -> bool {
        self.0.is_empty()
            || self.keeps_exactly(path)
            || usr_alias(path).is_some_and(|a| self.keeps_exactly(&a))
    }
}

/// `/bin/x` for `/usr/bin/x` and the other way round, for the directories
/// merged-/usr systems link (`/bin`, `/sbin`, `/lib*`).
fn usr_alias(path: &[u8]) -> Option<Vec<u8>> {
    let alias: Vec<u8> = if let Some(rest) = path.strip_prefix(b"/usr") {
        rest.to_vec()
    } else {
        [b"/usr".as_slice(), path].concat()
    };
    let merged = [
        b"/bin/".as_slice(),
        b"/sbin/",
        b"/lib/",
        b"/lib64/",
        b"/lib32/",
    ];
    let short = alias.strip_prefix(b"/usr").unwrap_or(&alias);
    merged.iter().any(|m| short.starts_with(m)).then_some(alias)
}

/// The files of one package database: who owns which path, with what digest.
#[derive(Debug, Default)]
pub struct Index {
    pub packages: Vec<Package>,
    /// Absolute host path (bytes) → its owners (usually one).
    pub files: HashMap<Box<[u8]>, Vec<Owner>>,
    /// A transaction is under way (dpkg's journal holds entries): a file
    /// may be in place before its digest is recorded, so a content that
    /// matches none is no verdict (an ordinary change), not a Mismatch.
    pub busy: bool,
    /// The paths kept ([`Index::add_file`] drops the others).
    pub scope: Scope,
}

impl Index {
    /// Adds a package, returning its number.
    pub fn add_package(&mut self, name: String, version: String) -> u32 {
        self.packages.push(Package { name, version });
        (self.packages.len() - 1) as u32
    }

    /// Records that `package` owns `path` with `digest` (if in scope).
    pub fn add_file(&mut self, path: &[u8], owner: Owner) {
        if !self.scope.keeps(path) {
            return;
        }
        match self.files.get_mut(path) {
            Some(owners) => owners.push(owner),
            None => {
                self.files.insert(path.into(), vec![owner]);
            }
        }
    }

    /// The owners of `path`, also through the merged-/usr aliases when the
    /// root's `/bin` is a link to `usr/bin`.
    fn owners(&self, path: &[u8], usr_merged: bool) -> Option<&[Owner]> {
        if let Some(o) = self.files.get(path) {
            return Some(o);
        }
        if !usr_merged {
            return None;
        }
        let alias = usr_alias(path)?;
        self.files.get(alias.as_slice()).map(Vec::as_slice)
    }

    /// Heap bytes of the index, roughly (for the log and the benchmark).
    pub fn approx_bytes(&self) -> usize {
        let per_entry = std::mem::size_of::<(Box<[u8]>, Vec<Owner>)>() + 8;
        let owner = std::mem::size_of::<Owner>();
        self.files
            .iter()
            .map(|(k, v)| k.len() + v.capacity() * owner + per_entry)
            .sum::<usize>()
            + self
                .packages
                .iter()
                .map(|p| p.name.len() + p.version.len() + std::mem::size_of::<Package>())
                .sum::<usize>()
    }
}

/// What says a database was rewritten: inode, size and mtime of its files.
type Stamp = Vec<Option<(u64, u64, i128)>>;

/// One package database, indexed on demand.
struct Source {
    manager: PackageManager,
    /// The stamp the index (or the failure) is of.
    stamp: Option<Stamp>,
    index: Option<Arc<Index>>,
    /// Per package, the version it had before its version last changed.
    before: HashMap<String, String>,
    /// The paths the index keeps.
    scope: Scope,
}

impl Source {
    fn new(manager: PackageManager) -> Self {
        Source {
            manager,
            stamp: None,
            index: None,
            before: HashMap::new(),
            scope: Scope::default(),
        }
    }

    fn stamp(&self, root: &HostRoot) -> Result<Option<Stamp>, InspectError> {
        let files: &[&str] = match self.manager {
            PackageManager::Dpkg => &dpkg::STAMPED,
            PackageManager::Rpm => &rpm::STAMPED,
        };
        let stamp = files
            .iter()
            .map(|f| root.stamp(Path::new(f)))
            .collect::<Result<Stamp, _>>()?;
        // No main file: no such database on this node.
        Ok(stamp.first().copied().flatten().map(|_| stamp))
    }

    /// The index of the database as it is now, `None` when the node has no
    /// such database or it cannot be read (reported once per state of it).
    fn current(&mut self, root: &HostRoot, telemetry: &Telemetry) -> Option<Arc<Index>> {
        let manager = self.manager.as_str();
        let stamp = match self.stamp(root) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.index = None;
                self.stamp = None;
                return None;
            }
            Err(why) => {
                debug!(manager, %why, "package database not looked at");
                return self.index.clone();
            }
        };
        if self.stamp.as_ref() == Some(&stamp) {
            return self.index.clone();
        }
        let started = Instant::now();
        let built = match self.manager {
            PackageManager::Dpkg => dpkg::index(root, &self.scope),
            PackageManager::Rpm => rpm::index(root, &self.scope),
        };
        self.stamp = Some(stamp);
        match built {
            Ok(index) => {
                info!(
                    manager,
                    packages = index.packages.len(),
                    paths = index.files.len(),
                    approx_bytes = index.approx_bytes(),
                    seconds = started.elapsed().as_secs_f64(),
                    "package database indexed"
                );
                if let Some(old) = &self.index {
                    // A package whose version moved keeps the one it had; one
                    // that did not keeps what it was upgraded from (a
                    // transaction rewrites the database many times).
                    let now: HashMap<&str, &str> = index
                        .packages
                        .iter()
                        .map(|p| (p.name.as_str(), p.version.as_str()))
                        .collect();
                    for p in &old.packages {
                        if now.get(p.name.as_str()) != Some(&p.version.as_str()) {
                            self.before.insert(p.name.clone(), p.version.clone());
                        }
                    }
                }
                self.index = Some(Arc::new(index));
            }
            Err(error) => {
                // Once per state of the database: the stamp is kept.
                warn!(manager, %error, "package database unreadable: changes are not package-verified until it changes");
                telemetry.package_database_failed(manager);
                self.index = None;
            }
        }
        self.index.clone()
    }
}

/// The node's package databases.
pub struct Packages {
    root: Option<HostRoot>,
    sources: Vec<Source>,
}

impl Packages {
    /// The package databases under the host root `root`.
    pub fn new(root: &Path) -> Self {
        let root = HostRoot::open(root)
            .map_err(|error| warn!(%error, "package verification off: the root cannot be opened"))
            .ok();
        Packages {
            root,
            sources: vec![
                Source::new(PackageManager::Dpkg),
                Source::new(PackageManager::Rpm),
            ],
        }
    }

    /// Indexes only the paths in `scope` from now on (the served entries).
    pub fn set_scope(&mut self, scope: Scope) {
        for s in &mut self.sources {
            if s.scope != scope {
                s.scope = scope.clone();
                // Indexed again when next needed; the versions known stay.
                s.stamp = None;
            }
        }
    }

    /// Puts `spec.package` on each added or modified regular file that an
    /// installed package owns, and counts the verdicts.
    pub fn verify(&mut self, changes: &mut [FileChangeSpec], telemetry: &Telemetry) {
        let Some(root) = &self.root else { return };
        let wanted = |c: &FileChangeSpec| {
            matches!(c.category, ChangeCategory::Added | ChangeCategory::Modified)
                && c.package.is_none()
                && c.after
                    .as_ref()
                    .is_some_and(|a| a.file_type == Some(FileType::File) && a.hash.is_some())
        };
        if !changes.iter().any(wanted) {
            return;
        }
        let indexes: Vec<(PackageManager, Arc<Index>, &HashMap<String, String>)> = self
            .sources
            .iter_mut()
            .filter_map(|s| {
                let index = s.current(root, telemetry)?;
                Some((s.manager, index, &s.before))
            })
            .collect();
        if indexes.is_empty() {
            return;
        }
        let usr_merged = std::fs::symlink_metadata(root.path().join("bin"))
            .is_ok_and(|m| m.file_type().is_symlink());
        for c in changes.iter_mut().filter(|c| wanted(c)) {
            let path = paths::unescape(&c.path);
            let path = path.as_bytes().to_vec();
            for (manager, index, before) in &indexes {
                let Some(owners) = index.owners(&path, usr_merged) else {
                    continue;
                };
                let expected = c.after.as_ref().and_then(|a| a.hash.as_deref());
                let check = match check(root, &path, expected, owners, index.busy) {
                    Ok(Some(check)) => check,
                    Ok(None) => break,
                    Err(why) => {
                        debug!(path = %c.path, %why, "not package-verified");
                        break;
                    }
                };
                let (package, verdict) = check;
                let p = &index.packages[package as usize];
                telemetry.package_checked(&c.policy, manager.as_str(), verdict.as_str());
                c.package = Some(PackageCheck {
                    manager: *manager,
                    name: p.name.clone(),
                    version: p.version.clone(),
                    version_before: before.get(&p.name).filter(|v| **v != p.version).cloned(),
                    verdict,
                    transaction: None,
                });
                break;
            }
        }
    }
}

/// The verdict on `path` against its `owners`: the package whose digest the
/// content has (Verified), or the first non-config owner (Mismatch), or
/// `None` when only config files disagree or the file moved on since it was
/// hashed (its next change is checked).
fn check(
    root: &HostRoot,
    path: &[u8],
    expected: Option<&str>,
    owners: &[Owner],
    busy: bool,
) -> Result<Option<(u32, PackageVerdict)>, InspectError> {
    let rel = PathBuf::from(OsStr::from_bytes(path));
    let rel = rel.strip_prefix("/").unwrap_or(&rel);
    let Some(file) = root.open_file(rel)? else {
        return Ok(None);
    };
    let mut kinds: Vec<Kind> = owners.iter().map(|o| o.digest.kind()).collect();
    kinds.dedup();
    let (digests, blake3) = digest(file, &kinds)?;
    if expected.is_some_and(|e| e != blake3) {
        return Ok(None);
    }
    for o in owners {
        if digests
            .iter()
            .any(|(k, d)| *k == o.digest.kind() && d.as_slice() == o.digest.bytes())
        {
            return Ok(Some((o.package, PackageVerdict::Verified)));
        }
    }
    if busy {
        return Ok(None);
    }
    Ok(owners
        .iter()
        .find(|o| !o.config)
        .map(|o| (o.package, PackageVerdict::Mismatch)))
}

/// Digests of one content, by kind.
type Digests = Vec<(Kind, Vec<u8>)>;

/// The digests of `kinds` and the BLAKE3 of one read of `file`.
fn digest(mut file: std::fs::File, kinds: &[Kind]) -> Result<(Digests, String), InspectError> {
    let mut md5 = kinds.contains(&Kind::Md5).then(md5::Md5::new);
    let mut sha256 = kinds.contains(&Kind::Sha256).then(sha2::Sha256::new);
    let mut sha512 = kinds.contains(&Kind::Sha512).then(sha2::Sha512::new);
    let mut b3 = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(InspectError::Io(e.to_string())),
        };
        let chunk = &buf[..n];
        b3.update(chunk);
        if let Some(h) = md5.as_mut() {
            h.update(chunk);
        }
        if let Some(h) = sha256.as_mut() {
            h.update(chunk);
        }
        if let Some(h) = sha512.as_mut() {
            h.update(chunk);
        }
    }
    let mut out = Vec::new();
    if let Some(h) = md5 {
        out.push((Kind::Md5, h.finalize().to_vec()));
    }
    if let Some(h) = sha256 {
        out.push((Kind::Sha256, h.finalize().to_vec()));
    }
    if let Some(h) = sha512 {
        out.push((Kind::Sha512, h.finalize().to_vec()));
    }
    Ok((out, b3.finalize().to_hex().to_string()))
}

/// Reads the whole of a database file, at most `max` bytes (more is an
/// error: a database the agent will not hold), `Ok(None)` when absent.
fn read_all(root: &HostRoot, rel: &str, max: u64) -> Result<Option<Vec<u8>>, DbError> {
    let file = root
        .open_file(Path::new(rel))
        .map_err(|why| DbError::Read {
            path: format!("/{rel}"),
            why,
        })?;
    let Some(file) = file else { return Ok(None) };
    let mut out = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|why| DbError::Io {
            path: format!("/{rel}"),
            why,
        })?;
    if out.len() as u64 > max {
        return Err(DbError::TooLarge(format!("/{rel}")));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests;
