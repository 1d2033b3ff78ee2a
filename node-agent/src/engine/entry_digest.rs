//! The per-entry digests published in the cluster (one per established
//! entry, kept up to date with the baseline's changes of approved states),
//! the format of earlier versions, and the comparison with what the cluster
//! last saw after a lost or replaced baseline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{
    ChangeCategory, DetectionSource, EntryDigest, EntryDigestMove, FileAttributes, FileChangeSpec,
};
use tracing::info;

use super::Engine;
use super::diff::{DIR_ATTRS, is_dir, project};
use crate::baseline::{SetHash, state_digest};
use crate::paths::rel_path;
use crate::plan::{Entry, Plan};

/// What the cluster holds of a node's baseline, to check the one on disk
/// against at start: the entry digests the node last published, the policy
/// generations it had applied then, and how applied approvals moved digests
/// (their answers on FileChanges, written before the node's baseline took
/// them in).
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub entries: Vec<EntryDigest>,
    /// Per policy, the generation the node had applied (`observedGeneration`).
    pub generations: BTreeMap<String, Option<i64>>,
    pub moves: Vec<ApprovedMove>,
}

/// One entry's digest moved by an applied approval of a change of `path`.
#[derive(Clone, Debug)]
pub struct ApprovedMove {
    pub path: String,
    pub digests: EntryDigestMove,
}

impl From<Vec<EntryDigest>> for Published {
    fn from(entries: Vec<EntryDigest>) -> Self {
        Published {
            entries,
            ..Published::default()
        }
    }
}

/// Marks an entry digest of the current format (see [`Engine::entry_digests`]);
/// one without it is BLAKE3 over the entry's records in path order, the format
/// of earlier versions.
pub(super) const ENTRY_DIGEST_V2: &str = "v2-";

/// Element tag of a path of an entry in its [`SetHash`].
pub(super) const TAG_ENTRY: u8 = b'n';

/// One established entry's digest and what it covers.
pub(super) struct EntrySum {
    sum: SetHash,
    files: i64,
    /// The path of an entry that covers exactly one (`None`: not known).
    path: Option<String>,
}

/// The per-entry digests of one plan and set of established entries, as of
/// the baseline's `seq`th change of approved states.
pub(super) struct EntrySums {
    plan: Arc<Plan>,
    established: Vec<(String, String)>,
    seq: u64,
    sums: BTreeMap<(String, String), EntrySum>,
}

/// What an entry's digest takes of a path's approved state: the attributes
/// the entry compares (a directory's, for a directory).
pub(super) fn entry_state(state: &FileAttributes, entry: &Entry) -> String {
    let mut attrs = entry.attributes.clone();
    if is_dir(Some(state)) {
        attrs.retain(|x| DIR_ATTRS.contains(x));
    }
    state_digest(Some(&project(state, &attrs)))
}

