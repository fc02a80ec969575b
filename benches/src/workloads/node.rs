//! Pieces shared by the workloads that drive the actor runtime: building an
//! [`incarnate::Runtime`] on a temporary directory, the reference `Account` commands, command
//! loads from concurrent callers, and the raw sled baselines sized like the stored events.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use incarnate::{Causation, Config, DurabilityMode, EventEnvelope, StreamId};
use incarnate_actors::{Account, AccountCommand, AccountEvent};
use tokio::runtime::Runtime as Tokio;

use super::support::{open_raw_sled, profiled};
use crate::BoxError;

/// The id of account number `n`.
pub(crate) fn account_id(n: usize) -> String {
    format!("acc-{n:06}")
}

/// The command that opens an account (a short owner: a small state).
pub(crate) fn open() -> AccountCommand {
    AccountCommand::Open { owner: "o".into() }
}

/// The command of a timed load: a deposit of one cent.
pub(crate) fn deposit() -> AccountCommand {
    AccountCommand::Deposit { amount: 1 }
}

/// Builds a runtime hosting `Account` on the sled store at `path`, with `durability`, nothing
/// ever passivated, then `tweak` applied.
pub(crate) fn runtime_at(
    path: &Path,
    durability: DurabilityMode,
    tweak: impl FnOnce(&mut Config),
) -> Result<incarnate::Runtime, BoxError> {
    let path = path.to_path_buf();
    Ok(incarnate::Runtime::builder()
        .configure(|c| {
            c.store.path = path;
            c.store.durability = durability;
            c.aggregates.default.idle_timeout_ms = 0;
            c.aggregates.default.max_live = 0;
            tweak(c);
        })
        .register::<Account>()
        .build()?)
}

/// The stored size of one `Deposited` event as the runtime writes it: the one-byte format tag
/// and the rmp-serde envelope (default command options: no correlation or command id).
pub(crate) fn deposit_record_len() -> Result<usize, BoxError> {
    let envelope = EventEnvelope {
        event_id: uuid::Uuid::now_v7(),
        stream: StreamId::new("account", account_id(4_242)),
        sequence: 3,
        position: 12_345,
        timestamp_micros: 1_750_000_000_000_000,
        event_type: AccountEvent::DEPOSITED.to_owned(),
        schema_version: 1,
        causation: Causation::default(),
        payload: rmp_serde::to_vec(&AccountEvent::Deposited { amount: 1 })?,
    };
    Ok(LOG_HEADER + rmp_serde::to_vec(&envelope)?.len() + 1)
}

/// The store's log record header: format tag, stream sequence, previous position (see
/// `src/store/keys.rs`).
pub(crate) const LOG_HEADER: usize = 17;

/// The stream sequence and previous position in a log record's header.
pub(crate) fn record_header(bytes: &[u8]) -> Result<(u64, u64), BoxError> {
    record_parts(bytes).map(|(sequence, previous, _)| (sequence, previous))
}

/// A log record's sequence, previous position and encoded envelope, read as the store reads
/// them: format 2 closes its append, 3 is followed by more of it, 4 closes it and carries the
/// append's command records (a `u32` length, then the records) before the envelope.
fn record_parts(bytes: &[u8]) -> Result<(u64, u64, &[u8]), BoxError> {
    let number = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    let rest = bytes.get(LOG_HEADER..).unwrap_or_default();
    let envelope = match bytes.first() {
        Some(2 | 3) => Some(rest),
        Some(4) => rest
            .get(..4)
            .and_then(|len| Some(u32::from_be_bytes(len.try_into().ok()?) as usize))
            .and_then(|len| rest.get(4 + len..)),
        _ => None,
    };
    match (envelope, number(1), number(9)) {
        (Some(envelope), Some(sequence), Some(previous)) => Ok((sequence, previous, envelope)),
        _ => Err("unknown log record format".into()),
    }
}

/// Which accounts caller `t` of `callers` drives among `aggregates`: its own share, or (more
/// callers than accounts) one shared account.
fn caller_ids(t: usize, callers: usize, aggregates: usize) -> Vec<String> {
    let own: Vec<String> = (t..aggregates).step_by(callers).map(account_id).collect();
    if own.is_empty() {
        vec![account_id(t % aggregates)]
    } else {
        own
    }
}

