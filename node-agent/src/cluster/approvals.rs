//! Approvals: answers the approval of each of this node's FileChanges.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube_fim_crds::{ApprovalOutcome, ChangeCategory, EntryDigestMove, FileChange};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::containers::{self, DriftAnswer, DriftApproval};
use crate::context::Context;
use crate::monitor::{AllAnswer, Answer, ApprovalRequest, Control};
use crate::report::{deliver, transaction};

/// An approver says that a change was expected (`status.approval`, which
/// the admission policy lets only holders of the approve verb write, in their
/// own name). The agent makes the reviewed state (`spec.after`, for the
/// change's policy entry) its baseline only if the file is exactly in it;
/// otherwise it approves nothing, reports the present state as a new change,
/// and says so on the approved one (`Superseded`). A path the change's entry
/// does not cover here approves nothing either, and says so. An applied
/// approval's answer carries how it moved the entry digests
/// (`status.entryDigests`) and is recorded before the baseline is saved.
/// Labels are not looked at: anyone with patch rights can set a label.
pub async fn run(
    ctx: Arc<Context>,
    control: mpsc::Sender<Control>,
    drift: mpsc::Sender<DriftApproval>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut served = ctx.served.clone();
    // Judged before the monitor knows what it serves, every approval would
    // look like a file nobody monitors.
    tokio::select! {
        () = &mut shutdown => return,
        r = served.changed() => if r.is_err() { return },
    }
    let api: Api<FileChange> = Api::all(ctx.client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.node={}", ctx.node));
    let watched: Api<FileChange> = Api::all(ctx.watches.clone());
    let mut stream = std::pin::pin!(watcher(watched, wc).default_backoff().applied_objects());
    // The watch retries with backoff; each new kind of failure is said once.
    let mut last_error: Option<String> = None;
    loop {
        let change = tokio::select! {
            () = &mut shutdown => return,
            c = stream.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(error)) => {
                    let text = error.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        warn!(%error, "the watch of this node's FileChanges fails, approvals wait until it works (the spec.node field selector needs Kubernetes 1.32 or later)");
                        last_error = Some(text);
                    }
                    continue;
                }
                None => return,
            },
        };
        last_error = None;
        let answered = change.status.as_ref().is_some_and(|s| s.outcome.is_some());
        let Some(approval) = change.approval().filter(|_| !answered) else {
            continue;
        };
        let Some(verdict) =
            judge(&change, &approval.approved_by, &ctx.node, &control, &drift).await
        else {
            return;
        };
        let mut status =
            serde_json::json!({"outcome": verdict.outcome, "message": verdict.message});
        if verdict.outcome == ApprovalOutcome::Applied {
            status["baselineUpdatedTime"] = serde_json::json!(Time(Timestamp::now()));
            status["entryDigests"] = serde_json::json!(verdict.moved);
        }
        let path = &change.spec.path;
        let recorded = record(&api, &change.name_any(), &status).await;
        if let Some(tell) = verdict.recorded {
            // The monitor saves the baseline only now (or undoes the approval).
            let _ = tell.send(recorded);
        }
        if recorded {
            info!(%path, outcome = ?verdict.outcome, approver = %approval.approved_by, "approval answered");
        }
    }
}

/// Writes the answer on the FileChange's status, retrying a while; whether
/// it was written.
async fn record(api: &Api<FileChange>, name: &str, status: &serde_json::Value) -> bool {
    let patch = serde_json::json!({ "status": status });
    for attempt in 1..=RECORD_ATTEMPTS {
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code != 409 && e.code != 429 && e.code < 500 => {
                warn!(error = %e, %name, "the answer to an approval was refused");
                return false;
            }
            Err(error) => {
                warn!(%error, %name, attempt, "could not write the answer to an approval");
                tokio::time::sleep(deliver::backoff(attempt)).await;
            }
        }
    }
    false
}

/// Attempts to record an answer before an applied approval is undone (the
/// monitor waits meanwhile: about 15 s at most, well within what /healthz
/// allows; an approval whose answer was not recorded is judged again when
/// the watch next delivers it, at the latest at the next start).
const RECORD_ATTEMPTS: u32 = 4;

/// What became of an approval, and why.
struct Verdict {
    outcome: ApprovalOutcome,
    message: String,
    /// How an applied approval moved the entry digests.
    moved: Vec<EntryDigestMove>,
    /// Told whether the answer was recorded (an applied approval).
    recorded: Option<oneshot::Sender<bool>>,
}

