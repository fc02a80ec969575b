//! `durable_hot`: durable commands per second on one hot `Account` from 64 concurrent callers.
//!
//! incarnate: one account, opened first (untimed), then deposits from 64 closed-loop callers,
//! `durability = sync`. The aggregate decides queued commands together (up to
//! `max_batch_commands`) and persists them in one append, so one fsync covers many commands.
//!
//! Baseline: the same raw sled group commit as `durable_many` (batches of 512 inserts + flush +
//! fdatasync, values the size of one stored `Deposited` record), keys of one stream.

use incarnate::DurabilityMode;
use tokio::runtime::Runtime;

use super::node::{command_rate, deposit_record_len, raw_group_commit};
use super::support::alternate;
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

pub(crate) const CALLERS: usize = 64;
const BATCH: usize = 512;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "durable_hot",
    about: "durable commands/s: one Account, 64 callers, sync vs sled batch(512)+flush+fsync",
    run_round,
    max_rounds: 0,
};

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let commands = if settings.quick { 10_000 } else { 40_000 };
    let value_len = deposit_record_len()?;
    let (value, baseline) = alternate(
        round,
        || command_rate(runtime, DurabilityMode::Sync, 1, CALLERS, commands),
        || raw_group_commit(commands, 1, value_len, BATCH),
    )?;
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "commands/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    }])
}
