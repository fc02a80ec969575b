//! The actor runtime: live aggregates on actix arbiters, reached through a cheap handle.

mod actor;
mod command;
mod config;
mod error;
mod registry;
mod work;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::ArbiterHandle;
use tokio::sync::{oneshot, Semaphore};

pub use command::{CommandOptions, Committed, CommittedEvent};
pub use config::{
    AggregateOverrides, AggregateSettings, AggregateTables, Backend, Config, ConfigError,
    DurabilityMode, RuntimeSettings, StoreSettings,
};
pub use error::{CommandError, RuntimeError};
pub use registry::AggregateStats;

use crate::domain::{Aggregate, AggregateId, StreamId};
use crate::projection::{
    self, DeadLetter, ProjectionError, ProjectionStatus, Projector, ProjectorHandle,
    ProjectorOptions,
};
use crate::saga::{self, Clock, ProcessManager, SagaError, SagaHandle, SagaStatus, SystemClock};
use crate::store::{EventStore, MemoryStore, SledStore, StoreError};
use registry::TypeShared;
use work::WorkKind;

/// Why a runtime could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The actor threads could not be started.
    #[error("cannot start the actor threads: {0}")]
    Threads(String),
    /// The same aggregate type tag was registered twice.
    #[error("aggregate type {0} is registered twice")]
    DuplicateType(&'static str),
}

