//! L. Pipelined appends: while one append of an aggregate is being stored, the actor decides its
//! next commands against the tentatively applied state and sends them behind it, up to
//! `max_appends_in_flight`, on a store that preserves append order; reads, stops and due
//! snapshots wait until nothing is in flight; a failed append drains what is in flight behind
//! it, then the actor reloads.
//!
//! The fault store runs in its order-preserving mode ([`Faults::preserve_order`]) unless a test
//! says otherwise: each append reaches sled on its first poll and only its reply is held at the
//! `appends` gate, so `entered` counts appends already ordered at the store.

use std::collections::BTreeSet;
use std::sync::Arc;

use incarnate::{CommandOptions, Config, Runtime, RuntimeError, SnapshotCriteria};
use uuid::Uuid;

use crate::runtime_support::{
    eventually, fold, foreign_event, rejection, runtime_error, shutdown, single_sequence, started,
    still_pending, stored, stream_of, tally_values, within, Faults, Node, Tally, TallyCommand,
    TallyError, TallyEvent,
};

/// A runtime on a fault store in its order-preserving mode, so the actors pipeline appends.
fn ordered_runtime(node: &Node, f: impl FnOnce(&mut Config)) -> (Runtime, Arc<Faults>) {
    let (rt, faults) = node.faulty_runtime_with(f);
    faults.preserve_order(true);
    (rt, faults)
}

/// Sends `Add(99)` to tally `id` and checks that it is refused as `Overloaded` with `capacity`:
/// the actor has handled every message sent before it, and its queue is full.
async fn expect_overloaded(rt: &Runtime, id: &str, capacity: usize) {
    match runtime_error(
        within(
            "the overloaded answer",
            rt.send::<Tally>(id, TallyCommand::Add(99)),
        )
        .await,
    ) {
        RuntimeError::Overloaded { capacity: c, .. } => assert_eq!(c, capacity),
        other => panic!("expected Overloaded, got {other:?}"),
    }
}

fn store_error<E: std::fmt::Debug, T: std::fmt::Debug>(
    what: &str,
    result: Result<T, incarnate::CommandError<E>>,
) {
    match runtime_error(result) {
        RuntimeError::Store(message) => assert!(message.contains("injected"), "{what}: {message}"),
        other => panic!("{what}: expected a store error, got {other:?}"),
    }
}

/// L1: several appends of one aggregate are in flight at once, each decided against the ones
/// ahead of it; once their replies come, every caller has the next sequence in send order, and
/// the state is the fold of the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_appends_of_one_aggregate_are_in_flight_at_once() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |_| {});
    let store = rt.store();
    rt.send::<Tally>("hot", TallyCommand::Add(1)).await.unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let mut sends = Vec::new();
    for (k, v) in (2..=4).enumerate() {
        sends.push(started(rt.send::<Tally>("hot", TallyCommand::Add(v))).await);
        // Sent alone, not together with the next (work that arrives together is one append).
        faults.appends.wait_entered(entered + k as u64 + 1).await;
    }
    // Three appends reached the store, one behind the other, and none has been answered.
    faults.appends.wait_entered(entered + 3).await;
    assert_eq!(faults.appends_in_flight(), 3);
    for send in &mut sends {
        assert!(
            still_pending(send).await,
            "replied before its append landed"
        );
    }

    faults.appends.release();
    for (send, v) in sends.into_iter().zip(2..) {
        let done = within("a pipelined reply", send).await.unwrap();
        assert_eq!(single_sequence(&done), v, "sequences follow the send order");
        assert_eq!(done.events[0].event, TallyEvent::Added(v));
    }
    assert_eq!(faults.max_appends_in_flight(), 3);
    let (state, version) = rt.state::<Tally>("hot").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=4), 4));
    assert_eq!((state, version), fold::<Tally>(&*store, "hot").await);
    assert_eq!(
        tally_values(&stored::<Tally>(&*store, "hot").await),
        [1, 2, 3, 4]
    );
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 1, "no reload");
    shutdown(rt).await;
}

