//! Sagas on the bank and on probes: one instance per start event (G1), compensation ending in a
//! documented terminal state with money conserved (G5), and each instance's events handled in
//! log order, also across a restart (G6). All on the sled store.

use futures::future::join_all;
use incarnate::{Aggregate, EventStore, ManualClock, Runtime, StreamId};
use incarnate_actors::account::{Account, AccountEvent};
use incarnate_actors::balances::{statement, AccountBalances, BALANCES};
use incarnate_actors::transfer::{Transfer, TransferEvent, TransferSaga, TransferStatus};

use crate::saga_support::{
    audit_bank, bank, idle, instances, open_bank, outbox, probe, probe_stream, probes, request,
    saga_table, shutdown, stream_events, wait_for_events, ProbeCommand, ProbeEvent, ProbeSaga,
    SagaNode,
};

fn account(id: &str) -> StreamId {
    StreamId::new(Account::TYPE, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_transfer_runs_as_one_instance_deleted_when_it_ends() {
    let node = SagaNode::new();
    let (builder, faults) = node.faulty_builder(Account::TYPE, |_| {});
    let rt = bank(builder).build().unwrap();
    let store = rt.store();
    open_bank(&rt, &[("a", 1_000), ("b", 0)], &[]).await;

    // Hold the withdrawal in its append: the instance is caught mid-flight.
    faults.appends.hold();
    request(&rt, "t1", "a", "b", 250).await;
    faults.appends.wait_entered(1).await;
    assert_eq!(instances(&*store, TransferSaga::NAME).await, ["t1"]);
    let in_flight = outbox(&*store, TransferSaga::NAME).await;
    assert_eq!(in_flight.len(), 1, "one command sent: the withdrawal");

    faults.appends.release();
    idle(&rt, TransferSaga::NAME).await;
    assert!(instances(&*store, TransferSaga::NAME).await.is_empty());
    assert!(saga_table(&*store, TransferSaga::NAME, "deadlines")
        .await
        .is_empty());
    let audit = audit_bank(&*store, 1_000, "one transfer").await;
    assert_eq!(audit.completed, 1);
    assert_eq!(
        audit.balances.into_iter().collect::<Vec<_>>(),
        [("a".to_owned(), 750), ("b".to_owned(), 250)]
    );
    // The withdrawal stored is the command that was in the outbox, under its id.
    let withdrawals: Vec<_> = stream_events(&*store, &account("a"))
        .await
        .into_iter()
        .filter(|e| e.event_type == AccountEvent::WITHDRAWN)
        .map(|e| e.causation.command_id)
        .collect();
    assert_eq!(withdrawals, [Some(in_flight[0])]);
    let (transfer, _) = rt.state::<Transfer>("t1").await.unwrap();
    assert_eq!(transfer.status, TransferStatus::Completed);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_requested_at_once_each_run_exactly_once() {
    let node = SagaNode::new();
    let rt = bank(node.builder(|_| {})).build().unwrap();
    let accounts = ["a", "b", "c", "d"];
    open_bank(&rt, &accounts.map(|a| (a, 10_000)), &[]).await;

    let requests = (0..40).map(|i| {
        let rt = rt.clone();
        async move {
            let from = accounts[i % 4];
            let to = accounts[(i + 1 + i / 4) % 4];
            let to = if to == from {
                accounts[(i + 2) % 4]
            } else {
                to
            };
            request(&rt, &format!("t{i:02}"), from, to, 10 + i as u64).await;
        }
    });
    join_all(requests).await;
    idle(&rt, TransferSaga::NAME).await;

    let audit = audit_bank(&*rt.store(), 40_000, "40 concurrent transfers").await;
    assert_eq!((audit.ended.len(), audit.completed), (40, 40));
    shutdown(rt).await;
}

/// A start event for an instance that exists continues it: one instance, whose state saw every
/// event, rather than a fresh one per start event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_events_delivered_twice_continue_one_instance() {
    let node = SagaNode::new();
    let rt = probes(node.builder(|_| {})).build().unwrap();
    join_all((0..4).map(|_| probe(&rt, "p", ProbeCommand::Start))).await;
    probe(&rt, "p", ProbeCommand::Note(1)).await;
    probe(&rt, "p", ProbeCommand::Start).await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(instances(&*rt.store(), ProbeSaga::NAME).await, ["p"]);

    probe(&rt, "p", ProbeCommand::Finish).await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(
        reports(&*rt.store(), "p").await,
        [(1..=7).collect::<Vec<u64>>()]
    );
    assert!(instances(&*rt.store(), ProbeSaga::NAME).await.is_empty());
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_deposit_is_refunded_and_ends_failed_with_money_conserved() {
    let node = SagaNode::new();
    let rt = bank(node.builder(|_| {})).build().unwrap();
    open_bank(&rt, &[("a", 1_000), ("b", 500)], &["z"]).await;
    request(&rt, "t-ok", "a", "b", 300).await;
    request(&rt, "t-refund", "a", "z", 200).await;
    request(&rt, "t-broke", "b", "a", 10_000).await;
    idle(&rt, TransferSaga::NAME).await;

    let store = rt.store();
    let audit = audit_bank(&*store, 1_500, "compensation").await;
    assert_eq!((audit.completed, audit.refunded, audit.rejected), (1, 1, 1));
    assert_eq!(
        audit.balances.clone().into_iter().collect::<Vec<_>>(),
        [
            ("a".to_owned(), 700),
            ("b".to_owned(), 800),
            ("z".to_owned(), 0)
        ]
    );
    // The documented terminal states, as the transfers themselves hold them.
    let status = |id: &'static str| {
        let rt = rt.clone();
        async move { rt.state::<Transfer>(id).await.unwrap().0.status }
    };
    assert_eq!(status("t-ok").await, TransferStatus::Completed);
    assert_eq!(
        status("t-refund").await,
        TransferStatus::Failed("deposit rejected; refunded".into())
    );
    match status("t-broke").await {
        TransferStatus::Failed(reason) => assert!(
            reason.starts_with("withdrawal rejected: insufficient funds"),
            "{reason}"
        ),
        other => panic!("t-broke ended as {other:?}"),
    }
    assert_eq!(
        audit.ended["t-refund"],
        TransferEvent::Failed {
            reason: "deposit rejected; refunded".into()
        }
    );

    // The read model shows the refund as a movement back to the source.
    rt.wait_for_projection(AccountBalances::NAME, store.head())
        .await
        .unwrap();
    let mut lines: Vec<(String, u64)> = statement(&*store, "a")
        .await
        .unwrap()
        .into_iter()
        .map(|(_, line)| (line.kind, line.amount))
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            ("deposit".to_owned(), 200),
            ("deposit".to_owned(), 1_000),
            ("opened".to_owned(), 0),
            ("withdrawal".to_owned(), 200),
            ("withdrawal".to_owned(), 300),
        ]
    );
    let rows: Vec<(String, u64)> = BALANCES
        .all(&*store)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, row)| (id, row.balance))
        .collect();
    assert_eq!(rows, audit.balances.into_iter().collect::<Vec<_>>());
    shutdown(rt).await;
}

