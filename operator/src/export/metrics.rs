//! The exporter's metrics, `kube_fim_sink_*`, labelled by sink (never by
//! node or path). They live in a registry of their own that the operator's
//! `/metrics` appends ([`gather`]), so their names carry no operator prefix.

use std::sync::LazyLock;

use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Every exporter metric.
pub struct SinkMetrics {
    registry: Registry,
    pub delivered: IntCounterVec,
    pub failures: IntCounterVec,
    pub lag: GaugeVec,
    pub pending: IntGaugeVec,
    pub hold_expired: IntCounterVec,
    pub held: IntGaugeVec,
}

fn build() -> Result<SinkMetrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("kube_fim_sink".into()), None)?;
    let delivered = IntCounterVec::new(
        Opts::new("delivered_total", "Events the sink's receiver acknowledged"),
        &["sink"],
    )?;
    let failures = IntCounterVec::new(
        Opts::new(
            "failures_total",
            "Failed deliveries to the sink (each retried with backoff), by kind",
        ),
        &["sink", "reason"],
    )?;
    let lag = GaugeVec::new(
        Opts::new(
            "lag_seconds",
            "Seconds since the oldest change the sink has not delivered was detected (0 when none)",
        ),
        &["sink"],
    )?;
    let pending = IntGaugeVec::new(
        Opts::new("pending", "Changes the sink has not delivered yet"),
        &["sink"],
    )?;
    let hold_expired = IntCounterVec::new(
        Opts::new(
            "hold_expired_total",
            "Undelivered changes retention deleted anyway because they were past the sink's holdMax",
        ),
        &["sink"],
    )?;
    let held = IntGaugeVec::new(
        Opts::new(
            "retention_held",
            "Changes retention wanted to delete in its last pass over a policy and kept because the sink has not delivered them",
        ),
        &["sink"],
    )?;
    registry.register(Box::new(delivered.clone()))?;
    registry.register(Box::new(failures.clone()))?;
    registry.register(Box::new(lag.clone()))?;
    registry.register(Box::new(pending.clone()))?;
    registry.register(Box::new(hold_expired.clone()))?;
    registry.register(Box::new(held.clone()))?;
    Ok(SinkMetrics {
        registry,
        delivered,
        failures,
        lag,
        pending,
        hold_expired,
        held,
    })
}

static METRICS: LazyLock<Option<SinkMetrics>> = LazyLock::new(|| match build() {
    Ok(m) => Some(m),
    Err(error) => {
        tracing::error!(%error, "registering the sink metrics");
        None
    }
});

/// The exporter's metrics (none if they could not be registered, which only
/// a programming error causes; delivery goes on without them).
pub fn metrics() -> Option<&'static SinkMetrics> {
    METRICS.as_ref()
}

/// The exporter's metric families, for the operator's `/metrics`.
pub fn gather() -> Vec<MetricFamily> {
    metrics().map(|m| m.registry.gather()).unwrap_or_default()
}

/// Drops the series of a deleted sink.
pub fn forget(sink: &str) {
    if let Some(m) = metrics() {
        let _ = m.delivered.remove_label_values(&[sink]);
        let _ = m.lag.remove_label_values(&[sink]);
        let _ = m.pending.remove_label_values(&[sink]);
        let _ = m.hold_expired.remove_label_values(&[sink]);
        let _ = m.held.remove_label_values(&[sink]);
        for reason in super::transport::FAILURE_REASONS {
            let _ = m.failures.remove_label_values(&[sink, reason]);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_sink_prefix_and_units() {
        let m = metrics().unwrap();
        m.delivered.with_label_values(&["t"]).inc();
        m.lag.with_label_values(&["t"]).set(1.5);
        m.failures.with_label_values(&["t", "connect"]).inc();
        let names: Vec<String> = gather().iter().map(|f| f.name().to_string()).collect();
        for want in [
            "kube_fim_sink_delivered_total",
            "kube_fim_sink_lag_seconds",
            "kube_fim_sink_failures_total",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        forget("t");
    }
}
