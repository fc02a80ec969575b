//! Q1–Q4 on the sled store: projectors resume from their checkpoint after a restart, the two
//! delivery guarantees behave as documented (`Delivery`), concurrent writers never make a
//! projector miss, repeat or reorder a position, and the live tail is read-your-writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use incarnate::{
    AppendRequest, Delivery, EventFilter, EventStore, ProjectorOptions, Runtime, RuntimeBuilder,
};
use incarnate_actors::account::{Account, AccountCommand, AccountEvent};
use incarnate_actors::balances::{statement, AccountBalances, BALANCES};
use tokio::sync::Notify;

use crate::projection_support::{
    assert_account_tables_match_log, builder, committed_checkpoint, counts, once, probe_commit,
    sled_config, temp_db, Probe, TestStore,
};
use crate::support::{account, append_n, events_for};

async fn open(rt: &Runtime, id: &str) -> u64 {
    let done = rt
        .send::<Account>(
            id,
            AccountCommand::Open {
                owner: id.to_uppercase(),
            },
        )
        .await
        .unwrap();
    done.events.last().unwrap().position
}

async fn deposit(rt: &Runtime, id: &str, amount: u64) -> u64 {
    let done = rt
        .send::<Account>(id, AccountCommand::Deposit { amount })
        .await
        .unwrap();
    done.events.last().unwrap().position
}

/// Q1: a projector picks up at its committed checkpoint after a restart: nothing handled before
/// the restart is handled again, nothing after it is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q1_projector_resumes_from_its_checkpoint_after_restart() {
    let (_dir, path) = temp_db();
    let probe = Probe::new("q1", "q1_seen");
    let first = probe.log();
    let rt = builder(&path)
        .projector(probe)
        .projector(AccountBalances)
        .build()
        .unwrap();
    for id in ["a", "b", "c"] {
        open(&rt, id).await;
        for amount in 1..=5 {
            deposit(&rt, id, amount * 100).await;
        }
    }
    let head = rt.store().head();
    assert_eq!(head, 18);
    rt.wait_for_projection("q1", head).await.unwrap();
    rt.wait_for_projection(AccountBalances::NAME, head)
        .await
        .unwrap();
    assert_eq!(first.handled(), (1..=18).collect::<Vec<_>>());
    let s = rt.projection_status("q1").unwrap();
    assert_eq!(
        (s.checkpoint, s.processed, s.handled, s.lag),
        (18, 18, 18, 0)
    );
    rt.shutdown().await.unwrap();

    let probe = Probe::new("q1", "q1_seen");
    let second = probe.log();
    let rt = builder(&path)
        .projector(probe)
        .projector(AccountBalances)
        .build()
        .unwrap();
    let store = rt.store();
    // The restarted projector reaches the old head without handling anything.
    rt.wait_for_projection("q1", head).await.unwrap();
    assert_eq!(second.handled(), Vec::<u64>::new());
    let mut last = 0;
    for id in ["a", "b", "c"] {
        for amount in [7, 11] {
            last = deposit(&rt, id, amount).await;
        }
    }
    assert_eq!(last, 24);
    rt.wait_for_projection("q1", last).await.unwrap();
    rt.wait_for_projection(AccountBalances::NAME, last)
        .await
        .unwrap();
    // Only the new events, each once; the first thing the new instance saw was checkpoint 18.
    assert_eq!(second.handled(), (19..=24).collect::<Vec<_>>());
    assert_eq!(second.attempts()[0].checkpoint, 18);
    assert_eq!(counts(&*store, "q1_seen").await, once(1..=24));
    let s = rt.projection_status("q1").unwrap();
    assert_eq!((s.checkpoint, s.processed, s.handled), (24, 24, 6));
    assert_eq!(committed_checkpoint(&*store, "q1").await, 24);
    assert_account_tables_match_log(&*store, "after restart").await;
    rt.shutdown().await.unwrap();
}

