//! The operator's Prometheus metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the operator exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// From the first change a policy's status depends on to the status that shows it.
    pub status_delay: Histogram,
    pub fleet_reconcile_duration: Histogram,
    pub policies: IntGaugeVec,
    pub retention_deleted: IntCounter,
    /// Nodes found creating FileChanges far faster than their policies allow.
    pub change_floods: IntCounter,
    pub change_storms: IntCounter,
    /// Per node, the transition numbers with no evidence in the cluster (from
    /// the stored verification, so it survives restarts).
    pub evidence_gaps: IntGaugeVec,
    /// Evidence gaps found.
    pub evidence_gaps_found: IntCounter,
    pub daemonset_applies: IntCounterVec,
    pub leader: IntGauge,
    /// Per policy, from its status (so the values survive restarts: they are
    /// recomputed from what the cluster stores).
    pub policy_nodes: IntGaugeVec,
    pub policy_files: IntGaugeVec,
    pub policy_unacknowledged: IntGaugeVec,
    pub policy_changes_24h: IntGaugeVec,
    pub policy_condition: IntGaugeVec,
    /// Per policy, rollouts found and nodes that are an outlier of one.
    pub rollouts: IntGaugeVec,
    pub rollout_outliers: IntGaugeVec,
    /// Per policy, nodes and entries whose digest differs from their pool's majority.
    pub fleet_outliers: IntGaugeVec,
    /// Per policy and compliance reference (`framework`, `control`: bounded
    /// by the policies' own lists, at most 8 per policy and per entry), the
    /// changes that are evidence for it, and those waiting for an approval.
    /// Counted from the cluster and the policy, never from labels.
    pub compliance_changes: IntGaugeVec,
    pub compliance_unacknowledged: IntGaugeVec,
    /// The references each policy's series were last set for.
    compliance_series: Arc<Mutex<HashMap<String, Vec<FrameworkControl>>>>,
    policy_status_age: prometheus::GaugeVec,
    /// When each policy's status was last computed (the age is set at scrape time).
    refreshed: Arc<Mutex<HashMap<String, Instant>>>,
}

