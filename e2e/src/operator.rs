//! The operator as a process of its own, logged in as the kube-fim-operator
//! ServiceAccount (the RBAC of `manifests/rbac.yaml`).

use crate::{Process, binary, ensure_crds, free_port, http_get, service_account_kubeconfig};

/// Label that scopes a test's policies to its own operator and agents.
pub const SUITE_LABEL: &str = "e2e.kube-fim.io/suite";

/// A running operator.
pub struct Operator {
    pub process: Process,
    pub port: u16,
}

impl Operator {
    /// Starts an operator serving only the policies labelled with `suite`, with
    /// its own DaemonSet and Lease names, and `extra` flags (each replacing a
    /// default of the same name).
    pub fn start(name: &str, suite: &str, extra: &[String]) -> Operator {
        ensure_crds();
        let port = free_port();
        let mut args = vec![
            "--namespace=kube-fim".to_string(),
            format!("--daemonset-name={name}-agent"),
            format!("--policy-selector={SUITE_LABEL}={suite}"),
            format!("--metrics-addr=127.0.0.1:{port}"),
            format!("--lease-name={name}-lease"),
            "--lease-duration=4".to_string(),
            "--agent-image=kube-fim-agent:e2e".to_string(),
            format!("--identity={name}"),
        ];
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_string();
        args.retain(|a| !extra.iter().any(|e| flag(e) == flag(a)));
        args.extend(extra.iter().cloned());
        let process = Process::start(
            name,
            &binary("kube-fim-operator"),
            &args,
            &service_account_kubeconfig("kube-fim-operator"),
        );
        Operator { process, port }
    }

    /// The operator's metrics text, if it answers.
    pub fn metrics(&self) -> Option<String> {
        http_get(self.port, "/metrics")
    }
}
