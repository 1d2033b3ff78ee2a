//! `kubectl fim report`: the compliance document an auditor asks for. Per
//! node, when each policy last compared every file with the baseline (PCI DSS
//! 11.5.2 asks for at least weekly), the changes of the period and who approved
//! which, every alarm still open, and the times changes may have gone
//! unreported or came paced rather than one by one (evidence gaps, change
//! floods, change storms) — from what the cluster stores, nothing the node
//! merely says about itself beyond its published record.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube_fim_crds::{FileChange, FileIntegrityNode, FileIntegrityPolicy};
use kube_fim_formats::{AlarmRecord, alarm_records};
use serde::Serialize;

use crate::display::{self, Align};

/// A full comparison older than this fails the report's weekly check.
pub const FULL_COMPARISON_MAX_AGE: Duration = Duration::from_secs(7 * 86400);

/// Evidence gaps, floods and storms listed per node, each kind newest first;
/// older ones are counted, not listed (the record keeps at most 16 floods,
/// 16 storms and 64 gaps: this bounds what a forged one could make us print).
pub const LISTED_PER_NODE: usize = 16;

/// The whole document.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub generated: String,
    pub since: String,
    /// Start of the period (`generated` minus `since`).
    pub period_start: String,
    /// Every node compared all its files within the last 7 days, no alarm is
    /// open (an evidence gap included) and no change is left unapproved.
    pub passed: bool,
    pub summary: Summary,
    pub nodes: Vec<NodeReport>,
    pub approvals: Vec<ApprovalLine>,
    pub unapproved: Vec<ChangeLine>,
    pub alarms: Vec<Alarm>,
    /// Per compliance control the policies reference, its evidence.
    pub compliance: Vec<ControlReport>,
}

/// The report in numbers.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub nodes: u64,
    pub changes: u64,
    pub approved: u64,
    pub unapproved: u64,
    pub open_alarms: u64,
    /// Evidence gaps standing in the period, on every node (listed or not).
    pub evidence_gaps: u64,
    /// Change floods overlapping the period.
    pub change_floods: u64,
    /// Change storms overlapping the period.
    pub change_storms: u64,
}

/// One control of one framework: which policy entries are evidence for it
/// (from the policies, never from a change's labels or a node's word), and
/// the changes of the period under them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlReport {
    pub framework: String,
    pub control: String,
    /// `policy/entry` of every entry that references the control.
    pub entries: Vec<String>,
    pub changes: u64,
    pub approved: u64,
    pub unapproved: u64,
    /// The FileChanges that are its evidence (names), unapproved first.
    pub evidence: Vec<String>,
}

/// One node.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    pub agent_version: Option<String>,
    pub last_heartbeat: Option<String>,
    pub policies: Vec<PolicyComparison>,
    pub changes: u64,
    pub approved: u64,
    pub unapproved: u64,
    /// Each served policy compared every file within 7 days.
    pub weekly_comparison: bool,
    /// Evidence gaps standing in the period: changes the node numbered that
    /// the cluster never stored, or a baseline that moved unexplained.
    /// Newest first, at most [`LISTED_PER_NODE`].
    pub gaps: Vec<GapLine>,
    /// Floods of FileChanges from the node overlapping the period. Newest
    /// first, at most [`LISTED_PER_NODE`].
    pub floods: Vec<FloodLine>,
    /// Change storms of the node's entries overlapping the period (each
    /// change is still a FileChange of its own; they came paced). Newest
    /// first, at most [`LISTED_PER_NODE`].
    pub storms: Vec<StormLine>,
    /// Older gaps, floods and storms of the period beyond those listed.
    #[serde(skip_serializing_if = "is_zero")]
    pub not_listed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An evidence gap (`EvidenceGap`): it stands from `since` until its numbers
/// arrive or an admin clears it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GapLine {
    /// The alarm's id, as every evidence sink received it.
    pub id: String,
    /// When the operator first saw it.
    pub since: String,
    /// `Missing` or `Rewound` (transition numbers), `UnexplainedDigestMove`
    /// (an entry's digest).
    pub why: String,
    /// The first and last transition numbers missing, or the entry digest
    /// verified before and the one the node published instead.
    pub from: String,
    pub to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
}

/// A flood (`ChangeFlood`): the node created FileChanges faster than its
/// policies allow, from `since` to `last`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FloodLine {
    pub id: String,
    pub since: String,
    pub last: String,
    /// The most FileChanges created in one minute.
    pub count: u64,
    /// What the node's policies allowed in a minute.
    pub budget: u64,
}

/// A storm (`ChangeStorm`): more changes of one entry detected within a
/// minute than its policy's cap, from `since` to `last`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StormLine {
    pub id: String,
    pub policy: String,
    pub entry: String,
    pub since: String,
    pub last: String,
    /// The most changes of the entry detected within one minute.
    pub count: u64,
    pub cap: u64,
}

/// When one policy last compared every file of one node.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyComparison {
    pub policy: String,
    pub phase: String,
    pub last_full_comparison: Option<String>,
    pub files: Option<i64>,
    pub within_7d: bool,
}

/// One approval given in the period.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalLine {
    pub change: String,
    pub node: String,
    pub path: String,
    pub category: String,
    pub approved_by: String,
    pub approved_at: String,
    pub reason: Option<String>,
    pub outcome: Option<String>,
}

