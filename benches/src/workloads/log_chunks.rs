//! `log_chunks`: what the store's log would gain from one sled insert per commit group instead
//! of one per event. Not a target: a measurement of the next lever, on raw sled.
//!
//! The store writes one log record per event, keyed by global position (increasing keys). In
//! the command workloads sled's `Tree::insert` is most of the committer's time, and the
//! committer is the busiest thread. Both sides here write the same events (the size of a
//! stored `Deposited` record) at increasing keys, from one thread, never flushed:
//!
//! - baseline: one insert per event, as the store does today;
//! - value: one insert per chunk of [`CHUNK`] events (their records concatenated), keyed by the
//!   chunk's first position, as a log that stores each commit group as one value would.
//!
//! `log_chunks_lookup` checks that finding one event does not get dearer: a `get` of its key per
//! event (baseline) against a `get_lt` of the next key, which returns the chunk holding it.

use std::time::Instant;

use tokio::runtime::Runtime;

use super::node::deposit_record_len;
use super::support::{alternate, open_raw_sled};
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

/// Events per chunk: about one commit group of `buffered_many`.
pub(crate) const CHUNK: usize = 32;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "log_chunks",
    about: "raw sled: one insert per 32-event chunk vs one per event (events/s), and lookups",
    run_round,
    max_rounds: 0,
};

fn run_round(
    _runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let events = if settings.quick { 50_000 } else { 200_000 };
    let value_len = deposit_record_len()?;
    let ((chunked, chunked_lookup), (single, single_lookup)) = alternate(
        round,
        || write_and_look_up(events, value_len, CHUNK),
        || write_and_look_up(events, value_len, 1),
    )?;
    Ok(vec![
        Sample {
            name: WORKLOAD.name,
            unit: "events/s",
            better: Better::Higher,
            value: chunked,
            baseline: Some(single),
        },
        Sample {
            name: "log_chunks_lookup",
            unit: "ns",
            better: Better::Lower,
            value: chunked_lookup,
            baseline: Some(single_lookup),
        },
    ])
}

/// Writes `events` records of `value_len` bytes, `chunk` per insert, then looks up every 7th
/// event by position. Returns events/s written and ns per lookup.
fn write_and_look_up(
    events: usize,
    value_len: usize,
    chunk: usize,
) -> Result<(f64, f64), BoxError> {
    let dir = tempfile::tempdir()?;
    let (_db, tree) = open_raw_sled(dir.path())?;
    let value = vec![0x5a_u8; value_len * chunk];
    let key = |position: usize| (position as u64 + 1).to_be_bytes();
    let start = Instant::now();
    for first in (0..events).step_by(chunk) {
        tree.insert(key(first), &value[..])?;
    }
    let written = events as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut found = 0_usize;
    for position in (0..events).step_by(7) {
        let hit = if chunk == 1 {
            tree.get(key(position))?.is_some()
        } else {
            // The chunk holding `position` is the last one keyed at or below it.
            match tree.get_lt(key(position + 1))? {
                Some((first, _)) => first.as_ref() == key(position - position % chunk),
                None => false,
            }
        };
        found += usize::from(hit);
    }
    let looked_up = start.elapsed().as_secs_f64() * 1e9 / found.max(1) as f64;
    let expected = events.div_ceil(7);
    if found != expected {
        return Err(format!("found {found} of {expected} events").into());
    }
    Ok((written, looked_up))
}
