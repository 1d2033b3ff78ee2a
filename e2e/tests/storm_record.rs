//! A storm is recorded on its node's FileIntegrityNode once, under one id,
//! whatever order its FileChanges reach the operator in, whether their policy
//! was known when they did, and however often the operator restarts: root on
//! a node controls when and in what order its reports arrive, and the
//! operator can stop at any moment.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use kube_fim_crds::{
    ChangeStormRecord, FileChange, FileIntegrityNode, FileIntegrityNodeSpec, FileIntegrityPolicy,
};
use kube_fim_e2e::operator::{Operator, SUITE_LABEL};
use kube_fim_e2e::{ChangeFixture, Entry, Policy, client, eventually, unique_name};

/// The cap of the tests' policies: six changes in a minute are a storm.
const CAP: u32 = 5;

/// A Node and its FileIntegrityNode, created with the node's own token as
/// its agent does: the node's name.
async fn node_with_record(suite: &str) -> String {
    let node = format!("{suite}-a");
    kube_fim_e2e::create_node(&client().await, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    Api::<FileIntegrityNode>::all(agent)
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    node
}

async fn create_policy(suite: &str, policy: &str) {
    Api::<FileIntegrityPolicy>::all(client().await)
        .create(
            &PostParams::default(),
            &Policy::named(policy)
                .label(SUITE_LABEL, suite)
                .node_selector("role", suite)
                .path(Entry::new("etc", "/etc").recursive())
                .max_changes_per_node_per_minute(CAP)
                .build(),
        )
        .await
        .unwrap();
}

/// FileChanges of entry `etc` named `<prefix>-<name>`, each detected at the
/// time given beside its name, created in the order given.
async fn create_changes(node: &str, policy: &str, prefix: &str, changes: &[(&str, Timestamp)]) {
    let api: Api<FileChange> = Api::all(client().await);
    for (name, detected) in changes {
        let name = format!("{prefix}-{name}");
        let mut fc = ChangeFixture::new(&name, node, policy)
            .path(&format!("/etc/storm-{name}"))
            .build();
        fc.spec.detected_time = MicroTime(*detected);
        api.create(&PostParams::default(), &fc).await.unwrap();
    }
}

async fn storms_of(node: &str) -> Vec<ChangeStormRecord> {
    Api::<FileIntegrityNode>::all(client().await)
        .get(node)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
        .storms
}

/// Waits until the node's record holds exactly one storm, of `policy`'s
/// entry `etc`, with `count`; returns it.
async fn one_storm(node: &str, policy: &str, count: u64) -> ChangeStormRecord {
    eventually(
        &format!("one storm of {count} changes recorded"),
        Duration::from_secs(60),
        || async {
            let storms = storms_of(node).await;
            match storms.as_slice() {
                [s] if s.policy == policy && s.entry == "etc" && s.count == count => Ok(s.clone()),
                _ => Err(format!("{storms:?}")),
            }
        },
    )
    .await
}

/// A storm made while the operator is down, its changes named so that a
/// list returns them newest first (as an agent's retry or a re-list may
/// deliver them): the operator started again records it, from its first
/// detection; restarted again, and with more of the storm arriving late
/// (detected before what was recorded), it keeps that one record and its id.
#[tokio::test(flavor = "multi_thread")]
async fn a_storm_made_while_the_operator_is_down_is_recorded_once_whatever_the_order() {
    kube_fim_e2e::ensure_crds();
    let suite = unique_name("storm-rec");
    let policy = format!("{suite}-p");
    create_policy(&suite, &policy).await;
    let node = node_with_record(&suite).await;
    // Six changes in five seconds against a cap of five; `z5` (the newest)
    // sorts first.
    let start = whole_second(Timestamp::now() - Duration::from_secs(20));
    let names: Vec<(String, Timestamp)> = (0..6)
        .map(|i| (format!("z{}", 5 - i), start + Duration::from_secs(i)))
        .collect();
    let changes: Vec<(&str, Timestamp)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    create_changes(&node, &policy, &node, &changes).await;

    let mut operator = Operator::start(&suite, &suite, &[]);
    let recorded = one_storm(&node, &policy, 6).await;
    assert_eq!(recorded.since.0, start, "{recorded:?}");
    assert_eq!(recorded.cap, u64::from(CAP));

    // Restarted (killed, as a crash): the same FileChanges are the same storm.
    operator.process.kill();
    drop(operator);
    let operator = Operator::start(&suite, &suite, &[]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(storms_of(&node).await, vec![recorded.clone()]);

    // Three more of it, detected before the first one recorded, arrive now:
    // the record counts them and keeps its id (its since).
    create_changes(
        &node,
        &policy,
        &node,
        &[
            ("a0", start - Duration::from_secs(3)),
            ("a1", start - Duration::from_secs(2)),
            ("a2", start - Duration::from_secs(1)),
        ],
    )
    .await;
    let extended = one_storm(&node, &policy, 9).await;
    assert_eq!(extended.since, recorded.since);
    drop(operator);
    cleanup(&policy, &node).await;
}

/// Changes that reach the operator before their policy (a policy created
/// after them, or listed after them at start) are judged once the policy is
/// known.
#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_a_policy_not_known_yet_is_recorded_once_it_is() {
    kube_fim_e2e::ensure_crds();
    let suite = unique_name("storm-pol");
    let policy = format!("{suite}-p");
    let node = node_with_record(&suite).await;
    let _operator = Operator::start(&suite, &suite, &[]);
    let start = whole_second(Timestamp::now());
    let names: Vec<(String, Timestamp)> = (0..6)
        .map(|i| (format!("c{i}"), start + Duration::from_secs(i)))
        .collect();
    let changes: Vec<(&str, Timestamp)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    create_changes(&node, &policy, &node, &changes).await;
    // The operator has seen them (it is up and watching) before the policy.
    tokio::time::sleep(Duration::from_secs(5)).await;
    create_policy(&suite, &policy).await;
    let recorded = one_storm(&node, &policy, 6).await;
    assert_eq!(recorded.since.0, start, "{recorded:?}");
    cleanup(&policy, &node).await;
}

/// A detection time the API server stores as it is (it keeps microseconds).
fn whole_second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap()
}

async fn cleanup(policy: &str, node: &str) {
    let admin = client().await;
    let _ = Api::<FileIntegrityPolicy>::all(admin.clone())
        .delete(policy, &DeleteParams::default())
        .await;
    kube_fim_e2e::delete_node(&admin, node).await;
}
