//! Compliance references: which control of which framework a policy entry is
//! evidence for (PCI DSS 4.0 11.5.2, CIS 1.3.2, NIST 800-53 SI-7).
//!
//! A reference is the policy's word, never a node's: the operator labels each
//! FileChange with the references of its policy entry
//! (`compliance.kube-fim.io/<framework>=<control>`), and the metrics and the
//! compliance report derive them from the policies too. An agent cannot set
//! those labels (the admission policy allows it kube-fim's filter labels
//! only), so root on a node can neither add a change to a control nor take
//! one out of it.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{FileIntegrityPolicySpec, MonitoredPath, Preset};

/// Most references one list (a policy's, or an entry's) may hold.
pub const MAX_REFS: usize = 8;
/// Longest framework name: `compliance.kube-fim.io/<framework>` is a label key,
/// whose name part is at most 63 characters.
pub const MAX_FRAMEWORK_LEN: usize = 40;
/// Longest control: a label value.
pub const MAX_CONTROL_LEN: usize = 63;

/// Prefix of the label keys the operator sets on FileChanges.
pub const LABEL_PREFIX: &str = "compliance.kube-fim.io/";

/// Framework names: a label key's name part, lowercase.
pub const FRAMEWORK_RULE: &str = "self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')";
/// Pattern of [`FRAMEWORK_RULE`].
pub const FRAMEWORK_RE: &str = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
pub const FRAMEWORK_MSG: &str = "framework must be lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 40 characters (it names the label compliance.kube-fim.io/<framework>), such as pci-dss-4.0";
/// Controls: a label value.
pub const CONTROL_RULE: &str = "self.matches('^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$')";
/// Pattern of [`CONTROL_RULE`].
pub const CONTROL_RE: &str = "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";
pub const CONTROL_MSG: &str = "control must be letters, digits, '-', '_' and '.', starting and ending with a letter or digit, at most 63 characters (it is the value of the label compliance.kube-fim.io/<framework>), such as 11.5.2 or SI-7";

/// One control of one compliance framework that changes under an entry are
/// evidence for. One control per framework and list: a FileChange's label
/// `compliance.kube-fim.io/<framework>` holds one value.
#[derive(
    KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ComplianceRef {
    /// The framework and its version, lowercase: `pci-dss-4.0`,
    /// `cis-dil-2.0` (CIS Distribution Independent Linux), `nist-800-53-r5`.
    #[schemars(length(min = 1, max = 40))]
    #[x_kube(validation = kube::core::Rule::new(FRAMEWORK_RULE).message(FRAMEWORK_MSG))]
    pub framework: String,
    /// The control within it: `11.5.2`, `1.3.2`, `SI-7`.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new(CONTROL_RULE).message(CONTROL_MSG))]
    pub control: String,
}

impl ComplianceRef {
    pub fn new(framework: &str, control: &str) -> Self {
        ComplianceRef {
            framework: framework.into(),
            control: control.into(),
        }
    }

    /// The FileChange label key of this reference's framework.
    pub fn label_key(&self) -> String {
        format!("{LABEL_PREFIX}{}", self.framework)
    }
}

/// The controls the `recommended` preset's entries are evidence for: PCI DSS
/// 4.0 requirement 11.5.2 (a change-detection mechanism alerts on
/// unauthorized modification of critical files and compares them at least
/// weekly), CIS Distribution Independent Linux 2.0.0 recommendation 1.3.2
/// (filesystem integrity is regularly checked) and NIST SP 800-53 rev. 5
/// SI-7 (software, firmware and information integrity).
pub const RECOMMENDED_REFS: &[(&str, &str)] = &[
    ("pci-dss-4.0", "11.5.2"),
    ("cis-dil-2.0", "1.3.2"),
    ("nist-800-53-r5", "SI-7"),
];

impl Preset {
    /// The references the preset gives each of its entries.
    pub fn compliance(self) -> Vec<ComplianceRef> {
        match self {
            Preset::Recommended => RECOMMENDED_REFS
                .iter()
                .map(|(f, c)| ComplianceRef::new(f, c))
                .collect(),
        }
    }
}

impl FileIntegrityPolicySpec {
    /// The references of entry `entry`: the preset's (for an entry of the
    /// preset, by name), then the policy's `compliance`, then the entry's own,
    /// a later one replacing an earlier one of the same framework. Sorted by
    /// framework.
    pub fn compliance_of(&self, entry: &str) -> Vec<ComplianceRef> {
        let mut out: BTreeMap<&str, &str> = BTreeMap::new();
        let preset = self
            .preset
            .filter(|p| p.entries().iter().any(|e| e.name == entry))
            .map(Preset::compliance)
            .unwrap_or_default();
        let own = self
            .paths
            .iter()
            .find(|e| e.name == entry)
            .map(|e| e.compliance.as_slice())
            .unwrap_or_default();
        for r in preset.iter().chain(&self.compliance).chain(own) {
            out.insert(&r.framework, &r.control);
        }
        out.into_iter()
            .map(|(f, c)| ComplianceRef::new(f, c))
            .collect()
    }

