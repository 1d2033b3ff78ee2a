//! Helpers shared by the kube-fim integration tests.
//!
//! The tests run against the real control plane that `e2e/controlplane` builds
//! and starts (`make e2e` wraps `cargo test` in `controlplane.sh run`), which
//! exports `KUBECONFIG` for it. Nothing here fakes an API server answer.

// Test support: a failed precondition is a failed test, said as plainly as possible.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

pub mod fleet;
pub mod operator;
pub mod packages;
pub mod release;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

// What the agent's integration tests need too lives in the testkit; the
// cluster-facing helpers below build on it.
pub use kube_fim_testkit::{
    Entry, Policy, Process, Run, eventually, free_port, http_get, metric, metric_sum, metric_where,
    repo_root,
};

/// The admin kubeconfig of the running control plane.
pub fn kubeconfig() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(path) if Path::new(&path).is_file() => PathBuf::from(path),
        _ => panic!(
            "no control plane: KUBECONFIG is not set to a file. The e2e tests run against the \
             local control plane: use `make e2e`, or \
             `e2e/controlplane/controlplane.sh run DIR -- cargo test -p kube-fim-e2e`"
        ),
    }
}

/// Runs `kubectl` against the control plane.
pub fn kubectl<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig())
        .args(args)
        .output()
        .expect("kubectl runs")
        .into()
}

/// Runs `kubectl` with `input` on its standard input.
pub fn kubectl_stdin(args: &[&str], input: &str) -> Run {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("kubectl reads its input");
    child.wait_with_output().expect("kubectl finishes").into()
}

/// Installs the committed CRD YAML and admission policies (what users apply)
/// once per test process and waits until the API server reports the CRDs
/// Established.
pub fn ensure_crds() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        let root = repo_root();
        for (file, _) in kube_fim_crds::crds() {
            let path = root.join("crds").join(file);
            let run = kubectl([
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=kube-fim-e2e",
                "-f",
                path.to_str().expect("utf-8 path"),
            ]);
            if !run.success {
                return Err(format!("kubectl apply {file}: {}", run.stderr));
            }
        }
        // The admission policies belong to the API as much as the schema does:
        // every test sees the rules a real install enforces.
        let admission = root.join("manifests/admission.yaml");
        let run = kubectl([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kube-fim-e2e",
            "-f",
            admission.to_str().expect("utf-8 path"),
        ]);
        if !run.success {
            return Err(format!(
                "kubectl apply manifests/admission.yaml: {}",
                run.stderr
            ));
        }
        let run = kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/fileintegritypolicies.fim.kube-fim.io",
            "crd/filechanges.fim.kube-fim.io",
            "crd/fileintegritynodes.fim.kube-fim.io",
        ]);
        if !run.success {
            return Err(format!("CRDs not Established: {}", run.stderr));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A Kubernetes client for the control plane.
pub async fn client() -> kube::Client {
    let _ = kubeconfig();
    kube::Client::try_default()
        .await
        .expect("a client from KUBECONFIG")
}

/// A name no other test in this run uses: `prefix-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a workspace binary (`make e2e` builds them before the tests run).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --workspace --bins` first (make e2e does)",
        path.display()
    );
    path
}

