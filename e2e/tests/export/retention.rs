//! Retention keeps what a sink has not delivered, up to its bound.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_what_a_sink_has_not_delivered() {
    ensure_export_rbac();
    let suite = unique_name("exp-hold");
    let client = client().await;
    let policy = unique_name("exp-hold-p");
    let policies = create_passwd_policy(&client, &policy, &suite).await;
    let mut p = policies.get(&policy).await.unwrap();
    p.spec.retention.max_count = 1;
    p.spec.retention.delete_unapproved = true;
    policies
        .replace(&policy, &PostParams::default(), &p)
        .await
        .unwrap();
    let _operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let receiver = Receiver::start().await;
    receiver.status.store(503, Ordering::SeqCst);
    let name = format!("{suite}-web");
    let sinks = create_sink(&sink(
        &name,
        &suite,
        FileChangeSinkSpec::with_webhook(&receiver.url()),
    ))
    .await;
    let node = format!("{suite}-n");
    let names = create_changes(&node, &policy, &node, 4).await;
    let changes: Api<FileChange> = Api::all(client.clone());
    let on_node = || {
        let changes = changes.clone();
        let node = node.clone();
        async move {
            let mut names: Vec<String> = changes
                .list(&ListParams::default().fields(&format!("spec.node={node}")))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|c| c.metadata.name.unwrap())
                .collect();
            names.sort();
            names
        }
    };
    // Several retention passes (every 2 s): the undelivered changes stay.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        on_node().await,
        names,
        "retention deleted undelivered changes"
    );

    receiver.status.store(200, Ordering::SeqCst);
    eventually(
        "retention once delivered",
        Duration::from_secs(60),
        || async move {
            let left = on_node().await;
            if left.len() == 1 {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    assert_eq!(ocsf_ids(&receiver.events(), &node), names);
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
    policies
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn past_hold_max_retention_deletes_and_raises_an_alarm() {
    ensure_export_rbac();
    let suite = unique_name("exp-expire");
    let client = client().await;
    let policy = unique_name("exp-expire-p");
    let policies = create_passwd_policy(&client, &policy, &suite).await;
    let mut p = policies.get(&policy).await.unwrap();
    p.spec.retention.max_count = 1;
    p.spec.retention.delete_unapproved = true;
    policies
        .replace(&policy, &PostParams::default(), &p)
        .await
        .unwrap();
    let operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let name = format!("{suite}-web");
    let mut spec = FileChangeSinkSpec::with_webhook("http://127.0.0.1:9/never-up");
    spec.hold_max = "1m".into();
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    let node = format!("{suite}-n");
    // Detected ten minutes ago: past the sink's holdMax of one minute.
    let old = Timestamp::now() - Duration::from_secs(600);
    create_changes_at(&node, &policy, &node, 3, old).await;
    let changes: Api<FileChange> = Api::all(client.clone());
    eventually("retention past holdMax", Duration::from_secs(120), || {
        let changes = changes.clone();
        let node = node.clone();
        async move {
            let left = changes
                .list(&ListParams::default().fields(&format!("spec.node={node}")))
                .await
                .unwrap()
                .items
                .len();
            if left == 1 {
                Ok(())
            } else {
                Err(format!("{left} left"))
            }
        }
    })
    .await;
    let events = eventually("the SinkHoldExpired alarm", Duration::from_secs(30), || {
        let name = name.clone();
        async move {
            let run = kubectl([
                "get",
                "events",
                "-A",
                "--field-selector",
                &format!("reason=SinkHoldExpired,involvedObject.name={name}"),
                "-o",
                "json",
            ]);
            let v: Value = serde_json::from_str(&run.stdout).map_err(|e| e.to_string())?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                Err(run.stderr)
            } else {
                Ok(items)
            }
        }
    })
    .await;
    assert_eq!(events[0]["type"], "Warning");
    let note = events[0]["message"].as_str().unwrap_or_default();
    assert!(note.contains("holdMax 1m"), "{note}");
    let text = operator.metrics().unwrap_or_default();
    let expired = metric(
        &text,
        &format!("kube_fim_sink_hold_expired_total{{sink=\"{name}\"}}"),
    )
    .unwrap_or(0.0);
    assert_eq!(expired, 2.0, "{text}");
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
    policies
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
}