/// L1: a command decided behind appends in flight sees their events (the tentative state): one
/// that fits only after them is accepted, one that no longer fits is rejected, and that
/// rejection (which writes nothing) is answered only after the appends it depends on landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_behind_appends_in_flight_are_decided_against_their_events() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |_| {});
    let store = rt.store();
    rt.send::<Tally>("t", TallyCommand::Add(1)).await.unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let add = started(rt.send::<Tally>("t", TallyCommand::Add(5))).await;
    faults.appends.wait_entered(entered + 1).await;
    // 1 + 5 + 5 = 11: fits only on top of the `Add(5)` in flight.
    let fits = started(rt.send::<Tally>("t", TallyCommand::AddAtMost { add: 5, limit: 11 })).await;
    faults.appends.wait_entered(entered + 2).await;
    // 11 + 1 > 11: no longer fits.
    let mut over =
        started(rt.send::<Tally>("t", TallyCommand::AddAtMost { add: 1, limit: 11 })).await;
    let after = started(rt.send::<Tally>("t", TallyCommand::Add(2))).await;
    // `after` reaching the store proves `over` was decided before it (mailbox order).
    faults.appends.wait_entered(entered + 3).await;
    assert!(
        still_pending(&mut over).await,
        "a decision made against unpersisted events was answered before they were stored"
    );

    faults.appends.release();
    assert_eq!(single_sequence(&within("add", add).await.unwrap()), 2);
    assert_eq!(single_sequence(&within("fits", fits).await.unwrap()), 3);
    assert_eq!(
        rejection(within("over", over).await),
        TallyError::OverLimit {
            total: 11,
            add: 1,
            limit: 11
        }
    );
    assert_eq!(single_sequence(&within("after", after).await.unwrap()), 4);
    let (state, version) = rt.state::<Tally>("t").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of([1, 5, 5, 2]), 4));
    assert_eq!((state, version), fold::<Tally>(&*store, "t").await);
    shutdown(rt).await;
}

/// L2: `max_appends_in_flight = 2`: with two appends held, the next command stays queued (the
/// mailbox of 1 is full with it) and is not sent; it is sent, in order, once one has landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_appends_in_flight_bounds_the_appends_sent_ahead() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |c| {
        c.aggregates.default.max_appends_in_flight = 2;
        c.aggregates.default.mailbox_capacity = 1;
    });
    let store = rt.store();
    rt.send::<Tally>("b", TallyCommand::Add(1)).await.unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let mut first = started(rt.send::<Tally>("b", TallyCommand::Add(2))).await;
    let mut second = started(rt.send::<Tally>("b", TallyCommand::Add(3))).await;
    faults.appends.wait_entered(entered + 2).await;
    let mut third = started(rt.send::<Tally>("b", TallyCommand::Add(4))).await;
    // The actor handled the third command and queued it: the mailbox (1) is full.
    expect_overloaded(&rt, "b", 1).await;
    assert_eq!(
        faults.appends.entered(),
        entered + 2,
        "a third append was sent past the bound"
    );
    assert_eq!(faults.appends_in_flight(), 2);
    for send in [&mut first, &mut second, &mut third] {
        assert!(still_pending(send).await);
    }

    faults.appends.release();
    for (send, v) in [first, second, third].into_iter().zip(2..) {
        assert_eq!(
            single_sequence(&within("a reply", send).await.unwrap()),
            v,
            "in send order"
        );
    }
    assert_eq!(faults.appends.entered(), entered + 3);
    assert_eq!(faults.max_appends_in_flight(), 2);
    let (state, version) = rt.state::<Tally>("b").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=4), 4));
    assert_eq!((state, version), fold::<Tally>(&*store, "b").await);
    shutdown(rt).await;
}

