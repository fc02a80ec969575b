//! The byte layout of the embedded store's single keyspace.
//!
//! Everything lives in one sled tree, so that one commit (ordered single inserts, whose order
//! crash recovery relies on, or one atomic `apply_batch`; see `store/sled/repair.rs`) covers
//! events, index entries, stream metadata, idempotency records and key-value writes. A one-byte
//! prefix names each record family; numbers are big-endian so byte order equals numeric order
//! and range scans are the fast path.
//!
//! The log holds **one record per event**, keyed by global position, and a commit stores the
//! records of its appends as chunks, one sled insert each, at the right edge of the tree (see
//! `store/sled/log.rs`). Inserting at random keys is what sled does slowest (a root-to-leaf
//! descent and a copy of the leaf each), so the per-stream
//! structures avoid one per event: each log record carries its stream sequence and the position of
//! the stream's previous event (a back-chain), the stream index keeps every
//! [`INDEX_STRIDE`]-th event only (so a window is found within `INDEX_STRIDE` hops), and stream
//! metadata (highest sequence, last position) is written lazily, a few streams per commit. The
//! [`META_CHECKPOINT`] says up to which position every stream's metadata is on disk; opening the
//! store replays the log after it to rebuild the rest.

use crate::domain::StreamId;

use super::StoreError;

/// `L` + position → a chunk of log records keyed by its first record's position, or one
/// [`LogRecord`] header + encoded envelope: the global log, the one copy of each event.
pub(crate) const LOG: u8 = b'L';
/// `S` + stream + sequence → position: the sparse per-stream index (every
/// [`INDEX_STRIDE`]-th sequence).
pub(crate) const STREAM: u8 = b'S';
/// `M` + stream → [`StreamMeta`], as of the [`META_CHECKPOINT`] or later.
pub(crate) const META: u8 = b'M';
/// `P` + stream + sequence → encoded snapshot.
pub(crate) const SNAPSHOT: u8 = b'P';
/// `C` + stream + version + command id → encoded outcome.
pub(crate) const COMMAND: u8 = b'C';
/// `K` + table + key → value.
pub(crate) const KV: u8 = b'K';
/// `G` → a lower bound of the last assigned global position, written only by batches that
/// remove log records (the head is the larger of it and the last `L` key): a per-commit write
/// would cost a sled insert per commit for what the log's last key already says.
pub(crate) const HEAD: &[u8] = b"G";
/// `H` → the position up to which every stream's `M` record is up to date.
pub(crate) const META_CHECKPOINT: &[u8] = b"H";
/// `V` → the layout version of the database ([`LAYOUT_VERSION`]).
pub(crate) const LAYOUT: &[u8] = b"V";
/// The layout this build writes.
pub(crate) const LAYOUT_VERSION: u32 = 4;
/// The older layouts this build reads and upgrades in place. They stored one log record per
/// value, which layout 4 reads as a chunk of one (see `store/sled/log.rs`); layout 2's records
/// are all of the format that closes an append without command records.
pub(crate) const UPGRADABLE_LAYOUTS: &[u32] = &[2, 3];
/// The sparse stream index holds the sequences divisible by this.
pub(crate) const INDEX_STRIDE: u64 = 64;
/// Format tag, sequence and previous position.
const LOG_HEADER_LEN: usize = 17;

/// Encodes a stream name so that no stream's key is a prefix of another's: a length-prefixed
/// type tag, then a length-prefixed id.
pub(crate) fn stream_key(prefix: u8, stream: &StreamId) -> Result<Vec<u8>, StoreError> {
    let ty = stream.aggregate_type.as_bytes();
    let id = stream.aggregate_id.as_str().as_bytes();
    let ty_len = u8::try_from(ty.len()).map_err(|_| {
        StoreError::Invalid(format!(
            "aggregate type tag longer than 255 bytes: {stream}"
        ))
    })?;
    let id_len = u16::try_from(id.len()).map_err(|_| {
        StoreError::Invalid(format!("aggregate id longer than 65535 bytes: {stream}"))
    })?;
    let mut key = Vec::with_capacity(4 + ty.len() + id.len() + 24);
    key.push(prefix);
    key.push(ty_len);
    key.extend_from_slice(ty);
    key.extend_from_slice(&id_len.to_be_bytes());
    key.extend_from_slice(id);
    Ok(key)
}

