//! The store: an embedded database ([redb]: a copy-on-write B-tree in one
//! file, each commit atomic and durable, a `kill -9` at any moment leaves the
//! last committed state), keyed by host path. Opening it (recomputing and
//! checking its digest), creating a new one, writing the changes in one
//! transaction, and compacting it.
//!
//! [redb]: https://docs.rs/redb

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use tracing::{info, warn};

use super::digest::{SetHash, TAG_ESTABLISHED, TAG_FILE, TAG_POLICY};
use super::read::Reader;
use super::verify::{Unreadable, files_sum};
use super::{Baseline, BaselineError, PolicyScan, StateDir, Tracked, record};

/// The store's version: 3 encodes records in binary ([`record`]).
pub(super) const VERSION: &[u8] = b"3";

/// The version before, with records in JSON: upgraded on start.
pub(super) const VERSION_JSON_RECORDS: &[u8] = b"2";

/// Memory the database may use for caching pages. redb's default is 1 GiB;
/// every access of a scan is in key order, so a small cache serves it. 1 MiB
/// rather than 4: on `/usr` the cache filled while the store's records of
/// `/usr/share/man/man1` (17,889) were read, its pages allocated on whichever
/// scan thread read them, and `check` on two threads peaked at 41-43 MB of
/// RSS (33 MB now), no slower (README, "Speed and memory").
pub const CACHE_BYTES: usize = 1 << 20;

/// Records by host path (UTF-8, compared as bytes: the same order, without
/// validating both keys at each comparison).
pub(super) const FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("files");

/// The files table of version 2.
pub(super) const FILES_V2: TableDefinition<&str, &[u8]> = TableDefinition::new("files");

pub(super) const ESTABLISHED: TableDefinition<&str, &[u8]> = TableDefinition::new("established");

pub(super) const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(super) fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES);
    b
}

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Writes changed records into `files`, keeping `sum` up to date.
pub(super) fn write_records(
    files: &mut redb::Table<&[u8], &[u8]>,
    records: &BTreeMap<String, Option<Tracked>>,
    sum: &mut SetHash,
) -> Result<(), redb::Error> {
    for (k, t) in records {
        let old = match t {
            Some(t) => {
                let v = record::to_vec(t);
                sum.add(TAG_FILE, k, &v);
                files.insert(k.as_bytes(), v.as_slice())?
            }
            None => files.remove(k.as_bytes())?,
        };
        if let Some(old) = old {
            sum.remove(TAG_FILE, k, old.value());
        }
    }
    Ok(())
}

