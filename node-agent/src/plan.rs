//! What a set of policies asks to monitor, turned into matchers: which policy
//! entries own a given host path, and where walks and watches start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use globset::{GlobMatcher, GlobSet, GlobSetBuilder};
use kube_fim_crds::{Attribute, AttributeProfile, FileIntegrityPolicySpec, MonitoredPath};
use thiserror::Error;

/// A policy entry that cannot be turned into a matcher (the CRD rules make this
/// rare: a glob the API accepted that globset refuses).
#[derive(Debug, Error)]
#[error("policy {policy} entry {entry}: {message}")]
pub struct PlanError {
    pub policy: String,
    pub entry: String,
    pub message: String,
}

/// Who monitors a path: a policy's entry, with what it compares.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub policy: String,
    pub entry: String,
}

/// One enabled entry, ready to match.
#[derive(Debug, Clone)]
pub struct Entry {
    pub owner: Owner,
    /// Root-relative path of the entry, without its wildcard last segment.
    pub base: PathBuf,
    /// The wildcard last segment, if any.
    pub pattern: Option<GlobMatcher>,
    pub recursive: bool,
    names: GlobSet,
    paths: GlobSet,
    pub attributes: Vec<Attribute>,
    pub grow_only: bool,
}

fn rel(path: &str) -> PathBuf {
    PathBuf::from(path.trim_start_matches('/'))
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

impl Entry {
    fn new(policy: &str, e: &MonitoredPath) -> Result<Self, PlanError> {
        let err = |message: String| PlanError {
            policy: policy.into(),
            entry: e.name.clone(),
            message,
        };
        let (base, pattern) = match e.path.rsplit_once('/') {
            Some((dir, last)) if has_wildcard(last) => {
                let glob =
                    kube_fim_crds::glob::path_pattern(last).map_err(|x| err(x.to_string()))?;
                (
                    rel(if dir.is_empty() { "/" } else { dir }),
                    Some(glob.compile_matcher()),
                )
            }
            _ => (rel(&e.path), None),
        };
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for x in &e.exclude {
            let glob = kube_fim_crds::glob::exclude(x).map_err(|y| err(y.to_string()))?;
            if x.contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        Ok(Entry {
            owner: Owner {
                policy: policy.into(),
                entry: e.name.clone(),
            },
            base,
            pattern,
            recursive: e.recursive,
            names: names.build().map_err(|x| err(x.to_string()))?,
            paths: paths.build().map_err(|x| err(x.to_string()))?,
            attributes: e.effective_attributes(),
            grow_only: e.profile == AttributeProfile::GrowOnly,
        })
    }

    /// Whether an exclude glob removes `path` (root-relative).
    pub fn excluded(&self, path: &Path) -> bool {
        let name_hit = path.file_name().is_some_and(|n| self.names.is_match(n));
        name_hit || self.paths.is_match(Path::new("/").join(path))
    }

    /// Whether this entry monitors `path` (root-relative).
    pub fn covers(&self, path: &Path) -> bool {
        let Ok(below) = path.strip_prefix(&self.base) else {
            return false;
        };
        let mut parts = below.components();
        let covered = match &self.pattern {
            None => match parts.clone().count() {
                0 => true,
                1 => true,
                _ => self.recursive,
            },
            Some(glob) => match parts.next() {
                Some(first) => {
                    glob.is_match(first.as_os_str()) && (parts.next().is_none() || self.recursive)
                }
                None => false,
            },
        };
        if !covered {
            return false;
        }
        if self.names.is_empty() && self.paths.is_empty() {
            return true;
        }
        // An exclude also removes everything below the excluded path.
        let mut p = path;
        loop {
            if p.as_os_str().is_empty() || !p.starts_with(&self.base) {
                return true;
            }
            if self.excluded(p) {
                return false;
            }
            match p.parent() {
                Some(parent) => p = parent,
                None => return true,
            }
        }
    }
}

/// Every enabled entry of the served policies.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub entries: Vec<Entry>,
}

impl Plan {
    /// Builds the plan of the given policies (name → spec, presets expanded).
    pub fn new(policies: &BTreeMap<String, FileIntegrityPolicySpec>) -> Result<Self, PlanError> {
        let mut entries = Vec::new();
        for (name, spec) in policies {
            for e in spec.effective_paths() {
                if e.enabled {
                    entries.push(Entry::new(name, &e)?);
                }
            }
        }
        Ok(Plan { entries })
    }

    /// The entries that monitor `path`.
    pub fn owners(&self, path: &Path) -> Vec<&Entry> {
        self.entries.iter().filter(|e| e.covers(path)).collect()
    }

    /// The union of the attributes the owners compare.
    pub fn wanted(owners: &[&Entry]) -> Vec<Attribute> {
        let mut out: Vec<Attribute> = Vec::new();
        for o in owners {
            for a in &o.attributes {
                if !out.contains(a) {
                    out.push(*a);
                }
            }
        }
        // Content hashes are needed to prove growOnly growth.
        if owners.iter().any(|o| o.grow_only) && !out.contains(&Attribute::Hash) {
            out.push(Attribute::Hash);
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn plan(entries: Vec<MonitoredPath>) -> Plan {
        Plan::new(&BTreeMap::from([(
            "p".to_string(),
            FileIntegrityPolicySpec::with_paths(entries),
        )]))
        .unwrap()
    }

    fn e(path: &str, recursive: bool, exclude: &[&str]) -> MonitoredPath {
        MonitoredPath {
            name: path.trim_start_matches('/').replace(['/', '*', '.'], "-"),
            path: path.into(),
            recursive,
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            ..MonitoredPath::default()
        }
    }

    fn covers(p: &Plan, path: &str) -> bool {
        !p.owners(Path::new(path)).is_empty()
    }

    #[test]
    fn exact_files_and_directories() {
        let p = plan(vec![
            e("/etc/passwd", false, &[]),
            e("/etc/ssh", false, &[]),
        ]);
        assert!(covers(&p, "etc/passwd"));
        assert!(!covers(&p, "etc/passwd2"));
        assert!(covers(&p, "etc/ssh"));
        assert!(covers(&p, "etc/ssh/sshd_config"));
        assert!(!covers(&p, "etc/ssh/sub/x"), "not recursive");
    }

    #[test]
    fn recursion_wildcards_and_excludes() {
        let p = plan(vec![
            e("/usr/bin", true, &["*.pyc", "/usr/bin/cache/**"]),
            e("/etc/*.conf", false, &["resolv.conf"]),
        ]);
        assert!(covers(&p, "usr/bin/a/b/c"));
        assert!(!covers(&p, "usr/bin/x.pyc"));
        assert!(!covers(&p, "usr/bin/cache/deep/file"));
        assert!(covers(&p, "etc/host.conf"));
        assert!(!covers(&p, "etc/resolv.conf"));
        assert!(!covers(&p, "etc/hosts"));
        assert!(
            !covers(&p, "etc/x.conf/inner"),
            "wildcard match not recursive"
        );
    }

    #[test]
    fn disabled_entries_are_not_planned_and_presets_are() {
        let mut off = e("/etc/passwd", false, &[]);
        off.enabled = false;
        assert!(!covers(&plan(vec![off]), "etc/passwd"));
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![]);
        spec.preset = Some(kube_fim_crds::Preset::Recommended);
        let p = Plan::new(&BTreeMap::from([("p".to_string(), spec)])).unwrap();
        assert!(covers(&p, "usr/sbin/sshd"));
        assert!(covers(&p, "boot/grub/grub.cfg"));
    }

    #[test]
    fn two_policies_own_a_shared_path() {
        let p = Plan::new(&BTreeMap::from([
            (
                "a".to_string(),
                FileIntegrityPolicySpec::with_paths(vec![e("/etc", true, &[])]),
            ),
            (
                "b".to_string(),
                FileIntegrityPolicySpec::with_paths(vec![e("/etc/passwd", false, &[])]),
            ),
        ]))
        .unwrap();
        let owners: Vec<&str> = p
            .owners(Path::new("etc/passwd"))
            .iter()
            .map(|o| o.owner.policy.as_str())
            .collect();
        assert_eq!(owners, ["a", "b"]);
    }
}
