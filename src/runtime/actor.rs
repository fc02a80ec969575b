//! The aggregate actor: one live aggregate, its mailbox, and the decide → append → apply → reply
//! cycle.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, WeakAddr, WrapFuture,
};
use uuid::Uuid;

use super::command::{CommandOptions, Committed, CommittedEvent};
use super::error::{CommandError, RuntimeError};
use super::registry::TypeShared;
use super::work::{Attempt, Deliver, Drive, Passivate, ReplyTx, Work, WorkKind};
use crate::domain::{Aggregate, AggregateId, DomainEvent, StreamId};
use crate::store::{
    now_micros, AppendRequest, AppendResult, Causation, CommandRecord, NewEvent, RecordedOutcome,
    SnapshotCriteria, SnapshotRecord, StoreError,
};

/// Events read per page while recovering.
const REPLAY_PAGE: usize = 1024;
/// First and largest delay before reloading after a failed write.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(5));
/// Doublings of the first delay after which the largest one applies (10 ms × 2^9 > 5 s).
const RESTART_DOUBLINGS: u8 = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Loading snapshot and events; work queues up.
    Recovering,
    /// Idle, deciding, or with appends in flight (up to `max_appends_in_flight`).
    Ready,
    /// An append failed or `apply` panicked: nothing new is decided; the appends still in flight
    /// land (their commands are answered or queued again), then the actor reloads.
    Draining {
        /// Whether the reload waits (a failed write) or not (a conflict, a panic).
        backoff: bool,
        /// Where the next command queued again goes: behind those queued again before it, ahead
        /// of newer work.
        requeue_at: usize,
    },
    /// Passivating or shut down; new work is bounced to the next incarnation.
    Stopping,
}

/// One live aggregate.
///
/// Memory per live aggregate is the point of this layout. The actor sits inside the actix
/// context future, inside the tokio task's allocation, which tokio rounds up to a multiple of
/// 128 B; the context alone is ~340 B. So the actor itself is kept to a few words (the task
/// stays at 512 B whatever the aggregate type) and everything else is in [`Body`], one
/// allocation of exactly its size. Nothing an idle aggregate does not need is held: the stream
/// id is built on demand from the id and the type's shared tag, the idempotency window is
/// allocated with the first command id, the queue buffer is dropped whenever the actor goes
/// idle, and the last use is the registry's.
pub(crate) struct AggregateActor<A: Aggregate> {
    shared: Arc<TypeShared<A>>,
    id: AggregateId,
    /// Its own address, weakly: names this incarnation to the registry.
    me: WeakAddr<Self>,
    phase: Phase,
    /// The persisted version: `state` equals the fold of events `1..=version` whenever the
    /// actor is `Ready` with no append in flight.
    version: u64,
    body: Box<Body<A>>,
}

/// The part of an actor whose size depends on the aggregate type.
///
/// Batches are pipelined: each is applied to `state` as it is decided, so the next one decides
/// against it and is sent behind it while it is being stored. `state` is then ahead of
/// `version` by the batches in flight; reads, stops and snapshots wait until they have landed.
struct Body<A: Aggregate> {
    state: A,
    /// The version including every decided batch's events: what the next batch expects.
    tentative: u64,
    /// The id of the last event decided so far (valid while batches are in flight): a batch sent
    /// behind others names it, so it is stored only on top of theirs.
    tip: Option<Uuid>,
    last_snapshot: u64,
    /// Batches numbered as they are sent, and how many of them have been settled (in order);
    /// the difference is in flight. Wrapping.
    sent: u32,
    settled: u32,
    /// Failed writes in a row (capped): the next reload waits 10 ms doubled this many times.
    failed_writes: u8,
    /// A [`Drive`] is on its way.
    drive_noted: bool,
    queue: VecDeque<Work<A>>,
    dedup: Option<Box<Dedup>>,
    /// Batches that landed before an earlier one was settled, waiting for their turn; a buffer
    /// only while there are some (a write-free batch decided behind appends in flight, or results woken out of
    /// order).
    early: Vec<Landed<A>>,
}

/// A batch whose outcome is known, waiting to be settled in order.
struct Landed<A: Aggregate> {
    number: u32,
    batch: Batch<A>,
    result: Result<AppendResult, StoreError>,
    /// Whether the batch was sent to the store (a write-free batch was not).
    written: bool,
}