/// Asks the monitor to apply an approval of `change`; `None` when the
/// monitor is gone (stopping).
async fn judge(
    change: &FileChange,
    approver: &str,
    node: &str,
    control: &mpsc::Sender<Control>,
    drift: &mpsc::Sender<DriftApproval>,
) -> Option<Verdict> {
    let path = &change.spec.path;
    let verdict = |outcome, message| Verdict {
        outcome,
        message,
        moved: Vec::new(),
        recorded: None,
    };
    if change.spec.category == ChangeCategory::Summary {
        return Some(verdict(
            ApprovalOutcome::Superseded,
            format!(
                "a Summary stands for many files and approves none of them on {node}: approve their own changes"
            ),
        ));
    }
    // Drift is approved for the container it was found in, by the drift task.
    if let Some(container) = change
        .spec
        .container
        .as_ref()
        .filter(|_| change.spec.entry == containers::ENTRY)
    {
        let (tx, rx) = oneshot::channel();
        let request = DriftApproval {
            container: container.id.clone(),
            policy: change.spec.policy.clone(),
            path: path.clone(),
            after: change.spec.after.clone(),
            done: tx,
        };
        drift.send(request).await.ok()?;
        let pod = format!("{}/{}", container.namespace, container.pod);
        let c = format!(
            "container {} ({}) of pod {pod}",
            container.name, container.id
        );
        return Some(match rx.await.ok()? {
            DriftAnswer::Applied => verdict(
                ApprovalOutcome::Applied,
                format!(
                    "approved by {approver}: {path} as it is in {c} on {node}, for that container only (other pods, and this pod's next container, are judged on their own)"
                ),
            ),
            DriftAnswer::Gone => verdict(
                ApprovalOutcome::NotMonitored,
                format!(
                    "{c} no longer runs on {node}: nothing was approved (its FileChanges stay as evidence)"
                ),
            ),
            DriftAnswer::Superseded => verdict(
                ApprovalOutcome::Superseded,
                format!(
                    "{path} in {c} on {node} no longer is in the approved state: nothing was approved; its present state is reported as a newer FileChange"
                ),
            ),
        });
    }
    if let Some(items) = transaction::items(&change.spec) {
        return judge_transaction(change, items, approver, node, control).await;
    }
    let (tx, rx) = oneshot::channel();
    let request = Control::Approve {
        request: ApprovalRequest {
            policy: change.spec.policy.clone(),
            entry: change.spec.entry.clone(),
            key: path.clone(),
            after: change.spec.after.clone().map(Box::new),
        },
        done: tx,
    };
    control.send(request).await.ok()?;
    let entry = format!("{}/{}", change.spec.policy, change.spec.entry);
    Some(match rx.await.ok()? {
        Answer::Applied { moved, recorded } => Verdict {
            outcome: ApprovalOutcome::Applied,
            message: format!(
                "approved by {approver}: the approved state of {path} (entry {entry}) is the baseline on {node}"
            ),
            moved,
            recorded: Some(recorded),
        },
        Answer::NotMonitored => verdict(
            ApprovalOutcome::NotMonitored,
            format!(
                "{path} is not monitored on {node} by entry {entry} of a served policy: nothing was approved; the baseline is unchanged"
            ),
        ),
        Answer::Superseded(names) => verdict(
            ApprovalOutcome::Superseded,
            format!(
                "{path} on {node} no longer is in the approved state (spec.after: every attribute entry {entry} compares): nothing was approved; {}",
                if names.is_empty() {
                    "its present state is its baseline (a restored change: nothing to adopt) or was reported already as a newer FileChange".to_string()
                } else {
                    format!("its present state is reported as {}", names.join(", "))
                }
            ),
        ),
    })
}