impl Engine {
    /// The established entries of the served policies.
    pub(super) fn established_entries(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .plan
            .entries
            .iter()
            .filter(|e| {
                self.baseline
                    .is_established(&e.owner.policy, &e.owner.entry)
            })
            .map(|e| (e.owner.policy.clone(), e.owner.entry.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A digest per established entry of the served policies: a multiset
    /// hash (LtHash, as the baseline's own digest) of its paths with their
    /// approved states (only the attributes it compares), so two baselines of
    /// the same files agree whoever built them, in whatever order. Kept up to
    /// date with the baseline's changes of approved states: a real-time
    /// change costs what it changes; the records are read again only when
    /// the plan or the established entries change, or after more changes
    /// than the baseline remembers (a large scan).
    pub fn entry_digests(&self) -> Vec<EntryDigest> {
        let mut cache = self
            .entry_sums
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let established = self.established_entries();
        let current = cache
            .as_mut()
            .filter(|c| Arc::ptr_eq(&c.plan, &self.plan) && c.established == established);
        let updated = current.is_some_and(|c| self.update_entry_sums(c));
        if !updated {
            *cache = Some(self.compute_entry_sums(established));
        }
        let Some(c) = cache.as_ref() else {
            return Vec::new();
        };
        c.sums
            .iter()
            .map(|((policy, entry), s)| EntryDigest {
                policy: policy.clone(),
                entry: entry.clone(),
                // As long as a BLAKE3 in hex (the status field's size).
                digest: format!(
                    "{ENTRY_DIGEST_V2}{}",
                    &s.sum.digest()[..64 - ENTRY_DIGEST_V2.len()]
                ),
                files: s.files,
                path: s.path.clone().filter(|_| s.files == 1),
            })
            .collect()
    }

    /// Every established entry's digest from the records, in one pass.
    pub(super) fn compute_entry_sums(&self, established: Vec<(String, String)>) -> EntrySums {
        let seq = self.baseline.approved_seq();
        let mut sums: BTreeMap<(String, String), EntrySum> = established
            .iter()
            .map(|k| {
                let s = EntrySum {
                    sum: SetHash::zero(),
                    files: 0,
                    path: None,
                };
                (k.clone(), s)
            })
            .collect();
        let plan = &self.plan;
        self.baseline.for_each_approved(|key, approved| {
            let Some(state) = approved else { return };
            for o in plan.owners(&rel_path(key)) {
                let Some(s) = sums.get_mut(&(o.owner.policy.clone(), o.owner.entry.clone())) else {
                    continue;
                };
                s.sum.add(TAG_ENTRY, key, entry_state(state, o).as_bytes());
                s.files += 1;
                s.path = (s.files == 1).then(|| key.to_string());
            }
        });
        EntrySums {
            plan: self.plan.clone(),
            established,
            seq,
            sums,
        }
    }

    /// Applies the baseline's changes of approved states since `c` was
    /// computed; `false` if they are not all remembered, or if an entry is
    /// left with one path that is not known (then recompute).
    pub(super) fn update_entry_sums(&self, c: &mut EntrySums) -> bool {
        let Some(changes) = self.baseline.approved_changes_since(c.seq) else {
            return false;
        };
        for ch in changes {
            for o in c.plan.owners(&rel_path(&ch.key)) {
                let Some(s) = c
                    .sums
                    .get_mut(&(o.owner.policy.clone(), o.owner.entry.clone()))
                else {
                    continue;
                };
                if let Some(before) = &ch.before {
                    s.sum
                        .remove(TAG_ENTRY, &ch.key, entry_state(before, o).as_bytes());
                    s.files -= 1;
                    if s.path.as_deref() == Some(ch.key.as_str()) {
                        s.path = None;
                    }
                }
                if let Some(after) = &ch.after {
                    s.sum
                        .add(TAG_ENTRY, &ch.key, entry_state(after, o).as_bytes());
                    s.files += 1;
                    if s.files == 1 {
                        s.path = Some(ch.key.clone());
                    }
                }
            }
            c.seq = ch.seq;
        }
        c.sums.values().all(|s| s.files != 1 || s.path.is_some())
    }

    /// The entry digests in the format of earlier versions (BLAKE3 over the
    /// entry's records in path order), to compare with what the cluster saw
    /// of a node before it was upgraded.
    pub(super) fn legacy_entry_digests(&self) -> BTreeMap<(String, String), String> {
        let mut acc: BTreeMap<(String, String), blake3::Hasher> = self
            .established_entries()
            .into_iter()
            .map(|k| (k, blake3::Hasher::new()))
            .collect();
        let plan = &self.plan;
        self.baseline.for_each_approved(|key, approved| {
            let Some(state) = approved else { return };
            for o in plan.owners(&rel_path(key)) {
                let Some(h) = acc.get_mut(&(o.owner.policy.clone(), o.owner.entry.clone())) else {
                    continue;
                };
                h.update(&(key.len() as u64).to_le_bytes());
                h.update(key.as_bytes());
                h.update(entry_state(state, o).as_bytes());
            }
        });
        acc.into_iter()
            .map(|(k, h)| (k, h.finalize().to_hex().to_string()))
            .collect()
    }

    /// Compares the entry digests with `known`, what the cluster holds: the
    /// entries that differ from what the node published with nothing the
    /// cluster holds to explain it (`policy/entry`, and the file of an entry
    /// that covers one), and a change (source `Startup`) for each such entry
    /// that covers a single path, naming that file. A difference is explained
    /// by a change of the policy since (its generation), or by approvals
    /// applied since, chaining the published digest to the one on disk.
    pub fn differing_entries(&self, known: &Published) -> (Vec<String>, Vec<FileChangeSpec>) {
        let now: BTreeMap<(String, String), String> = self
            .entry_digests()
            .into_iter()
            .map(|d| ((d.policy, d.entry), d.digest))
            .collect();
        // Published by a version before the current format: compared with
        // the digests in that format, read from the records once.
        let legacy = if known
            .entries
            .iter()
            .any(|k| !k.digest.starts_with(ENTRY_DIGEST_V2))
        {
            self.legacy_entry_digests()
        } else {
            BTreeMap::new()
        };
        let mut names = Vec::new();
        let mut changes = Vec::new();
        for k in &known.entries {
            let key = (k.policy.clone(), k.entry.clone());
            let digests = if k.digest.starts_with(ENTRY_DIGEST_V2) {
                &now
            } else {
                &legacy
            };
            let Some(d) = digests.get(&key) else {
                continue; // not served here now
            };
            if *d == k.digest {
                continue;
            }
            if let Some(why) = self.explained(known, k, d) {
                info!(policy = %k.policy, entry = %k.entry, "entry digest moved since published: {why}");
                continue;
            }
            let file = k.path.as_ref().filter(|_| k.files == 1);
            names.push(match file {
                Some(path) => format!("{}/{} ({path})", k.policy, k.entry),
                None => format!("{}/{}", k.policy, k.entry),
            });
            let Some(path) = file else {
                continue;
            };
            let attrs = self
                .plan
                .entries
                .iter()
                .find(|e| e.owner.policy == k.policy && e.owner.entry == k.entry)
                .map(|e| e.attributes.clone())
                .unwrap_or_default();
            let after = self.baseline.approved(path).map(|a| project(&a, &attrs));
            changes.push(FileChangeSpec {
                node: self.node.clone(),
                policy: k.policy.clone(),
                entry: k.entry.clone(),
                path: path.clone(),
                category: if after.is_some() {
                    ChangeCategory::Modified
                } else {
                    ChangeCategory::Removed
                },
                changed_attributes: Vec::new(),
                before: None,
                after,
                detected_time: MicroTime(Timestamp::now()),
                source: DetectionSource::Startup,
                process: None,
                summary: None,
                sequence: None,
                package: None,
                restored: None,
                container: None,
            });
        }
        (names, changes)
    }
}

impl Engine {
    /// Why `now`, the digest of `known`'s entry on disk, may differ from the
    /// published one: something the cluster holds, or nothing (`None`).
    fn explained(
        &self,
        published: &Published,
        known: &EntryDigest,
        now: &str,
    ) -> Option<&'static str> {
        let served = self.policies.get(&known.policy).map(|p| p.generation);
        if let (Some(then), Some(served)) = (published.generations.get(&known.policy), served)
            && *then != served
        {
            return Some("the policy changed since");
        }
        // The digests reachable from the published one through approvals of
        // changes of paths the entry covers.
        let entry = self
            .plan
            .entries
            .iter()
            .find(|e| e.owner.policy == known.policy && e.owner.entry == known.entry)?;
        let moves: Vec<&EntryDigestMove> = published
            .moves
            .iter()
            .filter(|m| {
                m.digests.policy == known.policy
                    && m.digests.entry == known.entry
                    && entry.covers(&rel_path(&m.path))
            })
            .map(|m| &m.digests)
            .collect();
        let mut reached = BTreeSet::from([known.digest.as_str()]);
        let mut frontier = vec![known.digest.as_str()];
        while let Some(d) = frontier.pop() {
            for m in moves.iter().filter(|m| m.before == d) {
                if reached.insert(m.after.as_str()) {
                    frontier.push(m.after.as_str());
                }
            }
        }
        reached
            .contains(now)
            .then_some("approvals the cluster holds explain it")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[allow(clippy::panic)]
mod tests {
    use super::*;
    use crate::engine::tests::*;
    use crate::engine::{Approved, PolicyInput};

    #[test]
    fn entry_digests_follow_approvals_and_agree_with_a_recomputation() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        for f in ["hosts", "a", "b"] {
            std::fs::write(etc.join(f), f).unwrap();
        }
        let paths = || vec![etc_entry(), entry("hosts", "/etc/hosts", false)];
        let mut e = engine(root.path(), state.path(), paths());
        scan(&mut e, DetectionSource::Startup);
        let first = digests_of(&e);
        assert_eq!(first["p/etc"].files, 4, "{first:?}");
        assert_eq!(first["p/hosts"].files, 1);
        assert_eq!(first["p/hosts"].path.as_deref(), Some("/etc/hosts"));
        assert!(first["p/etc"].digest.starts_with(ENTRY_DIGEST_V2));
        assert_eq!(first["p/etc"].digest.len(), 64);

        // Reported, not approved: what the cluster saw is still the baseline.
        std::fs::write(etc.join("hosts"), "changed").unwrap();
        std::fs::write(etc.join("c"), "c").unwrap();
        std::fs::remove_file(etc.join("a")).unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        assert_eq!(o.changes.len(), 3, "{:?}", describe(&o));
        assert_eq!(digests_of(&e), first);

        for c in &o.changes {
            assert!(matches!(
                approve(&mut e, &c.path, c.after.as_ref()),
                Approved::Applied(_)
            ));
        }
        let approved = digests_of(&e);
        assert_ne!(approved["p/etc"].digest, first["p/etc"].digest);
        assert_ne!(approved["p/hosts"].digest, first["p/hosts"].digest);
        assert_eq!(approved["p/etc"].files, 4);
        assert_eq!(approved["p/hosts"].path.as_deref(), Some("/etc/hosts"));
        e.save().unwrap();
        drop(e);

        // Read again from the records: the same digests.
        let mut again = engine(root.path(), state.path(), paths());
        assert_eq!(digests_of(&again), approved);
        std::fs::write(etc.join("hosts"), "again").unwrap();
        assert_eq!(scan(&mut again, DetectionSource::Scan).changes.len(), 1);
        assert_eq!(digests_of(&again), approved, "reported only");
    }

    #[test]
    fn an_entry_digest_moved_only_by_what_the_cluster_holds_is_no_difference() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root").unwrap();
        let paths = || vec![entry("passwd", "/etc/passwd", false)];
        let mut e = engine(root.path(), state.path(), paths());
        scan(&mut e, DetectionSource::Startup);
        let published = e.entry_digests();

        // Approved and saved, then a crash before the node status said so.
        std::fs::write(etc.join("passwd"), "root\nadmin").unwrap();
        let o = scan(&mut e, DetectionSource::Scan);
        let Approved::Applied(applied) =
            approve(&mut e, "/etc/passwd", o.changes[0].after.as_ref())
        else {
            panic!("not applied");
        };
        e.save().unwrap();
        drop(e);
        let moves: Vec<ApprovedMove> = applied
            .moved
            .iter()
            .map(|m| ApprovedMove {
                path: "/etc/passwd".into(),
                digests: m.clone(),
            })
            .collect();
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].digests.before, published[0].digest);

        let mut again = engine(root.path(), state.path(), paths());
        scan(&mut again, DetectionSource::Startup);
        let held = Published {
            entries: published.clone(),
            generations: BTreeMap::from([("p".to_string(), Some(1))]),
            moves: moves.clone(),
        };
        assert_eq!(
            again.differing_entries(&held).0,
            Vec::<String>::new(),
            "explained"
        );
        // Without the answer in the cluster, the same move is a difference.
        let unexplained = Published {
            moves: Vec::new(),
            ..held.clone()
        };
        assert_eq!(
            again.differing_entries(&unexplained).0,
            ["p/passwd (/etc/passwd)"]
        );
        // An answer on a change of another path explains nothing.
        let elsewhere = Published {
            moves: moves
                .iter()
                .map(|m| ApprovedMove {
                    path: "/etc/shadow".into(),
                    ..m.clone()
                })
                .collect(),
            ..held.clone()
        };
        assert_eq!(again.differing_entries(&elsewhere).0.len(), 1);
        // A policy generation the node had not applied when it published.
        let edited = Published {
            generations: BTreeMap::from([("p".to_string(), Some(0))]),
            ..unexplained
        };
        assert_eq!(again.differing_entries(&edited).0, Vec::<String>::new());
    }

