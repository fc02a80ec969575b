//! The event-store conformance suite (sections J and S of the conformance reference), written
//! once against `dyn EventStore` and instantiated per backend by [`conformance_suite!`]. A new
//! backend passes the same suite by adding a harness in `support` and one macro line at the
//! bottom of this file; the `durable` tests also need it to reopen on the same data.
//!
//! Semantics pinned down here that the reference leaves open:
//! - `read_log(from, max)` is **inclusive** of `from`: it returns positions `>= from` (and
//!   `from = 0` reads from the start). A follower that has processed position `p` resumes with
//!   `read_log(p + 1, ..)`.
//! - `delete_to(stream, n)` clamps `n` to the stream's highest sequence number, so events
//!   appended after a `delete_to(stream, u64::MAX)` are visible.
//! - The store has no single-snapshot deletion: S3 deletes exactly one snapshot with criteria
//!   that match only it.

use std::time::{Duration, Instant};

use incarnate::{
    AppendRequest, Causation, CommandRecord, EventStore, KvWrite, NewEvent, RecordedOutcome,
    SnapshotCriteria, SnapshotRecord, StoreError, StreamId, MAX_RECORD_BYTES,
};
use uuid::Uuid;

use crate::support::{
    account, append_n, event, events_for, now_micros, payload_of, positions, read_all,
    read_whole_log, sequences, Harness,
};

/// Instantiates every conformance test for one backend, as `#[tokio::test]`s in a module named
/// after it. `durable` adds the tests that close and reopen the store.
macro_rules! conformance_suite {
    ($backend:ident, $harness:path $(, $durable:ident)?) => {
        mod $backend {
            conformance_suite!(@tests $harness;
                j1_reads_exactly_the_window_and_the_highest_sequence,
                j2_highest_sequence_needs_no_replay,
                j3_delete_to_hides_the_prefix_and_keeps_the_highest,
                j4_multi_event_append_is_all_or_nothing,
                j4_failed_append_in_a_group_commit_leaves_the_others_whole,
                j5_conflict_stores_nothing_and_carries_the_actual_version,
                j5_concurrent_appends_at_one_version_have_one_winner,
                j5_an_append_naming_the_last_event_is_stored_only_on_top_of_it,
                j6_everything_round_trips_and_streams_never_mix,
                j8_global_log_is_gap_free_ordered_and_inclusive,
                j9_ten_thousand_events_replay_in_order,
                j9_every_window_of_a_long_stream_reads_exactly,
                s1_latest_snapshot,
                s2_snapshot_criteria_bound_sequence_and_time,
                s3_delete_snapshots_removes_exactly_the_matching,
                s4_saving_at_an_existing_sequence_overwrites,
                bad_input_is_a_typed_error_and_stores_nothing,
                command_records_commit_with_the_append,
                kv_tables_commit_atomically_and_stay_apart,
                closed_store_refuses_calls,
            );
            $(conformance_suite!(@$durable $harness);)?
        }
    };
    (@durable $harness:path) => {
        conformance_suite!(@tests $harness;
            j3_delete_to_survives_reopen,
            j7_everything_survives_reopen,
            j9_windows_of_a_long_stream_survive_reopen,
            j7_reopen_right_after_close_is_not_refused,
            j5_the_last_event_is_known_after_reopen,
        );
    };
    (@tests $harness:path; $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let mut harness = $harness();
                $crate::store_conformance::$test(&mut harness).await;
                harness.close().await;
            }
        )+
    };
}

conformance_suite!(memory, crate::support::memory_harness);
conformance_suite!(sled, crate::support::sled_harness, durable);

/// Stream P of the J fixture.
fn p() -> StreamId {
    account("p")
}

/// The J fixture: appends [1], [2], [3], [4, 5] to P.
async fn fixture(store: &dyn EventStore) {
    for (expected, count) in [(0, 1), (1, 1), (2, 1), (3, 2)] {
        append_n(store, &p(), expected, count).await;
    }
}

async fn head_and_log(store: &dyn EventStore) -> (u64, Vec<u64>) {
    (store.head(), positions(&read_whole_log(store).await))
}

pub(crate) async fn j1_reads_exactly_the_window_and_the_highest_sequence(h: &mut Harness) {
    let store = h.store();
    fixture(store).await;
    let all = usize::MAX;
    let windows: [(u64, u64, usize, &[u64]); 13] = [
        (1, u64::MAX, all, &[1, 2, 3, 4, 5]),
        (3, u64::MAX, all, &[3, 4, 5]),
        (1, 3, all, &[1, 2, 3]),
        (1, u64::MAX, 3, &[1, 2, 3]),
        (2, 3, all, &[2, 3]),
        (2, 5, 2, &[2, 3]),
        (2, 2, all, &[2]),
        (2, 4, 1, &[2]),
        (2, 4, 0, &[]),
        (3, 2, all, &[]),
        (0, u64::MAX, all, &[1, 2, 3, 4, 5]),
        (6, u64::MAX, all, &[]),
        (5, 5, all, &[5]),
    ];
    for (from, to, max, expected) in windows {
        let slice = store.read_stream(&p(), from, to, max).await.unwrap();
        assert_eq!(
            sequences(&slice.events),
            expected,
            "window {from}..={to}, max {max}"
        );
        assert_eq!(slice.highest_sequence, 5, "window {from}..={to}, max {max}");
        for e in &slice.events {
            assert_eq!(e.stream, p());
            assert_eq!(e.payload, payload_of(&p(), e.sequence));
        }
    }
    let unknown = store
        .read_stream(&account("nobody"), 1, u64::MAX, all)
        .await
        .unwrap();
    assert!(unknown.events.is_empty());
    assert_eq!(unknown.highest_sequence, 0);
}

pub(crate) async fn j2_highest_sequence_needs_no_replay(h: &mut Harness) {
    let store = h.store();
    assert_eq!(store.highest_sequence(&p()).await.unwrap(), 0);
    fixture(store).await;
    assert_eq!(store.highest_sequence(&p()).await.unwrap(), 5);
    assert_eq!(store.highest_sequence(&account("nobody")).await.unwrap(), 0);
    // The highest sequence number is kept, not counted: it survives the deletion of every event.
    store.delete_to(&p(), u64::MAX).await.unwrap();
    assert!(read_all(store, &p()).await.events.is_empty());
    assert_eq!(store.highest_sequence(&p()).await.unwrap(), 5);
}

pub(crate) async fn j3_delete_to_hides_the_prefix_and_keeps_the_highest(h: &mut Harness) {
    let store = h.store();
    fixture(store).await;
    let other = account("other");
    append_n(store, &other, 0, 2).await; // positions 6, 7

    store.delete_to(&p(), 3).await.unwrap();
    let windows: [(u64, u64, usize, &[u64]); 6] = [
        (1, u64::MAX, usize::MAX, &[4, 5]),
        (1, 3, usize::MAX, &[]),
        (2, 4, usize::MAX, &[4]),
        (3, 5, 1, &[4]),
        (1, u64::MAX, 1, &[4]),
        (5, 5, usize::MAX, &[5]),
    ];
    for (from, to, max, expected) in windows {
        let slice = store.read_stream(&p(), from, to, max).await.unwrap();
        assert_eq!(
            sequences(&slice.events),
            expected,
            "window {from}..={to}, max {max}"
        );
        assert_eq!(slice.highest_sequence, 5);
    }
    assert_eq!(store.highest_sequence(&p()).await.unwrap(), 5);
    // The log skips deleted positions and keeps every other position as it was.
    assert_eq!(head_and_log(store).await, (7, vec![4, 5, 6, 7]));

    // Deleting below the watermark, or an unknown stream, changes nothing.
    store.delete_to(&p(), 2).await.unwrap();
    store.delete_to(&account("nobody"), 10).await.unwrap();
    assert_eq!(sequences(&read_all(store, &p()).await.events), [4, 5]);
    assert_eq!(store.highest_sequence(&account("nobody")).await.unwrap(), 0);

    store.delete_to(&p(), u64::MAX).await.unwrap();
    let slice = read_all(store, &p()).await;
    assert!(slice.events.is_empty());
    assert_eq!(slice.highest_sequence, 5);
    assert_eq!(head_and_log(store).await, (7, vec![6, 7]));
    assert_eq!(sequences(&read_all(store, &other).await.events), [1, 2]);

    // The next append continues after the highest sequence, and is not hidden by the deletion.
    let done = append_n(store, &p(), 5, 1).await;
    assert_eq!((done.first_sequence, done.last_sequence), (6, 6));
    assert_eq!((done.first_position, done.last_position), (8, 8));
    assert_eq!(sequences(&read_all(store, &p()).await.events), [6]);
    assert_eq!(head_and_log(store).await, (8, vec![6, 7, 8]));
}

