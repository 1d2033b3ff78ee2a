//! Upgrades of the state of earlier versions, on start: the baseline
//! document (one JSON file, [`StateDir::legacy_document`]) is imported, its
//! digest checked like any baseline's, and set aside only once the imported
//! baseline is saved; a store of version 2 (records in
//! JSON) is streamed into a new store of version 3 (binary records), which
//! replaces it at the first save, the old file kept aside
//! ([`StateDir::upgraded_store`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use redb::{ReadableDatabase, ReadableTable};
use serde::Deserialize;
use tracing::info;

use super::digest::{TAG_ESTABLISHED, TAG_POLICY};
use super::store::{FILES_V2, VERSION_JSON_RECORDS};
use super::verify::decode_record;
use super::{Baseline, BaselineError, PolicyScan, StateDir, Tracked};

pub(super) const LEGACY_VERSION: u32 = 1;

/// The baseline document of earlier versions.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Legacy {
    version: u32,
    #[serde(default)]
    files: BTreeMap<String, Tracked>,
    #[serde(default)]
    established: BTreeSet<String>,
    #[serde(default)]
    policies: BTreeMap<String, PolicyScan>,
}

impl Baseline {
    /// Upgrades a store of the version before (`old`, its digest `digest`
    /// recomputed from its records) into a new store of this version,
    /// streaming its records in batches like a first baseline. Like an
    /// import, the digest returned is the old store's (what the cluster
    /// holds, checked like any baseline's); the new store replaces the old one
    /// at the first save, and the old file is kept aside ([`StateDir::upgraded_store`]).
    pub(super) fn upgrade(
        old: Baseline,
        digest: String,
    ) -> Result<(Baseline, String), BaselineError> {
        let path = old.state.store();
        let store = |e: redb::Error| BaselineError::store(&path, e);
        let mut b = Baseline::create(old.state.path())?;
        let tx = old.db.begin_read().map_err(|e| store(e.into()))?;
        let files = tx.open_table(FILES_V2).map_err(|e| store(e.into()))?;
        let mut n = 0u64;
        for item in files.iter().map_err(|e| store(e.into()))? {
            let (k, v) = item.map_err(|e| store(e.into()))?;
            let t = decode_record(VERSION_JSON_RECORDS, v.value()).map_err(|message| {
                BaselineError::Corrupt {
                    path: path.clone(),
                    message: format!("{}: {message}", k.value()),
                }
            })?;
            b.pending.insert(k.value().to_string(), Some(t));
            b.flush_if_full()?;
            n += 1;
        }
        for k in &old.established {
            b.changed.insert((TAG_ESTABLISHED, k.clone()));
        }
        for k in old.policies.keys() {
            b.changed.insert((TAG_POLICY, k.clone()));
        }
        b.established.clone_from(&old.established);
        b.policies.clone_from(&old.policies);
        b.write(false)?;
        b.legacy = Some(digest.clone());
        info!(files = n, from = %path.display(), "baseline store upgraded to version 3 (binary records); the old store is kept aside at the first save");
        Ok((b, digest))
    }

