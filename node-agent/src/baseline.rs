//! The baseline on the node: the approved state of every monitored file, which
//! policy entries are established, and which differences were already reported.
//!
//! Stored in an embedded database ([redb]: a copy-on-write B-tree in one file,
//! each commit atomic and durable, a `kill -9` at any moment leaves the last
//! committed state), keyed by host path. Nothing holds the whole baseline in
//! memory: reads go through a small page cache ([`CACHE_BYTES`]), changes are
//! kept until [`Baseline::save`] (or a full batch, [`Baseline::flush_if_full`])
//! writes them in one transaction, and scans read one directory at a time
//! ([`Baseline::children`]).
//!
//! Its digest, published in the cluster, is a homomorphic multiset hash
//! (LtHash: 1024 lanes of 16 bits, added modulo 2^16, of a BLAKE3 XOF of each
//! record) kept up to date record by record as changes are written, so a save
//! costs what it changes, not the size of the baseline. At start it is
//! recomputed from the records in one streaming pass: an edit made on the
//! node while the agent is down changes it and is noticed.
//!
//! Every digest is appended to a journal (fsynced) *before* the baseline with
//! that digest becomes the durable one, and the journal is trimmed only once
//! the cluster holds a digest: a restart after a crash finds its own
//! unpublished baseline in the journal, after the published one, and raises no
//! false alarm.
//!
//! Records are encoded in binary ([`record`], store version 3: about 100
//! bytes a file, 190 bytes of disk with the B-tree). At start the digest is
//! recomputed on as many threads as a scan hashes on ([`files_sum`]).
//!
//! A node upgraded from a version that kept the baseline as one JSON document
//! ([`LEGACY_FILE`]) is migrated on start: the document's digest is checked
//! like any baseline's, its records are imported, and the document is set
//! aside only once the imported baseline is saved (its digest journaled). A
//! store of version 2 (records in JSON) is upgraded the same way: its digest
//! recomputed and checked, its records streamed into a new store, which
//! replaces it at the first save, the old file kept aside
//! ([`UPGRADED_FILE`]).
//!
//! Its rules live behind methods: [`Baseline::establish_path`] (the silent first
//! baseline of a new entry), [`Baseline::mark_reported`],
//! [`Baseline::settled`] (back to the approved state), [`Baseline::approve`]
//! and [`Baseline::forget`]. Nothing is forgotten as a side effect: a policy
//! that stops being served keeps its baseline.
//!
//! [redb]: https://docs.rs/redb

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::FileAttributes;
use redb::{Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

mod record;

/// File name of the baseline in the state directory.
pub const FILE: &str = "baseline.redb";
/// File name of the baseline of earlier versions (one JSON document), migrated
/// on start.
pub const LEGACY_FILE: &str = "baseline.json";
/// File name of the digest journal in the state directory.
pub const JOURNAL: &str = "baseline.journal";
/// A baseline being built from nothing, until its first save moves it over
/// [`FILE`] (the old one stays in place until then).
const NEW_FILE: &str = ".baseline.redb.new";
/// Where a store of an earlier version is kept once it has been upgraded.
const UPGRADED_FILE: &str = "baseline.redb.v2.migrated";
/// The store's version: 3 encodes records in binary ([`record`]).
const VERSION: &[u8] = b"3";
/// The version before, with records in JSON: upgraded on start.
const VERSION_JSON_RECORDS: &[u8] = b"2";
const LEGACY_VERSION: u32 = 1;
/// Memory the database may use for caching pages. redb's default is 1 GiB;
/// every access of a scan is in key order, so a small cache serves it.
pub const CACHE_BYTES: usize = 4 << 20;
/// Changed records kept in memory before a scan writes them.
const BATCH: usize = 4096;
/// Changes of approved states remembered for [`Baseline::approved_changes_since`]
/// (a reader further behind recomputes what it derives from them).
const APPROVED_LOG: usize = 1024;

/// Records by host path (UTF-8, compared as bytes: the same order, without
/// validating both keys at each comparison).
const FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("files");
/// The files table of version 2.
const FILES_V2: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const ESTABLISHED: TableDefinition<&str, &[u8]> = TableDefinition::new("established");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TAG_FILE: u8 = b'f';
const TAG_ESTABLISHED: u8 = b'e';
const TAG_POLICY: u8 = b'p';

/// Errors reading or writing the baseline.
#[derive(Debug, Error)]
pub enum BaselineError {
    #[error("baseline {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("baseline {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("baseline {path} is in use by another process")]
    InUse { path: PathBuf },
}

impl BaselineError {
    fn store(path: &Path, e: impl Into<redb::Error>) -> Self {
        let path = path.to_path_buf();
        match e.into() {
            redb::Error::Io(source)
                if !matches!(
                    source.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
                ) =>
            {
                BaselineError::Io { path, source }
            }
            redb::Error::DatabaseAlreadyOpen => BaselineError::InUse { path },
            other => BaselineError::Corrupt {
                path,
                message: other.to_string(),
            },
        }
    }
}

/// One monitored path.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Tracked {
    /// The approved state; `None` for a path approved as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    approved: Option<FileAttributes>,
    /// Digest of the state last reported as different from the approved one, so
    /// a difference is reported once, not at every scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reported: Option<String>,
    /// Bumped each time the path returns to or is approved into its baseline:
    /// the same transition happening again is a new report, not a retry.
    #[serde(default, skip_serializing_if = "is_zero")]
    epoch: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Per-policy bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRecord {
    pub generation: Option<i64>,
    pub baseline_time: Option<Timestamp>,
    pub last_scan_time: Option<Timestamp>,
}

/// The baseline document of earlier versions.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Legacy {
    version: u32,
    #[serde(default)]
    files: BTreeMap<String, Tracked>,
    #[serde(default)]
    established: BTreeSet<String>,
    #[serde(default)]
    policies: BTreeMap<String, PolicyRecord>,
}