    fn etc_entry() -> MonitoredPath {
        entry("etc", "/etc", true)
    }

    #[test]
    fn entry_digests_published_by_an_earlier_version_are_compared_in_their_format() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root").unwrap();
        std::fs::write(etc.join("group"), "root").unwrap();
        let paths = || {
            vec![
                entry("passwd", "/etc/passwd", false),
                entry("group", "/etc/group", false),
            ]
        };
        let mut old = engine(root.path(), state.path(), paths());
        scan(&mut old, DetectionSource::Startup);
        // What the earlier version published: BLAKE3 over each entry's paths
        // and projected approved states, in path order.
        let published: Vec<EntryDigest> = old
            .entry_digests()
            .into_iter()
            .map(|d| {
                let path = d.path.clone().unwrap();
                let state = old.baseline.approved(&path).unwrap();
                let entry = old
                    .plan
                    .entries
                    .iter()
                    .find(|e| e.owner.entry == d.entry)
                    .unwrap();
                let mut h = blake3::Hasher::new();
                h.update(&(path.len() as u64).to_le_bytes());
                h.update(path.as_bytes());
                h.update(state_digest(Some(&project(&state, &entry.attributes))).as_bytes());
                EntryDigest {
                    digest: h.finalize().to_hex().to_string(),
                    ..d
                }
            })
            .collect();
        drop(old);

