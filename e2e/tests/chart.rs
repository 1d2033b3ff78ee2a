//! The Helm chart and the plain manifests: `helm lint` and `helm template` with
//! the pinned Helm (built from its Go module by `e2e/helm/build.sh`), the values
//! schema refusing bad values, what the templates wire together, a server-side
//! dry run of the rendered chart and of `manifests/` against the real control
//! plane, and a real `helm install` whose operator Deployment is admitted under
//! the restricted Pod Security level and whose ServiceAccount and flags run the
//! real operator. Also: `manifests/` and the chart's CRDs are current, and the
//! dashboard and alert rules use only the metrics kube-fim publishes.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube_fim_e2e::{
    Process, binary, ensure_crds, ensure_rbac, eventually, free_port, helm, helm_binary, http_get,
    kubectl, kubectl_stdin, metric, repo_root, service_account_kubeconfig_in,
};
use serde_json::Value;

/// Every optional part of the chart switched on.
const ALL_OPTIONS: &[&str] = &[
    "metrics.serviceMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "dashboards.enabled=true",
    "samplePolicy.enabled=true",
];

/// The labels the operator puts on the agent DaemonSet's pods
/// (operator/src/daemonset.rs); the agent Service must select them.
const AGENT_POD_LABELS: &[(&str, &str)] = &[
    ("app.kubernetes.io/name", "kube-fim"),
    ("app.kubernetes.io/component", "agent"),
];

/// The metric names kube-fim publishes (operator/src/metrics.rs and the agent).
/// Histograms appear with their `_bucket`, `_sum` and `_count` series.
const METRICS: &[&str] = &[
    "kube_fim_operator_reconciles_total",
    "kube_fim_operator_reconcile_errors_total",
    "kube_fim_operator_reconcile_duration_seconds",
    "kube_fim_operator_policies",
    "kube_fim_operator_retention_deleted_total",
    "kube_fim_operator_evidence_gaps",
    "kube_fim_operator_evidence_gaps_found_total",
    "kube_fim_operator_change_floods_total",
    "kube_fim_operator_leader",
    "kube_fim_operator_policy_nodes",
    "kube_fim_operator_policy_files_monitored",
    "kube_fim_operator_policy_unacknowledged_changes",
    "kube_fim_operator_policy_changes_last_24h",
    "kube_fim_operator_policy_condition",
    "kube_fim_operator_rollouts",
    "kube_fim_operator_rollout_outliers",
    "kube_fim_operator_fleet_outliers",
    "kube_fim_operator_compliance_changes",
    "kube_fim_operator_compliance_unacknowledged_changes",
    "kube_fim_agent_changes_total",
    "kube_fim_agent_files_monitored",
    "kube_fim_agent_bytes_hashed_total",
    "kube_fim_agent_scan_duration_seconds",
    "kube_fim_agent_last_scan_success_timestamp_seconds",
    "kube_fim_agent_scan_errors_total",
    "kube_fim_agent_watch_errors_total",
    "kube_fim_agent_reports_queued",
    "kube_fim_agent_api_errors_total",
    "kube_fim_agent_change_storms_total",
    "kube_fim_agent_reports_deferred",
    "kube_fim_agent_reports_deferred_total",
    "kube_fim_agent_baseline_tampered",
    "kube_fim_agent_queue_write_failing",
    "kube_fim_agent_attribution_active",
    "kube_fim_agent_attribution_unavailable",
    "kube_fim_agent_fanotify_directories",
    "kube_fim_agent_fanotify_marks",
    "kube_fim_agent_attribution_events_total",
    "kube_fim_agent_fanotify_overflows_total",
    "kube_fim_agent_attributed_changes_total",
    "kube_fim_agent_package_checks_total",
    "kube_fim_agent_package_database_errors_total",
    "kube_fim_sink_delivered_total",
    "kube_fim_sink_failures_total",
    "kube_fim_sink_lag_seconds",
    "kube_fim_sink_pending",
    "kube_fim_sink_hold_expired_total",
    "kube_fim_sink_retention_held",
];

fn chart_dir() -> PathBuf {
    repo_root().join("charts/kube-fim")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `helm template RELEASE charts/kube-fim --namespace NS --set ...`, as YAML documents.
fn template(release: &str, namespace: &str, sets: &[&str]) -> Vec<Value> {
    let run = helm(template_args(release, namespace, sets));
    assert!(run.success, "helm template {sets:?}: {}", run.stderr);
    documents(&run.stdout)
}

fn template_args(release: &str, namespace: &str, sets: &[&str]) -> Vec<String> {
    let mut args = vec![
        "template".to_string(),
        release.to_string(),
        path_str(&chart_dir()).to_string(),
        "--namespace".to_string(),
        namespace.to_string(),
    ];
    for set in sets {
        args.push("--set".to_string());
        args.push(set.to_string());
    }
    args
}

fn documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .expect("helm renders YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = docs
                .iter()
                .map(|d| format!("{:?}/{:?}", d["kind"], d["metadata"]["name"]))
                .collect();
            panic!("no {kind} {name} in the rendered chart; it has {have:?}")
        })
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().expect("kind").to_string())
        .collect()
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every label of `selector` is in `labels` with the same value.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The files under `dir`, by path relative to it, with their contents.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path
                    .strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The `kube_fim_*` metric names a PromQL expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("kube_fim_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn is_published(name: &str) -> bool {
    METRICS.iter().any(|m| {
        name == *m
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s) == Some(m))
    })
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is not installed ({e}): it comes with Debian's `prometheus` package \
             (`apt-get install -y prometheus`; .ci/run installs it)"
            )
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn chart_crds_are_the_crds_of_the_api_crate() {
    let ours = files(&repo_root().join("crds"));
    let ours: BTreeMap<_, _> = ours
        .into_iter()
        .filter(|(name, _)| name.ends_with(".yaml") && !name.contains('/'))
        .collect();
    let chart = files(&chart_dir().join("crds"));
    assert_eq!(ours.len(), 4, "crds/ has the four CRDs: {:?}", ours.keys());
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "charts/kube-fim/crds/ must hold exactly the CRDs of crds/: run `make manifests`"
    );
    for (name, text) in &ours {
        assert!(
            chart[name] == *text,
            "charts/kube-fim/crds/{name} differs from crds/{name}: run `make manifests`"
        );
    }
}

#[test]
fn manifests_are_rendered_from_the_current_chart() {
    let out = tempfile::tempdir().unwrap();
    let run: kube_fim_e2e::Run = Command::new(repo_root().join("charts/render-manifests.sh"))
        .arg(out.path())
        .env("HELM", helm_binary())
        .output()
        .unwrap()
        .into();
    assert!(run.success, "charts/render-manifests.sh: {}", run.stderr);
    let fresh = files(out.path());
    let committed = files(&repo_root().join("manifests"));
    for expected in [
        "Kustomization",
        "crds.yaml",
        "rbac.yaml",
        "admission.yaml",
        "workload.yaml",
        "grafana/kube-fim.json",
        "prometheus/kube-fim-alerts.yaml",
    ] {
        assert!(
            fresh.contains_key(expected),
            "render-manifests.sh wrote no {expected}"
        );
    }
    let stale: Vec<&String> = fresh
        .keys()
        .chain(committed.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|name| fresh.get(*name) != committed.get(*name))
        .collect();
    assert!(
        stale.is_empty(),
        "manifests/ is not what the chart renders ({stale:?} differ, are missing or are extra): \
         run `make manifests` and commit the result"
    );
}

#[test]
fn helm_lint_passes_with_defaults_and_with_every_option() {
    let chart = chart_dir();
    for sets in [&[][..], ALL_OPTIONS] {
        let mut args = vec!["lint".to_string(), "--strict".to_string()];
        args.push(path_str(&chart).to_string());
        for set in sets {
            args.push("--set".to_string());
            args.push(set.to_string());
        }
        let run = helm(&args);
        assert!(
            run.success && run.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint {sets:?}:\n{}{}",
            run.stdout,
            run.stderr
        );
    }
}