/// One change nobody approved yet.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeLine {
    pub change: String,
    pub node: String,
    pub path: String,
    pub category: String,
    pub detected: String,
}

/// An alarm still open: a node's baseline alarm, a degraded policy.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alarm {
    /// `node/<name>` or `policy/<name>`.
    pub subject: String,
    pub reason: String,
    pub since: Option<String>,
    pub message: String,
}

/// Builds the report from what the cluster stores. `changes` are those
/// detected since `now - period` (`since` is how the period was asked for).
pub fn build(
    since: &str,
    period: Duration,
    now: Timestamp,
    policies: &[FileIntegrityPolicy],
    records: &[FileIntegrityNode],
    changes: &[FileChange],
) -> Report {
    let max_age =
        k8s_openapi::jiff::SignedDuration::from_secs(FULL_COMPARISON_MAX_AGE.as_secs() as i64);
    let start = now
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(
            i64::try_from(period.as_secs()).unwrap_or(i64::MAX),
        ))
        .unwrap_or(Timestamp::MIN);
    let mut summary = Summary::default();
    let mut per_node: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut approvals = Vec::new();
    let mut unapproved = Vec::new();
    for c in changes {
        let counts = per_node.entry(c.spec.node.clone()).or_default();
        counts.0 += 1;
        match c.approval() {
            Some(a) => {
                counts.1 += 1;
                approvals.push(ApprovalLine {
                    change: c.name_any(),
                    node: c.spec.node.clone(),
                    path: c.spec.path.clone(),
                    category: c.spec.category.as_str().to_string(),
                    approved_by: a.approved_by.clone(),
                    approved_at: a.approved_at.0.to_string(),
                    reason: a.reason.clone(),
                    outcome: c
                        .status
                        .as_ref()
                        .and_then(|s| s.outcome)
                        .map(|o| format!("{o:?}")),
                });
            }
            None => unapproved.push(ChangeLine {
                change: c.name_any(),
                node: c.spec.node.clone(),
                path: c.spec.path.clone(),
                category: c.spec.category.as_str().to_string(),
                detected: c.spec.detected_time.0.to_string(),
            }),
        }
    }
    let mut alarms = Vec::new();
    let mut nodes = Vec::new();
    for r in records {
        let name = r.spec.node.clone();
        let status = r.status.clone().unwrap_or_default();
        let comparisons: Vec<PolicyComparison> = status
            .policies
            .iter()
            .map(|p| {
                let last = p.last_scan_time.as_ref().map(|t| t.0);
                PolicyComparison {
                    policy: p.policy.clone(),
                    phase: format!("{:?}", p.phase),
                    last_full_comparison: last.map(|t| t.to_string()),
                    files: p.files_monitored,
                    within_7d: last.is_some_and(|t| now - max_age <= t),
                }
            })
            .collect();
        let mut gaps = Vec::new();
        let mut floods = Vec::new();
        let mut storms = Vec::new();
        // The node's standing conditions as the evidence sinks receive them
        // (same records, same ids).
        for (alarm, record) in alarm_records(r) {
            match record {
                AlarmRecord::Baseline(_) => alarms.push(Alarm {
                    subject: format!("node/{name}"),
                    reason: alarm.reason,
                    since: Some(alarm.since.to_string()),
                    message: alarm.message,
                }),
                // A gap stands until its numbers arrive or an admin clears
                // it: every recorded one is open now, so in the period.
                AlarmRecord::Gap(g) => gaps.push(Dated::new(
                    g.since.0,
                    now,
                    GapLine {
                        id: alarm.id,
                        since: g.since.0.to_string(),
                        why: g.reason.clone(),
                        from: g.first.to_string(),
                        to: g.last.to_string(),
                        policy: None,
                        entry: None,
                    },
                )),
                AlarmRecord::DigestMove(m) => gaps.push(Dated::new(
                    m.since.0,
                    now,
                    GapLine {
                        id: alarm.id,
                        since: m.since.0.to_string(),
                        why: "UnexplainedDigestMove".into(),
                        from: m.from.clone(),
                        to: m.to.clone(),
                        policy: Some(m.policy.clone()),
                        entry: Some(m.entry.clone()),
                    },
                )),
                // Floods and storms are over at `last` (one still going on
                // is extended): the period's are those ending after it
                // began. Nothing is compared with `now`: a storm's times
                // are the node's clock, and one dated ahead is still shown.
                AlarmRecord::Flood(f) if f.last.0 >= start => floods.push(Dated::new(
                    f.since.0,
                    f.last.0,
                    FloodLine {
                        id: alarm.id,
                        since: f.since.0.to_string(),
                        last: f.last.0.to_string(),
                        count: f.count,
                        budget: f.budget,
                    },
                )),
                AlarmRecord::Storm(s) if s.last.0 >= start => storms.push(Dated::new(
                    s.since.0,
                    s.last.0,
                    StormLine {
                        id: alarm.id,
                        policy: s.policy.clone(),
                        entry: s.entry.clone(),
                        since: s.since.0.to_string(),
                        last: s.last.0.to_string(),
                        count: s.count,
                        cap: s.cap,
                    },
                )),
                AlarmRecord::Flood(_) | AlarmRecord::Storm(_) => {}
            }
        }
        summary.evidence_gaps += gaps.len() as u64;
        summary.change_floods += floods.len() as u64;
        summary.change_storms += storms.len() as u64;
        let mut not_listed = 0;
        let gaps = newest_first(gaps, &mut not_listed);
        let floods = newest_first(floods, &mut not_listed);
        let storms = newest_first(storms, &mut not_listed);
        let (changes, approved) = per_node.remove(&name).unwrap_or_default();
        nodes.push(NodeReport {
            agent_version: status.agent_version.clone(),
            last_heartbeat: status.heartbeat_time.as_ref().map(|t| t.0.to_string()),
            // A node serving nothing compares nothing: it passes no weekly check.
            weekly_comparison: !comparisons.is_empty()
                && comparisons
                    .iter()
                    .filter(|c| c.phase != "Unselected")
                    .all(|c| c.within_7d),
            policies: comparisons,
            changes,
            approved,
            unapproved: changes - approved,
            node: name,
            gaps,
            floods,
            storms,
            not_listed,
        });
    }
    // Changes of nodes without a record (deleted since) still count.
    for (node, (changes, approved)) in per_node {
        nodes.push(NodeReport {
            node,
            agent_version: None,
            last_heartbeat: None,
            policies: Vec::new(),
            changes,
            approved,
            unapproved: changes - approved,
            weekly_comparison: false,
            gaps: Vec::new(),
            floods: Vec::new(),
            storms: Vec::new(),
            not_listed: 0,
        });
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    for p in policies {
        let degraded = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"));
        if let Some(c) = degraded.filter(|c| c.status == "True") {
            alarms.push(Alarm {
                subject: format!("policy/{}", p.name_any()),
                reason: c.reason.clone(),
                since: Some(c.last_transition_time.0.to_string()),
                message: c.message.clone(),
            });
        }
    }
    let compliance = controls(policies, changes);
    summary.nodes = nodes.len() as u64;
    summary.changes = nodes.iter().map(|n| n.changes).sum();
    summary.approved = nodes.iter().map(|n| n.approved).sum();
    summary.unapproved = nodes.iter().map(|n| n.unapproved).sum();
    summary.open_alarms = alarms.len() as u64;
    Report {
        compliance,
        generated: now.to_string(),
        since: since.to_string(),
        period_start: start.to_string(),
        // An evidence gap is an open alarm (its policies are Degraded too,
        // while they exist); floods and storms are history, not alarms.
        passed: !nodes.is_empty()
            && nodes.iter().all(|n| n.weekly_comparison)
            && alarms.is_empty()
            && summary.evidence_gaps == 0
            && unapproved.is_empty(),
        summary,
        nodes,
        approvals,
        unapproved,
        alarms,
    }
}

