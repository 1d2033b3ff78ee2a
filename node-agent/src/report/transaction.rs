//! One object per package transaction: the package-verified changes of one
//! `apt-get upgrade` on a node are reported as one FileChange that lists
//! every change (`spec.package.transaction`), with one transition number,
//! instead of one FileChange and one Event per file.
//!
//! # What is grouped
//!
//! Only what the package database vouches for, and nothing an attacker
//! gains by hiding ([`groupable`]): an added or modified regular file whose
//! new content is an installed package's (`Verified`), written by a package
//! manager or by a writer nobody named, that gains no setuid or setgid bit
//! and is not a write undone within the debounce window. A `Mismatch` (a
//! trojan slipped into the upgrade), a change of a package's file by another
//! process, a removal, a metadata-only change (`chmod` of a packaged file)
//! and every change no package owns stay FileChanges of their own, loud as
//! before. Items are grouped per policy entry and package manager.
//!
//! # The window, and a crash at the worst moment
//!
//! A groupable change is held in memory, **neither queued nor marked
//! reported** in the baseline, until the transaction's window closes:
//! [`QUIET`] after the last groupable change, at most [`MAX_DELAY`] after the
//! first, or at once past [`HELD_MAX`] changes. At close the held paths are
//! looked at again: each change still there is grouped (a path that changed
//! since into a non-groupable state is reported on its own, and its held
//! state still listed), numbered once per object, queued durably like any
//! report, and only then marked, in the protocol's order ([`super`]). So a
//! crash before the close loses nothing: the held changes were never marked,
//! and the startup scan detects them again (source `Startup`). The startup
//! scan groups at once, in its own batch (it sees the upgrade whole): a crash
//! between queueing and marking is then the protocol's case 3→4, the same
//! items regrouped get the object's number back by its identity.
//! Grouping costs latency, never evidence: a package-verified change reaches
//! the cluster up to [`MAX_DELAY`] later.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{
    Attribute, ChangeCategory, FileAttributes, FileChangeSpec, FileType, PackageCheck,
    PackageTransaction, PackageVerdict, ProcessInfo, TRANSACTION_ITEMS_MAX, TransactionItem,
};
use tokio::time::Instant;

use super::Detected;

/// The window closes this long after the last groupable change.
pub const QUIET: Duration = Duration::from_secs(5);
/// ... and at most this long after the first.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Changes held at most: past it the window closes at once (memory bound).
pub const HELD_MAX: usize = 4 * TRANSACTION_ITEMS_MAX;
/// Bytes of items one object carries at most (the API server's limit is
/// 1.5 MB per object).
const OBJECT_BYTES_MAX: usize = 800 * 1024;

/// Commands (`comm`, cut at 15 bytes by the kernel) of package managers.
const PACKAGE_WRITERS: &[&str] = &[
    "dpkg",
    "dpkg-deb",
    "apt",
    "apt-get",
    "aptitude",
    "unattended-upgr",
    "rpm",
    "dnf",
    "dnf-3",
    "yum",
    "microdnf",
    "tdnf",
    "zypper",
    "packagekitd",
];

/// Whether a change may be listed in a transaction object rather than be a
/// FileChange of its own (see the module's documentation).
pub fn groupable(spec: &FileChangeSpec) -> bool {
    let Some(package) = &spec.package else {
        return false;
    };
    let content_written = match spec.category {
        ChangeCategory::Added => true,
        ChangeCategory::Modified => spec.changed_attributes.contains(&Attribute::Hash),
        ChangeCategory::Removed | ChangeCategory::Summary => false,
    };
    package.verdict == PackageVerdict::Verified
        && package.transaction.is_none()
        && content_written
        && spec.after.as_ref().and_then(|a| a.file_type) == Some(FileType::File)
        && spec.restored != Some(true)
        && spec.container.is_none()
        && spec.summary.is_none()
        && !gains_special_bits(spec.before.as_ref(), spec.after.as_ref())
        && spec.process.as_ref().is_none_or(package_writer)
}

/// A writer named and not a package manager is someone else changing a
/// package's file, however verified its content.
fn package_writer(p: &ProcessInfo) -> bool {
    p.command
        .as_deref()
        .is_none_or(|c| PACKAGE_WRITERS.contains(&c))
}

fn special_bits(a: Option<&FileAttributes>) -> u32 {
    a.and_then(|a| a.mode.as_deref())
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .map_or(0, |m| m & 0o6000)
}

/// A setuid or setgid bit the file did not have: never quiet.
fn gains_special_bits(before: Option<&FileAttributes>, after: Option<&FileAttributes>) -> bool {
    special_bits(after) & !special_bits(before) != 0
}

