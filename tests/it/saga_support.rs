//! Helpers of the saga tests: runtimes on a temporary sled directory that survive restarts, a
//! fault-injecting store wrapper (a gate on one aggregate type's appends, refused outcome
//! commits), a probe aggregate with a process manager that exposes what it handled, signal-based
//! waits, and an audit of the bank (transfers, accounts, saga tables) read from the store.
//!
//! The wrapper ([`SagaFaultStore`]) delegates every call to a real sled store; it only holds or
//! refuses calls it was told to, so the runtime under test recovers from real data.
// Shared helpers: not every test module uses every one.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use incarnate::{
    Aggregate, AppendRequest, AppendResult, CommandOptions, CommandOutcome, Config, Correlation,
    DomainEvent, EventEnvelope, EventFilter, EventStore, KvWrite, ProcessManager, Runtime,
    RuntimeBuilder, SagaError, SledStore, Step, StoreError, StreamId,
};
use incarnate_actors::account::{Account, AccountCommand, AccountEvent};
use incarnate_actors::balances::AccountBalances;
use incarnate_actors::transfer::{Transfer, TransferCommand, TransferEvent, TransferSaga};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::store_wrapper::{Gate, Wrap, Wrapped};
pub(crate) use crate::support::shutdown;
use crate::support::{test_config, TempDb};

/// How long a test waits for a signal before failing.
pub(crate) const WAIT: Duration = crate::support::SIGNAL_TIMEOUT;

// ---------------------------------------------------------------------------------------------
// Runtimes on a directory that outlives them
// ---------------------------------------------------------------------------------------------

/// A temporary sled directory: a test shuts a runtime down (closing the store) and builds the
/// next one on the same data, a real restart.
pub(crate) struct SagaNode {
    db: TempDb,
}

impl SagaNode {
    pub(crate) fn new() -> Self {
        Self { db: TempDb::new() }
    }

    pub(crate) fn path(&self) -> &Path {
        self.db.path()
    }

    /// A builder with the test configuration on this directory, changed by `f`.
    pub(crate) fn builder(&self, f: impl FnOnce(&mut Config)) -> RuntimeBuilder {
        Runtime::builder().config(saga_config(self.path(), f))
    }

    /// A builder whose sled store is wrapped in a [`SagaFaultStore`] holding appends to
    /// aggregate type `gated` when told to.
    pub(crate) fn faulty_builder(
        &self,
        gated: &str,
        f: impl FnOnce(&mut Config),
    ) -> (RuntimeBuilder, Arc<SagaFaults>) {
        let config = saga_config(self.path(), f);
        let sled = SledStore::open(config.store.sled_config()).expect("open the sled store");
        let (store, faults) = SagaFaultStore::wrap(sled, gated);
        (Runtime::builder().config(config).store(store), faults)
    }

    /// Opens the store alone (no runtime), to look at what a stopped runtime left.
    pub(crate) fn open_store(&self) -> SledStore {
        SledStore::open(saga_config(self.path(), |_| {}).store.sled_config())
            .expect("open the sled store")
    }
}

/// The configuration of the saga tests: sled at `path` in `sync` durability, two actor threads,
/// no idle passivation, and a command timeout (also the bound of `wait_for_saga_idle`) short
/// enough that a lost reply fails the test instead of hanging it.
pub(crate) fn saga_config(path: &Path, f: impl FnOnce(&mut Config)) -> Config {
    let mut c = test_config(path);
    f(&mut c);
    c
}

/// Hosts the bank: accounts, transfers, their saga and the balances read model.
pub(crate) fn bank(builder: RuntimeBuilder) -> RuntimeBuilder {
    builder
        .register::<Account>()
        .register::<Transfer>()
        .projector(AccountBalances)
        .saga(TransferSaga)
}

/// Hosts the probe and its saga, and accounts (the probe saga pokes them).
pub(crate) fn probes(builder: RuntimeBuilder) -> RuntimeBuilder {
    builder
        .register::<Probe>()
        .register::<Account>()
        .saga(ProbeSaga)
}

