//! The single writer of the embedded store.

use std::collections::HashMap;
use std::fs::File;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::{read_meta, Durability, SledStoreConfig, MAX_RECORD_BYTES};
use crate::domain::StreamId;
use crate::store::keys::{self, StreamMeta};
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
    data_file: File,
    config: SledStoreConfig,
    head: u64,
    head_tx: watch::Sender<u64>,
    /// Stream metadata of recently written streams. The committer is the only writer, so the
    /// cache is always exact; it saves a tree read per append.
    metas: HashMap<Vec<u8>, StreamMeta>,
}

/// Streams whose metadata the committer keeps in memory before it starts over.
const META_CACHE: usize = 1 << 20;

/// The writes of one group commit, planned before they are applied.
struct Plan {
    batch: sled::Batch,
    /// Stream metadata as this batch leaves it, so several appends to one stream in one batch
    /// see each other.
    metas: HashMap<Vec<u8>, StreamMeta>,
    next_head: u64,
    replies: Vec<Pending>,
    dirty: bool,
    force_sync: bool,
}

impl Committer {
    pub(super) fn new(
        db: sled::Db,
        tree: sled::Tree,
        data_file: File,
        config: SledStoreConfig,
        head: u64,
        head_tx: watch::Sender<u64>,
    ) -> Self {
        Self {
            db,
            tree,
            data_file,
            config,
            head,
            head_tx,
            metas: HashMap::new(),
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<WriteOp>) {
        let flusher = self.start_flusher();
        let mut carried: Option<WriteOp> = None;
        let mut shutdown: Option<Reply<()>> = None;
        while shutdown.is_none() {
            let Some(first) = carried.take().or_else(|| rx.blocking_recv()) else {
                break;
            };
            let mut ops = vec![first];
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
                batch: sled::Batch::default(),
                metas: HashMap::new(),
                next_head: self.head,
                replies: Vec::with_capacity(ops.len()),
                dirty: false,
                force_sync: false,
            };
            for op in ops {
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
            reject_closed(op);
        }
        drop(flusher);
        let result = self.sync();
        if let Some(reply) = shutdown {
            let _ = reply.send(result);
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
        let file = self.data_file.try_clone().ok()?;
        let interval = Duration::from_millis(flush_interval_ms.max(1));
        let spawned = std::thread::Builder::new()
            .name("incarnate-flusher".into())
            .spawn(move || {
                while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval)
                {
                    if let Err(e) = db
                        .flush()
                        .map_err(StoreError::from)
                        .and_then(|_| file.sync_data().map_err(StoreError::from))
                    {
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
        self.db.flush()?;
        self.data_file.sync_data()?;
        Ok(())
    }

    fn plan(&mut self, op: WriteOp, plan: &mut Plan) {
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
                    plan.batch
                        .insert(keys::with_u64(&base, snapshot.sequence), bytes);
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
            None => read_meta(&self.tree, meta_key, stream),
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
        } = request;
        let meta_key = keys::stream_key(keys::META, &stream)?;
        let mut meta = self.meta(plan, &meta_key, &stream)?;
        if meta.highest != expected_version {
            return Err(StoreError::Conflict {
                stream,
                expected: expected_version,
                actual: meta.highest,
            });
        }
        // Encode everything before touching the batch, so a failure leaves no partial append.
        let index_base = keys::stream_key(keys::STREAM, &stream)?;
        let command_base = keys::stream_key(keys::COMMAND, &stream)?;
        let timestamp = now_micros();
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> =
            Vec::with_capacity(events.len() * 2 + record_commands.len() + 2);
        let mut position = plan.next_head;
        let mut sequence = meta.highest;
        for event in events {
            sequence += 1;
            position += 1;
            let envelope =
                EventEnvelope::from_new(event, stream.clone(), sequence, position, timestamp);
            let bytes = envelope.encode()?;
            check_size(bytes.len(), "event")?;
            rows.push((keys::log_key(position).to_vec(), bytes));
            rows.push((
                keys::with_u64(&index_base, sequence),
                position.to_be_bytes().to_vec(),
            ));
        }
        for record in &record_commands {
            let mut key = keys::with_u64(&command_base, record.version);
            key.extend_from_slice(record.command_id.as_bytes());
            rows.push((key, record.encode()?));
        }
        for (k, v) in rows {
            plan.batch.insert(k, v);
        }
        for (version, id) in forget_commands {
            let mut key = keys::with_u64(&command_base, version);
            key.extend_from_slice(id.as_bytes());
            plan.batch.remove(key);
        }
        let result = AppendResult {
            first_sequence: meta.highest + 1,
            last_sequence: sequence,
            first_position: plan.next_head + 1,
            last_position: position,
        };
        if sequence != meta.highest {
            // No metadata write: the new index entries carry the highest sequence.
            meta.highest = sequence;
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
        let base = keys::stream_key(keys::STREAM, stream)?;
        let range = keys::with_u64(&base, meta.deleted_to + 1)..=keys::with_u64(&base, to);
        for item in self.tree.range(range) {
            let (key, value) = item?;
            if let Some(position) = keys::trailing_u64(&value) {
                plan.batch.remove(keys::log_key(position).to_vec());
            }
            plan.batch.remove(key);
        }
        meta.deleted_to = to;
        plan.batch.insert(meta_key.clone(), meta.encode().to_vec());
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
        for key in doomed {
            plan.batch.remove(key);
        }
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
        for (key, value) in rows {
            match value {
                Some(v) => plan.batch.insert(key, v),
                None => plan.batch.remove(key),
            }
        }
        plan.dirty = true;
        Ok(())
    }

    /// Applies the plan atomically, makes it durable as configured, publishes the new head and
    /// replies. Replies go out only after the head moved, so a caller that reads the log after
    /// its append always sees it.
    fn commit(&mut self, mut plan: Plan) {
        let mut outcome: Result<(), StoreError> = Ok(());
        let mut applied = false;
        if plan.dirty {
            if plan.next_head != self.head {
                plan.batch
                    .insert(keys::HEAD, plan.next_head.to_be_bytes().to_vec());
            }
            outcome = self.tree.apply_batch(plan.batch).map_err(StoreError::from);
            applied = outcome.is_ok();
        }
        let must_sync =
            plan.force_sync || (plan.dirty && self.config.durability == Durability::Sync);
        if outcome.is_ok() && must_sync {
            outcome = self.sync();
        }
        // Once applied, the batch's positions are taken whatever the fsync said: reusing them
        // would overwrite events that may already be on disk. Its callers still get an error,
        // because its durability is unknown.
        if applied {
            if self.metas.len() + plan.metas.len() > META_CACHE {
                self.metas.clear();
            }
            self.metas.extend(plan.metas.drain());
            if plan.next_head != self.head {
                self.head = plan.next_head;
                self.head_tx.send_replace(self.head);
            }
        }
        match outcome {
            Ok(()) => plan.replies.into_iter().for_each(Pending::send),
            Err(err) => {
                tracing::error!(error = %err, "commit failed");
                plan.replies.into_iter().for_each(|p| p.fail(&err).send());
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

fn reject_closed(op: WriteOp) {
    match op {
        WriteOp::Append { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        WriteOp::DeleteSnapshots { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        WriteOp::DeleteTo { reply, .. }
        | WriteOp::SaveSnapshot { reply, .. }
        | WriteOp::Kv { reply, .. }
        | WriteOp::Flush { reply }
        | WriteOp::Shutdown { reply } => drop(reply.send(Err(StoreError::Closed))),
    }
}
