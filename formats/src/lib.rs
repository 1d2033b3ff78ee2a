//! The event formats of kube-fim's evidence, as pure functions of one
//! FileChange: what a FileChangeSink asks for (the operator's exporter) and what
//! `kubectl fim export --format` writes, from one encoder.
//!
//! Every format carries the same stable event id, the FileChange's name: the
//! agent derives it from the node, policy, path and the states before and after
//! (see the agent's `report/object.rs`), so a change delivered twice carries
//! the same id twice and the SIEM can deduplicate.
//!
//! - **OCSF** 1.4 File System Activity (class 1001 in category 1, System
//!   Activity), with the `security_control` profile for the policy and the
//!   `host` profile for the node. OCSF's fingerprint algorithms have no
//!   BLAKE3 id: hashes are `algorithm_id` 99 (Other) named `BLAKE3`, and a
//!   SHA-256 (when a sink asked the agents for it) `algorithm_id` 3.
//! - **ECS** (Elastic Common Schema 8.x): `event.*`, `file.*`, `process.*`,
//!   `host.*`, `rule.*`. ECS's `file.hash.*` has no BLAKE3 field either; the
//!   digest goes to the custom field set `kube_fim.*`, with everything
//!   kube-fim-specific (entry, detection source, the state before); a
//!   SHA-256 is `file.hash.sha256`.
//! - **CEF** (ArcSight Common Event Format rev. 25), one line. `fileHash`
//!   is the SHA-256 when there is one, the BLAKE3 digest otherwise.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube_fim_crds::{
    Attribute, BaselineAlarm, ChangeCategory, ChangeFloodRecord, ChangeStormRecord, EvidenceGap,
    FileAttributes, FileChange, FileIntegrityNode, FileType, ProcessInfo, SinkFormat,
    UnexplainedMove,
};
use serde_json::{Map, Value, json};

/// OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.4.0";
/// ECS version the events follow.
pub const ECS_VERSION: &str = "8.11.0";
/// OCSF File System Activity.
pub const OCSF_CLASS_UID: u32 = 1001;
/// OCSF System Activity.
pub const OCSF_CATEGORY_UID: u32 = 1;

const PRODUCT: &str = "kube-fim";
const PRODUCT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One FileChange as a line of the sink's format (no trailing newline):
/// compact JSON for OCSF and ECS, a CEF record for CEF.
pub fn encode(format: SinkFormat, change: &FileChange) -> String {
    match format {
        SinkFormat::Ocsf => ocsf(change).to_string(),
        SinkFormat::Ecs => ecs(change).to_string(),
        SinkFormat::Cef => cef(change),
    }
}

/// The stable id of the event a FileChange becomes.
pub fn event_id(change: &FileChange) -> String {
    change.name_any()
}

/// The events a FileChange becomes, each with its stable id and its line: the
/// change itself, or, for a package transaction (one object listing many
/// changes), one event per change it lists, id `<change>/<index>` (no object
/// name holds a `/`), each as the FileChange of that one file would be. A SIEM
/// sees every file of an upgrade, not its first.
pub fn encode_all(format: SinkFormat, change: &FileChange) -> Vec<(String, String)> {
    expand(change)
        .into_iter()
        .map(|c| (event_id(&c), encode(format, &c)))
        .collect()
}

/// The FileChanges a FileChange stands for (see [`encode_all`]).
pub fn expand(change: &FileChange) -> Vec<FileChange> {
    let Some(package) = &change.spec.package else {
        return vec![change.clone()];
    };
    let Some(transaction) = package
        .transaction
        .as_ref()
        .filter(|t| !t.changes.is_empty())
    else {
        return vec![change.clone()];
    };
    transaction
        .changes
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut one = change.clone();
            one.metadata.name = Some(format!("{}/{i}", change.name_any()));
            let spec = &mut one.spec;
            spec.path = item.path.clone();
            spec.category = item.category;
            spec.changed_attributes = item.changed_attributes.clone();
            spec.before = item.before.clone();
            spec.after = item.after.clone();
            spec.detected_time = item.detected_time.clone();
            spec.source = item.source;
            spec.process = item.process.clone();
            spec.package = Some(kube_fim_crds::PackageCheck {
                manager: package.manager,
                name: item.package.clone(),
                version: item.version.clone(),
                version_before: item.version_before.clone(),
                verdict: package.verdict,
                transaction: None,
            });
            one
        })
        .collect()
}

/// The stable id of the event a FileChange's approval becomes: the change's
/// id and `/approval` (no object name holds a `/`, so it is no change's id).
pub fn approval_event_id(change: &FileChange) -> String {
    format!("{}/approval", change.name_any())
}

/// The approval of a FileChange as a line of the sink's format: the change's
/// event as it stands approved (no longer an alert; who approved it, when and
/// why under kube-fim's fields), with the approval's own id and time. `None`
/// for a change nobody approved.
pub fn encode_approval(format: SinkFormat, change: &FileChange) -> Option<String> {
    let approval = change.approval()?;
    let id = approval_event_id(change);
    let at = &approval.approved_at.0;
    Some(match format {
        SinkFormat::Ocsf => {
            let mut event = ocsf(change);
            event["metadata"]["uid"] = id.into();
            event["time"] = millis(at).into();
            event["message"] = format!(
                "{} {} on {} approved by {}",
                change.spec.category.as_str(),
                change.spec.path,
                change.spec.node,
                approval.approved_by
            )
            .into();
            event.to_string()
        }
        SinkFormat::Ecs => {
            let mut event = ecs(change);
            event["event"]["id"] = id.into();
            event["@timestamp"] = rfc3339(at).into();
            event["event"]["action"] = "file-change-approved".into();
            event.to_string()
        }
        SinkFormat::Cef => cef_event(change, &id, at, "approved"),
    })
}

/// OCSF File System Activity activity: what happened to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    Create,
    Update,
    Delete,
    SetAttributes,
    SetSecurity,
    Mount,
    Other,
}

impl Activity {
    pub fn id(self) -> u32 {
        match self {
            Activity::Create => 1,
            Activity::Update => 3,
            Activity::Delete => 4,
            Activity::SetAttributes => 6,
            Activity::SetSecurity => 7,
            Activity::Mount => 12,
            Activity::Other => 99,
        }
    }

    pub fn caption(self) -> &'static str {
        match self {
            Activity::Create => "Create",
            Activity::Update => "Update",
            Activity::Delete => "Delete",
            Activity::SetAttributes => "Set Attributes",
            Activity::SetSecurity => "Set Security",
            Activity::Mount => "Mount",
            Activity::Other => "Other",
        }
    }
}

