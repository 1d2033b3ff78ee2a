//! End to end: real `kube-fim-agent run` processes, one per simulated node
//! (its own host root and Node object), logged in as the kube-fim-agent
//! ServiceAccount, report host file changes into the real API server.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube_fim_crds::{Attribute, DetectionSource, FileIntegrityNode, FileIntegrityPolicy};
use kube_fim_e2e::fleet::{Fleet, describe, entry, names};
use kube_fim_e2e::{client, eventually, metric, unique_name};

/// A mutation of a host file, with the change it must produce.
type Step<'a> = (&'a str, Box<dyn Fn() + 'a>);

const READY: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(20);

fn sorted(v: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = v.into_iter().collect();
    v.sort();
    v
}

async fn wait_changes(fleet: &Fleet, node: &str, want: &[&str]) -> Vec<kube_fim_crds::FileChange> {
    let want = sorted(want.iter().map(|s| s.to_string()));
    eventually(&format!("changes {want:?} on {node}"), SEEN, || async {
        let changes = fleet.changes(node).await;
        let got = sorted(changes.iter().map(describe));
        if got == want {
            Ok(changes)
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn changes_on_one_node_are_reported_for_that_node_only_with_before_and_after() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 2).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    for n in &mut fleet.nodes {
        n.start_agent();
    }
    let (a, b) = (fleet.nodes[0].name.clone(), fleet.nodes[1].name.clone());
    fleet.wait_ready(&a, &policy, READY).await;
    fleet.wait_ready(&b, &policy, READY).await;
    assert!(
        fleet.changes(&a).await.is_empty(),
        "a baseline reports nothing"
    );

    // Modify, add, remove, chmod on node A, timing each from write to object.
    let node = &fleet.nodes[0];
    let mut latencies = Vec::new();
    let api: Api<kube_fim_crds::FileChange> = Api::all(client.clone());
    let steps: Vec<Step> = vec![
        (
            "Modified /etc/hosts",
            Box::new(|| {
                std::fs::write(node.host("/etc/hosts"), "127.0.0.1 localhost evil\n").unwrap()
            }),
        ),
        (
            "Added /etc/new.conf",
            Box::new(|| std::fs::write(node.host("/etc/new.conf"), "new=1\n").unwrap()),
        ),
        (
            "Removed /etc/old.conf",
            Box::new(|| std::fs::remove_file(node.host("/etc/old.conf")).unwrap()),
        ),
        (
            "Modified /etc/passwd",
            Box::new(|| {
                std::fs::set_permissions(
                    node.host("/etc/passwd"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .unwrap()
            }),
        ),
    ];
    for (want, step) in &steps {
        let start = Instant::now();
        step();
        eventually(want, SEEN, || async {
            let list = api
                .list(&ListParams::default().fields(&format!("spec.node={a}")))
                .await
                .map_err(|e| e.to_string())?;
            if list.items.iter().any(|c| describe(c) == *want) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        })
        .await;
        latencies.push(start.elapsed());
    }
    drop(steps);
    // More samples for the latency figure: twenty more files, one at a time.
    for i in 0..20 {
        let path = format!("/etc/ssh/latency-{i}.conf");
        let start = Instant::now();
        std::fs::write(fleet.nodes[0].host(&path), format!("{i}\n")).unwrap();
        let want = format!("Added {path}");
        eventually(&want, SEEN, || async {
            let list = api
                .list(&ListParams::default().fields(&format!("spec.node={a}")))
                .await
                .map_err(|e| e.to_string())?;
            if list.items.iter().any(|c| describe(c) == want) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        })
        .await;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "write → FileChange visible in the API (debounce 200 ms): p50 {:?}, p99 {:?}, max {:?} over {} changes",
        pct(50),
        pct(99),
        latencies[latencies.len() - 1],
        latencies.len()
    );
    let mut expected: Vec<String> = vec![
        "Modified /etc/hosts".into(),
        "Added /etc/new.conf".into(),
        "Removed /etc/old.conf".into(),
        "Modified /etc/passwd".into(),
    ];
    expected.extend((0..20).map(|i| format!("Added /etc/ssh/latency-{i}.conf")));
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    let changes = wait_changes(&fleet, &a, &expected).await;
    assert!(
        fleet.changes(&b).await.is_empty(),
        "nothing reported for node B"
    );

    let by = |d: &str| changes.iter().find(|c| describe(c) == d).unwrap().clone();
    let hosts = by("Modified /etc/hosts");
    assert!(
        hosts.spec.changed_attributes.contains(&Attribute::Hash),
        "{:?}",
        hosts.spec.changed_attributes
    );
    assert!(hosts.spec.changed_attributes.contains(&Attribute::Size));
    let before = hosts.spec.before.clone().unwrap();
    let after = hosts.spec.after.clone().unwrap();
    assert_eq!(before.size, Some(20));
    assert_eq!(after.size, Some(25));
    assert_eq!(
        before.hash.as_deref(),
        Some(blake3::hash(b"127.0.0.1 localhost\n").to_hex().as_str())
    );
    assert_eq!(
        after.hash.as_deref(),
        Some(
            blake3::hash(b"127.0.0.1 localhost evil\n")
                .to_hex()
                .as_str()
        )
    );
    assert_eq!(hosts.spec.policy, policy);
    assert_eq!(hosts.spec.entry, "etc");
    assert!(matches!(
        hosts.spec.source,
        DetectionSource::Realtime | DetectionSource::Scan
    ));

    let passwd = by("Modified /etc/passwd");
    assert_eq!(
        passwd.spec.changed_attributes,
        vec![Attribute::Mode],
        "chmod changes the mode only"
    );
    assert_eq!(passwd.spec.before.unwrap().mode.as_deref(), Some("0644"));
    assert_eq!(passwd.spec.after.unwrap().mode.as_deref(), Some("0600"));
    assert!(by("Added /etc/new.conf").spec.before.is_none());
    assert!(by("Removed /etc/old.conf").spec.after.is_none());

    // Labels filter, and an Event points at each change.
    let labelled = api
        .list(&ListParams::default().labels(&format!(
            "fim.kube-fim.io/node={a},fim.kube-fim.io/category=Modified"
        )))
        .await
        .unwrap();
    assert_eq!(labelled.items.len(), 2);
    // Events aggregate them: one per category on this node for the policy,
    // whose series counts every change of that category.
    let mut wanted: BTreeMap<String, i32> = BTreeMap::new();
    for c in &changes {
        *wanted
            .entry(format!("File{}", c.spec.category.as_str()))
            .or_default() += 1;
    }
    eventually(
        "Event series counting the changes",
        // The agent writes a series' count at most every 30 s.
        SEEN + Duration::from_secs(30),
        || async {
            let events = Api::<Event>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut counted: BTreeMap<String, i32> = BTreeMap::new();
            let mut events_of = 0;
            for e in events.items.iter().filter(|e| {
                e.reporting_instance.as_deref() == Some(a.as_str())
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                        == Some("FileIntegrityPolicy")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy.as_str())
            }) {
                events_of += 1;
                *counted.entry(e.reason.clone().unwrap_or_default()).or_default() +=
                    e.series.as_ref().map_or(1, |s| s.count);
            }
            if counted == wanted && events_of == wanted.len() {
                Ok(())
            } else {
                Err(format!(
                    "{events_of} Events counting {counted:?}, want one per category counting {wanted:?}"
                ))
            }
        },
    )
    .await;
    let first = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| {
            e.reporting_instance.as_deref() == Some(a.as_str())
                && e.reason.as_deref() == Some("FileRemoved")
        })
        .expect("the FileRemoved Event");
    assert_eq!(
        first.note.as_deref(),
        Some(
            format!(
                "/etc/old.conf removed on node {a} (policy {policy}, entry etc, {:?}) — the first \
                 of the files removed under policy {policy} on node {a} this Event's series counts",
                by("Removed /etc/old.conf").spec.source
            )
            .as_str()
        )
    );
    assert_eq!(
        first.related.and_then(|r| r.name),
        Some(by("Removed /etc/old.conf").name_any()),
        "the Event relates to the first change it counts"
    );

    // The agent's metrics count them.
    let text = fleet.nodes[0].metrics().expect("agent /metrics");
    let modified = metric(
        &text,
        &format!(
            "kube_fim_agent_changes_total{{category=\"Modified\",node=\"{a}\",policy=\"{policy}\"}}"
        ),
    );
    assert_eq!(modified, Some(2.0), "{text}");
    fleet.cleanup().await;
}

#[tokio::test]
async fn a_change_made_while_the_agent_was_down_is_reported_at_start() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    fleet.nodes[0].kill_agent();
    std::fs::write(
        fleet.nodes[0].host("/etc/ssh/sshd_config"),
        "PermitRootLogin yes\n",
    )
    .unwrap();
    fleet.nodes[0].start_agent();
    let changes = wait_changes(&fleet, &a, &["Modified /etc/ssh/sshd_config"]).await;
    assert_eq!(changes[0].spec.source, DetectionSource::Startup);
    // Nothing else: untouched files are not reported as Added after a restart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.changes(&a).await.len(), 1);
    fleet.cleanup().await;
}

#[tokio::test]
async fn a_policy_edit_takes_effect_without_restarting_the_agent() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-p");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc/hosts", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    let pid = fleet.nodes[0].agent.as_ref().unwrap().child.id();

    // /usr/bin is not watched yet.
    std::fs::write(fleet.nodes[0].host("/usr/bin/tool"), "changed before\n").unwrap();
    let api: Api<FileIntegrityPolicy> = Api::all(client.clone());
    let mut p = api.get(&policy).await.unwrap();
    p.spec.paths.push(entry("bin", "/usr/bin", true));
    api.replace(&policy, &PostParams::default(), &p)
        .await
        .unwrap();
    eventually("the new generation applied", READY, || async {
        let r = Api::<FileIntegrityNode>::all(client.clone())
            .get(&a)
            .await
            .map_err(|e| e.to_string())?;
        let s = r.status.unwrap_or_default();
        let entry = s.policies.iter().find(|e| e.policy == policy).cloned();
        match entry {
            Some(e)
                if e.observed_generation == Some(2)
                    && e.phase == kube_fim_crds::NodePolicyPhase::Ready =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        fleet.changes(&a).await.is_empty(),
        "a new entry is baselined, not reported as Added"
    );
    std::fs::write(fleet.nodes[0].host("/usr/bin/tool"), "changed after\n").unwrap();
    wait_changes(&fleet, &a, &["Modified /usr/bin/tool"]).await;
    assert_eq!(
        fleet.nodes[0].agent.as_ref().unwrap().child.id(),
        pid,
        "same agent process"
    );
    assert!(fleet.nodes[0].agent.as_mut().unwrap().running());
    fleet.cleanup().await;
}

#[tokio::test]
async fn two_policies_on_one_node_share_the_work_and_each_gets_its_changes() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let (p1, p2) = (format!("{suite}-one"), format!("{suite}-two"));
    // A big file both policies watch: hashed once, not twice.
    let big = vec![7u8; 8 << 20];
    std::fs::write(fleet.nodes[0].host("/etc/big.bin"), &big).unwrap();
    fleet
        .create_policy(&fleet.policy(&p1, vec![entry("etc", "/etc", true)]))
        .await;
    fleet
        .create_policy(&fleet.policy(&p2, vec![entry("big", "/etc/big.bin", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &p1, READY).await;
    fleet.wait_ready(&a, &p2, READY).await;
    let text = fleet.nodes[0].metrics().unwrap();
    let hashed = metric(
        &text,
        &format!("kube_fim_agent_bytes_hashed_total{{node=\"{a}\"}}"),
    )
    .unwrap();
    assert!(hashed >= big.len() as f64, "{hashed}");
    assert!(
        hashed < 2.0 * big.len() as f64,
        "the shared file was hashed once: {hashed} bytes"
    );

    std::fs::write(fleet.nodes[0].host("/etc/big.bin"), b"small now").unwrap();
    let changes = eventually("one change per policy", SEEN, || async {
        let c = fleet.changes(&a).await;
        let policies = sorted(
            c.iter()
                .map(|c| format!("{} {}", c.spec.policy, describe(c))),
        );
        if policies.len() == 2 {
            Ok(policies)
        } else {
            Err(format!("{policies:?}"))
        }
    })
    .await;
    assert_eq!(
        changes,
        [
            format!("{p1} Modified /etc/big.bin"),
            format!("{p2} Modified /etc/big.bin")
        ]
    );
    fleet.cleanup().await;
}

/// A storm past the policy's cap is deferred and paced, never folded: a
/// `ChangeStorm` Warning Event and the storm metrics say so while it lasts.
/// The agent killed (SIGKILL) in the middle of it and started again: every
/// change of the storm ends as exactly one FileChange of its own, the node's
/// numbers contiguous and none given twice.
#[tokio::test]
async fn a_change_storm_is_paced_and_survives_a_crash_with_every_change_reported_once() {
    const CAP: u32 = 30;
    const STORM: usize = 80;
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-pkg");
    let dir = fleet.nodes[0].host("/usr/lib/pkg");
    std::fs::create_dir_all(&dir).unwrap();
    let mut p = fleet.policy(&policy, vec![entry("pkg", "/usr/lib/pkg", true)]);
    p.spec.max_changes_per_node_per_minute = CAP;
    fleet.create_policy(&p).await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    for i in 0..STORM {
        std::fs::write(dir.join(format!("lib{i:03}.so")), format!("{i}")).unwrap();
    }
    // The cap at once, then one every 60 / CAP = 2 s: some paced ones, then
    // the crash, with most still deferred in the node's queue.
    eventually(
        "the cap and a few paced reports",
        Duration::from_secs(60),
        || async {
            let n = fleet.changes(&a).await.len();
            (n >= CAP as usize + 3).then_some(()).ok_or(format!("{n}"))
        },
    )
    .await;
    let text = fleet.nodes[0].metrics().unwrap();
    let deferred = metric(
        &text,
        &format!("kube_fim_agent_reports_deferred{{node=\"{a}\",policy=\"{policy}\"}}"),
    )
    .unwrap_or(0.0);
    assert!(deferred > 0.0, "no report deferred: {text}");
    let storms = metric(
        &text,
        &format!("kube_fim_agent_change_storms_total{{node=\"{a}\",policy=\"{policy}\"}}"),
    )
    .unwrap_or(0.0);
    assert!(storms >= 1.0, "{text}");
    eventually(
        "a ChangeStorm warning naming the entry",
        Duration::from_secs(30),
        || async {
            let events = Api::<Event>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            events
                .items
                .iter()
                .any(|e| {
                    let note = e.note.as_deref().unwrap_or("");
                    e.reason.as_deref() == Some("ChangeStorm")
                        && e.type_.as_deref() == Some("Warning")
                        && note.contains(&a)
                        && note.contains("entry pkg")
                })
                .then_some(())
                .ok_or_else(|| format!("{} events, none of them", events.items.len()))
        },
    )
    .await;
    let before_crash = fleet.changes(&a).await.len();
    fleet.nodes[0].kill_agent();
    fleet.nodes[0].start_agent();

    let changes = eventually(
        "every change of the storm reported",
        Duration::from_secs(150),
        || async {
            let c = fleet.changes(&a).await;
            if c.len() >= STORM {
                Ok(c)
            } else {
                Err(format!("{} of {STORM}", c.len()))
            }
        },
    )
    .await;
    // Nothing more comes: no duplicate after the restart.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let changes = {
        let again = fleet.changes(&a).await;
        assert_eq!(again.len(), changes.len(), "more FileChanges came");
        again
    };
    eprintln!(
        "storm of {STORM} at a cap of {CAP}: {before_crash} delivered before the crash, {} in all",
        changes.len()
    );
    let paths = sorted(changes.iter().map(describe));
    let want = sorted((0..STORM).map(|i| format!("Added /usr/lib/pkg/lib{i:03}.so")));
    assert_eq!(paths, want, "each change exactly once");
    let mut numbers: Vec<u64> = changes.iter().map(|c| c.spec.sequence.unwrap()).collect();
    numbers.sort_unstable();
    let first = numbers[0];
    assert_eq!(
        numbers,
        (first..first + STORM as u64).collect::<Vec<_>>(),
        "the node's numbers, each once and contiguous"
    );
    fleet.cleanup().await;
}

#[tokio::test]
async fn a_baseline_edited_on_the_node_is_detected_at_start() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    fleet.nodes[0].kill_agent();

    // Someone with root on the node changes a file and rewrites the content
    // hash the baseline holds for it to match.
    let passwd = fleet.nodes[0].host("/etc/passwd");
    // (The store keeps a content hash as its 32 bytes.)
    let recorded = blake3::hash(&std::fs::read(&passwd).unwrap());
    let evil = "root:x:0:0::/root:/bin/sh\nevil:x:0:0::/:/bin/sh\n";
    std::fs::write(&passwd, evil).unwrap();
    let forged = blake3::hash(evil.as_bytes());
    let state = fleet.nodes[0].state.clone();
    let tampered = tamper_baseline(&state, recorded.as_bytes(), forged.as_bytes());
    assert!(
        tampered,
        "found a baseline file to edit under {}",
        state.display()
    );

    fleet.nodes[0].start_agent();
    // The digest recomputed from the records no longer matches the cluster's
    // (BaselineTampered); after an unclean stop the store's own checksums
    // catch the edit first (BaselineUnreadable). Either is an alarm.
    eventually("a baseline alarm", SEEN, || async {
        let events = Api::<Event>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        events
            .items
            .iter()
            .find(|e| {
                matches!(
                    e.reason.as_deref(),
                    Some("BaselineTampered" | "BaselineUnreadable")
                ) && e.type_.as_deref() == Some("Warning")
                    && e.note.as_deref().unwrap_or("").contains(&a)
            })
            .map(|_| ())
            .ok_or_else(|| "no event".to_string())
    })
    .await;
    let text = eventually("the tamper metric", SEEN, || async {
        let t = fleet.nodes[0].metrics().ok_or("no metrics")?;
        if metric(
            &t,
            &format!("kube_fim_agent_baseline_tampered{{node=\"{a}\"}}"),
        ) == Some(1.0)
        {
            Ok(t)
        } else {
            Err(t)
        }
    })
    .await;
    assert!(!text.is_empty());
    fleet.cleanup().await;
}

/// The FileChange `name` once the agent has answered its approval (set an
/// outcome).
async fn answered(api: &Api<kube_fim_crds::FileChange>, name: &str) -> kube_fim_crds::FileChange {
    eventually("the agent answering the approval", SEEN, || async {
        let c = api.get(name).await.map_err(|e| e.to_string())?;
        match c.status.as_ref().and_then(|s| s.outcome) {
            Some(_) => Ok(c),
            None => Err(format!("{:?}", c.status)),
        }
    })
    .await
}

/// Edits the agent's baseline on disk the way an intruder would: replaces
/// `from` with `to` (same length) wherever it is in a baseline file of
/// `state`, in place; whether anything was replaced.
fn tamper_baseline(state: &std::path::Path, from: &[u8], to: &[u8]) -> bool {
    let mut edited = false;
    for entry in walk(state) {
        let name = entry
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if name.starts_with("baseline") && entry.is_file() {
            let mut bytes = std::fs::read(&entry).unwrap();
            let mut i = 0;
            while let Some(at) = bytes[i..].windows(from.len()).position(|w| w == from) {
                bytes[i + at..i + at + to.len()].copy_from_slice(to);
                i += at + to.len();
                edited = true;
            }
            std::fs::write(&entry, bytes).unwrap();
        }
    }
    edited
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_deleted_policy_stops_reporting_and_leaves_its_evidence() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.1 x\n").unwrap();
    let before = wait_changes(&fleet, &a, &["Modified /etc/hosts"]).await;
    assert!(
        before[0].owner_references().is_empty(),
        "a change is owned by nothing the garbage collector could delete it with"
    );

    Api::<FileIntegrityPolicy>::all(client.clone())
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the agent forgets the policy", SEEN, || async {
        let r = Api::<FileIntegrityNode>::all(client.clone())
            .get(&a)
            .await
            .map_err(|e| e.to_string())?;
        let served: Vec<String> = r
            .status
            .unwrap_or_default()
            .policies
            .into_iter()
            .map(|p| p.policy)
            .collect();
        if served.is_empty() {
            Ok(())
        } else {
            Err(format!("{served:?}"))
        }
    })
    .await;
    // Evidence outlives the policy (evidence: Retain, the default).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(names(&fleet.changes(&a).await), names(&before));
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.2 y\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        names(&fleet.changes(&a).await),
        names(&before),
        "no report for a deleted policy"
    );
    fleet.cleanup().await;
}

