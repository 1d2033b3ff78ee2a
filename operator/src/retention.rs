//! Retention: FileChange objects past a policy's age or count limit are deleted,
//! oldest first, in small paced batches so retention never floods the API server.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams};
use kube_fim_crds::FileChange;
use kube_fim_crds::labels::{ACKNOWLEDGED, POLICY, label_value};
use tracing::{debug, warn};

use crate::status::ChangeCounts;

/// One FileChange as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub created: Timestamp,
    pub acknowledged: bool,
}

/// Names to delete: everything older than `max_age`, then the oldest of the rest
/// until at most `max_count` remain.
pub fn select_for_deletion(
    mut items: Vec<Item>,
    max_age: Duration,
    max_count: usize,
    now: Timestamp,
) -> (Vec<String>, Vec<Item>) {
    items.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
    let mut doomed = Vec::new();
    let mut kept = Vec::new();
    for item in items {
        if now.duration_since(item.created).unsigned_abs() > max_age {
            doomed.push(item.name);
        } else {
            kept.push(item);
        }
    }
    if kept.len() > max_count {
        let excess = kept.len() - max_count;
        doomed.extend(kept.drain(..excess).map(|i| i.name));
    }
    (doomed, kept)
}

/// Counts of the kept changes for the policy status.
pub fn counts(kept: &[Item], now: Timestamp) -> ChangeCounts {
    let day = Duration::from_secs(24 * 3600);
    ChangeCounts {
        last_24h: kept
            .iter()
            .filter(|i| now.duration_since(i.created).unsigned_abs() <= day)
            .count() as i64,
        unacknowledged: kept.iter().filter(|i| !i.acknowledged).count() as i64,
    }
}

/// Lists a policy's FileChanges (metadata only, paginated).
pub async fn list(api: &Api<FileChange>, policy: &str) -> Result<Vec<Item>, kube::Error> {
    let mut params = ListParams::default()
        .labels(&format!("{POLICY}={}", label_value(policy)))
        .limit(500);
    let mut out = Vec::new();
    loop {
        let page = api.list_metadata(&params).await?;
        for obj in page.items {
            let Some(name) = obj.metadata.name else {
                continue;
            };
            let created = obj
                .metadata
                .creation_timestamp
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now);
            let acknowledged = obj
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ACKNOWLEDGED))
                .is_some_and(|v| v == "true");
            out.push(Item {
                name,
                created,
                acknowledged,
            });
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(out)
}

/// Deletes `names` in batches of `batch` (four requests in flight at most),
/// pausing `pause` between batches. Returns how many were deleted.
pub async fn delete(
    api: &Api<FileChange>,
    names: &[String],
    batch: usize,
    pause: Duration,
) -> usize {
    let mut deleted = 0;
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
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => debug!(%name, "already gone"),
                Err(error) => warn!(%name, %error, "retention could not delete a FileChange"),
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, age_secs: u64, now: Timestamp) -> Item {
        Item {
            name: name.into(),
            created: now - Duration::from_secs(age_secs),
            acknowledged: false,
        }
    }

    #[test]
    fn deletes_past_age_then_oldest_past_count() {
        let now = Timestamp::now();
        let items = vec![
            item("new", 10, now),
            item("old", 7200, now),
            item("mid", 100, now),
            item("older-mid", 200, now),
        ];
        let (doomed, kept) = select_for_deletion(items, Duration::from_secs(3600), 2, now);
        assert_eq!(doomed, ["old", "older-mid"]);
        let kept: Vec<_> = kept.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(kept, ["mid", "new"]);
    }

    #[test]
    fn nothing_to_delete_within_limits() {
        let now = Timestamp::now();
        let (doomed, kept) =
            select_for_deletion(vec![item("a", 1, now)], Duration::from_secs(60), 10, now);
        assert!(doomed.is_empty());
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn counts_last_day_and_unacknowledged() {
        let now = Timestamp::now();
        let mut acked = item("a", 10, now);
        acked.acknowledged = true;
        let kept = vec![acked, item("b", 10, now), item("c", 90_000, now)];
        assert_eq!(
            counts(&kept, now),
            ChangeCounts {
                last_24h: 2,
                unacknowledged: 2
            }
        );
    }
}
