//! An API server outage delays reports, never drops or doubles them. This test
//! stops the shared API server, so it is a test binary of its own (cargo runs
//! test binaries one after another).
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube_fim_e2e::fleet::{Fleet, controlplane_command, entry};
use kube_fim_e2e::{client, eventually, metric, unique_name};

#[tokio::test]
async fn two_hundred_changes_during_a_30s_outage_are_all_delivered_once() {
    let client = client().await;
    let suite = unique_name("outage");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-data");
    let dir = fleet.nodes[0].host("/srv/data");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..200 {
        std::fs::write(dir.join(format!("f{i:03}")), "v1").unwrap();
    }
    let mut p = fleet.policy(&policy, vec![entry("data", "/srv/data", true)]);
    p.spec.max_changes_per_node_per_minute = 1000;
    fleet.create_policy(&p).await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, Duration::from_secs(60)).await;

    controlplane_command("apiserver-stop");
    let down = Instant::now();
    for i in 0..200 {
        std::fs::write(dir.join(format!("f{i:03}")), "v2").unwrap();
    }
    // The agent queues while the API server is away.
    let queued = eventually(
        "200 reports queued on the node",
        Duration::from_secs(20),
        || async {
            let t = fleet.nodes[0].metrics().ok_or("no metrics")?;
            match metric(
                &t,
                &format!("kube_fim_agent_reports_queued{{node=\"{a}\"}}"),
            ) {
                Some(q) if q >= 200.0 => Ok(q),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(queued, 200.0);
    let outage = Duration::from_secs(30);
    if let Some(rest) = outage.checked_sub(down.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    controlplane_command("apiserver-start");

    let changes = eventually("all 200 delivered", Duration::from_secs(120), || async {
        let c = fleet.changes(&a).await;
        if c.len() >= 200 {
            Ok(c)
        } else {
            Err(format!("{} so far", c.len()))
        }
    })
    .await;
    // Exactly once: 200 objects, one per file.
    let mut per_path: BTreeMap<String, usize> = BTreeMap::new();
    for c in &changes {
        *per_path.entry(c.spec.path.clone()).or_default() += 1;
    }
    assert_eq!(changes.len(), 200, "no duplicates");
    assert_eq!(per_path.len(), 200);
    assert!(per_path.values().all(|n| *n == 1));
    let t = fleet.nodes[0].metrics().unwrap();
    assert_eq!(
        metric(
            &t,
            &format!("kube_fim_agent_reports_queued{{node=\"{a}\"}}")
        ),
        Some(0.0)
    );
    fleet.cleanup().await;
}
