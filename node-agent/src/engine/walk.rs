//! The parallel walk of a full scan: one directory at a time, depth first,
//! its entries on disk merged with the baseline's records of its children.
//! Paths are planned (which entries own them, wanting what), inspected and
//! their records read ahead in batches ([`plan_batch`]), one batch ahead of
//! the judgement, which goes in the order the walk found them. All of it runs
//! on the scan's threads: `--threads N` is the scan's whole CPU budget.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{Attribute, DetectionSource};
use rayon::prelude::*;
use tracing::warn;

use super::{Engine, Outcome, ScanError};
use crate::baseline::{KnownChild, Prefetched, Snapshot};
use crate::hostfs::{HostRoot, InspectError, Inspected, Item};
use crate::paths::{escape, host_path, unescape};
use crate::plan::{Entry, Plan};

/// A path a scan reaches, and what is known of it.
#[derive(Clone, Debug)]
pub(super) struct Node {
    path: PathBuf,
    /// Listed by its directory: `Some(true)` for a directory.
    listed: Option<bool>,
    /// The baseline has a record of the path / records below it.
    known: bool,
    below: bool,
}

/// Files counted by a scan.
#[derive(Default)]
pub(super) struct Tally {
    per_policy: BTreeMap<String, usize>,
    total: usize,
}

impl Tally {
    fn count(&mut self, owners: &[&Entry]) {
        self.total += 1;
        let mut counted = BTreeSet::new();
        for o in owners {
            if counted.insert(&o.owner.policy) {
                *self.per_policy.entry(o.owner.policy.clone()).or_default() += 1;
            }
        }
    }
}

/// Whether the scan judges the path (if an entry owns it): found on disk,
/// known to the baseline, or an entry's base.
pub(super) fn candidate(plan: &Plan, node: &Node) -> bool {
    node.listed.is_some() || node.known || is_base(plan, &node.path)
}

pub(super) fn is_base(plan: &Plan, path: &Path) -> bool {
    plan.entries.iter().any(|e| e.base == path)
}

/// Whether an entry lists the directory's entries on disk: its own base, or a
/// directory its recursion covers.
pub(super) fn lists(plan: &Plan, node: &Node) -> bool {
    is_base(plan, &node.path)
        || (node.listed == Some(true)
            && plan
                .entries
                .iter()
                .any(|e| e.recursive && e.covers(&node.path)))
}

/// Whether the scan goes below the path: listed, known below, or on the way to
/// a deeper entry's base.
pub(super) fn descends(plan: &Plan, node: &Node) -> bool {
    node.below
        || lists(plan, node)
        || plan
            .entries
            .iter()
            .any(|e| e.base != node.path && e.base.starts_with(&node.path))
}

/// Paths inspected together on the scan's threads before being judged.
pub(super) const SCAN_BATCH: usize = 2048;

/// A path to judge, as planned on the scan's threads: its key, its owners
/// (indices of plan entries), the attributes they want, its record read
/// ahead.
pub(super) struct Todo {
    path: PathBuf,
    key: String,
    owners: Vec<usize>,
    want: Arc<[Attribute]>,
    record: Option<Prefetched>,
}

/// A batch planned and inspected on the scan's threads.
pub(super) struct Planned {
    todo: Vec<Todo>,
    inspected: Vec<Inspected>,
    hashed: u64,
}

