//! Reads of the committed store: the approved state of one path, the
//! children of one directory, the paths under a prefix, and snapshots a scan
//! reads ahead from on its own threads. Changes not yet written (pending, or
//! being written in the background) come first.

use std::collections::BTreeMap;
use std::sync::MutexGuard;

use kube_fim_crds::FileAttributes;
use redb::{ReadOnlyTable, ReadableDatabase};
use tracing::warn;

use super::store::FILES;
use super::{Baseline, Tracked, record};

/// A direct child of a directory, as the baseline knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KnownChild {
    /// The baseline has a record of the child itself.
    pub known: bool,
    /// The baseline has records below the child.
    pub below: bool,
}

/// The committed records as of one moment, readable on any thread: a scan
/// reads the records of its next paths on its threads while it judges others
/// ([`Snapshot::read`], [`Baseline::prefetched`]).
pub struct Snapshot {
    writes: u64,
    files: ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl Snapshot {
    /// The record of `key` as of the snapshot, decoded.
    pub fn read(&self, key: &str) -> Prefetched {
        let record = match self.files.get(key.as_bytes()) {
            Ok(Some(v)) => record::decode(v.value()).ok().map(|t| Some(Box::new(t))),
            Ok(None) => Some(None),
            // Read again when used, to report why it cannot be.
            Err(_) => None,
        };
        Prefetched {
            writes: self.writes,
            record,
        }
    }
}

/// A record read from a [`Snapshot`].
pub struct Prefetched {
    writes: u64,
    /// `None`: unreadable. (Boxed: a batch holds thousands, small.)
    record: Option<Option<Box<Tracked>>>,
}

/// Reads of the committed state: one snapshot, its files table, and the last
/// record read (a scan asks several questions about each path in turn).
#[derive(Default)]
pub(super) struct Reader {
    files: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    last: Option<(String, Option<Tracked>)>,
}

impl Baseline {
    pub(super) fn reader(&self) -> MutexGuard<'_, Reader> {
        self.reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the committed files table.
    pub(super) fn with_files<R>(
        &self,
        f: impl FnOnce(&ReadOnlyTable<&'static [u8], &'static [u8]>) -> Result<R, redb::Error>,
    ) -> Result<R, redb::Error> {
        let mut reader = self.reader();
        let table = match &mut reader.files {
            Some(t) => t,
            slot @ None => slot.insert(self.db.begin_read()?.open_table(FILES)?),
        };
        f(table)
    }

    /// The record of a path, pending changes first.
    pub(super) fn record(&self, key: &str) -> Option<Tracked> {
        if let Some(p) = self.pending.get(key) {
            return p.clone();
        }
        if let Some(p) = self.writing.as_ref().and_then(|w| w.records.get(key)) {
            return p.clone();
        }
        if let Some((k, t)) = &self.reader().last
            && k == key
        {
            return t.clone();
        }
        let read = self.with_files(|t| {
            Ok(match t.get(key.as_bytes())? {
                Some(v) => record::decode(v.value())
                    .map_err(|e| redb::Error::Corrupted(format!("{key}: {e}")))
                    .map(Some)?,
                None => None,
            })
        });
        match read {
            Ok(t) => {
                self.reader().last = Some((key.to_string(), t.clone()));
                t
            }
            Err(error) => {
                warn!(path = %key, %error, "baseline record unreadable");
                None
            }
        }
    }

    /// Calls `f` on every record whose key starts with `prefix`, in key order.
    pub(super) fn for_each_under(&self, prefix: &str, mut f: impl FnMut(&str, &Tracked)) {
        fn under<'a>(
            m: &'a BTreeMap<String, Option<Tracked>>,
            prefix: &'a str,
        ) -> impl Iterator<Item = (&'a String, &'a Option<Tracked>)> {
            m.range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
        }
        // The changes being written, under those pending.
        let merged = self.writing.as_ref().map(|w| {
            let mut m: BTreeMap<&String, &Option<Tracked>> = under(&w.records, prefix).collect();
            m.extend(under(&self.pending, prefix));
            m
        });
        let changes: Box<dyn Iterator<Item = (&String, &Option<Tracked>)>> = match &merged {
            Some(m) => Box::new(m.iter().map(|(k, t)| (*k, *t))),
            None => Box::new(under(&self.pending, prefix)),
        };
        let mut pending = changes.peekable();
        let read = self.with_files(|table| {
            for item in table.range::<&[u8]>(prefix.as_bytes()..)? {
                let (k, v) = item?;
                let k = k.value();
                if !k.starts_with(prefix.as_bytes()) {
                    break;
                }
                let Ok(k) = std::str::from_utf8(k) else {
                    warn!(path = %String::from_utf8_lossy(k), "baseline key is not UTF-8");
                    continue;
                };
                while let Some((pk, pv)) = pending.next_if(|(pk, _)| pk.as_str() < k) {
                    if let Some(t) = pv {
                        f(pk, t);
                    }
                }
                if let Some((pk, pv)) = pending.next_if(|(pk, _)| pk.as_str() == k) {
                    if let Some(t) = pv {
                        f(pk, t);
                    }
                    continue;
                }
                match record::decode(v.value()) {
                    Ok(t) => f(k, &t),
                    Err(error) => warn!(path = %k, %error, "baseline record unreadable"),
                }
            }
            Ok(())
        });
        if let Err(error) = read {
            warn!(%error, "reading the baseline");
        }
        for (pk, pv) in pending {
            if let Some(t) = pv {
                f(pk, t);
            }
        }
    }

