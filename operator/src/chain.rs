//! Verification of every node's chain of transition numbers.
//!
//! Each change an agent reports carries its node's next transition number
//! (`spec.sequence`); the agent publishes the head of its chain
//! (`status.sequence` of its FileIntegrityNode: every number below it was
//! taken) and the numbers still waiting in its delivery queue
//! (`status.undelivered`). The protocol is written down once in the agent's
//! `report/sequence.rs`; this module is the cluster's half of it.
//!
//! For each node a policy of this operator selects, every number from the
//! checkpoint (`status.verification.verifiedThrough`) up to the head must be a
//! stored FileChange of the node or listed undelivered. A number that is
//! neither for longer than `--evidence-grace` (the FileChange watch may lag
//! the node's status) is an `EvidenceGap`: a Warning Event on the node's
//! FileIntegrityNode naming the missing ranges, the
//! `kube_fim_operator_evidence_gaps{node}` gauge (derived from the stored
//! verification, so it survives restarts), the `KubeFimEvidenceGap` alert,
//! and the policies covering the node Degraded. A head below the checkpoint
//! is one too (reason `Rewound`). The checkpoint moves over the verified
//! prefix, gaps included (they stay listed), and retention deletes only
//! below it ([`crate::retention`]). A gap whose numbers arrive after all is
//! closed; an admin clears the gaps below a number with the annotation
//! `fim.kube-fim.io/clear-evidence-gaps=<number>`.
//!
//! The verification is written by the operator (server-side apply of
//! `status.verification` only, its own field manager): the agent's merge
//! patches of its status never carry the field, and admission refuses the
//! agent's token changing it. Verification of a node starts at the head it
//! publishes when the operator first sees it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kube_fim_crds::node::{CLEAR_DIGEST_MOVES, CLEAR_EVIDENCE_GAPS, Span, spans};
use kube_fim_crds::validate::validate_policy;
use kube_fim_crds::{ChainVerification, EvidenceGap, FileIntegrityNode, UnexplainedMove};
use tracing::{info, warn};

use crate::changes::Numbers;
use crate::context::{Context, FIELD_MANAGER, store_ready};
use crate::status::selects;

pub mod digests;

/// Gap reason: numbers taken by the node that are neither stored nor queued.
pub const MISSING: &str = "Missing";
/// Gap reason: the node's head went below what was verified.
pub const REWOUND: &str = "Rewound";
/// Gaps listed at most (beyond, the last also covers the rest).
const MAX_GAPS: usize = 32;

/// Numbers found missing, not yet for longer than the grace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspect {
    pub span: Span,
    pub since: Timestamp,
}

/// What a node publishes of its chain, and what the cluster holds of it.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// `status.sequence`: every number below it was taken.
    pub head: u64,
    /// `status.undelivered`.
    pub undelivered: &'a [Span],
    /// The numbers of the node's stored FileChanges.
    pub stored: &'a Numbers,
    /// Gaps ending below this number are cleared by an admin.
    pub cleared_below: Option<u64>,
}

/// One verification step of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub verification: ChainVerification,
    /// Still within the grace.
    pub suspects: Vec<Suspect>,
    /// Gaps found by this step.
    pub found: Vec<EvidenceGap>,
}

/// Sorted disjoint `a` minus sorted disjoint `b`.
fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    for s in a {
        let mut first = s.first;
        let mut open = true;
        for c in b.iter().filter(|c| c.last >= s.first && c.first <= s.last) {
            if c.first > first {
                out.push(Span {
                    first,
                    last: c.first - 1,
                });
            }
            match c.last.checked_add(1) {
                Some(next) if next <= s.last => first = first.max(next),
                _ => {
                    open = false;
                    break;
                }
            }
        }
        if open && first <= s.last {
            out.push(Span {
                first,
                last: s.last,
            });
        }
    }
    out
}

fn intersect(a: Span, b: Span) -> Option<Span> {
    let first = a.first.max(b.first);
    let last = a.last.min(b.last);
    (first <= last).then_some(Span { first, last })
}

