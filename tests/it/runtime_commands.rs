//! E. Commands, effects and failures, on the sled store.

use std::collections::{BTreeSet, HashMap};

use incarnate::{CommandOptions, RuntimeError};
use incarnate_actors::account::{Account, AccountCommand, AccountError, AccountEvent};
use uuid::Uuid;

use crate::runtime_support::{
    fold, foreign_event, rejection, runtime_error, shutdown, single_sequence, started,
    still_pending, stored, stream_of, tally_values, Node, Tally, TallyCommand, TallyError,
    HANDLE_PANIC_MESSAGE,
};

fn open(owner: &str) -> AccountCommand {
    AccountCommand::Open {
        owner: owner.into(),
    }
}

/// E1: a command's events are stored atomically, then applied, then replied with their
/// sequence numbers and global positions; a rejection is typed and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_emits_events_atomically_or_is_rejected_and_changes_nothing() {
    let node = Node::new();
    let rt = node.runtime();
    let store = rt.store();

    let opened = rt.send::<Account>("alice", open("Alice")).await.unwrap();
    assert_eq!(opened.version, 1);
    assert_eq!(
        opened.events[0].event,
        AccountEvent::Opened {
            owner: "Alice".into()
        }
    );
    rt.send::<Account>("alice", AccountCommand::Deposit { amount: 500 })
        .await
        .unwrap();
    let head = store.head();
    let rejected = rt
        .send::<Account>("alice", AccountCommand::Withdraw { amount: 800 })
        .await;
    assert_eq!(
        rejection(rejected),
        AccountError::InsufficientFunds {
            balance: 500,
            requested: 800
        }
    );
    assert_eq!(store.head(), head, "a rejection stores nothing");
    let (account, version) = rt.state::<Account>("alice").await.unwrap();
    assert_eq!((account.balance, version), (500, 2));

    // A multi-event command: one atomic append, consecutive sequences and positions, and the
    // reply matches what the store holds.
    let many = rt
        .send::<Tally>("t", TallyCommand::AddAll(vec![3, 1, 4]))
        .await
        .unwrap();
    assert_eq!(
        (many.first_sequence, many.last_sequence, many.version),
        (1, 3, 3)
    );
    let slice = stored::<Tally>(&*store, "t").await;
    assert_eq!(slice.events.len(), 3);
    for (reply, envelope) in many.events.iter().zip(&slice.events) {
        assert_eq!(reply.sequence, envelope.sequence);
        assert_eq!(reply.position, envelope.position);
        assert_eq!(
            reply.event,
            crate::runtime_support::decode::<Tally>(envelope)
        );
    }
    assert_eq!(many.events[2].position, many.events[0].position + 2);

    // A command that is rejected because of one of its events stores none of them.
    let head = store.head();
    assert_eq!(
        rejection(
            rt.send::<Tally>("t", TallyCommand::AddAll(vec![5, 0, 6]))
                .await
        ),
        TallyError::Zero
    );
    assert_eq!(store.head(), head);
    // A command that emits nothing succeeds without changing the version.
    let nothing = rt.send::<Tally>("t", TallyCommand::Nothing).await.unwrap();
    assert!(nothing.events.is_empty());
    assert_eq!(
        (
            nothing.version,
            nothing.first_sequence,
            nothing.last_sequence
        ),
        (3, 4, 3)
    );
    assert_eq!(store.head(), head);
    assert_eq!(
        rt.state::<Tally>("t").await.unwrap(),
        (Tally::of([3, 1, 4]), 3)
    );
    shutdown(rt).await;
}

