//! The delivery queue: every change is written to the node's state directory
//! before any API call, and leaves it only once the API server has stored it.
//!
//! One file per report, named by a sequence number, written to a temporary name,
//! fsynced and renamed into place (then the directory is fsynced): a `kill -9` or
//! a power cut leaves either the whole report or none of it. Nothing is ever
//! refused, folded or dropped: past its capacity the queue only says so
//! ([`Queue::has_room`]); the node's disk is the limit (a full disk makes
//! detection wait, see [`super::reporter`]).
//!
//! The queue also knows, in memory, each report's lane (policy and entry,
//! [`Lane`]) and transition number, so the deliverer can pass a lane whose
//! reports are deferred ([`super::storm`]) without reading them from disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use kube_fim_crds::FileChange;
use thiserror::Error;
use tracing::warn;

use super::storm::Lane;

/// Errors of the delivery queue.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("delivery queue {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding a report: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A durable FIFO of FileChange objects waiting for the API server.
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    capacity: usize,
    /// Sequence numbers on disk, oldest first.
    entries: VecDeque<u64>,
    next: u64,
    /// What the deliverer needs to know of each report without reading it.
    index: BTreeMap<u64, Indexed>,
    /// The reports of each lane, oldest first.
    lanes: BTreeMap<Lane, BTreeSet<u64>>,
}

/// A report as the queue remembers it in memory.
#[derive(Debug)]
struct Indexed {
    lane: Lane,
    /// Its transition number (`spec.sequence`), if it has one.
    number: Option<u64>,
}

/// The oldest report of a lane, and how many the lane holds.
#[derive(Clone, Debug, PartialEq)]
pub struct LaneHead<'a> {
    pub lane: &'a Lane,
    /// Its place in the queue.
    pub seq: u64,
    /// Its transition number, if it has one.
    pub number: Option<u64>,
    /// Reports of the lane waiting, this one included.
    pub queued: usize,
}

const SUFFIX: &str = ".json";

