//! Who changed a file: the process, user, and pod behind each change, from
//! fanotify events and `/proc`, joined to the changes the agent detects.
//!
//! - [`fanotify`]: the listener (inode marks on the monitored directories,
//!   filtered by the kernel; directory handle + name; the writer read from
//!   `/proc` at once);
//! - [`process`]: that `/proc` snapshot;
//! - [`cgroup`]: the cgroup path parsed into container id and pod uid;
//! - [`pods`]: the pods of this node, to name the pod and container;
//! - the system calls no crate wraps are in [`crate::sys`].
//!
//! Where fanotify is not available the agent keeps using inotify and says
//! why ([`fanotify::Unavailable`]).

pub mod cgroup;
pub mod fanotify;
pub mod join;
pub mod pods;
pub mod process;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kube_fim_crds::{AttributionLimit, PodRef, ProcessInfo};

use self::pods::PodIndex;
use self::process::ProcessSnapshot;

/// State of attribution on this node, for the FileIntegrityNode and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttributionState {
    /// Attribution is on: fanotify reports the writers.
    pub active: bool,
    /// Why it is off (when it was asked for and could not be had).
    pub reason: Option<String>,
    /// Short reason label for the metric.
    pub reason_label: Option<&'static str>,
    /// Kernel features in use (`FAN_REPORT_DFID_NAME`, `FAN_REPORT_PIDFD`,
    /// and the marks in force: `FAN_MARK_INODE`, `FAN_MARK_FILESYSTEM`).
    pub features: Vec<&'static str>,
    /// Directories with an inode mark (the kernel filters), file systems
    /// marked whole (the agent filters), directories followed through both.
    pub inode_marks: usize,
    pub fs_marks: usize,
    pub dirs: usize,
}

/// User names of the node's `/etc/passwd`, read once per miss.
#[derive(Debug, Default)]
pub struct Users {
    passwd: PathBuf,
    names: HashMap<u32, Option<String>>,
}

impl Users {
    pub fn new(root: &Path) -> Self {
        Users {
            passwd: root.join("etc/passwd"),
            names: HashMap::new(),
        }
    }

    pub fn name(&mut self, uid: u32) -> Option<String> {
        if let Some(n) = self.names.get(&uid) {
            return n.clone();
        }
        let found = std::fs::read_to_string(&self.passwd).ok().and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id: u32 = f.nth(1)?.parse().ok()?;
                (id == uid).then(|| name.to_string())
            })
        });
        self.names.insert(uid, found.clone());
        found
    }
}

/// The ProcessInfo of a writer: the snapshot, its user name, its pod.
pub fn process_info(
    w: &ProcessSnapshot,
    users: &mut Users,
    pods: Option<&PodIndex>,
    other_writers: bool,
) -> ProcessInfo {
    let mut limits = Vec::new();
    if w.pid <= 0 {
        limits.push(AttributionLimit::NotInPidNamespace);
    } else if w.exited {
        limits.push(AttributionLimit::WriterExited);
    }
    if other_writers {
        limits.push(AttributionLimit::MultipleWriters);
    }
    let pod = w.cgroup.pod_uid.as_ref().map(|uid| {
        let found = pods.and_then(|p| p.lookup(uid, w.cgroup.container_id.as_deref()));
        match found {
            Some(p) => p,
            None => {
                limits.push(AttributionLimit::PodUnknown);
                PodRef {
                    uid: uid.clone(),
                    ..PodRef::default()
                }
            }
        }
    });
    let mut info = ProcessInfo {
        by: None,
        pid: w.pid.max(0),
        command: w.command.clone(),
        exe: w.exe.clone(),
        ppid: w.ppid,
        uid: w.uid,
        user: w.uid.and_then(|u| users.name(u)),
        login_uid: w.loginuid,
        cgroup: (!w.cgroup.path.is_empty()).then(|| w.cgroup.path.clone()),
        unit: w.cgroup.unit.clone(),
        container_id: w.cgroup.container_id.clone(),
        pod,
        limits,
    };
    info.by = Some(by(&info));
    info
}

/// The one-line "who": `sshd (pid 812, uid 0)`, `pod ns/name (container c)`.
pub fn by(p: &ProcessInfo) -> String {
    if let Some(pod) = &p.pod {
        let name = match (&pod.namespace, &pod.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            _ => format!("uid {}", pod.uid),
        };
        let container = pod.container.as_deref().map_or_else(
            || {
                p.container_id
                    .as_deref()
                    .and_then(|c| c.rsplit('/').next())
                    .map(|id| format!("container {}", &id[..id.len().min(12)]))
            },
            |c| Some(format!("container {c}")),
        );
        return match container {
            Some(c) => format!("pod {name} ({c})"),
            None => format!("pod {name}"),
        };
    }
    if p.pid == 0 {
        return "a process outside the agent's pid namespace".into();
    }
    let command = p.command.as_deref().unwrap_or("exited process");
    let uid = p.uid.map(|u| format!(", uid {u}")).unwrap_or_default();
    let unit = p
        .unit
        .as_deref()
        .map(|u| format!(", {u}"))
        .unwrap_or_default();
    format!("{command} (pid {}{uid}{unit})", p.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_names_host_processes_and_pods() {
        let mut host = ProcessInfo {
            pid: 812,
            command: Some("sshd".into()),
            uid: Some(0),
            ..ProcessInfo::default()
        };
        assert_eq!(by(&host), "sshd (pid 812, uid 0)");
        host.unit = Some("ssh.service".into());
        assert_eq!(by(&host), "sshd (pid 812, uid 0, ssh.service)");
        let pod = ProcessInfo {
            pid: 4242,
            command: Some("sh".into()),
            pod: Some(PodRef {
                namespace: Some("kube-system".into()),
                name: Some("evil-7d9".into()),
                uid: "u".into(),
                container: Some("shell".into()),
            }),
            ..ProcessInfo::default()
        };
        assert_eq!(by(&pod), "pod kube-system/evil-7d9 (container shell)");
    }

    #[test]
    fn limits_are_named() {
        let gone = ProcessSnapshot {
            pid: 77,
            exited: true,
            ..ProcessSnapshot::default()
        };
        let info = process_info(&gone, &mut Users::default(), None, true);
        assert_eq!(
            info.limits,
            vec![
                AttributionLimit::WriterExited,
                AttributionLimit::MultipleWriters
            ]
        );
        assert_eq!(info.by.as_deref(), Some("exited process (pid 77)"));
    }
}
