//! Every ECS event the exporter writes is checked against the field
//! definitions Elastic Common Schema 8.11.0 publishes (`ecs_flat.yml`):
//! each field the event holds (outside kube-fim's own field set `kube_fim.*`)
//! is an ECS field, its JSON value is of the field's type as Elasticsearch
//! reads it (keyword a string, long an integer, date an RFC 3339 string...),
//! an array where ECS normalizes the field to one, and one of the allowed
//! values where ECS lists them. The definitions the check reads are a subset
//! of ECS's file kept in `tests/ecs-8.11.0/`, so the check needs no network.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{FileChange, SinkFormat};
use kube_fim_formats::{Alarm, ECS_VERSION, ecs, ecs_alarm, encode_approval, expand};
use serde_json::{Value, json};

/// The field set kube-fim adds (ECS's custom fields live under their own
/// name): not ECS's to define.
const CUSTOM: &str = "kube_fim";

fn definitions() -> BTreeMap<String, Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ecs-8.11.0/ecs_flat.yml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The leaves of an event, by dotted name (an array is one leaf).
fn leaves(at: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let name = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                leaves(&name, v, out);
            }
        }
        v => out.push((at.to_string(), v.clone())),
    }
}

/// Whether one JSON value is of ECS type `t` as Elasticsearch maps it.
fn of_type(t: &str, v: &Value) -> bool {
    match t {
        "keyword" | "constant_keyword" | "wildcard" | "text" | "match_only_text" => v.is_string(),
        "long" | "integer" | "short" | "byte" => v.is_i64(),
        "unsigned_long" => v.is_u64(),
        "float" | "half_float" | "scaled_float" | "double" => v.is_number(),
        "boolean" => v.is_boolean(),
        // ECS dates are ISO 8601 / RFC 3339 strings (epoch numbers would be
        // read as another format by an index that does not say so).
        "date" => v.as_str().is_some_and(|s| s.parse::<Timestamp>().is_ok()),
        "ip" => v
            .as_str()
            .is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok()),
        _ => false,
    }
}

/// What of `event` ECS does not allow.
fn errors(defs: &BTreeMap<String, Value>, event: &Value) -> Vec<String> {
    let mut all = Vec::new();
    leaves("", event, &mut all);
    let mut errs = Vec::new();
    for (name, value) in all {
        if name == CUSTOM || name.starts_with(&format!("{CUSTOM}.")) {
            continue;
        }
        let Some(def) = defs.get(&name) else {
            errs.push(format!("{name}: not an ECS {ECS_VERSION} field"));
            continue;
        };
        let t = def["type"].as_str().unwrap_or("?");
        let array = def["normalize"]
            .as_array()
            .is_some_and(|n| n.iter().any(|x| x == "array"));
        let values: Vec<&Value> = match &value {
            Value::Array(items) => {
                if !array {
                    errs.push(format!("{name}: an array, ECS says one {t}"));
                }
                items.iter().collect()
            }
            v => {
                if array {
                    errs.push(format!("{name}: ECS normalizes it to an array of {t}"));
                }
                vec![v]
            }
        };
        for v in values {
            if !of_type(t, v) {
                errs.push(format!("{name}: {v} is not of ECS type {t}"));
            }
            if let Some(allowed) = def.get("allowed_values").and_then(Value::as_array) {
                let ok = allowed.iter().any(|a| a["name"] == *v);
                if !ok {
                    errs.push(format!("{name}: {v} is not one of ECS's allowed values"));
                }
            }
        }
    }
    errs
}

