//! The detection engine: walks what the policies monitor, inspects each path
//! once whatever the number of policies watching it (hashing is the host
//! root's, [`crate::hostfs`]), compares with the approved baseline and
//! produces one change per policy entry that cares.
//!
//! The baseline holds the *approved* state. A difference is reported once (its
//! digest is remembered) and stays a difference until an approver approves the
//! reported state (and the file is still in it), or until the file returns to
//! its approved state.
//!
//! By responsibility:
//! - `diff` — the pure comparison of two states ([`differing`]) and the
//!   projection of a state on the attributes an entry compares.
//! - `walk` — the parallel walk of a full scan and its batches.
//! - `judge` — one path against the baseline; real-time re-examinations.
//! - `approve` — approvals.
//! - `entry_digest` — the per-entry digests (and their earlier format).
//! - `mount_tracking` — the host's mount table and what its changes touch.
//! - `transient` — states seen at a close after a write, until the rescan.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{EntryDigest, FileChangeSpec, FileIntegrityPolicySpec};
use thiserror::Error;

use crate::baseline::{Baseline, BaselineError};
use crate::hostfs::HostRoot;
use crate::mounts::{MountSource, MountTable};
use crate::plan::{Plan, PlanError};
use crate::telemetry::Progress;

mod approve;
mod diff;
mod entry_digest;
mod judge;
mod mount_tracking;
#[cfg(test)]
mod tests;
mod transient;
mod walk;

pub use approve::{Applied, Approval, Approved, ApprovedAll};
pub use diff::differing;
pub use entry_digest::{ApprovedMove, Published};

use entry_digest::EntrySums;
use transient::Transients;

/// Engine errors (per-file trouble is not an error: the file's state says
/// what could not be read, and it is reported).
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Baseline(#[from] BaselineError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("host root {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A file that could not be read whole, and why (its state says so too:
/// [`kube_fim_crds::FileAttributes::unreadable`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanError {
    pub path: String,
    pub reason: String,
}

/// Result of a scan.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changes: Vec<FileChangeSpec>,
    /// Epoch of each reported path (part of its reports' names).
    pub epochs: BTreeMap<String, u64>,
    /// Differences to mark reported once the changes are safely queued
    /// ([`Engine::mark_reported`]): path and state digest.
    marks: Vec<(String, String)>,
    pub errors: Vec<ScanError>,
    /// Paths inspected.
    pub files: usize,
    /// Bytes read for hashing.
    pub bytes: u64,
}

impl Outcome {
    /// Takes out the changes of the paths `keys` (as `spec.path`), each with
    /// its path's epoch. With `hold`, their marks go too: held back, they are
    /// neither reported nor marked reported now, and are found again by the
    /// next look at the path (a start's scan after a crash included).
    pub fn take_paths(
        &mut self,
        keys: &BTreeSet<String>,
        hold: bool,
    ) -> Vec<(FileChangeSpec, u64)> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.changes)
            .into_iter()
            .partition(|c| keys.contains(&c.path));
        self.changes = kept;
        if hold {
            self.marks.retain(|(k, _)| !keys.contains(k));
        }
        taken
            .into_iter()
            .map(|c| {
                let epoch = self.epochs.get(&c.path).copied().unwrap_or(0);
                (c, epoch)
            })
            .collect()
    }
}

/// One policy as the engine serves it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInput {
    pub generation: Option<i64>,
    pub spec: FileIntegrityPolicySpec,
}

/// What the engine knows after its last scan (see [`Engine::status`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStatus {
    /// Per served policy: generation, files, last full scan, baseline time.
    pub policies: BTreeMap<String, PolicyStatus>,
    /// Distinct files monitored.
    pub files_total: usize,
    /// Files the last scan could not read.
    pub errors: usize,
    /// Policies that cannot be compiled, with why (the others are served).
    pub failed: BTreeMap<String, String>,
    /// Per-entry digests of the baseline.
    pub entries: Vec<EntryDigest>,
    /// Policies with a baseline kept on this node that are not served (the
    /// node's labels no longer select them): the generation last served.
    pub unserved: BTreeMap<String, Option<i64>>,
}

