//! `kubectl fim`: kube-fim from the terminal (install as `kubectl-fim` on PATH).
//!
//! `summary` counts changes per node and category, `export` writes the change
//! records for archiving (JSON lines of whole FileChange objects, approvals
//! included, that read back as FileChanges), `approve` records the decision
//! that changes were expected (the agents then make the approved state the
//! baseline, if the file still is in it), `status` shows policies and nodes,
//! `rollouts` and `fleet` what the operator found across nodes (`rollouts`).
//! kubectl's connection flags (`--kubeconfig`, `--context`, `--as`,
//! `--as-group`) and output formats (`-o json|yaml|wide`) work as in kubectl;
//! every file name is escaped before it reaches the terminal (`display`).

mod connect;
mod display;
mod report;
mod rollouts;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kube_fim_crds::labels::{NODE, POLICY, label_value};
use kube_fim_crds::{
    Approval, FileChange, FileIntegrityNode, FileIntegrityPolicy, NodePolicyPhase,
};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl fim",
    version,
    about = "kube-fim: file integrity monitoring of Kubernetes nodes"
)]
struct Cli {
    #[command(flatten)]
    kube: connect::KubeFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Csv,
    Json,
    /// OCSF 1.4 File System Activity, one event per line (what an OCSF sink gets).
    Ocsf,
    /// Elastic Common Schema, one event per line.
    Ecs,
    /// ArcSight CEF, one record per line.
    Cef,
}

/// `-o`: a table (the default), a wider one, or the same data for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Changes per node and category (and per policy), like a dashboard in the terminal.
    Summary {
        /// Only changes detected within this period (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "7d")]
        since: String,
        /// Output format: wide (more columns), json or yaml; default a table.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Write the change records, for archiving.
    Export {
        /// Only changes detected within this period (e.g. 24h, 14d).
        #[arg(long, default_value = "14d")]
        since: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
    },
    /// Record that changes were expected (who, when, why). The node's agent then
    /// makes the approved state its baseline, if the file is still in it.
    /// Needs the ClusterRole kube-fim-approver.
    Approve {
        /// FileChange names.
        names: Vec<String>,
        /// Why the changes are expected (a ticket, a maintenance window).
        #[arg(long)]
        reason: Option<String>,
        /// Every unapproved change of this node...
        #[arg(long)]
        node: Option<String>,
        /// ...and/or of this policy.
        #[arg(long)]
        policy: Option<String>,
        /// For a package transaction (a FileChange listing many changes,
        /// TRANSACTION column): approve only the change of this path
        /// (repeatable). The node reports the others again, as a new object
        /// to approve. Needs FileChange names.
        #[arg(long = "path")]
        paths: Vec<String>,
    },
    /// Policies, nodes reporting, last scans, errors.
    Status {
        /// Output format: wide (more columns), json or yaml; default a table.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// The compliance report: per node, when every file was last compared with
    /// the baseline (at least weekly), changes, who approved what, open alarms,
    /// and the evidence gaps, change floods and change storms of the period.
    Report {
        /// Changes detected within this period (e.g. 7d, 30d).
        #[arg(long, default_value = "7d")]
        since: String,
        /// Output format: json or yaml; default a document for people.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Rollouts: the same change of one file on several nodes, as the operator
    /// found them (node counts, approvals, the nodes where the file changed
    /// differently); `rollouts approve ID` approves one.
    Rollouts {
        #[command(subcommand)]
        action: Option<RolloutAction>,
        /// Only this policy's rollouts.
        #[arg(long)]
        policy: Option<String>,
        /// Output format: wide (more columns), json or yaml; default a table.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Nodes whose files differ from the majority of their pool (same image),
    /// per policy entry, as the operator compared them.
    Fleet {
        /// Output format: json or yaml; default a table.
        #[arg(short, long, value_enum)]
        output: Option<Output>,
    },
    /// Print a shell completion script, e.g. `source <(kubectl-fim completion bash)`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum RolloutAction {
    /// Approve, in your name, every node's change that is exactly this
    /// rollout's change (none of the outliers). Needs the ClusterRole
    /// kube-fim-approver.
    Approve {
        /// The rollout's ID (`kubectl fim rollouts`).
        id: String,
        /// Why the changes are expected (a ticket, a maintenance window).
        #[arg(long)]
        reason: Option<String>,
        /// The rollout's policy (found from the policies' status if not given).
        #[arg(long)]
        policy: Option<String>,
    },
}

/// Parses `30s`, `15m`, `24h`, `7d` (and combinations such as `1d12h`).
fn parse_since(s: &str) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let (n, tail) = rest.split_at(digits);
        let n: u64 = n
            .parse()
            .with_context(|| format!("--since {s:?}: expected e.g. 24h or 7d"))?;
        let unit = tail
            .chars()
            .next()
            .context("--since: missing unit (s, m, h, d)")?;
        let secs = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => bail!("--since {s:?}: unknown unit {unit:?} (s, m, h, d)"),
        };
        total += Duration::from_secs(n.saturating_mul(secs));
        rest = &tail[unit.len_utf8()..];
    }
    if total.is_zero() {
        bail!("--since {s:?}: expected e.g. 24h or 7d");
    }
    if total > Duration::from_secs(100 * 365 * 86400) {
        bail!("--since {s:?}: more than 100 years");
    }
    Ok(total)
}