/// The multiset hash of the records (LtHash with 16-bit lanes): adding and
/// removing a record costs one BLAKE3 XOF, whatever the size of the set, and
/// the order records were written in does not matter. XOR or a single 256-bit
/// sum would let an attacker balance a forged record with chosen others.
#[derive(Clone, PartialEq, Eq)]
pub struct SetHash(Box<[u16; SetHash::LANES]>);

impl SetHash {
    const LANES: usize = 1024;

    /// The hash of the empty set.
    pub fn zero() -> Self {
        SetHash(Box::new([0; Self::LANES]))
    }

    fn element(tag: u8, key: &[u8], value: &[u8]) -> Box<[u8; 2 * SetHash::LANES]> {
        let mut h = blake3::Hasher::new_derive_key("kube-fim baseline record v2");
        h.update(&[tag]);
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(value);
        let mut out = Box::new([0u8; 2 * Self::LANES]);
        h.finalize_xof().fill(&mut out[..]);
        out
    }

    /// Adds the element (`tag`, `key`, `value`); `tag` separates the kinds
    /// of elements.
    pub fn add(&mut self, tag: u8, key: &str, value: &[u8]) {
        self.add_bytes(tag, key.as_bytes(), value);
    }

    fn add_bytes(&mut self, tag: u8, key: &[u8], value: &[u8]) {
        let e = Self::element(tag, key, value);
        for (lane, b) in self.0.iter_mut().zip(e.chunks_exact(2)) {
            *lane = lane.wrapping_add(u16::from_le_bytes([b[0], b[1]]));
        }
    }

    /// Removes an element added before.
    pub fn remove(&mut self, tag: u8, key: &str, value: &[u8]) {
        let e = Self::element(tag, key.as_bytes(), value);
        for (lane, b) in self.0.iter_mut().zip(e.chunks_exact(2)) {
            *lane = lane.wrapping_sub(u16::from_le_bytes([b[0], b[1]]));
        }
    }

    /// Adds every element of `other` (the hash of the union of two sets).
    fn combine(&mut self, other: &SetHash) {
        for (lane, o) in self.0.iter_mut().zip(other.0.iter()) {
            *lane = lane.wrapping_add(*o);
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|l| l.to_le_bytes()).collect()
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 2 * Self::LANES {
            return None;
        }
        let mut s = Self::zero();
        for (lane, c) in s.0.iter_mut().zip(b.chunks_exact(2)) {
            *lane = u16::from_le_bytes([c[0], c[1]]);
        }
        Some(s)
    }

    /// BLAKE3 of the lanes, in hex (the baseline's: the digest published in
    /// the cluster).
    pub fn digest(&self) -> String {
        blake3::hash(&self.to_bytes()).to_hex().to_string()
    }
}

/// A change of a path's approved state (`None`: approved as absent, or not
/// known), numbered in the order it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovedChange {
    pub seq: u64,
    pub key: String,
    pub before: Option<FileAttributes>,
    pub after: Option<FileAttributes>,
}

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
struct Reader {
    files: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    last: Option<(String, Option<Tracked>)>,
}

/// The persisted state.
pub struct Baseline {
    db: Arc<Database>,
    state: PathBuf,
    /// Built from nothing at [`NEW_FILE`] until its first save.
    fresh: bool,
    /// Imported from [`LEGACY_FILE`] (with its digest), set aside at the first
    /// save.
    legacy: Option<String>,
    /// Digest of the committed records.
    sum: SetHash,
    /// Transactions committed since the baseline was opened (a record read
    /// ahead is current while this has not moved, see [`Snapshot`]).
    writes: u64,
    /// Records changed since the last write (`None`: removed).
    pending: BTreeMap<String, Option<Tracked>>,
    /// Records being written in the background (see
    /// [`Baseline::flush_if_full`]): read as changes under `pending`.
    writing: Option<Writing>,
    /// `policy/entry` pairs whose first baseline is complete: only they report.
    /// (A few per policy: held in memory, written when changed.)
    established: BTreeSet<String>,
    policies: BTreeMap<String, PolicyRecord>,
    /// Keys of `established` and `policies` changed since the last write.
    changed: BTreeSet<(u8, String)>,
    reader: Mutex<Reader>,
    /// Changed since the last save.
    dirty: bool,
    /// The last [`APPROVED_LOG`] changes of approved states, and the number
    /// of changes made since the baseline was opened.
    approved_log: VecDeque<ApprovedChange>,
    approved_seq: u64,
}

/// A transaction of changed records on its own thread, while a scan goes on.
struct Writing {
    records: Arc<BTreeMap<String, Option<Tracked>>>,
    done: std::thread::JoinHandle<Result<SetHash, BaselineError>>,
}

/// Writes changed records into `files`, keeping `sum` up to date.
fn write_records(
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

/// One transaction, not durable (a baseline being built: nothing journals
/// it), of changed records; the digest of the store after it.
fn write_behind(
    db: &Database,
    path: &Path,
    records: &BTreeMap<String, Option<Tracked>>,
    mut sum: SetHash,
) -> Result<SetHash, BaselineError> {
    let store = |e: redb::Error| BaselineError::store(path, e);
    let mut tx = db.begin_write().map_err(|e| store(e.into()))?;
    tx.set_durability(Durability::None)
        .map_err(|e| store(redb::Error::Corrupted(e.to_string())))?;
    {
        let mut files = tx.open_table(FILES).map_err(|e| store(e.into()))?;
        write_records(&mut files, records, &mut sum).map_err(store)?;
        let mut meta = tx.open_table(META).map_err(|e| store(e.into()))?;
        meta.insert("sum", sum.to_bytes().as_slice())
            .map_err(|e| store(e.into()))?;
    }
    tx.commit().map_err(|e| store(e.into()))?;
    Ok(sum)
}

/// Records handed at once to a thread verifying the files table.
const VERIFY_BATCH: usize = 1024;

/// Why the files table could not be verified.
enum Unreadable {
    Store(redb::Error),
    /// A record that does not decode: its key and the error.
    Record(String),
}

/// Records copied out of the files table, verified on another thread.
#[derive(Default)]
struct RecordBatch {
    bytes: Vec<u8>,
    /// (end of the key, end of the value) of each record in `bytes`.
    ends: Vec<(usize, usize)>,
}

impl RecordBatch {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((key_end, self.bytes.len()));
    }

    fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(key_end, end)| {
            let record = (&self.bytes[start..key_end], &self.bytes[key_end..end]);
            start = end;
            record
        })
    }
}

