//! P. Passivation and lifecycle: idle and over-the-limit passivation, bounded mailboxes, and
//! graceful shutdown followed by a real restart on the same sled directory.
//!
//! Passivation has no signal to await: the tests poll the runtime's stats with a deadline.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use incarnate::{CommandError, CommandOptions, Runtime, RuntimeError};
use incarnate_actors::account::{Account, AccountCommand};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::runtime_support::{
    eventually, fold, runtime_error, shutdown, single_sequence, started, still_pending, stored,
    stream_of, tally_values, within, Node, Tally, TallyCommand,
};

async fn wait_live<A: incarnate::Aggregate>(rt: &Runtime, live: usize) {
    eventually(&format!("{} live {} actors", live, A::TYPE), || {
        let now = rt.stats::<A>().unwrap().live;
        async move { now == live }
    })
    .await;
}

/// P1: an actor idle past its timeout is passivated; the next message reactivates it from the
/// store with identical state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_actor_is_passivated_and_reactivates_with_identical_state() {
    let node = Node::new();
    let rt = node.runtime_with(|c| {
        c.aggregates.default.idle_timeout_ms = 50;
        c.runtime.passivation_sweep_ms = 10;
    });
    for v in 1..=10 {
        rt.send::<Tally>("idle", TallyCommand::Add(v))
            .await
            .unwrap();
    }
    rt.send::<Account>("idle", AccountCommand::Open { owner: "I".into() })
        .await
        .unwrap();
    rt.send::<Account>("idle", AccountCommand::Deposit { amount: 42 })
        .await
        .unwrap();
    let tally_before = rt.state::<Tally>("idle").await.unwrap();
    let account_before = rt.state::<Account>("idle").await.unwrap();

    wait_live::<Tally>(&rt, 0).await;
    wait_live::<Account>(&rt, 0).await;
    // Usually one incarnation each; a stall longer than the timeout during the set-up (a loaded
    // machine) passivates earlier too. Either way every incarnation so far was passivated.
    let tally = rt.stats::<Tally>().unwrap();
    let account = rt.stats::<Account>().unwrap();
    assert!(tally.passivations >= 1);
    assert_eq!(tally.passivations, tally.activations);
    assert_eq!(account.passivations, account.activations);

    let tally_after = rt.state::<Tally>("idle").await.unwrap();
    assert_eq!(tally_after, tally_before);
    assert_eq!(
        tally_after.0.applied, 10,
        "reactivated by a replay from the store"
    );
    assert_eq!(rt.state::<Account>("idle").await.unwrap(), account_before);
    assert_eq!(
        rt.stats::<Tally>().unwrap().activations,
        tally.activations + 1
    );
    assert_eq!(
        rt.stats::<Account>().unwrap().activations,
        account.activations + 1
    );
    let next = rt
        .send::<Tally>("idle", TallyCommand::Add(11))
        .await
        .unwrap();
    assert_eq!(single_sequence(&next), 11);
    shutdown(rt).await;
}

/// P2: with actors passivated as soon as they are idle (1 ms, swept every 1 ms) while commands
/// stream in, every command is acknowledged exactly once and every stream stays dense: work
/// that reaches a passivating actor goes to the next incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_is_lost_while_actors_passivate_under_load() {
    const IDS: usize = 4;
    const TASKS_PER_ID: usize = 2;
    const PER_TASK: u64 = 120;
    let node = Node::new();
    let rt = node.runtime_with(|c| {
        c.aggregates.default.idle_timeout_ms = 1;
        c.runtime.passivation_sweep_ms = 1;
        c.aggregates.default.snapshot_every = 25;
    });
    let tasks: Vec<_> = (0..IDS * TASKS_PER_ID)
        .map(|t| {
            let rt = rt.clone();
            let id = format!("busy-{}", t % IDS);
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..PER_TASK {
                    let value = (t as u64 + 1) * 10_000 + i;
                    let command_id = Uuid::now_v7();
                    let done = rt
                        .send_with::<Tally>(
                            id.as_str(),
                            TallyCommand::Add(value),
                            CommandOptions::new().command_id(command_id),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("task {t} command {i}: {e}"));
                    assert!(!done.deduplicated);
                    acked.push((single_sequence(&done), value, command_id));
                    if i % 4 == 0 {
                        // Idle gaps, so the sweeper passivates the actor between commands.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                (id, acked)
            })
        })
        .collect();
    let mut by_id: HashMap<String, BTreeMap<u64, (u64, Uuid)>> = HashMap::new();
    for task in tasks {
        let (id, acked) = task.await.unwrap();
        let seen = by_id.entry(id).or_default();
        for (sequence, value, command_id) in acked {
            assert!(
                seen.insert(sequence, (value, command_id)).is_none(),
                "sequence {sequence} acknowledged twice"
            );
        }
    }
    let store = rt.store();
    let per_id = TASKS_PER_ID as u64 * PER_TASK;
    for (id, acked) in &by_id {
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (1..=per_id).collect::<Vec<_>>(),
            "{id}: dense acknowledged sequences"
        );
        let slice = stored::<Tally>(&*store, id).await;
        assert_eq!(slice.highest_sequence, per_id, "{id}: nothing extra stored");
        let values = tally_values(&slice);
        for ((envelope, value), (sequence, (acked_value, command_id))) in
            slice.events.iter().zip(&values).zip(acked)
        {
            assert_eq!(envelope.sequence, *sequence);
            assert_eq!(value, acked_value, "{id}#{sequence}");
            assert_eq!(envelope.causation.command_id, Some(*command_id));
        }
        let (state, version) = rt.state::<Tally>(id.as_str()).await.unwrap();
        assert_eq!((state, version), (Tally::of(values), per_id));
    }
    let stats = rt.stats::<Tally>().unwrap();
    assert!(
        stats.passivations >= 20,
        "the test must passivate under load, it did {} times",
        stats.passivations
    );
    assert!(stats.activations >= stats.passivations);
    shutdown(rt).await;
}

