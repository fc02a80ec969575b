//! Sagas across crashes and stuck calls, on sled:
//! - G2: a shutdown with transfers in flight; after the restart each ends exactly once.
//! - G3: a command that took effect before its outcome was recorded is re-sent after the restart
//!   under the same id and deduplicated: one effect.
//! - C1: a command whose target never replies comes back to the saga as `Failed`, naming the
//!   target, while the saga keeps serving other instances.
//! - The headline: a child process running the bank is SIGKILLed mid-way through many
//!   transfers (some compensated), three rounds on one database; after each in-process restart
//!   every transfer ended once, no command applied twice, money conserved.
//!
//! The child is this test binary run again on the ignored test [`saga_crash_child`] with the
//! database path in [`CHILD_ENV`] (the pattern of `store_crash`).

use std::collections::BTreeSet;
use std::path::Path;

use incarnate::{Aggregate, EventStore, Runtime, SagaError, StreamId};
use incarnate_actors::account::{Account, AccountCommand, AccountEvent};
use incarnate_actors::balances::{AccountBalances, BALANCES};
use incarnate_actors::transfer::{Transfer, TransferEvent, TransferSaga};

use crate::crash_child::{child_env, emit, seed, CrashChild, Rng};
use crate::saga_support::{
    assert_command_ids_unique, assert_transfer_saga_matches_its_checkpoint, audit_bank, bank,
    count_events, idle, open_bank, outbox, probe, probe_stream, probes, request, saga_config,
    shutdown, shutdown_then, stream_events, wait_for_events, whole_log, ProbeCommand, ProbeEvent,
    ProbeSaga, SagaNode, WAIT,
};

fn account(id: &str) -> StreamId {
    StreamId::new(Account::TYPE, id)
}

