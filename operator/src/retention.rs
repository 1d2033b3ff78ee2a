//! Retention: which FileChanges a policy's limits let go, and deleting them in
//! small paced batches so retention never floods the API server.
//!
//! Retention keeps a clock of its own ([`run`]): a pass over every policy each
//! `--resync`, sooner while a pass leaves a backlog, selecting from the changes
//! the operator's watch knows ([`crate::changes`]) without listing them. It
//! does not run on every change: during a storm that would select, delete and
//! announce a few changes once per batch window.
//!
//! FileChanges are evidence, so retention is conservative:
//! - only approved changes are deleted, unless the policy sets
//!   `retention.deleteUnapproved` (an unapproved change is evidence nobody
//!   has looked at yet);
//! - `maxCount` is counted per node: the admission policy lets an agent create
//!   changes for its own node only, so a node flooding the API with changes can
//!   push out its own records at most, never another node's;
//! - a change numbered in its node's chain is deleted only once the operator
//!   verified that number ([`crate::chain`]: below the node's
//!   `status.verification.verifiedThrough`); a change deleted before would
//!   leave a gap nobody could tell from a lost report. Changes without a
//!   number (summaries, older agents) and changes of nodes without a
//!   FileIntegrityNode (deleted nodes) follow the limits alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::{Event, EventType};
use kube_fim_crds::duration::parse_duration;
use kube_fim_crds::{FileChange, FileIntegrityPolicy};
use tracing::{debug, info, warn};

use crate::changes::Item;
use crate::context::{Context, publish, store_ready};

/// The next pass comes this soon when one left changes to delete.
const BACKLOG: Duration = Duration::from_secs(5);

/// The limits of one policy.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_age: Duration,
    pub max_count_per_node: usize,
    pub delete_unapproved: bool,
}

/// What retention decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Names to delete, oldest first.
    pub doomed: Vec<String>,
    /// Everything else.
    pub kept: Vec<Item>,
    /// Of the kept, changes past a limit that are kept because nobody approved them.
    pub held: usize,
}

/// How far each node's chain is verified (`verifiedThrough`): `None` for a
/// node whose FileIntegrityNode holds no verification yet. Nodes without a
/// FileIntegrityNode are not listed.
pub type Verified = HashMap<String, Option<u64>>;

/// Whether the chain verification lets `item` go.
fn verified(item: &Item, verified: &Verified) -> bool {
    match (item.sequence, verified.get(&item.node)) {
        (None, _) | (_, None) => true,
        (Some(n), Some(through)) => through.is_some_and(|t| n < t),
    }
}

/// Per node: everything deletable older than `max_age`, then the oldest
/// deletable ones until at most `max_count_per_node` remain. Deletable:
/// approved (or the policy deletes unapproved ones too) and verified.
pub fn select_for_deletion(
    items: Vec<Item>,
    limits: Limits,
    checkpoints: &Verified,
    now: Timestamp,
) -> Selection {
    let mut per_node: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    for item in items {
        per_node.entry(item.node.clone()).or_default().push(item);
    }
    let mut out = Selection::default();
    for (_, mut items) in per_node {
        items.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        let mut remaining = items.len();
        for item in items {
            let too_old = now.duration_since(item.created).unsigned_abs() > limits.max_age;
            let too_many = remaining > limits.max_count_per_node;
            let deletable =
                (item.approved || limits.delete_unapproved) && verified(&item, checkpoints);
            if (too_old || too_many) && deletable {
                remaining -= 1;
                out.doomed.push(item.name);
            } else {
                if too_old || too_many {
                    out.held += 1;
                }
                out.kept.push(item);
            }
        }
    }
    out
}

/// Retention's clock: a pass over every policy once the watch has listed the
/// changes, then every `--resync` (every few seconds while a backlog remains).
/// Runs until the controller stops it.
pub async fn run(ctx: Arc<Context>) {
    ctx.changes.wait_until_listed().await;
    if store_ready(&ctx.policies).await.is_err() {
        return;
    }
    loop {
        let mut backlog = false;
        for policy in ctx.policies.state() {
            // A policy being deleted is evidence's concern (crate::evidence).
            if policy.metadata.deletion_timestamp.is_none() {
                backlog |= pass(&policy, &ctx).await;
            }
        }
        tokio::time::sleep(if backlog { BACKLOG } else { ctx.config.resync }).await;
    }
}