/// P3: over the live-actor limit the least recently used actors are passivated (in strict
/// order of last use); their state survives and they reactivate on their next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_limit_passivates_the_least_recently_used_and_their_state_survives() {
    let node = Node::new();
    let rt = node.runtime_with(|c| {
        c.aggregates.default.max_live = 3;
        // Only the over-the-limit trigger sweeps in this test.
        c.runtime.passivation_sweep_ms = 600_000;
    });
    let activations = |rt: &Runtime| rt.stats::<Tally>().unwrap().activations;
    // Reads `ids` in order, each from its own single-event stream, and checks the state.
    async fn read(rt: &Runtime, ids: &[&str]) {
        for id in ids {
            let v = u64::from(id.as_bytes()[0] - b'a' + 1);
            assert_eq!(rt.state::<Tally>(*id).await.unwrap(), (Tally::of([v]), 1));
        }
    }
    for (v, id) in (1..).zip(["a", "b", "c", "d", "e"]) {
        rt.send::<Tally>(id, TallyCommand::Add(v)).await.unwrap();
    }
    wait_live::<Tally>(&rt, 3).await;
    let stats = rt.stats::<Tally>().unwrap();
    assert_eq!((stats.passivations, stats.activations), (2, 5));

    // c, d and e are the live ones: reading them activates nothing.
    read(&rt, &["e", "d", "c"]).await;
    assert_eq!(activations(&rt), 5, "a and b were the ones passivated");
    // a and b were passivated: they come back from the store, and each pushes out the least
    // recently used of the others: e, then d.
    read(&rt, &["a"]).await;
    assert_eq!(activations(&rt), 6);
    read(&rt, &["b"]).await;
    assert_eq!(activations(&rt), 7);
    wait_live::<Tally>(&rt, 3).await;
    read(&rt, &["c", "a", "b"]).await;
    assert_eq!(activations(&rt), 7, "c, a and b stayed live");
    read(&rt, &["e"]).await;
    assert_eq!(activations(&rt), 8, "e had been passivated");
    wait_live::<Tally>(&rt, 3).await;
    assert_eq!(rt.stats::<Tally>().unwrap().passivations, 5);
    shutdown(rt).await;
}

/// P5: a full mailbox answers `Overloaded` at once (while the actor is stuck in a write), and
/// the queued work completes once the write lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_answers_overloaded_at_once() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime_with(|c| c.aggregates.default.mailbox_capacity = 4);
    faults.appends.hold();
    let entered = faults.appends.entered();
    let first = tokio::spawn({
        let rt = rt.clone();
        async move { rt.send::<Tally>("m", TallyCommand::Add(1)).await }
    });
    faults.appends.wait_entered(entered + 1).await;
    let mut queued = Vec::new();
    for v in 2..=5 {
        queued.push(started(rt.send::<Tally>("m", TallyCommand::Add(v))).await);
    }
    for _ in 0..3 {
        match runtime_error(
            within(
                "the overloaded answer",
                rt.send::<Tally>("m", TallyCommand::Add(99)),
            )
            .await,
        ) {
            RuntimeError::Overloaded { stream, capacity } => {
                assert_eq!((stream, capacity), (stream_of::<Tally>("m"), 4));
            }
            other => panic!("expected Overloaded, got {other:?}"),
        }
    }
    assert!(matches!(
        within("the overloaded read", rt.state::<Tally>("m")).await,
        Err(RuntimeError::Overloaded { .. })
    ));
    // The write is still held: the answers above did not wait for it.
    for q in &mut queued {
        assert!(still_pending(q).await);
    }
    faults.appends.release();
    assert_eq!(single_sequence(&first.await.unwrap().unwrap()), 1);
    let mut sequences = Vec::new();
    for q in queued {
        sequences.push(single_sequence(&q.await.unwrap()));
    }
    assert_eq!(sequences, [2, 3, 4, 5]);
    assert_eq!(
        fold::<Tally>(&*rt.store(), "m").await,
        (Tally::of(1..=5), 5),
        "no overloaded command was stored"
    );
    rt.send::<Tally>("m", TallyCommand::Add(6)).await.unwrap();
    shutdown(rt).await;
}

