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
use serde::Deserialize;
use serde_yaml::Value;

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
    "kube_fim_operator_leader",
    "kube_fim_operator_policy_nodes",
    "kube_fim_operator_policy_files_monitored",
    "kube_fim_operator_policy_unacknowledged_changes",
    "kube_fim_operator_policy_changes_last_24h",
    "kube_fim_operator_policy_condition",
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
    "kube_fim_agent_baseline_tampered",
    "kube_fim_agent_queue_write_failing",
    "kube_fim_agent_attribution_active",
    "kube_fim_agent_attribution_unavailable",
    "kube_fim_agent_fanotify_directories",
    "kube_fim_agent_fanotify_overflows_total",
    "kube_fim_agent_attributed_changes_total",
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
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("helm renders YAML"))
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
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().expect("string key").to_string(),
                        v.as_str().expect("string value").to_string(),
                    )
                })
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

#[test]
fn default_values_render_only_the_core_objects() {
    let docs = template("kube-fim", "kube-fim", &[]);
    let expected: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "FlowSchema",
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
    let containers = pod["containers"].as_sequence().unwrap();
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
        .as_sequence()
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
        .as_sequence()
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
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|r| r["resources"].as_sequence().unwrap())
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
        for rule in doc["rules"].as_sequence().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                for item in rule[field].as_sequence().unwrap() {
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
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| {
            r["verbs"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| matches!(v.as_str(), Some("create" | "update" | "patch" | "delete")))
        })
        .flat_map(|r| r["resources"].as_sequence().unwrap().clone())
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
            !serde_yaml::to_string(&monitor["spec"])
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
    let rules: Value = serde_yaml::from_str(&std::fs::read_to_string(&rule_file).unwrap()).unwrap();
    let rule = find(&docs, "PrometheusRule", "kube-fim");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        rule["spec"], rules,
        "the PrometheusRule's spec is not the promtool-tested rule file"
    );
    // And what the PrometheusRule carries is a rule file promtool accepts.
    let dir = tempfile::tempdir().unwrap();
    let extracted = dir.path().join("rules.yaml");
    std::fs::write(&extracted, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
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
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("rules/kube-fim-alerts.yaml")).unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    let mut alerts = BTreeMap::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
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
struct Release;

impl Release {
    fn clean() {
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