/// The approval of a package transaction object: each change it lists (or
/// those `status.approval.paths` names) approved as one change would be; the
/// entry digests move once for all of them. The changes left out are
/// reported again, as a new object to approve.
async fn judge_transaction(
    change: &FileChange,
    items: &[kube_fim_crds::TransactionItem],
    approver: &str,
    node: &str,
    control: &mpsc::Sender<Control>,
) -> Option<Verdict> {
    let named: &[String] = change.approval().map_or(&[], |a| a.paths.as_slice());
    let chosen = |path: &str| named.is_empty() || named.iter().any(|n| n == path);
    let (selected, left): (Vec<_>, Vec<_>) = items.iter().cloned().partition(|i| chosen(&i.path));
    let unknown: Vec<&String> = named
        .iter()
        .filter(|n| !items.iter().any(|i| &i.path == *n))
        .collect();
    let requests: Vec<ApprovalRequest> = selected
        .iter()
        .map(|i| ApprovalRequest {
            policy: change.spec.policy.clone(),
            entry: change.spec.entry.clone(),
            key: i.path.clone(),
            after: i.after.clone().map(Box::new),
        })
        .collect();
    let manager = change.spec.package.as_ref().map(|p| p.manager);
    let remainder =
        transaction::object(&change.spec, manager, left, Timestamp::now()).map(Box::new);
    let (tx, rx) = oneshot::channel();
    let request = Control::ApproveAll {
        requests,
        remainder,
        done: tx,
    };
    control.send(request).await.ok()?;
    let answer: AllAnswer = rx.await.ok()?;
    let entry = format!("{}/{}", change.spec.policy, change.spec.entry);
    let outcome = if !answer.applied.is_empty() {
        ApprovalOutcome::Applied
    } else if !answer.superseded.is_empty() {
        ApprovalOutcome::Superseded
    } else {
        ApprovalOutcome::NotMonitored
    };
    let mut message = format!(
        "approved by {approver}: {} of {} changes of the transaction (entry {entry}) are the baseline on {node}",
        answer.applied.len(),
        items.len()
    );
    let list = |paths: &[String]| {
        let shown: Vec<&str> = paths.iter().take(5).map(String::as_str).collect();
        let more = paths.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    if !answer.superseded.is_empty() {
        message.push_str(&format!(
            "; moved on since (not approved, their present state is reported anew): {}",
            list(&answer.superseded)
        ));
    }
    if !answer.not_monitored.is_empty() {
        message.push_str(&format!(
            "; not monitored here by entry {entry} (not approved): {}",
            list(&answer.not_monitored)
        ));
    }
    if let Some(rest) = &answer.remainder {
        message.push_str(&format!(
            "; the {} changes the approval left out are reported again as {rest}",
            items.len() - selected.len()
        ));
    }
    if !unknown.is_empty() {
        let unknown: Vec<String> = unknown.into_iter().cloned().collect();
        message.push_str(&format!(
            "; paths the transaction does not list: {}",
            list(&unknown)
        ));
    }
    let mut cut = message.len().min(1024);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    Some(Verdict {
        outcome,
        message,
        moved: answer.moved,
        recorded: answer.recorded,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::fixtures;
    use crate::report::object::to_object;

    #[tokio::test]
    async fn a_summary_approves_nothing_and_the_monitor_is_not_asked() {
        let (control, mut asked) = mpsc::channel(1);
        let mut change = to_object(fixtures::change("/etc/passwd"), 0);
        change.spec.category = ChangeCategory::Summary;
        let verdict = judge(&change, "alice", "n1", &control, &mpsc::channel(1).0)
            .await
            .unwrap();
        assert_eq!(verdict.outcome, ApprovalOutcome::Superseded);
        assert!(verdict.message.contains("approve their own changes"));
        assert!(asked.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_approval_of_a_state_the_file_left_names_the_newer_change() {
        let (control, mut asked) = mpsc::channel(1);
        let monitor = tokio::spawn(async move {
            let Some(Control::Approve { request, done }) = asked.recv().await else {
                panic!("no approval asked");
            };
            assert_eq!(request.key, "/etc/passwd");
            let _ = done.send(Answer::Superseded(vec!["fc-newer".into()]));
        });
        let change = to_object(fixtures::change("/etc/passwd"), 0);
        let verdict = judge(&change, "alice", "n1", &control, &mpsc::channel(1).0)
            .await
            .unwrap();
        monitor.await.unwrap();
        assert_eq!(verdict.outcome, ApprovalOutcome::Superseded);
        assert!(
            verdict
                .message
                .contains("its present state is reported as fc-newer"),
            "{}",
            verdict.message
        );
    }

    #[tokio::test]
    async fn no_verdict_once_the_monitor_is_gone() {
        let (control, asked) = mpsc::channel(1);
        drop(asked);
        let change = to_object(fixtures::change("/etc/passwd"), 0);
        assert!(
            judge(&change, "alice", "n1", &control, &mpsc::channel(1).0)
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn an_approval_of_drift_is_judged_by_its_container_not_the_hosts_baseline() {
        let (control, mut asked) = mpsc::channel(1);
        let (drift, mut drift_asked) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            let Some(a): Option<DriftApproval> = drift_asked.recv().await else {
                panic!("the drift task was not asked");
            };
            assert_eq!(a.container, "containerd://a1");
            assert_eq!(a.path, "/usr/bin/curl");
            let _ = a.done.send(DriftAnswer::Applied);
        });
        let mut change = to_object(fixtures::change("/usr/bin/curl"), 0);
        change.spec.entry = containers::ENTRY.into();
        change.spec.container = Some(kube_fim_crds::ContainerRef {
            namespace: "shop".into(),
            pod: "web".into(),
            pod_uid: "u".into(),
            name: "web".into(),
            id: "containerd://a1".into(),
            image: None,
            image_digest: None,
        });
        let verdict = judge(&change, "alice", "n1", &control, &drift)
            .await
            .unwrap();
        task.await.unwrap();
        assert_eq!(
            verdict.outcome,
            ApprovalOutcome::Applied,
            "{}",
            verdict.message
        );
        assert!(
            verdict.message.contains("for that container only"),
            "{}",
            verdict.message
        );
        assert!(
            asked.try_recv().is_err(),
            "the host's baseline is not asked"
        );
    }
}
