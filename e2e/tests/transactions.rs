//! One object per package transaction, end to end: a node root holding a
//! real dpkg database (the machine's own records of `gzip` and `hostname`
//! and their files), a real agent with a node-bound token, a real API server
//! and operator. An upgrade of every file of a package is ONE FileChange
//! listing each change with its before and after; a trojan slipped in during
//! the same window and a file no package owns stay FileChanges of their own.
//! The transaction is approved as a whole, then a second one path by path,
//! and the operator's verification of the node's chain and entry digests
//! finds no EvidenceGap.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube_fim_crds::{
    ApprovalOutcome, ChainVerification, FileChange, FileChangeStatus, FileIntegrityNode,
    PackageVerdict,
};
use kube_fim_e2e::fleet::{Fleet, describe, entry};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::packages::{install_dpkg, upgrade, version};
use kube_fim_e2e::{client, eventually, kubectl, unique_name, whoami};

const READY: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(60);
const OPERATOR: Duration = Duration::from_secs(300);

/// Keeps size and mtime, flips a byte: a careful trojan.
fn trojan(file: &Path) {
    let meta = std::fs::metadata(file).unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(file, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
}

fn items(c: &FileChange) -> Vec<String> {
    c.spec
        .package
        .as_ref()
        .and_then(|p| p.transaction.as_ref())
        .map(|t| t.changes.iter().map(|i| i.path.clone()).collect())
        .unwrap_or_default()
}

/// The transaction object of `node` whose package version is `version`.
async fn wait_transaction(fleet: &Fleet, node: &str, version: &str) -> FileChange {
    eventually(
        &format!("a transaction to {version} on {node}"),
        SEEN,
        || async {
            fleet
                .changes(node)
                .await
                .into_iter()
                .find(|c| {
                    c.spec
                        .package
                        .as_ref()
                        .is_some_and(|p| p.transaction.is_some() && p.version == version)
                })
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await
}

async fn wait_answer(client: &kube::Client, name: &str) -> FileChangeStatus {
    let api: Api<FileChange> = Api::all(client.clone());
    eventually(&format!("the agent's answer on {name}"), SEEN, || async {
        let c = api.get(name).await.map_err(|e| e.to_string())?;
        c.status
            .filter(|s| s.outcome.is_some())
            .ok_or_else(|| "no answer yet".to_string())
    })
    .await
}

async fn verification(client: &kube::Client, node: &str) -> Option<ChainVerification> {
    Api::<FileIntegrityNode>::all(client.clone())
        .get(node)
        .await
        .ok()
        .and_then(|n| n.status)
        .and_then(|s| s.verification)
}

/// The operator verified the node's chain through `through` and the
/// entry's digest `digest`, with no gap and nothing unexplained.
async fn wait_verified(
    client: &kube::Client,
    node: &str,
    policy: &str,
    through: u64,
    digest: &str,
) {
    eventually(
        &format!("{node} verified through {through} with digest {digest}"),
        OPERATOR,
        || async {
            let v = verification(client, node)
                .await
                .ok_or_else(|| "no verification yet".to_string())?;
            let ok = v.verified_through >= through
                && v.entries
                    .iter()
                    .any(|e| e.policy == policy && e.entry == "bin" && e.digest == digest);
            assert!(v.gaps.is_empty(), "evidence gaps: {v:?}");
            assert!(v.unexplained.is_empty(), "unexplained digest moves: {v:?}");
            ok.then_some(()).ok_or(format!("{v:?}"))
        },
    )
    .await;
}

async fn evidence_gaps(client: &kube::Client, node: &str) -> Vec<String> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("EvidenceGap")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node)
        })
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn a_package_upgrade_is_one_object_approvable_whole_or_by_path_and_a_trojan_stays_loud() {
    let client = client().await;
    let suite = unique_name("txn");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let node = fleet.nodes[0].name.clone();
    let root = fleet.nodes[0].root.clone();
    install_dpkg(&root, &["gzip", "hostname"]);
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/bin", true)]))
        .await;
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&node, &policy, READY).await;
    // Started once the node reports: its verification starts at the head
    // the node publishes then.
    let _operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let installed = version("gzip");

    // A file no package owns: an ordinary change (and the agent indexes the
    // package database, so it knows the versions before the upgrade).
    std::fs::write(root.join("bin/mine"), "#!/bin/sh\n").unwrap();
    let mine = eventually(
        "the unowned file, a FileChange of its own",
        SEEN,
        || async {
            fleet
                .changes(&node)
                .await
                .into_iter()
                .find(|c| describe(c) == "Added /bin/mine")
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await;
    assert_eq!(mine.spec.package, None);

    // The upgrade, and within its window a trojan of another package's
    // binary (its size and mtime kept).
    let files = upgrade(&root, "gzip", "99.0-1");
    assert!(files.len() >= 5, "gzip's files under /bin: {files:?}");
    trojan(&root.join("bin/hostname"));

    let txn = wait_transaction(&fleet, &node, "99.0-1").await;
    assert_eq!(items(&txn), files, "every file of the upgrade, once");
    let package = txn.spec.package.clone().unwrap();
    assert_eq!(package.verdict, PackageVerdict::Verified);
    assert_eq!(package.version_before.as_deref(), Some(installed.as_str()));
    let t = package.transaction.clone().unwrap();
    assert_eq!(
        t.summary,
        format!("gzip {installed}→99.0-1, {} files", files.len())
    );
    for i in &t.changes {
        let (b, a) = (i.before.as_ref().unwrap(), i.after.as_ref().unwrap());
        assert_ne!(b.hash, a.hash, "{}: before and after", i.path);
        assert_eq!(i.version, "99.0-1");
    }
    let trojaned = eventually("the trojan, a loud FileChange of its own", SEEN, || async {
        fleet
            .changes(&node)
            .await
            .into_iter()
            .find(|c| describe(c) == "Modified /bin/hostname")
            .ok_or_else(|| "none yet".to_string())
    })
    .await;
    assert_eq!(
        trojaned.spec.package.as_ref().map(|p| p.verdict),
        Some(PackageVerdict::Mismatch)
    );
    assert!(trojaned.spec.package.unwrap().transaction.is_none());
    // One object for the upgrade: no gzip file has a FileChange of its own.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let all = fleet.changes(&node).await;
    let own: Vec<String> = all
        .iter()
        .filter(|c| items(c).is_empty() && files.contains(&c.spec.path))
        .map(describe)
        .collect();
    assert!(
        own.is_empty(),
        "upgrade files reported on their own: {own:?}"
    );
    assert_eq!(
        all.len(),
        3,
        "{:?}",
        all.iter().map(describe).collect::<Vec<_>>()
    );
    let mut numbers: Vec<u64> = all.iter().filter_map(|c| c.spec.sequence).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), 3, "one number each: {numbers:?}");

    // `kubectl get fc` shows the transaction on one line.
    let run = kubectl(["get", "fc", &txn.name_any()]);
    assert!(run.success, "{}", run.stderr);
    let header = run.stdout.lines().next().unwrap_or_default();
    assert!(header.contains("TRANSACTION"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains(&format!("gzip {installed}→99.0-1, {} files", files.len())),
        "{}",
        run.stdout
    );

    // Approved as a whole: every change is the baseline, the digest moves
    // once through the answer, and the operator finds no gap.
    kube_fim_e2e::approve(&client, &txn.name_any(), "CHG-1")
        .await
        .unwrap();
    let answer = wait_answer(&client, &txn.name_any()).await;
    assert_eq!(answer.outcome, Some(ApprovalOutcome::Applied), "{answer:?}");
    let message = answer.message.clone().unwrap_or_default();
    assert!(
        message.contains(&format!("{} of {} changes", files.len(), files.len())),
        "{message}"
    );
    let moved = answer
        .entry_digests
        .iter()
        .find(|m| m.entry == "bin")
        .cloned()
        .unwrap_or_else(|| panic!("the answer moves the bin entry: {answer:?}"));
    assert_ne!(moved.before, moved.after);
    let head = numbers.last().copied().unwrap();
    wait_verified(&client, &node, &policy, head + 1, &moved.after).await;

    // A second upgrade, approved path by path: one path first; the others
    // come back as a new object, approved in turn.
    let files2 = upgrade(&root, "gzip", "99.1-1");
    let txn2 = wait_transaction(&fleet, &node, "99.1-1").await;
    assert_eq!(items(&txn2), files2);
    let first = files2[0].clone();
    // `kubectl fim approve --path`: a path the transaction does not list
    // approves nothing, and says so.
    let refused = kubectl_fim(&["approve", &txn2.name_any(), "--path", "/usr/bin/sudo"]);
    assert!(!refused.success, "{}", refused.stdout);
    assert!(
        refused.stderr.contains("lists no change of /usr/bin/sudo"),
        "{}",
        refused.stderr
    );
    let c = Api::<FileChange>::all(client.clone())
        .get(&txn2.name_any())
        .await
        .unwrap();
    assert!(c.approval().is_none(), "nothing approved");
    let run = kubectl_fim(&[
        "approve",
        &txn2.name_any(),
        "--path",
        &first,
        "--reason",
        "CHG-7",
    ]);
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stdout
            .contains(&format!("1 of its {} changes ({first})", files2.len())),
        "{}",
        run.stdout
    );
    let c = Api::<FileChange>::all(client.clone())
        .get(&txn2.name_any())
        .await
        .unwrap();
    let approval = c.approval().cloned().unwrap();
    assert_eq!(approval.paths, std::slice::from_ref(&first));
    assert_eq!(approval.approved_by, whoami(&client).await);
    let answer = wait_answer(&client, &txn2.name_any()).await;
    assert_eq!(answer.outcome, Some(ApprovalOutcome::Applied), "{answer:?}");
    let message = answer.message.clone().unwrap_or_default();
    assert!(
        message.contains(&format!("1 of {} changes", files2.len())),
        "{message}"
    );
    let rest = message
        .split("reported again as ")
        .nth(1)
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
        .unwrap_or_else(|| panic!("the answer names the object of the rest: {message}"));
    let step1 = answer.entry_digests[0].clone();
    let remainder = eventually("the changes left out, as a new object", SEEN, || async {
        Api::<FileChange>::all(client.clone())
            .get(&rest)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(items(&remainder), files2[1..].to_vec());
    assert!(remainder.approval().is_none());
    kube_fim_e2e::approve(&client, &rest, "CHG-8")
        .await
        .unwrap();
    let answer = wait_answer(&client, &rest).await;
    assert_eq!(answer.outcome, Some(ApprovalOutcome::Applied), "{answer:?}");
    let step2 = answer.entry_digests[0].clone();
    assert_eq!(step2.before, step1.after, "the moves chain");
    let head = fleet
        .changes(&node)
        .await
        .iter()
        .filter_map(|c| c.spec.sequence)
        .max()
        .unwrap();
    wait_verified(&client, &node, &policy, head + 1, &step2.after).await;
    assert!(
        evidence_gaps(&client, &node).await.is_empty(),
        "approving transactions is no evidence gap"
    );

    // The approved states are the baseline: a restart reports nothing new.
    let before = fleet.changes(&node).await.len();
    fleet.nodes[0].kill_agent();
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&node, &policy, READY).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = fleet.changes(&node).await;
    assert_eq!(
        after.len(),
        before,
        "{:?}",
        after.iter().map(describe).collect::<Vec<_>>()
    );
    fleet.cleanup().await;
}