/// A compliance series' `framework` and `control` labels.
type FrameworkControl = (String, String);

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("kube_fim_operator".into()), None)?;
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Policy reconciliations, by result"),
            &["result"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Failed reconciliations, by kind of error",
            ),
            &["error"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time to reconcile one policy")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let status_delay = Histogram::with_opts(
            HistogramOpts::new(
                "status_delay_seconds",
                "Time from a change (policy edit, Node or agent report) to the policy status \
                 that includes it: batch window, queue and reconcile",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let fleet_reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "fleet_reconcile_duration_seconds",
                "Time to bring the agent DaemonSet and the per-node records in line",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let policy_status_age = prometheus::GaugeVec::new(
            Opts::new(
                "policy_status_age_seconds",
                "Seconds since the policy's status was last computed, at scrape time",
            ),
            &["policy"],
        )?;
        let policies = IntGaugeVec::new(
            Opts::new(
                "policies",
                "FileIntegrityPolicies seen, by state (valid or invalid)",
            ),
            &["state"],
        )?;
        let retention_deleted = IntCounter::new(
            "retention_deleted_total",
            "FileChange objects deleted by retention",
        )?;
        let change_floods = IntCounter::new(
            "change_floods_total",
            "Times a node created FileChanges far faster than its policies allow (ChangeFlood Events name the node)",
        )?;
        let change_storms = IntCounter::new(
            "change_storms_total",
            "Storms recorded on the nodes' FileIntegrityNodes: more changes of one policy entry detected in a minute than the policy's cap, found in the nodes' FileChanges (a storm found again extends its record and is not counted again)",
        )?;
        let evidence_gaps = IntGaugeVec::new(
            Opts::new(
                "evidence_gaps",
                "Transition numbers of a node with no FileChange in the cluster and not queued on \
                 the node, or rewound over (EvidenceGap), until they arrive or an admin clears them",
            ),
            &["node"],
        )?;
        let evidence_gaps_found = IntCounter::new(
            "evidence_gaps_found_total",
            "Evidence gaps found in the nodes' chains of transition numbers",
        )?;
        let daemonset_applies = IntCounterVec::new(
            Opts::new(
                "daemonset_operations_total",
                "Changes made to the agent DaemonSet, by operation",
            ),
            &["operation"],
        )?;
        let leader = IntGauge::new("leader", "1 when this replica holds the leader Lease")?;
        let policy_nodes = IntGaugeVec::new(
            Opts::new(
                "policy_nodes",
                "Nodes of a policy, by state (selected, ready, baselining; left: no longer selected while the policy is unchanged)",
            ),
            &["policy", "state"],
        )?;
        let policy_files = IntGaugeVec::new(
            Opts::new(
                "policy_files_monitored",
                "Files a policy monitors, summed over nodes",
            ),
            &["policy"],
        )?;
        let policy_unacknowledged = IntGaugeVec::new(
            Opts::new(
                "policy_unacknowledged_changes",
                "FileChanges of a policy nobody has acknowledged (counted from the cluster)",
            ),
            &["policy"],
        )?;
        let policy_changes_24h = IntGaugeVec::new(
            Opts::new(
                "policy_changes_last_24h",
                "FileChanges of a policy created in the last 24 hours",
            ),
            &["policy"],
        )?;
        let policy_condition = IntGaugeVec::new(
            Opts::new(
                "policy_condition",
                "1 when the policy's condition of this type is True",
            ),
            &["policy", "type"],
        )?;
        let rollouts = IntGaugeVec::new(
            Opts::new(
                "rollouts",
                "Rollouts of a policy: the same change of one file on several nodes within the rollout window",
            ),
            &["policy"],
        )?;
        let rollout_outliers = IntGaugeVec::new(
            Opts::new(
                "rollout_outliers",
                "Nodes that changed a file of a policy's rollout differently (RolloutOutlier Events name them)",
            ),
            &["policy"],
        )?;
        let fleet_outliers = IntGaugeVec::new(
            Opts::new(
                "fleet_outliers",
                "Nodes and entries of a policy whose digest differs from the clear majority of their pool (FleetDrift Events name them)",
            ),
            &["policy"],
        )?;
        let compliance_changes = IntGaugeVec::new(
            Opts::new(
                "compliance_changes",
                "FileChanges stored of a policy's entries that carry a compliance reference, by framework and control (from the policy)",
            ),
            &["policy", "framework", "control"],
        )?;
        let compliance_unacknowledged = IntGaugeVec::new(
            Opts::new(
                "compliance_unacknowledged_changes",
                "Of those, the changes nobody has acknowledged yet (counted from the cluster)",
            ),
            &["policy", "framework", "control"],
        )?;
        for m in [
            &compliance_changes,
            &compliance_unacknowledged,
            &rollouts,
            &rollout_outliers,
            &fleet_outliers,
            &policy_nodes,
            &policy_files,
            &policy_unacknowledged,
            &policy_changes_24h,
            &policy_condition,
        ] {
            registry.register(Box::new((*m).clone()))?;
        }
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(status_delay.clone()))?;
        registry.register(Box::new(fleet_reconcile_duration.clone()))?;
        registry.register(Box::new(policy_status_age.clone()))?;
        registry.register(Box::new(policies.clone()))?;
        registry.register(Box::new(retention_deleted.clone()))?;
        registry.register(Box::new(change_floods.clone()))?;
        registry.register(Box::new(change_storms.clone()))?;
        registry.register(Box::new(evidence_gaps.clone()))?;
        registry.register(Box::new(evidence_gaps_found.clone()))?;
        registry.register(Box::new(daemonset_applies.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            status_delay,
            fleet_reconcile_duration,
            policies,
            retention_deleted,
            change_floods,
            change_storms,
            evidence_gaps,
            evidence_gaps_found,
            daemonset_applies,
            leader,
            policy_nodes,
            policy_files,
            policy_unacknowledged,
            policy_changes_24h,
            policy_condition,
            rollouts,
            rollout_outliers,
            fleet_outliers,
            compliance_changes,
            compliance_unacknowledged,
            compliance_series: Arc::default(),
            policy_status_age,
            refreshed: Arc::default(),
        })
    }

    /// Records a policy's freshly computed status.
    pub fn observe_policy(&self, policy: &str, status: &kube_fim_crds::FileIntegrityPolicyStatus) {
        for (state, value) in [
            ("selected", status.nodes_selected),
            ("ready", status.nodes_ready),
            ("baselining", status.nodes_baselining),
            ("left", status.nodes_left),
        ] {
            self.policy_nodes
                .with_label_values(&[policy, state])
                .set(i64::from(value.unwrap_or(0)));
        }
        self.policy_files
            .with_label_values(&[policy])
            .set(status.files_monitored.unwrap_or(0));
        self.policy_unacknowledged
            .with_label_values(&[policy])
            .set(status.unacknowledged_changes.unwrap_or(0));
        self.policy_changes_24h
            .with_label_values(&[policy])
            .set(status.changes_last24h.unwrap_or(0));
        for c in &status.conditions {
            self.policy_condition
                .with_label_values(&[policy, c.type_.as_str()])
                .set(i64::from(c.status == "True"));
        }
    }

    /// Records a policy's changes per compliance reference, dropping the
    /// series of references the policy no longer gives.
    pub fn observe_compliance(
        &self,
        policy: &str,
        counts: &std::collections::BTreeMap<
            kube_fim_crds::ComplianceRef,
            crate::changes::ComplianceCount,
        >,
    ) {
        let now: Vec<FrameworkControl> = counts
            .keys()
            .map(|r| (r.framework.clone(), r.control.clone()))
            .collect();
        let mut series = self
            .compliance_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (f, c) in series.get(policy).into_iter().flatten() {
            if !now.contains(&(f.clone(), c.clone())) {
                let _ = self.compliance_changes.remove_label_values(&[policy, f, c]);
                let _ = self
                    .compliance_unacknowledged
                    .remove_label_values(&[policy, f, c]);
            }
        }
        for (r, count) in counts {
            let labels = [policy, r.framework.as_str(), r.control.as_str()];
            self.compliance_changes
                .with_label_values(&labels)
                .set(count.changes);
            self.compliance_unacknowledged
                .with_label_values(&labels)
                .set(count.unacknowledged);
        }
        if now.is_empty() {
            series.remove(policy);
        } else {
            series.insert(policy.to_string(), now);
        }
    }

    /// A policy's status was just computed.
    pub fn status_refreshed(&self, policy: &str) {
        self.refreshed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(policy.to_string(), Instant::now());
    }

    /// Drops the series of a policy that no longer exists.
    pub fn forget_policy(&self, policy: &str) {
        self.refreshed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(policy);
        let _ = self.policy_status_age.remove_label_values(&[policy]);
        for state in ["selected", "ready", "baselining", "left"] {
            let _ = self.policy_nodes.remove_label_values(&[policy, state]);
        }
        let _ = self.policy_files.remove_label_values(&[policy]);
        let _ = self.policy_unacknowledged.remove_label_values(&[policy]);
        let _ = self.policy_changes_24h.remove_label_values(&[policy]);
        let _ = self.rollouts.remove_label_values(&[policy]);
        let _ = self.rollout_outliers.remove_label_values(&[policy]);
        let _ = self.fleet_outliers.remove_label_values(&[policy]);
        self.observe_compliance(policy, &std::collections::BTreeMap::new());
        for t in ["Ready", "Degraded"] {
            let _ = self.policy_condition.remove_label_values(&[policy, t]);
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        for (policy, at) in self
            .refreshed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            self.policy_status_age
                .with_label_values(&[policy.as_str()])
                .set(at.elapsed().as_secs_f64());
        }
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        let mut families = self.registry.gather();
        families.extend(crate::export::metrics::gather());
        if let Err(error) = encoder.encode(&families, &mut buf) {
            tracing::warn!(%error, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
