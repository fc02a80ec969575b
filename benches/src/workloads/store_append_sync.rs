//! `store_append_sync`: durable appends per second.
//!
//! incarnate: [`SledStore`](incarnate::SledStore) with `Durability::Sync`, 1,000 streams, 64
//! concurrent appenders, one 200-byte event per append; every acknowledged append is flushed and
//! fsynced (group commit in the store's committer).
//!
//! Baseline: raw sled, the durable group-commit ceiling: `Tree::apply_batch` of 512 inserts
//! (16-byte keys, 200-byte values) + `Db::flush()` + `fdatasync` of the `db` file (sled's flush
//! alone does not reach the disk; see limits.md).

use std::fs::File;
use std::time::Instant;

use incarnate::Durability;
use tokio::runtime::Runtime;

use super::support::{self, alternate, incarnate_appends, open_raw_sled, raw_key};
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

/// Events per raw sled batch.
const BATCH: usize = 512;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "store_append_sync",
    about: "durable appends/s: SledStore Sync, 64 appenders, 1,000 streams vs sled batch(512)+flush+fsync",
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
        || incarnate_appends(runtime, Durability::Sync, settings.events),
        || raw_sled_batches(settings.events),
    )?;
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "events/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    }])
}

/// Raw sled: batches of [`BATCH`] inserts, each made durable with flush + fdatasync.
fn raw_sled_batches(events: usize) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let (db, tree) = open_raw_sled(dir.path())?;
    let data_file = File::open(dir.path().join("db"))?;
    let (value, _) = support::payload()?;
    let start = Instant::now();
    for first in (0..events).step_by(BATCH) {
        let mut batch = sled::Batch::default();
        for i in first..(first + BATCH).min(events) {
            batch.insert(&raw_key(i)[..], &value[..]);
        }
        tree.apply_batch(batch)?;
        db.flush()?;
        data_file.sync_data()?;
    }
    let elapsed = start.elapsed();
    if tree.len() != events {
        return Err(format!("expected {events} keys, found {}", tree.len()).into());
    }
    Ok(support::rate(events, elapsed))
}
