//! Evidence export: every FileChange delivered to every `FileChangeSink`.
//!
//! # Delivery semantics
//!
//! - **At least once, with a stable id.** A change counts as delivered when
//!   the receiver acknowledged the batch holding it (a 2xx answer; the file
//!   fsynced; the syslog connection flushed). Until then it is sent again,
//!   with the same event id (the FileChange's name, which the agent derives
//!   from the change itself), so a receiver deduplicates on it.
//! - **In order per node**, by (detection time, name) ([`progress`]), the
//!   order the node's agent created them in. Nodes are interleaved by time so
//!   one busy node does not hold back the others.
//! - **Resumable.** After each acknowledged batch the sink's status records,
//!   per node, the last change delivered; an operator (re)starting as leader
//!   resumes after it. A crash sends again, with the same ids, the batch in
//!   flight and what was acknowledged since the last status write (written
//!   at most every [`STATUS_EVERY`] while busy). Known limit:
//!   a change that reaches the API server after a later change of its node
//!   was delivered (the node's clock stepped back) is delivered next by a
//!   running operator, but one that arrives so while no operator leads, or
//!   is still undelivered when it restarts, counts as delivered: [`REPLAY`]
//!   is the setting that would trade duplicates for it, and is zero.
//! - **Retried, and visible.** A failed batch is retried with exponential
//!   backoff (1 s to 1 min); the sink turns `Degraded` with the error,
//!   `kube_fim_sink_failures_total` counts it and `kube_fim_sink_lag_seconds`
//!   grows.
//! - **Held by retention.** Retention does not delete a change a sink has not
//!   delivered ([`hold`]), for at most the sink's `holdMax`; past it, the
//!   change is deleted, counted in `kube_fim_sink_hold_expired_total` and named
//!   in a `SinkHoldExpired` Warning Event on the sink.
//!
//! - **Alarms too.** A node's standing alarms (its `FileIntegrityNode`'s
//!   baseline alarm, evidence gaps and unexplained digest moves) are records
//!   of its stream, keyed by (since, stable id), delivered once each like a
//!   change: durable conditions on the record, where Events expire. A cleared
//!   alarm is still delivered; after a restart the standing ones a sink's
//!   position has passed are sent once more (same ids): a position does not
//!   say which alarms before it were sent. Retention does not
//!   look at them.
//!
//! One task watches the sinks and runs one delivery task per sink; a watch
//! of the FileChanges (whole objects: the formats need all of them) and one
//! of the FileIntegrityNodes (their alarms), started when the first sink
//! appears, fill the index every delivery task reads. A cluster without sinks
//! costs the operator nothing more.

