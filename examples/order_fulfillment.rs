//! Order fulfillment run by a saga with a durable payment deadline, on the embedded sled store.
//!
//! Stocks two items and places three orders: one paid in time (shipped, its stock committed),
//! one never paid (its 300 ms payment deadline fires: the order is cancelled and its stock
//! released), and one for more than the stock holds (cancelled as out of stock). Prints the
//! global log as a step-by-step trace, then the final orders and stock levels, and fails if the
//! outcome is not the documented one.
//!
//! Run with `cargo run --example order_fulfillment`. Data goes to `data/order_fulfillment`
//! (wiped first).

use std::time::{Duration, Instant};

use incarnate::Runtime;
use incarnate_actors::order::{
    CancelReason, Inventory, InventoryCommand, Order, OrderCommand, OrderSaga, OrderStatus,
};

const DATA_DIR: &str = "data/order_fulfillment";
const PAYMENT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long to wait for the payment deadline before calling the run a failure.
const DEADLINE_WAIT: Duration = Duration::from_secs(10);

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let _ = std::fs::remove_dir_all(DATA_DIR);
    let rt = Runtime::builder()
        .data_dir(DATA_DIR)
        .register::<Order>()
        .register::<Inventory>()
        .saga(OrderSaga {
            payment_timeout: PAYMENT_TIMEOUT,
        })
        .build()?;

    println!("== stocking items ==");
    for (item, quantity) in [("book", 5), ("lamp", 2)] {
        rt.send::<Inventory>(item, InventoryCommand::AddStock { quantity })
            .await?;
        println!("  {item}: {quantity} units");
    }

    println!("== placing orders (payment window {PAYMENT_TIMEOUT:?}) ==");
    let orders = [
        ("o1", "book", 2, 1_500, "paid in time: shipped"),
        (
            "o2",
            "lamp",
            1,
            4_000,
            "never paid: cancelled at the deadline",
        ),
        ("o3", "lamp", 5, 4_000, "more than in stock: cancelled"),
    ];
    let placed_at = Instant::now();
    for (id, item, quantity, price, expect) in orders {
        rt.send::<Order>(
            id,
            OrderCommand::Place {
                item: item.into(),
                quantity,
                price,
            },
        )
        .await?;
        println!(
            "  {id}: {quantity} x {item} at {} (expected: {expect})",
            cents(price)
        );
        if id == "o1" {
            // Paid right away, well within its payment window.
            rt.send::<Order>(id, OrderCommand::MarkPaid { amount: 3_000 })
                .await?;
            println!("  {id}: paid {}", cents(3_000));
        }
    }
    // Every reservation is answered, o1 is shipped, o2 waits for its payment.
    rt.wait_for_saga_idle(OrderSaga::NAME).await?;
    println!("  o1: {:?}", rt.state::<Order>("o1").await?.0.status);

    println!("== waiting for o2's payment deadline ==");
    let status = wait_until_cancelled(&rt, "o2").await?;
    println!(
        "  o2: {status:?} after {} ms",
        placed_at.elapsed().as_millis()
    );
    // The cancellation is followed by the release of o2's stock.
    rt.wait_for_saga_idle(OrderSaga::NAME).await?;

    println!("== trace: the global log, in commit order ==");
    for e in rt.store().read_log(1, usize::MAX).await? {
        let cause = match e.causation.command_id {
            Some(id) => format!("saga command {}", &id.to_string()[..8]),
            None => "caller".to_owned(),
        };
        println!(
            "  {:>3}  {:<22} {:<16} ({cause})",
            e.position,
            e.event_type,
            e.stream.to_string()
        );
    }

    println!("== orders ==");
    let mut statuses = Vec::new();
    for (id, ..) in orders {
        let (order, _) = rt.state::<Order>(id).await?;
        println!(
            "  {id}: {:?} ({} x {}, total {})",
            order.status,
            order.quantity,
            order.item,
            cents(order.total())
        );
        statuses.push(order.status);
    }

    println!("== stock ==");
    let mut levels = Vec::new();
    for item in ["book", "lamp"] {
        let (inventory, _) = rt.state::<Inventory>(item).await?;
        println!(
            "  {item}: {} available, {} reserved, {} shipped, {} on hand",
            inventory.available,
            inventory.reserved.values().sum::<u64>(),
            inventory.committed,
            inventory.on_hand()
        );
        levels.push((
            inventory.available,
            inventory.reserved.len(),
            inventory.committed,
        ));
    }

    let saga = rt.saga_status(OrderSaga::NAME)?;
    let running = rt
        .store()
        .kv_scan("$saga/order_saga/instances", &[], usize::MAX)
        .await?
        .len();
    println!(
        "== saga: {} inputs handled, {} deadline fired, {running} instances left ==",
        saga.handled, saga.deadlines_fired
    );

    let expected_statuses = [
        OrderStatus::Shipped,
        OrderStatus::Cancelled(CancelReason::PaymentTimeout),
        OrderStatus::Cancelled(CancelReason::OutOfStock),
    ];
    if statuses != expected_statuses {
        return Err(format!("orders ended as {statuses:?}, expected {expected_statuses:?}").into());
    }
    // book: 5 - 2 shipped; lamp: o2's unit released, o3 never reserved.
    if levels != [(3, 0, 2), (2, 0, 0)] {
        return Err(format!("unexpected stock levels {levels:?}").into());
    }
    if saga.deadlines_fired != 1 || running != 0 {
        return Err("the saga did not end every order exactly once".into());
    }
    println!("== every order reached its documented terminal state ==");
    rt.shutdown().await?;
    Ok(())
}

/// Waits, bounded by [`DEADLINE_WAIT`], until order `id` is cancelled: it re-reads the order
/// after each commit to the store instead of polling on a timer.
async fn wait_until_cancelled(rt: &Runtime, id: &str) -> Result<OrderStatus, Error> {
    let deadline = tokio::time::Instant::now() + DEADLINE_WAIT;
    let mut head = rt.store().watch_head();
    loop {
        head.borrow_and_update();
        let (order, _) = rt.state::<Order>(id).await?;
        if let OrderStatus::Cancelled(_) = order.status {
            return Ok(order.status);
        }
        match tokio::time::timeout_at(deadline, head.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("the store closed".into()),
            Err(_) => {
                return Err(format!(
                    "{id} was not cancelled within {DEADLINE_WAIT:?}: {:?}",
                    order.status
                )
                .into())
            }
        }
    }
}

fn cents(amount: u64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}
