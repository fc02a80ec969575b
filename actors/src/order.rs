//! Order fulfillment: an [`Order`] is placed, paid and shipped (or cancelled); an [`Inventory`]
//! holds the stock of one item and reserves it per order; the [`OrderSaga`] runs the process
//! between them with a durable payment deadline.
//!
//! The process, per order:
//!
//! 1. `OrderPlaced` starts an instance, which reserves the stock (`Reserve`, keyed by the order
//!    id on the item's inventory).
//! 2. Reservation accepted: a `"payment"` deadline is set ([`OrderSaga::payment_timeout`]).
//!    Reservation rejected (not enough stock): the order is cancelled for
//!    [`CancelReason::OutOfStock`].
//! 3. `OrderPaid` (correlated by the order id) cancels the deadline, then the order is shipped
//!    and the reserved stock committed (it leaves the warehouse).
//! 4. The deadline fires first: the order is cancelled for [`CancelReason::PaymentTimeout`],
//!    then the reservation is released (the order first, so a payment that lands meanwhile
//!    wins: the order rejects the cancellation as already paid, and the saga ships instead).
//!
//! Terminal states (the instance is complete and deleted in each):
//! - **Shipped**: the order is [`OrderStatus::Shipped`] and its stock committed, once.
//! - **Cancelled(payment timeout)**: the order is `Cancelled(PaymentTimeout)` and its
//!   reservation released: the stock is available again.
//! - **Cancelled(out of stock)**: the order is `Cancelled(OutOfStock)` and nothing is reserved.
//!
//! A command that fails for a runtime reason after the runtime's retries (not a rejection) is
//! treated like a rejection, except a failed payment-timeout cancellation, which is retried when
//! the payment deadline, set again, fires.
//!
//! ```
//! use incarnate::testing::AggregateTest;
//! use incarnate_actors::order::{Order, OrderCommand, OrderError, OrderEvent};
//!
//! let placed = OrderEvent::Placed { item: "book".into(), quantity: 2, price: 1_500 };
//! AggregateTest::<Order>::given([placed.clone()])
//!     .when(OrderCommand::MarkPaid { amount: 3_000 })
//!     .then_expect_events([OrderEvent::Paid { amount: 3_000 }]);
//! AggregateTest::<Order>::given([placed])
//!     .when(OrderCommand::Ship)
//!     .then_expect_error(OrderError::NotPaid);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use incarnate::{
    Aggregate, CommandOptions, CommandOutcome, Correlation, DomainEvent, EventEnvelope,
    EventFilter, ProcessManager, Runtime, SagaError, Step,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Order
// ---------------------------------------------------------------------------------------------

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelReason {
    /// It was not paid before the payment deadline.
    #[serde(rename = "PaymentTimeout")]
    PaymentTimeout,
    /// Its stock could not be reserved.
    #[serde(rename = "OutOfStock")]
    OutOfStock,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::PaymentTimeout => "payment timeout",
            CancelReason::OutOfStock => "out of stock",
        })
    }
}

/// Where an order is in its lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not placed yet.
    #[default]
    New,
    /// Placed, waiting for its payment.
    Placed,
    /// Paid, not shipped yet.
    Paid,
    /// Shipped: the end of a successful order.
    Shipped,
    /// Cancelled, with the reason.
    Cancelled(CancelReason),
}

/// The state of one order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Where it is.
    pub status: OrderStatus,
    /// The item (the id of its [`Inventory`]).
    pub item: String,
    /// Units ordered.
    pub quantity: u64,
    /// Price of one unit, in cents.
    pub price: u64,
    /// Cents paid.
    pub paid: u64,
}

impl Order {
    /// What the order costs, in cents (`quantity * price`; placing checks it cannot overflow).
    pub fn total(&self) -> u64 {
        self.quantity.saturating_mul(self.price)
    }

    /// Whether the order was paid and then cancelled: the payment is owed back.
    pub fn refund_due(&self) -> bool {
        self.paid > 0 && matches!(self.status, OrderStatus::Cancelled(_))
    }
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    /// Places the order: `quantity` units of `item` at `price` cents each.
    Place {
        /// The item id.
        item: String,
        /// Units (at least one).
        quantity: u64,
        /// Cents per unit (at least one).
        price: u64,
    },
    /// Records the payment of `amount` cents, which must be the order's total.
    MarkPaid {
        /// Cents paid.
        amount: u64,
    },
    /// Ships a paid order.
    Ship,
    /// Cancels the order. An unpaid order can be cancelled for any reason; a paid one only when
    /// its stock is missing ([`CancelReason::OutOfStock`], and the payment is then owed back).
    Cancel {
        /// Why.
        reason: CancelReason,
    },
}

/// Events of an order. The tags ([`OrderEvent::PLACED`]...) and the pinned variant names are
/// the stored format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// The order was placed.
    #[serde(rename = "Placed")]
    Placed {
        /// The item id.
        item: String,
        /// Units.
        quantity: u64,
        /// Cents per unit.
        price: u64,
    },
    /// The order was paid.
    #[serde(rename = "Paid")]
    Paid {
        /// Cents paid.
        amount: u64,
    },
    /// The order was shipped.
    #[serde(rename = "Shipped")]
    Shipped,
    /// The order was cancelled.
    #[serde(rename = "Cancelled")]
    Cancelled {
        /// Why.
        reason: CancelReason,
    },
}