    /// The references of a change of `path` filed under `entry`: see
    /// [`ComplianceMap::of_change`] (build the map once for many changes).
    pub fn compliance_of_change(&self, entry: &str, path: Option<&str>) -> Vec<ComplianceRef> {
        self.compliance_map().of_change(entry, path)
    }

    /// The references of every entry, with what each covers.
    pub fn compliance_map(&self) -> ComplianceMap {
        let entries: Vec<MappedEntry> = self
            .effective_paths()
            .into_iter()
            .map(|e| MappedEntry {
                refs: self.compliance_of(&e.name),
                matcher: crate::glob::last_segment_pattern(&e.path)
                    .and_then(|(_, last)| crate::glob::path_pattern(last).ok())
                    .map(|g| g.compile_matcher()),
                entry: e,
            })
            .collect();
        ComplianceMap {
            any: entries.iter().any(|e| !e.refs.is_empty()),
            entries,
            policy: self.compliance_of(""),
        }
    }

    /// Every reference of any entry, each once, sorted.
    pub fn all_compliance(&self) -> Vec<ComplianceRef> {
        let mut all: Vec<ComplianceRef> = self
            .effective_paths()
            .iter()
            .flat_map(|e| self.compliance_of(&e.name))
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// A policy's entries with their references and matchers, for finding the
/// references of many changes.
#[derive(Debug)]
pub struct ComplianceMap {
    entries: Vec<MappedEntry>,
    /// The references of an entry the policy does not have (the policy's own).
    policy: Vec<ComplianceRef>,
    any: bool,
}

#[derive(Debug)]
struct MappedEntry {
    entry: MonitoredPath,
    matcher: Option<globset::GlobMatcher>,
    refs: Vec<ComplianceRef>,
}

impl ComplianceMap {
    /// The references of entry `entry`.
    pub fn of_entry(&self, entry: &str) -> Vec<ComplianceRef> {
        self.entries
            .iter()
            .find(|e| e.entry.name == entry)
            .map_or_else(|| self.policy.clone(), |e| e.refs.clone())
    }

    /// The references of a change of host path `path` that a node filed
    /// under entry `entry`. The node's word is not taken for the entry:
    /// every enabled entry whose path covers `path` gives its references
    /// (the claimed entry's first, per framework, when it covers the path),
    /// so a change of /usr/bin/sudo filed under an entry without references
    /// is still evidence for the controls of the entry watching /usr/bin. A
    /// path no entry covers (a summary) has the claimed entry's, and so has
    /// a change inside a container (`path` None: its path is not the host's).
    pub fn of_change(&self, entry: &str, path: Option<&str>) -> Vec<ComplianceRef> {
        if !self.any {
            return Vec::new();
        }
        let Some(path) = path else {
            return self.of_entry(entry);
        };
        let covering: Vec<&MappedEntry> = self
            .entries
            .iter()
            .filter(|e| e.entry.enabled && e.entry.covers_with(path, e.matcher.as_ref()))
            .collect();
        if covering.is_empty() {
            return self.of_entry(entry);
        }
        let mut out: BTreeMap<&str, &str> = BTreeMap::new();
        let claimed = covering.iter().filter(|e| e.entry.name == entry);
        let others = covering.iter().filter(|e| e.entry.name != entry);
        for e in claimed.chain(others) {
            for r in &e.refs {
                out.entry(&r.framework).or_insert(&r.control);
            }
        }
        out.into_iter()
            .map(|(f, c)| ComplianceRef::new(f, c))
            .collect()
    }
}

impl MonitoredPath {
    /// Whether a change of host path `path` (escaped as in FileChanges) falls
    /// under this entry: the entry's file, a direct entry of its directory
    /// (or any below it, recursive), the same for each directory a wildcard
    /// of the last segment matches. Excludes are not looked at.
    pub fn covers(&self, path: &str) -> bool {
        let matcher = crate::glob::last_segment_pattern(&self.path)
            .and_then(|(_, last)| crate::glob::path_pattern(last).ok())
            .map(|g| g.compile_matcher());
        self.covers_with(path, matcher.as_ref())
    }

    /// [`MonitoredPath::covers`] with the last segment's matcher compiled.
    fn covers_with(&self, path: &str, matcher: Option<&globset::GlobMatcher>) -> bool {
        let below = |root: &str, path: &str| -> bool {
            let root = root.trim_end_matches('/');
            match path.strip_prefix(root) {
                Some("") => true,
                Some(rest) => rest
                    .strip_prefix('/')
                    .is_some_and(|rest| self.recursive || !rest.contains('/')),
                None => false,
            }
        };
        match crate::glob::last_segment_pattern(&self.path) {
            None => below(&self.path, path),
            Some((parent, _)) => {
                let Some(matcher) = matcher else {
                    return false;
                };
                let parent = if parent.is_empty() { "/" } else { parent };
                let Some(rest) = path
                    .strip_prefix(parent.trim_end_matches('/'))
                    .and_then(|r| r.strip_prefix('/'))
                else {
                    return false;
                };
                let (first, _) = rest.split_once('/').unwrap_or((rest, ""));
                matcher.is_match(first)
                    && below(&format!("{}/{first}", parent.trim_end_matches('/')), path)
            }
        }
    }
}

/// The FileChange labels for `refs`: `compliance.kube-fim.io/<framework>` =
/// control.
pub fn labels(refs: &[ComplianceRef]) -> BTreeMap<String, String> {
    refs.iter()
        .map(|r| (r.label_key(), r.control.clone()))
        .collect()
}

/// The compliance labels among `labels`.
pub fn labels_in(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| k.starts_with(LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::validate_spec;

    fn entry(name: &str, path: &str, refs: &[(&str, &str)]) -> MonitoredPath {
        MonitoredPath {
            name: name.into(),
            path: path.into(),
            compliance: refs.iter().map(|(f, c)| ComplianceRef::new(f, c)).collect(),
            ..MonitoredPath::default()
        }
    }

    #[test]
    fn preset_entries_carry_the_preset_references_and_own_entries_do_not() {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![entry("app", "/srv/app", &[])]);
        spec.preset = Some(Preset::Recommended);
        let labels = labels(&spec.compliance_of("usr-bin"));
        assert_eq!(
            labels
                .get("compliance.kube-fim.io/pci-dss-4.0")
                .map(String::as_str),
            Some("11.5.2")
        );
        assert_eq!(
            labels
                .get("compliance.kube-fim.io/cis-dil-2.0")
                .map(String::as_str),
            Some("1.3.2")
        );
        assert_eq!(
            labels
                .get("compliance.kube-fim.io/nist-800-53-r5")
                .map(String::as_str),
            Some("SI-7")
        );
        assert!(spec.compliance_of("app").is_empty());
    }

    #[test]
    fn an_entry_overrides_the_policy_which_overrides_the_preset_per_framework() {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![
            entry("etc-conf", "/etc/*.conf", &[("pci-dss-4.0", "10.3.4")]),
            entry("app", "/srv/app", &[("iso-27001-2022", "A.8.9")]),
        ]);
        spec.preset = Some(Preset::Recommended);
        spec.compliance = vec![ComplianceRef::new("nist-800-53-r5", "CM-3")];
        assert_eq!(
            spec.compliance_of("etc-conf"),
            vec![
                ComplianceRef::new("cis-dil-2.0", "1.3.2"),
                ComplianceRef::new("nist-800-53-r5", "CM-3"),
                ComplianceRef::new("pci-dss-4.0", "10.3.4"),
            ]
        );
        assert_eq!(
            spec.compliance_of("app"),
            vec![
                ComplianceRef::new("iso-27001-2022", "A.8.9"),
                ComplianceRef::new("nist-800-53-r5", "CM-3"),
            ]
        );
        assert!(spec.compliance_of("no-such-entry").len() == 1);
        assert_eq!(validate_spec(&spec), Ok(()));
    }

    #[test]
    fn entries_cover_their_files_directories_and_wildcards() {
        let e = |path: &str, recursive: bool| MonitoredPath {
            name: "e".into(),
            path: path.into(),
            recursive,
            ..MonitoredPath::default()
        };
        assert!(e("/etc/passwd", false).covers("/etc/passwd"));
        assert!(!e("/etc/passwd", false).covers("/etc/passwd-"));
        assert!(e("/usr/bin", false).covers("/usr/bin/sudo"));
        assert!(!e("/usr/bin", false).covers("/usr/bin/x/sudo"));
        assert!(e("/usr/bin", true).covers("/usr/bin/x/sudo"));
        assert!(!e("/usr/bin", true).covers("/usr/binx/sudo"));
        assert!(e("/etc/*.conf", false).covers("/etc/app.conf"));
        // A directory a wildcard matches is monitored like a directory entry.
        assert!(e("/etc/*.conf", false).covers("/etc/app.conf/x"));
        assert!(!e("/etc/*.conf", false).covers("/etc/app.conf/x/y"));
        assert!(e("/etc/*.d", true).covers("/etc/cron.d/job"));
        assert!(!e("/etc/*.conf", false).covers("/etc/passwd"));
        assert!(e("/*", true).covers("/anything/at/all"));
    }

    #[test]
    fn a_change_filed_under_the_wrong_entry_keeps_the_references_of_its_path() {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![entry(
            "app",
            "/etc/app.conf",
            &[("pci-dss-4.0", "10.3.4")],
        )]);
        spec.preset = Some(Preset::Recommended);
        // Root on the node files its /usr/bin change under `app`: the
        // entry watching /usr/bin still gives it PCI DSS 11.5.2.
        let refs = spec.compliance_of_change("app", Some("/usr/bin/sudo"));
        assert!(
            refs.contains(&ComplianceRef::new("pci-dss-4.0", "11.5.2")),
            "{refs:?}"
        );
        assert_eq!(refs.len(), 3);
        // Filed where it belongs: the entry's own references.
        assert_eq!(
            spec.compliance_of_change("app", Some("/etc/app.conf")),
            vec![
                ComplianceRef::new("cis-dil-2.0", "1.3.2"),
                ComplianceRef::new("nist-800-53-r5", "SI-7"),
                ComplianceRef::new("pci-dss-4.0", "10.3.4"),
            ]
        );
        // Covered by no entry (a path inside a container): the entry's.
        assert_eq!(
            spec.compliance_of_change("app", Some("/srv/x")),
            spec.compliance_of("app")
        );
        assert_eq!(
            spec.compliance_of_change("app", None),
            spec.compliance_of("app")
        );
    }

