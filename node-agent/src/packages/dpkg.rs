//! The dpkg database: `/var/lib/dpkg/status` (installed packages, their
//! versions and conffiles with their MD5), `info/<package>[:<arch>].md5sums`
//! (the MD5 of each packaged file, its path relative to `/`) and
//! `diversions` (a packaged file moved aside by another package: its content
//! lives at the diverted path).

use std::collections::HashMap;
use std::path::Path;

use super::{DbError, Index, Owner, Recorded, Scope, read_all};
use crate::hostfs::HostRoot;

/// The files whose inode, size and mtime say the database changed (the
/// status file first: without it there is no dpkg database). `info/` and
/// `updates/` are rewritten by renames, which change the directory's mtime.
pub const STAMPED: [&str; 4] = [
    "var/lib/dpkg/status",
    "var/lib/dpkg/info",
    "var/lib/dpkg/diversions",
    "var/lib/dpkg/updates",
];

/// dpkg's journal: during a transaction each status change is a file
/// `updates/NNNN` holding the package's new stanza, folded into `status`
/// when the transaction ends. A package's files are renamed into place
/// before its new md5sums are: while the journal holds entries, a file
/// matching no digest may be a file whose digest is not written yet.
const UPDATES: &str = "var/lib/dpkg/updates";
/// Journal entries read at most (dpkg folds them in every few hundred).
const UPDATES_MAX: usize = 4096;

/// A status file larger than this is refused (a real one is a few MiB).
const STATUS_MAX: u64 = 256 << 20;
/// One md5sums file larger than this is refused.
const MD5SUMS_MAX: u64 = 64 << 20;
/// Paths indexed at most (a full desktop has a few hundred thousand).
const PATHS_MAX: usize = 4_000_000;

/// One package stanza of the status file (or of a journal entry).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    pub arch: String,
    pub version: String,
    /// Its files are on disk (installed, unpacked, half-configured, ...).
    pub installed: bool,
    /// Conffiles with their MD5 (obsolete ones left out).
    pub conffiles: Vec<(String, String)>,
}

/// The installed packages of a status file (`Status: install ok installed`,
/// and the half-configured states whose files are on disk).
pub fn parse_status(text: &str) -> Vec<Installed> {
    parse_stanzas(text)
        .into_iter()
        .filter(|p| p.installed)
        .collect()
}

/// Every package stanza of a status file or journal entry.
pub fn parse_stanzas(text: &str) -> Vec<Installed> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut p = Installed::default();
        let mut installed = false;
        let mut in_conffiles = false;
        for line in stanza.lines() {
            if let Some(rest) = line.strip_prefix(' ') {
                if in_conffiles {
                    let mut parts = rest.split_whitespace();
                    if let (Some(path), Some(md5)) = (parts.next(), parts.next())
                        && parts.next() != Some("obsolete")
                    {
                        p.conffiles.push((path.to_string(), md5.to_string()));
                    }
                }
                continue;
            }
            in_conffiles = false;
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "Package" => p.name = value.to_string(),
                "Architecture" => p.arch = value.to_string(),
                "Version" => p.version = value.to_string(),
                "Status" => {
                    installed = matches!(
                        value.rsplit(' ').next(),
                        Some(
                            "installed"
                                | "unpacked"
                                | "half-configured"
                                | "triggers-awaited"
                                | "triggers-pending"
                        )
                    );
                }
                "Conffiles" => in_conffiles = true,
                _ => {}
            }
        }
        p.installed = installed;
        if !p.name.is_empty() {
            out.push(p);
        }
    }
    out
}

/// Diversions: the packaged path, where its file lives instead, and the
/// diverting package (`:` for a local diversion).
pub fn parse_diversions(text: &str) -> HashMap<String, (String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks_exact(3)
        .map(|c| (c[0].to_string(), (c[1].to_string(), c[2].to_string())))
        .collect()
}

/// The `(md5 hex, absolute path)` lines of an md5sums file; `None` for a
/// line that is not one.
pub fn parse_md5sums(text: &[u8]) -> impl Iterator<Item = Option<(&str, Vec<u8>)>> {
    text.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let sep = line.iter().position(|b| *b == b' ')?;
            let hex = std::str::from_utf8(&line[..sep]).ok()?;
            let rel = line[sep..].iter().position(|b| *b != b' ')?;
            let rel = &line[sep + rel..];
            let mut path = Vec::with_capacity(rel.len() + 1);
            path.push(b'/');
            path.extend_from_slice(rel.strip_prefix(b"/").unwrap_or(rel));
            Some((hex, path))
        })
}