impl OrderEvent {
    /// Stored tag of [`OrderEvent::Placed`].
    pub const PLACED: &'static str = "OrderPlaced";
    /// Stored tag of [`OrderEvent::Paid`].
    pub const PAID: &'static str = "OrderPaid";
    /// Stored tag of [`OrderEvent::Shipped`].
    pub const SHIPPED: &'static str = "OrderShipped";
    /// Stored tag of [`OrderEvent::Cancelled`].
    pub const CANCELLED: &'static str = "OrderCancelled";
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::Placed { .. } => Self::PLACED,
            OrderEvent::Paid { .. } => Self::PAID,
            OrderEvent::Shipped => Self::SHIPPED,
            OrderEvent::Cancelled { .. } => Self::CANCELLED,
        }
    }
}

/// Why an order rejected a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OrderError {
    /// `Place` on an order that was already placed.
    #[error("the order was already placed")]
    AlreadyPlaced,
    /// Any other command before `Place`.
    #[error("the order was not placed")]
    NotPlaced,
    /// `Place` with no item, a zero quantity or price, or a total that overflows.
    #[error("invalid order")]
    InvalidOrder,
    /// `MarkPaid` with an amount other than the total.
    #[error("wrong amount: the order costs {expected}, {paid} was paid")]
    WrongAmount {
        /// The order's total.
        expected: u64,
        /// The amount given.
        paid: u64,
    },
    /// `MarkPaid` twice, or a payment-timeout `Cancel` after the payment.
    #[error("the order is already paid")]
    AlreadyPaid,
    /// `Ship` before the payment.
    #[error("the order is not paid")]
    NotPaid,
    /// Any command after shipping.
    #[error("the order was already shipped")]
    AlreadyShipped,
    /// Any command on a cancelled order.
    #[error("the order was cancelled ({0})")]
    Cancelled(CancelReason),
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus as S;
        match (command, self.status) {
            (
                OrderCommand::Place {
                    item,
                    quantity,
                    price,
                },
                S::New,
            ) => {
                if item.is_empty()
                    || *quantity == 0
                    || *price == 0
                    || quantity.checked_mul(*price).is_none()
                {
                    return Err(OrderError::InvalidOrder);
                }
                Ok(vec![OrderEvent::Placed {
                    item: item.clone(),
                    quantity: *quantity,
                    price: *price,
                }])
            }
            (OrderCommand::Place { .. }, _) => Err(OrderError::AlreadyPlaced),
            (_, S::New) => Err(OrderError::NotPlaced),
            (_, S::Cancelled(reason)) => Err(OrderError::Cancelled(reason)),
            (_, S::Shipped) => Err(OrderError::AlreadyShipped),
            (OrderCommand::MarkPaid { amount }, S::Placed) => {
                if *amount != self.total() {
                    return Err(OrderError::WrongAmount {
                        expected: self.total(),
                        paid: *amount,
                    });
                }
                Ok(vec![OrderEvent::Paid { amount: *amount }])
            }
            (OrderCommand::MarkPaid { .. }, _) => Err(OrderError::AlreadyPaid),
            (OrderCommand::Ship, S::Placed) => Err(OrderError::NotPaid),
            (OrderCommand::Ship, _) => Ok(vec![OrderEvent::Shipped]),
            (OrderCommand::Cancel { reason }, S::Placed)
            | (
                OrderCommand::Cancel {
                    reason: reason @ CancelReason::OutOfStock,
                },
                S::Paid,
            ) => Ok(vec![OrderEvent::Cancelled { reason: *reason }]),
            (OrderCommand::Cancel { .. }, _) => Err(OrderError::AlreadyPaid),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed {
                item,
                quantity,
                price,
            } => {
                self.status = OrderStatus::Placed;
                self.item.clone_from(item);
                self.quantity = *quantity;
                self.price = *price;
            }
            OrderEvent::Paid { amount } => {
                self.status = OrderStatus::Paid;
                self.paid = *amount;
            }
            OrderEvent::Shipped => self.status = OrderStatus::Shipped,
            OrderEvent::Cancelled { reason } => self.status = OrderStatus::Cancelled(*reason),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inventory
// ---------------------------------------------------------------------------------------------

/// The stock of one item (the aggregate id is the item id): units available, and units reserved
/// per order until they are committed (shipped) or released.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Units that can be reserved.
    pub available: u64,
    /// Units held per order id.
    pub reserved: BTreeMap<String, u64>,
    /// Units committed (shipped) so far.
    pub committed: u64,
}

impl Inventory {
    /// Units in the warehouse: available plus reserved.
    pub fn on_hand(&self) -> u64 {
        self.reserved
            .values()
            .fold(self.available, |sum, q| sum.saturating_add(*q))
    }
}

/// What can be asked of an inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventoryCommand {
    /// Adds `quantity` units.
    AddStock {
        /// Units (at least one).
        quantity: u64,
    },
    /// Holds `quantity` units for `order`. Asking again for the same order and quantity is
    /// accepted without a new event, so a re-sent reservation never holds twice.
    Reserve {
        /// The order id: the key of the reservation.
        order: String,
        /// Units (at least one).
        quantity: u64,
    },
    /// Gives the units held for `order` back to the available stock.
    Release {
        /// The order id.
        order: String,
    },
    /// Takes the units held for `order` out of the stock for good (shipped).
    Commit {
        /// The order id.
        order: String,
    },
}

/// Events of an inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryEvent {
    /// Units were added.
    #[serde(rename = "StockAdded")]
    StockAdded {
        /// Units.
        quantity: u64,
    },
    /// Units were reserved for an order.
    #[serde(rename = "Reserved")]
    Reserved {
        /// The order id.
        order: String,
        /// Units.
        quantity: u64,
    },
    /// An order's reservation was released.
    #[serde(rename = "Released")]
    Released {
        /// The order id.
        order: String,
        /// Units given back.
        quantity: u64,
    },
    /// An order's reservation was committed (shipped).
    #[serde(rename = "Committed")]
    Committed {
        /// The order id.
        order: String,
        /// Units taken out.
        quantity: u64,
    },
}