/// Plans a batch (which paths, owned by which entries, wanting what), then
/// inspects its paths and reads their records, on the scan's threads.
pub(super) fn plan_batch(
    root: &HostRoot,
    parallel: bool,
    plan: &Plan,
    nodes: Vec<Node>,
    snapshot: Option<Snapshot>,
) -> Planned {
    let mut todo = Vec::with_capacity(nodes.len());
    // Which entries own each path, and its key: on every scan thread.
    let owned = |node: &Node| -> (Vec<usize>, String) {
        let owners: Vec<usize> = plan
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.covers(&node.path))
            .map(|(i, _)| i)
            .collect();
        let key = if owners.is_empty() {
            String::new()
        } else {
            host_path(&node.path)
        };
        (owners, key)
    };
    let owned: Vec<(Vec<usize>, String)> = if parallel {
        nodes.par_iter().with_min_len(64).map(owned).collect()
    } else {
        nodes.iter().map(owned).collect()
    };
    // Paths of one entry want the same attributes: shared.
    let mut last: Option<(Vec<usize>, Arc<[Attribute]>)> = None;
    for (node, (owners, key)) in nodes.into_iter().zip(owned) {
        if owners.is_empty() {
            continue;
        }
        let want = match &last {
            Some((o, w)) if *o == owners => Arc::clone(w),
            _ => {
                let entries: Vec<&Entry> = owners.iter().map(|&i| &plan.entries[i]).collect();
                let w: Arc<[Attribute]> = Plan::wanted(&entries).into();
                last = Some((owners.clone(), Arc::clone(&w)));
                w
            }
        };
        todo.push(Todo {
            key,
            path: node.path,
            owners,
            want,
            record: None,
        });
    }
    let items: Vec<Item<'_>> = todo.iter().map(|t| Item::of(&t.path, &t.want)).collect();
    let read = |t: &Todo| snapshot.as_ref().map(|s| s.read(&t.key));
    let ((inspected, hashed), records): (_, Vec<Option<Prefetched>>) = if parallel {
        rayon::join(
            || root.run_batch(&items, true),
            || todo.par_iter().with_min_len(64).map(read).collect(),
        )
    } else {
        (
            root.run_batch(&items, false),
            todo.iter().map(read).collect(),
        )
    };
    drop(items);
    for (t, r) in todo.iter_mut().zip(records) {
        t.record = r;
    }
    Planned {
        todo,
        inspected,
        hashed,
    }
}

impl Engine {
    /// Directories to watch in real time (absolute paths).
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut out: BTreeSet<PathBuf> = self.dirs.clone();
        for e in &self.plan.entries {
            // An exact file or a wildcard is watched through its directory.
            let dir = if e.pattern.is_some() || self.dirs.contains(&e.base) {
                e.base.clone()
            } else {
                e.base.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            out.insert(dir);
        }
        out.into_iter().map(|d| self.root.path().join(d)).collect()
    }

    /// A full scan: every monitored path now, against the baseline. One
    /// directory at a time, depth first: its entries on disk merged with the
    /// baseline's records of its children, so memory holds a directory, never
    /// the tree, and the changes are written in batches as the scan goes.
    pub fn scan(&mut self, source: DetectionSource) -> Outcome {
        let mut out = Outcome::default();
        if self.plan.entries.is_empty() {
            // Nothing served: keep the baseline as it is rather than forget it.
            self.files_per_policy.clear();
            self.files_total = 0;
            return out;
        }
        self.mounts = self.mount_source.read();
        if self.mounts_compared.is_none() {
            self.mounts_compared = self.mounts.clone();
        }
        let plan = Arc::clone(&self.plan);
        let mut tally = Tally::default();
        self.dirs.clear();
        // The scan judges every monitored path again.
        self.unreadable.clear();
        // The bases no other base contains: the subtrees the scan visits.
        let mut bases: Vec<&Path> = plan.entries.iter().map(|e| e.base.as_path()).collect();
        bases.sort();
        bases.dedup();
        let roots: Vec<Node> = bases
            .iter()
            .filter(|b| !bases.iter().any(|o| o != *b && b.starts_with(o)))
            .map(|b| Node {
                path: b.to_path_buf(),
                listed: None,
                known: self.baseline.knows(&host_path(b)),
                below: true,
            })
            .collect();
        // The whole scan runs on the scan's threads (`--threads` is its
        // whole budget: no judging or writing thread on top). Planned and
        // inspected a batch at a time (across directories), one batch ahead
        // of the judging, which goes in the order the walk found them; the
        // two are joined, so a thread done with its half steals work from the
        // other. The records of a batch are read ahead with it unless the
        // baseline was written while the previous batch was judged (they
        // would be stale), or the scan has one thread (nothing runs ahead).
        let root = self.root.clone();
        root.on_scan_threads(|parallel| {
            self.walk(&roots, &plan, parallel, source, &mut out, &mut tally);
        });
        if let Err(error) = self.baseline.finish_writing() {
            warn!(%error, "could not write the baseline; changes kept in memory");
        }
        // Paths no served entry owns stay in the baseline: a policy served
        // again later compares with them. Every planned entry is now
        // established: later differences are reported.
        let now = Timestamp::now();
        for e in &plan.entries {
            self.baseline.establish(&e.owner.policy, &e.owner.entry);
        }
        for (name, p) in &self.policies {
            self.baseline.scanned(name, p.generation, now);
        }
        self.resumed.clear();
        self.files_per_policy = tally.per_policy;
        self.files_total = tally.total;
        self.last_errors = out.errors.clone();
        out.files = tally.total;
        out
    }

