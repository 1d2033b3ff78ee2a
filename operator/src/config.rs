//! How the operator runs and what it deploys.

use std::time::Duration;

/// Settings of the operator and of the agent DaemonSet it maintains.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the agent DaemonSet, its ServiceAccount and the leader Lease.
    pub namespace: String,
    /// Name of the agent DaemonSet.
    pub daemonset_name: String,
    /// Image of the agent container.
    pub agent_image: String,
    /// Pull policy of the agent image.
    pub agent_image_pull_policy: String,
    /// ServiceAccount the agents run as.
    pub agent_service_account: String,
    /// Host directory holding the agents' baselines and delivery queues.
    pub agent_state_dir: String,
    /// Port the agents serve `/metrics`, `/healthz` and `/readyz` on.
    pub agent_metrics_port: i32,
    /// Agent container resources.
    pub agent_resources: AgentResources,
    /// Only policies matching this label selector are served (all when empty).
    pub policy_selector: Option<String>,
    /// A node whose agent has not written its status for this long is not reporting.
    pub heartbeat_timeout: Duration,
    /// How often a policy's status is refreshed without any event.
    pub resync: Duration,
    /// FileChanges deleted per API call batch by retention.
    pub retention_batch: usize,
    /// Pause between two retention batches, so retention never floods the API server.
    pub retention_pause: Duration,
    /// FileChanges retention deletes per policy and reconcile at most (the rest next time).
    pub retention_max_per_pass: usize,
}

/// CPU and memory of the agent container.
#[derive(Clone, Debug)]
pub struct AgentResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: String,
}

impl Default for AgentResources {
    fn default() -> Self {
        AgentResources {
            cpu_request: "50m".into(),
            memory_request: "64Mi".into(),
            cpu_limit: None,
            memory_limit: "256Mi".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "kube-fim".into(),
            daemonset_name: "kube-fim-agent".into(),
            agent_image: "ghcr.io/kube-fim/kube-fim-agent:latest".into(),
            agent_image_pull_policy: "IfNotPresent".into(),
            agent_service_account: "kube-fim-agent".into(),
            agent_state_dir: "/var/lib/kube-fim".into(),
            agent_metrics_port: 9101,
            agent_resources: AgentResources::default(),
            policy_selector: None,
            heartbeat_timeout: Duration::from_secs(180),
            resync: Duration::from_secs(60),
            retention_batch: 50,
            retention_pause: Duration::from_millis(200),
            retention_max_per_pass: 1000,
        }
    }
}
