//! The FileChanges the operator knows of.
//!
//! One watch of every FileChange keeps, of each, what a policy's status and
//! retention need: its policy and node (spec), when it was created, and whether
//! it is approved (status). A status refresh counts from here and a retention
//! pass selects from here, so neither lists the changes again: a storm of N
//! changes costs the API server N watch events, not a list of up to N objects
//! per refresh. Policy, node and approval are read from the objects, never from
//! labels (anyone with patch rights can set a label).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::core::{ApiResource, Object};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use kube_fim_crds::FileChange;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::sync::watch;

use crate::seen::{Change, Seen};
use crate::status::ChangeCounts;

/// A FileChange as the watch decodes it. The rest of the object (states,
/// hashes, the writer) is skipped unread: less to decode per event, and a
/// later change of that part of the schema cannot stop the watch.
pub type ChangeView = Object<ViewSpec, ViewStatus>;

/// Of a FileChange's spec, what it was filed under.
#[derive(Clone, Debug, Deserialize)]
pub struct ViewSpec {
    pub policy: String,
    pub node: String,
    /// The node's transition number of the change (none for a Summary).
    #[serde(default)]
    pub sequence: Option<u64>,
}

/// Of a FileChange's status, whether it holds an approval: a person's recorded
/// acknowledgement, which is what the counts and retention go by. The agent's
/// outcome (Applied, Superseded, NotMonitored) says only what became of the
/// node's baseline, and is not read.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ViewStatus {
    #[serde(default)]
    pub approval: Option<IgnoredAny>,
}

/// The cluster's FileChanges, decoded as [`ChangeView`]s.
pub fn api(client: Client) -> Api<ChangeView> {
    Api::all_with(client, &ApiResource::erase::<FileChange>(&()))
}

/// One FileChange as the status and retention see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub policy: String,
    pub node: String,
    pub created: Timestamp,
    pub approved: bool,
    pub sequence: Option<u64>,
}

impl Item {
    pub fn of(change: &ChangeView) -> Item {
        Item {
            name: change.name_any(),
            policy: change.spec.policy.clone(),
            node: change.spec.node.clone(),
            created: change
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now),
            approved: change.status.as_ref().is_some_and(|s| s.approval.is_some()),
            sequence: change.spec.sequence,
        }
    }
}

/// The changes as the watch last saw them, by name, and the names of each
/// policy's changes (what a status refresh and a retention pass look up).
#[derive(Debug, Default)]
struct Index {
    seen: Seen<Item>,
    by_policy: HashMap<String, HashSet<String>>,
    /// Per node, the transition numbers stored, each with how many
    /// FileChanges carry it (the chain's verification, [`crate::chain`]).
    by_node: HashMap<String, Numbers>,
}

/// Transition numbers of one node's stored FileChanges, with how many carry each.
pub type Numbers = BTreeMap<u64, u32>;

fn add_number(by_node: &mut HashMap<String, Numbers>, item: &Item) {
    if let Some(n) = item.sequence {
        *by_node
            .entry(item.node.clone())
            .or_default()
            .entry(n)
            .or_default() += 1;
    }
}

fn remove_number(by_node: &mut HashMap<String, Numbers>, item: &Item) {
    let Some(n) = item.sequence else { return };
    let Some(numbers) = by_node.get_mut(&item.node) else {
        return;
    };
    if let Some(count) = numbers.get_mut(&n) {
        *count -= 1;
        if *count == 0 {
            numbers.remove(&n);
        }
    }
    if numbers.is_empty() {
        by_node.remove(&item.node);
    }
}

impl Index {
    fn observe(&mut self, event: &watcher::Event<ChangeView>) -> Change<Item> {
        let change = self.seen.observe(event, Item::of);
        match &change {
            Change::Same => {}
            Change::Changed { old, new } => {
                if let Some(old) = old
                    && let Some(names) = self.by_policy.get_mut(&old.policy)
                {
                    names.remove(&old.name);
                    if names.is_empty() {
                        self.by_policy.remove(&old.policy);
                    }
                }
                if let Some(old) = old {
                    remove_number(&mut self.by_node, old);
                }
                if let Some(new) = new {
                    add_number(&mut self.by_node, new);
                    self.by_policy
                        .entry(new.policy.clone())
                        .or_default()
                        .insert(new.name.clone());
                }
            }
            Change::Relisted => {
                self.by_policy.clear();
                self.by_node.clear();
                for item in self.seen.values() {
                    add_number(&mut self.by_node, item);
                    self.by_policy
                        .entry(item.policy.clone())
                        .or_default()
                        .insert(item.name.clone());
                }
            }
        }
        change
    }

