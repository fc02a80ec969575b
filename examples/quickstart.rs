//! Opens two bank accounts, moves money, shows a typed rejection, restarts the runtime and
//! shows that the state was recovered from the embedded store.
//!
//! Run with `cargo run --example quickstart`. Data goes to `data/quickstart` (wiped first).

use incarnate::{CommandError, DomainEvent, Runtime};
use incarnate_actors::account::{Account, AccountCommand, AccountError};

const DATA_DIR: &str = "data/quickstart";

fn runtime() -> Result<Runtime, Box<dyn std::error::Error>> {
    Ok(Runtime::builder()
        .data_dir(DATA_DIR)
        .register::<Account>()
        .build()?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = std::fs::remove_dir_all(DATA_DIR);
    let rt = runtime()?;

    println!("== first run: commands through live aggregate actors ==");
    let steps = [
        (
            "alice",
            AccountCommand::Open {
                owner: "Alice".into(),
            },
        ),
        (
            "bob",
            AccountCommand::Open {
                owner: "Bob".into(),
            },
        ),
        ("alice", AccountCommand::Deposit { amount: 10_000 }),
        ("alice", AccountCommand::Withdraw { amount: 2_500 }),
        ("bob", AccountCommand::Deposit { amount: 700 }),
        ("bob", AccountCommand::Withdraw { amount: 1_000 }),
    ];
    for (id, command) in steps {
        let shown = format!("{command:?}");
        match rt.send::<Account>(id, command).await {
            Ok(done) => {
                for e in &done.events {
                    println!(
                        "  {id:<6} {shown:<40} -> #{} {} (global position {})",
                        e.sequence,
                        e.event.event_type(),
                        e.position
                    );
                }
            }
            Err(CommandError::Rejected(AccountError::InsufficientFunds { balance, requested })) => {
                println!("  {id:<6} {shown:<40} -> rejected: insufficient funds (balance {balance}, requested {requested})");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (alice, _) = rt.state::<Account>("alice").await?;
    println!("  alice's balance: {} cents", alice.balance);

    println!("== shutdown: in-flight commands finish, the store is flushed and closed ==");
    rt.shutdown().await?;

    println!("== second run: actors activate from the store on their first message ==");
    let rt = runtime()?;
    for id in ["alice", "bob"] {
        let (account, version) = rt.state::<Account>(id).await?;
        println!(
            "  {id:<6} recovered at version {version}: owner {}, balance {} cents, {:?}",
            account.owner, account.balance, account.status
        );
    }
    println!("== the global log, as projectors will read it ==");
    for envelope in rt.store().read_log(1, 100).await? {
        println!(
            "  {:>3}  {:<18} {}#{}",
            envelope.position, envelope.event_type, envelope.stream, envelope.sequence
        );
    }
    rt.shutdown().await?;
    Ok(())
}
