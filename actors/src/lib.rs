//! # incarnate-actors
//!
//! Reference domain actors for [`incarnate`]: small but complete aggregates (and, later,
//! projectors and sagas) written the way an application would write them. The examples, the
//! integration tests and the benchmark suite (`incarnate-bench`) all use these, so a workload
//! measured by the benches is a workload a real user would run.
//!
//! Each actor is plain domain code: a state, its commands, its events with stable stored tags,
//! and its typed rejections, with no I/O. The runtime turns them into live actors.
//!
//! | module | what |
//! |---|---|
//! | [`account`] | a bank account: open, deposit, withdraw, close |
//!
//! ```
//! use incarnate::Aggregate;
//! use incarnate_actors::{Account, AccountCommand};
//!
//! let mut account = Account::default();
//! for command in [
//!     AccountCommand::Open { owner: "alice".into() },
//!     AccountCommand::Deposit { amount: 1_000 },
//!     AccountCommand::Withdraw { amount: 250 },
//! ] {
//!     for event in account.handle(&command)? {
//!         account.apply(&event);
//!     }
//! }
//! assert_eq!(account.balance, 750);
//! # Ok::<(), incarnate_actors::AccountError>(())
//! ```

pub mod account;
pub mod balances;
pub mod order;
pub mod transfer;

pub use account::{Account, AccountCommand, AccountError, AccountEvent, AccountStatus};
