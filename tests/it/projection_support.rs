//! Test projectors and helpers for the projection tests: a probe projector that records every
//! position it handles (in its read model and in memory) and can be made to fail, panic or block
//! on chosen events, runtimes over a sled directory, a store wrapper that can simulate a crash,
//! and a pure fold of the log to check the account read models against.
// Shared helpers: not every test module uses every one.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use incarnate::{
    Aggregate, AppendRequest, AppendResult, Backend, Config, DurabilityMode, EventEnvelope,
    EventFilter, EventStore, KvWrite, ProjectionError, Projector, ReadModelTx, RuntimeBuilder,
    RuntimeSettings, SnapshotCriteria, SnapshotRecord, StoreError, StoreSettings, StreamId, Table,
};
use incarnate_actors::account::{Account, AccountEvent};
use incarnate_actors::balances::{BalanceRow, StatementKey, StatementLine, BALANCES, STATEMENTS};
use tokio::sync::{Notify, Semaphore};

use crate::store_wrapper::{Wrap, Wrapped};
use crate::support::open_sled;

/// The table where the runtime keeps every projector's checkpoint (a big-endian `u64` keyed by
/// the projector's name). The tests read it to check what is committed, not what is published.
pub(crate) const CHECKPOINTS: &str = "$checkpoints";

/// A runtime configuration over the sled database at `path`: `sync` durability (every
/// acknowledged write survives a kill), two actor threads, and a command / wait timeout that
/// fails a stuck test rather than hanging it.
pub(crate) fn sled_config(path: &Path) -> Config {
    Config {
        runtime: RuntimeSettings {
            arbiters: 2,
            command_timeout_ms: 20_000,
            ..RuntimeSettings::default()
        },
        store: StoreSettings {
            backend: Backend::Sled,
            path: path.to_path_buf(),
            durability: DurabilityMode::Sync,
            ..StoreSettings::default()
        },
        ..Config::default()
    }
}

/// A builder for a runtime over the sled database at `path` hosting the bank accounts.
pub(crate) fn builder(path: &Path) -> RuntimeBuilder {
    RuntimeBuilder::new()
        .config(sled_config(path))
        .register::<Account>()
}

/// A temporary directory and the database path inside it.
pub(crate) fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("db");
    (dir, path)
}

/// The committed checkpoint of projector `name` (0 if none).
pub(crate) async fn committed_checkpoint(store: &dyn EventStore, name: &str) -> u64 {
    decode_checkpoint(
        store
            .kv_get(CHECKPOINTS, name.as_bytes())
            .await
            .expect("read a checkpoint"),
    )
}

fn decode_checkpoint(bytes: Option<Vec<u8>>) -> u64 {
    bytes.map_or(0, |b| {
        u64::from_be_bytes(b.as_slice().try_into().expect("an 8-byte checkpoint"))
    })
}

/// What a [`Probe`] handled and tried, shared with the test.
#[derive(Clone, Default)]
pub(crate) struct ProbeLog {
    handled: Arc<Mutex<Vec<u64>>>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
}

/// One call of a [`Probe`]'s handler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    /// The event's global position.
    pub(crate) position: u64,
    /// When the handler was called.
    pub(crate) at: Instant,
    /// The projector's committed checkpoint at that moment.
    pub(crate) checkpoint: u64,
    /// Whether the handler succeeded.
    pub(crate) ok: bool,
}

impl ProbeLog {
    /// The positions handled successfully by this process's instance, in handling order.
    pub(crate) fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }

    /// The last position handled successfully (0 if none).
    pub(crate) fn last_handled(&self) -> u64 {
        self.handled.lock().unwrap().last().copied().unwrap_or(0)
    }

    /// Every handler call.
    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// The handler calls on `position`.
    pub(crate) fn attempts_at(&self, position: u64) -> Vec<Attempt> {
        self.attempts()
            .into_iter()
            .filter(|a| a.position == position)
            .collect()
    }
}

/// How a poisoned aggregate's events fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Every attempt returns an error.
    Always,
    /// The next `n` attempts return an error, then the handler succeeds.
    Times(u32),
    /// Every attempt panics.
    Panic,
}

