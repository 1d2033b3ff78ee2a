//! `kube-fim-agent run`: the agent of one node in a cluster.
//!
//! Tasks: the policy watch decides what the node serves ([`super::policies`]);
//! the monitoring loop detects changes ([`crate::monitor`]); the reporter
//! queues each change on disk, the deliverer stores them as FileChanges and
//! Events, each policy entry paced at its policy's cap ([`crate::report`]);
//! the heartbeat writes the node's FileIntegrityNode ([`super::heartbeat`]);
//! the approvals watch answers the approvals of the node's changes
//! ([`super::approvals`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::lifecycle::{Lifecycle, Stop};
use super::{approvals, heartbeat, policies, startup};
use crate::attribution::pods::PodIndex;
use crate::containers;
use crate::monitor::{self, Snapshot};
use crate::report::deliver::{self, RateLimit};
use crate::report::reporter;
use crate::served::ServedPolicies;

/// Settings of `kube-fim-agent run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub node: String,
    pub root: PathBuf,
    pub state: PathBuf,
    pub metrics_addr: SocketAddr,
    pub policy_selector: Option<String>,
    pub qps: f64,
    pub burst: u32,
    pub queue_capacity: usize,
    /// Where the host's mount table is read, if not from the host root's procfs.
    pub mount_table: Option<crate::mounts::MountSource>,
    /// Where `root` is on the host (`/` when it is the host's `/`).
    pub host_root_path: PathBuf,
    /// The node's CRI socket, asked for the running containers (container drift).
    pub cri_socket: Option<PathBuf>,
    /// Fingerprints besides BLAKE3 that changed files get (a sink asks).
    pub fingerprints: Vec<kube_fim_crds::Fingerprint>,
}

/// Runs the agent until `shutdown`.
pub async fn run(
    client: (Client, Client),
    config: RunConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut tasks = Lifecycle::new(shutdown);
    let (served_tx, served_rx) = watch::channel(ServedPolicies::default());
    let started = startup::start(client, &config, served_rx).await?;
    let ctx = started.ctx;
    let (control_tx, control_rx) = mpsc::channel(16);
    let (batch_tx, batch_rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(Snapshot::default());

    let decisions = policies::Channels {
        control: control_tx.clone(),
        served: served_tx,
    };
    let selector = config.policy_selector.clone();
    let policy_watch = policies::run(ctx.clone(), selector, decisions, tasks.shutdown());
    tasks.spawn("policy watch", Stop::Abort, policy_watch);

    // The pods of this node, to name the pod behind a change (process attribution).
    let pods = PodIndex::default();
    tasks.spawn_helper(pods.clone().follow(ctx.watches.clone(), ctx.node.clone()));
    // Container drift: numbered and queued by the monitoring loop.
    let (drift_tx, drift_rx) = mpsc::channel(4);
    let (drift_approvals_tx, drift_approvals_rx) = mpsc::channel(16);
    match crate::hostfs::HostRoot::open(&config.root) {
        Ok(root) => {
            let settings = containers::Settings {
                node: ctx.node.clone(),
                root,
                host_root: config.host_root_path.clone(),
                state: config.state.clone(),
                cri: config.cri_socket.clone(),
                telemetry: Some(ctx.telemetry.clone()),
            };
            let drift = containers::run(
                ctx.watches.clone(),
                settings,
                ctx.served.clone(),
                drift_tx,
                drift_approvals_rx,
            );
            tasks.spawn_helper(drift);
        }
        Err(error) => warn!(%error, "container drift off: the host root cannot be opened"),
    }
    let loop_ends = monitor::Channels {
        control: control_rx,
        out: batch_tx,
        status: status_tx,
        drift: Some(drift_rx),
    };
    let settings = monitor::Settings {
        wait_for_policies: true,
        pods: Some(pods),
    };
    let telemetry = ctx.telemetry.clone();
    let monitor = monitor::run(
        started.engine,
        telemetry,
        loop_ends,
        settings,
        tasks.shutdown(),
    );
    tasks.spawn("monitor", Stop::Drain(Duration::from_secs(10)), monitor);

    let reporter = reporter::run(ctx.clone(), batch_rx, tasks.shutdown());
    tasks.spawn("reporter", Stop::Drain(Duration::from_secs(5)), reporter);
    let limit = RateLimit {
        qps: config.qps,
        burst: config.burst,
    };
    let deliverer = deliver::run(ctx.clone(), limit, tasks.shutdown());
    tasks.spawn("deliverer", Stop::Abort, deliverer);

    let settings = heartbeat::Settings {
        alarm: started.alarm,
        alarm_found: started.alarm_found,
        published_sequence: started.published_sequence,
    };
    let heartbeat = heartbeat::run(ctx.clone(), settings, status_rx, tasks.shutdown());
    tasks.spawn("heartbeat", Stop::Abort, heartbeat);
    // Approvals wait for the first policy decision (see approvals::run).
    let approvals = approvals::run(
        ctx.clone(),
        control_tx,
        drift_approvals_tx,
        tasks.shutdown(),
    );
    tasks.spawn("acknowledgements", Stop::Abort, approvals);

    info!(node = %ctx.node, root = %config.root.display(), "agent running");
    tasks.run().await;
    Ok(())
}
