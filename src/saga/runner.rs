//! The saga actor: one task per process manager, handling its inputs one at a time.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::ArbiterHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::{Clock, CommandOutcome, ProcessManager, SagaError, SagaStatus, Step};
use crate::projection::{EventFilter, ReadModelTx};
use crate::runtime::{CommandOptions, WeakRuntime};
use crate::store::{EventEnvelope, EventStore, KvWrite};

/// The namespace of saga command ids (UUID v5).
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6a1c_5e0b_9d4f_4c2e_8b7a_1f3d_2e4c_5a6b);
/// Retries of a command that failed for a runtime reason (timeout, overload) before the saga
/// hears of the failure. The same command id is reused, so a retry never doubles an effect.
const DISPATCH_RETRIES: u32 = 5;
const STORE_RETRY: Duration = Duration::from_millis(100);

fn table(name: &str, what: &str) -> String {
    format!("$saga/{name}/{what}")
}

/// One instance's persisted record.
#[derive(Debug, Default, Serialize, Deserialize)]
struct InstanceRecord {
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
    /// Active deadlines: name → due time (ms since the epoch).
    deadlines: BTreeMap<String, u64>,
}

/// A command decided but not yet answered.
#[derive(Debug, Serialize, Deserialize)]
struct OutboxEntry {
    instance: String,
    #[serde(with = "serde_bytes")]
    command: Vec<u8>,
    causation_id: Option<Uuid>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DeadlineEntry {
    instance: String,
    name: String,
    due_ms: u64,
}

fn deadline_key(due_ms: u64, instance: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + instance.len() + name.len() + 1);
    key.extend_from_slice(&due_ms.to_be_bytes());
    key.extend_from_slice(instance.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

fn codec(e: impl std::fmt::Display) -> SagaError {
    SagaError::Codec(e.to_string())
}

enum Control {
    Stop(oneshot::Sender<()>),
    Resume(oneshot::Sender<()>),
}

struct OutcomeMsg<C> {
    id: Uuid,
    instance: String,
    command: C,
    outcome: CommandOutcome,
}

enum Input<'a, C> {
    Event(&'a EventEnvelope),
    Outcome(&'a C, &'a CommandOutcome),
    Deadline(&'a str),
}

/// The runtime's handle on one saga.
#[derive(Clone)]
pub(crate) struct SagaHandle {
    name: &'static str,
    control: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<SagaStatus>,
}

impl SagaHandle {
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn status(&self) -> SagaStatus {
        self.status.borrow().clone()
    }

    /// Waits until the saga has handled the whole log and has no command in flight.
    pub(crate) async fn wait_idle(
        &self,
        store: &Arc<dyn EventStore>,
        timeout: Duration,
    ) -> Result<(), SagaError> {
        let mut status = self.status.clone();
        let store = store.clone();
        let idle = async move {
            status
                .wait_for(|s| {
                    s.stopped.is_some() || (s.checkpoint >= store.head() && s.outstanding == 0)
                })
                .await
                .map(|s| s.stopped.clone())
        };
        match tokio::time::timeout(timeout, idle).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(reason))) => Err(SagaError::Stopped {
                name: self.name.into(),
                reason,
            }),
            Ok(Err(_)) => Err(SagaError::Stopped {
                name: self.name.into(),
                reason: "the saga task ended".into(),
            }),
            Err(_) => Err(SagaError::Timeout {
                name: self.name.into(),
                after: timeout,
            }),
        }
    }

    pub(crate) async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) async fn resume(&self) -> Result<(), SagaError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || SagaError::Stopped {
            name: self.name.into(),
            reason: "the saga task ended".into(),
        };
        self.control
            .send(Control::Resume(tx))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }
}

pub(crate) struct SagaSetup {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) runtime: WeakRuntime,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) batch_size: usize,
}

