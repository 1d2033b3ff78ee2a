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
    /// The nodes' CRI socket (a host path: containerd's by default; k3s:
    /// `/run/k3s/containerd/containerd.sock`, CRI-O: `/var/run/crio/crio.sock`).
    /// Mounted read-only into the agents only while a policy selects
    /// containers; empty: never, container drift takes the pods' status.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub agent_cri_socket: String,
    /// Port the agents serve `/metrics`, `/healthz` and `/readyz` on.
    #[arg(long, default_value_t = 9101)]
    pub agent_metrics_port: i32,
    /// Threads an agent's scans run on, all of it, at low CPU and I/O priority (the
    /// agents' `--threads`); 0: what the agent container's CPU limit allows,
    /// else every core of the node.
    #[arg(long, default_value_t = 0)]
    pub agent_threads: u32,
    /// Agent container resources.
    #[command(flatten)]
    pub agent_resources: AgentResources,
    /// Priority class of the agent pods; empty: none (the cluster default).
    /// Clusters that allow `system-node-critical` only in `kube-system` (GKE by
    /// default) refuse every agent pod with it: give another class, or "".
    #[arg(long, default_value = "system-node-critical")]
    pub agent_priority_class_name: String,
    /// A Secret the agent image is pulled with (repeatable).
    #[arg(long = "agent-image-pull-secret")]
    pub agent_image_pull_secrets: Vec<String>,
    /// Log filter of the agents (RUST_LOG syntax).
    #[arg(long, default_value = "info")]
    pub agent_log_level: String,
    /// Log format of the agents.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub agent_log_format: String,
    /// Agent pods a rollout may take down at once: a number or a percentage.
    #[arg(long, default_value = "10%", value_parser = max_unavailable)]
    pub agent_max_unavailable: MaxUnavailable,
    /// A label `KEY=VALUE` on the agent pods (repeatable). The labels the
    /// DaemonSet selects on are the operator's and cannot be set.
    #[arg(long = "agent-pod-label", value_parser = pod_label)]
    pub agent_pod_labels: Vec<(String, String)>,
    /// An annotation `KEY=VALUE` on the agent pods (repeatable).
    #[arg(long = "agent-pod-annotation", value_parser = key_value)]
    pub agent_pod_annotations: Vec<(String, String)>,

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
    /// A transition number a node published that is neither a stored
    /// FileChange nor queued on the node is an EvidenceGap after this long
    /// (the FileChange watch may lag the node's status).
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub evidence_grace: Duration,
    /// Identical changes of one file on several nodes are one rollout while
    /// its latest change is younger than this; a node that changed the same
    /// file differently within this long of the rollout is its outlier.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub rollout_window: Duration,
    /// Nodes that must report the same change for it to be a rollout.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(2..))]
    pub rollout_min_nodes: u64,
    /// A node label whose value splits the fleet comparison's pools further
    /// (repeatable; nodes are always pooled by their OS image, kernel and
    /// architecture).
    #[arg(long = "fleet-pool-label")]
    pub fleet_pool_labels: Vec<String>,
    /// Nodes of a pool that must agree on an entry's digest (and be more than
    /// half of the pool) before a node that differs is named an outlier.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..))]
    pub fleet_min_agree: u64,
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

/// `maxUnavailable` of the agent DaemonSet's rolling update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaxUnavailable {
    /// So many pods.
    Count(i32),
    /// So many percent of the pods, as Kubernetes writes it (`10%`).
    Percent(String),
}

