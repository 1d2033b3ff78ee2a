//! The monitoring loop: a startup scan against the baseline on disk, then
//! real-time inotify events (coalesced per path within the debounce window)
//! and periodic full scans, until shutdown. Nothing polls: the loop sleeps
//! until an event, a debounce deadline, the next scan or a policy update.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{
    DetectionSource, EntryDigest, EntryDigestMove, FileAttributes, FileChangeSpec,
};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::attribution::AttributionState;
use crate::attribution::fanotify::Notice;
use crate::attribution::join::Attribution;
use crate::attribution::pods::PodIndex;
use crate::containers::DriftBatch;
use crate::engine::{Approval, Approved, Engine, Outcome, PolicyStatus};
use crate::packages::{Packages, Scope};
use crate::paths::rel_path;
use crate::report::object::object_name;
use crate::report::transaction::{self, Held};
use crate::report::{Batch, Detected, detected, hand_over, sequence};
use crate::served::ServedPolicies;
use crate::telemetry::Telemetry;

/// Instructions to the loop.
#[derive(Debug)]
pub enum Control {
    /// Serve exactly these policies from now on.
    Policies(ServedPolicies),
    /// An approver approved the state of a host path that a FileChange
    /// reported (its policy entry and `after`); answers what became of it.
    Approve {
        request: ApprovalRequest,
        done: oneshot::Sender<Answer>,
    },
    /// An approver approved changes a package transaction object listed
    /// (all of them, or the paths the approval names); `remainder` lists
    /// the others, reported again as a new object to approve.
    ApproveAll {
        requests: Vec<ApprovalRequest>,
        remainder: Option<Box<FileChangeSpec>>,
        done: oneshot::Sender<AllAnswer>,
    },
}

/// What the loop did with the approval of a transaction's changes.
#[derive(Debug, Default)]
pub struct AllAnswer {
    /// Paths whose approved state is the baseline (in memory until
    /// `recorded` says `true`, as for [`Answer::Applied`]).
    pub applied: Vec<String>,
    pub moved: Vec<EntryDigestMove>,
    pub recorded: Option<oneshot::Sender<bool>>,
    /// Paths that moved on (their present state is reported anew).
    pub superseded: Vec<String>,
    /// Paths no served entry covers here.
    pub not_monitored: Vec<String>,
    /// The FileChange that lists the changes left out of the approval.
    pub remainder: Option<String>,
}

/// The reviewed state: a FileChange's policy entry, path and `after`.
#[derive(Debug, Clone)]
pub struct ApprovalRequest {
    pub policy: String,
    pub entry: String,
    pub key: String,
    pub after: Option<Box<FileAttributes>>,
}

/// What the loop did with an approval.
#[derive(Debug)]
pub enum Answer {
    /// The approved state is the baseline in memory, moving these entry
    /// digests; it is saved once `recorded` says `true` (the answer, with
    /// the digests, is on the FileChange), and undone otherwise: the cluster
    /// holds every approval a node's digests moved by.
    Applied {
        moved: Vec<EntryDigestMove>,
        recorded: oneshot::Sender<bool>,
    },
    /// The file has moved on: nothing approved; these FileChanges report its
    /// present state (none if it was reported already).
    Superseded(Vec<String>),
    /// No served policy covers the path: nothing approved.
    NotMonitored,
}

/// What the loop last knew, for status reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Per policy: generation applied, files, last full scan, errors.
    pub policies: BTreeMap<String, PolicyStatus>,
    pub files_total: usize,
    pub baseline_digest: Option<String>,
    pub errors: usize,
    /// The startup scan is done (the agent is ready).
    pub ready: bool,
    /// The inotify watch limit was reached: some directories rely on scans only.
    pub watch_limit: bool,
    /// Process attribution: on, or why not.
    pub attribution: AttributionState,
    /// Policies that cannot be compiled, with why (the others are served).
    pub failed: BTreeMap<String, String>,
    /// Per-entry digests of the baseline (published for the next start).
    pub entries: Vec<EntryDigest>,
    /// Entries (`policy/entry`) found different from what the cluster last
    /// saw, when the baseline on disk was lost or replaced.
    pub differing: Option<Vec<String>>,
    /// Policies with a kept baseline this node no longer serves, with the
    /// generation last served.
    pub unserved: BTreeMap<String, Option<i64>>,
}

