//! A. Activation and recovery, on the sled store with real restarts.

use std::sync::Arc;
use std::time::Duration;

use incarnate::{AppendRequest, CommandError, RuntimeError, SnapshotCriteria};
use incarnate_actors::account::{Account, AccountCommand};

use crate::runtime_support::{
    fold, foreign_event, runtime_error, shutdown, single_sequence, started, stored, stream_of,
    tally_values, within, ArmFragile, Fragile, Node, Tally, TallyCommand, TallyEvent,
    FRAGILE_POISON,
};

/// A1: the first message activates the actor from the latest snapshot plus the events after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_activates_from_the_latest_snapshot_then_the_later_events() {
    let node = Node::new();
    let every_10 = |c: &mut incarnate::Config| {
        c.aggregates.default.snapshot_every = 10;
        c.aggregates.default.snapshot_keep = 2;
    };
    let rt = node.runtime_with(every_10);
    for v in 1..=25 {
        rt.send::<Tally>("a1", TallyCommand::Add(v)).await.unwrap();
    }
    crate::runtime_support::eventually("the snapshots at 10 and 20 are saved", || {
        let stats = rt.stats::<Tally>().unwrap();
        async move { stats.snapshots == 2 }
    })
    .await;
    shutdown(rt).await;

    let rt = node.runtime_with(every_10);
    let before = rt.stats::<Tally>().unwrap();
    assert_eq!((before.live, before.activations), (0, 0));
    let latest = rt
        .store()
        .latest_snapshot(&stream_of::<Tally>("a1"), SnapshotCriteria::latest())
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(latest.sequence, 20);

    let (state, version) = rt.state::<Tally>("a1").await.unwrap();
    assert_eq!(version, 25);
    assert_eq!(state, Tally::of(1..=25));
    assert_eq!(
        state.applied, 5,
        "recovery must start from the snapshot at 20 and replay only 21..=25"
    );
    let (folded, _) = fold::<Tally>(&*rt.store(), "a1").await;
    assert_eq!(
        state, folded,
        "the recovered state is the fold of the store"
    );
    let after = rt.stats::<Tally>().unwrap();
    assert_eq!((after.live, after.activations), (1, 1));

    // A never-written id activates to the default state at version 0.
    let (fresh, version) = rt.state::<Tally>("never-written").await.unwrap();
    assert_eq!((fresh, version), (Tally::default(), 0));
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 2);

    // The next command continues the stream.
    let done = rt.send::<Tally>("a1", TallyCommand::Add(26)).await.unwrap();
    assert_eq!(single_sequence(&done), 26);
    shutdown(rt).await;
}

/// A2: 500 concurrent first messages share one activation and one recovery read. The recovery
/// is held until all 500 are in the mailbox, so every one of them races the first activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_first_messages_make_one_activation() {
    const N: u64 = 500;
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime();
    faults.recovery.hold();
    let (delivered_tx, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    let barrier = Arc::new(tokio::sync::Barrier::new(N as usize));
    let tasks: Vec<_> = (1..=N)
        .map(|v| {
            let rt = rt.clone();
            let barrier = barrier.clone();
            let delivered_tx = delivered_tx.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let send = started(rt.send::<Tally>("hot", TallyCommand::Add(v))).await;
                delivered_tx.send(()).unwrap();
                (v, send.await)
            })
        })
        .collect();
    for _ in 0..N {
        within("every first message to be delivered", delivered.recv())
            .await
            .unwrap();
    }
    faults.recovery.wait_entered(1).await;
    assert_eq!(faults.recoveries(), 1, "one recovery started");
    faults.recovery.release();

    let mut sequences = Vec::new();
    for task in tasks {
        let (v, result) = task.await.unwrap();
        let done = result.unwrap_or_else(|e| panic!("command {v}: {e}"));
        sequences.push(single_sequence(&done));
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=N).collect::<Vec<_>>());
    let stats = rt.stats::<Tally>().unwrap();
    assert_eq!(stats.activations, 1, "exactly one activation");
    assert_eq!(stats.live, 1);
    assert_eq!(faults.recoveries(), 1, "exactly one recovery read");
    let (state, version) = rt.state::<Tally>("hot").await.unwrap();
    assert_eq!(version, N);
    assert_eq!(state.total, N * (N + 1) / 2);
    assert_eq!(state, fold::<Tally>(&*rt.store(), "hot").await.0);
    shutdown(rt).await;
}

