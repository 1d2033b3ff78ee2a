//! `kubectl fim rollouts` and `kubectl fim fleet`: what the operator found
//! across the fleet, read from the policies' status (a list of policies, not
//! of every FileChange), and `rollouts approve`, which approves the changes of
//! one rollout in the approver's own name.
//!
//! The approval does not trust the status for what it approves: it lists the
//! policy's FileChanges and recomputes each one's transition from its spec
//! (immutable, bound to its node by admission), so a forged or stale status
//! can at most make it find nothing.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kube_fim_crds::rollout::{Transition, short};
use kube_fim_crds::{Approval, FileChange, FileIntegrityPolicy, FleetOutlier, RolloutStatus};
use serde::Serialize;

use crate::display::{self, Align, Table};

/// One rollout as `kubectl fim rollouts` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub policy: String,
    #[serde(flatten)]
    pub rollout: RolloutStatus,
}

/// The rollouts the policies' status lists, the largest first.
pub fn rows(policies: &[FileIntegrityPolicy], only: Option<&str>) -> Vec<Row> {
    let mut rows: Vec<Row> = policies
        .iter()
        .filter(|p| only.is_none_or(|o| o == p.name_any()))
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.rollouts.iter())
                .map(|r| Row {
                    policy: p.name_any(),
                    rollout: r.clone(),
                })
        })
        .collect();
    rows.sort_by(|a, b| {
        b.rollout
            .nodes
            .cmp(&a.rollout.nodes)
            .then_with(|| (&a.policy, &a.rollout.id).cmp(&(&b.policy, &b.rollout.id)))
    });
    rows
}

/// The table of rollouts.
pub fn render(rows: &[Row], wide: bool) -> String {
    if rows.is_empty() {
        return "No rollouts (the same change on several nodes) within the operator's rollout window.\n".into();
    }
    let mut columns = vec![
        ("ID", Align::Left),
        ("POLICY", Align::Left),
        ("ENTRY", Align::Left),
        ("CATEGORY", Align::Left),
        ("PATH", Align::Left),
        ("BEFORE→AFTER", Align::Left),
        ("NODES", Align::Right),
        ("APPROVED", Align::Right),
        ("OUTLIERS", Align::Left),
    ];
    if wide {
        columns.push(("FIRST SEEN", Align::Left));
        columns.push(("LAST SEEN", Align::Left));
    }
    let mut table = Table::new(&columns);
    for r in rows {
        let o = &r.rollout;
        let mut outliers = if o.outliers.is_empty() {
            "-".to_string()
        } else {
            o.outliers.join(",")
        };
        let unnamed = (o.outlier_count as usize).saturating_sub(o.outliers.len());
        if unnamed > 0 {
            outliers.push_str(&format!(" (+{unnamed})"));
        }
        let mut cells = vec![
            o.id.clone(),
            r.policy.clone(),
            o.entry.clone(),
            o.category.clone(),
            o.path.clone(),
            format!("{}→{}", o.before, o.after),
            o.nodes.to_string(),
            o.approved.to_string(),
            outliers,
        ];
        if wide {
            cells.push(o.first_seen.0.to_string());
            cells.push(o.last_seen.0.to_string());
        }
        table.row(cells.iter().map(|c| display::escape(c).into_owned()));
    }
    table.render()
}

/// One outlier group as `kubectl fim fleet` shows it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FleetRow {
    pub policy: String,
    pub pool: String,
    pub entry: String,
    pub majority: i32,
    pub pool_nodes: i32,
    pub outliers: Vec<String>,
}

/// The fleet outliers of the policies' status, grouped by policy, pool and entry.
pub fn fleet_rows(policies: &[FileIntegrityPolicy]) -> Vec<FleetRow> {
    let mut groups: BTreeMap<(String, String, String), FleetRow> = BTreeMap::new();
    for p in policies {
        for o in p.status.iter().flat_map(|s| s.fleet_outliers.iter()) {
            let FleetOutlier {
                node,
                entry,
                pool,
                majority,
                pool_nodes,
            } = o;
            let row = groups
                .entry((p.name_any(), pool.clone(), entry.clone()))
                .or_insert_with(|| FleetRow {
                    policy: p.name_any(),
                    pool: pool.clone(),
                    entry: entry.clone(),
                    majority: *majority,
                    pool_nodes: *pool_nodes,
                    outliers: Vec::new(),
                });
            if !row.outliers.contains(node) {
                row.outliers.push(node.clone());
            }
        }
    }
    let mut rows: Vec<FleetRow> = groups.into_values().collect();
    for r in &mut rows {
        r.outliers.sort();
    }
    rows
}

