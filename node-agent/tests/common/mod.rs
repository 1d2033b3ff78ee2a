//! Helpers shared by the integration tests: running the real `kube-fim-agent`
//! binary with timeouts, writing policies, reading JSON changes, driving a
//! `watch` child process and reading its metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_kube-fim-agent");

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// The JSON change objects printed on stdout (`--output json`).
    pub fn changes(&self) -> Vec<Value> {
        parse_lines(&self.stdout)
    }
}

pub fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` to completion, killing it (and failing the test) after `timeout`.
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning the agent");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?} (hang?); stderr: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs the agent with `args`.
pub fn agent(args: &[&str], timeout: Duration) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "warn");
    run_cmd(cmd, timeout)
}

/// A host root, a state directory and a policy file in one temporary directory.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state: PathBuf,
    pub policy: PathBuf,
}

impl Host {
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
            addr,
            stderr: Some(stderr),
        };
        w.wait_ready(Duration::from_secs(30));
        w
    }
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET; returns (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of the first sample of `name` whose labels contain every one of
/// `labels` (`category="Modified"`), in a Prometheus text exposition.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
}

/// A running `watch`.
pub struct Watch {
    pub child: Child,
    pub lines: mpsc::Receiver<(Instant, String)>,
    pub addr: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Watch {
    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(&self.addr, "/readyz") {
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
        let (code, body) = http_get(&self.addr, "/metrics").unwrap();
        assert_eq!(code, 200);
        body
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

/// A policy file with the given `spec.paths` entries (YAML list items, already
/// indented by four spaces) and extra spec lines.
pub fn policy(extra_spec: &str, paths: &str) -> String {
    format!(
        "apiVersion: fim.kube-fim.io/v1alpha1\nkind: FileIntegrityPolicy\nmetadata:\n  name: test\nspec:\n{extra_spec}  paths:\n{paths}"
    )
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

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sets a file's mtime into the past, so that any later write visibly moves it.
pub fn age(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        .unwrap();
}
