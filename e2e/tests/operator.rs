//! The operator against the real API server, running as its own ServiceAccount
//! with the RBAC of `manifests/rbac.yaml`: the one agent DaemonSet follows the
//! union of the policies, status comes from the agents' per-node reports,
//! deleted nodes lose their records, retention deletes the oldest changes, and
//! of two replicas one leads.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Toleration};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kube_fim_crds::{
    FileChange, FileIntegrityNode, FileIntegrityNodeSpec, FileIntegrityNodeStatus,
    FileIntegrityPolicy, NodePolicyPhase, NodePolicyStatus,
};
use kube_fim_e2e::{
    Entry, Policy, Process, binary, client, create_node, ensure_crds, eventually, file_change,
    free_port, http_get, kubectl, metric, service_account_kubeconfig, unique_name,
};

const SUITE_LABEL: &str = "e2e.kube-fim.io/suite";
/// An operator started by a test first lists every FileChange of the shared
/// cluster: under the whole suite's load on two cores that took up to 40 s.
const WAIT: Duration = Duration::from_secs(90);

/// An operator process, logged in as the kube-fim-operator ServiceAccount,
/// serving only the policies labelled with its suite.
struct Operator {
    process: Process,
    port: u16,
}

fn start_operator(name: &str, suite: &str, daemonset: &str, lease: &str) -> Operator {
    ensure_crds();
    let port = free_port();
    let args = [
        "--namespace=kube-fim".to_string(),
        format!("--daemonset-name={daemonset}"),
        format!("--policy-selector={SUITE_LABEL}={suite}"),
        format!("--metrics-addr=127.0.0.1:{port}"),
        format!("--lease-name={lease}"),
        "--lease-duration=4".to_string(),
        "--resync=2s".to_string(),
        "--heartbeat-timeout=20s".to_string(),
        "--agent-image=kube-fim-agent:e2e".to_string(),
        format!("--identity={name}"),
    ];
    let process = Process::start(
        name,
        &binary("kube-fim-operator"),
        &args,
        &service_account_kubeconfig("kube-fim-operator"),
    );
    Operator { process, port }
}

fn policy(name: &str, suite: &str, selector: &[(&str, &str)]) -> FileIntegrityPolicy {
    selector
        .iter()
        .fold(
            Policy::named(name).label(SUITE_LABEL, suite),
            |p, (k, v)| p.node_selector(k, v),
        )
        .path(Entry::new("passwd", "/etc/passwd"))
        .build()
}

