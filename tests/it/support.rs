//! Helpers shared by the integration tests: store harnesses over temporary directories, event
//! builders and whole-stream readers.
// Shared helpers: not every test module uses every one.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use incarnate::{
    AppendRequest, AppendResult, Causation, Config, Durability, DurabilityMode, EventEnvelope,
    EventStore, MemoryStore, NewEvent, Runtime, SledStore, SledStoreConfig, StoreError, StreamId,
    StreamSlice,
};
use tempfile::TempDir;

/// Opens a store again on the same data: a durable backend's "restart".
type Reopen = Box<dyn Fn() -> Arc<dyn EventStore> + Send + Sync>;

/// One store under test, plus what it takes to reopen it and the directory it lives in (removed
/// when the harness is dropped).
pub(crate) struct Harness {
    store: Arc<dyn EventStore>,
    reopen: Option<Reopen>,
    path: Option<PathBuf>,
    _dir: Option<TempDir>,
}

impl Harness {
    /// The store under test.
    pub(crate) fn store(&self) -> &dyn EventStore {
        &*self.store
    }

    /// A shared handle to the store, for spawned tasks.
    pub(crate) fn shared(&self) -> Arc<dyn EventStore> {
        Arc::clone(&self.store)
    }

    /// Whether the backend keeps its data across a close and reopen.
    pub(crate) fn is_durable(&self) -> bool {
        self.reopen.is_some()
    }

    /// The database directory of an on-disk backend.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Closes the store and opens it again on the same data.
    pub(crate) async fn reopen(&mut self) {
        self.reopen_after(|_| {}).await;
    }

    /// Closes the store, runs `tamper` on its directory while nothing holds it open, then opens
    /// it again.
    pub(crate) async fn reopen_after(&mut self, tamper: impl FnOnce(&Path)) {
        self.store.close().await.expect("close before reopen");
        if let Some(path) = &self.path {
            tamper(path);
        }
        let reopen = self
            .reopen
            .as_ref()
            .expect("this backend cannot be reopened");
        self.store = reopen();
    }

    /// Closes the store (a store some test already closed is fine).
    pub(crate) async fn close(self) {
        match self.store.close().await {
            Ok(()) | Err(StoreError::Closed) => {}
            Err(e) => panic!("close failed: {e}"),
        }
    }
}

/// A fresh in-memory store.
pub(crate) fn memory_harness() -> Harness {
    Harness {
        store: Arc::new(MemoryStore::new()),
        reopen: None,
        path: None,
        _dir: None,
    }
}

/// A fresh sled store in a temporary directory, in `sync` durability.
pub(crate) fn sled_harness() -> Harness {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("db");
    let config = SledStoreConfig::new(&path).durability(Durability::Sync);
    let store: Arc<dyn EventStore> =
        Arc::new(SledStore::open(config.clone()).expect("open sled store"));
    Harness {
        store,
        reopen: Some(Box::new(move || {
            Arc::new(SledStore::open(config.clone()).expect("reopen sled store"))
        })),
        path: Some(path),
        _dir: Some(dir),
    }
}

/// Opens a sled store at `path` in `sync` durability.
pub(crate) fn open_sled(path: &Path) -> SledStore {
    SledStore::open(SledStoreConfig::new(path).durability(Durability::Sync))
        .expect("open sled store")
}

/// A stream of the `account` aggregate type.
pub(crate) fn account(id: &str) -> StreamId {
    StreamId::new("account", id)
}

/// An event with `payload` and no causation.
pub(crate) fn event(payload: impl Into<Vec<u8>>) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Tested".into(),
        schema_version: 1,
        causation: Causation::default(),
        payload: payload.into(),
    }
}

/// The payload the tests give to event `sequence` of `stream`, so any event read back can be
/// checked against where it was read.
pub(crate) fn payload_of(stream: &StreamId, sequence: u64) -> Vec<u8> {
    format!("{stream}#{sequence}").into_bytes()
}

/// Events `first..first + count` of `stream`, with [`payload_of`] payloads.
pub(crate) fn events_for(stream: &StreamId, first: u64, count: u64) -> Vec<NewEvent> {
    (first..first + count)
        .map(|sequence| event(payload_of(stream, sequence)))
        .collect()
}

