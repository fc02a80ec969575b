//! The projector actor: one task per projector that owns it, its checkpoint and its mailbox of
//! control requests.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use actix::ArbiterHandle;
use futures::future::{maybe_done, MaybeDone};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    DeadLetter, Delivery, EventFilter, OnError, ProjectionError, ProjectionStatus, Projector,
    ProjectorOptions, ProjectorState, ReadModelTx,
};
use crate::store::{EventEnvelope, EventStore, KvWrite, LogPage, StoreError};

/// The table of every projector's checkpoint, keyed by projector name.
pub(crate) const CHECKPOINTS: &str = "$checkpoints";
/// How long to wait before retrying after a store error.
const STORE_RETRY: Duration = Duration::from_millis(100);
/// Pages of the log read ahead of the one being handled while catching up, on the blocking pool,
/// so the handling rarely waits for the disk. The events are decoded on the arbiter as they are
/// handled (see [`LogPage`]); three pages of 512 did better than two on two cores.
const READ_AHEAD: usize = 3;

type LogRead = Pin<Box<dyn Future<Output = Result<LogPage, StoreError>> + Send>>;

/// A read of the log, possibly started before the batch that needs it.
struct PendingRead {
    from: u64,
    max: usize,
    /// The head when the read started: every event up to it is visible to the read, while
    /// events committed after it may be missed and must not be jumped over.
    head: u64,
    read: MaybeDone<LogRead>,
}

impl PendingRead {
    /// Starts reading up to `max` events from `from`: the read runs on the blocking pool from
    /// now on, whether or not anyone awaits it yet.
    async fn start(store: &Arc<dyn EventStore>, from: u64, max: usize) -> Self {
        let head = store.head();
        let reader = store.clone();
        let read: LogRead = Box::pin(async move { reader.read_log_page(from, max).await });
        let mut read = maybe_done(read);
        // One poll hands the read to the blocking pool; a completed read keeps its output.
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut read).poll(cx);
            Poll::Ready(())
        })
        .await;
        Self {
            from,
            max,
            head,
            read,
        }
    }

    async fn finish(mut self) -> Result<Page, StoreError> {
        (&mut self.read).await;
        let events = Pin::new(&mut self.read)
            .take_output()
            .ok_or_else(|| StoreError::Storage("log read polled after completion".into()))??;
        // The last position the read vouches for: its last event if it was cut at `max`, else
        // the head it started at (positions up to it that it did not return are deleted).
        let last = events.last_position().unwrap_or(0);
        let full = events.len() >= self.max;
        let covered = if full { last } else { last.max(self.head) };
        Ok(Page {
            events,
            covered,
            full,
        })
    }
}

/// The outcome of a read of the log.
struct Page {
    events: LogPage,
    /// Every position up to this one was either returned or is deleted.
    covered: u64,
    /// Whether the read stopped at its `max` (rather than at the head).
    full: bool,
}

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
        ahead: VecDeque::new(),
        deferred: None,
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
    /// Reads started ahead, in position order, each from where the one before it ends if no
    /// event in between was deleted.
    ahead: VecDeque<PendingRead>,
    /// A control request that cut a retry back-off short, handled before anything else.
    deferred: Option<Control>,
}

/// Where a batch stands: the last position handled (or skipped), and its counts.
struct Batch {
    last: u64,
    handled: u64,
    parked: u64,
}

enum Handled {
    Ok,
    Parked(DeadLetter),
    Stop(String),
    /// A control request came during a retry back-off: the event is left unhandled.
    Interrupted,
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
            if let Some(control) = self.deferred.take() {
                if !self.on_control(control).await {
                    return;
                }
            }
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
                // No read outlives the projector: shutdown closes the store next.
                for read in std::mem::take(&mut self.ahead) {
                    let _ = read.finish().await;
                }
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
        self.ahead.clear();
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

    /// Events per read of the log.
    fn page_len(&self) -> usize {
        self.options.batch_size.max(1)
    }

    /// Events per batch from position `from`: `batch_size`, or the catch-up size while at least
    /// that many events behind the head, so a long catch-up pays for fewer commits.
    fn batch_len(&self, from: u64) -> usize {
        let batch = self.page_len();
        let catch_up = self.options.catch_up_batch_size.max(batch);
        let behind = self.store.head().saturating_sub(from.saturating_sub(1));
        if behind >= catch_up as u64 {
            catch_up
        } else {
            batch
        }
    }

