//! The embedded event store on sled 0.34.
//!
//! One committer thread owns every write: it drains whatever requests are queued, validates them
//! against stream metadata, assigns sequence numbers and global positions, writes them (as
//! ordered single inserts that crash recovery completes, `repair.rs`, or one atomic
//! `apply_batch` where a commit deletes or writes snapshots or key-value entries), makes them
//! durable once (group commit), publishes the new head and only then replies. Reads run on tokio's blocking pool, never on an executor or arbiter thread.

mod chain;
mod committer;
mod durable;
mod log;
mod repair;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::keys::{self, LogRecord};
use super::{
    AppendRequest, AppendResult, CommandRecord, EventEnvelope, EventStore, KvWrite, LogPage,
    RecordedOutcome, SnapshotCriteria, SnapshotRecord, StoreError, StreamSlice,
};
use crate::domain::StreamId;
use chain::DirtyMetas;
use committer::{Committer, WriteOp};
use durable::DataFiles;

/// When an acknowledged write is on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Durability {
    /// An acknowledged write has been flushed and fsynced: it survives a crash of the process
    /// and of the machine. Concurrent writes share one fsync (group commit). The default.
    #[default]
    Sync,
    /// An acknowledged write is in sled's memory and reaches disk within `flush_interval_ms`:
    /// a process or machine crash may lose the writes of that window (never part of one).
    Buffered {
        /// How often buffered writes are flushed and fsynced.
        flush_interval_ms: u64,
    },
}

/// How to open a [`SledStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledStoreConfig {
    /// The database directory (created if missing).
    pub path: PathBuf,
    /// When acknowledged writes are on disk.
    pub durability: Durability,
    /// The most events (and other write requests) grouped into one commit.
    pub max_batch: usize,
    /// sled's page cache size in bytes.
    pub cache_capacity_bytes: u64,
}

impl SledStoreConfig {
    /// The defaults for a database at `path`: `sync` durability, batches of up to 4,096 writes,
    /// a 256 MiB cache.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            durability: Durability::Sync,
            max_batch: 4096,
            cache_capacity_bytes: 256 * 1024 * 1024,
        }
    }

    /// Sets the durability.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
}

/// The largest encoded event (or other record) the store accepts. sled writes any item over a
/// quarter of its 512 KiB segments (a value this big, or a leaf holding a few) to a file of its
/// own, which then costs a file creation and an fsync of its own on every commit that writes it.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// The embedded, durable event store. Cheap to clone; every clone shares one database.
#[derive(Clone)]
pub struct SledStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// `None` once closed: dropping the last tree handle releases sled's file lock (once its I/O
    /// threads are done; `open` waits for that), so a closed store can be reopened in the same
    /// process.
    tree: RwLock<Option<sled::Tree>>,
    writes: mpsc::UnboundedSender<WriteOp>,
    head: watch::Receiver<u64>,
    /// Stream metadata the committer has not written yet.
    dirty: Arc<DirtyMetas>,
    committer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The last assigned global position: the last log record's, or the `G` record's where
/// deletions removed the records at the top of the log.
fn stored_head(tree: &sled::Tree) -> Result<u64, StoreError> {
    let recorded = match tree.get(keys::HEAD)? {
        Some(bytes) => keys::trailing_u64(&bytes).ok_or_else(|| StoreError::Decode {
            what: "global head",
            stream: StreamId::new("", ""),
            sequence: 0,
            reason: format!("expected 8 bytes, found {}", bytes.len()),
        })?,
        None => 0,
    };
    // The last value's last record: a chunk is keyed by its first.
    let last_logged = match log::last_value(tree)? {
        Some((_, value)) => value.last_position(),
        None => 0,
    };
    Ok(recorded.max(last_logged))
}

