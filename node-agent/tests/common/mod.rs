//! What the agent's integration tests share beyond `kube-fim-testkit`: running
//! the real `kube-fim-agent` binary on a temporary host root, reading its JSON
//! changes, and driving a `watch` child process.
// Each test binary uses some of it: what one leaves unused is not dead.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unused_imports
)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use kube_fim_testkit::{
    Entry, Policy, Run, drain, free_port, http_get, metric_where, run_with_timeout, wait_for,
};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_kube-fim-agent");

/// The JSON change objects an agent run printed on stdout (`--output json`).
pub trait Changes {
    fn changes(&self) -> Vec<Value>;
}

impl Changes for Run {
    fn changes(&self) -> Vec<Value> {
        parse_lines(&self.stdout)
    }
}

pub fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Runs the agent with `args`.
pub fn agent(args: &[&str], timeout: Duration) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "warn");
    run_with_timeout(cmd, timeout)
}

/// A host root, a state directory and a policy file in one temporary directory.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state: PathBuf,
    pub policy: PathBuf,
}

impl Host {
    /// A host whose policy file is `policy`.
    pub fn with(policy: &Policy) -> Host {
        Host::new(&policy.yaml())
    }

    /// A host whose policy file holds `policy_yaml` (for files that are not a
    /// valid policy).
    pub fn new(policy_yaml: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let root = base.join("root");
        let state = base.join("state");
        let policy = base.join("policy.yaml");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(&policy, policy_yaml).unwrap();
        Host {
            dir,
            root,
            state,
            policy,
        }
    }

    /// The path of host path `p` (`/etc/hosts`) inside the root.
    pub fn p(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// Writes a file (creating its directories).
    pub fn write(&self, host_path: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.p(host_path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn args<'a>(&'a self, cmd: &'a str) -> Vec<&'a str> {
        vec![
            cmd,
            "--policy",
            self.policy.to_str().unwrap(),
            "--root",
            self.root.to_str().unwrap(),
            "--state",
            self.state.to_str().unwrap(),
        ]
    }

    pub fn baseline(&self) -> Run {
        let r = agent(&self.args("baseline"), Duration::from_secs(60));
        assert_eq!(r.code(), 0, "baseline failed: {r:?}");
        assert!(r.stdout.starts_with("baseline: "), "summary line: {r:?}");
        r
    }

    pub fn check_json(&self) -> Run {
        let mut a = self.args("check");
        a.extend(["--output", "json"]);
        agent(&a, Duration::from_secs(60))
    }

    /// Starts `watch --output json` with metrics on a free port, and waits
    /// until its startup scan is done (`/readyz`).
    pub fn watch(&self) -> Watch {
        self.watch_via(&[])
    }

    /// [`Host::watch`], the agent started through `wrapper` (e.g. `setpriv
    /// --bounding-set=-sys_admin --`), or directly when it is empty.
    pub fn watch_via(&self, wrapper: &[&str]) -> Watch {
        self.spawn_watch(wrapper, None, self.root.to_str().unwrap())
    }

    /// [`Host::watch`] in the working directory `cwd`, given the root as
    /// `root` (relative to `cwd`, or through a symbolic link).
    pub fn watch_from(&self, cwd: &Path, root: &str) -> Watch {
        self.spawn_watch(&[], Some(cwd), root)
    }

    fn spawn_watch(&self, wrapper: &[&str], cwd: Option<&Path>, root: &str) -> Watch {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut a = self.args("watch");
        a[4] = root;
        a.extend(["--output", "json", "--metrics-addr", &addr]);
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd
            .args(&a)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = drain(child.stderr.take().unwrap());
        let mut w = Watch {
            child,
            lines: rx,
            port,
            stderr: Some(stderr),
        };
        w.wait_ready(Duration::from_secs(30));
        w
    }
}

/// A running `watch`.
pub struct Watch {
    pub child: Child,
    pub lines: mpsc::Receiver<(Instant, String)>,
    /// Where its metrics and probes answer, on 127.0.0.1.
    pub port: u16,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Watch {
    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if http_get(self.port, "/readyz").is_some() {
                return;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("watch exited early ({s}): {}", self.take_stderr());
            }
            assert!(Instant::now() < deadline, "watch not ready in {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The next change line, if one comes within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<(Instant, Value)> {
        self.lines
            .recv_timeout(timeout)
            .ok()
            .map(|(t, l)| (t, serde_json::from_str(&l).expect("a JSON change line")))
    }

    /// Every change line printed within `window`.
    pub fn collect(&self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some((_, v)) => out.push(v),
                None => break,
            }
        }
        out
    }

    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics").expect("metrics answer 200")
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns the exit status (within `timeout`).
    pub fn terminate(mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("watch did not stop on SIGTERM within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The (category, path) pairs of changes, sorted.
pub fn summary(changes: &[Value]) -> BTreeSet<(String, String)> {
    changes
        .iter()
        .map(|c| {
            (
                c["category"].as_str().unwrap().to_string(),
                c["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The change for `path`, exactly one.
pub fn only<'a>(changes: &'a [Value], path: &str) -> &'a Value {
    let hits: Vec<&Value> = changes.iter().filter(|c| c["path"] == path).collect();
    assert_eq!(hits.len(), 1, "one change for {path}: {changes:#?}");
    hits[0]
}

/// The changed attribute names of a change.
pub fn attrs(change: &Value) -> Vec<String> {
    change["changedAttributes"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Sets a file's mtime into the past, so that any later write visibly moves it.
pub fn age(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        .unwrap();
}