impl InventoryEvent {
    /// Stored tag of [`InventoryEvent::StockAdded`].
    pub const STOCK_ADDED: &'static str = "StockAdded";
    /// Stored tag of [`InventoryEvent::Reserved`].
    pub const RESERVED: &'static str = "StockReserved";
    /// Stored tag of [`InventoryEvent::Released`].
    pub const RELEASED: &'static str = "ReservationReleased";
    /// Stored tag of [`InventoryEvent::Committed`].
    pub const COMMITTED: &'static str = "ReservationCommitted";
}

impl DomainEvent for InventoryEvent {
    fn event_type(&self) -> &'static str {
        match self {
            InventoryEvent::StockAdded { .. } => Self::STOCK_ADDED,
            InventoryEvent::Reserved { .. } => Self::RESERVED,
            InventoryEvent::Released { .. } => Self::RELEASED,
            InventoryEvent::Committed { .. } => Self::COMMITTED,
        }
    }
}

/// Why an inventory rejected a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum InventoryError {
    /// A zero quantity, or stock that would overflow.
    #[error("invalid quantity")]
    InvalidQuantity,
    /// `Reserve` of more than is available.
    #[error("insufficient stock: {available} available, {requested} requested")]
    InsufficientStock {
        /// Units available when it was decided.
        available: u64,
        /// Units asked for.
        requested: u64,
    },
    /// `Reserve` for an order that holds another quantity already.
    #[error("order {order} already holds {quantity} units")]
    AlreadyReserved {
        /// The order id.
        order: String,
        /// The units it holds.
        quantity: u64,
    },
    /// `Release` or `Commit` for an order that holds nothing.
    #[error("order {order} holds no reservation")]
    NoReservation {
        /// The order id.
        order: String,
    },
}

impl Aggregate for Inventory {
    const TYPE: &'static str = "inventory";
    type Command = InventoryCommand;
    type Event = InventoryEvent;
    type Error = InventoryError;

    fn handle(&self, command: &InventoryCommand) -> Result<Vec<InventoryEvent>, InventoryError> {
        match command {
            InventoryCommand::AddStock { quantity } => {
                if *quantity == 0 || self.on_hand().checked_add(*quantity).is_none() {
                    return Err(InventoryError::InvalidQuantity);
                }
                Ok(vec![InventoryEvent::StockAdded {
                    quantity: *quantity,
                }])
            }
            InventoryCommand::Reserve { order, quantity } => {
                if *quantity == 0 {
                    return Err(InventoryError::InvalidQuantity);
                }
                match self.reserved.get(order) {
                    Some(held) if held == quantity => return Ok(Vec::new()),
                    Some(held) => {
                        return Err(InventoryError::AlreadyReserved {
                            order: order.clone(),
                            quantity: *held,
                        })
                    }
                    None => {}
                }
                if *quantity > self.available {
                    return Err(InventoryError::InsufficientStock {
                        available: self.available,
                        requested: *quantity,
                    });
                }
                Ok(vec![InventoryEvent::Reserved {
                    order: order.clone(),
                    quantity: *quantity,
                }])
            }
            InventoryCommand::Release { order } | InventoryCommand::Commit { order } => {
                let Some(quantity) = self.reserved.get(order) else {
                    return Err(InventoryError::NoReservation {
                        order: order.clone(),
                    });
                };
                let (order, quantity) = (order.clone(), *quantity);
                Ok(vec![match command {
                    InventoryCommand::Release { .. } => {
                        InventoryEvent::Released { order, quantity }
                    }
                    _ => InventoryEvent::Committed { order, quantity },
                }])
            }
        }
    }

    fn apply(&mut self, event: &InventoryEvent) {
        // Facts: saturating arithmetic so a foreign history never panics a replay.
        match event {
            InventoryEvent::StockAdded { quantity } => {
                self.available = self.available.saturating_add(*quantity);
            }
            InventoryEvent::Reserved { order, quantity } => {
                self.available = self.available.saturating_sub(*quantity);
                self.reserved.insert(order.clone(), *quantity);
            }
            InventoryEvent::Released { order, quantity } => {
                self.reserved.remove(order);
                self.available = self.available.saturating_add(*quantity);
            }
            InventoryEvent::Committed { order, quantity } => {
                self.reserved.remove(order);
                self.committed = self.committed.saturating_add(*quantity);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fulfillment saga
// ---------------------------------------------------------------------------------------------

/// The saga's commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FulfillmentStep {
    /// Reserve the order's units on the item's inventory.
    Reserve {
        /// The item (inventory id).
        item: String,
        /// The order id.
        order: String,
        /// Units.
        quantity: u64,
    },
    /// Release the order's reservation.
    Release {
        /// The item (inventory id).
        item: String,
        /// The order id.
        order: String,
    },
    /// Commit the order's reservation (the stock leaves with the parcel).
    CommitStock {
        /// The item (inventory id).
        item: String,
        /// The order id.
        order: String,
    },
    /// Ship the order.
    Ship {
        /// The order id.
        order: String,
    },
    /// Cancel the order.
    Cancel {
        /// The order id.
        order: String,
        /// Why.
        reason: CancelReason,
    },
}

/// Where one fulfillment is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FulfillmentPhase {
    /// Before its `OrderPlaced` was handled.
    #[default]
    Started,
    /// Waiting for the reservation.
    Reserving,
    /// Stock reserved, waiting for the payment (the deadline is set).
    AwaitingPayment,
    /// Paid: shipping and committing the stock; `pending` answers still expected.
    Shipping {
        /// Answers (ship, commit) not received yet.
        pending: u8,
    },
    /// Cancelling the order.
    Cancelling(CancelReason),
    /// Order cancelled; releasing its reservation.
    Releasing(CancelReason),
}

/// The state of one fulfillment instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderProgress {
    /// The order id.
    pub order: String,
    /// The item id.
    pub item: String,
    /// Units.
    pub quantity: u64,
    /// Where it is.
    pub phase: FulfillmentPhase,
    /// Whether `OrderPaid` was seen.
    pub paid: bool,
    /// Whether stock may be held for the order (the reservation was accepted, or its outcome is
    /// unknown), so a cancellation must release it.
    pub reserved: bool,
}

/// Runs each placed order to one of the documented terminal states (see the module docs).
#[derive(Debug, Clone)]
pub struct OrderSaga {
    /// How long an order may stay unpaid once its stock is reserved.
    pub payment_timeout: Duration,
}

impl Default for OrderSaga {
    /// A 15-minute payment window.
    fn default() -> Self {
        Self {
            payment_timeout: Duration::from_secs(15 * 60),
        }
    }
}

impl OrderSaga {
    /// Its registered name.
    pub const NAME: &'static str = "order_saga";
    /// The name of the payment deadline.
    pub const PAYMENT_DEADLINE: &'static str = "payment";

