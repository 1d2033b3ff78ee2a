//! `kubectl fim`: kube-fim from the terminal (install as `kubectl-fim` on PATH).
//!
//! `summary` counts changes per node and category, `export` writes the change
//! records for archiving (JSON lines of whole FileChange objects, approvals
//! included, that read back as FileChanges), `approve` records the decision
//! that changes were expected (the agents then make the approved state the
//! baseline, if the file still is in it), `status` shows policies and nodes.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
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

#[derive(Parser, Debug)]
#[command(
    name = "kubectl fim",
    version,
    about = "kube-fim: file integrity monitoring of Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Csv,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Changes per node and category (and per policy), like a dashboard in the terminal.
    Summary {
        /// Only changes detected within this period (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "7d")]
        since: String,
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
    },
    /// Policies, nodes reporting, last scans, errors.
    Status,
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
        total += Duration::from_secs(n * secs);
        rest = &tail[1..];
    }
    if total.is_zero() {
        bail!("--since {s:?}: expected e.g. 24h or 7d");
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

async fn summary(client: &Client, since: &str) -> anyhow::Result<()> {
    let changes = changes_since(client, parse_since(since)?).await?;
    let cats = ["Added", "Modified", "Removed"];
    let mut per_node: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    let mut per_policy: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for c in &changes {
        let row = per_node.entry(c.spec.node.clone()).or_default();
        match &c.spec.summary {
            Some(s) => {
                row[0] += s.added;
                row[1] += s.modified;
                row[2] += s.removed;
            }
            None => {
                if let Some(i) = cats.iter().position(|x| *x == c.spec.category.as_str()) {
                    row[i] += 1;
                }
            }
        }
        if !approved(c) {
            row[3] += count(c);
        }
        let p = per_policy.entry(c.spec.policy.clone()).or_default();
        p.0 += count(c);
        if !approved(c) {
            p.1 += count(c);
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Changes in the last {since}: {}",
        changes.iter().map(count).sum::<u64>()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<40} {:>8} {:>8} {:>8} {:>8} {:>14}",
        "NODE", "ADDED", "MODIFIED", "REMOVED", "TOTAL", "UNAPPROVED"
    )?;
    for (node, r) in &per_node {
        writeln!(
            out,
            "{:<40} {:>8} {:>8} {:>8} {:>8} {:>14}",
            node,
            r[0],
            r[1],
            r[2],
            r[0] + r[1] + r[2],
            r[3]
        )?;
    }
    writeln!(out)?;
    writeln!(out, "{:<40} {:>8} {:>14}", "POLICY", "TOTAL", "UNAPPROVED")?;
    for (policy, (total, unacked)) in &per_policy {
        writeln!(out, "{:<40} {:>8} {:>14}", policy, total, unacked)?;
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

async fn export(client: &Client, since: &str, format: Format) -> anyhow::Result<()> {
    let changes = changes_since(client, parse_since(since)?).await?;
    let mut out = std::io::stdout().lock();
    match format {
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
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
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
) -> anyhow::Result<()> {
    let api: Api<FileChange> = Api::all(client.clone());
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
    };
    let patch = serde_json::json!({"status": {"approval": approval}});
    let mut failed = 0;
    for name in &targets {
        // An approval is given once; a second one would rewrite nothing.
        if let Ok(c) = api.get(name).await
            && let Some(given) = c.approval()
        {
            println!(
                "filechange/{name} already approved by {} at {}",
                given.approved_by, given.approved_at.0
            );
            continue;
        }
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(c) => println!(
                "filechange/{} approved by {} ({} {} on {})",
                name,
                approval.approved_by,
                c.spec.category.as_str(),
                c.spec.path,
                c.spec.node
            ),
            Err(kube::Error::Api(e)) => {
                failed += 1;
                eprintln!("filechange/{name}: {}", e.message);
            }
            Err(e) => {
                failed += 1;
                eprintln!("filechange/{name}: {e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} could not be approved", targets.len());
    }
    Ok(())
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

async fn status(client: &Client) -> anyhow::Result<()> {
    let policies = Api::<FileIntegrityPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing FileIntegrityPolicies (are the kube-fim CRDs installed?)")?;
    let nodes = Api::<FileIntegrityNode>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing FileIntegrityNodes")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<32} {:>8} {:>6} {:>10} {:>9} {:>8} {:<16} {:<16} LAST SCAN",
        "POLICY", "SELECTED", "READY", "BASELINING", "FILES", "CHANGES", "READY REASON", "DEGRADED"
    )?;
    for p in &policies.items {
        let s = p.status.clone().unwrap_or_default();
        let cond = |t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| {
                    if t == "Degraded" && c.status == "False" {
                        "-".to_string()
                    } else {
                        c.reason.clone()
                    }
                })
                .unwrap_or_else(|| "-".into())
        };
        writeln!(
            out,
            "{:<32} {:>8} {:>6} {:>10} {:>9} {:>8} {:<16} {:<16} {}",
            p.name_any(),
            s.nodes_selected.unwrap_or(0),
            s.nodes_ready.unwrap_or(0),
            s.nodes_baselining.unwrap_or(0),
            s.files_monitored.unwrap_or(0),
            s.changes_last24h.unwrap_or(0),
            cond("Ready"),
            cond("Degraded"),
            age(s.last_scan_time.map(|t| t.0)),
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<32} {:>9} {:>9} {:>7} {:>10} {:>7}  PROBLEMS",
        "NODE", "POLICIES", "FILES", "QUEUED", "HEARTBEAT", "ERRORS"
    )?;
    for n in &nodes.items {
        let s = n.status.clone().unwrap_or_default();
        let errors: i64 = s
            .policies
            .iter()
            .filter_map(|p| p.errors)
            .max()
            .unwrap_or(0);
        let problems: Vec<String> = s
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
            .collect();
        writeln!(
            out,
            "{:<32} {:>9} {:>9} {:>7} {:>10} {:>7}  {}",
            n.name_any(),
            s.policy_count.unwrap_or(0),
            s.files_monitored.unwrap_or(0),
            s.queue_length.unwrap_or(0),
            age(s.heartbeat_time.map(|t| t.0)),
            errors,
            if problems.is_empty() {
                "-".to_string()
            } else {
                problems.join("; ")
            },
        )?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = async {
        let client = Client::try_default()
            .await
            .context("connecting to the cluster (KUBECONFIG)")?;
        match cli.command {
            Command::Summary { since } => summary(&client, &since).await,
            Command::Export { since, format } => export(&client, &since, format).await,
            Command::Approve {
                names,
                reason,
                node,
                policy,
            } => approve(&client, names, reason, node, policy).await,
            Command::Status => status(&client).await,
        }
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubectl fim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("/etc/passwd"), "/etc/passwd");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
