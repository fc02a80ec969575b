//! A money transfer between two accounts: the `Transfer` aggregate records the request and its
//! end; the [`TransferSaga`] moves the money: withdraw from the source, deposit to the target,
//! and refund the source if the deposit is rejected.
//!
//! Terminal states (documented compensation):
//! - `Completed`: the source was debited and the target credited, once each.
//! - `Failed("withdrawal rejected: ...")`: nothing moved.
//! - `Failed("deposit rejected: ...; refunded")`: the source was debited and credited back.
//! - `Failed("refund failed: ...")`: the deposit and the refund were both refused; the amount is
//!   held by the bank and needs a person (never happens with the account rules here, since an
//!   open source account accepts deposits... unless it was closed meanwhile).

use async_trait::async_trait;
use incarnate::{
    Aggregate, CommandOptions, CommandOutcome, Correlation, DomainEvent, EventEnvelope,
    EventFilter, ProcessManager, Runtime, SagaError, Step,
};
use serde::{Deserialize, Serialize};

use crate::account::{Account, AccountCommand};

/// Where a transfer is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferStatus {
    /// Not requested yet.
    #[default]
    New,
    /// Requested; the saga is moving the money.
    Requested,
    /// Done.
    Completed,
    /// Ended without moving money (after compensation if needed), with the reason.
    Failed(String),
}

/// The state of one transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Where it is.
    pub status: TransferStatus,
    /// Source account.
    pub from: String,
    /// Target account.
    pub to: String,
    /// Cents.
    pub amount: u64,
}

/// Commands of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferCommand {
    /// Asks to move `amount` cents from `from` to `to`.
    Request {
        /// Source account id.
        from: String,
        /// Target account id.
        to: String,
        /// Cents.
        amount: u64,
    },
    /// Records success (sent by the saga).
    Complete,
    /// Records failure (sent by the saga).
    Fail {
        /// Why.
        reason: String,
    },
}

/// Events of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    /// A transfer was requested.
    #[serde(rename = "Requested")]
    Requested {
        /// Source account id.
        from: String,
        /// Target account id.
        to: String,
        /// Cents.
        amount: u64,
    },
    /// The money moved.
    #[serde(rename = "Completed")]
    Completed,
    /// The transfer failed.
    #[serde(rename = "Failed")]
    Failed {
        /// Why.
        reason: String,
    },
}

impl TransferEvent {
    /// Stored tag of `Requested`.
    pub const REQUESTED: &'static str = "TransferRequested";
    /// Stored tag of `Completed`.
    pub const COMPLETED: &'static str = "TransferCompleted";
    /// Stored tag of `Failed`.
    pub const FAILED: &'static str = "TransferFailed";
}

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> &'static str {
        match self {
            TransferEvent::Requested { .. } => Self::REQUESTED,
            TransferEvent::Completed => Self::COMPLETED,
            TransferEvent::Failed { .. } => Self::FAILED,
        }
    }
}

/// Why a transfer command was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TransferError {
    /// `Request` twice.
    #[error("the transfer was already requested")]
    AlreadyRequested,
    /// `Complete`/`Fail` before `Request`.
    #[error("the transfer was not requested")]
    NotRequested,
    /// `Complete`/`Fail` after the end.
    #[error("the transfer has already ended")]
    AlreadyEnded,
    /// Zero amount or same source and target.
    #[error("invalid transfer")]
    Invalid,
}

impl Aggregate for Transfer {
    const TYPE: &'static str = "transfer";
    type Command = TransferCommand;
    type Event = TransferEvent;
    type Error = TransferError;

