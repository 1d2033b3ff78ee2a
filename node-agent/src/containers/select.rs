//! Which running containers of the node's pods a policy watches: plain
//! decisions on the pods the API server holds.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube_fim_crds::{ContainerRef, ContainerSelection};

/// A running container of a pod, as its pod's status names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub reference: ContainerRef,
    /// The id without its runtime prefix (`containerd://`), as cgroups name it.
    pub bare_id: String,
}

/// The running containers (init, regular and ephemeral) of a pod.
pub fn running(pod: &Pod) -> Vec<Running> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let all = [
        &status.init_container_statuses,
        &status.container_statuses,
        &status.ephemeral_container_statuses,
    ];
    all.into_iter()
        .flatten()
        .flatten()
        .filter(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
        .filter_map(|s| {
            let id = s.container_id.clone()?;
            let bare_id = id.rsplit("://").next().unwrap_or(&id).to_string();
            // An id is a path component of cgroups: nothing else is looked for.
            if bare_id.is_empty() || !bare_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            Some(Running {
                reference: ContainerRef {
                    namespace: pod.namespace().unwrap_or_default(),
                    pod: pod.name_any(),
                    pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                    name: s.name.clone(),
                    id,
                    image: Some(s.image.clone()).filter(|i| !i.is_empty()),
                    image_digest: Some(s.image_id.clone()).filter(|i| !i.is_empty()),
                },
                bare_id,
            })
        })
        .collect()
}

/// Whether `pattern` (`name`, `prefix*`, optionally `namespace/` first) names the pod.
fn names(pattern: &str, namespace: &str, pod: &str) -> bool {
    let (ns, name) = match pattern.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, pattern),
    };
    if ns.is_some_and(|ns| ns != namespace) {
        return false;
    }
    match name.strip_suffix('*') {
        Some(prefix) => pod.starts_with(prefix),
        None => pod == name,
    }
}

/// Whether the selection takes the pod's containers.
pub fn selects(sel: &ContainerSelection, pod: &Pod) -> bool {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    if !sel.namespaces.is_empty() && !sel.namespaces.contains(&namespace) {
        return false;
    }
    let labels = pod.labels();
    if !sel
        .pod_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    !sel.exclude_pods.iter().any(|p| names(p, &namespace, &name))
}

/// The selection's excluded paths, relative to the container's `/`.
pub fn excludes(sel: &ContainerSelection) -> Vec<PathBuf> {
    sel.exclude
        .iter()
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
        .filter(|p| {
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, PodStatus,
    };
    use std::collections::BTreeMap;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some("u-1".into());
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn namespaces_labels_and_excluded_pods_select() {
        let sel = ContainerSelection {
            namespaces: vec!["shop".into()],
            pod_selector: BTreeMap::from([("app".into(), "web".into())]),
            exclude_pods: vec!["web-build-*".into(), "other/web-1".into()],
            ..ContainerSelection::default()
        };
        assert!(selects(&sel, &pod("shop", "web-1", &[("app", "web")])));
        assert!(!selects(&sel, &pod("shop", "web-1", &[("app", "db")])));
        assert!(!selects(&sel, &pod("dev", "web-1", &[("app", "web")])));
        assert!(!selects(
            &sel,
            &pod("shop", "web-build-7", &[("app", "web")])
        ));
        let all = ContainerSelection {
            exclude_pods: vec!["shop/web-1".into()],
            ..ContainerSelection::default()
        };
        assert!(!selects(&all, &pod("shop", "web-1", &[])));
        assert!(selects(&all, &pod("dev", "web-1", &[])));
    }

    #[test]
    fn only_running_containers_with_a_plain_id_are_taken() {
        let mut p = pod("shop", "web-1", &[]);
        let status = |name: &str, id: &str, running: bool| ContainerStatus {
            name: name.into(),
            container_id: Some(id.into()),
            image: "localhost/web:1".into(),
            image_id: "sha256:abc".into(),
            state: Some(if running {
                ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..ContainerState::default()
                }
            } else {
                ContainerState {
                    terminated: Some(ContainerStateTerminated::default()),
                    ..ContainerState::default()
                }
            }),
            ..ContainerStatus::default()
        };
        p.status = Some(PodStatus {
            container_statuses: Some(vec![
                status("web", "containerd://abc123", true),
                status("old", "containerd://def456", false),
                status("evil", "containerd://../../etc", true),
            ]),
            ..PodStatus::default()
        });
        let r = running(&p);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].bare_id, "abc123");
        assert_eq!(r[0].reference.name, "web");
        assert_eq!(r[0].reference.image_digest.as_deref(), Some("sha256:abc"));
    }
}
