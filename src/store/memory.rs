//! An event store in memory, with the same semantics as the embedded one and no durability.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    keys, now_micros, AppendRequest, AppendResult, CommandRecord, EventEnvelope, EventStore,
    KvWrite, RecordedOutcome, SnapshotCriteria, SnapshotRecord, StoreError, StreamSlice,
    MAX_RECORD_BYTES,
};
use crate::domain::StreamId;

/// An event store held in memory: for tests and examples that want no disk. Cheap to clone;
/// clones share the data. Everything is lost when the last clone is dropped.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    head: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    closed: bool,
    head: u64,
    log: BTreeMap<u64, EventEnvelope>,
    streams: HashMap<StreamId, StreamState>,
    kv: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
}

#[derive(Default)]
struct StreamState {
    highest: u64,
    deleted_to: u64,
    /// The id of the last event appended (kept after deletions, as the sled store does).
    last_event: Option<Uuid>,
    /// sequence → global position
    index: BTreeMap<u64, u64>,
    snapshots: BTreeMap<u64, SnapshotRecord>,
    commands: BTreeMap<(u64, Uuid), RecordedOutcome>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        let (head, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                head,
            }),
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        let guard = self
            .shared
            .state
            .lock()
            .map_err(|_| StoreError::Storage("memory store lock poisoned".into()))?;
        if guard.closed {
            return Err(StoreError::Closed);
        }
        Ok(guard)
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        check_stream(&request.stream)?;
        let mut state = self.state()?;
        let head = state.head;
        let (current, last_event) = state
            .streams
            .get(&request.stream)
            .map_or((0, None), |s| (s.highest, s.last_event));
        let chained = request
            .expected_last_event
            .map_or(true, |id| last_event == Some(id));
        if current != request.expected_version || !chained {
            return Err(StoreError::Conflict {
                stream: request.stream,
                expected: request.expected_version,
                actual: current,
            });
        }
        let timestamp = now_micros();
        let mut envelopes = Vec::with_capacity(request.events.len());
        for (i, event) in request.events.into_iter().enumerate() {
            let offset = i as u64 + 1;
            let envelope = EventEnvelope::from_new(
                event,
                request.stream.clone(),
                current + offset,
                head + offset,
                timestamp,
            );
            // Encode so this store rejects what the durable one rejects.
            check_size(envelope.encode()?.len(), "event")?;
            envelopes.push(envelope);
        }
        let count = envelopes.len() as u64;
        let state = &mut *state;
        let stream = state.streams.entry(request.stream).or_default();
        for envelope in envelopes {
            stream.last_event = Some(envelope.event_id);
            stream.index.insert(envelope.sequence, envelope.position);
            state.log.insert(envelope.position, envelope);
        }
        for record in request.record_commands {
            stream
                .commands
                .insert((record.version, record.command_id), record.outcome);
        }
        for key in request.forget_commands {
            stream.commands.remove(&key);
        }
        stream.highest = current + count;
        state.head = head + count;
        if count > 0 {
            self.shared.head.send_replace(state.head);
        }
        Ok(AppendResult {
            first_sequence: current + 1,
            last_sequence: current + count,
            first_position: head + 1,
            last_position: head + count,
        })
    }

    fn preserves_append_order(&self) -> bool {
        // Each append is applied under the lock on its first poll, without awaiting anything.
        true
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<StreamSlice, StoreError> {
        let state = self.state()?;
        let Some(s) = state.streams.get(stream) else {
            return Ok(StreamSlice::default());
        };
        let from = from.max(s.deleted_to + 1).max(1);
        let events = if from <= to {
            s.index
                .range(from..=to)
                .take(max)
                .filter_map(|(_, pos)| state.log.get(pos).cloned())
                .collect()
        } else {
            Vec::new()
        };
        Ok(StreamSlice {
            events,
            highest_sequence: s.highest,
        })
    }

    async fn highest_sequence(&self, stream: &StreamId) -> Result<u64, StoreError> {
        Ok(self.state()?.streams.get(stream).map_or(0, |s| s.highest))
    }

    async fn read_log(&self, from: u64, max: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        let state = self.state()?;
        Ok(state
            .log
            .range(from.max(1)..)
            .take(max)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn head(&self) -> u64 {
        *self.shared.head.borrow()
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    async fn delete_to(&self, stream: &StreamId, to_sequence: u64) -> Result<(), StoreError> {
        let mut state = self.state()?;
        let state = &mut *state;
        let Some(s) = state.streams.get_mut(stream) else {
            return Ok(());
        };
        let to = to_sequence.min(s.highest);
        if to <= s.deleted_to {
            return Ok(());
        }
        let kept = s.index.split_off(&(to + 1));
        for position in std::mem::replace(&mut s.index, kept).values() {
            state.log.remove(position);
        }
        s.deleted_to = to;
        Ok(())
    }

    async fn save_snapshot(&self, snapshot: SnapshotRecord) -> Result<(), StoreError> {
        check_stream(&snapshot.stream)?;
        check_size(snapshot.encode()?.len(), "snapshot")?;
        let mut state = self.state()?;
        state
            .streams
            .entry(snapshot.stream.clone())
            .or_default()
            .snapshots
            .insert(snapshot.sequence, snapshot);
        Ok(())
    }

    async fn latest_snapshot(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let state = self.state()?;
        Ok(state.streams.get(stream).and_then(|s| {
            s.snapshots
                .range(..=criteria.max_sequence)
                .rev()
                .map(|(_, r)| r)
                .find(|r| criteria.matches(r.sequence, r.timestamp_micros))
                .cloned()
        }))
    }

    async fn delete_snapshots(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<u64, StoreError> {
        let mut state = self.state()?;
        let Some(s) = state.streams.get_mut(stream) else {
            return Ok(0);
        };
        let before = s.snapshots.len();
        s.snapshots
            .retain(|_, r| !criteria.matches(r.sequence, r.timestamp_micros));
        Ok((before - s.snapshots.len()) as u64)
    }

    async fn command_records(&self, stream: &StreamId) -> Result<Vec<CommandRecord>, StoreError> {
        let state = self.state()?;
        Ok(state.streams.get(stream).map_or_else(Vec::new, |s| {
            s.commands
                .iter()
                .map(|((version, id), outcome)| CommandRecord {
                    command_id: *id,
                    version: *version,
                    outcome: outcome.clone(),
                })
                .collect()
        }))
    }

    async fn kv_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let state = self.state()?;
        Ok(state.kv.get(table).and_then(|t| t.get(key).cloned()))
    }

    async fn kv_scan(
        &self,
        table: &str,
        from: &[u8],
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let state = self.state()?;
        Ok(state.kv.get(table).map_or_else(Vec::new, |t| {
            t.range(from.to_vec()..)
                .take(max)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }))
    }

    async fn kv_commit(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        // Validate the whole batch first: a bad write must not leave the others applied.
        for write in &writes {
            match write {
                KvWrite::Put { table, value, .. } => {
                    keys::kv_prefix(table)?;
                    check_size(value.len(), "key-value entry")?;
                }
                KvWrite::Delete { table, .. } | KvWrite::Clear { table } => {
                    keys::kv_prefix(table)?;
                }
            }
        }
        let mut state = self.state()?;
        for write in writes {
            match write {
                KvWrite::Put { table, key, value } => {
                    state.kv.entry(table).or_default().insert(key, value);
                }
                KvWrite::Delete { table, key } => {
                    if let Some(t) = state.kv.get_mut(&table) {
                        t.remove(&key);
                    }
                }
                KvWrite::Clear { table } => {
                    state.kv.remove(&table);
                }
            }
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.state().map(|_| ())
    }

    async fn close(&self) -> Result<(), StoreError> {
        let mut state = self.state()?;
        state.closed = true;
        Ok(())
    }
}

/// Rejects the stream names the embedded store cannot key, so code tested here fails the same way
/// on disk.
fn check_stream(stream: &StreamId) -> Result<(), StoreError> {
    keys::stream_key(keys::META, stream).map(drop)
}

/// Rejects the records the embedded store rejects as too large.
fn check_size(len: usize, what: &str) -> Result<(), StoreError> {
    if len > MAX_RECORD_BYTES {
        return Err(StoreError::Invalid(format!(
            "{what} of {len} bytes exceeds the {MAX_RECORD_BYTES}-byte limit"
        )));
    }
    Ok(())
}
