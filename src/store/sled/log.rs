//! The global log's values: chunks of a commit group's log records, or lone records.
//!
//! sled's `Tree::insert` costs about the same for a 150-byte value as for a 4 KiB one, and in
//! the command workloads it was most of the committer's time (one insert per event). So a commit
//! stores the log records of its appends as chunks of up to [`CHUNK_BYTES`], each **one value**
//! keyed by the position of its first record: a group of small events costs one or two inserts
//! instead of one each (the bench's `log_chunks` measures ~14x the writes for chunks of 32
//! records on raw sled), and a chunk is stored whole or not at all.
//!
//! An append starts a new chunk if it does not fit the open one, so an append that fits a chunk
//! is stored whole or not at all. One too big for a chunk ([`CHUNK_BYTES`]) spreads over
//! several, in order, with the markers `repair.rs` relies on to remove what a crash leaves of
//! it (as it does for layouts 2 and 3, which stored every record as a value of its own).
//!
//! A value that holds one record is that record alone (its first byte is its format, 2 to 4),
//! as every value of layouts 2 and 3 was; it reads as a chunk of one at its key. Deleting events
//! rewrites their chunk without them (its key stays); a chunk left empty is removed.
//!
//! Finding position `p`: the chunk holding it is the last `L` key at or below `p` (an exact `get`
//! first, which is all a chunk of one needs; otherwise `get_lt`).

use std::ops::RangeInclusive;

use sled::IVec;

use crate::store::keys::{self, LOG};
use crate::store::StoreError;

/// The format tag of a chunk (a single record's tag is 2, 3 or 4).
const CHUNK: u8 = 5;
/// Tag and record count.
const CHUNK_HEADER: usize = 5;
/// Per record: position and length.
const ENTRY: usize = 12;
/// The most a chunk holds (but a record larger than this is a value of its own). sled writes any
/// log item over a quarter of its 512 KiB segments to a blob file of its own (which the store
/// must then fsync separately, see `durable.rs`), and a leaf node (up to 17 values) is one such
/// item when sled rewrites it: 17 chunks must stay well under 128 KiB. A typical commit group of small events fits in one or
/// two chunks; an append too big for one spreads over several (see `Committer::plan_append`).
const CHUNK_BYTES: usize = 4 * 1024;

/// The bytes `record` takes in a chunk.
pub(super) fn chunked_size(record: &[u8]) -> usize {
    record.len() + ENTRY
}

/// A chunk being filled by the committer: records in position order.
#[derive(Default)]
pub(super) struct ChunkBuilder {
    records: Vec<(u64, Vec<u8>)>,
    bytes: usize,
}

impl ChunkBuilder {
    pub(super) fn push(&mut self, position: u64, record: Vec<u8>) {
        self.bytes += chunked_size(&record);
        self.records.push((position, record));
    }

    /// Whether `size` more chunked bytes fit (always, into an empty chunk).
    pub(super) fn fits(&self, size: usize) -> bool {
        self.records.is_empty() || CHUNK_HEADER + self.bytes + size <= CHUNK_BYTES
    }

    /// The chunk's key and value, leaving the builder empty. A lone record is stored as it is,
    /// as layout 3 did: the same read, without a chunk's table.
    pub(super) fn take(&mut self) -> Option<(IVec, Vec<u8>)> {
        let first = self.records.first()?.0;
        let mut records = std::mem::take(&mut self.records);
        self.bytes = 0;
        let value = if records.len() == 1 {
            records.swap_remove(0).1
        } else {
            encode(&records)
        };
        Some((IVec::from(&keys::log_key(first)[..]), value))
    }
}

/// Encodes `records` (position order) as one chunk.
fn encode(records: &[(u64, impl AsRef<[u8]>)]) -> Vec<u8> {
    let body: usize = records.iter().map(|(_, r)| r.as_ref().len()).sum();
    let mut out = Vec::with_capacity(CHUNK_HEADER + records.len() * ENTRY + body);
    out.push(CHUNK);
    // A chunk holds at most a commit group of records (`max_batch`, far below u32::MAX), each
    // at most `MAX_RECORD_BYTES`: neither conversion can truncate.
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for (position, record) in records {
        out.extend_from_slice(&position.to_be_bytes());
        out.extend_from_slice(&(record.as_ref().len() as u32).to_be_bytes());
    }
    for (_, record) in records {
        out.extend_from_slice(record.as_ref());
    }
    out
}

/// Whether a stored log value is a chunk (else a single record of layouts 2 and 3).
pub(super) fn is_chunk(bytes: &[u8]) -> bool {
    bytes.first() == Some(&CHUNK)
}

/// One stored value of the log, with where each of its records is.
pub(super) struct LogValue {
    /// The position its key names.
    key_position: u64,
    bytes: IVec,
    /// Position, offset and length of each record of a chunk, in position order; empty for a
    /// lone record (the whole value, at `key_position`), which so costs no allocation.
    entries: Vec<(u64, usize, usize)>,
}