    /// The read of the page from `from`: the oldest read started ahead if it starts there (or
    /// before, when deleted positions made the page before it reach further: the events it
    /// repeats are skipped), else a new one. Then reads are started ahead for the pages after it
    /// that lie wholly below the head: a page that reaches the head may still grow, so it is
    /// read when its turn comes.
    async fn next_read(&mut self, from: u64) -> PendingRead {
        let page = self.page_len();
        let read = match self.ahead.pop_front() {
            Some(read) if read.from <= from => read,
            _ => {
                self.ahead.clear();
                PendingRead::start(&self.store, from, page).await
            }
        };
        let head = self.store.head();
        let mut next = self
            .ahead
            .back()
            .map_or(read.from + read.max as u64, |r| r.from + r.max as u64);
        while self.ahead.len() < READ_AHEAD && next.saturating_add(page as u64 - 1) <= head {
            let ahead = PendingRead::start(&self.store, next, page).await;
            self.ahead.push_back(ahead);
            next += page as u64;
        }
        read
    }

    /// Handles the batch after `processed`, page by page, and commits it.
    async fn step(&mut self) {
        let name = self.projector.name();
        let done = self.processed;
        let target = self.batch_len(done + 1) as u64;
        let mut tx = ReadModelTx::new(self.store.clone());
        let mut batch = Batch {
            last: done,
            handled: 0,
            parked: 0,
        };
        loop {
            let read = self.next_read(batch.last + 1).await;
            let handled = match read.finish().await {
                Ok(Page {
                    events,
                    covered,
                    full,
                }) => self
                    .handle_page(events, &mut tx, &mut batch)
                    .await
                    .map(|()| (covered, full)),
                Err(e) => Err(e),
            };
            let (covered, full) = match handled {
                Ok(read) => read,
                Err(e) => {
                    tracing::error!(projector = name, error = %e, "cannot read the log; retrying");
                    self.ahead.clear();
                    if batch.last > done {
                        // The events handled so far are committed; the next batch reads again.
                        break;
                    }
                    tokio::time::sleep(STORE_RETRY).await;
                    return;
                }
            };
            if self.stopped.is_some() || self.deferred.is_some() {
                self.ahead.clear();
                break;
            }
            batch.last = batch.last.max(covered);
            // A page cut short ends at the head. A batch whose writes are already as many as a
            // usual batch's events gains nothing from growing: its commit is no longer small.
            if !full || batch.last - done >= target || tx.len() >= self.page_len() {
                break;
            }
        }
        let Batch {
            last,
            handled,
            parked,
        } = batch;
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
                self.ahead.clear();
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

    /// Handles the events of `page` after `batch.last` that match the filter, into `tx`; stops
    /// at an event the failure strategy stops on. Fails on an event it cannot decode, with the
    /// events before it handled.
    async fn handle_page(
        &mut self,
        mut page: LogPage,
        tx: &mut ReadModelTx,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let name = self.projector.name();
        // A page read ahead overlaps the one before it when events in between were deleted.
        page.skip_through(batch.last);
        for envelope in page {
            let envelope = envelope?;
            if self.filter.matches(&envelope) {
                match self.handle(&envelope, tx).await {
                    Handled::Ok => batch.handled += 1,
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
                                return Ok(());
                            }
                        }
                        batch.parked += 1;
                    }
                    Handled::Stop(error) => {
                        tracing::error!(projector = name, position = envelope.position, %error, "projector stopped");
                        self.stopped = Some(format!("event {}: {error}", envelope.position));
                        return Ok(());
                    }
                    // The batch commits what comes before the event; the request is handled
                    // next, and the event again after it.
                    Handled::Interrupted => return Ok(()),
                }
            }
            batch.last = envelope.position;
        }
        Ok(())
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
                    // A stop (at shutdown), rebuild or replay must not wait out a back-off that
                    // can last minutes.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        control = self.control.recv() => {
                            match control {
                                Some(control) => self.deferred = Some(control),
                                None => self.stopped = Some("the runtime is gone".into()),
                            }
                            return Handled::Interrupted;
                        }
                    }
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
