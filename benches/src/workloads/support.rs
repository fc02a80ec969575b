//! Pieces shared by the workloads: the payload, the appenders, raw sled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use incarnate::{
    AppendRequest, DomainEvent, Durability, EventStore, NewEvent, SledStore, SledStoreConfig,
    StreamId,
};
use incarnate_actors::{Account, AccountEvent};
use tokio::runtime::Runtime;

use crate::BoxError;

/// Streams written by the append workloads.
pub(crate) const STREAMS: usize = 1_000;
/// Concurrent appenders (tokio tasks), each owning `STREAMS / APPENDERS` streams.
pub(crate) const APPENDERS: usize = 64;
/// The size of one encoded event payload.
pub(crate) const PAYLOAD_BYTES: usize = 200;
/// sled's cache, as the store configures it by default.
const CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// An encoded `AccountEvent` of exactly [`PAYLOAD_BYTES`] bytes (rmp-serde, as stored), and its
/// tag. `Opened` with a long owner name: the only account event whose size can be chosen.
pub(crate) fn payload() -> Result<(Vec<u8>, &'static str), BoxError> {
    for len in 0..PAYLOAD_BYTES {
        let event = AccountEvent::Opened {
            owner: "o".repeat(len),
        };
        let bytes = rmp_serde::to_vec(&event)?;
        if bytes.len() == PAYLOAD_BYTES {
            // Sanity: the payload is one the domain can read back.
            AccountEvent::decode(event.event_type(), 1, &bytes)?;
            return Ok((bytes, event.event_type()));
        }
    }
    Err(format!("no AccountEvent encodes to {PAYLOAD_BYTES} bytes").into())
}

/// The stream of account number `n`.
pub(crate) fn account_stream(n: usize) -> StreamId {
    use incarnate::Aggregate;
    StreamId::new(Account::TYPE, format!("acc-{n:05}"))
}