/// The stored numbers within `span`, as spans.
fn stored_in(stored: &Numbers, span: Span) -> Vec<Span> {
    spans(stored.range(span.first..=span.last).map(|(n, _)| *n))
}

fn span_of(gap: &EvidenceGap) -> Span {
    Span {
        first: gap.first,
        last: gap.last,
    }
}

fn gap(span: Span, reason: &str, since: Timestamp) -> EvidenceGap {
    EvidenceGap {
        first: span.first,
        last: span.last,
        reason: reason.into(),
        since: Time(since),
    }
}

/// How many numbers the gaps hold.
pub fn missing_numbers(verification: &ChainVerification) -> u64 {
    verification
        .gaps
        .iter()
        .map(|g| span_of(g).len())
        .fold(0, u64::saturating_add)
}

/// One step of the verification of one node: from the last checkpoint
/// (`None`: the node is seen for the first time) and the suspects of the last
/// step, what the node publishes now and the cluster holds now, at `now`.
pub fn verify(
    previous: Option<&ChainVerification>,
    suspects: &[Suspect],
    observed: Observed<'_>,
    now: Timestamp,
    grace: Duration,
) -> Verdict {
    let head = observed.head;
    let mut v = previous.cloned().unwrap_or_else(|| ChainVerification {
        verified_through: head,
        from: head,
        since: Time(now),
        gaps: Vec::new(),
        entries: Vec::new(),
        unexplained: Vec::new(),
    });
    let mut found = Vec::new();
    if head < v.verified_through {
        let rewound = gap(
            Span {
                first: head,
                last: v.verified_through - 1,
            },
            REWOUND,
            now,
        );
        let known = v
            .gaps
            .iter()
            .any(|g| g.reason == REWOUND && span_of(g) == span_of(&rewound));
        if !known {
            found.push(rewound.clone());
            v.gaps.push(rewound);
        }
    }

    // What is missing between the checkpoint and the head.
    let mut next_suspects = Vec::new();
    if head > v.verified_through {
        let window = Span {
            first: v.verified_through,
            last: head - 1,
        };
        let missing = subtract(
            &subtract(&[window], observed.undelivered),
            &stored_in(observed.stored, window),
        );
        let watched: Vec<Span> = suspects.iter().map(|s| s.span).collect();
        let mut pieces = Vec::new();
        for m in &missing {
            for s in suspects {
                if let Some(piece) = intersect(*m, s.span) {
                    pieces.push((piece, s.since));
                }
            }
            for piece in subtract(&[*m], &watched) {
                pieces.push((piece, now));
            }
        }
        for (span, since) in pieces {
            if now.duration_since(since).unsigned_abs() >= grace {
                let g = gap(span, MISSING, since);
                found.push(g.clone());
                v.gaps.push(g);
            } else {
                next_suspects.push(Suspect { span, since });
            }
        }
        next_suspects.sort_by_key(|s| s.span);

        // The checkpoint moves over stored numbers and listed gaps.
        let mut at = v.verified_through;
        while at < head {
            if observed.stored.contains_key(&at) {
                at += 1;
            } else if let Some(g) = v
                .gaps
                .iter()
                .find(|g| g.reason == MISSING && g.first <= at && at <= g.last)
            {
                at = g.last.saturating_add(1).min(head);
            } else {
                break;
            }
        }
        v.verified_through = at;
    }

    // Numbers that arrived after all close their gap.
    v.gaps = std::mem::take(&mut v.gaps)
        .into_iter()
        .flat_map(|g| {
            if g.reason != MISSING {
                return vec![g];
            }
            subtract(&[span_of(&g)], &stored_in(observed.stored, span_of(&g)))
                .into_iter()
                .map(|s| gap(s, &g.reason, g.since.0))
                .collect()
        })
        .collect();
    if let Some(below) = observed.cleared_below {
        v.gaps.retain(|g| g.last >= below);
    }
    v.gaps.sort_by_key(|g| (g.first, g.last));
    if v.gaps.len() > MAX_GAPS {
        let last = v.gaps.iter().map(|g| g.last).max().unwrap_or(0);
        v.gaps.truncate(MAX_GAPS);
        if let Some(g) = v.gaps.last_mut() {
            g.last = g.last.max(last);
        }
    }
    Verdict {
        verification: v,
        suspects: next_suspects,
        found,
    }
}

