//! The Events about reported changes, aggregated into Event series.
//!
//! Each change is a FileChange of its own; the Events are for people skimming
//! `kubectl get events` or `kubectl describe fip`. One Event per (policy,
//! category) on this node stands for a run of such changes, as client-go's
//! events.k8s.io recorder does for repeated events: the first change creates
//! the Event (regarding the policy, related to that first FileChange, its note
//! saying what changed), the changes after it only count in the Event's
//! `series` (`count`, `lastObservedTime`), written at most once per
//! [`REFRESH`], and a series ends after [`FINISH`] without a change. The API
//! server keeps an Event's note, regarding and related immutable, so the note
//! describes the first change and says that the series counts the ones after
//! it; which files they were is in the FileChanges.
//!
//! A burst of changes costs one Event write (plus one per [`REFRESH`] while it
//! lasts) instead of one per change.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube_fim_crds::{
    Attribute, ChangeCategory, FileChange, FileChangeSpec, FileIntegrityPolicy, PackageVerdict,
};
use tokio::time::Instant;
use tracing::debug;

use super::deliver::FIELD_MANAGER;
use crate::context::Context;
use crate::served::ServedPolicies;
use crate::telemetry::Telemetry;
use tokio::sync::watch;

/// The reporting controller of the agent's Events.
pub const CONTROLLER: &str = "kube-fim-agent";

/// A series' count and last observation are written at most this often.
pub const REFRESH: Duration = Duration::from_secs(30);

/// A series ends after this long without a change (client-go's `finishTime`);
/// the next change starts a new Event.
pub const FINISH: Duration = Duration::from_secs(6 * 60);

/// Namespace of Events about cluster-scoped objects (as kube's `Recorder`).
const NAMESPACE: &str = "default";

/// Longest note the API server takes.
const MAX_NOTE: usize = 1000;

/// The reason of a change's Event: its category's, or `MountedOver` for a
/// path the host now reads through another mount.
pub fn reason(spec: &FileChangeSpec) -> &'static str {
    match spec.category {
        ChangeCategory::Modified if mounted(spec) => "MountedOver",
        ChangeCategory::Added => "FileAdded",
        ChangeCategory::Modified => "FileModified",
        ChangeCategory::Removed => "FileRemoved",
        ChangeCategory::Summary => "ChangeStorm",
    }
}

/// The reason of the second Event of a change whose content matches no
/// installed package's digest ([`kube_fim_crds::PackageVerdict::Mismatch`]).
pub const PACKAGE_MISMATCH: &str = "PackageMismatch";

fn mismatch(spec: &FileChangeSpec) -> bool {
    spec.package
        .as_ref()
        .is_some_and(|p| p.verdict == PackageVerdict::Mismatch)
}

fn mounted(spec: &FileChangeSpec) -> bool {
    spec.changed_attributes.contains(&Attribute::Mount)
}

/// What one change says about itself: `/etc/sudoers modified (mode) by sshd
/// (pid 812, uid 0) on node n1 (policy p, entry etc, Realtime)`, or a storm's
/// summary. Paths and attribute names only, never file contents.
pub fn describe(change: &FileChange) -> String {
    let spec = &change.spec;
    match &spec.summary {
        Some(s) => format!(
            "{} changes under {} on node {} for policy {} in one minute ({} added, {} modified, {} removed); summarised",
            s.count, spec.path, spec.node, spec.policy, s.added, s.modified, s.removed
        ),
        None => {
            let attrs: Vec<&str> = spec.changed_attributes.iter().map(|a| a.as_str()).collect();
            let what = if attrs.is_empty() {
                String::new()
            } else {
                format!(" ({})", attrs.join(", "))
            };
            let by = spec
                .process
                .as_ref()
                .and_then(|p| p.by.as_deref())
                .map(|b| format!(" by {b}"))
                .unwrap_or_default();
            let through = match spec.after.as_ref().and_then(|a| a.mount.as_ref()) {
                Some(m) if mounted(spec) => format!(
                    "; the host reads it through {} {}[{}] mounted at {}",
                    m.fs_type, m.source, m.root, m.mount_point
                ),
                None if mounted(spec) => "; the host's mount table no longer shows it".into(),
                _ => String::new(),
            };
            let unreadable = spec
                .after
                .as_ref()
                .and_then(|a| a.unreadable.as_deref())
                .map(|why| format!("; it could not be read ({why}): looked at again until read"))
                .unwrap_or_default();
            let package = match &spec.package {
                Some(p) if p.verdict == PackageVerdict::Mismatch => format!(
                    "; package {} {} ({}) owns it, and its content matches no installed package's digest",
                    p.name,
                    p.version,
                    p.manager.as_str()
                ),
                Some(p) => format!(
                    "; package-verified: the content of {} {}{} ({})",
                    p.name,
                    p.version_before
                        .as_deref()
                        .map(|b| format!("{b}→"))
                        .unwrap_or_default(),
                    p.version,
                    p.manager.as_str()
                ),
                None => String::new(),
            };
            format!(
                "{} {}{}{by} on node {} (policy {}, entry {}, {:?}){through}{unreadable}{package}",
                spec.path,
                spec.category.as_str().to_lowercase(),
                what,
                spec.node,
                spec.policy,
                spec.entry,
                spec.source
            )
        }
    }
}

