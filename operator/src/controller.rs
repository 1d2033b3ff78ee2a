//! The two reconcilers, both run by `kube::runtime`'s applier with one
//! [`Context`](crate::context::Context) and one error policy:
//! - per policy ([`reconcile`]): status and events;
//! - for the fleet ([`reconcile_fleet`]): the single agent DaemonSet equal to
//!   the union of the valid policies, and no record left of a deleted node.
//!
//! Four watches (policies, Nodes, agents' FileIntegrityNodes, FileChanges) fill
//! the caches and decide, per event, what is worth reconciling
//! ([`crate::triggers`]). Retention runs on a clock of its own
//! ([`crate::retention::run`]), and so does the verification of the nodes'
//! chains of transition numbers ([`crate::chain::run`]).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt, stream};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, applier};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_fim_crds::validate::validate_policy;
use kube_fim_crds::{
    ChangeFloodRecord, ChangeStormRecord, FileIntegrityNode, FileIntegrityPolicy,
    FileIntegrityPolicyStatus,
};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::changes::{self, ChangeView};
use crate::config::Config;
use crate::context::{Context, Error, FIELD_MANAGER, store_ready};
use crate::daemonset::desired_daemonset;
use crate::metrics::Metrics;
use crate::seen::{Change, Seen};
use crate::status::{self, DEGRADED};
use crate::triggers::{self, Wake};
use crate::{chain, evidence, fleet, flood, noderecord, retention, rollouts, storm};

/// The fleet is looked at again this often without any event.
const FLEET_RESYNC: Duration = Duration::from_secs(30);
/// A failed reconcile is retried after this long.
const RETRY: Duration = Duration::from_secs(5);

fn watcher_config(config: &Config) -> watcher::Config {
    let wc = watcher::Config::default();
    match &config.policy_selector {
        Some(selector) => wc.labels(selector),
        None => wc,
    }
}

