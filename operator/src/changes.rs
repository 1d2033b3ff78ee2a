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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::core::{ApiResource, Object};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use kube_fim_crds::compliance::{self, ComplianceRef};
use kube_fim_crds::rollout::{Comparable, Transition};
use kube_fim_crds::{
    ChangeCategory, EntryDigestMove, FileChange, FileIntegrityPolicySpec, PackageVerdict,
    PackageVerifiedChanges,
};
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
    /// What the rollouts group by ([`crate::rollouts`]): the entry, path and
    /// category, and of the states only what means the same on every node.
    #[serde(default)]
    pub entry: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub category: String,
    /// When the agent detected it: what storms are counted by ([`crate::storm`]).
    #[serde(default, rename = "detectedTime")]
    pub detected_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>,
    #[serde(default)]
    pub before: Option<Comparable>,
    #[serde(default)]
    pub after: Option<Comparable>,
    /// The agent's package check of the file, if a package owns it.
    #[serde(default)]
    pub package: Option<ViewPackage>,
    /// Set for a change inside a container (its path is not the host's).
    #[serde(default)]
    pub container: Option<IgnoredAny>,
}

/// Of a FileChange's package check, its verdict (and for a package
/// transaction object, what its changes' transitions need).
#[derive(Clone, Debug, Deserialize)]
pub struct ViewPackage {
    pub verdict: PackageVerdict,
    #[serde(default)]
    pub transaction: Option<ViewTransaction>,
}

/// Of a package transaction object, its changes.
#[derive(Clone, Debug, Deserialize)]
pub struct ViewTransaction {
    #[serde(default)]
    pub changes: Vec<ViewItem>,
}

/// Of one change a transaction lists, what its transition is made of.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewItem {
    #[serde(default)]
    pub path: String,
    pub category: ChangeCategory,
    #[serde(default)]
    pub before: Option<Comparable>,
    #[serde(default)]
    pub after: Option<Comparable>,
}

/// Of a FileChange's status, whether it holds an approval: a person's recorded
/// acknowledgement, which is what the counts and retention go by. The agent's
/// outcome (Applied, Superseded, NotMonitored) says only what became of the
/// node's baseline, and is not read.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewStatus {
    #[serde(default)]
    pub approval: Option<IgnoredAny>,
    /// How the node's answer to the approval moved its entry digests: what
    /// the chain's verification explains a published digest's move with.
    #[serde(default)]
    pub entry_digests: Vec<EntryDigestMove>,
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
    /// The entry digest moves of the node's answer to its approval.
    pub moves: Vec<EntryDigestMove>,
    /// The change's transition (none for a Summary), which rollouts group by.
    pub transition: Option<Arc<Transition>>,
    /// For a package transaction object, what each listed change turned its
    /// file into ([`TransactionParts`]): how rollouts tell a node whose
    /// window split the same upgrade differently from one that changed a
    /// file differently.
    pub parts: Option<TransactionParts>,
    /// Its new content is an installed package's (the node's claim).
    pub package_verified: bool,
    /// The policy entry it was filed under, and its host path (none for a
    /// change inside a container): what its compliance references come from.
    pub entry: String,
    pub host_path: Option<String>,
    /// Its `compliance.kube-fim.io/*` labels, as stored.
    pub compliance_labels: BTreeMap<String, String>,
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
            moves: change
                .status
                .as_ref()
                .map(|s| s.entry_digests.clone())
                .unwrap_or_default(),
            transition: transition_of(&change.spec).map(Arc::new),
            parts: change
                .spec
                .package
                .as_ref()
                .and_then(|p| p.transaction.as_ref())
                .map(TransactionParts::of),
            package_verified: change
                .spec
                .package
                .as_ref()
                .is_some_and(|p| p.verdict == PackageVerdict::Verified),
            entry: change.spec.entry.clone(),
            host_path: change
                .spec
                .container
                .is_none()
                .then(|| change.spec.path.clone()),
            compliance_labels: change
                .metadata
                .labels
                .as_ref()
                .map(compliance::labels_in)
                .unwrap_or_default(),
        }
    }
}

/// Of each change a transaction object lists, a key of its path and one of
/// what it turned the file into (category and state after), sorted by path
/// key: 16 bytes a listed change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionParts(Arc<[(u64, u64)]>);