/// One policy's pass: deletes at most `--retention-max-per-pass` changes past
/// its limits and names them in a `RetentionDeleted` Event. Whether some are
/// left for the next pass.
async fn pass(policy: &FileIntegrityPolicy, ctx: &Context) -> bool {
    let retention = &policy.spec.retention;
    // A policy the API server holds with an unreadable maxAge is reported
    // invalid by its status; nothing of it is deleted.
    let Ok(max_age) = parse_duration(&retention.max_age) else {
        return false;
    };
    let name = policy.name_any();
    let doomed = select_for_deletion(
        ctx.changes.of_policy(&name),
        Limits {
            max_age,
            max_count_per_node: retention.max_count as usize,
            delete_unapproved: retention.delete_unapproved,
        },
        &checkpoints(ctx),
        Timestamp::now(),
    )
    .doomed;
    let doomed = crate::export::hold(&ctx.client, doomed).await;
    if doomed.is_empty() {
        return false;
    }
    let pass = &doomed[..doomed.len().min(ctx.config.retention_max_per_pass)];
    let deleted = delete(
        &Api::all(ctx.client.clone()),
        pass,
        ctx.config.retention_batch,
        ctx.config.retention_pause,
    )
    .await;
    ctx.metrics.retention_deleted.inc_by(deleted.len() as u64);
    info!(policy = %name, deleted = deleted.len(), pending = doomed.len() - pass.len(), "retention");
    if !deleted.is_empty() {
        let what = format!(
            "retention (maxAge {}, maxCount {} per node{}) deleted",
            retention.max_age,
            retention.max_count,
            if retention.delete_unapproved {
                ", unapproved too"
            } else {
                ", approved only"
            }
        );
        publish(
            policy,
            ctx,
            Event {
                type_: EventType::Normal,
                reason: "RetentionDeleted".into(),
                note: Some(describe_deleted(&what, &deleted)),
                action: "Retain".into(),
                secondary: None,
            },
        )
        .await;
    }
    doomed.len() > pass.len()
}

/// How far each node's chain is verified, from the FileIntegrityNodes.
fn checkpoints(ctx: &Context) -> Verified {
    ctx.records
        .state()
        .iter()
        .map(|r| {
            let through = r
                .status
                .as_ref()
                .and_then(|s| s.verification.as_ref())
                .map(|v| v.verified_through);
            (r.name_any(), through)
        })
        .collect()
}

