//! What the agent tells about itself: its Prometheus metrics and the
//! Kubernetes Events about its own state, one method per thing that happens
//! (`change_detected`, `report_delivered`, `baseline_alarm_raised`, ...).
//! The Prometheus handles are private: the rest of the agent says what
//! happened, this module decides which series move. Every series carries the
//! agent's `node` label; none carries a path (cardinality).
//!
//! The Events on the node's FileIntegrityNode go through here too; the Event
//! series of the changes themselves are part of the reporting protocol
//! ([`crate::report::series`]) and count only their failures here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType, Recorder};
use kube_fim_crds::labels::CLEAR_BASELINE_ALARM;
use kube_fim_crds::{BaselineAlarm, FileChangeSpec, ProcessInfo};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use tracing::{debug, warn};

/// When the monitoring loop (or a scan inside it) last made progress.
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<AtomicU64>);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Progress {
    /// Notes progress now.
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last progress (`None` before the first).
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
        }
    }
}

/// `/healthz` fails when the loop made no progress for this long (it wakes
/// every 10 s even when idle, and a scan notes progress file by file).
pub const STALLED: Duration = Duration::from_secs(90);

/// The Prometheus handles, registered once.
struct Metrics {
    registry: Registry,
    changes: IntCounterVec,
    files: IntGaugeVec,
    bytes_hashed: IntCounter,
    scan_duration: Histogram,
    last_scan: GaugeVec,
    scan_errors: IntCounter,
    watch_errors: IntCounter,
    watches: IntGauge,
    attribution_active: IntGauge,
    attribution_unavailable: IntGaugeVec,
    fanotify_dirs: IntGauge,
    fanotify_marks: IntGaugeVec,
    attribution_events: IntCounter,
    attribution_overflows: IntCounter,
    attributed_changes: IntCounterVec,
    package_checks: IntCounterVec,
    package_db_errors: IntCounterVec,
    reports_queued: IntGauge,
    delivered: IntCounter,
    api_errors: IntCounterVec,
    change_storms: IntCounterVec,
    reports_deferred: IntGaugeVec,
    deferred_delivered: IntCounterVec,
    names_squatted: IntCounter,
    baseline_tampered: IntGauge,
    queue_write_failing: IntGauge,
    containers_watched: IntGaugeVec,
    container_watches: IntGauge,
    drift_changes: IntCounterVec,
}

fn counter(name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    IntCounter::new(name, help)
}

fn gauge(name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    IntGauge::new(name, help)
}

