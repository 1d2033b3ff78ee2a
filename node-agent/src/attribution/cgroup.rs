//! What a process's cgroup path says about it: the container and pod the
//! kubelet placed it in, or the systemd unit or login session of a host
//! process. Pure parsing of `/proc/<pid>/cgroup`, for the layouts the kubelet
//! makes with either cgroup driver and either runtime:
//!
//! | driver   | runtime    | leaf                                                                 |
//! |----------|------------|----------------------------------------------------------------------|
//! | systemd  | containerd | `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | systemd  | CRI-O      | `/kubepods.slice/…-pod<uid_>.slice/crio-<id>.scope` (`crio-conmon-<id>.scope` for its monitor) |
//! | cgroupfs | containerd | `/kubepods/besteffort/pod<uid>/<id>`                                  |
//! | cgroupfs | CRI-O      | `/kubepods/burstable/pod<uid>/crio-<id>`                              |
//!
//! The systemd driver writes the pod uid with `_` for `-`. A node that runs in
//! a container itself (kind) prefixes all of it (`/docker/<id>/kubepods/…`), so
//! the pod is found by its component, wherever it is.

/// The container runtime a cgroup path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl Runtime {
    /// The scheme Kubernetes writes in `containerStatuses[].containerID`.
    pub fn scheme(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
        }
    }
}

/// What one cgroup path tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The path itself (of the unified hierarchy, or of the v1 line that said most).
    pub path: String,
    /// The pod's uid, with dashes, as in `metadata.uid`.
    pub pod_uid: Option<String>,
    /// `containerd://<id>`, `cri-o://<id>`: the form of `containerStatuses[].containerID`.
    pub container_id: Option<String>,
    /// A host process's systemd unit (`sshd.service`) or session (`session-3.scope`).
    pub unit: Option<String>,
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pod uid in one path component (`pod<uid>` or `…-pod<uid_>.slice`).
fn pod_uid(component: &str) -> Option<String> {
    let rest = if let Some(slice) = component.strip_suffix(".slice") {
        let i = slice.rfind("-pod")?;
        &slice[i + 4..]
    } else {
        component.strip_prefix("pod")?
    };
    let uid = rest.replace('_', "-");
    let valid = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        });
    valid.then_some(uid)
}

/// The container id in the component below a pod.
fn container(component: &str) -> Option<(Runtime, String)> {
    let c = component.strip_suffix(".scope").unwrap_or(component);
    let (runtime, id) = if let Some(id) = c.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, id)
    } else if let Some(id) = c.strip_prefix("crio-conmon-") {
        (Runtime::CriO, id)
    } else if let Some(id) = c.strip_prefix("crio-") {
        (Runtime::CriO, id)
    } else if let Some(id) = c.strip_prefix("docker-") {
        (Runtime::Docker, id)
    } else if is_hex_id(c) {
        // The cgroupfs driver with containerd (or dockershim) names the leaf by the bare id.
        (Runtime::Containerd, c)
    } else {
        return None;
    };
    is_hex_id(id).then(|| (runtime, id.to_string()))
}

/// Parses one cgroup path.
pub fn parse_path(path: &str) -> CgroupInfo {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut info = CgroupInfo {
        path: path.to_string(),
        ..CgroupInfo::default()
    };
    if let Some(i) = parts.iter().position(|c| pod_uid(c).is_some()) {
        info.pod_uid = pod_uid(parts[i]);
        if let Some((runtime, id)) = parts.get(i + 1).and_then(|c| container(c)) {
            info.container_id = Some(format!("{}://{id}", runtime.scheme()));
        }
        return info;
    }
    info.unit = parts
        .iter()
        .rev()
        .find(|c| c.ends_with(".service") || (c.ends_with(".scope") && c.starts_with("session-")))
        .map(|c| c.to_string());
    info
}

