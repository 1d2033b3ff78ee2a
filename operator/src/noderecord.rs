//! The alarms the operator records on a node's FileIntegrityNode: storms
//! (`status.storms`, [`crate::storm`]) and floods (`status.floods`,
//! [`crate::flood`]). Evidence the sinks pick up and the node cannot erase,
//! so written the same way for both:
//!
//! - merged into the list the record holds as read from the API just before
//!   the write, never a list built from the cache (which may not show a
//!   write of a moment ago yet, and is empty while the operator starts);
//! - server-side applied under a field manager of each list's own, so the
//!   chain verifier's and the agent's writes leave it alone (admission
//!   refuses the agent's writes of it);
//! - kept until written ([`Pending`]): a node without a record yet, or an API
//!   outage, only delays it.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube_fim_crds::{
    ChangeFloodRecord, ChangeStormRecord, FileIntegrityNode, FileIntegrityNodeStatus,
};
use serde::Serialize;
use tracing::{debug, warn};

use crate::context::Context;
use crate::{flood, storm};

/// One kind of alarm a node's record keeps a list of.
pub trait Recorded: Clone + PartialEq + Serialize {
    /// The list's field in `status`.
    const FIELD: &'static str;
    /// The field manager of that field.
    const FIELD_MANAGER: &'static str;
    /// The list as the record holds it.
    fn stored(status: &FileIntegrityNodeStatus) -> &[Self];
    /// `existing` with every record of `found` added (or extending the one
    /// it continues).
    fn merged(existing: &[Self], found: &[Self]) -> Vec<Self>;
}

impl Recorded for ChangeStormRecord {
    const FIELD: &'static str = "storms";
    const FIELD_MANAGER: &'static str = "kube-fim-operator-storms";
    fn stored(status: &FileIntegrityNodeStatus) -> &[Self] {
        &status.storms
    }
    fn merged(existing: &[Self], found: &[Self]) -> Vec<Self> {
        storm::merged(existing, found)
    }
}

impl Recorded for ChangeFloodRecord {
    const FIELD: &'static str = "floods";
    const FIELD_MANAGER: &'static str = "kube-fim-operator-floods";
    fn stored(status: &FileIntegrityNodeStatus) -> &[Self] {
        &status.floods
    }
    fn merged(existing: &[Self], found: &[Self]) -> Vec<Self> {
        flood::merged(existing, found)
    }
}

fn stored<R: Recorded>(record: &FileIntegrityNode) -> Vec<R> {
    record
        .status
        .as_ref()
        .map(|s| R::stored(s).to_vec())
        .unwrap_or_default()
}

/// What a write changed on a node's record: the list before and after.
pub struct Written<R> {
    pub before: Vec<R>,
    pub after: Vec<R>,
}

/// Records `found` on `node`'s FileIntegrityNode, merged into the list it
/// holds as read just now. `None` when nothing needed writing (already
/// recorded, or the node is gone with its record); gives `found` back when
/// it could not be written.
pub async fn record<R: Recorded>(
    ctx: &Context,
    node: &str,
    found: Vec<R>,
) -> Result<Option<Written<R>>, Vec<R>> {
    // Already recorded (found again): no request.
    if let Some(cached) = ctx
        .records
        .get(&ObjectRef::new(node))
        .map(|r| stored::<R>(&r))
        && R::merged(&cached, &found) == cached
    {
        return Ok(None);
    }
    let api: Api<FileIntegrityNode> = Api::all(ctx.client.clone());
    let before = match api.get(node).await {
        Ok(r) => stored::<R>(&r),
        // The node is gone, and so is its record (the fleet deletes it):
        // nothing left to record on; its FileChanges stay.
        Err(kube::Error::Api(e))
            if e.code == 404 && ctx.nodes.get(&ObjectRef::new(node)).is_none() =>
        {
            debug!(%node, field = R::FIELD, "alarm of a node that is gone: not recorded");
            return Ok(None);
        }
        Err(error) => {
            debug!(%node, field = R::FIELD, %error, "alarm not recorded yet: no FileIntegrityNode to read");
            return Err(found);
        }
    };
    let after = R::merged(&before, &found);
    if after == before {
        return Ok(None);
    }
    let patch = serde_json::json!({
        "apiVersion": "fim.kube-fim.io/v1alpha1",
        "kind": "FileIntegrityNode",
        "status": { R::FIELD: after },
    });
    let params = PatchParams::apply(R::FIELD_MANAGER).force();
    if let Err(error) = api.patch_status(node, &params, &Patch::Apply(&patch)).await {
        warn!(%node, field = R::FIELD, %error, "could not record the alarm on the node's FileIntegrityNode");
        return Err(found);
    }
    Ok(Some(Written { before, after }))
}

/// Alarms found but not yet on their nodes' records: per node, merged as
/// their records would be, so bounded as those are.
#[derive(Debug)]
pub struct Pending<R>(Mutex<HashMap<String, Vec<R>>>);

impl<R> Default for Pending<R> {
    fn default() -> Self {
        Pending(Mutex::new(HashMap::new()))
    }
}

impl<R: Recorded> Pending<R> {
    /// Adds `found` to `node`'s alarms to record.
    pub fn add(&self, node: &str, found: &[R]) {
        let mut nodes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mine = nodes.entry(node.to_string()).or_default();
        *mine = R::merged(mine, found);
    }

    /// The nodes with alarms to record, and their alarms, taken out.
    pub fn take(&self) -> Vec<(String, Vec<R>)> {
        let mut nodes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        nodes.drain().collect()
    }
}
