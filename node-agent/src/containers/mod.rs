//! Container drift: what changed inside the running containers of this node,
//! against their images.
//!
//! The baseline of a container is its image, so nothing is hashed ahead: a
//! container's writable layer holds exactly its drift ([`overlay`]). The
//! containers come from the node's pods as the API server has them (the
//! kubelet writes what the runtime told it over CRI: container id, image,
//! image digest), so the agent needs no CRI socket, which has no read-only
//! mode (anyone who may list containers over it may also exec into them). A
//! container's layers come from the mount table of one of its processes
//! (found by the container id in `/proc/<pid>/cgroup`), read in the host's
//! procfs through the host root.
//!
//! Each pass (every [`PASS`], and at once when the pods change) reads every
//! selected container's upper directory and reports what differs from what it
//! reported for that container: a new or changed file, a whiteout, a reported
//! file gone again. The changes are numbered and queued by the monitoring
//! loop like host changes ([`crate::report`]); only once they are queued is
//! the container's reported state saved on the node (`containers/` in the
//! state directory), so an agent restart re-reports nothing already queued,
//! and a crash in between reports it again rather than losing it. A
//! restarted container is a new container (a new id, a new writable layer):
//! its old drift is not reported again. A container that is gone takes its
//! state with it; its FileChanges stay.

pub mod overlay;
pub mod select;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use kube_fim_crds::{ChangeCategory, DetectionSource, FileChangeSpec};
use tokio::sync::{Notify, RwLock, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::hostfs::HostRoot;
use crate::served::ServedPolicies;
use overlay::{Drifted, Layers};
use select::Running;

/// Drift changes to number and queue; the sender answers once they are queued.
pub type DriftBatch = (Vec<FileChangeSpec>, oneshot::Sender<()>);

/// The entry name of every drift change.
pub const ENTRY: &str = "containers";

/// How often every selected container is read again.
pub const PASS: Duration = Duration::from_secs(1);

/// What the drift task needs.
pub struct Settings {
    pub node: String,
    pub root: HostRoot,
    /// Where the agent's root is on the host (`/` for the host's own `/`).
    pub host_root: PathBuf,
    /// The agent's state directory.
    pub state: PathBuf,
}

/// The node's pods, by uid, kept by a watch.
#[derive(Clone, Default)]
struct Pods {
    pods: Arc<RwLock<HashMap<String, Arc<Pod>>>>,
    changed: Arc<Notify>,
}

impl Pods {
    async fn follow(self, client: Client, node: String) {
        let api: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let stream = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(api, cfg));
        let mut stream = std::pin::pin!(stream);
        let mut fresh: Option<HashMap<String, Arc<Pod>>> = None;
        loop {
            let event = match stream.try_next().await {
                Ok(Some(event)) => event,
                Ok(None) => return,
                Err(error) => {
                    warn!(%error, "watching this node's pods for containers");
                    continue;
                }
            };
            let mut pods = self.pods.write().await;
            match event {
                Event::Apply(p) => {
                    if let Some(uid) = p.metadata.uid.clone() {
                        pods.insert(uid, Arc::new(p));
                    }
                }
                Event::Delete(p) => {
                    if let Some(uid) = &p.metadata.uid {
                        pods.remove(uid);
                    }
                }
                Event::Init => fresh = Some(HashMap::new()),
                Event::InitApply(p) => {
                    if let (Some(f), Some(uid)) = (fresh.as_mut(), p.metadata.uid.clone()) {
                        f.insert(uid, Arc::new(p));
                    }
                }
                Event::InitDone => {
                    if let Some(f) = fresh.take() {
                        *pods = f;
                    }
                }
            }
            drop(pods);
            self.changed.notify_one();
        }
    }
}

/// What was reported for one container: per policy, path → state key.
type Reported = BTreeMap<String, BTreeMap<String, String>>;

/// One container being watched.
struct Watched {
    layers: Layers,
    reported: Reported,
}

