//! Q5 and Q7 on the sled store: the failure strategies (stop, skip into dead letters, retry with
//! back-off then skip or stop), resuming and replaying once the cause is gone, across restarts,
//! and the lag of a projector that has fallen behind.

use std::time::Duration;

use incarnate::{EventStore, OnError, ProjectionError, ProjectorOptions, ProjectorState, Runtime};
use incarnate_actors::account::{Account, AccountCommand, AccountEvent};

use crate::projection_support::{
    builder, committed_checkpoint, counts, once, temp_db, Attempt, Fault, Probe,
};
use crate::support::{log_key, open_sled, overwrite};

async fn send(rt: &Runtime, id: &str, command: AccountCommand) -> u64 {
    let done = rt.send::<Account>(id, command).await.unwrap();
    done.events.last().unwrap().position
}

async fn open(rt: &Runtime, id: &str) -> u64 {
    send(rt, id, AccountCommand::Open { owner: id.into() }).await
}

async fn deposit(rt: &Runtime, id: &str) -> u64 {
    send(rt, id, AccountCommand::Deposit { amount: 5 }).await
}

fn assert_stopped(err: ProjectionError) {
    assert!(matches!(err, ProjectionError::Stopped { .. }), "{err}");
}

/// The stop reason of a stopped projector.
fn stop_reason(state: &ProjectorState) -> &str {
    match state {
        ProjectorState::Stopped(reason) => reason,
        other => panic!("expected a stopped projector, got {other:?}"),
    }
}

/// Checks that consecutive attempts were at least `backoff_ms`, then twice that, ... apart.
fn assert_backoff(attempts: &[Attempt], backoff_ms: u64) {
    for (i, pair) in attempts.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        let min = Duration::from_millis(backoff_ms << i);
        assert!(gap >= min, "retry {} came after {gap:?} < {min:?}", i + 1);
    }
}

/// Q5 `Stop` and Q7: the projector stops at the failing event with its checkpoint before it, its
/// lag grows as events keep coming, a restart stops at the same event again, and once the cause
/// is removed `resume_projection` carries on from the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q5_stop_holds_the_checkpoint_before_the_failing_event_until_resumed() {
    let (_dir, path) = temp_db();
    let probe = Probe::new("stop", "stop_seen");
    let (faults, log) = (probe.faults(), probe.log());
    faults.set("poison", Fault::Always);
    // `projector` runs with the defaults: exactly once, stop on error.
    let rt = builder(&path).projector(probe).build().unwrap();
    let store = rt.store();
    open(&rt, "a").await;
    deposit(&rt, "a").await;
    assert_eq!(open(&rt, "poison").await, 3);
    deposit(&rt, "a").await;
    assert_eq!(deposit(&rt, "a").await, 5);

    assert_stopped(rt.wait_for_projection("stop", 5).await.unwrap_err());
    let s = rt.projection_status("stop").unwrap();
    let reason = stop_reason(&s.state);
    assert!(
        reason.contains("event 3") && reason.contains("poisoned"),
        "{reason}"
    );
    assert_eq!((s.checkpoint, s.processed, s.handled), (2, 2, 2), "{s:?}");
    assert_eq!(committed_checkpoint(&*store, "stop").await, 2);
    // The failing handler's write was discarded with it; the event after it was not handled.
    assert_eq!(counts(&*store, "stop_seen").await, once(1..=2));
    assert_eq!(log.handled(), vec![1, 2]);
    assert_eq!(log.attempts_at(3).len(), 1);
    assert!(log.attempts_at(4).is_empty());

    // Q7: lag is the head minus the processed position, and it grows while the projector is
    // stopped.
    assert_eq!((s.head, s.lag), (5, 3), "{s:?}");
    for _ in 0..3 {
        deposit(&rt, "a").await;
    }
    let s = rt.projection_status("stop").unwrap();
    assert_eq!((s.head, s.processed, s.lag), (8, 2, 6), "{s:?}");
    assert_stopped(rt.wait_for_projection("stop", 8).await.unwrap_err());
    rt.shutdown().await.unwrap();

    // After a restart, with the cause still there, it stops at the same event.
    let probe = Probe::new("stop", "stop_seen").faults_from(&faults);
    let log = probe.log();
    let rt = builder(&path).projector(probe).build().unwrap();
    let store = rt.store();
    assert_stopped(rt.wait_for_projection("stop", 8).await.unwrap_err());
    let s = rt.projection_status("stop").unwrap();
    assert!(stop_reason(&s.state).contains("event 3"), "{s:?}");
    assert_eq!((s.checkpoint, s.processed, s.handled), (2, 2, 0), "{s:?}");
    assert_eq!((s.head, s.lag), (8, 6), "{s:?}");
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!((attempts[0].position, attempts[0].checkpoint), (3, 2));

    // The cause removed, resuming carries on from the checkpoint.
    faults.cure_all();
    rt.resume_projection("stop").await.unwrap();
    rt.wait_for_projection("stop", 8).await.unwrap();
    assert_eq!(log.handled(), (3..=8).collect::<Vec<_>>());
    assert_eq!(counts(&*store, "stop_seen").await, once(1..=8));
    let s = rt.projection_status("stop").unwrap();
    assert_eq!(s.state, ProjectorState::Running);
    assert_eq!((s.checkpoint, s.handled, s.lag), (8, 6, 0), "{s:?}");
    rt.shutdown().await.unwrap();
}