/// Runs the operator until `shutdown` resolves.
pub async fn run(
    client: Client,
    requests: Client,
    config: Config,
    metrics: Metrics,
    identity: String,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (policies, policy_writer) = reflector::store::<FileIntegrityPolicy>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let (records, record_writer) = reflector::store::<FileIntegrityNode>();
    let recorder = Recorder::new(
        requests.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity),
        },
    );
    // Watches use `client`; every request of the loops, `requests` (which
    // times out).
    let ctx = Arc::new(
        Context::new(
            requests,
            config.clone(),
            metrics,
            recorder,
            policies.clone(),
            nodes,
            records,
        )
        .with_fingerprints(crate::export::fingerprints()),
    );

    let heartbeat_timeout = config.heartbeat_timeout;
    let storms = Arc::new(storm::Storms::default());
    let floods = Arc::new(noderecord::Pending::default());
    let watches = [
        tokio::spawn(watch(
            Api::<FileIntegrityPolicy>::all(client.clone()),
            watcher_config(&config),
            policy_writer,
            ctx.clone(),
            |policy| policy.managed_fields_mut().clear(),
            |policy, _| triggers::policy_view(policy),
            |change, name, _| triggers::policy_wake(change, name),
        )),
        tokio::spawn(watch(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            node_writer,
            ctx.clone(),
            // Only labels, taints and names are read: a Node's status (images,
            // conditions) is most of its size, times thousands of nodes.
            // The image the kubelet reports is kept for the fleet
            // comparison's pools ([`fleet`]).
            |node| {
                node.managed_fields_mut().clear();
                node.status = node
                    .status
                    .take()
                    .and_then(|s| s.node_info)
                    .map(|info| NodeStatus {
                        node_info: Some(info),
                        ..NodeStatus::default()
                    });
            },
            |node, _| triggers::node_view(node),
            |change, _, ctx| triggers::node_wake(change, &ctx.policies.state()),
        )),
        tokio::spawn(watch(
            Api::<FileIntegrityNode>::all(client.clone()),
            watcher::Config::default(),
            record_writer,
            ctx.clone(),
            |record| record.managed_fields_mut().clear(),
            move |record, _| triggers::record_view(record, Timestamp::now(), heartbeat_timeout),
            |change, _, _| triggers::record_wake(change),
        )),
        tokio::spawn(watch_changes(
            changes::api(client.clone()),
            ctx.clone(),
            storms.clone(),
            floods.clone(),
        )),
        tokio::spawn(record_alarms(ctx.clone(), storms, floods)),
        tokio::spawn(retention::run(ctx.clone())),
        tokio::spawn(chain::run(ctx.clone())),
        tokio::spawn(follow_fingerprints(ctx.clone())),
    ];

    let shutdown = shutdown.shared();
    let policy_queue = batches(config.batch_window, shutdown.clone()).flat_map({
        let ctx = ctx.clone();
        move |()| {
            let names = ctx
                .pending()
                .take_policies(|| ctx.policies.state().iter().map(|p| p.name_any()).collect());
            stream::iter(
                names
                    .into_iter()
                    .map(|name| Ok::<_, Infallible>(ObjectRef::new(&name))),
            )
        }
    });
    let policy_loop = applier(
        |policy, ctx| reconcile(policy, ctx).boxed(),
        error_policy,
        ctx.clone(),
        policies,
        policy_queue,
        controller::Config::default().concurrency(4),
    )
    .for_each(|result| async move {
        match result {
            Ok((obj, _)) => debug!(policy = %obj.name, "reconciled"),
            Err(error) => debug!(%error, "policy reconciler"),
        }
    });

    // The fleet reconciler's one object is the agent DaemonSet, named by the
    // configuration whether or not it exists yet: a cache holding just its key.
    let (fleet_key, mut fleet_writer) = reflector::store::<DaemonSet>();
    let mut key = DaemonSet::default();
    key.metadata.name = Some(config.daemonset_name.clone());
    key.metadata.namespace = Some(config.namespace.clone());
    let fleet_ref = ObjectRef::from_obj(&key);
    for event in [
        watcher::Event::Init,
        watcher::Event::InitApply(key),
        watcher::Event::InitDone,
    ] {
        fleet_writer.apply_watcher_event(&event);
    }
    let fleet_queue = batches(config.batch_window, shutdown).filter_map({
        let ctx = ctx.clone();
        move |()| {
            let due = ctx.pending().take_fleet();
            std::future::ready(due.then(|| Ok::<_, Infallible>(fleet_ref.clone())))
        }
    });
    let fleet_loop = applier(
        |_, ctx: Arc<Context>| async move { reconcile_fleet(&ctx).await }.boxed(),
        |_, error, ctx| requeue_after_error("fleet", error, &ctx),
        ctx.clone(),
        fleet_key,
        fleet_queue,
        controller::Config::default().concurrency(1),
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            debug!(%error, "fleet reconciler");
        }
    });

    futures::join!(policy_loop, fleet_loop);
    for task in watches {
        task.abort();
    }
    info!("controller stopped");
}

/// A sink asking for other fingerprints (or no longer) changes the agents'
/// arguments: the fleet looks again.
async fn follow_fingerprints(ctx: Arc<Context>) {
    let mut fingerprints = ctx.fingerprints.clone();
    while fingerprints.changed().await.is_ok() {
        ctx.pending().add(
            triggers::Wake {
                fleet: true,
                ..triggers::Wake::default()
            },
            Instant::now(),
        );
    }
}

/// Ticks once per batch window until `shutdown`.
fn batches(
    window: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl Stream<Item = ()> + Send {
    let mut interval = tokio::time::interval(window.max(Duration::from_millis(10)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stream::unfold(interval, |mut interval| async move {
        interval.tick().await;
        Some(((), interval))
    })
    .take_until(shutdown)
}

/// Watches `api` into the cache behind `writer`, keeping of each object what
/// `trim` leaves; each event is seen through `view`, and what changed is turned
/// into wake-ups by `wake`.
async fn watch<K, V>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    ctx: Arc<Context>,
    trim: fn(&mut K),
    view: impl Fn(&K, &Context) -> V + Send + 'static,
    wake: impl Fn(Change<V>, Option<String>, &Context) -> Wake + Send + 'static,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    V: Clone + PartialEq + Send + 'static,
{
    let mut seen = Seen::default();
    let events = watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let name = match &event {
                    watcher::Event::Apply(o) | watcher::Event::Delete(o) => Some(o.name_any()),
                    _ => None,
                };
                let change = seen.observe(&event, |obj| view(obj, &ctx));
                let woken = wake(change, name, &ctx);
                if woken != Wake::default() {
                    ctx.pending().add(woken, Instant::now());
                }
            }
            Err(error) => warn!(kind = %K::kind(&()), %error, "watch"),
        }
    }
}

