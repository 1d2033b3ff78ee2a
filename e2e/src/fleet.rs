//! A small fleet for end-to-end tests: Node objects in the API, each with a
//! host root directory standing for its `/`, and a real `kube-fim-agent run`
//! process per node logged in as the kube-fim-agent ServiceAccount.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use kube_fim_crds::{
    FileChange, FileIntegrityNode, FileIntegrityPolicy, FileIntegrityPolicySpec, MonitoredPath,
    NodePolicyPhase,
};

use crate::{
    Process, binary, ensure_crds, eventually, free_port, http_get, node_bound_kubeconfig, repo_root,
};

/// Label that scopes a test's policies to its own agents.
pub const SUITE_LABEL: &str = "e2e.kube-fim.io/suite";

/// One simulated node.
pub struct TestNode {
    pub name: String,
    pub root: PathBuf,
    pub state: PathBuf,
    pub metrics_port: u16,
    pub agent: Option<Process>,
    suite: String,
}

impl TestNode {
    /// A host path inside this node's root.
    pub fn host(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Starts (or restarts) the agent process, logged in as the kube-fim-agent
    /// ServiceAccount with a token bound to this node (as a pod's would be).
    pub fn start_agent(&mut self) {
        let kubeconfig = node_bound_kubeconfig(&self.name);
        let args = vec![
            "run".to_string(),
            format!("--node-name={}", self.name),
            format!("--root={}", self.root.display()),
            format!("--state={}", self.state.display()),
            format!("--metrics-addr=127.0.0.1:{}", self.metrics_port),
            format!("--policy-selector={SUITE_LABEL}={}", self.suite),
            format!("--kubeconfig={}", kubeconfig.display()),
        ];
        self.agent = Some(Process::start(
            &format!("agent-{}", self.name),
            &binary("kube-fim-agent"),
            &args,
            &kubeconfig,
        ));
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
            nodes.push(TestNode {
                name,
                root,
                state,
                metrics_port: free_port(),
                agent: None,
                suite: suite.to_string(),
            });
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
        let mut spec = FileIntegrityPolicySpec::with_paths(paths);
        spec.node_selector = BTreeMap::from([("role".to_string(), self.suite.clone())]);
        spec.debounce = "200ms".into();
        let mut p = FileIntegrityPolicy::new(name, spec);
        p.metadata.labels = Some(BTreeMap::from([(
            SUITE_LABEL.to_string(),
            self.suite.clone(),
        )]));
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
            let _ = Api::<Node>::all(self.client.clone())
                .delete(&n.name, &DeleteParams::default())
                .await;
        }
    }
}

/// A monitored entry.
pub fn entry(name: &str, path: &str, recursive: bool) -> MonitoredPath {
    MonitoredPath {
        name: name.into(),
        path: path.into(),
        recursive,
        ..MonitoredPath::default()
    }
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
