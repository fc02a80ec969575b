//! Durable deadlines (G4) on a [`ManualClock`]: a deadline fires once when the clock reaches it
//! and not before; a cancelled one never fires, a moved one fires at its new time; a completed
//! instance's deadline is discarded; a deadline due while the process was down fires once after
//! the restart, also after a long downtime; and the order saga's payment deadline cancels the
//! order and releases its stock (G5).
//!
//! "Never fired" is checked against a sentinel: a deadline on another probe due after the one
//! under test. Deadlines fire in due order, so once the sentinel has rung (a signal: its event
//! in the store), a deadline that was going to fire wrongly has fired too.

use std::time::Duration;

use futures::future::join_all;
use incarnate::{
    Aggregate, AppendRequest, DomainEvent, EventStore, ManualClock, NewEvent, Runtime,
};
use incarnate_actors::order::{
    CancelReason, Inventory, InventoryCommand, Order, OrderCommand, OrderError, OrderEvent,
    OrderSaga, OrderStatus,
};

use crate::saga_support::{
    idle, instances, probe, probe_stream, probes, rang, saga_table, schedule, shutdown,
    start_with_deadline, wait_for_events, wait_rang, whole_log, ProbeCommand, ProbeEvent,
    ProbeSaga, SagaNode,
};

/// The manual clock's reading at the start of each test (ms since the epoch).
const T0: u64 = 1_700_000_000_000;
const MINUTE: u64 = 60_000;
const DAY: u64 = 24 * 60 * MINUTE;

fn probe_runtime(node: &SagaNode, clock: &ManualClock) -> Runtime {
    probes(node.builder(|_| {}))
        .clock(clock.clone())
        .build()
        .unwrap()
}

async fn deadlines(rt: &Runtime, name: &str) -> usize {
    saga_table(&*rt.store(), name, "deadlines").await.len()
}

