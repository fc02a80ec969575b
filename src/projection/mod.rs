//! Projectors: read models and other consumers fed from the global log.
//!
//! A projector reads the log from its checkpoint in batches, hands each matching event to its
//! handler, and commits the handler's read-model writes together with the new checkpoint. When
//! caught up it waits for the store's head to move (woken by commits, never polling). The log is
//! the only source of truth: nothing depends on an in-memory broadcast, so nothing is lost when a
//! projector is slow, stopped or crashed.

mod read_model;
mod runner;

use std::time::Duration;

use async_trait::async_trait;

pub use read_model::{ReadModelTx, Table, TableKey};
pub(crate) use runner::{dead_letters, spawn_projector, ProjectorHandle, CHECKPOINTS};

use crate::domain::DomainEvent;
use crate::store::{EventEnvelope, StoreError};

/// Why a projector could not handle an event, or a projection call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The handler failed on this event; the failure strategy decides what happens next.
    #[error("handler failed: {0}")]
    Handler(String),
    /// A value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The store failed; the batch is retried from the last checkpoint.
    #[error("store: {0}")]
    Store(String),
    /// No projector of this name is registered.
    #[error("no projector named {0}")]
    UnknownProjector(String),
    /// The projector stopped (failure strategy `Stop`, or runtime shutdown).
    #[error("projector {name} is stopped: {reason}")]
    Stopped {
        /// The projector.
        name: String,
        /// Why.
        reason: String,
    },
    /// Waiting for a position took longer than allowed.
    #[error("projector {name} did not reach position {position} within {after:?}")]
    Timeout {
        /// The projector.
        name: String,
        /// The awaited position.
        position: u64,
        /// The time waited.
        after: Duration,
    },
}

impl From<StoreError> for ProjectionError {
    fn from(e: StoreError) -> Self {
        ProjectionError::Store(e.to_string())
    }
}

impl ProjectionError {
    /// A handler failure with `message`.
    pub fn handler(message: impl std::fmt::Display) -> Self {
        ProjectionError::Handler(message.to_string())
    }
}

impl EventEnvelope {
    /// Decodes the payload as `E` (upcasting through [`DomainEvent::decode`]).
    pub fn decode_event<E: DomainEvent>(&self) -> Result<E, ProjectionError> {
        E::decode(&self.event_type, self.schema_version, &self.payload).map_err(|e| {
            ProjectionError::Codec(format!(
                "event {} of {}#{} ({} v{}): {e}",
                self.position, self.stream, self.sequence, self.event_type, self.schema_version
            ))
        })
    }
}

/// Which events a projector receives; the others only advance its checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only events of these aggregate types (all when empty).
    pub aggregate_types: Vec<String>,
    /// Only events with these tags (all when empty).
    pub event_types: Vec<String>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Events of aggregate type `tag`.
    pub fn aggregate(mut self, tag: &str) -> Self {
        self.aggregate_types.push(tag.to_owned());
        self
    }

    /// Events tagged `tag`.
    pub fn event(mut self, tag: &str) -> Self {
        self.event_types.push(tag.to_owned());
        self
    }

    pub(crate) fn matches(&self, e: &EventEnvelope) -> bool {
        (self.aggregate_types.is_empty()
            || self
                .aggregate_types
                .iter()
                .any(|t| **t == *e.stream.aggregate_type))
            && (self.event_types.is_empty() || self.event_types.contains(&e.event_type))
    }
}

/// A consumer of the global log that maintains a read model (or any other effect).
///
/// Handlers should be deterministic functions of the event and the read model: a rebuild
/// replays every event through them again.
#[async_trait]
pub trait Projector: Send + 'static {
    /// The projector's stable name: the key of its checkpoint.
    fn name(&self) -> &'static str;

    /// Which events to receive.
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    /// The read-model tables this projector owns: a rebuild clears them.
    fn tables(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Handles one event, writing the read model through `tx`. An error triggers the
    /// projector's failure strategy; the event's writes are discarded.
    async fn handle(
        &mut self,
        event: &EventEnvelope,
        tx: &mut ReadModelTx,
    ) -> Result<(), ProjectionError>;
}

/// When the checkpoint is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The read-model writes of every batch and the checkpoint commit in one atomic write:
    /// after a crash no event is applied twice or skipped. For read models in this store.
    ExactlyOnce,
    /// The checkpoint is committed after handling, every `every_events` events or `every_ms`
    /// milliseconds, whichever comes first: after a crash the events since then are handled
    /// again. For handlers with external effects that are idempotent.
    AtLeastOnce {
        /// Events between checkpoints.
        every_events: u64,
        /// Milliseconds between checkpoints.
        every_ms: u64,
    },
}

/// What a projector does when its handler fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Stop the projector at the failing event (its checkpoint stays before it).
    Stop,
    /// Park the event in the dead-letter table with the error and go on.
    Skip,
    /// Retry `attempts` more times with exponential back-off from `backoff_ms`, then stop or
    /// skip.
    Retry {
        /// Retries after the first failure.
        attempts: u32,
        /// First back-off in milliseconds (doubles each retry).
        backoff_ms: u64,
        /// Skip (park) the event after the last retry instead of stopping.
        then_skip: bool,
    },
}

/// How a projector runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectorOptions {
    /// Checkpoint policy.
    pub delivery: Delivery,
    /// Failure strategy.
    pub on_error: OnError,
    /// Events per read of the log, and per batch (one commit of the read-model writes with the
    /// checkpoint) near the head.
    pub batch_size: usize,
    /// The largest batch while the projector is at least this many events behind the head
    /// (catching up after a start, a stop or a rebuild): a batch takes further reads of
    /// `batch_size` events, up to this many, as long as its read-model writes stay fewer than
    /// `batch_size`, so a projector that writes little commits less often while one that writes
    /// a lot keeps commits of the usual size. At most `batch_size` turns it off.
    pub catch_up_batch_size: usize,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        Self {
            delivery: Delivery::ExactlyOnce,
            on_error: OnError::Stop,
            batch_size: 512,
            catch_up_batch_size: 4096,
        }
    }
}

/// Where a projector stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionStatus {
    /// The projector's name.
    pub name: String,
    /// The last committed checkpoint (global position).
    pub checkpoint: u64,
    /// The last position whose read-model writes are committed (`>= checkpoint`).
    pub processed: u64,
    /// The store's head when the status was read (it keeps moving while the projector is
    /// stopped or busy).
    pub head: u64,
    /// `head - processed`.
    pub lag: u64,
    /// Events handled since start.
    pub handled: u64,
    /// Events parked in the dead-letter table since start.
    pub skipped: u64,
    /// Running, rebuilding or stopped.
    pub state: ProjectorState,
}

/// The lifecycle state of a projector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectorState {
    /// Following the log.
    Running,
    /// Replaying from the start after a reset, until the head there was at the reset.
    Rebuilding,
    /// Stopped by its failure strategy (with the error) or by shutdown.
    Stopped(String),
}

/// An event its projector could not handle, parked with its error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The event's global position.
    pub position: u64,
    /// The event's stream, as `type/id`.
    pub stream: String,
    /// The event's tag.
    pub event_type: String,
    /// The last error.
    pub error: String,
    /// How many times it was tried.
    pub attempts: u32,
}
