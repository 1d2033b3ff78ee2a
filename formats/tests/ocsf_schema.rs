//! Every OCSF event the exporter writes is checked against the published OCSF
//! 1.4.0 schema: the File System Activity class (1001) with the profiles the
//! event declares, every object it nests, the dictionary's types and enums.
//! The schema files the check reads are kept in `tests/ocsf-1.4.0/` (copied
//! unchanged from the OCSF schema repository at tag v1.4.0, Apache-2.0: see
//! its LICENSE there), so the check needs no network and cannot drift.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kube_fim_crds::FileChange;
use kube_fim_formats::ocsf;
use serde_json::{Map, Value, json};

fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ocsf-1.4.0")
}

fn read(rel: &str) -> Value {
    let path = schema_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An attribute as a class or object defines it, merged over what it
/// inherits (`extends`, `$include`, profiles).
type Attributes = BTreeMap<String, Map<String, Value>>;

/// A class or object with everything it inherits.
struct Definition {
    attributes: Attributes,
    constraints: Map<String, Value>,
}

fn merge(into: &mut Attributes, attrs: &Map<String, Value>) {
    for (name, def) in attrs {
        if name == "$include" {
            for file in def.as_array().into_iter().flatten() {
                let included = read(file.as_str().unwrap());
                merge(into, included["attributes"].as_object().unwrap());
            }
            continue;
        }
        let entry = into.entry(name.clone()).or_default();
        for (k, v) in def.as_object().into_iter().flatten() {
            entry.insert(k.clone(), v.clone());
        }
    }
}

/// A profile adds its attributes; those the class or object defines itself
/// keep their own definition (a profile does not relax a requirement).
fn add_profile(into: &mut Attributes, profile: &str) {
    let profile = read(&format!("profiles/{profile}.json"));
    let mut added = Attributes::new();
    merge(&mut added, profile["attributes"].as_object().unwrap());
    for (name, def) in added {
        into.entry(name).or_insert(def);
    }
}

fn object(name: &str) -> Definition {
    let def = read(&format!("objects/{name}.json"));
    let mut d = match def["extends"].as_str() {
        Some(parent) => object(parent),
        None => Definition {
            attributes: Attributes::new(),
            constraints: Map::new(),
        },
    };
    merge(&mut d.attributes, def["attributes"].as_object().unwrap());
    for p in def["profiles"].as_array().into_iter().flatten() {
        add_profile(&mut d.attributes, p.as_str().unwrap());
    }
    if let Some(c) = def["constraints"].as_object() {
        d.constraints = c.clone();
    }
    d
}

/// The File System Activity class with the profiles the event names.
fn file_activity(profiles: &[&str]) -> Definition {
    let mut attributes = Attributes::new();
    for file in [
        "events/base_event.json",
        "events/system/system.json",
        "events/system/file_activity.json",
    ] {
        let def = read(file);
        let mut own = def["attributes"].as_object().unwrap().clone();
        // The base event includes every optional profile; only the ones the
        // event declares apply.
        own.remove("$include");
        merge(&mut attributes, &own);
    }
    for p in profiles {
        add_profile(&mut attributes, p);
    }
    Definition {
        attributes,
        constraints: Map::new(),
    }
}

struct Checker {
    dictionary: Value,
    errors: Vec<String>,
}

impl Checker {
    fn new() -> Checker {
        Checker {
            dictionary: read("dictionary.json"),
            errors: Vec::new(),
        }
    }

    /// The scalar type a dictionary type resolves to (`timestamp_t` → `long_t`).
    fn base_type(&self, t: &str) -> String {
        let mut t = t.to_string();
        while let Some(parent) = self.dictionary["types"]["attributes"][&t]["type"].as_str() {
            t = parent.to_string();
        }
        t
    }

    fn check_definition(&mut self, at: &str, def: &Definition, value: &Value) {
        let Some(fields) = value.as_object() else {
            self.errors
                .push(format!("{at}: expected an object, got {value}"));
            return;
        };
        for (name, v) in fields {
            match def.attributes.get(name) {
                Some(attr) => self.check_attribute(&format!("{at}.{name}"), name, attr, v),
                None => self.errors.push(format!(
                    "{at}.{name}: not an attribute of {at} in OCSF 1.4.0"
                )),
            }
        }
        for (name, attr) in &def.attributes {
            if attr.get("requirement").and_then(Value::as_str) == Some("required")
                && !fields.contains_key(name)
            {
                self.errors.push(format!("{at}.{name}: required, missing"));
            }
        }
        if let Some(one_of) = def
            .constraints
            .get("at_least_one")
            .and_then(Value::as_array)
            && !one_of
                .iter()
                .any(|n| fields.contains_key(n.as_str().unwrap_or_default()))
        {
            self.errors
                .push(format!("{at}: needs at least one of {one_of:?}"));
        }
    }

    fn check_attribute(&mut self, at: &str, name: &str, local: &Map<String, Value>, v: &Value) {
        let Some(dict) = self.dictionary["attributes"][name].as_object().cloned() else {
            self.errors
                .push(format!("{at}: {name} is not in the dictionary"));
            return;
        };
        // The class's or object's own definition refines the dictionary's;
        // enum values add to the dictionary's (0 Unknown, 99 Other).
        let mut attr = dict;
        let mut values = attr.get("enum").and_then(Value::as_object).cloned();
        attr.extend(local.clone());
        if let Some(own) = local.get("enum").and_then(Value::as_object) {
            values.get_or_insert_with(Map::new).extend(own.clone());
        }
        if let Some(values) = values {
            attr.insert("enum".into(), Value::Object(values));
        }
        // The class and category ids are the class's own, checked below.
        if matches!(name, "class_uid" | "category_uid") {
            attr.remove("enum");
        }
        let t = attr["type"].as_str().unwrap_or_default().to_string();
        if attr.get("is_array").and_then(Value::as_bool) == Some(true) {
            match v.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.check_value(&format!("{at}[{i}]"), &t, &attr, item);
                    }
                }
                None => self.errors.push(format!("{at}: expected an array")),
            }
        } else {
            self.check_value(at, &t, &attr, v);
        }
    }

    fn check_value(&mut self, at: &str, t: &str, attr: &Map<String, Value>, v: &Value) {
        if !t.ends_with("_t") {
            // An object type: a generic `object` holds anything.
            if t == "object" {
                if !v.is_object() {
                    self.errors.push(format!("{at}: expected an object"));
                }
                return;
            }
            let def = object(t);
            self.check_definition(at, &def, v);
            return;
        }
        let ok = match self.base_type(t).as_str() {
            "string_t" => v.is_string(),
            "integer_t" | "long_t" => v.is_i64() || v.is_u64(),
            "float_t" => v.is_number(),
            "boolean_t" => v.is_boolean(),
            "json_t" => true,
            other => {
                self.errors.push(format!("{at}: unknown base type {other}"));
                true
            }
        };
        if !ok {
            self.errors.push(format!("{at}: {v} is not a {t}"));
            return;
        }
        if let Some(values) = attr.get("enum").and_then(Value::as_object) {
            let key = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !values.contains_key(&key) {
                self.errors.push(format!(
                    "{at}: {key} is not one of {:?}",
                    values.keys().collect::<Vec<_>>()
                ));
            }
        }
    }
}

