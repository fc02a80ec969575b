//! Q7: catching up over a long log. A projector far behind the head reads the next pages of the
//! log ahead while it handles one, and while it writes little, lets a batch grow to
//! `catch_up_batch_size` events (one commit) until it is closer to the head than that. None of
//! this changes what is delivered: every position once and in order, each batch's writes
//! committed with its checkpoint, exactly once across a crash, and positions deleted between or
//! inside the pages read ahead are neither handled nor waited for.

use incarnate::{EventFilter, EventStore, KvWrite, ProjectorOptions, RuntimeBuilder, StreamId};

use crate::projection_support::{
    committed_checkpoint, counts, once, probe_commit, sled_config, temp_db, Probe, TestStore,
};
use crate::support::{account, append_n, read_whole_log};

const ACCOUNTS: [&str; 5] = ["a", "b", "c", "d", "e"];

/// Pages and batches of 4, batches of up to 16 while at least 16 events behind.
fn options() -> ProjectorOptions {
    ProjectorOptions {
        batch_size: 4,
        catch_up_batch_size: 16,
        ..ProjectorOptions::default()
    }
}

fn ledger() -> StreamId {
    StreamId::new("ledger", "l")
}

/// 12 rounds of 16 events: 3 events of each of [`ACCOUNTS`], then one of the ledger, so the
/// ledger's events are at positions 16, 32, ..., 192.
async fn rounds_log(store: &dyn EventStore) {
    for round in 0..12 {
        for id in ACCOUNTS {
            append_n(store, &account(id), round * 3, 3).await;
        }
        append_n(store, &ledger(), round, 1).await;
    }
    assert_eq!(store.head(), 192);
}

/// The last position written to `table` and the checkpoint of every commit that wrote to it.
fn probe_batches(commits: &[Vec<KvWrite>], table: &str, name: &str) -> Vec<(u64, u64)> {
    commits
        .iter()
        .map(|c| probe_commit(c, table, name))
        .filter_map(|(last, checkpoint)| Some((last?, checkpoint.unwrap_or(0))))
        .collect()
}

/// A projector that writes one row per 16 events catches up in batches of 16: one commit each,
/// with its checkpoint, and a crash inside one leaves every event handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q7_catch_up_batches_read_ahead_commit_exactly_once_across_a_crash() {
    let (_dir, path) = temp_db();
    let (store, hooks) = TestStore::open(&path);
    rounds_log(&store).await;
    let probe =
        || Probe::new("q7_exact", "q7_exact_seen").filter(EventFilter::all().aggregate("ledger"));

    let first = probe();
    let gate = first.gate();
    // Held at the end of the catch-up batch [145-160], with the pages after it read ahead.
    gate.arm(160);
    let rt = RuntimeBuilder::new()
        .config(sled_config(&path))
        .store(store)
        .projector_with(first, options())
        .build()
        .unwrap();
    gate.entered().await;
    let s = rt.projection_status("q7_exact").unwrap();
    assert_eq!((s.checkpoint, s.processed), (144, 144), "{s:?}");
    assert_eq!(committed_checkpoint(&*rt.store(), "q7_exact").await, 144);
    // Nine batches of 16, each one commit holding its write and its checkpoint.
    let batches = probe_batches(&hooks.commits(), "q7_exact_seen", "q7_exact");
    let expected: Vec<_> = (1..=9u64).map(|b| (16 * b, 16 * b)).collect();
    assert_eq!(batches, expected);

    // The crash: the held batch never commits.
    hooks.crash();
    gate.open();
    rt.shutdown().await.unwrap();

    let (store, hooks) = TestStore::open(&path);
    let second = probe();
    let log = second.log();
    let rt = RuntimeBuilder::new()
        .config(sled_config(&path))
        .store(store)
        .projector_with(second, options())
        .build()
        .unwrap();
    rt.wait_for_projection("q7_exact", 192).await.unwrap();
    let store = rt.store();
    assert_eq!(log.handled(), vec![160, 176, 192]);
    assert_eq!(
        counts(&*store, "q7_exact_seen").await,
        once((1..=12).map(|r| 16 * r))
    );
    let batches = probe_batches(&hooks.commits(), "q7_exact_seen", "q7_exact");
    assert_eq!(batches, vec![(160, 160), (176, 176), (192, 192)]);
    let s = rt.projection_status("q7_exact").unwrap();
    assert_eq!((s.checkpoint, s.processed, s.lag), (192, 192, 0), "{s:?}");
    rt.shutdown().await.unwrap();
}

/// A projector that writes a row per event gains nothing from larger commits: it keeps batches
/// of `batch_size` events while catching up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q7_a_projector_writing_per_event_keeps_its_batch_size_while_catching_up() {
    let (_dir, path) = temp_db();
    let (store, hooks) = TestStore::open(&path);
    rounds_log(&store).await;
    let probe = Probe::new("q7_rows", "q7_rows_seen");
    let log = probe.log();
    let rt = RuntimeBuilder::new()
        .config(sled_config(&path))
        .store(store)
        .projector_with(probe, options())
        .build()
        .unwrap();
    rt.wait_for_projection("q7_rows", 192).await.unwrap();
    assert_eq!(log.handled(), (1..=192).collect::<Vec<_>>());
    assert_eq!(counts(&*rt.store(), "q7_rows_seen").await, once(1..=192));
    let batches = probe_batches(&hooks.commits(), "q7_rows_seen", "q7_rows");
    let expected: Vec<_> = (1..=48u64).map(|b| (4 * b, 4 * b)).collect();
    assert_eq!(batches, expected);
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q7_reads_ahead_over_deleted_positions_deliver_the_rest_once_in_order() {
    let (_dir, path) = temp_db();
    let (store, _hooks) = TestStore::open(&path);
    for round in 0..10 {
        for id in ACCOUNTS {
            append_n(&store, &account(id), round * 4, 4).await;
        }
    }
    // Holes of every size: all of `a` (every fifth group of 4), half of `b`, the start of `e`.
    store.delete_to(&account("a"), 40).await.unwrap();
    store.delete_to(&account("b"), 20).await.unwrap();
    store.delete_to(&account("e"), 3).await.unwrap();
    let remaining: Vec<u64> = read_whole_log(&store)
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(remaining.len(), 200 - 40 - 20 - 3);

    let probe = Probe::new("q7_holes", "q7_holes_seen");
    let log = probe.log();
    let rt = RuntimeBuilder::new()
        .config(sled_config(&path))
        .store(store)
        .projector_with(probe, options())
        .build()
        .unwrap();
    rt.wait_for_projection("q7_holes", 200).await.unwrap();
    let store = rt.store();
    assert_eq!(log.handled(), remaining);
    assert_eq!(
        counts(&*store, "q7_holes_seen").await,
        once(remaining.iter().copied())
    );
    let s = rt.projection_status("q7_holes").unwrap();
    assert_eq!(
        (s.checkpoint, s.processed, s.handled),
        (200, 200, remaining.len() as u64),
        "{s:?}"
    );
    assert_eq!(committed_checkpoint(&*store, "q7_holes").await, 200);
    rt.shutdown().await.unwrap();
}
