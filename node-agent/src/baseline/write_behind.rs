//! Background writes: a baseline being built (not the baseline yet) is
//! written a batch at a time while the scan goes on, as one more task on the
//! scan's threads (never a thread of its own: `--threads` is the scan's whole
//! budget), and read meanwhile as changes under those pending. A scan on one
//! thread writes in line.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use redb::{Database, Durability};
use tracing::warn;

use super::digest::SetHash;
use super::read::Reader;
use super::store::{FILES, META, write_records};
use super::{Baseline, BaselineError, Tracked};

/// Changed records kept in memory before a scan writes them.
pub(super) const BATCH: usize = 4096;

/// A transaction of changed records on the scan's threads, while a scan
/// goes on.
pub(super) struct Writing {
    pub(super) records: Arc<BTreeMap<String, Option<Tracked>>>,
    done: mpsc::Receiver<Result<SetHash, BaselineError>>,
}

/// Waits for the writer's answer; on a thread of the scan's pool, running
/// the pool's other work meanwhile (the writer itself, if no other thread
/// took it: a pool of one thread would wait forever otherwise).
fn wait_for<T>(done: &mpsc::Receiver<T>) -> Option<T> {
    if rayon::current_thread_index().is_none() {
        return done.recv().ok();
    }
    loop {
        match done.try_recv() {
            Ok(t) => return Some(t),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            // Another thread of the pool is writing: no busy wait.
            if let Ok(t) = done.recv_timeout(Duration::from_millis(1)) {
                return Some(t);
            }
        }
    }
}

/// One transaction, not durable (a baseline being built, not the baseline
/// yet), of changed records; the digest of the store after it.
pub(super) fn write_behind(
    db: &Database,
    path: &Path,
    records: &BTreeMap<String, Option<Tracked>>,
    mut sum: SetHash,
) -> Result<SetHash, BaselineError> {
    let store = |e: redb::Error| BaselineError::store(path, e);
    let mut tx = db.begin_write().map_err(|e| store(e.into()))?;
    tx.set_durability(Durability::None)
        .map_err(|e| store(redb::Error::Corrupted(e.to_string())))?;
    {
        let mut files = tx.open_table(FILES).map_err(|e| store(e.into()))?;
        write_records(&mut files, records, &mut sum).map_err(store)?;
        let mut meta = tx.open_table(META).map_err(|e| store(e.into()))?;
        meta.insert("sum", sum.to_bytes().as_slice())
            .map_err(|e| store(e.into()))?;
    }
    tx.commit().map_err(|e| store(e.into()))?;
    Ok(sum)
}

impl Baseline {
    /// Writes the pending changes once there are [`BATCH`] of them, so a scan
    /// of any size holds a bounded number in memory. A baseline being built
    /// (not the baseline yet) is written as a task on the scan's threads
    /// while the scan goes on, one batch at a time; off them (a scan on one
    /// thread), in line.
    pub fn flush_if_full(&mut self) -> Result<(), BaselineError> {
        if self.pending.len() < BATCH {
            return Ok(());
        }
        if !self.fresh {
            return self.save().map(|_| ());
        }
        self.finish_writing()?;
        if rayon::current_num_threads() < 2 || rayon::current_thread_index().is_none() {
            return self.write(false).map(|_| ());
        }
        let records = Arc::new(std::mem::take(&mut self.pending));
        let (db, sum, path) = (
            Arc::clone(&self.db),
            self.sum.clone(),
            self.state.new_store(),
        );
        let job = Arc::clone(&records);
        let (tx, done) = mpsc::sync_channel(1);
        rayon::spawn(move || {
            let _ = tx.send(write_behind(&db, &path, &job, sum));
        });
        self.writing = Some(Writing { records, done });
        Ok(())
    }

    /// Waits for the records being written in the background; if they could
    /// not be, they are pending again.
    pub fn finish_writing(&mut self) -> Result<(), BaselineError> {
        let Some(w) = self.writing.take() else {
            return Ok(());
        };
        let result = wait_for(&w.done).unwrap_or_else(|| {
            Err(BaselineError::Io {
                path: self.state.new_store(),
                source: std::io::Error::other("the baseline writer stopped"),
            })
        });
        // A reader's snapshot would keep the pages the commit freed.
        *self.reader() = Reader::default();
        match result {
            Ok(sum) => {
                self.sum = sum;
                self.writes += 1;
                Ok(())
            }
            Err(e) => {
                for (k, t) in Arc::unwrap_or_clone(w.records) {
                    self.pending.entry(k).or_insert(t);
                }
                Err(e)
            }
        }
    }

    /// Whether changes wait to be written.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.writing.is_some()
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Err(error) = self.finish_writing() {
            warn!(%error, "baseline changes not written");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::baseline::tests::{attrs, reopen};

    /// Builds a baseline of `n` records on a pool of `threads` scan threads;
    /// `during` looks at it right after the first batch was handed over.
    fn build_on(
        threads: usize,
        n: usize,
        during: impl Fn(&Baseline) + Send + Sync,
    ) -> (Baseline, String) {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (b, saved) = pool.install(|| {
            let mut b = Baseline::create(dir.path()).unwrap();
            for i in 0..n {
                b.establish_path(&format!("/d/f{i:05}"), Some(attrs(i as u64)));
                b.flush_if_full().unwrap();
                if i == BATCH {
                    during(&b);
                }
            }
            assert_eq!(b.keys_under("/d").len(), n);
            assert_eq!(b.children("/").len(), 1);
            let saved = b.save().unwrap();
            assert!(b.writing.is_none());
            (b, saved)
        });
        drop(b);
        let (b, on_disk) = reopen(dir.path());
        assert_eq!(on_disk, saved, "the digest kept is the one of the records");
        assert_eq!(
            b.approved(&format!("/d/f{:05}", n - 1)),
            Some(attrs(n as u64 - 1))
        );
        (b, saved)
    }

    #[test]
    fn a_baseline_being_built_is_written_in_the_background_and_read_meanwhile() {
        build_on(2, 2 * BATCH + 10, |b| {
            // The first batch is on its way to the store, as a task of the
            // scan's threads: still read.
            assert!(b.writing.is_some());
            assert_eq!(b.approved("/d/f00001"), Some(attrs(1)));
            assert!(b.children("/d")["f00002"].known);
            assert_eq!(b.keys_under("/d").len(), BATCH + 1);
        });
    }

    #[test]
    fn on_one_thread_the_baseline_is_written_in_line_to_the_same_digest() {
        let n = 2 * BATCH + 10;
        let (_, one) = build_on(1, n, |b| {
            // No writer beside the one thread of the budget.
            assert!(b.writing.is_none());
            assert_eq!(b.approved("/d/f00001"), Some(attrs(1)));
        });
        let (_, two) = build_on(2, n, |_| {});
        assert_eq!(one, two);
    }
}