    /// A snapshot of the committed records (`None` if the store has none or
    /// cannot be read now: the records are then read when used).
    pub fn snapshot(&self) -> Option<Snapshot> {
        let files = self.db.begin_read().ok()?.open_table(FILES).ok()?;
        Some(Snapshot {
            writes: self.writes,
            files,
        })
    }

    /// Transactions committed since the baseline was opened.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Answers the next questions about `key` from its record read ahead,
    /// unless the store was written since that read and `unwritten` is false
    /// (the caller knows `key` was not written since: a scan that started
    /// with nothing pending writes only the paths it judged, each once).
    /// Changes not yet written still come first.
    pub fn prefetched(&self, key: &str, read: Prefetched, unwritten: bool) {
        if (unwritten || read.writes == self.writes)
            && let Some(t) = read.record
        {
            self.reader().last = Some((key.to_string(), t.map(|t| *t)));
        }
    }

    /// Known paths strictly below `dir` (a host path), in key order.
    pub fn keys_under(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let mut out = Vec::new();
        self.for_each_under(&prefix, |k, _| out.push(k.to_string()));
        out
    }

    /// The direct children of `dir` (a host path) the baseline knows, by name
    /// (as in keys), in name order: what a scan of that directory compares
    /// with. Reads the records of the children, not of their subtrees.
    pub fn children(&self, dir: &str) -> BTreeMap<String, KnownChild> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let mut out: BTreeMap<String, KnownChild> = BTreeMap::new();
        let read = self.with_files(|table| {
            let mut from = prefix.clone();
            'seek: loop {
                for item in table.range::<&[u8]>(from.as_bytes()..)? {
                    let (k, _) = item?;
                    let Some(rest) = k.value().strip_prefix(prefix.as_bytes()) else {
                        break 'seek;
                    };
                    let Ok(rest) = std::str::from_utf8(rest) else {
                        continue;
                    };
                    match rest.split_once('/') {
                        None => out.entry(rest.to_string()).or_default().known = true,
                        Some((name, _)) => {
                            out.entry(name.to_string()).or_default().below = true;
                            // Skip the child's subtree ('0' follows '/').
                            from = format!("{prefix}{name}0");
                            continue 'seek;
                        }
                    }
                }
                break;
            }
            Ok(())
        });
        if let Err(error) = read {
            warn!(dir, %error, "reading the baseline");
        }
        let writing = self.writing.as_ref().map(|w| &*w.records);
        for changes in writing.into_iter().chain([&self.pending]) {
            for (k, t) in changes
                .range::<str, _>((
                    std::ops::Bound::Included(prefix.as_str()),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix.as_str()))
            {
                let rest = &k[prefix.len()..];
                match rest.split_once('/') {
                    None => out.entry(rest.to_string()).or_default().known = t.is_some(),
                    Some((name, _)) => {
                        if t.is_some() {
                            out.entry(name.to_string()).or_default().below = true;
                        }
                    }
                }
            }
        }
        out.retain(|_, c| c.known || c.below);
        out
    }

    /// Calls `f` with the approved state of every path, in path order (for
    /// entry digests), reading the store as a stream.
    pub fn for_each_approved(&self, mut f: impl FnMut(&str, Option<&FileAttributes>)) {
        self.for_each_under("", |k, t| f(k, t.approved.as_ref()));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::baseline::Baseline;
    use crate::baseline::tests::attrs;

    #[test]
    fn children_are_read_one_directory_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        for k in [
            "/etc",
            "/etc/a",
            "/etc/a-b",
            "/etc/a/x/y",
            "/etc/b/c",
            "/etcx",
        ] {
            b.establish_path(k, Some(attrs(1)));
        }
        b.save().unwrap();
        b.establish_path("/etc/z", Some(attrs(2)));
        b.establish_path("/etc/a-b", None);
        let names: Vec<(String, bool, bool)> = b
            .children("/etc")
            .into_iter()
            .map(|(n, c)| (n, c.known, c.below))
            .collect();
        assert_eq!(
            names,
            [
                ("a".to_string(), true, true),
                ("b".to_string(), false, true),
                ("z".to_string(), true, false),
            ]
        );
        assert_eq!(b.children("/").len(), 2, "{:?}", b.children("/"));
        assert_eq!(b.keys_under("/etc").len(), 4);
    }
}