impl TransactionParts {
    pub fn of(t: &ViewTransaction) -> TransactionParts {
        let key = |parts: &[&[u8]]| {
            let mut h = blake3::Hasher::new();
            for p in parts {
                h.update(&(p.len() as u64).to_le_bytes());
                h.update(p);
            }
            let mut k = [0u8; 8];
            k.copy_from_slice(&h.finalize().as_bytes()[..8]);
            u64::from_le_bytes(k)
        };
        let mut parts: Vec<(u64, u64)> = t
            .changes
            .iter()
            .map(|i| {
                let after = Comparable::digest(i.after.as_ref());
                (
                    key(&[i.path.as_bytes()]),
                    key(&[i.category.as_str().as_bytes(), after.as_bytes()]),
                )
            })
            .collect();
        parts.sort_unstable();
        TransactionParts(parts.into())
    }

    /// Whether a file both list was turned into something different: the
    /// same upgrade split into other transactions (a part of it, or more)
    /// is not a different change.
    pub fn differ(&self, other: &TransactionParts) -> bool {
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
            match x.0.cmp(&y.0) {
                std::cmp::Ordering::Less => {
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if x.1 != y.1 {
                        return true;
                    }
                    a.next();
                    b.next();
                }
            }
        }
        false
    }
}

fn transition_of(spec: &ViewSpec) -> Option<Transition> {
    let category = match spec.category.as_str() {
        "Added" => ChangeCategory::Added,
        "Modified" => ChangeCategory::Modified,
        "Removed" => ChangeCategory::Removed,
        _ => return None,
    };
    if let Some(t) = spec.package.as_ref().and_then(|p| p.transaction.as_ref()) {
        return Transition::of_items(
            &spec.policy,
            &spec.entry,
            &spec.path,
            category,
            t.changes.iter().map(|i| {
                (
                    i.path.as_str(),
                    i.category,
                    i.before.as_ref(),
                    i.after.as_ref(),
                )
            }),
        );
    }
    Transition::from_parts(
        &spec.policy,
        &spec.entry,
        &spec.path,
        category,
        spec.before.as_ref(),
        spec.after.as_ref(),
    )
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
    /// Per node, the entry digest moves its answers hold, by FileChange name.
    moves: HashMap<String, HashMap<String, Vec<EntryDigestMove>>>,
    /// One copy of each transition, shared by every node's change of it: a
    /// fleet-wide upgrade is thousands of nodes with the same few hundred
    /// transitions.
    transitions: Interned,
}

fn add_moves(moves: &mut HashMap<String, HashMap<String, Vec<EntryDigestMove>>>, item: &Item) {
    if !item.moves.is_empty() {
        moves
            .entry(item.node.clone())
            .or_default()
            .insert(item.name.clone(), item.moves.clone());
    }
}

fn remove_moves(moves: &mut HashMap<String, HashMap<String, Vec<EntryDigestMove>>>, item: &Item) {
    if let Some(of_node) = moves.get_mut(&item.node) {
        of_node.remove(&item.name);
        if of_node.is_empty() {
            moves.remove(&item.node);
        }
    }
}

/// The transitions of the changes known, each held once.
#[derive(Debug, Default)]
struct Interned {
    set: HashSet<Arc<Transition>>,
    observed: u64,
}

/// Every this many events, transitions no change holds any more are dropped.
const SWEEP_EVERY: u64 = 4096;

impl Interned {
    /// `item` holding the shared copy of its transition.
    fn share(&mut self, mut item: Item) -> Item {
        if let Some(t) = item.transition.take() {
            let shared = match self.set.get(&t) {
                Some(s) => s.clone(),
                None => {
                    self.set.insert(t.clone());
                    t
                }
            };
            item.transition = Some(shared);
        }
        item
    }

