//! The pure domain layer: what an aggregate is, with no actors, no storage and no I/O.

mod aggregate;
mod ids;

pub use aggregate::{Aggregate, DomainEvent};
pub use ids::{AggregateId, StreamId};
