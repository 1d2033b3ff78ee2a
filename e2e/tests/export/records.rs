//! Approvals and alarms reach sinks as records of their own.

use super::*;

/// An approval is evidence too: a change already delivered, then approved
/// by a person, reaches the sink a second time as its own event — id
/// `<change>/approval`, the approver and the reason, no longer an alert — once,
/// in its node's order after what was delivered before it.
#[tokio::test(flavor = "multi_thread")]
async fn an_approval_of_a_delivered_change_reaches_the_sink_as_its_own_event() {
    ensure_export_rbac();
    let suite = unique_name("exp-approve");
    let _operator = Operator::start(&suite, &suite, &[]);
    let (_dir, path, file_sink, sinks) = file_sink(&suite).await;
    let node = format!("{suite}-a");
    let names = create_changes(&node, "p", &format!("{suite}-a"), 2).await;
    let delivered = |want: Vec<String>| {
        let (path, node) = (path.clone(), node.clone());
        move || {
            let (path, node, want) = (path.clone(), node.clone(), want.clone());
            async move {
                let got = ocsf_ids(&file_events(&path), &node);
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            }
        }
    };
    eventually(
        "both changes delivered",
        Duration::from_secs(120),
        delivered(names.clone()),
    )
    .await;

    let admin = client().await;
    kube_fim_e2e::approve(&admin, &names[0], "CHG-42")
        .await
        .unwrap();
    let mut want = names.clone();
    want.push(format!("{}/approval", names[0]));
    eventually(
        "the approval delivered after the changes",
        Duration::from_secs(60),
        delivered(want.clone()),
    )
    .await;
    let events = file_events(&path);
    let approval = events
        .iter()
        .find(|e| e["metadata"]["uid"] == want[2].as_str())
        .unwrap();
    assert_eq!(approval["is_alert"], false);
    assert_eq!(approval["unmapped"]["approval"]["reason"], "CHG-42");
    assert_eq!(
        approval["unmapped"]["approval"]["approvedBy"],
        kube_fim_e2e::whoami(&admin).await.as_str()
    );
    assert_eq!(approval["file"]["path"], "/etc/exported-0");
    // Once: a later status write (the agent's answer) sends nothing again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ocsf_ids(&file_events(&path), &node), want);
    sinks
        .delete(&file_sink.metadata.name.unwrap(), &DeleteParams::default())
        .await
        .unwrap();
}

/// A node's alarms (the baseline alarm its agent raises, an evidence gap the
/// operator records on its record) are evidence as much as its changes: each
/// reaches the sink once, under a stable id, in the node's order; the same
/// alarm written again is nothing new.
#[tokio::test(flavor = "multi_thread")]
async fn a_nodes_alarms_reach_the_sink_once_each_with_stable_ids() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::{Patch, PatchParams};
    use kube_fim_crds::FileIntegrityNode;

    ensure_export_rbac();
    let suite = unique_name("exp-alarm");
    let _operator = Operator::start(&suite, &suite, &[]);
    let (_dir, path, file_sink, sinks) = file_sink(&suite).await;
    let admin = client().await;
    let (node, agent) = node_with_record(&suite).await;
    let names = create_changes(&node, "p", &node, 1).await;
    let delivered = |want: Vec<String>| {
        let (path, node) = (path.clone(), node.clone());
        move || {
            let (path, node, want) = (path.clone(), node.clone(), want.clone());
            async move {
                let got = ocsf_ids(&file_events(&path), &node);
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            }
        }
    };
    eventually(
        "the change delivered",
        Duration::from_secs(120),
        delivered(names.clone()),
    )
    .await;

    // The node's own agent (its node-bound token) raises a baseline alarm.
    let raise = serde_json::json!({ "status": { "baselineAlarm": {
        "id": "b1", "reason": "BaselineTampered",
        "since": Time(Timestamp::now()),
        "message": "the baseline on this node is not the one the cluster knows",
    }}});
    Api::<FileIntegrityNode>::all(agent.clone())
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&raise))
        .await
        .expect("the agent raises its alarm");
    let mut want = names.clone();
    want.push(format!("{node}/baseline/b1"));
    eventually(
        "the baseline alarm delivered after the change",
        Duration::from_secs(60),
        delivered(want.clone()),
    )
    .await;
    let events = file_events(&path);
    let alarm = events
        .iter()
        .find(|e| e["metadata"]["uid"] == want[1].as_str())
        .unwrap();
    assert_eq!(alarm["is_alert"], true);
    assert_eq!(alarm["severity"], "High");
    assert_eq!(alarm["activity_id"], 99);
    assert_eq!(alarm["activity_name"], "BaselineTampered");
    assert_eq!(alarm["class_uid"], 1001);

    // The operator records an evidence gap (written here as it writes one:
    // server-side apply of status.verification).
    let gap = serde_json::json!({
        "apiVersion": "fim.kube-fim.io/v1alpha1", "kind": "FileIntegrityNode",
        "status": { "verification": {
            "verifiedThrough": 9, "from": 0, "since": Time(Timestamp::now()),
            "gaps": [{ "first": 5, "last": 7, "reason": "Missing", "since": Time(Timestamp::now()) }],
        }},
    });
    Api::<FileIntegrityNode>::all(admin.clone())
        .patch_status(
            &node,
            &PatchParams::apply("kube-fim-operator").force(),
            &Patch::Apply(&gap),
        )
        .await
        .expect("the gap recorded");
    want.push(format!("{node}/gap/5-7/Missing"));
    eventually(
        "the evidence gap delivered",
        Duration::from_secs(60),
        delivered(want.clone()),
    )
    .await;
    let events = file_events(&path);
    let gap = events
        .iter()
        .find(|e| e["metadata"]["uid"] == want[2].as_str())
        .unwrap();
    assert_eq!(gap["activity_name"], "EvidenceGap");
    assert_eq!(gap["is_alert"], true);

    // The agent republishing its alarm, unchanged, sends nothing again.
    Api::<FileIntegrityNode>::all(agent.clone())
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&raise))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ocsf_ids(&file_events(&path), &node), want, "once each");
    sinks
        .delete(&file_sink.metadata.name.unwrap(), &DeleteParams::default())
        .await
        .unwrap();
}

