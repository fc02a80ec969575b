//! Q2 under a real crash: a child process runs a runtime with bank accounts and three projectors
//! over sled (`sync`) while commands stream in, and is SIGKILLed at a varying point. After
//! reopening, once each projector has caught up with the head:
//!
//! - the exactly-once read models ([`AccountBalances`]' `BALANCES` and `STATEMENTS`) equal a
//!   pure fold of the log: one statement line per account event, nothing doubled or missing;
//! - an exactly-once probe counted every position exactly once, and the restarted instance
//!   handled exactly the positions after the checkpoint the crash left;
//! - an at-least-once probe counted every position at least once (redeliveries allowed).
//!
//! The child is this test binary run again on the ignored test [`crash_child`], with the database
//! path in [`CHILD_ENV`] (the pattern of `store_crash`). It prints `ACK <account> <version>
//! <projected>` (flushed) after each command that stored events; the parent kills it after a
//! varying number of acks. Rounds share one database, so each child continues where the previous
//! one died, and each check covers every crash so far.

use std::path::Path;

use incarnate::{CommandError, Delivery, EventStore, ProjectorOptions, Runtime};
use incarnate_actors::account::{Account, AccountCommand};
use incarnate_actors::balances::AccountBalances;

use crate::crash_child::{child_env, emit, seed, CrashChild, Rng};
use crate::projection_support::{
    assert_account_tables_match_log, builder, committed_checkpoint, counts, once, Probe,
};
use crate::support::{account, open_sled};

/// Carries the database path to the child; the child test does nothing without it.
const CHILD_ENV: &str = "INCARNATE_PROJECTION_CRASH_CHILD";
const CHILD_TEST: &str = "projection_crash::crash_child";
const ACCOUNTS: usize = 6;
const ROUNDS: usize = 4;
/// Bounds the child's work if it is somehow never killed.
const MAX_COMMANDS_PER_ACCOUNT: u64 = 5_000;
const EXACT: &str = "crash_exact";
const EXACT_TABLE: &str = "crash_exact_seen";
const AT_LEAST: &str = "crash_at_least";
const AT_LEAST_TABLE: &str = "crash_at_least_seen";

fn account_id(a: usize) -> String {
    format!("acct-{a}")
}

/// The runtime both the child and the parent run: accounts, the balances read model and two
/// probes, one per delivery guarantee.
fn runtime(path: &Path, exact: Probe, at_least: Probe) -> Runtime {
    builder(path)
        .projector(AccountBalances)
        .projector(exact)
        .projector_with(
            at_least,
            ProjectorOptions {
                delivery: Delivery::AtLeastOnce {
                    every_events: 16,
                    every_ms: 50,
                },
                batch_size: 8,
                ..ProjectorOptions::default()
            },
        )
        .build()
        .expect("build the runtime")
}