/// L3: on a store that does not say it preserves append order (the wrapper's default), the
/// actor sends one append at a time: the commands behind a held one stay queued and are
/// decided together after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unordered_store_gets_one_append_at_a_time() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime_with(|c| c.aggregates.default.mailbox_capacity = 2);
    assert!(!rt.store().preserves_append_order());
    let store = rt.store();
    rt.send::<Tally>("u", TallyCommand::Add(1)).await.unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let mut first = started(rt.send::<Tally>("u", TallyCommand::Add(2))).await;
    faults.appends.wait_entered(entered + 1).await;
    let mut second = started(rt.send::<Tally>("u", TallyCommand::Add(3))).await;
    let mut third = started(rt.send::<Tally>("u", TallyCommand::Add(4))).await;
    // Both were handled and queued: the mailbox (2) is full.
    expect_overloaded(&rt, "u", 2).await;
    assert_eq!(
        faults.appends.entered(),
        entered + 1,
        "an append was sent behind one in flight on an unordered store"
    );
    assert_eq!(faults.appends_in_flight(), 1);
    for send in [&mut first, &mut second, &mut third] {
        assert!(still_pending(send).await);
    }

    faults.appends.release();
    for (send, v) in [first, second, third].into_iter().zip(2..) {
        assert_eq!(single_sequence(&within("a reply", send).await.unwrap()), v);
    }
    assert_eq!(
        faults.appends.entered(),
        entered + 2,
        "the two queued commands were decided together, in one append"
    );
    assert_eq!(faults.max_appends_in_flight(), 1);
    let (state, version) = rt.state::<Tally>("u").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=4), 4));
    assert_eq!((state, version), fold::<Tally>(&*store, "u").await);
    shutdown(rt).await;
}

/// L3, under load: 16 callers × 25 commands to one aggregate. An unordered store never has two
/// appends of it at once; an ordered one never more than `max_appends_in_flight` (3). Either
/// way every command lands once, in a dense stream whose fold is the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_the_appends_in_flight_stay_within_the_bound() {
    for (ordered, bound) in [(false, 1), (true, 3)] {
        let node = Node::new();
        let (rt, faults) = node.faulty_runtime_with(|c| {
            c.aggregates.default.max_appends_in_flight = 3;
            c.aggregates.default.snapshot_every = 0;
        });
        faults.preserve_order(ordered);
        let sequences = concurrent_adds(&rt, "load", 16, 25).await;
        assert_eq!(sequences, (1..=400).collect::<Vec<_>>());
        let max = faults.max_appends_in_flight();
        assert!(
            (1..=bound).contains(&max),
            "ordered {ordered}: {max} appends were in flight at once, the bound is {bound}"
        );
        let (state, version) = rt.state::<Tally>("load").await.unwrap();
        assert_eq!(version, 400);
        assert_eq!((state, version), fold::<Tally>(&*rt.store(), "load").await);
        shutdown(rt).await;
    }
}

/// Runs `callers` tasks each sending `per_caller` `Add`s to tally `id` (caller `c`'s `i`-th
/// value is `c * 1_000_000 + i + 1`), checks that each caller's sequences increase and that the
/// store holds each value at the sequence it was acknowledged with, and returns every
/// acknowledged sequence, sorted.
async fn concurrent_adds(rt: &Runtime, id: &str, callers: u64, per_caller: u64) -> Vec<u64> {
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let rt = rt.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..per_caller {
                    let value = c * 1_000_000 + i + 1;
                    let done = rt
                        .send::<Tally>(id.as_str(), TallyCommand::Add(value))
                        .await
                        .unwrap_or_else(|e| panic!("caller {c} command {i}: {e}"));
                    assert_eq!(done.events[0].event, TallyEvent::Added(value));
                    acked.push((single_sequence(&done), value));
                }
                acked
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        let acked = within("a caller", task).await.unwrap();
        assert!(
            acked.windows(2).all(|w| w[0].0 < w[1].0),
            "a caller's commands were stored out of its order: {acked:?}"
        );
        all.extend(acked);
    }
    let values = tally_values(&stored::<Tally>(&*rt.store(), id).await);
    for (sequence, value) in &all {
        assert_eq!(
            values.get(*sequence as usize - 1),
            Some(value),
            "#{sequence} is not the acknowledged value"
        );
    }
    let mut sequences: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    sequences.sort_unstable();
    let unique: BTreeSet<u64> = sequences.iter().copied().collect();
    assert_eq!(
        unique.len(),
        sequences.len(),
        "a sequence was acknowledged twice"
    );
    sequences
}