/// `base` followed by `n` big-endian.
pub(crate) fn with_u64(base: &[u8], n: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(base.len() + 8);
    key.extend_from_slice(base);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// The key of a command record: the stream's `C` base, the version, the command id.
pub(crate) fn command_key(base: &[u8], version: u64, command_id: uuid::Uuid) -> Vec<u8> {
    let mut key = with_u64(base, version);
    key.extend_from_slice(command_id.as_bytes());
    key
}

/// The log key of `position`.
pub(crate) fn log_key(position: u64) -> [u8; 9] {
    let mut key = [LOG; 9];
    key[1..].copy_from_slice(&position.to_be_bytes());
    key
}

/// The big-endian number in the last 8 bytes of `key`, if it has them.
pub(crate) fn trailing_u64(key: &[u8]) -> Option<u64> {
    be_u64(key, key.len().checked_sub(8)?)
}

/// The prefix of `table`'s keys.
pub(crate) fn kv_prefix(table: &str) -> Result<Vec<u8>, StoreError> {
    let len = u8::try_from(table.len())
        .map_err(|_| StoreError::Invalid(format!("table name longer than 255 bytes: {table}")))?;
    let mut key = Vec::with_capacity(2 + table.len() + 16);
    key.push(KV);
    key.push(len);
    key.extend_from_slice(table.as_bytes());
    Ok(key)
}

/// Per-stream bookkeeping: the highest sequence ever written, the deletion watermark and the
/// position of the stream's last event (the head of its back-chain; 0 when it has none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamMeta {
    pub(crate) highest: u64,
    pub(crate) deleted_to: u64,
    pub(crate) last_position: u64,
    /// The id of the event at `last_position`, when the committer knows it without a read (it
    /// wrote or replayed it). Kept in memory only: not part of the stored record.
    pub(crate) last_event: Option<uuid::Uuid>,
}

impl StreamMeta {
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.highest.to_be_bytes());
        out[8..16].copy_from_slice(&self.deleted_to.to_be_bytes());
        out[16..].copy_from_slice(&self.last_position.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8], stream: &StreamId) -> Result<Self, StoreError> {
        match (
            bytes.len(),
            be_u64(bytes, 0),
            be_u64(bytes, 8),
            be_u64(bytes, 16),
        ) {
            (24, Some(highest), Some(deleted_to), Some(last_position)) => Ok(Self {
                highest,
                deleted_to,
                last_position,
                last_event: None,
            }),
            _ => Err(StoreError::Decode {
                what: "stream metadata",
                stream: stream.clone(),
                sequence: 0,
                reason: format!("expected 24 bytes, found {}", bytes.len()),
            }),
        }
    }
}

/// The fixed header of a log record, before the encoded envelope: enough to walk a stream's
/// back-chain without decoding envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogRecord {
    pub(crate) sequence: u64,
    /// The position of the stream's previous event (0 for its first).
    pub(crate) previous: u64,
}

/// Where a log record stands in its append. An append too big for one chunk spreads over several
/// (see `store/sled/repair.rs`), so after a crash the log's last append may lack its closing
/// record: every record before it says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendEnd<'a> {
    /// More events of the same append follow this one.
    Continues,
    /// This event closes its append; the append's encoded command records follow the header
    /// (empty: it recorded none), so a crash between this record and the separate command
    /// records cannot lose them.
    Closes(&'a [u8]),
}

/// The last event of its append, without command records: the only format of layout 2.
const CLOSES: u8 = 2;
/// An event that more events of its append follow.
const CONTINUES: u8 = 3;
/// The last event of its append, followed by a `u32` length and the append's command records.
const CLOSES_WITH_COMMANDS: u8 = 4;