/// The first process of the container `bare_id`, from the cgroups in `proc`.
fn process_of(proc: &Path, bare_id: &str) -> Option<u32> {
    let entries = std::fs::read_dir(proc).ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cgroup) = std::fs::read(entry.path().join("cgroup")) else {
            continue;
        };
        if cgroup
            .windows(bare_id.len())
            .any(|w| w == bare_id.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

fn state_file(state: &Path, bare_id: &str) -> PathBuf {
    state.join("containers").join(format!("{bare_id}.json"))
}

fn load(state: &Path, bare_id: &str) -> Reported {
    std::fs::read(state_file(state, bare_id))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Saves what was reported for a container (written aside, synced, renamed).
fn save(state: &Path, bare_id: &str, reported: &Reported) -> std::io::Result<()> {
    use std::io::Write;
    let path = state_file(state, bare_id);
    let dir = state.join("containers");
    std::fs::create_dir_all(&dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(reported).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(&dir)?.sync_all()
}

/// The changes between what was reported and the drift now, for one policy.
pub fn changes(
    reported: &BTreeMap<String, String>,
    now: &BTreeMap<String, Drifted>,
    executables_only: bool,
) -> Vec<(String, Drifted)> {
    let mut out = Vec::new();
    for (path, d) in now {
        if executables_only && !d.is_executable() {
            continue;
        }
        if reported.get(path) != Some(&d.key()) {
            out.push((path.clone(), d.clone()));
        }
    }
    // Reported, and gone from the writable layer: an added file deleted
    // again (dropped, run, removed), or a change undone.
    for path in reported.keys() {
        if !now.contains_key(path) {
            out.push((
                path.clone(),
                Drifted {
                    category: ChangeCategory::Removed,
                    before: None,
                    after: None,
                },
            ));
        }
    }
    out
}

/// The reported state after `changes` are queued.
fn apply(reported: &mut BTreeMap<String, String>, changes: &[(String, Drifted)]) {
    for (path, d) in changes {
        if d.category == ChangeCategory::Removed && d.before.is_none() {
            reported.remove(path);
        } else {
            reported.insert(path.clone(), d.key());
        }
    }
}

/// Runs the drift task until the monitoring loop is gone.
pub async fn run(
    client: Client,
    settings: Settings,
    mut served: watch::Receiver<ServedPolicies>,
    out: mpsc::Sender<DriftBatch>,
) {
    let pods = Pods::default();
    // The pod watch starts with the first policy selecting containers: an
    // agent without one costs the API server nothing more.
    let mut client = Some(client);
    let proc = settings.root.path().join("proc");
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut first_pass = true;
    loop {
        let policies: Vec<(String, kube_fim_crds::ContainerSelection)> = {
            let served = served.borrow_and_update();
            served
                .names()
                .filter_map(|n| {
                    let c = served.get(n)?.spec.containers.clone()?;
                    Some((n.to_string(), c))
                })
                .collect()
        };
        if !policies.is_empty()
            && let Some(client) = client.take()
        {
            tokio::spawn(pods.clone().follow(client, settings.node.clone()));
        }
        // The selected running containers, with the policies selecting each.
        let mut selected: BTreeMap<String, (Running, Vec<usize>)> = BTreeMap::new();
        if !policies.is_empty() {
            for pod in pods.pods.read().await.values() {
                let by: Vec<usize> = policies
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, sel))| select::selects(sel, pod))
                    .map(|(i, _)| i)
                    .collect();
                if by.is_empty() {
                    continue;
                }
                for r in select::running(pod) {
                    selected.insert(r.bare_id.clone(), (r, by.clone()));
                }
            }
        }
        // Gone (deleted, restarted, no longer selected): forgotten; its evidence stays.
        let gone: Vec<String> = watched
            .keys()
            .filter(|id| !selected.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            watched.remove(&id);
            let _ = std::fs::remove_file(state_file(&settings.state, &id));
            debug!(container = %id, "container gone");
        }
        let mut batch = Vec::new();
        let mut pending: Vec<(String, Reported)> = Vec::new();
        for (id, (running, by)) in &selected {
            if !watched.contains_key(id) {
                let layers = tokio::task::block_in_place(|| {
                    let pid = process_of(&proc, id)?;
                    let table = std::fs::read(proc.join(pid.to_string()).join("mountinfo")).ok()?;
                    overlay::layers_of(&table, &settings.host_root)
                });
                let Some(layers) = layers else {
                    debug!(container = %id, "no readable writable layer (yet)");
                    continue;
                };
                info!(pod = %running.reference.pod, container = %running.reference.name,
                      upper = %layers.upper.display(), "watching container drift");
                let reported = load(&settings.state, id);
                watched.insert(id.clone(), Watched { layers, reported });
            }
            let Some(w) = watched.get(id) else { continue };
            let mut next = w.reported.clone();
            let mut any = false;
            for i in by {
                let Some((policy, sel)) = policies.get(*i) else {
                    continue;
                };
                let excludes = select::excludes(sel);
                let (now, truncated) = tokio::task::block_in_place(|| {
                    overlay::drift(&settings.root, &w.layers, &excludes)
                });
                if truncated {
                    warn!(container = %id, "writable layer too large; read in part");
                }
                let mine = next.entry(policy.clone()).or_default();
                let found = changes(mine, &now, sel.executables_only);
                if found.is_empty() {
                    continue;
                }
                any = true;
                // Drift found at the agent's start was made while it was not looking.
                let source = if first_pass {
                    DetectionSource::Startup
                } else {
                    DetectionSource::Realtime
                };
                for (path, d) in &found {
                    batch.push(spec(&settings.node, policy, path, d, source, running));
                }
                apply(mine, &found);
            }
            if any {
                pending.push((id.clone(), next));
            }
        }
        if !batch.is_empty() {
            info!(changes = batch.len(), "container drift");
            let (tx, rx) = oneshot::channel();
            if out.send((batch, tx)).await.is_err() || rx.await.is_err() {
                return;
            }
            // Queued: now what was reported is saved.
            for (id, reported) in pending {
                if let Err(error) = save(&settings.state, &id, &reported) {
                    warn!(%error, container = %id, "could not save the container's reported drift");
                }
                if let Some(w) = watched.get_mut(&id) {
                    w.reported = reported;
                }
            }
        }
        first_pass = false;
        tokio::select! {
            () = tokio::time::sleep(PASS) => {}
            () = pods.changed.notified() => {}
            r = served.changed() => if r.is_err() { return },
        }
    }
}

