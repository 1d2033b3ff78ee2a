//! Metrics of the agent's API side (every series carries the agent's `node`).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Counters and gauges of reporting to the API server.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub reports_queued: IntGauge,
    pub delivered: IntCounter,
    pub api_errors: IntCounterVec,
    pub change_storms: IntCounterVec,
    pub baseline_tampered: IntGauge,
    pub queue_write_failing: IntGauge,
}

impl ClusterMetrics {
    /// Registers the metrics in `registry` (whose const labels carry `node`).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reports_queued = IntGauge::new(
            "kube_fim_agent_reports_queued",
            "Changes recorded on the node and not yet stored by the API server",
        )?;
        let delivered = IntCounter::new(
            "kube_fim_agent_reports_delivered_total",
            "FileChange objects stored by the API server",
        )?;
        let api_errors = IntCounterVec::new(
            Opts::new(
                "kube_fim_agent_api_errors_total",
                "Failed API calls, by operation",
            ),
            &["operation"],
        )?;
        let change_storms = IntCounterVec::new(
            Opts::new(
                "kube_fim_agent_change_storms_total",
                "Minutes in which a policy's changes exceeded its cap and were summarised",
            ),
            &["policy"],
        )?;
        let baseline_tampered = IntGauge::new(
            "kube_fim_agent_baseline_tampered",
            "1 when the baseline on the node does not match the digest stored in the cluster",
        )?;
        let queue_write_failing = IntGauge::new(
            "kube_fim_agent_queue_write_failing",
            "1 while detected changes cannot be written to the node's delivery queue (e.g. a full disk); detection waits, nothing is dropped",
        )?;
        registry.register(Box::new(queue_write_failing.clone()))?;
        registry.register(Box::new(reports_queued.clone()))?;
        registry.register(Box::new(delivered.clone()))?;
        registry.register(Box::new(api_errors.clone()))?;
        registry.register(Box::new(change_storms.clone()))?;
        registry.register(Box::new(baseline_tampered.clone()))?;
        Ok(ClusterMetrics {
            reports_queued,
            delivered,
            api_errors,
            change_storms,
            baseline_tampered,
            queue_write_failing,
        })
    }
}
