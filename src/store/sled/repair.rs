//! Making the log's tail whole again after a crash.
//!
//! Most commits are not one atomic `apply_batch` but single-key inserts, which sled buffers and
//! writes together across commits (see `Committer::apply`). Their order is fixed (see
//! `Plan::close_chunk`): each chunk of log records, then the index entries and command records
//! of the appends that close in it; then stream metadata and the meta checkpoint. One thread
//! issues them all. An append starts a new chunk when it does not fit the open one; one too big
//! for a chunk spreads over several, and its records before the closing one say `Continues`.
//!
//! sled 0.34 recovers a crashed database as a prefix of its log in LSN order: recovery stops at
//! the first torn or missing message (`pagecache/iterator.rs`), which is also what its atomic
//! batches rest on (a torn batch ends recovery there). A chunk is one insert, stored whole or
//! not at all. So a crash leaves every append complete except at the log's end, in one of two
//! ways:
//!
//! - an append spread over chunks lost its last ones: the records it left say `Continues`, at
//!   the end of the last value and maybe filling values before it. They are removed with their
//!   index entries (a chunk that also holds earlier appends is rewritten without them). The
//!   append was never acknowledged (in `sync` mode a reply waits for the fsync after the whole
//!   commit; `buffered` mode may lose its last interval, never part of an append). Layouts 2
//!   and 3 stored every record as a value of its own: the same case.
//! - the last chunk lost what follows it: the index entries and command records of the appends
//!   that close in it are written again from its records (a closing record embeds its append's
//!   command records).
//!
//! Nothing else can be incomplete: anything written after the cut is gone with it, and anything
//! written before it is there. The repair runs before the store computes its head and rebuilds
//! stream metadata, and is idempotent (a crash during it is repaired by the next open).
//!
//! Restoring command records can also bring back one that a later append of the same chunk (a
//! rejection that trimmed the dedup window) had removed: a true record of a command that did
//! run, beyond the window, which the runtime trims when it loads the records.

use crate::domain::StreamId;
use crate::store::keys::{self, AppendEnd, LogRecord};
use crate::store::{CommandRecord, EventEnvelope, StoreError};

use sled::IVec;

use super::log;
use super::log_stream;

/// What a repair changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TailRepair {
    /// Log records of a cut append removed.
    pub(super) removed: u64,
    /// Index entries and command records of the last append written again.
    pub(super) restored: usize,
}

impl TailRepair {
    pub(super) fn changed(&self) -> bool {
        self.removed > 0 || self.restored > 0
    }
}

/// Removes the records of a cut append from the end of the log, and restores what must follow
/// the last whole appends.
pub(super) fn repair_tail(tree: &sled::Tree) -> Result<TailRepair, StoreError> {
    let mut repair = TailRepair::default();
    loop {
        let (key_position, value) = match log::last_value(tree) {
            Ok(Some(last)) => last,
            Ok(None) => return Ok(repair),
            // Not ours to judge here: reading it reports the damage.
            Err(StoreError::Decode { .. }) => return Ok(repair),
            Err(e) => return Err(e),
        };
        let key = keys::log_key(key_position);
        let records: Vec<(u64, IVec)> = value.records().collect();
        // The records a cut append left at the end: they say `Continues`. (An undecodable one
        // ends the search: reading it reports the damage.)
        let cut = records
            .iter()
            .rev()
            .take_while(|(_, record)| {
                matches!(
                    LogRecord::decode_with_end(record),
                    Ok((_, AppendEnd::Continues, _))
                )
            })
            .count();
        let (kept, doomed) = records.split_at(records.len() - cut);
        if !doomed.is_empty() {
            // The index entries first: a crash between the two leaves the records, which the
            // next open removes, never an entry pointing at nothing.
            for (position, record) in doomed {
                remove_index_entry(tree, *position, record)?;
            }
            let positions: Vec<u64> = doomed.iter().map(|(position, _)| *position).collect();
            repair.removed += positions.len() as u64;
            match value.without(&positions) {
                Some(rest) => drop(tree.insert(key, rest)?),
                None => drop(tree.remove(key)?),
            }
        }
        if !kept.is_empty() {
            for (position, record) in kept {
                restore_followers(tree, *position, record, &mut repair)?;
            }
            return Ok(repair);
        }
        // The whole value belonged to the cut append: its start may be further back.
    }
}

/// Removes the index entry of a cut append's record, if it has one.
fn remove_index_entry(tree: &sled::Tree, position: u64, record: &[u8]) -> Result<(), StoreError> {
    let Ok((header, _, envelope)) = LogRecord::decode_with_end(record) else {
        return Ok(());
    };
    if header.sequence % keys::INDEX_STRIDE != 0 {
        return Ok(());
    }
    match EventEnvelope::decode(envelope, log_stream(), position) {
        Ok(event) => tree
            .remove(index_key(&event.stream, header.sequence)?)
            .map(drop)?,
        Err(e) => tracing::warn!(
            position, error = %e,
            "removing an undecodable record of a cut append: its index entry, if any, stays"
        ),
    }
    Ok(())
}

