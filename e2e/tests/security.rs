//! What one node's agent token, an approver, an auditor and kube-fim's own
//! ServiceAccounts can and cannot do, tried with real tokens against the real
//! API server with the admission policies and RBAC the chart ships.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::path::Path;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kube_fim_crds::labels::{NODE, POLICY};
use kube_fim_crds::{
    Approval, FileChange, FileIntegrityNode, FileIntegrityNodeSpec, FileIntegrityNodeStatus,
};
use kube_fim_e2e::{
    approve, assert_refused, client, client_for, create_node, ensure_crds, file_change, kubectl,
    node_bound_kubeconfig, refusal, service_account_kubeconfig, service_account_with_cluster_role,
    unique_name, whoami,
};

const AGENT: &str = "system:serviceaccount:kube-fim:kube-fim-agent";

fn approval(by: &str) -> serde_json::Value {
    serde_json::json!({"status": {"approval": Approval {
        approved_by: by.into(),
        approved_at: Time(Timestamp::now()),
        reason: Some("forged".into()),
        paths: Vec::new(),
    }}})
}

#[tokio::test]
async fn an_agent_token_speaks_for_its_own_node_only() {
    ensure_crds();
    let admin = client().await;
    let suite = unique_name("sec");
    let (mine, other) = (format!("{suite}-a"), format!("{suite}-b"));
    create_node(&admin, &mine, &[]).await;
    create_node(&admin, &other, &[]).await;
    let agent = client_for(&node_bound_kubeconfig(&mine)).await;
    let unbound = client_for(&service_account_kubeconfig("kube-fim-agent")).await;
    assert_eq!(whoami(&agent).await, AGENT);
    assert_eq!(whoami(&unbound).await, AGENT, "same account, no node claim");
    let changes = |c: &Client| Api::<FileChange>::all(c.clone());
    let records = |c: &Client| Api::<FileIntegrityNode>::all(c.clone());
    let pp = PostParams::default();

    // The legitimate actions: its own node's change and report.
    let own = changes(&agent)
        .create(&pp, &file_change(&format!("{mine}-own"), &mine, "p"))
        .await
        .expect("an agent reports its own node's change");
    records(&agent)
        .create(
            &pp,
            &FileIntegrityNode::new(&mine, FileIntegrityNodeSpec { node: mine.clone() }),
        )
        .await
        .expect("an agent creates its own node's record");
    let heartbeat = serde_json::json!({"status": FileIntegrityNodeStatus {
        heartbeat_time: Some(Time(Timestamp::now())),
        ..FileIntegrityNodeStatus::default()
    }});
    records(&agent)
        .patch_status(&mine, &PatchParams::default(), &Patch::Merge(&heartbeat))
        .await
        .expect("an agent writes its own heartbeat");

    // Another node's change, record and heartbeat.
    assert_refused(
        changes(&agent)
            .create(&pp, &file_change(&format!("{mine}-forged"), &other, "p"))
            .await,
        &format!(
            "an agent may only report changes of its own node: this token is bound to node {mine}, the change is for node {other}"
        ),
    );
    records(&admin)
        .create(
            &pp,
            &FileIntegrityNode::new(
                &other,
                FileIntegrityNodeSpec {
                    node: other.clone(),
                },
            ),
        )
        .await
        .unwrap();
    assert_refused(
        records(&agent)
            .patch_status(&other, &PatchParams::default(), &Patch::Merge(&heartbeat))
            .await,
        &format!(
            "an agent may only write its own node's FileIntegrityNode: this token is bound to node {mine}, the object is {other}"
        ),
    );
    assert_refused(
        records(&agent)
            .create(
                &pp,
                &FileIntegrityNode::new(
                    &format!("{suite}-c"),
                    FileIntegrityNodeSpec {
                        node: format!("{suite}-c"),
                    },
                ),
            )
            .await,
        "an agent may only write its own node's FileIntegrityNode",
    );

    // The same account without the node claim can write nothing.
    let no_claim = "kube-fim agents must authenticate with a token bound to their node";
    assert_refused(
        changes(&unbound)
            .create(&pp, &file_change(&format!("{mine}-unbound"), &mine, "p"))
            .await,
        no_claim,
    );
    assert_refused(
        records(&unbound)
            .patch_status(&mine, &PatchParams::default(), &Patch::Merge(&heartbeat))
            .await,
        no_claim,
    );

    // No approval: neither the field (both admission policies refuse it: no
    // approve verb, and never from an agent), nor a label that used to mean
    // one, nor owners that would let the garbage collector erase the change.
    let message = refusal(
        changes(&agent)
            .patch_status(
                &own.name_any(),
                &PatchParams::default(),
                &Patch::Merge(approval(AGENT)),
            )
            .await,
    );
    assert!(
        message.contains("an agent may never approve a FileChange")
            || message.contains(&format!("user {AGENT} may not approve FileChanges")),
        "{message}"
    );
    let mut labelled = file_change(&format!("{mine}-labelled"), &mine, "p");
    labelled
        .labels_mut()
        .insert("fim.kube-fim.io/acknowledged".into(), "true".into());
    assert_refused(
        changes(&agent).create(&pp, &labelled).await,
        "an agent may only set kube-fim's filter labels",
    );
    let mut disguised = file_change(&format!("{mine}-disguised"), &mine, "p");
    disguised.labels_mut().insert(NODE.into(), other.clone());
    assert_refused(
        changes(&agent).create(&pp, &disguised).await,
        "with its own node in the node label",
    );
    let mut owned = file_change(&format!("{mine}-owned"), &mine, "p");
    owned.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: mine.clone(),
        uid: "00000000-0000-0000-0000-000000000000".into(),
        ..OwnerReference::default()
    }]);
    assert_refused(
        changes(&agent).create(&pp, &owned).await,
        "an agent may not give a FileChange owners, finalizers or annotations",
    );

    // Events only in its own node's name.
    let event = |instance: &str| Event {
        metadata: kube::api::ObjectMeta {
            generate_name: Some("sec-".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        reason: Some("FileModified".into()),
        action: Some("Detect".into()),
        type_: Some("Warning".into()),
        note: Some("forged".into()),
        reporting_controller: Some("kube-fim-agent".into()),
        reporting_instance: Some(instance.into()),
        ..Default::default()
    };
    let events = |c: &Client| Api::<Event>::namespaced(c.clone(), "default");
    let own = events(&agent)
        .create(&pp, &event(&mine))
        .await
        .expect("an agent publishes Events as its own node");
    assert_refused(
        events(&agent).create(&pp, &event(&other)).await,
        &format!(
            "an agent may only publish Events as its own node: this token is bound to node {mine}"
        ),
    );
    // It counts its own Events' series, and not another node's.
    let series = serde_json::json!({
        "series": {"count": 2, "lastObservedTime": MicroTime(Timestamp::now())},
    });
    events(&agent)
        .patch(
            &own.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&series),
        )
        .await
        .expect("an agent updates its own Event's series");
    let others = events(&admin)
        .create(&pp, &event(&other))
        .await
        .expect("the admin publishes an Event as the other node");
    assert_refused(
        events(&agent)
            .patch(
                &others.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&series),
            )
            .await,
        &format!(
            "an agent may only publish Events as its own node: this token is bound to node {mine}"
        ),
    );

    // Nothing of the refused was stored.
    let stored: Vec<String> = changes(&admin)
        .list(&kube::api::ListParams::default().labels(&format!("{POLICY}=p")))
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .filter(|n| n.starts_with(&suite))
        .collect();
    assert_eq!(stored, [format!("{mine}-own")]);
    for n in [&mine, &other] {
        let _ = Api::<Node>::all(admin.clone())
            .delete(n, &Default::default())
            .await;
    }
}