/// Starts `pm` on `arbiter`.
pub(crate) fn spawn_saga<P: ProcessManager>(
    pm: P,
    setup: SagaSetup,
    arbiter: &ArbiterHandle,
) -> SagaHandle {
    let name = pm.name();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (status_tx, status_rx) = watch::channel(SagaStatus {
        name: name.to_owned(),
        checkpoint: 0,
        outstanding: 0,
        handled: 0,
        deadlines_fired: 0,
        stopped: None,
    });
    let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
    let runner = Runner {
        filter: pm.filter(),
        pm: Arc::new(pm),
        name,
        setup,
        control: control_rx,
        status: status_tx,
        outcomes_tx,
        outcomes_rx,
        checkpoint: 0,
        outstanding: HashSet::new(),
        next_deadline: None,
        handled: 0,
        fired: 0,
        stopped: None,
    };
    arbiter.spawn_fn(move || {
        actix::spawn(runner.run());
    });
    SagaHandle {
        name,
        control: control_tx,
        status: status_rx,
    }
}

struct Runner<P: ProcessManager> {
    pm: Arc<P>,
    filter: EventFilter,
    name: &'static str,
    setup: SagaSetup,
    control: mpsc::UnboundedReceiver<Control>,
    status: watch::Sender<SagaStatus>,
    outcomes_tx: mpsc::UnboundedSender<OutcomeMsg<P::Command>>,
    outcomes_rx: mpsc::UnboundedReceiver<OutcomeMsg<P::Command>>,
    checkpoint: u64,
    outstanding: HashSet<Uuid>,
    next_deadline: Option<u64>,
    handled: u64,
    fired: u64,
    stopped: Option<String>,
}

impl<P: ProcessManager> Runner<P> {
    fn store(&self) -> &Arc<dyn EventStore> {
        &self.setup.store
    }

    fn checkpoint_key(&self) -> Vec<u8> {
        format!("saga:{}", self.name).into_bytes()
    }

    async fn run(mut self) {
        while let Err(e) = self.start().await {
            tracing::error!(saga = self.name, error = %e, "cannot start; retrying");
            tokio::time::sleep(STORE_RETRY).await;
        }
        let mut head = self.store().watch_head();
        loop {
            while let Ok(control) = self.control.try_recv() {
                if !self.on_control(control) {
                    return;
                }
            }
            if self.stopped.is_some() {
                match self.control.recv().await {
                    Some(control) => {
                        if self.on_control(control) {
                            continue;
                        }
                        return;
                    }
                    None => return,
                }
            }
            if let Ok(msg) = self.outcomes_rx.try_recv() {
                self.on_outcome(msg).await;
                continue;
            }
            // The log before the deadlines: an event already committed (a payment, a cancellation
            // recorded before a crash) must be handled before a deadline it may cancel fires.
            if self.checkpoint < self.store().head() {
                self.step().await;
                continue;
            }
            let now = self.setup.clock.now_ms();
            if self.next_deadline.is_some_and(|due| due <= now) {
                self.fire_deadlines().await;
                continue;
            }
            self.publish();
            let checkpoint = self.checkpoint;
            let sleep = self
                .next_deadline
                .map(|due| self.setup.clock.sleep_until(due));
            tokio::select! {
                msg = self.outcomes_rx.recv() => if let Some(msg) = msg { self.on_outcome(msg).await },
                control = self.control.recv() => match control {
                    Some(control) => if !self.on_control(control) { return },
                    None => return,
                },
                _ = head.wait_for(|h| *h > checkpoint) => {}
                _ = async { if let Some(s) = sleep { s.await } }, if self.next_deadline.is_some() => {}
            }
        }
    }

    fn on_control(&mut self, control: Control) -> bool {
        match control {
            Control::Stop(reply) => {
                let _ = reply.send(());
                false
            }
            Control::Resume(reply) => {
                self.stopped = None;
                self.publish();
                let _ = reply.send(());
                true
            }
        }
    }