    fn ship(state: &mut OrderProgress) -> Step<FulfillmentStep> {
        state.phase = FulfillmentPhase::Shipping { pending: 2 };
        Step::none()
            .send(FulfillmentStep::CommitStock {
                item: state.item.clone(),
                order: state.order.clone(),
            })
            .send(FulfillmentStep::Ship {
                order: state.order.clone(),
            })
    }

    fn release_or_complete(
        state: &mut OrderProgress,
        reason: CancelReason,
    ) -> Step<FulfillmentStep> {
        if state.reserved {
            state.phase = FulfillmentPhase::Releasing(reason);
            Step::none().send(FulfillmentStep::Release {
                item: state.item.clone(),
                order: state.order.clone(),
            })
        } else {
            Step::none().complete()
        }
    }

    fn cancel(state: &mut OrderProgress, reason: CancelReason) -> Step<FulfillmentStep> {
        state.phase = FulfillmentPhase::Cancelling(reason);
        Step::none().send(FulfillmentStep::Cancel {
            order: state.order.clone(),
            reason,
        })
    }
}

#[async_trait]
impl ProcessManager for OrderSaga {
    type State = OrderProgress;
    type Command = FulfillmentStep;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all()
            .aggregate(Order::TYPE)
            .event(OrderEvent::PLACED)
            .event(OrderEvent::PAID)
    }

    fn correlate(&self, event: &EventEnvelope) -> Option<Correlation> {
        let order = event.stream.aggregate_id.as_str();
        match event.event_type.as_str() {
            OrderEvent::PLACED => Some(Correlation::start(order)),
            OrderEvent::PAID => Some(Correlation::to(order)),
            _ => None,
        }
    }

    fn on_event(
        &self,
        state: &mut OrderProgress,
        event: &EventEnvelope,
    ) -> Result<Step<FulfillmentStep>, SagaError> {
        match event.decode_event::<OrderEvent>()? {
            OrderEvent::Placed { item, quantity, .. } => {
                if state.phase != FulfillmentPhase::Started {
                    // A second start event for a running instance changes nothing.
                    return Ok(Step::none());
                }
                *state = OrderProgress {
                    order: event.stream.aggregate_id.to_string(),
                    item: item.clone(),
                    quantity,
                    phase: FulfillmentPhase::Reserving,
                    paid: false,
                    reserved: false,
                };
                Ok(Step::none().send(FulfillmentStep::Reserve {
                    item,
                    order: state.order.clone(),
                    quantity,
                }))
            }
            OrderEvent::Paid { .. } => {
                state.paid = true;
                // Paid while reserving or cancelling: the pending outcome picks the flag up.
                if state.phase == FulfillmentPhase::AwaitingPayment {
                    Ok(Self::ship(state).cancel(Self::PAYMENT_DEADLINE))
                } else {
                    Ok(Step::none())
                }
            }
            OrderEvent::Shipped | OrderEvent::Cancelled { .. } => Ok(Step::none()),
        }
    }

    fn on_outcome(
        &self,
        state: &mut OrderProgress,
        command: &FulfillmentStep,
        outcome: &CommandOutcome,
    ) -> Result<Step<FulfillmentStep>, SagaError> {
        let accepted = matches!(outcome, CommandOutcome::Accepted { .. });
        Ok(match command {
            FulfillmentStep::Reserve { .. } => {
                // A reservation that failed (rather than was rejected) may still have been made.
                state.reserved = !matches!(outcome, CommandOutcome::Rejected { .. });
                if !accepted {
                    Self::cancel(state, CancelReason::OutOfStock)
                } else if state.paid {
                    Self::ship(state)
                } else {
                    state.phase = FulfillmentPhase::AwaitingPayment;
                    Step::none().schedule(Self::PAYMENT_DEADLINE, self.payment_timeout)
                }
            }
            FulfillmentStep::Cancel { reason, .. } if accepted => {
                Self::release_or_complete(state, *reason)
            }
            FulfillmentStep::Cancel {
                reason: CancelReason::PaymentTimeout,
                ..
            } => {
                if state.paid {
                    // The payment won the race: the order refused the cancellation.
                    Self::ship(state)
                } else {
                    // Refused as already paid (the `OrderPaid` event is on its way) or not
                    // delivered: wait again; the deadline retries the cancellation.
                    state.phase = FulfillmentPhase::AwaitingPayment;
                    Step::none().schedule(Self::PAYMENT_DEADLINE, self.payment_timeout)
                }
            }
            FulfillmentStep::Cancel { reason, .. } => Self::release_or_complete(state, *reason),
            FulfillmentStep::Release { .. } => Step::none().complete(),
            FulfillmentStep::CommitStock { .. } | FulfillmentStep::Ship { .. } => {
                let pending = match state.phase {
                    FulfillmentPhase::Shipping { pending } => pending.saturating_sub(1),
                    _ => 0,
                };
                state.phase = FulfillmentPhase::Shipping { pending };
                if pending == 0 {
                    Step::none().complete()
                } else {
                    Step::none()
                }
            }
        })
    }

