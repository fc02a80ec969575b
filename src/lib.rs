//! # incarnate
//!
//! A runtime in which every event-sourced aggregate is a live actor.
//!
//! ```
//! use incarnate::{AppendRequest, EventStore, MemoryStore, NewEvent, StreamId};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = MemoryStore::new();
//! let stream = StreamId::new("account", "alice");
//! let event = NewEvent {
//!     event_id: uuid::Uuid::now_v7(),
//!     event_type: "Opened".into(),
//!     schema_version: 1,
//!     causation: Default::default(),
//!     payload: vec![1, 2, 3],
//! };
//! let done = store.append(AppendRequest::new(stream.clone(), 0, vec![event])).await?;
//! assert_eq!(done.last_sequence, 1);
//! let slice = store.read_stream(&stream, 1, u64::MAX, 10).await?;
//! assert_eq!(slice.events[0].payload, vec![1, 2, 3]);
//! # Ok::<(), incarnate::StoreError>(())
//! # }).unwrap();
//! ```

mod domain;
mod projection;
mod runtime;
mod saga;
mod store;
pub mod testing;

pub use domain::{Aggregate, AggregateId, DomainEvent, StreamId};
pub use projection::{
    DeadLetter, Delivery, EventFilter, OnError, ProjectionError, ProjectionStatus, Projector,
    ProjectorOptions, ProjectorState, ReadModelTx, Table, TableKey,
};
pub use runtime::{
    AggregateOverrides, AggregateSettings, AggregateStats, AggregateTables, Backend, BuildError,
    CommandError, CommandOptions, Committed, CommittedEvent, Config, ConfigError, DurabilityMode,
    Runtime, RuntimeBuilder, RuntimeError, RuntimeSettings, StoreSettings,
};
pub use saga::{
    Clock, CommandOutcome, Correlation, ManualClock, ProcessManager, SagaError, SagaStatus, Step,
    SystemClock,
};
pub use store::{
    AppendRequest, AppendResult, Causation, CommandRecord, Durability, EventEnvelope, EventStore,
    KvWrite, MemoryStore, Metadata, NewEvent, RecordedOutcome, SledStore, SledStoreConfig,
    SnapshotCriteria, SnapshotRecord, StoreError, StreamSlice, MAX_RECORD_BYTES,
};
