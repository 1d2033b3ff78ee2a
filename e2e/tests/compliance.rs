//! Compliance references where auditors look, against the real API server:
//! real agents with node-bound tokens, the operator with its own
//! ServiceAccount, `kubectl get fc -l` and `kubectl fim report` as a user
//! runs them.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_fim_crds::compliance::ComplianceRef;
use kube_fim_crds::{ChangeCategory, FileChange, Preset};
use kube_fim_e2e::fleet::{Fleet, entry};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::{
    ChangeFixture, Run, binary, client, client_for, eventually, kubeconfig, kubectl, metric_where,
    node_bound_kubeconfig, unique_name,
};

/// Runs `kubectl fim ARGS` as the admin, with the plugin's directory first on PATH.
fn kubectl_fim(args: &[&str]) -> Run {
    let dir = binary("kubectl-fim").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("kubectl")
        .arg("fim")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .expect("kubectl runs")
        .into()
}

/// The names `kubectl get fc -l SELECTOR` lists.
fn listed(selector: &str) -> Result<Vec<String>, String> {
    let run = kubectl(["get", "fc", "-l", selector, "-o", "name"]);
    if !run.success {
        return Err(run.stderr);
    }
    Ok(run
        .stdout
        .lines()
        .map(|l| {
            l.trim_start_matches("filechange.fim.kube-fim.io/")
                .to_string()
        })
        .collect())
}

/// The control's row of `kubectl fim report -o json`.
fn report_control(framework: &str, control: &str) -> Result<serde_json::Value, String> {
    let run = kubectl_fim(&["report", "-o", "json"]);
    if !run.success {
        return Err(run.stderr);
    }
    let report: serde_json::Value = serde_json::from_str(&run.stdout).map_err(|e| e.to_string())?;
    report["compliance"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|r| r["framework"] == framework && r["control"] == control)
                .cloned()
        })
        .ok_or_else(|| format!("no {framework} {control} in {}", report["compliance"]))
}