/// FileChanges come and go (agents report them, approvals and retention):
/// their policy's counts follow within a batch window, not at the next resync.
/// Of each, only what the counts and retention need is kept ([`Changes`]).
///
/// New ones are also counted per node ([`flood`]): a node creating them far
/// faster than its policies allow is a `ChangeFlood`, to record
/// (`recorded`). Their detection times are kept per entry for
/// [`record_alarms`].
async fn watch_changes(
    api: Api<ChangeView>,
    ctx: Arc<Context>,
    storms: Arc<storm::Storms>,
    recorded: Arc<noderecord::Pending<ChangeFloodRecord>>,
) {
    let events = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(events);
    let floods = flood::Floods::default();
    let started = Instant::now();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                follow_detections(&storms, &event);
                let change = ctx.changes.observe(&event);
                if change == Change::Relisted {
                    // Retention, the chain and every status wait for this
                    // list: how long it took is the operator's start-up time.
                    info!(
                        changes = ctx.changes.count(),
                        seconds = started.elapsed().as_secs_f64(),
                        "listed every FileChange"
                    );
                }
                if let Change::Changed {
                    old: None,
                    new: Some(item),
                } = &change
                {
                    count_new_change(&floods, &recorded, item, &ctx);
                }
                let woken = triggers::change_wake(change, &ctx.policies.state());
                if woken != Wake::default() {
                    ctx.pending().add(woken, Instant::now());
                }
            }
            Err(error) => warn!(kind = "FileChange", %error, "watch"),
        }
    }
}

/// A storm's lane and detection time, of a FileChange that can be part of
/// one.
fn storm_lane(view: &ChangeView) -> Option<(storm::Lane, Timestamp)> {
    let spec = &view.spec;
    let detected = spec.detected_time.as_ref()?.0;
    if spec.category == "Summary" || spec.entry.is_empty() {
        return None;
    }
    let lane = storm::Lane {
        node: spec.node.clone(),
        policy: spec.policy.clone(),
        entry: spec.entry.clone(),
    };
    Some((lane, detected))
}

/// Keeps the detection times of the stored FileChanges per lane, as the
/// watch tells them ([`storm::Storms`]).
fn follow_detections(storms: &storm::Storms, event: &watcher::Event<ChangeView>) {
    match event {
        watcher::Event::Init => storms.relist_started(),
        watcher::Event::InitDone => storms.relist_done(),
        watcher::Event::InitApply(view) => {
            if let Some((lane, t)) = storm_lane(view) {
                storms.relisted(lane, &view.name_any(), t);
            }
        }
        watcher::Event::Apply(view) => {
            if let Some((lane, t)) = storm_lane(view) {
                storms.add(lane, &view.name_any(), t);
            }
        }
        watcher::Event::Delete(view) => {
            if let Some((lane, t)) = storm_lane(view) {
                storms.remove(&lane, &view.name_any(), t);
            }
        }
    }
}

/// How often the lanes that changed are judged, and storms and floods not
/// yet recorded tried again.
const ALARM_PASS: Duration = Duration::from_secs(1);

/// Judges the lanes whose changes moved ([`storm::Storms::due`]) against
/// their policies' caps, and records each storm and flood on its node's
/// FileIntegrityNode ([`noderecord`]). One is kept until its record is
/// written: a node without a record yet, or an API outage, only delays it;
/// an operator restarting finds a storm again in the FileChanges.
async fn record_alarms(
    ctx: Arc<Context>,
    storms: Arc<storm::Storms>,
    floods: Arc<noderecord::Pending<ChangeFloodRecord>>,
) {
    let pending_storms = noderecord::Pending::default();
    let mut tick = tokio::time::interval(ALARM_PASS);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for found in storms.due(|policy| {
            ctx.policies
                .get(&ObjectRef::new(policy))
                .map(|p| p.spec.max_changes_per_node_per_minute)
        }) {
            pending_storms.add(&found.lane.node, &[found.record()]);
        }
        for (node, found) in pending_storms.take() {
            if let Err(found) = record_node_storms(&ctx, &node, found).await {
                pending_storms.add(&node, &found);
            }
        }
        for (node, found) in floods.take() {
            if let Err(found) = record_node_floods(&ctx, &node, found).await {
                floods.add(&node, &found);
            }
        }
    }
}