/// A row with the interval it covers, for ordering.
struct Dated<T> {
    since: Timestamp,
    until: Timestamp,
    row: T,
}

impl<T> Dated<T> {
    fn new(since: Timestamp, until: Timestamp, row: T) -> Dated<T> {
        Dated { since, until, row }
    }
}

/// The rows newest first (latest start, then latest end), the newest
/// [`LISTED_PER_NODE`] of them; the others counted in `not_listed`.
fn newest_first<T>(mut rows: Vec<Dated<T>>, not_listed: &mut u64) -> Vec<T> {
    rows.sort_by(|a, b| b.since.cmp(&a.since).then(b.until.cmp(&a.until)));
    *not_listed += rows.len().saturating_sub(LISTED_PER_NODE) as u64;
    rows.into_iter()
        .take(LISTED_PER_NODE)
        .map(|d| d.row)
        .collect()
}

/// Per control the policies reference, its entries and the changes under
/// them (each change's references as the operator finds them: from its
/// policy and the entries covering its path, never from its labels).
fn controls(policies: &[FileIntegrityPolicy], changes: &[FileChange]) -> Vec<ControlReport> {
    let mut out: BTreeMap<(String, String), ControlReport> = BTreeMap::new();
    let mut maps = BTreeMap::new();
    for p in policies {
        let policy = p.name_any();
        for e in p.spec.effective_paths() {
            for r in p.spec.compliance_of(&e.name) {
                out.entry((r.framework.clone(), r.control.clone()))
                    .or_insert_with(|| ControlReport {
                        framework: r.framework.clone(),
                        control: r.control.clone(),
                        entries: Vec::new(),
                        changes: 0,
                        approved: 0,
                        unapproved: 0,
                        evidence: Vec::new(),
                    })
                    .entries
                    .push(format!("{policy}/{}", e.name));
            }
        }
        maps.insert(policy, p.spec.compliance_map());
    }
    let mut approved_evidence: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for c in changes {
        let Some(map) = maps.get(&c.spec.policy) else {
            continue;
        };
        let host_path = c.spec.container.is_none().then_some(c.spec.path.as_str());
        for r in map.of_change(&c.spec.entry, host_path) {
            let key = (r.framework, r.control);
            let Some(control) = out.get_mut(&key) else {
                continue;
            };
            control.changes += 1;
            if c.approval().is_some() {
                control.approved += 1;
                approved_evidence.entry(key).or_default().push(c.name_any());
            } else {
                control.unapproved += 1;
                control.evidence.push(c.name_any());
            }
        }
    }
    for (key, names) in approved_evidence {
        if let Some(control) = out.get_mut(&key) {
            control.evidence.extend(names);
        }
    }
    out.into_values().collect()
}

