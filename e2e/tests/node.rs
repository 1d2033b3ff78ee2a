//! The real-node tier: the chart's own images run as pods under a real kubelet.
//!
//! `make e2e-node` runs this file inside `e2e/node/node.sh run`: a control plane
//! whose API server pods can reach, and a node next to it (containerd, runc,
//! bridge CNI, kubelet, kube-scheduler, kube-proxy) that holds the images built
//! from the workspace's binaries by `e2e/node/images.sh` (`make e2e-node`: the
//! debug build, debug information stripped). The tests install the
//! chart with `helm install` (values only for the image names, the node's
//! directories and test addresses), and watch what a user would: the operator
//! pods leading, the agent DaemonSet pod Ready on the node with the chart's
//! security context, a changed file as a FileChange, a killed agent restarted by
//! the kubelet with nothing lost and no tamper alarm, a monitoring loop stalled
//! by a hung filesystem (a FUSE share whose server stops answering) failing the
//! liveness probe until the kubelet restarts the container, and the
//! least-privilege claims (DAC_READ_SEARCH reads a mode-0000 file; the host
//! mount and the image are read-only; the agent's token cannot read Secrets).
//! node.sh checks after the run that the node left nothing behind.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube_fim_e2e::{Entry, Policy, eventually, helm, kubectl, kubectl_stdin, repo_root};
use serde_json::Value;

const NAMESPACE: &str = "kube-fim";
const RELEASE: &str = "kube-fim";
const POLICY: &str = "real-node";

fn node_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the real-node tests run on the local node of \
             `make e2e-node` (e2e/node/node.sh run DIR -- cargo test -p kube-fim-e2e --test node)"
        )
    })
}

fn node_root() -> PathBuf {
    PathBuf::from(node_env("KUBE_FIM_NODE_ROOT"))
}

