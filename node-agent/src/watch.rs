//! The monitoring loop: a startup scan against the baseline on disk, then
//! real-time inotify events (coalesced per path within the debounce window)
//! and periodic full scans, until shutdown. Nothing polls: the loop sleeps
//! until an event, a debounce deadline, the next scan or a policy update.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{DetectionSource, EntryDigest};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::attribution::AttributionState;
use crate::attribution::fanotify::Notice;
use crate::attribution::join::Attribution;
use crate::attribution::pods::PodIndex;
use crate::engine::{Approved, Engine, Outcome, PolicyInput};
use crate::metrics::AgentMetrics;
use crate::report::{Batch, Detected, detected, hand_over};

/// Instructions to the loop.
#[derive(Debug)]
pub enum Control {
    /// Serve exactly these policies from now on.
    Policies(BTreeMap<String, PolicyInput>),
    /// An approver approved this state of a host path (a FileChange's
    /// `after`); answers what became of it.
    Approve {
        key: String,
        after: Option<Box<kube_fim_crds::FileAttributes>>,
        done: oneshot::Sender<Answer>,
    },
}

/// What the loop did with an approval.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The approved state is the baseline now.
    Applied,
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
    pub policies: BTreeMap<String, PolicySnapshot>,
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
}

/// One policy's state on this node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySnapshot {
    pub generation: Option<i64>,
    pub files: usize,
    pub last_scan: Option<Timestamp>,
    pub baseline_time: Option<Timestamp>,
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

    fn sync(&mut self, dirs: Vec<PathBuf>, metrics: &AgentMetrics) {
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
                    metrics.watch_errors.inc();
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
        metrics.watches.set(self.watched.len() as i64);
    }
}

fn record(outcome: &Outcome, metrics: &AgentMetrics) {
    metrics.bytes_hashed.inc_by(outcome.bytes);
    metrics.scan_errors.inc_by(outcome.errors.len() as u64);
    for c in &outcome.changes {
        metrics
            .changes
            .with_label_values(&[c.policy.as_str(), c.category.as_str()])
            .inc();
    }
}

fn snapshot(
    engine: &Engine,
    digest: Option<String>,
    ready: bool,
    watch_limit: bool,
    attribution: &AttributionState,
) -> Snapshot {
    Snapshot {
        policies: engine
            .policies()
            .iter()
            .map(|(name, p)| {
                let rec = engine.baseline().policy(name);
                (
                    name.clone(),
                    PolicySnapshot {
                        generation: p.generation,
                        files: engine.files_of(name),
                        last_scan: rec.and_then(|r| r.last_scan_time),
                        baseline_time: rec.and_then(|r| r.baseline_time),
                    },
                )
            })
            .collect(),
        files_total: engine.files_total,
        baseline_digest: digest,
        errors: engine.last_errors.len(),
        ready,
        watch_limit,
        attribution: attribution.clone(),
        failed: engine.failed().clone(),
        entries: engine.entry_digests(),
        differing: None,
    }
}

/// Real-time sources follow the engine's directories: fanotify where it is on
/// and can, inotify for the rest.
fn sync_watches(
    engine: &Engine,
    attribution: &mut Attribution,
    inotify: &mut Inotify,
    metrics: &AgentMetrics,
) {
    let dirs = attribution.sync(engine.root_path(), engine.watch_dirs(), metrics);
    inotify.sync(dirs, metrics);
}

fn wants_attribution(engine: &Engine) -> bool {
    engine
        .policies()
        .values()
        .any(|p| p.spec.process_attribution)
}

