//! The kube-fim API on a real API server: the CRDs install, `kubectl explain`
//! documents them, the API server accepts good policies and refuses bad ones with
//! a message naming the field (and the agent's Rust rules agree), and FileChange
//! objects show the printer columns users read.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube_fim_crds::policy::Attribute;
use kube_fim_crds::validate::policy_from_yaml;
use kube_fim_crds::{
    ChangeCategory, DetectionSource, FileAttributes, FileChange, FileChangeSpec,
    FileIntegrityPolicy,
};
use kube_fim_e2e::{client, ensure_crds, kubectl, kubectl_stdin, repo_root, unique_name};

#[tokio::test]
async fn crds_install_and_become_established() {
    ensure_crds();
    let crds: Api<CustomResourceDefinition> = Api::all(client().await);
    for (name, short, kind) in [
        (
            "fileintegritypolicies.fim.kube-fim.io",
            "fip",
            "FileIntegrityPolicy",
        ),
        ("filechanges.fim.kube-fim.io", "fc", "FileChange"),
    ] {
        let crd = crds.get(name).await.expect("CRD stored");
        let status = crd.status.expect("CRD has a status");
        let conditions = status.conditions.unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            let cond = conditions
                .iter()
                .find(|c| c.type_ == wanted)
                .unwrap_or_else(|| panic!("{name}: no {wanted} condition in {conditions:?}"));
            assert_eq!(cond.status, "True", "{name} {wanted}: {cond:?}");
        }
        let accepted = status.accepted_names.expect("accepted names");
        assert_eq!(accepted.kind, kind);
        assert_eq!(
            accepted.short_names.unwrap_or_default(),
            vec![short.to_string()]
        );
    }
    // kubectl discovers the short names and the category.
    let run = kubectl(["api-resources", "--api-group=fim.kube-fim.io", "-o", "wide"]);
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("fip"), "{}", run.stdout);
    assert!(run.stdout.contains("fc"), "{}", run.stdout);
    assert!(run.stdout.contains("fim"), "category fim: {}", run.stdout);
}

#[test]
fn kubectl_explain_shows_field_docs() {
    ensure_crds();
    let run = kubectl(["explain", "fileintegritypolicy.spec"]);
    assert!(run.success, "{}", run.stderr);
    for field in [
        "paths",
        "preset",
        "nodeSelector",
        "tolerations",
        "scanInterval",
        "debounce",
        "maxChangesPerNodePerMinute",
        "retention",
    ] {
        assert!(
            run.stdout.contains(field),
            "kubectl explain lists {field}:\n{}",
            run.stdout
        );
    }
    // Every field has a description, not just a type.
    let run = kubectl(["explain", "fip.spec.paths.path"]);
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stdout.contains("DESCRIPTION") && run.stdout.contains("last segment"),
        "path docs explain the wildcard rule:\n{}",
        run.stdout
    );
    let run = kubectl(["explain", "filechange.spec.category"]);
    assert!(run.success, "{}", run.stderr);
    for value in ["Added", "Modified", "Removed"] {
        assert!(run.stdout.contains(value), "{}", run.stdout);
    }
    let run = kubectl(["explain", "fc.spec", "--recursive"]);
    assert!(run.success, "{}", run.stderr);
    for field in [
        "before",
        "after",
        "changedAttributes",
        "detectedTime",
        "source",
        "process",
    ] {
        assert!(
            run.stdout.contains(field),
            "fc.spec lists {field}:\n{}",
            run.stdout
        );
    }
}

/// Applies a policy file from `examples/` under a fresh name, returns that name.
fn apply_example(file: &str) -> (String, kube_fim_e2e::Run) {
    let text = fs::read_to_string(repo_root().join("examples").join(file)).expect("example exists");
    let mut policy: serde_json::Value = serde_saphyr::from_str(&text).expect("example is YAML");
    let name = unique_name(file.trim_end_matches(".yaml"));
    policy["metadata"]["name"] = serde_json::Value::String(name.clone());
    let run = kubectl_stdin(
        &["apply", "-f", "-"],
        &serde_saphyr::to_string(&policy).expect("YAML"),
    );
    (name, run)
}