/// The agent's FileChange watch selects `spec.node`, a CRD selectable field
/// (GA in Kubernetes 1.32): the chart refuses older clusters rather than
/// installing agents whose approvals never apply.
#[test]
fn the_chart_declares_the_kubernetes_the_crds_need() {
    let crd =
        std::fs::read_to_string(chart_dir().join("crds/fim.kube-fim.io_filechanges.yaml")).unwrap();
    assert!(
        crd.contains("selectableFields") && crd.contains("jsonPath: .spec.node"),
        "the FileChange CRD no longer has the spec.node selectable field: revisit kubeVersion"
    );
    let chart = path_str(&chart_dir()).to_string();
    let render = |version: &str| {
        helm([
            "template",
            "kube-fim",
            chart.as_str(),
            "--kube-version",
            version,
        ])
    };
    let old = render("1.31.9");
    assert!(!old.success, "helm renders for Kubernetes 1.31");
    assert!(
        old.stderr.contains("kubeVersion") && old.stderr.contains(">=1.33.0-0"),
        "{}",
        old.stderr
    );
    for ok in ["1.33.0", "v1.33.13", "1.34.1"] {
        let run = render(ok);
        assert!(run.success, "Kubernetes {ok}: {}", run.stderr);
    }
}

/// The minimum Kubernetes the chart declares is the one the suite runs: the
/// running API server's version satisfies the chart's `kubeVersion`, and the
/// minor before it does not (a declared minimum no test runs is a guess).
#[test]
fn the_chart_declares_as_minimum_the_kubernetes_the_suite_runs() {
    let server = json(&["version", "-o", "json"]).unwrap()["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let pinned = kube_fim_e2e::release::kubernetes_version();
    assert!(
        server.starts_with(&pinned),
        "the API server runs {server}, e2e/controlplane/go.mod pins {pinned}"
    );
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let constraint = chart["kubeVersion"].as_str().unwrap();
    let minimum = constraint
        .strip_prefix(">=")
        .unwrap_or_else(|| panic!("kubeVersion {constraint:?} is not a single minimum"));
    let (major, minor) = kube_fim_e2e::release::major_minor(minimum).unwrap();
    assert_eq!(
        Some((major, minor)),
        kube_fim_e2e::release::major_minor(&server),
        "Chart.yaml declares {constraint} but the suite runs {server}: declare the suite's \
         version, or run the declared one too"
    );
    let chart_path = path_str(&chart_dir()).to_string();
    let render = |version: &str| {
        helm([
            "template",
            "kube-fim",
            chart_path.as_str(),
            "--kube-version",
            version,
        ])
    };
    let run = render(&server);
    assert!(run.success, "Kubernetes {server}: {}", run.stderr);
    let before = format!("{major}.{}.99", minor - 1);
    assert!(
        !render(&before).success,
        "the chart installs on {before}, older than any version the suite runs"
    );
}

#[test]
fn values_schema_refuses_bad_values_at_install() {
    for (set, field) in [
        ("operator.replicas=0", "operator.replicas"),
        (
            "operator.replica=3",
            "Additional property replica is not allowed",
        ),
        ("operator.resync=soon", "operator.resync"),
        ("operator.leaseDuration=1", "operator.leaseDuration"),
        ("operator.logFormat=xml", "operator.logFormat"),
        ("operator.extraArgs[0]=verbose", "operator.extraArgs.0"),
        ("agent.stateDir=var/lib/kube-fim", "agent.stateDir"),
        ("agent.metricsPort=70000", "agent.metricsPort"),
        ("agent.threads=-1", "agent.threads"),
        ("agent.image.pullPolicy=Sometimes", "agent.image.pullPolicy"),
        (
            "agent.resources.requests.memory=lots",
            "agent.resources.requests.memory",
        ),
        (
            "metrics.serviceMonitor.interval=often",
            "metrics.serviceMonitor.interval",
        ),
        ("samplePolicy.name=Not_A_Name", "samplePolicy.name"),
        ("agent.maxUnavailable=0", "agent.maxUnavailable"),
        ("agent.maxUnavailable=150%", "agent.maxUnavailable"),
        ("agent.logFormat=xml", "agent.logFormat"),
        (
            "agent.priorityClassName=Not_A_Class",
            "agent.priorityClassName",
        ),
        (
            "agent.podLabels.app\\.kubernetes\\.io/component=x",
            "agent.podLabels",
        ),
        (
            "agent.imagePullSecrets[0].nam=regcred",
            "Additional property nam is not allowed",
        ),
    ] {
        let run = helm(template_args("kube-fim", "kube-fim", &[set]));
        assert!(!run.success, "--set {set} was accepted");
        assert!(
            run.stderr.contains(field),
            "--set {set}: the error does not name {field}: {}",
            run.stderr
        );
    }
    // The same keys with good values render.
    template(
        "kube-fim",
        "kube-fim",
        &[
            "operator.replicas=3",
            "operator.resync=90s",
            "operator.logFormat=json",
            "operator.extraArgs[0]=--agent-cpu-limit=1",
            "agent.stateDir=/var/lib/fim",
            "agent.resources.requests.memory=128Mi",
        ],
    );
}

/// The operator's arguments in the chart's Deployment rendered with `sets`.
fn operator_args(sets: &[&str]) -> Vec<String> {
    let docs = template("fim", "fim-system", sets);
    let deployment = find(&docs, "Deployment", "fim-kube-fim-operator");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The agent pod settings reach the operator, which builds the DaemonSet from
/// them (operator/src/daemonset.rs tests what it makes of each flag; the real
/// install below checks the DaemonSet the operator creates).
#[test]
fn agent_pod_settings_pass_through_to_the_operator() {
    let defaults = operator_args(&[]);
    for expected in [
        "--agent-priority-class-name=system-node-critical",
        "--agent-log-level=info",
        "--agent-log-format=text",
        "--agent-max-unavailable=10%",
    ] {
        assert!(
            defaults.iter().any(|a| a == expected),
            "{expected} not in {defaults:?}"
        );
    }
    for prefix in [
        "--agent-image-pull-secret",
        "--agent-pod-label",
        "--agent-pod-annotation",
    ] {
        assert!(
            !defaults.iter().any(|a| a.starts_with(prefix)),
            "{prefix} without values: {defaults:?}"
        );
    }
    let args = operator_args(&[
        "agent.priorityClassName=",
        "agent.logLevel=info\\,kube_fim_agent=debug",
        "agent.logFormat=json",
        "agent.maxUnavailable=3",
        "agent.imagePullSecrets[0].name=regcred",
        "agent.imagePullSecrets[1].name=mirror",
        "agent.podLabels.team=platform",
        "agent.podAnnotations.example\\.com/owner=sec ops",
    ]);
    for expected in [
        "--agent-priority-class-name=",
        "--agent-log-level=info,kube_fim_agent=debug",
        "--agent-log-format=json",
        "--agent-max-unavailable=3",
        "--agent-image-pull-secret=regcred",
        "--agent-image-pull-secret=mirror",
        "--agent-pod-label=team=platform",
        "--agent-pod-annotation=example.com/owner=sec ops",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} not in {args:?}"
        );
    }
    // Every one parses as the operator's own flags.
    let mut cmd = Command::new(binary("kube-fim-operator"));
    let out = cmd.args(&args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "the operator refuses the chart's flags: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and that check can fail: a value the operator refuses is refused
    // before it prints its help.
    let out = Command::new(binary("kube-fim-operator"))
        .args(["--agent-max-unavailable=0", "--help"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn default_values_render_only_the_core_objects() {
    let docs = template("kube-fim", "kube-fim", &[]);
    let expected: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "FlowSchema",
        // The `helm test` hook.
        "Pod",
        "PodDisruptionBudget",
        "PriorityLevelConfiguration",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds(&docs), expected);
    // The identities of manifests/rbac.yaml, which the operator's defaults name.
    for (kind, name) in [
        ("ServiceAccount", "kube-fim-operator"),
        ("ServiceAccount", "kube-fim-agent"),
        ("ClusterRole", "kube-fim-operator"),
        ("ClusterRole", "kube-fim-agent"),
        ("ClusterRole", "kube-fim-approver"),
        ("ClusterRole", "kube-fim-viewer"),
        ("ValidatingAdmissionPolicy", "kube-fim-agent-node-bound"),
        (
            "ValidatingAdmissionPolicyBinding",
            "kube-fim-agent-node-bound",
        ),
        ("ValidatingAdmissionPolicy", "kube-fim-approval"),
        ("ValidatingAdmissionPolicyBinding", "kube-fim-approval"),
        ("ValidatingAdmissionPolicy", "kube-fim-evidence"),
        ("ValidatingAdmissionPolicyBinding", "kube-fim-evidence"),
        ("FlowSchema", "kube-fim-agents"),
        ("PriorityLevelConfiguration", "kube-fim-agents"),
        ("ClusterRoleBinding", "kube-fim-operator"),
        ("ClusterRoleBinding", "kube-fim-agent"),
        ("Role", "kube-fim-operator"),
        ("RoleBinding", "kube-fim-operator"),
        ("Deployment", "kube-fim-operator"),
    ] {
        find(&docs, kind, name);
    }
    let all = template("kube-fim", "kube-fim", ALL_OPTIONS);
    for kind in [
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "FileIntegrityPolicy",
    ] {
        assert!(kinds(&all).contains(kind), "no {kind} with every option on");
    }
}

#[test]
fn the_operator_deployment_wires_flags_identity_and_least_privilege() {
    let mut sets = ALL_OPTIONS.to_vec();
    sets.extend([
        "operator.policySelector=team=platform",
        "agent.image.tag=1.2.3",
        "agent.resources.limits.cpu=500m",
        "agent.metricsPort=9200",
        "agent.threads=2",
        "operator.fleetPoolLabels={eks.amazonaws.com/nodegroup,zone}",
        "operator.rolloutWindow=6h",
    ]);
    let docs = template("fim", "fim-system", &sets);
    let deployment = find(&docs, "Deployment", "fim-kube-fim-operator");
    assert_eq!(deployment["metadata"]["namespace"], "fim-system");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "fim-kube-fim-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()?
                    .to_string(),
            ))
        })
        .collect();
    assert_eq!(
        env.get("POD_NAME").map(String::as_str),
        Some("metadata.name")
    );
    assert_eq!(
        env.get("POD_NAMESPACE").map(String::as_str),
        Some("metadata.namespace")
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for expected in [
        "--metrics-addr=0.0.0.0:8080",
        "--daemonset-name=fim-kube-fim-agent",
        "--lease-name=fim-kube-fim-operator",
        "--agent-image=ghcr.io/kube-fim/kube-fim-agent:1.2.3",
        "--agent-service-account=fim-kube-fim-agent",
        "--agent-metrics-port=9200",
        "--agent-threads=2",
        "--agent-cpu-limit=500m",
        "--policy-selector=team=platform",
        "--fleet-pool-label=eks.amazonaws.com/nodegroup",
        "--fleet-pool-label=zone",
        "--rollout-window=6h",
    ] {
        assert!(args.contains(&expected), "{expected} not in {args:?}");
    }
    // Every flag is one the operator has (clap refuses unknown flags at start).
    let help = Command::new(binary("kube-fim-operator"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &args {
        let flag = arg.split('=').next().unwrap();
        assert!(help.contains(flag), "the operator has no flag {flag}");
    }

    // Identities in the release namespace; cluster-scoped names carry the release.
    for sa in ["fim-kube-fim-operator", "fim-kube-fim-agent"] {
        assert_eq!(
            find(&docs, "ServiceAccount", sa)["metadata"]["namespace"],
            "fim-system"
        );
    }
    let role = find(&docs, "Role", "fim-kube-fim-operator");
    assert_eq!(role["metadata"]["namespace"], "fim-system");
    let role_resources: BTreeSet<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap())
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(role_resources, BTreeSet::from(["daemonsets", "leases"]));
    for (kind, name, sa) in [
        (
            "ClusterRoleBinding",
            "fim-kube-fim-operator",
            "fim-kube-fim-operator",
        ),
        (
            "ClusterRoleBinding",
            "fim-kube-fim-agent",
            "fim-kube-fim-agent",
        ),
        (
            "RoleBinding",
            "fim-kube-fim-operator",
            "fim-kube-fim-operator",
        ),
    ] {
        let binding = find(&docs, kind, name);
        assert_eq!(binding["roleRef"]["name"], name);
        assert_eq!(binding["subjects"][0]["name"], sa);
        assert_eq!(binding["subjects"][0]["namespace"], "fim-system");
    }
    // Least privilege: no wildcard, no Secrets, nothing but the agents' reports
    // for the agents to write.
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for rule in doc["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                for item in rule[field].as_array().unwrap() {
                    let item = item.as_str().unwrap();
                    assert!(
                        item != "*",
                        "{:?} grants * in {field}",
                        doc["metadata"]["name"]
                    );
                    assert!(
                        item != "secrets",
                        "{:?} grants Secrets",
                        doc["metadata"]["name"]
                    );
                }
            }
        }
    }
    let agent_writes: BTreeSet<String> = find(&docs, "ClusterRole", "fim-kube-fim-agent")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| matches!(v.as_str(), Some("create" | "update" | "patch" | "delete")))
        })
        .flat_map(|r| r["resources"].as_array().unwrap().clone())
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        agent_writes,
        [
            "events",
            "filechanges",
            "filechanges/status",
            "fileintegritynodes",
            "fileintegritynodes/status"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    );

    // Services: the operator's selects the Deployment's pods; the headless one
    // selects the pods of the DaemonSet the operator creates.
    let pod_labels = string_map(&deployment["spec"]["template"]["metadata"]["labels"]);
    let operator_service = find(&docs, "Service", "fim-kube-fim-operator");
    assert!(selects(
        &string_map(&operator_service["spec"]["selector"]),
        &pod_labels
    ));
    assert_eq!(operator_service["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(operator_service["spec"]["ports"][0]["port"], 8080);
    let agent_service = find(&docs, "Service", "fim-kube-fim-agent");
    assert_eq!(agent_service["spec"]["clusterIP"], "None");
    let agent_labels: BTreeMap<String, String> = AGENT_POD_LABELS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(string_map(&agent_service["spec"]["selector"]), agent_labels);
    assert_eq!(agent_service["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(agent_service["spec"]["ports"][0]["port"], 9200);
    // KubeFimAgentDown finds the agents' scrape job by the Service's name.
    let rules = std::fs::read_to_string(chart_dir().join("rules/kube-fim-alerts.yaml")).unwrap();
    assert!(rules.contains(r#"up{job=~".*kube-fim-agent.*"}"#));
    assert!(
        agent_service["metadata"]["name"]
            .as_str()
            .unwrap()
            .contains("kube-fim-agent")
    );
    assert!(
        !selects(&string_map(&agent_service["spec"]["selector"]), &pod_labels),
        "the agent Service must not select the operator"
    );
    // ServiceMonitors select those Services by their labels, on the port named metrics.
    for (monitor, service) in [
        ("fim-kube-fim-operator", operator_service),
        ("fim-kube-fim-agent", agent_service),
    ] {
        let monitor = find(&docs, "ServiceMonitor", monitor);
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
        assert!(selects(
            &string_map(&monitor["spec"]["selector"]["matchLabels"]),
            &string_map(&service["metadata"]["labels"])
        ));
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
        // Agent series carry `node` themselves: a target label of that name
        // would turn theirs into exported_node and break the dashboard.
        assert!(
            !serde_saphyr::to_string(&monitor["spec"])
                .unwrap()
                .contains("targetLabel: node"),
            "a ServiceMonitor sets a node target label"
        );
        assert!(
            monitor["spec"]["jobLabel"].is_null(),
            "the job is the Service's name"
        );
        assert_eq!(
            monitor["spec"]["namespaceSelector"]["matchNames"][0],
            "fim-system"
        );
    }
}

#[test]
fn the_prometheus_rule_and_dashboard_ship_the_tested_files() {
    let docs = template("kube-fim", "kube-fim", ALL_OPTIONS);
    let rule_file = chart_dir().join("rules/kube-fim-alerts.yaml");
    let rules: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&rule_file).unwrap()).unwrap();
    let rule = find(&docs, "PrometheusRule", "kube-fim");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        rule["spec"], rules,
        "the PrometheusRule's spec is not the promtool-tested rule file"
    );
    // And what the PrometheusRule carries is a rule file promtool accepts.
    let dir = tempfile::tempdir().unwrap();
    let extracted = dir.path().join("rules.yaml");
    std::fs::write(&extracted, serde_saphyr::to_string(&rule["spec"]).unwrap()).unwrap();
    let (ok, out) = promtool(&["check", "rules", path_str(&extracted)]);
    assert!(
        ok && out.contains("SUCCESS"),
        "promtool check rules:\n{out}"
    );

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/kube-fim.json")).unwrap(),
    )
    .unwrap();
    let config_map = find(&docs, "ConfigMap", "kube-fim-dashboard");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: serde_json::Value =
        serde_json::from_str(config_map["data"]["kube-fim.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        shipped, dashboard,
        "the ConfigMap does not hold dashboards/kube-fim.json"
    );

    let policy = find(&docs, "FileIntegrityPolicy", "node-baseline");
    assert!(
        policy["metadata"]["namespace"].is_null(),
        "policies are cluster-scoped"
    );
}

/// The dashboard's queries take the alerts' selectors (one source of truth
/// for which series are kube-fim's): every agent and operator series the
/// dashboard reads, in panels and in its variables' `label_values`, carries
/// the matchers the user set, and the JSON stays valid.
#[test]
fn the_dashboard_takes_the_same_selectors_as_the_alerts() {
    let docs = template(
        "kube-fim",
        "kube-fim",
        &[
            "dashboards.enabled=true",
            "metrics.prometheusRule.agentSelector=job=\"fim-agents\"",
            "metrics.prometheusRule.operatorSelector=job=\"fim-operator\"",
        ],
    );
    let config_map = find(&docs, "ConfigMap", "kube-fim-dashboard");
    let text = config_map["data"]["kube-fim.json"].as_str().unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
    let mut queries = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v.as_str()) {
                        ("expr" | "query" | "definition", Some(q)) => out.push(q.to_string()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut queries);
    let mut series = 0;
    for q in &queries {
        for (at, _) in q.match_indices("kube_fim_") {
            let rest = &q[at..];
            let name_end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let want = if rest.starts_with("kube_fim_agent_") {
                "{job=\"fim-agents\""
            } else {
                "{job=\"fim-operator\""
            };
            assert!(
                rest[name_end..].starts_with(want),
                "{} in {q:?} does not carry {want}",
                &rest[..name_end]
            );
            series += 1;
        }
    }
    assert!(series >= 30, "only {series} series found in the dashboard");
    // Without selectors, the dashboard is the file as it is.
    let plain = template("kube-fim", "kube-fim", &["dashboards.enabled=true"]);
    let shipped: serde_json::Value = serde_json::from_str(
        find(&plain, "ConfigMap", "kube-fim-dashboard")["data"]["kube-fim.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/kube-fim.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shipped, file);
}

/// The PrometheusRule's rules by alert name, rendered with `sets` (plus the rule on).
fn rendered_rules(sets: &[&str]) -> (Value, BTreeMap<String, Value>) {
    let mut all = vec!["metrics.prometheusRule.enabled=true"];
    all.extend(sets);
    let docs = template("kube-fim", "kube-fim", &all);
    let spec = find(&docs, "PrometheusRule", "kube-fim")["spec"].clone();
    let mut by_name = BTreeMap::new();
    for group in spec["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap()
                .to_string();
            by_name.insert(name, rule.clone());
        }
    }
    (spec, by_name)
}

/// Writes `spec` as a rule file and a promtool test file beside it; runs
/// `promtool test rules` on the test (which names `rules.yaml`).
fn promtool_test(spec: &Value, test: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_saphyr::to_string(spec).unwrap(),
    )
    .unwrap();
    let (ok, out) = promtool(&["check", "rules", path_str(&dir.path().join("rules.yaml"))]);
    if !ok {
        return (ok, out);
    }
    std::fs::write(dir.path().join("test.yaml"), test).unwrap();
    promtool(&["test", "rules", path_str(&dir.path().join("test.yaml"))])
}

/// A user's selectors, cluster label, runbook links and per-alert changes reach
/// the PrometheusRule, which stays a rule file promtool accepts and whose
/// alerts fire per cluster on the user's jobs.
#[test]
fn alert_rules_take_the_users_selectors_cluster_label_and_changes() {
    let (spec, rules) = rendered_rules(&[
        "metrics.prometheusRule.agentSelector=job=\"fim-agents\"",
        "metrics.prometheusRule.operatorSelector=job=\"fim-operator\"",
        "metrics.prometheusRule.clusterLabel=cluster",
        "metrics.prometheusRule.runbookUrl=https://wiki.example.com/fim",
        "metrics.prometheusRule.alerts.KubeFimChangeStorm.enabled=false",
        "metrics.prometheusRule.alerts.KubeFimAgentDown.for=15m",
        "metrics.prometheusRule.alerts.KubeFimAgentDown.labels.team=infra",
        "metrics.prometheusRule.additionalRules[0].alert=MyFimAlert",
        "metrics.prometheusRule.additionalRules[0].expr=vector(1)",
    ]);
    assert!(!rules.contains_key("KubeFimChangeStorm"), "disabled alert");
    assert!(rules.contains_key("MyFimAlert"), "additional rule");
    let down = &rules["KubeFimAgentDown"];
    assert_eq!(down["for"], "15m");
    assert_eq!(down["labels"]["team"], "infra");
    assert_eq!(down["labels"]["severity"], "warning", "its own labels stay");
    assert_eq!(down["expr"], "up{job=\"fim-agents\"} == 0");
    assert_eq!(
        rules["KubeFimNoLeader"]["annotations"]["runbook_url"],
        "https://wiki.example.com/fim#kubefimnoleader"
    );
    let changed = rules["KubeFimProtectedFileChanged"]["expr"]
        .as_str()
        .unwrap();
    assert!(
        changed.contains(
            "max by (cluster, policy) (kube_fim_operator_policy_unacknowledged_changes{job=\"fim-operator\",})"
        ),
        "{changed}"
    );
    for (name, rule) in &rules {
        let expr = rule["expr"].as_str().unwrap();
        assert!(!expr.contains("kube-fim-agent.*"), "{name}: {expr}");
        assert!(!expr.contains("kube-fim-operator.*"), "{name}: {expr}");
    }

    // Two clusters in one Prometheus: the operator of one leads no more, the
    // other's is fine; an operator scraped by another job is not ours.
    let test = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="fim-operator",cluster="a",instance="1"}'
        values: '1x20'
      - series: 'up{job="fim-operator",cluster="b",instance="1"}'
        values: '1x20'
      - series: 'kube_fim_operator_leader{job="fim-operator",cluster="a",instance="1"}'
        values: '1x2 0x18'
      - series: 'kube_fim_operator_leader{job="fim-operator",cluster="b",instance="1"}'
        values: '1x20'
      - series: 'kube_fim_operator_leader{job="other",cluster="b",instance="1"}'
        values: '0x20'
      - series: 'kube_fim_operator_policy_unacknowledged_changes{job="fim-operator",cluster="b",policy="p"}'
        values: '2x20'
      - series: 'kube_fim_operator_policy_unacknowledged_changes{job="other",cluster="a",policy="p"}'
        values: '2x20'
    alert_rule_test:
      - eval_time: 10m
        alertname: KubeFimNoLeader
        exp_alerts:
          - exp_labels: {severity: critical, cluster: a}
            exp_annotations:
              summary: "No kube-fim operator replica leads"
              description: "Operator replicas are up but none has held the leader Lease for 5 minutes: no policy is reconciled, and the change counts behind KubeFimProtectedFileChanged are not refreshed."
              runbook_url: "https://wiki.example.com/fim#kubefimnoleader"
      - eval_time: 10m
        alertname: KubeFimProtectedFileChanged
        exp_alerts:
          - exp_labels: {severity: critical, cluster: b, policy: p}
            exp_annotations:
              summary: "Monitored files changed under policy p"
              description: "2 change(s) of policy p are not acknowledged. Review them with `kubectl get fc -l fim.kube-fim.io/policy=p` and acknowledge expected ones with `kubectl fim approve`."
              runbook_url: "https://wiki.example.com/fim#kubefimprotectedfilechanged"
"#;
    let (ok, out) = promtool_test(&spec, test);
    assert!(ok, "promtool on the rendered rules:\n{out}");

    // With only a cluster label, the shipped promtool tests (series without
    // that label) still pass on the rendered rules: the aggregations are kept.
    let (spec, _) = rendered_rules(&["metrics.prometheusRule.clusterLabel=cluster"]);
    let tests_dir = chart_dir().join("rules/tests");
    for entry in std::fs::read_dir(&tests_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let text = text.replace("../kube-fim-alerts.yaml", "rules.yaml");
        let (ok, out) = promtool_test(&spec, &text);
        assert!(ok, "shipped tests on rules with a cluster label:\n{out}");
    }

    let run = helm(template_args(
        "kube-fim",
        "kube-fim",
        &[
            "metrics.prometheusRule.enabled=true",
            "metrics.prometheusRule.alerts.KubeFimNoSuchAlert.enabled=false",
        ],
    ));
    assert!(!run.success, "an unknown alert name is refused");
    assert!(run.stderr.contains("KubeFimNoSuchAlert"), "{}", run.stderr);
}

#[test]
fn the_dashboard_has_the_panels_and_variables_a_security_team_expects() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/kube-fim.json")).unwrap(),
    )
    .expect("dashboards/kube-fim.json is JSON");
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for v in ["policy", "node"] {
        assert!(variables.contains(v), "no ${v} variable: {variables:?}");
    }
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<String> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for wanted in [
        "changes in range",
        "by category",
        "by node",
        "by policy",
        "over time",
        "agents reporting",
        "scan duration",
        "errors",
        "queued",
        "by process",
        "by pod",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted:?}: {titles:?}"
        );
    }
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap_or_else(|| {
            panic!("panel {} has no queries", panel["title"]);
        });
        assert!(
            !targets.is_empty(),
            "panel {} has no queries",
            panel["title"]
        );
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            // Changes are per node and policy: filtering must follow the variables.
            if expr.contains("kube_fim_agent_changes_total")
                || expr.contains("kube_fim_agent_attributed_changes_total")
            {
                assert!(
                    expr.contains("node=~\"$node\"") && expr.contains("policy=~\"$policy\""),
                    "{expr} ignores the node or policy variable"
                );
            }
            used.extend(metric_names(expr));
        }
    }
    let unknown: Vec<&String> = used.iter().filter(|m| !is_published(m)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries unknown metrics {unknown:?}"
    );
    for needed in [
        "kube_fim_agent_changes_total",
        "kube_fim_operator_policy_nodes",
        "kube_fim_agent_scan_duration_seconds_bucket",
        "kube_fim_agent_reports_queued",
        "kube_fim_agent_scan_errors_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn alert_rules_use_only_published_metrics_and_cover_each_failure() {
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart_dir().join("rules/kube-fim-alerts.yaml")).unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    let mut alerts = BTreeMap::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            used.extend(metric_names(expr));
            alerts.insert(
                rule["alert"].as_str().unwrap().to_string(),
                metric_names(expr),
            );
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{:?} has no severity",
                rule["alert"]
            );
            assert!(rule["annotations"]["summary"].as_str().is_some());
        }
    }
    let unknown: Vec<&String> = used.iter().filter(|m| !is_published(m)).collect();
    assert!(
        unknown.is_empty(),
        "alert rules query unknown metrics {unknown:?}"
    );
    // One alert for each failure a security team must hear about.
    for metric in [
        "kube_fim_operator_policy_unacknowledged_changes",
        "kube_fim_operator_policy_nodes",
        "kube_fim_agent_scan_errors_total",
        "kube_fim_agent_reports_queued",
        "kube_fim_agent_change_storms_total",
        "kube_fim_agent_baseline_tampered",
        "kube_fim_agent_queue_write_failing",
        "kube_fim_operator_leader",
        "kube_fim_operator_evidence_gaps",
        "kube_fim_operator_change_floods_total",
    ] {
        assert!(
            alerts.values().any(|m| m.contains(metric)),
            "no alert on {metric}: {alerts:?}"
        );
    }
}

