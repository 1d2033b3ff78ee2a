//! `kube-fim-operator`: see the crate documentation of `kube_fim_operator`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use kube_fim_crds::duration::parse_duration;
use kube_fim_operator::config::{AgentResources, Config};
use kube_fim_operator::controller;
use kube_fim_operator::metrics::Metrics;
use kube_fim_operator::server::{self, Health};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

/// The kube-fim operator: one agent DaemonSet for every FileIntegrityPolicy,
/// policy status and events, FileChange retention, metrics.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Namespace of the agent DaemonSet and of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-fim")]
    namespace: String,
    /// Name of this replica in the leader election.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Name of the agent DaemonSet.
    #[arg(long, default_value = "kube-fim-agent")]
    daemonset_name: String,
    /// Image of the node agent.
    #[arg(
        long,
        env = "KUBE_FIM_AGENT_IMAGE",
        default_value = "ghcr.io/kube-fim/kube-fim-agent:latest"
    )]
    agent_image: String,
    /// Pull policy of the agent image.
    #[arg(long, default_value = "IfNotPresent")]
    agent_image_pull_policy: String,
    /// ServiceAccount of the agents.
    #[arg(long, default_value = "kube-fim-agent")]
    agent_service_account: String,
    /// Host directory for the agents' baselines and queues.
    #[arg(long, default_value = "/var/lib/kube-fim")]
    agent_state_dir: String,
    /// Port of the agents' metrics and probes.
    #[arg(long, default_value_t = 9101)]
    agent_metrics_port: i32,
    /// Agent CPU request.
    #[arg(long, default_value = "50m")]
    agent_cpu_request: String,
    /// Agent memory request.
    #[arg(long, default_value = "64Mi")]
    agent_memory_request: String,
    /// Agent memory limit.
    #[arg(long, default_value = "256Mi")]
    agent_memory_limit: String,
    /// Agent CPU limit (none by default: hashing bursts should not be throttled).
    #[arg(long)]
    agent_cpu_limit: Option<String>,
    /// Serve only the policies matching this label selector (e.g. for a canary operator).
    #[arg(long)]
    policy_selector: Option<String>,
    /// An agent silent for this long counts as not reporting.
    #[arg(long, default_value = "3m")]
    heartbeat_timeout: String,
    /// Status refresh period without events.
    #[arg(long, default_value = "1m")]
    resync: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "kube-fim-operator")]
    lease_name: String,
    /// Lease duration in seconds: how long a dead leader blocks a takeover.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);

    let config = Config {
        namespace: args.namespace.clone(),
        daemonset_name: args.daemonset_name,
        agent_image: args.agent_image,
        agent_image_pull_policy: args.agent_image_pull_policy,
        agent_service_account: args.agent_service_account,
        agent_state_dir: args.agent_state_dir,
        agent_metrics_port: args.agent_metrics_port,
        agent_resources: AgentResources {
            cpu_request: args.agent_cpu_request,
            memory_request: args.agent_memory_request,
            cpu_limit: args.agent_cpu_limit,
            memory_limit: args.agent_memory_limit,
        },
        policy_selector: args.policy_selector,
        heartbeat_timeout: parse_duration(&args.heartbeat_timeout)
            .context("--heartbeat-timeout")?,
        resync: parse_duration(&args.resync).context("--resync")?,
        ..Config::default()
    };
    if args.lease_duration < 2 {
        bail!("--lease-duration must be at least 2 seconds");
    }
    let identity = args.identity.unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "kube-fim-operator".into()),
            std::process::id()
        )
    });

    let metrics = Metrics::new().context("registering metrics")?;
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let addr = args.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = server::serve(addr, health).await {
            error!(%addr, error = %e, "metrics server failed");
            std::process::exit(2);
        }
    });

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;

    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration)
        .with_grace((args.lease_duration / 3).max(1))
        .with_field_manager(controller::FIELD_MANAGER)
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leading, lease_task) = manager.watch().await;
    ready.store(true, Ordering::Relaxed);
    info!(%identity, lease = %args.lease_name, namespace = %args.namespace, "waiting to lead");

    tokio::select! {
        r = wait_for(&mut leading, true) => if r.is_err() { bail!("leader election stopped") },
        _ = tokio::signal::ctrl_c() => { info!("interrupted"); return Ok(()) },
        _ = sigterm() => { info!("terminated"); return Ok(()) },
    }
    info!(%identity, "leading");
    metrics.leader.set(1);

    let mut lost = leading.clone();
    let shutdown = async move {
        tokio::select! {
            _ = wait_for(&mut lost, false) => warn!("lost the leader lease"),
            _ = tokio::signal::ctrl_c() => info!("interrupted"),
            _ = sigterm() => info!("terminated"),
        }
    };
    controller::run(client, config, metrics.clone(), identity, shutdown).await;
    metrics.leader.set(0);

    if *leading.borrow() {
        // Orderly stop: hand the lease over at once instead of making the next
        // leader wait for it to expire.
        drop(leading);
        match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
            Ok(Ok(Ok(manager))) => {
                if let Err(e) = manager.release().await {
                    warn!(error = %e, "releasing the lease");
                }
            }
            _ => warn!("lease manager did not stop in time"),
        }
        Ok(())
    } else {
        bail!("lost leadership; exiting so that a restart rejoins the election as a standby")
    }
}

async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<bool>,
    want: bool,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    rx.wait_for(|v| *v == want).await.map(|_| ())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