/// A node's agent (or root on it, with its token) backdates the alarm it
/// raises to before what the sink already delivered of that node, while no
/// operator leads: a position alone would count it as delivered. The next
/// operator sends it all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_backdated_alarm_raised_while_no_operator_leads_still_reaches_the_sink() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::{Patch, PatchParams};
    use kube_fim_crds::FileIntegrityNode;

    ensure_export_rbac();
    let suite = unique_name("exp-backdate");
    let mut operator = Operator::start(&suite, &suite, &[]);
    let (_dir, path, file_sink, sinks) = file_sink(&suite).await;
    let name = file_sink.metadata.name.clone().unwrap();
    let (node, agent) = node_with_record(&suite).await;
    let records = Api::<FileIntegrityNode>::all(agent.clone());
    let names = create_changes(&node, "p", &node, 1).await;
    eventually(
        "the change delivered and recorded",
        Duration::from_secs(60),
        || {
            let sinks = sinks.clone();
            let (name, node, last) = (name.clone(), node.clone(), names[0].clone());
            async move {
                let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
                let st = s.status.unwrap_or_default();
                match st.positions.iter().find(|p| p.node == node) {
                    Some(p) if p.name == last => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;

    operator.process.kill();
    let backdated = Timestamp::now() - Duration::from_secs(3600);
    records
        .patch_status(
            &node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": { "baselineAlarm": {
                "id": "old", "reason": "BaselineMissing", "since": Time(backdated),
                "message": "the baseline on this node is missing",
            }}})),
        )
        .await
        .expect("the agent raises its alarm");
    let _operator = Operator::start(&suite, &suite, &[]);
    let mut want = names.clone();
    want.push(format!("{node}/baseline/old"));
    eventually(
        "the backdated alarm delivered by the next operator",
        Duration::from_secs(90),
        || {
            let (path, node, want) = (path.clone(), node.clone(), want.clone());
            async move {
                let got = ocsf_ids(&file_events(&path), &node);
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            }
        },
    )
    .await;
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

/// A node whose FileChanges arrive far faster than its agent ever sends them
/// (its token used by hand) is a `ChangeFlood`: the operator records it on the
/// node's FileIntegrityNode, where the node's own token cannot erase it, and
/// every sink receives it as an alarm with a stable id.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_changes_reaches_the_sink_as_an_alarm_the_node_cannot_erase() {
    use kube::api::{Patch, PatchParams};
    use kube_fim_crds::FileIntegrityNode;

    ensure_export_rbac();
    let suite = unique_name("exp-flood");
    let _operator = Operator::start(&suite, &suite, &[]);
    let (_dir, path, file_sink, sinks) = file_sink(&suite).await;
    let admin = client().await;
    let (node, agent) = node_with_record(&suite).await;
    let records = Api::<FileIntegrityNode>::all(agent.clone());
    // Past the floor of 120 a minute a node with no policy is allowed.
    create_changes(&node, "p", &node, 130).await;
    let alarm = eventually(
        "the flood delivered as an alarm",
        Duration::from_secs(90),
        || {
            let (path, node) = (path.clone(), node.clone());
            async move {
                file_events(&path)
                    .into_iter()
                    .find(|e| {
                        e["metadata"]["uid"]
                            .as_str()
                            .is_some_and(|id| id.starts_with(&format!("{node}/flood/")))
                    })
                    .ok_or_else(|| "no flood alarm yet".to_string())
            }
        },
    )
    .await;
    assert_eq!(alarm["activity_name"], "ChangeFlood");
    assert_eq!(alarm["is_alert"], true);
    let message = alarm["message"].as_str().unwrap_or_default();
    assert!(message.contains("more than the 120"), "{alarm}");

    // The node's own token cannot erase the record of it.
    let erase = serde_json::json!({ "status": { "floods": null } });
    kube_fim_e2e::assert_refused(
        records
            .patch_status(&node, &PatchParams::default(), &Patch::Merge(&erase))
            .await,
        "status.floods is the operator's",
    );
    let stored = Api::<FileIntegrityNode>::all(admin.clone())
        .get(&node)
        .await
        .unwrap();
    assert_eq!(stored.status.unwrap_or_default().floods.len(), 1);
    sinks
        .delete(&file_sink.metadata.name.unwrap(), &DeleteParams::default())
        .await
        .unwrap();
}

