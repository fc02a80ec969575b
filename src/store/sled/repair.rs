//! Making the log's last append whole again after a crash.
//!
//! Most commits are not one atomic `apply_batch` but single-key inserts, which sled buffers and
//! writes together across commits (see `Committer::apply`). Their order is fixed: each event's
//! log record, then its index entry; the closing record of an append (which embeds the
//! append's command records); then the separate command records and removals; then stream
//! metadata and the meta checkpoint. One thread issues them all.
//!
//! sled 0.34 recovers a crashed database as a prefix of its log in LSN order: recovery stops at
//! the first torn or missing message (`pagecache/iterator.rs`), which is also what its atomic
//! batches rest on (a torn batch ends recovery there). So a crash leaves every append complete
//! except, at most, the last one in the log, in one of two ways:
//!
//! - it lost its closing record: the records before it say `Continues`. They are removed, with
//!   their index entries; the append was never acknowledged (in `sync` mode a reply waits for the
//!   fsync after the whole commit; `buffered` mode may lose its last interval, never part of an
//!   append).
//! - it kept its closing record but lost what follows: its index entry or command records. They
//!   are written again from the closing record.
//!
//! Nothing else can be incomplete: anything written after the cut is gone with it, and anything
//! written before it is there. The repair runs before the store computes its head and rebuilds
//! stream metadata, and is idempotent (a crash during it is repaired by the next open).
//!
//! Restoring from the last closing record can also bring back a command record that a later
//! append without events (a rejection that trimmed the dedup window) had removed: a true record
//! of a command that did run, one more than the window, which the runtime trims when it loads
//! the records.

use crate::domain::StreamId;
use crate::store::keys::{self, AppendEnd, LogRecord};
use crate::store::{CommandRecord, EventEnvelope, StoreError};

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

/// Removes the records of a cut append from the end of the log and restores what the last
/// complete append's closing record says must follow it.
pub(super) fn repair_tail(tree: &sled::Tree) -> Result<TailRepair, StoreError> {
    let mut repair = TailRepair::default();
    while let Some(item) = tree
        .range(keys::log_key(0)..=keys::log_key(u64::MAX))
        .next_back()
    {
        let (key, record) = item?;
        let position = keys::trailing_u64(&key).unwrap_or(0);
        let (header, end, envelope) = match LogRecord::decode_with_end(&record) {
            Ok(decoded) => decoded,
            // Not ours to judge here: opening reports it when it rebuilds stream metadata.
            Err(_) => return Ok(repair),
        };
        // Decoded only where a key needs the stream.
        let stream = || EventEnvelope::decode(envelope, &log_stream(), position).map(|e| e.stream);
        match end {
            AppendEnd::Continues => {
                // The index entry first: a crash between the two leaves the record, which the
                // next open removes, never an entry pointing at nothing.
                if header.sequence % keys::INDEX_STRIDE == 0 {
                    match &stream() {
                        Ok(stream) => tree.remove(index_key(stream, header.sequence)?).map(drop)?,
                        Err(e) => tracing::warn!(
                            position, error = %e,
                            "removing an undecodable record of a cut append: its index entry, if any, stays"
                        ),
                    }
                }
                tree.remove(&key)?;
                repair.removed += 1;
            }
            AppendEnd::Closes(commands) => {
                let stream = match stream() {
                    Ok(stream) => stream,
                    Err(e) => {
                        // Reading it reports the damage; there is no stream to restore for.
                        tracing::warn!(position, error = %e, "the log's last record is undecodable");
                        return Ok(repair);
                    }
                };
                if header.sequence % keys::INDEX_STRIDE == 0 {
                    let index = index_key(&stream, header.sequence)?;
                    if tree.get(&index)?.is_none() {
                        tree.insert(index, &position.to_be_bytes())?;
                        repair.restored += 1;
                    }
                }
                if !commands.is_empty() {
                    repair.restored += restore_commands(tree, &stream, commands, position)?;
                }
                return Ok(repair);
            }
        }
    }
    Ok(repair)
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
            stream: log_stream(),
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