/// The bounded window of processed command ids.
#[derive(Default)]
struct Dedup {
    outcomes: HashMap<Uuid, (u64, RecordedOutcome)>,
    order: VecDeque<(u64, Uuid)>,
}

impl Dedup {
    fn insert(&mut self, record: &CommandRecord, window: usize, forget: &mut Vec<(u64, Uuid)>) {
        self.outcomes
            .insert(record.command_id, (record.version, record.outcome.clone()));
        self.order.push_back((record.version, record.command_id));
        while self.order.len() > window {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old.1);
                forget.push(old);
            }
        }
    }
}

/// One command decided in a batch, waiting for the append.
struct Decided<A: Aggregate> {
    reply: ReplyTx<A>,
    /// Kept to decide again after a version conflict.
    command: Option<(A::Command, CommandOptions)>,
    redecided: bool,
    outcome: Outcome<A>,
}

enum Outcome<A: Aggregate> {
    Events {
        first_sequence: u64,
        /// Index of its first event in the batch's append.
        offset: usize,
        events: Vec<A::Event>,
    },
    Empty {
        version: u64,
    },
    Rejected(A::Error),
    Failed(RuntimeError),
    Duplicate(Committed<A::Event>),
}

/// Commands decided together and persisted in one atomic append.
struct Batch<A: Aggregate> {
    expected_version: u64,
    /// Set when the batch is sent behind others with events (see
    /// [`AppendRequest::expected_last_event`]).
    expected_last_event: Option<Uuid>,
    /// The version including this batch's events so far.
    version: u64,
    events: Vec<NewEvent>,
    records: Vec<CommandRecord>,
    forget: Vec<(u64, Uuid)>,
    decided: Vec<Decided<A>>,
    /// Set when `apply` panicked: the in-memory state can no longer be trusted.
    poisoned: Option<String>,
}

impl<A: Aggregate> Batch<A> {
    fn needs_write(&self) -> bool {
        !self.events.is_empty() || !self.records.is_empty() || !self.forget.is_empty()
    }

    fn reply_all(self, first_position: u64) {
        for d in self.decided {
            let result = match d.outcome {
                Outcome::Events {
                    first_sequence,
                    offset,
                    events,
                } => {
                    let last_sequence = first_sequence + events.len() as u64 - 1;
                    let base = first_position + offset as u64;
                    Ok(Committed {
                        events: events
                            .into_iter()
                            .enumerate()
                            .map(|(i, event)| CommittedEvent {
                                sequence: first_sequence + i as u64,
                                position: base + i as u64,
                                event,
                            })
                            .collect(),
                        version: last_sequence,
                        first_sequence,
                        last_sequence,
                        deduplicated: false,
                    })
                }
                Outcome::Empty { version } => Ok(Committed::nothing(version)),
                Outcome::Rejected(e) => Err(CommandError::Rejected(e)),
                Outcome::Failed(e) => Err(CommandError::Runtime(e)),
                Outcome::Duplicate(c) => Ok(c),
            };
            let _ = d.reply.send(Attempt::Done(result));
        }
    }

    fn fail_all(self, error: &RuntimeError) {
        for d in self.decided {
            let _ = d
                .reply
                .send(Attempt::Done(Err(CommandError::Runtime(error.clone()))));
        }
    }
}

/// What a write-free batch "appended": nothing, at `version`.
fn nothing_appended(version: u64) -> AppendResult {
    AppendResult {
        first_sequence: version + 1,
        last_sequence: version,
        first_position: 0,
        last_position: 0,
    }
}

/// What recovery produced.
struct Loaded<A> {
    state: A,
    version: u64,
    snapshot: u64,
    records: Vec<CommandRecord>,
}

impl<A: Aggregate> AggregateActor<A> {
    pub(crate) fn new(shared: Arc<TypeShared<A>>, id: AggregateId, me: WeakAddr<Self>) -> Self {
        Self {
            shared,
            id,
            me,
            phase: Phase::Recovering,
            version: 0,
            body: Box::new(Body {
                state: A::default(),
                tentative: 0,
                tip: None,
                last_snapshot: 0,
                sent: 0,
                settled: 0,
                failed_writes: 0,
                drive_noted: false,
                queue: VecDeque::new(),
                dedup: None,
                early: Vec::new(),
            }),
        }
    }

    fn stream(&self) -> StreamId {
        self.shared.stream(&self.id)
    }

