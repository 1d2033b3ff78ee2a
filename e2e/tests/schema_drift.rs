//! A policy stored under an older, looser CRD schema is invalid by today's
//! rules. The operator must say so (Degraded condition, Warning Event), keep it
//! out of the agent DaemonSet, and keep running.
//!
//! This file changes the installed CRD for a moment, so it is a test binary of
//! its own: cargo runs test binaries one after another.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams};
use kube_fim_crds::FileIntegrityPolicy;
use kube_fim_e2e::operator::SUITE_LABEL;
use kube_fim_e2e::{
    Entry, Policy, Process, binary, client, ensure_crds, eventually, free_port, http_get,
    kubectl_stdin, metric, repo_root, service_account_kubeconfig, unique_name,
};

const CRD_FILE: &str = "crds/fim.kube-fim.io_fileintegritypolicies.yaml";

fn strip_validations(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("x-kubernetes-validations");
            for (_, v) in map.iter_mut() {
                strip_validations(v);
            }
        }
        serde_json::Value::Array(seq) => seq.iter_mut().for_each(strip_validations),
        _ => {}
    }
}

fn apply_crd(text: &str) {
    let run = kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kube-fim-e2e",
            "-f",
            "-",
        ],
        text,
    );
    assert!(run.success, "applying the CRD: {}", run.stderr);
}

/// Puts the committed CRD back however the test ends.
struct RestoreCrd(String);

impl Drop for RestoreCrd {
    fn drop(&mut self) {
        apply_crd(&self.0);
    }
}

#[tokio::test]
async fn a_policy_invalid_under_the_current_schema_degrades_without_a_crash_loop() {
    ensure_crds();
    let client = client().await;
    let committed = std::fs::read_to_string(repo_root().join(CRD_FILE)).unwrap();
    let suite = unique_name("drift");
    let name = format!("{suite}-old");
    // A relative path: refused by today's CEL rules.
    let bad = |name: &str| {
        Policy::named(name)
            .label(SUITE_LABEL, &suite)
            .path(Entry::new("passwd", "etc/passwd"))
            .yaml()
    };
    {
        // An "older" schema without the CEL rules accepts the relative path...
        let restore = RestoreCrd(committed.clone());
        let mut loose: serde_json::Value = serde_saphyr::from_str(&committed).unwrap();
        strip_validations(&mut loose);
        apply_crd(&serde_saphyr::to_string(&loose).unwrap());
        eventually(
            "the loose schema in effect",
            Duration::from_secs(20),
            || async {
                let run = kubectl_stdin(&["apply", "-f", "-"], &bad(&name));
                if run.success { Ok(()) } else { Err(run.stderr) }
            },
        )
        .await;
        drop(restore);
    }
    // ...and today's schema would refuse it.
    let run = kubectl_stdin(
        &["apply", "--dry-run=server", "-f", "-"],
        &bad(&format!("{name}-new")),
    );
    assert!(
        !run.success && run.stderr.contains("spec.paths[0].path"),
        "{}",
        run.stderr
    );

    let port = free_port();
    let daemonset = unique_name("agent");
    let mut op = Process::start(
        &suite,
        &binary("kube-fim-operator"),
        &[
            "--namespace=kube-fim".to_string(),
            format!("--daemonset-name={daemonset}"),
            format!("--policy-selector=e2e.kube-fim.io/suite={suite}"),
            format!("--metrics-addr=127.0.0.1:{port}"),
            format!("--lease-name={}", unique_name("lease")),
            "--lease-duration=4".to_string(),
            "--resync=2s".to_string(),
        ],
        &service_account_kubeconfig("kube-fim-operator"),
    );

    let api: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let policy = eventually(
        "Degraded/InvalidPolicy",
        Duration::from_secs(30),
        || async {
            let p = api.get(&name).await.map_err(|e| e.to_string())?;
            let conds: BTreeMap<String, (String, String)> = p
                .status
                .clone()
                .unwrap_or_default()
                .conditions
                .into_iter()
                .map(|c| (c.type_, (c.status, c.reason)))
                .collect();
            match conds.get("Degraded") {
                Some((s, r)) if s == "True" && r == "InvalidPolicy" => Ok(p),
                _ => Err(format!("{conds:?}")),
            }
        },
    )
    .await;
    let degraded = policy
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert!(
        degraded.message.contains("spec.paths[0].path"),
        "{}",
        degraded.message
    );
    assert!(
        degraded.message.contains("absolute"),
        "{}",
        degraded.message
    );

    eventually(
        "an InvalidPolicy Warning event",
        Duration::from_secs(30),
        || async {
            let events = Api::<Event>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            events
                .items
                .into_iter()
                .find(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                        && e.reason.as_deref() == Some("InvalidPolicy")
                })
                .filter(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.note
                            .as_deref()
                            .unwrap_or("")
                            .contains("spec.paths[0].path")
                })
                .ok_or_else(|| "no event yet".to_string())
        },
    )
    .await;

    // No agent is deployed for it, the operator keeps running and says what it saw.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ds = Api::<DaemonSet>::namespaced(client.clone(), "kube-fim")
        .get_opt(&daemonset)
        .await
        .unwrap();
    assert!(ds.is_none(), "an invalid policy gets no agents");
    assert!(op.running(), "operator running:\n{}", op.log());
    let text = http_get(port, "/metrics").unwrap();
    assert_eq!(
        metric(&text, "kube_fim_operator_policies{state=\"invalid\"}"),
        Some(1.0),
        "{text}"
    );
    api.delete(&name, &DeleteParams::default()).await.unwrap();
}
