//! The event store: the only layer that touches storage.
//!
//! [`EventStore`] is shaped for an embedded engine today and a remote log later: every call is
//! async, conflicts are ordinary results, and global positions come from the store. Two
//! implementations ship: [`SledStore`] (embedded, durable; the default) and [`MemoryStore`]
//! (tests and examples that want no disk).

mod envelope;
mod error;
mod keys;
mod log_page;
mod memory;
mod sled;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

pub use self::sled::{Durability, SledStore, SledStoreConfig, MAX_RECORD_BYTES};
pub use envelope::{
    Causation, CommandRecord, EventEnvelope, Metadata, NewEvent, RecordedOutcome, SnapshotRecord,
};
pub use error::StoreError;
pub use log_page::LogPage;
pub use memory::MemoryStore;

use crate::domain::StreamId;

/// One atomic append to one stream.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    /// The stream appended to.
    pub stream: StreamId,
    /// The stream's highest sequence number the writer decided against (0 for a new stream).
    pub expected_version: u64,
    /// The events, stored all-or-nothing with sequence numbers `expected_version + 1 ..`.
    pub events: Vec<NewEvent>,
    /// Idempotency records of the commands that produced these events (or were rejected),
    /// committed in the same write.
    pub record_commands: Vec<CommandRecord>,
    /// Idempotency records to drop in the same write, by `(version, command id)`; this is how a
    /// writer keeps its dedup window bounded.
    pub forget_commands: Vec<(u64, Uuid)>,
    /// When set, the append is stored only if the stream's last event (the one at
    /// `expected_version`) has this id; otherwise it is a [`StoreError::Conflict`].
    ///
    /// A writer that sends an append behind another of its own still in flight names the last
    /// event of that one here. If that append is not stored and another writer fills the same
    /// sequence numbers meanwhile, the version alone would match, and events decided against a
    /// state that never existed would be stored on top of the other writer's. (If that event
    /// has been deleted since, a store may no longer know its id and report a conflict.)
    pub expected_last_event: Option<Uuid>,
}

impl AppendRequest {
    /// An append of `events` to `stream` expecting it at `expected_version`.
    pub fn new(stream: StreamId, expected_version: u64, events: Vec<NewEvent>) -> Self {
        Self {
            stream,
            expected_version,
            events,
            record_commands: Vec::new(),
            forget_commands: Vec::new(),
            expected_last_event: None,
        }
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The sequence number of the first appended event (`last_sequence + 1` if none).
    pub first_sequence: u64,
    /// The stream's version after the append.
    pub last_sequence: u64,
    /// The global position of the first appended event (`last_position + 1` if none).
    pub first_position: u64,
    /// The global position of the last appended event (the previous head if none).
    pub last_position: u64,
}

/// A window of one stream plus the stream's highest sequence number.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSlice {
    /// The events of the window, in sequence order.
    pub events: Vec<EventEnvelope>,
    /// The stream's highest sequence number ever written (not the highest returned; unchanged by
    /// deletions; 0 for an unknown stream).
    pub highest_sequence: u64,
}

/// Which snapshots a query or deletion matches: sequence and timestamp upper bounds, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotCriteria {
    /// Only snapshots at or below this sequence number.
    pub max_sequence: u64,
    /// Only snapshots taken at or before this time (microseconds since the Unix epoch).
    pub max_timestamp_micros: u64,
}

impl Default for SnapshotCriteria {
    fn default() -> Self {
        Self::latest()
    }
}

impl SnapshotCriteria {
    /// Matches every snapshot.
    pub const fn latest() -> Self {
        Self {
            max_sequence: u64::MAX,
            max_timestamp_micros: u64::MAX,
        }
    }

    /// Matches snapshots at or below `max_sequence`.
    pub const fn up_to(max_sequence: u64) -> Self {
        Self {
            max_sequence,
            max_timestamp_micros: u64::MAX,
        }
    }

    fn matches(&self, record_sequence: u64, record_timestamp: u64) -> bool {
        record_sequence <= self.max_sequence && record_timestamp <= self.max_timestamp_micros
    }
}