/// The formats (shared with `kubectl fim export`).
pub use kube_fim_formats as format;
pub mod metrics;
pub mod progress;
pub mod transport;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_fim_crds::duration::parse_duration;
use kube_fim_crds::{
    FileChange, FileChangeSink, FileChangeSinkStatus, FileIntegrityNode, Fingerprint,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use progress::{HoldDecision, Index, Observed, Progress, Record, decide_hold};
use transport::{Outgoing, SendError, Transport};

/// Field manager of the exporter's status writes.
pub const FIELD_MANAGER: &str = "kube-fim-operator-export";
/// After a restart, changes detected this long before a recorded position
/// are sent again (duplicates, same ids), in case one reached the API server
/// out of order. Zero: the agent creates a node's changes one at a time in
/// detection order, so only a node clock stepping back reorders them.
pub const REPLAY: Duration = Duration::ZERO;
/// Longest wait between two delivery attempts of a failing sink.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Status writes of a busy sink come at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What the sinks' delivery tasks and retention's hold share.
struct Shared {
    index: Mutex<Index>,
    /// Bumped on every change of the index: wakes idle delivery tasks.
    changed: watch::Sender<u64>,
    /// Per sink, its delivery state.
    sinks: Mutex<HashMap<String, Arc<SinkState>>>,
    sinks_listed: watch::Sender<bool>,
    /// The label selector of the sinks this operator delivers to.
    selector: std::sync::OnceLock<Option<String>>,
    /// Whether a sink was ever seen: the FileChange watch (whole objects, so
    /// memory) starts only then.
    any_sink: watch::Sender<bool>,
    /// The fingerprints the sinks ask the agents for (`spec.fingerprints`),
    /// `None` until the sinks are listed.
    fingerprints: watch::Sender<Option<Vec<Fingerprint>>>,
    /// Set by [`stop`]: delivery tasks record their position and end.
    stopping: watch::Sender<bool>,
    /// Delivery tasks that recorded their position after `stopping`.
    stopped: watch::Sender<usize>,
}

/// One sink's delivery state.
struct SinkState {
    progress: Mutex<Progress>,
    hold_max: Duration,
    fingerprints: Vec<Fingerprint>,
}

impl SinkState {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn sinks(&self) -> MutexGuard<'_, HashMap<String, Arc<SinkState>>> {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The exporter of this process. A process-wide value, because retention
/// (which runs on the controller's context) asks it with one call ([`hold`]).
static SHARED: LazyLock<Shared> = LazyLock::new(|| Shared {
    index: Mutex::default(),
    changed: watch::Sender::new(0),
    sinks: Mutex::default(),
    sinks_listed: watch::Sender::new(false),
    selector: std::sync::OnceLock::new(),
    any_sink: watch::Sender::new(false),
    fingerprints: watch::Sender::new(None),
    stopping: watch::Sender::new(false),
    stopped: watch::Sender::new(0),
});

/// Runs the exporter until the task is dropped: the FileChange watch, the
/// sink watch and one delivery task per sink. `namespace` is the operator's,
/// where the Secrets sinks name are read; `selector`, the operator's
/// `--policy-selector`, selects the sinks too (a canary operator delivers
/// to the sinks labelled for it).
pub async fn run(client: Client, namespace: String, selector: Option<String>) {
    let changes = tokio::spawn(watch_changes(client.clone()));
    let alarms = tokio::spawn(watch_alarms(client.clone()));
    let ctx = Arc::new(Ctx { client, namespace });
    watch_sinks(ctx, selector).await;
    changes.abort();
    alarms.abort();
}

/// Asks every delivery task to record the position it delivered up to and
/// end (an orderly stop or handover then re-sends nothing acknowledged);
/// waits for them at most `timeout`.
pub async fn stop(timeout: Duration) {
    let tasks = SHARED.sinks().len();
    SHARED.stopping.send_replace(true);
    let mut stopped = SHARED.stopped.subscribe();
    let _ = tokio::time::timeout(timeout, stopped.wait_for(|n| *n >= tasks)).await;
}

/// Waits until [`stop`] is called.
async fn stopping() {
    // The sender lives in a static: waiting cannot fail.
    let _ = SHARED.stopping.subscribe().wait_for(|s| *s).await;
}

/// What a delivery task needs of the cluster.
struct Ctx {
    client: Client,
    namespace: String,
}

async fn watch_changes(client: Client) {
    // The sender lives in a static: waiting cannot fail.
    let _ = SHARED.any_sink.subscribe().wait_for(|any| *any).await;
    let api: Api<FileChange> = Api::all(client);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|c| c.managed_fields_mut().clear())
        .boxed();
    follow(stream, |index, event| index.observe(event), "FileChange").await;
}

/// The alarms of the nodes' records (`FileIntegrityNode.status`) fill the
/// index next to the changes, in each node's order.
async fn watch_alarms(client: Client) {
    // The sender lives in a static: waiting cannot fail.
    let _ = SHARED.any_sink.subscribe().wait_for(|any| *any).await;
    let api: Api<FileIntegrityNode> = Api::all(client);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|n| n.managed_fields_mut().clear())
        .boxed();
    follow(
        stream,
        |index, event| index.observe_node(event),
        "FileIntegrityNode",
    )
    .await;
}

