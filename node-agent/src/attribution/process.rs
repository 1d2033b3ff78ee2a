//! A snapshot of the process that caused an event, read from `/proc/<pid>`
//! right when the event is read (the writer may exit a moment later).

use std::path::Path;

use super::cgroup::{CgroupInfo, parse_proc_cgroup};

/// What `/proc` said about one process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessSnapshot {
    pub pid: i32,
    pub command: Option<String>,
    pub exe: Option<String>,
    pub uid: Option<u32>,
    pub ppid: Option<i32>,
    /// The audit login uid; absent when unset (4294967295) or not compiled in.
    pub loginuid: Option<u32>,
    pub cgroup: CgroupInfo,
    /// The process was gone before its entries could be read.
    pub exited: bool,
}

/// `Uid:` (real) and `PPid:` from `/proc/<pid>/status`.
fn parse_status(text: &str) -> (Option<u32>, Option<i32>, bool) {
    let mut uid = None;
    let mut ppid = None;
    let mut zombie = false;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uid = v.split_whitespace().next().and_then(|s| s.parse().ok());
        } else if let Some(v) = line.strip_prefix("PPid:") {
            ppid = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("State:") {
            zombie = v.trim_start().starts_with('Z');
        }
    }
    (uid, ppid, zombie)
}

/// Reads the snapshot of `pid` under `proc` (`/proc`, or the host's through a
/// mount). Every field is best effort: a process can exit between two reads.
pub fn snapshot(proc: &Path, pid: i32) -> ProcessSnapshot {
    let dir = proc.join(pid.to_string());
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let status = read("status");
    // An exited process not yet reaped (a zombie) keeps its status and
    // command, but no longer its executable or its cgroup (`0::/`, which
    // reads as a host process): it is said to have exited, never taken for
    // a host process.
    let (uid, ppid, zombie) = status
        .as_deref()
        .map(parse_status)
        .unwrap_or((None, None, false));
    let command = read("comm").map(|s| s.trim_end_matches('\n').to_string());
    let exe = std::fs::read_link(dir.join("exe"))
        .ok()
        .map(|p| crate::paths::escape(p.as_os_str()));
    let loginuid = read("loginuid")
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|u| *u != u32::MAX);
    let cgroup = read("cgroup")
        .map(|s| parse_proc_cgroup(&s))
        .unwrap_or_default();
    ProcessSnapshot {
        pid,
        exited: zombie || (status.is_none() && command.is_none()),
        command,
        exe,
        uid,
        ppid,
        loginuid,
        cgroup,
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let s = "Name:\tsshd\nPPid:\t1\nTracerPid:\t0\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_status(s), (Some(1000), Some(1), false));
    }

    #[test]
    fn a_writer_that_exited_before_it_was_read_is_said_to_have_exited() {
        // `sh -c 'echo x > f'` in a container exits at once; read before its
        // parent reaps it, its status and command are still there, its
        // cgroup reads `0::/` (a host process, in appearance).
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seen = snapshot(Path::new("/proc"), pid);
        while !seen.exited && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            seen = snapshot(Path::new("/proc"), pid);
        }
        assert!(seen.exited, "a zombie is an exited writer: {seen:?}");
        assert_eq!(seen.command.as_deref(), Some("true"));
        child.wait().expect("reap");
    }

    #[test]
    fn own_process() {
        let me = snapshot(Path::new("/proc"), std::process::id() as i32);
        assert!(!me.exited);
        assert!(me.command.is_some());
        assert!(me.exe.is_some());
        assert_eq!(me.uid, Some(rustix::process::getuid().as_raw()));
        assert_eq!(
            me.ppid,
            Some(rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()))
        );
    }

    #[test]
    fn gone_process() {
        // Pid numbers stop below 2^22 on Linux.
        let gone = snapshot(Path::new("/proc"), 1 << 23);
        assert!(gone.exited);
        assert_eq!(gone.command, None);
    }
}
