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

use std::fs::File;
use std::io::Write as _;
use std::time::{Duration, Instant};

use incarnate::DurabilityMode;
use incarnate_actors::Account;
use tokio::runtime::Runtime;

use super::durable_many::{self, AGGREGATES, CALLERS, MEASURED};
use super::node::{account_id, command_rate, deposit, open_all, runtime_at};
use super::support::{self, alternate};
use super::{Better, Sample, Settings, Workload};
use crate::stats::median;
use crate::BoxError;

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
    let (latencies, fsync) = alternate(round, || open_loop(runtime, rate, commands), fsync_p50)?;
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

/// Sends `commands` deposits open-loop at `rate` per second; returns each latency in µs.
fn open_loop(runtime: &Runtime, rate: f64, commands: usize) -> Result<Vec<f64>, BoxError> {
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
        rt.shutdown().await?;
        Ok::<_, BoxError>(latencies)
    });
    drop(dir);
    result
}

/// The median of 200 `write(256 B)` + `fdatasync` on a file in a temporary directory.
pub(crate) fn fsync_p50() -> Result<Duration, BoxError> {
    let dir = tempfile::tempdir()?;
    let mut file = File::create(dir.path().join("fsync"))?;
    let block = [0xa5_u8; 256];
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(Duration::from_secs_f64(median(&times)))
}