/// A crash at the worst moment: the agent killed while it holds an open
/// transaction (changes detected, neither queued nor marked). At restart the
/// startup scan finds them again and they are reported, grouped: nothing
/// detected is lost.
#[tokio::test]
async fn an_agent_killed_during_a_transaction_window_loses_none_of_its_changes() {
    let client = client().await;
    let suite = unique_name("txnk");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let node = fleet.nodes[0].name.clone();
    let root = fleet.nodes[0].root.clone();
    install_dpkg(&root, &["gzip"]);
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/bin", true)]))
        .await;
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&node, &policy, READY).await;

    let files = upgrade(&root, "gzip", "99.0-1");
    // Within the window (5 s after the last write): detected and held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.nodes[0].kill_agent();
    assert!(
        fleet.changes(&node).await.is_empty(),
        "the window was still open when the agent died"
    );
    fleet.nodes[0].start_agent();
    let txn = wait_transaction(&fleet, &node, "99.0-1").await;
    assert_eq!(
        items(&txn),
        files,
        "every change of the upgrade after the crash"
    );
    assert_eq!(
        txn.spec.source,
        kube_fim_crds::DetectionSource::Startup,
        "found again by the startup scan"
    );
    fleet.cleanup().await;
}

/// Runs `kubectl fim ARGS` as the admin, with the plugin's directory first on PATH.
fn kubectl_fim(args: &[&str]) -> kube_fim_e2e::Run {
    let dir = kube_fim_e2e::binary("kubectl-fim")
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::process::Command::new("kubectl")
        .arg("fim")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", kube_fim_e2e::kubeconfig())
        .output()
        .expect("kubectl runs")
        .into()
}

