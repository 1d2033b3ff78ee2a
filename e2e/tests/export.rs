//! Evidence export on a real API server: `FileChangeSink`s are validated by the
//! API server, and the operator delivers every FileChange to them (a file and
//! an HTTP receiver run by the test), once, in order per node, with a stable
//! id; a receiver that is down turns its sink Degraded and gets the backlog
//! when back; a restarted operator resumes from the position the sink's status
//! records; retention keeps what a sink has not delivered.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube_fim_crds::{FileChange, FileChangeSink, FileChangeSinkSpec, SinkFormat};
use kube_fim_e2e::operator::{Operator, SUITE_LABEL};
use kube_fim_e2e::{
    ChangeFixture, client, create_passwd_policy, ensure_crds, eventually, kubectl, kubectl_stdin,
    metric, repo_root, unique_name,
};
use serde_json::Value;

/// Installs the CRDs and lets the operator's ServiceAccount read sinks and
/// write their status: the rules the chart must grant (see the README's
/// "Evidence export"). No Secret: the tests' sinks name none, and the
/// operator reads no Secret it was not granted by name.
fn ensure_export_rbac() {
    ensure_crds();
    let run = kubectl([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/filechangesinks.fim.kube-fim.io",
    ]);
    assert!(run.success, "{}", run.stderr);
    let rbac = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: kube-fim
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: kube-fim-operator-export
rules:
  - apiGroups: [fim.kube-fim.io]
    resources: [filechangesinks]
    verbs: [get, list, watch]
  - apiGroups: [fim.kube-fim.io]
    resources: [filechangesinks/status]
    verbs: [patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kube-fim-operator-export
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: kube-fim-operator-export
subjects:
  - kind: ServiceAccount
    name: kube-fim-operator
    namespace: kube-fim
"#;
    let run = kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=kube-fim-e2e",
            "-f",
            "-",
        ],
        rbac,
    );
    assert!(run.success, "{}", run.stderr);
}

/// A minimal HTTP/1.1 receiver: answers each POST with `status` (200 when
/// up) and keeps the NDJSON lines of the acknowledged ones.
#[derive(Clone)]
struct Receiver {
    port: u16,
    status: Arc<AtomicU16>,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let r = Receiver {
            port: listener.local_addr().unwrap().port(),
            status: Arc::new(AtomicU16::new(200)),
            lines: Arc::default(),
        };
        let server = r.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let server = server.clone();
                std::thread::spawn(move || server.serve(conn));
            }
        });
        r
    }

    fn serve(self, mut conn: std::net::TcpStream) {
        use std::io::{Read, Write};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            // One request: its head, then Content-Length bytes of body.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + length {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
            let status = self.status.load(Ordering::SeqCst);
            if status == 200 {
                let mut lines = self.lines.lock().unwrap();
                for line in String::from_utf8_lossy(&body).lines() {
                    lines.push(serde_json::from_str(line).expect("each line is JSON"));
                }
            }
            let reason = if status == 200 {
                "OK"
            } else {
                "Service Unavailable"
            };
            let answer = format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-length: 12\r\n\r\nreceiver-{status}"
            );
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/ingest", self.port)
    }

    fn events(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }
}

fn sink(name: &str, suite: &str, spec: FileChangeSinkSpec) -> FileChangeSink {
    let mut s = FileChangeSink::new(name, spec);
    s.metadata.labels = Some(BTreeMap::from([(
        SUITE_LABEL.to_string(),
        suite.to_string(),
    )]));
    s
}

async fn create_sink(sink: &FileChangeSink) -> Api<FileChangeSink> {
    let api: Api<FileChangeSink> = Api::all(client().await);
    api.create(&PostParams::default(), sink).await.unwrap();
    api
}

/// Creates `count` FileChanges on `node`, detected one millisecond apart in
/// the order of their names; their names.
async fn create_changes(node: &str, policy: &str, prefix: &str, count: usize) -> Vec<String> {
    create_changes_at(node, policy, prefix, count, Timestamp::now()).await
}

