//! End to end: process attribution. A real agent (`run`, as the kube-fim-agent
//! ServiceAccount) with a policy that sets `processAttribution`; files changed
//! by a host process and by a process placed in the cgroup of a Pod the API
//! server has on the agent's node. The FileChange names the writer (and the
//! pod and container), so does its Event, and the FileIntegrityNode says
//! attribution is on. Needs root (fanotify, cgroups), as the agent does.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube_fim_crds::{FileChange, FileIntegrityNode};
use kube_fim_e2e::fleet::{Fleet, entry};
use kube_fim_e2e::{client, eventually, unique_name};

const READY: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(20);
const CONTAINER_ID: &str = "0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b8a9f0e1d";

/// A Pod "running" on the test node: what the kubelet would have reported.
async fn pod_on(client: &kube::Client, name: &str, node: &str) -> Pod {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "shell".into(),
                image: Some("busybox".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    api.create(&PostParams::default(), &pod).await.unwrap();
    let status = PodStatus {
        phase: Some("Running".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "shell".into(),
            container_id: Some(format!("containerd://{CONTAINER_ID}")),
            image: "busybox".into(),
            image_id: String::new(),
            ready: true,
            restart_count: 0,
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    };
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap()
}

/// The cgroup the kubelet (cgroupfs driver, v1 `pids` hierarchy; systemd
/// layout on the unified one) makes for the pod's container.
struct PodCgroup(Vec<PathBuf>);

impl PodCgroup {
    fn create(pod_uid: &str) -> PodCgroup {
        let fs = Command::new("stat")
            .args(["-fc", "%T", "/sys/fs/cgroup"])
            .output()
            .unwrap();
        let rel: Vec<String> = if String::from_utf8_lossy(&fs.stdout).trim() == "cgroup2fs" {
            let u = pod_uid.replace('-', "_");
            vec![
                "kubepods.slice".into(),
                "kubepods-besteffort.slice".into(),
                format!("kubepods-besteffort-pod{u}.slice"),
                format!("cri-containerd-{CONTAINER_ID}.scope"),
            ]
        } else {
            vec![
                "pids/kubepods".into(),
                "besteffort".into(),
                format!("pod{pod_uid}"),
                CONTAINER_ID.into(),
            ]
        };
        let mut made = Vec::new();
        let mut p = PathBuf::from("/sys/fs/cgroup");
        for r in rel {
            p = p.join(r);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap();
                made.push(p.clone());
            }
        }
        PodCgroup(made)
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Runs Python as `fim-writer` (the kernel takes the command name from the
/// name executed) to append to `file`; it stays a moment so that its /proc
/// entries outlive the event. Returns its pid.
fn write_as_fim_writer(dir: &std::path::Path, file: &std::path::Path) -> u32 {
    let link = dir.join("fim-writer");
    if !link.exists() {
        std::os::unix::fs::symlink("/usr/bin/python3", &link).unwrap();
    }
    let code = format!(
        "import time\nopen({:?}, 'a').write('changed\\n')\ntime.sleep(1.5)\n",
        file.display().to_string()
    );
    let script = format!("exec {} -c \"$0\"", link.display());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(code)
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success());
    pid
}

async fn change_of(fleet: &Fleet, node: &str, path: &str) -> FileChange {
    eventually(&format!("a change of {path}"), SEEN, || async {
        fleet
            .changes(node)
            .await
            .into_iter()
            .find(|c| c.spec.path == path)
            .ok_or_else(|| "not yet".to_string())
    })
    .await
}

/// The note of the Event a change started (the first of its series).
async fn event_note(client: &kube::Client, change: &str) -> String {
    eventually(&format!("the Event of {change}"), SEEN, || async {
        let events = Api::<Event>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        events
            .items
            .into_iter()
            .find(|e| e.related.as_ref().and_then(|r| r.name.as_deref()) == Some(change))
            .and_then(|e| e.note)
            .ok_or_else(|| "not yet".to_string())
    })
    .await
}

#[tokio::test]
async fn changes_name_the_host_process_or_the_pod_and_container_that_made_them() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    let mut p = fleet.policy(&policy, vec![entry("etc", "/etc", true)]);
    p.spec.process_attribution = true;
    fleet.create_policy(&p).await;
    let node = fleet.nodes[0].name.clone();
    let pod_name = format!("{suite}-evil");
    let pod = pod_on(&client, &pod_name, &node).await;
    let cgroup = PodCgroup::create(&pod.uid().unwrap());
    fleet.nodes[0].start_agent();
    fleet.wait_ready(&node, &policy, READY).await;

    // The node says attribution is on, and through what.
    let nodes: Api<FileIntegrityNode> = Api::all(client.clone());
    let att = eventually("attribution in the node status", SEEN, || async {
        nodes
            .get(&node)
            .await
            .map_err(|e| e.to_string())?
            .status
            .and_then(|s| s.attribution)
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert_eq!(att.mechanism, "fanotify", "{att:?}");
    assert!(
        att.kernel_features
            .iter()
            .any(|f| f == "FAN_REPORT_DFID_NAME"),
        "{att:?}"
    );
    assert_eq!(att.reason, None);
    // The kernel filters: an inode mark on each monitored directory, no file
    // system marked whole (whose every write the agent would drop itself).
    let marks = eventually("the marks in force in the node status", SEEN, || async {
        let att = nodes
            .get(&node)
            .await
            .map_err(|e| e.to_string())?
            .status
            .and_then(|s| s.attribution)
            .ok_or_else(|| "not yet".to_string())?;
        if att.kernel_features.iter().any(|f| f == "FAN_MARK_INODE") {
            Ok(att)
        } else {
            Err(format!("{att:?}"))
        }
    })
    .await;
    assert!(
        !marks
            .kernel_features
            .iter()
            .any(|f| f == "FAN_MARK_FILESYSTEM"),
        "{marks:?}"
    );
    assert_eq!(marks.file_systems, Some(0), "{marks:?}");

    // A host process.
    let dir = tempfile::tempdir().unwrap();
    let hosts = fleet.nodes[0].host("/etc/hosts");
    let pid = write_as_fim_writer(dir.path(), &hosts);
    let c = change_of(&fleet, &node, "/etc/hosts").await;
    let p = c.spec.process.clone().expect("attributed");
    assert_eq!(p.command.as_deref(), Some("fim-writer"));
    assert_eq!(p.pid, pid as i32);
    assert_eq!(p.pod, None);
    let by = format!("fim-writer (pid {pid}, uid 0)");
    assert_eq!(p.by.as_deref(), Some(by.as_str()));
    let note = event_note(&client, &c.name_any()).await;
    assert!(note.contains(&format!("by {by}")), "{note}");

    // A process in the pod's container cgroup, in its own pid namespace.
    let passwd = fleet.nodes[0].host("/etc/passwd");
    let join = format!(
        "echo $$ > {}/cgroup.procs && exec unshare --pid --fork ",
        cgroup.0.last().unwrap().display()
    );
    let link = dir.path().join("fim-writer");
    let code = format!(
        "import time\nopen({:?}, 'a').write('pwned:x:0:0::/:/bin/sh\\n')\ntime.sleep(1.5)\n",
        passwd.display().to_string()
    );
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{join}{} -c \"$0\"", link.display()))
        .arg(&code)
        .status()
        .unwrap();
    assert!(status.success());
    let c = change_of(&fleet, &node, "/etc/passwd").await;
    let p = c.spec.process.clone().expect("attributed");
    let pod_ref = p.pod.clone().expect("the pod");
    assert_eq!(pod_ref.namespace.as_deref(), Some("default"));
    assert_eq!(pod_ref.name.as_deref(), Some(pod_name.as_str()));
    assert_eq!(pod_ref.uid, pod.uid().unwrap());
    assert_eq!(pod_ref.container.as_deref(), Some("shell"));
    assert_eq!(
        p.container_id.as_deref(),
        Some(format!("containerd://{CONTAINER_ID}").as_str())
    );
    assert_eq!(p.command.as_deref(), Some("fim-writer"));
    assert!(p.limits.is_empty(), "{p:?}");
    let by = format!("pod default/{pod_name} (container shell)");
    assert_eq!(p.by.as_deref(), Some(by.as_str()));

    // `kubectl get fc -o wide` shows who.
    let run = kube_fim_e2e::kubectl(["get", "fc", &c.name_any(), "-o", "wide"]);
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stdout.lines().next().unwrap().contains("BY"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains(&by), "{}", run.stdout);

    // `kubectl fim export` carries it: the whole spec in JSON, the writer's
    // columns in CSV.
    let plugin_dir = kube_fim_e2e::binary("kubectl-fim")
        .parent()
        .unwrap()
        .to_path_buf();
    let export = |format: &str| {
        let out = Command::new("kubectl")
            .args(["fim", "export", "--since", "1h", "--format", format])
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    plugin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("KUBECONFIG", kube_fim_e2e::kubeconfig())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let csv = export("csv");
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",by,pid,command,uid,pod,container"),
        "{csv}"
    );
    let row = csv
        .lines()
        .find(|l| l.contains(&c.name_any()))
        .expect("the change exported");
    assert!(
        row.ends_with(&format!(
            ",{by},{},fim-writer,0,default/{pod_name},shell",
            p.pid
        )),
        "{row}"
    );
    let json = export("json");
    let record: serde_json::Value = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["metadata"]["name"] == c.name_any().as_str())
        .expect("the change exported");
    assert_eq!(record["spec"]["process"]["pod"]["container"], "shell");

    drop(cgroup);
    let _ = Api::<Pod>::namespaced(client.clone(), "default")
        .delete(&pod_name, &DeleteParams::default().grace_period(0))
        .await;
    fleet.cleanup().await;
}
