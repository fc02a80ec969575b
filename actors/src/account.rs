//! A bank account: the smallest aggregate with real rules (a lifecycle, an invariant on the
//! balance, typed rejections), used by the examples, tests and benches.
//!
//! Amounts are in cents (`u64`). An account is opened once, takes deposits and withdrawals
//! while open, and can be closed at any balance: a closed account rejects every further command
//! with [`AccountError::AccountClosed`]. Closing does not require a zero balance so that a saga
//! (a transfer, a migration) never gets stuck between a debit and a close.
//!
//! ```
//! use incarnate::testing::AggregateTest;
//! use incarnate_actors::account::{Account, AccountCommand, AccountError, AccountEvent};
//!
//! AggregateTest::<Account>::given([AccountEvent::Opened { owner: "alice".into() }])
//!     .when(AccountCommand::Deposit { amount: 500 })
//!     .then_expect_events([AccountEvent::Deposited { amount: 500 }]);
//!
//! AggregateTest::<Account>::given([AccountEvent::Opened { owner: "alice".into() }])
//!     .when(AccountCommand::Withdraw { amount: 1 })
//!     .then_expect_error(AccountError::InsufficientFunds { balance: 0, requested: 1 });
//! ```

use incarnate::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// Where an account is in its lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountStatus {
    /// No `Opened` event yet: the state before the first event.
    #[default]
    #[serde(rename = "NotOpened")]
    NotOpened,
    /// Opened and not closed: takes deposits and withdrawals.
    #[serde(rename = "Open")]
    Open,
    /// Closed for good: rejects every command.
    #[serde(rename = "Closed")]
    Closed,
}

/// The state of one bank account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Where the account is in its lifecycle.
    pub status: AccountStatus,
    /// Who opened it (empty before it is opened).
    pub owner: String,
    /// The balance in cents.
    pub balance: u64,
}

/// What can be asked of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    /// Opens the account for `owner`.
    Open {
        /// The account holder.
        owner: String,
    },
    /// Adds `amount` cents.
    Deposit {
        /// Cents to add; must be positive.
        amount: u64,
    },
    /// Takes `amount` cents out; the balance must cover it.
    Withdraw {
        /// Cents to take; must be positive.
        amount: u64,
    },
    /// Closes the account, whatever its balance.
    Close,
}

/// What happened to an account.
///
/// Stored format: the tags returned by [`DomainEvent::event_type`] and the serde variant names
/// (pinned with `#[serde(rename)]`) are part of the stored events, so renaming a Rust variant is
/// safe but changing a pinned string is not. rmp-serde's compact encoding stores struct fields by
/// position: add new fields at the end only, with a new schema version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// The account was opened for `owner`.
    #[serde(rename = "Opened")]
    Opened {
        /// The account holder.
        owner: String,
    },
    /// `amount` cents were deposited.
    #[serde(rename = "Deposited")]
    Deposited {
        /// Cents added.
        amount: u64,
    },
    /// `amount` cents were withdrawn.
    #[serde(rename = "Withdrawn")]
    Withdrawn {
        /// Cents taken.
        amount: u64,
    },
    /// The account was closed.
    #[serde(rename = "Closed")]
    Closed,
}

impl AccountEvent {
    /// The stored tag of [`AccountEvent::Opened`].
    pub const OPENED: &'static str = "AccountOpened";
    /// The stored tag of [`AccountEvent::Deposited`].
    pub const DEPOSITED: &'static str = "MoneyDeposited";
    /// The stored tag of [`AccountEvent::Withdrawn`].
    pub const WITHDRAWN: &'static str = "MoneyWithdrawn";
    /// The stored tag of [`AccountEvent::Closed`].
    pub const CLOSED: &'static str = "AccountClosed";
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened { .. } => Self::OPENED,
            AccountEvent::Deposited { .. } => Self::DEPOSITED,
            AccountEvent::Withdrawn { .. } => Self::WITHDRAWN,
            AccountEvent::Closed => Self::CLOSED,
        }
    }
}