fn counters(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauges(name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

impl Metrics {
    fn new(node: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(
            None,
            Some(HashMap::from([("node".to_string(), node.to_string())])),
        )?;
        let m = Metrics {
            changes: counters(
                "kube_fim_agent_changes_total",
                "Changes detected, by policy and category",
                &["policy", "category"],
            )?,
            files: gauges(
                "kube_fim_agent_files_monitored",
                "Files a policy monitors on this node",
                &["policy"],
            )?,
            bytes_hashed: counter(
                "kube_fim_agent_bytes_hashed_total",
                "Bytes read to hash files",
            )?,
            scan_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "kube_fim_agent_scan_duration_seconds",
                    "Duration of full scans",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                ]),
            )?,
            last_scan: GaugeVec::new(
                Opts::new(
                    "kube_fim_agent_last_scan_success_timestamp_seconds",
                    "When the last full scan of a policy completed (Unix time)",
                ),
                &["policy"],
            )?,
            scan_errors: counter(
                "kube_fim_agent_scan_errors_total",
                "Files that could not be read whole (reported as unreadable, looked at again)",
            )?,
            watch_errors: counter(
                "kube_fim_agent_watch_errors_total",
                "Real-time watches that could not be set (e.g. the inotify limit); scans go on",
            )?,
            watches: gauge(
                "kube_fim_agent_watched_directories",
                "Directories watched in real time",
            )?,
            attribution_active: gauge(
                "kube_fim_agent_attribution_active",
                "1 while the writers of changes are named (fanotify), 0 otherwise",
            )?,
            attribution_unavailable: gauges(
                "kube_fim_agent_attribution_unavailable",
                "1 when a policy asks for process attribution and the node cannot give it, by reason",
                &["reason"],
            )?,
            fanotify_dirs: gauge(
                "kube_fim_agent_fanotify_directories",
                "Monitored directories followed through fanotify marks (no inotify watch each)",
            )?,
            fanotify_marks: gauges(
                "kube_fim_agent_fanotify_marks",
                "fanotify marks the agent holds, by kind: inode (one per monitored directory, the kernel filters) or filesystem (a whole file system whose directories refused inode marks, the agent filters)",
                &["kind"],
            )?,
            attribution_events: counter(
                "kube_fim_agent_attribution_events_total",
                "fanotify events the kernel delivered to the agent (with inode marks, only those of monitored directories)",
            )?,
            attribution_overflows: counter(
                "kube_fim_agent_fanotify_overflows_total",
                "fanotify queue overflows (events lost; each triggers a full scan)",
            )?,
            attributed_changes: counters(
                "kube_fim_agent_attributed_changes_total",
                "Changes with a named writer, by policy, command and pod (namespace and pod empty for host processes)",
                &["policy", "command", "namespace", "pod"],
            )?,
            package_checks: counters(
                "kube_fim_agent_package_checks_total",
                "Changed package-owned files checked against the node's package database, by policy, manager and verdict (Verified, Mismatch)",
                &["policy", "manager", "verdict"],
            )?,
            package_db_errors: counters(
                "kube_fim_agent_package_database_errors_total",
                "Package databases that could not be read (verification off until the database changes), by manager",
                &["manager"],
            )?,
            reports_queued: gauge(
                "kube_fim_agent_reports_queued",
                "Changes recorded on the node and not yet stored by the API server",
            )?,
            delivered: counter(
                "kube_fim_agent_reports_delivered_total",
                "FileChange objects stored by the API server",
            )?,
            api_errors: counters(
                "kube_fim_agent_api_errors_total",
                "Failed API calls, by operation",
                &["operation"],
            )?,
            change_storms: counters(
                "kube_fim_agent_change_storms_total",
                "Minutes in which an entry of a policy had more changes than the policy's per-minute cap (the rest deferred and paced, none dropped)",
                &["policy"],
            )?,
            reports_deferred: gauges(
                "kube_fim_agent_reports_deferred",
                "Reports waiting on the node for their entry's per-minute cap (change storms)",
                &["policy"],
            )?,
            deferred_delivered: counters(
                "kube_fim_agent_reports_deferred_total",
                "FileChanges delivered after waiting for their entry's per-minute cap",
                &["policy"],
            )?,
            names_squatted: counter(
                "kube_fim_agent_names_squatted_total",
                "Change reports whose name the API server already held for a different object (reported again under another name)",
            )?,
            baseline_tampered: gauge(
                "kube_fim_agent_baseline_tampered",
                "1 when the baseline on the node does not match the digest stored in the cluster",
            )?,
            queue_write_failing: gauge(
                "kube_fim_agent_queue_write_failing",
                "1 while detected changes cannot be written to the node's delivery queue (e.g. a full disk); detection waits, nothing is dropped",
            )?,
            containers_watched: gauges(
                "kube_fim_agent_containers_watched",
                "Running containers watched for drift, by where they were found (source: cri, or pods when the CRI socket does not answer)",
                &["source"],
            )?,
            container_watches: gauge(
                "kube_fim_agent_container_watches",
                "inotify watches on the containers' writable layers",
            )?,
            drift_changes: counters(
                "kube_fim_agent_container_drift_changes_total",
                "Changes found in containers against their images, by the pod's namespace (past 200 namespaces: other), category, and whether the file is an executable",
                &["namespace", "category", "executable"],
            )?,
            registry,
        };
        for c in [
            Box::new(m.changes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.attribution_active.clone()),
            Box::new(m.attribution_unavailable.clone()),
            Box::new(m.fanotify_dirs.clone()),
            Box::new(m.fanotify_marks.clone()),
            Box::new(m.attribution_events.clone()),
            Box::new(m.attribution_overflows.clone()),
            Box::new(m.attributed_changes.clone()),
            Box::new(m.package_checks.clone()),
            Box::new(m.package_db_errors.clone()),
            Box::new(m.files.clone()),
            Box::new(m.bytes_hashed.clone()),
            Box::new(m.scan_duration.clone()),
            Box::new(m.last_scan.clone()),
            Box::new(m.scan_errors.clone()),
            Box::new(m.watch_errors.clone()),
            Box::new(m.watches.clone()),
            Box::new(m.queue_write_failing.clone()),
            Box::new(m.reports_queued.clone()),
            Box::new(m.delivered.clone()),
            Box::new(m.api_errors.clone()),
            Box::new(m.change_storms.clone()),
            Box::new(m.reports_deferred.clone()),
            Box::new(m.deferred_delivered.clone()),
            Box::new(m.names_squatted.clone()),
            Box::new(m.baseline_tampered.clone()),
            Box::new(m.containers_watched.clone()),
            Box::new(m.container_watches.clone()),
            Box::new(m.drift_changes.clone()),
        ] {
            m.registry.register(c)?;
        }
        Ok(m)
    }
}