    fn recover(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Recovering;
        let load = load::<A>(self.shared.clone(), self.stream());
        ctx.spawn(load.into_actor(self).map(|result, act, ctx| match result {
            Ok(loaded) => {
                act.body.state = loaded.state;
                act.version = loaded.version;
                act.body.tentative = loaded.version;
                act.body.last_snapshot = loaded.snapshot;
                act.body.dedup = None;
                let mut forget = Vec::new();
                for record in &loaded.records {
                    act.body.dedup.get_or_insert_with(Box::default).insert(
                        record,
                        act.shared.settings.dedup_window,
                        &mut forget,
                    );
                }
                act.phase = Phase::Ready;
                act.drive(ctx, None);
            }
            Err(error) => {
                tracing::warn!(stream = %act.stream(), %error, "activation failed");
                for work in act.body.queue.drain(..) {
                    let _ = work
                        .reply
                        .send(Attempt::Done(Err(CommandError::Runtime(error.clone()))));
                }
                act.stop(ctx);
            }
        }));
    }

    /// Reloads from the store after a failed write, after a growing delay.
    fn restart(&mut self, ctx: &mut Context<Self>, backoff: bool) {
        self.phase = Phase::Recovering;
        self.body.state = A::default();
        self.version = 0;
        self.body.tentative = 0;
        self.body.tip = None;
        if backoff {
            let delay = (RESTART_BACKOFF.0 * (1 << self.body.failed_writes)).min(RESTART_BACKOFF.1);
            self.body.failed_writes = (self.body.failed_writes + 1).min(RESTART_DOUBLINGS);
            ctx.run_later(delay, |act, ctx| act.recover(ctx));
        } else {
            self.recover(ctx);
        }
    }

    /// Leaves the registry and stops; anything still queued goes to the next incarnation.
    fn stop(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Stopping;
        self.shared.forget(&self.id, &self.me);
        for work in self.body.queue.drain(..) {
            work.bounce();
        }
        ctx.stop();
    }

    /// Decides work in batches, `first` behind anything queued, and sends each batch that needs
    /// a write to the store without waiting for the ones before it to land, until
    /// `max_appends_in_flight` are in flight, a read, stop or snapshot must wait for them, the
    /// actor stops or reloads, or nothing is left.
    ///
    /// A batch that needs no write (reads, rejections without a command id, commands without
    /// events) is answered as soon as the batches before it have landed, and the next one
    /// starts: otherwise work queued behind it would wait for a message that may never come.
    fn drive(&mut self, ctx: &mut Context<Self>, mut first: Option<Work<A>>) {
        if self.phase != Phase::Ready || !self.body.queue.is_empty() {
            if let Some(work) = first.take() {
                self.body.queue.push_back(work);
            }
            if self.phase != Phase::Ready {
                return;
            }
        }
        let max = self.shared.settings.max_batch_commands;
        let max_in_flight = if self.shared.store.preserves_append_order() {
            self.shared.settings.max_appends_in_flight.max(1)
        } else {
            1
        };
        loop {
            let in_flight = self.in_flight();
            let next = first.as_ref().or_else(|| self.body.queue.front());
            let Some(next) = next else {
                break;
            };
            if in_flight > 0 {
                // Reads and stops see persisted state only, and a snapshot is taken of it.
                let barrier = matches!(next.kind, WorkKind::Inspect(_) | WorkKind::Stop);
                if in_flight >= max_in_flight || barrier || self.snapshot_due() {
                    if let Some(work) = first.take() {
                        self.body.queue.push_back(work);
                    }
                    return;
                }
            }
            let mut batch = Batch {
                expected_version: self.body.tentative,
                expected_last_event: if in_flight > 0 { self.body.tip } else { None },
                version: self.body.tentative,
                events: Vec::new(),
                records: Vec::new(),
                forget: Vec::new(),
                decided: Vec::new(),
                poisoned: None,
            };
            loop {
                let work = match first.take() {
                    Some(work) => work,
                    None => {
                        let Some(front) = self.body.queue.front() else {
                            break;
                        };
                        let in_batch = !batch.decided.is_empty();
                        match front.kind {
                            WorkKind::Inspect(_) | WorkKind::Stop if in_batch => break,
                            WorkKind::Command { .. } if batch.decided.len() >= max => break,
                            _ => {}
                        }
                        let Some(work) = self.body.queue.pop_front() else {
                            break;
                        };
                        work
                    }
                };
                let Work { kind, reply } = work;
                match kind {
                    WorkKind::Inspect(inspect) => {
                        let (state, version) = (&self.body.state, self.version);
                        // A panicking reader drops its result channel; its caller reports it.
                        let _ = catch_unwind(AssertUnwindSafe(|| inspect(state, version)));
                        let _ = reply.send(Attempt::Done(Ok(Committed::nothing(version))));
                    }
                    WorkKind::Stop => {
                        let _ = reply.send(Attempt::Done(Ok(Committed::nothing(self.version))));
                        self.stop(ctx);
                        return;
                    }
                    WorkKind::Command {
                        command,
                        options,
                        redecided,
                    } => {
                        self.decide(command, options, redecided, reply, &mut batch);
                        if batch.poisoned.is_some() {
                            break;
                        }
                    }
                }
            }
            self.body.tentative = batch.version;
            if let Some(last) = batch.events.last() {
                self.body.tip = Some(last.event_id);
            }
            if let Some(message) = batch.poisoned.take() {
                let error = RuntimeError::HandlerPanicked {
                    stream: self.stream(),
                    message: format!("apply panicked: {message}"),
                };
                batch.fail_all(&error);
                self.drain(false);
                self.reload_when_landed(ctx);
                return;
            }
            if batch.needs_write() {
                self.write(batch, ctx);
            } else if !batch.decided.is_empty() {
                if in_flight == 0 {
                    batch.reply_all(0);
                } else {
                    // Decided against batches still in flight: answered once they have landed.
                    let number = self.body.sent;
                    self.body.sent = number.wrapping_add(1);
                    let result = Ok(nothing_appended(batch.version));
                    self.landed(number, batch, result, false, ctx);
                    if self.phase != Phase::Ready {
                        return;
                    }
                }
            }
        }
        if self.body.queue.is_empty() {
            // Nothing queued: the buffer goes too, so a live idle aggregate holds no queue
            // memory (it would be several hundred bytes per actor).
            self.body.queue = VecDeque::new();
        }
    }

