//! Where live aggregate actors are found: one registry per aggregate type, keyed by id.
//!
//! Architecture invariant: an id has at most one live actor. Activation happens under the
//! registry's entry lock, so concurrent first messages share one actor and one recovery.
//! Placement (which arbiter hosts an id) is decided here and only here: the seam where a
//! distributed placement would go.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::channel;
use actix::{Addr, ArbiterHandle, Context, WeakAddr};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::{Notify, Semaphore};

use super::actor::AggregateActor;
use super::config::AggregateSettings;
use super::error::RuntimeError;
use super::work::{Attempt, Deliver, Passivate, Work, WorkKind};
use super::{CommandError, Committed};
use crate::domain::{Aggregate, AggregateId, StreamId};
use crate::store::EventStore;

/// How often one piece of work may be bounced between stopping incarnations before the caller
/// gives up; each bounce means an actor stopped between lookup and delivery.
const MAX_BOUNCES: usize = 32;

/// Bits of a use stamp below its milliseconds (see [`TypeShared::stamp`]).
const STAMP_SEQUENCE_BITS: u32 = 20;

/// One live actor in the registry. Kept small: with a million live aggregates the table holds
/// about two million buckets (hash tables grow by doubling), so each byte here costs ~2 B per
/// live aggregate.
pub(crate) struct Slot<A: Aggregate> {
    /// Weak, because a sender costs two allocations of its own: a delivery upgrades it to a
    /// sender for the send. It also names the incarnation: a stopping actor removes the slot
    /// only if it is still its own (the weak pointer keeps the channel's allocation, so it
    /// cannot be reused by a newer incarnation while the slot exists).
    addr: WeakAddr<AggregateActor<A>>,
    /// The use stamp of the last delivery: its milliseconds give the idle time, the whole stamp
    /// a strict recency order for the live limit (milliseconds alone tie, and a tie could
    /// pick a just-activated actor as the "least recently used" one, which ignores the request
    /// while it recovers).
    last_use: AtomicU64,
}

/// Counters of one aggregate type.
#[derive(Debug, Default)]
pub(crate) struct TypeStats {
    activations: AtomicU64,
    passivations: AtomicU64,
    snapshots: AtomicU64,
    snapshot_failures: AtomicU64,
}

