//! Mocked-API tests of the reconcilers: one reconcile of a policy (or of the
//! fleet) against an API server that `tower-test` stands in for, asserting
//! each request the reconciler makes, in order, and answering it. The model
//! is kube-rs controller-rs's `fixtures.rs`. Time is paused: a reconciler that
//! makes fewer requests than a scenario expects fails at once on the timeout
//! instead of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use kube_fim_crds::{
    FileIntegrityNode, FileIntegrityNodeSpec, FileIntegrityPolicy, FileIntegrityPolicySpec,
    MonitoredPath,
};
use serde_json::{Value, json};
use tower_test::mock::{self, SendResponse};

use crate::config::Config;
use crate::context::{Context, FIELD_MANAGER};
use crate::controller::{error_policy, reconcile, reconcile_fleet};
use crate::metrics::Metrics;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

/// The stand-in API server: each call takes the reconciler's next request.
struct ApiServer(Handle);

/// One request the reconciler made, decoded.
struct Call {
    path: String,
    query: BTreeSet<String>,
    body: Value,
    send: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// The next request, which must be `method` on `path`.
    async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self.expect_any(method).await;
        assert_eq!(call.path, path, "request {:?}", call.query);
        call
    }

    /// The next request, which must be a `method`, on whichever path.
    async fn expect_any(&mut self, method: Method) -> Call {
        let (request, send) = self
            .0
            .next_request()
            .await
            .expect("the reconciler makes another request");
        let uri = request.uri().clone();
        assert_eq!(
            request.method(),
            method,
            "request {} {uri}",
            request.method()
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let query = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        Call {
            path: uri.path().to_string(),
            query,
            body,
            send,
        }
    }

    /// Fails if the reconciler made a request no scenario step expected.
    async fn no_more_requests(mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(100), self.0.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

impl Call {
    /// Server-side apply by the operator's field manager, forced.
    fn assert_applied(&self) {
        for wanted in [format!("fieldManager={FIELD_MANAGER}"), "force=true".into()] {
            assert!(
                self.query.contains(&wanted),
                "{}: {wanted} in {:?}",
                self.path,
                self.query
            );
        }
    }

    fn respond(self, status: StatusCode, body: &Value) {
        self.send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }

    /// Answers with what was sent, as the API server does for a create or an apply.
    fn echo(self) {
        let body = self.body.clone();
        self.respond(StatusCode::OK, &body);
    }
}

/// A Status answer of the API server.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": if code < 300 { "Success" } else { "Failure" },
           "code": code, "reason": reason, "message": message})
}

fn policy(name: &str, path: &str, role: &str) -> FileIntegrityPolicy {
    let mut spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
        name: "etc".into(),
        path: path.into(),
        ..MonitoredPath::default()
    }]);
    spec.node_selector = BTreeMap::from([("role".to_string(), role.to_string())]);
    let mut p = FileIntegrityPolicy::new(name, spec);
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("1".into());
    p
}

fn node(name: &str, role: &str) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some(name.into());
    n.metadata.labels = Some(BTreeMap::from([("role".to_string(), role.to_string())]));
    n
}

fn record(node: &str) -> FileIntegrityNode {
    FileIntegrityNode::new(
        node,
        FileIntegrityNodeSpec {
            node: node.to_string(),
        },
    )
}

/// A cache that has listed `objects`.
fn listed<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// A context whose caches hold these objects (no FileChange), its client
/// talking to the returned stand-in.
fn context(
    policies: Vec<FileIntegrityPolicy>,
    nodes: Vec<Node>,
    records: Vec<FileIntegrityNode>,
) -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: None,
        },
    );
    let ctx = Context::new(
        client,
        Config::default(),
        Metrics::new().unwrap(),
        recorder,
        listed(policies),
        listed(nodes),
        listed(records),
    );
    ctx.changes.observe(&watcher::Event::InitDone);
    (Arc::new(ctx), ApiServer(handle))
}

/// Runs `reconciler` while `server` plays the API server's part, both within
/// a (paused) second.
async fn drive<T, R, S>(reconciler: R, server: S) -> T
where
    R: Future<Output = T>,
    S: Future<Output = ()> + Send + 'static,
{
    let server = tokio::spawn(server);
    let out = tokio::time::timeout(Duration::from_secs(1), reconciler)
        .await
        .expect("the reconcile finishes");
    tokio::time::timeout(Duration::from_secs(1), server)
        .await
        .expect("the API server's part finishes")
        .expect("the API server saw what the scenario expects");
    out
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("a {type_} condition in {status:#}"))
}

