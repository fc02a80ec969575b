use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;
use crate::domain::StreamId;

/// User metadata carried by an event: free-form string pairs (tenant, user, request id...).
pub type Metadata = BTreeMap<String, String>;

/// The ids that tie an event to the command and the conversation that caused it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Causation {
    /// Shared by every message of one business conversation (a request, a saga).
    pub correlation_id: Option<Uuid>,
    /// The id of the message (command or event) that directly caused this one.
    pub causation_id: Option<Uuid>,
    /// The command that emitted the event; the key of idempotent retries.
    pub command_id: Option<Uuid>,
    /// User metadata.
    pub metadata: Metadata,
}

/// An event about to be appended: its payload is already encoded; the store assigns the
/// sequence number, the global position and the timestamp when it commits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// A unique id (UUID v7: time-ordered).
    pub event_id: Uuid,
    /// The event's stable tag.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u16,
    /// Correlation, causation, command id and metadata.
    pub causation: Causation,
    /// The encoded event.
    pub payload: Vec<u8>,
}

/// One stored event with everything known about it. Encoded with rmp-serde behind a one-byte
/// format tag so the envelope layout itself can evolve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// The event's unique id.
    pub event_id: Uuid,
    /// The stream (aggregate type and id) it belongs to.
    pub stream: StreamId,
    /// Its sequence number in the stream (dense, from 1).
    pub sequence: u64,
    /// Its position in the global log (gap-free, from 1, in commit order).
    pub position: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub timestamp_micros: u64,
    /// The event's stable tag.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u16,
    /// Correlation, causation, command id and metadata.
    pub causation: Causation,
    /// The encoded event.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The format tag written before every encoded envelope.
const ENVELOPE_FORMAT: u8 = 1;

impl EventEnvelope {
    pub(crate) fn from_new(
        event: NewEvent,
        stream: StreamId,
        sequence: u64,
        position: u64,
        timestamp_micros: u64,
    ) -> Self {
        Self {
            event_id: event.event_id,
            stream,
            sequence,
            position,
            timestamp_micros,
            event_type: event.event_type,
            schema_version: event.schema_version,
            causation: event.causation,
            payload: event.payload,
        }
    }

    /// Encodes the envelope for storage.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut buf)?;
        Ok(buf)
    }

    /// Appends the encoded envelope to `buf` (after a record header, without a second copy).
    pub(crate) fn encode_into(&self, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        encode_tagged_into(self, "event envelope", buf)
    }

    /// About how many bytes the encoding takes (enough for the usual metadata).
    pub(crate) fn encoded_len_hint(&self) -> usize {
        96 + self.event_type.len() + self.payload.len()
    }

    /// Decodes a stored envelope; `stream` and `sequence` name the record in the error.
    pub(crate) fn decode(
        bytes: &[u8],
        stream: &StreamId,
        sequence: u64,
    ) -> Result<Self, StoreError> {
        decode_tagged(bytes, "event envelope", stream, sequence)
    }
}

/// A stored snapshot of an aggregate's state at a sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The stream it belongs to.
    pub stream: StreamId,
    /// The sequence number of the last event it includes.
    pub sequence: u64,
    /// When it was taken, microseconds since the Unix epoch.
    pub timestamp_micros: u64,
    /// The state format's version ([`Aggregate::SNAPSHOT_VERSION`](crate::Aggregate::SNAPSHOT_VERSION)).
    pub schema_version: u16,
    /// The encoded state.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl SnapshotRecord {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        encode_tagged(self, "snapshot", 64 + self.payload.len())
    }

    pub(crate) fn decode(
        bytes: &[u8],
        stream: &StreamId,
        sequence: u64,
    ) -> Result<Self, StoreError> {
        decode_tagged(bytes, "snapshot", stream, sequence)
    }
}

/// Encodes `value` behind the one-byte format tag.
fn encode_tagged<T: Serialize>(
    value: &T,
    what: &'static str,
    capacity: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut buf = Vec::with_capacity(capacity);
    encode_tagged_into(value, what, &mut buf)?;
    Ok(buf)
}

/// [`encode_tagged`] at the end of `buf`.
fn encode_tagged_into<T: Serialize>(
    value: &T,
    what: &'static str,
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    buf.push(ENVELOPE_FORMAT);
    rmp_serde::encode::write(buf, value).map_err(|source| StoreError::Encode { what, source })
}

/// Decodes a record written by [`encode_tagged`]; `stream` and `sequence` name it in the error.
fn decode_tagged<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    stream: &StreamId,
    sequence: u64,
) -> Result<T, StoreError> {
    let err = |reason: String| StoreError::Decode {
        what,
        stream: stream.clone(),
        sequence,
        reason,
    };
    match bytes.split_first() {
        Some((&ENVELOPE_FORMAT, rest)) => {
            rmp_serde::from_slice(rest).map_err(|e| err(e.to_string()))
        }
        Some((tag, _)) => Err(err(format!("unknown {what} format {tag}"))),
        None => Err(err("empty record".to_owned())),
    }
}

/// What a processed command led to, kept so a retry with the same command id gets the original
/// outcome instead of a second effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordedOutcome {
    /// The command emitted the events `first_sequence..=last_sequence` (an empty range, with
    /// `first_sequence = last_sequence + 1`, when it emitted none).
    Accepted {
        /// First sequence number it emitted.
        first_sequence: u64,
        /// Last sequence number it emitted.
        last_sequence: u64,
    },
    /// The command was rejected; the encoded domain error.
    Rejected {
        /// The aggregate's encoded `Error`.
        #[serde(with = "serde_bytes")]
        error: Vec<u8>,
    },
}

/// The idempotency record of one command on one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// The command's id.
    pub command_id: Uuid,
    /// The stream's version after the command (orders the records).
    pub version: u64,
    /// Its outcome.
    pub outcome: RecordedOutcome,
}

impl CommandRecord {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        rmp_serde::to_vec(&self.outcome).map_err(|source| StoreError::Encode {
            what: "command record",
            source,
        })
    }
}
