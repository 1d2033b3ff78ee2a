//! Approvals: answers the approval of each of this node's FileChanges.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube_fim_crds::{ApprovalOutcome, ChangeCategory, FileChange};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::context::Context;
use crate::monitor::{Answer, Control};

/// An approver says that a change was expected (`status.approval`, which
/// the admission policy lets only holders of the approve verb write, in their
/// own name). The agent makes the approved state (`spec.after`) its baseline
/// only if the file is still in it; otherwise it approves nothing, reports the
/// present state as a new change, and says so on the approved one. A path no
/// policy served to this node covers approves nothing either, and says so.
/// Labels are not looked at: anyone with patch rights can set a label.
pub async fn run(
    ctx: Arc<Context>,
    control: mpsc::Sender<Control>,
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
    let mut stream = std::pin::pin!(watcher(api.clone(), wc).default_backoff().applied_objects());
    loop {
        let change = tokio::select! {
            () = &mut shutdown => return,
            c = stream.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let answered = change.status.as_ref().is_some_and(|s| s.outcome.is_some());
        let Some(approval) = change.approval().filter(|_| !answered) else {
            continue;
        };
        let Some(verdict) = judge(&change, &approval.approved_by, &ctx.node, &control).await else {
            return;
        };
        let mut status =
            serde_json::json!({"outcome": verdict.outcome, "message": verdict.message});
        if verdict.outcome == ApprovalOutcome::Applied {
            status["baselineUpdatedTime"] = serde_json::json!(Time(Timestamp::now()));
        }
        let path = &change.spec.path;
        if let Err(error) = api
            .patch_status(
                &change.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await
        {
            warn!(%error, "could not write the outcome of an approval");
        } else {
            info!(%path, outcome = ?verdict.outcome, approver = %approval.approved_by, "approval answered");
        }
    }
}

/// What became of an approval, and why.
struct Verdict {
    outcome: ApprovalOutcome,
    message: String,
}

/// Asks the monitor to apply an approval of `change`; `None` when the
/// monitor is gone (stopping).
async fn judge(
    change: &FileChange,
    approver: &str,
    node: &str,
    control: &mpsc::Sender<Control>,
) -> Option<Verdict> {
    let path = &change.spec.path;
    if change.spec.category == ChangeCategory::Summary {
        return Some(Verdict {
            outcome: ApprovalOutcome::Superseded,
            message: format!(
                "a Summary stands for many files and approves none of them on {node}: approve their own changes"
            ),
        });
    }
    let (tx, rx) = oneshot::channel();
    let request = Control::Approve {
        key: path.clone(),
        after: change.spec.after.clone().map(Box::new),
        done: tx,
    };
    control.send(request).await.ok()?;
    let (outcome, message) = match rx.await.ok()? {
        Answer::Applied => (
            ApprovalOutcome::Applied,
            format!(
                "approved by {approver}: the approved state of {path} is the baseline on {node}"
            ),
        ),
        Answer::NotMonitored => (
            ApprovalOutcome::NotMonitored,
            format!(
                "{path} is not monitored on {node} by any served policy: nothing was approved; the baseline is unchanged"
            ),
        ),
        Answer::Superseded(names) => (
            ApprovalOutcome::Superseded,
            format!(
                "{path} on {node} no longer is in the approved state (spec.after): nothing was approved; {}",
                if names.is_empty() {
                    "its present state was reported already as a newer FileChange".to_string()
                } else {
                    format!("its present state is reported as {}", names.join(", "))
                }
            ),
        ),
    };
    Some(Verdict { outcome, message })
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
        let verdict = judge(&change, "alice", "n1", &control).await.unwrap();
        assert_eq!(verdict.outcome, ApprovalOutcome::Superseded);
        assert!(verdict.message.contains("approve their own changes"));
        assert!(asked.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_approval_of_a_state_the_file_left_names_the_newer_change() {
        let (control, mut asked) = mpsc::channel(1);
        let monitor = tokio::spawn(async move {
            let Some(Control::Approve { key, done, .. }) = asked.recv().await else {
                panic!("no approval asked");
            };
            assert_eq!(key, "/etc/passwd");
            let _ = done.send(Answer::Superseded(vec!["fc-newer".into()]));
        });
        let change = to_object(fixtures::change("/etc/passwd"), 0);
        let verdict = judge(&change, "alice", "n1", &control).await.unwrap();
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
        assert!(judge(&change, "alice", "n1", &control).await.is_none());
    }
}