/// Applies `manifests/rbac.yaml` (namespace, ServiceAccounts, roles) once.
pub fn ensure_rbac() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        let path = repo_root().join("manifests/rbac.yaml");
        let run = kubectl([
            "apply",
            "--server-side",
            "--field-manager=kube-fim-e2e",
            "-f",
            path.to_str().expect("utf-8 path"),
        ]);
        if run.success {
            Ok(())
        } else {
            Err(format!("kubectl apply manifests/rbac.yaml: {}", run.stderr))
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A kubeconfig that logs in as ServiceAccount `kube-fim/<sa>` with a token the
/// API server issued, so processes run with exactly that account's rights.
pub fn service_account_kubeconfig(sa: &str) -> PathBuf {
    ensure_rbac();
    service_account_kubeconfig_in("kube-fim", sa)
}

/// The pinned Helm, built from its Go module and cached by `e2e/helm/build.sh`
/// (`make helm`; `make e2e` builds it first). Built or found once per process.
pub fn helm_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = BIN.get_or_init(|| {
        let out = Command::new(repo_root().join("e2e/helm/build.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("running e2e/helm/build.sh: {e}"))?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && Path::new(&path).is_file() {
            Ok(PathBuf::from(path))
        } else {
            Err(format!(
                "e2e/helm/build.sh failed ({}): Helm is built from its Go module, which needs Go \
                 and the module proxy (or a warm ~/.cache/kube-fim/go-mod)",
                out.status
            ))
        }
    });
    match result {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Runs Helm with its own config, cache and data directories under `target/`
/// (never the user's), against the control plane when `KUBECONFIG` is set.
pub fn helm<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let home = repo_root().join("target/e2e-helm");
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    let mut command = Command::new(helm_binary());
    command
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .args(&args);
    // Without a cluster, `helm template` and `helm lint` assume the Kubernetes
    // of the client-go Helm was built with; the chart is rendered for the one
    // the suite runs (which is the chart's declared minimum) unless a test says.
    let offline = matches!(
        args.first().and_then(|a| a.to_str()),
        Some("template" | "lint")
    );
    if offline && !args.iter().any(|a| a == "--kube-version") {
        command.args(["--kube-version", &release::kubernetes_version()]);
    }
    if let Some(path) = std::env::var_os("KUBECONFIG") {
        command.env("KUBECONFIG", path);
    }
    command.output().expect("helm runs").into()
}

/// Like [`service_account_kubeconfig`], for ServiceAccount `sa` of any namespace
/// (e.g. one a Helm release created).
pub fn service_account_kubeconfig_in(namespace: &str, sa: &str) -> PathBuf {
    let run = kubectl(["create", "token", sa, "-n", namespace, "--duration=1h"]);
    assert!(
        run.success,
        "kubectl create token {sa} -n {namespace}: {}",
        run.stderr
    );
    token_kubeconfig(&format!("{namespace}-{sa}"), run.stdout.trim())
}

/// A kubeconfig for the kube-fim-agent ServiceAccount with a token bound to
/// Node `node`, as the kubelet gives an agent pod: the API server adds
/// `authentication.kubernetes.io/node-name` to every request made with it.
pub fn node_bound_kubeconfig(node: &str) -> PathBuf {
    ensure_rbac();
    let uid = kubectl(["get", "node", node, "-o", "jsonpath={.metadata.uid}"]);
    assert!(uid.success, "node {node}: {}", uid.stderr);
    let run = kubectl([
        "create",
        "token",
        "kube-fim-agent",
        "-n",
        "kube-fim",
        "--duration=1h",
        "--bound-object-kind=Node",
        &format!("--bound-object-name={node}"),
        &format!("--bound-object-uid={}", uid.stdout.trim()),
    ]);
    assert!(run.success, "node-bound token for {node}: {}", run.stderr);
    token_kubeconfig(&format!("agent-{node}"), run.stdout.trim())
}

/// ServiceAccount `kube-fim/<sa>`, bound to ClusterRole `role`, and a
/// kubeconfig logging in as it (e.g. an approver or an auditor).
pub fn service_account_with_cluster_role(sa: &str, role: &str) -> PathBuf {
    ensure_rbac();
    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": sa, "namespace": "kube-fim"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": format!("kube-fim-e2e-{sa}")},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
             "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": "kube-fim"}]},
        ],
    });
    let run = kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=kube-fim-e2e",
            "-f",
            "-",
        ],
        &manifest.to_string(),
    );
    assert!(run.success, "{sa} bound to {role}: {}", run.stderr);
    service_account_kubeconfig_in("kube-fim", sa)
}

