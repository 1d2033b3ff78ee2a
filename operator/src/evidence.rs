//! What happens to a policy's FileChanges when the policy goes.
//!
//! FileChanges carry no owner reference (the agents may not set one), so the
//! garbage collector never deletes evidence along with its policy. A policy
//! with `evidence: Delete` carries the finalizer [`FINALIZER`]: when it is
//! deleted, the operator deletes its FileChanges, says so in an Event, and only
//! then lets the policy go. With `evidence: Retain` (the default) there is no
//! finalizer and the changes stay.

use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube_fim_crds::labels::{POLICY, label_value};
use kube_fim_crds::{Evidence, FileChange, FileIntegrityPolicy};
use tracing::info;

use crate::context::{Context, Error, publish};
use crate::retention;

/// Finalizer of policies whose evidence is deleted with them.
pub const FINALIZER: &str = "fim.kube-fim.io/evidence";

/// Keeps the finalizer in line with `spec.evidence`, and on deletion deletes the
/// policy's changes before releasing it. `Some(action)` when the policy is
/// being deleted (nothing else to reconcile).
pub async fn reconcile(
    policy: &FileIntegrityPolicy,
    ctx: &Context,
) -> Result<Option<Action>, Error> {
    let name = policy.name_any();
    let held = policy.finalizers().iter().any(|f| f == FINALIZER);
    if policy.metadata.deletion_timestamp.is_some() {
        if !held {
            return Ok(Some(Action::await_change()));
        }
        let changes: Api<FileChange> = Api::all(ctx.client.clone());
        let names = list(&changes, &name)
            .await
            .map_err(|source| Error::ListChanges {
                policy: name.clone(),
                source,
            })?;
        let pass = &names[..names.len().min(ctx.config.retention_max_per_pass)];
        let deleted = retention::delete(
            &changes,
            pass,
            ctx.config.retention_batch,
            ctx.config.retention_pause,
        )
        .await;
        if !deleted.is_empty() {
            info!(policy = %name, deleted = deleted.len(), "evidence: Delete");
            publish(
                policy,
                ctx,
                Event {
                    type_: EventType::Normal,
                    reason: "EvidenceDeleted".into(),
                    note: Some(retention::describe_deleted(
                        "the policy was deleted with evidence: Delete, so were its",
                        &deleted,
                    )),
                    action: "Delete".into(),
                    secondary: None,
                },
            )
            .await;
        }
        if deleted.len() < names.len() {
            return Ok(Some(Action::requeue(std::time::Duration::from_secs(2))));
        }
        set_finalizer(policy, ctx, false).await?;
        return Ok(Some(Action::await_change()));
    }
    match (policy.spec.evidence, held) {
        (Evidence::Delete, false) => set_finalizer(policy, ctx, true).await?,
        (Evidence::Retain, true) => set_finalizer(policy, ctx, false).await?,
        _ => {}
    }
    Ok(None)
}

/// Names of `policy`'s FileChanges, listed from the API server (paginated),
/// not taken from the operator's watch: the policy is released only once none
/// is left, and the watch may not have seen the latest yet. Once per deleted
/// policy, not per change.
async fn list(api: &Api<FileChange>, policy: &str) -> Result<Vec<String>, kube::Error> {
    let mut params = ListParams::default()
        .labels(&format!("{POLICY}={}", label_value(policy)))
        .limit(500);
    let mut names = Vec::new();
    loop {
        let page = api.list(&params).await?;
        names.extend(
            page.items
                .iter()
                .filter(|c| c.spec.policy == policy)
                .map(|c| c.name_any()),
        );
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(names)
}

/// Adds or removes [`FINALIZER`], other finalizers untouched. The
/// resourceVersion makes it a compare-and-swap: a concurrent change of the
/// list fails the patch and the reconcile retries.
async fn set_finalizer(policy: &FileIntegrityPolicy, ctx: &Context, on: bool) -> Result<(), Error> {
    let name = policy.name_any();
    let mut finalizers: Vec<String> = policy
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if on {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": policy.resource_version(),
    }});
    Api::<FileIntegrityPolicy>::all(ctx.client.clone())
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Finalizer {
            policy: name.clone(),
            source,
        })?;
    info!(policy = %name, on, "evidence finalizer");
    Ok(())
}
