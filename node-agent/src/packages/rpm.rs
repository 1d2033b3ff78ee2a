//! The rpm database of current RHEL, Fedora and SUSE: the SQLite
//! `/var/lib/rpm/rpmdb.sqlite`, table `Packages(hnum, blob)`, one rpm header
//! per installed package. A header blob (without the lead magic): the count
//! of index entries and the length of the data, both big-endian `u32`, then
//! the entries (tag, type, offset into the data, count: four big-endian
//! `u32`), then the data.
//!
//! The database is opened read-only and immutable (`?immutable=1`: no lock
//! taken, no journal read or written), through `/proc/self/fd` of a
//! descriptor opened inside the host root: nothing of the node's is written,
//! and a symlink in the host cannot lead it elsewhere.

use std::path::Path;

use super::{DbError, Index, Owner, Recorded, Scope};
use crate::hostfs::HostRoot;

/// The files whose inode, size and mtime say the database changed (the
/// database first). rpm writes through a write-ahead log and folds it in
/// when it closes; an immutable open reads the main file only, so a
/// transaction still in the log is seen once rpm folds it in.
pub const STAMPED: [&str; 2] = ["var/lib/rpm/rpmdb.sqlite", "var/lib/rpm/rpmdb.sqlite-wal"];

/// A database larger than this is refused.
const DB_MAX: u64 = 2 << 30;
/// One header larger than this is corrupt (rpm's own limit is 256 MiB).
const HEADER_MAX: usize = 256 << 20;
/// Paths indexed at most.
const PATHS_MAX: usize = 4_000_000;

const NAME: u32 = 1000;
const VERSION: u32 = 1001;
const RELEASE: u32 = 1002;
const EPOCH: u32 = 1003;
const FILEDIGESTS: u32 = 1035;
const FILEFLAGS: u32 = 1037;
const DIRINDEXES: u32 = 1116;
const BASENAMES: u32 = 1117;
const DIRNAMES: u32 = 1118;
const FILEDIGESTALGO: u32 = 5011;

const INT32: u32 = 4;
const STRING: u32 = 6;
const STRING_ARRAY: u32 = 8;
const I18NSTRING: u32 = 9;

/// `%config` in FILEFLAGS.
const RPMFILE_CONFIG: u32 = 1;

/// The digest algorithms of FILEDIGESTALGO (RFC 4880 numbers), MD5 when absent.
const ALGO_MD5: u32 = 1;
const ALGO_SHA256: u32 = 8;
const ALGO_SHA512: u32 = 10;

/// One installed package as its header says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    /// `[epoch:]version-release`.
    pub version: String,
    /// Absolute path, hex digest (empty for what has no content), `%config`.
    pub files: Vec<(Vec<u8>, String, bool)>,
    pub algo: u32,
}