/// Where the agent's Events go: its node's FileIntegrityNode (in a cluster).
#[derive(Clone)]
struct EventSink {
    recorder: Recorder,
    reference: ObjectReference,
}

/// Distinct writers (policy, command, namespace, pod) the agent counts in
/// `kube_fim_agent_attributed_changes_total`; past it a writer is counted
/// under `command="other"` with no pod. Pod churn and command names chosen by
/// whoever runs a process on the node cannot grow the series without bound.
pub const ATTRIBUTED_SERIES_MAX: usize = 200;
/// Namespaces counted in `kube_fim_agent_container_drift_changes_total`;
/// past it a namespace is counted as `other`: namespace churn cannot grow the
/// series without bound. No series carries a pod (pods come and go by the
/// thousand; the FileChanges name them).
pub const DRIFT_NAMESPACES_MAX: usize = 200;
/// A command name as a label: at most this many characters, controls dropped.
const COMMAND_LABEL_MAX: usize = 64;

/// The agent's telemetry. Cheap to clone: the clones share the same series.
#[derive(Clone)]
pub struct Telemetry {
    node: String,
    metrics: Arc<Metrics>,
    /// The writers counted so far, by their labels ([`ATTRIBUTED_SERIES_MAX`]).
    writers: Arc<std::sync::Mutex<std::collections::HashSet<[String; 4]>>>,
    /// The namespaces counted so far ([`DRIFT_NAMESPACES_MAX`]).
    drift_namespaces: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    ready: Arc<AtomicBool>,
    progress: Progress,
    events: Option<EventSink>,
}

impl Telemetry {
    /// The telemetry of the agent on `node`, without Events (standalone).
    pub fn new(node: &str) -> Result<Self, prometheus::Error> {
        Ok(Telemetry {
            node: node.to_string(),
            metrics: Arc::new(Metrics::new(node)?),
            writers: Arc::default(),
            drift_namespaces: Arc::default(),
            ready: Arc::new(AtomicBool::new(false)),
            progress: Progress::default(),
            events: None,
        })
    }

    /// The same telemetry, publishing Events on `reference` (the node's
    /// FileIntegrityNode) through `recorder`.
    pub fn with_events(mut self, recorder: Recorder, reference: ObjectReference) -> Self {
        self.events = Some(EventSink {
            recorder,
            reference,
        });
        self
    }

    /// The handle through which the engine notes its progress.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// The monitoring loop is alive (it wakes at least every 10 s).
    pub fn loop_alive(&self) {
        self.progress.beat();
    }

    /// The first scan is done and the status holds its entry digests.
    pub fn ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    async fn publish(&self, type_: EventType, reason: &str, note: String, action: &str) {
        let Some(sink) = &self.events else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = sink.recorder.publish(&event, &sink.reference).await {
            warn!(%error, reason, "could not publish an event");
        }
    }

    // --- detection ---

    /// A scan or rescan inspected files: `bytes` hashed, `errors` files
    /// skipped, `changes` found.
    pub fn changes_detected(&self, bytes: u64, errors: usize, changes: &[FileChangeSpec]) {
        let m = &self.metrics;
        m.bytes_hashed.inc_by(bytes);
        m.scan_errors.inc_by(errors as u64);
        for c in changes {
            m.changes
                .with_label_values(&[c.policy.as_str(), c.category.as_str()])
                .inc();
            if let Some(container) = &c.container {
                self.drift_counted(&container.namespace, c);
            }
        }
    }