async fn changes_since(client: &Client, since: Duration) -> anyhow::Result<Vec<FileChange>> {
    let api: Api<FileChange> = Api::all(client.clone());
    let cutoff = Timestamp::now() - since;
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await.context("listing FileChanges")?;
        out.extend(
            page.items
                .into_iter()
                .filter(|c| c.spec.detected_time.0 >= cutoff),
        );
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => params = params.continue_token(&t),
            _ => break,
        }
    }
    out.sort_by_key(|c| c.spec.detected_time.0);
    Ok(out)
}

fn approved(c: &FileChange) -> bool {
    c.approval().is_some()
}

fn count(c: &FileChange) -> u64 {
    c.spec.summary.as_ref().map_or(1, |s| s.count)
}

/// One node's line of `summary`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeSummary {
    node: String,
    added: u64,
    modified: u64,
    removed: u64,
    total: u64,
    unapproved: u64,
    policies: Vec<String>,
    last_change: Option<String>,
}

/// One policy's line of `summary`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicySummary {
    policy: String,
    total: u64,
    unapproved: u64,
}

/// What `summary` shows, in any output format.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    since: String,
    total: u64,
    nodes: Vec<NodeSummary>,
    policies: Vec<PolicySummary>,
}

fn summarize(since: &str, changes: &[FileChange]) -> Summary {
    let mut per_node: BTreeMap<String, NodeSummary> = BTreeMap::new();
    let mut per_policy: BTreeMap<String, PolicySummary> = BTreeMap::new();
    for c in changes {
        let row = per_node
            .entry(c.spec.node.clone())
            .or_insert_with(|| NodeSummary {
                node: c.spec.node.clone(),
                ..NodeSummary::default()
            });
        match &c.spec.summary {
            Some(s) => {
                row.added += s.added;
                row.modified += s.modified;
                row.removed += s.removed;
            }
            None => match c.spec.category.as_str() {
                "Added" => row.added += 1,
                "Modified" => row.modified += 1,
                "Removed" => row.removed += 1,
                _ => {}
            },
        }
        row.total = row.added + row.modified + row.removed;
        if !approved(c) {
            row.unapproved += count(c);
        }
        if !row.policies.contains(&c.spec.policy) {
            row.policies.push(c.spec.policy.clone());
        }
        // Changes come sorted by detection time: the last one is the latest.
        row.last_change = Some(c.spec.detected_time.0.to_string());
        let p = per_policy
            .entry(c.spec.policy.clone())
            .or_insert_with(|| PolicySummary {
                policy: c.spec.policy.clone(),
                ..PolicySummary::default()
            });
        p.total += count(c);
        if !approved(c) {
            p.unapproved += count(c);
        }
    }
    Summary {
        since: since.to_string(),
        total: changes.iter().map(count).sum(),
        nodes: per_node.into_values().collect(),
        policies: per_policy.into_values().collect(),
    }
}

/// The data for programs, which people read too: no character that drives or
/// reorders a terminal is written raw. JSON escapes them all (`\u009b`,
/// `\u202e`: the data is exact). YAML escapes controls in double quotes, but
/// has no escape for a direction mark in every scalar style: those are shown
/// as `\u{202e}` text there.
fn structured<T: Serialize>(value: &T, output: Output) -> anyhow::Result<String> {
    fn mark_text(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s)
                if s.chars().any(|c| !c.is_control() && display::hidden(c)) =>
            {
                *s = s
                    .chars()
                    .map(|c| {
                        if !c.is_control() && display::hidden(c) {
                            format!("\\u{{{:04x}}}", c as u32)
                        } else {
                            c.to_string()
                        }
                    })
                    .collect();
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(mark_text),
            serde_json::Value::Object(o) => o.values_mut().for_each(mark_text),
            _ => {}
        }
    }
    Ok(match output {
        Output::Yaml => {
            let mut v = serde_json::to_value(value)?;
            mark_text(&mut v);
            serde_saphyr::to_string(&v).context("writing YAML")?
        }
        Output::Json | Output::Wide => {
            let mut out = String::new();
            // serde_json escapes ASCII controls in strings (the others are
            // its line breaks); every other character is inside a string.
            for c in serde_json::to_string_pretty(value)?.chars() {
                if display::hidden(c) && !c.is_ascii() {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push(c);
                }
            }
            out.push('\n');
            out
        }
    })
}