fn affinity_terms(ds: &DaemonSet) -> Vec<Vec<(String, Vec<String>)>> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|sel| {
            sel.node_selector_terms
                .iter()
                .map(|t| {
                    t.match_expressions
                        .iter()
                        .flatten()
                        .map(|e| (e.key.clone(), e.values.clone().unwrap_or_default()))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn daemonset(client: &Client, name: &str) -> Option<DaemonSet> {
    Api::<DaemonSet>::namespaced(client.clone(), "kube-fim")
        .get_opt(name)
        .await
        .expect("get DaemonSet")
}

#[tokio::test]
async fn the_agent_daemonset_follows_the_union_of_the_policies() {
    let client = client().await;
    let suite = unique_name("ds");
    let ds_name = unique_name("agent");
    let mut op = start_operator(&suite, &suite, &ds_name, &unique_name("lease"));
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let role = |r: &str| format!("{r}-{suite}");

    // One policy: a DaemonSet scheduled on its nodes, with the exact pod shape.
    let web = policies
        .create(
            &PostParams::default(),
            &policy(&format!("{suite}-web"), &suite, &[("role", &role("web"))]),
        )
        .await
        .unwrap();
    let ds = eventually("the agent DaemonSet", WAIT, || async {
        daemonset(&client, &ds_name)
            .await
            .ok_or_else(|| "no DaemonSet".to_string())
    })
    .await;
    assert_eq!(
        affinity_terms(&ds),
        vec![vec![("role".to_string(), vec![role("web")])]]
    );
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("kube-fim-agent"));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("kube-fim-agent:e2e"));
    let args = c.args.clone().unwrap();
    assert!(
        args.contains(&"--node-name=$(NODE_NAME)".to_string()),
        "{args:?}"
    );
    assert!(args.contains(&"--root=/host".to_string()), "{args:?}");
    let env = c.env.as_ref().unwrap();
    let node_env = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_env
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.clone().unwrap(), ["ALL"]);
    assert_eq!(caps.add.clone().unwrap(), ["DAC_READ_SEARCH"]);
    let mounts = c.volume_mounts.as_ref().unwrap();
    let host = mounts.iter().find(|m| m.mount_path == "/host").unwrap();
    assert_eq!(host.read_only, Some(true));
    let volumes = pod.volumes.as_ref().unwrap();
    let host_volume = volumes.iter().find(|v| v.name == host.name).unwrap();
    assert_eq!(host_volume.host_path.as_ref().unwrap().path, "/");
    assert!(mounts.iter().any(|m| m.mount_path == "/var/lib/kube-fim"));
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("memory")
    );
    let annotations = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    let generation = ds.metadata.generation;

    // Editing the policy's paths does not touch the pod template: no rollout.
    let mut edited = web.clone();
    edited
        .spec
        .paths
        .push(Entry::new("group", "/etc/group").into());
    policies
        .replace(
            &web.name_any(),
            &PostParams::default(),
            &FileIntegrityPolicy {
                metadata: policies.get(&web.name_any()).await.unwrap().metadata,
                ..edited
            },
        )
        .await
        .unwrap();

    // A second policy with another selector and a toleration: the same
    // DaemonSet, now covering both.
    let mut db = policy(&format!("{suite}-db"), &suite, &[("role", &role("db"))]);
    db.spec.tolerations = vec![Toleration {
        key: Some("dedicated".into()),
        operator: Some("Equal".into()),
        value: Some("db".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    }];
    policies.create(&PostParams::default(), &db).await.unwrap();
    let ds = eventually("affinity covering both policies", WAIT, || async {
        let ds = daemonset(&client, &ds_name).await.ok_or("no DaemonSet")?;
        let terms = affinity_terms(&ds);
        if terms.len() == 2 {
            Ok(ds)
        } else {
            Err(format!("{terms:?}"))
        }
    })
    .await;
    let terms = affinity_terms(&ds);
    assert!(terms.contains(&vec![("role".to_string(), vec![role("web")])]));
    assert!(terms.contains(&vec![("role".to_string(), vec![role("db")])]));
    let tolerations = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .tolerations
        .clone()
        .unwrap()
        .into_iter()
        .filter(|t| {
            !t.key
                .as_deref()
                .is_some_and(|k| k.starts_with("node.kubernetes.io/"))
        })
        .collect::<Vec<_>>();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
    assert_eq!(
        ds.metadata.generation.unwrap(),
        generation.unwrap() + 1,
        "one template change for the new selection, none for the path edit"
    );

    // The operator's metrics show its work.
    let text = eventually("reconcile metrics", WAIT, || async {
        let text = http_get(op.port, "/metrics").ok_or("no /metrics")?;
        let ok = metric(&text, "kube_fim_operator_reconciles_total{result=\"ok\"}").unwrap_or(0.0);
        if ok >= 2.0 { Ok(text) } else { Err(text) }
    })
    .await;
    assert_eq!(
        metric(&text, "kube_fim_operator_policies{state=\"valid\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(metric(&text, "kube_fim_operator_leader"), Some(1.0));
    assert!(
        metric(&text, "kube_fim_operator_reconcile_duration_seconds_count").unwrap_or(0.0) >= 2.0
    );
    assert_eq!(http_get(op.port, "/healthz").as_deref(), Some("ok"));
    assert_eq!(http_get(op.port, "/readyz").as_deref(), Some("ok"));

    // Delete one: the affinity narrows. Delete all: no DaemonSet.
    policies
        .delete(&web.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    eventually("affinity narrowed to the db policy", WAIT, || async {
        let ds = daemonset(&client, &ds_name).await.ok_or("no DaemonSet")?;
        let terms = affinity_terms(&ds);
        if terms == vec![vec![("role".to_string(), vec![role("db")])]] {
            Ok(())
        } else {
            Err(format!("{terms:?}"))
        }
    })
    .await;
    policies
        .delete(&db.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    eventually("DaemonSet deleted with the last policy", WAIT, || async {
        match daemonset(&client, &ds_name).await {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    assert!(
        op.process.running(),
        "operator still running:\n{}",
        op.process.log()
    );
}

async fn report(
    client: &Client,
    node: &str,
    policy: &str,
    phase: NodePolicyPhase,
    files: i64,
    message: Option<&str>,
) {
    let api: Api<FileIntegrityNode> = Api::all(client.clone());
    if api.get_opt(node).await.unwrap().is_none() {
        api.create(
            &PostParams::default(),
            &FileIntegrityNode::new(node, FileIntegrityNodeSpec { node: node.into() }),
        )
        .await
        .unwrap();
    }
    let now = Time(Timestamp::now());
    let status = FileIntegrityNodeStatus {
        heartbeat_time: Some(now.clone()),
        policy_count: Some(1),
        files_monitored: Some(files),
        policies: vec![NodePolicyStatus {
            policy: policy.into(),
            phase,
            files_monitored: Some(files),
            last_scan_time: Some(now),
            message: message.map(str::to_string),
            ..NodePolicyStatus::default()
        }],
        ..FileIntegrityNodeStatus::default()
    };
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap();
}

fn status_summary(p: &FileIntegrityPolicy) -> String {
    let s = p.status.clone().unwrap_or_default();
    let cond = |t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| format!("{}={}/{}", t, c.status, c.reason))
            .unwrap_or_default()
    };
    format!(
        "selected={:?} ready={:?} baselining={:?} files={:?} {} {}",
        s.nodes_selected,
        s.nodes_ready,
        s.nodes_baselining,
        s.files_monitored,
        cond("Ready"),
        cond("Degraded")
    )
}

async fn wait_status(
    api: &Api<FileIntegrityPolicy>,
    name: &str,
    want: &str,
) -> FileIntegrityPolicy {
    eventually(&format!("status `{want}`"), WAIT, || async {
        let p = api.get(name).await.map_err(|e| e.to_string())?;
        let s = status_summary(&p);
        if s.contains(want) { Ok(p) } else { Err(s) }
    })
    .await
}

async fn events_for(client: &Client, policy: &str) -> Vec<Event> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy))
        .collect()
}

#[tokio::test]
async fn policy_status_comes_from_the_agents_reports_and_deleted_nodes_lose_theirs() {
    let client = client().await;
    let suite = unique_name("status");
    let _op = start_operator(&suite, &suite, &unique_name("agent"), &unique_name("lease"));
    let role = format!("web-{suite}");
    let (n1, n2) = (format!("{suite}-n1"), format!("{suite}-n2"));
    create_node(&client, &n1, &[("role", &role)]).await;
    create_node(&client, &n2, &[("role", &role)]).await;
    create_node(&client, &format!("{suite}-other"), &[("role", "other")]).await;

    let api: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let name = format!("{suite}-p");
    api.create(
        &PostParams::default(),
        &policy(&name, &suite, &[("role", &role)]),
    )
    .await
    .unwrap();

    // New nodes without reports are Baselining, not failed.
    wait_status(&api, &name, "selected=Some(2) ready=Some(0) baselining=Some(2) files=Some(0) Ready=False/Baselining Degraded=False").await;
    report(&client, &n1, &name, NodePolicyPhase::Ready, 10, None).await;
    wait_status(
        &api,
        &name,
        "ready=Some(1) baselining=Some(1) files=Some(10)",
    )
    .await;
    report(&client, &n2, &name, NodePolicyPhase::Ready, 7, None).await;
    let p = wait_status(
        &api,
        &name,
        "ready=Some(2) baselining=Some(0) files=Some(17) Ready=True/AllNodesReady",
    )
    .await;
    assert_eq!(p.status.unwrap().observed_generation, p.metadata.generation);
    let run = kubectl(["get", "fip", &name]);
    let row: Vec<&str> = run
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..6],
        [name.as_str(), "2", "2", "17", "0", "AllNodesReady"],
        "{}",
        run.stdout
    );

    // An agent that fails makes the policy Degraded, with an Event.
    report(
        &client,
        &n2,
        &name,
        NodePolicyPhase::Failed,
        0,
        Some("cannot open /host: ENOENT"),
    )
    .await;
    let p = wait_status(&api, &name, "Degraded=True/AgentFailed").await;
    let degraded = p
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert!(
        degraded.message.contains(&n2) && degraded.message.contains("ENOENT"),
        "{}",
        degraded.message
    );
    eventually("Degraded and PolicyApplied events", WAIT, || async {
        let reasons: Vec<String> = events_for(&client, &name)
            .await
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        if reasons.iter().any(|r| r == "Degraded") && reasons.iter().any(|r| r == "PolicyApplied") {
            Ok(())
        } else {
            Err(format!("{reasons:?}"))
        }
    })
    .await;

    // Deleting a Node removes its record, and the policy no longer counts it.
    Api::<Node>::all(client.clone())
        .delete(&n2, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the deleted node's FileIntegrityNode removed",
        WAIT,
        || async {
            match Api::<FileIntegrityNode>::all(client.clone())
                .get_opt(&n2)
                .await
                .unwrap()
            {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        },
    )
    .await;
    wait_status(&api, &name, "selected=Some(1) ready=Some(1) baselining=Some(0) files=Some(10) Ready=True/AllNodesReady Degraded=False").await;
    api.delete(&name, &DeleteParams::default()).await.unwrap();
}

/// A selected node from which no agent ever reports is not "building its
/// baseline" forever: past twice the heartbeat timeout it is a node without a
/// healthy agent, which KubeFimAgentNotReporting counts.
#[tokio::test]
async fn a_node_whose_agent_never_reports_degrades_the_policy() {
    let client = client().await;
    let suite = unique_name("silent");
    let _op = start_operator(&suite, &suite, &unique_name("agent"), &unique_name("lease"));
    let role = format!("web-{suite}");
    let (n1, n2) = (format!("{suite}-n1"), format!("{suite}-n2"));
    create_node(&client, &n1, &[("role", &role)]).await;
    create_node(&client, &n2, &[("role", &role)]).await;
    let api: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let name = format!("{suite}-p");
    api.create(
        &PostParams::default(),
        &policy(&name, &suite, &[("role", &role)]),
    )
    .await
    .unwrap();
    wait_status(
        &api,
        &name,
        "selected=Some(2) ready=Some(0) baselining=Some(2)",
    )
    .await;
    // n1's agent keeps reporting; n2 never gets one (heartbeat timeout 20s).
    let keep_reporting = async {
        loop {
            report(&client, &n1, &name, NodePolicyPhase::Ready, 3, None).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    };
    let silent = async {
        eventually(
            "n2 counted as not reporting",
            Duration::from_secs(90),
            || async {
                let p = api.get(&name).await.map_err(|e| e.to_string())?;
                let s = status_summary(&p);
                let degraded = p
                    .status
                    .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"))
                    .map(|c| c.message)
                    .unwrap_or_default();
                if s.contains("selected=Some(2) ready=Some(1) baselining=Some(0)")
                    && s.contains("Degraded=True/AgentNotReporting")
                    && degraded.contains(&format!("{n2}: agent has not reported"))
                    && !degraded.contains(&n1)
                {
                    Ok(())
                } else {
                    Err(format!("{s} / {degraded}"))
                }
            },
        )
        .await
    };
    tokio::select! {
        _ = keep_reporting => unreachable!(),
        _ = silent => {}
    }
    api.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn retention_deletes_the_oldest_changes_past_the_count_limit() {
    let client = client().await;
    let suite = unique_name("retention");
    let name = format!("{suite}-p");
    let changes: Api<FileChange> = Api::all(client.clone());
    ensure_crds();
    // Eight changes exist before the operator looks.
    for i in 0..8 {
        changes
            .create(
                &PostParams::default(),
                &file_change(&format!("{name}-{i}"), "n1", &name),
            )
            .await
            .unwrap();
    }
    let api: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let mut p = policy(&name, &suite, &[]);
    p.spec.retention.max_count = 5;
    // Nobody approved these: only a policy that says so lets retention delete them.
    p.spec.retention.delete_unapproved = true;
    api.create(&PostParams::default(), &p).await.unwrap();
    let op = start_operator(&suite, &suite, &unique_name("agent"), &unique_name("lease"));

    let selector = format!("{}={name}", kube_fim_crds::labels::POLICY);
    let left = eventually("retention down to 5 changes", WAIT, || async {
        let names: Vec<String> = changes
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .map(|c| c.name_any())
            .collect();
        if names.len() == 5 {
            Ok(names)
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    let mut left = left;
    left.sort();
    let expected: Vec<String> = (3..8).map(|i| format!("{name}-{i}")).collect();
    assert_eq!(left, expected, "the oldest three went");
    let p = eventually("change counts in the status", WAIT, || async {
        let p = api.get(&name).await.map_err(|e| e.to_string())?;
        let s = p.status.clone().unwrap_or_default();
        if s.changes_last24h == Some(5) && s.unacknowledged_changes == Some(5) {
            Ok(p)
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let run = kubectl([
        "get",
        "fip",
        &p.name_any(),
        "-o",
        "jsonpath={.status.changesLast24h}",
    ]);
    assert_eq!(run.stdout, "5");
    let text = http_get(op.port, "/metrics").unwrap();
    assert!(
        metric(&text, "kube_fim_operator_retention_deleted_total").unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    api.delete(&name, &DeleteParams::default()).await.unwrap();
}

async fn holder(client: &Client, lease: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "kube-fim")
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test]
async fn of_two_operators_one_leads_and_the_other_takes_over() {
    let client = client().await;
    let suite = unique_name("leader");
    let lease = unique_name("lease");
    let ds = unique_name("agent");
    let mut a = start_operator(&format!("{suite}-a"), &suite, &ds, &lease);
    let mut b = start_operator(&format!("{suite}-b"), &suite, &ds, &lease);
    let leader = eventually("a lease holder", WAIT, || async {
        holder(&client, &lease)
            .await
            .ok_or_else(|| "no holder".to_string())
    })
    .await;
    // Exactly one of them says it leads.
    let leads =
        |port| http_get(port, "/metrics").and_then(|t| metric(&t, "kube_fim_operator_leader"));
    let (mut first, mut second) = if leader.ends_with("-a") {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    eventually("one leader, one standby", WAIT, || async {
        match (leads(first.port), leads(second.port)) {
            (Some(1.0), Some(0.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("the standby ready", WAIT, || async {
        http_get(second.port, "/readyz").ok_or_else(|| "not ready".to_string())
    })
    .await;

    // The leader dies without releasing: the standby takes over once the lease expires.
    first.process.kill();
    let new_leader = eventually(
        "the standby taking over",
        Duration::from_secs(40),
        || async {
            match holder(&client, &lease).await {
                Some(h) if h != leader => Ok(h),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(new_leader.starts_with(&suite));
    eventually("the new leader's metric", WAIT, || async {
        if leads(second.port) == Some(1.0) {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    assert!(second.process.running());
    std::mem::swap(&mut first, &mut second);
}

#[test]
fn rbac_gives_each_component_only_what_it_needs() {
    ensure_crds();
    kube_fim_e2e::ensure_rbac();
    let can = |sa: &str, args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let who = format!("--as=system:serviceaccount:kube-fim:{sa}");
        all.push(&who);
        let run = kubectl(&all);
        match run.stdout.trim() {
            "yes" => true,
            "no" => false,
            other => panic!("kubectl auth can-i {args:?}: {other} {}", run.stderr),
        }
    };
    let agent = "kube-fim-agent";
    let operator = "kube-fim-operator";
    let mut wrong = Vec::new();
    for (sa, args, want) in [
        (
            agent,
            &["list", "fileintegritypolicies.fim.kube-fim.io"][..],
            true,
        ),
        (agent, &["create", "filechanges.fim.kube-fim.io"], true),
        (
            agent,
            &["create", "events.events.k8s.io", "-n", "default"],
            true,
        ),
        (
            agent,
            &[
                "patch",
                "fileintegritynodes.fim.kube-fim.io",
                "--subresource=status",
            ],
            true,
        ),
        (agent, &["get", "secrets", "-A"], false),
        (agent, &["list", "secrets", "-n", "kube-fim"], false),
        (agent, &["delete", "filechanges.fim.kube-fim.io"], false),
        (
            agent,
            &["update", "fileintegritypolicies.fim.kube-fim.io"],
            false,
        ),
        (
            agent,
            &[
                "patch",
                "fileintegritypolicies.fim.kube-fim.io",
                "--subresource=status",
            ],
            false,
        ),
        (
            agent,
            &["delete", "fileintegritynodes.fim.kube-fim.io"],
            false,
        ),
        (
            agent,
            &["create", "daemonsets.apps", "-n", "kube-fim"],
            false,
        ),
        (agent, &["create", "pods", "-n", "kube-fim"], false),
        (
            operator,
            &["patch", "daemonsets.apps", "-n", "kube-fim"],
            true,
        ),
        (
            operator,
            &["patch", "daemonsets.apps", "-n", "default"],
            false,
        ),
        (operator, &["delete", "filechanges.fim.kube-fim.io"], true),
        (
            operator,
            &[
                "patch",
                "fileintegritypolicies.fim.kube-fim.io",
                "--subresource=status",
            ],
            true,
        ),
        (
            operator,
            &["update", "fileintegritypolicies.fim.kube-fim.io"],
            false,
        ),
        (operator, &["create", "filechanges.fim.kube-fim.io"], false),
        (operator, &["get", "secrets", "-A"], false),
        (operator, &["create", "pods", "-n", "kube-fim"], false),
        (
            operator,
            &["patch", "leases.coordination.k8s.io", "-n", "kube-fim"],
            true,
        ),
        (
            operator,
            &["patch", "leases.coordination.k8s.io", "-n", "kube-system"],
            false,
        ),
    ] {
        if can(sa, args) != want {
            wrong.push(format!(
                "{sa} {args:?}: expected {}",
                if want { "yes" } else { "no" }
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn with_the_operator_gone_deleting_the_last_policy_still_removes_the_agents() {
    let client = client().await;
    let suite = unique_name("gc");
    let ds_name = unique_name("agent");
    let mut op = start_operator(&suite, &suite, &ds_name, &unique_name("lease"));
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let name = format!("{suite}-p");
    let created = policies
        .create(&PostParams::default(), &policy(&name, &suite, &[]))
        .await
        .unwrap();
    let ds = eventually("the agent DaemonSet", WAIT, || async {
        daemonset(&client, &ds_name)
            .await
            .ok_or_else(|| "no DaemonSet".to_string())
    })
    .await;
    let owners = ds.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(
        owners[0].uid,
        created.uid().unwrap(),
        "the policy owns the DaemonSet"
    );

    // The operator is uninstalled first (helm uninstall order); the garbage
    // collector still removes the agents with their last owner.
    op.process.kill();
    policies
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the DaemonSet garbage-collected",
        Duration::from_secs(60),
        || async {
            match daemonset(&client, &ds_name).await {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        },
    )
    .await;
}
