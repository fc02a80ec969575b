use std::time::Duration;

use crate::domain::StreamId;
use crate::store::StoreError;

/// Why the runtime could not carry out a request (as opposed to a domain rejection).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// No aggregate type with this tag or Rust type was registered with the runtime builder.
    #[error("aggregate type {0} is not registered")]
    UnknownAggregateType(&'static str),
    /// The aggregate's mailbox is full: back off and retry.
    #[error("{stream} is overloaded: {capacity} requests already queued")]
    Overloaded {
        /// The aggregate.
        stream: StreamId,
        /// Its mailbox capacity.
        capacity: usize,
    },
    /// Another writer changed the stream, and deciding again against the reloaded state
    /// conflicted too. Nothing was stored; retry.
    #[error("{stream} was changed concurrently (expected version {expected}, found {actual})")]
    Conflict {
        /// The aggregate.
        stream: StreamId,
        /// The version decided against.
        expected: u64,
        /// The version found.
        actual: u64,
    },
    /// The aggregate could not be loaded (read error, undecodable event or snapshot, a panic in
    /// `apply`). The next request retries activation.
    #[error("cannot activate {stream}: {reason}")]
    Activation {
        /// The aggregate.
        stream: StreamId,
        /// What failed.
        reason: String,
    },
    /// The aggregate's `handle` panicked on this command. Nothing was stored; the actor keeps
    /// serving from its last persisted state.
    #[error("the command handler of {stream} panicked: {message}")]
    HandlerPanicked {
        /// The aggregate.
        stream: StreamId,
        /// The panic message.
        message: String,
    },
    /// An event or state could not be encoded; nothing was stored.
    #[error("cannot encode for {stream}: {reason}")]
    Encode {
        /// The aggregate.
        stream: StreamId,
        /// The codec's message.
        reason: String,
    },
    /// The store failed. For a command, whether it was stored is unknown only if the store says
    /// so; the actor reloads from the store before serving again.
    #[error("store error: {0}")]
    Store(String),
    /// No reply within the timeout. The command may still complete: retry with the same command
    /// id to get its outcome exactly once.
    #[error("no reply from {stream} within {after:?}")]
    Timeout {
        /// The aggregate.
        stream: StreamId,
        /// The timeout.
        after: Duration,
    },
    /// The runtime is shutting down or stopped.
    #[error("the runtime is stopped")]
    Stopped,
}

impl From<StoreError> for RuntimeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => RuntimeError::Stopped,
            e => RuntimeError::Store(e.to_string()),
        }
    }
}

/// Why a command did not commit: the aggregate rejected it, or the runtime failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError<E> {
    /// The aggregate's typed domain rejection. Nothing was stored.
    #[error("rejected: {0}")]
    Rejected(E),
    /// A runtime failure.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl<E> CommandError<E> {
    /// The domain rejection, if that is what this is.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            CommandError::Runtime(_) => None,
        }
    }
}