/// A storm in one policy entry (more changes detected in a minute than the
/// policy's cap: the agent paces them) is a `ChangeStorm`: the operator
/// finds it in the node's FileChanges, records it on the node's
/// FileIntegrityNode, where the node's own token cannot erase it, and every
/// sink receives it as an alarm of that entry with a stable id, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_storm_reaches_the_sink_as_an_alarm_the_node_cannot_erase() {
    use kube::api::{Patch, PatchParams};
    use kube_fim_crds::{FileIntegrityNode, FileIntegrityPolicy};
    use kube_fim_e2e::{Entry, Policy};

    ensure_export_rbac();
    let suite = unique_name("exp-storm");
    let _operator = Operator::start(&suite, &suite, &[]);
    let admin = client().await;
    let policy = format!("{suite}-p");
    Api::<FileIntegrityPolicy>::all(admin.clone())
        .create(
            &PostParams::default(),
            &Policy::named(&policy)
                .label(SUITE_LABEL, &suite)
                .node_selector("role", &suite)
                .path(Entry::new("etc", "/etc").recursive())
                .max_changes_per_node_per_minute(5)
                .build(),
        )
        .await
        .unwrap();
    let (_dir, path, file_sink, sinks) = file_sink(&suite).await;
    let (node, agent) = node_with_record(&suite).await;
    let records = Api::<FileIntegrityNode>::all(agent.clone());
    // Six changes of entry `etc` detected within a minute, against a cap of
    // five; they arrive one by one (as paced).
    let start = Timestamp::now();
    let mut names = Vec::new();
    for i in 0..6 {
        names.extend(
            create_changes_at(
                &node,
                &policy,
                &format!("{node}-{i}"),
                1,
                start + Duration::from_secs(i),
            )
            .await,
        );
    }
    let id = format!("{node}/storm/{policy}/etc/{}", start.as_second());
    let alarm = eventually(
        "the storm delivered as an alarm",
        Duration::from_secs(90),
        || {
            let (path, id) = (path.clone(), id.clone());
            async move {
                file_events(&path)
                    .into_iter()
                    .find(|e| e["metadata"]["uid"] == id.as_str())
                    .ok_or_else(|| "no storm alarm yet".to_string())
            }
        },
    )
    .await;
    assert_eq!(alarm["activity_name"], "ChangeStorm");
    assert_eq!(alarm["is_alert"], true);
    assert_eq!(alarm["unmapped"]["entry"], "etc");
    let message = alarm["message"].as_str().unwrap_or_default();
    assert!(message.contains("more than its cap of 5"), "{alarm}");

    // The node's own token cannot erase the record of it.
    let erase = serde_json::json!({ "status": { "storms": null } });
    kube_fim_e2e::assert_refused(
        records
            .patch_status(&node, &PatchParams::default(), &Patch::Merge(&erase))
            .await,
        "status.storms is the operator's",
    );
    // More of the same storm extend its record: the same alarm, once.
    create_changes_at(
        &node,
        &policy,
        &format!("{node}-7"),
        3,
        start + Duration::from_secs(7),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored = Api::<FileIntegrityNode>::all(admin.clone())
        .get(&node)
        .await
        .unwrap();
    assert_eq!(stored.status.unwrap_or_default().storms.len(), 1);
    let ids = ocsf_ids(&file_events(&path), &node);
    assert_eq!(ids.iter().filter(|i| **i == id).count(), 1, "{ids:?}");
    sinks
        .delete(&file_sink.metadata.name.unwrap(), &DeleteParams::default())
        .await
        .unwrap();
}

/// A file sink of the suite in a directory of its own: the directory (kept
/// while it lives), the file, the sink and its API.
async fn file_sink(
    suite: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    FileChangeSink,
    Api<FileChangeSink>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.ndjson");
    let file_sink = sink(
        &format!("{suite}-file"),
        suite,
        FileChangeSinkSpec::with_file(path.to_str().unwrap()),
    );
    let sinks = create_sink(&file_sink).await;
    (dir, path, file_sink, sinks)
}