struct Inotify {
    watcher: Option<notify::RecommendedWatcher>,
    watched: BTreeSet<PathBuf>,
    limit_reported: bool,
}

impl Inotify {
    fn new(tx: mpsc::UnboundedSender<notify::Result<notify::Event>>) -> Self {
        let watcher = notify::recommended_watcher(move |ev| {
            let _ = tx.send(ev);
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(error) => {
                warn!(%error, "real-time watching unavailable; periodic scans only");
                None
            }
        };
        Inotify {
            watcher,
            watched: BTreeSet::new(),
            limit_reported: false,
        }
    }

    fn sync(&mut self, dirs: Vec<PathBuf>, telemetry: &Telemetry) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        let want: BTreeSet<PathBuf> = dirs.into_iter().collect();
        for gone in self.watched.difference(&want).cloned().collect::<Vec<_>>() {
            let _ = w.unwatch(&gone);
            self.watched.remove(&gone);
        }
        for dir in want {
            if self.watched.contains(&dir) || !dir.is_dir() {
                continue;
            }
            match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir);
                }
                Err(error) => {
                    telemetry.watch_failed();
                    let limit = matches!(&error.kind, notify::ErrorKind::MaxFilesWatch)
                        || error.to_string().contains("No space left");
                    if limit && !self.limit_reported {
                        self.limit_reported = true;
                        warn!(
                            "inotify watch limit reached (fs.inotify.max_user_watches): directories beyond it are covered by periodic scans only"
                        );
                    } else if !limit {
                        debug!(dir = %dir.display(), %error, "cannot watch");
                    }
                }
            }
        }
        telemetry.directories_watched(self.watched.len());
    }
}

/// How the loop runs.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// In a cluster the served policies come from the API: no scan (which
    /// would forget the baseline of unknown policies) before they are known.
    pub wait_for_policies: bool,
    /// The node's pods, to name the pod behind a change (in a cluster).
    pub pods: Option<PodIndex>,
}

/// The loop's ends.
pub struct Channels {
    /// Served policies and approvals.
    pub control: mpsc::Receiver<Control>,
    /// Detected changes, to the reporter.
    pub out: mpsc::Sender<Batch>,
    /// What the loop last knew, for the node status.
    pub status: watch::Sender<Snapshot>,
    /// Container drift to number and queue ([`crate::containers`]).
    pub drift: Option<mpsc::Receiver<DriftBatch>>,
}

/// The reporter is gone (the agent is stopping): nothing more is marked.
struct Stopped;

/// How an outcome was found, for what [`Monitor::carry`] does besides the protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A full scan: the first one compares the entries with what the cluster last saw.
    Scan,
    /// The rescan of paths that changed.
    Rescan,
    /// An approval found the file moved on: its FileChanges are named in the answer.
    Approval,
}

/// What became of a carried outcome.
struct Carried {
    /// The FileChanges handed over (only for [`Found::Approval`]).
    names: Vec<String>,
    /// Entries that differ from what the cluster last saw (after a lost or
    /// replaced baseline, at the first scan).
    differing: Option<Vec<String>>,
    /// The baseline changed and was written.
    saved: bool,
}

/// The loop wakes at least this often, so /healthz can tell idle from stalled.
const BEAT: Duration = Duration::from_secs(10);

/// A file that could not be read is looked at again after this long (and at
/// every event on it, and every scan), until its content can be compared.
const RETRY_UNREADABLE: Duration = Duration::from_secs(10);

/// The monitoring loop's state.
pub struct Monitor {
    engine: Engine,
    telemetry: Telemetry,
    out: mpsc::Sender<Batch>,
    status: watch::Sender<Snapshot>,
    inotify: Inotify,
    attribution: Attribution,
    /// The node's package databases, for the changes of package-owned files.
    packages: Packages,
    root: PathBuf,
    /// Package-verified changes held until their transaction closes.
    held: Held,
    /// Paths waiting for their rescan, with when (debounce).
    pending: BTreeMap<PathBuf, Instant>,
    /// Directories the real-time sources follow.
    followed: BTreeSet<PathBuf>,
    /// No full scan yet.
    first: bool,
    next_scan: Instant,
    /// The digest of the baseline last written.
    digest: Option<String>,
    have_policies: bool,
    wait_for_policies: bool,
}