fn spec(
    node: &str,
    policy: &str,
    path: &str,
    d: &Drifted,
    source: DetectionSource,
    running: &Running,
) -> FileChangeSpec {
    let changed_attributes = match (&d.category, &d.before, &d.after) {
        (ChangeCategory::Modified, Some(b), Some(a)) => overlay::changed_attributes(b, a),
        _ => Vec::new(),
    };
    FileChangeSpec {
        node: node.to_string(),
        policy: policy.to_string(),
        sequence: None,
        package: None,
        restored: None,
        entry: ENTRY.to_string(),
        path: path.to_string(),
        category: d.category,
        changed_attributes,
        before: d.before.clone(),
        after: d.after.clone(),
        detected_time: MicroTime(Timestamp::now()),
        source,
        process: None,
        container: Some(running.reference.clone()),
        summary: None,
    }
}

/// The containers' ids whose state the node keeps (for tests and status).
pub fn kept(state: &Path) -> BTreeSet<String> {
    std::fs::read_dir(state.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(String::from)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube_fim_crds::FileAttributes;

    fn added(hash: &str) -> Drifted {
        Drifted {
            category: ChangeCategory::Added,
            before: None,
            after: Some(FileAttributes {
                hash: Some(hash.into()),
                mode: Some("0644".into()),
                ..FileAttributes::default()
            }),
        }
    }

    #[test]
    fn only_what_moved_since_the_last_report_is_reported() {
        let mut reported = BTreeMap::new();
        let now = BTreeMap::from([("/a".to_string(), added("1"))]);
        let first = changes(&reported, &now, false);
        assert_eq!(first.len(), 1);
        apply(&mut reported, &first);
        assert!(changes(&reported, &now, false).is_empty());
        // Written again: reported again.
        let now = BTreeMap::from([("/a".to_string(), added("2"))]);
        let again = changes(&reported, &now, false);
        assert_eq!(again.len(), 1);
        apply(&mut reported, &again);
        // Deleted again: a removal, and then nothing.
        let gone = changes(&reported, &BTreeMap::new(), false);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1.category, ChangeCategory::Removed);
        apply(&mut reported, &gone);
        assert!(reported.is_empty());
        assert!(changes(&reported, &BTreeMap::new(), false).is_empty());
    }

    #[test]
    fn executables_only_skips_data_files() {
        let mut exe = added("1");
        exe.after.as_mut().unwrap().mode = Some("0755".into());
        exe.after.as_mut().unwrap().file_type = Some(kube_fim_crds::FileType::File);
        let now = BTreeMap::from([("/data".to_string(), added("1")), ("/x".to_string(), exe)]);
        let found = changes(&BTreeMap::new(), &now, true);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "/x");
    }

    #[test]
    fn the_reported_state_survives_a_restart() {
        let t = tempfile::tempdir().unwrap();
        let reported: Reported = BTreeMap::from([(
            "p".to_string(),
            BTreeMap::from([("/a".to_string(), "k".to_string())]),
        )]);
        save(t.path(), "abc", &reported).unwrap();
        assert_eq!(load(t.path(), "abc"), reported);
        assert_eq!(kept(t.path()), BTreeSet::from(["abc".to_string()]));
    }
}