/// The groupable changes held until their transaction's window closes.
#[derive(Debug, Default)]
pub struct Held {
    /// By policy, entry and path (a newer state of a path replaces the older,
    /// as the debounce does).
    items: BTreeMap<(String, String, String), Detected>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Held {
    /// Holds a groupable change.
    pub fn hold(&mut self, d: Detected, now: Instant) {
        let key = (
            d.spec.policy.clone(),
            d.spec.entry.clone(),
            d.spec.path.clone(),
        );
        self.items.insert(key, d);
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// When the window closes (none while nothing is held).
    pub fn due(&self) -> Option<Instant> {
        if self.items.len() >= HELD_MAX {
            return self.first;
        }
        Some((self.last? + QUIET).min(self.first? + MAX_DELAY))
    }

    /// The held host paths (escaped, as `spec.path`).
    pub fn paths(&self) -> BTreeSet<String> {
        self.items.keys().map(|(_, _, p)| p.clone()).collect()
    }

    /// Closes the window: the held changes, and nothing held any more.
    pub fn take(&mut self) -> Vec<Detected> {
        self.first = None;
        self.last = None;
        std::mem::take(&mut self.items).into_values().collect()
    }
}

/// The held changes, with the states found at close (`fresh`, groupable):
/// a fresh state equal to a held one keeps the held report (its writer and
/// detection time); a different one is listed too.
pub fn merge(held: Vec<Detected>, fresh: Vec<FileChangeSpec>) -> Vec<FileChangeSpec> {
    let mut out: Vec<FileChangeSpec> = held.into_iter().map(|d| d.spec).collect();
    for f in fresh {
        let known = out.iter().any(|h| {
            h.policy == f.policy && h.entry == f.entry && h.path == f.path && h.after == f.after
        });
        if !known {
            out.push(f);
        }
    }
    out
}

fn item(spec: FileChangeSpec) -> Option<(PackageCheck, TransactionItem)> {
    let package = spec.package?;
    let item = TransactionItem {
        path: spec.path,
        category: spec.category,
        changed_attributes: spec.changed_attributes,
        before: spec.before,
        after: spec.after,
        detected_time: spec.detected_time,
        source: spec.source,
        process: spec.process,
        package: package.name.clone(),
        version: package.version.clone(),
        version_before: package.version_before.clone(),
    };
    Some((package, item))
}

/// The transaction objects of groupable changes: per policy, entry and
/// package manager, in path order, at most [`TRANSACTION_ITEMS_MAX`] changes
/// and ~800 KiB of them per object.
pub fn group(changes: Vec<FileChangeSpec>, now: Timestamp) -> Vec<FileChangeSpec> {
    let mut groups: BTreeMap<(String, String, String, &'static str), Vec<FileChangeSpec>> =
        BTreeMap::new();
    for c in changes {
        let Some(manager) = c.package.as_ref().map(|p| p.manager.as_str()) else {
            continue;
        };
        groups
            .entry((c.node.clone(), c.policy.clone(), c.entry.clone(), manager))
            .or_default()
            .push(c);
    }
    let mut out = Vec::new();
    for (_, mut specs) in groups {
        specs.sort_by(|a, b| (&a.path, a.detected_time.0).cmp(&(&b.path, b.detected_time.0)));
        let Some(first) = specs.first().cloned() else {
            continue;
        };
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut manager = None;
        for spec in specs {
            let Some((package, it)) = item(spec) else {
                continue;
            };
            manager = Some(package.manager);
            let size = serde_json::to_vec(&it).map_or(0, |v| v.len());
            if !items.is_empty()
                && (items.len() >= TRANSACTION_ITEMS_MAX || bytes + size > OBJECT_BYTES_MAX)
            {
                out.extend(object(&first, manager, std::mem::take(&mut items), now));
                bytes = 0;
            }
            bytes += size;
            items.push(it);
        }
        out.extend(object(&first, manager, items, now));
    }
    out
}

/// One transaction object of `items` (of `like`'s node, policy and entry).
pub fn object(
    like: &FileChangeSpec,
    manager: Option<kube_fim_crds::PackageManager>,
    items: Vec<TransactionItem>,
    now: Timestamp,
) -> Option<FileChangeSpec> {
    let manager = manager.or(like.package.as_ref().map(|p| p.manager))?;
    let first = items.first()?;
    // The package most of the files are of names the transaction.
    let mut counts: BTreeMap<(&str, &str, Option<&str>), usize> = BTreeMap::new();
    for i in &items {
        *counts
            .entry((&i.package, &i.version, i.version_before.as_deref()))
            .or_default() += 1;
    }
    let packages: BTreeSet<&str> = items.iter().map(|i| i.package.as_str()).collect();
    let ((name, version, before), _) = counts.iter().max_by_key(|(k, n)| (**n, *k))?;
    let versions = match before {
        Some(b) => format!("{b}→{version}"),
        None => (*version).to_string(),
    };
    let more = match packages.len() {
        1 => String::new(),
        2 => " and 1 more package".to_string(),
        n => format!(" and {} more packages", n - 1),
    };
    let files = items.len();
    let summary = format!(
        "{name} {versions}{more}, {files} file{}",
        if files == 1 { "" } else { "s" }
    );
    let mut changed: BTreeSet<Attribute> = BTreeSet::new();
    for i in &items {
        changed.extend(i.changed_attributes.iter().copied());
    }
    let category = if items.iter().all(|i| i.category == ChangeCategory::Added) {
        ChangeCategory::Added
    } else {
        ChangeCategory::Modified
    };
    Some(FileChangeSpec {
        node: like.node.clone(),
        policy: like.policy.clone(),
        sequence: None,
        entry: like.entry.clone(),
        path: first.path.clone(),
        category,
        changed_attributes: changed.into_iter().collect(),
        before: None,
        after: None,
        detected_time: MicroTime(now),
        source: first.source,
        process: None,
        container: None,
        summary: None,
        package: Some(PackageCheck {
            manager,
            name: (*name).to_string(),
            version: (*version).to_string(),
            version_before: before.map(str::to_string),
            verdict: PackageVerdict::Verified,
            transaction: Some(PackageTransaction {
                summary: crate::report::object::shorten_text(&summary, 512),
                files: files as u64,
                changes: items,
            }),
        }),
        restored: None,
    })
}

/// The items of a transaction object.
pub fn items(spec: &FileChangeSpec) -> Option<&[TransactionItem]> {
    spec.package
        .as_ref()
        .and_then(|p| p.transaction.as_ref())
        .map(|t| t.changes.as_slice())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