/// Appends `count` events with [`payload_of`] payloads to `stream`, expecting it at `expected`.
pub(crate) async fn append_n(
    store: &dyn EventStore,
    stream: &StreamId,
    expected: u64,
    count: u64,
) -> AppendResult {
    let events = events_for(stream, expected + 1, count);
    store
        .append(AppendRequest::new(stream.clone(), expected, events))
        .await
        .unwrap_or_else(|e| panic!("append of {count} to {stream} at {expected}: {e}"))
}

/// Every readable event of `stream` and its highest sequence number.
pub(crate) async fn read_all(store: &dyn EventStore, stream: &StreamId) -> StreamSlice {
    store
        .read_stream(stream, 1, u64::MAX, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("read {stream}: {e}"))
}

/// Every readable event of the global log.
pub(crate) async fn read_whole_log(store: &dyn EventStore) -> Vec<EventEnvelope> {
    store.read_log(1, usize::MAX).await.expect("read the log")
}

/// The sequence numbers of `events`.
pub(crate) fn sequences(events: &[EventEnvelope]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

/// The global positions of `events`.
pub(crate) fn positions(events: &[EventEnvelope]) -> Vec<u64> {
    events.iter().map(|e| e.position).collect()
}

/// Microseconds since the Unix epoch, as the store stamps commits.
pub(crate) fn now_micros() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_micros()).expect("fits in u64")
}

/// How long a test waits for a signal or an asynchronous effect before failing.
pub(crate) const SIGNAL_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test with `what` if it takes longer than [`SIGNAL_TIMEOUT`].
pub(crate) async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(SIGNAL_TIMEOUT, future).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {SIGNAL_TIMEOUT:?} waiting for {what}"),
    }
}

/// A temporary sled directory that outlives the runtimes built on it, so a test can shut one
/// down (which closes the store) and build the next one on the same data: a real restart.
pub(crate) struct TempDb {
    path: PathBuf,
    _dir: TempDir,
}

impl TempDb {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        Self {
            path: dir.path().join("db"),
            _dir: dir,
        }
    }

    /// The sled database directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// The configuration the runtime and saga tests start from: the sled store at `path` in `sync`
/// durability, two actor threads, a command timeout short enough that a lost reply fails the
/// test instead of hanging it, and no idle passivation unless a test asks for it.
pub(crate) fn test_config(path: &Path) -> Config {
    let mut c = Config::default();
    c.store.path = path.to_path_buf();
    c.store.durability = DurabilityMode::Sync;
    c.store.cache_capacity_mb = 16;
    c.runtime.arbiters = 2;
    c.runtime.command_timeout_ms = 15_000;
    c.aggregates.default.idle_timeout_ms = 0;
    c
}

/// Shuts a runtime down and fails the test if that fails.
pub(crate) async fn shutdown(rt: Runtime) {
    rt.shutdown().await.expect("shutdown");
}

/// The sled store's single tree (see `src/store/keys.rs` for the layout).
pub(crate) const TREE: &str = "incarnate";

/// The key of the log value at `position` (a lone record, or the chunk starting there).
pub(crate) fn log_key(position: u64) -> Vec<u8> {
    let mut key = vec![b'L'];
    key.extend_from_slice(&position.to_be_bytes());
    key
}

/// Opens the database directly. sled's I/O threads can hold its lock a moment after the
/// store closed (`SledStore::open` waits the same way), so a refused lock is retried.
pub(crate) fn open_raw(path: &Path) -> ::sled::Db {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ::sled::open(path) {
            Ok(db) => return db,
            Err(::sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::yield_now();
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        }
    }
}

/// Overwrites the value at `key` (which must exist) with `garbage`.
pub(crate) fn overwrite(path: &Path, key: &[u8], garbage: &[u8]) {
    let db = open_raw(path);
    let tree = db.open_tree(TREE).unwrap();
    let old = tree.insert(key, garbage).unwrap();
    assert!(old.is_some(), "no record at {key:?}");
    db.flush().unwrap();
}
