//! Read models over the bank accounts: the current balance of each account and each account's
//! statement (one line per movement), kept by one projector in the store beside the events.
//!
//! Both tables are written in the same atomic commit as the projector's checkpoint
//! (exactly-once): after any crash they equal a fold of the log.

use async_trait::async_trait;
use incarnate::{
    EventEnvelope, EventFilter, ProjectionError, Projector, ReadModelTx, Table, TableKey,
};
use serde::{Deserialize, Serialize};

use crate::account::{Account, AccountEvent};

/// One account's row in [`BALANCES`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceRow {
    /// The account holder.
    pub owner: String,
    /// The balance in cents.
    pub balance: u64,
    /// Whether the account is closed.
    pub closed: bool,
    /// The account's version (sequence of its last event).
    pub version: u64,
}

/// The key of one statement line: the account, then the sequence of its event, so a scan from
/// `(account, 0)` lists the account's statement in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StatementKey {
    /// The account id.
    pub account: String,
    /// The event's sequence number in the account.
    pub sequence: u64,
}

impl TableKey for StatementKey {
    fn encode_key(&self) -> Vec<u8> {
        // A 0 byte ends the id (ids are UTF-8 text without NULs), so one account's lines are
        // contiguous and ordered by sequence.
        let mut key = Vec::with_capacity(self.account.len() + 9);
        key.extend_from_slice(self.account.as_bytes());
        key.push(0);
        key.extend_from_slice(&self.sequence.to_be_bytes());
        key
    }

    fn decode_key(bytes: &[u8]) -> Option<Self> {
        let split = bytes.len().checked_sub(9)?;
        let (account, rest) = bytes.split_at(split);
        let (zero, sequence) = rest.split_first()?;
        if *zero != 0 {
            return None;
        }
        Some(Self {
            account: String::from_utf8(account.to_vec()).ok()?,
            sequence: u64::from_be_bytes(sequence.try_into().ok()?),
        })
    }
}

/// One movement on an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    /// The event's global position.
    pub position: u64,
    /// What happened ("opened", "deposit", "withdrawal", "closed").
    pub kind: String,
    /// The amount moved (0 for opened / closed).
    pub amount: u64,
    /// The balance after it.
    pub balance: u64,
}

/// Account id → [`BalanceRow`].
pub const BALANCES: Table<String, BalanceRow> = Table::new("account_balances");
/// (account id, sequence) → [`StatementLine`].
pub const STATEMENTS: Table<StatementKey, StatementLine> = Table::new("account_statements");

/// The projector that keeps [`BALANCES`] and [`STATEMENTS`].
#[derive(Debug, Default)]
pub struct AccountBalances;

impl AccountBalances {
    /// Its registered name.
    pub const NAME: &'static str = "account_balances";
}

#[async_trait]
impl Projector for AccountBalances {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().aggregate(<Account as incarnate::Aggregate>::TYPE)
    }

    fn tables(&self) -> Vec<&'static str> {
        vec![BALANCES.name(), STATEMENTS.name()]
    }

    async fn handle(
        &mut self,
        envelope: &EventEnvelope,
        tx: &mut ReadModelTx,
    ) -> Result<(), ProjectionError> {
        let account = envelope.stream.aggregate_id.to_string();
        let event: AccountEvent = envelope.decode_event()?;
        let mut row = BALANCES.get(tx, &account).await?.unwrap_or_default();
        let (kind, amount) = match &event {
            AccountEvent::Opened { owner } => {
                row.owner.clone_from(owner);
                ("opened", 0)
            }
            AccountEvent::Deposited { amount } => {
                row.balance = row.balance.saturating_add(*amount);
                ("deposit", *amount)
            }
            AccountEvent::Withdrawn { amount } => {
                row.balance = row.balance.saturating_sub(*amount);
                ("withdrawal", *amount)
            }
            AccountEvent::Closed => {
                row.closed = true;
                ("closed", 0)
            }
        };
        row.version = envelope.sequence;
        BALANCES.put(tx, &account, &row)?;
        STATEMENTS.put(
            tx,
            &StatementKey {
                account,
                sequence: envelope.sequence,
            },
            &StatementLine {
                position: envelope.position,
                kind: kind.to_owned(),
                amount,
                balance: row.balance,
            },
        )
    }
}

/// The statement of `account`, oldest line first, as committed.
pub async fn statement(
    store: &dyn incarnate::EventStore,
    account: &str,
) -> Result<Vec<(u64, StatementLine)>, ProjectionError> {
    let from = StatementKey {
        account: account.to_owned(),
        sequence: 0,
    };
    let mut out = Vec::new();
    let mut next = Some(from);
    while let Some(start) = next.take() {
        let page = STATEMENTS.scan(store, Some(&start), 256).await?;
        let full = page.len() == 256;
        for (key, line) in page {
            if key.account != account {
                return Ok(out);
            }
            next = Some(StatementKey {
                account: key.account,
                sequence: key.sequence + 1,
            });
            out.push((key.sequence, line));
        }
        if !full {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_keys_sort_by_account_then_sequence() {
        let a1 = StatementKey {
            account: "a".into(),
            sequence: 1,
        };
        let a2 = StatementKey {
            account: "a".into(),
            sequence: 256,
        };
        let ab = StatementKey {
            account: "ab".into(),
            sequence: 0,
        };
        assert!(a1.encode_key() < a2.encode_key());
        assert!(a2.encode_key() < ab.encode_key());
        assert_eq!(StatementKey::decode_key(&a2.encode_key()), Some(a2));
    }
}
