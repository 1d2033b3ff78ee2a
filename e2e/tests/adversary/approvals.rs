//! Approvals and recurrences: only the reviewed state is adopted, a recurrence is a new change.

use super::*;

/// setuid set, reverted, acknowledged, set again: two FileChanges, not one.
#[tokio::test]
async fn a_recurrence_after_acknowledgement_is_a_new_change() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    let tool = fleet.nodes[0].host("/usr/bin/tool");
    let mode =
        |m: u32| std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(m)).unwrap();

    let api: Api<FileChange> = Api::all(client.clone());
    let approve_and_wait = |name: String| {
        let api = api.clone();
        let client = client.clone();
        async move {
            kube_fim_e2e::approve(&client, &name, "expected")
                .await
                .unwrap();
            eventually("the approval is applied", SEEN, || async {
                let c = api.get(&name).await.map_err(|e| e.to_string())?;
                c.status
                    .and_then(|s| s.baseline_updated_time)
                    .map(|_| ())
                    .ok_or_else(|| "not yet".to_string())
            })
            .await;
        }
    };
    // setuid set (approved), reverted (approved), set again: a third report.
    mode(0o4755);
    let first = wait_change(&fleet, &a, "Modified /usr/bin/tool").await;
    approve_and_wait(first.name_any()).await;
    mode(0o644);
    let second = eventually("the revert is reported", SEEN, || async {
        fleet
            .changes(&a)
            .await
            .into_iter()
            .find(|c| describe(c) == "Modified /usr/bin/tool" && c.name_any() != first.name_any())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    approve_and_wait(second.name_any()).await;
    mode(0o4755);
    eventually("a second FileChange for the recurrence", SEEN, || async {
        let n = fleet
            .changes(&a)
            .await
            .iter()
            .filter(|c| describe(c) == "Modified /usr/bin/tool")
            .count();
        (n == 3).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    fleet.cleanup().await;
}

/// Issue 21, attack 7 (the agent's half): an agent writes an outcome or a
/// message only in answer to an approval the change holds.
#[tokio::test]
async fn an_agent_answers_only_an_existing_approval() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let approver = kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(
        "e2e-approver",
        "kube-fim-approver",
    ))
    .await;
    let changes = |c: &kube::Client| Api::<FileChange>::all(c.clone());
    let name = format!("{node}-fedcba9876543210fedc");
    changes(&agent)
        .create(
            &PostParams::default(),
            &kube_fim_e2e::file_change(&name, &node, "p"),
        )
        .await
        .unwrap();
    let pp = PatchParams::default();
    for answer in [
        serde_json::json!({"status": {"outcome": "Applied", "message": "applied"}}),
        serde_json::json!({"status": {"message": "approved by nobody"}}),
    ] {
        assert_refused(
            changes(&agent)
                .patch_status(&name, &pp, &Patch::Merge(&answer))
                .await,
            "answer an approval: this FileChange has no status.approval",
        );
    }
    let stored = changes(&admin).get(&name).await.unwrap();
    assert!(
        stored
            .status
            .as_ref()
            .is_none_or(|s| s.outcome.is_none() && s.message.is_none()),
        "{:?}",
        stored.status
    );

    kube_fim_e2e::approve(&approver, &name, "CHG-7")
        .await
        .expect("the approver approves");
    changes(&agent)
        .patch_status(
            &name,
            &pp,
            &Patch::Merge(
                serde_json::json!({"status": {"outcome": "Applied", "message": "applied"}}),
            ),
        )
        .await
        .expect("the agent answers the approval");
    let _ = changes(&admin).delete(&name, &Default::default()).await;
    delete_node(&admin, &node).await;
}

/// setuid set (reported), mode changed again (reported, nobody approves),
/// setuid set again: the third change has the same before and after as the
/// first, and is still a FileChange of its own (issue 21, attack 2).
#[tokio::test]
async fn a_recurrence_nobody_approved_is_a_new_change() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    let tool = fleet.nodes[0].host("/usr/bin/tool");
    let mode =
        |m: u32| std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(m)).unwrap();
    let modes_seen = || async {
        let mut changes: Vec<FileChange> = fleet
            .changes(&a)
            .await
            .into_iter()
            .filter(|c| describe(c) == "Modified /usr/bin/tool")
            .collect();
        changes.sort_by_key(|c| c.spec.detected_time.0);
        changes
    };
    let after_mode = |c: &FileChange| c.spec.after.as_ref().and_then(|a| a.mode.clone());

    for (m, n) in [(0o4755, 1), (0o750, 2), (0o4755, 3)] {
        mode(m);
        eventually(
            &format!("{n} FileChanges for /usr/bin/tool"),
            SEEN,
            || async {
                let seen = modes_seen().await;
                (seen.len() == n).then_some(()).ok_or(format!(
                    "{:?}",
                    seen.iter().map(after_mode).collect::<Vec<_>>()
                ))
            },
        )
        .await;
    }
    let seen = modes_seen().await;
    let modes: Vec<Option<String>> = seen.iter().map(after_mode).collect();
    let want = ["4755", "0750", "4755"].map(|m| Some(m.to_string()));
    assert_eq!(modes, want, "{modes:?}");
    // Each carries the node's next transition number, in its name after the node.
    let numbers: Vec<Option<u64>> = seen.iter().map(|c| c.spec.sequence).collect();
    assert!(
        numbers.iter().all(Option::is_some) && numbers.windows(2).all(|w| w[0] < w[1]),
        "{numbers:?}"
    );
    for c in &seen {
        let seq = c.spec.sequence.unwrap();
        assert!(
            c.name_any().starts_with(&format!("{a}-{seq}-")),
            "{}",
            c.name_any()
        );
    }
    fleet.cleanup().await;
}