/// The activity of a change: for a modification, the most telling of what
/// differs: content first, then what the file is mounted from, then who may
/// access it, then the rest of its metadata.
pub fn activity(category: ChangeCategory, changed: &[Attribute]) -> Activity {
    match category {
        ChangeCategory::Added => Activity::Create,
        ChangeCategory::Removed => Activity::Delete,
        ChangeCategory::Summary => Activity::Other,
        ChangeCategory::Modified => {
            let any = |set: &[Attribute]| changed.iter().any(|a| set.contains(a));
            if changed.is_empty()
                || any(&[
                    Attribute::Hash,
                    Attribute::Size,
                    Attribute::Type,
                    Attribute::LinkTarget,
                ])
            {
                Activity::Update
            } else if any(&[Attribute::Mount]) {
                Activity::Mount
            } else if any(&[
                Attribute::Mode,
                Attribute::Uid,
                Attribute::Gid,
                Attribute::Xattrs,
            ]) {
                Activity::SetSecurity
            } else {
                Activity::SetAttributes
            }
        }
    }
}

fn millis(t: &Timestamp) -> i64 {
    t.as_millisecond()
}

/// The state a change is about: the file as found now, or as it was for a removal.
fn current(change: &FileChange) -> Option<&FileAttributes> {
    change.spec.after.as_ref().or(change.spec.before.as_ref())
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

fn insert<V: Into<Value>>(map: &mut Map<String, Value>, key: &str, value: Option<V>) {
    if let Some(v) = value {
        map.insert(key.to_string(), v.into());
    }
}

fn ocsf_type_id(t: Option<FileType>) -> u32 {
    match t {
        Some(FileType::File) => 1,
        Some(FileType::Directory) => 2,
        Some(FileType::CharDevice) => 3,
        Some(FileType::BlockDevice) => 4,
        Some(FileType::Socket) => 5,
        Some(FileType::Fifo) => 6,
        Some(FileType::Symlink) => 7,
        None => 0,
    }
}

fn ocsf_file(path: &str, state: Option<&FileAttributes>) -> Value {
    let mut file = Map::new();
    file.insert("path".into(), path.into());
    file.insert("name".into(), file_name(path).into());
    file.insert("parent_folder".into(), parent(path).into());
    let type_id = ocsf_type_id(state.and_then(|s| s.file_type));
    file.insert("type_id".into(), type_id.into());
    if let Some(s) = state {
        insert(&mut file, "size", s.size);
        insert(
            &mut file,
            "modified_time",
            s.mtime.as_ref().map(|t| millis(&t.0)),
        );
        if let Some(uid) = s.uid {
            file.insert("owner".into(), json!({ "uid": uid.to_string() }));
        }
        let mut hashes = Vec::new();
        if let Some(hash) = &s.hash {
            hashes.push(json!({ "algorithm_id": 99, "algorithm": "BLAKE3", "value": hash }));
        }
        if let Some(sha256) = &s.sha256 {
            hashes.push(json!({ "algorithm_id": 3, "algorithm": "SHA-256", "value": sha256 }));
        }
        if !hashes.is_empty() {
            file.insert("hashes".into(), hashes.into());
        }
        let mut attrs = Map::new();
        insert(&mut attrs, "mode", s.mode.clone());
        insert(&mut attrs, "gid", s.gid);
        insert(&mut attrs, "inode", s.inode);
        insert(&mut attrs, "links", s.links);
        insert(&mut attrs, "xattrs_blake3", s.xattrs.clone());
        if !attrs.is_empty() {
            // OCSF's file object has no field for these; `xattributes` is its
            // place for extended, product-specific attributes.
            file.insert("xattributes".into(), Value::Object(attrs));
        }
    }
    Value::Object(file)
}

fn ocsf_process(p: &ProcessInfo) -> Value {
    let mut process = Map::new();
    process.insert("pid".into(), p.pid.into());
    insert(&mut process, "name", p.command.clone());
    if let Some(exe) = &p.exe {
        process.insert(
            "file".into(),
            json!({ "path": exe, "name": file_name(exe), "type_id": 1 }),
        );
    }
    if let Some(ppid) = p.ppid {
        process.insert("parent_process".into(), json!({ "pid": ppid }));
    }
    if p.uid.is_some() || p.user.is_some() {
        let mut user = Map::new();
        insert(&mut user, "uid", p.uid.map(|u| u.to_string()));
        insert(&mut user, "name", p.user.clone());
        process.insert("user".into(), Value::Object(user));
    }
    if let Some(id) = &p.container_id {
        let mut container = Map::new();
        container.insert("uid".into(), id.clone().into());
        if let Some(pod) = &p.pod {
            insert(&mut container, "name", pod.container.clone());
            container.insert("orchestrator".into(), "Kubernetes".into());
        }
        process.insert("container".into(), Value::Object(container));
    }
    Value::Object(process)
}

/// OCSF 1.x File System Activity (class_uid 1001).
pub fn ocsf(change: &FileChange) -> Value {
    let spec = &change.spec;
    let activity = activity(spec.category, &spec.changed_attributes);
    let mut event = Map::new();
    event.insert("class_uid".into(), OCSF_CLASS_UID.into());
    event.insert("class_name".into(), "File System Activity".into());
    event.insert("category_uid".into(), OCSF_CATEGORY_UID.into());
    event.insert("category_name".into(), "System Activity".into());
    event.insert("activity_id".into(), activity.id().into());
    event.insert("activity_name".into(), activity.caption().into());
    event.insert(
        "type_uid".into(),
        (OCSF_CLASS_UID * 100 + activity.id()).into(),
    );
    event.insert(
        "type_name".into(),
        format!("File System Activity: {}", activity.caption()).into(),
    );
    // An unexpected change of a monitored file is worth a look; an approved
    // one is still evidence.
    event.insert("severity_id".into(), 3.into());
    event.insert("severity".into(), "Medium".into());
    event.insert("status_id".into(), 1.into());
    event.insert("status".into(), "Success".into());
    event.insert("time".into(), millis(&spec.detected_time.0).into());
    event.insert(
        "message".into(),
        format!("{} {} on {}", spec.category.as_str(), spec.path, spec.node).into(),
    );
    event.insert(
        "metadata".into(),
        json!({
            "uid": event_id(change),
            "version": OCSF_VERSION,
            "profiles": ["host", "security_control"],
            "product": { "name": PRODUCT, "vendor_name": PRODUCT, "version": PRODUCT_VERSION },
            "log_name": "FileChange",
        }),
    );
    event.insert(
        "device".into(),
        json!({ "hostname": spec.node, "name": spec.node, "type_id": 0 }),
    );
    let actor = match &spec.process {
        Some(p) => {
            let mut actor = Map::new();
            actor.insert("process".into(), ocsf_process(p));
            if p.uid.is_some() || p.user.is_some() {
                let mut user = Map::new();
                insert(&mut user, "uid", p.uid.map(|u| u.to_string()));
                insert(&mut user, "name", p.user.clone());
                actor.insert("user".into(), Value::Object(user));
            }
            Value::Object(actor)
        }
        // The writer is unknown (attribution off, or a scan found the
        // change). OCSF requires an actor with at least one attribute: an
        // application named "Unknown" says so rather than naming the agent.
        None => json!({ "app_name": "Unknown" }),
    };
    event.insert("actor".into(), actor);
    event.insert("file".into(), ocsf_file(&spec.path, current(change)));
    event.insert(
        "policy".into(),
        json!({ "name": spec.policy, "uid": spec.policy, "desc": format!("entry {}", spec.entry) }),
    );
    event.insert("action_id".into(), 1.into());
    event.insert("action".into(), "Allowed".into());
    event.insert("disposition_id".into(), 15.into());
    event.insert("disposition".into(), "Detected".into());
    event.insert("is_alert".into(), (change.approval().is_none()).into());
    event.insert("unmapped".into(), unmapped(change));
    Value::Object(event)
}

/// What kube-fim records beyond the format's fields.
fn unmapped(change: &FileChange) -> Value {
    let spec = &change.spec;
    let mut m = Map::new();
    m.insert("entry".into(), spec.entry.clone().into());
    m.insert("category".into(), spec.category.as_str().into());
    m.insert(
        "source".into(),
        serde_json::to_value(spec.source).unwrap_or(Value::Null),
    );
    if !spec.changed_attributes.is_empty() {
        m.insert(
            "changed_attributes".into(),
            spec.changed_attributes
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .into(),
        );
    }
    if let Some(before) = &spec.before {
        m.insert(
            "before".into(),
            serde_json::to_value(before).unwrap_or(Value::Null),
        );
    }
    if let Some(after) = &spec.after {
        m.insert(
            "after".into(),
            serde_json::to_value(after).unwrap_or(Value::Null),
        );
    }
    if let Some(summary) = &spec.summary {
        m.insert(
            "summary".into(),
            serde_json::to_value(summary).unwrap_or(Value::Null),
        );
    }
    if let Some(by) = spec.process.as_ref().and_then(|p| p.by.clone()) {
        m.insert("by".into(), by.into());
    }
    if let Some(pod) = spec.process.as_ref().and_then(|p| p.pod.as_ref()) {
        m.insert(
            "pod".into(),
            serde_json::to_value(pod).unwrap_or(Value::Null),
        );
    }
    if let Some(approval) = change.approval() {
        m.insert(
            "approval".into(),
            serde_json::to_value(approval).unwrap_or(Value::Null),
        );
    }
    Value::Object(m)
}

fn ecs_type(t: Option<FileType>) -> Option<&'static str> {
    match t? {
        FileType::File => Some("file"),
        FileType::Directory => Some("dir"),
        FileType::Symlink => Some("symlink"),
        _ => None,
    }
}

