//! `floor`: what the command workloads' load shapes allow on this machine, whoever serves them,
//! and where incarnate's layers stand between that and the raw baselines.
//!
//! The targets of `durable_many`, `durable_hot`, `buffered_many` and `latency_sync` compare
//! callers that each wait for their reply against raw sled loops that wait for nobody. This
//! workload serves the *same callers* (tokio tasks on the bench runtime, as incarnate's callers
//! are) with less and less machinery, each against the raw baseline of the same round:
//!
//! - **ideal server** (`floor_*`): each caller sends a pre-sized record and a reply channel to
//!   one writer thread, which takes everything queued, writes it to raw sled exactly as the
//!   baseline does (`sync`: one `apply_batch` + `Db::flush()` + `fdatasync`; buffered:
//!   `Tree::insert` per record) and answers. No actors, no domain, no encoding, no metadata: the
//!   least any server can do for callers that wait, so its ratio is the best any implementation
//!   can show for that load shape here.
//! - **ideal server behind actors** (`floor_actor_*`): the same writer, with an actix actor per
//!   stream (on two arbiters, as the runtime runs them) between the callers and the writer: the
//!   floor of a design where every stream's commands go through its own actor.
//! - **the store alone** (`floor_store_*`): incarnate's `SledStore`, appended to directly by the
//!   same callers (one event per append, the payload of a `Deposited`): the store's cost
//!   without the actors.
//!
//! Metrics: `floor_durable_many`, `floor_actor_durable_many`, `floor_store_durable_many` (1,000
//! callers over 10,000 streams, `sync`; baseline sled batch(512) + flush + fsync);
//! `floor_durable_hot` (64 callers, one stream); `floor_buffered_many`,
//! `floor_actor_buffered_many`, `floor_store_buffered_many` (no flush; baseline sled insert per
//! event); `floor_latency_sync_p50` / `_p99` (the ideal server, open loop at the rate
//! `latency_sync` offers; baseline the p50 of one `fdatasync`).

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, Addr, Context, Handler, Message, ResponseFuture};
use incarnate::Durability;
use incarnate_actors::AccountEvent;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

use super::durable_hot::CALLERS as HOT_CALLERS;
use super::durable_many::{self, AGGREGATES, BATCH, CALLERS};
use super::latency_sync::{fsync_p50, percentile, target_rate};
use super::node::{deposit_record_len, raw_group_commit, raw_inserts, raw_key};
use super::support::{alternate, closed_loop_appends, open_loop, open_raw_sled, INCARNATE_ONLY};
use super::{Better, Sample, Settings, Workload};
use crate::BoxError;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "floor",
    about: "the callers of durable_many/_hot, buffered_many, latency_sync served by an ideal sled writer, the same behind actors, and the store alone",
    run_round,
    max_rounds: 0,
};

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let value_len = deposit_record_len()?;
    let durable = durable_many::commands(settings);
    let buffered = if settings.quick { 20_000 } else { 80_000 };
    let many = |front| {
        closed_loop(
            runtime,
            front,
            Writes::Durable,
            AGGREGATES,
            CALLERS,
            durable,
            value_len,
        )
    };
    let [many_base, many, many_actor, many_store] = rotated(
        round,
        [
            &|| raw_group_commit(durable, AGGREGATES, value_len, BATCH),
            &|| many(Front::Ideal),
            &|| many(Front::Actors),
            &|| many(Front::Store),
        ],
    )?;
    let [hot_base, hot] = rotated(
        round,
        [&|| raw_group_commit(durable, 1, value_len, BATCH), &|| {
            closed_loop(
                runtime,
                Front::Ideal,
                Writes::Durable,
                1,
                HOT_CALLERS,
                durable,
                value_len,
            )
        }],
    )?;
    let unflushed = |front| {
        closed_loop(
            runtime,
            front,
            Writes::Buffered,
            AGGREGATES,
            CALLERS,
            buffered,
            value_len,
        )
    };
    let [unflushed_base, unflushed, unflushed_actor, unflushed_store] = rotated(
        round,
        [
            &|| raw_inserts(buffered, AGGREGATES, value_len),
            &|| unflushed(Front::Ideal),
            &|| unflushed(Front::Actors),
            &|| unflushed(Front::Store),
        ],
    )?;
    let rate = target_rate(runtime, settings)?;
    let seconds = if settings.quick { 1.0 } else { 3.0 };
    let commands = (rate * seconds).round() as usize;
    let (latencies, fsync) = alternate(
        round,
        || open_loop_latencies(runtime, rate, commands, value_len),
        fsync_p50,
    )?;
    let fsync_us = fsync.as_secs_f64() * 1e6;
    let throughput = |name, value, baseline| Sample {
        name,
        unit: "commands/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    };
    let latency = |name, value| Sample {
        name,
        unit: "µs",
        better: Better::Lower,
        value,
        baseline: Some(fsync_us),
    };
    Ok(vec![
        throughput("floor_durable_many", many, many_base),
        throughput("floor_actor_durable_many", many_actor, many_base),
        throughput("floor_store_durable_many", many_store, many_base),
        throughput("floor_durable_hot", hot, hot_base),
        throughput("floor_buffered_many", unflushed, unflushed_base),
        throughput("floor_actor_buffered_many", unflushed_actor, unflushed_base),
        throughput("floor_store_buffered_many", unflushed_store, unflushed_base),
        latency("floor_latency_sync_p50", percentile(&latencies, 0.50)),
        latency("floor_latency_sync_p99", percentile(&latencies, 0.99)),
    ])
}