/// E2, E3: the reply waits until the events are stored; a read queued behind commands waits
/// for their writes and never sees unpersisted state; each command is decided against the
/// stored effect of the ones before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_waits_for_the_append_and_nothing_sees_unpersisted_state() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime();
    let store = rt.store();
    rt.send::<Account>("bob", open("Bob")).await.unwrap();
    rt.send::<Account>("bob", AccountCommand::Deposit { amount: 100 })
        .await
        .unwrap();

    faults.appends.hold();
    let entered = faults.appends.entered();
    let mut withdraw =
        started(rt.send::<Account>("bob", AccountCommand::Withdraw { amount: 100 })).await;
    faults.appends.wait_entered(entered + 1).await;
    let mut deposit =
        started(rt.send::<Account>("bob", AccountCommand::Deposit { amount: 50 })).await;
    let mut read = started(rt.state::<Account>("bob")).await;
    let mut again =
        started(rt.send::<Account>("bob", AccountCommand::Withdraw { amount: 60 })).await;
    // The append is in flight: nobody has an answer, and the store does not have the event.
    assert!(
        still_pending(&mut withdraw).await,
        "replied before the append"
    );
    assert!(still_pending(&mut deposit).await);
    assert!(still_pending(&mut read).await, "read state during a write");
    assert!(still_pending(&mut again).await);
    assert_eq!(stored::<Account>(&*store, "bob").await.highest_sequence, 2);

    faults.appends.release();
    assert_eq!(single_sequence(&withdraw.await.unwrap()), 3);
    assert_eq!(single_sequence(&deposit.await.unwrap()), 4);
    let (account, version) = read.await.unwrap();
    assert_eq!(
        (account.balance, version),
        (50, 4),
        "the read waited for the deposit's write and saw exactly the stored state"
    );
    assert!(
        stored::<Account>(&*store, "bob").await.highest_sequence >= 4,
        "what the read saw is stored"
    );
    assert_eq!(
        rejection(again.await),
        AccountError::InsufficientFunds {
            balance: 50,
            requested: 60
        },
        "decided against the stored withdrawal and deposit"
    );
    shutdown(rt).await;
}

/// E4: a failed append fails its command(s) with a typed error, nothing is stored, the actor
/// reloads from the store, and its state is never ahead of the store. A batch of commands
/// decided together fails together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_fails_its_commands_and_the_actor_reloads_from_the_store() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime_with(|c| c.aggregates.default.mailbox_capacity = 5);
    let store = rt.store();
    rt.send::<Tally>("w", TallyCommand::Add(1)).await.unwrap();

    faults.fail_appends(1);
    match runtime_error(rt.send::<Tally>("w", TallyCommand::Add(2)).await) {
        RuntimeError::Store(message) => assert!(message.contains("injected"), "{message}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    let (state, version) = rt.state::<Tally>("w").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of([1]), 1));
    assert_eq!((state, version), fold::<Tally>(&*store, "w").await);
    assert_eq!(
        rt.stats::<Tally>().unwrap().activations,
        2,
        "the actor reloaded from the store"
    );
    let next = rt.send::<Tally>("w", TallyCommand::Add(3)).await.unwrap();
    assert_eq!(
        single_sequence(&next),
        2,
        "no gap where the failed write was"
    );

    // A batch: A's append is held while B..F queue behind it (G finding the mailbox full
    // proves they are all queued); then B..F are decided together and their one append fails.
    faults.appends.hold();
    let entered = faults.appends.entered();
    let a = tokio::spawn({
        let rt = rt.clone();
        async move { rt.send::<Tally>("w", TallyCommand::Add(10)).await }
    });
    faults.appends.wait_entered(entered + 1).await;
    let mut batch = Vec::new();
    for v in 11..=15 {
        batch.push(started(rt.send::<Tally>("w", TallyCommand::Add(v))).await);
    }
    assert!(matches!(
        runtime_error(rt.send::<Tally>("w", TallyCommand::Add(99)).await),
        RuntimeError::Overloaded { capacity: 5, .. }
    ));
    faults.fail_appends(1);
    faults.appends.release();
    assert_eq!(single_sequence(&a.await.unwrap().unwrap()), 3);
    for (send, v) in batch.into_iter().zip(11..) {
        match runtime_error(send.await) {
            RuntimeError::Store(_) => {}
            other => panic!("command {v}: expected a store error, got {other:?}"),
        }
    }
    let (state, version) = rt.state::<Tally>("w").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of([1, 3, 10]), 3));
    assert_eq!((state, version), fold::<Tally>(&*store, "w").await);
    let next = rt.send::<Tally>("w", TallyCommand::Add(20)).await.unwrap();
    assert_eq!(single_sequence(&next), 4);
    shutdown(rt).await;
}

