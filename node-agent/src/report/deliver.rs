//! Delivery of queued changes to the API server: each report becomes a
//! FileChange object and an Event, and leaves the queue only when stored.
//!
//! Creates are paced by a token bucket and failures back off exponentially with
//! jitter, so a thousand agents coming back after an API outage do not hit the
//! API server in lockstep. Names are deterministic, so a retry of a create whose
//! answer was lost meets AlreadyExists: delivered exactly once.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use kube_fim_crds::{ChangeCategory, FileChange};
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::object::shorten;
use super::queue::Queue;
use crate::cluster::metrics::ClusterMetrics;

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

/// The Event that points at a stored FileChange.
pub fn event_for(change: &FileChange) -> Event {
    let spec = &change.spec;
    let (type_, reason) = match spec.category {
        ChangeCategory::Added => (EventType::Warning, "FileAdded"),
        ChangeCategory::Modified => (EventType::Warning, "FileModified"),
        ChangeCategory::Removed => (EventType::Warning, "FileRemoved"),
        ChangeCategory::Summary => (EventType::Warning, "ChangeStorm"),
    };
    let note = match &spec.summary {
        Some(s) => format!(
            "{} changes under {} on node {} for policy {} in one minute ({} added, {} modified, {} removed); summarised",
            s.count, spec.path, spec.node, spec.policy, s.added, s.modified, s.removed
        ),
        None => {
            let attrs: Vec<&str> = spec.changed_attributes.iter().map(|a| a.as_str()).collect();
            let what = if attrs.is_empty() {
                String::new()
            } else {
                format!(" ({})", attrs.join(", "))
            };
            let by = spec
                .process
                .as_ref()
                .and_then(|p| p.by.as_deref())
                .map(|b| format!(" by {b}"))
                .unwrap_or_default();
            format!(
                "{} {}{}{by} on node {} (policy {}, entry {}, {:?})",
                spec.path,
                spec.category.as_str().to_lowercase(),
                what,
                spec.node,
                spec.policy,
                spec.entry,
                spec.source
            )
        }
    };
    let mut note = note;
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Detect".into(),
        secondary: None,
    }
}

/// Longest text of a report re-sent after a refusal.
const SHORT: usize = 512;

async fn publish(recorder: &Recorder, stored: &FileChange, metrics: &ClusterMetrics) {
    let reference = stored.object_ref(&());
    if let Err(error) = recorder.publish(&event_for(stored), &reference).await {
        metrics.api_errors.with_label_values(&["event"]).inc();
        debug!(%error, "event not published");
    }
}

/// Delivers the queue until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    api: Api<FileChange>,
    recorder: Recorder,
    node_ref: k8s_openapi::api::core::v1::ObjectReference,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    metrics: ClusterMetrics,
    limit: RateLimit,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut bucket = Bucket::new(limit);
    let mut failures = 0u32;
    let mut outage: Option<Instant> = None;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    loop {
        let batch = {
            let mut q = queue.lock().await;
            metrics.reports_queued.set(q.len() as i64);
            q.peek(32)
        };
        if batch.is_empty() {
            tokio::select! {
                () = &mut shutdown => return,
                () = wake.notified() => continue,
            }
        }
        for (seq, change) in batch {
            tokio::select! {
                () = &mut shutdown => return,
                () = bucket.take() => {},
            }
            let delivered = match api.create(&params, &change).await {
                Ok(stored) => {
                    publish(&recorder, &stored, &metrics).await;
                    metrics.delivered.inc();
                    true
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    debug!(name = %change.name_any(), "already stored");
                    true
                }
                Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                    // Too long or otherwise invalid: send it shortened, never drop it.
                    metrics.api_errors.with_label_values(&["rejected"]).inc();
                    warn!(name = %change.name_any(), path = %change.spec.path, error = %e.message, "the API server refused a change report; sending it shortened");
                    let short = shorten(&change, SHORT);
                    match api.create(&params, &short).await {
                        Ok(stored) => {
                            publish(&recorder, &stored, &metrics).await;
                            metrics.delivered.inc();
                            true
                        }
                        Err(kube::Error::Api(e)) if e.code == 409 => true,
                        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                            // Kept on the node (queue's rejected/) for the logs and forensics.
                            warn!(name = %change.name_any(), error = %e.message, "a shortened report was refused too; kept on the node");
                            let mut q = queue.lock().await;
                            q.reject(seq);
                            metrics.reports_queued.set(q.len() as i64);
                            continue;
                        }
                        Err(error) => {
                            debug!(%error, "shortened report not delivered yet");
                            false
                        }
                    }
                }
                Err(error) => {
                    metrics.api_errors.with_label_values(&["create"]).inc();
                    failures += 1;
                    outage.get_or_insert_with(Instant::now);
                    let wait = backoff(failures);
                    if failures == 1 || failures.is_multiple_of(10) {
                        warn!(%error, ?wait, failures, "cannot deliver changes; they stay queued");
                    }
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(wait) => {},
                    }
                    break;
                }
            };
            if delivered {
                if let Some(since) = outage.take() {
                    let waited = since.elapsed().as_secs();
                    let queued = queue.lock().await.len();
                    info!(
                        after_failures = failures,
                        waited, "delivering changes again"
                    );
                    let event = Event {
                        type_: EventType::Warning,
                        reason: "APIUnreachable".into(),
                        note: Some(format!(
                            "could not deliver changes for {waited}s ({failures} failed attempts); they were kept on the node and are being delivered ({queued} waiting)"
                        )),
                        action: "Deliver".into(),
                        secondary: None,
                    };
                    if let Err(error) = recorder.publish(&event, &node_ref).await {
                        debug!(%error, "event not published");
                    }
                }
                failures = 0;
                let mut q = queue.lock().await;
                if let Err(error) = q.ack(seq) {
                    warn!(%error, "could not remove a delivered report from the queue");
                }
                metrics.reports_queued.set(q.len() as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for f in 0..20 {
            let d = backoff(f);
            assert!(d <= Duration::from_secs(60));
            assert!(d >= Duration::from_millis(250));
        }
        assert!(backoff(10) >= Duration::from_secs(30));
    }

    #[test]
    fn events_name_the_writer_when_known() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        use kube_fim_crds::{DetectionSource, FileChangeSpec, ProcessInfo};
        let mut spec = FileChangeSpec {
            node: "n1".into(),
            policy: "p".into(),
            entry: "etc".into(),
            path: "/etc/sudoers".into(),
            category: ChangeCategory::Modified,
            changed_attributes: vec![],
            before: None,
            after: None,
            detected_time: MicroTime(k8s_openapi::jiff::Timestamp::now()),
            source: DetectionSource::Realtime,
            process: None,
            summary: None,
        };
        let plain = event_for(&super::super::object::to_object(spec.clone(), 0));
        assert_eq!(
            plain.note.as_deref(),
            Some("/etc/sudoers modified on node n1 (policy p, entry etc, Realtime)")
        );
        // Changes found by a scan carry no writer and so no "by".
        spec.process = Some(ProcessInfo {
            by: Some("sshd (pid 812, uid 0)".into()),
            pid: 812,
            ..ProcessInfo::default()
        });
        let by = event_for(&super::super::object::to_object(spec, 0));
        assert_eq!(
            by.note.as_deref(),
            Some(
                "/etc/sudoers modified by sshd (pid 812, uid 0) on node n1 (policy p, entry etc, Realtime)"
            )
        );
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
