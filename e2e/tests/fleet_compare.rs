//! Rollouts across the fleet and fleet comparison, against the real API
//! server: real agents with node-bound tokens, the operator with its own
//! ServiceAccount, `kubectl fim` as a user runs it.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube_fim_crds::rollout::Transition;
use kube_fim_crds::{ApprovalOutcome, Attribute, FileChange, FileIntegrityNode};
use kube_fim_e2e::fleet::{Fleet, entry};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::{
    Entry, Run, binary, client, client_for, eventually, kubeconfig, metric_where,
    node_bound_kubeconfig, unique_name, whoami,
};

/// Runs `kubectl fim ARGS` as the admin, with the plugin's directory first on PATH.
fn kubectl_fim(args: &[&str]) -> Run {
    let dir = binary("kubectl-fim").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("kubectl")
        .arg("fim")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .expect("kubectl runs")
        .into()
}

/// The change of `path` reported by `node`.
async fn change_of(fleet: &Fleet, node: &str, path: &str) -> Result<FileChange, String> {
    fleet
        .changes(node)
        .await
        .into_iter()
        .find(|c| c.spec.path == path)
        .ok_or_else(|| format!("no change of {path} on {node} yet"))
}

async fn warning(client: &kube::Client, reason: &str, about: &str) -> Result<Event, String> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?
        .items
        .into_iter()
        .find(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(about)
        })
        .ok_or_else(|| format!("no {reason} Event about {about}"))
}

