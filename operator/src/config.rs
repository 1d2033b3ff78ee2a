//! Every setting of the operator and of the agent DaemonSet it maintains, in one
//! struct read from the command line (the chart passes its values as flags; the
//! namespace and identity come from the downward API through the environment).
//! The defaults below are the only ones: the chart's `values.yaml` repeats them
//! for its readers, and a test keeps the two equal.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use kube_fim_crds::duration::parse_duration;

/// The kube-fim operator: one agent DaemonSet for every FileIntegrityPolicy,
/// policy status and events, FileChange retention, metrics.
#[derive(Clone, Debug, Parser)]
#[command(name = "kube-fim-operator", version, about)]
pub struct Config {
    /// Namespace of the agent DaemonSet, its ServiceAccount and the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-fim")]
    pub namespace: String,
    /// Name of this replica in the leader election (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "kube-fim-operator")]
    pub lease_name: String,
    /// Lease duration in seconds: how long a dead leader blocks a takeover.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..))]
    pub lease_duration: u64,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Name of the agent DaemonSet.
    #[arg(long, default_value = "kube-fim-agent")]
    pub daemonset_name: String,
    /// Image of the agent container.
    #[arg(
        long,
        env = "KUBE_FIM_AGENT_IMAGE",
        default_value = "ghcr.io/kube-fim/kube-fim-agent:latest"
    )]
    pub agent_image: String,
    /// Pull policy of the agent image.
    #[arg(long, default_value = "IfNotPresent")]
    pub agent_image_pull_policy: String,
    /// ServiceAccount the agents run as.
    #[arg(long, default_value = "kube-fim-agent")]
    pub agent_service_account: String,
    /// Host directory holding the agents' baselines and delivery queues.
    #[arg(long, default_value = "/var/lib/kube-fim")]
    pub agent_state_dir: String,
    /// Host directory the agents mount read-only as the node's root: `/`, or a
    /// directory standing for it on a test node.
    #[arg(long, default_value = "/")]
    pub agent_host_root: String,
    /// Port the agents serve `/metrics`, `/healthz` and `/readyz` on.
    #[arg(long, default_value_t = 9101)]
    pub agent_metrics_port: i32,
    /// Threads an agent's scans hash on, at low CPU and I/O priority (the
    /// agents' `--threads`); 0: what the agent container's CPU limit allows,
    /// else every core of the node.
    #[arg(long, default_value_t = 0)]
    pub agent_threads: u32,
    /// Agent container resources.
    #[command(flatten)]
    pub agent_resources: AgentResources,

    /// Serve only the policies matching this label selector (e.g. for a canary operator).
    #[arg(long)]
    pub policy_selector: Option<String>,
    /// A node whose agent has not written its status for this long is not reporting.
    #[arg(long, default_value = "3m", value_parser = duration)]
    pub heartbeat_timeout: Duration,
    /// How often a policy's status is refreshed without any event, and how
    /// often retention makes a pass.
    #[arg(long, default_value = "1m", value_parser = duration)]
    pub resync: Duration,
    /// Changes (policy edits, Node and agent reports) are collected for this
    /// long and then reconciled together: the longest a change waits before the
    /// policy's status shows it, however many arrive.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub batch_window: Duration,
    /// FileChanges deleted per API call batch by retention.
    #[arg(long, default_value_t = 50)]
    pub retention_batch: usize,
    /// Pause between two retention batches, so retention never floods the API server.
    #[arg(long, default_value = "200ms", value_parser = duration)]
    pub retention_pause: Duration,
    /// FileChanges retention deletes per policy and pass at most (the rest a few seconds later).
    #[arg(long, default_value_t = 1000)]
    pub retention_max_per_pass: usize,
}

/// CPU and memory of the agent container.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentResources {
    /// Agent CPU request.
    #[arg(long = "agent-cpu-request", default_value = "50m")]
    pub cpu_request: String,
    /// Agent memory request.
    #[arg(long = "agent-memory-request", default_value = "64Mi")]
    pub memory_request: String,
    /// Agent CPU limit (none by default: hashing bursts should not be throttled).
    #[arg(long = "agent-cpu-limit")]
    pub cpu_limit: Option<String>,
    /// Agent memory limit.
    #[arg(long = "agent-memory-limit", default_value = "256Mi")]
    pub memory_limit: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
impl Default for Config {
    fn default() -> Self {
        Config::try_parse_from(["kube-fim-operator"]).expect("the defaults parse")
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn chart_values() -> serde_yaml::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/kube-fim/values.yaml"
        );
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn value(v: &serde_yaml::Value, path: &str) -> String {
        let mut v = v;
        for key in path.split('.') {
            v = &v[key];
        }
        match v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            other => panic!("{path}: {other:?}"),
        }
    }

    /// The chart passes every value as a flag; what it shows as defaults must be
    /// the operator's own, or an install without values and a bare binary differ.
    #[test]
    fn the_chart_defaults_are_the_operators() {
        let c = Config::default();
        let v = chart_values();
        let d = |path: &str| duration(&value(&v, path)).unwrap();
        assert_eq!(d("operator.heartbeatTimeout"), c.heartbeat_timeout);
        assert_eq!(d("operator.resync"), c.resync);
        assert_eq!(d("operator.batchWindow"), c.batch_window);
        assert_eq!(
            value(&v, "operator.leaseDuration"),
            c.lease_duration.to_string()
        );
        assert_eq!(value(&v, "operator.logFormat"), c.log_format);
        assert_eq!(
            value(&v, "operator.metricsPort"),
            c.metrics_addr.port().to_string()
        );
        assert_eq!(
            value(&v, "agent.image.pullPolicy"),
            c.agent_image_pull_policy
        );
        assert_eq!(value(&v, "agent.stateDir"), c.agent_state_dir);
        assert_eq!(value(&v, "agent.hostRoot"), c.agent_host_root);
        assert_eq!(
            value(&v, "agent.metricsPort"),
            c.agent_metrics_port.to_string()
        );
        assert_eq!(value(&v, "agent.threads"), c.agent_threads.to_string());
        let r = &c.agent_resources;
        assert_eq!(value(&v, "agent.resources.requests.cpu"), r.cpu_request);
        assert_eq!(
            value(&v, "agent.resources.requests.memory"),
            r.memory_request
        );
        assert_eq!(value(&v, "agent.resources.limits.memory"), r.memory_limit);
        assert_eq!(
            Some(value(&v, "agent.resources.limits.cpu")).filter(|s| !s.is_empty()),
            r.cpu_limit
        );
        assert_eq!(
            Some(value(&v, "operator.policySelector")).filter(|s| !s.is_empty()),
            c.policy_selector
        );
    }

    #[test]
    fn a_lease_shorter_than_two_seconds_is_refused() {
        let err = Config::try_parse_from(["kube-fim-operator", "--lease-duration=1"]).unwrap_err();
        assert!(err.to_string().contains("lease-duration"), "{err}");
        let err = Config::try_parse_from(["kube-fim-operator", "--resync=soon"]).unwrap_err();
        assert!(err.to_string().contains("--resync"), "{err}");
    }
}