#[test]
fn rendered_chart_and_manifests_pass_a_server_side_dry_run() {
    // The dry run needs what a real install has first: the CRDs (the sample
    // policy) and the namespace (manifests/rbac.yaml creates it).
    ensure_crds();
    ensure_rbac();
    let run = helm(template_args(
        "kube-fim",
        "kube-fim",
        &[
            "dashboards.enabled=true",
            "samplePolicy.enabled=true",
            "samplePolicy.recommendedPreset=true",
        ],
    ));
    assert!(run.success, "helm template: {}", run.stderr);
    let dry_run = [
        "apply",
        "--server-side",
        "--dry-run=server",
        "--force-conflicts",
        "--field-manager=kube-fim-chart-check",
    ];
    let mut args = dry_run.to_vec();
    args.extend(["-f", "-"]);
    let applied = kubectl_stdin(&args, &run.stdout);
    assert!(applied.success, "the rendered chart: {}", applied.stderr);
    for object in [
        "deployment.apps/kube-fim-operator",
        "fileintegritypolicy.fim.kube-fim.io/node-baseline",
        "configmap/kube-fim-dashboard",
        "service/kube-fim-agent",
        "pod/kube-fim-test-operator-check",
    ] {
        assert!(
            applied
                .stdout
                .contains(&format!("{object} serverside-applied (server dry run)")),
            "{object} not applied: {}",
            applied.stdout
        );
    }

    let manifests = repo_root().join("manifests");
    for how in ["-f", "-k"] {
        let mut args = dry_run.to_vec();
        args.extend([how, path_str(&manifests)]);
        let applied = kubectl(&args);
        assert!(
            applied.success,
            "kubectl apply {how} manifests/: {}",
            applied.stderr
        );
        for object in [
            "customresourcedefinition.apiextensions.k8s.io/fileintegritypolicies.fim.kube-fim.io",
            "namespace/kube-fim",
            "clusterrole.rbac.authorization.k8s.io/kube-fim-agent",
            "deployment.apps/kube-fim-operator",
            "service/kube-fim-operator",
        ] {
            assert!(
                applied.stdout.contains(object),
                "kubectl apply {how} manifests/ did not apply {object}: {}",
                applied.stdout
            );
        }
    }
}