pub(crate) async fn j3_delete_to_survives_reopen(h: &mut Harness) {
    fixture(h.store()).await;
    h.store().delete_to(&p(), 3).await.unwrap();
    h.reopen().await;
    assert_eq!(sequences(&read_all(h.store(), &p()).await.events), [4, 5]);

    h.store().delete_to(&p(), u64::MAX).await.unwrap();
    h.reopen().await;
    let slice = read_all(h.store(), &p()).await;
    assert!(slice.events.is_empty());
    assert_eq!(slice.highest_sequence, 5);
    assert_eq!(h.store().highest_sequence(&p()).await.unwrap(), 5);
    assert_eq!(h.store().head(), 5);
    assert!(read_whole_log(h.store()).await.is_empty());

    let done = append_n(h.store(), &p(), 5, 1).await;
    assert_eq!((done.first_sequence, done.first_position), (6, 6));
    h.reopen().await;
    let slice = read_all(h.store(), &p()).await;
    assert_eq!(sequences(&slice.events), [6]);
    assert_eq!(slice.highest_sequence, 6);
    assert_eq!(positions(&read_whole_log(h.store()).await), [6]);
}

pub(crate) async fn j4_multi_event_append_is_all_or_nothing(h: &mut Harness) {
    let store = h.store();
    fixture(store).await;
    let before = head_and_log(store).await;

    let mut events = events_for(&p(), 6, 2);
    events.push(event(vec![7u8; MAX_RECORD_BYTES + 1]));
    let err = store
        .append(AppendRequest::new(p(), 5, events))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    assert_eq!(head_and_log(store).await, before);
    assert_eq!(*store.watch_head().borrow(), 5);
    let slice = read_all(store, &p()).await;
    assert_eq!(sequences(&slice.events), [1, 2, 3, 4, 5]);
    assert_eq!(slice.highest_sequence, 5);

    // The failed append took neither sequence numbers nor positions.
    let done = append_n(store, &p(), 5, 2).await;
    assert_eq!((done.first_sequence, done.last_sequence), (6, 7));
    assert_eq!((done.first_position, done.last_position), (6, 7));
    assert_eq!(
        positions(&read_whole_log(store).await),
        [1, 2, 3, 4, 5, 6, 7]
    );
}

pub(crate) async fn j4_failed_append_in_a_group_commit_leaves_the_others_whole(h: &mut Harness) {
    let store = h.store();
    let (a, b, c) = (account("a"), account("b"), account("c"));
    let mut bad = events_for(&b, 1, 2);
    bad.push(event(vec![0u8; MAX_RECORD_BYTES + 1]));
    // Issued together so a batching backend commits them in one group.
    let (ra, rb, rc) = tokio::join!(
        store.append(AppendRequest::new(a.clone(), 0, events_for(&a, 1, 3))),
        store.append(AppendRequest::new(b.clone(), 0, bad)),
        store.append(AppendRequest::new(c.clone(), 0, events_for(&c, 1, 2))),
    );
    assert!(matches!(rb, Err(StoreError::Invalid(_))), "{rb:?}");
    let (ra, rc) = (ra.unwrap(), rc.unwrap());
    assert_eq!(ra.last_sequence, 3);
    assert_eq!(rc.last_sequence, 2);
    assert_eq!(store.head(), 5);
    let log = read_whole_log(store).await;
    assert_eq!(positions(&log), [1, 2, 3, 4, 5]);
    assert!(log.iter().all(|e| e.stream != b));
    let slice = read_all(store, &b).await;
    assert!(slice.events.is_empty());
    assert_eq!(slice.highest_sequence, 0);
    assert_eq!(sequences(&read_all(store, &a).await.events), [1, 2, 3]);
    assert_eq!(sequences(&read_all(store, &c).await.events), [1, 2]);
}

