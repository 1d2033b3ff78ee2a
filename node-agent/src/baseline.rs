//! The baseline on the node: the approved state of every monitored file, which
//! policy entries are established, and which differences were already reported.
//!
//! Stored as one JSON document written atomically (temporary file, fsync,
//! rename, fsync of the directory): a `kill -9` at any moment leaves the old or
//! the new baseline, never a torn one. One well-understood format with no
//! embedded-database dependency: the agent reads it whole at start and writes it
//! after each batch of changes. Its BLAKE3 digest is published in the cluster,
//! so an edit made on the node while the agent is down is noticed at start.
//!
//! Every digest is appended to a journal (fsynced) *before* the baseline with
//! that digest replaces the old one, and the journal is trimmed only once the
//! cluster holds a digest: a restart after a crash finds its own unpublished
//! baseline in the journal, after the published one, and raises no false alarm.
//!
//! Its rules live behind methods: [`Baseline::establish_path`] (the silent first
//! baseline of a new entry), [`Baseline::mark_reported`],
//! [`Baseline::settled`] (back to the approved state), [`Baseline::approve`]
//! and [`Baseline::forget`]. Nothing is forgotten as a side effect: a policy
//! that stops being served keeps its baseline.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::FileAttributes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File name of the baseline in the state directory.
pub const FILE: &str = "baseline.json";
/// File name of the digest journal in the state directory.
pub const JOURNAL: &str = "baseline.journal";
const VERSION: u32 = 1;

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

/// The whole persisted state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    version: u32,
    /// Host path (escaped, as in FileChange.path) → record.
    files: BTreeMap<String, Tracked>,
    /// `policy/entry` pairs whose first baseline is complete: only they report.
    established: BTreeSet<String>,
    policies: BTreeMap<String, PolicyRecord>,
    /// Changed since the last save.
    #[serde(skip)]
    dirty: bool,
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

