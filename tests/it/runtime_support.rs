//! Helpers of the runtime tests: runtimes on a temporary sled directory with test-sized limits,
//! a fault-injecting [`EventStore`] wrapper, test-only aggregates, and small async utilities.
//!
//! The wrapper ([`FaultStore`]) injects faults at the storage boundary only: every call that is
//! not told to fail or wait goes to a real store (sled or memory), so the runtime under test is
//! the real one, recovering from real data.
// Shared helpers: not every test module uses every one.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use incarnate::{
    Aggregate, AppendRequest, AppendResult, CommandError, CommandRecord, Committed, Config,
    DomainEvent, EventEnvelope, EventStore, NewEvent, Runtime, RuntimeError, SledStore,
    SnapshotCriteria, SnapshotRecord, StoreError, StreamId, StreamSlice,
};
use incarnate_actors::account::Account;
use serde::{Deserialize, Serialize};

use crate::store_wrapper::{Wrap, Wrapped};

pub(crate) use crate::store_wrapper::Gate;
pub(crate) use crate::support::{shutdown, test_config, within, TempDb, SIGNAL_TIMEOUT};

// ---------------------------------------------------------------------------------------------
// Runtimes on a temporary directory
// ---------------------------------------------------------------------------------------------

/// A temporary sled directory that outlives the runtimes built on it, so a test can shut one
/// down (which closes the store) and build the next one on the same data: a real restart.
pub(crate) struct Node {
    db: TempDb,
}

impl Node {
    pub(crate) fn new() -> Self {
        Self { db: TempDb::new() }
    }

    /// The sled database directory.
    pub(crate) fn path(&self) -> &Path {
        self.db.path()
    }

    /// The test configuration on this directory, changed by `f`.
    pub(crate) fn config(&self, f: impl FnOnce(&mut Config)) -> Config {
        let mut config = test_config(self.path());
        f(&mut config);
        config
    }

    /// A runtime with the test configuration.
    pub(crate) fn runtime(&self) -> Runtime {
        self.runtime_with(|_| {})
    }

    /// A runtime with the test configuration changed by `f`, hosting every test aggregate.
    pub(crate) fn runtime_with(&self, f: impl FnOnce(&mut Config)) -> Runtime {
        register_all(Runtime::builder().config(self.config(f)))
            .build()
            .expect("build the runtime")
    }

    /// A runtime whose sled store is wrapped in a [`FaultStore`]; the returned handle arms the
    /// faults.
    pub(crate) fn faulty_runtime_with(
        &self,
        f: impl FnOnce(&mut Config),
    ) -> (Runtime, Arc<Faults>) {
        let config = self.config(f);
        let sled = SledStore::open(config.store.sled_config()).expect("open the sled store");
        let (store, faults) = FaultStore::wrap(sled);
        let rt = register_all(Runtime::builder().config(config).store(store))
            .build()
            .expect("build the runtime");
        (rt, faults)
    }

    pub(crate) fn faulty_runtime(&self) -> (Runtime, Arc<Faults>) {
        self.faulty_runtime_with(|_| {})
    }
}

fn register_all(builder: incarnate::RuntimeBuilder) -> incarnate::RuntimeBuilder {
    builder
        .register::<Account>()
        .register::<Tally>()
        .register::<Fragile>()
}

// ---------------------------------------------------------------------------------------------
// Test aggregates
// ---------------------------------------------------------------------------------------------

/// A counter with an order-sensitive digest: the smallest aggregate on which lost, duplicated
/// or reordered events all show.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Tally {
    /// Sum of every value added.
    pub(crate) total: u64,
    /// Number of values added.
    pub(crate) count: u64,
    /// Order-sensitive fold of every value added.
    pub(crate) digest: u64,
    /// Events applied by this incarnation (not persisted, not compared): after a recovery it is
    /// the number of events replayed on top of the snapshot.
    #[serde(skip)]
    pub(crate) applied: u64,
}

impl PartialEq for Tally {
    fn eq(&self, other: &Self) -> bool {
        (self.total, self.count, self.digest) == (other.total, other.count, other.digest)
    }
}