const RELEASE: &str = "chart-test";
const NAMESPACE: &str = "kube-fim-chart-test";

/// Uninstalls the release and deletes its namespace however the test ends.
/// A namespace where a ResourceQuota allows no `system-node-critical` pod, as
/// GKE has outside `kube-system`.
const QUOTA_NAMESPACE: &str = "kube-fim-chart-test-quota";

/// The agent pod the operator made from `agent.priorityClassName=""` is
/// admitted where a quota refuses `system-node-critical` pods, and the same
/// pod with the default class is refused there (server-side dry runs through
/// the real ResourceQuota admission).
async fn agent_pods_pass_a_quota_on_system_node_critical(ds: &serde_json::Value) {
    let run = kubectl(["create", "namespace", QUOTA_NAMESPACE]);
    assert!(run.success, "{}", run.stderr);
    let run = kubectl([
        "label",
        "namespace",
        QUOTA_NAMESPACE,
        "pod-security.kubernetes.io/enforce=privileged",
    ]);
    assert!(run.success, "{}", run.stderr);
    // The pod runs as the agents' ServiceAccount, which the pod names.
    let sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let run = kubectl(["create", "serviceaccount", sa, "-n", QUOTA_NAMESPACE]);
    assert!(run.success, "{}", run.stderr);
    let quota = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-node-critical", "namespace": QUOTA_NAMESPACE},
        "spec": {
            "hard": {"pods": "0"},
            "scopeSelector": {"matchExpressions": [{
                "scopeName": "PriorityClass",
                "operator": "In",
                "values": ["system-node-critical"]
            }]}
        }
    });
    let run = kubectl_stdin(&["create", "-f", "-"], &quota.to_string());
    assert!(run.success, "{}", run.stderr);
    // Admission enforces a quota once its controller has counted it.
    eventually("the quota's status", Duration::from_secs(60), || async {
        let q = json(&[
            "get",
            "resourcequota",
            "no-node-critical",
            "-n",
            QUOTA_NAMESPACE,
            "-o",
            "json",
        ])?;
        if q["status"]["hard"]["pods"] == "0" {
            Ok(())
        } else {
            Err(format!("not counted yet: {}", q["status"]))
        }
    })
    .await;
    let pod = |class: Option<&str>| {
        let mut spec = ds["spec"]["template"]["spec"].clone();
        spec["nodeName"] = serde_json::json!("some-node");
        if let Some(class) = class {
            spec["priorityClassName"] = serde_json::json!(class);
        }
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "agent-dry-run",
                "namespace": QUOTA_NAMESPACE,
                "labels": ds["spec"]["template"]["metadata"]["labels"],
            },
            "spec": spec,
        });
        kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], &pod.to_string())
    };
    let run = pod(None);
    assert!(run.success, "the agent pod without a class: {}", run.stderr);
    let run = pod(Some("system-node-critical"));
    assert!(
        !run.success && run.stderr.contains("quota"),
        "a system-node-critical agent pod passed the quota: {}{}",
        run.stdout,
        run.stderr
    );
}

