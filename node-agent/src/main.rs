//! `kube-fim-agent`: file integrity monitoring of one node.
//!
//! Standalone (`baseline`, `check`, `watch`) with a policy file, or in a cluster
//! (`run`) serving the FileIntegrityPolicies that select its node.

/// The scan's records are made on its threads and freed on the one that
/// judges them: glibc's allocator serializes such frees on the arena lock of
/// the thread that made them (most of the judging thread's waits), mimalloc
/// frees them without a lock.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use kube::ResourceExt;
use kube_fim_agent::baseline::StateDir;
use kube_fim_agent::cluster::run::{RunConfig, run};
use kube_fim_agent::engine::{Engine, PolicyInput};
use kube_fim_agent::monitor::{self, Channels, Control, Settings, Snapshot};
use kube_fim_agent::mounts::MountSource;
use kube_fim_agent::telemetry::Telemetry;
use kube_fim_crds::validate::policy_from_yaml;
use kube_fim_crds::{DetectionSource, FileChangeSpec};
use tokio::sync::{mpsc, watch};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "kube-fim node agent: file integrity monitoring of a host's files"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Threads a scan runs on, all of it (hashing, judging, writing the
    /// baseline), at low CPU and I/O priority (default: what
    /// the container's cgroup CPU quota allows, else every core).
    #[arg(long, global = true, env = "KUBE_FIM_THREADS")]
    threads: Option<NonZeroUsize>,
    /// CPU priority of the scan threads: `nice` (nice 19, the default) or
    /// `idle` (SCHED_IDLE too: only what everything else leaves idle, and
    /// much slower on a busy host). Both at the lowest best-effort I/O
    /// priority. Against other pods, the agent pod's CPU request decides.
    #[arg(long, global = true, env = "KUBE_FIM_SCAN_PRIORITY", value_enum)]
    scan_priority: Option<kube_fim_agent::budget::ScanPriority>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct Standalone {
    /// A FileIntegrityPolicy YAML file (what you would `kubectl apply`).
    #[arg(long)]
    policy: PathBuf,
    /// Directory standing for the host's `/` (`/host` in a pod). Every path is
    /// resolved inside it; symlinks never lead out of it.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Directory for the baseline.
    #[arg(long)]
    state: PathBuf,
    /// Node name written into changes.
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    node_name: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the baseline of the policy's files (replacing any previous one) and
    /// print a one-line summary.
    Baseline(Standalone),
    /// Compare the host with the baseline and print the changes. Exit status:
    /// 0 no change, 1 changes, 2 trouble (like diff).
    Check {
        #[command(flatten)]
        args: Standalone,
        /// Output format: text, or one JSON object per line.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Watch in real time and print each change as it is detected (the baseline
    /// is built first if there is none); serve Prometheus metrics.
    Watch {
        #[command(flatten)]
        args: Standalone,
        /// Output format: text, or one JSON object per line.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "127.0.0.1:9101")]
        metrics_addr: SocketAddr,
    },
    /// Serve the cluster's FileIntegrityPolicies that select this node and report
    /// changes as FileChange objects and Events (what the DaemonSet runs).
    Run {
        /// This node's name (from the downward API in a pod).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Directory standing for the host's `/`.
        #[arg(long, default_value = "/host")]
        root: PathBuf,
        /// Directory for the baseline and the delivery queue (a hostPath).
        #[arg(long, default_value = "/var/lib/kube-fim")]
        state: PathBuf,
        /// Kubeconfig file (default: in-cluster config, or $KUBECONFIG).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:9101")]
        metrics_addr: SocketAddr,
        /// Serve only the policies matching this label selector.
        #[arg(long)]
        policy_selector: Option<String>,
        /// Sustained FileChange creations per second (client-side limit).
        #[arg(long, default_value_t = 10.0)]
        qps: f64,
        /// Creations allowed in a burst.
        #[arg(long, default_value_t = 50)]
        burst: u32,
        /// Changes waiting on the node for the API server past which the agent
        /// warns; none is ever refused, summarised or dropped.
        #[arg(long, default_value_t = 100_000)]
        queue_capacity: usize,
        /// The host's mount table (default: `<root>/proc/1/mountinfo`, the
        /// host's own procfs inside the host root).
        #[arg(long)]
        mount_table: Option<PathBuf>,
        /// Where the host's `/` is in --mount-table's paths (another mount
        /// namespace's table, in which the host root is a directory).
        #[arg(long, default_value = "/", requires = "mount_table")]
        mount_table_root: PathBuf,
        /// Where --root is on the host (the host path mounted there): container
        /// layers are host paths, read inside --root.
        #[arg(long, default_value = "/")]
        host_root_path: PathBuf,
        /// The node's CRI socket (containerd, CRI-O, k3s), a path in the
        /// agent's file system: container drift asks the runtime for the
        /// running containers. Without it (or while it does not answer) they
        /// come from the pods' status.
        #[arg(long)]
        cri_socket: Option<PathBuf>,
        /// Fingerprints a changed file's new content gets besides BLAKE3,
        /// comma-separated (`sha256`): the operator sets it when a
        /// FileChangeSink asks. Scans are not affected.
        #[arg(long, value_delimiter = ',')]
        fingerprints: Vec<FingerprintArg>,
    },
}

/// A fingerprint of `--fingerprints`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FingerprintArg {
    Sha256,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn load_policy(path: &Path) -> anyhow::Result<BTreeMap<String, PolicyInput>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy file {}", path.display()))?;
    let policy =
        policy_from_yaml(&text).with_context(|| format!("policy file {}", path.display()))?;
    Ok(BTreeMap::from([(
        policy.name_any(),
        PolicyInput {
            generation: policy.metadata.generation,
            spec: policy.spec,
        },
    )]))
}

fn print_change(c: &FileChangeSpec, output: Output) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string(c)?)?,
        Output::Text => {
            let attrs: Vec<&str> = c.changed_attributes.iter().map(|a| a.as_str()).collect();
            writeln!(
                out,
                "{:<8} {} [{}] policy={} entry={} source={:?}",
                c.category.as_str(),
                c.path,
                attrs.join(","),
                c.policy,
                c.entry,
                c.source
            )?;
        }
    }
    Ok(())
}

