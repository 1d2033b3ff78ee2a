//! Step 3 of the protocol ([`super`]): the reporter caps storms and queues
//! every change durably, then answers the monitoring loop.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::FileChangeSpec;
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::warn;

use super::queue::Queue;
use super::storm::{StormGuard, Verdict};
use super::{Batch, Detected, deliver, object};
use crate::context::Context;
use crate::telemetry::Telemetry;

/// Step 3: caps storms and queues every change durably, then answers.
pub async fn run(
    ctx: Arc<Context>,
    mut batches: mpsc::Receiver<Batch>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let (queue, telemetry) = (&ctx.queue, &ctx.telemetry);
    // A resolved future must not be polled again: after shutdown, the
    // reporter goes on until the monitor has handed over its last batch.
    let mut stopping = false;
    let mut storms = StormGuard::default();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let summaries = |specs: Vec<FileChangeSpec>| {
            specs
                .into_iter()
                .map(|spec| Detected { spec, epoch: 0 })
                .collect::<Vec<_>>()
        };
        let (changes, done): (Vec<Detected>, Option<oneshot::Sender<()>>) = tokio::select! {
            () = &mut shutdown, if !stopping => {
                stopping = true;
                (summaries(storms.drain(Timestamp::now())), None)
            }
            b = batches.recv() => match b {
                Some((c, d)) => (c, Some(d)),
                None => (summaries(storms.drain(Timestamp::now())), None),
            },
            _ = tick.tick() => (summaries(storms.due(Timestamp::now())), None),
        };
        let finishing = done.is_none() && batches.is_closed();
        let now = Timestamp::now();
        // One look at the served policies per batch, not per change (storms).
        let served = ctx.served.borrow().clone();
        for Detected {
            spec: change,
            epoch,
        } in changes
        {
            let cap = served
                .get(&change.policy)
                .map(|p| p.spec.max_changes_per_node_per_minute)
                .unwrap_or(100);
            let room = queue.lock().await.has_room();
            let verdict = if change.summary.is_some() {
                Verdict::Report
            } else if !room {
                // Never drop: a full queue folds into the summary.
                storms.admit(&change, 0, now)
            } else {
                storms.admit(&change, cap, now)
            };
            match verdict {
                Verdict::Folded { first_in_window } => {
                    if first_in_window {
                        telemetry.change_storm_started(&change.policy);
                        warn!(policy = %change.policy, cap, "change storm: summarising this minute's further changes");
                    }
                }
                Verdict::Report => {
                    // No owner reference: evidence is not garbage-collected
                    // with its policy (see the policy's `evidence` field).
                    let object = object::to_object(change, epoch);
                    push_durably(queue, &object, telemetry).await;
                }
            }
        }
        telemetry.reports_queued(queue.lock().await.len());
        ctx.queued.notify_one();
        if let Some(done) = done {
            let _ = done.send(());
        }
        if finishing {
            return;
        }
    }
}

/// Writes one report to the queue, retrying until the disk takes it.
async fn push_durably(
    queue: &Mutex<Queue>,
    object: &kube_fim_crds::FileChange,
    telemetry: &Telemetry,
) {
    let mut failures = 0u32;
    loop {
        let result = queue.lock().await.push(object);
        match result {
            Ok(_) => {
                telemetry.queue_written();
                return;
            }
            Err(error) => {
                failures += 1;
                telemetry.queue_write_failed();
                let wait = deliver::backoff(failures.min(4));
                if failures == 1 || failures.is_multiple_of(20) {
                    warn!(%error, failures, "cannot write a change to the delivery queue; detection waits until it can");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fixtures::{self, EVENTS, FILECHANGES};
    use crate::report::deliver::RateLimit;
    use crate::report::hand_over;
    use http::Method;

    #[tokio::test(start_paused = true)]
    async fn a_handed_over_change_is_queued_then_created_once() {
        let mut a = fixtures::agent();
        let mut policy = kube_fim_crds::FileIntegrityPolicy::new(
            "p",
            kube_fim_crds::FileIntegrityPolicySpec::with_paths(vec![]),
        );
        policy.metadata.uid = Some("uid-p".into());
        a.served
            .send(crate::served::ServedPolicies::new([Arc::new(policy)]))
            .unwrap();
        let (batches, batch_rx) = mpsc::channel(4);
        let (stop, shutdown) = fixtures::shutdown();
        let reporter = tokio::spawn(run(a.ctx.clone(), batch_rx, shutdown.clone()));
        let limit = RateLimit {
            qps: 10.0,
            burst: 10,
        };
        let deliverer = tokio::spawn(deliver::run(a.ctx.clone(), limit, shutdown));

        let change = Detected {
            spec: fixtures::change("/etc/passwd"),
            epoch: 0,
        };
        // Answered only once the change is on disk.
        assert!(hand_over(&batches, vec![change.clone()]).await);
        assert_eq!(a.ctx.queue.lock().await.len(), 1);
        let created = a.api.expect(Method::POST, FILECHANGES).await;
        assert_eq!(
            created.body["metadata"]["name"],
            object::object_name(&change.spec, 0).as_str()
        );
        assert_eq!(created.body["spec"]["path"], "/etc/passwd");
        created.created();
        // The change's Event points at its served policy.
        let event = a.api.expect(Method::POST, EVENTS).await;
        assert_eq!(event.body["regarding"]["uid"], "uid-p");
        event.created();

        let later = a.api.quiet(Duration::from_secs(120)).await;
        assert!(
            !later.iter().any(|(_, path)| path == FILECHANGES),
            "created again: {later:?}"
        );
        assert_eq!(a.ctx.queue.lock().await.len(), 0);
        stop.send(true).unwrap();
        drop(batches);
        let (r, d, _) = tokio::join!(reporter, deliverer, a.api.quiet(Duration::from_secs(10)));
        r.unwrap();
        d.unwrap();
    }
}