impl SledStore {
    /// Opens (or creates) the database described by `config`. Blocking: call it at start-up or
    /// from a blocking context.
    pub fn open(config: SledStoreConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.path)?;
        let db = open_db(&config)?;
        let tree = db.open_tree("incarnate")?;
        // Every commit's durability goes through these (see `DataFiles::flush_and_sync`).
        let files = Arc::new(DataFiles::open(&config.path)?);
        check_layout(&tree)?;
        let repair = repair::repair_tail(&tree)?;
        if repair.changed() {
            tracing::info!(
                removed = repair.removed,
                restored = repair.restored,
                "completed the log's tail after a crash"
            );
            files.flush_and_sync(&db)?;
        }

        let head = stored_head(&tree)?;
        let (head_tx, head_rx) = watch::channel(head);
        let (tx, rx) = mpsc::unbounded_channel();
        let dirty = Arc::new(DirtyMetas::default());
        let mut committer = Committer::new(
            db,
            tree.clone(),
            files,
            config.clone(),
            head,
            head_tx,
            dirty.clone(),
        );
        committer.recover()?;
        let handle = std::thread::Builder::new()
            .name("incarnate-committer".into())
            .spawn(move || committer.run(rx))?;
        Ok(Self {
            shared: Arc::new(Shared {
                tree: RwLock::new(Some(tree)),
                writes: tx,
                head: head_rx,
                dirty,
                committer: std::sync::Mutex::new(Some(handle)),
            }),
        })
    }

    fn tree(&self) -> Result<sled::Tree, StoreError> {
        match self.shared.tree.read() {
            Ok(guard) => guard.clone().ok_or(StoreError::Closed),
            Err(_) => Err(StoreError::Storage("store lock poisoned".into())),
        }
    }

    /// Sends a write to the committer and awaits its reply.
    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .writes
            .send(make(tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs a read on the blocking pool with a handle to the tree.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&sled::Tree) -> Result<T, StoreError> + Send + 'static,
    {
        let tree = self.tree()?;
        tokio::task::spawn_blocking(move || f(&tree))
            .await
            .map_err(|e| StoreError::Storage(format!("read task failed: {e}")))?
    }
}

/// How long [`SledStore::open`] waits for the database's file lock. sled's I/O threads finish
/// their last writes and file truncations after its last handle is dropped, holding the file (and
/// its lock) a moment longer, so a reopen right after [`EventStore::close`] can find it still
/// locked. Another process holding the database makes `open` fail after this long.
const LOCK_WAIT: Duration = Duration::from_secs(2);

fn open_db(config: &SledStoreConfig) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let opened = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity_bytes)
            // We flush (and fsync) ourselves: in `sync` mode once per group commit, in `buffered`
            // mode on our own timer, so sled's background flusher would only add contention.
            .flush_every_ms(None)
            .open();
        match opened {
            // sled takes the lock before it starts anything, so a refused open left nothing behind.
            Err(sled::Error::Io(e)) if is_lock_conflict(&e) && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

/// sled 0.34 reports a held lock as an `Other` I/O error with this message (`config.rs`).
fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Other && e.to_string().starts_with("could not acquire lock")
}

/// Refuses a database written in another layout; stamps a new one with this build's.
fn check_layout(tree: &sled::Tree) -> Result<(), StoreError> {
    let found = match tree.get(keys::LAYOUT)? {
        Some(bytes) => <[u8; 4]>::try_from(bytes.as_ref())
            .map(u32::from_be_bytes)
            .unwrap_or(0),
        None if tree.first()?.is_none() => {
            tree.insert(keys::LAYOUT, &keys::LAYOUT_VERSION.to_be_bytes())?;
            return Ok(());
        }
        // Databases of the first layout carry no version record.
        None => 1,
    };
    if found == keys::LAYOUT_VERSION {
        Ok(())
    } else if keys::UPGRADABLE_LAYOUTS.contains(&found) {
        // Stamped before anything of the new layout is written, so an older build refuses the
        // database instead of meeting records it cannot read.
        tree.insert(keys::LAYOUT, &keys::LAYOUT_VERSION.to_be_bytes())?;
        tree.flush()?;
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "the database uses store layout {found}; this build reads layout {} (and upgrades {})",
            keys::LAYOUT_VERSION,
            keys::UPGRADABLE_LAYOUTS
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" and ")
        )))
    }
}

