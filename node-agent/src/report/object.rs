//! A detected change as the object the API server stores: its deterministic
//! name and its labels.

use std::collections::BTreeMap;

use kube_fim_crds::labels::{self, label_value};
use kube_fim_crds::{FileAttributes, FileChange, FileChangeSpec};

/// Longest node-name prefix kept in object names (names are at most 253
/// bytes: the node, a sequence number, a digest and a suffix of
/// [`squat_free_name`] fit).
const NODE_PREFIX_MAX: usize = 180;

/// What a change is, whatever its number: a digest of node, policy, entry,
/// path, category, the before/after attributes and the path's epoch, not the
/// detection time. Detecting the same transition again (e.g. after a crash
/// between queueing it and recording the new baseline) yields the same
/// identity, which is how a resumed number is found again
/// ([`super::sequence`]).
pub fn identity(spec: &FileChangeSpec, epoch: u64) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [
        spec.node.as_str(),
        spec.policy.as_str(),
        spec.entry.as_str(),
        spec.path.as_str(),
        spec.category.as_str(),
    ] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    for attrs in [&spec.before, &spec.after] {
        let attrs = without_fingerprints(attrs);
        let json = serde_json::to_vec(&attrs).unwrap_or_default();
        hasher.update(&(json.len() as u64).to_le_bytes());
        hasher.update(&json);
    }
    if let Some(items) = super::transaction::items(spec) {
        // A transaction is the transitions it lists (not when it closed).
        for i in items {
            let after = without_fingerprints(&i.after);
            let json =
                serde_json::to_vec(&(&i.path, i.category, &i.before, &after)).unwrap_or_default();
            hasher.update(&(json.len() as u64).to_le_bytes());
            hasher.update(&json);
        }
    }
    if epoch > 0 {
        // The same transition again after the path returned to or was
        // approved into its baseline: a new report.
        hasher.update(b"epoch");
        hasher.update(&epoch.to_le_bytes());
    }
    if let Some(container) = &spec.container {
        // Replicas drifting alike are changes of their own.
        hasher.update(b"container");
        hasher.update(container.id.as_bytes());
    }
    if spec.restored == Some(true) {
        // A state the file left within the window is not the same
        // transition as the file staying in it.
        hasher.update(b"restored");
    }
    if let Some(summary) = &spec.summary {
        // Summaries of one window are one object.
        hasher.update(summary.window_start.0.to_string().as_bytes());
    }
    hasher.finalize().to_hex()[..20].to_string()
}

/// A state without the SHA-256 the reporter may add ([`super::fingerprint`]):
/// a transition's identity is the same whether or not a sink asked for one
/// (the monitor names a change before the reporter reads it, and a change
/// detected again after a crash may be read otherwise).
fn without_fingerprints(attrs: &Option<FileAttributes>) -> Option<FileAttributes> {
    attrs.clone().map(|mut a| {
        a.sha256 = None;
        a.sha256_missing = None;
        a
    })
}

/// The object name of a change: the node first, then its sequence number
/// (see [`super::sequence`]), then its [`identity`].
///
/// The sequence number makes a recurrence (the same before and after again,
/// with no approval in between) a name of its own; the identity makes a
/// retry of the same numbered transition the same name, so the API server's
/// AlreadyExists, checked against the stored object, makes delivery
/// exactly-once. A change without a number (a Summary) is named by its
/// identity alone.
pub fn object_name(spec: &FileChangeSpec, epoch: u64) -> String {
    let id = identity(spec, epoch);
    let mut node: String = spec
        .node
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    node.truncate(NODE_PREFIX_MAX);
    let node = node.trim_matches(|c| c == '-' || c == '.');
    let node = if node.is_empty() { "fc" } else { node };
    match spec.sequence {
        Some(seq) => format!("{node}-{seq}-{id}"),
        None => format!("{node}-{id}"),
    }
}

