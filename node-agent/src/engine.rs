//! The detection engine: walks what the policies monitor, inspects each path
//! once whatever the number of policies watching it, compares with the
//! approved baseline and produces one change per policy entry that cares.
//!
//! The baseline holds the *approved* state. A difference is reported once (its
//! digest is remembered) and stays a difference until an approver approves the
//! reported state (and the file is still in it), or until the file returns to
//! its approved state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{
    Attribute, ChangeCategory, DetectionSource, EntryDigest, FileAttributes, FileChangeSpec,
    FileIntegrityPolicySpec,
};
use rayon::prelude::*;
use thiserror::Error;
use tracing::{debug, warn};

use crate::baseline::{
    Baseline, BaselineError, Journal, Prefetched, SetHash, Snapshot, state_digest,
};
use crate::hostfs::{HostRoot, InspectError, Inspected, Item, Job};
use crate::metrics::Progress;
use crate::mounts::{MountSource, MountTable};
use crate::paths::{escape, host_path, rel_path, unescape};
use crate::plan::{Entry, Plan, PlanError};

/// Engine errors (per-file trouble is not an error: it is reported and skipped).
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

/// A file that could not be inspected, and why.
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

/// One policy as the engine serves it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInput {
    pub generation: Option<i64>,
    pub spec: FileIntegrityPolicySpec,
}

/// The engine of one node.
pub struct Engine {
    root: HostRoot,
    state: PathBuf,
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
    known_entries: Option<Vec<EntryDigest>>,
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
    pub files_per_policy: BTreeMap<String, usize>,
    /// Distinct files monitored (last scan).
    pub files_total: usize,
    pub last_errors: Vec<ScanError>,
    /// List every difference from the approved baseline, even those already
    /// reported (`check` reports the state; it does not deliver).
    pub list_reported: bool,
    /// Write nothing (`check`): the scan's bookkeeping stays in memory.
    pub dry_run: bool,
}

fn is_dir(attrs: Option<&FileAttributes>) -> bool {
    attrs
        .and_then(|a| a.file_type)
        .is_some_and(|t| t == kube_fim_crds::FileType::Directory)
}

/// The attributes in `attrs` that differ between `old` and `new`.
pub fn differing(
    old: &FileAttributes,
    new: &FileAttributes,
    attrs: &[Attribute],
) -> Vec<Attribute> {
    let mut out = Vec::new();
    for a in Attribute::ALL {
        if !attrs.contains(&a) {
            continue;
        }
        let same = match a {
            Attribute::Hash => old.hash == new.hash,
            Attribute::Size => old.size == new.size,
            Attribute::Type => old.file_type == new.file_type,
            Attribute::Mode => old.mode == new.mode,
            Attribute::Uid => old.uid == new.uid,
            Attribute::Gid => old.gid == new.gid,
            Attribute::Xattrs => old.xattrs == new.xattrs,
            Attribute::Mtime => old.mtime == new.mtime,
            Attribute::Ctime => old.ctime == new.ctime,
            Attribute::Inode => old.inode == new.inode,
            // Absent from a state recorded before link counts were: not
            // compared until that state is approved again.
            Attribute::Links => old.links.is_none() || old.links == new.links,
            Attribute::LinkTarget => old.link_target == new.link_target,
            // As for links: a state recorded without it is not compared on it.
            Attribute::Mount => old.mount.is_none() || old.mount == new.mount,
        };
        if !same {
            out.push(a);
        }
    }
    out
}

/// The attributes a recorded state has.
fn present(a: &FileAttributes) -> Vec<Attribute> {
    Attribute::ALL
        .into_iter()
        .filter(|x| match x {
            Attribute::Hash => a.hash.is_some(),
            Attribute::Size => a.size.is_some(),
            Attribute::Type => a.file_type.is_some(),
            Attribute::Mode => a.mode.is_some(),
            Attribute::Uid => a.uid.is_some(),
            Attribute::Gid => a.gid.is_some(),
            Attribute::Xattrs => a.xattrs.is_some(),
            Attribute::Mtime => a.mtime.is_some(),
            Attribute::Ctime => a.ctime.is_some(),
            Attribute::Inode => a.inode.is_some(),
            Attribute::Links => a.links.is_some(),
            Attribute::LinkTarget => a.link_target.is_some(),
            Attribute::Mount => a.mount.is_some(),
        })
        .collect()
}

/// `current` without the attributes recorded only by later versions (link
/// count, mount) that `approved` lacks; `None` if it has them all. An absent
/// link count or mount means "not measured" (never "none"), so such a state
/// is compared on them only once approved again.
fn without_late_attributes(
    approved: &FileAttributes,
    current: &FileAttributes,
) -> Option<FileAttributes> {
    let mut out = current.clone();
    if approved.links.is_none() {
        out.links = None;
    }
    if approved.mount.is_none() {
        out.mount = None;
    }
    (out != *current).then_some(out)
}

/// A path a scan reaches, and what is known of it.
#[derive(Clone, Debug)]
struct Node {
    path: PathBuf,
    /// Listed by its directory: `Some(true)` for a directory.
    listed: Option<bool>,
    /// The baseline has a record of the path / records below it.
    known: bool,
    below: bool,
}

/// Files counted by a scan.
#[derive(Default)]
struct Tally {
    per_policy: BTreeMap<String, usize>,
    total: usize,
}

impl Tally {
    fn count(&mut self, owners: &[&Entry]) {
        self.total += 1;
        let mut counted = BTreeSet::new();
        for o in owners {
            if counted.insert(&o.owner.policy) {
                *self.per_policy.entry(o.owner.policy.clone()).or_default() += 1;
            }
        }
    }
}

/// Whether the scan judges the path (if an entry owns it): found on disk,
/// known to the baseline, or an entry's base.
fn candidate(plan: &Plan, node: &Node) -> bool {
    node.listed.is_some() || node.known || is_base(plan, &node.path)
}

fn is_base(plan: &Plan, path: &Path) -> bool {
    plan.entries.iter().any(|e| e.base == path)
}

/// Whether an entry lists the directory's entries on disk: its own base, or a
/// directory its recursion covers.
fn lists(plan: &Plan, node: &Node) -> bool {
    is_base(plan, &node.path)
        || (node.listed == Some(true)
            && plan
                .entries
                .iter()
                .any(|e| e.recursive && e.covers(&node.path)))
}

/// Whether the scan goes below the path: listed, known below, or on the way to
/// a deeper entry's base.
fn descends(plan: &Plan, node: &Node) -> bool {
    node.below
        || lists(plan, node)
        || plan
            .entries
            .iter()
            .any(|e| e.base != node.path && e.base.starts_with(&node.path))
}

/// What became of an approval.
#[derive(Debug)]
pub enum Approved {
    /// The file was in the approved state, which is the baseline now.
    Applied,
    /// The file has moved on: nothing approved; these changes report it.
    Superseded(Outcome),
    /// No served policy covers the path: nothing approved, the baseline is
    /// unchanged.
    NotMonitored,
}

/// Paths inspected together on the scan's threads before being judged.
const SCAN_BATCH: usize = 2048;
/// Batches on the scan's threads ahead of the one being judged.
const SCAN_AHEAD: usize = 1;

/// A path to judge, as planned on the scan's threads: its key, its owners
/// (indices of plan entries), the attributes they want, its record read
/// ahead.
struct Todo {
    path: PathBuf,
    key: String,
    owners: Vec<usize>,
    want: Arc<[Attribute]>,
    record: Option<Prefetched>,
}

/// A batch planned and inspected on the scan's threads.
struct Planned {
    todo: Vec<Todo>,
    inspected: Vec<Inspected>,
    hashed: u64,
}

/// A batch of paths on the scan's threads ([`HostRoot::spawn`]): of the walked
/// nodes, those some entry monitors, with their owners and the attributes
/// wanted, inspected, their baseline records read ahead from `snapshot`.
struct Spawned {
    job: Job<Planned>,
}

