//! `kube-fim-agent run`: the agent of one node in a cluster.
//!
//! Tasks: the policy/Node watch decides what the node serves; the monitoring
//! loop detects changes; the reporter caps storms and queues each change on
//! disk; the deliverer stores them as FileChanges and Events; the heartbeat
//! writes the node's FileIntegrityNode; the acknowledgement watch answers
//! the approvals of the node's changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_fim_crds::labels::CLEAR_BASELINE_ALARM;
use kube_fim_crds::{
    ApprovalOutcome, BaselineAlarm, ChangeCategory, FileChange, FileIntegrityNode,
    FileIntegrityNodeStatus, FileIntegrityPolicy, NodePolicyPhase, NodePolicyStatus,
};
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};
use tracing::{info, warn};

use super::node_status;
use super::selection::served;
use crate::attribution::pods::PodIndex;
use crate::baseline::{BaselineError, Journal, StateDir};
use crate::engine::{Engine, EngineError, PolicyInput};
use crate::metrics::AgentMetrics;
use crate::report::deliver::{self, RateLimit};
use crate::report::queue::Queue;
use crate::report::series::ChangeEvents;
use crate::report::{Batch, reporter};
use crate::watch::{Answer, Control, Snapshot, monitor};

/// Settings of `kube-fim-agent run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub node: String,
    pub root: PathBuf,
    pub state: PathBuf,
    pub metrics_addr: SocketAddr,
    pub policy_selector: Option<String>,
    pub qps: f64,
    pub burst: u32,
    pub queue_capacity: usize,
    /// Where the host's mount table is read, if not from the host root's procfs.
    pub mount_table: Option<crate::mounts::MountSource>,
}

const HEARTBEAT: Duration = Duration::from_secs(30);

