//! `make scale`: kube-fim on one API server with many nodes, measured.
//!
//! SCALE_NODES (default 100) simulated nodes, each a real `kube-fim-agent run`
//! process with its own small host root and its own token bound to its Node
//! object; a stand-in kubelet renews each node's Lease every 10 s and posts it
//! Ready, as a kubelet does; the real operator. It prints:
//! - the time from `kubectl apply` of a policy to Ready on every node;
//! - a change storm (SCALE_STORM changes, default 5,000, over 10 nodes): the
//!   FileChanges and Summaries created, that no change is lost, and the
//!   write→FileChange latency of the nodes outside the storm;
//! - the API server's request rate and latency by verb and resource (its own
//!   /metrics) and the etcd object counts during the storm;
//! - the operator's reconcile latency and status freshness;
//! - API writes per reported change.
//!
//! Not part of `make test` (minutes, and most of a small machine).
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_fim_crds::labels::{POLICY, label_value};
use kube_fim_crds::{ChangeCategory, FileChange, FileIntegrityPolicy};
use kube_fim_e2e::operator::{Operator, SUITE_LABEL};
use kube_fim_e2e::{
    Entry, Policy, Process, binary, client, ensure_crds, ensure_rbac, free_port, kubeconfig,
    kubectl, kubectl_stdin, unique_name,
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

/// A kubeconfig logging in with `token`.
fn token_kubeconfig(dir: &Path, name: &str, token: &str) -> PathBuf {
    let admin: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster["server"].as_str().unwrap(),
            "certificate-authority-data": cluster["certificate-authority-data"].as_str().unwrap(),
        }}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": name}}],
        "current-context": "local",
    });
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_saphyr::to_string(&config).unwrap()).unwrap();
    path
}

/// The stand-in kubelets: Ready at once and every 5 minutes (a kubelet's
/// status report period without change), Lease renewed every 10 s, spread
/// evenly over the period.
async fn kubelets(client: Client, nodes: Vec<(String, String)>) {
    let node_api: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let gap = Duration::from_secs(10) / nodes.len().max(1) as u32;
    let mut round = 0u64;
    loop {
        for (name, uid) in &nodes {
            let now = Timestamp::now();
            if round.is_multiple_of(30) {
                let status = serde_json::json!({"status": {"conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kube-fim scale kubelet is posting ready status",
                    "lastHeartbeatTime": Time(now), "lastTransitionTime": Time(now),
                }]}});
                let _ = node_api
                    .patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
                    .await;
            }
            let renew =
                serde_json::json!({"spec": {"renewTime": MicroTime(now), "holderIdentity": name}});
            if round == 0 {
                let mut lease = Lease::default();
                lease.metadata.name = Some(name.clone());
                lease.metadata.owner_references = Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: name.clone(),
                    uid: uid.clone(),
                    ..OwnerReference::default()
                }]);
                lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(name.clone()),
                    lease_duration_seconds: Some(40),
                    renew_time: Some(MicroTime(now)),
                    ..Default::default()
                });
                let _ = leases.create(&PostParams::default(), &lease).await;
            } else {
                let _ = leases
                    .patch(name, &PatchParams::default(), &Patch::Merge(&renew))
                    .await;
            }
            tokio::time::sleep(gap).await;
        }
        round += 1;
    }
}

/// Prometheus text: series name with sorted labels → value.
fn parse_metrics(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let mut labels = BTreeMap::new();
                    for pair in rest.trim_end_matches('}').split("\",") {
                        if let Some((k, v)) = pair.split_once("=\"") {
                            labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                        }
                    }
                    (n.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            Some((name, labels, value))
        })
        .collect()
}

fn apiserver_metrics() -> Vec<(String, BTreeMap<String, String>, f64)> {
    let run = kubectl(["get", "--raw", "/metrics"]);
    assert!(run.success, "apiserver /metrics: {}", run.stderr);
    parse_metrics(&run.stdout)
}

