//! The pods of this node, by uid, to name the pod and container a cgroup
//! path points to. Fed by a watch on the node's pods only
//! (`spec.nodeName=<node>`): the agent needs `list`/`watch` on pods, nothing more.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use kube_fim_crds::PodRef;
use tracing::warn;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PodEntry {
    namespace: String,
    name: String,
    /// `containerStatuses[].containerID` (all kinds of containers) → name.
    containers: HashMap<String, String>,
}

/// Shared, cheaply cloned index of the node's pods.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    pods: Arc<RwLock<HashMap<String, PodEntry>>>,
}

fn entry(pod: &Pod) -> Option<(String, PodEntry)> {
    let uid = pod.metadata.uid.clone()?;
    let mut containers = HashMap::new();
    if let Some(status) = &pod.status {
        let all = [
            &status.container_statuses,
            &status.init_container_statuses,
            &status.ephemeral_container_statuses,
        ];
        for s in all.into_iter().flatten().flatten() {
            if let Some(id) = &s.container_id {
                containers.insert(id.clone(), s.name.clone());
            }
        }
    }
    Some((
        uid,
        PodEntry {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            containers,
        },
    ))
}

impl PodIndex {
    /// Records a pod as the API server has it.
    pub fn upsert(&self, pod: &Pod) {
        if let (Some((uid, e)), Ok(mut pods)) = (entry(pod), self.pods.write()) {
            pods.insert(uid, e);
        }
    }

    fn remove(&self, pod: &Pod) {
        if let (Some(uid), Ok(mut pods)) = (&pod.metadata.uid, self.pods.write()) {
            pods.remove(uid);
        }
    }

    /// The pod (and container) of a pod uid and container id.
    pub fn lookup(&self, uid: &str, container_id: Option<&str>) -> Option<PodRef> {
        let pods = self.pods.read().ok()?;
        let e = pods.get(uid)?;
        Some(PodRef {
            namespace: Some(e.namespace.clone()),
            name: Some(e.name.clone()),
            uid: uid.to_string(),
            container: container_id.and_then(|c| e.containers.get(c).cloned()),
        })
    }

    /// Keeps the index current until the stream ends (never, normally): a
    /// watch of the pods scheduled on `node`, with the watcher's backoff.
    pub async fn follow(self, client: Client, node: String) {
        let api: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let stream = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(api, cfg));
        let mut stream = std::pin::pin!(stream);
        let mut fresh: Option<HashMap<String, PodEntry>> = None;
        loop {
            match stream.try_next().await {
                Ok(Some(Event::Apply(p))) => self.upsert(&p),
                Ok(Some(Event::Delete(p))) => self.remove(&p),
                Ok(Some(Event::Init)) => fresh = Some(HashMap::new()),
                Ok(Some(Event::InitApply(p))) => {
                    if let (Some(f), Some((uid, e))) = (fresh.as_mut(), entry(&p)) {
                        f.insert(uid, e);
                    }
                }
                Ok(Some(Event::InitDone)) => {
                    if let (Some(f), Ok(mut pods)) = (fresh.take(), self.pods.write()) {
                        *pods = f;
                    }
                }
                Ok(None) => return,
                Err(error) => warn!(%error, "watching this node's pods"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerStatus, PodStatus};

    #[test]
    fn lookup_names_pod_and_container() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("evil-7d9".into());
        pod.metadata.namespace = Some("kube-system".into());
        pod.metadata.uid = Some("u-1".into());
        pod.status = Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "shell".into(),
                container_id: Some("containerd://abc".into()),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
        let idx = PodIndex::default();
        idx.upsert(&pod);
        let r = idx.lookup("u-1", Some("containerd://abc"));
        assert_eq!(
            r,
            Some(PodRef {
                namespace: Some("kube-system".into()),
                name: Some("evil-7d9".into()),
                uid: "u-1".into(),
                container: Some("shell".into()),
            })
        );
        assert_eq!(
            idx.lookup("u-1", Some("cri-o://x"))
                .and_then(|p| p.container),
            None
        );
        assert_eq!(idx.lookup("u-2", None), None);
        idx.remove(&pod);
        assert_eq!(idx.lookup("u-1", None), None);
    }
}
