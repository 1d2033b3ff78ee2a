//! Helpers shared by the kube-fim integration tests.
//!
//! The tests run against the real control plane that `e2e/controlplane` builds
//! and starts (`make e2e` wraps `cargo test` in `controlplane.sh run`), which
//! exports `KUBECONFIG` for it. Nothing here fakes an API server answer.

// Test support: a failed precondition is a failed test, said as plainly as possible.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

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

/// Output of a command, decoded for assertions.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
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

/// Installs the committed CRD YAML (what users apply) once per test process and
/// waits until the API server reports both CRDs Established.
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