impl Tally {
    /// The state after adding `values` in order.
    pub(crate) fn of(values: impl IntoIterator<Item = u64>) -> Self {
        let mut state = Self::default();
        for v in values {
            state.apply(&TallyEvent::Added(v));
        }
        state.applied = 0;
        state
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TallyCommand {
    /// Adds one value (rejected if 0).
    Add(u64),
    /// Adds every value in one command: one event each, all or none (rejected if any is 0).
    AddAll(Vec<u64>),
    /// Adds `add` unless the total would exceed `limit`.
    AddAtMost { add: u64, limit: u64 },
    /// Emits nothing.
    Nothing,
    /// `handle` panics.
    Panic,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TallyEvent {
    Added(u64),
}

impl DomainEvent for TallyEvent {
    fn event_type(&self) -> &'static str {
        "Added"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum TallyError {
    #[error("zero is not a value")]
    Zero,
    #[error("total {total} + {add} exceeds {limit}")]
    OverLimit { total: u64, add: u64, limit: u64 },
}

pub(crate) const HANDLE_PANIC_MESSAGE: &str = "tally handle panicked on purpose";

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = TallyError;

    fn handle(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, TallyError> {
        match command {
            TallyCommand::Add(0) => Err(TallyError::Zero),
            TallyCommand::Add(v) => Ok(vec![TallyEvent::Added(*v)]),
            TallyCommand::AddAll(values) => {
                if values.contains(&0) {
                    return Err(TallyError::Zero);
                }
                Ok(values.iter().map(|v| TallyEvent::Added(*v)).collect())
            }
            TallyCommand::AddAtMost { add, limit } => {
                if self.total + add > *limit {
                    return Err(TallyError::OverLimit {
                        total: self.total,
                        add: *add,
                        limit: *limit,
                    });
                }
                Ok(vec![TallyEvent::Added(*add)])
            }
            TallyCommand::Nothing => Ok(Vec::new()),
            TallyCommand::Panic => panic!("{HANDLE_PANIC_MESSAGE}"),
        }
    }

    fn apply(&mut self, event: &TallyEvent) {
        let TallyEvent::Added(v) = event;
        self.total += v;
        self.count += 1;
        self.digest = self.digest.rotate_left(7) ^ v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.applied += 1;
    }
}

/// While set, [`Fragile::apply`] panics on [`FRAGILE_POISON`]. Process-wide: only the one test
/// that owns it (in `runtime_activation`) may touch it, through [`ArmFragile`].
static FRAGILE_ARMED: AtomicBool = AtomicBool::new(false);

/// The value whose event `Fragile::apply` panics on while armed.
pub(crate) const FRAGILE_POISON: u64 = 666;

/// Arms [`Fragile`]'s panic until dropped (also when the test fails).
pub(crate) struct ArmFragile;

impl ArmFragile {
    pub(crate) fn arm() -> Self {
        FRAGILE_ARMED.store(true, Ordering::SeqCst);
        ArmFragile
    }
}

impl Drop for ArmFragile {
    fn drop(&mut self) {
        FRAGILE_ARMED.store(false, Ordering::SeqCst);
    }
}

/// A sum whose `apply` panics on [`FRAGILE_POISON`] while [`ArmFragile`] is alive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fragile {
    pub(crate) total: u64,
}

impl Aggregate for Fragile {
    const TYPE: &'static str = "fragile";
    type Command = u64;
    type Event = TallyEvent;
    type Error = TallyError;

    fn handle(&self, value: &u64) -> Result<Vec<TallyEvent>, TallyError> {
        Ok(vec![TallyEvent::Added(*value)])
    }

    fn apply(&mut self, event: &TallyEvent) {
        let TallyEvent::Added(v) = event;
        if *v == FRAGILE_POISON && FRAGILE_ARMED.load(Ordering::SeqCst) {
            panic!("fragile apply panicked on purpose");
        }
        self.total += v;
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the store
// ---------------------------------------------------------------------------------------------

/// The stream of aggregate `A` with id `id`.
pub(crate) fn stream_of<A: Aggregate>(id: &str) -> StreamId {
    StreamId::new(A::TYPE, id)
}

/// Every readable event of `A`'s aggregate `id`.
pub(crate) async fn stored<A: Aggregate>(store: &dyn EventStore, id: &str) -> StreamSlice {
    let stream = stream_of::<A>(id);
    store
        .read_stream(&stream, 1, u64::MAX, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("read {stream}: {e}"))
}

/// Decodes a stored event of `A`.
pub(crate) fn decode<A: Aggregate>(envelope: &EventEnvelope) -> A::Event {
    A::Event::decode(
        &envelope.event_type,
        envelope.schema_version,
        &envelope.payload,
    )
    .unwrap_or_else(|e| panic!("decode {}#{}: {e}", envelope.stream, envelope.sequence))
}

/// The fold of every event of `A`'s aggregate `id` and its version, checking on the way that
/// the stream is dense from 1 (so only for streams whose events were never deleted).
pub(crate) async fn fold<A: Aggregate>(store: &dyn EventStore, id: &str) -> (A, u64) {
    let slice = stored::<A>(store, id).await;
    let mut state = A::default();
    for (envelope, sequence) in slice.events.iter().zip(1..) {
        assert_eq!(
            envelope.sequence, sequence,
            "{}: the stream is not dense from 1",
            envelope.stream
        );
        state.apply(&decode::<A>(envelope));
    }
    assert_eq!(
        slice.events.len() as u64,
        slice.highest_sequence,
        "{}: events are missing",
        stream_of::<A>(id)
    );
    (state, slice.highest_sequence)
}

/// The values of a tally's readable events, in sequence order.
pub(crate) fn tally_values(slice: &StreamSlice) -> Vec<u64> {
    slice
        .events
        .iter()
        .map(|e| match decode::<Tally>(e) {
            TallyEvent::Added(v) => v,
        })
        .collect()
}

/// An encoded event of `A`, as another writer would append it straight to the store.
pub(crate) fn foreign_event<E: DomainEvent>(event: &E) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: event.event_type().to_owned(),
        schema_version: event.schema_version(),
        causation: Default::default(),
        payload: rmp_serde::to_vec(event).expect("encode"),
    }
}

// ---------------------------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------------------------

/// The runtime error of a failed command, failing the test on success or on a rejection.
pub(crate) fn runtime_error<E: std::fmt::Debug, T: std::fmt::Debug>(
    result: Result<T, CommandError<E>>,
) -> RuntimeError {
    match result {
        Err(CommandError::Runtime(e)) => e,
        other => panic!("expected a runtime error, got {other:?}"),
    }
}

/// The rejection of a command, failing the test otherwise.
pub(crate) fn rejection<E: std::fmt::Debug, T: std::fmt::Debug>(
    result: Result<T, CommandError<E>>,
) -> E {
    match result {
        Err(CommandError::Rejected(e)) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The single sequence number a one-event command got.
pub(crate) fn single_sequence<E>(done: &Committed<E>) -> u64 {
    assert_eq!(
        done.first_sequence, done.last_sequence,
        "one event expected"
    );
    assert_eq!(done.events.len(), 1);
    done.first_sequence
}

// ---------------------------------------------------------------------------------------------
// Async utilities
// ---------------------------------------------------------------------------------------------

/// Polls `future` once, so a `send` it wraps is delivered to the actor's mailbox in the order
/// this is called, and returns it still pending (the test fails if it already finished).
pub(crate) async fn started<F: Future>(future: F) -> Pin<Box<F>>
where
    F::Output: std::fmt::Debug,
{
    let mut future = Box::pin(future);
    if let std::task::Poll::Ready(out) = futures::poll!(future.as_mut()) {
        panic!("expected the request to wait, but it finished: {out:?}");
    }
    future
}

/// Whether `future` is still pending after one more poll.
pub(crate) async fn still_pending<F: Future + Unpin>(future: &mut F) -> bool {
    futures::poll!(future).is_pending()
}

/// Polls `check` until it holds, for effects that have no signal to await (a snapshot written
/// beside the actor, a passivation). Fails with `what` after [`SIGNAL_TIMEOUT`].
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + SIGNAL_TIMEOUT;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {SIGNAL_TIMEOUT:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection at the storage boundary
// ---------------------------------------------------------------------------------------------

/// The faults a [`FaultStore`] injects, shared with the test that arms them.
#[derive(Default)]
pub(crate) struct Faults {
    /// The next this-many appends fail with a storage error, writing nothing. Decided when the
    /// append arrives, before the append gate.
    fail_appends: AtomicUsize,
    /// The next this-many recoveries fail at their first read (the latest snapshot).
    fail_recoveries: AtomicUsize,
    /// Every snapshot save fails while set.
    fail_snapshot_saves: AtomicBool,
    /// Before each of the next appends, one of these is appended to the same stream at the
    /// request's expected version, as another writer would: the request then conflicts.
    interference: Mutex<Vec<NewEvent>>,
    /// Latency added to every read, to make concurrent recoveries overlap.
    read_latency_us: AtomicU64,
    reads_in_flight: AtomicUsize,
    max_reads_in_flight: AtomicUsize,
    recoveries: AtomicU64,
    /// Whether appends are handed to the inner store before the gate (see
    /// [`Faults::preserve_order`]).
    ordered: AtomicBool,
    /// Appends inside this wrapper now, and the most there ever were at once.
    appends_in_flight: AtomicUsize,
    max_appends_in_flight: AtomicUsize,
    /// Appends wait here (after the failure decision).
    pub(crate) appends: Gate,
    /// Recoveries wait here at their first read.
    pub(crate) recovery: Gate,
    /// Snapshot saves wait here.
    pub(crate) snapshots: Gate,
}

impl Faults {
    /// Fails the next `n` appends.
    pub(crate) fn fail_appends(&self, n: usize) {
        self.fail_appends.store(n, Ordering::SeqCst);
    }

    /// Fails the next `n` recoveries (aggregate loads) with a read error.
    pub(crate) fn fail_recoveries(&self, n: usize) {
        self.fail_recoveries.store(n, Ordering::SeqCst);
    }

    /// Makes snapshot saves fail (or succeed again).
    pub(crate) fn fail_snapshot_saves(&self, fail: bool) {
        self.fail_snapshot_saves.store(fail, Ordering::SeqCst);
    }

    /// Before each of the next `events.len()` appends, writes one of `events` (in order) to the
    /// same stream at the expected version, so the append conflicts.
    pub(crate) fn interfere(&self, mut events: Vec<NewEvent>) {
        events.reverse();
        *self.interference.lock().expect("lock") = events;
    }

    /// Adds `latency` to every read.
    pub(crate) fn read_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).expect("small latency");
        self.read_latency_us.store(us, Ordering::SeqCst);
    }

    /// The most reads that were in flight at once.
    pub(crate) fn max_reads_in_flight(&self) -> usize {
        self.max_reads_in_flight.load(Ordering::SeqCst)
    }

    /// How many recoveries (aggregate loads) started: each begins with one latest-snapshot read.
    pub(crate) fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::SeqCst)
    }

    /// Turns the order-preserving mode on or off. On, the store says it preserves append order
    /// (so the runtime pipelines appends), and each append is handed to the inner store on its
    /// first poll, before the `appends` gate: held appends are already ordered (and applied or
    /// refused) at the store, and only their replies wait at the gate. An append armed to fail
    /// fails without reaching the inner store, as a failed write stores nothing, so the appends
    /// sent behind it conflict there. Interference is not supported in this mode.
    pub(crate) fn preserve_order(&self, on: bool) {
        self.ordered.store(on, Ordering::SeqCst);
    }

    /// The most appends that were inside the wrapper at once (from the call until its reply).
    pub(crate) fn max_appends_in_flight(&self) -> usize {
        self.max_appends_in_flight.load(Ordering::SeqCst)
    }

    /// The appends inside the wrapper now.
    pub(crate) fn appends_in_flight(&self) -> usize {
        self.appends_in_flight.load(Ordering::SeqCst)
    }
}

/// Counts one append in [`Faults::appends_in_flight`] while alive.
struct InFlight<'a>(&'a Faults);

impl<'a> InFlight<'a> {
    fn enter(faults: &'a Faults) -> Self {
        let now = faults.appends_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        faults
            .max_appends_in_flight
            .fetch_max(now, Ordering::SeqCst);
        Self(faults)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.appends_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// An [`EventStore`] that delegates to a real one and injects the faults armed in [`Faults`].
pub(crate) type FaultStore = Wrapped<Faults>;

impl FaultStore {
    /// Wraps `inner`; the returned handle arms the faults.
    pub(crate) fn wrap(inner: impl EventStore) -> (Self, Arc<Faults>) {
        Wrapped::new(inner, Faults::default())
    }
}

impl Faults {
    async fn read<T>(&self, read: impl Future<Output = T>) -> T {
        let now = self.reads_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_reads_in_flight.fetch_max(now, Ordering::SeqCst);
        let latency = self.read_latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        let out = read.await;
        self.reads_in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// An append in the order-preserving mode: handed to `inner` on the first poll, then the
    /// gate, then its reply.
    async fn append_ordered(
        &self,
        inner: &dyn EventStore,
        request: AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        assert!(
            self.interference.lock().expect("lock").is_empty(),
            "interference is not supported in the order-preserving mode"
        );
        if take_one(&self.fail_appends) {
            self.appends.pass().await;
            return Err(injected("append"));
        }
        let mut append = inner.append(request);
        // One poll now, without waiting: the store has the request before the gate holds it.
        let first = std::future::poll_fn(|cx| Poll::Ready(append.as_mut().poll(cx))).await;
        self.appends.pass().await;
        match first {
            Poll::Ready(result) => result,
            Poll::Pending => append.await,
        }
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::Storage(format!("injected {what} failure"))
}

#[async_trait]
impl Wrap for Faults {
    async fn append(
        &self,
        inner: &dyn EventStore,
        request: AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        let _in_flight = InFlight::enter(self);
        if self.ordered.load(Ordering::SeqCst) {
            return self.append_ordered(inner, request).await;
        }
        let fail = take_one(&self.fail_appends);
        self.appends.pass().await;
        if fail {
            return Err(injected("append"));
        }
        let foreign = self.interference.lock().expect("lock").pop();
        if let Some(event) = foreign {
            inner
                .append(AppendRequest::new(
                    request.stream.clone(),
                    request.expected_version,
                    vec![event],
                ))
                .await
                .expect("the interfering append");
        }
        inner.append(request).await
    }

    fn preserves_append_order(&self, inner: &dyn EventStore) -> bool {
        self.ordered.load(Ordering::SeqCst) && inner.preserves_append_order()
    }

    async fn read_stream(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<StreamSlice, StoreError> {
        self.read(inner.read_stream(stream, from, to, max)).await
    }

    async fn highest_sequence(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
    ) -> Result<u64, StoreError> {
        self.read(inner.highest_sequence(stream)).await
    }

    async fn save_snapshot(
        &self,
        inner: &dyn EventStore,
        snapshot: SnapshotRecord,
    ) -> Result<(), StoreError> {
        self.snapshots.pass().await;
        if self.fail_snapshot_saves.load(Ordering::SeqCst) {
            return Err(injected("snapshot save"));
        }
        inner.save_snapshot(snapshot).await
    }

    /// The first read of every recovery.
    async fn latest_snapshot(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        self.recoveries.fetch_add(1, Ordering::SeqCst);
        self.recovery.pass().await;
        if take_one(&self.fail_recoveries) {
            return Err(injected("read"));
        }
        self.read(inner.latest_snapshot(stream, criteria)).await
    }

    async fn command_records(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.read(inner.command_records(stream)).await
    }
}
