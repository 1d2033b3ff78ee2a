//! The one agent DaemonSet: scheduled on the union of the policies' node
//! selections, with the least privilege that lets an agent read the host.
//!
//! One agent per node whatever the number of policies: a per-policy DaemonSet
//! would run two agents on a node two policies select, hashing and watching the
//! same files twice. Every agent serves every policy that selects its node.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, LocalObjectReference, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube_fim_crds::labels::{MANAGED_BY, MANAGED_BY_VALUE};
use kube_fim_crds::{FileIntegrityPolicy, Fingerprint};

use crate::config::{Config, MaxUnavailable};

/// Label naming the component on every object the operator creates.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label naming the application.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Where the host's `/` is mounted in the agent container.
pub const HOST_ROOT: &str = "/host";
/// Where an agent finds the node's CRI socket (container drift only).
pub const CRI_SOCKET: &str = "/run/kube-fim/cri.sock";

/// Capabilities of the agent container, with why each one is there. Everything
/// else is dropped; the container is not privileged.
pub fn agent_capabilities(process_attribution: bool) -> Vec<(&'static str, &'static str)> {
    let mut caps = vec![(
        "DAC_READ_SEARCH",
        "read and list every monitored file and directory whatever its mode (/etc/shadow is 0640 root:shadow); grants no write access",
    )];
    if process_attribution {
        caps.push((
            "SYS_ADMIN",
            "fanotify marks on the host's mounts, the only kernel interface that names the process behind a file change",
        ));
        caps.push((
            "SYS_PTRACE",
            "read /proc/<pid>/exe and status of other users' processes to name the command and user behind a change",
        ));
    }
    caps
}

/// The node affinity that schedules agents on the union of the policies' node
/// selections (terms are ORed), or `None` when some policy selects every node.
pub fn union_affinity(policies: &[&FileIntegrityPolicy]) -> Option<Affinity> {
    let mut terms: Vec<NodeSelectorTerm> = Vec::new();
    for policy in policies {
        if policy.spec.node_selector.is_empty() {
            return None;
        }
        let term = NodeSelectorTerm {
            match_expressions: Some(
                policy
                    .spec
                    .node_selector
                    .iter()
                    .map(|(k, v)| NodeSelectorRequirement {
                        key: k.clone(),
                        operator: "In".into(),
                        values: Some(vec![v.clone()]),
                    })
                    .collect(),
            ),
            match_fields: None,
        };
        if !terms.contains(&term) {
            terms.push(term);
        }
    }
    if terms.is_empty() {
        return None;
    }
    Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: terms,
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    })
}

/// The agent runs through cordon and every node-condition taint (a node in
/// trouble is when an attacker acts): tolerated explicitly, whatever the
/// DaemonSet controller adds by itself.
pub fn node_condition_tolerations() -> Vec<Toleration> {
    kube_fim_crds::selection::NODE_CONDITION_TAINTS
        .iter()
        .map(|key| Toleration {
            key: Some((*key).to_string()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        })
        .collect()
}

/// Every toleration any policy has, once each, in a stable order.
pub fn merged_tolerations(policies: &[&FileIntegrityPolicy]) -> Vec<Toleration> {
    let mut out: Vec<Toleration> = Vec::new();
    for policy in policies {
        for t in &policy.spec.tolerations {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
    }
    out.sort_by_key(|t| {
        (
            t.key.clone(),
            t.operator.clone(),
            t.value.clone(),
            t.effect.clone(),
        )
    });
    out
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), "kube-fim".to_string()),
        (COMPONENT_LABEL.to_string(), "agent".to_string()),
    ])
}

