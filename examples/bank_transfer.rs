//! Money transfers between bank accounts, run by a saga on the embedded sled store.
//!
//! Three transfers: one that completes, one whose deposit is rejected (the target account is
//! closed) and is compensated by a refund, and one whose withdrawal is rejected (insufficient
//! funds). Prints the global log as a step-by-step trace, the account statements from the read
//! model, and checks that money is conserved.
//!
//! Run with `cargo run --example bank_transfer`. Data goes to `data/bank_transfer` (wiped first).

use incarnate::Runtime;
use incarnate_actors::account::{Account, AccountCommand};
use incarnate_actors::balances::{statement, AccountBalances, BALANCES};
use incarnate_actors::transfer::{Transfer, TransferCommand, TransferSaga};

const DATA_DIR: &str = "data/bank_transfer";

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let _ = std::fs::remove_dir_all(DATA_DIR);
    let rt = Runtime::builder()
        .data_dir(DATA_DIR)
        .register::<Account>()
        .register::<Transfer>()
        .projector(AccountBalances)
        .saga(TransferSaga)
        .build()?;

    println!("== opening accounts ==");
    for (id, owner, deposit) in [
        ("alice", "Alice", 10_000),
        ("bob", "Bob", 5_000),
        ("carol", "Carol", 0),
    ] {
        rt.send::<Account>(
            id,
            AccountCommand::Open {
                owner: owner.into(),
            },
        )
        .await?;
        if deposit > 0 {
            rt.send::<Account>(id, AccountCommand::Deposit { amount: deposit })
                .await?;
        }
        println!("  {id}: opened with {}", cents(deposit));
    }
    rt.send::<Account>("carol", AccountCommand::Close).await?;
    println!("  carol: closed (rejects deposits)");
    let total_before = total(&rt).await?;

    println!("== requesting transfers ==");
    let transfers = [
        ("t1", "alice", "bob", 3_000, "completes"),
        ("t2", "alice", "carol", 2_000, "deposit rejected: refunded"),
        ("t3", "bob", "alice", 100_000, "withdrawal rejected"),
    ];
    for (id, from, to, amount, expect) in transfers {
        rt.send::<Transfer>(
            id,
            TransferCommand::Request {
                from: from.into(),
                to: to.into(),
                amount,
            },
        )
        .await?;
        println!(
            "  {id}: {from} -> {to} {} (expected: {expect})",
            cents(amount)
        );
    }
    rt.wait_for_saga_idle(TransferSaga::NAME).await?;
    rt.wait_for_projection(AccountBalances::NAME, rt.store().head())
        .await?;

    println!("== trace: the global log, in commit order ==");
    for e in rt.store().read_log(1, usize::MAX).await? {
        let cause = match e.causation.command_id {
            Some(id) => format!("command {}", &id.to_string()[..8]),
            None => "caller".to_owned(),
        };
        println!(
            "  {:>3}  {:<18} {:<16} ({cause})",
            e.position,
            e.event_type,
            e.stream.to_string()
        );
    }

    println!("== transfers ==");
    for (id, ..) in transfers {
        let (t, _) = rt.state::<Transfer>(id).await?;
        println!("  {id}: {:?}", t.status);
    }

    println!("== statements (read model) ==");
    for id in ["alice", "bob", "carol"] {
        println!("  {id}:");
        for (seq, line) in statement(&*rt.store(), id).await? {
            println!(
                "    #{seq} {:<10} {:>10}  balance {:>10}",
                line.kind,
                cents(line.amount),
                cents(line.balance)
            );
        }
    }

    let total_after = total(&rt).await?;
    println!(
        "== money conserved: {} before, {} after ==",
        cents(total_before),
        cents(total_after)
    );
    if total_before != total_after {
        return Err("money was created or destroyed".into());
    }
    rt.shutdown().await?;
    Ok(())
}

async fn total(rt: &Runtime) -> Result<u64, Error> {
    rt.wait_for_projection(AccountBalances::NAME, rt.store().head())
        .await?;
    Ok(BALANCES
        .all(&*rt.store())
        .await?
        .iter()
        .map(|(_, row)| row.balance)
        .sum())
}

fn cents(amount: u64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}
