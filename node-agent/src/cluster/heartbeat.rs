//! The heartbeat: writes this node's status (its FileIntegrityNode) from
//! what the monitoring loop last knew and what the node serves, every 30 s
//! and on every change; tells the agent's own trouble once per episode.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube_fim_crds::labels::CLEAR_BASELINE_ALARM;
use kube_fim_crds::{
    BaselineAlarm, EntryDigest, FileIntegrityNode, FileIntegrityNodeStatus, NodePolicyPhase,
    NodePolicyStatus,
};
use tokio::sync::watch;
use tracing::warn;

use super::{node_status, startup};
use crate::context::Context;
use crate::monitor::Snapshot;
use crate::report::object::shorten_text;
use crate::report::sequence::Undelivered;
use crate::served::ServedPolicies;

const HEARTBEAT: Duration = Duration::from_secs(30);

/// What the heartbeat starts from.
pub struct Settings {
    /// The baseline alarm standing at start.
    pub alarm: Option<BaselineAlarm>,
    /// Whether it was found at this start (else it is told only what differs).
    pub alarm_found: bool,
    /// The chain head the cluster held at start: never published lower.
    pub published_sequence: u64,
}

/// The heartbeat's state between two writes.
struct Heartbeat {
    ctx: Arc<Context>,
    api: Api<FileIntegrityNode>,
    alarm: Option<BaselineAlarm>,
    alarm_found: bool,
    /// The last baseline digest and entry digests the loop published.
    digest: Option<String>,
    entries: Vec<EntryDigest>,
    told_limit: bool,
    told_errors: bool,
    told_differing: bool,
    /// The saved transition counter, as it moves.
    committed: watch::Receiver<u64>,
    /// The published head never goes below this.
    floor: u64,
    undelivered: Undelivered,
}

