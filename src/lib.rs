//! # incarnate
//!
//! A runtime in which every event-sourced aggregate is a live actor.
//!
//! - [`Aggregate`]: a plain type that decides ([`Aggregate::handle`]) and evolves
//!   ([`Aggregate::apply`]), with typed commands, events ([`DomainEvent`], stable tags and
//!   schema versions) and domain errors. Pure: test it with [`testing::AggregateTest`].
//! - [`Runtime`]: hosts aggregates as actix actors, activated on their first message from the
//!   latest snapshot and later events, passivated when idle. [`Runtime::send`] runs a command
//!   through the aggregate's mailbox and returns once its events are stored. A hot aggregate
//!   decides queued commands together and keeps several appends in flight, each decided
//!   against the ones before it.
//! - [`EventStore`]: atomic appends with optimistic concurrency, a gap-free global log,
//!   snapshots, idempotency records and key-value tables. [`SledStore`] is the embedded durable
//!   default; [`MemoryStore`] keeps everything in memory.
//! - [`Projector`]: read models fed from the global log with exactly-once checkpoints.
//! - [`ProcessManager`]: sagas with persisted state, deterministic command ids, durable
//!   deadlines and compensation.
//!
//! What it is not: a cluster. One process owns its store; the [`EventStore`] trait is shaped so
//! that a distributed log can back the same API later.
//!
//! ```
//! use incarnate::{Backend, CommandError, Runtime};
//! use incarnate_actors::{Account, AccountCommand, AccountError};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let rt = Runtime::builder()
//!     .configure(|c| c.store.backend = Backend::Memory) // sled (durable) by default
//!     .register::<Account>()
//!     .build()?;
//!
//! rt.send::<Account>("alice", AccountCommand::Open { owner: "Alice".into() }).await?;
//! let done = rt.send::<Account>("alice", AccountCommand::Deposit { amount: 500 }).await?;
//! assert_eq!(done.version, 2);
//!
//! let refused = rt.send::<Account>("alice", AccountCommand::Withdraw { amount: 900 }).await;
//! assert!(matches!(
//!     refused,
//!     Err(CommandError::Rejected(AccountError::InsufficientFunds { balance: 500, requested: 900 }))
//! ));
//!
//! // Every committed event is in the global log, in commit order.
//! let log = rt.store().read_log(1, 10).await?;
//! assert_eq!(log.len(), 2);
//! rt.shutdown().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod domain;
mod projection;
mod runtime;
mod saga;
mod store;
pub mod testing;

/// The README's examples, compiled and run as doc tests so they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

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
    KvWrite, LogPage, MemoryStore, Metadata, NewEvent, RecordedOutcome, SledStore, SledStoreConfig,
    SnapshotCriteria, SnapshotRecord, StoreError, StreamSlice, MAX_RECORD_BYTES,
};
