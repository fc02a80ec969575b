//! `replay_cost`: a cold activation without snapshots against the raw cost of reading and
//! folding the same events.
//!
//! One `Account` with 10,000 events (`snapshot_every = 0`), written once (buffered, untimed).
//! Per round, [`REPS`] times each, alternating:
//!
//! - incarnate: a fresh runtime on the database (cold; opening not timed), timed
//!   `Runtime::state`: the whole activation (snapshot lookup, paged stream reads, envelope and
//!   event decoding, `apply` of every event, idempotency records, actor start, reply).
//! - baseline: the same database opened with raw sled after the runtime is shut down (cold
//!   too; opening not timed): `get` the stream's metadata (`M` + stream: its last position), then
//!   follow its back-chain with a `get` per log record (`L` + position, each record's header
//!   names the previous position), decode each envelope with rmp-serde, decode the
//!   `AccountEvent` and `apply` it: the same reads over the same layout, with none of the runtime
//!   around them.
//!
//! Reported: incarnate's time as the value, the raw time as the baseline; ratio = incarnate /
//! raw, lower is better (target <= 1.5).

use std::sync::Mutex;
use std::time::Instant;

use incarnate::{Aggregate, DomainEvent, DurabilityMode};
use incarnate_actors::{Account, AccountEvent};
use tempfile::TempDir;
use tokio::runtime::Runtime;

use super::node::{decode_record, record_header, reopen_raw, runtime_at, write_history};
use super::{Better, Sample, Settings, Workload};
use crate::stats::median;
use crate::BoxError;

const EVENTS: usize = 10_000;
const REPS: usize = 5;
const ID: &str = "replayed";

static BUILT: Mutex<Option<TempDir>> = Mutex::new(None);

pub(crate) const WORKLOAD: Workload = Workload {
    name: "replay_cost",
    about: "cold activation of 10,000 events, no snapshot vs raw sled scan+decode+fold",
    run_round,
    max_rounds: 0,
};

fn configure(c: &mut incarnate::Config) {
    c.aggregates.default.snapshot_every = 0;
}

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let mut built = BUILT.lock().map_err(|_| "lock poisoned")?;
    if built.is_none() {
        let dir = tempfile::tempdir()?;
        let rt = runtime_at(dir.path(), DurabilityMode::Buffered, configure)?;
        runtime.block_on(async {
            write_history(&rt, ID, EVENTS).await?;
            rt.shutdown().await?;
            Ok::<(), BoxError>(())
        })?;
        *built = Some(dir);
    }
    let path = built
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .ok_or("no database")?;
    let mut ours = Vec::with_capacity(REPS);
    let mut raw = Vec::with_capacity(REPS);
    for rep in 0..REPS {
        for which in [rep % 2, 1 - rep % 2] {
            if which == 0 {
                let rt = runtime_at(&path, DurabilityMode::Buffered, configure)?;
                ours.push(runtime.block_on(async {
                    let start = Instant::now();
                    let (state, version) = rt.state::<Account>(ID).await?;
                    let us = start.elapsed().as_secs_f64() * 1e6;
                    rt.shutdown().await?;
                    check(&state, version)?;
                    Ok::<f64, BoxError>(us)
                })?);
            } else {
                raw.push(raw_replay(&path)?);
            }
        }
    }
    if round + 1 >= settings.rounds {
        *built = None;
    }
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "µs",
        better: Better::Lower,
        value: median(&ours),
        baseline: Some(median(&raw)),
    }])
}

fn check(state: &Account, version: u64) -> Result<(), BoxError> {
    let expected = (EVENTS - 1) as u64;
    if version != EVENTS as u64 || state.balance != expected {
        return Err(format!(
            "replayed to version {version}, balance {}; expected {EVENTS}, {expected}",
            state.balance
        )
        .into());
    }
    Ok(())
}

/// The store's metadata key of account `id` (see `src/store/keys.rs`).
fn meta_key(id: &str) -> Vec<u8> {
    let ty = Account::TYPE.as_bytes();
    let mut key = vec![b'M', ty.len() as u8];
    key.extend_from_slice(ty);
    key.extend_from_slice(&(id.len() as u16).to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// Raw sled: the stream's metadata, then its back-chain from the last event (a `get` per event),
/// decode, fold: the reads the store makes. Returns µs (opening not timed).
fn raw_replay(path: &std::path::Path) -> Result<f64, BoxError> {
    let db = reopen_raw(path)?;
    let tree = db.open_tree("incarnate")?;
    let key = meta_key(ID);
    let start = Instant::now();
    let meta = tree.get(&key)?.ok_or("missing stream metadata")?;
    let mut position =
        u64::from_be_bytes(meta.get(16..24).ok_or("bad stream metadata")?.try_into()?);
    let mut records = Vec::with_capacity(EVENTS);
    while position != 0 {
        let mut log_key = [b'L'; 9];
        log_key[1..].copy_from_slice(&position.to_be_bytes());
        let record = tree.get(log_key)?.ok_or("missing log record")?;
        let (sequence, previous) = record_header(&record)?;
        records.push(record);
        position = if sequence > 1 { previous } else { 0 };
    }
    let mut state = Account::default();
    let mut version = 0;
    for record in records.iter().rev() {
        let envelope = decode_record(record)?;
        let event = AccountEvent::decode(
            &envelope.event_type,
            envelope.schema_version,
            &envelope.payload,
        )?;
        state.apply(&event);
        version = envelope.sequence;
    }
    let us = start.elapsed().as_secs_f64() * 1e6;
    check(&state, version)?;
    Ok(us)
}
