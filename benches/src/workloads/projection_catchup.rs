//! `projection_catchup`: a projector catching up over a long log, against a raw scan and decode
//! of the same log.
//!
//! The log (1,000,000 events in the full run, 100,000 with `--quick`) is written once, untimed,
//! straight through the store: 1,000 accounts, each an `Opened` then `Deposited` events, appended
//! 100 events per request from 16 concurrent writers, buffered. Per round, alternating:
//!
//! - incarnate: a fresh runtime on the database with a projector that has never run (a new
//!   name each round, so it starts from position 0), timed from the end of `build` until
//!   `wait_for_projection(head)` returns. The projector is [`Folder`]: it decodes every
//!   `AccountEvent` and folds each account's balance into memory, writing no read model; its
//!   checkpoint is committed with every batch (exactly-once delivery; reads of 512 events,
//!   batches of up to 4,096 while it catches up).
//! - baseline: the same database opened with raw sled after the runtime is shut down: a
//!   `scan_prefix` of the log keyspace (`L` + position), each record decoded into the store's
//!   `EventEnvelope` with rmp-serde, then the same `AccountEvent` decode and fold.
//!
//! Ratio = incarnate events/s / raw events/s (target >= 0.7). In the last round the reference
//! `AccountBalances` projector (two table writes and a read per event) also catches up over the
//! whole log: `projection_catchup_balances`, against the same raw figure.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use incarnate::{
    AppendRequest, DomainEvent, Durability, EventEnvelope, EventFilter, EventStore, NewEvent,
    ProjectionError, Projector, ReadModelTx, SledStore, SledStoreConfig, StreamId,
};
use incarnate_actors::balances::AccountBalances;
use incarnate_actors::AccountEvent;
use tempfile::TempDir;
use tokio::runtime::Runtime;

use super::node::{account_id, decode_record, log_records, reopen_raw};
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

const ACCOUNTS: usize = 1_000;
const PER_APPEND: usize = 100;
const WRITERS: usize = 16;
const NAMES: [&str; 8] = [
    "folder_1", "folder_2", "folder_3", "folder_4", "folder_5", "folder_6", "folder_7", "folder_8",
];

static BUILT: Mutex<Option<TempDir>> = Mutex::new(None);

pub(crate) const WORKLOAD: Workload = Workload {
    name: "projection_catchup",
    about: "projector catch-up over 1,000,000 events vs raw sled scan + decode of the log",
    run_round,
    max_rounds: 0,
};

fn events(settings: &Settings) -> usize {
    if settings.quick {
        100_000
    } else {
        1_000_000
    }
}

/// Folds every account's balance in memory; writes nothing but its checkpoint.
struct Folder {
    name: &'static str,
    balances: HashMap<String, u64>,
}

/// The fold both sides do per event.
fn fold(balances: &mut HashMap<String, u64>, envelope: &EventEnvelope) -> Result<(), BoxError> {
    let event = AccountEvent::decode(
        &envelope.event_type,
        envelope.schema_version,
        &envelope.payload,
    )?;
    let id = envelope.stream.aggregate_id.as_str();
    let balance = match balances.get_mut(id) {
        Some(b) => b,
        None => balances.entry(id.to_owned()).or_default(),
    };
    match event {
        AccountEvent::Deposited { amount } => *balance += amount,
        AccountEvent::Withdrawn { amount } => *balance = balance.saturating_sub(amount),
        AccountEvent::Opened { .. } | AccountEvent::Closed => {}
    }
    Ok(())
}

#[async_trait]
impl Projector for Folder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().aggregate("account")
    }

    async fn handle(
        &mut self,
        envelope: &EventEnvelope,
        _tx: &mut ReadModelTx,
    ) -> Result<(), ProjectionError> {
        fold(&mut self.balances, envelope).map_err(ProjectionError::handler)
    }
}