/// A client logged in with `kubeconfig`.
pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig readable"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("a client config");
    kube::Client::try_from(config).expect("a client")
}

/// The user name the API server authenticates `client` as (SelfSubjectReview).
pub async fn whoami(client: &kube::Client) -> String {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = kube::Api::<SelfSubjectReview>::all(client.clone())
        .create(&Default::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .expect("a user name")
}

/// Records `client`'s user's approval of FileChange `name`, as `kubectl fim
/// approve` does.
pub async fn approve(
    client: &kube::Client,
    name: &str,
    reason: &str,
) -> Result<kube_fim_crds::FileChange, kube::Error> {
    let approval = kube_fim_crds::Approval {
        approved_by: whoami(client).await,
        approved_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ),
        reason: Some(reason.to_string()),
        paths: Vec::new(),
    };
    kube::Api::<kube_fim_crds::FileChange>::all(client.clone())
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"approval": approval}})),
        )
        .await
}

/// A kubeconfig for the control plane that logs in with `token`.
fn token_kubeconfig(label: &str, token: &str) -> PathBuf {
    let admin: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(kubeconfig()).expect("kubeconfig readable"),
    )
    .expect("kubeconfig is YAML");
    let cluster = &admin["clusters"][0]["cluster"];
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster["server"].as_str().expect("server"),
            "certificate-authority-data": cluster["certificate-authority-data"].as_str().expect("CA"),
        }}],
        "users": [{"name": label, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": label}}],
        "current-context": "local",
    });
    let dir = repo_root().join("target/e2e-kubeconfigs");
    std::fs::create_dir_all(&dir).expect("create kubeconfig dir");
    let path = dir.join(format!("{label}-{}.yaml", std::process::id()));
    std::fs::write(&path, serde_saphyr::to_string(&config).expect("YAML"))
        .expect("write kubeconfig");
    path
}

/// A FileChange as the agent of `node` reports it under `policy`: by default a
/// realtime modification of `/etc/sudoers` (entry `etc`) with its hash before
/// (`a…`) and after (`b…`), and kube-fim's node, policy and category labels.
/// [`ChangeFixture::path`] and [`ChangeFixture::category`] vary it.
pub struct ChangeFixture {
    name: String,
    node: String,
    policy: String,
    path: String,
    category: kube_fim_crds::ChangeCategory,
}

impl ChangeFixture {
    pub fn new(name: &str, node: &str, policy: &str) -> ChangeFixture {
        ChangeFixture {
            name: name.into(),
            node: node.into(),
            policy: policy.into(),
            path: "/etc/sudoers".into(),
            category: kube_fim_crds::ChangeCategory::Modified,
        }
    }

    /// The file that changed.
    pub fn path(mut self, path: &str) -> ChangeFixture {
        self.path = path.into();
        self
    }

    /// Added (no state before), Removed (none after) or Modified (both).
    pub fn category(mut self, category: kube_fim_crds::ChangeCategory) -> ChangeFixture {
        self.category = category;
        self
    }

    pub fn build(self) -> kube_fim_crds::FileChange {
        use kube_fim_crds::labels::{CATEGORY, NODE, POLICY, label_value};
        use kube_fim_crds::{
            Attribute, ChangeCategory, DetectionSource, FileAttributes, FileChange, FileChangeSpec,
        };
        let hash = |c: &str| FileAttributes {
            hash: Some(c.repeat(64)),
            ..FileAttributes::default()
        };
        let category = self.category;
        let mut fc = FileChange::new(
            &self.name,
            FileChangeSpec {
                node: self.node.clone(),
                policy: self.policy.clone(),
                entry: "etc".into(),
                path: self.path,
                category,
                changed_attributes: if category == ChangeCategory::Modified {
                    vec![Attribute::Hash]
                } else {
                    vec![]
                },
                before: (category != ChangeCategory::Added).then(|| hash("a")),
                after: (category != ChangeCategory::Removed).then(|| hash("b")),
                detected_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                package: None,
                restored: None,
                container: None,
            },
        );
        fc.metadata.labels = Some(std::collections::BTreeMap::from([
            (NODE.to_string(), label_value(&self.node)),
            (POLICY.to_string(), label_value(&self.policy)),
            (CATEGORY.to_string(), category.as_str().to_string()),
        ]));
        fc
    }
}