    /// One drift change, by its pod's namespace (bounded) and whether it is
    /// of an executable (a new or changed binary outranks a data file).
    fn drift_counted(&self, namespace: &str, c: &FileChangeSpec) {
        let namespace = {
            let mut seen = self
                .drift_namespaces
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if seen.contains(namespace) || seen.len() < DRIFT_NAMESPACES_MAX {
                seen.insert(namespace.to_string());
                namespace
            } else {
                "other"
            }
        };
        let exec = |a: &Option<kube_fim_crds::FileAttributes>| {
            a.as_ref().is_some_and(|a| {
                a.file_type == Some(kube_fim_crds::FileType::File)
                    && a.mode
                        .as_deref()
                        .and_then(|m| u32::from_str_radix(m, 8).ok())
                        .is_some_and(|m| m & 0o111 != 0)
            })
        };
        let executable = if exec(&c.after) || exec(&c.before) {
            "true"
        } else {
            "false"
        };
        self.metrics
            .drift_changes
            .with_label_values(&[namespace, c.category.as_str(), executable])
            .inc();
    }

    /// A full scan took `took`; `policies` are the served ones with the
    /// files each monitors now.
    pub fn scan_finished<'a>(
        &self,
        took: Duration,
        policies: impl IntoIterator<Item = (&'a str, usize)>,
    ) {
        let m = &self.metrics;
        m.scan_duration.observe(took.as_secs_f64());
        let now = Timestamp::now().as_millisecond() as f64 / 1000.0;
        for (name, files) in policies {
            // Series start at 0, so increase() sees a policy's first change.
            for category in ["Added", "Modified", "Removed"] {
                m.changes.with_label_values(&[name, category]);
            }
            for manager in ["dpkg", "rpm"] {
                m.package_checks
                    .with_label_values(&[name, manager, "Mismatch"]);
            }
            m.files.with_label_values(&[name]).set(files as i64);
            m.last_scan.with_label_values(&[name]).set(now);
        }
    }

    /// The node no longer serves `policy`.
    pub fn policy_dropped(&self, policy: &str) {
        let _ = self.metrics.files.remove_label_values(&[policy]);
        let _ = self.metrics.last_scan.remove_label_values(&[policy]);
    }

    /// The baseline could not be written (counted as an inspection error).
    pub fn baseline_write_failed(&self) {
        self.metrics.scan_errors.inc();
    }

    /// The containers watched for drift (found over CRI or from the pods'
    /// status) and the inotify watches on their writable layers.
    pub fn container_drift(&self, cri: usize, pods: usize, watches: usize) {
        let m = &self.metrics;
        m.containers_watched
            .with_label_values(&["cri"])
            .set(i64::try_from(cri).unwrap_or(i64::MAX));
        m.containers_watched
            .with_label_values(&["pods"])
            .set(i64::try_from(pods).unwrap_or(i64::MAX));
        m.container_watches
            .set(i64::try_from(watches).unwrap_or(i64::MAX));
    }

    /// A real-time watch could not be set, or its events were lost.
    pub fn watch_failed(&self) {
        self.metrics.watch_errors.inc();
    }

    /// `count` directories are watched through inotify now.
    pub fn directories_watched(&self, count: usize) {
        self.metrics.watches.set(count as i64);
    }

    /// Process attribution turned on (`active`) or off, with the reason it
    /// is off when it was asked for (`unavailable`).
    pub fn attribution_changed(&self, active: bool, unavailable: Option<&str>) {
        let m = &self.metrics;
        m.attribution_active.set(i64::from(active));
        m.attribution_unavailable.reset();
        if let Some(reason) = unavailable {
            m.attribution_unavailable
                .with_label_values(&[reason])
                .set(1);
        }
        if !active {
            m.fanotify_dirs.set(0);
            m.fanotify_marks.reset();
        }
    }

    /// `count` directories are followed through fanotify now, through
    /// `inode` directory marks and `filesystem` whole file system marks.
    pub fn fanotify_directories(&self, count: usize, inode: usize, filesystem: usize) {
        let m = &self.metrics;
        m.fanotify_dirs.set(count as i64);
        m.fanotify_marks
            .with_label_values(&["inode"])
            .set(inode as i64);
        m.fanotify_marks
            .with_label_values(&["filesystem"])
            .set(filesystem as i64);
    }

    /// The agent read `count` fanotify events from the kernel.
    pub fn fanotify_events(&self, count: usize) {
        self.metrics.attribution_events.inc_by(count as u64);
    }