    /// The walk of [`Engine::scan`] from `roots`, on the scan's threads
    /// (`parallel`) or the caller's.
    fn walk(
        &mut self,
        roots: &[Node],
        plan: &Arc<Plan>,
        parallel: bool,
        source: DetectionSource,
        out: &mut Outcome,
        tally: &mut Tally,
    ) {
        // With nothing pending at the start, the scan writes only the paths
        // it judged: what was read ahead stays current whatever it writes.
        let unwritten = !self.baseline.has_pending();
        let reads_ahead = parallel && self.root.threads() > 1;
        let mut read_ahead = reads_ahead;
        let mut judging: Option<Planned> = None;
        let mut batch: Vec<Node> = roots
            .iter()
            .filter(|n| candidate(plan, n))
            .cloned()
            .collect();
        // Directories still to descend into, depth first. Files never go on
        // it (nothing below them): one copy of their path, in the batch.
        let mut stack: Vec<Node> = roots
            .iter()
            .rev()
            .filter(|n| descends(plan, n))
            .cloned()
            .collect();
        // Candidates of a directory listed but not yet batched: a directory
        // of 20,000 entries is judged in batches of SCAN_BATCH like any
        // other (memory is bounded by the batch, not the largest directory),
        // in the same order.
        let mut listed: VecDeque<Node> = VecDeque::new();
        loop {
            while batch.len() < SCAN_BATCH {
                if let Some(node) = listed.pop_front() {
                    batch.push(node);
                    continue;
                }
                let Some(node) = stack.pop() else {
                    break;
                };
                let at = stack.len();
                self.children(&node, plan, &mut out.errors, |child| {
                    let down = descends(plan, &child);
                    match (candidate(plan, &child), down) {
                        (true, true) => {
                            listed.push_back(child.clone());
                            stack.push(child);
                        }
                        (true, false) => listed.push_back(child),
                        (false, true) => stack.push(child),
                        (false, false) => {}
                    }
                });
                // Popped in name order.
                stack[at..].reverse();
            }
            let nodes = std::mem::take(&mut batch);
            let done = stack.is_empty() && listed.is_empty();
            let snapshot = read_ahead.then(|| self.baseline.snapshot()).flatten();
            let root = self.root.clone();
            let next = || plan_batch(&root, parallel, plan, nodes, snapshot);
            let planned = match judging.take() {
                Some(prev) => {
                    let writes = self.baseline.writes();
                    let judge =
                        || self.judge_planned(prev, plan, unwritten, source, out, tally, true);
                    let planned = if parallel {
                        rayon::join(next, judge).0
                    } else {
                        judge();
                        next()
                    };
                    read_ahead = reads_ahead && (unwritten || self.baseline.writes() == writes);
                    planned
                }
                None => next(),
            };
            if done {
                self.judge_planned(planned, plan, unwritten, source, out, tally, false);
                return;
            }
            judging = Some(planned);
        }
    }