/// Records `found` on `node`'s FileIntegrityNode ([`noderecord::record`]);
/// counts and logs the storms it recorded. Gives `found` back when it could
/// not.
pub(crate) async fn record_node_storms(
    ctx: &Context,
    node: &str,
    found: Vec<ChangeStormRecord>,
) -> Result<(), Vec<ChangeStormRecord>> {
    let Some(noderecord::Written { before, after }) = noderecord::record(ctx, node, found).await?
    else {
        return Ok(());
    };
    for new in after.iter().filter(|s| !before.contains(s)) {
        let extended = before
            .iter()
            .any(|s| (&s.policy, &s.entry, s.since.0) == (&new.policy, &new.entry, new.since.0));
        if !extended {
            ctx.metrics.change_storms.inc();
        }
        info!(%node, policy = %new.policy, entry = %new.entry, since = %new.since.0, last = %new.last.0, count = new.count, cap = new.cap, extended, "change storm");
    }
    Ok(())
}

/// Records `found` on `node`'s FileIntegrityNode ([`noderecord::record`]).
/// Gives `found` back when it could not.
pub(crate) async fn record_node_floods(
    ctx: &Context,
    node: &str,
    found: Vec<ChangeFloodRecord>,
) -> Result<(), Vec<ChangeFloodRecord>> {
    if let Some(noderecord::Written { after, .. }) = noderecord::record(ctx, node, found).await? {
        debug!(%node, floods = after.len(), "change flood recorded");
    }
    Ok(())
}

/// Counts a new FileChange against its node's allowance; says a flood once a
/// window (the Event is published beside the watch, never holding it up).
fn count_new_change(
    floods: &flood::Floods,
    recorded: &noderecord::Pending<ChangeFloodRecord>,
    item: &changes::Item,
    ctx: &Arc<Context>,
) {
    let now = Timestamp::now();
    let node = ctx.nodes.get(&ObjectRef::new(&item.node));
    let budget = match &node {
        Some(node) => flood::budget(node, ctx.policies.state().iter().map(|p| &**p)),
        None => flood::MIN_BUDGET,
    };
    floods.trim(now);
    let Some(found) = floods.observe(&item.node, item.created, now, budget) else {
        return;
    };
    ctx.metrics.change_floods.inc();
    warn!(node = %found.node, count = found.count, budget = found.budget, "change flood");
    // Recorded by [`record_alarms`], merged into the record as read then.
    recorded.add(&found.node, &[found.record(now)]);
    let Some(node) = node else {
        return;
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let event = Event {
            type_: EventType::Warning,
            reason: "ChangeFlood".into(),
            note: Some(truncate(format!(
                "node {} created {} FileChanges in the last minute, more than {} ({}× what its policies' maxChangesPerNodePerMinute allow per entry): its agent paces storms below that, so this is its token used outside the agent, an agent replaced, or a long outage's backlog. Every agent shares one API priority level: other nodes' reports wait behind these",
                found.node,
                found.count,
                found.budget,
                flood::FACTOR
            ))),
            action: "Count".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &node.object_ref(&())).await {
            warn!(node = %found.node, %error, "could not publish the ChangeFlood event");
        }
    });
}

pub(crate) async fn reconcile(
    policy: Arc<FileIntegrityPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let name = policy.name_any();
    let waiting_since = ctx.pending().started(&name);
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
        .inc();
    match (&result, waiting_since) {
        (Ok(_), since) => {
            if let Some(since) = since {
                ctx.metrics
                    .status_delay
                    .observe(since.elapsed().as_secs_f64());
            }
            ctx.metrics.status_refreshed(&name);
        }
        (Err(_), Some(since)) => ctx.pending().failed(&name, since),
        (Err(_), None) => {}
    }
    result
}

pub(crate) fn error_policy(
    policy: Arc<FileIntegrityPolicy>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    requeue_after_error(&policy.name_any(), error, &ctx)
}

/// The one error policy: log, count by kind, retry soon.
fn requeue_after_error(what: &str, error: &Error, ctx: &Context) -> Action {
    warn!(%what, %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.kind()])
        .inc();
    Action::requeue(RETRY)
}

