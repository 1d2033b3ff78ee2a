//! `kube-fim-operator`: see the crate documentation of `kube_fim_operator`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use kube_fim_operator::config::Config;
use kube_fim_operator::export;
use kube_fim_operator::metrics::Metrics;
use kube_fim_operator::selfcheck::{self, CheckArgs};
use kube_fim_operator::server::{self, Health};
use kube_fim_operator::{context, controller};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

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
    // `check`: the chart's `helm test`, from this same image (selfcheck.rs).
    if std::env::args().nth(1).as_deref() == Some("check") {
        let args = CheckArgs::parse_from(std::env::args().skip(1));
        return match tokio::task::spawn_blocking(move || selfcheck::run(args)).await? {
            Ok(ok) => {
                println!("{ok}");
                Ok(())
            }
            Err(e) => bail!("{e}"),
        };
    }
    let config = Config::parse();
    init_tracing(&config.log_format);

    let identity = config.identity.clone().unwrap_or_else(|| {
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
    let addr = config.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = server::serve(addr, health).await {
            error!(%addr, error = %e, "metrics server failed");
            std::process::exit(2);
        }
    });

    let api_config = kube::Config::infer()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    // Watches and the lease: long-lived responses, guarded by the watcher's
    // own idle timeout.
    let client = kube::Client::try_from(api_config.clone()).context("building the API client")?;
    // Every other request (status writes, Events, deletions, lists) gets an
    // answer within REQUEST_TIMEOUT or fails and is retried: without a read
    // timeout one response that never comes stalls the loop waiting for it
    // (the chain verifier, retention, a policy's status) for good.
    let mut request_config = api_config;
    request_config.read_timeout = Some(REQUEST_TIMEOUT);
    request_config.reset_reader_on_write = true;
    let requests = kube::Client::try_from(request_config).context("building the API client")?;

    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&identity)
        .with_duration(config.lease_duration)
        .with_grace((config.lease_duration / 3).max(1))
        .with_field_manager(context::FIELD_MANAGER)
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leading, lease_task) = manager.watch().await;
    ready.store(true, Ordering::Relaxed);
    info!(%identity, lease = %config.lease_name, namespace = %config.namespace, "waiting to lead");

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
    let export = tokio::spawn(export::run(
        client.clone(),
        config.namespace.clone(),
        config.policy_selector.clone(),
    ));
    controller::run(
        client,
        requests,
        config,
        metrics.clone(),
        identity,
        shutdown,
    )
    .await;
    export::stop(Duration::from_secs(3)).await;
    export.abort();
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

/// How long the operator waits for the answer to one request (not a watch).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