    /// fanotify lost events (its queue overflowed).
    pub fn fanotify_overflowed(&self) {
        self.metrics.attribution_overflows.inc();
    }

    /// A changed file of `policy` was checked against a package database.
    pub fn package_checked(&self, policy: &str, manager: &str, verdict: &str) {
        self.metrics
            .package_checks
            .with_label_values(&[policy, manager, verdict])
            .inc();
    }

    /// A package database could not be read: verification with it is off
    /// until it changes.
    pub fn package_database_failed(&self, manager: &str) {
        self.metrics
            .package_db_errors
            .with_label_values(&[manager])
            .inc();
    }

    /// A change of `policy` was put on its writer `p`.
    pub fn change_attributed(&self, policy: &str, p: &ProcessInfo) {
        let command: String = p
            .command
            .as_deref()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(COMMAND_LABEL_MAX)
            .collect();
        let (ns, pod) = p.pod.as_ref().map_or(("", ""), |r| {
            (
                r.namespace.as_deref().unwrap_or(""),
                r.name.as_deref().unwrap_or(""),
            )
        });
        let writer = [policy.to_string(), command, ns.to_string(), pod.to_string()];
        let labels = {
            let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
            if writers.contains(&writer) || writers.len() < ATTRIBUTED_SERIES_MAX {
                writers.insert(writer.clone());
                writer
            } else {
                [
                    policy.to_string(),
                    "other".into(),
                    String::new(),
                    String::new(),
                ]
            }
        };
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.metrics
            .attributed_changes
            .with_label_values(&labels)
            .inc();
    }

    /// The inotify watch limit was reached (told once per start).
    pub async fn watch_limit_reached(&self) {
        let node = &self.node;
        self.publish(EventType::Warning, "WatchLimitReached", format!(
            "the inotify watch limit was reached on node {node}: some directories are covered by periodic scans only (raise fs.inotify.max_user_watches)"
        ), "Scan").await;
    }

    /// The last scan could not inspect `count` files (told once per episode).
    pub async fn scan_errors_found(&self, count: usize) {
        let node = &self.node;
        self.publish(EventType::Warning, "ScanErrors", format!(
            "{count} monitored files on node {node} could not be read whole in the last scan; what could be read is compared, and they are reported as unreadable until read (see the agent log)"
        ), "Scan").await;
    }

    // --- reporting ---

    /// `count` reports wait in the node's delivery queue.
    pub fn reports_queued(&self, count: usize) {
        self.metrics.reports_queued.set(count as i64);
    }

    /// The reports of `entry` of `policy` exceed the policy's `cap` per
    /// minute: `waiting` of them are deferred and paced (told at most once a
    /// minute per entry; see [`crate::report::storm`]).
    pub async fn change_storm_started(&self, policy: &str, entry: &str, cap: u32, waiting: usize) {
        let node = &self.node;
        warn!(
            policy,
            entry, cap, waiting, "change storm: reports deferred and paced at the policy's cap"
        );
        self.publish(EventType::Warning, "ChangeStorm", format!(
            "change storm on node {node}: entry {entry} of policy {policy} has more changes than the policy's cap of {cap} a minute; {waiting} reports are deferred and delivered at that rate, each as a FileChange of its own (other entries' changes are not held back)"
        ), "Report").await;
    }

    /// A minute in which an entry of `policy` had reports deferred.
    pub fn change_storm_minute(&self, policy: &str) {
        self.metrics
            .change_storms
            .with_label_values(&[policy])
            .inc();
    }

