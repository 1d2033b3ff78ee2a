//! Evidence outlives what produced it: retention deletes only approved changes
//! (counted per node) and names them in an Event, an export taken before reads
//! back as the deleted objects, and deleting a policy keeps its FileChanges
//! unless the policy says `evidence: Delete`. The real operator, logged in as
//! its ServiceAccount, against the real API server.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use kube_fim_crds::labels::POLICY;
use kube_fim_crds::{Evidence, FileChange, FileIntegrityPolicy};
use kube_fim_e2e::operator::{Operator, SUITE_LABEL};
use kube_fim_e2e::{
    Entry, Policy, approve, binary, client, ensure_crds, eventually, file_change, kubeconfig,
    unique_name,
};

/// An operator started by a test first lists every FileChange of the shared
/// cluster: under the whole suite's load on two cores that took up to 40 s.
const WAIT: Duration = Duration::from_secs(90);

/// The real operator serving only this test's policies, resyncing every 2 s.
fn start_operator(suite: &str) -> Operator {
    Operator::start(suite, suite, &["--resync=2s".to_string()])
}

fn policy(name: &str, suite: &str) -> FileIntegrityPolicy {
    Policy::named(name)
        .label(SUITE_LABEL, suite)
        // Selects no node: the operator has no agents to run, only evidence to keep.
        .node_selector("kube-fim-e2e/none", "none")
        .path(Entry::new("etc", "/etc/sudoers"))
        .build()
}

async fn names_of(client: &Client, policy: &str) -> Vec<String> {
    let mut names: Vec<String> = Api::<FileChange>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{POLICY}={policy}")))
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    names.sort();
    names
}

/// The note of the operator's Event `reason` on policy `policy`, once there.
async fn event_note(client: &Client, policy: &str, reason: &str) -> String {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually(&format!("a {reason} Event on {policy}"), WAIT, || async {
        events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy)
            })
            .and_then(|e| e.note)
            .ok_or_else(|| "none yet".to_string())
    })
    .await
}

/// `kubectl fim export --format json` as the admin: the archive, read back.
fn export() -> Vec<FileChange> {
    let dir = binary("kubectl-fim").parent().unwrap().to_path_buf();
    let out = std::process::Command::new("kubectl")
        .args(["fim", "export", "--format", "json", "--since", "1d"])
        .env(
            "PATH",
            format!(
                "{}:{}",
                dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("KUBECONFIG", kubeconfig())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn retention_deletes_only_approved_changes_per_node_and_names_them() {
    let client = client().await;
    let suite = unique_name("evidence");
    let name = format!("{suite}-p");
    let changes: Api<FileChange> = Api::all(client.clone());
    ensure_crds();
    // Node b's one approved change is the oldest of all; node a then floods.
    let pp = PostParams::default();
    changes
        .create(&pp, &file_change(&format!("{name}-b0"), "node-b", &name))
        .await
        .unwrap();
    approve(&client, &format!("{name}-b0"), "ok").await.unwrap();
    for i in 0..5 {
        changes
            .create(&pp, &file_change(&format!("{name}-a{i}"), "node-a", &name))
            .await
            .unwrap();
    }
    for i in [0, 1, 3] {
        approve(&client, &format!("{name}-a{i}"), "reviewed")
            .await
            .unwrap();
    }

    // Archive first: the export reads back as the very objects.
    let archive: Vec<FileChange> = export()
        .into_iter()
        .filter(|c| c.spec.policy == name)
        .collect();
    assert_eq!(archive.len(), 6);
    for archived in &archive {
        let live = changes.get(&archived.name_any()).await.unwrap();
        assert_eq!(archived.spec, live.spec);
        assert_eq!(archived.status, live.status, "approvals are archived");
    }

    let mut p = policy(&name, &suite);
    p.spec.retention.max_count = 2;
    Api::<FileIntegrityPolicy>::all(client.clone())
        .create(&pp, &p)
        .await
        .unwrap();
    let _operator = start_operator(&suite);

    // Per node: a keeps 2 (its unapproved a2 however old, and a4), b keeps b0.
    let expected: Vec<String> = ["a2", "a4", "b0"]
        .iter()
        .map(|s| format!("{name}-{s}"))
        .collect();
    eventually(
        "retention down to the unapproved and the newest",
        WAIT,
        || async {
            let left = names_of(&client, &name).await;
            if left == expected {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    let note = event_note(&client, &name, "RetentionDeleted").await;
    for gone in ["a0", "a1", "a3"] {
        assert!(note.contains(&format!("{name}-{gone}")), "{note}");
    }
    assert!(note.contains("approved only"), "{note}");
    for kept in &expected {
        assert!(!note.contains(kept.as_str()), "{note}");
    }

    // What retention deleted is still in the archive, approval and all.
    for gone in ["a0", "a1", "a3"] {
        let archived = archive
            .iter()
            .find(|c| c.name_any() == format!("{name}-{gone}"))
            .unwrap();
        assert_eq!(
            archived.approval().and_then(|a| a.reason.as_deref()),
            Some("reviewed")
        );
    }
    Api::<FileIntegrityPolicy>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_deleted_policy_keeps_its_evidence_unless_it_says_delete() {
    let client = client().await;
    let suite = unique_name("evidence");
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let changes: Api<FileChange> = Api::all(client.clone());
    let pp = PostParams::default();
    let (retain, delete) = (format!("{suite}-retain"), format!("{suite}-delete"));
    let _operator = start_operator(&suite);
    let mut p = policy(&delete, &suite);
    p.spec.evidence = Evidence::Delete;
    policies.create(&pp, &p).await.unwrap();
    policies
        .create(&pp, &policy(&retain, &suite))
        .await
        .unwrap();
    for (policy, i) in [(&retain, 0), (&retain, 1), (&delete, 0), (&delete, 1)] {
        changes
            .create(
                &pp,
                &file_change(&format!("{policy}-{i}"), "node-a", policy),
            )
            .await
            .unwrap();
    }
    eventually(
        "the evidence finalizer on the Delete policy",
        WAIT,
        || async {
            let p = policies.get(&delete).await.map_err(|e| e.to_string())?;
            if p.finalizers()
                .iter()
                .any(|f| f == "fim.kube-fim.io/evidence")
            {
                Ok(())
            } else {
                Err(format!("{:?}", p.finalizers()))
            }
        },
    )
    .await;
    assert!(
        policies.get(&retain).await.unwrap().finalizers().is_empty(),
        "Retain holds nothing back"
    );

    policies
        .delete(&retain, &DeleteParams::default())
        .await
        .unwrap();
    policies
        .delete(&delete, &DeleteParams::default())
        .await
        .unwrap();
    eventually("both policies gone", WAIT, || async {
        for n in [&retain, &delete] {
            if policies
                .get_opt(n)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                return Err(format!("{n} still there"));
            }
        }
        Ok(())
    })
    .await;
    assert!(names_of(&client, &delete).await.is_empty());
    assert_eq!(
        names_of(&client, &retain).await,
        [format!("{retain}-0"), format!("{retain}-1")],
        "a deleted policy leaves its evidence"
    );
    let note = event_note(&client, &delete, "EvidenceDeleted").await;
    assert!(
        note.contains(&format!("{delete}-0")) && note.contains(&format!("{delete}-1")),
        "{note}"
    );
}
