//! A small fleet for end-to-end tests: Node objects in the API, each with a
//! host root directory standing for its `/`, and a real `kube-fim-agent run`
//! process per node logged in as the kube-fim-agent ServiceAccount.
//!
//! Each node behaves like a real one: a stand-in kubelet keeps it `Ready` and
//! renews its Lease in `kube-node-lease` every 10 s (as `kwok` does for
//! simulated nodes), so the node lifecycle controller leaves it alone.
//! [`TestNode::stop_kubelet`] takes one NotReady on purpose: the controller
//! then taints it `node.kubernetes.io/unreachable` after its grace period.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kube_fim_crds::{
    FileChange, FileIntegrityNode, FileIntegrityPolicy, MonitoredPath, NodePolicyPhase,
};

use crate::{
    Entry, Policy, Process, binary, ensure_crds, eventually, free_port, http_get,
    node_bound_kubeconfig, repo_root,
};

/// Label that scopes a test's policies to its own agents.
pub use crate::operator::SUITE_LABEL;

/// One simulated node.
pub struct TestNode {
    pub name: String,
    pub root: PathBuf,
    pub state: PathBuf,
    pub metrics_port: u16,
    pub agent: Option<Process>,
    suite: String,
    client: Client,
    kubelet: Option<tokio::task::JoinHandle<()>>,
}

/// How often the stand-in kubelet posts status and renews the Lease.
const KUBELET_BEAT: Duration = Duration::from_secs(10);

/// One kubelet heartbeat: the Ready condition and the node Lease, as a kubelet
/// posts them.
async fn kubelet_beat(client: &Client, node: &str, uid: Option<&str>) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let status = serde_json::json!({"status": {"conditions": [{
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "kube-fim test kubelet is posting ready status",
        "lastHeartbeatTime": Time(now),
        "lastTransitionTime": Time(now),
    }]}});
    Api::<Node>::all(client.clone())
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
        .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let spec = LeaseSpec {
        holder_identity: Some(node.to_string()),
        lease_duration_seconds: Some(40),
        renew_time: Some(MicroTime(now)),
        ..LeaseSpec::default()
    };
    if leases.get_opt(node).await?.is_some() {
        let patch =
            serde_json::json!({"spec": {"renewTime": MicroTime(now), "holderIdentity": node}});
        leases
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    } else {
        let mut lease = Lease {
            spec: Some(spec),
            ..Lease::default()
        };
        lease.metadata.name = Some(node.to_string());
        if let Some(uid) = uid {
            lease.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.to_string(),
                uid: uid.to_string(),
                ..OwnerReference::default()
            }]);
        }
        leases.create(&PostParams::default(), &lease).await?;
    }
    Ok(())
}

impl TestNode {
    /// A host path inside this node's root.
    pub fn host(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Starts (or restarts) the agent process, logged in as the kube-fim-agent
    /// ServiceAccount with a token bound to this node (as a pod's would be).
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// [`TestNode::start_agent`] with more command-line arguments.
    pub fn start_agent_with(&mut self, extra: &[String]) {
        let kubeconfig = node_bound_kubeconfig(&self.name);
        self.start_agent_as(&kubeconfig, extra);
    }

    /// Starts the agent logged in with `kubeconfig` (e.g. one whose server is
    /// a proxy the test can cut), with more command-line arguments.
    pub fn start_agent_as(&mut self, kubeconfig: &Path, extra: &[String]) {
        let kubeconfig = kubeconfig.to_path_buf();
        let mut args = vec![
            "run".to_string(),
            format!("--node-name={}", self.name),
            format!("--root={}", self.root.display()),
            format!("--state={}", self.state.display()),
            format!("--metrics-addr=127.0.0.1:{}", self.metrics_port),
            format!("--policy-selector={SUITE_LABEL}={}", self.suite),
            format!("--kubeconfig={}", kubeconfig.display()),
        ];
        args.extend_from_slice(extra);
        self.agent = Some(Process::start(
            &format!("agent-{}", self.name),
            &binary("kube-fim-agent"),
            &args,
            &kubeconfig,
        ));
    }

    /// Starts the stand-in kubelet: Ready status and Lease renewal every 10 s.
    pub async fn start_kubelet(&mut self) {
        self.stop_kubelet();
        let client = self.client.clone();
        let node = self.name.clone();
        let uid = Api::<Node>::all(client.clone())
            .get(&node)
            .await
            .ok()
            .and_then(|n| n.metadata.uid);
        kubelet_beat(&client, &node, uid.as_deref())
            .await
            .expect("first kubelet heartbeat");
        self.kubelet = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(KUBELET_BEAT).await;
                if let Err(e) = kubelet_beat(&client, &node, uid.as_deref()).await {
                    eprintln!("kubelet heartbeat of {node}: {e}");
                }
            }
        }));
    }

    /// Stops the stand-in kubelet: the node stops posting status, and the
    /// node lifecycle controller takes it NotReady (and taints it unreachable).
    pub fn stop_kubelet(&mut self) {
        if let Some(k) = self.kubelet.take() {
            k.abort();
        }
    }

    /// Kills the agent (SIGKILL: no chance to tidy up).
    pub fn kill_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill();
        }
    }

    /// The agent's metrics text.
    pub fn metrics(&self) -> Option<String> {
        http_get(self.metrics_port, "/metrics")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop_kubelet();
    }
}