pub(crate) async fn j5_conflict_stores_nothing_and_carries_the_actual_version(h: &mut Harness) {
    let store = h.store();
    fixture(store).await;
    let before = head_and_log(store).await;
    for (stream, expected, actual) in [
        (p(), 3, 5),
        (p(), 6, 5),
        (p(), 0, 5),
        (account("new"), 1, 0),
    ] {
        let err = store
            .append(AppendRequest::new(
                stream.clone(),
                expected,
                events_for(&stream, expected + 1, 2),
            ))
            .await
            .unwrap_err();
        match err {
            StoreError::Conflict {
                stream: s,
                expected: e,
                actual: a,
            } => assert_eq!((s, e, a), (stream.clone(), expected, actual)),
            other => panic!("expected a conflict on {stream} at {expected}, got {other:?}"),
        }
    }
    assert_eq!(head_and_log(store).await, before);
    assert_eq!(
        sequences(&read_all(store, &p()).await.events),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(store.highest_sequence(&account("new")).await.unwrap(), 0);
}

/// An append to `stream` at `expected` (two events) that names `last` as the stream's last
/// event.
async fn append_on_top_of(
    store: &dyn EventStore,
    stream: &StreamId,
    expected: u64,
    last: uuid::Uuid,
) -> Result<incarnate::AppendResult, StoreError> {
    let mut request = AppendRequest::new(
        stream.clone(),
        expected,
        events_for(stream, expected + 1, 2),
    );
    request.expected_last_event = Some(last);
    store.append(request).await
}

/// The id of the last readable event of `stream`.
async fn last_event_id(store: &dyn EventStore, stream: &StreamId) -> uuid::Uuid {
    read_all(store, stream)
        .await
        .events
        .last()
        .map(|e| e.event_id)
        .expect("the stream has events")
}

pub(crate) async fn j5_an_append_naming_the_last_event_is_stored_only_on_top_of_it(
    h: &mut Harness,
) {
    let store = h.store();
    fixture(store).await;
    let fifth = last_event_id(store, &p()).await;
    let stored = append_on_top_of(store, &p(), 5, fifth).await.unwrap();
    assert_eq!((stored.first_sequence, stored.last_sequence), (6, 7));
    let seventh = last_event_id(store, &p()).await;
    assert_ne!(fifth, seventh);
    // The right version with the wrong last event: what a writer sees when another writer
    // filled the versions its own earlier append was meant to take.
    let before = head_and_log(store).await;
    for wrong in [fifth, uuid::Uuid::now_v7()] {
        match append_on_top_of(store, &p(), 7, wrong).await {
            Err(StoreError::Conflict {
                expected, actual, ..
            }) => assert_eq!((expected, actual), (7, 7)),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(
        head_and_log(store).await,
        before,
        "a conflict stores nothing"
    );
    let stored = append_on_top_of(store, &p(), 7, seventh).await.unwrap();
    assert_eq!(stored.last_sequence, 9);
    // A new stream has no last event to name.
    assert!(matches!(
        append_on_top_of(store, &account("fresh"), 0, fifth).await,
        Err(StoreError::Conflict { .. })
    ));
}

pub(crate) async fn j5_the_last_event_is_known_after_reopen(h: &mut Harness) {
    fixture(h.store()).await;
    let fifth = last_event_id(h.store(), &p()).await;
    h.reopen().await;
    // The store no longer remembers the id it wrote: it reads it from the log.
    assert!(matches!(
        append_on_top_of(h.store(), &p(), 5, uuid::Uuid::now_v7()).await,
        Err(StoreError::Conflict { .. })
    ));
    let stored = append_on_top_of(h.store(), &p(), 5, fifth).await.unwrap();
    assert_eq!(stored.last_sequence, 7);
}

pub(crate) async fn j5_concurrent_appends_at_one_version_have_one_winner(h: &mut Harness) {
    let store = h.shared();
    fixture(&*store).await;
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let events = vec![event(vec![i]), event(vec![i])];
                store.append(AppendRequest::new(p(), 5, events)).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(done) => winners.push((i, done)),
            Err(StoreError::Conflict {
                expected, actual, ..
            }) => assert_eq!((expected, actual), (5, 7)),
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (winner, done) = winners[0];
    assert_eq!((done.first_sequence, done.last_sequence), (6, 7));
    let slice = read_all(&*store, &p()).await;
    assert_eq!(sequences(&slice.events), [1, 2, 3, 4, 5, 6, 7]);
    assert!(slice.events[5..]
        .iter()
        .all(|e| e.payload == [winner as u8]));
    assert_eq!(store.head(), 7);
}

pub(crate) async fn j6_everything_round_trips_and_streams_never_mix(h: &mut Harness) {
    let store = h.store();
    let stream = StreamId::new("order", "ünïcødé/id with spaces");
    let metadata = [("tenant", "acme"), ("user", "ada"), ("empty", "")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let full = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "OrderPlaced".into(),
        schema_version: 7,
        causation: Causation {
            correlation_id: Some(Uuid::now_v7()),
            causation_id: Some(Uuid::now_v7()),
            command_id: Some(Uuid::now_v7()),
            metadata,
        },
        payload: (0..=255u8).collect(),
    };
    let bare = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: String::new(),
        schema_version: 0,
        causation: Causation::default(),
        payload: Vec::new(),
    };
    let before = now_micros();
    let done = store
        .append(AppendRequest::new(
            stream.clone(),
            0,
            vec![full.clone(), bare.clone()],
        ))
        .await
        .unwrap();
    let after = now_micros();
    let read = read_all(store, &stream).await.events;
    assert_eq!(read, read_whole_log(store).await);
    assert_eq!(read.len(), 2);
    for ((envelope, sent), (sequence, position)) in read
        .iter()
        .zip([&full, &bare])
        .zip([(1, done.first_position), (2, done.last_position)])
    {
        assert_eq!(envelope.event_id, sent.event_id);
        assert_eq!(envelope.event_type, sent.event_type);
        assert_eq!(envelope.schema_version, sent.schema_version);
        assert_eq!(envelope.causation, sent.causation);
        assert_eq!(envelope.payload, sent.payload);
        assert_eq!(envelope.stream, stream);
        assert_eq!((envelope.sequence, envelope.position), (sequence, position));
        assert!(
            (before..=after).contains(&envelope.timestamp_micros),
            "timestamp {} outside {before}..={after}",
            envelope.timestamp_micros
        );
    }

    // Names chosen so that one's key could be a prefix of another's in a naive layout.
    let streams = [
        StreamId::new("account", "1"),
        StreamId::new("account", "10"),
        StreamId::new("account", "2"),
        StreamId::new("accoun", "t1"),
        StreamId::new("order", "1"),
        StreamId::new("a", "bc"),
        StreamId::new("ab", "c"),
        StreamId::new("account", ""),
    ];
    for round in 0..3u64 {
        for (i, s) in streams.iter().enumerate() {
            append_n(store, s, round * 2, 2).await;
            let snapshot = SnapshotRecord {
                stream: s.clone(),
                sequence: round * 2 + 2,
                timestamp_micros: 1_000 + round,
                schema_version: 1,
                payload: vec![i as u8, round as u8],
            };
            store.save_snapshot(snapshot).await.unwrap();
        }
    }
    for (i, s) in streams.iter().enumerate() {
        let slice = read_all(store, s).await;
        assert_eq!(sequences(&slice.events), [1, 2, 3, 4, 5, 6], "{s}");
        assert_eq!(slice.highest_sequence, 6);
        for e in &slice.events {
            assert_eq!(&e.stream, s);
            assert_eq!(e.payload, payload_of(s, e.sequence));
        }
        let latest = store
            .latest_snapshot(s, SnapshotCriteria::latest())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((&latest.stream, latest.sequence), (s, 6));
        assert_eq!(latest.payload, [i as u8, 2]);
    }
    for e in read_whole_log(store).await.iter().skip(2) {
        assert_eq!(e.payload, payload_of(&e.stream, e.sequence));
    }
}

pub(crate) async fn j7_everything_survives_reopen(h: &mut Harness) {
    fixture(h.store()).await;
    let other = StreamId::new("order", "o-1");
    let command = Uuid::now_v7();
    let mut request = AppendRequest::new(other.clone(), 0, events_for(&other, 1, 3));
    request.record_commands.push(CommandRecord {
        command_id: command,
        version: 3,
        outcome: RecordedOutcome::Accepted {
            first_sequence: 1,
            last_sequence: 3,
        },
    });
    h.store().append(request).await.unwrap();
    let snapshot = SnapshotRecord {
        stream: p(),
        sequence: 4,
        timestamp_micros: 42,
        schema_version: 3,
        payload: b"state at 4".to_vec(),
    };
    h.store().save_snapshot(snapshot.clone()).await.unwrap();
    let put = |key: &[u8], value: &[u8]| KvWrite::Put {
        table: "balances".into(),
        key: key.to_vec(),
        value: value.to_vec(),
    };
    h.store()
        .kv_commit(vec![put(b"alice", b"10"), put(b"bob", b"20")])
        .await
        .unwrap();

    let p_before = read_all(h.store(), &p()).await;
    let other_before = read_all(h.store(), &other).await;
    let log_before = read_whole_log(h.store()).await;
    assert_eq!(log_before.len(), 8);
    h.reopen().await;

    let store = h.store();
    assert_eq!(read_all(store, &p()).await, p_before);
    assert_eq!(read_all(store, &other).await, other_before);
    assert_eq!(read_whole_log(store).await, log_before);
    assert_eq!(store.head(), 8);
    assert_eq!(*store.watch_head().borrow(), 8);
    assert_eq!(store.highest_sequence(&other).await.unwrap(), 3);
    assert_eq!(
        store
            .latest_snapshot(&p(), SnapshotCriteria::latest())
            .await
            .unwrap(),
        Some(snapshot)
    );
    let records = store.command_records(&other).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].command_id, command);
    assert_eq!(
        store.kv_scan("balances", b"", usize::MAX).await.unwrap(),
        [
            (b"alice".to_vec(), b"10".to_vec()),
            (b"bob".to_vec(), b"20".to_vec())
        ]
    );
    // Writing continues where it stopped: no reused positions or sequence numbers.
    let done = append_n(store, &p(), 5, 1).await;
    assert_eq!((done.first_sequence, done.first_position), (6, 9));
    let err = store
        .append(AppendRequest::new(
            other.clone(),
            0,
            events_for(&other, 1, 1),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { actual: 3, .. }),
        "{err:?}"
    );
}

/// Regression: sled's I/O threads hold the database file (and its lock) for a moment after the
/// store's last handle is dropped, and a reopen right after `close` used to fail on the lock.
pub(crate) async fn j7_reopen_right_after_close_is_not_refused(h: &mut Harness) {
    for round in 0..100 {
        append_n(h.store(), &p(), round * 3, 3).await;
        h.reopen().await;
        assert_eq!(h.store().head(), (round + 1) * 3);
    }
    let slice = read_all(h.store(), &p()).await;
    assert_eq!(sequences(&slice.events), (1..=300).collect::<Vec<_>>());
}