fn http_probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The agent DaemonSet for the given (valid, served) policies, or `None` when
/// there are none: no policy, no agents. Policies are taken in name order so the
/// same set always yields the same pod template (no needless rollouts).
///
/// `fingerprints`, what the sinks ask for besides BLAKE3, become the agents'
/// `--fingerprints` (a change of them rolls the agents out once).
pub fn desired_daemonset(
    config: &Config,
    policies: &[&FileIntegrityPolicy],
    fingerprints: &[Fingerprint],
) -> Option<DaemonSet> {
    if policies.is_empty() {
        return None;
    }
    let mut policies = policies.to_vec();
    policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let process_attribution = policies.iter().any(|p| p.spec.process_attribution);
    // The runtime's socket only for container drift: CRI has no read-only
    // mode (a read-only mount does not stop a connect), so no agent has it
    // unless a policy needs it.
    let cri_socket = Some(config.agent_cri_socket.clone())
        .filter(|s| !s.is_empty() && policies.iter().any(|p| p.spec.containers.is_some()));

    let mut args = vec![
        format!("--log-format={}", config.agent_log_format),
        "run".to_string(),
        "--node-name=$(NODE_NAME)".to_string(),
        format!("--root={HOST_ROOT}"),
        format!("--state={}", config.agent_state_dir),
        format!("--metrics-addr=0.0.0.0:{}", config.agent_metrics_port),
    ];
    if let Some(selector) = &config.policy_selector {
        args.push(format!("--policy-selector={selector}"));
    }
    if config.agent_host_root != "/" {
        // Container layers are named by host paths: the agent reads them
        // inside its root, which is this directory of the host.
        args.push(format!("--host-root-path={}", config.agent_host_root));
    }
    if config.agent_threads > 0 {
        args.push(format!("--threads={}", config.agent_threads));
    }
    if cri_socket.is_some() {
        args.push(format!("--cri-socket={CRI_SOCKET}"));
    }
    if !fingerprints.is_empty() {
        let names: Vec<&str> = fingerprints.iter().map(|f| f.as_str()).collect();
        args.push(format!("--fingerprints={}", names.join(",")));
    }

    let mut limits = BTreeMap::from([(
        "memory".to_string(),
        Quantity(config.agent_resources.memory_limit.clone()),
    )]);
    if let Some(cpu) = &config.agent_resources.cpu_limit {
        limits.insert("cpu".into(), Quantity(cpu.clone()));
    }

    let container = Container {
        name: "agent".into(),
        image: Some(config.agent_image.clone()),
        image_pull_policy: Some(config.agent_image_pull_policy.clone()),
        args: Some(args),
        env: Some(vec![
            EnvVar {
                name: "NODE_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "spec.nodeName".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some(config.agent_log_level.clone()),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: config.agent_metrics_port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                (
                    "cpu".to_string(),
                    Quantity(config.agent_resources.cpu_request.clone()),
                ),
                (
                    "memory".to_string(),
                    Quantity(config.agent_resources.memory_request.clone()),
                ),
            ])),
            limits: Some(limits),
            ..ResourceRequirements::default()
        }),
        liveness_probe: Some(http_probe("/healthz", config.agent_metrics_port, 20)),
        readiness_probe: Some(http_probe("/readyz", config.agent_metrics_port, 10)),
        security_context: Some(SecurityContext {
            // Root, to open files owned by root; the capability set below, not
            // `privileged`, bounds what root may do.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(
                    agent_capabilities(process_attribution)
                        .into_iter()
                        .map(|(c, _)| c.to_string())
                        .collect(),
                ),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some({
            let mut mounts = vec![
                VolumeMount {
                    name: "host".into(),
                    mount_path: HOST_ROOT.into(),
                    read_only: Some(true),
                    // Submounts of the host (/boot, /var/lib/kubelet...) read-only too
                    // where the kernel supports it (Linux 5.12+).
                    recursive_read_only: Some("IfPossible".into()),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "state".into(),
                    mount_path: config.agent_state_dir.clone(),
                    ..VolumeMount::default()
                },
            ];
            if cri_socket.is_some() {
                mounts.push(VolumeMount {
                    name: "cri".into(),
                    mount_path: CRI_SOCKET.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
            }
            mounts
        }),
        ..Container::default()
    };

    // The operator's own annotations and labels come last: they win.
    let mut template_annotations: BTreeMap<String, String> =
        config.agent_pod_annotations.iter().cloned().collect();
    template_annotations.extend([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        (
            "prometheus.io/port".to_string(),
            config.agent_metrics_port.to_string(),
        ),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);

    let pod = PodSpec {
        service_account_name: Some(config.agent_service_account.clone()),
        containers: vec![container],
        affinity: union_affinity(&policies),
        tolerations: {
            let mut t = node_condition_tolerations();
            t.extend(merged_tolerations(&policies));
            Some(t)
        },
        host_pid: process_attribution.then_some(true),
        priority_class_name: Some(config.agent_priority_class_name.clone())
            .filter(|c| !c.is_empty()),
        // Agents are Linux binaries; a policy selecting every node must not put
        // one on a Windows node, where it would never start.
        node_selector: Some(BTreeMap::from([(
            "kubernetes.io/os".to_string(),
            "linux".to_string(),
        )])),
        image_pull_secrets: (!config.agent_image_pull_secrets.is_empty()).then(|| {
            config
                .agent_image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        termination_grace_period_seconds: Some(30),
        volumes: Some({
            let mut volumes = vec![
                Volume {
                    name: "host".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: config.agent_host_root.clone(),
                        type_: Some("Directory".into()),
                    }),
                    ..Volume::default()
                },
                Volume {
                    name: "state".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: config.agent_state_dir.clone(),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    ..Volume::default()
                },
            ];
            if let Some(socket) = &cri_socket {
                volumes.push(Volume {
                    name: "cri".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: socket.clone(),
                        type_: Some("Socket".into()),
                    }),
                    ..Volume::default()
                });
            }
            volumes
        }),
        ..PodSpec::default()
    };

    let mut meta_labels = labels();
    meta_labels.insert(MANAGED_BY.into(), MANAGED_BY_VALUE.into());
    // Every served policy owns the DaemonSet: when the last one is deleted the
    // garbage collector removes the agents even if the operator is gone.
    let owners: Vec<OwnerReference> = policies
        .iter()
        .filter_map(|p| {
            Some(OwnerReference {
                api_version: FileIntegrityPolicy::api_version(&()).into_owned(),
                kind: FileIntegrityPolicy::kind(&()).into_owned(),
                name: p.metadata.name.clone()?,
                uid: p.metadata.uid.clone()?,
                ..OwnerReference::default()
            })
        })
        .collect();
    Some(DaemonSet {
        metadata: ObjectMeta {
            name: Some(config.daemonset_name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(meta_labels),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some({
                        let mut l: BTreeMap<String, String> =
                            config.agent_pod_labels.iter().cloned().collect();
                        l.extend(labels());
                        l
                    }),
                    annotations: Some(template_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(match &config.agent_max_unavailable {
                        MaxUnavailable::Count(n) => IntOrString::Int(*n),
                        MaxUnavailable::Percent(p) => IntOrString::String(p.clone()),
                    }),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            ..DaemonSetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use kube_fim_crds::{FileIntegrityPolicySpec, MonitoredPath};

    fn policy(name: &str, selector: &[(&str, &str)]) -> FileIntegrityPolicy {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
            name: "passwd".into(),
            path: "/etc/passwd".into(),
            ..MonitoredPath::default()
        }]);
        spec.node_selector = selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        FileIntegrityPolicy::new(name, spec)
    }

    fn terms(ds: &DaemonSet) -> Vec<NodeSelectorTerm> {
        ds.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|s| s.node_selector_terms.clone())
            .unwrap_or_default()
    }

    #[test]
    fn agents_hash_on_the_threads_configured_or_their_cpu_budget() {
        let a = policy("a", &[]);
        let args = |c: &Config| {
            desired_daemonset(c, &[&a], &[])
                .unwrap()
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .args
                .clone()
                .unwrap()
        };
        let default = Config::default();
        assert!(
            !args(&default).iter().any(|a| a.starts_with("--threads")),
            "by default the agent sizes itself from its CPU limit"
        );
        let three = Config {
            agent_threads: 3,
            ..Config::default()
        };
        assert!(args(&three).contains(&"--threads=3".to_string()));
    }

    fn pod_spec(config: &Config) -> (ObjectMeta, PodSpec, DaemonSetSpec) {
        let a = policy("a", &[]);
        let spec = desired_daemonset(config, &[&a], &[]).unwrap().spec.unwrap();
        (
            spec.template.metadata.clone().unwrap(),
            spec.template.spec.clone().unwrap(),
            spec,
        )
    }

    #[test]
    fn by_default_agents_are_node_critical_linux_pods_rolled_10_percent_at_a_time() {
        let (meta, pod, spec) = pod_spec(&Config::default());
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([(
                "kubernetes.io/os".to_string(),
                "linux".to_string()
            )]))
        );
        assert_eq!(pod.image_pull_secrets, None);
        let c = &pod.containers[0];
        assert_eq!(c.args.as_ref().unwrap()[..2], ["--log-format=text", "run"]);
        let env = c.env.as_ref().unwrap();
        let rust_log = env.iter().find(|e| e.name == "RUST_LOG").unwrap();
        assert_eq!(rust_log.value.as_deref(), Some("info"));
        assert_eq!(
            spec.update_strategy
                .unwrap()
                .rolling_update
                .unwrap()
                .max_unavailable,
            Some(IntOrString::String("10%".into()))
        );
        assert_eq!(meta.labels, Some(labels()));
    }

    #[test]
    fn agent_pod_settings_reach_the_pod_template() {
        let config = Config {
            agent_priority_class_name: String::new(),
            agent_image_pull_secrets: vec!["regcred".into()],
            agent_log_level: "info,kube_fim_agent=debug".into(),
            agent_log_format: "json".into(),
            agent_max_unavailable: MaxUnavailable::Count(2),
            agent_pod_labels: vec![("team".into(), "platform".into())],
            agent_pod_annotations: vec![
                ("example.com/owner".into(), "secops".into()),
                ("prometheus.io/port".into(), "1".into()),
            ],
            ..Config::default()
        };
        let (meta, pod, spec) = pod_spec(&config);
        assert_eq!(pod.priority_class_name, None, "an empty class is omitted");
        assert_eq!(
            pod.node_selector.unwrap()["kubernetes.io/os"],
            "linux",
            "the OS selector is always there"
        );
        assert_eq!(
            pod.image_pull_secrets,
            Some(vec![LocalObjectReference {
                name: "regcred".into()
            }])
        );
        let c = &pod.containers[0];
        assert_eq!(c.args.as_ref().unwrap()[0], "--log-format=json");
        let env = c.env.as_ref().unwrap();
        let rust_log = env.iter().find(|e| e.name == "RUST_LOG").unwrap();
        assert_eq!(rust_log.value.as_deref(), Some("info,kube_fim_agent=debug"));
        assert_eq!(
            spec.update_strategy
                .unwrap()
                .rolling_update
                .unwrap()
                .max_unavailable,
            Some(IntOrString::Int(2))
        );
        let labels = meta.labels.unwrap();
        assert_eq!(labels["team"], "platform");
        assert_eq!(labels[COMPONENT_LABEL], "agent");
        assert_eq!(
            spec.selector.match_labels.unwrap(),
            super::labels(),
            "extra pod labels never change the selector"
        );
        let annotations = meta.annotations.unwrap();
        assert_eq!(annotations["example.com/owner"], "secops");
        assert_eq!(
            annotations["prometheus.io/port"],
            config.agent_metrics_port.to_string(),
            "the scrape annotations stay the operator's"
        );
    }

    #[test]
    fn a_sink_asking_for_sha256_is_told_to_the_agents() {
        let a = policy("a", &[]);
        let args = |fingerprints: &[Fingerprint]| {
            desired_daemonset(&Config::default(), &[&a], fingerprints)
                .unwrap()
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .args
                .clone()
                .unwrap()
        };
        assert!(!args(&[]).iter().any(|a| a.starts_with("--fingerprints")));
        assert!(args(&[Fingerprint::Sha256]).contains(&"--fingerprints=sha256".to_string()));
    }

    #[test]
    fn no_policy_no_daemonset() {
        assert!(desired_daemonset(&Config::default(), &[], &[]).is_none());
    }

    #[test]
    fn affinity_is_the_union_of_selections() {
        let a = policy("a", &[("role", "web")]);
        let b = policy("b", &[("role", "db"), ("zone", "z1")]);
        let ds = desired_daemonset(&Config::default(), &[&b, &a], &[]).unwrap();
        let terms = terms(&ds);
        assert_eq!(terms.len(), 2, "one ORed term per policy");
        let exprs = terms[0].match_expressions.as_ref().unwrap();
        assert_eq!(exprs.len(), 1);
        assert_eq!(exprs[0].key, "role");
        assert_eq!(exprs[0].values.as_deref(), Some(&["web".to_string()][..]));
        let exprs = terms[1].match_expressions.as_ref().unwrap();
        assert_eq!(
            exprs.len(),
            2,
            "a policy's labels are ANDed within its term"
        );
    }

    #[test]
    fn a_policy_selecting_all_nodes_removes_the_affinity() {
        let a = policy("a", &[("role", "web")]);
        let all = policy("all", &[]);
        let ds = desired_daemonset(&Config::default(), &[&a, &all], &[]).unwrap();
        assert!(terms(&ds).is_empty());
    }

    #[test]
    fn same_policies_in_any_order_give_the_same_template() {
        let a = policy("a", &[("role", "web")]);
        let b = policy("b", &[("role", "db")]);
        let one = desired_daemonset(&Config::default(), &[&a, &b], &[]).unwrap();
        let two = desired_daemonset(&Config::default(), &[&b, &a], &[]).unwrap();
        assert_eq!(one, two);
    }

    #[test]
    fn every_policy_owns_the_daemonset() {
        let mut a = policy("a", &[]);
        a.metadata.uid = Some("uid-a".into());
        let mut b = policy("b", &[]);
        b.metadata.uid = Some("uid-b".into());
        let ds = desired_daemonset(&Config::default(), &[&b, &a], &[]).unwrap();
        let owners: Vec<(String, String)> = ds
            .metadata
            .owner_references
            .unwrap()
            .into_iter()
            .map(|o| (o.kind, o.name))
            .collect();
        assert_eq!(
            owners,
            [
                ("FileIntegrityPolicy".to_string(), "a".to_string()),
                ("FileIntegrityPolicy".to_string(), "b".to_string())
            ]
        );
    }

    #[test]
    fn tolerations_are_merged_once() {
        let t = Toleration {
            key: Some("node-role.kubernetes.io/control-plane".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        };
        let mut a = policy("a", &[]);
        a.spec.tolerations = vec![t.clone()];
        let mut b = policy("b", &[]);
        b.spec.tolerations = vec![
            t.clone(),
            Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("fim".into()),
                effect: Some("NoExecute".into()),
                ..Toleration::default()
            },
        ];
        assert_eq!(merged_tolerations(&[&a, &b]).len(), 2);
    }

    #[test]
    fn least_privilege_security_context() {
        let a = policy("a", &[]);
        let ds = desired_daemonset(&Config::default(), &[&a], &[]).unwrap();
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_pid, None);
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(
            caps.add.as_deref(),
            Some(&["DAC_READ_SEARCH".to_string()][..])
        );
        let host = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == HOST_ROOT)
            .unwrap();
        assert_eq!(host.read_only, Some(true));
    }

    #[test]
    fn process_attribution_adds_only_what_it_needs() {
        let mut a = policy("a", &[]);
        a.spec.process_attribution = true;
        let ds = desired_daemonset(&Config::default(), &[&a], &[]).unwrap();
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_pid, Some(true));
        let add = pod.containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap()
            .add
            .clone()
            .unwrap();
        assert_eq!(add, ["DAC_READ_SEARCH", "SYS_ADMIN", "SYS_PTRACE"]);
    }

    #[test]
    fn only_container_drift_gets_the_cri_socket_read_only() {
        let a = policy("a", &[]);
        let socket = |ds: DaemonSet| {
            let pod = ds.spec.unwrap().template.spec.unwrap();
            let c = &pod.containers[0];
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "cri")
                .cloned();
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "cri")
                .and_then(|v| v.host_path.clone());
            let arg = c
                .args
                .iter()
                .flatten()
                .find(|a| a.starts_with("--cri-socket"))
                .cloned();
            (mount, volume, arg)
        };
        assert_eq!(
            socket(desired_daemonset(&Config::default(), &[&a], &[]).unwrap()),
            (None, None, None),
            "a host-only policy: no runtime socket"
        );
        let mut b = policy("b", &[]);
        b.spec.containers = Some(kube_fim_crds::ContainerSelection::default());
        let (mount, volume, arg) =
            socket(desired_daemonset(&Config::default(), &[&a, &b], &[]).unwrap());
        let mount = mount.unwrap();
        assert_eq!(mount.read_only, Some(true));
        assert_eq!(mount.mount_path, CRI_SOCKET);
        let volume = volume.unwrap();
        assert_eq!(volume.path, "/run/containerd/containerd.sock");
        assert_eq!(volume.type_.as_deref(), Some("Socket"));
        assert_eq!(arg.as_deref(), Some("--cri-socket=/run/kube-fim/cri.sock"));
        // Turned off by the value: containers come from the pods' status.
        let off = Config {
            agent_cri_socket: String::new(),
            ..Config::default()
        };
        assert_eq!(
            socket(desired_daemonset(&off, &[&b], &[]).unwrap()),
            (None, None, None)
        );
    }
}
