//! R. Snapshots and retention, on the sled store with real restarts.
//!
//! Snapshots are written beside the actor with no signal to await: the tests poll the store or
//! the stats for their effect, with a deadline.

use incarnate::{Config, EventStore, Runtime, SnapshotCriteria};

use crate::runtime_support::{
    eventually, fold, shutdown, single_sequence, stored, stream_of, within, Node, Tally,
    TallyCommand,
};

/// The sequence numbers of every snapshot of tally `id`, newest first.
async fn snapshots(store: &dyn EventStore, id: &str) -> Vec<u64> {
    let stream = stream_of::<Tally>(id);
    let mut out = Vec::new();
    let mut below = u64::MAX;
    while let Some(s) = store
        .latest_snapshot(&stream, SnapshotCriteria::up_to(below))
        .await
        .unwrap()
    {
        out.push(s.sequence);
        if s.sequence == 0 {
            break;
        }
        below = s.sequence - 1;
    }
    out
}

/// The sequence of the first readable event of tally `id` (0 if none).
async fn first_event(store: &dyn EventStore, id: &str) -> u64 {
    let slice = store
        .read_stream(&stream_of::<Tally>(id), 1, u64::MAX, 1)
        .await
        .unwrap();
    slice.events.first().map_or(0, |e| e.sequence)
}

async fn add_all(rt: &Runtime, id: &str, values: impl IntoIterator<Item = u64>) {
    for v in values {
        rt.send::<Tally>(id, TallyCommand::Add(v)).await.unwrap();
    }
}

/// Waits until the store shows exactly `kept` snapshots and, when events are deleted, the
/// stream starts at `first`.
async fn wait_for_retention(rt: &Runtime, id: &str, kept: &[u64], first: u64) {
    let store = rt.store();
    let what = format!("snapshots {kept:?} kept and events from {first} readable");
    eventually(&what, || {
        let store = store.clone();
        let kept = kept.to_vec();
        let id = id.to_owned();
        async move {
            snapshots(&*store, &id).await == kept && first_event(&*store, &id).await == first
        }
    })
    .await;
}

/// R1: every 10, keep 2; with or without deleting the covered events. Recovery is checked after
/// each step through a real restart, and must start from the newest snapshot.
async fn every_10_keep_2(delete_events: bool) {
    let node = Node::new();
    let config = move |c: &mut Config| {
        c.aggregates.default.snapshot_every = 10;
        c.aggregates.default.snapshot_keep = 2;
        c.aggregates.default.delete_events_on_snapshot = delete_events;
    };
    let first_kept = |horizon: u64| if delete_events { horizon + 1 } else { 1 };

    let rt = node.runtime_with(config);
    add_all(&rt, "r", 1..=35).await;
    eventually("three snapshots are saved", || {
        let saved = rt.stats::<Tally>().unwrap().snapshots;
        async move { saved == 3 }
    })
    .await;
    // The snapshot at 30 retires the one at 10 (and, if asked, the events up to 10).
    wait_for_retention(&rt, "r", &[30, 20], first_kept(10)).await;
    assert_eq!(
        stored::<Tally>(&*rt.store(), "r").await.highest_sequence,
        35
    );
    shutdown(rt).await;

    let rt = node.runtime_with(config);
    let (state, version) = rt.state::<Tally>("r").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=35), 35));
    assert_eq!(state.applied, 5, "recovered from the snapshot at 30");
    add_all(&rt, "r", 36..=65).await;
    eventually("snapshots 40, 50 and 60 are saved", || {
        let saved = rt.stats::<Tally>().unwrap().snapshots;
        async move { saved == 3 }
    })
    .await;
    wait_for_retention(&rt, "r", &[60, 50], first_kept(40)).await;
    if !delete_events {
        assert_eq!(
            fold::<Tally>(&*rt.store(), "r").await,
            (Tally::of(1..=65), 65)
        );
    }
    shutdown(rt).await;

    let rt = node.runtime_with(config);
    let (state, version) = rt.state::<Tally>("r").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=65), 65));
    assert_eq!(state.applied, 5, "recovered from the snapshot at 60");
    // The stream continues after the deleted prefix.
    let next = rt.send::<Tally>("r", TallyCommand::Add(66)).await.unwrap();
    assert_eq!(single_sequence(&next), 66);
    assert_eq!(rt.stats::<Tally>().unwrap().snapshot_failures, 0);
    shutdown(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_every_n_keep_k_keeps_the_events_and_recovers_after_restarts() {
    every_10_keep_2(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_every_n_keep_k_deleting_covered_events_recovers_after_restarts() {
    every_10_keep_2(true).await;
}

/// R1: the snapshot is taken at the end of the append that crossed the multiple, not at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_taken_at_the_end_of_the_append_that_crossed_a_multiple() {
    let node = Node::new();
    let config = |c: &mut Config| c.aggregates.default.snapshot_every = 10;
    let rt = node.runtime_with(config);
    add_all(&rt, "x", 1..=5).await;
    let done = rt
        .send::<Tally>("x", TallyCommand::AddAll((6..=17).collect()))
        .await
        .unwrap();
    assert_eq!((done.first_sequence, done.last_sequence), (6, 17));
    let store = rt.store();
    eventually("the snapshot is saved and counted", || {
        let store = store.clone();
        let saved = rt.stats::<Tally>().unwrap().snapshots;
        async move { saved == 1 && snapshots(&*store, "x").await == [17] }
    })
    .await;
    shutdown(rt).await;

    let rt = node.runtime_with(config);
    let (state, version) = rt.state::<Tally>("x").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=17), 17));
    assert_eq!(state.applied, 0, "the whole state came from the snapshot");
    shutdown(rt).await;
}