fn fired(rt: &Runtime, name: &str) -> u64 {
    rt.saga_status(name).unwrap().deadlines_fired
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_fires_once_when_the_clock_reaches_it_and_not_before() {
    let node = SagaNode::new();
    let clock = ManualClock::new(T0);
    let rt = probe_runtime(&node, &clock);
    start_with_deadline(&rt, "p", "x", 1_000).await;
    start_with_deadline(&rt, "s", "early", 999).await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(deadlines(&rt, ProbeSaga::NAME).await, 2);
    let store = rt.store();

    clock.advance(Duration::from_millis(999));
    wait_rang(&rt, "s", "early").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert!(rang(&*store, "p").await.is_empty(), "fired 1 ms early");
    assert_eq!(fired(&rt, ProbeSaga::NAME), 1);

    clock.advance(Duration::from_millis(1));
    wait_rang(&rt, "p", "x").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(fired(&rt, ProbeSaga::NAME), 2);

    // An hour later, nothing fires again: the sentinel rings alone.
    clock.advance(Duration::from_millis(60 * MINUTE));
    schedule(&rt, "s", "late", 1).await;
    // The saga computes the due time when it handles the event: let it, then move the clock.
    idle(&rt, ProbeSaga::NAME).await;
    clock.advance(Duration::from_millis(1));
    wait_rang(&rt, "s", "late").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(rang(&*store, "p").await, ["x"]);
    assert_eq!(rang(&*store, "s").await, ["early", "late"]);
    assert_eq!(fired(&rt, ProbeSaga::NAME), 3);
    assert_eq!(deadlines(&rt, ProbeSaga::NAME).await, 0);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_deadline_never_fires_and_a_moved_one_fires_once_at_its_new_time() {
    let node = SagaNode::new();
    let clock = ManualClock::new(T0);
    let rt = probe_runtime(&node, &clock);
    start_with_deadline(&rt, "p", "x", 1_000).await;
    probe(&rt, "p", ProbeCommand::Unschedule { name: "x".into() }).await;
    start_with_deadline(&rt, "m", "y", 1_000).await;
    schedule(&rt, "m", "y", 3_000).await;
    start_with_deadline(&rt, "s", "sentinel", 2_000).await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(
        deadlines(&rt, ProbeSaga::NAME).await,
        2,
        "the moved deadline and the sentinel"
    );
    let store = rt.store();

    clock.advance(Duration::from_millis(2_000));
    wait_rang(&rt, "s", "sentinel").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert!(
        rang(&*store, "p").await.is_empty(),
        "a cancelled deadline fired"
    );
    assert!(
        rang(&*store, "m").await.is_empty(),
        "a moved deadline fired at its old time"
    );

    clock.advance(Duration::from_millis(1_000));
    wait_rang(&rt, "m", "y").await;
    idle(&rt, ProbeSaga::NAME).await;
    clock.advance(Duration::from_millis(DAY));
    schedule(&rt, "s", "late", 1).await;
    // The saga computes the due time when it handles the event: let it, then move the clock.
    idle(&rt, ProbeSaga::NAME).await;
    clock.advance(Duration::from_millis(1));
    wait_rang(&rt, "s", "late").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert!(rang(&*store, "p").await.is_empty());
    assert_eq!(rang(&*store, "m").await, ["y"]);
    assert_eq!(fired(&rt, ProbeSaga::NAME), 3);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_of_a_completed_instance_is_discarded() {
    let node = SagaNode::new();
    let clock = ManualClock::new(T0);
    let rt = probe_runtime(&node, &clock);
    start_with_deadline(&rt, "p", "x", 1_000).await;
    probe(&rt, "p", ProbeCommand::Finish).await;
    start_with_deadline(&rt, "s", "sentinel", 2_000).await;
    let store = rt.store();
    wait_for_events(&store, &probe_stream("p"), ProbeEvent::REPORTED, 1).await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(instances(&*store, ProbeSaga::NAME).await, ["s"]);
    assert_eq!(
        deadlines(&rt, ProbeSaga::NAME).await,
        1,
        "only the sentinel's"
    );

    clock.advance(Duration::from_millis(5_000));
    wait_rang(&rt, "s", "sentinel").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert!(rang(&*store, "p").await.is_empty());
    assert_eq!(fired(&rt, ProbeSaga::NAME), 1);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_due_while_the_process_was_down_fires_once_after_the_restart() {
    let node = SagaNode::new();
    let rt = probe_runtime(&node, &ManualClock::new(T0));
    start_with_deadline(&rt, "p", "x", MINUTE).await;
    start_with_deadline(&rt, "q", "y", 2 * MINUTE).await;
    idle(&rt, ProbeSaga::NAME).await;
    shutdown(rt).await;

    // Restarted after x was due, before y is.
    let clock = ManualClock::new(T0 + MINUTE + 1);
    let rt = probe_runtime(&node, &clock);
    wait_rang(&rt, "p", "x").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(fired(&rt, ProbeSaga::NAME), 1);
    let store = rt.store();
    assert_eq!(rang(&*store, "p").await, ["x"]);
    assert!(rang(&*store, "q").await.is_empty());
    // y, loaded from the store at the start, fires when the new clock reaches it.
    clock.advance(Duration::from_millis(MINUTE));
    wait_rang(&rt, "q", "y").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(fired(&rt, ProbeSaga::NAME), 2);
    shutdown(rt).await;

    // Once more, later: neither fires again.
    let clock = ManualClock::new(T0 + 10 * MINUTE);
    let rt = probe_runtime(&node, &clock);
    start_with_deadline(&rt, "s", "sentinel", 1).await;
    idle(&rt, ProbeSaga::NAME).await;
    clock.advance(Duration::from_millis(1));
    wait_rang(&rt, "s", "sentinel").await;
    idle(&rt, ProbeSaga::NAME).await;
    let store = rt.store();
    assert_eq!(fired(&rt, ProbeSaga::NAME), 1, "only the sentinel");
    assert_eq!(rang(&*store, "p").await, ["x"]);
    assert_eq!(rang(&*store, "q").await, ["y"]);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_deadlines_after_a_long_downtime_fire_once_each() {
    // More than the 64 deadlines the saga reads at a time.
    const N: u64 = 70;
    let node = SagaNode::new();
    let rt = probe_runtime(&node, &ManualClock::new(T0));
    join_all((0..N).map(|i| {
        let rt = rt.clone();
        async move { start_with_deadline(&rt, &format!("d{i:02}"), "due", (i + 1) * MINUTE).await }
    }))
    .await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(deadlines(&rt, ProbeSaga::NAME).await, N as usize);
    shutdown(rt).await;

    // Thirty days of downtime.
    let rt = probe_runtime(&node, &ManualClock::new(T0 + 30 * DAY));
    let store = rt.store();
    crate::saga_support::wait_until(&store, "every overdue deadline to ring", || async {
        count_rang(&*rt.store()).await >= N as usize
    })
    .await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(fired(&rt, ProbeSaga::NAME), N);
    for i in 0..N {
        assert_eq!(rang(&*store, &format!("d{i:02}")).await, ["due"], "d{i:02}");
    }
    assert_eq!(deadlines(&rt, ProbeSaga::NAME).await, 0);
    shutdown(rt).await;

    let clock = ManualClock::new(T0 + 31 * DAY);
    let rt = probe_runtime(&node, &clock);
    start_with_deadline(&rt, "s", "sentinel", 1).await;
    idle(&rt, ProbeSaga::NAME).await;
    clock.advance(Duration::from_millis(1));
    wait_rang(&rt, "s", "sentinel").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert_eq!(fired(&rt, ProbeSaga::NAME), 1);
    assert_eq!(count_rang(&*rt.store()).await, N as usize + 1);
    shutdown(rt).await;
}

async fn count_rang(store: &dyn EventStore) -> usize {
    whole_log(store)
        .await
        .iter()
        .filter(|e| e.event_type == ProbeEvent::RANG)
        .count()
}

/// Regression: after a restart the saga fired overdue deadlines before handling the events the
/// log still held, so a deadline cancelled by an event committed before it was due (the crash
/// came before the saga handled that event) fired anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cancelled_just_before_a_crash_does_not_fire_after_the_restart() {
    let node = SagaNode::new();
    let rt = probe_runtime(&node, &ManualClock::new(T0));
    start_with_deadline(&rt, "p", "x", 1_000).await;
    start_with_deadline(&rt, "s", "sentinel", 2_000).await;
    idle(&rt, ProbeSaga::NAME).await;
    shutdown(rt).await;

    // The cancellation is committed, then the process dies before its saga handles it.
    let store = node.open_store();
    let stream = probe_stream("p");
    let version = store.highest_sequence(&stream).await.unwrap();
    let cancel = ProbeEvent::Unscheduled { name: "x".into() };
    let event = NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: cancel.event_type().to_owned(),
        schema_version: 1,
        causation: Default::default(),
        payload: rmp_serde::to_vec(&cancel).unwrap(),
    };
    store
        .append(AppendRequest::new(stream, version, vec![event]))
        .await
        .unwrap();
    store.close().await.unwrap();

    // Restarted long after both were due.
    let rt = probe_runtime(&node, &ManualClock::new(T0 + 10_000));
    wait_rang(&rt, "s", "sentinel").await;
    idle(&rt, ProbeSaga::NAME).await;
    assert!(
        rang(&*rt.store(), "p").await.is_empty(),
        "a deadline cancelled before it was due fired after the restart"
    );
    assert_eq!(fired(&rt, ProbeSaga::NAME), 1);
    shutdown(rt).await;
}

// ---------------------------------------------------------------------------------------------
// The order saga's payment deadline
// ---------------------------------------------------------------------------------------------

const PAYMENT: Duration = Duration::from_secs(15 * 60);

fn shop(node: &SagaNode, clock: &ManualClock) -> Runtime {
    node.builder(|_| {})
        .register::<Order>()
        .register::<Inventory>()
        .saga(OrderSaga {
            payment_timeout: PAYMENT,
        })
        .clock(clock.clone())
        .build()
        .unwrap()
}

async fn stock(rt: &Runtime, item: &str, quantity: u64) {
    rt.send::<Inventory>(item, InventoryCommand::AddStock { quantity })
        .await
        .unwrap();
}

async fn place(rt: &Runtime, order: &str, item: &str, quantity: u64) {
    rt.send::<Order>(
        order,
        OrderCommand::Place {
            item: item.into(),
            quantity,
            price: 1_000,
        },
    )
    .await
    .unwrap();
}

async fn order_status(rt: &Runtime, order: &str) -> OrderStatus {
    rt.state::<Order>(order).await.unwrap().0.status
}

/// (available, reserved per order, committed) of `item`.
async fn levels(rt: &Runtime, item: &str) -> (u64, Vec<(String, u64)>, u64) {
    let (inventory, _) = rt.state::<Inventory>(item).await.unwrap();
    (
        inventory.available,
        inventory.reserved.into_iter().collect(),
        inventory.committed,
    )
}

fn order_stream(order: &str) -> incarnate::StreamId {
    incarnate::StreamId::new(Order::TYPE, order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_is_cancelled_at_its_payment_deadline_and_its_stock_released() {
    let node = SagaNode::new();
    let clock = ManualClock::new(T0);
    let rt = shop(&node, &clock);
    stock(&rt, "lamp", 2).await;
    place(&rt, "o2", "lamp", 1).await;
    idle(&rt, OrderSaga::NAME).await;
    assert_eq!(levels(&rt, "lamp").await, (1, vec![("o2".into(), 1)], 0));
    assert_eq!(order_status(&rt, "o2").await, OrderStatus::Placed);
    assert_eq!(deadlines(&rt, OrderSaga::NAME).await, 1);

    clock.advance(PAYMENT);
    let store = rt.store();
    wait_for_events(&store, &order_stream("o2"), OrderEvent::CANCELLED, 1).await;
    idle(&rt, OrderSaga::NAME).await;
    assert_eq!(
        order_status(&rt, "o2").await,
        OrderStatus::Cancelled(CancelReason::PaymentTimeout)
    );
    assert_eq!(levels(&rt, "lamp").await, (2, vec![], 0), "stock released");
    assert_eq!(fired(&rt, OrderSaga::NAME), 1);
    assert!(instances(&*store, OrderSaga::NAME).await.is_empty());
    assert_eq!(deadlines(&rt, OrderSaga::NAME).await, 0);
    // Too late to pay now.
    let late = rt
        .send::<Order>("o2", OrderCommand::MarkPaid { amount: 1_000 })
        .await;
    assert_eq!(
        late.unwrap_err().rejection(),
        Some(&OrderError::Cancelled(CancelReason::PaymentTimeout))
    );
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_paid_in_time_ships_and_its_payment_deadline_never_fires() {
    let node = SagaNode::new();
    let clock = ManualClock::new(T0);
    let rt = shop(&node, &clock);
    stock(&rt, "book", 5).await;
    place(&rt, "o1", "book", 2).await;
    idle(&rt, OrderSaga::NAME).await;
    clock.advance(PAYMENT - Duration::from_millis(1));
    rt.send::<Order>("o1", OrderCommand::MarkPaid { amount: 2_000 })
        .await
        .unwrap();
    idle(&rt, OrderSaga::NAME).await;
    assert_eq!(order_status(&rt, "o1").await, OrderStatus::Shipped);
    assert_eq!(levels(&rt, "book").await, (3, vec![], 2), "stock committed");
    assert_eq!(
        deadlines(&rt, OrderSaga::NAME).await,
        0,
        "deadline cancelled"
    );
    let store = rt.store();
    assert!(instances(&*store, OrderSaga::NAME).await.is_empty());

    // A sentinel order, placed now, times out a payment window later: o1's deadline would have
    // fired before it.
    place(&rt, "o9", "book", 1).await;
    idle(&rt, OrderSaga::NAME).await;
    clock.advance(PAYMENT);
    wait_for_events(&store, &order_stream("o9"), OrderEvent::CANCELLED, 1).await;
    idle(&rt, OrderSaga::NAME).await;
    assert_eq!(
        fired(&rt, OrderSaga::NAME),
        1,
        "only the sentinel's deadline"
    );
    assert_eq!(order_status(&rt, "o1").await, OrderStatus::Shipped);
    assert_eq!(levels(&rt, "book").await, (3, vec![], 2));
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_for_more_than_the_stock_is_cancelled_as_out_of_stock() {
    let node = SagaNode::new();
    let rt = shop(&node, &ManualClock::new(T0));
    stock(&rt, "lamp", 1).await;
    place(&rt, "o3", "lamp", 5).await;
    idle(&rt, OrderSaga::NAME).await;
    assert_eq!(
        order_status(&rt, "o3").await,
        OrderStatus::Cancelled(CancelReason::OutOfStock)
    );
    assert_eq!(levels(&rt, "lamp").await, (1, vec![], 0));
    assert_eq!(deadlines(&rt, OrderSaga::NAME).await, 0);
    assert!(instances(&*rt.store(), OrderSaga::NAME).await.is_empty());
    shutdown(rt).await;
}
