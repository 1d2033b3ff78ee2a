//! The agent's state directory (a hostPath in a cluster): the one place that
//! knows the name of every file in it, and keeps it private to its owner
//! (file names and digests of root-only directories are not for other users
//! of the node).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the baseline in the state directory.
pub const FILE: &str = "baseline.redb";
/// File name of the baseline of earlier versions (one JSON document), migrated
/// on start.
pub const LEGACY_FILE: &str = "baseline.json";
/// A baseline being built from nothing, until its first save moves it over
/// [`FILE`] (the old one stays in place until then).
const NEW_FILE: &str = ".baseline.redb.new";
/// Where a store of an earlier version is kept once it has been upgraded.
const UPGRADED_FILE: &str = "baseline.redb.v2.migrated";
/// The delivery queue's directory.
const QUEUE: &str = "queue";

/// The agent's state directory and the paths inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state directory at `dir` (nothing is read or created).
    pub fn new(dir: &Path) -> Self {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    /// Creates the state directory (and its parents) readable by its owner
    /// only.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let state = Self::new(dir);
        state.ensure()?;
        Ok(state)
    }

    /// Creates the directory if it is missing and makes it its owner's only.
    pub fn ensure(&self) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The baseline's store.
    pub fn store(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// A store being built from nothing, until its first save replaces
    /// [`StateDir::store`].
    pub fn new_store(&self) -> PathBuf {
        self.dir.join(NEW_FILE)
    }

    /// Where a store of an earlier version is kept once upgraded.
    pub fn upgraded_store(&self) -> PathBuf {
        self.dir.join(UPGRADED_FILE)
    }

    /// The baseline document of earlier versions.
    pub fn legacy_document(&self) -> PathBuf {
        self.dir.join(LEGACY_FILE)
    }

    /// Where the document of earlier versions is kept once imported.
    pub fn migrated_document(&self) -> PathBuf {
        self.dir.join(format!("{LEGACY_FILE}.migrated"))
    }

    /// The delivery queue's directory.
    pub fn queue(&self) -> PathBuf {
        self.dir.join(QUEUE)
    }

    /// Moves the baseline (whatever its format) aside with `suffix` (kept for
    /// forensics, never silently replaced); the paths it was moved to.
    pub fn set_aside(&self, suffix: &str) -> Vec<PathBuf> {
        let mut moved = Vec::new();
        for name in [FILE, LEGACY_FILE] {
            let from = self.dir.join(name);
            let to = self.dir.join(format!("{name}.{suffix}"));
            if fs::rename(&from, &to).is_ok() {
                moved.push(to);
            }
        }
        moved
    }

    /// Writes `bytes` to `path` (a file of this directory) atomically with
    /// mode 0600.
    pub fn write_private(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = self.dir.join(format!(".{}.tmp", name.unwrap_or_default()));
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        self.sync()
    }

    /// Makes the directory's entries (a rename into it) durable.
    pub fn sync(&self) -> std::io::Result<()> {
        File::open(&self.dir).and_then(|d| d.sync_all())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::baseline::Baseline;

    #[test]
    fn the_state_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut b = Baseline::create(&state).unwrap();
        b.save().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(FILE)), 0o600);
    }
}
