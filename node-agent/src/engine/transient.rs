//! States a file was in at a close after a write, remembered until its
//! debounce ends: a write undone within the window is reported all the same
//! (marked restored), since the rescan alone sees only the final state.

use std::collections::BTreeMap;

use kube_fim_crds::{Attribute, FileChangeSpec};

/// At most this many paths are remembered per window; beyond, a path is
/// judged by its rescan alone (and counted).
pub const MAX_PATHS: usize = 1024;

/// The transient states of the paths waiting for their rescan.
#[derive(Debug, Default)]
pub struct Transients {
    by_key: BTreeMap<String, Vec<FileChangeSpec>>,
    /// Closes whose state could not be remembered (more than [`MAX_PATHS`]).
    pub dropped: u64,
}

/// Whether the changes say the content differed (not only its metadata).
fn content(changes: &[FileChangeSpec]) -> bool {
    changes.iter().any(|c| {
        c.changed_attributes
            .iter()
            .any(|a| matches!(a, Attribute::Hash | Attribute::Size))
    })
}

impl Transients {
    /// Remembers `changes` (a state at a close, against the baseline) for
    /// `key`. The latest state replaces the one remembered, except that one
    /// with the baseline's content never replaces one with other content:
    /// a restore by a write (the content back, the mtime not) does not hide
    /// the write it undoes. `false` when the state was not remembered (too
    /// many paths).
    pub fn record(&mut self, key: String, changes: Vec<FileChangeSpec>) -> bool {
        if changes.is_empty() {
            return true;
        }
        let full = self.by_key.len() >= MAX_PATHS;
        match self.by_key.get_mut(&key) {
            Some(old) => {
                if content(&changes) || !content(old) {
                    *old = changes;
                }
                true
            }
            None if full => {
                self.dropped += 1;
                false
            }
            None => {
                self.by_key.insert(key, changes);
                true
            }
        }
    }

    /// The remembered state of `key`, forgotten.
    pub fn take(&mut self, key: &str) -> Option<Vec<FileChangeSpec>> {
        self.by_key.remove(key)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn change(attrs: &[Attribute]) -> Vec<FileChangeSpec> {
        let mut c = fixtures::change("/etc/sudoers");
        c.changed_attributes = attrs.to_vec();
        vec![c]
    }

    #[test]
    fn a_restore_by_a_write_does_not_replace_the_write_it_undoes() {
        let mut t = Transients::default();
        assert!(t.record("/etc/sudoers".into(), change(&[Attribute::Mtime])));
        assert!(t.record("/etc/sudoers".into(), change(&[Attribute::Hash])));
        // The content back, the mtime not.
        assert!(t.record("/etc/sudoers".into(), change(&[Attribute::Mtime])));
        let kept = t.take("/etc/sudoers").unwrap();
        assert_eq!(kept[0].changed_attributes, [Attribute::Hash]);
        assert!(t.take("/etc/sudoers").is_none(), "taken once");
    }

    #[test]
    fn beyond_the_bound_a_path_is_counted_not_remembered() {
        let mut t = Transients::default();
        for i in 0..MAX_PATHS {
            assert!(t.record(format!("/etc/f{i}"), change(&[Attribute::Hash])));
        }
        assert!(!t.record("/etc/one-more".into(), change(&[Attribute::Hash])));
        assert_eq!(t.dropped, 1);
        assert!(t.take("/etc/one-more").is_none());
        // A path already remembered is still followed.
        assert!(t.record("/etc/f0".into(), change(&[Attribute::Size])));
        assert!(
            t.record("/etc/nothing".into(), Vec::new()),
            "no state to keep"
        );
    }
}