/// The aggregates whose events a [`Probe`] fails on, by aggregate id; shared with the test so
/// it can remove the cause of a failure.
#[derive(Clone, Default)]
pub(crate) struct Faults(Arc<Mutex<HashMap<String, Fault>>>);

impl Faults {
    /// Makes the events of aggregate `id` fail as `fault` says.
    pub(crate) fn set(&self, id: &str, fault: Fault) {
        self.0.lock().unwrap().insert(id.to_owned(), fault);
    }

    /// Removes every fault.
    pub(crate) fn cure_all(&self) {
        self.0.lock().unwrap().clear();
    }

    /// The fault to inject on an event of aggregate `id`, if any (consuming one of `Times`).
    fn take(&self, id: &str) -> Option<Fault> {
        let mut faults = self.0.lock().unwrap();
        match faults.get_mut(id)? {
            Fault::Times(0) => None,
            Fault::Times(n) => {
                *n -= 1;
                Some(Fault::Times(*n))
            }
            other => Some(*other),
        }
    }
}

/// Blocks a [`Probe`]'s handler on one chosen position until the test opens it, so the test can
/// look at a projector in the middle of a batch.
pub(crate) struct Gate {
    at: Mutex<Option<u64>>,
    entered: Notify,
    release: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            at: Mutex::new(None),
            entered: Notify::new(),
            release: Semaphore::new(0),
        }
    }
}

impl Gate {
    /// Blocks the next handling of `position`.
    pub(crate) fn arm(&self, position: u64) {
        *self.at.lock().unwrap() = Some(position);
    }

    /// Waits until the handler is blocked at the armed position.
    pub(crate) async fn entered(&self) {
        self.entered.notified().await;
    }

    /// Lets the blocked handler go on.
    pub(crate) fn open(&self) {
        self.release.add_permits(1);
    }

    async fn pass(&self, position: u64) {
        let blocked = {
            let mut at = self.at.lock().unwrap();
            if *at == Some(position) {
                *at = None;
                true
            } else {
                false
            }
        };
        if blocked {
            // `notify_one` keeps a permit if the test is not waiting yet: no lost wake-up.
            self.entered.notify_one();
            self.release
                .acquire()
                .await
                .expect("the gate's semaphore is never closed")
                .forget();
        }
    }
}

/// A projector that records every event it handles: in its read model (position → how many
/// times its writes were committed) and in memory ([`ProbeLog`]). It reads its own committed
/// checkpoint at every call, fails or panics on the events of poisoned aggregates ([`Faults`])
/// after writing to its table (so a failure has writes to discard), and can be held on one
/// position ([`Gate`]).
pub(crate) struct Probe {
    name: &'static str,
    table: Table<u64, u32>,
    filter: EventFilter,
    log: ProbeLog,
    faults: Faults,
    gate: Arc<Gate>,
}

impl Probe {
    /// A probe called `name` keeping its counts in `table`, receiving every event.
    pub(crate) fn new(name: &'static str, table: &'static str) -> Self {
        Self {
            name,
            table: Table::new(table),
            filter: EventFilter::all(),
            log: ProbeLog::default(),
            faults: Faults::default(),
            gate: Arc::new(Gate::default()),
        }
    }

    /// Receives only the events `filter` matches.
    pub(crate) fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Uses `faults` (e.g. carried over a restart) instead of its own.
    pub(crate) fn faults_from(mut self, faults: &Faults) -> Self {
        self.faults = faults.clone();
        self
    }

    /// Its record of what it handled.
    pub(crate) fn log(&self) -> ProbeLog {
        self.log.clone()
    }

    /// Its fault switchboard.
    pub(crate) fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Its gate.
    pub(crate) fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }
}

