//! `kubectl fim` (the kubectl-fim plugin found on PATH) against the real API server.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube_fim_crds::{
    ChangeCategory, FileChange, FileIntegrityNode, FileIntegrityNodeSpec, FileIntegrityNodeStatus,
    FileIntegrityPolicy, NodePolicyPhase, NodePolicyStatus,
};
use kube_fim_e2e::operator::{Operator, SUITE_LABEL};
use kube_fim_e2e::{
    ChangeFixture, Entry, Policy, Run, binary, client, ensure_crds, eventually, kubeconfig,
    unique_name,
};

/// Runs `kubectl fim ARGS`, with the plugin's directory first on PATH.
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

#[tokio::test]
async fn summary_export_approve_and_status() {
    ensure_crds();
    let client = client().await;
    let suite = unique_name("plugin");
    let (n1, n2, policy) = (
        format!("{suite}-n1"),
        format!("{suite}-n2"),
        format!("{suite}-p"),
    );
    let api: Api<FileChange> = Api::all(client.clone());
    for (i, (node, path, cat)) in [
        (&n1, "/etc/passwd", ChangeCategory::Modified),
        (&n1, "/etc/new,file.conf", ChangeCategory::Added),
        (&n1, "/etc/old", ChangeCategory::Removed),
        (&n2, "/etc/hosts", ChangeCategory::Modified),
    ]
    .into_iter()
    .enumerate()
    {
        api.create(
            &PostParams::default(),
            &ChangeFixture::new(&format!("{suite}-{i}"), node, &policy)
                .path(path)
                .category(cat)
                .build(),
        )
        .await
        .unwrap();
    }

    // summary: one row per node with counts by category.
    let run = kubectl_fim(&["summary", "--since", "1d"]);
    assert!(run.success, "{}", run.stderr);
    let row = |node: &str| -> Vec<String> {
        run.stdout
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("{node} in\n{}", run.stdout))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(row(&n1)[1..], ["1", "1", "1", "3", "3"]);
    assert_eq!(row(&n2)[1..], ["0", "1", "0", "1", "1"]);

    // export: CSV with a header, one record per change, commas quoted.
    let run = kubectl_fim(&["export", "--since", "14d", "--format", "csv"]);
    assert!(run.success, "{}", run.stderr);
    let mut lines = run.stdout.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("detected,node,policy,entry,category,path")
    );
    let ours: Vec<&str> = lines.filter(|l| l.contains(&suite)).collect();
    assert_eq!(ours.len(), 4, "{ours:?}");
    assert!(
        ours.iter().any(|l| l.contains("\"/etc/new,file.conf\"")),
        "{ours:?}"
    );
    // JSON lines of whole objects: the archive reads back as FileChanges.
    let run = kubectl_fim(&["export", "--format", "json"]);
    let records: Vec<FileChange> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let archived: Vec<&FileChange> = records.iter().filter(|r| r.spec.node == n2).collect();
    assert_eq!(archived.len(), 1);
    assert_eq!(
        archived[0].spec,
        api.get(&format!("{suite}-3")).await.unwrap().spec
    );

    // OCSF, ECS, CEF: the events a FileChangeSink delivers, one per line.
    let run = kubectl_fim(&["export", "--format", "ocsf"]);
    assert!(run.success, "{}", run.stderr);
    let ours: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["device"]["hostname"] == n2.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{}", run.stdout);
    assert_eq!(ours[0]["class_uid"], 1001);
    assert_eq!(ours[0]["metadata"]["uid"], format!("{suite}-3").as_str());
    assert_eq!(ours[0]["file"]["path"], "/etc/hosts");
    let run = kubectl_fim(&["export", "--format", "cef"]);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("CEF:0|kube-fim|") && l.contains(&format!("{suite}-3"))),
        "{}",
        run.stdout
    );

    // approve: by name (recorded as the approving user, with the reason),
    // then everything of a node.
    let run = kubectl_fim(&["approve", &format!("{suite}-3"), "--reason", "CHG-1234"]);
    assert!(run.success, "{}", run.stderr);
    let approval = api
        .get(&format!("{suite}-3"))
        .await
        .unwrap()
        .approval()
        .cloned()
        .expect("an approval");
    assert_eq!(approval.approved_by, kube_fim_e2e::whoami(&client).await);
    assert_eq!(approval.reason.as_deref(), Some("CHG-1234"));
    let run = kubectl_fim(&["approve", &format!("{suite}-3"), "--reason", "other"]);
    assert!(
        run.success && run.stdout.contains("already approved by"),
        "approving twice rewrites nothing: {} {}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        api.get(&format!("{suite}-3")).await.unwrap().approval(),
        Some(&approval)
    );
    let run = kubectl_fim(&["approve", "--node", &n1]);
    assert!(run.success, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 3, "{}", run.stdout);
    let run = kubectl_fim(&["summary", "--since", "1d"]);
    assert_eq!(
        row_of(&run.stdout, &n1)[5],
        "0",
        "nothing unapproved left on n1"
    );
    let run = kubectl_fim(&["approve"]);
    assert!(
        !run.success && run.stderr.contains("nothing to approve"),
        "{}",
        run.stderr
    );

    // status: a node's record with a failed policy shows as a problem.
    let records: Api<FileIntegrityNode> = Api::all(client.clone());
    records
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&n1, FileIntegrityNodeSpec { node: n1.clone() }),
        )
        .await
        .unwrap();
    let status = FileIntegrityNodeStatus {
        heartbeat_time: Some(Time(Timestamp::now())),
        policy_count: Some(1),
        files_monitored: Some(42),
        queue_length: Some(7),
        policies: vec![NodePolicyStatus {
            policy: policy.clone(),
            phase: NodePolicyPhase::Failed,
            message: Some("baseline tampered".into()),
            ..NodePolicyStatus::default()
        }],
        ..FileIntegrityNodeStatus::default()
    };
    records
        .patch_status(
            &n1,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": status})),
        )
        .await
        .unwrap();
    let run = kubectl_fim(&["status"]);
    assert!(run.success, "{}", run.stderr);
    let node_row = row_of(&run.stdout, &n1);
    assert_eq!(node_row[1..4], ["1", "42", "7"], "{}", run.stdout);
    assert!(run.stdout.contains("baseline tampered"), "{}", run.stdout);
    assert!(run.stdout.lines().next().unwrap().starts_with("POLICY"));

    // report: the auditor's document, from the same objects.
    let run = kubectl_fim(&["report", "--since", "1d", "-o", "json"]);
    assert!(run.success, "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let node = |name: &str| {
        report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {report}"))
    };
    let r1 = node(&n1);
    assert_eq!(
        (r1["changes"].as_u64(), r1["approved"].as_u64()),
        (Some(3), Some(3))
    );
    // Its policy never completed a full comparison: the weekly check fails.
    assert_eq!(r1["weeklyComparison"], false);
    assert_eq!(
        r1["policies"][0]["lastFullComparison"],
        serde_json::Value::Null
    );
    assert_eq!(report["passed"], false);
    let approval = report["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["change"] == format!("{suite}-3").as_str())
        .cloned()
        .expect("the approval of n2's change");
    assert_eq!(
        approval["approvedBy"],
        kube_fim_e2e::whoami(&client).await.as_str()
    );
    assert_eq!(approval["reason"], "CHG-1234");
    let run = kubectl_fim(&["report", "--since", "1d"]);
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("PCI DSS 11.5.2"), "{}", run.stdout);
    assert_eq!(
        row_of(&run.stdout, &n1).last().map(String::as_str),
        Some("no")
    );

    // A change storm: more changes of one entry detected within a minute
    // than the policy's cap, two hours ago. The operator finds it in the
    // FileChanges and records it on the node's FileIntegrityNode; the report
    // lists it under its node, and only for a period it overlaps.
    let n3 = format!("{suite}-n3");
    // A Node, or the operator takes its record for a node gone and deletes it.
    kube_fim_e2e::create_node(&client, &n3, &[]).await;
    records
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&n3, FileIntegrityNodeSpec { node: n3.clone() }),
        )
        .await
        .unwrap();
    let _operator = Operator::start(&suite, &suite, &[]);
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    policies
        .create(
            &PostParams::default(),
            &Policy::named(&policy)
                .label(SUITE_LABEL, &suite)
                .node_selector("role", &suite)
                .path(Entry::new("etc", "/etc").recursive())
                .max_changes_per_node_per_minute(5)
                .build(),
        )
        .await
        .unwrap();
    // The operator counts a storm against the cap of a policy it knows.
    eventually(
        "the operator to serve the policy",
        Duration::from_secs(60),
        || async {
            let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
            p.status
                .filter(|s| !s.conditions.is_empty())
                .map(|_| ())
                .ok_or_else(|| "no status yet".to_string())
        },
    )
    .await;
    let start = Timestamp::from_second(Timestamp::now().as_second() - 7200).unwrap();
    for i in 0..6 {
        let mut fc = ChangeFixture::new(&format!("{suite}-storm-{i}"), &n3, &policy)
            .path(&format!("/etc/storm-{i}"))
            .build();
        fc.spec.detected_time = MicroTime(start + Duration::from_secs(i));
        api.create(&PostParams::default(), &fc).await.unwrap();
    }
    eventually(
        "the storm recorded on the node",
        Duration::from_secs(60),
        || async {
            let r = records.get(&n3).await.map_err(|e| e.to_string())?;
            let storms = r.status.unwrap_or_default().storms;
            storms
                .iter()
                .any(|s| s.count == 6)
                .then_some(())
                .ok_or_else(|| format!("{storms:?}"))
        },
    )
    .await;
    let run = kubectl_fim(&["report", "--since", "1d", "-o", "json"]);
    assert!(run.success, "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let storms = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == n3.as_str())
        .map(|n| n["storms"].clone())
        .unwrap_or_else(|| panic!("{n3} in {report}"));
    assert_eq!(
        storms,
        serde_json::json!([{
            "id": format!("{n3}/storm/{policy}/etc/{}", start.as_second()),
            "policy": policy,
            "entry": "etc",
            "since": start.to_string(),
            "last": (start + Duration::from_secs(5)).to_string(),
            "count": 6,
            "cap": 5,
        }])
    );
    assert!(
        report["summary"]["changeStorms"].as_u64() >= Some(1),
        "{}",
        report["summary"]
    );
    let run = kubectl_fim(&["report", "--since", "1d"]);
    assert!(run.success, "{}", run.stderr);
    let storm_row: Vec<String> = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&n3) && l.contains(&policy))
        .unwrap_or_else(|| panic!("a storm row of {n3} in\n{}", run.stdout))
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        storm_row,
        [
            n3.clone(),
            policy.clone(),
            "etc".into(),
            start.to_string(),
            (start + Duration::from_secs(5)).to_string(),
            "6".into(),
            "5".into()
        ]
    );
    assert!(
        run.stdout.lines().any(|l| l.starts_with("Period from")
            && !l.ends_with("change storms 0")
            && l.contains("change storms")),
        "{}",
        run.stdout
    );
    // The last hour's report: the storm ended before it began.
    let run = kubectl_fim(&["report", "--since", "1h", "-o", "json"]);
    assert!(run.success, "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let ours = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == n3.as_str())
        .unwrap_or_else(|| panic!("{n3} in {report}"));
    assert_eq!(ours["storms"], serde_json::json!([]), "{ours}");
    policies
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
    kube_fim_e2e::delete_node(&client, &n3).await;
}

