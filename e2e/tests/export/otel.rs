//! A real OpenTelemetry Collector: OTLP over HTTP and gRPC.

use super::*;

/// The export tests' OpenTelemetry Collector, built from Go modules and cached
/// by `e2e/otelcol/build.sh` (a cold build takes many minutes).
fn otelcol_binary() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::process::Command::new(repo_root().join("e2e/otelcol/build.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running e2e/otelcol/build.sh");
        assert!(out.status.success(), "e2e/otelcol/build.sh failed");
        std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// A real OpenTelemetry Collector: OTLP receiver (HTTP on `port`, gRPC on
/// `grpc_port`), file exporter.
struct Collector {
    process: Option<std::process::Child>,
    dir: tempfile::TempDir,
    port: u16,
    grpc_port: u16,
    runs: usize,
}

impl Collector {
    fn new() -> Collector {
        Collector {
            process: None,
            dir: tempfile::tempdir().unwrap(),
            port: kube_fim_e2e::free_port(),
            grpc_port: kube_fim_e2e::free_port(),
            runs: 0,
        }
    }

    /// Starts it, each run exporting to a file of its own.
    fn start(&mut self) {
        self.runs += 1;
        let dir = self.dir.path();
        let conf = format!(
            r#"receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
exporters:
  file:
    path: {dir}/logs-{run}.json
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    logs:
      receivers: [otlp]
      exporters: [file]
"#,
            port = self.port,
            grpc_port = self.grpc_port,
            dir = dir.display(),
            run = self.runs
        );
        let path = dir.join(format!("config-{}.yaml", self.runs));
        std::fs::write(&path, conf).unwrap();
        let log = std::fs::File::create(dir.join(format!("collector-{}.log", self.runs))).unwrap();
        let child = std::process::Command::new(otelcol_binary())
            .arg(format!("--config=file:{}", path.display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the collector");
        self.process = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.grpc_port)).is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the collector did not listen: {}",
                std::fs::read_to_string(dir.join(format!("collector-{}.log", self.runs)))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The OCSF events the collector exported, over all runs, in order.
    fn events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for run in 1..=self.runs {
            let text = std::fs::read_to_string(self.dir.path().join(format!("logs-{run}.json")))
                .unwrap_or_default();
            for line in text.lines() {
                let Ok(request) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                for rl in request["resourceLogs"].as_array().into_iter().flatten() {
                    for sl in rl["scopeLogs"].as_array().into_iter().flatten() {
                        for record in sl["logRecords"].as_array().into_iter().flatten() {
                            if let Some(body) = record["body"]["stringValue"].as_str() {
                                out.push(serde_json::from_str(body).expect("the body is JSON"));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

impl Collector {
    /// Waits until the collector holds `want` of `node`: exactly, or (with
    /// `resent`) every id a change's and the first occurrences `want` in
    /// order (a batch whose acknowledgement a kill cut off is sent again).
    async fn wait_for(&self, what: &str, node: &str, want: &[String], resent: bool) {
        eventually(what, Duration::from_secs(120), || {
            let got = ocsf_ids(&self.events(), node);
            let want = want.to_vec();
            async move {
                let ok = if resent {
                    got.iter().all(|id| want.contains(id)) && dedup(got.clone()) == want
                } else {
                    got == want
                };
                if ok { Ok(()) } else { Err(format!("{got:?}")) }
            }
        })
        .await;
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

/// First occurrences, in order.
fn dedup(ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().filter(|i| seen.insert(i.clone())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_collector_gets_every_change_across_operator_and_collector_restarts() {
    ensure_export_rbac();
    let suite = unique_name("exp-otel");
    let mut collector = Collector::new();
    collector.start();
    let mut operator = Operator::start(&suite, &suite, &[]);
    let name = format!("{suite}-otlp");
    let spec = otlp(
        format!("http://127.0.0.1:{}", collector.port),
        kube_fim_crds::OtlpProtocol::Http,
        5,
    );
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    let node = format!("{suite}-n");
    let mut all = create_changes(&node, "p", &format!("{node}-1"), 10).await;
    collector
        .wait_for("the collector has the first changes", &node, &all, false)
        .await;

    // Acknowledged batches are recorded at most a second later; a crash
    // before that sends them again (same ids). Recorded: nothing is re-sent.
    eventually("the position recorded", Duration::from_secs(30), || {
        let sinks = sinks.clone();
        let (name, node, last) = (name.clone(), node.clone(), all[9].clone());
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            let st = s.status.unwrap_or_default();
            match st.positions.iter().find(|p| p.node == node) {
                Some(p) if p.name == last => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    // Both ends go down; changes keep coming.
    operator.process.kill();
    collector.kill();
    all.extend(create_changes(&node, "p", &format!("{node}-2"), 5).await);
    let _operator = Operator::start(&suite, &suite, &[]);
    wait_condition(
        &sinks,
        &name,
        "Degraded",
        "True",
        "cannot reach the receiver",
    )
    .await;
    collector.start();
    all.extend(create_changes(&node, "p", &format!("{node}-3"), 5).await);
    collector
        .wait_for("every change at the collector, in order", &node, &all, true)
        .await;
    let got = ocsf_ids(&collector.events(), &node);
    assert_eq!(got, all, "nothing acknowledged was sent twice");
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

/// OTLP over gRPC: the `LogsService/Export` call to a real collector's gRPC
/// receiver. A collector that is down turns the sink Degraded ("cannot reach
/// the receiver"); back up, it gets every change, in order, each once.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_collector_gets_every_change_over_grpc_across_its_restart() {
    ensure_export_rbac();
    let suite = unique_name("exp-grpc");
    let mut collector = Collector::new();
    collector.start();
    let _operator = Operator::start(&suite, &suite, &[]);
    let name = format!("{suite}-otlp");
    let spec = otlp(
        format!("http://127.0.0.1:{}", collector.grpc_port),
        kube_fim_crds::OtlpProtocol::Grpc,
        4,
    );
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    let node = format!("{suite}-n");
    let mut all = create_changes(&node, "p", &format!("{node}-1"), 6).await;
    collector
        .wait_for(
            "the collector has the changes sent over gRPC",
            &node,
            &all,
            false,
        )
        .await;

    collector.kill();
    all.extend(create_changes(&node, "p", &format!("{node}-2"), 5).await);
    wait_condition(
        &sinks,
        &name,
        "Degraded",
        "True",
        "cannot reach the receiver",
    )
    .await;
    collector.start();
    collector
        .wait_for("every change at the collector, in order", &node, &all, true)
        .await;
    wait_condition(&sinks, &name, "Ready", "True", "").await;
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

/// The SHA-256 a sink asks for (see `fingerprints.rs`) over OTLP: the real
/// collector receives both fingerprints of the bytes the test wrote (OCSF
/// `file.hashes`: algorithm 3 SHA-256 and 99 BLAKE3).
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_files_sha256_reaches_the_collector_when_a_sink_asks_for_it() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use kube_fim_e2e::fleet::{Fleet, entry};
    use sha2::Digest;

    ensure_export_rbac();
    let suite = unique_name("exp-sha");
    let mut collector = Collector::new();
    collector.start();
    let _operator = Operator::start(&suite, &suite, &[]);
    let admin = client().await;
    let mut fleet = Fleet::new(admin.clone(), &suite, 1).await;
    let policy = fleet.policy(
        &format!("{suite}-p"),
        vec![entry("passwd", "/etc/passwd", false)],
    );
    fleet.create_policy(&policy).await;
    let name = format!("{suite}-otlp");
    let mut spec = otlp(
        format!("http://127.0.0.1:{}", collector.port),
        kube_fim_crds::OtlpProtocol::Http,
        10,
    );
    spec.fingerprints = vec![kube_fim_crds::Fingerprint::Sha256];
    let sinks = create_sink(&sink(&name, &suite, spec)).await;

    // The operator tells the agents, through the arguments it gives them.
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.clone(), "kube-fim");
    let arg = eventually(
        "the agents' DaemonSet asks for SHA-256",
        Duration::from_secs(60),
        || {
            let (daemonsets, ds) = (daemonsets.clone(), format!("{suite}-agent"));
            async move {
                let ds = daemonsets.get(&ds).await.map_err(|e| e.to_string())?;
                let args = ds
                    .spec
                    .and_then(|s| s.template.spec)
                    .and_then(|p| p.containers.into_iter().next())
                    .and_then(|c| c.args)
                    .unwrap_or_default();
                args.iter()
                    .find(|a| a.starts_with("--fingerprints="))
                    .cloned()
                    .ok_or(format!("{args:?}"))
            }
        },
    )
    .await;
    assert_eq!(arg, "--fingerprints=sha256");
    // This tier has no kubelet: the test starts the agent as the pod would.
    let node = fleet.nodes[0].name.clone();
    fleet.nodes[0].start_agent_with(std::slice::from_ref(&arg));
    fleet
        .wait_ready(
            &node,
            &policy.metadata.name.clone().unwrap(),
            Duration::from_secs(60),
        )
        .await;

    let content = b"root:x:0:0:root:/root:/bin/bash\nmallory:x:0:0::/root:/bin/sh\n";
    std::fs::write(fleet.nodes[0].host("/etc/passwd"), content).unwrap();
    let sha256 = format!("{:x}", sha2::Sha256::digest(content));
    let blake3 = blake3::hash(content).to_hex().to_string();
    let event = eventually(
        "the change with its SHA-256 at the collector",
        Duration::from_secs(90),
        || {
            let events = collector.events();
            let node = node.clone();
            async move {
                events
                    .into_iter()
                    .find(|e| {
                        e["device"]["hostname"] == node.as_str()
                            && e["file"]["path"] == "/etc/passwd"
                    })
                    .ok_or_else(|| "not yet".to_string())
            }
        },
    )
    .await;
    let hashes = event["file"]["hashes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        hashes.contains(
            &serde_json::json!({ "algorithm_id": 3, "algorithm": "SHA-256", "value": sha256 })
        ),
        "{event}"
    );
    assert!(
        hashes.contains(
            &serde_json::json!({ "algorithm_id": 99, "algorithm": "BLAKE3", "value": blake3 })
        ),
        "the SHA-256 and the BLAKE3 of the same bytes: {event}"
    );
    let stored = fleet.changes(&node).await;
    let after = stored
        .iter()
        .find(|c| c.spec.path == "/etc/passwd")
        .and_then(|c| c.spec.after.clone())
        .unwrap();
    assert_eq!(after.sha256.as_deref(), Some(sha256.as_str()));
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
    fleet.cleanup().await;
}