/// The table of fleet outliers.
pub fn render_fleet(rows: &[FleetRow]) -> String {
    if rows.is_empty() {
        return "No node differs from the majority of its pool.\n".into();
    }
    let mut table = Table::new(&[
        ("POLICY", Align::Left),
        ("POOL", Align::Left),
        ("ENTRY", Align::Left),
        ("MAJORITY", Align::Right),
        ("OUTLIERS", Align::Left),
    ]);
    for r in rows {
        let cells = [
            r.policy.clone(),
            r.pool.clone(),
            r.entry.clone(),
            format!("{}/{}", r.majority, r.pool_nodes),
            r.outliers.join(","),
        ];
        table.row(cells.iter().map(|c| display::escape(c).into_owned()));
    }
    table.render()
}

/// What approving a rollout would do with each change of its policy.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Unapproved changes that are exactly the rollout's transition: name, node.
    pub approve: Vec<(String, String)>,
    /// Changes of it already approved: name, node, by whom.
    pub already: Vec<(String, String, String)>,
    /// Nodes that changed the same file differently (left alone).
    pub outliers: BTreeSet<String>,
    /// The transition, as computed from the changes.
    pub transition: Option<Transition>,
}

/// Sorts `changes` (of one policy) for the rollout `id`. Two different
/// transitions with the same id (a collision of its 64 bits, found or made)
/// are refused rather than approved together.
pub fn plan(id: &str, changes: &[FileChange]) -> anyhow::Result<Plan> {
    let mut plan = Plan::default();
    let mut members: Vec<(&FileChange, Transition)> = Vec::new();
    let mut others: Vec<(&FileChange, Transition)> = Vec::new();
    for c in changes {
        let Some(t) = Transition::of(&c.spec) else {
            continue;
        };
        if t.id() == id {
            members.push((c, t));
        } else {
            others.push((c, t));
        }
    }
    let distinct: BTreeSet<&Transition> = members.iter().map(|(_, t)| t).collect();
    if distinct.len() > 1 {
        bail!(
            "rollout {id}: {} different changes share this id; approve them by name (kubectl fim approve)",
            distinct.len()
        );
    }
    let Some(t) = distinct.into_iter().next().cloned() else {
        return Ok(plan);
    };
    let nodes: BTreeSet<&str> = members.iter().map(|(c, _)| c.spec.node.as_str()).collect();
    for (c, _) in &members {
        match c.approval() {
            Some(a) => {
                plan.already
                    .push((c.name_any(), c.spec.node.clone(), a.approved_by.clone()))
            }
            None => plan.approve.push((c.name_any(), c.spec.node.clone())),
        }
    }
    plan.outliers = others
        .iter()
        .filter(|(c, o)| {
            o.same_file(&t) && o.after != t.after && !nodes.contains(c.spec.node.as_str())
        })
        .map(|(c, _)| c.spec.node.clone())
        .collect();
    plan.transition = Some(t);
    Ok(plan)
}

/// Every FileChange of `policy` (paged, by the `spec.policy` field).
async fn changes_of(client: &Client, policy: &str) -> anyhow::Result<Vec<FileChange>> {
    let api: Api<FileChange> = Api::all(client.clone());
    let mut out = Vec::new();
    let mut params = ListParams::default()
        .fields(&format!("spec.policy={policy}"))
        .limit(500);
    loop {
        let page = api.list(&params).await.context("listing FileChanges")?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => params = params.continue_token(&t),
            _ => break,
        }
    }
    Ok(out)
}