    fn on_deadline(
        &self,
        state: &mut OrderProgress,
        deadline: &str,
    ) -> Result<Step<FulfillmentStep>, SagaError> {
        if deadline == Self::PAYMENT_DEADLINE
            && state.phase == FulfillmentPhase::AwaitingPayment
            && !state.paid
        {
            Ok(Self::cancel(state, CancelReason::PaymentTimeout))
        } else {
            Ok(Step::none())
        }
    }

    async fn dispatch(
        &self,
        runtime: &Runtime,
        command: FulfillmentStep,
        options: CommandOptions,
    ) -> CommandOutcome {
        match command {
            FulfillmentStep::Reserve {
                item,
                order,
                quantity,
            } => CommandOutcome::from_result(
                &runtime
                    .send_with::<Inventory>(
                        item,
                        InventoryCommand::Reserve { order, quantity },
                        options,
                    )
                    .await,
            ),
            FulfillmentStep::Release { item, order } => CommandOutcome::from_result(
                &runtime
                    .send_with::<Inventory>(item, InventoryCommand::Release { order }, options)
                    .await,
            ),
            FulfillmentStep::CommitStock { item, order } => CommandOutcome::from_result(
                &runtime
                    .send_with::<Inventory>(item, InventoryCommand::Commit { order }, options)
                    .await,
            ),
            FulfillmentStep::Ship { order } => CommandOutcome::from_result(
                &runtime
                    .send_with::<Order>(order, OrderCommand::Ship, options)
                    .await,
            ),
            FulfillmentStep::Cancel { order, reason } => CommandOutcome::from_result(
                &runtime
                    .send_with::<Order>(order, OrderCommand::Cancel { reason }, options)
                    .await,
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use incarnate::testing::AggregateTest;
    use incarnate::StreamId;

    use super::*;

    fn placed() -> OrderEvent {
        OrderEvent::Placed {
            item: "book".into(),
            quantity: 2,
            price: 1_500,
        }
    }

    fn paid() -> OrderEvent {
        OrderEvent::Paid { amount: 3_000 }
    }

    fn timed_out() -> OrderEvent {
        OrderEvent::Cancelled {
            reason: CancelReason::PaymentTimeout,
        }
    }

    // --- Order ---

    #[test]
    fn place_an_order() {
        let order = AggregateTest::<Order>::given_no_previous_events()
            .when(OrderCommand::Place {
                item: "book".into(),
                quantity: 2,
                price: 1_500,
            })
            .then_expect_events([placed()]);
        assert_eq!(order.status, OrderStatus::Placed);
        assert_eq!(order.total(), 3_000);
        AggregateTest::<Order>::given([placed()])
            .when(OrderCommand::Place {
                item: "pen".into(),
                quantity: 1,
                price: 1,
            })
            .then_expect_error(OrderError::AlreadyPlaced);
    }

    #[test]
    fn an_invalid_order_is_rejected() {
        for (item, quantity, price) in [
            ("", 1, 1),
            ("book", 0, 1),
            ("book", 1, 0),
            ("book", u64::MAX, 2),
        ] {
            AggregateTest::<Order>::given_no_previous_events()
                .when(OrderCommand::Place {
                    item: item.into(),
                    quantity,
                    price,
                })
                .then_expect_error(OrderError::InvalidOrder);
        }
    }

    #[test]
    fn payment_must_be_the_total_and_only_once() {
        let order = AggregateTest::<Order>::given([placed()])
            .when(OrderCommand::MarkPaid { amount: 3_000 })
            .then_expect_events([paid()]);
        assert_eq!(order.status, OrderStatus::Paid);
        AggregateTest::<Order>::given([placed()])
            .when(OrderCommand::MarkPaid { amount: 2_999 })
            .then_expect_error(OrderError::WrongAmount {
                expected: 3_000,
                paid: 2_999,
            });
        AggregateTest::<Order>::given([placed(), paid()])
            .when(OrderCommand::MarkPaid { amount: 3_000 })
            .then_expect_error(OrderError::AlreadyPaid);
        AggregateTest::<Order>::given_no_previous_events()
            .when(OrderCommand::MarkPaid { amount: 3_000 })
            .then_expect_error(OrderError::NotPlaced);
        AggregateTest::<Order>::given([placed(), timed_out()])
            .when(OrderCommand::MarkPaid { amount: 3_000 })
            .then_expect_error(OrderError::Cancelled(CancelReason::PaymentTimeout));
    }

    #[test]
    fn only_a_paid_order_ships_and_only_once() {
        let order = AggregateTest::<Order>::given([placed(), paid()])
            .when(OrderCommand::Ship)
            .then_expect_events([OrderEvent::Shipped]);
        assert_eq!(order.status, OrderStatus::Shipped);
        AggregateTest::<Order>::given([placed()])
            .when(OrderCommand::Ship)
            .then_expect_error(OrderError::NotPaid);
        AggregateTest::<Order>::given([placed(), paid(), OrderEvent::Shipped])
            .when(OrderCommand::Ship)
            .then_expect_error(OrderError::AlreadyShipped);
        AggregateTest::<Order>::given([placed(), timed_out()])
            .when(OrderCommand::Ship)
            .then_expect_error(OrderError::Cancelled(CancelReason::PaymentTimeout));
    }

    #[test]
    fn an_unpaid_order_cancels_for_any_reason() {
        for reason in [CancelReason::PaymentTimeout, CancelReason::OutOfStock] {
            let order = AggregateTest::<Order>::given([placed()])
                .when(OrderCommand::Cancel { reason })
                .then_expect_events([OrderEvent::Cancelled { reason }]);
            assert_eq!(order.status, OrderStatus::Cancelled(reason));
            assert!(!order.refund_due());
        }
    }

    #[test]
    fn a_paid_order_refuses_a_payment_timeout_but_not_missing_stock() {
        AggregateTest::<Order>::given([placed(), paid()])
            .when(OrderCommand::Cancel {
                reason: CancelReason::PaymentTimeout,
            })
            .then_expect_error(OrderError::AlreadyPaid);
        let order = AggregateTest::<Order>::given([placed(), paid()])
            .when(OrderCommand::Cancel {
                reason: CancelReason::OutOfStock,
            })
            .then_expect_events([OrderEvent::Cancelled {
                reason: CancelReason::OutOfStock,
            }]);
        assert!(order.refund_due());
    }

    #[test]
    fn a_shipped_or_cancelled_order_cannot_be_cancelled() {
        AggregateTest::<Order>::given([placed(), paid(), OrderEvent::Shipped])
            .when(OrderCommand::Cancel {
                reason: CancelReason::OutOfStock,
            })
            .then_expect_error(OrderError::AlreadyShipped);
        AggregateTest::<Order>::given([placed(), timed_out()])
            .when(OrderCommand::Cancel {
                reason: CancelReason::OutOfStock,
            })
            .then_expect_error(OrderError::Cancelled(CancelReason::PaymentTimeout));
        AggregateTest::<Order>::given_no_previous_events()
            .when(OrderCommand::Cancel {
                reason: CancelReason::OutOfStock,
            })
            .then_expect_error(OrderError::NotPlaced);
    }

    #[test]
    fn order_tags_are_pinned_and_events_round_trip() {
        let events = [placed(), paid(), OrderEvent::Shipped, timed_out()];
        let tags: Vec<&str> = events.iter().map(DomainEvent::event_type).collect();
        assert_eq!(
            tags,
            ["OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled"]
        );
        for event in events {
            let bytes = rmp_serde::to_vec(&event).unwrap();
            assert_eq!(
                OrderEvent::decode(event.event_type(), 1, &bytes).unwrap(),
                event
            );
        }
        assert_eq!(Order::TYPE, "order");
        assert_eq!(Inventory::TYPE, "inventory");
    }

    // --- Inventory ---

    fn stocked(quantity: u64) -> InventoryEvent {
        InventoryEvent::StockAdded { quantity }
    }

    fn reserved(order: &str, quantity: u64) -> InventoryEvent {
        InventoryEvent::Reserved {
            order: order.into(),
            quantity,
        }
    }

    #[test]
    fn stock_is_added_in_positive_quantities() {
        let inventory = AggregateTest::<Inventory>::given([stocked(3)])
            .when(InventoryCommand::AddStock { quantity: 2 })
            .then_expect_events([stocked(2)]);
        assert_eq!(inventory.available, 5);
        AggregateTest::<Inventory>::given_no_previous_events()
            .when(InventoryCommand::AddStock { quantity: 0 })
            .then_expect_error(InventoryError::InvalidQuantity);
        AggregateTest::<Inventory>::given([stocked(u64::MAX)])
            .when(InventoryCommand::AddStock { quantity: 1 })
            .then_expect_error(InventoryError::InvalidQuantity);
    }

    #[test]
    fn a_reservation_holds_available_stock_per_order() {
        let inventory = AggregateTest::<Inventory>::given([stocked(5)])
            .when(InventoryCommand::Reserve {
                order: "o1".into(),
                quantity: 3,
            })
            .then_expect_events([reserved("o1", 3)]);
        assert_eq!(inventory.available, 2);
        assert_eq!(inventory.on_hand(), 5);
        assert_eq!(inventory.reserved.get("o1"), Some(&3));
        AggregateTest::<Inventory>::given([stocked(5), reserved("o1", 3)])
            .when(InventoryCommand::Reserve {
                order: "o2".into(),
                quantity: 3,
            })
            .then_expect_error(InventoryError::InsufficientStock {
                available: 2,
                requested: 3,
            });
        AggregateTest::<Inventory>::given([stocked(5)])
            .when(InventoryCommand::Reserve {
                order: "o1".into(),
                quantity: 0,
            })
            .then_expect_error(InventoryError::InvalidQuantity);
    }

    #[test]
    fn reserving_again_for_the_same_order_holds_nothing_more() {
        let inventory = AggregateTest::<Inventory>::given([stocked(5), reserved("o1", 3)])
            .when(InventoryCommand::Reserve {
                order: "o1".into(),
                quantity: 3,
            })
            .then_expect_events([]);
        assert_eq!(inventory.available, 2);
        AggregateTest::<Inventory>::given([stocked(5), reserved("o1", 3)])
            .when(InventoryCommand::Reserve {
                order: "o1".into(),
                quantity: 1,
            })
            .then_expect_error(InventoryError::AlreadyReserved {
                order: "o1".into(),
                quantity: 3,
            });
    }

    #[test]
    fn release_gives_the_stock_back_and_commit_takes_it_out() {
        let released = AggregateTest::<Inventory>::given([stocked(5), reserved("o1", 3)])
            .when(InventoryCommand::Release { order: "o1".into() })
            .then_expect_events([InventoryEvent::Released {
                order: "o1".into(),
                quantity: 3,
            }]);
        assert_eq!((released.available, released.on_hand()), (5, 5));
        assert!(released.reserved.is_empty());
        let committed = AggregateTest::<Inventory>::given([stocked(5), reserved("o1", 3)])
            .when(InventoryCommand::Commit { order: "o1".into() })
            .then_expect_events([InventoryEvent::Committed {
                order: "o1".into(),
                quantity: 3,
            }]);
        assert_eq!(
            (
                committed.available,
                committed.on_hand(),
                committed.committed
            ),
            (2, 2, 3)
        );
        let committed_then = [
            stocked(5),
            reserved("o1", 3),
            InventoryEvent::Committed {
                order: "o1".into(),
                quantity: 3,
            },
        ];
        for command in [
            InventoryCommand::Release { order: "o1".into() },
            InventoryCommand::Commit { order: "o1".into() },
            InventoryCommand::Release { order: "o9".into() },
        ] {
            let order = match &command {
                InventoryCommand::Release { order } | InventoryCommand::Commit { order } => {
                    order.clone()
                }
                _ => unreachable!(),
            };
            AggregateTest::<Inventory>::given(committed_then.clone())
                .when(command)
                .then_expect_error(InventoryError::NoReservation { order });
        }
    }

    #[test]
    fn inventory_tags_are_pinned() {
        let events = [
            stocked(1),
            reserved("o", 1),
            InventoryEvent::Released {
                order: "o".into(),
                quantity: 1,
            },
            InventoryEvent::Committed {
                order: "o".into(),
                quantity: 1,
            },
        ];
        let tags: Vec<&str> = events.iter().map(DomainEvent::event_type).collect();
        assert_eq!(
            tags,
            [
                "StockAdded",
                "StockReserved",
                "ReservationReleased",
                "ReservationCommitted"
            ]
        );
        for event in events {
            let bytes = rmp_serde::to_vec(&event).unwrap();
            assert_eq!(
                InventoryEvent::decode(event.event_type(), 1, &bytes).unwrap(),
                event
            );
        }
    }

    // --- OrderSaga decisions ---

    const TIMEOUT: Duration = Duration::from_millis(300);

    fn saga() -> OrderSaga {
        OrderSaga {
            payment_timeout: TIMEOUT,
        }
    }

    fn envelope(sequence: u64, event: &OrderEvent) -> EventEnvelope {
        EventEnvelope {
            event_id: uuid::Uuid::now_v7(),
            stream: StreamId::new(Order::TYPE, "o1"),
            sequence,
            position: sequence,
            timestamp_micros: 0,
            event_type: event.event_type().to_owned(),
            schema_version: 1,
            causation: Default::default(),
            payload: rmp_serde::to_vec(event).unwrap(),
        }
    }

    fn accepted() -> CommandOutcome {
        CommandOutcome::Accepted { version: 1 }
    }

    fn rejected() -> CommandOutcome {
        CommandOutcome::Rejected {
            reason: "no".into(),
        }
    }

    fn failed() -> CommandOutcome {
        CommandOutcome::Failed {
            error: "no reply from inventory/book within 1s".into(),
        }
    }

    fn reserve() -> FulfillmentStep {
        FulfillmentStep::Reserve {
            item: "book".into(),
            order: "o1".into(),
            quantity: 2,
        }
    }

    fn release() -> FulfillmentStep {
        FulfillmentStep::Release {
            item: "book".into(),
            order: "o1".into(),
        }
    }

    fn commit() -> FulfillmentStep {
        FulfillmentStep::CommitStock {
            item: "book".into(),
            order: "o1".into(),
        }
    }

    fn ship() -> FulfillmentStep {
        FulfillmentStep::Ship { order: "o1".into() }
    }

    fn cancel(reason: CancelReason) -> FulfillmentStep {
        FulfillmentStep::Cancel {
            order: "o1".into(),
            reason,
        }
    }

    fn on_event(
        state: &mut OrderProgress,
        sequence: u64,
        event: OrderEvent,
    ) -> Step<FulfillmentStep> {
        saga().on_event(state, &envelope(sequence, &event)).unwrap()
    }

    fn on_outcome(
        state: &mut OrderProgress,
        command: FulfillmentStep,
        outcome: CommandOutcome,
    ) -> Step<FulfillmentStep> {
        saga().on_outcome(state, &command, &outcome).unwrap()
    }

    /// An instance whose stock is reserved and whose payment deadline is set.
    fn awaiting_payment() -> OrderProgress {
        let mut state = OrderProgress::default();
        assert_eq!(on_event(&mut state, 1, placed()).commands, [reserve()]);
        let step = on_outcome(&mut state, reserve(), accepted());
        assert_eq!(
            step,
            Step::none().schedule(OrderSaga::PAYMENT_DEADLINE, TIMEOUT)
        );
        assert_eq!(state.phase, FulfillmentPhase::AwaitingPayment);
        assert!(state.reserved);
        state
    }

    #[test]
    fn the_saga_correlates_placed_and_paid_by_order_id() {
        let saga = saga();
        assert_eq!(
            saga.correlate(&envelope(1, &placed())),
            Some(Correlation::start("o1"))
        );
        assert_eq!(
            saga.correlate(&envelope(2, &paid())),
            Some(Correlation::to("o1"))
        );
        assert_eq!(saga.correlate(&envelope(3, &OrderEvent::Shipped)), None);
        assert_eq!(
            saga.filter(),
            EventFilter::all()
                .aggregate("order")
                .event("OrderPlaced")
                .event("OrderPaid")
        );
    }

    #[test]
    fn a_placed_order_reserves_its_stock_once() {
        let mut state = OrderProgress::default();
        let step = on_event(&mut state, 1, placed());
        assert_eq!(step, Step::none().send(reserve()));
        assert_eq!(state.phase, FulfillmentPhase::Reserving);
        assert_eq!(on_event(&mut state, 1, placed()), Step::none());
        assert_eq!(state.phase, FulfillmentPhase::Reserving);
    }

    #[test]
    fn a_payment_in_time_cancels_the_deadline_then_ships_and_commits_the_stock() {
        let mut state = awaiting_payment();
        let step = on_event(&mut state, 2, paid());
        assert_eq!(
            step,
            Step::none()
                .send(commit())
                .send(ship())
                .cancel(OrderSaga::PAYMENT_DEADLINE)
        );
        assert_eq!(on_outcome(&mut state, ship(), accepted()), Step::none());
        assert_eq!(
            on_outcome(&mut state, commit(), accepted()),
            Step::none().complete()
        );
    }

    #[test]
    fn the_payment_deadline_cancels_the_order_then_releases_the_stock() {
        let mut state = awaiting_payment();
        let step = saga()
            .on_deadline(&mut state, OrderSaga::PAYMENT_DEADLINE)
            .unwrap();
        assert_eq!(
            step,
            Step::none().send(cancel(CancelReason::PaymentTimeout))
        );
        let step = on_outcome(&mut state, cancel(CancelReason::PaymentTimeout), accepted());
        assert_eq!(step, Step::none().send(release()));
        assert_eq!(
            state.phase,
            FulfillmentPhase::Releasing(CancelReason::PaymentTimeout)
        );
        assert_eq!(
            on_outcome(&mut state, release(), accepted()),
            Step::none().complete()
        );
    }

    #[test]
    fn missing_stock_cancels_the_order_without_a_release() {
        let mut state = OrderProgress::default();
        on_event(&mut state, 1, placed());
        let step = on_outcome(&mut state, reserve(), rejected());
        assert_eq!(step, Step::none().send(cancel(CancelReason::OutOfStock)));
        assert!(!state.reserved);
        assert_eq!(
            on_outcome(&mut state, cancel(CancelReason::OutOfStock), accepted()),
            Step::none().complete()
        );
    }

    #[test]
    fn a_reservation_that_failed_is_released_after_the_cancellation() {
        let mut state = OrderProgress::default();
        on_event(&mut state, 1, placed());
        let step = on_outcome(&mut state, reserve(), failed());
        assert_eq!(step, Step::none().send(cancel(CancelReason::OutOfStock)));
        assert!(state.reserved, "a failed reservation may have been made");
        assert_eq!(
            on_outcome(&mut state, cancel(CancelReason::OutOfStock), accepted()),
            Step::none().send(release())
        );
        assert_eq!(
            on_outcome(&mut state, release(), rejected()),
            Step::none().complete()
        );
    }

    #[test]
    fn a_payment_before_the_reservation_ships_without_a_deadline() {
        let mut state = OrderProgress::default();
        on_event(&mut state, 1, placed());
        assert_eq!(on_event(&mut state, 2, paid()), Step::none());
        let step = on_outcome(&mut state, reserve(), accepted());
        assert_eq!(step, Step::none().send(commit()).send(ship()));
        assert!(step.schedule.is_empty());
    }

    #[test]
    fn a_payment_racing_the_deadline_wins_and_ships() {
        // The paid event is handled before the cancellation's refusal comes back.
        let mut state = awaiting_payment();
        saga()
            .on_deadline(&mut state, OrderSaga::PAYMENT_DEADLINE)
            .unwrap();
        assert_eq!(on_event(&mut state, 2, paid()), Step::none());
        let step = on_outcome(&mut state, cancel(CancelReason::PaymentTimeout), rejected());
        assert_eq!(step, Step::none().send(commit()).send(ship()));

        // The refusal comes back first: wait again, then the paid event ships.
        let mut state = awaiting_payment();
        saga()
            .on_deadline(&mut state, OrderSaga::PAYMENT_DEADLINE)
            .unwrap();
        let step = on_outcome(&mut state, cancel(CancelReason::PaymentTimeout), rejected());
        assert_eq!(
            step,
            Step::none().schedule(OrderSaga::PAYMENT_DEADLINE, TIMEOUT)
        );
        assert_eq!(state.phase, FulfillmentPhase::AwaitingPayment);
        let step = on_event(&mut state, 2, paid());
        assert_eq!(step.commands, [commit(), ship()]);
        assert_eq!(step.cancel, [OrderSaga::PAYMENT_DEADLINE]);
    }

    #[test]
    fn a_deadline_after_the_payment_or_of_another_name_does_nothing() {
        let mut state = awaiting_payment();
        on_event(&mut state, 2, paid());
        let before = state.clone();
        assert_eq!(
            saga()
                .on_deadline(&mut state, OrderSaga::PAYMENT_DEADLINE)
                .unwrap(),
            Step::none()
        );
        let mut waiting = awaiting_payment();
        assert_eq!(
            saga().on_deadline(&mut waiting, "other").unwrap(),
            Step::none()
        );
        assert_eq!(state, before);
    }
}