    /// Loads the checkpoint, re-sends every command left in the outbox, finds the next deadline.
    async fn start(&mut self) -> Result<(), SagaError> {
        if let Some(bytes) = self
            .store()
            .kv_get(crate::projection::CHECKPOINTS, &self.checkpoint_key())
            .await?
        {
            let raw: [u8; 8] = bytes.as_slice().try_into().map_err(codec)?;
            self.checkpoint = u64::from_be_bytes(raw);
        }
        let outbox = self
            .store()
            .kv_scan(&table(self.name, "outbox"), &[], usize::MAX)
            .await?;
        for (key, value) in outbox {
            let id = Uuid::from_slice(&key).map_err(codec)?;
            let entry: OutboxEntry = rmp_serde::from_slice(&value).map_err(codec)?;
            let command: P::Command = rmp_serde::from_slice(&entry.command).map_err(codec)?;
            self.dispatch(id, entry.instance, command, entry.causation_id);
        }
        self.refresh_next_deadline().await?;
        self.publish();
        Ok(())
    }

    fn stop_with(&mut self, error: &SagaError) {
        tracing::error!(saga = self.name, %error, "saga stopped");
        self.stopped = Some(error.to_string());
        self.publish();
    }

    /// Handles one batch of the log.
    async fn step(&mut self) {
        let events = match self
            .store()
            .read_log(self.checkpoint + 1, self.setup.batch_size)
            .await
        {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(saga = self.name, error = %e, "cannot read the log; retrying");
                tokio::time::sleep(STORE_RETRY).await;
                return;
            }
        };
        let mut tx = ReadModelTx::new(self.store().clone());
        let mut last = self.checkpoint;
        let mut sends = Vec::new();
        let mut handled = 0;
        for envelope in &events {
            if self.filter.matches(envelope) {
                if let Some(correlation) = self.pm.correlate(envelope) {
                    let seed = format!("e{}", envelope.position);
                    match self
                        .process(
                            &correlation.instance,
                            Input::Event(envelope),
                            &mut tx,
                            &seed,
                            correlation.starts,
                            Some(envelope.event_id),
                        )
                        .await
                    {
                        Ok(new) => {
                            handled += 1;
                            sends.extend(new);
                            tx.keep_event();
                        }
                        Err(e) => {
                            tx.discard_event();
                            self.stop_with(&e);
                            break;
                        }
                    }
                }
            }
            last = envelope.position;
        }
        if events.is_empty() {
            last = self.store().head();
        }
        tx.push(KvWrite::Put {
            table: crate::projection::CHECKPOINTS.to_owned(),
            key: self.checkpoint_key(),
            value: last.to_be_bytes().to_vec(),
        });
        if self.commit(tx, sends).await {
            self.checkpoint = last;
            self.handled += handled;
            self.publish();
        }
    }

    /// Commits `tx`; then sends the commands it put in the outbox. False if the commit failed.
    async fn commit(
        &mut self,
        tx: ReadModelTx,
        sends: Vec<(Uuid, String, P::Command, Option<Uuid>)>,
    ) -> bool {
        if let Err(e) = self.store().kv_commit(tx.into_writes()).await {
            tracing::error!(saga = self.name, error = %e, "commit failed; the input will be handled again");
            tokio::time::sleep(STORE_RETRY).await;
            return false;
        }
        let deadlines = self.refresh_next_deadline().await;
        if let Err(e) = deadlines {
            tracing::warn!(saga = self.name, error = %e, "cannot read deadlines");
        }
        for (id, instance, command, causation) in sends {
            self.dispatch(id, instance, command, causation);
        }
        true
    }

    /// Runs one input of one instance against its state, writing the result into `tx`.
    /// Returns the commands to send once `tx` commits.
    async fn process(
        &self,
        instance: &str,
        input: Input<'_, P::Command>,
        tx: &mut ReadModelTx,
        seed: &str,
        starts: bool,
        causation: Option<Uuid>,
    ) -> Result<Vec<(Uuid, String, P::Command, Option<Uuid>)>, SagaError> {
        let instances = table(self.name, "instances");
        let key = instance.as_bytes().to_vec();
        let mut record: InstanceRecord = match tx.get_raw(&instances, &key).await? {
            Some(bytes) => rmp_serde::from_slice(&bytes).map_err(codec)?,
            None if starts => InstanceRecord::default(),
            None => return Ok(Vec::new()),
        };
        let mut state: P::State = if record.state.is_empty() {
            P::State::default()
        } else {
            rmp_serde::from_slice(&record.state).map_err(codec)?
        };
        let step: Step<P::Command> = match input {
            Input::Event(e) => self.pm.on_event(&mut state, e)?,
            Input::Outcome(c, o) => self.pm.on_outcome(&mut state, c, o)?,
            Input::Deadline(name) => {
                record.deadlines.remove(name);
                self.pm.on_deadline(&mut state, name)?
            }
        };
        let deadlines = table(self.name, "deadlines");
        let outbox = table(self.name, "outbox");
        let mut sends = Vec::with_capacity(step.commands.len());
        for (i, command) in step.commands.into_iter().enumerate() {
            let id = Uuid::new_v5(
                &COMMAND_NAMESPACE,
                format!("{}/{instance}/{seed}/{i}", self.name).as_bytes(),
            );
            let entry = OutboxEntry {
                instance: instance.to_owned(),
                command: rmp_serde::to_vec(&command).map_err(codec)?,
                causation_id: causation,
            };
            tx.put_raw(
                &outbox,
                id.as_bytes().to_vec(),
                rmp_serde::to_vec(&entry).map_err(codec)?,
            );
            sends.push((id, instance.to_owned(), command, causation));
        }
        let now = self.setup.clock.now_ms();
        for (name, delay) in step.schedule {
            if let Some(old) = record.deadlines.remove(&name) {
                tx.delete_raw(&deadlines, deadline_key(old, instance, &name));
            }
            let due_ms = now.saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            let entry = DeadlineEntry {
                instance: instance.to_owned(),
                name: name.clone(),
                due_ms,
            };
            tx.put_raw(
                &deadlines,
                deadline_key(due_ms, instance, &name),
                rmp_serde::to_vec(&entry).map_err(codec)?,
            );
            record.deadlines.insert(name, due_ms);
        }
        for name in step.cancel {
            if let Some(old) = record.deadlines.remove(&name) {
                tx.delete_raw(&deadlines, deadline_key(old, instance, &name));
            }
        }
        if step.complete {
            for (name, due) in std::mem::take(&mut record.deadlines) {
                tx.delete_raw(&deadlines, deadline_key(due, instance, &name));
            }
            tx.delete_raw(&instances, key);
        } else {
            record.state = rmp_serde::to_vec(&state).map_err(codec)?;
            tx.put_raw(&instances, key, rmp_serde::to_vec(&record).map_err(codec)?);
        }
        Ok(sends)
    }

    /// Feeds a command's outcome back to its instance and removes it from the outbox, in one
    /// commit.
    async fn on_outcome(&mut self, msg: OutcomeMsg<P::Command>) {
        let mut tx = ReadModelTx::new(self.store().clone());
        tx.delete_raw(&table(self.name, "outbox"), msg.id.as_bytes().to_vec());
        let seed = format!("o{}", msg.id);
        match self
            .process(
                &msg.instance,
                Input::Outcome(&msg.command, &msg.outcome),
                &mut tx,
                &seed,
                false,
                Some(msg.id),
            )
            .await
        {
            Ok(sends) => {
                if self.commit(tx, sends).await {
                    self.outstanding.remove(&msg.id);
                    self.handled += 1;
                    self.publish();
                } else {
                    // Not committed: the outcome is handled again when it comes back.
                    let _ = self.outcomes_tx.send(msg);
                }
            }
            Err(e) => self.stop_with(&e),
        }
    }

    async fn refresh_next_deadline(&mut self) -> Result<(), SagaError> {
        let first = self
            .store()
            .kv_scan(&table(self.name, "deadlines"), &[], 1)
            .await?;
        self.next_deadline = first
            .first()
            .and_then(|(k, _)| k.get(..8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        Ok(())
    }

    /// Fires every deadline that is due, each in its own commit with its instance's reaction.
    async fn fire_deadlines(&mut self) {
        let deadlines = table(self.name, "deadlines");
        let now = self.setup.clock.now_ms();
        let due = match self.store().kv_scan(&deadlines, &[], 64).await {
            Ok(due) => due,
            Err(e) => {
                tracing::error!(saga = self.name, error = %e, "cannot read deadlines; retrying");
                tokio::time::sleep(STORE_RETRY).await;
                return;
            }
        };
        for (key, value) in due {
            let entry: DeadlineEntry = match rmp_serde::from_slice(&value) {
                Ok(entry) => entry,
                Err(e) => return self.stop_with(&codec(e)),
            };
            if entry.due_ms > now {
                break;
            }
            let mut tx = ReadModelTx::new(self.store().clone());
            tx.delete_raw(&deadlines, key);
            let seed = format!("d{}:{}", entry.name, entry.due_ms);
            match self
                .process(
                    &entry.instance,
                    Input::Deadline(&entry.name),
                    &mut tx,
                    &seed,
                    false,
                    None,
                )
                .await
            {
                Ok(sends) => {
                    if !self.commit(tx, sends).await {
                        return;
                    }
                    tracing::info!(saga = self.name, instance = %entry.instance, deadline = %entry.name, "deadline fired");
                    self.fired += 1;
                }
                Err(e) => return self.stop_with(&e),
            }
        }
        if let Err(e) = self.refresh_next_deadline().await {
            tracing::warn!(saga = self.name, error = %e, "cannot read deadlines");
        }
        self.publish();
    }

    /// Sends one command beside the saga loop; its outcome comes back as an input.
    fn dispatch(
        &mut self,
        id: Uuid,
        instance: String,
        command: P::Command,
        causation: Option<Uuid>,
    ) {
        self.outstanding.insert(id);
        let pm = self.pm.clone();
        let runtime = self.setup.runtime.clone();
        let outcomes = self.outcomes_tx.clone();
        let correlation = Uuid::new_v5(
            &COMMAND_NAMESPACE,
            format!("{}/{instance}", self.name).as_bytes(),
        );
        let mut options = CommandOptions::new()
            .command_id(id)
            .correlation_id(correlation);
        options.causation_id = causation.or(Some(id));
        actix::spawn(async move {
            let mut attempt = 0;
            let outcome = loop {
                let Some(rt) = runtime.upgrade() else { return };
                let outcome = pm.dispatch(&rt, command.clone(), options.clone()).await;
                if matches!(outcome, CommandOutcome::Failed { .. }) {
                    if rt.is_stopping() {
                        // Shutting down: the command stays in the outbox and is sent again,
                        // with the same id, after the restart.
                        return;
                    }
                    if attempt < DISPATCH_RETRIES {
                        attempt += 1;
                        drop(rt);
                        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                        continue;
                    }
                }
                break outcome;
            };
            let _ = outcomes.send(OutcomeMsg {
                id,
                instance,
                command,
                outcome,
            });
        });
        self.publish();
    }

    fn publish(&self) {
        self.status.send_replace(SagaStatus {
            name: self.name.to_owned(),
            checkpoint: self.checkpoint,
            outstanding: self.outstanding.len(),
            handled: self.handled,
            deadlines_fired: self.fired,
            stopped: self.stopped.clone(),
        });
    }
}
