//! What a caller sends with a command and what it gets back.

use std::time::Duration;

use uuid::Uuid;

use crate::store::Metadata;

/// Per-call options of a command.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct CommandOptions {
    /// The command's id: a retry with the same id is answered with the original outcome instead
    /// of being applied again. Without one, the command is not deduplicated.
    pub command_id: Option<Uuid>,
    /// The conversation this command belongs to; copied into its events. Defaults to the
    /// command id.
    pub correlation_id: Option<Uuid>,
    /// The message that caused this command; copied into its events. Defaults to the command id.
    pub causation_id: Option<Uuid>,
    /// User metadata copied into every event.
    pub metadata: Metadata,
    /// How long to wait for the reply; defaults to `runtime.command_timeout_ms`.
    pub timeout: Option<Duration>,
}

impl CommandOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the command id (makes the command idempotent).
    pub fn command_id(mut self, id: Uuid) -> Self {
        self.command_id = Some(id);
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the reply timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// One committed event as the command's caller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedEvent<E> {
    /// Its sequence number in the aggregate's stream.
    pub sequence: u64,
    /// Its global position.
    pub position: u64,
    /// The event.
    pub event: E,
}

/// A command's successful outcome: its events are stored under the configured durability.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed<E> {
    /// The events the command emitted, in order (empty if it emitted none, and for a
    /// deduplicated retry, whose events were stored by the original call).
    pub events: Vec<CommittedEvent<E>>,
    /// The aggregate's version after the command.
    pub version: u64,
    /// The sequence range the command emitted (`first > last` when it emitted nothing).
    pub first_sequence: u64,
    /// See `first_sequence`.
    pub last_sequence: u64,
    /// True when this was a retry of an already processed command id, answered from the
    /// idempotency record without applying anything.
    pub deduplicated: bool,
}

impl<E> Committed<E> {
    /// The outcome of work that emitted nothing, at `version`.
    pub(crate) fn nothing(version: u64) -> Self {
        Self {
            events: Vec::new(),
            version,
            first_sequence: version + 1,
            last_sequence: version,
            deduplicated: false,
        }
    }
}