/// `verb resource[/subresource]` of an apiserver request series.
fn request_key(l: &BTreeMap<String, String>) -> String {
    let resource = l.get("resource").cloned().unwrap_or_default();
    let sub = l.get("subresource").cloned().unwrap_or_default();
    let verb = l.get("verb").cloned().unwrap_or_default();
    if sub.is_empty() {
        format!("{verb} {resource}")
    } else {
        format!("{verb} {resource}/{sub}")
    }
}

/// Requests and latency buckets per `verb resource`, summed over other labels.
#[derive(Default)]
struct Requests {
    count: BTreeMap<String, f64>,
    buckets: BTreeMap<String, BTreeMap<u64, f64>>,
}

fn requests(m: &[(String, BTreeMap<String, String>, f64)]) -> Requests {
    let mut r = Requests::default();
    for (name, labels, value) in m {
        if name == "apiserver_request_total" {
            *r.count.entry(request_key(labels)).or_default() += value;
        } else if name == "apiserver_request_duration_seconds_bucket" {
            let le = labels.get("le").map(String::as_str).unwrap_or("+Inf");
            let le = if le == "+Inf" {
                u64::MAX
            } else {
                (le.parse::<f64>().unwrap_or(f64::MAX) * 1e6) as u64
            };
            *r.buckets
                .entry(request_key(labels))
                .or_default()
                .entry(le)
                .or_default() += value;
        }
    }
    r
}

/// The `q` quantile (upper bucket bound, seconds) of a cumulative histogram delta.
fn quantile(before: Option<&BTreeMap<u64, f64>>, after: &BTreeMap<u64, f64>, q: f64) -> f64 {
    let delta: Vec<(u64, f64)> = after
        .iter()
        .map(|(le, v)| {
            (
                *le,
                v - before.and_then(|b| b.get(le)).copied().unwrap_or(0.0),
            )
        })
        .collect();
    let total = delta.last().map(|(_, v)| *v).unwrap_or(0.0);
    if total <= 0.0 {
        return 0.0;
    }
    delta
        .iter()
        .find(|(_, v)| *v >= q * total)
        .map(|(le, _)| {
            if *le == u64::MAX {
                f64::INFINITY
            } else {
                *le as f64 / 1e6
            }
        })
        .unwrap_or(f64::INFINITY)
}

fn histogram(m: &[(String, BTreeMap<String, String>, f64)], name: &str) -> BTreeMap<u64, f64> {
    let bucket = format!("{name}_bucket");
    m.iter()
        .filter(|(n, _, _)| *n == bucket)
        .map(|(_, l, v)| {
            let le = l.get("le").map(String::as_str).unwrap_or("+Inf");
            let le = if le == "+Inf" {
                u64::MAX
            } else {
                (le.parse::<f64>().unwrap_or(f64::MAX) * 1e6) as u64
            };
            (le, *v)
        })
        .collect()
}

/// etcd objects per resource, as the API server counts them.
fn object_counts(m: &[(String, BTreeMap<String, String>, f64)]) -> BTreeMap<String, f64> {
    m.iter()
        .filter(|(n, _, _)| n == "apiserver_storage_objects" || n == "apiserver_resource_objects")
        .filter_map(|(_, l, v)| {
            let r = l.get("resource")?;
            let key = match l.get("group") {
                Some(g) if !g.is_empty() && !r.contains('.') => format!("{r}.{g}"),
                _ => r.clone(),
            };
            Some((key, *v))
        })
        .collect()
}

/// Objects stored per kind, counted by the API server (a one-item list and its
/// remaining count).
async fn stored_objects(client: &Client) -> BTreeMap<String, f64> {
    async fn count<K>(api: Api<K>) -> f64
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(list) => {
                list.items.len() as f64 + list.metadata.remaining_item_count.unwrap_or(0) as f64
            }
            Err(_) => f64::NAN,
        }
    }
    BTreeMap::from([
        (
            "filechanges".to_string(),
            count(Api::<FileChange>::all(client.clone())).await,
        ),
        (
            "fileintegritynodes".to_string(),
            count(Api::<kube_fim_crds::FileIntegrityNode>::all(client.clone())).await,
        ),
        (
            "events".to_string(),
            count(Api::<k8s_openapi::api::events::v1::Event>::all(
                client.clone(),
            ))
            .await,
        ),
        (
            "leases".to_string(),
            count(Api::<Lease>::all(client.clone())).await,
        ),
        (
            "nodes".to_string(),
            count(Api::<Node>::all(client.clone())).await,
        ),
    ])
}

