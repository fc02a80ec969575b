//! J7 under a real crash: a child process appends in `sync` mode and is SIGKILLed mid-write;
//! after reopening, every acknowledged append is there, no multi-event append is partial, and
//! every append that survived kept the command record committed with it.
//!
//! The child is this test binary run again on the ignored test [`crash_child`], with the database
//! path in [`CHILD_ENV`]. It prints `ACK <writer> <last sequence>` (flushed) after each
//! acknowledged append; the parent kills it after a varying number of acks, reads the lines the
//! pipe still holds (all acknowledged before death), reopens the store and checks it. Rounds
//! share one database, so each child continues the streams the previous one left. With
//! [`WRITERS`] streams written at once, each group commit dirties more streams than it writes
//! metadata for, so the kill always leaves streams whose head exists only in the log: reopening
//! must rebuild it (a wrong rebuild shows as a conflict in the next child or a short read).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use incarnate::{AppendRequest, CommandRecord, EventStore, RecordedOutcome, SledStore, StreamId};

use crate::crash_child::{child_env, emit, seed, CrashChild, Rng};
use crate::support::{account, events_for, open_sled, payload_of, read_all, read_whole_log};

/// Carries the database path to the child; the child test does nothing without it.
const CHILD_ENV: &str = "INCARNATE_CRASH_CHILD";
const CHILD_TEST: &str = "store_crash::crash_child";
const WRITERS: usize = 32;
/// Events per append: a store that exposed part of an append would leave a stream's length off
/// this multiple.
const EVENTS_PER_APPEND: u64 = 3;
const ROUNDS: usize = 5;
/// Bounds the child's work if it is somehow never killed.
const MAX_APPENDS_PER_WRITER: u64 = 5_000;

fn writer_stream(w: usize) -> StreamId {
    account(&format!("crash-{w}"))
}

#[test]
fn sigkill_during_sync_appends_loses_no_acknowledged_append_and_no_partial_one() {
    let seed = seed("INCARNATE_CRASH_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The highest acknowledged sequence of each writer over every round so far.
    let mut acked = vec![0u64; WRITERS];

    for round in 0..ROUNDS {
        let kill_after = 100 + rng.next() % 601;
        let context = format!("seed {seed}, round {round}, kill after {kill_after} acks");
        let child = CrashChild::spawn(CHILD_TEST, [(CHILD_ENV, &path)]);

        let mut acks = 0u64;
        // Reading to the end also collects the acks still in the pipe after the kill: each was
        // printed after its append returned, so each must have survived.
        let end = child.run(|line| {
            let Some(rest) = line.strip_prefix("ACK ") else {
                return false;
            };
            let (w, last) = rest.split_once(' ').unwrap();
            let (w, last): (usize, u64) = (w.parse().unwrap(), last.parse().unwrap());
            assert!(last > acked[w], "{context}: writer {w} acked {last} twice");
            acked[w] = last;
            acks += 1;
            acks == kill_after
        });
        end.assert_killed(&context, &format!("{acks} acks"));
        assert!(!end.status.success(), "{context}: the child was not killed");

        runtime.block_on(check_recovered(&path, &acked, &context));
    }
    assert!(acked.iter().all(|&a| a > 0), "seed {seed}: {acked:?}");
}

/// Reopens the database and checks it against what the children acknowledged.
async fn check_recovered(path: &Path, acked: &[u64], context: &str) {
    let store = open_sled(path);
    let mut total = 0;
    let mut by_stream = HashMap::new();
    for (w, &acked) in acked.iter().enumerate() {
        let stream = writer_stream(w);
        let slice = read_all(&store, &stream).await;
        let highest = slice.highest_sequence;
        assert!(
            highest >= acked,
            "{context}: writer {w} acked {acked} but the store has {highest}"
        );
        assert_eq!(
            highest % EVENTS_PER_APPEND,
            0,
            "{context}: writer {w} has a partial append"
        );
        assert_eq!(slice.events.len() as u64, highest, "{context}: writer {w}");
        for (e, sequence) in slice.events.iter().zip(1..) {
            assert_eq!(e.sequence, sequence, "{context}: writer {w} is not dense");
            assert_eq!(e.payload, payload_of(&stream, sequence), "{context}");
        }
        // The store writes an append's command records after its closing event: a crash
        // between them must not lose them, or a retried command would run twice.
        let records = store.command_records(&stream).await.unwrap();
        let versions: Vec<u64> = records.iter().map(|r| r.version).collect();
        let expected: Vec<u64> = (1..=highest / EVENTS_PER_APPEND)
            .map(|n| n * EVENTS_PER_APPEND)
            .collect();
        assert_eq!(
            versions, expected,
            "{context}: writer {w}'s command records"
        );
        for record in &records {
            assert_eq!(
                record.outcome,
                RecordedOutcome::Accepted {
                    first_sequence: record.version - EVENTS_PER_APPEND + 1,
                    last_sequence: record.version,
                },
                "{context}: writer {w}"
            );
        }
        by_stream.insert(stream, highest);
        total += highest;
    }
    assert_eq!(store.head(), total, "{context}");
    let log = read_whole_log(&store).await;
    assert_eq!(log.len() as u64, total, "{context}");
    let mut seen: HashMap<StreamId, u64> = HashMap::new();
    for (e, position) in log.iter().zip(1..) {
        assert_eq!(e.position, position, "{context}: the log is not dense");
        let last = seen.entry(e.stream.clone()).or_default();
        assert_eq!(
            e.sequence,
            *last + 1,
            "{context}: {} out of order",
            e.stream
        );
        *last = e.sequence;
    }
    assert_eq!(seen, by_stream, "{context}");
    store.close().await.unwrap();
}

/// The crashing child: appends forever (well, up to a bound) until killed. Run only by the test
/// above, which names it exactly and sets [`CHILD_ENV`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the crash test in a child process"]
async fn crash_child() {
    let Some(path) = child_env(CHILD_ENV) else {
        return;
    };
    let store = Arc::new(open_sled(Path::new(&path)));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(child_writer(store.clone(), w)))
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    store.close().await.unwrap();
}

async fn child_writer(store: Arc<SledStore>, w: usize) {
    let stream = writer_stream(w);
    let mut version = store.highest_sequence(&stream).await.unwrap();
    for _ in 0..MAX_APPENDS_PER_WRITER {
        let events = events_for(&stream, version + 1, EVENTS_PER_APPEND);
        let mut request = AppendRequest::new(stream.clone(), version, events);
        request.record_commands.push(CommandRecord {
            command_id: uuid::Uuid::now_v7(),
            version: version + EVENTS_PER_APPEND,
            outcome: RecordedOutcome::Accepted {
                first_sequence: version + 1,
                last_sequence: version + EVENTS_PER_APPEND,
            },
        });
        let done = store.append(request).await.unwrap();
        version = done.last_sequence;
        emit(format_args!("ACK {w} {version}"));
    }
}
