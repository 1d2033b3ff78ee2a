//! A write undone within the debounce window, end to end: a real agent with a
//! node-bound token, the real API server. Root appends a line to a monitored
//! file and puts content and mtime back before the window ends; the rescan
//! alone would find the baseline. The cluster holds a FileChange marked
//! restored, with the state the file was in, numbered in the node's chain.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::Duration;

use kube::api::Api;
use kube_fim_crds::{ChangeCategory, FileIntegrityNode};
use kube_fim_e2e::fleet::{Fleet, entry};
use kube_fim_e2e::{client, eventually, unique_name};

const READY: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_write_undone_within_the_debounce_window_is_a_restored_filechange_in_the_chain() {
    let client = client().await;
    let suite = unique_name("transient");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    let mut p = fleet.policy(&policy, vec![entry("etc", "/etc", true)]);
    // Long enough that the write and its undoing fall in one window.
    p.spec.debounce = "2s".to_string();
    fleet.create_policy(&p).await;
    fleet.nodes[0].start_agent();
    let node = fleet.nodes[0].name.clone();
    fleet.wait_ready(&node, &policy, READY).await;

    let passwd = fleet.nodes[0].host("/etc/passwd");
    let original = std::fs::read(&passwd).unwrap();
    let mtime = std::fs::metadata(&passwd).unwrap().modified().unwrap();
    let line = b"mallory:x:0:0::/root:/bin/bash\n";
    let mut evil = original.clone();
    evil.extend_from_slice(line);
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&passwd)
            .unwrap();
        f.write_all(line).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(&passwd, &original).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&passwd)
        .unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);

    let change = eventually("a FileChange of /etc/passwd", SEEN, || async {
        let changes = fleet.changes(&node).await;
        match changes.iter().find(|c| c.spec.path == "/etc/passwd") {
            Some(c) => Ok(c.clone()),
            None => Err(format!("{} changes", changes.len())),
        }
    })
    .await;
    assert_eq!(change.spec.category, ChangeCategory::Modified);
    assert_eq!(change.spec.restored, Some(true), "{:?}", change.spec);
    let after = change.spec.after.as_ref().and_then(|a| a.hash.clone());
    assert_eq!(
        after,
        Some(blake3::hash(&evil).to_hex().to_string()),
        "the transient state"
    );
    let seq = change.spec.sequence.expect("numbered");

    // In the chain: the node's published head is past it, and every number
    // below the head is a stored FileChange of the node (nothing undelivered).
    let records: Api<FileIntegrityNode> = Api::all(client.clone());
    eventually("the chain covers the change", SEEN, || async {
        let status = records
            .get(&node)
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        let head = status.sequence.unwrap_or(0);
        let stored: BTreeSet<u64> = fleet
            .changes(&node)
            .await
            .iter()
            .filter_map(|c| c.spec.sequence)
            .collect();
        let missing: Vec<u64> = (0..head).filter(|n| !stored.contains(n)).collect();
        if head > seq && missing.is_empty() && status.undelivered.unwrap_or_default().is_empty() {
            Ok(())
        } else {
            Err(format!("head {head}, missing {missing:?}"))
        }
    })
    .await;
    let all = fleet.changes(&node).await;
    assert_eq!(
        all.len(),
        1,
        "one change: {:?}",
        all.iter().map(|c| &c.spec).collect::<Vec<_>>()
    );
    fleet.cleanup().await;
}
