//! Startup of the agent in a cluster: telemetry and its server, the engine on
//! the state directory, the delivery queue, this node's FileIntegrityNode,
//! and the check of the baseline on disk against the one the cluster knows.

use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use kube_fim_crds::labels::CLEAR_BASELINE_ALARM;
use kube_fim_crds::{
    ApprovalOutcome, BaselineAlarm, FileChange, FileIntegrityNode, FileIntegrityNodeStatus,
    Fingerprint,
};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{info, warn};

use super::node_status;
use super::run::RunConfig;
use crate::baseline::{BaselineError, StateDir};
use crate::context::Context;
use crate::engine::{ApprovedMove, Engine, EngineError, Published};
use crate::hostfs::HostRoot;
use crate::report::deliver;
use crate::report::fingerprint::Fingerprints;
use crate::report::object::shorten_text;
use crate::report::queue::Queue;
use crate::served::ServedPolicies;
use crate::telemetry::Telemetry;

/// What startup hands to the tasks.
pub struct Started {
    pub ctx: Arc<Context>,
    /// The engine, for the monitoring loop.
    pub engine: Engine,
    /// The baseline alarm standing at start, if any.
    pub alarm: Option<BaselineAlarm>,
    /// Whether that alarm was found at this start.
    pub alarm_found: bool,
    /// The chain head the cluster held at start (`status.sequence`).
    pub published_sequence: u64,
}

/// Retries a call to the API server until it succeeds, backing off.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
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

/// Starts the agent's telemetry server, opens its state and builds its
/// context; `served` is what the policy watch will decide.
pub async fn start(
    (client, watches): (Client, Client),
    config: &RunConfig,
    served: watch::Receiver<ServedPolicies>,
) -> anyhow::Result<Started> {
    let telemetry = Telemetry::new(&config.node).context("metrics")?;
    {
        let t = telemetry.clone();
        let addr = config.metrics_addr;
        tokio::spawn(async move {
            if let Err(e) = t.serve(addr).await {
                tracing::error!(%addr, error = %e, "metrics server failed");
                std::process::exit(2);
            }
        });
    }
    let (engine, unreadable) = open_engine(config, &telemetry)?;
    let mut queue = Queue::open(&StateDir::new(&config.state).queue(), config.queue_capacity)
        .context("opening the delivery queue")?;
    telemetry.reports_queued(queue.len());

    let nodes: Api<Node> = Api::all(client.clone());
    let statuses: Api<FileIntegrityNode> = Api::all(client.clone());
    let node = retry("reading this node", || nodes.get(&config.node)).await;
    let status = retry("creating this node's FileIntegrityNode", || {
        node_status::ensure(&statuses, &node)
    })
    .await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: crate::report::series::CONTROLLER.into(),
            instance: Some(config.node.clone()),
        },
    );
    let telemetry = telemetry.with_events(recorder, status.object_ref(&()));
    let (mut engine, alarm, alarm_found) =
        verify_baseline(engine, unreadable, &status, &client, config, &telemetry).await?;
    if let Some(source) = config.mount_table.clone() {
        engine.set_mount_source(source);
    }
    // After the baseline is settled (a fresh one saved nothing).
    let resumed = crate::report::sequence::resumed(&mut queue, engine.baseline().saved_sequence());
    engine.resume_numbers(resumed);
    // A state directory wiped or rolled back: numbering goes on after what
    // the cluster already holds, so no name is given twice.
    let published_sequence = status.status.as_ref().and_then(|s| s.sequence).unwrap_or(0);
    engine.continue_after(published_sequence);
    let fingerprints = if config.fingerprints.contains(&Fingerprint::Sha256) {
        let root = HostRoot::open(&config.root).context("opening the host root for SHA-256")?;
        info!("changed files get a SHA-256 beside their BLAKE3 (a sink asks for it)");
        Some(Fingerprints::new(root))
    } else {
        None
    };
    let ctx = Context {
        committed: engine.committed_sequence(),
        node: config.node.clone(),
        client,
        watches,
        telemetry,
        queue: Arc::new(Mutex::new(queue)),
        queued: Notify::new(),
        served,
        fingerprints,
    };
    Ok(Started {
        ctx: Arc::new(ctx),
        engine,
        alarm,
        alarm_found,
        published_sequence,
    })
}

/// The engine on the state directory, and why the baseline found there
/// could not be read, if it could not.
fn open_engine(
    config: &RunConfig,
    telemetry: &Telemetry,
) -> anyhow::Result<(Engine, Option<String>)> {
    // The state directory is the agent's alone (file names and digests of
    // root-only directories are not for other users of the node).
    let state = StateDir::create(&config.state).context("creating the state directory")?;
    let (mut engine, unreadable) = match Engine::open(&config.root, &config.state, &config.node) {
        Ok(e) => (e, None),
        Err(EngineError::Baseline(error @ BaselineError::InUse { .. })) => {
            return Err(error).context("another agent serves this state directory");
        }
        Err(EngineError::Baseline(error)) => {
            // Kept for forensics, never silently replaced.
            let aside = state.set_aside(&format!("unreadable-{}", Timestamp::now().as_second()));
            warn!(%error, ?aside, "the baseline on this node cannot be read");
            let e = Engine::open_fresh(&config.root, &config.state, &config.node)
                .context("opening the host root")?;
            (e, Some(error.to_string()))
        }
        Err(error) => return Err(error).context("opening the host root and state"),
    };
    engine.set_progress(telemetry.progress());
    Ok((engine, unreadable))
}

