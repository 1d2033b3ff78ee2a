//! Rollouts: the same transition of one file on several nodes.
//!
//! Grouped from what the FileChange watch keeps of each change
//! ([`crate::changes::Item`]): its [`Transition`] (policy, entry, path,
//! category, the states before and after in the attributes that mean the same
//! on every node) and its node, read from the spec, which admission binds to
//! the node that created it. So one node's token adds at most one node to a
//! rollout, and can make only itself an outlier.
//!
//! A rollout is listed while its latest change is younger than the window; an
//! *outlier* is a node that is not part of it and changed the same file of the
//! same entry differently within the window around it (from its first change
//! minus the window to its last plus the window).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube_fim_crds::RolloutStatus;
use kube_fim_crds::rollout::{Transition, short};

use crate::changes::{Item, TransactionParts};

/// Rollouts listed in a policy's status at most (the largest first).
pub const MAX_LISTED: usize = 20;
/// Outlier nodes named per rollout at most.
pub const MAX_OUTLIERS_NAMED: usize = 10;

/// How rollouts are found.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// A rollout is listed while its latest change is younger than this; the
    /// outliers are looked for within it around the rollout.
    pub window: Duration,
    /// Nodes that must share a transition for it to be a rollout.
    pub min_nodes: usize,
}

/// The rollouts of one policy.
#[derive(Debug, Default, PartialEq)]
pub struct Rollouts {
    /// The largest first, at most [`MAX_LISTED`].
    pub listed: Vec<RolloutStatus>,
    /// Rollouts found, listed or not.
    pub total: usize,
    /// Nodes that are an outlier of at least one rollout.
    pub outlier_nodes: usize,
}

/// One change of a file: its transition, node, creation time and (a
/// transaction object) what it turned each listed file into.
type Seen<'a> = (
    &'a Transition,
    &'a str,
    Timestamp,
    Option<&'a TransactionParts>,
);

#[derive(Default)]
struct Group<'a> {
    /// Per node, whether each of its changes of the transition is approved.
    nodes: BTreeMap<&'a str, bool>,
    first: Option<Timestamp>,
    last: Option<Timestamp>,
    /// For a transaction, what it turned each listed file into.
    parts: Option<&'a TransactionParts>,
}

