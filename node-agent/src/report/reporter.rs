//! Step 3 of the protocol ([`super`]): the reporter queues every change
//! durably, then answers the monitoring loop. It folds and drops nothing:
//! a storm is paced at delivery ([`super::storm`]), every change keeps its
//! own report.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc};
use tracing::warn;

use super::queue::Queue;
use super::{Batch, Detected, deliver, object};
use crate::context::Context;
use crate::telemetry::Telemetry;

/// Step 3: queues every change durably, then answers.
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
    let mut over_capacity = false;
    loop {
        let (changes, done) = tokio::select! {
            () = &mut shutdown, if !stopping => {
                stopping = true;
                continue;
            }
            b = batches.recv() => match b {
                Some(batch) => batch,
                None => return,
            },
        };
        let changes = with_fingerprints(&ctx, changes).await;
        for Detected { spec, epoch } in changes {
            // No owner reference: evidence is not garbage-collected with its
            // policy (see the policy's `evidence` field).
            let object = object::to_object(spec, epoch);
            push_durably(queue, &object, telemetry).await;
        }
        let (len, room) = {
            let q = queue.lock().await;
            (q.len(), q.has_room())
        };
        if !room && !over_capacity {
            warn!(
                queued = len,
                "the delivery queue is past its capacity; changes are still queued on the node's disk, none is dropped"
            );
        }
        over_capacity = !room;
        telemetry.reports_queued(len);
        ctx.queued.notify_one();
        let _ = done.send(());
    }
}

/// The changes with their SHA-256 fingerprints when a sink asked for them
/// ([`super::fingerprint`]), read off the runtime's threads. Should the
/// reading fail as a task, the changes go on without (a change is never held
/// back by its fingerprint).
async fn with_fingerprints(ctx: &Context, changes: Vec<Detected>) -> Vec<Detected> {
    let Some(fingerprints) = ctx.fingerprints.clone() else {
        return changes;
    };
    let original = changes.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut changes = changes;
        for d in &mut changes {
            fingerprints.add(&mut d.spec);
        }
        changes
    })
    .await;
    match done {
        Ok(changes) => changes,
        Err(error) => {
            warn!(%error, "SHA-256 fingerprints not computed for a batch of changes");
            original
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
    use std::time::Duration;

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