fn render_summary(summary: &Summary, output: Option<Output>) -> anyhow::Result<String> {
    use display::Align::{Left, Right};
    if let Some(o @ (Output::Json | Output::Yaml)) = output {
        return structured(summary, o);
    }
    let wide = output == Some(Output::Wide);
    let mut text = format!(
        "Changes in the last {}: {}\n\n",
        display::escape(&summary.since),
        summary.total
    );
    let mut columns = vec![
        ("NODE", Left),
        ("ADDED", Right),
        ("MODIFIED", Right),
        ("REMOVED", Right),
        ("TOTAL", Right),
        ("UNAPPROVED", Right),
    ];
    if wide {
        columns.extend([("LAST CHANGE", Left), ("POLICIES", Left)]);
    }
    let mut nodes = display::Table::new(&columns);
    for n in &summary.nodes {
        let mut row = vec![
            n.node.clone(),
            n.added.to_string(),
            n.modified.to_string(),
            n.removed.to_string(),
            n.total.to_string(),
            n.unapproved.to_string(),
        ];
        if wide {
            row.push(n.last_change.clone().unwrap_or_else(|| "-".into()));
            row.push(n.policies.join(","));
        }
        nodes.row(row);
    }
    text.push_str(&nodes.render());
    text.push('\n');
    let mut policies =
        display::Table::new(&[("POLICY", Left), ("TOTAL", Right), ("UNAPPROVED", Right)]);
    for p in &summary.policies {
        policies.row([
            p.policy.clone(),
            p.total.to_string(),
            p.unapproved.to_string(),
        ]);
    }
    text.push_str(&policies.render());
    Ok(text)
}