impl Spawned {
    fn new(
        root: &HostRoot,
        plan: &Arc<Plan>,
        nodes: Vec<Node>,
        snapshot: Option<Snapshot>,
    ) -> Self {
        let plan = Arc::clone(plan);
        let job =
            root.spawn(move |root, parallel| plan_batch(root, parallel, &plan, nodes, snapshot));
        Spawned { job }
    }
}

/// Plans a batch (which paths, owned by which entries, wanting what), then
/// inspects its paths and reads their records, on the scan's threads.
fn plan_batch(
    root: &HostRoot,
    parallel: bool,
    plan: &Plan,
    nodes: Vec<Node>,
    snapshot: Option<Snapshot>,
) -> Planned {
    let mut todo = Vec::with_capacity(nodes.len());
    // Which entries own each path, and its key: on every scan thread.
    let owned = |node: &Node| -> (Vec<usize>, String) {
        let owners: Vec<usize> = plan
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.covers(&node.path))
            .map(|(i, _)| i)
            .collect();
        let key = if owners.is_empty() {
            String::new()
        } else {
            host_path(&node.path)
        };
        (owners, key)
    };
    let owned: Vec<(Vec<usize>, String)> = if parallel {
        nodes.par_iter().with_min_len(64).map(owned).collect()
    } else {
        nodes.iter().map(owned).collect()
    };
    // Paths of one entry want the same attributes: shared.
    let mut last: Option<(Vec<usize>, Arc<[Attribute]>)> = None;
    for (node, (owners, key)) in nodes.into_iter().zip(owned) {
        if owners.is_empty() {
            continue;
        }
        let want = match &last {
            Some((o, w)) if *o == owners => Arc::clone(w),
            _ => {
                let entries: Vec<&Entry> = owners.iter().map(|&i| &plan.entries[i]).collect();
                let w: Arc<[Attribute]> = Plan::wanted(&entries).into();
                last = Some((owners.clone(), Arc::clone(&w)));
                w
            }
        };
        todo.push(Todo {
            key,
            path: node.path,
            owners,
            want,
            record: None,
        });
    }
    let items: Vec<Item<'_>> = todo.iter().map(|t| Item::of(&t.path, &t.want)).collect();
    let read = |t: &Todo| snapshot.as_ref().map(|s| s.read(&t.key));
    let ((inspected, hashed), records): (_, Vec<Option<Prefetched>>) = if parallel {
        rayon::join(
            || root.run_batch(&items, true),
            || todo.par_iter().with_min_len(64).map(read).collect(),
        )
    } else {
        (
            root.run_batch(&items, false),
            todo.iter().map(read).collect(),
        )
    };
    drop(items);
    for (t, r) in todo.iter_mut().zip(records) {
        t.record = r;
    }
    Planned {
        todo,
        inspected,
        hashed,
    }
}

/// What a directory's record compares (its mtime moves with every file in it).
const DIR_ATTRS: [Attribute; 6] = [
    Attribute::Type,
    Attribute::Mode,
    Attribute::Uid,
    Attribute::Gid,
    Attribute::Xattrs,
    Attribute::Mount,
];

/// Marks an entry digest of the current format (see [`Engine::entry_digests`]);
/// one without it is BLAKE3 over the entry's records in path order, the format
/// of earlier versions.
const ENTRY_DIGEST_V2: &str = "v2-";
/// Element tag of an entry's record in its [`SetHash`].
const TAG_ENTRY: u8 = b'n';

/// One established entry's digest and what it covers.
struct EntrySum {
    sum: SetHash,
    files: i64,
    /// The path of an entry that covers exactly one (`None`: not known).
    path: Option<String>,
}

/// The per-entry digests of one plan and set of established entries, as of
/// the baseline's `seq`th change of approved states.
struct EntrySums {
    plan: Arc<Plan>,
    established: Vec<(String, String)>,
    seq: u64,
    sums: BTreeMap<(String, String), EntrySum>,
}

/// What an entry's digest takes of a path's approved state: the attributes
/// the entry compares (a directory's, for a directory).
fn entry_state(state: &FileAttributes, entry: &Entry) -> String {
    let mut attrs = entry.attributes.clone();
    if is_dir(Some(state)) {
        attrs.retain(|x| DIR_ATTRS.contains(x));
    }
    state_digest(Some(&project(state, &attrs)))
}

