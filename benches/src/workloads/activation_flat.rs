//! `activation_flat`: a cold activation costs about the same whatever the length of the
//! history, thanks to snapshots.
//!
//! Two `Account`s in one database, written once (buffered, one command after the other, with
//! `snapshot_every = 100`, so each has a snapshot at its last event): `small` with 100 events,
//! `big` with 100,000 (10,000 with `--quick`). Each timed activation starts a fresh runtime on
//! that database (cold: nothing live, sled's cache empty; opening is not timed) and times
//! `Runtime::state` on one of the two: load the newest snapshot, read the events after it (none),
//! load the idempotency records, start the actor, answer. Per round, the median of [`REPS`]
//! activations of each, alternating.
//!
//! Reported: time(big) as the value and time(small) as the baseline, so the ratio is
//! time(big) / time(small), lower is better (target <= 2).

use std::sync::Mutex;
use std::time::Instant;

use incarnate::DurabilityMode;
use incarnate_actors::Account;
use tempfile::TempDir;
use tokio::runtime::Runtime;

use super::node::{runtime_at, write_history};
use super::{Better, Sample, Settings, Workload};
use crate::stats::median;
use crate::BoxError;

const SMALL: usize = 100;
const REPS: usize = 7;
const SMALL_ID: &str = "small";
const BIG_ID: &str = "big";

/// The database, written in the first round and kept for the others.
static BUILT: Mutex<Option<TempDir>> = Mutex::new(None);

pub(crate) const WORKLOAD: Workload = Workload {
    name: "activation_flat",
    about: "cold activation, 100k vs 100 events, snapshot every 100: time(big)/time(small)",
    run_round,
    max_rounds: 0,
};

fn big(settings: &Settings) -> usize {
    if settings.quick {
        10_000
    } else {
        100_000
    }
}

fn configure(c: &mut incarnate::Config) {
    c.aggregates.default.snapshot_every = 100;
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
            write_history(&rt, SMALL_ID, SMALL).await?;
            write_history(&rt, BIG_ID, big(settings)).await?;
            rt.shutdown().await?;
            Ok::<(), BoxError>(())
        })?;
        *built = Some(dir);
    }
    let path = built
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .ok_or("no database")?;
    let mut small_us = Vec::with_capacity(REPS);
    let mut big_us = Vec::with_capacity(REPS);
    for rep in 0..REPS {
        for which in [rep % 2, 1 - rep % 2] {
            let (id, expected) = if which == 0 {
                (SMALL_ID, SMALL as u64)
            } else {
                (BIG_ID, big(settings) as u64)
            };
            let rt = runtime_at(&path, DurabilityMode::Buffered, configure)?;
            let us = runtime.block_on(async {
                let start = Instant::now();
                let (_, version) = rt.state::<Account>(id).await?;
                let us = start.elapsed().as_secs_f64() * 1e6;
                rt.shutdown().await?;
                if version != expected {
                    return Err(format!("{id} at version {version}, expected {expected}").into());
                }
                Ok::<f64, BoxError>(us)
            })?;
            if which == 0 {
                small_us.push(us);
            } else {
                big_us.push(us);
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
        value: median(&big_us),
        baseline: Some(median(&small_us)),
    }])
}