/// Runs the loop until `shutdown` resolves or `control` closes. `pods` (in a
/// cluster) names the pods of process attribution.
#[allow(clippy::too_many_arguments)]
pub async fn monitor(
    mut engine: Engine,
    metrics: AgentMetrics,
    mut control: mpsc::Receiver<Control>,
    out: mpsc::Sender<Batch>,
    status: watch::Sender<Snapshot>,
    wait_for_policies: bool,
    pods: Option<PodIndex>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Engine {
    tokio::pin!(shutdown);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut inotify = Inotify::new(ev_tx);
    let (mut attribution, mut notices) = Attribution::new(engine.root_path(), pods);
    // A mount made over a monitored path changes what the host reads there.
    let (mounts_tx, mut mounts_rx) = mpsc::unbounded_channel::<()>();
    crate::mounts::follow(engine.mount_source(), move || mounts_tx.send(()).is_ok());
    attribution.want(wants_attribution(&engine), &metrics);
    let root = engine.root_path().to_path_buf();
    let mut pending: BTreeMap<PathBuf, Instant> = BTreeMap::new();
    let mut first = true;
    let mut next_scan = Instant::now();
    let mut digest;
    // In a cluster the served policies come from the API: no scan (which
    // would forget the baseline of unknown policies) before they are known.
    let mut have_policies = false;

    // The loop wakes at least this often, so /healthz can tell idle from stalled.
    const BEAT: Duration = Duration::from_secs(10);
    loop {
        metrics.progress.beat();
        let (debounce, interval) = engine.timing();
        let due = pending.values().min().copied();
        let may_start = have_policies || !wait_for_policies;
        let scan_now = if first {
            may_start
        } else {
            Instant::now() >= next_scan
        };
        if scan_now {
            let source = if first && engine.had_baseline() {
                DetectionSource::Startup
            } else {
                DetectionSource::Scan
            };
            let started = std::time::Instant::now();
            let mut outcome = tokio::task::block_in_place(|| engine.scan(source));
            metrics
                .scan_duration
                .observe(started.elapsed().as_secs_f64());
            for name in engine.policies().keys() {
                // Series start at 0, so increase() sees a policy's first change.
                for category in ["Added", "Modified", "Removed"] {
                    metrics
                        .changes
                        .with_label_values(&[name.as_str(), category]);
                }
                metrics
                    .files
                    .with_label_values(&[name])
                    .set(engine.files_of(name) as i64);
                metrics
                    .last_scan
                    .with_label_values(&[name])
                    .set(Timestamp::now().as_millisecond() as f64 / 1000.0);
            }
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
            record(&outcome, &metrics);
            if !hand_over(&out, detected(&mut outcome)).await {
                return engine;
            }
            engine.mark_reported(&outcome);
            let mut differing = None;
            if let Some(known) = engine.take_known_entries() {
                let (names, changes) = engine.differing_entries(&known);
                if !names.is_empty() {
                    warn!(entries = ?names, "entries differ from the baseline the cluster last saw");
                }
                let changes = changes
                    .into_iter()
                    .map(|spec| Detected { spec, epoch: 0 })
                    .collect();
                if !hand_over(&out, changes).await {
                    return engine;
                }
                differing = Some(names);
            }
            digest = save(&mut engine, &metrics);
            if let Err(error) = tokio::task::block_in_place(|| engine.compact_baseline()) {
                warn!(%error, "could not compact the baseline");
            }
            sync_watches(&engine, &mut attribution, &mut inotify, &metrics);
            first = false;
            next_scan = Instant::now() + interval;
            let mut snap = snapshot(
                &engine,
                digest.clone(),
                true,
                inotify.limit_reported,
                attribution.state(),
            );
            snap.differing = differing;
            let _ = status.send(snap);
            // Ready once the status holds the entry digests (computed from
            // every record after the first scan; kept up to date since).
            metrics
                .ready
                .store(true, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let wake = if first {
            due.unwrap_or(Instant::now() + BEAT)
        } else {
            due.unwrap_or(next_scan).min(next_scan)
        }
        .min(Instant::now() + BEAT);
        tokio::select! {
            () = &mut shutdown => {
                let _ = save(&mut engine, &metrics);
                return engine;
            }
            ev = ev_rx.recv() => {
                let Some(ev) = ev else { continue };
                match ev {
                    Ok(ev) => {
                        if ev.need_rescan() {
                            // The kernel's event queue overflowed: events were
                            // lost, so look at everything now.
                            warn!("real-time event queue overflowed; rescanning now");
                            metrics.watch_errors.inc();
                            next_scan = Instant::now();
                            continue;
                        }
                        if matches!(ev.kind, EventKind::Access(notify::event::AccessKind::Open(_))
                            | EventKind::Access(notify::event::AccessKind::Read)
                            | EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Read))
                            | EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Execute))
                            | EventKind::Access(notify::event::AccessKind::Any)) {
                            continue;
                        }
                        let deadline = Instant::now() + debounce;
                        for p in ev.paths {
                            if let Ok(rel) = p.strip_prefix(&root) {
                                pending.entry(rel.to_path_buf()).or_insert(deadline);
                            }
                        }
                    }
                    Err(error) => {
                        metrics.watch_errors.inc();
                        warn!(%error, "watch error; the next scan covers it");
                    }
                }
            }
            Some(()) = mounts_rx.recv() => {
                let paths = engine.mounts_changed();
                if !paths.is_empty() {
                    info!(paths = paths.len(), "host mounts changed over monitored paths");
                }
                let now = Instant::now();
                for p in paths {
                    pending.insert(p, now);
                }
            }
            notice = notices.recv() => {
                match notice {
                    Some(Notice::Changed { rel, writer, .. }) => {
                        pending.entry(rel.clone()).or_insert(Instant::now() + debounce);
                        attribution.note(rel, *writer);
                    }
                    Some(Notice::Overflow) => {
                        metrics.attribution_overflows.inc();
                        warn!("fanotify queue overflow: events lost, rescanning everything");
                        next_scan = Instant::now();
                    }
                    None => {}
                }
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let ready: BTreeSet<PathBuf> = pending.iter().filter(|(_, d)| **d <= now).map(|(p, _)| p.clone()).collect();
                if ready.is_empty() {
                    continue;
                }
                pending.retain(|p, _| !ready.contains(p));
                let (mut outcome, new_dirs) = tokio::task::block_in_place(|| engine.rescan(&ready, DetectionSource::Realtime));
                attribution.attach(&ready, &mut outcome.changes, &metrics);
                record(&outcome, &metrics);
                if !hand_over(&out, detected(&mut outcome)).await {
                    return engine;
                }
                engine.mark_reported(&outcome);
                if engine.baseline().is_dirty() {
                    digest = save(&mut engine, &metrics);
                    let _ = status.send(snapshot(&engine, digest.clone(), true, inotify.limit_reported, attribution.state()));
                }
                if new_dirs {
                    sync_watches(&engine, &mut attribution, &mut inotify, &metrics);
                }
            }
            msg = control.recv() => {
                match msg {
                    None => {
                        let _ = save(&mut engine, &metrics);
                        return engine;
                    }
                    Some(Control::Policies(p)) => {
                        have_policies = true;
                        if &p != engine.policies() {
                            info!(policies = ?p.keys().collect::<Vec<_>>(), "serving");
                            let before: Vec<String> = engine.policies().keys().cloned().collect();
                            if let Err(error) = engine.set_policies(p) {
                                warn!(%error, "policy not applied");
                            }
                            for name in before {
                                if !engine.policies().contains_key(&name) {
                                    let _ = metrics.files.remove_label_values(&[&name]);
                                    let _ = metrics.last_scan.remove_label_values(&[&name]);
                                }
                            }
                            attribution.want(wants_attribution(&engine), &metrics);
                            // New entries are baselined, removed ones forgotten, now.
                            next_scan = Instant::now();
                        }
                    }
                    Some(Control::Approve { key, after, done }) => {
                        let answer = match tokio::task::block_in_place(|| engine.approve(&key, after.as_deref())) {
                            Approved::Applied => Answer::Applied,
                            Approved::NotMonitored => Answer::NotMonitored,
                            Approved::Superseded(mut outcome) => {
                                record(&outcome, &metrics);
                                let reports = detected(&mut outcome);
                                let names = reports.iter().map(|d| crate::report::object::object_name(&d.spec, d.epoch)).collect();
                                if !hand_over(&out, reports).await {
                                    return engine;
                                }
                                engine.mark_reported(&outcome);
                                Answer::Superseded(names)
                            }
                        };
                        digest = save(&mut engine, &metrics);
                        let _ = done.send(answer);
                        let _ = status.send(snapshot(&engine, digest.clone(), true, inotify.limit_reported, attribution.state()));
                    }
                }
            }
        }
    }
}

fn save(engine: &mut Engine, metrics: &AgentMetrics) -> Option<String> {
    match tokio::task::block_in_place(|| engine.save()) {
        Ok(d) => Some(d),
        Err(error) => {
            metrics.scan_errors.inc();
            warn!(%error, "could not write the baseline");
            None
        }
    }
}