/// [`ChangeFixture`] with its defaults.
pub fn file_change(name: &str, node: &str, policy: &str) -> kube_fim_crds::FileChange {
    ChangeFixture::new(name, node, policy).build()
}

/// Creates a policy watching `/etc/passwd` on the suite's nodes (label
/// `role=<suite>`), labelled with the suite; the policies' API.
pub async fn create_passwd_policy(
    client: &kube::Client,
    name: &str,
    suite: &str,
) -> kube::Api<kube_fim_crds::FileIntegrityPolicy> {
    let p = Policy::named(name)
        .label(operator::SUITE_LABEL, suite)
        .node_selector("role", suite)
        .path(Entry::new("passwd", "/etc/passwd"))
        .build();
    let policies: kube::Api<kube_fim_crds::FileIntegrityPolicy> = kube::Api::all(client.clone());
    policies
        .create(&kube::api::PostParams::default(), &p)
        .await
        .expect("create policy");
    policies
}

/// The sum of the API server's samples of `metric` whose labels include all of
/// `labels` (e.g. `apiserver_request_total` with `verb=LIST`), from its /metrics.
pub fn apiserver_metric(metric: &str, labels: &[(&str, &str)]) -> f64 {
    let run = kubectl(["get", "--raw", "/metrics"]);
    assert!(run.success, "apiserver /metrics: {}", run.stderr);
    metric_sum(&run.stdout, metric, labels)
}

/// What `kubectl get fip POLICY -o wide` shows in `column` (e.g. `CHANGES(24H)`).
pub fn policy_column(policy: &str, column: &str) -> String {
    let run = kubectl(["get", "fip", policy, "--no-headers", "-o", "wide"]);
    assert!(run.success, "{}", run.stderr);
    let header = kubectl(["get", "fip", policy, "-o", "wide"]);
    let columns: Vec<&str> = header
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let at = columns
        .iter()
        .position(|c| *c == column)
        .unwrap_or_else(|| panic!("a {column} column: {columns:?}"));
    run.stdout
        .split_whitespace()
        .nth(at)
        .unwrap_or_default()
        .to_string()
}

/// A Node object with `labels` and no kubelet: for node-bound tokens and
/// selection (the node lifecycle controller marks it unreachable after ~40 s;
/// tests that need it Ready use the fleet harness, which renews its Lease).
pub async fn create_node(client: &kube::Client, name: &str, labels: &[(&str, &str)]) {
    use k8s_openapi::api::core::v1::Node;
    let mut node = Node::default();
    node.metadata.name = Some(name.to_string());
    if !labels.is_empty() {
        node.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    kube::Api::<Node>::all(client.clone())
        .create(&Default::default(), &node)
        .await
        .unwrap();
}

/// Deletes Node `name` if it exists.
pub async fn delete_node(client: &kube::Client, name: &str) {
    let _ = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .delete(name, &Default::default())
        .await;
}

/// The refusal of `result` as the user sees it: the API server's message of a
/// 403 (authorization, admission) or 422 (schema, CEL). Anything else fails.
pub fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Ok(v) => panic!("accepted (the attack works): {v:?}"),
        Err(kube::Error::Api(e)) => {
            assert!(
                e.code == 403 || e.code == 422,
                "refused with {}: {}",
                e.code,
                e.message
            );
            e.message
        }
        Err(e) => panic!("not an API refusal: {e}"),
    }
}

/// `result` is refused, and the refusal names `expected`.
pub fn assert_refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, expected: &str) {
    let message = refusal(result);
    assert!(
        message.contains(expected),
        "refusal should say {expected:?}: {message}"
    );
}
