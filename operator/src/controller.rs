//! The reconcilers: one per policy (status, events, retention) built on
//! `kube::runtime::Controller`, and the fleet loop that keeps the single agent
//! DaemonSet equal to the union of the valid policies and removes the records of
//! deleted nodes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_fim_crds::duration::parse_duration;
use kube_fim_crds::validate::validate_policy;
use kube_fim_crds::{
    FileChange, FileIntegrityNode, FileIntegrityPolicy, FileIntegrityPolicyStatus,
};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::daemonset::desired_daemonset;
use crate::metrics::Metrics;
use crate::retention;
use crate::status::{self, DEGRADED};

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "kube-fim-operator";

/// What can go wrong while reconciling.
#[derive(Debug, Error)]
pub enum Error {
    #[error("listing FileChanges of policy {policy}: {source}")]
    ListChanges { policy: String, source: kube::Error },
    #[error("writing status of policy {policy}: {source}")]
    WriteStatus { policy: String, source: kube::Error },
    #[error("serializing status: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::ListChanges { .. } => "list_changes",
            Error::WriteStatus { .. } => "write_status",
            Error::Serialize(_) => "serialize",
        }
    }
}

/// State shared by the reconcilers.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub nodes: Store<Node>,
    pub records: Store<FileIntegrityNode>,
    /// Wakes the fleet loop.
    pub fleet: Arc<Notify>,
    /// Policies the fleet loop saw last, to drop the metrics of deleted ones.
    pub known_policies: tokio::sync::Mutex<HashSet<String>>,
}

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
    config: Config,
    metrics: Metrics,
    identity: String,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let fleet = Arc::new(Notify::new());

    let (nodes, nodes_writer) = reflector::store::<Node>();
    let (records, records_writer) = reflector::store::<FileIntegrityNode>();
    let node_events = {
        let fleet = fleet.clone();
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(nodes_writer)
            .touched_objects()
            .map(move |_| fleet.notify_one())
    };
    let record_events = watcher(
        Api::<FileIntegrityNode>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(records_writer)
    .touched_objects()
    .map(|_| ());
    // Node and agent report changes refresh every policy's status; the
    // controller's debounce folds bursts (heartbeats) into one pass.
    let triggers = futures::stream::select(node_events, record_events);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: config.clone(),
        metrics,
        recorder,
        nodes: nodes.clone(),
        records: records.clone(),
        fleet: fleet.clone(),
        known_policies: tokio::sync::Mutex::default(),
    });

    let shutdown = shutdown.shared();
    let fleet_task = tokio::spawn(fleet_loop(ctx.clone(), shutdown.clone()));

    Controller::new(
        Api::<FileIntegrityPolicy>::all(client.clone()),
        watcher_config(&config),
    )
    .with_config(
        kube::runtime::controller::Config::default()
            .debounce(Duration::from_secs(1))
            .concurrency(4),
    )
    .reconcile_all_on(triggers)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((obj, _)) => debug!(policy = %obj.name, "reconciled"),
            Err(error) => debug!(%error, "reconcile stream"),
        }
    })
    .await;
    fleet_task.abort();
    info!("controller stopped");
}

async fn reconcile(policy: Arc<FileIntegrityPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
        .inc();
    ctx.fleet.notify_one();
    result
}