fn names(row: &serde_json::Value) -> Vec<String> {
    row["evidence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// The change of `path` reported by `node`.
async fn change_of(fleet: &Fleet, node: &str, path: &str) -> Result<FileChange, String> {
    fleet
        .changes(node)
        .await
        .into_iter()
        .find(|c| c.spec.path == path)
        .ok_or_else(|| format!("no change of {path} on {node} yet"))
}

/// The operator's count of `policy`'s unacknowledged changes under PCI DSS
/// 4.0 `control`, once it is `want`.
async fn unacknowledged(
    operator: &Operator,
    policy: &str,
    control: &str,
    want: f64,
) -> Result<f64, String> {
    let text = operator.metrics().ok_or("no metrics yet")?;
    let v = metric_where(
        &text,
        "kube_fim_operator_compliance_unacknowledged_changes",
        &[
            ("policy", policy),
            ("framework", "pci-dss-4.0"),
            ("control", control),
        ],
    )
    .ok_or_else(|| format!("no series for {control} yet"))?;
    if v == want {
        Ok(v)
    } else {
        Err(format!("{v}, want {want}"))
    }
}

#[tokio::test]
async fn a_change_under_a_preset_is_labelled_counted_and_reported_under_its_controls_a_node_cannot_forge()
 {
    let client = client().await;
    let suite = unique_name("compliance");
    let mut fleet = Fleet::new(client.clone(), &suite, 2).await;
    let (a, b) = (fleet.nodes[0].name.clone(), fleet.nodes[1].name.clone());
    for n in &fleet.nodes {
        std::fs::create_dir_all(n.host("/srv/app")).unwrap();
        std::fs::write(n.host("/srv/app/app.yaml"), "v: 1\n").unwrap();
    }

    // The recommended preset (its entries: PCI DSS 4.0 11.5.2, CIS 1.3.2,
    // NIST SI-7), and an entry of the policy's own with a control of its own.
    let policy = format!("{suite}-p");
    let mut app = entry("app", "/srv/app", false);
    app.compliance = vec![ComplianceRef::new("pci-dss-4.0", "10.3.4")];
    let mut p = fleet.policy(&policy, vec![app]);
    p.spec.preset = Some(Preset::Recommended);
    fleet.create_policy(&p).await;
    for n in &mut fleet.nodes {
        n.start_agent();
    }
    for n in [&a, &b] {
        fleet.wait_ready(n, &policy, Duration::from_secs(90)).await;
    }

    // Root on node b cannot file anything under a control itself: its
    // agent's token may not set the compliance labels...
    let b_token = client_for(&node_bound_kubeconfig(&b)).await;
    let mut forged = ChangeFixture::new(&format!("{b}-990-forgedpci"), &b, &policy)
        .path("/srv/app/app.yaml")
        .category(ChangeCategory::Modified)
        .build();
    forged.spec.entry = "app".into();
    forged
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("compliance.kube-fim.io/pci-dss-4.0".into(), "11.5.2".into());
    let refused = Api::<FileChange>::all(b_token.clone())
        .create(&PostParams::default(), &forged)
        .await
        .expect_err("compliance labels from an agent's token");
    assert!(
        refused
            .to_string()
            .contains("may only set kube-fim's filter labels"),
        "{refused}"
    );
    // ...nor keep a change out of one by filing it under another entry: a
    // change of /usr/bin filed under `app` is still the usr-bin entry's.
    let mut misfiled = ChangeFixture::new(&format!("{b}-991-misfiled"), &b, &policy)
        .path("/usr/bin/tool")
        .category(ChangeCategory::Modified)
        .build();
    misfiled.spec.entry = "app".into();
    Api::<FileChange>::all(b_token)
        .create(&PostParams::default(), &misfiled)
        .await
        .expect("a node reports its own change");

    let operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);

    // A change under the preset's usr-bin entry on node a, and one under
    // the policy's own entry.
    std::fs::write(fleet.nodes[0].host("/usr/bin/evil"), "#!/bin/sh\nid\n").unwrap();
    std::fs::write(fleet.nodes[0].host("/srv/app/app.yaml"), "v: 2\n").unwrap();
    let evil = eventually(
        "the change of /usr/bin/evil",
        Duration::from_secs(60),
        || change_of(&fleet, &a, "/usr/bin/evil"),
    )
    .await;
    let app_change = eventually(
        "the change of /srv/app/app.yaml",
        Duration::from_secs(60),
        || change_of(&fleet, &a, "/srv/app/app.yaml"),
    )
    .await;
    assert_eq!(evil.spec.entry, "usr-bin");
    let (evil, app_change) = (evil.name_any(), app_change.name_any());

    // `kubectl get fc -l`: the operator labels each change with its
    // entry's controls.
    let policy_label = format!("fim.kube-fim.io/policy={policy}");
    let pci = format!("compliance.kube-fim.io/pci-dss-4.0=11.5.2,{policy_label}");
    let under_pci = eventually(
        "the 11.5.2 evidence in kubectl get fc -l",
        Duration::from_secs(60),
        || async {
            let names = listed(&pci)?;
            if names.contains(&evil) && names.contains(&format!("{b}-991-misfiled")) {
                Ok(names)
            } else {
                Err(format!("{names:?}"))
            }
        },
    )
    .await;
    assert!(!under_pci.contains(&app_change), "{under_pci:?}");
    for selector in [
        "compliance.kube-fim.io/cis-dil-2.0=1.3.2",
        "compliance.kube-fim.io/nist-800-53-r5=SI-7",
    ] {
        let names = listed(&format!("{selector},{policy_label}")).unwrap();
        assert!(names.contains(&evil), "{selector}: {names:?}");
    }
    let own = listed(&format!(
        "compliance.kube-fim.io/pci-dss-4.0=10.3.4,{policy_label}"
    ))
    .unwrap();
    assert_eq!(
        own,
        std::slice::from_ref(&app_change),
        "the entry's own control replaces the preset's"
    );

    // The metric, by framework and control, from the operator.
    eventually(
        "two changes unacknowledged under 11.5.2",
        Duration::from_secs(60),
        || unacknowledged(&operator, &policy, "11.5.2", 2.0),
    )
    .await;
    eventually("one under 10.3.4", Duration::from_secs(60), || {
        unacknowledged(&operator, &policy, "10.3.4", 1.0)
    })
    .await;

    // `kubectl fim report`: per control, its evidence.
    let row = eventually(
        "11.5.2 in kubectl fim report",
        Duration::from_secs(30),
        || async {
            let row = report_control("pci-dss-4.0", "11.5.2")?;
            if names(&row).contains(&evil) {
                Ok(row)
            } else {
                Err(row.to_string())
            }
        },
    )
    .await;
    assert!(!names(&row).contains(&app_change), "{row}");
    // The recommended preset's 18 entries (other tests' policies share the
    // cluster and may reference the same control).
    let ours = row["entries"].as_array().map(|entries| {
        entries
            .iter()
            .filter(|e| {
                e.as_str()
                    .is_some_and(|e| e.starts_with(&format!("{policy}/")))
            })
            .count()
    });
    assert_eq!(ours, Some(18), "{row}");
    let own = report_control("pci-dss-4.0", "10.3.4").unwrap();
    assert_eq!(names(&own), std::slice::from_ref(&app_change), "{own}");
    let text = kubectl_fim(&["report"]);
    assert!(text.success, "{}", text.stderr);
    let line = text
        .stdout
        .lines()
        .find(|l| l.starts_with("pci-dss-4.0") && l.contains("11.5.2"))
        .unwrap_or_else(|| panic!("a 11.5.2 line in\n{}", text.stdout));
    assert!(line.contains(&evil), "{line}");

    // A label is a filter: changing it moves no count and no report row.
    let relabel = serde_json::json!({"metadata": {"labels": {"compliance.kube-fim.io/pci-dss-4.0": "1.1.1"}}});
    Api::<FileChange>::all(client.clone())
        .patch(&evil, &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    assert!(names(&report_control("pci-dss-4.0", "11.5.2").unwrap()).contains(&evil));

    // Approved, it leaves the unacknowledged count of its controls.
    kube_fim_e2e::approve(&client, &evil, "CHG-11")
        .await
        .unwrap();
    kube_fim_e2e::approve(&client, &format!("{b}-991-misfiled"), "CHG-11")
        .await
        .unwrap();
    eventually(
        "none unacknowledged under 11.5.2",
        Duration::from_secs(60),
        || unacknowledged(&operator, &policy, "11.5.2", 0.0),
    )
    .await;
    let row = report_control("pci-dss-4.0", "11.5.2").unwrap();
    assert!(row["approved"].as_u64() >= Some(2), "{row}");

    drop(operator);
    fleet.cleanup().await;
}