/// The transfers of the log that have not ended (only their request is stored).
async fn unfinished_transfers(store: &dyn EventStore) -> Vec<String> {
    let mut events: std::collections::BTreeMap<String, usize> = Default::default();
    for e in whole_log(store).await {
        if *e.stream.aggregate_type == *Transfer::TYPE {
            *events.entry(e.stream.aggregate_id.to_string()).or_default() += 1;
        }
    }
    events
        .into_iter()
        .filter(|(_, n)| *n == 1)
        .map(|(id, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_transfers_in_flight_resumes_them_and_ends_each_once() {
    let node = SagaNode::new();
    let (builder, faults) = node.faulty_builder(Account::TYPE, |_| {});
    let rt = bank(builder).build().unwrap();
    let accounts = ["a", "b", "c", "d"];
    open_bank(&rt, &accounts.map(|a| (a, 10_000)), &["z"]).await;

    // Every account append waits at the gate: withdrawals pile up in flight.
    faults.appends.hold();
    for i in 0..12 {
        let (from, to) = (accounts[i % 4], accounts[(i + 1) % 4]);
        request(&rt, &format!("ring-{i:02}"), from, to, 100 + i as u64).await;
    }
    request(&rt, "refund-1", "a", "z", 500).await;
    request(&rt, "refund-2", "c", "z", 700).await;
    request(&rt, "broke", "b", "c", 1_000_000).await;
    faults.appends.wait_entered(1).await;
    // The shutdown begins (no new command is accepted, the saga stops), then the held appends
    // complete as the accounts drain their mailboxes: effects whose outcomes the saga never
    // hears of.
    shutdown_then(rt, || faults.appends.release()).await;

    let store = node.open_store();
    let unfinished = unfinished_transfers(&store).await;
    assert!(
        unfinished.iter().any(|t| t.starts_with("ring-")),
        "the held transfers cannot have ended: {unfinished:?}"
    );
    assert!(!outbox(&store, TransferSaga::NAME).await.is_empty());
    assert_transfer_saga_matches_its_checkpoint(&store, "at the shutdown").await;
    store.close().await.unwrap();

    let rt = bank(node.builder(|_| {})).build().unwrap();
    idle(&rt, TransferSaga::NAME).await;
    let audit = audit_bank(&*rt.store(), 40_000, "after the restart").await;
    assert_eq!(
        (
            audit.ended.len(),
            audit.completed,
            audit.refunded,
            audit.rejected
        ),
        (15, 12, 2, 1)
    );
    shutdown(rt).await;
}

/// G2: an input's commit (instance state, outbox, checkpoint) is all or nothing. The commit of
/// a transfer's start fails, as if the process died there: afterwards the store holds neither
/// an instance nor a checkpoint past the event, nothing was sent, and the restart handles the
/// event again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_whose_commit_failed_leaves_neither_state_nor_position_and_is_handled_again() {
    let node = SagaNode::new();
    let (builder, faults) = node.faulty_builder(Account::TYPE, |_| {});
    let rt = bank(builder).build().unwrap();
    open_bank(&rt, &[("a", 1_000), ("b", 0)], &[]).await;

    faults.refuse_saga_commits(true);
    request(&rt, "t1", "a", "b", 250).await;
    faults.wait_refused(1).await;
    shutdown(rt).await;

    let store = node.open_store();
    let requested_at =
        stream_events(&store, &StreamId::new(Transfer::TYPE, "t1")).await[0].position;
    assert!(
        crate::saga_support::saga_checkpoint(&store, TransferSaga::NAME).await < requested_at,
        "the position moved past an input whose state was not stored"
    );
    assert!(crate::saga_support::instances(&store, TransferSaga::NAME)
        .await
        .is_empty());
    assert!(outbox(&store, TransferSaga::NAME).await.is_empty());
    assert_transfer_saga_matches_its_checkpoint(&store, "after the failed commit").await;
    let a = stream_events(&store, &account("a")).await;
    assert_eq!(
        count_events(&a, AccountEvent::WITHDRAWN),
        0,
        "sent before its commit"
    );
    store.close().await.unwrap();

    let rt = bank(node.builder(|_| {})).build().unwrap();
    idle(&rt, TransferSaga::NAME).await;
    let audit = audit_bank(&*rt.store(), 1_000, "after the restart").await;
    assert_eq!(audit.completed, 1);
    assert_eq!(audit.balances["a"], 750);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_applied_before_its_outcome_was_recorded_is_deduplicated_when_resent() {
    let node = SagaNode::new();
    let (builder, faults) = node.faulty_builder(Account::TYPE, |_| {});
    let rt = bank(builder).build().unwrap();
    open_bank(&rt, &[("a", 1_000), ("b", 0)], &[]).await;

    // The withdrawal takes effect, but the saga cannot record its outcome: as if the process
    // died between the two.
    faults.refuse_outcomes(true);
    request(&rt, "t1", "a", "b", 250).await;
    faults.wait_refused(1).await;
    shutdown(rt).await;

    let store = node.open_store();
    let pending = outbox(&store, TransferSaga::NAME).await;
    let withdrawals: Vec<_> = stream_events(&store, &account("a"))
        .await
        .into_iter()
        .filter(|e| e.event_type == AccountEvent::WITHDRAWN)
        .map(|e| e.causation.command_id)
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        withdrawals,
        [Some(pending[0])],
        "the withdrawal applied is the command still in the outbox"
    );
    store.close().await.unwrap();

    // The restart re-sends it under the same id: the account answers from its record.
    let rt = bank(node.builder(|_| {})).build().unwrap();
    idle(&rt, TransferSaga::NAME).await;
    let store = rt.store();
    let audit = audit_bank(&*store, 1_000, "after the re-send").await;
    assert_eq!(audit.completed, 1);
    assert_eq!(audit.balances["a"], 750, "debited once");
    assert_eq!(audit.balances["b"], 250);
    let events = stream_events(&*store, &account("a")).await;
    assert_eq!(count_events(&events, AccountEvent::WITHDRAWN), 1);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_target_never_replies_comes_back_failed_naming_the_target() {
    let node = SagaNode::new();
    let (builder, faults) =
        node.faulty_builder(Account::TYPE, |c| c.runtime.command_timeout_ms = 200);
    let rt = probes(builder).build().unwrap();
    rt.send::<Account>("x", AccountCommand::Open { owner: "x".into() })
        .await
        .unwrap();
    let store = rt.store();

    // The deposit the saga sends to x never gets past x's append.
    faults.appends.hold();
    probe(&rt, "p", ProbeCommand::Start).await;
    let poke = ProbeCommand::Poke {
        account: "x".into(),
    };
    probe(&rt, "p", poke).await;
    faults.appends.wait_entered(1).await;

    // The saga is not stuck behind the call: another instance runs to its end meanwhile.
    probe(&rt, "q", ProbeCommand::Start).await;
    probe(&rt, "q", ProbeCommand::Finish).await;
    wait_for_events(&store, &probe_stream("q"), ProbeEvent::REPORTED, 1).await;
    let p = stream_events(&*store, &probe_stream("p")).await;
    assert_eq!(
        count_events(&p, ProbeEvent::RECORDED),
        0,
        "the call's outcome came back before the other instance ran"
    );

    // After the runtime's retries (same command id), the saga hears of the failure.
    wait_for_events(&store, &probe_stream("p"), ProbeEvent::RECORDED, 1).await;
    let recorded: Vec<ProbeEvent> = stream_events(&*store, &probe_stream("p"))
        .await
        .iter()
        .filter(|e| e.event_type == ProbeEvent::RECORDED)
        .map(|e| e.decode_event().unwrap())
        .collect();
    let [ProbeEvent::Recorded { text }] = recorded.as_slice() else {
        panic!("one outcome expected: {recorded:?}");
    };
    assert!(
        text.starts_with("failed: ") && text.contains("no reply from account/x within 200ms"),
        "{text}"
    );
    assert_eq!(
        faults.appends.entered(),
        1,
        "the held append is still the only one"
    );

    // Released, the held deposit completes; the retries queued behind it are duplicates.
    faults.appends.release();
    wait_for_events(&store, &account("x"), AccountEvent::DEPOSITED, 1).await;
    // `wait_for_saga_idle` waits one command timeout (200 ms here) at a time.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match rt.wait_for_saga_idle(ProbeSaga::NAME).await {
            Ok(()) => break,
            Err(SagaError::Timeout { .. }) if std::time::Instant::now() < deadline => {}
            Err(e) => panic!("the probe saga did not become idle: {e}"),
        }
    }
    shutdown(rt).await;
    let store = node.open_store();
    let x = stream_events(&store, &account("x")).await;
    assert_eq!(
        count_events(&x, AccountEvent::DEPOSITED),
        1,
        "deposited once"
    );
    assert_command_ids_unique(&whole_log(&store).await, "stuck call");
    store.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// SIGKILL in the middle of transfers
// ---------------------------------------------------------------------------------------------

/// Carries the database path to the child; the child test does nothing without it.
const CHILD_ENV: &str = "INCARNATE_SAGA_CRASH_CHILD";
const ROUND_ENV: &str = "INCARNATE_SAGA_CRASH_ROUND";
const SEED_ENV: &str = "INCARNATE_SAGA_CRASH_SEED";
const CHILD_TEST: &str = "saga_crash::saga_crash_child";
const ROUNDS: u64 = 3;
const ACCOUNTS: [&str; 4] = ["acct-0", "acct-1", "acct-2", "acct-3"];
/// Closed at the start: every transfer to it is refunded.
const CLOSED: &str = "closed";
const OPENING: u64 = 10_000;
/// Transfers a child requests if it is not killed first (it always is: see `kill_after`).
const TRANSFERS_PER_ROUND: u64 = 60;

/// Transfer `i` of a round: mostly between the open accounts, some to the closed one
/// (compensated by a refund), some for more than any balance (rejected).
fn plan(rng: &mut Rng, i: u64) -> (&'static str, &'static str, u64) {
    let from = ACCOUNTS[(rng.next() % 4) as usize];
    let to = ACCOUNTS[(rng.next() % 4) as usize];
    let to = if to == from {
        ACCOUNTS[(ACCOUNTS.iter().position(|a| *a == from).unwrap_or(0) + 1) % 4]
    } else {
        to
    };
    match i % 7 {
        3 => (from, CLOSED, 1 + rng.next() % 2_000),
        5 => (from, to, 1_000_000),
        _ => (from, to, 1 + rng.next() % 2_000),
    }
}

#[test]
fn sigkill_during_transfers_then_restart_ends_every_transfer_once_with_money_conserved() {
    let seed = seed(SEED_ENV);
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut requested = BTreeSet::new();
    let mut interrupted = 0;
    let mut totals = (0, 0, 0);

    for round in 0..ROUNDS {
        // Killed once this many transfers have ended in the child: the saga is then mid-way.
        let kill_after = 5 + rng.next() % 31;
        let context = format!("seed {seed}, round {round}, kill after {kill_after} ends");
        let child = CrashChild::spawn(
            CHILD_TEST,
            [
                (CHILD_ENV, path.clone().into_os_string()),
                (ROUND_ENV, round.to_string().into()),
                (SEED_ENV, seed.to_string().into()),
            ],
        );
        let mut ends = 0;
        // Every acknowledged request was stored before its line was printed.
        let end = child.run(|line| {
            if let Some(id) = line.strip_prefix("REQ ") {
                requested.insert(id.to_owned());
            } else if line.starts_with("END ") {
                ends += 1;
                return ends == kill_after;
            }
            false
        });
        end.assert_killed(&context, &format!("{ends} ends"));

        runtime.block_on(async {
            // What the kill interrupted.
            let store = crate::support::open_sled(&path);
            let unfinished = unfinished_transfers(&store).await;
            interrupted += unfinished.len();
            assert_transfer_saga_matches_its_checkpoint(&store, &context).await;
            // Commands that took effect but whose outcome the saga had not recorded: the
            // restart re-sends them, and the audit below proves each was deduplicated.
            let applied: BTreeSet<_> = whole_log(&store)
                .await
                .iter()
                .filter_map(|e| e.causation.command_id)
                .collect();
            let resent_applied = outbox(&store, TransferSaga::NAME)
                .await
                .iter()
                .filter(|id| applied.contains(id))
                .count();
            store.close().await.unwrap();

            // Restart in-process on the same data; the saga resumes and finishes.
            let rt = bank(Runtime::builder().config(saga_config(&path, |_| {})))
                .build()
                .unwrap();
            idle(&rt, TransferSaga::NAME).await;
            let store = rt.store();
            let audit = audit_bank(&*store, OPENING * ACCOUNTS.len() as u64, &context).await;
            for id in &requested {
                assert!(
                    audit.ended.contains_key(id),
                    "{context}: acknowledged transfer {id} never ended"
                );
            }
            // The read model, projected across the crash, agrees with the log.
            rt.wait_for_projection(AccountBalances::NAME, store.head())
                .await
                .unwrap();
            let rows: Vec<(String, u64)> = BALANCES
                .all(&*store)
                .await
                .unwrap()
                .into_iter()
                .map(|(id, row)| (id, row.balance))
                .collect();
            assert_eq!(
                rows,
                audit.balances.clone().into_iter().collect::<Vec<_>>(),
                "{context}"
            );
            println!(
                "{context}: {} transfers interrupted, {resent_applied} applied commands \
                 unanswered; {} transfers: {} completed, {} refunded, {} rejected",
                unfinished.len(),
                audit.ended.len(),
                audit.completed,
                audit.refunded,
                audit.rejected
            );
            totals = (audit.completed, audit.refunded, audit.rejected);
            rt.shutdown().await.unwrap();
        });
    }
    assert!(
        interrupted > 0,
        "seed {seed}: no kill interrupted a transfer, so no recovery was tested"
    );
    assert!(
        totals.0 > 0 && totals.1 > 0 && totals.2 > 0,
        "seed {seed}: every kind of end expected: {totals:?}"
    );
}

/// The crashing child: sets up the bank (first round), then requests transfers one after the
/// other, printing `REQ <id>` once each is stored and `END <id>` once each has ended, until
/// killed. Run only by the test above,
/// which names it exactly and sets [`CHILD_ENV`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the saga crash test in a child process"]
async fn saga_crash_child() {
    let Some(path) = child_env(CHILD_ENV) else {
        return;
    };
    let var = |name: &str| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (round, seed) = (var(ROUND_ENV), var(SEED_ENV));
    let rt = bank(Runtime::builder().config(saga_config(Path::new(&path), |_| {})))
        .build()
        .unwrap();
    if round == 0 {
        open_bank(&rt, &ACCOUNTS.map(|a| (a, OPENING)), &[CLOSED]).await;
    }
    // Follows the log from here and prints `END <id>` for each transfer that ends.
    let store = rt.store();
    let mut next = store.head() + 1;
    tokio::spawn(async move {
        let mut head = store.watch_head();
        loop {
            head.borrow_and_update();
            let Ok(events) = store.read_log(next, 1024).await else {
                return;
            };
            for e in &events {
                next = e.position + 1;
                if *e.stream.aggregate_type == *Transfer::TYPE
                    && [TransferEvent::COMPLETED, TransferEvent::FAILED]
                        .contains(&e.event_type.as_str())
                {
                    println!("END {}", e.stream.aggregate_id);
                }
            }
            if events.is_empty() && head.changed().await.is_err() {
                return;
            }
        }
    });
    let mut rng = Rng(seed ^ (round + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for i in 0..TRANSFERS_PER_ROUND {
        let id = format!("r{round}-{i:03}");
        let (from, to, amount) = plan(&mut rng, i);
        request(&rt, &id, from, to, amount).await;
        emit(format_args!("REQ {id}"));
    }
    idle(&rt, TransferSaga::NAME).await;
    println!("DONE");
    rt.shutdown().await.unwrap();
}