fn change(category: &str, changed: &[&str], extra: Value) -> FileChange {
    let state = |hash: &str, mode: &str| {
        json!({
            "type": "file", "hash": hash, "size": 1234, "mode": mode, "uid": 0, "gid": 0,
            "mtime": "2026-12-07T05:00:00.250000Z", "ctime": "2026-12-07T05:00:00.250000Z",
            "inode": 42, "links": 1
        })
    };
    let mut spec = json!({
        "node": "node-a", "policy": "baseline", "entry": "sudoers", "path": "/etc/sudoers",
        "category": category, "changedAttributes": changed,
        "detectedTime": "2026-12-07T05:01:02.345678Z", "source": "Realtime",
    });
    if category != "Added" {
        spec["before"] = state(&"1".repeat(64), "0440");
    }
    if category != "Removed" {
        spec["after"] = state(&"2".repeat(64), "0640");
    }
    let mut fc = json!({
        "apiVersion": "fim.kube-fim.io/v1alpha1", "kind": "FileChange",
        "metadata": {"name": "node-a-7-4f2a9c0123456789abcd"},
        "spec": spec,
    });
    if let Some(extra) = extra.as_object() {
        for (k, v) in extra {
            if k == "status" {
                fc["status"] = v.clone();
            } else {
                fc["spec"][k] = v.clone();
            }
        }
    }
    serde_json::from_value(fc).unwrap()
}

/// Every kind of event the ECS encoder makes.
fn events() -> Vec<(&'static str, Value)> {
    let writer = json!({
        "process": {
            "by": "pod default/shell-7d9 (container sh)", "pid": 4242, "command": "vi",
            "exe": "/usr/bin/vim.basic", "ppid": 4200, "uid": 1000, "user": "mallory",
            "containerId": "containerd://abc123",
            "pod": {"namespace": "default", "name": "shell-7d9",
                    "uid": "0c8f0f9e-0000-4000-8000-000000000000", "container": "sh"}
        }
    });
    let approved = json!({
        "status": {"approval": {"approvedBy": "alice", "approvedAt": "2026-12-07T06:00:00Z",
                                "reason": "CHG-1"}, "outcome": "Applied"}
    });
    let sha256 = json!({ "after": {
        "type": "file", "hash": "2".repeat(64), "sha256": "3".repeat(64), "size": 1234
    } });
    let link = json!({ "after": { "type": "symlink", "linkTarget": "/tmp/evil" } });
    let summary = json!({ "summary": {
        "count": 5000, "added": 5000, "modified": 0, "removed": 0, "samplePaths": ["/etc/a"],
        "windowStart": "2026-12-07T05:00:00Z", "windowEnd": "2026-12-07T05:01:00Z"
    } });
    let transaction = json!({ "package": {
        "manager": "dpkg", "name": "coreutils", "version": "9.1-2", "verdict": "Verified",
        "transaction": {"summary": "coreutils 9.1-2", "files": 1, "changes": [{
            "path": "/usr/bin/ls", "category": "Modified", "changedAttributes": ["hash"],
            "after": {"type": "file", "hash": "4".repeat(64), "size": 10},
            "detectedTime": "2026-12-07T05:01:02Z", "source": "Scan",
            "package": "coreutils", "version": "9.1-2"
        }]}
    } });
    let mut out = vec![
        ("added", ecs(&change("Added", &[], json!({})))),
        ("removed", ecs(&change("Removed", &[], json!({})))),
        ("content", ecs(&change("Modified", &["hash"], json!({})))),
        ("mode", ecs(&change("Modified", &["mode"], json!({})))),
        ("attributed", ecs(&change("Modified", &["hash"], writer))),
        ("sha256", ecs(&change("Modified", &["hash"], sha256))),
        ("symlink", ecs(&change("Modified", &["linkTarget"], link))),
        (
            "approved",
            ecs(&change("Modified", &["hash"], approved.clone())),
        ),
    ];
    let approval =
        encode_approval(SinkFormat::Ecs, &change("Modified", &["hash"], approved)).unwrap();
    out.push(("approval", serde_json::from_str(&approval).unwrap()));
    out.push(("summary", ecs(&change("Summary", &[], summary))));
    for one in expand(&change("Modified", &["hash"], transaction)) {
        out.push(("package transaction", ecs(&one)));
    }
    for entry in [None, Some(("baseline".to_string(), "sudoers".to_string()))] {
        out.push((
            "alarm",
            ecs_alarm(&Alarm {
                id: "node-a/gap/3-5/missing".into(),
                node: "node-a".into(),
                reason: "EvidenceGap".into(),
                since: "2026-12-07T05:02:00Z".parse().unwrap(),
                message: "transition numbers 3 to 5 of node node-a: missing".into(),
                entry,
            }),
        ));
    }
    out
}