fn rfc3339(t: &Timestamp) -> String {
    // RFC 3339 with milliseconds, UTC, as Elasticsearch's date type reads it.
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Elastic Common Schema 8.x.
pub fn ecs(change: &FileChange) -> Value {
    let spec = &change.spec;
    let (event_type, action) = match spec.category {
        ChangeCategory::Added => ("creation", "file-added"),
        ChangeCategory::Modified => ("change", "file-modified"),
        ChangeCategory::Removed => ("deletion", "file-removed"),
        ChangeCategory::Summary => ("info", "file-changes-summarised"),
    };
    let mut file = Map::new();
    file.insert("path".into(), spec.path.clone().into());
    file.insert("name".into(), file_name(&spec.path).into());
    file.insert("directory".into(), parent(&spec.path).into());
    if let Some(s) = current(change) {
        insert(&mut file, "type", ecs_type(s.file_type));
        insert(&mut file, "size", s.size);
        insert(&mut file, "mode", s.mode.clone());
        insert(&mut file, "uid", s.uid.map(|u| u.to_string()));
        insert(&mut file, "gid", s.gid.map(|g| g.to_string()));
        insert(&mut file, "inode", s.inode.map(|i| i.to_string()));
        insert(&mut file, "mtime", s.mtime.as_ref().map(|t| rfc3339(&t.0)));
        insert(&mut file, "ctime", s.ctime.as_ref().map(|t| rfc3339(&t.0)));
        insert(&mut file, "target_path", s.link_target.clone());
        if let Some(sha256) = &s.sha256 {
            file.insert("hash".into(), json!({ "sha256": sha256 }));
        }
    }
    let mut event = json!({
        "@timestamp": rfc3339(&spec.detected_time.0),
        "ecs": { "version": ECS_VERSION },
        "message": format!("{} {} on {}", spec.category.as_str(), spec.path, spec.node),
        "event": {
            "id": event_id(change),
            "kind": if change.approval().is_none() { "alert" } else { "event" },
            "category": ["file"],
            "type": [event_type],
            "action": action,
            "module": "kube_fim",
            "dataset": "kube_fim.file_change",
            "provider": PRODUCT,
            "outcome": "success",
        },
        "file": Value::Object(file),
        "host": { "name": spec.node, "hostname": spec.node },
        "rule": { "name": spec.policy, "ruleset": spec.entry },
        "observer": { "product": PRODUCT, "vendor": PRODUCT, "type": "file-integrity", "version": PRODUCT_VERSION },
        "orchestrator": { "type": "kubernetes", "resource": { "type": "filechange", "name": event_id(change) } },
        "kube_fim": unmapped(change),
    });
    if let Some(p) = &spec.process {
        let mut process = Map::new();
        process.insert("pid".into(), p.pid.into());
        insert(&mut process, "name", p.command.clone());
        insert(&mut process, "executable", p.exe.clone());
        if let Some(ppid) = p.ppid {
            process.insert("parent".into(), json!({ "pid": ppid }));
        }
        if p.uid.is_some() || p.user.is_some() {
            let mut user = Map::new();
            insert(&mut user, "id", p.uid.map(|u| u.to_string()));
            insert(&mut user, "name", p.user.clone());
            process.insert("user".into(), Value::Object(user));
        }
        if let Some(map) = event.as_object_mut() {
            map.insert("process".into(), Value::Object(process));
            if let Some(id) = &p.container_id {
                map.insert("container".into(), json!({ "id": id }));
            }
            if let Some(pod) = &p.pod {
                let mut ns = Map::new();
                insert(&mut ns, "namespace", pod.namespace.clone());
                let mut resource = Map::new();
                resource.insert("type".into(), "pod".into());
                insert(&mut resource, "name", pod.name.clone());
                ns.insert("resource".into(), Value::Object(resource));
                ns.insert("type".into(), "kubernetes".into());
                map.insert("orchestrator".into(), Value::Object(ns));
            }
        }
    }
    event
}

/// CEF header field: `|` and `\` escaped.
fn cef_header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

/// CEF extension value: `\`, `=` and line breaks escaped.
fn cef_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\r', "\\r")
        .replace('\n', "\\n")
}

