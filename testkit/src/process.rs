//! Processes a test runs: commands awaited with a deadline ([`run_with_timeout`]),
//! and long-running ones killed when the test ends however it ends ([`Process`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    /// `status.success()`, as a field for assertions.
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The exit code, -1 when a signal ended the command.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            status: out.status,
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Reads `r` to its end on a thread of its own (a pipe left unread would block
/// its writer); the text, once the writer closes it.
pub fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` to completion (no standard input), killing it and failing the
/// test after `timeout`: a hang is a failure, not a stuck test run.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let out = drain(child.stdout.take().expect("stdout is piped"));
    let err = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the child") {
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
        success: status.success(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A process started by a test, killed when the test ends however it ends;
/// its output goes to a log file, printed when the test fails.
pub struct Process {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, logged in with `kubeconfig`, its output
    /// going to `target/e2e-logs/<name>.log`.
    pub fn start(name: &str, program: &Path, args: &[String], kubeconfig: &Path) -> Process {
        let mut command = Command::new(program);
        command.args(args).env("KUBECONFIG", kubeconfig).env(
            "RUST_LOG",
            std::env::var("KUBE_FIM_E2E_LOG")
                .unwrap_or_else(|_| "info,kube_client=warn,kube_runtime=warn".into()),
        );
        Process::spawn(name, command)
    }

    /// Starts `command`, its output going to `target/e2e-logs/<name>.log`.
    pub fn spawn(name: &str, mut command: Command) -> Process {
        let dir = crate::repo_root().join("target/e2e-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = command
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        Process { child, log }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} ----\n{}",
                self.log.display(),
                tail(&self.log(), 60)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