async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut failures = 0;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(error) => {
                failures += 1;
                let wait = deliver::backoff(failures);
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(%error, ?wait, "{what}: retrying");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Spawns one of the agent's long-running tasks. If it ends before shutdown
/// (it returned, or panicked), the process exits non-zero so the kubelet
/// restarts the agent: a half-alive agent that answers /healthz but watches
/// nothing is the worst outcome.
fn critical<T: Send + 'static>(
    name: &'static str,
    stopping: &Arc<AtomicBool>,
    task: impl std::future::Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<Option<T>> {
    let stopping = stopping.clone();
    tokio::spawn(async move {
        let result = std::panic::AssertUnwindSafe(task).catch_unwind().await;
        match result {
            Ok(v) if stopping.load(Ordering::SeqCst) => Some(v),
            Ok(_) => {
                tracing::error!(
                    task = name,
                    "a task of the agent ended; exiting to be restarted"
                );
                std::process::exit(70);
            }
            Err(_) => {
                tracing::error!(
                    task = name,
                    "a task of the agent panicked; exiting to be restarted"
                );
                std::process::exit(70);
            }
        }
    })
}

/// Why the baseline found at start is not the one the cluster knows, if it is not.
fn check_baseline(
    on_disk: Option<&str>,
    in_cluster: Option<&str>,
    unreadable: Option<&str>,
    journal: &Journal,
    node: &str,
) -> Option<BaselineAlarm> {
    let short = |d: &str| d.chars().take(16).collect::<String>();
    let in_cluster = in_cluster?;
    let (reason, message) = match (on_disk, unreadable) {
        (_, Some(error)) => (
            "BaselineUnreadable",
            format!(
                "the baseline on node {node} cannot be read ({error}); a new one is built and compared entry by entry with what the cluster last saw"
            ),
        ),
        (Some(d), None) if d == in_cluster || journal.vouches(in_cluster, d) => return None,
        (Some(d), None) => (
            "BaselineTampered",
            format!(
                "the baseline on node {node} was modified outside the agent (digest {} instead of {}); a new one is built and compared entry by entry with what the cluster last saw",
                short(d),
                short(in_cluster)
            ),
        ),
        (None, None) => (
            "BaselineMissing",
            format!(
                "the cluster knows a baseline for node {node} (digest {}) but none is on disk; a new one is built and compared entry by entry with what the cluster last saw",
                short(in_cluster)
            ),
        ),
    };
    let now = Timestamp::now();
    Some(BaselineAlarm {
        id: blake3::hash(format!("{node}{reason}{now}").as_bytes()).to_hex()[..16].to_string(),
        reason: reason.into(),
        since: Time(now),
        message,
    })
}

/// Runs the agent until `shutdown`.
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Set as soon as shutdown begins, before any task can see it: a task that
    // ends after that is stopping, not failing.
    let stopping = Arc::new(AtomicBool::new(false));
    let shutdown = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.store(true, Ordering::SeqCst);
        }
    }
    .shared();
    let node_name = config.node.clone();
    let metrics = AgentMetrics::new(&node_name).context("metrics")?;
    {
        let m = metrics.clone();
        let addr = config.metrics_addr;
        tokio::spawn(async move {
            if let Err(e) = m.serve(addr).await {
                tracing::error!(%addr, error = %e, "metrics server failed");
                std::process::exit(2);
            }
        });
    }

    // The state directory is the agent's alone (file names and digests of
    // root-only directories are not for other users of the node).
    let state = StateDir::create(&config.state).context("creating the state directory")?;
    let (mut engine, unreadable) = match Engine::open(&config.root, &config.state, &node_name) {
        Ok(e) => (e, None),
        Err(EngineError::Baseline(error @ BaselineError::InUse { .. })) => {
            return Err(error).context("another agent serves this state directory");
        }
        Err(EngineError::Baseline(error)) => {
            // Kept for forensics, never silently replaced.
            let aside = state.set_aside(&format!("unreadable-{}", Timestamp::now().as_second()));
            warn!(%error, ?aside, "the baseline on this node cannot be read");
            let e = Engine::open_fresh(&config.root, &config.state, &node_name)
                .context("opening the host root")?;
            (e, Some(error.to_string()))
        }
        Err(error) => return Err(error).context("opening the host root and state"),
    };
    engine.set_progress(metrics.progress.clone());
    let queue = Arc::new(Mutex::new(
        Queue::open(&state.queue(), config.queue_capacity).context("opening the delivery queue")?,
    ));
    metrics
        .cluster
        .reports_queued
        .set(queue.lock().await.len() as i64);

    let nodes: Api<Node> = Api::all(client.clone());
    let records: Api<FileIntegrityNode> = Api::all(client.clone());
    let node = retry("reading this node", || nodes.get(&node_name)).await;
    let record = retry("creating this node's FileIntegrityNode", || {
        node_status::ensure(&records, &node)
    })
    .await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: crate::report::series::CONTROLLER.into(),
            instance: Some(node_name.clone()),
        },
    );

    // Is the baseline on disk the one the cluster knows (or one this agent
    // wrote after it, per the journal)? Anything else is an alarm.
    let status = record.status.clone().unwrap_or_default();
    let cleared = record.annotations().get(CLEAR_BASELINE_ALARM).cloned();
    let mut alarm = status
        .baseline_alarm
        .clone()
        .filter(|a| cleared.as_deref() != Some(a.id.as_str()));
    if let Some(found) = check_baseline(
        engine.loaded_digest(),
        status.baseline_digest.as_deref(),
        unreadable.as_deref(),
        &engine.journal(),
        &node_name,
    ) {
        warn!(reason = found.reason, "{}", found.message);
        if found.reason == "BaselineTampered" {
            // A foreign baseline could hide anything: start from what is on
            // disk now and let the entry digests say what differs.
            drop(engine);
            state.set_aside(&format!("foreign-{}", Timestamp::now().as_second()));
            engine = Engine::open_fresh(&config.root, &config.state, &node_name)
                .context("opening the host root")?;
            engine.set_progress(metrics.progress.clone());
        }
        engine.compare_first_scan_with(status.entries.clone());
        let event = Event {
            type_: EventType::Warning,
            reason: found.reason.clone(),
            note: Some(found.message.clone()),
            action: "VerifyBaseline".into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &record.object_ref(&())).await {
            warn!(%error, "could not publish the baseline alarm");
        }
        alarm = Some(found);
    }
    metrics
        .cluster
        .baseline_tampered
        .set(i64::from(alarm.is_some()));

    let (control_tx, control_rx) = mpsc::channel::<Control>(16);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(16);
    let (status_tx, status_rx) = watch::channel(Snapshot::default());
    let wake = Arc::new(Notify::new());

    // What this node serves: every valid policy selecting it.
    let (policy_store, policy_writer) = reflector::store::<FileIntegrityPolicy>();
    let mut wc = watcher::Config::default();
    if let Some(sel) = &config.policy_selector {
        wc = wc.labels(sel);
    }
    let policy_events = watcher(Api::<FileIntegrityPolicy>::all(client.clone()), wc)
        .default_backoff()
        .reflect(policy_writer)
        .map(|_| ());
    let (node_store, node_writer) = reflector::store::<Node>();
    let node_events = watcher(
        nodes.clone(),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff()
    .reflect(node_writer)
    .map(|_| ());
    let served_tx = {
        let (tx, rx) = watch::channel(BTreeMap::<String, i64>::new());
        let control = control_tx.clone();
        let policies = policy_store.clone();
        let nodes_store = node_store.clone();
        let node_name = node_name.clone();
        critical("policy watch", &stopping, async move {
            // Every watch event, the initial listing's end included (so an empty
            // cluster is known to be empty).
            let mut events = std::pin::pin!(futures::stream::select(policy_events, node_events));
            let mut last: Option<BTreeMap<String, PolicyInput>> = None;
            while events.next().await.is_some() {
                // Both caches must hold a complete listing before deciding.
                if policies.wait_until_ready().now_or_never().is_none()
                    || nodes_store.wait_until_ready().now_or_never().is_none()
                {
                    continue;
                }
                let Some(node) =
                    nodes_store.get(&kube::runtime::reflector::ObjectRef::new(&node_name))
                else {
                    continue;
                };
                let state = policies.state();
                let now: BTreeMap<String, PolicyInput> = served(&node, state.iter().map(|p| &**p))
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            PolicyInput {
                                generation: v.generation,
                                spec: v.spec,
                            },
                        )
                    })
                    .collect();
                if last.as_ref() != Some(&now) {
                    let gens = now
                        .iter()
                        .map(|(k, v)| (k.clone(), v.generation.unwrap_or(0)))
                        .collect();
                    // The monitor first, then those who wait for it: an
                    // approval sent after this announcement queues behind
                    // the policies on the same channel, so the monitor never
                    // judges it before it knows what it serves.
                    if control.send(Control::Policies(now.clone())).await.is_err() {
                        return;
                    }
                    let _ = tx.send(gens);
                    last = Some(now);
                }
            }
        });
        rx
    };

    // The pods of this node, to name the pod behind a change (process attribution).
    let pods = PodIndex::default();
    let pods_task = tokio::spawn(pods.clone().follow(client.clone(), node_name.clone()));
    if let Some(source) = config.mount_table.clone() {
        engine.set_mount_source(source);
    }
    let engine_journal = engine.journal();
    let monitor_task = critical(
        "monitor",
        &stopping,
        monitor(
            engine,
            metrics.clone(),
            control_rx,
            batch_tx,
            status_tx,
            true,
            Some(pods),
            shutdown.clone(),
        ),
    );

    // Reporter: storm cap, then the durable queue.
    let reporter = critical(
        "reporter",
        &stopping,
        reporter(
            batch_rx,
            queue.clone(),
            wake.clone(),
            policy_store.clone(),
            metrics.clone(),
            shutdown.clone(),
        ),
    );

    let deliverer = critical(
        "deliverer",
        &stopping,
        deliver::run(
            Api::<FileChange>::all(client.clone()),
            recorder.clone(),
            ChangeEvents::new(
                client.clone(),
                node_name.clone(),
                policy_store.clone(),
                metrics.cluster.clone(),
            ),
            record.object_ref(&()),
            queue.clone(),
            wake.clone(),
            metrics.cluster.clone(),
            RateLimit {
                qps: config.qps,
                burst: config.burst,
            },
            shutdown.clone(),
        ),
    );

    // Approvals wait for the first policy decision (see acknowledgements).
    let first_policies = served_tx.clone();
    let heartbeat = critical(
        "heartbeat",
        &stopping,
        heartbeat(
            Beat {
                recorder: recorder.clone(),
                reference: record.object_ref(&()),
                records: records.clone(),
                node: node_name.clone(),
                queue: queue.clone(),
                journal: engine_journal,
                metrics: metrics.clone(),
            },
            status_rx,
            served_tx,
            alarm,
            shutdown.clone(),
        ),
    );

    let acks = critical(
        "acknowledgements",
        &stopping,
        acknowledgements(
            Api::<FileChange>::all(client.clone()),
            node_name.clone(),
            first_policies,
            control_tx.clone(),
            shutdown.clone(),
        ),
    );

    info!(node = %node_name, root = %config.root.display(), "agent running");
    shutdown.clone().await;
    info!("stopping");
    let _ = tokio::time::timeout(Duration::from_secs(10), monitor_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), reporter).await;
    deliverer.abort();
    pods_task.abort();
    heartbeat.abort();
    acks.abort();
    Ok(())
}