fn error_policy(policy: Arc<FileIntegrityPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(policy = %policy.name_any(), %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.kind()])
        .inc();
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_policy(policy: &FileIntegrityPolicy, ctx: &Context) -> Result<Action, Error> {
    let name = policy.name_any();
    let now = Timestamp::now();
    let invalid = validate_policy(policy).err().map(|e| e.to_string());

    // Retention, and the change counts the status shows.
    let changes: Api<FileChange> = Api::all(ctx.client.clone());
    let items = retention::list(&changes, &name)
        .await
        .map_err(|source| Error::ListChanges {
            policy: name.clone(),
            source,
        })?;
    let max_age = parse_duration(&policy.spec.retention.max_age).ok();
    let (doomed, kept) = match max_age {
        Some(max_age) => retention::select_for_deletion(
            items,
            max_age,
            policy.spec.retention.max_count as usize,
            now,
        ),
        None => (Vec::new(), items),
    };
    let mut requeue = ctx.config.resync;
    if !doomed.is_empty() {
        let pass = &doomed[..doomed.len().min(ctx.config.retention_max_per_pass)];
        let deleted = retention::delete(
            &changes,
            pass,
            ctx.config.retention_batch,
            ctx.config.retention_pause,
        )
        .await;
        ctx.metrics.retention_deleted.inc_by(deleted as u64);
        info!(policy = %name, deleted, pending = doomed.len() - pass.len(), "retention");
        if doomed.len() > pass.len() {
            requeue = Duration::from_secs(5);
        }
    }
    let counts = retention::counts(&kept, now);

    let nodes: Vec<Node> = ctx.nodes.state().iter().map(|n| (**n).clone()).collect();
    let records: Vec<FileIntegrityNode> =
        ctx.records.state().iter().map(|r| (**r).clone()).collect();
    let assessment = status::assess(
        policy,
        invalid.as_deref(),
        &nodes,
        &records,
        counts,
        now,
        ctx.config.heartbeat_timeout,
    );

    publish_events(policy, &assessment.status, invalid.as_deref(), ctx).await;
    ctx.metrics.observe_policy(&name, &assessment.status);

    if policy.status.as_ref() != Some(&assessment.status) {
        write_status(policy, &assessment.status, ctx).await?;
    }
    Ok(Action::requeue(requeue))
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
    new: &FileIntegrityPolicyStatus,
    invalid: Option<&str>,
    ctx: &Context,
) {
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

/// Keeps the agent DaemonSet and the per-node records in line with the policies
/// and Nodes. Woken by every policy or node event; also runs every 30 seconds.
async fn fleet_loop(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()>) {
    let (policies, writer) = reflector::store::<FileIntegrityPolicy>();
    // The fleet keeps its own policy cache, driven by its own task, so a pass
    // always sees every event that woke it (deletions included).
    let policy_events = watcher(
        Api::<FileIntegrityPolicy>::all(ctx.client.clone()),
        watcher_config(&ctx.config),
    )
    .default_backoff()
    .reflect(writer)
    .touched_objects();
    let wake = ctx.fleet.clone();
    let watch_task = tokio::spawn(policy_events.for_each(move |event| {
        if let Err(error) = event {
            warn!(%error, "policy watch");
        }
        wake.notify_one();
        std::future::ready(())
    }));
    tokio::pin!(shutdown);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = ctx.fleet.notified() => {},
            () = tokio::time::sleep(Duration::from_secs(30)) => {},
        }
        // Let a burst of events settle into one pass.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if policies.wait_until_ready().await.is_err() {
            break;
        }
        debug!(policies = policies.state().len(), "fleet pass");
        match sync_fleet(&ctx, &policies).await {
            Ok(()) => failures = 0,
            Err(error) => {
                failures += 1;
                let backoff = Duration::from_millis(500 * 2u64.pow(failures.min(6)));
                warn!(%error, ?backoff, "updating the agent DaemonSet failed");
                ctx.metrics
                    .reconcile_errors
                    .with_label_values(&["daemonset"])
                    .inc();
                tokio::time::sleep(backoff).await;
                ctx.fleet.notify_one();
            }
        }
    }
    watch_task.abort();
}

async fn sync_fleet(
    ctx: &Context,
    policies: &Store<FileIntegrityPolicy>,
) -> Result<(), kube::Error> {
    let all = policies.state();
    let names: HashSet<String> = all.iter().map(|p| p.name_any()).collect();
    {
        let mut known = ctx.known_policies.lock().await;
        for gone in known.difference(&names) {
            ctx.metrics.forget_policy(gone);
        }
        *known = names;
    }
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

    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    match desired_daemonset(&ctx.config, &valid) {
        Some(ds) => {
            api.patch(
                &ctx.config.daemonset_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&ds),
            )
            .await?;
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
            Err(e) => return Err(e),
        },
    }

    // Records of nodes that no longer exist. Only once both caches are filled:
    // an empty node cache at start must not look like a cluster without nodes.
    if ctx.nodes.wait_until_ready().await.is_ok() && ctx.records.wait_until_ready().await.is_ok() {
        let existing: HashSet<String> = ctx.nodes.state().iter().map(|n| n.name_any()).collect();
        let records: Api<FileIntegrityNode> = Api::all(ctx.client.clone());
        for record in ctx.records.state() {
            let name = record.name_any();
            if !existing.contains(&name) && record.metadata.deletion_timestamp.is_none() {
                match records.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => info!(node = %name, "node is gone: its FileIntegrityNode deleted"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}