/// The report as text, for people (every value from the cluster escaped).
pub fn render(report: &Report) -> String {
    use Align::{Left, Right};
    let e = |s: &str| display::escape(s).into_owned();
    let mut out = format!(
        "kube-fim compliance report, generated {}, changes of the last {}\nResult: {}\n",
        report.generated,
        e(&report.since),
        if report.passed {
            "PASSED (every node compared all files within 7 days; no open alarm; every change approved)"
        } else {
            "NOT PASSED (see below)"
        }
    );
    let sum = &report.summary;
    out.push_str(&format!(
        "Period from {}: nodes {}, changes {} (unapproved {}), open alarms {}; evidence gaps {}, change floods {}, change storms {}\n",
        report.period_start,
        sum.nodes,
        sum.changes,
        sum.unapproved,
        sum.open_alarms,
        sum.evidence_gaps,
        sum.change_floods,
        sum.change_storms,
    ));
    out.push_str("\nFull comparison with the baseline (PCI DSS 11.5.2: at least weekly)\n");
    let mut t = display::Table::new(&[
        ("NODE", Left),
        ("POLICY", Left),
        ("PHASE", Left),
        ("LAST FULL COMPARISON", Left),
        ("FILES", Right),
        ("WITHIN 7D", Left),
    ]);
    for n in &report.nodes {
        if n.policies.is_empty() {
            t.row([
                e(&n.node),
                "-".into(),
                "-".into(),
                "never".into(),
                "-".into(),
                "no".into(),
            ]);
        }
        for p in &n.policies {
            t.row([
                e(&n.node),
                e(&p.policy),
                p.phase.clone(),
                p.last_full_comparison
                    .clone()
                    .unwrap_or_else(|| "never".into()),
                p.files.map_or("-".into(), |f| f.to_string()),
                if p.within_7d { "yes" } else { "no" }.into(),
            ]);
        }
    }
    out.push_str(&t.render());
    out.push_str("\nChanges per node\n");
    let mut t = display::Table::new(&[
        ("NODE", Left),
        ("CHANGES", Right),
        ("APPROVED", Right),
        ("UNAPPROVED", Right),
        ("LAST HEARTBEAT", Left),
    ]);
    for n in &report.nodes {
        t.row([
            e(&n.node),
            n.changes.to_string(),
            n.approved.to_string(),
            n.unapproved.to_string(),
            n.last_heartbeat.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&t.render());
    render_interruptions(report, &mut out);
    out.push_str(&format!("\nApprovals ({})\n", report.approvals.len()));
    if !report.approvals.is_empty() {
        let mut t = display::Table::new(&[
            ("CHANGE", Left),
            ("NODE", Left),
            ("PATH", Left),
            ("BY", Left),
            ("AT", Left),
            ("OUTCOME", Left),
            ("REASON", Left),
        ]);
        for a in &report.approvals {
            t.row([
                e(&a.change),
                e(&a.node),
                e(&a.path),
                e(&a.approved_by),
                a.approved_at.clone(),
                a.outcome.clone().unwrap_or_else(|| "pending".into()),
                e(a.reason.as_deref().unwrap_or("-")),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!(
        "\nUnapproved changes ({})\n",
        report.unapproved.len()
    ));
    if !report.unapproved.is_empty() {
        let mut t = display::Table::new(&[
            ("CHANGE", Left),
            ("NODE", Left),
            ("CATEGORY", Left),
            ("PATH", Left),
            ("DETECTED", Left),
        ]);
        for c in &report.unapproved {
            t.row([
                e(&c.change),
                e(&c.node),
                c.category.clone(),
                e(&c.path),
                c.detected.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!(
        "\nCompliance controls ({})\n",
        report.compliance.len()
    ));
    if !report.compliance.is_empty() {
        let mut t = display::Table::new(&[
            ("FRAMEWORK", Left),
            ("CONTROL", Left),
            ("ENTRIES", Right),
            ("CHANGES", Right),
            ("APPROVED", Right),
            ("UNAPPROVED", Right),
            ("EVIDENCE", Left),
        ]);
        for c in &report.compliance {
            let mut evidence: Vec<String> = c.evidence.iter().take(5).map(|n| e(n)).collect();
            if c.evidence.len() > 5 {
                evidence.push(format!("+{} more (-o json)", c.evidence.len() - 5));
            }
            t.row([
                e(&c.framework),
                e(&c.control),
                c.entries.len().to_string(),
                c.changes.to_string(),
                c.approved.to_string(),
                c.unapproved.to_string(),
                if evidence.is_empty() {
                    "-".into()
                } else {
                    evidence.join(" ")
                },
            ]);
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!("\nOpen alarms ({})\n", report.alarms.len()));
    for a in &report.alarms {
        out.push_str(&format!(
            "  {} {} since {}: {}\n",
            e(&a.subject),
            e(&a.reason),
            a.since.as_deref().unwrap_or("-"),
            e(&a.message)
        ));
    }
    out
}

/// Per node, when changes may have gone unreported (evidence gaps) or came
/// faster than reported one by one (floods, storms).
fn render_interruptions(report: &Report, out: &mut String) {
    use Align::{Left, Right};
    let sum = &report.summary;
    out.push_str(
        "\nWhen changes may have gone unreported or came paced (PCI DSS 11.5.2), newest first per node\n",
    );
    out.push_str(&format!("\nEvidence gaps ({})\n", sum.evidence_gaps));
    if sum.evidence_gaps > 0 {
        let mut t = display::Table::new(&[
            ("NODE", Left),
            ("SINCE", Left),
            ("WHY", Left),
            ("FROM", Left),
            ("TO", Left),
            ("ENTRY", Left),
        ]);
        for n in &report.nodes {
            for g in &n.gaps {
                let entry = match (&g.policy, &g.entry) {
                    (Some(p), Some(e)) => format!("{p}/{e}"),
                    _ => "-".into(),
                };
                t.row([
                    n.node.as_str(),
                    &g.since,
                    &g.why,
                    &short(&g.from),
                    &short(&g.to),
                    &entry,
                ]);
            }
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!("\nChange floods ({})\n", sum.change_floods));
    if sum.change_floods > 0 {
        let mut t = display::Table::new(&[
            ("NODE", Left),
            ("SINCE", Left),
            ("LAST", Left),
            ("MOST IN A MINUTE", Right),
            ("ALLOWED", Right),
        ]);
        for n in &report.nodes {
            for f in &n.floods {
                t.row([
                    n.node.as_str(),
                    &f.since,
                    &f.last,
                    &f.count.to_string(),
                    &f.budget.to_string(),
                ]);
            }
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!("\nChange storms ({})\n", sum.change_storms));
    if sum.change_storms > 0 {
        let mut t = display::Table::new(&[
            ("NODE", Left),
            ("POLICY", Left),
            ("ENTRY", Left),
            ("SINCE", Left),
            ("LAST", Left),
            ("MOST IN A MINUTE", Right),
            ("CAP", Right),
        ]);
        for n in &report.nodes {
            for s in &n.storms {
                t.row([
                    n.node.as_str(),
                    &s.policy,
                    &s.entry,
                    &s.since,
                    &s.last,
                    &s.count.to_string(),
                    &s.cap.to_string(),
                ]);
            }
        }
        out.push_str(&t.render());
    }
    for n in report.nodes.iter().filter(|n| n.not_listed > 0) {
        out.push_str(&format!(
            "{} older on node {} not listed (kubectl get fin {} -o yaml)\n",
            n.not_listed,
            display::escape(&n.node),
            display::escape(&n.node)
        ));
    }
}

/// A digest cut for a table (`-o json` has it whole); numbers as they are.
fn short(s: &str) -> String {
    const KEEP: usize = 16;
    if s.chars().count() <= KEEP + 1 {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(KEEP).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn record(node: &str, last_scan: &str, alarm: bool) -> FileIntegrityNode {
        let mut v = serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileIntegrityNode",
            "metadata": {"name": node},
            "spec": {"node": node},
            "status": {
                "agentVersion": "0.1.0",
                "heartbeatTime": "2026-12-07T10:00:00Z",
                "policies": [{"policy": "baseline", "phase": "Ready", "filesMonitored": 12,
                              "lastScanTime": last_scan}]
            }
        });
        if alarm {
            v["status"]["baselineAlarm"] = serde_json::json!({
                "id": "a1", "reason": "BaselineTampered", "since": "2026-12-06T09:00:00Z",
                "message": "entry etc differs"
            });
        }
        serde_json::from_value(v).unwrap()
    }

    fn change(name: &str, node: &str, approved_by: Option<&str>) -> FileChange {
        let mut v = serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileChange",
            "metadata": {"name": name},
            "spec": {
                "node": node, "policy": "baseline", "entry": "etc", "path": "/etc/passwd",
                "category": "Modified", "source": "Realtime",
                "detectedTime": "2026-12-06T10:00:00Z"
            }
        });
        if let Some(by) = approved_by {
            v["status"] = serde_json::json!({
                "approval": {"approvedBy": by, "approvedAt": "2026-12-06T11:00:00Z",
                             "reason": "CHG-42"},
                "outcome": "Applied"
            });
        }
        serde_json::from_value(v).unwrap()
    }

    const WEEK: Duration = Duration::from_secs(7 * 86400);

    fn now() -> Timestamp {
        "2026-12-07T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn each_control_lists_its_evidence_from_the_policy_not_from_labels() {
        let policy: FileIntegrityPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileIntegrityPolicy",
            "metadata": {"name": "baseline"},
            "spec": {
                "preset": "recommended",
                "paths": [
                    {"name": "etc", "path": "/etc/passwd",
                     "compliance": [{"framework": "pci-dss-4.0", "control": "10.3.4"}]},
                    {"name": "app", "path": "/srv/app"}
                ]
            }
        }))
        .unwrap();
        let mut in_app = change("a-3-w", "a", None);
        in_app.spec.entry = "app".into();
        in_app.spec.path = "/srv/app/x".into();
        // Labels claiming a control are not what files a change under it.
        in_app.metadata.labels = Some(
            [(
                "compliance.kube-fim.io/pci-dss-4.0".to_string(),
                "11.5.2".to_string(),
            )]
            .into(),
        );
        // Filed by the node under `app`, but /usr/bin is the preset's
        // usr-bin: evidence for its controls all the same.
        let mut in_bin = change("a-4-v", "a", None);
        in_bin.spec.entry = "app".into();
        in_bin.spec.path = "/usr/bin/sudo".into();
        let changes = [
            change("a-1-x", "a", Some("alice@example.com")),
            change("a-2-y", "a", None),
            in_app,
            in_bin,
        ];
        let r = build("7d", WEEK, now(), &[policy], &[], &changes);
        let control = |f: &str, c: &str| {
            r.compliance
                .iter()
                .find(|x| x.framework == f && x.control == c)
                .unwrap()
        };
        let pci_fim = control("pci-dss-4.0", "11.5.2");
        assert_eq!(pci_fim.evidence, ["a-4-v"]);
        assert_eq!(pci_fim.entries.len(), 18, "the preset's entries");
        let pci_logs = control("pci-dss-4.0", "10.3.4");
        assert_eq!(pci_logs.entries, ["baseline/etc"]);
        assert_eq!(
            (pci_logs.changes, pci_logs.approved, pci_logs.unapproved),
            (2, 1, 1)
        );
        assert_eq!(pci_logs.evidence, ["a-2-y", "a-1-x"], "unapproved first");
        let cis = control("cis-dil-2.0", "1.3.2");
        assert_eq!(cis.evidence, ["a-4-v"]);
        assert_eq!(cis.entries.len(), 18);
        let text = render(&r);
        assert!(text.contains("Compliance controls (4)"), "{text}");
        let line = text.lines().find(|l| l.contains("10.3.4")).unwrap();
        assert!(line.contains("a-2-y a-1-x"), "{line}");
    }

    #[test]
    fn a_node_not_compared_within_a_week_fails_the_report() {
        let records = [
            record("fresh", "2026-12-07T06:00:00Z", false),
            record("stale", "2026-11-29T06:00:00Z", false),
        ];
        let r = build("7d", WEEK, now(), &[], &records, &[]);
        assert!(!r.passed);
        let stale = r.nodes.iter().find(|n| n.node == "stale").unwrap();
        assert!(!stale.weekly_comparison);
        assert!(
            r.nodes
                .iter()
                .find(|n| n.node == "fresh")
                .unwrap()
                .weekly_comparison
        );
        let text = render(&r);
        assert!(text.contains("NOT PASSED"), "{text}");
        let line = text.lines().find(|l| l.starts_with("stale")).unwrap();
        assert!(line.ends_with("no"), "{line}");
    }

    #[test]
    fn approvals_unapproved_changes_and_alarms_are_listed() {
        let records = [record("a", "2026-12-07T06:00:00Z", true)];
        let changes = [
            change("a-1-x", "a", Some("alice@example.com")),
            change("a-2-y", "a", None),
            change("gone-1-z", "gone", None),
        ];
        let r = build("7d", WEEK, now(), &[], &records, &changes);
        assert!(!r.passed);
        assert_eq!(r.approvals.len(), 1);
        assert_eq!(r.approvals[0].approved_by, "alice@example.com");
        assert_eq!(r.approvals[0].outcome.as_deref(), Some("Applied"));
        assert_eq!(r.unapproved.len(), 2);
        assert_eq!(r.alarms.len(), 1);
        assert_eq!(r.alarms[0].subject, "node/a");
        let a = r.nodes.iter().find(|n| n.node == "a").unwrap();
        assert_eq!((a.changes, a.approved, a.unapproved), (2, 1, 1));
        // A node deleted since still has its changes counted.
        assert!(r.nodes.iter().any(|n| n.node == "gone" && n.changes == 1));
        let text = render(&r);
        assert!(text.contains("alice@example.com"), "{text}");
        assert!(text.contains("node/a BaselineTampered since"), "{text}");
    }

    #[test]
    fn all_compared_nothing_open_passes() {
        let records = [record("a", "2026-12-07T06:00:00Z", false)];
        let changes = [change("a-1-x", "a", Some("alice"))];
        let r = build("7d", WEEK, now(), &[], &records, &changes);
        assert!(r.passed, "{r:?}");
        assert!(render(&r).contains("Result: PASSED"));
    }

    /// A record of node `node`, heartbeating and compared today, with the
    /// given storms, floods and evidence gaps (`status` fields as JSON).
    fn record_with(
        node: &str,
        storms: serde_json::Value,
        floods: serde_json::Value,
        gaps: serde_json::Value,
        unexplained: serde_json::Value,
    ) -> FileIntegrityNode {
        let mut r = record(node, "2026-12-07T06:00:00Z", false);
        let mut v = serde_json::to_value(&r).unwrap();
        v["status"]["storms"] = storms;
        v["status"]["floods"] = floods;
        v["status"]["verification"] = serde_json::json!({
            "verifiedThrough": 40, "since": "2026-12-01T00:00:00Z",
            "gaps": gaps, "unexplained": unexplained
        });
        r = serde_json::from_value(v).unwrap();
        r
    }

    fn storm(policy: &str, entry: &str, since: &str, last: &str, count: u64) -> serde_json::Value {
        serde_json::json!({"policy": policy, "entry": entry, "since": since, "last": last,
                           "count": count, "cap": 5})
    }

    fn flood(since: &str, last: &str, count: u64) -> serde_json::Value {
        serde_json::json!({"since": since, "last": last, "count": count, "budget": 600})
    }

    #[test]
    fn gaps_floods_and_storms_of_the_period_are_listed_per_node_newest_first() {
        let records = [
            record_with(
                "a",
                serde_json::json!([
                    // Over before the day's period began: not listed.
                    storm(
                        "p",
                        "etc",
                        "2026-12-06T08:00:00Z",
                        "2026-12-06T08:01:00Z",
                        90
                    ),
                    // Began before the period, went on into it: listed.
                    storm(
                        "p",
                        "bin",
                        "2026-12-06T11:59:00Z",
                        "2026-12-06T12:03:00Z",
                        7
                    ),
                    storm(
                        "p",
                        "etc",
                        "2026-12-07T09:00:00Z",
                        "2026-12-07T09:02:00Z",
                        12
                    ),
                ]),
                serde_json::json!([
                    flood("2026-12-05T01:00:00Z", "2026-12-05T01:10:00Z", 5000),
                    flood("2026-12-07T10:00:00Z", "2026-12-07T10:05:00Z", 2400),
                ]),
                serde_json::json!([
                    {"first": 5, "last": 7, "reason": "Missing", "since": "2026-12-02T00:00:00Z"},
                    {"first": 30, "last": 30, "reason": "Rewound", "since": "2026-12-07T11:00:00Z"},
                ]),
                serde_json::json!([
                    {"policy": "p", "entry": "etc", "from": format!("v2-{}", "a".repeat(61)),
                     "to": format!("v2-{}", "b".repeat(61)), "since": "2026-12-04T00:00:00Z"}
                ]),
            ),
            record_with(
                "b",
                serde_json::json!([storm(
                    "q",
                    "usr-bin",
                    "2026-12-07T11:00:00Z",
                    "2026-12-07T11:00:30Z",
                    6
                )]),
                serde_json::json!([]),
                serde_json::json!([]),
                serde_json::json!([]),
            ),
        ];
        let r = build("1d", Duration::from_secs(86400), now(), &[], &records, &[]);
        assert_eq!(r.period_start, "2026-12-06T12:00:00Z");
        let a = r.nodes.iter().find(|n| n.node == "a").unwrap();
        let since = |v: Vec<&str>| v.into_iter().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            a.storms
                .iter()
                .map(|s| s.since.as_str())
                .collect::<Vec<_>>(),
            ["2026-12-07T09:00:00Z", "2026-12-06T11:59:00Z"],
            "newest first, the one over before the period left out"
        );
        assert_eq!(
            (
                a.storms[0].entry.as_str(),
                a.storms[0].count,
                a.storms[0].cap
            ),
            ("etc", 12, 5)
        );
        // The id every evidence sink received for it.
        let start = "2026-12-07T09:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_second();
        assert_eq!(a.storms[0].id, format!("a/storm/p/etc/{start}"));
        assert_eq!(
            a.floods.iter().map(|f| f.since.clone()).collect::<Vec<_>>(),
            since(vec!["2026-12-07T10:00:00Z"])
        );
        // Gaps stand until closed: every one recorded is open in the period.
        assert_eq!(
            a.gaps
                .iter()
                .map(|g| (g.why.as_str(), g.from.as_str(), g.to.as_str()))
                .collect::<Vec<_>>(),
            [
                ("Rewound", "30", "30"),
                (
                    "UnexplainedDigestMove",
                    &*format!("v2-{}", "a".repeat(61)),
                    &*format!("v2-{}", "b".repeat(61))
                ),
                ("Missing", "5", "7"),
            ]
        );
        assert_eq!(a.gaps[1].entry.as_deref(), Some("etc"));
        assert_eq!(a.gaps[2].id, "a/gap/5-7/Missing");
        assert_eq!(
            (
                r.summary.evidence_gaps,
                r.summary.change_floods,
                r.summary.change_storms
            ),
            (3, 1, 3)
        );
        // An evidence gap is an open alarm: the report does not pass.
        assert!(!r.passed);

        let text = render(&r);
        assert!(
            text.contains("evidence gaps 3, change floods 1, change storms 3"),
            "{text}"
        );
        let section = |title: &str| -> Vec<Vec<String>> {
            text.split(&format!("\n{title}"))
                .nth(1)
                .unwrap_or_else(|| panic!("{title} in\n{text}"))
                .split("\n\n")
                .next()
                .unwrap()
                .lines()
                .skip(2)
                .map(|l| l.split_whitespace().map(String::from).collect())
                .collect()
        };
        let storms = section("Change storms (3)");
        assert_eq!(
            storms,
            [
                [
                    "a",
                    "p",
                    "etc",
                    "2026-12-07T09:00:00Z",
                    "2026-12-07T09:02:00Z",
                    "12",
                    "5"
                ],
                [
                    "a",
                    "p",
                    "bin",
                    "2026-12-06T11:59:00Z",
                    "2026-12-06T12:03:00Z",
                    "7",
                    "5"
                ],
                [
                    "b",
                    "q",
                    "usr-bin",
                    "2026-12-07T11:00:00Z",
                    "2026-12-07T11:00:30Z",
                    "6",
                    "5"
                ],
            ],
            "{text}"
        );
        let floods = section("Change floods (1)");
        assert_eq!(
            floods,
            [[
                "a",
                "2026-12-07T10:00:00Z",
                "2026-12-07T10:05:00Z",
                "2400",
                "600"
            ]]
        );
        let gaps = section("Evidence gaps (3)");
        assert_eq!(
            gaps[0],
            ["a", "2026-12-07T11:00:00Z", "Rewound", "30", "30", "-"]
        );
        assert_eq!(
            gaps[1],
            [
                "a",
                "2026-12-04T00:00:00Z",
                "UnexplainedDigestMove",
                "v2-aaaaaaaaaaaaa…",
                "v2-bbbbbbbbbbbbb…",
                "p/etc"
            ]
        );
        assert_eq!(gaps[2][2..5], ["Missing", "5", "7"]);

        // A week's report also lists the flood and the storm of two days ago.
        let week = build("7d", WEEK, now(), &[], &records, &[]);
        assert_eq!(
            (week.summary.change_floods, week.summary.change_storms),
            (2, 4)
        );
    }

    #[test]
    fn storms_and_floods_alone_do_not_fail_the_report_and_no_record_means_none() {
        let records = [record_with(
            "a",
            serde_json::json!([storm(
                "p",
                "etc",
                "2026-12-07T09:00:00Z",
                "2026-12-07T09:02:00Z",
                12
            )]),
            serde_json::json!([flood("2026-12-07T10:00:00Z", "2026-12-07T10:05:00Z", 2400)]),
            serde_json::json!([]),
            serde_json::json!([]),
        )];
        let r = build("7d", WEEK, now(), &[], &records, &[]);
        assert!(r.passed, "paced, every change its own FileChange: {r:?}");
        let quiet = build(
            "7d",
            WEEK,
            now(),
            &[],
            &[record("q", "2026-12-07T06:00:00Z", false)],
            &[],
        );
        let text = render(&quiet);
        for title in [
            "Evidence gaps (0)",
            "Change floods (0)",
            "Change storms (0)",
        ] {
            let after = text
                .split(title)
                .nth(1)
                .unwrap_or_else(|| panic!("{title}: {text}"));
            assert!(
                after.starts_with("\n\n"),
                "no empty table under {title}: {text}"
            );
        }
    }

    #[test]
    fn a_node_lists_its_newest_storms_and_counts_the_older() {
        let storms: Vec<serde_json::Value> = (0..LISTED_PER_NODE + 4)
            .map(|i| {
                let at = format!("2026-12-07T08:{i:02}:00Z");
                storm("p", &format!("e{i}"), &at, &at, 6)
            })
            .collect();
        let records = [record_with(
            "a",
            serde_json::Value::Array(storms),
            serde_json::json!([]),
            serde_json::json!([]),
            serde_json::json!([]),
        )];
        let r = build("7d", WEEK, now(), &[], &records, &[]);
        let a = &r.nodes[0];
        assert_eq!(a.storms.len(), LISTED_PER_NODE);
        assert_eq!(a.storms[0].entry, format!("e{}", LISTED_PER_NODE + 3));
        assert_eq!(
            a.storms.last().unwrap().entry,
            "e4",
            "the oldest four left out"
        );
        assert_eq!(a.not_listed, 4);
        assert_eq!(r.summary.change_storms, LISTED_PER_NODE as u64 + 4);
        let text = render(&r);
        assert!(
            text.contains("4 older on node a not listed (kubectl get fin a -o yaml)"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["nodes"][0]["notListed"], 4);
        assert_eq!(json["summary"]["changeStorms"], LISTED_PER_NODE + 4);
    }

    #[test]
    fn names_from_the_node_reach_the_terminal_escaped() {
        let node = "n\x1b]0;pwned\x07";
        let mut r = record_with(
            node,
            serde_json::json!([storm(
                "p\u{202e}",
                "etc\x1b[2J",
                "2026-12-07T09:00:00Z",
                "2026-12-07T09:02:00Z",
                12
            )]),
            serde_json::json!([flood("2026-12-07T10:00:00Z", "2026-12-07T10:05:00Z", 2400)]),
            serde_json::json!([]),
            serde_json::json!([{"policy": "p", "entry": "x\u{9b}31m", "from": "v2-a\x07",
                                "to": "v2-b", "since": "2026-12-04T00:00:00Z"}]),
        );
        r.spec.node = node.into();
        r.metadata.name = Some(node.into());
        let text = render(&build("7d", WEEK, now(), &[], &[r], &[]));
        assert!(
            !text.chars().any(|c| display::hidden(c) && c != '\n'),
            "{text:?}"
        );
        assert!(
            text.contains("n\\x1b]0;pwned\\x07   p\\u{202e}   etc\\x1b[2J"),
            "{text}"
        );
        assert!(text.contains("p/x\\u{009b}31m"), "{text}");
        assert!(text.contains("v2-a\\x07"), "{text}");
    }
}
