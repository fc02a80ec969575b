//! The single writer of the embedded store.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::chain::{self, DirtyMetas};
use super::durable::DataFiles;
use super::log::{self, ChunkBuilder};
use super::{decode_log_record, Durability, SledStoreConfig, MAX_RECORD_BYTES};
use crate::domain::StreamId;
use crate::store::keys::{self, AppendEnd, LogRecord, StreamMeta};
use crate::store::{
    now_micros, AppendRequest, AppendResult, EventEnvelope, KvWrite, SnapshotCriteria,
    SnapshotRecord, StoreError,
};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A request to the committer.
pub(super) enum WriteOp {
    Append {
        request: AppendRequest,
        reply: Reply<AppendResult>,
    },
    DeleteTo {
        stream: StreamId,
        to_sequence: u64,
        reply: Reply<()>,
    },
    SaveSnapshot {
        snapshot: SnapshotRecord,
        reply: Reply<()>,
    },
    DeleteSnapshots {
        stream: StreamId,
        criteria: SnapshotCriteria,
        reply: Reply<u64>,
    },
    Kv {
        writes: Vec<KvWrite>,
        reply: Reply<()>,
    },
    Flush {
        reply: Reply<()>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

impl WriteOp {
    /// How much of a batch this request uses.
    fn weight(&self) -> usize {
        match self {
            WriteOp::Append { request, .. } => request.events.len().max(1),
            WriteOp::Kv { writes, .. } => writes.len().max(1),
            _ => 1,
        }
    }

    /// Whether this request reads the tree to decide its writes, so it must see every earlier
    /// write applied: it starts a batch of its own.
    fn reads_tree(&self) -> bool {
        match self {
            WriteOp::DeleteTo { .. } | WriteOp::DeleteSnapshots { .. } => true,
            WriteOp::Kv { writes, .. } => writes.iter().any(|w| matches!(w, KvWrite::Clear { .. })),
            _ => false,
        }
    }
}

/// A reply waiting for its batch to become durable.
enum Pending {
    Append(Reply<AppendResult>, Result<AppendResult, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Count(Reply<u64>, Result<u64, StoreError>),
}

impl Pending {
    /// Replaces a planned success with `err` (the batch failed to commit).
    fn fail(self, err: &StoreError) -> Self {
        let e = || StoreError::Storage(err.to_string());
        match self {
            Pending::Append(tx, Ok(_)) => Pending::Append(tx, Err(e())),
            Pending::Unit(tx, Ok(())) => Pending::Unit(tx, Err(e())),
            Pending::Count(tx, Ok(_)) => Pending::Count(tx, Err(e())),
            other => other,
        }
    }

    fn send(self) {
        // A caller that stopped waiting is no error of the store's.
        match self {
            Pending::Append(tx, r) => drop(tx.send(r)),
            Pending::Unit(tx, r) => drop(tx.send(r)),
            Pending::Count(tx, r) => drop(tx.send(r)),
        }
    }
}

pub(super) struct Committer {
    db: sled::Db,
    tree: sled::Tree,
    files: Arc<DataFiles>,
    config: SledStoreConfig,
    head: u64,
    /// Publishes heads and sends replies once a batch is as durable as configured.
    acks: Acks,
    /// Stream metadata of recently written streams. The committer is the only writer, so the
    /// cache is always exact; it saves a tree read per append. Holds every dirty stream.
    metas: HashMap<Vec<u8>, StreamMeta, foldhash::fast::RandomState>,
    /// Streams whose `M` record is behind, shared with readers.
    dirty: Arc<DirtyMetas>,
    /// The dirty streams by the position of their first unwritten event, oldest first: the
    /// oldest bounds the meta checkpoint.
    dirty_order: VecDeque<(u64, Vec<u8>)>,
    /// The position up to which every `M` record is written, as stored under `H`.
    meta_checkpoint: u64,
    /// Events committed whose share of `M` writes (one per [`EVENTS_PER_META_WRITE`]) is not
    /// yet spent: commits are often smaller than that, and a per-commit minimum would make the
    /// metadata cost more sled inserts than the events themselves.
    meta_credit: usize,
    /// Why the store stopped taking writes: a plain commit failed part-way, so the tree holds
    /// part of it until a reopen repairs the log's tail.
    failed: Option<String>,
}

/// Streams whose metadata the committer keeps in memory before it drops the clean ones.
const META_CACHE: usize = 1 << 20;

/// How far (in events) the meta checkpoint may trail the head before a commit writes every dirty
/// stream's metadata: it bounds the log replayed when the store opens.
const META_LAG: u64 = 1 << 18;

/// Committed events per `M` record written, outside flushes: the dirty set drains at this rate
/// while keeping the random-key inserts a small share of the work. With `D` streams dirty, the
/// checkpoint trails the head by about `D * EVENTS_PER_META_WRITE` events (or [`META_LAG`]).
const EVENTS_PER_META_WRITE: usize = 8;

/// One planned write: a value to insert, or `None` to remove the key.
type Write = (sled::IVec, Option<Vec<u8>>);

/// The writes of one group commit, planned before they are applied.
struct Plan {
    /// In the order the plain path inserts them (see [`Committer::commit`]).
    writes: Vec<Write>,
    /// Whether the writes must be applied as one atomic batch: deletions, snapshots and
    /// key-value writes have no recovery of their own for a partial commit.
    atomic: bool,
    /// Stream metadata as this batch leaves it, so several appends to one stream in one batch
    /// see each other.
    metas: HashMap<Vec<u8>, StreamMeta, foldhash::fast::RandomState>,
    /// Streams this batch dirtied, with the position of their first event in it.
    newly_dirty: Vec<(u64, Vec<u8>)>,
    events: usize,
    next_head: u64,
    replies: Vec<Pending>,
    dirty: bool,
    force_sync: bool,
    /// Streams whose deletion watermark this batch raises.
    deletions: Vec<Vec<u8>>,
    /// One append's index entries and command records before they join `followers` (all or
    /// none of them do); kept to reuse its buffer across the appends of a commit.
    rows: Vec<Write>,
    /// One append's log records with their index entries, likewise.
    records: Vec<(u64, Vec<u8>, Option<Write>)>,
    /// The log records of the appends planned since the last chunk was closed.
    chunk: ChunkBuilder,
    /// The index entries and command records of those appends, written right after their chunk.
    followers: Vec<Write>,
}

impl Plan {
    /// Closes the chunk being filled: its value joins the writes, then its followers. The
    /// plain path writes them in this order, chunk by chunk, so a crash leaves at most the last
    /// chunk without its followers, which `repair.rs` writes again from it.
    fn close_chunk(&mut self) {
        if let Some((key, value)) = self.chunk.take() {
            self.writes.push((key, Some(value)));
        }
        self.writes.append(&mut self.followers);
    }
}

impl Committer {
    pub(super) fn new(
        db: sled::Db,
        tree: sled::Tree,
        files: Arc<DataFiles>,
        config: SledStoreConfig,
        head: u64,
        head_tx: watch::Sender<u64>,
        dirty: Arc<DirtyMetas>,
    ) -> Self {
        Self {
            db,
            tree,
            files,
            config,
            head,
            acks: Acks::Inline(head_tx),
            metas: HashMap::default(),
            dirty,
            dirty_order: VecDeque::new(),
            meta_checkpoint: 0,
            meta_credit: 0,
            failed: None,
        }
    }

    /// Rebuilds the metadata of streams written after the meta checkpoint from the log, so the
    /// store continues exactly where the last commit left it. An undecodable record in that
    /// stretch fails the open: its stream cannot be known, so neither can its head.
    pub(super) fn recover(&mut self) -> Result<(), StoreError> {
        self.meta_checkpoint = match self.tree.get(keys::META_CHECKPOINT)? {
            Some(bytes) => keys::trailing_u64(&bytes).unwrap_or(0),
            None => 0,
        };
        let tree = self.tree.clone();
        for item in log::records_in(&tree, self.meta_checkpoint.saturating_add(1)..=self.head)? {
            let (position, record) = item?;
            let EventEnvelope {
                stream,
                sequence,
                event_id,
                ..
            } = decode_log_record(&record, position)?;
            let meta_key = keys::stream_key(keys::META, &stream)?;
            let mut meta = match self.metas.get(&meta_key) {
                Some(meta) => *meta,
                None => chain::stored_meta(&self.tree, &meta_key, &stream)?,
            };
            if sequence > meta.highest {
                meta.highest = sequence;
                meta.last_position = position;
                meta.last_event = Some(event_id);
            }
            if !self.dirty.contains_key(&meta_key) {
                self.dirty_order.push_back((position, meta_key.clone()));
            }
            self.dirty.insert(meta_key.clone(), meta);
            self.metas.insert(meta_key, meta);
        }
        if !self.dirty_order.is_empty() {
            tracing::info!(
                streams = self.dirty_order.len(),
                events = self.head - self.meta_checkpoint,
                "rebuilt stream metadata from the log"
            );
        }
        Ok(())
    }

    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<WriteOp>) {
        let flusher = self.start_flusher();
        if self.config.durability == Durability::Sync {
            self.start_syncer();
        }
        let mut carried: Option<WriteOp> = None;
        let mut shutdown: Option<Reply<()>> = None;
        // Reused by every commit: a group can hold thousands of requests.
        let mut ops: Vec<WriteOp> = Vec::new();
        while shutdown.is_none() {
            let Some(first) = carried.take().or_else(|| rx.blocking_recv()) else {
                break;
            };
            ops.push(first);
            let mut weight = ops.iter().map(WriteOp::weight).sum::<usize>();
            let solo = ops.iter().any(WriteOp::reads_tree);
            while !solo && weight < self.config.max_batch {
                match rx.try_recv() {
                    Ok(op) if op.reads_tree() => {
                        carried = Some(op);
                        break;
                    }
                    Ok(op) => {
                        weight += op.weight();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            let mut plan = Plan {
                writes: Vec::with_capacity(ops.len() * 2),
                atomic: false,
                metas: HashMap::default(),
                newly_dirty: Vec::new(),
                events: 0,
                next_head: self.head,
                replies: Vec::with_capacity(ops.len()),
                dirty: false,
                force_sync: false,
                deletions: Vec::new(),
                rows: Vec::new(),
                records: Vec::new(),
                chunk: ChunkBuilder::default(),
                followers: Vec::new(),
            };
            for op in ops.drain(..) {
                match op {
                    WriteOp::Shutdown { reply } => {
                        plan.force_sync = true;
                        shutdown = Some(reply);
                    }
                    op => self.plan(op, &mut plan),
                }
            }
            self.commit(plan);
        }
        // Refuse whatever is still queued, then make everything durable before the handles go.
        rx.close();
        while let Ok(op) = rx.try_recv() {
            reject(op, || StoreError::Closed);
        }
        drop(flusher);
        // Every batch the syncer holds is synced and answered before the last sync.
        if let Acks::Syncer { tx, handle, .. } = std::mem::replace(&mut self.acks, Acks::Closed) {
            drop(tx);
            if handle.join().is_err() {
                tracing::error!("the syncer thread panicked");
            }
        }
        let result = self.sync();
        if let Some(reply) = shutdown {
            let _ = reply.send(result);
        }
    }

    /// In `sync` mode, the thread that makes applied batches durable and answers them, so the
    /// next batch is applied while the previous one is being synced; batches applied during a
    /// sync share the next one.
    fn start_syncer(&mut self) {
        let files = self.files.clone();
        let (tx, rx) = std_mpsc::channel::<Applied>();
        let db = self.db.clone();
        let Acks::Inline(head_tx) = &self.acks else {
            return;
        };
        let head_tx = head_tx.clone();
        let thread_head_tx = head_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("incarnate-syncer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    group.extend(rx.try_iter());
                    finish(group, Some(&thread_head_tx), files.flush_and_sync(&db));
                }
            });
        match spawned {
            Ok(handle) => {
                self.acks = Acks::Syncer {
                    tx,
                    handle,
                    head_tx,
                };
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the syncer thread; syncing on the committer");
            }
        }
    }

    /// In `buffered` mode, a thread that flushes and fsyncs on a timer; it stops when the
    /// returned sender is dropped.
    fn start_flusher(&self) -> Option<std_mpsc::Sender<()>> {
        let Durability::Buffered { flush_interval_ms } = self.config.durability else {
            return None;
        };
        let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
        let db = self.db.clone();
        let files = self.files.clone();
        let interval = Duration::from_millis(flush_interval_ms.max(1));
        let spawned = std::thread::Builder::new()
            .name("incarnate-flusher".into())
            .spawn(move || {
                while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval)
                {
                    if let Err(e) = files.flush_and_sync(&db) {
                        tracing::error!(error = %e, "background flush failed");
                    }
                }
            });
        match spawned {
            Ok(_) => Some(stop_tx),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the flusher thread; relying on explicit flushes");
                None
            }
        }
    }

    /// Flush sled's buffers, then fsync the data file (see `SledStore::open` for why both).
    fn sync(&self) -> Result<(), StoreError> {
        self.files.flush_and_sync(&self.db)
    }

    fn plan(&mut self, op: WriteOp, plan: &mut Plan) {
        if let Some(reason) = &self.failed {
            let reason = format!("the store failed a write and must be reopened: {reason}");
            return reject(op, || StoreError::Storage(reason.clone()));
        }
        match op {
            WriteOp::Append { request, reply } => {
                let result = self.plan_append(request, plan);
                plan.replies.push(Pending::Append(reply, result));
            }
            WriteOp::DeleteTo {
                stream,
                to_sequence,
                reply,
            } => {
                let result = self.plan_delete_to(&stream, to_sequence, plan);
                plan.replies.push(Pending::Unit(reply, result));
            }
            WriteOp::SaveSnapshot { snapshot, reply } => {
                let result = keys::stream_key(keys::SNAPSHOT, &snapshot.stream).and_then(|base| {
                    let bytes = snapshot.encode()?;
                    check_size(bytes.len(), "snapshot")?;
                    plan.writes
                        .push((keys::with_u64(&base, snapshot.sequence).into(), Some(bytes)));
                    plan.atomic = true;
                    plan.dirty = true;
                    Ok(())
                });
                plan.replies.push(Pending::Unit(reply, result));
            }
            WriteOp::DeleteSnapshots {
                stream,
                criteria,
                reply,
            } => {
                let result = self.plan_delete_snapshots(&stream, criteria, plan);
                plan.replies.push(Pending::Count(reply, result));
            }
            WriteOp::Kv { writes, reply } => {
                let result = self.plan_kv(writes, plan);
                plan.replies.push(Pending::Unit(reply, result));
            }
            WriteOp::Flush { reply } => {
                plan.force_sync = true;
                plan.replies.push(Pending::Unit(reply, Ok(())));
            }
            WriteOp::Shutdown { reply } => {
                plan.force_sync = true;
                plan.replies.push(Pending::Unit(reply, Ok(())));
            }
        }
    }

    fn meta(
        &self,
        plan: &Plan,
        meta_key: &[u8],
        stream: &StreamId,
    ) -> Result<StreamMeta, StoreError> {
        match plan
            .metas
            .get(meta_key)
            .or_else(|| self.metas.get(meta_key))
        {
            Some(meta) => Ok(*meta),
            None => chain::read_meta(&self.tree, &self.dirty, meta_key, stream),
        }
    }

    /// The id of the stream's last event: known in memory when this committer wrote or replayed
    /// it, read from the log otherwise (`None` when the stream has no event left).
    fn last_event(&self, meta: &StreamMeta) -> Result<Option<uuid::Uuid>, StoreError> {
        if meta.last_event.is_some() || meta.last_position == 0 {
            return Ok(meta.last_event);
        }
        match log::record_at(&self.tree, meta.last_position)? {
            Some(bytes) => Ok(Some(
                decode_log_record(&bytes, meta.last_position)?.event_id,
            )),
            None => Ok(None),
        }
    }

    fn plan_append(
        &self,
        request: AppendRequest,
        plan: &mut Plan,
    ) -> Result<AppendResult, StoreError> {
        let AppendRequest {
            stream,
            expected_version,
            events,
            record_commands,
            forget_commands,
            expected_last_event,
        } = request;
        let meta_key = keys::stream_key(keys::META, &stream)?;
        let mut meta = self.meta(plan, &meta_key, &stream)?;
        let chained = match expected_last_event {
            None => true,
            Some(id) => self.last_event(&meta)? == Some(id),
        };
        if meta.highest != expected_version || !chained {
            return Err(StoreError::Conflict {
                stream,
                expected: expected_version,
                actual: meta.highest,
            });
        }
        let mut last_event = meta.last_event;
        // Encode everything before touching the plan's writes, so a failure leaves no partial
        // append.
        // Only an append that reaches a multiple of the stride writes an index entry.
        let last = meta.highest + events.len() as u64;
        let index_base = if last / keys::INDEX_STRIDE > meta.highest / keys::INDEX_STRIDE {
            keys::stream_key(keys::STREAM, &stream)?
        } else {
            Vec::new()
        };
        let timestamp = now_micros();
        // The closing record carries the command records too: the plain path writes the
        // separate ones after it, and a crash in between must not lose them (`repair.rs`).
        let embedded = if record_commands.is_empty() || events.is_empty() {
            Vec::new()
        } else {
            rmp_serde::to_vec(&record_commands).map_err(|source| StoreError::Encode {
                what: "command records",
                source,
            })?
        };
        // The records join the commit's chunk and the other rows follow it (see
        // `Plan::close_chunk`); the closing record of each append embeds its command records,
        // so a crash between the chunk and its followers cannot lose them. Keys of up to 22
        // bytes (every index key of a short stream name) are stored inline in an `IVec`.
        // Taken from the plan (and given back) to reuse their buffers; a rejected append
        // leaves them empty.
        let (mut rows, mut records) = (
            std::mem::take(&mut plan.rows),
            std::mem::take(&mut plan.records),
        );
        rows.clear();
        records.clear();
        let first_position = plan.next_head + 1;
        let mut position = plan.next_head;
        let mut sequence = meta.highest;
        let mut previous = meta.last_position;
        let count = events.len();
        for (i, event) in events.into_iter().enumerate() {
            sequence += 1;
            position += 1;
            last_event = Some(event.event_id);
            let envelope =
                EventEnvelope::from_new(event, stream.clone(), sequence, position, timestamp);
            let end = if i + 1 == count {
                AppendEnd::Closes(&embedded)
            } else {
                AppendEnd::Continues
            };
            let mut record =
                LogRecord { sequence, previous }.start(end, envelope.encoded_len_hint())?;
            envelope.encode_into(&mut record)?;
            check_size(record.len(), "event")?;
            let index = (sequence % keys::INDEX_STRIDE == 0).then(|| {
                (
                    keys::with_u64(&index_base, sequence).into(),
                    Some(position.to_be_bytes().to_vec()),
                )
            });
            records.push((position, record, index));
            previous = position;
        }
        let command_base = if record_commands.is_empty() && forget_commands.is_empty() {
            Vec::new()
        } else {
            keys::stream_key(keys::COMMAND, &stream)?
        };
        for record in &record_commands {
            rows.push((
                keys::command_key(&command_base, record.version, record.command_id).into(),
                Some(record.encode()?),
            ));
        }
        for (version, id) in forget_commands {
            rows.push((keys::command_key(&command_base, version, id).into(), None));
        }
        // An append that does not fit the open chunk starts the next one, and one too big for
        // any chunk spreads over several: its records before the closing one say `Continues`,
        // so `repair.rs` removes what a crash leaves of it. Its index entries and command
        // records follow the chunk it closes in.
        let size: usize = records.iter().map(|(_, r, _)| log::chunked_size(r)).sum();
        if !plan.chunk.fits(size) {
            plan.close_chunk();
        }
        let mut indexes = Vec::new();
        for (position, record, index) in records.drain(..) {
            if !plan.chunk.fits(log::chunked_size(&record)) {
                plan.close_chunk();
            }
            plan.chunk.push(position, record);
            indexes.extend(index);
        }
        plan.followers.append(&mut indexes);
        plan.followers.append(&mut rows);
        (plan.rows, plan.records) = (rows, records);
        let result = AppendResult {
            first_sequence: meta.highest + 1,
            last_sequence: sequence,
            first_position,
            last_position: position,
        };
        if sequence != meta.highest {
            plan.events += (sequence - meta.highest) as usize;
            meta.highest = sequence;
            meta.last_position = position;
            meta.last_event = last_event;
            if !plan.metas.contains_key(&meta_key) && !self.dirty.contains_key(&meta_key) {
                plan.newly_dirty.push((first_position, meta_key.clone()));
            }
            plan.metas.insert(meta_key, meta);
        }
        plan.next_head = position;
        plan.dirty = true;
        Ok(result)
    }

    fn plan_delete_to(
        &self,
        stream: &StreamId,
        to_sequence: u64,
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        let meta_key = keys::stream_key(keys::META, stream)?;
        let mut meta = self.meta(plan, &meta_key, stream)?;
        let to = to_sequence.min(meta.highest);
        if to <= meta.deleted_to {
            return Ok(());
        }
        let walk = chain::walk(&self.tree, stream, &meta, meta.deleted_to + 1, to)?;
        let mut doomed: Vec<u64> = walk.hops.iter().map(|hop| hop.position).collect();
        if let Some((sequence, position, err)) = walk.broken {
            // The chain cannot be followed below a corrupt or missing record: remove what it
            // reaches (the corrupt record included) and leave the older, unreachable events in
            // the log. The stream reads correctly either way: its window starts above `to`.
            if sequence <= to {
                doomed.push(position);
            }
            tracing::warn!(
                %stream, sequence, error = %err,
                "deleting past a broken chain: earlier events stay in the global log"
            );
        }
        doomed.sort_unstable();
        plan.writes.extend(log::removals(&self.tree, &doomed)?);
        let base = keys::stream_key(keys::STREAM, stream)?;
        let range = keys::with_u64(&base, meta.deleted_to + 1)..=keys::with_u64(&base, to);
        for item in self.tree.range(range) {
            let (key, _) = item?;
            plan.writes.push((key, None));
        }
        meta.deleted_to = to;
        plan.writes
            .push((meta_key.as_slice().into(), Some(meta.encode().to_vec())));
        plan.atomic = true;
        plan.deletions.push(meta_key.clone());
        plan.metas.insert(meta_key, meta);
        plan.dirty = true;
        Ok(())
    }

    fn plan_delete_snapshots(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
        plan: &mut Plan,
    ) -> Result<u64, StoreError> {
        let base = keys::stream_key(keys::SNAPSHOT, stream)?;
        let upper = keys::with_u64(&base, criteria.max_sequence);
        // Collect first: an undecodable snapshot must not leave half the deletions planned.
        let mut doomed = Vec::new();
        for item in self.tree.range(base.clone()..=upper) {
            let (key, value) = item?;
            // Without a time bound the key alone decides, so an undecodable snapshot can still
            // be deleted (retention would otherwise fail on it forever).
            let matches = criteria.max_timestamp_micros == u64::MAX || {
                let sequence = keys::trailing_u64(&key).unwrap_or(0);
                let record = SnapshotRecord::decode(&value, stream, sequence)?;
                criteria.matches(record.sequence, record.timestamp_micros)
            };
            if matches {
                doomed.push(key);
            }
        }
        let deleted = doomed.len() as u64;
        plan.writes
            .extend(doomed.into_iter().map(|key| (key, None)));
        plan.atomic |= deleted > 0;
        plan.dirty |= deleted > 0;
        Ok(deleted)
    }

    fn plan_kv(&self, writes: Vec<KvWrite>, plan: &mut Plan) -> Result<(), StoreError> {
        // Build into a scratch batch first: a bad table name must not leave half the writes.
        let mut rows: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(writes.len());
        for write in writes {
            match write {
                KvWrite::Put { table, key, value } => {
                    check_size(value.len(), "key-value entry")?;
                    let mut full = keys::kv_prefix(&table)?;
                    full.extend_from_slice(&key);
                    rows.push((full, Some(value)));
                }
                KvWrite::Delete { table, key } => {
                    let mut full = keys::kv_prefix(&table)?;
                    full.extend_from_slice(&key);
                    rows.push((full, None));
                }
                KvWrite::Clear { table } => {
                    for item in self.tree.scan_prefix(keys::kv_prefix(&table)?) {
                        let (key, _) = item?;
                        rows.push((key.to_vec(), None));
                    }
                }
            }
        }
        plan.writes
            .extend(rows.into_iter().map(|(key, value)| (key.into(), value)));
        plan.atomic = true;
        plan.dirty = true;
        Ok(())
    }

    /// Writes the plan (see [`Self::apply`]), makes it durable as configured, publishes the new
    /// head and replies. Replies go out only after the head moved, so a caller that reads the log after
    /// its append always sees it.
    fn commit(&mut self, mut plan: Plan) {
        plan.close_chunk();
        let metas_written = self.plan_meta_writes(&mut plan);
        let mut outcome: Result<(), StoreError> = Ok(());
        let mut applied = false;
        // A deletion's watermark reaches readers before its records go, so a reader that finds
        // records missing finds the watermark that explains them (streams without unwritten
        // metadata get both in the same atomic batch, through their `M` record).
        let raised = self.publish_raised_watermarks(&plan);
        if plan.dirty {
            if !plan.deletions.is_empty() {
                // Removed records may include the log's last: the head must outlive them.
                plan.writes.push((
                    keys::HEAD.into(),
                    Some(plan.next_head.to_be_bytes().to_vec()),
                ));
            }
            let written;
            (outcome, written) = self.apply(&mut plan);
            applied = outcome.is_ok();
            if !applied && written > 0 {
                // Part of a plain commit is in the tree and may reach the disk: its positions
                // are taken, and only a reopen (which repairs the log's tail) makes the store
                // whole again.
                self.head = plan.next_head;
                self.failed = outcome.as_ref().err().map(ToString::to_string);
            }
        }
        // Once applied, the batch's positions are taken whatever the fsync says: reusing them
        // would overwrite events that may already be on disk. Its callers still get an error,
        // because its durability is unknown.
        if applied {
            self.metas_applied(&mut plan, metas_written);
            self.head = plan.next_head;
        } else {
            for (key, deleted_to) in raised {
                if let Some(mut meta) = self.dirty.get_mut(&key) {
                    meta.deleted_to = deleted_to;
                }
            }
        }
        let must_sync =
            plan.force_sync || (plan.dirty && self.config.durability == Durability::Sync);
        let done = Applied {
            head: applied.then_some(self.head),
            outcome,
            replies: plan.replies,
        };
        match &self.acks {
            Acks::Syncer { tx, .. } if must_sync && done.outcome.is_ok() => {
                if let Err(std_mpsc::SendError(done)) = tx.send(done) {
                    let err = StoreError::Storage("the syncer thread is gone".into());
                    finish(vec![done], self.acks.head_tx(), Err(err));
                }
            }
            acks => {
                let synced = if must_sync && done.outcome.is_ok() {
                    self.sync()
                } else {
                    Ok(())
                };
                finish(vec![done], acks.head_tx(), synced);
            }
        }
    }

    /// Writes the plan's rows: as one atomic `apply_batch` where the plan needs it, else as
    /// single inserts in the plan's order. sled makes every batch roll and write an I/O buffer
    /// (and wait for it to be handed over), which costs a small commit more than its inserts;
    /// single inserts share buffers across commits, and `repair.rs` completes or removes an
    /// append a crash cut. Returns the outcome and how many rows reached the tree.
    fn apply(&self, plan: &mut Plan) -> (Result<(), StoreError>, usize) {
        if plan.atomic {
            let mut batch = sled::Batch::default();
            for (key, value) in plan.writes.drain(..) {
                match value {
                    Some(value) => batch.insert(key, value),
                    None => batch.remove(key),
                }
            }
            return (self.tree.apply_batch(batch).map_err(StoreError::from), 0);
        }
        for (written, (key, value)) in plan.writes.drain(..).enumerate() {
            let done = match value {
                Some(value) => self.tree.insert(key, value).map(drop),
                None => self.tree.remove(key).map(drop),
            };
            if let Err(e) = done {
                return (Err(e.into()), written);
            }
        }
        (Ok(()), 0)
    }

    /// Raises the deletion watermark readers see for the dirty streams whose watermark `plan`
    /// raises; returns the previous values, to restore if the plan is not applied.
    fn publish_raised_watermarks(&self, plan: &Plan) -> Vec<(Vec<u8>, u64)> {
        let mut raised = Vec::new();
        for key in &plan.deletions {
            let Some(meta) = plan.metas.get(key) else {
                continue;
            };
            if let Some(mut shared) = self.dirty.get_mut(key) {
                if meta.deleted_to > shared.deleted_to {
                    raised.push((key.clone(), shared.deleted_to));
                    shared.deleted_to = meta.deleted_to;
                }
            }
        }
        raised
    }

    /// Adds the `M` records of the oldest dirty streams to the batch, and the meta checkpoint
    /// they allow: one per [`EVENTS_PER_META_WRITE`] committed events, counted across commits,
    /// so the random-key inserts stay a small share of the work; every one when the checkpoint
    /// trails the head by more than [`META_LAG`] or on flush and shutdown. Returns how many
    /// queued streams it wrote (`usize::MAX`: all, including this batch's).
    fn plan_meta_writes(&self, plan: &mut Plan) -> usize {
        let oldest = self.dirty_order.front().map(|(since, _)| *since);
        let lagging = oldest.is_some_and(|since| plan.next_head - since >= META_LAG);
        let write_all = plan.force_sync || lagging;
        let count = if write_all {
            self.dirty_order.len()
        } else {
            ((self.meta_credit + plan.events) / EVENTS_PER_META_WRITE).min(self.dirty_order.len())
        };
        let current = |key: &Vec<u8>| plan.metas.get(key).or_else(|| self.metas.get(key)).copied();
        let mut rows = Vec::new();
        for (_, key) in self.dirty_order.iter().take(count) {
            if let Some(meta) = current(key) {
                rows.push((key.clone(), meta.encode().to_vec()));
            }
        }
        if write_all {
            for (_, key) in &plan.newly_dirty {
                if let Some(meta) = current(key) {
                    rows.push((key.clone(), meta.encode().to_vec()));
                }
            }
        }
        let first_unwritten = match self.dirty_order.get(count) {
            Some((since, _)) => Some(*since),
            None if write_all => None,
            None => plan.newly_dirty.first().map(|(since, _)| *since),
        };
        let checkpoint = first_unwritten.map_or(plan.next_head, |since| since - 1);
        if !rows.is_empty() || checkpoint != self.meta_checkpoint {
            // After every log record they describe, so a crash that keeps them kept those too;
            // the checkpoint last, after the records it vouches for.
            plan.writes.extend(
                rows.into_iter()
                    .map(|(key, value)| (key.into(), Some(value))),
            );
            plan.writes.push((
                keys::META_CHECKPOINT.into(),
                Some(checkpoint.to_be_bytes().to_vec()),
            ));
            plan.dirty = true;
        }
        if write_all {
            usize::MAX
        } else {
            count
        }
    }

    /// Brings the in-memory metadata in line with an applied batch that wrote `written` of the
    /// queued streams' `M` records (see [`Self::plan_meta_writes`]).
    fn metas_applied(&mut self, plan: &mut Plan, written: usize) {
        let all = written == usize::MAX;
        let written = written.min(self.dirty_order.len());
        self.meta_credit = if all || written == self.dirty_order.len() {
            // Nothing older is left to write: credit saved now would only burst later.
            0
        } else {
            (self.meta_credit + plan.events).saturating_sub(written * EVENTS_PER_META_WRITE)
        };
        for (_, key) in self.dirty_order.drain(..written) {
            self.dirty.remove(&key);
        }
        if !all {
            for (since, key) in plan.newly_dirty.drain(..) {
                if let Some(meta) = plan.metas.get(&key) {
                    self.dirty.insert(key.clone(), *meta);
                    self.dirty_order.push_back((since, key));
                }
            }
        }
        self.meta_checkpoint = self
            .dirty_order
            .front()
            .map_or(plan.next_head, |(since, _)| since - 1);
        for (key, meta) in &plan.metas {
            if let Some(mut entry) = self.dirty.get_mut(key) {
                *entry = *meta;
            }
        }
        if self.metas.len() + plan.metas.len() > META_CACHE {
            // Dirty streams must stay: their metadata exists nowhere else.
            let dirty = &self.dirty;
            self.metas.retain(|key, _| dirty.contains_key(key));
        }
        self.metas.extend(plan.metas.drain());
    }
}

/// Where applied batches go to be acknowledged.
enum Acks {
    /// Synced (when needed) and answered by the committer itself.
    Inline(watch::Sender<u64>),
    /// Handed to the syncer thread (`sync` mode).
    Syncer {
        tx: std_mpsc::Sender<Applied>,
        handle: std::thread::JoinHandle<()>,
        head_tx: watch::Sender<u64>,
    },
    /// Shutting down: the syncer has stopped.
    Closed,
}

impl Acks {
    fn head_tx(&self) -> Option<&watch::Sender<u64>> {
        match self {
            Acks::Inline(head_tx) | Acks::Syncer { head_tx, .. } => Some(head_tx),
            Acks::Closed => None,
        }
    }
}

/// A batch the committer has applied (or failed to), waiting to be acknowledged.
struct Applied {
    /// The head after it, if it was applied.
    head: Option<u64>,
    outcome: Result<(), StoreError>,
    replies: Vec<Pending>,
}

/// Acknowledges `group` (applied in order) once `synced` says whether the sync covering it
/// worked: publishes the new head, then replies, so a caller that reads the log after its
/// append always sees it.
fn finish(
    group: Vec<Applied>,
    head_tx: Option<&watch::Sender<u64>>,
    synced: Result<(), StoreError>,
) {
    if let (Some(head), Some(head_tx)) = (group.iter().filter_map(|a| a.head).max(), head_tx) {
        head_tx.send_if_modified(|current| {
            let moved = head > *current;
            *current = (*current).max(head);
            moved
        });
    }
    for applied in group {
        match applied.outcome.and_then(|()| match &synced {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::Storage(e.to_string())),
        }) {
            Ok(()) => applied.replies.into_iter().for_each(Pending::send),
            Err(err) => {
                tracing::error!(error = %err, "commit failed");
                applied
                    .replies
                    .into_iter()
                    .for_each(|p| p.fail(&err).send());
            }
        }
    }
}

fn check_size(len: usize, what: &str) -> Result<(), StoreError> {
    if len > MAX_RECORD_BYTES {
        return Err(StoreError::Invalid(format!(
            "{what} of {len} bytes exceeds the {MAX_RECORD_BYTES}-byte limit"
        )));
    }
    Ok(())
}

/// Answers `op` with `err()` without doing it.
fn reject(op: WriteOp, err: impl Fn() -> StoreError) {
    match op {
        WriteOp::Append { reply, .. } => drop(reply.send(Err(err()))),
        WriteOp::DeleteSnapshots { reply, .. } => drop(reply.send(Err(err()))),
        WriteOp::DeleteTo { reply, .. }
        | WriteOp::SaveSnapshot { reply, .. }
        | WriteOp::Kv { reply, .. }
        | WriteOp::Flush { reply }
        | WriteOp::Shutdown { reply } => drop(reply.send(Err(err()))),
    }
}