/// Indexes the dpkg database under `root`.
pub fn index(root: &HostRoot, scope: &Scope) -> Result<Index, DbError> {
    let Some(status) = read_all(root, STAMPED[0], STATUS_MAX)? else {
        return Ok(Index::default());
    };
    let mut packages = parse_stanzas(&String::from_utf8_lossy(&status));
    let busy = apply_journal(root, &mut packages)?;
    let diversions = read_all(root, STAMPED[2], STATUS_MAX)?
        .map(|d| parse_diversions(&String::from_utf8_lossy(&d)))
        .unwrap_or_default();
    let mut index = Index {
        busy,
        scope: scope.clone(),
        ..Index::default()
    };
    for p in packages.into_iter().filter(|p| p.installed) {
        let number = index.add_package(p.name.clone(), p.version.clone());
        let place = |path: &[u8]| -> Vec<u8> {
            // A file the package shipped at `path` that another package (or
            // the admin) diverted lives at the diversion's target.
            std::str::from_utf8(path)
                .ok()
                .and_then(|s| diversions.get(s))
                .filter(|(_, by)| *by != p.name)
                .map_or_else(|| path.to_vec(), |(to, _)| to.as_bytes().to_vec())
        };
        let qualified = format!("var/lib/dpkg/info/{}:{}.md5sums", p.name, p.arch);
        let plain = format!("var/lib/dpkg/info/{}.md5sums", p.name);
        let sums = match read_all(root, &qualified, MD5SUMS_MAX)? {
            Some(s) => Some(s),
            None => read_all(root, &plain, MD5SUMS_MAX)?,
        };
        for line in sums.iter().flat_map(|s| parse_md5sums(s)) {
            let Some((digest, path)) =
                line.and_then(|(hex, path)| Some((Recorded::from_hex(hex)?, path)))
            else {
                return Err(DbError::Corrupt(format!(
                    "{}: a line without an MD5",
                    plain.trim_start_matches("var/lib/dpkg/info/")
                )));
            };
            index.add_file(
                &place(&path),
                Owner {
                    package: number,
                    digest,
                    config: false,
                },
            );
        }
        for (path, hex) in &p.conffiles {
            // `newconffile` and the like: no digest recorded yet.
            if let Some(digest) = Recorded::from_hex(hex) {
                index.add_file(
                    &place(path.as_bytes()),
                    Owner {
                        package: number,
                        digest,
                        config: true,
                    },
                );
            }
        }
        if index.files.len() > PATHS_MAX {
            return Err(DbError::TooLarge("/var/lib/dpkg/info".into()));
        }
    }
    Ok(index)
}

/// Applies dpkg's journal (`updates/NNNN`, in order) to the packages of the
/// status file, as dpkg reads its database; says whether it held entries
/// (a transaction is under way or was interrupted).
fn apply_journal(root: &HostRoot, packages: &mut Vec<Installed>) -> Result<bool, DbError> {
    let entries = match root.list_dir(Path::new(UPDATES)) {
        Ok(e) => e,
        // No journal directory: nothing under way.
        Err(_) => return Ok(false),
    };
    let mut names: Vec<String> = entries
        .into_iter()
        .filter_map(|c| c.name.into_string().ok())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    if names.len() > UPDATES_MAX {
        return Err(DbError::TooLarge(format!("/{UPDATES}")));
    }
    names.sort_by_key(|n| n.parse::<u64>().unwrap_or(u64::MAX));
    for name in &names {
        // Gone meanwhile: dpkg folded it into the status file.
        let Some(text) = read_all(root, &format!("{UPDATES}/{name}"), STATUS_MAX)? else {
            continue;
        };
        for stanza in parse_stanzas(&String::from_utf8_lossy(&text)) {
            match packages
                .iter_mut()
                .find(|p| p.name == stanza.name && p.arch == stanza.arch)
            {
                Some(p) => *p = stanza,
                None => packages.push(stanza),
            }
        }
    }
    Ok(!names.is_empty())
}