/// One served policy's state on this node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyStatus {
    pub generation: Option<i64>,
    pub files: usize,
    pub last_scan: Option<Timestamp>,
    pub baseline_time: Option<Timestamp>,
}

/// The engine of one node.
pub struct Engine {
    root: HostRoot,
    node: String,
    baseline: Baseline,
    /// Digest of the baseline as found on disk at start (before any write).
    loaded_digest: Option<String>,
    /// Policies served again after a pause with their baseline kept: their
    /// differences found by the next scan are reported as `Startup`.
    resumed: BTreeSet<String>,
    /// Policies that could not be compiled, with why (not served).
    failed: BTreeMap<String, String>,
    /// Whether policies were set before in this run.
    policies_set: bool,
    /// Shared so a scan can borrow it while it updates the baseline.
    plan: Arc<Plan>,
    policies: BTreeMap<String, PolicyInput>,
    /// Entry digests the cluster last saw, to compare after the first scan.
    known_entries: Option<Published>,
    /// The per-entry digests, kept up to date with the baseline's changes.
    entry_sums: Mutex<Option<EntrySums>>,
    /// Stamped file by file, so a long scan is not taken for a stall.
    progress: Progress,
    /// Directories seen by the last walk (for real-time watches).
    dirs: BTreeSet<PathBuf>,
    /// The host's mount table: where it is read, as last read (for
    /// inspections), and as last compared (see [`Engine::mounts_changed`]).
    mount_source: MountSource,
    mounts: Option<MountTable>,
    mounts_compared: Option<MountTable>,
    /// Files each policy monitors (last scan).
    files_per_policy: BTreeMap<String, usize>,
    /// Distinct files monitored (last scan).
    files_total: usize,
    last_errors: Vec<ScanError>,
    /// Paths whose last state was unreadable (their content or more): looked
    /// at again until they can be read ([`Engine::unreadable`]).
    unreadable: BTreeSet<PathBuf>,
    /// States seen at a close after a write, until the path's rescan.
    transient: Transients,
    /// List every difference from the approved baseline, even those already
    /// reported (`check` reports the state; it does not deliver).
    list_reported: bool,
    /// Write nothing (`check`): the scan's bookkeeping stays in memory.
    dry_run: bool,
    /// Numbers queued before a crash, before the baseline recording them was
    /// saved, by the identity of their transition ([`crate::report::sequence`]).
    resumed_numbers: BTreeMap<String, u64>,
    /// The first number not durably saved yet, for the deliverer.
    committed: tokio::sync::watch::Sender<u64>,
}

impl Engine {
    /// Opens the host root and the baseline in `state` (if any).
    pub fn open(root: &Path, state: &Path, node: &str) -> Result<Self, EngineError> {
        Self::open_with(root, state, node, true)
    }

    /// Opens the host root with an empty baseline, ignoring (and later
    /// replacing) whatever is in `state`, even a damaged file.
    pub fn open_fresh(root: &Path, state: &Path, node: &str) -> Result<Self, EngineError> {
        Self::open_with(root, state, node, false)
    }

    fn open_with(root: &Path, state: &Path, node: &str, load: bool) -> Result<Self, EngineError> {
        let root = HostRoot::open(root).map_err(|source| EngineError::Root {
            path: root.to_path_buf(),
            source,
        })?;
        let loaded = if load { Baseline::load(state)? } else { None };
        let (baseline, loaded_digest) = match loaded {
            Some((b, d)) => (b, Some(d)),
            None => (Baseline::create(state)?, None),
        };
        let committed = tokio::sync::watch::Sender::new(baseline.saved_sequence());
        Ok(Engine {
            resumed_numbers: BTreeMap::new(),
            committed,
            mount_source: MountSource::of_host(root.path()),
            mounts: None,
            mounts_compared: None,
            root,
            node: node.to_string(),
            baseline,
            loaded_digest,
            resumed: BTreeSet::new(),
            policies_set: false,
            failed: BTreeMap::new(),
            progress: Progress::default(),
            known_entries: None,
            entry_sums: Mutex::default(),
            plan: Arc::default(),
            policies: BTreeMap::new(),
            dirs: BTreeSet::new(),
            files_per_policy: BTreeMap::new(),
            files_total: 0,
            last_errors: Vec::new(),
            unreadable: BTreeSet::new(),
            transient: Transients::default(),
            list_reported: false,
            dry_run: false,
        })
    }