/// Runs the loop until `shutdown` resolves or the control channel closes;
/// gives the engine back.
pub async fn run(
    engine: Engine,
    telemetry: Telemetry,
    channels: Channels,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Engine {
    let Channels {
        mut control,
        out,
        status,
        mut drift,
    } = channels;
    let (inotify_tx, mut inotify_events) = mpsc::unbounded_channel();
    let (attribution, mut notices) = Attribution::new(engine.root_path(), settings.pods);
    // A mount made over a monitored path changes what the host reads there.
    let (mounts_tx, mut mounts) = mpsc::unbounded_channel::<()>();
    crate::mounts::follow(engine.mount_source(), move || mounts_tx.send(()).is_ok());
    let packages = Packages::new(engine.root_path());
    let mut m = Monitor {
        root: engine.root_path().to_path_buf(),
        engine,
        telemetry,
        out,
        status,
        inotify: Inotify::new(inotify_tx),
        attribution,
        packages,
        held: Held::default(),
        pending: BTreeMap::new(),
        followed: BTreeSet::new(),
        first: true,
        next_scan: Instant::now(),
        digest: None,
        have_policies: false,
        wait_for_policies: settings.wait_for_policies,
    };
    m.attribution.want(m.wants_attribution(), &m.telemetry);
    tokio::pin!(shutdown);
    loop {
        m.telemetry.loop_alive();
        if m.scan_due() {
            if m.scan().await.is_err() {
                return m.engine;
            }
            continue;
        }
        let wake = m.next_wake();
        let step = tokio::select! {
            () = &mut shutdown => {
                let _ = m.save();
                return m.engine;
            }
            Some(event) = inotify_events.recv() => {
                m.inotify_event(event);
                Ok(())
            }
            Some(()) = mounts.recv() => {
                m.mounts_changed();
                Ok(())
            }
            Some((specs, done)) = next_drift(&mut drift) => m.drift(specs, done).await,
            notice = notices.recv() => {
                m.notice(notice);
                Ok(())
            }
            () = tokio::time::sleep_until(wake) => m.rescan_due().await,
            msg = control.recv() => match msg {
                None => {
                    let _ = m.save();
                    return m.engine;
                }
                Some(Control::Policies(served)) => {
                    m.serve(served);
                    Ok(())
                }
                Some(Control::Approve { request, done }) => m.approve(&request, done).await,
                Some(Control::ApproveAll { requests, remainder, done }) => {
                    m.approve_all(&requests, remainder, done).await
                }
            },
        };
        if step.is_err() {
            return m.engine;
        }
    }
}

/// The next drift batch; never, without a drift task.
async fn next_drift(drift: &mut Option<mpsc::Receiver<DriftBatch>>) -> Option<DriftBatch> {
    match drift {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Monitor {
    /// Container drift through the reporting protocol: numbered, handed
    /// over (queued on disk), the counter saved; then the drift task saves
    /// what it reported.
    async fn drift(
        &mut self,
        specs: Vec<kube_fim_crds::FileChangeSpec>,
        done: oneshot::Sender<()>,
    ) -> Result<(), Stopped> {
        self.telemetry.changes_detected(0, 0, &specs);
        let mut reports: Vec<Detected> = specs
            .into_iter()
            .map(|spec| Detected { spec, epoch: 0 })
            .collect();
        sequence::number(&mut reports, &mut self.engine);
        if !hand_over(&self.out, reports).await {
            return Err(Stopped);
        }
        self.digest = self.save();
        let _ = done.send(());
        Ok(())
    }

    /// Carries a detected outcome through the reporting protocol
    /// ([`crate::report`]): counted, handed over (and queued on disk by the
    /// reporter), marked reported, saved.
    async fn carry(&mut self, mut outcome: Outcome, found: Found) -> Result<Carried, Stopped> {
        tokio::task::block_in_place(|| self.packages.verify(&mut outcome.changes, &self.telemetry));
        self.telemetry
            .changes_detected(outcome.bytes, outcome.errors.len(), &outcome.changes);
        // The start's scan sees an upgrade made while the agent was down
        // (or one it was holding when it died) whole: grouped at once, in the
        // same batch, so a transaction queued before a crash gets its number
        // back by its identity.
        let at_start = found == Found::Scan && self.first;
        let grouped = if at_start {
            let keys = groupable_paths(&outcome.changes);
            let specs = outcome.take_paths(&keys, false).into_iter().map(|(s, _)| s);
            transaction::group(specs.collect(), Timestamp::now())
        } else {
            if found != Found::Approval {
                self.hold_package_changes(&mut outcome);
            }
            Vec::new()
        };
        let mut reports = detected(&mut outcome);
        reports.extend(grouped.into_iter().map(|spec| Detected { spec, epoch: 0 }));
        sequence::number(&mut reports, &mut self.engine);
        let names = match found {
            Found::Approval => reports
                .iter()
                .map(|d| object_name(&d.spec, d.epoch))
                .collect(),
            Found::Scan | Found::Rescan => Vec::new(),
        };
        if !hand_over(&self.out, reports).await {
            return Err(Stopped);
        }
        self.engine.mark_reported(&outcome);
        let differing = match found {
            Found::Scan => self.compare_with_cluster().await?,
            Found::Rescan | Found::Approval => None,
        };
        let saved = self.engine.baseline().is_dirty();
        self.digest = self.save();
        Ok(Carried {
            names,
            differing,
            saved,
        })
    }

    /// Takes the package-verified changes out of `outcome` (not reported, not
    /// marked) into the open transaction: paths whose every change is
    /// groupable ([`transaction::groupable`]) only.
    fn hold_package_changes(&mut self, outcome: &mut Outcome) {
        let keys = groupable_paths(&outcome.changes);
        if keys.is_empty() {
            return;
        }
        let now = Instant::now();
        for (spec, epoch) in outcome.take_paths(&keys, true) {
            self.held.hold(Detected { spec, epoch }, now);
        }
    }

    /// Closes the open transaction: its paths looked at again, the changes
    /// still there grouped into transaction objects, the rest reported on
    /// their own; numbered, handed over, then marked (see
    /// [`crate::report::transaction`]).
    async fn close_transaction(&mut self) -> Result<(), Stopped> {
        let held = self.held.take();
        let paths: BTreeSet<PathBuf> = held.iter().map(|d| rel_path(&d.spec.path)).collect();
        let (mut fresh, new_dirs) =
            tokio::task::block_in_place(|| self.engine.rescan(&paths, DetectionSource::Realtime));
        tokio::task::block_in_place(|| self.packages.verify(&mut fresh.changes, &self.telemetry));
        let keys = groupable_paths(&fresh.changes);
        let grouped: Vec<FileChangeSpec> = fresh
            .take_paths(&keys, false)
            .into_iter()
            .map(|(spec, _)| spec)
            .collect();
        self.telemetry
            .changes_detected(fresh.bytes, fresh.errors.len(), &fresh.changes);
        let items = transaction::merge(held, grouped);
        let mut reports = detected(&mut fresh);
        let objects = transaction::group(items, Timestamp::now());
        info!(
            objects = objects.len(),
            others = reports.len(),
            "package transaction closed"
        );
        reports.extend(objects.into_iter().map(|spec| Detected { spec, epoch: 0 }));
        sequence::number(&mut reports, &mut self.engine);
        if !hand_over(&self.out, reports).await {
            return Err(Stopped);
        }
        self.engine.mark_reported(&fresh);
        let saved = self.engine.baseline().is_dirty();
        self.digest = self.save();
        if saved {
            self.publish_status(None);
        }
        if new_dirs {
            self.sync_watches(true);
        }
        Ok(())
    }

    /// After a lost or replaced baseline, the first scan's entries against
    /// what the cluster last saw; what differs is reported.
    async fn compare_with_cluster(&mut self) -> Result<Option<Vec<String>>, Stopped> {
        let Some(known) = self.engine.take_known_entries() else {
            return Ok(None);
        };
        let (names, changes) = self.engine.differing_entries(&known);
        if !names.is_empty() {
            warn!(entries = ?names, "entries differ from the baseline the cluster last saw");
        }
        let mut changes: Vec<Detected> = changes
            .into_iter()
            .map(|spec| Detected { spec, epoch: 0 })
            .collect();
        sequence::number(&mut changes, &mut self.engine);
        if !hand_over(&self.out, changes).await {
            return Err(Stopped);
        }
        Ok(Some(names))
    }

    fn scan_due(&self) -> bool {
        if self.first {
            self.have_policies || !self.wait_for_policies
        } else {
            Instant::now() >= self.next_scan
        }
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let due = self
            .pending
            .values()
            .min()
            .copied()
            .into_iter()
            .chain(self.held.due())
            .min();
        if self.first {
            due.unwrap_or(now + BEAT)
        } else {
            due.unwrap_or(self.next_scan).min(self.next_scan)
        }
        .min(now + BEAT)
    }

    /// A full scan (the startup scan first).
    async fn scan(&mut self) -> Result<(), Stopped> {
        let source = if self.first && self.engine.had_baseline() {
            DetectionSource::Startup
        } else {
            DetectionSource::Scan
        };
        let started = std::time::Instant::now();
        let outcome = tokio::task::block_in_place(|| self.engine.scan(source));
        let status = self.engine.status();
        self.telemetry.scan_finished(
            started.elapsed(),
            status
                .policies
                .iter()
                .map(|(name, p)| (name.as_str(), p.files)),
        );
        info!(
            files = outcome.files,
            changes = outcome.changes.len(),
            errors = outcome.errors.len(),
            seconds = started.elapsed().as_secs_f64(),
            ?source,
            "scan"
        );
        for e in outcome.errors.iter().take(20) {
            warn!(path = %e.path, reason = %e.reason, "skipped");
        }
        let carried = self.carry(outcome, Found::Scan).await?;
        self.retry_unreadable();
        if let Err(error) = tokio::task::block_in_place(|| self.engine.compact_baseline()) {
            warn!(%error, "could not compact the baseline");
        }
        self.sync_watches(false);
        self.first = false;
        self.next_scan = Instant::now() + self.engine.timing().1;
        self.publish_status(carried.differing);
        // Ready once the status holds the entry digests (computed from
        // every stored path after the first scan; kept up to date since).
        self.telemetry.ready();
        Ok(())
    }

    /// Rescans the paths whose debounce is over.
    async fn rescan_due(&mut self) -> Result<(), Stopped> {
        let now = Instant::now();
        if self.held.due().is_some_and(|d| d <= now) {
            self.close_transaction().await?;
        }
        let ready: BTreeSet<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(p, _)| p.clone())
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        self.pending.retain(|p, _| !ready.contains(p));
        let (mut outcome, new_dirs) =
            tokio::task::block_in_place(|| self.engine.rescan(&ready, DetectionSource::Realtime));
        self.attribution
            .attach(&ready, &mut outcome.changes, &self.telemetry);
        if self.carry(outcome, Found::Rescan).await?.saved {
            self.publish_status(None);
        }
        self.retry_unreadable();
        if new_dirs {
            self.sync_watches(true);
        }
        Ok(())
    }

    /// Looks again at the files that could not be read, after
    /// [`RETRY_UNREADABLE`] (a lease is broken, a rule lifted): once one
    /// can be read, its content is compared and reported if it differs.
    fn retry_unreadable(&mut self) {
        let at = Instant::now() + RETRY_UNREADABLE;
        for path in self.engine.unreadable() {
            self.pending.entry(path).or_insert(at);
        }
    }

    fn inotify_event(&mut self, event: notify::Result<notify::Event>) {
        use notify::event::{AccessKind, AccessMode};
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                self.telemetry.watch_failed();
                warn!(%error, "watch error; the next scan covers it");
                return;
            }
        };
        if event.need_rescan() {
            // The kernel's event queue overflowed: events were lost, so
            // look at everything now.
            warn!("real-time event queue overflowed; rescanning now");
            self.telemetry.watch_failed();
            self.next_scan = Instant::now();
            return;
        }
        if matches!(
            event.kind,
            EventKind::Access(
                AccessKind::Open(_)
                    | AccessKind::Read
                    | AccessKind::Close(AccessMode::Read)
                    | AccessKind::Close(AccessMode::Execute)
                    | AccessKind::Any
            )
        ) {
            return;
        }
        let closed = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
        let deadline = Instant::now() + self.engine.timing().0;
        for p in event.paths {
            if let Ok(rel) = p.strip_prefix(&self.root) {
                self.pending.entry(rel.to_path_buf()).or_insert(deadline);
                if closed {
                    self.closed(rel.to_path_buf());
                }
            }
        }
    }

    /// A close after a write: the file is looked at now, so a state undone
    /// before its debounce ends is still reported ([`Engine::closed`]).
    fn closed(&mut self, rel: PathBuf) {
        if !tokio::task::block_in_place(|| self.engine.closed(&rel)) {
            let dropped = self.engine.transient_dropped();
            if dropped.is_power_of_two() {
                warn!(
                    dropped,
                    "too many files written within one debounce window: the states between are not all kept"
                );
            }
        }
    }

    fn mounts_changed(&mut self) {
        let paths = self.engine.mounts_changed();
        if !paths.is_empty() {
            info!(
                paths = paths.len(),
                "host mounts changed over monitored paths"
            );
        }
        let now = Instant::now();
        let changed = !paths.is_empty();
        for p in paths {
            self.pending.insert(p, now);
        }
        // A mount over a followed directory hides the directory its mark or
        // watch is on: follow what the path names now.
        if changed {
            self.sync_watches(false);
        }
    }

    fn notice(&mut self, notice: Option<Notice>) {
        match notice {
            Some(Notice::Changed { rel, writer, mask }) => {
                let deadline = Instant::now() + self.engine.timing().0;
                self.pending.entry(rel.clone()).or_insert(deadline);
                if mask & libc::FAN_CLOSE_WRITE != 0 {
                    self.closed(rel.clone());
                }
                self.attribution.note(rel, *writer);
            }
            Some(Notice::Overflow) => {
                self.telemetry.fanotify_overflowed();
                warn!("fanotify queue overflow: events lost, rescanning everything");
                self.next_scan = Instant::now();
            }
            None => {}
        }
    }

    /// Serves exactly `served` from now on.
    fn serve(&mut self, served: ServedPolicies) {
        self.have_policies = true;
        let wanted = served.inputs();
        if &wanted == self.engine.policies() {
            return;
        }
        info!(policies = ?wanted.keys().collect::<Vec<_>>(), "serving");
        let before: Vec<String> = self.engine.policies().keys().cloned().collect();
        if let Err(error) = self.engine.set_policies(wanted) {
            warn!(%error, "policy not applied");
        }
        self.packages.set_scope(Scope::new(
            self.engine
                .entry_bases()
                .iter()
                .map(|b| [b"/".as_slice(), b.as_os_str().as_bytes()].concat()),
        ));
        for name in before {
            if !self.engine.policies().contains_key(&name) {
                self.telemetry.policy_dropped(&name);
            }
        }
        self.attribution
            .want(self.wants_attribution(), &self.telemetry);
        // New entries are baselined, removed ones forgotten, now.
        self.next_scan = Instant::now();
    }

    /// An approver approved the state a FileChange reported.
    async fn approve(
        &mut self,
        request: &ApprovalRequest,
        done: oneshot::Sender<Answer>,
    ) -> Result<(), Stopped> {
        let approval = Approval {
            policy: &request.policy,
            entry: &request.entry,
            key: &request.key,
            after: request.after.as_deref(),
        };
        let approved = tokio::task::block_in_place(|| self.engine.approve(&approval));
        let answer = match approved {
            Approved::Applied(applied) => {
                let (recorded, answered) = oneshot::channel();
                let moved = applied.moved.clone();
                let _ = done.send(Answer::Applied { moved, recorded });
                // The answer first, then the baseline: a crash in between
                // leaves the approval unapplied here (its state is reported
                // again), never a digest the cluster cannot explain.
                if answered.await != Ok(true) {
                    warn!(path = %request.key, "the answer to an approval was not recorded: not applied");
                    self.engine.revert_approval(applied);
                }
                self.digest = self.save();
                self.publish_status(None);
                return Ok(());
            }
            Approved::NotMonitored => Answer::NotMonitored,
            Approved::Superseded(outcome) => {
                Answer::Superseded(self.carry(outcome, Found::Approval).await?.names)
            }
        };
        self.digest = self.save();
        let _ = done.send(answer);
        self.publish_status(None);
        Ok(())
    }

    /// An approver approved changes of a package transaction object.
    async fn approve_all(
        &mut self,
        requests: &[ApprovalRequest],
        remainder: Option<Box<FileChangeSpec>>,
        done: oneshot::Sender<AllAnswer>,
    ) -> Result<(), Stopped> {
        let approvals: Vec<Approval<'_>> = requests
            .iter()
            .map(|r| Approval {
                policy: &r.policy,
                entry: &r.entry,
                key: &r.key,
                after: r.after.as_deref(),
            })
            .collect();
        let mut all = tokio::task::block_in_place(|| self.engine.approve_all(&approvals));
        let superseded = std::mem::take(&mut all.superseded);
        let mut answer = AllAnswer {
            applied: all.applied_paths.clone(),
            moved: all.moved.clone(),
            superseded: superseded.iter().map(|(p, _)| p.clone()).collect(),
            not_monitored: all.not_monitored.clone(),
            ..AllAnswer::default()
        };
        if let Some(spec) = remainder {
            // Numbered and queued like any report; saved with the baseline below.
            let mut reports = vec![Detected {
                spec: *spec,
                epoch: 0,
            }];
            sequence::number(&mut reports, &mut self.engine);
            answer.remainder = reports.first().map(|d| object_name(&d.spec, 0));
            if !hand_over(&self.out, reports).await {
                self.engine.revert_all(all);
                return Err(Stopped);
            }
        }
        if all.applied_paths.is_empty() {
            let _ = done.send(answer);
        } else {
            let (recorded, answered) = oneshot::channel();
            answer.recorded = Some(recorded);
            let _ = done.send(answer);
            // The answer first, then the baseline (as for one change).
            if answered.await != Ok(true) {
                warn!(
                    changes = all.applied_paths.len(),
                    "the answer to a transaction's approval was not recorded: not applied"
                );
                self.engine.revert_all(all);
            }
        }
        // Saved (with the approvals) before the paths that moved on are reported.
        self.digest = self.save();
        for (_, outcome) in superseded {
            self.carry(outcome, Found::Approval).await?;
        }
        self.publish_status(None);
        Ok(())
    }

    fn wants_attribution(&self) -> bool {
        self.engine
            .policies()
            .values()
            .any(|p| p.spec.process_attribution)
    }

    /// Real-time sources follow the engine's directories: fanotify where it
    /// is on and can, inotify for the rest. A directory followed from now on
    /// is looked at again once it is: what was written in it between the
    /// rescan that found it and its mark or watch reached no source
    /// (`relook`: after a real-time rescan; a full scan's new directories are
    /// left to the next one rather than hashed twice).
    fn sync_watches(&mut self, relook: bool) {
        let wanted = self.engine.watch_dirs();
        let deadline = Instant::now() + self.engine.timing().0;
        for dir in wanted.iter().filter(|d| !self.followed.contains(*d)) {
            if let (true, Ok(rel)) = (relook, dir.strip_prefix(&self.root)) {
                self.pending.entry(rel.to_path_buf()).or_insert(deadline);
            }
        }
        self.followed = wanted.iter().cloned().collect();
        let dirs = self
            .attribution
            .sync(self.engine.root_path(), wanted, &self.telemetry);
        self.inotify.sync(dirs, &self.telemetry);
    }

    fn save(&mut self) -> Option<String> {
        match tokio::task::block_in_place(|| self.engine.save()) {
            Ok(d) => Some(d),
            Err(error) => {
                self.telemetry.baseline_write_failed();
                warn!(%error, "could not write the baseline");
                None
            }
        }
    }

    fn publish_status(&self, differing: Option<Vec<String>>) {
        let engine = self.engine.status();
        let snapshot = Snapshot {
            policies: engine.policies,
            files_total: engine.files_total,
            baseline_digest: self.digest.clone(),
            errors: engine.errors,
            ready: true,
            watch_limit: self.inotify.limit_reported,
            attribution: self.attribution.state().clone(),
            failed: engine.failed,
            entries: engine.entries,
            differing,
            unserved: engine.unserved,
        };
        let _ = self.status.send(snapshot);
    }
}

