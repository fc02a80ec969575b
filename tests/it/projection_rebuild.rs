//! Q6 on the sled store: a rebuild resets the checkpoint, the read model and the dead letters,
//! replays the log from the start inside the live projector (never beside it), shows as
//! `Rebuilding` while it runs, and ends with the same read model as the live run.

use incarnate::{CommandError, OnError, ProjectorOptions, ProjectorState, Runtime};
use incarnate_actors::account::{Account, AccountCommand};
use incarnate_actors::balances::AccountBalances;

use crate::projection_support::{
    account_tables, assert_account_tables_match_log, builder, committed_checkpoint, counts, once,
    temp_db, Fault, Probe,
};

/// Sends `command`, accepting a rejection (no event) as an outcome.
async fn try_send(rt: &Runtime, id: &str, command: AccountCommand) {
    match rt.send::<Account>(id, command).await {
        Ok(_) | Err(CommandError::Rejected(_)) => {}
        Err(e) => panic!("{id}: {e}"),
    }
}

/// Deposits, withdrawals, a rejected withdrawal and (in round 0) openings and a closing.
async fn workload(rt: &Runtime, round: u64) {
    for (i, id) in (0u64..).zip(["a", "b", "c", "d"]) {
        if round == 0 {
            try_send(rt, id, AccountCommand::Open { owner: id.into() }).await;
        }
        for k in 0..3 {
            let amount = 100 * (i + 1) + round + k;
            try_send(rt, id, AccountCommand::Deposit { amount }).await;
        }
        try_send(rt, id, AccountCommand::Withdraw { amount: 50 }).await;
        try_send(rt, id, AccountCommand::Withdraw { amount: 1_000_000 }).await;
    }
    if round == 0 {
        try_send(rt, "c", AccountCommand::Close).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q6_rebuild_replays_from_the_start_and_equals_the_live_result() {
    let (_dir, path) = temp_db();
    let probe = Probe::new("q6", "q6_seen");
    let (gate, log) = (probe.gate(), probe.log());
    let skipping = Probe::new("q6_skip", "q6_skip_seen");
    let faults = skipping.faults();
    faults.set("d", Fault::Always);
    let rt = builder(&path)
        .projector(AccountBalances)
        .projector_with(
            probe,
            ProjectorOptions {
                batch_size: 4,
                ..ProjectorOptions::default()
            },
        )
        .projector_with(
            skipping,
            ProjectorOptions {
                on_error: OnError::Skip,
                ..ProjectorOptions::default()
            },
        )
        .build()
        .unwrap();
    let store = rt.store();
    workload(&rt, 0).await;
    let head = store.head();
    assert!(head > 12, "head {head}");
    for name in [AccountBalances::NAME, "q6", "q6_skip"] {
        rt.wait_for_projection(name, head).await.unwrap();
    }
    assert_eq!(counts(&*store, "q6_seen").await, once(1..=head));

    // The probe's rebuild, held inside its batch [9-12].
    gate.arm(10);
    rt.rebuild_projection("q6").await.unwrap();
    gate.entered().await;
    let s = rt.projection_status("q6").unwrap();
    assert_eq!(s.state, ProjectorState::Rebuilding, "{s:?}");
    assert_eq!((s.checkpoint, s.processed, s.handled), (8, 8, 8), "{s:?}");
    assert_eq!(s.lag, head - 8, "{s:?}");
    assert_eq!(committed_checkpoint(&*store, "q6").await, 8);
    // The table was cleared with the checkpoint: the replay counts every event once again.
    assert_eq!(counts(&*store, "q6_seen").await, once(1..=8));
    // An event committed now is handled by the rebuilding projector when it gets there, not by
    // another instance beside it.
    try_send(&rt, "a", AccountCommand::Deposit { amount: 1 }).await;
    let head = store.head();
    gate.open();
    rt.wait_for_projection("q6", head).await.unwrap();
    let s = rt.projection_status("q6").unwrap();
    assert_eq!(s.state, ProjectorState::Running, "{s:?}");
    assert_eq!((s.checkpoint, s.handled, s.lag), (head, head, 0), "{s:?}");
    assert_eq!(counts(&*store, "q6_seen").await, once(1..=head));
    assert_eq!(
        log.handled(),
        (1..head).chain(1..=head).collect::<Vec<_>>(),
        "the live pass, then the rebuild's pass, nothing interleaved"
    );

    // The account read models: rebuilt, they equal the live ones.
    rt.wait_for_projection(AccountBalances::NAME, head)
        .await
        .unwrap();
    assert_account_tables_match_log(&*store, "live").await;
    let live = account_tables(&*store).await;
    rt.rebuild_projection(AccountBalances::NAME).await.unwrap();
    rt.wait_for_projection(AccountBalances::NAME, head)
        .await
        .unwrap();
    assert_eq!(account_tables(&*store).await, live);
    let s = rt.projection_status(AccountBalances::NAME).unwrap();
    let account_events = store.read_log(1, usize::MAX).await.unwrap().len() as u64;
    assert_eq!((s.handled, s.checkpoint), (account_events, head), "{s:?}");
    assert_eq!(s.state, ProjectorState::Running);

    // Rebuilt while commands keep coming: still a fold of the whole log.
    rt.rebuild_projection(AccountBalances::NAME).await.unwrap();
    workload(&rt, 1).await;
    let head = store.head();
    rt.wait_for_projection(AccountBalances::NAME, head)
        .await
        .unwrap();
    assert_account_tables_match_log(&*store, "rebuilt under writes").await;
    assert_eq!(
        rt.projection_status(AccountBalances::NAME).unwrap().handled,
        head
    );

    // A rebuild also drops the dead letters, and replays the parked events.
    rt.wait_for_projection("q6_skip", head).await.unwrap();
    let parked = rt.dead_letters("q6_skip").await.unwrap();
    assert!(parked.len() >= 5, "{parked:?}");
    assert!(parked.iter().all(|l| l.stream == "account/d"), "{parked:?}");
    faults.cure_all();
    rt.rebuild_projection("q6_skip").await.unwrap();
    assert!(rt.dead_letters("q6_skip").await.unwrap().is_empty());
    rt.wait_for_projection("q6_skip", head).await.unwrap();
    assert!(rt.dead_letters("q6_skip").await.unwrap().is_empty());
    assert_eq!(counts(&*store, "q6_skip_seen").await, once(1..=head));
    let s = rt.projection_status("q6_skip").unwrap();
    assert_eq!((s.handled, s.skipped), (head, 0), "{s:?}");
    rt.shutdown().await.unwrap();
}