/// Feeds one watch into the index; a record the index did not have is late
/// for the sinks whose position of its node has passed it, and wakes them.
async fn follow<K, S>(
    mut stream: S,
    observe: impl Fn(&mut Index, watcher::Event<K>) -> Observed,
    kind: &str,
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    loop {
        match stream.try_next().await {
            Ok(Some(event)) => {
                let observed = observe(&mut SHARED.index(), event);
                match observed {
                    Observed::Nothing => continue,
                    Observed::New(node, keys) => {
                        for sink in SHARED.sinks().values() {
                            let mut progress = sink.progress();
                            for key in &keys {
                                progress.observe_new(&node, key);
                            }
                        }
                    }
                    Observed::Relisted => {}
                }
                SHARED.changed.send_modify(|n| *n = n.wrapping_add(1));
            }
            Ok(None) => return,
            Err(error) => warn!(%error, kind, "watch (retrying)"),
        }
    }
}

/// The delivery task of each sink, restarted when its spec changes.
async fn watch_sinks(ctx: Arc<Ctx>, selector: Option<String>) {
    let api: Api<FileChangeSink> = Api::all(ctx.client.clone());
    let _ = SHARED.selector.set(selector.clone());
    let config = match &selector {
        Some(s) => watcher::Config::default().labels(s),
        None => watcher::Config::default(),
    };
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut tasks: HashMap<String, (Option<i64>, JoinHandle<()>)> = HashMap::new();
    let mut relisted: Vec<String> = Vec::new();
    loop {
        let event = match stream.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(error) => {
                warn!(%error, "FileChangeSink watch (retrying)");
                if unreadable(&error) && tasks.is_empty() {
                    // Sinks this operator may not read (its RBAC predates
                    // them) or a cluster without the CRD: there is nothing
                    // it could deliver to, so nothing for retention to wait for.
                    SHARED.sinks_listed.send_replace(true);
                    publish_fingerprints(true);
                }
                continue;
            }
        };
        let apply = |sink: FileChangeSink,
                     tasks: &mut HashMap<_, (Option<i64>, JoinHandle<()>)>| {
            let name = sink.name_any();
            let generation = sink.metadata.generation;
            if let Some((g, task)) = tasks.get(&name) {
                if *g == generation && !task.is_finished() {
                    return name;
                }
                task.abort();
            }
            let state = Arc::new(SinkState {
                progress: Mutex::new(Progress::from_status(
                    &sink
                        .status
                        .as_ref()
                        .map(|s| s.positions.clone())
                        .unwrap_or_default(),
                    REPLAY,
                )),
                hold_max: parse_duration(&sink.spec.hold_max)
                    .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
                fingerprints: sink.spec.fingerprints.clone(),
            });
            // Keep what this process delivered when only the spec changed.
            let known = SHARED.sinks().get(&name).map(|old| old.progress().clone());
            match known {
                Some(known) if !known.positions.is_empty() => *state.progress() = known,
                _ => {
                    let index = SHARED.index();
                    state.progress().resend_alarms(&index);
                }
            }
            SHARED.sinks().insert(name.clone(), state.clone());
            SHARED.any_sink.send_replace(true);
            info!(sink = %name, transport = sink.spec.transport_name().unwrap_or("none"), format = sink.spec.format.as_str(), "delivering to sink");
            let task = tokio::spawn(deliver(ctx.clone(), sink, state));
            tasks.insert(name.clone(), (generation, task));
            name
        };
        match event {
            watcher::Event::Apply(sink) => {
                apply(sink, &mut tasks);
                publish_fingerprints(false);
            }
            watcher::Event::Delete(sink) => {
                let name = sink.name_any();
                if let Some((_, task)) = tasks.remove(&name) {
                    task.abort();
                }
                SHARED.sinks().remove(&name);
                metrics::forget(&name);
                publish_fingerprints(false);
                info!(sink = %name, "sink deleted");
            }
            watcher::Event::Init => relisted.clear(),
            watcher::Event::InitApply(sink) => relisted.push(apply(sink, &mut tasks)),
            watcher::Event::InitDone => {
                let gone: Vec<String> = tasks
                    .keys()
                    .filter(|n| !relisted.contains(n))
                    .cloned()
                    .collect();
                for name in gone {
                    if let Some((_, task)) = tasks.remove(&name) {
                        task.abort();
                    }
                    SHARED.sinks().remove(&name);
                    metrics::forget(&name);
                }
                SHARED.sinks_listed.send_replace(true);
                publish_fingerprints(true);
            }
        }
    }
    for (_, (_, task)) in tasks {
        task.abort();
    }
}

