//! Delivery of queued changes to the API server: each report becomes a
//! FileChange object, counted in an Event series ([`super::series`]), and
//! leaves the queue only when stored.
//!
//! Creates are paced by a token bucket and failures back off exponentially with
//! jitter, so a thousand agents coming back after an API outage do not hit the
//! API server in lockstep. Names are deterministic, so a retry of a create whose
//! answer was lost meets AlreadyExists: delivered exactly once, once the stored
//! object is found to be this report (a different one is a squatted name, and
//! the report goes under another name). A numbered report waits until the
//! baseline holding its number is saved ([`super::sequence`]).
//!
//! Which report goes next is the pacer's choice ([`super::storm`]): the
//! oldest one whose lane (policy entry) is within its policy's cap. Reports
//! of a storming lane are deferred, not blocking: the ones behind them in
//! the queue, of other lanes, pass them.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube_fim_crds::FileChange;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::object::{shorten, squat_free_name};
use super::series::ChangeEvents;
use super::storm::{Head, Lane, Pacer, Plan};
use crate::context::Context;

/// Field manager of the agent's writes.
pub const FIELD_MANAGER: &str = "kube-fim-agent";

/// Pacing of API writes.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Sustained creates per second.
    pub qps: f64,
    /// Creates allowed in a burst.
    pub burst: u32,
}

/// A token bucket.
#[derive(Debug)]
pub struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(limit: RateLimit) -> Self {
        Bucket {
            limit,
            tokens: f64::from(limit.burst),
            last: Instant::now(),
        }
    }

    /// Waits until one request may go.
    pub async fn take(&mut self) {
        loop {
            let now = Instant::now();
            let refill = now.duration_since(self.last).as_secs_f64() * self.limit.qps;
            self.tokens = (self.tokens + refill).min(f64::from(self.limit.burst.max(1)));
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / self.limit.qps.max(0.001);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// Exponential backoff with full jitter: 0.5 s doubling to 60 s.
pub fn backoff(failures: u32) -> Duration {
    let cap = 500u64.saturating_mul(1 << failures.min(7)).min(60_000);
    Duration::from_millis(fastrand::u64(cap / 2..=cap))
}

/// Longest text of a report re-sent after a refusal.
const SHORT: usize = 512;

/// What became of one report.
enum Delivery {
    /// The API server stores it (created now, or AlreadyExists).
    Stored,
    /// Refused even shortened: kept on the node, out of the queue.
    Refused,
    /// The shortened report did not get through: tried again with the next batch.
    NotYet,
    /// The API server is unreachable or failing: back off.
    Failed(kube::Error),
}

/// The deliverer's state.
struct Deliverer {
    ctx: Arc<Context>,
    api: Api<FileChange>,
    params: PostParams,
    events: ChangeEvents,
    bucket: Bucket,
    pacer: Pacer,
    failures: u32,
    /// Since when deliveries fail.
    outage: Option<Instant>,
    /// The first transition number the baseline has not saved yet.
    committed: tokio::sync::watch::Receiver<u64>,
}

/// The cap of a policy no longer served (its reports still go, paced).
const DEFAULT_CAP: u32 = 100;

/// Delivers the queue until `shutdown`, creates paced by `limit` and each
/// lane by its policy's cap.
pub async fn run(
    ctx: Arc<Context>,
    limit: RateLimit,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut d = Deliverer {
        api: Api::all(ctx.client.clone()),
        params: PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        },
        events: ChangeEvents::new(&ctx),
        bucket: Bucket::new(limit),
        pacer: Pacer::default(),
        failures: 0,
        outage: None,
        committed: ctx.committed.clone(),
        ctx,
    };
    let mut committing = true;
    loop {
        let flush_at = d.events.flush(false).await;
        let plan = d.plan().await;
        let Some(seq) = plan.send else {
            // Nothing may go now: wait for a new report, a saved baseline,
            // the next token of a deferred lane, or an Event series' refresh.
            let wake = match (flush_at, plan.wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => {
                    d.events.flush(true).await;
                    return;
                }
                () = d.ctx.queued.notified() => {},
                // Its sender gone (the monitoring loop ended): no more saves.
                saved = d.committed.changed(), if committing => committing = saved.is_ok(),
                () = wait => {},
            }
            continue;
        };
        let Some(change) = d.ctx.queue.lock().await.get(seq) else {
            continue;
        };
        tokio::select! {
            () = &mut shutdown => return,
            () = d.bucket.take() => {},
        }
        match d.create(&change).await {
            Delivery::Stored => {
                if plan.paced {
                    d.ctx
                        .telemetry
                        .deferred_report_delivered(&change.spec.policy);
                }
                d.stored(seq).await;
            }
            Delivery::Refused => {
                let mut q = d.ctx.queue.lock().await;
                q.reject(seq);
                d.ctx.telemetry.reports_queued(q.len());
            }
            Delivery::NotYet => d.not_stored(&change),
            Delivery::Failed(error) => {
                d.not_stored(&change);
                let wait = d.failed(&error);
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(wait) => {},
                }
            }
        }
    }
}

