//! Typed builders of `FileIntegrityPolicy` objects for tests.
//!
//! A test states the policy it needs in Rust, checked by the compiler against
//! the API types, instead of an indented YAML string; [`Policy::yaml`] writes
//! it out where a policy file or `kubectl` needs text. Values are not
//! validated here: a test of the validation builds invalid ones on purpose.
//!
//! ```
//! use kube_fim_testkit::{Entry, Policy};
//! let yaml = Policy::named("web")
//!     .debounce("300ms")
//!     .path(Entry::new("etc", "/etc").recursive().exclude("*.swp"))
//!     .yaml();
//! assert!(yaml.contains("kind: FileIntegrityPolicy"));
//! ```

use std::collections::BTreeMap;

use kube_fim_crds::{
    Attribute, AttributeProfile, Evidence, FileIntegrityPolicy, FileIntegrityPolicySpec,
    MonitoredPath, Preset,
};

/// A policy under construction; every field not set keeps the API server's
/// default.
#[derive(Clone, Debug)]
#[must_use]
pub struct Policy {
    policy: FileIntegrityPolicy,
}

impl Policy {
    /// A policy named `name` with no entries yet.
    pub fn named(name: &str) -> Policy {
        Policy {
            policy: FileIntegrityPolicy::new(name, FileIntegrityPolicySpec::default()),
        }
    }

    /// Adds a monitored entry.
    pub fn path(mut self, entry: Entry) -> Policy {
        self.policy.spec.paths.push(entry.0);
        self
    }

    /// Adds a predefined list of entries.
    pub fn preset(mut self, preset: Preset) -> Policy {
        self.policy.spec.preset = Some(preset);
        self
    }

    /// Selects the nodes labelled `key=value` (in addition to earlier labels).
    pub fn node_selector(mut self, key: &str, value: &str) -> Policy {
        self.policy
            .spec
            .node_selector
            .insert(key.to_string(), value.to_string());
        self
    }

    /// The coalescing window, a duration such as `300ms`.
    pub fn debounce(mut self, debounce: &str) -> Policy {
        self.policy.spec.debounce = debounce.to_string();
        self
    }

    /// The period of the full rescan, a duration such as `1h`.
    pub fn scan_interval(mut self, interval: &str) -> Policy {
        self.policy.spec.scan_interval = interval.to_string();
        self
    }

    /// The most FileChanges one node creates per minute before summarising.
    pub fn max_changes_per_node_per_minute(mut self, max: u32) -> Policy {
        self.policy.spec.max_changes_per_node_per_minute = max;
        self
    }

    /// Attributes changes to the processes that make them.
    pub fn process_attribution(mut self, on: bool) -> Policy {
        self.policy.spec.process_attribution = on;
        self
    }

    /// What becomes of the policy's FileChanges when it is deleted.
    pub fn evidence(mut self, evidence: Evidence) -> Policy {
        self.policy.spec.evidence = evidence;
        self
    }

    /// Retention: changes older than `max_age` and past `max_count` per node go.
    pub fn retention(mut self, max_age: &str, max_count: u32, delete_unapproved: bool) -> Policy {
        let retention = &mut self.policy.spec.retention;
        retention.max_age = max_age.to_string();
        retention.max_count = max_count;
        retention.delete_unapproved = delete_unapproved;
        self
    }

    /// Adds the metadata label `key=value`.
    pub fn label(mut self, key: &str, value: &str) -> Policy {
        self.policy
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
        self
    }

    /// The policy object.
    pub fn build(self) -> FileIntegrityPolicy {
        self.policy
    }

    /// Only its spec.
    pub fn spec(self) -> FileIntegrityPolicySpec {
        self.policy.spec
    }

    /// The policy as a YAML document, as a policy file or `kubectl apply` reads it.
    pub fn yaml(&self) -> String {
        serde_saphyr::to_string(&self.policy).expect("a policy serialises")
    }
}

/// One monitored entry of a policy.
#[derive(Clone, Debug)]
#[must_use]
pub struct Entry(MonitoredPath);

impl Entry {
    /// The entry `name` on host path `path`: not recursive, enabled, full profile.
    pub fn new(name: &str, path: &str) -> Entry {
        Entry(MonitoredPath {
            name: name.to_string(),
            path: path.to_string(),
            ..MonitoredPath::default()
        })
    }

    /// Everything below the directory, not only its direct entries.
    pub fn recursive(mut self) -> Entry {
        self.0.recursive = true;
        self
    }

    /// Kept in the policy, not monitored.
    pub fn disabled(mut self) -> Entry {
        self.0.enabled = false;
        self
    }

    /// Adds an exclude glob.
    pub fn exclude(mut self, glob: &str) -> Entry {
        self.0.exclude.push(glob.to_string());
        self
    }

    /// Which attributes count as a change.
    pub fn profile(mut self, profile: AttributeProfile) -> Entry {
        self.0.profile = profile;
        self
    }

    /// An explicit list of attributes to compare.
    pub fn attributes(mut self, attributes: &[Attribute]) -> Entry {
        self.0.attributes = attributes.to_vec();
        self
    }

    /// Allows a recursive entry on `/` or `/*`.
    pub fn allow_whole_host(mut self) -> Entry {
        self.0.allow_whole_host = true;
        self
    }
}

impl From<Entry> for MonitoredPath {
    fn from(entry: Entry) -> MonitoredPath {
        entry.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_yaml_reads_back_as_the_policy_built() {
        let built = Policy::named("web")
            .label("team", "a")
            .node_selector("role", "web")
            .debounce("300ms")
            .process_attribution(true)
            .path(
                Entry::new("etc", "/etc/*.conf")
                    .recursive()
                    .exclude("*.swp"),
            )
            .path(Entry::new("off", "/srv").disabled())
            .build();
        let yaml = Policy {
            policy: built.clone(),
        }
        .yaml();
        assert!(
            yaml.starts_with("apiVersion: fim.kube-fim.io/v1alpha1\nkind: FileIntegrityPolicy\n"),
            "{yaml}"
        );
        let read: FileIntegrityPolicy = serde_saphyr::from_str(&yaml).expect("YAML reads back");
        assert_eq!((&read.metadata, &read.spec), (&built.metadata, &built.spec));
        assert_eq!(read.spec.paths[0].exclude, ["*.swp"]);
        assert!(!read.spec.paths[1].enabled);
        assert_eq!(read.spec.node_selector["role"], "web");
        assert!(read.status.is_none() && !yaml.contains("status"), "{yaml}");
    }
}
