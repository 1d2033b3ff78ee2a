//! The baseline on the node: the approved state of every monitored file, which
//! policy entries are established, and which differences were already reported.
//!
//! Stored as one JSON document written atomically (temporary file, fsync,
//! rename, fsync of the directory): a `kill -9` at any moment leaves the old or
//! the new baseline, never a torn one. One well-understood format with no
//! embedded-database dependency: the agent reads it whole at start and writes it
//! after each batch of changes. Its BLAKE3 digest is published in the cluster,
//! so an edit made on the node while the agent is down is noticed at start.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::FileAttributes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File name of the baseline in the state directory.
pub const FILE: &str = "baseline.json";
const VERSION: u32 = 1;

/// Errors reading or writing the baseline.
#[derive(Debug, Error)]
pub enum BaselineError {
    #[error("baseline {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("baseline {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// One monitored path.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tracked {
    /// The approved state; `None` for a file that appeared and was not approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<FileAttributes>,
    /// Digest of the state last reported as different from the approved one, so
    /// a difference is reported once, not at every scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<String>,
}

/// Per-policy bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRecord {
    pub generation: Option<i64>,
    pub baseline_time: Option<Timestamp>,
    pub last_scan_time: Option<Timestamp>,
}

/// The whole persisted state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    pub version: u32,
    /// Host path (escaped, as in FileChange.path) → record.
    pub files: BTreeMap<String, Tracked>,
    /// `policy/entry` pairs whose first baseline is complete: only they report.
    pub established: BTreeSet<String>,
    pub policies: BTreeMap<String, PolicyRecord>,
}

/// Key of an established entry.
pub fn entry_key(policy: &str, entry: &str) -> String {
    format!("{policy}/{entry}")
}

impl Baseline {
    /// Reads the baseline of `state`, or `None` if there is none yet.
    pub fn load(state: &Path) -> Result<Option<(Baseline, String)>, BaselineError> {
        let path = state.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BaselineError::Io { path, source }),
        };
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let baseline: Baseline =
            serde_json::from_slice(&bytes).map_err(|e| BaselineError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if baseline.version != VERSION {
            return Err(BaselineError::Corrupt {
                path,
                message: format!("version {} (this agent reads {VERSION})", baseline.version),
            });
        }
        Ok(Some((baseline, digest)))
    }

    /// Writes the baseline atomically; returns the digest of what was written.
    pub fn save(&mut self, state: &Path) -> Result<String, BaselineError> {
        self.version = VERSION;
        let path = state.join(FILE);
        let io = |source| BaselineError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(state).map_err(io)?;
        let bytes = serde_json::to_vec(self).map_err(|e| BaselineError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let tmp = state.join(format!(".{FILE}.tmp"));
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(state).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(blake3::hash(&bytes).to_hex().to_string())
    }
}

/// Digest of a file state, to remember what was reported.
pub fn state_digest(attrs: Option<&FileAttributes>) -> String {
    match attrs {
        None => "absent".into(),
        Some(a) => blake3::hash(&serde_json::to_vec(a).unwrap_or_default())
            .to_hex()
            .to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_digest_of_what_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Baseline::load(dir.path()).unwrap().is_none());
        let mut b = Baseline::default();
        b.files.insert(
            "/etc/passwd".into(),
            Tracked {
                approved: Some(FileAttributes {
                    size: Some(3),
                    ..FileAttributes::default()
                }),
                reported: None,
            },
        );
        b.established.insert(entry_key("p", "e"));
        let digest = b.save(dir.path()).unwrap();
        let (loaded, on_disk) = Baseline::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, b);
        assert_eq!(on_disk, digest);
        // An edit on the node changes the digest.
        let path = dir.path().join(FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes.push(b' ');
        fs::write(&path, bytes).unwrap();
        let (_, edited) = Baseline::load(dir.path()).unwrap().unwrap();
        assert_ne!(edited, digest);
    }

    #[test]
    fn a_torn_temporary_file_never_replaces_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::default();
        b.established.insert("p/e".into());
        b.save(dir.path()).unwrap();
        fs::write(dir.path().join(format!(".{FILE}.tmp")), b"{\"vers").unwrap();
        let (loaded, _) = Baseline::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, b);
    }

    #[test]
    fn garbage_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"not json").unwrap();
        assert!(matches!(
            Baseline::load(dir.path()),
            Err(BaselineError::Corrupt { .. })
        ));
    }
}