struct Release;

impl Release {
    fn clean() {
        let _ = kubectl([
            "delete",
            "namespace",
            QUOTA_NAMESPACE,
            "--ignore-not-found",
            "--timeout=60s",
        ]);
        let _ = helm([
            "uninstall",
            RELEASE,
            "-n",
            NAMESPACE,
            "--wait",
            "--timeout=60s",
        ]);
        let _ = kubectl([
            "delete",
            "namespace",
            NAMESPACE,
            "--ignore-not-found",
            "--timeout=60s",
        ]);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        Self::clean();
    }
}

fn can_i(sa: &str, verb: &str, resource: &str, namespace: &str) -> bool {
    let run = kubectl([
        "auth",
        "can-i",
        verb,
        resource,
        "-n",
        namespace,
        &format!("--as=system:serviceaccount:{NAMESPACE}:{sa}"),
    ]);
    run.stdout.trim() == "yes"
}

fn json(args: &[&str]) -> Result<serde_json::Value, String> {
    let run = kubectl(args);
    if !run.success {
        return Err(run.stderr);
    }
    serde_json::from_str(&run.stdout).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_runs_the_operator_with_the_charts_identity_and_flags() {
    // The suite installs the CRDs from crds/ (server-side apply, one field
    // manager) before any test uses them; helm would skip CRDs that already
    // exist anyway, and leave them behind at uninstall. --skip-crds keeps the
    // CRDs the suite's, whichever test runs first.
    ensure_crds();
    Release::clean();
    let _release = Release;
    // The restricted Pod Security level: the operator's pods must meet it.
    let run = kubectl(["create", "namespace", NAMESPACE]);
    assert!(run.success, "{}", run.stderr);
    let run = kubectl([
        "label",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    assert!(run.success, "{}", run.stderr);

    let policy = format!("chart-test-{}", std::process::id());
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let install = helm([
        "install",
        RELEASE,
        path_str(&chart_dir()),
        "--namespace",
        NAMESPACE,
        "--skip-crds",
        "--set",
        "samplePolicy.enabled=true",
        "--set",
        &format!("samplePolicy.name={policy}"),
        "--set",
        "dashboards.enabled=true",
        "--set",
        "agent.image.tag=e2e",
        // A cluster that keeps system-node-critical to kube-system: no class.
        "--set",
        "agent.priorityClassName=",
        "--set",
        "agent.imagePullSecrets[0].name=regcred",
        "--set",
        "agent.podLabels.team=platform",
        "--set",
        "agent.maxUnavailable=2",
        // Only the sample policy (labelled with the release) is this operator's:
        // the other tests' policies are not.
        "--set-string",
        &format!("operator.policySelector={selector}"),
    ]);
    assert!(
        install.success,
        "helm install: {}{}",
        install.stdout, install.stderr
    );
    assert!(
        install.stdout.contains("STATUS: deployed"),
        "{}",
        install.stdout
    );
    assert!(
        install.stdout.contains("kubectl get fc"),
        "NOTES.txt says what to run next: {}",
        install.stdout
    );
    // The namespace is restricted: NOTES warns that agents will be refused.
    assert!(
        install
            .stdout
            .contains("pod-security.kubernetes.io/enforce=privileged")
    );

    let prefix = format!("{RELEASE}-kube-fim");
    for (kind, name) in [
        ("serviceaccount", format!("{prefix}-operator")),
        ("serviceaccount", format!("{prefix}-agent")),
        ("role", format!("{prefix}-operator")),
        ("rolebinding", format!("{prefix}-operator")),
        ("service", format!("{prefix}-operator")),
        ("service", format!("{prefix}-agent")),
        ("configmap", format!("{prefix}-dashboard")),
        ("poddisruptionbudget", format!("{prefix}-operator")),
        ("clusterrole", format!("{prefix}-operator")),
        ("clusterrole", format!("{prefix}-agent")),
        ("clusterrolebinding", format!("{prefix}-operator")),
        ("clusterrolebinding", format!("{prefix}-agent")),
        ("clusterrole", format!("{prefix}-approver")),
        ("clusterrole", format!("{prefix}-viewer")),
        (
            "validatingadmissionpolicy",
            format!("{prefix}-agent-node-bound"),
        ),
        (
            "validatingadmissionpolicybinding",
            format!("{prefix}-approval"),
        ),
        (
            "validatingadmissionpolicybinding",
            format!("{prefix}-evidence"),
        ),
        ("flowschema", format!("{prefix}-agents")),
        ("prioritylevelconfiguration", format!("{prefix}-agents")),
    ] {
        let run = kubectl(["get", kind, &name, "-n", NAMESPACE]);
        assert!(run.success, "{kind}/{name}: {}", run.stderr);
    }
    let run = kubectl(["get", "fip", &policy]);
    assert!(run.success, "the sample policy: {}", run.stderr);

    // The Deployment's pods pass admission (restricted Pod Security) and exist.
    let deployment = format!("{prefix}-operator");
    let pods: u64 = eventually(
        "the operator ReplicaSet to create both pods",
        Duration::from_secs(60),
        || async {
            let rs = json(&[
                "get",
                "replicasets",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=operator",
                "-o",
                "json",
            ])?;
            let pods = json(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=operator",
                "-o",
                "json",
            ])?;
            let n = pods["items"].as_array().map_or(0, |a| a.len()) as u64;
            if n == 2 {
                Ok(n)
            } else {
                Err(format!(
                    "{n} pods; ReplicaSet conditions {}",
                    rs["items"][0]["status"]["conditions"]
                ))
            }
        },
    )
    .await;
    assert_eq!(pods, 2);

    // RBAC as installed: the operator manages DaemonSets and Leases in its
    // namespace only; neither identity reads Secrets; agents report, never delete.
    let operator_sa = format!("{prefix}-operator");
    let agent_sa = format!("{prefix}-agent");
    assert!(can_i(&operator_sa, "create", "daemonsets.apps", NAMESPACE));
    assert!(can_i(
        &operator_sa,
        "update",
        "leases.coordination.k8s.io",
        NAMESPACE
    ));
    assert!(!can_i(&operator_sa, "create", "daemonsets.apps", "default"));
    assert!(can_i(
        &operator_sa,
        "delete",
        "filechanges.fim.kube-fim.io",
        NAMESPACE
    ));
    assert!(!can_i(&operator_sa, "get", "secrets", NAMESPACE));
    assert!(can_i(
        &agent_sa,
        "create",
        "filechanges.fim.kube-fim.io",
        NAMESPACE
    ));
    assert!(!can_i(
        &agent_sa,
        "delete",
        "filechanges.fim.kube-fim.io",
        NAMESPACE
    ));
    assert!(!can_i(
        &agent_sa,
        "update",
        "fileintegritypolicies.fim.kube-fim.io",
        NAMESPACE
    ));
    assert!(!can_i(&agent_sa, "get", "secrets", NAMESPACE));

    // No kubelet runs the pods here, so run the real operator as the pod would:
    // the installed Deployment's arguments, the chart's ServiceAccount, and the
    // namespace and name the downward API would give it.
    let installed = json(&[
        "get",
        "deployment",
        &deployment,
        "-n",
        NAMESPACE,
        "-o",
        "json",
    ])
    .unwrap();
    let port = free_port();
    let mut args: Vec<String> = installed["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .filter(|a| !a.starts_with("--metrics-addr="))
        .collect();
    args.push(format!("--metrics-addr=127.0.0.1:{port}"));
    args.push(format!("--namespace={NAMESPACE}"));
    args.push(format!("--identity={deployment}-e2e"));
    let mut operator = Process::start(
        "chart-operator",
        &binary("kube-fim-operator"),
        &args,
        &service_account_kubeconfig_in(NAMESPACE, &operator_sa),
    );

    let daemonset = format!("{prefix}-agent");
    let ds = eventually(
        "the operator to create the agent DaemonSet",
        Duration::from_secs(60),
        || {
            let running = operator.running();
            let daemonset = daemonset.clone();
            async move {
                if !running {
                    return Err("the operator exited".to_string());
                }
                json(&[
                    "get",
                    "daemonset",
                    &daemonset,
                    "-n",
                    NAMESPACE,
                    "-o",
                    "json",
                ])
            }
        },
    )
    .await;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], agent_sa.as_str());
    assert_eq!(
        pod["containers"][0]["image"],
        "ghcr.io/kube-fim/kube-fim-agent:e2e"
    );
    assert_eq!(pod["containers"][0]["ports"][0]["containerPort"], 9101);
    assert!(
        pod.get("priorityClassName").is_none(),
        "agent.priorityClassName=\"\" leaves the class out: {pod}"
    );
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["team"],
        "platform"
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        2
    );
    // The headless Service selects the agents the operator really runs.
    let service = json(&["get", "service", &daemonset, "-n", NAMESPACE, "-o", "json"]).unwrap();
    let selector = service["spec"]["selector"].as_object().unwrap();
    let labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "agent pods lack the Service's label {k}"
        );
    }
    agent_pods_pass_a_quota_on_system_node_critical(&ds).await;
    let lease = json(&["get", "lease", &deployment, "-n", NAMESPACE, "-o", "json"]).unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"],
        format!("{deployment}-e2e").as_str()
    );
    let leader = eventually(
        "the operator's leader gauge",
        Duration::from_secs(20),
        || async {
            http_get(port, "/metrics")
                .and_then(|m| metric(&m, "kube_fim_operator_leader"))
                .ok_or_else(|| "no kube_fim_operator_leader".to_string())
        },
    )
    .await;
    assert_eq!(leader, 1.0);

    // Uninstall as NOTES.txt says: policies first, so that the operator, still
    // running with its RBAC, removes the agent DaemonSet it made (Helm does not
    // own it, and would delete the operator's Role along with the policy).
    let run = kubectl(["delete", "fip", &policy]);
    assert!(run.success, "{}", run.stderr);
    eventually(
        "the agent DaemonSet to go with the last policy",
        Duration::from_secs(60),
        || {
            let daemonset = daemonset.clone();
            async move {
                let run = kubectl(["get", "daemonset", &daemonset, "-n", NAMESPACE]);
                if run.success {
                    Err("still there".to_string())
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
    operator.kill();
    let run = helm([
        "uninstall",
        RELEASE,
        "-n",
        NAMESPACE,
        "--wait",
        "--timeout=60s",
    ]);
    assert!(run.success, "helm uninstall: {}", run.stderr);
    for kind in ["clusterrole", "clusterrolebinding"] {
        let run = kubectl(["get", kind, &format!("{prefix}-operator")]);
        assert!(
            !run.success,
            "{kind} {prefix}-operator survived helm uninstall"
        );
    }
}

/// The values of `KEY` instructions (`FROM`, `USER`, ...) of a Dockerfile.
fn instructions<'a>(dockerfile: &'a str, key: &str) -> Vec<&'a str> {
    dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(str::trim)
        .collect()
}

#[test]
fn dockerfiles_build_the_workspace_binaries_into_the_images_the_chart_runs() {
    let root = repo_root();
    let docs = template("kube-fim", "kube-fim", &[]);
    let pod = &find(&docs, "Deployment", "kube-fim-operator")["spec"]["template"]["spec"];
    for (file, bin, package, user) in [
        (
            "operator/Dockerfile",
            "kube-fim-operator",
            "operator/Cargo.toml",
            Some("65532:65532"),
        ),
        (
            "node-agent/Dockerfile",
            "kube-fim-agent",
            "node-agent/Cargo.toml",
            None,
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let manifest = std::fs::read_to_string(root.join(package)).unwrap();
        assert!(
            manifest.contains(&format!("name = \"{bin}\"")),
            "{package} has no binary {bin}"
        );
        // Multi-stage: a Rust builder, then a static runtime image without a shell.
        let from = instructions(&text, "FROM");
        assert_eq!(
            from.len(),
            2,
            "{file}: builder and runtime stages: {from:?}"
        );
        assert!(
            from[0].contains("rust:") && from[0].ends_with("AS builder"),
            "{file}: {from:?}"
        );
        assert!(
            from[1].starts_with("gcr.io/distroless/static"),
            "{file}: {from:?}"
        );
        assert!(
            text.contains("unknown-linux-musl"),
            "{file}: not a static build"
        );
        assert!(
            text.contains(&format!("--bin {bin}")),
            "{file} does not build {bin}"
        );
        assert!(
            text.contains("--locked"),
            "{file}: builds must use Cargo.lock"
        );
        assert_eq!(
            instructions(&text, "ENTRYPOINT"),
            vec![format!("[\"/usr/local/bin/{bin}\"]").as_str()],
            "{file}: the pods pass arguments only, so the entrypoint is the binary"
        );
        assert_eq!(
            instructions(&text, "USER"),
            user.into_iter().collect::<Vec<_>>()
        );
        // The Rust version of the builder is the workspace's rust-version.
        let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let msrv = workspace
            .lines()
            .find_map(|l| l.strip_prefix("rust-version = "))
            .unwrap()
            .trim_matches('"');
        assert!(
            text.contains(&format!("ARG RUST_VERSION={msrv}")),
            "{file}: builder Rust is not the workspace's rust-version {msrv}"
        );
    }
    // The operator image's user is the one the chart runs it as.
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsGroup"], 65532);
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        ".dockerignore must keep target/ out"
    );
}

/// The group of the upgrade test's copy of the chart: its own CRDs (kinds,
/// plurals and short names prefixed with `u`), admission policies and labels,
/// which no other test (nor the suite's CRDs, nor `kubectl get fc`) meets.
const UPGRADE_GROUP: &str = "fim-upgrade.kube-fim.io";
const UPGRADE_RELEASE: &str = "fim-upgrade";
const UPGRADE_NAMESPACE: &str = "kube-fim-upgrade-test";

/// Copies the chart into `to`, with the API group renamed to [`UPGRADE_GROUP`],
/// the resources renamed by [`upgrade_names`], and `edit` applied to each CRD
/// file (by file name).
fn chart_copy(to: &Path, edit: &dyn Fn(&str, String) -> String) {
    fn copy(from: &Path, to: &Path, crds: bool, edit: &dyn Fn(&str, String) -> String) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &to.join(&name), name == "crds", edit);
                continue;
            }
            let text = upgrade_names(&std::fs::read_to_string(entry.path()).unwrap());
            let text = if crds {
                // Short names and the category are unique in a cluster.
                let text = text
                    .lines()
                    .map(|l| match l.trim() {
                        "- fip" | "- fc" | "- fin" | "- fim" | "- fcs" => l.replace("- ", "- u"),
                        _ => l.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n";
                edit(&name, text)
            } else {
                text
            };
            std::fs::write(to.join(&name), text).unwrap();
        }
    }
    copy(&chart_dir(), to, false, edit);
}