/// The note of the Event a change starts: the change, and what the series
/// counts after it.
pub fn note(change: &FileChange) -> String {
    note_of(change, reason(&change.spec))
}

fn note_of(change: &FileChange, reason: &str) -> String {
    let spec = &change.spec;
    let counted = match spec.category {
        _ if reason == PACKAGE_MISMATCH => "package mismatches".to_string(),
        ChangeCategory::Summary => "change storms".to_string(),
        _ if mounted(spec) => "paths mounted over".to_string(),
        c => format!("files {}", c.as_str().to_lowercase()),
    };
    let tail = format!(
        " — the first of the {counted} under policy {} on node {} this Event's series counts",
        spec.policy, spec.node
    );
    let mut first = describe(change);
    let room = MAX_NOTE.saturating_sub(tail.len());
    if first.len() > room {
        let mut cut = room;
        while !first.is_char_boundary(cut) {
            cut -= 1;
        }
        first.truncate(cut);
    }
    first + &tail
}

/// Series are per policy and reason (the node is the agent's own).
type Key = (String, &'static str);

/// One open series.
#[derive(Clone, Debug, PartialEq)]
struct Open {
    /// Name of its Event.
    event: String,
    count: i32,
    last_observed: Timestamp,
    /// When a change was last counted (monotonic, for [`FINISH`]).
    last_seen: Instant,
    /// The count last written to the API server.
    written: i32,
    last_write: Instant,
}

/// What the recorder does with a change.
#[derive(Debug, PartialEq)]
enum Step {
    /// Create an Event: no series is open for its key.
    Create,
    /// Counted in the open series; written later.
    Counted,
}

/// The open series and what they still owe the API server; no I/O.
#[derive(Debug, Default)]
struct Book {
    open: HashMap<Key, Open>,
}

impl Book {
    fn observe(&mut self, key: &Key, now: Instant, at: Timestamp) -> Step {
        match self.open.get_mut(key) {
            Some(s) if now.duration_since(s.last_seen) < FINISH => {
                s.count += 1;
                s.last_observed = at;
                s.last_seen = now;
                Step::Counted
            }
            _ => Step::Create,
        }
    }

    fn created(&mut self, key: Key, event: String, now: Instant, at: Timestamp) {
        self.open.insert(
            key,
            Open {
                event,
                count: 1,
                last_observed: at,
                last_seen: now,
                written: 1,
                last_write: now,
            },
        );
    }

    /// Series whose count must be written now: unwritten changes and
    /// [`REFRESH`] passed (or `all`, at shutdown).
    fn due(&self, now: Instant, all: bool) -> Vec<(Key, Open)> {
        self.open
            .iter()
            .filter(|(_, s)| s.count > s.written)
            .filter(|(_, s)| all || now.duration_since(s.last_write) >= REFRESH)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    fn written(&mut self, key: &Key, count: i32, now: Instant) {
        if let Some(s) = self.open.get_mut(key) {
            s.written = s.written.max(count);
            s.last_write = now;
        }
    }

    /// Forgets ended series (all written) and returns when the next write is due.
    fn next(&mut self, now: Instant) -> Option<Instant> {
        self.open
            .retain(|_, s| s.count > s.written || now.duration_since(s.last_seen) < FINISH);
        self.open
            .values()
            .filter(|s| s.count > s.written)
            .map(|s| s.last_write + REFRESH)
            .min()
    }
}

/// An Event's note is at most 1 kB.
fn shorten_note(mut note: String) -> String {
    if note.len() > 1024 {
        let mut end = 1021;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

/// Publishes the Events of delivered changes as series.
pub struct ChangeEvents {
    api: Api<Event>,
    node: String,
    served: watch::Receiver<ServedPolicies>,
    telemetry: Telemetry,
    book: Book,
}

impl ChangeEvents {
    pub fn new(ctx: &Context) -> Self {
        ChangeEvents {
            api: Api::namespaced(ctx.client.clone(), NAMESPACE),
            node: ctx.node.clone(),
            served: ctx.served.clone(),
            telemetry: ctx.telemetry.clone(),
            book: Book::default(),
        }
    }

    /// Publishes a stored change: a new Event, or one more in an open series.
    /// A change inside a container is also an Event on its pod, in the pod's
    /// namespace, so `kubectl describe pod` shows it.
    pub async fn publish(&mut self, change: &FileChange) {
        if let Some(container) = &change.spec.container {
            self.publish_on_pod(change, container).await;
        }
        self.publish_as(change, reason(&change.spec)).await;
        if mismatch(&change.spec) {
            self.publish_as(change, PACKAGE_MISMATCH).await;
        }
    }

    async fn publish_as(&mut self, change: &FileChange, reason: &'static str) {
        let key = (change.spec.policy.clone(), reason);
        let now = Instant::now();
        let at = Timestamp::now();
        if self.book.observe(&key, now, at) == Step::Counted {
            return;
        }
        let event = self.event(change, at, reason);
        let name = event.metadata.name.clone().unwrap_or_default();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match self.api.create(&params, &event).await {
            Ok(_) => self.book.created(key, name, now, at),
            Err(error) => {
                // The FileChange is the evidence; the next change tries again.
                self.telemetry.change_event_failed();
                debug!(%error, "event not published");
            }
        }
    }

    /// Writes the counts of the series that are due (all of them with `all`),
    /// and says when to call again.
    pub async fn flush(&mut self, all: bool) -> Option<Instant> {
        let now = Instant::now();
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        for (key, open) in self.book.due(now, all) {
            let patch = serde_json::json!({
                "series": EventSeries {
                    count: open.count,
                    last_observed_time: MicroTime(open.last_observed),
                }
            });
            match self
                .api
                .patch(&open.event, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => self.book.written(&key, open.count, now),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    // Expired (the API server's event TTL) or deleted: the
                    // next change starts a new series.
                    self.book.open.remove(&key);
                }
                Err(error) => {
                    self.telemetry.change_event_failed();
                    debug!(%error, event = %open.event, "event series not updated");
                    self.book.written(&key, open.written, now);
                }
            }
        }
        self.book.next(Instant::now())
    }

    async fn publish_on_pod(&self, change: &FileChange, c: &kube_fim_crds::ContainerRef) {
        let at = Timestamp::now();
        let spec = &change.spec;
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", c.pod, at.as_nanosecond())),
                namespace: Some(c.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(at)),
            action: Some("Detect".into()),
            reason: Some(reason(spec).into()),
            type_: Some("Warning".into()),
            note: Some(shorten_note(format!(
                "{} {} in container {} (image {}), drift from its image: FileChange {}",
                spec.category.as_str(),
                spec.path,
                c.name,
                c.image_digest
                    .as_deref()
                    .or(c.image.as_deref())
                    .unwrap_or("unknown"),
                change.metadata.name.as_deref().unwrap_or_default(),
            ))),
            regarding: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(c.namespace.clone()),
                name: Some(c.pod.clone()),
                uid: Some(c.pod_uid.clone()),
                field_path: Some(format!("spec.containers{{{}}}", c.name)),
                ..ObjectReference::default()
            }),
            related: Some(change.object_ref(&())),
            reporting_controller: Some(CONTROLLER.into()),
            reporting_instance: Some(self.node.clone()),
            ..Event::default()
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let api: Api<Event> = Api::namespaced(self.api.clone().into_client(), &c.namespace);
        if let Err(error) = api.create(&params, &event).await {
            self.telemetry.change_event_failed();
            debug!(%error, "pod event not published");
        }
    }

    fn event(&self, change: &FileChange, at: Timestamp, reason: &'static str) -> Event {
        let spec = &change.spec;
        let regarding = self
            .served
            .borrow()
            .get(&spec.policy)
            .map(|p| p.object_ref(&()))
            .unwrap_or_else(|| ObjectReference {
                api_version: Some(FileIntegrityPolicy::api_version(&()).into_owned()),
                kind: Some(FileIntegrityPolicy::kind(&()).into_owned()),
                name: Some(spec.policy.clone()),
                ..ObjectReference::default()
            });
        Event {
            metadata: ObjectMeta {
                name: Some(if reason == PACKAGE_MISMATCH {
                    format!("{}.{:x}.m", spec.policy, at.as_nanosecond())
                } else {
                    format!("{}.{:x}", spec.policy, at.as_nanosecond())
                }),
                namespace: Some(NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(at)),
            action: Some("Detect".into()),
            reason: Some(reason.into()),
            type_: Some("Warning".into()),
            note: Some(note_of(change, reason)),
            regarding: Some(regarding),
            related: Some(change.object_ref(&())),
            reporting_controller: Some(CONTROLLER.into()),
            reporting_instance: Some(self.node.clone()),
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_fim_crds::{DetectionSource, FileChangeSpec, ProcessInfo};

    fn change(path: &str) -> FileChange {
        super::super::object::to_object(
            FileChangeSpec {
                node: "n1".into(),
                policy: "p".into(),
                entry: "etc".into(),
                path: path.into(),
                category: ChangeCategory::Modified,
                changed_attributes: vec![],
                before: None,
                after: None,
                detected_time: MicroTime(Timestamp::now()),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                package: None,
                restored: None,
                container: None,
            },
            0,
        )
    }

    #[test]
    fn notes_say_what_changed_and_what_the_series_counts() {
        let mut c = change("/etc/sudoers");
        assert_eq!(
            describe(&c),
            "/etc/sudoers modified on node n1 (policy p, entry etc, Realtime)"
        );
        // Changes found by a scan carry no writer and so no "by".
        c.spec.process = Some(ProcessInfo {
            by: Some("sshd (pid 812, uid 0)".into()),
            pid: 812,
            ..ProcessInfo::default()
        });
        assert_eq!(
            note(&c),
            "/etc/sudoers modified by sshd (pid 812, uid 0) on node n1 (policy p, entry etc, \
             Realtime) — the first of the files modified under policy p on node n1 this \
             Event's series counts"
        );
        c.spec.path = format!("/{}", "x".repeat(4000));
        let long = note(&c);
        assert!(long.len() <= MAX_NOTE, "{}", long.len());
        assert!(long.ends_with("this Event's series counts"), "{long}");
    }

    #[test]
    fn a_file_that_could_not_be_read_says_why() {
        let mut c = change("/etc/cron");
        c.spec.category = ChangeCategory::Added;
        c.spec.after = Some(kube_fim_crds::FileAttributes {
            unreadable: Some("EWOULDBLOCK: held under a lease by another process".into()),
            ..Default::default()
        });
        assert_eq!(
            describe(&c),
            "/etc/cron added on node n1 (policy p, entry etc, Realtime); it could not be read \
             (EWOULDBLOCK: held under a lease by another process): looked at again until read"
        );
    }

    #[test]
    fn a_mount_over_a_file_is_a_mounted_over_warning_naming_the_mount() {
        use kube_fim_crds::{FileAttributes, Mount};
        let mount = |point: &str, root: &str| FileAttributes {
            mount: Some(Mount {
                mount_point: point.into(),
                fs_type: "ext4".into(),
                source: "/dev/sda1".into(),
                root: root.into(),
            }),
            ..FileAttributes::default()
        };
        let mut c = change("/usr/bin/sudo");
        c.spec.entry = "bin".into();
        c.spec.changed_attributes = vec![Attribute::Mount];
        c.spec.before = Some(mount("/", "/"));
        c.spec.after = Some(mount("/usr/bin/sudo", "/tmp/evil"));
        assert_eq!(reason(&c.spec), "MountedOver");
        assert_eq!(
            note(&c),
            "/usr/bin/sudo modified (mount) on node n1 (policy p, entry bin, Realtime); the \
             host reads it through ext4 /dev/sda1[/tmp/evil] mounted at /usr/bin/sudo — the \
             first of the paths mounted over under policy p on node n1 this Event's series \
             counts"
        );
        c.spec.changed_attributes = vec![Attribute::Mode];
        assert_eq!(reason(&c.spec), "FileModified");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_event_whose_series_is_written_at_most_every_refresh() {
        let mut book = Book::default();
        let key: Key = ("p".into(), "FileModified");
        let other: Key = ("p".into(), "FileAdded");
        let t0 = Instant::now();
        let at = Timestamp::now();
        assert_eq!(book.observe(&key, t0, at), Step::Create);
        book.created(key.clone(), "p.1".into(), t0, at);
        assert_eq!(book.next(t0), None, "nothing owed after the create");
        for _ in 0..9 {
            assert_eq!(book.observe(&key, t0, at), Step::Counted);
        }
        assert_eq!(book.observe(&other, t0, at), Step::Create, "keys apart");
        assert!(book.due(t0, false).is_empty(), "not before REFRESH");
        assert_eq!(book.next(t0), Some(t0 + REFRESH));
        let due = book.due(t0 + REFRESH, false);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].1.event.as_str(), due[0].1.count), ("p.1", 10));
        book.written(&key, 10, t0 + REFRESH);
        assert!(book.due(t0 + REFRESH * 2, false).is_empty(), "written");
        // At shutdown, whatever is unwritten.
        assert_eq!(book.observe(&key, t0 + REFRESH, at), Step::Counted);
        assert_eq!(book.due(t0 + REFRESH, true).len(), 1);
        book.written(&key, 11, t0 + REFRESH);
        // Quiet for FINISH: the series ends; the next change starts another.
        let later = t0 + REFRESH + FINISH;
        assert_eq!(book.next(later), None);
        assert!(book.open.is_empty());
        assert_eq!(book.observe(&key, later, at), Step::Create);
    }
}