/// One write to a key-value table kept beside the events (read models, checkpoints, saga state,
/// deadlines). A batch of them commits atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    /// Sets `key` in `table` to `value`.
    Put {
        /// Table name.
        table: String,
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// Removes `key` from `table`.
    Delete {
        /// Table name.
        table: String,
        /// Key bytes.
        key: Vec<u8>,
    },
    /// Removes every key of `table`.
    Clear {
        /// Table name.
        table: String,
    },
}

/// An event store: per-stream optimistic appends, a gap-free global log, snapshots, idempotency
/// records and small key-value tables, all behind one async interface.
///
/// Architecture invariant: appends are totally ordered by one committer, and the global position
/// of an event is assigned in the same atomic write that stores it, so the log is visible in
/// position order (a reader never sees N+1 before N).
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `request.events` atomically if the stream is at `request.expected_version`;
    /// otherwise stores nothing and returns [`StoreError::Conflict`]. Returns once the write is
    /// stored under the configured durability.
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError>;

    /// Whether appends are applied in the order their futures are first polled, as when each
    /// one is handed to a single ordered writer on its first poll (both shipped stores do).
    ///
    /// The runtime keeps several appends of one aggregate in flight only on such a store: each
    /// expects the version the one before it leaves, so on a store that could reorder them the
    /// later one would conflict. Elsewhere it sends them one at a time. Defaults to `false`.
    fn preserves_append_order(&self) -> bool {
        false
    }

    /// The events of `stream` with `from <= sequence <= to`, at most `max`, in order, and the
    /// stream's highest sequence number.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<StreamSlice, StoreError>;

    /// The stream's highest sequence number (0 if unknown), without reading its events.
    async fn highest_sequence(&self, stream: &StreamId) -> Result<u64, StoreError>;

    /// Up to `max` events of the global log from position `from` (inclusive) in position order.
    /// Positions of deleted events are skipped. Only committed (acknowledged) events are read.
    async fn read_log(&self, from: u64, max: usize) -> Result<Vec<EventEnvelope>, StoreError>;

    /// [`read_log`](Self::read_log) for a reader that handles the events on another thread than
    /// the read: each event of the page is decoded when taken from it. The default decodes
    /// them all in the read; [`SledStore`] leaves it to the taker.
    async fn read_log_page(&self, from: u64, max: usize) -> Result<LogPage, StoreError> {
        Ok(self.read_log(from, max).await?.into())
    }

    /// The global position of the last committed event (0 when empty).
    fn head(&self) -> u64;

    /// A receiver of the head position: it changes after every commit, so a reader can wait for
    /// new events instead of polling.
    fn watch_head(&self) -> watch::Receiver<u64>;

    /// Deletes the events of `stream` up to `to_sequence` (inclusive) from the stream and the
    /// log. The highest sequence number is unchanged, so the next append continues after it.
    async fn delete_to(&self, stream: &StreamId, to_sequence: u64) -> Result<(), StoreError>;

    /// Saves a snapshot, replacing one at the same sequence number.
    async fn save_snapshot(&self, snapshot: SnapshotRecord) -> Result<(), StoreError>;

    /// The newest snapshot of `stream` matching `criteria`.
    async fn latest_snapshot(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<Option<SnapshotRecord>, StoreError>;

    /// Deletes the snapshots of `stream` matching `criteria`; returns how many were deleted.
    async fn delete_snapshots(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<u64, StoreError>;

    /// The idempotency records kept for `stream`, oldest first.
    async fn command_records(&self, stream: &StreamId) -> Result<Vec<CommandRecord>, StoreError>;

    /// The value of `key` in key-value `table`.
    async fn kv_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `max` entries of `table` with keys `>= from`, in key order.
    async fn kv_scan(
        &self,
        table: &str,
        from: &[u8],
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError>;

    /// Commits `writes` atomically, under the configured durability.
    async fn kv_commit(&self, writes: Vec<KvWrite>) -> Result<(), StoreError>;

    /// Makes everything acknowledged so far durable on disk, whatever the durability mode.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Flushes and closes the store; later calls fail with [`StoreError::Closed`].
    async fn close(&self) -> Result<(), StoreError>;
}

/// Microseconds since the Unix epoch, for commit timestamps.
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
