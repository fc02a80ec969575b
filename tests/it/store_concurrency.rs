//! Concurrent writers and a log follower (J4 "no reader sees a partial append", J8 "a reader never
//! sees N+1 before N"): 16 tasks append to their own streams while a reader follows the global
//! log through `watch_head`, with no sleeps.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use incarnate::{AppendRequest, StreamId};

use crate::support::{self, account, events_for, payload_of, read_all, sequences, Harness};

const WRITERS: usize = 16;
const APPENDS_PER_WRITER: usize = 200;
/// The reader's page size: small enough that some reads stop mid-append.
const PAGE: usize = 64;

/// The number of events in append `k` of writer `w`: 1, 2 or 3, staggered between writers.
fn append_size(w: usize, k: usize) -> u64 {
    ((w + k) % 3 + 1) as u64
}

fn writer_stream(w: usize) -> StreamId {
    account(&format!("writer-{w}"))
}

/// The sequence numbers at which writer `w`'s appends end.
fn append_ends(w: usize) -> BTreeSet<u64> {
    (0..APPENDS_PER_WRITER)
        .scan(0, |end, k| {
            *end += append_size(w, k);
            Some(*end)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_follower_sees_every_position_once_in_order() {
    follower_sees_every_position_once_in_order(support::sled_harness()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_follower_sees_every_position_once_in_order() {
    follower_sees_every_position_once_in_order(support::memory_harness()).await;
}

async fn follower_sees_every_position_once_in_order(h: Harness) {
    let store = h.shared();
    let totals: Vec<u64> = (0..WRITERS)
        .map(|w| (0..APPENDS_PER_WRITER).map(|k| append_size(w, k)).sum())
        .collect();
    let total: u64 = totals.iter().sum();
    let streams: HashMap<StreamId, usize> = (0..WRITERS).map(|w| (writer_stream(w), w)).collect();
    let ends: Vec<BTreeSet<u64>> = (0..WRITERS).map(append_ends).collect();

    // Subscribed before any write, so no commit can be missed.
    let mut head = store.watch_head();
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut next = 1u64;
            let mut seen = vec![0u64; WRITERS];
            let mut caught_up_reads = 0u32;
            while next <= total {
                let target = *head.borrow_and_update();
                while next <= target {
                    let page = store.read_log(next, PAGE).await.unwrap();
                    assert!(
                        !page.is_empty(),
                        "head is {target} but the log from {next} is empty"
                    );
                    for e in &page {
                        assert_eq!(e.position, next, "positions must be dense and in order");
                        next += 1;
                        let w = streams[&e.stream];
                        assert_eq!(e.sequence, seen[w] + 1, "{} out of order", e.stream);
                        seen[w] = e.sequence;
                        assert_eq!(e.payload, payload_of(&e.stream, e.sequence));
                    }
                    if page.len() < PAGE {
                        // This read reached the head it saw, so every append it touched is whole.
                        caught_up_reads += 1;
                        for (w, &last) in seen.iter().enumerate() {
                            assert!(
                                last == 0 || ends[w].contains(&last),
                                "saw part of an append: writer {w} at {last}"
                            );
                        }
                    }
                }
                if next <= total {
                    head.changed().await.unwrap();
                }
            }
            // Nothing beyond the last position.
            assert!(store.read_log(next, PAGE).await.unwrap().is_empty());
            (next - 1, seen, caught_up_reads)
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = writer_stream(w);
                let mut version = 0;
                for k in 0..APPENDS_PER_WRITER {
                    let count = append_size(w, k);
                    let events = events_for(&stream, version + 1, count);
                    let done = store
                        .append(AppendRequest::new(stream.clone(), version, events))
                        .await
                        .unwrap();
                    assert_eq!(done.first_sequence, version + 1);
                    assert_eq!(done.last_sequence, version + count);
                    assert_eq!(done.last_position - done.first_position + 1, count);
                    // Acknowledged means readable.
                    assert!(store.head() >= done.last_position);
                    version = done.last_sequence;
                }
                version
            })
        })
        .collect();
    for (w, writer) in writers.into_iter().enumerate() {
        assert_eq!(writer.await.unwrap(), totals[w]);
    }

    // A guard against a follower that never finishes, not a synchronisation.
    let (last, seen, caught_up_reads) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the follower did not reach the last position")
        .unwrap();
    assert_eq!(last, total);
    assert_eq!(seen, totals);
    assert!(caught_up_reads > 0);
    assert_eq!(store.head(), total);
    for (w, &written) in totals.iter().enumerate() {
        let slice = read_all(&*store, &writer_stream(w)).await;
        assert_eq!(sequences(&slice.events), (1..=written).collect::<Vec<_>>());
        assert_eq!(slice.highest_sequence, written);
    }
    h.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_reads_racing_deletions_see_a_dense_suffix() {
    reads_racing_deletions_see_a_dense_suffix(support::sled_harness()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_reads_racing_deletions_see_a_dense_suffix() {
    reads_racing_deletions_see_a_dense_suffix(support::memory_harness()).await;
}

/// A stream read while `delete_to` removes its prefix never reports a broken chain: it sees the
/// events above some deletion watermark, dense and up to the end. (The sled store removes the
/// events a moment before it publishes the new watermark.)
async fn reads_racing_deletions_see_a_dense_suffix(h: Harness) {
    const EVENTS: u64 = 400;
    let store = h.shared();
    let stream = account("shrinking");
    for first in (1..=EVENTS).step_by(50) {
        let events = events_for(&stream, first, 50);
        store
            .append(AppendRequest::new(stream.clone(), first - 1, events))
            .await
            .expect("append");
    }
    let deleter = {
        let (store, stream) = (store.clone(), stream.clone());
        tokio::spawn(async move {
            for to in (3..EVENTS).step_by(3) {
                store.delete_to(&stream, to).await.expect("delete_to");
            }
        })
    };
    let mut reads = 0u32;
    while !deleter.is_finished() || reads == 0 {
        let slice = store
            .read_stream(&stream, 1, u64::MAX, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("read {reads} while deleting: {e}"));
        let seen = sequences(&slice.events);
        let first = seen.first().copied().unwrap_or(EVENTS + 1);
        assert_eq!(seen, (first..=EVENTS).collect::<Vec<_>>(), "read {reads}");
        assert_eq!(slice.highest_sequence, EVENTS);
        reads += 1;
    }
    deleter.await.expect("the deleter");
    h.close().await;
}
