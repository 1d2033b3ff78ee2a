//! Rights: what patch, another node or a flooding node can do to evidence.

use super::*;

/// Issue 21, attack 6: with only get/patch on filechanges, an ownerReference
/// to an object that does not exist would let the garbage collector delete
/// the change. Neither owners nor finalizers can be added after creation, by
/// that user or by a cluster admin; deleting stays a delete.
#[tokio::test]
async fn patch_rights_cannot_make_the_garbage_collector_delete_a_change() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let patcher = limited_user("e2e-patcher", "get,patch").await;
    let changes = |c: &kube::Client| Api::<FileChange>::all(c.clone());
    let name = format!("{node}-0123456789abcdef0123");
    changes(&agent)
        .create(
            &PostParams::default(),
            &kube_fim_e2e::file_change(&name, &node, "p"),
        )
        .await
        .expect("the agent reports its own node's change");

    let orphaned = serde_json::json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1",
        "kind": "Node",
        "name": format!("{suite}-gone"),
        "uid": "6b7c2f4e-0000-4000-8000-000000000021",
    }]}});
    for who in [&patcher, &admin] {
        assert_refused(
            changes(who)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&orphaned))
                .await,
            "metadata.ownerReferences of a FileChange cannot be added or changed after creation",
        );
        assert_refused(
            changes(who)
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        serde_json::json!({"metadata": {"finalizers": ["e2e.kube-fim.io/hold"]}}),
                    ),
                )
                .await,
            "metadata.finalizers of a FileChange cannot be added or changed after creation",
        );
    }
    // What the security team sees: the change is still there once the
    // garbage collector had its chance.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kept = changes(&admin)
        .get(&name)
        .await
        .expect("the change is kept");
    assert!(kept.metadata.owner_references.is_none());
    assert!(kept.metadata.finalizers.is_none());
    // Labels stay patchable (filters, not decisions), and deleting (the
    // operator's retention and `evidence: Delete`) is a delete.
    changes(&patcher)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "ops"}}})),
        )
        .await
        .expect("a label is still a patch");
    changes(&admin)
        .delete(&name, &Default::default())
        .await
        .expect("an admin deletes with delete");
    delete_node(&admin, &node).await;
}

/// Issue 21, attack 8: one node's token cannot take another node's
/// predictable object names, not even of a node whose name starts with its
/// own (`<suite>-a` and `<suite>-a-b`).
#[tokio::test]
async fn a_node_cannot_squat_another_nodes_change_names() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let (a, b) = (format!("{suite}-a"), format!("{suite}-a-b"));
    create_node(&admin, &a, &[]).await;
    create_node(&admin, &b, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&a)).await;
    let changes = Api::<FileChange>::all(agent.clone());
    let pp = PostParams::default();
    let digest = "89abcdef0123456789ab";

    for squatted in [
        format!("{b}-{digest}"),
        format!("fc-{digest}"),
        digest.to_string(),
    ] {
        assert_refused(
            changes
                .create(&pp, &kube_fim_e2e::file_change(&squatted, &a, "p"))
                .await,
            &format!(
                "metadata.name of an agent's FileChange must be its node's name, a '-', its sequence number and a digest: this token is bound to node {a}, the name is {squatted}"
            ),
        );
    }
    let own = format!("{a}-{digest}");
    changes
        .create(&pp, &kube_fim_e2e::file_change(&own, &a, "p"))
        .await
        .expect("a node reports under its own name");
    // The other node's own name is still free for it.
    let other = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&b)).await;
    Api::<FileChange>::all(other)
        .create(
            &pp,
            &kube_fim_e2e::file_change(&format!("{b}-{digest}"), &b, "p"),
        )
        .await
        .expect("the other node reports under its name");
    let stored: Vec<String> = Api::<FileChange>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .filter(|n| n.ends_with(digest))
        .collect();
    let mut want = vec![own.clone(), format!("{b}-{digest}")];
    want.sort();
    let mut stored = stored;
    stored.sort();
    assert_eq!(stored, want);
    for name in want {
        let _ = Api::<FileChange>::all(admin.clone())
            .delete(&name, &Default::default())
            .await;
    }
    delete_node(&admin, &a).await;
    delete_node(&admin, &b).await;
}

// Issue 21, attack 10: one node's token creating FileChanges as fast as it can.
/// A node's token used by hand to create FileChanges far faster than its
/// agent ever would (it paces storms at its policies' caps) is named: a
/// `ChangeFlood` Warning Event on the Node and a counted flood; a node within
/// its allowance is not.
#[tokio::test]
async fn a_node_flooding_the_api_with_changes_is_named() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let (a, b) = (format!("{suite}-a"), format!("{suite}-b"));
    create_node(&admin, &a, &[]).await;
    create_node(&admin, &b, &[]).await;
    let create = |node: String, from: usize, count: usize| async move {
        let token = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
        let api = Api::<FileChange>::all(token);
        for i in from..from + count {
            let name = format!("{node}-{i}-{:020x}", i);
            api.create(
                &PostParams::default(),
                &kube_fim_e2e::file_change(&name, &node, "p"),
            )
            .await
            .expect("the node's token creates its own FileChanges");
        }
    };
    let flood_event = || async {
        Api::<Event>::all(admin.clone())
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("ChangeFlood")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(a.as_str())
            })
    };
    // No policy selects either node: the allowance is the floor, 120 a minute.
    create(b.clone(), 0, 20).await;
    // Changes the operator lists at its start are history, not a flood: keep
    // flooding (a bounded number of rounds) until its watch is live and counts.
    let mut flood = None;
    for round in 0..6 {
        create(a.clone(), round * 150, 150).await;
        for _ in 0..15 {
            flood = flood_event().await;
            if flood.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if flood.is_some() {
            break;
        }
    }
    let flood = flood.expect("a ChangeFlood Warning on node a within six rounds of 150");
    assert_eq!(flood.type_.as_deref(), Some("Warning"));
    let note = flood.note.unwrap_or_default();
    let count: usize = note
        .strip_prefix(&format!("node {a} created "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!((121..=300).contains(&count), "{note}");
    assert!(note.contains("more than 120"), "{note}");
    let floods = operator
        .metrics()
        .and_then(|m| metric(&m, "kube_fim_operator_change_floods_total"));
    assert!(floods.is_some_and(|n| n >= 1.0), "{floods:?}");
    let about_b = Api::<Event>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("ChangeFlood")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(b.as_str())
        })
        .count();
    assert_eq!(about_b, 0, "a node within its allowance is no flood");
    for node in [&a, &b] {
        for c in Api::<FileChange>::all(admin.clone())
            .list(&ListParams::default().fields(&format!("spec.node={node}")))
            .await
            .unwrap()
            .items
        {
            let _ = Api::<FileChange>::all(admin.clone())
                .delete(&c.name_any(), &Default::default())
                .await;
        }
        delete_node(&admin, node).await;
    }
}