/// Runs every measurement once, starting with number `round % N`, so drift within a round does
/// not always favour the same one; returns the results in the given order. The first is the
/// baseline: with `--incarnate-only` it is skipped and reported as 0.
fn rotated<const N: usize>(
    round: usize,
    runs: [&dyn Fn() -> Result<f64, BoxError>; N],
) -> Result<[f64; N], BoxError> {
    let mut results = [0.0; N];
    for k in 0..N {
        let i = (round + k) % N;
        if i == 0 && INCARNATE_ONLY.load(Ordering::Relaxed) {
            continue;
        }
        results[i] = runs[i]()?;
    }
    Ok(results)
}

/// What stands between the callers and the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    /// Nothing: callers hand their record to the ideal server's writer thread.
    Ideal,
    /// An actix actor per stream, which hands the record to the writer and answers when it does.
    Actors,
    /// incarnate's `SledStore` instead of the ideal server (no actors).
    Store,
}

/// How the ideal server writes what it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// One `apply_batch`, `Db::flush()` and `fdatasync` per group, then the replies.
    Durable,
    /// `Tree::insert` per record, then the replies; never flushed.
    Buffered,
}

/// One caller's record and the channel its reply goes back on.
struct Write {
    key: [u8; 16],
    value: Vec<u8>,
    done: oneshot::Sender<()>,
}

/// The ideal server on a fresh raw sled database: a store thread and the sender callers use.
struct IdealServer {
    writes: mpsc::UnboundedSender<Write>,
    thread: std::thread::JoinHandle<Result<usize, String>>,
    _dir: tempfile::TempDir,
}