/// L4: the first of three appends in flight fails. Its caller gets the store error; the two
/// behind it, decided against its events, conflict at the store and are decided again after
/// the reload, and land right after the last persisted event (no gap), ahead of the command
/// that was queued behind them. Then: an append that landed ahead of a failed one is answered;
/// two failures in a row are both reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_drains_the_appends_behind_it_and_they_are_decided_again() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |c| {
        c.aggregates.default.max_appends_in_flight = 3;
        c.aggregates.default.mailbox_capacity = 1;
    });
    let store = rt.store();
    rt.send::<Tally>("f", TallyCommand::Add(1)).await.unwrap();

    // The first append fails; the two behind it are already at the store, the fourth command
    // is queued behind them by the bound.
    faults.appends.hold();
    let entered = faults.appends.entered();
    faults.fail_appends(1);
    let failed = started(rt.send::<Tally>("f", TallyCommand::Add(2))).await;
    faults.appends.wait_entered(entered + 1).await;
    let b = started(rt.send::<Tally>("f", TallyCommand::Add(3))).await;
    faults.appends.wait_entered(entered + 2).await;
    let c = started(rt.send::<Tally>("f", TallyCommand::Add(4))).await;
    faults.appends.wait_entered(entered + 3).await;
    let late = started(rt.send::<Tally>("f", TallyCommand::Add(5))).await;
    expect_overloaded(&rt, "f", 1).await;
    faults.appends.release();
    store_error("the failed append", within("failed", failed).await);
    assert_eq!(single_sequence(&within("b", b).await.unwrap()), 2, "no gap");
    assert_eq!(single_sequence(&within("c", c).await.unwrap()), 3);
    assert_eq!(single_sequence(&within("late", late).await.unwrap()), 4);
    assert_eq!(
        rt.stats::<Tally>().unwrap().activations,
        2,
        "one reload for the whole drained pipeline"
    );
    let (state, version) = rt.state::<Tally>("f").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of([1, 3, 4, 5]), 4));
    assert_eq!((state, version), fold::<Tally>(&*store, "f").await);

    // An append ahead of the failed one lands and is answered; the one behind is decided again.
    faults.appends.hold();
    let entered = faults.appends.entered();
    let ahead = started(rt.send::<Tally>("f", TallyCommand::Add(6))).await;
    faults.appends.wait_entered(entered + 1).await;
    faults.fail_appends(1);
    let failed = started(rt.send::<Tally>("f", TallyCommand::Add(7))).await;
    faults.appends.wait_entered(entered + 2).await;
    let behind = started(rt.send::<Tally>("f", TallyCommand::Add(8))).await;
    faults.appends.wait_entered(entered + 3).await;
    faults.appends.release();
    assert_eq!(single_sequence(&within("ahead", ahead).await.unwrap()), 5);
    store_error("the second failed append", within("failed", failed).await);
    assert_eq!(single_sequence(&within("behind", behind).await.unwrap()), 6);
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 3);

    // Two failures in a row, then a conflict behind them.
    faults.appends.hold();
    let entered = faults.appends.entered();
    faults.fail_appends(2);
    let one = started(rt.send::<Tally>("f", TallyCommand::Add(9))).await;
    faults.appends.wait_entered(entered + 1).await;
    let two = started(rt.send::<Tally>("f", TallyCommand::Add(10))).await;
    faults.appends.wait_entered(entered + 2).await;
    let three = started(rt.send::<Tally>("f", TallyCommand::Add(11))).await;
    faults.appends.wait_entered(entered + 3).await;
    faults.appends.release();
    store_error("the first of two failures", within("one", one).await);
    store_error("the second of two failures", within("two", two).await);
    assert_eq!(single_sequence(&within("three", three).await.unwrap()), 7);
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 4);

    let (state, version) = rt.state::<Tally>("f").await.unwrap();
    assert_eq!(
        (state.clone(), version),
        (Tally::of([1, 3, 4, 5, 6, 8, 11]), 7)
    );
    assert_eq!((state, version), fold::<Tally>(&*store, "f").await);
    let next = rt.send::<Tally>("f", TallyCommand::Add(12)).await.unwrap();
    assert_eq!(single_sequence(&next), 8);
    shutdown(rt).await;
}