/// E5: a panicking `handle` fails that command only: the actor keeps serving from its
/// persisted state without a reload, also when the panic is in the middle of a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handle_fails_only_that_command() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime();
    rt.send::<Tally>("p", TallyCommand::Add(1)).await.unwrap();
    match runtime_error(rt.send::<Tally>("p", TallyCommand::Panic).await) {
        RuntimeError::HandlerPanicked { stream, message } => {
            assert_eq!(stream, stream_of::<Tally>("p"));
            assert!(message.contains(HANDLE_PANIC_MESSAGE), "{message}");
        }
        other => panic!("expected a handler panic, got {other:?}"),
    }
    let next = rt.send::<Tally>("p", TallyCommand::Add(2)).await.unwrap();
    assert_eq!(single_sequence(&next), 2);
    assert_eq!(
        rt.stats::<Tally>().unwrap().activations,
        1,
        "no reload needed"
    );

    // In a batch: the commands around the panicking one commit.
    faults.appends.hold();
    let entered = faults.appends.entered();
    let held = tokio::spawn({
        let rt = rt.clone();
        async move { rt.send::<Tally>("p", TallyCommand::Add(3)).await }
    });
    faults.appends.wait_entered(entered + 1).await;
    let before = started(rt.send::<Tally>("p", TallyCommand::Add(4))).await;
    let panics = started(rt.send::<Tally>("p", TallyCommand::Panic)).await;
    let after = started(rt.send::<Tally>("p", TallyCommand::Add(5))).await;
    faults.appends.release();
    assert_eq!(single_sequence(&held.await.unwrap().unwrap()), 3);
    assert_eq!(single_sequence(&before.await.unwrap()), 4);
    assert!(matches!(
        runtime_error(panics.await),
        RuntimeError::HandlerPanicked { .. }
    ));
    assert_eq!(single_sequence(&after.await.unwrap()), 5);
    let (state, version) = rt.state::<Tally>("p").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=5), 5));
    assert_eq!((state, version), fold::<Tally>(&*rt.store(), "p").await);
    assert_eq!(rt.stats::<Tally>().unwrap().activations, 1);
    shutdown(rt).await;
}

/// E6: another writer appends to the stream; the actor's append conflicts, it reloads and
/// decides the command again against the new state (once). A second conflict is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_conflict_is_redecided_once_against_the_reloaded_state() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime();
    let store = rt.store();
    let stream = stream_of::<Account>("carol");
    rt.send::<Account>("carol", open("Carol")).await.unwrap();
    rt.send::<Account>("carol", AccountCommand::Deposit { amount: 100 })
        .await
        .unwrap();

    // Another writer empties the account behind the actor's back: the withdrawal the actor
    // would have accepted is re-decided against the reloaded balance and rejected.
    let withdrawn = foreign_event(&AccountEvent::Withdrawn { amount: 100 });
    store
        .append(incarnate::AppendRequest::new(
            stream.clone(),
            2,
            vec![withdrawn],
        ))
        .await
        .unwrap();
    assert_eq!(
        rejection(
            rt.send::<Account>("carol", AccountCommand::Withdraw { amount: 60 })
                .await
        ),
        AccountError::InsufficientFunds {
            balance: 0,
            requested: 60
        }
    );
    assert_eq!(
        rt.stats::<Account>().unwrap().activations,
        2,
        "reloaded once"
    );

    // Another writer deposits: the actor's next write conflicts, and the re-decided deposit
    // lands after the foreign event.
    let deposited = foreign_event(&AccountEvent::Deposited { amount: 1_000 });
    store
        .append(incarnate::AppendRequest::new(
            stream.clone(),
            3,
            vec![deposited],
        ))
        .await
        .unwrap();
    let done = rt
        .send::<Account>("carol", AccountCommand::Deposit { amount: 10 })
        .await
        .unwrap();
    assert_eq!(single_sequence(&done), 5);
    assert_eq!(
        rt.stats::<Account>().unwrap().activations,
        3,
        "reloaded again"
    );
    let done = rt
        .send::<Account>("carol", AccountCommand::Withdraw { amount: 60 })
        .await
        .unwrap();
    assert_eq!(single_sequence(&done), 6);
    let (account, version) = rt.state::<Account>("carol").await.unwrap();
    assert_eq!((account.balance, version), (950, 6));
    assert_eq!((account, version), fold::<Account>(&*store, "carol").await);

    // Conflicting on the first attempt and on the re-decision: reported, nothing of the
    // command stored, the state still the fold of the store.
    faults.interfere(vec![
        foreign_event(&AccountEvent::Deposited { amount: 1 }),
        foreign_event(&AccountEvent::Deposited { amount: 2 }),
    ]);
    match runtime_error(
        rt.send::<Account>("carol", AccountCommand::Deposit { amount: 50 })
            .await,
    ) {
        RuntimeError::Conflict {
            stream: s,
            expected,
            actual,
        } => {
            assert_eq!(s, stream);
            assert_eq!((expected, actual), (7, 8));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let (account, version) = rt.state::<Account>("carol").await.unwrap();
    assert_eq!((account.balance, version), (953, 8));
    assert_eq!((account, version), fold::<Account>(&*store, "carol").await);
    let done = rt
        .send::<Account>("carol", AccountCommand::Deposit { amount: 50 })
        .await
        .unwrap();
    assert_eq!(single_sequence(&done), 9);
    shutdown(rt).await;
}

/// E7: 8 tasks × 1,250 commands to one aggregate: sequences 1..=10,000 with no gap and no
/// duplicate, each command's event stored exactly once, each task's commands in its order, the
/// right final state, also after a restart. Durability is `sync` (group commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_of_1250_commands_to_one_aggregate_are_applied_exactly_once_in_dense_order() {
    const TASKS: u64 = 8;
    const PER_TASK: u64 = 1_250;
    let node = Node::new();
    let rt = node.runtime();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let rt = rt.clone();
            tokio::spawn(async move {
                let mut acked = Vec::with_capacity(PER_TASK as usize);
                for i in 0..PER_TASK {
                    let value = t * 1_000_000 + i + 1;
                    let done = rt
                        .send::<Tally>("hot", TallyCommand::Add(value))
                        .await
                        .unwrap_or_else(|e| panic!("task {t} command {i}: {e}"));
                    acked.push((single_sequence(&done), value));
                }
                acked
            })
        })
        .collect();
    let mut by_sequence = HashMap::new();
    for task in tasks {
        let acked = task.await.unwrap();
        assert!(
            acked.windows(2).all(|w| w[0].0 < w[1].0),
            "one task's commands are applied in its order"
        );
        for (sequence, value) in acked {
            assert!(
                by_sequence.insert(sequence, value).is_none(),
                "sequence {sequence} acknowledged twice"
            );
        }
    }
    let n = TASKS * PER_TASK;
    assert_eq!(
        by_sequence.keys().copied().collect::<BTreeSet<_>>(),
        (1..=n).collect::<BTreeSet<_>>()
    );
    let slice = stored::<Tally>(&*rt.store(), "hot").await;
    assert_eq!(slice.highest_sequence, n);
    let values = tally_values(&slice);
    for (envelope, value) in slice.events.iter().zip(&values) {
        assert_eq!(
            by_sequence[&envelope.sequence], *value,
            "the acked event is stored"
        );
    }
    let expected = Tally::of(values);
    assert_eq!(expected.count, n);
    assert_eq!(
        expected.total,
        (0..TASKS)
            .map(|t| PER_TASK * t * 1_000_000 + PER_TASK * (PER_TASK + 1) / 2)
            .sum::<u64>()
    );
    assert_eq!(
        rt.state::<Tally>("hot").await.unwrap(),
        (expected.clone(), n)
    );
    shutdown(rt).await;

    let rt = node.runtime();
    assert_eq!(rt.state::<Tally>("hot").await.unwrap(), (expected, n));
    shutdown(rt).await;
}