    /// Batches sent and not yet settled.
    fn in_flight(&self) -> usize {
        self.body.sent.wrapping_sub(self.body.settled) as usize
    }

    /// Whether the persisted version crossed a multiple of `snapshot_every` since the last
    /// snapshot.
    fn snapshot_due(&self) -> bool {
        let every = self.shared.settings.snapshot_every;
        every != 0 && self.version / every > self.body.last_snapshot / every
    }

    fn decide(
        &mut self,
        command: A::Command,
        options: CommandOptions,
        redecided: bool,
        reply: ReplyTx<A>,
        batch: &mut Batch<A>,
    ) {
        let command_id = options.command_id;
        let known = self.body.dedup.as_ref().zip(command_id);
        let outcome = match known.and_then(|(dedup, id)| dedup.outcomes.get(&id)) {
            Some((version, recorded)) => self.replay_outcome(*version, recorded),
            None => self.decide_new(&command, &options, batch),
        };
        if let (Some(id), None) = (command_id, batch.poisoned.as_ref()) {
            let recorded = match &outcome {
                Outcome::Events {
                    first_sequence,
                    events,
                    ..
                } => Some(RecordedOutcome::Accepted {
                    first_sequence: *first_sequence,
                    last_sequence: first_sequence + events.len() as u64 - 1,
                }),
                Outcome::Empty { version } => Some(RecordedOutcome::Accepted {
                    first_sequence: version + 1,
                    last_sequence: *version,
                }),
                Outcome::Rejected(error) => match rmp_serde::to_vec(error) {
                    Ok(error) => Some(RecordedOutcome::Rejected { error }),
                    Err(e) => {
                        tracing::warn!(stream = %self.stream(), error = %e, "rejection not recorded: cannot encode it");
                        None
                    }
                },
                Outcome::Failed(_) | Outcome::Duplicate(_) => None,
            };
            if let Some(outcome) = recorded {
                let record = CommandRecord {
                    command_id: id,
                    version: batch.version,
                    outcome,
                };
                self.body.dedup.get_or_insert_with(Box::default).insert(
                    &record,
                    self.shared.settings.dedup_window,
                    &mut batch.forget,
                );
                batch.records.push(record);
            }
        }
        batch.decided.push(Decided {
            reply,
            command: Some((command, options)),
            redecided,
            outcome,
        });
    }