/// The rollouts among `items` (the changes of one policy) at `now`.
pub fn find<'a>(items: impl Iterator<Item = &'a Item>, now: Timestamp, s: Settings) -> Rollouts {
    let window = SignedDuration::try_from(s.window).unwrap_or(SignedDuration::MAX);
    let mut groups: HashMap<&'a Transition, Group<'a>> = HashMap::new();
    // Per file (entry and path), each change: transition, node, created.
    let mut by_file: HashMap<(&'a str, &'a str), Vec<Seen<'a>>> = HashMap::new();
    for item in items {
        let Some(t) = item.transition.as_deref() else {
            continue;
        };
        let g = groups.entry(t).or_default();
        let approved = g.nodes.entry(item.node.as_str()).or_insert(true);
        *approved &= item.approved;
        g.first = Some(g.first.map_or(item.created, |f| f.min(item.created)));
        g.last = Some(g.last.map_or(item.created, |l| l.max(item.created)));
        g.parts = g.parts.or(item.parts.as_ref());
        by_file
            .entry((t.entry.as_str(), t.path.as_str()))
            .or_default()
            .push((t, item.node.as_str(), item.created, item.parts.as_ref()));
    }
    let mut found: Vec<(RolloutStatus, BTreeSet<&str>)> = Vec::new();
    for (t, g) in &groups {
        let (Some(first), Some(last)) = (g.first, g.last) else {
            continue;
        };
        if g.nodes.len() < s.min_nodes.max(1) || now.duration_since(last) > window {
            continue;
        }
        let (from, until) = (
            first.checked_sub(window).unwrap_or(first),
            last.checked_add(window).unwrap_or(last),
        );
        let outliers: BTreeSet<&str> = by_file
            .get(&(t.entry.as_str(), t.path.as_str()))
            .into_iter()
            .flatten()
            .filter(|(other, node, created, parts)| {
                *other != *t
                    && other.after != t.after
                    && !g.nodes.contains_key(node)
                    && (from..=until).contains(created)
                    // Transactions (grouped by their first listed file) are
                    // different only where a file both list differs: a node
                    // whose window split the same upgrade otherwise is not
                    // an outlier.
                    && match (g.parts, parts) {
                        (Some(ours), Some(theirs)) => ours.differ(theirs),
                        _ => true,
                    }
            })
            .map(|(_, node, _, _)| *node)
            .collect();
        found.push((
            RolloutStatus {
                id: t.id(),
                entry: t.entry.clone(),
                path: t.path.clone(),
                category: t.category.as_str().to_string(),
                before: short(&t.before).to_string(),
                after: short(&t.after).to_string(),
                nodes: g.nodes.len() as i32,
                approved: g.nodes.values().filter(|a| **a).count() as i32,
                first_seen: Time(first),
                last_seen: Time(last),
                outliers: outliers
                    .iter()
                    .take(MAX_OUTLIERS_NAMED)
                    .map(|n| n.to_string())
                    .collect(),
                outlier_count: outliers.len() as i32,
            },
            outliers,
        ));
    }
    let outlier_nodes: BTreeSet<&str> = found.iter().flat_map(|(_, o)| o.iter().copied()).collect();
    let total = found.len();
    let mut listed: Vec<RolloutStatus> = found.into_iter().map(|(r, _)| r).collect();
    listed.sort_by(|a, b| b.nodes.cmp(&a.nodes).then_with(|| a.id.cmp(&b.id)));
    listed.truncate(MAX_LISTED);
    Rollouts {
        listed,
        total,
        outlier_nodes: outlier_nodes.len(),
    }
}