/// Decodes a log record read by position, naming it by position under `$log`.
fn decode_log_record(bytes: &[u8], position: u64) -> Result<EventEnvelope, StoreError> {
    let envelope = LogRecord::decode(bytes).map_err(|reason| StoreError::Decode {
        what: "event envelope",
        stream: log_stream().clone(),
        sequence: position,
        reason,
    })?;
    EventEnvelope::decode(envelope.1, log_stream(), position)
}

/// Up to `max` records of the log from `from` to `head`, undecoded.
fn read_log_page(
    tree: &sled::Tree,
    from: u64,
    head: u64,
    max: usize,
) -> Result<LogPage, StoreError> {
    let mut page = LogPage::encoded(decode_log_record, max.min(4096));
    for item in log::records_in(tree, from.max(1)..=head)? {
        let (position, record) = item?;
        page.push_encoded(position, &record);
        if page.len() >= max {
            break;
        }
    }
    Ok(page)
}

/// The pseudo-stream that names a log record by position in errors. Shared: decoding the log
/// names it for every record, and building it each time cost an allocation per event read.
fn log_stream() -> &'static StreamId {
    static LOG: std::sync::LazyLock<StreamId> =
        std::sync::LazyLock::new(|| StreamId::new("$log", ""));
    &LOG
}