/// Why an account rejected a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AccountError {
    /// `Open` on an account that is already open.
    #[error("the account is already open")]
    #[serde(rename = "AlreadyOpen")]
    AlreadyOpen,
    /// A command other than `Open` on an account that was never opened.
    #[error("the account is not open")]
    #[serde(rename = "NotOpen")]
    NotOpen,
    /// Any command on a closed account.
    #[error("the account is closed")]
    #[serde(rename = "AccountClosed")]
    AccountClosed,
    /// A zero amount, or a deposit that would overflow the balance.
    #[error("invalid amount")]
    #[serde(rename = "InvalidAmount")]
    InvalidAmount,
    /// A withdrawal larger than the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    #[serde(rename = "InsufficientFunds")]
    InsufficientFunds {
        /// The balance when the withdrawal was decided.
        balance: u64,
        /// The amount asked for.
        requested: u64,
    },
}

impl Account {
    /// Whether the account takes deposits and withdrawals.
    pub fn is_open(&self) -> bool {
        self.status == AccountStatus::Open
    }

    /// Rejects commands other than `Open` unless the account is open.
    fn ensure_open(&self) -> Result<(), AccountError> {
        match self.status {
            AccountStatus::Open => Ok(()),
            AccountStatus::NotOpened => Err(AccountError::NotOpen),
            AccountStatus::Closed => Err(AccountError::AccountClosed),
        }
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { owner } => match self.status {
                AccountStatus::NotOpened => Ok(vec![AccountEvent::Opened {
                    owner: owner.clone(),
                }]),
                AccountStatus::Open => Err(AccountError::AlreadyOpen),
                AccountStatus::Closed => Err(AccountError::AccountClosed),
            },
            AccountCommand::Deposit { amount } => {
                self.ensure_open()?;
                if *amount == 0 || self.balance.checked_add(*amount).is_none() {
                    return Err(AccountError::InvalidAmount);
                }
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw { amount } => {
                self.ensure_open()?;
                if *amount == 0 {
                    return Err(AccountError::InvalidAmount);
                }
                if *amount > self.balance {
                    return Err(AccountError::InsufficientFunds {
                        balance: self.balance,
                        requested: *amount,
                    });
                }
                Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
            }
            AccountCommand::Close => {
                self.ensure_open()?;
                Ok(vec![AccountEvent::Closed])
            }
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        // Events are facts: `handle` guards the arithmetic, and replaying a history written by
        // another version must not panic, hence the saturating operations.
        match event {
            AccountEvent::Opened { owner } => {
                self.status = AccountStatus::Open;
                self.owner.clone_from(owner);
            }
            AccountEvent::Deposited { amount } => {
                self.balance = self.balance.saturating_add(*amount);
            }
            AccountEvent::Withdrawn { amount } => {
                self.balance = self.balance.saturating_sub(*amount);
            }
            AccountEvent::Closed => self.status = AccountStatus::Closed,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use incarnate::testing::AggregateTest;

    use super::*;

    type Test = AggregateTest<Account>;

    fn opened() -> AccountEvent {
        AccountEvent::Opened {
            owner: "alice".into(),
        }
    }

    fn deposited(amount: u64) -> AccountEvent {
        AccountEvent::Deposited { amount }
    }

    fn withdrawn(amount: u64) -> AccountEvent {
        AccountEvent::Withdrawn { amount }
    }

    // --- Open ---

    #[test]
    fn open_a_new_account() {
        let state = Test::given_no_previous_events()
            .when(AccountCommand::Open {
                owner: "alice".into(),
            })
            .then_expect_events([opened()]);
        assert_eq!(
            state,
            Account {
                status: AccountStatus::Open,
                owner: "alice".into(),
                balance: 0,
            }
        );
        assert!(state.is_open());
    }

    #[test]
    fn open_twice_is_rejected() {
        Test::given([opened()])
            .when(AccountCommand::Open {
                owner: "bob".into(),
            })
            .then_expect_error(AccountError::AlreadyOpen);
    }

    #[test]
    fn open_a_closed_account_is_rejected() {
        Test::given([opened(), AccountEvent::Closed])
            .when(AccountCommand::Open {
                owner: "alice".into(),
            })
            .then_expect_error(AccountError::AccountClosed);
    }

    // --- Deposit ---

    #[test]
    fn deposit_adds_to_the_balance() {
        let state = Test::given([opened(), deposited(300)])
            .when(AccountCommand::Deposit { amount: 200 })
            .then_expect_events([deposited(200)]);
        assert_eq!(state.balance, 500);
    }

    #[test]
    fn deposit_before_open_is_rejected() {
        Test::given_no_previous_events()
            .when(AccountCommand::Deposit { amount: 1 })
            .then_expect_error(AccountError::NotOpen);
    }

    #[test]
    fn deposit_of_zero_is_rejected() {
        Test::given([opened()])
            .when(AccountCommand::Deposit { amount: 0 })
            .then_expect_error(AccountError::InvalidAmount);
    }

    #[test]
    fn deposit_that_overflows_is_rejected() {
        Test::given([opened(), deposited(u64::MAX - 1)])
            .when(AccountCommand::Deposit { amount: 2 })
            .then_expect_error(AccountError::InvalidAmount);
        let state = Test::given([opened(), deposited(u64::MAX - 1)])
            .when(AccountCommand::Deposit { amount: 1 })
            .then_expect_events([deposited(1)]);
        assert_eq!(state.balance, u64::MAX);
    }

    #[test]
    fn deposit_on_a_closed_account_is_rejected() {
        Test::given([opened(), deposited(10), AccountEvent::Closed])
            .when(AccountCommand::Deposit { amount: 5 })
            .then_expect_error(AccountError::AccountClosed);
    }

    // --- Withdraw ---

    #[test]
    fn withdraw_takes_from_the_balance() {
        let state = Test::given([opened(), deposited(500)])
            .when(AccountCommand::Withdraw { amount: 200 })
            .then_expect_events([withdrawn(200)]);
        assert_eq!(state.balance, 300);
    }

    #[test]
    fn withdraw_the_whole_balance() {
        let state = Test::given([opened(), deposited(500)])
            .when(AccountCommand::Withdraw { amount: 500 })
            .then_expect_events([withdrawn(500)]);
        assert_eq!(state.balance, 0);
    }

    #[test]
    fn withdraw_more_than_the_balance_is_rejected() {
        Test::given([opened(), deposited(500), withdrawn(100)])
            .when(AccountCommand::Withdraw { amount: 401 })
            .then_expect_error(AccountError::InsufficientFunds {
                balance: 400,
                requested: 401,
            });
    }

    #[test]
    fn withdraw_before_open_is_rejected() {
        Test::given_no_previous_events()
            .when(AccountCommand::Withdraw { amount: 1 })
            .then_expect_error(AccountError::NotOpen);
    }

    #[test]
    fn withdraw_of_zero_is_rejected() {
        Test::given([opened(), deposited(10)])
            .when(AccountCommand::Withdraw { amount: 0 })
            .then_expect_error(AccountError::InvalidAmount);
    }

    #[test]
    fn withdraw_on_a_closed_account_is_rejected() {
        Test::given([opened(), deposited(10), AccountEvent::Closed])
            .when(AccountCommand::Withdraw { amount: 5 })
            .then_expect_error(AccountError::AccountClosed);
    }

    // --- Close ---

    #[test]
    fn close_an_empty_account() {
        let state = Test::given([opened()])
            .when(AccountCommand::Close)
            .then_expect_events([AccountEvent::Closed]);
        assert_eq!(state.status, AccountStatus::Closed);
        assert!(!state.is_open());
    }

    #[test]
    fn close_is_allowed_with_a_balance() {
        let state = Test::given([opened(), deposited(700)])
            .when(AccountCommand::Close)
            .then_expect_events([AccountEvent::Closed]);
        assert_eq!(state.status, AccountStatus::Closed);
        assert_eq!(state.balance, 700);
    }

    #[test]
    fn close_before_open_is_rejected() {
        Test::given_no_previous_events()
            .when(AccountCommand::Close)
            .then_expect_error(AccountError::NotOpen);
    }

    #[test]
    fn close_twice_is_rejected() {
        Test::given([opened(), AccountEvent::Closed])
            .when(AccountCommand::Close)
            .then_expect_error(AccountError::AccountClosed);
    }

    // --- apply ---

    #[test]
    fn apply_never_panics_on_a_foreign_history() {
        // Neither an overflowing deposit nor a withdrawal past zero can be decided, but replaying
        // a history that holds one must not panic: the balance saturates.
        let state = Test::given([opened(), deposited(u64::MAX), deposited(1)])
            .when(AccountCommand::Withdraw { amount: u64::MAX })
            .then_expect_events([withdrawn(u64::MAX)]);
        assert_eq!(state.balance, 0);
        let mut state = Account::default();
        state.apply(&withdrawn(5));
        assert_eq!(state.balance, 0);
    }

    // --- stored format ---

    fn all_events() -> Vec<AccountEvent> {
        vec![
            opened(),
            deposited(250),
            withdrawn(100),
            AccountEvent::Closed,
        ]
    }

    #[test]
    fn tags_are_the_pinned_strings() {
        let tags: Vec<&str> = all_events().iter().map(DomainEvent::event_type).collect();
        assert_eq!(
            tags,
            [
                "AccountOpened",
                "MoneyDeposited",
                "MoneyWithdrawn",
                "AccountClosed"
            ]
        );
        for event in all_events() {
            assert_eq!(event.schema_version(), 1);
        }
        assert_eq!(Account::TYPE, "account");
    }

    #[test]
    fn stored_payloads_decode_back() {
        for event in all_events() {
            for payload in [
                rmp_serde::to_vec(&event).unwrap(),
                rmp_serde::to_vec_named(&event).unwrap(),
            ] {
                let decoded =
                    AccountEvent::decode(event.event_type(), event.schema_version(), &payload)
                        .unwrap();
                assert_eq!(decoded, event);
            }
        }
    }

    /// The bytes written today must decode forever: these are the compact rmp-serde encodings of
    /// each event, so changing a pinned variant name or the field order breaks this test.
    #[test]
    fn golden_payloads_decode() {
        let golden: [(&str, &[u8], AccountEvent); 4] = [
            ("AccountOpened", b"\x81\xa6Opened\x91\xa5alice", opened()),
            (
                "MoneyDeposited",
                b"\x81\xa9Deposited\x91\xcc\xfa",
                deposited(250),
            ),
            (
                "MoneyWithdrawn",
                b"\x81\xa9Withdrawn\x91\x64",
                withdrawn(100),
            ),
            ("AccountClosed", b"\xa6Closed", AccountEvent::Closed),
        ];
        for (tag, bytes, expected) in golden {
            assert_eq!(rmp_serde::to_vec(&expected).unwrap(), bytes, "{tag}");
            assert_eq!(AccountEvent::decode(tag, 1, bytes).unwrap(), expected);
        }
    }

    #[test]
    fn errors_and_state_round_trip() {
        let errors = [
            AccountError::AlreadyOpen,
            AccountError::NotOpen,
            AccountError::AccountClosed,
            AccountError::InvalidAmount,
            AccountError::InsufficientFunds {
                balance: 3,
                requested: 4,
            },
        ];
        for error in errors {
            let bytes = rmp_serde::to_vec(&error).unwrap();
            assert_eq!(
                rmp_serde::from_slice::<AccountError>(&bytes).unwrap(),
                error
            );
        }
        let mut state = Account::default();
        for event in [opened(), deposited(42)] {
            state.apply(&event);
        }
        let bytes = rmp_serde::to_vec(&state).unwrap();
        assert_eq!(rmp_serde::from_slice::<Account>(&bytes).unwrap(), state);
    }
}