    fn handle(&self, command: &TransferCommand) -> Result<Vec<TransferEvent>, TransferError> {
        match (command, &self.status) {
            (TransferCommand::Request { .. }, s) if *s != TransferStatus::New => {
                Err(TransferError::AlreadyRequested)
            }
            (TransferCommand::Request { from, to, amount }, _) => {
                if *amount == 0 || from == to {
                    return Err(TransferError::Invalid);
                }
                Ok(vec![TransferEvent::Requested {
                    from: from.clone(),
                    to: to.clone(),
                    amount: *amount,
                }])
            }
            (_, TransferStatus::New) => Err(TransferError::NotRequested),
            (_, TransferStatus::Completed | TransferStatus::Failed(_)) => {
                Err(TransferError::AlreadyEnded)
            }
            (TransferCommand::Complete, TransferStatus::Requested) => {
                Ok(vec![TransferEvent::Completed])
            }
            (TransferCommand::Fail { reason }, TransferStatus::Requested) => {
                Ok(vec![TransferEvent::Failed {
                    reason: reason.clone(),
                }])
            }
        }
    }

    fn apply(&mut self, event: &TransferEvent) {
        match event {
            TransferEvent::Requested { from, to, amount } => {
                self.status = TransferStatus::Requested;
                self.from.clone_from(from);
                self.to.clone_from(to);
                self.amount = *amount;
            }
            TransferEvent::Completed => self.status = TransferStatus::Completed,
            TransferEvent::Failed { reason } => {
                self.status = TransferStatus::Failed(reason.clone())
            }
        }
    }
}

/// The saga's commands: what it asks of accounts and of the transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferStep {
    /// Debit the source.
    Withdraw {
        /// Account id.
        account: String,
        /// Cents.
        amount: u64,
    },
    /// Credit the target.
    Deposit {
        /// Account id.
        account: String,
        /// Cents.
        amount: u64,
    },
    /// Credit the source back (compensation).
    Refund {
        /// Account id.
        account: String,
        /// Cents.
        amount: u64,
    },
    /// Record the end on the transfer.
    Finish {
        /// Transfer id.
        transfer: String,
        /// `None` for success, the reason for failure.
        failure: Option<String>,
    },
}

/// Where one transfer saga instance is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferProgress {
    /// The transfer id.
    pub transfer: String,
    /// Source account.
    pub from: String,
    /// Target account.
    pub to: String,
    /// Cents.
    pub amount: u64,
}

/// Moves the money of each requested transfer, with a refund as compensation.
#[derive(Debug, Default)]
pub struct TransferSaga;

impl TransferSaga {
    /// Its registered name.
    pub const NAME: &'static str = "transfer_saga";
}