/// Writes the node status until `shutdown`; `status` is what the loop knows.
pub async fn run(
    ctx: Arc<Context>,
    settings: Settings,
    mut status: watch::Receiver<Snapshot>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut served = ctx.served.clone();
    let committed = ctx.committed.clone();
    let mut beat = Heartbeat {
        committed,
        floor: settings.published_sequence,
        undelivered: Undelivered::default(),
        api: Api::all(ctx.client.clone()),
        ctx,
        alarm: settings.alarm,
        alarm_found: settings.alarm_found,
        digest: None,
        entries: Vec::new(),
        told_limit: false,
        told_errors: false,
        told_differing: false,
    };
    loop {
        let snap = status.borrow_and_update().clone();
        beat.tell_trouble(&snap).await;
        if snap.baseline_digest.is_some() {
            beat.digest = snap.baseline_digest.clone();
            beat.entries = snap.entries.clone();
        }
        let wanted = served.borrow_and_update().clone();
        if beat.write(&snap, &wanted).await {
            // The alarm was cleared: write again at once without it.
            continue;
        }
        tokio::select! {
            () = &mut shutdown => return,
            r = status.changed() => if r.is_err() { return },
            r = served.changed() => if r.is_err() { return },
            r = beat.committed.changed() => if r.is_err() { return },
            () = tokio::time::sleep(HEARTBEAT) => {},
        }
        // Coalesce bursts of snapshots.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Heartbeat {
    /// The agent's own trouble, told once per episode.
    async fn tell_trouble(&mut self, snap: &Snapshot) {
        let telemetry = &self.ctx.telemetry;
        if snap.watch_limit && !self.told_limit {
            self.told_limit = true;
            telemetry.watch_limit_reached().await;
        }
        if snap.errors > 0 && !self.told_errors {
            self.told_errors = true;
            telemetry.scan_errors_found(snap.errors).await;
        } else if snap.errors == 0 {
            self.told_errors = false;
        }
        let Some(names) = snap.differing.as_ref().filter(|_| !self.told_differing) else {
            return;
        };
        self.told_differing = true;
        let node = &self.ctx.node;
        match self.alarm.as_mut() {
            // Entries moved with nothing in the cluster to explain it.
            None if !names.is_empty() => {
                let found = startup::tampered(node, names);
                telemetry.baseline_alarm_raised(&found).await;
                self.alarm = Some(found);
            }
            None => {}
            Some(_) if names.is_empty() && !self.alarm_found => {}
            Some(a) => {
                let what = if names.is_empty() {
                    "no entry differs from what the cluster last saw".to_string()
                } else {
                    format!(
                        "entries that differ from what the cluster last saw: {}",
                        names.join(", ")
                    )
                };
                a.message = shorten_text(&format!("{}; {what}", a.message), 4000);
                let note = shorten_text(&format!("node {node}: {what}"), 1000);
                telemetry.baseline_entries_compared(note).await;
            }
        }
    }

    /// Writes the node status; `true` when an admin cleared the alarm.
    async fn write(&mut self, snap: &Snapshot, served: &ServedPolicies) -> bool {
        let mut policies: Vec<NodePolicyStatus> = served
            .generations()
            .map(|(name, generation)| self.policy_status(snap, name, generation))
            .collect();
        policies.extend(unselected(snap, served));
        // The head first, the queue second (see report::sequence).
        let head = (*self.committed.borrow_and_update()).max(self.floor);
        self.floor = head;
        let (queue_length, undelivered) = {
            let queue = self.ctx.queue.lock().await;
            (queue.len(), self.undelivered.ranges(&queue, head))
        };
        let status = FileIntegrityNodeStatus {
            agent_version: Some(env!("CARGO_PKG_VERSION").into()),
            heartbeat_time: Some(Time(Timestamp::now())),
            policy_count: Some(served.names().count() as i32),
            files_monitored: Some(snap.files_total as i64),
            queue_length: Some(queue_length as i64),
            baseline_digest: self.digest.clone(),
            policies,
            attribution: node_status::attribution(&snap.attribution),
            entries: self.entries.clone(),
            baseline_alarm: self.alarm.clone(),
            sequence: Some(head),
            undelivered: Some(undelivered.iter().map(ToString::to_string).collect()),
            verification: None,
            floods: Vec::new(),
            storms: Vec::new(),
        };
        let stored = match node_status::write(&self.api, &self.ctx.node, &status).await {
            Ok(stored) => stored,
            Err(error) => {
                warn!(%error, "could not write this node's status");
                return false;
            }
        };
        // An admin cleared the alarm: an act written on this object.
        let Some(alarm) = &self.alarm else {
            return false;
        };
        if stored.annotations().get(CLEAR_BASELINE_ALARM) != Some(&alarm.id) {
            return false;
        }
        self.ctx.telemetry.baseline_alarm_cleared(alarm).await;
        self.alarm = None;
        true
    }

    fn policy_status(&self, snap: &Snapshot, name: &str, generation: i64) -> NodePolicyStatus {
        let p = snap.policies.get(name);
        let applied =
            p.is_some_and(|p| p.generation.unwrap_or(0) == generation && p.last_scan.is_some());
        let broken = snap.failed.get(name);
        let phase = if self.alarm.is_some() || broken.is_some() {
            NodePolicyPhase::Failed
        } else if applied && snap.ready {
            NodePolicyPhase::Ready
        } else {
            NodePolicyPhase::Baselining
        };
        let node = &self.ctx.node;
        NodePolicyStatus {
            policy: name.to_string(),
            observed_generation: p.and_then(|p| p.generation),
            phase,
            files_monitored: p.map(|p| p.files as i64),
            last_scan_time: p.and_then(|p| p.last_scan).map(Time),
            baseline_time: p.and_then(|p| p.baseline_time).map(Time),
            errors: Some(snap.errors as i64),
            message: self
                .alarm
                .as_ref()
                .map(|a| {
                    format!(
                        "{}: {} (clear with: kubectl annotate fin {node} {CLEAR_BASELINE_ALARM}={})",
                        a.reason, a.message, a.id
                    )
                })
                .or_else(|| broken.map(|e| format!("cannot be served on this node: {e}")))
                .map(|m| shorten_text(&m, 1024)),
        }
    }
}

/// The policies whose baseline this node keeps without serving them: they
/// exist, and the node's labels no longer select them. Published, so the
/// operator sees a node leave monitoring (`NodeLeftMonitoring`) even when it
/// still runs an agent for other policies. A deleted policy is not listed.
fn unselected(snap: &Snapshot, served: &ServedPolicies) -> Vec<NodePolicyStatus> {
    snap.unserved
        .iter()
        .filter(|(name, _)| served.is_unselected(name))
        .map(|(name, generation)| NodePolicyStatus {
            policy: name.clone(),
            observed_generation: *generation,
            phase: NodePolicyPhase::Unselected,
            message: Some(
                "not served: this node's labels no longer match the policy's nodeSelector; its baseline is kept and compared again once selected".into(),
            ),
            ..NodePolicyStatus::default()
        })
        .collect()
}