#[test]
fn every_ecs_event_has_ecs_field_types() {
    let defs = definitions();
    let mut checked = 0;
    for (name, event) in events() {
        let errs = errors(&defs, &event);
        assert!(
            errs.is_empty(),
            "{name}: the ECS event does not follow ECS {ECS_VERSION}'s field definitions:\n{}\n{}",
            errs.join("\n"),
            serde_json::to_string_pretty(&event).unwrap()
        );
        checked += 1;
    }
    assert!(checked >= 12, "{checked} events checked");
}

#[test]
fn the_definitions_are_ecs_s_own() {
    // What the encoder's fields are in ECS 8.11.0: a type written here by
    // hand instead of copied would show.
    let defs = definitions();
    let t = |name: &str| defs[name]["type"].as_str().unwrap().to_string();
    assert_eq!(t("@timestamp"), "date");
    assert_eq!(t("file.size"), "long");
    assert_eq!(t("file.uid"), "keyword");
    assert_eq!(t("file.inode"), "keyword");
    assert_eq!(t("file.mtime"), "date");
    assert_eq!(t("file.hash.sha256"), "keyword");
    assert_eq!(t("process.pid"), "long");
    assert_eq!(t("event.severity"), "long");
    assert_eq!(t("message"), "match_only_text");
}

#[test]
fn the_check_names_each_wrong_type() {
    let defs = definitions();
    let mut event = ecs(&change("Modified", &["hash"], json!({})));
    assert!(errors(&defs, &event).is_empty());
    // The mistakes an encoder makes: a number where ECS has a keyword, a
    // string where it has a long, a date that is no date, a scalar where it
    // wants an array, a value it does not allow, a field it does not have.
    let set = |e: &mut Value, path: &[&str], v: Value| {
        let mut at = e;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = v;
    };
    set(&mut event, &["file", "uid"], json!(0));
    set(&mut event, &["file", "size"], json!("1234"));
    set(&mut event, &["@timestamp"], json!(1765083662345_i64));
    set(&mut event, &["file", "mtime"], json!("yesterday"));
    set(&mut event, &["event", "category"], json!("file"));
    set(&mut event, &["event", "kind"], json!("finding"));
    set(&mut event, &["file", "blake3"], json!("2".repeat(64)));
    set(&mut event, &["kube_fim", "anything"], json!(1));
    let errs = errors(&defs, &event);
    let has = |s: &str| errs.iter().any(|e| e.contains(s));
    assert!(has("file.uid: 0 is not of ECS type keyword"), "{errs:#?}");
    assert!(
        has("file.size: \"1234\" is not of ECS type long"),
        "{errs:#?}"
    );
    assert!(
        has("@timestamp: 1765083662345 is not of ECS type date"),
        "{errs:#?}"
    );
    assert!(
        has("file.mtime: \"yesterday\" is not of ECS type date"),
        "{errs:#?}"
    );
    assert!(
        has("event.category: ECS normalizes it to an array"),
        "{errs:#?}"
    );
    assert!(
        has("event.kind: \"finding\" is not one of ECS's allowed values"),
        "{errs:#?}"
    );
    assert!(has("file.blake3: not an ECS"), "{errs:#?}");
    assert_eq!(errs.len(), 7, "kube_fim.* is kube-fim's own: {errs:#?}");
}
