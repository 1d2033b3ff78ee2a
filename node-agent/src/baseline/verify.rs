//! Verification of the files table at start: every record decoded and its
//! digest recomputed, on as many threads as a scan hashes on. An edit made
//! on the node while the agent is down changes the digest and is noticed; a
//! record that does not decode makes the store corrupt.

use std::sync::Mutex;

use redb::{ReadOnlyTable, ReadableTable};

use super::digest::{SetHash, TAG_FILE};
use super::store::VERSION_JSON_RECORDS;
use super::{Tracked, record};

/// Records handed at once to a thread verifying the files table.
pub(super) const VERIFY_BATCH: usize = 1024;

/// Why the files table could not be verified.
pub(super) enum Unreadable {
    Store(redb::Error),
    /// A record that does not decode: its key and the error.
    Record(String),
}

/// Records copied out of the files table, verified on another thread.
#[derive(Default)]
pub(super) struct RecordBatch {
    bytes: Vec<u8>,
    /// (end of the key, end of the value) of each record in `bytes`.
    ends: Vec<(usize, usize)>,
}

impl RecordBatch {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((key_end, self.bytes.len()));
    }

    fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(key_end, end)| {
            let record = (&self.bytes[start..key_end], &self.bytes[key_end..end]);
            start = end;
            record
        })
    }
}

/// Decodes a record of the files table of `version` (one that does not is
/// corrupt).
pub(super) fn decode_record(version: &[u8], value: &[u8]) -> Result<Tracked, String> {
    if version == VERSION_JSON_RECORDS {
        serde_json::from_slice(value).map_err(|e| e.to_string())
    } else {
        record::decode(value).map_err(|e| e.to_string())
    }
}

/// Decodes a record of the files table (one that does not is corrupt) and
/// adds it to `sum`.
pub(super) fn verify_record(
    version: &[u8],
    key: &[u8],
    value: &[u8],
    sum: &mut SetHash,
) -> Result<(), Unreadable> {
    decode_record(version, value)
        .map_err(|e| Unreadable::Record(format!("{}: {e}", String::from_utf8_lossy(key))))?;
    sum.add_bytes(TAG_FILE, key, value);
    Ok(())
}

/// The digest of every record of the files table, each verified. With more
/// than one thread the table is read on the calling thread and the records
/// are decoded and hashed on `threads` others (the digest is a sum: the parts
/// add up whatever the order); a start of the agent waits for this pass.
pub(super) fn files_sum<K>(
    files: &ReadOnlyTable<K, &'static [u8]>,
    version: &[u8],
    threads: usize,
) -> Result<SetHash, Unreadable>
where
    K: redb::Key + 'static,
    for<'a> K::SelfType<'a>: AsRef<[u8]>,
{
    let store = |e: redb::StorageError| Unreadable::Store(e.into());
    let mut sum = SetHash::zero();
    if threads <= 1 {
        for item in files.iter().map_err(store)? {
            let (k, v) = item.map_err(store)?;
            verify_record(version, k.value().as_ref(), v.value(), &mut sum)?;
        }
        return Ok(sum);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<RecordBatch>(2 * threads);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<SetHash, Unreadable> {
                    if let Err(e) = crate::budget::lower_this_thread() {
                        tracing::debug!(%e, "baseline verification keeps its priority");
                    }
                    let mut sum = SetHash::zero();
                    loop {
                        let batch = rx
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        let Ok(batch) = batch else {
                            return Ok(sum);
                        };
                        for (k, v) in batch.records() {
                            verify_record(version, k, v, &mut sum)?;
                        }
                    }
                })
            })
            .collect();
        let read = (|| -> Result<(), Unreadable> {
            let mut batch = RecordBatch::default();
            for item in files.iter().map_err(store)? {
                let (k, v) = item.map_err(store)?;
                batch.push(k.value().as_ref(), v.value());
                if batch.ends.len() == VERIFY_BATCH && tx.send(std::mem::take(&mut batch)).is_err()
                {
                    // Every verifier stopped: one found a corrupt record.
                    return Ok(());
                }
            }
            let _ = tx.send(batch);
            Ok(())
        })();
        drop(tx);
        for worker in workers {
            let part = worker
                .join()
                .unwrap_or_else(|_| Err(Unreadable::Record("verification failed".into())))?;
            sum.combine(&part);
        }
        read.map(|()| sum)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use redb::ReadableDatabase;

    use super::*;
    use crate::baseline::store::{FILES, VERSION, builder};
    use crate::baseline::tests::attrs;
    use crate::baseline::{Baseline, BaselineError, FILE};

    #[test]
    fn records_are_verified_alike_on_any_number_of_threads() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Baseline::create(dir.path()).unwrap();
        let n = 3 * VERIFY_BATCH + 17;
        for i in 0..n {
            b.establish_path(&format!("/f{i:05}"), Some(attrs(i as u64)));
        }
        b.save().unwrap();
        drop(b);
        let sums = |path: &Path| -> Vec<Result<Vec<u8>, String>> {
            let db = builder().open(path).unwrap();
            let tx = db.begin_read().unwrap();
            let files = tx.open_table(FILES).unwrap();
            [1, 2, 3]
                .map(|threads| match files_sum(&files, VERSION, threads) {
                    Ok(s) => Ok(s.to_bytes()),
                    Err(Unreadable::Record(m)) => Err(m),
                    Err(Unreadable::Store(e)) => Err(e.to_string()),
                })
                .to_vec()
        };
        let path = dir.path().join(FILE);
        let clean = sums(&path);
        assert!(
            clean.iter().all(|s| s == &clean[0] && s.is_ok()),
            "one digest"
        );
        // One undecodable record in the middle is found, and named.
        {
            let db = builder().open(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(FILES)
                .unwrap()
                .insert("/f02000".as_bytes(), b"\xff".as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        for r in sums(&path) {
            let e = r.unwrap_err();
            assert!(e.starts_with("/f02000: "), "{e}");
        }
        assert!(matches!(
            Baseline::load(dir.path()),
            Err(BaselineError::Corrupt { .. })
        ));
    }
}