fn row_of(text: &str, first: &str) -> Vec<String> {
    text.lines()
        .find(|l| l.starts_with(first))
        .unwrap_or_else(|| panic!("{first} in\n{text}"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Runs `kubectl fim ARGS` with `KUBECONFIG` pointing at `kubeconfig`.
fn kubectl_fim_with(kubeconfig: &std::path::Path, args: &[&str]) -> Run {
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
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl runs")
        .into()
}

/// `kubectl fim` takes kubectl's connection flags and `-o`, sizes its tables
/// from their content, and never writes a file name's control characters raw
/// (nor a CSV cell a spreadsheet would run) — against the real API server.
#[tokio::test]
async fn kubectl_shaped_flags_outputs_and_escaping() {
    ensure_crds();
    let client = client().await;
    let suite = unique_name("plugin-k");
    let long_node = format!("{suite}-{}", "n".repeat(253 - suite.len() - 1));
    assert_eq!(long_node.len(), 253);
    let short_node = format!("{suite}-s");
    let policy = format!("{suite}-p");
    let api: Api<FileChange> = Api::all(client.clone());
    let evil_path = "/tmp/\x1b]0;pwned\x07\x1b[2Jx";
    for (i, (node, path)) in [
        (&long_node, "/etc/passwd"),
        (&short_node, evil_path),
        (&short_node, "/etc/hosts"),
    ]
    .into_iter()
    .enumerate()
    {
        api.create(
            &PostParams::default(),
            &ChangeFixture::new(&format!("{suite}-{i}"), node, &policy)
                .path(path)
                .build(),
        )
        .await
        .unwrap();
    }

    // Tables: the 253-character name whole, every row's last column ending
    // where its header ends.
    let run = kubectl_fim(&["summary", "--since", "1d"]);
    assert!(run.success, "{}", run.stderr);
    let header = run.stdout.lines().find(|l| l.starts_with("NODE")).unwrap();
    for node in [&long_node, &short_node] {
        let row = run
            .stdout
            .lines()
            .find(|l| l.starts_with(node.as_str()))
            .unwrap_or_else(|| panic!("{node} in\n{}", run.stdout));
        assert_eq!(row.len(), header.len(), "{}", run.stdout);
    }
    assert_eq!(row_of(&run.stdout, &long_node)[0], long_node);

    // -o json, yaml and wide.
    let run = kubectl_fim(&["summary", "--since", "1d", "-o", "json"]);
    assert!(run.success, "{}", run.stderr);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let ours = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == short_node.as_str())
        .unwrap();
    assert_eq!(ours["modified"], 2);
    assert_eq!(ours["unapproved"], 2);
    let run = kubectl_fim(&["summary", "--since", "1d", "-o", "yaml"]);
    assert!(run.success, "{}", run.stderr);
    let yaml: serde_json::Value = serde_saphyr::from_str(&run.stdout).unwrap();
    assert_eq!(yaml, json, "-o yaml is the same data");
    let run = kubectl_fim(&["summary", "--since", "1d", "-o", "wide"]);
    assert!(run.stdout.contains("LAST CHANGE"), "{}", run.stdout);
    let run = kubectl_fim(&["status", "-o", "json"]);
    assert!(run.success, "{}", run.stderr);
    let status: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(status["policies"].is_array() && status["nodes"].is_array());

    // A file name's escape sequences reach no terminal and no spreadsheet.
    let evil = format!("{suite}-1");
    let run = kubectl_fim(&[
        "approve",
        &evil,
        "--reason",
        "=HYPERLINK(\"http://x\",\"y\")",
    ]);
    assert!(run.success, "{}", run.stderr);
    assert!(!run.stdout.contains('\x1b'), "{:?}", run.stdout);
    assert!(
        run.stdout.contains("/tmp/\\x1b]0;pwned\\x07\\x1b[2Jx"),
        "{}",
        run.stdout
    );
    let run = kubectl_fim(&["export", "--since", "1d", "--format", "csv"]);
    assert!(run.success, "{}", run.stderr);
    let line = run.stdout.lines().find(|l| l.contains(&evil)).unwrap();
    assert!(!line.contains('\x1b'), "{line:?}");
    assert!(
        line.contains(",\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\","),
        "the reason is text, not a formula: {line}"
    );
    // The JSON export keeps the exact name (escaped the JSON way).
    let run = kubectl_fim(&["export", "--since", "1d", "--format", "json"]);
    let record: FileChange = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<FileChange>(l).unwrap())
        .find(|c| c.metadata.name.as_deref() == Some(evil.as_str()))
        .unwrap();
    assert_eq!(record.spec.path, evil_path);
    assert!(!run.stdout.contains('\x1b'));

    // --kubeconfig and --context: a kubeconfig whose current context is a
    // dead server; KUBECONFIG points nowhere.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("config");
    std::fs::copy(kubeconfig(), &copy).unwrap();
    let config = |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("config")
            .args(args)
            .env("KUBECONFIG", &copy)
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl config {args:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let good = config(&["current-context"]);
    let user = config(&["view", "-o", "jsonpath={.contexts[0].context.user}"]);
    config(&["set-cluster", "dead", "--server=https://127.0.0.1:1"]);
    config(&[
        "set-context",
        "dead",
        "--cluster=dead",
        &format!("--user={user}"),
    ]);
    config(&["use-context", "dead"]);
    let nowhere = dir.path().join("missing");
    let copy_str = copy.to_str().unwrap();
    let run = kubectl_fim_with(&nowhere, &["status", "--kubeconfig", copy_str]);
    assert!(!run.success, "the dead current context answered");
    let run = kubectl_fim_with(
        &nowhere,
        &["status", "--kubeconfig", copy_str, "--context", &good],
    );
    assert!(run.success, "--context {good}: {}", run.stderr);
    let run = kubectl_fim_with(
        &nowhere,
        &["status", "--kubeconfig", copy_str, "--context", "nope"],
    );
    assert!(
        !run.success && run.stderr.contains("\"nope\""),
        "{}",
        run.stderr
    );

    // --as / --as-group: the API server sees the impersonated user, who is
    // the approver on record.
    let run = kubectl_fim(&["status", "--as", "nobody-at-all"]);
    assert!(!run.success, "an unprivileged user listed policies");
    assert!(run.stderr.contains("nobody-at-all"), "{}", run.stderr);
    let target = format!("{suite}-2");
    let run = kubectl_fim(&[
        "approve",
        &target,
        "--as",
        "alice",
        "--as-group",
        "system:masters",
    ]);
    assert!(run.success, "{}", run.stderr);
    let approval = api.get(&target).await.unwrap();
    assert_eq!(approval.approval().unwrap().approved_by, "alice");
    let run = kubectl_fim(&["status", "--as-group", "system:masters"]);
    assert!(
        !run.success && run.stderr.contains("--as-group needs --as"),
        "{}",
        run.stderr
    );

    // Completion scripts for kubectl-fim.
    let run = kubectl_fim(&["completion", "bash"]);
    assert!(
        run.success && run.stdout.contains("kubectl-fim"),
        "{}",
        run.stderr
    );
}
