//! Process managers (sagas): long business processes that react to events, send commands to
//! other aggregates, wait with durable deadlines, and compensate when a step fails.
//!
//! A process manager is pure: given its instance state and one input (a correlated event, the
//! outcome of a command it sent, or a deadline) it returns a [`Step`]: commands to send,
//! deadlines to schedule or cancel, and whether the instance is complete. The runtime does the
//! rest, durably:
//!
//! - Inputs of all instances are handled one at a time, each instance's events in log order.
//! - The instance state, the commands to send (an outbox), the deadlines and the log checkpoint
//!   commit in one atomic write. A crash before it replays the input; after it, nothing is lost.
//! - Each command gets a deterministic id (saga, instance, input, index), so re-sending it after a
//!   crash is deduplicated by the target aggregate: exactly one effect.
//! - Each command's outcome (accepted, rejected, failed) comes back as an input.
//! - Deadlines are stored; they fire once, also after a restart or long downtime, and are
//!   discarded when cancelled or when the instance completes.

mod clock;
mod runner;

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use clock::{Clock, ManualClock, SystemClock};
pub(crate) use runner::{spawn_saga, SagaHandle, SagaSetup};

use crate::projection::EventFilter;
use crate::runtime::{CommandError, CommandOptions, Committed, Runtime};
use crate::store::EventEnvelope;

/// How an event relates to a process manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correlation {
    /// The instance the event belongs to.
    pub instance: String,
    /// Whether the event may start the instance if it does not exist yet. Events for a
    /// non-existent instance that do not start it are ignored.
    pub starts: bool,
}

impl Correlation {
    /// An event that starts (or continues) `instance`.
    pub fn start(instance: impl Into<String>) -> Self {
        Self {
            instance: instance.into(),
            starts: true,
        }
    }

    /// An event for an already running `instance`.
    pub fn to(instance: impl Into<String>) -> Self {
        Self {
            instance: instance.into(),
            starts: false,
        }
    }
}

/// What became of a command a process manager sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum CommandOutcome {
    /// The target stored the command's events; the aggregate is now at `version`.
    Accepted {
        /// The target's version after the command.
        version: u64,
    },
    /// The target rejected it (its domain error, displayed).
    Rejected {
        /// The rejection.
        reason: String,
    },
    /// It could not be delivered after the retries (runtime error, displayed).
    Failed {
        /// The error.
        error: String,
    },
}

impl CommandOutcome {
    /// The outcome of a `Runtime::send`, as a saga sees it.
    pub fn from_result<E: std::fmt::Display, V>(
        result: &Result<Committed<V>, CommandError<E>>,
    ) -> Self {
        match result {
            Ok(c) => CommandOutcome::Accepted { version: c.version },
            Err(CommandError::Rejected(e)) => CommandOutcome::Rejected {
                reason: e.to_string(),
            },
            Err(CommandError::Runtime(e)) => CommandOutcome::Failed {
                error: e.to_string(),
            },
        }
    }
}

/// What a process manager decided for one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Step<C> {
    /// Commands to send, in order.
    pub commands: Vec<C>,
    /// Deadlines to set: name and delay from now (setting an existing name moves it).
    pub schedule: Vec<(String, Duration)>,
    /// Deadlines to cancel by name.
    pub cancel: Vec<String>,
    /// The instance is finished: its state and deadlines are deleted.
    pub complete: bool,
}

impl<C> Default for Step<C> {
    fn default() -> Self {
        Self {
            commands: Vec::new(),
            schedule: Vec::new(),
            cancel: Vec::new(),
            complete: false,
        }
    }
}

impl<C> Step<C> {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Sends `command`.
    pub fn send(mut self, command: C) -> Self {
        self.commands.push(command);
        self
    }

    /// Sets deadline `name` to fire after `delay`.
    pub fn schedule(mut self, name: impl Into<String>, delay: Duration) -> Self {
        self.schedule.push((name.into(), delay));
        self
    }

    /// Cancels deadline `name`.
    pub fn cancel(mut self, name: impl Into<String>) -> Self {
        self.cancel.push(name.into());
        self
    }

    /// Ends the instance.
    pub fn complete(mut self) -> Self {
        self.complete = true;
        self
    }
}

/// Why a process manager could not handle an input. The saga stops at that input (its state
/// and checkpoint stay before it) and reports the error in its status.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The handler refused the input.
    #[error("handler failed: {0}")]
    Handler(String),
    /// State, command or event could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
    /// No saga of this name is registered.
    #[error("no saga named {0}")]
    Unknown(String),
    /// The saga is stopped.
    #[error("saga {name} is stopped: {reason}")]
    Stopped {
        /// The saga.
        name: String,
        /// Why.
        reason: String,
    },
    /// Waiting took longer than allowed.
    #[error("saga {name} did not become idle within {after:?}")]
    Timeout {
        /// The saga.
        name: String,
        /// The time waited.
        after: Duration,
    },
}

impl From<crate::store::StoreError> for SagaError {
    fn from(e: crate::store::StoreError) -> Self {
        SagaError::Store(e.to_string())
    }
}

impl From<crate::projection::ProjectionError> for SagaError {
    fn from(e: crate::projection::ProjectionError) -> Self {
        SagaError::Codec(e.to_string())
    }
}

/// A process manager: pure decisions over a persisted instance state.
#[async_trait]
pub trait ProcessManager: Send + Sync + 'static {
    /// Each instance's state; `Default` is the state before its first input.
    type State: Default + Serialize + DeserializeOwned + Send + Sync + Debug;
    /// The commands it sends (kept in the outbox until delivered, so serializable).
    type Command: Serialize + DeserializeOwned + Send + Sync + Debug + Clone + 'static;

    /// Its stable name: the key of its checkpoint and tables.
    fn name(&self) -> &'static str;

    /// Which events to look at.
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    /// The instance an event belongs to, if any.
    fn correlate(&self, event: &EventEnvelope) -> Option<Correlation>;

    /// Reacts to a correlated event.
    fn on_event(
        &self,
        state: &mut Self::State,
        event: &EventEnvelope,
    ) -> Result<Step<Self::Command>, SagaError>;

    /// Reacts to the outcome of a command it sent.
    fn on_outcome(
        &self,
        state: &mut Self::State,
        command: &Self::Command,
        outcome: &CommandOutcome,
    ) -> Result<Step<Self::Command>, SagaError>;

    /// Reacts to a deadline it set.
    fn on_deadline(
        &self,
        state: &mut Self::State,
        deadline: &str,
    ) -> Result<Step<Self::Command>, SagaError> {
        let _ = (state, deadline);
        Ok(Step::none())
    }

    /// Delivers one command through the runtime (typically a `match` calling
    /// [`Runtime::send_with`] with the target aggregate type). `options` carries the command's
    /// deterministic id and the saga's correlation id: pass it on unchanged.
    async fn dispatch(
        &self,
        runtime: &Runtime,
        command: Self::Command,
        options: CommandOptions,
    ) -> CommandOutcome;
}

/// Where a saga stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaStatus {
    /// The saga's name.
    pub name: String,
    /// The global position handled so far.
    pub checkpoint: u64,
    /// Commands sent but not yet answered.
    pub outstanding: usize,
    /// Inputs handled since start.
    pub handled: u64,
    /// Deadlines fired since start.
    pub deadlines_fired: u64,
    /// `Some(reason)` once stopped by a handler error.
    pub stopped: Option<String>,
}