impl TypeStats {
    pub(crate) fn activated(&self) {
        self.activations.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn passivated(&self) {
        self.passivations.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn snapshot_saved(&self) {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn snapshot_failed(&self) {
        self.snapshot_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// A point-in-time view of one aggregate type's actors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AggregateStats {
    /// Actors live now.
    pub live: usize,
    /// Completed recoveries (activations and reloads) since start.
    pub activations: u64,
    /// Actors passivated (idle, over the limit, or shut down).
    pub passivations: u64,
    /// Snapshots saved.
    pub snapshots: u64,
    /// Snapshots that failed to encode or save.
    pub snapshot_failures: u64,
}

/// Everything the actors of one aggregate type share.
pub(crate) struct TypeShared<A: Aggregate> {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) settings: AggregateSettings,
    pub(crate) recoveries: Arc<Semaphore>,
    pub(crate) stats: TypeStats,
    registry: DashMap<AggregateId, Slot<A>>,
    /// `A::TYPE`, shared by every stream id of this type instead of copied into each.
    type_tag: Arc<str>,
    arbiters: Arc<[ArbiterHandle]>,
    /// The last use stamp handed out.
    stamp: AtomicU64,
    started: Instant,
    sweep_now: Notify,
}

impl<A: Aggregate> TypeShared<A> {
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        settings: AggregateSettings,
        recoveries: Arc<Semaphore>,
        arbiters: Arc<[ArbiterHandle]>,
    ) -> Self {
        Self {
            store,
            settings,
            recoveries,
            stats: TypeStats::default(),
            registry: DashMap::new(),
            type_tag: Arc::from(A::TYPE),
            arbiters,
            stamp: AtomicU64::new(0),
            started: Instant::now(),
            sweep_now: Notify::new(),
        }
    }

    /// The stream of `id`, sharing the type tag (no allocation).
    pub(crate) fn stream(&self, id: &AggregateId) -> StreamId {
        StreamId {
            aggregate_type: self.type_tag.clone(),
            aggregate_id: id.clone(),
        }
    }

    /// Whether `id` has been idle for the idle timeout (never, when there is no timeout).
    pub(crate) fn idle(&self, id: &AggregateId) -> bool {
        let idle_ms = self.settings.idle_timeout_ms;
        if idle_ms == 0 {
            return false;
        }
        let now = self.now_ms();
        self.registry.get(id).map_or(true, |slot| {
            now.saturating_sub(stamp_ms(slot.last_use.load(Ordering::Relaxed))) >= idle_ms
        })
    }

    /// A new use stamp: milliseconds since start shifted above [`STAMP_SEQUENCE_BITS`], and
    /// at least one more than the last stamp, so stamps are unique and ordered by time even
    /// within one millisecond.
    fn stamp(&self) -> u64 {
        let floor = self.now_ms() << STAMP_SEQUENCE_BITS;
        let next = |last: u64| floor.max(last.saturating_add(1));
        let last = self
            .stamp
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(next(last))
            })
            .unwrap_or_else(|last| last);
        next(last)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn stats(&self) -> AggregateStats {
        AggregateStats {
            live: self.registry.len(),
            activations: self.stats.activations.load(Ordering::Relaxed),
            passivations: self.stats.passivations.load(Ordering::Relaxed),
            snapshots: self.stats.snapshots.load(Ordering::Relaxed),
            snapshot_failures: self.stats.snapshot_failures.load(Ordering::Relaxed),
        }
    }

    /// The live actor of `id`, activating one if there is none.
    fn lookup_or_activate(
        self: &Arc<Self>,
        id: &AggregateId,
    ) -> Result<Addr<AggregateActor<A>>, RuntimeError> {
        let stamp = self.stamp();
        if let Some(slot) = self.registry.get(id) {
            if let Some(addr) = slot.addr.upgrade() {
                slot.last_use.fetch_max(stamp, Ordering::Relaxed);
                return Ok(addr);
            }
        }
        let arbiter = self.place(id)?;
        let addr = match self.registry.entry(id.clone()) {
            Entry::Occupied(mut o) => {
                if let Some(addr) = o.get().addr.upgrade() {
                    o.get().last_use.fetch_max(stamp, Ordering::Relaxed);
                    return Ok(addr);
                }
                // Its mailbox is gone but the stopping actor has not removed its slot yet.
                let (slot, addr) = self.activate(id, arbiter, stamp)?;
                o.insert(slot);
                addr
            }
            Entry::Vacant(v) => {
                let (slot, addr) = self.activate(id, arbiter, stamp)?;
                v.insert(slot);
                addr
            }
        };
        if self.settings.max_live > 0 && self.registry.len() > self.settings.max_live {
            self.sweep_now.notify_one();
        }
        Ok(addr)
    }

    /// Starts an actor for `id` on `arbiter`; called under the registry's entry lock.
    fn activate(
        self: &Arc<Self>,
        id: &AggregateId,
        arbiter: &ArbiterHandle,
        stamp: u64,
    ) -> Result<(Slot<A>, Addr<AggregateActor<A>>), RuntimeError> {
        let (tx, rx) = channel::channel(self.settings.mailbox_capacity);
        let addr = Addr::new(tx);
        let (shared, id, me) = (self.clone(), id.clone(), addr.downgrade());
        // The actor (and so its body allocation) is built on the arbiter thread, in the arena
        // that holds the task allocations. tokio aligns those to 128 B, and glibc's aligned
        // allocation frees the ~100 B in front of each one; the next actor's body fills such a
        // gap. Built on the caller's thread, the gaps stayed empty: ~150 B per live aggregate.
        let spawned = arbiter.spawn_fn(move || {
            let actor = AggregateActor::new(shared, id, me);
            let ctx: Context<AggregateActor<A>> = Context::with_receiver(rx);
            actix::spawn(ctx.into_future(actor));
        });
        if !spawned {
            return Err(RuntimeError::Stopped);
        }
        let slot = Slot {
            addr: addr.downgrade(),
            last_use: AtomicU64::new(stamp),
        };
        Ok((slot, addr))
    }

    /// The arbiter that hosts `id`: a stable hash, so one id always lands on one thread.
    fn place(&self, id: &AggregateId) -> Result<&ArbiterHandle, RuntimeError> {
        let n = self.arbiters.len().max(1) as u64;
        let index = usize::try_from(self.registry.hasher().hash_one(id) % n).unwrap_or(0);
        self.arbiters.get(index).ok_or(RuntimeError::Stopped)
    }

    /// Removes `id`'s slot if it still belongs to the actor at `addr`.
    pub(crate) fn forget(&self, id: &AggregateId, addr: &WeakAddr<AggregateActor<A>>) {
        self.registry.remove_if(id, |_, slot| slot.addr == *addr);
    }

    /// Delivers work to `id`'s actor, following it across passivations.
    pub(crate) async fn dispatch(
        self: &Arc<Self>,
        id: &AggregateId,
        mut kind: WorkKind<A>,
    ) -> Result<Committed<A::Event>, CommandError<A::Error>> {
        for _ in 0..MAX_BOUNCES {
            let addr = self.lookup_or_activate(id)?;
            let (reply, outcome) = tokio::sync::oneshot::channel();
            let sent = addr.try_send(Deliver(Some(Work { kind, reply })));
            // Only the weak address is kept while the reply is awaited: a sender is two
            // allocations, and the actor does not need senders to stay alive.
            let actor = addr.downgrade();
            drop(addr);
            match sent {
                Ok(()) => {}
                Err(actix::prelude::SendError::Full(mut msg)) => {
                    drop(msg.0.take());
                    return Err(CommandError::Runtime(RuntimeError::Overloaded {
                        stream: self.stream(id),
                        capacity: self.settings.mailbox_capacity,
                    }));
                }
                Err(actix::prelude::SendError::Closed(mut msg)) => {
                    self.forget(id, &actor);
                    match msg.0.take() {
                        Some(work) => {
                            kind = work.kind;
                            continue;
                        }
                        None => return Err(CommandError::Runtime(RuntimeError::Stopped)),
                    }
                }
            }
            match outcome.await {
                Ok(Attempt::Done(result)) => return result,
                Ok(Attempt::Bounced(returned)) => {
                    self.forget(id, &actor);
                    kind = returned;
                }
                Err(_) => return Err(CommandError::Runtime(RuntimeError::Stopped)),
            }
        }
        Err(CommandError::Runtime(RuntimeError::Activation {
            stream: self.stream(id),
            reason: format!(
                "the actor stopped {MAX_BOUNCES} times in a row before taking the work"
            ),
        }))
    }

    /// Passivates idle actors and, over the live limit, the least recently used ones. Runs until
    /// the runtime stops.
    pub(crate) async fn sweep(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.sweep_now.notified() => {}
            }
            if Arc::strong_count(&self) == 1 {
                return;
            }
            self.sweep_once();
        }
    }

    fn sweep_once(&self) {
        let now = self.now_ms();
        let idle_ms = self.settings.idle_timeout_ms;
        let max_live = self.settings.max_live;
        let over = if max_live > 0 {
            self.registry.len().saturating_sub(max_live)
        } else {
            0
        };
        let mut by_age: Vec<(u64, WeakAddr<AggregateActor<A>>)> = Vec::new();
        for slot in self.registry.iter() {
            let last = slot.last_use.load(Ordering::Relaxed);
            if idle_ms > 0 && now.saturating_sub(stamp_ms(last)) >= idle_ms {
                if let Some(addr) = slot.addr.upgrade() {
                    addr.do_send(Passivate { force: false });
                }
            } else if over > 0 {
                by_age.push((last, slot.addr.clone()));
            }
        }
        if over > 0 {
            by_age.sort_unstable_by_key(|(last, _)| *last);
            for (_, addr) in by_age.into_iter().take(over) {
                if let Some(addr) = addr.upgrade() {
                    addr.do_send(Passivate { force: true });
                }
            }
        }
    }

    /// Asks every live actor to finish its queue and stop; returns when all have.
    pub(crate) async fn stop_all(self: &Arc<Self>) {
        let addrs: Vec<_> = self
            .registry
            .iter()
            .filter_map(|s| s.addr.upgrade())
            .collect();
        let mut waits = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            // `send` waits for mailbox room instead of failing: shutdown must reach everyone.
            let delivered = addr.send(Deliver(Some(Work {
                kind: WorkKind::Stop,
                reply,
            })));
            waits.push(async move {
                let _ = delivered.await;
                let _ = outcome.await;
            });
        }
        futures::future::join_all(waits).await;
    }
}

/// The milliseconds since start of a use stamp.
fn stamp_ms(stamp: u64) -> u64 {
    stamp >> STAMP_SEQUENCE_BITS
}