fn max_unavailable(s: &str) -> Result<MaxUnavailable, String> {
    if let Some(p) = s.strip_suffix('%') {
        match p.parse::<u8>() {
            Ok(n) if (1..=100).contains(&n) => Ok(MaxUnavailable::Percent(s.to_string())),
            _ => Err(format!("{s:?}: a percentage is 1% to 100%")),
        }
    } else {
        match s.parse::<i32>() {
            Ok(n) if n >= 1 => Ok(MaxUnavailable::Count(n)),
            _ => Err(format!(
                "{s:?}: a number of pods (at least 1) or a percentage (10%)"
            )),
        }
    }
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// The labels the agent DaemonSet selects its pods by: overriding one would
/// orphan the pods.
const SELECTOR_LABELS: [&str; 2] = [
    crate::daemonset::NAME_LABEL,
    crate::daemonset::COMPONENT_LABEL,
];

fn pod_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = key_value(s)?;
    if SELECTOR_LABELS.contains(&k.as_str()) {
        return Err(format!(
            "{k} is the label the agent DaemonSet selects its pods by; it cannot be set"
        ));
    }
    Ok((k, v))
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

    fn chart_values() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/kube-fim/values.yaml"
        );
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn value(v: &serde_json::Value, path: &str) -> String {
        let mut v = v;
        for key in path.split('.') {
            v = &v[key];
        }
        match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
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
        assert_eq!(d("operator.rolloutWindow"), c.rollout_window);
        assert_eq!(
            value(&v, "operator.rolloutMinNodes"),
            c.rollout_min_nodes.to_string()
        );
        assert_eq!(
            value(&v, "operator.fleetMinAgree"),
            c.fleet_min_agree.to_string()
        );
        assert!(
            v["operator"]["fleetPoolLabels"]
                .as_array()
                .is_some_and(|s| s.is_empty())
                && c.fleet_pool_labels.is_empty()
        );
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
        assert_eq!(value(&v, "agent.criSocket"), c.agent_cri_socket);
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
        assert_eq!(
            value(&v, "agent.priorityClassName"),
            c.agent_priority_class_name
        );
        assert_eq!(value(&v, "agent.logLevel"), c.agent_log_level);
        assert_eq!(value(&v, "agent.logFormat"), c.agent_log_format);
        assert_eq!(
            max_unavailable(&value(&v, "agent.maxUnavailable")).unwrap(),
            c.agent_max_unavailable
        );
        for (key, empty) in [
            ("imagePullSecrets", c.agent_image_pull_secrets.is_empty()),
            ("podLabels", c.agent_pod_labels.is_empty()),
            ("podAnnotations", c.agent_pod_annotations.is_empty()),
        ] {
            let chart_empty = match &v["agent"][key] {
                serde_json::Value::Array(s) => s.is_empty(),
                serde_json::Value::Object(m) => m.is_empty(),
                other => panic!("agent.{key}: {other:?}"),
            };
            assert_eq!(chart_empty, empty, "agent.{key}");
        }
    }

    #[test]
    fn agent_pod_settings_are_parsed_and_bad_ones_refused() {
        let c = Config::try_parse_from([
            "kube-fim-operator",
            "--agent-priority-class-name=",
            "--agent-image-pull-secret=regcred",
            "--agent-image-pull-secret=mirror",
            "--agent-max-unavailable=3",
            "--agent-pod-label=team=platform",
            "--agent-pod-annotation=example.com/note=a=b",
        ])
        .unwrap();
        assert_eq!(c.agent_priority_class_name, "");
        assert_eq!(c.agent_image_pull_secrets, ["regcred", "mirror"]);
        assert_eq!(c.agent_max_unavailable, MaxUnavailable::Count(3));
        assert_eq!(
            c.agent_pod_labels,
            [("team".to_string(), "platform".to_string())]
        );
        assert_eq!(
            c.agent_pod_annotations,
            [("example.com/note".to_string(), "a=b".to_string())]
        );
        for (arg, says) in [
            ("--agent-max-unavailable=0", "at least 1"),
            ("--agent-max-unavailable=150%", "1% to 100%"),
            ("--agent-max-unavailable=some", "percentage"),
            ("--agent-pod-label=novalue", "KEY=VALUE"),
            (
                "--agent-pod-label=app.kubernetes.io/component=x",
                "selects its pods by",
            ),
            ("--agent-log-format=xml", "--agent-log-format"),
        ] {
            let err = Config::try_parse_from(["kube-fim-operator", arg]).unwrap_err();
            assert!(err.to_string().contains(says), "{arg}: {err}");
        }
    }

    #[test]
    fn a_lease_shorter_than_two_seconds_is_refused() {
        let err = Config::try_parse_from(["kube-fim-operator", "--lease-duration=1"]).unwrap_err();
        assert!(err.to_string().contains("lease-duration"), "{err}");
        let err = Config::try_parse_from(["kube-fim-operator", "--resync=soon"]).unwrap_err();
        assert!(err.to_string().contains("--resync"), "{err}");
    }
}