/// Is there a baseline on disk where the cluster knows one, and can it be
/// read? If not, that is an alarm, raised here. Either way, after the first
/// scan the baseline's entry digests are compared with what the cluster holds
/// ([`published`]): the node's own state (its files, any journal) vouches for
/// nothing, since root on the node can rewrite all of it. Returns the engine
/// to go on with and the alarm that stands (found now, or kept from before
/// and not cleared), and whether it was found now.
async fn verify_baseline(
    mut engine: Engine,
    unreadable: Option<String>,
    node: &FileIntegrityNode,
    client: &Client,
    config: &RunConfig,
    telemetry: &Telemetry,
) -> anyhow::Result<(Engine, Option<BaselineAlarm>, bool)> {
    let status = node.status.clone().unwrap_or_default();
    let cleared = node.annotations().get(CLEAR_BASELINE_ALARM).cloned();
    let mut alarm = status
        .baseline_alarm
        .clone()
        .filter(|a| cleared.as_deref() != Some(a.id.as_str()));
    let found = check_baseline(
        engine.loaded_digest(),
        status.baseline_digest.as_deref(),
        unreadable.as_deref(),
        &config.node,
    );
    let found_now = found.is_some();
    if let Some(found) = found {
        telemetry.baseline_alarm_raised(&found).await;
        alarm = Some(raise(alarm.take(), found));
    }
    if !status.entries.is_empty() {
        engine.compare_first_scan_with(published(client, &config.node, &status).await);
    }
    telemetry.baseline_alarm_standing(alarm.is_some());
    Ok((engine, alarm, found_now))
}

/// What the cluster holds of this node's baseline: the entry digests and
/// policy generations it published, and the entry digest moves of the
/// approvals its agent answered `Applied` (only approved changes: admission
/// lets the agent answer nothing else, and an answer only once).
async fn published(client: &Client, node: &str, status: &FileIntegrityNodeStatus) -> Published {
    let changes: Api<FileChange> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.node={node}"));
    let list = retry("listing this node's FileChanges", || changes.list(&lp)).await;
    let moves = list
        .items
        .into_iter()
        .filter(|c| c.approval().is_some())
        .filter_map(|c| {
            let s = c.status?;
            (s.outcome == Some(ApprovalOutcome::Applied)).then(|| {
                s.entry_digests
                    .into_iter()
                    .map(move |digests| ApprovedMove {
                        path: c.spec.path.clone(),
                        digests,
                    })
            })
        })
        .flatten()
        .collect();
    Published {
        entries: status.entries.clone(),
        generations: status
            .policies
            .iter()
            .map(|p| (p.policy.clone(), p.observed_generation))
            .collect(),
        moves,
    }
}

/// A new baseline alarm on `node`.
pub(super) fn new_alarm(node: &str, reason: &str, message: String) -> BaselineAlarm {
    let now = Timestamp::now();
    BaselineAlarm {
        id: blake3::hash(format!("{node}{reason}{now}").as_bytes()).to_hex()[..16].to_string(),
        reason: reason.into(),
        since: Time(now),
        message,
    }
}

/// The alarm for entries whose digests moved with nothing the cluster holds
/// to explain it: the baseline on disk was modified outside the agent.
pub(super) fn tampered(node: &str, entries: &[String]) -> BaselineAlarm {
    new_alarm(
        node,
        "BaselineTampered",
        shorten_text(
            &format!(
                "the baseline on node {node} was modified outside the agent: entries whose digest differs from the one the node published, with no approval or policy change in the cluster to explain it: {}; their present state is reported as changes",
                entries.join(", ")
            ),
            4000,
        ),
    )
}

/// The alarm that stands once `found` is raised: a raised alarm stays the
/// one an admin clears (admission refuses removing or replacing it without
/// the clear annotation naming it), so what was found since is added to what
/// it says.
fn raise(standing: Option<BaselineAlarm>, found: BaselineAlarm) -> BaselineAlarm {
    match standing {
        Some(mut standing) => {
            standing.message = shorten_text(
                &format!(
                    "{}; then {}: {}",
                    standing.message, found.reason, found.message
                ),
                4000,
            );
            standing
        }
        None => found,
    }
}

/// Why the baseline found at start cannot be checked entry by entry: none
/// on disk where the cluster knows one, or one that cannot be read.
fn check_baseline(
    on_disk: Option<&str>,
    in_cluster: Option<&str>,
    unreadable: Option<&str>,
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
        (Some(_), None) => return None,
        (None, None) => (
            "BaselineMissing",
            format!(
                "the cluster knows a baseline for node {node} (digest {}) but none is on disk; a new one is built and compared entry by entry with what the cluster last saw",
                short(in_cluster)
            ),
        ),
    };
    Some(new_alarm(node, reason, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarm(id: &str, reason: &str, message: &str) -> BaselineAlarm {
        BaselineAlarm {
            id: id.into(),
            reason: reason.into(),
            since: Time(Timestamp::now()),
            message: message.into(),
        }
    }

    #[test]
    fn a_standing_alarm_is_kept_and_told_what_was_found_since() {
        let standing = alarm("a1", "BaselineMissing", "none on disk");
        let kept = raise(
            Some(standing.clone()),
            alarm("b2", "BaselineTampered", "edited"),
        );
        assert_eq!(kept.id, standing.id);
        assert_eq!(kept.reason, standing.reason);
        assert_eq!(kept.since, standing.since);
        assert_eq!(kept.message, "none on disk; then BaselineTampered: edited");
    }

    #[test]
    fn without_a_standing_alarm_the_found_one_is_raised() {
        let found = alarm("b2", "BaselineTampered", "edited");
        assert_eq!(raise(None, found.clone()), found);
    }

    #[test]
    fn a_long_history_stays_within_the_fields_size() {
        let standing = alarm("a1", "BaselineMissing", &"x".repeat(4000));
        let kept = raise(Some(standing), alarm("b2", "BaselineTampered", "edited"));
        assert!(kept.message.len() <= 4000, "{}", kept.message.len());
    }
}