    #[test]
    fn bad_references_are_refused_naming_the_field() {
        type Refs<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Refs, &str, &str)] = &[
            (
                &[("PCI DSS", "11.5.2")],
                "spec.paths[0].compliance[0].framework",
                FRAMEWORK_MSG,
            ),
            (
                &[("pci-dss-4.0", "11.5.2 ")],
                "spec.paths[0].compliance[0].control",
                CONTROL_MSG,
            ),
            (
                &[("pci-dss-4.0", "SI-7(1)")],
                "spec.paths[0].compliance[0].control",
                CONTROL_MSG,
            ),
            (
                &[("pci-dss-4.0", "11.5.2"), ("pci-dss-4.0", "10.3.4")],
                "spec.paths[0].compliance[1]",
                "Duplicate value",
            ),
        ];
        for (refs, field, message) in cases {
            let spec = FileIntegrityPolicySpec::with_paths(vec![entry("e", "/etc", refs)]);
            let errs = validate_spec(&spec).err().map(|e| e.0).unwrap_or_default();
            assert!(
                errs.iter()
                    .any(|e| e.field == *field && e.message.contains(message)),
                "{refs:?}: {errs:?}"
            );
        }
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![entry("e", "/etc", &[])]);
        spec.compliance = (0..9)
            .map(|i| ComplianceRef::new(&format!("f{i}"), "1"))
            .collect();
        let errs = validate_spec(&spec).err().map(|e| e.0).unwrap_or_default();
        assert!(
            errs.iter()
                .any(|e| e.field == "spec.compliance" && e.message.contains("Too many")),
            "{errs:?}"
        );
        spec.compliance = vec![ComplianceRef::new(&"f".repeat(41), "1")];
        let errs = validate_spec(&spec).err().map(|e| e.0).unwrap_or_default();
        assert!(
            errs.iter()
                .any(|e| e.field == "spec.compliance[0].framework"),
            "{errs:?}"
        );
    }

    #[test]
    fn the_cel_rules_and_the_rust_rules_share_their_patterns() {
        assert_eq!(FRAMEWORK_RULE, format!("self.matches('{FRAMEWORK_RE}')"));
        assert_eq!(CONTROL_RULE, format!("self.matches('{CONTROL_RE}')"));
    }

    #[test]
    fn every_valid_reference_makes_a_valid_label() {
        let spec = FileIntegrityPolicySpec {
            preset: Some(Preset::Recommended),
            ..FileIntegrityPolicySpec::default()
        };
        for r in spec.all_compliance() {
            assert_eq!(crate::labels::label_value(&r.control), r.control);
            let name = r.label_key();
            let name = name.trim_start_matches(LABEL_PREFIX);
            assert!(name.len() <= 63 && crate::labels::label_value(name) == name);
        }
    }
}
