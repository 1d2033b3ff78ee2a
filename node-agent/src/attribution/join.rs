//! The hook between the monitoring loop and attribution: starts fanotify when
//! a served policy asks for it (else says why not), follows the loop's
//! directories, remembers the writers of the paths waiting for their rescan,
//! and puts the writer on each change the rescan finds.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use kube_fim_crds::FileChangeSpec;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::fanotify::{Listener, Notice};
use super::pods::PodIndex;
use super::process::ProcessSnapshot;
use super::{AttributionState, Users, process_info};
use crate::paths;
use crate::telemetry::Telemetry;

/// Attribution as the loop sees it.
pub struct Attribution {
    listener: Option<Listener>,
    state: AttributionState,
    /// Last writer of each path waiting for its rescan, and whether another
    /// process wrote it too in that window.
    writers: HashMap<PathBuf, (ProcessSnapshot, bool)>,
    users: Users,
    pods: Option<PodIndex>,
    proc: PathBuf,
    tx: mpsc::UnboundedSender<Notice>,
}

impl Attribution {
    /// `pods` is the node's pod index in a cluster (none standalone).
    pub fn new(root: &Path, pods: Option<PodIndex>) -> (Self, mpsc::UnboundedReceiver<Notice>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Attribution {
                listener: None,
                state: AttributionState::default(),
                writers: HashMap::new(),
                users: Users::new(root),
                pods,
                proc: PathBuf::from("/proc"),
                tx,
            },
            rx,
        )
    }

    pub fn state(&self) -> &AttributionState {
        &self.state
    }

    /// Starts or stops fanotify as the served policies want it.
    pub fn want(&mut self, wanted: bool, telemetry: &Telemetry) {
        match (wanted, self.listener.is_some()) {
            (true, false) => {
                match Listener::start(&self.proc, self.tx.clone(), telemetry.clone()) {
                    Ok(l) => {
                        let mut features = vec![
                            "FAN_CLASS_NOTIF",
                            "FAN_REPORT_DFID_NAME",
                            "FAN_EVENT_ON_CHILD",
                        ];
                        if l.features.pidfd {
                            features.push("FAN_REPORT_PIDFD");
                        }
                        info!(?features, "process attribution on (fanotify)");
                        self.state = AttributionState {
                            active: true,
                            features,
                            ..AttributionState::default()
                        };
                        self.listener = Some(l);
                    }
                    Err(why) => {
                        warn!(reason = %why, "process attribution off; inotify watches changes");
                        self.state = AttributionState {
                            active: false,
                            reason: Some(why.to_string()),
                            reason_label: Some(why.label()),
                            ..AttributionState::default()
                        };
                    }
                }
            }
            (false, _) => {
                self.listener = None;
                self.writers.clear();
                self.state = AttributionState::default();
            }
            (true, true) => {}
        }
        telemetry.attribution_changed(self.state.active, self.state.reason_label);
    }

    /// Follows `dirs` through fanotify where it can; returns the others, for inotify.
    pub fn sync(&mut self, root: &Path, dirs: Vec<PathBuf>, telemetry: &Telemetry) -> Vec<PathBuf> {
        let Some(l) = self.listener.as_mut() else {
            return dirs;
        };
        let rest = l.sync(root, &dirs);
        self.state.inode_marks = l.inode_marks();
        self.state.fs_marks = l.fs_marks();
        self.state.dirs = l.followed();
        // Which filtering is in force, where users read the features.
        let features = &mut self.state.features;
        features.retain(|f| !f.starts_with("FAN_MARK_"));
        if self.state.inode_marks > 0 {
            features.push("FAN_MARK_INODE");
        }
        if self.state.fs_marks > 0 {
            features.push("FAN_MARK_FILESYSTEM");
        }
        telemetry.fanotify_directories(
            self.state.dirs,
            self.state.inode_marks,
            self.state.fs_marks,
        );
        rest
    }

    /// Notes the writer of a path that now waits for its rescan.
    pub fn note(&mut self, rel: PathBuf, writer: ProcessSnapshot) {
        match self.writers.get_mut(&rel) {
            Some((last, multiple)) => {
                *multiple |= last.pid != writer.pid;
                *last = writer;
            }
            None => {
                self.writers.insert(rel, (writer, false));
            }
        }
    }

    /// Names the writer on each change found by rescanning `paths`, and forgets
    /// the writers of those paths. A change below a rescanned directory (a
    /// file in a new directory) takes the directory's writer.
    pub fn attach(
        &mut self,
        paths: &BTreeSet<PathBuf>,
        changes: &mut [FileChangeSpec],
        telemetry: &Telemetry,
    ) {
        if self.writers.is_empty() {
            return;
        }
        let mut used = Vec::new();
        for c in changes.iter_mut() {
            let rel = PathBuf::from(paths::unescape(&c.path));
            let rel = rel.strip_prefix("/").unwrap_or(&rel);
            // The path's own writer, also when the change was found by the
            // rescan of a directory above it before the path's own rescan
            // was due (a file written in a directory just made); a
            // directory's writer only for the rescan of that directory.
            let found = rel
                .ancestors()
                .find(|a| self.writers.contains_key(*a) && (*a == rel || paths.contains(*a)));
            if let Some((w, multiple)) = found.and_then(|a| self.writers.get(a)) {
                let p = process_info(w, &mut self.users, self.pods.as_ref(), *multiple);
                telemetry.change_attributed(&c.policy, &p);
                c.process = Some(p);
                used.push(rel.to_path_buf());
            }
        }
        for p in paths.iter().chain(&used) {
            self.writers.remove(p);
        }
    }
}