#[tokio::test]
async fn approval_is_a_recorded_decision_of_an_approver() {
    ensure_crds();
    let admin = client().await;
    let suite = unique_name("approval");
    let node = format!("{suite}-a");
    create_node(&admin, &node, &[]).await;
    let agent = client_for(&node_bound_kubeconfig(&node)).await;
    let approver_config = service_account_with_cluster_role("e2e-approver", "kube-fim-approver");
    let approver = client_for(&approver_config).await;
    let auditor = client_for(&service_account_with_cluster_role(
        "e2e-auditor",
        "kube-fim-viewer",
    ))
    .await;
    // Someone who may patch FileChanges' status but holds no approve verb.
    let run = kubectl([
        "create",
        "clusterrole",
        "kube-fim-e2e-status-writer",
        "--verb=get,patch",
        "--resource=filechanges.fim.kube-fim.io,filechanges.fim.kube-fim.io/status",
    ]);
    assert!(
        run.success || run.stderr.contains("AlreadyExists"),
        "{}",
        run.stderr
    );
    let writer = client_for(&service_account_with_cluster_role(
        "e2e-status-writer",
        "kube-fim-e2e-status-writer",
    ))
    .await;
    let approver_name = whoami(&approver).await;
    assert_eq!(approver_name, "system:serviceaccount:kube-fim:e2e-approver");

    let api = |c: &Client| Api::<FileChange>::all(c.clone());
    let name = format!("{node}-sudoers");
    api(&agent)
        .create(&PostParams::default(), &file_change(&name, &node, "p"))
        .await
        .unwrap();

    // The auditor reads, and can do nothing else.
    let read = api(&auditor).get(&name).await.expect("an auditor reads");
    assert_eq!(read.spec.node, node);
    assert_refused(
        approve(&auditor, &name, "looks fine").await,
        "cannot patch resource \"filechanges/status\"",
    );
    // Status write rights are not the right to approve.
    assert_refused(
        approve(&writer, &name, "trust me").await,
        "may not approve FileChanges: approving needs the approve verb on filechanges.fim.kube-fim.io (ClusterRole kube-fim-approver)",
    );
    // An approver cannot approve in someone else's name.
    assert_refused(
        api(&approver)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(approval("kube-fim-admin")),
            )
            .await,
        &format!("status.approval.approvedBy must name the approving user, {approver_name}"),
    );
    // Nor forge the agent's answer.
    assert_refused(
        api(&approver)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"outcome": "Applied"}})),
            )
            .await,
        "only the node's agent answers an approval",
    );

    // The front door: kubectl fim approve, as the approver.
    let plugin_dir = kube_fim_e2e::binary("kubectl-fim")
        .parent()
        .unwrap()
        .to_path_buf();
    let run: kube_fim_e2e::Run = std::process::Command::new("kubectl")
        .args(["fim", "approve", &name, "--reason", "CHG-42 sudo for ops"])
        .env(
            "PATH",
            format!(
                "{}:{}",
                plugin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("KUBECONFIG", Path::new(&approver_config))
        .output()
        .unwrap()
        .into();
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!("approved by {approver_name}")),
        "{}",
        run.stdout
    );
    let approved = api(&auditor).get(&name).await.unwrap();
    let record = approved
        .approval()
        .cloned()
        .expect("the approval is recorded");
    assert_eq!(record.approved_by, approver_name);
    assert_eq!(record.reason.as_deref(), Some("CHG-42 sudo for ops"));

    // It cannot be silently undone or rewritten, not even by an admin.
    assert_refused(
        api(&admin)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Json::<()>(
                    serde_json::from_value(serde_json::json!([
                        {"op": "remove", "path": "/status/approval"}
                    ]))
                    .unwrap(),
                ),
            )
            .await,
        "an approval is a record and cannot be removed once given",
    );
    assert_refused(
        api(&approver)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"status": {"approval": {"reason": "nothing to see"}}}),
                ),
            )
            .await,
        "an approval is a record and cannot be changed once given",
    );
    // The agent answers (outcome); the approval stays as it was.
    api(&agent)
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"status": {"outcome": "Applied", "message": "applied"}}),
            ),
        )
        .await
        .expect("the node's agent answers");
    let after = api(&auditor).get(&name).await.unwrap();
    assert_eq!(
        after.approval(),
        Some(&record),
        "the approval record survives"
    );
    let _ = Api::<Node>::all(admin.clone())
        .delete(&node, &Default::default())
        .await;
}

