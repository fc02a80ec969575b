//! `buffered_many`: buffered commands per second across 10,000 live `Account` aggregates.
//!
//! incarnate: as `durable_many` (10,000 accounts opened first, 1,000 closed-loop callers) with
//! `durability = buffered` (flushed and fsynced by the store every 100 ms, not per command).
//!
//! Baseline: raw sled `Tree::insert` per event from one thread, never flushed, 16-byte keys over
//! 10,000 interleaved streams, values the size of one stored `Deposited` record.

use incarnate::DurabilityMode;
use tokio::runtime::Runtime;

use super::durable_many::{AGGREGATES, CALLERS};
use super::node::{command_rate, deposit_record_len, raw_inserts};
use super::support::alternate;
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "buffered_many",
    about: "buffered commands/s: 10,000 live Accounts, 1,000 callers vs sled insert, no flush",
    run_round,
    max_rounds: 0,
};

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let commands = if settings.quick { 20_000 } else { 80_000 };
    let value_len = deposit_record_len()?;
    let (value, baseline) = alternate(
        round,
        || {
            command_rate(
                runtime,
                DurabilityMode::Buffered,
                AGGREGATES,
                CALLERS,
                commands,
            )
        },
        || raw_inserts(commands, AGGREGATES, value_len),
    )?;
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "commands/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    }])
}