/// Resident and peak memory (MiB) of a process, from /proc.
fn memory(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Memory of the control plane's processes and the operator, and the agents' average.
fn memory_report(operator: u32, agents: &[u32]) {
    let dir = std::env::var_os("KUBE_FIM_CONTROLPLANE_DIR").map(PathBuf::from);
    let mut rows = Vec::new();
    for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        let pid = dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join("run").join(format!("{name}.pid"))).ok())
            .and_then(|p| p.trim().parse().ok());
        if let Some((rss, peak)) = pid.and_then(memory) {
            rows.push((name.to_string(), rss, peak));
        }
    }
    if let Some((rss, peak)) = memory(operator) {
        rows.push(("kube-fim-operator".to_string(), rss, peak));
    }
    let agent: Vec<(f64, f64)> = agents.iter().filter_map(|p| memory(*p)).collect();
    if !agent.is_empty() {
        let n = agent.len() as f64;
        rows.push((
            format!("kube-fim-agent (mean of {})", agent.len()),
            agent.iter().map(|a| a.0).sum::<f64>() / n,
            agent.iter().map(|a| a.1).sum::<f64>() / n,
        ));
    }
    println!("memory (MiB, debug builds):");
    for (name, rss, peak) in rows {
        println!("  {name:<44} rss {rss:>7.1} peak {peak:>7.1}");
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Writes `content` to `path` in one step (a rename into place), so the agent
/// sees one change per file.
fn put(root: &Path, path: &str, content: &str) {
    let tmp = root.join("tmp").join(path.replace('/', "_"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, root.join(path.trim_start_matches('/'))).unwrap();
}

struct SimNode {
    name: String,
    root: PathBuf,
    agent: Process,
}

async fn run() {
    let n = env_usize("SCALE_NODES", 100);
    // Ten storm nodes, or half the fleet when it is small: some must stay quiet.
    let storm_nodes = 10.min(n / 2).max(1);
    let storm_total = env_usize("SCALE_STORM", 5000);
    let per_storm_node = storm_total / storm_nodes;
    let storm_total = per_storm_node * storm_nodes;
    let client = client().await;
    ensure_crds();
    ensure_rbac();
    let suite = unique_name("scale");
    let work = tempfile::Builder::new()
        .prefix("kube-fim-scale-")
        .tempdir()
        .unwrap();
    println!(
        "kube-fim scale test: {n} nodes, a {storm_total}-change storm over {storm_nodes} nodes"
    );
    if let Ok(limit) = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances") {
        let limit: usize = limit.trim().parse().unwrap_or(0);
        if limit < n + 20 {
            println!(
                "warning: fs.inotify.max_user_instances is {limit}; each agent needs one \
                 (sysctl -w fs.inotify.max_user_instances=1024)"
            );
        }
    }

    // Nodes, their kubelets and their tokens.
    let started = Instant::now();
    let node_api: Api<Node> = Api::all(client.clone());
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{suite}-{i:04}");
        let mut node = Node::default();
        node.metadata.name = Some(name.clone());
        node.metadata.labels = Some(BTreeMap::from([
            ("role".to_string(), suite.clone()),
            ("kubernetes.io/hostname".to_string(), name.clone()),
        ]));
        let created = node_api
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        names.push((name, created.uid().unwrap()));
    }
    let kubelet = tokio::spawn(kubelets(client.clone(), names.clone()));
    let agent_bin = binary("kube-fim-agent");
    let mut nodes = Vec::new();
    for (name, uid) in &names {
        let run = kubectl([
            "create",
            "token",
            "kube-fim-agent",
            "-n",
            "kube-fim",
            "--bound-object-kind",
            "Node",
            "--bound-object-name",
            name,
            "--bound-object-uid",
            uid,
            "--duration=2h",
        ]);
        assert!(run.success, "node-bound token for {name}: {}", run.stderr);
        let dir = work.path().join(name);
        let root = dir.join("root");
        for d in ["etc/storm", "etc/ssh", "usr/bin", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // A real dpkg record of gzip and its files: the fleet-wide upgrade below.
        kube_fim_e2e::packages::install_dpkg(&root, &["gzip"]);
        for (path, content) in [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/hosts", "127.0.0.1 localhost\n"),
            ("etc/ssh/sshd_config", "PermitRootLogin no\n"),
            ("usr/bin/tool", "#!/bin/sh\necho tool\n"),
        ] {
            std::fs::write(root.join(path), content).unwrap();
        }
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let kc = token_kubeconfig(&dir, name, run.stdout.trim());
        let args = vec![
            "run".to_string(),
            format!("--node-name={name}"),
            format!("--root={}", root.display()),
            format!("--state={}", state.display()),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
            format!("--policy-selector={SUITE_LABEL}={suite}"),
            format!("--kubeconfig={}", kc.display()),
        ];
        let agent = Process::start(&format!("scale-{name}"), &agent_bin, &args, &kc);
        nodes.push(SimNode {
            name: name.clone(),
            root,
            agent,
        });
    }
    let op = Operator::start(&suite, &suite, &[]);
    println!(
        "setup: {n} Nodes, tokens and agents started in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    // kubectl apply → Ready on every node.
    let policy = format!("{suite}-policy");
    let manifest = Policy::named(&policy)
        .label(SUITE_LABEL, &suite)
        .node_selector("role", &suite)
        .debounce("200ms")
        .path(Entry::new("etc", "/etc").recursive())
        .path(Entry::new("bin", "/usr/bin").recursive())
        .path(Entry::new("pkg", "/bin").recursive())
        .yaml();
    let applied = Instant::now();
    let run = kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(run.success, "kubectl apply: {}", run.stderr);
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let mut first_ready = None;
    let ready_after = loop {
        let p = policies.get(&policy).await.unwrap();
        let s = p.status.clone().unwrap_or_default();
        let ready = s.nodes_ready.unwrap_or(0);
        if ready > 0 && first_ready.is_none() {
            first_ready = Some(applied.elapsed());
        }
        let all = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if all && ready as usize == n {
            break applied.elapsed();
        }
        assert!(
            applied.elapsed() < Duration::from_secs(600),
            "not Ready on every node after 10 minutes: {ready}/{n}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "apply → Ready: first node {:.1}s, all {n} nodes {:.1}s",
        first_ready.unwrap_or_default().as_secs_f64(),
        ready_after.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The storm, and probes on the quiet nodes.
    let seen: Arc<Mutex<HashMap<(String, String), Instant>>> = Arc::default();
    let summaries: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let reported: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let watch = {
        let (seen, summaries, reported) = (seen.clone(), summaries.clone(), reported.clone());
        let api: Api<FileChange> = Api::all(client.clone());
        let wc = watcher::Config::default().labels(&format!("{POLICY}={}", label_value(&policy)));
        tokio::spawn(async move {
            let mut stream = watcher(api, wc).default_backoff().applied_objects().boxed();
            while let Some(Ok(fc)) = stream.next().await {
                let node = fc.spec.node.clone();
                if fc.spec.category == ChangeCategory::Summary {
                    let count = fc.spec.summary.as_ref().map(|s| s.count).unwrap_or(0);
                    *summaries.lock().unwrap().entry(fc.name_any()).or_default() = count;
                } else {
                    let mut seen = seen.lock().unwrap();
                    if seen
                        .insert((node.clone(), fc.spec.path.clone()), Instant::now())
                        .is_none()
                    {
                        *reported.lock().unwrap().entry(node).or_default() += 1;
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = apiserver_metrics();
    let op_before = parse_metrics(&op.metrics().unwrap_or_default());
    let storm_start = Instant::now();

    let storm: Vec<(String, PathBuf)> = nodes[..storm_nodes]
        .iter()
        .map(|n| (n.name.clone(), n.root.clone()))
        .collect();
    let storm_task = tokio::task::spawn_blocking(move || {
        // Round-robin over the storm nodes, as fast as the disk allows.
        let start = Instant::now();
        for k in 0..per_storm_node {
            for (_, root) in &storm {
                put(
                    root,
                    &format!("/etc/storm/f-{k:05}.conf"),
                    &format!("value={k}\n"),
                );
            }
        }
        start.elapsed()
    });
    let quiet: Vec<(String, PathBuf)> = nodes[storm_nodes..]
        .iter()
        .take(20)
        .map(|n| (n.name.clone(), n.root.clone()))
        .collect();
    let mut probes: Vec<(String, String, Instant)> = Vec::new();
    let mut max_status_age = 0.0f64;
    let mut max_objects: BTreeMap<String, f64> = BTreeMap::new();
    for round in 0..10 {
        for (name, root) in &quiet {
            let path = format!("/etc/probe-{round}.conf");
            put(root, &path, "probe\n");
            probes.push((name.clone(), path, Instant::now()));
        }
        for (k, v) in stored_objects(&client).await {
            let e = max_objects.entry(k).or_default();
            *e = e.max(v);
        }
        if let Some(text) = op.metrics() {
            for (name, _, v) in parse_metrics(&text) {
                if name == "kube_fim_operator_policy_status_age_seconds" {
                    max_status_age = max_status_age.max(v);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let written = storm_task.await.unwrap();

    // Nothing lost: each storm node's changes are FileChanges of their own,
    // delivered at the policy's cap (100 a minute by default) past its first
    // 100; a Summary (agents before storms were paced) still counts.
    let paced = (per_storm_node.saturating_sub(100) * 60 / 100) as u64;
    let deadline = Instant::now() + Duration::from_secs(120 + paced);
    let total = |reported: &HashMap<String, u64>, summaries: &HashMap<String, u64>| {
        let storm_names: Vec<&String> = nodes[..storm_nodes].iter().map(|n| &n.name).collect();
        let direct: u64 = reported
            .iter()
            .filter(|(k, _)| storm_names.contains(k))
            .map(|(_, v)| v)
            .sum();
        (direct, summaries.values().sum::<u64>())
    };
    let (direct, folded) = loop {
        let (direct, folded) = total(&reported.lock().unwrap(), &summaries.lock().unwrap());
        if direct + folded >= storm_total as u64 || Instant::now() > deadline {
            break (direct, folded);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let storm_secs = storm_start.elapsed().as_secs_f64();
    let after = apiserver_metrics();
    for (k, v) in stored_objects(&client).await {
        let e = max_objects.entry(k).or_default();
        *e = e.max(v);
    }
    let op_after = parse_metrics(&op.metrics().unwrap_or_default());
    watch.abort();
    kubelet.abort();

    // Probe latencies.
    let seen = seen.lock().unwrap().clone();
    let mut latencies: Vec<f64> = probes
        .iter()
        .filter_map(|(node, path, at)| {
            seen.get(&(node.clone(), path.clone()))
                .map(|t| t.saturating_duration_since(*at).as_secs_f64())
        })
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let missing = probes.len() - latencies.len();
    let summary_objects = summaries.lock().unwrap().len();

    println!();
    println!(
        "storm: {storm_total} changes written over {storm_nodes} nodes in {:.1}s",
        written.as_secs_f64()
    );
    println!(
        "  reported as {direct} FileChanges + {summary_objects} Summaries covering {folded}: {} of {storm_total} accounted for{}",
        direct + folded,
        if direct + folded == storm_total as u64 {
            " (nothing lost)"
        } else {
            " (MISSING CHANGES)"
        }
    );
    println!(
        "  write→FileChange on {} quiet nodes ({} probes, {missing} not seen): p50 {:.2}s p99 {:.2}s max {:.2}s",
        quiet.len(),
        probes.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );

    // API server, by verb and resource, over the storm window.
    let (rb, ra) = (requests(&before), requests(&after));
    let mut rows: Vec<(String, f64, f64, f64)> = ra
        .count
        .iter()
        .map(|(k, v)| {
            let d = v - rb.count.get(k).copied().unwrap_or(0.0);
            let hist = ra.buckets.get(k);
            let (p50, p99) = hist
                .map(|h| {
                    (
                        quantile(rb.buckets.get(k), h, 0.5),
                        quantile(rb.buckets.get(k), h, 0.99),
                    )
                })
                .unwrap_or((0.0, 0.0));
            (k.clone(), d, p50, p99)
        })
        .filter(|(k, d, _, _)| *d > 0.0 && !k.starts_with("WATCH"))
        .collect();
    rows.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    let all_requests: f64 = rows.iter().map(|r| r.1).sum();
    println!();
    println!(
        "API server during the storm ({storm_secs:.0}s, {:.1} requests/s in all):",
        all_requests / storm_secs
    );
    println!(
        "  {:<44} {:>8} {:>8} {:>9} {:>9}",
        "verb resource", "requests", "per s", "p50", "p99"
    );
    for (k, d, p50, p99) in rows.iter().take(25) {
        println!(
            "  {k:<44} {d:>8.0} {:>8.2} {:>8.3}s {:>8.3}s",
            d / storm_secs,
            p50,
            p99
        );
    }
    println!("  objects in etcd (most seen during the storm):");
    for (k, v) in &max_objects {
        println!("    {k:<44} {v:>8.0}");
    }
    let counted = object_counts(&after);
    if let Some(total) = counted.values().copied().reduce(f64::max) {
        println!(
            "    (apiserver_storage_objects, largest resource: {total:.0}; {} resources)",
            counted.len()
        );
    }

    // Writes per reported change: every write but the stand-in kubelets'.
    let is_write = |k: &str| {
        ["POST ", "PUT ", "PATCH ", "APPLY ", "DELETE "]
            .iter()
            .any(|v| k.starts_with(v))
    };
    let writes: Vec<&(String, f64, f64, f64)> = rows
        .iter()
        .filter(|(k, _, _, _)| {
            is_write(k) && !k.ends_with(" leases") && !k.ends_with(" nodes/status")
        })
        .collect();
    let total_writes: f64 = writes.iter().map(|w| w.1).sum();
    let changes = (direct + folded).max(1) as f64 + probes.len() as f64;
    let objects = (direct + summary_objects as u64) as f64 + probes.len() as f64;
    println!();
    println!(
        "API writes per reported change: {:.2} ({total_writes:.0} writes for {changes:.0} changes, \
         {objects:.0} of them as FileChange objects: {:.2} writes per object; kubelet Lease and \
         Node status writes excluded)",
        total_writes / changes,
        total_writes / objects.max(1.0)
    );
    for (k, d, _, _) in &writes {
        println!(
            "  {k:<44} {:>8.0} ({:.2} per FileChange object)",
            d,
            d / objects.max(1.0)
        );
    }

    // A fleet-wide package upgrade: gzip on every node at once, as dpkg
    // writes it. Each node's files are package-verified changes of one
    // transaction: one FileChange per node instead of one per file.
    let upgrade_before = apiserver_metrics();
    let upgrade_start = Instant::now();
    let roots: Vec<PathBuf> = nodes.iter().map(|n| n.root.clone()).collect();
    let files_per_node = tokio::task::spawn_blocking(move || {
        roots
            .iter()
            .map(|r| kube_fim_e2e::packages::upgrade(r, "gzip", "99.0-1").len())
            .max()
            .unwrap_or(0)
    })
    .await
    .unwrap();
    let changes_api: Api<FileChange> = Api::all(client.clone());
    let wanted = files_per_node * n;
    let upgrade_deadline = Instant::now() + Duration::from_secs(600);
    let (txn_objects, listed, per_file_objects) = loop {
        let all = changes_api
            .list(&ListParams::default().labels(&format!("{POLICY}={}", label_value(&policy))))
            .await
            .unwrap()
            .items;
        let upgraded: Vec<&FileChange> = all
            .iter()
            .filter(|c| {
                c.spec
                    .package
                    .as_ref()
                    .is_some_and(|p| p.version == "99.0-1")
            })
            .collect();
        let txns: Vec<&&FileChange> = upgraded
            .iter()
            .filter(|c| {
                c.spec
                    .package
                    .as_ref()
                    .is_some_and(|p| p.transaction.is_some())
            })
            .collect();
        let listed: usize = txns
            .iter()
            .map(|c| {
                c.spec
                    .package
                    .as_ref()
                    .and_then(|p| p.transaction.as_ref())
                    .map_or(0, |t| t.changes.len())
            })
            .sum();
        let singles = upgraded.len() - txns.len();
        if listed + singles >= wanted || Instant::now() > upgrade_deadline {
            break (txns.len(), listed, singles);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let upgrade_secs = upgrade_start.elapsed().as_secs_f64();
    let upgrade_after = apiserver_metrics();
    let (ub, ua) = (requests(&upgrade_before), requests(&upgrade_after));
    let upgrade_rows: Vec<(String, f64)> = ua
        .count
        .iter()
        .filter(|(k, _)| {
            is_write(k)
                && !k.starts_with("WATCH")
                && !k.ends_with(" leases")
                && !k.ends_with(" nodes/status")
        })
        .map(|(k, v)| (k.clone(), v - ub.count.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    let upgrade_writes: f64 = upgrade_rows.iter().map(|r| r.1).sum();
    println!();
    println!(
        "package upgrade: gzip on {n} nodes × {files_per_node} files = {wanted} package-verified \
         changes in {upgrade_secs:.0}s: {txn_objects} transaction objects listing {listed} \
         changes + {per_file_objects} per-file objects ({:.2} FileChange objects per node); \
         {upgrade_writes:.0} API writes in all, {:.1} per node (per-file objects: at least \
         {files_per_node} creates per node); projected to 5,000 nodes upgrading within a minute: \
         {:.0} writes/s",
        (txn_objects + per_file_objects) as f64 / n as f64,
        upgrade_writes / n as f64,
        upgrade_writes / n as f64 * 5000.0 / 60.0
    );
    for (k, d) in &upgrade_rows {
        println!("  {k:<44} {d:>8.0} ({:.2} per node)", d / n as f64);
    }

    // Operator.
    println!();
    let agent_pids: Vec<u32> = nodes.iter().map(|n| n.agent.child.id()).collect();
    memory_report(op.process.child.id(), &agent_pids);

    let rd = |m: &[(String, BTreeMap<String, String>, f64)], name: &str| histogram(m, name);
    let p = |name: &str, q: f64| quantile(Some(&rd(&op_before, name)), &rd(&op_after, name), q);
    let count = |m: &[(String, BTreeMap<String, String>, f64)], name: &str| {
        m.iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum::<f64>()
    };
    println!();
    let delays = count(&op_after, "kube_fim_operator_status_delay_seconds_count")
        - count(&op_before, "kube_fim_operator_status_delay_seconds_count");
    println!(
        "operator during the storm: {:.0} policy reconciles, reconcile p50 ≤{:.3}s p99 ≤{:.3}s; \
         {delays:.0} status refreshes driven by a change, change→status p50 ≤{:.2}s p99 ≤{:.2}s; \
         status age at most {max_status_age:.1}s when read (resync 1m)",
        count(&op_after, "kube_fim_operator_reconciles_total")
            - count(&op_before, "kube_fim_operator_reconciles_total"),
        p("kube_fim_operator_reconcile_duration_seconds", 0.5),
        p("kube_fim_operator_reconcile_duration_seconds", 0.99),
        p("kube_fim_operator_status_delay_seconds", 0.5),
        p("kube_fim_operator_status_delay_seconds", 0.99),
    );
    println!(
        "operator over the whole run: {:.0} policy reconciles, {:.0} fleet reconciles, reconcile p99 ≤{:.3}s, change→status p99 ≤{:.2}s",
        count(&op_after, "kube_fim_operator_reconciles_total"),
        count(
            &op_after,
            "kube_fim_operator_fleet_reconcile_duration_seconds_count"
        ),
        quantile(
            None,
            &rd(&op_after, "kube_fim_operator_reconcile_duration_seconds"),
            0.99
        ),
        quantile(
            None,
            &rd(&op_after, "kube_fim_operator_status_delay_seconds"),
            0.99
        ),
    );

    assert_eq!(
        direct + folded,
        storm_total as u64,
        "changes lost in the storm"
    );
    assert_eq!(missing, 0, "probe changes never seen");
    assert_eq!(
        listed + per_file_objects,
        wanted,
        "every file of the upgrade retrievable from the FileChanges"
    );
}