impl LogRecord {
    /// A buffer holding this header and `end`, with room for `body` more bytes: the encoded
    /// envelope is written after it.
    pub(crate) fn start(&self, end: AppendEnd<'_>, body: usize) -> Result<Vec<u8>, StoreError> {
        let (format, commands) = match end {
            AppendEnd::Continues => (CONTINUES, &[][..]),
            AppendEnd::Closes([]) => (CLOSES, &[][..]),
            AppendEnd::Closes(commands) => (CLOSES_WITH_COMMANDS, commands),
        };
        let mut out = Vec::with_capacity(LOG_HEADER_LEN + 4 + commands.len() + body);
        out.push(format);
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.previous.to_be_bytes());
        if format == CLOSES_WITH_COMMANDS {
            let len = u32::try_from(commands.len()).map_err(|_| {
                StoreError::Invalid(format!(
                    "command records of {} bytes in one append",
                    commands.len()
                ))
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(commands);
        }
        Ok(out)
    }

    /// Splits a stored record into its header and its encoded envelope; `Err` holds why the bytes
    /// are not a log record.
    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, &[u8]), String> {
        Self::decode_with_end(bytes).map(|(header, _, envelope)| (header, envelope))
    }

    /// [`Self::decode`], with the record's place in its append.
    pub(crate) fn decode_with_end(bytes: &[u8]) -> Result<(Self, AppendEnd<'_>, &[u8]), String> {
        let format = *bytes.first().ok_or("empty log record")?;
        if !matches!(format, CLOSES | CONTINUES | CLOSES_WITH_COMMANDS) {
            return Err(format!("unknown log record format {format}"));
        }
        let truncated = || format!("log record header truncated at {} bytes", bytes.len());
        let (Some(sequence), Some(previous)) = (be_u64(bytes, 1), be_u64(bytes, 9)) else {
            return Err(truncated());
        };
        let rest = bytes.get(LOG_HEADER_LEN..).unwrap_or_default();
        let (end, envelope) = match format {
            CONTINUES => (AppendEnd::Continues, rest),
            CLOSES => (AppendEnd::Closes(&[]), rest),
            _ => {
                let len = rest
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(truncated)?;
                let commands = usize::try_from(len)
                    .ok()
                    .and_then(|len| rest.get(4..4 + len))
                    .ok_or_else(truncated)?;
                (
                    AppendEnd::Closes(commands),
                    rest.get(4 + commands.len()..).unwrap_or_default(),
                )
            }
        };
        Ok((Self { sequence, previous }, end, envelope))
    }
}

/// The big-endian number at `bytes[at..at + 8]`, if there is one.
fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_record_round_trips_and_rejects_foreign_bytes() -> Result<(), StoreError> {
        let header = LogRecord {
            sequence: 7,
            previous: 42,
        };
        for end in [
            AppendEnd::Continues,
            AppendEnd::Closes(&[]),
            AppendEnd::Closes(b"commands"),
        ] {
            let mut bytes = header.start(end, 8)?;
            bytes.extend_from_slice(b"envelope");
            assert_eq!(
                LogRecord::decode_with_end(&bytes),
                Ok((header, end, &b"envelope"[..]))
            );
            assert_eq!(LogRecord::decode(&bytes), Ok((header, &b"envelope"[..])));
            assert!(LogRecord::decode(&bytes[..10]).is_err());
        }
        // A command section longer than the record is refused, not read past.
        let mut bytes = header.start(AppendEnd::Closes(b"commands"), 0)?;
        bytes.truncate(bytes.len() - 1);
        assert!(LogRecord::decode(&bytes).is_err());
        assert!(LogRecord::decode(b"\x01\xc1garbage").is_err());
        assert!(LogRecord::decode(b"").is_err());
        Ok(())
    }

    #[test]
    fn stream_meta_round_trips() {
        let meta = StreamMeta {
            highest: 9,
            deleted_to: 3,
            last_position: 1_000,
            last_event: None,
        };
        let stream = StreamId::new("t", "1");
        assert_eq!(StreamMeta::decode(&meta.encode(), &stream).ok(), Some(meta));
        assert!(StreamMeta::decode(&meta.encode()[..16], &stream).is_err());
    }
}