    /// Threads a scan runs on, all of it (at least 1; default: the CPU budget).
    pub fn set_threads(&mut self, threads: usize) {
        self.root.set_threads(threads);
    }

    /// The host root directory.
    pub fn root_path(&self) -> &Path {
        self.root.path()
    }

    /// Whether a baseline existed when the engine started.
    pub fn had_baseline(&self) -> bool {
        self.loaded_digest.is_some()
    }

    /// Digest of the baseline as found on disk at start.
    pub fn loaded_digest(&self) -> Option<&str> {
        self.loaded_digest.as_deref()
    }

    /// The baseline (read-only: its rules are its own methods).
    pub fn baseline(&self) -> &Baseline {
        &self.baseline
    }

    /// After the first scan, compare the entry digests with what the cluster
    /// holds and report what differs unexplained (a lost or forged baseline).
    pub fn compare_first_scan_with(&mut self, known: Published) {
        self.known_entries = Some(known);
    }

    /// The comparison asked for by [`Engine::compare_first_scan_with`], once.
    pub fn take_known_entries(&mut self) -> Option<Published> {
        self.known_entries.take()
    }

    /// Shares the progress stamp `/healthz` reads.
    pub fn set_progress(&mut self, progress: Progress) {
        self.progress = progress;
    }

    /// Policies left out because they cannot be compiled, with why.
    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    /// `check`: every difference from the approved baseline is listed, also
    /// those reported already, and nothing is written (the state is reported,
    /// not delivered).
    pub fn check_only(&mut self) {
        self.list_reported = true;
        self.dry_run = true;
    }