/// L4: a rejection decided against the events of an append that then fails is not answered: it
/// is decided again after the reload, where the command fits and is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_made_behind_a_failed_append_is_made_again_after_the_reload() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |_| {});
    let store = rt.store();
    rt.send::<Tally>("r", TallyCommand::Add(1)).await.unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    faults.fail_appends(1);
    let failed = started(rt.send::<Tally>("r", TallyCommand::Add(5))).await;
    // 1 + 5 + 1 > 6 on the tentative state, 1 + 1 <= 6 on the stored one.
    let limited =
        started(rt.send::<Tally>("r", TallyCommand::AddAtMost { add: 1, limit: 6 })).await;
    let behind = started(rt.send::<Tally>("r", TallyCommand::Add(7))).await;
    // `behind` reaching the store proves `limited` was decided (and rejected) before it.
    faults.appends.wait_entered(entered + 2).await;
    faults.appends.release();
    store_error("the failed append", within("failed", failed).await);
    let done = within("limited", limited)
        .await
        .expect("decided again against the reloaded state, where it fits");
    assert_eq!(single_sequence(&done), 2);
    assert_eq!(single_sequence(&within("behind", behind).await.unwrap()), 3);
    let (state, version) = rt.state::<Tally>("r").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of([1, 1, 7]), 3));
    assert_eq!((state, version), fold::<Tally>(&*store, "r").await);
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 2);
    shutdown(rt).await;
}

/// L4, idempotency: a retry of a command id whose append is in flight is answered once that
/// append has landed, with its sequences; if that append fails instead, the retry is decided
/// again after the reload and applied (the failed one stored nothing, not even its record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_behind_its_own_append_in_flight_follows_that_append() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |_| {});
    let store = rt.store();
    let with_id = |id| CommandOptions::new().command_id(id);
    rt.send::<Tally>("i", TallyCommand::Add(1)).await.unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let id = Uuid::now_v7();
    let original = started(rt.send_with::<Tally>("i", TallyCommand::Add(5), with_id(id))).await;
    faults.appends.wait_entered(entered + 1).await;
    let mut retry = started(rt.send_with::<Tally>("i", TallyCommand::Add(5), with_id(id))).await;
    let behind = started(rt.send::<Tally>("i", TallyCommand::Add(6))).await;
    // `behind` reaching the store proves the retry was decided before it.
    faults.appends.wait_entered(entered + 2).await;
    assert!(
        still_pending(&mut retry).await,
        "a retry was answered before the original was stored"
    );
    faults.appends.release();
    assert_eq!(
        single_sequence(&within("original", original).await.unwrap()),
        2
    );
    let retried = within("retry", retry).await.unwrap();
    assert!(retried.deduplicated);
    assert_eq!((retried.first_sequence, retried.last_sequence), (2, 2));
    assert_eq!(single_sequence(&within("behind", behind).await.unwrap()), 3);

    // The original's append fails: the retry behind it is applied after the reload.
    faults.appends.hold();
    let entered = faults.appends.entered();
    faults.fail_appends(1);
    let id = Uuid::now_v7();
    let original = started(rt.send_with::<Tally>("i", TallyCommand::Add(7), with_id(id))).await;
    let retry = started(rt.send_with::<Tally>("i", TallyCommand::Add(7), with_id(id))).await;
    let behind = started(rt.send::<Tally>("i", TallyCommand::Add(8))).await;
    faults.appends.wait_entered(entered + 2).await;
    faults.appends.release();
    store_error("the failed original", within("original", original).await);
    let retried = within("retry", retry).await.unwrap();
    assert!(!retried.deduplicated, "the failed original stored nothing");
    assert_eq!(single_sequence(&retried), 4);
    assert_eq!(single_sequence(&within("behind", behind).await.unwrap()), 5);
    let records = store
        .command_records(&stream_of::<Tally>("i"))
        .await
        .unwrap();
    assert!(
        records.iter().any(|r| r.command_id == id),
        "the applied retry recorded its id"
    );
    let (state, version) = rt.state::<Tally>("i").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of([1, 5, 6, 7, 8]), 5));
    assert_eq!((state, version), fold::<Tally>(&*store, "i").await);
    shutdown(rt).await;
}

