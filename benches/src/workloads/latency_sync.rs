//! `latency_sync`: p50 / p99 durable command latency under an open-loop load at half of the
//! `durable_many` throughput measured earlier in the same run.
//!
//! incarnate: as `durable_many` (10,000 accounts opened first, `durability = sync`), but the
//! deposits are sent open-loop: every millisecond the sender spawns the commands due by then at
//! the target rate, each as its own task, whatever the earlier ones are doing. A command's
//! latency runs from that tick to its reply (so queueing behind slow commands counts).
//!
//! Baseline: the p50 of one durable write on this disk: 200 appends of 256 bytes to a file in a
//! temporary directory, each followed by `fdatasync`.
//!
//! Two unloaded figures against the same baseline show what a single durable write costs
//! before any queueing: `latency_sync_lone_p50`, incarnate's p50 over 200 deposits sent one
//! after another to one account once the open-loop load has drained, and
//! `latency_sync_sled_lone_p50`, raw sled's: 200 times one insert of a deposit record's size,
//! `Db::flush()` and `fdatasync` of its data file, the least any write durable through sled
//! costs.

use std::fs::File;
use std::io::Write as _;
use std::time::{Duration, Instant};

use incarnate::DurabilityMode;
use incarnate_actors::Account;
use tokio::runtime::Runtime;

use super::durable_many::{self, AGGREGATES, CALLERS, MEASURED};
use super::node::{
    account_id, command_rate, deposit, deposit_record_len, open_all, raw_key, runtime_at,
};
use super::support::{self, alternate, open_raw_sled};
use super::{Better, Sample, Settings, Workload};
use crate::stats::median;
use crate::BoxError;

/// Durable writes timed one at a time, unloaded (for each of the three unloaded figures).
const LONE: usize = 200;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "latency_sync",
    about: "p50/p99 durable command latency, open loop at half the durable_many rate vs fsync p50",
    run_round,
    max_rounds: 0,
};

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let rate = target_rate(runtime, settings)?;
    let seconds = if settings.quick { 1.0 } else { 3.0 };
    let commands = (rate * seconds).round() as usize;
    let ((latencies, lone), (fsync, sled_lone)) = alternate(
        round,
        || open_loop(runtime, rate, commands),
        unloaded_baselines,
    )?;
    let fsync_us = fsync.as_secs_f64() * 1e6;
    Ok(vec![
        Sample {
            name: "latency_sync_p50",
            unit: "µs",
            better: Better::Lower,
            value: percentile(&latencies, 0.50),
            baseline: Some(fsync_us),
        },
        Sample {
            name: "latency_sync_p99",
            unit: "µs",
            better: Better::Lower,
            value: percentile(&latencies, 0.99),
            baseline: Some(fsync_us),
        },
        Sample {
            name: "latency_sync_lone_p50",
            unit: "µs",
            better: Better::Lower,
            value: lone,
            baseline: Some(fsync_us),
        },
        Sample {
            name: "latency_sync_sled_lone_p50",
            unit: "µs",
            better: Better::Lower,
            value: sled_lone.as_secs_f64() * 1e6,
            baseline: Some(fsync_us),
        },
        Sample {
            name: "latency_sync_offered",
            unit: "commands/s",
            better: Better::Higher,
            value: rate,
            baseline: None,
        },
    ])
}

/// Half the median `durable_many` figure of this run; measured now if that workload did not run.
pub(crate) fn target_rate(runtime: &Runtime, settings: &Settings) -> Result<f64, BoxError> {
    let measured = MEASURED.lock().map(|m| m.clone()).unwrap_or_default();
    let full = if measured.is_empty() {
        let rate = command_rate(
            runtime,
            DurabilityMode::Sync,
            AGGREGATES,
            CALLERS,
            durable_many::commands(settings),
        )?;
        if let Ok(mut m) = MEASURED.lock() {
            m.push(rate);
        }
        rate
    } else {
        median(&measured)
    };
    Ok(full / 2.0)
}

/// The `p` quantile (nearest rank) of `values`.
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Sends `commands` deposits open-loop at `rate` per second; returns each latency in µs, and
/// then the p50 in µs of [`LONE`] deposits sent one after another.
fn open_loop(runtime: &Runtime, rate: f64, commands: usize) -> Result<(Vec<f64>, f64), BoxError> {
    let dir = tempfile::tempdir()?;
    let rt = runtime_at(dir.path(), DurabilityMode::Sync, |_| {})?;
    let result = runtime.block_on(async {
        open_all(&rt, AGGREGATES, CALLERS).await?;
        let latencies = support::profiled(support::open_loop(rate, commands, |n| {
            let rt = rt.clone();
            let id = account_id(n % AGGREGATES);
            async move {
                rt.send::<Account>(id, deposit()).await?;
                Ok(())
            }
        }))
        .await?;
        let mut lone = Vec::with_capacity(LONE);
        for _ in 0..LONE {
            let started = Instant::now();
            rt.send::<Account>(account_id(0), deposit()).await?;
            lone.push(started.elapsed().as_secs_f64() * 1e6);
        }
        rt.shutdown().await?;
        Ok::<_, BoxError>((latencies, median(&lone)))
    });
    drop(dir);
    result
}

/// The unloaded durable writes incarnate is compared with: [`fsync_p50`] and
/// [`sled_lone_p50`].
fn unloaded_baselines() -> Result<(Duration, Duration), BoxError> {
    Ok((fsync_p50()?, sled_lone_p50()?))
}

/// The median of [`LONE`] writes made durable through raw sled one at a time: an insert of a
/// deposit record's size, `Db::flush()` and `fdatasync` of the data file (what the store's
/// syncer does for a group of one).
fn sled_lone_p50() -> Result<Duration, BoxError> {
    let dir = tempfile::tempdir()?;
    let (db, tree) = open_raw_sled(dir.path())?;
    let data_file = File::open(dir.path().join("db"))?;
    let value = vec![0x5a_u8; deposit_record_len()?];
    let mut times = Vec::with_capacity(LONE);
    for i in 0..LONE {
        let t = Instant::now();
        tree.insert(raw_key(i, 1), &value[..])?;
        db.flush()?;
        data_file.sync_data()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(Duration::from_secs_f64(median(&times)))
}

/// The median of [`LONE`] `write(256 B)` + `fdatasync` on a file in a temporary directory.
pub(crate) fn fsync_p50() -> Result<Duration, BoxError> {
    let dir = tempfile::tempdir()?;
    let mut file = File::create(dir.path().join("fsync"))?;
    let block = [0xa5_u8; 256];
    let mut times = Vec::with_capacity(LONE);
    for _ in 0..LONE {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(Duration::from_secs_f64(median(&times)))
}