impl IdealServer {
    fn start(mode: Writes) -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let (db, tree) = open_raw_sled(dir.path())?;
        let data_file = File::open(dir.path().join("db"))?;
        let (writes, mut rx) = mpsc::unbounded_channel::<Write>();
        let thread = std::thread::Builder::new()
            .name("floor-writer".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut group = vec![first];
                    while group.len() < BATCH {
                        match rx.try_recv() {
                            Ok(write) => group.push(write),
                            Err(_) => break,
                        }
                    }
                    let written = match mode {
                        Writes::Durable => {
                            let mut batch = sled::Batch::default();
                            for w in &group {
                                batch.insert(&w.key[..], &w.value[..]);
                            }
                            tree.apply_batch(batch)
                                .and_then(|()| db.flush().map(drop))
                                .map_err(|e| e.to_string())
                                .and_then(|()| data_file.sync_data().map_err(|e| e.to_string()))
                        }
                        Writes::Buffered => group.iter().try_for_each(|w| {
                            tree.insert(&w.key[..], &w.value[..])
                                .map(drop)
                                .map_err(|e| e.to_string())
                        }),
                    };
                    written?;
                    for w in group {
                        let _ = w.done.send(());
                    }
                }
                Ok(tree.len())
            })?;
        Ok(Self {
            writes,
            thread,
            _dir: dir,
        })
    }

    /// Stops the thread and checks it stored `expected` records.
    fn finish(self, expected: usize) -> Result<(), BoxError> {
        drop(self.writes);
        let stored = self
            .thread
            .join()
            .map_err(|_| "the floor writer panicked")??;
        if stored != expected {
            return Err(
                format!("the floor writer stored {stored} records, expected {expected}").into(),
            );
        }
        Ok(())
    }
}

/// `commands` records from `callers` closed-loop callers over `streams` streams through
/// `front`; records/s from the first send to the last reply.
fn closed_loop(
    runtime: &Runtime,
    front: Front,
    mode: Writes,
    streams: usize,
    callers: usize,
    commands: usize,
    value_len: usize,
) -> Result<f64, BoxError> {
    if front == Front::Store {
        return store_closed_loop(runtime, mode, streams, callers, commands);
    }
    let server = IdealServer::start(mode)?;
    let actors = match front {
        Front::Actors => Some(StreamActors::start(&server.writes, streams, value_len)?),
        _ => None,
    };
    let path = match &actors {
        Some(actors) => Path::Actors(actors.addrs.clone()),
        None => Path::Ideal(Arc::new(server.writes.clone())),
    };
    let elapsed = runtime.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(callers);
        for t in 0..callers {
            let path = path.clone();
            let count = commands / callers + usize::from(t < commands % callers);
            tasks.push(tokio::spawn(async move {
                for k in 0..count {
                    path.write(k * callers + t, streams, value_len).await?;
                }
                Ok::<(), BoxError>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok::<_, BoxError>(start.elapsed())
    })?;
    drop(path);
    if let Some(actors) = actors {
        actors.stop()?;
    }
    server.finish(commands)?;
    Ok(commands as f64 / elapsed.as_secs_f64())
}

/// How a caller reaches the writer.
#[derive(Clone)]
enum Path {
    Ideal(Arc<mpsc::UnboundedSender<Write>>),
    Actors(Arc<[Addr<StreamActor>]>),
}

impl Path {
    /// Sends record `i` (over `streams` interleaved streams) and waits for its reply.
    async fn write(&self, i: usize, streams: usize, value_len: usize) -> Result<(), BoxError> {
        match self {
            Path::Ideal(writes) => Ok(hand_over(writes, i, streams, value_len).await?),
            Path::Actors(addrs) => {
                let addr = addrs.get(i % streams).ok_or("no actor for the stream")?;
                Ok(addr.send(Put(i)).await??)
            }
        }
    }
}

/// Hands record `i` to the writer and waits until it is written.
async fn hand_over(
    writes: &mpsc::UnboundedSender<Write>,
    i: usize,
    streams: usize,
    value_len: usize,
) -> Result<(), String> {
    let (done, reply) = oneshot::channel();
    let write = Write {
        key: raw_key(i, streams),
        value: vec![0x5a; value_len],
        done,
    };
    writes.send(write).map_err(|_| "the floor writer stopped")?;
    reply
        .await
        .map_err(|_| "the floor writer dropped a reply")?;
    Ok(())
}

/// Write record `i`; answered once the writer has.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
struct Put(usize);

/// One stream's actor in front of the ideal server's writer.
struct StreamActor {
    writes: mpsc::UnboundedSender<Write>,
    streams: usize,
    value_len: usize,
}

impl Actor for StreamActor {
    type Context = Context<Self>;
}

impl Handler<Put> for StreamActor {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, Put(i): Put, _: &mut Context<Self>) -> Self::Result {
        let writes = self.writes.clone();
        let (streams, value_len) = (self.streams, self.value_len);
        Box::pin(async move { hand_over(&writes, i, streams, value_len).await })
    }
}

/// An actix system with two arbiters (one per core, as the runtime starts them) hosting one
/// [`StreamActor`] per stream.
struct StreamActors {
    addrs: Arc<[Addr<StreamActor>]>,
    system: actix::System,
    thread: std::thread::JoinHandle<()>,
}

impl StreamActors {
    fn start(
        writes: &mpsc::UnboundedSender<Write>,
        streams: usize,
        value_len: usize,
    ) -> Result<Self, BoxError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("floor-system".into())
            .spawn(move || {
                let system = actix::System::new();
                let arbiters = [actix::Arbiter::new(), actix::Arbiter::new()];
                let handles = arbiters.iter().map(|a| a.handle()).collect::<Vec<_>>();
                let _ = tx.send((actix::System::current(), handles));
                let _ = system.run();
            })?;
        let (system, arbiters) = rx.recv()?;
        let addrs = (0..streams)
            .map(|n| {
                let actor = StreamActor {
                    writes: writes.clone(),
                    streams,
                    value_len,
                };
                StreamActor::start_in_arbiter(&arbiters[n % arbiters.len()], |_| actor)
            })
            .collect();
        Ok(Self {
            addrs,
            system,
            thread,
        })
    }

    /// Stops the actors (dropping their senders to the writer) and the system.
    fn stop(self) -> Result<(), BoxError> {
        drop(self.addrs);
        self.system.stop();
        self.thread
            .join()
            .map_err(|_| "the floor actor system panicked")?;
        Ok(())
    }
}

