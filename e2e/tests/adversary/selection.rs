//! Selection: cordon, NotReady, a policy that stops selecting a node.

use super::*;

/// Cordon, the taints that come with it and a label change in between: the
/// change made while the node was cordoned is reported in real time, and the
/// policy stays Ready throughout.
#[tokio::test]
async fn cordon_never_changes_what_is_monitored() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let run = kubectl(["cordon", a.as_str()]);
    assert!(run.success, "{}", run.stderr);
    // The controller taints a cordoned node; a custom NoSchedule taint too.
    let run = kubectl(["taint", "node", a.as_str(), "dedicated=db:NoSchedule"]);
    assert!(run.success, "{}", run.stderr);
    eventually("the unschedulable taint", SEEN, || async {
        let n = Api::<Node>::all(client.clone()).get(&a).await.unwrap();
        let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
        taints
            .iter()
            .any(|t| t.key == "node.kubernetes.io/unschedulable")
            .then_some(())
            .ok_or_else(|| format!("{taints:?}"))
    })
    .await;
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.66 evil\n").unwrap();
    let c = wait_change(&fleet, &a, "Modified /etc/hosts").await;
    assert_eq!(c.spec.source, DetectionSource::Realtime);
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Ready)
    );

    let run = kubectl(["uncordon", a.as_str()]);
    assert!(run.success, "{}", run.stderr);
    std::fs::write(
        fleet.nodes[0].host("/etc/passwd"),
        "evil:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(
        fleet.changes(&a).await.len(),
        2,
        "no silent re-baseline, no duplicate"
    );
    fleet.cleanup().await;
}

/// A node whose kubelet stops posting status: the real node lifecycle
/// controller marks it NotReady and taints it unreachable; its agent keeps
/// monitoring and reporting.
#[tokio::test]
async fn a_node_gone_not_ready_keeps_being_monitored() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    fleet.nodes[0].stop_kubelet();
    eventually(
        "the node lifecycle controller taints the node unreachable",
        Duration::from_secs(150),
        || async {
            let n = Api::<Node>::all(client.clone()).get(&a).await.unwrap();
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            taints
                .iter()
                .any(|t| t.key == "node.kubernetes.io/unreachable")
                .then_some(())
                .ok_or_else(|| format!("{taints:?}"))
        },
    )
    .await;
    std::fs::write(
        fleet.nodes[0].host("/etc/ssh/sshd_config"),
        "PermitRootLogin yes\n",
    )
    .unwrap();
    let c = wait_change(&fleet, &a, "Modified /etc/ssh/sshd_config").await;
    assert_eq!(c.spec.source, DetectionSource::Realtime);
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Ready)
    );
    fleet.cleanup().await;
}

/// A policy that stops selecting a node keeps that node's baseline; selected
/// again, the change made in between is reported with source Startup.
#[tokio::test]
async fn a_policy_that_stops_selecting_a_node_keeps_its_baseline() {
    let client = client().await;
    let suite = unique_name("adv");
    let operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let nodes: Api<Node> = Api::all(client.clone());
    let relabel = |role: String| {
        let nodes = nodes.clone();
        let a = a.clone();
        async move {
            let patch = serde_json::json!({"metadata": {"labels": {"role": role}}});
            nodes
                .patch(&a, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    // The node takes itself out (a kubelet may change unprefixed labels of
    // its own Node): its agent says so, and the security team sees it.
    relabel(format!("{suite}-elsewhere")).await;
    eventually("the policy is no longer served", SEEN, || async {
        match phase(&client, &a, &policy).await {
            Some(NodePolicyPhase::Unselected) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    eventually(
        "the policy Degraded: NodeLeftMonitoring",
        OPERATOR,
        || async {
            let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
            let s = p.status.unwrap_or_default();
            let d = s.conditions.iter().find(|c| c.type_ == "Degraded");
            match d {
                Some(d)
                    if d.status == "True"
                        && d.reason == "NodeLeftMonitoring"
                        && d.message.contains(&a)
                        && s.nodes_left == Some(1) =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?} left={:?}", s.nodes_left)),
            }
        },
    )
    .await;
    let left = wait_policy_warning(&client, "NodeLeftMonitoring", &policy).await;
    assert!(
        left.note.as_deref().unwrap_or_default().contains(&a),
        "{left:?}"
    );
    let series = format!("kube_fim_operator_policy_nodes{{policy=\"{policy}\",state=\"left\"}}");
    eventually("the left-nodes metric", OPERATOR, || async {
        match operator.metrics().and_then(|m| metric(&m, &series)) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.66 evil\n").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    relabel(suite.clone()).await;
    let c = wait_change(&fleet, &a, "Modified /etc/hosts").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    assert_eq!(fleet.changes(&a).await.len(), 1);
    eventually("back in monitoring, nobody has left", OPERATOR, || async {
        let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
        match p.status.and_then(|s| s.nodes_left) {
            Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    fleet.cleanup().await;
}
