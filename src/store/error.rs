use crate::domain::StreamId;

/// Why a store operation failed. Each variant says what the caller can do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream was not at the expected version (or its last event was not the expected one,
    /// see [`AppendRequest::expected_last_event`](crate::AppendRequest::expected_last_event)):
    /// another writer appended first. Nothing was stored. Reload the stream (its version is
    /// `actual`) and decide again.
    #[error("version conflict on {stream}: expected {expected}, actual {actual}")]
    Conflict {
        /// The stream written to.
        stream: StreamId,
        /// The version the writer expected.
        expected: u64,
        /// The stream's actual highest sequence number.
        actual: u64,
    },
    /// A value could not be encoded; nothing was stored.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The codec's error.
        #[source]
        source: rmp_serde::encode::Error,
    },
    /// Stored bytes could not be decoded: corruption, or a format this build does not read.
    /// Nothing was changed; the record stays where it is for inspection.
    #[error("cannot decode {what} of {stream} at {sequence}: {reason}")]
    Decode {
        /// What was being decoded (event envelope, snapshot, command record...).
        what: &'static str,
        /// The stream the record belongs to (empty type for records outside a stream).
        stream: StreamId,
        /// Its sequence number (or global position for log records).
        sequence: u64,
        /// The decoder's message.
        reason: String,
    },
    /// The request is malformed (e.g. an aggregate type tag longer than 255 bytes). Fix the input.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The storage engine failed (I/O error, full disk). The write did not happen or its outcome
    /// is unknown; actors restart from the store.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The store has been closed; open it again.
    #[error("the store is closed")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}