/// Q5 `Skip`: failing (and panicking) events are parked with their error and position while the
/// projector goes on; the dead letters survive a restart; replaying one while it still fails
/// counts the attempt, and once the cause is gone the replay applies it and unparks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q5_skip_parks_failing_events_and_replay_unparks_them() {
    let (_dir, path) = temp_db();
    let skip = ProjectorOptions {
        on_error: OnError::Skip,
        ..ProjectorOptions::default()
    };
    let probe = Probe::new("skip", "skip_seen");
    let faults = probe.faults();
    faults.set("poison", Fault::Always);
    faults.set("bomb", Fault::Panic);
    let rt = builder(&path).projector_with(probe, skip).build().unwrap();
    let store = rt.store();
    open(&rt, "a").await; // 1
    open(&rt, "poison").await; // 2
    deposit(&rt, "a").await; // 3
    open(&rt, "bomb").await; // 4
    deposit(&rt, "poison").await; // 5
    assert_eq!(deposit(&rt, "a").await, 6);

    // Skipping never stops the projector.
    rt.wait_for_projection("skip", 6).await.unwrap();
    let s = rt.projection_status("skip").unwrap();
    assert_eq!(s.state, ProjectorState::Running);
    assert_eq!((s.checkpoint, s.handled, s.skipped), (6, 3, 3), "{s:?}");
    assert_eq!(counts(&*store, "skip_seen").await, once([1, 3, 6]));
    let letters = rt.dead_letters("skip").await.unwrap();
    assert_eq!(
        letters.iter().map(|l| l.position).collect::<Vec<_>>(),
        vec![2, 4, 5]
    );
    assert_eq!(letters[0].stream, "account/poison");
    assert_eq!(letters[0].event_type, AccountEvent::OPENED);
    assert!(
        letters[0].error.contains("poisoned event 2"),
        "{:?}",
        letters[0]
    );
    assert_eq!(letters[1].stream, "account/bomb");
    assert!(letters[1].error.contains("panicked"), "{:?}", letters[1]);
    assert_eq!(letters[2].event_type, AccountEvent::DEPOSITED);
    assert!(letters.iter().all(|l| l.attempts == 1), "{letters:?}");

    // While the cause is there, a replay fails and counts the attempt; a panicking one errs.
    assert!(!rt.replay_dead_letter("skip", 2).await.unwrap());
    assert!(rt.replay_dead_letter("skip", 4).await.is_err());
    rt.shutdown().await.unwrap();

    // Dead letters are stored: they are still there after a restart.
    let probe = Probe::new("skip", "skip_seen").faults_from(&faults);
    let rt = builder(&path).projector_with(probe, skip).build().unwrap();
    let store = rt.store();
    rt.wait_for_projection("skip", 6).await.unwrap();
    let letters = rt.dead_letters("skip").await.unwrap();
    assert_eq!(
        letters
            .iter()
            .map(|l| (l.position, l.attempts))
            .collect::<Vec<_>>(),
        vec![(2, 2), (4, 1), (5, 1)]
    );

    faults.cure_all();
    assert!(rt.replay_dead_letter("skip", 2).await.unwrap());
    assert!(rt.replay_dead_letter("skip", 4).await.unwrap());
    let letters = rt.dead_letters("skip").await.unwrap();
    assert_eq!(
        letters.iter().map(|l| l.position).collect::<Vec<_>>(),
        vec![5]
    );
    assert_eq!(counts(&*store, "skip_seen").await, once([1, 2, 3, 4, 6]));
    assert!(rt.replay_dead_letter("skip", 5).await.unwrap());
    assert!(rt.dead_letters("skip").await.unwrap().is_empty());
    assert_eq!(counts(&*store, "skip_seen").await, once(1..=6));
    // A position that is not parked (any more) is not replayed.
    assert!(!rt.replay_dead_letter("skip", 5).await.unwrap());
    assert!(!rt.replay_dead_letter("skip", 3).await.unwrap());
    assert_eq!(counts(&*store, "skip_seen").await, once(1..=6));
    assert!(matches!(
        rt.dead_letters("nobody").await,
        Err(ProjectionError::UnknownProjector(_))
    ));
    assert!(matches!(
        rt.replay_dead_letter("nobody", 1).await,
        Err(ProjectionError::UnknownProjector(_))
    ));
    rt.shutdown().await.unwrap();
}

