//! Evidence export on a real API server: `FileChangeSink`s are validated by the
//! API server, and the operator delivers every FileChange to them (a file and
//! an HTTP receiver run by the test), once, in order per node, with a stable
//! id; a receiver that is down turns its sink Degraded and gets the backlog
//! when back; a restarted operator resumes from the position the sink's status
//! records; retention keeps what a sink has not delivered.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

mod delivery;
mod fingerprints;
mod otel;
mod records;
mod retention;
mod syslog;
mod validation;

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

/// Waits until the sink's condition `type_` has `status` and a message
/// holding `says`; the condition's (status, reason, message).
async fn wait_condition(
    sinks: &Api<FileChangeSink>,
    name: &str,
    type_: &str,
    status: &str,
    says: &str,
) -> (String, String, String) {
    eventually(
        &format!("the sink {type_}={status}"),
        Duration::from_secs(60),
        || {
            let (sinks, name) = (sinks.clone(), name.to_string());
            async move {
                let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
                match condition(&s, type_) {
                    Some(c) if c.0 == status && c.2.contains(says) => Ok(c),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
}

/// A Node and its FileIntegrityNode, created with the node's own bound token
/// as its agent would; the node's name and that agent's client.
async fn node_with_record(suite: &str) -> (String, kube::Client) {
    use kube_fim_crds::{FileIntegrityNode, FileIntegrityNodeSpec};
    let node = format!("{suite}-a");
    kube_fim_e2e::create_node(&client().await, &node, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    Api::<FileIntegrityNode>::all(agent.clone())
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    (node, agent)
}

/// An OTLP sink spec.
fn otlp(endpoint: String, protocol: kube_fim_crds::OtlpProtocol, batch: u32) -> FileChangeSinkSpec {
    let mut spec = FileChangeSinkSpec {
        otlp: Some(kube_fim_crds::OtlpTransport {
            endpoint,
            protocol,
            authorization_secret_ref: None,
        }),
        ..FileChangeSinkSpec::default()
    };
    spec.batch_size = batch;
    spec
}
