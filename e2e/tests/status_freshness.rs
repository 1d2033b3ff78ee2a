//! A policy's status stays fresh while a fleet's heartbeats pour in: agents'
//! FileIntegrityNode heartbeats arrive many times a second (a thousand nodes
//! at 30 s are 33 a second), and a real report change among them still shows
//! in the policy's status within a bound, while the heartbeats themselves
//! cost no reconcile. And a policy's change count follows new FileChanges
//! within seconds, not at the next resync.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube_fim_crds::{
    FileChange, FileIntegrityNode, FileIntegrityNodeSpec, FileIntegrityNodeStatus,
    FileIntegrityPolicy, NodePolicyPhase, NodePolicyStatus,
};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::{
    client, create_passwd_policy, eventually, file_change, metric, policy_column, unique_name,
};

const NODES: usize = 30;
/// A change must show in the status this soon (batch window 1 s, plus reconcile
/// and the API round trips, on a loaded machine).
const FRESH: Duration = Duration::from_secs(8);

fn report(node: &str, policy: &str, files: i64) -> FileIntegrityNodeStatus {
    let now = Time(Timestamp::now());
    FileIntegrityNodeStatus {
        heartbeat_time: Some(now.clone()),
        policy_count: Some(1),
        files_monitored: Some(files),
        policies: vec![NodePolicyStatus {
            policy: policy.into(),
            phase: NodePolicyPhase::Ready,
            files_monitored: Some(files),
            last_scan_time: Some(Time("2026-01-01T00:00:00Z".parse().unwrap())),
            message: Some(format!("{node} ok")),
            ..NodePolicyStatus::default()
        }],
        ..FileIntegrityNodeStatus::default()
    }
}

async fn write_report(client: &Client, node: &str, status: &FileIntegrityNodeStatus) {
    Api::<FileIntegrityNode>::all(client.clone())
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .unwrap();
}

fn files(p: &FileIntegrityPolicy) -> Option<i64> {
    p.status.as_ref().and_then(|s| s.files_monitored)
}