/// Opens accounts `0..aggregates` from `callers` concurrent tasks (untimed set-up; activates
/// them).
pub(crate) async fn open_all(
    rt: &incarnate::Runtime,
    aggregates: usize,
    callers: usize,
) -> Result<(), BoxError> {
    let callers = callers.min(aggregates).max(1);
    let mut tasks = Vec::with_capacity(callers);
    for t in 0..callers {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            for n in (t..aggregates).step_by(callers) {
                rt.send::<Account>(account_id(n), open()).await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// `commands` deposits from `callers` concurrent tasks, each waiting for its previous command
/// (closed loop), round-robin over its accounts. Returns the elapsed time.
pub(crate) async fn deposits(
    rt: &incarnate::Runtime,
    aggregates: usize,
    callers: usize,
    commands: usize,
) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for t in 0..callers {
        let rt = rt.clone();
        let ids = caller_ids(t, callers, aggregates);
        let count = commands / callers + usize::from(t < commands % callers);
        tasks.push(tokio::spawn(async move {
            for i in 0..count {
                rt.send::<Account>(&ids[i % ids.len()], deposit()).await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

/// A command load on a fresh runtime: `aggregates` accounts opened (untimed), then `commands`
/// deposits from `callers` closed-loop callers, timed from the first send to the last reply.
/// Returns commands/s. Checks the log head afterwards.
pub(crate) fn command_rate(
    tokio: &Tokio,
    durability: DurabilityMode,
    aggregates: usize,
    callers: usize,
    commands: usize,
) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let rt = runtime_at(dir.path(), durability, |c| {
        c.aggregates.default.mailbox_capacity = callers.max(1024);
    })?;
    let result = tokio.block_on(async {
        open_all(&rt, aggregates, callers).await?;
        let elapsed = profiled(deposits(&rt, aggregates, callers, commands)).await?;
        let head = rt.store().head();
        rt.shutdown().await?;
        let expected = (aggregates + commands) as u64;
        if head != expected {
            return Err(format!("expected {expected} events in the log, found {head}").into());
        }
        Ok::<_, BoxError>(commands as f64 / elapsed.as_secs_f64())
    });
    drop(dir);
    result
}

/// The 16-byte raw key of event `i` over `streams` interleaved streams.
pub(crate) fn raw_key(i: usize, streams: usize) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&((i % streams) as u64).to_be_bytes());
    key[8..].copy_from_slice(&((i / streams) as u64 + 1).to_be_bytes());
    key
}

/// Raw sled, the durable group-commit ceiling: batches of `batch` inserts of `value_len`-byte
/// values over `streams` streams, each batch followed by `Db::flush()` + `fdatasync` of the `db`
/// file. Returns events/s.
pub(crate) fn raw_group_commit(
    events: usize,
    streams: usize,
    value_len: usize,
    batch: usize,
) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let (db, tree) = open_raw_sled(dir.path())?;
    let data_file = File::open(dir.path().join("db"))?;
    let value = vec![0x5a_u8; value_len];
    let start = Instant::now();
    for first in (0..events).step_by(batch) {
        let mut b = sled::Batch::default();
        for i in first..(first + batch).min(events) {
            b.insert(&raw_key(i, streams)[..], &value[..]);
        }
        tree.apply_batch(b)?;
        db.flush()?;
        data_file.sync_data()?;
    }
    let elapsed = start.elapsed();
    if tree.len() != events {
        return Err(format!("expected {events} keys, found {}", tree.len()).into());
    }
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Raw sled, the buffered ceiling: one `Tree::insert` per event from one thread, never flushed.
pub(crate) fn raw_inserts(
    events: usize,
    streams: usize,
    value_len: usize,
) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let (_db, tree) = open_raw_sled(dir.path())?;
    let value = vec![0x5a_u8; value_len];
    let start = Instant::now();
    for i in 0..events {
        tree.insert(&raw_key(i, streams)[..], &value[..])?;
    }
    let elapsed = start.elapsed();
    if tree.len() != events {
        return Err(format!("expected {events} keys, found {}", tree.len()).into());
    }
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Writes the history of account `id`: `Open` then `events - 1` deposits, one caller after the
/// other (so with `snapshot_every = k` a snapshot lands exactly on every multiple of k).
pub(crate) async fn write_history(
    rt: &incarnate::Runtime,
    id: &str,
    events: usize,
) -> Result<(), BoxError> {
    rt.send::<Account>(id, open()).await?;
    for _ in 1..events {
        rt.send::<Account>(id, deposit()).await?;
    }
    Ok(())
}

/// Opens a database the store has just closed with raw sled, waiting for the store's sled I/O
/// threads to release the file lock.
pub(crate) fn reopen_raw(path: &Path) -> Result<sled::Db, BoxError> {
    let started = Instant::now();
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(256 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && started.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The log records in one stored log value, as the store reads them: a chunk (format 5: a `u32`
/// count, then per record its position and length, then the records) holds a commit group's;
/// any other value is one record.
pub(crate) fn log_records(value: &[u8]) -> Result<Vec<&[u8]>, BoxError> {
    if value.first() != Some(&5) {
        return Ok(vec![value]);
    }
    let field = |at: usize, width: usize| -> Option<usize> {
        let bytes = value.get(at..at.checked_add(width)?)?;
        Some(bytes.iter().fold(0, |n, b| n << 8 | usize::from(*b)))
    };
    let count = field(1, 4).ok_or("truncated chunk")?;
    let mut offset = 5 + count * 12;
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let len = field(5 + i * 12 + 8, 4).ok_or("truncated chunk")?;
        records.push(value.get(offset..offset + len).ok_or("truncated chunk")?);
        offset += len;
    }
    Ok(records)
}

/// Decodes one stored log record (format tag + rmp-serde envelope) as the store does.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<EventEnvelope, BoxError> {
    let (_, _, envelope) = record_parts(bytes)?;
    match envelope.split_first() {
        Some((1, rest)) => Ok(rmp_serde::from_slice(rest)?),
        _ => Err("unknown envelope format".into()),
    }
}

#[cfg(test)]
mod tests {
    use incarnate::DomainEvent;

    use super::*;

    /// The baselines' value size is the size of a `Deposited` record the runtime really stores,
    /// give or take the width of the position and sequence numbers (msgpack integers take 1 to 9
    /// bytes: this test's record sits at position 2, the estimate at position 12,345).
    #[test]
    fn deposit_record_len_matches_the_stored_record() -> Result<(), BoxError> {
        let dir = tempfile::tempdir()?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let rt = runtime_at(dir.path(), DurabilityMode::Buffered, |_| {})?;
        let stored = tokio.block_on(async {
            rt.send::<Account>(account_id(4_242), open()).await?;
            rt.send::<Account>(account_id(4_242), deposit()).await?;
            let log = rt.store().read_log(2, 1).await?;
            rt.shutdown().await?;
            let envelope = log.first().ok_or("empty log")?;
            Ok::<usize, BoxError>(LOG_HEADER + rmp_serde::to_vec(envelope)?.len() + 1)
        })?;
        let estimate = deposit_record_len()?;
        assert!(estimate.abs_diff(stored) <= 4, "{estimate} vs {stored}");
        Ok(())
    }

    /// The raw baselines decode every record format the store writes, the closing record that
    /// carries command records included, to the envelopes the store itself reads, and the
    /// chunks that hold a commit group's records.
    #[test]
    fn decode_record_reads_every_record_the_store_writes() -> Result<(), BoxError> {
        let dir = tempfile::tempdir()?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let rt = runtime_at(dir.path(), DurabilityMode::Buffered, |_| {})?;
        let read = tokio.block_on(async {
            rt.send::<Account>(account_id(1), open()).await?;
            let options = incarnate::CommandOptions::new().command_id(uuid::Uuid::now_v7());
            rt.send_with::<Account>(account_id(1), deposit(), options)
                .await?;
            let log = rt.store().read_log(1, usize::MAX).await?;
            rt.shutdown().await?;
            Ok::<_, BoxError>(log)
        })?;
        let db = reopen_raw(dir.path())?;
        let tree = db.open_tree("incarnate")?;
        let mut decoded = Vec::new();
        for item in tree.scan_prefix(b"L") {
            for record in log_records(&item?.1)? {
                decoded.push(decode_record(record)?);
            }
        }
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded, read);
        // The deposit's record carries its command record (format 4).
        let second = tree.get(b"L\0\0\0\0\0\0\0\x02")?.ok_or("no record at 2")?;
        assert_eq!(second.first(), Some(&4));
        drop((tree, db));

        // An append of several events is one chunk.
        let rt = runtime_at(dir.path(), DurabilityMode::Buffered, |_| {})?;
        let read = tokio.block_on(async {
            let event = |event: AccountEvent| -> Result<incarnate::NewEvent, BoxError> {
                Ok(incarnate::NewEvent {
                    event_id: uuid::Uuid::now_v7(),
                    event_type: event.event_type().to_owned(),
                    schema_version: 1,
                    causation: Causation::default(),
                    payload: rmp_serde::to_vec(&event)?,
                })
            };
            let events = vec![
                event(AccountEvent::Opened { owner: "o".into() })?,
                event(AccountEvent::Deposited { amount: 1 })?,
                event(AccountEvent::Deposited { amount: 2 })?,
            ];
            let stream = StreamId::new("account", account_id(2));
            rt.store()
                .append(incarnate::AppendRequest::new(stream, 0, events))
                .await?;
            let log = rt.store().read_log(1, usize::MAX).await?;
            rt.shutdown().await?;
            Ok::<_, BoxError>(log)
        })?;
        let db = reopen_raw(dir.path())?;
        let tree = db.open_tree("incarnate")?;
        let (mut decoded, mut chunks) = (Vec::new(), 0);
        for item in tree.scan_prefix(b"L") {
            let value = item?.1;
            chunks += usize::from(value.first() == Some(&5));
            for record in log_records(&value)? {
                decoded.push(decode_record(record)?);
            }
        }
        assert_eq!(decoded, read);
        assert_eq!((decoded.len(), chunks), (5, 1));
        Ok(())
    }
}