/// ArcSight Common Event Format, one line.
pub fn cef(change: &FileChange) -> String {
    cef_event(change, &event_id(change), &change.spec.detected_time.0, "")
}

/// A change's CEF record with the event id `id` at `at`; `outcome` (e.g.
/// `approved`) is said in `outcome=` when not empty.
fn cef_event(change: &FileChange, id: &str, at: &Timestamp, outcome: &str) -> String {
    let spec = &change.spec;
    let activity = activity(spec.category, &spec.changed_attributes);
    let mut ext: Vec<(&str, String)> = vec![
        ("rt", millis(at).to_string()),
        ("externalId", id.to_string()),
        ("dvchost", spec.node.clone()),
        ("dhost", spec.node.clone()),
        ("act", spec.category.as_str().to_string()),
        ("cat", "FileIntegrity".to_string()),
        ("filePath", spec.path.clone()),
        ("fname", file_name(&spec.path).to_string()),
        ("cs1Label", "policy".to_string()),
        ("cs1", spec.policy.clone()),
        ("cs2Label", "entry".to_string()),
        ("cs2", spec.entry.clone()),
    ];
    if !spec.changed_attributes.is_empty() {
        ext.push(("cs3Label", "changedAttributes".to_string()));
        ext.push((
            "cs3",
            spec.changed_attributes
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ));
    }
    // CEF's `fileHash` names no algorithm and SIEMs match it against
    // threat intelligence, whose digests are SHA-256: with a SHA-256 it is
    // that, and the BLAKE3 digests go to custom strings (`oldFileHash` then
    // stays out: the state before has BLAKE3 only, and two digests of two
    // algorithms side by side would read as a content change).
    let sha256 = current(change).and_then(|s| s.sha256.clone());
    if let Some(s) = current(change) {
        match (&sha256, &s.hash) {
            (Some(sha256), hash) => {
                ext.push(("fileHash", sha256.clone()));
                if let Some(h) = hash {
                    ext.push(("cs5Label", "blake3".to_string()));
                    ext.push(("cs5", h.clone()));
                }
            }
            (None, Some(h)) => ext.push(("fileHash", h.clone())),
            (None, None) => {}
        }
        if let Some(size) = s.size {
            ext.push(("fsize", size.to_string()));
        }
        if let Some(mode) = &s.mode {
            ext.push(("filePermission", mode.clone()));
        }
        if let Some(t) = &s.mtime {
            ext.push(("fileModificationTime", millis(&t.0).to_string()));
        }
    }
    if spec.after.is_some()
        && let Some(before) = &spec.before
    {
        if let Some(h) = &before.hash {
            if sha256.is_some() {
                ext.push(("cs6Label", "oldBlake3".to_string()));
                ext.push(("cs6", h.clone()));
            } else {
                ext.push(("oldFileHash", h.clone()));
            }
        }
        if let Some(mode) = &before.mode {
            ext.push(("oldFilePermission", mode.clone()));
        }
    }
    if let Some(p) = &spec.process {
        ext.push(("spid", p.pid.to_string()));
        if let Some(c) = &p.command {
            ext.push(("sproc", c.clone()));
        }
        if let Some(uid) = p.uid {
            ext.push(("suid", uid.to_string()));
        }
        if let Some(user) = &p.user {
            ext.push(("suser", user.clone()));
        }
        if let Some(by) = &p.by {
            ext.push(("cs4Label", "by".to_string()));
            ext.push(("cs4", by.clone()));
        }
    }
    if !outcome.is_empty() {
        ext.push(("outcome", outcome.to_string()));
        if let Some(a) = change.approval() {
            ext.push(("duser", a.approved_by.clone()));
        }
    }
    let extension: Vec<String> = ext
        .into_iter()
        .map(|(k, v)| format!("{k}={}", cef_value(&v)))
        .collect();
    format!(
        "CEF:0|{}|{}|{}|{}|{}|{}|{}",
        cef_header(PRODUCT),
        cef_header(PRODUCT),
        cef_header(PRODUCT_VERSION),
        cef_header(&format!(
            "file-{}",
            activity.caption().to_lowercase().replace(' ', "-")
        )),
        cef_header(&format!("File {}", spec.category.as_str())),
        if change.approval().is_none() { 5 } else { 3 },
        extension.join(" ")
    )
}

/// A standing alarm of a node (its `FileIntegrityNode.status`) as the sinks
/// receive it: plain data, one per condition, with a stable id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alarm {
    /// The stable event id: the same condition seen again is the same id.
    pub id: String,
    pub node: String,
    /// `BaselineMissing`, `BaselineTampered`, `EvidenceGap`, `ChangeFlood` or
    /// `ChangeStorm`.
    pub reason: String,
    /// When the condition began: its place in the node's order.
    pub since: Timestamp,
    pub message: String,
    /// What the alarm is about, when one policy entry: (policy, entry).
    pub entry: Option<(String, String)>,
}