/// Decodes a record of the files table of `version` (one that does not is
/// corrupt).
fn decode_record(version: &[u8], value: &[u8]) -> Result<Tracked, String> {
    if version == VERSION_JSON_RECORDS {
        serde_json::from_slice(value).map_err(|e| e.to_string())
    } else {
        record::decode(value).map_err(|e| e.to_string())
    }
}

/// Decodes a record of the files table (one that does not is corrupt) and
/// adds it to `sum`.
fn verify_record(
    version: &[u8],
    key: &[u8],
    value: &[u8],
    sum: &mut SetHash,
) -> Result<(), Unreadable> {
    decode_record(version, value)
        .map_err(|e| Unreadable::Record(format!("{}: {e}", String::from_utf8_lossy(key))))?;
    sum.add_bytes(TAG_FILE, key, value);
    Ok(())
}

/// The digest of every record of the files table, each verified. With more
/// than one thread the table is read on the calling thread and the records
/// are decoded and hashed on `threads` others (the digest is a sum: the parts
/// add up whatever the order); a start of the agent waits for this pass.
fn files_sum<K>(
    files: &ReadOnlyTable<K, &'static [u8]>,
    version: &[u8],
    threads: usize,
) -> Result<SetHash, Unreadable>
where
    K: redb::Key + 'static,
    for<'a> K::SelfType<'a>: AsRef<[u8]>,
{
    let store = |e: redb::StorageError| Unreadable::Store(e.into());
    let mut sum = SetHash::zero();
    if threads <= 1 {
        for item in files.iter().map_err(store)? {
            let (k, v) = item.map_err(store)?;
            verify_record(version, k.value().as_ref(), v.value(), &mut sum)?;
        }
        return Ok(sum);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<RecordBatch>(2 * threads);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<SetHash, Unreadable> {
                    if let Err(e) = crate::budget::lower_this_thread() {
                        tracing::debug!(%e, "baseline verification keeps its priority");
                    }
                    let mut sum = SetHash::zero();
                    loop {
                        let batch = rx
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        let Ok(batch) = batch else {
                            return Ok(sum);
                        };
                        for (k, v) in batch.records() {
                            verify_record(version, k, v, &mut sum)?;
                        }
                    }
                })
            })
            .collect();
        let read = (|| -> Result<(), Unreadable> {
            let mut batch = RecordBatch::default();
            for item in files.iter().map_err(store)? {
                let (k, v) = item.map_err(store)?;
                batch.push(k.value().as_ref(), v.value());
                if batch.ends.len() == VERIFY_BATCH && tx.send(std::mem::take(&mut batch)).is_err()
                {
                    // Every verifier stopped: one found a corrupt record.
                    return Ok(());
                }
            }
            let _ = tx.send(batch);
            Ok(())
        })();
        drop(tx);
        for worker in workers {
            let part = worker
                .join()
                .unwrap_or_else(|_| Err(Unreadable::Record("verification failed".into())))?;
            sum.combine(&part);
        }
        read.map(|()| sum)
    })
}

/// Key of an established entry.
fn entry_key(policy: &str, entry: &str) -> String {
    format!("{policy}/{entry}")
}

/// Creates the state directory readable by its owner only.
pub fn create_state_dir(state: &Path) -> std::io::Result<()> {
    fs::create_dir_all(state)?;
    fs::set_permissions(state, fs::Permissions::from_mode(0o700))
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}.tmp", name.unwrap_or_default()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir).and_then(|d| d.sync_all())
}

