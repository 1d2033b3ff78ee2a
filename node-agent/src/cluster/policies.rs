//! The served policies: watches the policies and this node, and decides
//! ([`super::selection`]) what the node serves each time either changes.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube_fim_crds::FileIntegrityPolicy;
use tokio::sync::{mpsc, watch};

use super::selection::served;
use crate::context::Context;
use crate::monitor::Control;
use crate::served::ServedPolicies;

/// Where the decisions go.
pub struct Channels {
    /// To the monitoring loop, first.
    pub control: mpsc::Sender<Control>,
    /// To those who wait for the monitor (the node status, the approvals).
    pub served: watch::Sender<ServedPolicies>,
}

/// Decides what this node serves until `shutdown` (or the monitor is gone);
/// `selector` limits the policies watched by label.
pub async fn run(
    ctx: Arc<Context>,
    selector: Option<String>,
    out: Channels,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (policies, policy_writer) = reflector::store::<FileIntegrityPolicy>();
    let mut wc = watcher::Config::default();
    if let Some(sel) = &selector {
        wc = wc.labels(sel);
    }
    let policy_events = watcher(Api::<FileIntegrityPolicy>::all(ctx.watches.clone()), wc)
        .default_backoff()
        .reflect(policy_writer)
        .map(|_| ());
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_events = watcher(
        Api::<Node>::all(ctx.watches.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", ctx.node)),
    )
    .default_backoff()
    .reflect(node_writer)
    .map(|_| ());
    // Every watch event, the initial listing's end included (so an empty
    // cluster is known to be empty).
    let mut events = std::pin::pin!(futures::stream::select(policy_events, node_events));
    tokio::pin!(shutdown);
    let mut last: Option<ServedPolicies> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            event = events.next() => if event.is_none() { return },
        }
        // Both caches must hold a complete listing before deciding.
        if policies.wait_until_ready().now_or_never().is_none()
            || nodes.wait_until_ready().now_or_never().is_none()
        {
            continue;
        }
        let Some(node) = nodes.get(&ObjectRef::new(&ctx.node)) else {
            continue;
        };
        let now = served(&node, &policies.state());
        if last.as_ref() == Some(&now) {
            continue;
        }
        // The monitor first, then those who wait for it: an approval sent
        // after this announcement queues behind the policies on the same
        // channel, so the monitor never judges it before it knows what it
        // serves.
        if out
            .control
            .send(Control::Policies(now.clone()))
            .await
            .is_err()
        {
            return;
        }
        let _ = out.served.send(now.clone());
        last = Some(now);
    }
}