/// The `seen` lists of probe `id`'s reports.
async fn reports(store: &dyn EventStore, id: &str) -> Vec<Vec<u64>> {
    stream_events(store, &probe_stream(id))
        .await
        .iter()
        .filter_map(|e| match e.decode_event::<ProbeEvent>().unwrap() {
            ProbeEvent::Reported { seen } => Some(seen),
            _ => None,
        })
        .collect()
}

const PROBES: usize = 6;
const NOTES: u64 = 20;

/// Sends notes `range` to every probe, one task per probe (so the log interleaves the probes),
/// with a poke of account `sink` among them (its outcome is an input between the events).
async fn notes(rt: &Runtime, range: std::ops::Range<u64>, poke_at: u64) {
    join_all((0..PROBES).map(|p| {
        let rt = rt.clone();
        let range = range.clone();
        async move {
            let id = format!("p{p}");
            for n in range {
                probe(&rt, &id, ProbeCommand::Note(n)).await;
                if n == poke_at {
                    let account = "sink".to_owned();
                    probe(&rt, &id, ProbeCommand::Poke { account }).await;
                }
            }
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_instance_are_handled_in_log_order_across_a_restart() {
    let node = SagaNode::new();
    // The deadline clock plays no part here; a manual one keeps the runs identical.
    let rt = probes(node.builder(|_| {}))
        .clock(ManualClock::new(0))
        .build()
        .unwrap();
    open_bank(&rt, &[("sink", 0)], &[]).await;
    join_all((0..PROBES).map(|p| {
        let rt = &rt;
        async move { probe(rt, &format!("p{p}"), ProbeCommand::Start).await }
    }))
    .await;
    notes(&rt, 0..NOTES / 2, 3).await;
    idle(&rt, ProbeSaga::NAME).await;
    shutdown(rt).await;

    let rt = probes(node.builder(|_| {}))
        .clock(ManualClock::new(0))
        .build()
        .unwrap();
    notes(&rt, NOTES / 2..NOTES, u64::MAX).await;
    join_all((0..PROBES).map(|p| {
        let rt = &rt;
        async move { probe(rt, &format!("p{p}"), ProbeCommand::Finish).await }
    }))
    .await;
    let store = rt.store();
    for p in 0..PROBES {
        wait_for_events(
            &store,
            &probe_stream(&format!("p{p}")),
            ProbeEvent::REPORTED,
            1,
        )
        .await;
    }
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(rt.saga_status(ProbeSaga::NAME).unwrap().stopped, None);

    for p in 0..PROBES {
        let id = format!("p{p}");
        let events = stream_events(&*store, &probe_stream(&id)).await;
        // Every event the saga correlates, in stream order: what it must have seen, in order.
        let expected: Vec<u64> = events
            .iter()
            .filter(|e| {
                ![ProbeEvent::RANG, ProbeEvent::RECORDED, ProbeEvent::REPORTED]
                    .contains(&e.event_type.as_str())
            })
            .map(|e| e.sequence)
            .collect();
        assert_eq!(expected.len() as u64, 1 + NOTES + 1 + 1, "{id}");
        assert_eq!(reports(&*store, &id).await, [expected], "{id}");
        let recorded: Vec<ProbeEvent> = events
            .iter()
            .filter(|e| e.event_type == ProbeEvent::RECORDED)
            .map(|e| e.decode_event().unwrap())
            .collect();
        assert_eq!(
            recorded,
            [ProbeEvent::Recorded {
                text: "accepted".into()
            }],
            "{id}"
        );
    }
    assert!(instances(&*store, ProbeSaga::NAME).await.is_empty());
    let (sink, _) = rt.state::<Account>("sink").await.unwrap();
    assert_eq!(
        sink.balance, PROBES as u64,
        "one poke per probe, each applied once"
    );
    shutdown(rt).await;
}