fn json(args: &[&str]) -> Result<Value, String> {
    let run = kubectl(args);
    if !run.success {
        return Err(run.stderr);
    }
    serde_json::from_str(&run.stdout).map_err(|e| e.to_string())
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

// ------------------------------------------------------------------ images

/// What a Dockerfile's final stage says about the image.
#[derive(Debug, Default, PartialEq)]
struct ImageSpec {
    entrypoint: Vec<String>,
    user: String,
    exposed: Vec<String>,
    /// Destinations of the final stage's COPY instructions.
    files: Vec<String>,
}

fn dockerfile_spec(path: &Path) -> ImageSpec {
    let text = std::fs::read_to_string(path).expect("Dockerfile");
    let mut spec = ImageSpec::default();
    for line in text.lines().map(str::trim) {
        let (instr, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instr {
            // A new stage starts from scratch: only the last one is the image.
            "FROM" => spec = ImageSpec::default(),
            "ENTRYPOINT" => {
                spec.entrypoint = serde_json::from_str(rest).expect("exec-form ENTRYPOINT")
            }
            "USER" => spec.user = rest.to_string(),
            "EXPOSE" => {
                spec.exposed = rest
                    .split_whitespace()
                    .map(|p| format!("{p}/tcp"))
                    .collect()
            }
            "COPY" => spec.files.push(
                rest.split_whitespace()
                    .last()
                    .expect("COPY destination")
                    .into(),
            ),
            _ => {}
        }
    }
    spec
}

/// The locally built image's config and files: `skopeo inspect --config` and
/// an `umoci unpack` of its OCI layout.
fn local_image_spec(name: &str, files: &[String]) -> (ImageSpec, Vec<(String, u32)>) {
    let layout = format!(
        "oci:{}/{name}:{}",
        node_env("KUBE_FIM_NODE_IMAGES"),
        node_env("KUBE_FIM_NODE_TAG")
    );
    let out = Command::new("skopeo")
        .args(["inspect", "--config", &layout])
        .output()
        .expect("skopeo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&out.stdout).expect("image config");
    let c = &config["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut exposed: Vec<String> = c["ExposedPorts"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    exposed.sort();
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    let layout_dir = format!(
        "{}/{name}:{}",
        node_env("KUBE_FIM_NODE_IMAGES"),
        node_env("KUBE_FIM_NODE_TAG")
    );
    let out = Command::new("umoci")
        .args(["unpack", "--image", &layout_dir, path_str(&bundle)])
        .output()
        .expect("umoci runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let modes = files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(bundle.join("rootfs").join(f.trim_start_matches('/')))
                .unwrap_or_else(|e| panic!("{f} in image {name}: {e}"));
            (f.clone(), meta.permissions().mode() & 0o7777)
        })
        .collect();
    (
        ImageSpec {
            entrypoint: strings(&c["Entrypoint"]),
            user: c["User"].as_str().unwrap_or_default().to_string(),
            exposed,
            files: files.to_vec(),
        },
        modes,
    )
}

#[test]
fn local_images_have_the_entrypoint_user_ports_and_layout_of_the_dockerfiles() {
    for (name, dockerfile) in [
        ("kube-fim-agent", "node-agent/Dockerfile"),
        ("kube-fim-operator", "operator/Dockerfile"),
    ] {
        let want = dockerfile_spec(&repo_root().join(dockerfile));
        assert!(
            !want.entrypoint.is_empty(),
            "{dockerfile} has an ENTRYPOINT"
        );
        let (got, modes) = local_image_spec(name, &want.files);
        assert_eq!(got, want, "image {name} against {dockerfile}");
        for (file, mode) in modes {
            assert_eq!(mode, 0o755, "{file} in {name} is an executable binary");
        }
    }
}

// ------------------------------------------------------------------ the chart on the node

fn write(path: &Path, content: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The node's "/" as the agent sees it: a few files a policy watches, a secret
/// no one may read without DAC_READ_SEARCH, and a static busybox to probe the
/// agent container from inside (the agent image has no shell).
fn prepare_node_root(root: &Path) {
    write(
        &root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    );
    write(
        &root.join("etc/ssh/sshd_config"),
        "PermitRootLogin no\n",
        0o600,
    );
    write(&root.join("etc/host.conf"), "multi on\n", 0o644);
    write(&root.join("etc/vault.conf"), "token=s3cret\n", 0o000);
    std::fs::create_dir_all(root.join("bin")).expect("bin");
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox (make deps installs busybox-static)");
}

/// A network share mounted on the node at /srv/share: a FUSE filesystem
/// (bindfs of a directory of the test) whose server the test can stop. A stopped
/// server is a hung filesystem, as a hard NFS mount whose server went away:
/// every access to it blocks in the kernel until the server answers.
struct Share {
    server: std::process::Child,
    mountpoint: PathBuf,
}

impl Share {
    fn mount(root: &Path) -> Share {
        let backing = PathBuf::from(node_env("KUBE_FIM_NODE_DIR")).join("share");
        write(&backing.join("app.conf"), "replicas=3\n", 0o644);
        let mountpoint = root.join("srv/share");
        std::fs::create_dir_all(&mountpoint).expect("mountpoint");
        let server = Command::new("bindfs")
            .args(["-f", "-o", "allow_other"])
            .arg(&backing)
            .arg(&mountpoint)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("bindfs (make deps installs it)");
        let share = Share { server, mountpoint };
        let mounted = std::time::Instant::now();
        while !share.is_mounted() {
            assert!(
                mounted.elapsed() < Duration::from_secs(10),
                "bindfs mounted {}",
                share.mountpoint.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        share
    }

    fn is_mounted(&self) -> bool {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(path_str(&self.mountpoint)))
    }

    fn signal(&self, signal: &str) {
        let run = Command::new("kill")
            .args([signal, &self.server.id().to_string()])
            .output()
            .expect("kill runs");
        assert!(
            run.status.success(),
            "kill {signal} the share's server: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }

    /// The server stops answering: the share hangs.
    fn hang(&self) -> Hung<'_> {
        self.signal("-STOP");
        Hung(self)
    }
}

/// A hung share; it answers again when dropped (even when a test fails, so the
/// node's teardown can unmount it).
struct Hung<'a>(&'a Share);

impl Drop for Hung<'_> {
    fn drop(&mut self) {
        self.0.signal("-CONT");
    }
}

fn helm_install(root: &Path, chart: &Path) {
    let state = node_env("KUBE_FIM_NODE_STATE");
    let mut values = vec![
        "operator.image.repository=localhost/kube-fim/kube-fim-operator".to_string(),
        "agent.image.repository=localhost/kube-fim/kube-fim-agent".to_string(),
        format!("operator.image.tag={}", node_env("KUBE_FIM_NODE_TAG")),
        format!("agent.image.tag={}", node_env("KUBE_FIM_NODE_TAG")),
        "operator.image.pullPolicy=Never".to_string(),
        "agent.image.pullPolicy=Never".to_string(),
        format!("agent.hostRoot={}", root.display()),
        format!("agent.stateDir={state}"),
    ];
    // The node's containerd socket (not at its usual path on this node), for
    // a chart that has the value (the previous chart of the upgrade test has
    // not: its schema refuses it).
    let schema = std::fs::read_to_string(chart.join("values.schema.json")).unwrap_or_default();
    if schema.contains("\"criSocket\"") {
        values.push(format!(
            "agent.criSocket={}",
            node_env("KUBE_FIM_NODE_CONTAINERD")
        ));
    }
    let run = kubectl(["create", "namespace", NAMESPACE]);
    assert!(run.success, "{}", run.stderr);
    // What the chart's README asks for: the agents mount the host.
    let run = kubectl([
        "label",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=privileged",
    ]);
    assert!(run.success, "{}", run.stderr);
    let mut args = vec![
        "install".to_string(),
        RELEASE.into(),
        path_str(chart).into(),
        "--namespace".into(),
        NAMESPACE.into(),
    ];
    for v in values {
        args.push("--set".into());
        args.push(v);
    }
    let run = helm(&args);
    assert!(run.success, "helm install: {}{}", run.stdout, run.stderr);
}

fn apply_policy() {
    let policy = Policy::named(POLICY)
        .node_selector("kubernetes.io/os", "linux")
        .path(Entry::new("accounts", "/etc/passwd"))
        .path(Entry::new("ssh", "/etc/ssh").recursive())
        .path(Entry::new("etc-conf", "/etc/*.conf"))
        .path(Entry::new("share", "/srv/share").recursive())
        .scan_interval("1h")
        .debounce("1s")
        .yaml();
    let run = kubectl_stdin(&["apply", "-f", "-"], &policy);
    assert!(run.success, "{}", run.stderr);
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn restarts(pod: &Value) -> i64 {
    pod["status"]["containerStatuses"][0]["restartCount"]
        .as_i64()
        .unwrap_or(0)
}

/// The agent pod on the node, once it is Running and Ready.
async fn ready_agent_pod() -> Value {
    eventually(
        "the agent DaemonSet pod to be Running and Ready on the node",
        Duration::from_secs(120),
        || async {
            let pods = json(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                "json",
            ])?;
            let pod = pods["items"]
                .as_array()
                .and_then(|a| a.first())
                .cloned()
                .ok_or("no agent pod")?;
            if pod["status"]["phase"] == "Running" && is_ready(&pod) {
                Ok(pod)
            } else {
                Err(format!("{}", pod["status"]))
            }
        },
    )
    .await
}

fn file_changes() -> Vec<Value> {
    json(&["get", "filechanges", "-o", "json"])
        .map(|v| v["items"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

async fn file_change(path: &str, category: &str) -> Value {
    eventually(
        &format!("a FileChange {category} {path}"),
        Duration::from_secs(60),
        || async {
            file_changes()
                .into_iter()
                .find(|c| c["spec"]["path"] == path && c["spec"]["category"] == category)
                .ok_or_else(|| {
                    format!(
                        "{:?}",
                        file_changes()
                            .iter()
                            .map(|c| format!("{} {}", c["spec"]["category"], c["spec"]["path"]))
                            .collect::<Vec<_>>()
                    )
                })
        },
    )
    .await
}

/// `kubectl exec` into the agent container: the static busybox of the node root
/// (seen at /host/bin/busybox) runs with the container's identity, capabilities
/// and mounts.
fn agent_exec(pod: &str, args: &[&str]) -> kube_fim_e2e::Run {
    let mut all = vec![
        "exec",
        "-n",
        NAMESPACE,
        pod,
        "-c",
        "agent",
        "--",
        "/host/bin/busybox",
    ];
    all.extend_from_slice(args);
    kubectl(all)
}

fn tamper_events() -> Vec<String> {
    json(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        "reason=BaselineTampered",
        "-o",
        "json",
    ])
    .map(|v| {
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["message"].to_string())
            .collect()
    })
    .unwrap_or_default()
}

/// What the scenarios share: the chart installed on the node, the policy
/// applied and the agent Ready on the node. The first scenario sets it up;
/// scenarios run one at a time (each holds the lock) because they share the
/// node and its agent.
struct Installed {
    root: PathBuf,
    /// The operator pod holding the leader Lease when the chart came up.
    leader: String,
    share: Share,
}

static NODE: tokio::sync::Mutex<Option<Installed>> = tokio::sync::Mutex::const_new(None);

async fn installed() -> tokio::sync::MappedMutexGuard<'static, Installed> {
    let mut node = NODE.lock().await;
    if node.is_none() {
        *node = Some(install().await);
    }
    tokio::sync::MutexGuard::map(node, |n| n.as_mut().expect("installed"))
}

async fn install() -> Installed {
    install_chart(&repo_root().join("charts/kube-fim")).await
}

async fn install_chart(chart: &Path) -> Installed {
    let root = node_root();
    prepare_node_root(&root);
    let share = Share::mount(&root);
    helm_install(&root, chart);

    // The operator pods run from the local image and one of them leads.
    let leader: String = eventually(
        "an operator pod to hold the leader Lease",
        Duration::from_secs(120),
        || async {
            let pods = json(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=operator",
                "-o",
                "json",
            ])?;
            let ready: Vec<String> = pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| {
                    p["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .map(|p| {
                    p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            let lease = json(&[
                "get",
                "lease",
                "-n",
                NAMESPACE,
                &format!("{RELEASE}-operator"),
                "-o",
                "json",
            ])?;
            let holder = lease["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if ready.contains(&holder) {
                Ok(holder)
            } else {
                Err(format!("ready {ready:?}, lease holder {holder:?}"))
            }
        },
    )
    .await;
    apply_policy();
    ready_agent_pod().await;
    eventually(
        "the policy to count the node Ready",
        Duration::from_secs(90),
        || async {
            let fip = json(&["get", "fip", POLICY, "-o", "json"])?;
            if fip["status"]["nodesReady"] == 1 {
                Ok(())
            } else {
                Err(format!("{}", fip["status"]))
            }
        },
    )
    .await;
    Installed {
        root,
        leader,
        share,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_runs_on_a_real_node_and_its_agent_catches_a_change() {
    let installed = installed().await;
    let node = node_env("KUBE_FIM_NODE_NAME");
    let root = installed.root.clone();

    // The node is a real kubelet's: Ready, with the kubelet's own report.
    let n = json(&["get", "node", &node, "-o", "json"]).expect("the node");
    assert!(
        n["status"]["nodeInfo"]["kubeletVersion"]
            .as_str()
            .unwrap_or_default()
            .starts_with("v1."),
        "{}",
        n["status"]["nodeInfo"]
    );
    assert!(
        n["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .unwrap_or_default()
            .starts_with("containerd://"),
        "{}",
        n["status"]["nodeInfo"]
    );

    let log = kubectl(["logs", "-n", NAMESPACE, &installed.leader]);
    assert!(
        log.success,
        "kubectl logs through the kubelet: {}",
        log.stderr
    );

    let pod = ready_agent_pod().await;
    let pod_name = pod["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_string();
    assert_eq!(pod["spec"]["nodeName"], node.as_str());

    // Exactly the chart's security context and probes, on a running container.
    let container = &pod["spec"]["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["runAsUser"], 0, "{sc}");
    assert_eq!(sc["privileged"], false, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{sc}"
    );
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["DAC_READ_SEARCH"]),
        "{sc}"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let host = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == "/host")
        .cloned()
        .expect("the host mount");
    assert_eq!(host["readOnly"], true, "{host}");

    // A change on the node (under the rshared bind mount) becomes a FileChange.
    write(
        &root.join("etc/ssh/sshd_config"),
        "PermitRootLogin yes\n",
        0o600,
    );
    let change = file_change("/etc/ssh/sshd_config", "Modified").await;
    assert_eq!(change["spec"]["node"], node.as_str(), "{change}");
    assert_eq!(change["spec"]["policy"], POLICY, "{change}");

    // Least privilege, from inside the agent container.
    let read = agent_exec(&pod_name, &["cat", "/host/etc/vault.conf"]);
    assert!(
        read.success && read.stdout == "token=s3cret\n",
        "DAC_READ_SEARCH reads a mode-0000 file: {read:?}"
    );
    let perms = std::fs::metadata(root.join("etc/vault.conf"))
        .expect("vault.conf")
        .permissions();
    assert_eq!(perms.mode() & 0o777, 0, "the secret is mode 0000");
    let host_write = agent_exec(&pod_name, &["touch", "/host/etc/planted"]);
    assert!(
        !host_write.success,
        "the host mount is read-only: {host_write:?}"
    );
    assert!(
        host_write.stderr.contains("Read-only file system"),
        "{host_write:?}"
    );
    assert!(!root.join("etc/planted").exists());
    let own_write = agent_exec(&pod_name, &["touch", "/usr/local/bin/planted"]);
    assert!(
        !own_write.success,
        "the image's filesystem is read-only: {own_write:?}"
    );
    assert!(
        own_write.stderr.contains("Read-only file system"),
        "{own_write:?}"
    );
    let token = agent_exec(
        &pod_name,
        &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"],
    );
    assert!(token.success && !token.stdout.is_empty(), "{token:?}");
    let secrets = kubectl([
        "get",
        "secrets",
        "-n",
        NAMESPACE,
        &format!("--token={}", token.stdout.trim()),
    ]);
    assert!(
        !secrets.success,
        "the agent's token reads no Secrets: {secrets:?}"
    );
    assert!(secrets.stderr.contains("Forbidden"), "{secrets:?}");
    assert!(
        secrets
            .stderr
            .contains(&format!("system:serviceaccount:{NAMESPACE}:")),
        "refused as the agent's ServiceAccount: {}",
        secrets.stderr
    );

    // The agent is killed; a file changes while it is down; the kubelet restarts
    // it and it reports that change, nothing twice, and no tamper alarm.
    let before: BTreeMap<String, Value> = file_changes()
        .into_iter()
        .map(|c| {
            (
                c["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                c,
            )
        })
        .collect();
    let restarts_before = restarts(&pod);
    let container_id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("containerd://"))
        .expect("a containerd container id")
        .to_string();
    let killed = Command::new("ctr")
        .args([
            "-a",
            &node_env("KUBE_FIM_NODE_CONTAINERD"),
            "-n",
            "k8s.io",
            "tasks",
            "kill",
            "-s",
            "SIGKILL",
            &container_id,
        ])
        .output()
        .expect("ctr runs");
    assert!(
        killed.status.success(),
        "killing the agent: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    write(
        &root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nmallory:x:0:0::/:/bin/sh\n",
        0o644,
    );
    let restarted: Value = eventually(
        "the kubelet to restart the agent container",
        Duration::from_secs(90),
        || async {
            let p = json(&["get", "pod", "-n", NAMESPACE, &pod_name, "-o", "json"])?;
            if restarts(&p) > restarts_before && is_ready(&p) {
                Ok(p)
            } else {
                Err(format!("{}", p["status"]["containerStatuses"]))
            }
        },
    )
    .await;
    assert_eq!(
        restarted["metadata"]["uid"], pod["metadata"]["uid"],
        "the same pod, restarted in place"
    );
    let missed = file_change("/etc/passwd", "Modified").await;
    assert_eq!(missed["spec"]["node"], node.as_str(), "{missed}");
    // Let the restarted agent finish its comparison, then look for duplicates.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = file_changes();
    let sshd: Vec<&Value> = after
        .iter()
        .filter(|c| c["spec"]["path"] == "/etc/ssh/sshd_config")
        .collect();
    assert_eq!(
        sshd.len(),
        1,
        "the change before the kill is not reported again: {sshd:?}"
    );
    for c in &after {
        let name = c["metadata"]["name"].as_str().unwrap_or_default();
        if !before.contains_key(name) {
            assert_eq!(
                c["spec"]["path"], "/etc/passwd",
                "only the missed change is new: {c}"
            );
        }
    }
    assert!(
        tamper_events().is_empty(),
        "no tamper alarm: {:?}",
        tamper_events()
    );
}

/// The kubelet's Events about a pod: (reason, message).
fn pod_events(pod: &str) -> Vec<(String, String)> {
    json(&[
        "get",
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        &format!("involvedObject.name={pod}"),
        "-o",
        "json",
    ])
    .map(|v| {
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or_default().to_string(),
                    e["message"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    })
    .unwrap_or_default()
}

/// The first of the pod's Events with `reason` whose message has `text`,
/// polled every 2 s (the waits here are minutes long).
async fn pod_event(pod: &str, reason: &str, text: &str, timeout: Duration) -> String {
    eventually(
        &format!("an Event {reason} \"…{text}…\" about {pod}"),
        timeout,
        || async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let events = pod_events(pod);
            events
                .iter()
                .find(|(r, m)| r == reason && m.contains(text))
                .map(|(_, m)| m.clone())
                .ok_or_else(|| format!("{events:?}"))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_monitor_fails_the_liveness_probe_and_the_kubelet_restarts_the_agent() {
    let installed = installed().await;
    let root = installed.root.clone();
    let node = node_env("KUBE_FIM_NODE_NAME");
    let pod = ready_agent_pod().await;
    let pod_name = pod["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_string();
    let restarts_before = restarts(&pod);
    let liveness_failures = |events: &[(String, String)]| {
        events
            .iter()
            .filter(|(r, m)| r == "Unhealthy" && m.starts_with("Liveness probe failed"))
            .count()
    };
    assert_eq!(
        liveness_failures(&pod_events(&pod_name)),
        0,
        "a healthy agent passes its liveness probe: {:?}",
        pod_events(&pod_name)
    );
    let started = std::time::Instant::now();

    // A file lands on the share and the share's server stops answering: the
    // agent goes to hash the file and its monitoring loop blocks in the kernel.
    // Its HTTP server still answers: /healthz says the loop stalled.
    write(
        &installed.share.mountpoint.join("deploy.conf"),
        "image=v2\n",
        0o644,
    );
    let hung = installed.share.hang();
    // Meanwhile a file elsewhere changes; the stalled loop cannot report it.
    write(&root.join("etc/host.conf"), "multi off\n", 0o644);

    // The kubelet's liveness probe fails on the agent's own verdict (503 after
    // 90 s without progress, not a timeout), and the kubelet kills the container.
    let unhealthy = pod_event(
        &pod_name,
        "Unhealthy",
        "Liveness probe failed",
        Duration::from_secs(240),
    )
    .await;
    assert!(
        unhealthy.contains("statuscode: 503"),
        "the agent answered that its loop stalled: {unhealthy}"
    );
    let killing = pod_event(
        &pod_name,
        "Killing",
        "failed liveness probe",
        Duration::from_secs(120),
    )
    .await;
    let stalled_for = started.elapsed();

    // The container is restarted (the share still hung: the agent exits anyway).
    eventually(
        "the kubelet to restart the agent container",
        Duration::from_secs(120),
        || async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let p = json(&["get", "pod", "-n", NAMESPACE, &pod_name, "-o", "json"])?;
            if restarts(&p) > restarts_before {
                Ok(())
            } else {
                Err(format!("{}", p["status"]["containerStatuses"]))
            }
        },
    )
    .await;
    let restarted_after = started.elapsed();

    // The share answers again; the restarted agent finishes its first scan,
    // becomes Ready and reports both changes, with no tamper alarm.
    drop(hung);
    let restarted = ready_agent_pod().await;
    assert_eq!(
        restarted["metadata"]["uid"], pod["metadata"]["uid"],
        "the same pod, its container restarted in place"
    );
    assert_eq!(
        restarts(&restarted),
        restarts_before + 1,
        "restarted once: {}",
        restarted["status"]["containerStatuses"]
    );
    let missed = file_change("/etc/host.conf", "Modified").await;
    assert_eq!(missed["spec"]["node"], node.as_str(), "{missed}");
    let stalled_on = file_change("/srv/share/deploy.conf", "Added").await;
    assert_eq!(stalled_on["spec"]["policy"], POLICY, "{stalled_on}");
    let record = json(&["get", "fileintegritynode", &node, "-o", "json"]).expect("the record");
    assert!(
        record["status"]["baselineAlarm"].is_null(),
        "no tamper alarm: {}",
        record["status"]
    );
    assert!(
        tamper_events().is_empty(),
        "no tamper alarm: {:?}",
        tamper_events()
    );
    eprintln!(
        "stalled monitor: killed by the kubelet after {stalled_for:?} ({killing}), \
         restarted after {restarted_after:?}, Ready and reported after {:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------------ container drift

const SHOP: &str = "shop";
const DRIFT_POLICY: &str = "container-drift";

/// The FileChanges of the containers of pod `pod`: (category, path, container id).
fn drift_changes(pod: &str) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = file_changes()
        .into_iter()
        .filter(|c| c["spec"]["container"]["pod"] == pod)
        .map(|c| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&c["spec"]["category"]),
                s(&c["spec"]["path"]),
                s(&c["spec"]["container"]["id"]),
            )
        })
        .collect();
    out.sort();
    out
}

/// The shop's web pod, once Ready: its container id and restart count.
async fn ready_web(restarts_at_least: i64) -> (String, i64) {
    eventually(
        "the pod shop/web to be Ready",
        Duration::from_secs(120),
        || async {
            let pod = json(&["get", "pod", "-n", SHOP, "web", "-o", "json"])?;
            let id = pod["status"]["containerStatuses"][0]["containerID"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if is_ready(&pod) && restarts(&pod) >= restarts_at_least && !id.is_empty() {
                Ok((id, restarts(&pod)))
            } else {
                Err(format!("{}", pod["status"]))
            }
        },
    )
    .await
}

fn web_exec(script: &str) {
    let run = kubectl([
        "exec",
        "-n",
        SHOP,
        "web",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        script,
    ]);
    assert!(run.success, "exec {script}: {}", run.stderr);
}

/// The agent's resident memory on the node, from the host's procfs.
fn agent_rss_kib() -> Option<u64> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"/usr/local/bin/kube-fim-agent") {
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_drifting_from_its_image_is_reported_with_its_pod_and_image() {
    let _installed = installed().await;
    let run = kubectl(["create", "namespace", SHOP]);
    assert!(run.success, "{}", run.stderr);
    let policy = format!(
        "apiVersion: fim.kube-fim.io/v1alpha1
kind: FileIntegrityPolicy
metadata: {{name: {DRIFT_POLICY}}}
spec:
  nodeSelector: {{kubernetes.io/os: linux}}
  containers:
    namespaces: [{SHOP}]
"
    );
    let run = kubectl_stdin(&["apply", "-f", "-"], &policy);
    assert!(run.success, "{}", run.stderr);
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {SHOP}, labels: {{app: web}}}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: web
    image: localhost/kube-fim/busybox:{tag}
    imagePullPolicy: Never
    command: [/bin/busybox, sh, -c, 'trap \"exit 0\" TERM; while true; do /bin/busybox sleep 1; done']
",
        tag = node_env("KUBE_FIM_NODE_TAG")
    );
    let run = kubectl_stdin(&["apply", "-f", "-"], &pod);
    assert!(run.success, "{}", run.stderr);
    let (first_id, _) = ready_web(0).await;
    // The agent looks at the new container before it drifts: what follows is real time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(drift_changes("web"), [], "a fresh container has no drift");

    // What an intruder does after `kubectl exec`.
    web_exec(
        "/bin/busybox cp /bin/busybox /usr/bin/curl && echo 'order hosts' >> /etc/host.conf \
         && /bin/busybox rm /etc/motd && echo scratch > /tmp/scratch",
    );
    let written = std::time::Instant::now();
    let want = |id: &str| {
        vec![
            (
                "Added".to_string(),
                "/usr/bin/curl".to_string(),
                id.to_string(),
            ),
            (
                "Modified".to_string(),
                "/etc/host.conf".to_string(),
                id.to_string(),
            ),
            (
                "Removed".to_string(),
                "/etc/motd".to_string(),
                id.to_string(),
            ),
        ]
    };
    let mut expected = want(&first_id);
    expected.sort();
    eventually(
        "three FileChanges of the web container's drift",
        Duration::from_secs(30),
        || async {
            let got = drift_changes("web");
            if got.len() >= expected.len() {
                Ok(got)
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    let latency = written.elapsed();
    eprintln!("container drift: exec's write to its FileChanges in {latency:?}");
    // Nothing for /tmp, the container's mounts (/etc/hosts, /etc/resolv.conf,
    // the token) or anything else.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(drift_changes("web"), expected);

    let changes = file_changes();
    let curl = changes
        .iter()
        .find(|c| c["spec"]["path"] == "/usr/bin/curl")
        .expect("the new binary's FileChange");
    let c = &curl["spec"]["container"];
    assert_eq!(c["namespace"], SHOP);
    assert_eq!(c["name"], "web");
    assert_eq!(curl["spec"]["policy"], DRIFT_POLICY);
    assert!(
        c["image"]
            .as_str()
            .unwrap_or_default()
            .contains("kube-fim/busybox"),
        "{c}"
    );
    assert!(
        c["imageDigest"]
            .as_str()
            .unwrap_or_default()
            .contains("sha256:"),
        "{c}"
    );
    assert_eq!(curl["spec"]["after"]["mode"], "0755");
    assert_eq!(
        curl["metadata"]["labels"]["fim.kube-fim.io/namespace"],
        SHOP
    );
    assert_eq!(curl["metadata"]["labels"]["fim.kube-fim.io/pod"], "web");
    let modified = changes
        .iter()
        .find(|c| c["spec"]["path"] == "/etc/host.conf" && c["spec"]["container"]["pod"] == "web")
        .expect("the modified image file");
    assert_ne!(
        modified["spec"]["before"]["hash"], modified["spec"]["after"]["hash"],
        "before is the image's file, after the container's"
    );
    let run = kubectl([
        "get",
        "fc",
        "-l",
        "fim.kube-fim.io/namespace=shop",
        "-o",
        "name",
    ]);
    assert!(run.success, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 3, "{}", run.stdout);
    let run = kubectl(["get", "fc"]);
    assert!(run.stdout.contains("CONTAINER"), "{}", run.stdout);

    // The Event on the pod itself.
    let event = eventually(
        "a FileAdded Event on the pod shop/web",
        Duration::from_secs(30),
        || async {
            let events = json(&["get", "events.events.k8s.io", "-n", SHOP, "-o", "json"])?;
            events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| {
                    e["regarding"]["name"] == "web"
                        && e["reason"] == "FileAdded"
                        && e["note"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("/usr/bin/curl")
                })
                .cloned()
                .ok_or_else(|| format!("{events}"))
        },
    )
    .await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "Pod");

    // A restarted container starts from its image again: its old drift is
    // not reported again, the new container's is.
    web_exec("/bin/busybox kill 1");
    let (second_id, _) = ready_web(1).await;
    assert_ne!(second_id, first_id);
    tokio::time::sleep(Duration::from_secs(3)).await;
    web_exec("echo '#!/bin/sh' > /usr/bin/again && /bin/busybox chmod 755 /usr/bin/again");
    eventually(
        "the restarted container's drift",
        Duration::from_secs(30),
        || async {
            let got = drift_changes("web");
            if got
                .iter()
                .any(|(_, p, id)| p == "/usr/bin/again" && *id == second_id)
            {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut after_restart = expected.clone();
    after_restart.push(("Added".into(), "/usr/bin/again".into(), second_id.clone()));
    after_restart.sort();
    assert_eq!(
        drift_changes("web"),
        after_restart,
        "no storm of removals, no re-report"
    );

    if let Some(rss) = agent_rss_kib() {
        eprintln!("container drift: agent resident memory {rss} KiB");
    }

    // The pod deleted: its evidence stays, the agent forgets the container.
    let run = kubectl([
        "delete",
        "pod",
        "-n",
        SHOP,
        "web",
        "--wait=true",
        "--timeout=60s",
    ]);
    assert!(run.success, "{}", run.stderr);
    let state = PathBuf::from(node_env("KUBE_FIM_NODE_STATE")).join("containers");
    eventually(
        "the agent to forget the deleted pod's containers",
        Duration::from_secs(30),
        || async {
            let left: Vec<_> = std::fs::read_dir(&state)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    assert_eq!(drift_changes("web"), after_restart, "evidence kept");
}

// ------------------------------------------------------------------ helm test and upgrade

/// `helm test` on the running install: the chart's test Pod runs
/// `kube-fim-operator check` from the operator's image under the kubelet and
/// succeeds once a leading operator counts the policy's node Ready.
async fn helm_test_passes() {
    let run = kube_fim_e2e::helm(["test", RELEASE, "-n", NAMESPACE, "--timeout", "4m"]);
    assert!(
        run.success,
        "helm test: {}{}\\n{}",
        run.stdout,
        run.stderr,
        kubectl([
            "logs",
            "-n",
            NAMESPACE,
            &format!("{RELEASE}-test-operator-check")
        ])
        .stdout
    );
    assert!(
        run.stdout
            .contains(&format!("{RELEASE}-test-operator-check"))
            && run.stdout.contains("Phase:          Succeeded"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_test_checks_the_running_install_from_the_operators_image() {
    let _installed = installed().await;
    helm_test_passes().await;
}

/// The chart as it was before the current one: the chart directory of main
/// at this commit (its templates, values and CRDs), kept packed in the
/// repository (`git archive <commit> charts/kube-fim | gzip -9n`), so the test
/// needs no git history (a shallow clone runs it too).
const PREVIOUS_CHART_COMMIT: &str = "4e7282c2935ff3818c7b38115a22c35d53a9b345";

fn previous_chart(dir: &Path) -> PathBuf {
    let packed = repo_root().join("e2e/node/previous-chart.tar.gz");
    let untar = Command::new("tar")
        .args(["-x", "-z", "-f", path_str(&packed), "-C", path_str(dir)])
        .output()
        .expect("tar runs");
    assert!(
        untar.status.success(),
        "unpacking the chart of {PREVIOUS_CHART_COMMIT}: {}",
        String::from_utf8_lossy(&untar.stderr)
    );
    dir.join("charts/kube-fim")
}

fn agent_pod_uids() -> Vec<String> {
    json(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/component=agent",
        "-o",
        "json",
    ])
    .map(|v| {
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                p["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    })
    .unwrap_or_default()
}

/// Per policy entry, the digest of its baseline as the agent publishes it.
fn entry_digests(node: &str) -> BTreeMap<String, String> {
    let fin = json(&["get", "fileintegritynode", node, "-o", "json"]).expect("the node record");
    fin["status"]["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                format!("{}/{}", e["policy"], e["entry"]),
                e["digest"].to_string(),
            )
        })
        .collect()
}

fn baseline_alarm_events() -> Vec<String> {
    json(&["get", "events", "-A", "-o", "json"])
        .map(|v| {
            v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| {
                    matches!(
                        e["reason"].as_str(),
                        Some("BaselineTampered" | "BaselineMissing" | "BaselineUnreadable")
                    )
                })
                .map(|e| format!("{} {}", e["reason"], e["message"]))
                .collect()
        })
        .unwrap_or_default()
}

/// `helm upgrade` from the previous chart on a running install, by the README's
/// procedure (the new CRDs server-side, then `helm upgrade
/// --reset-then-reuse-values`): the operator and the agent DaemonSet roll, a
/// file changed while the agent pod is replaced is reported once, nothing else
/// is, every baseline is kept (the published entry digests are unchanged, no
/// baseline alarm), and `helm test` passes on the upgraded release.
///
/// It needs the node before any other scenario installs the current chart:
/// `make e2e-node` runs it on a node of its own (see the Makefile); in a run of
/// the whole file that started another scenario first it says so and stops.
#[tokio::test(flavor = "multi_thread")]
async fn upgrade_from_the_previous_chart_keeps_baselines_and_reports_a_change_during_the_roll() {
    let mut node_slot = NODE.lock().await;
    if node_slot.is_some() {
        eprintln!(
            "skipped: another scenario installed the current chart on this node first; \
             `make e2e-node` runs this one on a fresh node (cargo test --test node upgrade_from)"
        );
        return;
    }
    let node = node_env("KUBE_FIM_NODE_NAME");
    let dir = tempfile::tempdir().expect("tempdir");
    let previous = previous_chart(dir.path());
    let mut installed = install_chart(&previous).await;
    let root = installed.root.clone();

    // A change under the previous chart, reported there.
    write(
        &root.join("etc/ssh/sshd_config"),
        "PermitRootLogin prohibit-password\n",
        0o600,
    );
    file_change("/etc/ssh/sshd_config", "Modified").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before: Vec<String> = file_changes()
        .iter()
        .map(|c| {
            c["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let digests = entry_digests(&node);
    assert!(!digests.is_empty(), "the node publishes its entry digests");
    let old_agents = agent_pod_uids();
    assert_eq!(old_agents.len(), 1, "{old_agents:?}");

    // The README's upgrade procedure, with one value changed.
    let chart = repo_root().join("charts/kube-fim");
    let crds = kubectl([
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        path_str(&chart.join("crds")),
    ]);
    assert!(crds.success, "{}", crds.stderr);
    let upgrade = kube_fim_e2e::helm([
        "upgrade",
        RELEASE,
        path_str(&chart),
        "-n",
        NAMESPACE,
        "--reset-then-reuse-values",
        "--set",
        "agent.podAnnotations.upgraded=yes",
    ]);
    assert!(
        upgrade.success,
        "helm upgrade: {}{}",
        upgrade.stdout, upgrade.stderr
    );

    // The roll: as soon as the old agent pod is going, a file changes.
    eventually(
        "the agent DaemonSet to replace the agent pod",
        Duration::from_secs(180),
        || async {
            let now = agent_pod_uids();
            if now.iter().any(|u| old_agents.contains(u)) {
                Err(format!("still running: {now:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    write(&root.join("etc/host.conf"), "multi off\n", 0o644);
    let pod = ready_agent_pod().await;
    assert!(
        !old_agents.contains(
            &pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        ),
        "a new agent pod"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["upgraded"], "yes",
        "the new chart's values reached the DaemonSet"
    );
    file_change("/etc/host.conf", "Modified").await;

    // Nothing else new, nothing twice, every baseline kept.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let new: Vec<String> = file_changes()
        .iter()
        .filter(|c| {
            !before.contains(
                &c["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .map(|c| {
            format!(
                "{} {}",
                c["spec"]["category"].as_str().unwrap_or_default(),
                c["spec"]["path"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        new,
        ["Modified /etc/host.conf"],
        "only the change made during the roll"
    );
    assert_eq!(entry_digests(&node), digests, "every baseline kept");
    let fin = json(&["get", "fileintegritynode", &node, "-o", "json"]).expect("node record");
    assert!(
        fin["status"]["baselineAlarm"].is_null(),
        "{}",
        fin["status"]["baselineAlarm"]
    );
    assert!(
        baseline_alarm_events().is_empty(),
        "{:?}",
        baseline_alarm_events()
    );
    let fip = json(&["get", "fip", POLICY, "-o", "json"]).expect("the policy");
    assert_eq!(fip["status"]["nodesReady"], 1, "{}", fip["status"]);

    helm_test_passes().await;

    // The node now runs the current chart: the other scenarios may go on.
    let lease = json(&[
        "get",
        "lease",
        "-n",
        NAMESPACE,
        &format!("{RELEASE}-operator"),
        "-o",
        "json",
    ])
    .expect("the lease");
    installed.leader = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    *node_slot = Some(installed);
}

const FLOOD: &str = "drift-flood";

/// A pod of namespace `ns` once Ready: its first container's id and restart count.
async fn ready_pod(ns: &str, name: &str) -> (String, i64) {
    eventually(
        &format!("the pod {ns}/{name} to be Ready"),
        Duration::from_secs(120),
        || async {
            let pod = json(&["get", "pod", "-n", ns, name, "-o", "json"])?;
            let id = pod["status"]["containerStatuses"][0]["containerID"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if is_ready(&pod) && !id.is_empty() {
                Ok((id, restarts(&pod)))
            } else {
                Err(format!("{}", pod["status"]))
            }
        },
    )
    .await
}

fn pod_exec(ns: &str, name: &str, script: &str) {
    let run = kubectl([
        "exec",
        "-n",
        ns,
        name,
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        script,
    ]);
    assert!(run.success, "exec {script}: {}", run.stderr);
}

/// A sample of the agent's /metrics (`name{...labels} value`, labels containing `has`).
async fn agent_metric(name: &str, has: &str) -> Option<f64> {
    let agent = ready_agent_pod().await;
    let pod = agent["metadata"]["name"].as_str().unwrap_or_default();
    let run = agent_exec(pod, &["wget", "-qO-", "http://127.0.0.1:9101/metrics"]);
    run.stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(has))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn container_drift_comes_from_the_runtime_in_real_time_and_a_flood_of_directories_does_not_stall_it()
 {
    let _installed = installed().await;
    let run = kubectl(["create", "namespace", FLOOD]);
    assert!(run.success, "{}", run.stderr);
    let policy = format!(
        "apiVersion: fim.kube-fim.io/v1alpha1
kind: FileIntegrityPolicy
metadata: {{name: container-drift-flood}}
spec:
  nodeSelector: {{kubernetes.io/os: linux}}
  containers:
    namespaces: [{FLOOD}]
    executablesOnly: true
"
    );
    let run = kubectl_stdin(&["apply", "-f", "-"], &policy);
    assert!(run.success, "{}", run.stderr);
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: flood, namespace: {FLOOD}}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: flood
    image: localhost/kube-fim/busybox:{tag}
    imagePullPolicy: Never
    command: [/bin/busybox, sh, -c, 'trap \"exit 0\" TERM; while true; do /bin/busybox sleep 1; done']
",
        tag = node_env("KUBE_FIM_NODE_TAG")
    );
    let run = kubectl_stdin(&["apply", "-f", "-"], &pod);
    assert!(run.success, "{}", run.stderr);
    let (id, _) = ready_pod(FLOOD, "flood").await;

    // The runtime named the container over its CRI socket (not the pods' status).
    eventually(
        "the agent to watch a container found over CRI",
        Duration::from_secs(60),
        || async {
            match agent_metric("kube_fim_agent_containers_watched", "source=\"cri\"").await {
                Some(n) if n >= 1.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let agent_before = ready_agent_pod().await;

    // Real time: a new binary in the container, seen through inotify.
    pod_exec(FLOOD, "flood", "/bin/busybox cp /bin/busybox /usr/bin/nc");
    let written = std::time::Instant::now();
    eventually(
        "the new binary's FileChange",
        Duration::from_secs(30),
        || async {
            let got = drift_changes("flood");
            if got
                .iter()
                .any(|(c, p, i)| c == "Added" && p == "/usr/bin/nc" && *i == id)
            {
                Ok(())
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    eprintln!(
        "container drift over CRI and inotify: exec's write to its FileChange in {:?}",
        written.elapsed()
    );
    let watches = agent_metric("kube_fim_agent_container_watches", "").await;
    assert!(watches.is_some_and(|w| w >= 1.0), "{watches:?}");

    // The attacker floods the writable layer: more directories than the
    // agent watches for one container, renamed under its feet.
    pod_exec(
        FLOOD,
        "flood",
        "cd /var && set -- && i=0 && while [ $i -lt 1500 ]; do set -- \"$@\" junk/$i/d; i=$((i+1)); done \
         && /bin/busybox mkdir -p \"$@\" && for d in \"$@\"; do : > $d/f; done \
         && /bin/busybox mv junk junk2 && /bin/busybox mkdir junk",
    );
    pod_exec(
        FLOOD,
        "flood",
        "/bin/busybox cp /bin/busybox /var/junk2/7/d/after-flood",
    );
    eventually(
        "the drift written after the flood",
        Duration::from_secs(30),
        || async {
            let got = drift_changes("flood");
            if got
                .iter()
                .any(|(c, p, _)| c == "Added" && p == "/var/junk2/7/d/after-flood")
            {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    // Bounded: the agent holds its share of watches, no more, and neither
    // stalled nor restarted.
    let watches = agent_metric("kube_fim_agent_container_watches", "").await;
    assert!(
        watches.is_some_and(|w| (1.0..=1100.0).contains(&w)),
        "{watches:?}"
    );
    let agent_after = ready_agent_pod().await;
    assert_eq!(
        agent_after["metadata"]["uid"],
        agent_before["metadata"]["uid"]
    );
    assert_eq!(restarts(&agent_after), restarts(&agent_before));
    // executablesOnly: the flood's data files are not reported, the binaries are.
    let mut want = vec![
        ("Added".to_string(), "/usr/bin/nc".to_string(), id.clone()),
        (
            "Added".to_string(),
            "/var/junk2/7/d/after-flood".to_string(),
            id.clone(),
        ),
    ];
    want.sort();
    assert_eq!(drift_changes("flood"), want);

    // The policy stays (deleting it would roll the agents out under the next test).
    let run = kubectl(["delete", "namespace", FLOOD, "--wait=true"]);
    assert!(run.success, "{}", run.stderr);
}