/// L4, another writer: the stream moved behind the actor's back by exactly as many events as
/// the first append in flight carries. That append conflicts; the one behind it, decided
/// against the first one's event, expects the version the foreign event now holds, so the
/// version alone would let it through although the state it was decided against was never
/// stored. It names the first one's last event (`expected_last_event`), so it conflicts too:
/// the command behind is decided again against the reloaded state, where it no longer fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_behind_a_conflicting_one_is_not_stored_on_foreign_events() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |_| {});
    let store = rt.store();
    rt.send::<Tally>("x", TallyCommand::Add(1)).await.unwrap();
    // Another writer adds 100 at version 2; the live actor still has version 1.
    store
        .append(incarnate::AppendRequest::new(
            stream_of::<Tally>("x"),
            1,
            vec![foreign_event(&TallyEvent::Added(100))],
        ))
        .await
        .unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let first = started(rt.send::<Tally>("x", TallyCommand::Add(5))).await;
    // Fits on the actor's tentative state (1 + 5 + 5 <= 11), not on the stored one (101).
    let limited =
        started(rt.send::<Tally>("x", TallyCommand::AddAtMost { add: 5, limit: 11 })).await;
    faults.appends.wait_entered(entered + 2).await;
    faults.appends.release();
    let first = within("first", first).await.unwrap();
    let limited = within("limited", limited).await;
    let (state, version) = fold::<Tally>(&*store, "x").await;
    assert!(
        limited.is_err(),
        "AddAtMost {{ add: 5, limit: 11 }} was accepted at #{} on a stored total of 101 \
         (the conflicting first append was decided again, to #{}); stored values {:?}",
        limited.as_ref().map(single_sequence).unwrap_or(0),
        single_sequence(&first),
        tally_values(&stored::<Tally>(&*store, "x").await),
    );
    assert_eq!(rt.state::<Tally>("x").await.unwrap(), (state, version));
    shutdown(rt).await;
}

/// L5: a state read waits until the appends in flight have landed, and sees exactly them: not
/// the tentative state while they are held, not the command queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_read_waits_for_the_appends_in_flight() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |c| c.aggregates.default.mailbox_capacity = 2);
    let store = rt.store();
    rt.send::<Tally>("s", TallyCommand::Add(1)).await.unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let two = started(rt.send::<Tally>("s", TallyCommand::Add(2))).await;
    let three = started(rt.send::<Tally>("s", TallyCommand::Add(3))).await;
    faults.appends.wait_entered(entered + 2).await;
    let mut read = started(rt.state::<Tally>("s")).await;
    let mut four = started(rt.send::<Tally>("s", TallyCommand::Add(4))).await;
    // The read and the command behind it were handled and queued: the mailbox (2) is full.
    expect_overloaded(&rt, "s", 2).await;
    assert!(
        still_pending(&mut read).await,
        "read state with appends in flight"
    );
    assert!(still_pending(&mut four).await);
    assert_eq!(
        faults.appends.entered(),
        entered + 2,
        "a command behind a read was sent before the read was answered"
    );

    faults.appends.release();
    assert_eq!(single_sequence(&within("two", two).await.unwrap()), 2);
    assert_eq!(single_sequence(&within("three", three).await.unwrap()), 3);
    let (state, version) = within("the read", read).await.unwrap();
    assert_eq!(
        (state, version),
        (Tally::of([1, 2, 3]), 3),
        "the read saw the appends ahead of it, stored, and nothing behind it"
    );
    assert_eq!(single_sequence(&within("four", four).await.unwrap()), 4);
    let (state, version) = rt.state::<Tally>("s").await.unwrap();
    assert_eq!((state, version), fold::<Tally>(&*store, "s").await);
    shutdown(rt).await;
}

