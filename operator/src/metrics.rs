//! The operator's Prometheus metrics.

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
    pub policies: IntGaugeVec,
    pub retention_deleted: IntCounter,
    pub daemonset_applies: IntCounterVec,
    pub leader: IntGauge,
}

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
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
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
        let daemonset_applies = IntCounterVec::new(
            Opts::new(
                "daemonset_operations_total",
                "Changes made to the agent DaemonSet, by operation",
            ),
            &["operation"],
        )?;
        let leader = IntGauge::new("leader", "1 when this replica holds the leader Lease")?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(policies.clone()))?;
        registry.register(Box::new(retention_deleted.clone()))?;
        registry.register(Box::new(daemonset_applies.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            policies,
            retention_deleted,
            daemonset_applies,
            leader,
        })
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(%error, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
