//! The byte layout of the embedded store's single keyspace.
//!
//! Everything lives in one sled tree so that one `apply_batch` commits events, index entries,
//! stream metadata, idempotency records and key-value writes atomically. A one-byte prefix names
//! each record family; numbers are big-endian so byte order equals numeric order and range scans
//! are the fast path.

use crate::domain::StreamId;

use super::StoreError;

/// `L` + position → encoded envelope: the global log, the one copy of each event.
pub(crate) const LOG: u8 = b'L';
/// `S` + stream + sequence → position: the per-stream index.
pub(crate) const STREAM: u8 = b'S';
/// `M` + stream → [`StreamMeta`].
pub(crate) const META: u8 = b'M';
/// `P` + stream + sequence → encoded snapshot.
pub(crate) const SNAPSHOT: u8 = b'P';
/// `C` + stream + version + command id → encoded outcome.
pub(crate) const COMMAND: u8 = b'C';
/// `K` + table + key → value.
pub(crate) const KV: u8 = b'K';
/// `G` → the last assigned global position.
pub(crate) const HEAD: &[u8] = b"G";

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

/// The log key of `position`.
pub(crate) fn log_key(position: u64) -> [u8; 9] {
    let mut key = [LOG; 9];
    key[1..].copy_from_slice(&position.to_be_bytes());
    key
}

/// The big-endian number in the last 8 bytes of `key`, if it has them.
pub(crate) fn trailing_u64(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    let bytes: [u8; 8] = key.get(start..)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
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

/// Per-stream bookkeeping: the highest sequence ever written and the deletion watermark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamMeta {
    pub(crate) highest: u64,
    pub(crate) deleted_to: u64,
}

impl StreamMeta {
    pub(crate) fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.highest.to_be_bytes());
        out[8..].copy_from_slice(&self.deleted_to.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8], stream: &StreamId) -> Result<Self, StoreError> {
        let num = |range: std::ops::Range<usize>| -> Option<u64> {
            let b: [u8; 8] = bytes.get(range)?.try_into().ok()?;
            Some(u64::from_be_bytes(b))
        };
        match (bytes.len(), num(0..8), num(8..16)) {
            (16, Some(highest), Some(deleted_to)) => Ok(Self {
                highest,
                deleted_to,
            }),
            _ => Err(StoreError::Decode {
                what: "stream metadata",
                stream: stream.clone(),
                sequence: 0,
                reason: format!("expected 16 bytes, found {}", bytes.len()),
            }),
        }
    }
}