pub(crate) async fn j8_global_log_is_gap_free_ordered_and_inclusive(h: &mut Harness) {
    let store = h.store();
    let streams = [account("x"), account("y"), StreamId::new("order", "x")];
    let mut versions = [0u64; 3];
    let mut expected = Vec::new(); // (position, stream index, sequence)
    for step in 0..12usize {
        let i = step % 3;
        let count = (step % 4 + 1) as u64;
        let done = append_n(store, &streams[i], versions[i], count).await;
        assert_eq!(done.first_position, expected.len() as u64 + 1);
        assert_eq!(done.last_position, done.first_position + count - 1);
        for k in 0..count {
            expected.push((done.first_position + k, i, versions[i] + 1 + k));
        }
        versions[i] += count;
        assert_eq!(store.head(), done.last_position);
        assert_eq!(*store.watch_head().borrow(), done.last_position);
    }
    let n = expected.len() as u64;

    let log = read_whole_log(store).await;
    assert_eq!(positions(&log), (1..=n).collect::<Vec<_>>());
    for (e, &(position, i, sequence)) in log.iter().zip(&expected) {
        assert_eq!(
            (e.position, &e.stream, e.sequence),
            (position, &streams[i], sequence)
        );
        assert_eq!(e.payload, payload_of(&e.stream, e.sequence));
    }

    // `from` is inclusive: reading from X starts at X.
    for from in [1, 2, 7, n - 1, n] {
        let rest = store.read_log(from, usize::MAX).await.unwrap();
        assert_eq!(
            positions(&rest),
            (from..=n).collect::<Vec<_>>(),
            "from {from}"
        );
    }
    assert_eq!(store.read_log(0, usize::MAX).await.unwrap(), log);
    assert!(store.read_log(n + 1, usize::MAX).await.unwrap().is_empty());
    assert!(store
        .read_log(u64::MAX, usize::MAX)
        .await
        .unwrap()
        .is_empty());
    assert!(store.read_log(1, 0).await.unwrap().is_empty());
    assert_eq!(
        positions(&store.read_log(3, 4).await.unwrap()),
        [3, 4, 5, 6]
    );

    // A follower paging with `from = last + 1` sees every position once.
    let mut paged = Vec::new();
    let mut from = 1;
    loop {
        let page = store.read_log(from, 4).await.unwrap();
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        paged.extend(page);
    }
    assert_eq!(paged, log);
    // Pages that decode as they are taken hold the same events.
    for (from, max) in [(1, usize::MAX), (3, 4), (n, 10), (n + 1, 10)] {
        let page = store.read_log_page(from, max).await.unwrap();
        let last = page.last_position();
        let events: Vec<_> = page.map(Result::unwrap).collect();
        assert_eq!(events, store.read_log(from, max).await.unwrap());
        assert_eq!(last, events.last().map(|e| e.position));
    }
    let mut page = store.read_log_page(1, usize::MAX).await.unwrap();
    page.skip_through(5);
    assert_eq!(page.len() as u64, n - 5);
    assert_eq!(page.next().unwrap().unwrap(), log[5]);

    // Deleting events removes their positions from the log and renumbers nothing.
    store.delete_to(&streams[0], 3).await.unwrap();
    let kept: Vec<u64> = expected
        .iter()
        .filter(|(_, i, sequence)| !(*i == 0 && *sequence <= 3))
        .map(|(position, _, _)| *position)
        .collect();
    assert_eq!(positions(&read_whole_log(store).await), kept);
    assert_eq!(store.head(), n);
}

/// Windows at and around the multiples of 64 (the sled store indexes every 64th event of a
/// stream and walks back from there), the ends and past them.
const WINDOW_POINTS: [u64; 14] = [0, 1, 2, 63, 64, 65, 127, 128, 129, 200, 256, 299, 300, 301];

/// A 300-event stream written in appends of 1 to 7 events, interleaved with another stream.
async fn long_stream(store: &dyn EventStore) -> StreamId {
    let long = account("long");
    let other = account("other");
    let (mut version, mut chunk) = (0, 1);
    while version < 300 {
        let n = chunk.min(300 - version);
        append_n(store, &long, version, n).await;
        append_n(store, &other, version, n).await;
        version += n;
        chunk = chunk % 7 + 1;
    }
    long
}

/// Every window of `long` (see [`WINDOW_POINTS`]) under several limits reads exactly the events
/// above `deleted_to` in it.
async fn check_windows(store: &dyn EventStore, long: &StreamId, deleted_to: u64) {
    let tos = WINDOW_POINTS.iter().copied().chain([u64::MAX]);
    for from in WINDOW_POINTS {
        for to in tos.clone() {
            for max in [1, 3, 64, 65, usize::MAX] {
                let slice = store.read_stream(long, from, to, max).await.unwrap();
                let expected: Vec<u64> = (from.max(deleted_to + 1).max(1)..=to.min(300))
                    .take(max)
                    .collect();
                assert_eq!(
                    sequences(&slice.events),
                    expected,
                    "window {from}..={to}, max {max}, deleted to {deleted_to}"
                );
                assert_eq!(slice.highest_sequence, 300);
                for e in &slice.events {
                    assert_eq!(e.payload, payload_of(long, e.sequence));
                    assert_eq!(&e.stream, long);
                }
            }
        }
    }
}

pub(crate) async fn j9_every_window_of_a_long_stream_reads_exactly(h: &mut Harness) {
    let long = long_stream(h.store()).await;
    check_windows(h.store(), &long, 0).await;
    h.store().delete_to(&long, 130).await.unwrap();
    check_windows(h.store(), &long, 130).await;
    // The other stream's events are untouched.
    assert_eq!(
        read_all(h.store(), &account("other")).await.events.len(),
        300
    );
    assert_eq!(read_whole_log(h.store()).await.len(), 470);
}

pub(crate) async fn j9_windows_of_a_long_stream_survive_reopen(h: &mut Harness) {
    let long = long_stream(h.store()).await;
    h.reopen().await;
    check_windows(h.store(), &long, 0).await;
    h.store().delete_to(&long, 64).await.unwrap();
    h.reopen().await;
    check_windows(h.store(), &long, 64).await;
    // Appends continue the stream where it was.
    let done = append_n(h.store(), &long, 300, 1).await;
    assert_eq!(done.first_sequence, 301);
}

pub(crate) async fn j9_ten_thousand_events_replay_in_order(h: &mut Harness) {
    const TOTAL: u64 = 10_000;
    const CHUNK: u64 = 500;
    let store = h.store();
    let small = account("small");
    append_n(store, &small, 0, 1).await;
    let big = account("big");
    for expected in (0..TOTAL).step_by(CHUNK as usize) {
        append_n(store, &big, expected, CHUNK).await;
    }

    let full = read_all(store, &big).await;
    assert_eq!(full.highest_sequence, TOTAL);
    assert_eq!(sequences(&full.events), (1..=TOTAL).collect::<Vec<_>>());
    assert!(full
        .events
        .iter()
        .all(|e| e.payload == payload_of(&big, e.sequence)));
    assert!(full
        .events
        .windows(2)
        .all(|w| w[0].position < w[1].position));

    let mut paged = Vec::new();
    let mut from = 1;
    loop {
        let page = store
            .read_stream(&big, from, u64::MAX, 1_000)
            .await
            .unwrap();
        let Some(last) = page.events.last() else {
            break;
        };
        from = last.sequence + 1;
        paged.extend(page.events);
    }
    assert_eq!(paged, full.events);
    let middle = store
        .read_stream(&big, 5_000, 5_009, usize::MAX)
        .await
        .unwrap();
    assert_eq!(
        sequences(&middle.events),
        (5_000..5_010).collect::<Vec<_>>()
    );

    // Reading a few events costs time in proportion to them, not to the store: a hundred reads
    // of a one-event stream beside 10,000 others take far less than one full replay (a read that
    // scanned the store would take about as long as that replay, each). Best of three, against
    // a noisy machine.
    let mut replay = Duration::MAX;
    let mut small_reads = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let slice = read_all(store, &big).await;
        replay = replay.min(start.elapsed());
        assert_eq!(slice.events.len() as u64, TOTAL);

        let start = Instant::now();
        for _ in 0..100 {
            let slice = store.read_stream(&small, 1, u64::MAX, 10).await.unwrap();
            assert_eq!(slice.events.len(), 1);
        }
        small_reads = small_reads.min(start.elapsed());
    }
    assert!(
        small_reads < replay * 2,
        "100 one-event reads took {small_reads:?}, one 10,000-event replay {replay:?}"
    );
}