    /// The changes of `policy`.
    fn of_policy<'a>(&'a self, policy: &str) -> impl Iterator<Item = &'a Item> {
        self.by_policy
            .get(policy)
            .into_iter()
            .flatten()
            .filter_map(|name| self.seen.get(name))
    }
}

/// The FileChanges the operator knows of, filled by the watch.
#[derive(Debug)]
pub struct Changes {
    index: Mutex<Index>,
    listed: watch::Sender<bool>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            index: Mutex::default(),
            listed: watch::Sender::new(false),
        }
    }
}

impl Changes {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one event of the FileChange watch: what it changed.
    pub fn observe(&self, event: &watcher::Event<ChangeView>) -> Change<Item> {
        let change = self.index().observe(event);
        if change == Change::Relisted {
            self.listed.send_replace(true);
        }
        change
    }

    /// Waits until the watch has listed every FileChange once: until then, no
    /// count is known (a policy with none yet is not a policy without any).
    pub async fn wait_until_listed(&self) {
        let mut listed = self.listed.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = listed.wait_for(|listed| *listed).await;
    }

    /// The changes of `policy`.
    pub fn of_policy(&self, policy: &str) -> Vec<Item> {
        self.index().of_policy(policy).cloned().collect()
    }

    /// `f` of the transition numbers stored for `node`.
    pub fn numbers_of<R>(&self, node: &str, f: impl FnOnce(&Numbers) -> R) -> R {
        let index = self.index();
        match index.by_node.get(node) {
            Some(numbers) => f(numbers),
            None => f(&Numbers::new()),
        }
    }