/// Only the attributes an entry compares, so its report shows only those.
fn project(a: &FileAttributes, attrs: &[Attribute]) -> FileAttributes {
    let has = |x| attrs.contains(&x);
    FileAttributes {
        file_type: a.file_type.filter(|_| has(Attribute::Type)),
        hash: a.hash.clone().filter(|_| has(Attribute::Hash)),
        size: a.size.filter(|_| has(Attribute::Size)),
        mode: a.mode.clone().filter(|_| has(Attribute::Mode)),
        uid: a.uid.filter(|_| has(Attribute::Uid)),
        gid: a.gid.filter(|_| has(Attribute::Gid)),
        xattrs: a.xattrs.clone().filter(|_| has(Attribute::Xattrs)),
        mtime: a.mtime.clone().filter(|_| has(Attribute::Mtime)),
        ctime: a.ctime.clone().filter(|_| has(Attribute::Ctime)),
        inode: a.inode.filter(|_| has(Attribute::Inode)),
        links: a.links.filter(|_| has(Attribute::Links)),
        link_target: a.link_target.clone().filter(|_| has(Attribute::LinkTarget)),
        mount: a.mount.clone().filter(|_| has(Attribute::Mount)),
    }
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
        Ok(Engine {
            mount_source: MountSource::of_host(root.path()),
            mounts: None,
            mounts_compared: None,
            root,
            state: state.to_path_buf(),
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
            list_reported: false,
            dry_run: false,
        })
    }

    /// Threads a scan hashes on (at least 1; default: the CPU budget).
    pub fn set_threads(&mut self, threads: usize) {
        self.root.set_threads(threads);
    }

    /// Reads the host's mount table from `source` rather than from the host
    /// root's procfs.
    pub fn set_mount_source(&mut self, source: MountSource) {
        self.mount_source = source;
    }

    /// Where the host's mount table is read.
    pub fn mount_source(&self) -> &MountSource {
        &self.mount_source
    }

    /// Re-reads the host's mount table; the monitored paths at and below the
    /// mount points that changed (to re-examine).
    pub fn mounts_changed(&mut self) -> BTreeSet<PathBuf> {
        let now = self.mount_source.read();
        let changed = match (&self.mounts_compared, &now) {
            (Some(old), Some(new)) => old.changed_points(new),
            (Some(old), None) => old.changed_points(&MountTable::default()),
            // Before the first scan, which reads the table itself.
            (None, _) => BTreeSet::new(),
        };
        self.mounts_compared = now;
        let mut paths = BTreeSet::new();
        for point in changed {
            paths.extend(
                self.baseline
                    .keys_under(&host_path(&point))
                    .iter()
                    .map(|k| rel_path(k)),
            );
            paths.insert(point);
        }
        paths.retain(|p| !self.plan.owners(p).is_empty());
        paths
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

    /// After the first scan, compare the entry digests with these (what the
    /// cluster last saw) and report what differs (a lost or replaced baseline).
    pub fn compare_first_scan_with(&mut self, known: Vec<EntryDigest>) {
        self.known_entries = Some(known);
    }

    /// The comparison asked for by [`Engine::compare_first_scan_with`], once.
    pub fn take_known_entries(&mut self) -> Option<Vec<EntryDigest>> {
        self.known_entries.take()
    }

    /// Shares the progress stamp `/healthz` reads.
    pub fn set_progress(&mut self, progress: Progress) {
        self.progress = progress;
    }

    /// The journal of baseline digests of the state directory.
    pub fn journal(&self) -> Journal {
        Journal::new(&self.state)
    }

    /// Policies left out because they cannot be compiled, with why.
    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
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
        Ok(self.baseline.save()?)
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

    /// Directories to watch in real time (absolute paths).
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut out: BTreeSet<PathBuf> = self.dirs.clone();
        for e in &self.plan.entries {
            // An exact file or a wildcard is watched through its directory.
            let dir = if e.pattern.is_some() || self.dirs.contains(&e.base) {
                e.base.clone()
            } else {
                e.base.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            out.insert(dir);
        }
        out.into_iter().map(|d| self.root.path().join(d)).collect()
    }

    /// A full scan: every monitored path now, against the baseline. One
    /// directory at a time, depth first: its entries on disk merged with the
    /// baseline's records of its children, so memory holds a directory, never
    /// the tree, and the changes are written in batches as the scan goes.
    pub fn scan(&mut self, source: DetectionSource) -> Outcome {
        let mut out = Outcome::default();
        if self.plan.entries.is_empty() {
            // Nothing served: keep the baseline as it is rather than forget it.
            self.files_per_policy.clear();
            self.files_total = 0;
            return out;
        }
        self.mounts = self.mount_source.read();
        if self.mounts_compared.is_none() {
            self.mounts_compared = self.mounts.clone();
        }
        let plan = Arc::clone(&self.plan);
        let mut tally = Tally::default();
        self.dirs.clear();
        // The bases no other base contains: the subtrees the scan visits.
        let mut bases: Vec<&Path> = plan.entries.iter().map(|e| e.base.as_path()).collect();
        bases.sort();
        bases.dedup();
        let roots: Vec<Node> = bases
            .iter()
            .filter(|b| !bases.iter().any(|o| o != *b && b.starts_with(o)))
            .map(|b| Node {
                path: b.to_path_buf(),
                listed: None,
                known: self.baseline.knows(&host_path(b)),
                below: true,
            })
            .collect();
        // Planned and inspected in parallel a batch at a time (across
        // directories) on the scan threads, up to SCAN_AHEAD batches ahead of
        // the judging, which goes in the order the walk found them. The
        // records of a batch are read ahead with it unless the baseline was
        // written while the previous batch was judged (they would be stale),
        // or the scan hashes on one thread (then the slower one: this thread
        // reads them in time).
        let mut ahead: VecDeque<Spawned> = VecDeque::new();
        // With nothing pending at the start, the scan writes only the paths
        // it judged: what was read ahead stays current whatever it writes.
        let unwritten = !self.baseline.has_pending();
        let reads_ahead = self.root.threads() > 1;
        let mut read_ahead = reads_ahead;
        let mut batch: Vec<Node> = roots
            .iter()
            .filter(|n| candidate(&plan, n))
            .cloned()
            .collect();
        let mut stack: Vec<Node> = roots.into_iter().rev().collect();
        while let Some(node) = stack.pop() {
            if !descends(&plan, &node) {
                continue;
            }
            let children = self.children(&node, &plan, &mut out.errors);
            batch.extend(children.iter().filter(|n| candidate(&plan, n)).cloned());
            stack.extend(children.into_iter().rev());
            if batch.len() >= SCAN_BATCH {
                ahead.push_back(self.spawn(&plan, std::mem::take(&mut batch), read_ahead));
                if ahead.len() > SCAN_AHEAD
                    && let Some(next) = ahead.pop_front()
                {
                    let writes = self.baseline.writes();
                    self.judge_nodes(next, &plan, unwritten, source, &mut out, &mut tally);
                    if !self.dry_run
                        && let Err(error) = self.baseline.flush_if_full()
                    {
                        warn!(%error, "could not write the baseline; changes kept in memory");
                    }
                    read_ahead = reads_ahead && (unwritten || self.baseline.writes() == writes);
                }
            }
        }
        ahead.push_back(self.spawn(&plan, batch, read_ahead));
        for spawned in ahead {
            self.judge_nodes(spawned, &plan, unwritten, source, &mut out, &mut tally);
        }
        if let Err(error) = self.baseline.finish_writing() {
            warn!(%error, "could not write the baseline; changes kept in memory");
        }
        // Paths no served entry owns stay in the baseline: a policy served
        // again later compares with them. Every planned entry is now
        // established: later differences are reported.
        let now = Timestamp::now();
        for e in &plan.entries {
            self.baseline.establish(&e.owner.policy, &e.owner.entry);
        }
        for (name, p) in &self.policies {
            self.baseline.scanned(name, p.generation, now);
        }
        self.resumed.clear();
        self.files_per_policy = tally.per_policy;
        self.files_total = tally.total;
        self.last_errors = out.errors.clone();
        out.files = tally.total;
        out
    }

    /// The children of a directory the scan descends into, in name order:
    /// what is in it on disk (if an entry lists it), what the baseline knows
    /// in it, and the way to the bases of entries deeper down.
    fn children(&mut self, node: &Node, plan: &Plan, errors: &mut Vec<ScanError>) -> Vec<Node> {
        let mut by_name: BTreeMap<String, Node> = BTreeMap::new();
        if lists(plan, node) {
            match self.root.list_dir(&node.path) {
                Ok(children) => {
                    self.dirs.insert(node.path.clone());
                    for c in children {
                        by_name.insert(
                            escape(&c.name),
                            Node {
                                path: node.path.join(&c.name),
                                listed: Some(c.is_dir),
                                known: false,
                                below: false,
                            },
                        );
                    }
                }
                // Not a directory (a file, a symlink): nothing below.
                Err(InspectError::Io(_)) | Err(InspectError::Loop) => {}
                Err(err) => errors.push(ScanError {
                    path: host_path(&node.path),
                    reason: err.to_string(),
                }),
            }
        }
        for e in &plan.entries {
            if let Ok(rest) = e.base.strip_prefix(&node.path)
                && let Some(first) = rest.components().next()
            {
                let name = first.as_os_str();
                by_name.entry(escape(name)).or_insert_with(|| Node {
                    path: node.path.join(name),
                    listed: None,
                    known: false,
                    below: false,
                });
            }
        }
        for (name, k) in self.baseline.children(&host_path(&node.path)) {
            let n = by_name.entry(name).or_insert_with_key(|name| Node {
                path: node.path.join(unescape(name)),
                listed: None,
                known: false,
                below: false,
            });
            n.known = k.known;
            n.below = k.below;
        }
        by_name.into_values().collect()
    }

    /// Hands the nodes of a batch to the scan's threads ([`plan_batch`]).
    fn spawn(&self, plan: &Arc<Plan>, nodes: Vec<Node>, read_ahead: bool) -> Spawned {
        let snapshot = read_ahead.then(|| self.baseline.snapshot()).flatten();
        Spawned::new(&self.root, plan, nodes, snapshot)
    }

    /// Judges, in order, the paths of a batch planned and inspected on the
    /// scan's threads.
    fn judge_nodes(
        &mut self,
        batch: Spawned,
        plan: &Plan,
        unwritten: bool,
        source: DetectionSource,
        out: &mut Outcome,
        tally: &mut Tally,
    ) {
        self.progress.beat();
        let Some(planned) = batch.job.wait() else {
            // Its paths keep their baseline; the next scan judges them.
            out.errors.push(ScanError {
                path: String::new(),
                reason: "the scan thread stopped".into(),
            });
            return;
        };
        out.bytes += planned.hashed;
        for (t, result) in planned.todo.into_iter().zip(planned.inspected) {
            if let Some(record) = t.record {
                self.baseline.prefetched(&t.key, record, unwritten);
            }
            let owners: Vec<&Entry> = t.owners.iter().map(|&i| &plan.entries[i]).collect();
            let current = self.settle(&t.path, &t.want, result, out);
            if current.is_some() {
                tally.count(&owners);
            }
            self.judge(&t.key, &t.path, current, &owners, source, out);
        }
    }

    /// Re-examines the given root-relative paths (real-time events): each path,
    /// what is below it now (a new directory), and what the baseline had below it.
    pub fn rescan(
        &mut self,
        paths: &BTreeSet<PathBuf>,
        source: DetectionSource,
    ) -> (Outcome, bool) {
        let mut out = Outcome::default();
        self.mounts = self.mount_source.read();
        let mut candidates: BTreeSet<PathBuf> = BTreeSet::new();
        let mut new_dirs = false;
        for p in paths {
            candidates.insert(p.clone());
            candidates.extend(
                self.baseline
                    .keys_under(&host_path(p))
                    .iter()
                    .map(|k| rel_path(k)),
            );
            // A directory that appeared under a recursive entry: walk it.
            let owners = self.plan.owners(p);
            if owners.iter().any(|o| o.recursive) {
                let mut stack = vec![p.clone()];
                while let Some(dir) = stack.pop() {
                    let Ok(children) = self.root.list_dir(&dir) else {
                        continue;
                    };
                    if self.dirs.insert(dir.clone()) {
                        new_dirs = true;
                    }
                    for c in children {
                        let child = dir.join(&c.name);
                        if self.plan.owners(&child).is_empty() {
                            continue;
                        }
                        candidates.insert(child.clone());
                        if c.is_dir {
                            stack.push(child);
                        }
                    }
                }
            }
        }
        let plan = Arc::clone(&self.plan);
        for path in &candidates {
            let owners = plan.owners(path);
            if owners.is_empty() {
                continue;
            }
            let current = self.inspect(path, &owners, &mut out);
            let key = host_path(path);
            self.judge(&key, path, current, &owners, source, &mut out);
        }
        (out, new_dirs)
    }

    fn inspect(&self, path: &Path, owners: &[&Entry], out: &mut Outcome) -> Option<FileAttributes> {
        self.progress.beat();
        let want = Plan::wanted(owners);
        let result = self.root.inspect(path, &want, &mut out.bytes);
        self.settle(path, &want, result, out)
    }

    /// The state of `path` to judge from what inspecting it for `want` gave.
    fn settle(
        &self,
        path: &Path,
        want: &[Attribute],
        result: Inspected,
        out: &mut Outcome,
    ) -> Option<FileAttributes> {
        match result {
            Ok(Some(mut a)) => {
                if want.contains(&Attribute::Mount) {
                    a.mount = self.mounts.as_ref().and_then(|t| t.covering(path)).cloned();
                }
                Some(a)
            }
            Ok(None) => None,
            Err(err) => {
                debug!(path = %host_path(path), %err, "skipped");
                out.errors.push(ScanError {
                    path: host_path(path),
                    reason: err.to_string(),
                });
                // Unreadable now: keep the baseline as it is, report nothing.
                self.baseline.approved(&host_path(path))
            }
        }
    }

    /// Compares one path with the baseline and records the changes to report.
    fn judge(
        &mut self,
        key: &str,
        path: &Path,
        current: Option<FileAttributes>,
        owners: &[&Entry],
        source: DetectionSource,
        out: &mut Outcome,
    ) {
        let mut established: Vec<&Entry> = Vec::new();
        for o in owners.iter().filter(|o| {
            self.baseline
                .is_established(&o.owner.policy, &o.owner.entry)
        }) {
            // One report per policy: its most specific entry (deepest base).
            match established
                .iter_mut()
                .find(|e| e.owner.policy == o.owner.policy)
            {
                Some(e) if o.base.components().count() > e.base.components().count() => *e = o,
                Some(_) => {}
                None => established.push(o),
            }
        }
        if established.is_empty() {
            // Only new entries watch it: what exists now is their baseline, silently.
            self.baseline.establish_path(key, current);
            return;
        }
        let approved = self.baseline.approved(key);
        if approved == current {
            self.baseline.settled(key);
            return;
        }
        if let (Some(a), Some(c)) = (&approved, &current)
            && let Some(unmeasured) = without_late_attributes(a, c)
        {
            if unmeasured == *a {
                // A state approved before these attributes were recorded,
                // unchanged since: their values now are its baseline, as for a
                // new entry.
                self.baseline.adopt(key, c.clone());
                return;
            }
            if !self.list_reported
                && self.baseline.reported(key).as_deref()
                    == Some(state_digest(Some(&unmeasured)).as_str())
            {
                return; // reported before these attributes were recorded
            }
        }
        let digest = state_digest(current.as_ref());
        if !self.list_reported && self.baseline.reported(key).as_deref() == Some(digest.as_str()) {
            return; // already reported
        }
        let category = match (&approved, &current) {
            (None, Some(_)) => ChangeCategory::Added,
            (Some(_), None) => ChangeCategory::Removed,
            _ => ChangeCategory::Modified,
        };
        // A directory's own entry changes (mtime of /etc at each file change)
        // are noise: only its mode, owner and type count. A directory that
        // appears or goes is reported like a file (a hidden directory is how
        // payloads hide).
        let now = Timestamp::now();
        let mut reported = false;
        for o in established {
            let mut attrs = o.attributes.clone();
            if is_dir(current.as_ref()) || is_dir(approved.as_ref()) {
                attrs.retain(|a| DIR_ATTRS.contains(a));
            }
            let changed = match (&approved, &current) {
                (Some(a), Some(c)) => {
                    let mut d = differing(a, c, &attrs);
                    if o.grow_only && self.grew_keeping_prefix(path, a, c) {
                        d.retain(|x| {
                            !matches!(
                                x,
                                Attribute::Hash
                                    | Attribute::Size
                                    | Attribute::Mtime
                                    | Attribute::Ctime
                            )
                        });
                    }
                    if d.is_empty() {
                        continue;
                    }
                    d
                }
                _ => Vec::new(),
            };
            let source = if self.resumed.contains(&o.owner.policy) {
                DetectionSource::Startup
            } else {
                source
            };
            reported = true;
            out.changes.push(FileChangeSpec {
                node: self.node.clone(),
                policy: o.owner.policy.clone(),
                entry: o.owner.entry.clone(),
                path: key.to_string(),
                category,
                changed_attributes: changed,
                before: approved.as_ref().map(|a| project(a, &o.attributes)),
                after: current.as_ref().map(|c| project(c, &o.attributes)),
                detected_time: MicroTime(now),
                source,
                process: None,
                summary: None,
            });
        }
        if reported {
            out.epochs.insert(key.to_string(), self.baseline.epoch(key));
        }
        // Marked even when no entry found a difference worth a report (a
        // directory's mtime): judged once per state.
        out.marks.push((key.to_string(), digest));
    }

    /// Step 4 of the reporting protocol: the changes of `outcome` are safely
    /// queued, so their states are marked reported.
    pub fn mark_reported(&mut self, outcome: &Outcome) {
        for (key, digest) in &outcome.marks {
            self.baseline.mark_reported(key, digest.clone());
        }
    }

    fn grew_keeping_prefix(&self, path: &Path, old: &FileAttributes, new: &FileAttributes) -> bool {
        match (old.size, new.size, &old.hash) {
            (Some(o), Some(n), Some(h)) if n >= o => {
                self.root.hash_prefix(path, o).is_ok_and(|p| &p == h)
            }
            _ => false,
        }
    }

    /// Makes the approved state of `key` its baseline, if the file is still in
    /// it. `after` is the state the approver saw: a FileChange's `after` (the
    /// entry's compared attributes only), `None` for a removal. When the file
    /// has moved on, nothing is approved and the outcome holds the changes
    /// that report its present state (none if that was reported already).
    /// A path no served policy covers approves nothing either.
    pub fn approve(&mut self, key: &str, after: Option<&FileAttributes>) -> Approved {
        let path = rel_path(key);
        let plan = Arc::clone(&self.plan);
        let owners = plan.owners(&path);
        if owners.is_empty() {
            warn!(path = %key, "not monitored here: nothing to approve");
            return Approved::NotMonitored;
        }
        let mut scratch = Outcome::default();
        let current = self.inspect(&path, &owners, &mut scratch);
        if !scratch.errors.is_empty() {
            warn!(path = %key, "approved path could not be read");
        }
        let still = match (after, &current) {
            (None, None) => true,
            (Some(a), Some(c)) => project(c, &present(a)) == *a,
            _ => false,
        };
        if !still {
            let (outcome, _) = self.rescan(&BTreeSet::from([path]), DetectionSource::Scan);
            return Approved::Superseded(outcome);
        }
        self.baseline.approve(key, current);
        Approved::Applied
    }

    /// The established entries of the served policies.
    fn established_entries(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .plan
            .entries
            .iter()
            .filter(|e| {
                self.baseline
                    .is_established(&e.owner.policy, &e.owner.entry)
            })
            .map(|e| (e.owner.policy.clone(), e.owner.entry.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A digest per established entry of the served policies: a multiset
    /// hash (LtHash, as the baseline's own digest) of its paths with their
    /// approved states (only the attributes it compares), so two baselines of
    /// the same files agree whoever built them, in whatever order. Kept up to
    /// date with the baseline's changes of approved states: a real-time
    /// change costs what it changes; the records are read again only when
    /// the plan or the established entries change, or after more changes
    /// than the baseline remembers (a large scan).
    pub fn entry_digests(&self) -> Vec<EntryDigest> {
        let mut cache = self
            .entry_sums
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let established = self.established_entries();
        let current = cache
            .as_mut()
            .filter(|c| Arc::ptr_eq(&c.plan, &self.plan) && c.established == established);
        let updated = current.is_some_and(|c| self.update_entry_sums(c));
        if !updated {
            *cache = Some(self.compute_entry_sums(established));
        }
        let Some(c) = cache.as_ref() else {
            return Vec::new();
        };
        c.sums
            .iter()
            .map(|((policy, entry), s)| EntryDigest {
                policy: policy.clone(),
                entry: entry.clone(),
                // As long as a BLAKE3 in hex (the status field's size).
                digest: format!(
                    "{ENTRY_DIGEST_V2}{}",
                    &s.sum.digest()[..64 - ENTRY_DIGEST_V2.len()]
                ),
                files: s.files,
                path: s.path.clone().filter(|_| s.files == 1),
            })
            .collect()
    }

    /// Every established entry's digest from the records, in one pass.
    fn compute_entry_sums(&self, established: Vec<(String, String)>) -> EntrySums {
        let seq = self.baseline.approved_seq();
        let mut sums: BTreeMap<(String, String), EntrySum> = established
            .iter()
            .map(|k| {
                let s = EntrySum {
                    sum: SetHash::zero(),
                    files: 0,
                    path: None,
                };
                (k.clone(), s)
            })
            .collect();
        let plan = &self.plan;
        self.baseline.for_each_approved(|key, approved| {
            let Some(state) = approved else { return };
            for o in plan.owners(&rel_path(key)) {
                let Some(s) = sums.get_mut(&(o.owner.policy.clone(), o.owner.entry.clone())) else {
                    continue;
                };
                s.sum.add(TAG_ENTRY, key, entry_state(state, o).as_bytes());
                s.files += 1;
                s.path = (s.files == 1).then(|| key.to_string());
            }
        });
        EntrySums {
            plan: self.plan.clone(),
            established,
            seq,
            sums,
        }
    }

    /// Applies the baseline's changes of approved states since `c` was
    /// computed; `false` if they are not all remembered, or if an entry is
    /// left with one path that is not known (then recompute).
    fn update_entry_sums(&self, c: &mut EntrySums) -> bool {
        let Some(changes) = self.baseline.approved_changes_since(c.seq) else {
            return false;
        };
        for ch in changes {
            for o in c.plan.owners(&rel_path(&ch.key)) {
                let Some(s) = c
                    .sums
                    .get_mut(&(o.owner.policy.clone(), o.owner.entry.clone()))
                else {
                    continue;
                };
                if let Some(before) = &ch.before {
                    s.sum
                        .remove(TAG_ENTRY, &ch.key, entry_state(before, o).as_bytes());
                    s.files -= 1;
                    if s.path.as_deref() == Some(ch.key.as_str()) {
                        s.path = None;
                    }
                }
                if let Some(after) = &ch.after {
                    s.sum
                        .add(TAG_ENTRY, &ch.key, entry_state(after, o).as_bytes());
                    s.files += 1;
                    if s.files == 1 {
                        s.path = Some(ch.key.clone());
                    }
                }
            }
            c.seq = ch.seq;
        }
        c.sums.values().all(|s| s.files != 1 || s.path.is_some())
    }

    /// The entry digests in the format of earlier versions (BLAKE3 over the
    /// entry's records in path order), to compare with what the cluster saw
    /// of a node before it was upgraded.
    fn legacy_entry_digests(&self) -> BTreeMap<(String, String), String> {
        let mut acc: BTreeMap<(String, String), blake3::Hasher> = self
            .established_entries()
            .into_iter()
            .map(|k| (k, blake3::Hasher::new()))
            .collect();
        let plan = &self.plan;
        self.baseline.for_each_approved(|key, approved| {
            let Some(state) = approved else { return };
            for o in plan.owners(&rel_path(key)) {
                let Some(h) = acc.get_mut(&(o.owner.policy.clone(), o.owner.entry.clone())) else {
                    continue;
                };
                h.update(&(key.len() as u64).to_le_bytes());
                h.update(key.as_bytes());
                h.update(entry_state(state, o).as_bytes());
            }
        });
        acc.into_iter()
            .map(|(k, h)| (k, h.finalize().to_hex().to_string()))
            .collect()
    }

    /// Compares the entry digests with `known`, what the cluster last saw: the
    /// entries that differ (`policy/entry`), and a change (source `Startup`)
    /// for each differing entry that covers a single path, naming that file.
    pub fn differing_entries(&self, known: &[EntryDigest]) -> (Vec<String>, Vec<FileChangeSpec>) {
        let now: BTreeMap<(String, String), String> = self
            .entry_digests()
            .into_iter()
            .map(|d| ((d.policy, d.entry), d.digest))
            .collect();
        // Published by a version before the current format: compared with
        // the digests in that format, read from the records once.
        let legacy = if known.iter().any(|k| !k.digest.starts_with(ENTRY_DIGEST_V2)) {
            self.legacy_entry_digests()
        } else {
            BTreeMap::new()
        };
        let mut names = Vec::new();
        let mut changes = Vec::new();
        for k in known {
            let key = (k.policy.clone(), k.entry.clone());
            let digests = if k.digest.starts_with(ENTRY_DIGEST_V2) {
                &now
            } else {
                &legacy
            };
            let Some(d) = digests.get(&key) else {
                continue; // not served here now
            };
            if *d == k.digest {
                continue;
            }
            names.push(format!("{}/{}", k.policy, k.entry));
            let Some(path) = k.path.as_ref().filter(|_| k.files == 1) else {
                continue;
            };
            let attrs = self
                .plan
                .entries
                .iter()
                .find(|e| e.owner.policy == k.policy && e.owner.entry == k.entry)
                .map(|e| e.attributes.clone())
                .unwrap_or_default();
            let after = self.baseline.approved(path).map(|a| project(&a, &attrs));
            changes.push(FileChangeSpec {
                node: self.node.clone(),
                policy: k.policy.clone(),
                entry: k.entry.clone(),
                path: path.clone(),
                category: if after.is_some() {
                    ChangeCategory::Modified
                } else {
                    ChangeCategory::Removed
                },
                changed_attributes: Vec::new(),
                before: None,
                after,
                detected_time: MicroTime(Timestamp::now()),
                source: DetectionSource::Startup,
                process: None,
                summary: None,
            });
        }
        (names, changes)
    }

    /// Files monitored by one policy (last scan).
    pub fn files_of(&self, policy: &str) -> usize {
        self.files_per_policy.get(policy).copied().unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::mounts::MountSource;
    use kube_fim_crds::{AttributeProfile, MonitoredPath};
    use std::os::unix::fs::PermissionsExt;

    fn engine(root: &Path, state: &Path, paths: Vec<MonitoredPath>) -> Engine {
        let mut e = Engine::open(root, state, "n").unwrap();
        e.set_policies(BTreeMap::from([(
            "p".to_string(),
            PolicyInput {
                generation: Some(1),
                spec: FileIntegrityPolicySpec::with_paths(paths),
            },
        )]))
        .unwrap();
        e
    }

    /// A scan whose changes are taken as queued (protocol step 4).
    fn scan(e: &mut Engine, source: DetectionSource) -> Outcome {
        let o = e.scan(source);
        e.mark_reported(&o);
        o
    }

    fn etc(recursive: bool) -> MonitoredPath {
        MonitoredPath {
            name: "etc".into(),
            path: "/etc".into(),
            recursive,
            ..MonitoredPath::default()
        }
    }

    fn describe(o: &Outcome) -> Vec<String> {
        let mut v: Vec<String> = o
            .changes
            .iter()
            .map(|c| {
                format!(
                    "{} {} {:?}",
                    c.category.as_str(),
                    c.path,
                    c.changed_attributes
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn baseline_then_changes_reported_once_until_approved() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        std::fs::write(root.path().join("etc/old"), "o").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        assert!(
            scan(&mut e, DetectionSource::Startup).changes.is_empty(),
            "first scan is the baseline"
        );

        std::fs::write(root.path().join("etc/hosts"), "bb").unwrap();
        std::fs::write(root.path().join("etc/new"), "n").unwrap();
        std::fs::remove_file(root.path().join("etc/old")).unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        let d = describe(&o);
        let hosts = o
            .changes
            .iter()
            .find(|c| c.path == "/etc/hosts")
            .and_then(|c| c.after.clone());
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("Added /etc/new"), "{d:?}");
        assert!(d[1].starts_with("Modified /etc/hosts"), "{d:?}");
        assert!(d[1].contains("Hash") && d[1].contains("Size"), "{d:?}");
        assert!(d[2].starts_with("Removed /etc/old"), "{d:?}");
        assert!(
            scan(&mut e, DetectionSource::Scan).changes.is_empty(),
            "reported once"
        );

        assert!(matches!(
            e.approve("/etc/hosts", hosts.as_ref()),
            Approved::Applied
        ));
        std::fs::set_permissions(
            root.path().join("etc/hosts"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let d = describe(&scan(&mut e, DetectionSource::Scan));
        assert_eq!(d, ["Modified /etc/hosts [Mode]"]);
    }

    #[test]
    fn an_approval_of_a_state_the_file_has_left_approves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        e.scan(DetectionSource::Startup);
        std::fs::write(root.path().join("etc/hosts"), "approved").unwrap();
        let seen = e.scan(DetectionSource::Scan).changes[0].after.clone();
        // Changed again before the approval arrives: the new state is reported.
        std::fs::write(root.path().join("etc/hosts"), "sneaked in").unwrap();
        let o = match e.approve("/etc/hosts", seen.as_ref()) {
            Approved::Superseded(o) => o,
            Approved::Applied | Approved::NotMonitored => Outcome::default(),
        };
        let d = describe(&o);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("Modified /etc/hosts"), "{d:?}");
        assert_ne!(o.changes[0].after, seen);
        // The baseline is still the original: the next change is measured from it.
        std::fs::write(root.path().join("etc/hosts"), "third").unwrap();
        let next = e.scan(DetectionSource::Scan).changes;
        let before = next[0].before.as_ref().and_then(|b| b.hash.clone());
        assert_eq!(before, Some(blake3::hash(b"a").to_hex().to_string()));
    }

    #[test]
    fn an_approval_of_a_path_no_policy_covers_approves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        for dir in ["etc", "etcx", "opt"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        std::fs::write(root.path().join("etcx/hosts"), "x").unwrap();
        std::fs::write(root.path().join("opt/tool"), "t").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        scan(&mut e, DetectionSource::Startup);
        let digest = e.save().unwrap();
        let entries = digests_of(&e);

        // Even an approval of a file's present state (/opt/tool's) approves
        // nothing where no served entry covers the path: beside the entry, a
        // name it prefixes, below a non-recursive entry.
        let tool = FileAttributes {
            hash: Some(blake3::hash(b"t").to_hex().to_string()),
            ..FileAttributes::default()
        };
        for key in ["/opt/tool", "/etcx/hosts", "/etc/sub/deep"] {
            let answer = e.approve(key, Some(&tool));
            assert!(
                matches!(answer, Approved::NotMonitored),
                "{key}: {answer:?}"
            );
            assert!(e.baseline().approved(key).is_none(), "{key}");
        }
        assert!(!e.baseline().is_dirty(), "nothing written");
        assert_eq!(
            e.save().unwrap(),
            digest,
            "the baseline digest is unchanged"
        );
        assert_eq!(digests_of(&e), entries);
        assert!(scan(&mut e, DetectionSource::Scan).changes.is_empty());
    }

    #[test]
    fn one_policy_that_cannot_compile_never_blinds_the_others() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        let mut e = Engine::open(root.path(), state.path(), "n").unwrap();
        let mut bad = etc(true);
        bad.exclude = vec!["*.{bak,swp".into()];
        let input = |p: MonitoredPath| PolicyInput {
            generation: Some(1),
            spec: FileIntegrityPolicySpec::with_paths(vec![p]),
        };
        let result = e.set_policies(BTreeMap::from([
            ("bad".to_string(), input(bad)),
            ("good".to_string(), input(etc(true))),
        ]));
        assert!(result.is_err());
        assert_eq!(e.failed().keys().collect::<Vec<_>>(), ["bad"]);
        assert_eq!(e.policies().keys().collect::<Vec<_>>(), ["good"]);
        scan(&mut e, DetectionSource::Startup);
        std::fs::write(root.path().join("etc/hosts"), "evil").unwrap();
        let d = describe(&scan(&mut e, DetectionSource::Scan));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("Modified /etc/hosts"), "{d:?}");
    }

    #[test]
    fn the_baseline_survives_a_restart() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        std::fs::write(root.path().join("etc/passwd"), "p").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        drop(e);
        std::fs::write(root.path().join("etc/hosts"), "changed").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        assert!(e.had_baseline());
        let o = scan(&mut e, DetectionSource::Startup);
        assert_eq!(o.changes.len(), 1, "no false Added for untouched files");
        assert_eq!(o.changes[0].source, DetectionSource::Startup);
    }

    #[test]
    fn an_editor_rename_over_is_one_modified() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(false)]);
        scan(&mut e, DetectionSource::Startup);
        std::fs::write(root.path().join("etc/.hosts.swp"), "new").unwrap();
        std::fs::rename(
            root.path().join("etc/.hosts.swp"),
            root.path().join("etc/hosts"),
        )
        .unwrap();
        let paths = BTreeSet::from([PathBuf::from("etc/.hosts.swp"), PathBuf::from("etc/hosts")]);
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        e.mark_reported(&o);
        let d = describe(&o);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("Modified /etc/hosts"));
    }

    #[test]
    fn new_entries_baseline_silently_and_unreadable_files_are_reported_and_skipped() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/deep/er")).unwrap();
        std::fs::write(root.path().join("etc/deep/er/f"), "x").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut e, DetectionSource::Startup);
        // A loop below a monitored directory does not stop the scan.
        std::os::unix::fs::symlink("l2", root.path().join("etc/l1")).unwrap();
        std::os::unix::fs::symlink("l1", root.path().join("etc/l2")).unwrap();
        std::fs::write(root.path().join("etc/deep/er/g"), "y").unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        let d = describe(&o);
        assert!(
            d.iter().any(|c| c.starts_with("Added /etc/deep/er/g")),
            "{d:?}"
        );
        assert!(d.iter().any(|c| c.starts_with("Added /etc/l1")), "{d:?}");
    }

    fn usr_bin(attributes: Vec<Attribute>) -> MonitoredPath {
        MonitoredPath {
            name: "bin".into(),
            path: "/usr/bin".into(),
            attributes,
            ..MonitoredPath::default()
        }
    }

    fn entry(name: &str, path: &str, recursive: bool) -> MonitoredPath {
        MonitoredPath {
            name: name.into(),
            path: path.into(),
            recursive,
            ..MonitoredPath::default()
        }
    }

    #[test]
    fn a_new_hard_link_shows_on_the_file_itself() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(root.path().join("var/tmp")).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        std::fs::set_permissions(bin.join("sudo"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        let mut e = engine(
            root.path(),
            state.path(),
            vec![usr_bin(Vec::new()), etc(true)],
        );
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        scan(&mut e, DetectionSource::Startup);

        // A second name, where no entry looks: the binary itself changed.
        std::fs::hard_link(bin.join("sudo"), root.path().join("var/tmp/.s")).unwrap();
        // A new subdirectory moves its parent's link count: only the
        // subdirectory is reported.
        std::fs::create_dir(root.path().join("etc/sub")).unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        assert_eq!(
            describe(&o),
            ["Added /etc/sub []", "Modified /usr/bin/sudo [Links]"]
        );
        let sudo = o
            .changes
            .iter()
            .find(|c| c.path == "/usr/bin/sudo")
            .unwrap();
        assert_eq!(sudo.before.as_ref().and_then(|b| b.links), Some(1));
        assert_eq!(sudo.after.as_ref().and_then(|a| a.links), Some(2));
        let sub = o.changes.iter().find(|c| c.path == "/etc/sub").unwrap();
        assert_eq!(sub.after.as_ref().and_then(|a| a.links), None);
    }

    #[test]
    fn a_baseline_from_before_link_counts_upgrades_without_a_report() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        std::fs::write(bin.join("su"), "su").unwrap();
        // What an agent that did not record link counts compared by default.
        let before: Vec<Attribute> = AttributeProfile::Full
            .attributes()
            .iter()
            .copied()
            .filter(|a| *a != Attribute::Links)
            .collect();
        let mut old = engine(root.path(), state.path(), vec![usr_bin(before)]);
        scan(&mut old, DetectionSource::Startup);
        // A change reported (and not yet approved) by the old agent.
        std::fs::write(bin.join("su"), "evil su").unwrap();
        assert_eq!(scan(&mut old, DetectionSource::Scan).changes.len(), 1);
        let on_disk = old.save().unwrap();
        let digests = old.entry_digests();
        drop(old);

        let mut new = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        // Nothing for the cluster to tell from what it last saw.
        assert_eq!(new.entry_digests(), digests);
        assert_eq!(new.loaded_digest(), Some(on_disk.as_str()));
        let o = scan(&mut new, DetectionSource::Startup);
        assert_eq!(describe(&o), Vec::<String>::new(), "no flood on upgrade");
        new.save().unwrap();
        // The unchanged binary's count is its baseline now.
        std::fs::hard_link(bin.join("sudo"), root.path().join("usr/.s")).unwrap();
        let o = scan(&mut new, DetectionSource::Scan);
        assert_eq!(describe(&o), ["Modified /usr/bin/sudo [Links]"]);
        // The changed one is compared on its count once approved again.
        let su = o.changes.iter().find(|c| c.path == "/usr/bin/su");
        assert!(su.is_none());
    }

    #[test]
    fn a_mount_over_a_monitored_path_is_a_change_of_that_path() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let table = tempfile::NamedTempFile::new().unwrap();
        let host = "27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n";
        std::fs::write(table.path(), host).unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        std::fs::write(bin.join("su"), "su").unwrap();
        let mut e = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        e.set_mount_source(MountSource {
            table: table.path().to_path_buf(),
            root: PathBuf::from("/"),
        });
        assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
        assert!(e.mounts_changed().is_empty(), "nothing mounted since");

        // mount --bind /tmp/evil /usr/bin/sudo
        let bound =
            format!("{host}41 27 8:1 /tmp/evil /usr/bin/sudo rw shared:1 - ext4 /dev/sda1 rw\n");
        std::fs::write(table.path(), &bound).unwrap();
        let paths = e.mounts_changed();
        assert_eq!(paths, BTreeSet::from([PathBuf::from("usr/bin/sudo")]));
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        e.mark_reported(&o);
        assert_eq!(describe(&o), ["Modified /usr/bin/sudo [Mount]"]);
        let after = o.changes[0]
            .after
            .as_ref()
            .and_then(|a| a.mount.clone())
            .unwrap();
        assert_eq!(
            (after.mount_point.as_str(), after.root.as_str()),
            ("/usr/bin/sudo", "/tmp/evil")
        );
        let before = o.changes[0]
            .before
            .as_ref()
            .and_then(|a| a.mount.clone())
            .unwrap();
        assert_eq!(before.mount_point, "/");

        // A tmpfs over the whole directory: the directory and each file in it.
        let hidden = format!("{bound}42 27 0:50 / /usr/bin rw - tmpfs tmpfs rw\n");
        std::fs::write(table.path(), &hidden).unwrap();
        let paths = e.mounts_changed();
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        e.mark_reported(&o);
        assert_eq!(
            describe(&o),
            [
                "Modified /usr/bin [Mount]",
                "Modified /usr/bin/su [Mount]",
                "Modified /usr/bin/sudo [Mount]"
            ]
        );
        // Unmounted: back in the approved state (a scan finds nothing new).
        std::fs::write(table.path(), host).unwrap();
        let paths = e.mounts_changed();
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        assert!(o.changes.is_empty(), "{:?}", describe(&o));
        assert!(scan(&mut e, DetectionSource::Scan).changes.is_empty());
    }

    #[test]
    fn a_baseline_without_mounts_takes_the_first_table_without_a_report() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let table = tempfile::NamedTempFile::new().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        let source = MountSource {
            table: table.path().to_path_buf(),
            root: PathBuf::from("/"),
        };
        // No table yet (as with an agent that did not read one).
        std::fs::remove_file(table.path()).unwrap();
        let mut e = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        e.set_mount_source(source.clone());
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        drop(e);
        std::fs::write(table.path(), "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n").unwrap();
        let mut e = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        e.set_mount_source(source);
        assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
        std::fs::write(
            table.path(),
            "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n41 27 0:50 / /usr/bin/sudo rw - tmpfs tmpfs rw\n",
        )
        .unwrap();
        let d = describe(&scan(&mut e, DetectionSource::Scan));
        assert_eq!(d, ["Modified /usr/bin/sudo [Mount]"]);
    }

    #[test]
    fn nested_deep_and_wildcard_entries_are_scanned_once_each() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let w = |p: &str, c: &str| {
            let p = root.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        };
        w("etc/x", "x");
        w("etc/a/b/c/d/f", "f");
        w("etc/a/b/other", "o");
        w("var/a.log", "l");
        w("var/b.txt", "t");
        let mut e = engine(
            root.path(),
            state.path(),
            vec![
                entry("etc", "/etc", false),
                entry("deep", "/etc/a/b/c", true),
                entry("logs", "/var/*.log", false),
            ],
        );
        assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
        // etc, etc/x, etc/a; etc/a/b/c, its d and d/f; var/a.log.
        assert_eq!(e.files_total, 7);

        w("etc/a/b/c/d/new", "n");
        w("etc/a/b/unwatched", "u");
        w("var/new.log", "n");
        w("var/new.txt", "n");
        std::fs::remove_file(root.path().join("etc/x")).unwrap();
        let d = describe(&scan(&mut e, DetectionSource::Scan));
        assert_eq!(
            d,
            [
                "Added /etc/a/b/c/d/new []",
                "Added /var/new.log []",
                "Removed /etc/x []"
            ]
        );
    }

    #[test]
    fn a_directory_replaced_by_a_file_reports_what_was_below_it() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/sub/deeper")).unwrap();
        std::fs::write(root.path().join("etc/sub/deeper/f"), "f").unwrap();
        std::fs::write(root.path().join("etc/sub-file"), "g").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        drop(e);
        std::fs::remove_dir_all(root.path().join("etc/sub")).unwrap();
        std::fs::write(root.path().join("etc/sub"), "now a file").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        let d = describe(&scan(&mut e, DetectionSource::Startup));
        assert_eq!(
            d,
            [
                "Modified /etc/sub [Type, Mode]",
                "Removed /etc/sub/deeper []",
                "Removed /etc/sub/deeper/f []"
            ],
        );
    }

    /// A state of an earlier version, written by `write_old` into the state
    /// directory from an engine with one unapproved change (it returns the
    /// digest that version published), is taken over with no report and no
    /// alarm, and a later change is reported as usual.
    fn upgraded_without_a_report(write_old: impl FnOnce(Engine, &Path) -> String) {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/ssh")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "a").unwrap();
        std::fs::write(root.path().join("etc/ssh/sshd_config"), "b").unwrap();
        let mut old = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut old, DetectionSource::Startup);
        // A change reported and not approved: it stays reported once.
        std::fs::write(root.path().join("etc/hosts"), "changed").unwrap();
        assert_eq!(scan(&mut old, DetectionSource::Scan).changes.len(), 1);
        old.save().unwrap();
        let digests = old.entry_digests();
        let epoch = old.baseline().epoch("/etc/hosts");
        let published = write_old(old, state.path());

        let mut new = engine(root.path(), state.path(), vec![etc(true)]);
        assert!(new.had_baseline());
        assert_eq!(new.loaded_digest(), Some(published.as_str()), "no alarm");
        assert_eq!(new.entry_digests(), digests);
        assert_eq!(new.baseline().epoch("/etc/hosts"), epoch);
        let o = scan(&mut new, DetectionSource::Startup);
        assert!(o.changes.is_empty(), "{:?}", describe(&o));
        let saved = new.save().unwrap();
        assert!(new.journal().vouches(&published, &saved));
        drop(new);

        std::fs::write(root.path().join("etc/ssh/sshd_config"), "evil").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        assert_eq!(e.loaded_digest(), Some(saved.as_str()));
        let d = describe(&scan(&mut e, DetectionSource::Startup));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("Modified /etc/ssh/sshd_config"), "{d:?}");
        drop(e);
        assert!(!state.path().join(crate::baseline::LEGACY_FILE).exists());
    }

    #[test]
    fn a_baseline_of_an_earlier_version_is_migrated_without_a_report() {
        upgraded_without_a_report(|old, state| {
            // What an earlier version kept on disk instead, and published.
            let doc = old.baseline().to_legacy_document();
            drop(old);
            for f in [crate::baseline::FILE, crate::baseline::JOURNAL] {
                std::fs::remove_file(state.join(f)).unwrap();
            }
            std::fs::write(state.join(crate::baseline::LEGACY_FILE), &doc).unwrap();
            blake3::hash(&doc).to_hex().to_string()
        });
    }

    #[test]
    fn a_store_of_version_2_is_upgraded_without_a_report() {
        upgraded_without_a_report(|old, state| {
            // What the version before kept on disk, and published.
            let v2 = state.join("v2.redb");
            let published = old.baseline().write_as_version_2(&v2);
            drop(old);
            std::fs::rename(&v2, state.join(crate::baseline::FILE)).unwrap();
            std::fs::remove_file(state.join(crate::baseline::JOURNAL)).unwrap();
            published
        });
    }

    /// The entry digests, by `policy/entry`.
    fn digests_of(e: &Engine) -> BTreeMap<String, EntryDigest> {
        e.entry_digests()
            .into_iter()
            .map(|d| (format!("{}/{}", d.policy, d.entry), d))
            .collect()
    }

    #[test]
    fn entry_digests_follow_approvals_and_agree_with_a_recomputation() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        for f in ["hosts", "a", "b"] {
            std::fs::write(etc.join(f), f).unwrap();
        }
        let paths = || vec![etc_entry(), entry("hosts", "/etc/hosts", false)];
        let mut e = engine(root.path(), state.path(), paths());
        scan(&mut e, DetectionSource::Startup);
        let first = digests_of(&e);
        assert_eq!(first["p/etc"].files, 4, "{first:?}");
        assert_eq!(first["p/hosts"].files, 1);
        assert_eq!(first["p/hosts"].path.as_deref(), Some("/etc/hosts"));
        assert!(first["p/etc"].digest.starts_with(ENTRY_DIGEST_V2));
        assert_eq!(first["p/etc"].digest.len(), 64);

        // Reported, not approved: what the cluster saw is still the baseline.
        std::fs::write(etc.join("hosts"), "changed").unwrap();
        std::fs::write(etc.join("c"), "c").unwrap();
        std::fs::remove_file(etc.join("a")).unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        assert_eq!(o.changes.len(), 3, "{:?}", describe(&o));
        assert_eq!(digests_of(&e), first);

        for c in &o.changes {
            assert!(matches!(
                e.approve(&c.path, c.after.as_ref()),
                Approved::Applied
            ));
        }
        let approved = digests_of(&e);
        assert_ne!(approved["p/etc"].digest, first["p/etc"].digest);
        assert_ne!(approved["p/hosts"].digest, first["p/hosts"].digest);
        assert_eq!(approved["p/etc"].files, 4);
        assert_eq!(approved["p/hosts"].path.as_deref(), Some("/etc/hosts"));
        e.save().unwrap();
        drop(e);

        // Read again from the records: the same digests.
        let mut again = engine(root.path(), state.path(), paths());
        assert_eq!(digests_of(&again), approved);
        std::fs::write(etc.join("hosts"), "again").unwrap();
        assert_eq!(scan(&mut again, DetectionSource::Scan).changes.len(), 1);
        assert_eq!(digests_of(&again), approved, "reported only");
    }

    fn etc_entry() -> MonitoredPath {
        entry("etc", "/etc", true)
    }

    #[test]
    fn entry_digests_published_by_an_earlier_version_are_compared_in_their_format() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root").unwrap();
        std::fs::write(etc.join("group"), "root").unwrap();
        let paths = || {
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("group", "/etc/group", false),
            ]
        };
        let mut old = engine(root.path(), state.path(), paths());
        scan(&mut old, DetectionSource::Startup);
        // What the earlier version published: BLAKE3 over each entry's paths
        // and projected approved states, in path order.
        let published: Vec<EntryDigest> = old
            .entry_digests()
            .into_iter()
            .map(|d| {
                let path = d.path.clone().unwrap();
                let state = old.baseline.approved(&path).unwrap();
                let entry = old
                    .plan
                    .entries
                    .iter()
                    .find(|e| e.owner.entry == d.entry)
                    .unwrap();
                let mut h = blake3::Hasher::new();
                h.update(&(path.len() as u64).to_le_bytes());
                h.update(path.as_bytes());
                h.update(state_digest(Some(&project(&state, &entry.attributes))).as_bytes());
                EntryDigest {
                    digest: h.finalize().to_hex().to_string(),
                    ..d
                }
            })
            .collect();
        drop(old);

        // Same baseline: nothing differs, nothing is reported.
        let mut same = engine(root.path(), state.path(), paths());
        same.compare_first_scan_with(published.clone());
        scan(&mut same, DetectionSource::Startup);
        let known = same.take_known_entries().unwrap();
        assert_eq!(same.differing_entries(&known), (Vec::new(), Vec::new()));
        drop(same);

        // The baseline lost while the agent was down and a file changed: the
        // new baseline's entry names the file.
        std::fs::write(etc.join("passwd"), "evil").unwrap();
        let mut fresh = Engine::open_fresh(root.path(), state.path(), "n").unwrap();
        fresh
            .set_policies(BTreeMap::from([(
                "p".to_string(),
                PolicyInput {
                    generation: Some(1),
                    spec: FileIntegrityPolicySpec::with_paths(paths()),
                },
            )]))
            .unwrap();
        scan(&mut fresh, DetectionSource::Startup);
        let (names, changes) = fresh.differing_entries(&published);
        assert_eq!(names, ["p/passwd"]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].path, "/etc/passwd");
        assert_eq!(changes[0].category, ChangeCategory::Modified);
        // Against digests in the current format, the same answer.
        let current = fresh.entry_digests();
        assert_eq!(fresh.differing_entries(&current).0, Vec::<String>::new());
    }
}