    /// What the engine knows after its last scan, as one value for status
    /// reports.
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            policies: self
                .policies
                .iter()
                .map(|(name, p)| {
                    let stored = self.baseline.policy(name);
                    let status = PolicyStatus {
                        generation: p.generation,
                        files: self.files_of(name),
                        last_scan: stored.and_then(|r| r.last_scan_time),
                        baseline_time: stored.and_then(|r| r.baseline_time),
                    };
                    (name.clone(), status)
                })
                .collect(),
            files_total: self.files_total,
            errors: self.last_errors.len(),
            failed: self.failed.clone(),
            entries: self.entry_digests(),
            unserved: self
                .baseline
                .scanned_policies()
                .filter(|(name, _)| !self.policies.contains_key(*name))
                .map(|(name, scan)| (name.to_string(), scan.generation))
                .collect(),
        }
    }

    /// Root-relative paths whose state could not be read whole when last
    /// judged: to look at again (a lease is broken, a rule lifted), so their
    /// content is compared once it can be read.
    pub fn unreadable(&self) -> Vec<PathBuf> {
        self.unreadable.iter().cloned().collect()
    }

    /// Closes after a write whose state could not be remembered for the
    /// rescan (too many paths in one window).
    pub fn transient_dropped(&self) -> u64 {
        self.transient.dropped
    }

    /// Root-relative paths of the served entries (without their wildcard
    /// segment): every monitored path is at or below one of them.
    pub fn entry_bases(&self) -> Vec<PathBuf> {
        self.plan.entries.iter().map(|e| e.base.clone()).collect()
    }

    /// The policies served.
    pub fn policies(&self) -> &BTreeMap<String, PolicyInput> {
        &self.policies
    }

    /// Replaces the served policies (takes effect at the next scan). A policy
    /// that cannot be compiled is left out alone (see [`Engine::failed`]), the
    /// others are served; its error is returned after the others are applied.
    pub fn set_policies(
        &mut self,
        policies: BTreeMap<String, PolicyInput>,
    ) -> Result<(), EngineError> {
        let mut first_error = None;
        self.failed.clear();
        let mut policies = policies;
        policies.retain(|name, p| {
            match Plan::new(&BTreeMap::from([(name.clone(), p.spec.clone())])) {
                Ok(_) => true,
                Err(e) => {
                    self.failed.insert(name.clone(), e.to_string());
                    first_error.get_or_insert(e);
                    false
                }
            }
        });
        let specs: BTreeMap<String, FileIntegrityPolicySpec> = policies
            .iter()
            .map(|(k, v)| (k.clone(), v.spec.clone()))
            .collect();
        self.plan = Arc::new(Plan::new(&specs)?);
        // A policy that stops being served keeps its baseline; served again,
        // every difference since is reported.
        // (The first policies of a run need no mark: the caller scans them as
        // `Startup` when a baseline was found.)
        if self.policies_set {
            for name in policies.keys() {
                if !self.policies.contains_key(name) && self.baseline.knows_policy(name) {
                    self.resumed.insert(name.clone());
                }
            }
        }
        self.policies_set = true;
        self.policies = policies;
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Writes the baseline; returns its digest.
    pub fn save(&mut self) -> Result<String, EngineError> {
        let digest = self.baseline.save()?;
        // The scan after the start, numbered and saved, found again what it
        // would: a transition with the same identity from now on recurs.
        self.resumed_numbers.clear();
        self.committed.send_replace(self.baseline.saved_sequence());
        Ok(digest)
    }

    /// The number of the transition with `identity` (see
    /// [`crate::report::object::identity`]): the one it had before a crash
    /// if it was queued then, otherwise the node's next. Saved with the
    /// baseline that marks it reported.
    pub fn number(&mut self, identity: &str) -> u64 {
        match self.resumed_numbers.remove(identity) {
            Some(seq) => seq,
            None => self.baseline.take_sequence(),
        }
    }

    /// Numbers found in the delivery queue at start that the baseline did
    /// not save (a crash between steps 3 and 4 of the protocol): a transition
    /// detected again before the next save (the scan at start) gets its
    /// number back, and no other transition gets any of them.
    pub fn resume_numbers(&mut self, taken: BTreeMap<String, u64>) {
        if let Some(max) = taken.values().max() {
            self.baseline.raise_sequence(max + 1);
        }
        self.resumed_numbers = taken;
    }

    /// Numbers below `published` were taken by this node before (the cluster
    /// holds them in its FileIntegrityNode's `status.sequence`): never given
    /// again, even when the state directory was lost or rolled back.
    pub fn continue_after(&mut self, published: u64) {
        self.baseline.raise_sequence(published);
    }

    /// The first transition number not durably saved yet, as it moves.
    pub fn committed_sequence(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Compacts the baseline's store if it has grown well beyond its records
    /// (after a full scan: it reads the whole store); its size before and
    /// after, if compacted.
    pub fn compact_baseline(&mut self) -> Result<Option<(u64, u64)>, EngineError> {
        Ok(self.baseline.compact_if_bloated()?)
    }

    /// The smallest debounce and scan interval among the policies.
    pub fn timing(&self) -> (std::time::Duration, std::time::Duration) {
        use kube_fim_crds::duration::parse_duration;
        let debounce = self
            .policies
            .values()
            .filter_map(|p| parse_duration(&p.spec.debounce).ok())
            .min()
            .unwrap_or(std::time::Duration::from_secs(2));
        let scan = self
            .policies
            .values()
            .filter_map(|p| parse_duration(&p.spec.scan_interval).ok())
            .min()
            .unwrap_or(std::time::Duration::from_secs(3600));
        (debounce, scan)
    }

    /// Files monitored by one policy (last scan).
    fn files_of(&self, policy: &str) -> usize {
        self.files_per_policy.get(policy).copied().unwrap_or(0)
    }
}
