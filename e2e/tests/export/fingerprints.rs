//! Fingerprints a sink asks the agents for.

use super::*;

/// A sink asking for SHA-256 (`spec.fingerprints: [sha256]`): the operator
/// passes it to the agents (their DaemonSet's `--fingerprints`), a real agent
/// hashes the file it sees change with SHA-256 beside BLAKE3, and the sink
/// receives both fingerprints of the bytes the test wrote (OCSF
/// `file.hashes`: algorithm 3 SHA-256 and 99 BLAKE3).
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_files_sha256_reaches_the_sink_when_it_asks_for_it() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use kube_fim_e2e::fleet::{Fleet, entry};
    use sha2::Digest;

    ensure_export_rbac();
    let suite = unique_name("exp-sha");
    let _operator = Operator::start(&suite, &suite, &[]);
    let admin = client().await;
    let mut fleet = Fleet::new(admin.clone(), &suite, 1).await;
    let policy = fleet.policy(
        &format!("{suite}-p"),
        vec![entry("passwd", "/etc/passwd", false)],
    );
    fleet.create_policy(&policy).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.ndjson");
    let mut spec = FileChangeSinkSpec::with_file(path.to_str().unwrap());
    spec.fingerprints = vec![kube_fim_crds::Fingerprint::Sha256];
    let name = format!("{suite}-file");
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    // And an ECS sink: `file.hash.sha256`.
    let ecs_path = dir.path().join("evidence-ecs.ndjson");
    let mut ecs_spec = FileChangeSinkSpec::with_file(ecs_path.to_str().unwrap());
    ecs_spec.format = SinkFormat::Ecs;
    ecs_spec.fingerprints = vec![kube_fim_crds::Fingerprint::Sha256];
    let ecs_name = format!("{suite}-ecs");
    create_sink(&sink(&ecs_name, &suite, ecs_spec)).await;

    // The operator tells the agents, through the arguments it gives them.
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.clone(), "kube-fim");
    let arg = eventually(
        "the agents' DaemonSet asks for SHA-256",
        Duration::from_secs(60),
        || {
            let (daemonsets, ds) = (daemonsets.clone(), format!("{suite}-agent"));
            async move {
                let ds = daemonsets.get(&ds).await.map_err(|e| e.to_string())?;
                let args = ds
                    .spec
                    .and_then(|s| s.template.spec)
                    .and_then(|p| p.containers.into_iter().next())
                    .and_then(|c| c.args)
                    .unwrap_or_default();
                args.iter()
                    .find(|a| a.starts_with("--fingerprints="))
                    .cloned()
                    .ok_or(format!("{args:?}"))
            }
        },
    )
    .await;
    assert_eq!(arg, "--fingerprints=sha256");
    // This tier has no kubelet: the test starts the agent as the pod would.
    let node = fleet.nodes[0].name.clone();
    fleet.nodes[0].start_agent_with(std::slice::from_ref(&arg));
    fleet
        .wait_ready(
            &node,
            &policy.metadata.name.clone().unwrap(),
            Duration::from_secs(60),
        )
        .await;

    let content = b"root:x:0:0:root:/root:/bin/bash\nmallory:x:0:0::/root:/bin/sh\n";
    std::fs::write(fleet.nodes[0].host("/etc/passwd"), content).unwrap();
    let sha256 = format!("{:x}", sha2::Sha256::digest(content));
    let blake3 = blake3::hash(content).to_hex().to_string();
    let event = eventually(
        "the change with its SHA-256 in the sink",
        Duration::from_secs(90),
        || {
            let events = file_events(&path);
            let node = node.clone();
            async move {
                events
                    .into_iter()
                    .find(|e| {
                        e["device"]["hostname"] == node.as_str()
                            && e["file"]["path"] == "/etc/passwd"
                    })
                    .ok_or_else(|| "not yet".to_string())
            }
        },
    )
    .await;
    let hashes = event["file"]["hashes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        hashes.contains(
            &serde_json::json!({ "algorithm_id": 3, "algorithm": "SHA-256", "value": sha256 })
        ),
        "{event}"
    );
    assert!(
        hashes.contains(
            &serde_json::json!({ "algorithm_id": 99, "algorithm": "BLAKE3", "value": blake3 })
        ),
        "the SHA-256 and the BLAKE3 of the same bytes: {event}"
    );
    let ecs = eventually(
        "the change with its SHA-256 in the ECS sink",
        Duration::from_secs(60),
        || {
            let events = file_events(&ecs_path);
            let node = node.clone();
            async move {
                events
                    .into_iter()
                    .find(|e| {
                        e["host"]["name"] == node.as_str() && e["file"]["path"] == "/etc/passwd"
                    })
                    .ok_or_else(|| "not yet".to_string())
            }
        },
    )
    .await;
    assert_eq!(ecs["file"]["hash"]["sha256"], sha256.as_str(), "{ecs}");
    let stored = fleet.changes(&node).await;
    let after = stored
        .iter()
        .find(|c| c.spec.path == "/etc/passwd")
        .and_then(|c| c.spec.after.clone())
        .unwrap();
    assert_eq!(after.sha256.as_deref(), Some(sha256.as_str()));
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
    sinks
        .delete(&ecs_name, &DeleteParams::default())
        .await
        .unwrap();
    fleet.cleanup().await;
}