/// Q5 `Retry`: a transient failure is retried with doubling back-off and then handled (not
/// parked); a persistent one is retried `attempts` times, then parked with its attempt count
/// (`then_skip`) or stops the projector before it, which resumes once the cause is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q5_retry_backs_off_then_skips_or_stops() {
    let (_dir, path) = temp_db();
    let then_skip = Probe::new("retry_skip", "retry_skip_seen");
    let (skip_faults, skip_log) = (then_skip.faults(), then_skip.log());
    skip_faults.set("flaky", Fault::Times(2));
    skip_faults.set("poison", Fault::Always);
    let then_stop = Probe::new("retry_stop", "retry_stop_seen");
    let (stop_faults, stop_log) = (then_stop.faults(), then_stop.log());
    stop_faults.set("poison", Fault::Always);
    let rt = builder(&path)
        .projector_with(
            then_skip,
            ProjectorOptions {
                on_error: OnError::Retry {
                    attempts: 3,
                    backoff_ms: 20,
                    then_skip: true,
                },
                ..ProjectorOptions::default()
            },
        )
        .projector_with(
            then_stop,
            ProjectorOptions {
                on_error: OnError::Retry {
                    attempts: 2,
                    backoff_ms: 10,
                    then_skip: false,
                },
                ..ProjectorOptions::default()
            },
        )
        .build()
        .unwrap();
    let store = rt.store();
    open(&rt, "a").await; // 1
    open(&rt, "flaky").await; // 2
    open(&rt, "poison").await; // 3
    assert_eq!(deposit(&rt, "a").await, 4);

    rt.wait_for_projection("retry_skip", 4).await.unwrap();
    // The transient failure: two failed attempts, then success; nothing parked for it.
    let flaky = skip_log.attempts_at(2);
    assert_eq!(
        flaky.iter().map(|a| a.ok).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    assert_backoff(&flaky, 20);
    // The persistent one: 1 + 3 attempts, 20, 40, 80 ms apart, then parked.
    let poisoned = skip_log.attempts_at(3);
    assert_eq!(poisoned.len(), 4);
    assert!(poisoned.iter().all(|a| !a.ok));
    assert_backoff(&poisoned, 20);
    let letters = rt.dead_letters("retry_skip").await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].position, letters[0].attempts), (3, 4));
    assert!(letters[0].error.contains("poisoned event 3"), "{letters:?}");
    let s = rt.projection_status("retry_skip").unwrap();
    assert_eq!(s.state, ProjectorState::Running);
    assert_eq!((s.checkpoint, s.handled, s.skipped), (4, 3, 1), "{s:?}");
    assert_eq!(counts(&*store, "retry_skip_seen").await, once([1, 2, 4]));

    // Then stop: 1 + 2 attempts, 10 and 20 ms apart, then stopped before the event.
    assert_stopped(rt.wait_for_projection("retry_stop", 4).await.unwrap_err());
    let poisoned = stop_log.attempts_at(3);
    assert_eq!(poisoned.len(), 3);
    assert_backoff(&poisoned, 10);
    let s = rt.projection_status("retry_stop").unwrap();
    assert!(stop_reason(&s.state).contains("event 3"), "{s:?}");
    assert_eq!((s.checkpoint, s.processed, s.lag), (2, 2, 2), "{s:?}");
    assert_eq!(committed_checkpoint(&*store, "retry_stop").await, 2);
    assert!(rt.dead_letters("retry_stop").await.unwrap().is_empty());
    assert_eq!(counts(&*store, "retry_stop_seen").await, once(1..=2));

    stop_faults.cure_all();
    rt.resume_projection("retry_stop").await.unwrap();
    rt.wait_for_projection("retry_stop", 4).await.unwrap();
    assert_eq!(stop_log.handled(), vec![1, 2, 3, 4]);
    assert_eq!(counts(&*store, "retry_stop_seen").await, once(1..=4));
    rt.shutdown().await.unwrap();
}