/// Parses `/proc/<pid>/cgroup`: the unified (v2) line, or on a v1 host the
/// controller line that names a pod (the kubelet places a container in every
/// controller), else the `name=systemd` line.
pub fn parse_proc_cgroup(text: &str) -> CgroupInfo {
    let mut unified = None;
    let mut systemd = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let info = parse_path(path);
        if info.pod_uid.is_some() {
            return info;
        }
        if controllers.is_empty() {
            unified = Some(info);
        } else if controllers == "name=systemd" {
            systemd = Some(info);
        }
    }
    match (unified, systemd) {
        (Some(u), _) if u.path != "/" => u,
        (_, Some(s)) => s,
        (Some(u), None) => u,
        (None, None) => CgroupInfo::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8d3f0a6e-2c4b-4f1e-9a7d-5b6c7d8e9f01";
    const ID: &str = "4c1bd6f0bd9b0c7e3b5c0f3b9a0e4d2f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d";

    #[test]
    fn containerd_systemd_driver() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let i = parse_path(&p);
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id, Some(format!("containerd://{ID}")));
        assert_eq!(i.unit, None);
    }

    #[test]
    fn containerd_cgroupfs_driver_all_qos_classes() {
        for qos in ["besteffort/", "burstable/", ""] {
            let i = parse_path(&format!("/kubepods/{qos}pod{UID}/{ID}"));
            assert_eq!(i.pod_uid.as_deref(), Some(UID), "{qos}");
            assert_eq!(i.container_id, Some(format!("containerd://{ID}")));
        }
    }

    #[test]
    fn crio_systemd_driver_and_its_monitor() {
        let pod = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            UID.replace('-', "_")
        );
        let i = parse_path(&format!("{pod}/crio-{ID}.scope"));
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id, Some(format!("cri-o://{ID}")));
        let conmon = parse_path(&format!("{pod}/crio-conmon-{ID}.scope"));
        assert_eq!(conmon.container_id, Some(format!("cri-o://{ID}")));
    }

    #[test]
    fn crio_cgroupfs_driver() {
        let i = parse_path(&format!("/kubepods/burstable/pod{UID}/crio-{ID}"));
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id, Some(format!("cri-o://{ID}")));
    }

    #[test]
    fn guaranteed_pod_systemd_driver_and_pod_level_process() {
        let pod = format!(
            "/kubepods.slice/kubepods-pod{}.slice",
            UID.replace('-', "_")
        );
        let i = parse_path(&pod);
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id, None);
    }

    #[test]
    fn node_in_a_container_kind() {
        let i = parse_path(&format!(
            "/docker/{ID}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        ));
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id, Some(format!("containerd://{ID}")));
    }

    #[test]
    fn host_processes_name_their_unit_or_session() {
        assert_eq!(
            parse_path("/system.slice/ssh.service").unit.as_deref(),
            Some("ssh.service")
        );
        assert_eq!(
            parse_path("/user.slice/user-1000.slice/session-3.scope")
                .unit
                .as_deref(),
            Some("session-3.scope")
        );
        let i = parse_path("/user.slice/user-0.slice/user@0.service/app.slice/foo.scope");
        assert_eq!(i.unit.as_deref(), Some("user@0.service"));
        assert_eq!(i.pod_uid, None);
        assert_eq!(parse_path("/").unit, None);
    }

    #[test]
    fn near_misses_are_not_pods() {
        assert_eq!(
            parse_path("/kubepods/burstable/podnot-a-uid/x").pod_uid,
            None
        );
        assert_eq!(parse_path("/system.slice/podman.service").pod_uid, None);
        let short = parse_path(&format!("/kubepods/pod{UID}/cri-containerd-abc.scope"));
        assert_eq!(short.pod_uid.as_deref(), Some(UID));
        assert_eq!(short.container_id, None);
    }

    #[test]
    fn proc_cgroup_v2_v1_and_hybrid() {
        let v2 = "0::/system.slice/containerd.service\n";
        assert_eq!(
            parse_proc_cgroup(v2).unit.as_deref(),
            Some("containerd.service")
        );
        let v1 = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
        );
        let i = parse_proc_cgroup(&v1);
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id, Some(format!("containerd://{ID}")));
        let hybrid = "4:memory:/\n1:name=systemd:/system.slice/kubelet.service\n0::/\n";
        assert_eq!(
            parse_proc_cgroup(hybrid).unit.as_deref(),
            Some("kubelet.service")
        );
        assert_eq!(parse_proc_cgroup(""), CgroupInfo::default());
    }
}