#[test]
fn sigkill_while_projecting_leaves_exactly_once_read_models_equal_to_a_fold_of_the_log() {
    let seed = seed("INCARNATE_CRASH_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The highest acknowledged version of each account over every round so far.
    let mut acked = vec![0u64; ACCOUNTS];

    for round in 0..ROUNDS {
        let kill_after = 10 + rng.next() % 140;
        let context = format!("seed {seed}, round {round}, kill after {kill_after} acks");
        let child = CrashChild::spawn(CHILD_TEST, [(CHILD_ENV, &path)]);

        let mut acks = 0u64;
        let mut projected_at_kill = 0;
        let end = child.run(|line| {
            let Some(rest) = line.strip_prefix("ACK ") else {
                return false;
            };
            let fields: Vec<u64> = rest.split(' ').map(|f| f.parse().unwrap()).collect();
            let [a, version, projected] = fields[..] else {
                panic!("{context}: bad line {line:?}");
            };
            let a = a as usize;
            assert!(
                version > acked[a],
                "{context}: account {a} acked {version} twice"
            );
            acked[a] = version;
            acks += 1;
            if acks == kill_after {
                projected_at_kill = projected;
            }
            acks == kill_after
        });
        end.assert_killed(&context, &format!("{acks} acks"));
        assert!(!end.status.success(), "{context}: the child was not killed");

        let context = format!("{context} (balances projected to {projected_at_kill})");
        runtime.block_on(check_recovered(&path, &acked, &context));
    }
    assert!(acked.iter().all(|&a| a > 1), "seed {seed}: {acked:?}");
}

/// Reopens the database with the same projectors, lets them catch up and checks their read
/// models against the log.
async fn check_recovered(path: &Path, acked: &[u64], context: &str) {
    // The checkpoints exactly as the crash left them.
    let store = open_sled(path);
    let exact_checkpoint = committed_checkpoint(&store, EXACT).await;
    store.close().await.unwrap();

    let exact = Probe::new(EXACT, EXACT_TABLE);
    let exact_log = exact.log();
    let rt = runtime(path, exact, Probe::new(AT_LEAST, AT_LEAST_TABLE));
    let store = rt.store();
    let head = store.head();
    for (a, &acked) in acked.iter().enumerate() {
        let highest = store
            .highest_sequence(&account(&account_id(a)))
            .await
            .unwrap();
        assert!(
            highest >= acked,
            "{context}: account {a} acked {acked}, stored {highest}"
        );
    }
    for name in [AccountBalances::NAME, EXACT, AT_LEAST] {
        rt.wait_for_projection(name, head)
            .await
            .unwrap_or_else(|e| panic!("{context}: {e}"));
    }

    // Exactly once: the read models are a fold of the log.
    assert_account_tables_match_log(&*store, context).await;
    assert_eq!(
        counts(&*store, EXACT_TABLE).await,
        once(1..=head),
        "{context}"
    );
    assert!(exact_checkpoint <= head, "{context}");
    assert_eq!(
        exact_log.handled(),
        (exact_checkpoint + 1..=head).collect::<Vec<_>>(),
        "{context}: the restarted instance resumes at checkpoint {exact_checkpoint}"
    );
    // At least once: nothing skipped, repeats allowed.
    let at_least = counts(&*store, AT_LEAST_TABLE).await;
    assert_eq!(
        at_least.keys().copied().collect::<Vec<_>>(),
        (1..=head).collect::<Vec<_>>(),
        "{context}"
    );
    assert!(at_least.values().all(|&n| n >= 1), "{context}");
    let repeated: u32 = at_least.values().map(|n| n - 1).sum();
    eprintln!(
        "{context}: head {head}, exactly-once checkpoint at the crash {exact_checkpoint}, \
         at-least-once repeats so far {repeated}"
    );
    rt.shutdown().await.unwrap();
}

/// The crashing child: streams deposits and withdrawals to every account until killed. Run
/// only by the test above, which names it exactly and sets [`CHILD_ENV`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the projection crash test in a child process"]
async fn crash_child() {
    let Some(path) = child_env(CHILD_ENV) else {
        return;
    };
    let rt = runtime(
        Path::new(&path),
        Probe::new(EXACT, EXACT_TABLE),
        Probe::new(AT_LEAST, AT_LEAST_TABLE),
    );
    let tasks: Vec<_> = (0..ACCOUNTS)
        .map(|a| tokio::spawn(child_account(rt.clone(), a)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    rt.shutdown().await.unwrap();
}

async fn child_account(rt: Runtime, a: usize) {
    let id = account_id(a);
    let (state, _) = rt.state::<Account>(id.as_str()).await.unwrap();
    let mut commands = Vec::new();
    if !state.is_open() {
        commands.push(AccountCommand::Open { owner: id.clone() });
    }
    let ops = (0..MAX_COMMANDS_PER_ACCOUNT).map(|i| {
        if i % 3 == 2 {
            AccountCommand::Withdraw { amount: 70 }
        } else {
            AccountCommand::Deposit { amount: 50 + i % 7 }
        }
    });
    for command in commands.into_iter().chain(ops) {
        match rt.send::<Account>(id.as_str(), command).await {
            Ok(done) if !done.events.is_empty() => {
                let projected = rt
                    .projection_status(AccountBalances::NAME)
                    .unwrap()
                    .processed;
                emit(format_args!("ACK {a} {} {projected}", done.version));
            }
            Ok(_) | Err(CommandError::Rejected(_)) => {}
            Err(e) => panic!("account {a}: {e}"),
        }
    }
}
