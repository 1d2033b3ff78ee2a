//! The real-node tier, container drift with its writers: a policy that selects
//! containers and sets `processAttribution`, pods from the local busybox
//! image, `kubectl exec` writing into them, and the FileChanges naming the
//! process and pod that wrote (or `unknown`). Also the figures of the issue:
//! the time from an exec's write to its FileChange and the agent's memory and
//! CPU with 20 containers on the node.
//!
//! Runs inside `e2e/node/node.sh run` (`make e2e-node` runs it after
//! `--test node`, on the same node and chart install); alone it installs the
//! chart itself.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube_fim_e2e::{eventually, helm, kubectl, kubectl_stdin, repo_root};
use serde_json::Value;

const NAMESPACE: &str = "kube-fim";
const RELEASE: &str = "kube-fim";
const APPS: &str = "drift-writers";
const POLICY: &str = "drift-writers";
/// Containers on the node for the measurement (the two apps and the idle ones).
const CONTAINERS: usize = 20;

fn node_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run inside e2e/node/node.sh run DIR -- cargo test -p kube-fim-e2e --test node_drift")
    })
}

fn json(args: &[&str]) -> Result<Value, String> {
    let run = kubectl(args);
    if !run.success {
        return Err(run.stderr);
    }
    serde_json::from_str(&run.stdout).map_err(|e| e.to_string())
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The chart as `--test node` installs it, unless it is installed already.
fn ensure_chart() {
    if helm(["status", RELEASE, "-n", NAMESPACE]).success {
        return;
    }
    let root = PathBuf::from(node_env("KUBE_FIM_NODE_ROOT"));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let tag = node_env("KUBE_FIM_NODE_TAG");
    let values = [
        "operator.image.repository=localhost/kube-fim/kube-fim-operator".to_string(),
        "agent.image.repository=localhost/kube-fim/kube-fim-agent".to_string(),
        format!("operator.image.tag={tag}"),
        format!("agent.image.tag={tag}"),
        "operator.image.pullPolicy=Never".to_string(),
        "agent.image.pullPolicy=Never".to_string(),
        format!("agent.hostRoot={}", root.display()),
        format!("agent.stateDir={}", node_env("KUBE_FIM_NODE_STATE")),
        format!("agent.criSocket={}", node_env("KUBE_FIM_NODE_CONTAINERD")),
    ];
    assert!(kubectl(["create", "namespace", NAMESPACE]).success);
    let run = kubectl([
        "label",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=privileged",
    ]);
    assert!(run.success, "{}", run.stderr);
    let chart = repo_root().join("charts/kube-fim");
    let mut args = vec![
        "install".to_string(),
        RELEASE.into(),
        chart.display().to_string(),
        "--namespace".into(),
        NAMESPACE.into(),
    ];
    for v in values {
        args.push("--set".into());
        args.push(v);
    }
    let run = helm(&args);
    assert!(run.success, "helm install: {}{}", run.stdout, run.stderr);
}

/// The agent pod, Running and Ready, with the host's pid namespace (what
/// `processAttribution` gives it).
async fn attributing_agent() -> Value {
    eventually(
        "an agent pod Ready with hostPID",
        Duration::from_secs(180),
        || async {
            let pods = json(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                "json",
            ])?;
            let items = pods["items"].as_array().cloned().unwrap_or_default();
            match items.as_slice() {
                [pod]
                    if pod["spec"]["hostPID"] == true
                        && pod["metadata"]["deletionTimestamp"].is_null()
                        && is_ready(pod) =>
                {
                    Ok(pod.clone())
                }
                _ => Err(format!("{} agent pods", items.len())),
            }
        },
    )
    .await
}

fn busybox_pod(name: &str, script: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {APPS}, labels: {{app: {name}}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: localhost/kube-fim/busybox:{tag}
    imagePullPolicy: Never
    command: [/bin/busybox, sh, -c, '{script} trap \"exit 0\" TERM; while true; do /bin/busybox sleep 1; done']
",
        tag = node_env("KUBE_FIM_NODE_TAG")
    )
}

