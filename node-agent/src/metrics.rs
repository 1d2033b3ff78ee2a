//! The agent's Prometheus metrics. Every series carries the agent's `node`
//! label; none carries a path (cardinality).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::cluster::metrics::ClusterMetrics;

/// When the monitoring loop (or a scan inside it) last made progress.
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<AtomicU64>);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Progress {
    /// Records progress now.
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last progress (`None` before the first).
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
        }
    }
}

/// `/healthz` fails when the loop made no progress for this long (it wakes
/// every 10 s even when idle, and a scan records progress file by file).
pub const STALLED: Duration = Duration::from_secs(90);

/// Every metric the agent exports.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    pub changes: IntCounterVec,
    pub files: IntGaugeVec,
    pub bytes_hashed: IntCounter,
    pub scan_duration: Histogram,
    pub last_scan: GaugeVec,
    pub scan_errors: IntCounter,
    pub watch_errors: IntCounter,
    pub watches: IntGauge,
    /// 1 while fanotify names the writers of changes.
    pub attribution_active: IntGauge,
    /// 1 for the reason attribution was asked for and is off.
    pub attribution_unavailable: IntGaugeVec,
    pub fanotify_dirs: IntGauge,
    pub attribution_overflows: IntCounter,
    pub attributed_changes: IntCounterVec,
    pub cluster: ClusterMetrics,
    pub ready: Arc<AtomicBool>,
    pub progress: Progress,
}

impl AgentMetrics {
    /// Creates the metrics of the agent on `node`.
    pub fn new(node: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(
            None,
            Some(HashMap::from([("node".to_string(), node.to_string())])),
        )?;
        let changes = IntCounterVec::new(
            Opts::new(
                "kube_fim_agent_changes_total",
                "Changes detected, by policy and category",
            ),
            &["policy", "category"],
        )?;
        let files = IntGaugeVec::new(
            Opts::new(
                "kube_fim_agent_files_monitored",
                "Files a policy monitors on this node",
            ),
            &["policy"],
        )?;
        let bytes_hashed = IntCounter::new(
            "kube_fim_agent_bytes_hashed_total",
            "Bytes read to hash files",
        )?;
        let scan_duration = Histogram::with_opts(
            HistogramOpts::new(
                "kube_fim_agent_scan_duration_seconds",
                "Duration of full scans",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
            ]),
        )?;
        let last_scan = GaugeVec::new(
            Opts::new(
                "kube_fim_agent_last_scan_success_timestamp_seconds",
                "When the last full scan of a policy completed (Unix time)",
            ),
            &["policy"],
        )?;
        let scan_errors = IntCounter::new(
            "kube_fim_agent_scan_errors_total",
            "Files that could not be inspected (reported and skipped)",
        )?;
        let watch_errors = IntCounter::new(
            "kube_fim_agent_watch_errors_total",
            "Real-time watches that could not be set (e.g. the inotify limit); scans go on",
        )?;
        let watches = IntGauge::new(
            "kube_fim_agent_watched_directories",
            "Directories watched in real time",
        )?;
        let attribution_active = IntGauge::new(
            "kube_fim_agent_attribution_active",
            "1 while the writers of changes are named (fanotify), 0 otherwise",
        )?;
        let attribution_unavailable = IntGaugeVec::new(
            Opts::new(
                "kube_fim_agent_attribution_unavailable",
                "1 when a policy asks for process attribution and the node cannot give it, by reason",
            ),
            &["reason"],
        )?;
        let fanotify_dirs = IntGauge::new(
            "kube_fim_agent_fanotify_directories",
            "Monitored directories followed through fanotify file system marks (no inotify watch each)",
        )?;
        let attribution_overflows = IntCounter::new(
            "kube_fim_agent_fanotify_overflows_total",
            "fanotify queue overflows (events lost; each triggers a full scan)",
        )?;
        let attributed_changes = IntCounterVec::new(
            Opts::new(
                "kube_fim_agent_attributed_changes_total",
                "Changes with a named writer, by policy, command and pod (namespace and pod empty for host processes)",
            ),
            &["policy", "command", "namespace", "pod"],
        )?;
        for c in [
            Box::new(changes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(attribution_active.clone()),
            Box::new(attribution_unavailable.clone()),
            Box::new(fanotify_dirs.clone()),
            Box::new(attribution_overflows.clone()),
            Box::new(attributed_changes.clone()),
            Box::new(files.clone()),
            Box::new(bytes_hashed.clone()),
            Box::new(scan_duration.clone()),
            Box::new(last_scan.clone()),
            Box::new(scan_errors.clone()),
            Box::new(watch_errors.clone()),
            Box::new(watches.clone()),
        ] {
            registry.register(c)?;
        }
        let cluster = ClusterMetrics::register(&registry)?;
        Ok(AgentMetrics {
            registry,
            changes,
            files,
            bytes_hashed,
            scan_duration,
            last_scan,
            scan_errors,
            watch_errors,
            watches,
            attribution_active,
            attribution_unavailable,
            fanotify_dirs,
            attribution_overflows,
            attributed_changes,
            cluster,
            ready: Arc::new(AtomicBool::new(false)),
            progress: Progress::default(),
        })
    }

    /// Publishes whether attribution is on, or why not.
    pub fn set_attribution(&self, state: &crate::attribution::AttributionState) {
        self.attribution_active.set(i64::from(state.active));
        self.attribution_unavailable.reset();
        if let Some(reason) = state.reason_label {
            self.attribution_unavailable
                .with_label_values(&[reason])
                .set(1);
        }
        if !state.active {
            self.fanotify_dirs.set(0);
        }
    }

    /// Counts one change of `policy` with a named writer.
    pub fn count_attributed(&self, policy: &str, p: &kube_fim_crds::ProcessInfo) {
        let command = p.command.as_deref().unwrap_or("");
        let (ns, pod) = p.pod.as_ref().map_or(("", ""), |r| {
            (
                r.namespace.as_deref().unwrap_or(""),
                r.name.as_deref().unwrap_or(""),
            )
        });
        self.attributed_changes
            .with_label_values(&[policy, command, ns, pod])
            .inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(%error, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Serves `/metrics`, `/healthz` (fails when the monitoring loop stalls)
    /// and `/readyz` (ready once the first baseline or startup scan is done).
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<()> {
        async fn metrics(
            State(m): State<AgentMetrics>,
        ) -> ([(&'static str, &'static str); 1], String) {
            ([("content-type", "text/plain; version=0.0.4")], m.render())
        }
        async fn readyz(State(m): State<AgentMetrics>) -> (StatusCode, &'static str) {
            if m.ready.load(Ordering::Relaxed) {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "building the baseline")
            }
        }
        async fn healthz(State(m): State<AgentMetrics>) -> (StatusCode, String) {
            match m.progress.age() {
                Some(age) if age > STALLED => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the monitoring loop made no progress for {}s",
                        age.as_secs()
                    ),
                ),
                _ => (StatusCode::OK, "ok".into()),
            }
        }
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await
    }
}