/// Shuts `rt` down while `release` lets held work through: the shutdown is first polled once, so
/// it has stopped accepting commands (and asked the sagas to stop) before anything held moves.
pub(crate) async fn shutdown_then(rt: Runtime, release: impl FnOnce()) {
    let mut stopping = Box::pin(rt.shutdown());
    assert!(
        futures::poll!(stopping.as_mut()).is_pending(),
        "the shutdown finished while work was held"
    );
    assert!(rt.is_stopping());
    release();
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the shutdown finishes once the held work is released")
        .expect("shutdown");
}

// ---------------------------------------------------------------------------------------------
// Saga tables and waits
// ---------------------------------------------------------------------------------------------

/// The entries of saga `name`'s table `what` (`instances`, `outbox`, `deadlines`).
pub(crate) async fn saga_table(
    store: &dyn EventStore,
    name: &str,
    what: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .kv_scan(&format!("$saga/{name}/{what}"), &[], usize::MAX)
        .await
        .expect("scan a saga table")
}

/// The running instances of saga `name`, by key.
pub(crate) async fn instances(store: &dyn EventStore, name: &str) -> Vec<String> {
    saga_table(store, name, "instances")
        .await
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).expect("instance keys are text"))
        .collect()
}

/// The command ids in saga `name`'s outbox (sent, not answered).
pub(crate) async fn outbox(store: &dyn EventStore, name: &str) -> Vec<Uuid> {
    saga_table(store, name, "outbox")
        .await
        .into_iter()
        .map(|(k, _)| Uuid::from_slice(&k).expect("outbox keys are command ids"))
        .collect()
}

/// The log position saga `name` has handled (its checkpoint, kept beside the projectors' in the
/// runtime's `$checkpoints` table under `saga:<name>`), read from a store no runtime runs on.
pub(crate) async fn saga_checkpoint(store: &dyn EventStore, name: &str) -> u64 {
    store
        .kv_get("$checkpoints", format!("saga:{name}").as_bytes())
        .await
        .expect("read the checkpoint")
        .map(|b| u64::from_be_bytes(b.as_slice().try_into().expect("an 8-byte checkpoint")))
        .unwrap_or(0)
}

/// G2 at the instant a runtime stopped or died: the transfer saga's instances match its
/// checkpoint. A transfer requested at or before the checkpoint has ended or has an instance (no
/// handled event was lost); one requested after it has none (no state ran ahead of the
/// position). State and checkpoint committed apart would break one or the other.
pub(crate) async fn assert_transfer_saga_matches_its_checkpoint(
    store: &dyn EventStore,
    context: &str,
) {
    let checkpoint = saga_checkpoint(store, TransferSaga::NAME).await;
    let running: HashSet<String> = instances(store, TransferSaga::NAME)
        .await
        .into_iter()
        .collect();
    let mut requested_at: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for e in whole_log(store).await {
        if *e.stream.aggregate_type != *Transfer::TYPE {
            continue;
        }
        let entry = requested_at
            .entry(e.stream.aggregate_id.to_string())
            .or_insert((e.position, false));
        if e.event_type != TransferEvent::REQUESTED {
            entry.1 = true;
        }
    }
    for (id, (position, ended)) in &requested_at {
        if *position <= checkpoint {
            assert!(
                *ended || running.contains(id),
                "{context}: transfer {id} (requested at {position}, checkpoint {checkpoint}) \
                 was handled but has neither ended nor an instance"
            );
        } else {
            assert!(
                !running.contains(id),
                "{context}: transfer {id} (requested at {position}) has an instance beyond \
                 the checkpoint {checkpoint}"
            );
        }
    }
    for id in &running {
        assert!(
            requested_at.contains_key(id),
            "{context}: an instance for no transfer: {id}"
        );
    }
}

/// Waits for saga `name` to be idle, failing the test otherwise.
pub(crate) async fn idle(rt: &Runtime, name: &str) {
    rt.wait_for_saga_idle(name)
        .await
        .unwrap_or_else(|e| panic!("saga {name} did not become idle: {e}"));
}

/// Waits until `check` holds, re-checking after every commit to the store (its head watch is the
/// signal). Fails with `what` after [`WAIT`].
pub(crate) async fn wait_until<F, Fut>(store: &Arc<dyn EventStore>, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut head = store.watch_head();
    loop {
        head.borrow_and_update();
        if check().await {
            return;
        }
        match tokio::time::timeout_at(deadline, head.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the store closed while waiting for {what}"),
            Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
        }
    }
}

