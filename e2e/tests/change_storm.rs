//! A storm of FileChanges (agents reporting a package upgrade) costs the
//! operator no list of them per change: it counts them from its watch, so what
//! it reads grows with the changes, not with their square. Measured with the
//! API server's own request metrics, which count every client's LISTs: this is
//! a test binary of its own (cargo runs test binaries one after another), so no
//! other test's operator lists FileChanges while it measures.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube_fim_crds::{FileChange, FileIntegrityPolicy};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::{
    apiserver_metric, approve, client, create_passwd_policy, eventually, file_change, metric,
    policy_column, unique_name,
};

/// An isolated change must show in the status this soon (batch window 1 s,
/// plus reconcile and the API round trips, on a loaded machine).
const FRESH: Duration = Duration::from_secs(8);

/// What the API server has answered to LISTs of FileChanges so far: requests
/// and response bytes.
fn file_change_lists() -> (f64, f64) {
    let labels = [("verb", "LIST"), ("resource", "filechanges")];
    (
        apiserver_metric("apiserver_request_total", &labels),
        apiserver_metric("apiserver_response_sizes_sum", &labels),
    )
}

/// A storm of FileChanges (agents reporting a package upgrade) costs the
/// operator no list of them per change: it counts them from its watch. The
/// counts are exact right after the storm, and a change after it still shows
/// within seconds.
#[tokio::test]
async fn a_change_storm_is_counted_exactly_without_listing_the_changes_again() {
    /// FileChanges in the storm, and how fast the agents write them: spread
    /// over many batch windows, each of which refreshes the policy.
    const STORM: usize = 600;
    const PER_SECOND: usize = 50;
    /// LISTs of FileChanges while the test measures, however large the storm:
    /// none of the operator's (its watch listed them before), and what the
    /// control plane's own controllers may do (kube-controller-manager lists a
    /// new resource once, about 30 s after its CRD appears).
    const LISTS: f64 = 4.0;

    let client = client().await;
    let suite = unique_name("storm-fc");
    let op = Operator::start(&suite, &suite, &["--resync=10m".into()]);
    let policy = format!("{suite}-p");
    let policies = create_passwd_policy(&client, &policy, &suite).await;
    let counts = |p: &FileIntegrityPolicy| {
        p.status
            .as_ref()
            .map(|s| (s.changes_last24h, s.unacknowledged_changes))
    };
    // Waits until the status shows `want` changes in 24 h, `unacknowledged`
    // of them unapproved: how long since `start`.
    let wait_counts = |want: usize, unacknowledged: usize, start: Instant| {
        let (policies, policy) = (policies.clone(), policy.clone());
        let want = Some((Some(want as i64), Some(unacknowledged as i64)));
        async move {
            eventually(
                &format!("the counts (24 h, unacknowledged) to be {want:?}"),
                Duration::from_secs(60),
                || async {
                    let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
                    if counts(&p) == want {
                        Ok(start.elapsed())
                    } else {
                        Err(format!("{:?}", counts(&p)))
                    }
                },
            )
            .await
        }
    };
    wait_counts(0, 0, Instant::now()).await;
    let (lists_before, bytes_before) = file_change_lists();

    // The storm: STORM changes from 10 nodes at PER_SECOND.
    let api: Api<FileChange> = Api::all(client.clone());
    let names: Vec<String> = (0..STORM).map(|i| format!("{policy}-{i}")).collect();
    let started = Instant::now();
    futures::stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let api = api.clone();
            let fc = file_change(name, &format!("{suite}-n{}", i % 10), &policy);
            let at = started + Duration::from_secs_f64(i as f64 / PER_SECOND as f64);
            async move {
                tokio::time::sleep_until(at.into()).await;
                api.create(&PostParams::default(), &fc).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let storm = started.elapsed();
    let settled = wait_counts(STORM, STORM, Instant::now()).await;
    assert_eq!(policy_column(&policy, "CHANGES(24H)"), STORM.to_string());

    // After the storm, an isolated change and two approvals show within seconds.
    let start = Instant::now();
    api.create(
        &PostParams::default(),
        &file_change(&format!("{policy}-after"), &format!("{suite}-n0"), &policy),
    )
    .await
    .unwrap();
    let isolated = wait_counts(STORM + 1, STORM + 1, start).await;
    let start = Instant::now();
    for name in &names[..2] {
        approve(&client, name, "the package upgrade").await.unwrap();
    }
    let approved = wait_counts(STORM + 1, STORM - 1, start).await;

    let (lists_after, bytes_after) = file_change_lists();
    let (lists, bytes) = (lists_after - lists_before, bytes_after - bytes_before);
    let text = op.metrics().unwrap();
    let reconciles = metric(&text, "kube_fim_operator_reconciles_total{result=\"ok\"}");
    eprintln!(
        "storm of {STORM} FileChanges in {:.1}s: counts exact {:.2}s after its end, an \
         isolated change after {:.2}s, approvals after {:.2}s; {reconciles:?} reconciles; \
         FileChange LISTs {lists} ({:.3} per change), {:.0} bytes listed ({:.0} per change)",
        storm.as_secs_f64(),
        settled.as_secs_f64(),
        isolated.as_secs_f64(),
        approved.as_secs_f64(),
        lists / (STORM + 1) as f64,
        bytes,
        bytes / (STORM + 1) as f64,
    );
    assert!(
        isolated <= FRESH && approved <= FRESH,
        "after the storm, a change took {isolated:?} and approvals {approved:?} to show"
    );
    assert!(
        lists <= LISTS,
        "{lists} LISTs of FileChanges for a storm of {STORM}: the cost grows with the changes"
    );

    policies
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
    futures::stream::iter(names.iter().chain([&format!("{policy}-after")]))
        .map(|name| {
            let api = api.clone();
            async move {
                let _ = api.delete(name, &DeleteParams::default()).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}