async fn all_ready(count: usize) {
    eventually(
        &format!("{count} pods Ready in {APPS}"),
        Duration::from_secs(300),
        || async {
            let pods = json(&["get", "pods", "-n", APPS, "-o", "json"])?;
            let ready = pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| is_ready(p))
                .count();
            if ready >= count {
                Ok(())
            } else {
                Err(format!("{ready} Ready"))
            }
        },
    )
    .await
}

/// The FileChange of `path` in pod `pod`, once it is there.
async fn drift_change(pod: &str, path: &str) -> Value {
    eventually(
        &format!("the FileChange of {path} in {pod}"),
        Duration::from_secs(60),
        || async {
            let all = json(&["get", "filechanges", "-o", "json"])?;
            all["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["spec"]["container"]["pod"] == pod && c["spec"]["path"] == path)
                .cloned()
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await
}

fn exec(pod: &str, script: &str) {
    let run = kubectl([
        "exec",
        "-n",
        APPS,
        pod,
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        script,
    ]);
    assert!(run.success, "exec {script}: {}", run.stderr);
}

/// The agent process on the node: (pid, resident KiB, CPU ticks so far).
fn agent_process() -> Option<(u32, u64, u64)> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !cmdline.starts_with(b"/usr/local/bin/kube-fim-agent") {
            continue;
        }
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // Fields after the command's closing parenthesis: utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        return Some((pid, rss, ticks));
    }
    None
}

/// The agent's /metrics, read from inside its container.
async fn agent_metrics() -> String {
    let agent = attributing_agent().await;
    let pod = agent["metadata"]["name"].as_str().unwrap_or_default();
    let run = kubectl([
        "exec",
        "-n",
        NAMESPACE,
        pod,
        "-c",
        "agent",
        "--",
        "/host/bin/busybox",
        "wget",
        "-qO-",
        "http://127.0.0.1:9101/metrics",
    ]);
    assert!(run.success, "{}", run.stderr);
    run.stdout
}

fn by(change: &Value) -> &Value {
    &change["spec"]["process"]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_in_a_container_names_its_process_and_pod_and_nobody_else() {
    ensure_chart();
    let run = kubectl(["create", "namespace", APPS]);
    assert!(run.success, "{}", run.stderr);
    // Pod `early` drifts at once, before any policy selects it: nobody saw
    // the write. Pod `other` runs the same image beside it.
    for (name, script) in [("early", "echo early > /usr/bin/early;"), ("other", "")] {
        let run = kubectl_stdin(&["apply", "-f", "-"], &busybox_pod(name, script));
        assert!(run.success, "{}", run.stderr);
    }
    all_ready(2).await;
    let policy = format!(
        "apiVersion: fim.kube-fim.io/v1alpha1
kind: FileIntegrityPolicy
metadata: {{name: {POLICY}}}
spec:
  nodeSelector: {{kubernetes.io/os: linux}}
  processAttribution: true
  containers:
    namespaces: [{APPS}]
"
    );
    let run = kubectl_stdin(&["apply", "-f", "-"], &policy);
    assert!(run.success, "{}", run.stderr);
    attributing_agent().await;

    // Found by the first read of the layer: the writer is unknown, and said so.
    let early = drift_change("early", "/usr/bin/early").await;
    assert_eq!(by(&early)["by"], "unknown", "{}", early["spec"]);
    assert_eq!(by(&early)["limits"], serde_json::json!(["WriterUnknown"]));
    // The agent follows the layers now (its first reads are done).
    tokio::time::sleep(Duration::from_secs(3)).await;

    // An intruder's shell in `early` drops a binary and stays a moment.
    exec("early", "echo '#!/bin/sh' > /usr/bin/tool; sleep 2");
    let tool = drift_change("early", "/usr/bin/tool").await;
    let p = by(&tool);
    eprintln!("drift writer: {p}");
    assert_eq!(p["pod"]["namespace"], APPS, "{p}");
    assert_eq!(p["pod"]["name"], "early", "{p}");
    assert_eq!(p["pod"]["container"], "app", "{p}");
    assert!(p["pid"].as_i64().unwrap_or(0) > 0, "{p}");
    assert_eq!(
        p["containerId"], tool["spec"]["container"]["id"],
        "the writer's own container"
    );
    assert!(
        p["by"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("pod {APPS}/early")),
        "{p}"
    );

    // The same path written in `other`: its own writer, never early's.
    exec("other", "echo other > /usr/bin/tool; sleep 2");
    let tool_b = drift_change("other", "/usr/bin/tool").await;
    let q = by(&tool_b);
    assert_eq!(q["pod"]["name"], "other", "{q}");
    assert_ne!(q["containerId"], p["containerId"], "{q}");
    assert!(
        q["exe"].as_str().unwrap_or_default().ends_with("busybox"),
        "{q}"
    );

    // The figures of the issue with 20 containers on the node.
    for i in 0..CONTAINERS - 2 {
        let run = kubectl_stdin(
            &["apply", "-f", "-"],
            &busybox_pod(&format!("idle-{i}"), ""),
        );
        assert!(run.success, "{}", run.stderr);
    }
    all_ready(CONTAINERS).await;
    eventually(
        "the agent to watch every container",
        Duration::from_secs(60),
        || async {
            let watched: f64 = agent_metrics()
                .await
                .lines()
                .filter(|l| l.starts_with("kube_fim_agent_containers_watched{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if watched >= CONTAINERS as f64 {
                Ok(())
            } else {
                Err(format!("{watched} watched"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, rss_before, ticks_before) = agent_process().expect("the agent process");
    let window = Duration::from_secs(30);
    tokio::time::sleep(window).await;
    let (_, rss, ticks) = agent_process().expect("the agent process");
    eprintln!(
        "container drift, {CONTAINERS} containers: agent resident {rss_before}..{rss} KiB, \
         {} ms CPU per {}s idle",
        (ticks - ticks_before) * 10,
        window.as_secs()
    );
    let mut latencies = Vec::new();
    for i in 0..3 {
        let path = format!("/usr/bin/timed-{i}");
        exec("idle-7", &format!("echo {i} > {path}"));
        let written = Instant::now();
        let c = drift_change("idle-7", &path).await;
        latencies.push(written.elapsed());
        // `sh -c 'echo … > …'` exits at once: read before it did, it is
        // named with its pod; read after, it is an exited writer with no
        // pod. Never another pod, never a host process.
        let who = by(&c);
        let exited = who["limits"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l == "WriterExited"));
        assert!(
            who["pod"]["name"] == "idle-7" || (who["pod"].is_null() && exited),
            "{}",
            c["spec"]
        );
    }
    eprintln!(
        "container drift, {CONTAINERS} containers: exec's write to its FileChange (with writer) {latencies:?} (kubectl polls included)"
    );

    // Counted by namespace, with no per-pod series.
    let metrics = agent_metrics().await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kube_fim_agent_container_drift_changes_total{"))
        .collect();
    let counted: f64 = series
        .iter()
        .filter(|l| l.contains(&format!("namespace=\"{APPS}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // The counter is the agent process's: at least the three writes just
    // timed (the earlier ones may have been counted by the agent the
    // DaemonSet replaced when the first container policy came).
    assert!(counted >= 3.0, "{series:?}");
    assert!(series.iter().all(|l| !l.contains("pod=")), "{series:?}");

    let run = kubectl(["delete", "namespace", APPS, "--wait=true", "--timeout=120s"]);
    assert!(run.success, "{}", run.stderr);
}