#[async_trait]
impl Projector for Probe {
    fn name(&self) -> &'static str {
        self.name
    }

    fn filter(&self) -> EventFilter {
        self.filter.clone()
    }

    fn tables(&self) -> Vec<&'static str> {
        vec![self.table.name()]
    }

    async fn handle(
        &mut self,
        event: &EventEnvelope,
        tx: &mut ReadModelTx,
    ) -> Result<(), ProjectionError> {
        // The checkpoint writes of a batch are not in `tx`'s read set, so this is the committed
        // checkpoint.
        let checkpoint = decode_checkpoint(tx.get_raw(CHECKPOINTS, self.name.as_bytes()).await?);
        self.gate.pass(event.position).await;
        self.table.update(tx, &event.position, |n| *n += 1).await?;
        let fault = self.faults.take(event.stream.aggregate_id.as_str());
        let ok = fault.is_none();
        self.log.attempts.lock().unwrap().push(Attempt {
            position: event.position,
            at: Instant::now(),
            checkpoint,
            ok,
        });
        match fault {
            None => {
                self.log.handled.lock().unwrap().push(event.position);
                Ok(())
            }
            Some(Fault::Panic) => panic!("probe {} panics on {}", self.name, event.position),
            Some(_) => Err(ProjectionError::handler(format!(
                "poisoned event {} of {}",
                event.position, event.stream
            ))),
        }
    }
}

/// Probe table contents: position → times committed.
pub(crate) async fn counts(store: &dyn EventStore, table: &'static str) -> BTreeMap<u64, u32> {
    Table::<u64, u32>::new(table)
        .all(store)
        .await
        .expect("read a probe table")
        .into_iter()
        .collect()
}

/// `positions`, each counted once.
pub(crate) fn once(positions: impl IntoIterator<Item = u64>) -> BTreeMap<u64, u32> {
    positions.into_iter().map(|p| (p, 1)).collect()
}

/// The account read models a correct projector must hold after the events of `log`: computed
/// with the aggregate's own `apply`, independently of the projector's code.
pub(crate) fn fold_accounts(
    log: &[EventEnvelope],
) -> (
    BTreeMap<String, BalanceRow>,
    BTreeMap<StatementKey, StatementLine>,
) {
    let mut states: BTreeMap<String, Account> = BTreeMap::new();
    let mut balances = BTreeMap::new();
    let mut statements = BTreeMap::new();
    for e in log {
        if *e.stream.aggregate_type != *Account::TYPE {
            continue;
        }
        let id = e.stream.aggregate_id.to_string();
        let event: AccountEvent = e.decode_event().expect("an account event");
        let state = states.entry(id.clone()).or_default();
        state.apply(&event);
        let (kind, amount) = match event {
            AccountEvent::Opened { .. } => ("opened", 0),
            AccountEvent::Deposited { amount } => ("deposit", amount),
            AccountEvent::Withdrawn { amount } => ("withdrawal", amount),
            AccountEvent::Closed => ("closed", 0),
        };
        balances.insert(
            id.clone(),
            BalanceRow {
                owner: state.owner.clone(),
                balance: state.balance,
                closed: !state.is_open(),
                version: e.sequence,
            },
        );
        statements.insert(
            StatementKey {
                account: id,
                sequence: e.sequence,
            },
            StatementLine {
                position: e.position,
                kind: kind.to_owned(),
                amount,
                balance: state.balance,
            },
        );
    }
    (balances, statements)
}

/// The committed [`BALANCES`] and [`STATEMENTS`] tables.
pub(crate) async fn account_tables(
    store: &dyn EventStore,
) -> (
    BTreeMap<String, BalanceRow>,
    BTreeMap<StatementKey, StatementLine>,
) {
    let balances = BALANCES.all(store).await.expect("read balances");
    let statements = STATEMENTS.all(store).await.expect("read statements");
    (
        balances.into_iter().collect(),
        statements.into_iter().collect(),
    )
}

/// Checks that the committed account read models equal a fold of the whole log.
pub(crate) async fn assert_account_tables_match_log(store: &dyn EventStore, context: &str) {
    let log = store.read_log(1, usize::MAX).await.expect("read the log");
    let (balances, statements) = fold_accounts(&log);
    let (got_balances, got_statements) = account_tables(store).await;
    assert_eq!(got_balances, balances, "{context}: balances");
    if got_statements != statements {
        let missing: Vec<_> = statements
            .keys()
            .filter(|k| !got_statements.contains_key(k))
            .collect();
        let extra: Vec<_> = got_statements
            .keys()
            .filter(|k| !statements.contains_key(k))
            .collect();
        let wrong: Vec<_> = statements
            .iter()
            .filter(|(k, v)| got_statements.get(k).is_some_and(|g| g != *v))
            .collect();
        panic!(
            "{context}: statements differ: missing {missing:?}, extra {extra:?}, wrong {wrong:?}"
        );
    }
}