/// P4: shutdown stops accepting at once, finishes the commands already queued (a held write
/// and the ones behind it), then closes the store; after a restart all of them are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_commands_and_refuses_new_ones() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime();
    rt.send::<Tally>("sd", TallyCommand::Add(1)).await.unwrap();
    faults.appends.hold();
    let entered = faults.appends.entered();
    let held = tokio::spawn({
        let rt = rt.clone();
        async move { rt.send::<Tally>("sd", TallyCommand::Add(2)).await }
    });
    faults.appends.wait_entered(entered + 1).await;
    let behind: Vec<_> = {
        let mut v = Vec::new();
        for x in 3..=4 {
            v.push(started(rt.send::<Tally>("sd", TallyCommand::Add(x))).await);
        }
        v
    };
    let mut down = started(rt.shutdown()).await;
    // Shutting down: new work is refused at once, whatever the aggregate.
    assert!(matches!(
        runtime_error(rt.send::<Tally>("sd", TallyCommand::Add(5)).await),
        RuntimeError::Stopped
    ));
    assert!(matches!(
        runtime_error(rt.send::<Tally>("other", TallyCommand::Add(5)).await),
        RuntimeError::Stopped
    ));
    assert!(matches!(
        rt.state::<Tally>("sd").await,
        Err(RuntimeError::Stopped)
    ));
    assert!(
        still_pending(&mut down).await,
        "shutdown waits for the held write"
    );

    faults.appends.release();
    assert_eq!(single_sequence(&held.await.unwrap().unwrap()), 2);
    let mut sequences = Vec::new();
    for b in behind {
        sequences.push(single_sequence(&b.await.unwrap()));
    }
    assert_eq!(sequences, [3, 4]);
    within("shutdown", down).await.unwrap();
    rt.shutdown().await.unwrap();
    let rt_closed = rt.store();
    assert!(rt_closed.flush().await.is_err(), "the store is closed");
    drop(rt);

    let rt = node.runtime();
    assert_eq!(
        rt.state::<Tally>("sd").await.unwrap(),
        (Tally::of(1..=4), 4)
    );
    assert!(stored::<Tally>(&*rt.store(), "other")
        .await
        .events
        .is_empty());
    shutdown(rt).await;
}

/// P4: callers stream commands to a few aggregates; shutdown lands in the middle. Every
/// acknowledged command is in the store after a restart, the streams are dense, and every
/// caller's first failure is `Stopped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_acknowledged_before_shutdown_is_in_the_store_after_a_restart() {
    const CALLERS: usize = 6;
    const IDS: usize = 3;
    let node = Node::new();
    let rt = node.runtime();
    let (ack_tx, mut acks) = mpsc::unbounded_channel();
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let rt = rt.clone();
            let ack_tx = ack_tx.clone();
            tokio::spawn(async move {
                let id = format!("stream-{}", c % IDS);
                let mut acked = Vec::new();
                for i in 0.. {
                    let value = (c as u64 + 1) * 1_000_000 + i;
                    match rt
                        .send::<Tally>(id.as_str(), TallyCommand::Add(value))
                        .await
                    {
                        Ok(done) => {
                            acked.push((single_sequence(&done), value));
                            let _ = ack_tx.send(());
                        }
                        Err(CommandError::Runtime(RuntimeError::Stopped)) => break,
                        Err(e) => panic!("caller {c}: {e}"),
                    }
                }
                (id, acked)
            })
        })
        .collect();
    drop(ack_tx);
    for _ in 0..150 {
        within("acknowledgements", acks.recv()).await.unwrap();
    }
    within("shutdown", rt.shutdown()).await.unwrap();
    let mut acked_by_id: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for caller in callers {
        let (id, acked) = within("a caller to stop", caller).await.unwrap();
        acked_by_id.entry(id).or_default().extend(acked);
    }
    drop(rt);

    let rt = node.runtime();
    let store = rt.store();
    let mut total = 0;
    for (id, acked) in &acked_by_id {
        let (state, version) = fold::<Tally>(&*store, id).await;
        let slice = stored::<Tally>(&*store, id).await;
        let values = tally_values(&slice);
        for (sequence, value) in acked {
            assert_eq!(
                values.get(*sequence as usize - 1),
                Some(value),
                "{id}: acknowledged #{sequence} is missing after the restart"
            );
        }
        assert!(acked.len() as u64 <= version);
        assert_eq!(
            rt.state::<Tally>(id.as_str()).await.unwrap(),
            (state, version)
        );
        total += acked.len();
    }
    assert!(total >= 150);
    shutdown(rt).await;
}