/// `kubectl auth can-i` (a SubjectAccessReview) for a kube-fim ServiceAccount.
fn can_i(sa: &str, verb: &str, resource: &str) -> bool {
    let mut args = vec![
        "auth".to_string(),
        "can-i".into(),
        verb.into(),
        "--all-namespaces".into(),
        format!("--as=system:serviceaccount:kube-fim:{sa}"),
    ];
    // `pods/log` would be read as pod "log": name the subresource.
    match resource.split_once('/') {
        Some((resource, sub)) => {
            args.push(resource.into());
            args.push(format!("--subresource={sub}"));
        }
        None => args.push(resource.into()),
    }
    kubectl(&args).stdout.trim() == "yes"
}

#[tokio::test]
async fn neither_kube_fim_account_reads_secrets_configmaps_or_logs() {
    kube_fim_e2e::ensure_rbac();
    for sa in ["kube-fim-operator", "kube-fim-agent"] {
        // Pods themselves the agent may read (process attribution names the pod
        // of a process on its node); their logs, nobody.
        for resource in ["secrets", "configmaps", "pods/log"] {
            for verb in ["get", "list", "watch"] {
                assert!(
                    !can_i(sa, verb, resource),
                    "{sa} may {verb} {resource} somewhere"
                );
            }
        }
        // And with its real token, a real request is refused.
        let run = kubectl([
            "--kubeconfig",
            service_account_kubeconfig(sa).to_str().unwrap(),
            "get",
            "secrets",
            "--all-namespaces",
        ]);
        assert!(
            !run.success && run.stderr.contains("cannot list resource \"secrets\""),
            "{sa}: {}",
            run.stderr
        );
    }
    // What they need, they have: the check above is not vacuous.
    assert!(can_i(
        "kube-fim-agent",
        "create",
        "filechanges.fim.kube-fim.io"
    ));
    assert!(can_i(
        "kube-fim-operator",
        "delete",
        "filechanges.fim.kube-fim.io"
    ));
    assert!(!can_i(
        "kube-fim-agent",
        "approve",
        "filechanges.fim.kube-fim.io"
    ));
    assert!(!can_i(
        "kube-fim-operator",
        "approve",
        "filechanges.fim.kube-fim.io"
    ));
}