/// What the heartbeat writes with.
struct Beat {
    recorder: Recorder,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    records: Api<FileIntegrityNode>,
    node: String,
    queue: Arc<Mutex<Queue>>,
    journal: Journal,
    metrics: AgentMetrics,
}

impl Beat {
    async fn event(&self, type_: EventType, reason: &str, note: String, action: &str) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &self.reference).await {
            warn!(%error, reason, "could not publish an event");
        }
    }
}

fn shorten(text: &str, max: usize) -> String {
    crate::report::object::shorten_text(text, max)
}

async fn heartbeat(
    beat: Beat,
    mut status: watch::Receiver<Snapshot>,
    mut served: watch::Receiver<BTreeMap<String, i64>>,
    mut alarm: Option<BaselineAlarm>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let node = beat.node.clone();
    let mut digest: Option<String> = None;
    let mut entries = Vec::new();
    let mut said_limit = false;
    let mut said_errors = false;
    let mut said_differing = false;
    loop {
        let snap = status.borrow_and_update().clone();
        // The agent's own trouble, told once per episode.
        if snap.watch_limit && !said_limit {
            said_limit = true;
            beat.event(EventType::Warning, "WatchLimitReached", format!(
                "the inotify watch limit was reached on node {node}: some directories are covered by periodic scans only (raise fs.inotify.max_user_watches)"
            ), "Scan").await;
        }
        if snap.errors > 0 && !said_errors {
            said_errors = true;
            beat.event(EventType::Warning, "ScanErrors", format!(
                "{} monitored files on node {node} could not be inspected in the last scan; they are skipped (see the agent log)",
                snap.errors
            ), "Scan").await;
        } else if snap.errors == 0 {
            said_errors = false;
        }
        if let (Some(names), Some(a)) = (&snap.differing, alarm.as_mut())
            && !said_differing
        {
            said_differing = true;
            let what = if names.is_empty() {
                "no entry differs from what the cluster last saw".to_string()
            } else {
                format!(
                    "entries that differ from what the cluster last saw: {}",
                    names.join(", ")
                )
            };
            a.message = shorten(&format!("{}; {what}", a.message), 4000);
            beat.event(
                EventType::Warning,
                "BaselineEntriesDiffer",
                shorten(&format!("node {node}: {what}"), 1000),
                "VerifyBaseline",
            )
            .await;
        }
        if snap.baseline_digest.is_some() {
            digest = snap.baseline_digest.clone();
            entries = snap.entries.clone();
        }
        let wanted = served.borrow_and_update().clone();
        let policies: Vec<NodePolicyStatus> = wanted
            .iter()
            .map(|(name, generation)| {
                let p = snap.policies.get(name);
                let applied = p.is_some_and(|p| p.generation.unwrap_or(0) == *generation && p.last_scan.is_some());
                let broken = snap.failed.get(name);
                let phase = if alarm.is_some() || broken.is_some() {
                    NodePolicyPhase::Failed
                } else if applied && snap.ready {
                    NodePolicyPhase::Ready
                } else {
                    NodePolicyPhase::Baselining
                };
                NodePolicyStatus {
                    policy: name.clone(),
                    observed_generation: p.and_then(|p| p.generation),
                    phase,
                    files_monitored: p.map(|p| p.files as i64),
                    last_scan_time: p.and_then(|p| p.last_scan).map(Time),
                    baseline_time: p.and_then(|p| p.baseline_time).map(Time),
                    errors: Some(snap.errors as i64),
                    message: alarm
                        .as_ref()
                        .map(|a| {
                            format!(
                                "{}: {} (clear with: kubectl annotate fin {node} {CLEAR_BASELINE_ALARM}={})",
                                a.reason, a.message, a.id
                            )
                        })
                        .or_else(|| broken.map(|e| format!("cannot be served on this node: {e}")))
                        .map(|m| shorten(&m, 1024)),
                }
            })
            .collect();
        let record = FileIntegrityNodeStatus {
            agent_version: Some(env!("CARGO_PKG_VERSION").into()),
            heartbeat_time: Some(Time(Timestamp::now())),
            policy_count: Some(policies.len() as i32),
            files_monitored: Some(snap.files_total as i64),
            queue_length: Some(beat.queue.lock().await.len() as i64),
            baseline_digest: digest.clone(),
            policies,
            attribution: node_status::attribution(&snap.attribution),
            entries: entries.clone(),
            baseline_alarm: alarm.clone(),
        };
        match node_status::write(&beat.records, &node, &record).await {
            Ok(stored) => {
                if let Some(d) = &digest
                    && let Err(error) = beat.journal.published(d)
                {
                    warn!(%error, "could not trim the baseline journal");
                }
                // An admin cleared the alarm: a recorded act on this object.
                if let Some(a) = &alarm
                    && stored.annotations().get(CLEAR_BASELINE_ALARM) == Some(&a.id)
                {
                    info!(id = %a.id, "baseline alarm cleared");
                    beat.event(
                        EventType::Normal,
                        "BaselineAlarmCleared",
                        format!(
                            "the baseline alarm {} ({}) on node {node} was cleared",
                            a.id, a.reason
                        ),
                        "VerifyBaseline",
                    )
                    .await;
                    alarm = None;
                    beat.metrics.cluster.baseline_tampered.set(0);
                    continue;
                }
            }
            Err(error) => warn!(%error, "could not write this node's status"),
        }
        tokio::select! {
            () = &mut shutdown => return,
            r = status.changed() => if r.is_err() { return },
            r = served.changed() => if r.is_err() { return },
            () = tokio::time::sleep(HEARTBEAT) => {},
        }
        // Coalesce bursts of snapshots.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An approver records that a change was expected (`status.approval`, which
/// the admission policy lets only holders of the approve verb write, in their
/// own name). The agent makes the approved state (`spec.after`) its baseline
/// only if the file is still in it; otherwise it approves nothing, reports the
/// present state as a new change, and says so on the approved one. A path no
/// policy served to this node covers approves nothing either, and says so.
/// Labels are not looked at: anyone with patch rights can set a label.
async fn acknowledgements(
    api: Api<FileChange>,
    node: String,
    mut policies: watch::Receiver<BTreeMap<String, i64>>,
    control: mpsc::Sender<Control>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // Judged before the monitor knows what it serves, every approval would
    // look like a file nobody monitors.
    tokio::select! {
        () = &mut shutdown => return,
        r = policies.changed() => if r.is_err() { return },
    }
    let wc = watcher::Config::default().fields(&format!("spec.node={node}"));
    let mut stream = std::pin::pin!(watcher(api.clone(), wc).default_backoff().applied_objects());
    loop {
        let change = tokio::select! {
            () = &mut shutdown => return,
            c = stream.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let answered = change.status.as_ref().is_some_and(|s| s.outcome.is_some());
        let Some(approval) = change.approval().filter(|_| !answered) else {
            continue;
        };
        let path = &change.spec.path;
        let (outcome, message, applied) = if change.spec.category == ChangeCategory::Summary {
            (
                ApprovalOutcome::Superseded,
                format!(
                    "a Summary stands for many files and approves none of them on {node}: approve their own changes"
                ),
                false,
            )
        } else {
            let (tx, rx) = oneshot::channel();
            let request = Control::Approve {
                key: path.clone(),
                after: change.spec.after.clone().map(Box::new),
                done: tx,
            };
            if control.send(request).await.is_err() {
                return;
            }
            match rx.await {
                Ok(Answer::Applied) => (
                    ApprovalOutcome::Applied,
                    format!(
                        "approved by {}: the approved state of {path} is the baseline on {node}",
                        approval.approved_by
                    ),
                    true,
                ),
                Ok(Answer::NotMonitored) => (
                    ApprovalOutcome::NotMonitored,
                    format!(
                        "{path} is not monitored on {node} by any served policy: nothing was approved; the baseline is unchanged"
                    ),
                    false,
                ),
                Ok(Answer::Superseded(names)) => (
                    ApprovalOutcome::Superseded,
                    format!(
                        "{path} on {node} no longer is in the approved state (spec.after): nothing was approved; {}",
                        if names.is_empty() {
                            "its present state was reported already as a newer FileChange"
                                .to_string()
                        } else {
                            format!("its present state is reported as {}", names.join(", "))
                        }
                    ),
                    false,
                ),
                Err(_) => return,
            }
        };
        let mut status = serde_json::json!({"outcome": outcome, "message": message});
        if applied {
            status["baselineUpdatedTime"] = serde_json::json!(Time(Timestamp::now()));
        }
        if let Err(error) = api
            .patch_status(
                &change.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await
        {
            warn!(%error, "could not record the outcome of an approval");
        } else {
            info!(%path, ?outcome, approver = %approval.approved_by, "approval answered");
        }
    }
}