impl Deliverer {
    /// What to send next: the pacer's choice among the lanes' oldest
    /// reports; tells storms and the deferred reports on the way.
    async fn plan(&mut self) -> Plan {
        let committed = *self.committed.borrow_and_update();
        let plan = {
            let q = self.ctx.queue.lock().await;
            self.ctx.telemetry.reports_queued(q.len());
            let served = self.ctx.served.borrow();
            let heads = q.heads().map(|h| Head {
                lane: h.lane,
                seq: h.seq,
                queued: h.queued,
                cap: served
                    .get(&h.lane.policy)
                    .map_or(DEFAULT_CAP, |p| p.spec.max_changes_per_node_per_minute),
                // Not saved yet: after a crash its number could be given again.
                ready: h.number.is_none_or(|n| n < committed),
            });
            self.pacer.plan(heads, Instant::now())
        };
        let t = &self.ctx.telemetry;
        t.reports_deferred(&plan.deferred);
        for policy in &plan.storm_minutes {
            t.change_storm_minute(policy);
        }
        for (lane, waiting) in &plan.storms {
            let cap = self.cap(&lane.policy);
            t.change_storm_started(&lane.policy, &lane.entry, cap, *waiting)
                .await;
        }
        plan
    }

    /// The per-minute cap of `policy`'s lanes.
    fn cap(&self, policy: &str) -> u32 {
        self.ctx
            .served
            .borrow()
            .get(policy)
            .map_or(DEFAULT_CAP, |p| p.spec.max_changes_per_node_per_minute)
    }

    /// A report sent was not stored: it stays queued, and its lane's token
    /// is given back.
    fn not_stored(&mut self, change: &FileChange) {
        let cap = self.cap(&change.spec.policy);
        self.pacer.give_back(&Lane::of(&change.spec), cap);
    }

