//! Reading a stream through its back-chain: stream metadata (lazily persisted, so the committer's
//! not-yet-written part is shared in memory) and the walk from a known event down to a window.

use dashmap::DashMap;

use crate::domain::StreamId;
use crate::store::keys::{self, LogRecord, StreamMeta};
use crate::store::StoreError;

use super::log::{self, LogValue};

/// Stream metadata that changed since its `M` record was last written, keyed by `M` key. The
/// committer is its only writer; readers consult it before the tree.
pub(super) type DirtyMetas = DashMap<Vec<u8>, StreamMeta, foldhash::fast::RandomState>;

/// A stream's metadata: the committer's unwritten version if there is one, else its `M`
/// record, else an empty stream.
pub(super) fn read_meta(
    tree: &sled::Tree,
    dirty: &DirtyMetas,
    meta_key: &[u8],
    stream: &StreamId,
) -> Result<StreamMeta, StoreError> {
    if let Some(meta) = dirty.get(meta_key) {
        return Ok(*meta);
    }
    stored_meta(tree, meta_key, stream)
}

/// The `M` record alone.
pub(super) fn stored_meta(
    tree: &sled::Tree,
    meta_key: &[u8],
    stream: &StreamId,
) -> Result<StreamMeta, StoreError> {
    match tree.get(meta_key)? {
        Some(bytes) => StreamMeta::decode(&bytes, stream),
        None => Ok(StreamMeta::default()),
    }
}

/// One event reached by a walk.
pub(super) struct Hop {
    pub(super) sequence: u64,
    pub(super) position: u64,
    pub(super) record: sled::IVec,
}

impl Hop {
    /// The encoded envelope inside the record (the walk checked its header).
    pub(super) fn envelope(&self) -> &[u8] {
        LogRecord::decode(&self.record).map_or(&[], |(_, envelope)| envelope)
    }
}

/// What a walk found: the events of the window in ascending order, and, if the chain could not
/// be followed to the window's start, the event where it broke and why.
pub(super) struct Walk {
    pub(super) hops: Vec<Hop>,
    pub(super) broken: Option<(u64, u64, StoreError)>,
}

/// Walks `stream`'s chain for the events `from..=to` (`to` at most `meta.highest`). It starts at
/// the nearest sparse index entry at or above `to` (or at the stream's last event) and follows
/// previous-event positions down to `from`, so it reads at most `INDEX_STRIDE - 1` events
/// outside the window.
pub(super) fn walk(
    tree: &sled::Tree,
    stream: &StreamId,
    meta: &StreamMeta,
    from: u64,
    to: u64,
) -> Result<Walk, StoreError> {
    let to = to.min(meta.highest);
    let mut hops = Vec::new();
    if from > to {
        return Ok(Walk { hops, broken: None });
    }
    let base = keys::stream_key(keys::STREAM, stream)?;
    let (mut sequence, mut position) = match tree
        .range(keys::with_u64(&base, to)..=keys::with_u64(&base, u64::MAX))
        .next()
    {
        Some(item) => {
            let (key, value) = item?;
            let sequence = keys::trailing_u64(&key).unwrap_or(0);
            (sequence, index_position(&value, stream, sequence)?)
        }
        None => (meta.highest, meta.last_position),
    };
    // The chunk of the last hop: a stream's events of one commit group share one.
    let mut chunk = None;
    while sequence >= from && sequence > 0 {
        let (record, previous) = match follow(tree, &mut chunk, position, sequence)? {
            Ok(found) => found,
            Err(reason) => {
                let err = StoreError::Decode {
                    what: "event envelope",
                    stream: stream.clone(),
                    sequence,
                    reason,
                };
                hops.reverse();
                return Ok(Walk {
                    hops,
                    broken: Some((sequence, position, err)),
                });
            }
        };
        if sequence <= to {
            hops.push(Hop {
                sequence,
                position,
                record,
            });
        }
        position = previous;
        sequence -= 1;
    }
    hops.reverse();
    Ok(Walk { hops, broken: None })
}

/// Reads the record at `position`, which the chain says holds `sequence`: the record and the
/// position of the event before it, or why the chain is broken there. `chunk` is the log value
/// of the previous hop, kept for the next.
fn follow(
    tree: &sled::Tree,
    chunk: &mut Option<LogValue>,
    position: u64,
    sequence: u64,
) -> Result<Result<(sled::IVec, u64), String>, StoreError> {
    let found = if position == 0 {
        None
    } else if let Some(record) = chunk.as_ref().and_then(|c| c.find(position)) {
        Some(record)
    } else {
        match tree.get(keys::log_key(position))? {
            // A record alone under its own key (the common case of a replay): no table to read.
            Some(value) if !log::is_chunk(&value) => Some(value),
            found => {
                // A chunk keyed at this position; else the one holding it (or, if the chunk is
                // damaged, `value_at`'s report of it).
                *chunk = match found.and_then(|value| LogValue::parse(position, value).ok()) {
                    Some(value) => Some(value),
                    None => log::value_at(tree, position)?.map(|(_, value)| value),
                };
                chunk.as_ref().and_then(|c| c.find(position))
            }
        }
    };
    let record = match found {
        Some(record) => record,
        _ => {
            return Ok(Err(format!(
                "the stream's chain points at missing log position {position}"
            )))
        }
    };
    Ok(match LogRecord::decode(&record) {
        Ok((header, _)) if header.sequence == sequence => Ok((record, header.previous)),
        Ok((header, _)) => Err(format!(
            "log position {position} holds sequence {} where the chain expects {sequence}",
            header.sequence
        )),
        Err(reason) => Err(reason),
    })
}

/// The position stored in a sparse index entry.
pub(super) fn index_position(
    bytes: &[u8],
    stream: &StreamId,
    sequence: u64,
) -> Result<u64, StoreError> {
    keys::trailing_u64(bytes)
        .filter(|_| bytes.len() == 8)
        .ok_or_else(|| StoreError::Decode {
            what: "stream index entry",
            stream: stream.clone(),
            sequence,
            reason: format!("expected 8 bytes, found {}", bytes.len()),
        })
}