impl Baseline {
    /// Opens the baseline of `state` and recomputes its digest from its
    /// records, or `None` if there is none yet.
    pub fn load(state: &Path) -> Result<Option<(Baseline, String)>, BaselineError> {
        let state = StateDir::new(state);
        let path = state.store();
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::migrate(&state),
            Err(source) => return Err(BaselineError::Io { path, source }),
        }
        // redb asserts some of what it reads from the file's header: a
        // damaged file is a corrupt baseline, not a reason to stop.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let db = builder()
                .open(&path)
                .map_err(|e| BaselineError::store(&path, e))?;
            let mut b = Self::with_db(db, &state, false);
            let version = b.read_all(&path)?;
            let digest = b.sum.digest();
            if version == VERSION_JSON_RECORDS {
                return Self::upgrade(b, digest);
            }
            Ok((b, digest))
        }));
        match opened {
            Ok(r) => r.map(Some),
            Err(_) => Err(BaselineError::Corrupt {
                path,
                message: "the database cannot be opened".into(),
            }),
        }
    }

    /// A new, empty baseline for `state`; the one on disk (if any) stays until
    /// the first [`Baseline::save`] replaces it.
    pub fn create(state: &Path) -> Result<Baseline, BaselineError> {
        let state = StateDir::new(state);
        let path = state.new_store();
        let io = |source| BaselineError::Io {
            path: path.clone(),
            source,
        };
        state.ensure().map_err(io)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let db = builder()
            .create_file(file)
            .map_err(|e| BaselineError::store(&path, e))?;
        let b = Self::with_db(db, &state, true);
        let store = |e: redb::Error| BaselineError::store(&path, e);
        let tx = b.db.begin_write().map_err(|e| store(e.into()))?;
        {
            tx.open_table(FILES).map_err(|e| store(e.into()))?;
            for t in [ESTABLISHED, POLICIES] {
                tx.open_table(t).map_err(|e| store(e.into()))?;
            }
            let mut meta = tx.open_table(META).map_err(|e| store(e.into()))?;
            meta.insert("version", VERSION)
                .map_err(|e| store(e.into()))?;
            meta.insert("sum", b.sum.to_bytes().as_slice())
                .map_err(|e| store(e.into()))?;
        }
        tx.commit().map_err(|e| store(e.into()))?;
        Ok(b)
    }

    pub(super) fn with_db(db: Database, state: &StateDir, fresh: bool) -> Baseline {
        Baseline {
            db: Arc::new(db),
            state: state.clone(),
            fresh,
            legacy: None,
            sum: SetHash::zero(),
            writes: 0,
            pending: BTreeMap::new(),
            writing: None,
            established: BTreeSet::new(),
            policies: BTreeMap::new(),
            changed: BTreeSet::new(),
            reader: Mutex::new(Reader::default()),
            dirty: fresh,
            approved_log: VecDeque::new(),
            approved_seq: 0,
            sequence: 0,
            saved_sequence: 0,
        }
    }

    /// One streaming pass over every record: the small tables are loaded, the
    /// digest recomputed and compared with the one the store kept.
    /// Returns the store's version (this one's or the one before).
    pub(super) fn read_all(&mut self, path: &Path) -> Result<&'static [u8], BaselineError> {
        let store = |e: redb::Error| BaselineError::store(path, e);
        let corrupt = |message: String| BaselineError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let tx = self.db.begin_read().map_err(|e| store(e.into()))?;
        let meta = tx.open_table(META).map_err(|e| store(e.into()))?;
        let stored = meta.get("version").map_err(|e| store(e.into()))?;
        let Some(version) = [VERSION, VERSION_JSON_RECORDS]
            .into_iter()
            .find(|v| stored.as_ref().map(|s| s.value()) == Some(*v))
        else {
            return Err(corrupt(format!(
                "version {:?} (this agent reads {} and upgrades {})",
                stored.map(|v| String::from_utf8_lossy(v.value()).into_owned()),
                String::from_utf8_lossy(VERSION),
                String::from_utf8_lossy(VERSION_JSON_RECORDS)
            )));
        };
        let kept = meta
            .get("sum")
            .map_err(|e| store(e.into()))?
            .and_then(|v| SetHash::from_bytes(v.value()));
        let threads = crate::budget::threads();
        let sum = if version == VERSION {
            let files = tx.open_table(FILES).map_err(|e| store(e.into()))?;
            files_sum(&files, version, threads)
        } else {
            let files = tx.open_table(FILES_V2).map_err(|e| store(e.into()))?;
            files_sum(&files, version, threads)
        };
        let mut sum = sum.map_err(|e| match e {
            Unreadable::Store(e) => store(e),
            Unreadable::Record(message) => corrupt(message),
        })?;
        let established = tx.open_table(ESTABLISHED).map_err(|e| store(e.into()))?;
        for item in established.iter().map_err(|e| store(e.into()))? {
            let (k, v) = item.map_err(|e| store(e.into()))?;
            sum.add(TAG_ESTABLISHED, k.value(), v.value());
            self.established.insert(k.value().to_string());
        }
        let policies = tx.open_table(POLICIES).map_err(|e| store(e.into()))?;
        for item in policies.iter().map_err(|e| store(e.into()))? {
            let (k, v) = item.map_err(|e| store(e.into()))?;
            let rec: PolicyScan = serde_json::from_slice(v.value())
                .map_err(|e| corrupt(format!("policy {}: {e}", k.value())))?;
            sum.add(TAG_POLICY, k.value(), v.value());
            self.policies.insert(k.value().to_string(), rec);
        }
        self.sequence = meta
            .get("sequence")
            .map_err(|e| store(e.into()))?
            .map(|v| {
                <[u8; 8]>::try_from(v.value())
                    .map(u64::from_le_bytes)
                    .map_err(|_| corrupt("the transition sequence is not 8 bytes".into()))
            })
            .transpose()?
            .unwrap_or(0);
        self.saved_sequence = self.sequence;
        if kept.as_ref() != Some(&sum) {
            warn!(
                path = %path.display(),
                "the baseline's records do not add up to the digest it recorded: edited outside the agent"
            );
        }
        self.sum = sum;
        Ok(version)
    }

    /// Writes the changes and makes this baseline the one on disk; returns
    /// the digest of what was written.
    pub fn save(&mut self) -> Result<String, BaselineError> {
        if !self.dirty {
            return Ok(self.sum.digest());
        }
        let digest = self.write(true)?;
        if self.fresh {
            let io = |source| BaselineError::Io {
                path: self.state.store(),
                source,
            };
            if self.legacy.is_some() {
                // A store of the version before: kept as it was.
                match fs::hard_link(self.state.store(), self.state.upgraded_store()) {
                    Err(e)
                        if !matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::AlreadyExists
                        ) =>
                    {
                        return Err(io(e));
                    }
                    _ => {}
                }
            }
            fs::rename(self.state.new_store(), self.state.store()).map_err(io)?;
            self.state.sync().map_err(io)?;
            self.fresh = false;
            if self.legacy.take().is_some() {
                let aside = self.state.migrated_document();
                if fs::rename(self.state.legacy_document(), &aside).is_ok() {
                    info!(aside = %aside.display(), "the baseline document of the earlier version is set aside");
                }
            }
        }
        self.dirty = false;
        Ok(digest)
    }

    /// One transaction with every pending change; `durable` commits it in
    /// two phases (the state on disk after any crash is a committed one).
    pub(super) fn write(&mut self, durable: bool) -> Result<String, BaselineError> {
        self.finish_writing()?;
        let path = if self.fresh {
            self.state.new_store()
        } else {
            self.state.store()
        };
        let store = |e: redb::Error| BaselineError::store(&path, e);
        let mut sum = self.sum.clone();
        let mut tx = self.db.begin_write().map_err(|e| store(e.into()))?;
        if durable {
            // Recovery after a crash then never has to trust a checksum to
            // choose between commits (which a crafted edit could steer).
            tx.set_two_phase_commit(true);
        } else {
            tx.set_durability(Durability::None)
                .map_err(|e| store(redb::Error::Corrupted(e.to_string())))?;
        }
        {
            let mut files = tx.open_table(FILES).map_err(|e| store(e.into()))?;
            write_records(&mut files, &self.pending, &mut sum).map_err(store)?;
            let mut established = tx.open_table(ESTABLISHED).map_err(|e| store(e.into()))?;
            let mut policies = tx.open_table(POLICIES).map_err(|e| store(e.into()))?;
            for (tag, k) in &self.changed {
                let (old, tag) = match *tag {
                    TAG_ESTABLISHED if self.established.contains(k) => {
                        sum.add(TAG_ESTABLISHED, k, b"");
                        (
                            established.insert(k.as_str(), b"".as_slice()),
                            TAG_ESTABLISHED,
                        )
                    }
                    TAG_ESTABLISHED => (established.remove(k.as_str()), TAG_ESTABLISHED),
                    _ => match self.policies.get(k) {
                        Some(rec) => {
                            let v = encode(rec);
                            sum.add(TAG_POLICY, k, &v);
                            (policies.insert(k.as_str(), v.as_slice()), TAG_POLICY)
                        }
                        None => (policies.remove(k.as_str()), TAG_POLICY),
                    },
                };
                if let Some(old) = old.map_err(|e| store(e.into()))? {
                    sum.remove(tag, k, old.value());
                }
            }
            let mut meta = tx.open_table(META).map_err(|e| store(e.into()))?;
            meta.insert("sum", sum.to_bytes().as_slice())
                .map_err(|e| store(e.into()))?;
            // In the transaction that marks the numbered transitions reported.
            meta.insert("sequence", self.sequence.to_le_bytes().as_slice())
                .map_err(|e| store(e.into()))?;
        }
        let digest = sum.digest();
        // A reader's snapshot would keep the pages this commit frees.
        *self.reader() = Reader::default();
        tx.commit().map_err(|e| store(e.into()))?;
        self.writes += 1;
        if durable {
            self.saved_sequence = self.sequence;
        }
        self.sum = sum;
        self.pending.clear();
        self.changed.clear();
        Ok(digest)
    }

    /// Compacts the store if the disk space its file takes is more than a
    /// tenth beyond the pages its records use (pages freed by deletions and
    /// rewrites; redb grows the file sparsely, so its length says little):
    /// relocates pages and shrinks the file, the records unchanged (so is the
    /// digest). Reads every page of the store: call it after a full scan, not
    /// per change. Returns the disk space before and after, if compacted.
    pub fn compact_if_bloated(&mut self) -> Result<Option<(u64, u64)>, BaselineError> {
        if self.fresh || self.dirty {
            return Ok(None);
        }
        let path = self.state.store();
        let store = |e: redb::Error| BaselineError::store(&path, e);
        let len = || {
            fs::metadata(&path)
                .map(|m| m.blocks() * 512)
                .map_err(|source| BaselineError::Io {
                    path: path.clone(),
                    source,
                })
        };
        let before = len()?;
        let live = {
            let tx = self.db.begin_write().map_err(|e| store(e.into()))?;
            let stats = tx.stats().map_err(|e| store(e.into()))?;
            tx.abort().map_err(|e| store(e.into()))?;
            (stats.leaf_pages() + stats.branch_pages()) * stats.page_size() as u64
        };
        if before <= live + live / 10 + (1 << 20) {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        self.finish_writing()?;
        // A reader's snapshot would keep the pages where they are.
        *self.reader() = Reader::default();
        let Some(db) = Arc::get_mut(&mut self.db) else {
            // Still shared with a reader of a scan: next time.
            return Ok(None);
        };
        db.compact().map_err(|e| store(e.into()))?;
        let after = len()?;
        info!(
            before,
            after,
            live,
            seconds = started.elapsed().as_secs_f64(),
            "baseline store compacted"
        );
        Ok(Some((before, after)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kube_fim_crds::FileAttributes;

    use super::*;
    use crate::baseline::state_dir::{FILE, LEGACY_FILE};
    use crate::baseline::tests::{attrs, reopen};
    use crate::baseline::write_behind::BATCH;

    #[test]
    fn round_trip_and_digest_of_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Baseline::load(dir.path()).unwrap().is_none());
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish_path("/etc/passwd", Some(attrs(3)));
        b.establish("p", "e");
        let digest = b.save().unwrap();
        drop(b);
        let (loaded, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, digest);
        assert_eq!(loaded.approved("/etc/passwd"), Some(attrs(3)));
        assert!(loaded.is_established("p", "e"));
        drop(loaded);

        // An edit of a record on the node, made with the store's own library
        // (everything but the agent's digest bookkeeping), changes the digest.
        {
            let db = builder().open(dir.path().join(FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut files = tx.open_table(FILES).unwrap();
                let forged = record::to_vec(&Tracked {
                    approved: Some(attrs(4)),
                    ..Tracked::default()
                });
                files
                    .insert("/etc/passwd".as_bytes(), forged.as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let (_, edited) = reopen(dir.path());
        assert_ne!(edited, digest);
    }

    #[test]
    fn the_digest_is_the_same_however_the_records_were_written() {
        let one = tempfile::tempdir().unwrap();
        let mut a = Baseline::create(one.path()).unwrap();
        a.establish_path("/a", Some(attrs(1)));
        a.establish_path("/b", Some(attrs(2)));
        a.save().unwrap();
        a.establish_path("/b", Some(attrs(3)));
        a.mark_reported("/c", "x".into());
        a.establish_path("/c", None);
        let da = a.save().unwrap();

        let two = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(two.path()).unwrap();
        b.establish_path("/b", Some(attrs(3)));
        b.establish_path("/a", Some(attrs(1)));
        let db = b.save().unwrap();
        assert_eq!(da, db, "incremental and one-shot writes agree");
        drop(a);
        assert_eq!(reopen(one.path()).1, da, "and the recomputation at start");
    }

    #[test]
    fn a_large_change_is_written_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.save().unwrap();
        for i in 0..(2 * BATCH + 10) {
            b.establish_path(&format!("/d/f{i:05}"), Some(attrs(i as u64)));
            b.flush_if_full().unwrap();
        }
        assert!(b.pending.len() < BATCH, "written as the scan goes");
        // A crash now: what is on disk is the batches written.
        drop(b);
        let (b, _) = reopen(dir.path());
        assert_eq!(b.keys_under("/d").len(), 2 * BATCH);
    }

    #[test]
    fn a_new_baseline_replaces_the_old_one_only_when_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = Baseline::create(dir.path()).unwrap();
        old.establish_path("/old", Some(attrs(1)));
        let d_old = old.save().unwrap();
        drop(old);
        let mut new = Baseline::create(dir.path()).unwrap();
        for i in 0..(BATCH + 1) {
            new.establish_path(&format!("/new/{i}"), Some(attrs(1)));
            new.flush_if_full().unwrap();
        }
        assert_eq!(reopen(dir.path()).1, d_old, "not replaced before the save");
        let d_new = new.save().unwrap();
        drop(new);
        let (b, d) = reopen(dir.path());
        assert_eq!(d, d_new);
        assert!(!b.knows("/old"));
        assert!(b.knows("/new/0"));
    }

    #[test]
    fn a_torn_new_baseline_never_replaces_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish("p", "e");
        let d = b.save().unwrap();
        drop(b);
        fs::write(StateDir::new(dir.path()).new_store(), b"redb\0torn").unwrap();
        let (loaded, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, d);
        assert!(loaded.is_established("p", "e"));
    }

    #[test]
    fn garbage_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"not a database at all").unwrap();
        let r = Baseline::load(dir.path()).map(|_| ());
        assert!(matches!(r, Err(BaselineError::Corrupt { .. })), "{r:?}");
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish_path("/f", Some(attrs(1)));
        b.save().unwrap();
        drop(b);
        let file = dir.path().join(FILE);
        let len = fs::metadata(&file).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let r = Baseline::load(dir.path()).map(|_| ());
        assert!(matches!(r, Err(BaselineError::Corrupt { .. })), "{r:?}");
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LEGACY_FILE), b"not json").unwrap();
        assert!(matches!(
            Baseline::load(dir.path()),
            Err(BaselineError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_store_grown_beyond_its_records_is_compacted_without_changing_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        let hashed = |i: u64| FileAttributes {
            hash: Some(blake3::hash(&i.to_le_bytes()).to_hex().to_string()),
            ..attrs(i)
        };
        for i in 0..20_000 {
            b.establish_path(&format!("/d/f{i:05}"), Some(hashed(i)));
            b.flush_if_full().unwrap();
        }
        b.save().unwrap();
        for i in 100..20_000 {
            b.establish_path(&format!("/d/f{i:05}"), None);
            b.flush_if_full().unwrap();
        }
        let digest = b.save().unwrap();
        let (before, after) = b.compact_if_bloated().unwrap().unwrap();
        assert!(after * 2 < before, "{before} -> {after}");
        assert_eq!(
            fs::metadata(dir.path().join(FILE)).unwrap().blocks() * 512,
            after
        );
        assert_eq!(b.compact_if_bloated().unwrap(), None, "not again");
        assert_eq!(b.approved("/d/f00042"), Some(hashed(42)));
        b.establish_path("/d/new", Some(attrs(1)));
        let digest2 = b.save().unwrap();
        assert_ne!(digest2, digest);
        drop(b);
        let (b, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, digest2, "the records are unchanged");
        assert_eq!(b.keys_under("/d").len(), 101);
        assert_eq!(b.approved("/d/f00099"), Some(hashed(99)));
    }
}
