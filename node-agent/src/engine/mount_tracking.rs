//! The host's mount table as the engine tracks it: where it is read, and
//! which monitored paths to re-examine when a mount point changes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::Engine;
use crate::mounts::{MountSource, MountTable};
use crate::paths::{host_path, rel_path};

impl Engine {
    /// Reads the host's mount table from `source` rather than from the host
    /// root's procfs.
    pub fn set_mount_source(&mut self, source: MountSource) {
        self.mount_source = source;
    }

    /// Where the host's mount table is read.
    pub fn mount_source(&self) -> &MountSource {
        &self.mount_source
    }

    /// Re-reads the host's mount table; the monitored paths at and below the
    /// mount points that changed (to re-examine).
    pub fn mounts_changed(&mut self) -> BTreeSet<PathBuf> {
        let now = self.mount_source.read();
        let changed = match (&self.mounts_compared, &now) {
            (Some(old), Some(new)) => old.changed_points(new),
            (Some(old), None) => old.changed_points(&MountTable::default()),
            // Before the first scan, which reads the table itself.
            (None, _) => BTreeSet::new(),
        };
        self.mounts_compared = now;
        let mut paths = BTreeSet::new();
        for point in changed {
            paths.extend(
                self.baseline
                    .keys_under(&host_path(&point))
                    .iter()
                    .map(|k| rel_path(k)),
            );
            paths.insert(point);
        }
        paths.retain(|p| !self.plan.owners(p).is_empty());
        paths
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::tests::*;
    #[test]
    fn a_mount_over_a_monitored_path_is_a_change_of_that_path() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let table = tempfile::NamedTempFile::new().unwrap();
        let host = "27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n";
        std::fs::write(table.path(), host).unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        std::fs::write(bin.join("su"), "su").unwrap();
        let mut e = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        e.set_mount_source(MountSource {
            table: table.path().to_path_buf(),
            root: PathBuf::from("/"),
        });
        assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
        assert!(e.mounts_changed().is_empty(), "nothing mounted since");

        // mount --bind /tmp/evil /usr/bin/sudo
        let bound =
            format!("{host}41 27 8:1 /tmp/evil /usr/bin/sudo rw shared:1 - ext4 /dev/sda1 rw\n");
        std::fs::write(table.path(), &bound).unwrap();
        let paths = e.mounts_changed();
        assert_eq!(paths, BTreeSet::from([PathBuf::from("usr/bin/sudo")]));
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        e.mark_reported(&o);
        assert_eq!(describe(&o), ["Modified /usr/bin/sudo [Mount]"]);
        let after = o.changes[0]
            .after
            .as_ref()
            .and_then(|a| a.mount.clone())
            .unwrap();
        assert_eq!(
            (after.mount_point.as_str(), after.root.as_str()),
            ("/usr/bin/sudo", "/tmp/evil")
        );
        let before = o.changes[0]
            .before
            .as_ref()
            .and_then(|a| a.mount.clone())
            .unwrap();
        assert_eq!(before.mount_point, "/");

        // A tmpfs over the whole directory: the directory and each file in it.
        let hidden = format!("{bound}42 27 0:50 / /usr/bin rw - tmpfs tmpfs rw\n");
        std::fs::write(table.path(), &hidden).unwrap();
        let paths = e.mounts_changed();
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        e.mark_reported(&o);
        assert_eq!(
            describe(&o),
            [
                "Modified /usr/bin [Mount]",
                "Modified /usr/bin/su [Mount]",
                "Modified /usr/bin/sudo [Mount]"
            ]
        );
        // Unmounted: back in the approved state (a scan finds nothing new).
        std::fs::write(table.path(), host).unwrap();
        let paths = e.mounts_changed();
        let (o, _) = e.rescan(&paths, DetectionSource::Realtime);
        assert!(o.changes.is_empty(), "{:?}", describe(&o));
        assert!(scan(&mut e, DetectionSource::Scan).changes.is_empty());
    }

    #[test]
    fn a_baseline_without_mounts_takes_the_first_table_without_a_report() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let table = tempfile::NamedTempFile::new().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("sudo"), "sudo").unwrap();
        let source = MountSource {
            table: table.path().to_path_buf(),
            root: PathBuf::from("/"),
        };
        // No table yet (as with an agent that did not read one).
        std::fs::remove_file(table.path()).unwrap();
        let mut e = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        e.set_mount_source(source.clone());
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        drop(e);
        std::fs::write(table.path(), "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n").unwrap();
        let mut e = engine(root.path(), state.path(), vec![usr_bin(Vec::new())]);
        e.set_mount_source(source);
        assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
        std::fs::write(
            table.path(),
            "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n41 27 0:50 / /usr/bin/sudo rw - tmpfs tmpfs rw\n",
        )
        .unwrap();
        let d = describe(&scan(&mut e, DetectionSource::Scan));
        assert_eq!(d, ["Modified /usr/bin/sudo [Mount]"]);
    }
}