    async fn create(&mut self, change: &FileChange) -> Delivery {
        match self.api.create(&self.params, change).await {
            Ok(stored) => {
                self.events.publish(&stored).await;
                self.ctx.telemetry.report_delivered();
                Delivery::Stored
            }
            Err(kube::Error::Api(e)) if e.code == 409 => self.already_exists(change).await,
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                // Too long or otherwise invalid: send it shortened, never drop it.
                self.ctx.telemetry.report_refused();
                warn!(name = %change.name_any(), path = %change.spec.path, error = %e.message, "the API server refused a change report; sending it shortened");
                self.create_shortened(change).await
            }
            Err(error) => Delivery::Failed(error),
        }
    }

    async fn create_shortened(&mut self, change: &FileChange) -> Delivery {
        let short = shorten(change, SHORT);
        match self.api.create(&self.params, &short).await {
            Ok(stored) => {
                self.events.publish(&stored).await;
                self.ctx.telemetry.report_delivered();
                Delivery::Stored
            }
            Err(kube::Error::Api(e)) if e.code == 409 => self.already_exists(&short).await,
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                // Kept on the node (queue's rejected/) for the logs and forensics.
                warn!(name = %change.name_any(), error = %e.message, "a shortened report was refused too; kept on the node");
                Delivery::Refused
            }
            Err(error) => {
                debug!(%error, "shortened report not delivered yet");
                Delivery::NotYet
            }
        }
    }

    /// The API server holds an object under the report's name: stored if it
    /// is this report (a create whose answer was lost, or a retry after a
    /// crash); otherwise someone squatted the name, and the report is
    /// created under another one, never acknowledged unstored.
    async fn already_exists(&mut self, change: &FileChange) -> Delivery {
        let name = change.name_any();
        let mut report = change.clone();
        for attempt in 1..=SQUAT_ATTEMPTS {
            let held = report.name_any();
            match self.api.get_opt(&held).await {
                Ok(Some(stored)) if same_report(&stored, &report) => {
                    debug!(name = %held, "already stored");
                    return Delivery::Stored;
                }
                // Gone since (retention, a delete): created at the next round.
                Ok(None) => return Delivery::NotYet,
                Err(error) => return Delivery::Failed(error),
                Ok(Some(_)) => {}
            }
            let fresh = squat_free_name(&name, attempt);
            warn!(name = %held, %fresh, path = %report.spec.path, "a different FileChange holds the name of this change report; reporting it under another name");
            self.ctx
                .telemetry
                .name_squatted(&held, &fresh, &report.spec.path)
                .await;
            report.metadata.name = Some(fresh);
            match self.api.create(&self.params, &report).await {
                Ok(stored) => {
                    self.events.publish(&stored).await;
                    self.ctx.telemetry.report_delivered();
                    return Delivery::Stored;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(error) => return Delivery::Failed(error),
            }
        }
        Delivery::NotYet
    }

    /// The report `seq` is stored: it leaves the queue.
    async fn stored(&mut self, seq: u64) {
        if let Some(since) = self.outage.take() {
            let waited = since.elapsed().as_secs();
            let queued = self.ctx.queue.lock().await.len();
            info!(
                after_failures = self.failures,
                waited, "delivering changes again"
            );
            self.ctx
                .telemetry
                .delivery_resumed(waited, self.failures, queued)
                .await;
        }
        self.failures = 0;
        let mut q = self.ctx.queue.lock().await;
        if let Err(error) = q.ack(seq) {
            warn!(%error, "could not remove a delivered report from the queue");
        }
        self.ctx.telemetry.reports_queued(q.len());
    }

    /// A create failed: how long to back off.
    fn failed(&mut self, error: &kube::Error) -> Duration {
        self.ctx.telemetry.report_failed();
        self.failures += 1;
        self.outage.get_or_insert_with(Instant::now);
        let wait = backoff(self.failures);
        if self.failures == 1 || self.failures.is_multiple_of(10) {
            warn!(%error, ?wait, failures = self.failures, "cannot deliver changes; they stay queued");
        }
        wait
    }
}

/// Names tried for one report whose name is squatted, per round.
const SQUAT_ATTEMPTS: u32 = 6;

