//! A real crash under the runtime: a child process streams durable (`sync`) commands from
//! several callers to a few aggregates and is SIGKILLed; after reopening, no acknowledged
//! command is lost, each is stored exactly once at the sequence it was acknowledged with, the
//! recovered state is the fold of the store, and retrying an acknowledged command id is
//! answered from the recovered idempotency records instead of being applied again.
//!
//! Same pattern as `store_crash`: the child is this test binary run again on the ignored test
//! [`runtime_crash_child`], with the data directory in [`CHILD_ENV`]. It prints
//! `ACK <aggregate id> <sequence> <command id> <value>` (flushed) after each acknowledged
//! command; the parent kills it after a varying number of acks, reads the lines the pipe still
//! holds (all acknowledged before death), reopens and checks. Rounds share one directory, so
//! each child continues the streams (and the snapshots) the previous one left.

use std::collections::BTreeMap;
use std::path::Path;

use incarnate::{CommandOptions, Config, Runtime};
use uuid::Uuid;

use crate::crash_child::{child_env, emit, seed, CrashChild, Rng};
use crate::runtime_support::{
    decode, fold, shutdown, single_sequence, stored, test_config, Tally, TallyCommand, TallyEvent,
};

const CHILD_ENV: &str = "INCARNATE_RUNTIME_CRASH_CHILD";
const CHILD_TEST: &str = "runtime_crash::runtime_crash_child";
const CALLERS: usize = 4;
const AGGREGATES: usize = 2;
const ROUNDS: usize = 3;
/// Bounds the child's work if it is somehow never killed.
const MAX_COMMANDS_PER_CALLER: u64 = 5_000;

fn aggregate(i: usize) -> String {
    format!("crash-{i}")
}

/// Snapshots every 16 events, so recoveries after a crash go through a snapshot and a tail.
fn crash_config(path: &Path) -> Config {
    let mut config = test_config(path);
    config.aggregates.default.snapshot_every = 16;
    config
}

/// One acknowledged command, as the child reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ack {
    command_id: Uuid,
    value: u64,
}

#[test]
fn sigkill_during_durable_commands_loses_no_acknowledged_command() {
    let seed = seed("INCARNATE_CRASH_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let tokio = tokio::runtime::Runtime::new().unwrap();
    // Every acknowledged command of every round: aggregate → sequence → ack.
    let mut acked: Vec<BTreeMap<u64, Ack>> = vec![BTreeMap::new(); AGGREGATES];

    for round in 0..ROUNDS {
        let kill_after = 30 + rng.next() % 120;
        let context = format!("seed {seed}, round {round}, kill after {kill_after} acks");
        let child = CrashChild::spawn(CHILD_TEST, [(CHILD_ENV, &path)]);

        let mut acks = 0u64;
        // Reading to the end also collects the acks still in the pipe after the kill: each was
        // printed after its command was acknowledged, so each must have survived.
        let end = child.run(|line| {
            let Some(rest) = line.strip_prefix("ACK ") else {
                return false;
            };
            let fields: Vec<&str> = rest.split(' ').collect();
            let [agg, sequence, command_id, value] = fields[..] else {
                panic!("{context}: malformed line {line:?}");
            };
            let agg: usize = agg.strip_prefix("crash-").unwrap().parse().unwrap();
            let sequence: u64 = sequence.parse().unwrap();
            let ack = Ack {
                command_id: command_id.parse().unwrap(),
                value: value.parse().unwrap(),
            };
            let previous = acked[agg].insert(sequence, ack);
            assert!(
                previous.is_none(),
                "{context}: crash-{agg}#{sequence} acknowledged twice ({previous:?}, {ack:?})"
            );
            acks += 1;
            acks == kill_after
        });
        end.assert_killed(&context, &format!("{acks} acks"));
        assert!(!end.status.success(), "{context}: the child was not killed");

        tokio.block_on(check_recovered(&path, &acked, &context));
    }
    for (i, a) in acked.iter().enumerate() {
        assert!(!a.is_empty(), "seed {seed}: crash-{i} never acknowledged");
    }
}

/// Reopens a runtime on the directory and checks it against everything acknowledged so far.
async fn check_recovered(path: &Path, acked: &[BTreeMap<u64, Ack>], context: &str) {
    let rt = Runtime::builder()
        .config(crash_config(path))
        .register::<Tally>()
        .build()
        .unwrap();
    let store = rt.store();
    for (i, acked) in acked.iter().enumerate() {
        let id = aggregate(i);
        // Dense from 1, nothing deleted (no retention by event deletion here).
        let (folded, version) = fold::<Tally>(&*store, &id).await;
        let slice = stored::<Tally>(&*store, &id).await;
        for (sequence, ack) in acked {
            let Some(envelope) = slice.events.get(*sequence as usize - 1) else {
                panic!("{context}: {id}#{sequence} was acknowledged but is not stored (version {version})");
            };
            assert_eq!(
                envelope.causation.command_id,
                Some(ack.command_id),
                "{context}: {id}#{sequence} holds another command"
            );
            assert_eq!(
                decode::<Tally>(envelope),
                TallyEvent::Added(ack.value),
                "{context}: {id}#{sequence}"
            );
        }
        // Each command id is stored once.
        let mut ids: Vec<_> = slice
            .events
            .iter()
            .map(|e| e.causation.command_id.expect("every command has an id"))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len() as u64,
            version,
            "{context}: {id} has a repeated command"
        );

        let (state, recovered_version) = rt.state::<Tally>(id.as_str()).await.unwrap();
        assert_eq!(
            (state, recovered_version),
            (folded, version),
            "{context}: {id}: the recovered state is the fold of the store"
        );
        // Retrying the newest acknowledged command is answered from the recovered records.
        if let Some((sequence, ack)) = acked.last_key_value() {
            let retry = rt
                .send_with::<Tally>(
                    id.as_str(),
                    TallyCommand::Add(ack.value),
                    CommandOptions::new().command_id(ack.command_id),
                )
                .await
                .unwrap();
            assert!(
                retry.deduplicated,
                "{context}: {id}#{sequence} applied twice"
            );
            assert_eq!(retry.first_sequence, *sequence, "{context}");
            assert_eq!(
                stored::<Tally>(&*store, &id).await.highest_sequence,
                version,
                "{context}: the retry stored nothing"
            );
        }
    }
    shutdown(rt).await;
}

/// The crashing child: callers stream commands until killed. Run only by the test above,
/// which names it exactly and sets [`CHILD_ENV`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the runtime crash test in a child process"]
async fn runtime_crash_child() {
    let Some(path) = child_env(CHILD_ENV) else {
        return;
    };
    let rt = Runtime::builder()
        .config(crash_config(Path::new(&path)))
        .register::<Tally>()
        .build()
        .unwrap();
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let rt = rt.clone();
            tokio::spawn(async move {
                let id = aggregate(c % AGGREGATES);
                for i in 0..MAX_COMMANDS_PER_CALLER {
                    let value = (c as u64) * 100_000 + i + 1;
                    let command_id = Uuid::now_v7();
                    let done = rt
                        .send_with::<Tally>(
                            id.as_str(),
                            TallyCommand::Add(value),
                            CommandOptions::new().command_id(command_id),
                        )
                        .await
                        .unwrap();
                    let sequence = single_sequence(&done);
                    emit(format_args!("ACK {id} {sequence} {command_id} {value}"));
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    rt.shutdown().await.unwrap();
}
