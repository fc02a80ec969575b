//! The projector actor: one task per projector that owns it, its checkpoint and its mailbox of
//! control requests.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::ArbiterHandle;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    DeadLetter, Delivery, EventFilter, OnError, ProjectionError, ProjectionStatus, Projector,
    ProjectorOptions, ProjectorState, ReadModelTx,
};
use crate::store::{EventEnvelope, EventStore, KvWrite};

/// The table of every projector's checkpoint, keyed by projector name.
pub(crate) const CHECKPOINTS: &str = "$checkpoints";
/// How long to wait before retrying after a store error.
const STORE_RETRY: Duration = Duration::from_millis(100);

pub(crate) fn dead_letter_table(name: &str) -> String {
    format!("$dead-letters/{name}")
}

enum Control {
    Rebuild(oneshot::Sender<Result<(), ProjectionError>>),
    ReplayDeadLetter(u64, oneshot::Sender<Result<bool, ProjectionError>>),
    Resume(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// The runtime's handle on one projector.
#[derive(Clone)]
pub(crate) struct ProjectorHandle {
    name: &'static str,
    control: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<ProjectionStatus>,
    /// The store's head, so the lag of a stopped or busy projector is current.
    head: watch::Receiver<u64>,
}

impl ProjectorHandle {
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn status(&self) -> ProjectionStatus {
        let mut status = self.status.borrow().clone();
        // The runner publishes only when it moves: a stopped (or busy) projector falls behind
        // without publishing, so the head and lag are taken from the store now.
        status.head = status.head.max(*self.head.borrow());
        status.lag = status.head.saturating_sub(status.processed);
        status
    }

    fn stopped(&self, reason: &str) -> ProjectionError {
        ProjectionError::Stopped {
            name: self.name.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// Waits until the projector's committed read model includes position `position`.
    pub(crate) async fn wait_for(
        &self,
        position: u64,
        timeout: Duration,
    ) -> Result<(), ProjectionError> {
        let mut status = self.status.clone();
        let reached = async move {
            status
                .wait_for(|s| {
                    s.processed >= position || matches!(s.state, ProjectorState::Stopped(_))
                })
                .await
                .map(|s| (s.processed, s.state.clone()))
        };
        match tokio::time::timeout(timeout, reached).await {
            Ok(Ok((processed, _))) if processed >= position => Ok(()),
            Ok(Ok((_, ProjectorState::Stopped(reason)))) => Err(self.stopped(&reason)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(self.stopped("the projector task ended")),
            Err(_) => Err(ProjectionError::Timeout {
                name: self.name.to_owned(),
                position,
                after: timeout,
            }),
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Result<T, ProjectionError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .map_err(|_| self.stopped("the projector task ended"))?;
        rx.await
            .map_err(|_| self.stopped("the projector task ended"))
    }

    pub(crate) async fn rebuild(&self) -> Result<(), ProjectionError> {
        self.ask(Control::Rebuild).await?
    }

    pub(crate) async fn replay_dead_letter(&self, position: u64) -> Result<bool, ProjectionError> {
        self.ask(|tx| Control::ReplayDeadLetter(position, tx))
            .await?
    }

    pub(crate) async fn resume(&self) -> Result<(), ProjectionError> {
        self.ask(Control::Resume).await
    }

    pub(crate) async fn stop(&self) {
        let _ = self.ask(Control::Stop).await;
    }
}

/// Starts `projector` on `arbiter`.
pub(crate) fn spawn_projector<P: Projector>(
    projector: P,
    options: ProjectorOptions,
    store: Arc<dyn EventStore>,
    arbiter: &ArbiterHandle,
) -> ProjectorHandle {
    let name = projector.name();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (status_tx, status_rx) = watch::channel(ProjectionStatus {
        name: name.to_owned(),
        checkpoint: 0,
        processed: 0,
        head: store.head(),
        lag: 0,
        handled: 0,
        skipped: 0,
        state: ProjectorState::Running,
    });
    let head = store.watch_head();
    let runner = Runner {
        filter: projector.filter(),
        projector,
        options,
        store,
        status: status_tx,
        control: control_rx,
        checkpoint: 0,
        processed: 0,
        handled: 0,
        skipped: 0,
        stopped: None,
        rebuild_until: None,
        last_checkpoint: Instant::now(),
    };
    // The runner lives on one arbiter thread like an actor, so the projector need not be `Sync`.
    arbiter.spawn_fn(move || {
        actix::spawn(runner.run());
    });
    ProjectorHandle {
        name,
        control: control_tx,
        status: status_rx,
        head,
    }
}

struct Runner<P: Projector> {
    projector: P,
    filter: EventFilter,
    options: ProjectorOptions,
    store: Arc<dyn EventStore>,
    status: watch::Sender<ProjectionStatus>,
    control: mpsc::UnboundedReceiver<Control>,
    checkpoint: u64,
    processed: u64,
    handled: u64,
    skipped: u64,
    stopped: Option<String>,
    /// While rebuilding: the head when the rebuild started.
    rebuild_until: Option<u64>,
    last_checkpoint: Instant,
}

enum Handled {
    Ok,
    Parked(DeadLetter),
    Stop(String),
}

impl<P: Projector> Runner<P> {
    async fn run(mut self) {
        let name = self.projector.name();
        loop {
            match self.load_checkpoint().await {
                Ok(c) => break self.checkpoint = c,
                Err(e) => {
                    tracing::error!(projector = name, error = %e, "cannot read the checkpoint; retrying");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
        self.processed = self.checkpoint;
        self.publish();
        let mut head = self.store.watch_head();
        loop {
            // Control requests first: they are rare and must not wait behind a long catch-up.
            while let Ok(control) = self.control.try_recv() {
                if !self.on_control(control).await {
                    return;
                }
            }
            let caught_up = self.processed >= self.store.head();
            if self.stopped.is_some() || caught_up {
                if caught_up {
                    self.commit_pending_checkpoint().await;
                    if self.rebuild_until.take().is_some() {
                        self.publish();
                    }
                }
                let processed = self.processed;
                let stopped = self.stopped.is_some();
                tokio::select! {
                    control = self.control.recv() => match control {
                        Some(control) => if !self.on_control(control).await { return },
                        None => return,
                    },
                    _ = head.wait_for(|h| *h > processed), if !stopped => {}
                }
                continue;
            }
            self.step().await;
        }
    }

    /// Handles one control request; false when the projector must end.
    async fn on_control(&mut self, control: Control) -> bool {
        match control {
            Control::Stop(reply) => {
                self.commit_pending_checkpoint().await;
                self.stopped = Some("stopped".into());
                self.publish();
                let _ = reply.send(());
                false
            }
            Control::Resume(reply) => {
                self.stopped = None;
                self.publish();
                let _ = reply.send(());
                true
            }
            Control::Rebuild(reply) => {
                let _ = reply.send(self.reset().await);
                true
            }
            Control::ReplayDeadLetter(position, reply) => {
                let _ = reply.send(self.replay(position).await);
                true
            }
        }
    }

    async fn load_checkpoint(&self) -> Result<u64, ProjectionError> {
        let name = self.projector.name();
        match self.store.kv_get(CHECKPOINTS, name.as_bytes()).await? {
            Some(bytes) => bytes
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    ProjectionError::Codec(format!("checkpoint of {name}: expected 8 bytes"))
                }),
            None => Ok(0),
        }
    }

    fn checkpoint_write(&self, position: u64) -> KvWrite {
        KvWrite::Put {
            table: CHECKPOINTS.to_owned(),
            key: self.projector.name().as_bytes().to_vec(),
            value: position.to_be_bytes().to_vec(),
        }
    }

    /// Resets the read model and the checkpoint in one commit; the loop then replays the log.
    async fn reset(&mut self) -> Result<(), ProjectionError> {
        let mut tx = ReadModelTx::new(self.store.clone());
        for table in self.projector.tables() {
            tx.clear(table);
        }
        tx.clear(&dead_letter_table(self.projector.name()));
        tx.push(self.checkpoint_write(0));
        self.store.kv_commit(tx.into_writes()).await?;
        self.checkpoint = 0;
        self.processed = 0;
        self.handled = 0;
        self.skipped = 0;
        self.stopped = None;
        self.rebuild_until = Some(self.store.head());
        self.publish();
        Ok(())
    }

    async fn commit_pending_checkpoint(&mut self) {
        if self.checkpoint >= self.processed {
            return;
        }
        match self
            .store
            .kv_commit(vec![self.checkpoint_write(self.processed)])
            .await
        {
            Ok(()) => {
                self.checkpoint = self.processed;
                self.last_checkpoint = Instant::now();
                self.publish();
            }
            Err(e) => {
                tracing::warn!(projector = self.projector.name(), error = %e, "checkpoint failed")
            }
        }
    }

    /// Reads one batch after `processed`, handles it and commits.
    async fn step(&mut self) {
        let name = self.projector.name();
        // The head before the read: every event up to it is visible to the read, while events
        // committed after it may be missed by the read and must not be jumped over.
        let head = self.store.head();
        let events = match self
            .store
            .read_log(self.processed + 1, self.options.batch_size.max(1))
            .await
        {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(projector = name, error = %e, "cannot read the log; retrying");
                tokio::time::sleep(STORE_RETRY).await;
                return;
            }
        };
        if events.is_empty() {
            // Every position up to `head` was deleted.
            self.processed = self.processed.max(head);
            return;
        }
        let mut tx = ReadModelTx::new(self.store.clone());
        let mut last = self.processed;
        let mut handled = 0;
        let mut parked = 0;
        for envelope in &events {
            if self.filter.matches(envelope) {
                match self.handle(envelope, &mut tx).await {
                    Handled::Ok => handled += 1,
                    Handled::Parked(letter) => {
                        tracing::warn!(projector = name, position = letter.position, error = %letter.error, "event parked in dead letters");
                        match rmp_serde::to_vec(&letter) {
                            Ok(value) => tx.push(KvWrite::Put {
                                table: dead_letter_table(name),
                                key: letter.position.to_be_bytes().to_vec(),
                                value,
                            }),
                            Err(e) => {
                                self.stopped = Some(format!("cannot record a dead letter: {e}"));
                                break;
                            }
                        }
                        parked += 1;
                    }
                    Handled::Stop(error) => {
                        tracing::error!(projector = name, position = envelope.position, %error, "projector stopped");
                        self.stopped = Some(format!("event {}: {error}", envelope.position));
                        break;
                    }
                }
            }
            last = envelope.position;
        }
        let checkpoint_now = match self.options.delivery {
            Delivery::ExactlyOnce => true,
            Delivery::AtLeastOnce {
                every_events,
                every_ms,
            } => {
                self.stopped.is_some()
                    || last - self.checkpoint >= every_events.max(1)
                    || self.last_checkpoint.elapsed() >= Duration::from_millis(every_ms)
            }
        };
        if checkpoint_now && last > self.checkpoint {
            tx.push(self.checkpoint_write(last));
        }
        if !tx.is_empty() {
            if let Err(e) = self.store.kv_commit(tx.into_writes()).await {
                // Nothing of this batch is committed: it is read and handled again.
                tracing::error!(projector = name, error = %e, "commit failed; retrying the batch");
                self.stopped = None;
                tokio::time::sleep(STORE_RETRY).await;
                return;
            }
        }
        if checkpoint_now && last > self.checkpoint {
            self.checkpoint = last;
            self.last_checkpoint = Instant::now();
        }
        self.processed = last;
        self.handled += handled;
        self.skipped += parked;
        if self
            .rebuild_until
            .is_some_and(|until| self.processed >= until)
        {
            // The history there was at the reset is replayed: publish the end of the rebuild
            // with the batch that completes it, not one loop turn later.
            self.rebuild_until = None;
        }
        self.publish();
        let status = self.status.borrow();
        tracing::debug!(
            projector = name,
            processed = status.processed,
            head = status.head,
            lag = status.lag,
            "batch committed"
        );
    }

    /// Runs the handler on one event with the failure strategy.
    async fn handle(&mut self, envelope: &EventEnvelope, tx: &mut ReadModelTx) -> Handled {
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let outcome = AssertUnwindSafe(self.projector.handle(envelope, tx))
                .catch_unwind()
                .await;
            let error = match outcome {
                Ok(Ok(())) => {
                    tx.keep_event();
                    return Handled::Ok;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the handler panicked".to_owned(),
            };
            tx.discard_event();
            let letter = || DeadLetter {
                position: envelope.position,
                stream: envelope.stream.to_string(),
                event_type: envelope.event_type.clone(),
                error: error.clone(),
                attempts: attempt,
            };
            match self.options.on_error {
                OnError::Stop => return Handled::Stop(error),
                OnError::Skip => return Handled::Parked(letter()),
                OnError::Retry {
                    attempts,
                    backoff_ms,
                    then_skip,
                } => {
                    if attempt > attempts {
                        return if then_skip {
                            Handled::Parked(letter())
                        } else {
                            Handled::Stop(error)
                        };
                    }
                    let delay = backoff_ms.saturating_mul(1 << (attempt - 1).min(16));
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
            }
        }
    }

    /// Handles a parked event again; on success its dead letter is removed in the same commit.
    async fn replay(&mut self, position: u64) -> Result<bool, ProjectionError> {
        let name = self.projector.name();
        let table = dead_letter_table(name);
        let key = position.to_be_bytes().to_vec();
        let Some(bytes) = self.store.kv_get(&table, &key).await? else {
            return Ok(false);
        };
        let mut letter: DeadLetter =
            rmp_serde::from_slice(&bytes).map_err(|e| ProjectionError::Codec(e.to_string()))?;
        let Some(envelope) = self
            .store
            .read_log(position, 1)
            .await?
            .into_iter()
            .find(|e| e.position == position)
        else {
            return Err(ProjectionError::Store(format!(
                "event {position} is no longer in the log"
            )));
        };
        let mut tx = ReadModelTx::new(self.store.clone());
        let outcome = AssertUnwindSafe(self.projector.handle(&envelope, &mut tx))
            .catch_unwind()
            .await;
        match outcome {
            Ok(Ok(())) => {
                tx.push(KvWrite::Delete { table, key });
                self.store.kv_commit(tx.into_writes()).await?;
                Ok(true)
            }
            Ok(Err(e)) => {
                letter.error = e.to_string();
                letter.attempts += 1;
                let value = rmp_serde::to_vec(&letter)
                    .map_err(|e| ProjectionError::Codec(e.to_string()))?;
                self.store
                    .kv_commit(vec![KvWrite::Put { table, key, value }])
                    .await?;
                Ok(false)
            }
            Err(_) => Err(ProjectionError::Handler("the handler panicked".into())),
        }
    }

    fn publish(&self) {
        let head = self.store.head();
        let state = match (&self.stopped, self.rebuild_until) {
            (Some(reason), _) => ProjectorState::Stopped(reason.clone()),
            (None, Some(_)) => ProjectorState::Rebuilding,
            (None, None) => ProjectorState::Running,
        };
        self.status.send_replace(ProjectionStatus {
            name: self.projector.name().to_owned(),
            checkpoint: self.checkpoint,
            processed: self.processed,
            head,
            lag: head.saturating_sub(self.processed),
            handled: self.handled,
            skipped: self.skipped,
            state,
        });
    }
}

/// Lists `name`'s parked events.
pub(crate) async fn dead_letters(
    store: &dyn EventStore,
    name: &str,
) -> Result<Vec<DeadLetter>, ProjectionError> {
    store
        .kv_scan(&dead_letter_table(name), &[], usize::MAX)
        .await?
        .into_iter()
        .map(|(_, v)| rmp_serde::from_slice(&v).map_err(|e| ProjectionError::Codec(e.to_string())))
        .collect()
}