/// Deletes `names` in batches of `batch` (four requests in flight at most),
/// pausing `pause` between batches. Returns the names deleted (or already gone).
pub async fn delete(
    api: &Api<FileChange>,
    names: &[String],
    batch: usize,
    pause: Duration,
) -> Vec<String> {
    let mut deleted = Vec::new();
    for (i, chunk) in names.chunks(batch.max(1)).enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        let results: Vec<_> = futures::stream::iter(chunk.iter().cloned())
            .map(|name| {
                let api = api.clone();
                async move {
                    let result = api.delete(&name, &DeleteParams::background()).await;
                    (name, result)
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        for (name, result) in results {
            match result {
                Ok(_) => deleted.push(name),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    debug!(%name, "already gone");
                    deleted.push(name);
                }
                Err(error) => warn!(%name, %error, "could not delete a FileChange"),
            }
        }
    }
    deleted
}

/// An Event note naming deleted changes, within the Events API's 1 KiB.
pub fn describe_deleted(what: &str, names: &[String]) -> String {
    const MAX: usize = 1000;
    let mut note = format!("{what}: {} FileChange(s):", names.len());
    for (i, name) in names.iter().enumerate() {
        let rest = names.len() - i;
        let more = format!(" and {rest} more");
        if note.len() + 1 + name.len() + " and 99999 more".len() > MAX {
            note.push_str(&more);
            break;
        }
        note.push(' ');
        note.push_str(name);
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, node: &str, age_secs: u64, approved: bool, now: Timestamp) -> Item {
        Item {
            name: name.into(),
            policy: "p".into(),
            node: node.into(),
            created: now - Duration::from_secs(age_secs),
            approved,
            sequence: None,
            moves: Vec::new(),
            transition: None,
            parts: None,
            package_verified: false,
            entry: "etc".into(),
            host_path: None,
            compliance_labels: Default::default(),
        }
    }

    fn limits(max_age_secs: u64, max_count: usize, delete_unapproved: bool) -> Limits {
        Limits {
            max_age: Duration::from_secs(max_age_secs),
            max_count_per_node: max_count,
            delete_unapproved,
        }
    }

    fn kept_names(s: &Selection) -> Vec<&str> {
        s.kept.iter().map(|i| i.name.as_str()).collect()
    }

    #[test]
    fn deletes_approved_past_age_then_oldest_past_count() {
        let now = Timestamp::now();
        let items = vec![
            item("new", "a", 10, true, now),
            item("old", "a", 7200, true, now),
            item("mid", "a", 100, true, now),
            item("older-mid", "a", 200, true, now),
        ];
        let s = select_for_deletion(items, limits(3600, 2, false), &Verified::new(), now);
        assert_eq!(s.doomed, ["old", "older-mid"]);
        assert_eq!(kept_names(&s), ["mid", "new"]);
        assert_eq!(s.held, 0);
    }

    #[test]
    fn unapproved_changes_are_held_unless_the_policy_allows_deleting_them() {
        let now = Timestamp::now();
        let items = || {
            vec![
                item("old-unapproved", "a", 7200, false, now),
                item("old-approved", "a", 7000, true, now),
                item("new", "a", 10, false, now),
            ]
        };
        let s = select_for_deletion(items(), limits(3600, 1, false), &Verified::new(), now);
        assert_eq!(s.doomed, ["old-approved"]);
        assert_eq!(kept_names(&s), ["old-unapproved", "new"]);
        assert_eq!(s.held, 2);
        let s = select_for_deletion(items(), limits(3600, 1, true), &Verified::new(), now);
        assert_eq!(s.doomed, ["old-unapproved", "old-approved"]);
        assert_eq!(kept_names(&s), ["new"]);
    }

    #[test]
    fn one_node_flooding_cannot_push_out_another_nodes_changes() {
        let now = Timestamp::now();
        let mut items = vec![item("real", "b", 500, true, now)];
        for i in 0..100 {
            items.push(item(&format!("flood-{i:03}"), "a", 10, true, now));
        }
        let s = select_for_deletion(items, limits(3600, 5, true), &Verified::new(), now);
        assert_eq!(s.doomed.len(), 95);
        assert!(s.doomed.iter().all(|n| n.starts_with("flood-")));
        assert!(kept_names(&s).contains(&"real"));
    }

    #[test]
    fn only_verified_numbers_are_deleted() {
        let now = Timestamp::now();
        let numbered = |name: &str, node: &str, n: Option<u64>| Item {
            sequence: n,
            ..item(name, node, 7200, true, now)
        };
        let items = vec![
            numbered("a-4", "a", Some(4)),
            numbered("a-5", "a", Some(5)),
            numbered("a-summary", "a", None),
            numbered("b-1", "b", Some(1)),
            numbered("gone-9", "gone", Some(9)),
        ];
        let checkpoints = Verified::from([("a".to_string(), Some(5)), ("b".to_string(), None)]);
        let s = select_for_deletion(items, limits(3600, 100, true), &checkpoints, now);
        let mut doomed = s.doomed.clone();
        doomed.sort();
        assert_eq!(doomed, ["a-4", "a-summary", "gone-9"]);
        assert_eq!(s.held, 2, "a-5 above the checkpoint, b-1 before any");
    }

    #[test]
    fn deleted_names_fit_an_event() {
        let names: Vec<String> = (0..500).map(|i| format!("node-a-{i:020}")).collect();
        let note = describe_deleted("retention", &names);
        assert!(note.len() <= 1024, "{}", note.len());
        assert!(note.starts_with("retention: 500 FileChange(s): node-a-"));
        assert!(note.ends_with(" more"), "{note}");
        let few = describe_deleted("retention", &names[..2]);
        assert!(few.ends_with("node-a-00000000000000000001"), "{few}");
    }
}
