//! `store_append_buffered`: appends per second when acknowledged writes may sit in memory.
//!
//! incarnate: [`SledStore`](incarnate::SledStore) with `Durability::Buffered` (flushed and
//! fsynced every 100 ms by the store), 1,000 streams, 64 concurrent appenders, one 200-byte event
//! per append.
//!
//! Baseline: raw sled `Tree::insert` of each event (16-byte key, 200-byte value) from one thread,
//! with no flush at all: the buffered-mode ceiling.

use std::time::Instant;

use incarnate::Durability;
use tokio::runtime::Runtime;

use super::support::{self, alternate, incarnate_appends, open_raw_sled, raw_key};
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "store_append_buffered",
    about: "buffered appends/s: SledStore Buffered(100 ms), 64 appenders vs sled insert, no flush",
    run_round,
    max_rounds: 0,
};

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let (value, baseline) = alternate(
        round,
        || {
            incarnate_appends(
                runtime,
                Durability::Buffered {
                    flush_interval_ms: 100,
                },
                settings.events,
            )
        },
        || raw_sled_inserts(settings.events),
    )?;
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "events/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    }])
}

/// Raw sled: one insert per event, never flushed while timed.
fn raw_sled_inserts(events: usize) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let (_db, tree) = open_raw_sled(dir.path())?;
    let (value, _) = support::payload()?;
    let start = Instant::now();
    for i in 0..events {
        tree.insert(&raw_key(i)[..], &value[..])?;
    }
    let elapsed = start.elapsed();
    if tree.len() != events {
        return Err(format!("expected {events} keys, found {}", tree.len()).into());
    }
    Ok(support::rate(events, elapsed))
}
