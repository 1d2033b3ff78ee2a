//! Package-verified changes end to end: a node root holding a real dpkg
//! database (the machine's own records of a few packages and their files),
//! a real agent with a node-bound token, a real API server and operator.
//! An upgrade's content is Verified and recorded without waiting for
//! approval; a trojan that keeps its package's size and mtime is a Mismatch,
//! loud; a file no package owns is an ordinary change.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube_fim_crds::labels;
use kube_fim_crds::{
    ChangeCategory, FileChange, FileIntegrityPolicy, PackageManager, PackageVerdict,
};
use kube_fim_e2e::fleet::{Fleet, describe, entry};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::packages::{RPM_TOOL, install_dpkg, install_rpm, md5sums_in, version};
use kube_fim_e2e::{
    client, client_for, eventually, file_change, metric_where, node_bound_kubeconfig, unique_name,
};

const READY: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(30);
const OPERATOR: Duration = Duration::from_secs(120);

/// The `n`th FileChange (by sequence) of `node` described as `want`.
async fn wait_nth(fleet: &Fleet, node: &str, want: &str, n: usize) -> FileChange {
    eventually(&format!("{want} (#{n}) on {node}"), SEEN, || async {
        let mut changes: Vec<FileChange> = fleet
            .changes(node)
            .await
            .into_iter()
            .filter(|c| describe(c) == want)
            .collect();
        changes.sort_by_key(|c| c.spec.sequence);
        changes
            .get(n)
            .cloned()
            .ok_or_else(|| format!("{} so far", changes.len()))
    })
    .await
}