/// The part of a node's record an [`Alarm`] stands for, for readers that
/// show more of it than the sinks' message (`kubectl fim report`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AlarmRecord<'a> {
    Baseline(&'a BaselineAlarm),
    /// Missing or rewound transition numbers.
    Gap(&'a EvidenceGap),
    /// An entry digest that moved with nothing in the cluster to explain it.
    DigestMove(&'a UnexplainedMove),
    Flood(&'a ChangeFloodRecord),
    Storm(&'a ChangeStormRecord),
}

/// The standing alarms of a node's record: its baseline alarm, its evidence
/// gaps (missing transition numbers), its unexplained entry digest moves,
/// the floods of FileChanges the operator counted and the storms it found.
/// An id holds the node's name and the condition's identity (never the
/// message), so a condition republished unchanged is the same event.
pub fn alarms(node: &FileIntegrityNode) -> Vec<Alarm> {
    alarm_records(node).into_iter().map(|(a, _)| a).collect()
}

/// [`alarms`], each with the record of the node's status it stands for.
pub fn alarm_records(node: &FileIntegrityNode) -> Vec<(Alarm, AlarmRecord<'_>)> {
    let name = node.name_any();
    let Some(status) = &node.status else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(a) = &status.baseline_alarm {
        out.push((
            Alarm {
                id: format!("{name}/baseline/{}", a.id),
                node: name.clone(),
                reason: a.reason.clone(),
                since: a.since.0,
                message: a.message.clone(),
                entry: None,
            },
            AlarmRecord::Baseline(a),
        ));
    }
    if let Some(v) = &status.verification {
        for g in &v.gaps {
            out.push((
                Alarm {
                    id: format!("{name}/gap/{}-{}/{}", g.first, g.last, g.reason),
                    node: name.clone(),
                    reason: "EvidenceGap".into(),
                    since: g.since.0,
                    message: format!(
                        "transition numbers {} to {} of node {name}: {}",
                        g.first, g.last, g.reason
                    ),
                    entry: None,
                },
                AlarmRecord::Gap(g),
            ));
        }
        for m in &v.unexplained {
            out.push((Alarm {
                id: format!("{name}/digest/{}/{}/{}", m.policy, m.entry, m.to),
                node: name.clone(),
                reason: "EvidenceGap".into(),
                since: m.since.0,
                message: format!(
                    "entry {} of policy {} on node {name}: its digest moved from {} to {} with nothing in the cluster to explain it",
                    m.entry, m.policy, m.from, m.to
                ),
                entry: Some((m.policy.clone(), m.entry.clone())),
            }, AlarmRecord::DigestMove(m)));
        }
    }
    for f in &status.floods {
        out.push((Alarm {
            id: format!("{name}/flood/{}", f.since.0.as_second()),
            node: name.clone(),
            reason: "ChangeFlood".into(),
            since: f.since.0,
            message: format!(
                "node {name} created up to {} FileChanges a minute, more than the {} its policies allow, from {} to {}: its token used outside its agent, an agent replaced, or a long outage's backlog",
                f.count, f.budget, f.since.0, f.last.0
            ),
            entry: None,
        }, AlarmRecord::Flood(f)));
    }
    for s in &status.storms {
        out.push((Alarm {
            id: format!(
                "{name}/storm/{}/{}/{}",
                s.policy,
                s.entry,
                s.since.0.as_second()
            ),
            node: name.clone(),
            reason: "ChangeStorm".into(),
            since: s.since.0,
            message: format!(
                "entry {} of policy {} on node {name}: up to {} changes detected in a minute, more than its cap of {}, from {} to {}; its agent paces them (each is a FileChange of its own, delivered late)",
                s.entry, s.policy, s.count, s.cap, s.since.0, s.last.0
            ),
            entry: Some((s.policy.clone(), s.entry.clone())),
        }, AlarmRecord::Storm(s)));
    }
    out
}

/// An alarm as a line of the sink's format: OCSF File System Activity with
/// activity Other (99) and severity High, an alert about the node's evidence
/// (the `file` is the policy entry it concerns, or the node's baseline); ECS
/// `event.kind: alert`; CEF severity 8.
pub fn encode_alarm(format: SinkFormat, alarm: &Alarm) -> String {
    match format {
        SinkFormat::Ocsf => ocsf_alarm(alarm).to_string(),
        SinkFormat::Ecs => ecs_alarm(alarm).to_string(),
        SinkFormat::Cef => cef_alarm(alarm),
    }
}

/// What an alarm concerns, as a name: the entry, or the node's baseline.
fn alarm_subject(alarm: &Alarm) -> String {
    match &alarm.entry {
        Some((policy, entry)) => format!("{policy}/{entry}"),
        None => "baseline".into(),
    }
}

/// OCSF activity id Other: the base event's, which every class inherits.
const OCSF_OTHER: u32 = 99;

/// An alarm as OCSF 1.x File System Activity, activity Other.
pub fn ocsf_alarm(alarm: &Alarm) -> Value {
    let mut event = json!({
        "class_uid": OCSF_CLASS_UID,
        "class_name": "File System Activity",
        "category_uid": OCSF_CATEGORY_UID,
        "category_name": "System Activity",
        "activity_id": OCSF_OTHER,
        "activity_name": alarm.reason,
        "type_uid": OCSF_CLASS_UID * 100 + OCSF_OTHER,
        "type_name": "File System Activity: Other",
        "severity_id": 4,
        "severity": "High",
        "status_id": 2,
        "status": "Failure",
        "time": millis(&alarm.since),
        "message": alarm.message,
        "metadata": {
            "uid": alarm.id,
            "version": OCSF_VERSION,
            "profiles": ["host", "security_control"],
            "product": { "name": PRODUCT, "vendor_name": PRODUCT, "version": PRODUCT_VERSION },
            "log_name": "FileIntegrityNode",
        },
        "device": { "hostname": alarm.node, "name": alarm.node, "type_id": 0 },
        // Nobody is known to have acted: the alarm says evidence is missing
        // or was altered.
        "actor": { "app_name": "Unknown" },
        "file": { "name": alarm_subject(alarm), "type_id": 0 },
        // Nothing was blocked: kube-fim detects.
        "action_id": 1,
        "action": "Allowed",
        "disposition_id": 15,
        "disposition": "Detected",
        "is_alert": true,
        "unmapped": { "alarm": alarm.reason },
    });
    if let Some((policy, entry)) = &alarm.entry {
        event["unmapped"]["policy"] = policy.clone().into();
        event["unmapped"]["entry"] = entry.clone().into();
    }
    event
}

/// An alarm as ECS 8.x: an alert of the node.
pub fn ecs_alarm(alarm: &Alarm) -> Value {
    let mut event = json!({
        "@timestamp": rfc3339(&alarm.since),
        "ecs": { "version": ECS_VERSION },
        "message": alarm.message,
        "event": {
            "id": alarm.id,
            "kind": "alert",
            "category": ["file"],
            "type": ["info"],
            "action": alarm.reason,
            "module": "kube_fim",
            "dataset": "kube_fim.alarm",
            "provider": PRODUCT,
            "severity": 8,
        },
        "host": { "name": alarm.node, "hostname": alarm.node },
        "observer": { "product": PRODUCT, "vendor": PRODUCT, "type": "file-integrity", "version": PRODUCT_VERSION },
        "orchestrator": { "type": "kubernetes", "resource": { "type": "fileintegritynode", "name": alarm.node } },
        "kube_fim": { "alarm": alarm.reason },
    });
    if let Some((policy, entry)) = &alarm.entry {
        event["rule"] = json!({ "name": policy, "ruleset": entry });
    }
    event
}

/// An alarm as one CEF line, severity 8 (high).
pub fn cef_alarm(alarm: &Alarm) -> String {
    let mut ext: Vec<(&str, String)> = vec![
        ("rt", millis(&alarm.since).to_string()),
        ("externalId", alarm.id.clone()),
        ("dvchost", alarm.node.clone()),
        ("dhost", alarm.node.clone()),
        ("cat", "FileIntegrity".to_string()),
        ("msg", alarm.message.clone()),
        ("fname", alarm_subject(alarm)),
    ];
    if let Some((policy, entry)) = &alarm.entry {
        ext.push(("cs1Label", "policy".to_string()));
        ext.push(("cs1", policy.clone()));
        ext.push(("cs2Label", "entry".to_string()));
        ext.push(("cs2", entry.clone()));
    }
    let extension: Vec<String> = ext
        .into_iter()
        .map(|(k, v)| format!("{k}={}", cef_value(&v)))
        .collect();
    format!(
        "CEF:0|{}|{}|{}|{}|{}|8|{}",
        cef_header(PRODUCT),
        cef_header(PRODUCT),
        cef_header(PRODUCT_VERSION),
        cef_header(&format!("alarm-{}", alarm.reason)),
        cef_header(&alarm.reason),
        extension.join(" ")
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use kube_fim_crds::{Approval, DetectionSource, FileChangeSpec, FileChangeStatus, PodRef};

    const BEFORE: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const AFTER: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn state(hash: &str, mode: &str) -> FileAttributes {
        FileAttributes {
            file_type: Some(FileType::File),
            hash: Some(hash.into()),
            size: Some(1234),
            mode: Some(mode.into()),
            uid: Some(0),
            gid: Some(0),
            mtime: Some(MicroTime(at("2026-12-07T05:00:00.250Z"))),
            inode: Some(42),
            links: Some(1),
            ..FileAttributes::default()
        }
    }

    fn change(category: ChangeCategory, changed: Vec<Attribute>) -> FileChange {
        FileChange::new(
            "node-a-sudoers-4f2a9c",
            FileChangeSpec {
                node: "node-a".into(),
                policy: "baseline".into(),
                entry: "sudoers".into(),
                path: "/etc/sudoers".into(),
                category,
                changed_attributes: changed,
                before: (category != ChangeCategory::Added).then(|| state(BEFORE, "0440")),
                after: (category != ChangeCategory::Removed).then(|| state(AFTER, "0640")),
                detected_time: MicroTime(at("2026-12-07T05:01:02.345678Z")),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                package: None,
                restored: None,
                container: None,
            },
        )
    }

    fn attributed(mut fc: FileChange) -> FileChange {
        fc.spec.process = Some(ProcessInfo {
            by: Some("pod default/shell-7d9 (container sh)".into()),
            pid: 4242,
            command: Some("vi".into()),
            exe: Some("/usr/bin/vim.basic".into()),
            ppid: Some(4200),
            uid: Some(1000),
            user: Some("mallory".into()),
            container_id: Some("containerd://abc123".into()),
            pod: Some(PodRef {
                namespace: Some("default".into()),
                name: Some("shell-7d9".into()),
                uid: "0c8f0f9e-0000-4000-8000-000000000000".into(),
                container: Some("sh".into()),
            }),
            ..ProcessInfo::default()
        });
        fc
    }

    #[test]
    fn ocsf_modified_content_is_an_update_with_blake3_fingerprint() {
        let e = ocsf(&change(
            ChangeCategory::Modified,
            vec![Attribute::Hash, Attribute::Mode],
        ));
        assert_eq!(e["class_uid"], 1001);
        assert_eq!(e["category_uid"], 1);
        assert_eq!(e["activity_id"], 3);
        assert_eq!(e["type_uid"], 100103);
        assert_eq!(e["time"], at("2026-12-07T05:01:02.345Z").as_millisecond());
        assert_eq!(e["metadata"]["uid"], "node-a-sudoers-4f2a9c");
        assert_eq!(e["metadata"]["version"], OCSF_VERSION);
        assert_eq!(e["metadata"]["product"]["name"], "kube-fim");
        assert_eq!(e["device"]["hostname"], "node-a");
        assert_eq!(e["policy"]["name"], "baseline");
        assert_eq!(e["file"]["path"], "/etc/sudoers");
        assert_eq!(e["file"]["name"], "sudoers");
        assert_eq!(e["file"]["parent_folder"], "/etc");
        assert_eq!(e["file"]["type_id"], 1);
        assert_eq!(
            e["file"]["hashes"],
            json!([{ "algorithm_id": 99, "algorithm": "BLAKE3", "value": AFTER }])
        );
        assert_eq!(e["unmapped"]["before"]["hash"], BEFORE);
        assert_eq!(e["unmapped"]["changed_attributes"], json!(["hash", "mode"]));
        assert_eq!(
            e["actor"],
            json!({ "app_name": "Unknown" }),
            "no attribution, no invented actor"
        );
        assert_eq!(e["is_alert"], true);
    }

    #[test]
    fn ocsf_activities_follow_what_changed() {
        let id = |cat, changed| ocsf(&change(cat, changed))["activity_id"].clone();
        assert_eq!(id(ChangeCategory::Added, vec![]), 1);
        assert_eq!(id(ChangeCategory::Removed, vec![]), 4);
        assert_eq!(id(ChangeCategory::Modified, vec![Attribute::Mode]), 7);
        assert_eq!(
            id(
                ChangeCategory::Modified,
                vec![Attribute::Uid, Attribute::Mtime]
            ),
            7
        );
        assert_eq!(id(ChangeCategory::Modified, vec![Attribute::Mtime]), 6);
        assert_eq!(id(ChangeCategory::Modified, vec![Attribute::Mount]), 12);
        assert_eq!(id(ChangeCategory::Summary, vec![]), 99);
        // A removal describes the file as it was.
        let removed = ocsf(&change(ChangeCategory::Removed, vec![]));
        assert_eq!(removed["file"]["hashes"][0]["value"], BEFORE);
        let added = ocsf(&change(ChangeCategory::Added, vec![]));
        assert!(added["unmapped"].get("before").is_none());
    }

    #[test]
    fn ocsf_actor_is_the_attributed_process() {
        let e = ocsf(&attributed(change(
            ChangeCategory::Modified,
            vec![Attribute::Hash],
        )));
        let p = &e["actor"]["process"];
        assert_eq!(p["pid"], 4242);
        assert_eq!(p["name"], "vi");
        assert_eq!(p["file"]["path"], "/usr/bin/vim.basic");
        assert_eq!(p["parent_process"]["pid"], 4200);
        assert_eq!(p["user"]["uid"], "1000");
        assert_eq!(p["container"]["uid"], "containerd://abc123");
        assert_eq!(e["actor"]["user"]["name"], "mallory");
        assert_eq!(e["unmapped"]["pod"]["name"], "shell-7d9");
    }

    #[test]
    fn an_approved_change_is_no_alert() {
        let mut fc = change(ChangeCategory::Modified, vec![Attribute::Hash]);
        fc.status = Some(FileChangeStatus {
            approval: Some(Approval {
                approved_by: "alice".into(),
                approved_at: Time(at("2026-12-07T06:00:00Z")),
                reason: Some("CHG-1".into()),
                paths: Vec::new(),
            }),
            ..FileChangeStatus::default()
        });
        assert_eq!(ocsf(&fc)["is_alert"], false);
        assert_eq!(ocsf(&fc)["unmapped"]["approval"]["approvedBy"], "alice");
        assert_eq!(ecs(&fc)["event"]["kind"], "event");
    }

    #[test]
    fn an_approval_is_an_event_of_its_own_with_a_stable_id() {
        let mut fc = change(ChangeCategory::Modified, vec![Attribute::Hash]);
        for format in [SinkFormat::Ocsf, SinkFormat::Ecs, SinkFormat::Cef] {
            assert_eq!(encode_approval(format, &fc), None, "nobody approved it");
        }
        fc.status = Some(FileChangeStatus {
            approval: Some(Approval {
                approved_by: "alice".into(),
                approved_at: Time(at("2026-12-07T06:00:00Z")),
                reason: Some("CHG-1".into()),
                paths: Vec::new(),
            }),
            ..FileChangeStatus::default()
        });
        let id = "node-a-sudoers-4f2a9c/approval";
        assert_eq!(approval_event_id(&fc), id);
        let o: Value =
            serde_json::from_str(&encode_approval(SinkFormat::Ocsf, &fc).unwrap()).unwrap();
        assert_eq!(o["metadata"]["uid"], id);
        assert_eq!(o["time"], at("2026-12-07T06:00:00Z").as_millisecond());
        assert_eq!(o["is_alert"], false);
        assert_eq!(o["unmapped"]["approval"]["reason"], "CHG-1");
        assert!(
            o["message"]
                .as_str()
                .unwrap()
                .ends_with("approved by alice")
        );
        let e: Value =
            serde_json::from_str(&encode_approval(SinkFormat::Ecs, &fc).unwrap()).unwrap();
        assert_eq!(e["event"]["id"], id);
        assert_eq!(e["@timestamp"], "2026-12-07T06:00:00.000Z");
        assert_eq!(e["event"]["action"], "file-change-approved");
        let c = encode_approval(SinkFormat::Cef, &fc).unwrap();
        assert!(c.contains(&format!("externalId={id} ")), "{c}");
        assert!(c.contains("outcome=approved duser=alice"), "{c}");
        assert!(
            c.contains(&format!(
                "rt={} ",
                at("2026-12-07T06:00:00Z").as_millisecond()
            )),
            "{c}"
        );
        // The change's own event keeps its id.
        assert!(cef(&fc).contains("externalId=node-a-sudoers-4f2a9c "));
    }

    #[test]
    fn ecs_fields_have_ecs_types() {
        let e = ecs(&attributed(change(
            ChangeCategory::Modified,
            vec![Attribute::Hash],
        )));
        assert_eq!(e["@timestamp"], "2026-12-07T05:01:02.345Z");
        assert_eq!(e["event"]["id"], "node-a-sudoers-4f2a9c");
        assert_eq!(e["event"]["category"], json!(["file"]));
        assert_eq!(e["event"]["type"], json!(["change"]));
        assert_eq!(e["event"]["kind"], "alert");
        assert_eq!(e["file"]["path"], "/etc/sudoers");
        assert_eq!(e["file"]["directory"], "/etc");
        assert_eq!(e["file"]["type"], "file");
        // keyword fields in ECS: strings, not numbers.
        assert_eq!(e["file"]["uid"], "0");
        assert_eq!(e["file"]["inode"], "42");
        assert_eq!(e["file"]["size"], 1234);
        assert_eq!(e["file"]["mtime"], "2026-12-07T05:00:00.250Z");
        assert_eq!(e["host"]["name"], "node-a");
        assert_eq!(e["rule"]["name"], "baseline");
        assert_eq!(e["process"]["pid"], 4242);
        assert_eq!(e["process"]["executable"], "/usr/bin/vim.basic");
        assert_eq!(e["process"]["parent"]["pid"], 4200);
        assert_eq!(e["process"]["user"]["id"], "1000");
        assert_eq!(e["container"]["id"], "containerd://abc123");
        assert_eq!(e["orchestrator"]["namespace"], "default");
        assert_eq!(e["kube_fim"]["after"]["hash"], AFTER);
        assert!(e["file"].get("hash").is_none(), "ECS has no BLAKE3 field");

        let added = ecs(&change(ChangeCategory::Added, vec![]));
        assert_eq!(added["event"]["type"], json!(["creation"]));
        assert!(added.get("process").is_none());
        let removed = ecs(&change(ChangeCategory::Removed, vec![]));
        assert_eq!(removed["event"]["type"], json!(["deletion"]));
        assert_eq!(removed["event"]["action"], "file-removed");
    }

    #[test]
    fn cef_is_one_escaped_line() {
        let mut fc = attributed(change(ChangeCategory::Modified, vec![Attribute::Hash]));
        fc.spec.path = "/etc/a=b|c\\d".into();
        let line = cef(&fc);
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with(&format!(
                "CEF:0|kube-fim|kube-fim|{PRODUCT_VERSION}|file-update|File Modified|5|"
            )),
            "{line}"
        );
        assert!(line.contains(r"filePath=/etc/a\=b|c\\d"), "{line}");
        assert!(line.contains("externalId=node-a-sudoers-4f2a9c"));
        assert!(line.contains(&format!("fileHash={AFTER}")));
        assert!(line.contains(&format!("oldFileHash={BEFORE}")));
        assert!(line.contains("dvchost=node-a"));
        assert!(line.contains("spid=4242 sproc=vi suid=1000 suser=mallory"));
        assert!(line.contains("cs1Label=policy cs1=baseline"));

        let removed = cef(&change(ChangeCategory::Removed, vec![]));
        assert!(removed.contains("|file-delete|File Removed|"));
        assert!(removed.contains(&format!("fileHash={BEFORE}")));
        assert!(!removed.contains("oldFileHash"));
        assert!(!removed.contains("spid="));
        let mut newline = change(ChangeCategory::Added, vec![]);
        newline.spec.policy = "p\nq".into();
        assert!(cef(&newline).contains(r"cs1=p\nq"));
    }

    #[test]
    fn a_sha256_from_the_agent_reaches_every_format_beside_blake3() {
        const SHA: &str = "3333333333333333333333333333333333333333333333333333333333333333";
        let mut fc = change(ChangeCategory::Modified, vec![Attribute::Hash]);
        if let Some(after) = fc.spec.after.as_mut() {
            after.sha256 = Some(SHA.into());
        }
        let o = ocsf(&fc);
        assert_eq!(
            o["file"]["hashes"],
            json!([
                { "algorithm_id": 99, "algorithm": "BLAKE3", "value": AFTER },
                { "algorithm_id": 3, "algorithm": "SHA-256", "value": SHA },
            ])
        );
        let e = ecs(&fc);
        assert_eq!(e["file"]["hash"], json!({ "sha256": SHA }));
        assert_eq!(e["kube_fim"]["after"]["hash"], AFTER);
        let c = cef(&fc);
        assert!(c.contains(&format!("fileHash={SHA} ")), "{c}");
        assert!(c.contains(&format!("cs5Label=blake3 cs5={AFTER}")), "{c}");
        // The state before has BLAKE3 only: never beside a SHA-256 as if
        // the two were comparable.
        assert!(!c.contains("oldFileHash"), "{c}");
        assert!(
            c.contains(&format!("cs6Label=oldBlake3 cs6={BEFORE}")),
            "{c}"
        );

        // A sink asked, the agent could not: no SHA-256 anywhere, BLAKE3 as before.
        if let Some(after) = fc.spec.after.as_mut() {
            after.sha256 = None;
            after.sha256_missing = Some("larger than 1073741824 bytes".into());
        }
        assert_eq!(
            ocsf(&fc)["file"]["hashes"].as_array().map(Vec::len),
            Some(1)
        );
        assert_eq!(
            ocsf(&fc)["unmapped"]["after"]["sha256Missing"],
            "larger than 1073741824 bytes"
        );
        assert!(ecs(&fc)["file"].get("hash").is_none());
        assert!(cef(&fc).contains(&format!("fileHash={AFTER}")));
    }

    #[test]
    fn every_format_carries_the_stable_id() {
        let fc = change(ChangeCategory::Added, vec![]);
        for f in [SinkFormat::Ocsf, SinkFormat::Ecs, SinkFormat::Cef] {
            let line = encode(f, &fc);
            assert!(line.contains("node-a-sudoers-4f2a9c"), "{f:?}: {line}");
            assert!(!line.contains('\n'));
            assert_eq!(encode(f, &fc), line, "deterministic");
        }
    }

    #[test]
    fn a_recorded_storm_is_an_alarm_of_its_entry_with_a_stable_id() {
        use kube_fim_crds::{ChangeStormRecord, FileIntegrityNodeSpec, FileIntegrityNodeStatus};
        let since = at("2026-12-07T05:00:00Z");
        let mut node = FileIntegrityNode::new(
            "node-a",
            FileIntegrityNodeSpec {
                node: "node-a".into(),
            },
        );
        let storm = |last: &str, count| ChangeStormRecord {
            policy: "p".into(),
            entry: "ssh".into(),
            since: Time(since),
            last: Time(at(last)),
            count,
            cap: 100,
        };
        node.status = Some(FileIntegrityNodeStatus {
            storms: vec![storm("2026-12-07T05:00:30Z", 5000)],
            ..FileIntegrityNodeStatus::default()
        });
        let a = alarms(&node);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].id, format!("node-a/storm/p/ssh/{}", since.as_second()));
        assert_eq!(a[0].reason, "ChangeStorm");
        assert_eq!(a[0].entry, Some(("p".into(), "ssh".into())));
        assert!(a[0].message.contains("5000"), "{}", a[0].message);
        // Readers that show more than the message get the record with it.
        let stored = &node.status.as_ref().unwrap().storms[0];
        assert_eq!(
            alarm_records(&node),
            [(a[0].clone(), AlarmRecord::Storm(stored))]
        );
        // The storm lasting longer is the same alarm.
        node.status = Some(FileIntegrityNodeStatus {
            storms: vec![storm("2026-12-07T05:09:00Z", 6000)],
            ..FileIntegrityNodeStatus::default()
        });
        assert_eq!(alarms(&node)[0].id, a[0].id);
    }

    #[test]
    fn an_alarm_is_an_alert_in_every_format_with_its_stable_id() {
        let alarm = Alarm {
            id: "node-a/digest/p/etc/v2-b".into(),
            node: "node-a".into(),
            reason: "EvidenceGap".into(),
            since: "2026-12-07T05:02:00Z".parse().unwrap(),
            message: "entry etc moved; a=b|c\nforged".into(),
            entry: Some(("p".into(), "etc".into())),
        };
        let ecs: Value = serde_json::from_str(&encode_alarm(SinkFormat::Ecs, &alarm)).unwrap();
        assert_eq!(ecs["event"]["kind"], "alert");
        assert_eq!(ecs["event"]["id"], alarm.id.as_str());
        assert_eq!(ecs["@timestamp"], "2026-12-07T05:02:00.000Z");
        assert_eq!(ecs["rule"]["name"], "p");
        let ocsf: Value = serde_json::from_str(&encode_alarm(SinkFormat::Ocsf, &alarm)).unwrap();
        assert_eq!(ocsf["metadata"]["uid"], alarm.id.as_str());
        assert_eq!(ocsf["is_alert"], true);
        let cef = encode_alarm(SinkFormat::Cef, &alarm);
        assert!(cef.starts_with("CEF:0|kube-fim|kube-fim|"), "{cef}");
        assert!(cef.contains("|alarm-EvidenceGap|EvidenceGap|8|"), "{cef}");
        assert!(cef.contains("externalId=node-a/digest/p/etc/v2-b"), "{cef}");
        // What a node wrote cannot start a field or a line of its own.
        assert!(
            cef.contains("msg=entry etc moved; a\\=b|c\\nforged"),
            "{cef}"
        );
        assert!(!cef.contains('\n'));
    }
}