    /// Drops the transitions only this set holds (now and then: a sweep
    /// looks at every one).
    fn sweep(&mut self, force: bool) {
        self.observed += 1;
        if force || self.observed.is_multiple_of(SWEEP_EVERY) {
            self.set.retain(|t| Arc::strong_count(t) > 1);
        }
    }
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
        let interned = std::cell::RefCell::new(std::mem::take(&mut self.transitions));
        let change = self
            .seen
            .observe(event, |c| interned.borrow_mut().share(Item::of(c)));
        self.transitions = interned.into_inner();
        self.transitions.sweep(change == Change::Relisted);
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
                    remove_moves(&mut self.moves, old);
                }
                if let Some(new) = new {
                    add_number(&mut self.by_node, new);
                    add_moves(&mut self.moves, new);
                    self.by_policy
                        .entry(new.policy.clone())
                        .or_default()
                        .insert(new.name.clone());
                }
            }
            Change::Relisted => {
                self.by_policy.clear();
                self.by_node.clear();
                self.moves.clear();
                for item in self.seen.values() {
                    add_number(&mut self.by_node, item);
                    add_moves(&mut self.moves, item);
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

    /// How many FileChanges the watch holds.
    pub fn count(&self) -> usize {
        self.index().seen.values().count()
    }

    /// The entry digest moves answered on `node`'s stored FileChanges.
    pub fn moves_of(&self, node: &str) -> Vec<EntryDigestMove> {
        self.index()
            .moves
            .get(node)
            .into_iter()
            .flat_map(|of_node| of_node.values().flatten().cloned())
            .collect()
    }

    /// The changes of `policy`.
    pub fn of_policy(&self, policy: &str) -> Vec<Item> {
        self.index().of_policy(policy).cloned().collect()
    }

    /// `f` of the changes of `policy`, without copying them.
    pub fn with_policy<R>(
        &self,
        policy: &str,
        f: impl FnOnce(&mut dyn Iterator<Item = &Item>) -> R,
    ) -> R {
        let index = self.index();
        let mut items = index.of_policy(policy);
        f(&mut items)
    }

    /// Distinct transitions held for the changes known.
    pub fn transitions_held(&self) -> usize {
        self.index().transitions.set.len()
    }

    /// `f` of the transition numbers stored for `node`.
    pub fn numbers_of<R>(&self, node: &str, f: impl FnOnce(&Numbers) -> R) -> R {
        let index = self.index();
        match index.by_node.get(node) {
            Some(numbers) => f(numbers),
            None => f(&Numbers::new()),
        }
    }

    /// What `policy`'s status shows of its changes, at `now`: a
    /// package-verified change waits for approval only when the policy says
    /// `RequireApproval`.
    pub fn counts(
        &self,
        policy: &str,
        now: Timestamp,
        verified: PackageVerifiedChanges,
    ) -> ChangeCounts {
        let index = self.index();
        let day = Duration::from_secs(24 * 3600);
        let mut counts = ChangeCounts::default();
        for item in index.of_policy(policy) {
            if now.duration_since(item.created).unsigned_abs() <= day {
                counts.last_24h += 1;
            }
            let recorded = item.package_verified && verified == PackageVerifiedChanges::Record;
            if !item.approved && !recorded {
                counts.unacknowledged += 1;
            }
        }
        counts
    }

    /// Per compliance reference of `spec`'s entries, how many of `policy`'s
    /// changes are evidence for it, and how many of those wait for an
    /// approval (as [`Changes::counts`] counts them). From the policy, never
    /// from a change's labels.
    pub fn compliance_counts(
        &self,
        policy: &str,
        spec: &FileIntegrityPolicySpec,
    ) -> BTreeMap<ComplianceRef, ComplianceCount> {
        let index = self.index();
        let mut out: BTreeMap<ComplianceRef, ComplianceCount> = spec
            .all_compliance()
            .into_iter()
            .map(|r| (r, ComplianceCount::default()))
            .collect();
        let map = spec.compliance_map();
        for item in index.of_policy(policy) {
            let refs = map.of_change(&item.entry, item.host_path.as_deref());
            let recorded = item.package_verified
                && spec.package_verified_changes == PackageVerifiedChanges::Record;
            for r in refs.iter() {
                let count = out.entry(r.clone()).or_default();
                count.changes += 1;
                if !item.approved && !recorded {
                    count.unacknowledged += 1;
                }
            }
        }
        out
    }

    /// `policy`'s changes that lack the compliance labels `spec` gives their
    /// entry, with those labels: what the operator labels (at most `max`).
    pub fn to_label(
        &self,
        policy: &str,
        spec: &FileIntegrityPolicySpec,
        max: usize,
    ) -> Vec<(String, BTreeMap<String, String>)> {
        let map = spec.compliance_map();
        let index = self.index();
        let mut out = Vec::new();
        for item in index.of_policy(policy) {
            if out.len() >= max {
                break;
            }
            // Labelled once: a policy edited later does not relabel what its
            // earlier version filed.
            if !item.compliance_labels.is_empty() {
                continue;
            }
            let want = compliance::labels(&map.of_change(&item.entry, item.host_path.as_deref()));
            if !want.is_empty() {
                out.push((item.name.clone(), want));
            }
        }
        out
    }
}

/// Of one compliance reference, the changes that are evidence for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ComplianceCount {
    pub changes: i64,
    pub unacknowledged: i64,
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
                package: None,
                restored: None,
                container: None,
            },
        );
        fc.metadata.creation_timestamp = Some(Time(created));
        fc
    }

    #[test]
    fn compliance_comes_from_the_policy_and_the_path_and_each_change_is_labelled_once() {
        use kube_fim_crds::{MonitoredPath, Preset};
        let now = Timestamp::now();
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
            name: "etc".into(),
            path: "/etc/passwd".into(),
            ..MonitoredPath::default()
        }]);
        spec.preset = Some(Preset::Recommended);
        let changes = Changes::default();
        let mut misfiled = change("m", "web", now);
        misfiled.spec.path = "/usr/bin/sudo".into();
        let mut labelled = change("l", "web", now);
        labelled.spec.path = "/usr/bin/su".into();
        labelled.metadata.labels = Some(
            [(
                "compliance.kube-fim.io/pci-dss-4.0".to_string(),
                "1.1.1".to_string(),
            )]
            .into(),
        );
        for fc in [
            change("c", "web", now),
            approved(misfiled.clone()),
            labelled,
        ] {
            changes.observe(&watcher::Event::Apply(view(&fc)));
        }
        // Filed under `etc` by the node, /usr/bin/sudo is the preset's
        // usr-bin all the same; /etc/passwd is under no control.
        let todo = changes.to_label("web", &spec, 10);
        assert_eq!(todo.len(), 1, "{todo:?}");
        assert_eq!(todo[0].0, "m");
        assert_eq!(
            todo[0]
                .1
                .get("compliance.kube-fim.io/pci-dss-4.0")
                .map(String::as_str),
            Some("11.5.2")
        );
        // Counted from the policy: the relabelled change too, whatever its label says.
        let counts = changes.compliance_counts("web", &spec);
        let pci = counts[&ComplianceRef::new("pci-dss-4.0", "11.5.2")];
        assert_eq!(
            pci,
            ComplianceCount {
                changes: 2,
                unacknowledged: 1
            }
        );
        assert_eq!(counts.len(), 3);
        assert!(
            changes
                .to_label("web", &FileIntegrityPolicySpec::default(), 10)
                .is_empty()
        );
    }

    fn approved(mut fc: FileChange) -> FileChange {
        fc.status = Some(FileChangeStatus {
            approval: Some(Approval {
                approved_by: "admin".into(),
                approved_at: Time(Timestamp::now()),
                reason: None,
                paths: Vec::new(),
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
        assert_eq!(
            changes.counts("web", now, PackageVerifiedChanges::Record),
            counts(0, 0),
            "not listed yet"
        );
        assert_eq!(changes.observe(&watcher::Event::InitDone), Change::Relisted);
        assert_eq!(
            changes.counts("web", now, PackageVerifiedChanges::Record),
            counts(1, 2)
        );
        assert_eq!(
            changes.counts("db", now, PackageVerifiedChanges::Record),
            counts(1, 1)
        );

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
        assert_eq!(
            changes.counts("web", now, PackageVerifiedChanges::Record),
            counts(1, 1)
        );
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
        assert_eq!(
            changes.counts("db", now, PackageVerifiedChanges::Record),
            counts(0, 0)
        );
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
                moves: Vec::new(),
                transition: Transition::of(&fc.spec).map(Arc::new),
                parts: None,
                package_verified: false,
                entry: fc.spec.entry.clone(),
                host_path: Some(fc.spec.path.clone()),
                compliance_labels: BTreeMap::new(),
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
        assert_eq!(
            changes.counts("web", now, PackageVerifiedChanges::Record),
            counts(1, 1)
        );
        assert_eq!(
            changes.counts("db", now, PackageVerifiedChanges::Record),
            counts(0, 0)
        );
    }

    #[test]
    fn every_nodes_change_of_one_transition_shares_one_copy() {
        let now = Timestamp::now();
        let changes = Changes::default();
        let of = |name: &str, node: &str, path: &str| {
            let mut fc = change(name, "web", now);
            fc.spec.node = node.into();
            fc.spec.path = path.into();
            view(&fc)
        };
        changes.observe(&watcher::Event::Init);
        for n in 0..100 {
            for f in 0..5 {
                let node = format!("n{n}");
                let path = format!("/etc/f{f}");
                changes.observe(&watcher::Event::InitApply(of(
                    &format!("{node}{f}"),
                    &node,
                    &path,
                )));
            }
        }
        changes.observe(&watcher::Event::InitDone);
        assert_eq!(changes.transitions_held(), 5);
        let items = changes.of_policy("web");
        let first = items.iter().find(|i| i.name == "n00").unwrap();
        let other = items.iter().find(|i| i.name == "n990").unwrap();
        assert!(Arc::ptr_eq(
            first.transition.as_ref().unwrap(),
            other.transition.as_ref().unwrap()
        ));
        // Once the changes are gone, so are their transitions.
        changes.observe(&watcher::Event::Init);
        changes.observe(&watcher::Event::InitApply(of("x", "n1", "/etc/f0")));
        changes.observe(&watcher::Event::InitDone);
        drop(items);
        changes.observe(&watcher::Event::Init);
        changes.observe(&watcher::Event::InitApply(of("x", "n1", "/etc/f0")));
        changes.observe(&watcher::Event::InitDone);
        assert_eq!(changes.transitions_held(), 1);
    }

    #[test]
    fn a_relist_replaces_what_was_known() {
        let now = Timestamp::now();
        let changes = Changes::default();
        changes.observe(&watcher::Event::Apply(view(&change("gone", "web", now))));
        changes.observe(&watcher::Event::Init);
        changes.observe(&watcher::Event::InitApply(view(&change("new", "web", now))));
        assert_eq!(
            changes.counts("web", now, PackageVerifiedChanges::Record),
            counts(1, 1)
        );
        changes.observe(&watcher::Event::InitDone);
        let names: Vec<String> = changes
            .of_policy("web")
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["new"]);
    }

    #[test]
    fn a_package_verified_change_waits_for_approval_only_when_the_policy_says_so() {
        let now = Timestamp::now();
        let checked = |name: &str, verdict| {
            let mut fc = change(name, "web", now);
            fc.spec.package = Some(kube_fim_crds::PackageCheck {
                manager: kube_fim_crds::PackageManager::Dpkg,
                name: "sudo".into(),
                version: "1.9.13p3-1+deb12u2".into(),
                version_before: None,
                verdict,
                transaction: None,
            });
            fc
        };
        let changes = Changes::default();
        changes.observe(&watcher::Event::Init);
        for fc in [
            checked("verified", PackageVerdict::Verified),
            checked("mismatch", PackageVerdict::Mismatch),
            change("plain", "web", now),
        ] {
            changes.observe(&watcher::Event::InitApply(view(&fc)));
        }
        changes.observe(&watcher::Event::InitDone);
        // Recorded: the verified change is evidence, not an alert; a
        // mismatch and an unowned change still wait.
        assert_eq!(
            changes.counts("web", now, PackageVerifiedChanges::Record),
            counts(3, 2)
        );
        assert_eq!(
            changes.counts("web", now, PackageVerifiedChanges::RequireApproval),
            counts(3, 3)
        );
    }
    #[test]
    fn a_transaction_objects_transition_is_the_same_from_the_view_and_the_typed_object() {
        let now = Timestamp::now();
        let mut fc = change("txn", "web", now);
        let state = |hash: char| kube_fim_crds::FileAttributes {
            hash: Some(hash.to_string().repeat(64)),
            inode: Some(7),
            ..Default::default()
        };
        let item = |path: &str| kube_fim_crds::TransactionItem {
            path: path.into(),
            category: ChangeCategory::Modified,
            changed_attributes: vec![],
            before: Some(state('1')),
            after: Some(state('2')),
            detected_time: fc.spec.detected_time.clone(),
            source: fc.spec.source,
            process: None,
            package: "gzip".into(),
            version: "2".into(),
            version_before: None,
        };
        fc.spec.before = None;
        fc.spec.after = None;
        fc.spec.package = Some(kube_fim_crds::PackageCheck {
            manager: kube_fim_crds::PackageManager::Dpkg,
            name: "gzip".into(),
            version: "2".into(),
            version_before: None,
            verdict: PackageVerdict::Verified,
            transaction: Some(kube_fim_crds::PackageTransaction {
                summary: "gzip 2, 2 files".into(),
                files: 2,
                changes: vec![item("/bin/gzip"), item("/bin/zcat")],
            }),
        });
        let typed = Transition::of(&fc.spec).unwrap();
        let seen = Item::of(&view(&fc)).transition.unwrap();
        assert_eq!(
            *seen, typed,
            "kubectl fim rollouts approve recomputes what the operator grouped"
        );
        assert!(typed.before.starts_with("txn-"), "{typed:?}");
    }
}
