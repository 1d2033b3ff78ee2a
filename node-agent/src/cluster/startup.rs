//! Startup of the agent in a cluster: telemetry and its server, the engine on
//! the state directory, the delivery queue, this node's FileIntegrityNode,
//! and the check of the baseline on disk against the one the cluster knows.

use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use kube_fim_crds::labels::CLEAR_BASELINE_ALARM;
use kube_fim_crds::{BaselineAlarm, FileIntegrityNode};
use tokio::sync::{Mutex, Notify, watch};
use tracing::warn;

use super::node_status;
use super::run::RunConfig;
use crate::baseline::{BaselineError, Journal, StateDir};
use crate::context::Context;
use crate::engine::{Engine, EngineError};
use crate::report::deliver;
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
    client: Client,
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
    let (mut engine, alarm) =
        verify_baseline(engine, unreadable, &status, config, &telemetry).await?;
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
    let ctx = Context {
        committed: engine.committed_sequence(),
        node: config.node.clone(),
        client,
        telemetry,
        queue: Arc::new(Mutex::new(queue)),
        queued: Notify::new(),
        served,
    };
    Ok(Started {
        ctx: Arc::new(ctx),
        engine,
        alarm,
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

/// Is the baseline on disk the one the cluster knows (or one this agent
/// wrote after it, per the journal)? Anything else is an alarm, raised here;
/// returns the engine to go on with and the alarm that stands (found now, or
/// kept from before and not cleared).
async fn verify_baseline(
    mut engine: Engine,
    unreadable: Option<String>,
    node: &FileIntegrityNode,
    config: &RunConfig,
    telemetry: &Telemetry,
) -> anyhow::Result<(Engine, Option<BaselineAlarm>)> {
    let status = node.status.clone().unwrap_or_default();
    let cleared = node.annotations().get(CLEAR_BASELINE_ALARM).cloned();
    let mut alarm = status
        .baseline_alarm
        .clone()
        .filter(|a| cleared.as_deref() != Some(a.id.as_str()));
    if let Some(found) = check_baseline(
        engine.loaded_digest(),
        status.baseline_digest.as_deref(),
        unreadable.as_deref(),
        &engine.journal(),
        &config.node,
    ) {
        if found.reason == "BaselineTampered" {
            // A foreign baseline could hide anything: start from what is on
            // disk now and let the entry digests say what differs.
            drop(engine);
            StateDir::new(&config.state)
                .set_aside(&format!("foreign-{}", Timestamp::now().as_second()));
            engine = Engine::open_fresh(&config.root, &config.state, &config.node)
                .context("opening the host root")?;
            engine.set_progress(telemetry.progress());
        }
        engine.compare_first_scan_with(status.entries.clone());
        telemetry.baseline_alarm_raised(&found).await;
        alarm = Some(raise(alarm.take(), found));
    }
    telemetry.baseline_alarm_standing(alarm.is_some());
    Ok((engine, alarm))
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
