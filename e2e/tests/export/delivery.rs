//! Delivery to a file and an HTTP receiver: once, in order, a receiver that is
//! down, a Secret the operator may not read, an operator restart.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn file_and_webhook_sinks_receive_each_change_once_in_order() {
    ensure_export_rbac();
    let suite = unique_name("exp-once");
    let _operator = Operator::start(&suite, &suite, &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.ndjson");
    let receiver = Receiver::start().await;

    let file_sink = sink(
        &format!("{suite}-file"),
        &suite,
        FileChangeSinkSpec::with_file(path.to_str().unwrap()),
    );
    let mut web = FileChangeSinkSpec::with_webhook(&receiver.url());
    web.format = SinkFormat::Ecs;
    web.batch_size = 2;
    let web_sink = sink(&format!("{suite}-web"), &suite, web);
    let sinks = create_sink(&file_sink).await;
    create_sink(&web_sink).await;

    let node_a = format!("{suite}-a");
    let node_b = format!("{suite}-b");
    let a = create_changes(&node_a, "p", &format!("{suite}-a"), 5).await;
    let b = create_changes(&node_b, "p", &format!("{suite}-b"), 2).await;

    eventually(
        "every change in the file, in order",
        Duration::from_secs(60),
        || {
            let path = path.clone();
            let (a, b) = (a.clone(), b.clone());
            let (node_a, node_b) = (node_a.clone(), node_b.clone());
            async move {
                let events = file_events(&path);
                let got = (ocsf_ids(&events, &node_a), ocsf_ids(&events, &node_b));
                if got == (a, b) {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    eventually(
        "every change at the webhook, in order",
        Duration::from_secs(60),
        || {
            let receiver = receiver.clone();
            let (a, b) = (a.clone(), b.clone());
            let (node_a, node_b) = (node_a.clone(), node_b.clone());
            async move {
                let events = receiver.events();
                let got = (ecs_ids(&events, &node_a), ecs_ids(&events, &node_b));
                if got == (a, b) {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;

    // The formats carry what a SIEM queries.
    let events = file_events(&path);
    let first = events
        .iter()
        .find(|e| e["metadata"]["uid"] == a[0].as_str())
        .unwrap();
    assert_eq!(first["class_uid"], 1001);
    assert_eq!(first["activity_id"], 3, "the fixture is a modification");
    assert_eq!(first["file"]["path"], "/etc/exported-0");
    assert_eq!(first["file"]["hashes"][0]["algorithm"], "BLAKE3");
    assert_eq!(first["policy"]["name"], "p");

    // The status shows where each node's delivery stands, and it is Ready.
    let status_of = |name: String| {
        let sinks = sinks.clone();
        let (node_a, last_a) = (node_a.clone(), a[4].clone());
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            let st = s.status.clone().unwrap_or_default();
            let at_a = st
                .positions
                .iter()
                .find(|p| p.node == node_a)
                .map(|p| p.name.clone());
            let ready = condition(&s, "Ready");
            if at_a.as_deref() == Some(last_a.as_str())
                && ready.as_ref().is_some_and(|c| c.0 == "True")
                && condition(&s, "Degraded").is_some_and(|c| c.0 == "False")
                && st.delivered.unwrap_or(0) >= 7
            {
                Ok(st)
            } else {
                Err(format!("{:?} {ready:?}", st.positions))
            }
        }
    };
    eventually("the file sink's status", Duration::from_secs(30), || {
        status_of(file_sink.metadata.name.clone().unwrap())
    })
    .await;
    eventually("the webhook sink's status", Duration::from_secs(30), || {
        status_of(web_sink.metadata.name.clone().unwrap())
    })
    .await;
    let text = _operator.metrics().unwrap_or_default();
    let delivered = metric(
        &text,
        &format!(
            "kube_fim_sink_delivered_total{{sink=\"{}\"}}",
            web_sink.metadata.name.clone().unwrap()
        ),
    )
    .unwrap_or(0.0);
    assert!(delivered >= 7.0, "delivered metric {delivered}");

    // Nothing arrives twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = file_events(&path);
    assert_eq!(ocsf_ids(&events, &node_a), a);
    assert_eq!(ecs_ids(&receiver.events(), &node_a), a);
    for s in [file_sink, web_sink] {
        sinks
            .delete(&s.metadata.name.unwrap(), &DeleteParams::default())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_is_down_degrades_the_sink_then_gets_the_backlog_in_order() {
    ensure_export_rbac();
    let suite = unique_name("exp-down");
    let operator = Operator::start(&suite, &suite, &[]);
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
    let names = create_changes(&node, "p", &node, 6).await;

    let (_, reason, message) = eventually("the sink Degraded", Duration::from_secs(60), || {
        let sinks = sinks.clone();
        let name = name.clone();
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            match condition(&s, "Degraded") {
                Some(c) if c.0 == "True" => Ok(c),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert_eq!(reason, "DeliveryFailed");
    assert!(message.contains("503"), "{message}");
    let s = sinks.get(&name).await.unwrap();
    assert_eq!(condition(&s, "Ready").unwrap().0, "False");
    let st = s.status.unwrap();
    assert!(st.failures.unwrap_or(0) >= 1);
    assert!(st.pending.unwrap_or(0) >= 6, "{st:?}");
    let text = operator.metrics().unwrap_or_default();
    let failures = metric(
        &text,
        &format!("kube_fim_sink_failures_total{{sink=\"{name}\",reason=\"rejected\"}}"),
    )
    .unwrap_or(0.0);
    assert!(failures >= 1.0, "{text}");
    assert!(
        metric(
            &text,
            &format!("kube_fim_sink_lag_seconds{{sink=\"{name}\"}}")
        )
        .is_some(),
        "lag metric"
    );
    assert!(ocsf_ids(&receiver.events(), &node).is_empty());

    receiver.status.store(200, Ordering::SeqCst);
    eventually("the backlog, in order", Duration::from_secs(90), || {
        let receiver = receiver.clone();
        let (names, node) = (names.clone(), node.clone());
        async move {
            let got = ocsf_ids(&receiver.events(), &node);
            if got == names {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        }
    })
    .await;
    eventually("the sink Ready again", Duration::from_secs(30), || {
        let sinks = sinks.clone();
        let name = name.clone();
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            let ready = condition(&s, "Ready");
            let degraded = condition(&s, "Degraded");
            if ready.as_ref().is_some_and(|c| c.0 == "True")
                && degraded.as_ref().is_some_and(|c| c.0 == "False")
            {
                Ok(())
            } else {
                Err(format!("{ready:?} {degraded:?}"))
            }
        }
    })
    .await;
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sink_naming_a_secret_the_operator_may_not_read_is_degraded_and_says_why() {
    ensure_export_rbac();
    let suite = unique_name("exp-secret");
    let _operator = Operator::start(&suite, &suite, &[]);
    let name = format!("{suite}-web");
    let mut spec = FileChangeSinkSpec::with_webhook("https://siem.example.com/ingest");
    spec.webhook.as_mut().unwrap().authorization_secret_ref = Some(kube_fim_crds::SecretKeyRef {
        name: "no-such-token".into(),
        key: "authorization".into(),
    });
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    let (_, reason, message) = eventually("the sink Degraded", Duration::from_secs(60), || {
        let sinks = sinks.clone();
        let name = name.clone();
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            match condition(&s, "Degraded") {
                Some(c) if c.0 == "True" => Ok(c),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert_eq!(reason, "InvalidConfiguration");
    assert!(message.contains("Secret no-such-token"), "{message}");
    let s = sinks.get(&name).await.unwrap();
    assert_eq!(condition(&s, "Ready").unwrap().1, "InvalidConfiguration");
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_operator_resumes_from_the_recorded_position() {
    ensure_export_rbac();
    let suite = unique_name("exp-restart");
    let mut operator = Operator::start(&suite, &suite, &[]);
    let receiver = Receiver::start().await;
    let name = format!("{suite}-web");
    let sinks = create_sink(&sink(
        &name,
        &suite,
        FileChangeSinkSpec::with_webhook(&receiver.url()),
    ))
    .await;
    let node = format!("{suite}-n");
    // Detected long before the restart: outside the replay window.
    let early = Timestamp::now() - Duration::from_secs(600);
    let first = create_changes_at(&node, "p", &format!("{node}-1"), 3, early).await;
    eventually(
        "the first changes delivered and recorded",
        Duration::from_secs(60),
        || {
            let sinks = sinks.clone();
            let (name, node, last) = (name.clone(), node.clone(), first[2].clone());
            async move {
                let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
                let st = s.status.unwrap_or_default();
                match st.positions.iter().find(|p| p.node == node) {
                    Some(p) if p.name == last => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    assert_eq!(ocsf_ids(&receiver.events(), &node), first);

    operator.process.kill();
    let second = create_changes(&node, "p", &format!("{node}-2"), 3).await;
    let _operator = Operator::start(&suite, &suite, &[]);
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    eventually(
        "the changes made while it was down",
        Duration::from_secs(90),
        || {
            let receiver = receiver.clone();
            let (all, node) = (all.clone(), node.clone());
            async move {
                let got = ocsf_ids(&receiver.events(), &node);
                if got == all {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    // Nothing re-sent: the first three were recorded as delivered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ocsf_ids(&receiver.events(), &node), all);
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}
