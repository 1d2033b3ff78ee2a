//! A flood is recorded on its node's FileIntegrityNode even when it could
//! not be at once: a node token used before any agent created the node's
//! record is the very case a flood warns of, and its record is the evidence
//! a SIEM receives.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::time::Duration;

use kube::api::{Api, PostParams};
use kube_fim_crds::{FileChange, FileIntegrityNode, FileIntegrityNodeSpec};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::{ChangeFixture, client, eventually, unique_name};

/// FileChanges a node with no policy may create in a minute
/// (`flood::MIN_BUDGET`).
const BUDGET: usize = 120;

/// A node floods before it has a FileIntegrityNode: the flood is recorded
/// once the record exists, not lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_before_its_nodes_record_exists_is_recorded_once_it_does() {
    kube_fim_e2e::ensure_crds();
    let suite = unique_name("flood-rec");
    let node = format!("{suite}-a");
    let admin = client().await;
    kube_fim_e2e::create_node(&admin, &node, &[]).await;
    let operator = Operator::start(&suite, &suite, &[]);
    // Let the operator list and watch before the flood.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let changes: Api<FileChange> = Api::all(admin.clone());
    for i in 0..BUDGET + 10 {
        let name = format!("{node}-{i:03}");
        let fc = ChangeFixture::new(&name, &node, &format!("{suite}-p"))
            .path(&format!("/etc/flood-{i}"))
            .build();
        changes.create(&PostParams::default(), &fc).await.unwrap();
    }
    // The flood is said while the node has no record to write it on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let records: Api<FileIntegrityNode> = Api::all(agent);
    records
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();

    let admin_records: Api<FileIntegrityNode> = Api::all(admin.clone());
    let flood = eventually(
        "the flood recorded on the node's record",
        Duration::from_secs(30),
        || async {
            let floods = admin_records
                .get(&node)
                .await
                .unwrap()
                .status
                .unwrap_or_default()
                .floods;
            match floods.as_slice() {
                [f] => Ok(f.clone()),
                _ => Err(format!("{floods:?}")),
            }
        },
    )
    .await;
    assert!(flood.count > BUDGET as u64, "{flood:?}");
    drop(operator);
    kube_fim_e2e::delete_node(&admin, &node).await;
}