/// The upgrade test's names for the group, kinds and resources in `text`.
fn upgrade_names(text: &str) -> String {
    text.replace("fim.kube-fim.io", UPGRADE_GROUP)
        .replace("filechange", "ufilechange")
        .replace("fileintegrity", "ufileintegrity")
        .replace("FileChange", "UFileChange")
        .replace("FileIntegrity", "UFileIntegrity")
}

/// The FileChange CRD as an older chart had it: without the selectable
/// fields the agent's `spec.node` watch needs.
fn without_selectable_fields(name: &str, text: String) -> String {
    if !name.ends_with("_filechanges.yaml") {
        return text;
    }
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.trim() == "selectableFields:" {
            skipping = true;
            continue;
        }
        if skipping && line.trim_start().starts_with("- jsonPath: ") {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    assert_ne!(
        out, text,
        "the FileChange CRD had selectable fields to remove"
    );
    out
}

struct UpgradeRelease;

impl UpgradeRelease {
    fn clean() {
        let _ = helm([
            "uninstall",
            UPGRADE_RELEASE,
            "-n",
            UPGRADE_NAMESPACE,
            "--wait",
            "--timeout=60s",
        ]);
        let _ = kubectl([
            "delete",
            "namespace",
            UPGRADE_NAMESPACE,
            "--ignore-not-found",
            "--timeout=60s",
        ]);
        for plural in [
            "ufilechanges",
            "ufileintegritypolicies",
            "ufileintegritynodes",
        ] {
            let _ = kubectl([
                "delete",
                "crd",
                &format!("{plural}.{UPGRADE_GROUP}"),
                "--ignore-not-found",
                "--timeout=60s",
            ]);
        }
    }
}

impl Drop for UpgradeRelease {
    fn drop(&mut self) {
        Self::clean();
    }
}

fn kubectl_ok(args: &[&str]) -> String {
    let run = kubectl(args);
    assert!(run.success, "kubectl {args:?}: {}", run.stderr);
    run.stdout
}

/// The FileChanges of the upgrade group, by name, as JSON (spec and status).
fn upgrade_changes() -> BTreeMap<String, serde_json::Value> {
    let list = json(&[
        "get",
        &format!("ufilechanges.{UPGRADE_GROUP}"),
        "-o",
        "json",
    ])
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["metadata"]["name"].as_str().unwrap().to_string(),
                serde_json::json!({"spec": c["spec"], "status": c["status"]}),
            )
        })
        .collect()
}