    /// Imports the baseline document of earlier versions, if there is one.
    /// Its digest is the one returned (what the cluster holds): it is checked
    /// like any baseline's; the import becomes the baseline at the first save.
    pub(super) fn migrate(state: &StateDir) -> Result<Option<(Baseline, String)>, BaselineError> {
        let path = state.legacy_document();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BaselineError::Io { path, source }),
        };
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let legacy: Legacy =
            serde_json::from_slice(&bytes).map_err(|e| BaselineError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        drop(bytes);
        if legacy.version != LEGACY_VERSION {
            return Err(BaselineError::Corrupt {
                path,
                message: format!(
                    "version {} (this agent reads {LEGACY_VERSION})",
                    legacy.version
                ),
            });
        }
        let mut b = Baseline::create(state.path())?;
        let files = legacy.files.len();
        for (k, t) in legacy.files {
            b.pending.insert(k, Some(t));
            b.flush_if_full()?;
        }
        for k in legacy.established {
            b.changed.insert((TAG_ESTABLISHED, k.clone()));
            b.established.insert(k);
        }
        for (k, rec) in legacy.policies {
            b.changed.insert((TAG_POLICY, k.clone()));
            b.policies.insert(k, rec);
        }
        b.write(false)?;
        b.legacy = Some(digest.clone());
        info!(files, from = %path.display(), "baseline imported into the store; the document is set aside at the first save");
        Ok(Some((b, digest)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use k8s_openapi::jiff::Timestamp;
    use redb::ReadableDatabase;

    use super::*;
    use crate::baseline::StateDir;
    use crate::baseline::digest::{SetHash, TAG_FILE};
    use crate::baseline::state_dir::{FILE, LEGACY_FILE};
    use crate::baseline::store::{ESTABLISHED, META, POLICIES, VERSION, builder, encode};
    use crate::baseline::tests::{attrs, reopen};
    use crate::baseline::write_behind::BATCH;

    /// The earlier versions' formats, written by a test as those versions
    /// wrote them.
    impl Baseline {
        /// Writes this baseline as a store of version 2 (records in JSON) at
        /// `path`, as the version before wrote it, and returns its digest (to
        /// test the upgrade).
        #[allow(clippy::expect_used)]
        pub(crate) fn write_as_version_2(&self, path: &Path) -> String {
            let db = builder().create(path).expect("a store of version 2");
            let tx = db.begin_write().expect("a transaction");
            let mut sum = SetHash::zero();
            {
                let mut files = tx.open_table(FILES_V2).expect("files");
                self.for_each_under("", |k, t| {
                    let v = encode(t);
                    sum.add(TAG_FILE, k, &v);
                    files.insert(k, v.as_slice()).expect("a record");
                });
                let mut established = tx.open_table(ESTABLISHED).expect("established");
                for k in &self.established {
                    sum.add(TAG_ESTABLISHED, k, b"");
                    established
                        .insert(k.as_str(), b"".as_slice())
                        .expect("an entry");
                }
                let mut policies = tx.open_table(POLICIES).expect("policies");
                for (k, rec) in &self.policies {
                    let v = encode(rec);
                    sum.add(TAG_POLICY, k, &v);
                    policies.insert(k.as_str(), v.as_slice()).expect("a policy");
                }
                let mut meta = tx.open_table(META).expect("meta");
                meta.insert("version", VERSION_JSON_RECORDS)
                    .expect("version");
                meta.insert("sum", sum.to_bytes().as_slice()).expect("sum");
            }
            tx.commit().expect("a commit");
            sum.digest()
        }

        /// The baseline in the document format of earlier versions (to test
        /// their migration).
        pub(crate) fn to_legacy_document(&self) -> Vec<u8> {
            let mut files = serde_json::Map::new();
            self.for_each_under("", |k, t| {
                files.insert(k.to_string(), serde_json::to_value(t).unwrap_or_default());
            });
            let doc = serde_json::json!({
                "version": LEGACY_VERSION,
                "files": files,
                "established": self.established,
                "policies": self.policies,
            });
            serde_json::to_vec(&doc).unwrap_or_default()
        }
    }

    fn version_of(path: &Path) -> Vec<u8> {
        let db = builder().open(path).unwrap();
        let tx = db.begin_read().unwrap();
        let meta = tx.open_table(META).unwrap();
        meta.get("version").unwrap().unwrap().value().to_vec()
    }

    #[test]
    fn a_store_of_version_2_is_upgraded_without_an_alarm_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        for i in 0..(BATCH + 10) {
            b.establish_path(&format!("/etc/f{i}"), Some(attrs(i as u64)));
        }
        b.mark_reported("/etc/f1", "v2-abc".into());
        b.establish("p", "etc");
        b.scanned("p", Some(4), Timestamp::UNIX_EPOCH);
        b.save().unwrap();
        let old = dir.path().join("old.redb");
        // What the version before kept on disk, and published.
        let published = b.write_as_version_2(&old);
        drop(b);
        fs::rename(&old, dir.path().join(FILE)).unwrap();

        let (mut up, digest) = reopen(dir.path());
        assert_eq!(digest, published, "the old store's digest: no alarm");
        assert_eq!(up.approved("/etc/f7"), Some(attrs(7)));
        assert_eq!(up.reported("/etc/f1").as_deref(), Some("v2-abc"));
        assert!(up.is_established("p", "etc"));
        assert_eq!(up.policy("p").unwrap().generation, Some(4));
        assert_eq!(
            version_of(&dir.path().join(FILE)),
            b"2",
            "replaced only when saved"
        );
        let saved = up.save().unwrap();
        assert_ne!(saved, published, "the records are encoded anew");
        drop(up);
        assert_eq!(version_of(&dir.path().join(FILE)), VERSION);
        assert_eq!(
            version_of(&StateDir::new(dir.path()).upgraded_store()),
            b"2"
        );
        let (again, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, saved);
        assert_eq!(
            again.approved(&format!("/etc/f{}", BATCH + 9)),
            Some(attrs(BATCH as u64 + 9))
        );
    }

    #[test]
    fn a_store_of_version_2_edited_on_the_node_is_noticed_through_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        b.establish_path("/etc/shadow", Some(attrs(1)));
        b.save().unwrap();
        let path = dir.path().join(FILE);
        drop(b);
        let b = reopen(dir.path()).0;
        fs::remove_file(&path).unwrap();
        let published = b.write_as_version_2(&path);
        drop(b);
        {
            let db = builder().open(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut files = tx.open_table(FILES_V2).unwrap();
                let forged = encode(&Tracked {
                    approved: Some(attrs(2)),
                    ..Tracked::default()
                });
                files.insert("/etc/shadow", forged.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let (up, digest) = reopen(dir.path());
        assert_ne!(digest, published);
        assert_eq!(up.approved("/etc/shadow"), Some(attrs(2)));
    }

    #[test]
    fn the_document_of_earlier_versions_is_imported_whole_and_set_aside_once_saved() {
        let dir = tempfile::tempdir().unwrap();
        let doc = serde_json::json!({
            "version": 1,
            "files": {
                "/etc/hosts": {"approved": {"size": 3}, "reported": "abc", "epoch": 2},
                "/etc/gone": {"epoch": 1},
            },
            "established": ["p/etc"],
            "policies": {"p": {"generation": 4, "baselineTime": "2026-01-01T00:00:00Z", "lastScanTime": null}},
        });
        let bytes = serde_json::to_vec(&doc).unwrap();
        fs::write(dir.path().join(LEGACY_FILE), &bytes).unwrap();

        let (mut b, digest) = reopen(dir.path());
        assert_eq!(
            digest,
            blake3::hash(&bytes).to_hex().to_string(),
            "checked against what the cluster holds"
        );
        assert_eq!(b.approved("/etc/hosts"), Some(attrs(3)));
        assert_eq!(b.reported("/etc/hosts").as_deref(), Some("abc"));
        assert_eq!(b.epoch("/etc/hosts"), 2);
        assert!(b.knows("/etc/gone") && b.approved("/etc/gone").is_none());
        assert!(b.is_established("p", "etc"));
        assert_eq!(b.policy("p").and_then(|p| p.generation), Some(4));
        assert!(
            dir.path().join(LEGACY_FILE).exists(),
            "the document stays the baseline until the import is saved"
        );

        let new = b.save().unwrap();
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert!(dir.path().join(format!("{LEGACY_FILE}.migrated")).exists());
        drop(b);
        let (b, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, new);
        assert_eq!(b.epoch("/etc/hosts"), 2);
    }
}