/// Nodes and policies of one test, all labelled with its suite.
pub struct Fleet {
    pub client: Client,
    pub suite: String,
    pub nodes: Vec<TestNode>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Creates `count` Node objects (labels `role=<suite>`) with host roots
    /// holding a few typical files. Agents are not started yet.
    pub async fn new(client: Client, suite: &str, count: usize) -> Fleet {
        ensure_crds();
        let dir = tempfile::Builder::new()
            .prefix(&format!("kube-fim-{suite}-"))
            .tempdir_in(std::env::temp_dir())
            .expect("temp dir");
        let nodes_api: Api<Node> = Api::all(client.clone());
        let mut nodes = Vec::new();
        for i in 0..count {
            let name = format!("{suite}-node-{}", (b'a' + i as u8) as char);
            let mut node = Node::default();
            node.metadata.name = Some(name.clone());
            node.metadata.labels = Some(BTreeMap::from([
                ("role".to_string(), suite.to_string()),
                ("kubernetes.io/hostname".to_string(), name.clone()),
            ]));
            nodes_api
                .create(&PostParams::default(), &node)
                .await
                .expect("create Node");
            let root = dir.path().join(&name).join("root");
            let state = dir.path().join(&name).join("state");
            for (path, content) in [
                ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
                ("etc/hosts", "127.0.0.1 localhost\n"),
                ("etc/old.conf", "old=1\n"),
                ("etc/ssh/sshd_config", "PermitRootLogin no\n"),
                ("usr/bin/tool", "#!/bin/sh\necho tool\n"),
            ] {
                let p = root.join(path);
                std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                std::fs::write(&p, content).expect("write");
            }
            std::fs::create_dir_all(&state).expect("state dir");
            let mut node = TestNode {
                name,
                root,
                state,
                metrics_port: free_port(),
                agent: None,
                suite: suite.to_string(),
                client: client.clone(),
                kubelet: None,
            };
            node.start_kubelet().await;
            nodes.push(node);
        }
        Fleet {
            client,
            suite: suite.to_string(),
            nodes,
            _dir: dir,
        }
    }

    /// A policy selecting this fleet's nodes.
    pub fn policy(&self, name: &str, paths: Vec<MonitoredPath>) -> FileIntegrityPolicy {
        let mut p = Policy::named(name)
            .label(SUITE_LABEL, &self.suite)
            .node_selector("role", &self.suite)
            .debounce("200ms")
            .build();
        p.spec.paths = paths;
        p
    }

    /// Creates a policy.
    pub async fn create_policy(&self, policy: &FileIntegrityPolicy) {
        Api::<FileIntegrityPolicy>::all(self.client.clone())
            .create(&PostParams::default(), policy)
            .await
            .expect("create policy");
    }

    /// Waits until the agent on `node` reports `policy` Ready (baseline done).
    pub async fn wait_ready(&self, node: &str, policy: &str, timeout: Duration) {
        let api: Api<FileIntegrityNode> = Api::all(self.client.clone());
        eventually(&format!("{node} Ready for {policy}"), timeout, || async {
            let record = api.get_opt(node).await.map_err(|e| e.to_string())?;
            let phase = record
                .as_ref()
                .and_then(|r| r.status.as_ref())
                .and_then(|s| s.policies.iter().find(|p| p.policy == policy))
                .map(|p| p.phase);
            if phase == Some(NodePolicyPhase::Ready) {
                Ok(())
            } else {
                Err(format!("{phase:?}"))
            }
        })
        .await;
    }

    /// FileChanges of `node`.
    pub async fn changes(&self, node: &str) -> Vec<FileChange> {
        Api::<FileChange>::all(self.client.clone())
            .list(&ListParams::default().fields(&format!("spec.node={node}")))
            .await
            .expect("list FileChanges")
            .items
    }

    /// Deletes the fleet's Node objects (agents are killed on drop).
    pub async fn cleanup(&mut self) {
        for n in &mut self.nodes {
            n.kill_agent();
            n.stop_kubelet();
            let _ = Api::<Lease>::namespaced(self.client.clone(), "kube-node-lease")
                .delete(&n.name, &DeleteParams::default())
                .await;
            let _ = Api::<Node>::all(self.client.clone())
                .delete(&n.name, &DeleteParams::default())
                .await;
        }
    }
}

/// A monitored entry, recursive or not.
pub fn entry(name: &str, path: &str, recursive: bool) -> MonitoredPath {
    let entry = Entry::new(name, path);
    if recursive { entry.recursive() } else { entry }.into()
}

/// A short description of a change for assertions: `Category path`.
pub fn describe(c: &FileChange) -> String {
    format!("{} {}", c.spec.category.as_str(), c.spec.path)
}

/// Names of FileChanges, sorted.
pub fn names(changes: &[FileChange]) -> Vec<String> {
    let mut v: Vec<String> = changes.iter().map(|c| c.name_any()).collect();
    v.sort();
    v
}

/// The control-plane script, for tests that stop and start the API server.
pub fn controlplane() -> (PathBuf, PathBuf) {
    let script = std::env::var_os("KUBE_FIM_CONTROLPLANE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("e2e/controlplane/controlplane.sh"));
    let dir = std::env::var_os("KUBE_FIM_CONTROLPLANE_DIR")
        .map(PathBuf::from)
        .expect("KUBE_FIM_CONTROLPLANE_DIR is set by controlplane.sh run");
    (script, dir)
}

/// Runs `controlplane.sh <command> <dir>`.
pub fn controlplane_command(command: &str) {
    let (script, dir) = controlplane();
    let status = std::process::Command::new(script)
        .arg(command)
        .arg(&dir)
        .status()
        .expect("controlplane.sh runs");
    assert!(status.success(), "controlplane.sh {command} failed");
}

/// Whether a path exists in a root (helper for readable asserts).
pub fn exists(root: &Path, path: &str) -> bool {
    root.join(path.trim_start_matches('/')).exists()
}
