//! The middle test tier: the agent's tasks in-process against a mocked API
//! server (`tower-test`), one scenario at a time, the way kube-rs's
//! controller-rs tests its reconciler.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube_fim_crds::{ChangeCategory, DetectionSource, FileChangeSpec};
use tokio::sync::{Mutex, Notify, watch};

use crate::context::Context;
use crate::report::queue::Queue;
use crate::served::ServedPolicies;
use crate::telemetry::Telemetry;

/// Where FileChanges are created.
pub const FILECHANGES: &str = "/apis/fim.kube-fim.io/v1alpha1/filechanges";
/// Where the Events of changes are created.
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

/// The API server's side of the mock: each request is awaited and answered
/// by the test.
pub struct ApiServer(Handle);

/// One request the agent made.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: serde_json::Value,
    respond: Responder,
}

impl Call {
    /// Answers with `status` and `body`.
    pub fn answer(self, status: u16, body: &serde_json::Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.respond.send_response(response);
    }

    /// Answers that the object was created: the object itself.
    pub fn created(self) {
        let body = self.body.clone();
        self.answer(201, &body);
    }

    /// Answers with a failure `code` and its `reason` (a metav1 Status).
    pub fn fail(self, code: u16, reason: &str) {
        let status = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "message": format!("mocked {reason}"),
            "reason": reason,
            "code": code,
        });
        self.answer(code, &status);
    }
}

impl ApiServer {
    /// The next request, if one comes within `wait` (of tokio's clock).
    pub async fn next_within(&mut self, wait: Duration) -> Option<Call> {
        let (request, respond) = tokio::time::timeout(wait, self.0.next_request())
            .await
            .ok()??;
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Some(Call {
            method,
            path,
            body,
            respond,
        })
    }

    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self
            .next_within(Duration::from_secs(600))
            .await
            .unwrap_or_else(|| panic!("no {method} {path} came"));
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected request"
        );
        call
    }
}

impl ApiServer {
    /// Answers every request for `wait` (what was sent, as stored) and says
    /// which came.
    pub async fn quiet(&mut self, wait: Duration) -> Vec<(Method, String)> {
        let until = tokio::time::Instant::now() + wait;
        let mut calls = Vec::new();
        while let Some(call) = self
            .next_within(until.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            calls.push((call.method.clone(), call.path.clone()));
            call.created();
        }
        calls
    }
}

/// An agent's context on node `n1` whose client talks to the mock.
pub struct Agent {
    pub ctx: Arc<Context>,
    pub api: ApiServer,
    pub served: watch::Sender<ServedPolicies>,
    /// The first transition number not saved yet, as the deliverer sees it.
    pub committed: watch::Sender<u64>,
    pub dir: tempfile::TempDir,
}

pub fn agent() -> Agent {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(&dir.path().join("queue"), 1000).unwrap();
    let (served, served_rx) = watch::channel(ServedPolicies::default());
    // Every number saved unless a test says otherwise.
    let (committed, committed_rx) = watch::channel(u64::MAX);
    let ctx = Context {
        committed: committed_rx,
        node: "n1".into(),
        client: Client::new(service.clone(), "default"),
        watches: Client::new(service, "default"),
        telemetry: Telemetry::new("n1").unwrap(),
        queue: Arc::new(Mutex::new(queue)),
        queued: Notify::new(),
        served: served_rx,
        fingerprints: None,
    };
    Agent {
        ctx: Arc::new(ctx),
        api: ApiServer(handle),
        served,
        committed,
        dir,
    }
}

/// A shutdown signal as the agent's tasks get it (it may be polled again
/// after it resolved), and its trigger.
pub fn shutdown() -> (
    watch::Sender<bool>,
    futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) {
    use futures::FutureExt;
    let (stop, mut stopped) = watch::channel(false);
    let signal = async move {
        let _ = stopped.wait_for(|v| *v).await;
    };
    (stop, signal.boxed().shared())
}

/// A change of `/etc/passwd` on `n1` by policy `p`.
pub fn change(path: &str) -> FileChangeSpec {
    FileChangeSpec {
        node: "n1".into(),
        policy: "p".into(),
        entry: "etc".into(),
        path: path.into(),
        category: ChangeCategory::Modified,
        changed_attributes: vec![],
        before: None,
        after: None,
        detected_time: MicroTime(Timestamp::now()),
        source: DetectionSource::Realtime,
        process: None,
        summary: None,
        sequence: None,
        package: None,
        restored: None,
        container: None,
    }
}

/// The value of the series `name{node="n1"<labels>}` in the agent's metrics.
pub fn metric(telemetry: &Telemetry, series: &str) -> Option<f64> {
    telemetry.render().lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}