        // Same baseline: nothing differs, nothing is reported.
        let mut same = engine(root.path(), state.path(), paths());
        same.compare_first_scan_with(published.clone().into());
        scan(&mut same, DetectionSource::Startup);
        let known = same.take_known_entries().unwrap();
        assert_eq!(same.differing_entries(&known), (Vec::new(), Vec::new()));
        drop(same);

        // The baseline lost while the agent was down and a file changed: the
        // new baseline's entry names the file.
        std::fs::write(etc.join("passwd"), "evil").unwrap();
        let mut fresh = Engine::open_fresh(root.path(), state.path(), "n").unwrap();
        fresh
            .set_policies(BTreeMap::from([(
                "p".to_string(),
                PolicyInput {
                    generation: Some(1),
                    spec: FileIntegrityPolicySpec::with_paths(paths()),
                },
            )]))
            .unwrap();
        scan(&mut fresh, DetectionSource::Startup);
        let (names, changes) = fresh.differing_entries(&published.clone().into());
        assert_eq!(names, ["p/passwd (/etc/passwd)"]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].path, "/etc/passwd");
        assert_eq!(changes[0].category, ChangeCategory::Modified);
        // Against digests in the current format, the same answer.
        let current = fresh.entry_digests();
        assert_eq!(
            fresh.differing_entries(&current.into()).0,
            Vec::<String>::new()
        );
    }
}
