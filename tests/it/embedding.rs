//! The runtime starts from any context and its configuration file is the documented default.

use incarnate::{Backend, Config, ConfigError, Runtime, RuntimeError};
use incarnate_actors::{Account, AccountCommand};

fn memory_runtime() -> Runtime {
    Runtime::builder()
        .configure(|c| c.store.backend = Backend::Memory)
        .register::<Account>()
        .build()
        .unwrap()
}

#[test]
fn default_toml_is_exactly_the_built_in_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let config = Config::from_file(path).unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn per_type_overrides_fall_back_to_the_default_table() {
    let config = Config::from_toml(
        "[aggregates.default]\nsnapshot_every = 7\n[aggregates.account]\nmailbox_capacity = 3\n",
    )
    .unwrap();
    let account = config.aggregate("account");
    assert_eq!((account.mailbox_capacity, account.snapshot_every), (3, 7));
    let other = config.aggregate("order");
    assert_eq!(
        (other.mailbox_capacity, other.snapshot_every),
        (Config::default().aggregate("x").mailbox_capacity, 7)
    );
}

#[test]
fn bad_configuration_is_a_typed_error() {
    assert!(matches!(
        Config::from_toml("[runtime]\narbiterz = 2\n"),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        Config::from_toml("[aggregates.default]\nmailbox_capacity = 0\n"),
        Err(ConfigError::Invalid {
            key: "aggregates.mailbox_capacity",
            ..
        })
    ));
    assert!(matches!(
        Config::from_file("/nonexistent/incarnate.toml"),
        Err(ConfigError::Read { .. })
    ));
}

/// A plain thread with no async runtime at all: build, send through any executor, shut down.
#[test]
fn works_from_a_plain_thread_without_a_tokio_runtime() {
    let rt = memory_runtime();
    let done = futures::executor::block_on(
        rt.send::<Account>("a", AccountCommand::Open { owner: "A".into() }),
    )
    .unwrap();
    assert_eq!(done.version, 1);
    let (account, _) = futures::executor::block_on(rt.state::<Account>("a")).unwrap();
    assert_eq!(account.owner, "A");
    futures::executor::block_on(rt.shutdown()).unwrap();
}

/// Inside an actix system (as under actix-web): no "spawn_local outside LocalSet".
#[test]
fn works_inside_an_actix_system() {
    let system = actix_rt::System::new();
    let version = system.block_on(async {
        let rt = memory_runtime();
        rt.send::<Account>("b", AccountCommand::Open { owner: "B".into() })
            .await
            .unwrap();
        let done = rt
            .send::<Account>("b", AccountCommand::Deposit { amount: 5 })
            .await
            .unwrap();
        rt.shutdown().await.unwrap();
        done.version
    });
    assert_eq!(version, 2);
}

#[tokio::test]
async fn works_under_tokio_and_refuses_after_shutdown() {
    let rt = memory_runtime();
    let handle = rt.clone();
    // The handle is Send + Sync: commands from spawned tasks on any worker thread.
    let task = tokio::spawn(async move {
        handle
            .send::<Account>("c", AccountCommand::Open { owner: "C".into() })
            .await
    });
    assert_eq!(task.await.unwrap().unwrap().version, 1);
    rt.shutdown().await.unwrap();
    let after = rt
        .send::<Account>("c", AccountCommand::Deposit { amount: 1 })
        .await;
    assert!(matches!(
        after,
        Err(incarnate::CommandError::Runtime(RuntimeError::Stopped))
    ));
}