#[async_trait]
impl EventStore for SledStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        self.write(|reply| WriteOp::Append { request, reply }).await
    }

    fn preserves_append_order(&self) -> bool {
        // Each append is sent to the one committer on its first poll.
        true
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<StreamSlice, StoreError> {
        let stream = stream.clone();
        let head = self.head();
        let dirty = self.shared.dirty.clone();
        self.read(move |tree| {
            let meta_key = keys::stream_key(keys::META, &stream)?;
            let mut meta = chain::read_meta(tree, &dirty, &meta_key, &stream)?;
            let from = from.max(meta.deleted_to.saturating_add(1)).max(1);
            let mut hops = Vec::new();
            if from <= to && max > 0 {
                // Sequences are dense above the deletion watermark, so the window's first `max`
                // events end at `from + max - 1`: the walk never reads past the window's end.
                let span = u64::try_from(max).unwrap_or(u64::MAX) - 1;
                let last = to.min(from.saturating_add(span));
                let walk = chain::walk(tree, &stream, &meta, from, last)?;
                if let Some((sequence, _, err)) = walk.broken {
                    // A `delete_to` that removed the events below the break after the metadata
                    // was read has published its watermark before the removal (the committer's
                    // `commit`): then the events above the break are the window.
                    let now = chain::read_meta(tree, &dirty, &meta_key, &stream)?;
                    if now.deleted_to < sequence {
                        return Err(err);
                    }
                    meta = now;
                }
                hops = walk.hops;
            }
            let mut events = Vec::with_capacity(hops.len());
            for hop in hops {
                if hop.position > head {
                    // Written by a commit that is not acknowledged yet.
                    break;
                }
                events.push(EventEnvelope::decode(
                    hop.envelope(),
                    &stream,
                    hop.sequence,
                )?);
            }
            Ok(StreamSlice {
                events,
                highest_sequence: meta.highest,
            })
        })
        .await
    }

    async fn highest_sequence(&self, stream: &StreamId) -> Result<u64, StoreError> {
        let stream = stream.clone();
        let dirty = self.shared.dirty.clone();
        self.read(move |tree| {
            let meta_key = keys::stream_key(keys::META, &stream)?;
            Ok(chain::read_meta(tree, &dirty, &meta_key, &stream)?.highest)
        })
        .await
    }

    async fn read_log(&self, from: u64, max: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        let head = self.head();
        if max == 0 || from > head {
            return Ok(Vec::new());
        }
        self.read(move |tree| read_log_page(tree, from, head, max)?.collect())
            .await
    }

    async fn read_log_page(&self, from: u64, max: usize) -> Result<LogPage, StoreError> {
        let head = self.head();
        if max == 0 || from > head {
            return Ok(LogPage::default());
        }
        self.read(move |tree| read_log_page(tree, from, head, max))
            .await
    }

    fn head(&self) -> u64 {
        *self.shared.head.borrow()
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.shared.head.clone()
    }

    async fn delete_to(&self, stream: &StreamId, to_sequence: u64) -> Result<(), StoreError> {
        let stream = stream.clone();
        self.write(|reply| WriteOp::DeleteTo {
            stream,
            to_sequence,
            reply,
        })
        .await
    }

    async fn save_snapshot(&self, snapshot: SnapshotRecord) -> Result<(), StoreError> {
        self.write(|reply| WriteOp::SaveSnapshot { snapshot, reply })
            .await
    }

    async fn latest_snapshot(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let stream = stream.clone();
        self.read(move |tree| {
            let base = keys::stream_key(keys::SNAPSHOT, &stream)?;
            let upper = keys::with_u64(&base, criteria.max_sequence);
            for item in tree.range(base.clone()..=upper).rev() {
                let (key, value) = item?;
                let sequence = keys::trailing_u64(&key).unwrap_or(0);
                let record = SnapshotRecord::decode(&value, &stream, sequence)?;
                if criteria.matches(record.sequence, record.timestamp_micros) {
                    return Ok(Some(record));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn delete_snapshots(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<u64, StoreError> {
        let stream = stream.clone();
        self.write(|reply| WriteOp::DeleteSnapshots {
            stream,
            criteria,
            reply,
        })
        .await
    }

    async fn command_records(&self, stream: &StreamId) -> Result<Vec<CommandRecord>, StoreError> {
        let stream = stream.clone();
        self.read(move |tree| {
            let base = keys::stream_key(keys::COMMAND, &stream)?;
            let mut out = Vec::new();
            for item in tree.scan_prefix(&base) {
                let (key, value) = item?;
                let rest = key.get(base.len()..).unwrap_or_default();
                let version = rest
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes);
                let id = rest.get(8..24).and_then(|b| uuid::Uuid::from_slice(b).ok());
                let outcome: Result<RecordedOutcome, _> = rmp_serde::from_slice(&value);
                match (version, id, outcome) {
                    (Some(version), Some(command_id), Ok(outcome)) => out.push(CommandRecord {
                        command_id,
                        version,
                        outcome,
                    }),
                    (version, _, outcome) => {
                        return Err(StoreError::Decode {
                            what: "command record",
                            stream: stream.clone(),
                            sequence: version.unwrap_or(0),
                            reason: outcome
                                .err()
                                .map_or_else(|| "malformed key".to_owned(), |e| e.to_string()),
                        })
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn kv_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut full = keys::kv_prefix(table)?;
        full.extend_from_slice(key);
        self.read(move |tree| Ok(tree.get(full)?.map(|v| v.to_vec())))
            .await
    }

    async fn kv_scan(
        &self,
        table: &str,
        from: &[u8],
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let prefix = keys::kv_prefix(table)?;
        let mut start = prefix.clone();
        start.extend_from_slice(from);
        self.read(move |tree| {
            let mut out = Vec::new();
            for item in tree.range(start..) {
                if out.len() >= max {
                    break;
                }
                let (key, value) = item?;
                match key.strip_prefix(prefix.as_slice()) {
                    Some(k) => out.push((k.to_vec(), value.to_vec())),
                    None => break,
                }
            }
            Ok(out)
        })
        .await
    }

    async fn kv_commit(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        self.write(|reply| WriteOp::Kv { writes, reply }).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.write(|reply| WriteOp::Flush { reply }).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        let flushed = self.write(|reply| WriteOp::Shutdown { reply }).await;
        let handle = self
            .shared
            .committer
            .lock()
            .ok()
            .and_then(|mut guard| guard.take());
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| StoreError::Storage(format!("close task failed: {e}")))?
                .map_err(|_| StoreError::Storage("committer thread panicked".into()))?;
        }
        if let Ok(mut guard) = self.shared.tree.write() {
            guard.take();
        }
        match flushed {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Ask the committer to flush and stop; it owns its own handles, so nothing blocks here.
        let (reply, _) = oneshot::channel();
        let _ = self.writes.send(WriteOp::Shutdown { reply });
    }
}