#[tokio::test]
async fn example_policies_are_accepted_with_defaults() {
    ensure_crds();
    let api: Api<FileIntegrityPolicy> = Api::all(client().await);

    let (name, run) = apply_example("policy.yaml");
    assert!(run.success, "examples/policy.yaml refused: {}", run.stderr);
    let stored = api.get(&name).await.expect("policy stored");
    assert_eq!(stored.spec.paths.len(), 7);
    let logs = stored
        .spec
        .paths
        .iter()
        .find(|p| p.name == "logs")
        .expect("entry logs");
    assert!(!logs.enabled, "enabled: false is kept");
    let accounts = stored
        .spec
        .paths
        .iter()
        .find(|p| p.name == "accounts")
        .expect("entry accounts");
    assert!(accounts.enabled, "enabled defaults to true");
    assert!(!accounts.recursive, "recursive defaults to false");

    let (name, run) = apply_example("recommended.yaml");
    assert!(
        run.success,
        "examples/recommended.yaml refused: {}",
        run.stderr
    );
    // The API server filled in the documented defaults.
    let stored = api.get(&name).await.expect("policy stored");
    assert_eq!(stored.spec.scan_interval, "1h");
    assert_eq!(stored.spec.debounce, "2s");
    assert_eq!(stored.spec.max_changes_per_node_per_minute, 100);
    let paths: Vec<String> = stored
        .spec
        .effective_paths()
        .into_iter()
        .map(|p| p.path)
        .collect();
    for wanted in [
        "/bin/login",
        "/etc/*.conf",
        "/usr/bin",
        "/boot",
        "/etc/cron.daily",
    ] {
        assert!(paths.iter().any(|p| p == wanted), "{wanted} in {paths:?}");
    }

    // `kubectl get fip` shows the policy with its columns.
    let run = kubectl(["get", "fip", &name]);
    assert!(run.success, "{}", run.stderr);
    let header = run.stdout.lines().next().unwrap_or_default();
    for col in ["NAME", "NODES", "READY", "FILES", "CHANGES(24H)", "AGE"] {
        assert!(header.contains(col), "column {col} in {header:?}");
    }
    assert!(run.stdout.contains(&name));

    // The Rust rules the agent applies to policy files agree.
    for file in ["policy.yaml", "recommended.yaml"] {
        let text = fs::read_to_string(repo_root().join("examples").join(file)).unwrap();
        policy_from_yaml(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

/// One refused policy from `examples/invalid/`, with what its header promises.
struct BadPolicy {
    file: String,
    text: String,
    field: String,
    /// What the API server says.
    message: String,
    /// What the agent's Rust rules say, where serde words it differently
    /// (`# expect-agent-message:`); otherwise the same as `message`.
    agent_message: String,
}

fn bad_policies() -> Vec<BadPolicy> {
    let dir = repo_root().join("examples/invalid");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).expect("examples/invalid exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let optional = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .map(str::to_string)
        };
        let header = |key: &str| {
            optional(key).unwrap_or_else(|| panic!("{} lacks a `# {key}:` line", path.display()))
        };
        let message = header("expect-message");
        out.push(BadPolicy {
            file: path.file_name().unwrap().to_string_lossy().into_owned(),
            field: header("expect-field"),
            agent_message: optional("expect-agent-message").unwrap_or_else(|| message.clone()),
            message,
            text,
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    out
}

#[test]
fn bad_policies_are_refused_by_the_api_server_naming_the_field() {
    ensure_crds();
    let cases = bad_policies();
    assert!(
        cases.len() >= 8,
        "at least 8 refused policies, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let run = kubectl_stdin(&["apply", "-f", "-"], &case.text);
        if run.success {
            failures.push(format!("{}: accepted by the API server", case.file));
            continue;
        }
        // kubectl prints the API server's field errors as `<field>: <reason>`.
        let field_named = run.stderr.contains(&format!("{}: ", case.field));
        let said_why = run.stderr.contains(&case.message);
        if !field_named || !said_why {
            failures.push(format!(
                "{}: expected field {:?} and message {:?}, API server said:\n{}",
                case.file, case.field, case.message, run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_agents_rust_rules_refuse_the_same_policies_for_the_same_field() {
    let cases = bad_policies();
    assert!(cases.len() >= 8);
    let mut failures = Vec::new();
    for case in &cases {
        match policy_from_yaml(&case.text) {
            Ok(_) => failures.push(format!("{}: accepted by validate_policy", case.file)),
            Err(e) => {
                let said = e.to_string();
                if !said.contains(&format!("{}: ", case.field))
                    || !said.contains(&case.agent_message)
                {
                    failures.push(format!(
                        "{}: expected field {:?} and message {:?}, the agent said: {said}",
                        case.file, case.field, case.agent_message
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_filechange_shows_the_printer_columns_and_is_immutable() {
    ensure_crds();
    let client = client().await;
    let api: Api<FileChange> = Api::all(client.clone());
    let name = unique_name("node-a-passwd");
    let node = unique_name("node-a");
    let mut labels = BTreeMap::new();
    labels.insert(kube_fim_crds::labels::NODE.to_string(), node.clone());
    labels.insert(
        kube_fim_crds::labels::CATEGORY.to_string(),
        "Modified".to_string(),
    );
    let now = MicroTime(Timestamp::now());
    let mut change = FileChange::new(
        &name,
        FileChangeSpec {
            node: node.clone(),
            policy: "node-baseline".into(),
            entry: "accounts".into(),
            path: "/etc/passwd".into(),
            category: ChangeCategory::Modified,
            changed_attributes: vec![Attribute::Hash, Attribute::Size],
            before: Some(FileAttributes {
                hash: Some("a".repeat(64)),
                size: Some(1024),
                mode: Some("0644".into()),
                ..FileAttributes::default()
            }),
            after: Some(FileAttributes {
                hash: Some("b".repeat(64)),
                size: Some(1100),
                mode: Some("0644".into()),
                ..FileAttributes::default()
            }),
            detected_time: now,
            source: DetectionSource::Realtime,
            process: None,
            summary: None,
            sequence: None,
            package: None,
            restored: None,
            container: None,
        },
    );
    change.metadata.labels = Some(labels);
    api.create(&PostParams::default(), &change)
        .await
        .expect("FileChange created");

    let run = kubectl(["get", "fc", &name]);
    assert!(run.success, "{}", run.stderr);
    let mut lines = run.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "NODE",
            "CATEGORY",
            "PATH",
            "POLICY",
            "CONTAINER",
            "UNREADABLE",
            "PACKAGE",
            "TRANSACTION",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        [
            name.as_str(),
            node.as_str(),
            "Modified",
            "/etc/passwd",
            "node-baseline"
        ]
    );

    let run = kubectl(["get", "filechanges", &name, "-o", "wide"]);
    assert!(run.success, "{}", run.stderr);
    let header = run.stdout.lines().next().unwrap();
    assert!(
        header.contains("SOURCE") && header.contains("ATTRIBUTES"),
        "{header}"
    );
    assert!(run.stdout.contains("Realtime"), "{}", run.stdout);

    // Filtering by label and by field selector, as the docs tell users to.
    let run = kubectl([
        "get",
        "fc",
        "-l",
        &format!("fim.kube-fim.io/node={node}"),
        "-o",
        "name",
    ]);
    assert!(run.success, "{}", run.stderr);
    assert_eq!(
        run.stdout.trim(),
        format!("filechange.fim.kube-fim.io/{name}")
    );
    let by_field = api
        .list(&ListParams::default().fields(&format!("spec.node={node}")))
        .await
        .expect("field selector spec.node is served");
    assert_eq!(by_field.items.len(), 1);
    assert_eq!(by_field.items[0].spec.path, "/etc/passwd");

    // A change record cannot be rewritten to hide what happened.
    let err = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"path": "/etc/hosts"}})),
        )
        .await
        .expect_err("spec is immutable");
    let text = err.to_string();
    assert!(
        text.contains("spec") && text.contains("cannot be changed"),
        "immutability message: {text}"
    );
    let stored = api.get(&name).await.unwrap();
    assert_eq!(stored.spec.path, "/etc/passwd");

    // Status is a subresource: writing it through the main resource is ignored,
    // through /status it is kept (an approval, in the approver's own name).
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"message": "ignored"}})),
    )
    .await
    .expect("main resource");
    assert_eq!(api.get(&name).await.unwrap().status, None);
    kube_fim_e2e::approve(&client, &name, "approved by e2e")
        .await
        .expect("status subresource");
    let stored = api.get(&name).await.unwrap();
    assert_eq!(
        stored.approval().and_then(|a| a.reason.as_deref()),
        Some("approved by e2e")
    );

    api.delete(&name, &DeleteParams::default()).await.unwrap();
}
