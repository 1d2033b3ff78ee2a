//! A crash at any instruction raises no false alarm and loses no change: the
//! agent is killed with SIGKILL at random moments while the API server is down
//! and changes keep coming, over many iterations. This test stops the shared
//! API server, so it is a test binary of its own, named to run after the
//! tests that rely on the garbage collector (it restarts the API server many
//! times).
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube_fim_crds::FileIntegrityNode;
use kube_fim_e2e::fleet::{Fleet, controlplane_command, describe, entry};
use kube_fim_e2e::{client, eventually, unique_name};

fn iterations() -> usize {
    std::env::var("KUBE_FIM_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

#[tokio::test]
async fn kill_9_while_the_api_server_is_down_raises_no_false_alarm_and_loses_no_change() {
    let client = client().await;
    let suite = unique_name("crash");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    let a = fleet.nodes[0].name.clone();
    let n = iterations();
    let mut expected = Vec::new();
    for i in 0..n {
        fleet.nodes[0].start_agent();
        fleet.wait_ready(&a, &policy, Duration::from_secs(60)).await;
        controlplane_command("apiserver-stop");
        // Changes keep coming; the agent detects them, queues them and saves
        // its baseline, and cannot publish the new digest.
        let changes = 1 + fastrand::usize(0..3);
        for j in 0..changes {
            let path = format!("/etc/crash-{i}-{j}.conf");
            std::fs::write(fleet.nodes[0].host(&path), format!("{i} {j}\n")).unwrap();
            expected.push(format!("Added {path}"));
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1200))).await;
        fleet.nodes[0].kill_agent();
        // A change made while the agent is dead, found at its next start.
        let path = format!("/etc/offline-{i}.conf");
        std::fs::write(fleet.nodes[0].host(&path), "offline\n").unwrap();
        expected.push(format!("Added {path}"));
        controlplane_command("apiserver-start");
    }
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&a, &policy, Duration::from_secs(60)).await;

    expected.sort();
    let got = eventually(
        "every change delivered",
        Duration::from_secs(120),
        || async {
            let mut got: Vec<String> = fleet.changes(&a).await.iter().map(describe).collect();
            got.sort();
            if got.len() >= expected.len() {
                Ok(got)
            } else {
                Err(format!("{} of {}", got.len(), expected.len()))
            }
        },
    )
    .await;
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for g in &got {
        *counts.entry(g).or_default() += 1;
    }
    assert_eq!(got, expected, "zero lost, zero doubled");
    let alarms: Vec<Event> = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("Baseline"))
                && e.note.as_deref().unwrap_or("").contains(&a)
        })
        .collect();
    assert!(alarms.is_empty(), "false alarms: {alarms:#?}");
    let record = Api::<FileIntegrityNode>::all(client.clone())
        .get(&a)
        .await
        .unwrap();
    assert!(record.status.unwrap().baseline_alarm.is_none());
    println!(
        "crash test: {n} kill -9 iterations with the API server down, {} changes, 0 lost, 0 doubled, 0 false alarms",
        expected.len()
    );
    fleet.cleanup().await;
}