/// Keeps size and mtime, flips a byte: a careful trojan.
fn trojan(file: &std::path::Path) {
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

#[tokio::test]
async fn package_verified_changes_are_recorded_and_a_trojan_is_loud() {
    let client = client().await;
    let suite = unique_name("pkg");
    let _operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let node = fleet.nodes[0].name.clone();
    let root = fleet.nodes[0].root.clone();
    install_dpkg(&root, &["hostname"]);
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/bin", true)]))
        .await;
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&node, &policy, READY).await;
    let installed = version("hostname");
    let binary = root.join("bin/hostname");
    let original = std::fs::read(&binary).unwrap();

    // (b) A trojan with the package's size and mtime: a Mismatch, loud.
    trojan(&binary);
    let c = wait_nth(&fleet, &node, "Modified /bin/hostname", 0).await;
    let check = c
        .spec
        .package
        .clone()
        .expect("a package owns /bin/hostname");
    assert_eq!(check.verdict, PackageVerdict::Mismatch, "{check:?}");
    assert_eq!(check.manager, PackageManager::Dpkg);
    assert_eq!(
        (check.name.as_str(), check.version.as_str()),
        ("hostname", installed.as_str())
    );
    assert_eq!(
        c.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::PACKAGE))
            .map(String::as_str),
        Some("Mismatch")
    );
    let fc_name = c.metadata.name.clone().unwrap();
    eventually("a PackageMismatch Warning Event", SEEN, || async {
        let events = Api::<Event>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        events
            .items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("PackageMismatch")
                    && e.type_.as_deref() == Some("Warning")
                    && e.related.as_ref().and_then(|r| r.name.as_deref()) == Some(fc_name.as_str())
            })
            .map(|_| ())
            .ok_or_else(|| "none yet".to_string())
    })
    .await;
    eventually("the mismatch counted", SEEN, || async {
        let text = fleet.nodes[0].metrics().ok_or("no metrics")?;
        let n = metric_where(
            &text,
            "kube_fim_agent_package_checks_total",
            &[("verdict", "Mismatch"), ("manager", "dpkg")],
        );
        (n == Some(1.0))
            .then_some(())
            .ok_or_else(|| format!("{n:?}"))
    })
    .await;

    // (a) The package's content back: Verified.
    std::fs::write(&binary, &original).unwrap();
    let c = wait_nth(&fleet, &node, "Modified /bin/hostname", 1).await;
    let check = c.spec.package.clone().expect("verified");
    assert_eq!(check.verdict, PackageVerdict::Verified, "{check:?}");
    assert_eq!(check.version, installed);

    // (a) An upgrade: the new version's records first, as dpkg writes them
    // before it renames the new files in, then the new content.
    let mut upgraded = original.clone();
    upgraded.extend_from_slice(b"\n# rebuilt\n");
    let info = root.join("var/lib/dpkg/info");
    let sums = md5sums_in(&info, "hostname");
    let digest = md5_of(&upgraded);
    let text: String = std::fs::read_to_string(&sums)
        .unwrap()
        .lines()
        .map(|l| match l.split_once("  ") {
            Some((_, "bin/hostname")) => format!("{digest}  bin/hostname\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let tmp = sums.with_extension("dpkg-new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &sums).unwrap();
    let status = root.join("var/lib/dpkg/status");
    let s = std::fs::read_to_string(&status)
        .unwrap()
        .replace(&format!("Version: {installed}\n"), "Version: 99.0-1\n");
    std::fs::write(&status, s).unwrap();
    let new = root.join("bin/hostname.dpkg-new");
    std::fs::write(&new, &upgraded).unwrap();
    std::fs::rename(&new, &binary).unwrap();
    let c = wait_nth(&fleet, &node, "Modified /bin/hostname", 2).await;
    let check = c.spec.package.clone().expect("verified");
    assert_eq!(check.verdict, PackageVerdict::Verified, "{check:?}");
    assert_eq!(check.version, "99.0-1");
    assert_eq!(check.version_before.as_deref(), Some(installed.as_str()));

    // (c) A file no package owns: an ordinary change.
    std::fs::write(root.join("bin/mine"), "#!/bin/sh\n").unwrap();
    let c = wait_nth(&fleet, &node, "Added /bin/mine", 0).await;
    assert_eq!(c.spec.category, ChangeCategory::Added);
    assert_eq!(c.spec.package, None);

    // Under the default (Record) the two verified changes wait for nobody:
    // the mismatch and the unowned file do.
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    eventually("the policy's counts", OPERATOR, || async {
        let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        let got = (s.changes_last24h, s.unacknowledged_changes);
        (got == (Some(4), Some(2)))
            .then_some(())
            .ok_or_else(|| format!("(last 24h, unacknowledged) = {got:?}"))
    })
    .await;
    fleet.cleanup().await;
}

/// The same on a node whose packages are rpm's (SQLite rpmdb made by `rpm
/// --initdb` and `rpm -i --justdb` of a package `rpmbuild` built): a
/// replaced file is a Mismatch, the package's content back is Verified.
#[tokio::test]
async fn an_rpm_node_verifies_its_packaged_files() {
    let client = client().await;
    let suite = unique_name("pkgr");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let node = fleet.nodes[0].name.clone();
    let root = fleet.nodes[0].root.clone();
    install_rpm(&root);
    let policy = format!("{suite}-usr-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("usr-bin", "/usr/bin", true)]))
        .await;
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&node, &policy, READY).await;
    let tool = root.join("usr/bin/kfim-tool");

    trojan(&tool);
    let c = wait_nth(&fleet, &node, "Modified /usr/bin/kfim-tool", 0).await;
    let check = c.spec.package.clone().expect("kfim-tool owns it");
    assert_eq!(check.manager, PackageManager::Rpm);
    assert_eq!(
        (check.name.as_str(), check.version.as_str()),
        ("kfim-tool", "1:1.2-3")
    );
    assert_eq!(check.verdict, PackageVerdict::Mismatch);

    std::fs::write(&tool, RPM_TOOL).unwrap();
    let c = wait_nth(&fleet, &node, "Modified /usr/bin/kfim-tool", 1).await;
    assert_eq!(
        c.spec.package.map(|p| p.verdict),
        Some(PackageVerdict::Verified)
    );
    // The fleet's own /usr/bin/tool belongs to no package.
    std::fs::write(root.join("usr/bin/tool"), "#!/bin/sh\necho changed\n").unwrap();
    let c = wait_nth(&fleet, &node, "Modified /usr/bin/tool", 0).await;
    assert_eq!(c.spec.package, None);
    fleet.cleanup().await;
}

/// The package label is a filter of what the spec says: an agent's token
/// cannot label a Mismatch `Verified` (what `kubectl get fc -l
/// fim.kube-fim.io/package=Mismatch` would then miss), nor label a change
/// that carries no verdict.
#[tokio::test]
async fn an_agent_cannot_label_a_change_with_another_verdict() {
    let client = client().await;
    let suite = unique_name("pkgl");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let node = fleet.nodes[0].name.clone();
    let agent = client_for(&node_bound_kubeconfig(&node)).await;
    let changes: Api<FileChange> = Api::all(agent);
    let pp = PostParams::default();
    let checked = |name: &str, verdict: PackageVerdict, label: Option<&str>| {
        let mut fc = file_change(&format!("{node}-{name}"), &node, "p");
        fc.spec.package = Some(kube_fim_crds::PackageCheck {
            manager: PackageManager::Dpkg,
            name: "sudo".into(),
            version: "1.9.13p3-1+deb12u1".into(),
            version_before: None,
            verdict,
            transaction: None,
        });
        if let Some(l) = label {
            fc.labels_mut().insert(labels::PACKAGE.into(), l.into());
        }
        fc
    };
    let refused = |r: Result<FileChange, kube::Error>| match r {
        Err(kube::Error::Api(e)) if e.code == 403 => e.message,
        other => panic!("not refused: {other:?}"),
    };
    let message = refused(
        changes
            .create(
                &pp,
                &checked("1-forged", PackageVerdict::Mismatch, Some("Verified")),
            )
            .await,
    );
    assert!(
        message.contains("the change's package verdict in the package label"),
        "{message}"
    );
    let mut unchecked = file_change(&format!("{node}-2-unchecked"), &node, "p");
    unchecked
        .labels_mut()
        .insert(labels::PACKAGE.into(), "Verified".into());
    refused(changes.create(&pp, &unchecked).await);
    changes
        .create(
            &pp,
            &checked("3-honest", PackageVerdict::Mismatch, Some("Mismatch")),
        )
        .await
        .expect("the label of the spec's verdict is accepted");
    fleet.cleanup().await;
}

/// MD5 in hex, as dpkg records it (by coreutils' md5sum).
fn md5_of(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, bytes).unwrap();
    let out = std::process::Command::new("md5sum")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..32].to_string()
}