/// A3: commands sent while the actor recovers wait, then run in arrival order against the
/// recovered state; a state read queued among them sees exactly the commands before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_during_a_slow_recovery_run_afterwards_in_arrival_order() {
    let node = Node::new();
    let rt = node.runtime();
    for v in 1..=5 {
        rt.send::<Tally>("slow", TallyCommand::Add(v))
            .await
            .unwrap();
    }
    shutdown(rt).await;

    let (rt, faults) = node.faulty_runtime();
    faults.recovery.hold();
    let mut first = Vec::new();
    for v in 101..=111 {
        first.push(started(rt.send::<Tally>("slow", TallyCommand::Add(v))).await);
    }
    faults.recovery.wait_entered(1).await;
    let read = started(rt.state::<Tally>("slow")).await;
    let mut second = Vec::new();
    for v in 112..=121 {
        second.push(started(rt.send::<Tally>("slow", TallyCommand::Add(v))).await);
    }
    faults.recovery.release();

    let mut sequences = Vec::new();
    for send in first {
        sequences.push(single_sequence(&send.await.unwrap()));
    }
    let (seen, seen_version) = read.await.unwrap();
    for send in second {
        sequences.push(single_sequence(&send.await.unwrap()));
    }
    assert_eq!(
        sequences,
        (6..=26).collect::<Vec<_>>(),
        "processed in arrival order after the 5 recovered events"
    );
    assert_eq!(seen_version, 16);
    assert_eq!(seen, Tally::of((1..=5).chain(101..=111)));
    let slice = stored::<Tally>(&*rt.store(), "slow").await;
    assert_eq!(
        tally_values(&slice),
        (1..=5).chain(101..=121).collect::<Vec<_>>()
    );
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 1);
    assert_eq!(faults.recoveries(), 1);
    shutdown(rt).await;
}

/// A4: a recovery that fails on a store read fails its callers with a typed activation error,
/// leaves other aggregates alone, and the next message activates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_activation_is_retried_by_the_next_message() {
    let node = Node::new();
    let rt = node.runtime();
    for v in 1..=3 {
        rt.send::<Tally>("flaky", TallyCommand::Add(v))
            .await
            .unwrap();
    }
    shutdown(rt).await;

    let (rt, faults) = node.faulty_runtime();
    faults.fail_recoveries(1);
    // The recovery waits until the command is in the mailbox, so the failure reaches it (a
    // command arriving after the failed actor stopped would go to a new activation instead).
    faults.recovery.hold();
    let failed = started(rt.send::<Tally>("flaky", TallyCommand::Add(10))).await;
    faults.recovery.wait_entered(1).await;
    faults.recovery.release();
    match runtime_error(failed.await) {
        RuntimeError::Activation { stream, reason } => {
            assert_eq!(stream, stream_of::<Tally>("flaky"));
            assert!(reason.contains("injected read failure"), "{reason}");
        }
        other => panic!("expected an activation error, got {other:?}"),
    }
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 0);

    // Other aggregates are unaffected.
    let other = rt
        .send::<Tally>("other", TallyCommand::Add(1))
        .await
        .unwrap();
    assert_eq!(single_sequence(&other), 1);

    // The next message activates again, from the store; the failed command was not stored.
    let done = rt
        .send::<Tally>("flaky", TallyCommand::Add(4))
        .await
        .unwrap();
    assert_eq!(single_sequence(&done), 4);
    assert_eq!(
        faults.recoveries(),
        3,
        "two attempts for flaky, one for other"
    );
    let (state, version) = rt.state::<Tally>("flaky").await.unwrap();
    assert_eq!((state, version), (Tally::of(1..=4), 4));
    shutdown(rt).await;
}