/// The same upgrade on two nodes is one rollout of their transaction
/// objects, approved with one command; a node whose upgrade wrote other
/// content is its outlier and is not approved.
#[tokio::test]
async fn the_same_upgrade_on_two_nodes_is_one_rollout_of_transaction_objects() {
    use kube_fim_crds::rollout::Transition;
    let client = client().await;
    let suite = unique_name("txnr");
    let mut fleet = Fleet::new(client.clone(), &suite, 3).await;
    let policy = format!("{suite}-bin");
    let names: Vec<String> = fleet.nodes.iter().map(|n| n.name.clone()).collect();
    for n in &fleet.nodes {
        install_dpkg(&n.root, &["gzip"]);
    }
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/bin", true)]))
        .await;
    for n in &mut fleet.nodes {
        n.start_agent();
    }
    for n in &names {
        fleet.wait_ready(n, &policy, READY).await;
    }
    let _operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    for (i, to) in [(0, "99.0-1"), (1, "99.0-1"), (2, "99.0-2")] {
        upgrade(&fleet.nodes[i].root.clone(), "gzip", to);
    }
    let a = wait_transaction(&fleet, &names[0], "99.0-1").await;
    let b = wait_transaction(&fleet, &names[1], "99.0-1").await;
    let c = wait_transaction(&fleet, &names[2], "99.0-2").await;
    let id = Transition::of(&a.spec).unwrap().id();
    assert_eq!(Transition::of(&b.spec).unwrap().id(), id);
    assert_ne!(Transition::of(&c.spec).unwrap().id(), id);

    let listed = eventually("the rollout in kubectl fim rollouts", SEEN, || async {
        let run = kubectl_fim(&["rollouts", "--policy", &policy, "-o", "json"]);
        if !run.success {
            return Err(run.stderr);
        }
        let rows: serde_json::Value =
            serde_json::from_str(&run.stdout).map_err(|e| e.to_string())?;
        let row = rows
            .as_array()
            .and_then(|r| r.iter().find(|r| r["id"] == id.as_str()).cloned())
            .ok_or_else(|| run.stdout.clone())?;
        if row["outliers"] == serde_json::json!([names[2]]) {
            Ok(row)
        } else {
            Err(run.stdout)
        }
    })
    .await;
    assert_eq!(listed["nodes"], 2, "{listed}");

    let run = kubectl_fim(&["rollouts", "approve", &id, "--reason", "CHG-7"]);
    assert!(run.success, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("approved 2, skipped 0"),
        "{}",
        run.stdout
    );
    for fc in [&a, &b] {
        let answer = wait_answer(&client, &fc.name_any()).await;
        assert_eq!(answer.outcome, Some(ApprovalOutcome::Applied), "{answer:?}");
    }
    let c = Api::<FileChange>::all(client.clone())
        .get(&c.name_any())
        .await
        .unwrap();
    assert!(c.approval().is_none(), "the outlier is not approved");
    fleet.cleanup().await;
}