/// Every readable event of `stream`.
pub(crate) async fn stream_events(store: &dyn EventStore, stream: &StreamId) -> Vec<EventEnvelope> {
    crate::support::read_all(store, stream).await.events
}

pub(crate) use crate::support::read_whole_log as whole_log;

/// Waits until `stream` holds at least `count` events tagged `event_type`.
pub(crate) async fn wait_for_events(
    store: &Arc<dyn EventStore>,
    stream: &StreamId,
    event_type: &str,
    count: usize,
) {
    let what = format!("{count} {event_type} events in {stream}");
    wait_until(store, &what, || async {
        count_events(&stream_events(&**store, stream).await, event_type) >= count
    })
    .await;
}

pub(crate) fn count_events(events: &[EventEnvelope], event_type: &str) -> usize {
    events.iter().filter(|e| e.event_type == event_type).count()
}

/// Asserts no command was applied twice: every command of the aggregates in these tests emits at
/// most one event, so a command id carried by two stored events is a command applied twice.
pub(crate) fn assert_command_ids_unique(log: &[EventEnvelope], context: &str) {
    let mut seen: HashMap<Uuid, &EventEnvelope> = HashMap::new();
    for e in log {
        let Some(id) = e.causation.command_id else {
            continue;
        };
        if let Some(first) = seen.insert(id, e) {
            panic!(
                "{context}: command {id} applied twice: {}#{} ({}) and {}#{} ({})",
                first.stream, first.sequence, first.event_type, e.stream, e.sequence, e.event_type
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection
// ---------------------------------------------------------------------------------------------

/// The faults a [`SagaFaultStore`] injects, shared with the test that arms them.
pub(crate) struct SagaFaults {
    /// Appends to streams of this aggregate type pass the gate.
    gated_type: String,
    /// The gate of those appends; it counts the appends that arrived while it was held.
    pub(crate) appends: Gate,
    /// While set, every commit that removes a saga outbox entry (a command's outcome being
    /// recorded) fails: the command took effect, but its saga never hears of it.
    refuse_outcomes: AtomicBool,
    /// While set, every commit that writes a saga table fails (an input's state, outbox,
    /// deadlines and position, or an outcome): as if the process died at that commit.
    refuse_saga_commits: AtomicBool,
    refused: watch::Sender<u64>,
}

impl SagaFaults {
    /// Refuses (or accepts again) the commits that record command outcomes.
    pub(crate) fn refuse_outcomes(&self, refuse: bool) {
        self.refuse_outcomes.store(refuse, Ordering::SeqCst);
    }

    /// Refuses (or accepts again) every commit of a saga's tables.
    pub(crate) fn refuse_saga_commits(&self, refuse: bool) {
        self.refuse_saga_commits.store(refuse, Ordering::SeqCst);
    }

    /// Waits until `n` saga commits in total were refused.
    pub(crate) async fn wait_refused(&self, n: u64) {
        let mut rx = self.refused.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {n} refused saga commits"))
            .expect("refusal counter alive");
    }
}

/// An [`EventStore`] delegating to sled, with the faults armed in [`SagaFaults`].
pub(crate) type SagaFaultStore = Wrapped<SagaFaults>;

impl SagaFaultStore {
    pub(crate) fn wrap(inner: impl EventStore, gated: &str) -> (Self, Arc<SagaFaults>) {
        let faults = SagaFaults {
            gated_type: gated.to_owned(),
            appends: Gate::counting_held(),
            refuse_outcomes: AtomicBool::new(false),
            refuse_saga_commits: AtomicBool::new(false),
            refused: watch::channel(0).0,
        };
        Wrapped::new(inner, faults)
    }
}

#[async_trait]
impl Wrap for SagaFaults {
    async fn append(
        &self,
        inner: &dyn EventStore,
        request: AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        if *request.stream.aggregate_type == *self.gated_type {
            self.appends.pass().await;
        }
        inner.append(request).await
    }

    async fn kv_commit(
        &self,
        inner: &dyn EventStore,
        writes: Vec<KvWrite>,
    ) -> Result<(), StoreError> {
        let saga_table = |t: &str| t.starts_with("$saga/");
        let records_outcome = writes.iter().any(|w| {
            matches!(w, KvWrite::Delete { table, .. } if saga_table(table) && table.ends_with("/outbox"))
        });
        let writes_saga = writes.iter().any(|w| match w {
            KvWrite::Put { table, .. }
            | KvWrite::Delete { table, .. }
            | KvWrite::Clear { table } => saga_table(table),
        });
        if (records_outcome && self.refuse_outcomes.load(Ordering::SeqCst))
            || (writes_saga && self.refuse_saga_commits.load(Ordering::SeqCst))
        {
            self.refused.send_modify(|c| *c += 1);
            return Err(StoreError::Storage("injected saga commit failure".into()));
        }
        inner.kv_commit(writes).await
    }
}

// ---------------------------------------------------------------------------------------------
// The probe: an aggregate whose process manager reports what it handled
// ---------------------------------------------------------------------------------------------

/// A stream of inputs for [`ProbeSaga`]: each command emits one event.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Probe {
    pub(crate) events: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeCommand {
    /// Starts (or continues) the probe's saga instance.
    Start,
    /// An input that does nothing but get recorded.
    Note(u64),
    /// Sets deadline `name` to fire after `after_ms` of the saga's clock.
    Schedule { name: String, after_ms: u64 },
    /// Cancels deadline `name`.
    Unschedule { name: String },
    /// Asks the saga to deposit one cent on `account`; the outcome is recorded on the probe.
    Poke { account: String },
    /// Asks the saga to report what it handled, then complete.
    Finish,
    /// Sent by the saga when deadline `name` fires.
    Ring { name: String },
    /// Sent by the saga with the outcome of a poke.
    Record { text: String },
    /// Sent by the saga when finishing: the sequences of the probe events it handled, in order.
    Report { seen: Vec<u64> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ProbeEvent {
    Started,
    Noted(u64),
    Scheduled { name: String, after_ms: u64 },
    Unscheduled { name: String },
    Poked { account: String },
    Finished,
    Rang { name: String },
    Recorded { text: String },
    Reported { seen: Vec<u64> },
}

impl ProbeEvent {
    pub(crate) const RANG: &'static str = "Rang";
    pub(crate) const RECORDED: &'static str = "Recorded";
    pub(crate) const REPORTED: &'static str = "Reported";
}

impl DomainEvent for ProbeEvent {
    fn event_type(&self) -> &'static str {
        match self {
            ProbeEvent::Started => "ProbeStarted",
            ProbeEvent::Noted(_) => "Noted",
            ProbeEvent::Scheduled { .. } => "Scheduled",
            ProbeEvent::Unscheduled { .. } => "Unscheduled",
            ProbeEvent::Poked { .. } => "Poked",
            ProbeEvent::Finished => "Finished",
            ProbeEvent::Rang { .. } => Self::RANG,
            ProbeEvent::Recorded { .. } => Self::RECORDED,
            ProbeEvent::Reported { .. } => Self::REPORTED,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error("never rejected")]
    Never,
}

impl Aggregate for Probe {
    const TYPE: &'static str = "probe";
    type Command = ProbeCommand;
    type Event = ProbeEvent;
    type Error = ProbeError;

    fn handle(&self, command: &ProbeCommand) -> Result<Vec<ProbeEvent>, ProbeError> {
        Ok(vec![match command.clone() {
            ProbeCommand::Start => ProbeEvent::Started,
            ProbeCommand::Note(n) => ProbeEvent::Noted(n),
            ProbeCommand::Schedule { name, after_ms } => ProbeEvent::Scheduled { name, after_ms },
            ProbeCommand::Unschedule { name } => ProbeEvent::Unscheduled { name },
            ProbeCommand::Poke { account } => ProbeEvent::Poked { account },
            ProbeCommand::Finish => ProbeEvent::Finished,
            ProbeCommand::Ring { name } => ProbeEvent::Rang { name },
            ProbeCommand::Record { text } => ProbeEvent::Recorded { text },
            ProbeCommand::Report { seen } => ProbeEvent::Reported { seen },
        }])
    }

    fn apply(&mut self, _event: &ProbeEvent) {
        self.events += 1;
    }
}

/// What the probe saga sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ProbeStep {
    Ring { probe: String, name: String },
    Record { probe: String, text: String },
    Report { probe: String, seen: Vec<u64> },
    Deposit { probe: String, account: String },
}

/// One probe instance: its probe, and the sequence numbers of the probe events it handled, in
/// handling order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct ProbeState {
    pub(crate) probe: String,
    pub(crate) seen: Vec<u64>,
}

/// Turns probe events into saga inputs: deadlines, pokes, a final report. It refuses (stopping
/// the saga) an event of its instance older than one it already handled.
pub(crate) struct ProbeSaga;

impl ProbeSaga {
    pub(crate) const NAME: &'static str = "probe_saga";
}

/// The text a probe records for a poke's outcome.
pub(crate) fn outcome_text(outcome: &CommandOutcome) -> String {
    match outcome {
        CommandOutcome::Accepted { .. } => "accepted".to_owned(),
        CommandOutcome::Rejected { reason } => format!("rejected: {reason}"),
        CommandOutcome::Failed { error } => format!("failed: {error}"),
    }
}

#[async_trait]
impl ProcessManager for ProbeSaga {
    type State = ProbeState;
    type Command = ProbeStep;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().aggregate(Probe::TYPE)
    }

    fn correlate(&self, event: &EventEnvelope) -> Option<Correlation> {
        let id = event.stream.aggregate_id.as_str();
        match event.event_type.as_str() {
            "ProbeStarted" => Some(Correlation::start(id)),
            ProbeEvent::RANG | ProbeEvent::RECORDED | ProbeEvent::REPORTED => None,
            _ => Some(Correlation::to(id)),
        }
    }

    fn on_event(
        &self,
        state: &mut ProbeState,
        event: &EventEnvelope,
    ) -> Result<Step<ProbeStep>, SagaError> {
        if let Some(last) = state.seen.last() {
            if *last >= event.sequence {
                return Err(SagaError::Handler(format!(
                    "{}#{} handled after #{last}",
                    event.stream, event.sequence
                )));
            }
        }
        state.seen.push(event.sequence);
        state.probe = event.stream.aggregate_id.to_string();
        let probe = state.probe.clone();
        Ok(match event.decode_event::<ProbeEvent>()? {
            ProbeEvent::Scheduled { name, after_ms } => {
                Step::none().schedule(name, Duration::from_millis(after_ms))
            }
            ProbeEvent::Unscheduled { name } => Step::none().cancel(name),
            ProbeEvent::Poked { account } => {
                Step::none().send(ProbeStep::Deposit { probe, account })
            }
            ProbeEvent::Finished => Step::none().send(ProbeStep::Report {
                probe,
                seen: state.seen.clone(),
            }),
            _ => Step::none(),
        })
    }

    fn on_outcome(
        &self,
        _state: &mut ProbeState,
        command: &ProbeStep,
        outcome: &CommandOutcome,
    ) -> Result<Step<ProbeStep>, SagaError> {
        Ok(match command {
            ProbeStep::Deposit { probe, .. } => Step::none().send(ProbeStep::Record {
                probe: probe.clone(),
                text: outcome_text(outcome),
            }),
            ProbeStep::Report { .. } => Step::none().complete(),
            ProbeStep::Ring { .. } | ProbeStep::Record { .. } => Step::none(),
        })
    }

    fn on_deadline(
        &self,
        state: &mut ProbeState,
        deadline: &str,
    ) -> Result<Step<ProbeStep>, SagaError> {
        Ok(Step::none().send(ProbeStep::Ring {
            probe: state.probe.clone(),
            name: deadline.to_owned(),
        }))
    }

    async fn dispatch(
        &self,
        runtime: &Runtime,
        command: ProbeStep,
        options: CommandOptions,
    ) -> CommandOutcome {
        let (probe, command) = match command {
            ProbeStep::Deposit { account, .. } => {
                return CommandOutcome::from_result(
                    &runtime
                        .send_with::<Account>(
                            account,
                            AccountCommand::Deposit { amount: 1 },
                            options,
                        )
                        .await,
                )
            }
            ProbeStep::Ring { probe, name } => (probe, ProbeCommand::Ring { name }),
            ProbeStep::Record { probe, text } => (probe, ProbeCommand::Record { text }),
            ProbeStep::Report { probe, seen } => (probe, ProbeCommand::Report { seen }),
        };
        CommandOutcome::from_result(&runtime.send_with::<Probe>(probe, command, options).await)
    }
}

pub(crate) fn probe_stream(id: &str) -> StreamId {
    StreamId::new(Probe::TYPE, id)
}

/// Sends `command` to probe `id`.
pub(crate) async fn probe(rt: &Runtime, id: &str, command: ProbeCommand) {
    rt.send::<Probe>(id, command.clone())
        .await
        .unwrap_or_else(|e| panic!("probe {id} {command:?}: {e}"));
}

/// Starts probe `id` and schedules deadline `name` after `after_ms`.
pub(crate) async fn start_with_deadline(rt: &Runtime, id: &str, name: &str, after_ms: u64) {
    probe(rt, id, ProbeCommand::Start).await;
    schedule(rt, id, name, after_ms).await;
}

pub(crate) async fn schedule(rt: &Runtime, id: &str, name: &str, after_ms: u64) {
    probe(
        rt,
        id,
        ProbeCommand::Schedule {
            name: name.to_owned(),
            after_ms,
        },
    )
    .await;
}

/// The names of the deadlines that rang on probe `id`, in order.
pub(crate) async fn rang(store: &dyn EventStore, id: &str) -> Vec<String> {
    stream_events(store, &probe_stream(id))
        .await
        .iter()
        .filter_map(|e| match e.decode_event::<ProbeEvent>().expect("decode") {
            ProbeEvent::Rang { name } => Some(name),
            _ => None,
        })
        .collect()
}

/// Waits until deadline `name` rang on probe `id` (at least once).
pub(crate) async fn wait_rang(rt: &Runtime, id: &str, name: &str) {
    let store = rt.store();
    let what = format!("deadline {name} to ring on probe {id}");
    wait_until(&store, &what, || async {
        rang(&*rt.store(), id).await.iter().any(|n| n == name)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The bank
// ---------------------------------------------------------------------------------------------

/// Opens each `(account, deposit)` and deposits into it; closes each of `closed` (opened empty).
pub(crate) async fn open_bank(rt: &Runtime, accounts: &[(&str, u64)], closed: &[&str]) {
    for (id, deposit) in accounts {
        rt.send::<Account>(
            *id,
            AccountCommand::Open {
                owner: (*id).into(),
            },
        )
        .await
        .expect("open");
        if *deposit > 0 {
            rt.send::<Account>(*id, AccountCommand::Deposit { amount: *deposit })
                .await
                .expect("deposit");
        }
    }
    for id in closed {
        rt.send::<Account>(
            *id,
            AccountCommand::Open {
                owner: (*id).into(),
            },
        )
        .await
        .expect("open");
        rt.send::<Account>(*id, AccountCommand::Close)
            .await
            .expect("close");
    }
}

pub(crate) async fn request(rt: &Runtime, id: &str, from: &str, to: &str, amount: u64) {
    rt.send::<Transfer>(
        id,
        TransferCommand::Request {
            from: from.into(),
            to: to.into(),
            amount,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("request {id}: {e}"));
}

/// What an audit of the bank found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct BankAudit {
    /// Transfer id → its terminal event (`Completed` or `Failed(reason)`).
    pub(crate) ended: BTreeMap<String, TransferEvent>,
    pub(crate) completed: usize,
    /// Failed after a refund.
    pub(crate) refunded: usize,
    /// Failed before any money moved.
    pub(crate) rejected: usize,
    /// Account id → balance, folded from the log.
    pub(crate) balances: BTreeMap<String, u64>,
}

/// Reads the whole store of a bank whose transfer saga is idle and checks every saga guarantee
/// that shows in it:
/// - each requested transfer ended exactly once (`Requested`, then one `Completed`/`Failed`);
/// - no command was applied twice (command ids unique across the log);
/// - per transfer, the account movements match its end: completed = one withdrawal from the
///   source and one deposit to the target; refunded = one withdrawal and one deposit back to the
///   source; rejected = nothing; never another movement;
/// - money is conserved: the balances sum to `initial_total`;
/// - the saga holds no instance and no unanswered command.
pub(crate) async fn audit_bank(
    store: &dyn EventStore,
    initial_total: u64,
    context: &str,
) -> BankAudit {
    let log = whole_log(store).await;
    assert_command_ids_unique(&log, context);

    let mut transfers: BTreeMap<String, Vec<&EventEnvelope>> = BTreeMap::new();
    let mut movements: HashMap<Uuid, Vec<(String, AccountEvent)>> = HashMap::new();
    let mut audit = BankAudit::default();
    for e in &log {
        let id = e.stream.aggregate_id.to_string();
        if *e.stream.aggregate_type == *Transfer::TYPE {
            transfers.entry(id).or_default().push(e);
        } else if *e.stream.aggregate_type == *Account::TYPE {
            let event: AccountEvent = e.decode_event().expect("decode an account event");
            let balance = audit.balances.entry(id.clone()).or_default();
            match &event {
                AccountEvent::Deposited { amount } => *balance += amount,
                AccountEvent::Withdrawn { amount } => {
                    *balance = balance
                        .checked_sub(*amount)
                        .unwrap_or_else(|| panic!("{context}: {} went below zero", e.stream))
                }
                _ => {}
            }
            if e.causation.command_id.is_some() {
                let correlation = e
                    .causation
                    .correlation_id
                    .unwrap_or_else(|| panic!("{context}: a saga command without correlation"));
                movements.entry(correlation).or_default().push((id, event));
            }
        }
    }

    let mut explained = HashSet::new();
    for (id, events) in &transfers {
        let kinds: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            kinds.len(),
            2,
            "{context}: transfer {id} did not end exactly once: {kinds:?}"
        );
        let Ok(TransferEvent::Requested { from, to, amount }) = events[0].decode_event() else {
            panic!("{context}: transfer {id} does not start with its request: {kinds:?}");
        };
        let end: TransferEvent = events[1].decode_event().expect("decode a transfer event");
        let correlation = events[1]
            .causation
            .correlation_id
            .unwrap_or_else(|| panic!("{context}: transfer {id} ended without correlation"));
        explained.insert(correlation);
        let moved = movements
            .get(&correlation)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let count = |account: &str, withdrawal: bool| {
            moved
                .iter()
                .filter(|(a, e)| {
                    a == account
                        && match e {
                            AccountEvent::Withdrawn { amount: m } => withdrawal && *m == amount,
                            AccountEvent::Deposited { amount: m } => !withdrawal && *m == amount,
                            _ => false,
                        }
                })
                .count()
        };
        let seen = (count(&from, true), count(&to, false), count(&from, false));
        let expected = match &end {
            TransferEvent::Completed => {
                audit.completed += 1;
                (1, 1, 0)
            }
            TransferEvent::Failed { reason } if reason.starts_with("withdrawal rejected") => {
                audit.rejected += 1;
                (0, 0, 0)
            }
            TransferEvent::Failed { reason } if reason == "deposit rejected; refunded" => {
                audit.refunded += 1;
                (1, 0, 1)
            }
            other => panic!("{context}: transfer {id} ended as {other:?}"),
        };
        assert_eq!(
            (seen, moved.len()),
            (expected, expected.0 + expected.1 + expected.2),
            "{context}: transfer {id} ({from} -> {to}, {amount}) ended {end:?} after moving \
             (withdrawals, deposits, refunds) = {seen:?}: {moved:?}"
        );
        audit.ended.insert(id.clone(), end);
    }
    for correlation in movements.keys() {
        assert!(
            explained.contains(correlation),
            "{context}: money moved for no ended transfer: {:?}",
            movements[correlation]
        );
    }

    let total: u64 = audit.balances.values().sum();
    assert_eq!(
        total, initial_total,
        "{context}: money was created or destroyed"
    );
    assert_eq!(
        instances(store, TransferSaga::NAME).await,
        Vec::<String>::new(),
        "{context}: finished instances are not cleaned up"
    );
    assert_eq!(
        outbox(store, TransferSaga::NAME).await,
        Vec::<Uuid>::new(),
        "{context}: commands left unanswered"
    );
    audit
}