#[tokio::test]
async fn a_rollout_with_an_outlier_is_approved_in_one_command_and_a_drifted_node_is_named() {
    let client = client().await;
    let suite = unique_name("fleetcmp");
    let mut fleet = Fleet::new(client.clone(), &suite, 4).await;
    let names: Vec<String> = fleet.nodes.iter().map(|n| n.name.clone()).collect();
    let (a, b, c, d) = (&names[0], &names[1], &names[2], &names[3]);
    for n in &fleet.nodes {
        std::fs::write(n.host("/etc/app.conf"), "v=1\n").unwrap();
    }
    // Node d's tool differed before any agent ran: no change is ever reported
    // for it, only the comparison with its pool can tell.
    std::fs::write(
        fleet.nodes[3].host("/usr/bin/tool"),
        "#!/bin/sh\necho trojan\n",
    )
    .unwrap();

    let policy = format!("{suite}-p");
    let p = fleet.policy(
        &policy,
        vec![
            entry("app", "/etc/app.conf", false),
            // Attributes that mean the same on every node: comparable across the fleet.
            Entry::new("tool", "/usr/bin/tool")
                .attributes(&[
                    Attribute::Hash,
                    Attribute::Type,
                    Attribute::Mode,
                    Attribute::Uid,
                    Attribute::Gid,
                ])
                .into(),
        ],
    );
    fleet.create_policy(&p).await;
    for n in &mut fleet.nodes {
        n.start_agent();
    }
    for n in &names {
        fleet.wait_ready(n, &policy, Duration::from_secs(90)).await;
    }
    let operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);

    // The same change on a and b, another on c.
    for (i, content) in [(0, "v=2\n"), (1, "v=2\n"), (2, "v=3\n")] {
        std::fs::write(fleet.nodes[i].host("/etc/app.conf"), content).unwrap();
    }
    let mut reported = Vec::new();
    for n in [a, b, c] {
        reported.push(
            eventually(
                &format!("the change on {n}"),
                Duration::from_secs(60),
                || change_of(&fleet, n, "/etc/app.conf"),
            )
            .await,
        );
    }
    let id = Transition::of(&reported[0].spec).unwrap().id();
    assert_eq!(Transition::of(&reported[1].spec).unwrap().id(), id);

    // `kubectl fim rollouts`: the rollout on two nodes, c named as the outlier.
    let listed = eventually(
        "the rollout in kubectl fim rollouts",
        Duration::from_secs(60),
        || async {
            let run = kubectl_fim(&["rollouts", "--policy", &policy, "-o", "json"]);
            if !run.success {
                return Err(run.stderr);
            }
            let rows: serde_json::Value =
                serde_json::from_str(&run.stdout).map_err(|e| e.to_string())?;
            let row = rows
                .as_array()
                .and_then(|r| r.iter().find(|r| r["id"] == id.as_str()).cloned())
                .ok_or_else(|| run.stdout.clone())?;
            if row["outliers"] == serde_json::json!([c]) {
                Ok(row)
            } else {
                Err(run.stdout)
            }
        },
    )
    .await;
    assert_eq!(listed["nodes"], 2, "{listed}");
    assert_eq!(listed["approved"], 0, "{listed}");
    assert_eq!(listed["path"], "/etc/app.conf");
    assert_eq!(listed["policy"], policy.as_str());
    let table = kubectl_fim(&["rollouts"]);
    assert!(table.success, "{}", table.stderr);
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} in\n{}", table.stdout));
    assert!(
        row.contains("/etc/app.conf") && row.contains(c.as_str()),
        "{row}"
    );

    let outlier = eventually(
        "RolloutOutlier on the policy",
        Duration::from_secs(30),
        || warning(&client, "RolloutOutlier", &policy),
    )
    .await;
    let note = outlier.note.unwrap_or_default();
    assert!(
        note.contains(c.as_str()) && note.contains("/etc/app.conf"),
        "{note}"
    );

    // An agent's token cannot put a change in another node's name, so it
    // cannot slip one into the rollout there, nor frame another node.
    let d_token = client_for(&node_bound_kubeconfig(d)).await;
    let mut forged = reported[0].clone();
    forged.metadata = kube::api::ObjectMeta {
        name: Some(format!("{d}-forged-rollout")),
        ..Default::default()
    };
    forged.status = None;
    let refused = Api::<FileChange>::all(d_token)
        .create(&PostParams::default(), &forged)
        .await
        .expect_err("a change in node a's name from node d's token");
    assert!(
        refused
            .to_string()
            .contains("only report changes of its own node"),
        "{refused}"
    );

    // Nor can it publish another node's entry digests to make that node the
    // fleet's outlier: each node writes only its own FileIntegrityNode.
    let frame = serde_json::json!({"status": {"entries": [{
        "policy": policy, "entry": "tool", "digest": "v2-framed", "files": 1
    }]}});
    let refused = Api::<FileIntegrityNode>::all(client_for(&node_bound_kubeconfig(d)).await)
        .patch_status(a, &PatchParams::default(), &Patch::Merge(&frame))
        .await
        .expect_err("node a's record from node d's token");
    assert!(
        refused
            .to_string()
            .contains("may only write its own node's FileIntegrityNode"),
        "{refused}"
    );

    // One approval for the rollout: a and b, in the approver's name; not c.
    let run = kubectl_fim(&["rollouts", "approve", &id, "--reason", "CHG-7"]);
    assert!(run.success, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("approved 2, skipped 0"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(c.as_str()),
        "the outlier is said: {}",
        run.stdout
    );
    let me = whoami(&client).await;
    for n in [a, b] {
        let applied = eventually(
            &format!("the approval applied on {n}"),
            Duration::from_secs(60),
            || async {
                let fc = change_of(&fleet, n, "/etc/app.conf").await?;
                let s = fc.status.clone().unwrap_or_default();
                match s.outcome {
                    Some(ApprovalOutcome::Applied) => Ok(fc),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        let approval = applied.approval().unwrap();
        assert_eq!(approval.approved_by, me);
        assert_eq!(approval.reason.as_deref(), Some("CHG-7"));
    }
    let c_change = change_of(&fleet, c, "/etc/app.conf").await.unwrap();
    assert!(c_change.approval().is_none(), "the outlier is not approved");
    // A second approval of the same rollout approves nothing more.
    let again = kubectl_fim(&["rollouts", "approve", &id, "--policy", &policy]);
    assert!(again.success, "{}", again.stderr);
    assert!(
        again.stdout.contains("approved 0, skipped 2"),
        "{}",
        again.stdout
    );

    // Fleet comparison: d's tool differs from the three others.
    let fleet_rows = eventually(
        "d in kubectl fim fleet",
        Duration::from_secs(60),
        || async {
            let run = kubectl_fim(&["fleet", "-o", "json"]);
            if !run.success {
                return Err(run.stderr);
            }
            let rows: serde_json::Value =
                serde_json::from_str(&run.stdout).map_err(|e| e.to_string())?;
            rows.as_array()
                .and_then(|r| r.iter().find(|r| r["policy"] == policy.as_str()).cloned())
                .ok_or(run.stdout)
        },
    )
    .await;
    assert_eq!(fleet_rows["entry"], "tool", "{fleet_rows}");
    assert_eq!(
        fleet_rows["outliers"],
        serde_json::json!([d]),
        "{fleet_rows}"
    );
    assert_eq!(fleet_rows["majority"], 3, "{fleet_rows}");
    let drift = eventually("FleetDrift on node d", Duration::from_secs(30), || {
        warning(&client, "FleetDrift", d)
    })
    .await;
    assert!(drift.note.unwrap_or_default().contains("tool"));
    let metrics = operator.metrics().unwrap_or_default();
    for (name, want) in [
        ("kube_fim_operator_rollouts", 1.0),
        ("kube_fim_operator_rollout_outliers", 1.0),
        ("kube_fim_operator_fleet_outliers", 1.0),
    ] {
        assert_eq!(
            metric_where(&metrics, name, &[("policy", policy.as_str())]),
            Some(want),
            "{name}"
        );
    }
    // The app entry compares inodes and times: never compared across nodes,
    // so a, b and c (which differ from d there) are no fleet outliers.
    let policy_obj = Api::<kube_fim_crds::FileIntegrityPolicy>::all(client.clone())
        .get(&policy)
        .await
        .unwrap();
    let outliers = policy_obj.status.unwrap().fleet_outliers;
    assert_eq!(
        outliers
            .iter()
            .map(|o| (o.node.as_str(), o.entry.as_str()))
            .collect::<Vec<_>>(),
        [(d.as_str(), "tool")]
    );
    drop(operator);
    fleet.cleanup().await;
}