/// The API server's Priority and Fairness classification of a `kubectl get fip`
/// made with `kubeconfig`: the FlowSchema and priority level UIDs it answers with.
fn classification(kubeconfig: &Path) -> (String, String) {
    let run = kubectl([
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "get",
        "fip",
        "-v=8",
    ]);
    let header = |name: &str| {
        run.stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    (
        header("X-Kubernetes-Pf-Flowschema-Uid:"),
        header("X-Kubernetes-Pf-Prioritylevel-Uid:"),
    )
}

#[tokio::test]
async fn the_agents_requests_have_a_priority_level_of_their_own() {
    ensure_crds();
    let admin = client().await;
    let node = unique_name("apf");
    create_node(&admin, &node, &[]).await;
    let uid = |kind: &str| {
        let run = kubectl([
            "get",
            kind,
            "kube-fim-agents",
            "-o",
            "jsonpath={.metadata.uid}",
        ]);
        assert!(run.success, "{kind}: {}", run.stderr);
        run.stdout
    };
    let expected = (uid("flowschema"), uid("prioritylevelconfiguration"));
    let agent = node_bound_kubeconfig(&node);
    // The API server picks new FlowSchemas up within seconds.
    kube_fim_e2e::eventually(
        "agent requests classified as kube-fim-agents",
        std::time::Duration::from_secs(30),
        || async {
            let seen = classification(&agent);
            if seen == expected {
                Ok(())
            } else {
                Err(format!("{seen:?}, expected {expected:?}"))
            }
        },
    )
    .await;
    let admin_seen = classification(&kube_fim_e2e::kubeconfig());
    assert_ne!(admin_seen.1, expected.1, "other clients are not in it");
    assert!(
        !admin_seen.1.is_empty(),
        "the header is there: {admin_seen:?}"
    );
    let _ = Api::<Node>::all(admin.clone())
        .delete(&node, &Default::default())
        .await;
}
