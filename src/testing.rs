//! Given / when / then tests for aggregates: no runtime, no disk, no async.
//!
//! ```
//! # use incarnate::{Aggregate, DomainEvent};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Default, Serialize, Deserialize)]
//! # struct Counter { value: u64 }
//! # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! # enum Ev { Incremented(u64) }
//! # impl DomainEvent for Ev { fn event_type(&self) -> &'static str { "Incremented" } }
//! # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
//! # enum Error { #[error("too big")] TooBig }
//! # impl Aggregate for Counter {
//! #     const TYPE: &'static str = "counter";
//! #     type Command = u64; type Event = Ev; type Error = Error;
//! #     fn handle(&self, by: &u64) -> Result<Vec<Ev>, Error> {
//! #         if self.value + by > 10 { Err(Error::TooBig) } else { Ok(vec![Ev::Incremented(*by)]) }
//! #     }
//! #     fn apply(&mut self, Ev::Incremented(by): &Ev) { self.value += by; }
//! # }
//! use incarnate::testing::AggregateTest;
//!
//! AggregateTest::<Counter>::given([Ev::Incremented(4)])
//!     .when(5)
//!     .then_expect_events([Ev::Incremented(5)]);
//!
//! AggregateTest::<Counter>::given([Ev::Incremented(8)])
//!     .when(5)
//!     .then_expect_error(Error::TooBig);
//! ```
#![allow(clippy::panic)] // Failing assertions are how a test helper reports.

use std::fmt::Debug;

use crate::Aggregate;

/// An aggregate in a known state, built from past events.
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// The aggregate after `events`, applied in order.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in events {
            state.apply(&event);
        }
        Self { state }
    }

    /// The aggregate before its first event.
    pub fn given_no_previous_events() -> Self {
        Self {
            state: A::default(),
        }
    }

    /// Decides `command` against the given state.
    pub fn when(self, command: A::Command) -> TestOutcome<A> {
        let result = self.state.handle(&command);
        TestOutcome {
            state: self.state,
            result,
        }
    }
}

/// What a command decided, ready to be checked.
pub struct TestOutcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> TestOutcome<A> {
    /// Asserts the command emitted exactly `expected`, in order; returns the state after them.
    ///
    /// # Panics
    ///
    /// As `assert_eq!` does, when the command was rejected or emitted other events: this is a
    /// test assertion, called only from tests.
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> A
    where
        A::Event: PartialEq,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command emitted other events");
                let mut state = self.state;
                for event in &events {
                    state.apply(event);
                }
                state
            }
            Err(error) => {
                panic!("expected events {expected:?}, the command was rejected: {error:?}")
            }
        }
    }

    /// Asserts the command was rejected with `expected`.
    ///
    /// # Panics
    ///
    /// As `assert_eq!` does, when the command emitted events or was rejected otherwise: a test
    /// assertion, called only from tests.
    pub fn then_expect_error(self, expected: A::Error) {
        match self.result {
            Ok(events) => panic!("expected rejection {expected:?}, the command emitted {events:?}"),
            Err(error) => assert_eq!(error, expected, "the command was rejected otherwise"),
        }
    }

    /// The raw decision, for checks the two helpers above do not cover.
    pub fn result(&self) -> &Result<Vec<A::Event>, A::Error> {
        &self.result
    }
}

impl<A: Aggregate + Debug> Debug for AggregateTest<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateTest")
            .field("state", &self.state)
            .finish()
    }
}