impl LogValue {
    /// Reads the value stored at the log key of `key_position`; `Err` says why it is not one.
    pub(super) fn parse(key_position: u64, bytes: IVec) -> Result<Self, String> {
        if !is_chunk(&bytes) {
            // A lone record (its own decoding checks its format).
            return Ok(Self {
                key_position,
                bytes,
                entries: Vec::new(),
            });
        }
        let number = |at: usize, width: usize| -> Option<u64> {
            let field = bytes.get(at..at.checked_add(width)?)?;
            Some(field.iter().fold(0, |n, b| n << 8 | u64::from(*b)))
        };
        let truncated = || format!("log chunk at position {key_position} is truncated");
        let count = number(1, 4).ok_or_else(truncated)? as usize;
        if count == 0 {
            return Err(format!("log chunk at position {key_position} is empty"));
        }
        let table_end = count
            .checked_mul(ENTRY)
            .and_then(|t| t.checked_add(CHUNK_HEADER))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(truncated)?;
        let mut entries = Vec::with_capacity(count);
        let mut offset = table_end;
        let mut last = None;
        for i in 0..count {
            let at = CHUNK_HEADER + i * ENTRY;
            let (Some(position), Some(len)) = (number(at, 8), number(at + 8, 4)) else {
                return Err(truncated());
            };
            let len = len as usize;
            if offset + len > bytes.len() {
                return Err(truncated());
            }
            if last.is_some_and(|last| position <= last) || position < key_position {
                return Err(format!(
                    "log chunk at position {key_position} holds position {position} out of order"
                ));
            }
            last = Some(position);
            entries.push((position, offset, len));
            offset += len;
        }
        Ok(Self {
            key_position,
            bytes,
            entries,
        })
    }

    /// [`Self::parse`], with a damaged value reported as a typed error.
    fn read(key_position: u64, bytes: IVec) -> Result<Self, StoreError> {
        Self::parse(key_position, bytes).map_err(|reason| corrupt(key_position, reason))
    }

    /// How many records it holds.
    fn len(&self) -> usize {
        self.entries.len().max(1)
    }

    /// Record number `i` (below [`Self::len`]) and its position.
    fn record(&self, i: usize) -> (u64, IVec) {
        match self.entries.get(i) {
            Some((position, offset, len)) => (*position, self.bytes.subslice(*offset, *len)),
            None => (self.key_position, self.bytes.clone()),
        }
    }

    /// The record at `position`, if this value holds it.
    pub(super) fn find(&self, position: u64) -> Option<IVec> {
        if self.entries.is_empty() {
            return (position == self.key_position).then(|| self.bytes.clone());
        }
        let at = self
            .entries
            .binary_search_by_key(&position, |(p, _, _)| *p)
            .ok()?;
        Some(self.record(at).1)
    }

    /// Its records with their positions, in order.
    pub(super) fn records(&self) -> impl Iterator<Item = (u64, IVec)> + '_ {
        (0..self.len()).map(|i| self.record(i))
    }

    fn first_position(&self) -> u64 {
        self.entries
            .first()
            .map_or(self.key_position, |(p, _, _)| *p)
    }

    pub(super) fn last_position(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.key_position, |(p, _, _)| *p)
    }

    pub(super) fn holds(&self, position: u64) -> bool {
        (self.first_position()..=self.last_position()).contains(&position)
    }

    /// This value without the records at `positions`: the bytes to store instead, or `None`
    /// when nothing is left.
    pub(super) fn without(&self, positions: &[u64]) -> Option<Vec<u8>> {
        let kept: Vec<(u64, IVec)> = self
            .records()
            .filter(|(p, _)| !positions.contains(p))
            .collect();
        match kept.as_slice() {
            [] => None,
            // Alone, a record is stored as it is only at its own key.
            [(position, lone)] if *position == self.key_position => Some(lone.to_vec()),
            _ => Some(encode(&kept)),
        }
    }
}

fn corrupt(position: u64, reason: String) -> StoreError {
    StoreError::Decode {
        what: "log chunk",
        stream: super::log_stream().clone(),
        sequence: position,
        reason,
    }
}

/// The key position of a log key, if it is one.
fn log_position(key: &[u8]) -> Option<u64> {
    if key.len() == 9 && key.first() == Some(&LOG) {
        keys::trailing_u64(key)
    } else {
        None
    }
}

/// The stored value holding `position`, with its key position, if any value does.
pub(super) fn value_at(
    tree: &sled::Tree,
    position: u64,
) -> Result<Option<(u64, LogValue)>, StoreError> {
    if let Some(bytes) = tree.get(keys::log_key(position))? {
        return LogValue::read(position, bytes).map(|value| Some((position, value)));
    }
    let Some((key, bytes)) = tree.get_lt(keys::log_key(position))? else {
        return Ok(None);
    };
    let Some(key_position) = log_position(&key) else {
        return Ok(None);
    };
    let value = LogValue::read(key_position, bytes)?;
    Ok(value.holds(position).then_some((key_position, value)))
}

