//! Container drift: what changed inside the running containers of this node,
//! against their images.
//!
//! The baseline of a container is its image, so nothing is hashed ahead: a
//! container's writable layer holds exactly its drift ([`overlay`]). The
//! containers come from the node's runtime over its CRI socket ([`cri`]:
//! running containers, their pods, images, digests and first processes),
//! joined by pod UID to the node's pods the policies select; without a socket,
//! or while it does not answer, from the pods' status as the API server has it
//! (the kubelet writes what the runtime told it). A container's layers come
//! from the mount table of one of its processes (its cgroup names the
//! container), read in the host's procfs through the host root.
//!
//! A container's layer is read when inotify says it moved ([`events`]), every
//! [`PASS`] when it cannot be fully watched, every [`SAFETY_PASS`] anyway, and
//! at once when the pods or the policies change. A read reports what differs
//! from what was reported for that container: a new or changed file, a
//! whiteout, a reported file gone again. The changes are numbered and queued
//! by the monitoring loop like host changes ([`crate::report`]); only once they
//! are queued is the container's reported state saved on the node
//! (`containers/` in the state directory), so an agent restart re-reports
//! nothing already queued, and a crash in between reports it again rather
//! than losing it. A restarted container is a new container (a new id, a new
//! writable layer): its old drift is not reported again. A container that is
//! gone takes its state and its watches with it; its FileChanges stay.