/// A4: an `apply` that panics while replaying and an event that cannot be decoded fail the
/// activation with a typed error; the runtime and other aggregates keep working; once the
/// cause is gone, the same id activates normally (never poisoned). Also: an `apply` panicking
/// on the command path fails the command, stores nothing, and the actor reloads.
///
/// The only test that arms [`ArmFragile`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_apply_or_an_undecodable_event_fails_activation_without_poisoning_the_id() {
    let node = Node::new();
    let rt = node.runtime();
    rt.send::<Fragile>("f", 1).await.unwrap();
    rt.send::<Fragile>("f", FRAGILE_POISON).await.unwrap();
    // An event another writer stored that this build cannot decode.
    let garbage = incarnate::NewEvent {
        payload: vec![0xc1, 0xff, 0x00],
        ..foreign_event(&TallyEvent::Added(1))
    };
    rt.store()
        .append(AppendRequest::new(
            stream_of::<Tally>("garbled"),
            0,
            vec![garbage],
        ))
        .await
        .unwrap();
    shutdown(rt).await;

    let rt = node.runtime();
    {
        let _armed = ArmFragile::arm();
        for attempt in 0..2 {
            match runtime_error(rt.send::<Fragile>("f", 5).await) {
                RuntimeError::Activation { reason, .. } => {
                    assert!(reason.contains("apply panicked"), "{attempt}: {reason}")
                }
                other => panic!("expected an activation error, got {other:?}"),
            }
        }
        // Other aggregates of the type are unaffected.
        rt.send::<Fragile>("g", 7).await.unwrap();
        // A panicking apply on the command path: the command fails, nothing is stored, the
        // actor reloads and serves the next command from the store.
        match runtime_error(rt.send::<Fragile>("g", FRAGILE_POISON).await) {
            RuntimeError::HandlerPanicked { message, .. } => {
                assert!(message.contains("apply panicked"), "{message}")
            }
            other => panic!("expected a handler panic, got {other:?}"),
        }
        let next = rt.send::<Fragile>("g", 8).await.unwrap();
        assert_eq!(
            single_sequence(&next),
            2,
            "the poisoned event was not stored"
        );
        assert_eq!(
            rt.state::<Fragile>("g").await.unwrap(),
            (Fragile { total: 15 }, 2)
        );
    }
    // The cause is gone: the same id activates.
    let done = rt.send::<Fragile>("f", 5).await.unwrap();
    assert_eq!(single_sequence(&done), 3);
    let (state, _) = rt.state::<Fragile>("f").await.unwrap();
    assert_eq!(state.total, 1 + FRAGILE_POISON + 5);

    // An undecodable event: a typed error, every time, and no effect on other ids.
    for _ in 0..2 {
        match runtime_error(rt.send::<Tally>("garbled", TallyCommand::Add(1)).await) {
            RuntimeError::Activation { reason, .. } => {
                assert!(reason.contains("cannot decode event 1"), "{reason}")
            }
            other => panic!("expected an activation error, got {other:?}"),
        }
    }
    assert_eq!(
        stored::<Tally>(&*rt.store(), "garbled")
            .await
            .highest_sequence,
        1
    );
    rt.send::<Tally>("clean", TallyCommand::Add(1))
        .await
        .unwrap();
    shutdown(rt).await;
}

/// A5: with at most 2 recoveries at once, 200 simultaneous activations all complete, and no
/// more than 2 recoveries ever read at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_cap_bounds_a_mass_activation_and_every_activation_completes() {
    const N: usize = 200;
    let node = Node::new();
    let rt = node.runtime();
    let writes: Vec<_> = (0..N)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move {
                rt.send::<Account>(
                    format!("acct-{i}"),
                    AccountCommand::Open {
                        owner: format!("owner {i}"),
                    },
                )
                .await
                .unwrap()
            })
        })
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    shutdown(rt).await;

    let (rt, faults) = node.faulty_runtime_with(|c| c.runtime.max_concurrent_recoveries = 2);
    // Every read takes a little while, so uncapped recoveries would overlap widely.
    faults.read_latency(Duration::from_millis(1));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move {
                rt.send::<Account>(format!("acct-{i}"), AccountCommand::Deposit { amount: 10 })
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let done = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("acct-{i}: {e}"));
        assert_eq!(
            single_sequence(&done),
            2,
            "acct-{i} recovered its Opened event"
        );
    }
    let stats = rt.stats::<Account>().unwrap();
    assert_eq!(stats.activations, N as u64);
    assert_eq!(stats.live, N);
    let max = faults.max_reads_in_flight();
    assert!(max <= 2, "{max} recoveries read at once, the cap is 2");
    let (account, version) = rt.state::<Account>("acct-199").await.unwrap();
    assert_eq!(
        (account.balance, account.owner.as_str(), version),
        (10, "owner 199", 2)
    );
    shutdown(rt).await;
}

/// Sending to an aggregate type the runtime does not host is a typed error, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_aggregate_type_is_a_typed_error() {
    let node = Node::new();
    let rt = incarnate::Runtime::builder()
        .config(node.config(|_| {}))
        .register::<Account>()
        .build()
        .unwrap();
    match rt.send::<Tally>("x", TallyCommand::Add(1)).await {
        Err(CommandError::Runtime(RuntimeError::UnknownAggregateType(tag))) => {
            assert_eq!(tag, "tally")
        }
        other => panic!("expected UnknownAggregateType, got {other:?}"),
    }
    assert!(matches!(
        rt.state::<Tally>("x").await,
        Err(RuntimeError::UnknownAggregateType("tally"))
    ));
    assert!(matches!(
        rt.stats::<Tally>(),
        Err(RuntimeError::UnknownAggregateType("tally"))
    ));
    // The registered type works on the same runtime.
    rt.send::<Account>("x", AccountCommand::Open { owner: "x".into() })
        .await
        .unwrap();
    shutdown(rt).await;

    // Registering one type twice is refused at build time.
    let twice = incarnate::Runtime::builder()
        .config(node.config(|_| {}))
        .register::<Account>()
        .register::<Account>()
        .build();
    assert!(matches!(
        twice,
        Err(incarnate::BuildError::DuplicateType("account"))
    ));
}