/// The schema errors of one event (none: it conforms).
fn errors(event: &Value) -> Vec<String> {
    let profiles: Vec<&str> = event["metadata"]["profiles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let class = file_activity(&profiles);
    let mut checker = Checker::new();
    checker.check_definition("event", &class, event);
    // File System Activity is class 1 of the System Activity category (1).
    if event["category_uid"] != 1 || event["class_uid"] != 1001 {
        checker
            .errors
            .push("event.class_uid: not 1001 (category 1, class 1)".into());
    }
    // The class id and its activity make the type id.
    let (class_uid, activity) = (event["class_uid"].as_u64(), event["activity_id"].as_u64());
    if let (Some(c), Some(a)) = (class_uid, activity)
        && event["type_uid"].as_u64() != Some(c * 100 + a)
    {
        checker
            .errors
            .push("event.type_uid: not class_uid * 100 + activity_id".into());
    }
    checker.errors
}

fn change(category: &str, changed: &[&str], extra: Value) -> FileChange {
    let state = |hash: &str, mode: &str| {
        json!({
            "type": "file", "hash": hash, "size": 1234, "mode": mode, "uid": 0, "gid": 0,
            "mtime": "2026-12-07T05:00:00.250000Z", "inode": 42, "links": 1
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

#[test]
fn every_kind_of_change_is_a_valid_file_system_activity() {
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
    let cases = [
        ("added", change("Added", &[], json!({}))),
        ("removed", change("Removed", &[], json!({}))),
        ("content", change("Modified", &["hash"], json!({}))),
        ("mode", change("Modified", &["mode"], json!({}))),
        ("owner", change("Modified", &["uid"], json!({}))),
        ("mount", change("Modified", &["mount"], json!({}))),
        ("attributed", change("Modified", &["hash"], writer)),
        (
            "sha256",
            change(
                "Modified",
                &["hash"],
                json!({ "after": {
                    "type": "file", "hash": "2".repeat(64), "sha256": "3".repeat(64), "size": 1234
                } }),
            ),
        ),
        (
            "approved",
            change("Modified", &["hash", "mode"], approved.clone()),
        ),
    ];
    let mut checked = 0;
    for (name, fc) in &cases {
        let event = ocsf(fc);
        let errs = errors(&event);
        assert!(
            errs.is_empty(),
            "{name}: the OCSF event does not conform to OCSF 1.4.0 File System Activity:\n{}\n{}",
            errs.join("\n"),
            serde_json::to_string_pretty(&event).unwrap()
        );
        checked += 1;
    }
    assert_eq!(checked, cases.len());

    // An approval is exported as its own event (the change as approved).
    let approval = kube_fim_formats::encode_approval(
        kube_fim_crds::SinkFormat::Ocsf,
        &change("Modified", &["hash", "mode"], approved),
    )
    .expect("an approved change has an approval event");
    let event: serde_json::Value = serde_json::from_str(&approval).unwrap();
    let errs = errors(&event);
    assert!(
        errs.is_empty(),
        "the approval's OCSF event does not conform:\n{}",
        errs.join("\n")
    );
}

/// A node's alarms (baseline alarm, evidence gap, unexplained digest move, flood)
/// are File System Activity events too, activity Other (99, which every
/// class inherits from the base event), severity High.
#[test]
fn every_kind_of_alarm_is_a_valid_file_system_activity() {
    let record: kube_fim_crds::FileIntegrityNode = serde_json::from_value(json!({
        "apiVersion": "fim.kube-fim.io/v1alpha1", "kind": "FileIntegrityNode",
        "metadata": {"name": "node-a"},
        "spec": {"node": "node-a"},
        "status": {
            "baselineAlarm": {"id": "b1", "reason": "BaselineTampered",
                              "since": "2026-12-07T05:00:00Z", "message": "not the baseline the cluster knows"},
            "verification": {
                "verifiedThrough": 9, "since": "2026-12-07T04:00:00Z",
                "gaps": [{"first": 5, "last": 7, "reason": "Missing", "since": "2026-12-07T05:01:00Z"}],
                "unexplained": [{"policy": "p", "entry": "etc", "from": "v2-a", "to": "v2-b",
                                 "since": "2026-12-07T05:02:00Z"}],
            },
            "floods": [{"since": "2026-12-07T05:03:00Z", "last": "2026-12-07T05:05:00Z",
                        "count": 900, "budget": 240}],
        },
    }))
    .unwrap();
    let alarms = kube_fim_formats::alarms(&record);
    let ids: Vec<&str> = alarms.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "node-a/baseline/b1",
            "node-a/gap/5-7/Missing",
            "node-a/digest/p/etc/v2-b",
            "node-a/flood/1796619780"
        ]
    );
    for alarm in &alarms {
        let event = kube_fim_formats::ocsf_alarm(alarm);
        let errs = errors(&event);
        assert!(
            errs.is_empty(),
            "{}: the alarm's OCSF event does not conform to OCSF 1.4.0 File System Activity:\n{}\n{}",
            alarm.id,
            errs.join("\n"),
            serde_json::to_string_pretty(&event).unwrap()
        );
        assert_eq!(event["metadata"]["uid"], alarm.id.as_str());
        assert_eq!(event["severity_id"], 4);
    }
}

/// The check itself can fail: what the schema does not allow is named.
#[test]
fn the_check_names_what_the_schema_does_not_allow() {
    let mut event = ocsf(&change("Modified", &["hash"], json!({})));
    event["file"]["blake3"] = json!("2222");
    event["activity_id"] = json!(42);
    event["time"] = json!("yesterday");
    event.as_object_mut().unwrap().remove("device");
    event["file"]["hashes"][0]["algorithm_id"] = json!(77);
    let errs = errors(&event);
    for expected in [
        "event.file.blake3: not an attribute",
        "event.activity_id: 42 is not one of",
        "event.time: \"yesterday\" is not a timestamp_t",
        "event.device: required, missing",
        "event.file.hashes[0].algorithm_id: 77 is not one of",
        "event.type_uid: not class_uid * 100 + activity_id",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(expected)),
            "expected {expected:?} among {errs:#?}"
        );
    }
}

/// A package transaction (one FileChange listing every file of an upgrade)
/// becomes one event per file it lists, each with its own stable id and its
/// own file, package and versions, each valid File System Activity.
#[test]
fn a_package_transaction_is_one_valid_event_per_file_it_lists() {
    let item = |path: &str, category: &str| {
        json!({
            "path": path, "category": category, "changedAttributes": ["hash"],
            "before": {"type": "file", "hash": "1".repeat(64), "size": 10},
            "after": {"type": "file", "hash": "2".repeat(64), "size": 12},
            "detectedTime": "2026-12-07T05:01:02.345678Z", "source": "Realtime",
            "package": "gzip", "version": "1.13-1", "versionBefore": "1.12-1",
        })
    };
    let fc = change(
        "Modified",
        &["hash"],
        json!({
            "package": {
                "manager": "dpkg", "name": "gzip", "version": "1.13-1",
                "versionBefore": "1.12-1", "verdict": "Verified",
                "transaction": {
                    "summary": "gzip 1.12-1→1.13-1, 2 files", "files": 2,
                    "changes": [item("/bin/gzip", "Modified"), item("/bin/gunzip", "Modified")],
                },
            },
        }),
    );
    let events = kube_fim_formats::encode_all(kube_fim_crds::SinkFormat::Ocsf, &fc);
    let ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "node-a-7-4f2a9c0123456789abcd/0",
            "node-a-7-4f2a9c0123456789abcd/1"
        ]
    );
    let paths: Vec<String> = events
        .iter()
        .map(|(id, line)| {
            let event: Value = serde_json::from_str(line).unwrap();
            let errs = errors(&event);
            assert!(errs.is_empty(), "{id}: {}", errs.join("\n"));
            assert_eq!(event["metadata"]["uid"], id.as_str());
            event["file"]["path"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(paths, ["/bin/gzip", "/bin/gunzip"]);
    // A change that is no transaction is one event, under its name.
    let one = kube_fim_formats::encode_all(
        kube_fim_crds::SinkFormat::Ecs,
        &change("Modified", &["hash"], json!({})),
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].0, "node-a-7-4f2a9c0123456789abcd");
}