async fn summary(client: &Client, since: &str, output: Option<Output>) -> anyhow::Result<()> {
    let changes = changes_since(client, parse_since(since)?).await?;
    let text = render_summary(&summarize(since, &changes), output)?;
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

async fn export(client: &Client, since: &str, format: Format) -> anyhow::Result<()> {
    let changes = changes_since(client, parse_since(since)?).await?;
    let mut out = std::io::stdout().lock();
    let sink_format = match format {
        Format::Ocsf => Some(kube_fim_crds::SinkFormat::Ocsf),
        Format::Ecs => Some(kube_fim_crds::SinkFormat::Ecs),
        Format::Cef => Some(kube_fim_crds::SinkFormat::Cef),
        Format::Csv | Format::Json => None,
    };
    if let Some(f) = sink_format {
        // The operator's encoder: the same events a FileChangeSink delivers.
        for c in &changes {
            for (_, line) in kube_fim_formats::encode_all(f, c) {
                writeln!(out, "{line}")?;
            }
        }
        return Ok(());
    }
    match format {
        Format::Ocsf | Format::Ecs | Format::Cef => {}
        Format::Json => {
            // Whole objects, one per line: an archive reads back as FileChanges.
            for c in &changes {
                let mut record = c.clone();
                record.metadata.managed_fields = None;
                writeln!(out, "{}", serde_json::to_string(&record)?)?;
            }
        }
        Format::Csv => {
            writeln!(
                out,
                "detected,node,policy,entry,category,path,changed_attributes,source,before_hash,after_hash,count,approved_by,approved_at,approval_reason,name,by,pid,command,uid,pod,container"
            )?;
            for c in &changes {
                let attrs: Vec<&str> = c
                    .spec
                    .changed_attributes
                    .iter()
                    .map(|a| a.as_str())
                    .collect();
                let fields = [
                    c.spec.detected_time.0.to_string(),
                    c.spec.node.clone(),
                    c.spec.policy.clone(),
                    c.spec.entry.clone(),
                    c.spec.category.as_str().to_string(),
                    c.spec.path.clone(),
                    attrs.join(" "),
                    format!("{:?}", c.spec.source),
                    c.spec
                        .before
                        .as_ref()
                        .and_then(|b| b.hash.clone())
                        .unwrap_or_default(),
                    c.spec
                        .after
                        .as_ref()
                        .and_then(|a| a.hash.clone())
                        .unwrap_or_default(),
                    count(c).to_string(),
                    c.approval()
                        .map(|a| a.approved_by.clone())
                        .unwrap_or_default(),
                    c.approval()
                        .map(|a| a.approved_at.0.to_string())
                        .unwrap_or_default(),
                    c.approval()
                        .and_then(|a| a.reason.clone())
                        .unwrap_or_default(),
                    c.name_any(),
                ];
                // Who made the change, when process attribution named the writer.
                let p = c.spec.process.as_ref();
                let pod = p.and_then(|p| p.pod.as_ref());
                let who = [
                    p.and_then(|p| p.by.clone()).unwrap_or_default(),
                    p.map(|p| p.pid.to_string()).unwrap_or_default(),
                    p.and_then(|p| p.command.clone()).unwrap_or_default(),
                    p.and_then(|p| p.uid)
                        .map(|u| u.to_string())
                        .unwrap_or_default(),
                    pod.and_then(|r| {
                        Some(format!("{}/{}", r.namespace.as_ref()?, r.name.as_ref()?))
                    })
                    .unwrap_or_default(),
                    pod.and_then(|r| r.container.clone()).unwrap_or_default(),
                ];
                let fields: Vec<&String> = fields.iter().chain(who.iter()).collect();
                let line: Vec<String> = fields.iter().map(|f| display::csv_field(f)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
        }
    }
    Ok(())
}

/// The user the API server authenticates this client as (SelfSubjectReview).
async fn whoami(client: &Client) -> anyhow::Result<String> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("asking the API server who this is (SelfSubjectReview)")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .context("the API server did not say who this is")
}

async fn approve(
    client: &Client,
    names: Vec<String>,
    reason: Option<String>,
    node: Option<String>,
    policy: Option<String>,
    paths: Vec<String>,
) -> anyhow::Result<()> {
    let api: Api<FileChange> = Api::all(client.clone());
    if !paths.is_empty() && (node.is_some() || policy.is_some() || names.is_empty()) {
        bail!(
            "--path approves part of a package transaction: name its FileChange (not --node or --policy)"
        );
    }
    let mut targets = names;
    if node.is_some() || policy.is_some() {
        let mut selector = Vec::new();
        if let Some(n) = &node {
            selector.push(format!("{NODE}={}", label_value(n)));
        }
        if let Some(p) = &policy {
            selector.push(format!("{POLICY}={}", label_value(p)));
        }
        let list = api
            .list(&ListParams::default().labels(&selector.join(",")))
            .await
            .context("listing FileChanges")?;
        // Labels only narrow the listing; the spec says what the change is.
        targets.extend(
            list.items
                .iter()
                .filter(|c| !approved(c))
                .filter(|c| node.as_ref().is_none_or(|n| *n == c.spec.node))
                .filter(|c| policy.as_ref().is_none_or(|p| *p == c.spec.policy))
                .map(|c| c.name_any()),
        );
    }
    if targets.is_empty() {
        bail!("nothing to approve: name FileChanges, or select them with --node and/or --policy");
    }
    let approval = Approval {
        approved_by: whoami(client).await?,
        approved_at: Time(Timestamp::now()),
        reason,
        paths: Vec::new(),
    };
    let patch = serde_json::json!({"status": {"approval": approval}});
    let mut failed = 0;
    let esc = display::escape;
    for name in &targets {
        // Names given on the command line are echoed too.
        let name = esc(name);
        // An approval is given once; a second one would rewrite nothing.
        let stored = api.get(&name).await;
        if let Ok(c) = &stored
            && let Some(given) = c.approval()
        {
            println!(
                "filechange/{name} already approved by {} at {}",
                esc(&given.approved_by),
                given.approved_at.0
            );
            continue;
        }
        let mut patch = patch.clone();
        if !paths.is_empty() {
            let approved = match &stored {
                Ok(c) => approval_paths(c, &paths),
                Err(e) => Err(e.to_string()),
            };
            match approved {
                Ok(p) => patch["status"]["approval"]["paths"] = serde_json::json!(p),
                Err(why) => {
                    failed += 1;
                    eprintln!("filechange/{name}: {}", esc(&why));
                    continue;
                }
            }
        }
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(c) if !paths.is_empty() => println!(
                "filechange/{} approved by {}: {} of its {} changes ({}) on {}; the node reports the others again",
                name,
                esc(&approval.approved_by),
                c.approval().map_or(0, |a| a.paths.len()),
                c.spec
                    .package
                    .as_ref()
                    .and_then(|p| p.transaction.as_ref())
                    .map_or(0, |t| t.files),
                c.approval()
                    .map(|a| a
                        .paths
                        .iter()
                        .map(|p| esc(p).into_owned())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                esc(&c.spec.node)
            ),
            Ok(c) => println!(
                "filechange/{} approved by {} ({} {} on {})",
                name,
                esc(&approval.approved_by),
                c.spec.category.as_str(),
                esc(&c.spec.path),
                esc(&c.spec.node)
            ),
            Err(kube::Error::Api(e)) => {
                failed += 1;
                eprintln!("filechange/{name}: {}", esc(&e.message));
            }
            Err(e) => {
                failed += 1;
                eprintln!("filechange/{name}: {}", esc(&e.to_string()));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} could not be approved", targets.len());
    }
    Ok(())
}

/// The `status.approval.paths` approving `paths` of transaction `c`: each
/// must be one of the changes it lists (an approval of a path it does not
/// list would approve nothing, and say nothing).
fn approval_paths(c: &FileChange, paths: &[String]) -> Result<Vec<String>, String> {
    let Some(t) = c.spec.package.as_ref().and_then(|p| p.transaction.as_ref()) else {
        return Err(
            "not a package transaction (it is one change): approve it without --path".into(),
        );
    };
    let missing: Vec<&str> = paths
        .iter()
        .filter(|p| !t.changes.iter().any(|i| &i.path == *p))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the transaction ({}) lists no change of {}: nothing approved",
            t.summary,
            missing.join(", ")
        ));
    }
    let mut out = paths.to_vec();
    out.sort();
    out.dedup();
    Ok(out)
}