/// `12-250, 300` for an Event.
pub fn describe(gaps: &[EvidenceGap]) -> String {
    gaps.iter()
        .map(|g| span_of(g).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the verifier keeps of a node between two passes.
#[derive(Debug, Default)]
struct Memory {
    suspects: Vec<Suspect>,
    digest_suspects: Vec<digests::Suspect>,
    /// The highest checkpoint verified, to tell a FileIntegrityNode deleted
    /// and recreated with a lower head.
    verified_through: u64,
}

/// The verifier's clock: a pass over the covered nodes every few seconds,
/// once the caches are filled. Runs until the controller stops it.
pub async fn run(ctx: Arc<Context>) {
    let started = std::time::Instant::now();
    ctx.changes.wait_until_listed().await;
    for ready in [
        store_ready(&ctx.policies).await.is_ok(),
        store_ready(&ctx.nodes).await.is_ok(),
        store_ready(&ctx.records).await.is_ok(),
    ] {
        if !ready {
            return;
        }
    }
    // When verification begins: the caches it waits for are what an
    // operator's start-up time is made of.
    info!(
        seconds = started.elapsed().as_secs_f64(),
        "verifying the nodes' chains"
    );
    let every =
        (ctx.config.evidence_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(5));
    let mut memory: HashMap<String, Memory> = HashMap::new();
    loop {
        pass(&ctx, &mut memory).await;
        tokio::time::sleep(every).await;
    }
}

/// Nodes a valid policy of this operator selects.
fn covered(ctx: &Context) -> std::collections::HashSet<String> {
    let policies: Vec<_> = ctx
        .policies
        .state()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && validate_policy(p).is_ok())
        .collect();
    ctx.nodes
        .state()
        .iter()
        .filter(|n| policies.iter().any(|p| selects(p, n)))
        .map(|n| n.name_any())
        .collect()
}

async fn pass(ctx: &Context, memory: &mut HashMap<String, Memory>) {
    let covered = covered(ctx);
    let now = Timestamp::now();
    let mut seen = std::collections::HashSet::new();
    for record in ctx.records.state() {
        let node = record.name_any();
        if !covered.contains(&node) {
            continue;
        }
        let Some(status) = record.status.as_ref() else {
            continue;
        };
        let Some(head) = status.sequence else {
            continue;
        };
        seen.insert(node.clone());
        let undelivered: Vec<Span> = status
            .undelivered
            .iter()
            .flatten()
            .filter_map(|s| Span::parse(s))
            .collect();
        let undelivered = spans_sorted(undelivered);
        let cleared_below = record
            .annotations()
            .get(CLEAR_EVIDENCE_GAPS)
            .and_then(|v| v.parse().ok());
        let mem = memory.entry(node.clone()).or_default();
        // A record recreated below what was verified: verify from there.
        let remembered = (mem.verified_through > 0).then(|| ChainVerification {
            verified_through: mem.verified_through,
            from: mem.verified_through,
            since: Time(now),
            gaps: Vec::new(),
            entries: Vec::new(),
            unexplained: Vec::new(),
        });
        let previous = status.verification.clone().or(remembered);
        let verdict = ctx.changes.numbers_of(&node, |stored| {
            verify(
                previous.as_ref(),
                &mem.suspects,
                Observed {
                    head,
                    undelivered: &undelivered,
                    stored,
                    cleared_below,
                },
                now,
                ctx.config.evidence_grace,
            )
        });
        mem.suspects = verdict.suspects.clone();
        mem.verified_through = mem
            .verified_through
            .max(verdict.verification.verified_through);

        let generations: HashMap<String, Option<i64>> = status
            .policies
            .iter()
            .map(|p| (p.policy.clone(), p.observed_generation))
            .collect();
        let moves = ctx.changes.moves_of(&node);
        let cleared_until = record
            .annotations()
            .get(CLEAR_DIGEST_MOVES)
            .and_then(|v| v.parse::<Timestamp>().ok());
        let mut verification = verdict.verification;
        let checked = digests::verify(
            &verification.entries,
            &verification.unexplained,
            &mem.digest_suspects,
            digests::Published {
                entries: &status.entries,
                generations: &generations,
                alarm: status.baseline_alarm.is_some(),
                moves: &moves,
                cleared_until,
            },
            now,
            ctx.config.evidence_grace,
        );
        mem.digest_suspects = checked.suspects;
        verification.entries = checked.entries;
        verification.unexplained = checked.unexplained;

        let missing =
            missing_numbers(&verification).saturating_add(verification.unexplained.len() as u64);
        ctx.metrics
            .evidence_gaps
            .with_label_values(&[node.as_str()])
            .set(i64::try_from(missing).unwrap_or(i64::MAX));
        if !verdict.found.is_empty() {
            ctx.metrics
                .evidence_gaps_found
                .inc_by(verdict.found.len() as u64);
            tell(ctx, &record, &verdict.found).await;
        }
        if !checked.found.is_empty() {
            ctx.metrics
                .evidence_gaps_found
                .inc_by(checked.found.len() as u64);
            tell_moves(ctx, &record, &checked.found).await;
        }
        if status.verification.as_ref() != Some(&verification) {
            write(ctx, &node, &verification).await;
        }
    }
    memory.retain(|node, _| {
        let keep = seen.contains(node);
        if !keep {
            let _ = ctx
                .metrics
                .evidence_gaps
                .remove_label_values(&[node.as_str()]);
        }
        keep
    });
}

fn spans_sorted(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort();
    // Overlapping ranges from a node are merged, never trusted to be disjoint.
    let mut out: Vec<Span> = Vec::new();
    for s in spans {
        match out.last_mut() {
            Some(l) if s.first <= l.last.saturating_add(1) => l.last = l.last.max(s.last),
            _ => out.push(s),
        }
    }
    out
}

/// A Warning Event on the node's FileIntegrityNode naming the new gaps.
async fn tell(ctx: &Context, record: &FileIntegrityNode, found: &[EvidenceGap]) {
    let node = record.name_any();
    let rewound = found.iter().any(|g| g.reason == REWOUND);
    let what = if rewound {
        "the node's published transition number went back over numbers already verified"
    } else {
        "transition numbers the node took have no FileChange in the cluster and are not queued on the node"
    };
    let note = truncate_note(format!("node {node}: {what}: {}", describe(found)));
    warn!(%node, gaps = %describe(found), "evidence gap");
    publish(ctx, record, note).await;
}

/// A Warning Event on the node's FileIntegrityNode naming the entry digests
/// that moved with nothing in the cluster to explain them.
async fn tell_moves(ctx: &Context, record: &FileIntegrityNode, found: &[UnexplainedMove]) {
    let node = record.name_any();
    let note = truncate_note(format!(
        "node {node}: entry digests moved with no approval answered, policy change or baseline alarm to explain them (the baseline on the node changed, and its published digest with it): {}",
        digests::describe(found)
    ));
    warn!(%node, moves = %digests::describe(found), "evidence gap: unexplained entry digest move");
    publish(ctx, record, note).await;
}

fn truncate_note(mut note: String) -> String {
    if note.len() > 1000 {
        let mut cut = 990;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    note
}

async fn publish(ctx: &Context, record: &FileIntegrityNode, note: String) {
    let event = Event {
        type_: EventType::Warning,
        reason: "EvidenceGap".into(),
        note: Some(note),
        action: "Verify".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &record.object_ref(&())).await {
        warn!(node = %record.name_any(), %error, "could not publish the EvidenceGap event");
    }
}

/// Writes the node's verification (only that field, as the operator).
async fn write(ctx: &Context, node: &str, verification: &ChainVerification) {
    let api: Api<FileIntegrityNode> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": FileIntegrityNode::api_version(&()),
        "kind": FileIntegrityNode::kind(&()),
        "status": { "verification": verification },
    });
    match api
        .patch_status(
            node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {
            info!(%node, verified_through = verification.verified_through, gaps = verification.gaps.len(), "chain verified")
        }
        Err(error) => warn!(%node, %error, "could not write the chain verification"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