/// The record at `position`, if the log holds it.
pub(super) fn record_at(tree: &sled::Tree, position: u64) -> Result<Option<IVec>, StoreError> {
    Ok(value_at(tree, position)?.and_then(|(_, value)| value.find(position)))
}

/// The records at positions within `range`, in order, as `(position, record)`.
pub(super) fn records_in(
    tree: &sled::Tree,
    range: RangeInclusive<u64>,
) -> Result<RecordsIn, StoreError> {
    let (from, to) = (*range.start(), *range.end());
    // The chunk holding `from` may start below it.
    let start = match tree.get_lt(keys::log_key(from.saturating_add(1)))? {
        Some((key, _)) => log_position(&key).unwrap_or(from),
        None => from,
    };
    Ok(RecordsIn {
        values: tree.range(keys::log_key(start)..=keys::log_key(to)),
        current: None,
        next: 0,
        range,
    })
}

/// The iterator of [`records_in`].
pub(super) struct RecordsIn {
    values: sled::Iter,
    /// The value being read and its next record.
    current: Option<LogValue>,
    next: usize,
    range: RangeInclusive<u64>,
}

impl Iterator for RecordsIn {
    type Item = Result<(u64, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(value) = &self.current {
                while self.next < value.len() {
                    let (position, record) = value.record(self.next);
                    self.next += 1;
                    if self.range.contains(&position) {
                        return Some(Ok((position, record)));
                    }
                }
                self.current = None;
            }
            let (key, bytes) = match self.values.next()? {
                Ok(item) => item,
                Err(e) => return Some(Err(e.into())),
            };
            match LogValue::read(log_position(&key).unwrap_or(0), bytes) {
                Ok(value) => {
                    self.current = Some(value);
                    self.next = 0;
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The log's last stored value and its key position.
pub(super) fn last_value(tree: &sled::Tree) -> Result<Option<(u64, LogValue)>, StoreError> {
    let Some(item) = tree
        .range(keys::log_key(0)..=keys::log_key(u64::MAX))
        .next_back()
    else {
        return Ok(None);
    };
    let (key, bytes) = item?;
    let key_position = log_position(&key).unwrap_or(0);
    Ok(Some((key_position, LogValue::read(key_position, bytes)?)))
}

/// A log value to store again (`Some`) or remove (`None`).
pub(super) type Rewrite = (IVec, Option<Vec<u8>>);

/// The writes that remove the records at `positions` (ascending) from the log: each chunk
/// holding some rewritten without them, or removed when nothing is left.
pub(super) fn removals(tree: &sled::Tree, positions: &[u64]) -> Result<Vec<Rewrite>, StoreError> {
    let mut writes = Vec::new();
    let mut rest = positions;
    while let Some(&position) = rest.first() {
        let Some((key_position, value)) = value_at(tree, position)? else {
            rest = &rest[1..];
            continue;
        };
        let last = value.last_position();
        let here = rest.iter().take_while(|p| **p <= last).count().max(1);
        writes.push((
            IVec::from(&keys::log_key(key_position)[..]),
            value.without(&rest[..here]),
        ));
        rest = &rest[here..];
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_round_trips_and_refuses_damaged_tables() -> Result<(), String> {
        let mut builder = ChunkBuilder::default();
        builder.push(7, b"\x02seven".to_vec());
        builder.push(8, b"\x02eight!".to_vec());
        let (key, bytes) = builder.take().ok_or("nothing built")?;
        assert!(builder.take().is_none());
        assert_eq!(&key[..], &keys::log_key(7)[..]);
        let value = LogValue::parse(7, IVec::from(bytes.clone()))?;
        assert_eq!(value.find(8).as_deref(), Some(&b"\x02eight!"[..]));
        assert_eq!(value.find(9), None);
        assert_eq!((value.first_position(), value.last_position()), (7, 8));
        // What is left of a chunk is a chunk, at the same key, unless it is the record the key
        // names, which then stands alone.
        let rest = value.without(&[7]).map(IVec::from);
        let rest = rest.map(|b| LogValue::parse(7, b).map(|v| v.records().collect::<Vec<_>>()));
        assert_eq!(rest, Some(Ok(vec![(8, IVec::from(&b"\x02eight!"[..]))])));
        assert_eq!(value.without(&[8]).as_deref(), Some(&b"\x02seven"[..]));
        assert!(value.without(&[7, 8]).is_none());
        // Every truncation is refused, never read past or panicked on.
        for len in 1..bytes.len() {
            assert!(
                LogValue::parse(7, IVec::from(&bytes[..len])).is_err(),
                "{len}"
            );
        }
        // A lone record reads as a chunk of one.
        let single = LogValue::parse(3, IVec::from(&b"\x02one"[..]))?;
        assert_eq!(single.find(3).as_deref(), Some(&b"\x02one"[..]));
        Ok(())
    }
}