/// E8: a command id already processed is not applied again: the retry gets the original
/// outcome (sequences, or the original rejection even if the command would now succeed), also
/// after a restart and when the duplicates race each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_command_id_is_applied_once_even_after_a_restart() {
    let node = Node::new();
    let rt = node.runtime();
    let with_id = |id| CommandOptions::new().command_id(id);
    rt.send::<Account>("dan", open("Dan")).await.unwrap();

    let deposit_id = Uuid::now_v7();
    let deposit = AccountCommand::Deposit { amount: 100 };
    let first = rt
        .send_with::<Account>("dan", deposit.clone(), with_id(deposit_id))
        .await
        .unwrap();
    assert!(!first.deduplicated);
    assert_eq!(single_sequence(&first), 2);
    let retry = rt
        .send_with::<Account>("dan", deposit.clone(), with_id(deposit_id))
        .await
        .unwrap();
    assert!(retry.deduplicated);
    assert!(retry.events.is_empty());
    assert_eq!((retry.first_sequence, retry.last_sequence), (2, 2));

    let withdraw_id = Uuid::now_v7();
    let withdraw = AccountCommand::Withdraw { amount: 500 };
    let original = AccountError::InsufficientFunds {
        balance: 100,
        requested: 500,
    };
    assert_eq!(
        rejection(
            rt.send_with::<Account>("dan", withdraw.clone(), with_id(withdraw_id))
                .await
        ),
        original
    );
    // Now the withdrawal would succeed, but its retry gets the original rejection.
    rt.send::<Account>("dan", AccountCommand::Deposit { amount: 1_000 })
        .await
        .unwrap();
    assert_eq!(
        rejection(
            rt.send_with::<Account>("dan", withdraw.clone(), with_id(withdraw_id))
                .await
        ),
        original
    );

    // Duplicates racing each other: one applies, all report its sequence.
    let race_id = Uuid::now_v7();
    let racers: Vec<_> = (0..20)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move {
                rt.send_with::<Account>(
                    "dan",
                    AccountCommand::Deposit { amount: 7 },
                    CommandOptions::new().command_id(race_id),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut applied = 0;
    for racer in racers {
        let done = racer.await.unwrap();
        applied += usize::from(!done.deduplicated);
        assert_eq!((done.first_sequence, done.last_sequence), (4, 4));
    }
    assert_eq!(applied, 1, "exactly one of the racing duplicates applied");
    let (account, version) = rt.state::<Account>("dan").await.unwrap();
    assert_eq!((account.balance, version), (1_107, 4));
    shutdown(rt).await;

    // After a restart the records come back from the store.
    let rt = node.runtime();
    let retry = rt
        .send_with::<Account>("dan", deposit, with_id(deposit_id))
        .await
        .unwrap();
    assert!(retry.deduplicated);
    assert_eq!((retry.first_sequence, retry.last_sequence), (2, 2));
    assert_eq!(
        rejection(
            rt.send_with::<Account>("dan", withdraw, with_id(withdraw_id))
                .await
        ),
        original
    );
    let retry = rt
        .send_with::<Account>(
            "dan",
            AccountCommand::Deposit { amount: 7 },
            with_id(race_id),
        )
        .await
        .unwrap();
    assert!(retry.deduplicated);
    let store = rt.store();
    assert_eq!(stored::<Account>(&*store, "dan").await.highest_sequence, 4);
    let (account, version) = rt.state::<Account>("dan").await.unwrap();
    assert_eq!((account.balance, version), (1_107, 4));
    // The stored events carry their command ids.
    let slice = stored::<Account>(&*store, "dan").await;
    assert_eq!(slice.events[1].causation.command_id, Some(deposit_id));
    assert_eq!(slice.events[3].causation.command_id, Some(race_id));
    shutdown(rt).await;
}

/// E8, bounded: the runtime remembers the newest `dedup_window` command ids per aggregate (in
/// the store, so also across restarts); older ones are forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedup_window_is_bounded_and_survives_a_restart() {
    let node = Node::new();
    let window_3 = |c: &mut incarnate::Config| c.aggregates.default.dedup_window = 3;
    let rt = node.runtime_with(window_3);
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    for (v, id) in (1..).zip(&ids) {
        rt.send_with::<Tally>(
            "d",
            TallyCommand::Add(v),
            CommandOptions::new().command_id(*id),
        )
        .await
        .unwrap();
    }
    let records = rt
        .store()
        .command_records(&stream_of::<Tally>("d"))
        .await
        .unwrap();
    assert_eq!(
        records.iter().map(|r| r.command_id).collect::<Vec<_>>(),
        ids[2..].to_vec(),
        "the store keeps the newest 3"
    );
    shutdown(rt).await;

    let rt = node.runtime_with(window_3);
    let kept = rt
        .send_with::<Tally>(
            "d",
            TallyCommand::Add(5),
            CommandOptions::new().command_id(ids[4]),
        )
        .await
        .unwrap();
    assert!(kept.deduplicated);
    assert_eq!(kept.first_sequence, 5);
    let forgotten = rt
        .send_with::<Tally>(
            "d",
            TallyCommand::Add(1),
            CommandOptions::new().command_id(ids[0]),
        )
        .await
        .unwrap();
    assert!(!forgotten.deduplicated, "outside the window: applied again");
    assert_eq!(single_sequence(&forgotten), 6);
    assert_eq!(
        rt.state::<Tally>("d").await.unwrap(),
        (Tally::of([1, 2, 3, 4, 5, 1]), 6)
    );
    shutdown(rt).await;
}

/// Work queued behind a batch that needs no write (here a rejection without a command id) is
/// decided right after that batch is answered, not left waiting for the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queued_behind_a_batch_without_a_write_is_not_stranded() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime();
    rt.send::<Tally>("z", TallyCommand::Add(1)).await.unwrap();
    faults.appends.hold();
    let entered = faults.appends.entered();
    let held = tokio::spawn({
        let rt = rt.clone();
        async move { rt.send::<Tally>("z", TallyCommand::Add(2)).await }
    });
    faults.appends.wait_entered(entered + 1).await;
    let rejected = started(rt.send::<Tally>("z", TallyCommand::Add(0))).await;
    let read = started(rt.state::<Tally>("z")).await;
    faults.appends.release();
    assert_eq!(single_sequence(&held.await.unwrap().unwrap()), 2);
    assert_eq!(rejection(rejected.await), TallyError::Zero);
    let (state, version) = crate::support::within("the read queued behind the rejection", read)
        .await
        .unwrap();
    assert_eq!((state, version), (Tally::of([1, 2]), 2));
    shutdown(rt).await;
}