impl Baseline {
    /// Reads the baseline of `state`, or `None` if there is none yet.
    pub fn load(state: &Path) -> Result<Option<(Baseline, String)>, BaselineError> {
        let path = state.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BaselineError::Io { path, source }),
        };
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let baseline: Baseline =
            serde_json::from_slice(&bytes).map_err(|e| BaselineError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if baseline.version != VERSION {
            return Err(BaselineError::Corrupt {
                path,
                message: format!("version {} (this agent reads {VERSION})", baseline.version),
            });
        }
        Ok(Some((baseline, digest)))
    }

    /// Writes the baseline atomically, its digest journaled first; returns the
    /// digest of what was written.
    pub fn save(&mut self, state: &Path) -> Result<String, BaselineError> {
        self.version = VERSION;
        let path = state.join(FILE);
        let io = |source| BaselineError::Io {
            path: path.clone(),
            source,
        };
        create_state_dir(state).map_err(io)?;
        let bytes = serde_json::to_vec(self).map_err(|e| BaselineError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let digest = blake3::hash(&bytes).to_hex().to_string();
        Journal::new(state).append(&digest).map_err(io)?;
        write_private(state, &path, &bytes).map_err(io)?;
        self.dirty = false;
        Ok(digest)
    }

    /// Whether anything changed since the last save.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The approved state of a path.
    pub fn approved(&self, key: &str) -> Option<&FileAttributes> {
        self.files.get(key).and_then(|t| t.approved.as_ref())
    }

    /// Whether the baseline knows the path (present or approved as absent).
    pub fn knows(&self, key: &str) -> bool {
        self.files.contains_key(key)
    }

    /// Digest of the state last reported for a path.
    pub fn reported(&self, key: &str) -> Option<&str> {
        self.files.get(key).and_then(|t| t.reported.as_deref())
    }

    /// The path's epoch (see the reporting protocol in [`crate::report`]).
    pub fn epoch(&self, key: &str) -> u64 {
        self.files.get(key).map_or(0, |t| t.epoch)
    }

    /// Every known path.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.files.keys()
    }

    /// Known paths strictly below `dir` (a host path).
    pub fn keys_under(&self, dir: &str) -> impl Iterator<Item = &String> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.files
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k)
    }

    /// The approved states of all paths, in path order (for entry digests).
    pub fn approved_states(&self) -> impl Iterator<Item = (&String, Option<&FileAttributes>)> {
        self.files.iter().map(|(k, t)| (k, t.approved.as_ref()))
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
        if self.established.insert(entry_key(policy, entry)) {
            self.dirty = true;
        }
    }

    /// Records the current state of a path only entries being established
    /// watch: their first baseline, silently.
    pub fn establish_path(&mut self, key: &str, state: Option<FileAttributes>) {
        match state {
            Some(s) => {
                let t = self.files.entry(key.to_string()).or_default();
                if t.approved.as_ref() != Some(&s) || t.reported.is_some() {
                    t.approved = Some(s);
                    t.reported = None;
                    self.dirty = true;
                }
            }
            None => {
                if self.files.remove(key).is_some() {
                    self.dirty = true;
                }
            }
        }
    }

    /// Remembers that the state with `digest` was reported (after it was queued).
    pub fn mark_reported(&mut self, key: &str, digest: String) {
        let t = self.files.entry(key.to_string()).or_default();
        if t.reported.as_ref() != Some(&digest) {
            t.reported = Some(digest);
            self.dirty = true;
        }
    }

    /// The path is back in its approved state: the next difference is a new
    /// transition.
    pub fn settled(&mut self, key: &str) {
        if let Some(t) = self.files.get_mut(key)
            && t.reported.take().is_some()
        {
            t.epoch += 1;
            self.dirty = true;
        }
    }

    /// Records attributes measured for the first time (a link count, a mount)
    /// into the approved state of a path that still matches it on everything
    /// else: the
    /// path is in its approved state, so the next difference is a new
    /// transition.
    pub fn adopt(&mut self, key: &str, state: FileAttributes) {
        let t = self.files.entry(key.to_string()).or_default();
        t.approved = Some(state);
        if t.reported.take().is_some() {
            t.epoch += 1;
        }
        self.dirty = true;
    }

    /// Approves `state` as the path's baseline (an explicit, recorded act).
    pub fn approve(&mut self, key: &str, state: Option<FileAttributes>) {
        let t = self.files.entry(key.to_string()).or_default();
        t.approved = state;
        t.reported = None;
        t.epoch += 1;
        self.dirty = true;
    }

    /// Forgets a policy's entries and its record, so its next scan is a first
    /// baseline again (only ever on an explicit request). Paths stay known.
    pub fn forget(&mut self, policy: &str) {
        let prefix = format!("{policy}/");
        self.established.retain(|k| !k.starts_with(&prefix));
        self.policies.remove(policy);
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
        self.dirty = true;
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

    #[test]
    fn round_trip_and_digest_of_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Baseline::load(dir.path()).unwrap().is_none());
        let mut b = Baseline::default();
        b.establish_path("/etc/passwd", Some(attrs(3)));
        b.establish("p", "e");
        let digest = b.save(dir.path()).unwrap();
        let (loaded, on_disk) = Baseline::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, b);
        assert_eq!(on_disk, digest);
        // An edit on the node changes the digest.
        let path = dir.path().join(FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes.push(b' ');
        fs::write(&path, bytes).unwrap();
        let (_, edited) = Baseline::load(dir.path()).unwrap().unwrap();
        assert_ne!(edited, digest);
    }

    #[test]
    fn the_state_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut b = Baseline::default();
        b.save(&state).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(FILE)), 0o600);
        assert_eq!(mode(&state.join(JOURNAL)), 0o600);
    }

    #[test]
    fn the_journal_vouches_for_unpublished_states_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::default();
        let d1 = b.save(dir.path()).unwrap();
        b.establish("p", "e");
        let d2 = b.save(dir.path()).unwrap();
        let j = Journal::new(dir.path());
        assert!(j.vouches(&d1, &d2), "written after the published one");
        assert!(!j.vouches(&d2, &"0".repeat(64)), "someone else's edit");
        j.published(&d2).unwrap();
        assert_eq!(j.read(), vec![d2.clone()]);
        assert!(!j.vouches(&d1, &d2), "trimmed: the cluster holds d2");
    }

    #[test]
    fn epochs_tell_a_recurrence_from_a_retry() {
        let mut b = Baseline::default();
        b.establish_path("/f", Some(attrs(1)));
        assert_eq!(b.epoch("/f"), 0);
        b.mark_reported("/f", "x".into());
        b.mark_reported("/f", "x".into());
        assert_eq!(b.epoch("/f"), 0, "a retry keeps the epoch");
        b.settled("/f");
        assert_eq!(b.epoch("/f"), 1, "back to the approved state");
        b.settled("/f");
        assert_eq!(b.epoch("/f"), 1, "nothing was reported");
        b.approve("/f", Some(attrs(2)));
        assert_eq!(b.epoch("/f"), 2);
        assert_eq!(b.approved("/f"), Some(&attrs(2)));
        assert!(b.reported("/f").is_none());
    }

    #[test]
    fn a_torn_temporary_file_never_replaces_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::default();
        b.establish("p", "e");
        b.save(dir.path()).unwrap();
        fs::write(dir.path().join(format!(".{FILE}.tmp")), b"{\"vers").unwrap();
        let (loaded, _) = Baseline::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, b);
    }

    #[test]
    fn garbage_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"not json").unwrap();
        assert!(matches!(
            Baseline::load(dir.path()),
            Err(BaselineError::Corrupt { .. })
        ));
    }
}