async fn create_changes_at(
    node: &str,
    policy: &str,
    prefix: &str,
    count: usize,
    start: Timestamp,
) -> Vec<String> {
    let api: Api<FileChange> = Api::all(client().await);
    let mut names = Vec::new();
    for i in 0..count {
        let name = format!("{prefix}-{i:03}");
        let mut fc = ChangeFixture::new(&name, node, policy)
            .path(&format!("/etc/exported-{i}"))
            .build();
        fc.spec.detected_time = MicroTime(start + Duration::from_millis(i as u64));
        api.create(&PostParams::default(), &fc).await.unwrap();
        names.push(name);
    }
    names
}

/// The ids of the events about `node`, in the order received.
fn ocsf_ids(events: &[Value], node: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["device"]["hostname"] == node)
        .map(|e| e["metadata"]["uid"].as_str().unwrap().to_string())
        .collect()
}

fn ecs_ids(events: &[Value], node: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["host"]["name"] == node)
        .map(|e| e["event"]["id"].as_str().unwrap().to_string())
        .collect()
}

fn file_events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn condition(sink: &FileChangeSink, type_: &str) -> Option<(String, String, String)> {
    sink.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

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

/// One refused sink from `examples/sinks/invalid/`, with what its header promises.
fn bad_sinks() -> Vec<(String, String, String, String)> {
    let dir = repo_root().join("examples/sinks/invalid");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/sinks/invalid exists") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .unwrap_or_else(|| panic!("{} lacks `# {key}:`", path.display()))
                .to_string()
        };
        out.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            header("expect-field"),
            header("expect-message"),
            text,
        ));
    }
    out.sort();
    out
}