/// Q2: with `ExactlyOnce` the read-model writes and the checkpoint commit together, so a crash
/// repeats nothing; with `AtLeastOnce` the checkpoint lags the committed writes, so the events
/// since the last checkpoint are handled again after a crash (and none is skipped).
///
/// The crash is simulated deterministically: the store refuses every write from a chosen moment
/// (nothing more gets in, like a killed process), then closes for real and a new runtime opens
/// the same directory. The real SIGKILL version is in `projection_crash`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q2_at_least_once_redelivers_after_a_crash_exactly_once_does_not() {
    let (_dir, path) = temp_db();
    // 40 events in the log before any projector runs, so the batches are [1-4], [5-8], ...
    let rt = builder(&path).build().unwrap();
    let writers: Vec<_> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|id| {
            let rt = rt.clone();
            tokio::spawn(async move {
                open(&rt, id).await;
                for amount in 1..=9 {
                    deposit(&rt, id, amount).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(rt.store().head(), 40);
    rt.shutdown().await.unwrap();

    let exact_options = ProjectorOptions {
        delivery: Delivery::ExactlyOnce,
        batch_size: 4,
        ..ProjectorOptions::default()
    };
    let at_least_options = ProjectorOptions {
        delivery: Delivery::AtLeastOnce {
            every_events: 8,
            every_ms: 600_000,
        },
        batch_size: 4,
        ..ProjectorOptions::default()
    };
    let exact = Probe::new("q2_exact", "q2_exact_seen");
    let at_least = Probe::new("q2_at_least", "q2_at_least_seen");
    let gate = at_least.gate();
    // Hold the at-least-once projector inside the batch [29-32].
    gate.arm(30);
    let (store, hooks) = TestStore::open(&path);
    let rt = RuntimeBuilder::new()
        .config(sled_config(&path))
        .store(store)
        .register::<Account>()
        .projector_with(exact, exact_options)
        .projector_with(at_least, at_least_options)
        .build()
        .unwrap();
    let store = rt.store();
    rt.wait_for_projection("q2_exact", 40).await.unwrap();
    rt.wait_for_projection("q2_at_least", 28).await.unwrap();
    gate.entered().await;
    let s = rt.projection_status("q2_exact").unwrap();
    assert_eq!((s.checkpoint, s.processed), (40, 40), "{s:?}");
    assert_eq!(committed_checkpoint(&*store, "q2_exact").await, 40);
    // At least once: the writes of [25-28] are committed, the checkpoint (every 8 events) is 24.
    let s = rt.projection_status("q2_at_least").unwrap();
    assert_eq!((s.checkpoint, s.processed), (24, 28), "{s:?}");
    assert_eq!(committed_checkpoint(&*store, "q2_at_least").await, 24);
    assert_eq!(counts(&*store, "q2_at_least_seen").await, once(1..=28));

    // What each commit held: exactly once, every batch's read-model writes went in one commit
    // with the checkpoint of its last event; at least once, most batches went without one.
    let batches = |table, name| -> Vec<(Option<u64>, Option<u64>)> {
        hooks
            .commits()
            .iter()
            .map(|c| probe_commit(c, table, name))
            .filter(|(last, _)| last.is_some())
            .collect()
    };
    let exact_batches = batches("q2_exact_seen", "q2_exact");
    assert_eq!(exact_batches.len(), 10, "{exact_batches:?}");
    for (last, checkpoint) in exact_batches {
        assert_eq!(last, checkpoint);
    }
    let at_least_batches = batches("q2_at_least_seen", "q2_at_least");
    let expected: Vec<_> = (1..=7u64)
        .map(|b| (Some(4 * b), (b % 2 == 0).then_some(4 * b)))
        .collect();
    assert_eq!(at_least_batches, expected);

    hooks.crash();
    gate.open();
    rt.shutdown().await.unwrap();
    drop(store);

    let exact = Probe::new("q2_exact", "q2_exact_seen");
    let exact_log = exact.log();
    let at_least = Probe::new("q2_at_least", "q2_at_least_seen");
    let at_least_log = at_least.log();
    let rt = builder(&path)
        .projector_with(exact, exact_options)
        .projector_with(at_least, at_least_options)
        .build()
        .unwrap();
    let store = rt.store();
    rt.wait_for_projection("q2_exact", 40).await.unwrap();
    rt.wait_for_projection("q2_at_least", 40).await.unwrap();
    // Exactly once: nothing handled again, every position counted once.
    assert_eq!(exact_log.handled(), Vec::<u64>::new());
    assert_eq!(counts(&*store, "q2_exact_seen").await, once(1..=40));
    // At least once: everything after the checkpoint again; [25-28] now counted twice.
    assert_eq!(at_least_log.handled(), (25..=40).collect::<Vec<_>>());
    let mut expected = once(1..=40);
    for p in 25..=28 {
        expected.insert(p, 2);
    }
    assert_eq!(counts(&*store, "q2_at_least_seen").await, expected);
    // The batches [29-32] and [37-40] each end 8 events after the previous checkpoint.
    let s = rt.projection_status("q2_at_least").unwrap();
    assert_eq!(s.checkpoint, 40, "{s:?}");
    rt.shutdown().await.unwrap();
}

/// Q3 and the field's classic bug: 16 tasks write to 16 aggregates at once while projectors
/// tail the log. The projector sees every global position exactly once, in strictly increasing
/// order; its checkpoint (published or committed) never passes an event it has not handled;
/// a filtered projector gets exactly the matching events and still advances past the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q3_concurrent_writers_every_position_once_in_order_and_checkpoint_never_ahead() {
    const WRITERS: usize = 16;
    const OPS: u64 = 15;
    let (_dir, path) = temp_db();
    let all = Probe::new("q3_all", "q3_all_seen");
    let all_log = all.log();
    let deposits = Probe::new("q3_deposits", "q3_deposits_seen")
        .filter(EventFilter::all().event(AccountEvent::DEPOSITED));
    let deposits_log = deposits.log();
    let rt = builder(&path)
        .projector_with(
            all,
            ProjectorOptions {
                batch_size: 8,
                ..ProjectorOptions::default()
            },
        )
        .projector(deposits)
        .build()
        .unwrap();
    let store = rt.store();

    // Looks at the projector every time the head moves, while the writers run.
    let stop = Arc::new(Notify::new());
    let done = Arc::new(AtomicBool::new(false));
    let observer = tokio::spawn({
        let (rt, store, log, stop, done) = (
            rt.clone(),
            store.clone(),
            all_log.clone(),
            stop.clone(),
            done.clone(),
        );
        async move {
            let mut head = store.watch_head();
            let mut observations = 0u64;
            loop {
                let finished = done.load(Ordering::SeqCst);
                // Status and commit first, then what was handled: anything published or
                // committed before must already be handled.
                let s = rt.projection_status("q3_all").unwrap();
                let committed = committed_checkpoint(&*store, "q3_all").await;
                let handled = log.last_handled();
                assert!(s.checkpoint <= handled, "{s:?} but handled {handled}");
                assert!(s.processed <= handled, "{s:?} but handled {handled}");
                assert!(
                    committed <= handled,
                    "committed {committed}, handled {handled}"
                );
                assert!(
                    s.checkpoint <= s.processed && s.processed <= s.head,
                    "{s:?}"
                );
                observations += 1;
                if finished {
                    break observations;
                }
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { break observations },
                    () = stop.notified() => {}
                }
            }
        }
    });

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let rt = rt.clone();
            tokio::spawn(async move {
                let id = format!("w{w}");
                open(&rt, &id).await;
                for k in 0..OPS {
                    let command = if k % 4 == 3 {
                        AccountCommand::Withdraw { amount: 1 }
                    } else {
                        AccountCommand::Deposit {
                            amount: (w as u64 * 7 + k) % 50 + 1,
                        }
                    };
                    rt.send::<Account>(id.as_str(), command).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let head = store.head();
    assert_eq!(head, WRITERS as u64 * (OPS + 1));
    rt.wait_for_projection("q3_all", head).await.unwrap();
    rt.wait_for_projection("q3_deposits", head).await.unwrap();
    done.store(true, Ordering::SeqCst);
    stop.notify_one();
    let observations = observer.await.unwrap();
    assert!(observations > 0);

    // Every position, once, in strictly increasing order.
    assert_eq!(all_log.handled(), (1..=head).collect::<Vec<_>>());
    assert_eq!(counts(&*store, "q3_all_seen").await, once(1..=head));
    let attempts = all_log.attempts();
    assert_eq!(attempts.len() as u64, head);
    for a in &attempts {
        assert!(
            a.checkpoint < a.position,
            "checkpoint {} committed before handling {}",
            a.checkpoint,
            a.position
        );
    }
    let s = rt.projection_status("q3_all").unwrap();
    assert_eq!(
        (s.checkpoint, s.processed, s.handled, s.lag),
        (head, head, head, 0)
    );

    // The filtered projector: exactly the deposits, in log order; it still reaches the head.
    let log = store.read_log(1, usize::MAX).await.unwrap();
    let deposit_positions: Vec<u64> = log
        .iter()
        .filter(|e| e.event_type == AccountEvent::DEPOSITED)
        .map(|e| e.position)
        .collect();
    assert!(deposit_positions.len() < log.len());
    assert_eq!(deposits_log.handled(), deposit_positions);
    assert_eq!(
        counts(&*store, "q3_deposits_seen").await,
        once(deposit_positions.iter().copied())
    );
    let s = rt.projection_status("q3_deposits").unwrap();
    assert_eq!(
        (s.checkpoint, s.processed, s.handled),
        (head, head, deposit_positions.len() as u64)
    );
    rt.shutdown().await.unwrap();
}

/// Q3 where positions were deleted: when a projector finds only deleted positions up to the
/// head, an event committed right after that read must still be handled, not jumped over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q3_a_commit_right_after_a_read_of_deleted_positions_is_not_skipped() {
    let (_dir, path) = temp_db();
    let (store, hooks) = TestStore::open(&path);
    let old = account("old");
    append_n(&store, &old, 0, 3).await;
    store.delete_to(&old, 3).await.unwrap();
    let new = account("new");
    hooks.append_after_empty_read(AppendRequest::new(new.clone(), 0, events_for(&new, 1, 1)));
    let probe = Probe::new("q3_race", "q3_race_seen");
    let log = probe.log();
    let rt = RuntimeBuilder::new()
        .config(sled_config(&path))
        .store(store)
        .projector(probe)
        .build()
        .unwrap();
    rt.wait_for_projection("q3_race", 4).await.unwrap();
    assert_eq!(rt.store().head(), 4, "the racing append happened");
    assert_eq!(log.handled(), vec![4]);
    assert_eq!(counts(&*rt.store(), "q3_race_seen").await, once([4]));
    rt.shutdown().await.unwrap();
}

/// Q4: after catching up, each new command's events reach the read model promptly and in
/// order; waiting for the command's last position is enough to read one's own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q4_live_tail_is_read_your_writes() {
    let (_dir, path) = temp_db();
    let rt = builder(&path).projector(AccountBalances).build().unwrap();
    let store = rt.store();
    let mut balances = [0u64; 2];
    let ids = ["alice", "bob"];
    for id in ids {
        open(&rt, id).await;
    }
    balances[0] = 1_000;
    deposit(&rt, "alice", 1_000).await;
    rt.wait_for_projection(AccountBalances::NAME, store.head())
        .await
        .unwrap();
    assert_eq!(rt.projection_status(AccountBalances::NAME).unwrap().lag, 0);

    for i in 0..20u64 {
        let who = (i % 2) as usize;
        let id = ids[who];
        let command = if i % 3 == 2 && balances[who] >= 40 {
            balances[who] -= 40;
            AccountCommand::Withdraw { amount: 40 }
        } else {
            balances[who] += 10 + i;
            AccountCommand::Deposit { amount: 10 + i }
        };
        let done = rt.send::<Account>(id, command).await.unwrap();
        let last = done.events.last().unwrap();
        rt.wait_for_projection(AccountBalances::NAME, last.position)
            .await
            .unwrap();
        let row = BALANCES
            .load(&*store, &id.to_owned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.balance, balances[who], "step {i}");
        assert_eq!(row.version, done.version, "step {i}");
        let lines = statement(&*store, id).await.unwrap();
        assert_eq!(lines.len() as u64, done.version, "step {i}");
        let (sequence, line) = lines.last().unwrap();
        assert_eq!((*sequence, line.position), (last.sequence, last.position));
        assert_eq!(line.balance, balances[who]);
        let s = rt.projection_status(AccountBalances::NAME).unwrap();
        assert!(s.processed >= last.position, "{s:?}");
    }
    assert_account_tables_match_log(&*store, "live tail").await;
    rt.shutdown().await.unwrap();
}