/// In one atomic key-value commit: the largest position written to probe table `table`, and
/// the checkpoint written for projector `name`, if any.
pub(crate) fn probe_commit(
    writes: &[KvWrite],
    table: &str,
    name: &str,
) -> (Option<u64>, Option<u64>) {
    let mut last = None;
    let mut checkpoint = None;
    for w in writes {
        if let KvWrite::Put {
            table: t,
            key,
            value,
        } = w
        {
            if t == table {
                let p = u64::from_be_bytes(key.as_slice().try_into().expect("a position key"));
                last = last.max(Some(p));
            } else if t == CHECKPOINTS && key == name.as_bytes() {
                checkpoint = Some(decode_checkpoint(Some(value.clone())));
            }
        }
    }
    (last, checkpoint)
}

/// Test hooks of a [`TestStore`], kept by the test.
#[derive(Clone, Default)]
pub(crate) struct StoreHooks {
    crashed: Arc<AtomicBool>,
    after_empty_read: Arc<Mutex<Option<AppendRequest>>>,
    commits: Arc<Mutex<Vec<Vec<KvWrite>>>>,
}

impl StoreHooks {
    /// From now on every write fails, as if the process had died: what is committed stays,
    /// nothing more gets in. Closing still closes the database for real.
    pub(crate) fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
    }

    /// The next `read_log` that finds nothing appends `request` before returning: a commit
    /// landing between a reader's read and whatever it does next.
    pub(crate) fn append_after_empty_read(&self, request: AppendRequest) {
        *self.after_empty_read.lock().unwrap() = Some(request);
    }

    /// Every key-value commit that succeeded, in order, each as the one atomic batch it was.
    pub(crate) fn commits(&self) -> Vec<Vec<KvWrite>> {
        self.commits.lock().unwrap().clone()
    }
}

/// A sled store with [`StoreHooks`]: the runtime gets it by value, the test keeps the hooks.
pub(crate) type TestStore = Wrapped<StoreHooks>;

impl TestStore {
    /// Opens the sled database at `path` (`sync` durability).
    pub(crate) fn open(path: &Path) -> (Self, StoreHooks) {
        let hooks = StoreHooks::default();
        let (store, _) = Wrapped::new(open_sled(path), hooks.clone());
        (store, hooks)
    }
}

impl StoreHooks {
    fn writable(&self) -> Result<(), StoreError> {
        if self.crashed.load(Ordering::SeqCst) {
            Err(StoreError::Storage("simulated crash".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Wrap for StoreHooks {
    async fn append(
        &self,
        inner: &dyn EventStore,
        request: AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        self.writable()?;
        inner.append(request).await
    }

    async fn read_log(
        &self,
        inner: &dyn EventStore,
        from: u64,
        max: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let events = inner.read_log(from, max).await?;
        if events.is_empty() {
            let request = self.after_empty_read.lock().unwrap().take();
            if let Some(request) = request {
                inner.append(request).await?;
            }
        }
        Ok(events)
    }

    async fn delete_to(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        to_sequence: u64,
    ) -> Result<(), StoreError> {
        self.writable()?;
        inner.delete_to(stream, to_sequence).await
    }

    async fn save_snapshot(
        &self,
        inner: &dyn EventStore,
        snapshot: SnapshotRecord,
    ) -> Result<(), StoreError> {
        self.writable()?;
        inner.save_snapshot(snapshot).await
    }

    async fn delete_snapshots(
        &self,
        inner: &dyn EventStore,
        stream: &StreamId,
        criteria: SnapshotCriteria,
    ) -> Result<u64, StoreError> {
        self.writable()?;
        inner.delete_snapshots(stream, criteria).await
    }

    async fn kv_commit(
        &self,
        inner: &dyn EventStore,
        writes: Vec<KvWrite>,
    ) -> Result<(), StoreError> {
        self.writable()?;
        inner.kv_commit(writes.clone()).await?;
        self.commits.lock().unwrap().push(writes);
        Ok(())
    }

    async fn flush(&self, inner: &dyn EventStore) -> Result<(), StoreError> {
        self.writable()?;
        inner.flush().await
    }
}