/// Waits for the agent's answer to an approval of `name`.
pub(crate) async fn wait_answer(
    client: &kube::Client,
    name: &str,
) -> kube_fim_crds::FileChangeStatus {
    eventually(&format!("an answer on {name}"), SEEN, || async {
        let c = Api::<FileChange>::all(client.clone())
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        c.status
            .filter(|s| s.outcome.is_some())
            .ok_or_else(|| "none yet".to_string())
    })
    .await
}

/// One file, two policies: `content` compares its hash, `perm` its mode. Its
/// content changes and it turns setuid at once; the content change is
/// approved. Only what was reviewed is approved: the content entry's digest
/// moves as the answer says (from the published digest to the next published
/// one), the setuid bit stays a difference of the perm policy, whose digest
/// does not move (before, the approval took the file's whole state in). Then an approval of a state the file has left is
/// `Superseded`, moves nothing, and the newer state stays reported.
#[tokio::test]
async fn an_approval_applies_exactly_the_reviewed_state() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let content = format!("{suite}-content");
    let perm = format!("{suite}-perm");
    for (policy, attribute) in [
        (&content, kube_fim_crds::Attribute::Hash),
        (&perm, kube_fim_crds::Attribute::Mode),
    ] {
        let mut tool = entry("tool", "/usr/bin/tool", false);
        tool.attributes = vec![attribute];
        fleet.create_policy(&fleet.policy(policy, vec![tool])).await;
    }
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &content, READY).await;
    fleet.wait_ready(&a, &perm, READY).await;
    let digests = || async {
        (
            published_digest(&client, &a, &content, "tool").await,
            published_digest(&client, &a, &perm, "tool").await,
        )
    };
    let (content0, perm0) = eventually("entry digests published", SEEN, || async {
        let d = digests().await;
        (!d.0.is_empty() && !d.1.is_empty())
            .then_some(d.clone())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let approver = kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(
        "e2e-approver",
        "kube-fim-approver",
    ))
    .await;

    let tool = fleet.nodes[0].host("/usr/bin/tool");
    std::fs::write(&tool, "#!/bin/sh\necho patched\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let of_policy = |policy: String| {
        let fleet = &fleet;
        let a = a.clone();
        async move {
            eventually(&format!("a change of policy {policy}"), SEEN, || async {
                let all = fleet.changes(&a).await;
                all.iter()
                    .filter(|c| c.spec.policy == policy && c.status.is_none())
                    .max_by_key(|c| c.spec.detected_time.0)
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "{:?}",
                            all.iter()
                                .map(|c| (describe(c), c.spec.policy.clone(), c.status.clone()))
                                .collect::<Vec<_>>()
                        )
                    })
            })
            .await
        }
    };
    let reviewed = of_policy(content.clone()).await;
    let setuid = of_policy(perm.clone()).await;
    kube_fim_e2e::approve(&approver, &reviewed.name_any(), "CHG-1")
        .await
        .expect("the approver approves");
    let answer = wait_answer(&client, &reviewed.name_any()).await;
    assert_eq!(
        answer.outcome,
        Some(kube_fim_crds::ApprovalOutcome::Applied),
        "{answer:?}"
    );
    let moves = &answer.entry_digests;
    assert_eq!(moves.len(), 1, "only the reviewed entry moves: {moves:?}");
    assert_eq!(
        (moves[0].policy.as_str(), moves[0].entry.as_str()),
        (content.as_str(), "tool")
    );
    assert_eq!(moves[0].before, content0, "from the published digest");
    assert_ne!(moves[0].after, content0);
    eventually("the answer's digest published", SEEN, || async {
        let d = digests().await;
        (d.0 == moves[0].after)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    assert_eq!(
        digests().await.1,
        perm0,
        "the setuid bit nobody reviewed is not in the baseline"
    );
    let still = Api::<FileChange>::all(client.clone())
        .get(&setuid.name_any())
        .await
        .unwrap();
    assert!(still.status.is_none(), "{:?}", still.status);

    // Changed twice; the first state approved after the second is there.
    std::fs::write(&tool, "#!/bin/sh\necho first\n").unwrap();
    let left = of_policy(content.clone()).await;
    std::fs::write(&tool, "#!/bin/sh\necho second\n").unwrap();
    let newer = eventually("the newer state reported", SEEN, || async {
        fleet
            .changes(&a)
            .await
            .into_iter()
            .find(|c| {
                c.spec.policy == content
                    && c.name_any() != left.name_any()
                    && c.spec.detected_time.0 > left.spec.detected_time.0
            })
            .ok_or_else(|| "none yet".to_string())
    })
    .await;
    let before = digests().await;
    kube_fim_e2e::approve(&approver, &left.name_any(), "CHG-2")
        .await
        .expect("the approver approves");
    let answer = wait_answer(&client, &left.name_any()).await;
    assert_eq!(
        answer.outcome,
        Some(kube_fim_crds::ApprovalOutcome::Superseded),
        "{answer:?}"
    );
    assert!(answer.entry_digests.is_empty(), "{answer:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(digests().await, before, "the baseline is unchanged");
    let newer = Api::<FileChange>::all(client.clone())
        .get(&newer.name_any())
        .await
        .unwrap();
    assert!(
        newer.status.is_none(),
        "still a reported change: {:?}",
        newer.status
    );
    fleet.cleanup().await;
}

/// The answer's entry digest moves are the agent's, only in answer to an
/// approval, and written once (admission, for the node's own token too).
#[tokio::test]
async fn entry_digest_moves_answer_an_approval_once() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let approver = kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(
        "e2e-approver",
        "kube-fim-approver",
    ))
    .await;
    let changes = |c: &kube::Client| Api::<FileChange>::all(c.clone());
    let name = format!("{node}-0123456789abcdef0123");
    changes(&agent)
        .create(
            &PostParams::default(),
            &kube_fim_e2e::file_change(&name, &node, "p"),
        )
        .await
        .unwrap();
    let pp = PatchParams::default();
    let moves = |after: &str| {
        serde_json::json!({"status": {"outcome": "Applied", "message": "applied",
            "entryDigests": [{"policy": "p", "entry": "etc", "before": "v2-a", "after": after}]}})
    };
    assert_refused(
        changes(&agent)
            .patch_status(
                &name,
                &pp,
                &Patch::Merge(serde_json::json!({"status": {"entryDigests": [
                    {"policy": "p", "entry": "etc", "before": "v2-a", "after": "v2-b"}]}})),
            )
            .await,
        "this FileChange has no status.approval",
    );
    kube_fim_e2e::approve(&approver, &name, "CHG-8")
        .await
        .expect("the approver approves");
    assert_refused(
        changes(&approver)
            .patch_status(&name, &pp, &Patch::Merge(moves("v2-b")))
            .await,
        "only the node's agent answers an approval",
    );
    let answered = changes(&agent)
        .patch_status(&name, &pp, &Patch::Merge(moves("v2-b")))
        .await
        .expect("the agent answers the approval");
    assert_eq!(answered.status.unwrap().entry_digests[0].after, "v2-b");
    for rewrite in [
        moves("v2-forged"),
        serde_json::json!({"status": {"entryDigests": null}}),
    ] {
        assert_refused(
            changes(&agent)
                .patch_status(&name, &pp, &Patch::Merge(rewrite))
                .await,
            "an approval is answered once",
        );
    }
    let _ = changes(&admin).delete(&name, &Default::default()).await;
    delete_node(&admin, &node).await;
}
