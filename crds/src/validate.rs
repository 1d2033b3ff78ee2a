//! The CRD's validation rules in Rust, for policies that do not come through the
//! API server (a policy file given to `kube-fim-agent --policy`), and as a
//! re-check in the operator for objects stored under an older schema.
//!
//! Every rule here mirrors one schema constraint or CEL rule of the CRD, with the
//! same field path and, for CEL rules, the same message (both come from
//! [`crate::cel`]). The e2e suite runs the examples through the real API server
//! and through [`validate_policy`] and demands the same verdicts.

use std::collections::HashSet;
use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use thiserror::Error;

use crate::cel;
use crate::compliance::{self, ComplianceRef};
use crate::duration::parse_duration;
use crate::policy::{
    FileIntegrityPolicy, FileIntegrityPolicySpec, MAX_EXCLUDE_LEN, MAX_EXCLUDES, MAX_PATH_LEN,
    MAX_PATHS, MonitoredPath,
};

/// One refused field: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, as the API server writes it (`spec.paths[2].path`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a policy.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for e in &self.0 {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

// The patterns are constants checked by this module's tests, so compiling them cannot fail.
#[allow(clippy::expect_used)]
fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a constant pattern of crate::cel compiles")
}

static DOT_SEGMENT: LazyLock<Regex> = LazyLock::new(|| re(cel::DOT_SEGMENT_RE));
static WILDCARD_NOT_LAST: LazyLock<Regex> = LazyLock::new(|| re(cel::WILDCARD_NOT_LAST_RE));
static UNCLOSED_BRACKET: LazyLock<Regex> = LazyLock::new(|| re(cel::UNCLOSED_BRACKET_RE));
static CONTROL_CHARS: LazyLock<Regex> = LazyLock::new(|| re(cel::CONTROL_CHARS_RE));
static BRACES_BALANCED: LazyLock<Regex> = LazyLock::new(|| re(cel::BRACES_BALANCED_RE));
static WHOLE_HOST: LazyLock<Regex> = LazyLock::new(|| re(cel::WHOLE_HOST_RE));
static DURATION: LazyLock<Regex> = LazyLock::new(|| re(cel::DURATION_RE));
static FRAMEWORK: LazyLock<Regex> = LazyLock::new(|| re(compliance::FRAMEWORK_RE));
static CONTROL: LazyLock<Regex> = LazyLock::new(|| re(compliance::CONTROL_RE));
static ENTRY_NAME: LazyLock<Regex> = LazyLock::new(|| re(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"));
static DNS_SUBDOMAIN: LazyLock<Regex> =
    LazyLock::new(|| re(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"));

/// Validates a whole policy object: its name and its spec.
pub fn validate_policy(policy: &FileIntegrityPolicy) -> Result<(), ValidationErrors> {
    let mut errs = Errors::default();
    match policy.metadata.name.as_deref() {
        None | Some("") => errs.push("metadata.name", "Required value: name is required"),
        Some(name) => {
            if name.len() > 63 {
                errs.push(
                    "metadata.name",
                    "metadata.name must be at most 63 characters: policy names are used as label values",
                );
            } else if !DNS_SUBDOMAIN.is_match(name) {
                errs.push(
                    "metadata.name",
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                );
            }
        }
    }
    if let Err(spec_errs) = validate_spec(&policy.spec) {
        errs.0.extend(spec_errs.0);
    }
    errs.finish()
}

/// Validates a policy spec; field paths start with `spec.`.
pub fn validate_spec(spec: &FileIntegrityPolicySpec) -> Result<(), ValidationErrors> {
    let mut errs = Errors::default();

    if spec.paths.is_empty() && spec.preset.is_none() && spec.containers.is_none() {
        errs.push("spec.paths", cel::HAS_PATHS_OR_PRESET_MSG);
    }
    if let Some(containers) = &spec.containers {
        let bad = containers.exclude.iter().any(|p| {
            !p.starts_with('/')
                || p.len() > 1024
                || (p != "/" && (p.contains("//") || p.ends_with('/')))
                || p.split('/').any(|s| s == "." || s == "..")
                || p.chars()
                    .any(|c| matches!(c, '*' | '?' | '[') || c.is_control())
        });
        if bad {
            errs.push("spec.containers.exclude", cel::CONTAINER_EXCLUDES_MSG);
        }
    }
    if spec.paths.len() > MAX_PATHS {
        errs.push(
            "spec.paths",
            format!(
                "Too many: {}: must have at most {MAX_PATHS} items",
                spec.paths.len()
            ),
        );
    }
    let mut names = HashSet::new();
    for (i, entry) in spec.paths.iter().enumerate() {
        let field = format!("spec.paths[{i}]");
        if !names.insert(entry.name.as_str()) {
            errs.push(
                field.clone(),
                format!("Duplicate value: entry name {:?} is used twice", entry.name),
            );
        }
        validate_entry(entry, &field, &mut errs);
    }

    validate_compliance(&spec.compliance, "spec.compliance", &mut errs);

    if spec.node_selector.len() > 32 {
        errs.push(
            "spec.nodeSelector",
            format!(
                "Too many: {}: must have at most 32 items",
                spec.node_selector.len()
            ),
        );
    }
    if spec.tolerations.len() > 32 {
        errs.push(
            "spec.tolerations",
            format!(
                "Too many: {}: must have at most 32 items",
                spec.tolerations.len()
            ),
        );
    }
    duration_in(
        "spec.scanInterval",
        &spec.scan_interval,
        "1m",
        "168h",
        cel::SCAN_INTERVAL_MSG,
        &mut errs,
    );
    duration_in(
        "spec.debounce",
        &spec.debounce,
        "0s",
        "60s",
        cel::DEBOUNCE_MSG,
        &mut errs,
    );
    range(
        "spec.maxChangesPerNodePerMinute",
        u64::from(spec.max_changes_per_node_per_minute),
        1,
        10000,
        &mut errs,
    );
    duration_in(
        "spec.retention.maxAge",
        &spec.retention.max_age,
        "1h",
        "8760h",
        cel::RETENTION_AGE_MSG,
        &mut errs,
    );
    range(
        "spec.retention.maxCount",
        u64::from(spec.retention.max_count),
        1,
        100000,
        &mut errs,
    );
    errs.finish()
}

fn validate_entry(entry: &MonitoredPath, field: &str, errs: &mut Errors) {
    let name_field = format!("{field}.name");
    if entry.name.is_empty() || entry.name.len() > 63 {
        errs.push(&name_field, "must be between 1 and 63 characters long");
    } else if !ENTRY_NAME.is_match(&entry.name) {
        errs.push(
            &name_field,
            "should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$': lowercase letters, digits and '-'",
        );
    }

    let path_field = format!("{field}.path");
    let path = entry.path.as_str();
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        errs.push(
            &path_field,
            format!("must be between 1 and {MAX_PATH_LEN} bytes long"),
        );
    }
    if !path.starts_with('/') {
        errs.push(&path_field, cel::PATH_ABSOLUTE_MSG);
    }
    if path != "/" && (path.contains("//") || path.ends_with('/')) {
        errs.push(&path_field, cel::PATH_NO_EMPTY_SEGMENT_MSG);
    }
    if DOT_SEGMENT.is_match(path) {
        errs.push(&path_field, cel::PATH_NO_DOT_SEGMENT_MSG);
    }
    if WILDCARD_NOT_LAST.is_match(path) {
        errs.push(&path_field, cel::PATH_WILDCARD_LAST_MSG);
    }
    if UNCLOSED_BRACKET.is_match(path) {
        errs.push(&path_field, cel::PATH_BRACKETS_CLOSED_MSG);
    }
    if CONTROL_CHARS.is_match(path) {
        errs.push(&path_field, cel::NO_CONTROL_CHARS_MSG);
    }
    if entry.recursive && WHOLE_HOST.is_match(path) && !entry.allow_whole_host {
        errs.push(&path_field, cel::WHOLE_HOST_MSG);
    }

    let exclude_field = format!("{field}.exclude");
    if entry.exclude.len() > MAX_EXCLUDES {
        errs.push(
            &exclude_field,
            format!(
                "Too many: {}: must have at most {MAX_EXCLUDES} items",
                entry.exclude.len()
            ),
        );
    }
    for (j, glob) in entry.exclude.iter().enumerate() {
        if glob.is_empty() || glob.len() > MAX_EXCLUDE_LEN {
            errs.push(
                format!("{exclude_field}[{j}]"),
                format!("must be between 1 and {MAX_EXCLUDE_LEN} bytes long"),
            );
        }
    }
    if entry
        .exclude
        .iter()
        .any(|g| CONTROL_CHARS.is_match(g) || UNCLOSED_BRACKET.is_match(g))
    {
        errs.push(&exclude_field, cel::EXCLUDES_VALID_MSG);
    }
    if entry.exclude.iter().any(|g| !BRACES_BALANCED.is_match(g)) {
        errs.push(&exclude_field, cel::EXCLUDES_BRACES_MSG);
    }
    // The agent's own compiler has the last word.
    for (j, g) in entry.exclude.iter().enumerate() {
        if let Err(e) = crate::glob::exclude(g) {
            errs.push(
                format!("{exclude_field}[{j}]"),
                format!("invalid glob: {e}"),
            );
        }
    }
    if let Some((_, last)) = crate::glob::last_segment_pattern(path)
        && let Err(e) = crate::glob::path_pattern(last)
    {
        errs.push(&path_field, format!("invalid glob: {e}"));
    }

    validate_compliance(&entry.compliance, &format!("{field}.compliance"), errs);

    let mut seen = HashSet::new();
    for (j, a) in entry.attributes.iter().enumerate() {
        if !seen.insert(a) {
            errs.push(
                format!("{field}.attributes[{j}]"),
                format!("Duplicate value: {a:?} is listed twice"),
            );
        }
    }
}

/// A list of compliance references (`spec.compliance`, an entry's
/// `compliance`): bounded, one per framework, each a label key and value.
fn validate_compliance(refs: &[ComplianceRef], field: &str, errs: &mut Errors) {
    if refs.len() > compliance::MAX_REFS {
        errs.push(
            field,
            format!(
                "Too many: {}: must have at most {} items",
                refs.len(),
                compliance::MAX_REFS
            ),
        );
    }
    let mut frameworks = HashSet::new();
    for (i, r) in refs.iter().enumerate() {
        let at = format!("{field}[{i}]");
        if !frameworks.insert(r.framework.as_str()) {
            errs.push(
                &at,
                format!(
                    "Duplicate value: framework {:?} is listed twice (one control per framework)",
                    r.framework
                ),
            );
        }
        let framework_field = format!("{at}.framework");
        if r.framework.is_empty() || r.framework.len() > compliance::MAX_FRAMEWORK_LEN {
            errs.push(
                &framework_field,
                format!(
                    "Too long: must be between 1 and {} characters long",
                    compliance::MAX_FRAMEWORK_LEN
                ),
            );
        }
        if !FRAMEWORK.is_match(&r.framework) {
            errs.push(&framework_field, compliance::FRAMEWORK_MSG);
        }
        let control_field = format!("{at}.control");
        if r.control.is_empty() || r.control.len() > compliance::MAX_CONTROL_LEN {
            errs.push(
                &control_field,
                format!(
                    "Too long: must be between 1 and {} characters long",
                    compliance::MAX_CONTROL_LEN
                ),
            );
        }
        if !CONTROL.is_match(&r.control) {
            errs.push(&control_field, compliance::CONTROL_MSG);
        }
    }
}

fn duration_in(field: &str, value: &str, min: &str, max: &str, message: &str, errs: &mut Errors) {
    let ok = DURATION.is_match(value)
        && match (
            parse_duration(value),
            parse_duration(min),
            parse_duration(max),
        ) {
            (Ok(v), Ok(lo), Ok(hi)) => lo <= v && v <= hi,
            _ => false,
        };
    if value.len() > 32 {
        errs.push(field, "must be at most 32 characters long");
    }
    if !ok {
        errs.push(field, message);
    }
}

fn range(field: &str, value: u64, min: u64, max: u64, errs: &mut Errors) {
    if value < min {
        errs.push(field, format!("should be greater than or equal to {min}"));
    }
    if value > max {
        errs.push(field, format!("should be less than or equal to {max}"));
    }
}

/// Reading a policy file from disk.
#[derive(Debug, Error)]
pub enum PolicyFileError {
    /// The file is not a YAML (or JSON) document.
    #[error("not a FileIntegrityPolicy: {0}")]
    Parse(#[from] serde_saphyr::Error),
    /// A field of the document does not fit the API's types.
    #[error("not a FileIntegrityPolicy: {path}: {message}")]
    Field {
        /// Where, as the API server names fields (`spec.preset`).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The document has another apiVersion or kind.
    #[error(
        "expected apiVersion fim.kube-fim.io/v1alpha1 and kind FileIntegrityPolicy, found {api_version} {kind}"
    )]
    WrongKind {
        /// apiVersion found.
        api_version: String,
        /// kind found.
        kind: String,
    },
    /// The policy breaks a rule the API server would enforce.
    #[error("invalid policy: {0}")]
    Invalid(#[from] ValidationErrors),
}

/// Parses and validates a policy written as YAML (or JSON), exactly as a user
/// would `kubectl apply` it; unknown fields are refused.
pub fn policy_from_yaml(text: &str) -> Result<FileIntegrityPolicy, PolicyFileError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        #[serde(default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    let head: Head = serde_saphyr::from_str(text)?;
    if head.api_version != "fim.kube-fim.io/v1alpha1" || head.kind != "FileIntegrityPolicy" {
        return Err(PolicyFileError::WrongKind {
            api_version: head.api_version,
            kind: head.kind,
        });
    }
    // Through a generic document, so the error names the field it is about.
    let document: serde_json::Value = serde_saphyr::from_str(text)?;
    let policy: FileIntegrityPolicy =
        serde_path_to_error::deserialize(document).map_err(|e| PolicyFileError::Field {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    validate_policy(&policy)?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Preset, Retention};

    fn entry(name: &str, path: &str) -> MonitoredPath {
        MonitoredPath {
            name: name.into(),
            path: path.into(),
            ..MonitoredPath::default()
        }
    }

    fn errors_of(spec: &FileIntegrityPolicySpec) -> Vec<FieldError> {
        validate_spec(spec).err().map(|e| e.0).unwrap_or_default()
    }

    fn single_path_error(path: &str) -> Vec<FieldError> {
        errors_of(&FileIntegrityPolicySpec::with_paths(vec![entry("e", path)]))
    }

    #[test]
    fn accepts_good_paths() {
        for p in [
            "/etc/passwd",
            "/etc/*.conf",
            "/etc/ssh",
            "/",
            "/*",
            "/usr/lib/x86_64-linux-gnu/security/pam_[a-z]*.so",
            "/etc/.hidden",
            "/var/log/..weird",
        ] {
            assert_eq!(single_path_error(p), vec![], "{p}");
        }
    }

    #[test]
    fn refuses_bad_paths_naming_the_field() {
        let cases = [
            ("etc/passwd", cel::PATH_ABSOLUTE_MSG),
            ("/etc//passwd", cel::PATH_NO_EMPTY_SEGMENT_MSG),
            ("/etc/", cel::PATH_NO_EMPTY_SEGMENT_MSG),
            ("/etc/../root", cel::PATH_NO_DOT_SEGMENT_MSG),
            ("/etc/./passwd", cel::PATH_NO_DOT_SEGMENT_MSG),
            ("/..", cel::PATH_NO_DOT_SEGMENT_MSG),
            ("/etc/*/passwd", cel::PATH_WILDCARD_LAST_MSG),
            ("/home/us?r/.ssh", cel::PATH_WILDCARD_LAST_MSG),
            ("/etc/[abc/x", cel::PATH_WILDCARD_LAST_MSG),
            ("/etc/pam[.d", cel::PATH_BRACKETS_CLOSED_MSG),
            ("/etc/pass\nwd", cel::NO_CONTROL_CHARS_MSG),
        ];
        for (path, msg) in cases {
            let errs = single_path_error(path);
            assert!(
                errs.iter()
                    .any(|e| e.field == "spec.paths[0].path" && e.message == msg),
                "{path:?}: {errs:?}"
            );
        }
    }

    #[test]
    fn globs_the_agent_cannot_compile_are_refused() {
        for glob in ["*.{bak,swp", "a{b,{c}}", "x}", "tail\\"] {
            let mut e = entry("etc", "/etc");
            e.exclude = vec![glob.into()];
            let errs = errors_of(&FileIntegrityPolicySpec::with_paths(vec![e]));
            assert!(
                errs.iter()
                    .any(|e| e.field.starts_with("spec.paths[0].exclude")),
                "{glob}: {errs:?}"
            );
        }
        let mut e = entry("etc", "/etc");
        e.exclude = vec!["*.{bak,swp}".into(), "/etc/cache/**".into()];
        assert!(errors_of(&FileIntegrityPolicySpec::with_paths(vec![e])).is_empty());
    }

    #[test]
    fn whole_host_recursion_needs_explicit_permission() {
        for path in ["/", "/*"] {
            let mut e = entry("all", path);
            e.recursive = true;
            let errs = errors_of(&FileIntegrityPolicySpec::with_paths(vec![e.clone()]));
            assert_eq!(
                errs,
                vec![FieldError {
                    field: "spec.paths[0].path".into(),
                    message: cel::WHOLE_HOST_MSG.into()
                }]
            );
            e.allow_whole_host = true;
            assert_eq!(
                errors_of(&FileIntegrityPolicySpec::with_paths(vec![e])),
                vec![]
            );
        }
    }

    #[test]
    fn refuses_empty_policy_and_duplicate_names() {
        let errs = errors_of(&FileIntegrityPolicySpec::with_paths(vec![]));
        assert_eq!(errs[0].field, "spec.paths");
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![]);
        spec.preset = Some(Preset::Recommended);
        assert_eq!(errors_of(&spec), vec![]);

        let errs = errors_of(&FileIntegrityPolicySpec::with_paths(vec![
            entry("a", "/a"),
            entry("a", "/b"),
        ]));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.paths[1]");
    }

    #[test]
    fn refuses_out_of_range_durations_and_limits() {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![entry("a", "/a")]);
        spec.scan_interval = "10s".into();
        spec.debounce = "2m".into();
        spec.max_changes_per_node_per_minute = 0;
        spec.retention = Retention {
            max_age: "1d".into(),
            max_count: 1_000_000,
            delete_unapproved: false,
        };
        let fields: Vec<String> = errors_of(&spec).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "spec.scanInterval",
                "spec.debounce",
                "spec.maxChangesPerNodePerMinute",
                "spec.retention.maxAge",
                "spec.retention.maxCount"
            ]
        );
    }

    #[test]
    fn refuses_too_many_entries_and_bad_names() {
        let many: Vec<_> = (0..=MAX_PATHS)
            .map(|i| entry(&format!("e{i}"), "/etc"))
            .collect();
        let errs = errors_of(&FileIntegrityPolicySpec::with_paths(many));
        assert!(
            errs.iter()
                .any(|e| e.field == "spec.paths" && e.message.starts_with("Too many"))
        );
        let errs = errors_of(&FileIntegrityPolicySpec::with_paths(vec![entry(
            "Bad_Name", "/etc",
        )]));
        assert_eq!(errs[0].field, "spec.paths[0].name");
    }

    #[test]
    fn reads_policy_files_strictly() {
        let good = "apiVersion: fim.kube-fim.io/v1alpha1\nkind: FileIntegrityPolicy\nmetadata: {name: p}\nspec:\n  paths:\n  - {name: etc, path: /etc, recursive: true}\n";
        let p = policy_from_yaml(good);
        assert!(p.is_ok(), "{p:?}");
        if let Ok(p) = p {
            assert_eq!(p.spec.scan_interval, "1h");
            assert!(p.spec.paths[0].enabled);
        }
        // An unknown field is refused, named where it is.
        let typo = good.replace("recursive", "recursiv");
        let err = policy_from_yaml(&typo)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("spec.paths[0].recursiv: unknown field `recursiv`")
                || err.contains("spec.paths[0]: unknown field `recursiv`"),
            "{err}"
        );
        // Not YAML at all.
        assert!(matches!(
            policy_from_yaml("spec: [unclosed"),
            Err(PolicyFileError::Parse(_))
        ));
        let bad = good.replace("/etc,", "etc,");
        let err = policy_from_yaml(&bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("spec.paths[0].path: must be an absolute path"),
            "{err}"
        );
        let wrong = good.replace("FileIntegrityPolicy", "ConfigMap");
        assert!(matches!(
            policy_from_yaml(&wrong),
            Err(PolicyFileError::WrongKind { .. })
        ));
    }
}
