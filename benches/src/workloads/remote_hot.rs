//! `remote_hot`: what pipelined appends buy when each append takes a network round trip.
//!
//! One hot `Account` on a store whose every append is acknowledged 1 ms after it is applied (an
//! in-memory store behind a simulated round trip, as a replicated or networked log would
//! answer; appends still apply in order). Commands arrive open-loop at [`RATE`] per second
//! (`support::open_loop`: each its own task), each one's latency timed from the tick that sent
//! it to its reply.
//! incarnate with the default `max_appends_in_flight = 4` against itself with
//! `max_appends_in_flight = 1` (one append at a time, as before pipelining), in the same round.
//! Figure: the median latency; ratio = pipelined / one at a time (lower is better).
//!
//! Closed-loop callers would show nothing here: they all wait in the one append in flight and
//! then all fit in the next, so both sides send one append per round trip. Open-loop arrivals
//! are where one at a time costs: a command that arrives while an append is in flight waits for
//! it before its own starts.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use incarnate::{
    AppendRequest, AppendResult, CommandRecord, EventEnvelope, EventStore, KvWrite, MemoryStore,
    SnapshotCriteria, SnapshotRecord, StoreError, StreamId, StreamSlice,
};
use incarnate_actors::Account;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::node::{deposit, open};
use super::support::{alternate, open_loop};
use super::{Better, Sample, Settings, Workload};
use crate::stats::median;
use crate::BoxError;

/// Commands per second, open-loop.
const RATE: f64 = 4_000.0;
/// The simulated round trip of one append.
const ROUND_TRIP: Duration = Duration::from_millis(1);

pub(crate) const WORKLOAD: Workload = Workload {
    name: "remote_hot",
    about: "one Account, 4,000 commands/s open-loop, 1 ms per append: p50 latency, 4 appends in flight vs 1",
    run_round,
    max_rounds: 0,
};

fn run_round(
    runtime: &Runtime,
    settings: &Settings,
    round: usize,
) -> Result<Vec<Sample>, BoxError> {
    let commands = if settings.quick { 2_000 } else { 8_000 };
    let (value, baseline) = alternate(
        round,
        || p50_latency(runtime, 4, commands),
        || p50_latency(runtime, 1, commands),
    )?;
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "µs p50",
        better: Better::Lower,
        value,
        baseline: Some(baseline),
    }])
}

/// The median latency (µs) of `commands` deposits to one account arriving at [`RATE`], with
/// `in_flight` appends allowed at once.
fn p50_latency(runtime: &Runtime, in_flight: usize, commands: usize) -> Result<f64, BoxError> {
    let rt = incarnate::Runtime::builder()
        .configure(|c| {
            c.aggregates.default.max_appends_in_flight = in_flight;
            c.aggregates.default.mailbox_capacity = commands;
        })
        .store(RoundTripStore(Arc::new(MemoryStore::new())))
        .register::<Account>()
        .build()?;
    runtime.block_on(async {
        rt.send::<Account>("hot", open()).await?;
        let latencies = open_loop(RATE, commands, |_| {
            let rt = rt.clone();
            async move {
                rt.send::<Account>("hot", deposit()).await?;
                Ok(())
            }
        })
        .await?;
        let (_, version) = rt.state::<Account>("hot").await?;
        rt.shutdown().await?;
        if version != commands as u64 + 1 {
            return Err(format!("ended at version {version}, expected {}", commands + 1).into());
        }
        Ok(median(&latencies))
    })
}

/// A [`MemoryStore`] whose appends are answered [`ROUND_TRIP`] after they are applied. The
/// memory store applies an append on its first poll, so appends stay in order.
struct RoundTripStore(Arc<MemoryStore>);

#[async_trait]
impl EventStore for RoundTripStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        let result = self.0.append(request).await;
        tokio::time::sleep(ROUND_TRIP).await;
        result
    }

    fn preserves_append_order(&self) -> bool {
        self.0.preserves_append_order()
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<StreamSlice, StoreError> {
        self.0.read_stream(stream, from, to, max).await
    }

    async fn highest_sequence(&self, stream: &StreamId) -> Result<u64, StoreError> {
        self.0.highest_sequence(stream).await
    }

    async fn read_log(&self, from: u64, max: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        self.0.read_log(from, max).await
    }

    fn head(&self) -> u64 {
        self.0.head()
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.0.watch_head()
    }

    async fn delete_to(&self, stream: &StreamId, to_sequence: u64) -> Result<(), StoreError> {
        self.0.delete_to(stream, to_sequence).await
    }

    async fn save_snapshot(&self, snapshot: SnapshotRecord) -> Result<(), StoreError> {
        self.0.save_snapshot(snapshot).await
    }

    async fn latest_snapshot(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        self.0.latest_snapshot(stream, criteria).await
    }

    async fn delete_snapshots(
        &self,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<u64, StoreError> {
        self.0.delete_snapshots(stream, criteria).await
    }

    async fn command_records(&self, stream: &StreamId) -> Result<Vec<CommandRecord>, StoreError> {
        self.0.command_records(stream).await
    }

    async fn kv_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.kv_get(table, key).await
    }

    async fn kv_scan(
        &self,
        table: &str,
        from: &[u8],
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.0.kv_scan(table, from, max).await
    }

    async fn kv_commit(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        self.0.kv_commit(writes).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.0.flush().await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.0.close().await
    }
}