const DAEMONSETS: &str = "/apis/apps/v1/namespaces/kube-fim/daemonsets/kube-fim-agent";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const WEB_STATUS: &str = "/apis/fim.kube-fim.io/v1alpha1/fileintegritypolicies/web/status";

#[tokio::test(start_paused = true)]
async fn the_fleet_applies_the_daemonset_on_the_policies_nodes_and_drops_a_gone_nodes_record() {
    let (ctx, mut api) = context(
        vec![policy("web", "/etc/passwd", "web")],
        vec![node("n1", "web")],
        vec![record("n1"), record("gone")],
    );
    let action = drive(reconcile_fleet(&ctx), async move {
        let apply = api.expect(Method::PATCH, DAEMONSETS).await;
        apply.assert_applied();
        let terms = &apply.body["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        assert_eq!(
            terms,
            &json!([{"matchExpressions": [{"key": "role", "operator": "In", "values": ["web"]}]}]),
            "{:#}",
            apply.body
        );
        assert_eq!(apply.body["kind"], "DaemonSet");
        apply.echo();
        // n1 still exists: only the record of the node that went is deleted.
        let delete = api
            .expect(
                Method::DELETE,
                "/apis/fim.kube-fim.io/v1alpha1/fileintegritynodes/gone",
            )
            .await;
        delete.respond(StatusCode::OK, &status(200, "", ""));
        api.no_more_requests().await;
    })
    .await;
    assert_eq!(action.unwrap(), Action::requeue(Duration::from_secs(30)));
    assert_eq!(
        ctx.metrics
            .daemonset_applies
            .with_label_values(&["apply"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_generation_is_announced_and_its_status_applied() {
    let web = policy("web", "/etc/passwd", "web");
    let (ctx, mut api) = context(
        vec![web.clone()],
        vec![node("n1", "web"), node("n2", "db")],
        vec![],
    );
    let answer = web.clone();
    let action = drive(reconcile(Arc::new(web), ctx.clone()), async move {
        let event = api.expect(Method::POST, EVENTS).await;
        assert_eq!(
            (&event.body["type"], &event.body["reason"]),
            (&json!("Normal"), &json!("PolicyApplied")),
            "{:#}",
            event.body
        );
        assert_eq!(event.body["regarding"]["name"], "web");
        assert_eq!(event.body["reportingController"], FIELD_MANAGER);
        event.echo();

        let patch = api.expect(Method::PATCH, WEB_STATUS).await;
        patch.assert_applied();
        let status = &patch.body["status"];
        assert_eq!(status["observedGeneration"], 1);
        // n1 is selected, its agent has not reported yet; n2 is not selected.
        assert_eq!(status["nodesSelected"], 1);
        assert_eq!(status["nodesBaselining"], 1);
        let ready = condition(status, "Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("Baselining"))
        );
        let degraded = condition(status, "Degraded");
        assert_eq!(
            (&degraded["status"], &degraded["reason"]),
            (&json!("False"), &json!("AsExpected"))
        );
        let mut stored = serde_json::to_value(&answer).unwrap();
        stored["status"] = status.clone();
        patch.respond(StatusCode::OK, &stored);
        api.no_more_requests().await;
    })
    .await;
    assert_eq!(action.unwrap(), Action::requeue(Config::default().resync));
    assert_eq!(ctx.metrics.reconciles.with_label_values(&["ok"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_policy_gets_a_warning_event_and_a_degraded_status() {
    let bad = policy("web", "etc/passwd", "web");
    let (ctx, mut api) = context(vec![bad.clone()], vec![node("n1", "web")], vec![]);
    let answer = bad.clone();
    let action = drive(reconcile(Arc::new(bad), ctx.clone()), async move {
        let event = api.expect(Method::POST, EVENTS).await;
        assert_eq!(
            (&event.body["type"], &event.body["reason"]),
            (&json!("Warning"), &json!("InvalidPolicy")),
            "{:#}",
            event.body
        );
        let note = event.body["note"].as_str().unwrap_or_default();
        assert!(note.contains("spec.paths[0].path"), "{note}");
        event.echo();

        let patch = api.expect(Method::PATCH, WEB_STATUS).await;
        let status = &patch.body["status"];
        let degraded = condition(status, "Degraded");
        assert_eq!(
            (&degraded["status"], &degraded["reason"]),
            (&json!("True"), &json!("InvalidPolicy"))
        );
        // Refused, so served on no node.
        assert_eq!(status["nodesSelected"], 0);
        let mut stored = serde_json::to_value(&answer).unwrap();
        stored["status"] = status.clone();
        patch.respond(StatusCode::OK, &stored);
        api.no_more_requests().await;
    })
    .await;
    assert!(action.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_refused_status_write_fails_the_reconcile_into_the_error_policy() {
    let web = Arc::new(policy("web", "/etc/passwd", "web"));
    let (ctx, mut api) = context(vec![(*web).clone()], vec![], vec![]);
    let result = drive(reconcile(web.clone(), ctx.clone()), async move {
        api.expect(Method::POST, EVENTS).await.echo();
        let patch = api.expect(Method::PATCH, WEB_STATUS).await;
        patch.respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "etcdserver: request timed out"),
        );
        api.no_more_requests().await;
    })
    .await;
    let error = result.expect_err("the status write failed");
    assert!(
        error.to_string().contains("writing status of policy web"),
        "{error}"
    );
    assert_eq!(
        error_policy(web, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        ctx.metrics
            .reconcile_errors
            .with_label_values(&["write_status"])
            .get(),
        1
    );
    assert_eq!(
        ctx.metrics.reconciles.with_label_values(&["error"]).get(),
        1
    );
}

fn file_change(name: &str, policy: &str) -> Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use kube_fim_crds::labels::{POLICY, label_value};
    use kube_fim_crds::{ChangeCategory, DetectionSource, FileChange, FileChangeSpec};
    let mut fc = FileChange::new(
        name,
        FileChangeSpec {
            node: "n1".into(),
            policy: policy.into(),
            entry: "etc".into(),
            path: "/etc/passwd".into(),
            category: ChangeCategory::Modified,
            changed_attributes: vec![],
            before: None,
            after: None,
            detected_time: MicroTime(k8s_openapi::jiff::Timestamp::now()),
            source: DetectionSource::Realtime,
            process: None,
            summary: None,
            sequence: None,
            package: None,
            restored: None,
            container: None,
        },
    );
    // The label says "web" for all three: anyone with patch rights can set
    // it, so the spec decides.
    fc.metadata.labels = Some(BTreeMap::from([(POLICY.to_string(), label_value("web"))]));
    serde_json::to_value(fc).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_deleted_policy_with_evidence_delete_takes_only_its_own_changes_then_lets_go() {
    let mut web = policy("web", "/etc/passwd", "web");
    web.spec.evidence = kube_fim_crds::Evidence::Delete;
    web.metadata.finalizers = Some(vec![crate::evidence::FINALIZER.to_string()]);
    web.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let (ctx, mut api) = context(vec![web.clone()], vec![], vec![]);
    let answer = web.clone();
    let action = drive(reconcile(Arc::new(web), ctx.clone()), async move {
        let list = api
            .expect(Method::GET, "/apis/fim.kube-fim.io/v1alpha1/filechanges")
            .await;
        assert!(
            list.query.iter().any(|q| q.starts_with("labelSelector=")),
            "{:?}",
            list.query
        );
        list.respond(
            StatusCode::OK,
            &json!({"apiVersion": "fim.kube-fim.io/v1alpha1", "kind": "FileChangeList",
                    "metadata": {}, "items": [file_change("c1", "web"),
                    file_change("forged", "other"), file_change("c2", "web")]}),
        );
        let mut deleted = BTreeSet::new();
        for _ in 0..2 {
            let delete = api.expect_any(Method::DELETE).await;
            deleted.insert(delete.path.clone());
            delete.respond(StatusCode::OK, &status(200, "", ""));
        }
        assert_eq!(
            deleted,
            BTreeSet::from([
                "/apis/fim.kube-fim.io/v1alpha1/filechanges/c1".to_string(),
                "/apis/fim.kube-fim.io/v1alpha1/filechanges/c2".to_string(),
            ])
        );
        let event = api.expect(Method::POST, EVENTS).await;
        assert_eq!(event.body["reason"], "EvidenceDeleted");
        let note = event.body["note"].as_str().unwrap_or_default();
        assert!(note.contains("2 FileChange(s)"), "{note}");
        event.echo();

        let release = api
            .expect(
                Method::PATCH,
                "/apis/fim.kube-fim.io/v1alpha1/fileintegritypolicies/web",
            )
            .await;
        assert_eq!(
            release.body["metadata"],
            json!({"finalizers": [], "resourceVersion": "1"})
        );
        let mut stored = serde_json::to_value(&answer).unwrap();
        stored["metadata"]["finalizers"] = json!([]);
        release.respond(StatusCode::OK, &stored);
        api.no_more_requests().await;
    })
    .await;
    assert_eq!(action.unwrap(), Action::await_change());
}

const RECORD_A: &str = "/apis/fim.kube-fim.io/v1alpha1/fileintegritynodes/a";

fn storm_record(
    entry: &str,
    since: &str,
    last: &str,
    count: u64,
) -> kube_fim_crds::ChangeStormRecord {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    kube_fim_crds::ChangeStormRecord {
        policy: "web".into(),
        entry: entry.into(),
        since: Time(since.parse().unwrap()),
        last: Time(last.parse().unwrap()),
        count,
        cap: 20,
    }
}

/// A storm is merged into the storms the node's record holds as read just
/// now, not as the cache shows them (a storm of another entry recorded a
/// moment ago is not in the cache yet, and must stay); a write refused is
/// given back, to be tried again.
#[tokio::test(start_paused = true)]
async fn a_storm_is_recorded_beside_those_the_cache_does_not_show_yet_and_kept_until_written() {
    use crate::controller::record_node_storms;
    let earlier = storm_record(
        "sudoers",
        "2026-12-07T05:00:00Z",
        "2026-12-07T05:00:10Z",
        25,
    );
    let found = vec![storm_record(
        "ssh",
        "2026-12-07T05:00:05Z",
        "2026-12-07T05:00:30Z",
        40,
    )];
    records_beside_the_stored_and_given_back("storms", earlier, found, |ctx, found| async move {
        record_node_storms(&ctx, "a", found).await
    })
    .await;
}

fn flood_record(since: &str, last: &str, count: u64) -> kube_fim_crds::ChangeFloodRecord {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    kube_fim_crds::ChangeFloodRecord {
        since: Time(since.parse().unwrap()),
        last: Time(last.parse().unwrap()),
        count,
        budget: 120,
    }
}

/// A flood is merged into the floods the node's record holds as read just
/// now, not as the cache shows them (at operator start the cache is empty,
/// and a flood recorded a moment ago is not in it yet: both must stay); a
/// write refused is given back, to be tried again.
#[tokio::test(start_paused = true)]
async fn a_flood_is_recorded_beside_those_the_cache_does_not_show_yet_and_kept_until_written() {
    use crate::controller::record_node_floods;
    let earlier = flood_record("2026-12-07T04:00:00Z", "2026-12-07T04:02:00Z", 300);
    let found = vec![flood_record(
        "2026-12-07T05:00:00Z",
        "2026-12-07T05:00:00Z",
        150,
    )];
    records_beside_the_stored_and_given_back("floods", earlier, found, |ctx, found| async move {
        record_node_floods(&ctx, "a", found).await
    })
    .await;
}

/// What a storm and a flood are recorded through (`noderecord`), driven by
/// `write` (node a, the records `found`): the node's record as read holds
/// `earlier` under `status.<list>`, the cache nothing; the PATCH, under the
/// list's own field manager, carries `earlier` then `found`; a PATCH refused
/// gives `found` back.
async fn records_beside_the_stored_and_given_back<R, W, F>(
    list: &str,
    earlier: R,
    found: Vec<R>,
    write: W,
) where
    R: serde::Serialize
        + serde::de::DeserializeOwned
        + PartialEq
        + std::fmt::Debug
        + Clone
        + Send
        + 'static,
    W: Fn(Arc<Context>, Vec<R>) -> F,
    F: Future<Output = Result<(), Vec<R>>>,
{
    let manager = format!("fieldManager=kube-fim-operator-{list}");
    let list = list.to_string();
    let (ctx, mut server) = context(vec![], vec![node("a", "web")], vec![record("a")]);
    let mut stored = serde_json::to_value(record("a")).unwrap();
    stored["status"] = json!({ list.clone(): [earlier] });
    let answer = stored.clone();
    let mut want = vec![earlier];
    want.extend(found.iter().cloned());
    let written = drive(write(ctx, found.clone()), async move {
        server
            .expect(Method::GET, RECORD_A)
            .await
            .respond(StatusCode::OK, &answer);
        let patch = server
            .expect(Method::PATCH, &format!("{RECORD_A}/status"))
            .await;
        assert!(patch.query.contains(&manager), "{:?}", patch.query);
        let records: Vec<R> = serde_json::from_value(patch.body["status"][&list].clone()).unwrap();
        assert_eq!(records, want);
        let mut now = serde_json::to_value(record("a")).unwrap();
        now["status"] = json!({ list: records });
        patch.respond(StatusCode::OK, &now);
        server.no_more_requests().await;
    })
    .await;
    assert_eq!(written, Ok(()));

    let (ctx, mut server) = context(vec![], vec![node("a", "web")], vec![record("a")]);
    let given_back = drive(write(ctx, found), async move {
        server
            .expect(Method::GET, RECORD_A)
            .await
            .respond(StatusCode::OK, &stored);
        server
            .expect(Method::PATCH, &format!("{RECORD_A}/status"))
            .await
            .respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status(500, "InternalError", "etcd is away"),
            );
        server.no_more_requests().await;
    })
    .await;
    assert_eq!(given_back.map_err(|f| f.len()), Err(1));
}