/// Writes the log straight through the store.
fn build(runtime: &Runtime, path: &std::path::Path, total: usize) -> Result<(), BoxError> {
    let store = SledStore::open(SledStoreConfig::new(path).durability(Durability::Buffered {
        flush_interval_ms: 100,
    }))?;
    let opened = rmp_serde::to_vec(&AccountEvent::Opened { owner: "o".into() })?;
    let deposited = rmp_serde::to_vec(&AccountEvent::Deposited { amount: 1 })?;
    let per_account = total / ACCOUNTS;
    runtime.block_on(async {
        let mut tasks = Vec::with_capacity(WRITERS);
        for w in 0..WRITERS {
            let store = store.clone();
            let (opened, deposited) = (opened.clone(), deposited.clone());
            tasks.push(tokio::spawn(async move {
                let streams: Vec<usize> = (w..ACCOUNTS).step_by(WRITERS).collect();
                // Interleave the accounts in the log, one append of each in turn.
                for first in (0..per_account).step_by(PER_APPEND) {
                    for &a in &streams {
                        let events = (first..(first + PER_APPEND).min(per_account))
                            .map(|seq| {
                                let (tag, payload) = if seq == 0 {
                                    (AccountEvent::OPENED, opened.clone())
                                } else {
                                    (AccountEvent::DEPOSITED, deposited.clone())
                                };
                                NewEvent {
                                    event_id: uuid::Uuid::now_v7(),
                                    event_type: tag.to_owned(),
                                    schema_version: 1,
                                    causation: Default::default(),
                                    payload,
                                }
                            })
                            .collect();
                        let stream = StreamId::new("account", account_id(a));
                        store
                            .append(AppendRequest::new(stream, first as u64, events))
                            .await?;
                    }
                }
                Ok::<(), incarnate::StoreError>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let head = store.head();
        store.close().await?;
        if head != (per_account * ACCOUNTS) as u64 {
            return Err(format!("built {head} events").into());
        }
        Ok::<(), BoxError>(())
    })
}

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let total = events(settings);
    let mut built = BUILT.lock().map_err(|_| "lock poisoned")?;
    if built.is_none() {
        let dir = tempfile::tempdir()?;
        build(runtime, dir.path(), total)?;
        *built = Some(dir);
    }
    let path = built
        .as_ref()
        .map(|d| d.path().to_path_buf())
        .ok_or("no database")?;
    let name = NAMES[round % NAMES.len()];
    let (value, baseline) = super::support::alternate(
        round,
        || {
            catch_up(
                runtime,
                &path,
                total,
                |b| {
                    b.projector(Folder {
                        name,
                        balances: HashMap::new(),
                    })
                },
                name,
                true,
            )
        },
        || raw_scan(&path, total),
    )?;
    let mut samples = vec![Sample {
        name: WORKLOAD.name,
        unit: "events/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    }];
    if round + 1 >= settings.rounds {
        let balances = catch_up(
            runtime,
            &path,
            total,
            |b| b.projector(AccountBalances),
            AccountBalances::NAME,
            false,
        )?;
        samples.push(Sample {
            name: "projection_catchup_balances",
            unit: "events/s",
            better: Better::Higher,
            value: balances,
            baseline: Some(baseline),
        });
        *built = None;
    }
    Ok(samples)
}

/// Starts a runtime with the projector `add` registers, times its catch-up to the head (within
/// the `--perf-control` window if `profile`).
fn catch_up(
    runtime: &Runtime,
    path: &std::path::Path,
    total: usize,
    add: impl FnOnce(incarnate::RuntimeBuilder) -> incarnate::RuntimeBuilder,
    name: &str,
    profile: bool,
) -> Result<f64, BoxError> {
    let path = path.to_path_buf();
    let builder = incarnate::Runtime::builder().configure(|c| {
        c.store.path = path;
        c.store.durability = incarnate::DurabilityMode::Buffered;
        c.runtime.command_timeout_ms = 600_000;
    });
    let rt = add(builder).build()?;
    let start = Instant::now();
    runtime.block_on(async {
        let head = rt.store().head();
        let caught_up = async { Ok(rt.wait_for_projection(name, head).await?) };
        if profile {
            super::support::profiled(caught_up).await?;
        } else {
            caught_up.await?;
        }
        let elapsed = start.elapsed();
        let status = rt.projection_status(name)?;
        rt.shutdown().await?;
        if head != total as u64 {
            return Err(format!("head {head}, expected {total} ({status:?})").into());
        }
        Ok::<f64, BoxError>(total as f64 / elapsed.max(Duration::from_nanos(1)).as_secs_f64())
    })
}

/// Raw sled: scan the log keyspace, decode each record and fold. Returns events/s.
fn raw_scan(path: &std::path::Path, total: usize) -> Result<f64, BoxError> {
    let db = reopen_raw(path)?;
    let tree = db.open_tree("incarnate")?;
    let mut balances: HashMap<String, u64> = HashMap::new();
    let start = Instant::now();
    let mut seen = 0;
    for item in tree.scan_prefix([b'L']) {
        let (_, value) = item?;
        for record in log_records(&value)? {
            let envelope = decode_record(record)?;
            if *envelope.stream.aggregate_type == *"account" {
                fold(&mut balances, &envelope)?;
            }
            seen += 1;
        }
    }
    let elapsed = start.elapsed();
    if seen != total {
        return Err(format!("scanned {seen} events, expected {total}").into());
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}