    /// The children of a directory the scan descends into, handed to `each`
    /// in name order (as in keys): what is in it on disk (if an entry lists
    /// it), what the baseline knows in it, and the way to the bases of
    /// entries deeper down. The three are merged as streams, each sorted by
    /// name: a directory of 20,000 entries is held once (its listing), not
    /// again in a map of the merged children.
    pub(super) fn children(
        &mut self,
        node: &Node,
        plan: &Plan,
        errors: &mut Vec<ScanError>,
        mut each: impl FnMut(Node),
    ) {
        // On disk: (name as in keys, is a directory), sorted.
        let mut on_disk: Vec<(String, bool)> = Vec::new();
        if lists(plan, node) {
            match self.root.list_dir(&node.path) {
                Ok(children) => {
                    self.dirs.insert(node.path.clone());
                    // In place: a name replaces the entry it comes from.
                    on_disk = children
                        .into_iter()
                        .map(|c| (escape(&c.name), c.is_dir))
                        .collect();
                    on_disk.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                }
                // Not a directory (a file, a symlink): nothing below.
                Err(InspectError::Io(_)) | Err(InspectError::Loop) => {}
                Err(err) => errors.push(ScanError {
                    path: host_path(&node.path),
                    reason: err.to_string(),
                }),
            }
        }
        // On the way to deeper bases (a few).
        let mut ways: Vec<String> = plan
            .entries
            .iter()
            .filter_map(|e| e.base.strip_prefix(&node.path).ok())
            .filter_map(|rest| rest.components().next())
            .map(|first| escape(first.as_os_str()))
            .collect();
        ways.sort_unstable();
        ways.dedup();
        let known = self.baseline.children(&host_path(&node.path));
        let mut on_disk = on_disk.into_iter().peekable();
        let mut ways = ways.into_iter().peekable();
        let mut known = known.into_iter().peekable();
        loop {
            // Which streams are at the least name (no name is cloned).
            let (d, w, k) = {
                let d = on_disk.peek().map(|(n, _)| n.as_str());
                let w = ways.peek().map(String::as_str);
                let k = known.peek().map(|(n, _)| n.as_str());
                let Some(least) = [d, w, k].into_iter().flatten().min() else {
                    break;
                };
                (d == Some(least), w == Some(least), k == Some(least))
            };
            let mut name = None;
            let mut listed = None;
            if let Some((n, dir)) = d.then(|| on_disk.next()).flatten() {
                listed = Some(dir);
                name = Some(n);
            }
            if let Some(n) = w.then(|| ways.next()).flatten() {
                name.get_or_insert(n);
            }
            let mut child = KnownChild::default();
            if let Some((n, c)) = k.then(|| known.next()).flatten() {
                child = c;
                name.get_or_insert(n);
            }
            let Some(name) = name else {
                break;
            };
            // A name escaped as itself is the name (no `\\` in it).
            let path = if name.contains('\\') {
                node.path.join(unescape(&name))
            } else {
                node.path.join(&name)
            };
            each(Node {
                path,
                listed,
                known: child.known,
                below: child.below,
            });
        }
    }