    /// What `policy`'s status shows of its changes, at `now`.
    pub fn counts(&self, policy: &str, now: Timestamp) -> ChangeCounts {
        let index = self.index();
        let day = Duration::from_secs(24 * 3600);
        let mut counts = ChangeCounts::default();
        for item in index.of_policy(policy) {
            if now.duration_since(item.created).unsigned_abs() <= day {
                counts.last_24h += 1;
            }
            if !item.approved {
                counts.unacknowledged += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use kube_fim_crds::{
        Approval, ChangeCategory, DetectionSource, FileChangeSpec, FileChangeStatus,
    };

    /// A FileChange as the API server sends it, decoded as the watch does.
    fn view(fc: &FileChange) -> ChangeView {
        serde_json::from_value(serde_json::to_value(fc).unwrap()).unwrap()
    }

    fn change(name: &str, policy: &str, created: Timestamp) -> FileChange {
        let mut fc = FileChange::new(
            name,
            FileChangeSpec {
                node: "n1".into(),
                policy: policy.into(),
                entry: "etc".into(),
                path: "/etc/passwd".into(),
                category: ChangeCategory::Modified,
                changed_attributes: vec![],
                before: None,
                after: None,
                detected_time: MicroTime(created),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                container: None,
            },
        );
        fc.metadata.creation_timestamp = Some(Time(created));
        fc
    }

    fn approved(mut fc: FileChange) -> FileChange {
        fc.status = Some(FileChangeStatus {
            approval: Some(Approval {
                approved_by: "admin".into(),
                approved_at: Time(Timestamp::now()),
                reason: None,
            }),
            ..FileChangeStatus::default()
        });
        fc
    }

    fn counts(last_24h: i64, unacknowledged: i64) -> ChangeCounts {
        ChangeCounts {
            last_24h,
            unacknowledged,
        }
    }

    #[test]
    fn counts_follow_the_watch_per_policy() {
        let now = Timestamp::now();
        let old = now - Duration::from_secs(90_000);
        let changes = Changes::default();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(view(&change("a", "web", now))),
            watcher::Event::InitApply(view(&change("b", "web", old))),
            watcher::Event::InitApply(view(&change("c", "db", now))),
        ] {
            assert_eq!(changes.observe(&event), Change::Same);
        }
        assert_eq!(changes.counts("web", now), counts(0, 0), "not listed yet");
        assert_eq!(changes.observe(&watcher::Event::InitDone), Change::Relisted);
        assert_eq!(changes.counts("web", now), counts(1, 2));
        assert_eq!(changes.counts("db", now), counts(1, 1));

        // Approved: no longer unacknowledged.
        assert!(matches!(
            changes.observe(&watcher::Event::Apply(view(&approved(change(
                "a", "web", now
            ))))),
            Change::Changed {
                old: Some(_),
                new: Some(_)
            }
        ));
        assert_eq!(changes.counts("web", now), counts(1, 1));
        // The agent's answer to the approval changes nothing counted.
        let mut answered = approved(change("a", "web", now));
        answered.status.as_mut().unwrap().message = Some("baseline updated".into());
        assert_eq!(
            changes.observe(&watcher::Event::Apply(view(&answered))),
            Change::Same
        );

        assert!(matches!(
            changes.observe(&watcher::Event::Delete(view(&change("c", "db", now)))),
            Change::Changed { new: None, .. }
        ));
        assert_eq!(changes.counts("db", now), counts(0, 0));
        assert!(changes.of_policy("db").is_empty());
        assert_eq!(changes.of_policy("web").len(), 2);
    }

    #[test]
    fn the_view_reads_policy_node_time_and_approval_of_a_whole_change() {
        // Whole seconds, as the API server keeps a creation time.
        let created = Timestamp::from_second(Timestamp::now().as_second() - 60).unwrap();
        let mut fc = approved(change("c1", "web", created));
        fc.spec.after = Some(kube_fim_crds::FileAttributes {
            hash: Some("b".repeat(64)),
            ..kube_fim_crds::FileAttributes::default()
        });
        assert_eq!(
            Item::of(&view(&fc)),
            Item {
                name: "c1".into(),
                policy: "web".into(),
                node: "n1".into(),
                created,
                approved: true,
                sequence: None,
            }
        );
        let mut answered = change("c2", "web", created);
        answered.status = Some(FileChangeStatus {
            message: Some("not approved yet".into()),
            ..FileChangeStatus::default()
        });
        assert!(!Item::of(&view(&answered)).approved);
        assert!(!Item::of(&view(&change("c3", "web", created))).approved);
    }

    #[test]
    fn labels_decide_nothing_counted() {
        // Anyone with patch rights can relabel a FileChange: a label naming
        // another policy, node or category moves nothing between counts.
        let now = Timestamp::now();
        let mut fc = change("forged", "web", now);
        fc.metadata.labels = Some(std::collections::BTreeMap::from([
            (kube_fim_crds::labels::POLICY.to_string(), "db".to_string()),
            (kube_fim_crds::labels::NODE.to_string(), "n9".to_string()),
        ]));
        let item = Item::of(&view(&fc));
        assert_eq!((item.policy.as_str(), item.node.as_str()), ("web", "n1"));
        assert!(!item.approved);
        let changes = Changes::default();
        changes.observe(&watcher::Event::Init);
        changes.observe(&watcher::Event::InitApply(view(&fc)));
        changes.observe(&watcher::Event::InitDone);
        assert_eq!(changes.counts("web", now), counts(1, 1));
        assert_eq!(changes.counts("db", now), counts(0, 0));
    }

    #[test]
    fn a_relist_replaces_what_was_known() {
        let now = Timestamp::now();
        let changes = Changes::default();
        changes.observe(&watcher::Event::Apply(view(&change("gone", "web", now))));
        changes.observe(&watcher::Event::Init);
        changes.observe(&watcher::Event::InitApply(view(&change("new", "web", now))));
        assert_eq!(changes.counts("web", now), counts(1, 1));
        changes.observe(&watcher::Event::InitDone);
        let names: Vec<String> = changes
            .of_policy("web")
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["new"]);
    }
}