/// The paths of `changes` whose every change may join a transaction.
fn groupable_paths(changes: &[FileChangeSpec]) -> BTreeSet<String> {
    let mut all: BTreeMap<&str, bool> = BTreeMap::new();
    for c in changes {
        *all.entry(c.path.as_str()).or_insert(true) &= transaction::groupable(c);
    }
    all.into_iter()
        .filter(|(_, g)| *g)
        .map(|(p, _)| p.to_string())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::PolicyInput;
    use crate::fixtures::{self, EVENTS, FILECHANGES};
    use crate::report::deliver::{self, RateLimit};
    use crate::report::reporter;
    use http::Method;
    use kube_fim_crds::{FileIntegrityPolicySpec, MonitoredPath};

    fn policies() -> BTreeMap<String, PolicyInput> {
        let spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
            name: "passwd".into(),
            path: "/etc/passwd".into(),
            ..MonitoredPath::default()
        }]);
        BTreeMap::from([(
            "p".to_string(),
            PolicyInput {
                generation: Some(1),
                spec,
            },
        )])
    }

    // The loop scans in `block_in_place`, which needs the multi-threaded
    // runtime, where tokio's clock cannot be paused: this one runs on real
    // time (the reporter's and deliverer's own tests pause it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_found_at_startup_is_created_once() {
        let mut a = fixtures::agent();
        let root = tempfile::tempdir().unwrap();
        let state = a.dir.path().join("state");
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(root.path().join("etc/passwd"), "root:x:0:0\n").unwrap();
        {
            let mut engine = Engine::open_fresh(root.path(), &state, "n1").unwrap();
            engine.set_policies(policies()).unwrap();
            engine.scan(DetectionSource::Scan);
            engine.save().unwrap();
        }
        // Changed while the agent was down.
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0\nmallory:x:0:0\n",
        )
        .unwrap();
        let mut engine = Engine::open(root.path(), &state, "n1").unwrap();
        engine.set_policies(policies()).unwrap();

        let (_control, control) = mpsc::channel(4);
        let (out, batches) = mpsc::channel(4);
        let (status, mut snapshots) = watch::channel(Snapshot::default());
        let (stop, shutdown) = fixtures::shutdown();
        let channels = Channels {
            control,
            out,
            status,
            drift: None,
        };
        let telemetry = a.ctx.telemetry.clone();
        let monitor = tokio::spawn(run(
            engine,
            telemetry,
            channels,
            Settings::default(),
            shutdown.clone(),
        ));
        let reporter = tokio::spawn(reporter::run(a.ctx.clone(), batches, shutdown.clone()));
        let limit = RateLimit {
            qps: 10.0,
            burst: 10,
        };
        let deliverer = tokio::spawn(deliver::run(a.ctx.clone(), limit, shutdown));

        let created = a.api.expect(Method::POST, FILECHANGES).await;
        assert_eq!(created.body["spec"]["path"], "/etc/passwd");
        assert_eq!(created.body["spec"]["category"], "Modified");
        assert_eq!(created.body["spec"]["source"], "Startup");
        created.created();
        a.api.expect(Method::POST, EVENTS).await.created();
        // Marked reported once queued: the status after the scan, and no second create.
        snapshots.wait_for(|s| s.ready).await.unwrap();
        let later = a.api.quiet(Duration::from_secs(3)).await;
        assert!(
            !later.iter().any(|(_, path)| path == FILECHANGES),
            "created again: {later:?}"
        );
        stop.send(true).unwrap();
        let (m, r, d, _) = tokio::join!(
            monitor,
            reporter,
            deliverer,
            a.api.quiet(Duration::from_secs(2))
        );
        let engine = m.unwrap();
        r.unwrap();
        d.unwrap();
        // What was reported stays reported: a new scan finds nothing new.
        let mut engine = engine;
        let again = tokio::task::block_in_place(|| engine.scan(DetectionSource::Scan));
        assert!(again.changes.is_empty(), "{:?}", again.changes);
    }
}
