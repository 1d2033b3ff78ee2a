//! The policies this node serves, as one value: what the monitor applies,
//! what the node status reports (by generation), what caps the reporter's
//! storms and what the Events of changes point at.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::ResourceExt;
use kube_fim_crds::FileIntegrityPolicy;

use crate::engine::PolicyInput;

/// The served policies by name, as selected at one moment, and the names of
/// the valid policies that exist but do not select this node.
#[derive(Clone, Debug, Default)]
pub struct ServedPolicies(BTreeMap<String, Arc<FileIntegrityPolicy>>, BTreeSet<String>);

impl ServedPolicies {
    /// Serves exactly `policies`.
    pub fn new(policies: impl IntoIterator<Item = Arc<FileIntegrityPolicy>>) -> Self {
        ServedPolicies(
            policies.into_iter().map(|p| (p.name_any(), p)).collect(),
            BTreeSet::new(),
        )
    }

    /// The same, knowing which existing policies do not select this node.
    pub fn with_unselected(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.1 = names.into_iter().collect();
        self
    }

    /// Whether `name` is a policy that exists and does not select this node
    /// (a deleted policy is neither served nor unselected).
    pub fn is_unselected(&self, name: &str) -> bool {
        self.1.contains(name)
    }

    /// Names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The generation of each policy (0 when the API server gave none).
    pub fn generations(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0
            .iter()
            .map(|(name, p)| (name.as_str(), p.metadata.generation.unwrap_or(0)))
    }

    /// One policy.
    pub fn get(&self, name: &str) -> Option<&FileIntegrityPolicy> {
        self.0.get(name).map(|p| &**p)
    }

    /// What the engine applies.
    pub fn inputs(&self) -> BTreeMap<String, PolicyInput> {
        self.0
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    PolicyInput {
                        generation: p.metadata.generation,
                        spec: p.spec.clone(),
                    },
                )
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Equal when the same generations of the same specs are served (and the same
/// policies are unselected): a write to a policy's status or metadata changes
/// nothing the node does.
impl PartialEq for ServedPolicies {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1
            && self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).all(|((a, p), (b, q))| {
                a == b && p.metadata.generation == q.metadata.generation && p.spec == q.spec
            })
    }
}
