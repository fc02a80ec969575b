//! `peer_cqrs_es`: one hot account against cqrs-es 0.5 with its in-memory store.
//!
//! Both sides run the same domain code: the reference `Account` of `incarnate-actors` (cqrs-es
//! gets it through thin newtypes, [`PeerAccount`] and [`PeerEvent`], that call the same `handle`
//! and `apply`).
//!
//! - incarnate: one account on a fresh sled store, `durability = buffered`, given 1,000 prior
//!   events (untimed), then 1,000 timed deposits from 16 concurrent closed-loop callers; seven
//!   such accounts in turn per round, the median kept (a burst lasts ~20 ms: a stall of the
//!   host can take one or two of them).
//! - cqrs-es 0.5: `CqrsFramework` over its `MemStore`, the account given the same 1,000 prior
//!   events (untimed), then the same 1,000 deposits sent one after another (its framework loads
//!   and replays the aggregate's whole history for each command).
//!
//! Ratio = incarnate commands/s / cqrs-es commands/s (target >= 10).
//!
//! cqrs-es 0.5's `MemStore` prints two lines to stdout per command ("loading: N events...",
//! "storing: ..."). The peer side therefore runs in a child process (this binary re-run with
//! `--peer-child`) whose stdout is `/dev/null`; it reports its figure on stderr. The prints still
//! cost cqrs-es two `write` syscalls to `/dev/null` per command (~1 µs each), a few percent of
//! its ~150 µs per command at this history length.

use std::time::Instant;

use cqrs_es::event_sink::EventSink;
use cqrs_es::mem_store::MemStore;
use cqrs_es::CqrsFramework;
use incarnate::DurabilityMode;
use incarnate_actors::{Account, AccountCommand, AccountError, AccountEvent};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

use super::node::{account_id, deposit, open, runtime_at, write_history};
use super::support::alternate;
use super::{Better, Sample, Settings, Workload};
use crate::stats::median;
use crate::BoxError;

const PRIOR: usize = 1_000;
const COMMANDS: usize = 1_000;
const CALLERS: usize = 16;
const ID: &str = "acc-000000";
const REPS: usize = 7;

pub(crate) const WORKLOAD: Workload = Workload {
    name: "peer_cqrs_es",
    about:
        "one hot Account, 1,000 prior events: incarnate (16 callers, buffered) vs cqrs-es MemStore",
    run_round,
    max_rounds: 0,
};

/// The reference `Account`, as a cqrs-es aggregate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
struct PeerAccount(Account);

/// The reference `AccountEvent`, as a cqrs-es event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct PeerEvent(AccountEvent);

impl cqrs_es::DomainEvent for PeerEvent {
    fn event_type(&self) -> String {
        incarnate::DomainEvent::event_type(&self.0).to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl cqrs_es::Aggregate for PeerAccount {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = PeerEvent;
    type Error = AccountError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AccountCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AccountError> {
        let events = incarnate::Aggregate::handle(&self.0, &command)?;
        for event in events {
            sink.write(PeerEvent(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: PeerEvent) {
        incarnate::Aggregate::apply(&mut self.0, &event.0);
    }
}

fn run_round(runtime: &Runtime, _: &Settings, round: usize) -> Result<Vec<Sample>, BoxError> {
    let (value, baseline) = alternate(round, || ours(runtime), peer_in_child)?;
    Ok(vec![Sample {
        name: WORKLOAD.name,
        unit: "commands/s",
        better: Better::Higher,
        value,
        baseline: Some(baseline),
    }])
}

/// incarnate's side: [`REPS`] hot accounts in turn on one runtime, each given [`PRIOR`] events
/// then timed over [`COMMANDS`] deposits from [`CALLERS`] callers; the median of the reps (a
/// single 1,000-command burst lasts ~25 ms, too short to trust alone on a shared VM).
fn ours(runtime: &Runtime) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let rt = runtime_at(dir.path(), DurabilityMode::Buffered, |_| {})?;
    let result = runtime.block_on(async {
        let mut rates = Vec::with_capacity(REPS);
        for rep in 0..REPS {
            let id = account_id(rep);
            write_history(&rt, &id, PRIOR).await?;
            let elapsed = deposits_to(&rt, &id, CALLERS, COMMANDS).await?;
            let (state, version) = rt.state::<Account>(&id).await?;
            if version != (PRIOR + COMMANDS) as u64
                || state.balance != (PRIOR - 1 + COMMANDS) as u64
            {
                return Err(
                    format!("ended at version {version}, balance {}", state.balance).into(),
                );
            }
            rates.push(COMMANDS as f64 / elapsed.as_secs_f64());
        }
        rt.shutdown().await?;
        Ok::<f64, BoxError>(median(&rates))
    });
    drop(dir);
    result
}

/// `commands` deposits to account `id` from `callers` closed-loop callers; the elapsed time.
async fn deposits_to(
    rt: &incarnate::Runtime,
    id: &str,
    callers: usize,
    commands: usize,
) -> Result<std::time::Duration, BoxError> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for t in 0..callers {
        let rt = rt.clone();
        let id = id.to_owned();
        let count = commands / callers + usize::from(t < commands % callers);
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                rt.send::<Account>(&id, deposit()).await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

/// Runs [`peer`] in a child process with stdout discarded; returns its commands/s.
fn peer_in_child() -> Result<f64, BoxError> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("--peer-child")
        .stdout(std::process::Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("cqrs-es child failed: {stderr}").into());
    }
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("peer_commands_per_s "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no figure in the cqrs-es child's output: {stderr}").into())
}

/// The child's side: prints `peer_commands_per_s X` on stderr.
pub(crate) fn child() -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rate = peer(&runtime)?;
    eprintln!("peer_commands_per_s {rate}");
    Ok(())
}

fn peer(runtime: &Runtime) -> Result<f64, BoxError> {
    runtime.block_on(async {
        let store = MemStore::<PeerAccount>::default();
        let cqrs = CqrsFramework::new(store.clone(), vec![], ());
        cqrs.execute(ID, open()).await?;
        for _ in 1..PRIOR {
            cqrs.execute(ID, deposit()).await?;
        }
        let start = Instant::now();
        for _ in 0..COMMANDS {
            cqrs.execute(ID, deposit()).await?;
        }
        let elapsed = start.elapsed();
        let stored = cqrs_es::EventStore::load_events(&store, ID).await?.len();
        if stored != PRIOR + COMMANDS {
            return Err(format!("cqrs-es stored {stored} events").into());
        }
        Ok::<f64, BoxError>(COMMANDS as f64 / elapsed.as_secs_f64())
    })
}