async fn reconcile_policy(policy: &FileIntegrityPolicy, ctx: &Context) -> Result<Action, Error> {
    if let Some(action) = evidence::reconcile(policy, ctx).await? {
        return Ok(action);
    }
    let name = policy.name_any();
    let now = Timestamp::now();
    let invalid = validate_policy(policy).err().map(|e| e.to_string());

    // Caches still empty at start must not look like a cluster without nodes
    // or changes.
    store_ready(&ctx.nodes)
        .await
        .map_err(|_| Error::WatchStopped("Node"))?;
    store_ready(&ctx.records)
        .await
        .map_err(|_| Error::WatchStopped("FileIntegrityNode"))?;
    ctx.changes.wait_until_listed().await;
    let nodes = ctx.nodes.state();
    let records = ctx.records.state();
    let mut assessment = status::assess(
        policy,
        invalid.as_deref(),
        &nodes,
        &records,
        ctx.changes
            .counts(&name, now, policy.spec.package_verified_changes),
        now,
        ctx.config.heartbeat_timeout,
    );
    let found = ctx.changes.with_policy(&name, |items| {
        rollouts::find(
            items,
            now,
            rollouts::Settings {
                window: ctx.config.rollout_window,
                min_nodes: ctx.config.rollout_min_nodes as usize,
            },
        )
    });
    let compared = fleet::compare(
        policy,
        &nodes,
        &records,
        &fleet::Settings {
            pool_labels: ctx.config.fleet_pool_labels.clone(),
            min_agree: ctx.config.fleet_min_agree as usize,
        },
    );
    assessment.status.rollouts = found.listed;
    assessment.status.fleet_outliers = compared.listed;

    publish_events(policy, &assessment, invalid.as_deref(), ctx).await;
    publish_fleet_events(policy, &assessment.status, ctx).await;
    ctx.metrics.observe_policy(&name, &assessment.status);
    for (gauge, value) in [
        (&ctx.metrics.rollouts, found.total),
        (&ctx.metrics.rollout_outliers, found.outlier_nodes),
        (&ctx.metrics.fleet_outliers, compared.total),
    ] {
        gauge.with_label_values(&[name.as_str()]).set(value as i64);
    }
    ctx.metrics
        .observe_compliance(&name, &ctx.changes.compliance_counts(&name, &policy.spec));
    label_compliance(&name, &policy.spec, ctx).await;

    if policy.status.as_ref() != Some(&assessment.status) {
        write_status(policy, &assessment.status, ctx).await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Most FileChanges labelled per reconcile (each label is a watch event
/// that wakes the policy again: a backlog drains over a few passes).
const LABELS_PER_PASS: usize = 500;

/// Labels the policy's FileChanges with their entry's compliance references
/// (`compliance.kube-fim.io/<framework>=<control>`), so `kubectl get fc -l`
/// finds the evidence of a control. The operator's word, from the policy:
/// an agent may not set these labels (admission), so a node can neither
/// file its change under a control nor keep it out of one.
async fn label_compliance(
    policy: &str,
    spec: &kube_fim_crds::FileIntegrityPolicySpec,
    ctx: &Context,
) {
    let todo = ctx.changes.to_label(policy, spec, LABELS_PER_PASS);
    if todo.is_empty() {
        return;
    }
    let api = changes::api(ctx.client.clone());
    let failed = std::sync::atomic::AtomicUsize::new(0);
    futures::stream::iter(todo)
        .for_each_concurrent(8, |(name, labels)| {
            let api = &api;
            let failed = &failed;
            async move {
                let patch = serde_json::json!({"metadata": {"labels": labels}});
                match api
                    .patch(
                        &name,
                        &PatchParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..PatchParams::default()
                        },
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => {}
                    // Deleted meanwhile (retention, a user).
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(error) => {
                        if failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                            warn!(%policy, change = %name, %error, "could not label a FileChange with its compliance references");
                        }
                    }
                }
            }
        })
        .await;
}

async fn write_status(
    policy: &FileIntegrityPolicy,
    status: &FileIntegrityPolicyStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let name = policy.name_any();
    let api: Api<FileIntegrityPolicy> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": FileIntegrityPolicy::api_version(&()),
        "kind": FileIntegrityPolicy::kind(&()),
        "status": serde_json::to_value(status)?,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::WriteStatus {
        policy: name.clone(),
        source,
    })?;
    Ok(())
}

