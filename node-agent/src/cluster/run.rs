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
use kube_fim_crds::{
    ApprovalOutcome, ChangeCategory, FileChange, FileIntegrityNode, FileIntegrityNodeStatus,
    FileIntegrityPolicy, NodePolicyPhase, NodePolicyStatus,
};
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};
use tracing::{info, warn};

use super::node_status;
use super::selection::served;
use crate::attribution::pods::PodIndex;
use crate::engine::{Engine, PolicyInput};
use crate::metrics::AgentMetrics;
use crate::report::deliver::{self, RateLimit};
use crate::report::queue::Queue;
use crate::report::{Batch, reporter};
use crate::watch::{Control, Snapshot, monitor};

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

/// Runs the agent until `shutdown`.
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = shutdown.shared();
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

    let engine = Engine::open(&config.root, &config.state, &node_name)
        .context("opening the host root and state")?;
    let queue = Arc::new(Mutex::new(
        Queue::open(&config.state.join("queue"), config.queue_capacity)
            .context("opening the delivery queue")?,
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
            controller: "kube-fim-agent".into(),
            instance: Some(node_name.clone()),
        },
    );

    // Was the baseline on disk edited while the agent was away?
    let stored = record
        .status
        .as_ref()
        .and_then(|s| s.baseline_digest.clone());
    let tampered = match (&engine.loaded_digest, &stored) {
        (Some(on_disk), Some(in_cluster)) if on_disk != in_cluster => {
            warn!(
                on_disk,
                in_cluster,
                "the baseline on this node does not match the digest the cluster stored: it was modified outside the agent"
            );
            metrics.cluster.baseline_tampered.set(1);
            let event = Event {
                type_: EventType::Warning,
                reason: "BaselineTampered".into(),
                note: Some(format!(
                    "the baseline on node {node_name} was modified outside the agent (digest {} instead of {}); changes made before this start may be hidden",
                    &on_disk[..16.min(on_disk.len())],
                    &in_cluster[..16.min(in_cluster.len())]
                )),
                action: "VerifyBaseline".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &record.object_ref(&())).await {
                warn!(%error, "could not publish the BaselineTampered event");
            }
            true
        }
        (None, Some(_)) => {
            warn!(
                "the cluster knows a baseline for this node but none is on disk: building a new one"
            );
            false
        }
        _ => false,
    };

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
        tokio::spawn(async move {
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
                    let _ = tx.send(gens);
                    if control.send(Control::Policies(now.clone())).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
            }
        });
        rx
    };

    // The pods of this node, to name the pod behind a change (process attribution).
    let pods = PodIndex::default();
    let pods_task = tokio::spawn(pods.clone().follow(client.clone(), node_name.clone()));
    let monitor_task = tokio::spawn(monitor(
        engine,
        metrics.clone(),
        control_rx,
        batch_tx,
        status_tx,
        true,
        Some(pods),
        shutdown.clone(),
    ));

    // Reporter: storm cap, then the durable queue.
    let reporter = tokio::spawn(reporter(
        batch_rx,
        queue.clone(),
        wake.clone(),
        policy_store.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let deliverer = tokio::spawn(deliver::run(
        Api::<FileChange>::all(client.clone()),
        recorder.clone(),
        record.object_ref(&()),
        queue.clone(),
        wake.clone(),
        metrics.cluster.clone(),
        RateLimit {
            qps: config.qps,
            burst: config.burst,
        },
        shutdown.clone(),
    ));

    // Approvals wait for the first policy decision (see acknowledgements).
    let first_policies = served_tx.clone();
    let heartbeat = tokio::spawn(heartbeat(
        recorder.clone(),
        record.object_ref(&()),
        records.clone(),
        node_name.clone(),
        status_rx,
        served_tx,
        queue.clone(),
        tampered,
        shutdown.clone(),
    ));

    let acks = tokio::spawn(acknowledgements(
        Api::<FileChange>::all(client.clone()),
        node_name.clone(),
        first_policies,
        control_tx.clone(),
        shutdown.clone(),
    ));

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

#[allow(clippy::too_many_arguments)]
async fn heartbeat(
    recorder: Recorder,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    records: Api<FileIntegrityNode>,
    node: String,
    mut status: watch::Receiver<Snapshot>,
    mut served: watch::Receiver<BTreeMap<String, i64>>,
    queue: Arc<Mutex<Queue>>,
    tampered: bool,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut digest: Option<String> = None;
    let mut said_limit = false;
    let mut said_errors = false;
    loop {
        let snap = status.borrow_and_update().clone();
        // The agent's own trouble, told once per episode.
        let mut trouble = Vec::new();
        if snap.watch_limit && !said_limit {
            said_limit = true;
            trouble.push(("WatchLimitReached", format!(
                "the inotify watch limit was reached on node {node}: some directories are covered by periodic scans only (raise fs.inotify.max_user_watches)"
            )));
        }
        if snap.errors > 0 && !said_errors {
            said_errors = true;
            trouble.push(("ScanErrors", format!(
                "{} monitored files on node {node} could not be inspected in the last scan; they are skipped (see the agent log)",
                snap.errors
            )));
        } else if snap.errors == 0 {
            said_errors = false;
        }
        for (reason, note) in trouble {
            let event = Event {
                type_: EventType::Warning,
                reason: reason.into(),
                note: Some(note),
                action: "Scan".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(%error, reason, "could not publish an event");
            }
        }
        if snap.baseline_digest.is_some() {
            digest = snap.baseline_digest.clone();
        }
        let wanted = served.borrow_and_update().clone();
        let policies: Vec<NodePolicyStatus> = wanted
            .iter()
            .map(|(name, generation)| {
                let p = snap.policies.get(name);
                let applied = p.is_some_and(|p| p.generation.unwrap_or(0) == *generation && p.last_scan.is_some());
                let phase = if tampered {
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
                    message: tampered.then(|| {
                        "the baseline on this node was modified outside the agent; investigate, then restart the agent".to_string()
                    }),
                }
            })
            .collect();
        let record = FileIntegrityNodeStatus {
            agent_version: Some(env!("CARGO_PKG_VERSION").into()),
            heartbeat_time: Some(Time(Timestamp::now())),
            policy_count: Some(policies.len() as i32),
            files_monitored: Some(snap.files_total as i64),
            queue_length: Some(queue.lock().await.len() as i64),
            baseline_digest: digest.clone(),
            policies,
            attribution: node_status::attribution(&snap.attribution),
        };
        if let Err(error) = node_status::write(&records, &node, &record).await {
            warn!(%error, "could not write this node's status");
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
/// present state as a new change, and says so on the approved one. Labels are
/// not looked at: anyone with patch rights can set a label.
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
                Ok(Ok(())) => (
                    ApprovalOutcome::Applied,
                    format!(
                        "approved by {}: the approved state of {path} is the baseline on {node}",
                        approval.approved_by
                    ),
                    true,
                ),
                Ok(Err(names)) => (
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