/// L5: a snapshot that falls due while appends are in flight is taken once they have all
/// landed, of the stored state at that version, not of the tentative state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_snapshot_waits_for_the_appends_in_flight() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |c| {
        c.aggregates.default.snapshot_every = 2;
        c.aggregates.default.snapshot_keep = 100;
    });
    let store = rt.store();
    rt.send::<Tally>("snap", TallyCommand::Add(1))
        .await
        .unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let mut sends = Vec::new();
    for (k, v) in (2..=4).enumerate() {
        sends.push(started(rt.send::<Tally>("snap", TallyCommand::Add(v))).await);
        faults.appends.wait_entered(entered + k as u64 + 1).await;
    }
    // Version 2 is due for a snapshot when the first lands, with two still in flight.
    faults.appends.wait_entered(entered + 3).await;
    faults.appends.release();
    for (send, v) in sends.into_iter().zip(2..) {
        assert_eq!(single_sequence(&within("a reply", send).await.unwrap()), v);
    }
    eventually("a snapshot is saved", || {
        let saved = rt.stats::<Tally>().unwrap().snapshots;
        async move { saved >= 1 }
    })
    .await;
    let stream = stream_of::<Tally>("snap");
    let snapshot = store
        .latest_snapshot(&stream, SnapshotCriteria::latest())
        .await
        .unwrap()
        .expect("the snapshot");
    assert_eq!(snapshot.sequence, 4, "taken once nothing was in flight");
    let saved: Tally = rmp_serde::from_slice(&snapshot.payload).unwrap();
    assert_eq!(saved, Tally::of(1..=4), "the stored state at its version");
    assert!(
        store
            .latest_snapshot(&stream, SnapshotCriteria::up_to(3))
            .await
            .unwrap()
            .is_none(),
        "no snapshot was taken with appends in flight"
    );
    assert_eq!(rt.stats::<Tally>().unwrap().snapshots, 1);
    shutdown(rt).await;
}

/// L5: shutdown sends a stop behind the appends in flight: it waits for them, their callers get
/// their sequences, and they are in the store after a restart.
///
/// (The stop is in the actor's mailbox once shutdown has been polled, but nothing signals that
/// the actor has handled it before the release; a regression shows unless it handles it late.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_appends_in_flight() {
    let node = Node::new();
    let (rt, faults) = ordered_runtime(&node, |_| {});
    rt.send::<Tally>("down", TallyCommand::Add(1))
        .await
        .unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let mut sends = Vec::new();
    for (k, v) in (2..=4).enumerate() {
        sends.push(started(rt.send::<Tally>("down", TallyCommand::Add(v))).await);
        faults.appends.wait_entered(entered + k as u64 + 1).await;
    }
    faults.appends.wait_entered(entered + 3).await;
    let mut down = started(rt.shutdown()).await;
    assert!(
        still_pending(&mut down).await,
        "shutdown waits for the held appends"
    );
    faults.appends.release();
    for (send, v) in sends.into_iter().zip(2..) {
        assert_eq!(single_sequence(&within("a reply", send).await.unwrap()), v);
    }
    within("shutdown", down).await.unwrap();
    drop(rt);

    let rt = node.runtime();
    assert_eq!(
        rt.state::<Tally>("down").await.unwrap(),
        (Tally::of(1..=4), 4)
    );
    shutdown(rt).await;
}

/// 64 concurrent callers × 16 commands to one aggregate on the plain sled store (which
/// pipelines): sequences 1..=1024, each acknowledged once, each caller's in its order, each
/// value stored where it was acknowledged, the state the fold of the store, also after a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_callers_on_sled_get_dense_unique_sequences() {
    const CALLERS: u64 = 64;
    const PER_CALLER: u64 = 16;
    const TOTAL: u64 = CALLERS * PER_CALLER;
    let node = Node::new();
    let rt = node.runtime();
    assert!(rt.store().preserves_append_order());
    let sequences = concurrent_adds(&rt, "crowd", CALLERS, PER_CALLER).await;
    assert_eq!(sequences, (1..=TOTAL).collect::<Vec<_>>());
    let (state, version) = rt.state::<Tally>("crowd").await.unwrap();
    assert_eq!(version, TOTAL);
    assert_eq!(state.count, TOTAL);
    let folded = fold::<Tally>(&*rt.store(), "crowd").await;
    assert_eq!((state.clone(), version), folded);
    shutdown(rt).await;

    let rt = node.runtime();
    assert_eq!(rt.state::<Tally>("crowd").await.unwrap(), (state, version));
    shutdown(rt).await;
}