pub mod cri;
pub mod events;
pub mod overlay;
pub mod select;
pub mod writers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use kube_fim_crds::{ChangeCategory, DetectionSource, FileChangeSpec};
use tokio::sync::{Notify, RwLock, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::attribution::fanotify::{Listener, Notice};
use crate::attribution::{Users, process_info};
use crate::hostfs::HostRoot;
use crate::served::ServedPolicies;
use overlay::{Drifted, Layers};
use select::Running;
use writers::Writers;

/// Drift changes to number and queue; the sender answers once they are queued.
pub type DriftBatch = (Vec<FileChangeSpec>, oneshot::Sender<()>);

/// The entry name of every drift change.
pub const ENTRY: &str = "containers";

/// How often a container is read when its writable layer cannot be fully
/// watched (no inotify, more directories than its share of watches), and how
/// often the runtime is asked for the node's containers.
pub const PASS: Duration = Duration::from_secs(1);
/// How often a fully watched container is read all the same: the safety net
/// under the events.
pub const SAFETY_PASS: Duration = Duration::from_secs(60);
/// After an event, the wait for the burst of writes it starts to settle.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Least time between two reads of one container: a container writing
/// without pause costs a bounded pass every so often, not a busy agent.
pub const MIN_GAP: Duration = Duration::from_millis(250);

/// What the drift task needs.
pub struct Settings {
    pub node: String,
    pub root: HostRoot,
    /// Where the agent's root is on the host (`/` for the host's own `/`).
    pub host_root: PathBuf,
    /// The agent's state directory.
    pub state: PathBuf,
    /// The node's CRI socket (in the agent's file system), if one is to be asked.
    pub cri: Option<PathBuf>,
    pub telemetry: Option<crate::telemetry::Telemetry>,
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
    /// Not every directory of its writable layer is watched: read every [`PASS`].
    partial: bool,
    last_read: Option<Instant>,
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

/// The changes between what was reported and the drift now, for one policy;
/// `complete`: the layer was read whole (else no removal is concluded but of
/// the paths known `absent`: named by events and looked up alone).
pub fn changes(
    reported: &BTreeMap<String, String>,
    now: &BTreeMap<String, Drifted>,
    absent: &BTreeSet<String>,
    executables_only: bool,
    complete: bool,
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
    // again (dropped, run, removed), or a change undone. Only a layer read
    // whole says so, or a path looked up alone: a read stopped at its bound
    // did not reach the rest.
    for path in reported.keys() {
        if !now.contains_key(path) && (complete || absent.contains(path)) {
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

/// An approval of a drift change, for the drift task to answer: drift is
/// judged against the container it was found in, never against another
/// container (of this pod, a later restart, another pod of the image).
#[derive(Debug)]
pub struct DriftApproval {
    /// The container's id as its FileChange names it (`containerd://…`).
    pub container: String,
    pub policy: String,
    pub path: String,
    /// The approved state (`None`: a removal).
    pub after: Option<kube_fim_crds::FileAttributes>,
    pub done: oneshot::Sender<DriftAnswer>,
}

/// What became of an approval of a drift change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriftAnswer {
    /// The container still is in the approved state: approved, for it alone.
    Applied,
    /// The container is gone (deleted, restarted): nothing to approve.
    Gone,
    /// The file moved on since (its present state is reported anew).
    Superseded,
}

/// Answers an approval from what was reported for its container.
fn judge_approval(watched: &HashMap<String, Watched>, a: &DriftApproval) -> DriftAnswer {
    let bare = a.container.rsplit("://").next().unwrap_or(&a.container);
    let Some(w) = watched.get(bare) else {
        return DriftAnswer::Gone;
    };
    let now = w.reported.get(&a.policy).and_then(|m| m.get(&a.path));
    let approved = Drifted {
        category: ChangeCategory::Added,
        before: None,
        after: a.after.clone(),
    }
    .key();
    // A reported file deleted again is no longer in the reported state at all.
    let same = match now {
        Some(now) => *now == approved,
        None => a.after.is_none(),
    };
    if same {
        DriftAnswer::Applied
    } else {
        DriftAnswer::Superseded
    }
}

/// The selected running containers, with the policies selecting each: from
/// the runtime when it answers over CRI (`cri`), else from the pods' status.
fn select_containers(
    policies: &[(String, kube_fim_crds::ContainerSelection)],
    pods: &HashMap<String, Arc<Pod>>,
    cri: Option<&[cri::CriContainer]>,
) -> BTreeMap<String, (Running, Option<u32>, Vec<usize>)> {
    let mut selected = BTreeMap::new();
    for (uid, pod) in pods {
        let by: Vec<usize> = policies
            .iter()
            .enumerate()
            .filter(|(_, (_, sel))| select::selects(sel, pod))
            .map(|(i, _)| i)
            .collect();
        if by.is_empty() {
            continue;
        }
        match cri {
            // The runtime's containers of this pod (by its uid): running now,
            // whatever the pod's status says yet.
            Some(list) => {
                for c in list.iter().filter(|c| c.running.reference.pod_uid == *uid) {
                    selected.insert(
                        c.running.bare_id.clone(),
                        (c.running.clone(), c.pid, by.clone()),
                    );
                }
            }
            None => {
                for r in select::running(pod) {
                    selected.insert(r.bare_id.clone(), (r, None, by.clone()));
                }
            }
        }
    }
    selected
}

/// Whether process `pid` is in the container `bare_id` (its cgroup names it):
/// a pid the runtime gave may have ended and been reused since.
fn in_container(proc: &Path, pid: u32, bare_id: &str) -> bool {
    std::fs::read(proc.join(pid.to_string()).join("cgroup")).is_ok_and(|cgroup| {
        cgroup
            .windows(bare_id.len())
            .any(|w| w == bare_id.as_bytes())
    })
}

/// Where the containers come from, said once per change (log and metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Cri,
    Pods,
}

/// Writer attribution of drift ([`writers`]): a fanotify group of the drift
/// task's own, with an inode mark on each directory of the writable layers
/// that has an inotify watch (the same bounds), on while a policy selecting
/// containers sets `processAttribution`.
struct Attribution {
    listener: Listener,
    notices: mpsc::UnboundedReceiver<Notice>,
    writers: Writers,
    users: Users,
}

impl Attribution {
    fn start(settings: &Settings) -> Option<Self> {
        let (tx, notices) = mpsc::unbounded_channel();
        let telemetry = settings.telemetry.clone()?;
        // The agent runs with the host's pid namespace: the events' pids are
        // the node's, read in its own /proc.
        match Listener::start(Path::new("/proc"), tx, telemetry) {
            Ok(listener) => {
                info!("container drift names its writers (fanotify on the writable layers)");
                Some(Attribution {
                    listener,
                    notices,
                    writers: Writers::default(),
                    users: Users::new(settings.root.path()),
                })
            }
            Err(why) => {
                warn!(reason = %why, "container drift without writers: changes say the writer is unknown");
                None
            }
        }
    }

    /// Notes the writers the listener reported, by container: the container
    /// whose writable layer holds the path. True when events were lost.
    fn drain(&mut self, watched: &HashMap<String, Watched>) -> bool {
        let mut lost = false;
        while let Ok(notice) = self.notices.try_recv() {
            match notice {
                Notice::Overflow => {
                    self.writers.lost();
                    lost = true;
                }
                Notice::Changed { rel, mask, writer } => {
                    let found = watched.iter().find_map(|(id, w)| {
                        let inside = rel.strip_prefix(&w.layers.upper).ok()?;
                        (!inside.as_os_str().is_empty()).then(|| (id, inside.to_path_buf()))
                    });
                    if let Some((id, inside)) = found {
                        // A directory made or moved into place (a copy-up):
                        // what is written in it before it is marked is its
                        // writer's at most.
                        let dir = mask & libc::FAN_ONDIR != 0
                            && mask & (libc::FAN_CREATE | libc::FAN_MOVED_TO) != 0;
                        self.writers.note(id, inside, *writer, dir);
                    }
                }
            }
        }
        lost
    }

    /// The writer of each change of `specs` whose policy asks for it, or
    /// `unknown` (never a guess).
    fn attach(&mut self, id: &str, specs: &mut [FileChangeSpec], pods: &HashMap<String, Arc<Pod>>) {
        let index = crate::attribution::pods::PodIndex::default();
        for p in pods.values() {
            index.upsert(p);
        }
        for c in specs {
            let inside = PathBuf::from(crate::paths::unescape(&c.path));
            let inside = inside.strip_prefix("/").unwrap_or(&inside);
            c.process = Some(match self.writers.writer_of(id, inside) {
                Some((w, multiple, limits)) => {
                    let mut p = process_info(&w, &mut self.users, Some(&index), multiple);
                    p.limits.extend(limits);
                    p
                }
                None => writers::unknown(),
            });
        }
    }
}

/// Runs the drift task until the monitoring loop is gone.
pub async fn run(
    client: Client,
    settings: Settings,
    mut served: watch::Receiver<ServedPolicies>,
    out: mpsc::Sender<DriftBatch>,
    mut approvals: mpsc::Receiver<DriftApproval>,
) {
    let pods = Pods::default();
    // The pod watch starts with the first policy selecting containers: an
    // agent without one costs the API server nothing more.
    let mut client = Some(client);
    let proc = settings.root.path().join("proc");
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut first_pass = true;
    let mut cri = settings.cri.clone().map(cri::Cri::new);
    let mut source: Option<Source> = None;
    // Real time: without inotify every container is read every PASS.
    let watcher = match events::Watcher::new() {
        Ok(w) => Some(w),
        Err(error) => {
            warn!(%error, "no inotify for container drift: every container is read every second");
            None
        }
    };
    // Containers whose layers moved and are not read yet.
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut read_all = true;
    let mut attribution: Option<Attribution> = None;
    // Asked for and refused (said once): not asked again until the policies change.
    let mut attribution_refused = false;
    loop {
        let (policies, attributed): (
            Vec<(String, kube_fim_crds::ContainerSelection)>,
            BTreeSet<String>,
        ) = {
            let served = served.borrow_and_update();
            let mut attributed = BTreeSet::new();
            let policies = served
                .names()
                .filter_map(|n| {
                    let p = served.get(n)?;
                    let c = p.spec.containers.clone()?;
                    if p.spec.process_attribution {
                        attributed.insert(n.to_string());
                    }
                    Some((n.to_string(), c))
                })
                .collect();
            (policies, attributed)
        };
        match (
            attributed.is_empty(),
            attribution.is_some(),
            attribution_refused,
        ) {
            (false, false, false) => {
                attribution = Attribution::start(&settings);
                attribution_refused = attribution.is_none();
                // Every container is walked again to mark its directories.
                read_all = true;
            }
            (true, _, _) => {
                attribution = None;
                attribution_refused = false;
            }
            _ => {}
        }
        if !policies.is_empty()
            && let Some(client) = client.take()
        {
            tokio::spawn(pods.clone().follow(client, settings.node.clone()));
        }
        // The runtime is asked only while a policy selects containers.
        let from_cri = match cri.as_mut().filter(|_| !policies.is_empty()) {
            Some(c) => match c.running().await {
                Ok(list) => {
                    if source != Some(Source::Cri) {
                        info!(socket = %c.socket().display(), "containers from the runtime over CRI");
                    }
                    source = Some(Source::Cri);
                    Some(list)
                }
                Err(error) => {
                    if source != Some(Source::Pods) {
                        warn!(%error, "the CRI socket does not answer: containers from the pods' status instead");
                    }
                    source = Some(Source::Pods);
                    None
                }
            },
            None => {
                if !policies.is_empty() && source.is_none() {
                    info!("no CRI socket configured: containers from the pods' status");
                    source = Some(Source::Pods);
                }
                None
            }
        };
        let selected = if policies.is_empty() {
            BTreeMap::new()
        } else {
            select_containers(&policies, &*pods.pods.read().await, from_cri.as_deref())
        };
        // Gone (deleted, restarted, no longer selected): forgotten; its evidence stays.
        let gone: Vec<String> = watched
            .keys()
            .filter(|id| !selected.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            let w = watched.remove(&id);
            pending.remove(&id);
            if let Some(w) = &watcher {
                w.forget(&id);
            }
            if let (Some(a), Some(w)) = (attribution.as_mut(), &w) {
                a.writers.forget(&id);
                a.listener
                    .remove_below(settings.root.path(), &w.layers.upper);
            }
            let _ = std::fs::remove_file(state_file(&settings.state, &id));
            debug!(container = %id, "container gone");
        }
        if let Some(w) = &watcher {
            let dirty = w.take();
            if dirty.all {
                warn!("container drift events overflowed: every container is read again");
                read_all = true;
            }
            pending.extend(dirty.ids);
        }
        if let Some(a) = attribution.as_mut()
            && a.drain(&watched)
        {
            warn!(
                "container drift attribution lost events: the writers of what they said are unknown"
            );
            read_all = true;
        }
        let now = Instant::now();
        let mut reread = false;
        let mut batch = Vec::new();
        let mut saves: Vec<(String, Reported)> = Vec::new();
        for (id, (running, pid, by)) in &selected {
            if !watched.contains_key(id) {
                let layers = tokio::task::block_in_place(|| {
                    let pid = pid
                        .filter(|p| in_container(&proc, *p, id))
                        .or_else(|| process_of(&proc, id))?;
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
                watched.insert(
                    id.clone(),
                    Watched {
                        layers,
                        reported,
                        partial: true,
                        last_read: None,
                    },
                );
            }
            let Some(w) = watched.get_mut(id) else {
                continue;
            };
            if !due(w, read_all, pending.contains(id), watcher.is_some(), now) {
                continue;
            }
            pending.remove(id);
            w.last_read = Some(now);
            let mut next = w.reported.clone();
            let mut any = false;
            let mut complete = true;
            // The files events named: judged first, whatever the walk reaches.
            let mut first: BTreeSet<PathBuf> = watcher
                .as_ref()
                .map(|x| x.take_named(id).paths())
                .unwrap_or_default();
            let epoch = attribution.as_mut().map(|a| {
                first.extend(a.writers.named(id).cloned());
                a.writers.begin()
            });
            let mut found_here: Vec<FileChangeSpec> = Vec::new();
            // The directories this read found (to let go of the marks of the others).
            let mut walked: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
            for i in by {
                let Some((policy, sel)) = policies.get(*i) else {
                    continue;
                };
                let excludes = select::excludes(sel);
                let read = tokio::task::block_in_place(|| {
                    let mut on_dir = |dir: &Path, fd: &std::os::fd::OwnedFd| {
                        let Some(watcher) = &watcher else {
                            return;
                        };
                        let inside = dir.strip_prefix(&w.layers.upper).unwrap_or(dir);
                        let watched = watcher.watch_fd(id, fd, inside);
                        complete &= watched;
                        // Marked within the watches' bounds.
                        if let (true, Some(a)) = (watched, attribution.as_mut()) {
                            a.listener.add(fd, dir);
                            walked.insert(dir.to_path_buf());
                        }
                    };
                    overlay::drift(&settings.root, &w.layers, &excludes, &first, &mut on_dir)
                });
                let truncated = read.truncated;
                if truncated {
                    warn!(container = %id, "writable layer too large; read in part");
                    complete = false;
                }
                let mine = next.entry(policy.clone()).or_default();
                let found = changes(
                    mine,
                    &read.drift,
                    &read.absent,
                    sel.executables_only,
                    !truncated,
                );
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
                    found_here.push(spec(&settings.node, policy, path, d, source, running));
                }
                apply(mine, &found);
            }
            if let (true, Some(a)) = (complete, attribution.as_mut()) {
                a.listener
                    .retain_below(settings.root.path(), &w.layers.upper, &walked);
            }
            if w.partial == complete {
                debug!(container = %id, watched = complete, "container drift watches");
            }
            w.partial = !complete || watcher.is_none();
            if any {
                saves.push((id.clone(), next));
            }
            // The writers: what was noted up to the end of the read (a write
            // made while it ran may be what it saw).
            let (mine, others): (Vec<_>, Vec<_>) = found_here
                .into_iter()
                .partition(|c| attributed.contains(&c.policy));
            let mut mine = mine;
            if let Some(a) = attribution.as_mut() {
                reread |= a.drain(&watched);
                if !mine.is_empty() {
                    a.attach(id, &mut mine, &*pods.pods.read().await);
                }
                if let Some(e) = epoch {
                    a.writers.end(id, e);
                }
            } else {
                for c in &mut mine {
                    c.process = Some(writers::unknown());
                }
            }
            batch.extend(mine);
            batch.extend(others);
        }
        read_all = reread;
        if let Some(t) = &settings.telemetry {
            let n = watched.len();
            let (cri_n, pods_n) = match source {
                Some(Source::Cri) => (n, 0),
                _ => (0, n),
            };
            t.container_drift(cri_n, pods_n, watcher.as_ref().map_or(0, |w| w.count()));
        }
        if !batch.is_empty() {
            info!(changes = batch.len(), "container drift");
            let (tx, rx) = oneshot::channel();
            if out.send((batch, tx)).await.is_err() || rx.await.is_err() {
                return;
            }
            // Queued: now what was reported is saved.
            for (id, reported) in saves {
                if let Err(error) = save(&settings.state, &id, &reported) {
                    warn!(%error, container = %id, "could not save the container's reported drift");
                }
                if let Some(w) = watched.get_mut(&id) {
                    w.reported = reported;
                }
            }
        }
        first_pass = false;
        // Moved layers not read yet (too soon after their last read): back then.
        let wait = if pending.is_empty() { PASS } else { MIN_GAP };
        let moved = async {
            match &watcher {
                Some(w) => {
                    w.moved.notified().await;
                    // Writes come in bursts: read once they settle.
                    tokio::time::sleep(SETTLE).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = moved => {}
            () = pods.changed.notified() => {}
            r = served.changed() => {
                if r.is_err() { return }
                read_all = true;
            }
            Some(a) = approvals.recv() => {
                let answer = judge_approval(&watched, &a);
                let _ = a.done.send(answer);
            }
        }
    }
}

/// Whether a watched container is read in this pass: its layer moved (and
/// was not read within [`MIN_GAP`]), or it is read every [`PASS`] (no
/// inotify, or watches partial), or its safety-net pass is due.
fn due(w: &Watched, read_all: bool, moved: bool, inotify: bool, now: Instant) -> bool {
    let Some(last) = w.last_read else {
        return true;
    };
    let since = now.saturating_duration_since(last);
    if read_all {
        return true;
    }
    if moved {
        return since >= MIN_GAP;
    }
    if !inotify || w.partial {
        return since >= PASS;
    }
    since >= SAFETY_PASS
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
        let first = changes(&reported, &now, &BTreeSet::new(), false, true);
        assert_eq!(first.len(), 1);
        apply(&mut reported, &first);
        assert!(changes(&reported, &now, &BTreeSet::new(), false, true).is_empty());
        // Written again: reported again.
        let now = BTreeMap::from([("/a".to_string(), added("2"))]);
        let again = changes(&reported, &now, &BTreeSet::new(), false, true);
        assert_eq!(again.len(), 1);
        apply(&mut reported, &again);
        // Deleted again: a removal, and then nothing.
        let gone = changes(&reported, &BTreeMap::new(), &BTreeSet::new(), false, true);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1.category, ChangeCategory::Removed);
        apply(&mut reported, &gone);
        assert!(reported.is_empty());
        assert!(changes(&reported, &BTreeMap::new(), &BTreeSet::new(), false, true).is_empty());
    }

    #[test]
    fn a_layer_read_in_part_reports_no_removal_of_what_it_did_not_reach() {
        // An attacker writes past the bound of a pass: the files reported
        // before and not reached this time are not gone.
        let mut reported = BTreeMap::new();
        let first = BTreeMap::from([("/usr/bin/nc".to_string(), added("1"))]);
        let found = changes(&reported, &first, &BTreeSet::new(), false, true);
        apply(&mut reported, &found);
        let partial = BTreeMap::from([("/var/junk/1".to_string(), added("2"))]);
        let found = changes(&reported, &partial, &BTreeSet::new(), false, false);
        assert_eq!(
            found
                .iter()
                .map(|(p, d)| (p.as_str(), d.category))
                .collect::<Vec<_>>(),
            [("/var/junk/1", ChangeCategory::Added)]
        );
    }

    #[test]
    fn executables_only_skips_data_files() {
        let mut exe = added("1");
        exe.after.as_mut().unwrap().mode = Some("0755".into());
        exe.after.as_mut().unwrap().file_type = Some(kube_fim_crds::FileType::File);
        let now = BTreeMap::from([("/data".to_string(), added("1")), ("/x".to_string(), exe)]);
        let found = changes(&BTreeMap::new(), &now, &BTreeSet::new(), true, true);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "/x");
    }

    fn watched_with(path: &str, d: &Drifted) -> Watched {
        Watched {
            layers: Layers {
                upper: "u".into(),
                lowers: Vec::new(),
                mounts: Vec::new(),
            },
            reported: BTreeMap::from([(
                "p".to_string(),
                BTreeMap::from([(path.to_string(), d.key())]),
            )]),
            partial: false,
            last_read: None,
        }
    }

    fn approval(container: &str, after: Option<FileAttributes>) -> DriftApproval {
        DriftApproval {
            container: container.into(),
            policy: "p".into(),
            path: "/usr/bin/curl".into(),
            after,
            done: oneshot::channel().0,
        }
    }

    #[test]
    fn an_approval_of_drift_is_for_its_own_container_only() {
        let curl = added("1");
        // Pod A and pod B both dropped the same binary; A's restarted
        // container ("a2") is a new container with a drift of its own.
        let watched = HashMap::from([
            ("a1".to_string(), watched_with("/usr/bin/curl", &curl)),
            ("b1".to_string(), watched_with("/usr/bin/curl", &curl)),
        ]);
        let after = curl.after.clone();
        assert_eq!(
            judge_approval(&watched, &approval("containerd://a1", after.clone())),
            DriftAnswer::Applied
        );
        // The approval named A's container: B's own FileChange is not touched
        // (it stays unapproved until approved itself), and A's next container
        // is not A's old one.
        assert_eq!(
            judge_approval(&watched, &approval("containerd://a2", after.clone())),
            DriftAnswer::Gone
        );
        // A state the file has left approves nothing.
        assert_eq!(
            judge_approval(&watched, &approval("containerd://b1", added("2").after)),
            DriftAnswer::Superseded
        );
        assert_eq!(
            judge_approval(&watched, &approval("containerd://b1", None)),
            DriftAnswer::Superseded
        );
    }

    #[test]
    fn containers_come_from_the_runtime_and_from_the_pods_status_without_it() {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateRunning, ContainerStatus, PodStatus,
        };
        let pod = |ns: &str, uid: &str, id: &str| {
            let mut p = Pod::default();
            p.metadata.namespace = Some(ns.into());
            p.metadata.name = Some("web".into());
            p.metadata.uid = Some(uid.into());
            p.status = Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "web".into(),
                    container_id: Some(format!("containerd://{id}")),
                    state: Some(ContainerState {
                        running: Some(ContainerStateRunning::default()),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            });
            Arc::new(p)
        };
        let pods = HashMap::from([
            ("u1".to_string(), pod("shop", "u1", "old1")),
            ("u2".to_string(), pod("dev", "u2", "old2")),
        ]);
        let policies = vec![(
            "p".to_string(),
            kube_fim_crds::ContainerSelection {
                namespaces: vec!["shop".into()],
                ..kube_fim_crds::ContainerSelection::default()
            },
        )];
        let from_runtime = |uid: &str, id: &str| cri::CriContainer {
            running: Running {
                reference: kube_fim_crds::ContainerRef {
                    pod_uid: uid.into(),
                    id: format!("containerd://{id}"),
                    ..kube_fim_crds::ContainerRef::default()
                },
                bare_id: id.into(),
            },
            pid: Some(42),
        };
        // The runtime runs a container the pod's status does not name yet.
        let list = [from_runtime("u1", "new1"), from_runtime("u2", "new2")];
        let got = select_containers(&policies, &pods, Some(&list));
        assert_eq!(got.keys().collect::<Vec<_>>(), ["new1"]);
        assert_eq!(got["new1"].1, Some(42));
        // Without the runtime: the pods' status.
        let got = select_containers(&policies, &pods, None);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["old1"]);
        assert_eq!(got["old1"].1, None);
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

/// The writer of a write through a real overlay, as the kernel reports it on
/// the upper directory (root only: mounting and fanotify need CAP_SYS_ADMIN).
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod real_overlay_writers {
    use super::*;
    use std::process::Command;

    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    fn mark(a: &mut Attribution, root: &HostRoot, rel: &str) {
        let layer = root.open_layer(Path::new(rel)).unwrap();
        let fd = layer.open_dir(Path::new("")).unwrap().unwrap();
        assert!(a.listener.add(&fd, Path::new(rel)), "mark {rel}");
    }

    /// Drains the notices until `inside` has a writer (or 5 s pass).
    async fn writer(
        a: &mut Attribution,
        watched: &HashMap<String, Watched>,
        id: &str,
        inside: &str,
    ) -> Option<(i32, Option<String>, Vec<kube_fim_crds::AttributionLimit>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            a.drain(watched);
            if let Some((w, _, limits)) = a.writers.writer_of(id, Path::new(inside)) {
                return Some((w.pid, w.command, limits));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    #[tokio::test]
    async fn a_write_through_the_overlay_names_its_process_on_the_upper_directory() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: mounting an overlay and fanotify need root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let host = t.path();
        for d in [
            "lower/usr/bin",
            "lower/etc",
            "upper/etc",
            "b-upper",
            "work",
            "merged",
        ] {
            std::fs::create_dir_all(host.join(d)).unwrap();
        }
        std::fs::write(host.join("lower/etc/motd"), "hello\n").unwrap();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            host.join("lower").display(),
            host.join("upper").display(),
            host.join("work").display()
        );
        let merged = host.join("merged");
        let ok = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t overlay");
        let _mounted = Mounted(merged.clone());
        let root = HostRoot::open(host).unwrap();
        let settings = Settings {
            node: "n".into(),
            root: root.clone(),
            host_root: "/".into(),
            state: host.join("state"),
            cri: None,
            telemetry: Some(crate::telemetry::Telemetry::new("n").unwrap()),
        };
        let Some(mut a) = Attribution::start(&settings) else {
            panic!("fanotify refused to root");
        };
        let layers = |upper: &str| Layers {
            upper: upper.into(),
            lowers: vec!["lower".into()],
            mounts: Vec::new(),
        };
        let watched = HashMap::from([
            (
                "a".to_string(),
                Watched {
                    layers: layers("upper"),
                    reported: Reported::new(),
                    partial: false,
                    last_read: None,
                },
            ),
            (
                "b".to_string(),
                Watched {
                    layers: layers("b-upper"),
                    reported: Reported::new(),
                    partial: false,
                    last_read: None,
                },
            ),
        ]);
        mark(&mut a, &root, "upper");
        mark(&mut a, &root, "upper/etc");
        mark(&mut a, &root, "b-upper");

        // A shell in the container appends to an image file (a copy-up into
        // the marked upper/etc) and stays a moment: its /proc is read.
        let script = format!(
            "echo more >> {m}/etc/motd; echo x > {m}/usr/bin/evil; sleep 2",
            m = merged.display()
        );
        let mut sh = Command::new("sh").args(["-c", &script]).spawn().unwrap();
        let pid = sh.id() as i32;
        let motd = writer(&mut a, &watched, "a", "etc/motd").await;
        let (wpid, command, limits) = motd.expect("the writer of /etc/motd");
        assert_eq!((wpid, command.as_deref()), (pid, Some("sh")));
        assert!(limits.is_empty(), "{limits:?}");
        // The first file under an image directory: the copy-up of /usr is the
        // event (upper/usr/bin was not there to be marked), made by the
        // same process in the same system call; named, and said so.
        let evil = writer(&mut a, &watched, "a", "usr/bin/evil").await;
        let (wpid, _, limits) = evil.expect("the writer of /usr/bin/evil");
        assert_eq!(wpid, pid);
        assert_eq!(
            limits,
            vec![kube_fim_crds::AttributionLimit::DirectoryWriter]
        );
        // Container b's layer: nobody wrote there.
        assert!(a.writers.writer_of("b", Path::new("etc/motd")).is_none());
        assert!(
            a.writers
                .writer_of("b", Path::new("usr/bin/evil"))
                .is_none()
        );

        // Once its directory is marked, a file's own event names its writer:
        // a `rm` of an image file is the whiteout moved into place.
        mark(&mut a, &root, "upper/usr/bin");
        let e = a.writers.begin();
        a.writers.end("a", e);
        let mut rm = Command::new("rm")
            .arg(merged.join("usr/bin/evil"))
            .spawn()
            .unwrap();
        let rm_pid = rm.id() as i32;
        let gone = writer(&mut a, &watched, "a", "usr/bin/evil").await;
        let (wpid, _, limits) = gone.expect("the writer of the removal");
        assert_eq!(wpid, rm_pid);
        assert!(limits.is_empty(), "{limits:?}");
        let _ = rm.wait();
        let _ = sh.kill();
        let _ = sh.wait();
    }
}