/// The fingerprints the sinks ask for, to the agents' DaemonSet: the union
/// over the sinks, once they were listed (`listed`: they just were).
fn publish_fingerprints(listed: bool) {
    if !listed && SHARED.fingerprints.borrow().is_none() {
        return;
    }
    let mut all: Vec<Fingerprint> = SHARED
        .sinks()
        .values()
        .flat_map(|s| s.fingerprints.iter().copied())
        .collect();
    all.sort();
    all.dedup();
    SHARED.fingerprints.send_if_modified(|now| {
        let changed = now.as_ref() != Some(&all);
        *now = Some(all);
        changed
    });
}

/// The fingerprints the sinks ask the agents for, `None` until the sinks
/// were listed (the fleet waits for it: a DaemonSet applied without them at
/// start would restart every agent twice).
pub fn fingerprints() -> watch::Receiver<Option<Vec<Fingerprint>>> {
    SHARED.fingerprints.subscribe()
}

/// Whether a watch error means the sinks cannot be read at all: forbidden,
/// or no such resource.
fn unreadable(error: &watcher::Error) -> bool {
    let code = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return false,
    };
    code == 403 || code == 404
}

/// What a sink's status says, kept between writes.
struct Report {
    delivered: i64,
    failures: i64,
    ready: Condition,
    degraded: Condition,
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.chars().take(1024).collect(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Replaces `old` unless only the time would change.
fn transition(old: &mut Condition, new: Condition) {
    if old.status == new.status && old.reason == new.reason && old.message == new.message {
        return;
    }
    let keep_time = old.status == new.status;
    let time = old.last_transition_time.clone();
    *old = new;
    if keep_time {
        old.last_transition_time = time;
    }
}

/// Delivers to one sink until aborted or [`stop`]ped.
async fn deliver(ctx: Arc<Ctx>, sink: FileChangeSink, state: Arc<SinkState>) {
    let name = sink.name_any();
    let generation = sink.metadata.generation;
    let api: Api<FileChangeSink> = Api::all(ctx.client.clone());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let status = sink.status.clone().unwrap_or_default();
    let find = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned();
    let mut report = Report {
        delivered: status.delivered.unwrap_or(0),
        failures: status.failures.unwrap_or(0),
        ready: find("Ready")
            .unwrap_or_else(|| condition("Ready", false, "Starting", "", generation)),
        degraded: find("Degraded")
            .unwrap_or_else(|| condition("Degraded", false, "Starting", "", generation)),
    };
    let m = metrics::metrics();
    let mut backoff = Duration::from_secs(1);
    let mut changed = SHARED.changed.subscribe();
    let mut last_write: Option<tokio::time::Instant> = None;
    let mut dirty = true;

    let mut transport = loop {
        match Transport::build(&sink.spec, &secrets).await {
            Ok(t) => break t,
            Err(error) => {
                warn!(sink = %name, %error, "sink not usable");
                failed(&mut report, &error, generation, &name);
                write_status(&api, &name, generation, &state, &mut report).await;
                if *SHARED.stopping.borrow() {
                    SHARED.stopped.send_modify(|n| *n += 1);
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopping() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    if report.ready.status != "True" {
        transition(
            &mut report.ready,
            condition(
                "Ready",
                true,
                "Configured",
                "the transport is configured; no delivery attempted yet",
                generation,
            ),
        );
        transition(
            &mut report.degraded,
            condition("Degraded", false, "Configured", "", generation),
        );
    }
    let batch_size = sink.spec.batch_size.max(1) as usize;
    loop {
        if *SHARED.stopping.borrow() {
            write_status(&api, &name, generation, &state, &mut report).await;
            SHARED.stopped.send_modify(|n| *n += 1);
            return;
        }
        let batch = {
            let index = SHARED.index();
            if index.listed() {
                state.progress().next_batch(&index, batch_size)
            } else {
                Vec::new()
            }
        };
        if batch.is_empty() {
            if dirty {
                // A sink's status is written at most once per STATUS_EVERY,
                // however many changes (deletions, approvals) wake it.
                let wait = last_write
                    .map(|t| STATUS_EVERY.saturating_sub(t.elapsed()))
                    .unwrap_or_default();
                if !wait.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopping() => {}
                    }
                    continue;
                }
                write_status(&api, &name, generation, &state, &mut report).await;
                last_write = Some(tokio::time::Instant::now());
            }
            // Woken by a change of the index (the index not listed yet, by
            // the timeout).
            dirty = tokio::select! {
                woken = tokio::time::timeout(Duration::from_secs(30), changed.changed()) => woken.is_ok(),
                _ = stopping() => true,
            };
            changed.borrow_and_update();
            continue;
        }
        // A package transaction is one record (one position) and as many
        // events as it lists changes, each with its own id.
        let outgoing: Vec<Outgoing> = batch
            .iter()
            .flat_map(|r| {
                let key = r.key();
                let node = r.node().to_string();
                let events = match r {
                    Record::Change(c) => format::encode_all(sink.spec.format, c),
                    Record::Approval(c) => vec![(
                        key.name.clone(),
                        format::encode_approval(sink.spec.format, c).unwrap_or_default(),
                    )],
                    Record::Alarm(a) => {
                        vec![(key.name.clone(), format::encode_alarm(sink.spec.format, a))]
                    }
                };
                events.into_iter().map(move |(id, line)| Outgoing {
                    node: node.clone(),
                    detected: key.detected,
                    line,
                    id,
                })
            })
            .collect();
        match transport.send(&outgoing).await {
            Ok(()) => {
                state.progress().ack(&batch);
                report.delivered += batch.len() as i64;
                if let Some(m) = m {
                    m.delivered
                        .with_label_values(&[name.as_str()])
                        .inc_by(batch.len() as u64);
                }
                debug!(sink = %name, events = batch.len(), "delivered");
                backoff = Duration::from_secs(1);
                transition(
                    &mut report.ready,
                    condition(
                        "Ready",
                        true,
                        "Delivering",
                        "the receiver acknowledges deliveries",
                        generation,
                    ),
                );
                transition(
                    &mut report.degraded,
                    condition("Degraded", false, "Delivering", "", generation),
                );
                dirty = true;
                if last_write.is_none_or(|t| t.elapsed() >= STATUS_EVERY) {
                    write_status(&api, &name, generation, &state, &mut report).await;
                    dirty = false;
                    last_write = Some(tokio::time::Instant::now());
                }
            }
            Err(error) => {
                warn!(sink = %name, %error, events = batch.len(), retry_in = ?backoff, "delivery failed");
                failed(&mut report, &error, generation, &name);
                write_status(&api, &name, generation, &state, &mut report).await;
                last_write = Some(tokio::time::Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopping() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn failed(report: &mut Report, error: &SendError, generation: Option<i64>, sink: &str) {
    report.failures += 1;
    if let Some(m) = metrics::metrics() {
        m.failures.with_label_values(&[sink, error.reason()]).inc();
    }
    let reason = match error {
        SendError::Config(_) => "InvalidConfiguration",
        _ => "DeliveryFailed",
    };
    let message = error.to_string();
    transition(
        &mut report.ready,
        condition("Ready", false, reason, &message, generation),
    );
    transition(
        &mut report.degraded,
        condition("Degraded", true, reason, &message, generation),
    );
}

/// Writes the sink's status (and the lag metrics) from its progress.
async fn write_status(
    api: &Api<FileChangeSink>,
    name: &str,
    generation: Option<i64>,
    state: &SinkState,
    report: &mut Report,
) {
    let (positions, backlog) = {
        let index = SHARED.index();
        let progress = state.progress();
        (progress.to_status(), progress.backlog(&index))
    };
    let lag = backlog
        .oldest
        .map(|t| Timestamp::now().duration_since(t).as_secs_f64().max(0.0))
        .unwrap_or(0.0);
    if let Some(m) = metrics::metrics() {
        m.lag.with_label_values(&[name]).set(lag);
        m.pending
            .with_label_values(&[name])
            .set(backlog.pending as i64);
    }
    let status = FileChangeSinkStatus {
        observed_generation: generation,
        conditions: vec![report.ready.clone(), report.degraded.clone()],
        positions,
        delivered: Some(report.delivered),
        failures: Some(report.failures),
        pending: Some(backlog.pending as i64),
        lag_seconds: Some(lag as i64),
        last_delivery_time: None,
    };
    let mut patch = json!({ "status": status });
    if report.delivered > 0 && report.ready.status == "True" {
        patch["status"]["lastDeliveryTime"] = json!(Time(Timestamp::now()));
    }
    if let Err(error) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        // The next write carries everything again; delivery goes on.
        warn!(sink = %name, %error, "writing the sink's status");
    }
}

/// Retention's question: of `doomed` (FileChange names retention would
/// delete), the ones it may delete now. A change some sink has not delivered
/// is kept, unless it was detected longer ago than that sink's `holdMax`:
/// then it goes, and the sink's `SinkHoldExpired` Warning Event and
/// `kube_fim_sink_hold_expired_total` say so. Until the exporter has listed
/// the sinks and the changes, everything is kept; so it is while a sink the
/// API server holds has not reached the exporter's watch yet (the changes
/// made after a new sink can reach retention's watch before the sink reaches
/// the exporter's: those changes are the new sink's to deliver).
pub async fn hold(client: &Client, doomed: Vec<String>) -> Vec<String> {
    if doomed.is_empty() {
        return doomed;
    }
    if !*SHARED.sinks_listed.borrow() {
        return Vec::new();
    }
    let mut params = ListParams::default();
    if let Some(Some(selector)) = SHARED.selector.get() {
        params = params.labels(selector);
    }
    let existing = match Api::<FileChangeSink>::all(client.clone())
        .list_metadata(&params)
        .await
    {
        Ok(list) => list.items,
        Err(error) => {
            warn!(%error, "listing the sinks before retention: nothing deleted this pass");
            return Vec::new();
        }
    };
    let sinks: Vec<(String, Arc<SinkState>)> = SHARED
        .sinks()
        .iter()
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    if let Some(new) = existing
        .iter()
        .map(|s| s.name_any())
        .find(|n| !sinks.iter().any(|(known, _)| known == n))
    {
        debug!(sink = %new, "a sink not watched yet: retention waits for it");
        return Vec::new();
    }
    if sinks.is_empty() {
        return doomed;
    }
    let index = SHARED.index();
    if !index.listed() {
        return Vec::new();
    }
    let progress: Vec<(String, Progress, Duration)> = sinks
        .iter()
        .map(|(n, s)| (n.clone(), s.progress().clone(), s.hold_max))
        .collect();
    let HoldDecision {
        allowed,
        held,
        expired,
    } = decide_hold(doomed, &index, &progress, Timestamp::now());
    drop(index);
    if let Some(m) = metrics::metrics() {
        for (sink, _) in &sinks {
            m.held
                .with_label_values(&[sink.as_str()])
                .set(held.get(sink).copied().unwrap_or(0));
        }
    }
    for (sink, names) in expired {
        if let Some(m) = metrics::metrics() {
            m.hold_expired
                .with_label_values(&[sink.as_str()])
                .inc_by(names.len() as u64);
        }
        warn!(%sink, count = names.len(), "retention deletes changes the sink has not delivered: past its holdMax");
        let client = client.clone();
        tokio::spawn(async move { alarm(client, sink, names).await });
    }
    allowed
}

/// The `SinkHoldExpired` Warning Event on a sink.
async fn alarm(client: Client, sink: String, names: Vec<String>) {
    let api: Api<FileChangeSink> = Api::all(client.clone());
    let Ok(object) = api.get(&sink).await else {
        return;
    };
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: None,
        },
    );
    let note = crate::retention::describe_deleted(
        &format!(
            "past holdMax {}, retention deleted undelivered",
            object.spec.hold_max
        ),
        &names,
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "SinkHoldExpired".into(),
        note: Some(note),
        action: "Retain".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &object.object_ref(&())).await {
        warn!(%sink, %error, "publishing SinkHoldExpired");
    }
}