/// Writes the index entry and the command records that must follow the log record at
/// `position`, where they are missing.
fn restore_followers(
    tree: &sled::Tree,
    position: u64,
    record: &[u8],
    repair: &mut TailRepair,
) -> Result<(), StoreError> {
    let Ok((header, end, envelope)) = LogRecord::decode_with_end(record) else {
        // Reading it reports the damage; there is nothing to restore from.
        return Ok(());
    };
    let commands = match end {
        AppendEnd::Closes(commands) => commands,
        AppendEnd::Continues => &[][..],
    };
    let indexed = header.sequence % keys::INDEX_STRIDE == 0;
    if !indexed && commands.is_empty() {
        return Ok(());
    }
    let stream = match EventEnvelope::decode(envelope, log_stream(), position) {
        Ok(event) => event.stream,
        Err(e) => {
            // Reading it reports the damage; there is no stream to restore for.
            tracing::warn!(position, error = %e, "an undecodable record at the log's tail");
            return Ok(());
        }
    };
    if indexed {
        let index = index_key(&stream, header.sequence)?;
        if tree.get(&index)?.is_none() {
            tree.insert(index, &position.to_be_bytes())?;
            repair.restored += 1;
        }
    }
    if !commands.is_empty() {
        repair.restored += restore_commands(tree, &stream, commands, position)?;
    }
    Ok(())
}

/// Writes the command records embedded in the closing record at `position` that are missing.
fn restore_commands(
    tree: &sled::Tree,
    stream: &StreamId,
    commands: &[u8],
    position: u64,
) -> Result<usize, StoreError> {
    let records: Vec<CommandRecord> =
        rmp_serde::from_slice(commands).map_err(|e| StoreError::Decode {
            what: "embedded command records",
            stream: log_stream().clone(),
            sequence: position,
            reason: e.to_string(),
        })?;
    let base = keys::stream_key(keys::COMMAND, stream)?;
    let mut restored = 0;
    for record in records {
        let key = keys::command_key(&base, record.version, record.command_id);
        if tree.get(&key)?.is_none() {
            tree.insert(key, record.encode()?)?;
            restored += 1;
        }
    }
    Ok(restored)
}

fn index_key(stream: &StreamId, sequence: u64) -> Result<Vec<u8>, StoreError> {
    Ok(keys::with_u64(
        &keys::stream_key(keys::STREAM, stream)?,
        sequence,
    ))
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::store::keys::{AppendEnd, LogRecord};
    use crate::store::Causation;

    /// A log record of `stream` at `position` (its `sequence`-th event), closing its append or
    /// not.
    fn record(stream: &StreamId, sequence: u64, position: u64, closes: bool) -> Vec<u8> {
        let envelope = EventEnvelope {
            event_id: Uuid::now_v7(),
            stream: stream.clone(),
            sequence,
            position,
            timestamp_micros: 0,
            event_type: "Tested".into(),
            schema_version: 1,
            causation: Causation::default(),
            payload: vec![1, 2, 3],
        };
        let end = if closes {
            AppendEnd::Closes(&[])
        } else {
            AppendEnd::Continues
        };
        let header = LogRecord {
            sequence,
            previous: position.saturating_sub(1),
        };
        let mut bytes = header.start(end, 64).unwrap_or_default();
        assert!(envelope.encode_into(&mut bytes).is_ok());
        bytes
    }

    /// A chunk that holds a whole append and then the start of one a crash cut (its rest was
    /// in the next chunk, which never reached the disk) keeps the whole one only.
    #[test]
    fn a_chunk_ending_in_a_cut_append_keeps_the_appends_before_it() -> Result<(), StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        let tree = db.open_tree("t")?;
        let (p, q) = (StreamId::new("t", "p"), StreamId::new("t", "q"));
        let whole = record(&p, 1, 1, true);
        let mut chunk = super::super::log::ChunkBuilder::default();
        chunk.push(1, whole.clone());
        chunk.push(2, record(&q, 1, 2, false));
        chunk.push(3, record(&q, 2, 3, false));
        let Some((key, value)) = chunk.take() else {
            return Err(StoreError::Invalid("nothing built".into()));
        };
        tree.insert(&key, value)?;
        let repair = repair_tail(&tree)?;
        assert_eq!(repair.removed, 2);
        // What is left is the whole append's record, alone under its own key.
        assert_eq!(tree.get(keys::log_key(1))?.as_deref(), Some(&whole[..]));
        assert_eq!(tree.len(), 1);
        // A second repair finds nothing to do.
        assert_eq!(repair_tail(&tree)?, TailRepair::default());
        Ok(())
    }
}