#[tokio::test]
async fn approving_a_change_makes_the_approved_state_the_baseline() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.9.9.9 expected\n").unwrap();
    let changes = wait_changes(&fleet, &a, &["Modified /etc/hosts"]).await;
    let name = changes[0].name_any();
    // The approver's gesture: a recorded approval in the change's status.
    kube_fim_e2e::approve(&client, &name, "expected hosts entry")
        .await
        .unwrap();
    let api: Api<kube_fim_crds::FileChange> = Api::all(client.clone());
    let answered = eventually("the agent applying the approval", SEEN, || async {
        let c = api.get(&name).await.map_err(|e| e.to_string())?;
        match c.status.clone().and_then(|s| s.baseline_updated_time) {
            Some(_) => Ok(c),
            None => Err(format!("{:?}", c.status)),
        }
    })
    .await;
    let status = answered.status.unwrap();
    assert_eq!(
        status.outcome,
        Some(kube_fim_crds::ApprovalOutcome::Applied)
    );
    assert_eq!(
        status.approval.unwrap().reason.as_deref(),
        Some("expected hosts entry"),
        "the approval record survives the agent's answer"
    );

    // The next change is measured against the approved state.
    std::fs::set_permissions(
        fleet.nodes[0].host("/etc/hosts"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let later = eventually("a change relative to the new baseline", SEEN, || async {
        let c = fleet.changes(&a).await;
        c.into_iter()
            .find(|c| c.name_any() != name)
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert_eq!(later.spec.changed_attributes, vec![Attribute::Mode]);
    assert_eq!(
        later.spec.before.unwrap().hash.as_deref(),
        Some(blake3::hash(b"10.9.9.9 expected\n").to_hex().as_str()),
        "before is the approved content"
    );
    fleet.cleanup().await;
}

#[tokio::test]
async fn an_approval_of_a_state_the_file_has_left_approves_nothing() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    std::fs::write(fleet.nodes[0].host("/etc/sudoers"), "admin ALL\n").unwrap();
    let seen = wait_changes(&fleet, &a, &["Added /etc/sudoers"]).await;
    let name = seen[0].name_any();
    // While the agent is down, root edits the file again; then an approver
    // approves what they saw.
    fleet.nodes[0].kill_agent();
    std::fs::write(
        fleet.nodes[0].host("/etc/sudoers"),
        "ALL ALL=(ALL) NOPASSWD: ALL\n",
    )
    .unwrap();
    kube_fim_e2e::approve(&client, &name, "new admin")
        .await
        .unwrap();
    fleet.nodes[0].start_agent();

    let api: Api<kube_fim_crds::FileChange> = Api::all(client.clone());
    let answered = answered(&api, &name).await;
    let status = answered.status.unwrap();
    assert_eq!(
        status.outcome,
        Some(kube_fim_crds::ApprovalOutcome::Superseded)
    );
    assert!(status.baseline_updated_time.is_none(), "nothing approved");
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("no longer is in the approved state"),
        "{message}"
    );
    // The present state is a change of its own, still unapproved.
    let present = blake3::hash(b"ALL ALL=(ALL) NOPASSWD: ALL\n")
        .to_hex()
        .to_string();
    let newer = eventually("the present state reported", SEEN, || async {
        fleet
            .changes(&a)
            .await
            .into_iter()
            .find(|c| {
                c.spec.after.as_ref().and_then(|x| x.hash.as_deref()) == Some(present.as_str())
            })
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert!(newer.approval().is_none());
    assert!(
        message.contains(&newer.name_any()) || message.contains("reported already"),
        "{message}"
    );
    fleet.cleanup().await;
}

#[tokio::test]
async fn an_approval_of_a_path_the_node_does_not_monitor_approves_nothing() {
    let client = client().await;
    let suite = unique_name("e2e");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;
    let nodes: Api<FileIntegrityNode> = Api::all(client.clone());
    let baseline = || async {
        let s = nodes.get(&a).await.map_err(|e| e.to_string())?.status;
        let s = s.ok_or("no status yet")?;
        match s.baseline_digest {
            Some(d) => Ok((d, s.entries)),
            None => Err("no baseline digest yet".to_string()),
        }
    };
    let before = eventually("the node's baseline digest", SEEN, baseline).await;

    // A change of a file outside every served entry, approved in the very
    // state the file is in: still nothing this node monitors.
    let tool = "/opt/tool";
    std::fs::create_dir_all(fleet.nodes[0].host("/opt")).unwrap();
    std::fs::write(fleet.nodes[0].host(tool), "#!/bin/sh\n").unwrap();
    let name = format!("{a}-unmonitored");
    let mut fc = kube_fim_e2e::ChangeFixture::new(&name, &a, &policy)
        .path(tool)
        .build();
    fc.spec.after = Some(kube_fim_crds::FileAttributes {
        hash: Some(blake3::hash(b"#!/bin/sh\n").to_hex().to_string()),
        ..kube_fim_crds::FileAttributes::default()
    });
    let api: Api<kube_fim_crds::FileChange> = Api::all(client.clone());
    api.create(&PostParams::default(), &fc).await.unwrap();
    kube_fim_e2e::approve(&client, &name, "vendor tool")
        .await
        .unwrap();

    let answered = answered(&api, &name).await;
    let status = answered.status.unwrap();
    assert_eq!(
        status.outcome,
        Some(kube_fim_crds::ApprovalOutcome::NotMonitored)
    );
    assert!(status.baseline_updated_time.is_none(), "nothing approved");
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains(&format!("{tool} is not monitored on {a} by entry ")),
        "{message}"
    );
    assert_eq!(
        status.approval.unwrap().reason.as_deref(),
        Some("vendor tool"),
        "the approval record survives the agent's answer"
    );
    // Nothing else changed: no report, the same baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(names(&fleet.changes(&a).await), [name]);
    assert_eq!(
        eventually("the node's baseline digest", SEEN, baseline).await,
        before
    );
    fleet.cleanup().await;
}
