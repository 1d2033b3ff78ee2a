//! Delivery of queued changes to the API server: each report becomes a
//! FileChange object, counted in an Event series ([`super::series`]), and
//! leaves the queue only when stored.
//!
//! Creates are paced by a token bucket and failures back off exponentially with
//! jitter, so a thousand agents coming back after an API outage do not hit the
//! API server in lockstep. Names are deterministic, so a retry of a create whose
//! answer was lost meets AlreadyExists: delivered exactly once.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube_fim_crds::FileChange;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::object::shorten;
use super::queue::Queue;
use super::series::ChangeEvents;
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

/// Longest text of a report re-sent after a refusal.
const SHORT: usize = 512;

/// Delivers the queue until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    api: Api<FileChange>,
    recorder: Recorder,
    mut events: ChangeEvents,
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
        let flush_at = events.flush(false).await;
        if batch.is_empty() {
            let flush = async {
                match flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => {
                    events.flush(true).await;
                    return;
                }
                () = wake.notified() => continue,
                () = flush => continue,
            }
        }
        for (seq, change) in batch {
            tokio::select! {
                () = &mut shutdown => return,
                () = bucket.take() => {},
            }
            let delivered = match api.create(&params, &change).await {
                Ok(stored) => {
                    events.record(&stored).await;
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
                            events.record(&stored).await;
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