    /// Judges, in order, the paths of a batch planned and inspected on the
    /// scan's threads; then (`flush`) writes the baseline's changes once a
    /// batch of them is pending.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn judge_planned(
        &mut self,
        planned: Planned,
        plan: &Plan,
        unwritten: bool,
        source: DetectionSource,
        out: &mut Outcome,
        tally: &mut Tally,
        flush: bool,
    ) {
        self.progress.beat();
        out.bytes += planned.hashed;
        for (t, result) in planned.todo.into_iter().zip(planned.inspected) {
            if let Some(record) = t.record {
                self.baseline.prefetched(&t.key, record, unwritten);
            }
            let owners: Vec<&Entry> = t.owners.iter().map(|&i| &plan.entries[i]).collect();
            let current = self.settle(&t.path, &t.want, result, out);
            if current.is_some() {
                tally.count(&owners);
            }
            self.judge(&t.key, &t.path, current, &owners, source, out);
        }
        if flush
            && !self.dry_run
            && let Err(error) = self.baseline.flush_if_full()
        {
            warn!(%error, "could not write the baseline; changes kept in memory");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::tests::*;
    #[test]
    fn nested_deep_and_wildcard_entries_are_scanned_once_each() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let w = |p: &str, c: &str| {
            let p = root.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        };
        w("etc/x", "x");
        w("etc/a/b/c/d/f", "f");
        w("etc/a/b/other", "o");
        w("var/a.log", "l");
        w("var/b.txt", "t");
        let mut e = engine(
            root.path(),
            state.path(),
            vec![
                entry("etc", "/etc", false),
                entry("deep", "/etc/a/b/c", true),
                entry("logs", "/var/*.log", false),
            ],
        );
        assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
        // etc, etc/x, etc/a; etc/a/b/c, its d and d/f; var/a.log.
        assert_eq!(e.files_total, 7);

        w("etc/a/b/c/d/new", "n");
        w("etc/a/b/unwatched", "u");
        w("var/new.log", "n");
        w("var/new.txt", "n");
        std::fs::remove_file(root.path().join("etc/x")).unwrap();
        let d = describe(&scan(&mut e, DetectionSource::Scan));
        assert_eq!(
            d,
            [
                "Added /etc/a/b/c/d/new []",
                "Added /var/new.log []",
                "Removed /etc/x []"
            ]
        );
    }

    #[test]
    fn a_directory_larger_than_a_batch_is_judged_whole_in_order() {
        // A directory of many batches (memory holds one batch of it, not
        // the directory), between subdirectories listed before and after.
        let n = 2 * SCAN_BATCH + 7;
        for threads in [1, 2] {
            let root = tempfile::tempdir().unwrap();
            let state = tempfile::tempdir().unwrap();
            let big = root.path().join("etc/big");
            std::fs::create_dir_all(&big).unwrap();
            for i in 0..n {
                std::fs::write(big.join(format!("f{i:05}")), i.to_string()).unwrap();
            }
            std::fs::create_dir_all(big.join("a-sub")).unwrap();
            std::fs::write(big.join("a-sub/x"), "x").unwrap();
            std::fs::create_dir_all(big.join("z-sub")).unwrap();
            std::fs::write(big.join("z-sub/y"), "y").unwrap();
            let mut e = engine(root.path(), state.path(), vec![etc(true)]);
            e.set_threads(threads);
            assert!(scan(&mut e, DetectionSource::Startup).changes.is_empty());
            // etc, big, its files, 2 subdirectories and their 2 files.
            assert_eq!(e.files_total, 2 + n + 4, "threads {threads}");
            e.save().unwrap();
            std::fs::write(big.join("f00000"), "first").unwrap();
            std::fs::write(big.join(format!("f{:05}", SCAN_BATCH)), "boundary").unwrap();
            std::fs::write(big.join(format!("f{:05}", n - 1)), "last").unwrap();
            std::fs::remove_file(big.join(format!("f{:05}", SCAN_BATCH + 1))).unwrap();
            std::fs::write(big.join("z-sub/y"), "changed").unwrap();
            std::fs::write(big.join("a-sub/new"), "n").unwrap();
            let o = scan(&mut e, DetectionSource::Scan);
            let mut d: Vec<String> = o
                .changes
                .iter()
                .map(|c| format!("{} {}", c.category.as_str(), c.path))
                .collect();
            d.sort();
            assert_eq!(
                d,
                [
                    "Added /etc/big/a-sub/new".to_string(),
                    "Modified /etc/big/f00000".to_string(),
                    format!("Modified /etc/big/f{SCAN_BATCH:05}"),
                    format!("Modified /etc/big/f{:05}", n - 1),
                    "Modified /etc/big/z-sub/y".to_string(),
                    format!("Removed /etc/big/f{:05}", SCAN_BATCH + 1),
                ],
                "threads {threads}"
            );
            // One file fewer, one more.
            assert_eq!(e.files_total, 2 + n + 4, "threads {threads}");
        }
    }

    /// The children of a directory as they were computed before they were
    /// streamed: every source into one map by name.
    fn children_by_map(e: &mut Engine, node: &Node) -> Vec<String> {
        let plan = Arc::clone(&e.plan);
        let mut by_name: BTreeMap<String, Node> = BTreeMap::new();
        if lists(&plan, node)
            && let Ok(children) = e.root.list_dir(&node.path)
        {
            for c in children {
                let n = Node {
                    path: node.path.join(&c.name),
                    listed: Some(c.is_dir),
                    known: false,
                    below: false,
                };
                by_name.insert(escape(&c.name), n);
            }
        }
        for en in &plan.entries {
            if let Ok(rest) = en.base.strip_prefix(&node.path)
                && let Some(first) = rest.components().next()
            {
                let name = first.as_os_str();
                by_name.entry(escape(name)).or_insert_with(|| Node {
                    path: node.path.join(name),
                    listed: None,
                    known: false,
                    below: false,
                });
            }
        }
        for (name, k) in e.baseline.children(&host_path(&node.path)) {
            let n = by_name.entry(name).or_insert_with_key(|name| Node {
                path: node.path.join(unescape(name)),
                listed: None,
                known: false,
                below: false,
            });
            n.known = k.known;
            n.below = k.below;
        }
        by_name.into_values().map(|n| format!("{n:?}")).collect()
    }

    #[test]
    fn children_stream_the_listing_the_records_and_the_way_to_deeper_bases_in_name_order() {
        use std::os::unix::ffi::OsStrExt;
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(etc.join("a/x")).unwrap();
        std::fs::create_dir_all(etc.join("gone-dir/y")).unwrap();
        std::fs::write(etc.join("gone-dir/y/f"), "f").unwrap();
        // Names whose order differs escaped and raw: `-` and `.` sort before
        // `/`, a backslash is escaped, a byte that is not UTF-8 too.
        let odd = [
            &b"a-b"[..],
            b"a.b",
            b"b\\c",
            b"b\xffc",
            b"b]",
            b"\xc3\xa9t\xc3\xa9",
            b"z",
        ];
        for n in odd {
            std::fs::write(etc.join(std::ffi::OsStr::from_bytes(n)), n).unwrap();
        }
        for i in 0..SCAN_BATCH + 3 {
            std::fs::write(etc.join(format!("m{i:05}")), "m").unwrap();
        }
        let paths = vec![
            crate::engine::tests::etc(true),
            entry("deep", "/etc/q/deeper", true),
        ];
        let mut e = engine(root.path(), state.path(), paths);
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        // Records removed, added and changed on disk; some of it still
        // pending in the baseline (not saved), some saved.
        std::fs::remove_file(etc.join("a-b")).unwrap();
        std::fs::remove_dir_all(etc.join("gone-dir")).unwrap();
        std::fs::write(etc.join("a.c"), "new").unwrap();
        std::fs::write(etc.join("m00007"), "changed").unwrap();
        std::fs::remove_file(etc.join("m01000")).unwrap();
        std::fs::write(etc.join("b\\d"), "new").unwrap();
        scan(&mut e, DetectionSource::Scan);
        std::fs::remove_file(etc.join("z")).unwrap();
        std::fs::write(etc.join("a/x/new"), "new").unwrap();
        for node in [
            Node {
                path: "etc".into(),
                listed: Some(true),
                known: true,
                below: true,
            },
            Node {
                path: "etc/a".into(),
                listed: Some(true),
                known: true,
                below: true,
            },
            Node {
                path: "etc/gone-dir".into(),
                listed: None,
                known: true,
                below: true,
            },
        ] {
            let expected = children_by_map(&mut e, &node);
            let plan = Arc::clone(&e.plan);
            let mut streamed = Vec::new();
            e.children(&node, &plan, &mut Vec::new(), |n| {
                streamed.push(format!("{n:?}"))
            });
            assert_eq!(streamed, expected, "{:?}", node.path);
        }
        // The first of them, for the record.
        let plan = Arc::clone(&e.plan);
        let mut names = Vec::new();
        let etc_node = Node {
            path: "etc".into(),
            listed: Some(true),
            known: true,
            below: true,
        };
        e.children(&etc_node, &plan, &mut Vec::new(), |n| {
            names.push(host_path(&n.path))
        });
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        for n in [
            "/etc/a.c",
            "/etc/b\\xffc",
            "/etc/gone-dir",
            "/etc/q",
            "/etc/z",
        ] {
            assert!(names.iter().any(|m| m == n), "{n} in {names:?}");
        }
        // a, gone-dir, q; the odd names, the m files, a.c and b\d.
        assert_eq!(names.len(), 3 + odd.len() + SCAN_BATCH + 3 + 2);
    }

    #[test]
    fn changes_of_a_directory_larger_than_a_batch_come_in_the_order_of_the_walk() {
        let n = SCAN_BATCH + 5;
        for threads in [1, 2] {
            let root = tempfile::tempdir().unwrap();
            let state = tempfile::tempdir().unwrap();
            let big = root.path().join("etc/big");
            std::fs::create_dir_all(big.join("a-sub")).unwrap();
            std::fs::create_dir_all(big.join("z-sub")).unwrap();
            for i in 0..n {
                std::fs::write(big.join(format!("f{i:05}")), "x").unwrap();
            }
            let mut e = engine(root.path(), state.path(), vec![etc(true)]);
            e.set_threads(threads);
            scan(&mut e, DetectionSource::Startup);
            e.save().unwrap();
            std::fs::write(big.join("z-sub/new"), "n").unwrap();
            std::fs::write(big.join("a-sub/new"), "n").unwrap();
            std::fs::write(big.join(format!("f{:05}", n - 1)), "last").unwrap();
            std::fs::remove_file(big.join(format!("f{:05}", SCAN_BATCH))).unwrap();
            std::fs::write(big.join("f00001"), "first").unwrap();
            std::fs::write(big.join("a-new"), "n").unwrap();
            let o = scan(&mut e, DetectionSource::Scan);
            let d: Vec<String> = o
                .changes
                .iter()
                .map(|c| format!("{} {}", c.category.as_str(), c.path))
                .collect();
            assert_eq!(
                d,
                [
                    "Added /etc/big/a-new".to_string(),
                    "Modified /etc/big/f00001".to_string(),
                    format!("Removed /etc/big/f{SCAN_BATCH:05}"),
                    format!("Modified /etc/big/f{:05}", n - 1),
                    "Added /etc/big/a-sub/new".to_string(),
                    "Added /etc/big/z-sub/new".to_string(),
                ],
                "threads {threads}"
            );
        }
    }

    #[test]
    fn a_directory_replaced_by_a_file_reports_what_was_below_it() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/sub/deeper")).unwrap();
        std::fs::write(root.path().join("etc/sub/deeper/f"), "f").unwrap();
        std::fs::write(root.path().join("etc/sub-file"), "g").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        scan(&mut e, DetectionSource::Startup);
        e.save().unwrap();
        drop(e);
        std::fs::remove_dir_all(root.path().join("etc/sub")).unwrap();
        std::fs::write(root.path().join("etc/sub"), "now a file").unwrap();
        let mut e = engine(root.path(), state.path(), vec![etc(true)]);
        let d = describe(&scan(&mut e, DetectionSource::Startup));
        assert_eq!(
            d,
            [
                "Modified /etc/sub [Type, Mode]",
                "Removed /etc/sub/deeper []",
                "Removed /etc/sub/deeper/f []"
            ],
        );
    }
}