fn age(t: Option<Timestamp>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let secs = Timestamp::now().duration_since(t).as_secs().max(0);
            match secs {
                0..120 => format!("{secs}s"),
                120..7200 => format!("{}m", secs / 60),
                7200..172800 => format!("{}h", secs / 3600),
                _ => format!("{}d", secs / 86400),
            }
        }
    }
}

/// One policy's line of `status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyStatusRow {
    policy: String,
    nodes_selected: i64,
    nodes_ready: i64,
    nodes_baselining: i64,
    files_monitored: i64,
    changes_last24h: i64,
    ready_reason: String,
    ready_message: String,
    degraded_reason: String,
    last_scan_time: Option<String>,
}

/// One node's line of `status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatusRow {
    node: String,
    policies: i64,
    files_monitored: i64,
    queued: i64,
    heartbeat_time: Option<String>,
    errors: i64,
    problems: Vec<String>,
}

/// What `status` shows, in any output format.
#[derive(Debug, Serialize)]
struct Status {
    policies: Vec<PolicyStatusRow>,
    nodes: Vec<NodeStatusRow>,
}

fn status_rows(policies: &[FileIntegrityPolicy], nodes: &[FileIntegrityNode]) -> Status {
    let policies = policies
        .iter()
        .map(|p| {
            let s = p.status.clone().unwrap_or_default();
            let cond = |t: &str| s.conditions.iter().find(|c| c.type_ == t);
            PolicyStatusRow {
                policy: p.name_any(),
                nodes_selected: s.nodes_selected.unwrap_or(0).into(),
                nodes_ready: s.nodes_ready.unwrap_or(0).into(),
                nodes_baselining: s.nodes_baselining.unwrap_or(0).into(),
                files_monitored: s.files_monitored.unwrap_or(0),
                changes_last24h: s.changes_last24h.unwrap_or(0),
                ready_reason: cond("Ready").map_or_else(|| "-".into(), |c| c.reason.clone()),
                ready_message: cond("Ready").map_or_else(String::new, |c| c.message.clone()),
                degraded_reason: cond("Degraded")
                    .filter(|c| c.status != "False")
                    .map_or_else(|| "-".into(), |c| c.reason.clone()),
                last_scan_time: s.last_scan_time.map(|t| t.0.to_string()),
            }
        })
        .collect();
    let nodes = nodes
        .iter()
        .map(|n| {
            let s = n.status.clone().unwrap_or_default();
            NodeStatusRow {
                node: n.name_any(),
                policies: s.policy_count.unwrap_or(0).into(),
                files_monitored: s.files_monitored.unwrap_or(0),
                queued: s.queue_length.unwrap_or(0),
                heartbeat_time: s.heartbeat_time.map(|t| t.0.to_string()),
                errors: s
                    .policies
                    .iter()
                    .filter_map(|p| p.errors)
                    .max()
                    .unwrap_or(0),
                problems: s
                    .policies
                    .iter()
                    .filter(|p| p.phase == NodePolicyPhase::Failed)
                    .map(|p| {
                        format!(
                            "{}: {}",
                            p.policy,
                            p.message.clone().unwrap_or_else(|| "failed".into())
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    Status { policies, nodes }
}

fn age_of(time: Option<&String>) -> String {
    age(time.and_then(|t| t.parse::<Timestamp>().ok()))
}

fn render_status(status: &Status, output: Option<Output>) -> anyhow::Result<String> {
    use display::Align::{Left, Right};
    if let Some(o @ (Output::Json | Output::Yaml)) = output {
        return structured(status, o);
    }
    let wide = output == Some(Output::Wide);
    let mut columns = vec![
        ("POLICY", Left),
        ("SELECTED", Right),
        ("READY", Right),
        ("BASELINING", Right),
        ("FILES", Right),
        ("CHANGES", Right),
        ("READY REASON", Left),
        ("DEGRADED", Left),
        ("LAST SCAN", Left),
    ];
    if wide {
        columns.push(("MESSAGE", Left));
    }
    let mut policies = display::Table::new(&columns);
    for p in &status.policies {
        let mut row = vec![
            p.policy.clone(),
            p.nodes_selected.to_string(),
            p.nodes_ready.to_string(),
            p.nodes_baselining.to_string(),
            p.files_monitored.to_string(),
            p.changes_last24h.to_string(),
            p.ready_reason.clone(),
            p.degraded_reason.clone(),
            age_of(p.last_scan_time.as_ref()),
        ];
        if wide {
            row.push(p.ready_message.clone());
        }
        policies.row(row);
    }
    let mut columns = vec![
        ("NODE", Left),
        ("POLICIES", Right),
        ("FILES", Right),
        ("QUEUED", Right),
        ("HEARTBEAT", Right),
        ("ERRORS", Right),
    ];
    if wide {
        columns.push(("HEARTBEAT TIME", Left));
    }
    columns.push(("PROBLEMS", Left));
    let mut nodes = display::Table::new(&columns);
    for n in &status.nodes {
        let mut row = vec![
            n.node.clone(),
            n.policies.to_string(),
            n.files_monitored.to_string(),
            n.queued.to_string(),
            age_of(n.heartbeat_time.as_ref()),
            n.errors.to_string(),
        ];
        if wide {
            row.push(n.heartbeat_time.clone().unwrap_or_else(|| "-".into()));
        }
        row.push(if n.problems.is_empty() {
            "-".to_string()
        } else {
            n.problems.join("; ")
        });
        nodes.row(row);
    }
    Ok(format!("{}\n{}", policies.render(), nodes.render()))
}

async fn status(client: &Client, output: Option<Output>) -> anyhow::Result<()> {
    let policies = Api::<FileIntegrityPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing FileIntegrityPolicies (are the kube-fim CRDs installed?)")?;
    let nodes = Api::<FileIntegrityNode>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing FileIntegrityNodes")?;
    let text = render_status(&status_rows(&policies.items, &nodes.items), output)?;
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

async fn report(client: &Client, since: &str, output: Option<Output>) -> anyhow::Result<()> {
    let period = parse_since(since)?;
    let policies = Api::<FileIntegrityPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing FileIntegrityPolicies (are the kube-fim CRDs installed?)")?;
    let records = Api::<FileIntegrityNode>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing FileIntegrityNodes")?;
    let changes = changes_since(client, period).await?;
    let built = report::build(
        since,
        period,
        Timestamp::now(),
        &policies.items,
        &records.items,
        &changes,
    );
    let text = match output {
        Some(o @ (Output::Json | Output::Yaml)) => structured(&built, o)?,
        _ => report::render(&built),
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

async fn list_policies(client: &Client) -> anyhow::Result<Vec<FileIntegrityPolicy>> {
    Ok(Api::<FileIntegrityPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing FileIntegrityPolicies (are the kube-fim CRDs installed?)")?
        .items)
}

async fn list_rollouts(
    client: &Client,
    policy: Option<&str>,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let rows = rollouts::rows(&list_policies(client).await?, policy);
    let text = match output {
        Some(o @ (Output::Json | Output::Yaml)) => structured(&rows, o)?,
        o => rollouts::render(&rows, o == Some(Output::Wide)),
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

async fn fleet(client: &Client, output: Option<Output>) -> anyhow::Result<()> {
    let rows = rollouts::fleet_rows(&list_policies(client).await?);
    let text = match output {
        Some(o @ (Output::Json | Output::Yaml)) => structured(&rows, o)?,
        _ => rollouts::render_fleet(&rows),
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "kubectl-fim",
            &mut std::io::stdout(),
        );
        return std::process::ExitCode::SUCCESS;
    }
    let result = async {
        let client = cli
            .kube
            .client()
            .await
            .context("connecting to the cluster")?;
        match cli.command {
            Command::Summary { since, output } => summary(&client, &since, output).await,
            Command::Export { since, format } => export(&client, &since, format).await,
            Command::Approve {
                names,
                reason,
                node,
                policy,
                paths,
            } => approve(&client, names, reason, node, policy, paths).await,
            Command::Status { output } => status(&client, output).await,
            Command::Report { since, output } => report(&client, &since, output).await,
            Command::Rollouts {
                action: Some(RolloutAction::Approve { id, reason, policy }),
                ..
            } => {
                let approver = whoami(&client).await?;
                rollouts::approve(&client, approver, &id, policy, reason).await
            }
            Command::Rollouts {
                action: None,
                policy,
                output,
            } => list_rollouts(&client, policy.as_deref(), output).await,
            Command::Fleet { output } => fleet(&client, output).await,
            Command::Completion { .. } => Ok(()),
        }
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubectl fim: {}", display::escape(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn path_approval_names_changes_the_transaction_lists() {
        let item = |path: &str| {
            serde_json::json!({
                "path": path, "category": "Modified", "source": "Realtime",
                "detectedTime": "2026-12-01T10:00:00Z", "package": "openssl", "version": "3.0.15"
            })
        };
        let txn: FileChange = serde_json::from_value(serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileChange",
            "metadata": {"name": "t"},
            "spec": {
                "node": "n", "policy": "baseline", "entry": "usr-bin", "path": "/usr/bin/openssl",
                "category": "Modified", "source": "Realtime",
                "detectedTime": "2026-12-01T10:00:00Z",
                "package": {"manager": "dpkg", "name": "openssl", "version": "3.0.15",
                    "verdict": "Verified",
                    "transaction": {"summary": "openssl 3.0.13→3.0.15, 2 files", "files": 2,
                        "changes": [item("/usr/bin/c_rehash"), item("/usr/bin/openssl")]}}
            }
        }))
        .unwrap();
        let paths = |ps: &[&str]| ps.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(
            approval_paths(&txn, &paths(&["/usr/bin/openssl", "/usr/bin/openssl"])),
            Ok(paths(&["/usr/bin/openssl"]))
        );
        let err = approval_paths(&txn, &paths(&["/usr/bin/openssl", "/usr/bin/sudo"])).unwrap_err();
        assert!(err.contains("lists no change of /usr/bin/sudo"), "{err}");
        let single = change("n", "/etc/passwd", "Modified", false);
        let err = approval_paths(&single, &paths(&["/etc/passwd"])).unwrap_err();
        assert!(err.contains("not a package transaction"), "{err}");
    }

    fn change(node: &str, path: &str, category: &str, approved: bool) -> FileChange {
        let mut c: FileChange = serde_json::from_value(serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileChange",
            "metadata": {"name": "c"},
            "spec": {
                "node": node, "policy": "baseline", "entry": "etc", "path": path,
                "category": category, "source": "Scan",
                "detectedTime": "2026-12-01T10:00:00Z"
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

    fn long_node() -> String {
        format!("{}.example.com", "n".repeat(241))
    }

    fn sample() -> Summary {
        summarize(
            "7d",
            &[
                change(&long_node(), "/etc/passwd", "Modified", false),
                change(&long_node(), "/etc/new", "Added", true),
                change("w1", "/etc/\x1b]0;pwned\x07", "Removed", false),
            ],
        )
    }

    #[test]
    fn summary_table_fits_a_253_character_node_name() {
        let text = render_summary(&sample(), None).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("Changes in the last 7d: 3"), "{text}");
        let header = lines[2];
        let long = lines.iter().find(|l| l.starts_with(&long_node())).unwrap();
        let short = lines.iter().find(|l| l.starts_with("w1 ")).unwrap();
        // The numbers of every row end where their header ends.
        assert_eq!(header.len(), long.len(), "{text}");
        assert_eq!(header.len(), short.len(), "{text}");
        let cells: Vec<&str> = long.split_whitespace().collect();
        assert_eq!(cells, [long_node().as_str(), "1", "1", "0", "2", "1"]);
        assert!(!text.contains("LAST CHANGE"));
    }

    #[test]
    fn summary_wide_json_and_yaml() {
        let wide = render_summary(&sample(), Some(Output::Wide)).unwrap();
        assert!(wide.contains("LAST CHANGE"), "{wide}");
        assert!(wide.contains("2026-12-01T10:00:00Z"), "{wide}");
        let json: serde_json::Value =
            serde_json::from_str(&render_summary(&sample(), Some(Output::Json)).unwrap()).unwrap();
        assert_eq!(json["total"], 3);
        assert_eq!(json["nodes"][0]["node"], long_node().as_str());
        assert_eq!(json["nodes"][0]["unapproved"], 1);
        assert_eq!(json["policies"][0]["policy"], "baseline");
        let yaml = render_summary(&sample(), Some(Output::Yaml)).unwrap();
        let back: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, json, "the YAML is the same data");
    }

    #[test]
    fn structured_output_never_carries_a_raw_control_character() {
        let mut s = sample();
        s.nodes[0].policies = vec!["p\x1b[2J\u{9b}".into(), "evil\u{202e}hs.txt".into()];
        let json: serde_json::Value =
            serde_json::from_str(&render_summary(&s, Some(Output::Json)).unwrap()).unwrap();
        assert_eq!(
            json["nodes"][0]["policies"],
            serde_json::json!(["p\x1b[2J\u{9b}", "evil\u{202e}hs.txt"]),
            "JSON output is exact"
        );
        for o in [Output::Yaml, Output::Json] {
            let text = render_summary(&s, Some(o)).unwrap();
            assert!(
                !text.chars().any(|c| display::hidden(c) && c != '\n'),
                "{o:?}: {text:?}"
            );
            assert!(text.contains("evil\\u"), "{o:?}: {text}");
        }
    }

    #[test]
    fn status_tables_escape_problems_and_size_columns() {
        let node: FileIntegrityNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileIntegrityNode",
            "metadata": {"name": long_node()},
            "spec": {"node": long_node()},
            "status": {"policies": [{
                "policy": "baseline", "phase": "Failed",
                "message": "cannot read /etc/\x1b[2Jsecret"
            }]}
        }))
        .unwrap();
        let status = status_rows(&[], &[node]);
        let text = render_status(&status, None).unwrap();
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(
            text.contains("baseline: cannot read /etc/\\x1b[2Jsecret"),
            "{text}"
        );
        let wide = render_status(&status, Some(Output::Wide)).unwrap();
        assert!(wide.contains("HEARTBEAT TIME") && wide.contains("MESSAGE"));
        let json: serde_json::Value =
            serde_json::from_str(&render_status(&status, Some(Output::Json)).unwrap()).unwrap();
        assert_eq!(json["nodes"][0]["node"], long_node().as_str());
    }

    #[test]
    fn report_json_and_yaml_list_storms_with_names_escaped() {
        let node: FileIntegrityNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "fim.kube-fim.io/v1alpha1",
            "kind": "FileIntegrityNode",
            "metadata": {"name": "a"},
            "spec": {"node": "a"},
            "status": {"storms": [{
                "policy": "p", "entry": "evil\u{202e}hs.txt\x1b[2J",
                "since": "2026-12-07T09:00:00Z", "last": "2026-12-07T09:02:00Z",
                "count": 12, "cap": 5
            }]}
        }))
        .unwrap();
        let built = report::build(
            "1d",
            Duration::from_secs(86400),
            "2026-12-07T12:00:00Z".parse().unwrap(),
            &[],
            &[node],
            &[],
        );
        let text = structured(&built, Output::Json).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let storm = &json["nodes"][0]["storms"][0];
        assert_eq!(
            storm["entry"], "evil\u{202e}hs.txt\x1b[2J",
            "JSON output is exact"
        );
        assert_eq!(
            (storm["count"].as_u64(), storm["cap"].as_u64()),
            (Some(12), Some(5))
        );
        assert_eq!(storm["since"], "2026-12-07T09:00:00Z");
        assert_eq!(json["summary"]["changeStorms"], 1);
        let yaml = structured(&built, Output::Yaml).unwrap();
        for out in [&text, &yaml] {
            assert!(
                !out.chars().any(|c| display::hidden(c) && c != '\n'),
                "{out:?}"
            );
        }
        let back: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back["nodes"][0]["storms"][0]["count"], 12);
    }

    #[test]
    fn completion_scripts_know_the_commands_and_kubectl_flags() {
        Cli::command().debug_assert();
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "kubectl-fim", &mut out);
            let script = String::from_utf8(out).unwrap();
            for word in [
                "summary",
                "approve",
                "--kubeconfig",
                "--context",
                "--as-group",
            ] {
                assert!(script.contains(word), "{shell:?} completion lacks {word}");
            }
        }
        let cli = Cli::try_parse_from([
            "kubectl-fim",
            "status",
            "-o",
            "wide",
            "--context",
            "prod",
            "--as",
            "alice",
        ])
        .unwrap();
        assert_eq!(cli.kube.context.as_deref(), Some("prod"));
        assert!(matches!(
            cli.command,
            Command::Status {
                output: Some(Output::Wide)
            }
        ));
        assert!(Cli::try_parse_from(["kubectl-fim", "summary", "-o", "xml"]).is_err());
    }

    #[test]
    fn since_accepts_days_and_combinations() {
        assert_eq!(parse_since("7d").ok(), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(
            parse_since("1d12h").ok(),
            Some(Duration::from_secs(36 * 3600))
        );
        assert!(parse_since("7").is_err());
        assert!(parse_since("7w").is_err());
        assert!(parse_since("").is_err());
    }

    #[test]
    fn since_with_a_multibyte_unit_is_an_error_not_a_crash() {
        assert!(parse_since("7é").is_err());
        assert!(parse_since("99999999999999999999d").is_err());
        assert!(parse_since("9999999999999999d").is_err());
    }
}
