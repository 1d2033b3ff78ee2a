//! Tampering with the node's state: a wiped state directory, a baseline rebuilt offline, the node's own token against its record.

use super::*;

/// The state directory wiped while the agent is down, a monitored file edited:
/// an alarm (Event, metric, policy Failed) that names the entry and the file,
/// until an admin clears it with a recorded act.
#[tokio::test]
async fn a_wiped_state_directory_is_an_alarm_naming_the_file() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-p");
    fleet
        .create_policy(&fleet.policy(
            &policy,
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("ssh", "/etc/ssh", true),
            ],
        ))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    eventually("entry digests published", SEEN, || async {
        let entries = record(&client, &a)
            .await
            .status
            .map(|s| s.entries)
            .unwrap_or_default();
        (entries.len() == 2)
            .then_some(())
            .ok_or(format!("{entries:?}"))
    })
    .await;
    fleet.nodes[0].kill_agent();

    std::fs::write(
        fleet.nodes[0].host("/etc/passwd"),
        "evil:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    let state = fleet.nodes[0].state.clone();
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    fleet.nodes[0].start_agent();

    wait_warning(&client, "BaselineMissing", &a).await;
    let differ = wait_warning(&client, "BaselineEntriesDiffer", &a).await;
    let note = differ.note.unwrap_or_default();
    assert!(note.contains(&format!("{policy}/passwd")), "{note}");
    assert!(!note.contains(&format!("{policy}/ssh")), "{note}");
    let c = wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    assert_eq!(c.spec.category, ChangeCategory::Modified);
    let text = fleet.nodes[0].metrics().unwrap();
    assert_eq!(
        metric(
            &text,
            &format!("kube_fim_agent_baseline_tampered{{node=\"{a}\"}}")
        ),
        Some(1.0)
    );
    let alarm = eventually("policy Failed with the alarm", SEEN, || async {
        let r = record(&client, &a).await;
        let s = r.status.unwrap_or_default();
        match (s.baseline_alarm, s.policies.first().map(|p| p.phase)) {
            (Some(alarm), Some(NodePolicyPhase::Failed)) => Ok(alarm),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(alarm.reason, "BaselineMissing");
    // A restart does not clear it.
    fleet.nodes[0].kill_agent();
    fleet.nodes[0].start_agent();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Failed)
    );

    // The recorded act: an annotation naming the alarm.
    let run = kubectl([
        "annotate".to_string(),
        "fileintegritynode".to_string(),
        a.clone(),
        format!("{CLEAR_BASELINE_ALARM}={}", alarm.id),
    ]);
    assert!(run.success, "{}", run.stderr);
    fleet.wait_ready(&a, &policy, Duration::from_secs(60)).await;
    let text = fleet.nodes[0].metrics().unwrap();
    assert_eq!(
        metric(
            &text,
            &format!("kube_fim_agent_baseline_tampered{{node=\"{a}\"}}")
        ),
        Some(0.0)
    );
    fleet.cleanup().await;
}

/// Issue 21, attack 4 (the cluster half): the node's own token cannot erase
/// its record (baseline digest, entry digests, a raised alarm), and not even
/// a cluster admin removes an alarm except by the recorded act (the
/// annotation naming it).
#[tokio::test]
async fn the_nodes_own_token_cannot_erase_its_record() {
    use kube_fim_crds::{
        BaselineAlarm, EntryDigest, FileIntegrityNodeSpec, FileIntegrityNodeStatus,
        NodePolicyStatus,
    };
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let records = |c: &kube::Client| Api::<FileIntegrityNode>::all(c.clone());
    records(&agent)
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    let alarm = BaselineAlarm {
        id: format!("{suite}-alarm"),
        reason: "BaselineMissing".into(),
        since: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ),
        message: "the baseline on this node is missing".into(),
    };
    let status = FileIntegrityNodeStatus {
        baseline_digest: Some("a".repeat(64)),
        policies: vec![NodePolicyStatus {
            policy: "p".into(),
            phase: NodePolicyPhase::Failed,
            ..NodePolicyStatus::default()
        }],
        entries: vec![EntryDigest {
            policy: "p".into(),
            entry: "passwd".into(),
            digest: format!("v2-{}", "b".repeat(61)),
            files: 1,
            path: Some("/etc/passwd".into()),
        }],
        baseline_alarm: Some(alarm.clone()),
        ..FileIntegrityNodeStatus::default()
    };
    let pp = PatchParams::default();
    let status_patch = |v: serde_json::Value| Patch::Merge(serde_json::json!({ "status": v }));
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::to_value(&status).unwrap()),
        )
        .await
        .expect("the agent publishes its digests and raises an alarm");

    for (who, name) in [(&agent, "the agent"), (&admin, "a cluster admin")] {
        eprintln!("as {name}");
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"baselineDigest": null})),
                )
                .await,
            "status.baselineDigest cannot be removed once published",
        );
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"entries": []})),
                )
                .await,
            "status.entries cannot be emptied once published",
        );
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"baselineAlarm": null})),
                )
                .await,
            &format!(
                "status.baselineAlarm {} can only be cleared by annotating this FileIntegrityNode with {CLEAR_BASELINE_ALARM}={}",
                alarm.id, alarm.id
            ),
        );
        let mut replaced = alarm.clone();
        replaced.id = format!("{suite}-other");
        replaced.reason = "BaselineTampered".into();
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"baselineAlarm": replaced})),
                )
                .await,
            "can only be cleared by annotating",
        );
    }

    // What the agent does in normal operation still passes: the baseline
    // moves with approvals, the alarm's message grows, the entries change.
    let mut grown = alarm.clone();
    grown
        .message
        .push_str("; entries that differ from what the cluster last saw: p/passwd");
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::json!({
                "baselineDigest": "c".repeat(64),
                "baselineAlarm": grown,
                "entries": [{"policy": "p", "entry": "passwd", "digest": format!("v2-{}", "d".repeat(61)), "files": 1}],
            })),
        )
        .await
        .expect("the agent's normal writes pass");

    // The recorded act, then the agent clears the alarm it names.
    let run = kubectl([
        "annotate".to_string(),
        "fileintegritynode".to_string(),
        node.clone(),
        format!("{CLEAR_BASELINE_ALARM}={}", alarm.id),
    ]);
    assert!(run.success, "{}", run.stderr);
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::json!({"baselineAlarm": null})),
        )
        .await
        .expect("the agent clears an alarm the admin's annotation names");
    let stored = records(&admin).get(&node).await.unwrap().status.unwrap();
    assert_eq!(stored.baseline_alarm, None);
    assert_eq!(stored.baseline_digest, Some("c".repeat(64)));
    assert_eq!(stored.entries.len(), 1);
    // A node no policy selects any more publishes no entries, and may say so.
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::json!({"policies": [], "entries": []})),
        )
        .await
        .expect("a node serving no policy has no entries");
    delete_node(&admin, &node).await;
}