/// The S fixture: snapshots s1..s5 of P at sequences 11..15, taken at times 1,000..5,000.
fn snapshot(n: u64) -> SnapshotRecord {
    SnapshotRecord {
        stream: p(),
        sequence: 10 + n,
        timestamp_micros: 1_000 * n,
        schema_version: 1,
        payload: format!("s{n}").into_bytes(),
    }
}

async fn snapshot_fixture(store: &dyn EventStore) {
    for n in 1..=5 {
        store.save_snapshot(snapshot(n)).await.unwrap();
    }
    // A neighbour whose snapshots must never answer for P.
    let mut neighbour = snapshot(6);
    neighbour.stream = account("p2");
    store.save_snapshot(neighbour).await.unwrap();
}

async fn latest(store: &dyn EventStore, criteria: SnapshotCriteria) -> Option<SnapshotRecord> {
    store.latest_snapshot(&p(), criteria).await.unwrap()
}

fn bounds(max_sequence: u64, max_timestamp_micros: u64) -> SnapshotCriteria {
    SnapshotCriteria {
        max_sequence,
        max_timestamp_micros,
    }
}

pub(crate) async fn s1_latest_snapshot(h: &mut Harness) {
    let store = h.store();
    assert_eq!(latest(store, SnapshotCriteria::latest()).await, None);
    snapshot_fixture(store).await;
    let unknown = store
        .latest_snapshot(&account("nobody"), SnapshotCriteria::latest())
        .await
        .unwrap();
    assert_eq!(unknown, None);
    assert_eq!(
        latest(store, SnapshotCriteria::latest()).await,
        Some(snapshot(5))
    );
    assert_eq!(
        latest(store, SnapshotCriteria::default()).await,
        Some(snapshot(5))
    );
}

pub(crate) async fn s2_snapshot_criteria_bound_sequence_and_time(h: &mut Harness) {
    let store = h.store();
    snapshot_fixture(store).await;
    let cases = [
        (SnapshotCriteria::up_to(13), Some(3)),
        (SnapshotCriteria::up_to(7), None),
        (SnapshotCriteria::up_to(11), Some(1)),
        (SnapshotCriteria::up_to(100), Some(5)),
        (bounds(u64::MAX, 3_500), Some(3)),
        (bounds(u64::MAX, 3_000), Some(3)),
        (bounds(14, 1_500), Some(1)),
        (bounds(12, 5_000), Some(2)),
        (bounds(u64::MAX, 999), None),
    ];
    for (criteria, expected) in cases {
        assert_eq!(
            latest(store, criteria).await,
            expected.map(snapshot),
            "{criteria:?}"
        );
    }
}

pub(crate) async fn s3_delete_snapshots_removes_exactly_the_matching(h: &mut Harness) {
    let store = h.store();
    snapshot_fixture(store).await;
    // Criteria matching only s1 delete just it: the next one is now the answer at its bound.
    assert_eq!(
        store
            .delete_snapshots(&p(), SnapshotCriteria::up_to(11))
            .await
            .unwrap(),
        1
    );
    assert_eq!(latest(store, SnapshotCriteria::up_to(11)).await, None);
    assert_eq!(
        latest(store, SnapshotCriteria::up_to(12)).await,
        Some(snapshot(2))
    );
    assert_eq!(
        latest(store, SnapshotCriteria::latest()).await,
        Some(snapshot(5))
    );

    // Both bounds apply: seq <= 14 and ts <= 3,000 matches s2 and s3, not s4 (too late) or s5.
    assert_eq!(
        store
            .delete_snapshots(&p(), bounds(14, 3_000))
            .await
            .unwrap(),
        2
    );
    assert_eq!(latest(store, SnapshotCriteria::up_to(13)).await, None);
    assert_eq!(
        latest(store, SnapshotCriteria::up_to(14)).await,
        Some(snapshot(4))
    );
    assert_eq!(
        latest(store, SnapshotCriteria::latest()).await,
        Some(snapshot(5))
    );

    assert_eq!(
        store
            .delete_snapshots(&account("nobody"), SnapshotCriteria::latest())
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .delete_snapshots(&p(), SnapshotCriteria::latest())
            .await
            .unwrap(),
        2
    );
    assert_eq!(latest(store, SnapshotCriteria::latest()).await, None);
    // The neighbour's snapshot was never touched.
    let neighbour = store
        .latest_snapshot(&account("p2"), SnapshotCriteria::latest())
        .await
        .unwrap();
    assert_eq!(neighbour.map(|s| s.sequence), Some(16));
}

pub(crate) async fn s4_saving_at_an_existing_sequence_overwrites(h: &mut Harness) {
    let store = h.store();
    snapshot_fixture(store).await;
    let replacement = SnapshotRecord {
        timestamp_micros: 3_333,
        schema_version: 2,
        payload: b"s3 again".to_vec(),
        ..snapshot(3)
    };
    store.save_snapshot(replacement.clone()).await.unwrap();
    assert_eq!(
        latest(store, SnapshotCriteria::up_to(13)).await,
        Some(replacement)
    );
    assert_eq!(
        store
            .delete_snapshots(&p(), SnapshotCriteria::latest())
            .await
            .unwrap(),
        5,
        "the overwrite must not add a sixth snapshot"
    );
}

