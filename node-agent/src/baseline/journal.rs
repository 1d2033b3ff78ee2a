//! The journal of baseline digests: every digest is appended (fsynced)
//! *before* the baseline with that digest becomes the durable one, and the
//! journal is trimmed only once the cluster holds a digest. A restart after a
//! crash finds its own unpublished baseline in the journal, after the
//! published one, and raises no false alarm.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::StateDir;

/// The journal of baseline digests written on this node.
#[derive(Clone, Debug)]
pub struct Journal {
    state: StateDir,
}

impl Journal {
    /// The journal of the state directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Journal {
            state: StateDir::new(dir),
        }
    }

    fn path(&self) -> PathBuf {
        self.state.journal()
    }

    /// Digests in the order they were written (unreadable lines are skipped).
    pub fn read(&self) -> Vec<String> {
        fs::read_to_string(self.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
            .collect()
    }

    /// Appends a digest durably.
    pub fn append(&self, digest: &str) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(self.path())?;
        f.write_all(format!("{digest}\n").as_bytes())?;
        f.sync_all()
    }

    /// The cluster holds `published`: drops what was written before it.
    pub fn published(&self, published: &str) -> std::io::Result<()> {
        let all = self.read();
        let Some(i) = all.iter().rposition(|d| d == published) else {
            return Ok(());
        };
        if i == 0 {
            return Ok(());
        }
        let rest: String = all[i..].iter().map(|d| format!("{d}\n")).collect();
        self.state.write_private(&self.path(), rest.as_bytes())
    }

    /// Whether `on_disk` is a baseline this agent wrote after the one the
    /// cluster holds (`published`): its own state, not someone else's edit.
    pub fn vouches(&self, published: &str, on_disk: &str) -> bool {
        let all = self.read();
        match (
            all.iter().position(|d| d == published),
            all.iter().rposition(|d| d == on_disk),
        ) {
            (Some(p), Some(d)) => p <= d,
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::baseline::Baseline;

    #[test]
    fn the_journal_vouches_for_unpublished_states_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        let d1 = b.save().unwrap();
        b.establish("p", "e");
        let d2 = b.save().unwrap();
        assert_ne!(d1, d2);
        let j = Journal::new(dir.path());
        assert!(j.vouches(&d1, &d2), "written after the published one");
        assert!(!j.vouches(&d2, &"0".repeat(64)), "someone else's edit");
        j.published(&d2).unwrap();
        assert_eq!(j.read(), vec![d2.clone()]);
        assert!(!j.vouches(&d1, &d2), "trimmed: the cluster holds d2");
    }
}