    /// Reports waiting for their entry's cap now, by policy.
    pub fn reports_deferred<'a>(
        &self,
        by_policy: impl IntoIterator<Item = (&'a String, &'a usize)>,
    ) {
        for (policy, waiting) in by_policy {
            self.metrics
                .reports_deferred
                .with_label_values(&[policy.as_str()])
                .set(*waiting as i64);
        }
    }

    /// A report of `policy` that waited for its entry's cap was stored.
    pub fn deferred_report_delivered(&self, policy: &str) {
        self.metrics
            .deferred_delivered
            .with_label_values(&[policy])
            .inc();
    }

    /// A report could not be written to the delivery queue (a full disk).
    pub fn queue_write_failed(&self) {
        self.metrics.queue_write_failing.set(1);
    }

    /// A report was written to the delivery queue.
    pub fn queue_written(&self) {
        self.metrics.queue_write_failing.set(0);
    }

    /// The API server stored a FileChange.
    pub fn report_delivered(&self) {
        self.metrics.delivered.inc();
    }

    /// The API server refused a FileChange as invalid (it is sent shortened).
    pub fn report_refused(&self) {
        self.metrics
            .api_errors
            .with_label_values(&["rejected"])
            .inc();
    }

    /// A FileChange could not be created (the API server is unreachable or failing).
    pub fn report_failed(&self) {
        self.metrics.api_errors.with_label_values(&["create"]).inc();
    }

    /// The Event (or Event series) of a delivered change could not be written.
    pub fn change_event_failed(&self) {
        self.metrics.api_errors.with_label_values(&["event"]).inc();
    }

    /// The API server already held the name of a change report (`name`)
    /// for a different object: someone else created it first. The change is
    /// reported under `fresh` instead; the squatted object is evidence too.
    pub async fn name_squatted(&self, name: &str, fresh: &str, path: &str) {
        self.metrics.names_squatted.inc();
        let node = &self.node;
        self.publish(EventType::Warning, "NameSquatted", format!(
            "FileChange {name} exists but is not the change node {node} reported under that name (path {path}): it was created by someone else; the change is reported as {fresh}"
        ), "Report").await;
    }

    /// Delivery works again after `failures` failed attempts over `waited`
    /// seconds; `queued` reports wait.
    pub async fn delivery_resumed(&self, waited: u64, failures: u32, queued: usize) {
        let Some(sink) = &self.events else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "APIUnreachable".into(),
            note: Some(format!(
                "could not deliver changes for {waited}s ({failures} failed attempts); they were kept on the node and are being delivered ({queued} waiting)"
            )),
            action: "Deliver".into(),
            secondary: None,
        };
        // The API server was just unreachable: a lost Event is no news.
        if let Err(error) = sink.recorder.publish(&event, &sink.reference).await {
            debug!(%error, "event not published");
        }
    }

    // --- the baseline against the cluster ---

    /// Whether an alarm about the baseline stands (found at start, or kept
    /// from the node status).
    pub fn baseline_alarm_standing(&self, standing: bool) {
        self.metrics.baseline_tampered.set(i64::from(standing));
    }

    /// The baseline found at start is not the one the cluster knows.
    pub async fn baseline_alarm_raised(&self, alarm: &BaselineAlarm) {
        warn!(reason = alarm.reason, "{}", alarm.message);
        self.baseline_alarm_standing(true);
        let Some(sink) = &self.events else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: alarm.reason.clone(),
            note: Some(alarm.message.clone()),
            action: "VerifyBaseline".into(),
            secondary: None,
        };
        if let Err(error) = sink.recorder.publish(&event, &sink.reference).await {
            warn!(%error, "could not publish the baseline alarm");
        }
    }

    /// The first scan compared the entries with what the cluster last saw;
    /// `note` says which differ (cut to an Event's size by the caller).
    pub async fn baseline_entries_compared(&self, note: String) {
        self.publish(
            EventType::Warning,
            "BaselineEntriesDiffer",
            note,
            "VerifyBaseline",
        )
        .await;
    }

    /// An admin cleared the alarm (annotation [`CLEAR_BASELINE_ALARM`]).
    pub async fn baseline_alarm_cleared(&self, alarm: &BaselineAlarm) {
        tracing::info!(id = %alarm.id, annotation = CLEAR_BASELINE_ALARM, "baseline alarm cleared");
        self.publish(
            EventType::Normal,
            "BaselineAlarmCleared",
            format!(
                "the baseline alarm {} ({}) on node {} was cleared",
                alarm.id, alarm.reason, self.node
            ),
            "VerifyBaseline",
        )
        .await;
        self.baseline_alarm_standing(false);
    }

    // --- serving ---

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.metrics.registry.gather(), &mut buf) {
            warn!(%error, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Serves `/metrics`, `/healthz` (fails when the monitoring loop stalls)
    /// and `/readyz` (ready once the first baseline or startup scan is done).
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<()> {
        async fn metrics(
            State(t): State<Telemetry>,
        ) -> ([(&'static str, &'static str); 1], String) {
            ([("content-type", "text/plain; version=0.0.4")], t.render())
        }
        async fn readyz(State(t): State<Telemetry>) -> (StatusCode, &'static str) {
            if t.ready.load(Ordering::Relaxed) {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "building the baseline")
            }
        }
        async fn healthz(State(t): State<Telemetry>) -> (StatusCode, String) {
            match t.progress.age() {
                Some(age) if age > STALLED => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the monitoring loop made no progress for {}s",
                        age.as_secs()
                    ),
                ),
                _ => (StatusCode::OK, "ok".into()),
            }
        }
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube_fim_crds::PodRef;

    fn writer(command: &str, pod: &str) -> ProcessInfo {
        ProcessInfo {
            pid: 7,
            command: Some(command.into()),
            pod: Some(PodRef {
                namespace: Some("shop".into()),
                name: Some(pod.into()),
                uid: "u".into(),
                container: Some("c".into()),
            }),
            ..ProcessInfo::default()
        }
    }

    fn series(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with("kube_fim_agent_attributed_changes_total{"))
            .collect()
    }

    #[test]
    fn writers_are_counted_in_a_bounded_number_of_series() {
        let t = Telemetry::new("n").unwrap();
        // Pod churn: every change by another pod.
        for i in 0..ATTRIBUTED_SERIES_MAX + 50 {
            t.change_attributed("etc", &writer("sh", &format!("web-{i}")));
        }
        // A writer counted before the bound keeps its own series.
        t.change_attributed("etc", &writer("sh", "web-0"));
        let text = t.render();
        let lines = series(&text);
        assert_eq!(lines.len(), ATTRIBUTED_SERIES_MAX + 1, "{text}");
        let other = lines
            .iter()
            .find(|l| l.contains("command=\"other\""))
            .unwrap();
        assert!(other.ends_with(" 50"), "{other}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("pod=\"web-0\"") && l.ends_with(" 2")),
            "{text}"
        );
    }

    #[test]
    fn drift_is_counted_by_namespace_never_by_pod_and_bounded() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        use kube_fim_crds::{
            ChangeCategory, ContainerRef, DetectionSource, FileAttributes, FileType,
        };
        let t = Telemetry::new("n").unwrap();
        let drift = |ns: &str, pod: &str, mode: &str| FileChangeSpec {
            node: "n".into(),
            policy: "p".into(),
            sequence: None,
            package: None,
            restored: None,
            entry: "containers".into(),
            path: "/usr/bin/x".into(),
            category: ChangeCategory::Added,
            changed_attributes: Vec::new(),
            before: None,
            after: Some(FileAttributes {
                file_type: Some(FileType::File),
                mode: Some(mode.into()),
                ..FileAttributes::default()
            }),
            detected_time: MicroTime(Timestamp::now()),
            source: DetectionSource::Realtime,
            process: None,
            container: Some(ContainerRef {
                namespace: ns.into(),
                pod: pod.into(),
                ..ContainerRef::default()
            }),
            summary: None,
        };
        t.changes_detected(
            0,
            0,
            &[
                drift("shop", "web-1", "0755"),
                drift("shop", "web-2", "0755"),
                drift("shop", "web-2", "0644"),
            ],
        );
        // Namespace churn: every change in another namespace.
        for i in 0..DRIFT_NAMESPACES_MAX + 20 {
            t.changes_detected(0, 0, &[drift(&format!("ns-{i}"), "p", "0644")]);
        }
        let text = t.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kube_fim_agent_container_drift_changes_total{"))
            .collect();
        assert!(lines.iter().all(|l| !l.contains("pod=")), "{text}");
        assert!(
            lines.iter().any(|l| l.contains("namespace=\"shop\"")
                && l.contains("executable=\"true\"")
                && l.ends_with(" 2")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("namespace=\"other\"") && l.ends_with(" 21")),
            "{text}"
        );
        assert!(
            lines.len() <= DRIFT_NAMESPACES_MAX * 2 + 2,
            "{}",
            lines.len()
        );
    }

    #[test]
    fn a_command_name_is_a_short_label_without_controls() {
        let t = Telemetry::new("n").unwrap();
        let long = format!("evil\u{1b}[31m{}", "x".repeat(500));
        t.change_attributed("etc", &writer(&long, "p"));
        let text = t.render();
        let line = series(&text)[0];
        let command = line
            .split("command=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(!command.contains('\u{1b}'), "{command:?}");
        assert_eq!(command.chars().count(), COMMAND_LABEL_MAX, "{command:?}");
    }
}