struct Entry {
    tag: u32,
    kind: u32,
    offset: usize,
    count: usize,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn corrupt(why: &str) -> DbError {
    DbError::Corrupt(format!("rpm header: {why}"))
}

/// Parses a header blob.
pub fn parse_header(blob: &[u8]) -> Result<Header, DbError> {
    if blob.len() > HEADER_MAX {
        return Err(corrupt("too large"));
    }
    let il = be32(blob, 0).ok_or_else(|| corrupt("truncated"))? as usize;
    let dl = be32(blob, 4).ok_or_else(|| corrupt("truncated"))? as usize;
    let start = il
        .checked_mul(16)
        .and_then(|n| n.checked_add(8))
        .ok_or_else(|| corrupt("index count"))?;
    let data = blob
        .get(
            start
                ..start
                    .checked_add(dl)
                    .ok_or_else(|| corrupt("data length"))?,
        )
        .ok_or_else(|| corrupt("shorter than its index says"))?;
    let mut entries = Vec::with_capacity(il.min(1024));
    for i in 0..il {
        let at = 8 + i * 16;
        let field = |k: usize| be32(blob, at + 4 * k).ok_or_else(|| corrupt("truncated index"));
        entries.push(Entry {
            tag: field(0)?,
            kind: field(1)?,
            offset: field(2)? as usize,
            count: field(3)? as usize,
        });
    }
    let find = |tag: u32| entries.iter().find(|e| e.tag == tag);
    let strings = |tag: u32| -> Result<Vec<&[u8]>, DbError> {
        let Some(e) = find(tag) else {
            return Ok(Vec::new());
        };
        if !matches!(e.kind, STRING | STRING_ARRAY | I18NSTRING) {
            return Err(corrupt("a string tag of another type"));
        }
        let mut rest = data.get(e.offset..).ok_or_else(|| corrupt("offset"))?;
        let mut out = Vec::with_capacity(e.count.min(rest.len()));
        for _ in 0..e.count {
            let end = rest
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| corrupt("unterminated string"))?;
            out.push(&rest[..end]);
            rest = &rest[end + 1..];
        }
        Ok(out)
    };
    let ints = |tag: u32| -> Result<Vec<u32>, DbError> {
        let Some(e) = find(tag) else {
            return Ok(Vec::new());
        };
        if e.kind != INT32 {
            return Err(corrupt("an integer tag of another type"));
        }
        (0..e.count)
            .map(|i| be32(data, e.offset + 4 * i).ok_or_else(|| corrupt("integer offset")))
            .collect()
    };
    let text = |tag: u32| -> Result<String, DbError> {
        Ok(strings(tag)?
            .first()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default())
    };
    let name = text(NAME)?;
    let version = match (ints(EPOCH)?.first(), text(VERSION)?, text(RELEASE)?) {
        (Some(e), v, r) => format!("{e}:{v}-{r}"),
        (None, v, r) => format!("{v}-{r}"),
    };
    let algo = ints(FILEDIGESTALGO)?.first().copied().unwrap_or(ALGO_MD5);
    let basenames = strings(BASENAMES)?;
    let dirnames = strings(DIRNAMES)?;
    let dirindexes = ints(DIRINDEXES)?;
    let digests = strings(FILEDIGESTS)?;
    let flags = ints(FILEFLAGS)?;
    if dirindexes.len() != basenames.len()
        || (!digests.is_empty() && digests.len() != basenames.len())
    {
        return Err(corrupt("file lists of different lengths"));
    }
    let mut files = Vec::with_capacity(basenames.len());
    for (i, base) in basenames.iter().enumerate() {
        let dir = dirnames
            .get(dirindexes[i] as usize)
            .ok_or_else(|| corrupt("directory index"))?;
        let path = [*dir, *base].concat();
        let digest = digests
            .get(i)
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .unwrap_or_default();
        let config = flags.get(i).is_some_and(|f| f & RPMFILE_CONFIG != 0);
        files.push((path, digest, config));
    }
    Ok(Header {
        name,
        version,
        files,
        algo,
    })
}

/// Indexes the rpm database under `root`.
pub fn index(root: &HostRoot, scope: &Scope) -> Result<Index, DbError> {
    let rel = STAMPED[0];
    let file = root
        .open_file(Path::new(rel))
        .map_err(|why| DbError::Read {
            path: format!("/{rel}"),
            why,
        })?;
    let Some(file) = file else {
        return Ok(Index::default());
    };
    let size = file
        .metadata()
        .map_err(|why| DbError::Io {
            path: format!("/{rel}"),
            why,
        })?
        .len();
    if size > DB_MAX {
        return Err(DbError::TooLarge(format!("/{rel}")));
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let uri = format!("file:/proc/self/fd/{fd}?immutable=1&mode=ro");
    let db = rusqlite::Connection::open_with_flags(
        uri,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_URI
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut stmt = db.prepare("SELECT blob FROM Packages")?;
    let mut rows = stmt.query([])?;
    let mut index = Index {
        scope: scope.clone(),
        ..Index::default()
    };
    while let Some(row) = rows.next()? {
        let blob = row
            .get_ref(0)?
            .as_blob()
            .map_err(|_| corrupt("a Packages row that is not a blob"))?;
        let header = parse_header(blob)?;
        if header.files.is_empty() {
            // gpg-pubkey and other packages without files.
            continue;
        }
        let number = index.add_package(header.name, header.version);
        for (path, hex, config) in header.files {
            if hex.is_empty() {
                // Directories, links, %ghost files: no content recorded.
                continue;
            }
            let digest = match (header.algo, Recorded::from_hex(&hex)) {
                (ALGO_MD5, Some(d @ Recorded::Md5(_)))
                | (ALGO_SHA256, Some(d @ Recorded::Sha256(_)))
                | (ALGO_SHA512, Some(d @ Recorded::Sha512(_))) => d,
                // SHA-1 and others: not verified (an ordinary change).
                (ALGO_MD5 | ALGO_SHA256 | ALGO_SHA512, _) => {
                    return Err(corrupt("a file digest of the wrong length"));
                }
                _ => continue,
            };
            index.add_file(
                &path,
                Owner {
                    package: number,
                    digest,
                    config,
                },
            );
        }
        if index.files.len() > PATHS_MAX {
            return Err(DbError::TooLarge(format!("/{rel}")));
        }
    }
    drop(rows);
    drop(stmt);
    drop(db);
    drop(file);
    Ok(index)
}
