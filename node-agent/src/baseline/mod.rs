//! The baseline on the node: the approved state of every monitored file, which
//! policy entries are established, and which differences were already reported.
//!
//! Its rules live here, behind methods: [`Baseline::establish_path`] (the
//! silent first baseline of a new entry), [`Baseline::mark_reported`],
//! [`Baseline::settled`] (back to the approved state), [`Baseline::approve`]
//! and [`Baseline::forget`]. Nothing is forgotten as a side effect: a policy
//! that stops being served keeps its baseline.
//!
//! The rest, by responsibility:
//! - `store` — the embedded database, keyed by host path. Nothing holds the
//!   whole baseline in memory: reads go through a small page cache
//!   ([`CACHE_BYTES`]), changes are kept until [`Baseline::save`] (or a full
//!   batch, [`Baseline::flush_if_full`]) writes them in one transaction.
//! - `read` — reads of the committed state, one path or one directory at a
//!   time ([`Baseline::children`]), and snapshots a scan reads ahead from.
//! - `write_behind` — a baseline being built is written on another thread
//!   while the scan goes on.
//! - `digest` — the published digest, a multiset hash kept up to date
//!   record by record, so a save costs what it changes.
//! - `verify` — at start the digest is recomputed from the records on as
//!   many threads as a scan hashes on: an edit made on the node while the
//!   agent is down changes it and is noticed.
//! - `upgrade` — the document of earlier versions and the store of version
//!   2 are migrated on start.
//! - `record` — the binary encoding of one file's state (store version 3:
//!   about 100 bytes a file, 190 bytes of disk with the B-tree).
//! - `state_dir` — the one owner of the paths in the state directory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::FileAttributes;
use redb::Database;
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod digest;
mod read;
mod record;
mod state_dir;
mod store;
mod upgrade;
mod verify;
mod write_behind;

pub use digest::{SetHash, state_digest};
pub use read::{KnownChild, Prefetched, Snapshot};
pub use state_dir::{FILE, LEGACY_FILE, StateDir};
pub use store::CACHE_BYTES;

use digest::TAG_ESTABLISHED;
use digest::TAG_POLICY;
use read::Reader;
use write_behind::Writing;

/// Changes of approved states remembered for [`Baseline::approved_changes_since`]
/// (a reader further behind recomputes what it derives from them).
const APPROVED_LOG: usize = 1024;

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
pub struct PolicyScan {
    pub generation: Option<i64>,
    pub baseline_time: Option<Timestamp>,
    pub last_scan_time: Option<Timestamp>,
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

/// The persisted state.
pub struct Baseline {
    db: Arc<Database>,
    state: StateDir,
    /// Built from nothing at [`StateDir::new_store`] until its first save.
    fresh: bool,
    /// Imported from [`StateDir::legacy_document`] (with its digest), set aside at the first
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
    policies: BTreeMap<String, PolicyScan>,
    /// Keys of `established` and `policies` changed since the last write.
    changed: BTreeSet<(u8, String)>,
    reader: Mutex<Reader>,
    /// Changed since the last save.
    dirty: bool,
    /// The last [`APPROVED_LOG`] changes of approved states, and the number
    /// of changes made since the baseline was opened.
    approved_log: VecDeque<ApprovedChange>,
    approved_seq: u64,
    /// The node's next transition number (see [`crate::report::sequence`]),
    /// written in the same transaction as the records it numbers.
    sequence: u64,
    /// `sequence` as last written durably.
    saved_sequence: u64,
}

/// Key of an established entry.
fn entry_key(policy: &str, entry: &str) -> String {
    format!("{policy}/{entry}")
}

impl Baseline {
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

    /// The number the next recorded transition gets.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The first number not yet durably recorded: every number below it was
    /// saved with the transition it numbers (or skipped for good).
    pub fn saved_sequence(&self) -> u64 {
        self.saved_sequence
    }

    /// Gives the next transition its number; saved with the next
    /// [`Baseline::save`].
    pub fn take_sequence(&mut self) -> u64 {
        let seq = self.sequence;
        self.sequence += 1;
        self.dirty = true;
        seq
    }

    /// Numbers below `next` are taken (found in the delivery queue after a
    /// crash before their save): never given again.
    pub fn raise_sequence(&mut self, next: u64) {
        if next > self.sequence {
            self.sequence = next;
            self.dirty = true;
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

    /// Makes the current state of a path only entries being established
    /// watch its approved state: their first baseline, silently.
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

    /// Takes attributes measured for the first time (a link count, a mount)
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

    /// Approves `state` as the path's baseline (an explicit act of an approver).
    pub fn approve(&mut self, key: &str, state: Option<FileAttributes>) {
        let mut t = self.record(key).unwrap_or_default();
        let before = std::mem::replace(&mut t.approved, state);
        self.log_approved(key, before, t.approved.as_ref());
        t.reported = None;
        t.epoch += 1;
        self.put(key, Some(t));
    }

    /// Forgets a policy's entries and its scans, so its next scan is a first
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

    /// A policy's scans: the generation last scanned, when its baseline was
    /// made and when it was last scanned.
    pub fn policy(&self, name: &str) -> Option<&PolicyScan> {
        self.policies.get(name)
    }

    /// Every policy with a stored scan, served now or not.
    pub fn scanned_policies(&self) -> impl Iterator<Item = (&str, &PolicyScan)> {
        self.policies
            .iter()
            .map(|(name, scan)| (name.as_str(), scan))
    }

    /// Notes a completed scan of a policy.
    pub fn scanned(&mut self, name: &str, generation: Option<i64>, now: Timestamp) {
        let rec = self.policies.entry(name.to_string()).or_default();
        rec.generation = generation;
        rec.baseline_time.get_or_insert(now);
        rec.last_scan_time = Some(now);
        self.changed.insert((TAG_POLICY, name.to_string()));
        self.dirty = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    pub(super) fn attrs(size: u64) -> FileAttributes {
        FileAttributes {
            size: Some(size),
            ..FileAttributes::default()
        }
    }

    pub(super) fn reopen(state: &Path) -> (Baseline, String) {
        Baseline::load(state).unwrap().unwrap()
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
    fn the_transition_sequence_is_saved_with_the_records_it_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        assert_eq!((b.take_sequence(), b.take_sequence()), (0, 1));
        b.mark_reported("/f", "x".into());
        assert_eq!(b.saved_sequence(), 0, "not saved yet");
        b.save().unwrap();
        assert_eq!(b.saved_sequence(), 2);
        drop(b);
        let (mut b, _) = reopen(dir.path());
        assert_eq!((b.sequence(), b.saved_sequence()), (2, 2));
        assert_eq!(b.reported("/f").as_deref(), Some("x"));
        // Taken but never saved (a crash): the next start has the saved value.
        b.take_sequence();
        drop(b);
        let (mut b, _) = reopen(dir.path());
        assert_eq!(b.sequence(), 2);
        b.raise_sequence(5);
        b.raise_sequence(3);
        assert_eq!(b.take_sequence(), 5, "raised, never lowered");
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
}
