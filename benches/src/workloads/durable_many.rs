//! `durable_many`: durable commands per second across 10,000 live `Account` aggregates.
//!
//! incarnate: a runtime on a fresh sled store with `durability = sync` (every acknowledged
//! command is flushed and fsynced; concurrent commands share one group commit); 10,000 accounts
//! opened first (untimed, so every aggregate is live), then deposits from [`CALLERS`] concurrent
//! closed-loop callers, each round-robin over its own 10 accounts.
//!
//! Baseline: raw sled group commit, `apply_batch` of 512 inserts + `Db::flush()` + `fdatasync`,
//! 16-byte keys over 10,000 interleaved streams, values the size of one stored `Deposited`
//! record, the same number of events.

use std::sync::Mutex;

use incarnate::DurabilityMode;
use tokio::runtime::Runtime;

use super::node::{command_rate, deposit_record_len, raw_group_commit};
use super::support::alternate;
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

/// Live aggregates.
pub(crate) const AGGREGATES: usize = 10_000;
/// Concurrent callers.
pub(crate) const CALLERS: usize = 1_000;
/// Events per raw sled batch.
pub(crate) const BATCH: usize = 512;

/// Every round's incarnate figure (commands/s), for `latency_sync` to pace itself at half of it.
pub(crate) static MEASURED: Mutex<Vec<f64>> = Mutex::new(Vec::new());

pub(crate) const WORKLOAD: Workload = Workload {
    name: "durable_many",
    about: "durable commands/s: 10,000 live Accounts, 1,000 callers, sync vs sled batch(512)+flush+fsync",
    run_round,
    max_rounds: 0,
};

/// Timed commands per round.
pub(crate) fn commands(settings: &Settings) -> usize {
    if settings.quick {
        10_000
    } else {
        40_000
    }
}

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let commands = commands(settings);
    let value_len = deposit_record_len()?;
    let (value, baseline) = alternate(
        round,
        || command_rate(runtime, DurabilityMode::Sync, AGGREGATES, CALLERS, commands),
        || raw_group_commit(commands, AGGREGATES, value_len, BATCH),
    )?;
    if let Ok(mut measured) = MEASURED.lock() {
        measured.push(value);
    }
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "commands/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    }])
}