/// Outlier nodes of `new` not yet named in `old`, per rollout: what a
/// Warning Event must say (once, not at every refresh).
pub fn new_outliers<'a>(
    old: &[RolloutStatus],
    new: &'a [RolloutStatus],
) -> Vec<(&'a RolloutStatus, Vec<&'a str>)> {
    new.iter()
        .filter_map(|r| {
            let before = old.iter().find(|o| o.id == r.id);
            let fresh: Vec<&str> = r
                .outliers
                .iter()
                .filter(|n| before.is_none_or(|b| !b.outliers.contains(n)))
                .map(String::as_str)
                .collect();
            (!fresh.is_empty()).then_some((r, fresh))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use kube_fim_crds::ChangeCategory;
    use kube_fim_crds::rollout::Comparable;

    fn state(hash: char) -> Comparable {
        Comparable {
            hash: Some(hash.to_string().repeat(64)),
            mode: Some("0644".into()),
            ..Comparable::default()
        }
    }

    fn item(name: &str, node: &str, path: &str, before: char, after: char, at: Timestamp) -> Item {
        Item {
            name: name.into(),
            policy: "p".into(),
            node: node.into(),
            created: at,
            approved: false,
            sequence: Some(1),
            moves: Vec::new(),
            package_verified: false,
            entry: "etc".into(),
            host_path: Some(path.into()),
            compliance_labels: Default::default(),
            parts: None,
            transition: Transition::from_parts(
                "p",
                "etc",
                path,
                ChangeCategory::Modified,
                Some(&state(before)),
                Some(&state(after)),
            )
            .map(Arc::new),
        }
    }

    fn settings() -> Settings {
        Settings {
            window: Duration::from_secs(3600),
            min_nodes: 2,
        }
    }

    fn mins(m: i64) -> SignedDuration {
        SignedDuration::from_mins(m)
    }

    #[test]
    fn two_nodes_the_same_one_different_is_a_rollout_with_an_outlier() {
        let now = Timestamp::now();
        let items = [
            item("a1", "a", "/etc/app.conf", '1', '2', now - mins(5)),
            item("b1", "b", "/etc/app.conf", '1', '2', now - mins(4)),
            item("c1", "c", "/etc/app.conf", '1', '3', now - mins(3)),
            // Another file changes on one node only: no rollout.
            item("a2", "a", "/etc/other", '1', '2', now - mins(3)),
        ];
        let found = find(items.iter(), now, settings());
        assert_eq!(found.total, 1);
        assert_eq!(found.outlier_nodes, 1);
        let r = &found.listed[0];
        assert_eq!((r.nodes, r.approved), (2, 0));
        assert_eq!(r.path, "/etc/app.conf");
        assert_eq!(r.outliers, ["c"]);
        assert_eq!(r.outlier_count, 1);
        assert_eq!(r.before.len(), 12, "a short digest of the state");
        assert_ne!(r.before, r.after);
        assert_eq!(r.id, items[0].transition.as_ref().unwrap().id());
    }

    #[test]
    fn one_node_cannot_make_a_rollout_of_its_own_changes() {
        // An agent's token can create many FileChanges, all of its own node
        // (admission): the same transition ten times is one node, no rollout,
        // and it cannot name another node as the outlier.
        let now = Timestamp::now();
        let mut items: Vec<Item> = (0..10)
            .map(|i| item(&format!("x{i}"), "x", "/etc/app.conf", '1', '2', now))
            .collect();
        items.push(item("y", "y", "/etc/app.conf", '1', '9', now));
        let found = find(items.iter(), now, settings());
        assert_eq!(found, Rollouts::default());
        // With a real second node it is a rollout of two, whoever repeats.
        items.push(item("z", "z", "/etc/app.conf", '1', '2', now));
        let found = find(items.iter(), now, settings());
        assert_eq!(found.listed[0].nodes, 2);
        assert_eq!(found.listed[0].outliers, ["y"]);
    }

    #[test]
    fn approvals_count_per_node_and_old_rollouts_leave_the_list() {
        let now = Timestamp::now();
        let mut a = item("a", "a", "/etc/f", '1', '2', now - mins(90));
        a.approved = true;
        let b = item("b", "b", "/etc/f", '1', '2', now - mins(80));
        let found = find([a.clone(), b.clone()].iter(), now, settings());
        assert_eq!(found.total, 0, "latest change older than the window");
        let c = item("c", "c", "/etc/f", '1', '2', now - mins(10));
        // A different change far outside the window is no outlier.
        let d = item("d", "d", "/etc/f", '1', '5', now - mins(300));
        let found = find([a, b, c, d].iter(), now, settings());
        assert_eq!((found.listed[0].nodes, found.listed[0].approved), (3, 1));
        assert!(found.listed[0].outliers.is_empty());
    }

    #[test]
    fn a_chained_rollout_is_not_its_own_outlier() {
        // 1→2 on every node, then 2→3 on every node: two rollouts, no outlier.
        let now = Timestamp::now();
        let items = [
            item("a1", "a", "/etc/f", '1', '2', now - mins(20)),
            item("b1", "b", "/etc/f", '1', '2', now - mins(20)),
            item("a2", "a", "/etc/f", '2', '3', now - mins(10)),
            item("b2", "b", "/etc/f", '2', '3', now - mins(10)),
        ];
        let found = find(items.iter(), now, settings());
        assert_eq!(found.total, 2);
        assert_eq!(found.outlier_nodes, 0);
    }

    /// A package transaction object listing `files` (path, state after), on
    /// `node`, as the FileChange watch keeps it.
    fn transaction(name: &str, node: &str, files: &[(&str, char)], at: Timestamp) -> Item {
        use crate::changes::{ViewItem, ViewTransaction};
        let listed = ViewTransaction {
            changes: files
                .iter()
                .map(|(path, after)| ViewItem {
                    path: path.to_string(),
                    category: ChangeCategory::Modified,
                    before: Some(state('1')),
                    after: Some(state(*after)),
                })
                .collect(),
        };
        let mut it = item(name, node, files[0].0, '1', '1', at);
        it.transition = Transition::of_items(
            "p",
            "etc",
            files[0].0,
            ChangeCategory::Modified,
            listed.changes.iter().map(|i| {
                (
                    i.path.as_str(),
                    i.category,
                    i.before.as_ref(),
                    i.after.as_ref(),
                )
            }),
        )
        .map(Arc::new);
        it.parts = Some(TransactionParts::of(&listed));
        it
    }

    #[test]
    fn a_node_whose_window_split_the_same_upgrade_is_no_outlier_and_a_different_file_is() {
        // Nodes a and b list the upgrade's four files in one transaction;
        // c's transaction window closed after two (its other two files are
        // another object): the same upgrade, not a different change. d
        // turned one of the four into something else: the outlier.
        let now = Timestamp::now();
        let upgrade = [
            ("/usr/bin/a", '2'),
            ("/usr/bin/b", '2'),
            ("/usr/bin/c", '2'),
            ("/usr/bin/d", '2'),
        ];
        let mut trojan = upgrade;
        trojan[2].1 = '6';
        let items = [
            transaction("a", "a", &upgrade, now - mins(5)),
            transaction("b", "b", &upgrade, now - mins(5)),
            transaction("c1", "c", &upgrade[..2], now - mins(5)),
            transaction("c2", "c", &upgrade[2..], now - mins(5)),
            transaction("d", "d", &trojan, now - mins(5)),
        ];
        let found = find(items.iter(), now, settings());
        let r = found
            .listed
            .iter()
            .find(|r| r.nodes == 2)
            .expect("the rollout of a and b");
        assert_eq!(
            r.outliers,
            ["d"],
            "c split the same upgrade; d changed /usr/bin/c differently"
        );
        assert_eq!(found.outlier_nodes, 1);
    }

    #[test]
    fn only_new_outliers_are_said() {
        let now = Timestamp::now();
        let items = [
            item("a", "a", "/etc/f", '1', '2', now),
            item("b", "b", "/etc/f", '1', '2', now),
            item("c", "c", "/etc/f", '1', '3', now),
        ];
        let first = find(items.iter(), now, settings()).listed;
        let said = new_outliers(&[], &first);
        assert_eq!(said.len(), 1);
        assert_eq!(said[0].1, ["c"]);
        assert!(new_outliers(&first, &first).is_empty());
    }

    /// The cost of grouping at fleet size, printed (`-- --nocapture`); it
    /// runs with the unit tests, at a size a debug build does quickly.
    #[test]
    fn cost_of_grouping_a_fleet_wide_upgrade() {
        // 1,000 nodes × 50 files, one transition each, every node the same
        // but one per file: 50 rollouts of 999 nodes, each with an outlier.
        let now = Timestamp::now();
        let (nodes, files) = (1000, 50);
        let items: Vec<Item> = (0..nodes)
            .flat_map(|n| {
                (0..files).map(move |f| {
                    let after = if n == f { '3' } else { '2' };
                    item(
                        &format!("n{n}-{f}"),
                        &format!("node-{n:04}"),
                        &format!("/usr/lib/x86_64-linux-gnu/libfile{f}.so"),
                        '1',
                        after,
                        now,
                    )
                })
            })
            .collect();
        let started = std::time::Instant::now();
        let found = find(items.iter(), now, settings());
        let took = started.elapsed();
        assert_eq!(found.total, files);
        assert_eq!(found.outlier_nodes, files);
        assert!(found.listed.iter().all(|r| r.nodes == nodes as i32 - 1));
        // What the index holds: per change its Item (name, policy, node
        // and a pointer to the shared transition), per transition one copy.
        let per_change = std::mem::size_of::<Item>()
            + items[0].name.len()
            + items[0].policy.len()
            + items[0].node.len();
        let per_transition = items[0].transition.as_ref().map_or(0, |t| {
            std::mem::size_of::<Transition>()
                + t.policy.len()
                + t.entry.len()
                + t.path.len()
                + t.before.len()
                + t.after.len()
        });
        eprintln!(
            "rollouts of {} changes: {took:?} (debug build); index: ~{per_change} bytes per change + ~{per_transition} per distinct transition",
            items.len()
        );
    }
}