/// A record of the log whose envelope cannot be decoded (damaged on disk): the projector handles
/// and commits the events before it, does not pass it (it reads it again and again), and carries
/// on once the damaged event is deleted from its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_holds_the_projector_before_it_until_it_is_deleted() {
    let (_dir, path) = temp_db();
    let rt = builder(&path).build().unwrap();
    open(&rt, "a").await;
    deposit(&rt, "a").await;
    let damaged = deposit(&rt, "a").await;
    open(&rt, "b").await;
    let last = deposit(&rt, "b").await;
    rt.shutdown().await.unwrap();
    // Each command was a commit of its own: the damaged event is a log value of its own.
    overwrite(&path, &log_key(damaged), b"\x01\xc1not a log record");

    let probe = Probe::new("garbled", "garbled_seen");
    let log = probe.log();
    let rt = builder(&path).projector(probe).build().unwrap();
    let store = rt.store();
    rt.wait_for_projection("garbled", damaged - 1)
        .await
        .unwrap();
    let passed = tokio::time::timeout(
        Duration::from_millis(300),
        rt.wait_for_projection("garbled", damaged),
    )
    .await;
    assert!(passed.is_err(), "the projector passed the damaged record");
    assert_eq!(log.handled(), [1, 2]);
    assert_eq!(committed_checkpoint(store.as_ref(), "garbled").await, 2);
    let status = rt.projection_status("garbled").unwrap();
    assert_eq!(
        (status.processed, status.state),
        (2, ProjectorState::Running)
    );

    store
        .delete_to(&incarnate::StreamId::new("account", "a"), 3)
        .await
        .unwrap();
    rt.wait_for_projection("garbled", last).await.unwrap();
    assert_eq!(log.handled(), [1, 2, 4, 5]);
    rt.shutdown().await.unwrap();
}

/// A stop (here: the runtime shutting down) that comes while a projector waits out a retry
/// back-off does not wait for it: the batch commits the events before the failing one, and the
/// failing event is handled again, once, after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_cuts_a_retry_back_off_short_and_the_event_is_handled_after_the_restart() {
    let (_dir, path) = temp_db();
    let retrying = ProjectorOptions {
        on_error: OnError::Retry {
            attempts: 3,
            backoff_ms: 600_000,
            then_skip: false,
        },
        ..ProjectorOptions::default()
    };
    let probe = Probe::new("patient", "patient_seen");
    let (faults, log, gate) = (probe.faults(), probe.log(), probe.gate());
    faults.set("poison", Fault::Always);
    gate.arm(2);
    let rt = builder(&path)
        .projector_with(probe, retrying)
        .build()
        .unwrap();
    open(&rt, "a").await; // 1
    open(&rt, "poison").await; // 2
    assert_eq!(deposit(&rt, "a").await, 3);
    // The first attempt at 2 runs, fails, and the ten-minute back-off begins.
    gate.entered().await;
    gate.open();
    let shutdown = tokio::time::timeout(Duration::from_secs(30), rt.shutdown()).await;
    assert!(
        matches!(shutdown, Ok(Ok(()))),
        "the shutdown waited for the back-off: {shutdown:?}"
    );
    assert_eq!(log.handled(), [1]);
    assert!(log.attempts_at(2).iter().all(|a| !a.ok));
    let stopped = open_sled(&path);
    assert_eq!(committed_checkpoint(&stopped, "patient").await, 1);
    stopped.close().await.unwrap();
    drop(stopped);

    let rt = builder(&path)
        .projector_with(Probe::new("patient", "patient_seen"), retrying)
        .build()
        .unwrap();
    let store = rt.store();
    rt.wait_for_projection("patient", 3).await.unwrap();
    assert_eq!(counts(store.as_ref(), "patient_seen").await, once(1..=3));
    rt.shutdown().await.unwrap();
}