/// `kubectl fim rollouts approve ID`: approves, in `approver`'s name, each
/// unapproved change that is exactly the rollout's transition, and none of
/// the outliers. Says how many were approved, skipped and why.
pub async fn approve(
    client: &Client,
    approver: String,
    id: &str,
    policy: Option<String>,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let esc = display::escape;
    let policy = match policy {
        Some(p) => p,
        None => {
            let policies = Api::<FileIntegrityPolicy>::all(client.clone())
                .list(&ListParams::default())
                .await
                .context("listing FileIntegrityPolicies")?;
            let found: BTreeSet<String> = rows(&policies.items, None)
                .into_iter()
                .filter(|r| r.rollout.id == id)
                .map(|r| r.policy)
                .collect();
            match found.len() {
                1 => found.into_iter().next().unwrap_or_default(),
                0 => bail!(
                    "rollout {} is listed by no policy (older than the operator's rollout window, or not among a policy's 20 largest): give --policy",
                    esc(id)
                ),
                _ => bail!(
                    "rollout {} is listed by several policies: give --policy",
                    esc(id)
                ),
            }
        }
    };
    let changes = changes_of(client, &policy).await?;
    let plan = plan(id, &changes)?;
    let Some(t) = &plan.transition else {
        bail!(
            "no FileChange of policy {} is rollout {}",
            esc(&policy),
            esc(id)
        );
    };
    println!(
        "rollout {} of policy {}: {} {} (entry {}) {}→{}",
        esc(id),
        esc(&policy),
        t.category.as_str(),
        esc(&t.path),
        esc(&t.entry),
        short(&t.before),
        short(&t.after)
    );
    let approval = Approval {
        approved_by: approver,
        approved_at: Time(Timestamp::now()),
        reason,
        paths: Vec::new(),
    };
    let patch = serde_json::json!({"status": {"approval": approval}});
    let api: Api<FileChange> = Api::all(client.clone());
    let mut approved = 0usize;
    let mut failed = Vec::new();
    for (name, node) in &plan.approve {
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                approved += 1;
                println!("filechange/{} approved ({})", esc(name), esc(node));
            }
            Err(kube::Error::Api(e)) => {
                failed.push(format!("filechange/{}: {}", esc(name), esc(&e.message)))
            }
            Err(e) => failed.push(format!("filechange/{}: {}", esc(name), esc(&e.to_string()))),
        }
    }
    for (name, node, by) in &plan.already {
        println!(
            "filechange/{} skipped ({}): already approved by {}",
            esc(name),
            esc(node),
            esc(by)
        );
    }
    for f in &failed {
        eprintln!("{f}");
    }
    let outliers: Vec<String> = plan.outliers.iter().map(|n| esc(n).into_owned()).collect();
    println!(
        "approved {approved}, skipped {} already approved, {} failed; not approved: outliers that changed the file differently: {}",
        plan.already.len(),
        failed.len(),
        if outliers.is_empty() {
            "none".to_string()
        } else {
            outliers.join(", ")
        }
    );
    if !failed.is_empty() {
        bail!(
            "{} of {} could not be approved",
            failed.len(),
            plan.approve.len()
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn change(name: &str, node: &str, path: &str, after: char, approved: bool) -> FileChange {
        let mut c: FileChange = serde_json::from_value(serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileChange",
            "metadata": {"name": name},
            "spec": {
                "node": node, "policy": "p", "entry": "etc", "path": path,
                "category": "Modified", "source": "Realtime",
                "detectedTime": "2026-12-01T10:00:00Z",
                "before": {"hash": "1".repeat(64), "inode": 7},
                "after": {"hash": after.to_string().repeat(64), "inode": name.len()},
            }
        }))
        .unwrap();
        if approved {
            c.status = serde_json::from_value(serde_json::json!({
                "approval": {"approvedBy": "alice", "approvedAt": "2026-12-01T11:00:00Z"}
            }))
            .unwrap();
        }
        c
    }

    #[test]
    fn approving_a_rollout_takes_its_exact_changes_and_leaves_the_outliers() {
        let changes = [
            change("a", "node-a", "/etc/app.conf", '2', false),
            change("bb", "node-b", "/etc/app.conf", '2', false),
            change("ccc", "node-c", "/etc/app.conf", '3', false),
            change("dddd", "node-d", "/etc/app.conf", '2', true),
            change("e", "node-e", "/etc/other", '2', false),
        ];
        let id = Transition::of(&changes[0].spec).unwrap().id();
        let plan = plan(&id, &changes).unwrap();
        assert_eq!(
            plan.approve,
            [
                ("a".to_string(), "node-a".to_string()),
                ("bb".to_string(), "node-b".to_string())
            ]
        );
        assert_eq!(plan.already.len(), 1);
        assert_eq!(plan.outliers, BTreeSet::from(["node-c".to_string()]));
        // An unknown id approves nothing.
        assert_eq!(
            super::plan("0000000000000000", &changes).unwrap(),
            Plan::default()
        );
    }

    #[test]
    fn rollouts_and_fleet_tables_escape_names_from_nodes() {
        let policy: FileIntegrityPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileIntegrityPolicy",
            "metadata": {"name": "p"},
            "spec": {"paths": [{"name": "etc", "path": "/etc"}]},
            "status": {
                "rollouts": [{
                    "id": "0123456789abcdef", "entry": "etc", "path": "/etc/\u{1b}]0;x\u{7}",
                    "category": "Modified", "before": "aaaaaaaaaaaa", "after": "bbbbbbbbbbbb",
                    "nodes": 2, "approved": 0, "firstSeen": "2026-12-01T10:00:00Z",
                    "lastSeen": "2026-12-01T10:01:00Z", "outliers": ["node-c"], "outlierCount": 3
                }],
                "fleetOutliers": [{"node": "d", "entry": "bin", "pool": "img", "majority": 3, "poolNodes": 4}]
            }
        }))
        .unwrap();
        let text = render(&rows(std::slice::from_ref(&policy), None), false);
        assert!(text.contains("0123456789abcdef"), "{text}");
        assert!(text.contains("node-c (+2)"), "{text}");
        assert!(text.contains("aaaaaaaaaaaa→bbbbbbbbbbbb"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text:?}");
        let fleet = fleet_rows(&[policy]);
        assert_eq!(fleet[0].outliers, ["d"]);
        let text = render_fleet(&fleet);
        assert!(text.contains("3/4"), "{text}");
    }
}