/// Whether `stored` is the report `sent`: the same node, transition number,
/// file and states (what the agent put in it, not when it detected it).
fn same_report(stored: &FileChange, sent: &FileChange) -> bool {
    let (a, b) = (&stored.spec, &sent.spec);
    a.node == b.node
        && a.sequence == b.sequence
        && a.policy == b.policy
        && a.entry == b.entry
        && a.path == b.path
        && a.category == b.category
        && a.before == b.before
        && a.after == b.after
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fixtures::{self, EVENTS, FILECHANGES, metric};
    use crate::report::object::to_object;
    use crate::report::queue::Queue;
    use http::Method;

    const LIMIT: RateLimit = RateLimit {
        qps: 10.0,
        burst: 10,
    };

    /// Queues one report and starts the deliverer; the sender stops it.
    async fn deliverer(
        a: &fixtures::Agent,
    ) -> (
        FileChange,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let object = to_object(fixtures::change("/etc/passwd"), 0);
        a.ctx.queue.lock().await.push(&object).unwrap();
        let (stop, shutdown) = fixtures::shutdown();
        let task = tokio::spawn(run(a.ctx.clone(), LIMIT, shutdown));
        (object, stop, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_is_delivered_once_after_the_api_server_fails() {
        let mut a = fixtures::agent();
        let (object, stop, task) = deliverer(&a).await;

        let first = a.api.expect(Method::POST, FILECHANGES).await;
        assert_eq!(first.body["metadata"]["name"], object.name_any().as_str());
        first.fail(500, "InternalError");
        // Backed off, then sent again under the same name.
        let second = a.api.expect(Method::POST, FILECHANGES).await;
        assert_eq!(second.body["metadata"]["name"], object.name_any().as_str());
        second.created();
        let event = a.api.expect(Method::POST, EVENTS).await;
        assert_eq!(event.body["reason"], "FileModified");
        event.created();

        let later = a.api.quiet(Duration::from_secs(120)).await;
        assert!(
            !later.iter().any(|(_, path)| path == FILECHANGES),
            "created again: {later:?}"
        );
        assert_eq!(a.ctx.queue.lock().await.len(), 0, "acknowledged");
        let t = &a.ctx.telemetry;
        let delivered = r#"kube_fim_agent_reports_delivered_total{node="n1"}"#;
        assert_eq!(metric(t, delivered), Some(1.0));
        let failed = r#"kube_fim_agent_api_errors_total{operation="create",node="n1"}"#;
        assert_eq!(metric(t, failed), Some(1.0));
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_the_api_server_already_stores_leaves_the_queue_without_an_event() {
        let mut a = fixtures::agent();
        let (object, stop, task) = deliverer(&a).await;

        // A crash after the create and before the acknowledgement: the same
        // name meets AlreadyExists, and the stored object is this report.
        a.api
            .expect(Method::POST, FILECHANGES)
            .await
            .fail(409, "AlreadyExists");
        let path = format!("{FILECHANGES}/{}", object.name_any());
        let get = a.api.expect(Method::GET, &path).await;
        let mut stored = serde_json::to_value(&object).unwrap();
        stored["metadata"]["uid"] = "uid-stored".into();
        get.answer(200, &stored);
        let later = a.api.quiet(Duration::from_secs(120)).await;
        assert!(later.is_empty(), "{later:?}");
        assert_eq!(a.ctx.queue.lock().await.len(), 0, "acknowledged");
        let delivered = r#"kube_fim_agent_reports_delivered_total{node="n1"}"#;
        assert_eq!(metric(&a.ctx.telemetry, delivered), Some(0.0));
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_squatted_name_is_reported_under_another_name_with_a_warning() {
        let mut a = fixtures::agent();
        let mut spec = fixtures::change("/etc/passwd");
        spec.sequence = Some(7);
        let object = to_object(spec, 0);
        a.ctx.queue.lock().await.push(&object).unwrap();
        let (stop, shutdown) = fixtures::shutdown();
        let task = tokio::spawn(run(a.ctx.clone(), LIMIT, shutdown));

        // Someone created an object under the report's predictable name first.
        let name = object.name_any();
        a.api
            .expect(Method::POST, FILECHANGES)
            .await
            .fail(409, "AlreadyExists");
        let get = a
            .api
            .expect(Method::GET, &format!("{FILECHANGES}/{name}"))
            .await;
        let mut squatter = serde_json::to_value(&object).unwrap();
        squatter["spec"]["after"]["size"] = 1.into();
        get.answer(200, &squatter);
        // Reported under a fresh name, never acknowledged as delivered unstored.
        let again = a.api.expect(Method::POST, FILECHANGES).await;
        assert_eq!(
            again.body["metadata"]["name"],
            format!("{name}-s1").as_str()
        );
        assert_eq!(again.body["spec"]["sequence"], 7);
        assert_eq!(again.body["spec"]["path"], "/etc/passwd");
        again.created();
        a.api.expect(Method::POST, EVENTS).await.created();
        let later = a.api.quiet(Duration::from_secs(120)).await;
        assert!(later.is_empty(), "{later:?}");
        assert_eq!(a.ctx.queue.lock().await.len(), 0, "acknowledged");
        let t = &a.ctx.telemetry;
        let squatted = r#"kube_fim_agent_names_squatted_total{node="n1"}"#;
        assert_eq!(metric(t, squatted), Some(1.0));
        let delivered = r#"kube_fim_agent_reports_delivered_total{node="n1"}"#;
        assert_eq!(metric(t, delivered), Some(1.0));
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_numbered_report_waits_until_its_number_is_saved() {
        let mut a = fixtures::agent();
        a.committed.send(3).unwrap();
        let mut spec = fixtures::change("/etc/passwd");
        spec.sequence = Some(3);
        let object = to_object(spec, 0);
        a.ctx.queue.lock().await.push(&object).unwrap();
        let (stop, shutdown) = fixtures::shutdown();
        let task = tokio::spawn(run(a.ctx.clone(), LIMIT, shutdown));

        let early = a.api.quiet(Duration::from_secs(60)).await;
        assert!(early.is_empty(), "created before its save: {early:?}");
        a.committed.send(4).unwrap();
        let created = a.api.expect(Method::POST, FILECHANGES).await;
        assert_eq!(created.body["metadata"]["name"], object.name_any().as_str());
        created.created();
        a.api.expect(Method::POST, EVENTS).await.created();
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();
        assert_eq!(a.ctx.queue.lock().await.len(), 0);
    }

    /// Serves policy `p` with a cap of `cap` changes a minute.
    fn serve_p(a: &fixtures::Agent, cap: u32) {
        let mut spec = kube_fim_crds::FileIntegrityPolicySpec::with_paths(vec![]);
        spec.max_changes_per_node_per_minute = cap;
        let policy = kube_fim_crds::FileIntegrityPolicy::new("p", spec);
        a.served
            .send(crate::served::ServedPolicies::new([Arc::new(policy)]))
            .unwrap();
    }

    /// Answers every request until `until`; the paths of the FileChanges
    /// created, with when.
    async fn created_until(a: &mut fixtures::Agent, until: Instant) -> Vec<(String, Duration)> {
        let start = Instant::now();
        let mut out = Vec::new();
        while let Some(call) = a
            .api
            .next_within(until.saturating_duration_since(Instant::now()))
            .await
        {
            if call.method == Method::POST && call.path == FILECHANGES {
                let path = call.body["spec"]["path"].as_str().unwrap().to_string();
                out.push((path, start.elapsed()));
            }
            call.created();
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_in_one_entry_is_paced_and_another_entrys_change_passes_it() {
        let mut a = fixtures::agent();
        serve_p(&a, 2);
        let report = |path: &str, entry: &str| {
            let mut spec = fixtures::change(path);
            spec.entry = entry.into();
            to_object(spec, 0)
        };
        {
            let mut q = a.ctx.queue.lock().await;
            for i in 0..5 {
                q.push(&report(&format!("/etc/ssh/k{i}"), "ssh")).unwrap();
            }
            q.push(&report("/etc/sudoers", "sudoers")).unwrap();
        }
        let (stop, shutdown) = fixtures::shutdown();
        let task = tokio::spawn(run(a.ctx.clone(), LIMIT, shutdown));

        let t0 = Instant::now();
        let first = created_until(&mut a, t0 + Duration::from_secs(5)).await;
        let paths: Vec<&str> = first.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["/etc/ssh/k0", "/etc/ssh/k1", "/etc/sudoers"],
            "the cap of ssh at once, then sudoers ahead of ssh's deferred reports"
        );
        let t = a.ctx.telemetry.clone();
        let t = &t;
        let deferred = r#"kube_fim_agent_reports_deferred{policy="p",node="n1"}"#;
        assert_eq!(metric(t, deferred), Some(3.0));
        let storms = r#"kube_fim_agent_change_storms_total{policy="p",node="n1"}"#;
        assert_eq!(metric(t, storms), Some(1.0));

        // The rest one every 60 / 2 = 30 s, none dropped, none folded.
        let rest = created_until(&mut a, t0 + Duration::from_secs(100)).await;
        let paths: Vec<&str> = rest.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/etc/ssh/k2", "/etc/ssh/k3", "/etc/ssh/k4"]);
        let at: Vec<u64> = rest
            .iter()
            .map(|(_, d)| (d.as_secs_f64() + 5.0).round() as u64)
            .collect();
        assert_eq!(at, [30, 60, 90], "paced at the cap");
        assert_eq!(a.ctx.queue.lock().await.len(), 0);
        assert_eq!(metric(t, deferred), Some(0.0));
        let paced = r#"kube_fim_agent_reports_deferred_total{policy="p",node="n1"}"#;
        assert_eq!(metric(t, paced), Some(3.0));
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn deferred_reports_survive_a_restart_and_each_is_delivered_once() {
        let mut a = fixtures::agent();
        serve_p(&a, 2);
        {
            let mut q = a.ctx.queue.lock().await;
            for i in 0..5 {
                let mut spec = fixtures::change(&format!("/usr/bin/t{i}"));
                spec.sequence = Some(i);
                q.push(&to_object(spec, 0)).unwrap();
            }
        }
        let (stop, shutdown) = fixtures::shutdown();
        let task = tokio::spawn(run(a.ctx.clone(), LIMIT, shutdown));
        let before = created_until(&mut a, Instant::now() + Duration::from_secs(10)).await;
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();

        // The agent starts again on its state directory: the deferred
        // reports are read back from the queue and paced again.
        *a.ctx.queue.lock().await = Queue::open(&a.dir.path().join("queue"), 1000).unwrap();
        let (stop, shutdown) = fixtures::shutdown();
        let task = tokio::spawn(run(a.ctx.clone(), LIMIT, shutdown));
        let after = created_until(&mut a, Instant::now() + Duration::from_secs(60)).await;
        let paths: Vec<&str> = before
            .iter()
            .chain(&after)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(
            paths,
            (0..5).map(|i| format!("/usr/bin/t{i}")).collect::<Vec<_>>(),
            "each once, in order"
        );
        assert_eq!(before.len(), 2, "the cap before the restart");
        assert_eq!(a.ctx.queue.lock().await.len(), 0);
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_costs_no_tokens_and_is_no_storm() {
        let mut a = fixtures::agent();
        serve_p(&a, 1);
        a.ctx
            .queue
            .lock()
            .await
            .push(&to_object(fixtures::change("/etc/passwd"), 0))
            .unwrap();
        let (stop, shutdown) = fixtures::shutdown();
        let task = tokio::spawn(run(a.ctx.clone(), LIMIT, shutdown));
        for _ in 0..3 {
            a.api
                .expect(Method::POST, FILECHANGES)
                .await
                .fail(503, "ServiceUnavailable");
        }
        // Sent again after the backoff, not after the cap's minute.
        let again = a.api.next_within(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            (&again.method, again.path.as_str()),
            (&Method::POST, FILECHANGES)
        );
        again.created();
        let storms = r#"kube_fim_agent_change_storms_total{policy="p",node="n1"}"#;
        assert_eq!(metric(&a.ctx.telemetry, storms), None);
        stop.send(true).unwrap();
        let (stopped, _) = tokio::join!(task, a.api.quiet(Duration::from_secs(10)));
        stopped.unwrap();
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for f in 0..20 {
            let d = backoff(f);
            assert!(d <= Duration::from_secs(60));
            assert!(d >= Duration::from_millis(250));
        }
        assert!(backoff(10) >= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_paces_after_the_burst() {
        let mut b = Bucket::new(RateLimit {
            qps: 10.0,
            burst: 5,
        });
        let start = Instant::now();
        for _ in 0..15 {
            b.take().await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(950), "{took:?}");
        assert!(took <= Duration::from_millis(1100), "{took:?}");
    }
}