#[async_trait]
impl ProcessManager for TransferSaga {
    type State = TransferProgress;
    type Command = TransferStep;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all()
            .aggregate(Transfer::TYPE)
            .event(TransferEvent::REQUESTED)
    }

    fn correlate(&self, event: &EventEnvelope) -> Option<Correlation> {
        Some(Correlation::start(event.stream.aggregate_id.as_str()))
    }

    fn on_event(
        &self,
        state: &mut TransferProgress,
        event: &EventEnvelope,
    ) -> Result<Step<TransferStep>, SagaError> {
        match event.decode_event::<TransferEvent>()? {
            TransferEvent::Requested { from, to, amount } => {
                *state = TransferProgress {
                    transfer: event.stream.aggregate_id.to_string(),
                    from: from.clone(),
                    to,
                    amount,
                };
                Ok(Step::none().send(TransferStep::Withdraw {
                    account: from,
                    amount,
                }))
            }
            _ => Ok(Step::none()),
        }
    }

    fn on_outcome(
        &self,
        state: &mut TransferProgress,
        command: &TransferStep,
        outcome: &CommandOutcome,
    ) -> Result<Step<TransferStep>, SagaError> {
        let finish = |failure: Option<String>| TransferStep::Finish {
            transfer: state.transfer.clone(),
            failure,
        };
        let refused = |outcome: &CommandOutcome| match outcome {
            CommandOutcome::Rejected { reason } => reason.clone(),
            CommandOutcome::Failed { error } => error.clone(),
            CommandOutcome::Accepted { .. } => String::new(),
        };
        let accepted = matches!(outcome, CommandOutcome::Accepted { .. });
        Ok(match command {
            TransferStep::Withdraw { .. } if accepted => Step::none().send(TransferStep::Deposit {
                account: state.to.clone(),
                amount: state.amount,
            }),
            TransferStep::Withdraw { .. } => Step::none().send(finish(Some(format!(
                "withdrawal rejected: {}",
                refused(outcome)
            )))),
            TransferStep::Deposit { .. } if accepted => Step::none().send(finish(None)),
            TransferStep::Deposit { .. } => Step::none().send(TransferStep::Refund {
                account: state.from.clone(),
                amount: state.amount,
            }),
            TransferStep::Refund { .. } if accepted => {
                Step::none().send(finish(Some("deposit rejected; refunded".to_owned())))
            }
            TransferStep::Refund { .. } => {
                Step::none().send(finish(Some(format!("refund failed: {}", refused(outcome)))))
            }
            TransferStep::Finish { .. } => Step::none().complete(),
        })
    }

    async fn dispatch(
        &self,
        runtime: &Runtime,
        command: TransferStep,
        options: CommandOptions,
    ) -> CommandOutcome {
        match command {
            TransferStep::Withdraw { account, amount } => CommandOutcome::from_result(
                &runtime
                    .send_with::<Account>(account, AccountCommand::Withdraw { amount }, options)
                    .await,
            ),
            TransferStep::Deposit { account, amount }
            | TransferStep::Refund { account, amount } => CommandOutcome::from_result(
                &runtime
                    .send_with::<Account>(account, AccountCommand::Deposit { amount }, options)
                    .await,
            ),
            TransferStep::Finish { transfer, failure } => {
                let command = match failure {
                    None => TransferCommand::Complete,
                    Some(reason) => TransferCommand::Fail { reason },
                };
                CommandOutcome::from_result(
                    &runtime
                        .send_with::<Transfer>(transfer, command, options)
                        .await,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use incarnate::testing::AggregateTest;

    #[test]
    fn a_transfer_is_requested_once_and_ends_once() {
        AggregateTest::<Transfer>::given_no_previous_events()
            .when(TransferCommand::Request {
                from: "a".into(),
                to: "b".into(),
                amount: 5,
            })
            .then_expect_events([TransferEvent::Requested {
                from: "a".into(),
                to: "b".into(),
                amount: 5,
            }]);
        let requested = TransferEvent::Requested {
            from: "a".into(),
            to: "b".into(),
            amount: 5,
        };
        AggregateTest::<Transfer>::given([requested.clone()])
            .when(TransferCommand::Request {
                from: "a".into(),
                to: "b".into(),
                amount: 5,
            })
            .then_expect_error(TransferError::AlreadyRequested);
        AggregateTest::<Transfer>::given([requested.clone(), TransferEvent::Completed])
            .when(TransferCommand::Fail { reason: "x".into() })
            .then_expect_error(TransferError::AlreadyEnded);
        AggregateTest::<Transfer>::given_no_previous_events()
            .when(TransferCommand::Request {
                from: "a".into(),
                to: "a".into(),
                amount: 5,
            })
            .then_expect_error(TransferError::Invalid);
    }

    #[test]
    fn a_rejected_deposit_is_compensated_by_a_refund_then_a_failure() {
        let saga = TransferSaga;
        let mut state = TransferProgress {
            transfer: "t".into(),
            from: "a".into(),
            to: "b".into(),
            amount: 5,
        };
        let rejected = CommandOutcome::Rejected {
            reason: "closed".into(),
        };
        let step = saga
            .on_outcome(
                &mut state,
                &TransferStep::Deposit {
                    account: "b".into(),
                    amount: 5,
                },
                &rejected,
            )
            .map_err(|e| e.to_string());
        assert_eq!(
            step.map(|s| s.commands),
            Ok(vec![TransferStep::Refund {
                account: "a".into(),
                amount: 5
            }])
        );
        let accepted = CommandOutcome::Accepted { version: 3 };
        let step = saga
            .on_outcome(
                &mut state,
                &TransferStep::Refund {
                    account: "a".into(),
                    amount: 5,
                },
                &accepted,
            )
            .map_err(|e| e.to_string());
        assert_eq!(
            step.map(|s| s.commands),
            Ok(vec![TransferStep::Finish {
                transfer: "t".into(),
                failure: Some("deposit rejected; refunded".into())
            }])
        );
    }
}