/// The store alone: `commands` single-event appends of a `Deposited` payload to a fresh
/// [`SledStore`](incarnate::SledStore) from `callers` closed-loop callers over `streams`
/// streams; appends/s.
fn store_closed_loop(
    runtime: &Runtime,
    mode: Writes,
    streams: usize,
    callers: usize,
    commands: usize,
) -> Result<f64, BoxError> {
    let durability = match mode {
        Writes::Durable => Durability::Sync,
        Writes::Buffered => Durability::Buffered {
            flush_interval_ms: 100,
        },
    };
    let payload = rmp_serde::to_vec(&AccountEvent::Deposited { amount: 1 })?;
    closed_loop_appends(
        runtime,
        durability,
        callers,
        streams,
        commands,
        (payload, AccountEvent::DEPOSITED),
    )
}

/// `commands` durable records sent open-loop at `rate` per second over [`AGGREGATES`] streams;
/// each latency in µs.
fn open_loop_latencies(
    runtime: &Runtime,
    rate: f64,
    commands: usize,
    value_len: usize,
) -> Result<Vec<f64>, BoxError> {
    let server = IdealServer::start(Writes::Durable)?;
    let writes = Arc::new(server.writes.clone());
    let latencies = runtime.block_on(open_loop(rate, commands, |n| {
        let writes = writes.clone();
        async move { Ok(hand_over(&writes, n, AGGREGATES, value_len).await?) }
    }))?;
    drop(writes);
    server.finish(commands)?;
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn rotated_runs_each_once_from_a_turning_start_and_keeps_their_order() {
        for round in 0..4 {
            let order = RefCell::new(Vec::new());
            let run = |n: usize| {
                let order = &order;
                move || {
                    order.borrow_mut().push(n);
                    Ok(n as f64 * 10.0)
                }
            };
            let (a, b, c) = (run(0), run(1), run(2));
            let results = rotated(round, [&a, &b, &c]).map_err(|e| e.to_string());
            assert_eq!(results, Ok([0.0, 10.0, 20.0]));
            let first = round % 3;
            let expected: Vec<usize> = (0..3).map(|k| (first + k) % 3).collect();
            assert_eq!(*order.borrow(), expected);
        }
    }
}