#[tokio::test]
async fn status_follows_a_report_change_within_a_bound_during_a_heartbeat_storm() {
    let client = client().await;
    let suite = unique_name("fresh");
    // Status refreshes only on events here: a long resync cannot hide a stall.
    let op = Operator::start(
        &suite,
        &suite,
        &["--resync=10m".into(), "--heartbeat-timeout=2m".into()],
    );
    let nodes: Vec<String> = (0..NODES).map(|i| format!("{suite}-n{i}")).collect();
    let policy = format!("{suite}-p");
    for name in &nodes {
        let mut node = Node::default();
        node.metadata.name = Some(name.clone());
        node.metadata.labels = Some(BTreeMap::from([("role".to_string(), suite.clone())]));
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        Api::<FileIntegrityNode>::all(client.clone())
            .create(
                &PostParams::default(),
                &FileIntegrityNode::new(name, FileIntegrityNodeSpec { node: name.clone() }),
            )
            .await
            .unwrap();
        write_report(&client, name, &report(name, &policy, 1)).await;
    }
    let policies = create_passwd_policy(&client, &policy, &suite).await;
    eventually(
        "the policy counts every node",
        Duration::from_secs(30),
        || async {
            let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
            if files(&p) == Some(NODES as i64) {
                Ok(())
            } else {
                Err(format!("{:?}", files(&p)))
            }
        },
    )
    .await;

    // The storm: every node's agent renews its heartbeat over and over, from
    // a few writers at once, until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let beats = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, stop, beats) = (client.clone(), stop.clone(), beats.clone());
        let mine: Vec<String> = nodes.iter().skip(w).step_by(4).cloned().collect();
        writers.push(tokio::spawn(async move {
            let api: Api<FileIntegrityNode> = Api::all(client);
            while !stop.load(Ordering::Relaxed) {
                for node in &mine {
                    let beat = serde_json::json!({
                        "status": {"heartbeatTime": Time(Timestamp::now())}
                    });
                    api.patch_status(node, &PatchParams::default(), &Patch::Merge(&beat))
                        .await
                        .unwrap();
                    beats.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let storm_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let reconciles_before = metric(
        &op.metrics().unwrap(),
        "kube_fim_operator_reconciles_total{result=\"ok\"}",
    )
    .unwrap_or(0.0);

    // One node's agent reports a real change in the middle of the storm.
    let changed_at = Instant::now();
    write_report(&client, &nodes[0], &report(&nodes[0], &policy, 101)).await;
    let want = NODES as i64 + 100;
    let status = eventually(
        "the status to show the changed report",
        Duration::from_secs(60),
        || async {
            let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
            if files(&p) == Some(want) {
                Ok(changed_at.elapsed())
            } else {
                Err(format!("{:?}", files(&p)))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let text = op.metrics().unwrap();
    let reconciles = metric(&text, "kube_fim_operator_reconciles_total{result=\"ok\"}")
        .unwrap_or(0.0)
        - reconciles_before;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let rate = beats.load(Ordering::Relaxed) as f64 / storm_start.elapsed().as_secs_f64();
    eprintln!(
        "heartbeats {rate:.0}/s; status showed the change after {:.2}s; {reconciles} reconciles \
         during the storm",
        status.as_secs_f64()
    );

    assert!(
        rate >= 10.0,
        "the storm was too weak to test anything: {rate:.1}/s"
    );
    assert!(
        status <= FRESH,
        "the status took {status:?} to show a report change during {rate:.0} heartbeats/s"
    );
    // The change is one reconcile; heartbeats are none.
    assert!(
        reconciles <= 2.0,
        "{reconciles} reconciles during a storm of heartbeats with one real change"
    );
    // The operator's own view of its lag.
    assert!(
        metric(&text, "kube_fim_operator_status_delay_seconds_count").unwrap_or(0.0) >= 1.0,
        "no status delay observed"
    );
    let age = metric(
        &text,
        &format!("kube_fim_operator_policy_status_age_seconds{{policy=\"{policy}\"}}"),
    )
    .expect("the policy's status age is exported");
    assert!(age < 30.0, "status age {age}");

    policies
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
    for name in &nodes {
        let _ = Api::<Node>::all(client.clone())
            .delete(name, &DeleteParams::default())
            .await;
        let _ = Api::<FileIntegrityNode>::all(client.clone())
            .delete(name, &DeleteParams::default())
            .await;
    }
}

#[tokio::test]
async fn the_change_count_follows_new_file_changes_within_seconds() {
    let client = client().await;
    let suite = unique_name("fresh-fc");
    // Status refreshes only on events here: the count must not wait for a resync.
    let op = Operator::start(&suite, &suite, &["--resync=10m".into()]);
    let node = format!("{suite}-n");
    let policy = format!("{suite}-p");
    let mut n = Node::default();
    n.metadata.name = Some(node.clone());
    n.metadata.labels = Some(BTreeMap::from([("role".to_string(), suite.clone())]));
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &n)
        .await
        .unwrap();
    let policies = create_passwd_policy(&client, &policy, &suite).await;
    let changes_24h = |p: &FileIntegrityPolicy| p.status.as_ref().and_then(|s| s.changes_last24h);
    eventually(
        "the policy's first status",
        Duration::from_secs(30),
        || async {
            let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
            if changes_24h(&p) == Some(0) {
                Ok(())
            } else {
                Err(format!("{:?}", p.status))
            }
        },
    )
    .await;
    assert_eq!(policy_column(&policy, "CHANGES(24H)"), "0");

    // Agents report changes; the count follows each burst within seconds, long
    // before the 10 min resync.
    let api: Api<FileChange> = Api::all(client.clone());
    let mut created = 0;
    let mut took = Vec::new();
    for burst in [1, 3] {
        let start = Instant::now();
        for _ in 0..burst {
            api.create(
                &PostParams::default(),
                &file_change(&format!("{policy}-{created}"), &node, &policy),
            )
            .await
            .unwrap();
            created += 1;
        }
        let want = created;
        took.push(
            eventually(
                &format!("CHANGES(24H) to show {want}"),
                Duration::from_secs(60),
                || async {
                    let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
                    if changes_24h(&p) == Some(want) {
                        Ok(start.elapsed())
                    } else {
                        Err(format!("{:?}", changes_24h(&p)))
                    }
                },
            )
            .await,
        );
        assert_eq!(policy_column(&policy, "CHANGES(24H)"), want.to_string());
    }
    eprintln!("CHANGES(24H) followed new FileChanges after {took:?}");
    for t in &took {
        assert!(
            *t <= FRESH,
            "the count took {t:?} to follow new FileChanges"
        );
    }
    let text = op.metrics().unwrap();
    assert!(
        metric(&text, "kube_fim_operator_status_delay_seconds_count").unwrap_or(0.0) >= 2.0,
        "the refreshes were woken by the changes: {text}"
    );

    policies
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
    for i in 0..created {
        let _ = api
            .delete(&format!("{policy}-{i}"), &DeleteParams::default())
            .await;
    }
    let _ = Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
}