/// The type-erased face of one registered aggregate type.
trait RegisteredType: Send + Sync {
    fn as_any(&self) -> &(dyn Any + Send + Sync);
    fn stop_all(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

struct Registered<A: Aggregate>(Arc<TypeShared<A>>);

impl<A: Aggregate> RegisteredType for Registered<A> {
    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn stop_all(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.stop_all())
    }
}

type Registration = Box<dyn FnOnce(&Setup) -> (TypeId, &'static str, Box<dyn RegisteredType>)>;
type ProjectorStart = Box<dyn FnOnce(&Setup, &ArbiterHandle) -> ProjectorHandle>;
type SagaStart = Box<dyn FnOnce(&Setup, WeakRuntime, &ArbiterHandle) -> SagaHandle>;

/// A handle on the runtime that does not keep it alive (held by its own saga tasks).
#[derive(Clone)]
pub(crate) struct WeakRuntime(std::sync::Weak<Inner>);

impl WeakRuntime {
    pub(crate) fn upgrade(&self) -> Option<Runtime> {
        self.0.upgrade().map(|inner| Runtime { inner })
    }
}

/// What registrations need when the runtime is built.
struct Setup {
    store: Arc<dyn EventStore>,
    config: Config,
    recoveries: Arc<Semaphore>,
    arbiters: Arc<[ArbiterHandle]>,
    clock: Arc<dyn Clock>,
}

/// Builds a [`Runtime`]: configuration, store, and the aggregate types it hosts.
pub struct RuntimeBuilder {
    config: Config,
    store: Option<Arc<dyn EventStore>>,
    registrations: Vec<Registration>,
    projectors: Vec<ProjectorStart>,
    sagas: Vec<SagaStart>,
    clock: Arc<dyn Clock>,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RuntimeBuilder {
    /// A builder with the default configuration.
    pub fn new() -> Self {
        Self {
            config: Config::default(),
            store: None,
            registrations: Vec::new(),
            projectors: Vec::new(),
            sagas: Vec::new(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Uses `config` (e.g. from [`Config::from_file`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Keeps the embedded sled store in `path` (the `store.path` setting).
    pub fn data_dir(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.store.path = path.into();
        self
    }

    /// Changes the configuration in place.
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// Uses an already open store instead of opening the configured one. The runtime closes it
    /// on [`Runtime::shutdown`].
    pub fn store(mut self, store: impl EventStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Hosts aggregate type `A`, with its settings from `[aggregates.<A::TYPE>]`.
    pub fn register<A: Aggregate>(mut self) -> Self {
        self.registrations.push(Box::new(|setup: &Setup| {
            let shared = Arc::new(TypeShared::<A>::new(
                setup.store.clone(),
                setup.config.aggregate(A::TYPE),
                setup.recoveries.clone(),
                setup.arbiters.clone(),
            ));
            let sweep = Duration::from_millis(setup.config.runtime.passivation_sweep_ms);
            if let Some(arbiter) = setup.arbiters.first() {
                arbiter.spawn(shared.clone().sweep(sweep));
            }
            (
                TypeId::of::<A>(),
                A::TYPE,
                Box::new(Registered(shared)) as Box<dyn RegisteredType>,
            )
        }));
        self
    }

    /// Runs `projector` with the default options (exactly-once, stop on error).
    pub fn projector<P: Projector>(self, projector: P) -> Self {
        self.projector_with(projector, ProjectorOptions::default())
    }

    /// Runs `projector` with `options`.
    pub fn projector_with<P: Projector>(mut self, projector: P, options: ProjectorOptions) -> Self {
        self.projectors
            .push(Box::new(move |setup: &Setup, arbiter: &ArbiterHandle| {
                projection::spawn_projector(projector, options, setup.store.clone(), arbiter)
            }));
        self
    }

    /// Runs process manager `pm` (a saga), fed from the global log.
    pub fn saga<P: ProcessManager>(mut self, pm: P) -> Self {
        self.sagas.push(Box::new(
            move |setup: &Setup, runtime: WeakRuntime, arbiter: &ArbiterHandle| {
                saga::spawn_saga(
                    pm,
                    saga::SagaSetup {
                        store: setup.store.clone(),
                        runtime,
                        clock: setup.clock.clone(),
                        batch_size: 256,
                    },
                    arbiter,
                )
            },
        ));
        self
    }

    /// The clock saga deadlines use (a [`ManualClock`](crate::ManualClock) in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Opens the store (unless one was given), starts the actor threads and returns the handle.
    ///
    /// Blocking for as long as opening the store takes; call it at start-up, from any context
    /// (inside or outside a tokio runtime or an actix system).
    pub fn build(self) -> Result<Runtime, BuildError> {
        self.config.validate()?;
        let store: Arc<dyn EventStore> = match self.store {
            Some(store) => store,
            None => match self.config.store.backend {
                Backend::Sled => Arc::new(SledStore::open(self.config.store.sled_config())?),
                Backend::Memory => Arc::new(MemoryStore::new()),
            },
        };
        let threads = match self.config.runtime.arbiters {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (system, arbiters) = start_actor_threads(threads)?;
        let setup = Setup {
            store: store.clone(),
            config: self.config.clone(),
            recoveries: Arc::new(Semaphore::new(
                self.config.runtime.max_concurrent_recoveries,
            )),
            arbiters: arbiters.into(),
            clock: self.clock,
        };
        let mut types: HashMap<TypeId, (&'static str, Box<dyn RegisteredType>)> = HashMap::new();
        for registration in self.registrations {
            let (type_id, tag, registered) = registration(&setup);
            if types.values().any(|(t, _)| *t == tag) || types.contains_key(&type_id) {
                system.stop();
                return Err(BuildError::DuplicateType(tag));
            }
            types.insert(type_id, (tag, registered));
        }
        let mut projectors: HashMap<&'static str, ProjectorHandle> = HashMap::new();
        for (i, start) in self.projectors.into_iter().enumerate() {
            let Some(arbiter) = setup.arbiters.get(i % setup.arbiters.len().max(1)) else {
                break;
            };
            let handle = start(&setup, arbiter);
            if projectors.insert(handle.name(), handle.clone()).is_some() {
                system.stop();
                return Err(BuildError::DuplicateType(handle.name()));
            }
        }
        let saga_starts = self.sagas;
        let inner = Arc::new_cyclic(|weak| {
            let mut sagas = HashMap::new();
            for (i, start) in saga_starts.into_iter().enumerate() {
                if let Some(arbiter) = setup.arbiters.get(i % setup.arbiters.len().max(1)) {
                    let handle = start(&setup, WeakRuntime(weak.clone()), arbiter);
                    sagas.insert(handle.name(), handle);
                }
            }
            Inner {
                config: self.config,
                store,
                types,
                projectors,
                sagas,
                arbiters: setup.arbiters.clone(),
                accepting: AtomicBool::new(true),
                system: Mutex::new(Some(system)),
            }
        });
        Ok(Runtime { inner })
    }
}

/// Starts an actix system on its own thread with `n` arbiters. The system thread only owns the
/// arbiters; actors run on the arbiters, and callers on any thread reach them through `Addr`s,
/// so nobody needs a `LocalSet` of their own.
fn start_actor_threads(n: usize) -> Result<(actix::System, Vec<ArbiterHandle>), BuildError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("incarnate-system".into())
        .spawn(move || {
            let system = actix::System::new();
            let arbiters: Vec<actix::Arbiter> = (0..n).map(|_| actix::Arbiter::new()).collect();
            let handles = arbiters.iter().map(|a| a.handle()).collect::<Vec<_>>();
            let _ = tx.send((actix::System::current(), handles));
            if let Err(e) = system.run() {
                tracing::error!(error = %e, "actor system ended with an error");
            }
        })
        .map_err(|e| BuildError::Threads(e.to_string()))?;
    rx.recv()
        .map_err(|_| BuildError::Threads("the actor system thread died while starting".into()))
}

struct Inner {
    config: Config,
    store: Arc<dyn EventStore>,
    types: HashMap<TypeId, (&'static str, Box<dyn RegisteredType>)>,
    projectors: HashMap<&'static str, ProjectorHandle>,
    sagas: HashMap<&'static str, SagaHandle>,
    arbiters: Arc<[ArbiterHandle]>,
    accepting: AtomicBool,
    system: Mutex<Option<actix::System>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.system.lock() {
            if let Some(system) = guard.take() {
                system.stop();
            }
        }
    }
}

/// A handle to the running runtime: cheap to clone, `Send + Sync`, usable from any async
/// context (tokio, actix-web) to send commands to aggregates and read their state.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// A builder.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::new()
    }

    /// The configuration the runtime runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The event store, for reading streams and the global log.
    pub fn store(&self) -> Arc<dyn EventStore> {
        self.inner.store.clone()
    }

    fn shared<A: Aggregate>(&self) -> Result<&Arc<TypeShared<A>>, RuntimeError> {
        self.inner
            .types
            .get(&TypeId::of::<A>())
            .and_then(|(_, t)| t.as_any().downcast_ref::<Registered<A>>())
            .map(|r| &r.0)
            .ok_or(RuntimeError::UnknownAggregateType(A::TYPE))
    }

    /// Sends `command` to aggregate `id` of type `A`, activating it if needed, and waits until
    /// its events are stored. Returns the committed events, the aggregate's typed rejection, or
    /// a runtime error.
    pub async fn send<A: Aggregate>(
        &self,
        id: impl Into<AggregateId>,
        command: A::Command,
    ) -> Result<Committed<A::Event>, CommandError<A::Error>> {
        self.send_with::<A>(id, command, CommandOptions::default())
            .await
    }

    /// [`send`](Runtime::send) with options: command id (idempotency), correlation and
    /// causation ids, metadata, timeout.
    pub async fn send_with<A: Aggregate>(
        &self,
        id: impl Into<AggregateId>,
        command: A::Command,
        options: CommandOptions,
    ) -> Result<Committed<A::Event>, CommandError<A::Error>> {
        let id = id.into();
        let span = tracing::debug_span!(
            "command",
            aggregate = A::TYPE,
            id = %id,
            command_id = tracing::field::Empty,
            sequence = tracing::field::Empty,
        );
        if let Some(command_id) = options.command_id {
            span.record("command_id", tracing::field::display(command_id));
        }
        let timeout = options
            .timeout
            .unwrap_or_else(|| self.inner.config.command_timeout());
        let result = self
            .deliver::<A>(
                &id,
                WorkKind::Command {
                    command,
                    options,
                    redecided: false,
                },
                timeout,
            )
            .await;
        if let Ok(committed) = &result {
            span.record("sequence", committed.last_sequence);
        }
        result
    }

    /// Runs `read` against aggregate `id`'s persisted state (and version) inside its actor,
    /// between commands, and returns what it returns.
    pub async fn inspect<A, R>(
        &self,
        id: impl Into<AggregateId>,
        read: impl FnOnce(&A, u64) -> R + Send + 'static,
    ) -> Result<R, RuntimeError>
    where
        A: Aggregate,
        R: Send + 'static,
    {
        let id = id.into();
        let (tx, rx) = oneshot::channel();
        let inspect: work::Inspector<A> = Box::new(move |state: &A, version: u64| {
            let _ = tx.send(read(state, version));
        });
        let timeout = self.inner.config.command_timeout();
        match self
            .deliver::<A>(&id, WorkKind::Inspect(inspect), timeout)
            .await
        {
            Ok(_) => rx.await.map_err(|_| RuntimeError::HandlerPanicked {
                stream: StreamId::new(A::TYPE, id),
                message: "the state reader panicked".into(),
            }),
            Err(CommandError::Runtime(e)) => Err(e),
            Err(CommandError::Rejected(_)) => Err(RuntimeError::Stopped),
        }
    }

    /// A clone of aggregate `id`'s persisted state and its version.
    pub async fn state<A: Aggregate + Clone>(
        &self,
        id: impl Into<AggregateId>,
    ) -> Result<(A, u64), RuntimeError> {
        self.inspect::<A, _>(id, |state, version| (state.clone(), version))
            .await
    }

    /// Counters of aggregate type `A`'s actors.
    pub fn stats<A: Aggregate>(&self) -> Result<AggregateStats, RuntimeError> {
        Ok(self.shared::<A>()?.stats())
    }

    fn projector(&self, name: &str) -> Result<&ProjectorHandle, ProjectionError> {
        self.inner
            .projectors
            .get(name)
            .ok_or_else(|| ProjectionError::UnknownProjector(name.to_owned()))
    }

    /// Where projector `name` stands: checkpoint, processed position, head, lag, counts, state.
    pub fn projection_status(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        Ok(self.projector(name)?.status())
    }

    /// Waits until projector `name`'s read model includes global position `position` (e.g. the
    /// `position` of a command's last committed event: read-your-writes). Fails if the
    /// projector stops, or after the command timeout.
    pub async fn wait_for_projection(
        &self,
        name: &str,
        position: u64,
    ) -> Result<(), ProjectionError> {
        self.projector(name)?
            .wait_for(position, self.inner.config.command_timeout())
            .await
    }

    /// Resets projector `name`'s checkpoint, read-model tables and dead letters in one commit,
    /// then replays the log from the start. The live instance does the rebuild itself, so the
    /// two never run side by side; progress shows in [`projection_status`](Runtime::projection_status).
    pub async fn rebuild_projection(&self, name: &str) -> Result<(), ProjectionError> {
        self.projector(name)?.rebuild().await
    }

    /// Restarts a projector stopped by its failure strategy, from its checkpoint.
    pub async fn resume_projection(&self, name: &str) -> Result<(), ProjectionError> {
        self.projector(name)?.resume().await
    }

    /// The events projector `name` parked after its handler failed on them.
    pub async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, ProjectionError> {
        self.projector(name)?;
        projection::dead_letters(&*self.inner.store, name).await
    }

    /// Handles the parked event at `position` again; true if it succeeded (and was unparked).
    pub async fn replay_dead_letter(
        &self,
        name: &str,
        position: u64,
    ) -> Result<bool, ProjectionError> {
        self.projector(name)?.replay_dead_letter(position).await
    }

    /// Whether [`shutdown`](Runtime::shutdown) has begun.
    pub fn is_stopping(&self) -> bool {
        !self.inner.accepting.load(Ordering::Acquire)
    }

    fn saga_handle(&self, name: &str) -> Result<&SagaHandle, SagaError> {
        self.inner
            .sagas
            .get(name)
            .ok_or_else(|| SagaError::Unknown(name.to_owned()))
    }

    /// Where saga `name` stands.
    pub fn saga_status(&self, name: &str) -> Result<SagaStatus, SagaError> {
        Ok(self.saga_handle(name)?.status())
    }

    /// Waits until saga `name` has handled the whole log and has no command in flight (its
    /// pending deadlines may still fire later). Fails if it stops, or after the command timeout.
    pub async fn wait_for_saga_idle(&self, name: &str) -> Result<(), SagaError> {
        self.saga_handle(name)?
            .wait_idle(&self.inner.store, self.inner.config.command_timeout())
            .await
    }

    /// Restarts a saga stopped by a handler error, at the input that failed.
    pub async fn resume_saga(&self, name: &str) -> Result<(), SagaError> {
        self.saga_handle(name)?.resume().await
    }

    async fn deliver<A: Aggregate>(
        &self,
        id: &AggregateId,
        kind: WorkKind<A>,
        timeout: Duration,
    ) -> Result<Committed<A::Event>, CommandError<A::Error>> {
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(RuntimeError::Stopped.into());
        }
        let shared = self.shared::<A>()?.clone();
        let dispatch = shared.dispatch(id, kind);
        let finished = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::time::timeout(timeout, dispatch).await.ok()
        } else {
            // A caller outside any tokio runtime (e.g. `futures::executor::block_on` on a plain
            // thread) has no timer of its own: the timer runs on an actor thread instead.
            let (fire, fired) = oneshot::channel::<()>();
            if let Some(arbiter) = self.inner.arbiters.first() {
                arbiter.spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let _ = fire.send(());
                });
            }
            futures::pin_mut!(dispatch);
            match futures::future::select(dispatch, fired).await {
                futures::future::Either::Left((result, _)) => Some(result),
                futures::future::Either::Right(_) => None,
            }
        };
        match finished {
            Some(result) => result,
            None => Err(RuntimeError::Timeout {
                stream: StreamId::new(A::TYPE, id.clone()),
                after: timeout,
            }
            .into()),
        }
    }

    /// Stops accepting commands, lets every live aggregate finish what it has queued, flushes
    /// and closes the store, and stops the actor threads. Later calls fail with
    /// [`RuntimeError::Stopped`].
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        if !self.inner.accepting.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // Sagas first: a command they send during shutdown would fail and look like a failed
        // step; stopped now, their outbox is re-sent (deduplicated) after the restart.
        for saga in self.inner.sagas.values() {
            saga.stop().await;
        }
        for (_, registered) in self.inner.types.values() {
            registered.stop_all().await;
        }
        for projector in self.inner.projectors.values() {
            projector.stop().await;
        }
        let closed = self.inner.store.close().await;
        if let Ok(mut guard) = self.inner.system.lock() {
            if let Some(system) = guard.take() {
                system.stop();
            }
        }
        match closed {
            Ok(()) | Err(StoreError::Closed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