fn condition<'a>(
    status: Option<&'a FileIntegrityPolicyStatus>,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

/// Events an admin must know about: a new generation applied or refused, and
/// the policy becoming degraded (or recovering).
async fn publish_events(
    policy: &FileIntegrityPolicy,
    assessment: &status::Assessment,
    invalid: Option<&str>,
    ctx: &Context,
) {
    let new = &assessment.status;
    let old = policy.status.as_ref();
    let reference = policy.object_ref(&());
    let mut events = Vec::new();
    let new_generation = old.and_then(|s| s.observed_generation) != new.observed_generation;
    if new_generation {
        events.push(match invalid {
            Some(why) => Event {
                type_: EventType::Warning,
                reason: "InvalidPolicy".into(),
                note: Some(truncate(format!("policy refused, agents ignore it: {why}"))),
                action: "Validate".into(),
                secondary: None,
            },
            None => Event {
                type_: EventType::Normal,
                reason: "PolicyApplied".into(),
                note: Some(format!(
                    "generation {} served by the agents on {} selected nodes: {} entries",
                    new.observed_generation.unwrap_or_default(),
                    new.nodes_selected.unwrap_or_default(),
                    policy.spec.effective_paths().len()
                )),
                action: "Apply".into(),
                secondary: None,
            },
        });
    }
    // More nodes left the policy's selection than the stored status says: the
    // ones there are now, by name (the count is in the status and a metric).
    let left_before = old.and_then(|s| s.nodes_left).unwrap_or(0);
    if new.nodes_left.unwrap_or(0) > left_before {
        events.push(Event {
            type_: EventType::Warning,
            reason: status::NODE_LEFT.into(),
            note: Some(truncate(format!(
                "{} node(s) this policy monitored are no longer selected by it, while the policy is unchanged: {}. Their agents compare nothing for it. Select on node-restriction.kubernetes.io/ labels, which a node cannot set on itself",
                assessment.left_nodes.len(),
                assessment.left_nodes.join(", ")
            ))),
            action: "Assess".into(),
            secondary: None,
        });
    }
    let was = condition(old, DEGRADED).map(|c| (c.status.as_str(), c.reason.as_str()));
    if let Some(now) = condition(Some(new), DEGRADED)
        && now.reason != "InvalidPolicy"
        && was != Some((now.status.as_str(), now.reason.as_str()))
    {
        if now.status == "True" {
            events.push(Event {
                type_: EventType::Warning,
                reason: "Degraded".into(),
                note: Some(truncate(format!("{}: {}", now.reason, now.message))),
                action: "Assess".into(),
                secondary: None,
            });
        } else if was.is_some_and(|(s, _)| s == "True") {
            events.push(Event {
                type_: EventType::Normal,
                reason: "Recovered".into(),
                note: Some("no agent reports trouble any more".into()),
                action: "Assess".into(),
                secondary: None,
            });
        }
    }
    for event in events {
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(policy = %policy.name_any(), reason = %event.reason, %error, "could not publish event");
        }
    }
}

/// A Warning Event on the policy for each rollout with an outlier not named
/// before (`RolloutOutlier`), and on the Node for each node newly found
/// differing from its pool (`FleetDrift`).
async fn publish_fleet_events(
    policy: &FileIntegrityPolicy,
    new: &FileIntegrityPolicyStatus,
    ctx: &Context,
) {
    let old = policy.status.as_ref();
    let name = policy.name_any();
    let old_rollouts = old.map(|s| s.rollouts.as_slice()).unwrap_or_default();
    for (rollout, nodes) in rollouts::new_outliers(old_rollouts, &new.rollouts) {
        let event = Event {
            type_: EventType::Warning,
            reason: "RolloutOutlier".into(),
            note: Some(truncate(format!(
                "{} {} changed differently on {} than on the {} nodes of rollout {} (entry {}, {} → {}): review it before approving the rollout",
                rollout.category,
                visible(&rollout.path),
                nodes.join(", "),
                rollout.nodes,
                rollout.id,
                rollout.entry,
                rollout.before,
                rollout.after
            ))),
            action: "Compare".into(),
            secondary: None,
        };
        crate::context::publish(policy, ctx, event).await;
    }
    let old_outliers = old.map(|s| s.fleet_outliers.as_slice()).unwrap_or_default();
    for outlier in fleet::new_outliers(old_outliers, &new.fleet_outliers) {
        let Some(node) = ctx.nodes.get(&ObjectRef::new(&outlier.node)) else {
            continue;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "FleetDrift".into(),
            note: Some(truncate(format!(
                "entry {} of policy {} differs on node {} from {} of the {} nodes of its pool ({}) that agree",
                outlier.entry,
                name,
                outlier.node,
                outlier.majority,
                outlier.pool_nodes,
                outlier.pool
            ))),
            action: "Compare".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &node.object_ref(&())).await {
            warn!(node = %outlier.node, %error, "could not publish the FleetDrift event");
        }
    }
}