/// `helm upgrade` never touches the CRDs of a chart's `crds/`; the README's
/// upgrade step (apply the new CRDs server-side, then `helm upgrade`) does,
/// on the real API server with the real Helm: the new CRD is served (a field
/// selector only it allows works), every object and approval is kept, the new
/// values reach the operator, and the release carries its `helm test` hook.
#[test]
fn helm_upgrade_updates_crds_by_the_documented_step_and_loses_nothing() {
    UpgradeRelease::clean();
    let _release = UpgradeRelease;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    chart_copy(&old, &without_selectable_fields);
    chart_copy(&new, &|_, text| text);
    let crd = format!("ufilechanges.{UPGRADE_GROUP}");
    let has_selectable_fields = || {
        let crd = json(&["get", "crd", &crd, "-o", "json"]).unwrap();
        !crd["spec"]["versions"][0]["selectableFields"].is_null()
    };

    kubectl_ok(&["create", "namespace", UPGRADE_NAMESPACE]);
    let install = helm([
        "install",
        UPGRADE_RELEASE,
        path_str(&old),
        "--namespace",
        UPGRADE_NAMESPACE,
    ]);
    assert!(install.success, "helm install: {}", install.stderr);
    for plural in [
        "ufilechanges",
        "ufileintegritypolicies",
        "ufileintegritynodes",
    ] {
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{plural}.{UPGRADE_GROUP}"),
            "--timeout=60s",
        ]);
    }
    assert!(!has_selectable_fields(), "the old chart's CRD");

    // Records made under the old chart: two changes, one of them approved.
    for (name, node) in [("upgrade-a", "node-a"), ("upgrade-b", "node-b")] {
        let fc = kube_fim_e2e::ChangeFixture::new(name, node, "baseline").build();
        let text = upgrade_names(&serde_json::to_string(&fc).unwrap());
        let run = kube_fim_e2e::kubectl_stdin(&["create", "-f", "-"], &text);
        assert!(run.success, "creating {name}: {}", run.stderr);
    }
    let me = kubectl_ok(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    let approval = serde_json::json!({"status": {"approval": {
        "approvedBy": me.trim(),
        "approvedAt": "2026-01-01T00:00:00Z",
        "reason": "before the upgrade"
    }}});
    kubectl_ok(&[
        "patch",
        &crd,
        "upgrade-a",
        "--subresource=status",
        "--type=merge",
        "-p",
        &approval.to_string(),
    ]);
    let before = upgrade_changes();
    assert_eq!(before.len(), 2);
    assert_eq!(
        before["upgrade-a"]["status"]["approval"]["reason"],
        "before the upgrade"
    );
    let by_node = || {
        kubectl([
            "get",
            &crd,
            "--field-selector=spec.node=node-a",
            "-o",
            "name",
        ])
    };
    assert!(
        !by_node().success,
        "the old CRD has no spec.node selectable field"
    );

    // The pitfall: `helm upgrade` alone leaves the CRD as it was.
    let upgrade = |values: &str| {
        let run = helm([
            "upgrade",
            UPGRADE_RELEASE,
            path_str(&new),
            "--namespace",
            UPGRADE_NAMESPACE,
            "--reset-then-reuse-values",
            "--set",
            values,
        ]);
        assert!(run.success, "helm upgrade: {}", run.stderr);
    };
    upgrade("agent.logLevel=debug");
    assert!(!has_selectable_fields(), "helm upgrade changed a crds/ CRD");

    // The README's step: the new chart's CRDs, server-side, then the upgrade.
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        path_str(&new.join("crds")),
    ]);
    upgrade("agent.logFormat=json");
    assert!(
        has_selectable_fields(),
        "the documented step updates the CRD"
    );
    let selected = eventually_sync(|| {
        let run = by_node();
        run.success.then_some(run.stdout)
    });
    assert_eq!(
        selected.trim(),
        format!("ufilechange.{UPGRADE_GROUP}/upgrade-a")
    );
    assert_eq!(upgrade_changes(), before, "every record and approval kept");
    let stored = json(&["get", "crd", &crd, "-o", "json"]).unwrap();
    assert_eq!(
        stored["status"]["storedVersions"],
        serde_json::json!(["v1alpha1"])
    );

    // Both upgrades' values reached the operator; three revisions, deployed.
    let deployment = json(&[
        "get",
        "deployment",
        &format!("{UPGRADE_RELEASE}-kube-fim-operator"),
        "-n",
        UPGRADE_NAMESPACE,
        "-o",
        "json",
    ])
    .unwrap();
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--agent-log-level=debug"), "{args}");
    assert!(args.contains("--agent-log-format=json"), "{args}");
    let status = helm(["status", UPGRADE_RELEASE, "-n", UPGRADE_NAMESPACE]);
    assert!(
        status.stdout.contains("STATUS: deployed"),
        "{}",
        status.stdout
    );
    assert!(status.stdout.contains("REVISION: 3"), "{}", status.stdout);
    // `helm test` has its hook (running it needs a kubelet: the real-node tier).
    let hooks = helm(["get", "hooks", UPGRADE_RELEASE, "-n", UPGRADE_NAMESPACE]);
    assert!(hooks.success, "{}", hooks.stderr);
    assert!(
        hooks.stdout.contains("helm.sh/hook: test")
            && hooks
                .stdout
                .contains("- /usr/local/bin/kube-fim-operator\n        - check\n")
            && hooks.stdout.contains("_SERVICE_PORT_METRICS)/metrics"),
        "{}",
        hooks.stdout
    );
}

/// Polls `check` for up to 30 s (a new CRD schema is served within moments).
fn eventually_sync<T>(check: impl Fn() -> Option<T>) -> T {
    for _ in 0..60 {
        if let Some(v) = check() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("not within 30 s")
}