/// Issue 21, attack 4 end to end: the agent stopped, its state directory
/// wiped, a monitored file edited, and the node's own token used to erase
/// what the cluster holds (baseline digest, entry digests) before the agent
/// comes back: admission refuses, so the restart is an alarm naming the file,
/// not a fresh baseline; the same token cannot clear that alarm either.
#[tokio::test]
async fn a_wiped_node_cannot_erase_its_record_before_restarting() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-p");
    fleet
        .create_policy(&fleet.policy(
            &policy,
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("ssh", "/etc/ssh", true),
            ],
        ))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    eventually("entry digests published", SEEN, || async {
        let entries = record(&client, &a)
            .await
            .status
            .map(|s| s.entries)
            .unwrap_or_default();
        (entries.len() == 2)
            .then_some(())
            .ok_or(format!("{entries:?}"))
    })
    .await;
    let token = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&a)).await;
    let records = Api::<FileIntegrityNode>::all(token.clone());
    fleet.nodes[0].kill_agent();

    std::fs::write(
        fleet.nodes[0].host("/etc/passwd"),
        "evil:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    let state = fleet.nodes[0].state.clone();
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    let erase = serde_json::json!({"status": {
        "baselineDigest": null, "entries": [], "baselineAlarm": null,
    }});
    assert_refused(
        records
            .patch_status(&a, &PatchParams::default(), &Patch::Merge(&erase))
            .await,
        "status.baselineDigest cannot be removed once published",
    );
    assert_refused(
        records
            .patch_status(
                &a,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"entries": []}})),
            )
            .await,
        "status.entries cannot be emptied once published",
    );
    let kept = record(&client, &a).await.status.unwrap();
    assert!(kept.baseline_digest.is_some());
    assert_eq!(kept.entries.len(), 2);
    fleet.nodes[0].start_agent();

    wait_warning(&client, "BaselineMissing", &a).await;
    let differ = wait_warning(&client, "BaselineEntriesDiffer", &a).await;
    let note = differ.note.unwrap_or_default();
    assert!(note.contains(&format!("{policy}/passwd")), "{note}");
    let c = wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    let alarm = eventually("policy Failed with the alarm", SEEN, || async {
        let s = record(&client, &a).await.status.unwrap_or_default();
        match (s.baseline_alarm, s.policies.first().map(|p| p.phase)) {
            (Some(alarm), Some(NodePolicyPhase::Failed)) => Ok(alarm),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The node's token cannot clear it: only the admin's annotation can.
    assert_refused(
        records
            .patch_status(
                &a,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"baselineAlarm": null}})),
            )
            .await,
        &format!(
            "status.baselineAlarm {} can only be cleared by annotating this FileIntegrityNode",
            alarm.id
        ),
    );
    fleet.nodes[0].kill_agent();
    fleet.nodes[0].start_agent();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Failed)
    );
    assert_eq!(
        record(&client, &a)
            .await
            .status
            .unwrap()
            .baseline_alarm
            .map(|x| x.id),
        Some(alarm.id)
    );
    fleet.cleanup().await;
}