/// A name chosen on a node, with control characters written as `\xNN`, so an
/// Event cannot drive the terminal of whoever reads it.
fn visible(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                format!("\\x{:02x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn truncate(mut s: String) -> String {
    const MAX: usize = 1000;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Keeps the agent DaemonSet equal to the union of the valid policies, and
/// deletes the records of nodes that no longer exist.
pub async fn reconcile_fleet(ctx: &Context) -> Result<Action, Error> {
    let started = Instant::now();
    let result = sync_fleet(ctx).await;
    ctx.metrics
        .fleet_reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result.map(|()| Action::requeue(FLEET_RESYNC))
}

async fn sync_fleet(ctx: &Context) -> Result<(), Error> {
    // Records are only judged once every cache is filled: an empty node cache
    // at start must not look like a cluster without nodes.
    for (ready, kind) in [
        (store_ready(&ctx.policies).await, "FileIntegrityPolicy"),
        (store_ready(&ctx.nodes).await, "Node"),
        (store_ready(&ctx.records).await, "FileIntegrityNode"),
    ] {
        ready.map_err(|_| Error::WatchStopped(kind))?;
    }
    let all = ctx.policies.state();
    debug!(policies = all.len(), "fleet pass");
    let names: HashSet<String> = all.iter().map(|p| p.name_any()).collect();
    {
        let mut known = ctx.known_policies.lock().unwrap_or_else(|e| e.into_inner());
        for gone in known.difference(&names) {
            ctx.metrics.forget_policy(gone);
        }
        *known = names.clone();
    }
    ctx.pending().retain(|name| names.contains(name));
    let valid: Vec<&FileIntegrityPolicy> = all
        .iter()
        .map(|p| &**p)
        .filter(|p| p.metadata.deletion_timestamp.is_none() && validate_policy(p).is_ok())
        .collect();
    ctx.metrics
        .policies
        .with_label_values(&["valid"])
        .set(valid.len() as i64);
    ctx.metrics
        .policies
        .with_label_values(&["invalid"])
        .set((all.len() - valid.len()) as i64);

    // The agents' arguments say what the sinks ask of them: wait for the
    // sinks' list rather than roll the agents out twice at start.
    let fingerprints = {
        let mut rx = ctx.fingerprints.clone();
        let listed = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        listed
            .unwrap_or_else(|_| rx.borrow().clone())
            .unwrap_or_default()
    };
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    match desired_daemonset(&ctx.config, &valid, &fingerprints) {
        Some(ds) => {
            api.patch(
                &ctx.config.daemonset_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&ds),
            )
            .await
            .map_err(Error::DaemonSet)?;
            ctx.metrics
                .daemonset_applies
                .with_label_values(&["apply"])
                .inc();
        }
        None => match api
            .delete(&ctx.config.daemonset_name, &DeleteParams::background())
            .await
        {
            Ok(_) => {
                info!(daemonset = %ctx.config.daemonset_name, "no policy left: agent DaemonSet deleted");
                ctx.metrics
                    .daemonset_applies
                    .with_label_values(&["delete"])
                    .inc();
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::DaemonSet(e)),
        },
    }

    let existing: HashSet<String> = ctx.nodes.state().iter().map(|n| n.name_any()).collect();
    let records: Api<FileIntegrityNode> = Api::all(ctx.client.clone());
    for record in ctx.records.state() {
        let name = record.name_any();
        if !existing.contains(&name) && record.metadata.deletion_timestamp.is_none() {
            match records.delete(&name, &DeleteParams::background()).await {
                Ok(_) => info!(node = %name, "node is gone: its FileIntegrityNode deleted"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(source) => return Err(Error::DeleteRecord { node: name, source }),
            }
        }
    }
    Ok(())
}