pub(crate) async fn bad_input_is_a_typed_error_and_stores_nothing(h: &mut Harness) {
    let store = h.store();
    fixture(store).await;
    let before = head_and_log(store).await;

    let long_type = StreamId::new("t".repeat(256), "1");
    let err = store
        .append(AppendRequest::new(long_type.clone(), 0, vec![event("x")]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = store
        .save_snapshot(SnapshotRecord {
            stream: long_type,
            sequence: 1,
            timestamp_micros: 1,
            schema_version: 1,
            payload: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let long_id = StreamId::new("account", "i".repeat(65_536));
    let err = store
        .append(AppendRequest::new(long_id, 0, vec![event("x")]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    let oversize = store
        .append(AppendRequest::new(
            p(),
            5,
            vec![event(vec![1u8; MAX_RECORD_BYTES + 1])],
        ))
        .await
        .unwrap_err();
    assert!(matches!(oversize, StoreError::Invalid(_)), "{oversize:?}");
    let err = store
        .save_snapshot(SnapshotRecord {
            payload: vec![0u8; MAX_RECORD_BYTES + 1],
            ..snapshot(1)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(latest(store, SnapshotCriteria::latest()).await, None);
    assert_eq!(head_and_log(store).await, before);
    assert_eq!(store.highest_sequence(&p()).await.unwrap(), 5);

    // The limits themselves are accepted.
    let longest_type = StreamId::new("t".repeat(255), "1");
    append_n(store, &longest_type, 0, 1).await;
    assert_eq!(read_all(store, &longest_type).await.events.len(), 1);
    let large = vec![9u8; MAX_RECORD_BYTES - 1_024];
    store
        .append(AppendRequest::new(p(), 5, vec![event(large.clone())]))
        .await
        .unwrap();
    let read = store.read_stream(&p(), 6, 6, 1).await.unwrap();
    assert_eq!(read.events[0].payload, large);
}

pub(crate) async fn command_records_commit_with_the_append(h: &mut Harness) {
    let store = h.store();
    let record = |version: u64| CommandRecord {
        command_id: Uuid::now_v7(),
        version,
        outcome: RecordedOutcome::Accepted {
            first_sequence: version,
            last_sequence: version,
        },
    };
    let (r1, r2, r3) = (record(1), record(2), record(3));
    let mut first = AppendRequest::new(p(), 0, vec![event("1")]);
    first.record_commands.push(r1.clone());
    store.append(first).await.unwrap();
    let rejected = CommandRecord {
        command_id: Uuid::now_v7(),
        version: 1,
        outcome: RecordedOutcome::Rejected {
            error: b"insufficient funds".to_vec(),
        },
    };
    let mut none = AppendRequest::new(p(), 1, Vec::new());
    none.record_commands.push(rejected.clone());
    let done = store.append(none).await.unwrap();
    assert_eq!((done.first_sequence, done.last_sequence), (2, 1));
    assert_eq!(
        store.command_records(&p()).await.unwrap(),
        [r1.clone(), rejected.clone()]
    );

    let mut second = AppendRequest::new(p(), 1, vec![event("2")]);
    second.record_commands.push(r2.clone());
    second.forget_commands.push((r1.version, r1.command_id));
    store.append(second).await.unwrap();
    assert_eq!(
        store.command_records(&p()).await.unwrap(),
        [rejected.clone(), r2.clone()]
    );

    // A conflicting append records and forgets nothing.
    let mut stale = AppendRequest::new(p(), 1, vec![event("3")]);
    stale.record_commands.push(r3);
    stale.forget_commands.push((r2.version, r2.command_id));
    let err = store.append(stale).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(store.command_records(&p()).await.unwrap(), [rejected, r2]);
    assert!(store
        .command_records(&account("q"))
        .await
        .unwrap()
        .is_empty());
}

pub(crate) async fn kv_tables_commit_atomically_and_stay_apart(h: &mut Harness) {
    let store = h.store();
    let put = |table: &str, key: &str, value: &str| KvWrite::Put {
        table: table.into(),
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    };
    let kv = |pairs: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    };
    store
        .kv_commit(vec![
            put("a", "bc", "1"),
            put("ab", "c", "2"),
            put("a", "b", "3"),
            put("a", "d", "4"),
        ])
        .await
        .unwrap();
    assert_eq!(store.kv_get("a", b"bc").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(store.kv_get("ab", b"c").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(store.kv_get("a", b"c").await.unwrap(), None);
    assert_eq!(
        store.kv_scan("a", b"", usize::MAX).await.unwrap(),
        kv(&[("b", "3"), ("bc", "1"), ("d", "4")])
    );
    assert_eq!(
        store.kv_scan("a", b"bb", 1).await.unwrap(),
        kv(&[("bc", "1")])
    );

    // A batch with one invalid write applies none of it.
    let err = store
        .kv_commit(vec![put("a", "z", "5"), put(&"t".repeat(256), "k", "v")])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(store.kv_get("a", b"z").await.unwrap(), None);

    store
        .kv_commit(vec![
            KvWrite::Delete {
                table: "a".into(),
                key: b"b".to_vec(),
            },
            put("a", "e", "5"),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.kv_scan("a", b"", usize::MAX).await.unwrap(),
        kv(&[("bc", "1"), ("d", "4"), ("e", "5")])
    );
    store
        .kv_commit(vec![KvWrite::Clear { table: "a".into() }])
        .await
        .unwrap();
    assert!(store
        .kv_scan("a", b"", usize::MAX)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.kv_scan("ab", b"", usize::MAX).await.unwrap(),
        kv(&[("c", "2")])
    );
}

pub(crate) async fn closed_store_refuses_calls(h: &mut Harness) {
    let store = h.store();
    fixture(store).await;
    store.close().await.unwrap();
    let err = store
        .append(AppendRequest::new(p(), 5, vec![event("late")]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    let err = store.read_stream(&p(), 1, u64::MAX, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    let err = store.read_log(1, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    let err = store.flush().await.unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err:?}");
}

/// Tests that need raw access to sled's files: corrupted records are reported, typed, with the
/// record's stream and sequence (S5).
mod sled_only {
    use std::path::Path;

    use incarnate::{
        AppendRequest, CommandRecord, RecordedOutcome, SnapshotCriteria, SnapshotRecord,
        StoreError, StreamId,
    };
    use uuid::Uuid;

    use super::{bounds, fixture, p, snapshot_fixture};
    use crate::support::{
        append_n, events_for, log_key, open_raw, overwrite, payload_of, read_all, sled_harness,
        TREE,
    };

    /// `prefix` + length-prefixed type + length-prefixed id + `sequence`, as the store keys
    /// per-stream records.
    fn stream_record_key(prefix: u8, stream: &StreamId, sequence: u64) -> Vec<u8> {
        let ty = stream.aggregate_type.as_bytes();
        let id = stream.aggregate_id.as_str().as_bytes();
        let mut key = vec![prefix, u8::try_from(ty.len()).unwrap()];
        key.extend_from_slice(ty);
        key.extend_from_slice(&u16::try_from(id.len()).unwrap().to_be_bytes());
        key.extend_from_slice(id);
        key.extend_from_slice(&sequence.to_be_bytes());
        key
    }

    /// The key of a command record: `C` + stream + version + command id.
    fn command_key(stream: &StreamId, version: u64, id: Uuid) -> Vec<u8> {
        let mut key = stream_record_key(b'C', stream, version);
        key.extend_from_slice(id.as_bytes());
        key
    }

    /// An append of `count` events to P at `expected`, recording one command that emitted them.
    fn commanded_append(expected: u64, count: u64, id: Uuid) -> (AppendRequest, CommandRecord) {
        let record = CommandRecord {
            command_id: id,
            version: expected + count,
            outcome: RecordedOutcome::Accepted {
                first_sequence: expected + 1,
                last_sequence: expected + count,
            },
        };
        let mut request = AppendRequest::new(p(), expected, events_for(&p(), expected + 1, count));
        request.record_commands.push(record.clone());
        (request, record)
    }

    /// Forgets the stream metadata a clean close wrote (P's `M` record and the meta checkpoint
    /// `H`): a crash in the middle of a commit leaves the metadata of earlier commits, which
    /// here wrote none, and the store rebuilds P's from the log.
    fn forget_metadata(tree: &::sled::Tree) {
        let mut meta = stream_record_key(b'M', &p(), 0);
        meta.truncate(meta.len() - 8);
        assert!(tree.remove(meta).unwrap().is_some());
        assert!(tree.remove(b"H").unwrap().is_some());
    }

    /// Runs `f` on the store's tree while nothing holds the database open.
    fn with_tree<T>(path: &Path, f: impl FnOnce(&::sled::Tree) -> T) -> T {
        let db = open_raw(path);
        let tree = db.open_tree(TREE).unwrap();
        let out = f(&tree);
        db.flush().unwrap();
        out
    }

    /// Records too big to share a chunk are stored one per value (as layout 3 stored every
    /// append), so a crash can cut their append after some of them. Reopening removes what is
    /// left of it, index entry included, so the stream ends at its last whole append and the
    /// positions are free again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_append_stored_one_record_per_value_is_removed_on_reopen() {
        let mut h = sled_harness();
        append_n(h.store(), &p(), 0, 63).await;
        let id = Uuid::now_v7();
        let (mut cut, _) = commanded_append(63, 3, id);
        // Sequences 64..=66 at positions 64..=66, 2 KB each; 64 has an index entry.
        for event in &mut cut.events {
            event.payload = vec![7; 2_000];
        }
        h.store().append(cut).await.unwrap();
        h.reopen_after(|path| {
            with_tree(path, |tree| {
                for position in 64..=66 {
                    let value = tree.get(log_key(position)).unwrap().unwrap();
                    assert_ne!(value[0], 5, "a big append went into a chunk");
                }
                // What a crash leaves after the append's first two records: its closing
                // record, its command record and the commit's metadata never reached the disk.
                forget_metadata(tree);
                assert!(tree.remove(log_key(66)).unwrap().is_some());
                assert!(tree.remove(command_key(&p(), 66, id)).unwrap().is_some());
                assert!(tree
                    .get(stream_record_key(b'S', &p(), 64))
                    .unwrap()
                    .is_some());
            })
        })
        .await;
        let store = h.store();
        assert_eq!(store.head(), 63);
        let slice = read_all(store, &p()).await;
        assert_eq!((slice.highest_sequence, slice.events.len()), (63, 63));
        assert_eq!(store.read_log(64, usize::MAX).await.unwrap().len(), 0);
        assert!(store.command_records(&p()).await.unwrap().is_empty());
        h.reopen_after(|path| {
            with_tree(path, |tree| {
                for key in [log_key(64), log_key(65), stream_record_key(b'S', &p(), 64)] {
                    assert!(
                        tree.get(key).unwrap().is_none(),
                        "a cut append's record stayed"
                    );
                }
            })
        })
        .await;
        // The sequences and positions are taken again, and read through the new index entry.
        let store = h.store();
        let again = append_n(store, &p(), 63, 3).await;
        assert_eq!((again.first_position, again.last_sequence), (64, 66));
        let window = store.read_stream(&p(), 64, 64, usize::MAX).await.unwrap();
        assert_eq!(window.events.len(), 1);
        assert_eq!(window.events[0].payload, payload_of(&p(), 64));
        assert_eq!(window.events[0].position, 64);
        h.close().await;
    }

    /// An append too big for one chunk spreads over several, and a crash can cut it between
    /// two. Reopening removes what is left of it from every chunk it reached, and keeps the
    /// appends before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_cut_between_its_chunks_is_removed_on_reopen() {
        let mut h = sled_harness();
        append_n(h.store(), &p(), 0, 10).await;
        let id = Uuid::now_v7();
        // Sequences 11..=110 at positions 11..=110; 64 has an index entry.
        let (big, _) = commanded_append(10, 100, id);
        h.store().append(big).await.unwrap();
        h.reopen_after(|path| {
            with_tree(path, |tree| {
                let values: Vec<_> = tree
                    .range(log_key(11)..=log_key(110))
                    .map(|item| item.unwrap())
                    .collect();
                assert!(values.len() >= 2, "100 events fit one chunk");
                assert!(values.iter().all(|(_, value)| value[0] == 5));
                // What a crash leaves before the append's last chunk: nothing that follows it
                // (its index entry and command record) reached the disk either.
                forget_metadata(tree);
                let (last, _) = values.last().unwrap();
                assert!(tree.remove(last).unwrap().is_some());
                assert!(tree.remove(command_key(&p(), 110, id)).unwrap().is_some());
                assert!(tree
                    .remove(stream_record_key(b'S', &p(), 64))
                    .unwrap()
                    .is_some());
            })
        })
        .await;
        let store = h.store();
        assert_eq!(store.head(), 10);
        let slice = read_all(store, &p()).await;
        assert_eq!((slice.highest_sequence, slice.events.len()), (10, 10));
        assert!(store.read_log(11, usize::MAX).await.unwrap().is_empty());
        assert!(store.command_records(&p()).await.unwrap().is_empty());
        h.reopen_after(|path| {
            let left = with_tree(path, |tree| {
                tree.range(log_key(11)..=log_key(u64::MAX)).count()
            });
            assert_eq!(left, 0, "a cut append's chunk stayed");
        })
        .await;
        let again = append_n(h.store(), &p(), 10, 3).await;
        assert_eq!((again.first_position, again.last_sequence), (11, 13));
        assert_eq!(read_all(h.store(), &p()).await.events.len(), 13);
        h.close().await;
    }

    /// A crash right after an append's closing record loses what follows it: its index entry
    /// and its command records. Reopening writes them again from the closing record, so a
    /// retried command is still recognised.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_last_append_cut_after_its_closing_record_gets_its_followers_back() {
        let mut h = sled_harness();
        append_n(h.store(), &p(), 0, 61).await;
        let id = Uuid::now_v7();
        // Sequences 62..=64: the closing one has an index entry.
        let (request, record) = commanded_append(61, 3, id);
        h.store().append(request).await.unwrap();
        h.reopen_after(|path| {
            with_tree(path, |tree| {
                forget_metadata(tree);
                assert!(tree.remove(command_key(&p(), 64, id)).unwrap().is_some());
                assert!(tree
                    .remove(stream_record_key(b'S', &p(), 64))
                    .unwrap()
                    .is_some());
            })
        })
        .await;
        let store = h.store();
        assert_eq!(store.command_records(&p()).await.unwrap(), vec![record]);
        let slice = read_all(store, &p()).await;
        assert_eq!((slice.highest_sequence, slice.events.len()), (64, 64));
        h.reopen_after(|path| {
            with_tree(path, |tree| {
                let entry = tree.get(stream_record_key(b'S', &p(), 64)).unwrap();
                assert_eq!(entry.as_deref(), Some(&64u64.to_be_bytes()[..]));
            })
        })
        .await;
        h.close().await;
    }

    /// The `(position, record)` pairs of a log chunk: format 5, a `u32` count, then per record
    /// its position (`u64`) and length (`u32`), then the records (see `src/store/sled/log.rs`).
    fn chunk_records(value: &[u8]) -> Vec<(u64, Vec<u8>)> {
        assert_eq!(value[0], 5, "not a chunk");
        let count = u32::from_be_bytes(value[1..5].try_into().unwrap()) as usize;
        let mut offset = 5 + count * 12;
        (0..count)
            .map(|i| {
                let at = 5 + i * 12;
                let position = u64::from_be_bytes(value[at..at + 8].try_into().unwrap());
                let len = u32::from_be_bytes(value[at + 8..at + 12].try_into().unwrap()) as usize;
                offset += len;
                (position, value[offset - len..offset].to_vec())
            })
            .collect()
    }

    fn assert_decode_error(
        result: Result<impl std::fmt::Debug, StoreError>,
        what: &str,
        stream: &StreamId,
        sequence: u64,
    ) {
        match result {
            Err(StoreError::Decode {
                what: w,
                stream: s,
                sequence: q,
                ..
            }) => assert_eq!((w, &s, q), (what, stream, sequence)),
            other => panic!("expected a decode error on {what} {stream}@{sequence}: {other:?}"),
        }
    }

    /// A database of an older layout (2 or 3: one log record per value, which the fixture's
    /// one-event commits also write) opens, reads, takes new appends as chunks, and is stamped
    /// with the current layout before anything is written in it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn databases_of_layouts_2_and_3_are_upgraded_in_place() {
        for old in [2u32, 3] {
            let mut h = sled_harness();
            fixture(h.store()).await;
            h.reopen_after(|path| {
                with_tree(path, |tree| {
                    assert_ne!(tree.get(log_key(1)).unwrap().unwrap()[0], 5);
                    tree.insert(b"V", &old.to_be_bytes()).unwrap();
                })
            })
            .await;
            let store = h.store();
            assert_eq!(read_all(store, &p()).await.events.len(), 5);
            let head = store.head();
            append_n(store, &p(), 5, 3).await;
            let slice = read_all(store, &p()).await;
            assert_eq!(slice.events.len(), 8);
            assert_eq!(slice.events[7].payload, payload_of(&p(), 8));
            assert_eq!(store.read_log(head + 1, usize::MAX).await.unwrap().len(), 3);
            h.reopen_after(|path| {
                let (stamp, chunk) = with_tree(path, |tree| {
                    (
                        tree.get(b"V").unwrap(),
                        tree.get(log_key(head + 1)).unwrap(),
                    )
                });
                assert_eq!(stamp.as_deref(), Some(&4u32.to_be_bytes()[..]));
                assert_eq!(chunk.map(|c| chunk_records(&c).len()), Some(3));
            })
            .await;
            assert_eq!(read_all(h.store(), &p()).await.events.len(), 8);
            h.close().await;
        }
    }

    /// Deleting some of the events a chunk holds rewrites it without them: the rest still read
    /// by stream and by position, across a reopen, and a chunk left empty goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_part_of_a_chunk_keeps_the_rest_of_it() {
        let mut h = sled_harness();
        // One append, one commit: positions 1..=6 in one chunk.
        append_n(h.store(), &p(), 0, 6).await;
        let store = h.store();
        store.delete_to(&p(), 2).await.unwrap();
        let slice = read_all(store, &p()).await;
        let sequences: Vec<u64> = slice.events.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, [3, 4, 5, 6]);
        assert_eq!(slice.events[0].payload, payload_of(&p(), 3));
        let log = store.read_log(1, usize::MAX).await.unwrap();
        assert_eq!(
            log.iter().map(|e| e.position).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        h.reopen_after(|path| {
            let records = with_tree(path, |tree| {
                chunk_records(&tree.get(log_key(1)).unwrap().unwrap())
            });
            assert_eq!(
                records.iter().map(|r| r.0).collect::<Vec<_>>(),
                [3, 4, 5, 6]
            );
        })
        .await;
        let store = h.store();
        assert_eq!(read_all(store, &p()).await.events.len(), 4);
        let window = store.read_stream(&p(), 5, 5, usize::MAX).await.unwrap();
        assert_eq!(window.events[0].position, 5);
        append_n(store, &p(), 6, 1).await;
        store.delete_to(&p(), 6).await.unwrap();
        let log = store.read_log(1, usize::MAX).await.unwrap();
        assert_eq!(log.iter().map(|e| e.position).collect::<Vec<_>>(), [7]);
        assert_eq!(store.head(), 7);
        h.reopen_after(|path| {
            let gone = with_tree(path, |tree| tree.get(log_key(1)).unwrap());
            assert!(gone.is_none(), "an emptied chunk stayed");
        })
        .await;
        assert_eq!(h.store().head(), 7);
        assert_eq!(read_all(h.store(), &p()).await.events.len(), 1);
        h.close().await;
    }

    /// A database of another store layout is refused with a typed error, and left as it was.
    #[test]
    fn a_database_of_another_layout_is_refused_untouched() {
        for (version, found) in [(None, "layout 1"), (Some(99u32), "layout 99")] {
            let dir = tempfile::tempdir().unwrap();
            {
                let db = open_raw(dir.path());
                let tree = db.open_tree(TREE).unwrap();
                tree.insert(log_key(1), b"\x01an old envelope").unwrap();
                if let Some(v) = version {
                    tree.insert(b"V", &v.to_be_bytes()).unwrap();
                }
                db.flush().unwrap();
            }
            let opened = incarnate::SledStore::open(incarnate::SledStoreConfig::new(dir.path()));
            match opened {
                Err(StoreError::Invalid(reason)) => {
                    assert!(reason.contains(found), "{reason}");
                    assert!(reason.contains("reads layout 4"), "{reason}");
                }
                Err(other) => panic!("expected a layout error, got {other:?}"),
                Ok(_) => panic!("a database of {found} was opened"),
            }
            let db = open_raw(dir.path());
            let tree = db.open_tree(TREE).unwrap();
            assert_eq!(tree.len(), 1 + usize::from(version.is_some()));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s5_undecodable_snapshot_is_a_typed_error_naming_stream_and_sequence() {
        let mut h = sled_harness();
        snapshot_fixture(h.store()).await;
        h.reopen_after(|path| {
            overwrite(path, &stream_record_key(b'P', &p(), 13), b"\x01\xc1garbage");
            overwrite(
                path,
                &stream_record_key(b'P', &p(), 14),
                b"\x09unknown format",
            );
        })
        .await;
        let store = h.store();
        for _ in 0..2 {
            // Reported each time: the record stays for inspection.
            let result = store
                .latest_snapshot(&p(), SnapshotCriteria::up_to(13))
                .await;
            assert_decode_error(result, "snapshot", &p(), 13);
        }
        let result = store
            .latest_snapshot(&p(), SnapshotCriteria::up_to(14))
            .await;
        assert_decode_error(result, "snapshot", &p(), 14);
        // Snapshots around the corrupt ones still read.
        let s5 = store
            .latest_snapshot(&p(), SnapshotCriteria::latest())
            .await
            .unwrap();
        assert_eq!(s5.map(|s| s.sequence), Some(15));
        let s2 = store
            .latest_snapshot(&p(), SnapshotCriteria::up_to(12))
            .await
            .unwrap();
        assert_eq!(s2.map(|s| s.sequence), Some(12));

        // A time bound needs each snapshot's timestamp, so it cannot pass a corrupt one; and
        // refusing deletes nothing.
        let result = store.delete_snapshots(&p(), bounds(14, 1_500)).await;
        assert_decode_error(result, "snapshot", &p(), 13);
        let s1 = store
            .latest_snapshot(&p(), SnapshotCriteria::up_to(11))
            .await
            .unwrap();
        assert_eq!(s1.map(|s| s.sequence), Some(11));
        // A sequence bound alone deletes corrupt snapshots too (retention must not stall on
        // them).
        let deleted = store
            .delete_snapshots(&p(), SnapshotCriteria::up_to(14))
            .await
            .unwrap();
        assert_eq!(deleted, 4);
        let left = store
            .latest_snapshot(&p(), SnapshotCriteria::up_to(14))
            .await
            .unwrap();
        assert_eq!(left, None);
        let s5 = store
            .latest_snapshot(&p(), SnapshotCriteria::latest())
            .await
            .unwrap();
        assert_eq!(s5.map(|s| s.sequence), Some(15));
        h.close().await;
    }

    /// Values big enough that sled writes their leaves to blob files of their own: acknowledged
    /// in `sync` mode (which fsyncs those files too, see `store/sled/durable.rs`) and whole
    /// after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_that_sled_stores_in_blob_files_are_read_back_after_a_reopen() {
        let mut h = sled_harness();
        let stream = |i: u32| StreamId::new("big", format!("s{i}"));
        let payload = |i: u32| vec![i as u8; 60 * 1024];
        for i in 0..24 {
            let snapshot = SnapshotRecord {
                stream: stream(i),
                sequence: 1,
                timestamp_micros: 1,
                schema_version: 1,
                payload: payload(i),
            };
            h.store().save_snapshot(snapshot).await.unwrap();
        }
        let blobs = h.path().unwrap().join("blobs");
        assert!(
            std::fs::read_dir(&blobs).unwrap().count() > 0,
            "no blob file was written: the test does not cover them"
        );
        h.reopen().await;
        for i in 0..24 {
            let snapshot = h
                .store()
                .latest_snapshot(&stream(i), SnapshotCriteria::latest())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(snapshot.payload, payload(i), "snapshot {i}");
        }
        h.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s5_undecodable_event_is_a_typed_error_naming_stream_and_sequence() {
        let mut h = sled_harness();
        fixture(h.store()).await; // P's sequence n is at position n
        h.reopen_after(|path| overwrite(path, &log_key(2), b"\x01\xc1not an envelope"))
            .await;
        let store = h.store();
        let result = store.read_stream(&p(), 1, u64::MAX, usize::MAX).await;
        assert_decode_error(result, "event envelope", &p(), 2);
        // Windows that avoid the corrupt event still read.
        let rest = store
            .read_stream(&p(), 3, u64::MAX, usize::MAX)
            .await
            .unwrap();
        assert_eq!(rest.events.len(), 3);
        // The log names the record by its position, under the pseudo-stream `$log`.
        let result = store.read_log(1, usize::MAX).await;
        assert_decode_error(result, "event envelope", &StreamId::new("$log", ""), 2);
        assert_eq!(store.read_log(3, usize::MAX).await.unwrap().len(), 3);
        // A page that decodes as its events are taken yields those before it and after it.
        let mut page = store.read_log_page(1, usize::MAX).await.unwrap();
        assert_eq!(page.len(), 5);
        assert_eq!(page.next().unwrap().unwrap().position, 1);
        assert_decode_error(
            page.next().unwrap(),
            "event envelope",
            &StreamId::new("$log", ""),
            2,
        );
        let rest: Vec<u64> = page.map(|e| e.unwrap().position).collect();
        assert_eq!(rest, [3, 4, 5]);
        // Deleting past the corrupt event makes the stream readable again.
        store.delete_to(&p(), 2).await.unwrap();
        assert_eq!(read_all(store, &p()).await.events.len(), 3);
        h.close().await;
    }
}