    /// The answer to a retried command id.
    fn replay_outcome(&self, version: u64, recorded: &RecordedOutcome) -> Outcome<A> {
        match recorded {
            RecordedOutcome::Accepted {
                first_sequence,
                last_sequence,
            } => Outcome::Duplicate(Committed {
                events: Vec::new(),
                version,
                first_sequence: *first_sequence,
                last_sequence: *last_sequence,
                deduplicated: true,
            }),
            RecordedOutcome::Rejected { error } => match rmp_serde::from_slice(error) {
                Ok(error) => Outcome::Rejected(error),
                Err(e) => Outcome::Failed(RuntimeError::Store(format!(
                    "cannot decode the recorded rejection of a retried command on {}: {e}",
                    self.stream()
                ))),
            },
        }
    }

    fn decide_new(
        &mut self,
        command: &A::Command,
        options: &CommandOptions,
        batch: &mut Batch<A>,
    ) -> Outcome<A> {
        let decision = catch_unwind(AssertUnwindSafe(|| self.body.state.handle(command)));
        let events = match decision {
            Err(panic) => {
                return Outcome::Failed(RuntimeError::HandlerPanicked {
                    stream: self.stream(),
                    message: panic_message(&panic),
                })
            }
            Ok(Err(rejection)) => return Outcome::Rejected(rejection),
            Ok(Ok(events)) => events,
        };
        if events.is_empty() {
            return Outcome::Empty {
                version: batch.version,
            };
        }
        let causation = Causation {
            correlation_id: options.correlation_id.or(options.command_id),
            causation_id: options.causation_id.or(options.command_id),
            command_id: options.command_id,
            metadata: options.metadata.clone(),
        };
        let mut encoded = Vec::with_capacity(events.len());
        for event in &events {
            match rmp_serde::to_vec(event) {
                Ok(payload) => encoded.push(NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: event.event_type().to_owned(),
                    schema_version: event.schema_version(),
                    causation: causation.clone(),
                    payload,
                }),
                Err(e) => {
                    return Outcome::Failed(RuntimeError::Encode {
                        stream: self.stream(),
                        reason: format!("event {}: {e}", event.event_type()),
                    })
                }
            }
        }
        // Applied now so the next command of this batch decides against it; nobody observes it
        // before the append lands, and a failed append rebuilds the state from the store.
        let state = &mut self.body.state;
        let applied = catch_unwind(AssertUnwindSafe(|| {
            for event in &events {
                state.apply(event);
            }
        }));
        if let Err(panic) = applied {
            batch.poisoned = Some(panic_message(&panic));
            return Outcome::Failed(RuntimeError::HandlerPanicked {
                stream: self.stream(),
                message: panic_message(&panic),
            });
        }
        let first_sequence = batch.version + 1;
        batch.version += events.len() as u64;
        let offset = batch.events.len();
        batch.events.extend(encoded);
        Outcome::Events {
            first_sequence,
            offset,
            events,
        }
    }

    /// Sends `batch` to the store behind the batches already in flight.
    fn write(&mut self, mut batch: Batch<A>, ctx: &mut Context<Self>) {
        let number = self.body.sent;
        self.body.sent = number.wrapping_add(1);
        let request = AppendRequest {
            stream: self.stream(),
            expected_version: batch.expected_version,
            events: std::mem::take(&mut batch.events),
            record_commands: std::mem::take(&mut batch.records),
            forget_commands: std::mem::take(&mut batch.forget),
            expected_last_event: batch.expected_last_event,
        };
        let store = self.shared.store.clone();
        // The store receives appends in the order their futures are first polled, which is the
        // order they are spawned here; were it ever otherwise, the later one would conflict and
        // be decided again, never stored out of order.
        let append = async move { store.append(request).await };
        ctx.spawn(
            append
                .into_actor(self)
                .map(move |result, act, ctx| act.landed(number, batch, result, true, ctx)),
        );
    }

    /// Settles batch `number` once every batch before it is settled, then those that landed
    /// early behind it; then carries on (decides more, or reloads after a failure).
    fn landed(
        &mut self,
        number: u32,
        batch: Batch<A>,
        result: Result<AppendResult, StoreError>,
        written: bool,
        ctx: &mut Context<Self>,
    ) {
        if number != self.body.settled {
            self.body.early.push(Landed {
                number,
                batch,
                result,
                written,
            });
            return;
        }
        self.settle(batch, result, written);
        self.body.settled = self.body.settled.wrapping_add(1);
        while !self.body.early.is_empty() {
            let settled = self.body.settled;
            let Some(at) = self.body.early.iter().position(|l| l.number == settled) else {
                break;
            };
            let next = self.body.early.swap_remove(at);
            self.settle(next.batch, next.result, next.written);
            self.body.settled = self.body.settled.wrapping_add(1);
        }
        if self.body.early.is_empty() {
            self.body.early = Vec::new();
        }
        match self.phase {
            Phase::Ready => {
                if self.in_flight() == 0 {
                    self.maybe_snapshot();
                }
                self.drive(ctx, None);
            }
            Phase::Draining { .. } => self.reload_when_landed(ctx),
            Phase::Recovering | Phase::Stopping => {}
        }
    }

    /// Answers one batch whose outcome is known, or queues its commands again, or enters
    /// [`Phase::Draining`].
    fn settle(&mut self, batch: Batch<A>, result: Result<AppendResult, StoreError>, written: bool) {
        let draining = matches!(self.phase, Phase::Draining { .. });
        match result {
            Ok(_) if draining && !written => {
                // Decided against a batch that failed: decided again after the reload.
                for d in batch.decided {
                    match d.command {
                        Some((command, options)) => {
                            self.requeue(command, options, d.redecided, d.reply)
                        }
                        None => drop(d.reply),
                    }
                }
            }
            Ok(done) => {
                self.version = done.last_sequence;
                if written {
                    self.body.failed_writes = 0;
                }
                batch.reply_all(done.first_position);
            }
            Err(StoreError::Conflict {
                expected, actual, ..
            }) => {
                tracing::debug!(stream = %self.stream(), expected, actual, "version conflict: reloading");
                self.drain(false);
                // Decided again, once, against the reloaded state; in order, before anything
                // queued after it.
                for d in batch.decided {
                    match (d.command, d.redecided) {
                        (Some((command, options)), false) => {
                            self.requeue(command, options, true, d.reply);
                        }
                        _ => {
                            let _ = d.reply.send(Attempt::Done(Err(CommandError::Runtime(
                                RuntimeError::Conflict {
                                    stream: self.stream(),
                                    expected,
                                    actual,
                                },
                            ))));
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!(stream = %self.stream(), %error, "append failed: restarting from the store");
                self.drain(true);
                batch.fail_all(&RuntimeError::from(error));
            }
        }
    }

    /// Stops deciding: what is in flight lands, then the actor reloads.
    fn drain(&mut self, backoff: bool) {
        self.phase = match self.phase {
            Phase::Draining {
                backoff: earlier,
                requeue_at,
            } => Phase::Draining {
                backoff: earlier || backoff,
                requeue_at,
            },
            _ => Phase::Draining {
                backoff,
                requeue_at: 0,
            },
        };
    }

    /// Queues a command again, behind those queued again before it and ahead of newer work.
    fn requeue(
        &mut self,
        command: A::Command,
        options: CommandOptions,
        redecided: bool,
        reply: ReplyTx<A>,
    ) {
        let work = Work {
            kind: WorkKind::Command {
                command,
                options,
                redecided,
            },
            reply,
        };
        match &mut self.phase {
            Phase::Draining { requeue_at, .. } => {
                let at = (*requeue_at).min(self.body.queue.len());
                self.body.queue.insert(at, work);
                *requeue_at = at + 1;
            }
            _ => self.body.queue.push_front(work),
        }
    }

    /// Reloads once nothing is in flight any more.
    fn reload_when_landed(&mut self, ctx: &mut Context<Self>) {
        if let Phase::Draining { backoff, .. } = self.phase {
            if self.in_flight() == 0 {
                self.restart(ctx, backoff);
            }
        }
    }

    /// Takes a snapshot when the version crossed a multiple of `snapshot_every`, and applies
    /// the retention policy. Called with nothing in flight (the state is the persisted one).
    /// Runs beside the actor: commands do not wait for it.
    fn maybe_snapshot(&mut self) {
        if !self.snapshot_due() {
            return;
        }
        let settings = &self.shared.settings;
        let every = settings.snapshot_every;
        let payload = match rmp_serde::to_vec(&self.body.state) {
            Ok(p) => p,
            Err(e) => {
                self.shared.stats.snapshot_failed();
                tracing::warn!(stream = %self.stream(), error = %e, "snapshot skipped: cannot encode the state");
                return;
            }
        };
        self.body.last_snapshot = self.version;
        let record = SnapshotRecord {
            stream: self.stream(),
            sequence: self.version,
            timestamp_micros: now_micros(),
            schema_version: A::SNAPSHOT_VERSION,
            payload,
        };
        // Snapshots at or below `horizon` are older than the `keep` newest intervals, and every
        // kept snapshot covers the events up to it.
        let horizon = self
            .version
            .saturating_sub(settings.snapshot_keep.saturating_mul(every));
        let delete_events = settings.delete_events_on_snapshot;
        let shared = self.shared.clone();
        actix::spawn(async move {
            let stream = record.stream.clone();
            if let Err(error) = shared.store.save_snapshot(record).await {
                shared.stats.snapshot_failed();
                tracing::warn!(%stream, %error, "snapshot failed; nothing deleted");
                return;
            }
            shared.stats.snapshot_saved();
            if horizon == 0 {
                return;
            }
            if let Err(error) = shared
                .store
                .delete_snapshots(&stream, SnapshotCriteria::up_to(horizon))
                .await
            {
                tracing::warn!(%stream, %error, "deleting old snapshots failed");
                return;
            }
            if delete_events {
                if let Err(error) = shared.store.delete_to(&stream, horizon).await {
                    tracing::warn!(%stream, %error, "deleting covered events failed");
                }
            }
        });
    }
}

impl<A: Aggregate> Actor for AggregateActor<A> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // actix stops an actor whose mailbox has no sender and that runs no future, and this
        // one often has no sender: the registry keeps a weak address and callers hold a sender
        // only while they send. This future never completes (and, being empty, allocates
        // nothing), so the actor lives until it stops itself: passivation, shutdown, or a
        // failed activation.
        ctx.spawn(actix::fut::wrap_future(std::future::pending::<()>()));
        self.recover(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        for work in self.body.queue.drain(..) {
            work.bounce();
        }
        self.shared.forget(&self.id, &self.me);
    }
}

impl<A: Aggregate> Handler<Deliver<A>> for AggregateActor<A> {
    type Result = ();

    fn handle(&mut self, mut msg: Deliver<A>, ctx: &mut Context<Self>) {
        let Some(work) = msg.0.take() else {
            return;
        };
        if self.phase == Phase::Stopping {
            work.bounce();
            return;
        }
        let capacity = self.shared.settings.mailbox_capacity;
        if self.body.queue.len() >= capacity {
            let _ = work.reply.send(Attempt::Done(Err(CommandError::Runtime(
                RuntimeError::Overloaded {
                    stream: self.stream(),
                    capacity,
                },
            ))));
            return;
        }
        if self.in_flight() > 0 && self.phase == Phase::Ready {
            // Behind an append in flight, wait for the rest of the mailbox: the commands that
            // arrived together go out in one append, not one append each (which would also
            // spend the appends allowed in flight).
            self.body.queue.push_back(work);
            if !self.body.drive_noted {
                self.body.drive_noted = true;
                ctx.notify(Drive);
            }
            return;
        }
        self.drive(ctx, Some(work));
    }
}

impl<A: Aggregate> Handler<Drive> for AggregateActor<A> {
    type Result = ();

    fn handle(&mut self, _: Drive, ctx: &mut Context<Self>) {
        self.body.drive_noted = false;
        self.drive(ctx, None);
    }
}

impl<A: Aggregate> Handler<Passivate> for AggregateActor<A> {
    type Result = ();

    fn handle(&mut self, msg: Passivate, ctx: &mut Context<Self>) {
        // The sweep's view may be stale: work may have come since, so the registry's last use
        // is checked again here.
        let idle = msg.force || self.shared.idle(&self.id);
        if idle && self.phase == Phase::Ready && self.body.queue.is_empty() && self.in_flight() == 0
        {
            self.shared.stats.passivated();
            self.stop(ctx);
        }
    }
}

/// Loads an aggregate: the newest usable snapshot, then the events after it.
async fn load<A: Aggregate>(
    shared: Arc<TypeShared<A>>,
    stream: StreamId,
) -> Result<Loaded<A>, RuntimeError> {
    let _permit = shared
        .recoveries
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| RuntimeError::Stopped)?;
    let store = &shared.store;
    let activation = |reason: String| RuntimeError::Activation {
        stream: stream.clone(),
        reason,
    };
    // A failed read fails the activation (the next request retries it); a closed store means
    // the runtime is shutting down.
    let read_failed = |e: StoreError| match e {
        StoreError::Closed => RuntimeError::Stopped,
        e => activation(format!("cannot read the stream: {e}")),
    };
    let mut state = A::default();
    let mut version = 0;
    let mut snapshot = 0;
    if let Some(record) = store
        .latest_snapshot(&stream, SnapshotCriteria::latest())
        .await
        .map_err(read_failed)?
    {
        let decoded = if record.schema_version == A::SNAPSHOT_VERSION {
            rmp_serde::from_slice::<A>(&record.payload).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "snapshot version {} is not the current {}",
                record.schema_version,
                A::SNAPSHOT_VERSION
            ))
        };
        match decoded {
            Ok(s) => {
                state = s;
                version = record.sequence;
                snapshot = record.sequence;
            }
            Err(reason) => {
                tracing::warn!(%stream, sequence = record.sequence, %reason, "snapshot unusable: replaying events");
            }
        }
    }
    let highest = loop {
        let slice = store
            .read_stream(&stream, version + 1, u64::MAX, REPLAY_PAGE)
            .await
            .map_err(read_failed)?;
        let page = slice.events.len();
        for envelope in slice.events {
            if envelope.sequence != version + 1 {
                return Err(activation(format!(
                    "events {}..{} are deleted and no usable snapshot covers them",
                    version + 1,
                    envelope.sequence - 1
                )));
            }
            let event = A::Event::decode(
                &envelope.event_type,
                envelope.schema_version,
                &envelope.payload,
            )
            .map_err(|e| {
                activation(format!(
                    "cannot decode event {} ({} v{}): {e}",
                    envelope.sequence, envelope.event_type, envelope.schema_version
                ))
            })?;
            catch_unwind(AssertUnwindSafe(|| state.apply(&event))).map_err(|panic| {
                activation(format!(
                    "apply panicked on event {}: {}",
                    envelope.sequence,
                    panic_message(&panic)
                ))
            })?;
            version = envelope.sequence;
        }
        if page < REPLAY_PAGE {
            break slice.highest_sequence;
        }
    };
    if version < highest {
        return Err(activation(format!(
            "events {}..={highest} are deleted and no usable snapshot covers them",
            version + 1
        )));
    }
    let records = store.command_records(&stream).await.map_err(read_failed)?;
    shared.stats.activated();
    Ok(Loaded {
        state,
        version,
        snapshot,
        records,
    })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Default, Serialize, Deserialize)]
    struct Big {
        values: [u64; 32],
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Happened;

    impl DomainEvent for Happened {
        fn event_type(&self) -> &'static str {
            "Happened"
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
    #[error("never")]
    struct Never;

    impl Aggregate for Big {
        const TYPE: &'static str = "big";
        type Command = ();
        type Event = Happened;
        type Error = Never;

        fn handle(&self, (): &()) -> Result<Vec<Happened>, Never> {
            Ok(Vec::new())
        }

        fn apply(&mut self, _: &Happened) {}
    }

    /// The actix context future around the actor is ~340 B and tokio rounds its task up to a
    /// multiple of 128 B, adding ~104 B of its own: a context future over 408 B (an actor over
    /// 9 words) makes every live aggregate's task 640 B instead of 512 B. The state is in the
    /// body, so this holds whatever its size.
    /// Every live aggregate pays for its body: what the runtime adds to the state (queue,
    /// idempotency window pointer, snapshot mark, and the pipelining state: tentative version,
    /// chain tip, batch counters, early landings) stays at 112 bytes. (Smaller is not always
    /// better: where the body lands among tokio's aligned task allocations decides the resident
    /// cost; see BENCHMARKS.md.)
    #[test]
    fn the_body_adds_at_most_112_bytes_to_the_state() {
        let overhead = std::mem::size_of::<Body<Big>>() - std::mem::size_of::<Big>();
        assert!(overhead <= 112, "{overhead}");
    }

    #[test]
    fn the_actor_stays_within_nine_words_whatever_the_state() {
        assert!(std::mem::size_of::<AggregateActor<Big>>() <= 72);
        assert!(
            std::mem::size_of::<
                actix::dev::ContextFut<AggregateActor<Big>, Context<AggregateActor<Big>>>,
            >() <= 408
        );
    }
}
