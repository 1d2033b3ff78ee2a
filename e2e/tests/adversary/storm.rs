//! Storm cover: a storm in one entry hides no change of another.

use super::*;

// --- issue 21, attack 1: storm cover (a storm in one entry hides nothing) ---
/// The numbers of `changes`, sorted; panics on a change without one.
fn numbers_of(changes: &[FileChange]) -> Vec<u64> {
    let mut n: Vec<u64> = changes
        .iter()
        .map(|c| {
            c.spec
                .sequence
                .unwrap_or_else(|| panic!("{} has no number", c.name_any()))
        })
        .collect();
    n.sort_unstable();
    n
}

/// 40 new files under `/etc/ssh` (entry `ssh`, cap 20 a minute), then one
/// line appended to `/etc/sudoers` (entry `sudoers`): the sudoers change is a
/// FileChange of its own within seconds, before the storm's deferred reports
/// are through, and every one of the 40 files gets its own FileChange in the
/// end, the node's numbers contiguous: nothing is only a count.
#[tokio::test]
async fn a_storm_in_one_entry_hides_no_change_of_another() {
    const CAP: u32 = 20;
    const STORM: usize = 40;
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    std::fs::write(fleet.nodes[0].host("/etc/sudoers"), "root ALL=(ALL) ALL\n").unwrap();
    let policy = format!("{suite}-etc");
    let mut p = fleet.policy(
        &policy,
        vec![
            entry("ssh", "/etc/ssh", true),
            entry("sudoers", "/etc/sudoers", false),
        ],
    );
    p.spec.max_changes_per_node_per_minute = CAP;
    fleet.create_policy(&p).await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    for i in 0..STORM {
        std::fs::write(
            fleet.nodes[0].host(&format!("/etc/ssh/junk-{i:02}.pub")),
            format!("ssh-ed25519 AAAA{i}\n"),
        )
        .unwrap();
    }
    let storm_seen = |c: &FileChange| c.spec.entry == "ssh";
    // The storm is past its cap on the node before the real change.
    eventually("the storm's first reports", SEEN, || async {
        let n = fleet
            .changes(&a)
            .await
            .iter()
            .filter(|c| storm_seen(c))
            .count();
        (n >= CAP as usize).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    let mut sudoers = std::fs::OpenOptions::new()
        .append(true)
        .open(fleet.nodes[0].host("/etc/sudoers"))
        .unwrap();
    std::io::Write::write_all(&mut sudoers, b"mallory ALL=(ALL) NOPASSWD: ALL\n").unwrap();
    drop(sudoers);
    let written = std::time::Instant::now();

    let named = wait_change(&fleet, &a, "Modified /etc/sudoers").await;
    let took = written.elapsed();
    let storm_then = fleet
        .changes(&a)
        .await
        .iter()
        .filter(|c| storm_seen(c))
        .count();
    eprintln!(
        "sudoers reported {took:?} after the write, as {} (sequence {:?}); {storm_then} of the storm's {STORM} reported by then",
        named.name_any(),
        named.spec.sequence
    );
    assert!(
        storm_then < STORM,
        "the storm was through before the sudoers change: no pacing to pass"
    );

    // Every file of the storm, each a FileChange of its own.
    let all = eventually(
        "every change of the storm reported on its own",
        Duration::from_secs(150),
        || async {
            let changes = fleet.changes(&a).await;
            let storm: Vec<&FileChange> = changes.iter().filter(|c| storm_seen(c)).collect();
            if storm.len() == STORM {
                Ok(changes)
            } else {
                Err(format!("{} of {STORM}", storm.len()))
            }
        },
    )
    .await;
    let mut paths: Vec<String> = all.iter().filter(|c| storm_seen(c)).map(describe).collect();
    paths.sort();
    let want: Vec<String> = (0..STORM)
        .map(|i| format!("Added /etc/ssh/junk-{i:02}.pub"))
        .collect();
    assert_eq!(paths, want);
    assert!(
        all.iter()
            .all(|c| c.spec.category != ChangeCategory::Summary),
        "a change represented by a count"
    );
    // One number each, none missing between the first and the last.
    let numbers = numbers_of(&all);
    assert_eq!(
        all.len(),
        STORM + 1,
        "{:?}",
        all.iter().map(describe).collect::<Vec<_>>()
    );
    let (first, last) = (numbers[0], numbers[numbers.len() - 1]);
    assert_eq!(
        numbers,
        (first..=last).collect::<Vec<u64>>(),
        "the node's numbers are not contiguous"
    );
    fleet.cleanup().await;
}