#[test]
fn bad_sinks_are_refused_by_the_api_server_naming_the_field() {
    ensure_export_rbac();
    let cases = bad_sinks();
    assert!(cases.len() >= 8, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (file, field, message, text) in &cases {
        let run = kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], text);
        if run.success {
            failures.push(format!("{file}: accepted"));
        } else if !run.stderr.contains(field.as_str()) || !run.stderr.contains(message.as_str()) {
            failures.push(format!(
                "{file}: expected {field:?} and {message:?}, the API server said: {}",
                run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn good_sinks_are_accepted_and_explained() {
    ensure_export_rbac();
    let dir = repo_root().join("examples/sinks");
    let mut seen = HashMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let run = kubectl(["apply", "--dry-run=server", "-f", path.to_str().unwrap()]);
        assert!(run.success, "{}: {}", path.display(), run.stderr);
        seen.insert(path, ());
    }
    assert!(seen.len() >= 4, "an example per transport");
    let run = kubectl(["explain", "filechangesink.spec.syslog.port"]);
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("TCP port"), "{}", run.stdout);
    let run = kubectl(["explain", "fcs.status.positions"]);
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("restart resumes"), "{}", run.stdout);
}

/// A real rsyslog (Debian's `rsyslogd`, e2e/deps.sh installs it) listening
/// on TCP with octet-counted framing, writing each message's host, app name,
/// message id and text to a file.
struct Rsyslog {
    process: Option<std::process::Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Rsyslog {
    fn new() -> Rsyslog {
        Rsyslog::with(false)
    }

    /// With `tls`, the listener speaks TLS (RFC 5425, rsyslog's gtls driver)
    /// with a server certificate for 127.0.0.1 issued by a CA of its own
    /// (`ca.crt` in its directory).
    fn with(tls: bool) -> Rsyslog {
        let dir = tempfile::tempdir().unwrap();
        let port = kube_fim_e2e::free_port();
        let d = dir.path().display().to_string();
        let tls_conf = if tls {
            let openssl = |args: &[&str]| {
                let out = std::process::Command::new("openssl")
                    .args(args)
                    .current_dir(dir.path())
                    .output()
                    .expect("openssl is installed (e2e/deps.sh)");
                assert!(out.status.success(), "openssl {args:?}: {out:?}");
            };
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=kube-fim-e2e-ca",
                "-days",
                "1",
            ]);
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ]);
            std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ]);
            format!(
                r#"global(DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{d}/ca.crt" DefaultNetstreamDriverCertFile="{d}/server.crt" DefaultNetstreamDriverKeyFile="{d}/server.key")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
"#
            )
        } else {
            "module(load=\"imtcp\")\n".to_string()
        };
        let conf = format!(
            r#"global(workDirectory="{dir}" maxMessageSize="64k")
{tls_conf}template(name="fields" type="string" string="%hostname%|%app-name%|%msgid%|%msg%\n")
ruleset(name="fim") {{
  action(type="omfile" file="{dir}/received.log" template="fields")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="fim")
"#,
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("rsyslog.conf"), conf).unwrap();
        Rsyslog {
            process: None,
            dir,
            port,
        }
    }

    fn start(&mut self) {
        let conf = self.dir.path().join("rsyslog.conf");
        let pid = self.dir.path().join("rsyslog.pid");
        let _ = std::fs::remove_file(&pid);
        let child = std::process::Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(&pid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("rsyslogd is not installed ({e}): `apt-get install rsyslog` (e2e/deps.sh installs it)")
            });
        self.process = Some(child);
        // Listening once a connection is accepted.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "rsyslogd did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Per message: host, app name, message id, and the text parsed as JSON.
    fn received(&self) -> Vec<(String, String, String, Value)> {
        std::fs::read_to_string(self.dir.path().join("received.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(4, '|');
                let host = parts.next()?.to_string();
                let app = parts.next()?.to_string();
                let msgid = parts.next()?.to_string();
                let json = serde_json::from_str(parts.next()?.trim()).ok()?;
                Some((host, app, msgid, json))
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_rsyslog_receives_rfc5424_once_it_listens() {
    ensure_export_rbac();
    let suite = unique_name("exp-syslog");
    let _operator = Operator::start(&suite, &suite, &[]);
    let mut rsyslog = Rsyslog::new();
    let name = format!("{suite}-syslog");
    let spec = FileChangeSinkSpec {
        syslog: Some(kube_fim_crds::SyslogTransport {
            host: "127.0.0.1".into(),
            port: i32::from(rsyslog.port),
            tls: false,
            app_name: "kube-fim".into(),
        }),
        ..FileChangeSinkSpec::default()
    };
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    let node = format!("{suite}-n");
    let names = create_changes(&node, "p", &node, 4).await;

    // Nothing listens yet: the sink says so.
    let (_, _, message) = eventually("the sink Degraded", Duration::from_secs(60), || {
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
    assert!(message.contains("cannot reach the receiver"), "{message}");

    rsyslog.start();
    eventually(
        "rsyslog has every change, in order",
        Duration::from_secs(90),
        || {
            let got: Vec<String> = rsyslog
                .received()
                .into_iter()
                .filter(|(host, ..)| *host == node)
                .map(|(_, _, _, e)| {
                    e["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            let names = names.clone();
            async move {
                if got == names {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    let (_, app, msgid, event) = rsyslog
        .received()
        .into_iter()
        .find(|(host, ..)| *host == node)
        .unwrap();
    assert_eq!((app.as_str(), msgid.as_str()), ("kube-fim", "FileChange"));
    assert_eq!(event["class_uid"], 1001);
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

/// The export tests' OpenTelemetry Collector, built from Go modules and cached
/// by `e2e/otelcol/build.sh` (a cold build takes many minutes).
fn otelcol_binary() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::process::Command::new(repo_root().join("e2e/otelcol/build.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running e2e/otelcol/build.sh");
        assert!(out.status.success(), "e2e/otelcol/build.sh failed");
        std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// A real OpenTelemetry Collector: OTLP/HTTP receiver, file exporter.
struct Collector {
    process: Option<std::process::Child>,
    dir: tempfile::TempDir,
    port: u16,
    runs: usize,
}

impl Collector {
    fn new() -> Collector {
        Collector {
            process: None,
            dir: tempfile::tempdir().unwrap(),
            port: kube_fim_e2e::free_port(),
            runs: 0,
        }
    }

    /// Starts it, each run exporting to a file of its own.
    fn start(&mut self) {
        self.runs += 1;
        let dir = self.dir.path();
        let conf = format!(
            r#"receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
exporters:
  file:
    path: {dir}/logs-{run}.json
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    logs:
      receivers: [otlp]
      exporters: [file]
"#,
            port = self.port,
            dir = dir.display(),
            run = self.runs
        );
        let path = dir.join(format!("config-{}.yaml", self.runs));
        std::fs::write(&path, conf).unwrap();
        let log = std::fs::File::create(dir.join(format!("collector-{}.log", self.runs))).unwrap();
        let child = std::process::Command::new(otelcol_binary())
            .arg(format!("--config=file:{}", path.display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the collector");
        self.process = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the collector did not listen: {}",
                std::fs::read_to_string(dir.join(format!("collector-{}.log", self.runs)))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The OCSF events the collector exported, over all runs, in order.
    fn events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for run in 1..=self.runs {
            let text = std::fs::read_to_string(self.dir.path().join(format!("logs-{run}.json")))
                .unwrap_or_default();
            for line in text.lines() {
                let Ok(request) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                for rl in request["resourceLogs"].as_array().into_iter().flatten() {
                    for sl in rl["scopeLogs"].as_array().into_iter().flatten() {
                        for record in sl["logRecords"].as_array().into_iter().flatten() {
                            if let Some(body) = record["body"]["stringValue"].as_str() {
                                out.push(serde_json::from_str(body).expect("the body is JSON"));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

/// First occurrences, in order.
fn dedup(ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().filter(|i| seen.insert(i.clone())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_collector_gets_every_change_across_operator_and_collector_restarts() {
    ensure_export_rbac();
    let suite = unique_name("exp-otel");
    let mut collector = Collector::new();
    collector.start();
    let mut operator = Operator::start(&suite, &suite, &[]);
    let name = format!("{suite}-otlp");
    let mut spec = FileChangeSinkSpec {
        otlp: Some(kube_fim_crds::OtlpTransport {
            endpoint: format!("http://127.0.0.1:{}", collector.port),
            protocol: kube_fim_crds::OtlpProtocol::Http,
            authorization_secret_ref: None,
        }),
        ..FileChangeSinkSpec::default()
    };
    spec.batch_size = 5;
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    let node = format!("{suite}-n");
    let mut all = create_changes(&node, "p", &format!("{node}-1"), 10).await;
    eventually(
        "the collector has the first changes",
        Duration::from_secs(60),
        || {
            let got = ocsf_ids(&collector.events(), &node);
            let want = all.clone();
            async move {
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;

    // Acknowledged batches are recorded at most a second later; a crash
    // before that sends them again (same ids). Recorded: nothing is re-sent.
    eventually("the position recorded", Duration::from_secs(30), || {
        let sinks = sinks.clone();
        let (name, node, last) = (name.clone(), node.clone(), all[9].clone());
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            let st = s.status.unwrap_or_default();
            match st.positions.iter().find(|p| p.node == node) {
                Some(p) if p.name == last => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    // Both ends go down; changes keep coming.
    operator.process.kill();
    collector.kill();
    all.extend(create_changes(&node, "p", &format!("{node}-2"), 5).await);
    let _operator = Operator::start(&suite, &suite, &[]);
    eventually("the sink Degraded", Duration::from_secs(60), || {
        let sinks = sinks.clone();
        let name = name.clone();
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            match condition(&s, "Degraded") {
                Some(c) if c.0 == "True" && c.2.contains("cannot reach the receiver") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    collector.start();
    all.extend(create_changes(&node, "p", &format!("{node}-3"), 5).await);
    eventually(
        "every change at the collector, in order",
        Duration::from_secs(120),
        || {
            let got = ocsf_ids(&collector.events(), &node);
            let want = all.clone();
            async move {
                // Duplicates only as the ids allow: every id is a change's, and
                // the first occurrences are every change in order.
                if got.iter().all(|id| want.contains(id)) && dedup(got.clone()) == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    let got = ocsf_ids(&collector.events(), &node);
    assert_eq!(got, all, "nothing acknowledged was sent twice");
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn syslog_over_tls_verifies_the_server_against_the_ca_the_sink_names() {
    ensure_export_rbac();
    let suite = unique_name("exp-tls");
    let _operator = Operator::start(&suite, &suite, &[]);
    let mut rsyslog = Rsyslog::with(true);
    rsyslog.start();
    let ca = std::fs::read_to_string(rsyslog.dir.path().join("ca.crt")).unwrap();

    // The CA, in a Secret of the operator's namespace the operator may read by name only.
    let secret = format!("{suite}-ca");
    let objects = format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: {secret}, namespace: kube-fim}}
stringData:
  ca.crt: |
{ca}---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {secret}, namespace: kube-fim}}
rules:
  - apiGroups: [""]
    resources: [secrets]
    resourceNames: [{secret}]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {secret}, namespace: kube-fim}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {secret}}}
subjects:
  - {{kind: ServiceAccount, name: kube-fim-operator, namespace: kube-fim}}
"#,
        ca = ca.lines().map(|l| format!("    {l}\n")).collect::<String>()
    );
    let run = kubectl_stdin(&["apply", "-f", "-"], &objects);
    assert!(run.success, "{}", run.stderr);

    // Without the CA, the system roots do not trust rsyslog's certificate.
    let name = format!("{suite}-syslog");
    let syslog = kube_fim_crds::SyslogTransport {
        host: "127.0.0.1".into(),
        port: i32::from(rsyslog.port),
        tls: true,
        app_name: "kube-fim".into(),
    };
    let spec = FileChangeSinkSpec {
        syslog: Some(syslog),
        ..FileChangeSinkSpec::default()
    };
    let sinks = create_sink(&sink(&name, &suite, spec.clone())).await;
    let node = format!("{suite}-n");
    let names = create_changes(&node, "p", &node, 3).await;
    let message = eventually("the sink Degraded", Duration::from_secs(60), || {
        let sinks = sinks.clone();
        let name = name.clone();
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            match condition(&s, "Degraded") {
                Some(c) if c.0 == "True" => Ok(c.2),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(message.contains("TLS"), "{message}");
    assert!(rsyslog.received().iter().all(|(host, ..)| *host != node));

    // With it, every change arrives.
    let mut s = sinks.get(&name).await.unwrap();
    s.spec.tls = Some(kube_fim_crds::SinkTls {
        ca_secret_ref: Some(kube_fim_crds::SecretKeyRef {
            name: secret.clone(),
            key: "ca.crt".into(),
        }),
        client_certificate_secret_name: None,
    });
    sinks
        .replace(&name, &PostParams::default(), &s)
        .await
        .unwrap();
    eventually(
        "rsyslog has every change over TLS",
        Duration::from_secs(120),
        || {
            let got: Vec<String> = rsyslog
                .received()
                .into_iter()
                .filter(|(host, ..)| *host == node)
                .map(|(_, _, _, e)| {
                    e["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            let names = names.clone();
            async move {
                if got == names {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
    let _ = kubectl_stdin(&["delete", "-f", "-"], &objects);
}

/// An approval is evidence too: a change already delivered, then approved
/// by a person, reaches the sink a second time as its own event — id
/// `<change>/approval`, the approver and the reason, no longer an alert — once,
/// in its node's order after what was delivered before it.
#[tokio::test(flavor = "multi_thread")]
async fn an_approval_of_a_delivered_change_reaches_the_sink_as_its_own_event() {
    ensure_export_rbac();
    let suite = unique_name("exp-approve");
    let _operator = Operator::start(&suite, &suite, &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.ndjson");
    let file_sink = sink(
        &format!("{suite}-file"),
        &suite,
        FileChangeSinkSpec::with_file(path.to_str().unwrap()),
    );
    let sinks = create_sink(&file_sink).await;
    let node = format!("{suite}-a");
    let names = create_changes(&node, "p", &format!("{suite}-a"), 2).await;
    let delivered = |want: Vec<String>| {
        let (path, node) = (path.clone(), node.clone());
        move || {
            let (path, node, want) = (path.clone(), node.clone(), want.clone());
            async move {
                let got = ocsf_ids(&file_events(&path), &node);
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            }
        }
    };
    eventually(
        "both changes delivered",
        Duration::from_secs(120),
        delivered(names.clone()),
    )
    .await;

    let admin = client().await;
    kube_fim_e2e::approve(&admin, &names[0], "CHG-42")
        .await
        .unwrap();
    let mut want = names.clone();
    want.push(format!("{}/approval", names[0]));
    eventually(
        "the approval delivered after the changes",
        Duration::from_secs(60),
        delivered(want.clone()),
    )
    .await;
    let events = file_events(&path);
    let approval = events
        .iter()
        .find(|e| e["metadata"]["uid"] == want[2].as_str())
        .unwrap();
    assert_eq!(approval["is_alert"], false);
    assert_eq!(approval["unmapped"]["approval"]["reason"], "CHG-42");
    assert_eq!(
        approval["unmapped"]["approval"]["approvedBy"],
        kube_fim_e2e::whoami(&admin).await.as_str()
    );
    assert_eq!(approval["file"]["path"], "/etc/exported-0");
    // Once: a later status write (the agent's answer) sends nothing again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ocsf_ids(&file_events(&path), &node), want);
    sinks
        .delete(&file_sink.metadata.name.unwrap(), &DeleteParams::default())
        .await
        .unwrap();
}

/// A node's alarms (the baseline alarm its agent raises, an evidence gap the
/// operator records on its record) are evidence as much as its changes: each
/// reaches the sink once, under a stable id, in the node's order; the same
/// alarm written again is nothing new.
#[tokio::test(flavor = "multi_thread")]
async fn a_nodes_alarms_reach_the_sink_once_each_with_stable_ids() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::{Patch, PatchParams};
    use kube_fim_crds::{FileIntegrityNode, FileIntegrityNodeSpec};

    ensure_export_rbac();
    let suite = unique_name("exp-alarm");
    let _operator = Operator::start(&suite, &suite, &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.ndjson");
    let file_sink = sink(
        &format!("{suite}-file"),
        &suite,
        FileChangeSinkSpec::with_file(path.to_str().unwrap()),
    );
    let sinks = create_sink(&file_sink).await;
    let admin = client().await;
    let node = format!("{suite}-a");
    kube_fim_e2e::create_node(&admin, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    Api::<FileIntegrityNode>::all(agent.clone())
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    let names = create_changes(&node, "p", &node, 1).await;
    let delivered = |want: Vec<String>| {
        let (path, node) = (path.clone(), node.clone());
        move || {
            let (path, node, want) = (path.clone(), node.clone(), want.clone());
            async move {
                let got = ocsf_ids(&file_events(&path), &node);
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            }
        }
    };
    eventually(
        "the change delivered",
        Duration::from_secs(120),
        delivered(names.clone()),
    )
    .await;

    // The node's own agent (its node-bound token) raises a baseline alarm.
    let raise = serde_json::json!({ "status": { "baselineAlarm": {
        "id": "b1", "reason": "BaselineTampered",
        "since": Time(Timestamp::now()),
        "message": "the baseline on this node is not the one the cluster knows",
    }}});
    Api::<FileIntegrityNode>::all(agent.clone())
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&raise))
        .await
        .expect("the agent raises its alarm");
    let mut want = names.clone();
    want.push(format!("{node}/baseline/b1"));
    eventually(
        "the baseline alarm delivered after the change",
        Duration::from_secs(60),
        delivered(want.clone()),
    )
    .await;
    let events = file_events(&path);
    let alarm = events
        .iter()
        .find(|e| e["metadata"]["uid"] == want[1].as_str())
        .unwrap();
    assert_eq!(alarm["is_alert"], true);
    assert_eq!(alarm["severity"], "High");
    assert_eq!(alarm["activity_id"], 99);
    assert_eq!(alarm["activity_name"], "BaselineTampered");
    assert_eq!(alarm["class_uid"], 1001);

    // The operator records an evidence gap (written here as it writes one:
    // server-side apply of status.verification).
    let gap = serde_json::json!({
        "apiVersion": "fim.kube-fim.io/v1alpha1", "kind": "FileIntegrityNode",
        "status": { "verification": {
            "verifiedThrough": 9, "from": 0, "since": Time(Timestamp::now()),
            "gaps": [{ "first": 5, "last": 7, "reason": "Missing", "since": Time(Timestamp::now()) }],
        }},
    });
    Api::<FileIntegrityNode>::all(admin.clone())
        .patch_status(
            &node,
            &PatchParams::apply("kube-fim-operator").force(),
            &Patch::Apply(&gap),
        )
        .await
        .expect("the gap recorded");
    want.push(format!("{node}/gap/5-7/Missing"));
    eventually(
        "the evidence gap delivered",
        Duration::from_secs(60),
        delivered(want.clone()),
    )
    .await;
    let events = file_events(&path);
    let gap = events
        .iter()
        .find(|e| e["metadata"]["uid"] == want[2].as_str())
        .unwrap();
    assert_eq!(gap["activity_name"], "EvidenceGap");
    assert_eq!(gap["is_alert"], true);

    // The agent republishing its alarm, unchanged, sends nothing again.
    Api::<FileIntegrityNode>::all(agent.clone())
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&raise))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ocsf_ids(&file_events(&path), &node), want, "once each");
    sinks
        .delete(&file_sink.metadata.name.unwrap(), &DeleteParams::default())
        .await
        .unwrap();
}

/// A node's agent (or root on it, with its token) backdates the alarm it
/// raises to before what the sink already delivered of that node, while no
/// operator leads: a position alone would count it as delivered. The next
/// operator sends it all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_backdated_alarm_raised_while_no_operator_leads_still_reaches_the_sink() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::{Patch, PatchParams};
    use kube_fim_crds::{FileIntegrityNode, FileIntegrityNodeSpec};

    ensure_export_rbac();
    let suite = unique_name("exp-backdate");
    let mut operator = Operator::start(&suite, &suite, &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.ndjson");
    let name = format!("{suite}-file");
    let sinks = create_sink(&sink(
        &name,
        &suite,
        FileChangeSinkSpec::with_file(path.to_str().unwrap()),
    ))
    .await;
    let admin = client().await;
    let node = format!("{suite}-a");
    kube_fim_e2e::create_node(&admin, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let records = Api::<FileIntegrityNode>::all(agent.clone());
    records
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    let names = create_changes(&node, "p", &node, 1).await;
    eventually(
        "the change delivered and recorded",
        Duration::from_secs(60),
        || {
            let sinks = sinks.clone();
            let (name, node, last) = (name.clone(), node.clone(), names[0].clone());
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

    operator.process.kill();
    let backdated = Timestamp::now() - Duration::from_secs(3600);
    records
        .patch_status(
            &node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": { "baselineAlarm": {
                "id": "old", "reason": "BaselineMissing", "since": Time(backdated),
                "message": "the baseline on this node is missing",
            }}})),
        )
        .await
        .expect("the agent raises its alarm");
    let _operator = Operator::start(&suite, &suite, &[]);
    let mut want = names.clone();
    want.push(format!("{node}/baseline/old"));
    eventually(
        "the backdated alarm delivered by the next operator",
        Duration::from_secs(90),
        || {
            let (path, node, want) = (path.clone(), node.clone(), want.clone());
            async move {
                let got = ocsf_ids(&file_events(&path), &node);
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            }
        },
    )
    .await;
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}