/// The identity part of an object name made by [`object_name`].
pub fn identity_of_name(name: &str) -> Option<&str> {
    name.rsplit_once('-')
        .map(|(_, id)| id)
        .filter(|id| id.len() == 20 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Deterministic alternatives tried before a random one.
const SQUAT_TRIES: u32 = 3;

/// The name to report a change under when `name` is held by a different
/// object (squatted): `name-s1`, `name-s2`, ... (the same after a crash, so a
/// retry stays exactly-once), then a random suffix nobody can predict.
pub fn squat_free_name(name: &str, attempt: u32) -> String {
    if attempt <= SQUAT_TRIES {
        format!("{name}-s{attempt}")
    } else {
        format!("{name}-r{:016x}", fastrand::u64(..))
    }
}

/// Longest path or link target the schema accepts (escaped bytes count 4).
pub const TEXT_MAX: usize = 4096;

/// `text` if it fits in `max` bytes; otherwise its head, its length and a
/// digest of the whole, so two long paths that share a head stay apart.
pub fn shorten_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let digest = blake3::hash(text.as_bytes()).to_hex();
    let tail = format!("…[{} bytes, blake3 {}]", text.len(), &digest[..32]);
    let mut cut = max.saturating_sub(tail.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &text[..cut])
}

/// The report with its long texts (path, link targets, sample paths) cut to
/// `max` bytes each with a digest of the whole: what is sent when the API
/// server refuses a report, rather than dropping it.
pub fn shorten(change: &FileChange, max: usize) -> FileChange {
    let mut out = change.clone();
    let spec = &mut out.spec;
    spec.path = shorten_text(&spec.path, max);
    for attrs in [&mut spec.before, &mut spec.after].into_iter().flatten() {
        if let Some(t) = attrs.link_target.as_deref() {
            attrs.link_target = Some(shorten_text(t, max));
        }
        if let Some(m) = attrs.mount.as_mut() {
            for text in [&mut m.mount_point, &mut m.source, &mut m.root] {
                *text = shorten_text(text, max);
            }
            m.fs_type = shorten_text(&m.fs_type, max.min(256));
        }
    }
    let items = spec
        .package
        .as_mut()
        .and_then(|p| p.transaction.as_mut())
        .map(|t| t.changes.iter_mut());
    for item in items.into_iter().flatten() {
        item.path = shorten_text(&item.path, max);
        for attrs in [&mut item.before, &mut item.after].into_iter().flatten() {
            if let Some(t) = attrs.link_target.as_deref() {
                attrs.link_target = Some(shorten_text(t, max));
            }
        }
    }
    if let Some(summary) = spec.summary.as_mut() {
        summary.sample_paths.truncate(storm_sample_limit());
        for p in &mut summary.sample_paths {
            *p = shorten_text(p, max);
        }
    }
    out
}

/// Sample paths kept in a Summary (written by agents before storms were
/// paced; one may still wait in a queue after an upgrade).
fn storm_sample_limit() -> usize {
    20
}

/// The FileChange object for a change, named and labelled. The name covers
/// the whole change; texts longer than the schema allows are shortened.
pub fn to_object(spec: FileChangeSpec, epoch: u64) -> FileChange {
    let name = object_name(&spec, epoch);
    let mut labels = BTreeMap::from([
        (labels::NODE.to_string(), label_value(&spec.node)),
        (labels::POLICY.to_string(), label_value(&spec.policy)),
        (
            labels::CATEGORY.to_string(),
            spec.category.as_str().to_string(),
        ),
        (labels::ENTRY.to_string(), label_value(&spec.entry)),
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
    ]);
    if let Some(p) = &spec.package {
        labels.insert(labels::PACKAGE.to_string(), p.verdict.as_str().to_string());
    }
    if let Some(c) = &spec.container {
        labels.insert(labels::NAMESPACE.to_string(), label_value(&c.namespace));
        labels.insert(labels::POD.to_string(), label_value(&c.pod));
    }
    let mut object = FileChange::new(&name, spec);
    object.metadata.labels = Some(labels);
    shorten(&object, TEXT_MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;
    use kube_fim_crds::{ChangeCategory, DetectionSource};

    fn spec(ctime_secs: i64, detected: Timestamp) -> FileChangeSpec {
        FileChangeSpec {
            node: "Worker-1.example".into(),
            policy: "p".into(),
            entry: "etc".into(),
            path: "/etc/passwd".into(),
            category: ChangeCategory::Modified,
            changed_attributes: vec![],
            before: Some(FileAttributes {
                size: Some(1),
                ..FileAttributes::default()
            }),
            after: Some(FileAttributes {
                size: Some(2),
                ctime: Some(MicroTime(Timestamp::from_second(ctime_secs).unwrap())),
                ..FileAttributes::default()
            }),
            detected_time: MicroTime(detected),
            source: DetectionSource::Realtime,
            process: None,
            summary: None,
            sequence: None,
            package: None,
            restored: None,
            container: None,
        }
    }

    #[test]
    fn a_sha256_does_not_change_the_name() {
        // Named by the monitor before the reporter adds it, and a crash's
        // second detection may read the file otherwise.
        let at = Timestamp::now();
        let plain = spec(100, at);
        let mut with = plain.clone();
        if let Some(a) = with.after.as_mut() {
            a.sha256 = Some("3".repeat(64));
        }
        assert_eq!(object_name(&plain, 0), object_name(&with, 0));
        if let Some(a) = with.after.as_mut() {
            a.sha256 = None;
            a.sha256_missing = Some("larger than 1024 bytes".into());
        }
        assert_eq!(identity(&plain, 0), identity(&with, 0));
    }

    #[test]
    fn the_same_transition_detected_twice_has_one_name() {
        let t = Timestamp::now();
        let later = t + std::time::Duration::from_secs(60);
        assert_eq!(
            object_name(&spec(100, t), 3),
            object_name(&spec(100, later), 3)
        );
    }

    #[test]
    fn a_repeated_change_gets_a_new_name() {
        let t = Timestamp::now();
        assert_ne!(object_name(&spec(100, t), 0), object_name(&spec(101, t), 0));
        // The same states after an approval: a recurrence, not a retry.
        assert_ne!(object_name(&spec(100, t), 0), object_name(&spec(100, t), 1));
    }

    #[test]
    fn names_are_valid_object_names_with_the_node_first() {
        let name = object_name(&spec(1, Timestamp::now()), 0);
        assert!(name.starts_with("worker-1.example-"), "{name}");
        assert!(name.len() <= 253);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        );
    }

    #[test]
    fn a_recurrence_of_the_same_states_has_a_name_of_its_own() {
        let t = Timestamp::now();
        let (mut first, mut again) = (spec(100, t), spec(100, t));
        first.sequence = Some(4);
        again.sequence = Some(6);
        let (a, b) = (object_name(&first, 0), object_name(&again, 0));
        assert_ne!(a, b);
        assert!(a.starts_with("worker-1.example-4-"), "{a}");
        assert_eq!(identity_of_name(&a), Some(identity(&first, 0).as_str()));
        assert_eq!(identity_of_name(&a), identity_of_name(&b));
        let long = FileChangeSpec {
            node: "n".repeat(253),
            sequence: Some(u64::MAX),
            ..first
        };
        let name = squat_free_name(&object_name(&long, u64::MAX), SQUAT_TRIES + 1);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(
            squat_free_name("x", 1),
            squat_free_name("x", 2),
            "each try a new name"
        );
    }

    #[test]
    fn long_texts_are_shortened_with_a_digest_not_dropped() {
        let mut s = spec(1, Timestamp::now());
        s.path = format!("/{}", "\\xff".repeat(2000));
        let other = format!("{}x", s.path);
        let o = to_object(s.clone(), 0);
        assert!(o.spec.path.len() <= TEXT_MAX, "{}", o.spec.path.len());
        assert!(o.spec.path.contains("blake3"), "{}", o.spec.path);
        assert_ne!(shorten_text(&s.path, 100), shorten_text(&other, 100));
        assert_eq!(o.metadata.name, Some(object_name(&s, 0)));
        assert_eq!(shorten_text("/etc/passwd", 100), "/etc/passwd");
        assert!(shorten_text(&"é".repeat(300), 101).len() <= 101);
    }

    #[test]
    fn objects_carry_the_filter_labels() {
        let o = to_object(spec(1, Timestamp::now()), 0);
        let l = o.metadata.labels.unwrap();
        assert_eq!(l[labels::NODE], "Worker-1.example");
        assert_eq!(l[labels::CATEGORY], "Modified");
        assert_eq!(l[labels::POLICY], "p");
    }
}