/// Events per second.
pub(crate) fn rate(events: usize, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

/// Set by the hidden `--incarnate-only` flag: [`alternate`] skips the baselines.
pub(crate) static INCARNATE_ONLY: AtomicBool = AtomicBool::new(false);

/// Set by `--perf-control FIFO`: [`profiled`] switches a `perf record --control` session on and
/// off through it.
pub(crate) static PERF_CONTROL: OnceLock<PathBuf> = OnceLock::new();

/// Runs the timed phase `phase`, with the profiler listening on [`PERF_CONTROL`] (if any)
/// enabled for exactly its duration.
pub(crate) async fn profiled<T>(
    phase: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    let control = |command: &[u8]| -> Result<(), BoxError> {
        if let Some(fifo) = PERF_CONTROL.get() {
            let mut fifo = std::fs::OpenOptions::new().write(true).open(fifo)?;
            fifo.write_all(command)?;
        }
        Ok(())
    };
    control(b"enable\n")?;
    let result = phase.await;
    control(b"disable\n")?;
    result
}

/// Runs `a` then `b` in even rounds and `b` then `a` in odd ones, so drift during a round (a
/// noisy neighbour, the page cache filling) does not always favour the same side.
pub(crate) fn alternate<A, B: Default>(
    round: usize,
    a: impl FnOnce() -> Result<A, BoxError>,
    b: impl FnOnce() -> Result<B, BoxError>,
) -> Result<(A, B), BoxError> {
    if INCARNATE_ONLY.load(Ordering::Relaxed) {
        return Ok((a()?, B::default()));
    }
    if round % 2 == 0 {
        let x = a()?;
        Ok((x, b()?))
    } else {
        let y = b()?;
        Ok((a()?, y))
    }
}

/// incarnate: `events` single-event appends to a fresh [`SledStore`] with `durability`, from
/// [`APPENDERS`] concurrent tasks round-robining over their own streams of [`STREAMS`], each
/// event the [`payload`]. Returns appends/s, timed from the first append to the last
/// acknowledgement (opening and closing excluded).
pub(crate) fn incarnate_appends(
    runtime: &Runtime,
    durability: Durability,
    events: usize,
) -> Result<f64, BoxError> {
    let (payload, tag) = payload()?;
    closed_loop_appends(
        runtime,
        durability,
        APPENDERS,
        STREAMS,
        events,
        (payload, tag),
    )
}

/// `events` single-event appends (each `event`: an encoded payload and its tag) to a fresh
/// [`SledStore`] with `durability`, from `callers` closed-loop tasks; task `t` round-robins over
/// streams `t`, `t + callers`, ... of `streams`, checking versions. Returns appends/s, timed
/// from the first append to the last acknowledgement; checks the log head.
pub(crate) fn closed_loop_appends(
    runtime: &Runtime,
    durability: Durability,
    callers: usize,
    streams: usize,
    events: usize,
    event: (Vec<u8>, &'static str),
) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(SledStoreConfig::new(dir.path()).durability(durability))?;
    let (payload, tag) = event;
    let payload = Arc::new(payload);

    let result = runtime.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(callers);
        for t in 0..callers {
            let own: Vec<StreamId> = (t..streams).step_by(callers).map(account_stream).collect();
            let count = events / callers + usize::from(t < events % callers);
            let store = store.clone();
            let payload = Arc::clone(&payload);
            tasks.push(tokio::spawn(async move {
                let mut versions = vec![0u64; own.len()];
                for i in 0..count {
                    let k = i % own.len();
                    let event = NewEvent {
                        event_id: uuid::Uuid::now_v7(),
                        event_type: tag.to_owned(),
                        schema_version: 1,
                        causation: Default::default(),
                        payload: payload.to_vec(),
                    };
                    let request = AppendRequest::new(own[k].clone(), versions[k], vec![event]);
                    versions[k] = store.append(request).await?.last_sequence;
                }
                Ok::<(), incarnate::StoreError>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let elapsed = start.elapsed();
        let head = store.head();
        store.close().await?;
        if head != events as u64 {
            return Err(format!("expected {events} events in the log, found {head}").into());
        }
        Ok::<_, BoxError>(rate(events, elapsed))
    });
    drop(dir);
    result
}

/// Raw sled configured as the store configures it: same cache, no background flusher.
pub(crate) fn open_raw_sled(path: &Path) -> Result<(sled::Db, sled::Tree), BoxError> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree("bench")?;
    Ok((db, tree))
}

/// The 16-byte key of event `i`: its stream (streams interleaved, as the appenders write them)
/// and its sequence number in that stream, both big-endian.
pub(crate) fn raw_key(i: usize) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&((i % STREAMS) as u64).to_be_bytes());
    key[8..].copy_from_slice(&((i / STREAMS) as u64 + 1).to_be_bytes());
    key
}

/// Sends `commands` commands open-loop at `rate` per second: every 1 ms tick spawns, each as its
/// own task, the ones due by then, whatever the earlier ones are doing. `send(n)` sends command
/// `n`. Returns each command's latency in µs, from the tick that sent it to its reply (so
/// queueing behind slow commands counts).
pub(crate) async fn open_loop<F, Fut>(
    rate: f64,
    commands: usize,
    send: F,
) -> Result<Vec<f64>, BoxError>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let mut tasks = Vec::with_capacity(commands);
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut sent = 0;
    while sent < commands {
        ticks.tick().await;
        let now = Instant::now();
        let due = ((now - start).as_secs_f64() * rate) as usize;
        while sent < due.min(commands) {
            let command = send(sent);
            tasks.push(tokio::spawn(async move {
                command.await?;
                Ok::<f64, BoxError>(now.elapsed().as_secs_f64() * 1e6)
            }));
            sent += 1;
        }
    }
    let mut latencies = Vec::with_capacity(commands);
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok(latencies)
}
