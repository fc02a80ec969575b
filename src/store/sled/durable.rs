//! Making sled's writes durable: its `flush()` alone does not (see [`DataFiles::flush_and_sync`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

/// The files a sled database keeps its data in: the data file, and the blob files it writes
/// beside it for items too big for its log.
pub(super) struct DataFiles {
    data: File,
    blobs: PathBuf,
    /// The highest blob id known to be synced (blob ids are log positions: they only grow).
    synced_blob: AtomicU64,
}

impl DataFiles {
    /// The files of the database at `path` (already opened by sled).
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let data = File::open(path.join("db"))?;
        // Synced once, so a freshly created data file's entry is durable.
        File::open(path)?.sync_all()?;
        Ok(Self {
            data,
            blobs: path.join("blobs"),
            synced_blob: AtomicU64::new(0),
        })
    }

    /// Flushes sled's buffers, then fsyncs what they were written to.
    ///
    /// sled 0.34's `flush()` ends in `sync_file_range`, which neither flushes the device's write
    /// cache nor the file's metadata (sled #1351, #1452), so the data file is fsynced here. And
    /// sled writes any item over a quarter of its segment size (a leaf node holding a few large
    /// values, when it rewrites it) to a blob file of its own that nothing syncs at all: the
    /// blobs written since the last sync are fsynced first, with their directory, so an
    /// acknowledged write never lives only in an unsynced blob.
    pub(super) fn flush_and_sync(&self, db: &sled::Db) -> Result<(), StoreError> {
        db.flush()?;
        // A blob is written when its item enters sled's buffer, so the flush above wrote every
        // blob its data points at.
        self.sync_new_blobs()?;
        self.data.sync_data()?;
        Ok(())
    }

    /// Fsyncs the blob files written since the last call, then their directory; returns how
    /// many it synced.
    fn sync_new_blobs(&self) -> io::Result<usize> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let synced = self.synced_blob.load(Ordering::Acquire);
        let mut highest = synced;
        let mut count = 0;
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if id <= synced {
                continue;
            }
            match File::open(entry.path()) {
                Ok(blob) => blob.sync_all()?,
                // Collected since it was listed: sled no longer needs it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            highest = highest.max(id);
            count += 1;
        }
        if count > 0 {
            File::open(&self.blobs)?.sync_all()?;
            self.synced_blob.fetch_max(highest, Ordering::AcqRel);
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values large enough that sled rewrites their leaf as a blob.
    fn write_blobs(db: &sled::Db) -> Result<(), StoreError> {
        let tree = db.open_tree("t")?;
        for i in 0u32..40 {
            tree.insert(i.to_be_bytes(), vec![i as u8; 60 * 1024])?;
        }
        Ok(())
    }

    fn blob_count(dir: &Path) -> io::Result<usize> {
        Ok(std::fs::read_dir(dir.join("blobs"))?.count())
    }

    #[test]
    fn every_blob_sled_wrote_is_synced_once() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let db = sled::Config::new().path(dir.path()).open()?;
        let files = DataFiles::open(dir.path())?;
        assert_eq!(files.sync_new_blobs()?, 0);
        write_blobs(&db)?;
        db.flush()?;
        let written = blob_count(dir.path())?;
        assert!(written > 0, "the test wrote no blob");
        assert_eq!(files.sync_new_blobs()?, written);
        // Only new ones are synced again.
        assert_eq!(files.sync_new_blobs()?, 0);
        files.flush_and_sync(&db)?;
        Ok(())
    }
}