impl Queue {
    /// Opens (creating) the queue in `dir`, holding at most `capacity` reports.
    /// Left-over temporary files of an interrupted write are removed; unreadable
    /// entries are moved to `dir/rejected/` and reported, never silently lost.
    pub fn open(dir: &Path, capacity: usize) -> Result<Self, QueueError> {
        let io = |source| QueueError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some(seq) = name
                .strip_suffix(SUFFIX)
                .and_then(|s| s.parse::<u64>().ok())
            {
                entries.push(seq);
            }
        }
        entries.sort_unstable();
        let next = entries.last().map_or(0, |last| last + 1);
        let mut queue = Queue {
            dir: dir.to_path_buf(),
            capacity,
            entries: VecDeque::new(),
            next,
            index: BTreeMap::new(),
            lanes: BTreeMap::new(),
        };
        // Read each report once to know its lane; unreadable ones go to
        // `rejected/` now rather than when their turn comes.
        for seq in entries {
            if let Some(change) = queue.load(seq) {
                queue.entries.push_back(seq);
                queue.remember(seq, &change);
            }
        }
        Ok(queue)
    }

    /// Reads report `seq` back; an unreadable one is moved to `rejected/`
    /// with a warning (and forgotten).
    fn load(&mut self, seq: u64) -> Option<FileChange> {
        let path = self.path(seq);
        match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<FileChange>(&b).map_err(|e| e.to_string()))
        {
            Ok(change) => Some(change),
            Err(error) => {
                let rejected = self.dir.join("rejected");
                let moved = fs::create_dir_all(&rejected)
                    .and_then(|()| fs::rename(&path, rejected.join(format!("{seq:020}{SUFFIX}"))));
                warn!(seq, %error, moved = moved.is_ok(), "unreadable report moved out of the delivery queue");
                self.forget(seq);
                None
            }
        }
    }

    fn remember(&mut self, seq: u64, change: &FileChange) {
        let lane = Lane::of(&change.spec);
        self.lanes.entry(lane.clone()).or_default().insert(seq);
        let number = change.spec.sequence;
        self.index.insert(seq, Indexed { lane, number });
    }

    fn forget(&mut self, seq: u64) {
        self.entries.retain(|s| *s != seq);
        if let Some(Indexed { lane, .. }) = self.index.remove(&seq)
            && let Some(set) = self.lanes.get_mut(&lane)
        {
            set.remove(&seq);
            if set.is_empty() {
                self.lanes.remove(&lane);
            }
        }
    }

    /// The oldest report of each lane that holds any, by lane.
    pub fn heads(&self) -> impl Iterator<Item = LaneHead<'_>> {
        self.lanes.iter().filter_map(|(lane, set)| {
            let seq = *set.first()?;
            Some(LaneHead {
                lane,
                seq,
                number: self.index.get(&seq).and_then(|i| i.number),
                queued: set.len(),
            })
        })
    }

    /// Report `seq`, read from disk (`None` if it is gone or unreadable; an
    /// unreadable one is moved to `rejected/`).
    pub fn get(&mut self, seq: u64) -> Option<FileChange> {
        if !self.index.contains_key(&seq) {
            return None;
        }
        self.load(seq)
    }

    /// The transition numbers of the reports waiting: with the baseline's
    /// saved counter, every number below it is either stored in the cluster
    /// or still here.
    pub fn numbers(&self) -> BTreeSet<u64> {
        self.index.values().filter_map(|i| i.number).collect()
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the queue holds fewer reports than its capacity (past it,
    /// the agent warns; nothing is refused).
    pub fn has_room(&self) -> bool {
        self.entries.len() < self.capacity
    }

    /// Stores a report durably; returns its sequence number. A report is
    /// never refused for the capacity ([`Queue::has_room`]).
    pub fn push(&mut self, change: &FileChange) -> Result<u64, QueueError> {
        let io = |source| QueueError::Io {
            dir: self.dir.clone(),
            source,
        };
        let seq = self.next;
        let bytes = serde_json::to_vec(change)?;
        let tmp = self.dir.join(format!(".tmp-{seq:020}"));
        {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, self.path(seq)).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.next += 1;
        self.entries.push_back(seq);
        self.remember(seq, change);
        Ok(seq)
    }

    /// The oldest `n` reports, without removing them. Entries that cannot be
    /// read back are moved to `rejected/` with a warning.
    pub fn peek(&mut self, n: usize) -> Vec<(u64, FileChange)> {
        let mut out = Vec::new();
        let mut i = 0;
        while out.len() < n && i < self.entries.len() {
            let seq = self.entries[i];
            if let Some(change) = self.load(seq) {
                out.push((seq, change));
                i += 1;
            }
        }
        out
    }

    /// Moves a report the API server will not store to `rejected/`, where it
    /// stays for forensics instead of blocking the queue.
    pub fn reject(&mut self, seq: u64) {
        let rejected = self.dir.join("rejected");
        let moved = fs::create_dir_all(&rejected)
            .and_then(|()| fs::rename(self.path(seq), rejected.join(format!("{seq:020}{SUFFIX}"))));
        if let Err(error) = moved {
            warn!(seq, %error, "could not move a refused report out of the delivery queue");
        }
        self.forget(seq);
    }

    /// The queue's own numbers of the reports waiting, oldest first.
    pub fn waiting(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().copied()
    }

    /// The report waiting under `seq`, if it can be read.
    pub fn read(&self, seq: u64) -> Option<FileChange> {
        let bytes = fs::read(self.path(seq)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Forgets a report the API server has stored.
    pub fn ack(&mut self, seq: u64) -> Result<(), QueueError> {
        match fs::remove_file(self.path(seq)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(QueueError::Io {
                    dir: self.dir.clone(),
                    source,
                });
            }
        }
        self.forget(seq);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;
    use kube_fim_crds::{ChangeCategory, DetectionSource, FileChangeSpec};

    fn change(path: &str) -> FileChange {
        FileChange::new(
            &format!("n{}", path.len()),
            FileChangeSpec {
                node: "n".into(),
                policy: "p".into(),
                entry: "e".into(),
                path: path.into(),
                category: ChangeCategory::Added,
                changed_attributes: vec![],
                before: None,
                after: None,
                detected_time: MicroTime(Timestamp::now()),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                sequence: None,
                package: None,
                restored: None,
                container: None,
            },
        )
    }

    #[test]
    fn reports_survive_a_reopen_in_order_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 10).unwrap();
        q.push(&change("/a")).unwrap();
        let b = q.push(&change("/bb")).unwrap();
        q.push(&change("/ccc")).unwrap();
        drop(q);
        let mut q = Queue::open(dir.path(), 10).unwrap();
        assert_eq!(q.len(), 3);
        let first: Vec<String> = q.peek(2).into_iter().map(|(_, c)| c.spec.path).collect();
        assert_eq!(first, ["/a", "/bb"]);
        q.ack(b).unwrap();
        let all: Vec<String> = q.peek(10).into_iter().map(|(_, c)| c.spec.path).collect();
        assert_eq!(all, ["/a", "/ccc"]);
        // New reports go after the old ones, also after a reopen.
        drop(q);
        let mut q = Queue::open(dir.path(), 10).unwrap();
        q.push(&change("/dddd")).unwrap();
        let all: Vec<String> = q.peek(10).into_iter().map(|(_, c)| c.spec.path).collect();
        assert_eq!(all, ["/a", "/ccc", "/dddd"]);
    }

    #[test]
    fn a_full_queue_says_so_but_never_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 2).unwrap();
        q.push(&change("/a")).unwrap();
        assert!(q.has_room());
        q.push(&change("/b")).unwrap();
        assert!(!q.has_room());
        q.push(&change("/c")).unwrap();
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn lanes_and_numbers_are_known_without_reading_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 10).unwrap();
        let report = |path: &str, entry: &str, number: u64| {
            let mut c = change(path);
            c.spec.entry = entry.into();
            c.spec.sequence = Some(number);
            c
        };
        let a0 = q.push(&report("/a0", "a", 0)).unwrap();
        let a1 = q.push(&report("/a1", "a", 1)).unwrap();
        let b2 = q.push(&report("/b2", "b", 2)).unwrap();
        let heads = |q: &Queue| {
            q.heads()
                .map(|h| (h.lane.entry.clone(), h.seq, h.number, h.queued))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            heads(&q),
            [("a".into(), a0, Some(0), 2), ("b".into(), b2, Some(2), 1)]
        );
        q.ack(a0).unwrap();
        assert_eq!(q.numbers(), BTreeSet::from([1, 2]));
        drop(q);
        let mut q = Queue::open(dir.path(), 10).unwrap();
        assert_eq!(
            heads(&q),
            [("a".into(), a1, Some(1), 1), ("b".into(), b2, Some(2), 1)]
        );
        assert_eq!(q.get(b2).unwrap().spec.path, "/b2");
        q.reject(b2);
        assert!(q.get(b2).is_none());
        assert_eq!(heads(&q), [("a".into(), a1, Some(1), 1)]);
        assert_eq!(q.numbers(), BTreeSet::from([1]));
    }

    #[test]
    fn interrupted_writes_and_garbage_are_cleaned_not_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 10).unwrap();
        q.push(&change("/a")).unwrap();
        fs::write(dir.path().join(".tmp-00000000000000000007"), b"{\"half").unwrap();
        fs::write(dir.path().join("00000000000000000005.json"), b"not json").unwrap();
        drop(q);
        let mut q = Queue::open(dir.path(), 10).unwrap();
        assert!(!dir.path().join(".tmp-00000000000000000007").exists());
        let all: Vec<String> = q.peek(10).into_iter().map(|(_, c)| c.spec.path).collect();
        assert_eq!(all, ["/a"]);
        assert!(
            dir.path()
                .join("rejected/00000000000000000005.json")
                .exists()
        );
    }
}