/// Moves the baseline of `state` (whatever its format) aside with `suffix`
/// (kept for forensics, never silently replaced); the paths it was moved to.
pub fn set_aside(state: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut moved = Vec::new();
    for name in [FILE, LEGACY_FILE] {
        let from = state.join(name);
        let to = state.join(format!("{name}.{suffix}"));
        if fs::rename(&from, &to).is_ok() {
            moved.push(to);
        }
    }
    moved
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES);
    b
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Baseline {
    /// Opens the baseline of `state` and recomputes its digest from its
    /// records, or `None` if there is none yet.
    pub fn load(state: &Path) -> Result<Option<(Baseline, String)>, BaselineError> {
        let path = state.join(FILE);
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::migrate(state),
            Err(source) => return Err(BaselineError::Io { path, source }),
        }
        // redb asserts some of what it reads from the file's header: a
        // damaged file is a corrupt baseline, not a reason to stop.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let db = builder()
                .open(&path)
                .map_err(|e| BaselineError::store(&path, e))?;
            let mut b = Self::with_db(db, state, false);
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
        let path = state.join(NEW_FILE);
        let io = |source| BaselineError::Io {
            path: path.clone(),
            source,
        };
        create_state_dir(state).map_err(io)?;
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
        let b = Self::with_db(db, state, true);
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

    fn with_db(db: Database, state: &Path, fresh: bool) -> Baseline {
        Baseline {
            db: Arc::new(db),
            state: state.to_path_buf(),
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
        }
    }

    /// One streaming pass over every record: the small tables are loaded, the
    /// digest recomputed and compared with the one the store recorded.
    /// Returns the store's version (this one's or the one before).
    fn read_all(&mut self, path: &Path) -> Result<&'static [u8], BaselineError> {
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
        let recorded = meta
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
            let rec: PolicyRecord = serde_json::from_slice(v.value())
                .map_err(|e| corrupt(format!("policy {}: {e}", k.value())))?;
            sum.add(TAG_POLICY, k.value(), v.value());
            self.policies.insert(k.value().to_string(), rec);
        }
        if recorded.as_ref() != Some(&sum) {
            warn!(
                path = %path.display(),
                "the baseline's records do not add up to the digest it recorded: edited outside the agent"
            );
        }
        self.sum = sum;
        Ok(version)
    }

    /// Upgrades a store of the version before (`old`, its digest `digest`
    /// recomputed from its records) into a new store of this version,
    /// streaming its records in batches like a first baseline. Like an
    /// import, the digest returned is the old store's (what the cluster
    /// holds, checked like any baseline's); the new store replaces the old one
    /// at the first save, with the old one's digest journaled before, and the
    /// old file is kept aside ([`UPGRADED_FILE`]).
    fn upgrade(old: Baseline, digest: String) -> Result<(Baseline, String), BaselineError> {
        let path = old.state.join(FILE);
        let store = |e: redb::Error| BaselineError::store(&path, e);
        let mut b = Baseline::create(&old.state)?;
        let tx = old.db.begin_read().map_err(|e| store(e.into()))?;
        let files = tx.open_table(FILES_V2).map_err(|e| store(e.into()))?;
        let mut n = 0u64;
        for item in files.iter().map_err(|e| store(e.into()))? {
            let (k, v) = item.map_err(|e| store(e.into()))?;
            let t = decode_record(VERSION_JSON_RECORDS, v.value()).map_err(|message| {
                BaselineError::Corrupt {
                    path: path.clone(),
                    message: format!("{}: {message}", k.value()),
                }
            })?;
            b.pending.insert(k.value().to_string(), Some(t));
            b.flush_if_full()?;
            n += 1;
        }
        for k in &old.established {
            b.changed.insert((TAG_ESTABLISHED, k.clone()));
        }
        for k in old.policies.keys() {
            b.changed.insert((TAG_POLICY, k.clone()));
        }
        b.established.clone_from(&old.established);
        b.policies.clone_from(&old.policies);
        b.write(false)?;
        b.legacy = Some(digest.clone());
        info!(files = n, from = %path.display(), "baseline store upgraded to version 3 (binary records); the old store is kept aside at the first save");
        Ok((b, digest))
    }

    /// Imports the baseline document of earlier versions, if there is one.
    /// Its digest is the one returned (what the cluster holds): it is checked
    /// like any baseline's; the import becomes the baseline at the first save.
    fn migrate(state: &Path) -> Result<Option<(Baseline, String)>, BaselineError> {
        let path = state.join(LEGACY_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BaselineError::Io { path, source }),
        };
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let legacy: Legacy =
            serde_json::from_slice(&bytes).map_err(|e| BaselineError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        drop(bytes);
        if legacy.version != LEGACY_VERSION {
            return Err(BaselineError::Corrupt {
                path,
                message: format!(
                    "version {} (this agent reads {LEGACY_VERSION})",
                    legacy.version
                ),
            });
        }
        let mut b = Baseline::create(state)?;
        let files = legacy.files.len();
        for (k, t) in legacy.files {
            b.pending.insert(k, Some(t));
            b.flush_if_full()?;
        }
        for k in legacy.established {
            b.changed.insert((TAG_ESTABLISHED, k.clone()));
            b.established.insert(k);
        }
        for (k, rec) in legacy.policies {
            b.changed.insert((TAG_POLICY, k.clone()));
            b.policies.insert(k, rec);
        }
        b.write(false)?;
        b.legacy = Some(digest.clone());
        info!(files, from = %path.display(), "baseline imported into the store; the document is set aside at the first save");
        Ok(Some((b, digest)))
    }

    /// Writes the changes and makes this baseline the one on disk, its digest
    /// journaled first; returns the digest of what was written.
    pub fn save(&mut self) -> Result<String, BaselineError> {
        if !self.dirty {
            return Ok(self.sum.digest());
        }
        if let Some(imported) = &self.legacy {
            // The document this baseline was imported from was checked against
            // the cluster's digest before this first save: journaled, the
            // import written after it is this agent's own state, even if a
            // crash comes before the cluster holds the new digest (a journal
            // from before the document's digest was journaled lacks it).
            let journal = Journal::new(&self.state);
            if !journal.read().contains(imported) {
                journal
                    .append(imported)
                    .map_err(|source| BaselineError::Io {
                        path: self.state.join(JOURNAL),
                        source,
                    })?;
            }
        }
        let digest = self.write(true)?;
        if self.fresh {
            let io = |source| BaselineError::Io {
                path: self.state.join(FILE),
                source,
            };
            if self.legacy.is_some() {
                // A store of the version before: kept as it was.
                match fs::hard_link(self.state.join(FILE), self.state.join(UPGRADED_FILE)) {
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
            fs::rename(self.state.join(NEW_FILE), self.state.join(FILE)).map_err(io)?;
            sync_dir(&self.state).map_err(io)?;
            self.fresh = false;
            if self.legacy.take().is_some() {
                let aside = self.state.join(format!("{LEGACY_FILE}.migrated"));
                if fs::rename(self.state.join(LEGACY_FILE), &aside).is_ok() {
                    info!(aside = %aside.display(), "the baseline document of the earlier version is set aside");
                }
            }
        }
        self.dirty = false;
        Ok(digest)
    }

    /// Writes the pending changes once there are [`BATCH`] of them, so a scan
    /// of any size holds a bounded number in memory. A baseline being built
    /// (not the baseline yet: nothing to journal) is written on another
    /// thread while the scan goes on, one batch at a time.
    pub fn flush_if_full(&mut self) -> Result<(), BaselineError> {
        if self.pending.len() < BATCH {
            return Ok(());
        }
        if !self.fresh {
            return self.save().map(|_| ());
        }
        self.finish_writing()?;
        let records = Arc::new(std::mem::take(&mut self.pending));
        let (db, sum, path) = (
            Arc::clone(&self.db),
            self.sum.clone(),
            self.state.join(NEW_FILE),
        );
        let job = Arc::clone(&records);
        match std::thread::Builder::new()
            .name("baseline-write".into())
            .spawn(move || write_behind(&db, &path, &job, sum))
        {
            Ok(done) => {
                self.writing = Some(Writing { records, done });
                Ok(())
            }
            Err(e) => {
                warn!(%e, "writing the baseline on this thread");
                self.pending = Arc::unwrap_or_clone(records);
                self.write(false).map(|_| ())
            }
        }
    }

    /// Waits for the records being written in the background; if they could
    /// not be, they are pending again.
    pub fn finish_writing(&mut self) -> Result<(), BaselineError> {
        let Some(w) = self.writing.take() else {
            return Ok(());
        };
        let result = w.done.join().unwrap_or_else(|_| {
            Err(BaselineError::Io {
                path: self.state.join(NEW_FILE),
                source: std::io::Error::other("the baseline writer stopped"),
            })
        });
        // A reader's snapshot would keep the pages the commit freed.
        *self.reader() = Reader::default();
        match result {
            Ok(sum) => {
                self.sum = sum;
                self.writes += 1;
                Ok(())
            }
            Err(e) => {
                for (k, t) in Arc::unwrap_or_clone(w.records) {
                    self.pending.entry(k).or_insert(t);
                }
                Err(e)
            }
        }
    }

    /// One transaction with every pending change; `durable` journals the
    /// digest before the commit makes it the state on disk.
    fn write(&mut self, durable: bool) -> Result<String, BaselineError> {
        self.finish_writing()?;
        let path = self.state.join(if self.fresh { NEW_FILE } else { FILE });
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
        }
        let digest = sum.digest();
        if durable {
            Journal::new(&self.state)
                .append(&digest)
                .map_err(|source| BaselineError::Io {
                    path: self.state.join(JOURNAL),
                    source,
                })?;
        }
        // A reader's snapshot would keep the pages this commit frees.
        *self.reader() = Reader::default();
        tx.commit().map_err(|e| store(e.into()))?;
        self.writes += 1;
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
        let path = self.state.join(FILE);
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

    fn reader(&self) -> MutexGuard<'_, Reader> {
        self.reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the committed files table.
    fn with_files<R>(
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
    fn record(&self, key: &str) -> Option<Tracked> {
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

    fn put(&mut self, key: &str, t: Option<Tracked>) {
        self.pending.insert(key.to_string(), t);
        self.dirty = true;
    }

    /// Remembers a change of a path's approved state (see
    /// [`Baseline::approved_changes_since`]).
    fn log_approved(
        &mut self,
        key: &str,
        before: Option<FileAttributes>,
        after: Option<&FileAttributes>,
    ) {
        if before.as_ref() == after {
            return;
        }
        self.approved_seq += 1;
        if self.approved_log.len() == APPROVED_LOG {
            self.approved_log.pop_front();
        }
        self.approved_log.push_back(ApprovedChange {
            seq: self.approved_seq,
            key: key.to_string(),
            before,
            after: after.cloned(),
        });
    }

    /// The number of changes of approved states made so far: a reader that
    /// derived something from the approved states now asks
    /// [`Baseline::approved_changes_since`] with it later.
    pub fn approved_seq(&self) -> u64 {
        self.approved_seq
    }

    /// The changes of approved states made after the `seq`th, in order, or
    /// `None` if they are no longer all remembered (more than a thousand
    /// or so: recompute from the records).
    pub fn approved_changes_since(
        &self,
        seq: u64,
    ) -> Option<impl Iterator<Item = &ApprovedChange>> {
        if seq > self.approved_seq {
            return None;
        }
        let first = self
            .approved_log
            .front()
            .map_or(self.approved_seq + 1, |c| c.seq);
        (seq + 1 >= first).then(|| self.approved_log.iter().filter(move |c| c.seq > seq))
    }

    /// Calls `f` on every record whose key starts with `prefix`, in key order.
    fn for_each_under(&self, prefix: &str, mut f: impl FnMut(&str, &Tracked)) {
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

    /// Writes this baseline as a store of version 2 (records in JSON) at
    /// `path`, as the version before wrote it, and returns its digest (to
    /// test the upgrade).
    #[cfg(test)]
    #[allow(clippy::expect_used)]
    pub(crate) fn write_as_version_2(&self, path: &Path) -> String {
        let db = builder().create(path).expect("a store of version 2");
        let tx = db.begin_write().expect("a transaction");
        let mut sum = SetHash::zero();
        {
            let mut files = tx.open_table(FILES_V2).expect("files");
            self.for_each_under("", |k, t| {
                let v = encode(t);
                sum.add(TAG_FILE, k, &v);
                files.insert(k, v.as_slice()).expect("a record");
            });
            let mut established = tx.open_table(ESTABLISHED).expect("established");
            for k in &self.established {
                sum.add(TAG_ESTABLISHED, k, b"");
                established
                    .insert(k.as_str(), b"".as_slice())
                    .expect("an entry");
            }
            let mut policies = tx.open_table(POLICIES).expect("policies");
            for (k, rec) in &self.policies {
                let v = encode(rec);
                sum.add(TAG_POLICY, k, &v);
                policies.insert(k.as_str(), v.as_slice()).expect("a policy");
            }
            let mut meta = tx.open_table(META).expect("meta");
            meta.insert("version", VERSION_JSON_RECORDS)
                .expect("version");
            meta.insert("sum", sum.to_bytes().as_slice()).expect("sum");
        }
        tx.commit().expect("a commit");
        sum.digest()
    }

    /// The baseline in the document format of earlier versions (to test
    /// their migration).
    #[cfg(test)]
    pub(crate) fn to_legacy_document(&self) -> Vec<u8> {
        let mut files = serde_json::Map::new();
        self.for_each_under("", |k, t| {
            files.insert(k.to_string(), serde_json::to_value(t).unwrap_or_default());
        });
        let doc = serde_json::json!({
            "version": LEGACY_VERSION,
            "files": files,
            "established": self.established,
            "policies": self.policies,
        });
        serde_json::to_vec(&doc).unwrap_or_default()
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

    /// Whether changes wait to be written.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.writing.is_some()
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

    /// Whether anything changed since the last save.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The approved state of a path.
    pub fn approved(&self, key: &str) -> Option<FileAttributes> {
        self.record(key).and_then(|t| t.approved)
    }

    /// Whether the baseline knows the path (present or approved as absent).
    pub fn knows(&self, key: &str) -> bool {
        self.record(key).is_some()
    }

    /// Digest of the state last reported for a path.
    pub fn reported(&self, key: &str) -> Option<String> {
        self.record(key).and_then(|t| t.reported)
    }

    /// The path's epoch (see the reporting protocol in [`crate::report`]).
    pub fn epoch(&self, key: &str) -> u64 {
        self.record(key).map_or(0, |t| t.epoch)
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

    /// Whether an entry's first baseline is complete (its changes are reported).
    pub fn is_established(&self, policy: &str, entry: &str) -> bool {
        self.established.contains(&entry_key(policy, entry))
    }

    /// Whether any entry of `policy` is established.
    pub fn knows_policy(&self, policy: &str) -> bool {
        let prefix = format!("{policy}/");
        self.established.iter().any(|k| k.starts_with(&prefix))
    }

    /// Marks an entry's first baseline complete.
    pub fn establish(&mut self, policy: &str, entry: &str) {
        let k = entry_key(policy, entry);
        if self.established.insert(k.clone()) {
            self.changed.insert((TAG_ESTABLISHED, k));
            self.dirty = true;
        }
    }

    /// Records the current state of a path only entries being established
    /// watch: their first baseline, silently.
    pub fn establish_path(&mut self, key: &str, state: Option<FileAttributes>) {
        let old = self.record(key);
        match state {
            Some(s) => {
                let mut t = old.unwrap_or_default();
                if t.approved.as_ref() != Some(&s) || t.reported.is_some() {
                    let before = t.approved.replace(s);
                    t.reported = None;
                    self.log_approved(key, before, t.approved.as_ref());
                    self.put(key, Some(t));
                }
            }
            None => {
                if let Some(t) = old {
                    self.log_approved(key, t.approved, None);
                    self.put(key, None);
                }
            }
        }
    }

    /// Remembers that the state with `digest` was reported (after it was queued).
    pub fn mark_reported(&mut self, key: &str, digest: String) {
        let mut t = self.record(key).unwrap_or_default();
        if t.reported.as_ref() != Some(&digest) {
            t.reported = Some(digest);
            self.put(key, Some(t));
        }
    }

    /// The path is back in its approved state: the next difference is a new
    /// transition.
    pub fn settled(&mut self, key: &str) {
        if let Some(mut t) = self.record(key)
            && t.reported.take().is_some()
        {
            t.epoch += 1;
            self.put(key, Some(t));
        }
    }

    /// Records attributes measured for the first time (a link count, a mount)
    /// into the approved state of a path that still matches it on everything
    /// else: the
    /// path is in its approved state, so the next difference is a new
    /// transition.
    pub fn adopt(&mut self, key: &str, state: FileAttributes) {
        let mut t = self.record(key).unwrap_or_default();
        let before = t.approved.replace(state);
        self.log_approved(key, before, t.approved.as_ref());
        if t.reported.take().is_some() {
            t.epoch += 1;
        }
        self.put(key, Some(t));
    }

    /// Approves `state` as the path's baseline (an explicit, recorded act).
    pub fn approve(&mut self, key: &str, state: Option<FileAttributes>) {
        let mut t = self.record(key).unwrap_or_default();
        let before = std::mem::replace(&mut t.approved, state);
        self.log_approved(key, before, t.approved.as_ref());
        t.reported = None;
        t.epoch += 1;
        self.put(key, Some(t));
    }

    /// Forgets a policy's entries and its record, so its next scan is a first
    /// baseline again (only ever on an explicit request). Paths stay known.
    pub fn forget(&mut self, policy: &str) {
        let prefix = format!("{policy}/");
        let gone: Vec<String> = self
            .established
            .iter()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in gone {
            self.established.remove(&k);
            self.changed.insert((TAG_ESTABLISHED, k));
        }
        if self.policies.remove(policy).is_some() {
            self.changed.insert((TAG_POLICY, policy.to_string()));
        }
        self.dirty = true;
    }

    /// A policy's record.
    pub fn policy(&self, name: &str) -> Option<&PolicyRecord> {
        self.policies.get(name)
    }

    /// Records a completed scan of a policy.
    pub fn scanned(&mut self, name: &str, generation: Option<i64>, now: Timestamp) {
        let rec = self.policies.entry(name.to_string()).or_default();
        rec.generation = generation;
        rec.baseline_time.get_or_insert(now);
        rec.last_scan_time = Some(now);
        self.changed.insert((TAG_POLICY, name.to_string()));
        self.dirty = true;
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Err(error) = self.finish_writing() {
            warn!(%error, "baseline changes not written");
        }
    }
}

/// The journal of baseline digests written on this node.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal of the state directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Journal {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL)
    }

    /// Digests in the order they were written (unreadable lines are skipped).
    pub fn read(&self) -> Vec<String> {
        fs::read_to_string(self.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
            .collect()
    }

    /// Appends a digest durably.
    pub fn append(&self, digest: &str) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(self.path())?;
        f.write_all(format!("{digest}\n").as_bytes())?;
        f.sync_all()
    }

    /// The cluster holds `published`: drops what was written before it.
    pub fn published(&self, published: &str) -> std::io::Result<()> {
        let all = self.read();
        let Some(i) = all.iter().rposition(|d| d == published) else {
            return Ok(());
        };
        if i == 0 {
            return Ok(());
        }
        let rest: String = all[i..].iter().map(|d| format!("{d}\n")).collect();
        write_private(&self.dir, &self.path(), rest.as_bytes())
    }

    /// Whether `on_disk` is a baseline this agent wrote after the one the
    /// cluster holds (`published`): its own state, not someone else's edit.
    pub fn vouches(&self, published: &str, on_disk: &str) -> bool {
        let all = self.read();
        match (
            all.iter().position(|d| d == published),
            all.iter().rposition(|d| d == on_disk),
        ) {
            (Some(p), Some(d)) => p <= d,
            _ => false,
        }
    }
}

/// Digest of a file state, to remember what was reported.
pub fn state_digest(attrs: Option<&FileAttributes>) -> String {
    match attrs {
        None => "absent".into(),
        Some(a) => blake3::hash(&serde_json::to_vec(a).unwrap_or_default())
            .to_hex()
            .to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn attrs(size: u64) -> FileAttributes {
        FileAttributes {
            size: Some(size),
            ..FileAttributes::default()
        }
    }

    fn reopen(state: &Path) -> (Baseline, String) {
        Baseline::load(state).unwrap().unwrap()
    }

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
    fn the_state_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut b = Baseline::create(&state).unwrap();
        b.save().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(FILE)), 0o600);
        assert_eq!(mode(&state.join(JOURNAL)), 0o600);
    }

    #[test]
    fn the_journal_vouches_for_unpublished_states_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        let d1 = b.save().unwrap();
        b.establish("p", "e");
        let d2 = b.save().unwrap();
        assert_ne!(d1, d2);
        let j = Journal::new(dir.path());
        assert!(j.vouches(&d1, &d2), "written after the published one");
        assert!(!j.vouches(&d2, &"0".repeat(64)), "someone else's edit");
        j.published(&d2).unwrap();
        assert_eq!(j.read(), vec![d2.clone()]);
        assert!(!j.vouches(&d1, &d2), "trimmed: the cluster holds d2");
    }

    #[test]
    fn a_large_change_is_written_in_batches_each_journaled_before_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        let published = b.save().unwrap();
        for i in 0..(2 * BATCH + 10) {
            b.establish_path(&format!("/d/f{i:05}"), Some(attrs(i as u64)));
            b.flush_if_full().unwrap();
        }
        assert!(b.pending.len() < BATCH, "written as the scan goes");
        // A crash now: what is on disk is a state the journal vouches for.
        let written = Journal::new(dir.path()).read();
        assert!(written.len() >= 3, "{written:?}");
        drop(b);
        let (b, on_disk) = reopen(dir.path());
        assert!(Journal::new(dir.path()).vouches(&published, &on_disk));
        assert_eq!(b.keys_under("/d").len(), 2 * BATCH);
    }

    #[test]
    fn a_baseline_being_built_is_written_in_the_background_and_read_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        let n = 2 * BATCH + 10;
        for i in 0..n {
            b.establish_path(&format!("/d/f{i:05}"), Some(attrs(i as u64)));
            b.flush_if_full().unwrap();
            if i == BATCH {
                // The first batch is on its way to the store: still read.
                assert!(b.writing.is_some());
                assert_eq!(b.approved("/d/f00001"), Some(attrs(1)));
                assert!(b.children("/d")["f00002"].known);
                assert_eq!(b.keys_under("/d").len(), BATCH + 1);
            }
        }
        assert_eq!(b.keys_under("/d").len(), n);
        assert_eq!(b.children("/").len(), 1);
        let saved = b.save().unwrap();
        assert!(b.writing.is_none());
        drop(b);
        let (b, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, saved, "the digest kept is the one of the records");
        assert_eq!(
            b.approved(&format!("/d/f{:05}", n - 1)),
            Some(attrs(n as u64 - 1))
        );
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

    #[test]
    fn epochs_tell_a_recurrence_from_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish_path("/f", Some(attrs(1)));
        assert_eq!(b.epoch("/f"), 0);
        b.mark_reported("/f", "x".into());
        b.save().unwrap();
        b.mark_reported("/f", "x".into());
        assert!(!b.is_dirty(), "a retry changes nothing");
        assert_eq!(b.epoch("/f"), 0, "a retry keeps the epoch");
        b.settled("/f");
        assert_eq!(b.epoch("/f"), 1, "back to the approved state");
        b.save().unwrap();
        b.settled("/f");
        assert_eq!(b.epoch("/f"), 1, "nothing was reported");
        b.approve("/f", Some(attrs(2)));
        assert_eq!(b.epoch("/f"), 2);
        assert_eq!(b.approved("/f"), Some(attrs(2)));
        assert!(b.reported("/f").is_none());
    }

    #[test]
    fn a_torn_new_baseline_never_replaces_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish("p", "e");
        let d = b.save().unwrap();
        drop(b);
        fs::write(dir.path().join(NEW_FILE), b"redb\0torn").unwrap();
        let (loaded, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, d);
        assert!(loaded.is_established("p", "e"));
    }

    fn version_of(path: &Path) -> Vec<u8> {
        let db = builder().open(path).unwrap();
        let tx = db.begin_read().unwrap();
        let meta = tx.open_table(META).unwrap();
        meta.get("version").unwrap().unwrap().value().to_vec()
    }

    #[test]
    fn a_store_of_version_2_is_upgraded_without_an_alarm_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        for i in 0..(BATCH + 10) {
            b.establish_path(&format!("/etc/f{i}"), Some(attrs(i as u64)));
        }
        b.mark_reported("/etc/f1", "v2-abc".into());
        b.establish("p", "etc");
        b.scanned("p", Some(4), Timestamp::UNIX_EPOCH);
        b.save().unwrap();
        let old = dir.path().join("old.redb");
        // What the version before kept on disk, and published.
        let published = b.write_as_version_2(&old);
        drop(b);
        fs::rename(&old, dir.path().join(FILE)).unwrap();
        fs::remove_file(dir.path().join(JOURNAL)).unwrap();
        Journal::new(dir.path()).append(&published).unwrap();

        let (mut up, digest) = reopen(dir.path());
        assert_eq!(digest, published, "the old store's digest: no alarm");
        assert_eq!(up.approved("/etc/f7"), Some(attrs(7)));
        assert_eq!(up.reported("/etc/f1").as_deref(), Some("v2-abc"));
        assert!(up.is_established("p", "etc"));
        assert_eq!(up.policy("p").unwrap().generation, Some(4));
        assert_eq!(
            version_of(&dir.path().join(FILE)),
            b"2",
            "replaced only when saved"
        );
        let saved = up.save().unwrap();
        assert_ne!(saved, published, "the records are encoded anew");
        assert!(Journal::new(dir.path()).vouches(&published, &saved));
        drop(up);
        assert_eq!(version_of(&dir.path().join(FILE)), VERSION);
        assert_eq!(version_of(&dir.path().join(UPGRADED_FILE)), b"2");
        let (again, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, saved);
        assert_eq!(
            again.approved(&format!("/etc/f{}", BATCH + 9)),
            Some(attrs(BATCH as u64 + 9))
        );
    }

    #[test]
    fn a_store_of_version_2_edited_on_the_node_is_noticed_through_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish_path("/etc/shadow", Some(attrs(1)));
        b.save().unwrap();
        let path = dir.path().join(FILE);
        drop(b);
        let b = reopen(dir.path()).0;
        fs::remove_file(&path).unwrap();
        let published = b.write_as_version_2(&path);
        drop(b);
        {
            let db = builder().open(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut files = tx.open_table(FILES_V2).unwrap();
                let forged = encode(&Tracked {
                    approved: Some(attrs(2)),
                    ..Tracked::default()
                });
                files.insert("/etc/shadow", forged.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let (up, digest) = reopen(dir.path());
        assert_ne!(digest, published);
        assert_eq!(up.approved("/etc/shadow"), Some(attrs(2)));
    }

    #[test]
    fn records_are_verified_alike_on_any_number_of_threads() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        let n = 3 * VERIFY_BATCH + 17;
        for i in 0..n {
            b.establish_path(&format!("/f{i:05}"), Some(attrs(i as u64)));
        }
        b.save().unwrap();
        drop(b);
        let sums = |path: &Path| -> Vec<Result<Vec<u8>, String>> {
            let db = builder().open(path).unwrap();
            let tx = db.begin_read().unwrap();
            let files = tx.open_table(FILES).unwrap();
            [1, 2, 3]
                .map(|threads| match files_sum(&files, VERSION, threads) {
                    Ok(s) => Ok(s.to_bytes()),
                    Err(Unreadable::Record(m)) => Err(m),
                    Err(Unreadable::Store(e)) => Err(e.to_string()),
                })
                .to_vec()
        };
        let path = dir.path().join(FILE);
        let clean = sums(&path);
        assert!(
            clean.iter().all(|s| s == &clean[0] && s.is_ok()),
            "one digest"
        );
        // One undecodable record in the middle is found, and named.
        {
            let db = builder().open(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(FILES)
                .unwrap()
                .insert("/f02000".as_bytes(), b"\xff".as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        for r in sums(&path) {
            let e = r.unwrap_err();
            assert!(e.starts_with("/f02000: "), "{e}");
        }
        assert!(matches!(
            Baseline::load(dir.path()),
            Err(BaselineError::Corrupt { .. })
        ));
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
    fn the_document_of_earlier_versions_is_imported_whole_and_set_aside_once_saved() {
        let dir = tempfile::tempdir().unwrap();
        let doc = serde_json::json!({
            "version": 1,
            "files": {
                "/etc/hosts": {"approved": {"size": 3}, "reported": "abc", "epoch": 2},
                "/etc/gone": {"epoch": 1},
            },
            "established": ["p/etc"],
            "policies": {"p": {"generation": 4, "baselineTime": "2026-01-01T00:00:00Z", "lastScanTime": null}},
        });
        let bytes = serde_json::to_vec(&doc).unwrap();
        fs::write(dir.path().join(LEGACY_FILE), &bytes).unwrap();
        Journal::new(dir.path())
            .append(&blake3::hash(&bytes).to_hex())
            .unwrap();

        let (mut b, digest) = reopen(dir.path());
        assert_eq!(
            digest,
            blake3::hash(&bytes).to_hex().to_string(),
            "checked against what the cluster holds"
        );
        assert_eq!(b.approved("/etc/hosts"), Some(attrs(3)));
        assert_eq!(b.reported("/etc/hosts").as_deref(), Some("abc"));
        assert_eq!(b.epoch("/etc/hosts"), 2);
        assert!(b.knows("/etc/gone") && b.approved("/etc/gone").is_none());
        assert!(b.is_established("p", "etc"));
        assert_eq!(b.policy("p").and_then(|p| p.generation), Some(4));
        assert!(
            dir.path().join(LEGACY_FILE).exists(),
            "the document stays the baseline until the import is saved"
        );

        let new = b.save().unwrap();
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert!(dir.path().join(format!("{LEGACY_FILE}.migrated")).exists());
        assert!(
            Journal::new(dir.path()).vouches(&digest, &new),
            "the import is this agent's own state, after the published one"
        );
        drop(b);
        let (b, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, new);
        assert_eq!(b.epoch("/etc/hosts"), 2);
    }

    #[test]
    fn changes_of_approved_states_are_remembered_in_order_up_to_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish_path("/a", Some(attrs(1)));
        let seq = b.approved_seq();
        b.mark_reported("/a", "x".into());
        b.settled("/a");
        b.establish_path("/a", Some(attrs(1)));
        assert_eq!(
            b.approved_seq(),
            seq,
            "reports and epochs are not approvals"
        );
        b.approve("/a", Some(attrs(2)));
        b.adopt("/b", attrs(3));
        b.establish_path("/a", None);
        let seen: Vec<(String, Option<u64>, Option<u64>)> = b
            .approved_changes_since(seq)
            .unwrap()
            .map(|c| {
                let size = |a: &Option<FileAttributes>| a.as_ref().and_then(|a| a.size);
                (c.key.clone(), size(&c.before), size(&c.after))
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("/a".to_string(), Some(1), Some(2)),
                ("/b".to_string(), None, Some(3)),
                ("/a".to_string(), Some(2), None),
            ]
        );
        for i in 0..APPROVED_LOG {
            b.approve(&format!("/f{i}"), Some(attrs(1)));
        }
        assert!(b.approved_changes_since(seq).is_none(), "forgotten");
        let recent = b.approved_seq() - 10;
        assert_eq!(b.approved_changes_since(recent).unwrap().count(), 10);
        assert_eq!(
            b.approved_changes_since(b.approved_seq()).unwrap().count(),
            0
        );
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