fn open_engine(args: &Standalone) -> anyhow::Result<Engine> {
    if !args.root.is_dir() {
        bail!("--root {}: not a directory", args.root.display());
    }
    Engine::open(&args.root, &args.state, &args.node_name)
        .context("opening the host root and state")
}

fn baseline(args: Standalone) -> anyhow::Result<ExitCode> {
    let policies = load_policy(&args.policy)?;
    StateDir::create(&args.state).with_context(|| format!("creating {}", args.state.display()))?;
    // The old baseline stays on disk until the new one replaces it atomically.
    if !args.root.is_dir() {
        bail!("--root {}: not a directory", args.root.display());
    }
    if args.state.join(kube_fim_agent::baseline::FILE).exists() {
        // Nothing on the node vouches for a baseline: an agent in a cluster
        // checks it against the entry digests its node published.
        eprintln!(
            "replacing the baseline in {}: if an agent in a cluster serves it, entries that differ from what its node published are a BaselineTampered alarm",
            args.state.display()
        );
    }
    let mut engine = Engine::open_fresh(&args.root, &args.state, &args.node_name)
        .context("opening the host root")?;
    engine.set_policies(policies)?;
    if std::io::stderr().is_terminal() {
        eprint!("building the baseline of {} ...\r", args.root.display());
    }
    let started = Instant::now();
    let outcome = engine.scan(DetectionSource::Scan);
    engine.save()?;
    for e in outcome.errors.iter().take(50) {
        eprintln!("skipped {}: {}", e.path, e.reason);
    }
    println!(
        "baseline: {} files, {} bytes hashed, {:.2} s, {} skipped",
        outcome.files,
        outcome.bytes,
        started.elapsed().as_secs_f64(),
        outcome.errors.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn check(args: Standalone, output: Output) -> anyhow::Result<ExitCode> {
    let policies = load_policy(&args.policy)?;
    let mut engine = open_engine(&args)?;
    if !engine.had_baseline() {
        bail!(
            "no baseline in {}: run `kube-fim-agent baseline` first",
            args.state.display()
        );
    }
    engine.set_policies(policies)?;
    engine.check_only();
    let outcome = engine.scan(DetectionSource::Scan);
    for e in &outcome.errors {
        eprintln!("skipped {}: {}", e.path, e.reason);
    }
    for c in &outcome.changes {
        print_change(c, output)?;
    }
    // The baseline is not updated: a check reports, it does not approve.
    Ok(if outcome.changes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn watch_cmd(args: Standalone, output: Output, addr: SocketAddr) -> anyhow::Result<ExitCode> {
    let policies = load_policy(&args.policy)?;
    StateDir::create(&args.state)?;
    let mut engine = open_engine(&args)?;
    engine.set_policies(policies)?;
    let telemetry = Telemetry::new(&args.node_name)?;
    let server = telemetry.clone();
    tokio::spawn(async move {
        if let Err(e) = server.serve(addr).await {
            tracing::error!(%addr, error = %e, "metrics server");
        }
    });
    let (_control_tx, control_rx) = mpsc::channel::<Control>(8);
    let (batch_tx, mut batch_rx) = mpsc::channel::<kube_fim_agent::report::Batch>(64);
    let (status_tx, _status_rx) = watch::channel(Snapshot::default());
    let printer = tokio::spawn(async move {
        while let Some((changes, done)) = batch_rx.recv().await {
            for c in &changes {
                if let Err(e) = print_change(&c.spec, output) {
                    tracing::warn!(error = %e, "printing");
                }
            }
            let _ = done.send(());
        }
    });
    let channels = Channels {
        control: control_rx,
        out: batch_tx,
        status: status_tx,
        drift: None,
    };
    monitor::run(
        engine,
        telemetry,
        channels,
        Settings::default(),
        shutdown_signal(),
    )
    .await;
    printer.abort();
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

/// The agent's API clients: (requests, which time out; watches).
async fn clients(kubeconfig: Option<PathBuf>) -> anyhow::Result<(kube::Client, kube::Client)> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .context("kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    kube_fim_agent::context::clients(config).context("building the API clients")
}

async fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Baseline(args) => tokio::task::block_in_place(|| baseline(args)),
        Command::Check { args, output } => tokio::task::block_in_place(|| check(args, output)),
        Command::Watch {
            args,
            output,
            metrics_addr,
        } => watch_cmd(args, output, metrics_addr).await,
        Command::Run {
            node_name,
            root,
            state,
            kubeconfig,
            metrics_addr,
            policy_selector,
            qps,
            burst,
            queue_capacity,
            mount_table,
            mount_table_root,
            host_root_path,
            cri_socket,
            fingerprints,
        } => {
            if node_name.is_empty() {
                bail!("--node-name (or NODE_NAME from the downward API) is required");
            }
            if !root.is_dir() {
                bail!("--root {}: not a directory", root.display());
            }
            StateDir::create(&state).with_context(|| format!("creating {}", state.display()))?;
            let clients = clients(kubeconfig).await?;
            run(
                clients,
                RunConfig {
                    node: node_name,
                    root,
                    state,
                    metrics_addr,
                    policy_selector,
                    qps,
                    burst,
                    queue_capacity,
                    mount_table: mount_table.map(|table| MountSource {
                        table,
                        root: mount_table_root,
                    }),
                    host_root_path,
                    cri_socket,
                    fingerprints: fingerprints
                        .into_iter()
                        .map(|FingerprintArg::Sha256| kube_fim_crds::Fingerprint::Sha256)
                        .collect(),
                },
                shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    kube_fim_agent::budget::tune_allocator();
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let threads = kube_fim_agent::budget::configure(cli.threads.map(NonZeroUsize::get));
    let priority = kube_fim_agent::budget::configure_priority(cli.scan_priority);
    tracing::debug!(threads, ?priority, "scan threads");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kube-fim-agent: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match runtime.block_on(real_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kube-fim-agent: {e:#}");
            ExitCode::from(2)
        }
    };
    // A scan blocked in the kernel (a hung network filesystem under the host
    // root) must not keep the agent from exiting when it is told to stop.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}
