//! A real Prometheus (Debian's package) scrapes an agent and the operator on
//! loopback; a change on the node moves the agent's counter in Prometheus.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::time::Duration;

use kube_fim_e2e::fleet::{Fleet, SUITE_LABEL, entry};
use kube_fim_e2e::{
    Process, binary, client, eventually, free_port, http_get, service_account_kubeconfig,
    unique_name,
};

fn prometheus_binary() -> std::path::PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join("prometheus");
        if p.is_file() {
            return p;
        }
    }
    panic!("prometheus is not installed: `apt-get install prometheus` (.ci/run installs it)");
}

fn encode(promql: &str) -> String {
    promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query's first sample.
fn query(port: u16, promql: &str) -> Option<f64> {
    let body = http_get(port, &format!("/api/v1/query?query={}", encode(promql)))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn prometheus_scrapes_agent_and_operator_and_sees_a_change() {
    let prometheus = prometheus_binary();
    let client = client().await;
    let suite = unique_name("prom");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&{
            // With attribution, so that the by-process panel has data too.
            let mut p = fleet.policy(&policy, vec![entry("etc", "/etc", true)]);
            p.spec.process_attribution = true;
            p
        })
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, Duration::from_secs(60)).await;

    let op_port = free_port();
    let mut operator = Process::start(
        &format!("{suite}-operator"),
        &binary("kube-fim-operator"),
        &[
            "--namespace=kube-fim".to_string(),
            format!("--daemonset-name={suite}"),
            format!("--policy-selector={SUITE_LABEL}={suite}"),
            format!("--metrics-addr=127.0.0.1:{op_port}"),
            format!("--lease-name={suite}"),
            "--resync=2s".to_string(),
        ],
        &service_account_kubeconfig("kube-fim-operator"),
    );

    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    // The chart's alert rules as shipped, with KubeFimOperatorDown's 5m `for`
    // cut to seconds (its expression and labels unchanged).
    let rules = std::fs::read_to_string(
        kube_fim_e2e::repo_root().join("charts/kube-fim/rules/kube-fim-alerts.yaml"),
    )
    .unwrap();
    let (head, tail) = rules.split_once("- alert: KubeFimOperatorDown").unwrap();
    let tail = tail.replacen("for: 5m", "for: 5s", 1);
    std::fs::write(
        dir.path().join("rules.yaml"),
        format!("{head}- alert: KubeFimOperatorDown{tail}"),
    )
    .unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  - job_name: kube-fim-agent\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n  - job_name: kube-fim-operator\n    static_configs:\n      - targets: ['127.0.0.1:{op_port}']\n",
        dir.path().join("rules.yaml").display(),
        fleet.nodes[0].metrics_port
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prom = Process::start(
        &format!("{suite}-prometheus"),
        &prometheus,
        &[
            format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        &kube_fim_e2e::kubeconfig(),
    );

    eventually("both targets up", Duration::from_secs(30), || async {
        let up = query(prom_port, "sum(up{job=~\"kube-fim-.*\"})");
        if up == Some(2.0) {
            Ok(())
        } else {
            Err(format!("{up:?}"))
        }
    })
    .await;
    eventually(
        "the operator's policy gauge",
        Duration::from_secs(30),
        || async {
            let v = query(
                prom_port,
                &format!(
                    "kube_fim_operator_policy_nodes{{policy=\"{policy}\",state=\"selected\"}}"
                ),
            );
            if v == Some(1.0) {
                Ok(())
            } else {
                Err(format!("{v:?}"))
            }
        },
    )
    .await;
    let series = format!(
        "kube_fim_agent_changes_total{{node=\"{a}\",policy=\"{policy}\",category=\"Modified\"}}"
    );
    let before = query(prom_port, &series).unwrap_or(0.0);
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.1.1.1 moved\n").unwrap();
    eventually(
        "the change counted in Prometheus",
        Duration::from_secs(30),
        || async {
            let now = query(prom_port, &series);
            if now == Some(before + 1.0) {
                Ok(())
            } else {
                Err(format!("{now:?} (before {before})"))
            }
        },
    )
    .await;

    // Every query of the Grafana dashboard runs on this real Prometheus, and the
    // headline panels show the change.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            kube_fim_e2e::repo_root().join("charts/kube-fim/dashboards/kube-fim.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut failures = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$node", ".*")
                .replace("$policy", ".*")
                .replace("$__range", "10m")
                .replace("$__rate_interval", "1m");
            let body = http_get(prom_port, &format!("/api/v1/query?query={}", encode(&expr)));
            let ok = body
                .as_deref()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
                .is_some_and(|v| v["status"] == "success");
            if !ok {
                failures.push(format!("{}: {expr}: {body:?}", panel["title"]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries failing:\n{}",
        failures.join("\n")
    );
    let total = query(
        prom_port,
        &format!("sum(increase(kube_fim_agent_changes_total{{node=\"{a}\"}}[10m]))"),
    );
    let raw = http_get(
        prom_port,
        &format!(
            "/api/v1/query?query={}",
            encode("kube_fim_agent_changes_total[10m]")
        ),
    );
    assert!(
        total.unwrap_or(0.0) > 0.0,
        "the Changes-in-range panel shows the change: {total:?} {raw:?}"
    );
    // The by-process panel, its own query, names this test's process as the
    // writer (fanotify reports the process, whose main thread names it).
    let me = std::fs::read_to_string("/proc/self/comm").unwrap();
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Changes in range by process")
        .expect("a by-process panel");
    let expr = panel["targets"][0]["expr"]
        .as_str()
        .unwrap()
        .replace("$node", &a)
        .replace("$policy", &policy)
        .replace("$__range", "10m");
    let shown = eventually(
        "the writer in the by-process panel",
        Duration::from_secs(30),
        || async {
            let body = http_get(prom_port, &format!("/api/v1/query?query={}", encode(&expr)))
                .ok_or("no answer")?;
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            v["data"]["result"]
                .as_array()
                .and_then(|r| {
                    r.iter()
                        .find(|s| s["metric"]["command"] == me.trim())
                        .cloned()
                })
                .ok_or(body)
        },
    )
    .await;
    assert_eq!(shown["value"][1], "1", "{shown}");

    // The watcher is watched: with the operator up the operator-down alert is
    // quiet; once the operator stops it fires.
    let down = "ALERTS{alertname=\"KubeFimOperatorDown\",alertstate=\"firing\"}";
    assert_eq!(
        query(prom_port, down),
        None,
        "firing while the operator is up"
    );
    operator.kill();
    eventually(
        "KubeFimOperatorDown to fire once the operator is stopped",
        Duration::from_secs(60),
        || async {
            let firing = query(prom_port, down);
            if firing == Some(1.0) {
                Ok(())
            } else {
                Err(format!("{firing:?}"))
            }
        },
    )
    .await;
    fleet.cleanup().await;
}