/// R2: a failed snapshot save is counted; the actor keeps serving; nothing is deleted. When
/// saves work again, retention resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_save_is_counted_the_actor_keeps_running_and_nothing_is_deleted() {
    let node = Node::new();
    let config = |c: &mut Config| {
        c.aggregates.default.snapshot_every = 5;
        c.aggregates.default.snapshot_keep = 1;
        c.aggregates.default.delete_events_on_snapshot = true;
    };
    let (rt, faults) = node.faulty_runtime_with(config);
    faults.fail_snapshot_saves(true);
    add_all(&rt, "s", 1..=12).await;
    eventually("two snapshot failures are counted", || {
        let failures = rt.stats::<Tally>().unwrap().snapshot_failures;
        async move { failures == 2 }
    })
    .await;
    let stats = rt.stats::<Tally>().unwrap();
    assert_eq!((stats.snapshots, stats.live, stats.activations), (0, 1, 1));
    let store = rt.store();
    assert!(snapshots(&*store, "s").await.is_empty());
    assert_eq!(
        fold::<Tally>(&*store, "s").await,
        (Tally::of(1..=12), 12),
        "no event was deleted"
    );
    assert_eq!(
        rt.state::<Tally>("s").await.unwrap(),
        (Tally::of(1..=12), 12)
    );

    faults.fail_snapshot_saves(false);
    add_all(&rt, "s", 13..=15).await;
    // Saved at 15; keep 1 retires everything up to 10, events included.
    wait_for_retention(&rt, "s", &[15], 11).await;
    assert_eq!(rt.stats::<Tally>().unwrap().snapshots, 1);
    shutdown(rt).await;

    let rt = node.runtime_with(config);
    let (state, version) = rt.state::<Tally>("s").await.unwrap();
    assert_eq!((state.clone(), version), (Tally::of(1..=15), 15));
    assert_eq!(state.applied, 0);
    shutdown(rt).await;
}

/// R3: commands keep committing while snapshot writes are held: a snapshot never stalls the
/// command path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_writes_do_not_stall_the_command_path() {
    let node = Node::new();
    let (rt, faults) = node.faulty_runtime_with(|c| c.aggregates.default.snapshot_every = 2);
    faults.snapshots.hold();
    add_all(&rt, "q", 1..=2).await;
    faults.snapshots.wait_entered(1).await;
    for v in 3..=22 {
        let done = within(
            "a command while snapshot writes are held",
            rt.send::<Tally>("q", TallyCommand::Add(v)),
        )
        .await
        .unwrap();
        assert_eq!(single_sequence(&done), v);
    }
    assert_eq!(
        rt.stats::<Tally>().unwrap().snapshots,
        0,
        "every save is held"
    );
    faults.snapshots.release();
    eventually("the 11 held snapshots are saved", || {
        let saved = rt.stats::<Tally>().unwrap().snapshots;
        async move { saved == 11 }
    })
    .await;
    assert_eq!(snapshots(&*rt.store(), "q").await[0], 22);
    shutdown(rt).await;
}