// Issue 21, attack 3 and attack 7 (agent half): the node's state vouches for
// nothing; what the cluster holds (published entry digests, approvals the
// agent answered) is what a baseline is checked against.
/// Root on a stopped node appends a line to a monitored file and rebuilds the
/// baseline in the agent's state directory with the documented `baseline`
/// command (its digest journaled, as the agent's own): at start the entry's
/// digest differs from the one the node published, and nothing the cluster
/// holds explains it, so it is a BaselineTampered alarm naming the entry and
/// the file.
#[tokio::test]
async fn a_baseline_rebuilt_offline_is_an_alarm_naming_the_entry() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-p");
    fleet
        .create_policy(&fleet.policy(
            &policy,
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("ssh", "/etc/ssh", true),
            ],
        ))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    eventually("entry digests published", SEEN, || async {
        let entries = record(&client, &a)
            .await
            .status
            .map(|s| s.entries)
            .unwrap_or_default();
        (entries.len() == 2)
            .then_some(())
            .ok_or(format!("{entries:?}"))
    })
    .await;
    fleet.nodes[0].kill_agent();

    let passwd = fleet.nodes[0].host("/etc/passwd");
    let mut text = std::fs::read_to_string(&passwd).unwrap();
    text.push_str("evil:x:0:0::/:/bin/sh\n");
    std::fs::write(&passwd, text).unwrap();
    // The policy as the cluster serves it (`kubectl get fip -o yaml`).
    let served = Api::<kube_fim_crds::FileIntegrityPolicy>::all(client.clone())
        .get(&policy)
        .await
        .unwrap();
    let file = fleet.nodes[0].state.with_extension("policy.yaml");
    std::fs::write(&file, serde_saphyr::to_string(&served).unwrap()).unwrap();
    let rebuilt = std::process::Command::new(kube_fim_e2e::binary("kube-fim-agent"))
        .args([
            "baseline".to_string(),
            format!("--policy={}", file.display()),
            format!("--root={}", fleet.nodes[0].root.display()),
            format!("--state={}", fleet.nodes[0].state.display()),
            format!("--node-name={a}"),
        ])
        .output()
        .unwrap();
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    fleet.nodes[0].start_agent();

    let event = wait_warning(&client, "BaselineTampered", &a).await;
    let note = event.note.unwrap_or_default();
    assert!(note.contains(&format!("{policy}/passwd")), "{note}");
    assert!(!note.contains(&format!("{policy}/ssh")), "{note}");
    let alarm = eventually("policy Failed with the alarm", SEEN, || async {
        let s = record(&client, &a).await.status.unwrap_or_default();
        match (s.baseline_alarm, s.policies.first().map(|p| p.phase)) {
            (Some(alarm), Some(NodePolicyPhase::Failed)) => Ok(alarm),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(alarm.reason, "BaselineTampered");
    assert!(
        alarm.message.contains(&format!("{policy}/passwd"))
            && alarm.message.contains("/etc/passwd"),
        "{}",
        alarm.message
    );
    let c = wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    let text = fleet.nodes[0].metrics().unwrap();
    assert_eq!(
        metric(
            &text,
            &format!("kube_fim_agent_baseline_tampered{{node=\"{a}\"}}")
        ),
        Some(1.0)
    );
    fleet.cleanup().await;
}
